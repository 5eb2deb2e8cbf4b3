//! How a VM ended, as a type: the first [`Outcome`] recorded wins, and it
//! decides vkvm's exit status (see `status.rs`) and what `--stats-json`
//! and stderr say.

use crate::status;

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The guest exited with this status (as it gave it: any u64).
    Exit(u64),
    /// KVM_EXIT_SHUTDOWN on this vCPU; its registers as printed.
    TripleFault { vcpu: u32, registers: String },
    /// KVM_EXIT_INTERNAL_ERROR on this vCPU: KVM's suberror and data words.
    KvmInternal { vcpu: u32, suberror: u32, data: Vec<u64>, registers: String },
    /// The guest did not exit within `--timeout`.
    TimedOut { secs: f64 },
    /// Stopped cleanly on this signal (SIGINT, SIGTERM): status 128 + N.
    Interrupted(i32),
    /// vkvm, the host or the guest failed otherwise: status 3.
    Crash(String),
}

impl Outcome {
    /// The process exit status.
    pub fn status(&self) -> u8 {
        match self {
            Outcome::Exit(s) => status::of_guest(*s),
            Outcome::Interrupted(sig) => status::of_signal(*sig),
            _ => status::CRASH,
        }
    }

    /// The one-line (plus registers) error of a run that crashed: every
    /// outcome but a guest exit and a signal.
    pub fn crash_message(&self) -> Option<String> {
        match self {
            Outcome::Exit(_) | Outcome::Interrupted(_) => None,
            Outcome::TripleFault { vcpu, registers } => {
                Some(format!("guest triple fault (KVM_EXIT_SHUTDOWN) on vcpu {vcpu}\n{registers}"))
            }
            Outcome::KvmInternal { vcpu, suberror, data, registers } => Some(format!(
                "KVM internal error on vcpu {vcpu} (emulation failure?): suberror {suberror} data {data:x?}\n{registers}"
            )),
            Outcome::TimedOut { secs } => Some(format!("guest did not exit within the --timeout of {secs} s; stopped it")),
            Outcome::Crash(msg) => Some(msg.clone()),
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn statuses_and_messages() {
        assert_eq!(Outcome::Exit(0).status(), 0);
        assert_eq!(Outcome::Exit(300).status(), status::GUEST_OTHER);
        assert_eq!(Outcome::Interrupted(libc::SIGTERM).status(), 143);
        let tf = Outcome::TripleFault { vcpu: 1, registers: "  rip=0x1".into() };
        assert_eq!(tf.status(), status::CRASH);
        assert_eq!(tf.crash_message().unwrap(), "guest triple fault (KVM_EXIT_SHUTDOWN) on vcpu 1\n  rip=0x1");
        let ie = Outcome::KvmInternal { vcpu: 0, suberror: 1, data: vec![0x10], registers: String::new() };
        assert!(ie
            .crash_message()
            .unwrap()
            .starts_with("KVM internal error on vcpu 0 (emulation failure?): suberror 1"));
        assert!(Outcome::TimedOut { secs: 1.0 }.crash_message().unwrap().contains("did not exit within"));
        assert_eq!(Outcome::Exit(1).crash_message(), None);
    }
}
