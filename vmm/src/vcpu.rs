//! The vCPU loop: KVM_RUN, dispatch the exit, re-enter.

use crate::abi;
use crate::devices::{PioOut, COM1_BASE, COM1_END};
use crate::exit::Reason;
use crate::hypercall::{self, Action};
use crate::vm::{Outcome, Shared};
use kvm_ioctls::{VcpuExit, VcpuFd};
use log::{debug, warn};
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub fn run(shared: Arc<Shared>, mut vcpu: VcpuFd, id: u32) {
    while !shared.finished() {
        let action = match vcpu.run() {
            Ok(exit) => handle_exit(&shared, id, exit),
            // EAGAIN: KVM returns it once when an AP leaves wait-for-SIPI.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                shared.stats.exits.count(Reason::Interrupted);
                Step::Continue
            }
            Err(e) => Step::Stop(Outcome::Crash(format!("KVM_RUN failed on vcpu {id}: {e}"))),
        };
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
        }
    }
}

enum Step {
    Continue,
    Park,
    Stop(Outcome),
}

fn handle_exit(shared: &Shared, id: u32, exit: VcpuExit) -> Step {
    let counts = &shared.stats.exits;
    match exit {
        VcpuExit::IoOut(port, data) => {
            counts.count(Reason::IoOut);
            io_out(shared, id, port, data)
        }
        VcpuExit::IoIn(port, data) => {
            counts.count(Reason::IoIn);
            io_in(shared, port, data);
            Step::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            counts.count(Reason::MmioRead);
            warn!("vcpu {id}: read of {} bytes at unbacked address {addr:#x}", data.len());
            data.fill(0xff);
            Step::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            counts.count(Reason::MmioWrite);
            warn!("vcpu {id}: write of {} bytes to unbacked address {addr:#x} ignored", data.len());
            Step::Continue
        }
        VcpuExit::Hlt => {
            counts.count(Reason::Hlt);
            Step::Park
        }
        VcpuExit::Shutdown => {
            counts.count(Reason::Shutdown);
            Step::Stop(Outcome::Crash(format!("guest triple fault (KVM_EXIT_SHUTDOWN) on vcpu {id}")))
        }
        VcpuExit::FailEntry(reason, cpu) => {
            counts.count(Reason::FailEntry);
            Step::Stop(Outcome::Crash(format!(
                "KVM could not enter the guest on vcpu {id}: hardware entry failure reason {reason:#x} (host cpu {cpu})"
            )))
        }
        VcpuExit::InternalError => {
            counts.count(Reason::InternalError);
            Step::Stop(Outcome::Crash(format!("KVM internal error on vcpu {id} (emulation failure?)")))
        }
        VcpuExit::SystemEvent(kind, _) => {
            counts.count(Reason::SystemEvent);
            Step::Stop(Outcome::Crash(format!("guest system event {kind} on vcpu {id}")))
        }
        other => {
            counts.count(Reason::Other);
            Step::Stop(Outcome::Crash(format!("unexpected exit on vcpu {id}: {other:?}")))
        }
    }
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
            }
        }
        abi::NULL_PORT => {}
        _ => match shared.pc.write(port, data) {
            PioOut::Done => {}
            PioOut::Exit(s) => return Step::Stop(Outcome::Exit(s)),
            PioOut::Unclaimed => {
                shared.stats.exits.unhandled_pio.fetch_add(1, Ordering::Relaxed);
                debug!("vcpu {id}: write to unclaimed port {port:#x} ignored");
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
