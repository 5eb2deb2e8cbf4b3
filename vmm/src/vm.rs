//! One VM: KVM set-up, guest memory, boot, vCPU threads, and the monitor
//! loop (event-manager) that waits for the guest to exit or time out.

use crate::boot;
use crate::cli::RunArgs;
use crate::config::FaultDelivery;
use crate::control::Control;
use crate::devices::{Bus, VmIds};
use crate::error::Error;
use crate::guest_image;
use crate::inputs::OutFile;
use crate::memory::GuestFault;
use crate::memory::{self, GuestRam, MemConfig};
pub use crate::outcome::Outcome;
use crate::pmap::Delivery;
use crate::stats::{Reports, Stats};
use crate::status;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use log::{info, warn};
use serde_json::json;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

/// State the monitor, the clones and `--stats-json` share.
pub struct Shared {
    pub ram: Arc<GuestRam>,
    /// Every port and MMIO device, the hypercall port included.
    pub bus: Arc<Bus>,
    pub stats: Arc<Stats>,
    /// Test reports of this VM and all its clones (each tagged with its VM).
    pub tests: Arc<Reports>,
    /// 0 for the VM vkvm booted, 1.. for clones.
    pub vm_id: u32,
    /// What a CLONE hypercall needs (None in a clone).
    pub clones: Option<Arc<crate::clone::CloneCtx>>,
    pub nr_vcpus: u32,
    /// Exit-latency histograms, when profiling is on.
    pub profile: Option<Arc<crate::profile::Profile>>,
    /// The firmware ROM's memory (`--boot firmware`), kept for KVM's sake.
    _rom: Option<vm_memory::GuestMemoryMmap>,
    /// Run states, pause and resume, the outcome.
    pub ctl: Arc<Control>,
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ram: Arc<GuestRam>,
        nr_vcpus: u32,
        tsc_khz: u32,
        console: Box<dyn std::io::Write + Send>,
        tests: Arc<Reports>,
        vm_id: u32,
        clones: Option<Arc<crate::clone::CloneCtx>>,
        profile: Option<crate::profile::Profile>,
        rom: Option<vm_memory::GuestMemoryMmap>,
    ) -> Result<Shared, Error> {
        let stats = Arc::new(Stats::default());
        let ids = VmIds { vm_id, nr_vcpus, tsc_khz };
        let bus = Arc::new(Bus::new(ram.clone(), console, tests.clone(), stats.clone(), ids));
        Ok(Shared {
            ram,
            bus,
            stats,
            tests,
            vm_id,
            clones,
            nr_vcpus,
            profile: profile.map(Arc::new),
            _rom: rom,
            ctl: Arc::new(Control::new(nr_vcpus).map_err(Error::io("eventfd"))?),
        })
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.ctl.outcome()
    }
    pub fn finish(&self, o: Outcome) {
        self.ctl.finish(o)
    }
    pub fn set_on_finish(&self, f: Box<dyn Fn() + Send + Sync>) {
        self.ctl.set_on_finish(f)
    }
    pub fn finished(&self) -> bool {
        self.ctl.finished()
    }
}

/// What the userfaultfd handler cannot settle goes to the VM.
struct FaultReport {
    ctl: Arc<Control>,
    profile: Option<Arc<crate::profile::Profile>>,
}

impl crate::fault::Report for FaultReport {
    fn refused(&self, f: GuestFault) -> bool {
        self.ctl.refuse(f)
    }
    fn fatal(&self, msg: String) {
        self.ctl.finish(Outcome::Crash(msg));
    }
    fn timing(&self) -> bool {
        self.profile.is_some()
    }
    fn stages(&self, t: &crate::fault::FaultStages) {
        if let Some(p) = &self.profile {
            p.record_stages(t);
        }
    }
}

/// A VM that has stopped: how, and what it recorded.
pub struct Finished {
    pub outcome: Outcome,
    pub shared: Arc<Shared>,
    pub elapsed: Duration,
}

impl Finished {
    /// The process exit status (see `status.rs`).
    pub fn status(&self) -> u8 {
        self.outcome.status()
    }
    /// The process result: the guest's status, or the crash as an error.
    /// A guest status that is not passed through is said on stderr.
    pub fn into_result(self) -> Result<u8, Error> {
        let st = self.status();
        match self.outcome {
            Outcome::Exit(s) if u64::from(st) != s => {
                status::eprint_line(&format!(
                    "vkvm: the guest exited with status {s}; vkvm exits with {st} (guest_exit_status in --stats-json has it)"
                ));
                Ok(st)
            }
            Outcome::Exit(_) => Ok(st),
            Outcome::Interrupted(sig) => {
                status::eprint_line(&format!("vkvm: stopped by {}", crate::signals::name(sig)));
                Ok(st)
            }
            o => Err(Error::Crash(o.crash_message().unwrap_or_default())),
        }
    }
}

/// `vkvm run`: boot, wait, write `--stats-json`, return the guest's status.
pub fn run(args: &RunArgs, started: Instant) -> Result<u8, Error> {
    execute(args, false, started)?.into_result()
}

/// The run's clock: `--timeout` counts from vkvm's start, so set-up (reading
/// the kernel, `--prefault`, ...) is inside it.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    start: Instant,
    secs: Option<f64>,
}

impl Deadline {
    /// `secs` was checked by `config::parse_timeout` (finite, capped).
    pub fn new(start: Instant, secs: Option<f64>) -> Deadline {
        Deadline { start, secs: secs.map(|s| s.clamp(0.0, crate::config::MAX_TIMEOUT)) }
    }
    pub fn secs(&self) -> f64 {
        self.secs.unwrap_or_default()
    }
    /// Time left, or None without a timeout.
    pub fn remaining(&self) -> Option<Duration> {
        self.secs.map(|s| Duration::from_secs_f64(s).saturating_sub(self.start.elapsed()))
    }
    pub fn passed(&self) -> bool {
        self.remaining() == Some(Duration::ZERO)
    }
    /// Between set-up steps and in long ones: a signal or the timeout stops
    /// the run here (128 + N, or status 3).
    pub fn check(&self, step: &str) -> Result<(), Error> {
        if let Some(sig) = crate::signals::pending() {
            return Err(Error::Interrupted(sig));
        }
        if self.passed() {
            return Err(Error::Crash(format!("the --timeout of {} s ran out during set-up ({step})", self.secs())));
        }
        Ok(())
    }
}

/// Boot a VM and wait until it stops (or times out, or a signal stops it).
pub fn execute(args: &RunArgs, profiling: bool, started: Instant) -> Result<Finished, Error> {
    let deadline = Deadline::new(started, args.timeout);
    args.validate(if args.vcpus == 0 { crate::kvm::host_max_vcpus(&args.kvm_device) } else { None })?;
    let mut stats_file = args.stats_json.as_deref().map(|p| OutFile::create(p, "--stats-json")).transpose()?;
    let multiboot_bundled = args.guest.is_none() && args.boot == boot::BootMode::Multiboot;
    let (image, what, path_word) = match &args.guest {
        Some(p) => {
            let cap = args.memory;
            let image = crate::inputs::read_capped(p, "guest", cap, "--memory: a kernel file must fit in guest RAM")?;
            (image, p.display().to_string(), p.display().to_string())
        }
        // `--boot multiboot` without a kernel: the bundled guest's ELF32.
        None if multiboot_bundled => {
            (guest_image::BUNDLED32.to_vec(), "the bundled guest (ELF32)".to_string(), "vkvm-guest32.elf".to_string())
        }
        None => (guest_image::BUNDLED.to_vec(), "the bundled guest".to_string(), "vkvm-guest.elf".to_string()),
    };
    let plan = boot::prepare(&image, &what, args.boot, args.memory, &args.module)?;
    deadline.check("reading the kernel")?;
    let kvm = crate::kvm::open(&args.kvm_device)?;
    crate::kvm::install_kick()?;
    let max_vcpus = kvm.get_max_vcpus() as u32;
    args.validate(Some(max_vcpus))?;
    let vm_started = Instant::now();

    let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
    let delivery = match args.fault_delivery {
        FaultDelivery::Uffd => Delivery::Uffd,
        FaultDelivery::Exit => Delivery::Exit,
        FaultDelivery::Auto => {
            let d = memory::pick_delivery();
            info!("fault delivery: {d:?}");
            d
        }
    };
    let ram = Arc::new(GuestRam::new(&MemConfig {
        size: args.memory,
        files: args.map_files.clone(),
        delivery,
        phys_mem: args.phys_mem,
        swap: args.swap.clone(),
        swap_reuse: args.swap_reuse,
        swap_size: args.swap_size,
        swap_fault: args.inject_swap_fault,
        vpt: args.vpt_regions.clone(),
        default_vpt: args.guest.is_none(),
        clones: args.clones,
    })?);
    deadline.check("guest memory")?;
    crate::kvm::register_memory(&vm, &ram)?;
    crate::kvm::create_irqchip(&vm)?;
    let cmdline = boot::guest_cmdline(&plan, &path_word, &args.cmdline, &ram.guest_cmdline())?;
    let entry = boot::load(&plan, &ram, &image, &what, &cmdline)?;
    deadline.check("loading the kernel")?;
    if args.prefault {
        ram.prefault_all(|| deadline.check("--prefault"))?;
    }
    let firmware = args.boot == boot::BootMode::Firmware;
    let rom = if firmware {
        let boot::Entry::Pvh(pvh) = &entry else {
            return Err(Error::Config("--boot firmware enters PVH kernels only".into()));
        };
        boot::firmware::write_boot_info(&ram, pvh, args.boot_info_corrupt)?;
        Some(boot::firmware::map_rom(&kvm, &vm)?)
    } else {
        None
    };

    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::new();
    for id in 0..args.vcpus {
        let vcpu = vm.create_vcpu(id as u64).map_err(Error::kvm(format!("KVM_CREATE_VCPU {id}")))?;
        vcpu.set_cpuid2(&crate::kvm::cpuid_for(&cpuid, id)).map_err(Error::kvm("KVM_SET_CPUID2"))?;
        if firmware {
            boot::firmware::setup_vcpu(&vcpu, id)?;
        } else {
            boot::setup_vcpu(&vcpu, id, &entry)?;
        }
        vcpus.push(vcpu);
    }
    let tsc_khz = vcpus[0].get_tsc_khz().unwrap_or(0);
    deadline.check("creating the vCPUs")?;

    let clones = crate::clone::CloneCtx::new(args, &cpuid);
    let shared = Arc::new(Shared::new(
        ram.clone(),
        args.vcpus,
        tsc_khz,
        Box::new(std::io::stdout()),
        Arc::new(Reports::default()),
        0,
        Some(clones.clone()),
        profiling.then(|| crate::profile::Profile::new(args.vcpus)),
        rom,
    )?);
    info!(
        "booting {what} by {}: {} MiB, {} vcpu(s), entry {:#x}{}",
        entry.protocol(),
        args.memory >> 20,
        args.vcpus,
        entry.address(),
        if firmware { " through the firmware" } else { "" }
    );
    let threads = start_threads(&shared, vcpus, args.uffd_poll)?;

    let outcome = monitor(&shared, deadline)?;
    // Clones run on; the run is over when every one has stopped too.
    let outcome = clones.wait_all(outcome, deadline);
    let stopped = threads.stop(&shared);
    // Shared file mappings are written back before vkvm reports, whatever
    // stopped the run (a signal included): no guest write is lost.
    let outcome = match (outcome, shared.ram.sync_files()) {
        (o, _) if o.crash_message().is_some() => o,
        (_, Err(e)) => Outcome::Crash(e.to_string()),
        (o, Ok(())) => o,
    };
    crate::ratelimit::flush();
    let done = Finished { outcome, shared, elapsed: vm_started.elapsed() };
    info!("guest finished in {:.3} s with status {}", done.elapsed.as_secs_f64(), done.status());
    if let Some(f) = &mut stats_file {
        write_stats(f, &done)?;
    }
    if !stopped {
        // A vCPU thread that did not end may still be inside KVM_RUN: the
        // VM's descriptors stay open until the process exits.
        std::mem::forget(vm);
    }
    Ok(done)
}

/// How long stopping a VM waits for each of its threads before leaving it
/// to the process exit (a vCPU stuck in the host kernel).
const STOP_WAIT: Duration = Duration::from_secs(2);

/// A VM's threads: its vCPUs and its userfaultfd handler.
pub struct VmThreads {
    vcpus: Vec<std::thread::JoinHandle<()>>,
    uffd: Option<std::thread::JoinHandle<()>>,
    stop_faults: Arc<crate::fault::Stop>,
}

impl VmThreads {
    /// Have all vCPU threads returned?
    pub fn vcpus_done(&self) -> bool {
        self.vcpus.iter().all(|t| t.is_finished())
    }

    /// Stop the VM (if nothing did), kick its vCPUs out of the guest until
    /// their threads end, then end the fault thread. True if every thread
    /// ended within [`STOP_WAIT`]; a thread that did not is left behind.
    pub fn stop(self, shared: &Shared) -> bool {
        if !shared.finished() {
            shared.finish(Outcome::Crash("stopped".into()));
        }
        let until = Instant::now() + STOP_WAIT;
        // A kick can land just before a thread enters KVM_RUN: repeat it.
        while !self.vcpus_done() && Instant::now() < until {
            shared.ctl.kick_all();
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut all = self.vcpus_done();
        for t in self.vcpus {
            if t.is_finished() {
                let _ = t.join();
            }
        }
        // Only now: a vCPU waiting on a fault needs this thread to go on.
        self.stop_faults.stop();
        if let Some(t) = self.uffd {
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                all = false;
            }
        }
        all
    }
}

/// Start a VM's userfaultfd handler (if it has one) and its vCPU threads.
/// A thread that cannot be started (the host is out of threads or memory)
/// is an error: the caller stops the VM, never an abort.
pub fn start_threads(
    shared: &Arc<Shared>,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    uffd_poll: bool,
) -> Result<VmThreads, Error> {
    let ram = &shared.ram;
    let stop = Arc::new(crate::fault::Stop::new().map_err(Error::io("cannot create an eventfd"))?);
    let report = FaultReport { ctl: shared.ctl.clone(), profile: shared.profile.clone() };
    let mut threads = VmThreads { vcpus: Vec::new(), uffd: None, stop_faults: stop.clone() };
    if ram.uffd.is_some() {
        let r = ram.clone();
        let t = std::thread::Builder::new()
            .name(format!("uffd-vm{}", shared.vm_id))
            .spawn(move || crate::fault::serve(r, stop, uffd_poll, &report))
            .map_err(Error::io("cannot start the userfaultfd thread"))?;
        threads.uffd = Some(t);
    }
    let ctx = crate::vcpu::VcpuContext {
        ram: shared.ram.clone(),
        bus: shared.bus.clone(),
        stats: shared.stats.clone(),
        ctl: shared.ctl.clone(),
        cloner: shared.clones.clone().map(|c| c as Arc<dyn crate::vcpu::Cloner>),
        profile: shared.profile.clone(),
    };
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let v = crate::vcpu::Vcpu::new(id as u32, vcpu, &ctx);
        let spawned = std::thread::Builder::new().name(format!("vm{}-vcpu{id}", shared.vm_id)).spawn(move || v.run());
        match spawned {
            Ok(t) => threads.vcpus.push(t),
            Err(e) => {
                threads.stop(shared);
                return Err(Error::Io { context: "cannot start a vCPU thread".into(), source: e });
            }
        }
    }
    Ok(threads)
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
            let _ = self.shared.ctl.exit_event().read();
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.shared.ctl.exit_event(), EventSet::IN)) {
            warn!("cannot watch the exit event: {e}");
        }
        // A signal only wakes the loop; `signals::pending` says which.
        if let Some(w) = crate::signals::wake_fd() {
            if let Err(e) = ops.add(Events::new(w, EventSet::IN)) {
                warn!("cannot watch for SIGINT/SIGTERM: {e}");
            }
        }
        if let Some(t) = &self.timer {
            if let Err(e) = ops.add(Events::new(t, EventSet::IN)) {
                warn!("cannot watch the timeout: {e}");
            }
        }
    }
}

fn monitor(shared: &Arc<Shared>, deadline: Deadline) -> Result<Outcome, Error> {
    let timer = match deadline.remaining() {
        Some(left) => {
            let timer_err = |e| Error::Crash(format!("cannot arm the --timeout timer: {e}"));
            let mut t = TimerFd::new().map_err(timer_err)?;
            // A zero time would disarm the timer: the loop checks the deadline too.
            t.reset(left.max(Duration::from_nanos(1)), None).map_err(timer_err)?;
            Some(t)
        }
        None => None,
    };
    let mon = Arc::new(Mutex::new(Monitor { shared: shared.clone(), timer, timed_out: false }));
    let mut em =
        EventManager::<Arc<Mutex<Monitor>>>::new().map_err(|e| Error::Crash(format!("event manager: {e:?}")))?;
    em.add_subscriber(mon.clone());
    loop {
        if let Some(o) = shared.outcome() {
            return Ok(o);
        }
        if let Some(sig) = crate::signals::pending() {
            shared.finish(Outcome::Interrupted(sig));
            continue;
        }
        if mon.lock().unwrap_or_else(|e| e.into_inner()).timed_out || deadline.passed() {
            shared.finish(Outcome::TimedOut { secs: deadline.secs() });
            continue;
        }
        em.run_with_timeout(1000).map_err(|e| Error::Crash(format!("event manager: {e:?}")))?;
    }
}

/// The `faults` object of `--stats-json`.
pub fn fault_stats(shared: &Shared) -> serde_json::Value {
    let p = shared.ram.vm.stats().snapshot();
    json!({
        "delivery": shared.ram.view.delivery(),
        "zero_fill": p.zero_fill,
        "soft": p.soft,
        "cow_copy": p.cow_copy,
        "cow_rename": p.cow_rename,
        "pager_in": p.pager_in,
        "prefault": p.prefault,
        "guest_errors": shared.ram.delivery.guest_errors.load(Ordering::Relaxed),
        "events": shared.ram.delivery.events.load(Ordering::Relaxed),
        "fault_around": shared.ram.delivery.around.load(Ordering::Relaxed),
    })
}

fn write_stats(file: &mut OutFile, done: &Finished) -> Result<(), Error> {
    let shared = &done.shared;
    let pstats = shared.ram.vm.stats().snapshot();
    let tests = shared.tests.snapshot();
    let mut v = json!({
        "exit_status": done.status(),
        "exits": shared.stats.exits.snapshot(),
        "tests": tests,
        "reports_suppressed": shared.tests.suppressed(),
        "unhandled_pio": shared.stats.exits.unhandled_pio.load(Ordering::Relaxed),
        "bad_hypercalls": shared.stats.bad_hypercalls.load(Ordering::Relaxed),
        "log_suppressed": crate::ratelimit::suppressed(),
        "vcpus": shared.nr_vcpus,
        "elapsed_ms": done.elapsed.as_secs_f64() * 1e3,
        "faults": fault_stats(shared),
        "clones": shared.clones.as_ref().map(|c| c.stats_json()).unwrap_or_default(),
        "clone_limits": shared.clones.as_ref().map(|c| c.summary_json()).unwrap_or_default(),
        "pageout": { "pages_out": pstats.pages_out, "pages_in": pstats.pages_in },
        "vpt": crate::vpagetable::stats(&shared.ram.vpt),
        "memory": {
            "host_remaps": shared.ram.view.stats.remaps.load(Ordering::Relaxed),
            "host_map_errors": shared.ram.view.stats.map_errors.load(Ordering::Relaxed),
            "resident_pages": shared.ram.vm.pool().resident(),
            "present_pages": shared.ram.view.present_count(),
            "pool_resident_bytes": shared.ram.pool_resident_bytes(),
            // With clones: the most the pool held, read as each clone ended.
            "pool_peak_bytes": shared.clones.as_ref().map_or(0, |c| c.pool_peak()).max(shared.ram.pool_resident_bytes()),
        },
    });
    match &done.outcome {
        Outcome::Exit(s) => v["guest_exit_status"] = json!(s),
        Outcome::Interrupted(sig) => {
            v["interrupted"] = json!(true);
            v["signal"] = json!(crate::signals::name(*sig));
        }
        o => v["crash"] = json!(o.crash_message()),
    }
    let text = serde_json::to_string_pretty(&v).map_err(|e| Error::Crash(format!("stats JSON: {e}")))?;
    file.write(&(text + "\n"))
}
