//! Property tests: random clusters and request sequences, checked against a
//! from-scratch reference model (no aggregates).
//!
//! 1. After any sequence of allocations and releases, no lane holds more than
//!    `LANE_CAPACITY_PPM` and no node more memory than memory − reserve.
//! 2. Every counter-offer is admissible (placing it pinned to its node succeeds,
//!    and so does allocating it), and is no larger than the request.
//! 3. `place` never returns a node (or lane) a filter or admission rejects; it
//!    fails only when no node can admit the request, and then says why for each
//!    node; the chosen node and lane are the best by the strategy's score.
//! 4. Placement is deterministic: the same cluster built in a different order
//!    gives the same answers, step by step.

use std::collections::BTreeMap;

use metta_proto::{Contract, NodeId, NodeKind};
use metta_scheduler::{
    demand_ppm, Cluster, NodeSpec, PlaceError, Placement, Rejection, Request, Strategy,
    LANE_CAPACITY_PPM,
};
use proptest::prelude::*;
use proptest::strategy::Strategy as _;

const MIB: u64 = 1 << 20;
const ARCHES: [&str; 2] = ["x86_64", "aarch64"];
const ZONES: [&str; 3] = ["a", "b", "c"];
const PERIODS: [u64; 7] = [
    1_000_000,
    3_000_000,
    7_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
    10_000_000_000,
];

fn node_strategy() -> impl proptest::strategy::Strategy<Value = NodeSpec> {
    (
        1u32..=6,
        prop_oneof![Just(512 * MIB), Just(1 << 30), Just(3 << 30), Just(8 << 30)],
        proptest::option::of(0u64..=1024 * MIB),
        any::<bool>(),
        0..ARCHES.len(),
        proptest::option::of(0..ZONES.len()),
        proptest::bool::weighted(0.85),
    )
        .prop_map(|(cpus, mem, reserve, native, arch, zone, up)| {
            let kind = if native {
                NodeKind::Native
            } else {
                NodeKind::Hosted
            };
            // The id is set by the caller (distinct, sparse).
            let mut n = NodeSpec::new(0, "", kind, ARCHES[arch], cpus, mem).with_up(up);
            if let Some(r) = reserve {
                n = n.with_memory_reserve(r);
            }
            if let Some(z) = zone {
                n = n.with_label("zone", ZONES[z]);
            }
            n
        })
}

#[derive(Debug, Clone)]
enum Op {
    Place {
        req: Request,
        strategy: Strategy,
        accept_offer: bool,
    },
    Release(usize),
    /// Marks node `i` (modulo the node count) up or down.
    SetUp(usize, bool),
    /// Removes node `i` (modulo the node count), evicting its domains.
    Remove(usize),
}

fn contract_strategy() -> impl proptest::strategy::Strategy<Value = Contract> {
    (
        0..PERIODS.len(),
        // Mostly small shares, some large, some 0 (invalid) or 100 %.
        prop_oneof![
            4 => 0u64..=150_000,
            2 => 0u64..=1_000_000,
            1 => Just(1_000_000u64),
        ],
        0u64..1_000,
        any::<bool>(),
        prop_oneof![1u64..=64 * MIB, 1u64..=3 << 30],
    )
        .prop_map(|(p, frac, jitter, extra, memory)| {
            let period_ns = PERIODS[p];
            let slice_ns = (period_ns / 1_000_000 * frac + jitter * (frac % 2)).min(period_ns);
            Contract {
                period_ns,
                slice_ns,
                extra,
                memory,
            }
        })
}

fn op_strategy(nodes: usize) -> impl proptest::strategy::Strategy<Value = Op> {
    let place = (
        contract_strategy(),
        // Pin: None, an index into the nodes, or an unknown node.
        proptest::option::weighted(0.2, 0..nodes + 1),
        proptest::option::weighted(0.2, 0..ZONES.len()),
        proptest::option::weighted(0.2, 0..ARCHES.len()),
        proptest::option::weighted(0.2, any::<bool>()),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(contract, pin, zone, arch, native, binpack, accept_offer)| {
                let mut req = Request::new(contract);
                req.node = pin.map(node_id);
                if let Some(z) = zone {
                    req = req.with_label("zone", ZONES[z]);
                }
                req.arch = arch.map(|a| ARCHES[a].to_string());
                req.kind = native.map(|n| {
                    if n {
                        NodeKind::Native
                    } else {
                        NodeKind::Hosted
                    }
                });
                let strategy = if binpack {
                    Strategy::Binpack
                } else {
                    Strategy::Spread
                };
                Op::Place {
                    req,
                    strategy,
                    accept_offer,
                }
            },
        );
    prop_oneof![
        24 => place,
        4 => any::<usize>().prop_map(Op::Release),
        2 => (any::<usize>(), proptest::bool::weighted(0.7)).prop_map(|(i, up)| Op::SetUp(i, up)),
        1 => any::<usize>().prop_map(Op::Remove),
    ]
}

/// Node ids are sparse and not in index order's insertion sequence.
fn node_id(i: usize) -> NodeId {
    (i as u64) * 7 + 3
}

fn scenario(
    nodes: std::ops::Range<usize>,
    ops: std::ops::Range<usize>,
) -> impl proptest::strategy::Strategy<Value = (Vec<NodeSpec>, Vec<Op>)> {
    proptest::collection::vec(node_strategy(), nodes).prop_flat_map(move |nodes| {
        let n = nodes.len();
        let nodes: Vec<NodeSpec> = nodes
            .into_iter()
            .enumerate()
            .map(|(i, mut s)| {
                s.id = node_id(i);
                s.name = format!("node-{}", s.id);
                s
            })
            .collect();
        (
            Just(nodes),
            proptest::collection::vec(op_strategy(n), ops.clone()),
        )
    })
}

/// The reference model: everything recomputed from the node specs and the
/// allocation list.
struct Reference {
    nodes: Vec<NodeSpec>,
    lanes: BTreeMap<NodeId, Vec<u64>>,
    memory: BTreeMap<NodeId, u64>,
}

impl Reference {
    fn of(c: &Cluster) -> Self {
        let nodes: Vec<NodeSpec> = c.nodes().cloned().collect();
        let mut lanes: BTreeMap<NodeId, Vec<u64>> = nodes
            .iter()
            .map(|n| (n.id, vec![0; n.cpus as usize]))
            .collect();
        let mut memory: BTreeMap<NodeId, u64> = nodes.iter().map(|n| (n.id, 0)).collect();
        for (_, a) in c.allocations() {
            lanes.get_mut(&a.node).unwrap()[a.lane as usize] += demand_ppm(&a.contract);
            *memory.get_mut(&a.node).unwrap() += a.contract.memory;
        }
        Reference {
            nodes,
            lanes,
            memory,
        }
    }

    /// Property 1.
    fn check_invariants(&self, c: &Cluster) {
        for n in &self.nodes {
            let lanes = &self.lanes[&n.id];
            for (lane, &load) in lanes.iter().enumerate() {
                assert!(
                    load <= LANE_CAPACITY_PPM,
                    "node {} lane {lane}: {load} ppm",
                    n.id
                );
            }
            assert!(
                self.memory[&n.id] <= n.usable_memory(),
                "node {} memory",
                n.id
            );
            // The cluster's aggregates agree with the recount.
            let u = c.usage(n.id).unwrap();
            assert_eq!(&u.lane_ppm, lanes);
            assert_eq!(u.memory_used, self.memory[&n.id]);
        }
    }

    /// Which filter rejects the node, by name; `None` if it passes them all.
    fn static_filter(n: &NodeSpec, req: &Request) -> Option<&'static str> {
        if req.node.is_some_and(|id| id != n.id) {
            Some("pin")
        } else if !n.up {
            Some("down")
        } else if req.kind.is_some_and(|k| k != n.kind) {
            Some("kind")
        } else if req.arch.as_ref().is_some_and(|a| *a != n.arch) {
            Some("arch")
        } else if req.labels.iter().any(|(k, v)| n.labels.get(k) != Some(v)) {
            Some("label")
        } else {
            None
        }
    }

    fn fits(&self, n: &NodeSpec, lane: usize, c: &Contract) -> bool {
        self.memory[&n.id] + c.memory <= n.usable_memory()
            && self.lanes[&n.id][lane] + demand_ppm(c) <= LANE_CAPACITY_PPM
    }

    fn feasible(&self, n: &NodeSpec, lane: usize, req: &Request) -> bool {
        Self::static_filter(n, req).is_none() && self.fits(n, lane, &req.contract)
    }

    /// The best placement by brute force over every (node, lane).
    fn best(&self, req: &Request, s: Strategy) -> Option<Placement> {
        let want = demand_ppm(&req.contract);
        let mut best: Option<(Placement, u64, u64, u64)> = None;
        for n in &self.nodes {
            let lanes = &self.lanes[&n.id];
            let node_ok = (0..lanes.len()).any(|l| self.feasible(n, l, req));
            if !node_ok {
                continue;
            }
            let cap = n.cpu_capacity_ppm();
            let free = cap - lanes.iter().sum::<u64>() - want;
            let mem = n.usable_memory() - self.memory[&n.id] - req.contract.memory;
            let lane = match s {
                Strategy::Spread => (0..lanes.len()).min_by_key(|&l| (lanes[l], l)),
                _ => (0..lanes.len())
                    .filter(|&l| lanes[l] + want <= LANE_CAPACITY_PPM)
                    .min_by_key(|&l| (std::cmp::Reverse(lanes[l]), l)),
            }
            .unwrap();
            let p = Placement {
                node: n.id,
                lane: lane as u32,
            };
            let better = match &best {
                None => true,
                Some((_, bf, bc, bm)) => {
                    let a = (free as u128 * *bc as u128, mem);
                    let b = (*bf as u128 * cap as u128, *bm);
                    match s {
                        Strategy::Spread => a > b,
                        _ => a < b,
                    }
                }
            };
            if better {
                best = Some((p, free, cap, mem));
            }
        }
        best.map(|b| b.0)
    }
}

fn kind_name(r: &Rejection) -> &'static str {
    match r {
        Rejection::NotRequested => "pin",
        Rejection::Down => "down",
        Rejection::Kind { .. } => "kind",
        Rejection::Arch { .. } => "arch",
        Rejection::Label { .. } => "label",
        Rejection::Memory { .. } | Rejection::Cpu { .. } => "capacity",
        _ => "other",
    }
}

/// One step on one cluster; returns what happened, for the determinism check.
fn step(c: &mut Cluster, op: &Op, names: &mut Vec<String>, seq: usize) -> String {
    match op {
        Op::SetUp(i, up) => {
            let ids: Vec<NodeId> = c.nodes().map(|n| n.id).collect();
            if ids.is_empty() {
                return "no nodes".into();
            }
            let id = ids[i % ids.len()];
            c.set_up(id, *up).unwrap();
            format!("node {id} up={up}")
        }
        Op::Remove(i) => {
            let ids: Vec<NodeId> = c.nodes().map(|n| n.id).collect();
            if ids.is_empty() {
                return "no nodes".into();
            }
            let id = ids[i % ids.len()];
            let evicted = c.remove_node(id).unwrap();
            names.retain(|n| !evicted.iter().any(|(e, _)| e == n));
            assert!(evicted.iter().all(|(_, a)| a.node == id));
            assert_eq!(c.domains_on(id).count(), 0);
            format!("removed node {id}, evicted {evicted:?}")
        }
        Op::Release(k) => {
            if names.is_empty() {
                return "nothing to release".into();
            }
            let name = names.remove(k % names.len());
            let a = c.release(&name).expect("allocated domain");
            format!("released {name} from {a:?}")
        }
        Op::Place {
            req,
            strategy,
            accept_offer,
        } => {
            let r = Reference::of(c);
            let got = c.place(req, *strategy);
            let valid = req.contract.validate().is_ok();
            let pinned_unknown = req.node.is_some_and(|id| c.node(id).is_none());
            match &got {
                Ok(p) => {
                    // Property 3: the node passes every filter, the lane admits.
                    let n = c.node(p.node).unwrap();
                    assert!(r.feasible(n, p.lane as usize, req), "{p:?} for {req:?}");
                    assert_eq!(c.check(p.node, req), Some(Ok(())));
                    assert_eq!(Some(*p), r.best(req, *strategy), "{req:?}");
                    let name = format!("d{seq}");
                    c.allocate(p.node, p.lane, name.as_str(), req.contract)
                        .expect("a placement is admissible");
                    names.push(name);
                }
                Err(PlaceError::InvalidContract(_)) => assert!(!valid),
                Err(PlaceError::UnknownNode(id)) => {
                    assert!(valid && pinned_unknown && req.node == Some(*id))
                }
                Err(PlaceError::NoCandidates { reasons }) => {
                    assert!(valid && !pinned_unknown);
                    assert_eq!(r.best(req, *strategy), None);
                    // One reason per node, in id order, naming the right filter.
                    let ids: Vec<_> = reasons.iter().map(|(id, _)| *id).collect();
                    let all: Vec<_> = r.nodes.iter().map(|n| n.id).collect();
                    assert_eq!(ids, all);
                    for ((_, why), n) in reasons.iter().zip(&r.nodes) {
                        let want = Reference::static_filter(n, req).unwrap_or("capacity");
                        assert_eq!(kind_name(why), want, "node {} {why:?}", n.id);
                    }
                }
                Err(PlaceError::CounterOffer(o)) => {
                    assert!(valid && !pinned_unknown);
                    assert_eq!(r.best(req, *strategy), None);
                    // Property 2: the offer is valid, no larger than asked,
                    // from a node that matched, and admissible.
                    let (want, got) = (req.contract, o.contract);
                    assert!(got.validate().is_ok());
                    assert_eq!((got.period_ns, got.extra), (want.period_ns, want.extra));
                    assert!(got.slice_ns <= want.slice_ns && got.memory <= want.memory);
                    assert!(got != want);
                    let n = c.node(o.node).unwrap();
                    assert_eq!(Reference::static_filter(n, req), None);
                    assert!(r.fits(n, o.lane as usize, &got));
                    for s in [Strategy::Spread, Strategy::Binpack] {
                        let p = c
                            .place(&o.accept(req), s)
                            .unwrap_or_else(|e| panic!("offer {o:?} not admissible: {e}"));
                        assert_eq!(p.node, o.node);
                    }
                    if *accept_offer {
                        let p = c.place(&o.accept(req), *strategy).unwrap();
                        let name = format!("d{seq}");
                        c.allocate(p.node, p.lane, name.as_str(), got)
                            .expect("an offer is admissible");
                        names.push(name);
                    }
                }
                Err(e) => panic!("unexpected {e:?}"),
            }
            // Placing is pure: asking again gives the same answer.
            format!("{got:?}")
        }
    }
}

fn run_scenario(nodes: &[NodeSpec], ops: &[Op]) -> Result<(), TestCaseError> {
    let mut forward = Cluster::new();
    for n in nodes {
        forward.add_node(n.clone()).unwrap();
    }
    // Property 4: the same cluster built in reverse order.
    let mut reverse = Cluster::new();
    for n in nodes.iter().rev() {
        reverse.add_node(n.clone()).unwrap();
    }
    let (mut fnames, mut rnames) = (Vec::new(), Vec::new());
    for (seq, op) in ops.iter().enumerate() {
        let a = step(&mut forward, op, &mut fnames, seq);
        let b = step(&mut reverse, op, &mut rnames, seq);
        prop_assert_eq!(a, b);
        Reference::of(&forward).check_invariants(&forward);
        if let Op::Place { req, strategy, .. } = op {
            prop_assert_eq!(forward.place(req, *strategy), forward.place(req, *strategy));
        }
    }
    prop_assert_eq!(forward.state(), reverse.state());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn placement_properties((nodes, ops) in scenario(0..7, 1..60)) {
        run_scenario(&nodes, &ops)?;
    }

    /// Allocating directly (bypassing `place`, as a stale or hostile caller
    /// might) can never overcommit: `allocate` re-checks.
    #[test]
    fn allocate_never_exceeds_capacity(
        nodes in proptest::collection::vec(node_strategy(), 1..4),
        allocs in proptest::collection::vec((0usize..4, 0u32..6, contract_strategy()), 1..80),
    ) {
        let mut c = Cluster::new();
        for (i, mut n) in nodes.into_iter().enumerate() {
            n.id = node_id(i);
            c.add_node(n).unwrap();
        }
        for (k, (node, lane, contract)) in allocs.into_iter().enumerate() {
            let before = c.state();
            if c.allocate(node_id(node), lane, format!("d{k}"), contract).is_err() {
                prop_assert_eq!(c.state(), before);
            }
            Reference::of(&c).check_invariants(&c);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Bigger clusters: longer walks within capacity groups, more ties.
    #[test]
    fn placement_properties_large((nodes, ops) in scenario(10..40, 50..200)) {
        run_scenario(&nodes, &ops)?;
    }
}
