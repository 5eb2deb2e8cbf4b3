//! Multiboot v1 (the GNU Multiboot Specification 0.6.96): find and check the
//! header in the first 8 KiB, load the kernel by its ELF program headers (or
//! by the header's address fields when flag 16 is set), place the modules
//! page-aligned after it, and write the boot information structure. The
//! kernel is entered in 32-bit protected mode with EAX = 0x2BADB002 and EBX
//! = the boot information; application processors wait for INIT/SIPI.
//!
//! Everything is checked in [`prepare`], before KVM is opened, so a bad
//! kernel gets a one-line configuration error (exit status 2).

use super::elf::{self, Class, PT_LOAD};
use crate::error::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// EAX at entry: "loaded by a Multiboot-compliant boot loader".
pub const BOOT_MAGIC: u32 = 0x2bad_b002;
/// The header must lie, 4-byte aligned, within this many bytes of the file.
const SEARCH_LEN: usize = 8192;

/// Header flags. Bits 0-15 are requirements: a loader that cannot meet one
/// must refuse the kernel. vkvm meets 0 and 1.
const F_PAGE_ALIGN: u32 = 1 << 0;
const F_MEMORY_INFO: u32 = 1 << 1;
const F_VIDEO_MODE: u32 = 1 << 2;
const F_ADDRESS: u32 = 1 << 16;
const SUPPORTED_REQUIRED: u32 = F_PAGE_ALIGN | F_MEMORY_INFO;

/// Boot information flags vkvm sets.
const MBI_MEM: u32 = 1 << 0;
const MBI_CMDLINE: u32 = 1 << 2;
const MBI_MODS: u32 = 1 << 3;
const MBI_MMAP: u32 = 1 << 6;
const MBI_LOADER_NAME: u32 = 1 << 9;

/// Where vkvm puts the boot information (low memory, below the kernels,
/// away from 0x8000 where our guest puts its AP trampoline). Everything
/// vkvm writes below 1 MiB lies in [`BOOT_RANGES`].
const MBI_ADDR: u64 = 0x6000;
const MBI_SIZE: usize = 120;
const MMAP_ADDR: u64 = 0x6100;
const LOADER_NAME_ADDR: u64 = 0x6200;
const MODS_ADDR: u64 = 0x6400;
pub const MAX_MODULES: usize = 64;
const CMDLINE_ADDR: u64 = 0x20000;
const MOD_STRINGS_ADDR: u64 = 0x21000;
const MOD_STRINGS_END: u64 = 0x30000;
const LOWMEM_END: u64 = 0x9_fc00;
const HIMEM_START: u64 = 0x10_0000;

/// Low memory a kernel segment must not overlap: what vkvm writes there,
/// and what the memory map reports as reserved. The rest of the first MiB
/// is the kernel's, as with GRUB and QEMU (a real-mode trampoline at
/// 0x8000, for one).
pub const BOOT_RANGES: [(u64, u64, &str); 3] = [
    (MBI_ADDR, 0x7000, "vkvm's Multiboot information, memory map and module list"),
    (CMDLINE_ADDR, MOD_STRINGS_END, "vkvm's command line and module strings"),
    (LOWMEM_END, HIMEM_START, "the range the memory map reserves (EBDA, VGA, BIOS)"),
];
const PAGE: u64 = 4096;

/// A module given with `--module PATH[,STRING]`.
pub struct Module {
    pub string: String,
    pub data: Vec<u8>,
}

/// One piece of the kernel to copy: `file` bytes of the image to `paddr`,
/// then zeros up to `memsz`.
#[derive(Clone, Debug)]
struct Segment {
    paddr: u64,
    offset: usize,
    filesz: usize,
    memsz: u64,
}

/// A kernel that passed every check and can be loaded.
pub struct Kernel {
    segments: Vec<Segment>,
    entry: u32,
    modules: Vec<(u64, Module)>,
}

#[cfg(test)]
impl Kernel {
    /// Where the kernel's segments and the modules go: [start, end) each.
    pub fn placed(&self) -> Vec<(u64, u64)> {
        let segs = self.segments.iter().map(|s| (s.paddr, s.paddr + s.memsz));
        segs.chain(self.modules.iter().map(|(at, m)| (*at, at + m.data.len() as u64))).collect()
    }
    pub fn entry(&self) -> u32 {
        self.entry
    }
}

/// Offset of the first 4-byte aligned header magic in the first 8 KiB.
pub fn find_header(image: &[u8]) -> Option<usize> {
    let end = image.len().min(SEARCH_LEN);
    (0..end.saturating_sub(3)).step_by(4).find(|&o| u32_at(image, o) == Some(HEADER_MAGIC))
}

fn u32_at(image: &[u8], off: usize) -> Option<u32> {
    let b = image.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Check `image` (named `what`) as a Multiboot kernel for `mem_size` bytes
/// of RAM and place `modules` after it.
pub fn prepare(image: &[u8], what: &str, mem_size: u64, modules: Vec<Module>) -> Result<Kernel, Error> {
    let bad = |m: String| Error::Config(format!("{what}: {m}"));
    let off =
        find_header(image).ok_or_else(|| bad("no Multiboot header (magic 0x1BADB002) in its first 8 KiB".into()))?;
    let field = |i: usize| u32_at(image, off + 4 * i);
    let (Some(flags), Some(checksum)) = (field(1), field(2)) else {
        return Err(bad("the Multiboot header is cut off by the end of the file".into()));
    };
    if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) != 0 {
        return Err(bad(format!(
            "bad Multiboot header checksum {checksum:#010x} at offset {off:#x} (magic + flags + checksum must be 0 mod 2^32; expected {:#010x})",
            0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags)
        )));
    }
    let unsupported = flags & 0xffff & !SUPPORTED_REQUIRED;
    if unsupported & F_VIDEO_MODE != 0 {
        return Err(bad("the Multiboot header requires a video mode (flag 2), and vkvm has no display".into()));
    }
    if unsupported != 0 {
        let bits: Vec<String> = (0..16).filter(|b| unsupported & (1 << b) != 0).map(|b| b.to_string()).collect();
        return Err(bad(format!(
            "the Multiboot header requires unknown feature flag(s) {} (flags {flags:#010x}); vkvm supports required flags 0 and 1",
            bits.join(", ")
        )));
    }

    let (segments, entry) = if flags & F_ADDRESS != 0 {
        let mut f = [0u32; 5];
        for (i, v) in f.iter_mut().enumerate() {
            *v = field(3 + i).ok_or_else(|| {
                bad("the Multiboot header's address fields (flag 16) are cut off by the end of the file".into())
            })?;
        }
        address_fields(image, off, f).map_err(bad)?
    } else {
        elf_segments(image).map_err(bad)?
    };
    check_layout(&segments, entry, mem_size).map_err(bad)?;

    // Modules go page-aligned after the kernel (flag 0 is always honoured),
    // and above 1 MiB even when the kernel is all below it.
    let kernel_end = segments.iter().map(|s| s.paddr + s.memsz).max().unwrap_or(HIMEM_START).max(HIMEM_START);
    if modules.len() > MAX_MODULES {
        return Err(Error::Config(format!("{} modules given; at most {MAX_MODULES} are supported", modules.len())));
    }
    let strings: u64 = modules.iter().map(|m| m.string.len() as u64 + 1).sum();
    if strings > MOD_STRINGS_END - MOD_STRINGS_ADDR {
        return Err(Error::Config(format!(
            "module strings take {strings} bytes; at most {} are supported",
            MOD_STRINGS_END - MOD_STRINGS_ADDR
        )));
    }
    let mut at = kernel_end.div_ceil(PAGE) * PAGE;
    let mut placed = Vec::new();
    for m in modules {
        let end = at.saturating_add(m.data.len() as u64);
        if end > mem_size {
            return Err(Error::Config(format!(
                "module '{}' ({} bytes) does not fit in --memory {} MiB after the kernel and the modules before it",
                m.string,
                m.data.len(),
                mem_size >> 20
            )));
        }
        placed.push((at, m));
        at = end.div_ceil(PAGE) * PAGE;
    }
    Ok(Kernel { segments, entry, modules: placed })
}

/// Flag 16: header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr.
fn address_fields(image: &[u8], off: usize, f: [u32; 5]) -> Result<(Vec<Segment>, u32), String> {
    let [header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr] = f.map(u64::from);
    let before = header_addr
        .checked_sub(load_addr)
        .filter(|&b| b <= off as u64)
        .ok_or_else(|| {
            format!("Multiboot address fields are inconsistent: header_addr {header_addr:#x} and load_addr {load_addr:#x} do not match the header's file offset {off:#x}")
        })?;
    let start = off as u64 - before;
    let file_end = if load_end_addr == 0 {
        image.len() as u64
    } else {
        if load_end_addr < load_addr {
            return Err(format!("Multiboot load_end_addr {load_end_addr:#x} is below load_addr {load_addr:#x}"));
        }
        start + (load_end_addr - load_addr)
    };
    if file_end > image.len() as u64 {
        return Err(format!("Multiboot load_end_addr {load_end_addr:#x} reaches past the end of the file"));
    }
    let filesz = file_end - start;
    let mut memsz = filesz;
    if bss_end_addr != 0 {
        let end = load_addr + filesz;
        if bss_end_addr < end {
            return Err(format!(
                "Multiboot bss_end_addr {bss_end_addr:#x} is below the end of the loaded image {end:#x}"
            ));
        }
        memsz = bss_end_addr - load_addr;
    }
    let seg = Segment { paddr: load_addr, offset: start as usize, filesz: filesz as usize, memsz };
    Ok((vec![seg], entry_addr as u32))
}

/// No flag 16: the kernel is an ELF file, loaded by its PT_LOAD headers at
/// their physical addresses. ELF32 is the specification's format; ELF64
/// (as GRUB 2 accepts) works too if everything lies below 4 GiB.
fn elf_segments(image: &[u8]) -> Result<(Vec<Segment>, u32), String> {
    if !elf::is_elf(image) {
        return Err(
            "the Multiboot header has no address fields (flag 16), so the kernel must be an ELF file, and it is not"
                .into(),
        );
    }
    let info = elf::parse(image).ok_or("malformed ELF program headers")?;
    let want = match info.class {
        Class::Elf32 => 3,  // EM_386
        Class::Elf64 => 62, // EM_X86_64
    };
    if info.machine != want {
        return Err(format!("ELF machine {} is not x86", info.machine));
    }
    let mut segs = Vec::new();
    for (i, p) in info.phdrs.iter().enumerate() {
        if p.kind != PT_LOAD || p.memsz == 0 {
            continue;
        }
        if p.filesz > p.memsz {
            return Err(format!(
                "ELF segment {i}: file size {:#x} is larger than its memory size {:#x}",
                p.filesz, p.memsz
            ));
        }
        let in_file = p.offset.checked_add(p.filesz).is_some_and(|e| e <= image.len() as u64);
        if !in_file {
            return Err(format!("ELF segment {i} reaches past the end of the file"));
        }
        segs.push(Segment { paddr: p.paddr, offset: p.offset as usize, filesz: p.filesz as usize, memsz: p.memsz });
    }
    if segs.is_empty() {
        return Err("the ELF file has no loadable segment".into());
    }
    let entry = u32::try_from(info.entry).map_err(|_| format!("entry point {:#x} is above 4 GiB", info.entry))?;
    Ok((segs, entry))
}

/// Segments inside RAM, clear of vkvm's boot data and the reserved range
/// below 1 MiB ([`BOOT_RANGES`]), not overlapping each other, entry inside one.
fn check_layout(segs: &[Segment], entry: u32, mem_size: u64) -> Result<(), String> {
    let mut sorted: Vec<&Segment> = segs.iter().collect();
    sorted.sort_by_key(|s| s.paddr);
    for s in &sorted {
        let end = s.paddr.saturating_add(s.memsz);
        if end > mem_size {
            return Err(format!(
                "segment [{:#x}, {end:#x}) is outside guest memory: kernels load below --memory ({:#x})",
                s.paddr, mem_size
            ));
        }
        if let Some((a, b, what)) = BOOT_RANGES.iter().find(|&&(a, b, _)| s.paddr < b && a < end) {
            return Err(format!("segment [{:#x}, {end:#x}) overlaps {what} at [{a:#x}, {b:#x})", s.paddr));
        }
    }
    for w in sorted.windows(2) {
        if w[0].paddr + w[0].memsz > w[1].paddr {
            return Err(format!(
                "segments [{:#x}, {:#x}) and [{:#x}, {:#x}) overlap",
                w[0].paddr,
                w[0].paddr + w[0].memsz,
                w[1].paddr,
                w[1].paddr + w[1].memsz
            ));
        }
    }
    let e = entry as u64;
    if !segs.iter().any(|s| e >= s.paddr && e < s.paddr + s.memsz) {
        return Err(format!("entry point {e:#x} is outside the loaded segments"));
    }
    Ok(())
}

fn put(mem: &GuestMemoryMmap, bytes: &[u8], at: u64, what: &str) -> Result<(), Error> {
    mem.write_slice(bytes, GuestAddress(at))
        .map_err(|e| Error::Crash(format!("cannot write the {what} at {at:#x}: {e}")))
}

/// Copy the kernel and modules into guest memory and write the boot
/// information. Returns (entry, boot information address).
pub fn load(
    k: &Kernel,
    mem: &GuestMemoryMmap,
    image: &[u8],
    cmdline: &str,
    mem_size: u64,
) -> Result<(u32, u32), Error> {
    // The bss (memsz beyond filesz) is not written: guest RAM is created
    // zero-filled, and nothing else is put between 1 MiB and the end of the
    // kernel (boot data lives below 1 MiB, modules after the kernel).
    // Writing zeros would only make a demand-paged RAM allocate the pages.
    for s in &k.segments {
        let bytes = &image[s.offset..s.offset + s.filesz];
        put(mem, bytes, s.paddr, "kernel")?;
    }

    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    put(mem, &c, CMDLINE_ADDR, "command line")?;

    let mut list = Vec::new();
    let mut s_at = MOD_STRINGS_ADDR;
    for (at, m) in &k.modules {
        put(mem, &m.data, *at, "module")?;
        let mut s = m.string.as_bytes().to_vec();
        s.push(0);
        put(mem, &s, s_at, "module string")?;
        for v in [*at, at + m.data.len() as u64, s_at, 0] {
            list.extend_from_slice(&(v as u32).to_le_bytes());
        }
        s_at += s.len() as u64;
    }
    put(mem, &list, MODS_ADDR, "module list")?;

    // Memory map: each entry is preceded by its size (20).
    let mut mmap = Vec::new();
    for (base, len, kind) in
        [(0, LOWMEM_END, 1u32), (LOWMEM_END, 0x10_0000 - LOWMEM_END, 2), (HIMEM_START, mem_size - HIMEM_START, 1)]
    {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&base.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&kind.to_le_bytes());
    }
    put(mem, &mmap, MMAP_ADDR, "memory map")?;
    put(mem, b"vkvm\0", LOADER_NAME_ADDR, "boot loader name")?;

    let mut mbi = [0u8; MBI_SIZE];
    let mut set = |off: usize, v: u32| mbi[off..off + 4].copy_from_slice(&v.to_le_bytes());
    set(0, MBI_MEM | MBI_CMDLINE | MBI_MODS | MBI_MMAP | MBI_LOADER_NAME);
    set(4, (LOWMEM_END >> 10) as u32);
    set(8, ((mem_size - HIMEM_START) >> 10) as u32);
    set(16, CMDLINE_ADDR as u32);
    set(20, k.modules.len() as u32);
    set(24, MODS_ADDR as u32);
    set(44, mmap.len() as u32);
    set(48, MMAP_ADDR as u32);
    set(64, LOADER_NAME_ADDR as u32);
    put(mem, &mbi, MBI_ADDR, "Multiboot information")?;
    Ok((k.entry, MBI_ADDR as u32))
}

#[cfg(test)]
mod test {
    use super::*;

    /// A flag-16 kernel: header at offset 0, loaded at 1 MiB, `len` bytes.
    fn aout(flags: u32, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len.max(32)];
        let f = flags | F_ADDRESS;
        let words = [
            HEADER_MAGIC,
            f,
            0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(f),
            0x10_0000,
            0x10_0000,
            0,
            0x20_0000,
            0x10_0020,
        ];
        for (i, w) in words.iter().enumerate() {
            v[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        v.truncate(len);
        v
    }

    fn err(image: &[u8], mem: u64) -> String {
        match prepare(image, "k", mem, Vec::new()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn address_fields_load_with_bss() {
        let k = prepare(&aout(F_MEMORY_INFO, 4096), "k", 64 << 20, Vec::new()).unwrap();
        assert_eq!(k.entry, 0x10_0020);
        assert_eq!(k.segments[0].filesz, 4096);
        assert_eq!(k.segments[0].memsz, 0x10_0000);
    }

    #[test]
    fn bad_headers_are_named() {
        let mut img = aout(0, 4096);
        img[8] ^= 1;
        assert!(err(&img, 64 << 20).contains("checksum"));
        assert!(err(&aout(F_VIDEO_MODE, 4096), 64 << 20).contains("video"));
        assert!(err(&aout(1 << 5, 4096), 64 << 20).contains("flag(s) 5"));
        assert!(err(&aout(0, 4096), 1 << 20).contains("outside guest memory"));
        let mut low = elf32(2);
        for (paddr, ok) in [(0x8000u32, true), (0x0, true), (0x6800, false), (0x1f800, false), (0x9f000, false)] {
            // The segment (0x2000 bytes) and the entry move together.
            low[24..28].copy_from_slice(&(paddr + 0x54).to_le_bytes());
            low[52 + 8..52 + 16].copy_from_slice(&[paddr.to_le_bytes(), paddr.to_le_bytes()].concat());
            let r = prepare(&low, "k", 64 << 20, Vec::new());
            assert_eq!(r.is_ok(), ok, "segment at {paddr:#x}");
            if let Err(e) = r {
                assert!(e.to_string().contains("overlaps"), "{e}");
            }
        }
        assert!(err(b"nothing here", 64 << 20).contains("no Multiboot header"));
        assert!(err(&aout(0, 16), 64 << 20).contains("cut off"));
    }

    #[test]
    fn modules_are_page_aligned_after_the_kernel() {
        let mods =
            vec![Module { string: "a".into(), data: vec![1; 10] }, Module { string: "b".into(), data: vec![2; 5000] }];
        let k = prepare(&aout(F_PAGE_ALIGN, 4096), "k", 64 << 20, mods).unwrap();
        assert_eq!(k.modules[0].0, 0x20_0000);
        assert_eq!(k.modules[1].0, 0x20_1000);
        let big = vec![Module { string: "big".into(), data: vec![0; 3 << 20] }];
        assert!(prepare(&aout(0, 4096), "k", 4 << 20, big).is_err());
    }

    /// A one-segment ELF32 with the header after the program header.
    fn elf32(flags: u32) -> Vec<u8> {
        let mut f = b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
        f.extend_from_slice(&[2, 0, 3, 0]);
        for v in [1u32, 0x10_0054, 52, 0, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        for v in [52u16, 32, 1, 40, 0, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        for v in [1u32, 0, 0x10_0000, 0x10_0000, 128, 0x2000, 7, 4096] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        for v in [HEADER_MAGIC, flags, 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags)] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.resize(128, 0x90);
        f
    }

    /// Random corruption of good kernels (checksum kept valid half of the
    /// time so the loader's later checks are reached) never panics, and
    /// whatever passes the checks loads.
    #[test]
    fn mutated_kernels_never_panic() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut loaded = 0;
        for i in 0..20_000u64 {
            let mut img = if i % 2 == 0 { aout(0, 256) } else { elf32(2) };
            for _ in 0..1 + i % 6 {
                let r = next();
                let at = (r >> 16) as usize % img.len();
                img[at] = r as u8;
            }
            if i % 4 < 2 {
                if let Some(o) = find_header(&img) {
                    let f = u32_at(&img, o + 4).unwrap_or(0);
                    if o + 12 <= img.len() {
                        let sum = 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(f);
                        img[o + 8..o + 12].copy_from_slice(&sum.to_le_bytes());
                    }
                }
            }
            if i % 7 == 0 {
                img.truncate(next() as usize % img.len());
            }
            let _ = elf::has_pvh_note(&img);
            let mods = vec![Module { string: "m".into(), data: vec![1; 100] }];
            if let Ok(k) = prepare(&img, "k", 8 << 20, mods) {
                load(&k, &mem, &img, "c", 8 << 20).unwrap();
                loaded += 1;
            }
        }
        assert!(loaded > 100, "only {loaded} kernels loaded");
    }
}
