//! A VM's run control: one [`RunState`] per vCPU, driven by events (a vCPU
//! starts, parks, stops; another thread asks to pause or resume; the VM
//! ends), the VM's [`Outcome`], and the channel through which another
//! thread asks a paused vCPU for its state.
//!
//! Pause-all is an operation any thread can ask for ([`Control::pause`]):
//! every vCPU is kicked out of `KVM_RUN` (the kick signal sets its
//! `immediate_exit`, so no kick is lost), completes the access it was in
//! (one more `KVM_RUN` that returns at once), reports `Paused` and waits.
//! A parked vCPU already waits, so it counts as paused; both answer
//! [`Paused::capture`]. Dropping the [`Paused`] guard resumes them.
//!
//! Until a control socket calls it (issue 14), pause, resume and capture
//! are used by the tests only, hence `allow(dead_code)` outside them.
//!
//! Locks: `st` (this module only, held briefly; a vCPU serves a capture
//! request under it), then each vCPU's `pending` slot (never both at once).

#![cfg_attr(not(test), allow(dead_code))]

use crate::kvm::{self, VcpuState};
use crate::memory::GuestFault;
use crate::outcome::Outcome;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// Where a vCPU is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Its thread has not started yet.
    Starting,
    /// In the guest, or handling an exit.
    Running,
    /// Out of the guest until resumed; its state is whole and stable.
    Paused,
    /// Stopped by PARK or HLT for good; its state is stable.
    Parked,
    /// Its thread has ended (the VM has an outcome).
    Finished,
}

impl RunState {
    /// Not running guest code, and will not until resumed.
    pub fn quiescent(self) -> bool {
        matches!(self, RunState::Paused | RunState::Parked | RunState::Finished)
    }
}

/// What another thread asks of a paused or parked vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Its registers and the rest of [`VcpuState`].
    Capture,
}

/// A vCPU's answer.
pub type Reply = Result<Box<VcpuState>, String>;

/// What a vCPU does at a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpoint {
    /// Enter the guest.
    Run,
    /// Enter once more with `immediate_exit` set, to complete the pending
    /// access (its state is not whole yet), then come back.
    CompleteFirst,
    /// The VM has ended: the thread ends.
    Quit,
}

/// Why a pause did not happen.
#[derive(Debug, PartialEq, Eq)]
pub enum PauseError {
    /// The VM has already ended.
    Ended,
    /// Not every vCPU stopped in time (their states then).
    TimedOut(Vec<RunState>),
}

impl std::fmt::Display for PauseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PauseError::Ended => write!(f, "the VM has ended"),
            PauseError::TimedOut(s) => write!(f, "not every vCPU stopped in time: {s:?}"),
        }
    }
}

struct Inner {
    states: Vec<RunState>,
    /// Pause requests outstanding: the vCPUs run only at 0.
    pauses: u32,
    outcome: Option<Outcome>,
    /// Per vCPU: a request waiting for it, and its reply.
    requests: Vec<Option<Request>>,
    replies: Vec<Option<Reply>>,
}

/// How to reach one vCPU thread from another thread.
#[derive(Default)]
struct Thread {
    tid: AtomicI32,
    /// A refused access the fault handler left for it, to be raised as #PF.
    pending: Mutex<Option<GuestFault>>,
}

/// The run control of one VM (shared by its vCPU threads, its fault
/// handler, its monitor and whoever pauses it).
pub struct Control {
    st: Mutex<Inner>,
    cv: Condvar,
    /// Set while a vCPU must look at `st` before entering the guest (a
    /// pause is wanted or the VM has ended): one load per exit otherwise.
    attention: AtomicBool,
    threads: Vec<Thread>,
    /// Readable once the VM has an outcome (the monitor waits on it).
    exit_evt: EventFd,
    /// Called once the VM has an outcome (a clone's: wakes the reaper).
    on_finish: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Control {
    pub fn new(nr_vcpus: u32) -> std::io::Result<Control> {
        let n = nr_vcpus as usize;
        Ok(Control {
            st: Mutex::new(Inner {
                states: vec![RunState::Starting; n],
                pauses: 0,
                outcome: None,
                requests: vec![None; n],
                replies: (0..n).map(|_| None).collect(),
            }),
            cv: Condvar::new(),
            attention: AtomicBool::new(false),
            threads: (0..n).map(|_| Thread::default()).collect(),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            on_finish: OnceLock::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, Inner>, t: Duration) -> MutexGuard<'a, Inner> {
        self.cv.wait_timeout(g, t).unwrap_or_else(|e| e.into_inner()).0
    }

    fn set_state(&self, g: &mut Inner, id: usize, s: RunState) {
        if g.states[id] != s {
            g.states[id] = s;
            self.cv.notify_all();
        }
    }

    // The vCPU thread's side.

    /// vCPU `id`'s thread has started: kicks can reach it now.
    pub fn attach(&self, id: u32) {
        // SAFETY: gettid has no side effects.
        self.threads[id as usize].tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
        let mut g = self.lock();
        if g.states[id as usize] == RunState::Starting {
            self.set_state(&mut g, id as usize, RunState::Running);
        }
    }

    /// vCPU `id`'s thread ends.
    pub fn detach(&self, id: u32) {
        self.threads[id as usize].tid.store(0, Ordering::SeqCst);
        let mut g = self.lock();
        self.set_state(&mut g, id as usize, RunState::Finished);
    }

    /// Must vCPU threads stop at a [`Self::checkpoint`] before entering the guest?
    #[inline]
    pub fn attention(&self) -> bool {
        self.attention.load(Ordering::SeqCst)
    }

    /// vCPU `id` before entering the guest, when [`Self::attention`] says
    /// so. While the VM is paused it waits here (serving requests with
    /// `serve`); `whole`: the last `KVM_RUN` left no access to complete.
    pub fn checkpoint(&self, id: u32, whole: bool, serve: &mut dyn FnMut(Request) -> Reply) -> Checkpoint {
        let i = id as usize;
        let mut g = self.lock();
        loop {
            if g.outcome.is_some() {
                return Checkpoint::Quit;
            }
            self.serve(&mut g, i, serve);
            if g.pauses == 0 {
                self.set_state(&mut g, i, RunState::Running);
                return Checkpoint::Run;
            }
            if !whole {
                return Checkpoint::CompleteFirst;
            }
            self.set_state(&mut g, i, RunState::Paused);
            g = self.wait(g, Duration::from_secs(1));
        }
    }

    /// vCPU `id` stops running for good (PARK, HLT): it stays `Parked`,
    /// serving requests, until the VM ends. When every vCPU has parked and
    /// none asked to exit, the VM ends here.
    pub fn park(&self, id: u32, serve: &mut dyn FnMut(Request) -> Reply) {
        let i = id as usize;
        let mut g = self.lock();
        self.set_state(&mut g, i, RunState::Parked);
        if g.outcome.is_none() && g.states.iter().all(|&s| s == RunState::Parked) {
            drop(g);
            self.finish(Outcome::Crash("every vCPU parked or halted and none asked to exit".into()));
            g = self.lock();
        }
        while g.outcome.is_none() {
            self.serve(&mut g, i, serve);
            g = self.wait(g, Duration::from_secs(1));
        }
    }

    fn serve(&self, g: &mut Inner, i: usize, serve: &mut dyn FnMut(Request) -> Reply) {
        if let Some(r) = g.requests[i].take() {
            g.replies[i] = Some(serve(r));
            self.cv.notify_all();
        }
    }

    /// A refused access the fault handler left for vCPU `id`.
    pub fn take_pending(&self, id: u32) -> Option<GuestFault> {
        self.threads.get(id as usize)?.pending.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    // Everyone else's side.

    /// Hand a refused guest access to the vCPU that made it and kick that
    /// vCPU out of its fault wait; false if no vCPU has that thread id.
    pub fn refuse(&self, f: GuestFault) -> bool {
        let Some(t) = self.threads.iter().find(|t| t.tid.load(Ordering::SeqCst) == f.tid as i32) else {
            return false;
        };
        *t.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
        kvm::kick(f.tid as i32);
        true
    }

    /// Kick every vCPU thread that may be in the guest out of it.
    pub fn kick_all(&self) {
        let states = self.states();
        for (t, s) in self.threads.iter().zip(states) {
            if matches!(s, RunState::Starting | RunState::Running) {
                kvm::kick(t.tid.load(Ordering::SeqCst));
            }
        }
    }

    /// The first outcome wins; the vCPUs and the monitor are woken to stop.
    pub fn finish(&self, o: Outcome) {
        let first = {
            let mut g = self.lock();
            let first = g.outcome.is_none();
            if first {
                g.outcome = Some(o);
            }
            first
        };
        self.attention.store(true, Ordering::SeqCst);
        self.cv.notify_all();
        // Wake-up only: the outcome is already recorded.
        let _ = self.exit_evt.write(1);
        if let (true, Some(f)) = (first, self.on_finish.get()) {
            f();
        }
    }

    /// Run `f` when this VM finishes (at most one such callback).
    pub fn set_on_finish(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.on_finish.set(f);
    }

    /// How this VM ended, if it has.
    pub fn outcome(&self) -> Option<Outcome> {
        self.lock().outcome.clone()
    }

    pub fn finished(&self) -> bool {
        self.lock().outcome.is_some()
    }

    /// Readable once the VM has an outcome.
    pub fn exit_event(&self) -> &EventFd {
        &self.exit_evt
    }

    /// Every vCPU's state now.
    pub fn states(&self) -> Vec<RunState> {
        self.lock().states.clone()
    }

    /// Pause every vCPU: returns once each is `Paused`, `Parked` or
    /// `Finished`, or fails after `timeout` (and resumes those that did).
    /// Pauses nest: the vCPUs run again when every guard is dropped.
    pub fn pause(self: &Arc<Self>, timeout: Duration) -> Result<Paused, PauseError> {
        {
            let mut g = self.lock();
            if g.outcome.is_some() {
                return Err(PauseError::Ended);
            }
            g.pauses += 1;
            self.attention.store(true, Ordering::SeqCst);
        }
        let paused = Paused { ctl: self.clone() };
        let until = Instant::now() + timeout;
        loop {
            // Again and again: a vCPU blocked in the host may need more than one.
            self.kick_all();
            let g = self.lock();
            if g.states.iter().all(|s| s.quiescent()) {
                return Ok(paused);
            }
            if Instant::now() >= until {
                let states = g.states.clone();
                drop(g);
                drop(paused);
                return Err(PauseError::TimedOut(states));
            }
            drop(self.wait(g, Duration::from_millis(10)));
        }
    }

    fn resume(&self) {
        let mut g = self.lock();
        g.pauses = g.pauses.saturating_sub(1);
        if g.pauses == 0 && g.outcome.is_none() {
            self.attention.store(false, Ordering::SeqCst);
        }
        drop(g);
        self.cv.notify_all();
    }

    /// Ask every paused or parked vCPU for its state (None for a vCPU
    /// whose thread has ended), waiting at most `timeout` for the answers.
    fn capture(&self, timeout: Duration) -> Result<Vec<Option<VcpuState>>, String> {
        let mut g = self.lock();
        let asked: Vec<bool> = g.states.iter().map(|&s| matches!(s, RunState::Paused | RunState::Parked)).collect();
        for (i, &a) in asked.iter().enumerate() {
            if a {
                g.replies[i] = None;
                g.requests[i] = Some(Request::Capture);
            }
        }
        self.cv.notify_all();
        let until = Instant::now() + timeout;
        let mut out = vec![None; asked.len()];
        for (i, &a) in asked.iter().enumerate() {
            while a && g.replies[i].is_none() {
                if g.states[i] == RunState::Finished || Instant::now() >= until {
                    g.requests[i] = None;
                    return Err(format!("vcpu {i} did not answer ({:?})", g.states[i]));
                }
                g = self.wait(g, Duration::from_millis(10));
            }
            if let Some(r) = g.replies[i].take() {
                out[i] = Some(*r.map_err(|e| format!("vcpu {i}: {e}"))?);
            }
        }
        Ok(out)
    }
}

/// The VM paused (see [`Control::pause`]); dropping it resumes the vCPUs.
pub struct Paused {
    ctl: Arc<Control>,
}

impl Paused {
    /// Every vCPU's state now (`Paused`, `Parked` or `Finished`).
    pub fn states(&self) -> Vec<RunState> {
        self.ctl.states()
    }

    /// Every vCPU's registers and the rest of its state, read by its own
    /// thread while it cannot run: one consistent point for all of them.
    /// None for a vCPU whose thread has ended.
    pub fn capture(&self) -> Result<Vec<Option<VcpuState>>, String> {
        self.ctl.capture(Duration::from_secs(10))
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        self.ctl.resume();
    }
}

#[cfg(test)]
mod test {
    use super::*;

    /// A vCPU thread without KVM: runs (sleeps) between checkpoints, or parks.
    fn fake_vcpu(ctl: Arc<Control>, id: u32, park_after: Option<u32>) -> std::thread::JoinHandle<u32> {
        std::thread::spawn(move || {
            ctl.attach(id);
            let mut serve = |_: Request| -> Reply {
                let mut s = VcpuState::default();
                s.regs.rip = 0x1000 + u64::from(id);
                Ok(Box::new(s))
            };
            let mut steps = 0;
            loop {
                if ctl.attention() && ctl.checkpoint(id, true, &mut serve) == Checkpoint::Quit {
                    break;
                }
                if park_after == Some(steps) {
                    ctl.park(id, &mut serve);
                    break;
                }
                steps += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            ctl.detach(id);
            steps
        })
    }

    #[test]
    fn pause_waits_for_every_vcpu_parked_ones_count_and_both_answer() {
        kvm::install_kick().unwrap();
        let ctl = Arc::new(Control::new(2).unwrap());
        let running = fake_vcpu(ctl.clone(), 0, None);
        let parking = fake_vcpu(ctl.clone(), 1, Some(3));
        while ctl.states()[1] != RunState::Parked {
            std::thread::sleep(Duration::from_millis(1));
        }
        let p = ctl.pause(Duration::from_secs(10)).unwrap();
        assert_eq!(p.states(), [RunState::Paused, RunState::Parked]);
        let st = p.capture().unwrap();
        assert_eq!(st.iter().map(|s| s.as_ref().unwrap().regs.rip).collect::<Vec<_>>(), [0x1000, 0x1001]);
        // Nested: still paused after the inner one is dropped.
        let inner = ctl.pause(Duration::from_secs(10)).unwrap();
        drop(inner);
        assert_eq!(ctl.states()[0], RunState::Paused);
        drop(p);
        while ctl.states()[0] != RunState::Running {
            std::thread::sleep(Duration::from_millis(1));
        }
        ctl.finish(Outcome::Exit(0));
        running.join().unwrap();
        parking.join().unwrap();
        assert_eq!(ctl.states(), [RunState::Finished, RunState::Finished]);
        assert_eq!(ctl.pause(Duration::from_secs(1)).err(), Some(PauseError::Ended));
    }

    #[test]
    fn every_vcpu_parked_ends_the_vm_and_a_stuck_one_times_the_pause_out() {
        kvm::install_kick().unwrap();
        let ctl = Arc::new(Control::new(2).unwrap());
        // vCPU 1 never reaches a checkpoint (it "started" but is stuck).
        ctl.attach(1);
        let a = fake_vcpu(ctl.clone(), 0, Some(0));
        while ctl.states()[0] != RunState::Parked {
            std::thread::sleep(Duration::from_millis(1));
        }
        let e = ctl.pause(Duration::from_millis(50)).err().unwrap();
        assert_eq!(e, PauseError::TimedOut(vec![RunState::Parked, RunState::Running]));
        // The failed pause left nothing paused.
        assert!(!ctl.attention());
        assert_eq!(ctl.outcome(), None);
        // vCPU 1 comes unstuck and parks too.
        let b = fake_vcpu(ctl.clone(), 1, Some(0));
        a.join().unwrap();
        b.join().unwrap();
        assert!(matches!(ctl.outcome(), Some(Outcome::Crash(m)) if m.contains("every vCPU parked")));
    }
}
