//! Small arithmetic the native driver and the self-tests share: medians,
//! fuel-rate calibration, shares of a slice. Integers only (the kernel is
//! soft-float). Percentiles and ppm are the nucleus's
//! (`metta_nucleus::accounting`), shared with the hosted driver.

/// Fixed point of fuel rates: fuel per this many ns (as `control/src/hosted.rs`).
pub const RATE_SCALE_NS: u64 = 1_000_000;

/// The median of `values` (the upper one of an even count); sorts them. 0 if
/// empty.
pub fn median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

/// Fuel per [`RATE_SCALE_NS`] for `fuel` burnt in `ns` (at least 1).
pub fn rate_per_scale(fuel: u64, ns: u64) -> u64 {
    let r = u128::from(fuel) * u128::from(RATE_SCALE_NS) / u128::from(ns.max(1));
    u64::try_from(r).unwrap_or(u64::MAX).max(1)
}

/// The fuel that should take `target_ns` if `fuel` took `ns`, within
/// `[min, max]`: sizes the calibration runs to the machine (TCG is ~50x
/// slower than the host, so the host's fixed 20 M fuel would take seconds).
pub fn scale_fuel(fuel: u64, ns: u64, target_ns: u64, min: u64, max: u64) -> u64 {
    let f = u128::from(fuel) * u128::from(target_ns) / u128::from(ns.max(1));
    u64::try_from(f).unwrap_or(u64::MAX).clamp(min, max)
}

/// One step of the fuel-rate EWMA (weight 1/4 for the new sample, as
/// `RECAL_ALPHA` in `control/src/hosted.rs`): `sample` is clamped to ¼–4× of
/// `base`, rates in fuel per [`RATE_SCALE_NS`].
pub fn ewma_rate(ewma: u64, sample: u64, base: u64) -> u64 {
    let sample = sample.clamp((base / 4).max(1), base.saturating_mul(4));
    let next = i128::from(ewma) + (i128::from(sample) - i128::from(ewma)) / 4;
    u64::try_from(next).unwrap_or(1).max(1)
}

/// Whether `got_ns` is at least `min_ppm` parts per million of `slice_ns`.
pub fn share_met(got_ns: u64, slice_ns: u64, min_ppm: u64) -> bool {
    u128::from(got_ns) * 1_000_000 >= u128::from(slice_ns) * u128::from(min_ppm)
}

/// Parts per million as a percentage with one decimal, for reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Percent(pub u64);

impl core::fmt::Display for Percent {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let tenths = (self.0 + 500) / 1_000;
        write!(f, "{}.{}%", tenths / 10, tenths % 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&mut []), 0);
        assert_eq!(median(&mut [5]), 5);
        assert_eq!(median(&mut [9, 1, 5]), 5);
        assert_eq!(median(&mut [4, 1, 3, 2]), 3);
    }

    #[test]
    fn calibration_arithmetic() {
        // 20 M fuel in 10 ms: 2 fuel/ns, 2,000,000 per 1,000,000 ns.
        assert_eq!(rate_per_scale(20_000_000, 10_000_000), 2_000_000);
        assert_eq!(rate_per_scale(1, u64::MAX), 1);
        assert_eq!(rate_per_scale(5, 0), 5_000_000);
        // 100 k fuel took 5 ms; 20 ms wants 400 k.
        assert_eq!(
            scale_fuel(100_000, 5_000_000, 20_000_000, 1, u64::MAX),
            400_000
        );
        assert_eq!(
            scale_fuel(100_000, 5_000_000, 20_000_000, 1, 300_000),
            300_000
        );
        assert_eq!(scale_fuel(1, 1_000_000_000, 1, 10_000, u64::MAX), 10_000);
    }

    #[test]
    fn ewma_moves_a_quarter_and_clamps() {
        assert_eq!(ewma_rate(1000, 2000, 1000), 1250);
        assert_eq!(ewma_rate(1000, 0, 1000), 1000 - 750 / 4);
        // A wild sample counts as 4x the base at most.
        assert_eq!(ewma_rate(1000, 1_000_000, 1000), 1000 + 3000 / 4);
        assert_eq!(ewma_rate(1, 1, 1), 1);
    }

    #[test]
    fn shares() {
        assert!(share_met(1_800_000, 2_000_000, 900_000));
        assert!(!share_met(1_799_999, 2_000_000, 900_000));
        assert_eq!(Percent(987_654).to_string(), "98.8%");
        assert_eq!(Percent(1_000_000).to_string(), "100.0%");
        assert_eq!(Percent(0).to_string(), "0.0%");
    }
}
