//! The IDT, the interrupt entry stubs, and the dispatcher they call.
//!
//! # Entry path
//!
//! The `x86-interrupt` calling convention is unstable, so every vector enters
//! through assembly (`global_asm!` below): 256 stubs, 16 bytes apart starting
//! at `metta_isr_stubs`, each of which pushes a 0 in place of the error code if
//! the CPU pushes none for that vector (so every frame has one layout), pushes
//! the vector number, and jumps to a common stub. That one saves the 15 general
//! registers, clears the direction flag, and calls [`metta_interrupt_dispatch`]
//! with a pointer to the saved [`InterruptFrame`] (its layout, shared with the
//! stub, is defined and tested in [`metta_kernel::exception`]); on return it
//! restores the registers, drops vector and error code, and `iretq`s. The kernel
//! runs without SSE (the `x86_64-unknown-none` target is soft-float), so there
//! is no FPU/SSE state to save.
//!
//! All gates are interrupt gates (IF cleared on entry: handlers do not nest),
//! DPL 0, in the kernel code segment. #DF, NMI and #MC run on their own IST
//! stacks ([`crate::gdt`]), so a kernel stack overflow is reported instead of
//! triple-faulting.
//!
//! # Vectors
//!
//! | vectors | what | handling |
//! |---|---|---|
//! | 0-31 | CPU exceptions | report on serial, exit QEMU with the panic code |
//! | 0x20-0x2f | 8259 PICs (remapped, all masked) | spurious IRQ 7/15 counted; any other is unexpected |
//! | [`TIMER_VECTOR`] | local APIC timer | [`crate::timer`] tick, EOI |
//! | [`SPURIOUS_VECTOR`] | local APIC spurious | counted, no EOI |
//! | anything else | unexpected | report, exit with the panic code |
//!
//! Handlers other than the fatal ones must not log: the interrupted code may hold
//! the console lock. Reports go out with [`serial::print_unlocked`].

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use metta_kernel::exception::{
    pushes_error_code, InterruptFrame, Report, DOUBLE_FAULT, EXCEPTION_VECTORS, FRAME_SIZE,
    PAGE_FAULT,
};
use metta_kernel::exit::ExitCode;

use crate::gdt::{self, TablePointer, IST_DOUBLE_FAULT, IST_MACHINE_CHECK, IST_NMI, KERNEL_CODE};
use crate::{cpu, pic, serial, timer};

/// The local APIC timer's vector.
pub const TIMER_VECTOR: u8 = 0x30;
/// The local APIC's spurious-interrupt vector (low nibble all ones, as old
/// APICs require).
pub const SPURIOUS_VECTOR: u8 = 0xFF;
/// Distance between the entry stubs.
const STUB_SIZE: u64 = 16;

/// Spurious interrupts seen (APIC spurious vector, spurious PIC IRQ 7/15).
static SPURIOUS: AtomicU64 = AtomicU64::new(0);

/// The IDT: 256 gates of 16 bytes, as pairs of words (see `gdt.rs` for why
/// atomics).
#[repr(C, align(16))]
struct Idt([AtomicU64; 512]);

static IDT: Idt = Idt([const { AtomicU64::new(0) }; 512]);

/// Bit `v` set: the CPU pushes an error code for exception `v` (the stubs push a
/// 0 for the others), from [`pushes_error_code`].
const ERROR_CODE_VECTORS: u32 = {
    let mut mask = 0;
    let mut v = 0;
    while v < EXCEPTION_VECTORS {
        if pushes_error_code(v) {
            mask |= 1 << v;
        }
        v += 1;
    }
    mask
};

// The entry stubs. `.rept` emits one per vector, each aligned to 16 bytes
// (`push $0` is 2 bytes, `push $imm32` 5, `jmp rel32` 5: at most 12).
global_asm!(
    r#"
    .section .text.isr, "ax"
    .balign 16
    .global metta_isr_stubs
metta_isr_stubs:
    .set metta_vec, 0
    .rept 256
    .balign 16
    .if metta_vec < 32
    .if (({error_code_vectors} >> metta_vec) & 1) == 0
    pushq $0                        /* no error code from the CPU: push one */
    .endif
    .else
    pushq $0                        /* interrupts have no error code */
    .endif
    pushq $metta_vec
    jmp metta_isr_common
    .set metta_vec, metta_vec + 1
    .endr

metta_isr_common:
    push %rax
    push %rcx
    push %rdx
    push %rbx
    push %rbp
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    cld                             /* the SysV ABI wants DF clear */
    mov %rsp, %rdi                  /* arg: the InterruptFrame */
    mov %rsp, %rbx                  /* callee-saved: the frame, across the call */
    and $-16, %rsp                  /* (already aligned: the CPU aligns, 22 words) */
    call {dispatch}
    mov %rbx, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rbp
    pop %rbx
    pop %rdx
    pop %rcx
    pop %rax
    add $16, %rsp                   /* vector and error code */
    iretq
"#,
    error_code_vectors = const ERROR_CODE_VECTORS,
    dispatch = sym metta_interrupt_dispatch,
    options(att_syntax)
);

extern "C" {
    /// The first entry stub (linked from the assembly above).
    static metta_isr_stubs: u8;
}

// The stub pushes exactly this much on top of the CPU's frame.
const _: () = assert!(FRAME_SIZE == 22 * 8);

/// Build the IST-equipped GDT/TSS, remap and mask the 8259 PICs, fill and load
/// the IDT. Interrupts stay disabled; exceptions are reported from here on.
pub fn init() {
    gdt::init();
    pic::init();
    let stubs = (&raw const metta_isr_stubs) as u64;
    for vector in 0..=255u8 {
        let ist = match vector {
            DOUBLE_FAULT => IST_DOUBLE_FAULT,
            2 => IST_NMI,
            18 => IST_MACHINE_CHECK,
            _ => 0,
        };
        let handler = stubs + u64::from(vector) * STUB_SIZE;
        let low = (handler & 0xFFFF)
            | u64::from(KERNEL_CODE) << 16
            | u64::from(ist) << 32
            | 0x8E << 40 // present, DPL 0, type 0xE: 64-bit interrupt gate
            | (handler >> 16 & 0xFFFF) << 48;
        let i = usize::from(vector) * 2;
        IDT.0[i].store(low, Ordering::Relaxed);
        IDT.0[i + 1].store(handler >> 32, Ordering::Relaxed);
    }
    let pointer = TablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: (&raw const IDT) as u64,
    };
    // SAFETY: the IDT is a static whose 256 gates all point at the entry stubs
    // above, in the kernel code segment, with valid IST slots (set up by
    // `gdt::init`).
    unsafe {
        asm!("lidt [{}]", in(reg) &raw const pointer, options(readonly, nostack, preserves_flags))
    };
}

/// Spurious interrupts seen so far.
pub fn spurious_count() -> u64 {
    SPURIOUS.load(Ordering::Relaxed)
}

/// Called by the common entry stub with the saved frame, with interrupts
/// disabled, on the interrupted stack (or an IST stack).
extern "C" fn metta_interrupt_dispatch(frame: *mut InterruptFrame) {
    // SAFETY: the stub passes the frame it just built on the stack, laid out as
    // `InterruptFrame` (pinned by its unit tests and FRAME_SIZE above); nothing
    // else refers to it while the dispatcher runs.
    let frame = unsafe { &*frame };
    let vector = frame.vector as u8;
    match vector {
        v if v < EXCEPTION_VECTORS => fatal(frame),
        TIMER_VECTOR => {
            timer::on_tick();
            crate::apic::eoi();
        }
        SPURIOUS_VECTOR => {
            SPURIOUS.fetch_add(1, Ordering::Relaxed);
        }
        v if (pic::BASE..pic::BASE + pic::LINES).contains(&v) => {
            match pic::handle(v - pic::BASE) {
                pic::Irq::Spurious => SPURIOUS.fetch_add(1, Ordering::Relaxed),
                pic::Irq::Unexpected => fatal(frame),
            };
        }
        _ => fatal(frame),
    }
}

/// Set by the first fatal report, so a fault while reporting exits at once.
static REPORTING: AtomicBool = AtomicBool::new(false);

/// Report an exception or unexpected interrupt and exit with the panic code.
fn fatal(frame: &InterruptFrame) -> ! {
    if REPORTING.swap(true, Ordering::Relaxed) {
        crate::exit_qemu(ExitCode::Panic);
    }
    let vector = frame.vector as u8;
    let cr2 = (vector == PAGE_FAULT).then(cpu::cr2);
    serial::print_unlocked(format_args!("{}", Report { frame, cr2 }));
    let rsp: u64;
    // SAFETY: copies RSP into a register.
    unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags)) };
    for (slot, name) in [
        (IST_DOUBLE_FAULT, "double-fault"),
        (IST_NMI, "NMI"),
        (IST_MACHINE_CHECK, "machine-check"),
    ] {
        if gdt::ist_stack(slot).contains(&rsp) {
            serial::print_unlocked(format_args!("  handled on the IST{slot} ({name}) stack"));
        }
    }
    crate::exit_qemu(ExitCode::Panic)
}
