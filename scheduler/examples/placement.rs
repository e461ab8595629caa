//! Placement throughput: 10,000 domains onto 1,000 simulated nodes.
//!
//! `cargo run --release -p metta-scheduler --example placement [-- RUNS]`
//!
//! Each run builds the same seeded cluster (1,000 nodes, 2–64 CPUs, mixed
//! kinds, architectures and zones, ~2 % down) and the same 10,000 requests
//! (mixed periods and shares, some with a label, architecture, kind or node
//! constraint, ~1 % asking for a whole CPU, which only a counter-offer can
//! answer), then times `place` + `allocate` for all of them, one after the
//! other, on one thread. Counter-offers and refusals are counted, not accepted.
//! Cluster and request generation are outside the timed region.

use std::time::Instant;

use metta_proto::{Contract, NodeKind};
use metta_scheduler::{Cluster, NodeSpec, PlaceError, Request, Strategy};

const NODES: u64 = 1_000;
const DOMAINS: usize = 10_000;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// xorshift64*: a tiny deterministic generator (no `rand` dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// In `0..n` (n small; modulo bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn build_cluster(rng: &mut Rng) -> Cluster {
    const CPUS: [u32; 10] = [2, 4, 6, 8, 12, 16, 24, 32, 48, 64];
    let mut c = Cluster::new();
    for id in 1..=NODES {
        let cpus = CPUS[rng.below(CPUS.len() as u64) as usize];
        let memory = u64::from(cpus) * (1 + rng.below(4)) * GIB;
        let kind = if rng.chance(10) {
            NodeKind::Native
        } else {
            NodeKind::Hosted
        };
        let arch = if rng.chance(20) { "aarch64" } else { "x86_64" };
        let mut n = NodeSpec::new(id, format!("node-{id}"), kind, arch, cpus, memory)
            .with_label("zone", format!("zone-{}", rng.below(5)))
            .with_up(!rng.chance(2));
        if rng.chance(5) {
            n = n.with_label("gpu", "yes");
        }
        c.add_node(n).expect("distinct ids, 2-64 CPUs");
    }
    c
}

fn build_requests(rng: &mut Rng) -> Vec<(String, Request)> {
    const PERIODS_MS: [u64; 6] = [1, 5, 10, 20, 100, 1_000];
    (0..DOMAINS)
        .map(|i| {
            let period_ns = PERIODS_MS[rng.below(PERIODS_MS.len() as u64) as usize] * 1_000_000;
            // Shares: mostly 1-20 %, some up to 60 %, 1 % a whole CPU.
            let percent = match rng.below(100) {
                0 => 100,
                1..=80 => 1 + rng.below(20),
                _ => 1 + rng.below(60),
            };
            let contract = Contract {
                period_ns,
                slice_ns: period_ns / 100 * percent,
                extra: rng.chance(30),
                memory: (16 + rng.below(2048 - 16)) * MIB,
            };
            let mut req = Request::new(contract);
            match rng.below(100) {
                0..=9 => req = req.with_label("zone", format!("zone-{}", rng.below(5))),
                10..=14 => req = req.with_arch("aarch64"),
                15..=19 => req = req.with_kind(NodeKind::Native),
                20 => req = req.on_node(1 + rng.below(NODES)),
                21 => req = req.with_label("gpu", "yes").with_arch("x86_64"),
                _ => {}
            }
            (format!("domain-{i}"), req)
        })
        .collect()
}

struct Run {
    per_sec: f64,
    placed: usize,
    offers: usize,
    refused: usize,
}

fn run(strategy: Strategy) -> Run {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut cluster = build_cluster(&mut rng);
    let requests = build_requests(&mut rng);
    let (mut placed, mut offers, mut refused) = (0, 0, 0);

    let start = Instant::now();
    for (name, req) in requests {
        match cluster.place(&req, strategy) {
            Ok(p) => {
                cluster
                    .allocate(p.node, p.lane, name, req.contract)
                    .expect("a placement is admissible");
                placed += 1;
            }
            Err(PlaceError::CounterOffer(_)) => offers += 1,
            Err(_) => refused += 1,
        }
    }
    let elapsed = start.elapsed();
    Run {
        per_sec: DOMAINS as f64 / elapsed.as_secs_f64(),
        placed,
        offers,
        refused,
    }
}

/// Median, min and max.
fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("RUNS must be a number"))
        .unwrap_or(5)
        .max(1);
    println!(
        "placement: {DOMAINS} domains onto {NODES} nodes, place + allocate, 1 thread, {runs} runs"
    );
    for strategy in [Strategy::Spread, Strategy::Binpack] {
        let results: Vec<Run> = (0..runs).map(|_| run(strategy)).collect();
        // Every run places the same requests on the same cluster: same counts.
        let r = &results[0];
        let (median, min, max) = summary(results.iter().map(|r| r.per_sec).collect());
        println!(
            "{strategy:>8}: median {median:>7.0} placements/s (min {min:.0}, max {max:.0}); \
             {} placed, {} counter-offers, {} refused",
            r.placed, r.offers, r.refused
        );
    }
}
