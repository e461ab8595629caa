//! The Metta nucleus: wasm domains, activations, EDF scheduling and
//! snapshots, in `no_std` + `alloc`.
//!
//! One nucleus runs inside the hosted daemon (`mettad`, Linux) and, later,
//! the bare-metal kernel; a domain therefore behaves the same on both, and can
//! move between them. The nucleus does no I/O and **never reads a clock**:
//! every call that needs the time takes `now: u64` (nanoseconds, monotonic),
//! and CPU time is accounted by fuel (see [`Nucleus`]). Tests drive it with a
//! fake clock.
//!
//! # Pieces
//!
//! - [`Image`] (`image`): a validated domain module. [`Image::load`] checks
//!   the ABI v1 contract of `metta_proto::abi` — only `"metta"` imports from
//!   [`abi::IMPORTS`](metta_proto::abi::IMPORTS) with their exact signatures,
//!   exports `metta_activate: (i32) -> i32` and `memory` — and rewrites the
//!   module so every mutable global is exported under a reserved name (so
//!   snapshots can capture private globals such as Rust's
//!   `__stack_pointer`). Content address: blake3 of the original bytes.
//! - [`Domain`] (`domain`, `host`): an instantiated image with its QoS
//!   [`Contract`](metta_proto::Contract), capabilities ([`Caps`]), a bounded
//!   inbox, a channel table, a timer, an outbox and a log buffer (both drained
//!   by the driver: routing, local or remote, is the driver's job), and
//!   [`Stats`]. Host functions bounds-check every pointer (`ERR_FAULT`) and
//!   check capabilities (`ERR_DENIED`, counted and logged).
//! - Activations: [`Domain::activate`] calls `metta_activate(reason)` with a
//!   fuel budget. A domain that runs out of fuel is *preempted* and its call
//!   **resumed** at the next activation (wasmi resumable calls); a trap fails
//!   only that domain.
//! - [`Scheduler`] (`sched`): a pure EDF activation scheduler with admission
//!   control, per-period budgets, spare time for `extra` domains, and the CBS
//!   wake-up rule that keeps guarantees when domains sleep and wake.
//! - [`Nucleus`]: ties the scheduler, the domains and the fuel rate together
//!   behind `spawn` / `deliver` / `step(now)` / `stop`.
//! - [`accounting`] and [`routing`]: what both drivers (hosted `mettad` and
//!   the bare-metal kernel) keep around the nucleus, shared so they agree:
//!   per-period records of each domain's activations and the `mettactl ps`
//!   figures computed from them; which local domain serves a channel name,
//!   and the table of outstanding reply tokens.
//! - [`Snapshot`] (`snapshot`, `merkle`): a domain's state between
//!   activations — memory, every mutable global, queues, channels, timer —
//!   with a blake3 Merkle root over 64 KiB chunks that [`Domain::restore`]
//!   verifies.
//!
//! # Driving it
//!
//! ```ignore
//! let mut n = Nucleus::new(900_000, FuelRate::new(1, 2)); // 90 % of a CPU
//! let id = n.spawn("counter", &Image::load(&wasm)?, contract, caps, clock())?;
//! loop {
//!     match n.step(clock()) {
//!         Step::Ran { .. } => {}
//!         Step::Idle { until } => wait_for_network_or(until),
//!     }
//!     for out in n.take_outbox() { route(out) }      // -> n.deliver(..)
//!     for line in n.take_logs() { print(line) }
//! }
//! ```
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod accounting;
mod domain;
mod host;
mod image;
mod merkle;
mod nucleus;
pub mod routing;
mod sched;
mod snapshot;
mod types;

pub use domain::{Activation, Domain, Outcome, Runtime, SpawnError, Undeliverable};
pub use host::{MAX_CHANNELS, MAX_LOG_LINE, MAX_LOG_LINES, MAX_NAME, MAX_OUTBOX, MAX_OUTBOX_BYTES};
pub use image::{global_export_name, GlobalKind, Image, LoadError, GLOBAL_EXPORT_PREFIX, PAGE};
pub use merkle::{chunk_hash, chunk_hashes, memory_root, root_of, Hash, CHUNK};
pub use nucleus::{FuelRate, Nucleus, Step};
pub use sched::{share_ppm_ceil, AdmitError, Decision, Entry, Scheduler, Why, DEFAULT_QUANTUM_NS};
pub use snapshot::{ChannelSnapshot, GlobalValue, RestoreError, Snapshot, SnapshotError};
pub use types::{Caps, DomainId, LogLine, LogOrigin, Message, Outgoing, ReplyToken, Stats};
