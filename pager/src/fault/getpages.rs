//! Page-in: the seed's `readrest` block (read window, free-behind, busy
//! placeholders; `vm_fault_additional_pages` picks the neighbours), done
//! under the object lock, then `getpages` runs the pager with no lock held
//! (`vm_pager_get_pages`; FreeBSD's `vm_fault_getpages` does both).

use super::object::Chain;
use super::{FaultError, FaultState, FirstObject, Held, Retry};
use crate::frame::Frame;
use crate::map::Behavior;
use crate::object::{ObjGuard, Object, ObjectKind};
use crate::page::{pf, Page, Queue};
use crate::pager::{PageIo, Pager, PagerError};
use crate::pmap::remove_mappings;
use crate::vm::Vm;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// `VM_FAULT_READ_AHEAD`.
pub(crate) const READ_AHEAD: u64 = 8;
/// `VM_FAULT_READ_BEHIND`.
pub(crate) const READ_BEHIND: u64 = 7;
/// `VM_FAULT_READ`.
pub(crate) const READ_WINDOW: u64 = READ_AHEAD + READ_BEHIND + 1;
/// Frames kept free when deciding whether read-ahead is affordable.
const FREE_RESERVE: u64 = 4;

/// A page-in prepared under the locks, run by `getpages` without them.
pub(crate) struct PageInReq {
    obj: Arc<Object>,
    pager: Arc<dyn Pager>,
    ios: Vec<PageIo>,
    reqpage: usize,
}

/// The pager's answer for one page: it has `pindex` of `obj`, with
/// `behind`/`ahead` more pages contiguous on its store (`has_page`).
pub(super) struct PagerRun<'o> {
    pub(super) obj: &'o Arc<Object>,
    pub(super) pindex: u64,
    pub(super) behind: u64,
    pub(super) ahead: u64,
    pub(super) pager: Arc<dyn Pager>,
    /// The first object's kind (no free-behind for device objects).
    pub(super) first_kind: ObjectKind,
}

/// The `readrest` block: picks the read window from the entry's behaviour
/// (free-behind for a sequential reader), allocates the requested page and
/// its neighbours (`vm_fault_additional_pages`), updates `lastr` and
/// inserts busy placeholders. `g` is `run.obj`'s lock, `chain` the objects
/// above it.
pub(super) fn readrest(
    fs: &mut FaultState,
    req: &FirstObject,
    chain: &mut Chain,
    g: &mut ObjGuard,
    run: PagerRun,
) -> Result<PageInReq, Retry> {
    let vm = fs.vm;
    let e = req.entry;
    let (behind, ahead) = read_window(vm, req, chain, g, &run);
    let Some(req_frame) = vm.pool.alloc(run.obj.pref_frame(run.pindex)) else {
        return Err(Retry::NoMemory);
    };
    let (ios, reqpage) = additional_pages(vm, g, &run, req_frame, behind, ahead);
    // Imperfect, as in the seed: we do not know how much the pager reads.
    e.lastr.store((run.pindex + ios.len() as u64).wrapping_sub(behind), Ordering::Relaxed);
    for x in &ios {
        let mut p = Page::new(x.frame, pf::BUSY);
        p.queue = Queue::None;
        g.pages.insert(x.pindex, p);
    }
    g.pip += 1;
    Ok(PageInReq { obj: run.obj.clone(), pager: run.pager, ios, reqpage })
}

/// How many pages to read behind and ahead of `run.pindex`: none for a
/// `Random` entry; for a sequential reader (by advice, or a fault inside
/// the last read window) everything ahead, after freeing behind it.
fn read_window(vm: &Vm, req: &FirstObject, chain: &mut Chain, g: &mut ObjGuard, run: &PagerRun) -> (u64, u64) {
    let e = req.entry;
    let pindex = run.pindex;
    let (mut behind, mut ahead) = match e.behavior {
        Behavior::Random => (0, 0),
        _ => (pindex.min(READ_BEHIND), g.size.saturating_sub(pindex).clamp(1, READ_AHEAD)),
    };
    let lastr = e.lastr.load(Ordering::Relaxed);
    let in_window = pindex >= lastr && pindex < lastr.saturating_add(READ_WINDOW);
    if run.first_kind != ObjectKind::Device
        && (e.behavior == Behavior::Sequential || (e.behavior != Behavior::Random && in_window))
    {
        match chain.first_mut() {
            Some((_, fg, _)) => free_behind(vm, fg, req.pindex),
            None => free_behind(vm, g, req.pindex),
        }
        ahead += behind;
        behind = 0;
    }
    (behind, ahead)
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

/// `vm_fault_additional_pages`: frames for the requested page and the
/// non-resident neighbours the pager has contiguously (at most `behind`
/// before, `ahead` after), unless free frames are short. Returns the reads
/// in page order and the index of the requested one.
fn additional_pages(
    vm: &Vm,
    g: &ObjGuard,
    run: &PagerRun,
    req_frame: Frame,
    behind: u64,
    ahead: u64,
) -> (Vec<PageIo>, usize) {
    let (obj, pindex) = (run.obj, run.pindex);
    let io = |p: u64, f: Frame| PageIo { pindex: p, frame: f, done: false };
    let mut ios: Vec<PageIo> = Vec::new();
    let rahead = ahead.min(run.ahead);
    let rbehind = behind.min(run.behind);
    let cluster = g.kind != ObjectKind::Device && (rahead + rbehind) > 0;
    if !cluster {
        ios.push(io(pindex, req_frame));
        return (ios, 0);
    }
    if rahead + rbehind > vm.pool.free_count().saturating_sub(FREE_RESERVE) {
        vm.wake_pageout();
        ios.push(io(pindex, req_frame));
        return (ios, 0);
    }
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
    let reqpage = ios.len();
    ios.push(io(pindex, req_frame));
    let end = (pindex + 1 + rahead).min(g.size);
    for t in pindex + 1..end {
        if g.pages.contains_key(&t) {
            break;
        }
        match vm.pool.alloc(obj.pref_frame(t)) {
            Some(f) => ios.push(io(t, f)),
            None => break,
        }
    }
    (ios, reqpage)
}

/// Owns a page-in's busy placeholders: unless committed, dropping it (on
/// any path, unwinding included) removes them and frees their frames, drops
/// the paging-in-progress count (`vm_object_pip_wakeup`) and wakes waiters
/// (`vm_page_wakeup`).
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

/// Runs the pager with no lock held (`vm_pager_get_pages`). On success the
/// pages it filled become valid and the requested one is held until the
/// next pass finds it; a pager that does not have the page after all
/// (`Fail`) is skipped from now on.
pub(super) fn getpages(fs: &mut FaultState, req: PageInReq) -> Result<(), FaultError> {
    let vm = fs.vm;
    let PageInReq { obj, pager, ios, reqpage } = req;
    let mut guard = PlaceholderGuard { vm, obj: &obj, ios, committed: false };
    let r = pager.get_pages(obj.id, &vm.pool, &mut guard.ios, reqpage);
    match r {
        Ok(()) if guard.ios.get(reqpage).is_some_and(|x| x.done) => {
            commit(fs, &mut guard, reqpage);
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

/// A successful read: the placeholders the pager filled become valid
/// (inactive), the others go; the requested page is held (`fs.helds`).
fn commit(fs: &mut FaultState, guard: &mut PlaceholderGuard, reqpage: usize) {
    let vm = fs.vm;
    let obj = guard.obj;
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
                if let Some(h) = Held::new(&mut g, obj, x.pindex) {
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
}
