//! Guest tests. Each runs in ring 3 and is deterministic for `seed=N`.
//! A failure names the first wrong address, the expected and found values.

use crate::abi::{self, TestReport};
use crate::arch;
use crate::fmt::Line;
use crate::platform::{self, console_write, hypercall, rdtsc};
use crate::vpt_tests;
use core::arch::asm;
use core::sync::atomic::Ordering;

pub struct Test {
    pub name: &'static str,
    pub about: &'static str,
    /// Run on every CPU (each on its own slice) rather than on CPU 0 only.
    pub all_cpus: bool,
    pub run: fn(&Ctx) -> Outcome,
}

const fn t(name: &'static str, about: &'static str, all_cpus: bool, run: fn(&Ctx) -> Outcome) -> Test {
    Test { name, about, all_cpus, run }
}

#[rustfmt::skip]
pub static ALL: &[Test] = &[
    t("selfcheck", "write and verify 64 MiB with address-derived values", true, selfcheck),
    t("pio-bench", "median PIO exit round trip from ring 3 (rdtsc)", false, pio_bench),
    t("exit-storm", "PIO out, port read and hypercall loops: median cycles of each", false, exit_storm),
    t("seq-touch", "first touch of every arena page in order: cycles per page", false, seq_touch),
    t("random-touch", "first touch of every arena page in a seeded random order", false, random_touch),
    t("write-verify", "address-derived patterns over the whole arena, rewritten and re-read", true, write_verify),
    t("smp-storm", "every CPU writes its own word of every shared page in a seeded order, then verifies", true, smp_storm),
    t("file-map", "FNV-1a of every --map-file region; writes by mode (ro must fault)", false, file_map),
    t("kernel-touch", "ring 0 touched fresh pages at boot (exit delivery); ring 3 checks them", false, kernel_touch),
    t("fw-cfg", "read QEMU's fw_cfg (signature, id, cpus, RAM size, files) and report it", false, fw_cfg),
    t("cow-clone", "clone the VM; parent and clones write their own data, see only their own", false, cow_clone),
    t("clone", "clone the VM; the tests after it run in every VM, each with its own seed", false, clone_first),
    t("clone-bench", "touch clone-mib MiB, then clone (vkvm times the clone)", false, clone_bench),
    t("bad-hypercall", "hostile hypercall arguments get error codes", false, bad_hypercall),
    t("hostile", "CLONE past the cap, REPORT, unknown-hypercall and unbacked-access floods", false, hostile),
    t("file-write-hang", "write a pattern over every shared --map-file region, say so, then hang", false, file_write_hang),
    t("crash", "ring-3 access to an unmapped address: the kernel reports a crash", false, crash),
    t("triple-fault", "wreck the IDT and fault: the VM shuts down", false, triple_fault),
    t("hang", "never finish (for --timeout)", false, hang),
    t("vpt-linear", "VPAGETABLE: PS in the master / at levels 1-3 maps the window linearly", false, vpt_tests::linear),
    t("vpt-levels", "VPAGETABLE: 2-, 3- and 4-level walks; off-path edits change nothing", false, vpt_tests::levels),
    t("vpt-alias", "VPAGETABLE: two window pages and RAM share one page", false, vpt_tests::alias),
    t("vpt-ro", "VPAGETABLE: write through RW clear at any level faults, writes nothing, no M", false, vpt_tests::ro),
    t("vpt-invalid", "VPAGETABLE: V clear at any level (master too) faults without RSVD", false, vpt_tests::invalid),
    t("vpt-am", "VPAGETABLE: A/M bits; M re-set after the guest clears it and invals", false, vpt_tests::am),
    t("vpt-inval", "VPAGETABLE: cpu 0 remaps + invals while cpu 1 reads: nothing stale", true, vpt_tests::inval_race),
    t("vpt-bounds", "VPAGETABLE: a frame beyond guest RAM faults with RSVD in the error code", false, vpt_tests::bounds),
    t("clone-mix", "clone with a window over RAM and pages in swap; each VM sees only its writes via RAM and window", false, vpt_tests::clone_mix),
];

pub fn find(name: &[u8]) -> Option<&'static Test> {
    ALL.iter().find(|t| t.name.as_bytes() == name)
}

pub struct Outcome {
    pub pass: bool,
    pub counters: [(&'static str, u64); abi::MAX_COUNTERS],
    pub n: usize,
    pub detail: Line,
}

impl Outcome {
    pub(crate) fn new() -> Self {
        Outcome { pass: true, counters: [("", 0); abi::MAX_COUNTERS], n: 0, detail: Line::new() }
    }
    pub(crate) fn count(&mut self, k: &'static str, v: u64) -> &mut Self {
        if self.n < abi::MAX_COUNTERS {
            self.counters[self.n] = (k, v);
            self.n += 1;
        }
        self
    }
    pub(crate) fn fail(&mut self) -> &mut Line {
        self.pass = false;
        &mut self.detail
    }
}

/// What every test gets: its CPU, the memory it may use, and the options.
#[derive(Clone, Copy)]
pub struct Ctx {
    pub cpu: usize,
    pub ncpus: usize,
    pub seed: u64,
    /// Memory free for tests: [arena_start, arena_end).
    pub arena_start: u64,
    pub arena_end: u64,
    pub cmdline: &'static [u8],
}

impl Ctx {
    pub const fn empty() -> Self {
        Ctx { cpu: 0, ncpus: 1, seed: 0, arena_start: 0, arena_end: 0, cmdline: &[] }
    }
    pub fn from_cmdline(cmdline: &'static [u8], arena_start: u64, ram_end: u64, ncpus: usize) -> Self {
        let mut c = Ctx { cpu: 0, ncpus, seed: 1, arena_start, arena_end: ram_end.max(arena_start), cmdline };
        if let Some(v) = c.opt(b"seed") {
            c.seed = parse_u64(v).unwrap_or(1);
        }
        c
    }
    /// The context of one CPU; after `clone`, the seed has the VM's number
    /// mixed in, so each VM writes its own data.
    pub fn for_cpu(&self, cpu: usize) -> Ctx {
        let vm = VM_SALT.load(Ordering::Relaxed);
        let seed = if vm == 0 { self.seed } else { self.seed ^ splitmix64(vm) };
        Ctx { cpu, seed, ..*self }
    }
    /// Value of `key=value` on the command line.
    pub fn opt(&self, key: &[u8]) -> Option<&'static [u8]> {
        self.cmdline.split(|&c| c == b' ').find_map(|tok| {
            let eq = tok.iter().position(|&c| c == b'=')?;
            (&tok[..eq] == key).then(|| &tok[eq + 1..])
        })
    }
    pub fn test_names(&self) -> impl Iterator<Item = &'static [u8]> {
        let list: &'static [u8] = self.opt(b"tests").unwrap_or(b"selfcheck");
        list.split(|&c| c == b',').filter(|s| !s.is_empty())
    }
    /// `inject=NAME` asks test NAME to corrupt its own data so that it must fail.
    fn inject(&self, name: &str) -> bool {
        self.opt(b"inject").is_some_and(|v| v.split(|&c| c == b',').any(|n| n == name.as_bytes()))
    }
    /// This CPU's equal share of `len` bytes of the arena (page aligned).
    fn slice(&self, len: u64) -> (u64, u64) {
        let len = len.min(self.arena_end - self.arena_start);
        let per = (len / self.ncpus as u64) & !0xfff;
        let start = self.arena_start + per * self.cpu as u64;
        (start, start + per)
    }
}

pub(crate) fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(d)?;
    }
    (!digits.is_empty()).then_some(v)
}

pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Print the result line and, under vkvm, send the report hypercall.
pub fn report(cpu: usize, name: &str, out: &Outcome) {
    let mut l = Line::new();
    l.s("test ").s(name).s(" cpu ").dec(cpu as u64).s(if out.pass { ": pass" } else { ": FAIL" });
    for &(k, v) in &out.counters[..out.n] {
        l.s(" ").s(k).s("=").dec(v);
    }
    if !out.pass {
        l.s(": ").bytes(out.detail.as_bytes());
    }
    l.s("\n");
    console_write(cpu, l.as_bytes());
    if !platform::is_vkvm() {
        return;
    }
    report_raw(cpu, name.as_bytes(), out);
}

/// The REPORT hypercall alone (no console line); returns `ret`.
fn report_raw(cpu: usize, name: &[u8], out: &Outcome) -> i64 {
    let mut r = TestReport {
        name: [0; abi::NAME_LEN],
        status: if out.pass { abi::TEST_PASS } else { abi::TEST_FAIL },
        cpu: cpu as u32,
        ncounters: out.n as u32,
        _pad: 0,
        counter_names: [[0; 16]; abi::MAX_COUNTERS],
        counters: [0; abi::MAX_COUNTERS],
        detail: [0; abi::DETAIL_LEN],
    };
    copy_str(&mut r.name, name);
    for (i, &(k, v)) in out.counters[..out.n].iter().enumerate() {
        copy_str(&mut r.counter_names[i], k.as_bytes());
        r.counters[i] = v;
    }
    copy_str(&mut r.detail, out.detail.as_bytes());
    hypercall(cpu, abi::nr::REPORT, &[&r as *const _ as u64, abi::TEST_REPORT_SIZE as u64])
}

fn copy_str(dst: &mut [u8], src: &[u8]) {
    let n = src.len().min(dst.len());
    dst[..n].copy_from_slice(&src[..n]);
}

/// Expected contents of the word at `addr`.
pub(crate) fn pattern(addr: u64, seed: u64) -> u64 {
    splitmix64(addr ^ seed.rotate_left(17))
}

/// Write [start, end) with address-derived words, then verify; the first
/// mismatch is reported with its address.
pub fn fill_and_verify(ctx: &Ctx, name: &str, start: u64, end: u64, out: &mut Outcome) {
    let words = (end - start) / 8;
    for i in 0..words {
        let a = start + i * 8;
        // SAFETY: the arena is identity-mapped RAM reserved for tests.
        unsafe { (a as *mut u64).write_volatile(pattern(a, ctx.seed)) };
    }
    if ctx.inject(name) && words > 0 {
        let a = start + (splitmix64(ctx.seed) % words) * 8;
        // SAFETY: as above.
        unsafe { (a as *mut u64).write_volatile(!pattern(a, ctx.seed)) };
    }
    for i in 0..words {
        let a = start + i * 8;
        // SAFETY: as above.
        let found = unsafe { (a as *const u64).read_volatile() };
        let want = pattern(a, ctx.seed);
        if found != want {
            out.fail().s("first wrong address ").hex(a).s(" expected ").hex(want).s(" found ").hex(found);
            break;
        }
    }
    out.count("bytes", end - start).count("pages", (end - start) / 4096);
}

/// Pass 1 fills this CPU's arena slice; pass 2 rewrites every other page
/// with a second seed; pass 3 checks everything, so pages written long ago
/// (and perhaps paged out since) are re-read.
fn write_verify(ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    let limit = ctx.opt(b"wv-mib").and_then(parse_u64).map(|m| m << 20).unwrap_or(u64::MAX);
    let (start, end) = ctx.slice(limit);
    let seed2 = splitmix64(ctx.seed ^ 0x5eed);
    let seed_of = |a: u64| if (a / 4096) % 2 == 1 { seed2 } else { ctx.seed };
    for a in (start..end).step_by(8) {
        // SAFETY: arena memory reserved for tests.
        unsafe { (a as *mut u64).write_volatile(pattern(a, ctx.seed)) };
    }
    for a in (start..end).step_by(8).filter(|a| (a / 4096) % 2 == 1) {
        // SAFETY: as above.
        unsafe { (a as *mut u64).write_volatile(pattern(a, seed2)) };
    }
    if ctx.inject("write-verify") && end > start {
        // SAFETY: as above.
        unsafe { (start as *mut u64).write_volatile(!pattern(start, seed_of(start))) };
    }
    for a in (start..end).step_by(8) {
        // SAFETY: as above.
        let found = unsafe { (a as *const u64).read_volatile() };
        let want = pattern(a, seed_of(a));
        if found != want {
            out.fail().s("first wrong address ").hex(a).s(" expected ").hex(want).s(" found ").hex(found);
            break;
        }
    }
    out.count("bytes", end - start).count("pages", (end - start) / 4096);
    out
}

/// All CPUs share one region: CPU c owns word c of every page and writes it
/// in a seeded random page order for several rounds, then verifies its words.
/// Different CPUs therefore fault on the same pages at the same time.
fn smp_storm(ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    let mib = ctx.opt(b"storm-mib").and_then(parse_u64).unwrap_or(32);
    let start = ctx.arena_start;
    let end = (start + (mib << 20)).min(ctx.arena_end);
    let n = (end - start) / 4096;
    let rounds = ctx.opt(b"storm-rounds").and_then(parse_u64).unwrap_or(3);
    let word = |page: u64| start + page * 4096 + 8 * ctx.cpu as u64;
    let value = |page: u64, round: u64| pattern(word(page), ctx.seed ^ ((ctx.cpu as u64) << 48) ^ round);
    for round in 0..rounds {
        let mut step = (splitmix64(ctx.seed ^ round ^ ((ctx.cpu as u64) << 32)) % n.max(1)) | 1;
        while gcd(step, n) != 1 {
            step += 2;
        }
        for i in 0..n {
            let p = ((i as u128 * step as u128) % n as u128) as u64;
            // SAFETY: word `cpu` of each page belongs to this CPU alone.
            unsafe { (word(p) as *mut u64).write_volatile(value(p, round)) };
        }
    }
    let last = rounds.saturating_sub(1);
    for p in 0..n {
        // SAFETY: as above.
        let found = unsafe { (word(p) as *const u64).read_volatile() };
        if found != value(p, last) {
            out.fail()
                .s("first wrong address ")
                .hex(word(p))
                .s(" expected ")
                .hex(value(p, last))
                .s(" found ")
                .hex(found);
            break;
        }
    }
    out.count("pages", n).count("rounds", rounds).count("writes", n * rounds);
    out
}

fn selfcheck(ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    let (start, end) = ctx.slice(64 << 20);
    fill_and_verify(ctx, "selfcheck", start, end, &mut out);
    out
}

fn pio_bench(ctx: &Ctx) -> Outcome {
    const MAX: usize = 1 << 16;
    static mut SAMPLES: [u32; MAX] = [0; MAX];
    let iters = ctx.opt(b"pio-iters").and_then(parse_u64).unwrap_or(10_000).clamp(1, MAX as u64) as usize;
    // SAFETY: only CPU 0 runs this test.
    let s = unsafe { &mut *(&raw mut SAMPLES) };
    for v in s.iter_mut().take(iters) {
        let t0 = rdtsc();
        platform::outb(abi::NULL_PORT, 0);
        *v = (rdtsc() - t0).min(u32::MAX as u64) as u32;
    }
    let s = &mut s[..iters];
    s.sort_unstable();
    let median = s[iters / 2] as u64;
    let p90 = s[iters * 9 / 10] as u64;
    let khz = tsc_khz();
    let mut out = Outcome::new();
    out.count("exits", iters as u64).count("median_cycles", median).count("p90_cycles", p90);
    out.count("tsc_khz", khz);
    if let Some(ns) = (median * 1_000_000).checked_div(khz) {
        out.count("median_ns", ns);
    }
    out
}

/// TSC frequency: vkvm's hypercall, else the hypervisor timing leaf, else 0.
fn tsc_khz() -> u64 {
    if platform::is_vkvm() {
        return hypercall(0, abi::nr::TSC_KHZ, &[]).max(0) as u64;
    }
    let max = platform::cpuid(0x4000_0000)[0];
    if max >= 0x4000_0010 {
        return platform::cpuid(0x4000_0010)[0] as u64;
    }
    0
}

fn bad_hypercall(ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    if !platform::is_vkvm() {
        out.fail().s("needs vkvm's hypercall port");
        return out;
    }
    let c = ctx.cpu;
    let ok = b"bad-hypercall: console ok\n";
    let checks: [(&str, i64, i64); 5] = [
        ("beyond-ram", hypercall(c, abi::nr::CONSOLE_WRITE, &[ctx.arena_end + (1 << 30), 16]), -abi::EFAULT),
        ("wrapping", hypercall(c, abi::nr::CONSOLE_WRITE, &[u64::MAX - 4, 16]), -abi::EFAULT),
        ("too-long", hypercall(c, abi::nr::CONSOLE_WRITE, &[ok.as_ptr() as u64, abi::MAX_CONSOLE + 1]), -abi::E2BIG),
        ("unknown-nr", hypercall(c, 0x7777, &[]), -abi::ENOSYS),
        ("valid", hypercall(c, abi::nr::CONSOLE_WRITE, &[ok.as_ptr() as u64, ok.len() as u64]), ok.len() as i64),
    ];
    for (what, got, want) in checks {
        if got != want {
            let d = out.fail();
            d.s(what).s(": got ");
            if got < 0 {
                d.s("-").dec(got.unsigned_abs());
            } else {
                d.dec(got as u64);
            }
            return out;
        }
    }
    out.count("checks", checks.len() as u64);
    out
}

fn fw_cfg(ctx: &Ctx) -> Outcome {
    use platform::fw_cfg::{self as f, read_u64};
    let mut out = Outcome::new();
    let mut sig = [0u8; 4];
    f::read(f::SIGNATURE, &mut sig);
    let mut dir = [0u8; 4];
    f::read(f::FILE_DIR, &mut dir);
    let nb = read_u64(f::NB_CPUS) & 0xffff;
    out.count("signature_ok", (&sig == b"QEMU") as u64)
        .count("id", read_u64(f::ID) & 0xffff_ffff)
        .count("nb_cpus", nb)
        .count("max_cpus", read_u64(f::MAX_CPUS) & 0xffff)
        .count("ram_mib", read_u64(f::RAM_SIZE) >> 20)
        .count("files", u32::from_be_bytes(dir) as u64)
        .count("unknown_key", read_u64(0x7ff0));
    if &sig != b"QEMU" {
        out.fail().s("fw_cfg signature is not QEMU: ").bytes(&sig);
    } else if nb as usize != ctx.ncpus {
        out.fail().s("fw_cfg NB_CPUS ").dec(nb).s(" but ").dec(ctx.ncpus as u64).s(" cpus run");
    }
    out
}

fn crash(_ctx: &Ctx) -> Outcome {
    // 64 GiB: outside the guest's 4 GiB identity map, so a #PF in ring 3.
    // SAFETY: deliberately faulting; the kernel reports it and stops the VM.
    unsafe { (0x10_0000_0000u64 as *const u64).read_volatile() };
    let mut out = Outcome::new();
    out.fail().s("read of an unmapped address did not fault");
    out
}

fn triple_fault(_ctx: &Ctx) -> Outcome {
    arch::TRIPLE_FAULT.store(true, Ordering::SeqCst);
    // SAFETY: the #UD handler sees TRIPLE_FAULT and wrecks the IDT.
    unsafe { asm!("ud2") };
    let mut out = Outcome::new();
    out.fail().s("ud2 did not fault");
    out
}

/// Median and 99th percentile of the cycles `f` takes (samples in `buf`).
fn median_cycles(buf: &mut [u32], mut f: impl FnMut()) -> (u64, u64) {
    for v in buf.iter_mut() {
        let t0 = rdtsc();
        f();
        *v = (rdtsc() - t0).min(u32::MAX as u64) as u32;
    }
    buf.sort_unstable();
    (buf[buf.len() / 2] as u64, buf[buf.len() * 99 / 100] as u64)
}

fn exit_storm(ctx: &Ctx) -> Outcome {
    const MAX: usize = 1 << 16;
    static mut SAMPLES: [u32; MAX] = [0; MAX];
    let iters = ctx.opt(b"storm-iters").and_then(parse_u64).unwrap_or(5_000).clamp(1, MAX as u64) as usize;
    // SAFETY: only CPU 0 runs this test.
    let s = unsafe { &mut (&mut *(&raw mut SAMPLES))[..iters] };
    let mut out = Outcome::new();
    let (pio, pio99) = median_cycles(s, || platform::outb(abi::NULL_PORT, 0));
    let (pin, _) = median_cycles(s, || {
        platform::inl(abi::HC_PORT);
    });
    out.count("exits", 3 * iters as u64).count("pio_out_p50", pio).count("pio_out_p99", pio99);
    out.count("pio_in_p50", pin);
    if platform::is_vkvm() {
        let (hc, hc99) = median_cycles(s, || {
            hypercall(ctx.cpu, abi::nr::VERSION, &[]);
        });
        out.count("hcall_p50", hc).count("hcall_p99", hc99);
    }
    out.count("tsc_khz", tsc_khz());
    out
}

/// Arena bytes the touch tests use (`touch-mib=N`, default all of it).
fn touch_range(ctx: &Ctx) -> (u64, u64) {
    let limit = ctx.opt(b"touch-mib").and_then(parse_u64).map(|m| m << 20).unwrap_or(u64::MAX);
    ctx.slice(limit)
}

/// Write one word in each arena page, in the order `index(i)`, time it,
/// then check every word; report cycles per page.
fn touch(ctx: &Ctx, index: impl Fn(u64) -> u64) -> Outcome {
    let (start, end) = touch_range(ctx);
    let pages = (end - start) / 4096;
    let t0 = rdtsc();
    for i in 0..pages {
        let a = start + index(i) * 4096;
        // SAFETY: arena memory reserved for tests.
        unsafe { (a as *mut u64).write_volatile(a ^ ctx.seed) };
    }
    let cycles = rdtsc() - t0;
    // Steady state: the same pages again, now mapped.
    let t1 = rdtsc();
    for i in 0..pages {
        let a = start + index(i) * 4096;
        // SAFETY: as above.
        unsafe { (a as *mut u64).write_volatile(a ^ ctx.seed) };
    }
    let recycles = rdtsc() - t1;
    let mut out = Outcome::new();
    for i in 0..pages {
        let a = start + i * 4096;
        // SAFETY: as above.
        let found = unsafe { (a as *const u64).read_volatile() };
        if found != a ^ ctx.seed {
            out.fail().s("first wrong address ").hex(a).s(" expected ").hex(a ^ ctx.seed).s(" found ").hex(found);
            break;
        }
    }
    let khz = tsc_khz();
    out.count("pages", pages).count("cycles_per_page", cycles / pages.max(1)).count("tsc_khz", khz);
    out.count("retouch_cycles", recycles / pages.max(1));
    if let Some(ns) = (cycles * 1_000 / pages.max(1)).checked_div(khz / 1000) {
        out.count("ns_per_page", ns);
    }
    out
}

fn seq_touch(ctx: &Ctx) -> Outcome {
    touch(ctx, |i| i)
}

fn random_touch(ctx: &Ctx) -> Outcome {
    let (start, end) = touch_range(ctx);
    let n = ((end - start) / 4096).max(1);
    // i -> (i * step + off) mod n is a permutation when gcd(step, n) = 1.
    let mut step = (splitmix64(ctx.seed) % n) | 1;
    while gcd(step, n) != 1 {
        step += 2;
    }
    let off = splitmix64(ctx.seed ^ 1) % n;
    touch(ctx, move |i| ((i as u128 * step as u128 + off as u128) % n as u128) as u64)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// FNV-1a, 64-bit.
fn fnv1a(start: u64, len: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for a in start..start + len {
        // SAFETY: inside a region vkvm mapped for us.
        h ^= unsafe { (a as *const u8).read_volatile() } as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Marker the file-map test writes at the start of writable regions.
pub const FILE_MARK: &[u8] = b"vkvm wrote this\n";
/// Each writable region `i` also writes `FILE_TAG | i` at `FILE_TAG_AT + 8 * i`,
/// so that maps of one file can be told apart in it.
pub const FILE_TAG: u64 = 0x6d61_7074_0000_0000;
pub const FILE_TAG_AT: u64 = 64;
const MAX_FILES: usize = 4;

/// One `vkvm.files` entry: GPA:LEN:MODE[:FILE] (FILE = index of the first
/// region over the same host file).
#[derive(Clone, Copy)]
struct FileRegion<'a> {
    gpa: u64,
    len: u64,
    mode: &'a [u8],
    file: u64,
}

fn file_regions<'a>(list: &'a [u8], out: &mut [Option<FileRegion<'a>>; MAX_FILES]) -> Option<usize> {
    let mut n = 0;
    for (i, r) in list.split(|&c| c == b',').enumerate().take(MAX_FILES) {
        let mut f = r.split(|&c| c == b':');
        let (gpa, len, mode) = (f.next().and_then(parse_u64)?, f.next().and_then(parse_u64)?, f.next()?);
        let file = f.next().and_then(parse_u64).unwrap_or(i as u64);
        out[i] = Some(FileRegion { gpa, len, mode, file });
        n = i + 1;
    }
    Some(n)
}

/// `vkvm.files=GPA:LEN:MODE:FILE,...` (added by vkvm for --map-file): report
/// the FNV-1a of each region (as read before any write), then write the
/// marker and the region's tag to shared and private regions, and check that
/// a write to a read-only one faults at the right address and changes
/// nothing. Maps of one file must agree: a shared region's tag shows through
/// every shared or read-only map of that file, a private region's through none.
fn file_map(ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    let Some(list) = ctx.opt(b"vkvm.files") else {
        out.fail().s("no vkvm.files on the command line (run with --map-file)");
        return out;
    };
    let mut regions = [None; MAX_FILES];
    let Some(n) = file_regions(list, &mut regions) else {
        out.fail().s("malformed vkvm.files entry");
        return out;
    };
    const NAMES: [&str; MAX_FILES] = ["fnv0", "fnv1", "fnv2", "fnv3"];
    let mut ro_faults = 0;
    for (i, r) in regions.iter().take(n).enumerate() {
        let Some(FileRegion { gpa, len, mode, .. }) = *r else { continue };
        out.count(NAMES[i], fnv1a(gpa, len));
        if mode == b"ro" {
            // SAFETY: reading the first byte of the mapped region.
            let before = unsafe { (gpa as *const u8).read_volatile() };
            match arch::probe_write(ctx.cpu, gpa, !before) {
                Some(c) if c.vector == 14 && c.addr == gpa && c.error & 2 != 0 => ro_faults += 1,
                Some(c) => {
                    out.fail().s("read-only write raised vector ").dec(c.vector).s(" at ").hex(c.addr);
                    return out;
                }
                None => {
                    out.fail().s("a write to the read-only region at ").hex(gpa).s(" did not fault");
                    return out;
                }
            }
            // SAFETY: as above.
            if unsafe { (gpa as *const u8).read_volatile() } != before {
                out.fail().s("a refused write changed the read-only region at ").hex(gpa);
                return out;
            }
        } else {
            for (k, &b) in FILE_MARK.iter().enumerate() {
                // SAFETY: writable mapped region.
                unsafe { ((gpa + k as u64) as *mut u8).write_volatile(b) };
            }
            // SAFETY: as above; the tags stay in the first page.
            unsafe { ((gpa + FILE_TAG_AT + 8 * i as u64) as *mut u64).write_volatile(FILE_TAG | i as u64) };
        }
    }
    let mut coherent = 0;
    for (i, a) in regions.iter().take(n).enumerate() {
        let Some(a) = a.filter(|a| a.mode != b"ro") else { continue };
        for (j, b) in regions.iter().take(n).enumerate() {
            let Some(b) = b.filter(|b| b.file == a.file && j != i) else { continue };
            // A shared write shows through shared and read-only maps of the
            // file, a private one through none; what a private map shows of
            // a shared write depends on which came first, so it is not checked.
            let want_visible = match (a.mode, b.mode) {
                (b"shared", b"shared" | b"ro") => true,
                (b"private", _) => false,
                _ => continue,
            };
            // SAFETY: reading region b's first page.
            let seen = unsafe { ((b.gpa + FILE_TAG_AT + 8 * i as u64) as *const u64).read_volatile() };
            if (seen == FILE_TAG | i as u64) != want_visible {
                out.fail().s("region ").dec(i as u64).s("'s write is ");
                out.detail.s(if want_visible { "not " } else { "" }).s("visible through region ").dec(j as u64);
                out.detail.s(" of the same file (found ").hex(seen).s(")");
                return out;
            }
            coherent += 1;
        }
    }
    out.count("ro_faults", ro_faults).count("same_file_checks", coherent);
    out
}

/// Pages the kernel touches from ring 0 at boot when asked.
const KT_BASE: u64 = 12 << 20;
const KT_PAGES: u64 = 256;
static KT_CYCLES: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Ring 0, BSP, before ring 3: if the command line names `kernel-touch`,
/// write one word into each of KT_PAGES fresh pages (on these hosts ring 0
/// is emulated, so each first touch reaches vkvm as an exit, not a uffd
/// event from native code). Kept plain: it runs at ~1 µs per instruction.
pub fn kernel_touch_at_boot(start_info: u64) {
    // SAFETY: the PVH start info and command line are in identity-mapped RAM.
    let cmdline = unsafe {
        if start_info == 0 || (start_info as *const u32).read_volatile() != 0x336e_c578 {
            return;
        }
        ((start_info + 24) as *const u64).read_volatile() // cmdline_paddr
    };
    if cmdline == 0 || cmdline >= 1 << 32 || !contains(cmdline, b"kernel-touch") {
        return;
    }
    let t0 = rdtsc();
    let mut a = KT_BASE;
    while a < KT_BASE + KT_PAGES * 4096 {
        // SAFETY: RAM below the test arena's use of it; ring 3 checks it later.
        unsafe { (a as *mut u64).write_volatile(a ^ 0x6b74) };
        a += 4096;
    }
    KT_CYCLES.store(rdtsc() - t0 + 1, Ordering::Relaxed);
}

fn contains(s: u64, needle: &[u8]) -> bool {
    let mut i = 0;
    loop {
        // SAFETY: a NUL-terminated command line (bounded to 4 KiB).
        let c = unsafe { ((s + i) as *const u8).read_volatile() };
        if c == 0 || i > 4096 {
            return false;
        }
        let mut k = 0;
        while k < needle.len() && unsafe { ((s + i + k as u64) as *const u8).read_volatile() } == needle[k] {
            k += 1;
        }
        if k == needle.len() {
            return true;
        }
        i += 1;
    }
}

fn kernel_touch(_ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    let cycles = KT_CYCLES.load(Ordering::Relaxed);
    if cycles == 0 {
        out.fail().s("the kernel did not touch its pages at boot");
        return out;
    }
    for p in 0..KT_PAGES {
        let a = KT_BASE + p * 4096;
        // SAFETY: the pages the kernel wrote.
        let v = unsafe { (a as *const u64).read_volatile() };
        if v != a ^ 0x6b74 {
            out.fail().s("first wrong address ").hex(a).s(" expected ").hex(a ^ 0x6b74).s(" found ").hex(v);
            return out;
        }
    }
    out.count("pages", KT_PAGES).count("cycles_per_page", cycles / KT_PAGES);
    out
}

/// `clone-mib` (default 16) MiB of the arena, for the clone tests.
fn clone_region(ctx: &Ctx) -> (u64, u64) {
    let mib = ctx.opt(b"clone-mib").and_then(parse_u64).unwrap_or(16);
    (ctx.arena_start, (ctx.arena_start + (mib << 20)).min(ctx.arena_end))
}

/// CLONE: 0 in the parent, the clone's number (1..) in a clone.
pub(crate) fn clone_vm(ctx: &Ctx, out: &mut Outcome) -> Option<u64> {
    if !platform::is_vkvm() {
        out.fail().s("needs vkvm's CLONE hypercall");
        return None;
    }
    let r = hypercall(ctx.cpu, abi::nr::CLONE, &[]);
    if r < 0 {
        out.fail().s("CLONE failed: -").dec(r.unsigned_abs());
        return None;
    }
    Some(r as u64)
}

/// Fill a region, clone, then every VM (parent 0, clones 1..) writes its own
/// pattern over the first half and checks: the first half holds its own
/// data (a clone's or the parent's writes never show through), the second
/// half still holds the data from before the clone (read-shared pages).
fn cow_clone(ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    let (start, end) = clone_region(ctx);
    let mid = start + (((end - start) / 2) & !0xfff);
    for a in (start..end).step_by(8) {
        // SAFETY: arena memory reserved for tests.
        unsafe { (a as *mut u64).write_volatile(pattern(a, ctx.seed)) };
    }
    let Some(me) = clone_vm(ctx, &mut out) else { return out };
    let mine = ctx.seed ^ ((me + 1) << 40);
    for a in (start..mid).step_by(8) {
        // SAFETY: as above.
        unsafe { (a as *mut u64).write_volatile(pattern(a, mine)) };
    }
    // Give the other VMs time to write theirs, so a leak would show
    // (`clone-wait=M`: millions of TSC cycles, default 200).
    let wait = ctx.opt(b"clone-wait").and_then(parse_u64).unwrap_or(200).saturating_mul(1_000_000);
    let t0 = rdtsc();
    while rdtsc() - t0 < wait {
        core::hint::spin_loop();
    }
    for a in (start..end).step_by(8) {
        let want = pattern(a, if a < mid { mine } else { ctx.seed });
        // SAFETY: as above.
        let found = unsafe { (a as *const u64).read_volatile() };
        if found != want {
            out.fail()
                .s("vm ")
                .dec(me)
                .s(": first wrong address ")
                .hex(a)
                .s(" expected ")
                .hex(want)
                .s(" found ")
                .hex(found);
            break;
        }
    }
    out.count("vm", me).count("pages_written", (mid - start) / 4096).count("pages_shared", (end - mid) / 4096);
    out
}

/// This VM's number after `clone` (0: the VM vkvm booted, or no clone yet).
static VM_SALT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// `clone`: clone the VM (`--clones N` clones); the tests after it run in
/// every VM, each with its own seed, so a write leaking between VMs shows as
/// a wrong value.
fn clone_first(ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    let Some(me) = clone_vm(ctx, &mut out) else { return out };
    VM_SALT.store(me, Ordering::Relaxed);
    out.count("vm", me);
    out
}

/// Touch the region (so the parent has it resident), then clone; vkvm
/// reports the clone time in its stats.
fn clone_bench(ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    let (start, end) = clone_region(ctx);
    for a in (start..end).step_by(4096) {
        // SAFETY: as above.
        unsafe { (a as *mut u64).write_volatile(a) };
    }
    let t0 = rdtsc();
    let Some(me) = clone_vm(ctx, &mut out) else { return out };
    out.count("vm", me).count("pages", (end - start) / 4096).count("clone_cycles", rdtsc() - t0);
    out
}

fn hang(_ctx: &Ctx) -> Outcome {
    loop {
        core::hint::spin_loop();
    }
}

/// A guest that tries to exhaust its host: CLONE far past `--max-clones`
/// (`hostile-clones=N`, default 1000; first clones that stay alive until
/// the parent is refused, so the cap is reached, then clones that exit at
/// once), a REPORT flood
/// over many test names (`hostile-reports`), unknown hypercalls
/// (`hostile-calls`) and reads/writes of an unbacked address
/// (`hostile-mmio`). Every answer must be the documented one: CLONE 0 or
/// -EAGAIN, REPORT 0, unknown -ENOSYS, an unbacked read all ones.
fn hostile(ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    if !platform::is_vkvm() {
        out.fail().s("needs vkvm's hypercalls");
        return out;
    }
    let knob = |k: &[u8], d: u64| ctx.opt(k).and_then(parse_u64).unwrap_or(d);
    let (clones, reports, calls, mmio) =
        (knob(b"hostile-clones", 1000), knob(b"hostile-reports", 0), knob(b"hostile-calls", 0), knob(b"hostile-mmio", 0));
    // Clones made before the first refusal wait for it: on a flag in the
    // first shared --map-file region if there is one (clones share it with
    // the parent), else for `hostile-hold` TSC cycles; at most that long.
    let flag = shared_region(ctx).map(|(gpa, _)| gpa as *mut u64);
    let hold = knob(b"hostile-hold", if flag.is_some() { 60_000_000_000 } else { 4_000_000_000 });
    if let Some(f) = flag {
        // SAFETY: the first word of a writable region vkvm mapped for us.
        unsafe { f.write_volatile(0) };
    }
    let c = ctx.cpu;
    let (mut made, mut refused, mut first_refusal) = (0u64, 0u64, u64::MAX);
    for i in 0..clones {
        let r = hypercall(c, abi::nr::CLONE, &[]);
        if r > 0 {
            // A clone: until the first refusal, stay alive a while so that
            // the parent reaches the cap; afterwards exit at once.
            if first_refusal == u64::MAX {
                let t0 = rdtsc();
                // SAFETY: as above; the parent sets the flag.
                while rdtsc() - t0 < hold && !flag.is_some_and(|f| unsafe { f.read_volatile() } != 0) {
                    core::hint::spin_loop();
                }
            }
            platform::exit(c, 0);
        } else if r == 0 {
            made += 1;
        } else if r == -abi::EAGAIN {
            refused += 1;
            if first_refusal == u64::MAX {
                first_refusal = i;
                if let Some(f) = flag {
                    // SAFETY: as above: the held clones may exit now.
                    unsafe { f.write_volatile(1) };
                }
            }
            // Let exited clones be reclaimed before the next try.
            let t0 = rdtsc();
            while rdtsc() - t0 < 200_000 {
                core::hint::spin_loop();
            }
        } else {
            out.fail().s("CLONE ").dec(i).s(" answered -").dec(r.unsigned_abs());
            return out;
        }
    }
    for i in 0..reports {
        let mut o = Outcome::new();
        o.count("i", i);
        let mut name = Line::new();
        name.s("hostile-").dec(i % 4096);
        let r = report_raw(c, name.as_bytes(), &o);
        if r != 0 {
            out.fail().s("REPORT ").dec(i).s(" answered -").dec(r.unsigned_abs());
            return out;
        }
    }
    for i in 0..calls {
        let r = hypercall(c, 0x7000 + (i % 0x100) as u16, &[i]);
        if r != -abi::ENOSYS {
            out.fail().s("unknown hypercall answered ").dec(r as u64);
            return out;
        }
    }
    const UNBACKED: u64 = 0xe000_0000;
    for _ in 0..mmio {
        // SAFETY: an address no region backs; vkvm reads it as all ones and drops writes.
        let v = unsafe {
            (UNBACKED as *mut u32).write_volatile(0x1234_5678);
            (UNBACKED as *const u32).read_volatile()
        };
        if v != u32::MAX {
            out.fail().s("unbacked read gave ").hex(v as u64);
            return out;
        }
    }
    out.count("clones", made).count("refused", refused).count("first_refusal", first_refusal);
    out.count("reports", reports).count("calls", calls).count("mmio", mmio);
    out
}

/// The first shared `--map-file` region (gpa, len), from `vkvm.files=`.
fn shared_region(ctx: &Ctx) -> Option<(u64, u64)> {
    ctx.opt(b"vkvm.files")?.split(|&c| c == b',').find_map(|r| {
        let mut f = r.split(|&c| c == b':');
        let (gpa, len, mode) = (f.next().and_then(parse_u64)?, f.next().and_then(parse_u64)?, f.next()?);
        (mode == b"shared").then_some((gpa, len))
    })
}

/// `file-write-hang`: fill every shared `--map-file` region with
/// `pattern(offset, seed)` bytes (the test on the host computes the same),
/// print "file-write-hang: written", then never finish (the host stops vkvm
/// with a signal and checks the file).
fn file_write_hang(ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    let Some(list) = ctx.opt(b"vkvm.files") else {
        out.fail().s("no vkvm.files on the command line (run with --map-file)");
        return out;
    };
    for r in list.split(|&c| c == b',') {
        let mut f = r.split(|&c| c == b':');
        let (Some(gpa), Some(len), Some(mode)) = (f.next().and_then(parse_u64), f.next().and_then(parse_u64), f.next())
        else {
            out.fail().s("malformed vkvm.files entry");
            return out;
        };
        if mode != b"shared" {
            continue;
        }
        for off in (0..len).step_by(8) {
            // SAFETY: a writable region vkvm mapped for us.
            unsafe { ((gpa + off) as *mut u64).write_volatile(pattern(off, ctx.seed)) };
        }
    }
    console_write(ctx.cpu, b"file-write-hang: written\n");
    loop {
        core::hint::spin_loop();
    }
}
