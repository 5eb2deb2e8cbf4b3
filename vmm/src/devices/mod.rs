//! The devices a guest reaches by port I/O or MMIO, and the one [`Bus`]
//! that routes every port (and every access to an unbacked address) to
//! them. Each PC device a small kernel pokes lives in its own module; the
//! hypercall port is a device like the others. Everything here takes guest
//! values as untrusted: any width, any value, never a panic.

pub mod fw_cfg;
pub mod hypercall;
pub mod pci;
pub mod serial;
pub mod shutdown;

use crate::abi;
use crate::boot::firmware;
use crate::memory::GuestRam;
use crate::ratelimit;
use crate::stats::{Reports, Stats};
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub use hypercall::{Hypercall, VmIds};
pub use serial::{Serial, COM1_BASE, COM1_END};
pub use shutdown::{BOCHS_SHUTDOWN_PORT, DEBUG_EXIT_PORT};

/// What a port write asks of the vCPU that made it.
#[derive(Debug, PartialEq, Eq)]
pub enum PioOut {
    /// Done (or ignored and counted); the vCPU runs on.
    Done,
    /// The guest asked to stop the VM with this status.
    Exit(u64),
    /// The vCPU stops running (PARK).
    Park,
    /// CLONE: the block at this address gets each clone's number.
    Clone { block: u64 },
    /// The firmware reported this error: the VM stops (status 3).
    Crash(String),
}

/// All the port and MMIO devices of one VM.
pub struct Bus {
    serial: Arc<Serial>,
    fw_cfg: fw_cfg::FwCfg,
    pci: pci::PciConfig,
    shutdown: shutdown::BochsShutdown,
    pub hypercall: Hypercall,
    /// Counts unclaimed port accesses.
    stats: Arc<Stats>,
}

impl Bus {
    /// The devices of a VM over `ram`, with `console` as COM1's (and the
    /// console hypercall's) output.
    pub fn new(
        ram: Arc<GuestRam>,
        console: Box<dyn std::io::Write + Send>,
        tests: Arc<Reports>,
        stats: Arc<Stats>,
        ids: VmIds,
    ) -> Bus {
        let serial = Arc::new(Serial::new(console));
        Bus {
            fw_cfg: fw_cfg::FwCfg::new(ids.nr_vcpus, ram.size),
            pci: pci::PciConfig::default(),
            shutdown: shutdown::BochsShutdown::default(),
            hypercall: Hypercall::new(ram, serial.clone(), tests, stats.clone(), ids),
            serial,
            stats,
        }
    }

    /// A write of `data` to `port` by vCPU `cpu`: the whole port map.
    pub fn write(&self, cpu: u32, port: u16, data: &[u8]) -> PioOut {
        match port {
            COM1_BASE..COM1_END => self.serial.write(port, data.first().copied().unwrap_or(0)),
            abi::HC_PORT if data.len() == 4 => {
                return match self.hypercall.call(cpu, le_u32(data)) {
                    hypercall::Action::Continue => PioOut::Done,
                    hypercall::Action::Exit(s) => PioOut::Exit(s),
                    hypercall::Action::Park => PioOut::Park,
                    hypercall::Action::Clone { block } => PioOut::Clone { block },
                }
            }
            abi::NULL_PORT => {}
            firmware::ERROR_PORT if data.len() == 4 => {
                let v = le_u32(data);
                match firmware::error_message(v) {
                    Some(msg) => return PioOut::Crash(msg),
                    None => crate::limited!(
                        ratelimit::FIRMWARE_PORT,
                        "vcpu {cpu}: firmware error port: {v:#x} is no firmware message"
                    ),
                }
            }
            DEBUG_EXIT_PORT => {
                let v = le_u32(data);
                // Once per VM, but a guest can make many clones.
                crate::limited!(ratelimit::GUEST_STOP, "guest wrote {v} to the debug-exit port");
                return PioOut::Exit(u64::from(v));
            }
            BOCHS_SHUTDOWN_PORT => {
                if data.iter().any(|&b| self.shutdown.write(b)) {
                    crate::limited!(ratelimit::GUEST_STOP, "guest wrote \"Shutdown\" to port 0x8900");
                    return PioOut::Exit(0);
                }
            }
            fw_cfg::SELECTOR_PORT => self.fw_cfg.select(le_u32(data) as u16),
            // Writes to the data port are not supported by QEMU's legacy
            // interface either; they are ignored.
            fw_cfg::DATA_PORT => {}
            pci::ADDRESS_PORT..pci::DATA_END => self.pci.write(port, data),
            _ => {
                self.stats.exits.unhandled_pio.fetch_add(1, Ordering::Relaxed);
                crate::limited!(ratelimit::UNCLAIMED_PORT, "vcpu {cpu}: write to unclaimed port {port:#x} ignored");
            }
        }
        PioOut::Done
    }

    /// A read of `port` into `data`; an unclaimed port reads as all ones.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1_BASE..COM1_END => {
                let v = self.serial.read(port);
                data.fill(0);
                data[0] = v;
            }
            abi::HC_PORT if data.len() == 4 => data.copy_from_slice(&abi::HC_PROBE_MAGIC.to_le_bytes()),
            fw_cfg::DATA_PORT => data.iter_mut().for_each(|b| *b = self.fw_cfg.read_byte()),
            // The selector reads back as all ones, like an empty bus.
            fw_cfg::SELECTOR_PORT => data.fill(0xff),
            pci::ADDRESS_PORT..pci::DATA_END => self.pci.read(port, data),
            _ => {
                self.stats.exits.unhandled_pio.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
            }
        }
    }

    /// A read at a guest-physical address nothing backs: all ones.
    pub fn mmio_read(&self, cpu: u32, gpa: u64, data: &mut [u8]) {
        crate::limited!(ratelimit::UNBACKED, "vcpu {cpu}: read of {} bytes at unbacked address {gpa:#x}", data.len());
        data.fill(0xff);
    }

    /// A write to a guest-physical address nothing backs: dropped.
    pub fn mmio_write(&self, cpu: u32, gpa: u64, data: &[u8]) {
        crate::limited!(
            ratelimit::UNBACKED,
            "vcpu {cpu}: write of {} bytes to unbacked address {gpa:#x} ignored",
            data.len()
        );
    }
}

/// Little-endian value of up to 4 bytes (a shorter access is zero-extended).
fn le_u32(data: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    let n = data.len().min(4);
    v[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(v)
}

#[cfg(test)]
mod test {
    use super::*;

    pub fn bus() -> Bus {
        let ram = crate::memory::test_ram(16 << 20, &[]);
        let ids = VmIds { vm_id: 0, nr_vcpus: 2, tsc_khz: 1 };
        Bus::new(ram, Box::new(std::io::sink()), Arc::default(), Arc::default(), ids)
    }

    #[test]
    fn routes_exits_and_claims() {
        let b = bus();
        assert_eq!(b.write(0, DEBUG_EXIT_PORT, &7u32.to_le_bytes()), PioOut::Exit(7));
        assert_eq!(b.write(0, DEBUG_EXIT_PORT, &[200]), PioOut::Exit(200));
        assert_eq!(b.write(0, 0x1234, &[0]), PioOut::Done);
        assert_eq!(b.stats.exits.unhandled_pio.load(Ordering::Relaxed), 1);
        let mut out = PioOut::Done;
        for &c in b"Shutdown" {
            out = b.write(0, BOCHS_SHUTDOWN_PORT, &[c]);
        }
        assert_eq!(out, PioOut::Exit(0));
        let mut d = [0u8; 4];
        b.read(0x1234, &mut d);
        assert_eq!((d, b.stats.exits.unhandled_pio.load(Ordering::Relaxed)), ([0xff; 4], 2));
        b.read(0xcfc, &mut d);
        assert_eq!((d, b.stats.exits.unhandled_pio.load(Ordering::Relaxed)), ([0xff; 4], 2));
        b.read(abi::HC_PORT, &mut d);
        assert_eq!(u32::from_le_bytes(d), abi::HC_PROBE_MAGIC);
        // A hypercall port access of the wrong width is an unclaimed port.
        assert_eq!(b.write(0, abi::HC_PORT, &[1]), PioOut::Done);
        assert_eq!(b.stats.exits.unhandled_pio.load(Ordering::Relaxed), 3);
    }
}
