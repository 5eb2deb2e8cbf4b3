//! vkvm hypercall ABI, version 1 — the one definition shared by the guest
//! (`guest/src/abi.rs`) and the VMM (`vmm/src/abi.rs` includes this file).
//!
//! A hypercall is a 32-bit `out` to [`HC_PORT`] whose value is the
//! guest-physical address of a [`HcBlock`] (8-byte aligned, below 4 GiB).
//! The VMM reads the block, checks `magic` and `version`, performs `nr` with
//! `args`, and writes the result to `ret` before the guest resumes.
//! Negative `ret` values are errors (`E*` below). Every address and length a
//! guest passes is bounds-checked against guest memory; lengths are capped.
//!
//! A 32-bit `in` from [`HC_PORT`] returns [`HC_PROBE_MAGIC`]; a guest uses it
//! to find out whether it runs under vkvm (elsewhere an unclaimed port reads
//! as all ones). A byte `out` to [`NULL_PORT`] does nothing but exit to the
//! VMM: it is the PIO round-trip benchmark port.
#![allow(dead_code)]

pub const ABI_VERSION: u16 = 1;
pub const HC_PORT: u16 = 0x0600;
pub const NULL_PORT: u16 = 0x0604;
/// "VKVM" read little-endian from `in eax, HC_PORT`.
pub const HC_PROBE_MAGIC: u32 = 0x4d56_4b56;
/// "VKHC" in `HcBlock::magic`.
pub const HC_MAGIC: u32 = 0x4348_4b56;

/// `nr` values.
pub mod nr {
    /// ret = ABI version.
    pub const VERSION: u16 = 0;
    /// args: [buf gpa, len] — write bytes to the console. ret = bytes written.
    pub const CONSOLE_WRITE: u16 = 1;
    /// args: [report gpa, size of TestReport] — report a test result.
    pub const REPORT: u16 = 2;
    /// args: [status] (any u64) — stop the VM; vkvm exits with it, or with 4
    /// when it would collide with vkvm's own statuses (see STATUS_*).
    pub const EXIT: u16 = 3;
    /// ret = TSC frequency in kHz.
    pub const TSC_KHZ: u16 = 4;
    /// ret = number of vCPUs the VM was started with.
    pub const NR_VCPUS: u16 = 5;
    /// The calling vCPU is done: the VMM stops running it (ring 3 cannot hlt).
    pub const PARK: u16 = 6;
    /// args: [region, master vpte] — MADV_SETMAP for a VPAGETABLE region.
    pub const SETMAP: u16 = 7;
    /// args: [region, start offset, len] — MADV_INVAL for a VPAGETABLE region.
    pub const INVAL: u16 = 8;
    /// Clone the VM (copy-on-write). ret = 0 in the parent, clone number >= 1 in a clone;
    /// -EAGAIN when `--max-clones` clones are alive, -ENOMEM when the host failed.
    pub const CLONE: u16 = 9;
}

/// Error codes returned (negated) in `ret`.
pub const EINVAL: i64 = 22;
pub const EFAULT: i64 = 14;
pub const ENOSYS: i64 = 38;
pub const E2BIG: i64 = 7;
/// A limit was reached (CLONE: `--max-clones` clones are alive); retry later.
pub const EAGAIN: i64 = 11;
/// The host could not provide what the call needs (CLONE: out of fds,
/// threads or memory); vkvm then ends the run with status 3.
pub const ENOMEM: i64 = 12;

/// Longest console write accepted in one call.
pub const MAX_CONSOLE: u64 = 4096;

#[repr(C, align(8))]
#[derive(Clone, Copy, Default)]
pub struct HcBlock {
    pub magic: u32,
    pub version: u16,
    pub nr: u16,
    pub args: [u64; 6],
    pub ret: i64,
}

pub const HC_BLOCK_SIZE: usize = 64;
/// Where `ret` sits in an [`HcBlock`]: the VMM writes the result there.
pub const HC_RET_OFFSET: u64 = 56;

/// Test status in [`TestReport::status`].
pub const TEST_PASS: u32 = 0;
pub const TEST_FAIL: u32 = 1;
pub const MAX_COUNTERS: usize = 8;
pub const NAME_LEN: usize = 24;
pub const DETAIL_LEN: usize = 128;

/// A test result. Names are NUL-padded ASCII. `detail` says what went wrong
/// (first wrong address, expected and found bytes) or is empty.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct TestReport {
    pub name: [u8; NAME_LEN],
    pub status: u32,
    pub cpu: u32,
    pub ncounters: u32,
    pub _pad: u32,
    pub counter_names: [[u8; 16]; MAX_COUNTERS],
    pub counters: [u64; MAX_COUNTERS],
    pub detail: [u8; DETAIL_LEN],
}

pub const TEST_REPORT_SIZE: usize = 24 + 16 + 16 * MAX_COUNTERS + 8 * MAX_COUNTERS + DETAIL_LEN;

const _: () = assert!(core::mem::size_of::<HcBlock>() == HC_BLOCK_SIZE);
const _: () = assert!(core::mem::offset_of!(HcBlock, ret) == HC_RET_OFFSET as usize);
const _: () = assert!(core::mem::size_of::<TestReport>() == TEST_REPORT_SIZE);

/// The bundled guest's exit statuses. vkvm exits with 0 and 1 as they are;
/// 2, 3 (which are also vkvm's own usage and crash statuses) and any status
/// above 125 come out as 4, with the guest's value in `guest_exit_status`
/// of `--stats-json` (README, "Exit status").
pub const STATUS_PASS: u64 = 0;
pub const STATUS_FAIL: u64 = 1;
pub const STATUS_USAGE: u64 = 2;
pub const STATUS_CRASH: u64 = 3;
