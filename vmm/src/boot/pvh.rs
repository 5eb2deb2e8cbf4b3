//! PVH direct boot: load the ELF with linux-loader, write `hvm_start_info`,
//! its memory map and the command line, and set the vCPUs up in 32-bit
//! protected mode at the PVH entry with `ebx` pointing at the start info.

use crate::error::Error;
use crate::memory::GuestRam;
use crate::pmap::Delivery;
use kvm_bindings::{kvm_regs, kvm_segment};
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
    let need = end.div_ceil(2 << 20) * (2 << 20) + MIN_FREE;
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
    elf_segments(image)?.iter().try_fold(0u64, |end, &(paddr, _, memsz)| Some(end.max(paddr.checked_add(memsz)?)))
}

/// (paddr, filesz, memsz) of every PT_LOAD segment.
fn elf_segments(image: &[u8]) -> Option<Vec<(u64, u64, u64)>> {
    let rd = |off: usize, n: usize| -> Option<u64> {
        let b = image.get(off..off.checked_add(n)?)?;
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(b);
        Some(u64::from_le_bytes(v))
    };
    let phoff = rd(32, 8)? as usize;
    let phentsize = rd(54, 2)? as usize;
    let phnum = rd(56, 2)? as usize;
    if phentsize < 56 {
        return None;
    }
    let mut segs = Vec::new();
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if rd(ph, 4)? == 1 {
            segs.push((rd(ph + 24, 8)?, rd(ph + 32, 8)?, rd(ph + 40, 8)?));
        }
    }
    Some(segs)
}

/// Load the kernel and the PVH boot data into guest RAM. linux-loader writes
/// into a scratch vm-memory space (lazily allocated, never touched beyond the
/// image); the bytes it wrote are then copied into the pager-backed RAM, so
/// no guest page is populated except those the image and boot data occupy.
pub fn load_pvh(ram: &GuestRam, image: &[u8], what: &str, cmdline: &str) -> Result<Entry, Error> {
    let mem_size = ram.size;
    check_elf(image, what, mem_size)?;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size as usize)])
        .map_err(|e| Error::Crash(format!("cannot allocate scratch memory for loading: {e}")))?;
    let mem = &mem;
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

    let mut ranges = vec![
        (START_INFO_ADDR, std::mem::size_of::<hvm_start_info>() as u64),
        (MEMMAP_ADDR, std::mem::size_of_val(&memmap) as u64),
        (CMDLINE_ADDR, bytes.len() as u64),
    ];
    let segs = elf_segments(image).ok_or_else(|| Error::Config(format!("{what} has malformed program headers")))?;
    ranges.extend(segs.iter().map(|&(paddr, filesz, _)| (paddr, filesz)));
    if ram.view.delivery() == Delivery::Exit {
        // Natively run guest code (ring 3 here) cannot fault by exit: the
        // image's own memory (stacks, .bss) must be present from the start.
        for &(paddr, _, memsz) in &segs {
            ram.populate(paddr, memsz)
                .map_err(|e| Error::Crash(format!("cannot populate the image at {paddr:#x}: {e}")))?;
        }
    }
    for (start, len) in ranges {
        let mut buf = vec![0u8; len as usize];
        mem.read_slice(&mut buf, GuestAddress(start))
            .map_err(|e| Error::Crash(format!("cannot read back loaded bytes at {start:#x}: {e}")))?;
        ram.write(start, &buf).map_err(|e| Error::Crash(format!("cannot write guest RAM at {start:#x}: {e}")))?;
    }
    Ok(Entry { pvh_entry: entry, start_info: START_INFO_ADDR })
}

fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// PVH entry state: 32-bit protected mode, paging off, flat segments.
pub fn setup_vcpu(vcpu: &VcpuFd, entry: &Entry) -> Result<(), Error> {
    let mut sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    sregs.cs = flat_segment(0x08, 0xb);
    let data = flat_segment(0x10, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment { limit: 0x67, type_: 0xb, present: 1, s: 0, db: 0, g: 0, ..data };
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"))?;
    let regs = kvm_regs { rip: entry.pvh_entry, rbx: entry.start_info, rflags: 2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;
    Ok(())
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

    #[test]
    fn truncated_program_headers_are_malformed() {
        let mut img = crate::guest_image::BUNDLED[..64].to_vec();
        img[56] = 200; // phnum far beyond the file
        let e = check_elf(&img, "cut", 256 << 20).unwrap_err();
        assert!(e.to_string().contains("malformed"), "{e}");
    }
}
