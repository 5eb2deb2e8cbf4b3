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
    #[error("stopped by {}", crate::signals::name(*.0))]
    Interrupted(i32),
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
