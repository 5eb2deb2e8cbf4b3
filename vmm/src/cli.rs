//! Command line.

use crate::error::Error;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "vkvm",
    version,
    about = "A KVM VMM whose guest memory is run like the BSD VM system",
    long_about = "vkvm boots a tiny guest kernel (bundled, any PVH ELF, or a Multiboot v1 kernel) on KVM.\n\n\
Exit status: the guest's own status (0 pass, 1 a test failed), 2 usage or configuration error, 3 VMM or guest crash."
)]
pub struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Less log output (-q errors only, -qq nothing).
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "verbose")]
    quiet: u8,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    pub fn log_level(&self) -> log::LevelFilter {
        use log::LevelFilter::*;
        match (self.verbose, self.quiet) {
            (0, 0) => Warn,
            (1, _) => Info,
            (2, _) => Debug,
            (v, _) if v >= 3 => Trace,
            (_, 1) => Error,
            _ => Off,
        }
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Boot a guest (the bundled one by default) and exit with its status.
    Run(RunArgs),
    /// Run the guest memory torture suite, each run in a fresh VM: every test
    /// once, or (--matrix) every test under every combination of vCPUs,
    /// clones, resident budget, delivery, windows and file maps, or (--soak)
    /// random combinations and test lists until the time is up.
    Torture {
        /// List the tests with a one-line description and exit.
        #[arg(long)]
        list: bool,
        /// Run only this test (repeatable); default: all.
        #[arg(long = "test", value_name = "NAME")]
        tests: Vec<String>,
        /// Seed for every test's data and order (and, with --soak, for the
        /// random configurations and test lists: one seed, one sequence).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Run the tests under every combination of: vCPUs {1, 2}, clones
        /// {0, 2}, resident budget {none, 1/4 of RAM with swap}, delivery
        /// {uffd, uffd polling}, windows {default, own 2/3/4-level}, file
        /// maps {none, ro + shared + private}; says what it skips and why.
        #[arg(long, conflicts_with = "soak")]
        matrix: bool,
        /// Only configurations K of every N of the matrix (K/N, 0-based): a
        /// fixed slice, e.g. for CI.
        #[arg(long, value_name = "K/N", value_parser = parse_slice, requires = "matrix")]
        slice: Option<(usize, usize)>,
        /// Run random configurations and random test lists for this long
        /// (e.g. 90s, 10m, 1h), report every failure at the end.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        soak: Option<std::time::Duration>,
        /// Runs at a time (each is a VM; 1 keeps timings quiet).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
        jobs: u32,
        /// Also write the summary as JSON.
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Compare the same guest workloads pre-populated, demand-paged (uffd,
    /// uffd polling, exits) and under QEMU, in one run; print ratios.
    Bench {
        /// Runs per workload and mode (medians are reported).
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Touched sizes (MiB) for the clone-vs-copy figures.
        #[arg(long, value_delimiter = ',', default_value = "64,1024", value_name = "MIB,...")]
        clone_sizes: Vec<u64>,
        /// The QEMU binary for the comparison column.
        #[arg(long, default_value = "qemu-system-x86_64")]
        qemu: String,
        /// Also write the figures as JSON.
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Run a workload with exit-latency profiling and write profile.json,
    /// profile.svg (histograms) and a table.
    Profile {
        #[command(flatten)]
        run: RunArgs,
        /// Directory for profile.json and profile.svg (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Write the bundled guest ELF to a file.
    Guest {
        /// Where to write the ELF.
        #[arg(short, long)]
        output: PathBuf,
        /// pvh: the ELF64 with a PVH note; multiboot: the ELF32 for Multiboot loaders.
        #[arg(long, value_enum, default_value_t = crate::guest_image::Format::Pvh)]
        format: crate::guest_image::Format,
    },
    /// Write the bundled firmware ROM (64 KiB, flat, loaded at 0xFFFF0000).
    Firmware {
        /// Where to write the image.
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SwapFault {
    ReadEio,
    ShortRead,
    WriteEio,
    Nospace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultDelivery {
    Auto,
    Uffd,
    Exit,
}

#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// A kernel to boot instead of the bundled guest: a PVH ELF or a Multiboot v1 kernel.
    pub guest: Option<PathBuf>,
    /// Guest RAM: bytes, or with a K, M or G suffix; a multiple of 4 KiB, at most 3G.
    #[arg(short, long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// Number of vCPUs; each runs a ring-3 task in the bundled guest.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest command line; the bundled guest takes `tests=a,b,c`, `seed=N`.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Stop the run if the guest has not exited this many seconds after
    /// vkvm started, set-up included (status 3); at most 2592000 (30 days).
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    pub timeout: Option<f64>,
    /// Write exit counts, test results and statistics as JSON at exit.
    #[arg(long, value_name = "PATH")]
    pub stats_json: Option<PathBuf>,
    /// How guest page faults reach vkvm: uffd (userfaultfd), exit (KVM exits;
    /// on these hosts only emulated ring-0 accesses), or auto.
    #[arg(long, value_enum, default_value_t = FaultDelivery::Auto)]
    pub fault_delivery: FaultDelivery,
    /// Clones each CLONE hypercall makes (copy-on-write VMs resuming from
    /// the caller's state; the guest test `cow-clone` uses it).
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub clones: u32,
    /// Clones alive at once; a CLONE beyond it gets -EAGAIN (the VM runs on).
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_clones: u32,
    /// Busy-poll the userfaultfd instead of sleeping in poll(2).
    #[arg(long)]
    pub uffd_poll: bool,
    /// Populate every guest page at start instead of on first touch.
    #[arg(long)]
    pub prefault: bool,
    /// Budget of resident guest pages (K/M/G); pages beyond it go to swap.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub phys_mem: Option<u64>,
    /// Map a host file into guest-physical space above RAM:
    /// PATH@GPA[,size=LEN][,ro|shared|private] (default ro). Repeatable.
    #[arg(long = "map-file", value_name = "PATH@GPA[,OPTS]", value_parser = crate::memory::parse_map_file)]
    pub map_files: Vec<crate::memory::FileMap>,
    /// A VPAGETABLE window over guest RAM: GPA,SIZE[,levels=N] (levels 1-4,
    /// default 4). Repeatable; region index = order given. Without it vkvm
    /// gives the bundled guest three windows: 64 MiB with 4 levels at
    /// 0xC0000000, 16 MiB with 2 levels at 0xC4000000 and 16 MiB with 3
    /// levels at 0xC5000000.
    #[arg(long = "vpt-region", value_name = "GPA,SIZE[,levels=N]", value_parser = crate::vpagetable::parse_vpt_region)]
    pub vpt_regions: Vec<crate::vpagetable::VptSpec>,
    /// Swap file (created if missing, locked for the run; default: an
    /// unlinked temporary file). An existing non-empty file is refused
    /// unless --swap-reuse is given.
    #[arg(long, value_name = "PATH")]
    pub swap: Option<PathBuf>,
    /// Allow --swap to overwrite an existing non-empty file.
    #[arg(long, requires = "swap")]
    pub swap_reuse: bool,
    /// Swap space (K/M/G, at least 1M); default twice the guest RAM per VM
    /// (x (1 + --clones)): the file is sparse.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub swap_size: Option<u64>,
    /// Test only: make swap I/O fail (read-eio, short-read, write-eio, nospace).
    #[arg(long, value_name = "FAULT", hide = true)]
    pub inject_swap_fault: Option<SwapFault>,
    /// A Multiboot module: a file and its string (default: the path);
    /// repeatable, loaded page-aligned after the kernel in the order given.
    #[arg(long, value_name = "PATH[,STRING]")]
    pub module: Vec<String>,
    /// How to enter the guest: auto (alias: direct) detects the protocol from
    /// the image (a PVH note, then a Multiboot header); firmware starts at the
    /// reset vector and boots through the bundled firmware.
    #[arg(long, value_enum, default_value_t = crate::boot::BootMode::Auto)]
    pub boot: crate::boot::BootMode,
    /// Test only: spoil the firmware boot info (missing, version, size,
    /// checksum, address) to exercise the firmware's error path.
    #[arg(long, value_enum, hide = true, value_name = "HOW")]
    pub boot_info_corrupt: Option<crate::boot::firmware::Corrupt>,
    /// The KVM device to open.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm")]
    pub kvm_device: PathBuf,
}

/// Smallest resident budget: the guest image, its stacks and page tables.
pub const MIN_PHYS_MEM: u64 = 4 << 20;
/// Smallest `--swap-size`: below it pageout has nowhere to go.
pub const MIN_SWAP: u64 = 1 << 20;
/// Longest `--timeout` (30 days): beyond it a timer is no limit at all, and
/// absurd values (1e300) cannot make a Duration.
pub const MAX_TIMEOUT: f64 = 30.0 * 24.0 * 3600.0;

/// Parse `--timeout`: positive, finite, at most [`MAX_TIMEOUT`] seconds.
pub fn parse_timeout(s: &str) -> Result<f64, String> {
    let t: f64 = s.trim().parse().map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(t > 0.0 && t <= MAX_TIMEOUT) {
        return Err(format!("'{s}': give more than 0 and at most {MAX_TIMEOUT} seconds (30 days)"));
    }
    Ok(t)
}

/// Parse a guest-physical address: `0x...`, decimal, or a size (`3G`).
pub fn parse_addr(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).map_err(|_| format!("'{s}' is not a hex address")),
        None => parse_size(s),
    }
}

/// Parse `K/N` (0 <= K < N).
pub fn parse_slice(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("'{s}': expected K/N with 0 <= K < N, e.g. 0/8");
    let (k, n) = s.split_once('/').ok_or_else(bad)?;
    let (k, n): (usize, usize) = (k.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
    if k >= n {
        return Err(bad());
    }
    Ok((k, n))
}

/// Parse a duration: `90`, `90s`, `10m`, `2h` (at most a week).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a duration (examples: 90s, 10m, 1h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use s, m or h)")),
    };
    if secs == 0 || secs > 7 * 24 * 3600 {
        return Err(format!("'{s}': a duration from 1 s to a week"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

/// Parse `64M`, `1G`, `4096K` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (examples: 64M, 1G, 1048576)"))?;
    let mult = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 1u64,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("'{s}': unknown size suffix '{suffix}' (use K, M or G)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))
}

/// `n` bytes in MiB, exactly (up to 8 decimals, no trailing zeros).
fn mib(n: u64) -> String {
    let s = format!("{:.8}", n as f64 / (1u64 << 20) as f64);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

impl RunArgs {
    /// Check what can be checked without the guest: everything but the
    /// image and the files. `max_vcpus` is KVM's limit when known.
    pub fn validate(&self, max_vcpus: Option<u32>) -> Result<(), Error> {
        if !self.memory.is_multiple_of(4096) {
            return Err(Error::Config(format!("--memory {} is not a multiple of 4 KiB", self.memory)));
        }
        if self.memory > crate::vm::MAX_MEMORY {
            return Err(Error::Config(format!(
                "--memory {} bytes ({} MiB) is above the limit of {} MiB (RAM sits below the 32-bit MMIO hole)",
                self.memory,
                mib(self.memory),
                crate::vm::MAX_MEMORY >> 20
            )));
        }
        if self.vcpus == 0 || max_vcpus.is_some_and(|m| self.vcpus > m) {
            let range = match max_vcpus {
                Some(m) => format!("1 to {m} on this host (KVM's maximum)"),
                None => "1 to KVM's maximum on this host".into(),
            };
            return Err(Error::Config(format!("--vcpus {} is out of range: {range}", self.vcpus)));
        }
        if self.clones > self.max_clones {
            return Err(Error::Config(format!(
                "--clones {} is above --max-clones {}: no CLONE could succeed",
                self.clones, self.max_clones
            )));
        }
        if let Some(p) = self.phys_mem {
            if p < MIN_PHYS_MEM || !p.is_multiple_of(4096) {
                return Err(Error::Config(format!(
                    "--phys-mem {p} must be a multiple of 4 KiB and at least {} MiB (the guest kernel's own pages)",
                    MIN_PHYS_MEM >> 20
                )));
            }
        }
        if self.phys_mem.is_none() && (self.swap.is_some() || self.swap_size.is_some()) {
            return Err(Error::Config(
                "--swap and --swap-size need --phys-mem: without a resident budget nothing is paged out".into(),
            ));
        }
        if let Some(s) = self.swap_size {
            if s < MIN_SWAP || !s.is_multiple_of(4096) {
                return Err(Error::Config(format!(
                    "--swap-size {s} must be a multiple of 4 KiB and at least {} MiB",
                    MIN_SWAP >> 20
                )));
            }
        }
        if let Some(t) = self.timeout {
            parse_timeout(&t.to_string()).map_err(|e| Error::Config(format!("--timeout {e}")))?;
        }
        if self.boot_info_corrupt.is_some() && self.boot != crate::boot::BootMode::Firmware {
            return Err(Error::Config("--boot-info-corrupt only applies to --boot firmware".into()));
        }
        crate::boot::check_cmdline(&self.cmdline)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn timeouts_are_positive_finite_and_capped() {
        assert_eq!(parse_timeout("1.5"), Ok(1.5));
        for bad in ["0", "-1", "nan", "inf", "1e300", "2592001", "soon"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
        assert_eq!(mib(3 << 30), "3072");
        assert_eq!(mib((3 << 30) + 4096), "3072.00390625");
    }

    #[test]
    fn slices_and_durations_parse() {
        use super::{parse_duration, parse_slice};
        assert_eq!(parse_slice("0/8"), Ok((0, 8)));
        assert!(parse_slice("8/8").is_err() && parse_slice("1").is_err() && parse_slice("a/2").is_err());
        assert_eq!(parse_duration("10m").map(|d| d.as_secs()), Ok(600));
        assert_eq!(parse_duration("90").map(|d| d.as_secs()), Ok(90));
        assert!(parse_duration("0s").is_err() && parse_duration("5d").is_err() && parse_duration("9999h").is_err());
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }
}
