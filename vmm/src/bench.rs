//! `vkvm bench`: the same guest workloads, in one run, (a) pre-populated,
//! (b) demand-paged through userfaultfd (sleeping and busy-polling),
//! (c) demand-paged through KVM exits where this host allows it, and
//! (d) under QEMU `-accel kvm` when installed. Prints medians over
//! `--runs` runs and ratios against the pre-populated run. Absolute times
//! on these shared, nested machines mean little; the ratios are the result.

use crate::error::Error;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// One way of running the guest.
struct Mode {
    name: &'static str,
    args: &'static [&'static str],
    qemu: bool,
}

const MODES: &[Mode] = &[
    Mode { name: "prefault", args: &["--prefault"], qemu: false },
    Mode { name: "uffd", args: &["--fault-delivery", "uffd"], qemu: false },
    Mode { name: "uffd-poll", args: &["--fault-delivery", "uffd", "--uffd-poll"], qemu: false },
    Mode { name: "exit", args: &["--fault-delivery", "exit"], qemu: false },
    Mode { name: "qemu", args: &[], qemu: true },
];

/// A figure: guest test, counter, and how to print it.
struct Figure {
    label: &'static str,
    test: &'static str,
    cmdline: &'static str,
    counter: &'static str,
    /// Ring-3 workloads cannot run with exit delivery on this kind of host.
    ring3: bool,
}

const FIGURES: &[Figure] = &[
    Figure {
        label: "PIO exit round trip, ring 3",
        test: "exit-storm",
        cmdline: "storm-iters=5000",
        counter: "pio_out_p50",
        ring3: true,
    },
    Figure {
        label: "first touch, sequential",
        test: "seq-touch",
        cmdline: "",
        counter: "cycles_per_page",
        ring3: true,
    },
    Figure { label: "first touch, random", test: "random-touch", cmdline: "", counter: "cycles_per_page", ring3: true },
    Figure { label: "re-touch (steady state)", test: "seq-touch", cmdline: "", counter: "retouch_cycles", ring3: true },
    Figure {
        label: "first touch from ring 0",
        test: "kernel-touch",
        cmdline: "",
        counter: "cycles_per_page",
        ring3: false,
    },
];

pub fn command(
    exe_args: &crate::cli::RunArgs,
    runs: u32,
    clone_sizes: &[u64],
    qemu: &str,
    json_out: Option<&Path>,
) -> Result<u8, Error> {
    // Every option is checked before the first run.
    exe_args.validate(None)?;
    if let Some(&bad) = clone_sizes.iter().find(|&&mib| mib == 0 || mib > 2048) {
        return Err(Error::Config(format!("--clone-sizes {bad}: choose 1 to 2048 MiB")));
    }
    let mut json_file = json_out.map(|p| crate::inputs::OutFile::create(p, "--json")).transpose()?;
    let exe = std::env::current_exe().map_err(Error::io("cannot find the vkvm executable"))?;
    let dir = tempfile::tempdir().map_err(Error::io("cannot create a scratch directory"))?;
    let guest = dir.path().join("guest.elf");
    std::fs::write(&guest, crate::guest_image::BUNDLED).map_err(Error::io("cannot write the guest"))?;
    let have_qemu = Command::new(qemu).arg("--version").output().is_ok_and(|o| o.status.success());
    if !have_qemu {
        crate::status::eprint_line(&format!("vkvm bench: {qemu} not found: the QEMU column is left out"));
    }
    let mem = exe_args.memory;
    // results[figure][mode] = medians of per-run values (cycles).
    let mut results: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
    for f in FIGURES {
        for m in MODES {
            if (m.qemu && !have_qemu) || (m.name == "exit" && f.ring3) {
                continue;
            }
            let mut vals = Vec::new();
            for _ in 0..runs {
                let cmdline = format!("tests={} {}", f.test, f.cmdline);
                let v = if m.qemu {
                    qemu_run(qemu, &guest, mem, &cmdline, f.counter)?
                } else {
                    vkvm_run(&exe, &guest, mem, m.args, &cmdline, f.counter, dir.path())?
                };
                vals.push(v);
            }
            vals.sort_unstable();
            results.entry(f.label).or_default().insert(m.name, vals[vals.len() / 2]);
        }
    }
    let clone = clone_figures(&exe, &guest, runs, clone_sizes, dir.path())?;
    let khz = tsc_khz(&exe, &guest, dir.path())?;
    crate::status::print(&table(&results, &clone, khz, runs))?;
    if let Some(f) = &mut json_file {
        let v = serde_json::json!({ "runs": runs, "tsc_khz": khz, "cycles": results, "clone": clone });
        f.write(&(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"))?;
    }
    Ok(0)
}

fn counter_of(tests: &[Value], counter: &str) -> Option<u64> {
    tests.iter().find_map(|t| t[counter].as_u64())
}

#[allow(clippy::too_many_arguments)]
fn vkvm_run(
    exe: &Path,
    guest: &Path,
    mem: u64,
    args: &[&str],
    cmdline: &str,
    counter: &str,
    dir: &Path,
) -> Result<u64, Error> {
    let stats = dir.join("stats.json");
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .arg(guest)
        .args(["--memory", &mem.to_string(), "--timeout", "300", "--cmdline", cmdline])
        .args(args)
        .arg("--stats-json")
        .arg(&stats);
    let out = child(&mut cmd, dir)?;
    let v: Value = crate::stats::read_json(&stats);
    let tests = v["tests"].as_array().cloned().unwrap_or_default();
    counter_of(&tests, counter).ok_or_else(|| {
        Error::Crash(format!(
            "bench: '{cmdline}' with {args:?} gave no {counter}: {}",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
        ))
    })
}

/// A child run (vkvm or QEMU); a SIGINT/SIGTERM stops it and the bench.
fn child(cmd: &mut Command, dir: &Path) -> Result<crate::child::ChildOutput, Error> {
    let out = crate::child::run(cmd, dir, "child")?;
    match out.interrupted {
        Some(sig) => Err(Error::Interrupted(sig)),
        None => Ok(out),
    }
}

/// Run the same guest under QEMU and read `counter` from its result line.
fn qemu_run(qemu: &str, guest: &Path, mem: u64, cmdline: &str, counter: &str) -> Result<u64, Error> {
    let mut cmd = Command::new("timeout");
    cmd.args(["300", qemu, "-M", "microvm,x-option-roms=off,rtc=off", "-accel", "kvm"])
        .args(["-m", &format!("{}M", mem >> 20), "-nographic", "-no-reboot", "-kernel"])
        .arg(guest)
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-append", cmdline]);
    let dir = guest.parent().unwrap_or(Path::new("."));
    let out = child(&mut cmd, dir)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let key = format!("{counter}=");
    text.lines()
        .filter(|l| l.starts_with("test "))
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix(&key)).and_then(|v| v.parse().ok()))
        .ok_or_else(|| Error::Crash(format!("bench: QEMU gave no {counter} for '{cmdline}'")))
}

fn tsc_khz(exe: &Path, guest: &Path, dir: &Path) -> Result<u64, Error> {
    vkvm_run(exe, guest, 64 << 20, &[], "tests=pio-bench pio-iters=1", "tsc_khz", dir)
}

/// Clone time for 64 MiB and 1 GiB touched, against copying that much memory.
fn clone_figures(exe: &Path, guest: &Path, runs: u32, sizes: &[u64], dir: &Path) -> Result<Value, Error> {
    let mut out = serde_json::Map::new();
    for &mib in sizes {
        let (mut ready, mut pause, mut copy) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let stats = dir.join("clone.json");
            let mut cmd = Command::new(exe);
            cmd.arg("run")
                .arg(guest)
                .args(["--memory", &((mib + 256) << 20).to_string(), "--timeout", "300"])
                .args(["--cmdline", &format!("tests=clone-bench clone-mib={mib}")])
                .arg("--stats-json")
                .arg(&stats);
            child(&mut cmd, dir)?;
            let v: Value = crate::stats::read_json(&stats);
            let c = &v["clones"][0];
            let (Some(r), Some(p)) = (c["clone_ms"].as_f64(), c["parent_pause_ms"].as_f64()) else {
                return Err(Error::Crash(format!("bench: clone-bench ({mib} MiB) reported no clone time")));
            };
            ready.push(r);
            pause.push(p);
            copy.push(copy_ms(mib << 20));
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        out.insert(
            format!("{mib}MiB"),
            serde_json::json!({ "clone_ms": med(&mut ready), "parent_pause_ms": med(&mut pause), "copy_ms": med(&mut copy) }),
        );
    }
    Ok(Value::Object(out))
}

/// What cloning by copying would cost: copy `bytes` of touched memory into
/// fresh memory (the destination's page faults included, as a copy pays them).
fn copy_ms(bytes: u64) -> f64 {
    let src = vec![0x5au8; bytes as usize];
    let t0 = Instant::now();
    let dst = src.clone();
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    std::hint::black_box(&dst);
    ms
}

fn table(r: &BTreeMap<&str, BTreeMap<&str, u64>>, clone: &Value, khz: u64, runs: u32) -> String {
    let mut s =
        format!("vkvm bench: medians of {runs} run(s), cycles (TSC {} MHz); ratio = mode / prefault\n", khz / 1000);
    s += &format!("{:<30}", "workload");
    for m in MODES {
        s += &format!(" {:>17}", m.name);
    }
    s += "\n";
    for f in FIGURES {
        let Some(row) = r.get(f.label) else { continue };
        s += &format!("{:<30}", f.label);
        let base = row.get("prefault").copied().unwrap_or(0);
        for m in MODES {
            s += &match row.get(m.name) {
                Some(&v) if base > 0 && m.name != "prefault" => format!(" {:>9} ({:>5.2}x)", v, v as f64 / base as f64),
                Some(&v) => format!(" {v:>17}"),
                None => format!(" {:>17}", "-"),
            };
        }
        s += "\n";
    }
    for (k, v) in clone.as_object().into_iter().flatten() {
        let (c, p, copy) = (
            v["clone_ms"].as_f64().unwrap_or(0.0),
            v["parent_pause_ms"].as_f64().unwrap_or(0.0),
            v["copy_ms"].as_f64().unwrap_or(0.0),
        );
        s += &format!(
            "clone, {k} touched: clone running {c:.2} ms, parent paused {p:.2} ms; copying it {copy:.1} ms ({:.0}x / {:.0}x)\n",
            copy / c.max(1e-6),
            copy / p.max(1e-6)
        );
    }
    s
}
