//! The bundled guest kernel, built by build.rs from `guest/`.

use crate::error::Error;
use std::path::Path;

pub static BUNDLED: &[u8] = include_bytes!(env!("VKVM_GUEST_ELF"));

pub fn write(path: &Path) -> Result<(), Error> {
    std::fs::write(path, BUNDLED).map_err(Error::io(format!("cannot write {}", path.display())))
}
