//! Per-CPU GDT/TSS/IDT set-up, the drop to ring 3, and exception handling.
//! Ring 0 is emulated on the hosts here: keep this short and plain.

use crate::boot::{kernel_stack_top, MAX_CPUS};
use crate::platform;
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const USER_CS: u64 = 0x23;
const USER_DS: u64 = 0x1b;
const TSS_SEL_BASE: u16 = 0x28;
const IST_SIZE: usize = 16 * 1024;
pub const USTACK_SIZE: usize = 64 * 1024;

#[repr(C, packed)]
struct Tss {
    _r0: u32,
    rsp0: u64,
    _rsp1: u64,
    _rsp2: u64,
    _r1: u64,
    ist: [u64; 7],
    _r2: u64,
    _r3: u16,
    iomap: u16,
    /// I/O permission bitmap, all zeros: ring 3 may use every port. PVM
    /// hosts ignore an IOPL set by iretq, so the bitmap is what grants it.
    io_bitmap: [u8; 8192],
    /// The CPU reads one byte past the bitmap; it must be all ones.
    io_bitmap_end: u8,
}

#[repr(C, align(16))]
struct Stack<const N: usize>([u8; N]);

static mut TSS: [Tss; MAX_CPUS] = [const {
    Tss {
        _r0: 0,
        rsp0: 0,
        _rsp1: 0,
        _rsp2: 0,
        _r1: 0,
        ist: [0; 7],
        _r2: 0,
        _r3: 0,
        iomap: 104,
        io_bitmap: [0; 8192],
        io_bitmap_end: 0xff,
    }
}; MAX_CPUS];
static mut IST_STACKS: [Stack<IST_SIZE>; MAX_CPUS] = [const { Stack([0; IST_SIZE]) }; MAX_CPUS];
static mut USER_STACKS: [Stack<USTACK_SIZE>; MAX_CPUS] = [const { Stack([0; USTACK_SIZE]) }; MAX_CPUS];

#[repr(C, align(16))]
struct Idt([u64; 64]);
static mut IDT: Idt = Idt([0; 64]);

extern "C" {
    static gdt: [u64; 5 + 2 * MAX_CPUS];
    static isr_table: [u64; 32];
}

/// Set up this CPU's TSS and IDT, then drop to ring 3 at `user_entry(cpu)`.
pub fn init_and_enter_user(cpu: usize, user_entry: extern "C" fn(u64) -> !) -> ! {
    // SAFETY: each CPU writes only its own TSS slot and GDT descriptor; the
    // IDT is written with identical values by every CPU before it is loaded.
    unsafe {
        let tss = &raw mut TSS[cpu];
        (*tss).rsp0 = kernel_stack_top(cpu);
        (*tss).ist[0] = (&raw const IST_STACKS[cpu]) as u64 + IST_SIZE as u64;
        let base = tss as u64;
        let limit = (core::mem::size_of::<Tss>() - 1) as u64;
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        let g = (&raw const gdt) as *mut u64;
        g.add(5 + 2 * cpu).write_volatile(low);
        g.add(6 + 2 * cpu).write_volatile(base >> 32);
        let sel = TSS_SEL_BASE + 16 * cpu as u16;
        asm!("ltr {0:x}", in(reg) sel, options(nostack));

        let idt = (&raw mut IDT) as *mut u64;
        for (v, &handler) in isr_table.iter().enumerate() {
            // 64-bit interrupt gate, DPL 0, IST 1.
            let lo = (handler & 0xffff) | (0x08 << 16) | (1 << 32) | (0x8e << 40) | ((handler >> 16) & 0xffff) << 48;
            idt.add(2 * v).write_volatile(lo);
            idt.add(2 * v + 1).write_volatile(handler >> 32);
        }
        load_idt((&raw const IDT) as u64, 32 * 16 - 1);

        let ustack = (&raw const USER_STACKS[cpu]) as u64 + USTACK_SIZE as u64;
        asm!(
            "push {ss}", "push {rsp3}", "push {rflags}", "push {cs}", "push {rip}",
            "iretq",
            ss = in(reg) USER_DS,
            rsp3 = in(reg) ustack,
            rflags = in(reg) 0x3002u64, // IOPL 3: ring 3 may use its ports; IF off
            cs = in(reg) USER_CS,
            rip = in(reg) user_entry as usize as u64,
            in("rdi") cpu as u64,
            options(noreturn)
        );
    }
}

unsafe fn load_idt(base: u64, limit: u16) {
    #[repr(C, packed)]
    struct Ptr {
        limit: u16,
        base: u64,
    }
    let p = Ptr { limit, base };
    // SAFETY: the caller passes a valid IDT (or a zero limit on purpose).
    unsafe { asm!("lidt [{0}]", in(reg) &p, options(nostack)) };
}

/// Register state pushed by the exception stubs.
#[repr(C)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// A fault that a ring-3 probe armed for: where to resume, and what happened.
pub struct Recovery {
    pub resume: AtomicU64,
    pub vector: AtomicU64,
    pub addr: AtomicU64,
    pub error: AtomicU64,
}

pub static RECOVERY: [Recovery; MAX_CPUS] = [const {
    Recovery {
        resume: AtomicU64::new(0),
        vector: AtomicU64::new(u64::MAX),
        addr: AtomicU64::new(0),
        error: AtomicU64::new(0),
    }
}; MAX_CPUS];

/// Set by the `triple-fault` test: the next exception wrecks the IDT.
pub static TRIPLE_FAULT: AtomicBool = AtomicBool::new(false);

fn current_cpu() -> usize {
    let tr: u16;
    // SAFETY: `str` only reads the task register.
    unsafe { asm!("str {0:x}", out(reg) tr, options(nomem, nostack)) };
    (tr.wrapping_sub(TSS_SEL_BASE) / 16) as usize % MAX_CPUS
}

#[no_mangle]
extern "C" fn exception_handler(frame: &mut Frame) {
    let cpu = current_cpu();
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {0}, cr2", out(reg) cr2, options(nomem, nostack)) };
    if TRIPLE_FAULT.load(Ordering::Relaxed) {
        // SAFETY: deliberately unloading the IDT so the next fault cannot be
        // delivered: #UD -> #DF -> triple fault -> the VMM sees a shutdown.
        unsafe {
            load_idt(0, 0);
            asm!("ud2", options(noreturn));
        }
    }
    let rec = &RECOVERY[cpu];
    let resume = rec.resume.load(Ordering::Relaxed);
    if resume != 0 && frame.cs & 3 == 3 {
        rec.vector.store(frame.vector, Ordering::Relaxed);
        rec.addr.store(cr2, Ordering::Relaxed);
        rec.error.store(frame.error, Ordering::Relaxed);
        rec.resume.store(0, Ordering::Relaxed);
        frame.rip = resume;
        return;
    }
    platform::crash(cpu, frame, cr2);
}

global_asm!(
    r#"
    .macro ISR_NOERR n
isr_\n:
    push 0
    push \n
    jmp isr_common
    .endm
    .macro ISR_ERR n
isr_\n:
    push \n
    jmp isr_common
    .endm

    .section .text
    ISR_NOERR 0
    ISR_NOERR 1
    ISR_NOERR 2
    ISR_NOERR 3
    ISR_NOERR 4
    ISR_NOERR 5
    ISR_NOERR 6
    ISR_NOERR 7
    ISR_ERR 8
    ISR_NOERR 9
    ISR_ERR 10
    ISR_ERR 11
    ISR_ERR 12
    ISR_ERR 13
    ISR_ERR 14
    ISR_NOERR 15
    ISR_NOERR 16
    ISR_ERR 17
    ISR_NOERR 18
    ISR_NOERR 19
    ISR_NOERR 20
    ISR_ERR 21
    ISR_NOERR 22
    ISR_NOERR 23
    ISR_NOERR 24
    ISR_NOERR 25
    ISR_NOERR 26
    ISR_NOERR 27
    ISR_NOERR 28
    ISR_ERR 29
    ISR_ERR 30
    ISR_NOERR 31

isr_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    call exception_handler
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq

    .section .rodata
    .p2align 3
    .global isr_table
isr_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad isr_\n
    .endr
"#
);
