//! One VM, built in steps ([`Builder`]: memory, vCPUs, load, devices,
//! start) and then run ([`RunningVm`]: wait for its outcome, pause and
//! resume it, stop it). The `vkvm run` command (`run.rs`) and the clones
//! (`clone.rs`) build theirs the same way; only the load step differs
//! (boot a kernel, or resume from a vCPU state).

mod builder;
mod running;

pub use builder::{BootConfig, Builder, Devices};
pub use running::{RunningVm, Stopped};

use crate::error::Error;
use std::time::{Duration, Instant};

/// The run's clock: `--timeout` counts from vkvm's start, so set-up (reading
/// the kernel, `--prefault`, ...) is inside it.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    start: Instant,
    secs: Option<f64>,
}

impl Deadline {
    /// `secs` was checked by `config::parse_timeout` (finite, capped).
    pub fn new(start: Instant, secs: Option<f64>) -> Deadline {
        Deadline { start, secs: secs.map(|s| s.clamp(0.0, crate::config::MAX_TIMEOUT)) }
    }
    pub fn secs(&self) -> f64 {
        self.secs.unwrap_or_default()
    }
    /// Time left, or None without a timeout.
    pub fn remaining(&self) -> Option<Duration> {
        self.secs.map(|s| Duration::from_secs_f64(s).saturating_sub(self.start.elapsed()))
    }
    pub fn passed(&self) -> bool {
        self.remaining() == Some(Duration::ZERO)
    }
    /// Between set-up steps and in long ones: a signal or the timeout stops
    /// the run here (128 + N, or status 3).
    pub fn check(&self, step: &str) -> Result<(), Error> {
        if let Some(sig) = crate::signals::pending() {
            return Err(Error::Interrupted(sig));
        }
        if self.passed() {
            return Err(Error::Crash(format!("the --timeout of {} s ran out during set-up ({step})", self.secs())));
        }
        Ok(())
    }
}
