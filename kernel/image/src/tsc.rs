//! The time-stamp counter as the log clock, calibrated against the PIT.
//!
//! # Calibration method
//!
//! PIT channel 2 (the one wired to the PC speaker: its gate and output are in port
//! 0x61, so it needs no interrupts and no IDT) counts down from 0xFFFF at
//! 1.193182 MHz in mode 0. The kernel takes two samples about 10 ms (11932 PIT
//! counts) apart; a sample is the PIT count (latched with a counter-latch command)
//! paired with the midpoint of the TSC read just before and just after reading it.
//! Then `hz = tsc_ticks * 1193182 / pit_counts`.
//!
//! Pairing each count with a TSC bracket, rather than waiting for OUT2 to rise,
//! makes the result immune to the vCPU being descheduled between the two samples
//! (under TCG on a busy 2-core machine that happens, and the simple "wait for
//! OUT2" loop then read 10-40 % high in about one boot in ten). Each sample is the
//! tightest of [`SAMPLE_TRIES`] brackets, so a stall inside a sample is discarded
//! too. If the counter wrapped (OUT2 is high at the end: a stall longer than
//! 55 ms) the measurement is repeated.
//!
//! Under QEMU TCG the guest TSC follows the host's TSC and the PIT follows QEMU's
//! virtual clock (real time without `-icount`), so the result is the host TSC
//! frequency and timestamps are monotonic. If the PIT does not count (no PIT), the
//! frequency is assumed to be [`FALLBACK_HZ`] and the log says so.

use core::sync::atomic::{AtomicU64, Ordering};

use metta_kernel::time::{self, ticks_to_micros, ticks_to_nanos};

use crate::port::{inb, outb};

/// The TSC at kernel entry, written by the entry stub in `boot.rs`.
pub static BOOT_TSC: AtomicU64 = AtomicU64::new(0);

/// Calibrated TSC frequency; 0 until [`calibrate`] ran (timestamps read 0).
static TSC_HZ: AtomicU64 = AtomicU64::new(0);

/// PIT input clock.
const PIT_HZ: u64 = 1_193_182;
/// About 10 ms of PIT clock.
const PIT_COUNTS: u16 = 11_932;
/// Brackets tried per sample; the tightest wins.
const SAMPLE_TRIES: usize = 5;
/// Whole measurements tried before giving up.
const ATTEMPTS: usize = 3;
/// Give up on a measurement after this many TSC ticks (0.1 s even at 5 GHz).
const GIVE_UP_TICKS: u64 = 500_000_000;
/// The frequency assumed when the PIT does not answer.
pub const FALLBACK_HZ: u64 = 1_000_000_000;

/// Read the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC exists on every x86-64 CPU and only reads the counter
    // (CR4.TSD is clear, so it is allowed at any privilege level).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Microseconds since kernel entry.
pub fn micros_since_boot() -> u64 {
    let ticks = rdtsc().wrapping_sub(BOOT_TSC.load(Ordering::Relaxed));
    ticks_to_micros(ticks, TSC_HZ.load(Ordering::Relaxed))
}

/// Nanoseconds since kernel entry.
pub fn nanos_since_boot() -> u64 {
    let ticks = rdtsc().wrapping_sub(BOOT_TSC.load(Ordering::Relaxed));
    ticks_to_nanos(ticks, TSC_HZ.load(Ordering::Relaxed))
}

/// Nanoseconds for `ticks` TSC ticks.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    ticks_to_nanos(ticks, TSC_HZ.load(Ordering::Relaxed))
}

/// How the TSC frequency was obtained.
#[derive(Clone, Copy, Debug)]
pub struct Calibration {
    /// TSC ticks per second.
    pub hz: u64,
    /// True if measured against the PIT, false if [`FALLBACK_HZ`] was assumed.
    pub measured: bool,
}

/// A PIT count and the TSC at the moment it was read.
#[derive(Clone, Copy)]
struct Sample {
    tsc: u64,
    count: u16,
    /// Width of the TSC bracket around the read.
    width: u64,
}

/// Latch and read PIT channel 2's count, bracketed by two TSC reads.
fn read_once() -> Sample {
    let before = rdtsc();
    // SAFETY: counter-latch command for channel 2, then its two count bytes
    // (the channel was programmed lobyte/hibyte by `measure`).
    let count = unsafe {
        outb(0x43, 0b1000_0000);
        let lo = inb(0x42);
        let hi = inb(0x42);
        u16::from_le_bytes([lo, hi])
    };
    let after = rdtsc();
    let width = after.wrapping_sub(before);
    Sample {
        tsc: before.wrapping_add(width / 2),
        count,
        width,
    }
}

/// The tightest of [`SAMPLE_TRIES`] reads.
fn sample() -> Sample {
    let mut best = read_once();
    for _ in 1..SAMPLE_TRIES {
        let s = read_once();
        if s.width < best.width {
            best = s;
        }
    }
    best
}

/// One measurement: `(tsc ticks, pit counts)`, or `None` if the PIT does not
/// count or wrapped.
fn measure() -> Option<(u64, u64)> {
    // SAFETY: ports 0x42/0x43 (PIT channel 2 and the PIT mode register) and 0x61
    // (speaker gate / OUT2 status) are only used here; the speaker stays off.
    let saved61 = unsafe {
        let saved = inb(0x61);
        outb(0x61, (saved & !0x02) | 0x01); // speaker data off, channel 2 gate on
        outb(0x43, 0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
        outb(0x42, 0xFF);
        outb(0x42, 0xFF);
        saved
    };
    let start = sample();
    let mut result = None;
    loop {
        let now = read_once();
        if start.count.wrapping_sub(now.count) >= PIT_COUNTS {
            let end = sample();
            // SAFETY: reading port 0x61 has no side effects.
            let wrapped = unsafe { inb(0x61) } & 0x20 != 0;
            let counts = start.count.wrapping_sub(end.count);
            if !wrapped && counts > 0 {
                result = Some((end.tsc.wrapping_sub(start.tsc), u64::from(counts)));
            }
            break;
        }
        if now.tsc.wrapping_sub(start.tsc) >= GIVE_UP_TICKS {
            break;
        }
    }
    // SAFETY: restores the gate/speaker bits read above.
    unsafe { outb(0x61, saved61) };
    result
}

/// Measure the TSC frequency over ~10 ms of PIT channel 2 and start using it for
/// timestamps.
pub fn calibrate() -> Calibration {
    let measured = (0..ATTEMPTS).find_map(|_| measure());
    let cal = match measured {
        Some((ticks, counts)) => Calibration {
            hz: time::tsc_hz(ticks, counts, PIT_HZ),
            measured: true,
        },
        None => Calibration {
            hz: FALLBACK_HZ,
            measured: false,
        },
    };
    TSC_HZ.store(cal.hz, Ordering::Relaxed);
    cal
}
