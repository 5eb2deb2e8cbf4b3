//! PCI configuration mechanism #1 (0xcf8 address, 0xcfc-0xcff data) with an
//! empty bus: every configuration read returns all ones, which a PCI scan
//! reads as "no device". Kernels probe this even when they need no PCI.

use std::sync::atomic::{AtomicU32, Ordering};

pub const ADDRESS_PORT: u16 = 0xcf8;
pub const DATA_END: u16 = 0xd00;

#[derive(Default)]
pub struct PciConfig {
    address: AtomicU32,
}

impl PciConfig {
    pub fn write(&self, port: u16, data: &[u8]) {
        // Only a 32-bit write to 0xcf8 sets the address (0xcf9 is the reset
        // control register on real chipsets; we have nothing to reset).
        if port == ADDRESS_PORT && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.address.store(v, Ordering::Relaxed);
        }
        // Data writes go to no device.
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        if port == ADDRESS_PORT && data.len() == 4 {
            data.copy_from_slice(&self.address.load(Ordering::Relaxed).to_le_bytes());
        } else {
            data.fill(0xff);
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn address_reads_back_and_the_bus_is_empty() {
        let p = PciConfig::default();
        p.write(ADDRESS_PORT, &0x8000_0000u32.to_le_bytes());
        let mut d = [0u8; 4];
        p.read(ADDRESS_PORT, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
        let mut w = [0u8; 2];
        p.read(0xcfe, &mut w);
        assert_eq!(w, [0xff, 0xff]);
    }
}
