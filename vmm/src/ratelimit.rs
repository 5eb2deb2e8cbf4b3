//! Log lines a guest can trigger at will (an unknown hypercall, a bad
//! hypercall block, an access to an unbacked address, ...) go through a
//! per-kind limiter: at most [`BURST`] lines per [`PERIOD`], then nothing
//! until the period ends, when one line says how many similar lines were
//! left out. A hostile guest can thus make vkvm write a few lines a second
//! per kind, never a flood. [`flush`] reports what is still pending at exit;
//! [`suppressed`] gives the totals for `--stats-json`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines of one kind let through per period.
pub const BURST: u32 = 10;
pub const PERIOD: Duration = Duration::from_secs(1);

/// One kind of log line.
pub struct Limiter {
    /// Shown in the "suppressed" line and as the key in `--stats-json`.
    pub kind: &'static str,
    pub level: log::Level,
    st: Mutex<Window>,
    /// Lines left out since the start of the run.
    total: AtomicU64,
}

struct Window {
    start: Option<Instant>,
    emitted: u32,
    /// Left out in this window, not yet reported.
    pending: u64,
}

impl Limiter {
    pub const fn new(kind: &'static str, level: log::Level) -> Limiter {
        Limiter {
            kind,
            level,
            st: Mutex::new(Window { start: None, emitted: 0, pending: 0 }),
            total: AtomicU64::new(0),
        }
    }

    /// May a line of this kind be written now? Reports the lines left out
    /// in the last period first, once that period is over.
    pub fn admit(&self) -> bool {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> bool {
        if self.level > log::max_level() {
            return false;
        }
        let mut w = self.st.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = w.start.is_none_or(|s| now.duration_since(s) >= PERIOD);
        if fresh {
            let left_out = std::mem::take(&mut w.pending);
            w.start = Some(now);
            w.emitted = 0;
            drop(w);
            self.report(left_out);
            w = self.st.lock().unwrap_or_else(|e| e.into_inner());
        }
        if w.emitted < BURST {
            w.emitted += 1;
            true
        } else {
            w.pending += 1;
            self.total.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    fn report(&self, n: u64) {
        if n > 0 {
            log::log!(self.level, "suppressed {n} similar lines ({})", self.kind);
        }
    }

    /// Say how many lines were left out in the current period.
    pub fn flush(&self) {
        let n = std::mem::take(&mut self.st.lock().unwrap_or_else(|e| e.into_inner()).pending);
        self.report(n);
    }
}

/// Log through a [`Limiter`]: `limited!(ratelimit::UNBACKED, "...", args)`.
#[macro_export]
macro_rules! limited {
    ($lim:expr, $($arg:tt)+) => {{
        let lim: &$crate::ratelimit::Limiter = &$lim;
        if lim.admit() {
            log::log!(lim.level, $($arg)+);
        }
    }};
}

use log::Level::{Debug, Info, Warn};

pub static BAD_BLOCK: Limiter = Limiter::new("bad hypercall block", Warn);
pub static BAD_VERSION: Limiter = Limiter::new("hypercall magic or version", Warn);
pub static UNKNOWN_HYPERCALL: Limiter = Limiter::new("unknown hypercall", Warn);
pub static UNBACKED: Limiter = Limiter::new("unbacked guest-physical access", Warn);
pub static CLONE_REFUSED: Limiter = Limiter::new("CLONE refused", Warn);
pub static CLONE_MADE: Limiter = Limiter::new("clone started", Info);
pub static REPORTS: Limiter = Limiter::new("test report", Debug);
pub static REFUSED_ACCESS: Limiter = Limiter::new("refused guest access", Debug);
pub static UNCLAIMED_PORT: Limiter = Limiter::new("unclaimed port", Debug);
pub static FIRMWARE_PORT: Limiter = Limiter::new("firmware error port", Debug);
pub static HOST_MAP: Limiter = Limiter::new("host mapping error", log::Level::Error);
pub static GUEST_STOP: Limiter = Limiter::new("guest stop port", Warn);

/// Every limiter, for [`flush`] and [`suppressed`].
static ALL: &[&Limiter] = &[
    &BAD_BLOCK,
    &BAD_VERSION,
    &UNKNOWN_HYPERCALL,
    &UNBACKED,
    &CLONE_REFUSED,
    &CLONE_MADE,
    &REPORTS,
    &REFUSED_ACCESS,
    &UNCLAIMED_PORT,
    &FIRMWARE_PORT,
    &HOST_MAP,
    &GUEST_STOP,
];

/// Report what every limiter still holds back (at the end of a run).
pub fn flush() {
    for l in ALL {
        l.flush();
    }
}

/// Lines left out so far, per kind (only kinds with any).
pub fn suppressed() -> serde_json::Map<String, serde_json::Value> {
    ALL.iter()
        .filter_map(|l| {
            let n = l.total.load(Ordering::Relaxed);
            (n > 0).then(|| (l.kind.to_string(), n.into()))
        })
        .collect()
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn a_burst_then_nothing_until_the_period_ends() {
        // Error level is enabled whatever the test's log set-up is.
        log::set_max_level(log::LevelFilter::Trace);
        let l = Limiter::new("t", log::Level::Error);
        let t0 = Instant::now();
        let admitted = (0..1000).filter(|_| l.admit_at(t0)).count();
        assert_eq!(admitted, BURST as usize);
        assert_eq!(l.total.load(Ordering::Relaxed), 1000 - BURST as u64);
        assert!(!l.admit_at(t0 + PERIOD / 2));
        // A new period: the left-out lines are reported and the burst starts over.
        assert!(l.admit_at(t0 + PERIOD));
        assert_eq!(l.st.lock().unwrap().pending, 0);
        assert_eq!(l.total.load(Ordering::Relaxed), 1000 - BURST as u64 + 1);
    }
}
