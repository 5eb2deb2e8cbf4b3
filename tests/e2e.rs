//! End-to-end tests: boot the guest under vkvm (and QEMU) and check its
//! output, exit status and `--stats-json`.
//!
//! Tests that need KVM skip with a message when /dev/kvm cannot be opened,
//! unless VKVM_REQUIRE_KVM=1 (CI sets it when /dev/kvm exists): then they fail.

mod common;

use common::*;
use std::process::Command;

#[test]
fn bundled_guest_boots_to_ring3_and_passes_selfcheck() {
    need_kvm!();
    let r = run(&[]);
    assert_eq!(r.status(), 0, "{}\n{}", r.stdout(), r.stderr());
    let out = r.stdout();
    assert!(out.contains("vkvm-guest 0.1"), "no banner: {out}");
    assert!(out.contains("long mode, ring 3, on vkvm"), "{out}");
    assert!(out.contains("cpu 0 (apic id"), "{out}");
    let tests = r.tests();
    assert_eq!(tests.len(), 1, "{tests:?}");
    assert_eq!(tests[0]["name"], "selfcheck");
    assert_eq!(tests[0]["status"], "pass");
    assert_eq!(tests[0]["bytes"], 64 << 20);
    let s = r.stats();
    assert_eq!(s["exit_status"], 0);
    assert!(s["exits"]["io_out"].as_u64().unwrap() > 0, "{s}");
}

#[test]
fn injected_failure_names_the_address_and_exits_1() {
    need_kvm!();
    let r = run(&["--cmdline", "tests=selfcheck inject=selfcheck seed=7"]);
    assert_eq!(r.status(), 1, "{}", r.stdout());
    assert!(r.stdout().contains("first wrong address 0x"), "{}", r.stdout());
    let t = &r.tests()[0];
    assert_eq!(t["status"], "fail");
    assert!(t["detail"].as_str().unwrap().contains("expected 0x"), "{t}");
}

#[test]
fn two_vcpus_each_run_a_ring3_task_and_report() {
    need_kvm!();
    let r = run(&["--vcpus", "2"]);
    assert_eq!(r.status(), 0, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stdout().contains("cpu 1 (apic id"), "{}", r.stdout());
    let mut cpus: Vec<u64> = r.tests().iter().map(|t| t["cpu"].as_u64().unwrap()).collect();
    cpus.sort();
    assert_eq!(cpus, vec![0, 1]);
    assert!(r.tests().iter().all(|t| t["status"] == "pass" && t["bytes"] == 32 << 20));
}

#[test]
fn memory_option_sizes_the_guest() {
    need_kvm!();
    let r = run(&["--memory", "64M"]);
    assert_eq!(r.status(), 0, "{}", r.stderr());
    assert!(r.stdout().contains(", 63 MiB RAM") || r.stdout().contains(", 64 MiB RAM"), "{}", r.stdout());
}

#[test]
fn pio_bench_reports_a_median() {
    need_kvm!();
    let r = run(&["--cmdline", "tests=pio-bench pio-iters=2000"]);
    assert_eq!(r.status(), 0, "{}", r.stderr());
    let t = &r.tests()[0];
    assert_eq!(t["exits"], 2000);
    assert!(t["median_cycles"].as_u64().unwrap() > 0);
    assert!(r.stats()["exits"]["io_out"].as_u64().unwrap() >= 2000);
}

#[test]
fn hostile_hypercalls_get_error_codes_and_the_vm_keeps_running() {
    need_kvm!();
    let r = run(&["--cmdline", "tests=bad-hypercall,selfcheck"]);
    assert_eq!(r.status(), 0, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stderr().contains("unknown hypercall"), "{}", r.stderr());
    assert!(r.stats()["bad_hypercalls"].as_u64().unwrap() >= 4);
    assert_eq!(r.tests().len(), 2);
}

/// The guest's own status 2 (unknown test) is not vkvm's usage error 2:
/// vkvm exits 4 and `guest_exit_status` has the 2.
#[test]
fn unknown_test_is_reported_by_the_guest_with_its_status_2() {
    need_kvm!();
    let r = run(&["--cmdline", "tests=selfcheck,no-such-test"]);
    assert_eq!(r.status(), 4);
    assert_eq!(r.stats()["guest_exit_status"], 2);
    assert!(r.stdout().contains("unknown test 'no-such-test'"), "{}", r.stdout());
    assert!(r.stderr().contains("the guest exited with status 2"), "{}", r.stderr());
}

/// The bundled guest reports its own exception with status 3, which is
/// not vkvm's crash status: 4, and 3 in `guest_exit_status`.
#[test]
fn guest_exception_is_reported_by_the_guest_with_its_status_3() {
    need_kvm!();
    let r = run(&["--cmdline", "tests=crash"]);
    assert_eq!(r.status(), 4);
    assert_eq!(r.stats()["guest_exit_status"], 3);
    assert!(r.stats().get("crash").is_none(), "{}", r.stats());
    assert!(r.stdout().contains("guest exception: vector 14"), "{}", r.stdout());
}

/// Guest statuses that collide with vkvm's own (2, 3, 4), or that a shell
/// reads as signals (126 and up), or that do not fit a byte, give 4; the
/// rest pass through. `guest_exit_status` always has the guest's value.
#[test]
fn guest_exit_statuses_are_passed_on_unambiguously() {
    need_kvm!();
    for (guest, process) in [(0u64, 0), (1, 1), (2, 4), (3, 4), (4, 4), (42, 42), (125, 125), (130, 4), (1000, 4)] {
        let r = run(&["--memory", "64M", "--cmdline", &format!("tests=selfcheck exit-status={guest}")]);
        assert_eq!(r.status(), process, "guest status {guest}: {}", r.stderr());
        assert_eq!(r.stats()["guest_exit_status"], guest);
        assert_eq!(r.stats()["exit_status"], process);
    }
}

#[test]
fn triple_fault_prints_registers_and_exits_3() {
    need_kvm!();
    let r = run(&["--cmdline", "tests=triple-fault"]);
    assert_one_line_error(&r, 3, "guest triple fault");
    assert!(r.stderr().contains("rip=0x") && r.stderr().contains("cr3="), "{}", r.stderr());
    assert_eq!(r.stats()["exits"]["shutdown"], 1);
}

#[test]
fn timeout_stops_a_guest_that_never_exits() {
    need_kvm!();
    let r = run(&["--cmdline", "tests=hang", "--timeout", "1"]);
    assert_one_line_error(&r, 3, "did not exit within");
}

#[test]
fn missing_kvm_device_says_how_to_fix_it() {
    let r = run(&["--kvm-device", "/nonexistent/kvm"]);
    assert_one_line_error(&r, 2, "modprobe");
}

#[test]
fn a_file_that_is_not_kvm_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kvm");
    std::fs::write(&f, b"").unwrap();
    let r = run(&["--kvm-device", f.to_str().unwrap()]);
    assert_one_line_error(&r, 2, "cannot use");
}

#[test]
fn missing_guest_is_named() {
    let r = run(&["/no/such/guest.elf"]);
    assert_one_line_error(&r, 2, "/no/such/guest.elf");
}

#[test]
fn non_elf_guest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("script.sh");
    std::fs::write(&f, b"#!/bin/sh\necho not a kernel\n").unwrap();
    let r = run(&[f.to_str().unwrap()]);
    assert_one_line_error(&r, 2, "not an ELF");
}

#[test]
fn guest_subcommand_writes_a_bootable_elf() {
    let dir = tempfile::tempdir().unwrap();
    let p = bundled_guest(dir.path());
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF");
    if !kvm_usable() {
        return;
    }
    let r = run(&[p.to_str().unwrap()]);
    assert_eq!(r.status(), 0, "{}", r.stderr());
}

#[test]
fn elf_without_pvh_note_is_refused() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let p = bundled_guest(dir.path());
    let mut bytes = std::fs::read(&p).unwrap();
    let note: &[u8] = &[4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0];
    let at = bytes.windows(note.len()).position(|w| w == note).expect("PVH note in the bundled guest");
    bytes[at + 8] = 17;
    std::fs::write(&p, &bytes).unwrap();
    let r = run(&[p.to_str().unwrap()]);
    assert_one_line_error(&r, 2, "no PVH entry note");
}

#[test]
fn bad_memory_sizes_are_refused() {
    let r = run(&["--memory", "1000001"]);
    assert_one_line_error(&r, 2, "multiple of 4 KiB");
    let r = run(&["--memory", "2M"]);
    assert_one_line_error(&r, 2, "too small");
    let r = run(&["--memory", "lots"]);
    assert_one_line_error(&r, 2, "not a size");
}

#[test]
fn bad_vcpu_counts_are_refused() {
    let r = run(&["--vcpus", "0"]);
    assert_one_line_error(&r, 2, "--vcpus 0");
    need_kvm!();
    let r = run(&["--vcpus", "100000"]);
    assert_one_line_error(&r, 2, "out of range");
}

#[test]
fn same_guest_boots_under_qemu() {
    need_qemu!();
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let p = bundled_guest(dir.path());
    let out = Command::new("timeout")
        .args(["120", "qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off", "-accel", "kvm", "-m", "256"])
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(&p)
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-append", "tests=selfcheck"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("on another VMM"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("test selfcheck cpu 0: pass"), "{stdout}");
    // isa-debug-exit: status 0 from the guest becomes (0 << 1) | 1.
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn profile_writes_json_svg_and_a_table() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(VKVM)
        .args(["profile", "--cmdline", "tests=exit-storm storm-iters=500", "--timeout", "60", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("exit reason") && stdout.contains("io_out"), "{stdout}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("profile.json")).unwrap()).unwrap();
    let io_out = &j["exits"]["io_out"];
    assert!(io_out["count"].as_u64().unwrap() >= 1000, "{j}");
    let k = &io_out["kvm_run_ns"];
    assert!(
        k["p50"].as_u64().unwrap() <= k["p99"].as_u64().unwrap()
            && k["p99"].as_u64().unwrap() <= k["max"].as_u64().unwrap()
    );
    assert!(io_out["handle_ns"]["p50"].as_u64().unwrap() > 0);
    // Fault stages come from the uffd handler (exit-storm touches fresh stack and data pages).
    let stages = &j["fault_stages"];
    for k in ["delivery", "lookup", "chain_walk", "pager_io", "copy_zero", "install", "wake"] {
        assert!(stages.get(k).is_some(), "no fault stage {k}: {stages}");
    }
    assert!(stages["install"]["count"].as_u64().unwrap() > 0, "{stages}");
    let svg = std::fs::read_to_string(dir.path().join("profile.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("io_out KVM_RUN"), "svg lacks the series");
}

#[test]
fn torture_lists_and_runs_tests_in_fresh_vms() {
    let out = Command::new(VKVM).args(["torture", "--list"]).output().unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    for name in ["selfcheck", "seq-touch", "random-touch", "write-verify", "smp-storm", "exit-storm"] {
        assert!(list.lines().any(|l| l.starts_with(name)), "{name} missing from:\n{list}");
    }
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("t.json");
    let out = Command::new(VKVM)
        .args(["torture", "--test", "selfcheck", "--test", "smp-storm", "--seed", "5", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("verdict") && stdout.contains("smp-storm"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let v = v.as_array().unwrap();
    assert_eq!(v.len(), 2);
    assert!(v.iter().all(|t| t["status"] == "pass" && t["seed"] == 5), "{v:?}");
}

#[test]
fn torture_failure_names_the_first_wrong_address_and_exits_1() {
    need_kvm!();
    let out = Command::new(VKVM)
        .args(["torture", "--test", "write-verify", "--cmdline", "inject=write-verify wv-mib=8"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("write-verify vm 0 cpu 0: first wrong address 0x"), "{stdout}");
    assert!(stdout.contains("reproduce: ") && stdout.contains("inject=write-verify"), "{stdout}");
    for l in stdout.lines() {
        if let Some(d) = l.trim().strip_prefix("scratch files kept in ") {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
    let out = Command::new(VKVM).args(["torture", "--test", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown torture test 'nope'"));
}

#[test]
fn bench_compares_modes_in_one_run() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(VKVM)
        .args(["bench", "--runs", "1", "--memory", "64M", "--clone-sizes", "16", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("first touch, sequential") && stdout.contains("x)"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let seq = &v["cycles"]["first touch, sequential"];
    assert!(seq["prefault"].as_u64().unwrap() > 0 && seq["uffd"].as_u64().unwrap() > 0, "{v}");
    assert!(v["cycles"]["first touch from ring 0"]["exit"].as_u64().unwrap() > 0, "{v}");
    assert!(v["clone"]["16MiB"]["clone_ms"].as_f64().unwrap() > 0.0);
}
