//! Timestamps: TSC ticks to `seconds.microseconds`, and the TSC calibration
//! arithmetic.

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

/// The TSC frequency measured over a reference interval: `ticks` TSC ticks elapsed
/// while a reference clock of `ref_hz` counted `ref_counts`.
pub fn tsc_hz(ticks: u64, ref_counts: u64, ref_hz: u64) -> u64 {
    if ref_counts == 0 {
        return 0;
    }
    let hz = u128::from(ticks) * u128::from(ref_hz) / u128::from(ref_counts);
    u64::try_from(hz).unwrap_or(u64::MAX)
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
