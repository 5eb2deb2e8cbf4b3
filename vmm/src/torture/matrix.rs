//! `vkvm torture --matrix` and `--soak`: the suite under combined
//! configurations (vCPUs x clones x resident budget x delivery x windows x
//! file maps), because features that pass alone break together. The matrix
//! runs every test in every configuration it can apply to and says why it
//! skips the rest; the soak draws random configurations and random test
//! lists from a seed until its time is up, and keeps going after a failure.

use super::{
    failures, json_file, need, progress, run_plan, write_json, Config, Outcome, Plan, Torture, Windows, SUITE,
};
use crate::cli::RunArgs;
use crate::error::Error;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Every point of the matrix, in a fixed order.
pub fn configs() -> Vec<Config> {
    let mut v = Vec::new();
    for vcpus in [1, 2] {
        for clones in [0, 2] {
            for budget in [false, true] {
                for poll in [false, true] {
                    for windows in [Windows::Default, Windows::Extra] {
                        for files in [false, true] {
                            v.push(Config { vcpus, clones, budget, poll, windows, files, exit: false });
                        }
                    }
                }
            }
        }
    }
    v
}

/// Can test `t` run in `c`? Ok(the configuration to run, adjusted for what
/// the test fixes itself) or Err(why not).
pub fn applies(c: &Config, t: &Torture) -> Result<Config, &'static str> {
    let has = |n| t.needs & n != 0;
    if c.clones > 0 && c.vcpus > 1 {
        return Err("CLONE needs a 1-vCPU VM (clones of SMP guests are not supported yet)");
    }
    if has(need::SMP) && c.vcpus < 2 {
        return Err("needs 2 vCPUs");
    }
    if has(need::CLONES) && c.vcpus > 1 {
        return Err("clones itself, and CLONE needs a 1-vCPU VM");
    }
    if has(need::CLONES) && c.clones > 0 {
        return Err("clones itself, and a clone cannot clone again");
    }
    if has(need::FILES) && !c.files {
        return Err("needs --map-file regions (file maps on)");
    }
    if t.name == "swap-storm" {
        return Err("is write-verify under a budget: the budget-on configurations run that");
    }
    if has(need::BUDGET) && !c.budget {
        return Err("needs a resident budget: the budget-on configurations run it");
    }
    if has(need::EXIT) {
        if c.poll {
            return Err("runs with exit delivery: there is no userfaultfd to poll");
        }
        if c.budget || c.clones > 0 {
            return Err(
                "runs with exit delivery, which cannot serve ring-3 faults (pageout, copy-on-write) on this host",
            );
        }
        return Ok(Config { exit: true, ..*c });
    }
    Ok(*c)
}

/// Counts for the summary, per (test, skip reason).
#[derive(Default)]
struct Tally {
    pass: usize,
    fail: usize,
    skipped: BTreeMap<(&'static str, &'static str), usize>,
}

/// `vkvm torture --matrix`: the chosen tests (default all) in every
/// configuration, `jobs` runs at a time. `slice` runs only configurations
/// `k` with `k % slice.1 == slice.0` (a fixed part of the matrix, for CI).
pub fn matrix(
    run: &RunArgs,
    tests: &[&'static Torture],
    seed: u64,
    jobs: usize,
    slice: Option<(usize, usize)>,
    json_out: Option<&Path>,
) -> Result<u8, Error> {
    let tests: Vec<&'static Torture> = if tests.is_empty() { SUITE.iter().collect() } else { tests.to_vec() };
    let mut tally = Tally::default();
    let mut plans = Vec::new();
    let all = configs();
    let chosen: Vec<&Config> =
        all.iter().enumerate().filter(|(k, _)| slice.is_none_or(|(i, n)| k % n == i)).map(|(_, c)| c).collect();
    for c in &chosen {
        for t in &tests {
            match applies(c, t) {
                Ok(config) => plans.push(Plan { config, tests: vec![*t], seed }),
                Err(why) => *tally.skipped.entry((t.name, why)).or_default() += 1,
            }
        }
    }
    let mut json_file = json_file(json_out)?;
    crate::status::eprint_line(&format!(
        "matrix: {} configurations x {} tests = {} runs, {} skipped",
        chosen.len(),
        tests.len(),
        plans.len(),
        tally.skipped.values().sum::<usize>()
    ));
    let started = Instant::now();
    let results = run_all(run, plans, jobs, None)?;
    summarize(&mut tally, &results);
    let mut text = format!(
        "matrix: {} configurations, {} runs: {} passed, {} failed, {} skipped, in {:.0} s\n",
        chosen.len(),
        results.len(),
        tally.pass,
        tally.fail,
        tally.skipped.values().sum::<usize>(),
        started.elapsed().as_secs_f64()
    );
    for ((test, why), n) in &tally.skipped {
        text += &format!("  skipped {test} in {n} configuration(s): {why}\n");
    }
    crate::status::print(&(text + &failures(&results)))?;
    if let Some(f) = &mut json_file {
        write_json(f, &results)?;
    }
    Ok(if tally.fail == 0 { 0 } else { 1 })
}

fn summarize(tally: &mut Tally, results: &[Outcome]) {
    tally.pass = results.iter().filter(|r| r.pass).count();
    tally.fail = results.len() - tally.pass;
}

/// Run plans `jobs` at a time (in order of the list), until done or until
/// `deadline`; a bar on a terminal, a line per failure otherwise.
fn run_all(run: &RunArgs, plans: Vec<Plan>, jobs: usize, deadline: Option<Instant>) -> Result<Vec<Outcome>, Error> {
    let exe = super::exe()?;
    let bar = progress(deadline.is_none().then_some(plans.len() as u64));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    let error = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                if deadline.is_some_and(|d| Instant::now() >= d) || crate::signals::pending().is_some() {
                    return;
                }
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(plan) = plans.get(i) else { return };
                match run_plan(&exe, run, plan) {
                    Ok(r) => {
                        let line = format!("{} [{}] seed {}: {}", r.name, r.config.label(), r.seed, r.verdict);
                        match &bar {
                            Some(b) => {
                                b.inc(1);
                                if !r.pass {
                                    b.println(line);
                                }
                            }
                            None if !r.pass => crate::status::eprint_line(&line),
                            None => {}
                        }
                        results.lock().unwrap_or_else(|e| e.into_inner()).push((i, r));
                    }
                    Err(e) => {
                        *error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if let Some(e) = error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    if let Some(sig) = crate::signals::pending() {
        return Err(Error::Interrupted(sig));
    }
    let mut v = results.into_inner().unwrap_or_else(|e| e.into_inner());
    v.sort_by_key(|(i, _)| *i);
    Ok(v.into_iter().map(|(_, r)| r).collect())
}

/// splitmix64: the soak's random source, so that one seed gives one
/// sequence of runs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A random plan: a configuration where at least one test applies, then 1
/// to 4 tests that all apply to it (in random order, at most one that
/// clones itself, a test needing exit delivery only alone), and a seed.
fn random_plan(rng: &mut Rng, all: &[Config]) -> Plan {
    loop {
        let c = all[rng.below(all.len())];
        let mut pool: Vec<(&'static Torture, Config)> =
            SUITE.iter().filter_map(|t| applies(&c, t).ok().map(|a| (t, a))).collect();
        if pool.is_empty() {
            continue;
        }
        let want = 1 + rng.below(4);
        let mut tests: Vec<&'static Torture> = Vec::new();
        let mut config = c;
        while tests.len() < want && !pool.is_empty() {
            let (t, a) = pool.swap_remove(rng.below(pool.len()));
            let clones_itself = t.needs & need::CLONES != 0;
            if a.exit != config.exit && !tests.is_empty() {
                continue;
            }
            if clones_itself && tests.iter().any(|x| x.needs & need::CLONES != 0) {
                continue;
            }
            config = Config { exit: a.exit, ..config };
            tests.push(t);
            if a.exit {
                break;
            }
        }
        return Plan { config, tests, seed: rng.next() % 1_000_000 + 1 };
    }
}

/// `vkvm torture --soak DURATION --seed N`: random plans until the time is
/// up; every failure is reported at the end (status 1 if any).
pub fn soak(run: &RunArgs, duration: Duration, seed: u64, jobs: usize, json_out: Option<&Path>) -> Result<u8, Error> {
    let mut rng = Rng(seed);
    let all: Vec<Config> = configs();
    // Plans are drawn up front (more than can run), so that a seed fixes the
    // sequence whatever the timing; the deadline decides how far it gets.
    let plans: Vec<Plan> = (0..100_000).map(|_| random_plan(&mut rng, &all)).collect();
    let mut json_file = json_file(json_out)?;
    crate::status::eprint_line(&format!("soak: seed {seed}, {} s, {} job(s)", duration.as_secs(), jobs.max(1)));
    let started = Instant::now();
    let results = run_all(run, plans, jobs, Some(started + duration))?;
    let mut configs: Vec<Config> = results.iter().map(|r| r.config).collect();
    configs.sort_by_key(Config::label);
    configs.dedup();
    let pages: u64 = results.iter().filter_map(|r| r.pages).sum();
    let failed = results.iter().filter(|r| !r.pass).count();
    let tests: usize = results.iter().map(|r| r.name.split(',').count()).sum();
    let text = format!(
        "soak: seed {seed}: {} runs ({tests} tests) in {} distinct configurations over {:.0} s, {pages} pages checked: {} passed, {failed} failed\n",
        results.len(),
        configs.len(),
        started.elapsed().as_secs_f64(),
        results.len() - failed,
    );
    crate::status::print(&(text + &failures(&results)))?;
    if let Some(f) = &mut json_file {
        write_json(f, &results)?;
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn the_matrix_has_every_combination_once() {
        let c = configs();
        assert_eq!(c.len(), 64);
        let mut labels: Vec<String> = c.iter().map(|c| format!("{c:?}")).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), 64);
    }

    #[test]
    fn skips_say_why_and_only_what_cannot_apply() {
        let base = Config {
            vcpus: 1,
            clones: 0,
            budget: false,
            poll: false,
            windows: Windows::Default,
            files: false,
            exit: false,
        };
        let t = |n: &str| super::super::find(n).unwrap();
        assert!(applies(&base, t("selfcheck")).is_ok());
        assert_eq!(applies(&base, t("smp-storm")), Err("needs 2 vCPUs"));
        assert!(applies(&base, t("file-map")).unwrap_err().contains("--map-file"));
        assert!(applies(&Config { files: true, ..base }, t("file-map")).is_ok());
        assert!(applies(&Config { clones: 2, ..base }, t("cow-clone")).unwrap_err().contains("cannot clone again"));
        assert!(applies(&Config { vcpus: 2, clones: 2, ..base }, t("selfcheck")).is_err());
        assert_eq!(applies(&base, t("kernel-touch")).map(|c| c.exit), Ok(true));
        assert!(applies(&Config { poll: true, ..base }, t("kernel-touch")).is_err());
        // clone-mix needs a budget: only the budget-on configurations run it.
        assert!(applies(&base, t("clone-mix")).unwrap_err().contains("budget"));
        assert!(applies(&Config { budget: true, ..base }, t("clone-mix")).is_ok());
    }

    #[test]
    fn a_seed_fixes_the_soak_sequence_and_plans_are_consistent() {
        let all = configs();
        let draw = |s| {
            let mut r = Rng(s);
            (0..200).map(|_| random_plan(&mut r, &all)).collect::<Vec<_>>()
        };
        let (a, b) = (draw(7), draw(7));
        let key = |p: &Plan| (p.config, p.tests.iter().map(|t| t.name).collect::<Vec<_>>(), p.seed);
        assert!(a.iter().map(key).eq(b.iter().map(key)));
        assert!(!a.iter().map(key).eq(draw(8).iter().map(key)));
        for p in &a {
            assert!(!p.tests.is_empty() && p.tests.len() <= 4);
            for t in &p.tests {
                assert!(applies(&p.config, t).is_ok(), "{} in {:?}", t.name, p.config);
            }
            assert!(p.tests.iter().filter(|t| t.needs & need::CLONES != 0).count() <= 1);
            assert!(!p.config.exit || p.tests.len() == 1);
        }
    }
}
