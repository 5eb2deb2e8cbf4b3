//! Booting a guest: which protocol, and the common vCPU entry state.
//!
//! [`prepare`] picks the protocol and checks the image (before KVM is
//! opened, so bad input is a configuration error); [`load`] writes it into
//! guest memory; [`setup_vcpu`] gives each vCPU its entry state.

pub mod elf;
pub mod firmware;
#[cfg(test)]
pub mod fuzz;
pub mod multiboot;
pub mod pvh;

use crate::error::Error;
use crate::memory::GuestRam;
use crate::pmap::Delivery;
use kvm_bindings::{kvm_mp_state, kvm_regs, kvm_segment, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED};
use kvm_ioctls::VcpuFd;
use std::path::Path;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

pub use pvh::CMDLINE_MAX;

/// How vkvm enters the guest (`--boot`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BootMode {
    /// Direct kernel boot, protocol detected from the image: a PVH note
    /// first, then a Multiboot v1 header in the first 8 KiB.
    #[default]
    #[value(alias = "direct")]
    Auto,
    /// Direct boot through the PVH entry note.
    Pvh,
    /// Start at the reset vector in real mode; the bundled firmware enters
    /// the guest's PVH entry.
    Firmware,
    /// Multiboot v1: 32-bit entry with EAX = 0x2BADB002, EBX = boot information.
    Multiboot,
}

/// A kernel read and checked before KVM is opened (so bad input is a
/// configuration error): its bytes, its name for messages, the path word
/// Multiboot puts first on the command line, and its protocol.
pub struct Image {
    pub bytes: Vec<u8>,
    pub what: String,
    pub path_word: String,
    pub plan: Plan,
}

impl Image {
    /// Read `guest` (None: the bundled guest, its ELF32 for `--boot
    /// multiboot`) and check it for `mode` against `mem_size`.
    pub fn read(guest: Option<&Path>, mode: BootMode, mem_size: u64, modules: &[String]) -> Result<Image, Error> {
        let (bytes, what, path_word) = match guest {
            Some(p) => {
                let why = "--memory: a kernel file must fit in guest RAM";
                let image = crate::inputs::read_capped(p, "guest", mem_size, why)?;
                (image, p.display().to_string(), p.display().to_string())
            }
            None if mode == BootMode::Multiboot => (
                crate::guest_image::BUNDLED32.to_vec(),
                "the bundled guest (ELF32)".to_string(),
                "vkvm-guest32.elf".to_string(),
            ),
            None => {
                (crate::guest_image::BUNDLED.to_vec(), "the bundled guest".to_string(), "vkvm-guest.elf".to_string())
            }
        };
        let plan = prepare(&bytes, &what, mode, mem_size, modules)?;
        Ok(Image { bytes, what, path_word, plan })
    }
}

/// A checked image and the protocol it boots with.
pub enum Plan {
    Pvh,
    Multiboot(multiboot::Kernel),
}

/// Where and how the vCPUs start.
pub enum Entry {
    /// Every vCPU starts at the PVH entry (vkvm starts the APs itself).
    Pvh(pvh::Entry),
    /// The BSP starts at `entry`; the APs wait for INIT/SIPI as on a PC.
    Multiboot { entry: u32, mbi: u32 },
}

/// Read `--module PATH[,STRING]` arguments (STRING defaults to PATH):
/// regular files of at most `mem_size` bytes each.
pub fn read_modules(args: &[String], mem_size: u64) -> Result<Vec<multiboot::Module>, Error> {
    args.iter()
        .map(|a| {
            let (path, string) = a.split_once(',').unwrap_or((a, a));
            if path.is_empty() {
                return Err(Error::Config(format!("--module '{a}': expected PATH[,STRING]")));
            }
            let why = "--memory: a module must fit in guest RAM";
            let data = crate::inputs::read_capped(Path::new(path), "module", mem_size, why)?;
            Ok(multiboot::Module { string: string.to_string(), data })
        })
        .collect()
}

/// `--cmdline` alone must leave room for the NUL.
pub fn check_cmdline(c: &str) -> Result<(), Error> {
    if c.len() >= CMDLINE_MAX {
        return Err(Error::Config(format!("--cmdline is {} bytes, the limit is {}", c.len(), CMDLINE_MAX - 1)));
    }
    Ok(())
}

/// The command line the guest gets, checked as a whole against the limit
/// (4095 bytes and a NUL): for Multiboot the kernel's path first, as GRUB
/// and QEMU give it (`-kernel K -append 'A B'` is `K A B`), then
/// `--cmdline`, then vkvm's own words (`vkvm.files=`, `vkvm.vpt=`).
pub fn guest_cmdline(plan: &Plan, kernel: &str, user: &str, vkvm: &str) -> Result<String, Error> {
    let first = if matches!(plan, Plan::Multiboot(_)) { kernel } else { "" };
    let line =
        [first, user.trim(), vkvm.trim()].iter().filter(|w| !w.is_empty()).copied().collect::<Vec<_>>().join(" ");
    if line.len() >= CMDLINE_MAX {
        return Err(Error::Config(format!(
            "the guest command line is {} bytes with what vkvm adds to --cmdline ({} bytes: {}vkvm's own words such as vkvm.files= and vkvm.vpt=); the limit is {}",
            line.len(),
            user.len(),
            if first.is_empty() { "" } else { "the kernel's path, " },
            CMDLINE_MAX - 1
        )));
    }
    Ok(line)
}

/// Choose the protocol for `image` and check it against `mem_size`.
pub fn prepare(image: &[u8], what: &str, mode: BootMode, mem_size: u64, modules: &[String]) -> Result<Plan, Error> {
    // vkvm boots PVH kernels that are ELF64 (linux-loader's ELF loader); an
    // ELF32 that carries both a PVH note and a Multiboot header (our guest
    // converted by objcopy, for one) boots by Multiboot.
    let elf64 = matches!(elf::parse(image), Some(e) if e.class == elf::Class::Elf64);
    let mode = match mode {
        BootMode::Auto if elf::has_pvh_note(image) && elf64 => BootMode::Pvh,
        BootMode::Auto if multiboot::find_header(image).is_some() => BootMode::Multiboot,
        BootMode::Auto => {
            // Not an ELF at all, or an ELF64 too big for --memory, get
            // the PVH checker's more precise message.
            if !matches!(elf::parse(image), Some(e) if e.class == elf::Class::Elf32) {
                pvh::check_elf(image, what, mem_size)?;
            }
            return Err(Error::Config(format!(
                "{what} has no PVH entry note (an ELF note 'Xen' of type 18, XEN_ELFNOTE_PHYS32_ENTRY) and no Multiboot header (magic 0x1BADB002 in its first 8 KiB)"
            )));
        }
        m => m,
    };
    match mode {
        BootMode::Multiboot => {
            let mods = read_modules(modules, mem_size)?;
            Ok(Plan::Multiboot(multiboot::prepare(image, what, mem_size, mods)?))
        }
        _ => {
            if !modules.is_empty() {
                return Err(Error::Config("--module needs a Multiboot boot; PVH boots take no modules".into()));
            }
            pvh::check_elf(image, what, mem_size)?;
            Ok(Plan::Pvh)
        }
    }
}

/// Write the checked image and its boot information into guest RAM. The
/// protocol's loader (linux-loader for PVH) writes into a scratch vm-memory
/// space that is allocated lazily; the pages it touched (mincore) are then
/// copied into the pager-backed RAM, so no other guest page is populated.
pub fn load(plan: &Plan, ram: &GuestRam, image: &[u8], what: &str, cmdline: &str) -> Result<Entry, Error> {
    let mem_size = ram.size;
    let scratch = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size as usize)])
        .map_err(|e| Error::Crash(format!("cannot allocate scratch memory for loading: {e}")))?;
    let entry = match plan {
        Plan::Pvh => Entry::Pvh(pvh::load_pvh(&scratch, image, what, cmdline, mem_size)?),
        Plan::Multiboot(k) => {
            let (entry, mbi) = multiboot::load(k, &scratch, image, cmdline, mem_size)?;
            Entry::Multiboot { entry, mbi }
        }
    };
    copy_touched(&scratch, ram)?;
    if ram.view.delivery() == Delivery::Exit {
        // Natively run guest code (ring 3 here) cannot fault by exit: the
        // image's own memory (stacks, .bss) must be present from the start.
        let phdrs = elf::parse(image).map(|e| e.phdrs).unwrap_or_default();
        for s in phdrs.iter().filter(|p| p.kind == elf::PT_LOAD) {
            ram.populate(s.paddr, s.memsz)
                .map_err(|e| Error::Crash(format!("cannot populate the image at {:#x}: {e}", s.paddr)))?;
        }
    }
    Ok(entry)
}

/// Copy every page of `scratch` that the loader touched into guest RAM.
fn copy_touched(scratch: &GuestMemoryMmap, ram: &GuestRam) -> Result<(), Error> {
    let region = scratch.iter().next().ok_or_else(|| Error::Crash("empty scratch memory".into()))?;
    let base = region.as_ptr();
    let pages = (region.len() / 4096) as usize;
    let mut resident = vec![0u8; pages];
    // SAFETY: mincore on our own mapping, with one byte per page.
    if unsafe { libc::mincore(base.cast(), region.len() as usize, resident.as_mut_ptr()) } != 0 {
        return Err(Error::Crash(format!("mincore on the loader's memory: {}", std::io::Error::last_os_error())));
    }
    let mut page = [0u8; 4096];
    for (p, _) in resident.iter().enumerate().filter(|(_, &r)| r & 1 != 0) {
        let gpa = p as u64 * 4096;
        scratch
            .read_slice(&mut page, GuestAddress(gpa))
            .map_err(|e| Error::Crash(format!("cannot read loaded bytes at {gpa:#x}: {e}")))?;
        if page.iter().any(|&b| b != 0) {
            ram.write(gpa, &page).map_err(|e| Error::Crash(format!("cannot write guest RAM at {gpa:#x}: {e}")))?;
        }
    }
    Ok(())
}

impl Entry {
    /// The protocol's name, for the log.
    pub fn protocol(&self) -> &'static str {
        match self {
            Entry::Pvh(_) => "PVH",
            Entry::Multiboot { .. } => "Multiboot",
        }
    }
    /// The entry address, for the log.
    pub fn address(&self) -> u64 {
        match self {
            Entry::Pvh(e) => e.pvh_entry,
            Entry::Multiboot { entry, .. } => *entry as u64,
        }
    }
}

/// Give vCPU `id` its entry state. With the in-kernel LAPIC, KVM keeps
/// every AP in "wait for SIPI" (KVM_MP_STATE_UNINITIALIZED): right for
/// Multiboot (the kernel starts them by INIT/SIPI), while for PVH vkvm
/// starts each AP at the entry itself, so it makes them runnable.
pub fn setup_vcpu(vcpu: &VcpuFd, id: u32, entry: &Entry) -> Result<(), Error> {
    match entry {
        Entry::Pvh(e) => {
            pvh::setup_vcpu(vcpu, e)?;
            if id != 0 {
                let st = kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE };
                vcpu.set_mp_state(st).map_err(Error::kvm("KVM_SET_MP_STATE"))?;
            }
            Ok(())
        }
        Entry::Multiboot { entry, mbi } if id == 0 => {
            enter_protected_mode(vcpu, *entry as u64, multiboot::BOOT_MAGIC as u64, *mbi as u64)
        }
        // APs wait for INIT/SIPI. That is KVM's reset state for an AP with
        // the in-kernel LAPIC already; set it anyway so that it does not
        // depend on how KVM picks the BSP.
        Entry::Multiboot { .. } => {
            let st = kvm_mp_state { mp_state: KVM_MP_STATE_UNINITIALIZED };
            vcpu.set_mp_state(st).map_err(Error::kvm("KVM_SET_MP_STATE"))
        }
    }
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

/// The entry state PVH and Multiboot share: 32-bit protected mode, paging
/// off, flat 4 GiB code and data segments, interrupts off.
pub fn enter_protected_mode(vcpu: &VcpuFd, rip: u64, rax: u64, rbx: u64) -> Result<(), Error> {
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
    let regs = kvm_regs { rip, rax, rbx, rflags: 2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;
    Ok(())
}
