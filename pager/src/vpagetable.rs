//! VPAGETABLE translation (`vm_fault_vpagetable`, the 2017+ behaviour with
//! the decisions in DESIGN.md): the guest's vpte tables map a VA-side page
//! index to a page of the entry's object.

use crate::fault::{resolve, FaultError, Found, Fs, Held, Step};
use crate::frame::Frame;
use crate::map::MapEntry;
use crate::object::Object;
use crate::page::{pf, Queue};
use crate::vm::{Prot, Vm};
use crate::vpte::*;
use smallvec::SmallVec;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// One in-memory entry on the walk path, its table page held.
pub(crate) struct PathEnt {
    // Keeps the table page from being paged out until the A/M update.
    _held: Held,
    obj: Arc<Object>,
    pindex: u64,
    frame: Frame,
    idx: usize,
}

/// Result of a walk.
pub(crate) struct Walk {
    pub(crate) pindex: u64,
    pub(crate) prot: Prot,
    path: SmallVec<[PathEnt; 4]>,
}

/// Walks from `master` through `levels` table levels. Invalid vpte at any
/// level -> `Failure`; write and NX permission are ANDed across levels; a
/// read fault maps read-only unless the leaf has RW|M (and every level RW).
#[allow(clippy::too_many_arguments)]
pub(crate) fn walk(
    fs: &mut Fs,
    e: &MapEntry,
    first: &Arc<Object>,
    va_pindex: u64,
    master: Vpte,
    levels: u32,
    fault_type: Prot,
    first_prot: Prot,
    timestamp: u64,
) -> Step<Walk> {
    let vm = fs.vm;
    let mut vpte = master;
    let mut vshift = VPTE_PAGE_BITS * levels.clamp(1, VPTE_MAX_LEVELS);
    let mut write_ok = true;
    let mut nx = false;
    let mut path: SmallVec<[PathEnt; 4]> = SmallVec::new();
    let pt_access = if e.protection.writable() { Prot::RW } else { Prot::READ };
    loop {
        if vpte & VPTE_V == 0 {
            return Step::Err(FaultError::Failure);
        }
        if vpte & VPTE_RW == 0 {
            write_ok = false;
            if fault_type.writable() {
                return Step::Err(FaultError::Failure);
            }
        }
        if vpte & VPTE_NX != 0 {
            nx = true;
            if fault_type.contains(Prot::EXEC) {
                return Step::Err(FaultError::Failure);
            }
        }
        if vpte & VPTE_PS != 0 || vshift == 0 {
            break;
        }
        // Table pages come through the normal object path (may be paged out).
        let Found { g: mut og, obj, pindex, .. } =
            match resolve(fs, e, first, vpte_pindex(vpte), pt_access, first_prot, timestamp) {
                Step::Ok(f) => f,
                other => return other.cast(),
            };
        let Some(page) = og.pages.get_mut(&pindex) else {
            return Step::Retry;
        };
        page.set(pf::REFERENCED);
        if page.wire_count == 0 && !page.has(pf::FICTITIOUS) {
            page.queue = Queue::Active;
        }
        let frame = page.frame;
        let Some(held) = Held::new(&mut og, &obj, pindex) else {
            return Step::Retry;
        };
        drop(og);
        vshift -= VPTE_PAGE_BITS;
        let idx = ((va_pindex >> vshift) & VPTE_PAGE_MASK) as usize;
        let Ok(word) = vm.pool.atomic_u64(frame, idx * 8) else {
            return Step::Err(FaultError::Failure);
        };
        vpte = word.load(Ordering::Acquire);
        path.push(PathEnt { _held: held, obj, pindex, frame, idx });
    }
    let low = if vshift >= 64 { va_pindex } else { va_pindex & ((1u64 << vshift) - 1) };
    let pindex = vpte_pindex(vpte).wrapping_add(low);
    let mut prot = first_prot;
    if !write_ok || (!fault_type.writable() && vpte & (VPTE_RW | VPTE_M) != (VPTE_RW | VPTE_M)) {
        prot = prot.without(Prot::WRITE);
    }
    if nx {
        prot = prot.without(Prot::EXEC);
    }
    Step::Ok(Walk { pindex, prot, path })
}

/// After a successful fault, before its page is entered (the vCPU may run
/// the moment it is): A on every in-memory entry of the path, M|A on a
/// write; never on an entry whose V is clear (compare-and-swap against
/// concurrent guest edits). Takes no object lock (the caller may hold the
/// data page's); returns which path entries changed, for `dirty_tables`.
pub(crate) fn set_accessed(vm: &Vm, w: &Walk, fault_type: Prot) -> u32 {
    let mut changed = 0;
    for (i, ent) in w.path.iter().enumerate() {
        let Ok(word) = vm.pool.atomic_u64(ent.frame, ent.idx * 8) else {
            continue;
        };
        let mut cur = word.load(Ordering::Acquire);
        loop {
            if cur & VPTE_V == 0 {
                break;
            }
            let mut n = cur | VPTE_A;
            if fault_type.writable() && cur & VPTE_RW != 0 {
                n |= VPTE_M;
            }
            if n == cur {
                break;
            }
            match word.compare_exchange(cur, n, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    changed |= 1 << i;
                    break;
                }
                Err(v) => cur = v,
            }
        }
    }
    changed
}

/// Table pages whose entries `set_accessed` changed become dirty (their
/// backing copy is stale). Called with no object lock held.
pub(crate) fn dirty_tables(w: &Walk, changed: u32) {
    for (i, ent) in w.path.iter().enumerate() {
        if changed & (1 << i) == 0 {
            continue;
        }
        let mut g = ent.obj.lock();
        let pager = g.pager.clone();
        if let Some(p) = g.pages.get_mut(&ent.pindex) {
            if !p.has(pf::DIRTY) {
                p.set(pf::DIRTY);
                if let Some(pg) = pager {
                    pg.page_unswapped(ent.obj.id(), ent.pindex);
                }
            }
            p.clear(pf::ZERO);
        }
    }
}
