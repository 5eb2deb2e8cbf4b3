//! `vkvm torture`: the guest memory torture suite. Each test runs in a fresh
//! VM (a child `vkvm run`, so a crash or hang in one cannot touch the next),
//! with a progress bar on a terminal and a summary table at the end.

use crate::cli::RunArgs;
use crate::error::Error;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A torture test: a guest test plus the VM it needs.
pub struct Torture {
    pub name: &'static str,
    pub about: &'static str,
    /// Guest command-line words beyond `tests=NAME seed=N`.
    pub cmdline: &'static str,
    /// vCPUs, if the test needs more than the user asked for.
    pub min_vcpus: u32,
    /// `vkvm run` options the test needs (`{mem/4}` is a quarter of --memory,
    /// `{file}` a scratch file of 1 MiB of seeded bytes).
    pub run_args: &'static [&'static str],
}

const fn t(name: &'static str, about: &'static str, cmdline: &'static str, min_vcpus: u32) -> Torture {
    Torture { name, about, cmdline, min_vcpus, run_args: &[] }
}

/// A VPAGETABLE test; `run_args` lays out its windows (default: vkvm's own).
const fn vpt(name: &'static str, about: &'static str, min_vcpus: u32, run_args: &'static [&'static str]) -> Torture {
    Torture { name, about, cmdline: "", min_vcpus, run_args }
}

const fn with(mut t: Torture, run_args: &'static [&'static str]) -> Torture {
    t.run_args = run_args;
    t
}

/// Windows of 2, 3 and 4 levels for `vpt-levels` (region 2 is the 4-level one).
const VPT_LEVELS: &[&str] = &[
    "--vpt-region",
    "0xC0000000,16M,levels=2",
    "--vpt-region",
    "0xC1000000,16M,levels=3",
    "--vpt-region",
    "0xC2000000,16M,levels=4",
];

#[rustfmt::skip]
pub static SUITE: &[Torture] = &[
    t("selfcheck", "write and verify 64 MiB with address-derived values", "", 1),
    t("seq-touch", "first touch of every free guest page in order", "", 1),
    t("random-touch", "first touch of every free guest page in a seeded random order", "", 1),
    t("write-verify", "address-derived patterns over all free guest memory, rewritten and re-read", "", 1),
    t("smp-storm", "2+ vCPUs write interleaved words of the same pages in seeded orders", "", 2),
    t("exit-storm", "PIO out, port read and hypercall loops", "storm-iters=5000", 1),
    with(t("swap-storm", "write-verify over 4x the resident budget: pageout and page-in", "", 1),
         &["--phys-mem", "{mem/4}"]),
    with(t("cow-clone", "clone the VM twice; each writes its own data and sees only it", "", 1), &["--clones", "2"]),
    with(t("file-map", "a file mapped read-only, shared and private: hashes, writes, refused write", "", 1),
         &["--map-file", "{file}@0xd0000000,ro", "--map-file", "{file}.shared@0xd0200000,shared",
           "--map-file", "{file}.private@0xd0400000,private"]),
    with(t("kernel-touch", "ring 0 touches fresh pages at boot; delivered as KVM exits", "", 1),
         &["--fault-delivery", "exit"]),
    vpt("vpt-linear", "VPAGETABLE: large-page bit in the master and at levels 1-3 gives a linear map", 1, &[]),
    vpt("vpt-levels", "VPAGETABLE: 2-, 3- and 4-level walks; an edit off the path changes nothing", 1, VPT_LEVELS),
    vpt("vpt-alias", "VPAGETABLE: two window pages and RAM share one page", 1, &[]),
    vpt("vpt-ro", "VPAGETABLE: a write through a read-only vpte at any level faults, writes nothing", 1, &[]),
    vpt("vpt-invalid", "VPAGETABLE: V clear at any level (master too) faults; no A/M written", 1, &[]),
    vpt("vpt-am", "VPAGETABLE: accessed/modified bits, M re-set after clear + inval", 1, &[]),
    vpt("vpt-inval", "VPAGETABLE: one vCPU remaps + invals while another reads: nothing stale", 2, &[]),
    vpt("vpt-bounds", "VPAGETABLE: a frame beyond guest RAM is a distinct fault (RSVD)", 1, &[]),
];

pub fn list() -> String {
    SUITE.iter().map(|t| format!("{:<14} {}\n", t.name, t.about)).collect()
}

/// One finished test.
struct Outcome {
    name: &'static str,
    pass: bool,
    verdict: String,
    pages: Option<u64>,
    stats: Value,
    elapsed: Duration,
    detail: String,
}

pub fn command(run: &RunArgs, tests: &[String], seed: u64, json_out: Option<&Path>) -> Result<u8, Error> {
    // The options every child gets: a bad one is one error now, not one per test.
    run.validate(None)?;
    let mut json_file = json_out.map(|p| crate::inputs::OutFile::create(p, "--json")).transpose()?;
    let chosen: Vec<&Torture> = if tests.is_empty() {
        SUITE.iter().collect()
    } else {
        tests
            .iter()
            .map(|n| {
                SUITE.iter().find(|t| t.name == n).ok_or_else(|| {
                    Error::Config(format!("unknown torture test '{n}' (vkvm torture --list shows them)"))
                })
            })
            .collect::<Result<_, _>>()?
    };
    let exe = std::env::current_exe().map_err(Error::io("cannot find the vkvm executable"))?;
    let tty = std::io::stderr().is_terminal();
    let mut results = Vec::new();
    for t in chosen {
        let bar = tty.then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} {prefix:<14} {elapsed:>4} {msg}").expect("valid template"),
            );
            b.set_prefix(t.name);
            b.set_message("running");
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        let r = run_one(&exe, run, t, seed);
        if let Some(b) = &bar {
            if r.is_err() {
                b.abandon();
            }
        }
        let r = r?;
        match bar {
            Some(b) => b.finish_with_message(r.verdict.clone()),
            None => {
                crate::status::eprint_line(&format!("{:<14} {} ({:.2} s)", t.name, r.verdict, r.elapsed.as_secs_f64()))
            }
        }
        results.push(r);
    }
    let mut text = table(&results);
    for r in results.iter().filter(|r| !r.pass && !r.detail.is_empty()) {
        text += &format!("{}: {}\n", r.name, r.detail);
    }
    crate::status::print(&text)?;
    if let Some(f) = &mut json_file {
        let v: Vec<Value> = results
            .iter()
            .map(|r| {
                json!({
                    "test": r.name, "status": if r.pass { "pass" } else { "fail" }, "verdict": r.verdict,
                    "pages": r.pages, "faults": r.stats.get("faults"), "pageout": r.stats.get("pageout"),
                    "elapsed_ms": r.elapsed.as_secs_f64() * 1e3, "detail": r.detail, "seed": seed,
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&v).map_err(|e| Error::Crash(e.to_string()))?;
        f.write(&(text + "\n"))?;
    }
    Ok(if results.iter().all(|r| r.pass) { 0 } else { 1 })
}

/// Run one test in a child `vkvm run`. A SIGINT/SIGTERM is forwarded to
/// the child; once it has stopped, this returns `Error::Interrupted` and
/// the scratch directory is removed (on drop) before vkvm exits.
fn run_one(exe: &Path, run: &RunArgs, t: &Torture, seed: u64) -> Result<Outcome, Error> {
    if let Some(sig) = crate::signals::pending() {
        return Err(Error::Interrupted(sig));
    }
    let dir = tempfile::tempdir().map_err(Error::io("cannot create a scratch directory"))?;
    let stats_path: PathBuf = dir.path().join("stats.json");
    let guest_test = if t.name == "swap-storm" { "write-verify" } else { t.name };
    let mut cmdline = format!("tests={guest_test} seed={seed} {}", t.cmdline);
    if !run.cmdline.is_empty() {
        cmdline = format!("{cmdline} {}", run.cmdline);
    }
    let mut cmd = Command::new(exe);
    cmd.arg("run");
    if let Some(g) = &run.guest {
        cmd.arg(g);
    }
    cmd.args(["--memory", &run.memory.to_string(), "--vcpus", &run.vcpus.max(t.min_vcpus).to_string()])
        .args(["--cmdline", cmdline.trim(), "--timeout", &run.timeout.unwrap_or(300.0).to_string()])
        .arg("--kvm-device")
        .arg(&run.kvm_device)
        .arg("--stats-json")
        .arg(&stats_path);
    let file = dir.path().join("file");
    if t.run_args.iter().any(|a| a.contains("{file}")) {
        let bytes: Vec<u8> =
            (0..1u64 << 20).map(|i| (i.wrapping_mul(seed | 1).wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        for suffix in ["", ".shared", ".private"] {
            std::fs::write(format!("{}{suffix}", file.display()), &bytes)
                .map_err(Error::io("cannot write a scratch file"))?;
        }
    }
    for a in t.run_args {
        let mem4 = (run.memory / 4).max(crate::cli::MIN_PHYS_MEM).to_string();
        cmd.arg(a.replace("{mem/4}", &mem4).replace("{file}", &file.display().to_string()));
    }
    let started = Instant::now();
    let out = crate::child::run(&mut cmd, dir.path(), "run")?;
    let elapsed = started.elapsed();
    if let Some(sig) = out.interrupted {
        return Err(Error::Interrupted(sig));
    }
    let stats: Value = crate::stats::read_json(&stats_path);
    let tests = stats["tests"].as_array().cloned().unwrap_or_default();
    let code = out.code.unwrap_or(3);
    let pass = code == 0 && !tests.is_empty() && tests.iter().all(|t| t["status"] == "pass");
    let detail = tests
        .iter()
        .find_map(|t| t["detail"].as_str().filter(|d| !d.is_empty()).map(|d| format!("cpu {}: {d}", t["cpu"])))
        .unwrap_or_else(|| {
            if pass {
                String::new()
            } else {
                let err = String::from_utf8_lossy(&out.stderr);
                err.lines().filter(|l| l.starts_with("vkvm:")).collect::<Vec<_>>().join(" ")
            }
        });
    let verdict = if pass { "pass".to_string() } else { format!("FAIL (status {code})") };
    let pages = tests.iter().filter_map(|t| t["pages"].as_u64()).reduce(|a, b| a + b);
    Ok(Outcome { name: t.name, pass, verdict, pages, stats, elapsed, detail })
}

fn table(results: &[Outcome]) -> String {
    let n = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let f = |r: &Outcome, k: &str| n(r.stats["faults"][k].as_u64());
    let p = |r: &Outcome, k: &str| n(r.stats["pageout"][k].as_u64());
    let mut s = format!(
        "{:<14} {:>8} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8}  {}\n",
        "test", "pages", "zero_fill", "soft", "cow", "pager_in", "pages_out", "time (s)", "exits", "verdict"
    );
    for r in results {
        let cow = match (r.stats["faults"]["cow_copy"].as_u64(), r.stats["faults"]["cow_rename"].as_u64()) {
            (Some(a), Some(b)) => (a + b).to_string(),
            _ => "-".into(),
        };
        let exits: u64 = r.stats["exits"].as_object().map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
        s += &format!(
            "{:<14} {:>8} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9.2} {:>8}  {}\n",
            r.name,
            n(r.pages),
            f(r, "zero_fill"),
            f(r, "soft"),
            cow,
            f(r, "pager_in"),
            p(r, "pages_out"),
            r.elapsed.as_secs_f64(),
            exits,
            r.verdict
        );
    }
    s
}
