//! What the guest runs on: vkvm (found by probing its hypercall port) or
//! another VMM such as QEMU (serial console and the isa-debug-exit port).
//! Never decided by a build flag.

use crate::abi::{self, HcBlock};
use crate::arch::Frame;
use crate::boot::MAX_CPUS;
use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

const COM1: u16 = 0x3f8;
const LSR_THRE: u8 = 0x20;
/// QEMU's isa-debug-exit (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`).
const DEBUG_EXIT_PORT: u16 = 0xf4;

static VKVM: AtomicBool = AtomicBool::new(false);

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O; ring 3 runs with IOPL 3.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) };
}
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as above.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack)) };
    v
}
pub fn outw(port: u16, v: u16) {
    // SAFETY: as above.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack)) };
}
pub fn outl(port: u16, v: u32) {
    // SAFETY: as above; `memory` because a hypercall reads and writes its block.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nostack)) };
}
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as above.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack)) };
    v
}
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc has no side effects.
    unsafe { asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    ((hi as u64) << 32) | lo as u64
}
pub fn cpuid(leaf: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: cpuid only reads; rbx is saved because LLVM reserves it.
    unsafe {
        asm!("mov {t:r}, rbx", "cpuid", "xchg {t:r}, rbx", t = out(reg) b,
             inout("eax") leaf => a, inout("ecx") 0 => c, out("edx") d, options(nomem, nostack));
    }
    [a, b, c, d]
}

/// QEMU's fw_cfg, legacy I/O interface (vkvm has the same).
pub mod fw_cfg {
    pub const SIGNATURE: u16 = 0x0000;
    pub const ID: u16 = 0x0001;
    pub const RAM_SIZE: u16 = 0x0003;
    pub const NB_CPUS: u16 = 0x0005;
    pub const MAX_CPUS: u16 = 0x000f;
    pub const FILE_DIR: u16 = 0x0019;

    /// Select `key` and read the first `buf.len()` bytes of it.
    pub fn read(key: u16, buf: &mut [u8]) {
        super::outw(0x510, key);
        for b in buf.iter_mut() {
            *b = super::inb(0x511);
        }
    }
    /// The first 8 bytes of `key`, little-endian.
    pub fn read_u64(key: u16) -> u64 {
        let mut b = [0u8; 8];
        read(key, &mut b);
        u64::from_le_bytes(b)
    }
    /// Whether fw_cfg is there at all (its signature reads "QEMU").
    pub fn present() -> bool {
        let mut b = [0u8; 4];
        read(SIGNATURE, &mut b);
        &b == b"QEMU"
    }
}

/// Probe for vkvm: its hypercall port answers with a magic value.
pub fn detect() -> bool {
    let v = inl(abi::HC_PORT) == abi::HC_PROBE_MAGIC;
    VKVM.store(v, Ordering::Relaxed);
    v
}
pub fn is_vkvm() -> bool {
    VKVM.load(Ordering::Relaxed)
}

#[repr(C, align(64))]
struct Block(HcBlock);
static mut HC_BLOCKS: [Block; MAX_CPUS] =
    [const { Block(HcBlock { magic: 0, version: 0, nr: 0, args: [0; 6], ret: 0 }) }; MAX_CPUS];

/// Issue hypercall `nr` from `cpu`. Returns `ret` (negative errno on error).
pub fn hypercall(cpu: usize, nr: u16, args: &[u64]) -> i64 {
    // SAFETY: each CPU uses only its own block; the out instruction is the
    // point at which the VMM reads and writes it (asm with memory clobber).
    unsafe {
        let b = &raw mut HC_BLOCKS[cpu % MAX_CPUS].0;
        let mut a = [0u64; 6];
        a[..args.len().min(6)].copy_from_slice(&args[..args.len().min(6)]);
        b.write_volatile(HcBlock { magic: abi::HC_MAGIC, version: abi::ABI_VERSION, nr, args: a, ret: 0 });
        outl(abi::HC_PORT, b as u64 as u32);
        core::ptr::addr_of!((*b).ret).read_volatile()
    }
}

static CONSOLE_LOCK: AtomicU32 = AtomicU32::new(0);

/// Serial write with the polling driver (LSR "transmitter empty").
pub fn serial_write(s: &[u8]) {
    for &c in s {
        while inb(COM1 + 5) & LSR_THRE == 0 {
            core::hint::spin_loop();
        }
        outb(COM1, c);
    }
}

/// Console output: one hypercall per line under vkvm, the UART elsewhere.
pub fn console_write(cpu: usize, s: &[u8]) {
    while CONSOLE_LOCK.swap(1, Ordering::Acquire) != 0 {
        core::hint::spin_loop();
    }
    if is_vkvm() {
        hypercall(cpu, abi::nr::CONSOLE_WRITE, &[s.as_ptr() as u64, s.len() as u64]);
    } else {
        serial_write(s);
    }
    CONSOLE_LOCK.store(0, Ordering::Release);
}

pub fn exit(cpu: usize, status: u64) -> ! {
    if is_vkvm() {
        hypercall(cpu, abi::nr::EXIT, &[status]);
    }
    // QEMU exits with (status << 1) | 1.
    outl(DEBUG_EXIT_PORT, status as u32);
    loop {
        core::hint::spin_loop();
    }
}

/// Ring-0 crash report: registers on the console, then exit status 3.
pub fn crash(cpu: usize, f: &Frame, cr2: u64) -> ! {
    let mut line = crate::fmt::Line::new();
    line.s("guest exception: vector ").dec(f.vector).s(" error ").hex(f.error);
    line.s(" cpu ").dec(cpu as u64).s(" rip ").hex(f.rip).s(" rsp ").hex(f.rsp);
    line.s(" cr2 ").hex(cr2).s(" cs ").hex(f.cs).s(" rflags ").hex(f.rflags).s("\n");
    serial_write(line.as_bytes());
    exit(cpu, abi::STATUS_CRASH)
}
