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

/// Exits handled without KVM: a fake exit in, the effect on guest memory,
/// the devices and the counters, and the next step out.
#[cfg(test)]
mod test {
    use super::*;
    use crate::abi::{self, nr};
    use crate::config::VptSpec;
    use crate::devices::serial::Captured;
    use crate::devices::VmIds;
    use crate::stats::Reports;

    const RAM: u64 = 16 << 20;
    const WINDOW: u64 = 0xC000_0000;
    /// Where the tests put hypercall blocks and reports.
    const BLOCK: u64 = 0x10_0000;
    const REPORT: u64 = 0x10_1000;

    struct Rig {
        h: ExitHandler,
        ram: Arc<GuestRam>,
        stats: Arc<Stats>,
        tests: Arc<Reports>,
        console: Captured,
    }

    fn rig() -> Rig {
        let ram = crate::memory::test_ram(RAM, &[VptSpec { gpa: WINDOW, len: 1 << 20, levels: 4 }]);
        let (stats, tests, console) = (Arc::<Stats>::default(), Arc::<Reports>::default(), Captured::default());
        let ids = VmIds { vm_id: 0, nr_vcpus: 1, tsc_khz: 1_000_000 };
        let bus = Arc::new(Bus::new(ram.clone(), Box::new(console.clone()), tests.clone(), stats.clone(), ids));
        Rig { h: ExitHandler::new(0, ram.clone(), bus, stats.clone()), ram, stats, tests, console }
    }

    impl Rig {
        fn next(&mut self, exit: Exit<'_>) -> Next {
            self.h.handle(exit).1
        }
        fn out(&mut self, port: u16, data: &[u8]) -> Next {
            self.next(Exit::IoOut(port, data))
        }
        /// A hypercall block at `at`, then the `out` that makes the call.
        fn hypercall(&mut self, at: u64, nr: u16, args: &[u64]) -> Next {
            let mut b = Vec::new();
            b.extend_from_slice(&abi::HC_MAGIC.to_le_bytes());
            b.extend_from_slice(&abi::ABI_VERSION.to_le_bytes());
            b.extend_from_slice(&nr.to_le_bytes());
            for i in 0..6 {
                b.extend_from_slice(&args.get(i).copied().unwrap_or(0).to_le_bytes());
            }
            b.extend_from_slice(&i64::MIN.to_le_bytes());
            self.ram.write(at, &b).unwrap();
            self.out(abi::HC_PORT, &(at as u32).to_le_bytes())
        }
        fn ret(&self, at: u64) -> i64 {
            let mut r = [0u8; 8];
            self.ram.read(at + abi::HC_RET_OFFSET, &mut r).unwrap();
            i64::from_le_bytes(r)
        }
        fn counted(&self, reason: &str) -> u64 {
            self.stats.exits.snapshot().get(reason).copied().unwrap_or(0)
        }
    }

    #[test]
    fn serial_port_io_reaches_the_console_and_reads_ready() {
        let mut r = rig();
        for &c in b"hi\n" {
            assert_eq!(r.out(0x3f8, &[c]), Next::Continue);
        }
        assert_eq!(r.console.text(), "hi\n");
        let mut lsr = [0u8; 1];
        assert_eq!(r.next(Exit::IoIn(0x3fd, &mut lsr)), Next::Continue);
        assert_eq!(lsr[0] & 0x20, 0x20, "transmitter ready");
        assert_eq!((r.counted("io_out"), r.counted("io_in")), (3, 1));
    }

    #[test]
    fn debug_exit_and_the_exit_hypercall_stop_the_vm_with_the_guest_status() {
        let mut r = rig();
        assert_eq!(r.out(0xf4, &7u32.to_le_bytes()), Next::Stop(Stop::Exit(7)));
        assert_eq!(r.hypercall(BLOCK, nr::EXIT, &[300]), Next::Stop(Stop::Exit(300)));
        assert_eq!(r.ret(BLOCK), 0);
    }

    #[test]
    fn report_console_park_and_clone_hypercalls() {
        let mut r = rig();
        let mut report = vec![0u8; abi::TEST_REPORT_SIZE];
        report[..4].copy_from_slice(b"unit");
        r.ram.write(REPORT, &report).unwrap();
        assert_eq!(r.hypercall(BLOCK, nr::REPORT, &[REPORT, abi::TEST_REPORT_SIZE as u64]), Next::Continue);
        assert_eq!(r.ret(BLOCK), 0);
        let t = r.tests.snapshot();
        assert_eq!((t.len(), t[0].name.as_str(), t[0].status), (1, "unit", "pass"));
        r.ram.write(REPORT, b"to the console").unwrap();
        assert_eq!(r.hypercall(BLOCK, nr::CONSOLE_WRITE, &[REPORT, 14]), Next::Continue);
        assert_eq!((r.ret(BLOCK), r.console.text()), (14, "to the console".to_string()));
        assert_eq!(r.hypercall(BLOCK, nr::PARK, &[]), Next::Park);
        // CLONE is the vCPU's to do; the block's address comes with it.
        assert_eq!(r.hypercall(BLOCK + 64, nr::CLONE, &[]), Next::Clone { block: BLOCK + 64 });
        assert_eq!(r.hypercall(BLOCK, 0x7777, &[]), Next::Continue);
        assert_eq!(r.ret(BLOCK), -abi::ENOSYS);
        assert_eq!(r.stats.bad_hypercalls.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_bad_hypercall_block_gets_no_answer_and_is_counted() {
        let mut r = rig();
        // Misaligned, and outside RAM: nothing is written, the VM runs on.
        r.ram.write(BLOCK, &[0x5a; 72]).unwrap();
        assert_eq!(r.out(abi::HC_PORT, &((BLOCK + 4) as u32).to_le_bytes()), Next::Continue);
        assert_eq!(r.out(abi::HC_PORT, &(RAM as u32 - 8).to_le_bytes()), Next::Continue);
        let mut b = [0u8; 72];
        r.ram.read(BLOCK, &mut b).unwrap();
        assert_eq!(b, [0x5a; 72]);
        assert_eq!(r.stats.bad_hypercalls.load(Ordering::Relaxed), 2);
        // A good block, then the same with a bad magic: EINVAL in ret.
        assert_eq!(r.hypercall(BLOCK, nr::VERSION, &[]), Next::Continue);
        assert_eq!(r.ret(BLOCK), 1);
        r.ram.write(BLOCK, &0u32.to_le_bytes()).unwrap();
        assert_eq!(r.out(abi::HC_PORT, &(BLOCK as u32).to_le_bytes()), Next::Continue);
        assert_eq!(r.ret(BLOCK), -abi::EINVAL);
    }

    #[test]
    fn unclaimed_ports_and_unbacked_addresses_read_all_ones_and_run_on() {
        let mut r = rig();
        assert_eq!(r.out(0x1234, &[1]), Next::Continue);
        let mut d = [0u8; 2];
        assert_eq!(r.next(Exit::IoIn(0x1234, &mut d)), Next::Continue);
        assert_eq!(d, [0xff, 0xff]);
        assert_eq!(r.stats.exits.unhandled_pio.load(Ordering::Relaxed), 2);
        let mut m = [0u8; 4];
        assert_eq!(r.next(Exit::MmioRead(0xE000_0000, &mut m)), Next::Continue);
        assert_eq!(m, [0xff; 4]);
        assert_eq!(r.next(Exit::MmioWrite(0xE000_0000, &[1, 2, 3, 4])), Next::Continue);
        // Nothing was brought in for them.
        assert_eq!(r.ram.delivery.events.load(Ordering::Relaxed), 0);
        assert_eq!((r.counted("mmio_read"), r.counted("mmio_write")), (1, 1));
    }

    #[test]
    fn an_emulated_access_to_absent_ram_is_resolved_and_completed() {
        let mut r = rig();
        let gpa = 0x20_0ffc;
        // Across a page boundary: both pages are brought in.
        assert_eq!(r.next(Exit::MmioWrite(gpa, &[1, 2, 3, 4, 5, 6, 7, 8])), Next::Continue);
        assert_eq!(r.ram.delivery.events.load(Ordering::Relaxed), 2);
        let mut back = [0u8; 8];
        assert_eq!(r.next(Exit::MmioRead(gpa, &mut back)), Next::Continue);
        assert_eq!(back, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(r.ram.view.present(0x20_0000) && r.ram.view.present(0x20_1000));
    }

    #[test]
    fn a_memory_fault_is_resolved_or_refused_as_the_map_says() {
        let mut r = rig();
        assert_eq!(r.next(Exit::MemoryFault { gpa: 0x30_0000, size: 4096 }), Next::Continue);
        assert!(r.ram.view.present(0x30_0000));
        // A window without a master vpte: the guest's read fault.
        let n = r.next(Exit::MemoryFault { gpa: WINDOW + 0x2000, size: 8 });
        let Next::Inject(f) = n else { panic!("{n:?}") };
        assert_eq!((f.gpa, f.write), (WINDOW + 0x2000, false));
        assert_eq!(r.ram.delivery.guest_errors.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn halts_crashes_and_run_failures_give_typed_stops() {
        let mut r = rig();
        assert_eq!(r.next(Exit::Hlt), Next::Park);
        assert_eq!(r.next(Exit::Shutdown), Next::Stop(Stop::TripleFault));
        assert_eq!(r.next(Exit::InternalError), Next::Stop(Stop::KvmInternal));
        assert_eq!(r.next(Exit::Interrupted), Next::Interrupted);
        let crash = |n: Next| match n {
            Next::Stop(Stop::Crash(m)) => m,
            n => panic!("{n:?}"),
        };
        assert!(crash(r.next(Exit::FailEntry { reason: 0x21, cpu: 3 })).contains("entry failure reason 0x21"));
        assert!(crash(r.next(Exit::SystemEvent(2))).contains("system event 2"));
        assert!(crash(r.next(Exit::Other("Debug".into()))).contains("unexpected exit on vcpu 0: Debug"));
        // Exit delivery here: EFAULT from ring 3 cannot be resolved.
        assert!(crash(r.next(Exit::Failed(libc::EFAULT))).contains("--fault-delivery uffd"));
        assert!(crash(r.next(Exit::Failed(libc::EIO))).starts_with("KVM_RUN failed on vcpu 0"));
        // A failed KVM_RUN is no exit: not counted.
        assert_eq!((r.counted("hlt"), r.counted("interrupted"), r.counted("other")), (1, 1, 1));
    }

    #[test]
    fn the_firmware_error_port_stops_only_for_the_firmware_s_own_messages() {
        let mut r = rig();
        let rom = crate::boot::firmware::ROM;
        let needle = crate::boot::firmware::ERROR_PREFIX.as_bytes();
        let at = (0..rom.len()).find(|&i| rom[i..].starts_with(needle)).unwrap();
        let addr = (crate::boot::firmware::ROM_BASE + at as u64) as u32;
        let port = crate::boot::firmware::ERROR_PORT;
        assert!(
            matches!(r.out(port, &addr.to_le_bytes()), Next::Stop(Stop::Crash(m)) if m.starts_with("vkvm-firmware"))
        );
        assert_eq!(r.out(port, &0x1234u32.to_le_bytes()), Next::Continue);
    }
}
