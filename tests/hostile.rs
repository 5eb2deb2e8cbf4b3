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
