//! Command line.

use crate::config::{
    mib, parse_duration, parse_map_file, parse_size, parse_slice, parse_timeout, parse_vpt_region, FaultDelivery,
    FileMap, SwapFault, VptSpec, MAX_MEMORY, MIN_PHYS_MEM, MIN_SWAP,
};
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
    #[arg(long = "map-file", value_name = "PATH@GPA[,OPTS]", value_parser = parse_map_file)]
    pub map_files: Vec<FileMap>,
    /// A VPAGETABLE window over guest RAM: GPA,SIZE[,levels=N] (levels 1-4,
    /// default 4). Repeatable; region index = order given. Without it vkvm
    /// gives the bundled guest three windows: 64 MiB with 4 levels at
    /// 0xC0000000, 16 MiB with 2 levels at 0xC4000000 and 16 MiB with 3
    /// levels at 0xC5000000.
    #[arg(long = "vpt-region", value_name = "GPA,SIZE[,levels=N]", value_parser = parse_vpt_region)]
    pub vpt_regions: Vec<VptSpec>,
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

impl RunArgs {
    /// Check what can be checked without the guest: everything but the
    /// image and the files. `max_vcpus` is KVM's limit when known.
    pub fn validate(&self, max_vcpus: Option<u32>) -> Result<(), Error> {
        if !self.memory.is_multiple_of(4096) {
            return Err(Error::Config(format!("--memory {} is not a multiple of 4 KiB", self.memory)));
        }
        if self.memory > MAX_MEMORY {
            return Err(Error::Config(format!(
                "--memory {} bytes ({} MiB) is above the limit of {} MiB (RAM sits below the 32-bit MMIO hole)",
                self.memory,
                mib(self.memory),
                MAX_MEMORY >> 20
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
