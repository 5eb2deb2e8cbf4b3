//! Errors, split by who has to act: the user (configuration) or us (crash).

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// Bad input: exit status 2.
    #[error("{0}")]
    Config(String),
    /// /dev/kvm missing or not usable: a configuration problem with advice.
    #[error("cannot use /dev/kvm: {0}")]
    Kvm(String),
    /// The guest or the VMM failed while running: exit status 3.
    #[error("{0}")]
    Crash(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("KVM: {context}: {source}")]
    KvmIoctl { context: String, source: kvm_ioctls::Error },
    /// SIGINT or SIGTERM (before a guest ran, or in torture/bench): status 128 + N.
    #[error("stopped by {}", signal_name(*.0))]
    Interrupted(i32),
}

/// SIGINT or SIGTERM by name, for messages.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

impl Error {
    pub fn is_config(&self) -> bool {
        matches!(self, Error::Config(_) | Error::Kvm(_))
    }
    pub fn kvm(context: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        let context = context.into();
        move |source| Error::KvmIoctl { context, source }
    }
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
