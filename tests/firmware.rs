//! Firmware boot end to end: every guest run gives the same guest output and
//! exit status with `--boot direct` and `--boot firmware` (reset vector, real
//! mode, the bundled firmware, then the guest's PVH entry), and a missing or
//! corrupted boot-info structure stops vkvm with status 3 and the firmware's
//! message.
//!
//! Tests that need KVM skip with a message when /dev/kvm cannot be opened,
//! unless VKVM_REQUIRE_KVM=1: then they fail.

mod common;

use common::*;

/// Guest output lines, with what legitimately differs from run to run
/// masked: timings, and the APIC id that ring-3 CPUID may take from the host.
/// With several vCPUs the order of their lines is not fixed, so sort them.
fn guest_lines(r: &Run, sort: bool) -> Vec<String> {
    let mut lines: Vec<String> = r
        .stdout()
        .lines()
        // vkvm's own log lines go to stderr; drop any that reach stdout too.
        .filter(|l| !l.starts_with("vkvm: ") && !l.starts_with('['))
        .map(mask)
        .collect();
    if sort {
        lines.sort();
    }
    lines
}

fn mask(line: &str) -> String {
    let mut out = Vec::new();
    for word in line.split(' ') {
        let w = match word.split_once('=') {
            Some((k, _)) if k.ends_with("_cycles") || k.ends_with("_ns") || k == "tsc_khz" => {
                format!("{k}=_")
            }
            _ => word.to_string(),
        };
        out.push(w);
    }
    let s = out.join(" ");
    match s.find("(apic id ") {
        Some(i) => {
            let rest = &s[i + 9..];
            let end = rest.find(')').unwrap_or(rest.len());
            format!("{}(apic id _{}", &s[..i], &rest[end..])
        }
        None => s,
    }
}

/// Test names and results from `--stats-json`, sorted.
fn results(r: &Run) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = r
        .stats
        .as_ref()
        .map(|s| s["tests"].as_array().cloned().unwrap_or_default())
        .unwrap_or_default()
        .iter()
        .map(|t| (t["name"].to_string(), t["status"].to_string()))
        .collect();
    v.sort();
    v
}

/// Run `args` both ways; both must exit `status` with the same guest output.
fn same_both_ways(args: &[&str], status: i32) -> (Run, Run) {
    let sort = args.contains(&"--vcpus");
    let mut direct_args = args.to_vec();
    direct_args.extend(["--boot", "direct"]);
    let mut fw_args = args.to_vec();
    fw_args.extend(["--boot", "firmware"]);
    let d = run(&direct_args);
    let f = run(&fw_args);
    for (how, r) in [("direct", &d), ("firmware", &f)] {
        assert_eq!(r.status(), status, "--boot {how} {args:?}\nstdout: {}\nstderr: {}", r.stdout(), r.stderr());
        assert!(!r.stderr().contains("panicked"), "{}", r.stderr());
    }
    let (dl, fl) = (guest_lines(&d, sort), guest_lines(&f, sort));
    assert!(!dl.is_empty(), "no guest output for {args:?}");
    assert_eq!(dl, fl, "guest output differs for {args:?}");
    assert_eq!(results(&d), results(&f), "test results differ for {args:?}");
    (d, f)
}

#[test]
fn masking_keeps_what_must_match() {
    assert_eq!(mask("cpu 1 (apic id 17) running in ring 3"), "cpu 1 (apic id _) running in ring 3");
    assert_eq!(
        mask("test pio-bench cpu 0: pass exits=10 median_cycles=6 tsc_khz=2 median_ns=3"),
        "test pio-bench cpu 0: pass exits=10 median_cycles=_ tsc_khz=_ median_ns=_"
    );
}

#[test]
fn selfcheck_is_the_same_both_ways() {
    need_kvm!();
    let (_, f) = same_both_ways(&[], 0);
    assert!(f.stdout().contains("long mode, ring 3, on vkvm"));
    assert_eq!(f.tests()[0]["bytes"], 64 << 20);
}

#[test]
fn injected_failure_is_the_same_both_ways() {
    need_kvm!();
    let (_, f) = same_both_ways(&["--cmdline", "tests=selfcheck inject=selfcheck seed=7"], 1);
    assert!(f.stdout().contains("first wrong address 0x"));
}

#[test]
fn two_vcpus_are_the_same_both_ways() {
    need_kvm!();
    let (_, f) = same_both_ways(&["--vcpus", "2", "--cmdline", "tests=selfcheck,bad-hypercall"], 0);
    assert!(f.stdout().contains("cpu 1 (apic id"), "{}", f.stdout());
    assert!(f.stderr().contains("unknown hypercall"), "{}", f.stderr());
}

#[test]
fn memory_size_and_pio_bench_are_the_same_both_ways() {
    need_kvm!();
    same_both_ways(&["--memory", "64M"], 0);
    let (_, f) = same_both_ways(&["--cmdline", "tests=pio-bench pio-iters=2000"], 0);
    assert_eq!(f.tests()[0]["exits"], 2000);
}

#[test]
fn a_guest_file_boots_the_same_both_ways() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let p = bundled_guest(dir.path());
    same_both_ways(&[p.to_str().unwrap()], 0);
}

#[test]
fn guest_errors_are_the_same_both_ways() {
    need_kvm!();
    // The guest's own statuses 2 and 3 come out as 4 (see guest_exit_status).
    same_both_ways(&["--cmdline", "tests=selfcheck,no-such-test"], 4);
    let (_, f) = same_both_ways(&["--cmdline", "tests=crash"], 4);
    assert!(f.stdout().contains("guest exception: vector 14"));
    let (_, f) = same_both_ways(&["--cmdline", "tests=triple-fault"], 3);
    assert_one_line_error(&f, 3, "guest triple fault");
    let (_, f) = same_both_ways(&["--cmdline", "tests=hang", "--timeout", "1"], 3);
    assert_one_line_error(&f, 3, "did not exit within");
}

/// The firmware prints its line on COM1 (stdout) and vkvm's error is that line.
fn firmware_refuses(how: &str, vcpus: &str, message: &str) {
    let r = run(&["--boot", "firmware", "--boot-info-corrupt", how, "--vcpus", vcpus]);
    let line = format!("vkvm-firmware: {message}; halted");
    assert_one_line_error(&r, 3, &format!("vkvm: {line}"));
    assert_eq!(r.stderr().lines().count(), 1, "{}", r.stderr());
    assert!(r.stdout().lines().any(|l| l == line), "{}", r.stdout());
    assert!(!r.stdout().contains("vkvm-guest"), "the guest ran: {}", r.stdout());
    assert_eq!(r.stats()["crash"], line);
}

#[test]
fn missing_boot_info_stops_with_the_firmware_message() {
    need_kvm!();
    let m = "no boot info at 0x5000 (magic is not VKBI)";
    firmware_refuses("missing", "1", m);
    firmware_refuses("missing", "2", m);
}

#[test]
fn corrupted_boot_info_stops_with_the_firmware_message() {
    need_kvm!();
    firmware_refuses("checksum", "1", "boot info checksum mismatch");
    firmware_refuses("version", "1", "boot info version is not 1");
    firmware_refuses("size", "1", "boot info size is not 32");
    firmware_refuses("address", "1", "boot info PVH entry is 0 or above 4 GiB");
}

#[test]
fn corrupting_needs_firmware_boot() {
    let r = run(&["--boot-info-corrupt", "missing"]);
    assert_one_line_error(&r, 2, "only applies to --boot firmware");
}

/// The same ROM under QEMU: its own reset state, `-bios`, and the boot info,
/// start info, memory map and command line put in RAM by QEMU's loader
/// device, as vkvm would write them. The guest finds no vkvm there and exits
/// through isa-debug-exit.
#[test]
fn firmware_boots_the_guest_under_qemu() {
    need_qemu!();
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let elf = bundled_guest(dir.path());
    let rom = dir.path().join("rom.bin");
    let st = std::process::Command::new(VKVM).args(["firmware", "--output"]).arg(&rom).status().unwrap();
    assert!(st.success());
    assert_eq!(std::fs::metadata(&rom).unwrap().len(), 0x1_0000);

    let bytes = std::fs::read(&elf).unwrap();
    let note: &[u8] = &[4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0];
    let at = bytes.windows(note.len()).position(|w| w == note).expect("PVH note in the bundled guest");
    let entry = u32::from_le_bytes(bytes[at + 16..at + 20].try_into().unwrap());
    // Written from the README's tables, not from vkvm's code, so that the
    // documented layout is checked too. 0x5000 boot info, 0x6000
    // hvm_start_info, 0x7000 memory map.
    let mut low = vec![0u8; 0x2000 + 48];
    let mut words = [0u32; 8];
    words[0] = 0x4942_4b56;
    words[1] = 1 | (32 << 16);
    words[4] = entry;
    words[6] = 0x6000;
    words[2] = 0u32.wrapping_sub(words.iter().fold(0, |a: u32, w| a.wrapping_add(*w)));
    for (i, w) in words.iter().enumerate() {
        low[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    let put = |buf: &mut Vec<u8>, off: usize, v: &[u8]| buf[off..off + v.len()].copy_from_slice(v);
    put(&mut low, 0x1000, &0x336e_c578u32.to_le_bytes()); // magic
    put(&mut low, 0x1004, &1u32.to_le_bytes()); // version
    put(&mut low, 0x1018, &0x20000u64.to_le_bytes()); // cmdline_paddr
    put(&mut low, 0x1028, &0x7000u64.to_le_bytes()); // memmap_paddr
    put(&mut low, 0x1030, &2u32.to_le_bytes()); // memmap_entries
    for (i, (addr, size)) in [(0u64, 0x9_fc00u64), (0x10_0000, (256 << 20) - 0x10_0000)].into_iter().enumerate() {
        let e = 0x2000 + i * 24;
        put(&mut low, e, &addr.to_le_bytes());
        put(&mut low, e + 8, &size.to_le_bytes());
        put(&mut low, e + 16, &1u32.to_le_bytes()); // RAM
    }
    let low_path = dir.path().join("low.bin");
    std::fs::write(&low_path, &low).unwrap();
    let cmdline = dir.path().join("cmdline.bin");
    std::fs::write(&cmdline, b"tests=selfcheck\0").unwrap();

    let loader =
        |file: &std::path::Path, addr: &str| format!("loader,file={},addr={addr},force-raw=on", file.display());
    let out = std::process::Command::new("timeout")
        .args(["120", "qemu-system-x86_64", "-M", "pc", "-accel", "kvm"])
        .args(["-m", "256", "-nographic", "-no-reboot", "-monitor", "none"])
        .arg("-bios")
        .arg(&rom)
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .args(["-device", &format!("loader,file={}", elf.display())])
        .args(["-device", &loader(&low_path, "0x5000")])
        .args(["-device", &loader(&cmdline, "0x20000")])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("on another VMM"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("test selfcheck cpu 0: pass"), "{stdout}");
    // isa-debug-exit: status 0 from the guest becomes (0 << 1) | 1.
    assert_eq!(out.status.code(), Some(1));
}
