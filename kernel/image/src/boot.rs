//! The multiboot1 header and the 32-bit entry stub that brings the CPU into long
//! mode and calls [`crate::kmain`].
//!
//! # Why the "a.out kludge"
//!
//! The kernel is an ELF64 file, and multiboot1 loaders only understand ELF32:
//! QEMU's `-kernel` refuses an ELF64 multiboot image ("Cannot load x86-64 image,
//! give a 32bit one"), and iPXE's ELF loader likewise handles only ELF32.
//! Both, however, honour flag bit 16 of the multiboot header (the "a.out kludge"):
//! the header itself then says where the image goes (`header_addr`, `load_addr`,
//! `load_end_addr`, `bss_end_addr`, `entry_addr`) and the loader copies the file
//! bytes raw, never parsing the ELF headers. `linker.ld` makes that raw copy
//! correct: one loadable segment linked at 1 MiB, multiboot header first (inside
//! the first 8 KiB of the file, where loaders search), so the file bytes from
//! `load_addr` to `load_end_addr` are exactly the memory image. No ELF32 wrapper or
//! `objcopy` step is needed, and the same file still works with ELF tools (`gdb`,
//! `objdump`, `nm`).
//!
//! # What the stub does
//!
//! 1. saves EAX (magic) and EBX (info pointer), zeroes `.bss` (the loaders already
//!    do; this makes it independent of them), records the TSC at entry (the "boot"
//!    instant of log timestamps), sets up a 64 KiB stack;
//! 2. checks the multiboot magic `0x2BADB002` and CPUID's long-mode bit; on failure
//!    it prints a message on COM1 and exits QEMU with
//!    [`ExitCode::BootFailure`](metta_kernel::exit::ExitCode) (status 37);
//! 3. identity-maps the first 4 GiB with 2 MiB pages (PML4 → PDPT → 4 PDs of
//!    512 entries), enables PAE, sets EFER.LME, enables paging (with protection
//!    already on, this activates long mode). RAM is only used below 1 GiB
//!    (`MAPPED_LIMIT` in `main.rs`); the rest of the map is there for the PCI
//!    memory hole below 4 GiB, where the firmware places device BARs (the
//!    virtio-net registers). Caching there is uncached through the MTRRs that
//!    SeaBIOS sets for the PCI hole;
//! 4. loads a GDT with a 64-bit code segment and far-jumps into it;
//! 5. loads the data segments, and calls `kmain(magic, info_addr)` with the SysV
//!    ABI and a 16-byte aligned stack.
//!
//! The x86_64-unknown-none target uses no SSE and no red zone, so no FPU/SSE state
//! needs enabling. Interrupts stay off until `kmain` has loaded the IDT and
//! started the timer (`interrupts.rs`, `timer.rs`).

use core::arch::global_asm;

use metta_kernel::exit::ExitCode;
use metta_kernel::multiboot::BOOTLOADER_MAGIC;

/// Multiboot1 header magic.
const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Header flags: bit 1 (give us memory information, including the memory map) and
/// bit 16 (the address fields of the header are valid: the a.out kludge).
const HEADER_FLAGS: u32 = (1 << 1) | (1 << 16);
/// magic + flags + checksum must be 0 (mod 2^32).
const HEADER_CHECKSUM: u32 = HEADER_MAGIC.wrapping_add(HEADER_FLAGS).wrapping_neg();

/// Size of the boot stack, which `kmain` keeps running on.
const STACK_SIZE: usize = 64 * 1024;

global_asm!(
    r#"
    .section .multiboot, "a"
    .balign 4
metta_multiboot_header:
    .long {header_magic}
    .long {header_flags}
    .long {header_checksum}
    .long metta_multiboot_header    /* header_addr */
    .long __image_start             /* load_addr: start of the file image */
    .long __load_end                /* load_end_addr: end of .data */
    .long __bss_end                 /* bss_end_addr: the loader zeroes up to here */
    .long _start                    /* entry_addr */

    .section .bss.boot, "aw", @nobits
    .balign 4096
    /* global: src/memstat.rs measures the tables and the stack */
    .global metta_boot_pml4
    .global metta_boot_stack
    .global metta_boot_stack_top
metta_boot_pml4:
    .skip 4096
metta_boot_pdpt:
    .skip 4096
metta_boot_pd:
    .skip 4 * 4096
metta_boot_stack:
    .skip {stack_size}
metta_boot_stack_top:

    .section .rodata.boot, "a"
    .balign 16
metta_gdt64:
    .quad 0                         /* null */
    .quad 0x00AF9B000000FFFF        /* 0x08: code, DPL 0, L=1 (64-bit), accessed */
    .quad 0x00CF93000000FFFF        /* 0x10: data, writable, accessed */
metta_gdt64_end:
    .balign 4
metta_gdt64_ptr:
    .word metta_gdt64_end - metta_gdt64 - 1
    .quad metta_gdt64
metta_msg_no_multiboot:
    .asciz "metta-kernel: not started by a multiboot loader (bad magic in EAX)\r\n"
metta_msg_no_long_mode:
    .asciz "metta-kernel: this CPU has no long mode (x86-64)\r\n"

    .section .text.boot, "ax"
    .code32
    .global _start
_start:
    cli
    cld
    mov %eax, %ebp                  /* multiboot magic, kept until kmain */
    mov %ebx, %esi                  /* multiboot info address, kept until kmain */

    mov $__bss_start, %edi          /* zero .bss */
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl

    rdtsc                           /* boot instant for log timestamps */
    mov %eax, {boot_tsc}
    mov %edx, {boot_tsc}+4

    mov $metta_boot_stack_top, %esp

    cmp ${loader_magic}, %ebp
    jne .Lno_multiboot

    mov $0x80000000, %eax           /* CPUID: extended leaves, then long mode bit */
    cpuid
    cmp $0x80000001, %eax
    jb .Lno_long_mode
    mov $0x80000001, %eax
    cpuid
    test $(1 << 29), %edx
    jz .Lno_long_mode

    mov $metta_boot_pdpt, %eax      /* PML4[0] -> PDPT, present | writable */
    or $0x3, %eax
    mov %eax, metta_boot_pml4
    xor %ecx, %ecx                  /* PDPT[j] -> PD j (4 KiB apart), present | writable */
.Lmap_pdpt:
    mov %ecx, %eax
    shl $12, %eax
    add $metta_boot_pd, %eax
    or $0x3, %eax
    mov %eax, metta_boot_pdpt(,%ecx,8)
    inc %ecx
    cmp $4, %ecx
    jne .Lmap_pdpt
    xor %ecx, %ecx                  /* PD[i] = i * 2 MiB | present | writable | huge */
.Lmap_2mib:                         /* (the 4 PDs are contiguous: i runs over 4 GiB) */
    mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, metta_boot_pd(,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jne .Lmap_2mib

    mov $metta_boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $(1 << 5), %eax              /* CR4.PAE */
    mov %eax, %cr4
    mov $0xC0000080, %ecx           /* IA32_EFER */
    rdmsr
    or $(1 << 8), %eax              /* EFER.LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax            /* CR0.PG | CR0.PE: long mode is now active */
    mov %eax, %cr0

    lgdt metta_gdt64_ptr
    ljmp $0x08, $.Llong_mode

.Lno_multiboot:
    mov $metta_msg_no_multiboot, %ebx
    jmp .Lboot_failure
.Lno_long_mode:
    mov $metta_msg_no_long_mode, %ebx
.Lboot_failure:                     /* print the message in EBX on COM1, exit QEMU */
    mov $0x3f8, %dx
.Lputs:
    movb (%ebx), %al
    test %al, %al
    jz .Lexit
    outb %al, %dx
    inc %ebx
    jmp .Lputs
.Lexit:
    mov ${exit_port}, %dx
    mov ${boot_failure}, %eax
    outl %eax, %dx
.Lhalt32:
    cli
    hlt
    jmp .Lhalt32

    .code64
.Llong_mode:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov $metta_boot_stack_top, %esp /* a 32-bit write zero-extends into RSP */
    mov %ebp, %edi                  /* arg 1: multiboot magic */
    mov %esi, %esi                  /* arg 2: info address, zero-extended */
    xor %ebp, %ebp                  /* end of the frame-pointer chain */
    call {kmain}
.Lhalt64:
    cli
    hlt
    jmp .Lhalt64
"#,
    header_magic = const HEADER_MAGIC,
    header_flags = const HEADER_FLAGS,
    header_checksum = const HEADER_CHECKSUM,
    stack_size = const STACK_SIZE,
    loader_magic = const BOOTLOADER_MAGIC,
    exit_port = const metta_kernel::exit::DEBUG_EXIT_PORT,
    boot_failure = const ExitCode::BootFailure as u32,
    boot_tsc = sym crate::tsc::BOOT_TSC,
    kmain = sym crate::kmain,
    options(att_syntax)
);
