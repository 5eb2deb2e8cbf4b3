//! One pager instance: the frame pool, swap, statistics, registries.

use crate::frame::{FramePool, PoolError};
use crate::object::{ObjHandle, Object, ObjectKind};
use crate::pager::swap::SwapPager;
use crate::pager::{FailHook, Pager};
use crate::pmap::{Pmap, PmapId};
use parking_lot::{Condvar, Mutex, RwLock};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Access / protection bits (`vm_prot_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Prot(pub u8);

impl Prot {
    /// No access.
    pub const NONE: Prot = Prot(0);
    /// Read.
    pub const READ: Prot = Prot(1);
    /// Write.
    pub const WRITE: Prot = Prot(2);
    /// Execute.
    pub const EXEC: Prot = Prot(4);
    /// Read and write.
    pub const RW: Prot = Prot(3);
    /// Everything.
    pub const ALL: Prot = Prot(7);
    /// Does `self` include all of `o`?
    pub fn contains(self, o: Prot) -> bool {
        self.0 & o.0 == o.0
    }
    /// `self` without `o`.
    pub fn without(self, o: Prot) -> Prot {
        Prot(self.0 & !o.0)
    }
    /// Has write permission.
    pub fn writable(self) -> bool {
        self.0 & 2 != 0
    }
}

impl std::ops::BitOr for Prot {
    type Output = Prot;
    fn bitor(self, o: Prot) -> Prot {
        Prot(self.0 | o.0)
    }
}

impl std::ops::BitAnd for Prot {
    type Output = Prot;
    fn bitand(self, o: Prot) -> Prot {
        Prot(self.0 & o.0)
    }
}

/// Pager instance configuration.
#[derive(Clone)]
pub struct Config {
    /// Virtual size of the frame store (sparse).
    pub store_bytes: u64,
    /// Resident frame budget.
    pub max_resident: u64,
    /// Swap file (created, truncated); `None` = an unlinked file in the temp dir.
    pub swap_path: Option<PathBuf>,
    /// Swap size in bytes (0 = no swap).
    pub swap_bytes: u64,
    /// Failure injection for swap I/O.
    pub swap_hook: Option<Arc<FailHook>>,
    /// Collapse a shadow into its backing object when the backing object is
    /// left with a single reference (`vm_object_deallocate`'s collapse).
    pub auto_collapse: bool,
    /// Pages prefaulted each side of a fault (seed: 4).
    pub prefault: u64,
    /// Throttle faults when free frames run short (`vm_fault_ratelimit`).
    pub ratelimit: bool,
    /// Load (permille of the budget in use) from which faults are throttled.
    pub ratelimit_load: u64,
    /// Longest throttle sleep (at load 1000).
    pub ratelimit_max_sleep: Duration,
    /// Pageout keeps at least this many frames free.
    pub free_target: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            store_bytes: 64 << 30,
            max_resident: 1 << 18,
            swap_path: None,
            swap_bytes: 1 << 30,
            swap_hook: None,
            auto_collapse: true,
            prefault: 4,
            ratelimit: true,
            ratelimit_load: 950,
            ratelimit_max_sleep: Duration::from_millis(10),
            free_target: 8,
        }
    }
}

/// Counters (`vmmeter`).
#[derive(Default, Debug)]
pub struct Stats {
    /// Faults resolved (all kinds).
    pub faults: AtomicU64,
    /// Zero-fill faults.
    pub zero_fill: AtomicU64,
    /// Minor faults on a resident page.
    pub soft: AtomicU64,
    /// Copy-on-write copies.
    pub cow_copy: AtomicU64,
    /// Copy-on-write renames (page moved, no copy).
    pub cow_rename: AtomicU64,
    /// Major faults (needed pager I/O).
    pub pager_in: AtomicU64,
    /// Neighbour pages entered by prefault.
    pub prefault: AtomicU64,
    /// Pages written out by pageout.
    pub pages_out: AtomicU64,
    /// Pages read by pagers.
    pub pages_in: AtomicU64,
    /// Faults throttled by the rate limit.
    pub throttled: AtomicU64,
    /// Faults retried because the map changed while the pager slept.
    pub retries: AtomicU64,
    /// Waits on a busy page.
    pub busy_waits: AtomicU64,
    /// Clean pages freed by pageout.
    pub pages_freed: AtomicU64,
    /// Pageout write errors.
    pub pageout_errors: AtomicU64,
    /// Collapses done.
    pub collapses: AtomicU64,
}

/// A plain copy of `Stats`.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct StatsSnapshot {
    pub faults: u64,
    pub zero_fill: u64,
    pub soft: u64,
    pub cow_copy: u64,
    pub cow_rename: u64,
    pub pager_in: u64,
    pub prefault: u64,
    pub pages_out: u64,
    pub pages_in: u64,
    pub throttled: u64,
    pub retries: u64,
    pub busy_waits: u64,
    pub pages_freed: u64,
    pub pageout_errors: u64,
    pub collapses: u64,
}

impl Stats {
    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            faults: l(&self.faults),
            zero_fill: l(&self.zero_fill),
            soft: l(&self.soft),
            cow_copy: l(&self.cow_copy),
            cow_rename: l(&self.cow_rename),
            pager_in: l(&self.pager_in),
            prefault: l(&self.prefault),
            pages_out: l(&self.pages_out),
            pages_in: l(&self.pages_in),
            throttled: l(&self.throttled),
            retries: l(&self.retries),
            busy_waits: l(&self.busy_waits),
            pages_freed: l(&self.pages_freed),
            pageout_errors: l(&self.pageout_errors),
            collapses: l(&self.collapses),
        }
    }
    /// Minor faults: resolved without pager I/O.
    pub fn minor(&self) -> u64 {
        let s = self.snapshot();
        s.faults - s.pager_in
    }
}

#[inline]
pub(crate) fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// Errors creating a pager instance or its objects.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Frame store.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// Swap or file I/O.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// Bad argument.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// Out of frames.
    #[error("out of memory")]
    NoMemory,
}

/// One pager instance.
pub struct Vm {
    pub(crate) pool: FramePool,
    pub(crate) stats: Stats,
    pub(crate) config: Config,
    pub(crate) swap: Option<Arc<SwapPager>>,
    pub(crate) objects: Mutex<Vec<Weak<Object>>>,
    pub(crate) pmaps: RwLock<Vec<Option<Weak<dyn Pmap>>>>,
    pub(crate) next_id: AtomicU64,
    pub(crate) pageout_lock: Mutex<()>,
    pub(crate) pageout_wake: Condvar,
    pub(crate) pageout_cursor: AtomicU64,
}

/// At most `BURST` messages per second from one call site; the rest are
/// counted and the count is reported with the next message let through.
pub struct RateLimit {
    second: AtomicU64,
    in_second: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    const BURST: u64 = 3;
    /// A limiter that has let nothing through yet.
    pub const fn new() -> RateLimit {
        RateLimit { second: AtomicU64::new(0), in_second: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }
    /// `Some(n)` if a message may be written now (`n` were suppressed since
    /// the last one written), `None` if it is to be suppressed.
    pub fn check(&self) -> Option<u64> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.in_second.store(0, Ordering::Relaxed);
        }
        if self.in_second.fetch_add(1, Ordering::Relaxed) < Self::BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for RateLimit {
    fn default() -> RateLimit {
        RateLimit::new()
    }
}

/// Logs a warning through a `RateLimit` (a static per call site).
#[macro_export]
macro_rules! warn_ratelimited {
    ($rl:expr, $($arg:tt)+) => {
        if let Some(n) = $rl.check() {
            if n > 0 {
                log::warn!("{} ({} similar messages suppressed)", format_args!($($arg)+), n);
            } else {
                log::warn!($($arg)+);
            }
        }
    };
}

impl Vm {
    /// Creates a pager instance.
    pub fn new(config: Config) -> Result<Arc<Vm>, VmError> {
        if config.max_resident == 0 {
            return Err(VmError::Invalid("max_resident must be > 0"));
        }
        let pool = FramePool::new(config.store_bytes, config.max_resident)?;
        let swap = if config.swap_bytes > 0 {
            let (path, unlink) = match &config.swap_path {
                Some(p) => (p.clone(), false),
                None => {
                    let n = std::process::id() as u64 * 1_000_003 + NEXT_SWAP.fetch_add(1, Ordering::Relaxed);
                    (std::env::temp_dir().join(format!("vkvm-swap-{n}")), true)
                }
            };
            let sp = SwapPager::create(&path, config.swap_bytes, unlink, config.swap_hook.clone())
                .map_err(|e| VmError::Io(format!("swap file {}", path.display()), e))?;
            Some(Arc::new(sp))
        } else {
            None
        };
        Ok(Arc::new(Vm {
            pool,
            stats: Stats::default(),
            config,
            swap,
            objects: Mutex::new(Vec::new()),
            pmaps: RwLock::new(Vec::new()),
            next_id: AtomicU64::new(1),
            pageout_lock: Mutex::new(()),
            pageout_wake: Condvar::new(),
            pageout_cursor: AtomicU64::new(0),
        }))
    }

    /// The frame pool.
    pub fn pool(&self) -> &FramePool {
        &self.pool
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The swap pager, if any.
    pub fn swap(&self) -> Option<&Arc<SwapPager>> {
        self.swap.as_ref()
    }

    pub(crate) fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn register_pmap(&self, p: Weak<dyn Pmap>) -> PmapId {
        let mut v = self.pmaps.write();
        if let Some(i) = v.iter().position(|s| s.is_none()) {
            v[i] = Some(p);
            return i as PmapId;
        }
        v.push(Some(p));
        (v.len() - 1) as PmapId
    }

    pub(crate) fn unregister_pmap(&self, id: PmapId) {
        if let Some(s) = self.pmaps.write().get_mut(id as usize) {
            *s = None;
        }
    }

    pub(crate) fn pmap(&self, id: PmapId) -> Option<Arc<dyn Pmap>> {
        self.pmaps.read().get(id as usize).and_then(|w| w.as_ref()).and_then(|w| w.upgrade())
    }

    /// Live objects (for pageout).
    pub(crate) fn live_objects(&self) -> Vec<Arc<Object>> {
        let mut v = self.objects.lock();
        v.retain(|w| w.strong_count() > 0);
        v.iter().filter_map(|w| w.upgrade()).collect()
    }

    /// A zero-fill object of `pages` pages.
    pub fn anonymous(self: &Arc<Vm>, pages: u64) -> ObjHandle {
        Object::create(self, ObjectKind::Anonymous, pages, None, None)
    }

    /// An object backed by `pager` (e.g. a `MemPager` in tests).
    pub fn with_pager(
        self: &Arc<Vm>,
        kind: ObjectKind,
        pages: u64,
        pager: Arc<dyn Pager>,
        handle: Option<u64>,
    ) -> ObjHandle {
        Object::create(self, kind, pages, Some(pager), handle)
    }

    /// A file object over `file` (size = file length rounded up to pages).
    pub fn file_object(
        self: &Arc<Vm>,
        file: std::fs::File,
        writable: bool,
        hook: Option<Arc<FailHook>>,
    ) -> Result<ObjHandle, VmError> {
        let fp = crate::pager::file::FilePager::new(file, writable, hook).map_err(|e| VmError::Io("file".into(), e))?;
        let pages = fp.len().div_ceil(crate::frame::PAGE_SIZE as u64);
        let id = self.new_id();
        Ok(Object::create(self, ObjectKind::File, pages, Some(Arc::new(fp)), Some(id)))
    }

    /// A device object of `pages` fixed frames (outside the budget).
    pub fn device_object(self: &Arc<Vm>, pages: u64) -> Result<(ObjHandle, Vec<crate::frame::Frame>), VmError> {
        let mut frames = Vec::new();
        for _ in 0..pages {
            match self.pool.alloc_unbudgeted() {
                Some(f) => frames.push(f),
                None => {
                    for f in frames {
                        self.pool.free_unbudgeted(f);
                    }
                    return Err(VmError::NoMemory);
                }
            }
        }
        let dp = crate::pager::device::DevicePager::new(frames.clone());
        let id = self.new_id();
        Ok((Object::create(self, ObjectKind::Device, pages, Some(Arc::new(dp)), Some(id)), frames))
    }

    /// Is the swap full (configured, and no free slot)? Dirty anonymous
    /// pages then cannot leave memory.
    pub fn swap_full(&self) -> bool {
        self.swap.as_ref().is_some_and(|s| s.free_slots() == 0)
    }

    /// Out of memory, for a fault that found no free frame: the swap is
    /// full (where the seed asks `vm_page_count_severe`). The data the maps
    /// hold needs frames + swap slots; with no free slot no dirty page can
    /// leave, so a frame could only come from a clean page whose copy is in
    /// swap, whose owner would soon take one back: the maps (however many
    /// share the pager) would thrash without progress instead of failing.
    /// Such a fault fails at once, without the retries.
    pub fn out_of_memory(&self) -> bool {
        self.swap_full()
    }

    /// Wakes the pageout daemon.
    pub(crate) fn wake_pageout(&self) {
        self.pageout_wake.notify_all();
    }
}

static NEXT_SWAP: AtomicU64 = AtomicU64::new(0);

#[cfg(test)]
mod tests {
    use super::RateLimit;

    #[test]
    fn rate_limit_lets_a_burst_through_then_counts() {
        let rl = RateLimit::new();
        // Stay inside one second of the clock for the burst.
        let start = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        if start.subsec_millis() > 900 {
            std::thread::sleep(std::time::Duration::from_millis(150));
        }
        assert_eq!((0..3).map(|_| rl.check()).collect::<Vec<_>>(), vec![Some(0); 3]);
        assert_eq!((0..1000).filter_map(|_| rl.check()).count(), 0, "suppressed past the burst");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(rl.check(), Some(1000), "the next second reports how many were suppressed");
    }
}
