//! The pageout daemon (`vm_pageout`): keeps resident frames within budget.
//!
//! A clock over every object's pages: referenced pages get a second chance
//! (the reference is cleared and their mappings removed, so the next touch
//! soft-faults and re-marks them); cached pages go first; clean pages are
//! freed; dirty pages are unmapped *then* written (anonymous objects become
//! swap objects) and freed. Wired, held and busy pages are skipped.

use crate::object::{BusyWrite, Object, ObjectKind};
use crate::page::{pf, Queue};
use crate::pager::PageIo;
use crate::pmap::{remove_mappings, test_referenced};
use crate::vm::{bump, Vm};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Most dirty pages written per object per pass.
const WRITE_BATCH: usize = 32;

/// What one pageout run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageoutReport {
    /// Pages looked at.
    pub scanned: u64,
    /// Clean pages freed.
    pub freed: u64,
    /// Dirty pages written and freed.
    pub written: u64,
    /// Referenced pages given a second chance.
    pub reactivated: u64,
    /// Write errors (page kept).
    pub errors: u64,
}

/// Frees frames until `free_target` are free (or nothing more can be done).
pub fn run_once(vm: &Vm, free_target: u64) -> PageoutReport {
    let _serial = vm.pageout_lock.lock();
    let mut rep = PageoutReport::default();
    let objects = vm.live_objects();
    if objects.is_empty() {
        return rep;
    }
    let need = |vm: &Vm| vm.pool.free_count() < free_target;
    // Pass 0: cached pages. Passes 1-3: the clock (second chance in between).
    for pass in 0..4 {
        if !need(vm) {
            break;
        }
        let start = vm.pageout_cursor.fetch_add(1, Ordering::Relaxed) as usize;
        for i in 0..objects.len() {
            if !need(vm) {
                break;
            }
            let obj = &objects[(start + i) % objects.len()];
            scan_object(vm, obj, pass, free_target, &mut rep);
        }
    }
    rep
}

/// Direct reclaim from a faulting thread.
pub(crate) fn reclaim(vm: &Vm, free_target: u64) -> u64 {
    if vm.pageout_lock.is_locked() {
        // The daemon (or another thread) is at it: let the caller wait.
        return 0;
    }
    let r = run_once(vm, free_target);
    r.freed + r.written
}

/// Scans one object from its clock hand, chunk by chunk, at most one
/// revolution per pass (so each page is visited once per pass), until the
/// target is met.
fn scan_object(vm: &Vm, obj: &Arc<Object>, pass: u32, free_target: u64, rep: &mut PageoutReport) {
    let total = obj.st.lock().pages.len();
    let mut looked_total = 0;
    while looked_total < total {
        let before = rep.written + rep.freed;
        let (looked, wrote) = scan_chunk(vm, obj, pass, free_target, rep);
        looked_total += looked;
        if looked == 0 || vm.pool.free_count() >= free_target {
            return;
        }
        if wrote > 0 && rep.written + rep.freed == before {
            // Writes are failing (swap full, I/O errors): stop here.
            return;
        }
    }
}

/// Pages visited per chunk (bounds the time an object lock is held).
const SCAN_CHUNK: usize = 512;

/// Scans up to `SCAN_CHUNK` pages from the hand; returns (pages visited,
/// dirty pages it tried to write).
fn scan_chunk(vm: &Vm, obj: &Arc<Object>, pass: u32, free_target: u64, rep: &mut PageoutReport) -> (usize, usize) {
    let mut batch: Vec<PageIo> = Vec::new();
    let mut looked = 0;
    let pager = {
        let mut g = obj.lock();
        if g.dead || g.kind == ObjectKind::Device {
            return (0, 0);
        }
        let mut to_free = Vec::new();
        // With swap full a dirty anonymous page cannot be written: do not
        // try (each try is a failed write and a warning).
        let can_swap = match g.kind {
            ObjectKind::Anonymous | ObjectKind::Swap => vm.swap.is_some() && !vm.swap_full(),
            ObjectKind::File => g.pager.is_some(),
            ObjectKind::Device => false,
        };
        let n = g.pages.len();
        let start = if g.scan_hand >= n { 0 } else { g.scan_hand };
        let keys: Vec<u64> = g.pages.keys().skip(start).take(SCAN_CHUNK).copied().collect();
        for p in keys {
            if vm.pool.free_count() + to_free.len() as u64 + batch.len() as u64 >= free_target
                || batch.len() >= WRITE_BATCH
            {
                break;
            }
            looked += 1;
            let Some(page) = g.pages.get_mut(&p) else {
                continue;
            };
            if !page.pageable() || !page.has(pf::VALID) {
                continue;
            }
            rep.scanned += 1;
            if pass == 0 {
                if page.queue == Queue::Cache && !page.has(pf::DIRTY) {
                    to_free.push(p);
                }
                continue;
            }

            if test_referenced(vm, page) {
                page.set(pf::REFERENCED);
            }
            if page.has(pf::REFERENCED) && pass < 3 {
                // Second chance: unmap so the next touch re-marks it.
                page.clear(pf::REFERENCED);
                if remove_mappings(vm, page) {
                    page.set(pf::DIRTY);
                }
                page.queue = Queue::Active;
                rep.reactivated += 1;
                continue;
            }
            // Unmap before looking at dirtiness, so no write slips past.
            if remove_mappings(vm, page) {
                page.set(pf::DIRTY);
            }
            if !page.has(pf::DIRTY) {
                to_free.push(p);
            } else if can_swap {
                page.set(pf::BUSY);
                page.queue = Queue::Inactive;
                batch.push(PageIo { pindex: p, frame: page.frame, done: false });
            } else {
                page.queue = Queue::Inactive;
            }
        }
        g.scan_hand = start + looked;
        let mut frames = Vec::with_capacity(to_free.len());
        for p in to_free {
            if let Some(page) = g.pages.remove(&p) {
                frames.push((page.frame, !page.has(pf::ZERO)));
                rep.freed += 1;
                bump(&vm.stats.pages_freed);
            }
        }
        vm.pool.free_many(&mut frames);
        if batch.is_empty() {
            None
        } else {
            if g.kind == ObjectKind::Anonymous {
                // First pageout: anonymous memory becomes swap-backed.
                g.kind = ObjectKind::Swap;
                g.pager = vm.swap.clone().map(|s| s as Arc<dyn crate::pager::Pager>);
            }
            g.pip += 1;
            g.pager.clone()
        }
    };
    if batch.is_empty() {
        return (looked, 0);
    }
    batch.sort_by_key(|b| b.pindex);
    let n = batch.len();
    let mut bw = BusyWrite { obj, ios: batch, armed: true };
    let res = match &pager {
        Some(p) => p.put_pages(obj.id(), &vm.pool, &mut bw.ios),
        None => Err(crate::pager::PagerError::Error),
    };
    if let Err(e) = res {
        static RL: crate::vm::RateLimit = crate::vm::RateLimit::new();
        crate::warn_ratelimited!(RL, "pageout: object {} write failed: {e}", obj.id());
    }
    let mut g = obj.lock();
    let mut frames = Vec::with_capacity(n);
    for b in &bw.ios {
        let Some(page) = g.pages.get_mut(&b.pindex) else {
            continue;
        };
        if b.done && page.frame == b.frame {
            // Busy and unmapped since before the write: nothing can have
            // dirtied it.
            if let Some(page) = g.pages.remove(&b.pindex) {
                frames.push((page.frame, true));
            }
            rep.written += 1;
            bump(&vm.stats.pages_out);
        } else {
            // Still busy: the guard un-busies it.
            rep.errors += 1;
            bump(&vm.stats.pageout_errors);
        }
    }
    vm.pool.free_many(&mut frames);
    bw.finish(&mut g);
    drop(g);
    (looked, n)
}

/// A running pageout daemon thread; stopped and joined on drop.
pub struct PageoutDaemon {
    stop: Arc<AtomicBool>,
    vm: Arc<Vm>,
    handle: Option<JoinHandle<()>>,
}

impl PageoutDaemon {
    /// Starts the daemon for `vm`.
    pub fn start(vm: &Arc<Vm>) -> std::io::Result<PageoutDaemon> {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, v) = (stop.clone(), vm.clone());
        let handle = std::thread::Builder::new().name("pageout".into()).spawn(move || {
            let mut idle = false;
            while !s.load(Ordering::Relaxed) {
                // Aim for twice the fault path's target, but never for
                // more than half the budget (small budgets would thrash).
                let target = (v.config.free_target * 2).min(v.pool.max_resident() / 2).max(1);
                {
                    let mut g = v.pageout_lock.lock();
                    if idle || v.pool.free_count() >= target {
                        let _ = v.pageout_wake.wait_for(&mut g, Duration::from_millis(20));
                    }
                }
                idle = false;
                if v.pool.free_count() < target {
                    let r = run_once(&v, target);
                    // Nothing pageable (all wired, held or unwritable):
                    // wait for a wakeup instead of spinning.
                    idle = r.freed + r.written == 0;
                }
            }
        })?;
        Ok(PageoutDaemon { stop, vm: vm.clone(), handle: Some(handle) })
    }
}

impl Drop for PageoutDaemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.vm.wake_pageout();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
