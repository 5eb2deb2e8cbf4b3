//! `vkvm torture`: the guest memory torture suite. Each run is a fresh VM (a
//! child `vkvm run`, so a crash or hang in one cannot touch the next), with
//! a progress bar on a terminal and a summary at the end. Plain mode runs
//! each test once in the configuration it needs; `--matrix` and `--soak`
//! (`torture/matrix.rs`) run the tests under combined configurations.

mod matrix;

use crate::cli::RunArgs;
use crate::error::Error;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub use matrix::{matrix, soak};

/// What a test needs from the VM it runs in.
pub mod need {
    /// At least two vCPUs.
    pub const SMP: u8 = 1;
    /// The test clones the VM itself (CLONE hypercall).
    pub const CLONES: u8 = 2;
    /// A resident budget below the guest's RAM, with swap.
    pub const BUDGET: u8 = 4;
    /// `--map-file` regions.
    pub const FILES: u8 = 8;
    /// Exit delivery (ring-0 touches come back as KVM exits).
    pub const EXIT: u8 = 16;
}

/// A torture test: a guest test plus what its VM needs.
pub struct Torture {
    pub name: &'static str,
    pub about: &'static str,
    /// The guest test it runs (`swap-storm` is `write-verify` under a budget).
    pub guest: &'static str,
    /// Guest command-line words beyond `tests=NAME seed=N`.
    pub cmdline: &'static str,
    pub needs: u8,
}

impl Torture {
    fn needs(&self, n: u8) -> bool {
        self.needs & n != 0
    }
}

const fn t(name: &'static str, about: &'static str, needs: u8) -> Torture {
    Torture { name, about, guest: name, cmdline: "", needs }
}

#[rustfmt::skip]
pub static SUITE: &[Torture] = &[
    t("selfcheck", "write and verify 64 MiB with address-derived values", 0),
    t("seq-touch", "first touch of every free guest page in order", 0),
    t("random-touch", "first touch of every free guest page in a seeded random order", 0),
    t("write-verify", "address-derived patterns over all free guest memory, rewritten and re-read", 0),
    t("smp-storm", "2+ vCPUs write interleaved words of the same pages in seeded orders", need::SMP),
    Torture { cmdline: "storm-iters=5000", ..t("exit-storm", "PIO out, port read and hypercall loops", 0) },
    Torture { guest: "write-verify",
              ..t("swap-storm", "write-verify over 4x the resident budget: pageout and page-in", need::BUDGET) },
    t("cow-clone", "clone the VM twice; each writes its own data and sees only it", need::CLONES),
    t("file-map", "files mapped read-only, shared and private: hashes, writes, refused write", need::FILES),
    t("kernel-touch", "ring 0 touches fresh pages at boot; delivered as KVM exits", need::EXIT),
    t("vpt-linear", "VPAGETABLE: large-page bit in the master and at levels 1-3 gives a linear map", 0),
    t("vpt-levels", "VPAGETABLE: 2-, 3- and 4-level walks; an edit off the path changes nothing", 0),
    t("vpt-alias", "VPAGETABLE: two window pages and RAM share one page", 0),
    t("vpt-ro", "VPAGETABLE: a write through a read-only vpte at any level faults, writes nothing", 0),
    t("vpt-invalid", "VPAGETABLE: V clear at any level (master too) faults; no A/M written", 0),
    t("vpt-am", "VPAGETABLE: accessed/modified bits, M re-set after clear + inval", 0),
    t("vpt-inval", "VPAGETABLE: one vCPU remaps + invals while another reads: nothing stale", need::SMP),
    t("vpt-bounds", "VPAGETABLE: a frame beyond guest RAM is a distinct fault (RSVD)", 0),
    t("clone-mix", "clone under swap with a window over RAM: every VM sees only its writes, both ways",
      need::CLONES | need::BUDGET),
];

pub fn list() -> String {
    SUITE.iter().map(|t| format!("{:<14} {}\n", t.name, t.about)).collect()
}

pub fn find(name: &str) -> Result<&'static Torture, Error> {
    SUITE
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| Error::Config(format!("unknown torture test '{name}' (vkvm torture --list shows them)")))
}

/// How the VAPGETABLE windows are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Windows {
    /// vkvm's default windows (4, 2 and 3 levels).
    Default,
    /// Windows of the user's own: region 0 with 2 levels, then 3 and 4, at
    /// other addresses.
    Extra,
}

/// The VM a run gets: one point of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Config {
    pub vcpus: u32,
    /// Clones made before the tests (`tests=clone,...`): each VM then runs
    /// the tests with its own seed. 0 = no clones.
    pub clones: u32,
    /// A resident budget of a quarter of the RAM of every VM (the clones
    /// included: they share one budget), with swap.
    pub budget: bool,
    /// Busy-polling userfaultfd handler.
    pub poll: bool,
    pub windows: Windows,
    /// Read-only, shared and private `--map-file` regions.
    pub files: bool,
    /// Exit delivery instead of userfaultfd.
    pub exit: bool,
}

impl Config {
    /// What plain `vkvm torture` gives test `t`: the user's options, plus
    /// what the test needs.
    fn for_test(run: &RunArgs, t: &Torture) -> Config {
        Config {
            vcpus: if t.needs(need::SMP) { run.vcpus.max(2) } else { run.vcpus },
            clones: 0,
            budget: t.needs(need::BUDGET),
            poll: run.uffd_poll,
            windows: Windows::Default,
            files: t.needs(need::FILES),
            exit: t.needs(need::EXIT),
        }
    }

    /// Short name for tables, e.g. `2cpu+clones+budget+poll+extra-win+files`.
    pub fn label(&self) -> String {
        let mut s = format!("{}cpu", self.vcpus);
        for (on, what) in [
            (self.clones > 0, "clones"),
            (self.budget, "budget"),
            (self.poll, "poll"),
            (self.windows == Windows::Extra, "extra-win"),
            (self.files, "files"),
            (self.exit, "exit"),
        ] {
            if on {
                s += "+";
                s += what;
            }
        }
        s
    }
}

/// Extra windows for `Windows::Extra`: 2, 3 and 4 levels, clear of the
/// default windows and of the scratch files at 0xD0000000.
const EXTRA_WINDOWS: [&str; 3] = ["0xD8000000,16M,levels=2", "0xD9000000,16M,levels=3", "0xDA000000,64M,levels=4"];
/// Where the scratch files are mapped, with their modes.
const FILES: [(&str, &str); 3] =
    [("", "0xd0000000,ro"), (".shared", "0xd0200000,shared"), (".private", "0xd0400000,private")];

/// One VM run: a configuration, the tests it runs in order, and a seed.
pub struct Plan {
    pub config: Config,
    pub tests: Vec<&'static Torture>,
    pub seed: u64,
}

impl Plan {
    /// The `vkvm run` arguments (without `--stats-json`). Scratch files
    /// named `file*` are expected in `scratch` (see `write_files`).
    fn args(&self, run: &RunArgs, scratch: &Path) -> Vec<String> {
        let c = &self.config;
        let mut names: Vec<&str> = self.tests.iter().map(|t| t.guest).collect();
        if c.clones > 0 {
            names.insert(0, "clone");
        }
        let mut cmdline = format!("tests={} seed={}", names.join(","), self.seed);
        for w in self.tests.iter().map(|t| t.cmdline).filter(|w| !w.is_empty()) {
            cmdline = format!("{cmdline} {w}");
        }
        if !run.cmdline.is_empty() {
            cmdline = format!("{cmdline} {}", run.cmdline);
        }
        let mut a: Vec<String> = vec!["run".into()];
        if let Some(g) = &run.guest {
            a.push(g.display().to_string());
        }
        let s = |x: &str| x.to_string();
        a.extend([s("--memory"), run.memory.to_string(), s("--vcpus"), c.vcpus.to_string()]);
        // A run of several tests gets the default timeout for each.
        let timeout = run.timeout.unwrap_or(300.0 * self.tests.len().max(1) as f64);
        a.extend([s("--cmdline"), cmdline, s("--timeout"), timeout.to_string()]);
        if run.kvm_device != Path::new("/dev/kvm") {
            a.extend([s("--kvm-device"), run.kvm_device.display().to_string()]);
        }
        let self_clones = self.tests.iter().any(|t| t.needs(need::CLONES));
        if c.clones > 0 || self_clones {
            a.extend([s("--clones"), c.clones.max(2).to_string()]);
        }
        if c.budget {
            // Clones made before the tests each run them over their whole
            // RAM; a test that clones itself writes little after the clone.
            let vms = 1 + u64::from(c.clones);
            let quarter = (run.memory / 4 * vms).next_multiple_of(4096).max(crate::config::MIN_PHYS_MEM);
            let budget = run.phys_mem.unwrap_or(quarter);
            a.extend([s("--phys-mem"), budget.to_string()]);
        }
        if c.poll {
            a.push(s("--uffd-poll"));
        }
        if c.exit {
            a.extend([s("--fault-delivery"), s("exit")]);
        }
        if c.windows == Windows::Extra {
            for w in EXTRA_WINDOWS {
                a.extend([s("--vpt-region"), s(w)]);
            }
        }
        if c.files {
            for (suffix, at) in FILES {
                a.extend([s("--map-file"), format!("{}{suffix}@{at}", scratch.join("file").display())]);
            }
        }
        a
    }
}

/// The scratch files `--map-file` regions use: 1 MiB of seeded bytes each.
fn write_files(dir: &Path, seed: u64) -> Result<(), Error> {
    let bytes: Vec<u8> =
        (0..1u64 << 20).map(|i| (i.wrapping_mul(seed | 1).wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    for (suffix, _) in FILES {
        std::fs::write(dir.join(format!("file{suffix}")), &bytes).map_err(Error::io("cannot write a scratch file"))?;
    }
    Ok(())
}

/// One finished run.
pub struct Outcome {
    pub name: String,
    pub config: Config,
    pub seed: u64,
    pub pass: bool,
    pub verdict: String,
    pub pages: Option<u64>,
    pub stats: Value,
    pub elapsed: Duration,
    pub detail: String,
    /// The command that reproduces the run (shell-quoted).
    pub command: String,
    /// A failed run's scratch directory, kept for reproduction.
    pub kept: Option<PathBuf>,
}

/// Quote one argument for a POSIX shell when it needs it.
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Run one plan in a child `vkvm run` and judge it: status 0 and every
/// report of every VM a pass. A SIGINT/SIGTERM is forwarded to the child;
/// once it has stopped this returns `Error::Interrupted` and the scratch
/// directory is removed (on drop) before vkvm exits.
pub fn run_plan(exe: &Path, run: &RunArgs, plan: &Plan) -> Result<Outcome, Error> {
    if let Some(sig) = crate::signals::pending() {
        return Err(Error::Interrupted(sig));
    }
    let dir = tempfile::Builder::new()
        .prefix("vkvm-torture-")
        .tempdir()
        .map_err(Error::io("cannot create a scratch directory"))?;
    if plan.config.files {
        write_files(dir.path(), plan.seed)?;
    }
    let stats_path = dir.path().join("stats.json");
    let args = plan.args(run, dir.path());
    let command = std::iter::once(exe.display().to_string())
        .chain(args.iter().cloned())
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ");
    let started = Instant::now();
    let mut cmd = Command::new(exe);
    cmd.args(&args).arg("--stats-json").arg(&stats_path);
    let out = crate::child::run(&mut cmd, dir.path(), "run")?;
    let elapsed = started.elapsed();
    if let Some(sig) = out.interrupted {
        return Err(Error::Interrupted(sig));
    }
    let stats: Value = crate::stats::read_json(&stats_path);
    let tests = stats["tests"].as_array().cloned().unwrap_or_default();
    let code = out.code.unwrap_or(3);
    // Every planned test must have reported (from every VM), and passed.
    let reported = plan.tests.iter().all(|t| tests.iter().any(|r| r["name"] == t.guest));
    let pass = code == 0 && reported && tests.iter().all(|t| t["status"] == "pass");
    let detail = tests
        .iter()
        .find_map(|t| {
            t["detail"]
                .as_str()
                .filter(|d| !d.is_empty())
                .map(|d| format!("{} vm {} cpu {}: {d}", t["name"].as_str().unwrap_or("?"), t["vm"], t["cpu"]))
        })
        .unwrap_or_else(|| {
            if pass {
                String::new()
            } else {
                let err = String::from_utf8_lossy(&out.stderr);
                let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("vkvm:")).collect();
                if lines.is_empty() && !reported {
                    "not every test reported".into()
                } else {
                    lines.join(" ")
                }
            }
        });
    let verdict = if pass { "pass".to_string() } else { format!("FAIL (status {code})") };
    let pages = tests.iter().filter_map(|t| t["pages"].as_u64()).reduce(|a, b| a + b);
    let kept = (!pass).then(|| dir.keep());
    let name = plan.tests.iter().map(|t| t.name).collect::<Vec<_>>().join(",");
    Ok(Outcome {
        name,
        config: plan.config,
        seed: plan.seed,
        pass,
        verdict,
        pages,
        stats,
        elapsed,
        detail,
        command,
        kept,
    })
}

/// A spinner (plain mode) or a bar over `len` runs, on a terminal only.
fn progress(len: Option<u64>) -> Option<ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let b = match len {
            Some(n) => {
                let b = ProgressBar::new(n);
                b.set_style(
                    ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed:>4} eta {eta} {msg}")
                        .expect("valid template"),
                );
                b
            }
            None => {
                let b = ProgressBar::new_spinner();
                b.set_style(
                    ProgressStyle::with_template("{spinner} {prefix:<14} {elapsed:>4} {msg}").expect("valid template"),
                );
                b
            }
        };
        b.enable_steady_tick(Duration::from_millis(120));
        b
    })
}

pub fn exe() -> Result<PathBuf, Error> {
    std::env::current_exe().map_err(Error::io("cannot find the vkvm executable"))
}

/// `vkvm torture` in its three modes.
#[allow(clippy::too_many_arguments)]
pub fn dispatch(
    run: &RunArgs,
    tests: &[String],
    seed: u64,
    json_out: Option<&Path>,
    matrix_mode: bool,
    slice: Option<(usize, usize)>,
    soak_for: Option<Duration>,
    jobs: usize,
) -> Result<u8, Error> {
    // The options every child gets: a bad one is one error now, not one per run.
    run.validate(None)?;
    if matrix_mode {
        let chosen: Vec<&'static Torture> = tests.iter().map(|n| find(n)).collect::<Result<_, _>>()?;
        return matrix(run, &chosen, seed, jobs, slice, json_out);
    }
    if let Some(d) = soak_for {
        if !tests.is_empty() {
            return Err(Error::Config("--soak picks its own tests: leave out --test".into()));
        }
        return soak(run, d, seed, jobs, json_out);
    }
    command(run, tests, seed, json_out)
}

/// Plain `vkvm torture`: each chosen test once, in the VM it needs.
pub fn command(run: &RunArgs, tests: &[String], seed: u64, json_out: Option<&Path>) -> Result<u8, Error> {
    let mut json_file = json_file(json_out)?;
    let chosen: Vec<&Torture> = if tests.is_empty() {
        SUITE.iter().collect()
    } else {
        tests.iter().map(|n| find(n)).collect::<Result<_, _>>()?
    };
    let exe = exe()?;
    let mut results = Vec::new();
    for t in chosen {
        let bar = progress(None);
        if let Some(b) = &bar {
            b.set_prefix(t.name);
            b.set_message("running");
        }
        let plan = Plan { config: Config::for_test(run, t), tests: vec![t], seed };
        let r = run_plan(&exe, run, &plan);
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                if let Some(b) = &bar {
                    b.abandon();
                }
                return Err(e);
            }
        };
        match bar {
            Some(b) => b.finish_with_message(r.verdict.clone()),
            None => {
                crate::status::eprint_line(&format!("{:<14} {} ({:.2} s)", t.name, r.verdict, r.elapsed.as_secs_f64()))
            }
        }
        results.push(r);
    }
    crate::status::print(&(table(&results) + &failures(&results)))?;
    if let Some(f) = &mut json_file {
        write_json(f, &results)?;
    }
    Ok(if results.iter().all(|r| r.pass) { 0 } else { 1 })
}

/// Each failure: what went wrong and the command that reproduces it.
fn failures(results: &[Outcome]) -> String {
    let mut s = String::new();
    for r in results.iter().filter(|r| !r.pass) {
        let what = if r.detail.is_empty() { &r.verdict } else { &r.detail };
        s += &format!("{} [{}]: {what}\n  reproduce: {}\n", r.name, r.config.label(), r.command);
        if let Some(d) = &r.kept {
            s += &format!("  scratch files kept in {}\n", d.display());
        }
    }
    s
}

/// `--json PATH`, created before any run so that a bad path is found first.
fn json_file(path: Option<&Path>) -> Result<Option<crate::inputs::OutFile>, Error> {
    path.map(|p| crate::inputs::OutFile::create(p, "--json")).transpose()
}

fn write_json(f: &mut crate::inputs::OutFile, results: &[Outcome]) -> Result<(), Error> {
    let v: Vec<Value> = results.iter().map(outcome_json).collect();
    let text = serde_json::to_string_pretty(&v).map_err(|e| Error::Crash(e.to_string()))?;
    f.write(&(text + "\n"))
}

fn outcome_json(r: &Outcome) -> Value {
    json!({
        "test": r.name, "status": if r.pass { "pass" } else { "fail" }, "verdict": r.verdict,
        "config": r.config, "pages": r.pages, "faults": r.stats.get("faults"), "pageout": r.stats.get("pageout"),
        "elapsed_ms": r.elapsed.as_secs_f64() * 1e3, "detail": r.detail, "seed": r.seed, "command": r.command,
    })
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
