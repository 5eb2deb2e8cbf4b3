//! Guest tests. Each runs in ring 3 and is deterministic for `seed=N`.
//! A failure names the first wrong address, the expected and found values.

use crate::abi::{self, TestReport};
use crate::arch;
use crate::fmt::Line;
use crate::platform::{self, console_write, hypercall, rdtsc};
use core::arch::asm;
use core::sync::atomic::Ordering;

pub struct Test {
    pub name: &'static str,
    pub about: &'static str,
    /// Run on every CPU (each on its own slice) rather than on CPU 0 only.
    pub all_cpus: bool,
    pub run: fn(&Ctx) -> Outcome,
}

pub static ALL: &[Test] = &[
    Test {
        name: "selfcheck",
        about: "write and verify 64 MiB with address-derived values",
        all_cpus: true,
        run: selfcheck,
    },
    Test {
        name: "pio-bench",
        about: "median PIO exit round trip from ring 3 (rdtsc)",
        all_cpus: false,
        run: pio_bench,
    },
    Test {
        name: "bad-hypercall",
        about: "hostile hypercall arguments get error codes",
        all_cpus: false,
        run: bad_hypercall,
    },
    Test {
        name: "fw-cfg",
        about: "read QEMU's fw_cfg (signature, id, cpus, RAM size, files) and report it",
        all_cpus: false,
        run: fw_cfg,
    },
    Test {
        name: "crash",
        about: "ring-3 access to an unmapped address: the kernel reports a crash",
        all_cpus: false,
        run: crash,
    },
    Test {
        name: "triple-fault",
        about: "wreck the IDT and fault: the VM shuts down",
        all_cpus: false,
        run: triple_fault,
    },
    Test { name: "hang", about: "never finish (for --timeout)", all_cpus: false, run: hang },
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
    fn new() -> Self {
        Outcome { pass: true, counters: [("", 0); abi::MAX_COUNTERS], n: 0, detail: Line::new() }
    }
    fn count(&mut self, k: &'static str, v: u64) -> &mut Self {
        if self.n < abi::MAX_COUNTERS {
            self.counters[self.n] = (k, v);
            self.n += 1;
        }
        self
    }
    fn fail(&mut self) -> &mut Line {
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
    pub fn for_cpu(&self, cpu: usize) -> Ctx {
        Ctx { cpu, ..*self }
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

fn parse_u64(s: &[u8]) -> Option<u64> {
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
    copy_str(&mut r.name, name.as_bytes());
    for (i, &(k, v)) in out.counters[..out.n].iter().enumerate() {
        copy_str(&mut r.counter_names[i], k.as_bytes());
        r.counters[i] = v;
    }
    copy_str(&mut r.detail, out.detail.as_bytes());
    hypercall(cpu, abi::nr::REPORT, &[&r as *const _ as u64, abi::TEST_REPORT_SIZE as u64]);
}

fn copy_str(dst: &mut [u8], src: &[u8]) {
    let n = src.len().min(dst.len());
    dst[..n].copy_from_slice(&src[..n]);
}

/// Expected contents of the word at `addr`.
fn pattern(addr: u64, seed: u64) -> u64 {
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

fn hang(_ctx: &Ctx) -> Outcome {
    loop {
        core::hint::spin_loop();
    }
}
