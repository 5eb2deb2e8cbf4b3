//! Exit reasons and their counters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Reason {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    Shutdown,
    FailEntry,
    InternalError,
    SystemEvent,
    Interrupted,
    Other,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Reason::IoIn,
        Reason::IoOut,
        Reason::MmioRead,
        Reason::MmioWrite,
        Reason::Hlt,
        Reason::Shutdown,
        Reason::FailEntry,
        Reason::InternalError,
        Reason::SystemEvent,
        Reason::Interrupted,
        Reason::Other,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Reason::IoIn => "io_in",
            Reason::IoOut => "io_out",
            Reason::MmioRead => "mmio_read",
            Reason::MmioWrite => "mmio_write",
            Reason::Hlt => "hlt",
            Reason::Shutdown => "shutdown",
            Reason::FailEntry => "fail_entry",
            Reason::InternalError => "internal_error",
            Reason::SystemEvent => "system_event",
            Reason::Interrupted => "interrupted",
            Reason::Other => "other",
        }
    }
}

#[derive(Default)]
pub struct ExitCounts {
    counts: [AtomicU64; Reason::ALL.len()],
    /// Port accesses no device claims (reads return all ones).
    pub unhandled_pio: AtomicU64,
}

impl ExitCounts {
    pub fn count(&self, r: Reason) {
        self.counts[r as usize].fetch_add(1, Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        Reason::ALL
            .iter()
            .map(|&r| (r.name(), self.counts[r as usize].load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}
