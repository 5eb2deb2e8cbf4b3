//! The commands that run one guest: `vkvm run` and `vkvm profile`. Each
//! checks its options, reads the kernel, builds the VM in steps
//! (`vm::Builder`), waits for its outcome and its clones, writes back
//! shared file mappings and writes `--stats-json` (or the profile).

use crate::boot;
use crate::cli::RunArgs;
use crate::clone::CloneCtx;
use crate::config::FaultDelivery;
use crate::error::Error;
use crate::fault::FaultStages;
use crate::inputs::OutFile;
use crate::kvm;
use crate::memory::{self, GuestRam, MemConfig};
use crate::outcome::Outcome;
use crate::pmap::Delivery;
use crate::stats::Reports;
use crate::status;
use crate::vm::{self, BootConfig, Deadline, Devices, RunningVm, Stopped};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use log::info;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A run that has ended: how, and what it recorded.
pub struct Finished {
    pub outcome: Outcome,
    pub vm: Stopped,
    pub clones: Arc<CloneCtx>,
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

/// Guest memory as `args` ask for it.
fn mem_config(args: &RunArgs) -> MemConfig {
    let delivery = match args.fault_delivery {
        FaultDelivery::Uffd => Delivery::Uffd,
        FaultDelivery::Exit => Delivery::Exit,
        FaultDelivery::Auto => {
            let d = memory::pick_delivery();
            info!("fault delivery: {d:?}");
            d
        }
    };
    MemConfig {
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
    }
}

/// Check `args`, read the kernel, open KVM and build and start the VM of
/// `args` in steps, with `console` as its console. The clones it makes
/// share the returned context.
pub fn start(
    args: &RunArgs,
    deadline: &Deadline,
    console: Box<dyn std::io::Write + Send>,
    profiling: bool,
) -> Result<(RunningVm, Arc<CloneCtx>), Error> {
    let image = boot::Image::read(args.guest.as_deref(), args.boot, args.memory, &args.module)?;
    deadline.check("reading the kernel")?;
    let kvm = kvm::open(&args.kvm_device)?;
    kvm::install_kick()?;
    args.validate(Some(kvm.get_max_vcpus() as u32))?;
    let builder = vm::Builder::new(&kvm, 0)?;
    let ram = Arc::new(GuestRam::new(&mem_config(args))?);
    deadline.check("guest memory")?;
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    let cpuids: Vec<_> = (0..args.vcpus).map(|id| kvm::cpuid_for(&supported, id)).collect();
    let vcpus = builder.memory(ram)?.vcpus(&cpuids)?;
    deadline.check("creating the vCPUs")?;
    let how = BootConfig {
        image: &image,
        cmdline: &args.cmdline,
        prefault: args.prefault,
        mode: args.boot,
        boot_info_corrupt: args.boot_info_corrupt,
    };
    let loaded = vcpus.boot(&kvm, &how, deadline)?;
    let clones = CloneCtx::new(args, &supported);
    let devices = Devices {
        console,
        tests: Arc::new(Reports::default()),
        tsc_khz: loaded.tsc_khz(),
        cloner: Some(clones.clone()),
        profiling,
    };
    let vm = loaded.devices(devices)?.start(args.uffd_poll)?;
    Ok((vm, clones))
}

/// Boot a VM and wait until it stops (or times out, or a signal stops it),
/// its clones included; write `--stats-json`.
pub fn execute(args: &RunArgs, profiling: bool, started: Instant) -> Result<Finished, Error> {
    let deadline = Deadline::new(started, args.timeout);
    args.validate(if args.vcpus == 0 { kvm::host_max_vcpus(&args.kvm_device) } else { None })?;
    let mut stats_file = args.stats_json.as_deref().map(|p| OutFile::create(p, "--stats-json")).transpose()?;
    let (vm, clones) = start(args, &deadline, Box::new(std::io::stdout()), profiling)?;
    let outcome = vm.wait(deadline)?;
    // Clones run on; the run is over when every one has stopped too.
    let outcome = clones.wait_all(outcome, deadline);
    let stopped = vm.stop();
    // Shared file mappings are written back before vkvm reports, whatever
    // stopped the run (a signal included): no guest write is lost.
    let outcome = match (outcome, stopped.ram.sync_files()) {
        (o, _) if o.crash_message().is_some() => o,
        (_, Err(e)) => Outcome::Crash(e.to_string()),
        (o, Ok(())) => o,
    };
    crate::ratelimit::flush();
    let elapsed = stopped.created.elapsed();
    let done = Finished { outcome, vm: stopped, clones, elapsed };
    info!("guest finished in {:.3} s with status {}", done.elapsed.as_secs_f64(), done.status());
    if let Some(f) = &mut stats_file {
        write_stats(f, &done)?;
    }
    Ok(done)
}

fn write_stats(file: &mut OutFile, done: &Finished) -> Result<(), Error> {
    let (vm, clones) = (&done.vm, &done.clones);
    let ram = &vm.ram;
    let pstats = ram.vm.stats().snapshot();
    let mut v = json!({
        "exit_status": done.status(),
        "exits": vm.stats.exits.snapshot(),
        "tests": vm.tests.snapshot(),
        "reports_suppressed": vm.tests.suppressed(),
        "unhandled_pio": vm.stats.exits.unhandled_pio.load(Ordering::Relaxed),
        "bad_hypercalls": vm.stats.bad_hypercalls.load(Ordering::Relaxed),
        "log_suppressed": crate::ratelimit::suppressed(),
        "vcpus": vm.nr_vcpus,
        "elapsed_ms": done.elapsed.as_secs_f64() * 1e3,
        "faults": vm.fault_stats(),
        "clones": clones.stats_json(),
        "clone_limits": clones.summary_json(),
        "pageout": { "pages_out": pstats.pages_out, "pages_in": pstats.pages_in },
        "vpt": crate::vpagetable::stats(&ram.vpt),
        "memory": {
            "host_remaps": ram.view.stats.remaps.load(Ordering::Relaxed),
            "host_relayouts": ram.view.stats.relayouts.load(Ordering::Relaxed),
            "host_map_errors": ram.view.stats.map_errors.load(Ordering::Relaxed),
            "resident_pages": ram.vm.pool().resident(),
            "present_pages": ram.view.present_count(),
            "pool_resident_bytes": ram.pool_resident_bytes(),
            // With clones: the most the pool held, read as each clone ended.
            "pool_peak_bytes": clones.pool_peak().max(ram.pool_resident_bytes()),
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

/// Guest tests `vkvm profile` runs when no `--cmdline` is given.
pub const DEFAULT_WORKLOAD: &str = "tests=exit-storm,seq-touch";

/// `vkvm profile`: run with profiling on, write DIR/profile.json and
/// DIR/profile.svg, print the table; exit with the guest's status.
pub fn profile(args: &mut RunArgs, out: &std::path::Path, started: Instant) -> Result<u8, Error> {
    if args.cmdline.is_empty() {
        args.cmdline = DEFAULT_WORKLOAD.into();
    }
    std::fs::create_dir_all(out)
        .map_err(|e| Error::Config(format!("--out {}: cannot create it: {e}", out.display())))?;
    let done = execute(args, true, started)?;
    let profile = done.vm.profile.as_ref().ok_or_else(|| Error::Crash("profiling was not enabled".into()))?;
    let json = json!({
        "workload": args.cmdline,
        "exit_status": done.status(),
        "exits": profile.to_json(),
        "fault_stages": profile.stages_json(),
        "tests": done.vm.tests.snapshot(),
    });
    let path = out.join("profile.json");
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::Crash(format!("profile JSON: {e}")))?;
    std::fs::write(&path, text + "\n").map_err(Error::io(format!("cannot write {}", path.display())))?;
    let merged = profile.merged();
    let mut series = Vec::new();
    for s in &merged {
        series.push((format!("{} KVM_RUN", s.reason.name()), &s.kvm_run));
        series.push((format!("{} handling", s.reason.name()), &s.handle));
    }
    let stages = profile.stages.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (i, name) in FaultStages::NAMES.iter().enumerate() {
        if !stages[i].is_empty() {
            series.push((format!("fault {name}"), &stages[i]));
        }
    }
    let svg = out.join("profile.svg");
    crate::profile::write_svg(&svg, &series)
        .map_err(|e| Error::Crash(format!("cannot draw {}: {e}", svg.display())))?;
    status::print(&format!(
        "{}{}wrote {} and {}\n",
        profile.table(),
        profile.stages_table(),
        path.display(),
        svg.display()
    ))?;
    done.into_result()
}

/// Pause and resume on real KVM, through the same steps `vkvm run` takes
/// (no socket needed: issue 14's API will call the same `pause`).
#[cfg(test)]
mod test {
    use super::*;
    use crate::control::RunState;
    use crate::devices::serial::Captured;

    /// Skip without /dev/kvm, unless VKVM_REQUIRE_KVM=1 (CI): then fail.
    fn kvm_usable() -> bool {
        let ok = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
        assert!(ok || std::env::var("VKVM_REQUIRE_KVM").as_deref() != Ok("1"), "VKVM_REQUIRE_KVM=1 but no /dev/kvm");
        if !ok {
            eprintln!("skipping: /dev/kvm is not usable here");
        }
        ok
    }

    fn run_args(args: &[&str]) -> RunArgs {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from(["vkvm", "run"].iter().chain(args)).unwrap();
        match cli.command {
            crate::cli::Command::Run(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_paused_guest_stands_still_and_its_test_passes_after_resume() {
        if !kvm_usable() {
            return;
        }
        // Long enough that the pause lands inside the test (seconds here).
        let args = run_args(&["--vcpus", "2", "--memory", "128M", "--cmdline", "tests=smp-storm storm-rounds=3000"]);
        let deadline = Deadline::new(Instant::now(), Some(300.0));
        let console = Captured::default();
        let (vm, clones) = start(&args, &deadline, Box::new(console.clone()), false).unwrap();
        // The AP says hello when the first test starts.
        let t0 = Instant::now();
        while !console.text().contains("cpu 1 (apic id") {
            assert!(t0.elapsed() < Duration::from_secs(120), "the test never started: {}", console.text());
            std::thread::sleep(Duration::from_millis(5));
        }
        let paused = vm.pause(Duration::from_secs(30)).unwrap();
        assert_eq!(paused.states(), [RunState::Paused, RunState::Paused]);
        let first = paused.capture().unwrap();
        let said = console.text();
        assert!(!said.contains("test smp-storm"), "the test ended before the pause: {said}");
        std::thread::sleep(Duration::from_millis(100));
        let second = paused.capture().unwrap();
        for (i, (a, b)) in first.iter().zip(&second).enumerate() {
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            assert_eq!((a.regs.rip, a.regs.rsp, a.regs.rflags), (b.regs.rip, b.regs.rsp, b.regs.rflags), "vcpu {i}");
            // Stopped inside the test, which runs in ring 3.
            assert_eq!(a.sregs.cs.dpl, 3, "vcpu {i} at {:#x}", a.regs.rip);
            assert!(a.mp_state.is_some(), "vcpu {i}");
        }
        assert_eq!(console.text(), said, "the guest ran while paused");
        drop(paused);
        let outcome = clones.wait_all(vm.wait(deadline).unwrap(), deadline);
        let stopped = vm.stop();
        assert_eq!(outcome, Outcome::Exit(0), "{}", console.text());
        let passed = stopped.tests.snapshot().iter().filter(|t| t.name == "smp-storm" && t.status == "pass").count();
        assert_eq!(passed, 2, "{}", console.text());
    }
}
