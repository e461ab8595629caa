//! The Metta scheduler: where a domain with a QoS [`Contract`] runs.
//!
//! Pure logic: no I/O, no clock, no randomness, no threads. The same [`Cluster`]
//! and [`Request`] always give the same answer, so the control plane can run it
//! on the Raft leader and store the result (every public data type is
//! `serde`-serializable; a [`Cluster`] serializes as its nodes and allocations).
//!
//! # The model
//!
//! - **CPU.** A node runs domains on `cpus` *lanes*, one EDF activation scheduler
//!   per CPU (partitioned EDF). A domain lives on exactly one lane. A lane admits
//!   domains while the sum of their demands stays at most [`LANE_CAPACITY_PPM`]
//!   (95 % of the CPU; 5 % is kept for the nucleus). Under EDF with implicit
//!   deadlines, a utilisation sum ≤ 100 % is exactly the schedulability
//!   condition, so an admitted slice is a guarantee, not a hope. A contract's
//!   demand is `slice / period` in parts per million, **rounded up**
//!   ([`demand_ppm`]) so rounding can never overcommit a lane. `extra` (use of
//!   unreserved time) costs nothing at admission.
//! - **Memory.** The contracts' memory on a node sums to at most its memory
//!   minus a per-node reserve ([`NodeSpec::memory_reserve`], by default
//!   [`default_memory_reserve`]: 10 %, at least 256 MiB; a native node keeps
//!   [`NATIVE_MEMORY_RESERVE`]).
//!
//! # Placing
//!
//! [`place`] (or [`Cluster::place`]) filters the nodes — the pinned node
//! (`--node`), up, [`NodeKind`](metta_proto::NodeKind), architecture, labels
//! (`--label k=v`) — keeps those that can admit the contract, and scores them
//! with a [`Strategy`]: [`Spread`](Strategy::Spread) (most CPU left free, as a
//! fraction of the node's capacity) or [`Binpack`](Strategy::Binpack) (least
//! left). Ties go to more (spread) or less (binpack) free memory, then to the
//! lowest node id. It returns a [`Placement`] (node and lane) and changes
//! nothing; [`Cluster::allocate`] commits it and re-checks admission, so a
//! placement computed on a stale view can never overcommit a node.
//!
//! When no node can admit the contract, the user gets a counter-offer, never a
//! silent downgrade: [`PlaceError::CounterOffer`] carries the best contract a
//! matching node *can* admit (same period, smaller slice and/or memory; see
//! [`Offer`]), and it is admissible by construction. When no node matches at
//! all, [`PlaceError::NoCandidates`] says, per node, which filter rejected it
//! ([`Rejection`]).
//!
//! ```
//! use metta_proto::{Contract, NodeKind};
//! use metta_scheduler::{Cluster, NodeSpec, PlaceError, Request, Strategy};
//!
//! let mut cluster = Cluster::new();
//! cluster.add_node(NodeSpec::new(3, "node-3", NodeKind::Hosted, "x86_64", 1, 8 << 30))?;
//! // Something already holds 89 % of node-3's only CPU: 6 % of it is left.
//! let big = Contract { period_ns: 100_000_000, slice_ns: 89_000_000, extra: false, memory: 64 << 20 };
//! cluster.allocate(3, 0, "db", big)?;
//!
//! let want: Contract = "10ms/100ms".parse()?;
//! let req = Request::new(want);
//! match cluster.place(&req, Strategy::Spread) {
//!     Err(PlaceError::CounterOffer(offer)) => {
//!         assert_eq!(offer.contract.to_string(), "6ms/100ms 64MiB");
//!         assert_eq!(
//!             PlaceError::CounterOffer(offer.clone()).to_string(),
//!             "no node can admit 10ms/100ms 64MiB; best available: 6ms/100ms 64MiB \
//!              on node-3 — rerun with --accept-offer"
//!         );
//!         // Accepting it: place the offered contract on the offered node.
//!         let p = cluster.place(&offer.accept(&req), Strategy::Spread)?;
//!         cluster.allocate(p.node, p.lane, "web", offer.contract)?;
//!     }
//!     other => panic!("{other:?}"),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Cost
//!
//! [`Cluster`] keeps per-node aggregates (load per lane, total free share, the
//! emptiest lane's free share, free memory) and indexes the up nodes by CPU
//! count, each group sorted by free CPU and memory — the order both strategies
//! score by among nodes of equal capacity. A placement is then, per group, a
//! binary search and a walk over the nodes that fail a filter, with no
//! allocation; [`Cluster::allocate`] and [`Cluster::release`] move one entry
//! within its group. Worst case (every node fails a filter) it is a pass over
//! all nodes. `cargo run --release -p metta-scheduler --example placement`
//! measures it (`docs/benchmarks.md`, "Placement").
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod cluster;
mod model;
mod place;

pub use cluster::{AllocError, Cluster, ClusterError, ClusterState, StateError, Usage};
pub use metta_proto::Contract;
pub use model::{
    default_memory_reserve, demand_ppm, memory_reserve_for, Allocation, Bytes, NodeSpec, Placement,
    Ppm, Request, Strategy, StrategyParseError, LANE_CAPACITY_PPM, MAX_CPUS, MIN_MEMORY_RESERVE,
    NATIVE_MEMORY_RESERVE,
};
pub use place::{place, Offer, PlaceError, Rejection};

#[cfg(test)]
mod tests;
