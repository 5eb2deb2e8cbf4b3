//! A VM built in steps, each its own type so that no step can be skipped
//! or repeated: [`Builder::new`] (a KVM VM) -> [`Builder::memory`] (its
//! guest memory's slots and the interrupt controllers) ->
//! [`WithMemory::vcpus`] -> [`WithVcpus::boot`] or [`WithVcpus::restore`]
//! (load) -> [`Loaded::devices`] (the bus, the run control, what the vCPUs
//! share) -> [`Ready::start`] (the threads).

use super::{Deadline, RunningVm};
use crate::boot::{self, BootMode};
use crate::control::Control;
use crate::devices::{Bus, VmIds};
use crate::error::Error;
use crate::kvm::VcpuState;
use crate::memory::GuestRam;
use crate::profile::Profile;
use crate::stats::{Reports, Stats};
use crate::vcpu::{Cloner, VcpuContext};
use kvm_bindings::CpuId;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use log::info;
use std::sync::Arc;
use std::time::Instant;

/// Step 0: a KVM VM, empty.
pub struct Builder {
    vm_fd: VmFd,
    vm_id: u32,
    /// When the VM was created (its `elapsed_ms` counts from here).
    created: Instant,
}

/// Step 1 done: guest memory is in place.
pub struct WithMemory {
    b: Builder,
    ram: Arc<GuestRam>,
}

/// Step 2 done: the vCPUs exist (no entry state yet).
pub struct WithVcpus {
    m: WithMemory,
    vcpus: Vec<VcpuFd>,
}

/// Step 3 done: the guest is loaded and every vCPU has its entry state.
pub struct Loaded {
    v: WithVcpus,
    /// The firmware ROM's memory (`--boot firmware`), kept for KVM's sake.
    rom: Option<vm_memory::GuestMemoryMmap>,
}

/// Step 4 done: everything but the threads.
pub struct Ready {
    pub(super) vm_fd: VmFd,
    pub(super) vm_id: u32,
    pub(super) created: Instant,
    pub(super) vcpus: Vec<VcpuFd>,
    pub(super) ctx: VcpuContext,
    pub(super) tests: Arc<Reports>,
    pub(super) rom: Option<vm_memory::GuestMemoryMmap>,
}

/// How to boot (step 3 of `vkvm run`).
pub struct BootConfig<'a> {
    pub image: &'a boot::Image,
    /// `--cmdline`, to which vkvm adds its own words.
    pub cmdline: &'a str,
    /// `--prefault`: populate every page before the guest runs.
    pub prefault: bool,
    pub mode: BootMode,
    pub boot_info_corrupt: Option<boot::firmware::Corrupt>,
}

/// The devices and what the vCPUs share (step 4).
pub struct Devices {
    /// COM1's output (and the console hypercall's).
    pub console: Box<dyn std::io::Write + Send>,
    /// Where REPORTs go (shared by a VM and its clones).
    pub tests: Arc<Reports>,
    pub tsc_khz: u32,
    /// Who makes clones for CLONE (None: a clone, which cannot clone itself).
    pub cloner: Option<Arc<dyn Cloner>>,
    /// Exit-latency and fault-stage histograms (`vkvm profile`).
    pub profiling: bool,
}

impl Builder {
    /// A new KVM VM; `vm_id` 0 for the one vkvm boots, 1.. for clones.
    pub fn new(kvm: &Kvm, vm_id: u32) -> Result<Builder, Error> {
        let created = Instant::now();
        let what = if vm_id == 0 { "KVM_CREATE_VM" } else { "KVM_CREATE_VM for a clone" };
        let vm_fd = kvm.create_vm().map_err(Error::kvm(what))?;
        Ok(Builder { vm_fd, vm_id, created })
    }

    /// Step 1: `ram`'s memory slots, and the in-kernel interrupt
    /// controllers (before any vCPU).
    pub fn memory(self, ram: Arc<GuestRam>) -> Result<WithMemory, Error> {
        crate::kvm::register_memory(&self.vm_fd, &ram)?;
        crate::kvm::create_irqchip(&self.vm_fd)?;
        Ok(WithMemory { b: self, ram })
    }
}

impl WithMemory {
    /// Step 2: one vCPU per CPUID given (vCPU i gets `cpuids[i]`).
    pub fn vcpus(self, cpuids: &[CpuId]) -> Result<WithVcpus, Error> {
        let clone = self.b.vm_id != 0;
        let mut vcpus = Vec::new();
        for (id, cpuid) in cpuids.iter().enumerate() {
            let what = if clone { "KVM_CREATE_VCPU for a clone".to_string() } else { format!("KVM_CREATE_VCPU {id}") };
            let v = self.b.vm_fd.create_vcpu(id as u64).map_err(Error::kvm(what))?;
            v.set_cpuid2(cpuid).map_err(Error::kvm("KVM_SET_CPUID2"))?;
            vcpus.push(v);
        }
        Ok(WithVcpus { m: self, vcpus })
    }
}

impl WithVcpus {
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.m.ram
    }

    /// Step 3 for a boot: load the kernel (and with `--boot firmware` the
    /// boot info and the ROM), `--prefault`, and give every vCPU its entry
    /// state.
    pub fn boot(self, kvm: &Kvm, b: &BootConfig, deadline: &Deadline) -> Result<Loaded, Error> {
        let (ram, img) = (&self.m.ram, b.image);
        let cmdline = boot::guest_cmdline(&img.plan, &img.path_word, b.cmdline, &ram.guest_cmdline())?;
        let entry = boot::load(&img.plan, ram, &img.bytes, &img.what, &cmdline)?;
        deadline.check("loading the kernel")?;
        if b.prefault {
            ram.prefault_all(|| deadline.check("--prefault"))?;
        }
        let firmware = b.mode == BootMode::Firmware;
        let rom = if firmware {
            let boot::Entry::Pvh(pvh) = &entry else {
                return Err(Error::Config("--boot firmware enters PVH kernels only".into()));
            };
            boot::firmware::write_boot_info(ram, pvh, b.boot_info_corrupt)?;
            Some(boot::firmware::map_rom(kvm, &self.m.b.vm_fd)?)
        } else {
            None
        };
        for (id, v) in self.vcpus.iter().enumerate() {
            match firmware {
                true => boot::firmware::setup_vcpu(v, id as u32)?,
                false => boot::setup_vcpu(v, id as u32, &entry)?,
            }
        }
        info!(
            "booting {} by {}: {} MiB, {} vcpu(s), entry {:#x}{}",
            img.what,
            entry.protocol(),
            ram.size >> 20,
            self.vcpus.len(),
            entry.address(),
            if firmware { " through the firmware" } else { "" }
        );
        Ok(Loaded { v: self, rom })
    }

    /// Step 3 for a clone: every vCPU resumes from `state`.
    pub fn restore(self, state: &VcpuState) -> Result<Loaded, Error> {
        for v in &self.vcpus {
            state.restore(v).map_err(Error::kvm("restoring the vCPU in a clone"))?;
        }
        Ok(Loaded { v: self, rom: None })
    }
}

impl Loaded {
    pub fn ram(&self) -> &Arc<GuestRam> {
        self.v.ram()
    }

    /// The TSC frequency KVM gives vCPU 0 (0 if it does not say).
    pub fn tsc_khz(&self) -> u32 {
        self.v.vcpus.first().and_then(|v| v.get_tsc_khz().ok()).unwrap_or(0)
    }

    /// Step 4: the device bus (the hypercall port included), the run
    /// control, and the context every vCPU will own a copy of.
    pub fn devices(self, d: Devices) -> Result<Ready, Error> {
        let WithVcpus { m: WithMemory { b, ram }, vcpus } = self.v;
        let nr_vcpus = vcpus.len() as u32;
        let stats = Arc::new(Stats::default());
        let ids = VmIds { vm_id: b.vm_id, nr_vcpus, tsc_khz: d.tsc_khz };
        let bus = Arc::new(Bus::new(ram.clone(), d.console, d.tests.clone(), stats.clone(), ids));
        let ctl = Arc::new(Control::new(nr_vcpus).map_err(Error::io("eventfd"))?);
        let profile = d.profiling.then(|| Arc::new(Profile::new(nr_vcpus)));
        let ctx = VcpuContext { ram, bus, stats, ctl, cloner: d.cloner, profile };
        Ok(Ready { vm_fd: b.vm_fd, vm_id: b.vm_id, created: b.created, vcpus, ctx, tests: d.tests, rom: self.rom })
    }
}

impl Ready {
    /// The run control (to be told when the VM finishes, say).
    pub fn control(&self) -> &Arc<Control> {
        &self.ctx.ctl
    }

    /// Step 5: start the userfaultfd handler and the vCPU threads.
    pub fn start(self, uffd_poll: bool) -> Result<RunningVm, Error> {
        RunningVm::start(self, uffd_poll)
    }
}
