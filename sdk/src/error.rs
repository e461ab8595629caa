//! [`Error`]: the ABI's negative result codes as a Rust enum.

use crate::abi;
use core::fmt;

/// A failed host call: one variant per negative code of ABI v1.
///
/// `recv`/`peek` on an empty channel are not errors in this API (they return
/// `Ok(None)`); [`Error::Empty`] exists so every ABI code maps to a variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Error {
    /// `ERR_DENIED` (-1): the domain lacks the capability for this call
    /// (e.g. `channel:<name>` for `open`).
    Denied,
    /// `ERR_BADCHAN` (-2): not a valid channel handle (never opened, or no
    /// longer valid, e.g. after a restore on a nucleus that does not keep
    /// handles; [`NamedChannel`](crate::NamedChannel) re-opens on this).
    BadChannel,
    /// `ERR_EMPTY` (-3): no message queued.
    Empty,
    /// `ERR_TOO_BIG` (-4): the message does not fit the buffer (it stays
    /// queued: receive it with a bigger buffer or drop it with
    /// [`Channel::skip`](crate::Channel::skip)), or a send beyond
    /// [`MAX_MESSAGE`](crate::abi::MAX_MESSAGE).
    TooBig,
    /// `ERR_FAULT` (-5): a pointer or length outside the domain's memory.
    /// Cannot happen through this crate's safe API.
    Fault,
    /// `ERR_FULL` (-6): the destination's queue (on the current nucleus: the
    /// domain's own outbox) is full — nothing was queued; retry in a later
    /// activation. From `open`/`reply_to`: the handle table is full.
    Full,
    /// `ERR_NOENT` (-7): the name does not resolve to a channel (or, for
    /// `reply_to`, there is nobody to answer).
    NoEntry,
    /// A negative code this version of the SDK does not know.
    Unknown(i32),
}

impl Error {
    /// The error for a host-call result, or `None` if `code` is not negative
    /// (i.e. a success value).
    pub const fn from_code(code: i32) -> Option<Error> {
        Some(match code {
            0.. => return None,
            abi::ERR_DENIED => Error::Denied,
            abi::ERR_BADCHAN => Error::BadChannel,
            abi::ERR_EMPTY => Error::Empty,
            abi::ERR_TOO_BIG => Error::TooBig,
            abi::ERR_FAULT => Error::Fault,
            abi::ERR_FULL => Error::Full,
            abi::ERR_NOENT => Error::NoEntry,
            other => Error::Unknown(other),
        })
    }

    /// The ABI code of this error (always negative).
    pub const fn code(self) -> i32 {
        match self {
            Error::Denied => abi::ERR_DENIED,
            Error::BadChannel => abi::ERR_BADCHAN,
            Error::Empty => abi::ERR_EMPTY,
            Error::TooBig => abi::ERR_TOO_BIG,
            Error::Fault => abi::ERR_FAULT,
            Error::Full => abi::ERR_FULL,
            Error::NoEntry => abi::ERR_NOENT,
            Error::Unknown(code) => code,
        }
    }

    /// A short lowercase name, e.g. `"denied"`, `"too big"` (suitable for
    /// `err <name>` answers and logs).
    pub const fn as_str(self) -> &'static str {
        match self {
            Error::Denied => "denied",
            Error::BadChannel => "bad channel",
            Error::Empty => "empty",
            Error::TooBig => "too big",
            Error::Fault => "fault",
            Error::Full => "full",
            Error::NoEntry => "no such channel",
            Error::Unknown(_) => "unknown error",
        }
    }

    /// Split a host-call result into its non-negative value or its error.
    pub const fn check(ret: i32) -> Result<u32, Error> {
        match Error::from_code(ret) {
            None => Ok(ret as u32),
            Some(e) => Err(e),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unknown(code) => write!(f, "unknown error {code}"),
            e => f.write_str(e.as_str()),
        }
    }
}

impl core::error::Error for Error {}
