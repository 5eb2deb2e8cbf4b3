//! The tiny vkvm guest kernel. Ring 0 sets up long mode, a GDT, an IDT and a
//! TSS with interrupt stacks, then every CPU drops to a ring-3 task that runs
//! the tests named on the command line (`tests=a,b,c`; default `selfcheck`).
#![no_std]
#![no_main]
// Statics shared between CPUs are reached through raw pointers on purpose.
#![allow(clippy::deref_addrof)]

mod abi;
mod arch;
mod boot;
mod bootinfo;
mod fmt;
mod mem;
mod platform;
mod run;
mod tests;
mod vpt;
mod vpt_tests;

/// Test names and descriptions, printed by `tests=list`.
pub use tests::ALL as TESTS;

use core::sync::atomic::{AtomicU64, Ordering};

/// hvm_start_info address the BSP was given (identity mapped).
static START_INFO: AtomicU64 = AtomicU64::new(0);

/// Ring 0, called by the entry stub on every CPU.
#[no_mangle]
extern "C" fn kmain(start_info: u64, cpu: u64) -> ! {
    if cpu == 0 {
        START_INFO.store(start_info, Ordering::Relaxed);
        tests::kernel_touch_at_boot(start_info);
        if boot::booted_by_multiboot() {
            boot::start_aps();
        }
    }
    arch::init_and_enter_user(cpu as usize, user_entry)
}

/// Ring 3 from here on.
extern "C" fn user_entry(cpu: u64) -> ! {
    run::main(cpu as usize, START_INFO.load(Ordering::Relaxed))
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut l = fmt::Line::new();
    l.s("guest panic");
    if let Some(loc) = info.location() {
        l.s(" at ").s(loc.file()).s(":").dec(loc.line() as u64);
    }
    l.s("\n");
    platform::serial_write(l.as_bytes());
    platform::exit(0, abi::STATUS_CRASH)
}
