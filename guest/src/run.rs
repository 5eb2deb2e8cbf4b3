//! The ring-3 side: find the platform, read the command line, and run the
//! selected tests on every CPU in lock-step (one test at a time).

use crate::abi;
use crate::boot::MAX_CPUS;
use crate::bootinfo;
use crate::fmt::Line;
use crate::platform::{self, console_write, hypercall};
use crate::tests::{self, Ctx, Test};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

const MAX_TESTS: usize = 32;
const STOP: u64 = u64::MAX;
const ARENA_ALIGN: u64 = 2 << 20;
const MIN_ARENA_START: u64 = 4 << 20;

static NCPUS: AtomicUsize = AtomicUsize::new(1);
/// APs that reached ring 3 (each counts itself once).
static ARRIVED: AtomicUsize = AtomicUsize::new(0);
/// How long the BSP waits for the APs, in TSC cycles (seconds at any
/// plausible TSC rate; APs normally arrive within milliseconds).
const AP_WAIT_CYCLES: u64 = 20_000_000_000;
static EPOCH: AtomicU64 = AtomicU64::new(0);
static TEST_IDX: AtomicUsize = AtomicUsize::new(0);
static FINISHED: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicBool = AtomicBool::new(false);
static mut PLAN: [Option<&'static Test>; MAX_TESTS] = [None; MAX_TESTS];
static mut CTX: Ctx = Ctx::empty();

extern "C" {
    static __image_end: u8;
}

pub fn main(cpu: usize, start_info: u64) -> ! {
    if cpu != 0 {
        ap_main(cpu)
    }
    let vkvm = platform::detect();
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    let multiboot = crate::boot::booted_by_multiboot();
    let bi = if multiboot {
        bootinfo::parse_multiboot(start_info, image_end)
    } else {
        bootinfo::parse(start_info, image_end)
    };
    // The CPU count: vkvm's hypercall; on another VMM fw_cfg, but only
    // after a Multiboot boot, where the BSP started the APs by INIT/SIPI
    // (a PVH boot elsewhere leaves them waiting for a SIPI nobody sends).
    let want = if vkvm {
        hypercall(0, abi::nr::NR_VCPUS, &[]).max(1) as usize
    } else if multiboot && platform::fw_cfg::present() {
        platform::fw_cfg::read_u64(platform::fw_cfg::NB_CPUS).max(1) as usize
    } else {
        1
    }
    .min(MAX_CPUS);
    let ncpus = wait_for_aps(want);
    NCPUS.store(ncpus, Ordering::Relaxed);

    let mut l = Line::new();
    l.s("vkvm-guest 0.1 (hypercall ABI v").dec(abi::ABI_VERSION as u64).s("): long mode, ring 3, ");
    l.s(if vkvm { "on vkvm" } else { "on another VMM" }).s(", ");
    l.dec(bi.ram_end >> 20).s(" MiB RAM, ").dec(ncpus as u64).s(" cpu(s), cmdline '");
    l.bytes(bi.cmdline).s("'");
    if multiboot {
        l.s(" via multiboot, ").dec(bi.modules as u64).s(" module(s)");
    }
    l.s("\n");
    platform::serial_write(l.as_bytes());
    if ncpus < want {
        l.clear();
        l.s("guest: only ").dec(ncpus as u64).s(" of ").dec(want as u64).s(" cpus started; running on those\n");
        console_write(0, l.as_bytes());
        FAILED.store(true, Ordering::Relaxed);
    }

    let ctx = Ctx::from_cmdline(bi.cmdline, arena(image_end), bi.ram_end, ncpus);
    let mut n = 0;
    let mut unknown = false;
    for name in ctx.test_names() {
        match tests::find(name) {
            Some(t) if n < MAX_TESTS => {
                // SAFETY: written by the BSP before any AP reads the plan (EPOCH release).
                unsafe { PLAN[n] = Some(t) };
                n += 1;
            }
            Some(_) => {}
            None => {
                l.clear();
                l.s("unknown test '").bytes(name).s("' (known: ");
                for t in tests::ALL {
                    l.s(t.name).s(" ");
                }
                l.s(")\n");
                console_write(0, l.as_bytes());
                unknown = true;
            }
        }
    }
    if unknown {
        platform::exit(0, abi::STATUS_USAGE);
    }
    // SAFETY: as for PLAN.
    unsafe { CTX = ctx };
    say_hello(0);

    for i in 0..n {
        TEST_IDX.store(i, Ordering::Relaxed);
        EPOCH.store(i as u64 + 1, Ordering::Release);
        run_one(0, i);
        let want = (ncpus as u64 - 1) * (i as u64 + 1);
        while FINISHED.load(Ordering::Acquire) < want {
            core::hint::spin_loop();
        }
    }
    EPOCH.store(STOP, Ordering::Release);
    let failed = FAILED.load(Ordering::Relaxed);
    l.clear();
    l.s(if failed { "guest: FAILED\n" } else { "guest: all tests passed\n" });
    console_write(0, l.as_bytes());
    // `exit-status=N` replaces the status (to test how the host passes it on).
    let status = if failed { abi::STATUS_FAIL } else { abi::STATUS_PASS };
    platform::exit(0, ctx.opt(b"exit-status").and_then(tests::parse_u64).unwrap_or(status))
}

/// Wait until `want - 1` APs have checked in, or give up after a while;
/// returns the number of CPUs that will run tests.
fn wait_for_aps(want: usize) -> usize {
    let t0 = platform::rdtsc();
    while ARRIVED.load(Ordering::Acquire) + 1 < want {
        if platform::rdtsc().wrapping_sub(t0) > AP_WAIT_CYCLES {
            break;
        }
        core::hint::spin_loop();
    }
    (ARRIVED.load(Ordering::Acquire) + 1).min(want)
}

fn arena(image_end: u64) -> u64 {
    (image_end.div_ceil(ARENA_ALIGN) * ARENA_ALIGN).max(MIN_ARENA_START)
}

fn say_hello(cpu: usize) {
    let apic = platform::cpuid(1)[1] >> 24;
    let mut l = Line::new();
    l.s("cpu ").dec(cpu as u64).s(" (apic id ").dec(apic as u64).s(") running in ring 3\n");
    console_write(cpu, l.as_bytes());
}

fn ap_main(cpu: usize) -> ! {
    platform::detect();
    ARRIVED.fetch_add(1, Ordering::Release);
    let mut seen = 0;
    let mut said_hello = false;
    loop {
        let e = EPOCH.load(Ordering::Acquire);
        if e == seen {
            core::hint::spin_loop();
            continue;
        }
        if !said_hello {
            say_hello(cpu);
            said_hello = true;
        }
        // STOP, or an AP that came up after the BSP stopped waiting.
        if e == STOP || cpu >= NCPUS.load(Ordering::Relaxed) {
            break;
        }
        seen = e;
        run_one(cpu, TEST_IDX.load(Ordering::Relaxed));
        FINISHED.fetch_add(1, Ordering::Release);
    }
    hypercall(cpu, abi::nr::PARK, &[]);
    loop {
        core::hint::spin_loop();
    }
}

fn run_one(cpu: usize, i: usize) {
    // SAFETY: PLAN and CTX are written once by the BSP before EPOCH is released.
    let (t, ctx) = unsafe { (PLAN[i], &*(&raw const CTX)) };
    let Some(t) = t else { return };
    if cpu != 0 && !t.all_cpus {
        return;
    }
    let out = (t.run)(&ctx.for_cpu(cpu));
    if !out.pass {
        FAILED.store(true, Ordering::Relaxed);
    }
    tests::report(cpu, t.name, &out);
}
