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
    // The guest includes the vpte format from the pager (`#[path]`).
    println!("cargo:rerun-if-changed={}", manifest.join("../pager/src/vpte.rs").display());
    let elf = build_freestanding(&guest, &out.join("guest-target"), "vkvm-guest");
    let dst = out.join("vkvm-guest.elf");
    std::fs::copy(&elf, &dst).expect("copy guest ELF");
    println!("cargo:rustc-env=VKVM_GUEST_ELF={}", dst.display());
    let dst32 = out.join("vkvm-guest32.elf");
    make_elf32(&dst, &dst32);
    println!("cargo:rustc-env=VKVM_GUEST32_ELF={}", dst32.display());
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

/// The Multiboot image of the same guest: Multiboot v1 loaders (QEMU's
/// `-kernel` on the pc machine among them) take ELF32 only, so the ELF64 is
/// converted as kvm-unit-tests does it, with `objcopy -O elf32-i386`. The
/// code is unchanged: its entry stub is 32-bit, everything else runs after
/// it has switched to long mode.
fn make_elf32(elf64: &Path, elf32: &Path) {
    println!("cargo:rerun-if-env-changed=OBJCOPY");
    let objcopy = std::env::var("OBJCOPY").unwrap_or_else(|_| "objcopy".into());
    let status = Command::new(&objcopy).args(["-O", "elf32-i386"]).arg(elf64).arg(elf32).status().unwrap_or_else(|e| {
        panic!(
            "cannot run '{objcopy}' ({e}): vkvm's build needs objcopy from GNU binutils to make \
                 the Multiboot (ELF32) guest; install binutils (e.g. apt-get install binutils) or set OBJCOPY"
        )
    });
    assert!(status.success(), "'{objcopy} -O elf32-i386' failed on {}", elf64.display());
    wake_multiboot_header(elf32);
}

/// The guest carries its Multiboot header with the magic inverted, so that
/// QEMU does not see a Multiboot header in the ELF64 (it would refuse the
/// ELF64 instead of booting it by PVH). Give the ELF32 the real magic.
fn wake_multiboot_header(elf32: &Path) {
    const MAGIC: u32 = 0x1bad_b002;
    const FLAGS: u32 = 1 << 1; // guest/src/boot.rs MB_FLAGS
    let mut pattern = Vec::new();
    for w in [!MAGIC, FLAGS, 0u32.wrapping_sub(MAGIC).wrapping_sub(FLAGS)] {
        pattern.extend_from_slice(&w.to_le_bytes());
    }
    let mut img = std::fs::read(elf32).expect("read the ELF32 guest");
    let at = (0..img.len().min(8192).saturating_sub(12))
        .step_by(4)
        .find(|&o| img[o..o + 12] == pattern[..])
        .expect("the guest's dormant Multiboot header is not in the first 8 KiB of the ELF32");
    img[at..at + 4].copy_from_slice(&MAGIC.to_le_bytes());
    std::fs::write(elf32, img).expect("write the ELF32 guest");
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
