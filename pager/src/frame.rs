//! The frame pool: every page of guest data lives in one sparse memfd.
//!
//! Frame `f` is the 4 KiB at `f * 4096` in the memfd. The VMM maps frames into
//! guest views with `MAP_SHARED|MAP_FIXED` of `fd()`. Freeing a frame punches a
//! hole, which also unmaps it from every host mapping and leaves it reading as
//! zero, so a fresh frame never needs a memset.

use parking_lot::{Condvar, Mutex};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Index of a 4 KiB frame in the pool's memfd.
pub type Frame = u64;

/// Page size.
pub const PAGE_SIZE: usize = 4096;

/// Frame pool errors.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A host call failed.
    #[error("frame pool: {0}: {1}")]
    Host(&'static str, std::io::Error),
    /// Frame or offset outside the pool or the page.
    #[error("frame pool: frame {0} offset {1} len {2} out of range")]
    OutOfRange(Frame, usize, usize),
}

struct AllocState {
    /// One bit per frame: in use.
    used: Vec<u64>,
    /// Object ranges are bumped upward from 0.
    next_range: u64,
    /// General frames are bumped downward from the top.
    general_low: u64,
    general_free: Vec<Frame>,
    free_ranges: Vec<(u64, u64)>,
}

impl AllocState {
    fn is_used(&self, f: Frame) -> bool {
        self.used[(f / 64) as usize] & (1 << (f % 64)) != 0
    }
    fn mark(&mut self, f: Frame, on: bool) {
        let w = &mut self.used[(f / 64) as usize];
        if on {
            *w |= 1 << (f % 64);
        } else {
            *w &= !(1 << (f % 64));
        }
    }
}

/// One pager instance's store of frames, with a resident budget.
pub struct FramePool {
    fd: OwnedFd,
    base: *mut u8,
    nframes: u64,
    state: Mutex<AllocState>,
    freed: Condvar,
    resident: AtomicU64,
    max_resident: AtomicU64,
}

// SAFETY: the mapping lives as long as the pool; concurrent access to a frame's
// bytes is serialised by the VM layer (busy/held pages), as with physical memory.
unsafe impl Send for FramePool {}
unsafe impl Sync for FramePool {}

impl FramePool {
    /// Creates a pool of `store_bytes` virtual (sparse) bytes, at most
    /// `max_resident` frames allocated at once.
    pub(crate) fn new(store_bytes: u64, max_resident: u64) -> Result<FramePool, PoolError> {
        let nframes = (store_bytes / PAGE_SIZE as u64).max(64);
        let size = nframes * PAGE_SIZE as u64;
        // SAFETY: plain syscalls with valid arguments; results checked.
        let raw = unsafe { libc::memfd_create(c"vkvm-frames".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(PoolError::Host("memfd_create", std::io::Error::last_os_error()));
        }
        // SAFETY: raw is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: valid fd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
            return Err(PoolError::Host("ftruncate", std::io::Error::last_os_error()));
        }
        // SAFETY: mapping a file we own; checked for MAP_FAILED.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(PoolError::Host("mmap", std::io::Error::last_os_error()));
        }
        Ok(FramePool {
            fd,
            base: base as *mut u8,
            nframes,
            state: Mutex::new(AllocState {
                used: vec![0; nframes.div_ceil(64) as usize],
                next_range: 0,
                general_low: nframes,
                general_free: Vec::new(),
                free_ranges: Vec::new(),
            }),
            freed: Condvar::new(),
            resident: AtomicU64::new(0),
            max_resident: AtomicU64::new(max_resident),
        })
    }

    /// The memfd, for `mmap(MAP_SHARED|MAP_FIXED, fd, frame * 4096)`.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Frames in the store.
    pub fn nframes(&self) -> u64 {
        self.nframes
    }

    /// Frames allocated now (device frames excluded).
    pub fn resident(&self) -> u64 {
        self.resident.load(Ordering::Relaxed)
    }

    /// The resident budget.
    pub fn max_resident(&self) -> u64 {
        self.max_resident.load(Ordering::Relaxed)
    }

    /// Changes the resident budget.
    pub fn set_max_resident(&self, n: u64) {
        self.max_resident.store(n, Ordering::Relaxed);
    }

    /// Frames that may still be allocated under the budget.
    pub fn free_count(&self) -> u64 {
        self.max_resident().saturating_sub(self.resident())
    }

    /// Reserves a contiguous run of `n` frame numbers for an object's preferred
    /// frames. Costs nothing until frames are allocated.
    pub(crate) fn reserve_range(&self, n: u64) -> Option<u64> {
        if n == 0 || n > self.nframes / 4 {
            return None;
        }
        let mut st = self.state.lock();
        if let Some(i) = st.free_ranges.iter().position(|&(_, len)| len >= n) {
            let (b, len) = st.free_ranges[i];
            if len == n {
                st.free_ranges.swap_remove(i);
            } else {
                st.free_ranges[i] = (b + n, len - n);
            }
            return Some(b);
        }
        // Keep a quarter of the store for general frames.
        if st.next_range + n > st.general_low.min(self.nframes - self.nframes / 4) {
            return None;
        }
        let b = st.next_range;
        st.next_range += n;
        Some(b)
    }

    /// Returns an object's preferred range (frames still in use stay in use).
    pub(crate) fn release_range(&self, base: u64, n: u64) {
        self.state.lock().free_ranges.push((base, n));
    }

    /// Allocates a frame, `pref` if it is free. `None` when over budget or full.
    pub(crate) fn alloc(&self, pref: Option<Frame>) -> Option<Frame> {
        let max = self.max_resident();
        let mut st = self.state.lock();
        if self.resident.load(Ordering::Relaxed) >= max {
            return None;
        }
        let f = self.alloc_locked(&mut st, pref)?;
        self.resident.fetch_add(1, Ordering::Relaxed);
        Some(f)
    }

    /// Allocates a frame outside the budget (device memory).
    pub(crate) fn alloc_unbudgeted(&self) -> Option<Frame> {
        let mut st = self.state.lock();
        self.alloc_locked(&mut st, None)
    }

    fn alloc_locked(&self, st: &mut AllocState, pref: Option<Frame>) -> Option<Frame> {
        if let Some(p) = pref {
            if p < self.nframes && !st.is_used(p) {
                st.mark(p, true);
                return Some(p);
            }
        }
        while let Some(f) = st.general_free.pop() {
            if !st.is_used(f) {
                st.mark(f, true);
                return Some(f);
            }
        }
        while st.general_low > st.next_range + 1 {
            st.general_low -= 1;
            let f = st.general_low;
            if !st.is_used(f) {
                st.mark(f, true);
                return Some(f);
            }
        }
        None
    }

    /// Frees a frame. `touched` = it may hold data (else it is still a hole).
    pub(crate) fn free(&self, frame: Frame, touched: bool) {
        self.free_inner(frame, touched, true);
    }

    /// Frees many frames, punching contiguous runs with one `fallocate` each
    /// (pageout frees object pages, which preferred frames keep contiguous).
    pub(crate) fn free_many(&self, frames: &mut [(Frame, bool)]) {
        frames.sort_unstable_by_key(|f| f.0);
        let mut i = 0;
        while i < frames.len() {
            if !frames[i].1 {
                i += 1;
                continue;
            }
            let start = frames[i].0;
            let mut j = i + 1;
            while j < frames.len() && frames[j].1 && frames[j].0 == start + (j - i) as u64 {
                j += 1;
            }
            self.punch_run(start, (j - i) as u64);
            i = j;
        }
        let mut st = self.state.lock();
        for &(f, _) in frames.iter() {
            if f >= self.nframes || !st.is_used(f) {
                continue;
            }
            st.mark(f, false);
            if f >= st.general_low {
                st.general_free.push(f);
            }
            self.resident.fetch_sub(1, Ordering::Relaxed);
        }
        drop(st);
        self.freed.notify_all();
    }

    /// Frees a device frame allocated with `alloc_unbudgeted`.
    pub(crate) fn free_unbudgeted(&self, frame: Frame) {
        self.free_inner(frame, true, false);
    }

    fn free_inner(&self, frame: Frame, touched: bool, budgeted: bool) {
        if frame >= self.nframes {
            return;
        }
        if touched {
            self.punch(frame);
        }
        let mut st = self.state.lock();
        if !st.is_used(frame) {
            return;
        }
        st.mark(frame, false);
        if frame >= st.general_low {
            st.general_free.push(frame);
        }
        if budgeted {
            self.resident.fetch_sub(1, Ordering::Relaxed);
        }
        drop(st);
        self.freed.notify_all();
    }

    fn punch(&self, frame: Frame) {
        self.punch_run(frame, 1);
    }

    fn punch_run(&self, frame: Frame, n: u64) {
        if frame >= self.nframes || n > self.nframes - frame {
            return;
        }
        // SAFETY: valid fd; range inside the file.
        let r = unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (frame * PAGE_SIZE as u64) as libc::off_t,
                (n * PAGE_SIZE as u64) as libc::off_t,
            )
        };
        if r != 0 {
            // Cannot punch (should not happen on memfd): zero instead so a
            // later zero-fill still reads zeros.
            // SAFETY: the run is inside the mapping (checked above).
            unsafe { std::ptr::write_bytes(self.ptr(frame), 0, PAGE_SIZE * n as usize) };
        }
    }

    /// Waits up to `timeout` for a frame to be freed.
    pub(crate) fn wait_free(&self, timeout: Duration) {
        let mut st = self.state.lock();
        if self.resident() < self.max_resident() {
            return;
        }
        let _ = self.freed.wait_for(&mut st, timeout);
    }

    #[inline]
    fn ptr(&self, frame: Frame) -> *mut u8 {
        // SAFETY: callers check frame < nframes.
        unsafe { self.base.add(frame as usize * PAGE_SIZE) }
    }

    /// Host address of a frame (null if out of range).
    pub fn frame_ptr(&self, frame: Frame) -> *mut u8 {
        if frame >= self.nframes {
            return std::ptr::null_mut();
        }
        self.ptr(frame)
    }

    fn check(&self, frame: Frame, off: usize, len: usize) -> Result<(), PoolError> {
        if frame >= self.nframes || off > PAGE_SIZE || len > PAGE_SIZE - off {
            return Err(PoolError::OutOfRange(frame, off, len));
        }
        Ok(())
    }

    /// Copies bytes out of a frame.
    pub fn read(&self, frame: Frame, off: usize, buf: &mut [u8]) -> Result<(), PoolError> {
        self.check(frame, off, buf.len())?;
        // SAFETY: bounds checked above.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr(frame).add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies bytes into a frame.
    pub fn write(&self, frame: Frame, off: usize, buf: &[u8]) -> Result<(), PoolError> {
        self.check(frame, off, buf.len())?;
        // SAFETY: bounds checked above.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.ptr(frame).add(off), buf.len()) };
        Ok(())
    }

    /// Zeroes a frame.
    pub fn zero(&self, frame: Frame) -> Result<(), PoolError> {
        self.check(frame, 0, PAGE_SIZE)?;
        // SAFETY: bounds checked above.
        unsafe { std::ptr::write_bytes(self.ptr(frame), 0, PAGE_SIZE) };
        Ok(())
    }

    /// Copies a whole frame.
    pub fn copy(&self, src: Frame, dst: Frame) -> Result<(), PoolError> {
        self.check(src, 0, PAGE_SIZE)?;
        self.check(dst, 0, PAGE_SIZE)?;
        if src == dst {
            return Ok(());
        }
        // The destination is usually a fresh hole: filling it with pwrite()
        // allocates the page inside the syscall instead of taking a host page
        // fault on first touch (expensive under nested virtualisation).
        // SAFETY: the source range is inside our mapping; the fd is ours.
        let r = unsafe {
            libc::pwrite(
                self.fd.as_raw_fd(),
                self.ptr(src) as *const libc::c_void,
                PAGE_SIZE,
                (dst * PAGE_SIZE as u64) as libc::off_t,
            )
        };
        if r != PAGE_SIZE as isize {
            // SAFETY: bounds checked, distinct frames do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(self.ptr(src), self.ptr(dst), PAGE_SIZE) };
        }
        Ok(())
    }

    /// The 8-byte word at `offset` of a frame, for compare-and-swap of vptes.
    pub fn atomic_u64(&self, frame: Frame, offset: usize) -> Result<&AtomicU64, PoolError> {
        self.check(frame, offset, 8)?;
        if !offset.is_multiple_of(8) {
            return Err(PoolError::OutOfRange(frame, offset, 8));
        }
        // SAFETY: in range, aligned, and the mapping outlives &self.
        Ok(unsafe { &*(self.ptr(frame).add(offset) as *const AtomicU64) })
    }
}

impl Drop for FramePool {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.nframes as usize * PAGE_SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_preferred_frames_and_holes() {
        let p = FramePool::new(1 << 26, 4).unwrap();
        let base = p.reserve_range(8).unwrap();
        let f = p.alloc(Some(base + 3)).unwrap();
        assert_eq!(f, base + 3);
        // Taken: another request for it gets a general frame.
        let g = p.alloc(Some(base + 3)).unwrap();
        assert_ne!(g, f);
        p.write(f, 100, &[7; 8]).unwrap();
        let _ = p.alloc(None).unwrap();
        let _ = p.alloc(None).unwrap();
        assert!(p.alloc(None).is_none(), "budget of 4 enforced");
        p.free(f, true);
        assert_eq!(p.resident(), 3);
        let f2 = p.alloc(Some(base + 3)).unwrap();
        assert_eq!(f2, f);
        let mut b = [1u8; 8];
        p.read(f2, 100, &mut b).unwrap();
        assert_eq!(b, [0; 8], "a freed frame is a hole: zero");
    }

    #[test]
    fn bounds_are_errors_not_panics() {
        let p = FramePool::new(1 << 22, 16).unwrap();
        let mut b = [0u8; 16];
        assert!(p.read(p.nframes(), 0, &mut b).is_err());
        assert!(p.read(0, 4090, &mut b).is_err());
        assert!(p.write(0, usize::MAX, &b).is_err());
        assert!(p.atomic_u64(0, 4092).is_err());
        assert!(p.atomic_u64(0, 4).is_err());
        assert!(p.atomic_u64(0, 4088).is_ok());
        assert!(p.copy(0, p.nframes()).is_err());
        assert!(p.frame_ptr(p.nframes()).is_null());
        p.free(p.nframes() + 5, true);
    }

    #[test]
    fn free_many_punches_runs() {
        let p = FramePool::new(1 << 26, 64).unwrap();
        let base = p.reserve_range(16).unwrap();
        let mut v = Vec::new();
        for i in 0..16 {
            let f = p.alloc(Some(base + i)).unwrap();
            p.write(f, 0, &[9; 16]).unwrap();
            v.push((f, true));
        }
        p.free_many(&mut v);
        assert_eq!(p.resident(), 0);
        let f = p.alloc(Some(base + 5)).unwrap();
        let mut b = [1u8; 16];
        p.read(f, 0, &mut b).unwrap();
        assert_eq!(b, [0; 16]);
    }
}
