//! VPAGETABLE helpers: the windows vkvm gives us (`vkvm.vpt=` on the
//! command line), a page allocator over the test arena, vpte tables built
//! and edited in our own RAM, and the `setmap` / `inval` hypercalls.
//!
//! Levels are numbered from the top: level 1 is the table the master entry
//! points at, level `levels` holds the leaves. Window page `i` uses index
//! `(i >> 9 * (levels - k)) & 511` at level `k`.

#[path = "../../pager/src/vpte.rs"]
mod vpte;
pub use vpte::*;

use crate::abi;
use crate::arch::{self, Caught};
use crate::platform::hypercall;
use crate::tests::Ctx;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub const PAGE: u64 = 4096;

/// A window as vkvm announced it.
#[derive(Clone, Copy)]
pub struct Region {
    pub index: u64,
    pub gpa: u64,
    pub len: u64,
    pub levels: u32,
    /// Pages in the backing object (guest RAM): frames from here on are out of bounds.
    pub obj_pages: u64,
}

impl Region {
    /// Address of window page `i`.
    pub fn va(&self, i: u64) -> u64 {
        self.gpa + i * PAGE
    }
    pub fn pages(&self) -> u64 {
        self.len / PAGE
    }
}

fn parse(s: &[u8]) -> Option<u64> {
    let h = s.strip_prefix(b"0x")?;
    let mut v: u64 = 0;
    for &c in h {
        v = v.checked_mul(16)?.checked_add((c as char).to_digit(16)? as u64)?;
    }
    Some(v)
}

/// The `index`-th window of `vkvm.vpt=GPA:LEN:LEVELS:OBJPAGES,...`.
pub fn region(ctx: &Ctx, index: usize) -> Option<Region> {
    let list = ctx.opt(b"vkvm.vpt")?;
    let r = list.split(|&c| c == b',').nth(index)?;
    let mut f = r.split(|&c| c == b':');
    let gpa = parse(f.next()?)?;
    let len = parse(f.next()?)?;
    let levels = match f.next()? {
        [d @ b'1'..=b'4'] => (d - b'0') as u32,
        _ => return None,
    };
    let obj_pages = parse(f.next()?)?;
    Some(Region { index: index as u64, gpa, len, levels, obj_pages })
}

/// Bump allocator of zeroed pages from a part of the test arena.
pub struct Alloc {
    next: u64,
    end: u64,
}

impl Alloc {
    pub fn new(start: u64, end: u64) -> Alloc {
        Alloc { next: start.next_multiple_of(PAGE), end }
    }
    /// A zeroed page (its guest-physical address), or None when exhausted.
    pub fn page(&mut self) -> Option<u64> {
        if self.next + PAGE > self.end {
            return None;
        }
        let p = self.next;
        self.next += PAGE;
        for a in (p..p + PAGE).step_by(8) {
            // SAFETY: arena RAM reserved for this test.
            unsafe { (a as *mut u64).write_volatile(0) };
        }
        Some(p)
    }
}

/// The entry at `addr` (a table slot in RAM), for atomic edits: vkvm may
/// set A/M in it at the same time.
pub fn ent(addr: u64) -> &'static AtomicU64 {
    // SAFETY: an 8-byte aligned table slot in identity-mapped arena RAM.
    unsafe { &*(addr as *const AtomicU64) }
}

/// A tree of vpte tables for one window.
pub struct Tables {
    pub r: Region,
    /// Guest-physical address of the level-1 table.
    pub root: u64,
}

impl Tables {
    pub fn new(r: Region, a: &mut Alloc) -> Option<Tables> {
        Some(Tables { r, root: a.page()? })
    }
    /// The master entry pointing at the root with `flags`.
    pub fn master(&self, flags: Vpte) -> Vpte {
        vpte_make(self.root / PAGE, flags)
    }
    /// Index of window page `i` at level `k`.
    pub fn index(&self, i: u64, k: u32) -> u64 {
        (i >> (VPTE_PAGE_BITS * (self.r.levels - k))) & VPTE_PAGE_MASK
    }
    /// Slot address of the level-`k` entry on the path of window page `i`;
    /// missing tables above it are allocated with `dir` flags (V added).
    pub fn slot(&self, a: &mut Alloc, i: u64, k: u32, dir: Vpte) -> Option<u64> {
        let mut table = self.root;
        for lvl in 1..k {
            let e = ent(table + self.index(i, lvl) * 8);
            let mut v = e.load(Ordering::Acquire);
            if vpte_pindex(v) == 0 {
                v = vpte_make(a.page()? / PAGE, dir | VPTE_V);
                e.store(v, Ordering::Release);
            }
            table = vpte_pindex(v) * PAGE;
        }
        Some(table + self.index(i, k) * 8)
    }
    /// Slot of an existing path entry (no allocation), None if missing.
    pub fn find(&self, i: u64, k: u32) -> Option<u64> {
        let mut table = self.root;
        for lvl in 1..k {
            let v = ent(table + self.index(i, lvl) * 8).load(Ordering::Acquire);
            if vpte_pindex(v) == 0 {
                return None;
            }
            table = vpte_pindex(v) * PAGE;
        }
        Some(table + self.index(i, k) * 8)
    }
    /// Map window page `i` to backing page `frame` with leaf `flags`.
    pub fn map(&self, a: &mut Alloc, i: u64, frame: u64, flags: Vpte, dir: Vpte) -> Option<u64> {
        let s = self.slot(a, i, self.r.levels, dir)?;
        ent(s).store(vpte_make(frame, flags), Ordering::Release);
        Some(s)
    }
    /// The in-memory entries on the path of page `i` (levels 1..=levels).
    pub fn path(&self, i: u64) -> [u64; 4] {
        let mut out = [0; 4];
        for k in 1..=self.r.levels {
            if let Some(s) = self.find(i, k) {
                out[k as usize - 1] = ent(s).load(Ordering::Acquire);
            }
        }
        out
    }
}

/// Set once any test called `setmap`: until then every window is fresh.
pub static SETMAP_CALLED: AtomicBool = AtomicBool::new(false);

pub fn setmap(cpu: usize, r: &Region, master: Vpte) -> i64 {
    let rc = hypercall(cpu, abi::nr::SETMAP, &[r.index, master]);
    if rc == 0 {
        SETMAP_CALLED.store(true, Ordering::Relaxed);
    }
    rc
}

pub fn inval(cpu: usize, r: &Region, off: u64, len: u64) -> i64 {
    hypercall(cpu, abi::nr::INVAL, &[r.index, off, len])
}

/// Read a word through the window, catching a fault.
pub fn read64(cpu: usize, addr: u64) -> Result<u64, Caught> {
    let mut v = 0u64;
    for k in 0..8 {
        v |= (arch::probe_read(cpu, addr + k)? as u64) << (8 * k);
    }
    Ok(v)
}

/// Write a word through the window, catching a fault (nothing is written
/// when the first byte faults).
pub fn write64(cpu: usize, addr: u64, v: u64) -> Result<(), Caught> {
    for k in 0..8 {
        if let Some(c) = arch::probe_write(cpu, addr + k, (v >> (8 * k)) as u8) {
            return Err(c);
        }
    }
    Ok(())
}

/// Read a RAM word (identity mapped).
pub fn ram(addr: u64) -> u64 {
    // SAFETY: identity-mapped guest RAM.
    unsafe { (addr as *const u64).read_volatile() }
}

pub fn set_ram(addr: u64, v: u64) {
    // SAFETY: identity-mapped arena RAM owned by the running test.
    unsafe { (addr as *mut u64).write_volatile(v) }
}

/// The #PF error-code bit vkvm sets for a frame beyond the backing object.
pub const PF_RSVD: u64 = 1 << 3;
