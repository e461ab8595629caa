//! The links of native nodes: the control-node side of [`Request::Sync`].
//!
//! A native node (the bare-metal kernel) runs no Raft and accepts no
//! connections. It keeps one TLS/TCP connection to a control node and pulls
//! over it: every [`NodeSync`] reports its domains and carries what they
//! produced (messages for domains elsewhere, answers, log lines), and the
//! answer ([`NodeWork`]) carries what is waiting for it: domains to start
//! and stop, messages and answers for its domains, a request for runtime
//! figures. When there is nothing, the answer is held for up to
//! [`NodeSync::hold_ms`] (a long poll), so work reaches the node as soon as
//! it exists.
//!
//! The control node holding the link is the native node's **proxy**: it
//! records the node's heartbeats with its own address, so the rest of the
//! cluster sends the native node's [`NodeCall`]s to it
//! ([`Request::Proxy`]), and serves them here ([`NativeLinks::serve`]) from
//! the node's mailbox and from what the node reported: `run` waits for the
//! reported start, `logs` reads the lines it sent, `call` and channel
//! messages are queued for its next sync, and `ps` asks it for figures.
//!
//! **What it runs** is not sent as commands that could be lost: every sync
//! compares the domains the registry places on the node with the ones it
//! reports ([`plan`]), so a lost answer is repaired by the next sync.
//! What the node sends is taken once: a sync resent after a lost answer
//! carries the same batch number ([`NodeSync::seq`]) and its batch is not
//! taken again. What goes *to* it is numbered too ([`NodeWork::seq`]): a
//! batch of messages and answers is sent again until a sync acknowledges it
//! ([`NodeSync::work_seq`]), and the node carries out each number once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use metta_proto::{
    ApiError, DomainRuntime, Envelope, LogLines, NativeDomain, NativeState, NodeCall, NodeId,
    NodeSync, NodeWork, Reply, ReplyRef, Response, StartDomain, PROXY_LANE,
};
use tokio::sync::{oneshot, watch, Notify};
use tracing::{debug, info, warn};

use crate::domains::{answer_within, started_within};
use crate::limits::Recent;
use crate::registry::{DomainRecord, Registry};

/// Longest a sync is held when there is no work.
pub const MAX_HOLD: Duration = Duration::from_secs(2);
/// Log lines kept per domain of a native node.
pub const LOG_LINES: usize = 1_024;
/// Messages and answers queued for a native node before the oldest go.
pub const MAILBOX: usize = 4_096;
/// How often a sync also counts as the node's heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// A link with no sync for this long is no longer this node's to serve:
/// calls go to the node's registered address again.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(10);
/// A node silent for longer than this (the liveness window) gets no calls.
pub const SILENT: Duration = Duration::from_secs(3);
/// Runtime figures younger than this answer `ps` without asking the node.
const STATS_FRESH: Duration = Duration::from_millis(500);
/// How long `ps` waits for a native node's figures.
/// Longest log line kept from a native node (longer ones are cut).
pub const MAX_LOG_LINE: usize = 4096;
/// Most domains a native node's report may list.
pub const MAX_REPORTED: usize = 4096;
/// Reply tokens of messages delivered to one native node that it may still
/// answer.
const AWAITED_MAX: usize = 65_536;
const STATS_WAIT: Duration = Duration::from_secs(3);

/// A domain's log lines kept here: a ring with sequence numbers.
#[derive(Debug, Default)]
struct LogRing {
    lines: VecDeque<(u64, String)>,
    next_seq: u64,
}

impl LogRing {
    fn push(&mut self, text: String) {
        self.next_seq += 1;
        if self.lines.len() >= LOG_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back((self.next_seq, text));
    }

    /// The lines after `after` (as hosted lanes answer `logs`).
    fn since(&self, after: u64) -> LogLines {
        // A cursor past the last line is from an earlier domain of the name.
        let after = if after > self.next_seq { 0 } else { after };
        let lines: Vec<(u64, String)> = self
            .lines
            .iter()
            .filter(|(s, _)| *s > after)
            .cloned()
            .collect();
        match (lines.first(), lines.last()) {
            (Some(first), Some(last)) => LogLines {
                dropped: first.0 - after - 1,
                next: last.0,
                lines,
            },
            _ => LogLines {
                lines,
                next: after,
                dropped: 0,
            },
        }
    }
}

/// A numbered batch of messages and answers for a native node.
type Batch = (u64, Vec<Envelope>, Vec<(u64, Vec<u8>)>);

/// One native node's link, as this control node holds it.
struct Link {
    /// Bumped by every sync: a held sync that sees it change gives way.
    generation: u64,
    /// The batch number of the last sync taken ([`NodeSync::seq`]).
    last_seq: Option<u64>,
    /// The batch of messages and answers sent and not yet acknowledged
    /// (its [`NodeWork::seq`]), sent again until it is.
    inflight: Option<Batch>,
    /// The last batch the node said it carried out.
    acked_work: u64,
    /// The number of the next batch.
    next_work_seq: u64,
    /// When its last sync arrived.
    last_sync: Option<Instant>,
    /// When a sync last counted as a heartbeat.
    last_heartbeat: Option<Instant>,
    /// Its domains, as last reported.
    reported: Vec<NativeDomain>,
    /// Messages for its domains.
    deliver: VecDeque<Envelope>,
    /// Answers to its domains' messages: `(token, bytes)`.
    answers: VecDeque<(u64, Vec<u8>)>,
    /// Ask for runtime figures in the next answer.
    want_stats: bool,
    stats: Option<(Instant, Vec<DomainRuntime>)>,
    logs: HashMap<String, LogRing>,
    /// Calls relayed to it (`mettactl call`), by the token of their
    /// [`ReplyRef`].
    calls: HashMap<u64, oneshot::Sender<Vec<u8>>>,
    /// The [`ReplyRef`]s of messages delivered to it: the only answers it
    /// may send (a native node answers for its own domains, nobody else's).
    awaited: HashMap<NodeId, Recent<(u32, u64), ()>>,
    /// Wakes its held sync.
    work: Arc<Notify>,
    /// Ticks after every sync it made.
    synced: watch::Sender<u64>,
}

impl Link {
    fn new() -> Link {
        Link {
            generation: 0,
            last_seq: None,
            inflight: None,
            acked_work: 0,
            next_work_seq: 1,
            last_sync: None,
            last_heartbeat: None,
            reported: Vec::new(),
            deliver: VecDeque::new(),
            answers: VecDeque::new(),
            want_stats: false,
            stats: None,
            logs: HashMap::new(),
            calls: HashMap::new(),
            awaited: HashMap::new(),
            work: Arc::new(Notify::new()),
            synced: watch::channel(0).0,
        }
    }
}

/// What to start and stop on a native node: the domains `placed` on it by
/// the registry against the ones it `reported` (by name and epoch). A domain
/// reported with another epoch is stopped and started again.
pub fn plan<'a>(
    placed: &'a [DomainRecord],
    reported: &[NativeDomain],
) -> (Vec<&'a DomainRecord>, Vec<String>) {
    let stop: Vec<String> = reported
        .iter()
        .filter(|r| {
            !placed
                .iter()
                .any(|p| p.name == r.name && p.epoch == r.epoch)
        })
        .map(|r| r.name.clone())
        .collect();
    let start: Vec<&DomainRecord> = placed
        .iter()
        .filter(|p| {
            !reported
                .iter()
                .any(|r| r.name == p.name && r.epoch == p.epoch)
        })
        .collect();
    (start, stop)
}

/// Where the messages a native node's domains sent go: `(node, envelope)`,
/// resolved with the registry as a hosted lane's outbound hook does, and
/// the answers its domains gave.
#[derive(Debug, Default)]
pub struct Produced {
    /// Messages with their receiving domain's node.
    pub messages: Vec<(NodeId, Envelope)>,
    /// Answers and where they go.
    pub answers: Vec<(ReplyRef, Vec<u8>)>,
}

/// The native nodes whose links this control node holds.
pub struct NativeLinks {
    registry: Arc<RwLock<Registry>>,
    links: Mutex<HashMap<NodeId, Link>>,
    next_call: AtomicU64,
}

impl std::fmt::Debug for NativeLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeLinks").finish_non_exhaustive()
    }
}

impl NativeLinks {
    /// No links yet.
    pub fn new(registry: Arc<RwLock<Registry>>) -> NativeLinks {
        NativeLinks {
            registry,
            links: Mutex::new(HashMap::new()),
            next_call: AtomicU64::new(1),
        }
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Link>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether native node `node` syncs with this control node (it did in
    /// the last [`LINK_TIMEOUT`]).
    pub fn holds(&self, node: NodeId) -> bool {
        self.links()
            .get(&node)
            .and_then(|l| l.last_sync)
            .is_some_and(|t| t.elapsed() < LINK_TIMEOUT)
    }

    /// Whether this sync of `node` should also count as its heartbeat
    /// (marks it so).
    pub fn heartbeat_due(&self, node: NodeId, now: Instant) -> bool {
        let mut links = self.links();
        let l = links.entry(node).or_insert_with(Link::new);
        let due = l
            .last_heartbeat
            .is_none_or(|t| now.duration_since(t) >= HEARTBEAT_EVERY);
        if due {
            l.last_heartbeat = Some(now);
        }
        due
    }

    /// Takes in what `node` reported in `sync`; returns its domains' messages
    /// (routed) and answers, for the caller to send on.
    pub fn report(&self, node: NodeId, sync: &mut NodeSync) -> Produced {
        let mut produced = Produced::default();
        // A batch seen before (its answer was lost) is not taken twice.
        let fresh = {
            let mut links = self.links();
            let l = links.entry(node).or_insert_with(Link::new);
            let fresh = sync.seq == 0 || l.last_seq != Some(sync.seq);
            if sync.seq != 0 {
                l.last_seq = Some(sync.seq);
            }
            fresh
        };
        if !fresh {
            debug!(
                node,
                seq = sync.seq,
                "a resent sync: its batch was taken already"
            );
            sync.outbound.clear();
            sync.answers.clear();
            sync.logs.clear();
        }
        // The domains placed on it, read before its link is locked.
        let own: std::collections::HashSet<String>;
        {
            let reg = self.registry.read().unwrap_or_else(|e| e.into_inner());
            own = reg
                .domains
                .values()
                .filter(|d| d.node == node)
                .map(|d| d.name.clone())
                .collect();
            for m in sync.outbound.drain(..) {
                // A native node speaks only for its own domains, on the
                // channels they may open, and their answers come back to it.
                let may = reg
                    .domains
                    .get(&m.from)
                    .is_some_and(|d| d.node == node && crate::authz::may_send(&d.caps, &m.channel));
                if !may || m.reply.is_some_and(|r| r.node != node) {
                    warn!(
                        node,
                        from = %m.from,
                        "refused: a message for a domain that is not the native node's own, or an answer sent elsewhere"
                    );
                    continue;
                }
                match reg.route(&m.from, &m.channel) {
                    Some(dest) => produced.messages.push((
                        dest.node,
                        Envelope {
                            from: m.from,
                            to: dest.name.clone(),
                            channel: m.channel,
                            payload: m.payload,
                            reply: m.reply,
                        },
                    )),
                    None => debug!(
                        node,
                        from = %m.from,
                        channel = %m.channel,
                        "message from a native domain dropped: no domain serves the name"
                    ),
                }
            }
        }
        let mut links = self.links();
        let l = links.entry(node).or_insert_with(Link::new);
        l.generation += 1;
        l.last_sync = Some(Instant::now());
        l.acked_work = l.acked_work.max(sync.work_seq);
        l.work.notify_waiters();
        for (r, payload) in sync.answers.drain(..) {
            if r.node == node && r.lane == PROXY_LANE {
                if let Some(tx) = l.calls.remove(&r.token) {
                    let _ = tx.send(payload);
                }
            } else if l
                .awaited
                .get_mut(&r.node)
                .and_then(|t| t.take_if(&(r.lane, r.token), |_| true))
                .is_some()
            {
                produced.answers.push((r, payload));
            } else {
                warn!(
                    node,
                    to = r.node,
                    lane = r.lane,
                    token = r.token,
                    "refused: an answer to a message the native node was not sent"
                );
            }
        }
        if sync.logs_dropped > 0 {
            debug!(
                node,
                dropped = sync.logs_dropped,
                "native node dropped log lines"
            );
        }
        {
            // Lines of its own domains only, each of bounded length.
            for (domain, mut text) in sync.logs.drain(..) {
                if !own.contains(&domain) {
                    continue;
                }
                if text.len() > MAX_LOG_LINE {
                    let mut cut = MAX_LOG_LINE;
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    text.truncate(cut);
                }
                l.logs.entry(domain).or_default().push(text);
            }
        }
        // A report longer than any node can run is cut.
        sync.domains.truncate(MAX_REPORTED);
        if let Some(rows) = sync.stats.take() {
            l.stats = Some((Instant::now(), rows));
        }
        for d in &sync.domains {
            let before = l.reported.iter().find(|r| r.name == d.name);
            if before.map(|b| (&b.state, b.epoch)) != Some((&d.state, d.epoch)) {
                match &d.state {
                    NativeState::Failed(why) => {
                        warn!(node, domain = %d.name, epoch = d.epoch, "native domain failed: {why}")
                    }
                    s => {
                        info!(node, domain = %d.name, epoch = d.epoch, state = ?s, "native domain")
                    }
                }
            }
        }
        // Logs of domains that are gone go with them.
        l.logs
            .retain(|name, _| sync.domains.iter().any(|d| &d.name == name));
        l.reported = std::mem::take(&mut sync.domains);
        l.synced.send_modify(|n| *n += 1);
        produced
    }

    /// The work for `node`: at once if there is some, else when some comes
    /// (a registry change, a message, a call) or after `hold`. `applied`
    /// ticks after every applied registry entry.
    pub async fn work(
        &self,
        node: NodeId,
        hold: Duration,
        mut applied: watch::Receiver<u64>,
    ) -> NodeWork {
        let deadline = tokio::time::Instant::now() + hold.min(MAX_HOLD);
        let (generation, wake) = {
            let mut links = self.links();
            let l = links.entry(node).or_insert_with(Link::new);
            (l.generation, l.work.clone())
        };
        applied.mark_unchanged();
        loop {
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let work = self.take_work(node, generation);
            let give_way = self
                .links()
                .get(&node)
                .is_none_or(|l| l.generation != generation);
            if give_way || !is_empty(&work) || tokio::time::Instant::now() >= deadline {
                return work;
            }
            tokio::select! {
                _ = notified => {}
                r = applied.changed() => {
                    if r.is_err() {
                        return work;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Takes the waiting work of `node` (nothing if a newer sync came).
    fn take_work(&self, node: NodeId, generation: u64) -> NodeWork {
        let placed: Vec<DomainRecord>;
        let modules: HashMap<String, Vec<u8>>;
        let reported = {
            let links = self.links();
            match links.get(&node) {
                Some(l) if l.generation == generation => l.reported.clone(),
                _ => return NodeWork::default(),
            }
        };
        {
            let reg = self.registry.read().unwrap_or_else(|e| e.into_inner());
            placed = reg
                .domains
                .values()
                .filter(|d| d.node == node)
                .cloned()
                .collect();
            modules = placed
                .iter()
                .filter_map(|d| {
                    reg.blobs
                        .get(&d.module_hash)
                        .map(|b| (d.name.clone(), b.clone()))
                })
                .collect();
        }
        let (start, stop) = plan(&placed, &reported);
        let start: Vec<StartDomain> = start
            .into_iter()
            .filter_map(|d| match modules.get(&d.name) {
                Some(m) => Some(StartDomain {
                    name: d.name.clone(),
                    epoch: d.epoch,
                    contract: d.contract,
                    caps: d.caps.clone(),
                    module: m.clone(),
                }),
                None => {
                    warn!(node, domain = %d.name, "its module is not in the registry");
                    None
                }
            })
            .collect();
        let mut links = self.links();
        let Some(l) = links.get_mut(&node) else {
            return NodeWork::default();
        };
        if l.inflight
            .as_ref()
            .is_some_and(|(seq, ..)| *seq <= l.acked_work)
        {
            l.inflight = None;
        }
        if l.inflight.is_none() && (!l.deliver.is_empty() || !l.answers.is_empty()) {
            let seq = l.next_work_seq;
            l.next_work_seq += 1;
            l.inflight = Some((
                seq,
                l.deliver.drain(..).collect(),
                l.answers.drain(..).collect(),
            ));
        }
        let (seq, deliver, answers) = match &l.inflight {
            Some((seq, d, a)) => (*seq, d.clone(), a.clone()),
            None => (0, Vec::new(), Vec::new()),
        };
        NodeWork {
            start,
            stop,
            deliver,
            answers,
            stats: std::mem::take(&mut l.want_stats),
            seq,
        }
    }

    /// Queues `f`'s effect on the link of `node` and wakes its held sync.
    fn mail(&self, node: NodeId, f: impl FnOnce(&mut Link)) -> Result<(), ApiError> {
        let mut links = self.links();
        let l = links.get_mut(&node).ok_or_else(|| not_linked(node))?;
        f(l);
        l.work.notify_one();
        Ok(())
    }

    /// Serves a [`NodeCall`] for native node `node`.
    pub async fn serve(&self, node: NodeId, call: NodeCall) -> Response {
        match call {
            NodeCall::Stats => self.stats(node).await.map(Reply::Runtime),
            NodeCall::Logs { name, after } => {
                let links = self.links();
                let l = links.get(&node).ok_or_else(|| not_linked(node))?;
                if !l.reported.iter().any(|d| d.name == name) {
                    return Err(ApiError::NotFound(format!("domain {name} on this node")));
                }
                Ok(Reply::Logs(
                    l.logs
                        .get(&name)
                        .map(|r| r.since(after))
                        .unwrap_or(LogLines {
                            lines: Vec::new(),
                            next: after,
                            dropped: 0,
                        }),
                ))
            }
            NodeCall::Call {
                name,
                channel,
                payload,
                timeout_ms,
            } => {
                let token = self.next_call.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = oneshot::channel();
                {
                    let links = self.links();
                    let l = links.get(&node).ok_or_else(|| not_linked(node))?;
                    // A node that stopped syncing will not answer: say so
                    // now rather than after the caller's timeout.
                    if let Some(since) = l.last_sync.map(|t| t.elapsed()).filter(|e| *e > SILENT) {
                        // (Not `Unavailable`: clients retry that.)
                        return Err(ApiError::Domain(format!(
                            "{name}: its native node/{node} has not synced for {} s (is it up?)",
                            since.as_secs()
                        )));
                    }
                    match l.reported.iter().find(|d| d.name == name) {
                        None => {
                            return Err(ApiError::NotFound(format!(
                                "domain {name} is not running here"
                            )))
                        }
                        Some(NativeDomain {
                            state: NativeState::Failed(why),
                            ..
                        }) => return Err(ApiError::Domain(format!("{name} failed: {why}"))),
                        Some(_) => {}
                    }
                }
                self.mail(node, |l| {
                    l.calls.insert(token, tx);
                    push_bounded(
                        &mut l.deliver,
                        Envelope {
                            from: String::new(),
                            to: name,
                            channel,
                            payload,
                            reply: Some(ReplyRef {
                                node,
                                lane: PROXY_LANE,
                                token,
                            }),
                        },
                    );
                })?;
                let r = answer_within(rx, timeout_ms, "the call was dropped").await;
                if let Some(l) = self.links().get_mut(&node) {
                    l.calls.remove(&token);
                }
                r
            }
            NodeCall::WaitStarted {
                name,
                epoch,
                timeout_ms,
            } => started_within(&name, timeout_ms, self.wait_started(node, &name, epoch)).await,
            NodeCall::Deliver(envs) => {
                self.mail(node, |l| {
                    for e in envs {
                        if let Some(r) = e.reply {
                            // Per sender, so one cannot push out another's.
                            l.awaited
                                .entry(r.node)
                                .or_insert_with(|| Recent::new(AWAITED_MAX))
                                .insert((r.lane, r.token), ());
                        }
                        push_bounded(&mut l.deliver, e);
                    }
                })?;
                Ok(Reply::Done)
            }
            NodeCall::Answer {
                token,
                lane,
                payload,
            } => {
                if lane == PROXY_LANE {
                    let mut links = self.links();
                    let l = links.get_mut(&node).ok_or_else(|| not_linked(node))?;
                    if let Some(tx) = l.calls.remove(&token) {
                        let _ = tx.send(payload);
                    }
                } else {
                    self.mail(node, |l| push_bounded(&mut l.answers, (token, payload)))?;
                }
                Ok(Reply::Done)
            }
        }
    }

    async fn stats(&self, node: NodeId) -> Result<Vec<DomainRuntime>, ApiError> {
        let mut synced = {
            let mut links = self.links();
            let l = links.get_mut(&node).ok_or_else(|| not_linked(node))?;
            if let Some((at, rows)) = &l.stats {
                if at.elapsed() < STATS_FRESH {
                    return Ok(rows.clone());
                }
            }
            l.want_stats = true;
            l.work.notify_one();
            l.synced.subscribe()
        };
        let asked = Instant::now();
        let wait = async {
            loop {
                if synced.changed().await.is_err() {
                    return None;
                }
                let links = self.links();
                if let Some((at, rows)) = links.get(&node).and_then(|l| l.stats.as_ref()) {
                    if *at >= asked {
                        return Some(rows.clone());
                    }
                }
            }
        };
        match tokio::time::timeout(STATS_WAIT, wait).await {
            Ok(Some(rows)) => Ok(rows),
            _ => Err(ApiError::Unavailable(format!(
                "native node/{node} sent no figures within {} s",
                STATS_WAIT.as_secs()
            ))),
        }
    }

    /// Waits until `node` reports `name` at `epoch` started; its start time, µs.
    async fn wait_started(&self, node: NodeId, name: &str, epoch: u64) -> Result<u64, ApiError> {
        let mut synced = {
            let mut links = self.links();
            links
                .entry(node)
                .or_insert_with(Link::new)
                .synced
                .subscribe()
        };
        loop {
            {
                let links = self.links();
                let found = links.get(&node).and_then(|l| {
                    l.reported
                        .iter()
                        .find(|d| d.name == name && d.epoch == epoch)
                });
                match found.map(|d| &d.state) {
                    Some(NativeState::Started { start_us }) => return Ok(*start_us),
                    Some(NativeState::Failed(why)) => {
                        return Err(ApiError::Domain(format!("{name} failed to start: {why}")))
                    }
                    _ => {}
                }
            }
            if synced.changed().await.is_err() {
                return Err(ApiError::Unavailable("the link is gone".into()));
            }
        }
    }
}

fn is_empty(w: &NodeWork) -> bool {
    w.start.is_empty()
        && w.stop.is_empty()
        && w.deliver.is_empty()
        && w.answers.is_empty()
        && !w.stats
}

fn push_bounded<T>(q: &mut VecDeque<T>, item: T) {
    if q.len() >= MAILBOX {
        q.pop_front();
        warn!("a native node's mailbox is full: the oldest item was dropped");
    }
    q.push_back(item);
}

fn not_linked(node: NodeId) -> ApiError {
    ApiError::Unavailable(format!(
        "native node/{node} has no link to this control node (is it up?)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use metta_proto::{CapSet, Contract, OutboundMessage};

    fn rec(name: &str, epoch: u64) -> DomainRecord {
        DomainRecord {
            name: name.into(),
            image: "counter".into(),
            version: "1".into(),
            module_hash: [0; 32],
            node: 7,
            lane: 0,
            contract: Contract {
                period_ns: 100_000_000,
                slice_ns: 10_000_000,
                extra: false,
                memory: 1 << 20,
            },
            caps: CapSet::default(),
            owner: metta_proto::Subject::User("admin".into()),
            epoch,
            created_at: 0,
        }
    }

    fn rep(name: &str, epoch: u64) -> NativeDomain {
        NativeDomain {
            name: name.into(),
            epoch,
            state: NativeState::Starting,
        }
    }

    #[test]
    fn plan_starts_what_is_placed_and_stops_what_is_not() {
        let placed = [rec("a", 1), rec("b", 2), rec("c", 5)];
        let reported = [rep("a", 1), rep("b", 1), rep("x", 3)];
        let (start, stop) = plan(&placed, &reported);
        let start: Vec<(&str, u64)> = start.iter().map(|d| (d.name.as_str(), d.epoch)).collect();
        assert_eq!(start, [("b", 2), ("c", 5)]);
        assert_eq!(stop, ["b", "x"]);
        let (start, stop) = plan(&placed, &[rep("a", 1), rep("b", 2), rep("c", 5)]);
        assert!(start.is_empty() && stop.is_empty());
    }

    #[test]
    fn log_ring_answers_like_a_hosted_lane() {
        let mut r = LogRing::default();
        for i in 0..(LOG_LINES + 10) {
            r.push(format!("line {i}"));
        }
        let all = r.since(0);
        assert_eq!(all.lines.len(), LOG_LINES);
        assert_eq!(all.dropped, 10);
        assert_eq!(all.next, (LOG_LINES + 10) as u64);
        let tail = r.since(all.next - 2);
        assert_eq!(tail.lines.len(), 2);
        assert_eq!(tail.dropped, 0);
        let none = r.since(all.next);
        assert!(none.lines.is_empty());
        assert_eq!(none.next, all.next);
        // A cursor from an earlier domain of the same name starts over.
        assert_eq!(r.since(all.next + 100).lines.len(), LOG_LINES);
    }

    #[tokio::test]
    async fn a_call_is_queued_for_the_next_sync_and_answered_by_it() {
        let mut registry = Registry::default();
        registry.domains.insert("c1".into(), rec("c1", 1));
        let reg = Arc::new(RwLock::new(registry));
        let links = Arc::new(NativeLinks::new(reg));
        let node = 7;
        let mut first = NodeSync {
            domains: vec![NativeDomain {
                name: "c1".into(),
                epoch: 1,
                state: NativeState::Started { start_us: 5 },
            }],
            ..NodeSync::default()
        };
        links.report(node, &mut first);
        let (_tx, applied) = watch::channel(0);
        let l = links.clone();
        let call = tokio::spawn(async move {
            l.serve(
                node,
                NodeCall::Call {
                    name: "c1".into(),
                    channel: "/svc/counter".into(),
                    payload: b"incr".to_vec(),
                    timeout_ms: 5_000,
                },
            )
            .await
        });
        let work = links
            .work(node, Duration::from_secs(2), applied.clone())
            .await;
        assert_eq!(work.deliver.len(), 1, "{work:?}");
        let env = &work.deliver[0];
        assert_eq!(
            (env.to.as_str(), env.payload.as_slice()),
            ("c1", &b"incr"[..])
        );
        let r = env.reply.expect("a call wants its answer");
        assert_ne!(work.seq, 0, "a batch with a message is numbered");
        let mut answer = NodeSync {
            domains: vec![NativeDomain {
                name: "c1".into(),
                epoch: 1,
                state: NativeState::Started { start_us: 5 },
            }],
            answers: vec![(r, b"1".to_vec())],
            work_seq: work.seq,
            ..NodeSync::default()
        };
        let produced = links.report(node, &mut answer);
        assert!(
            produced.answers.is_empty(),
            "the proxy keeps its own answers"
        );
        assert_eq!(call.await.unwrap(), Ok(Reply::Answer(b"1".to_vec())));
        // Nothing else waits: an idle sync is held, then answered empty.
        let t = Instant::now();
        let idle = links.work(node, Duration::from_millis(200), applied).await;
        assert!(is_empty(&idle), "{idle:?}");
        assert!(t.elapsed() >= Duration::from_millis(150));
    }

    #[tokio::test]
    async fn a_batch_for_the_node_is_sent_again_until_acknowledged() {
        let mut registry = Registry::default();
        registry.domains.insert("c1".into(), rec("c1", 1));
        let links = NativeLinks::new(Arc::new(RwLock::new(registry)));
        let (_tx, applied) = watch::channel(0);
        let sync = |work_seq| NodeSync {
            domains: vec![rep("c1", 1)],
            work_seq,
            ..NodeSync::default()
        };
        links.report(7, &mut sync(0));
        let env = |p: &[u8]| Envelope {
            from: "x".into(),
            to: "c1".into(),
            channel: "/svc/counter".into(),
            payload: p.to_vec(),
            reply: None,
        };
        links
            .serve(7, NodeCall::Deliver(vec![env(b"1")]))
            .await
            .unwrap();
        let hold = Duration::from_millis(50);
        let w1 = links.work(7, hold, applied.clone()).await;
        assert_eq!((w1.seq, w1.deliver.len()), (1, 1));
        // Its answer was lost: the node's next sync does not acknowledge it,
        // and gets the same batch again, even with more mail waiting.
        links
            .serve(7, NodeCall::Deliver(vec![env(b"2")]))
            .await
            .unwrap();
        links.report(7, &mut sync(0));
        let again = links.work(7, hold, applied.clone()).await;
        assert_eq!((again.seq, &again.deliver), (1, &w1.deliver));
        // Acknowledged: the next batch.
        links.report(7, &mut sync(1));
        let w2 = links.work(7, hold, applied.clone()).await;
        assert_eq!((w2.seq, w2.deliver[0].payload.as_slice()), (2, &b"2"[..]));
        links.report(7, &mut sync(2));
        let idle = links.work(7, hold, applied).await;
        assert_eq!((idle.seq, idle.deliver.len()), (0, 0));
    }

    #[test]
    fn a_native_node_speaks_only_for_its_own_domains() {
        let mut registry = Registry::default();
        let mut c1 = rec("c1", 1);
        c1.caps.channels = vec!["/svc/x".into()];
        registry.domains.insert("c1".into(), c1);
        let mut other = rec("elsewhere", 1);
        other.node = 8;
        other.caps.channels = vec!["/svc/x".into()];
        registry.domains.insert("elsewhere".into(), other);
        let mut server = rec("server", 1);
        server.node = 8;
        server.caps.channels = vec!["/svc".into()];
        registry.domains.insert("server".into(), server);
        let links = NativeLinks::new(Arc::new(RwLock::new(registry)));
        let on = |from: &str, channel: &str, reply_node| OutboundMessage {
            from: from.into(),
            channel: channel.into(),
            payload: b"p".to_vec(),
            reply: Some(ReplyRef {
                node: reply_node,
                lane: 0,
                token: 1,
            }),
        };
        let mut sync = NodeSync {
            outbound: vec![
                on("c1", "/svc/x", 7),
                // Another node's domain, an answer sent elsewhere, nobody,
                // a channel c1 may not open.
                on("elsewhere", "/svc/x", 8),
                on("c1", "/svc/x", 8),
                on("nobody", "/svc/x", 7),
                on("c1", "/svc/y", 7),
            ],
            // Never delivered to it: nothing to answer.
            answers: vec![(
                ReplyRef {
                    node: 8,
                    lane: 0,
                    token: 5,
                },
                b"forged".to_vec(),
            )],
            domains: vec![rep("c1", 1)],
            ..NodeSync::default()
        };
        let produced = links.report(7, &mut sync);
        assert_eq!(produced.messages.len(), 1, "{:?}", produced.messages);
        let (to_node, env) = &produced.messages[0];
        assert_eq!(
            (*to_node, env.from.as_str(), env.to.as_str()),
            (8, "c1", "elsewhere")
        );
        assert!(produced.answers.is_empty());
    }

    #[test]
    fn a_resent_batch_is_taken_once() {
        let mut registry = Registry::default();
        registry.domains.insert("c1".into(), rec("c1", 1));
        let links = NativeLinks::new(Arc::new(RwLock::new(registry)));
        let r = ReplyRef {
            node: 9,
            lane: 0,
            token: 3,
        };
        let batch = |seq| NodeSync {
            answers: vec![(r, b"a".to_vec())],
            logs: vec![("c1".into(), "line".into())],
            domains: vec![rep("c1", 1)],
            seq,
            ..NodeSync::default()
        };
        // What a delivered message with reply `r` leaves behind.
        let delivered = || {
            links
                .links()
                .entry(7)
                .or_insert_with(Link::new)
                .awaited
                .entry(r.node)
                .or_insert_with(|| Recent::new(AWAITED_MAX))
                .insert((r.lane, r.token), ());
        };
        delivered();
        assert_eq!(links.report(7, &mut batch(1)).answers.len(), 1);
        // The answer to it was lost: the same batch again.
        delivered();
        assert!(links.report(7, &mut batch(1)).answers.is_empty());
        assert_eq!(links.report(7, &mut batch(2)).answers.len(), 1);
        let logs = links.links().get(&7).unwrap().logs["c1"].since(0);
        assert_eq!(logs.lines.len(), 2, "{logs:?}");
        // Without a number, nothing is promised and everything is taken.
        delivered();
        assert_eq!(links.report(7, &mut batch(0)).answers.len(), 1);
        delivered();
        assert_eq!(links.report(7, &mut batch(0)).answers.len(), 1);
        // A token answered once cannot be answered again.
        assert!(links.report(7, &mut batch(0)).answers.is_empty());
    }

    #[tokio::test]
    async fn a_call_to_a_silent_node_fails_at_once() {
        let links = NativeLinks::new(Arc::new(RwLock::new(Registry::default())));
        links.report(
            7,
            &mut NodeSync {
                domains: vec![rep("c1", 1)],
                ..NodeSync::default()
            },
        );
        links.links().get_mut(&7).unwrap().last_sync =
            Some(Instant::now() - SILENT - Duration::from_secs(1));
        let t = Instant::now();
        let r = links
            .serve(
                7,
                NodeCall::Call {
                    name: "c1".into(),
                    channel: "/svc/counter".into(),
                    payload: vec![],
                    timeout_ms: 5_000,
                },
            )
            .await;
        assert!(
            matches!(&r, Err(ApiError::Domain(m)) if m.contains("has not synced for 4 s")),
            "{r:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn calls_for_an_unknown_domain_or_an_unlinked_node_are_refused() {
        let reg = Arc::new(RwLock::new(Registry::default()));
        let links = NativeLinks::new(reg);
        let call = |name: &str| NodeCall::Call {
            name: name.into(),
            channel: "/x".into(),
            payload: vec![],
            timeout_ms: 100,
        };
        assert!(matches!(
            links.serve(3, call("c1")).await,
            Err(ApiError::Unavailable(_))
        ));
        links.report(3, &mut NodeSync::default());
        assert!(matches!(
            links.serve(3, call("c1")).await,
            Err(ApiError::NotFound(_))
        ));
    }
}
