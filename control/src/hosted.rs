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
//!    accounting (real and charged CPU, first activation in the period; the
//!    nucleus's [`metta_nucleus::accounting::PeriodLog`]);
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
//! **Routing** (with the nucleus's [`metta_nucleus::routing`], as the native
//! driver does). Messages are routed between local domains by channel name. A
//! message a domain sends on a name (no reply token) goes to the *other*
//! domain whose capabilities cover that name with the longest prefix (ties:
//! the lowest id) — the nucleus does not expose which names a domain has
//! opened, so the capability is what says it may serve the name. The driver
//! mints a [`ReplyToken`] for the receiver; an answer sent on a `reply_to`
//! handle comes back out carrying that token and is delivered to the
//! original sender on the same channel name (without a token). Messages from
//! outside ([`HostedNucleus::deliver_with`] and, on top of it,
//! [`HostedNucleus::deliver`] and [`HostedNucleus::request`]) carry tokens
//! whose answer is handed to an [`AnswerFn`] (or dropped). A message with no
//! route, or to a full inbox, is dropped and noted in the sender's log.
//!
//! **Other nodes.** With [`HostedConfig::outbound`] set, a message on a name
//! that no local domain serves goes to that hook instead of being dropped
//! (mettad forwards it to the node, or the lane, that serves the name). The
//! driver mints a token for it just as for a local route and passes it as
//! [`Outbound::reply`]; the answer that comes back from the remote domain is
//! handed in with [`HostedNucleus::answer`] and reaches the original sender
//! on the original channel name. Only tokens given to the hook can be
//! redeemed that way (a local request's token cannot be answered from
//! outside); a token is good for one answer and is forgotten when its
//! sender is stopped or after [`MAX_TOKENS`] newer ones. A hook that returns
//! `Err(why)` has the message dropped and `why` noted in the sender's log.
//! Tokens are numbers local to one `HostedNucleus`: a daemon that runs
//! several (one per CPU lane) keeps track of which lane minted which. In the
//! other direction a request from a remote domain is delivered with
//! [`HostedNucleus::deliver_with`], whose [`AnswerFn`] sends the answer back.
//!
//! The hook and the answer and start callbacks run on the activation thread
//! between activations: they must be quick and must not block (push into a
//! channel and return) nor call back into the [`HostedNucleus`] (such a call
//! fails rather than deadlock).
//!
//! **Start notification.** The driver records when each domain was spawned
//! and when its first activation ended (finished or preempted),
//! [`DomainStats::spawned_ns`] and [`DomainStats::first_activation_ns`];
//! [`HostedNucleus::on_started`] calls back with the difference once it is
//! known, or with the reason the domain never got there (it trapped in its
//! first activation, or was stopped, or the nucleus stopped, before).
//!
//! **Logs.** Each domain keeps its last [`HostedConfig::log_lines`] lines in
//! a ring. Every line gets a sequence number (per domain, from 1, never
//! reused) and the driver time it was produced, so a follower can ask for
//! what is new with [`HostedNucleus::logs_since`] and learn how many lines it
//! missed when the ring overflowed between two calls.
//!
//! **Threads.** [`HostedConfig::pin_cpu`] pins the activation thread to one
//! CPU (Linux) before it calibrates. Every call on the handle waits for the
//! activation thread's answer; if that thread has ended (shut down or
//! panicked) the call returns [`HostedError::Stopped`] instead of waiting.
//! Callbacks still pending when it panics are dropped uncalled (so a channel
//! sender they hold closes).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use metta_nucleus::accounting::PeriodLog;
use metta_nucleus::routing::{Local, ReplyTokens};
use metta_nucleus::{
    Caps, DomainId, FuelRate, Image, LogOrigin, Message, Nucleus, Outcome, Outgoing, ReplyToken,
    Step, Why,
};
use metta_proto::Contract;

/// One period of one domain, as observed by the driver (times in ns since
/// the driver started).
pub use metta_nucleus::accounting::PeriodRecord;
/// Outstanding reply tokens kept; beyond this the oldest are forgotten.
pub use metta_nucleus::routing::MAX_TOKENS;

/// Fuel per calibration run.
pub const CALIBRATION_FUEL: u64 = 20_000_000;
/// Weight of a new sample in the fuel-rate EWMA.
pub const RECAL_ALPHA: f64 = 0.25;
/// Activations shorter than this (wall time) are not used to recalibrate:
/// their time is dominated by call overhead, not fuel.
pub const RECAL_MIN_NS: u64 = 100_000;
/// Stack of the activation thread.
const ACTIVATION_STACK: usize = 32 << 20;
/// The error for a reply token that is unknown, used or forgotten.
const STALE_TOKEN: &str = "stale reply token";

/// Takes a message that no local domain serves (see the module docs); runs
/// on the activation thread, so it must not block. `Err(why)`: the message
/// is dropped and `why` noted in the sender's log.
pub type OutboundHook = Arc<dyn Fn(Outbound) -> Result<(), String> + Send + Sync>;

/// Takes the answer to a message delivered with
/// [`HostedNucleus::deliver_with`]; runs on the activation thread, so it must
/// not block.
pub type AnswerFn = Box<dyn FnOnce(Vec<u8>) + Send>;

/// Told how a domain's start went (see [`HostedNucleus::on_started`]): `Ok`
/// with the ns from its spawn to the end of its first activation, or `Err`
/// with why it never completed one. Runs on the activation thread, so it
/// must not block.
pub type StartedFn = Box<dyn FnOnce(Result<u64, String>) + Send>;

/// A message a local domain sent on a name that no local domain serves,
/// handed to the [`OutboundHook`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// The sending domain's name.
    pub from: String,
    /// The channel name it was sent on.
    pub channel: String,
    /// The bytes sent.
    pub payload: Vec<u8>,
    /// The token to give [`HostedNucleus::answer`] with the answer.
    pub reply: Option<u64>,
}

/// Driver settings.
///
/// Build the driver with optimisation (`--release`): wasmi's interpreter
/// relies on tail calls that unoptimised code does not get, and a long
/// activation (such as the calibration run) then overflows the stack.
#[derive(Clone)]
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
    /// Where messages with no local route go (`None`: they are dropped).
    pub outbound: Option<OutboundHook>,
    /// Pin the activation thread to this CPU (Linux; a failure is logged and
    /// the thread runs unpinned).
    pub pin_cpu: Option<usize>,
}

impl fmt::Debug for HostedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostedConfig")
            .field("capacity_ppm", &self.capacity_ppm)
            .field("quantum_ns", &self.quantum_ns)
            .field("log_lines", &self.log_lines)
            .field("period_records", &self.period_records)
            .field("fuel_rate", &self.fuel_rate)
            .field("recalibrate", &self.recalibrate)
            .field(
                "outbound",
                &self.outbound.as_ref().map(|_| "<hook>").unwrap_or("none"),
            )
            .field("pin_cpu", &self.pin_cpu)
            .finish()
    }
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
            outbound: None,
            pin_cpu: None,
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
    /// When it was spawned, ns on the driver's clock.
    pub spawned_ns: u64,
    /// When its first activation ended (finished or preempted), ns on the
    /// driver's clock; `None` until then (and for good if it trapped in it).
    pub first_activation_ns: Option<u64>,
    /// Linear memory in use, bytes.
    pub memory_bytes: u64,
}

impl DomainStats {
    /// Why it failed, if it did.
    pub fn failure(&self) -> Option<&str> {
        match &self.state {
            DomainState::Failed(why) => Some(why),
            _ => None,
        }
    }
}

/// One log line of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Its number: per domain, from 1, never reused.
    pub seq: u64,
    /// When it was produced, ns on the driver's clock (for a domain's line,
    /// the start of the activation that wrote it).
    pub at_ns: u64,
    /// The text.
    pub text: String,
}

/// The lines a follower has not seen yet ([`HostedNucleus::logs_since`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogChunk {
    /// Lines after the cursor, oldest first.
    pub lines: Vec<LogLine>,
    /// The cursor to pass next time: the last line's `seq` (the given
    /// cursor when there is nothing new).
    pub next: u64,
    /// Lines after the cursor, before the first returned one, that fell out
    /// of the ring.
    pub dropped: u64,
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
        answer: Option<AnswerFn>,
        ack: Sender<Result<(), HostedError>>,
    },
    Answer {
        token: u64,
        payload: Vec<u8>,
        ack: Sender<Result<(), HostedError>>,
    },
    OnStarted {
        name: String,
        f: StartedFn,
        ack: Sender<Result<(), HostedError>>,
    },
    Logs(String, Sender<Vec<String>>),
    LogsSince(String, u64, Sender<Result<LogChunk, HostedError>>),
    Periods(String, Sender<Vec<PeriodRecord>>),
    Stats(Sender<Vec<DomainStats>>),
    Stop(String, Sender<Result<(), HostedError>>),
    Shutdown,
}

/// A running nucleus on its own thread. Every method is callable from any
/// thread (but not from the hook or a callback, which run on the activation
/// thread); calls are served between activations (so within about one
/// quantum).
#[derive(Debug)]
pub struct HostedNucleus {
    t0: Instant,
    tx: Mutex<Option<Sender<Cmd>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    thread_id: ThreadId,
    rate: FuelRate,
}

impl HostedNucleus {
    /// Pins the activation thread if asked, calibrates (unless
    /// `cfg.fuel_rate` is set) and starts the activation loop.
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
                if let Some(cpu) = cfg.pin_cpu {
                    pin_to(cpu);
                }
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
            thread_id: thread.thread().id(),
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

    /// Sends a command and waits for its answer. Never waits forever on a
    /// dead loop: once the activation thread has ended its receiver is
    /// gone, so `send` fails, and a command it had queued or was handling
    /// is dropped with its ack sender, so `recv` fails.
    fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> Cmd) -> Result<T, HostedError> {
        if std::thread::current().id() == self.thread_id {
            // From the hook or a callback: the loop would wait on itself.
            return Err(HostedError::Undeliverable(
                "called from the activation thread (a hook or callback)".into(),
            ));
        }
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
        self.deliver_with(name, channel, payload, None)
    }

    /// Queues a message for domain `name` on `channel`. If the domain
    /// answers it (on a `reply_to` handle), `on_answer` gets the answer, on
    /// the activation thread; it is dropped uncalled if no answer comes
    /// before its token is forgotten (see the module docs).
    pub fn deliver_with(
        &self,
        name: &str,
        channel: &str,
        payload: &[u8],
        on_answer: Option<AnswerFn>,
    ) -> Result<(), HostedError> {
        self.ask(|ack| Cmd::Deliver {
            name: name.to_string(),
            channel: channel.to_string(),
            payload: payload.to_vec(),
            answer: on_answer,
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
        let on_answer: AnswerFn = Box::new(move |a| {
            let _ = atx.send(a);
        });
        self.deliver_with(name, channel, payload, Some(on_answer))?;
        match arx.recv_timeout(timeout) {
            Ok(a) => Ok(a),
            Err(RecvTimeoutError::Timeout) => Err(HostedError::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(HostedError::Stopped),
        }
    }

    /// Delivers the answer to a message that went out through the
    /// [`OutboundHook`] with `token` ([`Outbound::reply`]): to the sender,
    /// on the channel name it sent on, without a token. A token is good for
    /// one answer; an unknown, used or forgotten one (or one not given to
    /// the hook) is `Undeliverable("stale reply token")`.
    pub fn answer(&self, token: u64, payload: &[u8]) -> Result<(), HostedError> {
        self.ask(|ack| Cmd::Answer {
            token,
            payload: payload.to_vec(),
            ack,
        })?
    }

    /// Calls `f` once domain `name` has completed its first activation (at
    /// once if it has), with the ns from its spawn to the end of that
    /// activation; or with `Err(why)` if it trapped in it, or is stopped (or
    /// the nucleus stops) before it. `f` runs on the activation thread.
    pub fn on_started(&self, name: &str, f: StartedFn) -> Result<(), HostedError> {
        self.ask(|ack| Cmd::OnStarted {
            name: name.to_string(),
            f,
            ack,
        })?
    }

    /// The domain's recent log lines (empty for an unknown name).
    pub fn logs(&self, name: &str) -> Vec<String> {
        self.ask(|tx| Cmd::Logs(name.to_string(), tx))
            .unwrap_or_default()
    }

    /// The domain's log lines numbered above `after` that are still in its
    /// ring (start with 0, then pass [`LogChunk::next`]). A cursor past its
    /// last line (one from an earlier domain of the same name) counts as 0;
    /// a follower that must not mix two domains compares
    /// [`DomainStats::id`].
    pub fn logs_since(&self, name: &str, after: u64) -> Result<LogChunk, HostedError> {
        self.ask(|tx| Cmd::LogsSince(name.to_string(), after, tx))?
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
            // Not from the activation thread itself (a callback dropping
            // the last handle): it would wait for itself.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for HostedNucleus {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Pins the calling thread to `cpu`; logs and carries on if it cannot.
fn pin_to(cpu: usize) {
    #[cfg(target_os = "linux")]
    {
        if cpu >= libc::CPU_SETSIZE as usize {
            tracing::warn!(cpu, "hosted nucleus: not pinned: no such CPU");
            return;
        }
        // SAFETY: `cpu_set_t` is plain integers, so all-zero bytes are a
        // valid (empty) set; `CPU_SET` sets one bit of it, in bounds as
        // `cpu < CPU_SETSIZE` was checked above; `sched_setaffinity` reads
        // `size_of::<cpu_set_t>()` bytes from the live local `set`, and pid 0
        // is the calling thread.
        let rc = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_ZERO(&mut set);
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!(cpu, error = %e, "hosted nucleus: not pinned");
        }
    }
    #[cfg(not(target_os = "linux"))]
    tracing::warn!(cpu, "hosted nucleus: not pinned: only supported on Linux");
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
    logs: VecDeque<LogLine>,
    /// The `seq` of the next log line.
    next_seq: u64,
    logs_dropped: u64,
    real_ns: u64,
    guaranteed_ns: u64,
    extra_ns: u64,
    undelivered: u64,
    periods: PeriodLog,
    spawned_ns: u64,
    first_activation_ns: Option<u64>,
    /// Waiting for the first activation to end.
    started: Vec<StartedFn>,
}

/// Where the answer to a token goes.
enum Dest {
    /// A local domain's message to a local domain: to the sender, on this
    /// channel name.
    Domain(DomainId, String),
    /// The same, for a message handed to the outbound hook: only
    /// [`HostedNucleus::answer`] redeems it.
    Remote(DomainId, String),
    /// A message from outside to this domain: its answer to this callback
    /// (or nowhere). Stopping the domain drops the callback, so its caller
    /// learns at once that no answer will come.
    External(DomainId, Option<AnswerFn>),
}

struct Driver {
    n: Nucleus,
    t0: Instant,
    cfg: HostedConfig,
    names: BTreeMap<String, DomainId>,
    doms: BTreeMap<DomainId, DomState>,
    tokens: ReplyTokens<Dest>,
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
            tokens: ReplyTokens::new(),
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
                    self.first_activation(domain, &activation.outcome, end);
                    self.account(domain, why, now, end - now, charged_ns);
                    self.recalibrate(activation.fuel_used, end - now);
                    // Logs first: the domain's lines come before the
                    // driver's notes about the messages it sent.
                    self.collect_logs();
                    self.route();
                }
                Step::Idle { until } => {
                    self.collect_logs();
                    self.route();
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

    /// Notes the end of an activation of `id` at `end`: the first one to
    /// complete tells the start waiters; a trap before that fails them.
    fn first_activation(&mut self, id: DomainId, outcome: &Outcome, end: u64) {
        let Some(st) = self.doms.get_mut(&id) else {
            return;
        };
        if st.first_activation_ns.is_some() {
            return;
        }
        let r = match outcome {
            Outcome::Trapped(why) => Err(why.clone()),
            _ => {
                st.first_activation_ns = Some(end);
                Ok(end.saturating_sub(st.spawned_ns))
            }
        };
        for f in st.started.drain(..) {
            f(r.clone());
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

    /// Adds a log line for `id`, produced at `at_ns`.
    fn note(&mut self, id: DomainId, at_ns: u64, text: String) {
        let cap = self.cfg.log_lines.max(1);
        if let Some(st) = self.doms.get_mut(&id) {
            if st.logs.len() >= cap {
                st.logs.pop_front();
                st.logs_dropped += 1;
            }
            st.logs.push_back(LogLine {
                seq: st.next_seq,
                at_ns,
                text,
            });
            st.next_seq += 1;
        }
    }

    /// `id`'s lines numbered above `after`.
    fn logs_since(&self, id: DomainId, after: u64) -> LogChunk {
        let Some(st) = self.doms.get(&id) else {
            return LogChunk::default();
        };
        // A cursor past the last line is from an earlier domain of that
        // name: start this one from the beginning.
        let after = if after >= st.next_seq { 0 } else { after };
        let lines: Vec<LogLine> = st.logs.iter().filter(|l| l.seq > after).cloned().collect();
        match (lines.first(), lines.last()) {
            (Some(first), Some(last)) => LogChunk {
                // `first.seq > after`, by the filter.
                dropped: first.seq - after - 1,
                next: last.seq,
                lines,
            },
            _ => LogChunk {
                lines,
                next: after,
                dropped: 0,
            },
        }
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
                Some(ReplyToken(t)) => match self.tokens.take(t) {
                    Some(Dest::External(_, Some(f))) => f(payload),
                    Some(Dest::External(_, None)) => {}
                    // A remote token never reaches a local domain; were it
                    // to, it would go where it says.
                    Some(Dest::Domain(to, ch) | Dest::Remote(to, ch)) => {
                        let msg = Message {
                            channel: ch,
                            payload,
                            reply: None,
                        };
                        if let Err(e) = self.n.deliver(to, msg, now) {
                            self.undelivered(from, &channel, e.why());
                        }
                    }
                    None => self.undelivered(from, &channel, STALE_TOKEN),
                },
                None => {
                    let dest = Dest::Domain(from, channel.clone());
                    match self
                        .tokens
                        .send_local(&mut self.n, from, &channel, payload, dest, now)
                    {
                        Local::Delivered(_) => {}
                        Local::Refused(e) => self.undelivered(from, &channel, e.why()),
                        Local::NoRoute(payload) => self.route_out(from, channel, payload),
                    }
                }
            }
        }
    }

    /// A message with no local route: to the outbound hook, if any.
    fn route_out(&mut self, from: DomainId, channel: String, payload: Vec<u8>) {
        let Some(hook) = self.cfg.outbound.clone() else {
            self.undelivered(from, &channel, "no route");
            return;
        };
        let name = self
            .doms
            .get(&from)
            .map(|st| st.name.clone())
            .unwrap_or_default();
        let token = self.tokens.mint(Dest::Remote(from, channel.clone()));
        let out = Outbound {
            from: name,
            channel: channel.clone(),
            payload,
            reply: Some(token.0),
        };
        if let Err(why) = hook(out) {
            self.tokens.take(token.0);
            self.undelivered(from, &channel, &why);
        }
    }

    /// An answer from a remote domain to the message that went out with
    /// `token`.
    fn answer(&mut self, token: u64, payload: Vec<u8>) -> Result<(), HostedError> {
        let stale = || HostedError::Undeliverable(STALE_TOKEN.into());
        // Not one given to the hook: leave it to its owner.
        let (to, channel) = match self
            .tokens
            .take_if(token, |d| matches!(d, Dest::Remote(..)))
        {
            Some(Dest::Remote(to, ch)) => (to, ch),
            _ => return Err(stale()),
        };
        let msg = Message {
            channel,
            payload,
            reply: None,
        };
        let now = self.now();
        self.n
            .deliver(to, msg, now)
            .map_err(|e| HostedError::Undeliverable(e.why().into()))
    }

    fn undelivered(&mut self, from: DomainId, channel: &str, why: &str) {
        if let Some(st) = self.doms.get_mut(&from) {
            st.undelivered += 1;
        }
        let now = self.now();
        self.note(
            from,
            now,
            format!("driver: message on {channel} dropped: {why}"),
        );
    }

    fn collect_logs(&mut self) {
        for line in self.n.take_logs() {
            let text = match line.origin {
                LogOrigin::Domain => line.text,
                LogOrigin::Nucleus => format!("nucleus: {}", line.text),
            };
            self.note(line.domain, line.at_ns, text);
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
                    let token = self.tokens.mint(Dest::External(id, answer));
                    let msg = Message {
                        channel,
                        payload,
                        reply: Some(token),
                    };
                    let now = self.now();
                    self.n.deliver(id, msg, now).map_err(|e| {
                        self.tokens.take(token.0);
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
            Cmd::Answer {
                token,
                payload,
                ack,
            } => {
                let _ = ack.send(self.answer(token, payload));
            }
            Cmd::OnStarted { name, f, ack } => {
                let r = self.id_of(&name).map(|id| self.on_started(id, f));
                let _ = ack.send(r);
            }
            Cmd::Logs(name, tx) => {
                self.collect_logs();
                let lines = self
                    .names
                    .get(&name)
                    .and_then(|id| self.doms.get(id))
                    .map(|st| st.logs.iter().map(|l| l.text.clone()).collect())
                    .unwrap_or_default();
                let _ = tx.send(lines);
            }
            Cmd::LogsSince(name, after, tx) => {
                self.collect_logs();
                let r = self.id_of(&name).map(|id| self.logs_since(id, after));
                let _ = tx.send(r);
            }
            Cmd::Periods(name, tx) => {
                let p = self
                    .names
                    .get(&name)
                    .and_then(|id| self.doms.get(id))
                    .map(|st| st.periods.records().iter().copied().collect())
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
                    if let Some(st) = self.doms.remove(&id) {
                        for f in st.started {
                            f(Err("stopped before its first activation".into()));
                        }
                    }
                    self.tokens.retain(|d| {
                        !matches!(d, Dest::Domain(to, _) | Dest::Remote(to, _) | Dest::External(to, _) if *to == id)
                    });
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
                next_seq: 1,
                logs_dropped: 0,
                real_ns: 0,
                guaranteed_ns: 0,
                extra_ns: 0,
                undelivered: 0,
                periods: PeriodLog::new(self.cfg.period_records),
                spawned_ns: now,
                first_activation_ns: None,
                started: Vec::new(),
            },
        );
        Ok(id)
    }

    /// Registers `f` for `id`'s first activation, or calls it now if that
    /// is decided.
    fn on_started(&mut self, id: DomainId, f: StartedFn) {
        let failure = self
            .n
            .domain(id)
            .and_then(|d| d.failure())
            .map(str::to_string);
        let Some(st) = self.doms.get_mut(&id) else {
            return f(Err("no such domain".into()));
        };
        match (st.first_activation_ns, failure) {
            (Some(end), _) => f(Ok(end.saturating_sub(st.spawned_ns))),
            (None, Some(why)) => f(Err(why)),
            (None, None) => st.started.push(f),
        }
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
                    spawned_ns: st.spawned_ns,
                    first_activation_ns: st.first_activation_ns,
                    memory_bytes: d.memory().len() as u64,
                })
            })
            .collect()
    }
}

impl Drop for Driver {
    /// Tells whoever still waits for a start that it will not come (not
    /// while unwinding from a panic: a callback that panicked too would
    /// abort).
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        for st in self.doms.values_mut() {
            for f in st.started.drain(..) {
                f(Err("the nucleus stopped".into()));
            }
        }
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

    /// Traps on its first activation.
    const TRAP: &str = r#"(module (memory (export "memory") 1)
      (func (export "metta_activate") (param i32) (result i32)
        unreachable))"#;

    /// A config whose outbound hook records what it gets and answers with
    /// `result`.
    fn hooked(result: Result<(), String>) -> (HostedConfig, Arc<Mutex<Vec<Outbound>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let hook: OutboundHook = Arc::new(move |o| {
            s.lock().unwrap().push(o);
            result.clone()
        });
        let cfg = HostedConfig {
            outbound: Some(hook),
            ..test_config()
        };
        (cfg, seen)
    }

    #[test]
    fn no_local_route_goes_to_the_hook_and_answers_come_back() {
        let (cfg, seen) = hooked(Ok(()));
        assert!(format!("{cfg:?}").contains("outbound: \"<hook>\""));
        let h = HostedNucleus::start(cfg).unwrap();
        let client = wat::parse_str(CLIENT).unwrap();
        // Nobody else serves /svc/echo here (the client's own cap does not
        // count): its ping goes out.
        let caps = Caps::with_channels(["/svc/echo"]);
        h.spawn("client", &client, contract(1, 10, false), caps)
            .unwrap();
        let out = wait_for(Duration::from_secs(5), || seen.lock().unwrap().pop());
        assert_eq!(
            (out.from.as_str(), out.channel.as_str(), &out.payload[..]),
            ("client", "/svc/echo", &b"ping"[..])
        );
        let token = out.reply.expect("a token for the answer");
        h.answer(token, b"pong").unwrap();
        wait_for(Duration::from_secs(5), || {
            h.logs("client")
                .iter()
                .any(|l| l == "back: pong")
                .then_some(())
        });
        // One answer per token.
        assert!(matches!(
            h.answer(token, b"again"),
            Err(HostedError::Undeliverable(w)) if w == STALE_TOKEN
        ));
        assert!(matches!(
            h.answer(token + 1_000, b""),
            Err(HostedError::Undeliverable(w)) if w == STALE_TOKEN
        ));
        // A token minted for someone else cannot be answered from outside:
        // this one (the next minted) belongs to `deliver`.
        h.deliver("client", "/svc/echo", b"x").unwrap();
        assert!(matches!(
            h.answer(token + 1, b"forged"),
            Err(HostedError::Undeliverable(w)) if w == STALE_TOKEN
        ));
        let s = h.stats();
        assert_eq!(s[0].undelivered, 0);
        // A stopped sender's tokens go with it.
        let (cfg, seen) = hooked(Ok(()));
        let h = HostedNucleus::start(cfg).unwrap();
        h.spawn(
            "client",
            &client,
            contract(1, 10, false),
            Caps::with_channels(["/svc/echo"]),
        )
        .unwrap();
        let out = wait_for(Duration::from_secs(5), || seen.lock().unwrap().pop());
        h.stop("client").unwrap();
        assert!(matches!(
            h.answer(out.reply.unwrap(), b"late"),
            Err(HostedError::Undeliverable(w)) if w == STALE_TOKEN
        ));
    }

    #[test]
    fn a_hook_that_refuses_has_the_message_dropped_with_its_reason() {
        let (cfg, seen) = hooked(Err("peer unreachable".into()));
        let h = HostedNucleus::start(cfg).unwrap();
        let client = wat::parse_str(CLIENT).unwrap();
        h.spawn(
            "client",
            &client,
            contract(1, 10, false),
            Caps::with_channels(["/svc/echo"]),
        )
        .unwrap();
        wait_for(Duration::from_secs(5), || {
            h.logs("client")
                .iter()
                .any(|l| l == "driver: message on /svc/echo dropped: peer unreachable")
                .then_some(())
        });
        let token = seen.lock().unwrap()[0].reply.unwrap();
        // The token was dropped with the message.
        assert!(h.answer(token, b"pong").is_err());
        assert_eq!(h.stats()[0].undelivered, 1);
        // Without a hook: no route, as before.
        let h = HostedNucleus::start(test_config()).unwrap();
        h.spawn(
            "client",
            &client,
            contract(1, 10, false),
            Caps::with_channels(["/svc/echo"]),
        )
        .unwrap();
        wait_for(Duration::from_secs(5), || {
            h.logs("client")
                .iter()
                .any(|l| l == "driver: message on /svc/echo dropped: no route")
                .then_some(())
        });
    }

    #[test]
    fn deliver_with_hands_the_answer_to_the_callback() {
        let h = HostedNucleus::start(test_config()).unwrap();
        let echo = wat::parse_str(ECHO).unwrap();
        h.spawn(
            "echo",
            &echo,
            contract(1, 10, false),
            Caps::with_channels(["/svc/echo"]),
        )
        .unwrap();
        let (tx, rx) = mpsc::channel();
        let on_answer: AnswerFn = Box::new(move |a| tx.send(a).unwrap());
        h.deliver_with("echo", "/svc/echo", b"remote hello", Some(on_answer))
            .unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            b"remote hello"
        );
        // Without a callback the answer is dropped.
        h.deliver_with("echo", "/svc/echo", b"quiet", None).unwrap();
        wait_for(Duration::from_secs(5), || {
            h.logs("echo").iter().any(|l| l == "quiet").then_some(())
        });
        assert!(matches!(
            h.deliver_with("nobody", "/svc/echo", b"", Some(Box::new(|_| {}))),
            Err(HostedError::NoSuchDomain(_))
        ));
    }

    /// Stopping a domain drops the callbacks of the messages it did not
    /// answer: their callers learn at once that no answer will come.
    #[test]
    fn stopping_a_domain_releases_its_unanswered_callers() {
        let h = HostedNucleus::start(test_config()).unwrap();
        let greedy = wat::parse_str(GREEDY).unwrap();
        h.spawn(
            "g",
            &greedy,
            contract(1, 10, false),
            Caps::with_channels(["/svc/g"]),
        )
        .unwrap();
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let on_answer: AnswerFn = Box::new(move |a| {
            let _ = tx.send(a);
        });
        h.deliver_with("g", "/svc/g", b"never answered", Some(on_answer))
            .unwrap();
        h.stop("g").unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn on_started_reports_the_first_activation_or_why_not() {
        let h = HostedNucleus::start(test_config()).unwrap();
        let echo = wat::parse_str(ECHO).unwrap();
        let before = h.now_ns();
        h.spawn(
            "echo",
            &echo,
            contract(1, 10, false),
            Caps::with_channels(["/svc/echo"]),
        )
        .unwrap();
        let (tx, rx) = mpsc::channel();
        let t = tx.clone();
        h.on_started("echo", Box::new(move |r| t.send(r).unwrap()))
            .unwrap();
        let ns = rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .expect("started");
        assert!(ns > 0 && ns < 5_000_000_000, "{ns} ns");
        let s = h.stats();
        let first = s[0].first_activation_ns.expect("recorded");
        assert!(s[0].spawned_ns >= before, "{:?}", s[0]);
        assert_eq!(first - s[0].spawned_ns, ns);
        assert!(first <= h.now_ns());
        // Once started, a late caller is told at once, the same.
        let t = tx.clone();
        h.on_started("echo", Box::new(move |r| t.send(r).unwrap()))
            .unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), Ok(ns));

        // A trap in the first activation: an error, whether it happened
        // before or after the call.
        let trap = wat::parse_str(TRAP).unwrap();
        h.spawn("trap", &trap, contract(1, 10, false), Caps::none())
            .unwrap();
        let t = tx.clone();
        h.on_started("trap", Box::new(move |r| t.send(r).unwrap()))
            .unwrap();
        let r = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(r.is_err(), "{r:?}");
        let s = h.stats();
        let t = s.iter().find(|d| d.name == "trap").unwrap();
        assert_eq!(t.first_activation_ns, None);
        assert_eq!(t.failure(), r.as_ref().err().map(String::as_str));
        assert!(matches!(
            h.on_started("nobody", Box::new(|_| {})),
            Err(HostedError::NoSuchDomain(_))
        ));
    }

    /// Stopped, or the nucleus gone, before the first activation: driven
    /// by hand (no activation happens between the commands).
    #[test]
    fn on_started_fails_when_stopped_first() {
        let mut d = Driver::new(test_config(), FuelRate::new(1, 100), Instant::now());
        let echo = wat::parse_str(ECHO).unwrap();
        let (tx, rx) = mpsc::channel();
        for name in ["a", "b"] {
            let (ack, r) = mpsc::channel();
            assert!(d.command(Cmd::Spawn {
                name: name.into(),
                wasm: echo.clone(),
                contract: contract(1, 10, false),
                caps: Caps::none(),
                ack,
            }));
            r.recv().unwrap().unwrap();
            let (ack, r) = mpsc::channel();
            let t = tx.clone();
            let f: StartedFn = Box::new(move |res| t.send((name, res)).unwrap());
            assert!(d.command(Cmd::OnStarted {
                name: name.into(),
                f,
                ack,
            }));
            r.recv().unwrap().unwrap();
        }
        assert!(rx.try_recv().is_err(), "nothing decided yet");
        let (ack, r) = mpsc::channel();
        assert!(d.command(Cmd::Stop("a".into(), ack)));
        r.recv().unwrap().unwrap();
        assert_eq!(
            rx.try_recv().unwrap(),
            ("a", Err("stopped before its first activation".into()))
        );
        drop(d);
        assert_eq!(
            rx.try_recv().unwrap(),
            ("b", Err("the nucleus stopped".into()))
        );
    }

    /// `answer` takes only tokens given to the hook, each once.
    #[test]
    fn answer_redeems_only_remote_tokens() {
        let mut d = Driver::new(test_config(), FuelRate::new(1, 100), Instant::now());
        let (ack, r) = mpsc::channel();
        d.command(Cmd::Spawn {
            name: "a".into(),
            wasm: wat::parse_str(ECHO).unwrap(),
            contract: contract(1, 10, false),
            caps: Caps::none(),
            ack,
        });
        let id = r.recv().unwrap().unwrap();
        let local = d.tokens.mint(Dest::Domain(id, "/x".into())).0;
        let external = d.tokens.mint(Dest::External(id, None)).0;
        let remote = d.tokens.mint(Dest::Remote(id, "/x".into())).0;
        for t in [local, external] {
            assert!(matches!(
                d.answer(t, b"forged".to_vec()),
                Err(HostedError::Undeliverable(w)) if w == STALE_TOKEN
            ));
            assert!(d.tokens.contains(t), "left to its owner");
        }
        d.answer(remote, b"ok".to_vec()).unwrap();
        assert!(!d.tokens.contains(remote));
        assert!(d.answer(remote, b"again".to_vec()).is_err());
    }

    #[test]
    fn logs_since_follows_with_a_cursor() {
        let h = HostedNucleus::start(HostedConfig {
            log_lines: 4,
            ..test_config()
        })
        .unwrap();
        let echo = wat::parse_str(ECHO).unwrap();
        h.spawn(
            "echo",
            &echo,
            contract(1, 10, false),
            Caps::with_channels(["/svc/echo"]),
        )
        .unwrap();
        // Each request is answered (so logged) before the next is sent.
        let say = |w: &str| {
            h.request("echo", "/svc/echo", w.as_bytes(), Duration::from_secs(5))
                .unwrap();
        };
        let texts = |c: &LogChunk| c.lines.iter().map(|l| l.text.clone()).collect::<Vec<_>>();
        let empty = h.logs_since("echo", 0).unwrap();
        assert_eq!(empty, LogChunk::default());
        say("a");
        say("b");
        let c = h.logs_since("echo", 0).unwrap();
        assert_eq!(texts(&c), ["a", "b"]);
        assert_eq!(c.lines.iter().map(|l| l.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!((c.next, c.dropped), (2, 0));
        assert!(c.lines[0].at_ns <= c.lines[1].at_ns && c.lines[1].at_ns <= h.now_ns());
        // Nothing new: the same cursor back.
        let c = h.logs_since("echo", c.next).unwrap();
        assert!(c.lines.is_empty());
        assert_eq!((c.next, c.dropped), (2, 0));
        say("c");
        let c = h.logs_since("echo", c.next).unwrap();
        assert_eq!(texts(&c), ["c"]);
        assert_eq!((c.lines[0].seq, c.next, c.dropped), (3, 3, 0));
        // Five more overflow the ring of 4: line 4 falls out.
        for w in ["d", "e", "f", "g", "h"] {
            say(w);
        }
        let c2 = h.logs_since("echo", c.next).unwrap();
        assert_eq!(texts(&c2), ["e", "f", "g", "h"]);
        assert_eq!((c2.lines[0].seq, c2.next, c2.dropped), (5, 8, 1));
        assert_eq!(h.logs_since("echo", 0).unwrap().dropped, 4);
        assert_eq!(h.logs_since("echo", 6).unwrap().dropped, 0);
        assert_eq!(h.logs("echo"), ["e", "f", "g", "h"]);
        assert_eq!(h.stats()[0].logs_dropped, 4);
        assert!(matches!(
            h.logs_since("nobody", 0),
            Err(HostedError::NoSuchDomain(_))
        ));
        // A cursor from an earlier domain of the same name starts over.
        h.stop("echo").unwrap();
        h.spawn(
            "echo",
            &echo,
            contract(1, 10, false),
            Caps::with_channels(["/svc/echo"]),
        )
        .unwrap();
        say("i");
        let c = h.logs_since("echo", c2.next).unwrap();
        assert_eq!(texts(&c), ["i"]);
        assert_eq!((c.lines[0].seq, c.next, c.dropped), (1, 1, 0));
    }

    /// A dead activation thread makes every call fail instead of hang.
    #[test]
    fn calls_fail_once_the_activation_thread_is_gone() {
        let hook: OutboundHook = Arc::new(|_| panic!("the hook panics (on purpose)"));
        let h = HostedNucleus::start(HostedConfig {
            outbound: Some(hook),
            ..test_config()
        })
        .unwrap();
        let client = wat::parse_str(CLIENT).unwrap();
        h.spawn(
            "client",
            &client,
            contract(1, 10, false),
            Caps::with_channels(["/svc/echo"]),
        )
        .unwrap();
        wait_for(Duration::from_secs(5), || {
            matches!(h.logs_since("client", 0), Err(HostedError::Stopped)).then_some(())
        });
        assert!(h.stats().is_empty());
        assert!(h.logs("client").is_empty());
        assert!(matches!(h.answer(1, b""), Err(HostedError::Stopped)));
        assert!(matches!(
            h.on_started("client", Box::new(|_| {})),
            Err(HostedError::Stopped)
        ));
        assert!(matches!(h.stop("client"), Err(HostedError::Stopped)));
        assert!(matches!(
            h.request("client", "/svc/echo", b"", Duration::from_secs(60)),
            Err(HostedError::Stopped)
        ));
        h.shutdown();
    }

    /// A callback that calls back into the handle gets an error, not a
    /// deadlock.
    #[test]
    fn reentrant_calls_fail_instead_of_deadlocking() {
        let h = Arc::new(HostedNucleus::start(test_config()).unwrap());
        let echo = wat::parse_str(ECHO).unwrap();
        h.spawn(
            "echo",
            &echo,
            contract(1, 10, false),
            Caps::with_channels(["/svc/echo"]),
        )
        .unwrap();
        let (tx, rx) = mpsc::channel();
        let inner = Arc::downgrade(&h);
        let on_answer: AnswerFn = Box::new(move |_| {
            let r = inner
                .upgrade()
                .map(|h| h.deliver("echo", "/svc/echo", b"x"));
            tx.send(matches!(r, Some(Err(HostedError::Undeliverable(_)))))
                .unwrap();
        });
        h.deliver_with("echo", "/svc/echo", b"hi", Some(on_answer))
            .unwrap();
        assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn pins_the_activation_thread() {
        // An impossible CPU: logged, not fatal.
        let h = HostedNucleus::start(HostedConfig {
            pin_cpu: Some(usize::MAX),
            ..test_config()
        })
        .unwrap();
        assert!(h.stats().is_empty());
        drop(h);
        let h = HostedNucleus::start(HostedConfig {
            pin_cpu: Some(0),
            ..test_config()
        })
        .unwrap();
        let allowed = |status: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
        };
        let process = allowed(&std::fs::read_to_string("/proc/self/status").unwrap());
        if process.as_deref() == Some("0") {
            return; // Already confined to CPU 0: nothing to tell apart.
        }
        // Other tests' activation threads may run too; ours is the one on
        // CPU 0 only.
        let pinned = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(Result::ok)
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "metta-nucleus")
            })
            .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
            .any(|s| allowed(&s).as_deref() == Some("0"));
        assert!(pinned, "no activation thread pinned to CPU 0");
        drop(h);
    }
}
