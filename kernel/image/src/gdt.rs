//! The kernel's GDT and its 64-bit TSS, whose interrupt stack table gives the
//! exceptions that can strike on a broken stack (#DF, NMI, #MC) stacks of their
//! own.
//!
//! The entry stub's GDT (`boot.rs`) has no TSS; this one repeats its code (0x08)
//! and data (0x10) descriptors at the same selectors, so loading it needs no
//! segment reload, and adds the TSS descriptor at 0x18. The tables are arrays of
//! atomics: the CPU reads them as plain memory (an `AtomicU64` has the layout of
//! a `u64`), and Rust writes them once, in [`init`], without `static mut`.

use core::arch::asm;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Kernel code segment selector (as in the entry stub's GDT).
pub const KERNEL_CODE: u16 = 0x08;
/// TSS selector.
const TSS_SELECTOR: u16 = 0x18;

/// Interrupt-stack-table slots (1-based, as the IDT gate's IST field counts).
pub const IST_DOUBLE_FAULT: u8 = 1;
/// IST slot of the NMI handler.
pub const IST_NMI: u8 = 2;
/// IST slot of the machine-check handler.
pub const IST_MACHINE_CHECK: u8 = 3;
/// Size of each IST stack.
const IST_STACK_SIZE: usize = 16 * 1024;
/// Number of IST stacks.
const IST_STACKS: usize = 3;

/// Bytes of the IST stacks (in `.bss`).
pub fn ist_bytes() -> usize {
    core::mem::size_of::<IstStacks>()
}

/// The GDT: null, code, data, and the 16-byte TSS descriptor.
#[repr(C, align(16))]
struct Gdt([AtomicU64; 5]);

static GDT: Gdt = Gdt([
    AtomicU64::new(0),
    AtomicU64::new(0x00AF_9B00_0000_FFFF), // 0x08: code, DPL 0, L=1 (64-bit)
    AtomicU64::new(0x00CF_9300_0000_FFFF), // 0x10: data, writable
    AtomicU64::new(0),                     // 0x18: TSS (low), set by `init`
    AtomicU64::new(0),                     // TSS (high)
]);

/// Size of the 64-bit TSS.
const TSS_SIZE: usize = 104;
/// Offset of IST1 in the TSS (IST2.. follow every 8 bytes).
const TSS_IST1: usize = 36;
/// Offset of the I/O permission bitmap base (a u16).
const TSS_IOPB: usize = 102;

/// The 64-bit TSS, as 32-bit words: its 64-bit fields sit at offsets that are
/// only 4-byte aligned (RSP0 at 4, IST1 at 36).
#[repr(C, align(16))]
struct Tss([AtomicU32; TSS_SIZE / 4]);

static TSS: Tss = Tss([const { AtomicU32::new(0) }; TSS_SIZE / 4]);

impl Tss {
    fn set_u64(&self, offset: usize, value: u64) {
        self.0[offset / 4].store(value as u32, Ordering::Relaxed);
        self.0[offset / 4 + 1].store((value >> 32) as u32, Ordering::Relaxed);
    }
}

#[repr(C, align(16))]
struct IstStacks([[u8; IST_STACK_SIZE]; IST_STACKS]);

/// The IST stacks; only the CPU touches them (through the TSS), so Rust never
/// creates a reference, only their addresses.
static mut IST: IstStacks = IstStacks([[0; IST_STACK_SIZE]; IST_STACKS]);

/// The top (initial RSP) of IST slot `slot`, and the whole range of its stack.
pub fn ist_stack(slot: u8) -> core::ops::Range<u64> {
    let base = (&raw const IST) as u64 + (u64::from(slot) - 1) * IST_STACK_SIZE as u64;
    base..base + IST_STACK_SIZE as u64
}

/// Operand of LGDT/LIDT.
#[repr(C, packed)]
pub struct TablePointer {
    /// Size of the table minus one.
    pub limit: u16,
    /// Linear address of the table.
    pub base: u64,
}

/// Fill in the TSS (IST stacks, no I/O bitmap), point the GDT's TSS descriptor
/// at it, load the GDT and the task register. Runs once, early in `kmain`.
pub fn init() {
    for slot in 1..=IST_STACKS as u8 {
        // Stacks grow down; the tops are 16-byte aligned.
        TSS.set_u64(TSS_IST1 + (usize::from(slot) - 1) * 8, ist_stack(slot).end);
    }
    // No I/O permission bitmap: its base lies at the end of the TSS.
    TSS.0[TSS_IOPB / 4].store((TSS_SIZE as u32) << 16, Ordering::Relaxed);

    let base = (&raw const TSS) as u64;
    let limit = (TSS_SIZE - 1) as u64;
    let low = (limit & 0xFFFF)
        | (base & 0xFF_FFFF) << 16
        | 0x89 << 40 // present, DPL 0, type 9: available 64-bit TSS
        | (limit >> 16 & 0xF) << 48
        | (base >> 24 & 0xFF) << 56;
    GDT.0[3].store(low, Ordering::Relaxed);
    GDT.0[4].store(base >> 32, Ordering::Relaxed);

    let pointer = TablePointer {
        limit: (core::mem::size_of::<Gdt>() - 1) as u16,
        base: (&raw const GDT) as u64,
    };
    // SAFETY: the GDT is a static (it lives forever) with the same code and data
    // descriptors at the same selectors as the entry stub's, so the loaded
    // segment registers stay valid; the TSS descriptor points at the static TSS,
    // filled in above. LTR marks that descriptor busy, as it must be.
    unsafe {
        asm!(
            "lgdt [{ptr}]",
            "ltr {sel:x}",
            ptr = in(reg) &raw const pointer,
            sel = in(reg) TSS_SELECTOR,
            options(nostack, preserves_flags)
        );
    }
}
