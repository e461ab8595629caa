//! The native driver of the nucleus, without the clock: the bare-metal twin
//! of `control/src/hosted.rs`, much smaller. The binary (`src/native.rs`)
//! owns the clock (the TSC), idles the CPU and prints; everything else is
//! here and host-tested with a fake clock.
//!
//! - **Activation loop**: [`Driver::poll`] reads the clock it is given, calls
//!   [`Nucleus::step`], and after a run notes the wall time it took
//!   (per-period records, booked as hosted does with the nucleus's
//!   [`PeriodLog`]: latency of the first activation in a period, real and
//!   charged CPU, guaranteed share), folds the measured fuel/ns into the
//!   fuel rate (an EWMA, as hosted: weight ¼, samples from activations of at
//!   least [`RECAL_MIN_NS`], clamped to ¼–4× the start-up rate), collects the
//!   logs and routes the outbox. When the nucleus is idle it says until when
//!   ([`Poll::Idle`]); the caller halts the CPU until then.
//! - **Routing** between local domains, as hosted (the nucleus's
//!   [`metta_nucleus::routing`]: a [`ReplyTokens`] table and its
//!   [`ReplyTokens::send_local`]):
//!   a message sent on a name
//!   (no reply token) goes to the *other* live domain whose channel
//!   capability covers the name with the longest prefix (ties: the lowest
//!   id), with a [`ReplyToken`] minted for the receiver; the answer comes
//!   back out carrying the token and is delivered to the original sender on
//!   the same channel name. Messages from the kernel itself
//!   ([`Driver::deliver`]) carry a tag: their answers are kept for
//!   [`Driver::take_answers`] (or [`Driver::post`]: no answer wanted).
//!   A message to a full inbox is dropped and noted in the sender's log; so
//!   is a message with no local route, unless [`Config::outbound`] is on
//!   (a node joined to a cluster): then it is queued for the control plane
//!   with a token minted for the answer ([`Driver::take_outbound`]), and
//!   [`Driver::answer`] delivers that answer to the sender on the same
//!   channel name, as a local answer would be.
//! - **Runtime rows** ([`Driver::runtime`]): the figures `mettactl ps`
//!   shows, by [`accounting::runtime_row`], as `control/src/domains.rs`
//!   computes them for hosted lanes.
//! - **Logs**: every domain line and nucleus record is queued with the
//!   domain's name ([`Driver::take_lines`]), at most [`MAX_LINES`] (older
//!   lines are dropped and counted).

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use metta_nucleus::accounting::{self, Counters, PeriodLog, RunState};
use metta_nucleus::routing::{Local, ReplyTokens};
use metta_nucleus::{
    Caps, DomainId, FuelRate, Image, LoadError, LogOrigin, Message, Nucleus, Outcome, Outgoing,
    ReplyToken, Snapshot, SpawnError, Step, Why,
};
use metta_proto::{Contract, DomainRuntime};

pub use metta_nucleus::accounting::{PeriodRecord, DELIVERY_WINDOW, PERIOD_RECORDS};
pub use metta_nucleus::routing::MAX_TOKENS;

use crate::stats::{ewma_rate, rate_per_scale, RATE_SCALE_NS};

/// Activations shorter than this (wall time) are not used to recalibrate:
/// their time is mostly call overhead, not fuel.
pub const RECAL_MIN_NS: u64 = 100_000;
/// Log lines queued for the console before the oldest are dropped.
pub const MAX_LINES: usize = 4_096;
/// Outbound messages ([`Config::outbound`]) queued before new ones are
/// dropped (and noted in the sender's log).
pub const MAX_OUTBOUND: usize = 1_024;

/// Driver settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Admission capacity, ppm of the CPU.
    pub capacity_ppm: u64,
    /// Scheduler quantum, ns (`None`: the nucleus default, 1 ms).
    pub quantum_ns: Option<u64>,
    /// Track the fuel rate with an EWMA of the measured fuel/ns.
    pub recalibrate: bool,
    /// A message no local domain serves is queued for the control plane
    /// ([`Driver::take_outbound`]) instead of being dropped.
    pub outbound: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            capacity_ppm: 900_000,
            quantum_ns: None,
            recalibrate: true,
            outbound: false,
        }
    }
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DriverError {
    /// The wasm bytes are not a valid domain image.
    Image(LoadError),
    /// The nucleus refused the domain (admission, instantiation, restore).
    Spawn(SpawnError),
    /// A domain with that name exists.
    Duplicate(String),
    /// No domain with that name.
    NoSuchDomain(String),
    /// The domain did not take the message (inbox full, too big, failed).
    Undeliverable(&'static str),
    /// An answer came for a token this driver did not mint for an outbound
    /// message, or whose sender is gone.
    StaleToken(u64),
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriverError::Image(e) => write!(f, "image: {e}"),
            DriverError::Spawn(e) => write!(f, "spawn: {e}"),
            DriverError::Duplicate(n) => write!(f, "a domain named {n:?} exists"),
            DriverError::NoSuchDomain(n) => write!(f, "no domain named {n:?}"),
            DriverError::Undeliverable(why) => write!(f, "undeliverable: {why}"),
            DriverError::StaleToken(t) => write!(f, "no outbound message has reply token {t}"),
        }
    }
}

/// What the driver keeps about a domain.
#[derive(Debug, Clone)]
pub struct DomainRecord {
    /// Its name.
    pub name: String,
    /// Its contract.
    pub contract: Contract,
    /// When it was spawned (or restored), ns.
    pub spawned_ns: u64,
    /// When its first activation ended (unless it trapped), ns.
    pub first_activation_ns: Option<u64>,
    /// Wall time its activations took, ns.
    pub real_ns: u64,
    /// Charged time given as guaranteed (slice) time, ns.
    pub guaranteed_ns: u64,
    /// Charged time given as spare (`extra`) time, ns.
    pub extra_ns: u64,
    /// Messages it sent that could not be delivered.
    pub undelivered: u64,
    /// The last [`PERIOD_RECORDS`] periods, oldest first (the current one
    /// last).
    pub periods: PeriodLog,
}

/// A log line for the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The domain's name.
    pub domain: String,
    /// When it was written (the start of the activation), ns.
    pub at_ns: u64,
    /// The text (nucleus records are prefixed `nucleus: `, the driver's own
    /// notes `driver: `).
    pub text: String,
}

/// What [`Driver::poll`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll {
    /// Ran one activation, from `start_ns` to `end_ns` on the clock.
    Ran {
        /// The domain.
        domain: DomainId,
        /// Guaranteed or extra time.
        why: Why,
        /// Clock before the step.
        start_ns: u64,
        /// Clock after it.
        end_ns: u64,
        /// The time the nucleus charged (fuel ÷ rate), ns.
        charged_ns: u64,
        /// How it ended.
        outcome: Outcome,
    },
    /// Nothing to run until `until` (ns), or until a message arrives
    /// (`None`). A time at or before now means: poll again at once.
    Idle {
        /// The next wake-up.
        until: Option<u64>,
    },
}

/// A message for the control plane to route ([`Config::outbound`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// The sending domain's name.
    pub from: String,
    /// Channel name.
    pub channel: String,
    /// Bytes.
    pub payload: Vec<u8>,
    /// The token its answer must carry ([`Driver::answer`]).
    pub token: u64,
}

/// Where the answer to a token goes.
#[derive(Debug)]
enum Dest {
    /// To this domain, on this channel name (a local message's answer).
    Domain(DomainId, String),
    /// The same, for a message that left through [`Driver::take_outbound`]:
    /// only these tokens may be redeemed by [`Driver::answer`].
    Remote(DomainId, String),
    /// To the kernel, with this tag; the message went to this domain.
    Kernel(u64, DomainId),
}

impl Dest {
    /// The domain the token involves.
    fn domain(&self) -> DomainId {
        match self {
            Dest::Domain(id, _) | Dest::Remote(id, _) | Dest::Kernel(_, id) => *id,
        }
    }
}

/// The native driver (see the module docs).
pub struct Driver {
    n: Nucleus,
    cfg: Config,
    names: BTreeMap<String, DomainId>,
    doms: BTreeMap<DomainId, DomainRecord>,
    tokens: ReplyTokens<Dest>,
    /// Start-up rate and the EWMA, fuel per [`RATE_SCALE_NS`].
    base_rate: u64,
    ewma_rate: u64,
    lines: VecDeque<Line>,
    lines_dropped: u64,
    answers: Vec<(u64, Vec<u8>)>,
    outbound: VecDeque<Outbound>,
}

impl fmt::Debug for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Driver")
            .field("nucleus", &self.n)
            .field("domains", &self.names)
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// A driver of a fresh nucleus whose fuel rate is `rate` (calibrated by
    /// the caller: see `src/native.rs`).
    pub fn new(cfg: Config, rate: FuelRate) -> Driver {
        let mut n = Nucleus::new(cfg.capacity_ppm, rate);
        if let Some(q) = cfg.quantum_ns {
            n.set_quantum(q);
        }
        let base = rate.fuel_for(RATE_SCALE_NS);
        Driver {
            n,
            cfg,
            names: BTreeMap::new(),
            doms: BTreeMap::new(),
            tokens: ReplyTokens::new(),
            base_rate: base,
            ewma_rate: base,
            lines: VecDeque::new(),
            lines_dropped: 0,
            answers: Vec::new(),
            outbound: VecDeque::new(),
        }
    }

    /// The nucleus (domains, scheduler, snapshots).
    pub fn nucleus(&self) -> &Nucleus {
        &self.n
    }

    /// The nucleus, mutably (e.g. to activate a domain directly).
    pub fn nucleus_mut(&mut self) -> &mut Nucleus {
        &mut self.n
    }

    /// The current fuel rate, fuel per [`RATE_SCALE_NS`].
    pub fn rate_per_scale(&self) -> u64 {
        self.ewma_rate
    }

    /// The id of domain `name`.
    pub fn id(&self, name: &str) -> Result<DomainId, DriverError> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| DriverError::NoSuchDomain(name.to_string()))
    }

    /// What the driver keeps about domain `id`.
    pub fn record(&self, id: DomainId) -> Option<&DomainRecord> {
        self.doms.get(&id)
    }

    /// Loads `wasm`, admits it under `contract` and starts it (its first
    /// period starts at `now`).
    pub fn spawn(
        &mut self,
        name: &str,
        wasm: &[u8],
        contract: Contract,
        caps: Caps,
        now: u64,
    ) -> Result<DomainId, DriverError> {
        if self.names.contains_key(name) {
            return Err(DriverError::Duplicate(name.to_string()));
        }
        let image = Image::load(wasm).map_err(DriverError::Image)?;
        let id = self
            .n
            .spawn(name, &image, contract, caps, now)
            .map_err(DriverError::Spawn)?;
        self.add(id, name, contract, now);
        Ok(id)
    }

    /// Re-creates a domain from `snapshot` of the image `wasm` (the nucleus
    /// checks the memory against its root).
    pub fn restore(
        &mut self,
        name: &str,
        wasm: &[u8],
        snapshot: Snapshot,
        now: u64,
    ) -> Result<DomainId, DriverError> {
        if self.names.contains_key(name) {
            return Err(DriverError::Duplicate(name.to_string()));
        }
        let image = Image::load(wasm).map_err(DriverError::Image)?;
        let contract = snapshot.contract;
        let id = self
            .n
            .restore(name, &image, snapshot, now)
            .map_err(DriverError::Spawn)?;
        self.add(id, name, contract, now);
        Ok(id)
    }

    fn add(&mut self, id: DomainId, name: &str, contract: Contract, now: u64) {
        self.names.insert(name.to_string(), id);
        self.doms.insert(
            id,
            DomainRecord {
                name: name.to_string(),
                contract,
                spawned_ns: now,
                first_activation_ns: None,
                real_ns: 0,
                guaranteed_ns: 0,
                extra_ns: 0,
                undelivered: 0,
                periods: PeriodLog::new(PERIOD_RECORDS),
            },
        );
    }

    /// Queues a message from the kernel for domain `name` on `channel`; if
    /// the domain answers it, the answer is kept with `tag` for
    /// [`Driver::take_answers`].
    pub fn deliver(
        &mut self,
        name: &str,
        channel: &str,
        payload: &[u8],
        tag: u64,
        now: u64,
    ) -> Result<(), DriverError> {
        let id = self.id(name)?;
        let token = self.tokens.mint(Dest::Kernel(tag, id));
        let msg = Message {
            channel: channel.to_string(),
            payload: payload.to_vec(),
            reply: Some(token),
        };
        self.n.deliver(id, msg, now).map_err(|e| {
            self.tokens.take(token.0);
            DriverError::Undeliverable(e.why())
        })
    }

    /// Queues a message from the kernel for domain `name` on `channel`, with
    /// no way to answer it (an answer is dropped as stale).
    pub fn post(
        &mut self,
        name: &str,
        channel: &str,
        payload: &[u8],
        now: u64,
    ) -> Result<(), DriverError> {
        let id = self.id(name)?;
        let msg = Message {
            channel: channel.to_string(),
            payload: payload.to_vec(),
            reply: None,
        };
        self.n
            .deliver(id, msg, now)
            .map_err(|e| DriverError::Undeliverable(e.why()))
    }

    /// Delivers `payload`, the answer to the outbound message that carried
    /// `token`, to its sender on the same channel name (as a local answer
    /// is delivered). Each token is redeemed once.
    pub fn answer(&mut self, token: u64, payload: Vec<u8>, now: u64) -> Result<(), DriverError> {
        // A token that is not an outbound message's is not ours to redeem:
        // it stays.
        let (to, channel) = match self
            .tokens
            .take_if(token, |d| matches!(d, Dest::Remote(..)))
        {
            Some(Dest::Remote(to, channel)) => (to, channel),
            _ => return Err(DriverError::StaleToken(token)),
        };
        let msg = Message {
            channel,
            payload,
            reply: None,
        };
        self.n
            .deliver(to, msg, now)
            .map_err(|e| DriverError::Undeliverable(e.why()))
    }

    /// Outbound messages ([`Config::outbound`]), oldest first: at most
    /// `max_items` of them and `max_bytes` of payload, but the oldest one in
    /// any case if `at_least_one`. The rest stay queued.
    pub fn take_outbound(
        &mut self,
        max_items: usize,
        max_bytes: usize,
        at_least_one: bool,
    ) -> Vec<Outbound> {
        let mut n = 0;
        let mut bytes = 0;
        for o in &self.outbound {
            let fits = n < max_items && bytes + o.payload.len() <= max_bytes;
            let forced = at_least_one && n == 0;
            if !(fits || forced) {
                break;
            }
            n += 1;
            bytes += o.payload.len();
        }
        self.outbound.drain(..n).collect()
    }

    /// Stops domain `name` and forgets it: its share is freed, tokens that
    /// would lead to it are dropped. Returns the tags of the kernel's
    /// messages to it that will now never be answered.
    pub fn stop(&mut self, name: &str) -> Result<Vec<u64>, DriverError> {
        let id = self.id(name)?;
        self.n.stop(id);
        self.names.remove(name);
        self.doms.remove(&id);
        let mut orphaned = Vec::new();
        self.tokens.retain(|d| {
            if d.domain() != id {
                return true;
            }
            if let Dest::Kernel(tag, _) = d {
                orphaned.push(*tag);
            }
            false
        });
        Ok(orphaned)
    }

    /// The names of the domains, with their ids.
    pub fn names(&self) -> impl Iterator<Item = (&str, DomainId)> {
        self.names.iter().map(|(n, id)| (n.as_str(), *id))
    }

    /// The runtime row of domain `id` (`mettactl ps`), as incarnation
    /// `epoch`: [`accounting::runtime_row`], as hosted lanes compute it.
    pub fn runtime(&self, id: DomainId, epoch: u64) -> Option<DomainRuntime> {
        let d = self.n.domain(id)?;
        let rec = self.doms.get(&id)?;
        let state = match d.failure() {
            Some(why) => RunState::Failed(why),
            None if self.n.scheduler().entry(id).is_some_and(|e| e.runnable) => RunState::Running,
            None => RunState::Waiting,
        };
        let stats = d.stats();
        let counters = Counters {
            cpu_ns: stats.cpu_ns,
            activations: stats.activations,
            memory_bytes: d.memory().len() as u64,
            undelivered: rec.undelivered,
            spawned_ns: rec.spawned_ns,
            first_activation_ns: rec.first_activation_ns,
        };
        let figures = rec.periods.figures(rec.contract.slice_ns);
        Some(accounting::runtime_row(
            &rec.name, epoch, state, &counters, figures,
        ))
    }

    /// Answers to the kernel's messages since the last call: `(tag, bytes)`.
    pub fn take_answers(&mut self) -> Vec<(u64, Vec<u8>)> {
        core::mem::take(&mut self.answers)
    }

    /// Log lines since the last call, and how many were dropped because the
    /// queue was full.
    pub fn take_lines(&mut self) -> (Vec<Line>, u64) {
        let dropped = core::mem::take(&mut self.lines_dropped);
        (self.lines.drain(..).collect(), dropped)
    }

    /// One turn of the activation loop: `clock()` gives the time (ns,
    /// monotonic); see the module docs.
    pub fn poll(&mut self, clock: &mut dyn FnMut() -> u64) -> Poll {
        let now = clock();
        match self.n.step(now) {
            Step::Ran {
                domain,
                why,
                activation,
                charged_ns,
                ..
            } => {
                let end = clock().max(now);
                self.account(domain, why, now, end - now, charged_ns);
                if let Some(st) = self.doms.get_mut(&domain) {
                    if st.first_activation_ns.is_none()
                        && !matches!(activation.outcome, Outcome::Trapped(_))
                    {
                        st.first_activation_ns = Some(end);
                    }
                }
                self.recalibrate(activation.fuel_used, end - now);
                // Logs first: the domain's lines come before the driver's
                // notes about the messages it sent.
                self.collect_logs();
                self.route(end);
                Poll::Ran {
                    domain,
                    why,
                    start_ns: now,
                    end_ns: end,
                    charged_ns,
                    outcome: activation.outcome,
                }
            }
            Step::Idle { until } => {
                self.collect_logs();
                if self.route(now) > 0 {
                    return Poll::Idle { until: Some(now) };
                }
                Poll::Idle { until }
            }
        }
    }

    /// Folds one activation's measured fuel/ns into the rate.
    fn recalibrate(&mut self, fuel: u64, real_ns: u64) {
        if !self.cfg.recalibrate || real_ns < RECAL_MIN_NS || fuel == 0 {
            return;
        }
        let sample = rate_per_scale(fuel, real_ns);
        self.ewma_rate = ewma_rate(self.ewma_rate, sample, self.base_rate);
        self.n
            .set_fuel_rate(FuelRate::new(self.ewma_rate, RATE_SCALE_NS));
    }

    /// Per-period accounting of one activation that started at `start`.
    fn account(&mut self, id: DomainId, why: Why, start: u64, real: u64, charged: u64) {
        let entry = self.n.scheduler().entry(id).copied();
        let Some(st) = self.doms.get_mut(&id) else {
            return;
        };
        st.real_ns += real;
        match why {
            Why::Guaranteed => st.guaranteed_ns += charged,
            Why::Extra => st.extra_ns += charged,
        }
        // A domain that trapped has left the scheduler: no period to book.
        if let Some(e) = entry {
            let period = e.contract.period_ns;
            st.periods
                .book(e.period_start, period, start, real, charged, why);
        }
    }

    /// Routes every outgoing message; returns how many were delivered.
    fn route(&mut self, now: u64) -> usize {
        let mut delivered = 0;
        for out in self.n.take_outbox() {
            let Outgoing {
                from,
                channel,
                payload,
                reply,
            } = out;
            match reply {
                Some(ReplyToken(t)) => match self.tokens.take(t) {
                    Some(Dest::Kernel(tag, _)) => self.answers.push((tag, payload)),
                    // (A domain only answers tokens it was given: a remote
                    // one never reaches a local domain.)
                    Some(Dest::Domain(to, ch) | Dest::Remote(to, ch)) => {
                        let msg = Message {
                            channel: ch,
                            payload,
                            reply: None,
                        };
                        match self.n.deliver(to, msg, now) {
                            Ok(()) => delivered += 1,
                            Err(e) => self.undelivered(from, &channel, e.why(), now),
                        }
                    }
                    None => self.undelivered(from, &channel, "stale reply token", now),
                },
                None => {
                    let dest = Dest::Domain(from, channel.clone());
                    match self
                        .tokens
                        .send_local(&mut self.n, from, &channel, payload, dest, now)
                    {
                        Local::Delivered(_) => delivered += 1,
                        Local::Refused(e) => self.undelivered(from, &channel, e.why(), now),
                        Local::NoRoute(payload) if self.cfg.outbound => {
                            self.queue_outbound(from, channel, payload, now)
                        }
                        Local::NoRoute(_) => self.undelivered(from, &channel, "no route", now),
                    }
                }
            }
        }
        delivered
    }

    /// Queues a message no local domain serves for the control plane.
    fn queue_outbound(&mut self, from: DomainId, channel: String, payload: Vec<u8>, now: u64) {
        let Some(name) = self.doms.get(&from).map(|st| st.name.clone()) else {
            return;
        };
        if self.outbound.len() >= MAX_OUTBOUND {
            self.undelivered(from, &channel, "outbound queue full", now);
            return;
        }
        let token = self.tokens.mint(Dest::Remote(from, channel.clone()));
        self.outbound.push_back(Outbound {
            from: name,
            channel,
            payload,
            token: token.0,
        });
    }

    fn undelivered(&mut self, from: DomainId, channel: &str, why: &str, now: u64) {
        if let Some(st) = self.doms.get_mut(&from) {
            st.undelivered += 1;
        }
        self.line(
            from,
            now,
            format!("driver: message on {channel} dropped: {why}"),
        );
    }

    fn line(&mut self, id: DomainId, at_ns: u64, text: String) {
        let domain = self
            .doms
            .get(&id)
            .map_or_else(|| id.to_string(), |st| st.name.clone());
        if self.lines.len() >= MAX_LINES {
            self.lines.pop_front();
            self.lines_dropped += 1;
        }
        self.lines.push_back(Line {
            domain,
            at_ns,
            text,
        });
    }

    fn collect_logs(&mut self) {
        for l in self.n.take_logs() {
            let text = match l.origin {
                LogOrigin::Domain => l.text,
                LogOrigin::Nucleus => format!("nucleus: {}", l.text),
            };
            self.line(l.domain, l.at_ns, text);
        }
    }
}

/// How a domain fared against its contract over the complete periods that
/// ended by `end_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContractReport {
    /// Complete periods since the first record (a period without any
    /// activation counts, as a miss).
    pub periods: u64,
    /// Of those, periods whose guaranteed (charged) time reached the asked
    /// share of the slice.
    pub met: u64,
    /// Of those, periods whose activations took at least that share of the
    /// slice in wall time (for an `extra` domain: extra time included).
    pub met_real: u64,
    /// Charged time in those periods, ns.
    pub charged_ns: u64,
    /// Guaranteed (charged) time in those periods, ns.
    pub guaranteed_ns: u64,
    /// Wall time of the activations in those periods, ns.
    pub real_ns: u64,
    /// The median activation latency over those periods, ns.
    pub p50_latency_ns: u64,
    /// The 99th percentile of the activation latency (first activation in a
    /// period minus its start) over those periods, ns.
    pub p99_latency_ns: u64,
    /// The largest such latency, ns.
    pub max_latency_ns: u64,
}

/// Reports `periods` (a domain's records) against `contract`: which complete
/// periods (ending by `end_ns`) got at least `min_ppm` of the slice as
/// guaranteed time.
pub fn contract_report(
    periods: &PeriodLog,
    contract: &Contract,
    end_ns: u64,
    min_ppm: u64,
) -> ContractReport {
    let p = contract.period_ns.max(1);
    let complete: Vec<&PeriodRecord> = periods
        .records()
        .iter()
        .filter(|r| r.start_ns.saturating_add(p) <= end_ns)
        .collect();
    let expected = match complete.first() {
        Some(first) => (end_ns - first.start_ns) / p,
        None => 0,
    };
    let met = complete
        .iter()
        .filter(|r| crate::stats::share_met(r.guaranteed_ns, contract.slice_ns, min_ppm))
        .count() as u64;
    let met_real = complete
        .iter()
        .filter(|r| crate::stats::share_met(r.cpu_ns_real, contract.slice_ns, min_ppm))
        .count() as u64;
    let mut latencies: Vec<u64> = complete.iter().map(|r| r.latency_ns).collect();
    ContractReport {
        periods: expected.max(complete.len() as u64),
        met,
        met_real,
        charged_ns: complete.iter().map(|r| r.cpu_ns_charged).sum(),
        guaranteed_ns: complete.iter().map(|r| r.guaranteed_ns).sum(),
        real_ns: complete.iter().map(|r| r.cpu_ns_real).sum(),
        p50_latency_ns: accounting::percentile(&mut latencies, 500),
        p99_latency_ns: accounting::percentile(&mut latencies, 990),
        max_latency_ns: latencies.iter().copied().max().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdomains::{self, read_le};

    fn contract(slice_ms: u64, period_ms: u64, extra: bool) -> Contract {
        Contract {
            period_ns: period_ms * 1_000_000,
            slice_ns: slice_ms * 1_000_000,
            extra,
            memory: 1 << 20,
        }
    }

    /// A fake clock that advances by what the nucleus charges (1 fuel per ns
    /// scaled: the fixed rate below), plus 1 µs per reading.
    struct Clock(u64);

    fn driver() -> Driver {
        Driver::new(
            Config {
                recalibrate: false,
                ..Config::default()
            },
            // 0.01 fuel/ns: a 1 ms quantum is 10,000 fuel.
            FuelRate::new(1, 100),
        )
    }

    /// Polls until `t` ns, jumping over idle time.
    fn run(d: &mut Driver, clock: &mut Clock, until: u64) {
        while clock.0 < until {
            let mut c = || {
                clock.0 += 1_000;
                clock.0
            };
            match d.poll(&mut c) {
                Poll::Ran { charged_ns, .. } => clock.0 += charged_ns,
                Poll::Idle { until: Some(t) } => clock.0 = clock.0.max(t),
                Poll::Idle { until: None } => clock.0 = until,
            }
        }
    }

    fn caps(prefixes: &[&str]) -> Caps {
        Caps::with_channels(prefixes.iter().copied())
    }

    #[test]
    fn contract_reports_count_missing_periods() {
        let c = contract(2, 10, false);
        let rec = |start_ms: u64, got_us: u64, lat_us: u64| PeriodRecord {
            start_ns: start_ms * 1_000_000,
            latency_ns: lat_us * 1_000,
            activations: 1,
            cpu_ns_real: got_us * 1_000,
            cpu_ns_charged: got_us * 1_000,
            guaranteed_ns: got_us * 1_000,
        };
        // Periods at 0, 10, (20 missing), 30; 40 is still running at 45 ms.
        let p = PeriodLog::with_records(
            PERIOD_RECORDS,
            [
                rec(0, 2_000, 5),
                rec(10, 1_700, 50),
                rec(30, 1_900, 10),
                rec(40, 100, 1),
            ],
        );
        let r = contract_report(&p, &c, 45_000_000, 900_000);
        assert_eq!(r.periods, 4);
        assert_eq!(r.met, 2);
        assert_eq!(r.met_real, 2);
        assert_eq!(r.guaranteed_ns, 5_600_000);
        assert_eq!(r.charged_ns, 5_600_000);
        assert_eq!(r.p50_latency_ns, 10_000);
        assert_eq!(r.p99_latency_ns, 50_000);
        assert_eq!(r.max_latency_ns, 50_000);
        let r = contract_report(&PeriodLog::default(), &c, 45_000_000, 900_000);
        assert_eq!((r.periods, r.met, r.p99_latency_ns), (0, 0, 0));
    }

    #[test]
    fn counter_and_client_round_trip_and_answers_reach_the_kernel() {
        let mut d = driver();
        let mut clock = Clock(0);
        let svc = caps(&["/svc/counter"]);
        d.spawn(
            "counter",
            testdomains::COUNTER,
            contract(1, 10, false),
            svc.clone(),
            0,
        )
        .unwrap();
        assert!(matches!(
            d.spawn(
                "counter",
                testdomains::COUNTER,
                contract(1, 10, false),
                svc.clone(),
                0
            ),
            Err(DriverError::Duplicate(_))
        ));
        d.spawn(
            "client",
            testdomains::CLIENT,
            contract(1, 10, false),
            svc,
            0,
        )
        .unwrap();
        run(&mut d, &mut clock, 2_000_000_000);
        let client = d.id("client").unwrap();
        let mem = d.nucleus().domain(client).unwrap().memory();
        assert_eq!(
            read_le::<4>(mem, testdomains::CLIENT_ANSWERS_AT),
            u64::from(testdomains::CLIENT_ROUNDS)
        );
        assert_eq!(read_le::<8>(mem, testdomains::CLIENT_LAST_AT), 100);
        let (lines, dropped) = d.take_lines();
        assert_eq!(dropped, 0);
        let texts: Vec<String> = lines
            .iter()
            .map(|l| format!("{}: {}", l.domain, l.text))
            .collect();
        assert!(
            texts.contains(&"counter: counter: up".to_string()),
            "{texts:?}"
        );
        assert!(
            texts.contains(&"client: client: 100 round trips".to_string()),
            "{texts:?}"
        );
        // The kernel's own request, answered with the count.
        d.deliver("counter", "/svc/counter", b"incr", 7, clock.0)
            .unwrap();
        let until = clock.0 + 50_000_000;
        run(&mut d, &mut clock, until);
        assert_eq!(d.take_answers(), [(7, 101u64.to_le_bytes().to_vec())]);
        assert!(matches!(
            d.deliver("nobody", "/x", b"", 1, clock.0),
            Err(DriverError::NoSuchDomain(_))
        ));
    }

    #[test]
    fn a_message_without_a_route_is_dropped_and_noted() {
        let mut d = driver();
        let mut clock = Clock(0);
        // The client alone: nobody serves /svc/counter.
        d.spawn(
            "client",
            testdomains::CLIENT,
            contract(1, 10, false),
            caps(&["/svc/counter"]),
            0,
        )
        .unwrap();
        run(&mut d, &mut clock, 50_000_000);
        let (lines, _) = d.take_lines();
        assert!(lines.iter().any(|l| l.domain == "client"
            && l.text == "driver: message on /svc/counter dropped: no route"));
        let id = d.id("client").unwrap();
        assert_eq!(d.record(id).unwrap().undelivered, 1);
    }

    #[test]
    fn without_a_local_route_messages_go_outbound_and_answers_come_back() {
        let mut d = Driver::new(
            Config {
                recalibrate: false,
                outbound: true,
                ..Config::default()
            },
            FuelRate::new(1, 100),
        );
        let mut clock = Clock(0);
        d.spawn(
            "client",
            testdomains::CLIENT,
            contract(1, 10, false),
            caps(&["/svc/counter"]),
            0,
        )
        .unwrap();
        let id = d.id("client").unwrap();
        // Three round trips through "the control plane" (this test).
        for round in 1..=3u64 {
            let until = clock.0 + 30_000_000;
            run(&mut d, &mut clock, until);
            let out = d.take_outbound(usize::MAX, usize::MAX, false);
            assert_eq!(out.len(), 1, "round {round}: {out:?}");
            let o = &out[0];
            assert_eq!(
                (o.from.as_str(), o.channel.as_str(), o.payload.as_slice()),
                ("client", "/svc/counter", &b"incr"[..])
            );
            d.answer(o.token, (round * 10).to_le_bytes().to_vec(), clock.0)
                .unwrap();
            // A token is redeemed once.
            assert_eq!(
                d.answer(o.token, vec![], clock.0),
                Err(DriverError::StaleToken(o.token))
            );
        }
        let until = clock.0 + 30_000_000;
        run(&mut d, &mut clock, until);
        let mem = d.nucleus().domain(id).unwrap().memory();
        assert_eq!(read_le::<4>(mem, testdomains::CLIENT_ANSWERS_AT), 3);
        assert_eq!(read_le::<8>(mem, testdomains::CLIENT_LAST_AT), 30);
        assert_eq!(
            d.take_outbound(usize::MAX, usize::MAX, false).len(),
            1,
            "the fourth request"
        );
        assert_eq!(d.record(id).unwrap().undelivered, 0);
        let (lines, _) = d.take_lines();
        assert!(
            !lines.iter().any(|l| l.text.contains("dropped")),
            "{lines:?}"
        );
        // A kernel tag's token cannot be redeemed as an outbound answer.
        d.deliver("client", "/svc/counter", b"", 5, clock.0)
            .unwrap();
        let kernel_token = d
            .tokens
            .iter()
            .find_map(|(t, dest)| matches!(dest, Dest::Kernel(5, _)).then_some(t))
            .unwrap();
        assert_eq!(
            d.answer(kernel_token, vec![], clock.0),
            Err(DriverError::StaleToken(kernel_token))
        );
        assert_eq!(d.tokens.len(), 2, "the kernel's token stays");
    }

    #[test]
    fn the_outbound_queue_is_bounded() {
        let mut d = Driver::new(
            Config {
                recalibrate: false,
                outbound: true,
                ..Config::default()
            },
            FuelRate::new(1, 100),
        );
        d.spawn(
            "client",
            testdomains::CLIENT,
            contract(1, 10, false),
            caps(&["/svc/counter"]),
            0,
        )
        .unwrap();
        let id = d.id("client").unwrap();
        for i in 0..MAX_OUTBOUND + 2 {
            d.queue_outbound(id, "/x".into(), vec![i as u8], 0);
        }
        assert!(d.take_outbound(0, 0, false).is_empty());
        let first = d.take_outbound(0, 0, true);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].payload, [0]);
        assert_eq!(d.take_outbound(10, 2, false).len(), 2);
        assert_eq!(d.take_outbound(3, 100, false).len(), 3);
        assert_eq!(
            d.take_outbound(usize::MAX, usize::MAX, false).len(),
            MAX_OUTBOUND - 6
        );
        assert_eq!(d.record(id).unwrap().undelivered, 2);
        let (lines, _) = d.take_lines();
        assert_eq!(
            lines.last().unwrap().text,
            "driver: message on /x dropped: outbound queue full"
        );
    }

    #[test]
    fn stopping_a_domain_frees_its_share_and_forgets_its_tokens() {
        let mut d = driver();
        let mut clock = Clock(0);
        let svc = caps(&["/svc/counter"]);
        d.spawn(
            "counter",
            testdomains::COUNTER,
            contract(5, 10, false),
            svc.clone(),
            0,
        )
        .unwrap();
        // 50 % + 50 % does not fit in 90 %.
        assert!(matches!(
            d.spawn(
                "other",
                testdomains::COUNTER,
                contract(5, 10, false),
                svc.clone(),
                0
            ),
            Err(DriverError::Spawn(SpawnError::Admission(_)))
        ));
        d.deliver("counter", "/svc/counter", b"incr", 1, 0).unwrap();
        d.deliver("counter", "/svc/counter", b"incr", 2, 0).unwrap();
        assert_eq!(d.stop("counter").unwrap(), [1, 2]);
        assert!(d.tokens.is_empty());
        assert!(matches!(
            d.stop("counter"),
            Err(DriverError::NoSuchDomain(_))
        ));
        assert!(d.record(DomainId(0)).is_none());
        assert_eq!(d.names().count(), 0);
        // Its share is free again; a new incarnation under the same name
        // starts from scratch.
        d.spawn(
            "counter",
            testdomains::COUNTER,
            contract(5, 10, false),
            svc,
            clock.0,
        )
        .unwrap();
        d.post("counter", "/svc/counter", b"incr", clock.0).unwrap();
        d.deliver("counter", "/svc/counter", b"incr", 3, clock.0)
            .unwrap();
        run(&mut d, &mut clock, 50_000_000);
        // The posted message was counted; it had no token to answer.
        assert_eq!(d.take_answers(), [(3, 2u64.to_le_bytes().to_vec())]);
    }

    #[test]
    fn the_driver_reports_the_first_activation_and_live_rows() {
        let mut d = driver();
        let mut clock = Clock(1_000_000);
        d.spawn(
            "steady",
            testdomains::STEADY,
            contract(2, 10, false),
            Caps::none(),
            clock.0,
        )
        .unwrap();
        let id = d.id("steady").unwrap();
        assert_eq!(d.runtime(id, 1).unwrap().state, "starting");
        run(&mut d, &mut clock, 200_000_000);
        let rec = d.record(id).unwrap();
        let first = rec.first_activation_ns.unwrap();
        assert!(first > rec.spawned_ns);
        let row = d.runtime(id, 1).unwrap();
        assert!(
            matches!(row.state.as_str(), "running" | "waiting"),
            "{row:?}"
        );
        assert_eq!(row.start_us, Some((first - rec.spawned_ns) / 1_000));
        assert!(row.periods >= 15, "{row:?}");
        assert!(row.delivered_ppm.unwrap() >= 900_000, "{row:?}");
        assert!(d.runtime(DomainId(99), 1).is_none());
    }

    #[test]
    fn steady_domain_gets_its_slice_and_a_trap_stays_local() {
        let mut d = driver();
        let mut clock = Clock(0);
        d.spawn(
            "steady",
            testdomains::STEADY,
            contract(2, 10, false),
            Caps::none(),
            0,
        )
        .unwrap();
        d.spawn(
            "greedy",
            testdomains::SPIN,
            contract(1, 10, true),
            Caps::none(),
            0,
        )
        .unwrap();
        d.spawn(
            "trap",
            testdomains::TRAP,
            contract(1, 10, false),
            Caps::with_channels::<_, &str>([]),
            0,
        )
        .unwrap();
        run(&mut d, &mut clock, 500_000_000);
        let steady = d.id("steady").unwrap();
        let rec = d.record(steady).unwrap();
        let r = contract_report(&rec.periods, &rec.contract, clock.0, 900_000);
        assert!(r.periods >= 45, "{r:?}");
        assert_eq!(r.met, r.periods, "{r:?}");
        assert!(r.p99_latency_ns < 10_000_000, "{r:?}");
        let trap = d.id("trap").unwrap();
        assert!(d.nucleus().domain(trap).unwrap().failure().is_some());
        let (lines, _) = d.take_lines();
        assert!(lines
            .iter()
            .any(|l| l.domain == "trap" && l.text.starts_with("nucleus: trapped: ")));
        let greedy = d.id("greedy").unwrap();
        assert!(
            d.record(greedy).unwrap().extra_ns > 0,
            "spare time goes to the extra domain"
        );
    }

    #[test]
    fn snapshot_and_restore_continue_the_count() {
        let mut d = driver();
        let mut clock = Clock(0);
        let svc = caps(&["/svc/counter"]);
        d.spawn(
            "counter",
            testdomains::COUNTER,
            contract(1, 10, false),
            svc,
            0,
        )
        .unwrap();
        for i in 0..5 {
            d.deliver("counter", "/svc/counter", b"incr", i, 0).unwrap();
        }
        run(&mut d, &mut clock, 50_000_000);
        assert_eq!(d.take_answers().len(), 5);
        let id = d.id("counter").unwrap();
        let snap = d.nucleus().snapshot(id).unwrap().unwrap();
        let root = snap.memory_root;
        let mut e = driver();
        let rid = e
            .restore("counter", testdomains::COUNTER, snap, clock.0)
            .unwrap();
        assert_eq!(
            metta_nucleus::memory_root(e.nucleus().domain(rid).unwrap().memory()),
            root
        );
        e.deliver("counter", "/svc/counter", b"incr", 9, clock.0)
            .unwrap();
        let until = clock.0 + 50_000_000;
        run(&mut e, &mut clock, until);
        assert_eq!(e.take_answers(), [(9, 6u64.to_le_bytes().to_vec())]);
    }

    #[test]
    fn recalibration_follows_the_measured_rate() {
        let mut d = Driver::new(Config::default(), FuelRate::new(1_000_000, RATE_SCALE_NS));
        assert_eq!(d.rate_per_scale(), 1_000_000);
        // Too short to count.
        d.recalibrate(10, 1_000);
        assert_eq!(d.rate_per_scale(), 1_000_000);
        d.recalibrate(2_000_000, 1_000_000);
        assert_eq!(d.rate_per_scale(), 1_250_000);
        assert_eq!(
            d.nucleus().fuel_rate(),
            FuelRate::new(1_250_000, RATE_SCALE_NS)
        );
    }
}
