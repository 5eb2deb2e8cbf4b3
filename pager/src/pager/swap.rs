//! Swap pager: a sparse host file of 4 KiB slots, a slot bitmap and a block
//! map per object (pindex -> slot).

use super::{pread_frame, pwrite_frame, FailHook, PageIo, Pager, PagerError};
use crate::frame::{FramePool, PAGE_SIZE};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

/// Most pages read around a fault in one swap operation, each side.
const SWAP_CLUSTER: u32 = 8;

struct SwapState {
    bitmap: Vec<u64>,
    free: u64,
    hint: u64,
    blocks: HashMap<u64, HashMap<u64, u32>>,
}

/// The swap pager.
pub struct SwapPager {
    file: File,
    nslots: u64,
    st: Mutex<SwapState>,
    hook: Option<Arc<FailHook>>,
}

impl SwapPager {
    /// Creates a swap file of `bytes` at `path` (truncated, sparse). The file
    /// is unlinked at once when `unlink` is set.
    pub fn create(path: &Path, bytes: u64, unlink: bool, hook: Option<Arc<FailHook>>) -> std::io::Result<SwapPager> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        // Slots are u32 in the block maps (16 TiB of swap).
        let nslots = (bytes / PAGE_SIZE as u64).min(u32::MAX as u64);
        file.set_len(nslots * PAGE_SIZE as u64)?;
        if unlink {
            std::fs::remove_file(path)?;
        }
        Ok(SwapPager {
            file,
            nslots,
            st: Mutex::new(SwapState {
                bitmap: vec![0; nslots.div_ceil(64) as usize],
                free: nslots,
                hint: 0,
                blocks: HashMap::new(),
            }),
            hook,
        })
    }

    /// Slots in use.
    pub fn used_slots(&self) -> u64 {
        self.nslots - self.st.lock().free
    }

    /// Slots in the swap file.
    pub fn slots(&self) -> u64 {
        self.nslots
    }

    /// Free slots.
    pub fn free_slots(&self) -> u64 {
        self.st.lock().free
    }

    /// Slots held by one object.
    pub fn object_slots(&self, obj: u64) -> usize {
        self.st.lock().blocks.get(&obj).map_or(0, |m| m.len())
    }

    fn alloc_slot(st: &mut SwapState, nslots: u64) -> Option<u32> {
        if st.free == 0 {
            return None;
        }
        let words = st.bitmap.len() as u64;
        for i in 0..words {
            let w = (st.hint + i) % words;
            let bits = st.bitmap[w as usize];
            if bits != u64::MAX {
                let b = (!bits).trailing_zeros() as u64;
                let slot = w * 64 + b;
                if slot >= nslots {
                    continue;
                }
                st.bitmap[w as usize] |= 1 << b;
                st.free -= 1;
                st.hint = w;
                return Some(slot as u32);
            }
        }
        None
    }

    fn free_slot(st: &mut SwapState, slot: u32) {
        let s = slot as u64;
        let w = &mut st.bitmap[(s / 64) as usize];
        if *w & (1 << (s % 64)) != 0 {
            *w &= !(1 << (s % 64));
            st.free += 1;
        }
    }
}

impl Pager for SwapPager {
    fn has_page(&self, obj: u64, pindex: u64) -> Option<(u32, u32)> {
        let st = self.st.lock();
        let m = st.blocks.get(&obj)?;
        m.get(&pindex)?;
        let mut behind = 0;
        while behind < SWAP_CLUSTER && pindex > behind as u64 && m.contains_key(&(pindex - behind as u64 - 1)) {
            behind += 1;
        }
        let mut ahead = 0;
        while ahead < SWAP_CLUSTER && m.contains_key(&(pindex + ahead as u64 + 1)) {
            ahead += 1;
        }
        Some((behind, ahead))
    }

    fn get_pages(&self, obj: u64, pool: &FramePool, pages: &mut [PageIo], reqpage: usize) -> Result<(), PagerError> {
        let slots: Vec<Option<u32>> = {
            let st = self.st.lock();
            let m = st.blocks.get(&obj);
            pages.iter().map(|p| m.and_then(|m| m.get(&p.pindex).copied())).collect()
        };
        for (i, p) in pages.iter_mut().enumerate() {
            let Some(slot) = slots[i] else {
                if i == reqpage {
                    return Err(PagerError::Fail);
                }
                continue;
            };
            match pread_frame(
                self.file.as_raw_fd(),
                pool,
                p.frame,
                slot as u64 * PAGE_SIZE as u64,
                PAGE_SIZE,
                self.hook.as_deref(),
            ) {
                Ok(()) => p.done = true,
                Err(e) if i == reqpage => return Err(e),
                Err(_) => {}
            }
        }
        Ok(())
    }

    fn put_pages(&self, obj: u64, pool: &FramePool, pages: &mut [PageIo]) -> Result<(), PagerError> {
        let mut result = Ok(());
        for p in pages.iter_mut() {
            let (slot, fresh) = {
                let mut st = self.st.lock();
                let existing = st.blocks.get(&obj).and_then(|m| m.get(&p.pindex).copied());
                match existing {
                    Some(s) => (s, false),
                    None => match Self::alloc_slot(&mut st, self.nslots) {
                        Some(s) => (s, true),
                        None => {
                            result = Err(PagerError::NoSpace);
                            continue;
                        }
                    },
                }
            };
            match pwrite_frame(
                self.file.as_raw_fd(),
                pool,
                p.frame,
                slot as u64 * PAGE_SIZE as u64,
                PAGE_SIZE,
                self.hook.as_deref(),
            ) {
                Ok(()) => {
                    let mut st = self.st.lock();
                    let old = st.blocks.entry(obj).or_default().insert(p.pindex, slot);
                    if let Some(o) = old.filter(|&o| o != slot) {
                        Self::free_slot(&mut st, o);
                    }
                    p.done = true;
                }
                Err(e) => {
                    let mut st = self.st.lock();
                    if fresh {
                        Self::free_slot(&mut st, slot);
                    } else if let Some(m) = st.blocks.get_mut(&obj) {
                        // The old copy may be half overwritten: drop it.
                        m.remove(&p.pindex);
                        Self::free_slot(&mut st, slot);
                    }
                    result = Err(e);
                }
            }
        }
        result
    }

    fn page_unswapped(&self, obj: u64, pindex: u64) {
        let mut st = self.st.lock();
        if let Some(slot) = st.blocks.get_mut(&obj).and_then(|m| m.remove(&pindex)) {
            Self::free_slot(&mut st, slot);
        }
    }

    fn object_dead(&self, obj: u64) {
        let mut st = self.st.lock();
        if let Some(m) = st.blocks.remove(&obj) {
            for (_, slot) in m {
                Self::free_slot(&mut st, slot);
            }
        }
    }

    fn collapse_into(&self, from: u64, to: u64, offset: u64, to_size: u64, to_has: &dyn Fn(u64) -> bool) {
        let mut st = self.st.lock();
        let Some(m) = st.blocks.remove(&from) else {
            return;
        };
        for (p, slot) in m {
            let keep = p >= offset
                && p - offset < to_size
                && !to_has(p - offset)
                && !st.blocks.get(&to).is_some_and(|t| t.contains_key(&(p - offset)));
            if keep {
                st.blocks.entry(to).or_default().insert(p - offset, slot);
            } else {
                Self::free_slot(&mut st, slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_allocated_freed_and_enospc() {
        let dir = std::env::temp_dir().join(format!("vkvm-swap-test-{}", std::process::id()));
        let sp = SwapPager::create(&dir, 2 * PAGE_SIZE as u64, true, None).unwrap();
        let pool = FramePool::new(1 << 22, 16).unwrap();
        let f = pool.alloc(None).unwrap();
        pool.write(f, 0, &[5; 4096]).unwrap();
        let mut ios = [
            PageIo { pindex: 1, frame: f, done: false },
            PageIo { pindex: 2, frame: f, done: false },
            PageIo { pindex: 3, frame: f, done: false },
        ];
        assert_eq!(sp.put_pages(9, &pool, &mut ios), Err(PagerError::NoSpace));
        assert!(ios[0].done && ios[1].done && !ios[2].done);
        assert_eq!(sp.used_slots(), 2);
        assert_eq!(sp.has_page(9, 2), Some((1, 0)));
        assert_eq!(sp.has_page(9, 3), None);
        // Rewriting a page reuses its slot.
        let mut again = [PageIo { pindex: 1, frame: f, done: false }];
        sp.put_pages(9, &pool, &mut again).unwrap();
        assert_eq!(sp.used_slots(), 2);
        sp.page_unswapped(9, 1);
        assert_eq!(sp.used_slots(), 1);
        let g = pool.alloc(None).unwrap();
        let mut rd = [PageIo { pindex: 2, frame: g, done: false }];
        sp.get_pages(9, &pool, &mut rd, 0).unwrap();
        let mut b = [0u8; 8];
        pool.read(g, 0, &mut b).unwrap();
        assert_eq!(b, [5; 8]);
        let mut missing = [PageIo { pindex: 1, frame: g, done: false }];
        assert_eq!(sp.get_pages(9, &pool, &mut missing, 0), Err(PagerError::Fail));
        sp.object_dead(9);
        assert_eq!(sp.used_slots(), 0);
    }
}
