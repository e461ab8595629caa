//! The Metta control plane.
//!
//! A trust group of hosted nodes (`mettad`) keeps a Raft-replicated registry —
//! members, join tokens, users, grants, revocations and a key space — and
//! serves an mTLS API over QUIC that `mettactl` drives (and over TLS 1.3 on
//! TCP, for native nodes that cannot speak QUIC).
//!
//! Layers, from pure to I/O:
//! - [`registry`]: the state machine (pure, deterministic; time comes in the
//!   commands);
//! - [`authz`]: the authorization matrix, who may send which request (pure);
//! - [`policy`]: which right on which resource each call needs (pure);
//! - [`limits`]: connection budgets and attempt rate limits (pure);
//! - [`store`]: the redb-backed Raft log and snapshot store;
//! - [`transport`] / [`network`]: QUIC + rustls wiring, openraft's network;
//! - [`tcp`]: TLS 1.3 over TCP for native nodes (same TLS config and frames,
//!   one request at a time per connection);
//! - [`node`]: the running daemon; [`setup`]: `init` and `join`;
//!   [`client`]: what `mettactl` uses; [`config`]: files on disk;
//!   [`clock`]: the one place the wall clock is read.
pub mod authz;
pub mod client;
pub mod clock;
pub mod config;
pub mod domains;
pub mod hosted;
pub mod limits;
pub mod native;
pub mod network;
pub mod node;
pub mod policy;
pub mod raft_types;
pub mod registry;
pub mod setup;
pub mod store;
pub mod tcp;
pub mod transport;
