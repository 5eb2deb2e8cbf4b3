//! The one front door for guest faults. Every way a guest page is brought
//! in goes through [`GuestRam::resolve`] (a guest touch: a userfaultfd
//! event, an exit) or [`GuestRam::fill`] (the VMM's own: fault-around, the
//! loader, `--prefault`), and only here is a failure sorted into the
//! guest's doing (refused: an exception for the guest, the VM runs on) or
//! the host's (fatal: the VM stops, with the out-of-memory advice when that
//! is why; never zeros in place of data).

use super::GuestRam;
use pager::{FaultError, FaultFlags, Prot};
use std::sync::atomic::AtomicU64;

/// How the guest touched a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    pub fn of(write: bool) -> Access {
        if write {
            Access::Write
        } else {
            Access::Read
        }
    }
    pub fn is_write(self) -> bool {
        self == Access::Write
    }
    fn prot(self) -> Prot {
        match self {
            Access::Read => Prot::READ,
            Access::Write => Prot::WRITE,
        }
    }
}

/// A guest access the map refused, to be reported to the guest as #PF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestFault {
    pub gpa: u64,
    pub write: bool,
    /// Thread that faulted (uffd), 0 when unknown.
    pub tid: u32,
    pub error: FaultError,
}

/// A page that could not be brought in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unresolved {
    /// The guest's own doing: outside every entry, a write to a read-only
    /// entry, an invalid vpte. The guest gets an exception.
    Refused(FaultError),
    /// The host failed (swap I/O, out of memory): the VM must stop.
    Fatal(Fatal),
}

/// Why the host could not bring guest page `gpa` in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fatal {
    pub gpa: u64,
    pub why: String,
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "guest page {:#x} could not be brought in: {}", self.gpa, self.why)
    }
}

impl std::fmt::Display for Unresolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unresolved::Refused(e) => write!(f, "{e}"),
            Unresolved::Fatal(fatal) => write!(f, "{fatal}"),
        }
    }
}

/// Guest faults delivered to one VM's memory (the `faults` of `--stats-json`).
#[derive(Default)]
pub struct DeliveryStats {
    /// uffd events, or pages resolved for exits.
    pub events: AtomicU64,
    /// Pages filled by fault-around.
    pub around: AtomicU64,
    /// Refused accesses reported to the guest.
    pub guest_errors: AtomicU64,
}

/// The one line for a page the host would not map.
fn host_mapping_failure(e: &std::io::Error) -> String {
    let limit = std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap_or_default();
    format!(
        "the host refused to map it ({e}); vkvm's host mappings are capped by vm.max_map_count ({}): \
         raise it (sysctl vm.max_map_count=N) for guests whose clones write scattered pages",
        limit.trim()
    )
}

impl GuestRam {
    /// Bring guest page `gpa` in for a guest touch (the pager also maps
    /// resident neighbours).
    pub fn resolve(&self, gpa: u64, access: Access) -> Result<(), Unresolved> {
        self.fault(gpa, access, FaultFlags::NONE)
    }

    /// Bring guest page `gpa` in for the VMM itself (fault-around, loader,
    /// `--prefault`): the page alone.
    pub fn fill(&self, gpa: u64, access: Access) -> Result<(), Unresolved> {
        self.fault(gpa, access, FaultFlags::NO_PREFAULT)
    }

    /// Resolve every page of `[gpa, gpa + len)` for a guest touch; `each`
    /// runs before each page. On failure: the page's address and why.
    pub fn resolve_range(
        &self,
        gpa: u64,
        len: u64,
        access: Access,
        mut each: impl FnMut(),
    ) -> Result<(), (u64, Unresolved)> {
        let mut page = gpa & !0xfff;
        while page < gpa + len {
            each();
            self.resolve(page, access).map_err(|u| (page, u))?;
            page += 0x1000;
        }
        Ok(())
    }

    fn fault(&self, gpa: u64, access: Access, flags: FaultFlags) -> Result<(), Unresolved> {
        crate::pmap::clear_map_failure();
        match pager::fault(&self.map, gpa, access.prot(), flags) {
            Ok(_) => match crate::pmap::take_map_failure(gpa) {
                // The page was resolved but the host would not map it: the
                // guest would refault on it forever.
                Some(e) => Err(Unresolved::Fatal(Fatal { gpa, why: host_mapping_failure(&e) })),
                None => Ok(()),
            },
            Err(e) => Err(self.classify(gpa, e)),
        }
    }

    /// Refused (the guest's) or fatal (the host's): the one place that decides.
    pub fn classify(&self, gpa: u64, e: FaultError) -> Unresolved {
        match e {
            // An invalid vpte is the guest's; an I/O error (a table page
            // included) is not.
            FaultError::NotMapped | FaultError::Protection | FaultError::InvalidVpte => Unresolved::Refused(e),
            FaultError::NoMemory => Unresolved::Fatal(Fatal { gpa, why: self.no_memory_reason() }),
            FaultError::Failure => Unresolved::Fatal(Fatal { gpa, why: e.to_string() }),
        }
    }

    /// Why a fault found no memory, for the one line that stops the VM.
    fn no_memory_reason(&self) -> String {
        let mib = |b: u64| b >> 20;
        match self.vm.swap() {
            Some(s) if self.vm.swap_full() => format!(
                "out of memory: the swap is full ({} MiB, shared by this VM and any clones) and all {} MiB of \
                 --phys-mem hold data that cannot be written out; raise --swap-size (or --phys-mem)",
                mib(s.slots() * 4096),
                mib(self.vm.pool().max_resident() * 4096)
            ),
            Some(_) => "out of memory: no frame could be freed (swap writes failing?)".into(),
            None => "out of memory: no frame could be freed, and there is no swap: see --phys-mem".into(),
        }
    }

    /// The VPAGETABLE window `gpa` lies in, with its region index: the one
    /// place that answers "is this address in a window?".
    pub fn window_at(&self, gpa: u64) -> Option<(usize, &crate::vpagetable::Window)> {
        self.vpt.iter().enumerate().find(|(_, w)| gpa >= w.spec.gpa && gpa - w.spec.gpa < w.spec.len)
    }

    /// Extra #PF error-code bits for a refused access at `gpa`: RSVD (bit 3)
    /// when a vpte of a window pointed beyond the backing object (the
    /// pager's protection failure; x86 raises RSVD for a frame beyond
    /// MAXPHYADDR), so the guest can tell it from an invalid or read-only
    /// vpte (P|W|U only).
    pub fn pf_error_bits(&self, f: &GuestFault) -> u32 {
        if f.error == FaultError::Protection && self.window_at(f.gpa).is_some() {
            crate::vpagetable::PF_RSVD
        } else {
            0
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::config::VptSpec;

    #[test]
    fn refusals_are_the_guest_s_and_windows_are_found_in_one_place() {
        let w = VptSpec { gpa: 0xC000_0000, len: 2 << 20, levels: 2 };
        let ram = crate::memory::test_ram(4 << 20, &[w]);
        assert_eq!(ram.resolve(0x1000, Access::Write), Ok(()));
        // No master vpte yet: the guest's invalid vpte, not the host's failure.
        assert_eq!(ram.resolve(w.gpa, Access::Read), Err(Unresolved::Refused(FaultError::InvalidVpte)));
        assert!(
            matches!(ram.classify(0, FaultError::Failure), Unresolved::Fatal(f) if f.to_string().contains("0x0 could not be brought in"))
        );
        let oom = ram.classify(0x5000, FaultError::NoMemory).to_string();
        assert!(oom.contains("out of memory") && oom.contains("--phys-mem"), "{oom}");
        assert_eq!(ram.window_at(w.gpa + w.len - 1).map(|(i, _)| i), Some(0));
        assert!(ram.window_at(w.gpa + w.len).is_none() && ram.window_at(0x1000).is_none());
        let f = |gpa, error| GuestFault { gpa, write: true, tid: 0, error };
        assert_eq!(ram.pf_error_bits(&f(w.gpa, FaultError::Protection)), crate::vpagetable::PF_RSVD);
        assert_eq!(ram.pf_error_bits(&f(w.gpa, FaultError::InvalidVpte)), 0);
        assert_eq!(ram.pf_error_bits(&f(0x1000, FaultError::Protection)), 0);
    }
}
