//! The scheduler's plain data: nodes, requests, strategies, allocations.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use metta_proto::{Contract, NodeId, NodeKind};
use serde::{Deserialize, Serialize};

/// The share of one CPU (in parts per million) that domains may be guaranteed on
/// a lane: 95 %. The remaining 5 % is kept for the nucleus (interrupts, the
/// activation scheduler itself, the node agent).
pub const LANE_CAPACITY_PPM: u64 = 950_000;

/// The smallest memory reserve [`default_memory_reserve`] picks: 256 MiB.
pub const MIN_MEMORY_RESERVE: u64 = 256 << 20;

/// The most CPUs (lanes) a node may declare. It bounds the per-node lane table
/// and keeps every score product well inside `u128`.
pub const MAX_CPUS: u32 = 4096;

/// The memory a node keeps for itself unless told otherwise: 10 % of its memory,
/// at least [`MIN_MEMORY_RESERVE`], at most all of it.
pub fn default_memory_reserve(memory_bytes: u64) -> u64 {
    (memory_bytes / 10)
        .max(MIN_MEMORY_RESERVE)
        .min(memory_bytes)
}

/// The memory a native node (the bare-metal kernel) keeps for itself: its
/// image, page tables, stacks, network buffers and the per-domain runtime
/// state outside the domains' own memory. The kernel's idle footprint is
/// measured in `docs/benchmarks.md`; this leaves room above it.
pub const NATIVE_MEMORY_RESERVE: u64 = 32 << 20;

/// The memory reserve of a node of `kind`: [`default_memory_reserve`] for a
/// hosted node (Linux and `mettad` share the machine), at most
/// [`NATIVE_MEMORY_RESERVE`] for a native one (nothing else runs there).
pub fn memory_reserve_for(kind: NodeKind, memory_bytes: u64) -> u64 {
    match kind {
        NodeKind::Native => NATIVE_MEMORY_RESERVE.min(memory_bytes),
        _ => default_memory_reserve(memory_bytes),
    }
}

/// The CPU share a contract needs on its lane, in parts per million, **rounded
/// up** (unlike [`Contract::share_ppm`], which rounds down): admission must never
/// let many tiny contracts (1 µs / 10 s is 0.1 ppm) add up to more than a lane.
pub fn demand_ppm(contract: &Contract) -> u64 {
    if contract.period_ns == 0 {
        return u64::MAX;
    }
    let ppm = (contract.slice_ns as u128 * 1_000_000).div_ceil(contract.period_ns as u128);
    u64::try_from(ppm).unwrap_or(u64::MAX)
}

/// What the scheduler knows about one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// The node's cluster-wide id.
    pub id: NodeId,
    /// Its name (`node-3`), for messages.
    pub name: String,
    /// Hosted (`mettad`) or native (`metta-kernel`).
    pub kind: NodeKind,
    /// CPU architecture, e.g. `x86_64`, `aarch64`.
    pub arch: String,
    /// CPUs, one EDF lane each.
    pub cpus: u32,
    /// Physical memory.
    pub memory_bytes: u64,
    /// Memory kept back for the node itself; domains share the rest.
    pub memory_reserve: u64,
    /// Labels a request may select on (`--label k=v`).
    pub labels: BTreeMap<String, String>,
    /// Whether the node is up; down nodes get no new domains.
    pub up: bool,
}

impl NodeSpec {
    /// A node that is up, without labels, with the reserve of its kind
    /// ([`memory_reserve_for`]).
    pub fn new(
        id: NodeId,
        name: impl Into<String>,
        kind: NodeKind,
        arch: impl Into<String>,
        cpus: u32,
        memory_bytes: u64,
    ) -> Self {
        NodeSpec {
            id,
            name: name.into(),
            kind,
            arch: arch.into(),
            cpus,
            memory_bytes,
            memory_reserve: memory_reserve_for(kind, memory_bytes),
            labels: BTreeMap::new(),
            up: true,
        }
    }

    /// Adds a label.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Sets the memory reserve.
    pub fn with_memory_reserve(mut self, reserve: u64) -> Self {
        self.memory_reserve = reserve;
        self
    }

    /// Sets whether the node is up.
    pub fn with_up(mut self, up: bool) -> Self {
        self.up = up;
        self
    }

    /// Memory domains may be guaranteed: physical memory minus the reserve.
    pub fn usable_memory(&self) -> u64 {
        self.memory_bytes.saturating_sub(self.memory_reserve)
    }

    /// CPU share domains may be guaranteed, summed over all lanes, in ppm.
    pub fn cpu_capacity_ppm(&self) -> u64 {
        u64::from(self.cpus) * LANE_CAPACITY_PPM
    }
}

/// A request to place one domain (`mettactl run`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The contract the domain must be guaranteed.
    pub contract: Contract,
    /// `--node X`: only this node.
    pub node: Option<NodeId>,
    /// `--label k=v`: the node must carry every one of these labels.
    pub labels: BTreeMap<String, String>,
    /// The node's architecture must be this one.
    pub arch: Option<String>,
    /// The node must be of this kind.
    pub kind: Option<NodeKind>,
}

impl Request {
    /// A request with no constraints besides the contract.
    pub fn new(contract: Contract) -> Self {
        Request {
            contract,
            node: None,
            labels: BTreeMap::new(),
            arch: None,
            kind: None,
        }
    }

    /// Pins the request to one node.
    pub fn on_node(mut self, node: NodeId) -> Self {
        self.node = Some(node);
        self
    }

    /// Requires a label.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Requires an architecture.
    pub fn with_arch(mut self, arch: impl Into<String>) -> Self {
        self.arch = Some(arch.into());
        self
    }

    /// Requires a node kind.
    pub fn with_kind(mut self, kind: NodeKind) -> Self {
        self.kind = Some(kind);
        self
    }
}

/// How to choose among the nodes that can admit a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Strategy {
    /// The node left with the largest free fraction of its CPU capacity, and on
    /// it the emptiest lane: leaves headroom everywhere (and spare time for
    /// `extra` domains).
    #[default]
    Spread,
    /// The node left with the smallest free fraction that still fits, and on it
    /// the fullest lane that fits: keeps whole nodes and lanes free.
    Binpack,
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Strategy::Spread => "spread",
            Strategy::Binpack => "binpack",
        })
    }
}

/// A strategy name that is neither `spread` nor `binpack`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown strategy {0:?}: use spread or binpack")]
pub struct StrategyParseError(pub String);

impl FromStr for Strategy {
    type Err = StrategyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "spread" => Ok(Strategy::Spread),
            "binpack" => Ok(Strategy::Binpack),
            _ => Err(StrategyParseError(s.to_string())),
        }
    }
}

/// Where a request should go: a node and one of its lanes (CPUs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Placement {
    /// The node.
    pub node: NodeId,
    /// The lane (CPU index on that node).
    pub lane: u32,
}

/// One domain's admitted place and contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Allocation {
    /// The node.
    pub node: NodeId,
    /// The lane on that node.
    pub lane: u32,
    /// The admitted contract.
    pub contract: Contract,
}

/// Formats a byte count compactly (`64MiB`, `1.5GiB`, `4095B`).
#[derive(Debug, Clone, Copy)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        let n = self.0;
        for (size, unit) in UNITS {
            if n >= size {
                return if n.is_multiple_of(size) {
                    write!(f, "{}{unit}", n / size)
                } else {
                    // One decimal, rounded down: never overstates free memory.
                    write!(f, "{}.{}{unit}", n / size, (n % size) * 10 / size)
                };
            }
        }
        write!(f, "{n}B")
    }
}

/// Formats parts per million of a CPU as a percentage (`6%`, `12.5%`).
#[derive(Debug, Clone, Copy)]
pub struct Ppm(pub u64);

impl fmt::Display for Ppm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / 10_000, self.0 % 10_000);
        if frac == 0 {
            write!(f, "{whole}%")
        } else {
            let s = format!("{frac:04}");
            write!(f, "{whole}.{}%", s.trim_end_matches('0'))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_rounds_up_share_rounds_down() {
        let tiny = Contract {
            period_ns: 3_000_000,
            slice_ns: 1,
            extra: false,
            memory: 1,
        };
        assert_eq!(tiny.share_ppm(), 0);
        assert_eq!(demand_ppm(&tiny), 1);
        let c: Contract = "10ms/100ms".parse().unwrap();
        assert_eq!(demand_ppm(&c), 100_000);
    }

    #[test]
    fn default_reserve() {
        assert_eq!(default_memory_reserve(1 << 30), 256 << 20);
        assert_eq!(default_memory_reserve(64 << 30), (64 << 30) / 10);
        assert_eq!(default_memory_reserve(100 << 20), 100 << 20);
        assert_eq!(memory_reserve_for(NodeKind::Native, 256 << 20), 32 << 20);
        assert_eq!(memory_reserve_for(NodeKind::Native, 16 << 20), 16 << 20);
        assert_eq!(memory_reserve_for(NodeKind::Hosted, 1 << 30), 256 << 20);
    }

    #[test]
    fn formats() {
        assert_eq!(Bytes(64 << 20).to_string(), "64MiB");
        assert_eq!(Bytes(3 << 29).to_string(), "1.5GiB");
        assert_eq!(Bytes(1000).to_string(), "1000B");
        assert_eq!(Ppm(60_000).to_string(), "6%");
        assert_eq!(Ppm(125_000).to_string(), "12.5%");
        assert_eq!(Ppm(1).to_string(), "0.0001%");
        assert_eq!("binpack".parse::<Strategy>(), Ok(Strategy::Binpack));
        assert!("fill".parse::<Strategy>().is_err());
        assert_eq!(Strategy::default().to_string(), "spread");
    }
}
