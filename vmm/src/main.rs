//! `vkvm`: a KVM virtual machine monitor whose guest memory is run the way
//! the BSD VM system runs a process.

mod abi;
mod boot;
mod cli;
mod devices;
mod error;
mod exit;
mod guest_image;
mod hypercall;
mod stats;
mod vcpu;
mod vm;

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
        cli::Command::Guest { output, format } => guest_image::write(&output, format).map(|()| 0),
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
