//! Booting a guest: which protocol, and the common vCPU entry state.

pub mod firmware;
pub mod pvh;

pub use pvh::{check_elf, load_pvh, setup_vcpu, CMDLINE_MAX};

/// How vkvm enters the guest (`--boot`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BootMode {
    /// Direct kernel boot, protocol detected from the image (PVH note).
    #[default]
    #[value(alias = "direct")]
    Auto,
    /// Direct boot through the PVH entry note.
    Pvh,
    /// Start at the reset vector in real mode; the bundled firmware enters
    /// the guest's PVH entry.
    Firmware,
}
