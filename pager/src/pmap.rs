//! The physical map interface (`pmap_*`), the pager's reverse map helpers,
//! and `SoftPmap`/`SoftMachine`, a software MMU for tests.

use crate::fault::{fault, FaultError, FaultFlags};
use crate::frame::{Frame, FramePool, PAGE_SIZE};
use crate::map::Map;
use crate::page::{rmap_pack, rmap_unpack, Page};
use crate::vm::{Prot, Vm};
use parking_lot::Mutex;

use std::sync::Arc;

/// Index of a pmap in its `Vm` (reverse map entries name pmaps by it).
pub(crate) type PmapId = u32;
/// Virtual page number (address >> 12).
pub(crate) type Vpn = u64;

/// What the pager needs from a translation layer. The VMM implements it with
/// host mappings of guest views; `SoftPmap` is the software model.
///
/// The pager calls these methods with its locks held: `enter` and
/// `extract` during a fault with the map read lock and the page's object
/// lock (and the locks of the objects above it on the shadow chain);
/// `remove` and `protect` with the map write lock (unmap, protect, fork,
/// `inval`) or with object locks (pageout, a COW copy, free-behind). So an
/// implementation may not:
/// - call back into the pager: no `fault`, `access`/`read_guest`/
///   `write_guest`, `Map` or object method, `run_once` (it would deadlock
///   on those locks);
/// - block on guest progress (a vCPU, an exit, a userfaultfd event) or
///   sleep: every fault and the pageout of the map wait for it;
/// - report failure by panicking: an `enter` it cannot do leaves the page
///   unmapped (the access faults again), and `remove` must remove (removing
///   a mapping is always safe: it only refaults).
///
/// Its own short internal locks are fine, if never held while calling the
/// pager.
pub trait Pmap: Send + Sync {
    /// Maps `frame` at `addr` with `prot` (replacing any mapping).
    fn enter(&self, addr: u64, frame: Frame, prot: Prot, wired: bool);
    /// Removes mappings in `[start, end)`.
    fn remove(&self, start: u64, end: u64);
    /// Reduces mappings in `[start, end)` to at most `prot`.
    fn protect(&self, start: u64, end: u64, prot: Prot);
    /// The frame mapped at `addr`.
    fn extract(&self, addr: u64) -> Option<Frame>;
    /// Hardware referenced bit, if the implementation has one.
    fn test_and_clear_referenced(&self, _addr: u64) -> bool {
        false
    }
    /// Hardware modified bit, if the implementation has one.
    fn test_and_clear_modified(&self, _addr: u64) -> bool {
        false
    }
}

/// Removes every mapping of `page` (stale reverse-map entries are skipped by
/// checking `extract`: removing a mapping is always safe, it only refaults).
/// Returns whether a hardware modified bit was found set.
pub(crate) fn remove_mappings(vm: &Vm, page: &mut Page) -> bool {
    let mut modified = false;
    if page.rmap.is_empty() {
        return false;
    }
    for v in page.rmap.take() {
        let (id, vpn) = rmap_unpack(v);
        if let Some(pm) = vm.pmap(id) {
            let a = vpn << 12;
            if pm.extract(a) == Some(page.frame) {
                modified |= pm.test_and_clear_modified(a);
                pm.remove(a, a + PAGE_SIZE as u64);
            }
        }
    }
    modified
}

/// Removes the mappings of `page` in one pmap (`id`), except at `keep`,
/// and drops that pmap's reverse-map entries (the page no longer backs any
/// of its addresses: a COW copy replaced it there).
pub(crate) fn remove_map_mappings(vm: &Vm, page: &mut Page, id: PmapId, keep: Option<u64>) {
    if page.rmap.is_empty() {
        return;
    }
    let Some(pm) = vm.pmap(id) else { return };
    for v in page.rmap.take() {
        let (pid, vpn) = rmap_unpack(v);
        if pid != id {
            page.rmap.add(v);
            continue;
        }
        let a = vpn << 12;
        if Some(a) != keep && pm.extract(a) == Some(page.frame) {
            pm.remove(a, a + PAGE_SIZE as u64);
        }
    }
}

/// Write-protects every mapping of `page`; also harvests hardware M bits.
pub(crate) fn protect_mappings(vm: &Vm, page: &mut Page, prot: Prot) -> bool {
    let mut modified = false;
    for v in page.rmap.iter() {
        let (id, vpn) = rmap_unpack(v);
        if let Some(pm) = vm.pmap(id) {
            let a = vpn << 12;
            if pm.extract(a) == Some(page.frame) {
                modified |= pm.test_and_clear_modified(a);
                pm.protect(a, a + PAGE_SIZE as u64, prot);
            }
        }
    }
    modified
}

/// Asks the pmaps for hardware referenced bits of `page`.
pub(crate) fn test_referenced(vm: &Vm, page: &Page) -> bool {
    let mut r = false;
    for v in page.rmap.iter() {
        let (id, vpn) = rmap_unpack(v);
        if let Some(pm) = vm.pmap(id) {
            let a = vpn << 12;
            if pm.extract(a) == Some(page.frame) {
                r |= pm.test_and_clear_referenced(a);
            }
        }
    }
    r
}

pub(crate) fn rmap_add(page: &mut Page, id: PmapId, addr: u64) {
    page.rmap.add(rmap_pack(id, addr >> 12));
}

/// A software page table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftPte {
    /// Frame.
    pub frame: Frame,
    /// Protection.
    pub prot: Prot,
    /// Accessed.
    pub a: bool,
    /// Dirty.
    pub d: bool,
    /// Wired.
    pub wired: bool,
}

/// A software pmap: virtual page -> (frame, prot, A, D).
#[derive(Default)]
pub struct SoftPmap {
    ptes: Mutex<crate::page::IndexMap<SoftPte>>,
}

impl SoftPmap {
    /// An empty pmap.
    pub fn new() -> Arc<SoftPmap> {
        Arc::new(SoftPmap::default())
    }
    /// The entry at `addr`.
    pub fn pte(&self, addr: u64) -> Option<SoftPte> {
        self.ptes.lock().get(&(addr >> 12)).copied()
    }
    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.ptes.lock().len()
    }
    /// No mappings?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn range_apply(&self, start: u64, end: u64, mut f: impl FnMut(&mut crate::page::IndexMap<SoftPte>, Vpn)) {
        let mut m = self.ptes.lock();
        let (s, e) = (start >> 12, end.div_ceil(PAGE_SIZE as u64));
        if e.saturating_sub(s) <= m.len() as u64 * 2 {
            for v in s..e {
                f(&mut m, v);
            }
        } else {
            let keys: Vec<Vpn> = m.keys().copied().filter(|&v| v >= s && v < e).collect();
            for v in keys {
                f(&mut m, v);
            }
        }
    }
}

impl Pmap for SoftPmap {
    fn enter(&self, addr: u64, frame: Frame, prot: Prot, wired: bool) {
        self.ptes.lock().insert(addr >> 12, SoftPte { frame, prot, a: false, d: false, wired });
    }
    fn remove(&self, start: u64, end: u64) {
        self.range_apply(start, end, |m, v| {
            m.remove(&v);
        });
    }
    fn protect(&self, start: u64, end: u64, prot: Prot) {
        self.range_apply(start, end, |m, v| {
            if let Some(p) = m.get_mut(&v) {
                p.prot = p.prot & prot;
            }
        });
    }
    fn extract(&self, addr: u64) -> Option<Frame> {
        self.ptes.lock().get(&(addr >> 12)).map(|p| p.frame)
    }
    fn test_and_clear_referenced(&self, addr: u64) -> bool {
        self.ptes.lock().get_mut(&(addr >> 12)).is_some_and(|p| std::mem::replace(&mut p.a, false))
    }
    fn test_and_clear_modified(&self, addr: u64) -> bool {
        self.ptes.lock().get_mut(&(addr >> 12)).is_some_and(|p| std::mem::replace(&mut p.d, false))
    }
}

/// A software CPU: reads and writes guest addresses through a `SoftPmap`,
/// calling `fault()` on a miss or protection violation, like hardware.
/// The access is done under the pmap lock, so a concurrent pmap removal
/// (pageout) waits for it, as a TLB shootdown would.
pub struct SoftMachine {
    /// The map faults go to.
    pub map: Arc<Map>,
    /// Its pmap.
    pub pmap: Arc<SoftPmap>,
}

impl SoftMachine {
    /// A machine over a fresh map with its own pmap.
    pub fn new(vm: &Arc<Vm>) -> SoftMachine {
        let pmap = SoftPmap::new();
        let map = Map::new(vm, pmap.clone());
        SoftMachine { map, pmap }
    }

    /// Wraps an existing map and its soft pmap.
    pub fn with(map: Arc<Map>, pmap: Arc<SoftPmap>) -> SoftMachine {
        SoftMachine { map, pmap }
    }

    fn pool(&self) -> &FramePool {
        &self.map.vm().pool
    }

    fn access_page(
        &self,
        addr: u64,
        write: bool,
        exec: bool,
        f: &mut dyn FnMut(&FramePool, Frame, usize),
    ) -> Result<(), FaultError> {
        let want = if write {
            Prot::WRITE
        } else if exec {
            Prot::EXEC
        } else {
            Prot::READ
        };
        for _ in 0..64 {
            {
                let mut m = self.pmap.ptes.lock();
                if let Some(p) = m.get_mut(&(addr >> 12)) {
                    if p.prot.contains(want) {
                        p.a = true;
                        p.d |= write;
                        f(self.pool(), p.frame, (addr & 0xfff) as usize);
                        return Ok(());
                    }
                }
            }
            fault(&self.map, addr, want, FaultFlags::NONE)?;
        }
        Err(FaultError::Failure)
    }

    /// Reads guest memory.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), FaultError> {
        let mut done = 0;
        while done < buf.len() {
            let a = addr + done as u64;
            let n = (PAGE_SIZE - (a & 0xfff) as usize).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            self.access_page(a, false, false, &mut |pool, fr, off| {
                let _ = pool.read(fr, off, dst);
            })?;
            done += n;
        }
        Ok(())
    }

    /// Writes guest memory.
    pub fn write(&self, addr: u64, buf: &[u8]) -> Result<(), FaultError> {
        let mut done = 0;
        while done < buf.len() {
            let a = addr + done as u64;
            let n = (PAGE_SIZE - (a & 0xfff) as usize).min(buf.len() - done);
            let src = &buf[done..done + n];
            self.access_page(a, true, false, &mut |pool, fr, off| {
                let _ = pool.write(fr, off, src);
            })?;
            done += n;
        }
        Ok(())
    }

    /// Executes (an instruction fetch touching) `addr`.
    pub fn exec(&self, addr: u64) -> Result<(), FaultError> {
        self.access_page(addr, false, true, &mut |_, _, _| {})
    }

    /// Reads a u64.
    pub fn read_u64(&self, addr: u64) -> Result<u64, FaultError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a u64.
    pub fn write_u64(&self, addr: u64, v: u64) -> Result<(), FaultError> {
        self.write(addr, &v.to_le_bytes())
    }

    /// Reads one byte.
    pub fn read_u8(&self, addr: u64) -> Result<u8, FaultError> {
        let mut b = [0u8; 1];
        self.read(addr, &mut b)?;
        Ok(b[0])
    }
}
