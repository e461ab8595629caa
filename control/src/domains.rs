//! The domains this node runs: one [`HostedNucleus`] per CPU lane, kept in
//! step with the registry, and the routing of messages between domains on
//! different lanes and nodes.
//!
//! **Reconciling.** The registry says which domains run where
//! ([`DomainRecord`]: node, lane, epoch). After every applied log entry this
//! node compares the domains placed on it with the ones its lanes run, stops
//! those that are gone (or whose epoch changed) and starts the new ones from
//! the module in the registry's content-addressed store, with the contract
//! and capabilities fixed in the record. A domain that fails to load is
//! remembered with its reason, so `run` can report it.
//!
//! **Lanes.** A lane's driver is started the first time a domain is placed on
//! it. The first lane calibrates the fuel rate; later lanes start from that
//! rate and track their own.
//!
//! **Routing.** A message sent on a name that no domain on the sender's lane
//! serves reaches the lane's outbound hook, which looks the name up in the
//! registry ([`Registry::route`]: the domain whose capability covers the name
//! with the longest prefix) — channels are addressed to domains, never to
//! nodes. The message then goes to that domain's lane here, or, in order, to
//! its node in a [`NodeCall::Deliver`] batch. An answer comes back the same
//! way to the sender's lane, by the reply token its driver minted.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use metta_nucleus::accounting::{self, Counters, RunState};
use metta_nucleus::{Caps, FuelRate};
use metta_proto::{
    ApiError, CapSet, DomainRuntime, Envelope, LogLines, NodeCall, NodeId, NodeKind, Reply,
    ReplyRef, Request, Response, Subject,
};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::{debug, info, warn};

use crate::hosted::{DomainState, HostedConfig, HostedError, HostedNucleus, Outbound};
use crate::native::NativeLinks;
use crate::registry::{DomainRecord, Registry};
use crate::transport::Transport;

/// Messages waiting for the router (from this node's lanes and the native
/// nodes it links); a lane's send fails when it is full.
pub const ROUTER_QUEUE: usize = 65_536;
/// Messages waiting to go to one other node; beyond, they are dropped.
pub const PEER_QUEUE: usize = 16_384;

/// Envelopes sent to a node in one [`NodeCall::Deliver`].
pub const MAX_DELIVER_BATCH: usize = 256;
/// Attempts to hand a batch to another node before dropping it.
const DELIVER_ATTEMPTS: u32 = 3;

/// A domain a lane runs.
#[derive(Debug, Clone, Copy)]
struct Running {
    epoch: u64,
    lane: u32,
}

#[derive(Default)]
struct State {
    running: HashMap<String, Running>,
    /// Domains that could not be started: epoch and why.
    failed: HashMap<String, (u64, String)>,
}

/// The reply to a [`NodeCall::Call`]: the answer `rx` brings within
/// `timeout_ms`; `dropped` says why when its sender went away unanswered.
pub(crate) async fn answer_within(
    rx: oneshot::Receiver<Vec<u8>>,
    timeout_ms: u32,
    dropped: &str,
) -> Response {
    match tokio::time::timeout(Duration::from_millis(timeout_ms.into()), rx).await {
        Ok(Ok(a)) => Ok(Reply::Answer(a)),
        Ok(Err(_)) => Err(ApiError::Domain(dropped.into())),
        Err(_) => Err(ApiError::Domain(format!(
            "no answer within {timeout_ms} ms"
        ))),
    }
}

/// The reply to a [`NodeCall::WaitStarted`] for `name`: `started` (its
/// start time, µs) within `timeout_ms`.
pub(crate) async fn started_within(
    name: &str,
    timeout_ms: u32,
    started: impl std::future::Future<Output = Result<u64, ApiError>>,
) -> Response {
    match tokio::time::timeout(Duration::from_millis(timeout_ms.into()), started).await {
        Ok(r) => r.map(|start_us| Reply::Started { start_us }),
        Err(_) => Err(ApiError::Domain(format!(
            "{name} did not start within {timeout_ms} ms"
        ))),
    }
}

/// How a node is reached for a [`NodeCall`] ([`Domains::reach`]).
#[derive(Debug)]
pub enum Reach {
    /// A native node whose link this node holds: serve it here.
    Native(NodeCall),
    /// Send this request to this address, whose server must be this node
    /// (for a native node: the control node registered at its address).
    Remote(String, Request, Subject),
    /// The node is not in the registry.
    Gone,
}

/// A message on its way to a domain on another lane or node.
struct Routed {
    to_node: NodeId,
    env: Envelope,
}

/// The domains of one node.
pub struct Domains {
    me: NodeId,
    registry: Arc<RwLock<Registry>>,
    transport: Arc<Transport>,
    native: Arc<NativeLinks>,
    lanes: Mutex<BTreeMap<u32, Arc<HostedNucleus>>>,
    rate: Mutex<Option<FuelRate>>,
    state: Mutex<State>,
    changed: Notify,
    routed: mpsc::Sender<Routed>,
    answers: mpsc::UnboundedSender<(ReplyRef, Vec<u8>)>,
    /// Messages dropped because a queue was full.
    dropped: std::sync::atomic::AtomicU64,
    /// Which node each reply token (lane, token) minted here went to, so
    /// only that node can answer it.
    awaited: Mutex<Awaited>,
}

/// Most reply tokens remembered for [`Domains::answer_expected_from`] (the
/// lanes' own token tables forget beyond the same number).
const AWAITED_MAX: usize = 65_536;

/// Reply tokens (lane, token) of messages this node sent on to other nodes,
/// and to which, per node that minted them: its own lanes' and, on a
/// control node, those of the native nodes it links. One table per minter,
/// so a node that floods messages forgets only its own tokens.
#[derive(Default)]
struct Awaited(HashMap<NodeId, crate::limits::Recent<(u32, u64), NodeId>>);

impl Awaited {
    fn insert(&mut self, r: ReplyRef, to: NodeId) {
        self.0
            .entry(r.node)
            .or_insert_with(|| crate::limits::Recent::new(AWAITED_MAX))
            .insert((r.lane, r.token), to);
    }

    fn take(&mut self, minter: NodeId, lane: u32, token: u64, from: NodeId) -> bool {
        self.0
            .get_mut(&minter)
            .and_then(|t| t.take_if(&(lane, token), |to| *to == from))
            .is_some()
    }
}

impl std::fmt::Debug for Domains {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domains")
            .field("node", &self.me)
            .finish_non_exhaustive()
    }
}

fn caps_of(c: &CapSet) -> Caps {
    Caps {
        log: c.log,
        clock: c.clock,
        channels: c.channels.clone(),
    }
}

fn domain_err(e: HostedError) -> ApiError {
    match e {
        HostedError::NoSuchDomain(n) => ApiError::NotFound(format!("domain {n} on this node")),
        HostedError::Timeout => ApiError::Domain("no answer in time".into()),
        e => ApiError::Domain(e.to_string()),
    }
}

impl Domains {
    /// Starts the reconciler and the routers. `applied` ticks after every
    /// applied registry entry.
    pub fn start(
        me: NodeId,
        registry: Arc<RwLock<Registry>>,
        transport: Arc<Transport>,
        native: Arc<NativeLinks>,
        applied: watch::Receiver<u64>,
    ) -> Arc<Domains> {
        let (routed, routed_rx) = mpsc::channel(ROUTER_QUEUE);
        let (answers, answers_rx) = mpsc::unbounded_channel();
        let d = Arc::new(Domains {
            me,
            registry,
            transport,
            native,
            lanes: Mutex::new(BTreeMap::new()),
            rate: Mutex::new(None),
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            routed,
            answers,
            dropped: std::sync::atomic::AtomicU64::new(0),
            awaited: Mutex::new(Awaited::default()),
        });
        tokio::spawn(d.clone().reconcile_loop(applied));
        tokio::spawn(d.clone().route_loop(routed_rx));
        tokio::spawn(d.clone().answer_loop(answers_rx));
        d
    }

    fn registry(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|e| e.into_inner())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lane(&self, lane: u32) -> Option<Arc<HostedNucleus>> {
        self.lanes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&lane)
            .cloned()
    }

    /// The lane running `name`.
    fn lane_of(&self, name: &str) -> Result<Arc<HostedNucleus>, ApiError> {
        let r = self
            .state()
            .running
            .get(name)
            .copied()
            .ok_or_else(|| ApiError::NotFound(format!("domain {name} is not running here")))?;
        self.lane(r.lane)
            .ok_or_else(|| ApiError::Internal(format!("lane {} is gone", r.lane)))
    }

    /// The driver of `lane`, started if needed (blocking: calibration).
    fn ensure_lane(self: &Arc<Self>, lane: u32) -> Result<Arc<HostedNucleus>, HostedError> {
        if let Some(l) = self.lane(lane) {
            return Ok(l);
        }
        let rate = *self.rate.lock().unwrap_or_else(|e| e.into_inner());
        let hook = {
            let registry = self.registry.clone();
            let routed = self.routed.clone();
            let me = self.me;
            Arc::new(move |out: Outbound| -> Result<(), String> {
                let reg = registry.read().unwrap_or_else(|e| e.into_inner());
                let dest = reg
                    .route(&out.from, &out.channel)
                    .ok_or_else(|| "no domain serves this name".to_string())?;
                let to_node = dest.node;
                let env = Envelope {
                    from: out.from,
                    to: dest.name.clone(),
                    channel: out.channel,
                    payload: out.payload,
                    reply: out.reply.map(|token| ReplyRef {
                        node: me,
                        lane,
                        token,
                    }),
                };
                routed
                    .try_send(Routed { to_node, env })
                    .map_err(|e| match e {
                        mpsc::error::TrySendError::Full(_) => {
                            "the node's router is full; message dropped".to_string()
                        }
                        mpsc::error::TrySendError::Closed(_) => {
                            "the node is shutting down".to_string()
                        }
                    })
            })
        };
        let cfg = HostedConfig {
            capacity_ppm: metta_scheduler::LANE_CAPACITY_PPM,
            fuel_rate: rate,
            outbound: Some(hook),
            ..HostedConfig::default()
        };
        let h = Arc::new(HostedNucleus::start(cfg)?);
        info!(lane, rate = ?h.fuel_rate(), "nucleus lane started");
        self.rate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(h.fuel_rate());
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        Ok(lanes.entry(lane).or_insert(h).clone())
    }

    /// Starts lane 0 ahead of the first domain, so `run` does not wait for
    /// the calibration.
    pub fn warm_up(self: &Arc<Self>) {
        let d = self.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = d.ensure_lane(0) {
                warn!("nucleus lane 0: {e}");
            }
        });
    }

    /// Stops every lane.
    pub fn shutdown(&self) {
        let lanes = std::mem::take(&mut *self.lanes.lock().unwrap_or_else(|e| e.into_inner()));
        for l in lanes.values() {
            l.shutdown();
        }
    }

    // ------------------------------------------------------------ reconciling

    async fn reconcile_loop(self: Arc<Self>, mut applied: watch::Receiver<u64>) {
        loop {
            let d = self.clone();
            let _ = tokio::task::spawn_blocking(move || d.reconcile_once()).await;
            self.changed.notify_waiters();
            if applied.changed().await.is_err() {
                return;
            }
        }
    }

    /// Brings the lanes in line with the registry (blocking).
    fn reconcile_once(self: &Arc<Self>) {
        let desired: Vec<(DomainRecord, Option<Vec<u8>>)> = {
            let reg = self.registry();
            reg.domains
                .values()
                .filter(|d| d.node == self.me)
                .map(|d| (d.clone(), reg.blobs.get(&d.module_hash).cloned()))
                .collect()
        };
        let want: HashMap<&str, u64> = desired
            .iter()
            .map(|(d, _)| (d.name.as_str(), d.epoch))
            .collect();
        let stale: Vec<(String, Running)> = self
            .state()
            .running
            .iter()
            .filter(|(n, r)| want.get(n.as_str()) != Some(&r.epoch))
            .map(|(n, r)| (n.clone(), *r))
            .collect();
        for (name, r) in stale {
            if let Some(l) = self.lane(r.lane) {
                if let Err(e) = l.stop(&name) {
                    debug!(domain = %name, "stop: {e}");
                }
            }
            self.state().running.remove(&name);
            info!(domain = %name, epoch = r.epoch, "domain stopped");
        }
        self.state()
            .failed
            .retain(|n, (epoch, _)| want.get(n.as_str()) == Some(epoch));
        for (rec, wasm) in desired {
            {
                let st = self.state();
                if st.running.contains_key(&rec.name) || st.failed.contains_key(&rec.name) {
                    continue;
                }
            }
            let result = match wasm {
                None => Err("its module is not in the registry".to_string()),
                Some(wasm) => self
                    .ensure_lane(rec.lane)
                    .and_then(|l| l.spawn(&rec.name, &wasm, rec.contract, caps_of(&rec.caps)))
                    .map_err(|e| e.to_string()),
            };
            let mut st = self.state();
            match result {
                Ok(_) => {
                    info!(domain = %rec.name, epoch = rec.epoch, lane = rec.lane, "domain started");
                    st.running.insert(
                        rec.name.clone(),
                        Running {
                            epoch: rec.epoch,
                            lane: rec.lane,
                        },
                    );
                }
                Err(why) => {
                    warn!(domain = %rec.name, "cannot start: {why}");
                    st.failed.insert(rec.name.clone(), (rec.epoch, why));
                }
            }
        }
    }

    // ---------------------------------------------------------------- routing

    /// Counts a message dropped on a full queue; says so at 1, 2, 4, ...
    fn note_dropped(&self, node: NodeId) {
        let n = self
            .dropped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if n.is_power_of_two() {
            warn!(node, dropped = n, "message queue full; messages dropped");
        }
    }

    async fn route_loop(self: Arc<Self>, mut rx: mpsc::Receiver<Routed>) {
        let mut peers: HashMap<NodeId, mpsc::Sender<Envelope>> = HashMap::new();
        while let Some(Routed { to_node, env }) = rx.recv().await {
            if to_node == self.me {
                let d = self.clone();
                // Same node, another lane.
                let _ = tokio::task::spawn_blocking(move || d.deliver_local(env)).await;
                continue;
            }
            if let Some(r) = env.reply {
                self.awaited
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(r, to_node);
            }
            let tx = peers.entry(to_node).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(PEER_QUEUE);
                tokio::spawn(self.clone().peer_loop(to_node, rx));
                tx
            });
            // A slow or unreachable node's queue is bounded: beyond it,
            // messages to it are dropped (delivery is at most once).
            match tx.try_send(env) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => self.note_dropped(to_node),
                Err(mpsc::error::TrySendError::Closed(env)) => {
                    warn!(node = to_node, to = %env.to, "router for node gone; message dropped");
                    peers.remove(&to_node);
                }
            }
        }
    }

    /// Sends envelopes to one node, in order, batching what queued up.
    async fn peer_loop(self: Arc<Self>, node: NodeId, mut rx: mpsc::Receiver<Envelope>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_DELIVER_BATCH {
                match rx.try_recv() {
                    Ok(e) => batch.push(e),
                    Err(_) => break,
                }
            }
            let n = batch.len();
            let call = NodeCall::Deliver(batch);
            let mut attempt = 0;
            loop {
                attempt += 1;
                let r = match self.reach(node, call.clone()) {
                    Reach::Native(call) => Ok(self.native.serve(node, call).await),
                    Reach::Remote(addr, req, expect) => {
                        self.transport.call_node(&addr, &expect, &req).await
                    }
                    Reach::Gone => {
                        warn!(node, "{n} message(s) dropped: node left the cluster");
                        break;
                    }
                };
                match r {
                    Ok(Ok(_)) => break,
                    Ok(Err(e)) => {
                        warn!(node, "{n} message(s) refused: {e}");
                        break;
                    }
                    Err(e) if attempt < DELIVER_ATTEMPTS => {
                        debug!(node, "deliver: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                    }
                    Err(e) => {
                        warn!(node, "{n} message(s) dropped: {e}");
                        break;
                    }
                }
            }
        }
    }

    /// How to send `call` to node `id`: a native node whose link this node
    /// holds is served here; another native node through the control node
    /// holding its link (its registered address); a hosted node directly.
    pub fn reach(&self, id: NodeId, call: NodeCall) -> Reach {
        if self.native.holds(id) {
            return Reach::Native(call);
        }
        let reg = self.registry();
        match reg.nodes.get(&id) {
            None => Reach::Gone,
            Some(n) if n.kind == NodeKind::Native => {
                // Its link is held by the control node at its address.
                let proxy = reg
                    .nodes
                    .values()
                    .find(|p| p.role == metta_proto::Role::Control && p.addr == n.addr);
                match proxy {
                    Some(p) => Reach::Remote(
                        n.addr.clone(),
                        Request::Proxy { node: id, call },
                        Subject::Node(p.id),
                    ),
                    None => Reach::Gone,
                }
            }
            Some(n) => Reach::Remote(n.addr.clone(), Request::Node(call), Subject::Node(id)),
        }
    }

    /// Whether the reply token (`minter`, `lane`, `token`) went with a
    /// message this node sent to `node` (and is not answered yet); a yes is
    /// taken.
    pub fn answer_expected_from(
        &self,
        minter: NodeId,
        lane: u32,
        token: u64,
        node: NodeId,
    ) -> bool {
        self.awaited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(minter, lane, token, node)
    }

    /// Sends `env` (from a native domain) on to its domain on `to_node`.
    pub fn send(&self, to_node: NodeId, env: Envelope) {
        if self.routed.try_send(Routed { to_node, env }).is_err() {
            self.note_dropped(to_node);
        }
    }

    /// Sends an answer (from a native domain) back to where `r` says.
    pub fn send_answer(&self, r: ReplyRef, payload: Vec<u8>) {
        let _ = self.answers.send((r, payload));
    }

    /// Hands `env` to its domain here (blocking: waits for the driver).
    fn deliver_local(&self, env: Envelope) -> Result<(), ApiError> {
        let lane = self.lane_of(&env.to)?;
        let on_answer = env.reply.map(|r| {
            let answers = self.answers.clone();
            Box::new(move |payload: Vec<u8>| {
                let _ = answers.send((r, payload));
            }) as crate::hosted::AnswerFn
        });
        lane.deliver_with(&env.to, &env.channel, &env.payload, on_answer)
            .map_err(domain_err)
    }

    async fn answer_loop(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<(ReplyRef, Vec<u8>)>) {
        while let Some((r, payload)) = rx.recv().await {
            if r.node == self.me {
                if let Some(l) = self.lane(r.lane) {
                    let _ = tokio::task::spawn_blocking(move || l.answer(r.token, &payload)).await;
                }
                continue;
            }
            let call = NodeCall::Answer {
                token: r.token,
                lane: r.lane,
                payload,
            };
            match self.reach(r.node, call) {
                Reach::Native(call) => {
                    if let Err(e) = self.native.serve(r.node, call).await {
                        debug!("answer to node/{}: {e}", r.node);
                    }
                }
                Reach::Remote(addr, req, expect) => {
                    let transport = self.transport.clone();
                    tokio::spawn(async move {
                        if let Err(e) = transport.call_node(&addr, &expect, &req).await {
                            debug!("answer to node/{}: {e}", r.node);
                        }
                    });
                }
                Reach::Gone => {}
            }
        }
    }

    // ---------------------------------------------------------------- serving

    /// Serves a call from another node.
    pub async fn serve(self: &Arc<Self>, call: NodeCall) -> Response {
        match call {
            NodeCall::Stats => {
                let d = self.clone();
                let rows = tokio::task::spawn_blocking(move || d.runtime())
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
                Ok(Reply::Runtime(rows))
            }
            NodeCall::Logs { name, after } => {
                let lane = self.lane_of(&name)?;
                let chunk = tokio::task::spawn_blocking(move || lane.logs_since(&name, after))
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?
                    .map_err(domain_err)?;
                Ok(Reply::Logs(LogLines {
                    lines: chunk.lines.into_iter().map(|l| (l.seq, l.text)).collect(),
                    next: chunk.next,
                    dropped: chunk.dropped,
                }))
            }
            NodeCall::Call {
                name,
                channel,
                payload,
                timeout_ms,
            } => {
                let lane = self.lane_of(&name)?;
                let (tx, rx) = oneshot::channel();
                let answer: crate::hosted::AnswerFn = Box::new(move |a| {
                    let _ = tx.send(a);
                });
                tokio::task::spawn_blocking(move || {
                    lane.deliver_with(&name, &channel, &payload, Some(answer))
                })
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?
                .map_err(domain_err)?;
                answer_within(rx, timeout_ms, "the domain stopped before answering").await
            }
            NodeCall::WaitStarted {
                name,
                epoch,
                timeout_ms,
            } => started_within(&name, timeout_ms, self.wait_started(&name, epoch)).await,
            NodeCall::Deliver(envs) => {
                let d = self.clone();
                tokio::task::spawn_blocking(move || {
                    for env in envs {
                        let (from, to) = (env.from.clone(), env.to.clone());
                        if let Err(e) = d.deliver_local(env) {
                            debug!(%from, %to, "undeliverable: {e}");
                        }
                    }
                })
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
                Ok(Reply::Done)
            }
            NodeCall::Answer {
                token,
                lane,
                payload,
            } => {
                let l = self
                    .lane(lane)
                    .ok_or_else(|| ApiError::NotFound(format!("lane {lane}")))?;
                tokio::task::spawn_blocking(move || l.answer(token, &payload))
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?
                    .map_err(domain_err)?;
                Ok(Reply::Done)
            }
        }
    }

    /// Waits until `name` at `epoch` has completed its first activation; the
    /// time from spawn to then, µs.
    pub async fn wait_started(&self, name: &str, epoch: u64) -> Result<u64, ApiError> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let found = {
                let st = self.state();
                match (st.failed.get(name), st.running.get(name)) {
                    (Some((e, why)), _) if *e == epoch => Err(why.clone()),
                    (_, Some(r)) if r.epoch == epoch => Ok(Some(r.lane)),
                    _ => Ok(None),
                }
            };
            match found {
                Err(why) => return Err(ApiError::Domain(format!("{name} failed to start: {why}"))),
                Ok(Some(lane)) => {
                    let lane = self
                        .lane(lane)
                        .ok_or_else(|| ApiError::Internal("lane gone".into()))?;
                    let (tx, rx) = oneshot::channel();
                    let n = name.to_string();
                    tokio::task::spawn_blocking(move || {
                        lane.on_started(
                            &n,
                            Box::new(move |r| {
                                let _ = tx.send(r);
                            }),
                        )
                    })
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?
                    .map_err(domain_err)?;
                    return match rx.await {
                        Ok(Ok(ns)) => Ok(ns / 1_000),
                        Ok(Err(why)) => {
                            Err(ApiError::Domain(format!("{name} failed to start: {why}")))
                        }
                        Err(_) => Err(ApiError::Domain(format!("{name} was stopped"))),
                    };
                }
                Ok(None) => {}
            }
            notified.await;
        }
    }

    /// What this node reports about its domains (blocking).
    fn runtime(&self) -> Vec<DomainRuntime> {
        let (running, failed) = {
            let st = self.state();
            (st.running.clone(), st.failed.clone())
        };
        let lanes: Vec<(u32, Arc<HostedNucleus>)> = self
            .lanes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let mut out = Vec::new();
        for (lane_no, lane) in lanes {
            for s in lane.stats() {
                let Some(r) = running.get(&s.name) else {
                    continue;
                };
                if r.lane != lane_no {
                    continue;
                }
                let figures = accounting::figures(&lane.periods(&s.name), s.contract.slice_ns);
                let state = match &s.state {
                    DomainState::Runnable => RunState::Running,
                    DomainState::Waiting => RunState::Waiting,
                    DomainState::Failed(why) => RunState::Failed(why),
                };
                let counters = Counters {
                    cpu_ns: s.cpu_ns_delivered,
                    activations: s.activations,
                    memory_bytes: s.memory_bytes,
                    undelivered: s.undelivered,
                    spawned_ns: s.spawned_ns,
                    first_activation_ns: s.first_activation_ns,
                };
                let row = accounting::runtime_row(&s.name, r.epoch, state, &counters, figures);
                out.push(row);
            }
        }
        for (name, (epoch, why)) in failed {
            out.push(DomainRuntime::start_failed(name, epoch, &why));
        }
        out
    }
}
