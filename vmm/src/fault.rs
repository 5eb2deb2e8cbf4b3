//! Fault delivery: the userfaultfd handler thread. A guest touch of an absent
//! page blocks the vCPU inside KVM; the event arrives here with the host
//! address, the front door (`GuestRam::resolve`) brings the page in and the
//! KVM pmap installs it (which wakes the vCPU). Sequential streams get
//! fault-around ([`FaultAround`]): the next absent pages are filled in the
//! same step, which is what makes demand paging cheap here (one event
//! costs tens of µs on these hosts).

use crate::memory::{Access, GuestFault, GuestRam, Unresolved};
use crate::uffd::{Event, Uffd};
use log::debug;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PS: u64 = 4096;

/// Where the handler sends what it cannot settle itself: the VM it serves.
pub trait Report: Send + Sync {
    /// A refused access by thread `f.tid`: hand it to that vCPU (an
    /// exception for the guest); false if no vCPU has that thread.
    fn refused(&self, f: GuestFault) -> bool;
    /// The host failed (swap I/O, out of memory): stop the VM with `msg`.
    fn fatal(&self, msg: String);
    /// Is stage timing wanted (`vkvm profile`)?
    fn timing(&self) -> bool;
    /// One event's time per stage (only called when `timing`).
    fn stages(&self, t: &FaultStages);
}

/// One uffd event's time in each stage, in the order it goes through them.
/// A stage it did not go through is zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStages {
    /// From the handler waking to this event being taken up.
    pub delivery: Duration,
    /// Inside the pager (`pager::stages`): map lookup, chain walk, pager
    /// I/O, copy or zero-fill, pmap install (fault-around included).
    pub lookup: Duration,
    pub chain_walk: Duration,
    pub pager_io: Duration,
    pub copy_zero: Duration,
    pub install: Duration,
    /// The final UFFDIO_WAKE.
    pub wake: Duration,
}

impl FaultStages {
    pub const NAMES: [&'static str; 7] =
        ["delivery", "lookup", "chain_walk", "pager_io", "copy_zero", "install", "wake"];

    /// The stages in [`Self::NAMES`] order.
    pub fn all(&self) -> [Duration; 7] {
        [self.delivery, self.lookup, self.chain_walk, self.pager_io, self.copy_zero, self.install, self.wake]
    }

    /// The pager's stage times accumulated on this thread since the last call.
    fn take(delivery: Duration, wake: Duration) -> FaultStages {
        use pager::stages::Stage;
        let p = pager::stages::take();
        FaultStages {
            delivery,
            lookup: p[Stage::Lookup as usize],
            chain_walk: p[Stage::ChainWalk as usize],
            pager_io: p[Stage::PagerIo as usize],
            copy_zero: p[Stage::CopyZero as usize],
            install: p[Stage::Install as usize],
            wake,
        }
    }
}

/// Fault-around: after a fault, the absent pages after it are filled too,
/// a window that grows from [`Self::MIN`] to [`Self::MAX`] pages (doubling)
/// while faults stay sequential, and is filled in chunks of [`Self::CHUNK`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultAround {
    /// The last page of the stream so far (a fault right after it is sequential).
    last: u64,
    /// Pages to fill after the next fault.
    pages: u64,
}

/// The frames fault-around may take, read from the frame pool.
#[derive(Clone, Copy, Debug)]
pub struct Room {
    /// Half the free frames of the budget.
    pub headroom: u64,
    /// Resident above 3/4 of the budget.
    pub pressed: bool,
    /// End of guest RAM.
    pub ram_end: u64,
}

impl Room {
    fn of(ram: &GuestRam) -> Room {
        let pool = ram.vm.pool();
        Room {
            headroom: pool.max_resident().saturating_sub(pool.resident()) / 2,
            pressed: pool.resident() * 4 > pool.max_resident() * 3,
            ram_end: ram.size,
        }
    }
}

impl Default for FaultAround {
    fn default() -> Self {
        FaultAround { last: u64::MAX, pages: Self::MIN }
    }
}

impl FaultAround {
    pub const MIN: u64 = 64;
    pub const MAX: u64 = 2048;
    /// Pages filled before their installs are flushed (one ioctl per run
    /// of fresh pages): the vCPU, already woken for its own page, runs
    /// through one chunk while the next is made.
    pub const CHUNK: u64 = 256;

    /// A fault at `gpa` was resolved: the end (exclusive) of the range after
    /// it to fill. As the seed does for read-ahead: no clustering beyond
    /// the free frames, or fault-around would only feed pageout; and under
    /// memory pressure only a sequential stream is worth it.
    pub fn plan(&mut self, gpa: u64, room: Room) -> u64 {
        let sequential = gpa == self.last.wrapping_add(PS);
        self.pages = if sequential { (self.pages * 2).min(Self::MAX) } else { Self::MIN };
        self.last = gpa;
        let headroom = if room.pressed && !sequential { 0 } else { room.headroom };
        (gpa + (self.pages.min(headroom) + 1) * PS).min(room.ram_end)
    }

    /// Fault-around after `gpa` reached `end` (exclusive): the stream goes
    /// on from the last page filled.
    pub fn filled(&mut self, gpa: u64, end: u64) {
        if end > gpa + PS {
            self.last = end - PS;
        }
    }
}

/// Fill the absent pages of `(gpa, end)` in chunks; stops at the first
/// page that cannot be filled (the guest's own touch will report it).
/// Returns where it stopped.
fn fill_around(ram: &GuestRam, gpa: u64, end: u64, access: Access) -> u64 {
    let mut a = gpa + PS;
    while a < end {
        let _batch = ram.view.batch();
        let chunk_end = (a + FaultAround::CHUNK * PS).min(end);
        while a < chunk_end {
            if !ram.view.present(a) {
                if ram.fill(a, access).is_err() {
                    return a;
                }
                ram.delivery.around.fetch_add(1, Ordering::Relaxed);
            }
            a += PS;
        }
    }
    a
}

/// Tells a fault thread to end, and wakes it from its poll at once (so a
/// clone's thread is reclaimed without waiting for the poll timeout).
pub struct Stop {
    flag: AtomicBool,
    evt: vmm_sys_util::eventfd::EventFd,
}

impl Stop {
    pub fn new() -> std::io::Result<Stop> {
        let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        Ok(Stop { flag: AtomicBool::new(false), evt })
    }
    pub fn stop(&self) {
        self.flag.store(true, Ordering::Relaxed);
        // A wake-up only: the flag is what the thread checks.
        let _ = self.evt.write(1);
    }
    pub fn stopped(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}

/// The handler's state between events.
struct Handler<'a> {
    ram: &'a GuestRam,
    uffd: &'a Uffd,
    around: FaultAround,
    to: &'a dyn Report,
    timing: bool,
}

impl Handler<'_> {
    /// One uffd event: resolve the page, fill around it, wake the vCPU.
    fn event(&mut self, ev: Event, woke: Instant) {
        let Event::PageFault { addr, write, wp, tid, .. } = ev else { return };
        let ram = self.ram;
        ram.delivery.events.fetch_add(1, Ordering::Relaxed);
        let delivery = woke.elapsed();
        let Some(gpa) = ram.view.gpa_of(addr) else {
            let _ = self.uffd.wake(addr, PS);
            return;
        };
        let access = Access::of(write || wp);
        if let Err(u) = ram.resolve(gpa, access) {
            return self.unresolved(gpa, access, tid, u);
        }
        let end = self.around.plan(gpa, Room::of(ram));
        let reached = fill_around(ram, gpa, end, access);
        self.around.filled(gpa, reached);
        // In case nothing was installed (e.g. the PTE was already there).
        let t_wake = Instant::now();
        let _ = self.uffd.wake(addr, PS);
        if self.timing {
            self.to.stages(&FaultStages::take(delivery, t_wake.elapsed()));
        }
    }

    fn unresolved(&self, gpa: u64, access: Access, tid: u32, u: Unresolved) {
        match u {
            Unresolved::Refused(e) => {
                // An access the map does not allow: the vCPU gets an
                // exception (it is kicked out of its wait, see vcpu.rs).
                self.ram.delivery.guest_errors.fetch_add(1, Ordering::Relaxed);
                crate::limited!(crate::ratelimit::REFUSED_ACCESS, "guest access at {gpa:#x} ({access:?}) refused: {e}");
                if !self.to.refused(GuestFault { gpa, write: access.is_write(), tid, error: e }) {
                    self.to.fatal(format!("guest access at {gpa:#x} refused ({e}) by a thread that is not a vCPU"));
                }
            }
            // The pager failed (swap I/O, out of memory): stop the VM rather
            // than hand the guest zeros. The vCPU stays blocked until the VM ends.
            Unresolved::Fatal(f) => {
                debug!("{f} ({access:?})");
                self.to.fatal(f.to_string());
            }
        }
    }
}

/// Sleep until the userfaultfd or `stop` is readable (at most 100 ms).
fn wait(uffd: &Uffd, stop: &Stop) {
    let mut pfd = [
        libc::pollfd { fd: uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop.evt.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    // SAFETY: polling two descriptors we own.
    unsafe { libc::poll(pfd.as_mut_ptr(), 2, 100) };
}

/// Serve uffd events of `ram` until `stop`; `busy_poll` spins instead of
/// sleeping in poll(2).
pub fn serve(ram: Arc<GuestRam>, stop: Arc<Stop>, busy_poll: bool, to: &dyn Report) {
    let timing = to.timing();
    // Stage timing inside the pager, for `vkvm profile`.
    pager::stages::enable(timing);
    let Some(uffd) = ram.uffd.clone() else { return };
    let mut handler = Handler { ram: &ram, uffd: &uffd, around: FaultAround::default(), to, timing };
    let mut events = [Event::Other(0); 16];
    while !stop.stopped() {
        if !busy_poll {
            wait(&uffd, &stop);
        }
        let woke = Instant::now();
        let n = match uffd.read_events(&mut events) {
            Ok(n) => n,
            Err(e) => {
                static RL: pager::RateLimit = pager::RateLimit::new();
                pager::warn_ratelimited!(RL, "userfaultfd read failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if n == 0 && busy_poll {
            std::hint::spin_loop();
        }
        for &ev in &events[..n] {
            handler.event(ev, woke);
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    const ROOMY: Room = Room { headroom: 1 << 20, pressed: false, ram_end: 1 << 40 };

    #[test]
    fn fault_around_doubles_while_sequential_and_starts_over_otherwise() {
        let mut a = FaultAround::default();
        let mut gpa = 0x10_0000;
        let mut sizes = Vec::new();
        for _ in 0..8 {
            let end = a.plan(gpa, ROOMY);
            sizes.push((end - gpa) / PS - 1);
            a.filled(gpa, end);
            gpa = end;
        }
        assert_eq!(sizes, [64, 128, 256, 512, 1024, 2048, 2048, 2048]);
        // A fault elsewhere starts over.
        assert_eq!(a.plan(0x4000_0000, ROOMY), 0x4000_0000 + 65 * PS);
    }

    #[test]
    fn fault_around_keeps_to_the_free_frames_and_to_ram() {
        let mut a = FaultAround::default();
        // Half the free frames is the limit.
        assert_eq!(a.plan(0, Room { headroom: 10, ..ROOMY }), 11 * PS);
        // Under pressure, a random fault gets nothing around it...
        let pressed = Room { headroom: 10, pressed: true, ram_end: 1 << 40 };
        assert_eq!(a.plan(0x80_0000, pressed), 0x80_0000 + PS);
        // ... a sequential one still does.
        assert_eq!(a.plan(0x80_1000, pressed), 0x80_1000 + 11 * PS);
        // Never beyond RAM.
        assert_eq!(a.plan(0x2000, Room { ram_end: 0x5000, ..ROOMY }), 0x5000);
    }

    #[test]
    fn stages_come_out_in_their_names_order() {
        let ms = Duration::from_millis;
        let s = FaultStages { delivery: ms(1), wake: ms(7), install: ms(6), ..Default::default() };
        let all = s.all();
        assert_eq!(all[0], ms(1));
        assert_eq!(all[FaultStages::NAMES.iter().position(|&n| n == "install").unwrap()], ms(6));
        assert_eq!(all[6], ms(7));
    }
}
