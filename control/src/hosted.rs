//! The hosted driver of the nucleus: one [`Nucleus`] on a dedicated OS
//! thread (the *activation loop*), behind a thread-safe handle.
//!
//! The nucleus is pure and clock-free; this driver is where the clock is
//! read. The loop:
//!
//! 1. handles pending commands (spawn, deliver, stats, ...);
//! 2. reads the monotonic clock (`Instant`, ns since the driver started) and
//!    calls [`Nucleus::step`];
//! 3. after a run: routes the outbox, collects logs, records per-period
//!    accounting (real and charged CPU, first activation in the period);
//! 4. when the nucleus is idle: blocks on the command channel until the
//!    wake-up time it gave (`recv_timeout`), or indefinitely if it gave none.
//!
//! **Calibration**, in two parts:
//!
//! 1. at start the driver runs a fuel-bound spin loop (a small wasm domain,
//!    the same loop as `kernel/nucleus/examples/activation.rs`) five times
//!    with [`CALIBRATION_FUEL`] units of fuel (after one warm-up run), times
//!    each run, and uses the median fuel/ns as the initial [`FuelRate`]
//!    (fixed point: fuel per 1,000,000 ns);
//! 2. with [`HostedConfig::recalibrate`] (the default) it then tracks the
//!    rate: after every activation of at least [`RECAL_MIN_NS`] wall time it
//!    takes the sample `fuel_used / wall ns`, clamps it to ¼–4× the start-up
//!    rate, folds it into an EWMA (weight [`RECAL_ALPHA`]) and sets the
//!    nucleus's rate to the EWMA. Why: on a virtual machine the fuel/ns of
//!    the same loop was seen to vary by 2× from one 100 ms to the next (host
//!    contention), and a fixed rate then turns a 10 ms slice into anything
//!    from 6 to 20 ms of real CPU. The cost: one rate for all domains (a
//!    domain whose code burns fuel slower than the mix is charged a little
//!    more than it ran, and the reverse), and preemption of the activation
//!    thread by the host OS counts as the domain's time (so pin the thread's
//!    process to a CPU, as `examples/crosstalk.rs` does).
//!
//! The driver reports both the charged time
//! ([`DomainStats::cpu_ns_delivered`]) and the wall time the activations took
//! ([`DomainStats::cpu_ns_real`]), so drift is visible.
//!
//! **Routing.** Messages are routed between local domains by channel name. A
//! message a domain sends on a name (no reply token) goes to the *other*
//! domain whose capabilities cover that name with the longest prefix (ties:
//! the lowest id) — the nucleus does not expose which names a domain has
//! opened, so the capability is what says it may serve the name. The driver
//! mints a [`ReplyToken`] for the receiver; an answer sent on a `reply_to`
//! handle comes back out carrying that token and is delivered to the
//! original sender on the same channel name (without a token). Messages from
//! outside ([`HostedNucleus::deliver`], [`HostedNucleus::request`]) carry
//! tokens that route answers back to the caller (or drop them for
//! `deliver`). A message with no route, or to a full inbox, is dropped and
//! noted in the sender's log.

use std::collections::{BTreeMap, VecDeque};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metta_nucleus::{
    Caps, DomainId, FuelRate, Image, LogOrigin, Message, Nucleus, Outgoing, ReplyToken, Step, Why,
};
use metta_proto::Contract;

/// Fuel per calibration run.
pub const CALIBRATION_FUEL: u64 = 20_000_000;
/// Weight of a new sample in the fuel-rate EWMA.
pub const RECAL_ALPHA: f64 = 0.25;
/// Activations shorter than this (wall time) are not used to recalibrate:
/// their time is dominated by call overhead, not fuel.
pub const RECAL_MIN_NS: u64 = 100_000;
/// Stack of the activation thread.
const ACTIVATION_STACK: usize = 32 << 20;
/// Outstanding reply tokens kept; beyond this the oldest are forgotten.
const MAX_TOKENS: usize = 65_536;

/// Driver settings.
///
/// Build the driver with optimisation (`--release`): wasmi's interpreter
/// relies on tail calls that unoptimised code does not get, and a long
/// activation (such as the calibration run) then overflows the stack.
#[derive(Debug, Clone)]
pub struct HostedConfig {
    /// Admission capacity, ppm of one CPU (leave headroom for the driver).
    pub capacity_ppm: u64,
    /// Scheduler quantum, ns (`None`: the nucleus default, 1 ms).
    pub quantum_ns: Option<u64>,
    /// Log lines kept per domain (a ring: older lines are dropped).
    pub log_lines: usize,
    /// Per-period records kept per domain (a ring).
    pub period_records: usize,
    /// Use this fuel rate instead of calibrating at start.
    pub fuel_rate: Option<FuelRate>,
    /// Track the fuel rate with an EWMA of measured fuel/ns (see the module
    /// docs).
    pub recalibrate: bool,
}

impl Default for HostedConfig {
    fn default() -> HostedConfig {
        HostedConfig {
            capacity_ppm: 900_000,
            quantum_ns: None,
            log_lines: 1_000,
            period_records: 1_024,
            fuel_rate: None,
            recalibrate: true,
        }
    }
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum HostedError {
    /// The wasm bytes are not a valid domain image.
    #[error("image: {0}")]
    Image(String),
    /// The nucleus refused the domain (admission, instantiation).
    #[error("spawn: {0}")]
    Spawn(String),
    /// A domain with that name exists.
    #[error("a domain named {0:?} exists")]
    Duplicate(String),
    /// No domain with that name.
    #[error("no domain named {0:?}")]
    NoSuchDomain(String),
    /// The domain did not take the message (inbox full, too big, failed).
    #[error("undeliverable: {0}")]
    Undeliverable(String),
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// The activation loop has stopped.
    #[error("the nucleus has stopped")]
    Stopped,
}

/// Whether a domain has work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainState {
    /// Runnable (has work or a suspended activation).
    Runnable,
    /// Waiting for a message or its timer.
    Waiting,
    /// Trapped; kept until stopped.
    Failed(String),
}

/// A domain's counters, as the driver sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainStats {
    /// Nucleus id.
    pub id: DomainId,
    /// Name.
    pub name: String,
    /// QoS contract.
    pub contract: Contract,
    /// CPU time charged by the nucleus (fuel ÷ calibrated rate), ns.
    pub cpu_ns_delivered: u64,
    /// Wall time its activations took, ns (includes nucleus overhead and any
    /// preemption of the activation thread by the host OS).
    pub cpu_ns_real: u64,
    /// Charged time given as guaranteed (slice) time, ns.
    pub guaranteed_ns: u64,
    /// Charged time given as spare (`extra`) time, ns.
    pub extra_ns: u64,
    /// Activations (a resumed one counts again).
    pub activations: u64,
    /// Activations that ran out of fuel.
    pub preemptions: u64,
    /// Messages sent / received.
    pub sent: u64,
    /// Messages received.
    pub received: u64,
    /// Messages it sent that the driver could not deliver.
    pub undelivered: u64,
    /// Log lines dropped (nucleus buffer or the driver's ring).
    pub logs_dropped: u64,
    /// State.
    pub state: DomainState,
}

/// One period of one domain, as observed by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeriodRecord {
    /// Start of the scheduler period, ns since the driver started.
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

enum Cmd {
    Spawn {
        name: String,
        wasm: Vec<u8>,
        contract: Contract,
        caps: Caps,
        ack: Sender<Result<DomainId, HostedError>>,
    },
    Deliver {
        name: String,
        channel: String,
        payload: Vec<u8>,
        answer: Option<Sender<Vec<u8>>>,
        ack: Sender<Result<(), HostedError>>,
    },
    Logs(String, Sender<Vec<String>>),
    Periods(String, Sender<Vec<PeriodRecord>>),
    Stats(Sender<Vec<DomainStats>>),
    Stop(String, Sender<Result<(), HostedError>>),
    Shutdown,
}

/// A running nucleus on its own thread. Every method is callable from any
/// thread; calls are served between activations (so within about one
/// quantum).
#[derive(Debug)]
pub struct HostedNucleus {
    t0: Instant,
    tx: Mutex<Option<Sender<Cmd>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    rate: FuelRate,
}

impl HostedNucleus {
    /// Calibrates (unless `cfg.fuel_rate` is set) and starts the activation
    /// loop.
    pub fn start(cfg: HostedConfig) -> Result<HostedNucleus, HostedError> {
        let (tx, rx) = mpsc::channel();
        let (rate_tx, rate_rx) = mpsc::channel();
        let t0 = Instant::now();
        let thread = std::thread::Builder::new()
            .name("metta-nucleus".into())
            // wasmi (and unoptimised test builds) want more than the default
            // 2 MiB.
            .stack_size(ACTIVATION_STACK)
            .spawn(move || {
                // Calibrate on the thread that will run the domains.
                let rate = match cfg.fuel_rate {
                    Some(r) => Ok(r),
                    None => calibrate(),
                };
                let ok = rate.as_ref().ok().copied();
                let _ = rate_tx.send(rate);
                if let Some(rate) = ok {
                    Driver::new(cfg, rate, t0).run(rx);
                }
            })
            .map_err(|e| HostedError::Spawn(format!("activation thread: {e}")))?;
        let rate = match rate_rx.recv() {
            Ok(r) => r,
            Err(_) => Err(HostedError::Stopped),
        };
        let rate = match rate {
            Ok(r) => r,
            Err(e) => {
                let _ = thread.join();
                return Err(e);
            }
        };
        Ok(HostedNucleus {
            t0,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            rate,
        })
    }

    /// The driver's clock: ns since it started (the time base of `now` in
    /// the nucleus and of [`PeriodRecord::start_ns`]).
    pub fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    /// The fuel rate in use.
    pub fn fuel_rate(&self) -> FuelRate {
        self.rate
    }

    fn send(&self, cmd: Cmd) -> Result<(), HostedError> {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        tx.as_ref()
            .ok_or(HostedError::Stopped)?
            .send(cmd)
            .map_err(|_| HostedError::Stopped)
    }

    fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> Cmd) -> Result<T, HostedError> {
        let (tx, rx) = mpsc::channel();
        self.send(make(tx))?;
        rx.recv().map_err(|_| HostedError::Stopped)
    }

    /// Loads `wasm`, admits it under `contract` and starts it (its first
    /// period starts now).
    pub fn spawn(
        &self,
        name: &str,
        wasm: &[u8],
        contract: Contract,
        caps: Caps,
    ) -> Result<DomainId, HostedError> {
        self.ask(|ack| Cmd::Spawn {
            name: name.to_string(),
            wasm: wasm.to_vec(),
            contract,
            caps,
            ack,
        })?
    }

    /// Queues a message for domain `name` on `channel`; an answer is
    /// dropped.
    pub fn deliver(&self, name: &str, channel: &str, payload: &[u8]) -> Result<(), HostedError> {
        self.ask(|ack| Cmd::Deliver {
            name: name.to_string(),
            channel: channel.to_string(),
            payload: payload.to_vec(),
            answer: None,
            ack,
        })?
    }

    /// Sends a request to domain `name` on `channel` and waits up to
    /// `timeout` for its answer (sent on a `reply_to` handle).
    pub fn request(
        &self,
        name: &str,
        channel: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, HostedError> {
        let (atx, arx) = mpsc::channel();
        self.ask(|ack| Cmd::Deliver {
            name: name.to_string(),
            channel: channel.to_string(),
            payload: payload.to_vec(),
            answer: Some(atx),
            ack,
        })??;
        match arx.recv_timeout(timeout) {
            Ok(a) => Ok(a),
            Err(RecvTimeoutError::Timeout) => Err(HostedError::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(HostedError::Stopped),
        }
    }

    /// The domain's recent log lines (empty for an unknown name).
    pub fn logs(&self, name: &str) -> Vec<String> {
        self.ask(|tx| Cmd::Logs(name.to_string(), tx))
            .unwrap_or_default()
    }

    /// The domain's recent per-period records, oldest first (the current,
    /// unfinished period last).
    pub fn periods(&self, name: &str) -> Vec<PeriodRecord> {
        self.ask(|tx| Cmd::Periods(name.to_string(), tx))
            .unwrap_or_default()
    }

    /// Every domain's counters, by id.
    pub fn stats(&self) -> Vec<DomainStats> {
        self.ask(Cmd::Stats).unwrap_or_default()
    }

    /// Stops and removes a domain (its share is freed).
    pub fn stop(&self, name: &str) -> Result<(), HostedError> {
        self.ask(|tx| Cmd::Stop(name.to_string(), tx))?
    }

    /// Stops the activation loop and waits for it. Idempotent.
    pub fn shutdown(&self) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(tx) = tx {
            let _ = tx.send(Cmd::Shutdown);
        }
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for HostedNucleus {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The calibration domain, an endless add loop preempted by fuel, as wasm
/// bytes (so the driver needs no WAT parser); the test
/// `calibration_module_matches_its_wat` checks it against this WAT:
///
/// ```text
/// (module (memory (export "memory") 1)
///   (func (export "metta_activate") (param i32) (result i32)
///     (local $i i32)
///     (loop $l
///       (local.set $i (i32.add (local.get $i) (i32.const 1)))
///       (br $l))
///     i32.const 0))
/// ```
const SPIN_WASM: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
    0x01, 0x06, 0x01, 0x60, 0x01, 0x7f, 0x01, 0x7f, // type: (i32) -> i32
    0x03, 0x02, 0x01, 0x00, // function 0: type 0
    0x05, 0x03, 0x01, 0x00, 0x01, // memory: min 1 page
    0x07, 0x1b, 0x02, // exports (2)
    0x06, b'm', b'e', b'm', b'o', b'r', b'y', 0x02, 0x00, // "memory" memory 0
    0x0e, b'm', b'e', b't', b't', b'a', b'_', b'a', b'c', b't', b'i', b'v', b'a', b't', b'e', 0x00,
    0x00, // "metta_activate" func 0
    0x0a, 0x14, 0x01, 0x12, // code: 1 body of 18 bytes
    0x01, 0x01, 0x7f, // 1 local i32
    0x03, 0x40, // loop
    0x20, 0x01, 0x41, 0x01, 0x6a, 0x21, 0x01, // $i = $i + 1
    0x0c, 0x00, // br 0
    0x0b, // end loop
    0x41, 0x00, 0x0b, // i32.const 0, end
];

/// Measures fuel per ns on a spin loop: median of 5 runs of
/// [`CALIBRATION_FUEL`] (after one warm-up run).
pub fn calibrate() -> Result<FuelRate, HostedError> {
    calibrate_with(CALIBRATION_FUEL)
}

fn calibrate_with(fuel: u64) -> Result<FuelRate, HostedError> {
    let image = Image::load(SPIN_WASM).map_err(|e| HostedError::Image(e.to_string()))?;
    let mut rt = metta_nucleus::Runtime::new();
    let contract = Contract {
        period_ns: 100_000_000,
        slice_ns: 100_000_000,
        extra: false,
        memory: 1 << 20,
    };
    let mut d = metta_nucleus::Domain::new(
        &mut rt,
        DomainId(0),
        "calibrate",
        &image,
        contract,
        Caps::none(),
    )
    .map_err(|e| HostedError::Spawn(e.to_string()))?;
    let mut rates = Vec::new();
    for i in 0..6 {
        let t = Instant::now();
        let a = d.activate(0, metta_proto::abi::REASON_START, fuel);
        let ns = t.elapsed().as_nanos().max(1) as f64;
        if i > 0 {
            rates.push(a.fuel_used as f64 / ns);
        }
    }
    rates.sort_by(f64::total_cmp);
    let fuel_per_ns = rates[rates.len() / 2];
    // Fuel per 1,000,000 ns, so the ratio keeps 6 digits.
    Ok(FuelRate::new(
        (fuel_per_ns * 1_000_000.0).round().max(1.0) as u64,
        1_000_000,
    ))
}

struct DomState {
    name: String,
    contract: Contract,
    logs: VecDeque<String>,
    logs_dropped: u64,
    real_ns: u64,
    guaranteed_ns: u64,
    extra_ns: u64,
    undelivered: u64,
    periods: VecDeque<PeriodRecord>,
}

enum Dest {
    Domain(DomainId, String),
    External(Option<Sender<Vec<u8>>>),
}

struct Driver {
    n: Nucleus,
    t0: Instant,
    cfg: HostedConfig,
    names: BTreeMap<String, DomainId>,
    doms: BTreeMap<DomainId, DomState>,
    tokens: BTreeMap<u64, Dest>,
    next_token: u64,
    /// Start-up rate and the EWMA, fuel per ns.
    base_rate: f64,
    ewma_rate: f64,
}

impl Driver {
    fn new(cfg: HostedConfig, rate: FuelRate, t0: Instant) -> Driver {
        let mut n = Nucleus::new(cfg.capacity_ppm, rate);
        if let Some(q) = cfg.quantum_ns {
            n.set_quantum(q);
        }
        let base = rate.fuel_for(1_000_000_000) as f64 / 1e9;
        Driver {
            n,
            t0,
            base_rate: base,
            ewma_rate: base,
            cfg,
            names: BTreeMap::new(),
            doms: BTreeMap::new(),
            tokens: BTreeMap::new(),
            next_token: 1,
        }
    }

    fn now(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    fn run(mut self, rx: Receiver<Cmd>) {
        loop {
            // Commands first, without blocking.
            loop {
                match rx.try_recv() {
                    Ok(cmd) => {
                        if !self.command(cmd) {
                            return;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            let now = self.now();
            match self.n.step(now) {
                Step::Ran {
                    domain,
                    why,
                    charged_ns,
                    activation,
                    ..
                } => {
                    let end = self.now();
                    self.account(domain, why, now, end - now, charged_ns);
                    self.recalibrate(activation.fuel_used, end - now);
                    self.route();
                    self.collect_logs();
                }
                Step::Idle { until } => {
                    self.route();
                    self.collect_logs();
                    let got = match until {
                        Some(t) => {
                            let wait = t.saturating_sub(self.now());
                            if wait == 0 {
                                continue;
                            }
                            match rx.recv_timeout(Duration::from_nanos(wait)) {
                                Ok(c) => Some(c),
                                Err(RecvTimeoutError::Timeout) => None,
                                Err(RecvTimeoutError::Disconnected) => return,
                            }
                        }
                        None => match rx.recv() {
                            Ok(c) => Some(c),
                            Err(_) => return,
                        },
                    };
                    if let Some(cmd) = got {
                        if !self.command(cmd) {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Folds one activation's measured fuel/ns into the rate.
    fn recalibrate(&mut self, fuel: u64, real_ns: u64) {
        if !self.cfg.recalibrate || real_ns < RECAL_MIN_NS || fuel == 0 {
            return;
        }
        let sample =
            (fuel as f64 / real_ns as f64).clamp(self.base_rate / 4.0, self.base_rate * 4.0);
        self.ewma_rate += RECAL_ALPHA * (sample - self.ewma_rate);
        let per_ms = (self.ewma_rate * 1e6).round().max(1.0) as u64;
        self.n.set_fuel_rate(FuelRate::new(per_ms, 1_000_000));
    }

    /// Per-period accounting of one activation that started at `start`.
    fn account(&mut self, id: DomainId, why: Why, start: u64, real: u64, charged: u64) {
        let entry = self.n.scheduler().entry(id).copied();
        let cap = self.cfg.period_records.max(1);
        let Some(st) = self.doms.get_mut(&id) else {
            return;
        };
        st.real_ns += real;
        match why {
            Why::Guaranteed => st.guaranteed_ns += charged,
            Why::Extra => st.extra_ns += charged,
        }
        let Some(e) = entry else {
            return;
        };
        // `charge` may have rolled the period past the run's end: step back
        // to the period the run started in.
        let p = e.contract.period_ns.max(1);
        let mut ps = e.period_start;
        if ps > start {
            ps = ps.saturating_sub((ps - start).div_ceil(p) * p);
        }
        let guaranteed = if why == Why::Guaranteed { charged } else { 0 };
        match st.periods.back_mut() {
            Some(r) if r.start_ns == ps => {
                r.activations += 1;
                r.cpu_ns_real += real;
                r.cpu_ns_charged += charged;
                r.guaranteed_ns += guaranteed;
            }
            _ => {
                if st.periods.len() >= cap {
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

    fn note(&mut self, id: DomainId, text: String) {
        let cap = self.cfg.log_lines.max(1);
        if let Some(st) = self.doms.get_mut(&id) {
            if st.logs.len() >= cap {
                st.logs.pop_front();
                st.logs_dropped += 1;
            }
            st.logs.push_back(text);
        }
    }

    /// The local domain serving `channel` for a message from `from`.
    fn route_to(&self, from: DomainId, channel: &str) -> Option<DomainId> {
        self.n
            .domains()
            .filter(|(id, d)| *id != from && d.failure().is_none())
            .filter_map(|(id, d)| {
                let best = d
                    .caps()
                    .channels
                    .iter()
                    .filter(|p| Caps::with_channels([p.as_str()]).may_open(channel))
                    .map(String::len)
                    .max()?;
                Some((best, id))
            })
            // Longest prefix wins; among equals the lowest id.
            .max_by_key(|(len, id)| (*len, std::cmp::Reverse(*id)))
            .map(|(_, id)| id)
    }

    fn route(&mut self) {
        let out = self.n.take_outbox();
        for Outgoing {
            from,
            channel,
            payload,
            reply,
        } in out
        {
            let now = self.now();
            match reply {
                Some(ReplyToken(t)) => match self.tokens.remove(&t) {
                    Some(Dest::External(Some(tx))) => {
                        let _ = tx.send(payload);
                    }
                    Some(Dest::External(None)) => {}
                    Some(Dest::Domain(to, ch)) => {
                        let msg = Message {
                            channel: ch,
                            payload,
                            reply: None,
                        };
                        if let Err(e) = self.n.deliver(to, msg, now) {
                            self.undelivered(from, &channel, &format!("{e:?}"));
                        }
                    }
                    None => self.undelivered(from, &channel, "stale reply token"),
                },
                None => match self.route_to(from, &channel) {
                    Some(to) => {
                        let token = self.mint(Dest::Domain(from, channel.clone()));
                        let msg = Message {
                            channel: channel.clone(),
                            payload,
                            reply: Some(token),
                        };
                        if let Err(e) = self.n.deliver(to, msg, now) {
                            self.tokens.remove(&token.0);
                            let why = match e {
                                metta_nucleus::Undeliverable::Full(_) => "inbox full",
                                metta_nucleus::Undeliverable::TooBig(_) => "too big",
                                metta_nucleus::Undeliverable::Failed(_) => "receiver failed",
                                metta_nucleus::Undeliverable::NoSuchDomain(_) => "no receiver",
                            };
                            self.undelivered(from, &channel, why);
                        }
                    }
                    None => self.undelivered(from, &channel, "no route"),
                },
            }
        }
    }

    fn undelivered(&mut self, from: DomainId, channel: &str, why: &str) {
        if let Some(st) = self.doms.get_mut(&from) {
            st.undelivered += 1;
        }
        self.note(from, format!("driver: message on {channel} dropped: {why}"));
    }

    fn collect_logs(&mut self) {
        for line in self.n.take_logs() {
            let text = match line.origin {
                LogOrigin::Domain => line.text,
                LogOrigin::Nucleus => format!("nucleus: {}", line.text),
            };
            self.note(line.domain, text);
        }
    }

    fn id_of(&self, name: &str) -> Result<DomainId, HostedError> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| HostedError::NoSuchDomain(name.to_string()))
    }

    /// Handles one command; `false` to stop.
    fn command(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Spawn {
                name,
                wasm,
                contract,
                caps,
                ack,
            } => {
                let _ = ack.send(self.spawn(name, &wasm, contract, caps));
            }
            Cmd::Deliver {
                name,
                channel,
                payload,
                answer,
                ack,
            } => {
                let r = self.id_of(&name).and_then(|id| {
                    let token = self.mint(Dest::External(answer));
                    let msg = Message {
                        channel,
                        payload,
                        reply: Some(token),
                    };
                    let now = self.now();
                    self.n.deliver(id, msg, now).map_err(|e| {
                        self.tokens.remove(&token.0);
                        HostedError::Undeliverable(match e {
                            metta_nucleus::Undeliverable::Full(_) => "inbox full".into(),
                            metta_nucleus::Undeliverable::TooBig(_) => "message too big".into(),
                            metta_nucleus::Undeliverable::Failed(_) => "domain failed".into(),
                            metta_nucleus::Undeliverable::NoSuchDomain(_) => "no domain".into(),
                        })
                    })
                });
                let _ = ack.send(r);
            }
            Cmd::Logs(name, tx) => {
                self.collect_logs();
                let lines = self
                    .names
                    .get(&name)
                    .and_then(|id| self.doms.get(id))
                    .map(|st| st.logs.iter().cloned().collect())
                    .unwrap_or_default();
                let _ = tx.send(lines);
            }
            Cmd::Periods(name, tx) => {
                let p = self
                    .names
                    .get(&name)
                    .and_then(|id| self.doms.get(id))
                    .map(|st| st.periods.iter().copied().collect())
                    .unwrap_or_default();
                let _ = tx.send(p);
            }
            Cmd::Stats(tx) => {
                let _ = tx.send(self.stats());
            }
            Cmd::Stop(name, tx) => {
                let r = self.id_of(&name).map(|id| {
                    self.n.stop(id);
                    self.names.remove(&name);
                    self.doms.remove(&id);
                    self.tokens
                        .retain(|_, d| !matches!(d, Dest::Domain(to, _) if *to == id));
                });
                let _ = tx.send(r);
            }
            Cmd::Shutdown => return false,
        }
        true
    }

    fn spawn(
        &mut self,
        name: String,
        wasm: &[u8],
        contract: Contract,
        caps: Caps,
    ) -> Result<DomainId, HostedError> {
        if self.names.contains_key(&name) {
            return Err(HostedError::Duplicate(name));
        }
        let image = Image::load(wasm).map_err(|e| HostedError::Image(e.to_string()))?;
        let now = self.now();
        let id = self
            .n
            .spawn(&name, &image, contract, caps, now)
            .map_err(|e| HostedError::Spawn(e.to_string()))?;
        self.names.insert(name.clone(), id);
        self.doms.insert(
            id,
            DomState {
                name,
                contract,
                logs: VecDeque::new(),
                logs_dropped: 0,
                real_ns: 0,
                guaranteed_ns: 0,
                extra_ns: 0,
                undelivered: 0,
                periods: VecDeque::new(),
            },
        );
        Ok(id)
    }

    fn stats(&self) -> Vec<DomainStats> {
        self.doms
            .iter()
            .filter_map(|(id, st)| {
                let d = self.n.domain(*id)?;
                let s = d.stats();
                let state = match d.failure() {
                    Some(f) => DomainState::Failed(f.to_string()),
                    None if self.n.scheduler().entry(*id).is_some_and(|e| e.runnable) => {
                        DomainState::Runnable
                    }
                    None => DomainState::Waiting,
                };
                Some(DomainStats {
                    id: *id,
                    name: st.name.clone(),
                    contract: st.contract,
                    cpu_ns_delivered: s.cpu_ns,
                    cpu_ns_real: st.real_ns,
                    guaranteed_ns: st.guaranteed_ns,
                    extra_ns: st.extra_ns,
                    activations: s.activations,
                    preemptions: s.preemptions,
                    sent: s.sent,
                    received: s.received,
                    undelivered: st.undelivered,
                    logs_dropped: s.logs_dropped + st.logs_dropped,
                    state,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contract(slice_ms: u64, period_ms: u64, extra: bool) -> Contract {
        Contract {
            period_ns: period_ms * 1_000_000,
            slice_ns: slice_ms * 1_000_000,
            extra,
            memory: 1 << 20,
        }
    }

    /// A fixed rate (0.01 fuel/ns: a 1 ms quantum is 10,000 fuel), so the
    /// tests do not calibrate and unoptimised builds keep activations short.
    fn test_config() -> HostedConfig {
        HostedConfig {
            fuel_rate: Some(FuelRate::new(1, 100)),
            recalibrate: false,
            ..HostedConfig::default()
        }
    }

    /// Polls `f` every 5 ms until it returns `Some`, for at most `limit`.
    fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(Instant::now() < deadline, "condition not met in {limit:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A greedy domain: returns RUN_MORE after a bounded loop.
    const GREEDY: &str = r#"(module (memory (export "memory") 1)
      (func (export "metta_activate") (param i32) (result i32)
        (local $i i32)
        (loop $l
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $l (i32.lt_u (local.get $i) (i32.const 100000))))
        i32.const 1))"#;

    /// `/svc/echo`: answers every request with its payload and logs it.
    const ECHO: &str = r#"(module
      (import "metta" "log" (func $log (param i32 i32)))
      (import "metta" "open" (func $open (param i32 i32) (result i32)))
      (import "metta" "send" (func $send (param i32 i32 i32) (result i32)))
      (import "metta" "recv" (func $recv (param i32 i32 i32) (result i32)))
      (import "metta" "reply_to" (func $reply_to (param i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 0) "/svc/echo")
      (func (export "metta_activate") (param i32) (result i32)
        (local $ch i32) (local $n i32)
        (local.set $ch (call $open (i32.const 0) (i32.const 9)))
        (block $done
          (loop $l
            (local.set $n (call $recv (local.get $ch) (i32.const 1024) (i32.const 1024)))
            (br_if $done (i32.lt_s (local.get $n) (i32.const 0)))
            (call $log (i32.const 1024) (local.get $n))
            (drop (call $send (call $reply_to (local.get $ch)) (i32.const 1024) (local.get $n)))
            (br $l)))
        i32.const 0))"#;

    /// Sends `ping` to `/svc/echo` on start and logs what comes back.
    const CLIENT: &str = r#"(module
      (import "metta" "log" (func $log (param i32 i32)))
      (import "metta" "open" (func $open (param i32 i32) (result i32)))
      (import "metta" "send" (func $send (param i32 i32 i32) (result i32)))
      (import "metta" "recv" (func $recv (param i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 0) "/svc/echo")
      (data (i32.const 16) "ping")
      (data (i32.const 32) "back: ")
      (func (export "metta_activate") (param $reason i32) (result i32)
        (local $ch i32) (local $n i32)
        (local.set $ch (call $open (i32.const 0) (i32.const 9)))
        (if (i32.eqz (local.get $reason))
          (then (drop (call $send (local.get $ch) (i32.const 16) (i32.const 4)))))
        (block $done
          (loop $l
            (local.set $n (call $recv (local.get $ch) (i32.const 38) (i32.const 512)))
            (br_if $done (i32.lt_s (local.get $n) (i32.const 0)))
            (call $log (i32.const 32) (i32.add (local.get $n) (i32.const 6)))
            (br $l)))
        i32.const 0))"#;

    #[test]
    fn calibration_module_matches_its_wat() {
        let wat = r#"(module (memory (export "memory") 1)
          (func (export "metta_activate") (param i32) (result i32)
            (local $i i32)
            (loop $l
              (local.set $i (i32.add (local.get $i) (i32.const 1)))
              (br $l))
            i32.const 0))"#;
        let w = wat::parse_str(wat).unwrap();
        // The same module; `wat` appends a `name` custom section (id 0).
        assert_eq!(&w[..SPIN_WASM.len()], SPIN_WASM);
        assert!(w.len() == SPIN_WASM.len() || w[SPIN_WASM.len()] == 0);
        let r = std::thread::Builder::new()
            .stack_size(ACTIVATION_STACK)
            // Unoptimised builds overflow the stack on long activations
            // (see the workspace Cargo.toml): calibrate briefly there.
            .spawn(|| {
                calibrate_with(if cfg!(debug_assertions) {
                    10_000
                } else {
                    CALIBRATION_FUEL
                })
            })
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert!(r.fuel_for(1_000_000) > 1_000, "{r:?}");
    }

    #[test]
    fn greedy_domain_gets_its_slice_per_period() {
        let h = HostedNucleus::start(test_config()).unwrap();
        let wasm = wat::parse_str(GREEDY).unwrap();
        h.spawn("g", &wasm, contract(5, 20, false), Caps::none())
            .unwrap();
        // Wait for 5 complete periods (the last record is the current one).
        let periods = wait_for(Duration::from_secs(10), || {
            let p = h.periods("g");
            (p.len() >= 6).then_some(p)
        });
        for r in &periods[..periods.len() - 1] {
            // Charged time is fuel-based, so it does not depend on host load.
            assert!((4_750_000..=5_250_000).contains(&r.guaranteed_ns), "{r:?}");
            assert!(r.latency_ns < 20_000_000, "{r:?}");
        }
        let s = h.stats();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].name, "g");
        assert_eq!(s[0].state, DomainState::Runnable);
        assert!(s[0].activations > 0 && s[0].cpu_ns_delivered > 0);
        assert_eq!(s[0].extra_ns, 0, "not extra: no spare time");
        h.stop("g").unwrap();
        assert!(h.stats().is_empty());
        h.shutdown();
        assert!(matches!(h.stats().len(), 0));
        assert!(matches!(
            h.spawn("x", &wasm, contract(1, 10, false), Caps::none()),
            Err(HostedError::Stopped)
        ));
    }

    #[test]
    fn routes_requests_and_replies_and_keeps_logs() {
        let h = HostedNucleus::start(test_config()).unwrap();
        let echo = wat::parse_str(ECHO).unwrap();
        let client = wat::parse_str(CLIENT).unwrap();
        let caps = Caps::with_channels(["/svc/echo"]);
        h.spawn("echo", &echo, contract(1, 10, false), caps.clone())
            .unwrap();
        assert!(matches!(
            h.spawn("echo", &echo, contract(1, 10, false), caps.clone()),
            Err(HostedError::Duplicate(_))
        ));
        // From outside: request / answer.
        let a = h
            .request("echo", "/svc/echo", b"hello", Duration::from_secs(5))
            .unwrap();
        assert_eq!(a, b"hello");
        // Domain to domain: the client's ping reaches echo by name, the
        // answer comes back through the reply token.
        h.spawn("client", &client, contract(1, 10, false), caps)
            .unwrap();
        wait_for(Duration::from_secs(5), || {
            h.logs("client")
                .iter()
                .any(|l| l == "back: ping")
                .then_some(())
        });
        let echo_logs = h.logs("echo");
        assert_eq!(echo_logs, ["hello", "ping"]);
        assert!(matches!(
            h.deliver("nobody", "/x", b""),
            Err(HostedError::NoSuchDomain(_))
        ));
        assert!(h.logs("nobody").is_empty());
        let s = h.stats();
        let e = s.iter().find(|d| d.name == "echo").unwrap();
        assert_eq!((e.received, e.sent), (2, 2));
        assert_eq!(e.state, DomainState::Waiting);
    }
}
