//! Virtual page table entry layout (DragonFly 64-bit vpte, 2013-2020 layout).
//!
//! Only `core` is used: the guest `#[path]`-includes this file.
#![allow(dead_code)]

/// A virtual page table entry.
pub type Vpte = u64;

/// Valid.
pub const VPTE_V: Vpte = 0x1;
/// Writable.
pub const VPTE_RW: Vpte = 0x2;
/// User (ignored by the host).
pub const VPTE_U: Vpte = 0x4;
/// Accessed: set by the host on a successful fault through the entry.
pub const VPTE_A: Vpte = 0x20;
/// Modified: set by the host on a successful write fault through the entry.
pub const VPTE_M: Vpte = 0x40;
/// Large page: ends the walk at this level; remaining index bits are added.
pub const VPTE_PS: Vpte = 0x80;
/// No execute (bit 11, not 63).
pub const VPTE_NX: Vpte = 0x800;
/// Frame bits 12..=51: page index in the backing object, shifted by 12.
pub const VPTE_FRAME: Vpte = 0x000F_FFFF_FFFF_F000;
/// Index bits consumed per table level.
pub const VPTE_PAGE_BITS: u32 = 9;
/// Mask of one level's index.
pub const VPTE_PAGE_MASK: u64 = (1 << VPTE_PAGE_BITS) - 1;
/// Entries in one table page.
pub const VPTE_PAGE_ENTRIES: usize = 512;
/// Most table levels below the master entry.
pub const VPTE_MAX_LEVELS: u32 = 4;

/// The object page index a vpte points at.
#[inline]
pub const fn vpte_pindex(v: Vpte) -> u64 {
    (v & VPTE_FRAME) >> 12
}

/// Builds a vpte pointing at object page `pindex` with `flags`.
#[inline]
pub const fn vpte_make(pindex: u64, flags: Vpte) -> Vpte {
    ((pindex << 12) & VPTE_FRAME) | (flags & !VPTE_FRAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vpte_layout() {
        assert_eq!(vpte_make(0x12345, VPTE_V | VPTE_RW), 0x12345003);
        assert_eq!(vpte_pindex(vpte_make(0xF_FFFF_FFFF, VPTE_PS)), 0xF_FFFF_FFFF);
        assert_eq!(VPTE_NX, 1 << 11);
        assert_eq!(VPTE_FRAME & VPTE_NX, 0);
    }
}
