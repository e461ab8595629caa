//! The nucleus: domains + scheduler + fuel, driven by `step(now)`.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;

use metta_proto::Contract;

use crate::domain::{Activation, Domain, Outcome, Runtime, SpawnError, Undeliverable};
use crate::image::Image;
use crate::sched::{Decision, Scheduler, Why};
use crate::snapshot::{Snapshot, SnapshotError};
use crate::types::{Caps, DomainId, LogLine, Message, Outgoing};

/// How much fuel the engine burns per nanosecond on this machine, as the
/// ratio `fuel / per_ns`. The driver measures it (run a fuel-bound loop, time
/// it) and may update it with [`Nucleus::set_fuel_rate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FuelRate {
    fuel: u64,
    per_ns: u64,
}

impl FuelRate {
    /// `fuel` units per `per_ns` nanoseconds (zeros are taken as 1).
    pub const fn new(fuel: u64, per_ns: u64) -> FuelRate {
        FuelRate {
            fuel: if fuel == 0 { 1 } else { fuel },
            per_ns: if per_ns == 0 { 1 } else { per_ns },
        }
    }

    /// Fuel for `ns` nanoseconds (rounded down, at least 1).
    pub fn fuel_for(&self, ns: u64) -> u64 {
        let f = ns as u128 * self.fuel as u128 / self.per_ns as u128;
        u64::try_from(f).unwrap_or(u64::MAX).max(1)
    }

    /// Nanoseconds `fuel` stands for (rounded up).
    pub fn ns_for(&self, fuel: u64) -> u64 {
        let ns = (fuel as u128 * self.per_ns as u128).div_ceil(self.fuel as u128);
        u64::try_from(ns).unwrap_or(u64::MAX)
    }
}

/// What [`Nucleus::step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Ran one activation.
    Ran {
        /// The domain.
        domain: DomainId,
        /// Guaranteed or extra time.
        why: Why,
        /// The time the scheduler allowed, ns.
        budget_ns: u64,
        /// What happened.
        activation: Activation,
        /// The time charged: `fuel_used` converted at the fuel rate, ns (at
        /// least 1). A driver with a fake clock advances it by this much.
        charged_ns: u64,
    },
    /// Nothing to run until `until` (ns), or until a message arrives
    /// (`None`).
    Idle {
        /// Next wake-up: a replenishment or a domain's timer.
        until: Option<u64>,
    },
}

/// The nucleus.
///
/// CPU accounting is by fuel: a run is charged `fuel_used ÷ rate`. This keeps
/// the core deterministic and clock-free (the same inputs give the same
/// schedule, on the hosted daemon, on bare metal and in tests), at the price
/// of trusting the calibration. Host-call copies are fuelled too (see the
/// host module). A driver that measures real time can compare it with
/// `charged_ns` and re-calibrate with [`Nucleus::set_fuel_rate`].
pub struct Nucleus {
    rt: Runtime,
    sched: Scheduler,
    domains: BTreeMap<DomainId, Domain>,
    next_id: u32,
    rate: FuelRate,
}

impl fmt::Debug for Nucleus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nucleus")
            .field("domains", &self.domains.len())
            .field("used_ppm", &self.sched.used_ppm())
            .field("capacity_ppm", &self.sched.capacity_ppm())
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}

impl Nucleus {
    /// A nucleus admitting contracts up to `capacity_ppm` of the CPU and
    /// converting time to fuel at `rate`.
    pub fn new(capacity_ppm: u64, rate: FuelRate) -> Nucleus {
        Nucleus {
            rt: Runtime::new(),
            sched: Scheduler::new(capacity_ppm),
            domains: BTreeMap::new(),
            next_id: 1,
            rate,
        }
    }

    /// The fuel rate.
    pub fn fuel_rate(&self) -> FuelRate {
        self.rate
    }

    /// Re-calibrates the fuel rate.
    pub fn set_fuel_rate(&mut self, rate: FuelRate) {
        self.rate = rate;
    }

    /// Sets the scheduler quantum (the longest single run), ns.
    pub fn set_quantum(&mut self, ns: u64) {
        self.sched.set_quantum(ns);
    }

    /// The scheduler (read-only).
    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }

    /// Admits and instantiates a domain; its first period starts at `now` and
    /// its first activation carries `REASON_START`.
    pub fn spawn(
        &mut self,
        name: &str,
        image: &Image,
        contract: Contract,
        caps: Caps,
        now: u64,
    ) -> Result<DomainId, SpawnError> {
        self.sched.check(&contract).map_err(SpawnError::Admission)?;
        let id = DomainId(self.next_id);
        let d = Domain::new(&mut self.rt, id, name, image, contract, caps)?;
        self.install(d, now)
    }

    /// Admits a domain re-created from a snapshot (see [`Domain::restore`]).
    pub fn restore(
        &mut self,
        name: &str,
        image: &Image,
        snapshot: Snapshot,
        now: u64,
    ) -> Result<DomainId, SpawnError> {
        self.sched
            .check(&snapshot.contract)
            .map_err(SpawnError::Admission)?;
        let id = DomainId(self.next_id);
        let d = Domain::restore(&mut self.rt, id, name, image, snapshot)
            .map_err(SpawnError::Restore)?;
        self.install(d, now)
    }

    fn install(&mut self, d: Domain, now: u64) -> Result<DomainId, SpawnError> {
        let id = d.id();
        self.sched
            .admit(id, *d.contract(), now)
            .map_err(SpawnError::Admission)?;
        self.next_id += 1;
        self.domains.insert(id, d);
        self.sync(id, now);
        Ok(id)
    }

    /// Tells the scheduler whether `id` has work at `now`.
    fn sync(&mut self, id: DomainId, now: u64) {
        if let Some(d) = self.domains.get(&id) {
            self.sched.set_runnable(id, d.wants(now).is_some(), now);
        }
    }

    /// Queues a message for `id` and makes it runnable.
    pub fn deliver(&mut self, id: DomainId, msg: Message, now: u64) -> Result<(), Undeliverable> {
        let Some(d) = self.domains.get_mut(&id) else {
            return Err(Undeliverable::NoSuchDomain(msg));
        };
        d.deliver(msg)?;
        self.sync(id, now);
        Ok(())
    }

    /// Removes a domain (its share is freed) and hands it back, e.g. to
    /// snapshot it for a move.
    pub fn stop(&mut self, id: DomainId) -> Option<Domain> {
        self.sched.remove(id);
        let d = self.domains.remove(&id)?;
        let hash = d.image_hash();
        if !self.domains.values().any(|o| o.image_hash() == hash) {
            self.rt.forget(&hash);
        }
        Some(d)
    }

    /// A domain.
    pub fn domain(&self, id: DomainId) -> Option<&Domain> {
        self.domains.get(&id)
    }

    /// A domain, mutably.
    pub fn domain_mut(&mut self, id: DomainId) -> Option<&mut Domain> {
        self.domains.get_mut(&id)
    }

    /// All domains, by id.
    pub fn domains(&self) -> impl Iterator<Item = (DomainId, &Domain)> {
        self.domains.iter().map(|(id, d)| (*id, d))
    }

    /// Snapshots `id` (at an activation boundary, outbox drained).
    pub fn snapshot(&self, id: DomainId) -> Option<Result<Snapshot, SnapshotError>> {
        self.domains.get(&id).map(Domain::snapshot)
    }

    /// Every domain's outgoing messages, for the driver to route.
    pub fn take_outbox(&mut self) -> Vec<Outgoing> {
        self.domains
            .values_mut()
            .flat_map(|d| d.take_outbox())
            .collect()
    }

    /// Every domain's log lines.
    pub fn take_logs(&mut self) -> Vec<LogLine> {
        self.domains
            .values_mut()
            .flat_map(|d| d.take_logs())
            .collect()
    }

    /// Runs the next activation the scheduler picks at `now`, or says how
    /// long to idle.
    pub fn step(&mut self, now: u64) -> Step {
        // Timers that fired make their domains runnable.
        for (id, d) in &self.domains {
            if d.timer().is_some_and(|t| t <= now)
                && self.sched.entry(*id).is_some_and(|e| !e.runnable)
            {
                self.sched.set_runnable(*id, d.wants(now).is_some(), now);
            }
        }
        match self.sched.next(now) {
            Decision::Idle { until } => {
                let timer = self
                    .domains
                    .values()
                    .filter(|d| d.failure().is_none())
                    .filter_map(Domain::timer)
                    .min();
                let until = match (until, timer) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                Step::Idle { until }
            }
            Decision::Run {
                domain,
                budget_ns,
                why,
            } => {
                let fuel = self.rate.fuel_for(budget_ns);
                let d = self
                    .domains
                    .get_mut(&domain)
                    .expect("the scheduler only knows live domains");
                let reason = d.wants(now).unwrap_or(metta_proto::abi::REASON_CONTINUE);
                let activation = d.activate(now, reason, fuel);
                let charged_ns = self.rate.ns_for(activation.fuel_used).max(1);
                d.add_cpu(charged_ns);
                let end = now.saturating_add(charged_ns);
                self.sched.charge(domain, charged_ns, end);
                if matches!(activation.outcome, Outcome::Trapped(_)) {
                    // Failed for good: free its share; it stays listed (with
                    // its failure) until stopped.
                    self.sched.remove(domain);
                } else {
                    self.sync(domain, end);
                }
                Step::Ran {
                    domain,
                    why,
                    budget_ns,
                    activation,
                    charged_ns,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuel_rate_conversions() {
        let r = FuelRate::new(1, 1000); // 1 fuel per us
        assert_eq!(r.fuel_for(10_000_000), 10_000);
        assert_eq!(r.ns_for(10_000), 10_000_000);
        assert_eq!(r.ns_for(1), 1000);
        assert_eq!(r.fuel_for(1), 1);
        let r = FuelRate::new(3, 2);
        assert_eq!(r.fuel_for(2), 3);
        assert_eq!(r.ns_for(1), 1); // rounded up
        assert_eq!(FuelRate::new(0, 0), FuelRate::new(1, 1));
    }
}
