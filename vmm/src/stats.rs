//! What `--stats-json` writes at exit.

use crate::abi;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

#[derive(Default)]
pub struct Stats {
    pub exits: crate::exit::ExitCounts,
    pub bad_hypercalls: AtomicU64,
}

/// One REPORT hypercall.
#[derive(Clone, Debug, Serialize)]
pub struct TestResult {
    pub name: String,
    pub status: &'static str,
    pub cpu: u32,
    /// The VM that reported it: 0 for the one vkvm booted, 1.. for clones.
    pub vm: u32,
    #[serde(flatten)]
    pub counters: Map<String, Value>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// REPORTs aggregated into this one (same VM, name and CPU).
    #[serde(skip_serializing_if = "is_one")]
    pub reports: u64,
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

/// Distinct (VM, test name, CPU) results kept; further ones are counted
/// in `reports_suppressed` only. Each takes about 1 KiB.
pub const MAX_RESULTS: usize = 1024;

/// The test results of a VM and its clones, aggregated per (VM, test name,
/// CPU) and bounded, so a guest that reports in a loop costs a counter.
#[derive(Default)]
pub struct Reports {
    inner: Mutex<ReportsInner>,
}

#[derive(Default)]
struct ReportsInner {
    index: HashMap<(u32, String, u32), usize>,
    list: Vec<TestResult>,
    suppressed: u64,
}

impl Reports {
    /// Add one REPORT: a repeat of a known (VM, name, CPU) replaces it
    /// unless that would hide a failure, and counts; a new one is kept
    /// while there is room.
    pub fn add(&self, r: TestResult) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = (r.vm, r.name.clone(), r.cpu);
        if let Some(&i) = g.index.get(&key) {
            let old = &mut g.list[i];
            let reports = old.reports + 1;
            if !(old.status == "fail" && r.status == "pass") {
                *old = r;
            }
            old.reports = reports;
        } else if g.list.len() < MAX_RESULTS {
            let i = g.list.len();
            g.index.insert(key, i);
            g.list.push(r);
        } else {
            g.suppressed += 1;
        }
    }
    pub fn snapshot(&self) -> Vec<TestResult> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).list.clone()
    }
    /// REPORTs dropped because `MAX_RESULTS` distinct results were kept.
    pub fn suppressed(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).suppressed
    }
}

/// NUL-padded guest text, with anything unprintable replaced.
fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    b[..end].iter().map(|&c| if c.is_ascii_graphic() || c == b' ' { c as char } else { '?' }).collect()
}

impl TestResult {
    /// Decode a `TestReport` (the caller checked its size).
    pub fn decode(b: &[u8]) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let name_end = abi::NAME_LEN;
        let status = u32_at(name_end);
        let cpu = u32_at(name_end + 4);
        let n = (u32_at(name_end + 8) as usize).min(abi::MAX_COUNTERS);
        let names = name_end + 16;
        let values = names + 16 * abi::MAX_COUNTERS;
        let detail = values + 8 * abi::MAX_COUNTERS;
        let mut counters = Map::new();
        for i in 0..n {
            let k = text(&b[names + 16 * i..names + 16 * (i + 1)]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[values + 8 * i..values + 8 * (i + 1)]);
            if !k.is_empty() && !matches!(k.as_str(), "name" | "status" | "cpu" | "detail") {
                counters.insert(k, json!(u64::from_le_bytes(v)));
            }
        }
        TestResult {
            name: text(&b[..name_end]),
            status: if status == abi::TEST_PASS { "pass" } else { "fail" },
            cpu,
            vm: 0,
            counters,
            detail: text(&b[detail..detail + abi::DETAIL_LEN]),
            reports: 1,
        }
    }
}

/// A child `vkvm run`'s `--stats-json`, or Null if it wrote none (it
/// crashed or was stopped before): callers then report what is missing.
pub fn read_json(path: &std::path::Path) -> Value {
    std::fs::read_to_string(path).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or(Value::Null)
}

#[cfg(test)]
mod test {
    use super::*;

    fn result(vm: u32, name: &str, cpu: u32, pass: bool) -> TestResult {
        TestResult {
            name: name.into(),
            status: if pass { "pass" } else { "fail" },
            cpu,
            vm,
            counters: Map::new(),
            detail: String::new(),
            reports: 1,
        }
    }

    #[test]
    fn repeats_aggregate_keep_failures_and_the_count_is_bounded() {
        let r = Reports::default();
        r.add(result(0, "a", 0, true));
        r.add(result(0, "a", 0, false));
        r.add(result(0, "a", 0, true));
        r.add(result(0, "a", 1, true));
        r.add(result(1, "a", 0, true));
        let s = r.snapshot();
        assert_eq!(s.len(), 3);
        assert_eq!((s[0].status, s[0].reports), ("fail", 3));
        for i in 0..2 * MAX_RESULTS {
            r.add(result(2, &format!("t{i}"), 0, true));
        }
        assert_eq!(r.snapshot().len(), MAX_RESULTS);
        assert_eq!(r.suppressed(), (2 * MAX_RESULTS - (MAX_RESULTS - 3)) as u64);
    }
}
