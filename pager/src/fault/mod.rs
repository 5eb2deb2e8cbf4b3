//! The page fault handler (`vm_fault`), in named steps over one
//! `FaultState` (`struct faultstate`), plus `fault_range` and `access` for
//! the VMM's own touches of guest memory.
//!
//! One pass, under the map read lock (`fault_pass`):
//!
//! | step | module | seed |
//! |---|---|---|
//! | lookup (entry, first object, index, protection) | `lookup` | `vm_map_lookup` |
//! | VPAGETABLE walk, windows only | `crate::vpagetable` | `vm_fault_vpagetable` |
//! | walk the shadow chain, ask pagers | `object` | `vm_fault_object`, `TRYPAGER` |
//! | page-in request, read-ahead/behind | `getpages` | the `readrest` block, `vm_fault_additional_pages` |
//! | zero-fill in the first object | `zerofill` | end of the chain in `vm_fault_object` |
//! | write to a backing page: rename or copy | `cow` | `vm_page_rename` (`v_cow_optim`), `vm_page_copy` |
//! | enter the page, wiring, hold, stats | `install` | tail of `vm_fault` (`vm_page_activate`, `pmap_enter`) |
//! | enter resident neighbours | `prefault` | `pmap_prefault` |
//!
//! A step returns `Result<T, Retry>`. `Retry` is every way a pass can stop
//! short (the seed's `KERN_TRY_AGAIN` paths and its errors): `fault` acts on
//! it with no lock held (wait, run the pager, reclaim, make a shadow) and
//! starts the next pass, or returns the error. The seed's `unlock_things`,
//! `unlock_and_deallocate` and `cleanup_successful_fault` are the drops of
//! the guards a step holds (`ObjGuard`, `PlaceholderGuard`, `Held`).

mod cow;
mod getpages;
mod guest;
mod held;
mod install;
mod lookup;
mod object;
mod prefault;
mod zerofill;

pub use guest::{access, fault_range, quick_fault, read_guest, write_guest};
pub use held::Held;
pub(crate) use lookup::{lookup_normal, FirstObject};
pub(crate) use object::{fault_object, Found};

use crate::frame::{Frame, PAGE_SIZE};
use crate::map::{Map, MapInner};
use crate::object::Object;
use crate::stages::{self, Stage};
use crate::vm::{bump, Prot, Vm};
use crate::vpagetable::Walk;
use getpages::PageInReq;
use smallvec::SmallVec;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const PS: u64 = PAGE_SIZE as u64;
/// How many times a fault retries allocation (waiting for pageout) before
/// it reports `NoMemory`.
const NOMEM_TRIES: u32 = 400;

/// Fault errors (`KERN_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    /// No entry maps the address (`KERN_INVALID_ADDRESS`).
    #[error("address not mapped")]
    NotMapped,
    /// Access not allowed, page beyond the object, bad pager page, dead
    /// object, vpte frame out of bounds (`KERN_PROTECTION_FAILURE`).
    #[error("protection failure")]
    Protection,
    /// Pager I/O error (`KERN_FAILURE`).
    #[error("fault failure")]
    Failure,
    /// The guest's vpte tables refuse the access: V clear, or no RW (write)
    /// or NX (exec) at some level (`KERN_FAILURE` in the seed; told apart
    /// here so an I/O error on a table page is never blamed on the guest).
    #[error("invalid vpte")]
    InvalidVpte,
    /// No frame could be freed in time.
    #[error("out of memory")]
    NoMemory,
}

/// Fault flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FaultFlags(pub u8);

impl FaultFlags {
    /// Plain fault.
    pub const NONE: FaultFlags = FaultFlags(0);
    /// Change wiring (`VM_FAULT_CHANGE_WIRING`): wire if the entry is wired.
    pub const WIRE: FaultFlags = FaultFlags(1);
    /// Hold the page (`VM_FAULT_HOLD`): `Resolved::held` releases it.
    pub const HOLD: FaultFlags = FaultFlags(2);
    /// Do not prefault neighbours.
    pub const NO_PREFAULT: FaultFlags = FaultFlags(4);
    fn has(self, f: FaultFlags) -> bool {
        self.0 & f.0 != 0
    }
}

impl std::ops::BitOr for FaultFlags {
    type Output = FaultFlags;
    fn bitor(self, o: FaultFlags) -> FaultFlags {
        FaultFlags(self.0 | o.0)
    }
}

/// How a fault was resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// A fresh zero page in the top object.
    ZeroFill,
    /// The page was resident.
    Soft,
    /// Copied from a backing object.
    CowCopy,
    /// Moved from the backing object (no copy).
    CowRename,
    /// Read by a pager (major fault).
    PagerIn,
}

/// A resolved fault.
pub struct Resolved {
    /// Page-aligned faulting address.
    pub addr: u64,
    /// Frame entered.
    pub frame: Frame,
    /// Protection entered with.
    pub prot: Prot,
    /// How it was resolved.
    pub kind: FaultKind,
    /// Neighbours also entered (prefault): (addr, frame, prot).
    pub prefault: Vec<(u64, Frame, Prot)>,
    /// Map generation the result is valid for.
    pub generation: u64,
    /// The hold, with `FaultFlags::HOLD`.
    pub held: Option<Held>,
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolved")
            .field("addr", &self.addr)
            .field("frame", &self.frame)
            .field("prot", &self.prot)
            .field("kind", &self.kind)
            .field("prefault", &self.prefault.len())
            .finish()
    }
}

/// Why a pass stopped short of a result: the seed's `KERN_TRY_AGAIN`
/// returns (each after `unlock_things`) and its errors. `fault` acts on it
/// with no lock held, then starts a new pass or returns the error. It is
/// the error side of every step's `Result`, so a step's success can never
/// be mistaken for it.
pub(crate) enum Retry {
    /// Look again from the lookup (`KERN_TRY_AGAIN`, nothing to wait for).
    Again,
    /// Wait until this page is not busy (`vm_page_sleep_busy`).
    WaitBusy(Arc<Object>, u64),
    /// Run the pager (`vm_pager_get_pages`), then look again.
    PageIn(PageInReq),
    /// No free frame: reclaim, then look again (`vm_waitpfault`).
    NoMemory,
    /// Rate-limited: sleep, then look again (`vm_fault_ratelimit`).
    Throttle(Duration),
    /// The entry at this address needs its shadow before a write: make it
    /// under the map write lock (`vm_map_lookup`'s needs-copy path).
    NeedsCopy(u64),
    /// The fault fails (`KERN_PROTECTION_FAILURE`, `KERN_FAILURE`, ...).
    Fail(FaultError),
}

impl From<FaultError> for Retry {
    fn from(e: FaultError) -> Retry {
        Retry::Fail(e)
    }
}

/// A fault's state (`struct faultstate`), passed to every step. What
/// survives a retry (`RetryFault:` in the seed): the request, `hardfault`,
/// `didlimit`, held pages, pagers to skip. What each pass's lookup sets:
/// `wired`, `fault_type`, `map_generation`, the VPAGETABLE walk. What
/// borrows the map (entries, first object and index) lives in
/// `lookup::Lookup`, valid while the pass holds the map read lock.
pub(crate) struct FaultState<'a> {
    pub(crate) map: &'a Map,
    pub(crate) vm: &'a Vm,
    /// Page-aligned faulting address (`vaddr`).
    pub(crate) vaddr: u64,
    /// The access asked for.
    pub(crate) access: Prot,
    /// `fs->fault_flags`.
    pub(crate) flags: FaultFlags,
    /// The faulting entry is wired (`fs->wired`).
    pub(crate) wired: bool,
    /// `fault_type`: `access`, or a wired entry's own protection.
    pub(crate) fault_type: Prot,
    /// `fs->map_generation`: the map timestamp of this pass's lookup.
    pub(crate) map_generation: u64,
    /// This pass's VPAGETABLE walk (`vm_fault_vpagetable`), windows only:
    /// its table pages stay held until `install` sets A/M; dropped with the
    /// pass if it stops short.
    pub(crate) walk: Option<Walk>,
    /// The generation at which a pass let go of the map for pager I/O (the
    /// seed's `lookup_still_valid == FALSE`); checked by the next lookup.
    io_generation: Option<u64>,
    /// `fs->hardfault`: a pager brought the page in.
    hardfault: bool,
    /// `fs->didlimit`: this fault was rate-limited already.
    didlimit: bool,
    /// Objects whose pager answered "fail": `TRYPAGER` is false for them.
    skip: SmallVec<[u64; 2]>,
    /// Pages held across a retry (the page a page-in brought).
    helds: SmallVec<[Held; 2]>,
    /// Allocation failures so far.
    nomem: u32,
}

impl<'a> FaultState<'a> {
    fn new(map: &'a Map, vaddr: u64, access: Prot, flags: FaultFlags) -> FaultState<'a> {
        FaultState {
            map,
            vm: &map.vm,
            vaddr,
            access,
            flags,
            wired: false,
            fault_type: access,
            map_generation: 0,
            walk: None,
            io_generation: None,
            hardfault: false,
            didlimit: false,
            skip: SmallVec::new(),
            helds: SmallVec::new(),
            nomem: 0,
        }
    }

    /// Starts a pass under a map generation (`fs.map_generation =
    /// map->timestamp`). After pager I/O (`lookup_still_valid` false) a
    /// changed generation is counted: everything is looked up again anyway.
    fn begin_pass(&mut self, timestamp: u64) {
        if let Some(gen) = self.io_generation.take() {
            if gen != timestamp {
                bump(&self.vm.stats.retries);
            }
        }
        self.map_generation = timestamp;
    }

    /// `vm_fault_ratelimit`: once per fault, throttle when free frames are
    /// short. Called before every new page in the first object (zero-fill,
    /// page-in, COW copy).
    #[inline]
    fn ratelimit(&mut self) -> Result<(), Retry> {
        if self.didlimit || !self.vm.config.ratelimit {
            return Ok(());
        }
        self.ratelimit_load()
    }

    /// `vm_fault_ratelimit` once the fault may be limited: the load test.
    fn ratelimit_load(&mut self) -> Result<(), Retry> {
        let c = &self.vm.config;
        let max = self.vm.pool.max_resident().max(1);
        let load = (self.vm.pool.resident() * 1000 / max).min(1000);
        if load < c.ratelimit_load {
            return Ok(());
        }
        if self.map.pagesupply.fetch_sub(1, Ordering::Relaxed) > 0 {
            return Ok(());
        }
        self.map.pagesupply.store(((1000 - load) / 10) as i64, Ordering::Relaxed);
        self.didlimit = true;
        Err(Retry::Throttle(c.ratelimit_max_sleep.mul_f64(load as f64 / 1000.0)))
    }

    /// Acts on a pass's `Retry` with no lock held, or returns the fault's
    /// error (the seed's `goto RetryFault` sites).
    fn try_again(&mut self, r: Retry) -> Result<(), FaultError> {
        let vm = self.vm;
        match r {
            Retry::Again => {}
            Retry::WaitBusy(o, p) => {
                // The seed's `v_intrans`.
                bump(&vm.stats.busy_waits);
                o.wait_unbusy(p);
            }
            Retry::PageIn(req) => stages::timed(Stage::PagerIo, || getpages::getpages(self, req))?,
            Retry::NoMemory => {
                self.nomem += 1;
                // Out of memory (`Vm::out_of_memory`): a frame freed by
                // another map's thrash would be no progress: fail at once.
                if self.nomem > NOMEM_TRIES || vm.out_of_memory() {
                    return Err(FaultError::NoMemory);
                }
                reclaim(vm);
            }
            Retry::Throttle(d) => {
                bump(&vm.stats.throttled);
                std::thread::sleep(d);
            }
            Retry::NeedsCopy(at) => {
                let mut g = self.map.inner.write();
                if let Some(e) = g.lookup_mut(at) {
                    if e.needs_copy {
                        e.make_shadow();
                        g.timestamp += 1;
                    }
                }
            }
            Retry::Fail(e) => return Err(e),
        }
        Ok(())
    }
}

/// Handles a fault at `addr` needing `access` (`vm_fault`). On success the
/// page (and prefaulted neighbours) are entered in the map's pmap.
pub fn fault(map: &Map, addr: u64, access: Prot, flags: FaultFlags) -> Result<Resolved, FaultError> {
    let mut fs = FaultState::new(map, addr & !(PS - 1), access, flags);
    loop {
        let pass = {
            let g = map.inner.read();
            fault_pass(&mut fs, &g)
        };
        match pass {
            Ok(r) => {
                bump(&map.vm.stats.faults);
                return Ok(r);
            }
            Err(retry) => fs.try_again(retry)?,
        }
    }
}

/// One pass with the map read-locked (the seed's `RetryFault:` label to the
/// end of `vm_fault`): lookup -> (VPAGETABLE walk) -> `vm_fault_object` ->
/// install (-> prefault).
fn fault_pass(fs: &mut FaultState, g: &MapInner) -> Result<Resolved, Retry> {
    let lk = lookup::lookup(fs, g)?;
    match stages::timed(Stage::ChainWalk, || object::fault_object(fs, &lk.first)) {
        Ok(found) => install::install(fs, lk, found),
        Err(r) => {
            // A window's walk (its table pages' holds) ends with the pass,
            // under the map lock.
            fs.walk = None;
            Err(r)
        }
    }
}

/// Waits for pageout to free frames (running it directly if needed).
fn reclaim(vm: &Vm) {
    vm.wake_pageout();
    let freed = crate::pageout::reclaim(vm, vm.config.free_target.max(1));
    if freed == 0 {
        vm.pool.wait_free(Duration::from_millis(5));
    }
}
