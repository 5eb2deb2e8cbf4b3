//! `vkvm`: a KVM virtual machine monitor whose guest memory is run the way
//! the BSD VM system runs a process.

mod abi;
mod bench;
mod boot;
mod cli;
mod clone;
mod devices;
mod error;
mod exit;
mod fault;
mod guest_image;
mod hypercall;
mod memory;
mod pmap;
mod profile;
mod ratelimit;
mod stats;
mod torture;
mod uffd;
mod vcpu;
mod vm;
mod vpagetable;

use clap::Parser;
use error::Error;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    env_logger::Builder::new()
        .filter_level(cli.log_level())
        .format_timestamp(None)
        .target(env_logger::Target::Stderr)
        .init();
    let status = match cli.command {
        cli::Command::Run(args) => vm::run(&args),
        cli::Command::Torture { list: true, .. } => {
            print!("{}", torture::list());
            Ok(0)
        }
        cli::Command::Torture { tests, seed, json, run, .. } => torture::command(&run, &tests, seed, json.as_deref()),
        cli::Command::Bench { runs, clone_sizes, qemu, json, run } => {
            bench::command(&run, runs.max(1), &clone_sizes, &qemu, json.as_deref())
        }
        cli::Command::Profile { mut run, out } => profile::command(&mut run, &out),
        cli::Command::Guest { output, format } => guest_image::write(&output, format).map(|()| 0),
        cli::Command::Firmware { output } => std::fs::write(&output, boot::firmware::ROM)
            .map(|()| 0)
            .map_err(Error::io(format!("cannot write {}", output.display()))),
    };
    match status {
        Ok(s) => ExitCode::from(s),
        Err(e) => {
            eprintln!("vkvm: {e}");
            ExitCode::from(e.status())
        }
    }
}

/// The guest's status byte, or the status for an error.
pub type Status = u8;

impl Error {
    /// 2: usage or configuration error; 3: VMM or guest crash.
    pub fn status(&self) -> Status {
        if self.is_config() {
            abi::STATUS_USAGE as u8
        } else {
            abi::STATUS_CRASH as u8
        }
    }
}
