//! The vCPU loop: KVM_RUN, dispatch the exit, re-enter.

use crate::abi;
use crate::boot::firmware;
use crate::devices::{PioOut, COM1_BASE, COM1_END};
use crate::exit::Reason;
use crate::hypercall::{self, Action};
use crate::memory::{Access, GuestFault, Unresolved};
use crate::pmap::Delivery;
use crate::ratelimit;
use crate::vm::{Outcome, Shared};
use kvm_ioctls::{VcpuExit, VcpuFd};
use log::debug;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

pub fn run(shared: Arc<Shared>, mut vcpu: VcpuFd, id: u32) {
    let recorder = shared.profile.as_ref().and_then(|p| p.vcpus.get(id as usize));
    if let Some(slot) = shared.vcpus.get(id as usize) {
        // SAFETY: gettid has no side effects.
        slot.tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
    }
    // The gpa of the previous exit if it was KVM_EXIT_MEMORY_FAULT.
    let mut last_memory_fault = None;
    while !shared.finished() {
        let entered = recorder.map(|_| Instant::now());
        let result = vcpu.run();
        let returned = recorder.map(|_| Instant::now());
        let (reason, action) = match result {
            Ok(exit) => {
                let mf = match &exit {
                    VcpuExit::MemoryFault { gpa, .. } => Some(*gpa),
                    _ => None,
                };
                let again = mf.is_some() && mf == last_memory_fault;
                last_memory_fault = mf;
                handle_exit(&shared, id, exit, again)
            }
            // EAGAIN: KVM returns it once when an AP leaves wait-for-SIPI.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                shared.stats.exits.count(Reason::Interrupted);
                (Reason::Interrupted, inject_pending(&shared, id))
            }
            Err(e) if e.errno() == libc::EFAULT && shared.ram.view.delivery() == Delivery::Exit => (
                Reason::Other,
                Step::Stop(Outcome::Crash(format!(
                    "vcpu {id} touched an absent guest page from code KVM runs natively (ring 3 on this host) and \
                     KVM_RUN returned EFAULT without the address, so exit delivery cannot resolve it; use \
                     --fault-delivery uffd (exit delivery covers emulated accesses and KVM_EXIT_MEMORY_FAULT)"
                ))),
            ),
            Err(e) => (Reason::Other, Step::Stop(Outcome::Crash(format!("KVM_RUN failed on vcpu {id}: {e}")))),
        };
        if let (Some(rec), Some(t0), Some(t1)) = (recorder, entered, returned) {
            rec.lock().unwrap_or_else(|e| e.into_inner()).record(reason, t1 - t0, t1.elapsed());
        }
        match action {
            Step::Continue => {}
            Step::Stop(o) => {
                let o = match o {
                    Outcome::Crash(msg) if msg.starts_with("guest triple fault") => {
                        Outcome::Crash(format!("{msg}\n{}", dump_registers(&vcpu)))
                    }
                    Outcome::Crash(msg) if msg.starts_with("KVM internal error") => {
                        // SAFETY: kvm_run's `internal` member is the one KVM filled for this exit.
                        let (sub, data) = unsafe {
                            let i = &vcpu.get_kvm_run().__bindgen_anon_1.internal;
                            (i.suberror, i.data[..(i.ndata as usize).min(16)].to_vec())
                        };
                        Outcome::Crash(format!("{msg}: suberror {sub} data {data:x?}\n{}", dump_registers(&vcpu)))
                    }
                    o => o,
                };
                shared.finish(o);
                return;
            }
            Step::Park => {
                debug!("vcpu {id} parked");
                shared.park();
                return;
            }
            Step::Clone(block) => {
                use crate::clone::CloneError;
                let r = match &shared.clones {
                    Some(ctx) => ctx.spawn(&shared, &vcpu, block),
                    None => Err(CloneError::Refused(abi::EINVAL, "a clone cannot clone itself".into())),
                };
                let errno = match r {
                    Ok(()) => None,
                    // The guest learns through `ret`; the VM keeps running.
                    Err(CloneError::Refused(errno, why)) => {
                        crate::limited!(ratelimit::CLONE_REFUSED, "vcpu {id}: CLONE refused: {why}");
                        Some(errno)
                    }
                    // The host could not make it: the guest is told, and the
                    // run ends as a host failure (status 3).
                    Err(CloneError::Host(e)) => {
                        shared.finish(Outcome::Crash(format!("host failure during CLONE: {e}")));
                        Some(abi::ENOMEM)
                    }
                };
                if let Some(errno) = errno {
                    shared.stats.bad_hypercalls.fetch_add(1, Ordering::Relaxed);
                    let _ = shared.ram.write(block + 56, &(-errno).to_le_bytes());
                }
            }
            Step::Inject(f) => {
                crate::limited!(
                    ratelimit::REFUSED_ACCESS,
                    "vcpu {id}: {} at {:#x} refused ({}): #PF",
                    if f.write { "write" } else { "read" },
                    f.gpa,
                    f.error
                );
                if let Err(e) = inject_page_fault(&vcpu, f.gpa, f.write, shared.ram.pf_error_bits(&f)) {
                    shared.finish(Outcome::Crash(format!("cannot inject a page fault into vcpu {id}: {e}")));
                    return;
                }
            }
        }
    }
}

enum Step {
    Continue,
    Park,
    Stop(Outcome),
    /// Raise #PF for a refused access once the exit's borrow of the vCPU ends.
    Inject(GuestFault),
    /// Clone the VM from this vCPU's state (hypercall block at this address).
    Clone(u64),
}

/// `memory_fault_again`: this exit is KVM_EXIT_MEMORY_FAULT for the same
/// address as the exit just before it.
fn handle_exit(shared: &Shared, id: u32, exit: VcpuExit, memory_fault_again: bool) -> (Reason, Step) {
    let reason = Reason::of(&exit);
    shared.stats.exits.count(reason);
    let crash = |msg: String| Step::Stop(Outcome::Crash(msg));
    let step = match exit {
        VcpuExit::IoOut(port, data) => io_out(shared, id, port, data),
        VcpuExit::IoIn(port, data) => {
            io_in(shared, port, data);
            Step::Continue
        }
        VcpuExit::MmioRead(addr, data) if shared.ram.contains(addr, data.len()) => {
            guest_memory_exit(shared, addr, data, false)
        }
        VcpuExit::MmioWrite(addr, data) if shared.ram.contains(addr, data.len()) => {
            let mut buf = data.to_vec();
            guest_memory_exit(shared, addr, &mut buf, true)
        }
        VcpuExit::MemoryFault { gpa, size, .. } => memory_fault(shared, gpa, size.max(1), memory_fault_again),
        VcpuExit::MmioRead(addr, data) => {
            crate::limited!(
                ratelimit::UNBACKED,
                "vcpu {id}: read of {} bytes at unbacked address {addr:#x}",
                data.len()
            );
            data.fill(0xff);
            Step::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            crate::limited!(
                ratelimit::UNBACKED,
                "vcpu {id}: write of {} bytes to unbacked address {addr:#x} ignored",
                data.len()
            );
            Step::Continue
        }
        VcpuExit::Hlt => Step::Park,
        VcpuExit::Shutdown => crash(format!("guest triple fault (KVM_EXIT_SHUTDOWN) on vcpu {id}")),
        VcpuExit::FailEntry(why, cpu) => crash(format!(
            "KVM could not enter the guest on vcpu {id}: hardware entry failure reason {why:#x} (host cpu {cpu})"
        )),
        VcpuExit::InternalError => crash(format!("KVM internal error on vcpu {id} (emulation failure?)")),
        VcpuExit::SystemEvent(kind, _) => crash(format!("guest system event {kind} on vcpu {id}")),
        other => crash(format!("unexpected exit on vcpu {id}: {other:?}")),
    };
    (reason, step)
}

fn io_out(shared: &Shared, id: u32, port: u16, data: &[u8]) -> Step {
    match port {
        COM1_BASE..COM1_END => {
            shared.serial.write(port, data.first().copied().unwrap_or(0));
        }
        abi::HC_PORT if data.len() == 4 => {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            match hypercall::handle(shared, id, v) {
                Action::Continue => {}
                Action::Exit(s) => return Step::Stop(Outcome::Exit(s)),
                Action::Park => return Step::Park,
                Action::Clone(block) => return Step::Clone(block),
            }
        }
        abi::NULL_PORT => {}
        firmware::ERROR_PORT if data.len() == 4 => {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            match firmware::error_message(v) {
                Some(msg) => return Step::Stop(Outcome::Crash(msg)),
                None => crate::limited!(
                    ratelimit::FIRMWARE_PORT,
                    "vcpu {id}: firmware error port: {v:#x} is no firmware message"
                ),
            }
        }
        _ => match shared.pc.write(port, data) {
            PioOut::Done => {}
            PioOut::Exit(s) => return Step::Stop(Outcome::Exit(s)),
            PioOut::Unclaimed => {
                shared.stats.exits.unhandled_pio.fetch_add(1, Ordering::Relaxed);
                crate::limited!(ratelimit::UNCLAIMED_PORT, "vcpu {id}: write to unclaimed port {port:#x} ignored");
            }
        },
    }
    Step::Continue
}

fn io_in(shared: &Shared, port: u16, data: &mut [u8]) {
    match port {
        COM1_BASE..COM1_END => {
            let v = shared.serial.read(port);
            data.fill(0);
            data[0] = v;
        }
        abi::HC_PORT if data.len() == 4 => data.copy_from_slice(&abi::HC_PROBE_MAGIC.to_le_bytes()),
        _ if shared.pc.read(port, data) => {}
        _ => {
            shared.stats.exits.unhandled_pio.fetch_add(1, Ordering::Relaxed);
            data.fill(0xff);
        }
    }
}

/// Resolve the pages of `[gpa, gpa + len)` through the front door;
/// Some(step) if that failed (an exception for the guest, or a VM stop).
fn resolve_range(shared: &Shared, gpa: u64, len: u64, write: bool) -> Option<Step> {
    let ram = &shared.ram;
    let counted = || {
        ram.delivery.events.fetch_add(1, Ordering::Relaxed);
    };
    match ram.resolve_range(gpa, len, Access::of(write), counted) {
        Ok(()) => None,
        Err((page, Unresolved::Refused(error))) => {
            ram.delivery.guest_errors.fetch_add(1, Ordering::Relaxed);
            Some(Step::Inject(GuestFault { gpa: gpa.max(page), write, tid: 0, error }))
        }
        Err((_, Unresolved::Fatal(f))) => Some(Step::Stop(Outcome::Crash(f.to_string()))),
    }
}

/// KVM_EXIT_MEMORY_FAULT: KVM could not map these pages. The exit says
/// which pages but not how they were accessed (its flags carry only
/// KVM_MEMORY_EXIT_FLAG_PRIVATE; KVM defines no read/write/exec bits), so
/// the pages are brought in for read (a refusal is the guest's read fault),
/// then for write where the map allows it. A refused write is reported only
/// when the same address exits again at once: the access was then a write.
fn memory_fault(shared: &Shared, gpa: u64, len: u64, again: bool) -> Step {
    if let Some(step) = resolve_range(shared, gpa, len, false) {
        return step;
    }
    match resolve_range(shared, gpa, len, true) {
        Some(Step::Inject(_)) if !again => Step::Continue,
        Some(step) => step,
        None => Step::Continue,
    }
}

/// Exit delivery: an emulated guest access to an absent page of guest
/// memory came back as MMIO. Resolve the page(s), then complete the access
/// from/to the page through the pager (so KVM sees it done).
fn guest_memory_exit(shared: &Shared, gpa: u64, data: &mut [u8], write: bool) -> Step {
    if let Some(step) = resolve_range(shared, gpa, data.len() as u64, write) {
        return step;
    }
    let r = if write { shared.ram.write(gpa, data) } else { shared.ram.read(gpa, data) };
    match r {
        Ok(()) => Step::Continue,
        Err(e) => Step::Stop(Outcome::Crash(format!("cannot complete the guest access at {gpa:#x}: {e}"))),
    }
}

/// A refused access the fault handler left for this vCPU, to be raised as #PF.
fn inject_pending(shared: &Shared, id: u32) -> Step {
    let pending =
        shared.vcpus.get(id as usize).and_then(|s| s.pending.lock().unwrap_or_else(|e| e.into_inner()).take());
    pending.map_or(Step::Continue, Step::Inject)
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
