//! VM objects (`vm_object`): resident pages, shadow chains, reference counts,
//! termination and collapse.

use crate::frame::Frame;
use crate::page::{pf, Page};
use crate::pager::Pager;
use crate::pmap::remove_mappings;
use crate::vm::{bump, Vm};
use parking_lot::{Condvar, Mutex};

use std::mem::ManuallyDrop;
use std::sync::{Arc, Weak};

/// Object type (`objtype_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    /// Zero-fill, no pager (`OBJT_DEFAULT`); becomes `Swap` on first pageout.
    Anonymous,
    /// Swap-backed anonymous memory.
    Swap,
    /// A host file.
    File,
    /// Fixed device frames.
    Device,
}

/// Mutable object state, under the object's mutex.
pub(crate) struct ObjState {
    pub(crate) kind: ObjectKind,
    pub(crate) size: u64,
    pub(crate) backing: Option<ObjHandle>,
    pub(crate) backing_offset: u64,
    pub(crate) ref_count: u32,
    pub(crate) shadow_count: u32,
    pub(crate) shadows: Vec<Weak<Object>>,
    pub(crate) pages: crate::page::IndexMap<Page>,
    pub(crate) generation: u64,
    pub(crate) dead: bool,
    pub(crate) handle: Option<u64>,
    pub(crate) pager: Option<Arc<dyn Pager>>,
    /// Paging in progress: I/O on this object is running (blocks collapse).
    pub(crate) pip: u32,
    /// Pageout's clock hand (position in the page table's iteration order).
    pub(crate) scan_hand: usize,
}

/// A VM object.
pub struct Object {
    pub(crate) id: u64,
    pub(crate) vm: Arc<Vm>,
    pub(crate) frame_base: Option<u64>,
    pub(crate) frame_len: u64,
    pub(crate) st: Arc<Mutex<ObjState>>,
    pub(crate) cv: Condvar,
}

pub(crate) type ObjGuard = parking_lot::ArcMutexGuard<parking_lot::RawMutex, ObjState>;

impl Object {
    pub(crate) fn create(
        vm: &Arc<Vm>,
        kind: ObjectKind,
        size: u64,
        pager: Option<Arc<dyn Pager>>,
        handle: Option<u64>,
    ) -> ObjHandle {
        let frame_base = vm.pool.reserve_range(size);
        let obj = Arc::new(Object {
            id: vm.new_id(),
            vm: vm.clone(),
            frame_base,
            frame_len: if frame_base.is_some() { size } else { 0 },
            st: Arc::new(Mutex::new(ObjState {
                kind,
                size,
                backing: None,
                backing_offset: 0,
                ref_count: 1,
                shadow_count: 0,
                shadows: Vec::new(),
                pages: Default::default(),
                generation: 0,
                dead: false,
                handle,
                pager,
                pip: 0,
                scan_hand: 0,
            })),
            cv: Condvar::new(),
        });
        vm.objects.lock().push(Arc::downgrade(&obj));
        ObjHandle(ManuallyDrop::new(obj))
    }

    /// Object id (pagers name objects by it).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn lock(&self) -> ObjGuard {
        self.st.lock_arc()
    }

    /// The preferred frame of page `pindex`.
    pub(crate) fn pref_frame(&self, pindex: u64) -> Option<Frame> {
        match self.frame_base {
            Some(b) if pindex < self.frame_len => Some(b + pindex),
            _ => None,
        }
    }

    /// The frames reserved for this object's pages (`base + pindex`), if
    /// any: a VMM maps them contiguously so guest pages stay mergeable.
    pub fn preferred_frames(&self) -> Option<(Frame, u64)> {
        self.frame_base.map(|b| (b, self.frame_len))
    }

    /// Waits until page `pindex` is not busy (or gone). Never spins.
    pub(crate) fn wait_unbusy(&self, pindex: u64) {
        let mut g = self.st.lock();
        while g.pages.get(&pindex).is_some_and(|p| p.has(pf::BUSY)) {
            self.cv.wait(&mut g);
        }
    }

    /// Kind.
    pub fn kind(&self) -> ObjectKind {
        self.st.lock().kind
    }
    /// Size in pages.
    pub fn size(&self) -> u64 {
        self.st.lock().size
    }
    /// Reference count.
    pub fn ref_count(&self) -> u32 {
        self.st.lock().ref_count
    }
    /// Shadow count.
    pub fn shadow_count(&self) -> u32 {
        self.st.lock().shadow_count
    }
    /// Dead (terminated or collapsed away)?
    pub fn is_dead(&self) -> bool {
        self.st.lock().dead
    }
    /// Resident page count.
    pub fn resident(&self) -> usize {
        self.st.lock().pages.len()
    }
    /// Backing object and offset in pages.
    pub fn backing(&self) -> Option<(Arc<Object>, u64)> {
        let g = self.st.lock();
        g.backing.as_ref().map(|b| (b.arc().clone(), g.backing_offset))
    }
    /// Shadow chain length from this object down (1 = no backing).
    pub fn chain_len(self: &Arc<Object>) -> usize {
        let mut n = 1;
        let mut o = self.backing();
        while let Some((b, _)) = o {
            n += 1;
            o = b.backing();
        }
        n
    }
    /// Calls `f` on the resident page `pindex`, if any.
    pub fn with_page<R>(&self, pindex: u64, f: impl FnOnce(&Page) -> R) -> Option<R> {
        self.st.lock().pages.get(&pindex).map(f)
    }
    /// Resident page indexes, sorted.
    pub fn resident_pindexes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.st.lock().pages.keys().copied().collect();
        v.sort_unstable();
        v
    }
    /// Object generation (bumped when pages move between objects).
    pub fn generation(&self) -> u64 {
        self.st.lock().generation
    }

    /// Writes every dirty page back to the pager (shared file mappings):
    /// mappings are write-protected before the data is written.
    pub fn sync(&self) -> Result<usize, crate::pager::PagerError> {
        let (pager, mut ios) = {
            let mut g = self.lock();
            let Some(pager) = g.pager.clone() else {
                return Ok(0);
            };
            if g.kind == ObjectKind::Device {
                return Ok(0);
            }
            let mut ios = Vec::new();
            for (&p, page) in g.pages.iter_mut() {
                if page.has(pf::DIRTY) && !page.has(pf::BUSY) && page.has(pf::VALID) {
                    page.set(pf::BUSY);
                    crate::pmap::protect_mappings(&self.vm, page, crate::vm::Prot::READ | crate::vm::Prot::EXEC);
                    page.clear(pf::DIRTY);
                    ios.push(crate::pager::PageIo { pindex: p, frame: page.frame, done: false });
                }
            }
            g.pip += 1;
            (pager, ios)
        };
        ios.sort_by_key(|p| p.pindex);
        let mut bw = BusyWrite { obj: self, ios, armed: true };
        let res = pager.put_pages(self.id, &self.vm.pool, &mut bw.ios);
        let mut g = self.lock();
        let mut n = 0;
        for io in &bw.ios {
            if let Some(page) = g.pages.get_mut(&io.pindex) {
                if io.done {
                    n += 1;
                } else {
                    page.set(pf::DIRTY);
                }
            }
        }
        bw.finish(&mut g);
        drop(g);
        res.map(|_| n)
    }
}

/// Pages of one object made busy for a pager write (pageout, `sync`), with a
/// paging-in-progress count: dropping the guard un-busies whatever is still
/// busy, drops the count and wakes waiters, whatever path the caller took.
pub(crate) struct BusyWrite<'a> {
    pub(crate) obj: &'a Object,
    pub(crate) ios: Vec<crate::pager::PageIo>,
    pub(crate) armed: bool,
}

impl BusyWrite<'_> {
    /// Un-busies the pages still here, under the caller's lock (so a frame
    /// the caller just freed cannot have been reused for a new busy page at
    /// the same index), and drops the paging-in-progress count.
    pub(crate) fn finish(mut self, g: &mut ObjState) {
        for io in &self.ios {
            if let Some(p) = g.pages.get_mut(&io.pindex) {
                if p.frame == io.frame {
                    p.clear(pf::BUSY);
                }
            }
        }
        g.pip = g.pip.saturating_sub(1);
        self.armed = false;
    }
}

impl Drop for BusyWrite<'_> {
    fn drop(&mut self) {
        if !self.armed {
            self.obj.cv.notify_all();
            return;
        }
        // Early exit: nothing was freed, so every (pindex, frame) is ours.
        let mut g = self.obj.st.lock();
        for io in &self.ios {
            if let Some(p) = g.pages.get_mut(&io.pindex) {
                if p.frame == io.frame {
                    p.clear(pf::BUSY);
                }
            }
        }
        g.pip = g.pip.saturating_sub(1);
        drop(g);
        self.obj.cv.notify_all();
    }
}

/// A counted reference to an object (`vm_object_reference`/`deallocate`).
pub struct ObjHandle(ManuallyDrop<Arc<Object>>);

impl ObjHandle {
    /// The object.
    pub fn arc(&self) -> &Arc<Object> {
        &self.0
    }

    /// Creates a shadow object of `pages` pages over `self` at `offset` pages
    /// (`vm_object_shadow`); the shadow takes over this reference.
    pub fn shadow(self, pages: u64, offset: u64) -> ObjHandle {
        let vm = self.0.vm.clone();
        let s = Object::create(&vm, ObjectKind::Anonymous, pages, None, None);
        {
            let mut bg = self.0.lock();
            bg.shadow_count += 1;
            bg.shadows.push(Arc::downgrade(s.arc()));
        }
        let mut sg = s.arc().lock();
        sg.backing = Some(self);
        sg.backing_offset = offset;
        drop(sg);
        s
    }

    fn into_arc(self) -> Arc<Object> {
        let mut me = ManuallyDrop::new(self);
        // SAFETY: `me` is never used or dropped again.
        unsafe { ManuallyDrop::take(&mut me.0) }
    }
}

impl Clone for ObjHandle {
    fn clone(&self) -> ObjHandle {
        self.0.st.lock().ref_count += 1;
        ObjHandle(ManuallyDrop::new(Arc::clone(&self.0)))
    }
}

impl std::ops::Deref for ObjHandle {
    type Target = Object;
    fn deref(&self) -> &Object {
        &self.0
    }
}

impl Drop for ObjHandle {
    fn drop(&mut self) {
        // SAFETY: taken once, in drop.
        let obj = unsafe { ManuallyDrop::take(&mut self.0) };
        deallocate(obj);
    }
}

/// Drops one reference (`vm_object_deallocate`): terminate at zero, collapse
/// the single remaining shadow at one.
fn deallocate(obj: Arc<Object>) {
    let mut g = obj.st.lock();
    g.ref_count = g.ref_count.saturating_sub(1);
    if g.ref_count == 0 && !g.dead {
        drop(g);
        terminate(&obj);
        return;
    }
    if g.ref_count == 1 && g.shadow_count == 1 && obj.vm.config.auto_collapse && !g.dead {
        let s = g.shadows.iter().find_map(|w| w.upgrade());
        drop(g);
        if let Some(s) = s {
            collapse(&s);
        }
    }
}

fn unlink_shadow(backing: &Object, shadow: &Arc<Object>, replace: Option<Weak<Object>>) {
    let mut bg = backing.st.lock();
    let me = Arc::as_ptr(shadow);
    bg.shadows.retain(|w| w.as_ptr() != me && w.strong_count() > 0);
    match replace {
        Some(w) => bg.shadows.push(w),
        None => bg.shadow_count = bg.shadow_count.saturating_sub(1),
    }
}

/// Frees everything an object holds (`vm_object_terminate`).
fn terminate(obj: &Arc<Object>) {
    // Dirty pages of a file object are the file's data (shared mappings):
    // write them back before the pages go, or say that they are lost.
    let dirty_file = {
        let g = obj.st.lock();
        g.kind == ObjectKind::File && g.pages.values().any(|p| p.has(pf::DIRTY))
    };
    if dirty_file {
        if let Err(e) = obj.sync() {
            bump(&obj.vm.stats.pageout_errors);
            log::error!("object {}: writing dirty file pages back at termination failed ({e}): data lost", obj.id);
        }
    }
    let (pages, backing, pager) = {
        let mut g = obj.lock();
        // Wait out I/O in progress on our pages.
        while g.pages.values().any(|p| p.has(pf::BUSY)) {
            drop(g);
            let busy = obj.st.lock().pages.iter().find(|(_, p)| p.has(pf::BUSY)).map(|(k, _)| *k);
            if let Some(k) = busy {
                obj.wait_unbusy(k);
            }
            g = obj.lock();
        }
        g.dead = true;
        g.generation += 1;
        (std::mem::take(&mut g.pages), g.backing.take(), g.pager.clone())
    };
    let mut frames = Vec::with_capacity(pages.len());
    for (_, mut page) in pages {
        remove_mappings(&obj.vm, &mut page);
        if !page.has(pf::FICTITIOUS) {
            frames.push((page.frame, !page.has(pf::ZERO)));
        }
    }
    // Preferred frames make an object's pages contiguous: punch in runs.
    obj.vm.pool.free_many(&mut frames);
    if let Some(p) = pager {
        p.object_dead(obj.id);
    }
    if let Some(b) = frame_range(obj) {
        obj.vm.pool.release_range(b.0, b.1);
    }
    obj.cv.notify_all();
    if let Some(b) = backing {
        unlink_shadow(&b, obj, None);
        drop(b);
    }
}

fn frame_range(obj: &Object) -> Option<(u64, u64)> {
    obj.frame_base.map(|b| (b, obj.frame_len))
}

/// Collapses `top` with its backing object while the backing object is only
/// referenced by `top` (`vm_object_collapse`). Returns how many were merged.
pub fn collapse(top: &Arc<Object>) -> usize {
    let vm = &top.vm;
    let mut merged = 0;
    loop {
        let mut sg = top.lock();
        if sg.dead {
            return merged;
        }
        let Some(back) = sg.backing.as_ref().map(|b| b.arc().clone()) else {
            return merged;
        };
        let mut bg = back.lock();
        let ok = bg.ref_count == 1
            && bg.shadow_count == 1
            && !bg.dead
            && bg.pip == 0
            && sg.pip == 0
            && bg.handle.is_none()
            && matches!(bg.kind, ObjectKind::Anonymous | ObjectKind::Swap)
            && !bg
                .pages
                .values()
                .any(|p| p.has(pf::BUSY) || p.hold_count > 0)
                        && !sg.pages.values().any(|p| p.has(pf::BUSY))
            // Swap blocks can only move within one pager.
            && match (&sg.pager, &bg.pager) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => true,
            };
        if !ok {
            return merged;
        }
        let off = sg.backing_offset;
        let size = sg.size;
        let Some(new_off) = off.checked_add(bg.backing_offset) else {
            return merged;
        };
        let top_pager = sg.pager.clone();
        // Only `top`'s own pages shadow `back`'s swap copies; pages moved up
        // from `back` keep their slots.
        let own: std::collections::HashSet<u64> = sg.pages.keys().copied().collect();
        let mut to_free = Vec::new();
        for (p, page) in std::mem::take(&mut bg.pages) {
            let np = p.wrapping_sub(off);
            let shadowed = p < off
                || np >= size
                || sg.pages.contains_key(&np)
                || top_pager.as_ref().is_some_and(|tp| tp.has_page(top.id, np).is_some());
            if shadowed {
                to_free.push(page);
            } else {
                sg.pages.insert(np, page);
            }
        }
        if bg.kind == ObjectKind::Swap {
            if let Some(bp) = bg.pager.clone() {
                bp.collapse_into(back.id, top.id, off, size, &|np| own.contains(&np));
                if sg.kind == ObjectKind::Anonymous {
                    sg.kind = ObjectKind::Swap;
                    sg.pager = Some(bp);
                }
            }
        }
        let next = bg.backing.take();
        sg.backing_offset = new_off;
        bg.dead = true;
        bg.ref_count = 0;
        bg.shadow_count = 0;
        bg.generation += 1;
        sg.generation += 1;
        let old = sg.backing.take();
        sg.backing = next;
        let new_backing = sg.backing.as_ref().map(|b| b.arc().clone());
        drop(bg);
        drop(sg);
        // The reference `top` held on `back` is consumed without deallocate.
        if let Some(o) = old {
            drop(o.into_arc());
        }
        if let Some(nb) = new_backing {
            unlink_shadow(&nb, &back, Some(Arc::downgrade(top)));
        }
        for mut page in to_free {
            remove_mappings(vm, &mut page);
            vm.pool.free(page.frame, !page.has(pf::ZERO));
        }
        if let Some(b) = frame_range(&back) {
            vm.pool.release_range(b.0, b.1);
        }
        back.cv.notify_all();
        bump(&vm.stats.collapses);
        merged += 1;
    }
}
