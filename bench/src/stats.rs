//! Latency percentiles and the median/spread of repeated runs.

use serde::Serialize;

/// The `q`-quantile (0 < q <= 1) of `sorted` by the nearest-rank method: the
/// smallest sample such that at least `q` of all samples are at or below it.
/// `None` for no samples.
pub fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Summary of one timed phase.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PhaseStats {
    /// Successful requests started inside the timed window.
    pub ops: u64,
    /// Failed requests started inside the timed window.
    pub errors: u64,
    /// ops / window length.
    pub ops_per_sec: f64,
    /// Median latency (ms).
    pub p50_ms: f64,
    /// 99th percentile latency (ms).
    pub p99_ms: f64,
    /// Largest latency (ms).
    pub max_ms: f64,
}

impl PhaseStats {
    /// From every request's latency in microseconds (any order) and the
    /// length of the window in seconds.
    pub fn from_latencies(mut lat_us: Vec<u64>, errors: u64, window_secs: f64) -> PhaseStats {
        lat_us.sort_unstable();
        let ms = |v: Option<u64>| v.map_or(f64::NAN, |us| us as f64 / 1000.0);
        PhaseStats {
            ops: lat_us.len() as u64,
            errors,
            ops_per_sec: lat_us.len() as f64 / window_secs,
            p50_ms: ms(percentile(&lat_us, 0.50)),
            p99_ms: ms(percentile(&lat_us, 0.99)),
            max_ms: ms(lat_us.last().copied()),
        }
    }
}

/// Median and range of one figure over several runs.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Spread {
    /// Median of the runs (mean of the middle two for an even count).
    pub median: f64,
    /// Smallest run.
    pub min: f64,
    /// Largest run.
    pub max: f64,
}

impl Spread {
    /// `None` for no values; NaNs are ignored.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[7], 0.99), Some(7));
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.99), Some(990));

        let s = PhaseStats::from_latencies(vec![3000, 1000, 2000, 4000], 1, 2.0);
        assert_eq!(s.ops, 4);
        assert_eq!(s.errors, 1);
        assert_eq!(s.ops_per_sec, 2.0);
        assert_eq!(s.p50_ms, 2.0);
        assert_eq!(s.p99_ms, 4.0);
        assert_eq!(s.max_ms, 4.0);
    }

    #[test]
    fn spread_of_runs() {
        assert_eq!(Spread::of(&[]), None);
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Spread::of(&[4.0, 1.0, 2.0, f64::NAN, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
    }
}
