//! A started VM: its threads (one per vCPU, one userfaultfd handler), the
//! monitor that waits for its outcome (the guest's exit, a crash, the
//! timeout, a signal), pause and resume, and the stop that joins every
//! thread.

use super::builder::Ready;
use super::Deadline;
use crate::control::{Control, PauseError, Paused};
use crate::error::Error;
use crate::fault::{FaultStages, Report};
use crate::memory::{GuestFault, GuestRam};
use crate::outcome::Outcome;
use crate::profile::Profile;
use crate::stats::{Reports, Stats};
use crate::vcpu::{Vcpu, VcpuContext};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::VmFd;
use log::warn;
use serde_json::json;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

/// How long stopping a VM waits for each of its threads before leaving it
/// to the process exit (a vCPU stuck in the host kernel).
const STOP_WAIT: Duration = Duration::from_secs(2);

/// A VM whose threads run.
pub struct RunningVm {
    vcpus: Vec<JoinHandle<()>>,
    uffd: Option<JoinHandle<()>>,
    stop_faults: Arc<crate::fault::Stop>,
    ctx: VcpuContext,
    tests: Arc<Reports>,
    vm_id: u32,
    created: Instant,
    vm_fd: VmFd,
    rom: Option<vm_memory::GuestMemoryMmap>,
}

/// A VM whose threads have been stopped: how it ended and what it recorded.
/// Its KVM VM closes when this is dropped (fields drop in order: the VM
/// before the memory its slots point at).
pub struct Stopped {
    /// None when a vCPU thread did not end: the VM then stays open until
    /// the process exits.
    _vm_fd: Option<VmFd>,
    _rom: Option<vm_memory::GuestMemoryMmap>,
    pub outcome: Outcome,
    pub vm_id: u32,
    pub nr_vcpus: u32,
    pub created: Instant,
    pub ram: Arc<GuestRam>,
    pub stats: Arc<Stats>,
    pub tests: Arc<Reports>,
    pub profile: Option<Arc<Profile>>,
}

/// What the userfaultfd handler cannot settle goes to the VM.
struct FaultReport {
    ctl: Arc<Control>,
    profile: Option<Arc<Profile>>,
}

impl Report for FaultReport {
    fn refused(&self, f: GuestFault) -> bool {
        self.ctl.refuse(f)
    }
    fn fatal(&self, msg: String) {
        self.ctl.finish(Outcome::Crash(msg));
    }
    fn timing(&self) -> bool {
        self.profile.is_some()
    }
    fn stages(&self, t: &FaultStages) {
        if let Some(p) = &self.profile {
            p.record_stages(t);
        }
    }
}

impl RunningVm {
    /// Start `r`'s userfaultfd handler (if it has one) and its vCPU threads.
    /// A thread that cannot be started (the host is out of threads or
    /// memory) is an error: what started is stopped, never an abort.
    pub(super) fn start(r: Ready, uffd_poll: bool) -> Result<RunningVm, Error> {
        let stop = Arc::new(crate::fault::Stop::new().map_err(Error::io("cannot create an eventfd"))?);
        let Ready { vm_fd, vm_id, created, vcpus, ctx, tests, rom } = r;
        let mut vm = RunningVm {
            vcpus: Vec::new(),
            uffd: None,
            stop_faults: stop.clone(),
            ctx,
            tests,
            vm_id,
            created,
            vm_fd,
            rom,
        };
        if vm.ctx.ram.uffd.is_some() {
            let (ram, report) =
                (vm.ctx.ram.clone(), FaultReport { ctl: vm.ctx.ctl.clone(), profile: vm.ctx.profile.clone() });
            let t = std::thread::Builder::new()
                .name(format!("uffd-vm{vm_id}"))
                .spawn(move || crate::fault::serve(ram, stop, uffd_poll, &report))
                .map_err(Error::io("cannot start the userfaultfd thread"))?;
            vm.uffd = Some(t);
        }
        for (id, fd) in vcpus.into_iter().enumerate() {
            let v = Vcpu::new(id as u32, fd, &vm.ctx);
            match std::thread::Builder::new().name(format!("vm{vm_id}-vcpu{id}")).spawn(move || v.run()) {
                Ok(t) => vm.vcpus.push(t),
                Err(e) => {
                    vm.stop();
                    return Err(Error::Io { context: "cannot start a vCPU thread".into(), source: e });
                }
            }
        }
        Ok(vm)
    }

    /// The run control: the outcome, the run states, pause and resume.
    pub fn control(&self) -> &Arc<Control> {
        &self.ctx.ctl
    }

    /// Pause every vCPU at a consistent point (see `Control::pause`); the
    /// guard resumes them when dropped.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn pause(&self, timeout: Duration) -> Result<Paused, PauseError> {
        self.ctx.ctl.pause(timeout)
    }

    pub fn vm_id(&self) -> u32 {
        self.vm_id
    }

    /// Wait for the VM's outcome: the guest exits or crashes, the deadline
    /// passes (TimedOut) or SIGINT/SIGTERM comes (Interrupted).
    pub fn wait(&self, deadline: Deadline) -> Result<Outcome, Error> {
        let ctl = &self.ctx.ctl;
        let timer = match deadline.remaining() {
            Some(left) => {
                let timer_err = |e| Error::Crash(format!("cannot arm the --timeout timer: {e}"));
                let mut t = TimerFd::new().map_err(timer_err)?;
                // A zero time would disarm the timer: the loop checks the deadline too.
                t.reset(left.max(Duration::from_nanos(1)), None).map_err(timer_err)?;
                Some(t)
            }
            None => None,
        };
        let mon = Arc::new(Mutex::new(Monitor { ctl: ctl.clone(), timer, timed_out: false }));
        let mut em =
            EventManager::<Arc<Mutex<Monitor>>>::new().map_err(|e| Error::Crash(format!("event manager: {e:?}")))?;
        em.add_subscriber(mon.clone());
        loop {
            if let Some(o) = ctl.outcome() {
                return Ok(o);
            }
            if let Some(sig) = crate::signals::pending() {
                ctl.finish(Outcome::Interrupted(sig));
                continue;
            }
            if mon.lock().unwrap_or_else(|e| e.into_inner()).timed_out || deadline.passed() {
                ctl.finish(Outcome::TimedOut { secs: deadline.secs() });
                continue;
            }
            em.run_with_timeout(1000).map_err(|e| Error::Crash(format!("event manager: {e:?}")))?;
        }
    }

    fn vcpus_done(&self) -> bool {
        self.vcpus.iter().all(|t| t.is_finished())
    }

    /// Stop the VM (if nothing did), kick its vCPUs out of the guest until
    /// their threads end, then end the fault thread. A thread that does
    /// not end within [`STOP_WAIT`] is left behind, and the VM with it.
    pub fn stop(mut self) -> Stopped {
        let ctl = self.ctx.ctl.clone();
        if !ctl.finished() {
            ctl.finish(Outcome::Crash("stopped".into()));
        }
        let until = Instant::now() + STOP_WAIT;
        // A vCPU blocked in the host may need more than one kick.
        while !self.vcpus_done() && Instant::now() < until {
            ctl.kick_all();
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut ended = self.vcpus_done();
        for t in std::mem::take(&mut self.vcpus) {
            if t.is_finished() {
                let _ = t.join();
            }
        }
        // Only now: a vCPU waiting on a fault needs this thread to go on.
        self.stop_faults.stop();
        if let Some(t) = self.uffd.take() {
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
            ended &= t.is_finished();
            if t.is_finished() {
                let _ = t.join();
            }
        }
        self.stopped(ended)
    }

    fn stopped(self, ended: bool) -> Stopped {
        let (mut vm_fd, mut rom) = (Some(self.vm_fd), self.rom);
        if !ended {
            // A vCPU thread that did not end may still be inside KVM_RUN:
            // the VM and its ROM stay until the process exits.
            std::mem::forget(vm_fd.take());
            std::mem::forget(rom.take());
        }
        let c = self.ctx;
        Stopped {
            _vm_fd: vm_fd,
            _rom: rom,
            outcome: c.ctl.outcome().unwrap_or(Outcome::Crash("stopped".into())),
            vm_id: self.vm_id,
            nr_vcpus: c.ctl.states().len() as u32,
            created: self.created,
            ram: c.ram,
            stats: c.stats,
            tests: self.tests,
            profile: c.profile,
        }
    }
}

impl Stopped {
    /// The `faults` object of `--stats-json` for this VM.
    pub fn fault_stats(&self) -> serde_json::Value {
        fault_stats(&self.ram)
    }
}

/// Waits for the guest's exit event or the timeout.
struct Monitor {
    ctl: Arc<Control>,
    timer: Option<TimerFd>,
    timed_out: bool,
}

impl MutEventSubscriber for Monitor {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if self.timer.as_ref().is_some_and(|t| t.as_raw_fd() == events.fd()) {
            self.timed_out = true;
        } else {
            // Reading only resets the eventfd; the outcome is in the control.
            let _ = self.ctl.exit_event().read();
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.ctl.exit_event(), EventSet::IN)) {
            warn!("cannot watch the exit event: {e}");
        }
        // A signal only wakes the loop; `signals::pending` says which.
        if let Some(w) = crate::signals::wake_fd() {
            if let Err(e) = ops.add(Events::new(w, EventSet::IN)) {
                warn!("cannot watch for SIGINT/SIGTERM: {e}");
            }
        }
        if let Some(t) = &self.timer {
            if let Err(e) = ops.add(Events::new(t, EventSet::IN)) {
                warn!("cannot watch the timeout: {e}");
            }
        }
    }
}

/// The `faults` object of `--stats-json`.
fn fault_stats(ram: &GuestRam) -> serde_json::Value {
    let p = ram.vm.stats().snapshot();
    json!({
        "delivery": ram.view.delivery(),
        "zero_fill": p.zero_fill,
        "soft": p.soft,
        "cow_copy": p.cow_copy,
        "cow_rename": p.cow_rename,
        "pager_in": p.pager_in,
        "prefault": p.prefault,
        "guest_errors": ram.delivery.guest_errors.load(Ordering::Relaxed),
        "events": ram.delivery.events.load(Ordering::Relaxed),
        "fault_around": ram.delivery.around.load(Ordering::Relaxed),
    })
}
