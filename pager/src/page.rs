//! Per-page metadata (the seed's `vm_page`), kept small: see `Page` size test.

use crate::frame::Frame;
use crate::pmap::{PmapId, Vpn};

/// Which pageout queue a page is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Queue {
    /// Recently referenced.
    Active,
    /// Candidate for pageout.
    Inactive,
    /// Clean and unmapped: freed first.
    Cache,
    /// Not on a queue (wired, fictitious).
    None,
}

/// Page flags.
pub(crate) mod pf {
    pub const BUSY: u8 = 0x1;
    pub const VALID: u8 = 0x2;
    pub const DIRTY: u8 = 0x4;
    pub const REFERENCED: u8 = 0x8;
    /// Fixed device frame: never freed or paged out.
    pub const FICTITIOUS: u8 = 0x10;
    /// Frame still a hole (never written): zero without a memset.
    pub const ZERO: u8 = 0x20;
}

/// Reverse map of one page: every (pmap, virtual page) it may be entered at.
/// May hold stale entries (removal is checked against `Pmap::extract`).
#[derive(Debug, Default)]
pub(crate) enum Rmap {
    #[default]
    Empty,
    One(u64),
    #[allow(clippy::box_collection)] // keeps the enum at 16 bytes
    Many(Box<Vec<u64>>),
}

/// Packs a (pmap id, virtual page number) into one word: 20 bits of id.
#[inline]
pub(crate) fn rmap_pack(id: PmapId, vpn: Vpn) -> u64 {
    (vpn << 20) | (id as u64 & 0xF_FFFF)
}

/// Unpacks `rmap_pack`.
#[inline]
pub(crate) fn rmap_unpack(v: u64) -> (PmapId, Vpn) {
    ((v & 0xF_FFFF) as PmapId, v >> 20)
}

impl Rmap {
    pub(crate) fn add(&mut self, v: u64) {
        match self {
            Rmap::Empty => *self = Rmap::One(v),
            Rmap::One(x) if *x == v => {}
            Rmap::One(x) => {
                let x = *x;
                *self = Rmap::Many(Box::new(vec![x, v]));
            }
            Rmap::Many(list) => {
                if !list.contains(&v) {
                    list.push(v);
                }
            }
        }
    }

    pub(crate) fn take(&mut self) -> Vec<u64> {
        match std::mem::take(self) {
            Rmap::Empty => Vec::new(),
            Rmap::One(x) => vec![x],
            Rmap::Many(list) => *list,
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let (one, many): (Option<u64>, &[u64]) = match self {
            Rmap::Empty => (None, &[]),
            Rmap::One(x) => (Some(*x), &[]),
            Rmap::Many(l) => (None, l.as_slice()),
        };
        one.into_iter().chain(many.iter().copied())
    }

    pub(crate) fn is_empty(&self) -> bool {
        matches!(self, Rmap::Empty)
    }
}

/// A resident page of an object.
#[derive(Debug)]
pub struct Page {
    pub(crate) frame: Frame,
    pub(crate) flags: u8,
    pub(crate) queue: Queue,
    pub(crate) wire_count: u16,
    pub(crate) hold_count: u16,
    pub(crate) rmap: Rmap,
}

impl Page {
    pub(crate) fn new(frame: Frame, flags: u8) -> Page {
        Page { frame, flags, queue: Queue::Inactive, wire_count: 0, hold_count: 0, rmap: Rmap::Empty }
    }
    #[inline]
    pub(crate) fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
    #[inline]
    pub(crate) fn set(&mut self, f: u8) {
        self.flags |= f;
    }
    #[inline]
    pub(crate) fn clear(&mut self, f: u8) {
        self.flags &= !f;
    }
    /// The frame holding this page's data.
    pub fn frame(&self) -> Frame {
        self.frame
    }
    /// Is the page busy (I/O or pageout in progress)?
    pub fn is_busy(&self) -> bool {
        self.has(pf::BUSY)
    }
    /// Is the page dirty (must be written before it is freed)?
    pub fn is_dirty(&self) -> bool {
        self.has(pf::DIRTY)
    }
    /// Was the page referenced since pageout last looked?
    pub fn is_referenced(&self) -> bool {
        self.has(pf::REFERENCED)
    }
    /// Wire count.
    pub fn wire_count(&self) -> u16 {
        self.wire_count
    }
    /// Hold count.
    pub fn hold_count(&self) -> u16 {
        self.hold_count
    }
    /// Queue.
    pub fn queue(&self) -> Queue {
        self.queue
    }
    /// Can pageout take this page now?
    pub(crate) fn pageable(&self) -> bool {
        !self.has(pf::BUSY | pf::FICTITIOUS) && self.wire_count == 0 && self.hold_count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_metadata_fits_64_bytes() {
        // Page + hash map key, with hashbrown's control byte and 7/8 load.
        let per = (std::mem::size_of::<(u64, Page)>() + 1) * 8 / 7;
        assert!(per <= 64, "{per} bytes per resident page");
        assert_eq!(std::mem::size_of::<Rmap>(), 16);
    }

    #[test]
    fn rmap_pack_roundtrip() {
        let v = rmap_pack(7, 0x7_FFFF_FFFF);
        assert_eq!(rmap_unpack(v), (7, 0x7_FFFF_FFFF));
        let mut r = Rmap::default();
        r.add(1);
        r.add(1);
        r.add(2);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(r.take(), vec![1, 2]);
        assert!(r.is_empty());
    }
}

/// A fast hasher for page indexes and virtual page numbers (SipHash costs
/// tens of ns per resident-page lookup; keys here are not attacker-chosen
/// hash-flooding material beyond what a multiply-shift spreads well).
#[derive(Default, Clone, Copy)]
pub(crate) struct IndexHasher(u64);

impl std::hash::Hasher for IndexHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        // Fibonacci hashing; hashbrown uses the top 7 bits as the tag, so
        // fold the high half down as well.
        let h = (self.0 ^ i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = h ^ (h >> 29);
    }
}

/// `BuildHasher` for `IndexHasher`.
pub(crate) type IndexBuild = std::hash::BuildHasherDefault<IndexHasher>;
/// A map keyed by page index.
pub(crate) type IndexMap<V> = std::collections::HashMap<u64, V, IndexBuild>;
