//! The domain ABI v1 constants, mirrored from `metta-proto`'s `abi` module
//! (`proto/src/abi.rs`), which is the definition.
//!
//! They are copied rather than imported so that domains build with no
//! dependency but this crate; the host test `abi_matches_proto` parses
//! `proto/src/abi.rs` and fails if any value here drifts from it.

/// The import module every host function lives in.
pub const MODULE: &str = "metta";
/// The export the nucleus calls: `fn(reason: i32) -> i32`.
pub const ACTIVATE: &str = "metta_activate";
/// The exported linear memory.
pub const MEMORY: &str = "memory";

/// Activation reason: first activation after start or restore.
pub const REASON_START: i32 = 0;
/// Activation reason: messages are pending on some channel.
pub const REASON_EVENTS: i32 = 1;
/// Activation reason: the timer fired.
pub const REASON_TIMER: i32 = 2;
/// Activation reason: the previous activation returned [`RUN_MORE`].
pub const REASON_CONTINUE: i32 = 3;

/// Activation result: nothing more to do until an event or timer.
pub const RUN_IDLE: i32 = 0;
/// Activation result: more work to do; activate again.
pub const RUN_MORE: i32 = 1;

/// Import `log(ptr: i32, len: i32)`.
pub const LOG: &str = "log";
/// Import `now() -> i64`.
pub const NOW: &str = "now";
/// Import `timer(deadline_ns: i64)`.
pub const TIMER: &str = "timer";
/// Import `open(name_ptr: i32, name_len: i32) -> i32`.
pub const OPEN: &str = "open";
/// Import `send(chan: i32, ptr: i32, len: i32) -> i32`.
pub const SEND: &str = "send";
/// Import `recv(chan: i32, ptr: i32, cap: i32) -> i32`.
pub const RECV: &str = "recv";
/// Import `peek(chan: i32) -> i32`.
pub const PEEK: &str = "peek";
/// Import `reply_to(chan: i32) -> i32`.
pub const REPLY: &str = "reply_to";

/// The caller lacks the capability for this call.
pub const ERR_DENIED: i32 = -1;
/// Not a valid channel handle.
pub const ERR_BADCHAN: i32 = -2;
/// No message queued.
pub const ERR_EMPTY: i32 = -3;
/// The message does not fit (buffer too small, or beyond [`MAX_MESSAGE`]).
pub const ERR_TOO_BIG: i32 = -4;
/// A pointer or length outside the domain's memory.
pub const ERR_FAULT: i32 = -5;
/// The destination's queue is full; retry later.
pub const ERR_FULL: i32 = -6;
/// The name does not resolve to a channel.
pub const ERR_NOENT: i32 = -7;

/// Largest message, in bytes.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Messages a domain's inbox holds before senders get [`ERR_FULL`].
pub const INBOX_DEPTH: usize = 1024;

/// Every import name of ABI v1.
pub const IMPORTS: [&str; 8] = [LOG, NOW, TIMER, OPEN, SEND, RECV, PEEK, REPLY];
