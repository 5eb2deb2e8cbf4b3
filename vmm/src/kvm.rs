//! KVM itself, below the VM: opening the device (with advice when that
//! fails), a VM's memory slots and interrupt controllers, a vCPU's CPUID,
//! its saved state, and the kick that gets a vCPU thread out of `KVM_RUN`.

use crate::error::Error;
use crate::memory::GuestRam;
use kvm_bindings::{kvm_run, kvm_userspace_memory_region, CpuId};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use log::warn;
use std::cell::Cell;
use std::ffi::CString;
use std::path::Path;

/// Open the KVM device with advice on the usual failures.
pub fn open(path: &Path) -> Result<Kvm, Error> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Kvm(format!("{} is not a valid path", path.display())))?;
    let kvm = Kvm::new_with_path(&c).map_err(|e| match e.errno() {
        // The host is out of descriptors or memory: not the user's to fix.
        libc::EMFILE | libc::ENFILE | libc::ENOMEM => Error::Crash(format!("cannot open {}: {e}", path.display())),
        errno => Error::Kvm(open_error(path, errno)),
    })?;
    match kvm.get_api_version() {
        12 => Ok(kvm),
        v => Err(Error::Kvm(format!(
            "{} is not a KVM device (KVM_GET_API_VERSION answered {v}, expected 12)",
            path.display()
        ))),
    }
}

/// Advice for the usual reasons opening the KVM device fails.
fn open_error(path: &Path, errno: i32) -> String {
    let p = path.display();
    match errno {
        libc::ENOENT => {
            format!("{p} does not exist: load KVM (modprobe kvm_intel or kvm_amd) on a host with virtualization enabled")
        }
        libc::EACCES | libc::EPERM => format!(
            "permission denied on {p}: add yourself to the kvm group (usermod -aG kvm $USER, then log in again) or run as root"
        ),
        e => format!("{p}: {}", std::io::Error::from_raw_os_error(e)),
    }
}

/// KVM's vCPU limit, for the message about a bad `--vcpus` (None if the
/// device cannot be opened: the message then says so in words).
pub fn host_max_vcpus(path: &Path) -> Option<u32> {
    open(path).ok().map(|k| k.get_max_vcpus() as u32)
}

/// One memory slot per backed range of guest memory.
pub fn register_memory(vm: &VmFd, ram: &GuestRam) -> Result<(), Error> {
    for (slot, (gpa, len, _)) in ram.regions().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: ram.view.host_addr() + gpa,
        };
        // SAFETY: the view stays mapped for as long as the VM exists (the
        // VM holds its guest memory until its vCPU threads have ended).
        unsafe { vm.set_user_memory_region(r) }.map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// KVM's in-kernel PC interrupt controllers (LAPIC per vCPU, IOAPIC, PIC)
/// and PIT, before any vCPU exists: the LAPIC is what lets a kernel start
/// its APs by INIT/SIPI. Without a PIT nothing is lost but a timer a
/// kernel might calibrate against, so its failure only warns.
pub fn create_irqchip(vm: &VmFd) -> Result<(), Error> {
    vm.create_irq_chip().map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_bindings::kvm_pit_config::default();
    if let Err(e) = vm.create_pit2(pit) {
        warn!("no in-kernel PIT (KVM_CREATE_PIT2: {e}); continuing without one");
    }
    Ok(())
}

/// The supported CPUID with vCPU `id`'s APIC ids in leaves 1, 0xb and 0x1f.
pub fn cpuid_for(supported: &CpuId, id: u32) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24),
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
    c
}

/// A vCPU's architectural state, as a clone resumes from it and as a
/// paused VM hands it out (`Control::capture`).
#[derive(Clone, Debug, Default)]
pub struct VcpuState {
    pub regs: kvm_bindings::kvm_regs,
    pub sregs: kvm_bindings::kvm_sregs,
    pub fpu: kvm_bindings::kvm_fpu,
    pub lapic: Option<kvm_bindings::kvm_lapic_state>,
    pub xcrs: Option<kvm_bindings::kvm_xcrs>,
    /// Runnable, halted, waiting for SIPI, ... (not restored in a clone:
    /// its one vCPU is running; read by the state capture's callers).
    #[cfg_attr(not(test), allow(dead_code))]
    pub mp_state: Option<kvm_bindings::kvm_mp_state>,
}

impl VcpuState {
    pub fn save(v: &VcpuFd) -> Result<VcpuState, kvm_ioctls::Error> {
        Ok(VcpuState {
            regs: v.get_regs()?,
            sregs: v.get_sregs()?,
            fpu: v.get_fpu()?,
            lapic: v.get_lapic().ok(),
            xcrs: v.get_xcrs().ok(),
            mp_state: v.get_mp_state().ok(),
        })
    }

    pub fn restore(&self, v: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
        v.set_sregs(&self.sregs)?;
        v.set_regs(&self.regs)?;
        v.set_fpu(&self.fpu)?;
        if let Some(l) = &self.lapic {
            v.set_lapic(l)?;
        }
        if let Some(x) = &self.xcrs {
            v.set_xcrs(x)?;
        }
        Ok(())
    }
}

/// Real-time signal that kicks a vCPU thread out of `KVM_RUN` (or a
/// userfaultfd wait inside it).
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

thread_local! {
    /// This thread's vCPU's `kvm_run`, while it runs one (see [`Kick`]).
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick's handler: set `immediate_exit` in the kicked thread's
/// `kvm_run`, so that a kick landing just before `KVM_RUN` is not lost
/// (KVM returns EINTR at once). A plain store: async-signal-safe.
extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|c| c.get());
    if !run.is_null() {
        // SAFETY: set by `Kick::attach` on this very thread and cleared
        // before its vCPU's kvm_run is unmapped.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Install the kick's handler (once per process; again is harmless).
pub fn install_kick() -> Result<(), Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| Error::Crash(format!("cannot install the vCPU kick signal handler: {e}")))
}

/// Send the kick to thread `tid` of this process.
pub fn kick(tid: i32) {
    if tid > 0 {
        // SAFETY: signalling one of our own threads; its handler only sets a flag.
        unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, kick_signal()) };
    }
}

/// A vCPU thread's side of the kick: while it lives, a kick to this thread
/// sets its vCPU's `immediate_exit`. Dropped before the vCPU is; it stays
/// on its thread (not `Send`).
pub struct Kick(std::marker::PhantomData<*const ()>);

impl Kick {
    pub fn attach(vcpu: &mut VcpuFd) -> Kick {
        let run: *mut kvm_run = vcpu.get_kvm_run();
        KVM_RUN.with(|c| c.set(run));
        Kick(std::marker::PhantomData)
    }

    /// Clear `immediate_exit` after a kick was taken (KVM returned EINTR).
    pub fn clear(&self) {
        Self::set(0);
    }

    /// Make the next `KVM_RUN` return at once (after completing a pending
    /// I/O or MMIO access, so the vCPU's state is whole).
    pub fn request_exit(&self) {
        Self::set(1);
    }

    fn set(v: u8) {
        let run = KVM_RUN.with(|c| c.get());
        // SAFETY: `run` is this thread's vCPU's kvm_run (attach); the
        // compiler fence orders it against the signal handler's store.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(v) };
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Kick {
    fn drop(&mut self) {
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn kvm_open_errors_say_how_to_fix() {
        let p = Path::new("/dev/kvm");
        assert!(open_error(p, libc::ENOENT).contains("modprobe"));
        assert!(open_error(p, libc::EACCES).contains("kvm group"));
        assert!(open_error(p, libc::EIO).contains("/dev/kvm"));
    }
}
