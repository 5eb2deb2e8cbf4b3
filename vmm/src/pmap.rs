//! The KVM pmap: a guest-physical range of the VMM's own address space (the
//! "view") that a KVM memslot points at. `enter` makes a pager frame visible
//! at a guest address by mapping the frame pool's memfd there, `remove` makes
//! it absent again, `protect` write-protects it. KVM follows these host
//! mapping changes through its MMU notifiers.
//!
//! Two ways to learn that the guest touched an absent page:
//! - uffd: the view is registered for missing, minor and write-protect faults;
//!   absent = no PTE (the frame may or may not be in the memfd's page cache).
//!   `enter` installs the PTE with UFFDIO_CONTINUE (page in the cache) or
//!   UFFDIO_ZEROPAGE (a hole, which is zero by construction), which also wakes
//!   the faulting thread.
//! - exit: absent = PROT_NONE; an emulated guest access then comes back from
//!   KVM_RUN as KVM_EXIT_MMIO with the address, and `enter` is an mprotect.
//!
//! A page is remapped (one mmap) only when the frame to show is not the one
//! the view already maps at that address; frames of one object are laid out
//! contiguously, so neighbouring guest pages keep merging into one host VMA.

use crate::uffd::{Mode, Uffd};
use pager::{Frame, Pmap, Prot, PAGE_SIZE};
use parking_lot::Mutex;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const PS: u64 = PAGE_SIZE as u64;
/// `slots[p]` holds the frame mapped at page p plus one (0: no frame, so a
/// fresh table is zero pages the host allocates only when written: a
/// clone's view costs nothing for the guest-physical space it never maps),
/// plus these bits.
const PRESENT: u64 = 1 << 63;
/// The slot's frame was installed before, so its data is likely in the page
/// cache (CONTINUE first); a never-installed frame is likely a hole (ZEROPAGE first).
const SEEN: u64 = 1 << 62;
/// Entered, install pending in the current batch (implies the frame is set).
const PENDING: u64 = 1 << 61;
const FRAME_BITS: u64 = PENDING - 1;
const NO_FRAME: u64 = 0;

/// The frame a slot names, if any.
fn slot_frame(s: u64) -> Option<Frame> {
    (s & FRAME_BITS).checked_sub(1)
}

/// A slot naming `frame`, no flags.
fn slot_of(frame: Frame) -> u64 {
    (frame + 1) & FRAME_BITS
}

/// How absent pages reach the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    Uffd,
    Exit,
}

#[derive(Default)]
pub struct ViewStats {
    /// mmap calls that changed which frame a page shows.
    pub remaps: AtomicU64,
    /// Pages installed (CONTINUE, ZEROPAGE or mprotect).
    pub installs: AtomicU64,
    /// Host mapping calls that failed (e.g. vm.max_map_count reached).
    pub map_errors: AtomicU64,
    /// 2 MiB chunks re-laid in one mmap instead of a page remap (see `relayout`).
    pub relayouts: AtomicU64,
}

/// Pages in a relayout chunk (2 MiB).
const CHUNK: usize = 512;

/// Host view of one guest-physical range.
pub struct View {
    base: u64,
    size: u64,
    pool_fd: RawFd,
    /// Frames in the pool: a mapping past its end would fault with SIGBUS
    /// before userfaultfd ever saw the touch (KVM_RUN fails with EFAULT).
    pool_frames: u64,
    delivery: Delivery,
    uffd: Option<Arc<Uffd>>,
    /// Writes a frame's zeros into the page cache (read-only installs of a hole).
    zero_frame: Box<dyn Fn(Frame) -> bool + Send + Sync>,
    slots: Mutex<Vec<u64>>,
    /// Odd while a `replace` is under way (see `remapped_since`).
    remap_gen: AtomicU64,
    /// Backed ranges (page numbers, from `add_region`): a relayout chunk
    /// never crosses into a neighbouring region's memslot or a gap.
    regions: Mutex<Vec<(usize, usize)>>,
    /// While set, `protect` only records its ranges (see `defer_protect`).
    deferred: Mutex<Option<Vec<(u64, u64, Prot)>>>,
    /// Pages whose writable install of a never-seen frame waits for
    /// `end_batch` (fault-around), so a run of holes takes one ZEROPAGE.
    batch: Mutex<Option<Vec<usize>>>,
    pub stats: ViewStats,
}

// SAFETY: `base` is an address in our own mapping, never dereferenced here
// except through syscalls; all mutable state is behind the mutex.
unsafe impl Send for View {}
unsafe impl Sync for View {}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

const ALL_FAULTS: Mode = Mode { missing: true, write_protect: true, minor: true };

impl View {
    /// Reserve a guest-physical window of `size` bytes with nothing in it;
    /// `add_region` then backs parts of it.
    pub fn new(
        size: u64,
        pool_fd: RawFd,
        delivery: Delivery,
        uffd: Option<Arc<Uffd>>,
        zero_frame: Box<dyn Fn(Frame) -> bool + Send + Sync>,
    ) -> io::Result<View> {
        // SAFETY: a fresh inaccessible reservation at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstat of the pool's memfd into a local struct.
        let pool_frames = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            check(libc::fstat(pool_fd, &mut st))?;
            st.st_size as u64 / PS
        };
        Ok(View {
            base: p as u64,
            size,
            pool_fd,
            pool_frames,
            delivery,
            uffd,
            zero_frame,
            slots: Mutex::new(vec![NO_FRAME; (size / PS) as usize]),
            regions: Mutex::new(Vec::new()),
            remap_gen: AtomicU64::new(0),
            deferred: Mutex::new(None),
            batch: Mutex::new(None),
            stats: ViewStats::default(),
        })
    }

    /// Back `[gpa, gpa + len)` with pool frames `first..` (an object's
    /// preferred frames, so its pages need no remap), none present yet.
    pub fn add_region(&self, gpa: u64, len: u64, first_frame: Option<Frame>) -> io::Result<()> {
        if gpa.checked_add(len).is_none_or(|e| e > self.size) || !gpa.is_multiple_of(PS) || !len.is_multiple_of(PS) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "region outside the view"));
        }
        let prot = match self.delivery {
            Delivery::Uffd => libc::PROT_READ | libc::PROT_WRITE,
            Delivery::Exit => libc::PROT_NONE,
        };
        let first = first_frame.unwrap_or(0);
        // SAFETY: replacing part of our own reservation with our memfd.
        let p = unsafe {
            libc::mmap(
                (self.base + gpa) as *mut libc::c_void,
                len as usize,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
                self.pool_fd,
                (first * PS) as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        if let Some(u) = &self.uffd {
            u.register(self.base + gpa, len, ALL_FAULTS)?;
        }
        let mut slots = self.slots.lock();
        for (i, s) in slots[(gpa / PS) as usize..((gpa + len) / PS) as usize].iter_mut().enumerate() {
            *s = if first_frame.is_some() { slot_of(first + i as u64) } else { NO_FRAME };
        }
        self.regions.lock().push(((gpa / PS) as usize, ((gpa + len) / PS) as usize));
        Ok(())
    }

    /// Instead of remapping page `p` alone to `frame` (one more host VMA,
    /// and vm.max_map_count caps a process at 65530), re-lay its whole 2 MiB
    /// chunk in one mmap so that page `q` shows `frame - p + q`, when that
    /// layout agrees with every page the chunk has present (or pending): the
    /// chunk then costs one VMA and the object's later pages in it are in
    /// place. This is what makes a clone's writes cheap in VMAs: its shadow
    /// object's frames are contiguous, so a chunk the clone writes flips to
    /// them once and stays. Present pages lose their PTE (they refault, as
    /// after any remove); absent pages' slots only say what the VMA maps.
    /// False (nothing done) when the layout would disagree with a present
    /// page or fall off either end of the pool.
    fn relayout(&self, slots: &mut [u64], p: usize, frame: Frame) -> io::Result<bool> {
        let (r0, r1) = match self.regions.lock().iter().find(|&&(a, b)| p >= a && p < b) {
            Some(&r) => r,
            None => return Ok(false),
        };
        let c0 = (p & !(CHUNK - 1)).max(r0);
        let c1 = ((p & !(CHUNK - 1)) + CHUNK).min(r1);
        let Some(first) = frame.checked_sub((p - c0) as u64) else { return Ok(false) };
        if first + (c1 - c0) as u64 > self.pool_frames {
            return Ok(false);
        }
        let agrees = slots[c0..c1]
            .iter()
            .enumerate()
            .all(|(i, &s)| s & (PRESENT | PENDING) == 0 || slot_frame(s) == Some(first + i as u64));
        if !agrees || c1 - c0 < 2 {
            return Ok(false);
        }
        let host = self.base + c0 as u64 * PS;
        let absent = match self.delivery {
            Delivery::Uffd => libc::PROT_READ | libc::PROT_WRITE,
            Delivery::Exit => libc::PROT_NONE,
        };
        self.replace(host, (c1 - c0) as u64 * PS, first, absent)?;
        for (i, s) in slots[c0..c1].iter_mut().enumerate() {
            // Pending installs stay pending: the VMA maps their frame still.
            *s = slot_of(first + i as u64) | (*s & PENDING);
        }
        self.stats.relayouts.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    pub fn host_addr(&self) -> u64 {
        self.base
    }
    /// Size of the guest-physical window.
    pub fn window(&self) -> u64 {
        self.size
    }
    pub fn delivery(&self) -> Delivery {
        self.delivery
    }
    /// Record `protect` calls instead of doing them, until `run_deferred`.
    /// For a clone: the parent's only vCPU is the thread that clones, so it
    /// cannot write until the protection is done, and the clone can start
    /// before the O(resident pages) write-protection of the parent.
    pub fn defer_protect(&self) {
        *self.deferred.lock() = Some(Vec::new());
    }

    /// Carry out the recorded `protect` calls.
    pub fn run_deferred(&self) {
        let ranges = self.deferred.lock().take().unwrap_or_default();
        for (s, e, p) in ranges {
            self.protect(s, e, p);
        }
    }

    /// Collect installs of fresh writable pages (fault-around) until the
    /// guard is dropped, which installs them.
    pub fn batch(&self) -> Batch<'_> {
        *self.batch.lock() = Some(Vec::new());
        Batch(self)
    }

    /// Install the collected pages: one UFFDIO_ZEROPAGE per run of
    /// contiguous holes, page by page where that fails (data was there).
    fn end_batch(&self) {
        let Some(mut pages) = self.batch.lock().take() else { return };
        pages.sort_unstable();
        pages.dedup();
        let mut slots = self.slots.lock();
        // Pages removed meanwhile are no longer pending.
        pages.retain(|&p| slots[p] & PENDING != 0);
        let mut i = 0;
        while i < pages.len() {
            let run = pages[i..].iter().enumerate().take_while(|&(k, &p)| p == pages[i] + k).count();
            let host = self.base + pages[i] as u64 * PS;
            let whole = self.uffd.as_ref().is_some_and(|u| u.zeropage(host, run as u64 * PS).is_ok());
            for &p in &pages[i..i + run] {
                // A pending slot always names its frame.
                let Some(frame) = slot_frame(slots[p]) else { continue };
                let done = whole || self.install(self.base + p as u64 * PS, frame, Prot::RW, true).is_ok();
                slots[p] = if done { slot_of(frame) | PRESENT | SEEN } else { NO_FRAME };
            }
            if whole {
                self.stats.installs.fetch_add(run as u64, Ordering::Relaxed);
            }
            i += run;
        }
    }

    /// Guest address of a host address inside the view.
    pub fn gpa_of(&self, host: u64) -> Option<u64> {
        host.checked_sub(self.base).filter(|&o| o < self.size)
    }
    /// Is a PTE present at `gpa` (as far as enter/remove know)?
    pub fn present(&self, gpa: u64) -> bool {
        self.slots.lock().get((gpa / PS) as usize).is_some_and(|s| s & (PRESENT | PENDING) != 0)
    }
    /// Number of present pages (for `--prefault` checks and stats).
    pub fn present_count(&self) -> usize {
        self.slots.lock().iter().filter(|&&s| s & PRESENT != 0).count()
    }

    /// Show `frame` at `host` (one page) if the view maps another frame there.
    fn map_frame(&self, host: u64, frame: Frame, prot: Prot) -> io::Result<()> {
        let hprot = match self.delivery {
            Delivery::Uffd => libc::PROT_READ | libc::PROT_WRITE,
            Delivery::Exit => host_prot(prot),
        };
        self.replace(host, PS, frame, hprot)?;
        self.stats.remaps.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Map `[host, host + len)` onto frames `first..` with `prot`. A new
    /// mapping is not registered with userfaultfd, and a guest touch of an
    /// unregistered shared mapping is served by the host directly, from
    /// whatever that memfd offset holds (another object's data, or a fresh
    /// page the pager knows nothing of): so with userfaultfd the range is
    /// first mapped inaccessible, registered, then opened. A vCPU that
    /// touches it meanwhile gets EFAULT from KVM_RUN and re-enters once the
    /// remap is done (`remapped_since`); `remap_gen` is odd while one runs.
    fn replace(&self, host: u64, len: u64, first: Frame, prot: libc::c_int) -> io::Result<()> {
        let _gap = RemapGap::open(&self.remap_gen);
        let closed = if self.uffd.is_some() { libc::PROT_NONE } else { prot };
        // SAFETY: replacing part of our own view with frames of our memfd.
        let p = unsafe {
            libc::mmap(
                host as *mut libc::c_void,
                len as usize,
                closed,
                libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
                self.pool_fd,
                (first * PS) as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        if let Some(u) = &self.uffd {
            u.register(host, len, ALL_FAULTS)?;
            // SAFETY: opening the range we just mapped and registered.
            check(unsafe { libc::mprotect(host as *mut libc::c_void, len as usize, prot) })?;
        }
        Ok(())
    }

    /// The remap generation, read before a vCPU enters the guest.
    pub fn remap_gen(&self) -> u64 {
        self.remap_gen.load(Ordering::Acquire)
    }

    /// Was a remap running, or did one run, since `gen` was read? If so a
    /// KVM_RUN that failed with EFAULT touched a range being remapped: wait
    /// for the remap to finish; the vCPU then re-enters and retries.
    pub fn remapped_since(&self, gen: u64) -> bool {
        let mut now = self.remap_gen();
        if now == gen && now.is_multiple_of(2) {
            return false;
        }
        while !now.is_multiple_of(2) {
            std::thread::yield_now();
            now = self.remap_gen();
        }
        true
    }

    /// Install the PTE of an already-mapped frame with `prot`.
    fn install(&self, host: u64, frame: Frame, prot: Prot, seen: bool) -> io::Result<()> {
        self.stats.installs.fetch_add(1, Ordering::Relaxed);
        let Some(u) = &self.uffd else {
            // SAFETY: changing protection of one page of our view.
            return check(unsafe { libc::mprotect(host as *mut libc::c_void, PAGE_SIZE, host_prot(prot)) });
        };
        let wp = !prot.writable();
        // ZEROPAGE only succeeds on an empty page-cache slot (a hole, which is
        // zero), so trying it first is safe; EEXIST means data is there.
        if !wp && !seen {
            match u.zeropage(host, PS) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e),
            }
        }
        for _ in 0..8 {
            match u.continue_(host, PS, wp) {
                Ok(()) => return Ok(()),
                Err(e) => match e.raw_os_error() {
                    // A PTE is already there: just set its write protection.
                    Some(libc::EEXIST) => return u.write_protect(host, PS, wp),
                    // Not in the page cache: the frame is a hole, i.e. zero.
                    Some(libc::EFAULT) if !wp => match u.zeropage(host, PS) {
                        Ok(()) => return Ok(()),
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                        Err(e) => return Err(e),
                    },
                    // Read-only hole: put the zeros in the page cache first so
                    // the page appears write-protected in one step.
                    Some(libc::EFAULT) => {
                        if !(self.zero_frame)(frame) {
                            return Err(io::Error::other("cannot zero a frame"));
                        }
                    }
                    Some(libc::EAGAIN) => std::thread::yield_now(),
                    _ => return Err(e),
                },
            }
        }
        Err(io::Error::other("page kept changing under UFFDIO_CONTINUE"))
    }

    fn range(&self, start: u64, end: u64) -> Option<(usize, usize)> {
        let s = start.min(self.size) / PS;
        let e = end.min(self.size).div_ceil(PS);
        (s < e).then_some((s as usize, e as usize))
    }
}

/// A batch of installs (see [`View::batch`]), flushed when dropped.
pub struct Batch<'a>(&'a View);

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.0.end_batch();
    }
}

thread_local! {
    /// The page whose `enter` on this thread last failed, and the error.
    static MAP_FAILURE: std::cell::Cell<Option<(u64, i32)>> = const { std::cell::Cell::new(None) };
}

/// Forget this thread's last host mapping failure (before a fault).
pub fn clear_map_failure() {
    MAP_FAILURE.with(|f| f.set(None));
}

/// Did this thread fail to map guest page `gpa` since `clear_map_failure`?
/// (`Pmap::enter` cannot return an error to the pager; the page stays
/// absent and, unless the fault's caller asks, the guest would refault on
/// it forever.)
pub fn take_map_failure(gpa: u64) -> Option<io::Error> {
    MAP_FAILURE.with(|f| match f.take() {
        Some((page, errno)) if page == gpa & !(PS - 1) => Some(io::Error::from_raw_os_error(errno)),
        other => {
            f.set(other);
            None
        }
    })
}

/// Makes `remap_gen` odd for as long as it lives (even again on any path).
struct RemapGap<'a>(&'a AtomicU64);

impl<'a> RemapGap<'a> {
    fn open(gen: &'a AtomicU64) -> RemapGap<'a> {
        gen.fetch_add(1, Ordering::AcqRel);
        RemapGap(gen)
    }
}

impl Drop for RemapGap<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

fn host_prot(p: Prot) -> libc::c_int {
    let mut h = libc::PROT_NONE;
    if p.contains(Prot::READ) || p.contains(Prot::EXEC) {
        h |= libc::PROT_READ;
    }
    if p.writable() {
        h |= libc::PROT_READ | libc::PROT_WRITE;
    }
    h
}

impl Pmap for View {
    fn enter(&self, addr: u64, frame: Frame, prot: Prot, _wired: bool) {
        let p = (addr / PS) as usize;
        let host = self.base + p as u64 * PS;
        let mut slots = self.slots.lock();
        let Some(slot) = slots.get_mut(p) else { return };
        if slot_frame(*slot) == Some(frame) && *slot & (SEEN | PRESENT) == 0 && prot.writable() {
            if let Some(b) = self.batch.lock().as_mut() {
                b.push(p);
                *slot = slot_of(frame) | PENDING;
                return;
            }
        }
        let res = (|| {
            let mut seen = slots[p] & SEEN != 0;
            if slot_frame(slots[p]) != Some(frame) {
                if !self.relayout(&mut slots, p, frame)? {
                    self.map_frame(host, frame, prot)?;
                }
                seen = false;
            }
            self.install(host, frame, prot, seen)
        })();
        let slot = &mut slots[p];
        match res {
            Ok(()) => *slot = slot_of(frame) | PRESENT | SEEN,
            Err(e) => {
                // The page stays absent; the guest faults again and the VMM
                // sees map_errors grow.
                self.stats.map_errors.fetch_add(1, Ordering::Relaxed);
                *slot = NO_FRAME;
                MAP_FAILURE.with(|f| f.set(Some((addr & !(PS - 1), e.raw_os_error().unwrap_or(libc::EIO)))));
                crate::limited!(
                    crate::ratelimit::HOST_MAP,
                    "cannot map frame {frame} at guest {addr:#x}: {e} (check vm.max_map_count)"
                );
            }
        }
    }

    fn remove(&self, start: u64, end: u64) {
        let Some((s, e)) = self.range(start, end) else { return };
        let mut slots = self.slots.lock();
        let host = self.base + s as u64 * PS;
        let len = (e - s) * PAGE_SIZE;
        // SAFETY: dropping PTEs (uffd) or access (exit) in our own view.
        let r = unsafe {
            match self.delivery {
                Delivery::Uffd => libc::madvise(host as *mut libc::c_void, len, libc::MADV_DONTNEED),
                Delivery::Exit => libc::mprotect(host as *mut libc::c_void, len, libc::PROT_NONE),
            }
        };
        if let Err(err) = check(r) {
            self.stats.map_errors.fetch_add(1, Ordering::Relaxed);
            crate::limited!(crate::ratelimit::HOST_MAP, "cannot remove guest [{start:#x}, {end:#x}): {err}");
        }
        for s in &mut slots[s..e] {
            *s &= !(PRESENT | PENDING);
        }
    }

    fn protect(&self, start: u64, end: u64, prot: Prot) {
        if prot.writable() {
            return; // pmap_protect only ever takes rights away
        }
        if let Some(d) = self.deferred.lock().as_mut() {
            d.push((start, end, prot));
            return;
        }
        if prot == Prot::NONE {
            return self.remove(start, end);
        }
        let Some((s, e)) = self.range(start, end) else { return };
        let mut slots = self.slots.lock();
        // A pending writable install must not happen after this: drop it
        // (the page faults again and gets its protection then).
        for x in &mut slots[s..e] {
            *x &= !PENDING;
        }
        // Only present pages change; absent ones fault and get their prot then.
        let mut i = s;
        while i < e {
            if slots[i] & PRESENT == 0 {
                i += 1;
                continue;
            }
            let run = slots[i..e].iter().take_while(|&&x| x & PRESENT != 0).count();
            let host = self.base + i as u64 * PS;
            let len = run as u64 * PS;
            let r = match &self.uffd {
                Some(u) => u.write_protect(host, len, true),
                // SAFETY: reducing access to present pages of our own view.
                None => check(unsafe { libc::mprotect(host as *mut libc::c_void, len as usize, host_prot(prot)) }),
            };
            if let Err(err) = r {
                self.stats.map_errors.fetch_add(1, Ordering::Relaxed);
                crate::limited!(
                    crate::ratelimit::HOST_MAP,
                    "cannot write-protect guest {:#x}+{len:#x}: {err}",
                    i as u64 * PS
                );
            }
            i += run;
        }
    }

    fn extract(&self, addr: u64) -> Option<Frame> {
        let s = *self.slots.lock().get((addr / PS) as usize)?;
        slot_frame(s).filter(|_| s & (PRESENT | PENDING) != 0)
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // SAFETY: unmapping our own view; nothing references it any more.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size as usize) };
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn view(size: u64) -> View {
        // SAFETY: a memfd for the test, closed with the process.
        let fd = unsafe { libc::memfd_create(c"pmap-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: sizing our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd, 16 << 20) }, 0);
        View::new(size, fd, Delivery::Exit, None, Box::new(|_| true)).unwrap()
    }

    #[test]
    fn slots_name_frames_and_nothing_else() {
        assert_eq!(slot_frame(NO_FRAME), None);
        assert_eq!(slot_frame(slot_of(0) | PRESENT | SEEN | PENDING), Some(0));
        assert_eq!(slot_frame(slot_of(12345) | PENDING), Some(12345));
        let v = view(64 << 20);
        v.add_region(0, 1 << 20, Some(0)).unwrap();
        // A region without frames in place (a VPAGETABLE window) maps nothing,
        // before and after a remove (it used to read as a pending frame).
        v.add_region(32 << 20, 1 << 20, None).unwrap();
        assert_eq!(v.extract(32 << 20), None);
        v.remove(32 << 20, 33 << 20);
        assert_eq!(v.extract(32 << 20), None);
        assert!(!v.present(32 << 20));
        v.enter(0x3000, 3, Prot::RW, false);
        assert_eq!(v.extract(0x3000), Some(3));
        assert_eq!(v.present_count(), 1);
        v.remove(0, 1 << 20);
        assert_eq!(v.extract(0x3000), None);
    }

    #[test]
    fn a_chunk_is_relaid_once_instead_of_a_remap_per_page() {
        let v = view(64 << 20);
        v.add_region(0, 4 << 20, Some(0)).unwrap();
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        // Nothing present in the chunk: it flips to the new frames in one mmap.
        v.enter(0x5000, 1005, Prot::RW, false);
        assert_eq!((n(&v.stats.relayouts), n(&v.stats.remaps)), (1, 0));
        assert_eq!(v.extract(0x5000), Some(1005));
        // The object's next page in that chunk is in place now.
        v.enter(0x6000, 1006, Prot::RW, false);
        assert_eq!((n(&v.stats.relayouts), n(&v.stats.remaps)), (1, 0));
        // Another layout would disagree with present pages: one page remap.
        v.enter(0x7000, 7, Prot::RW, false);
        assert_eq!((n(&v.stats.relayouts), n(&v.stats.remaps)), (1, 1));
        assert_eq!([0x5000, 0x6000, 0x7000].map(|a| v.extract(a)), [Some(1005), Some(1006), Some(7)]);
        // The second chunk is untouched, and a chunk never crosses a region.
        v.enter(0x20_0000, 0x200, Prot::RW, false);
        assert_eq!((n(&v.stats.relayouts), n(&v.stats.remaps)), (1, 1));
        v.add_region(8 << 20, 8 << 12, Some(100)).unwrap();
        v.enter((8 << 20) + 0x1000, 501, Prot::RW, false);
        assert_eq!(n(&v.stats.relayouts), 2);
        assert_eq!(v.extract((8 << 20) + 0x1000), Some(501));
        // Frame numbers below zero cannot be laid out: a plain remap.
        v.enter(0x30_5000, 2, Prot::RW, false);
        assert_eq!((n(&v.stats.relayouts), n(&v.stats.remaps)), (2, 2));
        // Nor past the pool's end (its pages would fault with SIGBUS before
        // userfaultfd saw them): the test pool has 4096 frames.
        v.add_region(32 << 20, 2 << 20, Some(0)).unwrap();
        v.enter((32 << 20) + 0x1000, 4095, Prot::RW, false);
        assert_eq!((n(&v.stats.relayouts), n(&v.stats.remaps)), (2, 3));
    }

    #[test]
    fn a_failed_host_mapping_is_reported_to_the_faulting_thread() {
        // SAFETY: a memfd for the test; closed below to make mmap fail.
        let fd = unsafe { libc::memfd_create(c"pmap-fail".as_ptr(), libc::MFD_CLOEXEC) };
        // SAFETY: sizing our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd, 16 << 20) }, 0);
        let v = View::new(8 << 20, fd, Delivery::Exit, None, Box::new(|_| true)).unwrap();
        v.add_region(0, 4 << 20, Some(0)).unwrap();
        clear_map_failure();
        // SAFETY: closing our own descriptor: every later mmap of it fails.
        unsafe { libc::close(fd) };
        v.enter(0x5000, 7, Prot::RW, false);
        assert!(take_map_failure(0x6000).is_none(), "another page");
        let e = take_map_failure(0x5123).expect("the failure is kept for its page");
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        assert!(take_map_failure(0x5000).is_none(), "taken once");
        assert_eq!(v.extract(0x5000), None, "the page stays absent");
    }
}
