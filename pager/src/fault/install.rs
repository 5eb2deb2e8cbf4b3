//! The install step: the end of `vm_fault` once `vm_fault_object` found the
//! page. Dirty/referenced bits, wiring or activation (`vm_page_activate`),
//! the reverse map, VPAGETABLE A/M, `pmap_enter`, the hold, the counters,
//! then `pmap_prefault`. The page's object lock is dropped here (the seed's
//! `unlock_things` before `pmap_enter`; here the enter happens under it).

use super::lookup::Lookup;
use super::object::Found;
use super::{prefault, FaultFlags, FaultKind, FaultState, Held, Resolved, Retry};
use crate::map::MapType;
use crate::page::{pf, Page, Queue};
use crate::pmap::rmap_add;
use crate::stages::{self, Stage};
use crate::vm::{bump, Prot};
use crate::vpagetable;

/// Enters the found page at the faulting address and finishes the fault.
#[inline]
pub(super) fn install(fs: &mut FaultState, lk: Lookup, found: Found) -> Result<Resolved, Retry> {
    let Lookup { entry, target_addr, .. } = lk;
    let is_vpt = matches!(entry.maptype, MapType::VPageTable { .. });
    let Found { g: mut og, obj, pindex, prot, kind } = found;
    let pager = og.pager.clone();
    let Some(page) = og.pages.get_mut(&pindex) else {
        fs.walk = None;
        return Err(Retry::Again);
    };
    let (prot, unswap) = mark_page(fs, page, prot, kind, is_vpt.then_some(target_addr));
    let frame = page.frame;
    // A/M before the enter: the guest may run (and read its vptes) as soon
    // as the page is in.
    let changed = fs.walk.as_ref().map_or(0, |w| vpagetable::set_accessed(fs.vm, w, fs.fault_type));
    stages::timed(Stage::Install, || fs.map.pmap.enter(fs.vaddr, frame, prot, fs.wired));
    if unswap {
        if let Some(p) = &pager {
            // The backing copy is stale now (`vm_pager_page_unswapped`): free its slot (under the lock,
            // so pageout cannot write a new copy in between).
            p.page_unswapped(obj.id, pindex);
        }
    }
    let held = if fs.flags.has(FaultFlags::HOLD) { Held::new(&mut og, &obj, pindex) } else { None };
    drop(og);
    if let Some(w) = &fs.walk {
        vpagetable::dirty_tables(w, changed);
        // The table pages' holds end here (not `take()`: that would copy
        // the whole walk on every fault).
        fs.walk = None;
    }
    count(fs, kind);
    let mut pre = Vec::new();
    if !fs.wired
        && !fs.flags.has(FaultFlags::WIRE)
        && !fs.flags.has(FaultFlags::NO_PREFAULT)
        && !is_vpt
        && fs.vm.config.prefault > 0
    {
        prefault::prefault(fs, entry, &mut pre);
    }
    fs.helds.clear();
    Ok(Resolved { addr: fs.vaddr, frame, prot, kind, prefault: pre, generation: fs.map_generation, held })
}

/// The page's state for the enter: the protection to enter with (a clean
/// page read-only on a read, so the first write faults and dirties it),
/// dirty if entered writable (then its swap copy is stale: `true`),
/// referenced, wired or unwired (`vm_page_wire`/`vm_page_unwire` on
/// `VM_FAULT_WIRE`; a window's wiring is recorded by `window_target`, the
/// address it names), else activated (`vm_page_activate`), and the
/// reverse-map entry.
#[inline]
fn mark_page(
    fs: &FaultState,
    page: &mut Page,
    mut prot: Prot,
    kind: FaultKind,
    window_target: Option<u64>,
) -> (Prot, bool) {
    // A read through an RW|M window leaf is entered writable (the contract:
    // the guest said the page is modified, so a write must not fault), so a
    // clean page (paged in) is treated as written: dirty now.
    let window_grants_write = window_target.is_some() && prot.writable();
    if matches!(kind, FaultKind::Soft | FaultKind::PagerIn)
        && !fs.fault_type.writable()
        && !page.has(pf::DIRTY)
        && !window_grants_write
    {
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
            if let Some(addr) = window_target {
                fs.map.record_window_wiring(fs.vaddr, addr, page.frame);
            }
        } else {
            page.wire_count = page.wire_count.saturating_sub(1);
        }
    }
    page.queue = if page.wire_count > 0 || page.has(pf::FICTITIOUS) { Queue::None } else { Queue::Active };
    rmap_add(page, fs.map.pmap_id, fs.vaddr);
    (prot, unswap)
}

/// The per-kind counters (`v_zfod`, `v_cow_faults`, `v_cow_optim`, ...); a
/// fault that needed a pager read counts as a page-in too.
fn count(fs: &FaultState, kind: FaultKind) {
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
}
