//! A 16550 UART at 0x3f8, output only: enough of it for a polling driver
//! (LSR always says "transmitter empty").

use std::io::Write;
use std::sync::Mutex;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_END: u16 = COM1_BASE + 8;

const THR: u16 = 0;
const IER: u16 = 1;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const MSR: u16 = 6;
const SCR: u16 = 7;
const LCR_DLAB: u8 = 0x80;
/// Transmitter holding register empty, transmitter empty: always ready.
const LSR_TX_READY: u8 = 0x60;
/// Clear to send, data set ready, carrier detect.
const MSR_READY: u8 = 0xb0;

/// Output-only 16550: every byte written to THR goes straight to `out`.
pub struct Serial {
    regs: Mutex<[u8; 8]>,
    out: Mutex<Box<dyn Write + Send>>,
}

impl Serial {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Serial { regs: Mutex::new([0; 8]), out: Mutex::new(out) }
    }

    pub fn write(&self, port: u16, v: u8) {
        let off = port - COM1_BASE;
        let mut regs = self.regs.lock().unwrap_or_else(|e| e.into_inner());
        if off == THR && regs[LCR as usize] & LCR_DLAB == 0 {
            drop(regs);
            let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
            // Console output is best effort: a closed stdout must not stop the guest.
            let _ = out.write_all(&[v]);
            if v == b'\n' {
                let _ = out.flush();
            }
            return;
        }
        if matches!(off, IER | LCR | MCR | SCR) || off == THR {
            regs[off as usize] = v;
        }
    }

    pub fn read(&self, port: u16) -> u8 {
        let off = port - COM1_BASE;
        let regs = self.regs.lock().unwrap_or_else(|e| e.into_inner());
        match off {
            LSR => LSR_TX_READY,
            MSR => MSR_READY,
            2 => 0x01, // IIR: no interrupt pending
            THR => 0,  // no receive data
            _ => regs[off as usize],
        }
    }

    /// Console text that does not come through the UART (hypercall writes).
    pub fn write_text(&self, bytes: &[u8]) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = out.write_all(bytes);
        let _ = out.flush();
    }
}

/// Console output kept in memory, for tests to read.
#[cfg(test)]
#[derive(Clone, Default)]
pub struct Captured(pub std::sync::Arc<Mutex<Vec<u8>>>);

#[cfg(test)]
impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn polling_driver_sees_ready_and_bytes_come_out() {
        let sink = Captured::default();
        let s = Serial::new(Box::new(sink.clone()));
        assert_eq!(s.read(COM1_BASE + LSR) & 0x20, 0x20);
        for &b in b"hi\n" {
            s.write(COM1_BASE, b);
        }
        // With DLAB set, THR writes program the divisor and print nothing.
        s.write(COM1_BASE + LCR, LCR_DLAB);
        s.write(COM1_BASE, 1);
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
    }
}
