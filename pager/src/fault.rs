//! The page fault handler (`vm_fault`, `vm_fault_object`,
//! `vm_fault_additional_pages`, `pmap_prefault`), plus `fault_range` and
//! `access` for the VMM's own touches of guest memory.

use crate::frame::{Frame, PAGE_SIZE};
use crate::map::{Behavior, Map, MapEntry, MapInner, MapType};
use crate::object::{ObjGuard, Object, ObjectKind};
use crate::page::{pf, Page, Queue};
use crate::pager::{PageIo, Pager, PagerError};
use crate::pmap::{remove_map_mappings, remove_mappings, rmap_add};
use crate::stages::{self, Stage};
use crate::vm::{bump, Prot, Vm};
use smallvec::SmallVec;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const PS: u64 = PAGE_SIZE as u64;
/// `VM_FAULT_READ_AHEAD`.
pub const READ_AHEAD: u64 = 8;
/// `VM_FAULT_READ_BEHIND`.
pub const READ_BEHIND: u64 = 7;
/// `VM_FAULT_READ`.
pub const READ_WINDOW: u64 = READ_AHEAD + READ_BEHIND + 1;
/// Frames kept free when deciding whether read-ahead is affordable.
const FREE_RESERVE: u64 = 4;
/// How many times a fault retries allocation (waiting for pageout) before
/// it reports `NoMemory`.
const NOMEM_TRIES: u32 = 400;

/// Fault errors (`KERN_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    /// No entry maps the address (`KERN_INVALID_ADDRESS`).
    #[error("address not mapped")]
    NotMapped,
    /// Access not allowed, page beyond the object, bad pager page, dead
    /// object, vpte frame out of bounds (`KERN_PROTECTION_FAILURE`).
    #[error("protection failure")]
    Protection,
    /// Pager I/O error (`KERN_FAILURE`).
    #[error("fault failure")]
    Failure,
    /// The guest's vpte tables refuse the access: V clear, or no RW (write)
    /// or NX (exec) at some level (`KERN_FAILURE` in the seed; told apart
    /// here so an I/O error on a table page is never blamed on the guest).
    #[error("invalid vpte")]
    InvalidVpte,
    /// No frame could be freed in time.
    #[error("out of memory")]
    NoMemory,
}

/// Fault flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FaultFlags(pub u8);

impl FaultFlags {
    /// Plain fault.
    pub const NONE: FaultFlags = FaultFlags(0);
    /// Change wiring (`VM_FAULT_CHANGE_WIRING`): wire if the entry is wired.
    pub const WIRE: FaultFlags = FaultFlags(1);
    /// Hold the page (`VM_FAULT_HOLD`): `Resolved::held` releases it.
    pub const HOLD: FaultFlags = FaultFlags(2);
    /// Do not prefault neighbours.
    pub const NO_PREFAULT: FaultFlags = FaultFlags(4);
    fn has(self, f: FaultFlags) -> bool {
        self.0 & f.0 != 0
    }
}

impl std::ops::BitOr for FaultFlags {
    type Output = FaultFlags;
    fn bitor(self, o: FaultFlags) -> FaultFlags {
        FaultFlags(self.0 | o.0)
    }
}

/// How a fault was resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// A fresh zero page in the top object.
    ZeroFill,
    /// The page was resident.
    Soft,
    /// Copied from a backing object.
    CowCopy,
    /// Moved from the backing object (no copy).
    CowRename,
    /// Read by a pager (major fault).
    PagerIn,
}

/// A hold on a page (`vm_page_hold`): pageout leaves it alone until dropped.
pub struct Held {
    obj: Arc<Object>,
    pindex: u64,
    armed: bool,
}

impl Held {
    pub(crate) fn new(g: &mut ObjGuard, obj: &Arc<Object>, pindex: u64) -> Option<Held> {
        let p = g.pages.get_mut(&pindex)?;
        p.hold_count = p.hold_count.saturating_add(1);
        Some(Held { obj: obj.clone(), pindex, armed: true })
    }
    /// The frame of the held page.
    pub fn frame(&self) -> Option<Frame> {
        self.obj.st.lock().pages.get(&self.pindex).map(|p| p.frame)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut g = self.obj.st.lock();
        if let Some(p) = g.pages.get_mut(&self.pindex) {
            p.hold_count = p.hold_count.saturating_sub(1);
        }
    }
}

/// A resolved fault.
pub struct Resolved {
    /// Page-aligned faulting address.
    pub addr: u64,
    /// Frame entered.
    pub frame: Frame,
    /// Protection entered with.
    pub prot: Prot,
    /// How it was resolved.
    pub kind: FaultKind,
    /// Neighbours also entered (prefault): (addr, frame, prot).
    pub prefault: Vec<(u64, Frame, Prot)>,
    /// Map generation the result is valid for.
    pub generation: u64,
    /// The hold, with `FaultFlags::HOLD`.
    pub held: Option<Held>,
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolved")
            .field("addr", &self.addr)
            .field("frame", &self.frame)
            .field("prot", &self.prot)
            .field("kind", &self.kind)
            .field("prefault", &self.prefault.len())
            .finish()
    }
}

pub(crate) struct PageInReq {
    obj: Arc<Object>,
    pager: Arc<dyn Pager>,
    ios: Vec<PageIo>,
    reqpage: usize,
}

/// One pass's outcome; everything but `Ok` is handled with no lock held.
pub(crate) enum Step<T> {
    Ok(T),
    Retry,
    WaitBusy(Arc<Object>, u64),
    PageIn(PageInReq),
    NoMemory,
    Throttle(Duration),
    /// The entry at this address needs its shadow before a write.
    NeedsCopy(u64),
    Err(FaultError),
}

impl<T> Step<T> {
    pub(crate) fn cast<U>(self) -> Step<U> {
        match self {
            Step::Ok(_) => Step::Err(FaultError::Failure),
            Step::Retry => Step::Retry,
            Step::WaitBusy(o, p) => Step::WaitBusy(o, p),
            Step::PageIn(r) => Step::PageIn(r),
            Step::NoMemory => Step::NoMemory,
            Step::Throttle(d) => Step::Throttle(d),
            Step::NeedsCopy(a) => Step::NeedsCopy(a),
            Step::Err(e) => Step::Err(e),
        }
    }
}

/// Per-fault state (`struct faultstate`).
pub(crate) struct Fs<'a> {
    pub(crate) map: &'a Map,
    pub(crate) vm: &'a Vm,
    pub(crate) flags: FaultFlags,
    pub(crate) wired: bool,
    hardfault: bool,
    didlimit: bool,
    skip: SmallVec<[u64; 2]>,
    helds: SmallVec<[Held; 2]>,
    io_gen: Option<u64>,
}

/// A page found (or made) by `resolve`, its object still locked.
pub(crate) struct Found {
    pub(crate) g: ObjGuard,
    pub(crate) obj: Arc<Object>,
    pub(crate) pindex: u64,
    pub(crate) prot: Prot,
    pub(crate) kind: FaultKind,
}

/// Handles a fault at `addr` needing `access` (`vm_fault`). On success the
/// page (and prefaulted neighbours) are entered in the map's pmap.
pub fn fault(map: &Map, addr: u64, access: Prot, flags: FaultFlags) -> Result<Resolved, FaultError> {
    let vaddr = addr & !(PS - 1);
    let vm: &Vm = &map.vm;
    let mut fs = Fs {
        map,
        vm,
        flags,
        wired: false,
        hardfault: false,
        didlimit: false,
        skip: SmallVec::new(),
        helds: SmallVec::new(),
        io_gen: None,
    };
    let mut nomem = 0u32;
    loop {
        let step = {
            let g = map.inner.read();
            fault_once(&mut fs, &g, vaddr, access)
        };
        match step {
            Step::Ok(r) => {
                bump(&vm.stats.faults);
                return Ok(r);
            }
            Step::Retry => {}
            Step::WaitBusy(o, p) => {
                bump(&vm.stats.busy_waits);
                o.wait_unbusy(p);
            }
            Step::PageIn(req) => stages::timed(Stage::PagerIo, || page_in(&mut fs, req))?,
            Step::NoMemory => {
                nomem += 1;
                // Out of memory (`Vm::out_of_memory`): a frame freed by
                // another map's thrash would be no progress: fail at once.
                if nomem > NOMEM_TRIES || vm.out_of_memory() {
                    return Err(FaultError::NoMemory);
                }
                reclaim(vm);
            }
            Step::Throttle(d) => {
                bump(&vm.stats.throttled);
                std::thread::sleep(d);
            }
            Step::NeedsCopy(at) => {
                let mut g = map.inner.write();
                if let Some(e) = g.lookup_mut(at) {
                    if e.needs_copy {
                        e.make_shadow();
                        g.timestamp += 1;
                    }
                }
            }
            Step::Err(e) => return Err(e),
        }
    }
}

/// Waits for pageout to free frames (running it directly if needed).
fn reclaim(vm: &Vm) {
    vm.wake_pageout();
    let freed = crate::pageout::reclaim(vm, vm.config.free_target.max(1));
    if freed == 0 {
        vm.pool.wait_free(Duration::from_millis(5));
    }
}

fn fault_once(fs: &mut Fs, g: &MapInner, vaddr: u64, access: Prot) -> Step<Resolved> {
    if let Some(gen) = fs.io_gen.take() {
        if gen != g.timestamp {
            // The map changed while the pager slept: everything is looked
            // up again (the re-walk below), count it.
            bump(&fs.vm.stats.retries);
        }
    }
    let Some(e) = stages::timed(Stage::Lookup, || g.lookup(vaddr)) else {
        return Step::Err(FaultError::NotMapped);
    };
    fs.wired = e.wired_count > 0;
    if !e.protection.contains(access) {
        return Step::Err(FaultError::Protection);
    }
    let is_vpt = matches!(e.maptype, MapType::VPageTable { .. });
    // Wired entries fault with their own protection.
    let fault_type = if fs.wired { e.protection } else { access };
    let mut walk = None;
    // The Normal entry, first object, page index and protection to resolve:
    // for a window, those of the address its vptes name.
    let mut target_addr = vaddr;
    let (re, first, first_pindex, first_prot) = if is_vpt {
        let w = match crate::vpagetable::walk(fs, g, e, e.pindex(vaddr), fault_type, e.protection, g.timestamp) {
            Step::Ok(w) => w,
            other => return other.cast(),
        };
        let (re, addr) = match crate::vpagetable::target_entry(g, e, w.frame) {
            Ok(t) => t,
            Err(err) => return Step::Err(err),
        };
        let (first, pindex, prot) = match crate::vpagetable::lookup_normal(re, addr, fault_type, w.prot) {
            Step::Ok(t) => t,
            other => return other.cast(),
        };
        walk = Some(w);
        target_addr = addr;
        (re, first, pindex, prot)
    } else {
        let mut first_prot = e.protection;
        if e.needs_copy {
            if access.writable() || (fs.wired && e.protection.writable()) {
                return Step::NeedsCopy(vaddr);
            }
            first_prot = first_prot.without(Prot::WRITE);
        }
        (e, e.object.arc().clone(), e.pindex(vaddr), first_prot)
    };
    let found = match stages::timed(Stage::ChainWalk, || {
        resolve(fs, re, &first, first_pindex, fault_type, first_prot, g.timestamp, Some(vaddr))
    }) {
        Step::Ok(f) => f,
        other => return other.cast(),
    };
    let Found { g: mut og, obj, pindex, mut prot, kind } = found;
    let pager = og.pager.clone();
    let Some(page) = og.pages.get_mut(&pindex) else {
        return Step::Retry;
    };
    if matches!(kind, FaultKind::Soft | FaultKind::PagerIn) && !fault_type.writable() && !page.has(pf::DIRTY) {
        // Clean page: map read-only so the first write dirties it.
        prot = prot.without(Prot::WRITE);
    }
    let mut unswap = false;
    if prot.writable() && !page.has(pf::DIRTY) {
        page.set(pf::DIRTY);
        unswap = true;
    }
    // Once entered the frame may be populated by the pmap (the VMM puts a
    // read-only hole's zeros in the page cache): it must be punched when freed.
    page.clear(pf::ZERO);
    page.set(pf::REFERENCED);
    if fs.flags.has(FaultFlags::WIRE) && !page.has(pf::FICTITIOUS) {
        if fs.wired {
            page.wire_count = page.wire_count.saturating_add(1);
            if is_vpt {
                fs.map.record_window_wiring(vaddr, target_addr, page.frame);
            }
        } else {
            page.wire_count = page.wire_count.saturating_sub(1);
        }
    }
    page.queue = if page.wire_count > 0 || page.has(pf::FICTITIOUS) { Queue::None } else { Queue::Active };
    rmap_add(page, fs.map.pmap_id, vaddr);
    let frame = page.frame;
    // A/M before the enter: the guest may run (and read its vptes) as soon
    // as the page is in.
    let changed = walk.as_ref().map_or(0, |w| crate::vpagetable::set_accessed(fs.vm, w, fault_type));
    stages::timed(Stage::Install, || fs.map.pmap.enter(vaddr, frame, prot, fs.wired));
    if unswap {
        if let Some(p) = &pager {
            // The backing copy is stale now: free its slot (under the lock,
            // so pageout cannot write a new copy in between).
            p.page_unswapped(obj.id, pindex);
        }
    }
    let held = if fs.flags.has(FaultFlags::HOLD) { Held::new(&mut og, &obj, pindex) } else { None };
    drop(og);
    if let Some(w) = walk {
        crate::vpagetable::dirty_tables(&w, changed);
    }
    let stats = &fs.vm.stats;
    bump(match kind {
        FaultKind::ZeroFill => &stats.zero_fill,
        FaultKind::Soft => &stats.soft,
        FaultKind::CowCopy => &stats.cow_copy,
        FaultKind::CowRename => &stats.cow_rename,
        FaultKind::PagerIn => &stats.pager_in,
    });
    if kind != FaultKind::PagerIn && fs.hardfault {
        bump(&stats.pager_in);
    }
    let mut pre = Vec::new();
    if !fs.wired
        && !fs.flags.has(FaultFlags::WIRE)
        && !fs.flags.has(FaultFlags::NO_PREFAULT)
        && !is_vpt
        && fs.vm.config.prefault > 0
    {
        prefault(fs, e, vaddr, &mut pre);
    }
    fs.helds.clear();
    Step::Ok(Resolved { addr: vaddr, frame, prot, kind, prefault: pre, generation: g.timestamp, held })
}

/// `vm_fault_ratelimit`: once per fault, throttle when free frames are short.
fn throttle(fs: &mut Fs) -> Option<Duration> {
    let c = &fs.vm.config;
    if fs.didlimit || !c.ratelimit {
        return None;
    }
    let max = fs.vm.pool.max_resident().max(1);
    let load = (fs.vm.pool.resident() * 1000 / max).min(1000);
    if load < c.ratelimit_load {
        return None;
    }
    if fs.map.pagesupply.fetch_sub(1, Ordering::Relaxed) > 0 {
        return None;
    }
    fs.map.pagesupply.store(((1000 - load) / 10) as i64, Ordering::Relaxed);
    fs.didlimit = true;
    Some(c.ratelimit_max_sleep.mul_f64(load as f64 / 1000.0))
}

/// Finds or makes the page for (first, first_pindex) (`vm_fault_object`):
/// walks the shadow chain top-down holding each object's lock, first hit
/// wins, pager asked where `TRYPAGER` holds, zero-fill in the top object,
/// copy-on-write or rename on a write to a backing page. A COW copy removes
/// every mapping this map has of the old frame (window aliases, the RAM
/// address of a page copied through a window) but `keep`, the address the
/// caller enters the copy at.
#[allow(clippy::too_many_arguments)]
pub(crate) fn resolve(
    fs: &mut Fs,
    e: &MapEntry,
    first: &Arc<Object>,
    first_pindex: u64,
    fault_type: Prot,
    first_prot: Prot,
    timestamp: u64,
    keep: Option<u64>,
) -> Step<Found> {
    let vm = fs.vm;
    let mut prot = first_prot;
    let mut chain: SmallVec<[(Arc<Object>, ObjGuard, u64); 4]> = SmallVec::new();
    let mut obj = first.clone();
    let mut pindex = first_pindex;
    let found_depth;
    loop {
        let mut g = obj.lock();
        let depth = chain.len();
        if g.dead {
            // A dead backing object was collapsed away under us: look again.
            return if depth == 0 { Step::Err(FaultError::Protection) } else { Step::Retry };
        }
        if let Some(pg) = g.pages.get(&pindex) {
            if pg.has(pf::BUSY) {
                return Step::WaitBusy(obj.clone(), pindex);
            }
            if !pg.has(pf::VALID) {
                // Only busy placeholders are invalid; never wait on one that
                // nobody will finish (that would hang): drop it, look again.
                log::error!("vm_fault: stray invalid page {} in object {}", pindex, obj.id);
                if let Some(p) = g.pages.remove(&pindex) {
                    vm.pool.free(p.frame, true);
                }
                return Step::Retry;
            }
            chain.push((obj, g, pindex));
            found_depth = Some(depth);
            break;
        }
        let trypager = g.pager.is_some() && (!fs.flags.has(FaultFlags::WIRE) || fs.wired) && !fs.skip.contains(&obj.id);
        if (trypager || depth == 0) && pindex >= g.size {
            return Step::Err(FaultError::Protection);
        }
        if trypager {
            if let Some(pager) = g.pager.clone() {
                if let Some(fr) = pager.fixed_frame(obj.id, pindex) {
                    let mut p = Page::new(fr, pf::VALID | pf::FICTITIOUS);
                    p.queue = Queue::None;
                    g.pages.insert(pindex, p);
                    fs.hardfault = true;
                    bump(&vm.stats.pages_in);
                    chain.push((obj, g, pindex));
                    found_depth = Some(depth);
                    break;
                }
                if let Some((cb, ca)) = pager.has_page(obj.id, pindex) {
                    if let Some(d) = throttle(fs) {
                        return Step::Throttle(d);
                    }
                    let first_kind = if depth == 0 { g.kind } else { chain[0].1.kind };
                    let req = prepare_pagein(
                        fs,
                        e,
                        &mut chain,
                        &obj,
                        &mut g,
                        pindex,
                        first_pindex,
                        first_kind,
                        cb as u64,
                        ca as u64,
                        pager,
                    );
                    if let Step::PageIn(_) = &req {
                        fs.io_gen = Some(timestamp);
                    }
                    return req;
                }
            }
        }
        let next = g.backing.as_ref().map(|b| b.arc().clone());
        let np = pindex.checked_add(g.backing_offset);
        chain.push((obj, g, pindex));
        match (next, np) {
            (Some(n), Some(np)) => {
                obj = n;
                pindex = np;
            }
            // An index past u64 is past every backing object: none has it.
            _ => {
                found_depth = None;
                break;
            }
        }
    }
    let Some(depth) = found_depth else {
        // Nobody has the page: zero-fill in the top object. A fresh frame is
        // a hole, so it is already zero.
        if let Some(d) = throttle(fs) {
            return Step::Throttle(d);
        }
        chain.truncate(1);
        let Some((o, mut g, p)) = chain.pop() else {
            return Step::Retry;
        };
        let Some(fr) = vm.pool.alloc(o.pref_frame(p)) else {
            return Step::NoMemory;
        };
        g.pages.insert(p, Page::new(fr, pf::VALID | pf::DIRTY | pf::ZERO));
        return Step::Ok(Found { g, obj: o, pindex: p, prot, kind: FaultKind::ZeroFill });
    };
    let plain = if fs.hardfault { FaultKind::PagerIn } else { FaultKind::Soft };
    if depth == 0 {
        let Some((o, g, p)) = chain.pop() else {
            return Step::Retry;
        };
        return Step::Ok(Found { g, obj: o, pindex: p, prot, kind: plain });
    }
    let Some((bo, mut bg, bp)) = chain.pop() else {
        return Step::Retry;
    };
    if !fault_type.writable() {
        // Read of a backing page: map it read-only, shared.
        chain.clear();
        prot = prot.without(Prot::WRITE);
        if let Some(pg) = bg.pages.get_mut(&bp) {
            pg.set(pf::REFERENCED);
        }
        return Step::Ok(Found { g: bg, obj: bo, pindex: bp, prot, kind: plain });
    }
    chain.truncate(1);
    let Some((fo, mut fg, fp)) = chain.pop() else {
        return Step::Retry;
    };
    // Our own hold (from the page-in that brought the page) does not count.
    let own = fs.helds.iter().filter(|h| h.armed && h.pindex == bp && Arc::ptr_eq(&h.obj, &bo)).count() as u16;
    let (can_move, src) = match bg.pages.get(&bp) {
        Some(pg) => (pg.wire_count == 0 && pg.hold_count <= own && !pg.has(pf::FICTITIOUS), pg.frame),
        None => return Step::Retry,
    };
    // The seed's rename conditions (the map lock is held, so the generation
    // cannot have changed).
    let rename = depth == 1
        && can_move
        && bg.shadow_count == 1
        && bg.ref_count == 1
        && bg.handle.is_none()
        && matches!(bg.kind, ObjectKind::Anonymous | ObjectKind::Swap);
    if rename {
        let Some(mut page) = bg.pages.remove(&bp) else {
            return Step::Retry;
        };
        // The page leaves `bo`: drop our holds on it here, under the lock.
        for h in fs.helds.iter_mut().filter(|h| h.armed && h.pindex == bp && Arc::ptr_eq(&h.obj, &bo)) {
            h.armed = false;
            page.hold_count = page.hold_count.saturating_sub(1);
        }
        if let Some(p) = &bg.pager {
            p.page_unswapped(bo.id, bp);
        }
        bg.generation += 1;
        drop(bg);
        page.set(pf::DIRTY | pf::REFERENCED);
        page.clear(pf::ZERO);
        fg.pages.insert(fp, page);
        return Step::Ok(Found { g: fg, obj: fo, pindex: fp, prot, kind: FaultKind::CowRename });
    }
    // A copy is a new page in the first object: rate-limited as the seed
    // limits every first-object allocation.
    if let Some(d) = throttle(fs) {
        return Step::Throttle(d);
    }
    let Some(fr) = vm.pool.alloc(fo.pref_frame(fp)) else {
        return Step::NoMemory;
    };
    if stages::timed(Stage::CopyZero, || vm.pool.copy(src, fr)).is_err() {
        vm.pool.free(fr, true);
        return Step::Err(FaultError::Failure);
    }
    if let Some(pg) = bg.pages.get_mut(&bp) {
        pg.set(pf::REFERENCED);
        // The copy replaces the backing page for this map only: no address
        // of it may keep showing the old frame.
        remove_map_mappings(vm, pg, fs.map.pmap_id, keep);
    }
    drop(bg);
    fg.pages.insert(fp, Page::new(fr, pf::VALID | pf::DIRTY));
    Step::Ok(Found { g: fg, obj: fo, pindex: fp, prot, kind: FaultKind::CowCopy })
}

/// Frees behind a sequential reader: clean pages cached, dirty ones unmapped
/// and deactivated.
fn free_behind(vm: &Vm, fg: &mut ObjGuard, first_pindex: u64) {
    let lo = first_pindex.saturating_sub(2 * READ_WINDOW);
    let mut t = first_pindex;
    while t > lo {
        t -= 1;
        let Some(pg) = fg.pages.get_mut(&t) else {
            break;
        };
        if !pg.has(pf::VALID) {
            break;
        }
        if pg.has(pf::BUSY | pf::FICTITIOUS) || pg.hold_count > 0 || pg.wire_count > 0 {
            continue;
        }
        if remove_mappings(vm, pg) {
            pg.set(pf::DIRTY);
        }
        pg.clear(pf::REFERENCED);
        pg.queue = if pg.has(pf::DIRTY) { Queue::Inactive } else { Queue::Cache };
    }
}

/// Read-ahead/behind and the page-in request (`vm_fault_additional_pages`).
#[allow(clippy::too_many_arguments)]
fn prepare_pagein(
    fs: &mut Fs,
    e: &MapEntry,
    chain: &mut SmallVec<[(Arc<Object>, ObjGuard, u64); 4]>,
    obj: &Arc<Object>,
    g: &mut ObjGuard,
    pindex: u64,
    first_pindex: u64,
    first_kind: ObjectKind,
    cb: u64,
    ca: u64,
    pager: Arc<dyn Pager>,
) -> Step<Found> {
    let vm = fs.vm;
    let size = g.size;
    let (mut behind, mut ahead) = match e.behavior {
        Behavior::Random => (0, 0),
        _ => (pindex.min(READ_BEHIND), size.saturating_sub(pindex).clamp(1, READ_AHEAD)),
    };
    let lastr = e.lastr.load(Ordering::Relaxed);
    let in_window = pindex >= lastr && pindex < lastr.saturating_add(READ_WINDOW);
    if first_kind != ObjectKind::Device
        && (e.behavior == Behavior::Sequential || (e.behavior != Behavior::Random && in_window))
    {
        match chain.first_mut() {
            Some((_, fg, _)) => free_behind(vm, fg, first_pindex),
            None => free_behind(vm, g, first_pindex),
        }
        ahead += behind;
        behind = 0;
    }
    let Some(req_frame) = vm.pool.alloc(obj.pref_frame(pindex)) else {
        return Step::NoMemory;
    };
    let io = |p: u64, f: Frame| PageIo { pindex: p, frame: f, done: false };
    let mut ios: Vec<PageIo> = Vec::new();
    let mut reqpage = 0;
    let rahead = ahead.min(ca);
    let rbehind = behind.min(cb);
    let cluster = g.kind != ObjectKind::Device && (rahead + rbehind) > 0;
    if cluster && rahead + rbehind > vm.pool.free_count().saturating_sub(FREE_RESERVE) {
        vm.wake_pageout();
        ios.push(io(pindex, req_frame));
    } else if cluster {
        let mut start = pindex - rbehind.min(pindex);
        let mut t = pindex;
        while t > start {
            t -= 1;
            if g.pages.contains_key(&t) {
                start = t + 1;
                break;
            }
        }
        for t in start..pindex {
            match vm.pool.alloc(obj.pref_frame(t)) {
                Some(f) => ios.push(io(t, f)),
                None => {
                    for x in ios.drain(..) {
                        vm.pool.free(x.frame, false);
                    }
                    break;
                }
            }
        }
        reqpage = ios.len();
        ios.push(io(pindex, req_frame));
        let end = (pindex + 1 + rahead).min(size);
        for t in pindex + 1..end {
            if g.pages.contains_key(&t) {
                break;
            }
            match vm.pool.alloc(obj.pref_frame(t)) {
                Some(f) => ios.push(io(t, f)),
                None => break,
            }
        }
    } else {
        ios.push(io(pindex, req_frame));
    }
    // Imperfect, as in the seed: we do not know how much the pager reads.
    e.lastr.store((pindex + ios.len() as u64).wrapping_sub(behind), Ordering::Relaxed);
    for x in &ios {
        let mut p = Page::new(x.frame, pf::BUSY);
        p.queue = Queue::None;
        g.pages.insert(x.pindex, p);
    }
    g.pip += 1;
    Step::PageIn(PageInReq { obj: obj.clone(), pager, ios, reqpage })
}

/// Owns a page-in's busy placeholders: unless committed, dropping it (on
/// any path, unwinding included) removes them and frees their frames, drops
/// the paging-in-progress count and wakes waiters.
struct PlaceholderGuard<'a> {
    vm: &'a Vm,
    obj: &'a Arc<Object>,
    ios: Vec<PageIo>,
    committed: bool,
}

impl Drop for PlaceholderGuard<'_> {
    fn drop(&mut self) {
        let mut g = self.obj.lock();
        g.pip = g.pip.saturating_sub(1);
        if !self.committed {
            for x in &self.ios {
                if g.pages.get(&x.pindex).is_some_and(|p| p.has(pf::BUSY) && p.frame == x.frame) {
                    g.pages.remove(&x.pindex);
                    self.vm.pool.free(x.frame, true);
                }
            }
        }
        drop(g);
        self.obj.cv.notify_all();
    }
}

/// Runs the pager with no lock held (`vm_pager_get_pages`).
fn page_in(fs: &mut Fs, req: PageInReq) -> Result<(), FaultError> {
    let vm = fs.vm;
    let PageInReq { obj, pager, ios, reqpage } = req;
    let mut guard = PlaceholderGuard { vm, obj: &obj, ios, committed: false };
    let r = pager.get_pages(obj.id, &vm.pool, &mut guard.ios, reqpage);
    match r {
        Ok(()) if guard.ios.get(reqpage).is_some_and(|x| x.done) => {
            let mut g = obj.lock();
            let mut n = 0;
            for (i, x) in guard.ios.iter().enumerate() {
                let ours = g.pages.get(&x.pindex).is_some_and(|p| p.has(pf::BUSY) && p.frame == x.frame);
                if !ours {
                    continue;
                }
                if x.done {
                    if let Some(p) = g.pages.get_mut(&x.pindex) {
                        p.flags = pf::VALID;
                        p.queue = Queue::Inactive;
                        n += 1;
                    }
                    if i == reqpage {
                        if let Some(h) = Held::new(&mut g, &obj, x.pindex) {
                            fs.helds.push(h);
                        }
                    }
                } else {
                    g.pages.remove(&x.pindex);
                    vm.pool.free(x.frame, true);
                }
            }
            guard.committed = true;
            drop(g);
            vm.stats.pages_in.fetch_add(n, Ordering::Relaxed);
            fs.hardfault = true;
            Ok(())
        }
        Ok(()) | Err(PagerError::Error) | Err(PagerError::NoSpace) => {
            static RL: crate::vm::RateLimit = crate::vm::RateLimit::new();
            crate::warn_ratelimited!(
                RL,
                "vm_fault: pager read error, object {} page {}",
                obj.id,
                guard.ios.get(reqpage).map_or(0, |x| x.pindex)
            );
            Err(FaultError::Failure)
        }
        Err(PagerError::Bad) => Err(FaultError::Protection),
        Err(PagerError::Fail) => {
            fs.skip.push(obj.id);
            Ok(())
        }
    }
}

/// `pmap_prefault`: enter resident neighbours (-1, +1, ... -n, +n) within
/// the entry; stops at the first non-resident page; backing pages read-only.
fn prefault(fs: &Fs, e: &MapEntry, vaddr: u64, out: &mut Vec<(u64, Frame, Prot)>) {
    let n = fs.vm.config.prefault;
    let mut base = e.protection;
    if e.needs_copy {
        base = base.without(Prot::WRITE);
    }
    for i in 1..=n {
        for up in [false, true] {
            let a = if up { vaddr.checked_add(i * PS) } else { vaddr.checked_sub(i * PS) };
            let Some(a) = a else { continue };
            if a < e.start || a >= e.end {
                continue;
            }
            if fs.map.pmap.extract(a).is_some() {
                continue;
            }
            // Locks are kept top-down until the enter, as `resolve` keeps
            // them: a COW copy into an upper object cannot finish in between
            // and be overwritten by the backing frame.
            let mut held: SmallVec<[ObjGuard; 4]> = SmallVec::new();
            let mut o = e.object.arc().clone();
            let mut p = e.pindex(a);
            let mut depth = 0;
            loop {
                held.push(o.lock());
                let Some(g) = held.last_mut() else { return };
                if let Some(pg) = g.pages.get_mut(&p) {
                    if pg.has(pf::BUSY) || !pg.has(pf::VALID) {
                        return;
                    }
                    let mut prot = if depth == 0 { base } else { base.without(Prot::WRITE) };
                    if !pg.has(pf::DIRTY) {
                        prot = prot.without(Prot::WRITE);
                    }
                    if pg.queue == Queue::Cache {
                        pg.queue = Queue::Inactive;
                    }
                    pg.clear(pf::ZERO);
                    rmap_add(pg, fs.map.pmap_id, a);
                    stages::timed(Stage::Install, || fs.map.pmap.enter(a, pg.frame, prot, false));
                    out.push((a, pg.frame, prot));
                    bump(&fs.vm.stats.prefault);
                    break;
                }
                if g.pager.is_some() {
                    return;
                }
                let next = g.backing.as_ref().map(|b| b.arc().clone());
                match (next, p.checked_add(g.backing_offset)) {
                    (Some(nx), Some(np)) => {
                        o = nx;
                        p = np;
                        depth += 1;
                    }
                    _ => return,
                }
            }
        }
    }
}

/// Resolves a run of `npages` pages from `addr` in one call (fault-around
/// for the VMM). Pages already mapped are skipped for reads. Stops at the
/// first error after the first page.
pub fn fault_range(map: &Map, addr: u64, npages: u64, access: Prot) -> Result<Vec<Resolved>, FaultError> {
    let base = addr & !(PS - 1);
    // `npages` is the caller's (possibly hostile) number: grow as pages resolve.
    let mut out = Vec::with_capacity(npages.min(64) as usize);
    for i in 0..npages {
        let Some(a) = i.checked_mul(PS).and_then(|o| base.checked_add(o)) else {
            if i == 0 {
                return Err(FaultError::NotMapped);
            }
            break;
        };
        if !access.writable() && map.pmap.extract(a).is_some() {
            continue;
        }
        match fault(map, a, access, FaultFlags::NO_PREFAULT) {
            Ok(r) => out.push(r),
            Err(e) if i == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(out)
}

/// Faults one page in without holding it (`vm_fault_quick`).
pub fn quick_fault(map: &Map, addr: u64, write: bool) -> Result<(), FaultError> {
    fault(map, addr, if write { Prot::WRITE } else { Prot::READ }, FaultFlags::NO_PREFAULT).map(|_| ())
}

/// Lets the VMM touch guest memory `[addr, addr+len)`: each page is brought
/// in through `fault()` (never read as zeros when swapped out), held, and
/// `f(offset_in_range, bytes)` is called with the map unchanged meanwhile.
pub fn access(
    map: &Map,
    addr: u64,
    len: usize,
    write: bool,
    mut f: impl FnMut(usize, &mut [u8]),
) -> Result<(), FaultError> {
    let want = if write { Prot::WRITE } else { Prot::READ };
    let mut done = 0usize;
    while done < len {
        let a = addr.checked_add(done as u64).ok_or(FaultError::NotMapped)?;
        let off = (a & (PS - 1)) as usize;
        let n = (PAGE_SIZE - off).min(len - done);
        let mut tries = 0;
        loop {
            tries += 1;
            if tries > 64 {
                return Err(FaultError::Failure);
            }
            let r = fault(map, a, want, FaultFlags::HOLD | FaultFlags::NO_PREFAULT)?;
            let g = map.inner.read();
            if g.timestamp != r.generation {
                continue;
            }
            let p = map.vm.pool.frame_ptr(r.frame);
            if p.is_null() {
                return Err(FaultError::Failure);
            }
            // SAFETY: the page is held (pageout will not free it) and the map
            // generation is unchanged (no clone/COW can redirect it) while we
            // hold the map read lock.
            let bytes = unsafe { std::slice::from_raw_parts_mut(p.add(off), n) };
            f(done, bytes);
            drop(g);
            drop(r);
            break;
        }
        done += n;
    }
    Ok(())
}

/// Reads guest memory through the pager.
pub fn read_guest(map: &Map, addr: u64, buf: &mut [u8]) -> Result<(), FaultError> {
    let len = buf.len();
    access(map, addr, len, false, |o, b| buf[o..o + b.len()].copy_from_slice(b))
}

/// Writes guest memory through the pager.
pub fn write_guest(map: &Map, addr: u64, buf: &[u8]) -> Result<(), FaultError> {
    access(map, addr, buf.len(), true, |o, b| b.copy_from_slice(&buf[o..o + b.len()]))
}
