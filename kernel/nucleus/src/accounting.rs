//! Per-period accounting of a domain's activations, and the figures
//! `mettactl ps` shows, as both drivers keep them (`control/src/hosted.rs`
//! and `kernel/image/src/driver.rs`): pure, integer arithmetic only (the
//! bare-metal kernel is soft-float).
//!
//! A driver times every activation on its own clock and books it with
//! [`PeriodLog::book`] into the record of the scheduler period the run
//! *started* in ([`period_of_run`]: the charge may already have rolled the
//! scheduler's period past the run). The log keeps the last few records
//! (oldest first; the last one is the period under way). [`figures`] turns
//! them into the `ps` figures and [`runtime_row`] into a whole
//! [`DomainRuntime`].

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use metta_proto::DomainRuntime;

use crate::sched::Why;

/// Per-period records a driver keeps per domain by default.
pub const PERIOD_RECORDS: usize = 1_024;
/// Complete periods [`Figures::delivered_ppm`] is computed over.
pub const DELIVERY_WINDOW: usize = 10;

/// One period of one domain, as observed by a driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeriodRecord {
    /// Start of the scheduler period, ns on the driver's clock.
    pub start_ns: u64,
    /// First activation in the period minus `start_ns`, ns.
    pub latency_ns: u64,
    /// Activations in the period.
    pub activations: u64,
    /// Wall time of its activations in the period, ns.
    pub cpu_ns_real: u64,
    /// Charged time in the period, ns.
    pub cpu_ns_charged: u64,
    /// Charged time given as guaranteed time, ns.
    pub guaranteed_ns: u64,
}

/// The start of the period a run that began at `start` belongs to, given the
/// scheduler's current `period_start` (the charge may have rolled it past the
/// run) and the period length.
pub fn period_of_run(period_start: u64, period_ns: u64, start: u64) -> u64 {
    let p = period_ns.max(1);
    if period_start > start {
        period_start.saturating_sub((period_start - start).div_ceil(p) * p)
    } else {
        period_start
    }
}

/// The last few [`PeriodRecord`]s of a domain, oldest first (the last one is
/// the period under way); when full, a new period pushes out the oldest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodLog {
    records: VecDeque<PeriodRecord>,
    cap: usize,
}

impl Default for PeriodLog {
    /// An empty log of [`PERIOD_RECORDS`].
    fn default() -> PeriodLog {
        PeriodLog::new(PERIOD_RECORDS)
    }
}

impl PeriodLog {
    /// An empty log that keeps up to `cap` records (at least 1).
    pub fn new(cap: usize) -> PeriodLog {
        PeriodLog {
            records: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// A log of `cap` holding `records` (oldest first; only the last `cap`
    /// are kept).
    pub fn with_records(cap: usize, records: impl IntoIterator<Item = PeriodRecord>) -> PeriodLog {
        let mut log = PeriodLog::new(cap);
        for r in records {
            if log.records.len() >= log.cap {
                log.records.pop_front();
            }
            log.records.push_back(r);
        }
        log
    }

    /// Books one activation that started at `start` (ns), took `real_ns` of
    /// wall time and was charged `charged_ns` as `why` time, into the record
    /// of its period; the scheduler's entry says the period: its current
    /// `period_start` and `period_ns` (see [`period_of_run`]). The first
    /// activation of a period sets its latency.
    pub fn book(
        &mut self,
        period_start: u64,
        period_ns: u64,
        start: u64,
        real_ns: u64,
        charged_ns: u64,
        why: Why,
    ) {
        let ps = period_of_run(period_start, period_ns, start);
        let guaranteed = if why == Why::Guaranteed {
            charged_ns
        } else {
            0
        };
        match self.records.back_mut() {
            Some(r) if r.start_ns == ps => {
                r.activations += 1;
                r.cpu_ns_real += real_ns;
                r.cpu_ns_charged += charged_ns;
                r.guaranteed_ns += guaranteed;
            }
            _ => {
                if self.records.len() >= self.cap {
                    self.records.pop_front();
                }
                self.records.push_back(PeriodRecord {
                    start_ns: ps,
                    latency_ns: start.saturating_sub(ps),
                    activations: 1,
                    cpu_ns_real: real_ns,
                    cpu_ns_charged: charged_ns,
                    guaranteed_ns: guaranteed,
                });
            }
        }
    }

    /// The records, oldest first.
    pub fn records(&self) -> &VecDeque<PeriodRecord> {
        &self.records
    }

    /// How many records it holds.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The `ps` figures of these records for a slice of `slice_ns`
    /// (see [`figures`]).
    pub fn figures(&self, slice_ns: u64) -> Figures {
        figures(&self.records, slice_ns)
    }
}

/// The `ps` figures of a domain's period records (see [`figures`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Figures {
    /// Charged CPU over the last [`DELIVERY_WINDOW`] complete periods, ppm of
    /// the slice they owed; `None` without a complete period or with a zero
    /// slice.
    pub delivered_ppm: Option<u64>,
    /// Complete periods the percentiles are taken over.
    pub periods: u32,
    /// 5th percentile of the charged CPU per complete period, ppm of the
    /// slice.
    pub delivered_p5_ppm: Option<u64>,
    /// 5th percentile of the wall time of the activations per complete
    /// period, ppm of the slice.
    pub real_p5_ppm: Option<u64>,
    /// 99th percentile of the first-activation latency per complete period
    /// with an activation, µs.
    pub latency_p99_us: Option<u64>,
}

/// The `ps` figures of `records` (oldest first; the last one is the period
/// under way and is left out) for a slice of `slice_ns`: the CPU delivered
/// over the last [`DELIVERY_WINDOW`] complete periods as ppm of the slice;
/// the 5th percentile of the charged and of the wall-clock CPU per period as
/// ppm of the slice, and the 99th of the first-activation latency, over all
/// complete periods (nearest rank, [`percentile`]); ppm round down.
pub fn figures<'a, I>(records: I, slice_ns: u64) -> Figures
where
    I: IntoIterator<Item = &'a PeriodRecord>,
    I::IntoIter: DoubleEndedIterator,
{
    let complete: Vec<&PeriodRecord> = records.into_iter().rev().skip(1).collect();
    let window = &complete[..complete.len().min(DELIVERY_WINDOW)];
    let delivered_ppm = (!window.is_empty() && slice_ns > 0).then(|| {
        let used: u64 = window.iter().map(|p| p.cpu_ns_charged).sum();
        ppm(used, slice_ns * window.len() as u64)
    });
    let share = |ns: u64| ppm(ns, slice_ns.max(1));
    let p = |mut v: Vec<u64>, permille: u64| (!v.is_empty()).then(|| percentile(&mut v, permille));
    let shares = complete.iter().map(|r| share(r.cpu_ns_charged)).collect();
    let real = complete.iter().map(|r| share(r.cpu_ns_real)).collect();
    let latencies = complete
        .iter()
        .filter(|r| r.activations > 0)
        .map(|r| r.latency_ns / 1_000)
        .collect();
    Figures {
        delivered_ppm,
        periods: complete.len() as u32,
        delivered_p5_ppm: p(shares, 50),
        real_p5_ppm: p(real, 50),
        latency_p99_us: p(latencies, 990),
    }
}

/// The `permille`/1000 quantile of `values` by the nearest-rank method (the
/// smallest value with at least that fraction of values at or below it);
/// sorts them. 0 if empty.
pub fn percentile(values: &mut [u64], permille: u64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    let n = values.len() as u64;
    let rank = (permille.min(1000) * n).div_ceil(1000).max(1);
    values[(rank - 1) as usize]
}

/// `part / whole` in parts per million, rounded down (0 if `whole` is 0;
/// `u64::MAX` if it does not fit).
pub fn ppm(part: u64, whole: u64) -> u64 {
    if whole == 0 {
        return 0;
    }
    u64::try_from(u128::from(part) * 1_000_000 / u128::from(whole)).unwrap_or(u64::MAX)
}

/// How a domain stands, for [`runtime_row`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState<'a> {
    /// It has work.
    Running,
    /// It waits for a message or its timer.
    Waiting,
    /// It trapped, for this reason.
    Failed(&'a str),
}

/// A domain's counters as its driver keeps them, for [`runtime_row`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// CPU charged since it started, ns.
    pub cpu_ns: u64,
    /// Activations so far.
    pub activations: u64,
    /// Linear memory in use, bytes.
    pub memory_bytes: u64,
    /// Messages it sent that could not be delivered.
    pub undelivered: u64,
    /// When it was spawned, ns on the driver's clock.
    pub spawned_ns: u64,
    /// When its first activation ended, ns on the driver's clock (`None`
    /// until then).
    pub first_activation_ns: Option<u64>,
}

/// The `mettactl ps` row of domain `name`, incarnation `epoch`: `state` as
/// `running`, `waiting` or `failed: <why>`, but `starting` (unless failed)
/// until its first activation has ended; `start_us` from spawn to that end;
/// the figures of its period records.
pub fn runtime_row(
    name: &str,
    epoch: u64,
    state: RunState<'_>,
    c: &Counters,
    f: Figures,
) -> DomainRuntime {
    let state = match state {
        RunState::Failed(why) => format!("failed: {why}"),
        _ if c.first_activation_ns.is_none() => "starting".to_string(),
        RunState::Running => "running".to_string(),
        RunState::Waiting => "waiting".to_string(),
    };
    DomainRuntime {
        name: String::from(name),
        epoch,
        state,
        cpu_ns: c.cpu_ns,
        delivered_ppm: f.delivered_ppm,
        activations: c.activations,
        memory_bytes: c.memory_bytes,
        start_us: c
            .first_activation_ns
            .map(|end| end.saturating_sub(c.spawned_ns) / 1_000),
        periods: f.periods,
        delivered_p5_ppm: f.delivered_p5_ppm,
        real_p5_ppm: f.real_p5_ppm,
        latency_p99_us: f.latency_p99_us,
        undelivered: c.undelivered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(start_ms: u64, got_us: u64, real_us: u64, lat_us: u64) -> PeriodRecord {
        PeriodRecord {
            start_ns: start_ms * 1_000_000,
            latency_ns: lat_us * 1_000,
            activations: 1,
            cpu_ns_real: real_us * 1_000,
            cpu_ns_charged: got_us * 1_000,
            guaranteed_ns: got_us * 1_000,
        }
    }

    #[test]
    fn periods_of_runs() {
        assert_eq!(period_of_run(100, 10, 105), 100);
        assert_eq!(period_of_run(110, 10, 105), 100);
        assert_eq!(period_of_run(130, 10, 105), 100);
        assert_eq!(period_of_run(0, 0, 5), 0);
    }

    #[test]
    fn booking_fills_the_period_the_run_started_in() {
        let mut log = PeriodLog::new(2);
        // Period [100, 110): a guaranteed run at 103, an extra one at 106
        // after whose charge the scheduler has rolled to 110.
        log.book(100, 10, 103, 2, 1, Why::Guaranteed);
        log.book(110, 10, 106, 3, 2, Why::Extra);
        assert_eq!(
            log.records().iter().copied().collect::<Vec<_>>(),
            [PeriodRecord {
                start_ns: 100,
                latency_ns: 3,
                activations: 2,
                cpu_ns_real: 5,
                cpu_ns_charged: 3,
                guaranteed_ns: 1,
            }]
        );
        log.book(110, 10, 111, 1, 1, Why::Guaranteed);
        log.book(120, 10, 125, 1, 1, Why::Guaranteed);
        // Two kept: the oldest went.
        let starts: Vec<u64> = log.records().iter().map(|r| r.start_ns).collect();
        assert_eq!(starts, [110, 120]);
        assert_eq!(log.records()[1].latency_ns, 5);
        assert_eq!(PeriodLog::new(0).cap, 1);
        assert_eq!(PeriodLog::with_records(2, [rec(0, 1, 1, 1); 3]).len(), 2);
        assert!(PeriodLog::default().is_empty());
    }

    #[test]
    fn medians_and_percentiles() {
        let mut v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(percentile(&mut v, 990), 99);
        assert_eq!(percentile(&mut v, 1000), 100);
        assert_eq!(percentile(&mut v, 500), 50);
        assert_eq!(percentile(&mut v, 0), 1);
        assert_eq!(percentile(&mut v, 50), 5);
        let mut v = [7, 3];
        assert_eq!(percentile(&mut v, 990), 7);
        assert_eq!(percentile(&mut [], 990), 0);
        // 1,000 values: p99 is the 990th smallest.
        let mut v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&mut v, 990), 990);
        assert_eq!(ppm(1, 4), 250_000);
        assert_eq!(ppm(1, 0), 0);
        assert_eq!(ppm(u64::MAX, 1), u64::MAX);
    }

    #[test]
    fn figures_and_rows() {
        let c = Counters {
            cpu_ns: 23_100_000,
            activations: 13,
            memory_bytes: 65_536,
            undelivered: 4,
            spawned_ns: 5_000_000,
            first_activation_ns: Some(5_250_000),
        };
        // 12 complete periods, then the one under way (left out).
        let log = PeriodLog::with_records(
            PERIOD_RECORDS,
            (0..12)
                .map(|i| rec(i * 10, if i == 0 { 1_000 } else { 2_000 }, 1_900, 10 + i))
                .chain([rec(120, 100, 100, 999_999)]),
        );
        let f = log.figures(2_000_000);
        assert_eq!(
            f,
            figures(
                log.records().iter().copied().collect::<Vec<_>>().iter(),
                2_000_000
            )
        );
        let row = runtime_row("c1", 3, RunState::Waiting, &c, f);
        assert_eq!(
            row,
            DomainRuntime {
                name: "c1".into(),
                epoch: 3,
                state: "waiting".into(),
                cpu_ns: 23_100_000,
                // The last 10 complete periods got their full slice (the
                // half-served first one is outside the window).
                delivered_ppm: Some(1_000_000),
                activations: 13,
                memory_bytes: 65_536,
                start_us: Some(250),
                periods: 12,
                // Nearest rank over 12: the smallest (the first period).
                delivered_p5_ppm: Some(500_000),
                real_p5_ppm: Some(950_000),
                latency_p99_us: Some(21),
                undelivered: 4,
            }
        );
        let state = |s, c: &Counters| runtime_row("c1", 3, s, c, f).state;
        assert_eq!(state(RunState::Failed("boom"), &c), "failed: boom");
        assert_eq!(state(RunState::Running, &c), "running");
        let fresh = Counters {
            first_activation_ns: None,
            ..c
        };
        assert_eq!(state(RunState::Running, &fresh), "starting");
        assert_eq!(state(RunState::Failed("x"), &fresh), "failed: x");
        let row = runtime_row(
            "c1",
            1,
            RunState::Running,
            &fresh,
            PeriodLog::default().figures(1),
        );
        assert_eq!(
            (
                row.delivered_ppm,
                row.start_us,
                row.periods,
                row.latency_p99_us
            ),
            (None, None, 0, None)
        );
        // One record is the period under way: nothing complete yet.
        let one = PeriodLog::with_records(4, [rec(0, 1, 1, 1)]);
        assert_eq!(one.figures(1_000_000), Figures::default());
        // A zero slice: no delivered share, shares against 1 ns.
        let two = PeriodLog::with_records(4, [rec(0, 1, 2, 3), rec(10, 0, 0, 0)]);
        let f = two.figures(0);
        assert_eq!(f.delivered_ppm, None);
        assert_eq!(f.delivered_p5_ppm, Some(1_000_000_000));
        assert_eq!(f.real_p5_ppm, Some(2_000_000_000));
        // A period without activations has no latency.
        let idle = PeriodRecord {
            activations: 0,
            ..rec(0, 0, 0, 7)
        };
        let f = PeriodLog::with_records(4, [idle, rec(10, 0, 0, 0)]).figures(1);
        assert_eq!((f.periods, f.latency_p99_us), (1, None));
    }
}
