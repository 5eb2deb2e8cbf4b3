//! Demand-paged guest memory end to end: fault counts, delivery modes,
//! swap, file-backed memory, refused accesses, and their bad inputs.

mod common;

use common::*;
use std::process::Command;

fn faults(r: &Run) -> &serde_json::Value {
    &r.stats()["faults"]
}

#[test]
fn selfcheck_over_256m_is_demand_paged() {
    need_kvm!();
    let r = run(&["--memory", "256M", "--cmdline", "tests=selfcheck,seq-touch"]);
    assert_eq!(r.status(), 0, "{}\n{}", r.stdout(), r.stderr());
    let f = faults(&r);
    assert_eq!(f["delivery"], "uffd");
    let zf = f["zero_fill"].as_u64().unwrap();
    assert!(zf > 30_000, "only {zf} zero-fill faults: {f}");
    assert!(f["events"].as_u64().unwrap() > 0);
    assert_eq!(f["guest_errors"], 0);
}

#[test]
fn prefault_populates_everything_before_the_guest_runs() {
    need_kvm!();
    let r = run(&["--memory", "64M", "--prefault", "--cmdline", "tests=seq-touch"]);
    assert_eq!(r.status(), 0, "{}", r.stderr());
    assert_eq!(faults(&r)["events"], 0, "{}", faults(&r));
    assert!(r.stats()["memory"]["present_pages"].as_u64().unwrap() >= 16384);
}

#[test]
fn exit_delivery_resolves_emulated_ring0_touches() {
    need_kvm!();
    let r = run(&["--fault-delivery", "exit", "--cmdline", "tests=kernel-touch"]);
    assert_eq!(r.status(), 0, "{}\n{}", r.stdout(), r.stderr());
    let f = faults(&r);
    assert_eq!(f["delivery"], "exit");
    assert!(r.stats()["exits"]["mmio_write"].as_u64().unwrap() >= 256, "{}", r.stats());
    assert!(f["events"].as_u64().unwrap() >= 256);
    assert_eq!(r.tests()[0]["pages"], 256);
}

#[test]
fn exit_delivery_explains_native_faults_it_cannot_see() {
    need_kvm!();
    let r = run(&["--fault-delivery", "exit", "--cmdline", "tests=seq-touch"]);
    assert_one_line_error(&r, 3, "--fault-delivery uffd");
}

#[test]
fn swap_working_set_four_times_the_budget() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let swap = dir.path().join("swap");
    let r = run(&[
        "--memory",
        "128M",
        "--phys-mem",
        "16M",
        "--swap",
        swap.to_str().unwrap(),
        "--cmdline",
        "tests=write-verify wv-mib=64 seed=9",
    ]);
    assert_eq!(r.status(), 0, "{}\n{}", r.stdout(), r.stderr());
    let p = &r.stats()["pageout"];
    assert!(p["pages_out"].as_u64().unwrap() > 1000, "{p}");
    assert!(p["pages_in"].as_u64().unwrap() > 1000, "{p}");
    assert!(faults(&r)["pager_in"].as_u64().unwrap() > 0);
    assert!(r.stats()["memory"]["resident_pages"].as_u64().unwrap() <= 4096, "{}", r.stats()["memory"]);
}

#[test]
fn smp_storm_with_pageout_loses_no_write() {
    need_kvm!();
    let r = run(&[
        "--vcpus",
        "2",
        "--memory",
        "128M",
        "--phys-mem",
        "12M",
        "--cmdline",
        "tests=smp-storm storm-mib=16 storm-rounds=2 seed=4",
    ]);
    assert_eq!(r.status(), 0, "{}\n{}", r.stdout(), r.stderr());
    assert_eq!(r.tests().len(), 2);
    assert!(r.stats()["pageout"]["pages_out"].as_u64().unwrap() > 0, "{}", r.stats());
}

#[test]
fn swap_read_error_stops_the_vm_instead_of_handing_out_zeros() {
    need_kvm!();
    let r = run(&[
        "--memory",
        "128M",
        "--phys-mem",
        "16M",
        "--inject-swap-fault",
        "read-eio",
        "--cmdline",
        "tests=write-verify wv-mib=64",
    ]);
    assert_one_line_error(&r, 3, "could not be brought in");
    assert!(!r.stdout().contains("first wrong address"), "the guest saw bad data: {}", r.stdout());
}

#[test]
fn full_swap_stops_the_vm_cleanly() {
    need_kvm!();
    let r = run(&[
        "--memory",
        "128M",
        "--phys-mem",
        "16M",
        "--swap-size",
        "4M",
        // The pager retries allocation a few hundred times, each after a
        // pageout pass whose writes fail, before giving up: allow for load.
        "--timeout",
        "300",
        "--cmdline",
        "tests=write-verify wv-mib=64",
    ]);
    assert_one_line_error(&r, 3, "out of memory");
}

#[test]
fn full_swap_shared_by_clones_stops_with_one_line() {
    need_kvm!();
    // Five VMs write their whole RAM into a 4 MiB budget and a 512 MiB swap
    // (the default would scale with --clones and fit): the swap fills while
    // the VMs still want new pages. Without the out-of-memory rule the VMs
    // thrashed on each other's clean pages until --timeout.
    let r = run(&[
        "--clones",
        "4",
        "--phys-mem",
        "4M",
        "--swap-size",
        "512M",
        "--timeout",
        "300",
        "--cmdline",
        "tests=cow-clone,write-verify",
    ]);
    assert_one_line_error(&r, 3, "the swap is full (512 MiB");
    let err = r.stderr();
    assert!(err.contains("raise --swap-size"), "{err}");
    assert!(!err.contains("--timeout"), "the VMs thrashed until the timeout: {err}");
    // Repeated warnings are rate-limited: a handful of lines, not millions.
    assert!(err.lines().count() < 50, "{} stderr lines", err.lines().count());
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

#[test]
fn file_map_hashes_match_and_modes_behave() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut padded = data.clone();
    padded.resize(data.len().div_ceil(4096) * 4096, 0);
    let (ro, sh, pr) = (dir.path().join("ro"), dir.path().join("shared"), dir.path().join("private"));
    for p in [&ro, &sh, &pr] {
        std::fs::write(p, &data).unwrap();
    }
    let arg = |p: &std::path::Path, at: &str, mode: &str| format!("{}@{at},{mode}", p.display());
    let (a, b, c) = (arg(&ro, "0x40000000", "ro"), arg(&sh, "0x41000000", "shared"), arg(&pr, "0x42000000", "private"));
    let r = run(&["--map-file", &a, "--map-file", &b, "--map-file", &c, "--cmdline", "tests=file-map"]);
    assert_eq!(r.status(), 0, "{}\n{}", r.stdout(), r.stderr());
    let t = &r.tests()[0];
    let want = fnv1a(&padded);
    for k in ["fnv0", "fnv1", "fnv2"] {
        assert_eq!(t[k].as_u64(), Some(want), "{k}: {t}");
    }
    // The read-only write came back to the guest as a #PF at the address.
    assert_eq!(t["ro_faults"], 1);
    assert!(faults(&r)["guest_errors"].as_u64().unwrap() >= 1);
    assert_eq!(std::fs::read(&ro).unwrap(), data, "read-only file changed");
    assert_eq!(std::fs::read(&pr).unwrap(), data, "private mapping wrote to its file");
    assert_eq!(std::fs::read(&sh).unwrap(), marked(&data, &[1]), "shared writes did not reach the file");
}

/// What the guest's file-map test leaves in a file written through the
/// shared regions `tagged`: the marker at 0 and each region's tag.
fn marked(data: &[u8], tagged: &[u64]) -> Vec<u8> {
    let mut want = data.to_vec();
    want[..16].copy_from_slice(b"vkvm wrote this\n");
    for &i in tagged {
        let at = 64 + 8 * i as usize;
        want[at..at + 8].copy_from_slice(&(0x6d61_7074_0000_0000u64 | i).to_le_bytes());
    }
    want
}

#[test]
fn one_file_mapped_several_times_is_one_object() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..16384u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let f = dir.path().join("f");
    std::fs::write(&f, &data).unwrap();
    let at = |gpa: &str, mode: &str| format!("{}@{gpa},{mode}", f.display());
    let maps =
        [at("0x40000000", "shared"), at("0x41000000", "shared"), at("0x42000000", "private"), at("0x43000000", "ro")];
    let mut args = vec!["--cmdline", "tests=file-map"];
    for m in &maps {
        args.extend(["--map-file", m.as_str()]);
    }
    let r = run(&args);
    assert_eq!(r.status(), 0, "{}\n{}", r.stdout(), r.stderr());
    let t = &r.tests()[0];
    // Shared 0 and 1 see each other (2 checks), and are seen by the ro map
    // (2); the private map's tag is seen by none of the other three (3).
    assert_eq!(t["same_file_checks"], 7, "{t}");
    // Both shared writes reach the file; the private one does not.
    assert_eq!(std::fs::read(&f).unwrap(), marked(&data, &[0, 1]));
}

#[test]
fn map_file_bad_inputs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f");
    std::fs::write(&f, vec![1u8; 5000]).unwrap();
    let p = f.to_str().unwrap();
    let r = run(&["--map-file", "/no/such/file@0x40000000"]);
    assert_one_line_error(&r, 2, "/no/such/file");
    let r = run(&["--map-file", &format!("{p}@0x40000000,size=1M")]);
    assert_one_line_error(&r, 2, "shorter than");
    let r = run(&["--map-file", &format!("{p}@0x1000")]);
    assert_one_line_error(&r, 2, "overlaps guest RAM");
    let r = run(&["--map-file", &format!("{p}@0x40000000"), "--map-file", &format!("{p}@0x40001000")]);
    assert_one_line_error(&r, 2, "overlaps --map-file");
    let r = run(&["--map-file", &format!("{p}@0x40000100")]);
    assert_one_line_error(&r, 2, "multiples of 4 KiB");
}

#[test]
fn memory_option_bad_inputs_are_refused() {
    let r = run(&["--phys-mem", "1M"]);
    assert_one_line_error(&r, 2, "at least 4 MiB");
    let r = run(&["--swap", "/tmp/vkvm-unused-swap"]);
    assert_one_line_error(&r, 2, "need --phys-mem");
    need_kvm!();
    let r = run(&["--phys-mem", "16M", "--swap", "/no/such/dir/swap"]);
    assert_one_line_error(&r, 2, "cannot create the swap file");
}

#[test]
fn torture_reports_fault_counts() {
    need_kvm!();
    let out = Command::new(VKVM).args(["torture", "--test", "seq-touch", "--memory", "64M"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let row = stdout.lines().find(|l| l.starts_with("seq-touch")).unwrap();
    let zero_fill: u64 = row.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(zero_fill > 10_000, "{row}");
}

#[test]
fn cow_clones_see_only_their_own_writes() {
    need_kvm!();
    let r = run(&["--clones", "3", "--cmdline", "tests=cow-clone clone-mib=8 seed=3"]);
    assert_eq!(r.status(), 0, "{}\n{}", r.stdout(), r.stderr());
    let mut vms: Vec<u64> = r.tests().iter().map(|t| t["vm"].as_u64().unwrap()).collect();
    vms.sort();
    assert_eq!(vms, vec![0, 1, 2, 3], "{:?}", r.tests());
    assert!(r.tests().iter().all(|t| t["status"] == "pass"), "{:?}", r.tests());
    let clones = r.stats()["clones"].as_array().unwrap().clone();
    assert_eq!(clones.len(), 3);
    for c in &clones {
        assert_eq!(c["outcome"]["exit_status"], 0, "{c}");
        assert!(c["clone_ms"].as_f64().unwrap() > 0.0);
    }
    assert!(r.stdout().contains("[clone 2] test cow-clone cpu 0: pass vm=2"), "{}", r.stdout());
    assert!(r.stats()["faults"]["cow_copy"].as_u64().unwrap() > 0);
}

#[test]
fn read_shared_clone_pages_are_one_host_page() {
    need_kvm!();
    // 32 MiB written before the clone; after it, each of the 4 VMs rewrites
    // the first 16 MiB and only reads the second. With one host page per
    // shared page the pool holds 32 + 4 x 16 MiB (plus the kernel's few
    // MiB); copies would make it 32 + 4 x 32 MiB. Clones are reclaimed as
    // they exit, so the peak is read as the first one is: every VM waits
    // ~1 s after writing (clone-wait) so that all have written by then.
    let r = run(&["--memory", "128M", "--clones", "3", "--cmdline", "tests=cow-clone clone-mib=32 clone-wait=3000"]);
    assert_eq!(r.status(), 0, "{}\n{}", r.stdout(), r.stderr());
    let host = r.stats()["memory"]["pool_peak_bytes"].as_u64().unwrap() >> 20;
    assert!(host >= 96, "the pool holds only {host} MiB: the test did not write what it should");
    assert!(host < 96 + 24, "the pool holds {host} MiB: read-shared pages were copied");
}

#[test]
fn clone_of_a_multi_vcpu_vm_is_refused_to_the_guest() {
    need_kvm!();
    let r = run(&["--vcpus", "2", "--cmdline", "tests=cow-clone"]);
    assert_eq!(r.status(), 1, "{}\n{}", r.stdout(), r.stderr());
    assert!(r.stdout().contains("CLONE failed: -22"), "{}", r.stdout());
    assert!(r.stderr().contains("single-vCPU"), "{}", r.stderr());
}
