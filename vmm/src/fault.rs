//! Fault delivery: the userfaultfd handler thread. A guest touch of an absent
//! page blocks the vCPU inside KVM; the event arrives here with the host
//! address, `pager::fault` resolves it and the KVM pmap installs the page
//! (which wakes the vCPU). Sequential streams get fault-around: the next
//! absent pages are resolved in the same step, which is what makes demand
//! paging cheap here (one event costs tens of µs on these hosts).

use crate::memory::{Access, GuestFault, GuestRam, Unresolved};
use crate::uffd::Event;
use log::debug;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PS: u64 = 4096;
/// Fault-around grows from MIN to MAX pages while faults stay sequential.
const AROUND_MIN: u64 = 64;
const AROUND_MAX: u64 = 2048;
/// Pages resolved before their installs are flushed.
const BATCH: u64 = 256;

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

/// Serve uffd events until `stop`. `poll_ms` 0 = busy-poll.
pub fn serve(
    ram: Arc<GuestRam>,
    stop: Arc<Stop>,
    busy_poll: bool,
    on_error: impl Fn(String),
    on_guest_fault: impl Fn(GuestFault) -> bool,
    on_stages: Option<impl Fn(&[Duration; 7])>,
) {
    // Stage timing inside the pager, for `vkvm profile`.
    pager::stages::enable(on_stages.is_some());
    let Some(uffd) = ram.uffd.clone() else { return };
    let stats = &ram.delivery;
    let mut events = [Event::Other(0); 16];
    let mut last_gpa = u64::MAX;
    let mut around = AROUND_MIN;
    while !stop.stopped() {
        if !busy_poll {
            let mut pfd = [
                libc::pollfd { fd: uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: stop.evt.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: polling two descriptors we own.
            unsafe { libc::poll(pfd.as_mut_ptr(), 2, 100) };
        }
        let woke = Instant::now();
        let n = match uffd.read_events(&mut events) {
            Ok(n) => n,
            Err(e) => {
                static RL: pager::RateLimit = pager::RateLimit::new();
                pager::warn_ratelimited!(RL, "userfaultfd read failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        if n == 0 && busy_poll {
            std::hint::spin_loop();
        }
        for &ev in &events[..n] {
            let Event::PageFault { addr, write, wp, tid, .. } = ev else { continue };
            stats.events.fetch_add(1, Ordering::Relaxed);
            let delivery = woke.elapsed();
            let Some(gpa) = ram.view.gpa_of(addr) else {
                let _ = uffd.wake(addr, PS);
                continue;
            };
            let access = Access::of(write || wp);
            match ram.resolve(gpa, access) {
                Ok(()) => {}
                Err(Unresolved::Refused(e)) => {
                    // An access the map does not allow: the vCPU gets an
                    // exception (it is kicked out of its wait, see vcpu.rs).
                    stats.guest_errors.fetch_add(1, Ordering::Relaxed);
                    crate::limited!(
                        crate::ratelimit::REFUSED_ACCESS,
                        "guest access at {gpa:#x} ({access:?}) refused: {e}"
                    );
                    if !on_guest_fault(GuestFault { gpa, write: access.is_write(), tid, error: e }) {
                        on_error(format!("guest access at {gpa:#x} refused ({e}) by a thread that is not a vCPU"));
                    }
                    continue;
                }
                Err(Unresolved::Fatal(f)) => {
                    // The pager failed (swap I/O, out of memory): stop the VM
                    // rather than hand the guest zeros. The vCPU stays
                    // blocked until the VM ends.
                    debug!("{f} ({access:?})");
                    on_error(f.to_string());
                    continue;
                }
            }
            let sequential = gpa == last_gpa.wrapping_add(PS);
            around = if sequential { (around * 2).min(AROUND_MAX) } else { AROUND_MIN };
            last_gpa = gpa;
            // As the seed does for read-ahead: no clustering beyond the free
            // frames, or fault-around would only feed pageout; and under
            // memory pressure only a sequential stream is worth it.
            let pool = ram.vm.pool();
            let headroom = pool.max_resident().saturating_sub(pool.resident()) / 2;
            let pressed = pool.resident() * 4 > pool.max_resident() * 3;
            let headroom = if pressed && !sequential { 0 } else { headroom };
            let end = (gpa + (around.min(headroom) + 1) * PS).min(ram.size);
            let mut a = gpa + PS;
            // In chunks: the pager resolves a chunk, then each run of fresh
            // pages is installed by one ioctl; the vCPU (already woken for
            // its own page) runs through one chunk while the next is made.
            'around: while a < end {
                ram.view.begin_batch();
                let chunk_end = (a + BATCH * PS).min(end);
                while a < chunk_end {
                    if !ram.view.present(a) {
                        if ram.fill(a, access).is_err() {
                            ram.view.end_batch();
                            break 'around;
                        }
                        stats.around.fetch_add(1, Ordering::Relaxed);
                    }
                    a += PS;
                }
                ram.view.end_batch();
            }
            if a > gpa + PS {
                last_gpa = a - PS;
            }
            // In case nothing was installed (e.g. the PTE was already there).
            let t_wake = Instant::now();
            let _ = uffd.wake(addr, PS);
            if let Some(record) = &on_stages {
                let s = pager::stages::take();
                record(&[delivery, s[0], s[1], s[2], s[3], s[4], t_wake.elapsed()]);
            }
        }
    }
}
