//! QEMU's fw_cfg, legacy I/O interface only (no DMA): a 16-bit write of a
//! key to 0x510 selects an item, byte reads from 0x511 return it from the
//! start. The items are the ones kvm-unit-tests' lib/x86/fwcfg.c and our
//! guest read: signature, ID, RAM size, CPU counts and an empty file
//! directory. Unknown keys and reads past an item's end return 0, as QEMU's.

use std::sync::Mutex;

pub const SELECTOR_PORT: u16 = 0x510;
pub const DATA_PORT: u16 = 0x511;

pub const KEY_SIGNATURE: u16 = 0x0000;
pub const KEY_ID: u16 = 0x0001;
pub const KEY_RAM_SIZE: u16 = 0x0003;
pub const KEY_NB_CPUS: u16 = 0x0005;
pub const KEY_MAX_CPUS: u16 = 0x000f;
pub const KEY_FILE_DIR: u16 = 0x0019;
/// ID bit 0: the traditional (I/O port) interface; bit 1 (DMA) stays clear.
const ID_TRADITIONAL: u32 = 1;

pub struct FwCfg {
    nr_cpus: u32,
    ram_size: u64,
    /// Selected item and the read offset into it.
    cur: Mutex<(Vec<u8>, usize)>,
}

impl FwCfg {
    pub fn new(nr_cpus: u32, ram_size: u64) -> Self {
        FwCfg { nr_cpus, ram_size, cur: Mutex::new((Vec::new(), 0)) }
    }

    /// The bytes of item `key` (empty for unknown keys).
    fn item(&self, key: u16) -> Vec<u8> {
        match key {
            KEY_SIGNATURE => b"QEMU".to_vec(),
            KEY_ID => ID_TRADITIONAL.to_le_bytes().to_vec(),
            KEY_RAM_SIZE => self.ram_size.to_le_bytes().to_vec(),
            KEY_NB_CPUS | KEY_MAX_CPUS => (self.nr_cpus.min(u16::MAX as u32) as u16).to_le_bytes().to_vec(),
            // A directory with no files: a big-endian count of 0.
            KEY_FILE_DIR => 0u32.to_be_bytes().to_vec(),
            _ => Vec::new(),
        }
    }

    pub fn select(&self, key: u16) {
        let item = self.item(key);
        *self.cur.lock().unwrap_or_else(|e| e.into_inner()) = (item, 0);
    }

    pub fn read_byte(&self) -> u8 {
        let mut g = self.cur.lock().unwrap_or_else(|e| e.into_inner());
        let (item, off) = &mut *g;
        let b = item.get(*off).copied().unwrap_or(0);
        *off = off.saturating_add(1);
        b
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn read(f: &FwCfg, key: u16, n: usize) -> Vec<u8> {
        f.select(key);
        (0..n).map(|_| f.read_byte()).collect()
    }

    #[test]
    fn items_read_as_qemu_gives_them() {
        let f = FwCfg::new(2, 256 << 20);
        assert_eq!(read(&f, KEY_SIGNATURE, 4), b"QEMU");
        assert_eq!(read(&f, KEY_ID, 4), [1, 0, 0, 0]);
        assert_eq!(read(&f, KEY_NB_CPUS, 2), [2, 0]);
        assert_eq!(read(&f, KEY_MAX_CPUS, 2), [2, 0]);
        assert_eq!(read(&f, KEY_RAM_SIZE, 8), (256u64 << 20).to_le_bytes());
        assert_eq!(read(&f, KEY_FILE_DIR, 4), [0; 4]);
        assert_eq!(read(&f, 0x1234, 3), [0; 3]);
        // Past the end of an item: zeros; selecting again restarts it.
        assert_eq!(read(&f, KEY_SIGNATURE, 6), b"QEMU\0\0");
    }
}
