//! Device pager: fixed frames (device memory), never paged out, no clustering.

use super::{PageIo, Pager, PagerError};
use crate::frame::{Frame, FramePool};

/// A device's fixed frames, page `i` is `frames[i]`.
pub(crate) struct DevicePager {
    frames: Vec<Frame>,
}

impl DevicePager {
    /// Device memory made of `frames`.
    pub(crate) fn new(frames: Vec<Frame>) -> DevicePager {
        DevicePager { frames }
    }
}

impl Pager for DevicePager {
    fn has_page(&self, _obj: u64, pindex: u64) -> Option<(u32, u32)> {
        (pindex < self.frames.len() as u64).then_some((0, 0))
    }
    fn get_pages(
        &self,
        _obj: u64,
        _pool: &FramePool,
        _pages: &mut [PageIo],
        _reqpage: usize,
    ) -> Result<(), PagerError> {
        // Device pages are never read: `fixed_frame` supplies them.
        Err(PagerError::Bad)
    }
    fn put_pages(&self, _obj: u64, _pool: &FramePool, _pages: &mut [PageIo]) -> Result<(), PagerError> {
        Err(PagerError::Error)
    }
    fn fixed_frame(&self, _obj: u64, pindex: u64) -> Option<Frame> {
        usize::try_from(pindex).ok().and_then(|i| self.frames.get(i).copied())
    }
}
