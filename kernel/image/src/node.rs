//! The domains the control plane places on this node, without I/O: what
//! the link (`src/link.rs`) sends in each [`NodeSync`] and what it does
//! with the [`NodeWork`] that answers it.
//!
//! A native node pulls its work: it sends `Request::Sync` over its one
//! TLS/TCP connection, one at a time, and the answer carries the domains to
//! start and stop, messages for its domains and answers to theirs. [`Node`]
//! holds the [`Driver`] (with [`Config::outbound`](crate::driver::Config)
//! on) and everything between two syncs:
//!
//! - **Placed domains**: every domain the node was given, by name, with its
//!   epoch; a spawn that failed stays listed as `Failed(why)` (the control
//!   plane shows the reason to whoever ran `mettactl run`) until it is told
//!   to stop it. The report ([`Node::sync`]) lists them all, every time:
//!   `Starting` until the first activation has ended, `Started { start_us }`
//!   (spawn to end of the first activation), `Failed` after a trap.
//! - **Work** ([`Node::acked`]): stops first, then starts (an epoch change
//!   comes as stop + start of the same name), then deliveries (a message
//!   that carries a [`ReplyRef`] gets a kernel tag; the domain's answer
//!   goes back in the next sync's `answers`), then answers to the domains'
//!   outbound messages ([`Driver::answer`]), and whether to send runtime
//!   rows next time.
//! - **What goes up**: outbound messages (each with a [`ReplyRef`] naming
//!   this node, lane 0 and the driver's token), answers, log lines
//!   ([`MAX_SYNC_LOGS`] kept, older ones dropped and counted). A sync that
//!   got no answer is not lost: its batch stays [`Node`]'s until a sync is
//!   acknowledged and is sent again unchanged with its batch number
//!   (`NodeSync::seq`), which the control node takes once; whatever came
//!   since goes in the next batch.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use metta_nucleus::routing::ReplyTokens;
use metta_nucleus::{Caps, DomainId};
use metta_proto::{
    CapSet, DomainRuntime, Envelope, Heartbeat, NativeDomain, NativeState, NodeId, NodeSync,
    NodeWork, OutboundMessage, ReplyRef, StartDomain,
};

use crate::driver::{Driver, DriverError, Poll, MAX_OUTBOUND};

/// Log lines kept for the control plane between syncs; beyond this the
/// oldest are dropped (and counted in `logs_dropped`).
pub const MAX_SYNC_LOGS: usize = 1_024;
/// Payload bytes of outbound messages in one sync (at least one message
/// goes, whatever its size: a message is at most 64 KiB).
pub const MAX_OUTBOUND_BYTES: usize = 4 << 20;
/// The lane of the [`ReplyRef`]s this node mints: it has one.
pub const LANE: u32 = 0;

/// A domain the node was given.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Placed {
    epoch: u64,
    state: Run,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Run {
    /// Spawned, with this id in the driver.
    Spawned(DomainId),
    /// The spawn failed, for this reason.
    StartFailed(String),
}

/// What a sync carried that has not been acknowledged yet.
#[derive(Debug, Default)]
struct Unacked {
    /// Its batch number ([`NodeSync::seq`]).
    seq: u64,
    outbound: Vec<OutboundMessage>,
    outbound_bytes: usize,
    answers: Vec<(ReplyRef, Vec<u8>)>,
    logs: VecDeque<(String, String)>,
    logs_dropped: u64,
}

/// A domain's line for the console and the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainLine {
    /// The domain.
    pub domain: String,
    /// The text.
    pub text: String,
}

/// The placed domains and the state between syncs (see the module docs).
#[derive(Debug)]
pub struct Node {
    driver: Driver,
    id: NodeId,
    placed: BTreeMap<String, Placed>,
    /// Kernel tags of delivered messages → where their answers go.
    replies: ReplyTokens<ReplyRef>,
    /// Lines since the last sync was built.
    logs: VecDeque<(String, String)>,
    logs_dropped: u64,
    /// Lines of the node's own about a domain, not yet collected.
    notes: Vec<DomainLine>,
    answers: Vec<(ReplyRef, Vec<u8>)>,
    stats_wanted: bool,
    unacked: Option<Unacked>,
    /// The batch number of the next new sync.
    next_seq: u64,
    /// The last [`NodeWork::seq`] carried out.
    work_seq: u64,
}

impl Node {
    /// Node `id` (from the join), running domains on `driver`, which must
    /// have [`Config::outbound`](crate::driver::Config) on.
    pub fn new(driver: Driver, id: NodeId) -> Node {
        Node {
            driver,
            id,
            placed: BTreeMap::new(),
            replies: ReplyTokens::new(),
            logs: VecDeque::new(),
            logs_dropped: 0,
            notes: Vec::new(),
            answers: Vec::new(),
            stats_wanted: false,
            unacked: None,
            next_seq: 1,
            work_seq: 0,
        }
    }

    /// The driver.
    pub fn driver(&self) -> &Driver {
        &self.driver
    }

    /// The driver, mutably.
    pub fn driver_mut(&mut self) -> &mut Driver {
        &mut self.driver
    }

    /// Whether a domain has been spawned and has not finished its first
    /// activation (nor trapped) yet.
    pub fn starting(&self) -> bool {
        self.placed.values().any(|p| match p.state {
            Run::Spawned(id) => self.spawned_state(id) == NativeState::Starting,
            Run::StartFailed(_) => false,
        })
    }

    /// Whether a sync's contents wait for an acknowledgement.
    pub fn unacked(&self) -> bool {
        self.unacked.is_some()
    }

    /// One turn of the activation loop ([`Driver::poll`]); the domains'
    /// answers to delivered messages are kept for the next sync.
    pub fn step(&mut self, clock: &mut dyn FnMut() -> u64) -> Poll {
        let p = self.driver.poll(clock);
        for (tag, bytes) in self.driver.take_answers() {
            if let Some(r) = self.replies.take(tag) {
                self.answers.push((r, bytes));
            }
        }
        p
    }

    /// The domains' log lines since the last call (and the node's own notes
    /// about them), for the console; each is also kept for the next sync.
    /// The second value counts lines the driver dropped before this call.
    pub fn lines(&mut self) -> (Vec<DomainLine>, u64) {
        let (lines, dropped) = self.driver.take_lines();
        let mut out: Vec<DomainLine> = core::mem::take(&mut self.notes);
        out.extend(lines.into_iter().map(|l| DomainLine {
            domain: l.domain,
            text: l.text,
        }));
        self.logs_dropped += dropped;
        for l in &out {
            if self.logs.len() >= MAX_SYNC_LOGS {
                self.logs.pop_front();
                self.logs_dropped += 1;
            }
            self.logs.push_back((l.domain.clone(), l.text.clone()));
        }
        (out, dropped)
    }

    /// The next sync: the report of every placed domain, and everything
    /// that waits to go up. While a sync is unacknowledged its batch is sent
    /// again unchanged, with its number ([`NodeSync::seq`]), so the control
    /// node takes it exactly once; what came since waits for the next batch.
    /// Collect [`lines`](Self::lines) first so that they go with it.
    pub fn sync(&mut self, heartbeat: Heartbeat, hold_ms: u32) -> NodeSync {
        if self.unacked.is_none() {
            let mut u = Unacked {
                seq: self.next_seq,
                ..Unacked::default()
            };
            self.next_seq += 1;
            u.answers.append(&mut self.answers);
            u.logs.extend(self.logs.drain(..));
            u.logs_dropped += core::mem::take(&mut self.logs_dropped);
            while u.logs.len() > MAX_SYNC_LOGS {
                u.logs.pop_front();
                u.logs_dropped += 1;
            }
            for o in self
                .driver
                .take_outbound(MAX_OUTBOUND, MAX_OUTBOUND_BYTES, true)
            {
                u.outbound_bytes += o.payload.len();
                u.outbound.push(OutboundMessage {
                    from: o.from,
                    channel: o.channel,
                    payload: o.payload,
                    reply: Some(ReplyRef {
                        node: self.id,
                        lane: LANE,
                        token: o.token,
                    }),
                });
            }
            self.unacked = Some(u);
        }
        let u = self.unacked.as_ref().expect("set above");
        NodeSync {
            heartbeat,
            domains: self.report(),
            outbound: u.outbound.clone(),
            answers: u.answers.clone(),
            logs: u.logs.iter().cloned().collect(),
            logs_dropped: u.logs_dropped,
            stats: self.stats_wanted.then(|| self.rows()),
            hold_ms,
            seq: u.seq,
            work_seq: self.work_seq,
        }
    }

    /// The last sync was answered with `work`: its contents are delivered;
    /// carries out the work at `now`. Returns lines for the console about
    /// what it did.
    pub fn acked(&mut self, work: NodeWork, now: u64) -> Vec<String> {
        self.unacked = None;
        self.apply(work, now)
    }

    /// Carries out `work` at `now` (stops, starts, deliveries, answers; see
    /// the module docs); lines for the console.
    pub fn apply(&mut self, work: NodeWork, now: u64) -> Vec<String> {
        let NodeWork {
            start,
            stop,
            mut deliver,
            mut answers,
            stats,
            seq,
        } = work;
        // A batch of messages is sent again until a sync acknowledges it:
        // carry out each number once.
        if seq != 0 {
            if seq <= self.work_seq {
                deliver.clear();
                answers.clear();
            } else {
                self.work_seq = seq;
            }
        }
        let mut out = Vec::new();
        for name in stop {
            if let Some(p) = self.remove(&name) {
                out.push(format!("domain {name} stopped (epoch {})", p.epoch));
            }
        }
        for s in start {
            out.push(self.start(s, now));
        }
        for e in deliver {
            self.deliver(e, now);
        }
        for (token, bytes) in answers {
            if let Err(e) = self.driver.answer(token, bytes, now) {
                out.push(format!("answer for token {token} dropped: {e}"));
            }
        }
        self.stats_wanted = stats;
        out
    }

    /// Forgets a placed domain, stopping it if it runs.
    fn remove(&mut self, name: &str) -> Option<Placed> {
        let p = self.placed.remove(name)?;
        if let Run::Spawned(_) = p.state {
            // Its driver record exists while it is placed.
            if let Ok(orphaned) = self.driver.stop(name) {
                for tag in orphaned {
                    self.replies.take(tag);
                }
            }
        }
        Some(p)
    }

    fn start(&mut self, s: StartDomain, now: u64) -> String {
        let StartDomain {
            name,
            epoch,
            contract,
            caps,
            module,
        } = s;
        // A start for a name already placed replaces it (the control plane
        // sends a stop first; this keeps the node consistent if it did not).
        self.remove(&name);
        let state = match self
            .driver
            .spawn(&name, &module, contract, caps_of(&caps), now)
        {
            Ok(id) => Run::Spawned(id),
            Err(e) => Run::StartFailed(start_failure(&e)),
        };
        let line = match &state {
            Run::Spawned(_) => format!(
                "domain {name} started (epoch {epoch}, {}/{} us{}, memory {} KiB, caps {caps})",
                contract.slice_ns / 1_000,
                contract.period_ns / 1_000,
                if contract.extra { " + extra" } else { "" },
                contract.memory / 1024,
            ),
            Run::StartFailed(why) => {
                format!("domain {name} failed to start (epoch {epoch}): {why}")
            }
        };
        self.placed.insert(name, Placed { epoch, state });
        line
    }

    fn deliver(&mut self, e: Envelope, now: u64) {
        let Envelope {
            from,
            to,
            channel,
            payload,
            reply,
        } = e;
        let placed = self.placed.get(&to).map(|p| &p.state);
        let r = match (placed, reply) {
            (Some(Run::Spawned(_)), Some(r)) => {
                let tag = self.mint(r);
                let res = self.driver.deliver(&to, &channel, &payload, tag, now);
                if res.is_err() {
                    self.replies.take(tag);
                }
                res.map_err(|e| e.to_string())
            }
            (Some(Run::Spawned(_)), None) => self
                .driver
                .post(&to, &channel, &payload, now)
                .map_err(|e| e.to_string()),
            (Some(Run::StartFailed(_)), _) => Err("it did not start".to_string()),
            (None, _) => Err("no such domain on this node".to_string()),
        };
        if let Err(why) = r {
            self.notes.push(DomainLine {
                domain: to,
                text: format!("driver: message from {from} on {channel} dropped: {why}"),
            });
        }
    }

    fn mint(&mut self, r: ReplyRef) -> u64 {
        self.replies.mint(r).0
    }

    /// Every placed domain as it stands.
    fn report(&self) -> Vec<NativeDomain> {
        self.placed
            .iter()
            .map(|(name, p)| NativeDomain {
                name: name.clone(),
                epoch: p.epoch,
                state: match &p.state {
                    Run::StartFailed(why) => NativeState::Failed(why.clone()),
                    Run::Spawned(id) => self.spawned_state(*id),
                },
            })
            .collect()
    }

    fn spawned_state(&self, id: DomainId) -> NativeState {
        if let Some(why) = self.driver.nucleus().domain(id).and_then(|d| d.failure()) {
            return NativeState::Failed(format!("trapped: {why}"));
        }
        match self.driver.record(id) {
            Some(r) => match r.first_activation_ns {
                Some(end) => NativeState::Started {
                    start_us: end.saturating_sub(r.spawned_ns) / 1_000,
                },
                None => NativeState::Starting,
            },
            None => NativeState::Failed("lost by the driver".into()),
        }
    }

    /// A runtime row per placed domain.
    fn rows(&self) -> Vec<DomainRuntime> {
        self.placed
            .iter()
            .filter_map(|(name, p)| match &p.state {
                Run::Spawned(id) => self.driver.runtime(*id, p.epoch),
                Run::StartFailed(why) => {
                    Some(DomainRuntime::start_failed(name.clone(), p.epoch, why))
                }
            })
            .collect()
    }
}

/// The nucleus's capabilities for a domain's [`CapSet`].
pub fn caps_of(c: &CapSet) -> Caps {
    Caps {
        log: c.log,
        clock: c.clock,
        channels: c.channels.clone(),
    }
}

/// Why a domain could not be started, for whoever ran `mettactl run`.
pub fn start_failure(e: &DriverError) -> String {
    match e {
        DriverError::Image(e) => format!("the module is not a valid domain image: {e}"),
        DriverError::Spawn(e) => format!("{e}"),
        e => format!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::Config;
    use crate::testdomains::{self, read_le};
    use metta_nucleus::FuelRate;
    use metta_proto::Contract;

    const NODE: NodeId = 7;

    fn node() -> Node {
        let d = Driver::new(
            Config {
                capacity_ppm: 950_000,
                recalibrate: false,
                outbound: true,
                ..Config::default()
            },
            // 0.01 fuel/ns: a 1 ms quantum is 10,000 fuel.
            FuelRate::new(1, 100),
        );
        Node::new(d, NODE)
    }

    fn contract(slice_ms: u64, period_ms: u64) -> Contract {
        Contract {
            period_ns: period_ms * 1_000_000,
            slice_ns: slice_ms * 1_000_000,
            extra: false,
            memory: 1 << 20,
        }
    }

    fn start(name: &str, epoch: u64, module: &[u8], channel: &str) -> StartDomain {
        let mut caps = CapSet::none();
        caps.log = true;
        caps.channels.push(channel.into());
        StartDomain {
            name: name.into(),
            epoch,
            contract: contract(1, 10),
            caps,
            module: module.to_vec(),
        }
    }

    /// Runs the node until `until` on a fake clock that advances by the
    /// charged time and 1 µs per reading; returns the console lines.
    fn run(n: &mut Node, clock: &mut u64, until: u64) -> Vec<DomainLine> {
        let mut lines = Vec::new();
        while *clock < until {
            let mut c = || {
                *clock += 1_000;
                *clock
            };
            match n.step(&mut c) {
                Poll::Ran { charged_ns, .. } => *clock += charged_ns,
                Poll::Idle { until: Some(t) } => *clock = (*clock).max(t),
                Poll::Idle { until: None } => *clock = until,
            }
            lines.extend(n.lines().0);
        }
        lines
    }

    fn hb() -> Heartbeat {
        Heartbeat {
            cert_not_after: 99,
            ..Heartbeat::default()
        }
    }

    fn reply(token: u64) -> ReplyRef {
        ReplyRef {
            node: 1,
            lane: metta_proto::PROXY_LANE,
            token,
        }
    }

    #[test]
    fn starts_reports_serves_and_stops() {
        let mut n = node();
        let mut clock = 1_000_000;
        let s = n.sync(hb(), 500);
        assert_eq!(s.domains, []);
        assert_eq!((s.hold_ms, s.heartbeat.cert_not_after), (500, 99));
        let notes = n.acked(
            NodeWork {
                start: vec![
                    start("c1", 3, testdomains::COUNTER, "/svc/counter"),
                    start("bad", 1, b"\0asm garbage", "/x"),
                ],
                ..NodeWork::default()
            },
            clock,
        );
        assert_eq!(
            notes[0],
            "domain c1 started (epoch 3, 1000/10000 us, memory 1024 KiB, caps log,channel:/svc/counter)"
        );
        assert!(
            notes[1].starts_with(
                "domain bad failed to start (epoch 1): the module is not a valid domain image: "
            ),
            "{notes:?}"
        );
        let s = n.sync(hb(), 500);
        assert_eq!(s.domains.len(), 2);
        assert!(matches!(&s.domains[0].state, NativeState::Failed(why)
            if why.starts_with("the module is not a valid domain image")));
        assert_eq!(
            s.domains[1],
            NativeDomain {
                name: "c1".into(),
                epoch: 3,
                state: NativeState::Starting
            }
        );
        assert!(n.starting());
        n.acked(NodeWork::default(), clock);
        let lines = run(&mut n, &mut clock, 20_000_000);
        assert!(!n.starting());
        assert!(lines.contains(&DomainLine {
            domain: "c1".into(),
            text: "counter: up".into()
        }));
        let s = n.sync(hb(), 500);
        assert!(
            matches!(s.domains[1].state, NativeState::Started { start_us } if start_us > 0),
            "{:?}",
            s.domains
        );
        assert_eq!(s.logs, [("c1".to_string(), "counter: up".to_string())]);
        assert_eq!(s.stats, None);
        // Two calls (a proxy's), one message without a reply, one for a
        // domain that is not here; and a stats request.
        n.acked(
            NodeWork {
                deliver: vec![
                    Envelope {
                        from: "-".into(),
                        to: "c1".into(),
                        channel: "/svc/counter".into(),
                        payload: b"incr".to_vec(),
                        reply: Some(reply(41)),
                    },
                    Envelope {
                        from: "-".into(),
                        to: "c1".into(),
                        channel: "/svc/counter".into(),
                        payload: b"incr".to_vec(),
                        reply: None,
                    },
                    Envelope {
                        from: "-".into(),
                        to: "c1".into(),
                        channel: "/svc/counter".into(),
                        payload: b"incr".to_vec(),
                        reply: Some(reply(42)),
                    },
                    Envelope {
                        from: "x".into(),
                        to: "gone".into(),
                        channel: "/svc/gone".into(),
                        payload: vec![],
                        reply: Some(reply(43)),
                    },
                ],
                stats: true,
                ..NodeWork::default()
            },
            clock,
        );
        let until = clock + 20_000_000;
        let lines = run(&mut n, &mut clock, until);
        assert!(lines.contains(&DomainLine {
            domain: "gone".into(),
            text: "driver: message from x on /svc/gone dropped: no such domain on this node".into()
        }));
        let s = n.sync(hb(), 500);
        assert_eq!(
            s.answers,
            [
                (reply(41), 1u64.to_le_bytes().to_vec()),
                (reply(42), 3u64.to_le_bytes().to_vec())
            ]
        );
        let rows = s.stats.expect("rows were asked for");
        assert_eq!(rows.len(), 2);
        assert!(rows[0]
            .state
            .starts_with("start failed: the module is not a valid domain image: "));
        assert_eq!((rows[1].name.as_str(), rows[1].epoch), ("c1", 3));
        assert!(matches!(rows[1].state.as_str(), "waiting" | "running"));
        assert!(rows[1].activations >= 2 && rows[1].start_us.is_some());
        // Rows only when asked.
        n.acked(NodeWork::default(), clock);
        let s = n.sync(hb(), 500);
        assert_eq!((s.stats, s.answers.len(), s.logs.len()), (None, 0, 0));
        // An epoch change: stop + start; a plain stop.
        let notes = n.acked(
            NodeWork {
                stop: vec!["c1".into(), "bad".into(), "never".into()],
                start: vec![start("c1", 4, testdomains::COUNTER, "/svc/counter")],
                ..NodeWork::default()
            },
            clock,
        );
        assert_eq!(
            notes[..2],
            [
                "domain c1 stopped (epoch 3)",
                "domain bad stopped (epoch 1)"
            ]
        );
        let s = n.sync(hb(), 500);
        assert_eq!(
            s.domains,
            [NativeDomain {
                name: "c1".into(),
                epoch: 4,
                state: NativeState::Starting
            }]
        );
        // The new incarnation counts from zero.
        n.acked(
            NodeWork {
                deliver: vec![Envelope {
                    from: "-".into(),
                    to: "c1".into(),
                    channel: "/svc/counter".into(),
                    payload: b"incr".to_vec(),
                    reply: Some(reply(50)),
                }],
                ..NodeWork::default()
            },
            clock,
        );
        let until = clock + 20_000_000;
        run(&mut n, &mut clock, until);
        assert_eq!(
            n.sync(hb(), 500).answers,
            [(reply(50), 1u64.to_le_bytes().to_vec())]
        );
    }

    #[test]
    fn outbound_messages_carry_a_reply_ref_and_their_answers_come_back() {
        let mut n = node();
        let mut clock = 0;
        n.acked(
            NodeWork {
                start: vec![start("client", 1, testdomains::CLIENT, "/svc/counter")],
                ..NodeWork::default()
            },
            clock,
        );
        run(&mut n, &mut clock, 20_000_000);
        let s = n.sync(hb(), 500);
        assert_eq!(s.outbound.len(), 1);
        let o = &s.outbound[0];
        assert_eq!(
            (o.from.as_str(), o.channel.as_str(), o.payload.as_slice()),
            ("client", "/svc/counter", &b"incr"[..])
        );
        let r = o.reply.expect("a reply ref");
        assert_eq!((r.node, r.lane), (NODE, LANE));
        // The answer, and a stale token.
        let notes = n.acked(
            NodeWork {
                answers: vec![(r.token, 77u64.to_le_bytes().to_vec()), (999, vec![])],
                ..NodeWork::default()
            },
            clock,
        );
        assert_eq!(
            notes,
            ["answer for token 999 dropped: no outbound message has reply token 999"]
        );
        let until = clock + 20_000_000;
        run(&mut n, &mut clock, until);
        let id = n.driver().id("client").unwrap();
        let mem = n.driver().nucleus().domain(id).unwrap().memory();
        assert_eq!(read_le::<4>(mem, testdomains::CLIENT_ANSWERS_AT), 1);
        assert_eq!(read_le::<8>(mem, testdomains::CLIENT_LAST_AT), 77);
        // Its next request is on its way.
        assert_eq!(n.sync(hb(), 500).outbound.len(), 1);
    }

    #[test]
    fn an_unanswered_sync_is_sent_again_unchanged_and_what_came_since_next() {
        let mut n = node();
        let mut clock = 0;
        // The client alone: its request goes outbound.
        n.acked(
            NodeWork {
                start: vec![start("client", 1, testdomains::CLIENT, "/svc/counter")],
                ..NodeWork::default()
            },
            clock,
        );
        run(&mut n, &mut clock, 10_000_000);
        // Then a counter, and a call to it.
        let call = |token| Envelope {
            from: "-".into(),
            to: "c1".into(),
            channel: "/svc/counter".into(),
            payload: vec![],
            reply: Some(reply(token)),
        };
        n.apply(
            NodeWork {
                start: vec![start("c1", 1, testdomains::COUNTER, "/svc/counter")],
                deliver: vec![call(5)],
                ..NodeWork::default()
            },
            clock,
        );
        run(&mut n, &mut clock, 20_000_000);
        let first = n.sync(hb(), 500);
        assert_eq!((first.outbound.len(), first.answers.len()), (1, 1));
        assert_eq!(first.logs.len(), 1, "{:?}", first.logs);
        assert!(n.unacked());
        // No answer (the connection broke); more happens meanwhile.
        n.apply(
            NodeWork {
                deliver: vec![call(6)],
                ..NodeWork::default()
            },
            clock,
        );
        let until = clock + 20_000_000;
        run(&mut n, &mut clock, until);
        let again = n.sync(hb(), 500);
        // The same batch, with the same number: the control node takes it
        // once, whether or not it saw the first.
        assert_eq!(again.seq, first.seq);
        assert_eq!(
            (&again.outbound, &again.answers, &again.logs),
            (&first.outbound, &first.answers, &first.logs)
        );
        // Acknowledged: the next batch has what came meanwhile.
        n.acked(NodeWork::default(), clock);
        let next = n.sync(hb(), 500);
        assert_eq!(next.seq, first.seq + 1);
        assert!(next.outbound.is_empty());
        assert_eq!(next.answers.len(), 1);
        assert_eq!(next.answers[0].0, reply(6));
        n.acked(NodeWork::default(), clock);
        let s = n.sync(hb(), 500);
        assert!(s.outbound.is_empty() && s.answers.is_empty() && s.logs.is_empty());
    }

    #[test]
    fn a_batch_received_twice_is_carried_out_once() {
        let mut n = node();
        let mut clock = 0;
        n.apply(
            NodeWork {
                start: vec![start("c1", 1, testdomains::COUNTER, "/svc/counter")],
                ..NodeWork::default()
            },
            clock,
        );
        let call = NodeWork {
            deliver: vec![Envelope {
                from: "-".into(),
                to: "c1".into(),
                channel: "/svc/counter".into(),
                payload: vec![],
                reply: Some(reply(5)),
            }],
            seq: 1,
            ..NodeWork::default()
        };
        // The first answer carrying it was lost; the control node sent it
        // again.
        n.apply(call.clone(), clock);
        n.apply(call, clock);
        run(&mut n, &mut clock, 20_000_000);
        let s = n.sync(hb(), 500);
        assert_eq!(s.answers.len(), 1, "{:?}", s.answers);
        assert_eq!(s.work_seq, 1);
    }

    #[test]
    fn sync_logs_are_bounded_and_drops_counted() {
        let mut n = node();
        for i in 0..MAX_SYNC_LOGS + 10 {
            n.notes.push(DomainLine {
                domain: "d".into(),
                text: format!("{i}"),
            });
        }
        let (lines, dropped) = n.lines();
        assert_eq!((lines.len(), dropped), (MAX_SYNC_LOGS + 10, 0));
        let s = n.sync(hb(), 500);
        assert_eq!(s.logs.len(), MAX_SYNC_LOGS);
        assert_eq!(s.logs_dropped, 10);
        assert_eq!(s.logs[0].1, "10");
        // Unacknowledged, with more lines: the same batch goes again; the
        // new lines wait for the next one.
        for i in 0..5 {
            n.notes.push(DomainLine {
                domain: "d".into(),
                text: format!("more {i}"),
            });
        }
        n.lines();
        let again = n.sync(hb(), 500);
        assert_eq!((again.logs, again.logs_dropped), (s.logs, 10));
        n.acked(NodeWork::default(), 0);
        let next = n.sync(hb(), 500);
        assert_eq!((next.logs.len(), next.logs_dropped), (5, 0));
        assert_eq!(next.logs.last().unwrap().1, "more 4");
    }

    #[test]
    fn a_trap_is_reported_as_failed() {
        let mut n = node();
        let mut clock = 0;
        let mut s = start("trap", 2, testdomains::TRAP, "/x");
        s.caps.clock = true;
        n.acked(
            NodeWork {
                start: vec![s],
                ..NodeWork::default()
            },
            clock,
        );
        run(&mut n, &mut clock, 300_000_000);
        let s = n.sync(hb(), 500);
        assert!(
            matches!(&s.domains[0].state, NativeState::Failed(why) if why.starts_with("trapped: ")),
            "{:?}",
            s.domains
        );
    }
}
