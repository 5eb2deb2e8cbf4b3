//! Exit handling without KVM: an [`Exit`] in (a mirror of the `VcpuExit`
//! variants vkvm handles, plus the ways `KVM_RUN` itself fails), its effect
//! on guest memory and the devices, and the vCPU's [`Next`] step out. The
//! vCPU loop (`vcpu.rs`) does what needs the vCPU itself (inject #PF, read
//! registers, clone); everything else happens here, so it is unit-tested
//! with fake exits, as Firecracker tests `handle_kvm_exit`.

use crate::devices::{Bus, PioOut};
use crate::exit::Reason;
use crate::memory::{Access, GuestFault, GuestRam, Unresolved};
use crate::pmap::Delivery;
use crate::stats::Stats;
use kvm_ioctls::VcpuExit;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// One return from `KVM_RUN`.
#[derive(Debug)]
pub enum Exit<'a> {
    IoIn(u16, &'a mut [u8]),
    IoOut(u16, &'a [u8]),
    MmioRead(u64, &'a mut [u8]),
    MmioWrite(u64, &'a [u8]),
    /// KVM could not map `[gpa, gpa + size)` (it does not say how it was accessed).
    MemoryFault {
        gpa: u64,
        size: u64,
    },
    Hlt,
    /// A triple fault.
    Shutdown,
    FailEntry {
        reason: u64,
        cpu: u32,
    },
    /// The details are in `kvm_run`, which the vCPU reads.
    InternalError,
    SystemEvent(u32),
    /// An exit vkvm does not handle, as KVM's binding prints it.
    Other(String),
    /// `KVM_RUN` returned EINTR (a kick) or EAGAIN (an AP left wait-for-SIPI).
    Interrupted,
    /// `KVM_RUN` failed with this errno.
    Failed(i32),
}

impl<'a> Exit<'a> {
    /// What `VcpuFd::run` returned.
    pub fn of(r: Result<VcpuExit<'a>, kvm_ioctls::Error>) -> Exit<'a> {
        use VcpuExit as E;
        match r {
            Ok(E::IoIn(port, data)) => Exit::IoIn(port, data),
            Ok(E::IoOut(port, data)) => Exit::IoOut(port, data),
            Ok(E::MmioRead(gpa, data)) => Exit::MmioRead(gpa, data),
            Ok(E::MmioWrite(gpa, data)) => Exit::MmioWrite(gpa, data),
            Ok(E::MemoryFault { gpa, size, .. }) => Exit::MemoryFault { gpa, size },
            Ok(E::Hlt) => Exit::Hlt,
            Ok(E::Shutdown) => Exit::Shutdown,
            Ok(E::FailEntry(reason, cpu)) => Exit::FailEntry { reason, cpu },
            Ok(E::InternalError) => Exit::InternalError,
            Ok(E::SystemEvent(kind, _)) => Exit::SystemEvent(kind),
            Ok(other) => Exit::Other(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Interrupted,
            Err(e) => Exit::Failed(e.errno()),
        }
    }

    /// The reason it is counted and profiled under.
    pub fn reason(&self) -> Reason {
        match self {
            Exit::IoIn(..) => Reason::IoIn,
            Exit::IoOut(..) => Reason::IoOut,
            // A memory fault has no reason of its own (KVM_RUN returned -1).
            Exit::MmioRead(..) => Reason::MmioRead,
            Exit::MmioWrite(..) => Reason::MmioWrite,
            Exit::Hlt => Reason::Hlt,
            Exit::Shutdown => Reason::Shutdown,
            Exit::FailEntry { .. } => Reason::FailEntry,
            Exit::InternalError => Reason::InternalError,
            Exit::SystemEvent(_) => Reason::SystemEvent,
            Exit::Interrupted => Reason::Interrupted,
            Exit::MemoryFault { .. } | Exit::Other(_) | Exit::Failed(_) => Reason::Other,
        }
    }
}

/// Why a vCPU stops the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The guest exited with this status (any u64).
    Exit(u64),
    /// KVM_EXIT_SHUTDOWN.
    TripleFault,
    /// KVM_EXIT_INTERNAL_ERROR (its details are in `kvm_run`).
    KvmInternal,
    Crash(String),
}

/// What the vCPU does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Re-enter the guest.
    Continue,
    /// Kicked out of the guest: look for a refused access to inject, a
    /// pause or a stop, then re-enter.
    Interrupted,
    /// Stop running this vCPU (PARK, HLT).
    Park,
    Stop(Stop),
    /// Raise #PF for a refused access.
    Inject(GuestFault),
    /// Clone the VM from this vCPU's state (the hypercall block's address).
    Clone {
        block: u64,
    },
}

/// One vCPU's exit handler: what an exit may touch.
pub struct ExitHandler {
    id: u32,
    ram: Arc<GuestRam>,
    bus: Arc<Bus>,
    stats: Arc<Stats>,
    /// The gpa of the previous exit if it was KVM_EXIT_MEMORY_FAULT.
    last_memory_fault: Option<u64>,
}

impl ExitHandler {
    pub fn new(id: u32, ram: Arc<GuestRam>, bus: Arc<Bus>, stats: Arc<Stats>) -> Self {
        ExitHandler { id, ram, bus, stats, last_memory_fault: None }
    }

    /// Handle one exit: its reason (for the profile) and the next step.
    pub fn handle(&mut self, exit: Exit<'_>) -> (Reason, Next) {
        let reason = exit.reason();
        if !matches!(exit, Exit::Failed(_)) {
            self.stats.exits.count(reason);
        }
        let mf = match exit {
            Exit::MemoryFault { gpa, .. } => Some(gpa),
            _ => None,
        };
        let again = mf.is_some() && mf == self.last_memory_fault;
        self.last_memory_fault = mf;
        (reason, self.next(exit, again))
    }

    fn next(&self, exit: Exit<'_>, memory_fault_again: bool) -> Next {
        let id = self.id;
        let crash = |msg: String| Next::Stop(Stop::Crash(msg));
        match exit {
            Exit::IoOut(port, data) => self.pio_out(port, data),
            Exit::IoIn(port, data) => {
                self.bus.read(port, data);
                Next::Continue
            }
            Exit::MmioRead(gpa, data) if self.ram.contains(gpa, data.len()) => self.memory_read(gpa, data),
            Exit::MmioWrite(gpa, data) if self.ram.contains(gpa, data.len()) => self.memory_write(gpa, data),
            Exit::MmioRead(gpa, data) => {
                self.bus.mmio_read(id, gpa, data);
                Next::Continue
            }
            Exit::MmioWrite(gpa, data) => {
                self.bus.mmio_write(id, gpa, data);
                Next::Continue
            }
            Exit::MemoryFault { gpa, size } => self.memory_fault(gpa, size.max(1), memory_fault_again),
            Exit::Hlt => Next::Park,
            Exit::Shutdown => Next::Stop(Stop::TripleFault),
            Exit::InternalError => Next::Stop(Stop::KvmInternal),
            Exit::FailEntry { reason, cpu } => crash(format!(
                "KVM could not enter the guest on vcpu {id}: hardware entry failure reason {reason:#x} (host cpu {cpu})"
            )),
            Exit::SystemEvent(kind) => crash(format!("guest system event {kind} on vcpu {id}")),
            Exit::Other(what) => crash(format!("unexpected exit on vcpu {id}: {what}")),
            Exit::Interrupted => Next::Interrupted,
            Exit::Failed(libc::EFAULT) if self.ram.view.delivery() == Delivery::Exit => crash(format!(
                "vcpu {id} touched an absent guest page from code KVM runs natively (ring 3 on this host) and \
                 KVM_RUN returned EFAULT without the address, so exit delivery cannot resolve it; use \
                 --fault-delivery uffd (exit delivery covers emulated accesses and KVM_EXIT_MEMORY_FAULT)"
            )),
            Exit::Failed(errno) => crash(format!("KVM_RUN failed on vcpu {id}: {}", kvm_ioctls::Error::new(errno))),
        }
    }

    fn pio_out(&self, port: u16, data: &[u8]) -> Next {
        match self.bus.write(self.id, port, data) {
            PioOut::Done => Next::Continue,
            PioOut::Exit(s) => Next::Stop(Stop::Exit(s)),
            PioOut::Park => Next::Park,
            PioOut::Clone { block } => Next::Clone { block },
            PioOut::Crash(msg) => Next::Stop(Stop::Crash(msg)),
        }
    }

    /// Resolve the pages of `[gpa, gpa + len)` through the front door; the
    /// next step if that failed (an exception for the guest, or a VM stop).
    fn resolve(&self, gpa: u64, len: u64, write: bool) -> Option<Next> {
        let ram = &self.ram;
        let counted = || {
            ram.delivery.events.fetch_add(1, Ordering::Relaxed);
        };
        match ram.resolve_range(gpa, len, Access::of(write), counted) {
            Ok(()) => None,
            Err((page, Unresolved::Refused(error))) => {
                ram.delivery.guest_errors.fetch_add(1, Ordering::Relaxed);
                Some(Next::Inject(GuestFault { gpa: gpa.max(page), write, tid: 0, error }))
            }
            Err((_, Unresolved::Fatal(f))) => Some(Next::Stop(Stop::Crash(f.to_string()))),
        }
    }

    /// KVM_EXIT_MEMORY_FAULT: KVM could not map these pages. The exit says
    /// which pages but not how they were accessed (its flags carry only
    /// KVM_MEMORY_EXIT_FLAG_PRIVATE; KVM defines no read/write/exec bits),
    /// so the pages are brought in for read (a refusal is the guest's read
    /// fault), then for write where the map allows it. A refused write is
    /// reported only when the same address exits again at once: the access
    /// was then a write.
    fn memory_fault(&self, gpa: u64, len: u64, again: bool) -> Next {
        if let Some(next) = self.resolve(gpa, len, false) {
            return next;
        }
        match self.resolve(gpa, len, true) {
            Some(Next::Inject(_)) if !again => Next::Continue,
            Some(next) => next,
            None => Next::Continue,
        }
    }

    /// Exit delivery: an emulated guest read of an absent page of guest
    /// memory came back as MMIO. Resolve the page(s), then complete the
    /// access from the page through the pager (so KVM sees it done).
    fn memory_read(&self, gpa: u64, data: &mut [u8]) -> Next {
        if let Some(next) = self.resolve(gpa, data.len() as u64, false) {
            return next;
        }
        match self.ram.read(gpa, data) {
            Ok(()) => Next::Continue,
            Err(e) => Next::Stop(Stop::Crash(format!("cannot complete the guest access at {gpa:#x}: {e}"))),
        }
    }

    /// As [`Self::memory_read`], for a write.
    fn memory_write(&self, gpa: u64, data: &[u8]) -> Next {
        if let Some(next) = self.resolve(gpa, data.len() as u64, true) {
            return next;
        }
        match self.ram.write(gpa, data) {
            Ok(()) => Next::Continue,
            Err(e) => Next::Stop(Stop::Crash(format!("cannot complete the guest access at {gpa:#x}: {e}"))),
        }
    }
}
