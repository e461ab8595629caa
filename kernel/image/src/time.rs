//! Timestamps: TSC ticks to `seconds.microseconds` and nanoseconds, and the
//! arithmetic of calibrating one counter against another (the TSC against the
//! PIT, the local APIC timer against the TSC).

use core::fmt;

/// Microseconds corresponding to `ticks` TSC ticks at `hz` ticks per second.
/// Returns 0 if `hz` is 0 (not calibrated yet).
pub fn ticks_to_micros(ticks: u64, hz: u64) -> u64 {
    if hz == 0 {
        return 0;
    }
    let micros = u128::from(ticks) * 1_000_000 / u128::from(hz);
    u64::try_from(micros).unwrap_or(u64::MAX)
}

/// Nanoseconds corresponding to `ticks` ticks at `hz` ticks per second
/// (saturating). Returns 0 if `hz` is 0.
pub fn ticks_to_nanos(ticks: u64, hz: u64) -> u64 {
    if hz == 0 {
        return 0;
    }
    let nanos = u128::from(ticks) * 1_000_000_000 / u128::from(hz);
    u64::try_from(nanos).unwrap_or(u64::MAX)
}

/// Ticks at `hz` ticks per second in `nanos` nanoseconds, rounded down
/// (saturating).
pub fn nanos_to_ticks(nanos: u64, hz: u64) -> u64 {
    let ticks = u128::from(nanos) * u128::from(hz) / 1_000_000_000;
    u64::try_from(ticks).unwrap_or(u64::MAX)
}

/// The frequency of a counter measured over a reference interval: it advanced
/// `counts` while a reference clock of `ref_hz` advanced `ref_counts`.
/// Returns 0 if `ref_counts` is 0.
pub fn frequency(counts: u64, ref_counts: u64, ref_hz: u64) -> u64 {
    if ref_counts == 0 {
        return 0;
    }
    let hz = u128::from(counts) * u128::from(ref_hz) / u128::from(ref_counts);
    u64::try_from(hz).unwrap_or(u64::MAX)
}

/// The TSC frequency measured over a reference interval: `ticks` TSC ticks elapsed
/// while a reference clock of `ref_hz` counted `ref_counts`.
pub fn tsc_hz(ticks: u64, ref_counts: u64, ref_hz: u64) -> u64 {
    frequency(ticks, ref_counts, ref_hz)
}

/// The initial count that makes a periodic down-counter running at `timer_hz`
/// expire `tick_hz` times per second: rounded to the nearest count, at least 1,
/// at most `u32::MAX` (the local APIC timer's counter is 32 bits wide).
pub fn periodic_count(timer_hz: u64, tick_hz: u64) -> u32 {
    if tick_hz == 0 {
        return u32::MAX;
    }
    let count = (timer_hz + tick_hz / 2) / tick_hz;
    u32::try_from(count).unwrap_or(u32::MAX).max(1)
}

/// A log-line prefix: time since boot, printed as `[    1.000250]`
/// (seconds right-aligned in 5 columns, then 6 digits of microseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timestamp {
    /// Microseconds since boot.
    pub micros: u64,
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:>5}.{:06}]",
            self.micros / 1_000_000,
            self.micros % 1_000_000
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micros_from_ticks() {
        assert_eq!(ticks_to_micros(0, 2_000_000_000), 0);
        assert_eq!(ticks_to_micros(3_000, 3_000_000_000), 1);
        assert_eq!(ticks_to_micros(3_000_000_000, 3_000_000_000), 1_000_000);
        // No overflow for a TSC that has run for years.
        assert_eq!(
            ticks_to_micros(u64::MAX, 4_000_000_000),
            4_611_686_018_427_387
        );
        assert_eq!(ticks_to_micros(12345, 0), 0);
    }

    #[test]
    fn calibration() {
        // 10 ms of PIT (11932 counts at 1.193182 MHz) and 30 million ticks: ~3 GHz.
        let hz = tsc_hz(30_000_000, 11_932, 1_193_182);
        assert!((2_999_000_000..3_001_000_000).contains(&hz), "{hz}");
        assert_eq!(tsc_hz(5, 0, 1_193_182), 0);
    }

    #[test]
    fn nanos() {
        assert_eq!(ticks_to_nanos(2_500, 2_500_000_000), 1_000);
        assert_eq!(ticks_to_nanos(1, 0), 0);
        assert_eq!(ticks_to_nanos(u64::MAX, 1), u64::MAX);
        assert_eq!(nanos_to_ticks(1_000, 2_500_000_000), 2_500);
        assert_eq!(nanos_to_ticks(1_000_000_000, 3), 3);
        assert_eq!(nanos_to_ticks(u64::MAX, u64::MAX), u64::MAX);
        let hz = 2_999_999_999;
        // Both round down: a round trip loses at most one tick.
        let back = nanos_to_ticks(ticks_to_nanos(123_456_789, hz), hz);
        assert!((123_456_788..=123_456_789).contains(&back), "{back}");
    }

    #[test]
    fn apic_timer_arithmetic() {
        // QEMU's APIC timer: a 1 GHz bus clock divided by 16, counted for 2 ms of
        // a 2.5 GHz TSC.
        let apic_hz = frequency(125_000, 5_000_000, 2_500_000_000);
        assert_eq!(apic_hz, 62_500_000);
        assert_eq!(periodic_count(apic_hz, 1_000), 62_500);
        assert_eq!(periodic_count(1_500, 1_000), 2); // rounded to nearest
        assert_eq!(periodic_count(10, 1_000), 1); // never 0 (0 stops the timer)
        assert_eq!(periodic_count(u64::MAX, 1), u32::MAX);
        assert_eq!(periodic_count(5, 0), u32::MAX);
        assert_eq!(frequency(1, 0, 1), 0);
    }

    #[test]
    fn display() {
        assert_eq!(Timestamp { micros: 0 }.to_string(), "[    0.000000]");
        assert_eq!(
            Timestamp { micros: 1_000_250 }.to_string(),
            "[    1.000250]"
        );
        assert_eq!(
            Timestamp {
                micros: 123_456_789_012
            }
            .to_string(),
            "[123456.789012]"
        );
    }
}
