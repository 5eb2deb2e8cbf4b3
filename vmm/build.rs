//! Builds the bundled guest kernel (`guest/`) and the reset-vector firmware
//! (`firmware/`) with the host toolchain and hands their paths to the crate
//! (`VKVM_GUEST_ELF`, `VKVM_FIRMWARE_BIN`), so a plain `cargo run` from a
//! clean clone builds everything.

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
    build_firmware(&manifest, &out);
}

/// The firmware links straight to a flat ROM image (`--oformat=binary` in
/// firmware/.cargo/config.toml), so there is nothing to convert here.
fn build_firmware(manifest: &Path, out: &Path) {
    let fw = manifest.join("../firmware");
    for f in ["src", "Cargo.toml", "build.rs", "linker.ld", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", fw.join(f).display());
    }
    let bin = build_freestanding(&fw, &out.join("firmware-target"), "vkvm-firmware");
    let dst = out.join("vkvm-firmware.bin");
    std::fs::copy(&bin, &dst).expect("copy firmware image");
    // The ROM is 64 KiB ending at 4 GiB; any other size would move the reset vector.
    let len = std::fs::metadata(&dst).expect("firmware image").len();
    assert_eq!(len, 0x1_0000, "firmware image is {len} bytes, not 64 KiB");
    println!("cargo:rustc-env=VKVM_FIRMWARE_BIN={}", dst.display());
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
    let status = cmd.status().expect("run cargo for a freestanding image");
    assert!(status.success(), "building {} failed", dir.display());
    target_dir.join("x86_64-unknown-linux-gnu/release").join(bin)
}
