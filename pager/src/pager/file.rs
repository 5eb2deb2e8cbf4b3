//! File pager: pages of a host file, read with one `preadv` per cluster and
//! written back with `pwrite` (shared mappings, pageout and `sync`).

use super::{pwrite_frame, FailHook, FailMode, PageIo, Pager, PagerError};
use crate::frame::{FramePool, PAGE_SIZE};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

/// Most pages the file pager reads around a fault, each side.
const FILE_CLUSTER: u32 = 15;

/// Pager over a host file.
pub(crate) struct FilePager {
    file: File,
    len: u64,
    writable: bool,
    hook: Option<Arc<FailHook>>,
}

impl FilePager {
    /// Wraps `file` (its current length is the object's extent).
    pub(crate) fn new(file: File, writable: bool, hook: Option<Arc<FailHook>>) -> std::io::Result<FilePager> {
        let len = file.metadata()?.len();
        Ok(FilePager { file, len, writable, hook })
    }
    /// File length in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }
    fn pages(&self) -> u64 {
        self.len.div_ceil(PAGE_SIZE as u64)
    }
    fn bytes_at(&self, pindex: u64) -> usize {
        let off = pindex * PAGE_SIZE as u64;
        (self.len.saturating_sub(off)).min(PAGE_SIZE as u64) as usize
    }
}

impl Pager for FilePager {
    fn has_page(&self, _obj: u64, pindex: u64) -> Option<(u32, u32)> {
        let n = self.pages();
        if pindex >= n {
            return None;
        }
        let behind = pindex.min(FILE_CLUSTER as u64) as u32;
        let ahead = (n - pindex - 1).min(FILE_CLUSTER as u64) as u32;
        Some((behind, ahead))
    }

    fn get_pages(&self, _obj: u64, pool: &FramePool, pages: &mut [PageIo], reqpage: usize) -> Result<(), PagerError> {
        let mode = self.hook.as_ref().map(|h| h.read_mode()).unwrap_or(FailMode::None);
        if mode == FailMode::Eio {
            return Err(PagerError::Error);
        }
        if pages.get(reqpage).is_none_or(|p| p.pindex >= self.pages()) {
            return Err(PagerError::Bad);
        }
        // Pages are consecutive: one vectored read for the whole cluster.
        let mut iov = Vec::with_capacity(pages.len());
        let mut want = 0usize;
        for p in pages.iter() {
            let n = self.bytes_at(p.pindex);
            let ptr = pool.frame_ptr(p.frame);
            if ptr.is_null() {
                return Err(PagerError::Error);
            }
            iov.push(libc::iovec { iov_base: ptr as *mut libc::c_void, iov_len: n });
            want += n;
        }
        let off = pages[0].pindex * PAGE_SIZE as u64;
        let limit = if mode == FailMode::ShortRead { want / 2 } else { want };
        let mut got = 0usize;
        // Read until done or EOF; short reads just loop.
        while got < limit {
            // Skip iovecs already filled.
            let mut skip = got;
            let mut v: Vec<libc::iovec> = Vec::with_capacity(iov.len());
            for io in &iov {
                if skip >= io.iov_len {
                    skip -= io.iov_len;
                    continue;
                }
                // SAFETY: stays inside the frame.
                v.push(libc::iovec {
                    iov_base: unsafe { (io.iov_base as *mut u8).add(skip) } as *mut libc::c_void,
                    iov_len: io.iov_len - skip,
                });
                skip = 0;
            }
            if mode == FailMode::ShortRead {
                // Truncate to the injected limit.
                let mut left = limit - got;
                v.retain_mut(|io| {
                    if left == 0 {
                        return false;
                    }
                    io.iov_len = io.iov_len.min(left);
                    left -= io.iov_len;
                    true
                });
            }
            // SAFETY: every iovec points inside a busy frame we own.
            let r = unsafe {
                libc::preadv(self.file.as_raw_fd(), v.as_ptr(), v.len() as i32, (off + got as u64) as libc::off_t)
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
            got += r as usize;
        }
        // Mark pages fully read; the requested one must be.
        let mut acc = 0usize;
        for (i, p) in pages.iter_mut().enumerate() {
            let n = self.bytes_at(p.pindex);
            acc += n;
            if acc <= got {
                p.done = true;
            } else {
                // Wipe a partial page so no half-read bytes survive.
                let _ = pool.zero(p.frame);
                if i == reqpage {
                    return Err(PagerError::Error);
                }
            }
        }
        Ok(())
    }

    fn put_pages(&self, _obj: u64, pool: &FramePool, pages: &mut [PageIo]) -> Result<(), PagerError> {
        if !self.writable {
            return Err(PagerError::Error);
        }
        let mut res = Ok(());
        for p in pages.iter_mut() {
            let n = self.bytes_at(p.pindex);
            if n == 0 {
                p.done = true;
                continue;
            }
            match pwrite_frame(
                self.file.as_raw_fd(),
                pool,
                p.frame,
                p.pindex * PAGE_SIZE as u64,
                n,
                self.hook.as_deref(),
            ) {
                Ok(()) => p.done = true,
                Err(e) => res = Err(e),
            }
        }
        res
    }
}
