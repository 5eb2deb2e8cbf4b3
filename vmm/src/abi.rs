//! The hypercall ABI: the same source file the guest compiles.
#[path = "../../guest/src/abi.rs"]
mod shared;
pub use shared::*;
