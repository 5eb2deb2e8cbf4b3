//! SIGINT and SIGTERM. [`install`] blocks both before vkvm starts any
//! thread (threads inherit the mask), and one thread takes them with
//! `sigwait`: no handler runs in a vCPU or fault thread and no system call
//! elsewhere fails with EINTR because of them. The first signal is recorded
//! ([`pending`]) and wakes the monitor through an eventfd; the run then stops
//! cleanly (vCPUs stopped, shared file maps written back, `--stats-json`
//! written with `"interrupted": true`) and vkvm exits with 128 + N. A
//! second signal ends the process at once. std keeps the mask across
//! `exec`, so `child::run` unblocks both in the children of torture and bench.

use crate::error::Error;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal;

static PENDING: AtomicI32 = AtomicI32::new(0);
static WAKE: OnceLock<EventFd> = OnceLock::new();
const SIGNALS: [i32; 2] = [libc::SIGINT, libc::SIGTERM];

/// Take SIGINT and SIGTERM from now on. Call before any other thread starts.
pub fn install() -> Result<(), Error> {
    let fail = |what: &str, e: &dyn std::fmt::Display| Error::Crash(format!("cannot {what} SIGINT/SIGTERM: {e}"));
    for sig in SIGNALS {
        match signal::block_signal(sig) {
            Ok(()) | Err(signal::Error::SignalAlreadyBlocked(_)) => {}
            Err(e) => return Err(fail("block", &e)),
        }
    }
    let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| fail("watch", &e))?;
    let _ = WAKE.set(wake);
    let set = signal::create_sigset(&SIGNALS).map_err(|e| fail("watch", &e))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: waits for a signal of `set` (blocked in every thread).
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            if PENDING.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst).is_err() {
                crate::status::eprint_line(&format!("vkvm: second {}: exiting without a clean stop", name(sig)));
                std::process::exit(crate::status::of_signal(sig).into());
            }
            if let Some(w) = WAKE.get() {
                let _ = w.write(1);
            }
        })
        .map_err(|e| fail("watch", &e))?;
    Ok(())
}

/// The first SIGINT or SIGTERM received, if any.
pub fn pending() -> Option<i32> {
    match PENDING.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Readable once a signal has arrived (for the monitor's epoll).
pub fn wake_fd() -> Option<&'static EventFd> {
    WAKE.get()
}

pub use crate::error::signal_name as name;
