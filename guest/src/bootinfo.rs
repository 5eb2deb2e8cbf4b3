//! The PVH `hvm_start_info` the loader left for us (read in ring 3).

const HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;

#[repr(C)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    _reserved: u32,
}

#[repr(C)]
struct MemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    _reserved: u32,
}

pub struct BootInfo {
    pub cmdline: &'static [u8],
    /// End of the RAM range that contains the kernel image (bytes).
    pub ram_end: u64,
}

/// Anything that does not look like a PVH start info yields no cmdline and
/// only the RAM the image itself occupies.
pub fn parse(addr: u64, image_end: u64) -> BootInfo {
    let mut bi = BootInfo { cmdline: &[], ram_end: image_end };
    if addr == 0 {
        return bi;
    }
    // SAFETY: the loader placed the structure in identity-mapped RAM; every
    // field is checked before it is used.
    unsafe {
        let si = &*(addr as *const StartInfo);
        if si.magic != HVM_START_MAGIC {
            return bi;
        }
        if si.cmdline_paddr != 0 && si.cmdline_paddr < 1 << 32 {
            let p = si.cmdline_paddr as *const u8;
            let mut n = 0;
            while n < 4096 && *p.add(n) != 0 {
                n += 1;
            }
            bi.cmdline = core::slice::from_raw_parts(p, n);
        }
        if si.memmap_paddr != 0 && si.memmap_entries < 128 {
            let e = si.memmap_paddr as *const MemmapEntry;
            for i in 0..si.memmap_entries as usize {
                let m = &*e.add(i);
                let end = m.addr.saturating_add(m.size);
                if m.kind == E820_RAM && m.addr <= image_end && end >= image_end {
                    bi.ram_end = end.min(1 << 32);
                }
            }
        }
    }
    bi
}
