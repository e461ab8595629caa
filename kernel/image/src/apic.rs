//! The local APIC: enabled with its spurious-interrupt vector, and its timer
//! calibrated against the TSC and run as a periodic tick.
//!
//! Registers are reached through the MMIO page at the base in `IA32_APIC_BASE`
//! (xAPIC mode: 0xFEE00000 on PCs and QEMU, inside the entry stub's identity map
//! of the first 4 GiB), or through MSRs 0x800+ if the firmware left the APIC in
//! x2APIC mode. Calibration: the timer counts down from `u32::MAX` (divide by
//! 16, masked, one-shot) while the TSC runs ~[`CALIBRATION_NS`]; each end is
//! the tightest of [`SAMPLE_TRIES`] TSC brackets around a read of the current
//! count, as in `tsc.rs`, so a vCPU stall during a read is discarded.

use core::sync::atomic::{AtomicU64, Ordering};

use metta_kernel::time::{frequency, nanos_to_ticks};

use crate::cpu::{cpuid, rdmsr, wrmsr};
use crate::tsc::rdtsc;
use crate::MMIO_LIMIT;

const IA32_APIC_BASE: u32 = 0x1B;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// x2APIC register `r` (xAPIC offset) is MSR `0x800 + r / 16`.
const X2APIC_MSR: u32 = 0x800;

const REG_TPR: u32 = 0x80;
const REG_EOI: u32 = 0xB0;
const REG_SVR: u32 = 0xF0;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3E0;

/// SVR bit 8: the APIC is software-enabled.
const SVR_ENABLE: u32 = 1 << 8;
/// LVT bit 16: masked.
const LVT_MASKED: u32 = 1 << 16;
/// LVT timer bit 17: periodic (else one-shot).
const LVT_PERIODIC: u32 = 1 << 17;
/// Divide configuration 0b0011: the timer counts at the bus clock / 16.
const DIVIDE_BY_16: u32 = 0b0011;

/// How long the timer calibration measures.
pub const CALIBRATION_NS: u64 = 2_000_000;
/// TSC brackets per sample; the tightest wins.
const SAMPLE_TRIES: usize = 5;

/// How the registers are reached: 0 = APIC not set up yet, 1 = x2APIC (MSRs),
/// otherwise the xAPIC MMIO base address.
static ACCESS: AtomicU64 = AtomicU64::new(0);
const ACCESS_NONE: u64 = 0;
const ACCESS_X2APIC: u64 = 1;

/// How the local APIC is driven.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// xAPIC: registers in the MMIO page at this physical address.
    Xapic(u64),
    /// x2APIC: registers are MSRs.
    X2apic,
}

impl core::fmt::Display for Mode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Mode::Xapic(base) => write!(f, "xAPIC at {base:#x}"),
            Mode::X2apic => f.write_str("x2APIC"),
        }
    }
}

/// Why the local APIC cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicError {
    /// CPUID says there is no local APIC.
    Missing,
    /// The xAPIC register page lies outside the identity map.
    Unmapped(u64),
    /// The timer's count did not go down during calibration.
    TimerStopped,
}

impl core::fmt::Display for ApicError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ApicError::Missing => f.write_str("CPUID reports no local APIC"),
            ApicError::Unmapped(base) => {
                write!(
                    f,
                    "local APIC registers at {base:#x} lie outside the identity map"
                )
            }
            ApicError::TimerStopped => f.write_str("the local APIC timer does not count"),
        }
    }
}

fn read(reg: u32) -> u32 {
    match ACCESS.load(Ordering::Relaxed) {
        ACCESS_NONE => 0,
        // SAFETY: x2APIC mode is on (checked in `init`), so the x2APIC MSRs exist;
        // reading these registers has no side effects.
        ACCESS_X2APIC => unsafe { rdmsr(X2APIC_MSR + reg / 16) as u32 },
        // SAFETY: `base` is the xAPIC register page, identity-mapped (checked in
        // `init`); `reg` is a register offset inside it, 16-byte aligned.
        base => unsafe { core::ptr::read_volatile((base + u64::from(reg)) as *const u32) },
    }
}

fn write(reg: u32, value: u32) {
    match ACCESS.load(Ordering::Relaxed) {
        ACCESS_NONE => {}
        // SAFETY: as in `read`; the values written are valid for each register
        // (callers in this module only).
        ACCESS_X2APIC => unsafe { wrmsr(X2APIC_MSR + reg / 16, u64::from(value)) },
        // SAFETY: as in `read`.
        base => unsafe { core::ptr::write_volatile((base + u64::from(reg)) as *mut u32, value) },
    }
}

/// Enable the local APIC (globally, and in its SVR with `spurious_vector`) and
/// let it deliver every priority (TPR 0). The timer stays masked.
pub fn init(spurious_vector: u8) -> Result<Mode, ApicError> {
    if cpuid(1, 0).edx & (1 << 9) == 0 {
        return Err(ApicError::Missing);
    }
    // SAFETY: IA32_APIC_BASE exists on every CPU with a local APIC (checked
    // above); reading it has no side effects.
    let mut msr = unsafe { rdmsr(IA32_APIC_BASE) };
    let mode = if msr & APIC_BASE_X2APIC != 0 {
        Mode::X2apic
    } else {
        let base = msr & APIC_BASE_ADDR_MASK;
        if base == 0 || base + 4096 > MMIO_LIMIT {
            return Err(ApicError::Unmapped(base));
        }
        Mode::Xapic(base)
    };
    if msr & APIC_BASE_ENABLE == 0 {
        msr |= APIC_BASE_ENABLE;
        // SAFETY: sets only the global-enable bit, keeping base and mode.
        unsafe { wrmsr(IA32_APIC_BASE, msr) };
    }
    ACCESS.store(
        match mode {
            Mode::X2apic => ACCESS_X2APIC,
            Mode::Xapic(base) => base,
        },
        Ordering::Relaxed,
    );
    write(REG_LVT_TIMER, LVT_MASKED);
    write(REG_TPR, 0);
    write(REG_SVR, SVR_ENABLE | u32::from(spurious_vector));
    Ok(mode)
}

/// Signal the end of the interrupt being handled.
pub fn eoi() {
    write(REG_EOI, 0);
}

/// A timer count and the TSC at the moment it was read.
#[derive(Clone, Copy)]
struct Sample {
    tsc: u64,
    count: u32,
    width: u64,
}

fn sample() -> Sample {
    let mut best: Option<Sample> = None;
    for _ in 0..SAMPLE_TRIES {
        let before = rdtsc();
        let count = read(REG_TIMER_CURRENT);
        let width = rdtsc().wrapping_sub(before);
        if best.is_none_or(|b| width < b.width) {
            best = Some(Sample {
                tsc: before.wrapping_add(width / 2),
                count,
                width,
            });
        }
    }
    // SAMPLE_TRIES > 0.
    best.expect("at least one sample")
}

/// Measure the timer's count rate (after its divider) against the TSC, which
/// runs at `tsc_hz`. Leaves the timer stopped.
pub fn calibrate_timer(tsc_hz: u64) -> Result<u64, ApicError> {
    write(REG_LVT_TIMER, LVT_MASKED);
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write(REG_TIMER_INITIAL, u32::MAX);
    let start = sample();
    let wait = nanos_to_ticks(CALIBRATION_NS, tsc_hz);
    while rdtsc().wrapping_sub(start.tsc) < wait {
        core::hint::spin_loop();
    }
    let end = sample();
    write(REG_TIMER_INITIAL, 0);
    let counted = start.count.saturating_sub(end.count);
    if counted == 0 {
        return Err(ApicError::TimerStopped);
    }
    Ok(frequency(
        u64::from(counted),
        end.tsc.wrapping_sub(start.tsc),
        tsc_hz,
    ))
}

/// Start the timer in periodic mode: it raises `vector` every `count` counts
/// (at the rate [`calibrate_timer`] measured).
pub fn start_periodic(vector: u8, count: u32) {
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write(REG_LVT_TIMER, LVT_PERIODIC | u32::from(vector));
    write(REG_TIMER_INITIAL, count);
}
