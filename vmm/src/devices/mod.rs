//! Port-I/O devices. Each PC device a small kernel pokes lives in its own
//! module; [`Pc`] routes the ports they claim. Everything here takes guest
//! values as untrusted: any width, any value, never a panic.

pub mod fw_cfg;
pub mod pci;
pub mod serial;
pub mod shutdown;

pub use serial::{Serial, COM1_BASE, COM1_END};
pub use shutdown::DEBUG_EXIT_PORT;

/// What a port write asks the VMM to do.
#[derive(Debug, PartialEq, Eq)]
pub enum PioOut {
    /// A device took the write.
    Done,
    /// No device claims the port.
    Unclaimed,
    /// The guest asked to stop the VM with this status.
    Exit(u64),
}

/// The PC devices beyond the UART: fw_cfg, PCI configuration ports (no
/// devices), the debug-exit port and the Bochs "Shutdown" port.
pub struct Pc {
    fw_cfg: fw_cfg::FwCfg,
    pci: pci::PciConfig,
    shutdown: shutdown::BochsShutdown,
}

impl Pc {
    pub fn new(nr_cpus: u32, ram_size: u64) -> Self {
        Pc {
            fw_cfg: fw_cfg::FwCfg::new(nr_cpus, ram_size),
            pci: pci::PciConfig::default(),
            shutdown: shutdown::BochsShutdown::default(),
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) -> PioOut {
        match port {
            DEBUG_EXIT_PORT => {
                let v = le_u32(data);
                // Once per VM, but a guest can make many clones.
                crate::limited!(crate::ratelimit::GUEST_STOP, "guest wrote {v} to the debug-exit port");
                PioOut::Exit(u64::from(v))
            }
            shutdown::BOCHS_SHUTDOWN_PORT => {
                if data.iter().any(|&b| self.shutdown.write(b)) {
                    crate::limited!(crate::ratelimit::GUEST_STOP, "guest wrote \"Shutdown\" to port 0x8900");
                    PioOut::Exit(0)
                } else {
                    PioOut::Done
                }
            }
            fw_cfg::SELECTOR_PORT => {
                self.fw_cfg.select(le_u32(data) as u16);
                PioOut::Done
            }
            // Writes to the data port are not supported by QEMU's legacy
            // interface either; they are ignored.
            fw_cfg::DATA_PORT => PioOut::Done,
            pci::ADDRESS_PORT..pci::DATA_END => {
                self.pci.write(port, data);
                PioOut::Done
            }
            _ => PioOut::Unclaimed,
        }
    }

    /// Fill `data` for a read of `port`; false if no device claims it.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match port {
            fw_cfg::DATA_PORT => {
                for b in data.iter_mut() {
                    *b = self.fw_cfg.read_byte();
                }
            }
            // The selector reads back as all ones, like an empty bus.
            fw_cfg::SELECTOR_PORT => data.fill(0xff),
            pci::ADDRESS_PORT..pci::DATA_END => self.pci.read(port, data),
            _ => return false,
        }
        true
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

    #[test]
    fn routes_exits_and_claims() {
        let pc = Pc::new(2, 64 << 20);
        assert_eq!(pc.write(DEBUG_EXIT_PORT, &7u32.to_le_bytes()), PioOut::Exit(7));
        assert_eq!(pc.write(DEBUG_EXIT_PORT, &[200]), PioOut::Exit(200));
        assert_eq!(pc.write(0x1234, &[0]), PioOut::Unclaimed);
        let mut out = PioOut::Done;
        for &b in b"Shutdown" {
            out = pc.write(shutdown::BOCHS_SHUTDOWN_PORT, &[b]);
        }
        assert_eq!(out, PioOut::Exit(0));
        let mut d = [0u8; 4];
        assert!(!pc.read(0x1234, &mut d));
        assert!(pc.read(0xcfc, &mut d));
        assert_eq!(d, [0xff; 4]);
    }
}
