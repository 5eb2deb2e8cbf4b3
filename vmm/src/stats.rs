//! What `--stats-json` writes at exit.

use crate::abi;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::sync::atomic::AtomicU64;

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
        }
    }
}

/// A child `vkvm run`'s `--stats-json`, or Null if it wrote none (it
/// crashed or was stopped before): callers then report what is missing.
pub fn read_json(path: &std::path::Path) -> Value {
    std::fs::read_to_string(path).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or(Value::Null)
}
