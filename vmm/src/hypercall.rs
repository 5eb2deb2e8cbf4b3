//! Hypercall ABI v1 (see `abi.rs`): decode the guest's block, bounds-check
//! every address and length it carries, act, and write the result back.
//! Nothing a guest passes can make the VMM fail: errors go back in `ret`.

use crate::abi::{self, nr};
use crate::ratelimit;
use crate::stats::TestResult;
use crate::vm::Shared;

/// What the vCPU loop does after a hypercall.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    Exit(u64),
    Park,
    /// Clone the VM; the block at this address gets each clone's number.
    Clone(u64),
}

struct Block {
    nr: u16,
    args: [u64; 6],
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

/// Read `len` guest bytes at `gpa` through the pager, or an errno if any
/// byte is outside RAM (or cannot be brought in).
pub fn read_guest(shared: &Shared, gpa: u64, len: u64) -> Result<Vec<u8>, i64> {
    let mut buf = vec![0u8; len as usize];
    shared.ram.read(gpa, &mut buf).map_err(|_| -abi::EFAULT)?;
    Ok(buf)
}

/// Handle a 32-bit `out` of `value` to the hypercall port from `cpu`.
pub fn handle(shared: &Shared, cpu: u32, value: u32) -> Action {
    let gpa = value as u64;
    let raw = match read_guest(shared, gpa, abi::HC_BLOCK_SIZE as u64) {
        Ok(b) if gpa.is_multiple_of(8) => b,
        _ => {
            crate::limited!(
                ratelimit::BAD_BLOCK,
                "vcpu {cpu}: hypercall block at {gpa:#x} is outside guest RAM or misaligned"
            );
            shared.stats.bad_hypercalls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Action::Continue;
        }
    };
    let magic = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let version = u16::from_le_bytes([raw[4], raw[5]]);
    let b = Block { nr: u16::from_le_bytes([raw[6], raw[7]]), args: std::array::from_fn(|i| le64(&raw, 8 + 8 * i)) };
    let (ret, action) = if magic != abi::HC_MAGIC || version != abi::ABI_VERSION {
        crate::limited!(
            ratelimit::BAD_VERSION,
            "vcpu {cpu}: hypercall block with magic {magic:#x} version {version}: expected ABI v{}",
            abi::ABI_VERSION
        );
        (-abi::EINVAL, Action::Continue)
    } else {
        dispatch(shared, cpu, &b)
    };
    if ret < 0 {
        shared.stats.bad_hypercalls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    // The block was checked to be inside RAM above.
    let _ = shared.ram.write(gpa + 56, &ret.to_le_bytes());
    match action {
        Action::Clone(_) => Action::Clone(gpa),
        a => a,
    }
}

fn dispatch(shared: &Shared, cpu: u32, b: &Block) -> (i64, Action) {
    let a = &b.args;
    match b.nr {
        nr::VERSION => (abi::ABI_VERSION as i64, Action::Continue),
        nr::CONSOLE_WRITE => {
            if a[1] > abi::MAX_CONSOLE {
                return (-abi::E2BIG, Action::Continue);
            }
            match read_guest(shared, a[0], a[1]) {
                Ok(bytes) => {
                    shared.serial.write_text(&bytes);
                    (a[1] as i64, Action::Continue)
                }
                Err(e) => (e, Action::Continue),
            }
        }
        nr::REPORT => {
            if a[1] != abi::TEST_REPORT_SIZE as u64 {
                return (-abi::EINVAL, Action::Continue);
            }
            match read_guest(shared, a[0], a[1]) {
                Ok(bytes) => {
                    let mut r = TestResult::decode(&bytes);
                    r.vm = shared.vm_id;
                    crate::limited!(ratelimit::REPORTS, "vcpu {cpu}: test {} {}", r.name, r.status);
                    shared.tests.add(r);
                    (0, Action::Continue)
                }
                Err(e) => (e, Action::Continue),
            }
        }
        nr::EXIT => (0, Action::Exit(a[0])),
        nr::TSC_KHZ => (shared.tsc_khz as i64, Action::Continue),
        nr::NR_VCPUS => (shared.nr_vcpus as i64, Action::Continue),
        nr::PARK => (0, Action::Park),
        // The parent sees 0; each clone's copy of the block gets its number.
        nr::CLONE => (0, Action::Clone(0)),
        nr::SETMAP => (crate::vpagetable::setmap(&shared.ram, a[0], a[1]), Action::Continue),
        nr::INVAL => (crate::vpagetable::inval(&shared.ram, a[0], a[1], a[2]), Action::Continue),
        other => {
            crate::limited!(ratelimit::UNKNOWN_HYPERCALL, "vcpu {cpu}: unknown hypercall {other}");
            (-abi::ENOSYS, Action::Continue)
        }
    }
}
