//! PVH and Multiboot v1 entries (32-bit protected mode, paging off) to
//! 64-bit long mode, then `kmain`; and the 16-bit trampoline that brings an
//! AP started by INIT/SIPI into the same path. Everything here runs in ring 0, which the hosts here emulate at
//! about 1 µs per instruction, so it does as little as possible: the page
//! tables are static data (4 GiB identity map with 2 MiB pages, user
//! accessible) and every CPU takes a ticket to pick its stacks.

use core::arch::global_asm;

/// Most CPUs the guest brings up; later ones stop in the entry stub.
pub const MAX_CPUS: usize = 16;
pub const KSTACK_SIZE: usize = 16 * 1024;

global_asm!(
    r#"
    .section .note.Xen, "a"
    .p2align 2
    .long 4              /* name size: "Xen\0" */
    .long 4              /* desc size */
    .long 18             /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start32

    .section .text.boot, "ax"
    /* Multiboot v1 header: first in the image, so within the first 8 KiB
     * of the file. Flags: bit 1, memory information. No address fields:
     * loaders use the ELF32 program headers. The magic is stored inverted
     * ("dormant"): QEMU tries Multiboot before PVH and refuses a Multiboot
     * ELF64, so only the ELF32 that vmm/build.rs makes gets the real magic
     * (build.rs flips it there). */
    .p2align 2
multiboot_header:
    .long ~{mb_magic}
    .long {mb_flags}
    .long -({mb_magic} + {mb_flags})

    .code32
    .global mb_start32
mb_start32:
    cli
    cld
    cmpl ${mb_boot_magic}, %eax
    jne 9f
    movl %ebx, %edi                 /* Multiboot information */
    movl $1, boot_protocol
    jmp common32

    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %edi                 /* hvm_start_info (PVH: in ebx) */
    jmp common32

    /* An AP after the trampoline: flat 32-bit segments, no boot info. */
ap_start32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %edi, %edi

common32:
    movl $1, %eax
    lock xaddl %eax, cpu_ticket
    cmpl ${max_cpus}, %eax
    jae 9f
    movl %eax, %esi                 /* cpu index */
    leal 1(%eax), %ecx
    shll $14, %ecx                  /* KSTACK_SIZE per cpu */
    leal boot_stacks(%ecx), %esp
    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax   /* PAE, OSFXSR, OSXMMEXCPT */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx          /* EFER */
    rdmsr
    orl $(1 << 8), %eax             /* LME */
    wrmsr
    movl %cr0, %eax
    andl $~(1 << 2), %eax           /* EM off: core uses SSE */
    orl $((1 << 31) | (1 << 16) | (1 << 1) | 1), %eax  /* PG, WP, MP, PE */
    movl %eax, %cr0
    lgdt gdt_ptr
    ljmpl $0x08, $start64
9:
    hlt
    jmp 9b

    .code64
start64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movl %edi, %edi
    movl %esi, %esi
    call kmain
10:
    hlt
    jmp 10b

    .section .data.pagetables, "aw"
    .p2align 12
    .global pml4
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x7
    .quad pd + 0x1000 + 0x7
    .quad pd + 0x2000 + 0x7
    .quad pd + 0x3000 + 0x7
    .fill 508, 8, 0
pd:
    .set i, 0
    .rept 2048
    .quad (i << 21) | 0x87          /* present, writable, user, 2 MiB */
    .set i, i + 1
    .endr

    .section .data.gdt, "aw"
    .p2align 4
    .global gdt
gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08 kernel code 64 */
    .quad 0x00cf92000000ffff        /* 0x10 kernel data */
    .quad 0x00cff2000000ffff        /* 0x18 user data (dpl 3) */
    .quad 0x00affa000000ffff        /* 0x20 user code 64 (dpl 3) */
    .fill {max_cpus} * 2, 8, 0      /* 0x28: one 16-byte TSS descriptor per cpu */
gdt_end:
    .p2align 3
    .global gdt_ptr
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    .section .data.ticket, "aw"
    .p2align 2
cpu_ticket:
    .long 0
    .global boot_protocol
boot_protocol:
    .long 0                         /* 0 PVH, 1 Multiboot */

    /* Real-mode AP trampoline, copied to AP_TRAMPOLINE by the BSP; a SIPI
     * starts the AP here with CS = AP_TRAMPOLINE >> 4, IP = 0. It loads a
     * GDT of its own (the kernel's code segment is 64-bit), turns on
     * protection and jumps to ap_start32. Real-mode code is emulated on
     * PVM hosts: it stays a handful of instructions. */
    .section .rodata.trampoline, "a"
    .code16
    .global ap_tramp_start, ap_tramp_end
ap_tramp_start:
    cli
    lgdtl %cs:(ap_tramp_gdtr - ap_tramp_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $ap_start32
    .p2align 3
ap_tramp_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff        /* 0x08 code 32 */
    .quad 0x00cf92000000ffff        /* 0x10 data */
ap_tramp_gdtr:
    .word 23
    .long {tramp} + (ap_tramp_gdt - ap_tramp_start)
ap_tramp_end:
    .code64

    .section .bss.stacks, "aw", @nobits
    .p2align 12
    .global boot_stacks
boot_stacks:
    .skip {kstack} * ({max_cpus} + 1)
"#,
    max_cpus = const MAX_CPUS,
    kstack = const KSTACK_SIZE,
    mb_magic = const 0x1bad_b002u32,
    mb_flags = const MB_FLAGS,
    mb_boot_magic = const 0x2bad_b002u32,
    tramp = const AP_TRAMPOLINE,
    options(att_syntax)
);

/// Multiboot header flags: bit 1, memory information (vmm/build.rs, which
/// finds the header by them, has the same value).
const MB_FLAGS: u32 = 1 << 1;
/// Where the BSP copies the real-mode AP trampoline (the SIPI vector is
/// this >> 12). Below 1 MiB, clear of vkvm's boot data (0x6000-0x7fff,
/// 0x20000-0x2ffff) and QEMU's (0x9000 and up).
pub const AP_TRAMPOLINE: u64 = 0x8000;

/// The protocol the BSP was started with.
pub fn booted_by_multiboot() -> bool {
    extern "C" {
        static boot_protocol: u32;
    }
    // SAFETY: written once by the entry stub before any Rust code runs.
    unsafe { core::ptr::addr_of!(boot_protocol).read_volatile() == 1 }
}

/// Ring 0, BSP, Multiboot boots only: start every other CPU as on a PC.
/// Copy the trampoline below 1 MiB, enable the xAPIC, and broadcast INIT
/// then SIPI (twice, as the MP specification asks) to all but ourselves.
/// Each AP then takes a ticket in the entry path like a PVH-started one.
/// KVM needs no delays between the steps; a physical machine would.
pub fn start_aps() {
    extern "C" {
        static ap_tramp_start: u8;
        static ap_tramp_end: u8;
    }
    const LAPIC: u64 = 0xfee0_0000;
    const SVR: u64 = 0xf0;
    const ICR_LOW: u64 = 0x300;
    const ICR_HIGH: u64 = 0x310;
    const ALL_BUT_SELF: u32 = 3 << 18;
    const ASSERT: u32 = 1 << 14;
    const INIT: u32 = 5 << 8;
    const STARTUP: u32 = 6 << 8;
    // SAFETY: ring 0 with the identity map: the trampoline target is free
    // low RAM, and the LAPIC registers are at their architectural address.
    unsafe {
        let start = core::ptr::addr_of!(ap_tramp_start);
        let len = core::ptr::addr_of!(ap_tramp_end) as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, AP_TRAMPOLINE as *mut u8, len);
        let reg = |r: u64| (LAPIC + r) as *mut u32;
        reg(SVR).write_volatile(0x1ff); // software enable, spurious vector 0xff
        reg(ICR_HIGH).write_volatile(0);
        reg(ICR_LOW).write_volatile(ALL_BUT_SELF | ASSERT | INIT);
        for _ in 0..2 {
            reg(ICR_HIGH).write_volatile(0);
            reg(ICR_LOW).write_volatile(ALL_BUT_SELF | ASSERT | STARTUP | (AP_TRAMPOLINE >> 12) as u32);
        }
    }
}

/// Address of the stack top the entry stub gave `cpu` (its ring-0 stack).
pub fn kernel_stack_top(cpu: usize) -> u64 {
    extern "C" {
        static boot_stacks: u8;
    }
    core::ptr::addr_of!(boot_stacks) as u64 + ((cpu + 1) * KSTACK_SIZE) as u64
}
