//! Builds the bundled guest kernel (`guest/`) with the host toolchain and
//! hands its path to the crate (`VKVM_GUEST_ELF`), so a plain `cargo run`
//! from a clean clone builds everything.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    let guest = manifest.join("../guest");
    for f in ["src", "Cargo.toml", "build.rs", "linker.ld", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", guest.join(f).display());
    }
    let elf = build_freestanding(&guest, &out.join("guest-target"), "vkvm-guest");
    let dst = out.join("vkvm-guest.elf");
    std::fs::copy(&elf, &dst).expect("copy guest ELF");
    println!("cargo:rustc-env=VKVM_GUEST_ELF={}", dst.display());
}

/// Run `cargo build --release` in `dir` (whose .cargo/config.toml carries the
/// freestanding flags) with a clean environment, and return the binary path.
fn build_freestanding(dir: &Path, target_dir: &Path, bin: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(dir).args(["build", "--release", "--target-dir"]).arg(target_dir);
    // The outer build's settings (flags, target dir, wrappers) must not leak in.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if (k.starts_with("CARGO_") && k != "CARGO_HOME") || k.starts_with("RUSTC_") || k == "RUSTFLAGS" {
            cmd.env_remove(&k);
        }
    }
    let status = cmd.status().expect("run cargo for the guest");
    assert!(status.success(), "building {} failed", dir.display());
    target_dir.join("x86_64-unknown-linux-gnu/release").join(bin)
}
