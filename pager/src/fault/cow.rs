//! Copy-on-write (FreeBSD's `vm_fault_cow`; in the seed the "PAGE HAS BEEN
//! FOUND" block of `vm_fault_object`): a write to a page found in a backing object. The page
//! moves up into the first object when nobody else can see it
//! (`vm_page_rename`, counted as the seed's `v_cow_optim`), else it is
//! copied (`vm_page_copy`, `v_cow_faults`).

use super::object::{Found, Link};
use super::{FaultError, FaultKind, FaultState, FirstObject, Retry};
use crate::frame::Frame;
use crate::object::{ObjGuard, ObjectKind};
use crate::page::{pf, Page};
use crate::pmap::remove_map_mappings;
use crate::stages::{self, Stage};

/// Renames or copies the backing page (`backing`, `depth` objects below)
/// into the first object (`top`); both are locked.
pub(super) fn cow(
    fs: &mut FaultState,
    req: &FirstObject,
    top: Link,
    backing: Link,
    depth: usize,
) -> Result<Found, Retry> {
    let (bo, bg, bp) = &backing;
    // Our own hold (from the page-in that brought the page) does not count.
    let own = fs.helds.iter().filter(|h| h.is_on(bo, *bp)).count() as u16;
    let (can_move, src) = match bg.pages.get(bp) {
        Some(pg) => (pg.wire_count == 0 && pg.hold_count <= own && !pg.has(pf::FICTITIOUS), pg.frame),
        None => return Err(Retry::Again),
    };
    if depth == 1 && can_move && renamable(bg) {
        return rename(fs, req, top, backing);
    }
    copy(fs, req, top, backing, src)
}

/// The seed's rename conditions on the backing object (the map lock is
/// held, so the map generation cannot have changed): its only shadow is the
/// first object, nobody else references it or can look it up.
fn renamable(bg: &ObjGuard) -> bool {
    bg.shadow_count == 1
        && bg.ref_count == 1
        && bg.handle.is_none()
        && matches!(bg.kind, ObjectKind::Anonymous | ObjectKind::Swap)
}

/// `vm_page_rename` (`v_cow_optim`): the page itself moves up, dirty.
fn rename(fs: &mut FaultState, req: &FirstObject, top: Link, backing: Link) -> Result<Found, Retry> {
    let (fo, mut fg, fp) = top;
    let (bo, mut bg, bp) = backing;
    let Some(mut page) = bg.pages.remove(&bp) else {
        return Err(Retry::Again);
    };
    // The page leaves `bo`: drop our holds on it here, under the lock.
    for h in fs.helds.iter_mut().filter(|h| h.is_on(&bo, bp)) {
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
    Ok(Found { g: fg, obj: fo, pindex: fp, prot: req.prot, kind: FaultKind::CowRename })
}

/// `vm_page_copy`: a new page in the first object with the backing page's
/// bytes. Rate-limited as the seed limits every first-object allocation.
fn copy(fs: &mut FaultState, req: &FirstObject, top: Link, backing: Link, src: Frame) -> Result<Found, Retry> {
    fs.ratelimit()?;
    let (fo, mut fg, fp) = top;
    let (_, mut bg, bp) = backing;
    let vm = fs.vm;
    let Some(fr) = vm.pool.alloc(fo.pref_frame(fp)) else {
        return Err(Retry::NoMemory);
    };
    if stages::timed(Stage::CopyZero, || vm.pool.copy(src, fr)).is_err() {
        vm.pool.free(fr, true);
        return Err(FaultError::Failure.into());
    }
    if let Some(pg) = bg.pages.get_mut(&bp) {
        pg.set(pf::REFERENCED);
        // The copy replaces the backing page for this map only: no address
        // of it may keep showing the old frame.
        remove_map_mappings(vm, pg, fs.map.pmap_id, req.keep);
    }
    drop(bg);
    fg.pages.insert(fp, Page::new(fr, pf::VALID | pf::DIRTY));
    Ok(Found { g: fg, obj: fo, pindex: fp, prot: req.prot, kind: FaultKind::CowCopy })
}
