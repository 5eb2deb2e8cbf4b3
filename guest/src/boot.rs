//! PVH entry (32-bit protected mode, paging off) to 64-bit long mode, then
//! `kmain`. Everything here runs in ring 0, which the hosts here emulate at
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
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %edi                 /* hvm_start_info (PVH: in ebx) */
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

    .section .bss.stacks, "aw", @nobits
    .p2align 12
    .global boot_stacks
boot_stacks:
    .skip {kstack} * ({max_cpus} + 1)
"#,
    max_cpus = const MAX_CPUS,
    kstack = const KSTACK_SIZE,
    options(att_syntax)
);

/// Address of the stack top the entry stub gave `cpu` (its ring-0 stack).
pub fn kernel_stack_top(cpu: usize) -> u64 {
    extern "C" {
        static boot_stacks: u8;
    }
    core::ptr::addr_of!(boot_stacks) as u64 + ((cpu + 1) * KSTACK_SIZE) as u64
}
