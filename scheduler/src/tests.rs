//! Unit tests: each filter, admission, scoring, counter-offers, the cluster's
//! bookkeeping.

use metta_proto::{Contract, ContractError, NodeKind};

use crate::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn contract(cpu: &str, memory: u64) -> Contract {
    let mut c: Contract = cpu.parse().unwrap();
    c.memory = memory;
    c
}

fn node(id: u64, cpus: u32) -> NodeSpec {
    NodeSpec::new(
        id,
        format!("node-{id}"),
        NodeKind::Hosted,
        "x86_64",
        cpus,
        8 * GIB,
    )
}

/// A 2 GiB node: 256 MiB reserve, 1.75 GiB usable (contracts stay under 4 GiB).
fn small(id: u64, cpus: u32) -> NodeSpec {
    NodeSpec::new(
        id,
        format!("node-{id}"),
        NodeKind::Hosted,
        "x86_64",
        cpus,
        2 * GIB,
    )
}

fn cluster(nodes: impl IntoIterator<Item = NodeSpec>) -> Cluster {
    let mut c = Cluster::new();
    for n in nodes {
        c.add_node(n).unwrap();
    }
    c
}

fn reasons(err: PlaceError) -> Vec<(u64, Rejection)> {
    match err {
        PlaceError::NoCandidates { reasons } => reasons,
        other => panic!("expected NoCandidates, got {other:?}"),
    }
}

fn offer(err: PlaceError) -> Offer {
    match err {
        PlaceError::CounterOffer(o) => o,
        other => panic!("expected CounterOffer, got {other:?}"),
    }
}

fn place_ok(c: &Cluster, req: &Request, s: Strategy) -> Placement {
    c.place(req, s).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn places_on_an_empty_node() {
    let c = cluster([node(1, 2)]);
    let req = Request::new(contract("10ms/100ms", 64 * MIB));
    for s in [Strategy::Spread, Strategy::Binpack] {
        assert_eq!(place_ok(&c, &req, s), Placement { node: 1, lane: 0 });
    }
}

#[test]
fn invalid_contracts_are_refused() {
    let c = cluster([node(1, 2)]);
    let ok = contract("10ms/100ms", 64 * MIB);
    let bad = [
        (
            Contract { slice_ns: 0, ..ok },
            ContractError::Slice {
                slice_ns: 0,
                period_ns: ok.period_ns,
            },
        ),
        (
            Contract {
                slice_ns: ok.period_ns + 1,
                ..ok
            },
            ContractError::Slice {
                slice_ns: ok.period_ns + 1,
                period_ns: ok.period_ns,
            },
        ),
        (
            Contract {
                period_ns: 10,
                slice_ns: 5,
                ..ok
            },
            ContractError::Period(10),
        ),
        (Contract { memory: 0, ..ok }, ContractError::Memory(0)),
    ];
    for (contract, want) in bad {
        assert_eq!(
            c.place(&Request::new(contract), Strategy::Spread),
            Err(PlaceError::InvalidContract(want.clone()))
        );
        let mut c2 = c.clone();
        assert_eq!(
            c2.allocate(1, 0, "d", contract),
            Err(AllocError::InvalidContract(want))
        );
    }
}

#[test]
fn down_nodes_are_filtered() {
    let c = cluster([node(1, 2).with_up(false)]);
    let req = Request::new(contract("1ms/100ms", MIB));
    assert_eq!(
        reasons(c.place(&req, Strategy::Spread).unwrap_err()),
        [(1, Rejection::Down)]
    );
    assert_eq!(c.check(1, &req), Some(Err(Rejection::Down)));
}

#[test]
fn kind_arch_and_labels_are_filtered() {
    let c = cluster([
        node(1, 2),
        NodeSpec::new(2, "node-2", NodeKind::Native, "aarch64", 4, 4 * GIB)
            .with_label("zone", "b")
            .with_label("gpu", "yes"),
        node(3, 2).with_label("zone", "a"),
    ]);
    let base = Request::new(contract("1ms/100ms", MIB));

    let native = base.clone().with_kind(NodeKind::Native);
    assert_eq!(place_ok(&c, &native, Strategy::Spread).node, 2);
    let r = reasons(
        c.place(&native.clone().with_arch("x86_64"), Strategy::Spread)
            .unwrap_err(),
    );
    assert_eq!(
        r,
        [
            (
                1,
                Rejection::Kind {
                    want: NodeKind::Native,
                    have: NodeKind::Hosted
                }
            ),
            (
                2,
                Rejection::Arch {
                    want: "x86_64".into(),
                    have: "aarch64".into()
                }
            ),
            (
                3,
                Rejection::Kind {
                    want: NodeKind::Native,
                    have: NodeKind::Hosted
                }
            ),
        ]
    );

    assert_eq!(
        place_ok(&c, &base.clone().with_arch("aarch64"), Strategy::Spread).node,
        2
    );
    // An architecture no node has.
    let r = reasons(
        c.place(&base.clone().with_arch("riscv64"), Strategy::Spread)
            .unwrap_err(),
    );
    assert!(
        r.iter().all(|(_, r)| matches!(r, Rejection::Arch { .. })),
        "{r:?}"
    );

    let zone_a = base.clone().with_label("zone", "a");
    assert_eq!(place_ok(&c, &zone_a, Strategy::Spread).node, 3);
    assert_eq!(place_ok(&c, &zone_a, Strategy::Binpack).node, 3);
    let r = reasons(
        c.place(&zone_a.clone().with_label("gpu", "yes"), Strategy::Spread)
            .unwrap_err(),
    );
    assert_eq!(
        r,
        [
            (
                1,
                Rejection::Label {
                    key: "gpu".into(),
                    want: "yes".into(),
                    have: None
                }
            ),
            (
                2,
                Rejection::Label {
                    key: "zone".into(),
                    want: "a".into(),
                    have: Some("b".into())
                }
            ),
            (
                3,
                Rejection::Label {
                    key: "gpu".into(),
                    want: "yes".into(),
                    have: None
                }
            ),
        ]
    );
    let err = c
        .place(&zone_a.with_label("gpu", "yes"), Strategy::Spread)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "no node can run the domain: node 1: no label gpu, gpu=yes requested; \
         node 2: label zone=b, zone=a requested; node 3: no label gpu, gpu=yes requested"
    );
}

#[test]
fn memory_and_cpu_are_admission_checks() {
    // 1 GiB node: 256 MiB reserve, 768 MiB usable.
    let mut c = cluster([NodeSpec::new(
        1,
        "node-1",
        NodeKind::Hosted,
        "x86_64",
        1,
        GIB,
    )]);
    c.allocate(1, 0, "fill", contract("95ms/100ms", 768 * MIB))
        .unwrap();
    let req = Request::new(contract("1ms/100ms", MIB));
    assert_eq!(
        reasons(c.place(&req, Strategy::Spread).unwrap_err()),
        [(1, Rejection::Memory { free: 0, want: MIB })]
    );
    c.release("fill").unwrap();
    c.allocate(1, 0, "fill", contract("95ms/100ms", MIB))
        .unwrap();
    assert_eq!(
        reasons(c.place(&req, Strategy::Spread).unwrap_err()),
        [(
            1,
            Rejection::Cpu {
                free_ppm: 0,
                want_ppm: 10_000
            }
        )]
    );
    assert_eq!(
        c.check(1, &req),
        Some(Err(Rejection::Cpu {
            free_ppm: 0,
            want_ppm: 10_000
        }))
    );
    assert_eq!(c.check(2, &req), None);
}

#[test]
fn a_lane_admits_up_to_95_percent() {
    let mut c = cluster([node(1, 1)]);
    let tenth = contract("10ms/100ms", MIB);
    for i in 0..9 {
        let p = place_ok(&c, &Request::new(tenth), Strategy::Binpack);
        c.allocate(p.node, p.lane, format!("d{i}"), tenth).unwrap();
    }
    // 90 % used: 5 % left, not 10 %.
    assert_eq!(
        c.allocate(1, 0, "d9", tenth),
        Err(AllocError::Cpu {
            free_ppm: 50_000,
            want_ppm: 100_000
        })
    );
    let five = contract("5ms/100ms", MIB);
    assert_eq!(
        place_ok(&c, &Request::new(five), Strategy::Spread),
        Placement { node: 1, lane: 0 }
    );
    c.allocate(1, 0, "d9", five).unwrap();
    assert_eq!(c.usage(1).unwrap().lane_ppm, [LANE_CAPACITY_PPM]);
}

#[test]
fn a_whole_cpu_is_never_admitted_but_offered_95_percent() {
    let c = cluster([node(1, 4)]);
    let req = Request::new(contract("100ms/100ms", MIB));
    let o = offer(c.place(&req, Strategy::Spread).unwrap_err());
    assert_eq!(o.contract, contract("95ms/100ms", MIB));
}

#[test]
fn spread_and_binpack_choose_differently() {
    let mut c = cluster([node(1, 2), node(2, 2)]);
    c.allocate(1, 0, "a", contract("50ms/100ms", 64 * MIB))
        .unwrap();
    let req = Request::new(contract("10ms/100ms", 64 * MIB));
    // Spread: the empty node; binpack: the loaded node, on its loaded lane.
    assert_eq!(
        place_ok(&c, &req, Strategy::Spread),
        Placement { node: 2, lane: 0 }
    );
    assert_eq!(
        place_ok(&c, &req, Strategy::Binpack),
        Placement { node: 1, lane: 0 }
    );
    // Pinned to node 1: spread takes its empty lane.
    let pinned = req.clone().on_node(1);
    assert_eq!(
        place_ok(&c, &pinned, Strategy::Spread),
        Placement { node: 1, lane: 1 }
    );
    // Binpack skips a lane that is too full: 50 % + 50 % > 95 %.
    let half = Request::new(contract("50ms/100ms", 64 * MIB)).on_node(1);
    assert_eq!(
        place_ok(&c, &half, Strategy::Binpack),
        Placement { node: 1, lane: 1 }
    );
}

#[test]
fn spread_scores_the_free_fraction_not_the_free_amount() {
    // Node 1: 2 CPUs, 50 % of its capacity free after placement.
    // Node 2: 64 CPUs, 40 % free: much more free CPU in total.
    let mut c = cluster([node(1, 2), node(2, 64)]);
    c.allocate(1, 0, "a", contract("85ms/100ms", MIB)).unwrap();
    for lane in 0..38 {
        c.allocate(2, lane, format!("b{lane}"), contract("95ms/100ms", MIB))
            .unwrap();
    }
    let req = Request::new(contract("10ms/100ms", MIB));
    // After: node 1 (1.9 - 0.85 - 0.1) / 1.9 = 50 %; node 2 (60.8 - 36.1 - 0.1) / 60.8 = 40.5 %.
    assert_eq!(place_ok(&c, &req, Strategy::Spread).node, 1);
    assert_eq!(place_ok(&c, &req, Strategy::Binpack).node, 2);
}

#[test]
fn ties_go_to_memory_then_lowest_id() {
    let c = cluster([node(5, 2), node(3, 2), node(4, 2)]);
    let req = Request::new(contract("10ms/100ms", MIB));
    assert_eq!(place_ok(&c, &req, Strategy::Spread).node, 3);
    assert_eq!(place_ok(&c, &req, Strategy::Binpack).node, 3);

    let mut c = c;
    c.allocate(4, 0, "m", contract("1ms/100ms", GIB)).unwrap();
    c.allocate(5, 0, "m5", contract("1ms/100ms", MIB)).unwrap();
    c.allocate(3, 0, "m3", contract("1ms/100ms", MIB)).unwrap();
    // Same CPU everywhere; node 4 has the least memory free.
    assert_eq!(place_ok(&c, &req, Strategy::Spread).node, 3);
    assert_eq!(place_ok(&c, &req, Strategy::Binpack).node, 4);
}

#[test]
fn pinned_requests_go_only_to_their_node() {
    let mut c = cluster([node(1, 2), node(2, 2), node(3, 2)]);
    c.allocate(2, 0, "a", contract("90ms/100ms", MIB)).unwrap();
    c.allocate(2, 1, "b", contract("90ms/100ms", MIB)).unwrap();
    let req = Request::new(contract("3ms/100ms", MIB)).on_node(2);
    assert_eq!(
        place_ok(&c, &req, Strategy::Spread),
        Placement { node: 2, lane: 0 }
    );

    assert_eq!(
        c.place(&req.clone().on_node(9), Strategy::Spread),
        Err(PlaceError::UnknownNode(9))
    );

    c.set_up(2, false).unwrap();
    assert_eq!(
        reasons(c.place(&req, Strategy::Spread).unwrap_err()),
        [
            (1, Rejection::NotRequested),
            (2, Rejection::Down),
            (3, Rejection::NotRequested)
        ]
    );
    assert_eq!(c.check(1, &req), Some(Err(Rejection::NotRequested)));
    let err = c.place(&req, Strategy::Spread).unwrap_err();
    assert_eq!(err.to_string(), "no node can run the domain: node 2: down");

    // Pinned to a full node: the counter-offer comes from that node only, even
    // though node 1 and 3 are empty.
    c.set_up(2, true).unwrap();
    let big = Request::new(contract("10ms/100ms", MIB)).on_node(2);
    let o = offer(c.place(&big, Strategy::Spread).unwrap_err());
    assert_eq!((o.node, o.contract.slice_ns), (2, 5_000_000));
}

#[test]
fn counter_offer_gives_what_is_left() {
    let mut c = cluster([node(1, 1), node(2, 1), node(3, 1)]);
    c.allocate(1, 0, "a", contract("93ms/100ms", MIB)).unwrap(); // 2 % left
    c.allocate(2, 0, "b", contract("91ms/100ms", MIB)).unwrap(); // 4 % left
    c.allocate(3, 0, "c", contract("89ms/100ms", MIB)).unwrap(); // 6 % left
    let req = Request::new(contract("10ms/100ms", 64 * MIB));
    for s in [Strategy::Spread, Strategy::Binpack] {
        let err = c.place(&req, s).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no node can admit 10ms/100ms 64MiB; best available: 6ms/100ms 64MiB on node-3 \
             — rerun with --accept-offer"
        );
        let o = offer(err);
        assert_eq!(
            o,
            Offer {
                node: 3,
                node_name: "node-3".into(),
                lane: 0,
                contract: contract("6ms/100ms", 64 * MIB),
                requested: req.contract,
            }
        );
        // The offer is admissible, and using it fills the lane exactly.
        let p = place_ok(&c, &o.accept(&req), s);
        assert_eq!(p, Placement { node: 3, lane: 0 });
        let mut c2 = c.clone();
        c2.allocate(p.node, p.lane, "web", o.contract).unwrap();
        assert_eq!(c2.usage(3).unwrap().lane_ppm, [LANE_CAPACITY_PPM]);
    }
}

#[test]
fn counter_offer_keeps_period_and_extra_and_rounds_to_microseconds() {
    let mut c = cluster([node(1, 1)]);
    // 95 % - 33.3334 % (rounded up) = 61.6666 % left.
    c.allocate(1, 0, "a", contract("1ms/3ms", MIB)).unwrap();
    assert_eq!(c.usage(1).unwrap().lane_ppm, [333_334]);
    let mut want = contract("7ms/7ms", MIB);
    want.extra = true;
    let o = offer(c.place(&Request::new(want), Strategy::Spread).unwrap_err());
    // 0.616666 × 7 ms = 4316.662 µs → 4316 µs.
    assert_eq!(o.contract.period_ns, 7_000_000);
    assert_eq!(o.contract.slice_ns, 4_316_000);
    assert!(o.contract.extra);
    assert!(demand_ppm(&o.contract) <= 616_666);
}

#[test]
fn counter_offer_for_memory_keeps_the_slice() {
    let mut c = cluster([small(1, 2)]);
    let usable = c.node(1).unwrap().usable_memory();
    c.allocate(1, 0, "a", contract("1ms/100ms", usable - 100 * MIB))
        .unwrap();
    let req = Request::new(contract("10ms/100ms", 200 * MIB));
    let o = offer(c.place(&req, Strategy::Spread).unwrap_err());
    assert_eq!(o.contract, contract("10ms/100ms", 100 * MIB));
    assert_eq!(o.lane, 1);
}

#[test]
fn best_offer_maximises_the_smaller_fraction() {
    let mut c = cluster([small(1, 1), small(2, 1)]);
    let usable = c.node(1).unwrap().usable_memory();
    // Node 1: 9 % CPU left, 10 % of the requested memory.
    c.allocate(1, 0, "a", contract("86ms/100ms", usable - 10 * MIB))
        .unwrap();
    // Node 2: 6 % CPU left, all the memory.
    c.allocate(2, 0, "b", contract("89ms/100ms", MIB)).unwrap();
    let req = Request::new(contract("10ms/100ms", 100 * MIB));
    let o = offer(c.place(&req, Strategy::Spread).unwrap_err());
    assert_eq!(o.node, 2);
    assert_eq!(o.contract, contract("6ms/100ms", 100 * MIB));
}

#[test]
fn no_offer_from_filtered_nodes_or_when_nothing_fits() {
    let mut c = cluster([node(1, 1), node(2, 4).with_up(false)]);
    // 0.5 % of node 1 left: 5 µs per 1 ms period.
    c.allocate(1, 0, "a", contract("945ms/1s", MIB)).unwrap();
    let req = Request::new(contract("1ms/1ms", MIB));
    let o = offer(c.place(&req, Strategy::Spread).unwrap_err());
    assert_eq!((o.node, o.contract.slice_ns), (1, 5_000));
    assert_eq!(
        c.check(1, &req),
        Some(Err(Rejection::Cpu {
            free_ppm: 5_000,
            want_ppm: 1_000_000
        }))
    );
    // 5 ppm × 1 ms = 5 ns: rounds down to 0 µs, not a valid contract.
    c.release("a");
    c.allocate(1, 0, "a", contract("949995us/1s", MIB)).unwrap();
    let r = reasons(c.place(&req, Strategy::Spread).unwrap_err());
    assert_eq!(
        r,
        [
            (
                1,
                Rejection::Cpu {
                    free_ppm: 5,
                    want_ppm: 1_000_000
                }
            ),
            (2, Rejection::Down)
        ]
    );
    // With a longer period the same lane can offer something.
    let o = offer(
        c.place(&Request::new(contract("1s/1s", MIB)), Strategy::Spread)
            .unwrap_err(),
    );
    assert_eq!(o.contract.slice_ns, 5_000);
}

#[test]
fn empty_cluster() {
    let c = Cluster::new();
    let err = c
        .place(&Request::new(contract("1ms/10ms", MIB)), Strategy::Spread)
        .unwrap_err();
    assert_eq!(err, PlaceError::NoCandidates { reasons: vec![] });
    assert_eq!(err.to_string(), "no node can run the domain: no nodes");
}

#[test]
fn allocate_rechecks_and_changes_nothing_on_error() {
    let mut c = cluster([small(1, 2)]);
    let ok = contract("10ms/100ms", MIB);
    c.allocate(1, 1, "a", ok).unwrap();
    let before = c.state();
    assert_eq!(c.allocate(7, 0, "b", ok), Err(AllocError::UnknownNode(7)));
    assert_eq!(
        c.allocate(1, 2, "b", ok),
        Err(AllocError::NoSuchLane {
            node: 1,
            lane: 2,
            cpus: 2
        })
    );
    assert_eq!(
        c.allocate(1, 0, "a", ok),
        Err(AllocError::DuplicateDomain("a".into()))
    );
    let usable = c.node(1).unwrap().usable_memory();
    assert_eq!(
        c.allocate(1, 0, "b", contract("1ms/100ms", usable)),
        Err(AllocError::Memory {
            free: usable - MIB,
            want: usable
        })
    );
    assert_eq!(
        c.allocate(1, 1, "b", contract("90ms/100ms", MIB)),
        Err(AllocError::Cpu {
            free_ppm: 850_000,
            want_ppm: 900_000
        })
    );
    assert_eq!(c.state(), before);
    assert_eq!(
        c.usage(1).unwrap(),
        Usage {
            lane_ppm: vec![0, 100_000],
            memory_used: MIB,
            memory_usable: usable,
            domains: 1
        }
    );
}

#[test]
fn release_frees_capacity() {
    let mut c = cluster([node(1, 1)]);
    let big = contract("90ms/100ms", MIB);
    c.allocate(1, 0, "a", big).unwrap();
    assert!(c.place(&Request::new(big), Strategy::Spread).is_err());
    assert_eq!(
        c.release("a"),
        Some(Allocation {
            node: 1,
            lane: 0,
            contract: big
        })
    );
    assert_eq!(c.release("a"), None);
    assert_eq!(place_ok(&c, &Request::new(big), Strategy::Spread).node, 1);
    assert_eq!(c.usage(1).unwrap().memory_used, 0);
}

#[test]
fn node_management() {
    let mut c = cluster([node(1, 1), node(2, 1)]);
    assert_eq!(c.add_node(node(1, 4)), Err(ClusterError::DuplicateNode(1)));
    assert_eq!(
        c.add_node(node(3, 0)),
        Err(ClusterError::Cpus { node: 3, cpus: 0 })
    );
    assert_eq!(
        c.add_node(node(3, MAX_CPUS + 1)),
        Err(ClusterError::Cpus {
            node: 3,
            cpus: MAX_CPUS + 1
        })
    );
    let x = contract("10ms/100ms", MIB);
    c.allocate(1, 0, "a", x).unwrap();
    c.allocate(2, 0, "b", x).unwrap();
    c.allocate(1, 0, "c", x).unwrap();
    let evicted = c.remove_node(1).unwrap();
    let names: Vec<_> = evicted.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "c"]);
    assert_eq!(c.allocations().map(|(n, _)| n).collect::<Vec<_>>(), ["b"]);
    assert_eq!(c.domains_on(2).count(), 1);
    assert_eq!(c.remove_node(1), Err(ClusterError::UnknownNode(1)));
    assert_eq!(c.len(), 1);

    c.set_labels(2, [("zone".to_string(), "a".to_string())].into())
        .unwrap();
    let req = Request::new(x).with_label("zone", "a");
    assert_eq!(place_ok(&c, &req, Strategy::Spread).node, 2);
    assert_eq!(c.set_up(9, true), Err(ClusterError::UnknownNode(9)));
}

#[test]
fn serde_roundtrip_rebuilds_aggregates_and_rechecks() {
    let mut c = cluster([node(1, 2).with_label("zone", "a"), node(2, 1)]);
    c.allocate(1, 1, "a", contract("50ms/100ms", 64 * MIB))
        .unwrap();
    c.allocate(2, 0, "b", contract("1ms/10ms", MIB)).unwrap();
    let json = serde_json::to_string(&c).unwrap();
    let back: Cluster = serde_json::from_str(&json).unwrap();
    assert_eq!(back.state(), c.state());
    assert_eq!(back.usage(1), c.usage(1));
    let req = Request::new(contract("10ms/100ms", MIB));
    for s in [Strategy::Spread, Strategy::Binpack] {
        assert_eq!(back.place(&req, s), c.place(&req, s));
    }

    // A stored state that overcommits a lane is refused.
    let mut state = c.state();
    state.allocations.insert(
        "x".into(),
        Allocation {
            node: 1,
            lane: 1,
            contract: contract("50ms/100ms", MIB),
        },
    );
    let json = serde_json::to_string(&state).unwrap();
    let err = serde_json::from_str::<Cluster>(&json).unwrap_err();
    assert!(
        err.to_string().contains("domain \"x\": not enough CPU"),
        "{err}"
    );
}
