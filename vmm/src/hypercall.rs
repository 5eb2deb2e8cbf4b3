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
        nr::SETMAP => (crate::vpagetable::setmap(&shared.ram.map, &shared.ram.vpt, a[0], a[1]), Action::Continue),
        nr::INVAL => (crate::vpagetable::inval(&shared.ram.map, &shared.ram.vpt, a[0], a[1], a[2]), Action::Continue),
        other => {
            crate::limited!(ratelimit::UNKNOWN_HYPERCALL, "vcpu {cpu}: unknown hypercall {other}");
            (-abi::ENOSYS, Action::Continue)
        }
    }
}

/// Property test ("fuzzing kept in the tree") of the decoder: random and
/// hostile blocks in the RAM of a real pager-backed guest memory (no KVM
/// needed), every answer checked against the ABI. `PROPTEST_CASES=N` runs
/// more than the 64 cases of CI.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::memory::{GuestRam, MemConfig};
    use crate::pmap::Delivery;
    use crate::stats::Reports;
    use proptest::prelude::*;
    use proptest::test_runner::TestRunner;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    const RAM: u64 = 16 << 20;

    fn shared() -> Shared {
        let cfg = MemConfig {
            size: RAM,
            files: Vec::new(),
            delivery: Delivery::Exit,
            phys_mem: None,
            swap: None,
            swap_reuse: false,
            swap_size: None,
            swap_fault: None,
            vpt: Vec::new(),
            default_vpt: false,
            clones: 0,
        };
        let ram = Arc::new(GuestRam::new(&cfg).unwrap());
        let reports = Arc::new(Reports::default());
        Shared::new(ram, 1, 1_000_000, Box::new(std::io::sink()), reports, 0, None, None, None).unwrap()
    }

    fn arg() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..RAM,
            (RAM - 8192)..(RAM + 8192),
            4000u64..4200,
            Just(abi::TEST_REPORT_SIZE as u64),
            (u64::MAX - 8192)..=u64::MAX,
            any::<u64>(),
        ]
    }

    /// Where the block is: in RAM and aligned mostly, else any 32-bit value.
    fn place() -> impl Strategy<Value = u32> {
        prop_oneof![4 => (0u32..(RAM as u32 - 64) / 8).prop_map(|i| i * 8), 1 => any::<u32>()]
    }

    #[derive(Debug, Clone)]
    struct Call {
        at: u32,
        magic: u32,
        version: u16,
        nr: u16,
        args: [u64; 6],
    }

    fn call() -> impl Strategy<Value = Call> {
        (
            place(),
            prop_oneof![9 => Just(abi::HC_MAGIC), 1 => any::<u32>()],
            prop_oneof![9 => Just(abi::ABI_VERSION), 1 => any::<u16>()],
            prop_oneof![4 => 0u16..12, 1 => any::<u16>()],
            [arg(), arg(), arg(), arg(), arg(), arg()],
        )
            .prop_map(|(at, magic, version, nr, args)| Call { at, magic, version, nr, args })
    }

    /// Is `[gpa, gpa + len)` inside RAM (overflow included)?
    fn in_ram(gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|e| e <= RAM)
    }

    #[test]
    fn every_block_gets_the_documented_answer() {
        let s = shared();
        TestRunner::new(crate::boot::fuzz::config())
            .run(&call(), |c| {
                let mut block = Vec::with_capacity(64);
                block.extend_from_slice(&c.magic.to_le_bytes());
                block.extend_from_slice(&c.version.to_le_bytes());
                block.extend_from_slice(&c.nr.to_le_bytes());
                for a in c.args {
                    block.extend_from_slice(&a.to_le_bytes());
                }
                block.extend_from_slice(&0x5a5a_5a5a_5a5a_5a5au64.to_le_bytes());
                let at = u64::from(c.at);
                let placed = at.is_multiple_of(8) && in_ram(at, 64);
                if placed {
                    s.ram.write(at, &block).unwrap();
                }
                let bad_before = s.stats.bad_hypercalls.load(Ordering::Relaxed);
                let action = handle(&s, 0, c.at);
                if !placed {
                    // Not a block vkvm can read: nothing is written, it is counted.
                    prop_assert_eq!(action, Action::Continue);
                    prop_assert_eq!(s.stats.bad_hypercalls.load(Ordering::Relaxed), bad_before + 1);
                    return Ok(());
                }
                let mut r = [0u8; 8];
                s.ram.read(at + 56, &mut r).unwrap();
                let ret = i64::from_le_bytes(r);
                let a = c.args;
                let want: Option<i64> = if c.magic != abi::HC_MAGIC || c.version != abi::ABI_VERSION {
                    Some(-abi::EINVAL)
                } else {
                    match c.nr {
                        nr::VERSION => Some(1),
                        nr::CONSOLE_WRITE if a[1] > abi::MAX_CONSOLE => Some(-abi::E2BIG),
                        nr::CONSOLE_WRITE if !in_ram(a[0], a[1]) => Some(-abi::EFAULT),
                        nr::CONSOLE_WRITE => Some(a[1] as i64),
                        nr::REPORT if a[1] != abi::TEST_REPORT_SIZE as u64 => Some(-abi::EINVAL),
                        nr::REPORT if !in_ram(a[0], a[1]) => Some(-abi::EFAULT),
                        nr::REPORT | nr::EXIT | nr::PARK | nr::CLONE => Some(0),
                        nr::NR_VCPUS => Some(1),
                        nr::TSC_KHZ => Some(1_000_000),
                        // No VPAGETABLE window here: every region index is bad.
                        nr::SETMAP | nr::INVAL => Some(-abi::EINVAL),
                        _ => Some(-abi::ENOSYS),
                    }
                };
                prop_assert_eq!(Some(ret), want, "{:?}", c);
                let expect_action = match (want, c.nr) {
                    (Some(r), _) if r < 0 => Action::Continue,
                    (_, nr::EXIT) => Action::Exit(a[0]),
                    (_, nr::PARK) => Action::Park,
                    (_, nr::CLONE) => Action::Clone(at),
                    _ => Action::Continue,
                };
                prop_assert_eq!(action, expect_action);
                prop_assert_eq!(s.stats.bad_hypercalls.load(Ordering::Relaxed), bad_before + u64::from(ret < 0));
                Ok(())
            })
            .unwrap();
        // However many REPORTs came, the results stay bounded.
        assert!(s.tests.snapshot().len() <= crate::stats::MAX_RESULTS);
    }
}
