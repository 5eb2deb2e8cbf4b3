//! `vm_fault_object`: finds or makes the page for a first object and index.
//! Walks the shadow chain top-down holding each object's lock, first hit
//! wins; a pager is asked where `TRYPAGER` holds (`getpages`); past the end
//! of the chain the page is zero-filled in the first object (`zerofill`); a
//! write to a backing page renames or copies it up (`cow`).

use super::{cow, getpages, zerofill, FaultError, FaultFlags, FaultKind, FaultState, FirstObject, Retry};
use crate::object::{ObjGuard, Object};
use crate::page::{pf, Page, Queue};
use crate::vm::{bump, Prot, Vm};
use smallvec::SmallVec;
use std::sync::Arc;

/// One object of the chain with its lock held, and the page index in it.
pub(super) type Link = (Arc<Object>, ObjGuard, u64);
/// The objects walked so far, top-down, each still locked: locks are taken
/// top-down and kept until the step is done.
pub(super) type Chain = SmallVec<[Link; 4]>;

/// A page found (or made) by `fault_object`, its object still locked.
pub(crate) struct Found {
    pub(crate) g: ObjGuard,
    pub(crate) obj: Arc<Object>,
    pub(crate) pindex: u64,
    pub(crate) prot: Prot,
    pub(crate) kind: FaultKind,
}

/// `vm_fault_object`: the page for `req`, found resident down the chain,
/// brought in by a pager (after a `Retry::PageIn` and a new pass),
/// zero-filled, or copied/renamed into the first object on a write.
pub(crate) fn fault_object(fs: &mut FaultState, req: &FirstObject) -> Result<Found, Retry> {
    let mut chain = Chain::new();
    let Some(depth) = walk_chain(fs, req, &mut chain)? else {
        return zerofill::zerofill(fs, &mut chain, req.prot);
    };
    let plain = if fs.hardfault { FaultKind::PagerIn } else { FaultKind::Soft };
    let Some((obj, mut g, pindex)) = chain.pop() else {
        return Err(Retry::Again);
    };
    if depth == 0 {
        return Ok(Found { g, obj, pindex, prot: req.prot, kind: plain });
    }
    if !req.fault_type.writable() {
        // Read of a backing page: map it read-only, shared.
        chain.clear();
        if let Some(pg) = g.pages.get_mut(&pindex) {
            pg.set(pf::REFERENCED);
        }
        return Ok(Found { g, obj, pindex, prot: req.prot.without(Prot::WRITE), kind: plain });
    }
    chain.truncate(1);
    let Some(top) = chain.pop() else {
        return Err(Retry::Again);
    };
    cow::cow(fs, req, top, (obj, g, pindex), depth)
}

/// The chain walk of `vm_fault_object`: from the first object down
/// (FreeBSD's `vm_fault_next`), each object's lock kept in `chain`, until an object
/// has the page (its depth) or the chain ends (`None`: zero-fill).
fn walk_chain(fs: &mut FaultState, req: &FirstObject, chain: &mut Chain) -> Result<Option<usize>, Retry> {
    let mut obj = req.object.clone();
    let mut pindex = req.pindex;
    loop {
        let mut g = obj.lock();
        let depth = chain.len();
        if g.dead {
            // `OBJ_DEAD`. A dead backing object was collapsed away under us: look again.
            return Err(if depth == 0 { FaultError::Protection.into() } else { Retry::Again });
        }
        if let Some(pg) = g.pages.get(&pindex) {
            if pg.has(pf::BUSY) {
                // `vm_page_sleep_busy` once the locks are gone.
                return Err(Retry::WaitBusy(obj.clone(), pindex));
            }
            if !pg.has(pf::VALID) {
                return Err(drop_stray(fs.vm, &obj, &mut g, pindex));
            }
            chain.push((obj, g, pindex));
            return Ok(Some(depth));
        }
        let trypager = trypager(fs, &g, &obj);
        if (trypager || depth == 0) && pindex >= g.size {
            return Err(FaultError::Protection.into());
        }
        if trypager && ask_pager(fs, req, chain, &obj, &mut g, pindex)? {
            chain.push((obj, g, pindex));
            return Ok(Some(depth));
        }
        // On to the backing object (FreeBSD's `vm_fault_next`).
        let next = g.backing.as_ref().map(|b| b.arc().clone());
        let np = pindex.checked_add(g.backing_offset);
        chain.push((obj, g, pindex));
        match (next, np) {
            (Some(n), Some(np)) => {
                obj = n;
                pindex = np;
            }
            // An index past u64 is past every backing object: none has it.
            _ => return Ok(None),
        }
    }
}

/// `TRYPAGER`: the object has a pager, this is not a wiring fault on an
/// unwired entry, and its pager did not answer "fail" earlier in this fault.
fn trypager(fs: &FaultState, g: &ObjGuard, obj: &Object) -> bool {
    g.pager.is_some() && (!fs.flags.has(FaultFlags::WIRE) || fs.wired) && !fs.skip.contains(&obj.id)
}

/// Only busy placeholders are invalid; never wait on one that nobody will
/// finish (that would hang): drop it, look again.
fn drop_stray(vm: &Vm, obj: &Object, g: &mut ObjGuard, pindex: u64) -> Retry {
    log::error!("vm_fault: stray invalid page {} in object {}", pindex, obj.id);
    if let Some(p) = g.pages.remove(&pindex) {
        vm.pool.free(p.frame, true);
    }
    Retry::Again
}

/// Asks `obj`'s pager for page `pindex` (where `TRYPAGER` holds). `true`:
/// a fixed frame (device pager) is now resident; `false`: the pager does
/// not have it, go on down the chain; `Retry::PageIn`: the `readrest`
/// block prepared a read, which `fault` runs with no lock held.
fn ask_pager(
    fs: &mut FaultState,
    req: &FirstObject,
    chain: &mut Chain,
    obj: &Arc<Object>,
    g: &mut ObjGuard,
    pindex: u64,
) -> Result<bool, Retry> {
    let Some(pager) = g.pager.clone() else {
        return Ok(false);
    };
    if let Some(fr) = pager.fixed_frame(obj.id, pindex) {
        let mut p = Page::new(fr, pf::VALID | pf::FICTITIOUS);
        p.queue = Queue::None;
        g.pages.insert(pindex, p);
        fs.hardfault = true;
        bump(&fs.vm.stats.pages_in);
        return Ok(true);
    }
    let Some((behind, ahead)) = pager.has_page(obj.id, pindex) else {
        return Ok(false);
    };
    fs.ratelimit()?;
    let first_kind = chain.first().map_or(g.kind, |(_, fg, _)| fg.kind);
    let run = getpages::PagerRun { obj, pindex, behind: behind as u64, ahead: ahead as u64, pager, first_kind };
    let io = getpages::readrest(fs, req, chain, g, run)?;
    // The map lock goes for the I/O (`lookup_still_valid` = FALSE).
    fs.io_generation = Some(fs.map_generation);
    Err(Retry::PageIn(io))
}
