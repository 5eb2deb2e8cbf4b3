//! One VM: KVM set-up, guest memory, boot, vCPU threads, and the monitor
//! loop (event-manager) that waits for the guest to exit or time out.

use crate::boot;
use crate::cli::RunArgs;
use crate::devices::{Pc, Serial};
use crate::error::Error;
use crate::guest_image;
use crate::stats::{Stats, TestResult};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use log::{info, warn};
use serde_json::json;
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

/// RAM stays below the 32-bit MMIO hole.
pub const MAX_MEMORY: u64 = 3 << 30;

/// How a VM ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    Exit(u8),
    Crash(String),
}

/// State the vCPU threads and the monitor share.
pub struct Shared {
    pub mem: GuestMemoryMmap,
    pub serial: Serial,
    /// fw_cfg, PCI configuration ports, debug-exit and shutdown ports.
    pub pc: Pc,
    pub stats: Stats,
    pub tests: Mutex<Vec<TestResult>>,
    pub nr_vcpus: u32,
    pub tsc_khz: u32,
    parked: AtomicU32,
    outcome: Mutex<Option<Outcome>>,
    exit_evt: EventFd,
}

impl Shared {
    /// The first outcome wins; the monitor is woken to stop the VM.
    pub fn finish(&self, o: Outcome) {
        let mut g = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(o);
        }
        drop(g);
        // Wake-up only: the outcome is already recorded.
        let _ = self.exit_evt.write(1);
    }
    pub fn finished(&self) -> bool {
        self.outcome.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
    /// A vCPU that stopped running (parked, or halted).
    pub fn park(&self) {
        if self.parked.fetch_add(1, Ordering::SeqCst) + 1 == self.nr_vcpus {
            self.finish(Outcome::Crash("every vCPU parked or halted and none asked to exit".into()));
        }
    }
}

/// Open the KVM device with advice on the usual failures.
pub fn open_kvm(path: &Path) -> Result<Kvm, Error> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Kvm(format!("{} is not a valid path", path.display())))?;
    let kvm = Kvm::new_with_path(&c).map_err(|e| Error::Kvm(open_error(path, e.errno())))?;
    match kvm.get_api_version() {
        12 => Ok(kvm),
        v => Err(Error::Kvm(format!(
            "{} is not a KVM device (KVM_GET_API_VERSION answered {v}, expected 12)",
            path.display()
        ))),
    }
}

/// Advice for the usual reasons opening the KVM device fails.
fn open_error(path: &Path, errno: i32) -> String {
    let p = path.display();
    match errno {
        libc::ENOENT => {
            format!("{p} does not exist: load KVM (modprobe kvm_intel or kvm_amd) on a host with virtualization enabled")
        }
        libc::EACCES | libc::EPERM => format!(
            "permission denied on {p}: add yourself to the kvm group (usermod -aG kvm $USER, then log in again) or run as root"
        ),
        e => format!("{p}: {}", std::io::Error::from_raw_os_error(e)),
    }
}

pub fn run(args: &RunArgs) -> Result<u8, Error> {
    args.validate(u32::MAX)?;
    let (image, what) = match &args.guest {
        Some(p) => (
            std::fs::read(p).map_err(|e| Error::Config(format!("cannot read guest {}: {e}", p.display())))?,
            p.display().to_string(),
        ),
        // `--boot multiboot` without a kernel: the bundled guest's ELF32.
        None if args.boot == boot::BootMode::Multiboot => {
            (guest_image::BUNDLED32.to_vec(), "the bundled guest (ELF32)".to_string())
        }
        None => (guest_image::BUNDLED.to_vec(), "the bundled guest".to_string()),
    };
    let plan = boot::prepare(&image, &what, args.boot, args.memory, &args.module)?;
    let kvm = open_kvm(&args.kvm_device)?;
    let max_vcpus = kvm.get_max_vcpus() as u32;
    args.validate(max_vcpus)?;
    let started = Instant::now();

    let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), args.memory as usize)])
        .map_err(|e| Error::Crash(format!("cannot allocate {} MiB of guest memory: {e}", args.memory >> 20)))?;
    register_memory(&vm, &mem)?;
    create_irqchip(&vm)?;
    let entry = boot::load(&plan, &mem, &image, &what, &args.cmdline, args.memory)?;

    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::new();
    for id in 0..args.vcpus {
        let vcpu = vm.create_vcpu(id as u64).map_err(Error::kvm(format!("KVM_CREATE_VCPU {id}")))?;
        let mut c = cpuid.clone();
        for e in c.as_mut_slice() {
            match e.function {
                1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24),
                0xb | 0x1f => e.edx = id,
                _ => {}
            }
        }
        vcpu.set_cpuid2(&c).map_err(Error::kvm("KVM_SET_CPUID2"))?;
        boot::setup_vcpu(&vcpu, id, &entry)?;
        vcpus.push(vcpu);
    }
    let tsc_khz = vcpus[0].get_tsc_khz().unwrap_or(0);

    let shared = Arc::new(Shared {
        mem,
        serial: Serial::new(Box::new(std::io::stdout())),
        pc: Pc::new(args.vcpus, args.memory),
        stats: Stats::default(),
        tests: Mutex::new(Vec::new()),
        nr_vcpus: args.vcpus,
        tsc_khz,
        parked: AtomicU32::new(0),
        outcome: Mutex::new(None),
        exit_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(Error::io("eventfd"))?,
    });
    info!(
        "booting {what} by {}: {} MiB, {} vcpu(s), entry {:#x}",
        entry.protocol(),
        args.memory >> 20,
        args.vcpus,
        entry.address()
    );
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let s = shared.clone();
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || crate::vcpu::run(s, vcpu, id as u32))
            .map_err(Error::io("cannot start a vCPU thread"))?;
    }

    let outcome = monitor(&shared, args.timeout)?;
    let elapsed = started.elapsed();
    let status = match &outcome {
        Outcome::Exit(s) => *s,
        Outcome::Crash(_) => crate::abi::STATUS_CRASH as u8,
    };
    info!("guest finished in {:.3} s with status {status}", elapsed.as_secs_f64());
    if let Some(p) = &args.stats_json {
        write_stats(p, &shared, status, &outcome, elapsed, &vm)?;
    }
    // vCPU threads still inside KVM_RUN go away with the process.
    match outcome {
        Outcome::Exit(s) => Ok(s),
        Outcome::Crash(msg) => Err(Error::Crash(msg)),
    }
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), Error> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region stays mapped for as long as the VM exists (the
        // GuestMemoryMmap lives in `Shared`, which outlives every vCPU).
        unsafe { vm.set_user_memory_region(r) }.map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// KVM's in-kernel PC interrupt controllers (LAPIC per vCPU, IOAPIC, PIC)
/// and PIT, before any vCPU exists: the LAPIC is what lets a kernel start
/// its APs by INIT/SIPI. Without a PIT nothing is lost but a timer a
/// kernel might calibrate against, so its failure only warns.
fn create_irqchip(vm: &VmFd) -> Result<(), Error> {
    vm.create_irq_chip().map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_bindings::kvm_pit_config::default();
    if let Err(e) = vm.create_pit2(pit) {
        warn!("no in-kernel PIT (KVM_CREATE_PIT2: {e}); continuing without one");
    }
    Ok(())
}

/// Waits for the guest's exit event or the timeout.
struct Monitor {
    shared: Arc<Shared>,
    timer: Option<TimerFd>,
    timed_out: bool,
}

impl MutEventSubscriber for Monitor {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if self.timer.as_ref().is_some_and(|t| t.as_raw_fd() == events.fd()) {
            self.timed_out = true;
        } else {
            // Reading only resets the eventfd; the outcome is in `shared`.
            let _ = self.shared.exit_evt.read();
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.shared.exit_evt, EventSet::IN)) {
            warn!("cannot watch the exit event: {e}");
        }
        if let Some(t) = &self.timer {
            if let Err(e) = ops.add(Events::new(t, EventSet::IN)) {
                warn!("cannot watch the timeout: {e}");
            }
        }
    }
}

fn monitor(shared: &Arc<Shared>, timeout: Option<f64>) -> Result<Outcome, Error> {
    let timer = match timeout {
        Some(secs) => {
            let timer_err = |e| Error::Crash(format!("cannot arm the --timeout timer: {e}"));
            let mut t = TimerFd::new().map_err(timer_err)?;
            t.reset(Duration::from_secs_f64(secs), None).map_err(timer_err)?;
            Some(t)
        }
        None => None,
    };
    let mon = Arc::new(Mutex::new(Monitor { shared: shared.clone(), timer, timed_out: false }));
    let mut em =
        EventManager::<Arc<Mutex<Monitor>>>::new().map_err(|e| Error::Crash(format!("event manager: {e:?}")))?;
    em.add_subscriber(mon.clone());
    loop {
        if let Some(o) = shared.outcome.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(o);
        }
        if mon.lock().unwrap_or_else(|e| e.into_inner()).timed_out {
            let secs = timeout.unwrap_or_default();
            let o = Outcome::Crash(format!("guest did not exit within the --timeout of {secs} s; stopped it"));
            shared.finish(o.clone());
            return Ok(o);
        }
        em.run_with_timeout(1000).map_err(|e| Error::Crash(format!("event manager: {e:?}")))?;
    }
}

fn write_stats(
    path: &Path,
    shared: &Shared,
    status: u8,
    outcome: &Outcome,
    elapsed: Duration,
    _vm: &VmFd,
) -> Result<(), Error> {
    let tests = shared.tests.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut v = json!({
        "exit_status": status,
        "exits": shared.stats.exits.snapshot(),
        "tests": tests,
        "unhandled_pio": shared.stats.exits.unhandled_pio.load(Ordering::Relaxed),
        "bad_hypercalls": shared.stats.bad_hypercalls.load(Ordering::Relaxed),
        "vcpus": shared.nr_vcpus,
        "elapsed_ms": elapsed.as_secs_f64() * 1e3,
    });
    if let Outcome::Crash(msg) = outcome {
        v["crash"] = json!(msg);
    }
    let text = serde_json::to_string_pretty(&v).map_err(|e| Error::Crash(format!("stats JSON: {e}")))?;
    std::fs::write(path, text + "\n").map_err(Error::io(format!("cannot write {}", path.display())))
}

#[cfg(test)]
mod test {
    use super::open_error;
    use std::path::Path;

    #[test]
    fn kvm_open_errors_say_how_to_fix() {
        let p = Path::new("/dev/kvm");
        assert!(open_error(p, libc::ENOENT).contains("modprobe"));
        assert!(open_error(p, libc::EACCES).contains("kvm group"));
        assert!(open_error(p, libc::EIO).contains("/dev/kvm"));
    }
}
