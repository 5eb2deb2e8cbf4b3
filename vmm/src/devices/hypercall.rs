//! The hypercall port, ABI v1 (see `abi.rs`): decode the guest's block,
//! bounds-check every address and length it carries, act, and write the
//! result back. Nothing a guest passes can make the VMM fail: errors go
//! back in `ret`.

use super::Serial;
use crate::abi::{self, nr};
use crate::memory::GuestRam;
use crate::ratelimit;
use crate::stats::{Reports, Stats, TestResult};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What the vCPU does after a hypercall.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    Exit(u64),
    Park,
    /// Clone the VM; the block at this address gets each clone's number.
    Clone {
        block: u64,
    },
}

/// A decoded block: where it is, the call and its arguments.
struct Call {
    gpa: u64,
    nr: u16,
    args: [u64; 6],
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

/// The hypercall device of one VM: what the calls read and change.
pub struct Hypercall {
    pub ram: Arc<GuestRam>,
    console: Arc<Serial>,
    /// Test reports of this VM and all its clones (each tagged with its VM).
    pub tests: Arc<Reports>,
    stats: Arc<Stats>,
    /// 0 for the VM vkvm booted, 1.. for clones.
    pub vm_id: u32,
    pub tsc_khz: u32,
    pub nr_vcpus: u32,
}

impl Hypercall {
    pub fn new(ram: Arc<GuestRam>, console: Arc<Serial>, tests: Arc<Reports>, stats: Arc<Stats>, ids: VmIds) -> Self {
        Hypercall { ram, console, tests, stats, vm_id: ids.vm_id, tsc_khz: ids.tsc_khz, nr_vcpus: ids.nr_vcpus }
    }

    /// Read `len` guest bytes at `gpa` through the pager, or an errno if
    /// any byte is outside RAM (or cannot be brought in).
    fn read_guest(&self, gpa: u64, len: u64) -> Result<Vec<u8>, i64> {
        let mut buf = vec![0u8; len as usize];
        self.ram.read(gpa, &mut buf).map_err(|_| -abi::EFAULT)?;
        Ok(buf)
    }

    /// Answer a hypercall block at `block` with `ret` (the block is in RAM).
    pub fn answer(ram: &GuestRam, block: u64, ret: i64) -> Result<(), pager::FaultError> {
        ram.write(block + abi::HC_RET_OFFSET, &ret.to_le_bytes())
    }

    /// A 32-bit `out` of `value` to the hypercall port from `cpu`.
    pub fn call(&self, cpu: u32, value: u32) -> Action {
        let gpa = value as u64;
        let raw = match self.read_guest(gpa, abi::HC_BLOCK_SIZE as u64) {
            Ok(b) if gpa.is_multiple_of(8) => b,
            _ => {
                crate::limited!(
                    ratelimit::BAD_BLOCK,
                    "vcpu {cpu}: hypercall block at {gpa:#x} is outside guest RAM or misaligned"
                );
                self.stats.bad_hypercalls.fetch_add(1, Ordering::Relaxed);
                return Action::Continue;
            }
        };
        let magic = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let version = u16::from_le_bytes([raw[4], raw[5]]);
        let call = Call {
            gpa,
            nr: u16::from_le_bytes([raw[6], raw[7]]),
            args: std::array::from_fn(|i| le64(&raw, 8 + 8 * i)),
        };
        let (ret, action) = if magic != abi::HC_MAGIC || version != abi::ABI_VERSION {
            crate::limited!(
                ratelimit::BAD_VERSION,
                "vcpu {cpu}: hypercall block with magic {magic:#x} version {version}: expected ABI v{}",
                abi::ABI_VERSION
            );
            (-abi::EINVAL, Action::Continue)
        } else {
            self.dispatch(cpu, &call)
        };
        if ret < 0 {
            self.stats.bad_hypercalls.fetch_add(1, Ordering::Relaxed);
        }
        // The block was checked to be inside RAM above.
        let _ = Self::answer(&self.ram, gpa, ret);
        action
    }

    fn dispatch(&self, cpu: u32, c: &Call) -> (i64, Action) {
        let a = &c.args;
        match c.nr {
            nr::VERSION => (abi::ABI_VERSION as i64, Action::Continue),
            nr::CONSOLE_WRITE => (self.console_write(a[0], a[1]), Action::Continue),
            nr::REPORT => (self.report(cpu, a[0], a[1]), Action::Continue),
            nr::EXIT => (0, Action::Exit(a[0])),
            nr::TSC_KHZ => (self.tsc_khz as i64, Action::Continue),
            nr::NR_VCPUS => (self.nr_vcpus as i64, Action::Continue),
            nr::PARK => (0, Action::Park),
            // The parent sees 0; each clone's copy of the block gets its number.
            nr::CLONE => (0, Action::Clone { block: c.gpa }),
            nr::SETMAP => (crate::vpagetable::setmap(&self.ram.map, &self.ram.vpt, a[0], a[1]), Action::Continue),
            nr::INVAL => (crate::vpagetable::inval(&self.ram.map, &self.ram.vpt, a[0], a[1], a[2]), Action::Continue),
            other => {
                crate::limited!(ratelimit::UNKNOWN_HYPERCALL, "vcpu {cpu}: unknown hypercall {other}");
                (-abi::ENOSYS, Action::Continue)
            }
        }
    }

    fn console_write(&self, gpa: u64, len: u64) -> i64 {
        if len > abi::MAX_CONSOLE {
            return -abi::E2BIG;
        }
        match self.read_guest(gpa, len) {
            Ok(bytes) => {
                self.console.write_text(&bytes);
                len as i64
            }
            Err(e) => e,
        }
    }

    fn report(&self, cpu: u32, gpa: u64, len: u64) -> i64 {
        if len != abi::TEST_REPORT_SIZE as u64 {
            return -abi::EINVAL;
        }
        match self.read_guest(gpa, len) {
            Ok(bytes) => {
                let mut r = TestResult::decode(&bytes);
                r.vm = self.vm_id;
                crate::limited!(ratelimit::REPORTS, "vcpu {cpu}: test {} {}", r.name, r.status);
                self.tests.add(r);
                0
            }
            Err(e) => e,
        }
    }
}

/// Who a VM is, for the calls that ask.
#[derive(Clone, Copy, Debug)]
pub struct VmIds {
    /// 0 for the VM vkvm booted, 1.. for clones.
    pub vm_id: u32,
    pub nr_vcpus: u32,
    pub tsc_khz: u32,
}

/// Property test ("fuzzing kept in the tree") of the decoder: random and
/// hostile blocks in the RAM of a real pager-backed guest memory (no KVM
/// needed), every answer checked against the ABI. `PROPTEST_CASES=N` runs
/// more than the 64 cases of CI.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::TestRunner;

    const RAM: u64 = 16 << 20;

    fn device() -> (Hypercall, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        let console = Arc::new(Serial::new(Box::new(std::io::sink())));
        let ids = VmIds { vm_id: 0, nr_vcpus: 1, tsc_khz: 1_000_000 };
        let h = Hypercall::new(crate::memory::test_ram(RAM, &[]), console, Arc::default(), stats.clone(), ids);
        (h, stats)
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
        let (s, stats) = device();
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
                let bad_before = stats.bad_hypercalls.load(Ordering::Relaxed);
                let action = s.call(0, c.at);
                if !placed {
                    // Not a block vkvm can read: nothing is written, it is counted.
                    prop_assert_eq!(action, Action::Continue);
                    prop_assert_eq!(stats.bad_hypercalls.load(Ordering::Relaxed), bad_before + 1);
                    return Ok(());
                }
                let mut r = [0u8; 8];
                s.ram.read(at + abi::HC_RET_OFFSET, &mut r).unwrap();
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
                    (_, nr::CLONE) => Action::Clone { block: at },
                    _ => Action::Continue,
                };
                prop_assert_eq!(action, expect_action);
                prop_assert_eq!(stats.bad_hypercalls.load(Ordering::Relaxed), bad_before + u64::from(ret < 0));
                Ok(())
            })
            .unwrap();
        // However many REPORTs came, the results stay bounded.
        assert!(s.tests.snapshot().len() <= crate::stats::MAX_RESULTS);
    }
}
