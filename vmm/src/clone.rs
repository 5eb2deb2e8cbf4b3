//! VM clones (`CLONE` hypercall, `--clones N`): each clone is a new KVM VM
//! whose memory is a copy-on-write fork of the parent's pager map and whose
//! vCPU resumes from the parent's state at the hypercall. The hypercall
//! returns 0 in the parent and the clone's number (1..) in each clone.
//! Nothing is copied: clone time depends on the map's entries and on
//! write-protecting the parent's present pages, not on guest memory size.

use crate::cli::RunArgs;
use crate::error::Error;
use crate::vm::{self, Outcome, Shared};
use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a VM needs to clone itself, and the clones it made.
pub struct CloneCtx {
    kvm_device: PathBuf,
    cpuid: CpuId,
    /// Clones per CLONE hypercall.
    per_call: u32,
    uffd_poll: bool,
    next_id: AtomicU32,
    children: Mutex<Vec<Child>>,
    stop_faults: Arc<AtomicBool>,
}

struct Child {
    shared: Arc<Shared>,
    /// From CLONE to the clone's vCPU thread starting.
    clone_time: Duration,
    /// From CLONE to the parent being write-protected (it resumes then).
    parent_pause: Duration,
    /// Guest bytes the parent had resident when it was cloned.
    resident_bytes: u64,
}

/// The calling vCPU's state at the hypercall.
struct VcpuState {
    regs: kvm_bindings::kvm_regs,
    sregs: kvm_bindings::kvm_sregs,
    fpu: kvm_bindings::kvm_fpu,
    lapic: Option<kvm_bindings::kvm_lapic_state>,
    xcrs: Option<kvm_bindings::kvm_xcrs>,
}

impl VcpuState {
    fn save(v: &VcpuFd) -> Result<VcpuState, kvm_ioctls::Error> {
        Ok(VcpuState {
            regs: v.get_regs()?,
            sregs: v.get_sregs()?,
            fpu: v.get_fpu()?,
            lapic: v.get_lapic().ok(),
            xcrs: v.get_xcrs().ok(),
        })
    }
    fn restore(&self, v: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
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

/// Console of clone `k`: every line prefixed so outputs can be told apart.
struct Prefixed {
    prefix: String,
    at_start: bool,
}

impl Write for Prefixed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        for line in buf.split_inclusive(|&c| c == b'\n') {
            if self.at_start {
                out.write_all(self.prefix.as_bytes())?;
            }
            out.write_all(line)?;
            self.at_start = line.ends_with(b"\n");
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

impl CloneCtx {
    pub fn new(args: &RunArgs, cpuid: &CpuId) -> CloneCtx {
        CloneCtx {
            kvm_device: args.kvm_device.clone(),
            cpuid: cpuid.clone(),
            per_call: args.clones.max(1),
            uffd_poll: args.uffd_poll,
            next_id: AtomicU32::new(1),
            children: Mutex::new(Vec::new()),
            stop_faults: Arc::new(AtomicBool::new(false)),
        }
    }

    /// CLONE from `parent`'s vCPU `vcpu` (the only one): make `per_call`
    /// clones. `block` is the hypercall block, where each clone finds its number.
    pub fn spawn(&self, parent: &Arc<Shared>, vcpu: &VcpuFd, block: u64) -> Result<(), Error> {
        if parent.nr_vcpus != 1 {
            return Err(Error::Config("CLONE needs a single-vCPU VM".into()));
        }
        let state = VcpuState::save(vcpu).map_err(Error::kvm("saving the vCPU for a clone"))?;
        let kvm = vm::open_kvm(&self.kvm_device)?;
        for _ in 0..self.per_call {
            let t0 = Instant::now();
            let resident_bytes = parent.ram.view.present_count() as u64 * 4096;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let ram = Arc::new(parent.ram.fork()?);
            let vm_fd = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM for a clone"))?;
            vm::register_memory(&vm_fd, &ram)?;
            vm::create_irqchip(&vm_fd)?;
            let v = vm_fd.create_vcpu(0).map_err(Error::kvm("KVM_CREATE_VCPU for a clone"))?;
            v.set_cpuid2(&self.cpuid).map_err(Error::kvm("KVM_SET_CPUID2"))?;
            state.restore(&v).map_err(Error::kvm("restoring the vCPU in a clone"))?;
            ram.write(block + 56, &i64::from(id).to_le_bytes())
                .map_err(|e| Error::Crash(format!("cannot answer CLONE in clone {id}: {e}")))?;
            let shared = Arc::new(Shared::new(
                ram,
                1,
                parent.tsc_khz,
                Box::new(Prefixed { prefix: format!("[clone {id}] "), at_start: true }),
                parent.tests.clone(),
                id,
                None,
                None,
                None,
            )?);
            vm::start_threads(&shared, vec![v], &self.stop_faults, self.uffd_poll)?;
            let clone_time = t0.elapsed();
            parent.ram.view.run_deferred();
            let parent_pause = t0.elapsed();
            crate::limited!(
                crate::ratelimit::CLONE_MADE,
                "clone {id}: running after {:.3} ms; parent resumes after {:.3} ms (write-protecting {} MiB)",
                clone_time.as_secs_f64() * 1e3,
                parent_pause.as_secs_f64() * 1e3,
                resident_bytes >> 20
            );
            // The VM lives as long as the process; its vCPU thread holds its own fd.
            std::mem::forget(vm_fd);
            let child = Child { shared, clone_time, parent_pause, resident_bytes };
            self.children.lock().unwrap_or_else(|e| e.into_inner()).push(child);
        }
        Ok(())
    }

    /// Wait (within the run's timeout) for every clone to stop; the run's
    /// outcome is the parent's unless it passed and a clone did not.
    pub fn wait_all(&self, parent: Outcome, started: Instant, timeout: Option<f64>) -> Outcome {
        let deadline = timeout.map(|t| started + Duration::from_secs_f64(t));
        let mut outcome = parent;
        let children: Vec<Arc<Shared>> =
            self.children.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|c| c.shared.clone()).collect();
        for c in children {
            let o = loop {
                if let Some(o) = c.outcome() {
                    break o;
                }
                if deadline.is_some_and(|d| Instant::now() > d) {
                    let o = Outcome::Crash(format!("clone {} did not exit within the --timeout; stopped it", c.vm_id));
                    c.finish(o.clone());
                    break o;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            outcome = match (outcome, o) {
                (Outcome::Exit(0), Outcome::Exit(s)) => Outcome::Exit(s),
                (Outcome::Exit(_), Outcome::Crash(m)) => Outcome::Crash(format!("clone {}: {m}", c.vm_id)),
                (o, _) => o,
            };
        }
        self.stop_faults.store(true, Ordering::Relaxed);
        outcome
    }

    /// The `clones` array of `--stats-json`.
    pub fn stats_json(&self) -> Value {
        let children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        Value::Array(
            children
                .iter()
                .map(|c| {
                    json!({
                        "id": c.shared.vm_id,
                        "clone_ms": c.clone_time.as_secs_f64() * 1e3,
                        "parent_pause_ms": c.parent_pause.as_secs_f64() * 1e3,
                        "parent_resident_bytes": c.resident_bytes,
                        "outcome": match c.shared.outcome() {
                            Some(Outcome::Exit(s)) => json!({ "exit_status": s }),
                            Some(Outcome::Crash(m)) => json!({ "crash": m }),
                            None => Value::Null,
                        },
                        "faults": vm::fault_stats(&c.shared),
                    })
                })
                .collect(),
        )
    }
}
