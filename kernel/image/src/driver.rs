//! The native driver of the nucleus, without the clock: the bare-metal twin
//! of `control/src/hosted.rs`, much smaller. The binary (`src/native.rs`)
//! owns the clock (the TSC), idles the CPU and prints; everything else is
//! here and host-tested with a fake clock.
//!
//! - **Activation loop**: [`Driver::poll`] reads the clock it is given, calls
//!   [`Nucleus::step`], and after a run notes the wall time it took
//!   (per-period records: latency of the first activation in a period, real
//!   and charged CPU, guaranteed share), folds the measured fuel/ns into the
//!   fuel rate (an EWMA, as hosted: weight ¼, samples from activations of at
//!   least [`RECAL_MIN_NS`], clamped to ¼–4× the start-up rate), collects the
//!   logs and routes the outbox. When the nucleus is idle it says until when
//!   ([`Poll::Idle`]); the caller halts the CPU until then.
//! - **Routing** between local domains, as hosted: a message sent on a name
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
//!   shows, computed as `control/src/domains.rs` does for hosted lanes.
//! - **Logs**: every domain line and nucleus record is queued with the
//!   domain's name ([`Driver::take_lines`]), at most [`MAX_LINES`] (older
//!   lines are dropped and counted).

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use metta_nucleus::{
    Caps, DomainId, FuelRate, Image, LoadError, LogOrigin, Message, Nucleus, Outcome, Outgoing,
    ReplyToken, Snapshot, SpawnError, Step, Undeliverable, Why,
};
use metta_proto::{Contract, DomainRuntime};

use crate::stats::{ewma_rate, rate_per_scale, RATE_SCALE_NS};

/// Activations shorter than this (wall time) are not used to recalibrate:
/// their time is mostly call overhead, not fuel.
pub const RECAL_MIN_NS: u64 = 100_000;
/// Outstanding reply tokens kept; beyond this the oldest are forgotten.
pub const MAX_TOKENS: usize = 65_536;
/// Per-period records kept per domain.
pub const PERIOD_RECORDS: usize = 1_024;
/// Log lines queued for the console before the oldest are dropped.
pub const MAX_LINES: usize = 4_096;
/// Outbound messages ([`Config::outbound`]) queued before new ones are
/// dropped (and noted in the sender's log).
pub const MAX_OUTBOUND: usize = 1_024;
/// Complete periods `delivered_ppm` is computed over (as hosted's
/// `DELIVERY_WINDOW`).
pub const DELIVERY_WINDOW: usize = 10;

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

/// One period of one domain, as observed by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeriodRecord {
    /// Start of the scheduler period, ns.
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
    pub periods: VecDeque<PeriodRecord>,
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
    tokens: BTreeMap<u64, Dest>,
    next_token: u64,
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
            tokens: BTreeMap::new(),
            next_token: 1,
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
                periods: VecDeque::new(),
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
        let token = self.mint(Dest::Kernel(tag, id));
        let msg = Message {
            channel: channel.to_string(),
            payload: payload.to_vec(),
            reply: Some(token),
        };
        self.n.deliver(id, msg, now).map_err(|e| {
            self.tokens.remove(&token.0);
            DriverError::Undeliverable(undeliverable_why(&e))
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
            .map_err(|e| DriverError::Undeliverable(undeliverable_why(&e)))
    }

    /// Delivers `payload`, the answer to the outbound message that carried
    /// `token`, to its sender on the same channel name (as a local answer
    /// is delivered). Each token is redeemed once.
    pub fn answer(&mut self, token: u64, payload: Vec<u8>, now: u64) -> Result<(), DriverError> {
        let (to, channel) = match self.tokens.remove(&token) {
            Some(Dest::Remote(to, channel)) => (to, channel),
            Some(other) => {
                // Not ours to redeem: put it back.
                self.tokens.insert(token, other);
                return Err(DriverError::StaleToken(token));
            }
            None => return Err(DriverError::StaleToken(token)),
        };
        let msg = Message {
            channel,
            payload,
            reply: None,
        };
        self.n
            .deliver(to, msg, now)
            .map_err(|e| DriverError::Undeliverable(undeliverable_why(&e)))
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
        self.tokens.retain(|_, d| {
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
    /// `epoch`; see [`runtime_row`].
    pub fn runtime(&self, id: DomainId, epoch: u64) -> Option<DomainRuntime> {
        let d = self.n.domain(id)?;
        let rec = self.doms.get(&id)?;
        let state = match d.failure() {
            Some(why) => RunState::Failed(why),
            None if self.n.scheduler().entry(id).is_some_and(|e| e.runnable) => RunState::Running,
            None => RunState::Waiting,
        };
        Some(runtime_row(
            rec,
            epoch,
            state,
            d.stats(),
            d.memory().len() as u64,
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
        let Some(e) = entry else {
            return;
        };
        let ps = period_of_run(e.period_start, e.contract.period_ns, start);
        let guaranteed = if why == Why::Guaranteed { charged } else { 0 };
        match st.periods.back_mut() {
            Some(r) if r.start_ns == ps => {
                r.activations += 1;
                r.cpu_ns_real += real;
                r.cpu_ns_charged += charged;
                r.guaranteed_ns += guaranteed;
            }
            _ => {
                if st.periods.len() >= PERIOD_RECORDS {
                    st.periods.pop_front();
                }
                st.periods.push_back(PeriodRecord {
                    start_ns: ps,
                    latency_ns: start.saturating_sub(ps),
                    activations: 1,
                    cpu_ns_real: real,
                    cpu_ns_charged: charged,
                    guaranteed_ns: guaranteed,
                });
            }
        }
    }

    fn mint(&mut self, dest: Dest) -> ReplyToken {
        if self.tokens.len() >= MAX_TOKENS {
            self.tokens.pop_first();
        }
        let t = self.next_token;
        self.next_token += 1;
        self.tokens.insert(t, dest);
        ReplyToken(t)
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
                Some(ReplyToken(t)) => match self.tokens.remove(&t) {
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
                            Err(e) => self.undelivered(from, &channel, undeliverable_why(&e), now),
                        }
                    }
                    None => self.undelivered(from, &channel, "stale reply token", now),
                },
                None => {
                    let candidates = self
                        .n
                        .domains()
                        .map(|(id, d)| (id, d.caps(), d.failure().is_none()));
                    match route_to(from, &channel, candidates) {
                        Some(to) => {
                            let token = self.mint(Dest::Domain(from, channel.clone()));
                            let msg = Message {
                                channel: channel.clone(),
                                payload,
                                reply: Some(token),
                            };
                            match self.n.deliver(to, msg, now) {
                                Ok(()) => delivered += 1,
                                Err(e) => {
                                    self.tokens.remove(&token.0);
                                    self.undelivered(from, &channel, undeliverable_why(&e), now);
                                }
                            }
                        }
                        None if self.cfg.outbound => {
                            self.queue_outbound(from, channel, payload, now)
                        }
                        None => self.undelivered(from, &channel, "no route", now),
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
        let token = self.mint(Dest::Remote(from, channel.clone()));
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

/// Why a message could not be queued.
fn undeliverable_why(e: &Undeliverable) -> &'static str {
    match e {
        Undeliverable::Full(_) => "inbox full",
        Undeliverable::TooBig(_) => "too big",
        Undeliverable::Failed(_) => "receiver failed",
        Undeliverable::NoSuchDomain(_) => "no receiver",
    }
}

/// The domain that serves `channel` for a message from `from`, among
/// `candidates` (`(id, capabilities, alive)`): the other live domain whose
/// channel capability covers the name with the longest prefix; among equals
/// the lowest id. (The nucleus does not say which names a domain has opened,
/// so the capability is what says it may serve the name.)
pub fn route_to<'a>(
    from: DomainId,
    channel: &str,
    candidates: impl Iterator<Item = (DomainId, &'a Caps, bool)>,
) -> Option<DomainId> {
    candidates
        .filter(|&(id, _, alive)| id != from && alive)
        .filter_map(|(id, caps, _)| {
            let best = caps
                .channels
                .iter()
                .filter(|p| Caps::with_channels([p.as_str()]).may_open(channel))
                .map(String::len)
                .max()?;
            Some((best, id))
        })
        .max_by_key(|&(len, id)| (len, core::cmp::Reverse(id)))
        .map(|(_, id)| id)
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

/// The `mettactl ps` row of a domain, computed as `control/src/domains.rs`
/// does for a hosted lane: CPU delivered over the last
/// [`DELIVERY_WINDOW`] complete periods as ppm of the slice; the 5th
/// percentile of the charged and the wall-clock share per period and the
/// 99th of the activation latency over all complete periods kept (the
/// last record is the period under way and is left out); `starting` until
/// the first activation has ended.
pub fn runtime_row(
    rec: &DomainRecord,
    epoch: u64,
    state: RunState<'_>,
    stats: &metta_nucleus::Stats,
    memory_bytes: u64,
) -> DomainRuntime {
    let slice = rec.contract.slice_ns;
    let complete: Vec<&PeriodRecord> = rec.periods.iter().rev().skip(1).collect();
    let window = &complete[..complete.len().min(DELIVERY_WINDOW)];
    let delivered_ppm = (!window.is_empty() && slice > 0).then(|| {
        let used: u64 = window.iter().map(|p| p.cpu_ns_charged).sum();
        crate::stats::ppm(used, slice * window.len() as u64)
    });
    let share = |ns: u64| crate::stats::ppm(ns, slice.max(1));
    let p = |mut v: Vec<u64>, permille: u64| {
        (!v.is_empty()).then(|| crate::stats::percentile(&mut v, permille))
    };
    let shares = complete.iter().map(|r| share(r.cpu_ns_charged)).collect();
    let real = complete.iter().map(|r| share(r.cpu_ns_real)).collect();
    let latencies = complete
        .iter()
        .filter(|r| r.activations > 0)
        .map(|r| r.latency_ns / 1_000)
        .collect();
    let state = match state {
        RunState::Failed(why) => format!("failed: {why}"),
        _ if rec.first_activation_ns.is_none() => "starting".to_string(),
        RunState::Running => "running".to_string(),
        RunState::Waiting => "waiting".to_string(),
    };
    DomainRuntime {
        name: rec.name.clone(),
        epoch,
        state,
        cpu_ns: stats.cpu_ns,
        delivered_ppm,
        activations: stats.activations,
        memory_bytes,
        start_us: rec
            .first_activation_ns
            .map(|f| f.saturating_sub(rec.spawned_ns) / 1_000),
        periods: complete.len() as u32,
        delivered_p5_ppm: p(shares, 50),
        real_p5_ppm: p(real, 50),
        latency_p99_us: p(latencies, 990),
        undelivered: rec.undelivered,
    }
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
    periods: &VecDeque<PeriodRecord>,
    contract: &Contract,
    end_ns: u64,
    min_ppm: u64,
) -> ContractReport {
    let p = contract.period_ns.max(1);
    let complete: Vec<&PeriodRecord> = periods
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
        p50_latency_ns: crate::stats::percentile(&mut latencies, 500),
        p99_latency_ns: crate::stats::percentile(&mut latencies, 990),
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
    fn routes_by_longest_prefix_to_another_live_domain() {
        let a = caps(&["/svc"]);
        let b = caps(&["/svc/counter"]);
        let c = caps(&["/"]);
        let all = || {
            [
                (DomainId(1), &a, true),
                (DomainId(2), &b, true),
                (DomainId(3), &c, true),
            ]
            .into_iter()
        };
        assert_eq!(
            route_to(DomainId(9), "/svc/counter", all()),
            Some(DomainId(2))
        );
        // Never to the sender itself.
        assert_eq!(
            route_to(DomainId(2), "/svc/counter", all()),
            Some(DomainId(1))
        );
        assert_eq!(
            route_to(DomainId(9), "/svc/other", all()),
            Some(DomainId(1))
        );
        assert_eq!(route_to(DomainId(9), "/tmp", all()), Some(DomainId(3)));
        // Segment boundaries; failed domains; ties go to the lowest id.
        assert_eq!(
            route_to(DomainId(9), "/svcx", [(DomainId(1), &a, true)].into_iter()),
            None
        );
        assert_eq!(
            route_to(
                DomainId(9),
                "/svc/counter",
                [(DomainId(2), &b, false)].into_iter()
            ),
            None
        );
        let b2 = b.clone();
        let tie = [(DomainId(5), &b2, true), (DomainId(4), &b, true)];
        assert_eq!(
            route_to(DomainId(9), "/svc/counter", tie.into_iter()),
            Some(DomainId(4))
        );
    }

    #[test]
    fn periods_of_runs() {
        assert_eq!(period_of_run(100, 10, 105), 100);
        assert_eq!(period_of_run(110, 10, 105), 100);
        assert_eq!(period_of_run(130, 10, 105), 100);
        assert_eq!(period_of_run(0, 0, 5), 0);
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
        let p: VecDeque<_> = [
            rec(0, 2_000, 5),
            rec(10, 1_700, 50),
            rec(30, 1_900, 10),
            rec(40, 100, 1),
        ]
        .into();
        let r = contract_report(&p, &c, 45_000_000, 900_000);
        assert_eq!(r.periods, 4);
        assert_eq!(r.met, 2);
        assert_eq!(r.met_real, 2);
        assert_eq!(r.guaranteed_ns, 5_600_000);
        assert_eq!(r.charged_ns, 5_600_000);
        assert_eq!(r.p50_latency_ns, 10_000);
        assert_eq!(r.p99_latency_ns, 50_000);
        assert_eq!(r.max_latency_ns, 50_000);
        let r = contract_report(&VecDeque::new(), &c, 45_000_000, 900_000);
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
        let kernel_token = d.next_token - 1;
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
    fn runtime_rows_as_hosted_computes_them() {
        let c = contract(2, 10, false);
        let rec = |start_ms: u64, got_us: u64, real_us: u64, lat_us: u64| PeriodRecord {
            start_ns: start_ms * 1_000_000,
            latency_ns: lat_us * 1_000,
            activations: 1,
            cpu_ns_real: real_us * 1_000,
            cpu_ns_charged: got_us * 1_000,
            guaranteed_ns: got_us * 1_000,
        };
        // 12 complete periods, then the one under way (left out).
        let mut periods: VecDeque<PeriodRecord> = (0..12)
            .map(|i| rec(i * 10, if i == 0 { 1_000 } else { 2_000 }, 1_900, 10 + i))
            .collect();
        periods.push_back(rec(120, 100, 100, 999_999));
        let r = DomainRecord {
            name: "c1".into(),
            contract: c,
            spawned_ns: 5_000_000,
            first_activation_ns: Some(5_250_000),
            real_ns: 0,
            guaranteed_ns: 0,
            extra_ns: 0,
            undelivered: 4,
            periods,
        };
        let stats = metta_nucleus::Stats {
            activations: 13,
            cpu_ns: 23_100_000,
            ..Default::default()
        };
        let row = runtime_row(&r, 3, RunState::Waiting, &stats, 65_536);
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
        assert_eq!(
            runtime_row(&r, 3, RunState::Failed("boom"), &stats, 0).state,
            "failed: boom"
        );
        assert_eq!(
            runtime_row(&r, 3, RunState::Running, &stats, 0).state,
            "running"
        );
        let fresh = DomainRecord {
            first_activation_ns: None,
            periods: VecDeque::new(),
            ..r
        };
        let row = runtime_row(&fresh, 1, RunState::Running, &Default::default(), 0);
        assert_eq!(row.state, "starting");
        assert_eq!(
            (
                row.delivered_ppm,
                row.start_us,
                row.periods,
                row.latency_p99_us
            ),
            (None, None, 0, None)
        );
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
