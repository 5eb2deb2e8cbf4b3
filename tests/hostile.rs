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
