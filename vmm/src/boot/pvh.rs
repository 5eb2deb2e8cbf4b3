//! PVH direct boot: load the ELF with linux-loader, write `hvm_start_info`,
//! its memory map and the command line, and set the vCPUs up in 32-bit
//! protected mode at the PVH entry with `ebx` pointing at the start info.

use crate::error::Error;
use kvm_ioctls::VcpuFd;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{KernelLoader, KernelLoaderResult};
use std::io::Cursor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const CMDLINE_MAX: usize = 4096;
const START_INFO_ADDR: u64 = 0x6000;
const MEMMAP_ADDR: u64 = 0x7000;
const CMDLINE_ADDR: u64 = 0x20000;
const HIMEM_START: u64 = 0x10_0000;
const LOWMEM_END: u64 = 0x9_fc00;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
/// Room the guest needs beyond its image (stacks are in the image; tests get the rest).
const MIN_FREE: u64 = 2 << 20;

/// Where a loaded guest starts.
pub struct Entry {
    pub pvh_entry: u64,
    pub start_info: u64,
}

/// Check the image before loading it, so bad input gets a clear message.
pub fn check_elf(image: &[u8], what: &str, mem_size: u64) -> Result<(), Error> {
    if image.len() < 64 || &image[..4] != b"\x7fELF" {
        return Err(Error::Config(format!("{what} is not an ELF file")));
    }
    if image[4] != 2 || image[5] != 1 || u16::from_le_bytes([image[18], image[19]]) != 62 {
        return Err(Error::Config(format!(
            "{what} is not a 64-bit little-endian x86-64 ELF (PVH kernels are ELF64 here)"
        )));
    }
    let end = elf_extent(image).ok_or_else(|| Error::Config(format!("{what} has malformed program headers")))?;
    // Checked: a segment ending near 2^64 must not wrap to a small need.
    let need = end.div_ceil(2 << 20).checked_mul(2 << 20).and_then(|n| n.checked_add(MIN_FREE));
    let Some(need) = need.filter(|&n| n <= crate::config::MAX_MEMORY) else {
        return Err(Error::Config(format!(
            "{what} loads up to {end:#x}, beyond the largest guest memory ({} MiB)",
            crate::config::MAX_MEMORY >> 20
        )));
    };
    if need > mem_size {
        return Err(Error::Config(format!(
            "--memory {} MiB is too small for {what}: it needs at least {} MiB",
            mem_size >> 20,
            need.div_ceil(1 << 20)
        )));
    }
    Ok(())
}

/// Highest physical address any PT_LOAD segment reaches.
fn elf_extent(image: &[u8]) -> Option<u64> {
    super::elf::parse(image)?
        .phdrs
        .iter()
        .filter(|p| p.kind == super::elf::PT_LOAD)
        .try_fold(0u64, |end, p| Some(end.max(p.paddr.checked_add(p.memsz)?)))
}

pub fn load_pvh(mem: &GuestMemoryMmap, image: &[u8], what: &str, cmdline: &str, mem_size: u64) -> Result<Entry, Error> {
    check_elf(image, what, mem_size)?;
    let res: KernelLoaderResult = Elf::load(mem, None, &mut Cursor::new(image), Some(GuestAddress(HIMEM_START)))
        .map_err(|e| Error::Config(format!("cannot load {what}: {e}")))?;
    let entry = match res.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(a) => a.0,
        _ => {
            return Err(Error::Config(format!(
                "{what} has no PVH entry note (an ELF note 'Xen' of type 18, XEN_ELFNOTE_PHYS32_ENTRY)"
            )))
        }
    };

    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| Error::Crash(format!("cannot write the command line: {e}")))?;

    let memmap = [
        hvm_memmap_table_entry { addr: 0, size: LOWMEM_END, type_: E820_RAM, reserved: 0 },
        hvm_memmap_table_entry { addr: HIMEM_START, size: mem_size - HIMEM_START, type_: E820_RAM, reserved: 0 },
    ];
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| Error::Crash(format!("cannot write the PVH start info: {e}")))?;
    Ok(Entry { pvh_entry: entry, start_info: START_INFO_ADDR })
}

/// PVH entry state: 32-bit protected mode, paging off, flat segments,
/// `ebx` = the start info.
pub fn setup_vcpu(vcpu: &VcpuFd, entry: &Entry) -> Result<(), Error> {
    super::enter_protected_mode(vcpu, entry.pvh_entry, 0, entry.start_info)
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn non_elf_is_rejected_by_name() {
        let e = check_elf(b"#!/bin/sh\necho hi\n", "x.sh", 256 << 20).unwrap_err();
        assert!(e.to_string().contains("not an ELF"), "{e}");
    }

    #[test]
    fn bundled_guest_fits_and_too_small_memory_is_rejected() {
        let img = crate::guest_image::BUNDLED;
        check_elf(img, "guest", 256 << 20).unwrap();
        let e = check_elf(img, "guest", 2 << 20).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
    }

    /// An ELF64 with one PT_LOAD segment at `paddr` of `memsz` bytes.
    fn elf64(paddr: u64, memsz: u64) -> Vec<u8> {
        let mut f = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
        f.extend_from_slice(&[2, 0, 62, 0, 1, 0, 0, 0]);
        for v in [paddr, 64, 0] {
            f.extend_from_slice(&v.to_le_bytes()); // entry, phoff, shoff
        }
        f.extend_from_slice(&[0; 4]); // flags
        for v in [64u16, 56, 1, 64, 0, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&7u32.to_le_bytes());
        for v in [0u64, paddr, paddr, 0, memsz, 4096] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f
    }

    /// Before: the 2 MiB rounding overflowed (a panic in a debug build; in
    /// a release build the need wrapped to 2 MiB and the image passed).
    #[test]
    fn a_segment_ending_near_2_pow_64_is_refused_by_name() {
        let e = check_elf(&elf64(u64::MAX - 0x1000, 0x800), "k", 256 << 20).unwrap_err();
        assert!(e.to_string().contains("beyond the largest guest memory"), "{e}");
        let e = check_elf(&elf64(4 << 30, 0x1000), "k", 256 << 20).unwrap_err();
        assert!(e.to_string().contains("beyond the largest guest memory"), "{e}");
        let e = check_elf(&elf64(255 << 20, 0x1000), "k", 256 << 20).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        check_elf(&elf64(1 << 20, 0x1000), "k", 256 << 20).unwrap();
    }

    #[test]
    fn truncated_program_headers_are_malformed() {
        let mut img = crate::guest_image::BUNDLED[..64].to_vec();
        img[56] = 200; // phnum far beyond the file
        let e = check_elf(&img, "cut", 256 << 20).unwrap_err();
        assert!(e.to_string().contains("malformed"), "{e}");
    }
}
