//! Files the user names, checked before they are read: kernels, modules
//! and map files must be regular files (a FIFO, a directory or /dev/zero is
//! a one-line error, status 2, never a hang or an endless read), whole files
//! are read with a size cap, the `--swap` file is locked for the run, and
//! `--stats-json` is created at start so that a bad path is found before
//! the guest runs.

use crate::error::Error;
use std::fs::{File, Metadata, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// An error opening a file the user named: the user's to fix (status 2),
/// unless the host is out of descriptors or memory (status 3).
pub fn open_error(msg: String, e: &std::io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM) => Error::Crash(format!("{msg}: {e} (a host limit)")),
        _ => Error::Config(format!("{msg}: {e}")),
    }
}

/// What a non-regular file is, for the message.
fn kind(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Open `path` (`what` names it in errors) if it is a regular file. stat
/// first, so that opening a FIFO cannot block; the open is non-blocking and
/// the file is checked again through its descriptor in case it was swapped.
pub fn open_regular(path: &Path, what: &str, write: bool) -> Result<(File, u64), Error> {
    let p = path.display();
    let bad = |m: &Metadata| Error::Config(format!("{what} {p} is {}, not a regular file", kind(m)));
    let m = std::fs::metadata(path).map_err(|e| Error::Config(format!("{what} {p}: {e}")))?;
    if !m.is_file() {
        return Err(bad(&m));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| open_error(format!("{what} {p}: cannot open"), &e))?;
    let m = f.metadata().map_err(|e| Error::Config(format!("{what} {p}: {e}")))?;
    if !m.is_file() {
        return Err(bad(&m));
    }
    Ok((f, m.len()))
}

/// Read a whole regular file of at most `cap` bytes (`cap_why` says where
/// the cap comes from).
pub fn read_capped(path: &Path, what: &str, cap: u64, cap_why: &str) -> Result<Vec<u8>, Error> {
    let (f, len) = open_regular(path, what, false)?;
    let too_big =
        |n: u64| Error::Config(format!("{what} {} is {n} bytes, more than {cap} ({cap_why})", path.display()));
    if len > cap {
        return Err(too_big(len));
    }
    let mut data = Vec::with_capacity(len as usize);
    // One byte over the cap tells a file that grew since the stat.
    f.take(cap + 1)
        .read_to_end(&mut data)
        .map_err(|e| Error::Config(format!("{what} {}: cannot read: {e}", path.display())))?;
    if data.len() as u64 > cap {
        return Err(too_big(data.len() as u64));
    }
    Ok(data)
}

/// The `--swap` file for this run: a regular file or a new one, empty
/// unless `reuse`, and locked (`flock`, exclusive) for as long as this
/// value lives, so two runs can never share it.
pub fn lock_swap(path: &Path, reuse: bool) -> Result<File, Error> {
    let p = path.display();
    let cfg = |m: String| Error::Config(format!("--swap {p}: {m}"));
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => return Err(cfg(format!("is {}, not a regular file", kind(&m)))),
        Ok(m) if m.len() > 0 && !reuse => {
            return Err(cfg(format!(
                "the file exists and holds {} bytes, which vkvm would overwrite; give --swap-reuse to allow that",
                m.len()
            )))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(cfg(e.to_string())),
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| open_error(format!("--swap {p}: cannot create the swap file"), &e))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            cfg("another process holds a lock on it (another vkvm run uses it as swap)".into())
        } else {
            cfg(format!("cannot lock it: {e}"))
        });
    }
    let m = f.metadata().map_err(|e| cfg(e.to_string()))?;
    if !m.is_file() {
        return Err(cfg(format!("is {}, not a regular file", kind(&m))));
    }
    Ok(f)
}

/// An output file (`--stats-json`, `--json`), created when the command
/// starts (so that an unwritable path is a configuration error before any
/// guest runs) and written at the end. If the command ends before that, a
/// file this created is removed again.
#[derive(Debug)]
pub struct OutFile {
    path: PathBuf,
    created: bool,
    written: bool,
}

impl OutFile {
    /// `flag` names the option in errors.
    pub fn create(path: &Path, flag: &str) -> Result<OutFile, Error> {
        let p = path.display();
        let existed = match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => {
                return Err(Error::Config(format!("{flag} {p} is {}, not a regular file", kind(&m))))
            }
            Ok(_) => true,
            Err(_) => false,
        };
        OpenOptions::new()
            .write(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| open_error(format!("{flag} {p}: cannot create"), &e))?;
        Ok(OutFile { path: path.to_path_buf(), created: !existed, written: false })
    }

    pub fn write(&mut self, text: &str) -> Result<(), Error> {
        std::fs::write(&self.path, text).map_err(Error::io(format!("cannot write {}", self.path.display())))?;
        self.written = true;
        Ok(())
    }
}

impl Drop for OutFile {
    fn drop(&mut self) {
        if self.created && !self.written {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn fifos_devices_and_directories_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: creating a FIFO at a path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for (p, want) in
            [(fifo.as_path(), "a FIFO"), (Path::new("/dev/zero"), "character device"), (dir.path(), "directory")]
        {
            let e = read_capped(p, "kernel", 1 << 20, "test").unwrap_err();
            assert!(e.is_config() && e.to_string().contains(want), "{e}");
        }
        let e = lock_swap(Path::new("/dev/null"), true).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
    }

    #[test]
    fn the_size_cap_holds() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, vec![7u8; 5000]).unwrap();
        assert_eq!(read_capped(&f, "kernel", 5000, "test").unwrap().len(), 5000);
        let e = read_capped(&f, "kernel", 4999, "--memory").unwrap_err();
        assert!(e.to_string().contains("5000 bytes, more than 4999 (--memory)"), "{e}");
    }

    #[test]
    fn swap_files_are_not_clobbered_and_are_locked() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("swap");
        std::fs::write(&s, b"precious text").unwrap();
        let e = lock_swap(&s, false).unwrap_err();
        assert!(e.to_string().contains("--swap-reuse"), "{e}");
        assert_eq!(std::fs::read(&s).unwrap(), b"precious text");
        let held = lock_swap(&s, true).unwrap();
        let e = lock_swap(&s, true).unwrap_err();
        assert!(e.to_string().contains("lock"), "{e}");
        drop(held);
        lock_swap(&s, true).unwrap();
        // A new path is created.
        lock_swap(&dir.path().join("new"), false).unwrap();
    }

    #[test]
    fn stats_file_is_checked_at_start_and_removed_if_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let f = "--stats-json";
        assert!(OutFile::create(&dir.path().join("no/such/dir/s.json"), f).unwrap_err().is_config());
        assert!(OutFile::create(dir.path(), f).unwrap_err().is_config());
        let p = dir.path().join("s.json");
        drop(OutFile::create(&p, f).unwrap());
        assert!(!p.exists());
        let mut f = OutFile::create(&p, f).unwrap();
        f.write("{}\n").unwrap();
        drop(f);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{}\n");
    }
}
