//! The boot information the loader left for us (read in ring 3): PVH's
//! `hvm_start_info` or the Multiboot v1 information structure. The command
//! line is copied into the image, because the loader may have put it where
//! the tests later write (QEMU puts its Multiboot data after the kernel).

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
    /// Multiboot modules (0 for PVH).
    pub modules: u32,
}

const CMDLINE_MAX: usize = 4096;
static mut CMDLINE: [u8; CMDLINE_MAX] = [0; CMDLINE_MAX];

/// Copy the NUL-terminated string at `addr` (at most 4 KiB) into the image.
///
/// # Safety
/// `addr` must be identity-mapped memory; called once, by the BSP.
unsafe fn copy_cmdline(addr: u64) -> &'static [u8] {
    if addr == 0 || addr >= 1 << 32 {
        return &[];
    }
    let p = addr as *const u8;
    let dst = (&raw mut CMDLINE) as *mut u8;
    let mut n = 0;
    // SAFETY: the caller's contract; n stays within the buffer, which only
    // this function writes, once.
    unsafe {
        while n < CMDLINE_MAX && *p.add(n) != 0 {
            dst.add(n).write(*p.add(n));
            n += 1;
        }
        core::slice::from_raw_parts(dst, n)
    }
}

/// A Multiboot loader (GRUB, QEMU, vkvm) starts the command line with the
/// kernel's path, as argv[0]: drop that word. A first word with a `=` is an
/// option, not a path (a loader that passes only the options).
fn without_kernel_path(c: &'static [u8]) -> &'static [u8] {
    let end = c.iter().position(|&b| b == b' ').unwrap_or(c.len());
    if c[..end].contains(&b'=') {
        return c;
    }
    let rest = &c[end..];
    let skip = rest.iter().take_while(|&&b| b == b' ').count();
    &rest[skip..]
}

/// The Multiboot v1 information structure (the fields we read).
#[repr(C)]
struct MultibootInfo {
    flags: u32,
    mem_lower: u32,
    mem_upper: u32,
    boot_device: u32,
    cmdline: u32,
    mods_count: u32,
    mods_addr: u32,
    syms: [u32; 4],
    mmap_length: u32,
    mmap_addr: u32,
}

/// Multiboot: command line (flag 2), modules (flag 3), and the RAM end from
/// the memory map (flag 6) or else from mem_upper (flag 0).
pub fn parse_multiboot(addr: u64, image_end: u64) -> BootInfo {
    let mut bi = BootInfo { cmdline: &[], ram_end: image_end, modules: 0 };
    if addr == 0 || addr >= 1 << 32 {
        return bi;
    }
    // SAFETY: the loader placed the structure in identity-mapped RAM below
    // 4 GiB; every pointer in it is range-checked before use.
    unsafe {
        let mb = &*(addr as *const MultibootInfo);
        if mb.flags & (1 << 2) != 0 {
            bi.cmdline = without_kernel_path(copy_cmdline(mb.cmdline as u64));
        }
        if mb.flags & (1 << 3) != 0 {
            bi.modules = mb.mods_count;
        }
        if mb.flags & 1 != 0 {
            bi.ram_end = (1 << 20) + ((mb.mem_upper as u64) << 10);
        }
        if mb.flags & (1 << 6) != 0 && mb.mmap_length < 64 * 1024 {
            // Entries: size (of the rest), base u64, length u64, type u32.
            let mut off = 0u64;
            while off + 24 <= mb.mmap_length as u64 {
                let e = (mb.mmap_addr as u64 + off) as *const u32;
                let size = e.read_unaligned() as u64;
                let base = (e.add(1) as *const u64).read_unaligned();
                let len = (e.add(3) as *const u64).read_unaligned();
                let kind = e.add(5).read_unaligned();
                let end = base.saturating_add(len);
                if kind == E820_RAM && base <= image_end && end >= image_end {
                    bi.ram_end = end.min(1 << 32);
                }
                off += size + 4;
            }
        }
    }
    bi
}

/// Anything that does not look like a PVH start info yields no cmdline and
/// only the RAM the image itself occupies.
pub fn parse(addr: u64, image_end: u64) -> BootInfo {
    let mut bi = BootInfo { cmdline: &[], ram_end: image_end, modules: 0 };
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
        bi.cmdline = copy_cmdline(si.cmdline_paddr);
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
