//! The domain ABI: what a domain's wasm module imports from the nucleus and
//! what it must export. Version 1.
//!
//! A domain is a wasm module (`wasm32-unknown-unknown`) that exports its linear
//! `memory` and an activation entry [`ACTIVATE`]. The nucleus calls the entry
//! when events are pending or a timer fired; the domain drains its channels,
//! does its work, and returns [`RUN_IDLE`] (wait for the next event) or
//! [`RUN_MORE`] (runnable: call again when the scheduler allows). Between
//! activations the domain's whole state is its memory, globals and queued
//! events — which is what snapshots capture.
//!
//! All imports live in module [`MODULE`]. Pointers and lengths are `i32`
//! offsets into the domain's own memory; the nucleus bounds-checks every one
//! (an out-of-range pointer is an [`ERR_FAULT`], not a trap of the node).
//! Negative results are errors:

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
/// Activation reason: the timer set with [`TIMER`] fired.
pub const REASON_TIMER: i32 = 2;
/// Activation reason: the previous activation returned [`RUN_MORE`].
pub const REASON_CONTINUE: i32 = 3;

/// Activation result: nothing more to do until an event or timer.
pub const RUN_IDLE: i32 = 0;
/// Activation result: more work to do; activate again.
pub const RUN_MORE: i32 = 1;

/// `log(ptr: i32, len: i32)`: a UTF-8 log line (capability `log`).
pub const LOG: &str = "log";
/// `now() -> i64`: nanoseconds on the node's monotonic clock (capability
/// `clock`): the time the current activation was scheduled; it does not
/// advance within one activation (the nucleus itself reads no clock).
pub const NOW: &str = "now";
/// `timer(deadline_ns: i64)`: wake at `deadline_ns` (same clock as `now`);
/// replaces an earlier timer; a negative deadline cancels. Needs no
/// capability.
pub const TIMER: &str = "timer";
/// `open(name_ptr: i32, name_len: i32) -> i32`: a channel handle for a name in
/// the domain's namespace, e.g. `/svc/counter` (capability `channel:<name>`
/// or a prefix of it, on `/` boundaries). Handles are small non-negative
/// integers; opening the same name again returns the same handle. Errors:
/// [`ERR_DENIED`], [`ERR_FAULT`], [`ERR_NOENT`] (not UTF-8, not starting with
/// `/`, or longer than 256 bytes), [`ERR_FULL`] (the domain's channel table is
/// full).
pub const OPEN: &str = "open";
/// `send(chan: i32, ptr: i32, len: i32) -> i32`: queue a message; 0 or error
/// ([`ERR_FULL`] when the sender's own outgoing queue is full: retry in a
/// later activation).
pub const SEND: &str = "send";
/// `recv(chan: i32, ptr: i32, cap: i32) -> i32`: take the next message into
/// the buffer; its length, [`ERR_EMPTY`], or [`ERR_TOO_BIG`] (the message stays
/// queued; [`PEEK`] tells its size).
pub const RECV: &str = "recv";
/// `peek(chan: i32) -> i32`: length of the next message, or [`ERR_EMPTY`].
pub const PEEK: &str = "peek";
/// `reply_to(chan: i32) -> i32`: a handle on which to answer the sender of the
/// last message received on `chan` (request/response over one channel name).
/// A reply handle is send-only and answers once: it closes after one
/// successful `send`. [`ERR_NOENT`] if that message cannot be answered.
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

/// Every import name of ABI v1, for validating modules at load time.
pub const IMPORTS: [&str; 8] = [LOG, NOW, TIMER, OPEN, SEND, RECV, PEEK, REPLY];
