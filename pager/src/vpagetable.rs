//! VPAGETABLE translation (`vm_fault_vpagetable`, the 2017+ behaviour with
//! the decisions listed in pager/README.md, "Decisions (quirks)", the
//! VPAGETABLE items): the guest's vpte tables map a VA-side page index to a
//! frame number `i`, the page the map shows at `target + i * 4096` (its
//! RAM). Table and data pages are resolved through the map's `Normal` entry
//! there, exactly as a fault at that address, so a window always sees its
//! own VM's memory (shadow objects included).

use crate::fault::{fault_object, lookup_normal, FaultError, FaultState, Found, Held, Retry};
use crate::frame::{Frame, PAGE_SIZE};
use crate::map::{MapEntry, MapInner, MapType};
use crate::object::Object;
use crate::page::{pf, Queue};
use crate::vm::{Prot, Vm};
use crate::vpte::*;
use smallvec::SmallVec;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const PS: u64 = PAGE_SIZE as u64;

/// One in-memory entry on the walk path, its table page held.
pub(crate) struct PathEnt {
    // Keeps the table page from being paged out until the A/M update.
    _held: Held,
    obj: Arc<Object>,
    pindex: u64,
    frame: Frame,
    idx: usize,
    /// The vpte as the walk read it: A/M go only into that same entry.
    seen: Vpte,
    /// The table page was resolved for write (it is this map's own copy);
    /// otherwise A/M are not written.
    writable: bool,
}

/// Result of a walk.
pub(crate) struct Walk {
    /// Frame number of the data page (checked by `target_entry`).
    pub(crate) frame: u64,
    pub(crate) prot: Prot,
    path: SmallVec<[PathEnt; 4]>,
}

/// The `Normal` entry showing frame number `frame` of a window, and the
/// address there. A frame beyond the bound, or an address no `Normal` entry
/// covers, is a protection failure.
pub(crate) fn target_entry<'g>(g: &'g MapInner, e: &MapEntry, frame: u64) -> Result<(&'g MapEntry, u64), FaultError> {
    let MapType::VPageTable { target, target_pages, .. } = e.maptype else {
        return Err(FaultError::Protection);
    };
    if frame >= target_pages {
        return Err(FaultError::Protection);
    }
    let addr = frame.checked_mul(PS).and_then(|o| target.checked_add(o)).ok_or(FaultError::Protection)?;
    match g.lookup(addr) {
        Some(re) if re.maptype == MapType::Normal => Ok((re, addr)),
        _ => Err(FaultError::Protection),
    }
}

/// Permissions gathered down the walk: write and NX are ANDed across levels.
struct Perms {
    write_ok: bool,
    nx: bool,
}

impl Perms {
    /// One level's vpte against the fault: V clear, no RW on a write or NX
    /// on an exec -> `InvalidVpte`.
    fn check(&mut self, vpte: Vpte, fault_type: Prot) -> Result<(), FaultError> {
        if vpte & VPTE_V == 0 {
            return Err(FaultError::InvalidVpte);
        }
        if vpte & VPTE_RW == 0 {
            self.write_ok = false;
            if fault_type.writable() {
                return Err(FaultError::InvalidVpte);
            }
        }
        if vpte & VPTE_NX != 0 {
            self.nx = true;
            if fault_type.contains(Prot::EXEC) {
                return Err(FaultError::InvalidVpte);
            }
        }
        Ok(())
    }
}

/// `vm_fault_vpagetable`: walks the window entry `e` for the faulting
/// address from its master through its table levels. Invalid vpte at any
/// level -> `InvalidVpte`; write and NX permission are ANDed across levels;
/// a read fault maps read-only unless the leaf has RW|M (and every level
/// RW). The protection starts from the window entry's.
pub(crate) fn walk(fs: &mut FaultState, g: &MapInner, e: &MapEntry) -> Result<Walk, Retry> {
    let MapType::VPageTable { master, levels, .. } = e.maptype else {
        return Err(FaultError::Protection.into());
    };
    let va_pindex = e.pindex(fs.vaddr);
    let mut vpte = master;
    let mut vshift = VPTE_PAGE_BITS * levels.clamp(1, VPTE_MAX_LEVELS);
    let mut perms = Perms { write_ok: true, nx: false };
    let mut path: SmallVec<[PathEnt; 4]> = SmallVec::new();
    loop {
        perms.check(vpte, fs.fault_type)?;
        if vpte & VPTE_PS != 0 || vshift == 0 {
            break;
        }
        vshift -= VPTE_PAGE_BITS;
        let idx = ((va_pindex >> vshift) & VPTE_PAGE_MASK) as usize;
        let ent = table_entry(fs, g, e, vpte, idx)?;
        vpte = ent.seen;
        path.push(ent);
    }
    let low = if vshift >= 64 { va_pindex } else { va_pindex & ((1u64 << vshift) - 1) };
    let Some(frame) = vpte_pindex(vpte).checked_add(low) else {
        return Err(FaultError::Protection.into());
    };
    let mut prot = e.protection;
    if !perms.write_ok || (!fs.fault_type.writable() && vpte & (VPTE_RW | VPTE_M) != (VPTE_RW | VPTE_M)) {
        prot = prot.without(Prot::WRITE);
    }
    if perms.nx {
        prot = prot.without(Prot::EXEC);
    }
    Ok(Walk { frame, prot, path })
}

/// Reads entry `idx` of the table page `vpte` points at. Table pages come
/// through the map, as a fault on their address would: the VM's own copy
/// (COW'd before A/M go in), paged in if out; the page is activated
/// (`vm_page_activate`) and held until the A/M update.
fn table_entry(fs: &mut FaultState, g: &MapInner, e: &MapEntry, vpte: Vpte, idx: usize) -> Result<PathEnt, Retry> {
    let (re, addr) = target_entry(g, e, vpte_pindex(vpte))?;
    let writable = re.protection.writable();
    let pt_access = if writable { Prot::RW } else { Prot::READ };
    let first = lookup_normal(re, addr, pt_access, re.protection)?;
    let Found { g: mut og, obj, pindex, .. } = fault_object(fs, &first)?;
    let Some(page) = og.pages.get_mut(&pindex) else {
        return Err(Retry::Again);
    };
    page.set(pf::REFERENCED);
    if page.wire_count == 0 && !page.has(pf::FICTITIOUS) {
        page.queue = Queue::Active;
    }
    let frame = page.frame;
    let Some(held) = Held::new(&mut og, &obj, pindex) else {
        return Err(Retry::Again);
    };
    drop(og);
    let Ok(word) = fs.vm.pool.atomic_u64(frame, idx * 8) else {
        return Err(FaultError::Failure.into());
    };
    let seen = word.load(Ordering::Acquire);
    Ok(PathEnt { _held: held, obj, pindex, frame, idx, seen, writable })
}

/// After a successful fault, before its page is entered (the vCPU may run
/// the moment it is): A on every in-memory entry of the path, M|A on a
/// write. Compare-and-swap against the value the walk read: an entry the
/// guest has replaced since (V cleared, another frame or flags) gets
/// nothing. Only tables resolved for write (this map's own copy) are
/// written. Takes no object lock (the caller may hold the data page's);
/// returns which path entries changed, for `dirty_tables`.
pub(crate) fn set_accessed(vm: &Vm, w: &Walk, fault_type: Prot) -> u32 {
    let mut changed = 0;
    for (i, ent) in w.path.iter().enumerate() {
        if !ent.writable {
            continue;
        }
        let Ok(word) = vm.pool.atomic_u64(ent.frame, ent.idx * 8) else {
            continue;
        };
        let mut cur = word.load(Ordering::Acquire);
        loop {
            // Only the entry the walk used (A/M set by others meanwhile
            // aside): one the guest has since replaced gets nothing.
            if cur & !(VPTE_A | VPTE_M) != ent.seen & !(VPTE_A | VPTE_M) {
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
