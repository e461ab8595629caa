//! The openraft type configuration of the registry.

use std::io::Cursor;

use crate::registry::{Applied, Command};

openraft::declare_raft_types!(
    /// Metta's Raft: registry commands in, [`Applied`] results out, u64 node ids.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<u64>;
/// A stored membership.
pub type StoredMembership = openraft::StoredMembership<u64, openraft::BasicNode>;
