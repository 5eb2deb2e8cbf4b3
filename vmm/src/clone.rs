//! VM clones (`CLONE` hypercall, `--clones N`): each clone is a new KVM VM
//! whose memory is a copy-on-write fork of the parent's pager map and whose
//! vCPU resumes from the parent's state at the hypercall. The hypercall
//! returns 0 in the parent and the clone's number (1..) in each clone.
//! Nothing is copied: clone time depends on the map's entries and on
//! write-protecting the parent's present pages, not on guest memory size.
//!
//! A guest cannot exhaust the host with clones: at most `--max-clones` are
//! alive at once (a CLONE beyond gets -EAGAIN and the VM runs on), and a
//! clone that exits is reclaimed at once by a reaper thread (its vCPU and
//! userfaultfd threads joined, its VM fd closed, its view unmapped and its
//! pager map dropped, so its frames go back). A host failure while cloning
//! (out of fds, threads or memory) answers the guest -ENOMEM and ends the
//! run with status 3. `--stats-json` keeps a record of the first
//! [`MAX_RECORDS`] clones and counts the rest.

use crate::abi;
use crate::cli::RunArgs;
use crate::devices::Hypercall;
use crate::error::Error;
use crate::kvm::{self, VcpuState};
use crate::outcome::Outcome;
use crate::vcpu::{CloneError, Cloner};
use crate::vm::{self, Deadline, Devices, RunningVm};
use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// Clones described one by one in `--stats-json`; the rest are counted.
pub const MAX_RECORDS: usize = 256;
/// Reaper threads: closing a KVM VM takes 1-25 ms here (the kernel waits
/// for RCU grace periods), so clones are reclaimed a few at a time.
const REAPERS: usize = 4;

/// What a VM needs to clone itself, the clones alive, and what they did.
pub struct CloneCtx {
    kvm_device: PathBuf,
    cpuid: CpuId,
    /// Clones per CLONE hypercall.
    per_call: u32,
    max_alive: u32,
    uffd_poll: bool,
    next_id: AtomicU32,
    st: Mutex<State>,
    /// Signalled when a clone finishes (for the reaper) and when one has
    /// been reclaimed (for `wait_all`).
    cv: Condvar,
    reapers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// This context itself, for the reapers and the clones' callbacks.
    me: Weak<CloneCtx>,
}

#[derive(Default)]
struct State {
    /// Clones not yet reclaimed (running, or finished and waiting for a reaper).
    live: Vec<RunningVm>,
    /// Clones a reaper is reclaiming now (they still count against the cap).
    reclaiming: usize,
    records: Vec<Record>,
    made: u64,
    refused: u64,
    peak_alive: usize,
    /// The first clone that crashed, and the first that exited non-zero.
    crashed: Option<(u32, String)>,
    failed: Option<u64>,
    /// Bytes in the frame pool just before a clone's memory went back: the
    /// most the VMs held together (read at each reclaim).
    pool_peak: u64,
    /// `wait_all` is done: the reapers end once `live` is empty.
    closing: bool,
}

/// One clone, as `--stats-json` shows it.
struct Record {
    id: u32,
    /// From CLONE to the clone's vCPU thread starting.
    clone_time: Duration,
    /// From CLONE to the parent being write-protected (it resumes then).
    parent_pause: Duration,
    /// Guest bytes the parent had resident when it was cloned.
    resident_bytes: u64,
    outcome: Option<Outcome>,
    faults: Value,
}

/// Runs the parent's deferred write-protection (see `GuestRam::fork`) when
/// dropped, so that no return path of a CLONE leaves the parent writable
/// over pages it now shares.
struct ParentProtect<'a>(&'a crate::pmap::View);

impl Drop for ParentProtect<'_> {
    fn drop(&mut self) {
        self.0.run_deferred();
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

impl Cloner for CloneCtx {
    fn clone_vm(&self, parent: &Hypercall, vcpu: &VcpuFd, block: u64) -> Result<(), CloneError> {
        // The context lives as long as the VM that can call CLONE.
        let me = self.me.upgrade().ok_or_else(|| CloneError::Refused(abi::EAGAIN, "the run is ending".into()))?;
        me.spawn(parent, vcpu, block)
    }
}

impl CloneCtx {
    pub fn new(args: &RunArgs, cpuid: &CpuId) -> Arc<CloneCtx> {
        Arc::new_cyclic(|me| CloneCtx {
            kvm_device: args.kvm_device.clone(),
            cpuid: cpuid.clone(),
            per_call: args.clones.max(1),
            max_alive: args.max_clones.max(1),
            uffd_poll: args.uffd_poll,
            next_id: AtomicU32::new(1),
            st: Mutex::new(State::default()),
            cv: Condvar::new(),
            reapers: Mutex::new(Vec::new()),
            me: me.clone(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// CLONE from `parent`'s vCPU `vcpu` (the only one): make `per_call`
    /// clones. `block` is the hypercall block, where each clone finds its number.
    fn spawn(self: &Arc<Self>, parent: &Hypercall, vcpu: &VcpuFd, block: u64) -> Result<(), CloneError> {
        if parent.nr_vcpus != 1 {
            return Err(CloneError::Refused(abi::EINVAL, "CLONE needs a single-vCPU VM".into()));
        }
        {
            let mut st = self.state();
            let alive = st.live.len() + st.reclaiming;
            if st.closing || alive + self.per_call as usize > self.max_alive as usize {
                st.refused += 1;
                return Err(CloneError::Refused(
                    abi::EAGAIN,
                    format!("{alive} clones are alive and --max-clones is {}", self.max_alive),
                ));
            }
        }
        self.start_reapers()?;
        let state = VcpuState::save(vcpu).map_err(Error::kvm("saving the vCPU for a clone"))?;
        let kvm = kvm::open(&self.kvm_device)?;
        for _ in 0..self.per_call {
            self.spawn_one(parent, &kvm, &state, block)?;
        }
        Ok(())
    }

    fn spawn_one(
        self: &Arc<Self>,
        parent: &Hypercall,
        kvm: &kvm_ioctls::Kvm,
        state: &VcpuState,
        block: u64,
    ) -> Result<(), Error> {
        let t0 = Instant::now();
        let resident_bytes = parent.ram.view.present_count() as u64 * 4096;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ram = Arc::new(parent.ram.fork()?);
        // From here the parent's write-protection is deferred: it must run
        // on every way out, a failure included.
        let protect = ParentProtect(&parent.ram.view);
        let loaded =
            vm::Builder::new(kvm, id)?.memory(ram)?.vcpus(std::slice::from_ref(&self.cpuid))?.restore(state)?;
        Hypercall::answer(loaded.ram(), block, i64::from(id))
            .map_err(|e| Error::Crash(format!("cannot answer CLONE in clone {id}: {e}")))?;
        let devices = Devices {
            console: Box::new(Prefixed { prefix: format!("[clone {id}] "), at_start: true }),
            tests: parent.tests.clone(),
            tsc_khz: parent.tsc_khz,
            cloner: None,
            profiling: false,
        };
        let ready = loaded.devices(devices)?;
        // Wake the reaper when this clone finishes. A weak reference: the
        // context must not be kept alive by its own clones.
        let ctx = Arc::downgrade(self);
        ready.control().set_on_finish(Box::new(move || {
            if let Some(c) = ctx.upgrade() {
                let _st = c.state();
                c.cv.notify_all();
            }
        }));
        let vm = ready.start(self.uffd_poll)?;
        let clone_time = t0.elapsed();
        drop(protect);
        let parent_pause = t0.elapsed();
        crate::limited!(
            crate::ratelimit::CLONE_MADE,
            "clone {id}: running after {:.3} ms; parent resumes after {:.3} ms (write-protecting {} MiB)",
            clone_time.as_secs_f64() * 1e3,
            parent_pause.as_secs_f64() * 1e3,
            resident_bytes >> 20
        );
        let mut st = self.state();
        if st.closing {
            // The run ended while this clone was made: it does not run on.
            drop(st);
            vm.control().finish(Outcome::Crash("the run ended as it was made".into()));
            self.reclaim(vm);
            return Ok(());
        }
        st.made += 1;
        if st.records.len() < MAX_RECORDS {
            st.records.push(Record {
                id,
                clone_time,
                parent_pause,
                resident_bytes,
                outcome: None,
                faults: Value::Null,
            });
        }
        st.live.push(vm);
        st.peak_alive = st.peak_alive.max(st.live.len() + st.reclaiming);
        // It may have finished already.
        self.cv.notify_all();
        Ok(())
    }

    /// Start the reaper threads once.
    fn start_reapers(self: &Arc<Self>) -> Result<(), Error> {
        let mut r = self.reapers.lock().unwrap_or_else(|e| e.into_inner());
        while r.len() < REAPERS {
            let ctx = self.clone();
            let t = std::thread::Builder::new()
                .name(format!("clone-reaper{}", r.len()))
                .spawn(move || ctx.reap_loop())
                .map_err(Error::io("cannot start a clone reaper thread"))?;
            r.push(t);
        }
        Ok(())
    }

    /// Reclaim clones as soon as they finish, one at a time per reaper;
    /// end when `wait_all` is done and nothing is left.
    fn reap_loop(self: Arc<Self>) {
        loop {
            let l = {
                let mut st = self.state();
                loop {
                    if let Some(i) = st.live.iter().position(|l| l.control().finished()) {
                        st.reclaiming += 1;
                        break st.live.swap_remove(i);
                    }
                    if st.closing && st.live.is_empty() {
                        return;
                    }
                    // A clone's finish notifies under this lock: no wake-up is lost.
                    st = self.cv.wait_timeout(st, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
                }
            };
            self.reclaim(l);
            self.state().reclaiming -= 1;
            self.cv.notify_all();
        }
    }

    /// Free one finished clone: threads, VM, view and pager map.
    fn reclaim(&self, vm: RunningVm) {
        let stopped = vm.stop();
        let (outcome, id) = (stopped.outcome.clone(), stopped.vm_id);
        let faults = stopped.fault_stats();
        let pool = stopped.ram.pool_resident_bytes();
        // The last reference: the VM is closed (unless a vCPU thread is
        // stuck in the host), the view unmapped and the map dropped here.
        drop(stopped);
        let mut st = self.state();
        st.pool_peak = st.pool_peak.max(pool);
        match &outcome {
            Outcome::Exit(s) if *s != 0 && st.failed.is_none() => st.failed = Some(*s),
            o if st.crashed.is_none() => st.crashed = o.crash_message().map(|m| (id, m)),
            _ => {}
        }
        if let Some(r) = st.records.iter_mut().find(|r| r.id == id) {
            r.outcome = Some(outcome);
            r.faults = faults;
        }
    }

    /// Stop the clones that still run with `why` (each gets it as its outcome).
    fn stop_all(&self, why: &Outcome) {
        let live: Vec<_> = self.state().live.iter().map(|l| (l.control().clone(), l.vm_id())).collect();
        for (c, id) in live {
            c.finish(match why.crash_message() {
                Some(m) => Outcome::Crash(format!("clone {id} stopped: {m}")),
                None => why.clone(),
            });
        }
    }

    /// Wait until every clone has stopped and been reclaimed. If the parent
    /// did not exit (a crash, the timeout, a signal), or the timeout or a
    /// signal comes now, the clones are stopped. The run's outcome is the
    /// parent's unless it passed and a clone did not.
    pub fn wait_all(&self, parent: Outcome, deadline: Deadline) -> Outcome {
        let mut stop: Option<Outcome> = match &parent {
            Outcome::Exit(_) => None,
            o => Some(o.clone()),
        };
        loop {
            if stop.is_none() {
                if let Some(sig) = crate::signals::pending() {
                    stop = Some(Outcome::Interrupted(sig));
                } else if deadline.passed() {
                    let secs = deadline.secs();
                    stop = Some(Outcome::Crash(format!(
                        "a clone did not exit within the --timeout of {secs} s; stopped it"
                    )));
                }
            }
            // Again each time: the parent's vCPU may have been in the middle
            // of a CLONE when it stopped.
            if let Some(why) = &stop {
                self.stop_all(why);
            }
            let st = self.state();
            if st.live.is_empty() && st.reclaiming == 0 {
                break;
            }
            drop(self.cv.wait_timeout(st, Duration::from_millis(50)).unwrap_or_else(|e| e.into_inner()));
        }
        let mut st = self.state();
        st.closing = true;
        drop(st);
        self.cv.notify_all();
        let reapers = std::mem::take(&mut *self.reapers.lock().unwrap_or_else(|e| e.into_inner()));
        for t in reapers {
            let _ = t.join();
        }
        let st = self.state();
        match (parent, stop) {
            (Outcome::Exit(_), Some(o @ Outcome::Interrupted(_))) => o,
            (Outcome::Exit(_), Some(o)) => o,
            (Outcome::Exit(p), None) => match (&st.crashed, st.failed) {
                (Some((id, m)), _) => Outcome::Crash(format!("clone {id}: {m}")),
                (None, Some(s)) if p == 0 => Outcome::Exit(s),
                _ => Outcome::Exit(p),
            },
            (o, _) => o,
        }
    }

    /// The `clones` array of `--stats-json` (the first [`MAX_RECORDS`]).
    pub fn stats_json(&self) -> Value {
        let st = self.state();
        Value::Array(
            st.records
                .iter()
                .map(|c| {
                    json!({
                        "id": c.id,
                        "clone_ms": c.clone_time.as_secs_f64() * 1e3,
                        "parent_pause_ms": c.parent_pause.as_secs_f64() * 1e3,
                        "parent_resident_bytes": c.resident_bytes,
                        "outcome": match &c.outcome {
                            Some(Outcome::Exit(s)) => json!({ "exit_status": s }),
                            Some(Outcome::Interrupted(_)) => json!({ "interrupted": true }),
                            Some(o) => json!({ "crash": o.crash_message() }),
                            None => Value::Null,
                        },
                        "faults": c.faults,
                    })
                })
                .collect(),
        )
    }

    /// The most bytes the frame pool held when a clone was reclaimed.
    pub fn pool_peak(&self) -> u64 {
        self.state().pool_peak
    }

    /// The `clone_limits` object of `--stats-json`: how many clones were
    /// made and refused, and the most alive at once.
    pub fn summary_json(&self) -> Value {
        let st = self.state();
        json!({
            "made": st.made,
            "refused": st.refused,
            "max_clones": self.max_alive,
            "peak_alive": st.peak_alive,
            "records_suppressed": st.made.saturating_sub(st.records.len() as u64),
        })
    }
}
