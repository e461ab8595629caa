//! Placement: filter, admission, scoring and counter-offers.

use std::cmp::Ordering;
use std::fmt;

use metta_proto::{Contract, ContractError, NodeId, NodeKind};
use serde::{Deserialize, Serialize};

use crate::cluster::{Cluster, Hot, NodeState, NO_ARCH};
use crate::model::{demand_ppm, Bytes, Placement, Ppm, Request, Strategy, LANE_CAPACITY_PPM};

/// Why one node cannot take a request. Filters are applied in the order of the
/// variants; a node gets the first that applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Rejection {
    /// The request is pinned to another node (`--node`).
    NotRequested,
    /// The node is down.
    Down,
    /// The node is of another kind.
    Kind {
        /// Requested.
        want: NodeKind,
        /// The node's.
        have: NodeKind,
    },
    /// The node has another architecture.
    Arch {
        /// Requested.
        want: String,
        /// The node's.
        have: String,
    },
    /// A requested label is missing or has another value (the first such label,
    /// in key order).
    Label {
        /// The label.
        key: String,
        /// Requested value.
        want: String,
        /// The node's value, if it has the label.
        have: Option<String>,
    },
    /// Not enough usable memory left.
    Memory {
        /// Usable memory not yet allocated, bytes.
        free: u64,
        /// The contract's memory.
        want: u64,
    },
    /// No lane has enough CPU share left.
    Cpu {
        /// Free share of the emptiest lane, ppm.
        free_ppm: u64,
        /// The contract's demand, ppm (rounded up, see [`crate::demand_ppm`]).
        want_ppm: u64,
    },
}

impl Rejection {
    /// Whether the node matched the request but lacks memory or CPU (the nodes a
    /// counter-offer is made from).
    pub fn is_capacity(&self) -> bool {
        matches!(self, Rejection::Memory { .. } | Rejection::Cpu { .. })
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::NotRequested => f.write_str("not the requested node"),
            Rejection::Down => f.write_str("down"),
            Rejection::Kind { want, have } => write!(f, "{have} node, {want} requested"),
            Rejection::Arch { want, have } => write!(f, "architecture {have}, {want} requested"),
            Rejection::Label { key, want, have } => match have {
                Some(have) => write!(f, "label {key}={have}, {key}={want} requested"),
                None => write!(f, "no label {key}, {key}={want} requested"),
            },
            Rejection::Memory { free, want } => {
                write!(
                    f,
                    "{} memory free, {} requested",
                    Bytes(*free),
                    Bytes(*want)
                )
            }
            Rejection::Cpu { free_ppm, want_ppm } => write!(
                f,
                "at most {} of a CPU free, {} requested",
                Ppm(*free_ppm),
                Ppm(*want_ppm)
            ),
        }
    }
}

/// The best contract the cluster can admit instead of the one requested.
///
/// Same period and `extra` as requested; the largest slice the node's emptiest
/// lane can take (rounded down to whole microseconds, never more than
/// requested); memory = min(requested, free). Admissible by construction:
/// placing `contract` pinned to `node` succeeds while the cluster is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The node that can admit `contract`.
    pub node: NodeId,
    /// Its name, for messages.
    pub node_name: String,
    /// The lane the slice was computed for (the node's emptiest).
    pub lane: u32,
    /// The contract offered.
    pub contract: Contract,
    /// The contract that was requested.
    pub requested: Contract,
}

impl Offer {
    /// The request to send back to accept the offer: `req` with the offered
    /// contract, pinned to the offered node.
    pub fn accept(&self, req: &Request) -> Request {
        Request {
            contract: self.contract,
            node: Some(self.node),
            ..req.clone()
        }
    }
}

impl fmt::Display for Offer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "best available: {} on {}", self.contract, self.node_name)
    }
}

/// Why a request was not placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlaceError {
    /// The contract is out of range.
    #[error("invalid contract: {0}")]
    InvalidContract(#[source] ContractError),
    /// The request is pinned to a node that is not in the cluster.
    #[error("no node {0} in the cluster")]
    UnknownNode(NodeId),
    /// No node matches the request, or none that matches can admit any
    /// acceptable contract. One reason per node, in id order.
    #[error("no node can run the domain: {}", Reasons(reasons))]
    NoCandidates {
        /// Each node and why it was filtered out.
        reasons: Vec<(NodeId, Rejection)>,
    },
    /// No node can admit the contract; this smaller one can be admitted.
    #[error("no node can admit {requested}; {offer} — rerun with --accept-offer", requested = .0.requested, offer = .0)]
    CounterOffer(Offer),
}

struct Reasons<'a>(&'a [(NodeId, Rejection)]);

impl fmt::Display for Reasons<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 5;
        let relevant = self.0.iter().filter(|(_, r)| *r != Rejection::NotRequested);
        let total = relevant.clone().count();
        if total == 0 {
            return f.write_str("no nodes");
        }
        for (k, (id, r)) in relevant.take(SHOWN).enumerate() {
            if k > 0 {
                f.write_str("; ")?;
            }
            write!(f, "node {id}: {r}")?;
        }
        if total > SHOWN {
            write!(f, "; and {} more", total - SHOWN)?;
        }
        Ok(())
    }
}

/// Chooses a node and lane that can admit `req`, without changing anything (the
/// caller commits with [`Cluster::allocate`]).
///
/// Filters, in order: the pinned node (`req.node`), up, kind, architecture,
/// labels, then admission: free memory ≥ the contract's memory and some lane
/// with free share ≥ [`demand_ppm`]. Among the nodes left, `strategy` scores by
/// the fraction of the node's CPU capacity left free after placement (spread:
/// largest, binpack: smallest), then free memory after placement (same
/// direction), then lowest id. On the chosen node, spread takes the emptiest
/// lane, binpack the fullest lane that fits (lowest index on ties).
///
/// If no node qualifies: [`PlaceError::CounterOffer`] when a node that passed
/// the filters can admit a smaller, valid contract (see [`Offer`]; the best
/// offer maximises the smaller of offered/requested slice and memory, then
/// slice, then memory, then lowest id), else [`PlaceError::NoCandidates`].
///
/// Cost, without allocating: per group of nodes with the same CPU count, a
/// binary search plus a walk over the nodes that fail a filter (usually none
/// or a few), then one pass over the chosen node's lanes. A failure takes one
/// pass over all nodes to find the counter-offer and, only if there is none, a
/// second, allocating one to explain itself.
pub fn place(
    cluster: &Cluster,
    req: &Request,
    strategy: Strategy,
) -> Result<Placement, PlaceError> {
    req.contract
        .validate()
        .map_err(PlaceError::InvalidContract)?;
    let want = Want {
        ppm: demand_ppm(&req.contract),
        mem: req.contract.memory,
        class: Class::of(cluster, req),
    };
    let (lo, hi, best) = match req.node {
        None => {
            let best = match strategy {
                Strategy::Spread => best_node::<true>(cluster, req, &want),
                Strategy::Binpack => best_node::<false>(cluster, req, &want),
            };
            (0, cluster.hot.len(), best)
        }
        Some(id) => {
            let i = cluster.index(id).ok_or(PlaceError::UnknownNode(id))?;
            let fits = want.fits(&cluster.hot[i]) && labels_match(cluster, i, req);
            (i, i + 1, fits.then_some(i))
        }
    };
    match best {
        Some(i) => Ok(Placement {
            node: cluster.hot[i].id,
            lane: pick_lane(&cluster.nodes[i].lanes, want.ppm, strategy),
        }),
        None => Err(fail(cluster, req, lo, hi, &want)),
    }
}

/// The up, kind and architecture filters as one masked comparison of
/// [`Hot::class`].
#[derive(Debug, Clone, Copy)]
struct Class {
    mask: u32,
    want: u32,
}

impl Class {
    fn of(cluster: &Cluster, req: &Request) -> Class {
        let (mut mask, mut want) = (Hot::UP, Hot::UP);
        if let Some(kind) = req.kind {
            mask |= Hot::NATIVE;
            if kind == NodeKind::Native {
                want |= Hot::NATIVE;
            }
        }
        if let Some(arch) = &req.arch {
            // An architecture no node has gets an index no node has.
            let i = cluster.arch_index(arch).unwrap_or(NO_ARCH);
            mask |= !0 << Hot::ARCH_SHIFT;
            want |= i << Hot::ARCH_SHIFT;
        }
        Class { mask, want }
    }

    fn matches(self, h: &Hot) -> bool {
        h.class & self.mask == self.want
    }
}

/// What a request needs from a node, computed once per placement.
#[derive(Debug, Clone, Copy)]
struct Want {
    /// CPU demand, ppm (rounded up).
    ppm: u64,
    /// Memory, bytes.
    mem: u64,
    class: Class,
}

impl Want {
    /// Up, kind, architecture, memory, and a lane with room (labels aside).
    fn fits(&self, h: &Hot) -> bool {
        self.class.matches(h) && h.mem_free >= self.mem && u64::from(h.lane_free) >= self.ppm
    }
}

fn labels_match(cluster: &Cluster, i: usize, req: &Request) -> bool {
    req.labels.is_empty() || first_label_mismatch(&cluster.nodes[i], req).is_none()
}

/// The best node (its index in `cluster.hot`) that passes every filter and
/// admits the request.
///
/// Within a capacity group, nodes are sorted by (free CPU, free memory, id),
/// which is the scoring order among nodes of equal capacity: spread wants the
/// last node that fits (but the lowest id among equal free CPU and memory),
/// binpack the first. Nodes with less free CPU in total than the demand are
/// skipped by binary search; the walk from there only steps over nodes that
/// fail a filter (kind, architecture, labels, memory, or no single lane with
/// room). Each group's best is then scored against the others' exactly: free
/// CPU after placement as a fraction of capacity, then free memory after
/// placement, then lowest id.
fn best_node<const SPREAD: bool>(cluster: &Cluster, req: &Request, want: &Want) -> Option<usize> {
    let ok = |h: &Hot| {
        want.fits(h)
            && (req.labels.is_empty()
                || cluster
                    .index(h.id)
                    .is_some_and(|i| labels_match(cluster, i, req)))
    };
    let mut best: Option<(&Hot, u64, u64)> = None;
    for g in &cluster.groups {
        let nodes = &g.nodes[..];
        let lo = nodes.partition_point(|n| u64::from(n.cpu_free) < want.ppm);
        let found = if SPREAD {
            (lo..nodes.len()).rev().find(|&p| ok(&nodes[p])).map(|p| {
                // The lowest id among the fitting nodes with the same free CPU
                // and memory: the first fitting one of that run.
                let key = (nodes[p].cpu_free, nodes[p].mem_free);
                let run = nodes[..p].partition_point(|n| (n.cpu_free, n.mem_free) < key);
                (run..=p).find(|&q| ok(&nodes[q])).unwrap_or(p)
            })
        } else {
            (lo..nodes.len()).find(|&p| ok(&nodes[p]))
        };
        let Some(p) = found else { continue };
        let h = &nodes[p];
        // Free CPU is below 2^32 and so is capacity: the products fit in u64.
        let free = u64::from(h.cpu_free) - want.ppm;
        let mem = h.mem_free - want.mem;
        let better = match best {
            None => true,
            Some((b, b_free, b_mem)) => {
                let score = (free * u64::from(b.cpu_cap))
                    .cmp(&(b_free * u64::from(h.cpu_cap)))
                    .then(mem.cmp(&b_mem));
                let score = if SPREAD { score } else { score.reverse() };
                score.then(b.id.cmp(&h.id)).is_gt()
            }
        };
        if better {
            best = Some((h, free, mem));
        }
    }
    best.and_then(|(h, _, _)| cluster.index(h.id))
}

/// The lane for a demand on a node that has room for it.
fn pick_lane(lanes: &[u64], want_ppm: u64, strategy: Strategy) -> u32 {
    let mut best = 0usize;
    match strategy {
        Strategy::Spread => {
            for (i, &load) in lanes.iter().enumerate() {
                if load < lanes[best] {
                    best = i;
                }
            }
        }
        Strategy::Binpack => {
            let mut best_load = None;
            for (i, &load) in lanes.iter().enumerate() {
                if load + want_ppm <= LANE_CAPACITY_PPM && best_load.is_none_or(|b| load > b) {
                    best = i;
                    best_load = Some(load);
                }
            }
        }
    }
    best as u32
}

fn emptiest_lane(lanes: &[u64]) -> u32 {
    pick_lane(lanes, 0, Strategy::Spread)
}

fn first_label_mismatch<'r>(node: &NodeState, req: &'r Request) -> Option<(&'r str, &'r str)> {
    req.labels
        .iter()
        .find(|(k, v)| node.spec.labels.get(*k) != Some(*v))
        .map(|(k, v)| (k.as_str(), v.as_str()))
}

/// The first filter (pin, up, kind, arch, labels) that rejects the node.
fn static_rejection(node: &NodeState, req: &Request) -> Option<Rejection> {
    let spec = &node.spec;
    if req.node.is_some_and(|id| id != spec.id) {
        return Some(Rejection::NotRequested);
    }
    if !spec.up {
        return Some(Rejection::Down);
    }
    if let Some(want) = req.kind {
        if want != spec.kind {
            return Some(Rejection::Kind {
                want,
                have: spec.kind,
            });
        }
    }
    if let Some(want) = &req.arch {
        if *want != spec.arch {
            return Some(Rejection::Arch {
                want: want.clone(),
                have: spec.arch.clone(),
            });
        }
    }
    first_label_mismatch(node, req).map(|(key, want)| Rejection::Label {
        key: key.to_string(),
        want: want.to_string(),
        have: spec.labels.get(key).cloned(),
    })
}

fn capacity_rejection(h: &Hot, want_ppm: u64, want_mem: u64) -> Option<Rejection> {
    let lane_free = u64::from(h.lane_free);
    if h.mem_free < want_mem {
        Some(Rejection::Memory {
            free: h.mem_free,
            want: want_mem,
        })
    } else if lane_free < want_ppm {
        Some(Rejection::Cpu {
            free_ppm: lane_free,
            want_ppm,
        })
    } else {
        None
    }
}

/// The largest acceptable contract a node that matched the filters but lacks
/// capacity can admit.
fn offer_contract(h: &Hot, c: &Contract, want_ppm: u64) -> Option<Contract> {
    let lane_free = u64::from(h.lane_free);
    let slice_ns = if lane_free >= want_ppm {
        c.slice_ns
    } else {
        // lane_free < want_ppm ≤ 1e6, so this is below the requested slice, and
        // its demand ⌈slice·1e6/period⌉ ≤ lane_free.
        let fit = (u128::from(lane_free) * u128::from(c.period_ns) / 1_000_000) as u64;
        fit - fit % 1_000
    };
    let offer = Contract {
        slice_ns,
        memory: c.memory.min(h.mem_free),
        ..*c
    };
    offer.validate().ok()?;
    debug_assert!(demand_ppm(&offer) <= lane_free && offer.memory <= h.mem_free);
    Some(offer)
}

/// Orders offers: the larger of the smaller fulfilled fraction (slice, memory)
/// first, then slice, then memory.
fn offer_cmp(a: &Contract, b: &Contract, req: &Contract) -> Ordering {
    // A fraction num/den of the request; the smaller of the two per offer.
    let min_frac = |c: &Contract| {
        let s = (u128::from(c.slice_ns), u128::from(req.slice_ns));
        let m = (u128::from(c.memory), u128::from(req.memory));
        if s.0 * m.1 <= m.0 * s.1 {
            s
        } else {
            m
        }
    };
    let (fa, fb) = (min_frac(a), min_frac(b));
    (fa.0 * fb.1)
        .cmp(&(fb.0 * fa.1))
        .then(a.slice_ns.cmp(&b.slice_ns))
        .then(a.memory.cmp(&b.memory))
}

/// The failure path (no node in `lo..hi` can admit the request): the best
/// counter-offer from a node that passes the filters, else one reason per
/// node. Offers are compared without allocating; only the winner is built.
fn fail(cluster: &Cluster, req: &Request, lo: usize, hi: usize, want: &Want) -> PlaceError {
    let mut best: Option<(usize, Contract)> = None;
    for i in lo..hi {
        let h = &cluster.hot[i];
        if !want.class.matches(h) || !labels_match(cluster, i, req) {
            continue;
        }
        let Some(offer) = offer_contract(h, &req.contract, want.ppm) else {
            continue;
        };
        if best
            .as_ref()
            .is_none_or(|(_, b)| offer_cmp(&offer, b, &req.contract).is_gt())
        {
            best = Some((i, offer));
        }
    }
    if let Some((i, contract)) = best {
        return PlaceError::CounterOffer(Offer {
            node: cluster.hot[i].id,
            node_name: cluster.nodes[i].spec.name.clone(),
            lane: emptiest_lane(&cluster.nodes[i].lanes),
            contract,
            requested: req.contract,
        });
    }
    let reasons = cluster
        .nodes
        .iter()
        .zip(&cluster.hot)
        .filter_map(|(node, h)| {
            static_rejection(node, req)
                .or_else(|| capacity_rejection(h, want.ppm, req.contract.memory))
                .map(|r| (h.id, r))
        })
        .collect();
    PlaceError::NoCandidates { reasons }
}

impl Cluster {
    /// Same as [`place`].
    pub fn place(&self, req: &Request, strategy: Strategy) -> Result<Placement, PlaceError> {
        place(self, req, strategy)
    }

    /// Whether `node` passes every filter and admission check for `req`
    /// (`Ok(())`), or the first reason it does not; `None` if there is no such
    /// node. The contract is assumed valid.
    pub fn check(&self, node: NodeId, req: &Request) -> Option<Result<(), Rejection>> {
        let i = self.index(node)?;
        let rejection = static_rejection(&self.nodes[i], req).or_else(|| {
            capacity_rejection(&self.hot[i], demand_ppm(&req.contract), req.contract.memory)
        });
        Some(match rejection {
            Some(r) => Err(r),
            None => Ok(()),
        })
    }
}
