//! `pmap_prefault`: after a fault, enter the resident neighbours too.

use super::{FaultState, PS};
use crate::frame::Frame;
use crate::map::MapEntry;
use crate::object::ObjGuard;
use crate::page::{pf, Queue};
use crate::pmap::rmap_add;
use crate::stages::{self, Stage};
use crate::vm::{bump, Prot};
use smallvec::SmallVec;

/// Enters resident neighbours of the faulting address (-1, +1, ... -n, +n)
/// within the entry `e`; stops at the first one that is not resident;
/// pages of backing objects read-only.
pub(super) fn prefault(fs: &FaultState, e: &MapEntry, out: &mut Vec<(u64, Frame, Prot)>) {
    let n = fs.vm.config.prefault;
    let mut base = e.protection;
    if e.needs_copy {
        base = base.without(Prot::WRITE);
    }
    for i in 1..=n {
        for up in [false, true] {
            let a = if up { fs.vaddr.checked_add(i * PS) } else { fs.vaddr.checked_sub(i * PS) };
            let Some(a) = a else { continue };
            if a < e.start || a >= e.end {
                continue;
            }
            if fs.map.pmap.extract(a).is_some() {
                continue;
            }
            if !prefault_page(fs, e, a, base, out) {
                return;
            }
        }
    }
}

/// Enters the page at `a` if it is resident and valid in the first object
/// down the chain that has it. `false`: stop prefaulting (not resident,
/// busy, or an object with a pager on the way).
fn prefault_page(fs: &FaultState, e: &MapEntry, a: u64, base: Prot, out: &mut Vec<(u64, Frame, Prot)>) -> bool {
    // Locks are kept top-down until the enter, as `vm_fault_object` keeps
    // them: a COW copy into an upper object cannot finish in between and be
    // overwritten by the backing frame.
    let mut held: SmallVec<[ObjGuard; 4]> = SmallVec::new();
    let mut o = e.object.arc().clone();
    let mut p = e.pindex(a);
    let mut depth = 0;
    loop {
        held.push(o.lock());
        let Some(g) = held.last_mut() else { return false };
        if let Some(pg) = g.pages.get_mut(&p) {
            if pg.has(pf::BUSY) || !pg.has(pf::VALID) {
                return false;
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
            return true;
        }
        if g.pager.is_some() {
            return false;
        }
        let next = g.backing.as_ref().map(|b| b.arc().clone());
        match (next, p.checked_add(g.backing_offset)) {
            (Some(nx), Some(np)) => {
                o = nx;
                p = np;
                depth += 1;
            }
            _ => return false,
        }
    }
}
