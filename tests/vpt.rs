//! End-to-end tests of VPAGETABLE windows: each `vpt-*` guest test under
//! vkvm with its counters and the `vpt` statistics checked, the torture
//! suite entries, and bad `--vpt-region` inputs.

mod common;

use common::*;

/// Explicit windows of 2, 3 and 4 levels (region 2 has 4 levels), instead of the defaults.
const LEVELS: &[&str] = &[
    "--vpt-region",
    "0xC0000000,16M,levels=2",
    "--vpt-region",
    "0xC1000000,16M,levels=3",
    "--vpt-region",
    "0xC2000000,16M,levels=4",
];

/// Run one guest test; it must pass on every CPU. Returns its reports.
fn vpt(test: &str, extra: &[&str]) -> (Run, Vec<serde_json::Value>) {
    let cmdline = format!("tests={test}");
    let mut args = vec!["--cmdline", &cmdline];
    args.extend_from_slice(extra);
    let r = run(&args);
    assert_eq!(r.status(), 0, "{test}: stdout: {}\nstderr: {}", r.stdout(), r.stderr());
    let tests = r.tests();
    assert!(!tests.is_empty() && tests.iter().all(|t| t["name"] == test && t["status"] == "pass"), "{tests:?}");
    (r, tests)
}

/// The default windows: 4 levels at 0xC0000000 (64 MiB, region 0, the one
/// returned), then 2 and 3 levels (16 MiB each).
fn default_window(r: &Run) -> &serde_json::Value {
    let w = &r.stats()["vpt"];
    assert_eq!(w.as_array().map(Vec::len), Some(3), "{w}");
    let spec = |i: usize| (w[i]["gpa"].as_u64(), w[i]["len"].as_u64(), w[i]["levels"].as_u64());
    assert_eq!(spec(0), (Some(0xC000_0000), Some(64 << 20), Some(4)));
    assert_eq!(spec(1), (Some(0xC400_0000), Some(16 << 20), Some(2)));
    assert_eq!(spec(2), (Some(0xC500_0000), Some(16 << 20), Some(3)));
    &w[0]
}

#[test]
fn linear_maps_through_ps_at_the_master_and_levels_1_to_3() {
    need_kvm!();
    let (r, t) = vpt("vpt-linear", &[]);
    assert_eq!(t[0]["levels"], 4);
    assert_eq!(t[0]["cases"], 4, "master + levels 1, 2, 3");
    assert_eq!(default_window(&r)["setmaps"], 4);
}

#[test]
fn two_three_and_four_level_walks_ignore_off_path_edits() {
    need_kvm!();
    let (r, t) = vpt("vpt-levels", LEVELS);
    assert_eq!(t[0]["walk_levels"], 3);
    let w = r.stats()["vpt"].as_array().cloned().unwrap();
    assert_eq!(w.iter().map(|w| w["levels"].as_u64().unwrap()).collect::<Vec<_>>(), vec![2, 3, 4]);
    assert!(w.iter().all(|w| w["setmaps"] == 1 && w["invals"] == 2), "{w:?}");
}

#[test]
fn levels_test_finds_its_windows_in_the_default_layout() {
    need_kvm!();
    let (r, t) = vpt("vpt-levels", &[]);
    assert_eq!(t[0]["walk_levels"], 3);
    default_window(&r);
    let w = r.stats()["vpt"].as_array().cloned().unwrap();
    assert!(w.iter().all(|w| w["setmaps"] == 1 && w["invals"] == 2), "{w:?}");
}

#[test]
fn levels_test_without_its_windows_names_what_is_missing() {
    need_kvm!();
    let r = run(&["--cmdline", "tests=vpt-levels", "--vpt-region", "0xC0000000,16M"]);
    assert_eq!(r.status(), 1);
    let t = &r.tests()[0];
    assert!(t["detail"].as_str().unwrap().contains("--vpt-region"), "{t}");
}

#[test]
fn aliases_share_one_page_with_ram() {
    need_kvm!();
    let (r, t) = vpt("vpt-alias", &[]);
    assert_eq!(t[0]["aliases"], 3);
    assert_eq!(t[0]["setmap_remaps"], 1);
    assert_eq!(default_window(&r)["invals"], 0, "setmap alone must drop old translations");
}

#[test]
fn clones_windows_see_only_their_own_vm() {
    need_kvm!();
    // Every clone has the default window; after the clone each VM writes
    // through its window and RAM and must see only its own data.
    let r = run(&["--clones", "2", "--cmdline", "tests=cow-clone,vpt-alias"]);
    assert_eq!(r.status(), 0, "stdout: {}\nstderr: {}", r.stdout(), r.stderr());
    let t = r.tests();
    let alias: Vec<_> = t.iter().filter(|t| t["name"] == "vpt-alias").collect();
    let mut vms: Vec<u64> = alias.iter().map(|t| t["vm"].as_u64().unwrap()).collect();
    vms.sort();
    assert_eq!(vms, vec![0, 1, 2], "one vpt-alias report per VM: {t:?}");
    assert!(t.iter().all(|t| t["status"] == "pass"), "{t:?}");
    assert!(alias.iter().all(|t| t["aliases"] == 3), "{alias:?}");
}

#[test]
fn read_only_at_any_level_refuses_writes_as_guest_page_faults() {
    need_kvm!();
    let (r, t) = vpt("vpt-ro", &[]);
    assert_eq!(t[0]["levels_checked"], 5);
    // One refused write per level, master included; the VM carried on.
    assert!(r.stats()["faults"]["guest_errors"].as_u64().unwrap() >= 5, "{}", r.stats());
}

#[test]
fn invalid_vptes_fault_and_hostile_arguments_get_errors() {
    need_kvm!();
    let (r, t) = vpt("vpt-invalid", &[]);
    assert_eq!(t[0]["fresh_fault"], 1, "a fresh window must fault before any setmap");
    assert_eq!(t[0]["levels_checked"], 5);
    assert_eq!(t[0]["hostile_args"], 8);
    assert_eq!(r.stats()["bad_hypercalls"], 8, "each hostile call is counted");
    // 1 fresh + 1 master-0 + 2 per level (read and write).
    assert!(r.stats()["faults"]["guest_errors"].as_u64().unwrap() >= 12, "{}", r.stats());
}

#[test]
fn accessed_and_modified_bits_follow_the_documented_rules() {
    need_kvm!();
    let (r, t) = vpt("vpt-am", &[]);
    assert_eq!(t[0]["checks"], 6);
    assert_eq!(default_window(&r)["invals"], 1);
}

#[test]
fn no_stale_translation_survives_inval_with_two_vcpus() {
    need_kvm!();
    let r = run(&["--vcpus", "2", "--cmdline", "tests=vpt-inval vpt-rounds=300"]);
    assert_eq!(r.status(), 0, "stdout: {}\nstderr: {}", r.stdout(), r.stderr());
    let t = r.tests();
    assert_eq!(t.len(), 2, "{t:?}");
    assert!(t.iter().all(|t| t["status"] == "pass"), "{t:?}");
    let cpu = |n: u64| t.iter().find(|t| t["cpu"] == n).unwrap_or_else(|| panic!("no report of cpu {n}: {t:?}"));
    assert_eq!(cpu(0)["rounds"], 300);
    assert_eq!(cpu(0)["stale"], 0);
    assert_eq!(cpu(0)["self_reads"], 300 / 8);
    assert_eq!(cpu(1)["stale"], 0);
    assert!(cpu(1)["reads"].as_u64().unwrap() > 0);
    assert!(cpu(1)["changes"].as_u64().unwrap() > 0, "the reader never saw a remap");
    assert_eq!(default_window(&r)["invals"], 300);
}

#[test]
fn frames_beyond_ram_fault_with_rsvd_distinct_from_invalid() {
    need_kvm!();
    let (_, t) = vpt("vpt-bounds", &["--memory", "64M"]);
    assert_eq!(t[0]["obj_pages"], 16384);
    assert_eq!(t[0]["rsvd_faults"], 8);
}

#[test]
fn torture_runs_the_vpt_tests_in_fresh_vms() {
    need_kvm!();
    let out = std::process::Command::new(VKVM).args(["torture", "--list"]).output().unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    for t in ["vpt-linear", "vpt-levels", "vpt-alias", "vpt-ro", "vpt-invalid", "vpt-am", "vpt-inval", "vpt-bounds"] {
        assert!(list.contains(t), "{t} missing from: {list}");
    }
    let out = std::process::Command::new(VKVM)
        .args(["torture", "--test", "vpt-levels", "--test", "vpt-inval", "--test", "vpt-bounds", "--timeout", "120"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.lines().filter(|l| l.starts_with("vpt-") && l.ends_with("pass")).count(), 3, "{text}");
}

#[test]
fn bad_vpt_regions_are_refused_with_one_line() {
    let r = run(&["--vpt-region", "0xC0000100,16M"]);
    assert_one_line_error(&r, 2, "multiples of 4 KiB");
    let r = run(&["--vpt-region", "0xC0000000,16M,levels=5"]);
    assert_one_line_error(&r, 2, "levels=5 is out of range");
    let r = run(&["--vpt-region", "0xC0000000,16M,levels=0"]);
    assert_one_line_error(&r, 2, "levels=0 is out of range");
    let r = run(&["--vpt-region", "0xC0000000"]);
    assert_one_line_error(&r, 2, "GPA,SIZE");
    need_kvm!();
    let r = run(&["--vpt-region", "0x1000000,16M"]);
    assert_one_line_error(&r, 2, "overlaps guest RAM");
    let r = run(&["--vpt-region", "0xC0000000,16M", "--vpt-region", "0xC0800000,16M"]);
    assert_one_line_error(&r, 2, "overlaps --vpt-region 0xc0000000");
    let r = run(&["--vpt-region", "0xEFF00000,2M"]);
    assert_one_line_error(&r, 2, "beyond the guest-physical space");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("data");
    std::fs::write(&f, vec![7u8; 8192]).unwrap();
    let spec = format!("{}@0xD0000000", f.display());
    let r = run(&["--map-file", &spec, "--vpt-region", "0xD0000000,16M"]);
    assert_one_line_error(&r, 2, "overlaps the --map-file at 0xd0000000");
}

#[test]
fn a_map_file_over_the_default_window_leaves_it_out() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("data");
    std::fs::write(&f, vec![7u8; 8192]).unwrap();
    let spec = format!("{}@0xC0000000", f.display());
    let r = run(&["--map-file", &spec]);
    assert_eq!(r.status(), 0, "{}", r.stderr());
    let levels: Vec<u64> = r.stats()["vpt"].as_array().unwrap().iter().map(|w| w["levels"].as_u64().unwrap()).collect();
    assert_eq!(levels, vec![2, 3], "only the window under the file is left out");
}
