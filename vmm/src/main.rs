//! `vkvm`: a KVM virtual machine monitor whose guest memory is run the way
//! the BSD VM system runs a process.

mod abi;
mod bench;
mod boot;
mod child;
mod cli;
mod clone;
mod config;
mod control;
mod devices;
mod dispatch;
mod error;
mod exit;
mod fault;
mod guest_image;
mod inputs;
mod kvm;
mod memory;
mod outcome;
mod pmap;
mod profile;
mod ratelimit;
mod run;
mod signals;
mod stats;
mod status;
mod torture;
mod uffd;
mod vcpu;
mod vm;
mod vpagetable;

use clap::Parser;
use error::Error;
use std::process::ExitCode;

fn main() -> ExitCode {
    // --timeout counts from here: set-up is part of the run.
    let started = std::time::Instant::now();
    let cli = cli::Cli::parse();
    env_logger::Builder::new()
        .filter_level(cli.log_level())
        .format_timestamp(None)
        .target(env_logger::Target::Stderr)
        .init();
    let status = command(cli.command, started);
    match status {
        Ok(s) => ExitCode::from(s),
        Err(e) => {
            status::eprint_line(&format!("vkvm: {e}"));
            ExitCode::from(e.status())
        }
    }
}

/// The guest's status byte, or the status for an error.
pub type Status = u8;

impl Error {
    /// 2: usage or configuration error; 3: VMM, host or guest failure.
    pub fn status(&self) -> Status {
        match self {
            Error::Interrupted(sig) => status::of_signal(*sig),
            e if e.is_config() => status::USAGE,
            _ => status::CRASH,
        }
    }
}

fn command(c: cli::Command, started: std::time::Instant) -> Result<Status, Error> {
    use cli::Command as C;
    // Commands that run guests stop them cleanly on SIGINT/SIGTERM.
    if matches!(c, C::Run(_) | C::Profile { .. } | C::Bench { .. } | C::Torture { list: false, .. }) {
        signals::install()?;
    }
    match c {
        C::Run(args) => run::run(&args, started),
        C::Torture { list: true, .. } => status::print(&torture::list()).map(|()| 0),
        C::Torture { tests, seed, json, run, matrix, slice, soak, jobs, .. } => {
            torture::dispatch(&run, &tests, seed, json.as_deref(), matrix, slice, soak, jobs as usize)
        }
        C::Bench { runs, clone_sizes, qemu, json, run } => {
            bench::command(&run, runs.max(1), &clone_sizes, &qemu, json.as_deref())
        }
        C::Profile { mut run, out } => run::profile(&mut run, &out, started),
        C::Guest { output, format } => guest_image::write(&output, format).map(|()| 0),
        C::Firmware { output } => std::fs::write(&output, boot::firmware::ROM)
            .map(|()| 0)
            .map_err(|e| Error::Config(format!("--output {}: {e}", output.display()))),
    }
}
