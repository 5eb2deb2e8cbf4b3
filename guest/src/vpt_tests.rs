//! VPAGETABLE torture tests (`tests=vpt-...`). Each builds its own vpte
//! tables in the test arena, points a window at them with `setmap`, and
//! checks what ring 3 sees through the window, through RAM, and in the
//! tables' A/M bits. Faults are caught with the ring-3 probes: vkvm reports
//! a refused window access as #PF with CR2 = the address of the window page
//! and error code P|W|U, plus RSVD (bit 3) when a vpte frame is beyond
//! guest RAM.

use crate::arch::Caught;
use crate::fmt::Line;
use crate::platform::rdtsc;
use crate::tests::{Ctx, Outcome};
use crate::vpt::*;
use core::sync::atomic::{AtomicU64, Ordering};

/// Flags of every directory entry unless a test says otherwise.
const DIR: Vpte = VPTE_V | VPTE_RW;
/// Arena bytes the vpt tests allocate tables and data pages from.
const ARENA: u64 = 8 << 20;

/// A word that names its page: what a correct translation must show.
fn tag(gpa: u64) -> u64 {
    0x7654_0000_0000_0000 ^ gpa
}

struct T<'a> {
    ctx: &'a Ctx,
    r: Region,
    a: Alloc,
}

fn setup<'a>(ctx: &'a Ctx, out: &mut Outcome, index: usize) -> Option<T<'a>> {
    let Some(r) = region(ctx, index) else {
        out.fail().s("no VPAGETABLE window ").dec(index as u64).s(" (vkvm.vpt= missing: run under vkvm)");
        return None;
    };
    // Each window gets its own part of the arena (vpt-levels uses several).
    let start = ctx.arena_start + ARENA * index as u64;
    let end = (start + ARENA).min(ctx.arena_end);
    Some(T { ctx, r, a: Alloc::new(start, end) })
}

impl T<'_> {
    fn cpu(&self) -> usize {
        self.ctx.cpu
    }
    /// A data page whose words all hold `tag` of their address.
    fn data(&mut self, out: &mut Outcome) -> Option<u64> {
        let Some(p) = self.a.page() else {
            out.fail().s("test arena exhausted");
            return None;
        };
        for w in (p..p + PAGE).step_by(8) {
            set_ram(w, tag(w));
        }
        Some(p)
    }
    fn tables(&mut self, out: &mut Outcome) -> Option<Tables> {
        let t = Tables::new(self.r, &mut self.a);
        if t.is_none() {
            out.fail().s("test arena exhausted");
        }
        t
    }
    fn map(&mut self, out: &mut Outcome, t: &Tables, i: u64, frame: u64, flags: Vpte) -> bool {
        if t.map(&mut self.a, i, frame, flags, DIR).is_none() {
            out.fail().s("test arena exhausted");
            return false;
        }
        true
    }
    fn setmap(&self, out: &mut Outcome, master: Vpte) -> bool {
        let rc = setmap(self.cpu(), &self.r, master);
        if rc != 0 {
            out.fail().s("setmap returned -").dec(rc.unsigned_abs());
        }
        rc == 0
    }
    fn inval(&self, out: &mut Outcome, off: u64, len: u64) -> bool {
        let rc = inval(self.cpu(), &self.r, off, len);
        if rc != 0 {
            out.fail().s("inval returned -").dec(rc.unsigned_abs());
        }
        rc == 0
    }
}

fn caught(l: &mut Line, c: &Caught) {
    l.s("vector ").dec(c.vector).s(" at ").hex(c.addr).s(" error ").hex(c.error);
}

/// A read through the window at `va` must give `want`.
fn expect(out: &mut Outcome, cpu: usize, what: &str, va: u64, want: u64) -> bool {
    match read64(cpu, va) {
        Ok(v) if v == want => true,
        Ok(v) => {
            out.fail().s(what).s(": read at ").hex(va).s(" expected ").hex(want).s(" found ").hex(v);
            false
        }
        Err(c) => {
            let l = out.fail();
            l.s(what).s(": read at ").hex(va).s(" faulted: ");
            caught(l, &c);
            false
        }
    }
}

/// The access must have faulted with #PF on `va`'s page, with (or without)
/// RSVD. CR2 holds the page address: KVM brings host pages in by page, so
/// the userfaultfd event (and vkvm) never learn the offset in the page.
fn expect_pf(out: &mut Outcome, what: &str, va: u64, r: Result<u64, Caught>, rsvd: bool) -> bool {
    match r {
        Ok(v) => {
            out.fail().s(what).s(": access at ").hex(va).s(" did not fault (read ").hex(v).s(")");
            false
        }
        Err(c) if c.vector == 14 && c.addr == va & !(PAGE - 1) && (c.error & PF_RSVD != 0) == rsvd => true,
        Err(c) => {
            let l = out.fail();
            l.s(what).s(": expected #PF at ").hex(va).s(if rsvd { " with RSVD" } else { " without RSVD" }).s(", got ");
            caught(l, &c);
            false
        }
    }
}

/// `vpt-linear`: PS in the master maps the window linearly onto RAM from
/// frame F (no alignment asked); PS at level k maps a 512^(levels-k)-page
/// block; with two level-(levels-1) blocks each goes to its own frame.
pub fn linear(ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    let Some(mut s) = setup(ctx, &mut out, 0) else { return out };
    let cpu = ctx.cpu;
    // Eight contiguous data pages starting at an odd frame.
    let _ = s.a.page();
    let Some(d) = s.data(&mut out) else { return out };
    for _ in 1..8 {
        if s.data(&mut out).is_none() {
            return out;
        }
    }
    let f = d / PAGE;
    let mut cases = 0;
    // PS in the master: window page i -> frame f + i.
    if !s.setmap(&mut out, vpte_make(f, VPTE_V | VPTE_RW | VPTE_PS)) {
        return out;
    }
    for i in 0..8 {
        if !expect(&mut out, cpu, "master PS", s.r.va(i) + 8 * i, tag(d + i * PAGE + 8 * i)) {
            return out;
        }
    }
    // Write through the window, read back through RAM.
    if let Err(c) = write64(cpu, s.r.va(3) + 16, 0x5151) {
        caught(out.fail().s("master PS: write faulted: "), &c);
        return out;
    }
    if ram(d + 3 * PAGE + 16) != 0x5151 {
        out.fail().s("master PS: a window write did not reach RAM at ").hex(d + 3 * PAGE + 16);
        return out;
    }
    cases += 1;
    // PS at level k (1..levels-1): block 0 of that level maps linearly.
    for k in 1..s.r.levels {
        let Some(t) = s.tables(&mut out) else { return out };
        let Some(slot) = t.slot(&mut s.a, 0, k, DIR) else {
            out.fail().s("test arena exhausted");
            return out;
        };
        ent(slot).store(vpte_make(f, VPTE_V | VPTE_RW | VPTE_PS), Ordering::Release);
        // The last-but-one level has 2 MiB blocks: block 1 goes to f + 4.
        let two = k == s.r.levels - 1 && s.r.pages() > 512 + 4;
        if two {
            let Some(slot) = t.slot(&mut s.a, 512, k, DIR) else {
                out.fail().s("test arena exhausted");
                return out;
            };
            ent(slot).store(vpte_make(f + 4, VPTE_V | VPTE_RW | VPTE_PS), Ordering::Release);
        }
        if !s.setmap(&mut out, t.master(VPTE_V | VPTE_RW)) {
            return out;
        }
        for i in 0..4 {
            set_ram(d + i * PAGE, tag(d + i * PAGE) ^ k as u64);
            if !expect(&mut out, cpu, "level PS", s.r.va(i), tag(d + i * PAGE) ^ k as u64) {
                return out;
            }
            if two && !expect(&mut out, cpu, "level PS block 1", s.r.va(512 + i) + 8, tag(d + (4 + i) * PAGE + 8)) {
                return out;
            }
        }
        cases += 1;
    }
    out.count("levels", s.r.levels as u64).count("cases", cases);
    out
}

/// `vpt-levels`: a 2-, 3- and 4-level window each translates two pages
/// through full walks; edits off the path (a neighbour leaf, a sibling
/// directory) change nothing even after inval; an on-path edit does.
pub fn levels(ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    let mut seen = [false; 5];
    let mut idx = 0;
    while let Some(r) = region(ctx, idx) {
        idx += 1;
        if seen[r.levels as usize] || r.levels < 2 {
            continue;
        }
        seen[r.levels as usize] = true;
        let Some(mut s) = setup(ctx, &mut out, idx - 1) else { return out };
        let cpu = ctx.cpu;
        let Some(t) = s.tables(&mut out) else { return out };
        let (Some(d1), Some(d2)) = (s.data(&mut out), s.data(&mut out)) else { return out };
        let i1 = s.r.pages() - 3;
        let i2 = 5;
        if !s.map(&mut out, &t, i1, d1 / PAGE, VPTE_V | VPTE_RW) || !s.map(&mut out, &t, i2, d2 / PAGE, VPTE_V) {
            return out;
        }
        if !s.setmap(&mut out, t.master(VPTE_V | VPTE_RW)) {
            return out;
        }
        if !expect(&mut out, cpu, "walk", s.r.va(i1) + 8, tag(d1 + 8))
            || !expect(&mut out, cpu, "walk", s.r.va(i2), tag(d2))
        {
            return out;
        }
        // Off the path: the neighbour leaf and a sibling level-1 entry.
        if !s.map(&mut out, &t, i1 - 1, d2 / PAGE, VPTE_V | VPTE_RW) {
            return out;
        }
        let sib = (t.index(i1, 1) + 1) & VPTE_PAGE_MASK;
        ent(t.root + sib * 8).store(vpte_make(d2 / PAGE, VPTE_V | VPTE_PS), Ordering::Release);
        if !s.inval(&mut out, 0, s.r.len) {
            return out;
        }
        if !expect(&mut out, cpu, "off-path edit", s.r.va(i1) + 8, tag(d1 + 8))
            || !expect(&mut out, cpu, "off-path edit", s.r.va(i2), tag(d2))
            || !expect(&mut out, cpu, "neighbour", s.r.va(i1 - 1), tag(d2))
        {
            return out;
        }
        // On the path: the leaf of i1 now points at d2 (after inval).
        if !s.map(&mut out, &t, i1, d2 / PAGE, VPTE_V | VPTE_RW) || !s.inval(&mut out, i1 * PAGE, PAGE) {
            return out;
        }
        if !expect(&mut out, cpu, "on-path edit", s.r.va(i1) + 8, tag(d2 + 8)) {
            return out;
        }
    }
    let missing: [u32; 3] = [2, 3, 4];
    if let Some(l) = missing.iter().find(|&&l| !seen[l as usize]) {
        out.fail().s("no ").dec(*l as u64).s("-level window: run with --vpt-region GPA,SIZE,levels=2 (3, 4)");
        return out;
    }
    out.count("windows", idx as u64).count("walk_levels", 3);
    out
}

/// `vpt-alias`: window pages 10 and 11 both map backing page P; then a
/// SETMAP to new tables (no INVAL) moves page 10 to another page.
pub fn alias(ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    let Some(mut s) = setup(ctx, &mut out, 0) else { return out };
    let cpu = ctx.cpu;
    let Some(t) = s.tables(&mut out) else { return out };
    let Some(p) = s.data(&mut out) else { return out };
    for i in [10, 11] {
        if !s.map(&mut out, &t, i, p / PAGE, VPTE_V | VPTE_RW) {
            return out;
        }
    }
    if !s.setmap(&mut out, t.master(VPTE_V | VPTE_RW)) {
        return out;
    }
    let x = 0xa11a_5000_0000_0001 ^ ctx.seed;
    if let Err(c) = write64(cpu, s.r.va(10) + 24, x) {
        caught(out.fail().s("write through page 10 faulted: "), &c);
        return out;
    }
    if !expect(&mut out, cpu, "alias read via page 11", s.r.va(11) + 24, x) {
        return out;
    }
    if ram(p + 24) != x {
        out.fail().s("RAM at ").hex(p + 24).s(" expected ").hex(x).s(" found ").hex(ram(p + 24));
        return out;
    }
    let y = x.rotate_left(7);
    set_ram(p + 32, y);
    if !expect(&mut out, cpu, "RAM write via page 10", s.r.va(10) + 32, y)
        || !expect(&mut out, cpu, "RAM write via page 11", s.r.va(11) + 32, y)
    {
        return out;
    }
    // SETMAP alone drops the window's translations: new tables send page 10
    // to another page, with no INVAL.
    let Some(t2) = s.tables(&mut out) else { return out };
    let Some(q) = s.data(&mut out) else { return out };
    if !s.map(&mut out, &t2, 10, q / PAGE, VPTE_V | VPTE_RW) || !s.setmap(&mut out, t2.master(VPTE_V | VPTE_RW)) {
        return out;
    }
    if !expect(&mut out, cpu, "after setmap", s.r.va(10) + 24, tag(q + 24)) {
        return out;
    }
    out.count("aliases", 3).count("setmap_remaps", 1);
    out
}

/// `vpt-ro`: RW clear at one level (master, 1, ..., leaf): a read works, a
/// write faults at the window address, writes nothing and sets no M. With
/// a read-only directory above an RW|M leaf the write must fault too (RW is
/// combined across levels, not taken from the leaf).
pub fn ro(ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    let Some(mut s) = setup(ctx, &mut out, 0) else { return out };
    let cpu = ctx.cpu;
    let levels = s.r.levels;
    for k in 0..=levels {
        let Some(t) = s.tables(&mut out) else { return out };
        let Some(p) = s.data(&mut out) else { return out };
        let i = 20 + k as u64;
        let leaf = if k == levels { VPTE_V } else { VPTE_V | VPTE_RW | VPTE_M };
        if !s.map(&mut out, &t, i, p / PAGE, leaf) {
            return out;
        }
        if (1..levels).contains(&k) {
            if let Some(sl) = t.find(i, k) {
                ent(sl).fetch_and(!VPTE_RW, Ordering::AcqRel);
            }
        }
        let master = if k == 0 { t.master(VPTE_V) } else { t.master(VPTE_V | VPTE_RW) };
        if !s.setmap(&mut out, master) {
            return out;
        }
        let va = s.r.va(i) + 8;
        if !expect(&mut out, cpu, "read-only read", va, tag(p + 8)) {
            return out;
        }
        if !expect_pf(&mut out, "read-only write", va, write64(cpu, va, 0xdead).map(|_| 0), false) {
            out.detail.s(" (RW clear at level ").dec(k as u64).s(")");
            return out;
        }
        if ram(p + 8) != tag(p + 8) {
            out.fail().s("a refused write changed RAM at ").hex(p + 8);
            return out;
        }
        let path = t.path(i);
        for (lvl, &e) in path.iter().enumerate().take(levels as usize) {
            let preset = lvl + 1 == levels as usize && leaf & VPTE_M != 0;
            if e & VPTE_M != 0 && !preset {
                out.fail().s("M set at level ").dec(lvl as u64 + 1).s(" by a refused write: ").hex(e);
                return out;
            }
        }
    }
    out.count("levels_checked", levels as u64 + 1);
    out
}

/// `vpt-invalid`: a fresh window faults; V clear in the master or at any
/// level faults (no RSVD) on read and write, and the invalid entry is left
/// exactly as written (no A/M).
pub fn invalid(ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    let Some(mut s) = setup(ctx, &mut out, 0) else { return out };
    let cpu = ctx.cpu;
    // Hostile arguments get error codes (and change nothing).
    let (e_inval, e_fault) = (-crate::abi::EINVAL, -crate::abi::EFAULT);
    let bad = Region { index: 99, ..s.r };
    let huge = Region { index: u64::MAX, ..s.r };
    let checks: [(&str, i64, i64); 8] = [
        ("setmap bad region", setmap(cpu, &bad, VPTE_V), e_inval),
        ("setmap region -1", setmap(cpu, &huge, VPTE_V), e_inval),
        ("inval bad region", inval(cpu, &bad, 0, PAGE), e_inval),
        ("inval len 0", inval(cpu, &s.r, 0, 0), e_inval),
        ("inval unaligned", inval(cpu, &s.r, 1, PAGE), e_inval),
        ("inval past the end", inval(cpu, &s.r, s.r.len, PAGE), e_fault),
        ("inval too long", inval(cpu, &s.r, 0, s.r.len + PAGE), e_fault),
        ("inval wrapping", inval(cpu, &s.r, !(PAGE - 1), 2 * PAGE), e_fault),
    ];
    for (what, got, want) in checks {
        if got != want {
            out.fail().s(what).s(": got ").hex(got as u64).s(" expected ").hex(want as u64);
            return out;
        }
    }
    let mut fresh = 0;
    if !SETMAP_CALLED.load(Ordering::Relaxed) {
        if !expect_pf(&mut out, "fresh window", s.r.gpa, read64(cpu, s.r.gpa), false) {
            return out;
        }
        fresh = 1;
    }
    if !s.setmap(&mut out, 0) || !expect_pf(&mut out, "master 0", s.r.va(1), read64(cpu, s.r.va(1)), false) {
        return out;
    }
    let levels = s.r.levels;
    for k in 0..=levels {
        let Some(t) = s.tables(&mut out) else { return out };
        let Some(p) = s.data(&mut out) else { return out };
        let i = 30 + k as u64;
        if !s.map(&mut out, &t, i, p / PAGE, VPTE_V | VPTE_RW) {
            return out;
        }
        let mut slot = None;
        if k > 0 {
            slot = t.find(i, k);
            if let Some(sl) = slot {
                ent(sl).fetch_and(!VPTE_V, Ordering::AcqRel);
            }
        }
        let master = if k == 0 { t.master(VPTE_RW) } else { t.master(VPTE_V | VPTE_RW) };
        let before = slot.map(|sl| ent(sl).load(Ordering::Acquire));
        if !s.setmap(&mut out, master) {
            return out;
        }
        let va = s.r.va(i);
        if !expect_pf(&mut out, "V clear, read", va, read64(cpu, va), false)
            || !expect_pf(&mut out, "V clear, write", va, write64(cpu, va, 1).map(|_| 0), false)
        {
            out.detail.s(" (level ").dec(k as u64).s(")");
            return out;
        }
        if let (Some(sl), Some(b)) = (slot, before) {
            let now = ent(sl).load(Ordering::Acquire);
            if now != b {
                out.fail().s("invalid entry at level ").dec(k as u64).s(" changed from ").hex(b).s(" to ").hex(now);
                return out;
            }
        }
    }
    out.count("fresh_fault", fresh)
        .count("levels_checked", levels as u64 + 1)
        .count("hostile_args", checks.len() as u64);
    out
}

/// `vpt-am`: A and M as DESIGN decides: a read sets A on every path entry
/// and maps read-only unless the leaf has RW|M; the first write faults
/// again and sets M|A everywhere; after the guest clears M, writes do not
/// fault (M stays clear) until inval, then the next write sets M again.
pub fn am(ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    let Some(mut s) = setup(ctx, &mut out, 0) else { return out };
    let cpu = ctx.cpu;
    let levels = s.r.levels as usize;
    let Some(t) = s.tables(&mut out) else { return out };
    let (Some(p), Some(q)) = (s.data(&mut out), s.data(&mut out)) else { return out };
    let (i, j) = (40, 41);
    if !s.map(&mut out, &t, i, p / PAGE, VPTE_V | VPTE_RW)
        || !s.map(&mut out, &t, j, q / PAGE, VPTE_V | VPTE_RW | VPTE_M)
    {
        return out;
    }
    if !s.setmap(&mut out, t.master(VPTE_V | VPTE_RW)) {
        return out;
    }
    let check = |out: &mut Outcome, what: &str, page: u64, want: Vpte, unwanted: Vpte| -> bool {
        for (lvl, &e) in t.path(page).iter().enumerate().take(levels) {
            if e & want != want || e & unwanted != 0 {
                out.fail().s(what).s(": level ").dec(lvl as u64 + 1).s(" entry ").hex(e);
                return false;
            }
        }
        true
    };
    let leaf = |page: u64| t.find(page, levels as u32).map(ent);
    let (Some(li), Some(lj)) = (leaf(i), leaf(j)) else {
        out.fail().s("tables not built");
        return out;
    };
    // 1. A read: A everywhere, no M.
    if !expect(&mut out, cpu, "read", s.r.va(i), tag(p)) || !check(&mut out, "after a read", i, VPTE_A, VPTE_M) {
        return out;
    }
    // 2. The first write faults (read-only mapping) and sets M|A.
    li.fetch_and(!VPTE_A, Ordering::AcqRel);
    if let Err(c) = write64(cpu, s.r.va(i), 1) {
        caught(out.fail().s("write faulted: "), &c);
        return out;
    }
    if !check(&mut out, "after a write", i, VPTE_A | VPTE_M, 0) {
        return out;
    }
    // 3. Clear M: writes stay mapped, M stays clear until inval.
    li.fetch_and(!VPTE_M, Ordering::AcqRel);
    let _ = write64(cpu, s.r.va(i) + 8, 2);
    if li.load(Ordering::Acquire) & VPTE_M != 0 {
        out.fail().s("M re-set without inval (the write should not have faulted)");
        return out;
    }
    if !s.inval(&mut out, i * PAGE, PAGE) {
        return out;
    }
    let _ = write64(cpu, s.r.va(i) + 16, 3);
    if li.load(Ordering::Acquire) & (VPTE_M | VPTE_A) != VPTE_M | VPTE_A {
        out.fail().s("M not re-set after clear + inval + write: leaf ").hex(li.load(Ordering::Acquire));
        return out;
    }
    if ram(p) != 1 || ram(p + 8) != 2 || ram(p + 16) != 3 {
        out.fail().s("window writes missing from RAM at ").hex(p);
        return out;
    }
    // 4. A leaf with RW|M maps writable on a read: a later write does not
    // fault, so A (cleared after the read) stays clear.
    if !expect(&mut out, cpu, "read RW|M", s.r.va(j), tag(q)) {
        return out;
    }
    if lj.load(Ordering::Acquire) & VPTE_A == 0 {
        out.fail().s("A not set by a read of an RW|M leaf");
        return out;
    }
    lj.fetch_and(!VPTE_A, Ordering::AcqRel);
    let _ = write64(cpu, s.r.va(j), 4);
    if lj.load(Ordering::Acquire) & VPTE_A != 0 {
        out.fail().s("a write after a read of an RW|M leaf faulted again (A re-set)");
        return out;
    }
    out.count("checks", 6);
    out
}

static INV_READY: AtomicU64 = AtomicU64::new(0);
static INV_EPOCH: AtomicU64 = AtomicU64::new(0);
static INV_DONE: AtomicU64 = AtomicU64::new(0);
static INV_ACK: AtomicU64 = AtomicU64::new(0);
static INV_VA: AtomicU64 = AtomicU64::new(0);
/// The newest round the reader has seen (the writer waits a little for it,
/// so that the reader's own faults race the next remap + inval).
static INV_SEEN: AtomicU64 = AtomicU64::new(0);
/// How long the writer waits for the reader each round, in TSC cycles.
const INV_WAIT: u64 = 2_000_000;
/// Backing pages the writer cycles through.
const POOL: u64 = 64;

/// `vpt-inval`: CPU 0 repeatedly writes round k into a fresh backing page,
/// points window page 50 at it, calls inval and only then publishes k;
/// CPU 1 reads the published round e, then the window: it must see a page
/// of round >= e (a page of an older round is a stale translation). CPU 0
/// mostly waits for CPU 1 to fault the new page in, so CPU 1's faults race
/// the edits and invals; every 8th round CPU 0 reads the window itself.
pub fn inval_race(ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    let rounds = ctx.opt(b"vpt-rounds").and_then(crate::tests::parse_u64).unwrap_or(400).max(1);
    match ctx.cpu {
        0 => inval_writer(ctx, rounds, &mut out),
        1 => inval_reader(ctx, rounds, &mut out),
        _ => {}
    }
    out
}

fn inval_writer(ctx: &Ctx, rounds: u64, out: &mut Outcome) {
    let Some(mut s) = setup(ctx, out, 0) else { return };
    let Some(t) = s.tables(out) else { return };
    let Some(pool) = s.data(out) else { return };
    for _ in 1..POOL {
        if s.data(out).is_none() {
            return;
        }
    }
    set_ram(pool, 0);
    let i = 50;
    if !s.map(out, &t, i, pool / PAGE, VPTE_V | VPTE_RW | VPTE_A | VPTE_M) || !s.setmap(out, t.master(DIR)) {
        return;
    }
    let Some(leaf) = t.find(i, s.r.levels).map(ent) else { return };
    INV_EPOCH.store(0, Ordering::Release);
    INV_SEEN.store(0, Ordering::Release);
    INV_DONE.store(0, Ordering::Release);
    INV_VA.store(s.r.va(i), Ordering::Release);
    INV_READY.store(1, Ordering::Release);
    let (mut own_stale, mut own_reads) = (0, 0);
    for k in 1..=rounds {
        let page = pool + (k % POOL) * PAGE;
        set_ram(page, k);
        leaf.store(vpte_make(page / PAGE, VPTE_V | VPTE_RW | VPTE_A | VPTE_M), Ordering::Release);
        if !s.inval(out, i * PAGE, PAGE) {
            break;
        }
        INV_EPOCH.store(k, Ordering::Release);
        if ctx.ncpus > 1 && k % 8 != 0 {
            // Let the reader fault the new page in (its fault then races
            // the next round's edit + inval).
            let t0 = rdtsc();
            while INV_SEEN.load(Ordering::Acquire) < k && rdtsc().wrapping_sub(t0) < INV_WAIT {
                core::hint::spin_loop();
            }
            continue;
        }
        // The writer's own read right after inval must see round k.
        own_reads += 1;
        match read64(ctx.cpu, s.r.va(i)) {
            Ok(v) if v == k => {}
            Ok(v) => {
                own_stale += 1;
                if out.pass {
                    out.fail().s("cpu 0 read round ").dec(v).s(" after inval of round ").dec(k);
                }
            }
            Err(c) => {
                caught(out.fail().s("window read faulted: "), &c);
                break;
            }
        }
    }
    INV_DONE.store(1, Ordering::Release);
    // Wait for the reader (if any) before the next run may reuse the flags.
    let t0 = rdtsc();
    while ctx.ncpus > 1 && INV_ACK.load(Ordering::Acquire) == 0 && rdtsc().wrapping_sub(t0) < 20_000_000_000 {
        core::hint::spin_loop();
    }
    INV_READY.store(0, Ordering::Release);
    INV_ACK.store(0, Ordering::Release);
    out.count("rounds", rounds).count("stale", own_stale).count("self_reads", own_reads);
}

fn inval_reader(_ctx: &Ctx, rounds: u64, out: &mut Outcome) {
    let t0 = rdtsc();
    while INV_READY.load(Ordering::Acquire) == 0 {
        if rdtsc().wrapping_sub(t0) > 20_000_000_000 {
            out.fail().s("cpu 0 never set up the window");
            return;
        }
        core::hint::spin_loop();
    }
    let va = INV_VA.load(Ordering::Acquire);
    let (mut reads, mut stale, mut newest, mut changes) = (0u64, 0u64, 0u64, 0u64);
    while INV_DONE.load(Ordering::Acquire) == 0 {
        let e = INV_EPOCH.load(Ordering::Acquire);
        // SAFETY: the window page is always mapped to a valid page by cpu 0.
        let v = unsafe { (va as *const u64).read_volatile() };
        reads += 1;
        if v != newest {
            changes += 1;
        }
        newest = newest.max(v);
        INV_SEEN.store(newest, Ordering::Release);
        if v < e || v > rounds {
            stale += 1;
            if out.pass {
                out.fail().s("stale translation: read round ").dec(v).s(" after inval of round ").dec(e).s(" returned");
            }
        }
    }
    INV_ACK.store(1, Ordering::Release);
    // `changes`: how many new translations this CPU saw (one per remap it caught).
    out.count("reads", reads).count("stale", stale).count("newest", newest).count("changes", changes);
}

/// `vpt-bounds`: a leaf or directory frame at or beyond the end of guest
/// RAM, and a linear map running off its end, fault with RSVD set; an
/// invalid vpte in the same window faults without it.
pub fn bounds(ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    let Some(mut s) = setup(ctx, &mut out, 0) else { return out };
    let cpu = ctx.cpu;
    let n = s.r.obj_pages;
    let Some(t) = s.tables(&mut out) else { return out };
    let Some(p) = s.data(&mut out) else { return out };
    let cases: [(u64, u64); 3] = [(60, n), (61, n + 5), (62, VPTE_FRAME >> 12)];
    for (i, frame) in cases {
        if !s.map(&mut out, &t, i, frame, VPTE_V | VPTE_RW) {
            return out;
        }
    }
    if !s.map(&mut out, &t, 63, p / PAGE, VPTE_V | VPTE_RW) || !s.map(&mut out, &t, 64, p / PAGE, VPTE_RW) {
        return out;
    }
    if !s.setmap(&mut out, t.master(DIR)) {
        return out;
    }
    for (i, _) in cases {
        let va = s.r.va(i);
        if !expect_pf(&mut out, "frame beyond RAM, read", va, read64(cpu, va), true)
            || !expect_pf(&mut out, "frame beyond RAM, write", va, write64(cpu, va, 1).map(|_| 0), true)
        {
            return out;
        }
    }
    if !expect(&mut out, cpu, "in-bounds neighbour", s.r.va(63), tag(p))
        || !expect_pf(&mut out, "invalid vpte", s.r.va(64), read64(cpu, s.r.va(64)), false)
    {
        return out;
    }
    // A directory entry pointing beyond RAM (a table that cannot exist).
    let Some(t2) = s.tables(&mut out) else { return out };
    ent(t2.root).store(vpte_make(n + 1, DIR), Ordering::Release);
    if !s.setmap(&mut out, t2.master(DIR))
        || !expect_pf(&mut out, "table beyond RAM", s.r.va(0), read64(cpu, s.r.va(0)), true)
    {
        return out;
    }
    // Linear from the last two RAM pages: the third window page is beyond.
    if !s.setmap(&mut out, vpte_make(n - 2, VPTE_V | VPTE_RW | VPTE_PS)) {
        return out;
    }
    let last = (n - 1) * PAGE;
    if !expect(&mut out, cpu, "last RAM page", s.r.va(1), ram(last))
        || !expect_pf(&mut out, "linear past RAM", s.r.va(2), read64(cpu, s.r.va(2)), true)
    {
        return out;
    }
    out.count("obj_pages", n).count("rsvd_faults", 2 * cases.len() as u64 + 2);
    out
}

/// Window pages `clone-mix` maps onto data pages (and again, as aliases, at
/// `MIX + i`).
const MIX: u64 = 64;

/// `clone-mix`: a VM clones itself while a window maps part of its RAM (and,
/// with `--phys-mem`, while pages are out in swap); then every VM (parent 0,
/// clones 1..) writes its own data over half the data pages, alternately
/// through the window and through RAM, remaps one window page in its own
/// tables, and checks that it sees only its own writes through RAM, the
/// window and the aliases; the pre-clone data where nobody wrote; M set in
/// its own leaves only where it wrote through the window; and a bulk region
/// written before the clone (`mix-mib`, default 64 MiB: pageout under a
/// small budget) intact.
pub fn clone_mix(ctx: &Ctx) -> Outcome {
    let mut out = Outcome::new();
    let Some(mut s) = setup(ctx, &mut out, 0) else { return out };
    let cpu = ctx.cpu;
    let Some(t) = s.tables(&mut out) else { return out };
    let mut data = [0u64; MIX as usize];
    for (i, d) in data.iter_mut().enumerate() {
        let Some(p) = s.data(&mut out) else { return out };
        *d = p;
        let i = i as u64;
        if !s.map(&mut out, &t, i, p / PAGE, VPTE_V | VPTE_RW) || !s.map(&mut out, &t, MIX + i, p / PAGE, VPTE_V | VPTE_RW)
        {
            return out;
        }
    }
    if !s.setmap(&mut out, t.master(DIR)) {
        return out;
    }
    // Translations exist before the clone: a stale one would show later.
    for (i, &d) in data.iter().enumerate() {
        if !expect(&mut out, cpu, "before the clone", s.r.va(i as u64), tag(d)) {
            return out;
        }
    }
    let mib = ctx.opt(b"mix-mib").and_then(crate::tests::parse_u64).unwrap_or(64);
    let bulk = ctx.arena_start + 3 * ARENA;
    let bulk_end = (bulk + (mib << 20)).min(ctx.arena_end);
    for a in (bulk..bulk_end).step_by(PAGE as usize) {
        set_ram(a, crate::tests::pattern(a, ctx.seed));
    }
    let Some(me) = crate::tests::clone_vm(ctx, &mut out) else { return out };
    let mine = |a: u64| tag(a) ^ ((me + 1) << 48);
    let half = MIX / 2;
    for (i, &d) in data.iter().enumerate().take(half as usize) {
        for w in (0..PAGE).step_by(8) {
            if i % 2 == 0 {
                // SAFETY: window page i is mapped writable onto d (checked above).
                unsafe { ((s.r.va(i as u64) + w) as *mut u64).write_volatile(mine(d + w)) };
            } else {
                set_ram(d + w, mine(d + w));
            }
        }
    }
    // A table edit after the clone: window page 0 moves to a page of this VM's.
    let Some(fresh) = s.data(&mut out) else { return out };
    set_ram(fresh, mine(fresh));
    if !s.map(&mut out, &t, 0, fresh / PAGE, VPTE_V | VPTE_RW) || !s.inval(&mut out, 0, PAGE) {
        return out;
    }
    // Give the other VMs time to write theirs, so that a leak would show.
    let t0 = crate::platform::rdtsc();
    while crate::platform::rdtsc() - t0 < 200_000_000 {
        core::hint::spin_loop();
    }
    if !expect(&mut out, cpu, "remapped page 0", s.r.va(0), mine(fresh)) {
        return out;
    }
    for (i, &d) in data.iter().enumerate() {
        let i = i as u64;
        let want = |a: u64| if i < half { mine(a) } else { tag(a) };
        for w in (0..PAGE).step_by(8) {
            let (a, via_win, via_alias) = (d + w, s.r.va(i) + w, s.r.va(MIX + i) + w);
            if ram(a) != want(a) {
                out.fail().s("vm ").dec(me).s(": RAM at ").hex(a).s(" expected ").hex(want(a)).s(" found ").hex(ram(a));
                return out;
            }
            if (i != 0 && !expect(&mut out, cpu, "window", via_win, want(a)))
                || !expect(&mut out, cpu, "alias", via_alias, want(a))
            {
                out.detail.s(" (vm ").dec(me).s(")");
                return out;
            }
        }
        let leaf = t.find(i, s.r.levels).map_or(0, |e| ent(e).load(Ordering::Acquire));
        let written = i < half && i % 2 == 0;
        if i != 0 && (leaf & VPTE_M != 0) != written {
            out.fail().s("vm ").dec(me).s(": leaf of window page ").dec(i).s(" has M ");
            out.detail.s(if written { "clear after a write through it" } else { "set with no write through it" });
            return out;
        }
    }
    for a in (bulk..bulk_end).step_by(PAGE as usize) {
        let want = crate::tests::pattern(a, ctx.seed);
        if ram(a) != want {
            out.fail().s("vm ").dec(me).s(": bulk at ").hex(a).s(" expected ").hex(want).s(" found ").hex(ram(a));
            return out;
        }
    }
    out.count("vm", me).count("pages", MIX + (bulk_end - bulk) / PAGE).count("bulk_mib", (bulk_end - bulk) >> 20);
    out
}
