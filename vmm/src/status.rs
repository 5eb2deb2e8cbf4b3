//! vkvm's process exit status, and output that must not panic.
//!
//! | status | meaning |
//! |---|---|
//! | 0, 1 | the guest's own status: all tests passed, a test failed |
//! | 2 | usage or configuration error (found before the guest starts) |
//! | 3 | vkvm or host failure, or a guest crash vkvm saw (triple fault, timeout, ...) |
//! | 4 | the guest exited with a status vkvm does not pass through (2, 3, 4 or above 125): see `guest_exit_status` in `--stats-json` |
//! | 5-125 | the guest's own status, passed through |
//! | 128 + N | stopped by signal N (130 SIGINT, 143 SIGTERM) after a clean stop |

use crate::error::Error;
use std::io::Write;

pub const USAGE: u8 = 2;
pub const CRASH: u8 = 3;
/// The guest's status would collide with one of vkvm's own.
pub const GUEST_OTHER: u8 = 4;
/// Highest guest status passed through: 126 and up mean "not executable",
/// "not found" and "killed by a signal" to a shell.
const PASS_MAX: u64 = 125;

/// The process status for a guest that exited with `raw` (any u64 the
/// guest gave to EXIT or to a debug-exit port).
pub fn of_guest(raw: u64) -> u8 {
    match raw {
        0 | 1 => raw as u8,
        5..=PASS_MAX => raw as u8,
        _ => GUEST_OTHER,
    }
}

/// The shell's convention for a process stopped by signal `sig`.
pub fn of_signal(sig: i32) -> u8 {
    (128 + sig.clamp(1, 127)) as u8
}

/// Write `text` to stdout and flush; a closed or full stdout is an error
/// (status 3), never a panic.
pub fn print(text: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(Error::io("cannot write to standard output"))
}

/// One line on stderr, ignoring a closed or full stderr.
pub fn eprint_line(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn guest_statuses_never_look_like_vkvm_s_own() {
        assert_eq!(of_guest(0), 0);
        assert_eq!(of_guest(1), 1);
        for raw in [2, 3, 4, 126, 130, 143, 255, 256, 1000, u64::MAX] {
            assert_eq!(of_guest(raw), GUEST_OTHER, "{raw}");
        }
        assert_eq!(of_guest(41), 41);
        assert_eq!(of_guest(125), 125);
        assert_eq!(of_signal(libc::SIGINT), 130);
        assert_eq!(of_signal(libc::SIGTERM), 143);
    }
}
