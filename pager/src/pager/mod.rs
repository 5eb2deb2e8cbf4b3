//! Pagers: where an object's pages come from and go to (`vm_pager`).

pub(crate) mod device;
pub(crate) mod file;
pub(crate) mod mem;
pub(crate) mod swap;

use crate::frame::{Frame, FramePool};
use std::sync::atomic::{AtomicU8, Ordering};

/// Pager results other than success (`VM_PAGER_ERROR/BAD/FAIL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PagerError {
    /// I/O error: the fault fails.
    #[error("pager I/O error")]
    Error,
    /// The page is outside what the pager can ever provide: protection failure.
    #[error("pager: bad page")]
    Bad,
    /// The pager does not have the page: try the next object.
    #[error("pager: page not found")]
    Fail,
    /// No space left for the page (swap full, ENOSPC).
    #[error("pager: no space")]
    NoSpace,
}

/// One page of a pager request.
#[derive(Debug, Clone, Copy)]
pub struct PageIo {
    /// Page index in the object.
    pub pindex: u64,
    /// Frame to read into / write from.
    pub frame: Frame,
    /// Set by the pager when this page was transferred.
    pub done: bool,
}

/// A pager backend (`vm_pager_ops`). Objects are named by id.
pub trait Pager: Send + Sync {
    /// Does the pager have `pindex`? If so, how many pages behind and ahead
    /// can be read in the same operation (`vm_pager_has_page`).
    fn has_page(&self, obj: u64, pindex: u64) -> Option<(u32, u32)>;
    /// Reads `pages` (consecutive pindexes); must fill `pages[reqpage]` or
    /// return an error. Extra pages are optional (`done` says which)
    /// (`vm_pager_get_pages`).
    fn get_pages(&self, obj: u64, pool: &FramePool, pages: &mut [PageIo], reqpage: usize) -> Result<(), PagerError>;
    /// Writes `pages`; `done` marks those written (`vm_pager_put_pages`).
    fn put_pages(&self, obj: u64, pool: &FramePool, pages: &mut [PageIo]) -> Result<(), PagerError>;
    /// The page was dirtied or moved away: its backing copy is stale
    /// (`vm_pager_page_unswapped`, `swap_pager_unswapped`).
    fn page_unswapped(&self, _obj: u64, _pindex: u64) {}
    /// The object died: release everything it holds.
    fn object_dead(&self, _obj: u64) {}
    /// Device pagers hand out fixed frames instead of filling new ones.
    fn fixed_frame(&self, _obj: u64, _pindex: u64) -> Option<Frame> {
        None
    }
    /// Collapse: move `from`'s blocks into `to` (pindex - `offset`, below
    /// `to_size`) unless `to_has(new_pindex)`; free the rest.
    fn collapse_into(&self, _from: u64, _to: u64, _offset: u64, _to_size: u64, _to_has: &dyn Fn(u64) -> bool) {}
}

/// What an injected failure does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FailMode {
    /// No failure.
    None = 0,
    /// The call fails with EIO.
    Eio = 1,
    /// A read returns fewer bytes than asked (detected as an error).
    ShortRead = 2,
    /// A write finds no space (ENOSPC).
    NoSpace = 3,
}

/// Failure injection shared by a test and the pagers it wraps.
#[derive(Debug, Default)]
pub struct FailHook {
    read: AtomicU8,
    write: AtomicU8,
}

impl FailHook {
    /// A hook injecting nothing yet.
    pub fn new() -> std::sync::Arc<FailHook> {
        std::sync::Arc::new(FailHook::default())
    }
    /// Sets the failure applied to reads.
    pub fn set_read(&self, m: FailMode) {
        self.read.store(m as u8, Ordering::SeqCst);
    }
    /// Sets the failure applied to writes.
    pub fn set_write(&self, m: FailMode) {
        self.write.store(m as u8, Ordering::SeqCst);
    }
    fn get(v: &AtomicU8) -> FailMode {
        match v.load(Ordering::SeqCst) {
            1 => FailMode::Eio,
            2 => FailMode::ShortRead,
            3 => FailMode::NoSpace,
            _ => FailMode::None,
        }
    }
    /// The read failure in force.
    pub fn read_mode(&self) -> FailMode {
        Self::get(&self.read)
    }
    /// The write failure in force.
    pub fn write_mode(&self) -> FailMode {
        Self::get(&self.write)
    }
}

/// Reads `len` bytes at `off` of `fd` into a frame; a short read is an error
/// (the caller handles EOF by asking for fewer bytes).
pub(crate) fn pread_frame(
    fd: i32,
    pool: &FramePool,
    frame: Frame,
    off: u64,
    len: usize,
    hook: Option<&FailHook>,
) -> Result<(), PagerError> {
    let p = pool.frame_ptr(frame);
    if p.is_null() || len > crate::frame::PAGE_SIZE {
        return Err(PagerError::Error);
    }
    let mode = hook.map(|h| h.read_mode()).unwrap_or(FailMode::None);
    if mode == FailMode::Eio {
        return Err(PagerError::Error);
    }
    let want = if mode == FailMode::ShortRead { len / 2 } else { len };
    let mut done = 0usize;
    while done < want {
        // SAFETY: p..p+len is inside the frame, which the caller owns (busy).
        let r = unsafe {
            libc::pread(fd, p.add(done) as *mut libc::c_void, want - done, (off + done as u64) as libc::off_t)
        };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(PagerError::Error);
        }
        if r == 0 {
            break;
        }
        done += r as usize;
    }
    if done < len {
        // Never leave partial data behind: the frame is freed by the caller,
        // but wipe what we read so no stale bytes are visible.
        // SAFETY: as above.
        unsafe { std::ptr::write_bytes(p, 0, crate::frame::PAGE_SIZE) };
        return Err(PagerError::Error);
    }
    Ok(())
}

/// Writes `len` bytes of a frame at `off` of `fd`.
pub(crate) fn pwrite_frame(
    fd: i32,
    pool: &FramePool,
    frame: Frame,
    off: u64,
    len: usize,
    hook: Option<&FailHook>,
) -> Result<(), PagerError> {
    let p = pool.frame_ptr(frame);
    if p.is_null() || len > crate::frame::PAGE_SIZE {
        return Err(PagerError::Error);
    }
    match hook.map(|h| h.write_mode()).unwrap_or(FailMode::None) {
        FailMode::Eio | FailMode::ShortRead => return Err(PagerError::Error),
        FailMode::NoSpace => return Err(PagerError::NoSpace),
        FailMode::None => {}
    }
    let mut done = 0usize;
    while done < len {
        // SAFETY: reading our own frame.
        let r = unsafe {
            libc::pwrite(fd, p.add(done) as *const libc::c_void, len - done, (off + done as u64) as libc::off_t)
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(if e.raw_os_error() == Some(libc::ENOSPC) { PagerError::NoSpace } else { PagerError::Error });
        }
        if r == 0 {
            return Err(PagerError::Error);
        }
        done += r as usize;
    }
    Ok(())
}
