//! A careless user: inputs that are not what they claim (FIFOs, devices,
//! directories, huge or unwritable paths), files vkvm must not clobber,
//! signals in the middle of a run, timeouts that must cover set-up, and
//! messages that must say the real limit. Every configuration error is
//! status 2, found before the guest starts; nothing panics or hangs.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `vkvm ARGS`, killed if it runs longer than `limit` (a hang is then a
/// test failure, not a hung test run). Returns the output and whether it
/// had to be killed.
fn vkvm_bounded(args: &[&str], limit: Duration) -> (Output, bool) {
    let mut child = Command::new(VKVM)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut killed = false;
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            child.kill().unwrap();
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (child.wait_with_output().unwrap(), killed)
}

/// Exits 2 at once with one line naming `needle`, and no guest ran.
fn config_error(args: &[&str], needle: &str) {
    let (out, killed) = vkvm_bounded(args, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!killed, "vkvm {args:?} hung; stderr: {err}");
    assert_eq!(out.status.code(), Some(2), "vkvm {args:?}: {err}");
    assert!(err.contains(needle), "vkvm {args:?}: stderr does not mention {needle:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    // One line (clap adds its "For more information" hint to usage errors).
    let lines = err.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("For more information"));
    assert_eq!(lines.count(), 1, "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("vkvm-guest"), "the guest ran");
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: creating a FIFO at a path the test owns.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn fifos_devices_and_directories_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let f = fifo.to_str().unwrap();
    // Before: a FIFO blocked vkvm forever, before --timeout started.
    config_error(&["run", f, "--timeout", "5"], "is a FIFO, not a regular file");
    config_error(&["run", "--boot", "multiboot", "--module", f, "--timeout", "5"], "module");
    config_error(&["run", "--map-file", &format!("{f}@0xd0000000"), "--timeout", "5"], "is a FIFO");
    // Before: /dev/zero was read until the host ran out of memory.
    config_error(&["run", "/dev/zero"], "is a character device, not a regular file");
    config_error(&["run", "--boot", "multiboot", "--module", "/dev/zero"], "character device");
    // Before: a directory as a map file was a crash (status 3) in the guest.
    let d = dir.path().to_str().unwrap();
    config_error(&["run", "--map-file", &format!("{d}@0xd0000000")], "is a directory");
    config_error(&["run", "--phys-mem", "8M", "--swap", "/dev/null"], "--swap /dev/null: is a character device");
}

#[test]
fn a_kernel_larger_than_guest_memory_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("big");
    std::fs::File::create(&k).unwrap().set_len(65 << 20).unwrap();
    config_error(&["run", k.to_str().unwrap(), "--memory", "64M"], "more than 67108864 (--memory");
}

#[test]
fn an_existing_swap_file_is_not_clobbered_and_two_runs_cannot_share_one() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let swap = dir.path().join("notes.txt");
    std::fs::write(&swap, b"my notes\n").unwrap();
    let s = swap.to_str().unwrap();
    // Before: the text file became 128 MiB of guest swap.
    config_error(&["run", "--phys-mem", "8M", "--swap", s], "--swap-reuse");
    assert_eq!(std::fs::read(&swap).unwrap(), b"my notes\n");
    // Hold the lock as a running vkvm would: the second run is refused.
    let mut first = Command::new(VKVM)
        .args(["run", "--phys-mem", "8M", "--swap", s, "--swap-reuse", "--timeout", "60"])
        .args(["--cmdline", "tests=hang"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = first.id() as i32;
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().contains("running in ring 3")), "the first run did not start");
    config_error(&["run", "--phys-mem", "8M", "--swap", s, "--swap-reuse"], "another process holds a lock");
    // SAFETY: stopping the child this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    first.wait().unwrap();
    // With it gone, --swap-reuse takes the file.
    let r = run(&["--memory", "64M", "--phys-mem", "8M", "--swap", s, "--swap-reuse"]);
    assert_eq!(r.status(), 0, "{}", r.stderr());
}

#[test]
fn configuration_errors_are_found_before_the_guest_starts() {
    // Before: an unwritable --stats-json was found after the run (status 3,
    // the guest's status lost).
    config_error(&["run", "--stats-json", "/no/such/dir/stats.json"], "--stats-json /no/such/dir/stats.json");
    // Before: 1e300 panicked (status 101).
    config_error(&["run", "--timeout", "1e300"], "at most 2592000 seconds");
    config_error(&["run", "--timeout", "nan"], "--timeout");
    // Before: accepted, then the pager flooded the log.
    config_error(&["run", "--phys-mem", "8M", "--swap-size", "0"], "--swap-size 0");
    config_error(&["run", "--clones", "8", "--max-clones", "4"], "--max-clones 4");
    // Before: status 3.
    config_error(&["guest", "--output", "/no/such/dir/guest.elf"], "--output /no/such/dir/guest.elf");
    config_error(&["firmware", "--output", "/no/such/dir/rom.bin"], "--output");
    // Before: found only after the first runs (which fail here on the bad
    // device first, with status 3).
    config_error(&["bench", "--runs", "1", "--kvm-device", "/nonexistent", "--clone-sizes", "64,0"], "--clone-sizes 0");
    config_error(&["torture", "--test", "selfcheck", "--memory", "1000001"], "multiple of 4 KiB");
    config_error(&["torture", "--test", "selfcheck", "--json", "/no/such/dir/t.json"], "--json");
}

#[test]
fn messages_say_the_real_limits() {
    // Before: "3072 MiB is above the supported 3072 MiB".
    config_error(
        &["run", "--memory", "3221229568"],
        "3221229568 bytes (3072.00390625 MiB) is above the limit of 3072 MiB",
    );
    // Before: "1 to 4294967295".
    let (out, _) = vkvm_bounded(&["run", "--vcpus", "0"], Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("--vcpus 0 is out of range: 1 to ") && !err.contains("4294967295"), "{err}");
}

#[test]
fn the_whole_command_line_is_checked_with_vkvm_s_own_words() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f");
    std::fs::write(&f, vec![1u8; 4096]).unwrap();
    // 4,077 bytes pass the --cmdline check alone; with vkvm.files= and
    // vkvm.vpt= appended they did not fit, and file-map lost its regions.
    let mut line = "tests=file-map ".to_string();
    line += &"x".repeat(4077 - line.len());
    let map = format!("{}@0xd0000000", f.display());
    config_error(&["run", "--cmdline", &line, "--map-file", &map], "the guest command line is");
    // Without the file words it fits (vkvm.vpt= for the three default
    // windows takes about 100 bytes).
    let r = run(&["--memory", "64M", "--cmdline", &format!("tests=selfcheck {}", "x".repeat(3900))]);
    assert_eq!(r.status(), 0, "{}", r.stderr());
}

#[test]
fn closed_or_full_stdout_is_an_error_not_a_panic() {
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let out = Command::new(VKVM).args(["torture", "--list"]).stdout(full).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Before: a panic (status 101).
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("cannot write to standard output") && !err.contains("panicked"), "{err}");
}

#[test]
fn timeout_covers_set_up() {
    need_kvm!();
    // Before: the timer started after --prefault (33 s here), and the guest then passed.
    let (out, killed) = vkvm_bounded(
        &["run", "--prefault", "--memory", "512M", "--phys-mem", "4M", "--timeout", "1"],
        Duration::from_secs(120),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!killed, "{err}");
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("the --timeout of 1 s ran out during set-up (--prefault)"), "{err}");
}

/// The bytes the guest test `file-write-hang` writes at offset `off`.
fn pattern(off: u64, seed: u64) -> u64 {
    let mut x = (off ^ seed.rotate_left(17)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Start `vkvm run ARGS`, wait for a guest line containing `ready`, send `sig`.
fn signal_when(args: &[&str], ready: &str, sig: i32) -> (std::process::ExitStatus, String) {
    let mut child =
        Command::new(VKVM).arg("run").args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().contains(ready)), "the guest never said {ready:?}");
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(child.id() as i32, sig) };
    let out = child.wait_with_output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn sigterm_during_a_shared_map_write_loses_no_byte() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shared.bin");
    std::fs::write(&file, vec![0u8; 4 << 20]).unwrap();
    let stats = dir.path().join("stats.json");
    let map = format!("{}@0xd0000000,shared", file.display());
    let args = ["--map-file", &map, "--cmdline", "tests=file-write-hang seed=11", "--timeout", "120"];
    let mut args = args.to_vec();
    args.extend(["--stats-json", stats.to_str().unwrap()]);
    let (status, err) = signal_when(&args, "file-write-hang: written", libc::SIGTERM);
    // Before: SIGTERM killed vkvm at once; the file stayed zero, no stats.
    assert_eq!(status.code(), Some(143), "{err}");
    assert!(err.contains("stopped by SIGTERM"), "{err}");
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes.len(), 4 << 20);
    for (i, w) in bytes.chunks_exact(8).enumerate() {
        let off = i as u64 * 8;
        let want = pattern(off, 11);
        assert_eq!(u64::from_le_bytes(w.try_into().unwrap()), want, "byte {off:#x} of the shared file");
    }
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert_eq!(s["interrupted"], true, "{s}");
    assert_eq!(s["signal"], "SIGTERM");
    assert_eq!(s["exit_status"], 143);
}

#[test]
fn sigint_stops_the_vm_with_130_and_writes_stats() {
    need_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    let args = ["--cmdline", "tests=hang", "--timeout", "120", "--stats-json", stats.to_str().unwrap()];
    let (status, err) = signal_when(&args, "running in ring 3", libc::SIGINT);
    assert_eq!(status.code(), Some(130), "{err}");
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert_eq!(s["interrupted"], true, "{s}");
    assert_eq!(s["signal"], "SIGINT");
}

#[test]
fn sigterm_to_torture_stops_its_child_and_removes_the_scratch_directory() {
    need_kvm!();
    // swap-storm over 1 GiB runs for many seconds.
    let torture = Command::new(VKVM)
        .args(["torture", "--test", "swap-storm", "--memory", "1G"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = torture.id();
    // The child `vkvm run` and its scratch directory (from its --stats-json).
    let t0 = Instant::now();
    let (child, scratch) = loop {
        assert!(t0.elapsed() < Duration::from_secs(60), "torture started no child");
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(c) = children.split_whitespace().next() {
            let cmdline = std::fs::read(format!("/proc/{c}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into()).collect();
            if let Some(i) = args.iter().position(|a| a == "--stats-json") {
                let dir = Path::new(&args[i + 1]).parent().unwrap().to_path_buf();
                break (c.parse::<i32>().unwrap(), dir);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(scratch.exists());
    // SAFETY: signalling the process this test started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let out = torture.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Before: torture died at once, its child ran on and the directory stayed.
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(!scratch.exists(), "{} was left behind", scratch.display());
    // SAFETY: probing (signal 0) whether the child still exists.
    let alive = unsafe { libc::kill(child, 0) } == 0;
    assert!(!alive, "the child vkvm {child} outlived torture");
}

#[test]
fn running_out_of_frames_without_swap_does_not_blame_swap() {
    need_kvm!();
    // No --phys-mem, so no swap: 11 VMs each rewriting 28 MiB of a 64 MiB
    // guest outgrow the frame budget (4x RAM) while they all hold their
    // pages (clone-wait: each waits ~1 s after writing, so they overlap
    // however the host schedules them; with the default wait 3 runs in 100
    // finished one by one and fit).
    let r = run(&["--memory", "64M", "--clones", "10", "--cmdline", "tests=cow-clone clone-mib=56 clone-wait=3000"]);
    assert_one_line_error(&r, 3, "there is no swap");
    // Before: "(no frame could be freed: swap full or failing?)".
    assert!(!r.stderr().contains("swap full"), "{}", r.stderr());
}
