//! End-to-end tests of `vkvm torture --matrix` and `--soak`: features run
//! together (clones, budget, polling, windows, file maps), failures come with
//! a command that reproduces them, and a seed repeats a soak.

mod common;

use common::*;
use std::process::{Command, Output};

fn torture(args: &[&str]) -> Output {
    Command::new(VKVM).arg("torture").args(args).output().expect("run vkvm torture")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Removes the scratch directories a failed run kept, named in `stdout`.
fn remove_kept(stdout: &str) {
    for l in stdout.lines() {
        if let Some(d) = l.trim().strip_prefix("scratch files kept in ") {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The fixed slice of the matrix that CI runs (the README says so): 1 and 2
/// vCPUs, clones, a budget with swap, own 2/3/4-level windows and file maps,
/// every test that applies.
#[test]
fn matrix_slice_passes_with_features_combined() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("m.json");
    let o =
        torture(&["--matrix", "--slice", "3/8", "--memory", "64M", "--jobs", "2", "--json", json.to_str().unwrap()]);
    let (out, err) = text(&o);
    remove_kept(&out);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    assert!(out.contains("matrix: 8 configurations"), "{out}");
    assert!(out.contains("skipped smp-storm in") && out.contains("needs 2 vCPUs"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = v.as_array().unwrap();
    assert!(runs.iter().all(|r| r["status"] == "pass"));
    // The combinations that matter ran: clones with a budget, windows and
    // files in one VM, and 2 vCPUs.
    let ran = |f: &dyn Fn(&serde_json::Value) -> bool| runs.iter().any(|r| f(&r["config"]));
    assert!(ran(&|c| c["clones"] == 2 && c["budget"] == true && c["windows"] == "extra" && c["files"] == true));
    assert!(ran(&|c| c["vcpus"] == 2 && c["budget"] == true));
    assert!(runs.iter().any(|r| r["test"] == "clone-mix"), "clone-mix ran");
    assert!(runs.iter().any(|r| r["test"] == "vpt-alias" && r["config"]["clones"] == 2), "windows in clones");
}

#[test]
fn matrix_failures_print_a_command_that_reproduces_them() {
    need_kvm!();
    let o = torture(&[
        "--matrix",
        "--slice",
        "0/32",
        "--test",
        "write-verify",
        "--memory",
        "32M",
        "--cmdline",
        "inject=write-verify wv-mib=4",
    ]);
    let (out, err) = text(&o);
    remove_kept(&out);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    let cmd = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("reproduce: "))
        .unwrap_or_else(|| panic!("no reproduce line: {out}"));
    assert!(cmd.contains(" run ") && cmd.contains("inject=write-verify"), "{cmd}");
    let again = Command::new("sh").args(["-c", cmd]).output().unwrap();
    let (o2, e2) = text(&again);
    assert_eq!(again.status.code(), Some(1), "the command reproduces the failure: {o2}\n{e2}");
    assert!(o2.contains("first wrong address"), "{o2}");
}

#[test]
fn soak_runs_random_configurations_and_a_seed_repeats_it() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    for p in [&a, &b] {
        let o = torture(&["--soak", "15s", "--seed", "3", "--memory", "32M", "--json", p.to_str().unwrap()]);
        let (out, err) = text(&o);
        remove_kept(&out);
        assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
        assert!(out.contains("soak: seed 3:") && out.contains("distinct configurations"), "{out}");
    }
    let runs = |p: &std::path::Path| -> Vec<(String, String, u64)> {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| (r["test"].as_str().unwrap().into(), r["config"].to_string(), r["seed"].as_u64().unwrap()))
            .collect()
    };
    let (ra, rb) = (runs(&a), runs(&b));
    assert!(!ra.is_empty() && !rb.is_empty());
    // The same seed draws the same sequence; the time decides how far.
    let n = ra.len().min(rb.len());
    assert_eq!(ra[..n], rb[..n]);
    let o = torture(&["--soak", "10s", "--test", "selfcheck"]);
    assert_eq!(o.status.code(), Some(2), "--soak with --test is refused");
}
