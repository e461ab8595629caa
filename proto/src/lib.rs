//! The Metta wire protocol.
//!
//! One set of `serde` message types shared by every participant — hosted `mettad`
//! nodes, the `mettactl` client and (later) the native kernel — carried as
//! length-prefixed [`postcard`] frames. Between hosted nodes and clients the frames
//! travel over QUIC streams negotiated with ALPN [`ALPN`] (`metta/1`); native nodes
//! carry the very same frames over TLS 1.3 on TCP, one request at a time per
//! connection ([`exchange`]).
//!
//! This crate is `no_std` + `alloc` so the bare-metal kernel can use it unchanged.
//! It does no I/O: [`frame`] turns messages into bytes and bytes back into messages,
//! with a hard size limit, and everything else is plain data.
//!
//! Module map:
//! - [`frame`]: the length-prefixed framing and the incremental decoder (fuzzed);
//! - [`exchange`]: the one-request-at-a-time rule of a TLS/TCP connection (sans-IO);
//! - [`ids`]: node ids, subjects (who a certificate names), roles;
//! - [`grant`]: capabilities: rights, resources, signed grants;
//! - [`msg`]: requests and responses;
//! - [`qos`]: QoS contracts (period, slice, extra, memory);
//! - [`abi`]: the domain ABI (what a wasm domain imports and exports);
//! - [`image`]: domain image manifests and domain capabilities.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod abi;
pub mod exchange;
pub mod frame;
pub mod grant;
pub mod ids;
pub mod image;
pub mod msg;
pub mod qos;

pub use exchange::{ClientExchange, ExchangeError, ServerExchange};
pub use frame::{FrameDecoder, FrameError, MAX_FRAME_LEN};
pub use grant::{Grant, GrantId, Right, Rights, SignedGrant};
pub use ids::{NodeId, NodeKind, Role, Subject, SubjectParseError};
pub use image::{CapSet, Capability, CapabilityParseError, Manifest, SignedManifest};
pub use msg::*;
pub use qos::{Contract, ContractError};

/// The ALPN protocol id every Metta connection negotiates.
pub const ALPN: &[u8] = b"metta/1";

/// The protocol version: bumped on any
/// incompatible change of the message types.
pub const PROTOCOL_VERSION: u16 = 1;
