//! Firmware boot (`--boot firmware`): the guest ELF is loaded and its
//! `hvm_start_info` written exactly as for PVH, but the vCPUs start at the
//! reset vector in real mode. The bundled firmware (`firmware/`, a 64 KiB
//! flat ROM mapped read-only just below 4 GiB) finds the PVH entry in the
//! boot-info structure written here, and enters the guest itself.

use super::pvh::Entry;
use crate::error::Error;
use crate::memory::GuestRam;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

#[path = "../../../firmware/src/bootinfo.rs"]
mod layout;
pub use layout::*;

/// The ROM image, built by build.rs from `firmware/`.
pub static ROM: &[u8] = include_bytes!(env!("VKVM_FIRMWARE_BIN"));

/// Real-mode reset state (as after RESET/INIT): CS:IP = F000:FFF0 with the CS
/// base at 0xFFFF0000, so the first fetch is at 0xFFFFFFF0.
const RESET_CS_SELECTOR: u16 = 0xf000;
const RESET_RIP: u64 = 0xfff0;

/// Test-only ways to spoil the boot info (hidden `--boot-info-corrupt`), one
/// per check the firmware makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Corrupt {
    /// Do not write the structure at all.
    Missing,
    Version,
    Size,
    Checksum,
    /// A PVH entry above 4 GiB.
    Address,
}

/// The structure's bytes (layout in `firmware/src/bootinfo.rs`).
pub fn boot_info(pvh_entry: u64, start_info: u64, corrupt: Option<Corrupt>) -> [u8; 32] {
    let mut version = BOOT_INFO_VERSION;
    let mut size = BOOT_INFO_SIZE;
    let mut entry = pvh_entry;
    match corrupt {
        Some(Corrupt::Version) => version += 1,
        Some(Corrupt::Size) => size -= 4,
        Some(Corrupt::Address) => entry |= 1 << 32,
        _ => {}
    }
    let mut b = [0u8; 32];
    b[0..4].copy_from_slice(&BOOT_INFO_MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&version.to_le_bytes());
    b[6..8].copy_from_slice(&size.to_le_bytes());
    b[16..24].copy_from_slice(&entry.to_le_bytes());
    b[24..32].copy_from_slice(&start_info.to_le_bytes());
    let sum = words_sum(&b);
    b[8..12].copy_from_slice(&0u32.wrapping_sub(sum).to_le_bytes());
    if corrupt == Some(Corrupt::Checksum) {
        b[16] ^= 1;
    }
    b
}

fn words_sum(b: &[u8]) -> u32 {
    b.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).fold(0, u32::wrapping_add)
}

/// Write the boot info for `entry` at [`BOOT_INFO_ADDR`].
pub fn write_boot_info(ram: &GuestRam, entry: &Entry, corrupt: Option<Corrupt>) -> Result<(), Error> {
    if corrupt == Some(Corrupt::Missing) {
        return Ok(());
    }
    let b = boot_info(entry.pvh_entry, entry.start_info, corrupt);
    ram.write(BOOT_INFO_ADDR, &b).map_err(|e| Error::Crash(format!("cannot write the firmware boot info: {e}")))
}

/// Map the ROM read-only at [`ROM_BASE`]; the returned memory must outlive
/// the VM. A guest write to it comes back as an MMIO exit, not a change.
pub fn map_rom(kvm: &Kvm, vm: &VmFd) -> Result<GuestMemoryMmap, Error> {
    if !kvm.check_extension(Cap::ReadonlyMem) {
        return Err(Error::Kvm(
            "--boot firmware needs read-only memory slots (KVM_CAP_READONLY_MEM), which this KVM lacks".into(),
        ));
    }
    let rom = GuestMemoryMmap::from_ranges(&[(GuestAddress(ROM_BASE), ROM_SIZE as usize)])
        .map_err(|e| Error::Crash(format!("cannot allocate the firmware ROM: {e}")))?;
    rom.write_slice(ROM, GuestAddress(ROM_BASE))
        .map_err(|e| Error::Crash(format!("cannot copy the firmware ROM: {e}")))?;
    // The last slot, so the RAM slots (numbered from 0) never collide with it.
    let slot = (kvm.get_nr_memslots().max(1) - 1) as u32;
    for region in rom.iter() {
        let r = kvm_userspace_memory_region {
            slot,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the mapping is kept by the VM (`vm::Stopped`) until its fd
        // is closed, or forgotten with it if a vCPU thread never ended.
        unsafe { vm.set_user_memory_region(r) }.map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION (firmware ROM)"))?;
    }
    Ok(rom)
}

/// Leave the vCPU in the reset state KVM gives a new vCPU; only if CS:IP is
/// not the reset vector (it always is today) set those two explicitly.
pub fn setup_vcpu(vcpu: &VcpuFd, id: u32) -> Result<(), Error> {
    if id != 0 {
        // With the in-kernel LAPIC an AP waits for INIT/SIPI; every vCPU
        // runs the firmware from the reset vector here, so make it runnable.
        let st = kvm_bindings::kvm_mp_state { mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE };
        vcpu.set_mp_state(st).map_err(Error::kvm("KVM_SET_MP_STATE"))?;
    }
    let mut sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    if sregs.cs.selector != RESET_CS_SELECTOR || sregs.cs.base != ROM_BASE {
        sregs.cs.selector = RESET_CS_SELECTOR;
        sregs.cs.base = ROM_BASE;
        vcpu.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"))?;
    }
    let mut regs = vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
    if regs.rip != RESET_RIP {
        regs.rip = RESET_RIP;
        vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;
    }
    Ok(())
}

/// The message for a write of `value` to [`ERROR_PORT`]: the NUL-terminated
/// line at that address in the ROM, if it is one of the firmware's (it must
/// start with [`ERROR_PREFIX`]). Anything else gets `None`.
pub fn error_message(value: u32) -> Option<String> {
    let off = u64::from(value).checked_sub(ROM_BASE)? as usize;
    let tail = ROM.get(off..)?;
    let end = tail.iter().take(256).position(|&b| b == 0)?;
    let line = std::str::from_utf8(&tail[..end]).ok()?.trim_end();
    line.starts_with(ERROR_PREFIX).then(|| line.to_string())
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn rom_is_64k_with_a_jump_at_the_reset_vector() {
        assert_eq!(ROM.len() as u64, ROM_SIZE);
        let reset = (0xffff_fff0 - ROM_BASE) as usize;
        // cli; jmp rel16
        assert_eq!(&ROM[reset..reset + 2], &[0xfa, 0xe9]);
    }

    #[test]
    fn good_boot_info_sums_to_zero_and_each_corruption_breaks_it() {
        let ok = boot_info(0x10_0000, 0x6000, None);
        assert_eq!(words_sum(&ok), 0);
        assert_eq!(&ok[0..4], b"VKBI");
        assert_eq!(u16::from_le_bytes([ok[6], ok[7]]), BOOT_INFO_SIZE);
        for c in [Corrupt::Version, Corrupt::Size, Corrupt::Checksum, Corrupt::Address] {
            assert_ne!(boot_info(0x10_0000, 0x6000, Some(c)), ok, "{c:?}");
        }
        assert_ne!(words_sum(&boot_info(1, 2, Some(Corrupt::Checksum))), 0);
    }

    #[test]
    fn every_firmware_message_is_found_and_other_values_are_not() {
        let needle = ERROR_PREFIX.as_bytes();
        let starts: Vec<usize> =
            (0..ROM.len() - needle.len()).filter(|&i| &ROM[i..i + needle.len()] == needle).collect();
        assert_eq!(starts.len(), 5, "one message per check");
        for s in starts {
            let m = error_message(ROM_BASE as u32 + s as u32).unwrap();
            assert!(m.ends_with("halted"), "{m}");
        }
        assert!(error_message(0).is_none());
        assert!(error_message(ROM_BASE as u32).is_none());
        assert!(error_message(u32::MAX).is_none());
    }
}
