//! A hostile guest (`tests=hostile`): it floods vkvm with CLONE, REPORT,
//! unknown hypercalls and accesses to unbacked addresses. vkvm must stay up,
//! answer every call as documented, and keep its log, memory, threads and
//! `--stats-json` bounded.

mod common;

use common::*;

/// Lines vkvm wrote about `needle` (its own log lines, not the guest's).
fn log_lines(r: &Run, needle: &str) -> usize {
    r.stderr().lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn guest_floods_give_a_few_log_lines_and_a_suppressed_count() {
    need_kvm!();
    let r = run(&["--cmdline", "tests=hostile hostile-clones=0 hostile-calls=20000 hostile-mmio=5000"]);
    assert_eq!(r.status(), 0, "{}\n{}", r.stdout(), r.stderr());
    let t = &r.tests()[0];
    assert_eq!(t["calls"], 20000, "{t}");
    let secs = r.stats()["elapsed_ms"].as_f64().unwrap() / 1e3;
    // At most 10 lines per kind per second, plus one "suppressed" line per second.
    let bound = ((secs.ceil() + 1.0) * 11.0) as usize;
    let unknown = log_lines(&r, "unknown hypercall");
    let unbacked = log_lines(&r, "unbacked");
    assert!(unknown <= bound && unbacked <= bound, "{unknown} / {unbacked} lines in {secs} s:\n{}", r.stderr());
    assert!(r.stderr().contains("suppressed"), "{}", r.stderr());
    let s = &r.stats()["log_suppressed"];
    let suppressed = s["unknown hypercall"].as_u64().unwrap();
    // Every call was either logged or counted as suppressed.
    let logged = r.stderr().lines().filter(|l| l.contains("vcpu 0: unknown hypercall")).count() as u64;
    assert_eq!(logged + suppressed, 20000, "{s}");
    assert!(s["unbacked guest-physical access"].as_u64().unwrap() > 9000, "{s}");
    assert_eq!(r.stats()["bad_hypercalls"], 20000);
}

/// The guest's own result line for test `name`, from its console.
fn result_line(r: &Run, name: &str) -> String {
    let prefix = format!("test {name} cpu 0: ");
    r.stdout().lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {prefix}: {}", r.stdout())).into()
}

/// `key=N` from a guest result line.
fn field(line: &str, key: &str) -> u64 {
    let k = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&k))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} in {line}"))
}

#[test]
fn a_report_flood_is_aggregated_and_bounded() {
    need_kvm!();
    let r = run(&["--cmdline", "tests=hostile hostile-clones=0 hostile-reports=20000"]);
    assert_eq!(r.status(), 0, "{}\n{}", r.stdout(), r.stderr());
    assert_eq!(field(&result_line(&r, "hostile"), "reports"), 20000);
    let tests = r.tests();
    assert_eq!(tests.len(), 1024, "results kept");
    let kept: u64 = tests.iter().map(|t| t["reports"].as_u64().unwrap_or(1)).sum();
    let suppressed = r.stats()["reports_suppressed"].as_u64().unwrap();
    // 20,000 flood reports and the test's own: each is kept, aggregated or counted.
    assert_eq!(kept + suppressed, 20001);
    assert!(tests.iter().any(|t| t["name"] == "hostile-0" && t["reports"] == 5), "{:?}", &tests[..2]);
    let size = std::fs::metadata(r.dir.path().join("stats.json")).unwrap().len();
    assert!(size < 1 << 20, "--stats-json is {size} bytes");
}

/// Peak resident memory (VmHWM, KiB), most threads and most open fds of a
/// running process, sampled every 20 ms until it exits.
struct Peaks {
    hwm_kib: u64,
    threads: u64,
    fds: u64,
}

fn run_sampled(cmd: &mut std::process::Command) -> (std::process::Output, Peaks) {
    let child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let mut peaks = Peaks { hwm_kib: 0, threads: 0, fds: 0 };
    let sampler = std::thread::spawn(move || {
        while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if status.contains("State:\tZ") {
                break;
            }
            let get = |k: &str| {
                status.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.split_whitespace().next()?.parse().ok())
            };
            peaks.hwm_kib = peaks.hwm_kib.max(get("VmHWM:").unwrap_or(0));
            peaks.threads = peaks.threads.max(get("Threads:").unwrap_or(0));
            let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
            peaks.fds = peaks.fds.max(fds);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        peaks
    });
    let out = child.wait_with_output().unwrap();
    (out, sampler.join().unwrap())
}

/// The figures in the README ("Limits"): 10,000 CLONEs, each clone exiting
/// at once after the first refusal. Before the limits, ~800 clones held
/// 5.5 GB, 1,600 threads and 2,400 fds, and vkvm then aborted.
#[test]
fn ten_thousand_clones_stay_bounded_and_past_the_cap_the_guest_gets_eagain() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    // A shared page the held clones watch: they exit once the parent is refused.
    let flag = dir.path().join("flag");
    std::fs::write(&flag, [0u8; 4096]).unwrap();
    let stats = dir.path().join("stats.json");
    let (out, peaks) = run_sampled(
        std::process::Command::new(VKVM)
            .args(["run", "--timeout", "600", "--cmdline", "tests=hostile hostile-clones=10000"])
            .arg("--map-file")
            .arg(format!("{}@0xd0000000,shared", flag.display()))
            .arg("--stats-json")
            .arg(&stats),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("10,000 CLONEs: peak RSS {} MiB, {} threads, {} fds", peaks.hwm_kib >> 10, peaks.threads, peaks.fds);
    // The run ends with the guest's status.
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let line = stdout.lines().find(|l| l.starts_with("test hostile cpu 0: ")).expect("hostile result");
    let (made, refused) = (field(line, "clones"), field(line, "refused"));
    assert_eq!(made + refused, 10000, "{line}");
    // The first 64 clones stay alive until the parent is refused: exactly at the cap.
    assert_eq!(field(line, "first_refusal"), 64, "{line}");
    assert!(refused >= 1, "{line}");
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let limits = &s["clone_limits"];
    assert_eq!(limits["made"], made, "{limits}");
    assert_eq!(limits["peak_alive"], 64, "{limits}");
    assert_eq!(s["clones"].as_array().unwrap().len(), 256);
    // 64 clones of 3 threads each (vCPU, userfaultfd handler, and the
    // "kvm-nx-lpage-recovery" worker KVM puts in the process for each VM),
    // plus vkvm's own; about 5 fds per clone.
    assert!(peaks.threads <= 3 * 65 + 16, "{} threads", peaks.threads);
    assert!(peaks.fds <= 6 * 64 + 32, "{} fds", peaks.fds);
    assert!(peaks.hwm_kib < 1 << 20, "peak RSS {} MiB", peaks.hwm_kib >> 10);
}

/// Out of file descriptors in the middle of CLONEs: the guest gets -ENOMEM,
/// the run ends cleanly with status 3 and a message, never an abort.
#[test]
fn a_host_failure_during_clone_is_a_clean_status_3() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("flag");
    std::fs::write(&flag, [0u8; 4096]).unwrap();
    let mut cmd = std::process::Command::new(VKVM);
    cmd.args(["run", "--timeout", "120", "--cmdline", "tests=hostile hostile-clones=64"])
        .arg("--map-file")
        .arg(format!("{}@0xd0000000,shared", flag.display()));
    // SAFETY: setrlimit in the child before exec; nothing else runs there.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 64, rlim_max: 64 };
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("host failure during CLONE"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Out of file descriptors at start, at every step: a clean status 3 with
/// a one-line message (or a run that fits), never a panic or an abort.
#[test]
fn a_host_failure_at_start_is_a_clean_status_3() {
    need_kvm!();
    let mut failed = 0;
    for n in 4..16u64 {
        let mut cmd = std::process::Command::new(VKVM);
        cmd.args(["run", "--memory", "64M", "--timeout", "60"]);
        // SAFETY: setrlimit in the child before exec; nothing else runs there.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                let lim = libc::rlimit { rlim_cur: n, rlim_max: n };
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => {}
            Some(3) => {
                failed += 1;
                assert!(err.lines().any(|l| l.starts_with("vkvm: ")), "{n} fds: {err}");
            }
            other => panic!("{n} fds: status {other:?}: {err}"),
        }
        assert!(!err.contains("panicked"), "{n} fds: {err}");
    }
    assert!(failed > 0, "no limit made vkvm fail: the test tests nothing");
}
