//! The wall clock: the CMOS real-time clock, read through ports 0x70/0x71.
//!
//! The RTC updates its registers once a second; status register A's bit 7
//! (update in progress) is set from ~244 µs before an update until it is done.
//! [`read`] waits for that flag to clear before reading all the registers, and
//! reads until two reads in a row agree, so it never returns a half-updated time
//! (say 09:59:59 read as 10:59:59). Decoding (BCD or binary, 12- or 24-hour,
//! century) and the conversion to Unix time are in [`metta_kernel::rtc`].

use metta_kernel::rtc::{DateTime, RtcError, RtcRegisters};

use crate::port::{inb, outb};

const INDEX: u16 = 0x70;
const DATA: u16 = 0x71;
const REG_STATUS_A: u8 = 0x0A;
const REG_STATUS_B: u8 = 0x0B;
/// The ACPI century register, where PC firmware and QEMU keep it.
const REG_CENTURY: u8 = 0x32;
/// Status A bit 7: update in progress.
const UPDATE_IN_PROGRESS: u8 = 0x80;
/// Reads of status A before giving up on the flag clearing (an update takes
/// ~2 ms at most; each read takes at least ~1 µs).
const UIP_POLLS: u32 = 1_000_000;
/// Pairs of reads before giving up on two agreeing.
const READ_ATTEMPTS: u32 = 10;

fn register(index: u8) -> u8 {
    // SAFETY: ports 0x70/0x71 are the CMOS index and data ports, used only here;
    // bit 7 of the index stays clear (NMIs stay enabled), and reading the clock
    // and status registers has no side effects.
    unsafe {
        outb(INDEX, index);
        inb(DATA)
    }
}

fn wait_for_update() -> Result<(), RtcError> {
    for _ in 0..UIP_POLLS {
        if register(REG_STATUS_A) & UPDATE_IN_PROGRESS == 0 {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err(RtcError::UpdateStuck)
}

fn read_registers() -> Result<RtcRegisters, RtcError> {
    wait_for_update()?;
    Ok(RtcRegisters {
        seconds: register(0x00),
        minutes: register(0x02),
        hours: register(0x04),
        day: register(0x07),
        month: register(0x08),
        year: register(0x09),
        century: register(REG_CENTURY),
        status_b: register(REG_STATUS_B),
    })
}

/// The current date and time (UTC) from the RTC.
pub fn read() -> Result<DateTime, RtcError> {
    let mut last = read_registers()?;
    for _ in 0..READ_ATTEMPTS {
        let now = read_registers()?;
        if now == last {
            return now.decode();
        }
        last = now;
    }
    Err(RtcError::Unstable)
}
