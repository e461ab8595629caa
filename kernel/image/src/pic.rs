//! The two legacy 8259 PICs: remapped away from the exception vectors and masked.
//!
//! The kernel takes its timer interrupt from the local APIC and uses no legacy
//! IRQ. The PICs still exist (and the firmware may have left them at vectors
//! 0x08-0x0F, the CPU's exception vectors), and even a masked PIC can raise a
//! spurious IRQ 7 or 15 when an interrupt request vanishes before it is
//! acknowledged. So [`init`] moves them to [`BASE`]..[`BASE`]+16 and masks every
//! line, and [`handle`] tells spurious IRQs (no EOI) from real ones.

use crate::port::{inb, outb};

/// First vector of the master PIC (IRQ 0); the slave follows at `BASE + 8`.
pub const BASE: u8 = 0x20;
/// Number of legacy IRQ lines.
pub const LINES: u8 = 16;

const MASTER_CMD: u16 = 0x20;
const MASTER_DATA: u16 = 0x21;
const SLAVE_CMD: u16 = 0xA0;
const SLAVE_DATA: u16 = 0xA1;
/// OCW2: non-specific end of interrupt.
const EOI: u8 = 0x20;
/// OCW3: the next command-port read returns the in-service register.
const READ_ISR: u8 = 0x0B;

/// Remap both PICs to [`BASE`] and mask all 16 lines.
pub fn init() {
    // SAFETY: ports 0x20/0x21/0xA0/0xA1 are the 8259s, owned by this module; this
    // is the standard initialisation sequence (ICW1-ICW4), then OCW1 masks all.
    unsafe {
        outb(MASTER_CMD, 0x11); // ICW1: initialise, edge-triggered, ICW4 follows
        outb(SLAVE_CMD, 0x11);
        outb(MASTER_DATA, BASE); // ICW2: vector base
        outb(SLAVE_DATA, BASE + 8);
        outb(MASTER_DATA, 1 << 2); // ICW3: slave on IRQ 2
        outb(SLAVE_DATA, 2); // ICW3: slave identity
        outb(MASTER_DATA, 0x01); // ICW4: 8086 mode
        outb(SLAVE_DATA, 0x01);
        outb(MASTER_DATA, 0xFF); // OCW1: mask everything
        outb(SLAVE_DATA, 0xFF);
    }
}

/// What a legacy IRQ turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Irq {
    /// Spurious (IRQ 7 or 15 with its in-service bit clear): nothing to do.
    Spurious,
    /// A real IRQ on a line that should be masked; it has been acknowledged.
    Unexpected,
}

fn in_service(cmd: u16) -> u8 {
    // SAFETY: OCW3 then a read of the command port returns the ISR, no side
    // effects beyond selecting that register.
    unsafe {
        outb(cmd, READ_ISR);
        inb(cmd)
    }
}

/// Handle legacy IRQ `irq` (0-15): recognise spurious IRQs, else send the EOIs.
pub fn handle(irq: u8) -> Irq {
    if irq == 7 && in_service(MASTER_CMD) & 0x80 == 0 {
        return Irq::Spurious;
    }
    if irq == 15 && in_service(SLAVE_CMD) & 0x80 == 0 {
        // The master saw a real request on IRQ 2 (the cascade): acknowledge that.
        // SAFETY: EOI to the master PIC.
        unsafe { outb(MASTER_CMD, EOI) };
        return Irq::Spurious;
    }
    // SAFETY: EOI to the PIC(s) that delivered the IRQ.
    unsafe {
        if irq >= 8 {
            outb(SLAVE_CMD, EOI);
        }
        outb(MASTER_CMD, EOI);
    }
    Irq::Unexpected
}
