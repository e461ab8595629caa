//! Snapshot data: a domain's whole state at an activation boundary, as plain
//! serde data (postcard-encodable for migration).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use metta_proto::{Contract, ContractError};
use serde::{Deserialize, Serialize};

use crate::image::LoadError;
use crate::merkle::Hash;
use crate::types::{Caps, Message, ReplyToken};

/// The value of one mutable global. Floats are kept as bits so NaN payloads
/// survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GlobalValue {
    /// `i32`.
    I32(i32),
    /// `i64`.
    I64(i64),
    /// `f32` bits.
    F32(u32),
    /// `f64` bits.
    F64(u64),
}

/// One entry of the channel table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelSnapshot {
    /// The handle the domain holds.
    pub handle: u32,
    /// The channel name.
    pub name: String,
    /// For a reply handle: the token it answers.
    pub reply: Option<ReplyToken>,
    /// Token of the last message received on this handle (for `reply_to`).
    pub last_reply: Option<ReplyToken>,
}

/// A domain's state between activations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// blake3 of the image (original bytes).
    pub image_hash: Hash,
    /// The QoS contract.
    pub contract: Contract,
    /// Granted capabilities.
    pub caps: Caps,
    /// Linear memory, whole pages.
    pub memory: Vec<u8>,
    /// Every mutable global, by index in the module's global space.
    pub globals: Vec<(u32, GlobalValue)>,
    /// Queued messages, oldest first.
    pub inbox: Vec<Message>,
    /// The channel table.
    pub channels: Vec<ChannelSnapshot>,
    /// Pending timer deadline, ns.
    pub timer: Option<u64>,
    /// [`memory_root`](crate::memory_root) of `memory`; checked on restore.
    pub memory_root: Hash,
}

/// Why a snapshot cannot be taken now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotError {
    /// An activation ran out of fuel and is waiting to resume: its wasm stack
    /// is not part of a snapshot. Step the domain until it returns.
    MidActivation,
    /// The outbox holds messages the driver has not taken yet; taking them
    /// first keeps messages from being lost or duplicated across a move.
    OutboxNotDrained,
    /// The domain trapped.
    Failed(String),
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotError::MidActivation => f.write_str(
                "the domain is inside an activation (preempted); snapshot at a boundary",
            ),
            SnapshotError::OutboxNotDrained => f.write_str("take the domain's outbox first"),
            SnapshotError::Failed(r) => write!(f, "the domain failed: {r}"),
        }
    }
}

impl core::error::Error for SnapshotError {}

/// Why a snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreError {
    /// The snapshot belongs to another image.
    ImageMismatch,
    /// The memory does not hash to `memory_root`.
    MemoryRoot,
    /// Memory length is not a whole number of pages, is smaller than the
    /// module's initial memory, or exceeds the contract.
    MemorySize {
        /// Snapshot memory, bytes.
        len: u64,
        /// Why.
        why: &'static str,
    },
    /// Globals do not match the image's mutable globals.
    Globals(String),
    /// The inbox or channel table is malformed.
    Queues(String),
    /// The contract is invalid.
    Contract(ContractError),
    /// The image does not fit the contract.
    Image(LoadError),
    /// wasmi refused the instantiation.
    Instantiate(String),
}

impl fmt::Display for RestoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestoreError::ImageMismatch => f.write_str("snapshot is of a different image"),
            RestoreError::MemoryRoot => {
                f.write_str("snapshot memory does not match its Merkle root (corrupt or tampered)")
            }
            RestoreError::MemorySize { len, why } => {
                write!(f, "snapshot memory of {len} bytes {why}")
            }
            RestoreError::Globals(m) => write!(f, "snapshot globals: {m}"),
            RestoreError::Queues(m) => write!(f, "snapshot queues: {m}"),
            RestoreError::Contract(e) => write!(f, "snapshot contract: {e}"),
            RestoreError::Image(e) => write!(f, "{e}"),
            RestoreError::Instantiate(m) => write!(f, "instantiation failed: {m}"),
        }
    }
}

impl core::error::Error for RestoreError {}
