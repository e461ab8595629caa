//! # metta-sdk: write Metta domains
//!
//! A Metta **domain** is a `wasm32-unknown-unknown` module run by the nucleus.
//! It imports host functions from module `"metta"` (ABI v1, defined in
//! `metta-proto`'s `abi` module and mirrored in [`abi`]) and exports its
//! `memory` and `metta_activate(reason: i32) -> i32`. The nucleus *activates*
//! the domain when it starts or is restored ([`Reason::Start`]), when messages
//! are pending ([`Reason::Events`]), when its timer fires ([`Reason::Timer`]),
//! or because the last activation asked for more time ([`Reason::Continue`]).
//! Each activation drains channels, does a bounded amount of work and returns
//! [`Run::Idle`] (wait for the next event) or [`Run::More`] (call me again).
//!
//! This crate gives safe wrappers over every import ([`log`], [`now`],
//! [`set_timer`], [`Channel`] with `open`/`send`/`recv`/`peek`/`reply_to`),
//! [`Error`] for the ABI's negative codes, the [`entry!`] macro that emits the
//! activation export, [`StateCell`] and [`NamedChannel`] for state in
//! `static`s, a panic handler (log, then trap), and [`text`] helpers for small
//! text messages without a heap. It needs no allocator and has no
//! dependencies.
//!
//! ## Rules for domains
//!
//! - **All state lives in linear memory** (`static`s: atomics, [`StateCell`],
//!   [`NamedChannel`]) or in queued messages. Between activations
//!   that is all there is: snapshots and live migration copy memory, globals
//!   and queues, nothing else. The wasm stack is empty at every activation
//!   boundary.
//! - **`Start` is not "first boot" only**: it is also delivered after a
//!   restore or migration, with memory as it was. Do not reset state on
//!   `Start`; use it only for idempotent setup. Channel handles are nucleus
//!   state: [`NamedChannel`] re-opens a name whose handle went stale.
//! - **Treat the reason as a hint**: messages may be pending at any
//!   activation (e.g. `Start` after a restore with a non-empty queue), so drain
//!   the channels you serve every time.
//! - **Keep activations bounded**: do a slice of work and return
//!   [`Run::More`]; the nucleus meters fuel and preempts a domain that overruns
//!   its slice, and a domain can only be snapshotted or migrated between
//!   activations.
//! - Build with `panic = "abort"`; a panic logs `panic: <message> at
//!   <file>:<line>` (needs the `log` capability) and traps.
//!
//! Cargo features: `panic-handler` provides the `#[panic_handler]` (on
//! `wasm32` only); `panic-fmt` (default, implies `panic-handler`) also formats
//! messages with arguments, for about 1 KiB of `core::fmt`.
//!
//! ## A complete domain
//!
//! An echo service: answers every message on `/svc/echo` with the same bytes.
//!
//! ```no_run
//! #![no_std]
//! # extern crate std; // (for this doc test, which runs on the host)
//! use metta_sdk::{entry, log, Error, NamedChannel, Reason, Run};
//!
//! static ECHO: NamedChannel = NamedChannel::new("/svc/echo");
//!
//! entry!(activate);
//!
//! fn activate(reason: Reason) -> Run {
//!     if reason == Reason::Start {
//!         log("echo: up");
//!     }
//!     let mut buf = [0u8; 1024];
//!     // At most 64 messages per activation, then yield the CPU.
//!     for _ in 0..64 {
//!         match ECHO.recv(&mut buf) {
//!             Ok(Some(n)) => {
//!                 let _ = ECHO.reply(&buf[..n]);
//!             }
//!             Ok(None) => return Run::Idle,
//!             Err(Error::TooBig) => {
//!                 let _ = ECHO.skip();
//!                 let _ = ECHO.reply(b"err too big");
//!             }
//!             Err(_) => return Run::Idle,
//!         }
//!     }
//!     Run::More
//! }
//! # fn main() {}
//! ```
//!
//! Its `Cargo.toml` has `crate-type = ["cdylib"]` and a path dependency on
//! `metta-sdk`; build with
//! `cargo build --release --target wasm32-unknown-unknown` (see
//! `sdk/README.md` and `domains/` for the profile and four example domains).
//!
//! ## Host builds and tests
//!
//! Off `wasm32` there is no nucleus: the imports in [`sys`] are replaced by
//! stubs that panic (or, in this crate's own tests, by an in-memory fake), so
//! the crate builds and its pure parts are tested with a plain `cargo test`.
#![no_std]

pub mod abi;
mod cell;
mod channel;
mod error;
pub mod sys;
pub mod text;

pub use abi::MAX_MESSAGE;
pub use cell::StateCell;
pub use channel::{Channel, NamedChannel};
pub use error::Error;

/// Why the nucleus activated the domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// First activation after start **or restore** (memory may hold state).
    Start,
    /// Messages are pending on some channel.
    Events,
    /// The timer set with [`set_timer`] fired.
    Timer,
    /// The previous activation returned [`Run::More`].
    Continue,
    /// A reason this SDK version does not know; treat like `Events`.
    Other(i32),
}

impl Reason {
    /// The reason for an ABI value.
    pub const fn from_raw(raw: i32) -> Reason {
        match raw {
            abi::REASON_START => Reason::Start,
            abi::REASON_EVENTS => Reason::Events,
            abi::REASON_TIMER => Reason::Timer,
            abi::REASON_CONTINUE => Reason::Continue,
            other => Reason::Other(other),
        }
    }

    /// The ABI value.
    pub const fn raw(self) -> i32 {
        match self {
            Reason::Start => abi::REASON_START,
            Reason::Events => abi::REASON_EVENTS,
            Reason::Timer => abi::REASON_TIMER,
            Reason::Continue => abi::REASON_CONTINUE,
            Reason::Other(raw) => raw,
        }
    }
}

/// What the activation asks of the scheduler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[must_use]
pub enum Run {
    /// Nothing to do until a message arrives or the timer fires.
    Idle,
    /// Runnable: activate again (with [`Reason::Continue`]) when the
    /// scheduler allows.
    More,
}

impl Run {
    /// [`Run::More`] if `busy`, else [`Run::Idle`].
    pub const fn more_if(busy: bool) -> Run {
        if busy {
            Run::More
        } else {
            Run::Idle
        }
    }

    /// The ABI value.
    pub const fn raw(self) -> i32 {
        match self {
            Run::Idle => abi::RUN_IDLE,
            Run::More => abi::RUN_MORE,
        }
    }
}

/// Write one UTF-8 line to the node's log (needs the `log` capability;
/// without it the line is dropped).
pub fn log(line: &str) {
    // SAFETY: pointer and length come from one live `&str`.
    unsafe { sys::log(line.as_ptr(), line.len()) }
}

/// Nanoseconds on the node's monotonic clock (needs the `clock` capability).
///
/// A negative answer from the nucleus (an error code) is returned as 0; use
/// [`try_now`] to tell it apart. The clock is monotonic per node; across a
/// migration the nucleus is expected to keep it monotonic for the domain.
pub fn now() -> u64 {
    try_now().unwrap_or(0)
}

/// [`now`], with a negative answer from the nucleus as an [`Error`].
pub fn try_now() -> Result<u64, Error> {
    // SAFETY: no pointers involved.
    let t = unsafe { sys::now() };
    if t < 0 {
        let code = i32::try_from(t).unwrap_or(i32::MIN);
        Err(Error::from_code(code).unwrap_or(Error::Unknown(code)))
    } else {
        Ok(t as u64)
    }
}

/// Wake the domain (with [`Reason::Timer`]) once the clock of [`now`] reaches
/// `deadline_ns`. Replaces any earlier timer. Deadlines beyond `i64::MAX`
/// are clamped to it.
pub fn set_timer(deadline_ns: u64) {
    let d = i64::try_from(deadline_ns).unwrap_or(i64::MAX);
    // SAFETY: no pointers involved.
    unsafe { sys::timer(d) }
}

/// Cancel the timer, if any.
pub fn cancel_timer() {
    // SAFETY: no pointers involved.
    unsafe { sys::timer(-1) }
}

/// Declare the domain's activation entry.
///
/// Name a `fn(Reason) -> Run`:
///
/// ```no_run
/// use metta_sdk::{Reason, Run};
///
/// metta_sdk::entry!(activate);
///
/// fn activate(reason: Reason) -> Run {
///     Run::Idle
/// }
/// # fn main() {}
/// ```
///
/// or wrap its definition: `metta_sdk::entry!(fn activate(reason: Reason) -> Run { ... });`
/// (rustfmt indents the whole body one level in this form).
///
/// Emits `#[no_mangle] pub extern "C" fn metta_activate(reason: i32) -> i32`,
/// the export the nucleus calls. Use it exactly once per domain.
#[macro_export]
macro_rules! entry {
    ($(#[$attr:meta])* fn $name:ident ($reason:ident : $rty:ty) -> $ret:ty $body:block) => {
        $(#[$attr])*
        fn $name($reason: $rty) -> $ret $body
        $crate::entry!($name);
    };
    ($handler:path) => {
        /// The activation entry of ABI v1 (emitted by `metta_sdk::entry!`).
        #[unsafe(no_mangle)]
        pub extern "C" fn metta_activate(reason: i32) -> i32 {
            let handler: fn($crate::Reason) -> $crate::Run = $handler;
            handler($crate::Reason::from_raw(reason)).raw()
        }
    };
}

/// Format a log line with `core::fmt` into a 256-byte stack buffer (longer
/// lines are truncated) and [`log`] it.
///
/// `core::fmt` adds several KiB to a domain; for hot or size-critical paths
/// build lines with [`text::Buf`] instead.
#[macro_export]
macro_rules! logf {
    ($($arg:tt)*) => {{
        let mut line = $crate::text::Buf::<256>::new();
        let _ = ::core::fmt::Write::write_fmt(&mut line, ::core::format_args!($($arg)*));
        $crate::log(line.as_str());
    }};
}

#[cfg(all(target_arch = "wasm32", feature = "panic-handler"))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut line = text::Buf::<256>::new();
    line.push_str("panic: ");
    #[cfg(feature = "panic-fmt")]
    {
        let _ = core::fmt::Write::write_fmt(&mut line, format_args!("{}", info.message()));
    }
    #[cfg(not(feature = "panic-fmt"))]
    {
        line.push_str(info.message().as_str().unwrap_or("(formatted message)"));
    }
    if let Some(loc) = info.location() {
        line.push_str(" at ")
            .push_str(loc.file())
            .push_str(":")
            .push_u64(u64::from(loc.line()));
    }
    log(line.as_str());
    core::arch::wasm32::unreachable()
}

#[cfg(test)]
mod tests;
