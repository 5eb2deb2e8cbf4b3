//! vkvm reset-vector firmware: a flat 64 KiB ROM mapped read-only at
//! 0xFFFF0000. The vCPU starts as real hardware does, in real mode at
//! 0xFFFFFFF0 (CS base 0xFFFF0000, IP 0xFFF0). The firmware loads its own GDT,
//! enters 32-bit protected mode with flat segments, checks the boot-info
//! structure vkvm left in RAM (see `bootinfo.rs`), and jumps to the guest's
//! PVH entry: paging off, interrupts off, `ebx` = `hvm_start_info`.
//!
//! Rust code compiled for x86-64 cannot run in 16- or 32-bit mode, so all of
//! it is assembly. It is plain integer code (real mode and ring 0 are
//! emulated on PVM hosts, whose emulator lacks SSE), and it never writes
//! memory: the ROM is read-only (a write would be an MMIO exit), and with no
//! stack every vCPU can run it at the same time.
//!
//! On a missing or bad structure the BSP prints one line starting with
//! `ERROR_PREFIX` on COM1 (16550 at 0x3f8, polling LSR bit 0x20), writes the
//! line's address to `ERROR_PORT`, and every vCPU halts with interrupts off
//! (`cli; hlt` loop); vkvm reports that line and exits 3.
#![no_std]
#![no_main]

mod bootinfo;

use bootinfo::*;
use core::arch::global_asm;

global_asm!(
    r#"
    .section .rom, "ax"
    .global rom_start
rom_start:

    .code16
start16:
    cli
    cld
    /* The GDT is in the ROM; o32 so that its full 32-bit base is loaded. */
    lgdtl %cs:(gdt_ptr - rom_start)
    movl %cr0, %eax
    orl $1, %eax                    /* PE; paging stays off */
    movl %eax, %cr0
    ljmpl $0x08, $start32

    .code32
start32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl ${bi}, %ebx
    movl $msg_magic, %esi
    cmpl ${magic}, 0(%ebx)
    jne fail
    movl $msg_version, %esi
    cmpw ${version}, 4(%ebx)
    jne fail
    movl $msg_size, %esi
    cmpw ${size}, 6(%ebx)
    jne fail
    /* The 32-bit words of the structure sum to 0. */
    xorl %eax, %eax
    movl ${words}, %ecx
    movl %ebx, %edx
1:
    addl (%edx), %eax
    addl $4, %edx
    decl %ecx
    jnz 1b
    movl $msg_checksum, %esi
    testl %eax, %eax
    jnz fail
    /* Both addresses below 4 GiB, the entry nonzero. */
    movl $msg_address, %esi
    movl 20(%ebx), %eax
    orl 28(%ebx), %eax
    jnz fail
    movl 16(%ebx), %eax
    testl %eax, %eax
    jz fail
    /* PVH entry: 32-bit protected mode, paging off, flat CS/DS/ES/SS,
     * interrupts off (cli above; IF is clear at reset too), ebx = start info. */
    movl 24(%ebx), %ebx
    xorl %ecx, %ecx
    xorl %edx, %edx
    xorl %esi, %esi
    xorl %edi, %edi
    xorl %ebp, %ebp
    xorl %esp, %esp
    jmp *%eax

    /* esi = message. Only the BSP (CPUID APIC id 0) prints, so that the
     * line vkvm reports is not interleaved from several vCPUs. */
fail:
    movl $1, %eax
    cpuid
    shrl $24, %ebx
    jnz halt
    movl %esi, %edi
print:
    movb (%esi), %cl
    testb %cl, %cl
    jz report
    movw $0x3fd, %dx                /* LSR */
2:
    inb %dx, %al
    testb $0x20, %al                /* THR empty */
    jz 2b
    movw $0x3f8, %dx                /* THR */
    movb %cl, %al
    outb %al, %dx
    incl %esi
    jmp print
report:
    movl %edi, %eax                 /* the message, for vkvm's error */
    movw ${error_port}, %dx
    outl %eax, %dx
halt:
    cli
    hlt
    jmp halt

    /* Accessed bits preset: loading a segment must not write the ROM. */
    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf9b000000ffff        /* 0x08: code, 32-bit, base 0, 4 GiB */
    .quad 0x00cf93000000ffff        /* 0x10: data, 32-bit, base 0, 4 GiB */
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt

    /* Each starts with ERROR_PREFIX; 0x5000 is BOOT_INFO_ADDR. */
msg_magic:
    .asciz "vkvm-firmware: no boot info at 0x5000 (magic is not VKBI); halted\n"
msg_version:
    .asciz "vkvm-firmware: boot info version is not 1; halted\n"
msg_size:
    .asciz "vkvm-firmware: boot info size is not 32; halted\n"
msg_checksum:
    .asciz "vkvm-firmware: boot info checksum mismatch; halted\n"
msg_address:
    .asciz "vkvm-firmware: boot info PVH entry is 0 or above 4 GiB; halted\n"

    /* The reset vector: the last 16 bytes below 4 GiB. */
    .code16
    .org 0xfff0, 0xf4
reset:
    cli
    /* jmp rel16 to start16: IP wraps at 64 KiB, which the assembler's
     * range check does not know, so the displacement is written out. */
    .byte 0xe9
    .word ((start16 - rom_start) - (reset + 4 - rom_start)) & 0xffff
    .org 0x10000, 0xf4
"#,
    bi = const BOOT_INFO_ADDR,
    magic = const BOOT_INFO_MAGIC,
    version = const BOOT_INFO_VERSION,
    size = const BOOT_INFO_SIZE,
    words = const BOOT_INFO_SIZE / 4,
    error_port = const ERROR_PORT,
    options(att_syntax)
);

// The image layout above depends on these.
const _: () = assert!(ROM_BASE + ROM_SIZE == 1 << 32 && ROM_SIZE == 0x1_0000);
const _: () = assert!(BOOT_INFO_SIZE.is_multiple_of(4));

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // No Rust code runs in the firmware; this only satisfies no_std.
    loop {}
}
