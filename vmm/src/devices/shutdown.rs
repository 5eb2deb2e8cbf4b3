//! Ways a guest stops the VM without a hypercall: QEMU's isa-debug-exit port
//! (kvm-unit-tests, our guest under QEMU) and the Bochs/old-QEMU "Shutdown"
//! port 0x8900, which kvm-unit-tests uses as its fallback.

use std::sync::atomic::{AtomicUsize, Ordering};

pub const DEBUG_EXIT_PORT: u16 = 0xf4;
pub const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;
const SHUTDOWN: &[u8] = b"Shutdown";

/// Matches "Shutdown" written one byte at a time.
#[derive(Default)]
pub struct BochsShutdown {
    matched: AtomicUsize,
}

impl BochsShutdown {
    /// Feed one byte; true once the whole word has been written.
    pub fn write(&self, b: u8) -> bool {
        let m = self.matched.load(Ordering::Relaxed);
        let next = if SHUTDOWN.get(m) == Some(&b) {
            m + 1
        } else if b == SHUTDOWN[0] {
            1
        } else {
            0
        };
        if next == SHUTDOWN.len() {
            self.matched.store(0, Ordering::Relaxed);
            return true;
        }
        self.matched.store(next, Ordering::Relaxed);
        false
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn shutdown_needs_the_whole_word() {
        let s = BochsShutdown::default();
        assert!(!b"ShutXShutdow".iter().any(|&b| s.write(b)));
        assert!(s.write(b'n'));
        assert!(!s.write(b'S'));
    }
}
