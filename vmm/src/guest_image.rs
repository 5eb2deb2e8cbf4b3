//! The bundled guest kernel, built by build.rs from `guest/`: the ELF64
//! (PVH note) and the same code as an ELF32 for Multiboot loaders.

use crate::error::Error;
use std::path::Path;

pub static BUNDLED: &[u8] = include_bytes!(env!("VKVM_GUEST_ELF"));
pub static BUNDLED32: &[u8] = include_bytes!(env!("VKVM_GUEST32_ELF"));

/// Which image `vkvm guest` writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// ELF64 with a PVH note (also carries a Multiboot header).
    #[default]
    Pvh,
    /// ELF32 with a Multiboot v1 header (QEMU `-kernel` on the pc machine).
    Multiboot,
}

pub fn write(path: &Path, format: Format) -> Result<(), Error> {
    let bytes = match format {
        Format::Pvh => BUNDLED,
        Format::Multiboot => BUNDLED32,
    };
    std::fs::write(path, bytes).map_err(|e| Error::Config(format!("--output {}: {e}", path.display())))
}
