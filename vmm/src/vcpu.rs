//! A vCPU: its thread's loop over `KVM_RUN`, and its run state. The exit
//! goes to its handler (`dispatch.rs`); what needs the vCPU itself happens
//! here (inject #PF, read registers, clone, park); before entering the
//! guest it stops at a checkpoint when the VM is being paused or has ended
//! (`control.rs`). A parked vCPU keeps its thread: it waits, answering
//! state requests, until the VM ends.

use crate::abi;
use crate::control::{Checkpoint, Control, Reply, Request};
use crate::devices::{Bus, Hypercall};
use crate::dispatch::{Exit, ExitHandler, Next, Stop};
use crate::error::Error;
use crate::kvm::{Kick, VcpuState};
use crate::memory::{GuestFault, GuestRam};
use crate::outcome::Outcome;
use crate::profile::Profile;
use crate::ratelimit;
use crate::stats::Stats;
use kvm_ioctls::VcpuFd;
use log::debug;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Why a CLONE failed.
pub enum CloneError {
    /// The guest's doing (a limit, a multi-vCPU VM): -errno, the VM runs on.
    Refused(i64, String),
    /// The host could not make the clone: -ENOMEM, then the run ends (status 3).
    Host(Error),
}

impl From<Error> for CloneError {
    fn from(e: Error) -> CloneError {
        CloneError::Host(e)
    }
}

/// Makes VM clones for the CLONE hypercall (`clone.rs`).
pub trait Cloner: Send + Sync {
    /// Clone the VM whose hypercall device is `parent` from `vcpu` (its
    /// only vCPU, stopped in the call); `block` is the call's block.
    fn clone_vm(&self, parent: &Hypercall, vcpu: &VcpuFd, block: u64) -> Result<(), CloneError>;
}

/// What every vCPU of one VM shares: guest memory, the device bus (the
/// hypercall port included), the run control, and what CLONE and the
/// profiler need.
#[derive(Clone)]
pub struct VcpuContext {
    pub ram: Arc<GuestRam>,
    pub bus: Arc<Bus>,
    pub stats: Arc<Stats>,
    pub ctl: Arc<Control>,
    /// None in a clone (a clone cannot clone itself).
    pub cloner: Option<Arc<dyn Cloner>>,
    pub profile: Option<Arc<Profile>>,
}

/// One vCPU, owned by its thread.
pub struct Vcpu {
    id: u32,
    fd: VcpuFd,
    exits: ExitHandler,
    ctx: VcpuContext,
}

/// A request from another thread, answered by the vCPU's own thread.
fn serve(fd: &VcpuFd, r: Request) -> Reply {
    match r {
        Request::Capture => VcpuState::save(fd).map(Box::new).map_err(|e| e.to_string()),
    }
}

impl Vcpu {
    pub fn new(id: u32, fd: VcpuFd, ctx: &VcpuContext) -> Vcpu {
        let exits = ExitHandler::new(id, ctx.ram.clone(), ctx.bus.clone(), ctx.stats.clone());
        Vcpu { id, fd, exits, ctx: ctx.clone() }
    }

    /// The thread's body: run until the VM ends.
    pub fn run(mut self) {
        let kick = Kick::attach(&mut self.fd);
        self.ctx.ctl.attach(self.id);
        self.run_loop(&kick);
        drop(kick);
        self.ctx.ctl.detach(self.id);
    }

    fn run_loop(&mut self, kick: &Kick) {
        let profile = self.ctx.profile.clone();
        let recorder = profile.as_ref().and_then(|p| p.vcpus.get(self.id as usize));
        // The last KVM_RUN left no access half done (it was interrupted).
        let mut whole = true;
        loop {
            if self.ctx.ctl.attention() {
                let (id, fd) = (self.id, &self.fd);
                match self.ctx.ctl.checkpoint(id, whole, &mut |r| serve(fd, r)) {
                    Checkpoint::Quit => return,
                    Checkpoint::CompleteFirst => kick.request_exit(),
                    Checkpoint::Run => {}
                }
            }
            let entered = recorder.map(|_| Instant::now());
            let gen = self.ctx.ram.view.remap_gen();
            let exit = Exit::of(self.fd.run());
            if matches!(exit, Exit::Failed(libc::EFAULT)) && self.ctx.ram.view.remapped_since(gen) {
                // The guest touched a range the pmap was remapping: retry.
                continue;
            }
            let returned = recorder.map(|_| Instant::now());
            whole = matches!(exit, Exit::Interrupted);
            if whole {
                // Before anything else: a kick after this is not lost.
                kick.clear();
            }
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
            Next::Interrupted => match self.ctx.ctl.take_pending(self.id) {
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
                let (id, fd) = (self.id, &self.fd);
                self.ctx.ctl.park(id, &mut |r| serve(fd, r));
                false
            }
            Next::Stop(stop) => {
                let o = self.outcome(stop);
                self.ctx.ctl.finish(o);
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

    /// Raise #PF for a refused access; false if that failed (the VM stops).
    fn inject(&mut self, f: GuestFault) -> bool {
        let id = self.id;
        let rw = if f.write { "write" } else { "read" };
        crate::limited!(ratelimit::REFUSED_ACCESS, "vcpu {id}: {rw} at {:#x} refused ({}): #PF", f.gpa, f.error);
        if let Err(e) = inject_page_fault(&self.fd, f.gpa, f.write, self.ctx.ram.pf_error_bits(&f)) {
            self.ctx.ctl.finish(Outcome::Crash(format!("cannot inject a page fault into vcpu {id}: {e}")));
            return false;
        }
        true
    }

    /// CLONE from this vCPU; a refusal or a host failure is the guest's
    /// answer in `ret` (and a host failure ends the run).
    fn clone_vm(&mut self, block: u64) {
        let ctx = &self.ctx;
        let r = match &ctx.cloner {
            Some(c) => c.clone_vm(&ctx.bus.hypercall, &self.fd, block),
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
                ctx.ctl.finish(Outcome::Crash(format!("host failure during CLONE: {e}")));
                abi::ENOMEM
            }
        };
        ctx.stats.bad_hypercalls.fetch_add(1, Ordering::Relaxed);
        let _ = Hypercall::answer(&ctx.ram, block, -errno);
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
