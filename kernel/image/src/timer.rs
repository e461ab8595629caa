//! The periodic timer tick, and waiting on it: the API the rest of the kernel
//! (and later the nucleus's EDF scheduler) uses for time.
//!
//! - [`init`] enables the local APIC, calibrates its timer against the TSC and
//!   starts it at [`TICK_HZ`] on [`TIMER_VECTOR`] (the caller then enables
//!   interrupts);
//! - [`ticks`] counts the timer interrupts handled;
//! - [`now_ns`] is the time since boot, from the TSC (not from the tick count:
//!   under emulation, ticks that arrive while an earlier one is still pending
//!   merge into one, so the count can fall behind real time);
//! - [`idle_until`] halts the CPU (`hlt`) between interrupts until a condition
//!   holds, and [`sleep_until`] until a time;
//! - [`set_deadline`] arms a one-shot deadline that the tick handler checks:
//!   [`deadline_expired`] then reports it (once) and the halted CPU wakes.
//!
//! # Resolution
//!
//! Everything here is driven by the periodic tick: a deadline or a sleep ends
//! at the first tick at or after it, so up to one tick period ([`RESOLUTION_NS`],
//! 1 ms at 1 kHz) late. A scheduler that needs finer deadlines can later program
//! the APIC timer one-shot (or TSC-deadline) mode per deadline instead; the API
//! stays the same.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use metta_kernel::time::periodic_count;

use crate::apic::{self, ApicError, Mode};
use crate::interrupts::{SPURIOUS_VECTOR, TIMER_VECTOR};
use crate::{cpu, tsc};

/// Timer interrupts per second.
pub const TICK_HZ: u64 = 1_000;
/// How late a deadline or a sleep may end: one tick period.
pub const RESOLUTION_NS: u64 = 1_000_000_000 / TICK_HZ;

/// Timer interrupts handled.
static TICKS: AtomicU64 = AtomicU64::new(0);
/// Whether the tick runs (else [`idle_until`] must not halt: nothing would wake it).
static RUNNING: AtomicBool = AtomicBool::new(false);
/// The armed deadline in nanoseconds since boot; [`NO_DEADLINE`] if none.
static DEADLINE_NS: AtomicU64 = AtomicU64::new(NO_DEADLINE);
const NO_DEADLINE: u64 = u64::MAX;
/// Set by the tick that found the deadline passed; cleared by [`deadline_expired`].
static DEADLINE_FIRED: AtomicBool = AtomicBool::new(false);

/// How the timer was set up, for the boot log.
#[derive(Clone, Copy, Debug)]
pub struct TimerInfo {
    /// How the local APIC is driven.
    pub mode: Mode,
    /// The APIC timer's count rate (bus clock / 16), measured against the TSC.
    pub apic_hz: u64,
    /// The initial count programmed for one tick.
    pub count: u32,
}

/// Enable the local APIC and start the periodic tick (interrupts stay as they
/// are: the caller enables them). `tsc_hz` is the calibrated TSC frequency.
pub fn init(tsc_hz: u64) -> Result<TimerInfo, ApicError> {
    let mode = apic::init(SPURIOUS_VECTOR)?;
    let apic_hz = apic::calibrate_timer(tsc_hz)?;
    let count = periodic_count(apic_hz, TICK_HZ);
    apic::start_periodic(TIMER_VECTOR, count);
    RUNNING.store(true, Ordering::Relaxed);
    Ok(TimerInfo {
        mode,
        apic_hz,
        count,
    })
}

/// Timer interrupts handled since [`init`].
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// Nanoseconds since kernel entry (TSC).
pub fn now_ns() -> u64 {
    tsc::nanos_since_boot()
}

/// The timer interrupt: count the tick, fire the deadline if it has passed.
/// Runs in interrupt context (interrupts off; must not log).
pub fn on_tick() {
    TICKS.fetch_add(1, Ordering::Relaxed);
    let deadline = DEADLINE_NS.load(Ordering::Relaxed);
    if deadline != NO_DEADLINE && now_ns() >= deadline && disarm(deadline) {
        DEADLINE_FIRED.store(true, Ordering::Release);
    }
}

/// Disarm `deadline` if it is still the armed one (not re-armed meanwhile).
fn disarm(deadline: u64) -> bool {
    DEADLINE_NS
        .compare_exchange(deadline, NO_DEADLINE, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
}

/// Arm the one-shot deadline at `deadline_ns` (nanoseconds since boot),
/// replacing any armed one. It fires at the first tick at or after that time.
pub fn set_deadline(deadline_ns: u64) {
    DEADLINE_FIRED.store(false, Ordering::Relaxed);
    DEADLINE_NS.store(deadline_ns.min(NO_DEADLINE - 1), Ordering::Release);
}

/// Disarm the deadline, if any.
pub fn cancel_deadline() {
    DEADLINE_NS.store(NO_DEADLINE, Ordering::Relaxed);
    DEADLINE_FIRED.store(false, Ordering::Relaxed);
}

/// Whether the armed deadline has fired since the last call (true once per
/// deadline).
pub fn deadline_expired() -> bool {
    DEADLINE_FIRED.swap(false, Ordering::Acquire)
}

/// Halt the CPU until `done` returns true, re-checking after every interrupt.
/// `done` runs with interrupts disabled, so no wake-up is lost between the check
/// and the `hlt`. Call with interrupts enabled; if the tick does not run, this
/// spins instead of halting.
pub fn idle_until(mut done: impl FnMut() -> bool) {
    assert!(
        cpu::interrupts_enabled(),
        "idle_until with interrupts disabled would never wake"
    );
    loop {
        cpu::disable_interrupts();
        if done() {
            cpu::enable_interrupts();
            return;
        }
        if RUNNING.load(Ordering::Relaxed) {
            cpu::enable_interrupts_and_halt();
        } else {
            cpu::enable_interrupts();
            core::hint::spin_loop();
        }
    }
}

/// Halt until `deadline_ns` (nanoseconds since boot) has passed; ends at the
/// first interrupt after it (the next tick at the latest).
pub fn sleep_until(deadline_ns: u64) {
    idle_until(|| now_ns() >= deadline_ns);
}
