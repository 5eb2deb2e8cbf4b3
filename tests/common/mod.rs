//! Helpers shared by the end-to-end test targets: run vkvm, read its
//! `--stats-json`, and skip (or fail, with VKVM_REQUIRE_KVM=1) without KVM.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const VKVM: &str = env!("CARGO_BIN_EXE_vkvm");

pub fn kvm_usable() -> bool {
    let ok = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if !ok && std::env::var("VKVM_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("VKVM_REQUIRE_KVM=1 but /dev/kvm cannot be opened");
    }
    if !ok {
        eprintln!("skipping: /dev/kvm is not usable here");
    }
    ok
}

/// Is QEMU installed? Without it, tests that cross-check with QEMU skip,
/// unless VKVM_REQUIRE_QEMU=1 (CI installs it): then they fail.
pub fn qemu_usable() -> bool {
    let ok = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok && std::env::var("VKVM_REQUIRE_QEMU").as_deref() == Ok("1") {
        panic!("VKVM_REQUIRE_QEMU=1 but qemu-system-x86_64 is not installed");
    }
    if !ok {
        eprintln!("skipping: qemu-system-x86_64 is not installed");
    }
    ok
}

#[macro_export]
macro_rules! need_qemu {
    () => {
        if !$crate::common::qemu_usable() {
            return;
        }
    };
}

#[macro_export]
macro_rules! need_kvm {
    () => {
        if !$crate::common::kvm_usable() {
            return;
        }
    };
}

pub struct Run {
    pub out: Output,
    pub stats: Option<Value>,
    pub dir: tempfile::TempDir,
}

impl Run {
    pub fn status(&self) -> i32 {
        self.out.status.code().expect("vkvm was killed by a signal")
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    pub fn stats(&self) -> &Value {
        self.stats.as_ref().expect("no --stats-json written")
    }
    pub fn tests(&self) -> Vec<Value> {
        self.stats()["tests"].as_array().cloned().unwrap_or_default()
    }
}

/// `vkvm run ARGS --stats-json TMP --timeout 60`.
pub fn run(args: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    let out = Command::new(VKVM)
        .arg("run")
        .args(args)
        .arg("--stats-json")
        .arg(&stats)
        .args(if args.contains(&"--timeout") { &[][..] } else { &["--timeout", "60"][..] })
        .output()
        .expect("run vkvm");
    let stats = std::fs::read_to_string(&stats).ok().map(|s| serde_json::from_str(&s).expect("stats JSON parses"));
    Run { out, stats, dir }
}

pub fn assert_one_line_error(r: &Run, status: i32, needle: &str) {
    assert_eq!(r.status(), status, "stdout: {}\nstderr: {}", r.stdout(), r.stderr());
    let err = r.stderr();
    assert!(err.contains(needle), "stderr does not mention {needle:?}: {err}");
    assert!(!err.contains("panicked"), "vkvm panicked: {err}");
}

pub fn bundled_guest(dir: &Path) -> PathBuf {
    let p = dir.join("guest.elf");
    let st = Command::new(VKVM).args(["guest", "--output"]).arg(&p).status().unwrap();
    assert!(st.success());
    p
}
