//! The vCPU loop: KVM_RUN, hand the exit to its handler (`dispatch.rs`),
//! do what needs the vCPU itself (inject #PF, read registers, clone),
//! re-enter.

use crate::abi;
use crate::dispatch::{Exit, ExitHandler, Next, Stop};
use crate::memory::GuestFault;
use crate::ratelimit;
use crate::vm::{Outcome, Shared};
use kvm_ioctls::VcpuFd;
use log::debug;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

pub fn run(shared: Arc<Shared>, fd: VcpuFd, id: u32) {
    let exits = ExitHandler::new(id, shared.ram.clone(), shared.bus.clone(), shared.stats.clone());
    Vcpu { id, fd, exits, shared }.run();
}

/// One vCPU, owned by its thread.
struct Vcpu {
    id: u32,
    fd: VcpuFd,
    exits: ExitHandler,
    shared: Arc<Shared>,
}

impl Vcpu {
    fn run(&mut self) {
        let shared = self.shared.clone();
        let recorder = shared.profile.as_ref().and_then(|p| p.vcpus.get(self.id as usize));
        if let Some(slot) = shared.vcpus.get(self.id as usize) {
            // SAFETY: gettid has no side effects.
            slot.tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
        }
        while !shared.finished() {
            let entered = recorder.map(|_| Instant::now());
            let exit = Exit::of(self.fd.run());
            let returned = recorder.map(|_| Instant::now());
            let (reason, next) = self.exits.handle(exit);
            if let (Some(rec), Some(t0), Some(t1)) = (recorder, entered, returned) {
                rec.lock().unwrap_or_else(|e| e.into_inner()).record(reason, t1 - t0, t1.elapsed());
            }
            if !self.apply(next) {
                return;
            }
        }
    }

    /// Carry out the next step; false when this vCPU stops running.
    fn apply(&mut self, next: Next) -> bool {
        match next {
            Next::Continue => true,
            Next::Interrupted => match self.pending() {
                Some(f) => self.inject(f),
                None => true,
            },
            Next::Inject(f) => self.inject(f),
            Next::Clone { block } => {
                self.clone_vm(block);
                true
            }
            Next::Park => {
                debug!("vcpu {} parked", self.id);
                self.shared.park();
                false
            }
            Next::Stop(stop) => {
                let o = self.outcome(stop);
                self.shared.finish(o);
                false
            }
        }
    }

    /// The VM's outcome for a stop, with the registers where they help.
    fn outcome(&mut self, stop: Stop) -> Outcome {
        let vcpu = self.id;
        match stop {
            Stop::Exit(s) => Outcome::Exit(s),
            Stop::Crash(msg) => Outcome::Crash(msg),
            Stop::TripleFault => Outcome::TripleFault { vcpu, registers: dump_registers(&self.fd) },
            Stop::KvmInternal => {
                // SAFETY: kvm_run's `internal` member is the one KVM filled for this exit.
                let (suberror, data) = unsafe {
                    let i = &self.fd.get_kvm_run().__bindgen_anon_1.internal;
                    (i.suberror, i.data[..(i.ndata as usize).min(16)].to_vec())
                };
                Outcome::KvmInternal { vcpu, suberror, data, registers: dump_registers(&self.fd) }
            }
        }
    }

    /// A refused access the fault handler left for this vCPU.
    fn pending(&self) -> Option<GuestFault> {
        let slot = self.shared.vcpus.get(self.id as usize)?;
        slot.pending.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Raise #PF for a refused access; false if that failed (the VM stops).
    fn inject(&mut self, f: GuestFault) -> bool {
        let id = self.id;
        let rw = if f.write { "write" } else { "read" };
        crate::limited!(ratelimit::REFUSED_ACCESS, "vcpu {id}: {rw} at {:#x} refused ({}): #PF", f.gpa, f.error);
        if let Err(e) = inject_page_fault(&self.fd, f.gpa, f.write, self.shared.ram.pf_error_bits(&f)) {
            self.shared.finish(Outcome::Crash(format!("cannot inject a page fault into vcpu {id}: {e}")));
            return false;
        }
        true
    }

    /// CLONE from this vCPU; a refusal or a host failure is the guest's
    /// answer in `ret` (and a host failure ends the run).
    fn clone_vm(&mut self, block: u64) {
        use crate::clone::CloneError;
        let shared = &self.shared;
        let r = match &shared.clones {
            Some(ctx) => ctx.spawn(shared, &self.fd, block),
            None => Err(CloneError::Refused(abi::EINVAL, "a clone cannot clone itself".into())),
        };
        let errno = match r {
            Ok(()) => return,
            // The guest learns through `ret`; the VM keeps running.
            Err(CloneError::Refused(errno, why)) => {
                crate::limited!(ratelimit::CLONE_REFUSED, "vcpu {}: CLONE refused: {why}", self.id);
                errno
            }
            // The host could not make it: the guest is told, and the run
            // ends as a host failure (status 3).
            Err(CloneError::Host(e)) => {
                shared.finish(Outcome::Crash(format!("host failure during CLONE: {e}")));
                abi::ENOMEM
            }
        };
        shared.stats.bad_hypercalls.fetch_add(1, Ordering::Relaxed);
        let _ = crate::devices::Hypercall::answer(&shared.ram, block, -errno);
    }
}

/// Raise #PF in the guest for an access to `gpa` the VM map refused. The
/// guest sees the address in CR2 (guest-physical: vkvm does not know the
/// virtual address; for an identity-mapped guest they are the same) and an
/// error code with P=1 (a protection fault, not a missing page) and W, U set
/// as the access was, plus `extra` (RSVD for a vpte frame out of bounds).
pub fn inject_page_fault(vcpu: &VcpuFd, gpa: u64, write: bool, extra: u32) -> Result<(), kvm_ioctls::Error> {
    let mut sregs = vcpu.get_sregs()?;
    sregs.cr2 = gpa;
    let user = sregs.cs.dpl == 3;
    vcpu.set_sregs(&sregs)?;
    let mut ev = vcpu.get_vcpu_events()?;
    ev.exception.injected = 1;
    ev.exception.nr = 14;
    ev.exception.has_error_code = 1;
    ev.exception.error_code = 1 | (u32::from(write) << 1) | (u32::from(user) << 2) | extra;
    vcpu.set_vcpu_events(&ev)
}

fn dump_registers(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "  rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x}\n  \
             cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} (dpl {})",
            r.rip,
            r.rsp,
            r.rflags,
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer,
            s.cs.selector,
            s.cs.dpl
        ),
        _ => "  (registers unavailable)".into(),
    }
}
