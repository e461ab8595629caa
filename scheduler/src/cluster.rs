//! The scheduler's view of the cluster: nodes, their per-lane load and memory,
//! and which domain runs where.

use std::collections::BTreeMap;

use metta_proto::{Contract, ContractError, NodeId, NodeKind};
use serde::{Deserialize, Serialize};

use crate::model::{demand_ppm, Allocation, NodeSpec, LANE_CAPACITY_PPM, MAX_CPUS};

/// Distinct architecture names a cluster can hold (they are packed into 30
/// bits of [`Hot::class`], one value kept for "no such architecture").
const MAX_ARCHES: usize = NO_ARCH as usize;

/// The architecture index of a request for an architecture no node has.
pub(crate) const NO_ARCH: u32 = (1 << 30) - 1;

/// A node could not be added, changed or removed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// A node with this id is already in the cluster.
    #[error("node {0} is already in the cluster")]
    DuplicateNode(NodeId),
    /// No node with this id.
    #[error("no node {0} in the cluster")]
    UnknownNode(NodeId),
    /// More than 2^30 − 1 distinct architecture names.
    #[error("too many distinct architectures")]
    TooManyArches,
    /// Zero CPUs, or more than [`MAX_CPUS`].
    #[error("node {node} declares {cpus} CPUs: must be 1 to {max}", max = MAX_CPUS)]
    Cpus {
        /// The node.
        node: NodeId,
        /// What it declared.
        cpus: u32,
    },
}

/// A domain could not be allocated: the re-check at commit time failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AllocError {
    /// The contract is out of range.
    #[error("invalid contract: {0}")]
    InvalidContract(#[source] ContractError),
    /// No node with this id.
    #[error("no node {0} in the cluster")]
    UnknownNode(NodeId),
    /// The node has no such lane.
    #[error("node {node} has {cpus} CPUs, no lane {lane}")]
    NoSuchLane {
        /// The node.
        node: NodeId,
        /// The lane asked for.
        lane: u32,
        /// The node's CPUs.
        cpus: u32,
    },
    /// A domain with this name is already allocated.
    #[error("domain {0:?} is already placed")]
    DuplicateDomain(String),
    /// The node's usable memory would be exceeded.
    #[error("not enough memory: {} free, {} wanted", crate::Bytes(*free), crate::Bytes(*want))]
    Memory {
        /// Usable memory not yet allocated, in bytes.
        free: u64,
        /// The contract's memory.
        want: u64,
    },
    /// The lane's capacity would be exceeded.
    #[error("not enough CPU on the lane: {} free, {} wanted", crate::Ppm(*free_ppm), crate::Ppm(*want_ppm))]
    Cpu {
        /// Free share of the lane, ppm.
        free_ppm: u64,
        /// The contract's demand, ppm.
        want_ppm: u64,
    },
}

/// A serialized [`Cluster`] could not be rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// A node is invalid or duplicated.
    #[error("{0}")]
    Node(#[from] ClusterError),
    /// An allocation no longer fits (or names an unknown node).
    #[error("domain {domain:?}: {error}")]
    Allocation {
        /// The domain.
        domain: String,
        /// Why its allocation was refused.
        error: AllocError,
    },
}

/// The persistent form of a [`Cluster`]: nodes and allocations only. The
/// aggregates are rebuilt (and every allocation re-admitted) when it is loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Nodes, in id order.
    pub nodes: Vec<NodeSpec>,
    /// Domain name → allocation.
    pub allocations: BTreeMap<String, Allocation>,
}

/// What a node has admitted, for listings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Admitted demand per lane, ppm (each at most [`LANE_CAPACITY_PPM`]).
    pub lane_ppm: Vec<u64>,
    /// Memory admitted, bytes.
    pub memory_used: u64,
    /// Memory domains may use in total (memory minus reserve), bytes.
    pub memory_usable: u64,
    /// Number of domains on the node.
    pub domains: usize,
}

/// The per-node figures a placement reads, kept small (32 bytes) so they can be
/// scanned and kept sorted without touching the node specs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hot {
    pub(crate) id: NodeId,
    /// Usable memory not yet allocated.
    pub(crate) mem_free: u64,
    /// Total capacity over all lanes, ppm (≤ `MAX_CPUS` × `LANE_CAPACITY_PPM`,
    /// which fits in 32 bits).
    pub(crate) cpu_cap: u32,
    /// Total free capacity over all lanes, ppm.
    pub(crate) cpu_free: u32,
    /// Free capacity of the emptiest lane, ppm: the largest demand that fits.
    pub(crate) lane_free: u32,
    /// `arch index << 2 | native << 1 | up`: the kind, architecture and up
    /// filters in one masked comparison (see [`Hot::class`]).
    pub(crate) class: u32,
}

// Every ppm figure fits in u32, and the score's cross products
// (free × capacity) in u64.
const _: () = assert!((MAX_CPUS as u64) * LANE_CAPACITY_PPM <= u32::MAX as u64);

impl Hot {
    pub(crate) const UP: u32 = 1;
    pub(crate) const NATIVE: u32 = 2;
    pub(crate) const ARCH_SHIFT: u32 = 2;

    pub(crate) fn class(arch: u32, kind: NodeKind, up: bool) -> u32 {
        let native = match kind {
            NodeKind::Native => Hot::NATIVE,
            NodeKind::Hosted => 0,
        };
        (arch << Hot::ARCH_SHIFT) | native | u32::from(up)
    }

    pub(crate) fn is_up(&self) -> bool {
        self.class & Hot::UP != 0
    }

    /// The order within a [`Group`].
    pub(crate) fn key(&self) -> (u32, u64, NodeId) {
        (self.cpu_free, self.mem_free, self.id)
    }
}

/// The up nodes of one CPU capacity, sorted by [`Hot::key`]: free CPU, then
/// free memory, then id. Among nodes of equal capacity, that is exactly the
/// order both strategies score by, so a placement finds each group's best node
/// with a binary search and a short walk instead of scanning every node.
#[derive(Debug, Clone)]
pub(crate) struct Group {
    pub(crate) cap: u32,
    pub(crate) nodes: Vec<Hot>,
}

#[derive(Debug, Clone)]
pub(crate) struct NodeState {
    pub(crate) spec: NodeSpec,
    /// Admitted demand per lane, ppm.
    pub(crate) lanes: Vec<u64>,
    pub(crate) mem_used: u64,
    pub(crate) domains: usize,
}

/// The scheduler's view of the cluster.
///
/// Nodes are kept in id order with per-node aggregates — load per lane, total
/// free CPU, the emptiest lane's free share, free memory — updated by
/// [`Cluster::allocate`] and [`Cluster::release`], so a placement never
/// recomputes them. The up nodes are also indexed by CPU capacity, each group
/// sorted by free CPU and memory. Neither order depends on the order nodes were
/// added in, so neither does any placement.
///
/// It serializes as a [`ClusterState`]; deserializing re-admits every allocation
/// and fails if one no longer fits.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(into = "ClusterState", try_from = "ClusterState")]
pub struct Cluster {
    /// Parallel to `nodes`, same order.
    pub(crate) hot: Vec<Hot>,
    /// The up nodes by capacity, groups in capacity order, none empty.
    pub(crate) groups: Vec<Group>,
    pub(crate) nodes: Vec<NodeState>,
    /// Interned architecture names (`Hot::arch` indexes this).
    pub(crate) arches: Vec<String>,
    pub(crate) domains: BTreeMap<String, Allocation>,
}

impl Cluster {
    /// An empty cluster.
    pub fn new() -> Self {
        Cluster::default()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub(crate) fn index(&self, id: NodeId) -> Option<usize> {
        self.hot.binary_search_by_key(&id, |h| h.id).ok()
    }

    pub(crate) fn arch_index(&self, arch: &str) -> Option<u32> {
        self.arches.iter().position(|a| a == arch).map(|i| i as u32)
    }

    /// Adds a node with nothing allocated on it.
    pub fn add_node(&mut self, spec: NodeSpec) -> Result<(), ClusterError> {
        if spec.cpus == 0 || spec.cpus > MAX_CPUS {
            return Err(ClusterError::Cpus {
                node: spec.id,
                cpus: spec.cpus,
            });
        }
        let at = match self.hot.binary_search_by_key(&spec.id, |h| h.id) {
            Ok(_) => return Err(ClusterError::DuplicateNode(spec.id)),
            Err(at) => at,
        };
        let arch = match self.arch_index(&spec.arch) {
            Some(i) => i,
            None => {
                if self.arches.len() >= MAX_ARCHES {
                    return Err(ClusterError::TooManyArches);
                }
                self.arches.push(spec.arch.clone());
                (self.arches.len() - 1) as u32
            }
        };
        let cap = spec.cpu_capacity_ppm();
        let h = Hot {
            id: spec.id,
            mem_free: spec.usable_memory(),
            cpu_cap: cap as u32,
            cpu_free: cap as u32,
            lane_free: LANE_CAPACITY_PPM as u32,
            class: Hot::class(arch, spec.kind, spec.up),
        };
        self.hot.insert(at, h);
        self.index_insert(h);
        self.nodes.insert(
            at,
            NodeState {
                lanes: vec![0; spec.cpus as usize],
                mem_used: 0,
                domains: 0,
                spec,
            },
        );
        Ok(())
    }

    /// Removes a node and every allocation on it; returns the evicted domains
    /// (the caller must place them again).
    pub fn remove_node(&mut self, id: NodeId) -> Result<Vec<(String, Allocation)>, ClusterError> {
        let i = self.index(id).ok_or(ClusterError::UnknownNode(id))?;
        let mut evicted = Vec::new();
        if self.nodes[i].domains > 0 {
            let domains = std::mem::take(&mut self.domains);
            for (name, a) in domains {
                if a.node == id {
                    evicted.push((name, a));
                } else {
                    self.domains.insert(name, a);
                }
            }
        }
        let h = self.hot.remove(i);
        self.index_remove(&h);
        self.nodes.remove(i);
        Ok(evicted)
    }

    /// Marks a node up or down. Down nodes keep their domains but get no new ones.
    pub fn set_up(&mut self, id: NodeId, up: bool) -> Result<(), ClusterError> {
        let i = self.index(id).ok_or(ClusterError::UnknownNode(id))?;
        let old = self.hot[i];
        let new = Hot {
            class: (old.class & !Hot::UP) | u32::from(up),
            ..old
        };
        self.index_remove(&old);
        self.index_insert(new);
        self.hot[i] = new;
        self.nodes[i].spec.up = up;
        Ok(())
    }

    /// Replaces a node's labels.
    pub fn set_labels(
        &mut self,
        id: NodeId,
        labels: BTreeMap<String, String>,
    ) -> Result<(), ClusterError> {
        let i = self.index(id).ok_or(ClusterError::UnknownNode(id))?;
        self.nodes[i].spec.labels = labels;
        Ok(())
    }

    /// A node's spec.
    pub fn node(&self, id: NodeId) -> Option<&NodeSpec> {
        self.index(id).map(|i| &self.nodes[i].spec)
    }

    /// All nodes, in id order.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeSpec> + '_ {
        self.nodes.iter().map(|n| &n.spec)
    }

    /// What a node has admitted.
    pub fn usage(&self, id: NodeId) -> Option<Usage> {
        self.index(id).map(|i| {
            let n = &self.nodes[i];
            Usage {
                lane_ppm: n.lanes.clone(),
                memory_used: n.mem_used,
                memory_usable: n.spec.usable_memory(),
                domains: n.domains,
            }
        })
    }

    /// Where a domain runs.
    pub fn allocation(&self, domain: &str) -> Option<&Allocation> {
        self.domains.get(domain)
    }

    /// Every allocation, by domain name.
    pub fn allocations(&self) -> impl Iterator<Item = (&str, &Allocation)> + '_ {
        self.domains.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The domains on one node, by name.
    pub fn domains_on(&self, node: NodeId) -> impl Iterator<Item = (&str, &Allocation)> + '_ {
        self.allocations().filter(move |(_, a)| a.node == node)
    }

    /// Records that `domain` runs on `lane` of `node` with `contract`, after
    /// re-checking admission: the contract must be valid, the lane's admitted
    /// demand must stay within [`LANE_CAPACITY_PPM`] and the node's admitted
    /// memory within its usable memory. The node need not be up (allocations of
    /// a node that went down are still recorded). On error nothing changes.
    pub fn allocate(
        &mut self,
        node: NodeId,
        lane: u32,
        domain: impl Into<String>,
        contract: Contract,
    ) -> Result<(), AllocError> {
        contract.validate().map_err(AllocError::InvalidContract)?;
        let i = self.index(node).ok_or(AllocError::UnknownNode(node))?;
        let n = &self.nodes[i];
        if lane >= n.spec.cpus {
            return Err(AllocError::NoSuchLane {
                node,
                lane,
                cpus: n.spec.cpus,
            });
        }
        let domain = domain.into();
        if self.domains.contains_key(&domain) {
            return Err(AllocError::DuplicateDomain(domain));
        }
        let h = &self.hot[i];
        if contract.memory > h.mem_free {
            return Err(AllocError::Memory {
                free: h.mem_free,
                want: contract.memory,
            });
        }
        let want = demand_ppm(&contract);
        let load = n.lanes[lane as usize];
        let free = LANE_CAPACITY_PPM - load;
        if want > free {
            return Err(AllocError::Cpu {
                free_ppm: free,
                want_ppm: want,
            });
        }
        let n = &mut self.nodes[i];
        n.lanes[lane as usize] = load + want;
        n.mem_used += contract.memory;
        n.domains += 1;
        let old = self.hot[i];
        let new = Hot {
            cpu_free: old.cpu_free - want as u32,
            mem_free: old.mem_free - contract.memory,
            lane_free: lane_free(&n.lanes),
            ..old
        };
        self.hot[i] = new;
        self.index_update(&old, new);
        self.domains.insert(
            domain,
            Allocation {
                node,
                lane,
                contract,
            },
        );
        Ok(())
    }

    /// Forgets a domain and frees its share and memory; returns where it was.
    pub fn release(&mut self, domain: &str) -> Option<Allocation> {
        let a = self.domains.remove(domain)?;
        // An allocation always names a node in the cluster: remove_node evicts
        // the domains of the node it removes.
        if let Some(i) = self.index(a.node) {
            let want = demand_ppm(&a.contract);
            let n = &mut self.nodes[i];
            n.lanes[a.lane as usize] -= want;
            n.mem_used -= a.contract.memory;
            n.domains -= 1;
            let old = self.hot[i];
            let new = Hot {
                cpu_free: old.cpu_free + want as u32,
                mem_free: old.mem_free + a.contract.memory,
                lane_free: lane_free(&n.lanes),
                ..old
            };
            self.hot[i] = new;
            self.index_update(&old, new);
        }
        Some(a)
    }

    /// The persistent form: nodes and allocations.
    pub fn state(&self) -> ClusterState {
        ClusterState {
            nodes: self.nodes().cloned().collect(),
            allocations: self.domains.clone(),
        }
    }

    /// Rebuilds a cluster from its persistent form, re-admitting every
    /// allocation (in domain-name order).
    pub fn from_state(state: ClusterState) -> Result<Cluster, StateError> {
        let mut c = Cluster::new();
        for n in state.nodes {
            c.add_node(n)?;
        }
        for (domain, a) in state.allocations {
            if let Err(error) = c.allocate(a.node, a.lane, domain.as_str(), a.contract) {
                return Err(StateError::Allocation { domain, error });
            }
        }
        Ok(c)
    }
}

/// The capacity index (`Cluster::groups`).
impl Cluster {
    fn group(&self, cap: u32) -> Result<usize, usize> {
        self.groups.binary_search_by_key(&cap, |g| g.cap)
    }

    /// Adds a node to its group, if it is up.
    fn index_insert(&mut self, h: Hot) {
        if !h.is_up() {
            return;
        }
        let g = self.group(h.cpu_cap).unwrap_or_else(|at| {
            self.groups.insert(
                at,
                Group {
                    cap: h.cpu_cap,
                    nodes: Vec::new(),
                },
            );
            at
        });
        let nodes = &mut self.groups[g].nodes;
        let at = nodes.partition_point(|n| n.key() < h.key());
        nodes.insert(at, h);
    }

    /// Removes a node (as it is indexed now) from its group, if it is up.
    fn index_remove(&mut self, h: &Hot) {
        if !h.is_up() {
            return;
        }
        let Ok(g) = self.group(h.cpu_cap) else {
            debug_assert!(false, "up node {} not indexed", h.id);
            return;
        };
        let nodes = &mut self.groups[g].nodes;
        if let Ok(at) = nodes.binary_search_by_key(&h.key(), Hot::key) {
            nodes.remove(at);
        }
        if nodes.is_empty() {
            self.groups.remove(g);
        }
    }

    /// Moves a node whose free CPU or memory changed (same capacity, same up
    /// state) to its new place in its group: one rotation of the entries
    /// between the old and the new place.
    fn index_update(&mut self, old: &Hot, new: Hot) {
        if !new.is_up() {
            return;
        }
        let Ok(g) = self.group(new.cpu_cap) else {
            debug_assert!(false, "up node {} not indexed", new.id);
            return;
        };
        let nodes = &mut self.groups[g].nodes;
        let Ok(a) = nodes.binary_search_by_key(&old.key(), Hot::key) else {
            debug_assert!(false, "node {} not at its key", new.id);
            return;
        };
        let key = new.key();
        nodes[a] = new;
        if key < old.key() {
            let b = nodes[..a].partition_point(|n| n.key() < key);
            nodes[b..=a].rotate_right(1);
        } else {
            let k = nodes[a + 1..].partition_point(|n| n.key() < key);
            nodes[a..=a + k].rotate_left(1);
        }
    }
}

fn lane_free(lanes: &[u64]) -> u32 {
    (LANE_CAPACITY_PPM - lanes.iter().copied().min().unwrap_or(LANE_CAPACITY_PPM)) as u32
}

impl From<Cluster> for ClusterState {
    fn from(c: Cluster) -> Self {
        ClusterState {
            nodes: c.nodes.into_iter().map(|n| n.spec).collect(),
            allocations: c.domains,
        }
    }
}

impl TryFrom<ClusterState> for Cluster {
    type Error = StateError;
    fn try_from(s: ClusterState) -> Result<Self, Self::Error> {
        Cluster::from_state(s)
    }
}
