//! An in-memory pager for tests and tools: pages are byte vectors, the
//! behind/ahead it reports and its failures are configurable, calls recorded.

use super::{PageIo, Pager, PagerError};
use crate::frame::{FramePool, PAGE_SIZE};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// A recorded `get_pages` call: first pindex, page count, reqpage.
pub type GetCall = (u64, usize, usize);

/// In-memory pager.
#[derive(Default)]
pub struct MemPager {
    /// Stored pages.
    pub pages: Mutex<HashMap<u64, Vec<u8>>>,
    /// Max (behind, ahead) reported by `has_page`.
    pub limit: Mutex<(u32, u32)>,
    /// Forced result of the next `get_pages` calls.
    pub fail: Mutex<Option<PagerError>>,
    /// Recorded calls.
    pub calls: Mutex<Vec<GetCall>>,
    /// Called (without locks) at the start of every `get_pages`.
    #[allow(clippy::type_complexity)]
    pub on_get: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
    /// Called (without object locks) at the start of every `put_pages`.
    #[allow(clippy::type_complexity)]
    pub on_put: Mutex<Option<Arc<dyn Fn(&[PageIo]) + Send + Sync>>>,
}

impl MemPager {
    /// A pager reporting at most `behind`/`ahead` around a page.
    pub fn new(behind: u32, ahead: u32) -> MemPager {
        let p = MemPager::default();
        *p.limit.lock() = (behind, ahead);
        p
    }
    /// Stores a page filled with `byte`.
    pub fn put(&self, pindex: u64, byte: u8) {
        self.pages.lock().insert(pindex, vec![byte; PAGE_SIZE]);
    }
}

impl Pager for MemPager {
    fn has_page(&self, _obj: u64, pindex: u64) -> Option<(u32, u32)> {
        let pages = self.pages.lock();
        pages.get(&pindex)?;
        let (lb, la) = *self.limit.lock();
        let mut b = 0;
        while b < lb && pindex > b as u64 && pages.contains_key(&(pindex - b as u64 - 1)) {
            b += 1;
        }
        let mut a = 0;
        while a < la && pages.contains_key(&(pindex + a as u64 + 1)) {
            a += 1;
        }
        Some((b, a))
    }
    fn get_pages(&self, _obj: u64, pool: &FramePool, pages: &mut [PageIo], reqpage: usize) -> Result<(), PagerError> {
        // Called without holding our lock, so concurrent calls overlap.
        let hook = self.on_get.lock().clone();
        if let Some(f) = hook {
            f();
        }
        self.calls.lock().push((pages.first().map_or(0, |p| p.pindex), pages.len(), reqpage));
        if let Some(e) = *self.fail.lock() {
            return Err(e);
        }
        let store = self.pages.lock();
        for (i, p) in pages.iter_mut().enumerate() {
            match store.get(&p.pindex) {
                Some(d) => {
                    pool.write(p.frame, 0, d).map_err(|_| PagerError::Error)?;
                    p.done = true;
                }
                None if i == reqpage => return Err(PagerError::Fail),
                None => {}
            }
        }
        Ok(())
    }
    fn put_pages(&self, _obj: u64, pool: &FramePool, pages: &mut [PageIo]) -> Result<(), PagerError> {
        let hook = self.on_put.lock().clone();
        if let Some(f) = hook {
            f(pages);
        }
        let mut store = self.pages.lock();
        for p in pages.iter_mut() {
            let mut buf = vec![0u8; PAGE_SIZE];
            pool.read(p.frame, 0, &mut buf).map_err(|_| PagerError::Error)?;
            store.insert(p.pindex, buf);
            p.done = true;
        }
        Ok(())
    }
}
