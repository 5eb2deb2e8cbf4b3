//! Address maps (`vm_map`): entries mapping address ranges to objects.

use crate::fault::{self, FaultError, FaultFlags};
use crate::frame::Frame;
use crate::frame::PAGE_SIZE;
use crate::object::{ObjHandle, ObjectKind};
use crate::page::pf;
use crate::pmap::{rmap_add, Pmap, PmapId};
use crate::vm::{Prot, Vm};
use parking_lot::{Mutex, RwLock};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

const PS: u64 = PAGE_SIZE as u64;

/// Access pattern advice (`MAP_ENTRY_BEHAV_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behavior {
    /// Default clustering.
    Normal,
    /// No clustering.
    Random,
    /// Read ahead aggressively and free behind.
    Sequential,
}

/// Entry type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapType {
    /// Addresses map linearly onto the object.
    Normal,
    /// Translation through guest-written vpte tables. A vpte frame number
    /// `i` names the page this map shows at `target + i * 4096` (the VM's
    /// RAM as it sees it, shadows included), for `i < target_pages`; the
    /// entry's own object is an empty placeholder.
    VPageTable {
        /// The master entry (never written by the pager).
        master: u64,
        /// Table levels below the master (1..=4).
        levels: u32,
        /// Address (in this map) of frame number 0.
        target: u64,
        /// Frame numbers allowed: `0..target_pages`.
        target_pages: u64,
    },
}

/// What a clone does with an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inherit {
    /// Copy-on-write.
    Copy,
    /// Both maps share the object (shared file mappings).
    Share,
}

/// File mapping modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileMode {
    /// Read-only.
    ReadOnly,
    /// Writes go to the file (on pageout and `sync`).
    Shared,
    /// Writes go to an anonymous shadow over the file object.
    Private,
}

/// Map errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// Range not page aligned, empty or overflowing.
    #[error("bad range")]
    BadRange,
    /// Range overlaps an existing entry.
    #[error("range in use")]
    InUse,
    /// Part of the range is not mapped.
    #[error("range not mapped")]
    NotMapped,
    /// Protection above the maximum.
    #[error("protection exceeds maximum")]
    Protection,
    /// Entry is not of the right type.
    #[error("wrong entry type")]
    WrongType,
    /// Wiring failed.
    #[error("wiring failed: {0}")]
    Fault(FaultError),
    /// Out of memory.
    #[error("out of memory")]
    NoMemory,
}

/// One map entry (`vm_map_entry`).
pub(crate) struct MapEntry {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) object: ObjHandle,
    /// Offset into the object, bytes.
    pub(crate) offset: u64,
    pub(crate) protection: Prot,
    pub(crate) max_protection: Prot,
    pub(crate) wired_count: u32,
    pub(crate) behavior: Behavior,
    pub(crate) lastr: AtomicU64,
    pub(crate) maptype: MapType,
    pub(crate) needs_copy: bool,
    pub(crate) inherit: Inherit,
}

impl MapEntry {
    fn split_clone(&self, at: u64) -> MapEntry {
        MapEntry {
            start: at,
            end: self.end,
            object: self.object.clone(),
            // `map_object` checked offset + length: no overflow.
            offset: self.offset + (at - self.start),
            protection: self.protection,
            max_protection: self.max_protection,
            wired_count: self.wired_count,
            behavior: self.behavior,
            lastr: AtomicU64::new(self.lastr.load(Ordering::Relaxed)),
            maptype: self.maptype,
            needs_copy: self.needs_copy,
            inherit: self.inherit,
        }
    }
    /// Object page index of `addr` (the VA-side index for VPAGETABLE).
    pub(crate) fn pindex(&self, addr: u64) -> u64 {
        // `map_object` refused offsets where this could overflow.
        (self.offset + (addr - self.start)) / PS
    }
    /// Creates the shadow a needs-copy entry gets on its first write.
    pub(crate) fn make_shadow(&mut self) {
        let pages = (self.end - self.start) / PS;
        let off = self.offset / PS;
        let vm = self.object.vm.clone();
        let placeholder = vm.anonymous(0);
        let old = std::mem::replace(&mut self.object, placeholder);
        self.object = old.shadow(pages, off);
        self.offset = 0;
        self.needs_copy = false;
    }
}

/// A public snapshot of an entry.
#[derive(Clone, Debug)]
pub struct EntryInfo {
    /// Start address.
    pub start: u64,
    /// End address.
    pub end: u64,
    /// Object id.
    pub object_id: u64,
    /// Offset in bytes.
    pub offset: u64,
    /// Protection.
    pub protection: Prot,
    /// Max protection.
    pub max_protection: Prot,
    /// Wire count.
    pub wired_count: u32,
    /// Behaviour.
    pub behavior: Behavior,
    /// Type.
    pub maptype: MapType,
    /// Needs copy.
    pub needs_copy: bool,
    /// `lastr`.
    pub lastr: u64,
}

pub(crate) struct MapInner {
    pub(crate) entries: BTreeMap<u64, MapEntry>,
    pub(crate) timestamp: u64,
}

impl MapInner {
    pub(crate) fn lookup(&self, addr: u64) -> Option<&MapEntry> {
        self.entries.range(..=addr).next_back().map(|(_, e)| e).filter(|e| addr < e.end)
    }
    pub(crate) fn lookup_mut(&mut self, addr: u64) -> Option<&mut MapEntry> {
        self.entries.range_mut(..=addr).next_back().map(|(_, e)| e).filter(|e| addr < e.end)
    }
    /// Splits the entry containing `at` so that an entry starts at `at`.
    fn clip(&mut self, at: u64) {
        let Some(e) = self.lookup(at) else { return };
        if e.start == at {
            return;
        }
        let tail = e.split_clone(at);
        if let Some(e) = self.lookup_mut(at) {
            e.end = at;
        }
        self.entries.insert(at, tail);
    }
    /// Clips at both ends and checks the range is fully mapped.
    fn clip_range(&mut self, start: u64, end: u64) -> Result<(), MapError> {
        let mut a = start;
        while a < end {
            match self.lookup(a) {
                Some(e) => a = e.end,
                None => return Err(MapError::NotMapped),
            }
        }
        self.clip(start);
        self.clip(end);
        Ok(())
    }
}

/// An address map with its pmap.
pub struct Map {
    pub(crate) vm: Arc<Vm>,
    pub(crate) pmap: Arc<dyn Pmap>,
    pub(crate) pmap_id: PmapId,
    pub(crate) inner: RwLock<MapInner>,
    pub(crate) pagesupply: AtomicI64,
    /// Pages wired through VPAGETABLE windows: window page -> (target
    /// address, frame) per wiring, so unwire finds the page wiring wired
    /// whatever the vptes say by then.
    pub(crate) vpt_wired: Mutex<BTreeMap<u64, Vec<(u64, Frame)>>>,
}

/// Highest mappable address: reverse-map entries pack the virtual page
/// number in 44 bits.
pub const MAX_ADDRESS: u64 = 1 << 56;

fn check_range(start: u64, len: u64) -> Result<u64, MapError> {
    if len == 0 || !start.is_multiple_of(PS) || !len.is_multiple_of(PS) {
        return Err(MapError::BadRange);
    }
    let end = start.checked_add(len).ok_or(MapError::BadRange)?;
    if end > MAX_ADDRESS {
        return Err(MapError::BadRange);
    }
    Ok(end)
}

impl Map {
    /// An empty map translating through `pmap`.
    pub fn new(vm: &Arc<Vm>, pmap: Arc<dyn Pmap>) -> Arc<Map> {
        let id = vm.register_pmap(Arc::downgrade(&pmap));
        Arc::new(Map {
            vm: vm.clone(),
            pmap,
            pmap_id: id,
            inner: RwLock::new(MapInner { entries: BTreeMap::new(), timestamp: 0 }),
            pagesupply: AtomicI64::new(0),
            vpt_wired: Mutex::new(BTreeMap::new()),
        })
    }

    /// The pager instance.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// The pmap.
    pub fn pmap(&self) -> &Arc<dyn Pmap> {
        &self.pmap
    }

    /// Map generation (bumped by every change).
    pub fn timestamp(&self) -> u64 {
        self.inner.read().timestamp
    }

    /// Maps `len` bytes of `object` from byte `offset` at `start`.
    #[allow(clippy::too_many_arguments)]
    pub fn map_object(
        &self,
        start: u64,
        len: u64,
        object: ObjHandle,
        offset: u64,
        prot: Prot,
        max_prot: Prot,
        inherit: Inherit,
        cow: bool,
    ) -> Result<(), MapError> {
        let end = check_range(start, len)?;
        // The object byte range must not wrap: page indexes are computed
        // with plain arithmetic from here on.
        if !offset.is_multiple_of(PS) || offset.checked_add(len).is_none() {
            return Err(MapError::BadRange);
        }
        if !max_prot.contains(prot) {
            return Err(MapError::Protection);
        }
        let mut g = self.inner.write();
        if g.entries.range(..end).next_back().is_some_and(|(_, e)| e.end > start) {
            return Err(MapError::InUse);
        }
        g.entries.insert(
            start,
            MapEntry {
                start,
                end,
                object,
                offset,
                protection: prot,
                max_protection: max_prot,
                wired_count: 0,
                behavior: Behavior::Normal,
                lastr: AtomicU64::new(u64::MAX >> 1),
                maptype: MapType::Normal,
                needs_copy: cow,
                inherit,
            },
        );
        g.timestamp += 1;
        Ok(())
    }

    /// Maps fresh zero-fill memory.
    pub fn map_anon(&self, start: u64, len: u64, prot: Prot) -> Result<ObjHandle, MapError> {
        check_range(start, len)?;
        let obj = self.vm.anonymous(len / PS);
        self.map_object(start, len, obj.clone(), 0, prot, Prot::ALL, Inherit::Copy, false)?;
        Ok(obj)
    }

    /// Maps a file object in one of the three modes.
    pub fn map_file(&self, start: u64, len: u64, obj: &ObjHandle, offset: u64, mode: FileMode) -> Result<(), MapError> {
        let (prot, max, inherit, cow) = match mode {
            FileMode::ReadOnly => (Prot::READ | Prot::EXEC, Prot::READ | Prot::EXEC, Inherit::Copy, false),
            FileMode::Shared => (Prot::ALL, Prot::ALL, Inherit::Share, false),
            FileMode::Private => (Prot::ALL, Prot::ALL, Inherit::Copy, true),
        };
        self.map_object(start, len, obj.clone(), offset, prot, max, inherit, cow)
    }

    /// Maps a VPAGETABLE window whose vpte frame numbers `0..target_pages`
    /// name the pages this map shows at `target + i * 4096` (master 0:
    /// every access fails until `setmap`). The window holds no object: each
    /// walk resolves table and data pages through the `Normal` entry at the
    /// target address, as a fault there would, so after a fork every map's
    /// window walks its own memory.
    pub fn map_vpagetable(
        &self,
        start: u64,
        len: u64,
        target: u64,
        target_pages: u64,
        levels: u32,
    ) -> Result<(), MapError> {
        if !(1..=crate::vpte::VPTE_MAX_LEVELS).contains(&levels) {
            return Err(MapError::WrongType);
        }
        check_range(target, target_pages.checked_mul(PS).ok_or(MapError::BadRange)?)?;
        let placeholder = self.vm.anonymous(0);
        self.map_object(start, len, placeholder, 0, Prot::ALL, Prot::ALL, Inherit::Share, false)?;
        let mut g = self.inner.write();
        if let Some(e) = g.lookup_mut(start) {
            e.maptype = MapType::VPageTable { master: 0, levels, target, target_pages };
        }
        Ok(())
    }

    /// Removes `[start, start+len)` (clipping partial entries).
    pub fn unmap(&self, start: u64, len: u64) -> Result<(), MapError> {
        let end = check_range(start, len)?;
        let removed: Vec<MapEntry> = {
            let mut g = self.inner.write();
            g.clip(start);
            g.clip(end);
            // Window wirings are found through the map: before the entries go.
            self.unwire_windows(&g, start, end);
            let keys: Vec<u64> = g.entries.range(start..end).map(|(k, _)| *k).collect();
            let v = keys.iter().filter_map(|k| g.entries.remove(k)).collect();
            g.timestamp += 1;
            self.pmap.remove(start, end);
            v
        };
        // Unwire pages of wired entries, then drop references (may collapse).
        for e in &removed {
            if e.wired_count > 0 && e.maptype == MapType::Normal {
                unwire_entry_pages(e, e.start, e.end);
            }
        }
        drop(removed);
        Ok(())
    }

    /// Changes protection (`vm_map_protect`).
    pub fn protect(&self, start: u64, len: u64, prot: Prot) -> Result<(), MapError> {
        let end = check_range(start, len)?;
        let mut g = self.inner.write();
        g.clip_range(start, end)?;
        if g.entries.range(start..end).any(|(_, e)| !e.max_protection.contains(prot)) {
            return Err(MapError::Protection);
        }
        for (_, e) in g.entries.range_mut(start..end) {
            e.protection = prot;
        }
        g.timestamp += 1;
        self.pmap.protect(start, end, prot);
        Ok(())
    }

    /// Sets the access behaviour (`madvise`).
    pub fn madvise(&self, start: u64, len: u64, behavior: Behavior) -> Result<(), MapError> {
        let end = check_range(start, len)?;
        let mut g = self.inner.write();
        g.clip_range(start, end)?;
        for (_, e) in g.entries.range_mut(start..end) {
            e.behavior = behavior;
        }
        g.timestamp += 1;
        Ok(())
    }

    /// Sets the master vpte of the VPAGETABLE entry at `start` and drops every
    /// translation of it (MADV_SETMAP).
    pub fn setmap(&self, start: u64, master: u64) -> Result<(), MapError> {
        let mut g = self.inner.write();
        let e = g.lookup_mut(start).ok_or(MapError::NotMapped)?;
        let MapType::VPageTable { master: m, .. } = &mut e.maptype else {
            return Err(MapError::WrongType);
        };
        *m = master;
        let (s, en) = (e.start, e.end);
        g.timestamp += 1;
        self.pmap.remove(s, en);
        Ok(())
    }

    /// Drops translations in a range after the guest changed vptes
    /// (MADV_INVAL). Interlocked with faults: a walk+enter holds the map read
    /// lock, so none can survive an `inval` that returned.
    pub fn inval(&self, start: u64, len: u64) -> Result<(), MapError> {
        let end = check_range(start, len)?;
        let mut g = self.inner.write();
        g.timestamp += 1;
        self.pmap.remove(start, end);
        Ok(())
    }

    /// The entry containing `addr` (`vm_map_lookup_entry`).
    pub fn lookup(&self, addr: u64) -> Option<EntryInfo> {
        let g = self.inner.read();
        g.lookup(addr).map(info)
    }

    /// Whether `addr` is in a VPAGETABLE window (`map_vpagetable`), so the
    /// VMM need not walk `entries()` to tell a window fault from a RAM one.
    pub fn in_window(&self, addr: u64) -> bool {
        self.inner.read().lookup(addr).is_some_and(|e| matches!(e.maptype, MapType::VPageTable { .. }))
    }

    /// Entry snapshots.
    pub fn entries(&self) -> Vec<EntryInfo> {
        self.inner.read().entries.values().map(info).collect()
    }

    /// The object of the entry at `addr` (after any shadowing).
    pub fn object_at(&self, addr: u64) -> Option<ObjHandle> {
        self.inner.read().lookup(addr).map(|e| e.object.clone())
    }

    /// Wires `[start, start+len)`: every page faulted in and wired
    /// (`vm_fault_wire`); on failure what was wired is unwired.
    pub fn wire(&self, start: u64, len: u64) -> Result<(), MapError> {
        let end = check_range(start, len)?;
        {
            let mut g = self.inner.write();
            g.clip_range(start, end)?;
            for (_, e) in g.entries.range_mut(start..end) {
                e.wired_count += 1;
            }
            g.timestamp += 1;
        }
        let mut va = start;
        while va < end {
            if let Err(e) = fault::fault(self, va, Prot::READ, FaultFlags::WIRE) {
                self.unwire_pages(start, va);
                let mut g = self.inner.write();
                for (_, en) in g.entries.range_mut(start..end) {
                    en.wired_count = en.wired_count.saturating_sub(1);
                }
                g.timestamp += 1;
                return Err(MapError::Fault(e));
            }
            va += PS;
        }
        Ok(())
    }

    /// Unwires `[start, start+len)` (`vm_fault_unwire` per entry). The check, the pages and the entries'
    /// counts change under one write lock, so two unwires of one wiring
    /// cannot both pass the check and strip another wiring of a shared page.
    pub fn unwire(&self, start: u64, len: u64) -> Result<(), MapError> {
        let end = check_range(start, len)?;
        let mut g = self.inner.write();
        if g.entries.range(..end).any(|(_, e)| e.end > start && e.start < end && e.wired_count == 0) {
            return Err(MapError::NotMapped);
        }
        g.clip_range(start, end)?;
        self.unwire_locked(&g, start, end);
        for (_, e) in g.entries.range_mut(start..end) {
            e.wired_count = e.wired_count.saturating_sub(1);
        }
        g.timestamp += 1;
        Ok(())
    }

    fn unwire_pages(&self, start: u64, end: u64) {
        let g = self.inner.read();
        self.unwire_locked(&g, start, end);
    }

    fn unwire_locked(&self, g: &MapInner, start: u64, end: u64) {
        for (_, e) in g.entries.range(..end) {
            if e.end > start && e.wired_count > 0 && e.maptype == MapType::Normal {
                unwire_entry_pages(e, start.max(e.start), end.min(e.end));
            }
        }
        self.unwire_windows(g, start, end);
    }

    /// Drops one wiring of each window page in `[start, end)` that has one:
    /// the page is found by the frame wiring recorded, down the chain of the
    /// target address (pages keep their frame while wired).
    fn unwire_windows(&self, g: &MapInner, start: u64, end: u64) {
        let mut w = self.vpt_wired.lock();
        let keys: Vec<u64> = w.range(start..end).map(|(k, _)| *k).collect();
        for k in keys {
            let Some(v) = w.get_mut(&k) else { continue };
            if let Some((addr, frame)) = v.pop() {
                if let Some(re) = g.lookup(addr).filter(|re| re.maptype == MapType::Normal) {
                    unwire_frame(re.object.arc(), re.pindex(addr), frame);
                }
            }
            if v.is_empty() {
                w.remove(&k);
            }
        }
    }

    /// Records a page wired through the window page `vaddr`.
    pub(crate) fn record_window_wiring(&self, vaddr: u64, addr: u64, frame: Frame) {
        self.vpt_wired.lock().entry(vaddr).or_default().push((addr, frame));
    }

    /// Clones the map for a VM clone (`vmspace_fork`): entries become
    /// copy-on-write (`needs_copy`, parent write-protected), shared entries
    /// are shared, wired entries are copied now (`vm_fault_copy_entry`).
    /// Costs O(entries), not O(resident pages).
    #[doc(alias = "clone")]
    pub fn fork(&self, pmap: Arc<dyn Pmap>) -> Result<Arc<Map>, MapError> {
        let child = Map::new(&self.vm, pmap);
        let mut g = self.inner.write();
        let mut new_entries = BTreeMap::new();
        for (_, e) in g.entries.iter_mut() {
            if let MapType::VPageTable { .. } = e.maptype {
                // The child's window walks the child's memory; the parent's
                // translations show frames the child now shares: read-only.
                self.pmap.protect(e.start, e.end, e.protection.without(Prot::WRITE));
                let mut ne = e.split_clone(e.start);
                ne.wired_count = 0;
                new_entries.insert(ne.start, ne);
                continue;
            }
            // BSD copies wired Copy entries only; a shared one stays shared.
            if e.wired_count > 0 && e.inherit == Inherit::Copy {
                let ne = copy_wired_entry(&self.vm, e, &child)?;
                new_entries.insert(ne.start, ne);
                continue;
            }
            if e.inherit == Inherit::Share && e.needs_copy {
                e.make_shadow();
            }
            if e.inherit == Inherit::Copy {
                e.needs_copy = true;
                if e.protection.writable() {
                    self.pmap.protect(e.start, e.end, e.protection.without(Prot::WRITE));
                }
            }
            let mut ne = e.split_clone(e.start);
            ne.wired_count = 0;
            new_entries.insert(ne.start, ne);
        }
        g.timestamp += 1;
        drop(g);
        child.inner.write().entries = new_entries;
        Ok(child)
    }

    /// Resident lookup through the chain for `addr`: (object, pindex, frame).
    pub fn resident_page(&self, addr: u64) -> Option<(Arc<crate::object::Object>, u64, crate::frame::Frame)> {
        let g = self.inner.read();
        let e = g.lookup(addr)?;
        find_resident(e.object.arc(), e.pindex(addr)).map(|(o, p, f, _)| (o, p, f))
    }
}

fn info(e: &MapEntry) -> EntryInfo {
    EntryInfo {
        start: e.start,
        end: e.end,
        object_id: e.object.id(),
        offset: e.offset,
        protection: e.protection,
        max_protection: e.max_protection,
        wired_count: e.wired_count,
        behavior: e.behavior,
        maptype: e.maptype,
        needs_copy: e.needs_copy,
        lastr: e.lastr.load(Ordering::Relaxed),
    }
}

/// Finds the first resident page for (object, pindex) down the chain:
/// (owner, pindex in owner, frame, depth).
pub(crate) fn find_resident(
    first: &Arc<crate::object::Object>,
    pindex: u64,
) -> Option<(Arc<crate::object::Object>, u64, crate::frame::Frame, usize)> {
    let mut o = first.clone();
    let mut p = pindex;
    let mut depth = 0;
    loop {
        let g = o.st.lock();
        if let Some(pg) = g.pages.get(&p) {
            if pg.has(pf::VALID) {
                return Some((o.clone(), p, pg.frame, depth));
            }
            return None;
        }
        let next = g.backing.as_ref().map(|b| b.arc().clone());
        let off = g.backing_offset;
        drop(g);
        o = next?;
        // An index past u64 is past every object: no page there.
        p = p.checked_add(off)?;
        depth += 1;
    }
}

/// Drops one wiring of the page holding `frame` for (first, pindex), found
/// down the chain.
fn unwire_frame(first: &Arc<crate::object::Object>, pindex: u64, frame: Frame) {
    let mut o = first.clone();
    let mut p = pindex;
    loop {
        let mut g = o.st.lock();
        if let Some(pg) = g.pages.get_mut(&p).filter(|pg| pg.frame == frame) {
            if pg.wire_count > 0 {
                pg.wire_count -= 1;
                if pg.wire_count == 0 {
                    pg.queue = crate::page::Queue::Active;
                }
            }
            return;
        }
        let next = g.backing.as_ref().map(|b| b.arc().clone());
        let off = g.backing_offset;
        drop(g);
        match (next, p.checked_add(off)) {
            (Some(n), Some(np)) => {
                o = n;
                p = np;
            }
            _ => return,
        }
    }
}

fn unwire_entry_pages(e: &MapEntry, start: u64, end: u64) {
    let mut a = start;
    while a < end {
        if let Some((o, p, _, _)) = find_resident(e.object.arc(), e.pindex(a)) {
            let mut g = o.st.lock();
            if let Some(pg) = g.pages.get_mut(&p) {
                if pg.wire_count > 0 {
                    pg.wire_count -= 1;
                    if pg.wire_count == 0 {
                        pg.queue = crate::page::Queue::Active;
                    }
                }
            }
        }
        a += PS;
    }
}

/// `vm_fault_copy_entry`: a new anonymous object with a copy of every page.
fn copy_wired_entry(vm: &Arc<Vm>, e: &MapEntry, child: &Map) -> Result<MapEntry, MapError> {
    let pages = (e.end - e.start) / PS;
    let obj = vm.anonymous(pages);
    for i in 0..pages {
        let addr = e.start + i * PS;
        let src = find_resident(e.object.arc(), e.pindex(addr)).map(|(_, _, f, _)| f);
        let mut tries = 0;
        let dst = loop {
            if let Some(f) = vm.pool.alloc(obj.pref_frame(i)) {
                break f;
            }
            tries += 1;
            if tries > 100 {
                return Err(MapError::NoMemory);
            }
            crate::pageout::run_once(vm, vm.config.free_target);
            vm.pool.wait_free(std::time::Duration::from_millis(5));
        };
        match src {
            Some(s) => {
                let _ = vm.pool.copy(s, dst);
            }
            None => {
                // A wired page is always resident; if not, the page was never
                // touched through this chain and reads as zero.
                if e.object.kind() != ObjectKind::Anonymous {
                    vm.pool.free(dst, false);
                    return Err(MapError::Fault(FaultError::Failure));
                }
            }
        }
        let mut g = obj.lock();
        let mut page = crate::page::Page::new(dst, pf::VALID | pf::DIRTY);
        page.queue = crate::page::Queue::Active;
        rmap_add(&mut page, child.pmap_id, addr);
        child.pmap.enter(addr, dst, e.protection, false);
        g.pages.insert(i, page);
    }
    Ok(MapEntry {
        start: e.start,
        end: e.end,
        object: obj,
        offset: 0,
        protection: e.protection,
        max_protection: e.max_protection,
        wired_count: 0,
        behavior: e.behavior,
        lastr: AtomicU64::new(u64::MAX >> 1),
        maptype: MapType::Normal,
        needs_copy: false,
        inherit: e.inherit,
    })
}

impl Drop for Map {
    fn drop(&mut self) {
        let wired = std::mem::take(self.vpt_wired.get_mut());
        let g = self.inner.get_mut();
        for (addr, frame) in wired.into_values().flatten() {
            if let Some(re) = g.lookup(addr).filter(|re| re.maptype == MapType::Normal) {
                unwire_frame(re.object.arc(), re.pindex(addr), frame);
            }
        }
        let entries = std::mem::take(&mut g.entries);
        for e in entries.values() {
            self.pmap.remove(e.start, e.end);
            if e.wired_count > 0 && e.maptype == MapType::Normal {
                unwire_entry_pages(e, e.start, e.end);
            }
        }
        drop(entries);
        self.vm.unregister_pmap(self.pmap_id);
    }
}
