//! Child processes of `vkvm torture` and `vkvm bench` (a `vkvm run` per
//! test, QEMU). Each starts in its own process group, so a terminal's
//! Ctrl-C reaches only us and we forward it exactly once; it gets SIGTERM
//! if we die (PR_SET_PDEATHSIG); it starts with SIGINT and SIGTERM
//! unblocked (vkvm blocks them in every thread, and std keeps the mask
//! across `exec`: QEMU would otherwise ignore a SIGTERM); its output goes
//! to files in the caller's scratch directory (no pipe to drain while we
//! wait). A SIGINT or SIGTERM we receive is forwarded to it, and we wait
//! for it to stop cleanly.

use crate::error::Error;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// How a child ended.
pub struct ChildOutput {
    /// Its exit status (None if a signal killed it).
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The signal we forwarded to it, if we did.
    pub interrupted: Option<i32>,
}

/// Run `cmd` to its end; `dir` holds its output files (named after `tag`).
pub fn run(cmd: &mut Command, dir: &Path, tag: &str) -> Result<ChildOutput, Error> {
    let (out_path, err_path) = (dir.join(format!("{tag}.stdout")), dir.join(format!("{tag}.stderr")));
    let file = |p: &Path| std::fs::File::create(p).map_err(Error::io(format!("cannot create {}", p.display())));
    cmd.stdin(Stdio::null()).stdout(file(&out_path)?).stderr(file(&err_path)?).process_group(0);
    let unblock = vmm_sys_util::signal::create_sigset(&[libc::SIGINT, libc::SIGTERM])
        .map_err(|e| Error::Crash(format!("sigset: {e}")))?;
    // SAFETY: prctl and pthread_sigmask are async-signal-safe and touch
    // nothing of ours (the sigset is a copy).
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &unblock, std::ptr::null_mut());
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(Error::io(format!("cannot start {:?}", cmd.get_program())))?;
    let mut forwarded = None;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(Error::io("cannot wait for a child process"))? {
            break st;
        }
        if let (None, Some(sig)) = (forwarded, crate::signals::pending()) {
            // SAFETY: signalling our own child, which has not been reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, sig) };
            forwarded = Some(sig);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(ChildOutput {
        code: status.code(),
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
        interrupted: forwarded,
    })
}

#[cfg(test)]
mod test {
    use super::*;

    /// Blocked SIGINT/SIGTERM (as in every vkvm thread) are not passed on.
    #[test]
    fn children_start_with_sigint_and_sigterm_unblocked() {
        std::thread::spawn(|| {
            for sig in [libc::SIGINT, libc::SIGTERM] {
                let _ = vmm_sys_util::signal::block_signal(sig);
            }
            let dir = tempfile::tempdir().unwrap();
            let out = run(Command::new("grep").args(["SigBlk", "/proc/self/status"]), dir.path(), "t").unwrap();
            let line = String::from_utf8_lossy(&out.stdout).into_owned();
            let mask = u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap();
            let bit = |sig: i32| 1u64 << (sig - 1);
            assert_eq!(mask & (bit(libc::SIGINT) | bit(libc::SIGTERM)), 0, "{line}");
        })
        .join()
        .unwrap();
    }
}
