//! The EDF activation scheduler: pure arithmetic on nanoseconds, no wasm, no
//! clock (every call takes `now`).
//!
//! Each admitted domain has a contract `(period, slice, extra)` and, at any
//! time, a current period `[period_start, period_start + period)` with
//! `budget_left` of its slice. [`Scheduler::next`]:
//!
//! 1. rolls every period forward to `now` (a new period replenishes the
//!    budget to the full slice; unused budget never carries over);
//! 2. among runnable domains with budget left, picks the earliest deadline
//!    (end of its current period; ties by id) — **guaranteed** time;
//! 3. otherwise hands the time to runnable `extra` domains round-robin —
//!    **extra** time, which is not charged against any budget;
//! 4. otherwise says idle until the next replenishment of a runnable domain.
//!
//! Activations are not preempted mid-way by the scheduler, so every run is
//! bounded: by the budget, by the chosen domain's period end, by the next
//! period end of any other runnable domain that could then have an earlier
//! deadline, and by a quantum (which bounds how long a domain that wakes up
//! waits behind a running one). The nucleus turns the bound into fuel.
//!
//! **Wake-ups** follow the Constant Bandwidth Server rule: a domain that
//! becomes runnable mid-period with more budget than its bandwidth allows for
//! the rest of the period (`budget·period > (deadline − now)·slice`) starts a
//! fresh period at `now`; otherwise it keeps its period and budget. Without
//! this, a domain that sleeps through most of a period and wakes with its
//! whole slice just before the deadline would push its demand onto others and
//! break their guarantees. With it, EDF is optimal: if the admitted shares
//! sum to at most 100 %, every domain that stays runnable gets its slice in
//! every period (property-tested below).
//!
//! **Admission** sums shares in parts per million, each rounded *up*, against
//! the capacity given to [`Scheduler::new`]. Leave headroom for the nucleus
//! and the driver: 1,000,000 ppm is the whole CPU.

use alloc::collections::BTreeMap;
use core::fmt;

use metta_proto::{Contract, ContractError};

use crate::types::DomainId;

/// Default quantum: the longest single run, 1 ms.
pub const DEFAULT_QUANTUM_NS: u64 = 1_000_000;

/// Why time is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Out of the domain's guaranteed slice.
    Guaranteed,
    /// Spare time for an `extra` domain.
    Extra,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Run `domain` for at most `budget_ns`.
    Run {
        /// The domain.
        domain: DomainId,
        /// The longest it may run before the scheduler must decide again.
        budget_ns: u64,
        /// Guaranteed or extra time.
        why: Why,
    },
    /// Nothing to run. `until`: the next time something becomes runnable by
    /// itself (a replenishment); `None`: only an external event (a message,
    /// a timer the nucleus tracks) can change that.
    Idle {
        /// Wake-up time, ns.
        until: Option<u64>,
    },
}

/// Admission refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmitError {
    /// The contract is out of range.
    Contract(ContractError),
    /// The shares would exceed the capacity.
    Capacity {
        /// The contract's share (rounded up), ppm.
        requested_ppm: u64,
        /// What is left, ppm.
        available_ppm: u64,
    },
    /// The id is already admitted.
    Duplicate(DomainId),
}

impl fmt::Display for AdmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdmitError::Contract(e) => write!(f, "contract: {e}"),
            AdmitError::Capacity {
                requested_ppm,
                available_ppm,
            } => write!(
                f,
                "admission refused: the contract needs {requested_ppm} ppm of CPU, {available_ppm} ppm are free"
            ),
            AdmitError::Duplicate(id) => write!(f, "domain {id} is already admitted"),
        }
    }
}

impl core::error::Error for AdmitError {}

/// The scheduler's view of one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The contract.
    pub contract: Contract,
    /// Its share, ppm, rounded up.
    pub share_ppm: u64,
    /// Whether it has work.
    pub runnable: bool,
    /// Start of the current period.
    pub period_start: u64,
    /// Guaranteed time left in the current period.
    pub budget_left: u64,
}

impl Entry {
    /// End of the current period: the deadline.
    pub fn deadline(&self) -> u64 {
        self.period_start.saturating_add(self.contract.period_ns)
    }

    fn roll(&mut self, now: u64) {
        let p = self.contract.period_ns;
        if now >= self.deadline() {
            let k = (now - self.period_start) / p;
            self.period_start += k * p;
            self.budget_left = self.contract.slice_ns;
        }
    }
}

/// `slice / period` in ppm, rounded up (so admitted shares never sum to more
/// than the real utilisation allows).
pub fn share_ppm_ceil(c: &Contract) -> u64 {
    if c.period_ns == 0 {
        return u64::MAX;
    }
    (c.slice_ns as u128 * 1_000_000).div_ceil(c.period_ns as u128) as u64
}

/// The EDF activation scheduler.
#[derive(Debug, Clone)]
pub struct Scheduler {
    capacity_ppm: u64,
    used_ppm: u64,
    quantum_ns: u64,
    entries: BTreeMap<DomainId, Entry>,
    last_extra: Option<DomainId>,
}

impl Scheduler {
    /// A scheduler admitting contracts up to `capacity_ppm` in total.
    pub fn new(capacity_ppm: u64) -> Scheduler {
        Scheduler {
            capacity_ppm,
            used_ppm: 0,
            quantum_ns: DEFAULT_QUANTUM_NS,
            entries: BTreeMap::new(),
            last_extra: None,
        }
    }

    /// Sets the quantum (at least 1 ns).
    pub fn set_quantum(&mut self, quantum_ns: u64) {
        self.quantum_ns = quantum_ns.max(1);
    }

    /// The quantum.
    pub fn quantum(&self) -> u64 {
        self.quantum_ns
    }

    /// Capacity, ppm.
    pub fn capacity_ppm(&self) -> u64 {
        self.capacity_ppm
    }

    /// Sum of admitted shares, ppm.
    pub fn used_ppm(&self) -> u64 {
        self.used_ppm
    }

    /// A domain's entry.
    pub fn entry(&self, id: DomainId) -> Option<&Entry> {
        self.entries.get(&id)
    }

    /// Whether `contract` would be admitted.
    pub fn check(&self, contract: &Contract) -> Result<u64, AdmitError> {
        contract.validate().map_err(AdmitError::Contract)?;
        let share = share_ppm_ceil(contract);
        let available = self.capacity_ppm.saturating_sub(self.used_ppm);
        if share > available {
            return Err(AdmitError::Capacity {
                requested_ppm: share,
                available_ppm: available,
            });
        }
        Ok(share)
    }

    /// Admits domain `id` (not runnable yet); its first period starts at
    /// `now`.
    pub fn admit(&mut self, id: DomainId, contract: Contract, now: u64) -> Result<(), AdmitError> {
        if self.entries.contains_key(&id) {
            return Err(AdmitError::Duplicate(id));
        }
        let share = self.check(&contract)?;
        self.used_ppm += share;
        self.entries.insert(
            id,
            Entry {
                contract,
                share_ppm: share,
                runnable: false,
                period_start: now,
                budget_left: contract.slice_ns,
            },
        );
        Ok(())
    }

    /// Removes a domain and frees its share.
    pub fn remove(&mut self, id: DomainId) -> Option<Entry> {
        let e = self.entries.remove(&id)?;
        self.used_ppm -= e.share_ppm;
        Some(e)
    }

    /// Marks a domain runnable or not (CBS rule on wake-up, see the module
    /// docs).
    pub fn set_runnable(&mut self, id: DomainId, runnable: bool, now: u64) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        if runnable && !e.runnable {
            e.roll(now);
            let left = e.deadline().saturating_sub(now) as u128;
            if e.budget_left as u128 * e.contract.period_ns as u128
                > left * e.contract.slice_ns as u128
            {
                e.period_start = now;
                e.budget_left = e.contract.slice_ns;
            }
        }
        e.runnable = runnable;
    }

    /// Picks what runs at `now`.
    pub fn next(&mut self, now: u64) -> Decision {
        for e in self.entries.values_mut() {
            e.roll(now);
        }
        let best = self
            .entries
            .iter()
            .filter(|(_, e)| e.runnable && e.budget_left > 0)
            .min_by_key(|(id, e)| (e.deadline(), **id))
            .map(|(id, e)| (*id, *e));
        if let Some((id, e)) = best {
            let d = e.deadline();
            let mut limit = e.budget_left.min(d - now).min(self.quantum_ns);
            for (other, o) in &self.entries {
                if *other != id && o.runnable && o.deadline() < d {
                    limit = limit.min(o.deadline() - now);
                }
            }
            return Decision::Run {
                domain: id,
                budget_ns: limit.max(1),
                why: Why::Guaranteed,
            };
        }
        // No guaranteed work: spare time, round-robin over extra domains.
        let next_replenish = self
            .entries
            .values()
            .filter(|e| e.runnable)
            .map(Entry::deadline)
            .min();
        let extra = |e: &Entry| e.runnable && e.contract.extra;
        let after = self
            .last_extra
            .map_or(DomainId(0), |l| DomainId(l.0.wrapping_add(1)));
        let pick = self
            .entries
            .range(after..)
            .find(|(_, e)| extra(e))
            .or_else(|| self.entries.iter().find(|(_, e)| extra(e)))
            .map(|(id, _)| *id);
        if let Some(id) = pick {
            self.last_extra = Some(id);
            let until = next_replenish.map_or(u64::MAX, |t| t - now);
            return Decision::Run {
                domain: id,
                budget_ns: self.quantum_ns.min(until).max(1),
                why: Why::Extra,
            };
        }
        Decision::Idle {
            until: next_replenish,
        }
    }

    /// Accounts `used_ns` of a run of `id` that ended at `now`. Guaranteed
    /// runs consume budget; an extra run happens with the budget at zero, so
    /// it consumes nothing. A run that overran its period end is forgiven in
    /// the new period (no carry-over either way).
    pub fn charge(&mut self, id: DomainId, used_ns: u64, now: u64) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.budget_left = e.budget_left.saturating_sub(used_ns);
            e.roll(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;

    fn contract(slice: u64, period: u64, extra: bool) -> Contract {
        Contract {
            period_ns: period,
            slice_ns: slice,
            extra,
            memory: 1 << 20,
        }
    }

    #[test]
    fn admission_sums_shares_rounded_up() {
        let mut s = Scheduler::new(1_000_000);
        // 1/3 rounds up to 333,334 ppm: three of them do not fit in 1,000,000.
        let third = contract(MS, 3 * MS, false);
        s.admit(DomainId(1), third, 0).unwrap();
        s.admit(DomainId(2), third, 0).unwrap();
        assert!(matches!(
            s.admit(DomainId(3), third, 0),
            Err(AdmitError::Capacity {
                requested_ppm: 333_334,
                available_ppm: 333_332
            })
        ));
        assert_eq!(
            s.admit(DomainId(1), contract(MS, 10 * MS, false), 0),
            Err(AdmitError::Duplicate(DomainId(1)))
        );
        assert!(matches!(
            s.admit(DomainId(4), contract(0, 10 * MS, false), 0),
            Err(AdmitError::Contract(_))
        ));
        s.remove(DomainId(2));
        s.admit(DomainId(3), third, 0).unwrap();
        assert_eq!(s.used_ppm(), 666_668);
    }

    #[test]
    fn idle_until_replenishment_and_none_without_work() {
        let mut s = Scheduler::new(1_000_000);
        s.admit(DomainId(1), contract(2 * MS, 10 * MS, false), 0)
            .unwrap();
        assert_eq!(s.next(0), Decision::Idle { until: None });
        s.set_runnable(DomainId(1), true, 0);
        assert_eq!(
            s.next(0),
            Decision::Run {
                domain: DomainId(1),
                budget_ns: MS,
                why: Why::Guaranteed
            }
        );
        s.charge(DomainId(1), MS, MS);
        s.charge(DomainId(1), MS, 2 * MS);
        assert_eq!(
            s.next(2 * MS),
            Decision::Idle {
                until: Some(10 * MS)
            }
        );
        // Replenished at the period end.
        assert!(matches!(
            s.next(10 * MS),
            Decision::Run {
                why: Why::Guaranteed,
                ..
            }
        ));
    }

    #[test]
    fn earliest_deadline_first_and_runs_stop_at_other_deadlines() {
        let mut s = Scheduler::new(1_000_000);
        s.set_quantum(u64::MAX);
        s.admit(DomainId(1), contract(5 * MS, 50 * MS, false), 0)
            .unwrap();
        s.admit(DomainId(2), contract(2 * MS, 10 * MS, false), 0)
            .unwrap();
        s.set_runnable(DomainId(1), true, 0);
        s.set_runnable(DomainId(2), true, 0);
        assert_eq!(
            s.next(0),
            Decision::Run {
                domain: DomainId(2),
                budget_ns: 2 * MS,
                why: Why::Guaranteed
            }
        );
        s.charge(DomainId(2), 2 * MS, 2 * MS);
        // Domain 1 may run until domain 2's period ends at 10 ms (8 ms), but
        // its budget (5 ms) is the tighter bound.
        assert_eq!(
            s.next(2 * MS),
            Decision::Run {
                domain: DomainId(1),
                budget_ns: 5 * MS,
                why: Why::Guaranteed
            }
        );
        s.charge(DomainId(1), MS, 3 * MS);
        s.set_quantum(u64::MAX);
        // Still 4 ms left, bounded by 7 ms to domain 2's replenishment.
        assert_eq!(
            s.next(3 * MS),
            Decision::Run {
                domain: DomainId(1),
                budget_ns: 4 * MS,
                why: Why::Guaranteed
            }
        );
    }

    #[test]
    fn cbs_wakeup_rule() {
        let mut s = Scheduler::new(1_000_000);
        s.admit(DomainId(1), contract(5 * MS, 10 * MS, false), 0)
            .unwrap();
        // Wakes at 8 ms with 5 ms budget and 2 ms to its deadline: too dense,
        // so a new period starts at 8 ms.
        s.set_runnable(DomainId(1), true, 8 * MS);
        let e = *s.entry(DomainId(1)).unwrap();
        assert_eq!((e.period_start, e.budget_left), (8 * MS, 5 * MS));
        // Sleeps after using 4 ms; wakes at 13 ms: 1 ms left, 5 ms to the
        // deadline (18 ms) — within bandwidth, keeps its period.
        s.charge(DomainId(1), 4 * MS, 12 * MS);
        s.set_runnable(DomainId(1), false, 12 * MS);
        s.set_runnable(DomainId(1), true, 13 * MS);
        let e = *s.entry(DomainId(1)).unwrap();
        assert_eq!((e.period_start, e.budget_left), (8 * MS, MS));
    }

    /// Runs the scheduler against a fake clock: `runnable(id, now)` says
    /// whether a domain has work (checked between runs, as the nucleus
    /// does); every run uses its whole budget. Returns,
    /// per domain, the (start, len, why) of its runs.
    fn simulate(
        s: &mut Scheduler,
        ids: &[DomainId],
        horizon: u64,
        mut runnable: impl FnMut(DomainId, u64) -> bool,
    ) -> BTreeMap<DomainId, Vec<(u64, u64, Why)>> {
        let mut runs: BTreeMap<DomainId, Vec<(u64, u64, Why)>> = BTreeMap::new();
        let mut now = 0;
        while now < horizon {
            for &id in ids {
                s.set_runnable(id, runnable(id, now), now);
            }
            match s.next(now) {
                Decision::Run {
                    domain,
                    budget_ns,
                    why,
                } => {
                    runs.entry(domain).or_default().push((now, budget_ns, why));
                    now += budget_ns;
                    s.charge(domain, budget_ns, now);
                }
                // Poll the runnable pattern at least every 100 us while idle.
                Decision::Idle { until } => {
                    now = until.unwrap_or(u64::MAX).min(now + 100_000);
                }
            }
        }
        runs
    }

    /// A 10ms/100ms domain keeps its slice every period while eight greedy
    /// extra domains saturate the CPU, over 10 s of simulated time.
    #[test]
    fn guaranteed_domain_keeps_its_slice_against_eight_greedy_neighbours() {
        let mut s = Scheduler::new(1_000_000);
        let ids: Vec<DomainId> = (0..9).map(DomainId).collect();
        s.admit(ids[0], contract(10 * MS, 100 * MS, false), 0)
            .unwrap();
        for &id in &ids[1..] {
            // Each greedy neighbour also holds a small guarantee: 5ms/50ms.
            s.admit(id, contract(5 * MS, 50 * MS, true), 0).unwrap();
        }
        let horizon = 10_000 * MS;
        let runs = simulate(&mut s, &ids, horizon, |_, _| true);
        let mine = &runs[&ids[0]];
        for period in 0..100u64 {
            let (lo, hi) = (period * 100 * MS, (period + 1) * 100 * MS);
            let in_period: Vec<_> = mine.iter().filter(|r| r.0 >= lo && r.0 < hi).collect();
            let got: u64 = in_period.iter().map(|r| r.1).sum();
            assert!(got >= 10 * MS, "period {period}: got {got} ns");
            assert!(
                in_period.iter().all(|r| r.0 + r.1 <= hi),
                "period {period}: ran past its deadline"
            );
            assert!(
                in_period[0].0 < hi,
                "period {period}: did not start in its period"
            );
        }
        // The neighbours soaked up the rest: the CPU never idled.
        let busy: u64 = runs.values().flatten().map(|r| r.1).sum();
        assert_eq!(busy, horizon);
        for id in &ids[1..] {
            assert!(runs[id].iter().any(|r| r.2 == Why::Extra));
        }
    }

    #[derive(Debug, Clone)]
    struct Case {
        contracts: Vec<(u64, u64, bool)>,
        /// Per domain: None = always runnable; Some(pattern) = toggles.
        patterns: Vec<Option<Vec<(u64, u64)>>>,
        quantum: u64,
    }

    fn case() -> impl Strategy<Value = Case> {
        let one = (1u64..=50, 1u64..=1000, any::<bool>()).prop_map(
            |(period_ms, slice_permille, extra)| {
                let period = period_ms * MS;
                let slice = (period * slice_permille / 1000).max(1);
                (slice, period, extra)
            },
        );
        let pattern = prop_oneof![
            Just(None),
            prop::collection::vec((1u64..40 * MS, 1u64..40 * MS), 1..20).prop_map(Some),
        ];
        (prop::collection::vec((one, pattern), 1..7), 1u64..=20 * MS).prop_map(|(v, quantum)| {
            let (contracts, patterns) = v.into_iter().unzip();
            Case {
                contracts,
                patterns,
                quantum,
            }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// EDF optimality: whatever the admitted set and whatever the others
        /// do, every domain that stays runnable gets its slice within every
        /// one of its periods, and no domain ever gets more guaranteed time
        /// than its slice in a period.
        #[test]
        fn every_always_runnable_domain_gets_its_slice_every_period(c in case()) {
            let mut s = Scheduler::new(1_000_000);
            s.set_quantum(c.quantum);
            let mut ids = Vec::new();
            let mut schedule = BTreeMap::new();
            for (i, ((slice, period, extra), pattern)) in c.contracts.iter().zip(&c.patterns).enumerate() {
                let id = DomainId(i as u32);
                if s.admit(id, contract(*slice, *period, *extra), 0).is_ok() {
                    ids.push(id);
                    // Toggle pattern: alternating (on, off) durations, repeated.
                    schedule.insert(id, pattern.clone());
                }
            }
            let on = |id: DomainId, now: u64| -> bool {
                match &schedule[&id] {
                    None => true,
                    Some(p) => {
                        let cycle: u64 = p.iter().map(|(a, b)| a + b).sum();
                        let mut t = now % cycle;
                        for (a, b) in p {
                            if t < *a { return true; }
                            t -= a;
                            if t < *b { return false; }
                            t -= b;
                        }
                        false
                    }
                }
            };
            let horizon = 300 * MS;
            let runs = simulate(&mut s, &ids, horizon, on);
            for &id in &ids {
                let e = *s.entry(id).unwrap();
                let (slice, period) = (e.contract.slice_ns, e.contract.period_ns);
                let mine = runs.get(&id).cloned().unwrap_or_default();
                let periods = horizon / period;
                for k in 0..periods {
                    let (lo, hi) = (k * period, (k + 1) * period);
                    let guaranteed: u64 = mine.iter()
                        .filter(|r| r.0 >= lo && r.0 < hi && r.2 == Why::Guaranteed)
                        .map(|r| r.1).sum();
                    if schedule[&id].is_none() {
                        prop_assert!(guaranteed >= slice,
                            "{id} period {k}: {guaranteed} < {slice} (contracts {:?})", c.contracts);
                        prop_assert!(guaranteed <= slice);
                        prop_assert!(mine.iter().filter(|r| r.0 >= lo && r.0 < hi).all(|r| r.0 + r.1 <= hi));
                    }
                }
            }
        }
    }
}
