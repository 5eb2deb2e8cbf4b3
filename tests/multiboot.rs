//! End-to-end tests of Multiboot v1 boot: detection, the boot information
//! (command line, modules, memory), the PC devices a Multiboot kernel pokes
//! (serial, fw_cfg, PCI ports, debug-exit, Bochs shutdown), SMP bring-up by
//! INIT/SIPI, and a clear one-line error for each kind of bad kernel.
//!
//! The small kernels are crafted here as ELF32 files around a few hundred
//! bytes of 32-bit code (source in the comment on `KERNEL_CODE`).

mod common;

use common::*;
use std::path::{Path, PathBuf};

const MB_MAGIC: u32 = 0x1bad_b002;
const LOAD: u32 = 0x10_0000;

/// `as --32` + `ld -Ttext=0x100060 --oformat binary` of this program, which
/// runs at 0x100060 (after a 52-byte ELF header, one 32-byte program header
/// and the 12-byte Multiboot header):
/// - checks EAX = 0x2BADB002 and the cmdline flag in the boot information;
/// - if the command line starts with 'S', writes it to port 0x8900
///   (the Bochs "Shutdown" port) and otherwise fails;
/// - prints the command line, then `STRING=CONTENTS` for every module;
/// - checks that PCI configuration reads and an unclaimed port read 0xff..;
/// - prints the fw_cfg signature, checks fw_cfg RAM_SIZE (low 32 bits) =
///   mem_upper * 1024 + 1 MiB;
/// - exits through port 0xf4 with 40 + fw_cfg NB_CPUS (99 on any failure).
///   The serial output polls LSR for "transmitter empty".
const KERNEL_CODE: &[u8] = &[
    0xbc, 0xf0, 0x2f, 0x10, 0x00, 0x3d, 0x02, 0xb0, 0xad, 0x2b, 0x0f, 0x85, 0xd9, 0x00, 0x00, 0x00, 0x89, 0xdd, 0xf6,
    0x45, 0x00, 0x04, 0x0f, 0x84, 0xcd, 0x00, 0x00, 0x00, 0x8b, 0x75, 0x10, 0x80, 0x3e, 0x53, 0x0f, 0x84, 0xcc, 0x00,
    0x00, 0x00, 0xe8, 0xd3, 0x00, 0x00, 0x00, 0xb0, 0x0a, 0xe8, 0xd9, 0x00, 0x00, 0x00, 0x8b, 0x4d, 0x14, 0x8b, 0x7d,
    0x18, 0x85, 0xc9, 0x74, 0x2d, 0x8b, 0x77, 0x08, 0xe8, 0xba, 0x00, 0x00, 0x00, 0xb0, 0x3d, 0xe8, 0xc0, 0x00, 0x00,
    0x00, 0x8b, 0x37, 0x8b, 0x5f, 0x04, 0x39, 0xde, 0x73, 0x08, 0xac, 0xe8, 0xb1, 0x00, 0x00, 0x00, 0xeb, 0xf4, 0xb0,
    0x0a, 0xe8, 0xa8, 0x00, 0x00, 0x00, 0x83, 0xc7, 0x10, 0x49, 0xeb, 0xcf, 0x66, 0xba, 0xf8, 0x0c, 0xb8, 0x00, 0x00,
    0x00, 0x80, 0xef, 0x66, 0xba, 0xfc, 0x0c, 0xed, 0x83, 0xf8, 0xff, 0x75, 0x6a, 0x66, 0xba, 0x34, 0x12, 0xec, 0x3c,
    0xff, 0x75, 0x61, 0x66, 0xba, 0x10, 0x05, 0x31, 0xc0, 0x66, 0xef, 0xb9, 0x04, 0x00, 0x00, 0x00, 0x66, 0xba, 0x11,
    0x05, 0xec, 0xe8, 0x6e, 0x00, 0x00, 0x00, 0xe2, 0xf4, 0xb0, 0x0a, 0xe8, 0x65, 0x00, 0x00, 0x00, 0x66, 0xba, 0x10,
    0x05, 0xb8, 0x03, 0x00, 0x00, 0x00, 0x66, 0xef, 0x66, 0xba, 0x11, 0x05, 0xb9, 0x04, 0x00, 0x00, 0x00, 0xec, 0xc1,
    0xc8, 0x08, 0xe2, 0xfa, 0x8b, 0x5d, 0x08, 0xc1, 0xe3, 0x0a, 0x81, 0xc3, 0x00, 0x00, 0x10, 0x00, 0x39, 0xd8, 0x75,
    0x17, 0x66, 0xba, 0x10, 0x05, 0xb8, 0x05, 0x00, 0x00, 0x00, 0x66, 0xef, 0x66, 0xba, 0x11, 0x05, 0x31, 0xc0, 0xec,
    0x83, 0xc0, 0x28, 0xeb, 0x05, 0xb8, 0x63, 0x00, 0x00, 0x00, 0x66, 0xba, 0xf4, 0x00, 0xef, 0xf4, 0x66, 0xba, 0x00,
    0x89, 0xac, 0x84, 0xc0, 0x74, 0xec, 0xee, 0xeb, 0xf8, 0xac, 0x84, 0xc0, 0x74, 0x07, 0xe8, 0x03, 0x00, 0x00, 0x00,
    0xeb, 0xf4, 0xc3, 0x52, 0x50, 0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8, 0x20, 0x74, 0xfb, 0x58, 0x66, 0xba, 0xf8, 0x03,
    0xee, 0x5a, 0xc3,
];

/// An ELF32 file: program headers `[paddr, offset, filesz, memsz]`, then
/// the Multiboot header (flags, checksum + `bad_sum`) and `code`.
fn elf32(phdrs: &[[u32; 4]], flags: u32, bad_sum: u32, entry: u32, code: &[u8]) -> Vec<u8> {
    let phoff = 52u32;
    let mb = phoff + 32 * phdrs.len() as u32;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0");
    for v in [2u16, 3] {
        f.extend_from_slice(&v.to_le_bytes()); // ET_EXEC, EM_386
    }
    for v in [1u32, entry, phoff, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    for v in [52u16, 32, phdrs.len() as u16, 40, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    for &[paddr, offset, filesz, memsz] in phdrs {
        for v in [1u32, offset, paddr, paddr, filesz, memsz, 7, 4096] {
            f.extend_from_slice(&v.to_le_bytes());
        }
    }
    assert_eq!(f.len() as u32, mb);
    let sum = 0u32.wrapping_sub(MB_MAGIC).wrapping_sub(flags).wrapping_add(bad_sum);
    for v in [MB_MAGIC, flags, sum] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(code);
    f
}

/// The working kernel: one segment, loaded at 1 MiB with 12 KiB of memory.
fn good_kernel() -> Vec<u8> {
    let len = 52 + 32 + 12 + KERNEL_CODE.len() as u32;
    elf32(&[[LOAD, 0, len, 0x3000]], 3, 0, LOAD + 0x60, KERNEL_CODE)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn multiboot_kernel_is_detected_and_gets_cmdline_modules_and_devices() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let k = write(dir.path(), "mb.elf", &good_kernel());
    let m1 = write(dir.path(), "one", b"first module");
    let m2 = write(dir.path(), "two", b"second");
    let one = format!("{},env-file", s(&m1));
    let r =
        run(&[s(&k), "-v", "--memory", "64M", "--cmdline", "hello multiboot", "--module", &one, "--module", s(&m2)]);
    let out = r.stdout();
    assert_eq!(r.status(), 41, "{out}\n{}", r.stderr());
    // The command line begins with the kernel's path, as GRUB and QEMU give it.
    assert!(out.contains(&format!("{} hello multiboot\n", s(&k))), "{out}");
    assert!(out.contains("env-file=first module\n"), "{out}");
    assert!(out.contains(&format!("{}=second\n", s(&m2))), "{out}");
    assert!(out.contains("QEMU\n"), "fw_cfg signature: {out}");
    assert!(r.stderr().contains("debug-exit"), "{}", r.stderr());
    assert!(r.stderr().contains("by Multiboot"), "detected: {}", r.stderr());
    // The read of port 0x1234 (PCI ports and fw_cfg are claimed).
    assert_eq!(r.stats()["unhandled_pio"], 1, "{}", r.stats());
}

#[test]
fn forced_multiboot_with_two_vcpus_reports_them_through_fw_cfg() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let k = write(dir.path(), "mb.elf", &good_kernel());
    // The AP waits for INIT/SIPI, which this kernel never sends.
    let r = run(&[s(&k), "--boot", "multiboot", "--vcpus", "2", "-v"]);
    assert_eq!(r.status(), 42, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stderr().contains("by Multiboot"), "{}", r.stderr());
}

#[test]
fn bochs_shutdown_port_stops_the_vm_with_status_0() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    // The kernel writes its command line to port 0x8900 when it starts with
    // 'S'; the line starts with the kernel's path, so the kernel is named
    // "Shutdown" and given by that relative path.
    write(dir.path(), "Shutdown", &good_kernel());
    let out = std::process::Command::new(VKVM)
        .current_dir(dir.path())
        .args(["run", "Shutdown", "--timeout", "60"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{}\n{err}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains("\"Shutdown\""), "{err}");
}

#[test]
fn pvh_forced_on_a_multiboot_kernel_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = write(dir.path(), "mb.elf", &good_kernel());
    let r = run(&[s(&k), "--boot", "pvh"]);
    assert_one_line_error(&r, 2, "64-bit");
}

/// Each bad kernel gets its one-line error (status 2) before KVM is opened.
fn refused(image: &[u8], extra: &[&str], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let k = write(dir.path(), "bad.elf", image);
    let mut args = vec![s(&k)];
    args.extend_from_slice(extra);
    let r = run(&args);
    assert_one_line_error(&r, 2, needle);
    assert_eq!(r.stderr().lines().count(), 1, "{}", r.stderr());
}

#[test]
fn bad_checksum_is_refused() {
    let len = 52 + 32 + 12 + KERNEL_CODE.len() as u32;
    let img = elf32(&[[LOAD, 0, len, 0x3000]], 3, 1, LOAD + 0x60, KERNEL_CODE);
    refused(&img, &[], "bad Multiboot header checksum");
}

#[test]
fn unknown_required_flag_is_refused() {
    let len = 52 + 32 + 12 + KERNEL_CODE.len() as u32;
    let img = elf32(&[[LOAD, 0, len, 0x3000]], 3 | 1 << 7, 0, LOAD + 0x60, KERNEL_CODE);
    refused(&img, &[], "unknown feature flag(s) 7");
    let img = elf32(&[[LOAD, 0, len, 0x3000]], 1 << 2, 0, LOAD + 0x60, KERNEL_CODE);
    refused(&img, &[], "video mode (flag 2)");
}

#[test]
fn segment_outside_memory_or_over_boot_data_is_refused() {
    let len = 52 + 32 + 12 + KERNEL_CODE.len() as u32;
    let img = elf32(&[[LOAD, 0, len, 64 << 20]], 3, 0, LOAD + 0x60, KERNEL_CODE);
    refused(&img, &["--memory", "32M"], "outside guest memory");
    // Over the boot information at 0x6000, the command line at 0x20000, and
    // the reserved range from 0x9fc00.
    let img = elf32(&[[0x5000, 0, len, 0x3000]], 3, 0, 0x5060, KERNEL_CODE);
    refused(&img, &[], "overlaps vkvm's Multiboot information");
    let img = elf32(&[[0x1f000, 0, len, 0x3000]], 3, 0, 0x1f060, KERNEL_CODE);
    refused(&img, &[], "overlaps vkvm's command line");
    let img = elf32(&[[0x9f000, 0, len, 0x3000]], 3, 0, 0x9f060, KERNEL_CODE);
    refused(&img, &[], "reserves (EBDA, VGA, BIOS)");
}

/// A kernel loaded below 1 MiB (at 0x8000, where real-mode trampolines
/// go) boots. Before: "outside guest memory".
#[test]
fn a_kernel_below_1_mib_boots() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let len = 52 + 32 + 12 + KERNEL_CODE.len() as u32;
    let k = write(dir.path(), "low.elf", &elf32(&[[0x8000, 0, len, 0x3000]], 3, 0, 0x8060, KERNEL_CODE));
    let r = run(&[s(&k), "--cmdline", "hello low"]);
    assert_eq!(r.status(), 41, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stdout().contains(&format!("{} hello low\n", s(&k))), "{}", r.stdout());
}

/// vkvm gives a Multiboot kernel `PATH ARGS` as its command line, as QEMU
/// does (the kernel prints it first; under QEMU's `pc` machine it then
/// fails its empty-PCI-bus check, which does not matter here). Before:
/// vkvm passed only ARGS.
#[test]
fn the_command_line_begins_with_the_kernel_path_as_in_qemu() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let k = write(dir.path(), "mb.elf", &good_kernel());
    let want = format!("{} A B\n", s(&k));
    let r = run(&[s(&k), "--cmdline", "A B"]);
    assert!(r.stdout().contains(&want), "vkvm: {}", r.stdout());
    need_qemu!();
    let out = std::process::Command::new("timeout")
        .args(["120", "qemu-system-x86_64", "-accel", "kvm", "-m", "64", "-nographic", "-no-reboot", "-net", "none"])
        .arg("-kernel")
        .arg(&k)
        .args(["-append", "A B", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&want), "QEMU: {stdout}");
}

#[test]
fn overlapping_segments_are_refused() {
    let img = elf32(&[[LOAD, 0, 0x80, 0x2000], [LOAD + 0x1000, 0, 0x80, 0x1000]], 3, 0, LOAD + 0x60, KERNEL_CODE);
    refused(&img, &[], "overlap");
}

#[test]
fn segment_beyond_the_file_is_refused() {
    let img = elf32(&[[LOAD, 0, 0x10_0000, 0x10_0000]], 3, 0, LOAD + 0x60, KERNEL_CODE);
    refused(&img, &[], "past the end of the file");
}

#[test]
fn missing_module_and_modules_on_pvh_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = write(dir.path(), "mb.elf", &good_kernel());
    let r = run(&[s(&k), "--module", "/no/such/module"]);
    assert_one_line_error(&r, 2, "module /no/such/module: No such file");
    let g = bundled_guest(dir.path());
    let r = run(&[s(&g), "--module", s(&k)]);
    assert_one_line_error(&r, 2, "--module needs a Multiboot boot");
}

#[test]
fn elf_with_neither_protocol_is_refused() {
    let mut img = good_kernel();
    let at = img.windows(4).position(|w| w == MB_MAGIC.to_le_bytes()).unwrap();
    img[at] = 0;
    refused(&img, &[], "no Multiboot header");
}

/// `vkvm guest --format multiboot`: the bundled guest as an ELF32.
fn multiboot_guest(dir: &Path) -> PathBuf {
    let p = dir.join("guest32.elf");
    let st =
        std::process::Command::new(VKVM).args(["guest", "--format", "multiboot", "--output"]).arg(&p).status().unwrap();
    assert!(st.success());
    p
}

fn counter(t: &serde_json::Value, k: &str) -> u64 {
    t[k].as_u64().unwrap_or_else(|| panic!("no counter {k} in {t}"))
}

#[test]
fn guest_multiboot_image_is_elf32_with_header_in_first_8k() {
    let dir = tempfile::tempdir().unwrap();
    let b = std::fs::read(multiboot_guest(dir.path())).unwrap();
    assert_eq!(&b[..5], b"\x7fELF\x01", "ELF32");
    assert_eq!(u16::from_le_bytes([b[18], b[19]]), 3, "EM_386");
    let at = b.windows(4).position(|w| w == MB_MAGIC.to_le_bytes()).expect("Multiboot header");
    assert!(at < 8192 && at % 4 == 0, "header at {at:#x}");
}

#[test]
fn bundled_guest_boots_by_multiboot_and_starts_its_ap_by_init_sipi() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let g = multiboot_guest(dir.path());
    let m = write(dir.path(), "env", b"NR_CPUS=2\n");
    for vcpus in [1u64, 2] {
        let n = vcpus.to_string();
        let r = run(&[s(&g), "--vcpus", &n, "--cmdline", "tests=selfcheck,fw-cfg", "--module", s(&m)]);
        let out = r.stdout();
        assert_eq!(r.status(), 0, "{out}\n{}", r.stderr());
        assert!(out.contains("via multiboot, 1 module(s)"), "{out}");
        // vkvm puts the kernel's path first; the guest drops it and finds its words.
        assert!(out.contains("cmdline 'tests=selfcheck,fw-cfg'"), "{out}");
        assert!(out.contains(&format!("{vcpus} cpu(s)")), "{out}");
        let tests = r.tests();
        let mut cpus: Vec<u64> = tests.iter().filter(|t| t["name"] == "selfcheck").map(|t| counter(t, "cpu")).collect();
        cpus.sort();
        assert_eq!(cpus, (0..vcpus).collect::<Vec<_>>(), "{tests:?}");
        let f = tests.iter().find(|t| t["name"] == "fw-cfg").unwrap();
        assert_eq!(f["status"], "pass", "{f}");
        assert_eq!(counter(f, "signature_ok"), 1);
        assert_eq!(counter(f, "nb_cpus"), vcpus);
        assert_eq!(counter(f, "max_cpus"), vcpus);
        assert_eq!(counter(f, "ram_mib"), 256);
        assert_eq!(counter(f, "files"), 0);
        assert_eq!(counter(f, "unknown_key"), 0);
        assert_eq!(counter(f, "id"), 1);
    }
}

#[test]
fn forced_multiboot_reports_guest_failures_and_elf64_has_no_live_header() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let g = multiboot_guest(dir.path());
    let r = run(&[s(&g), "--boot", "multiboot", "--memory", "64M", "--cmdline", "tests=selfcheck inject=selfcheck"]);
    assert_eq!(r.status(), 1, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stdout().contains("via multiboot"), "{}", r.stdout());
    assert!(r.stdout().contains(", 63 MiB RAM") || r.stdout().contains(", 64 MiB RAM"), "{}", r.stdout());
    // The ELF64 keeps its header dormant (QEMU would refuse a Multiboot ELF64).
    let g64 = bundled_guest(dir.path());
    let r = run(&[s(&g64), "--boot", "multiboot"]);
    assert_one_line_error(&r, 2, "no Multiboot header");
    // Without a kernel, --boot multiboot boots the bundled ELF32.
    let r = run(&["--boot", "multiboot", "--vcpus", "2"]);
    assert_eq!(r.status(), 0, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stdout().contains("via multiboot"), "{}", r.stdout());
    assert!(r.stdout().contains("cpu 1 (apic id"), "{}", r.stdout());
}

#[test]
fn same_multiboot_guest_boots_under_qemu_pc_on_1_and_2_cpus() {
    if !qemu_usable() {
        return;
    }
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let g = multiboot_guest(dir.path());
    for cpus in [1u64, 2] {
        let out = std::process::Command::new("timeout")
            .args(["120", "qemu-system-x86_64", "-accel", "kvm", "-m", "256"])
            .args(["-smp", &cpus.to_string(), "-nographic", "-no-reboot"])
            // No NIC: skips the iPXE option ROM, seconds under emulation.
            .args(["-net", "none"])
            .arg("-kernel")
            .arg(&g)
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-append", "tests=selfcheck,fw-cfg"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(stdout.contains("on another VMM"), "{stdout}\n{err}");
        assert!(stdout.contains("via multiboot"), "{stdout}");
        assert!(stdout.contains(&format!("{cpus} cpu(s)")), "{stdout}");
        for c in 0..cpus {
            assert!(stdout.contains(&format!("test selfcheck cpu {c}: pass")), "{stdout}");
        }
        assert!(
            stdout.contains(&format!(
                "test fw-cfg cpu 0: pass signature_ok=1 id=3 nb_cpus={cpus} max_cpus={cpus} ram_mib=256"
            )),
            "{stdout}"
        );
        assert!(stdout.contains("guest: all tests passed"), "{stdout}");
        // isa-debug-exit: status 0 from the guest becomes (0 << 1) | 1.
        assert_eq!(out.status.code(), Some(1), "{stdout}\n{err}");
    }
}

#[test]
fn elf64_with_pvh_note_is_detected_as_pvh_first() {
    need_kvm!();
    // The bundled ELF64 has a PVH note and a (dormant) Multiboot header.
    let r = run(&["-v", "--memory", "64M"]);
    assert_eq!(r.status(), 0, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stderr().contains("by PVH"), "{}", r.stderr());
    assert!(!r.stdout().contains("via multiboot"), "{}", r.stdout());
}

/// vkvm's own lines about a debug-exit write go to stderr: with stderr (and
/// stdout) closed the run still ends with the guest's status. Before: the
/// write panicked the vCPU thread and the VM never stopped.
#[test]
fn closed_stdout_and_stderr_do_not_stop_the_run() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let k = write(dir.path(), "mb.elf", &good_kernel());
    let mut child = std::process::Command::new(VKVM)
        .args(["run", s(&k), "--timeout", "60"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > std::time::Duration::from_secs(90) {
            child.kill().unwrap();
            panic!("vkvm did not stop with its output closed");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(41));
}
