//! Small plain-data types shared by the domain, the nucleus and the driver.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

/// A domain's id, unique within one [`Nucleus`](crate::Nucleus) (not across
/// nodes: the cluster names domains, the nucleus numbers them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DomainId(pub u32);

impl fmt::Display for DomainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "d{}", self.0)
    }
}

/// An opaque token naming "whoever sent this request". The driver mints it
/// when it delivers a message (it may index a driver table, or encode node +
/// domain); a domain answers with `reply_to`, and the answer leaves the
/// nucleus carrying the same token so the driver can route it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplyToken(pub u64);

/// A message queued for a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The channel name it arrived on (e.g. `/svc/counter`); `recv` on a
    /// handle opened for this name takes it.
    pub channel: String,
    /// At most [`MAX_MESSAGE`](metta_proto::abi::MAX_MESSAGE) bytes.
    pub payload: Vec<u8>,
    /// Set when the sender can be answered (`reply_to`).
    pub reply: Option<ReplyToken>,
}

/// A message a domain sent, waiting for the driver to route it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outgoing {
    /// The sending domain.
    pub from: DomainId,
    /// The channel name the handle was opened for.
    pub channel: String,
    /// The bytes sent.
    pub payload: Vec<u8>,
    /// `Some(t)`: this is an answer to the request that carried `t`; route it
    /// to `t`, not by name. `None`: route by `channel`; the driver mints a
    /// token for the receiver if it wants answers to come back.
    pub reply: Option<ReplyToken>,
}

/// Who wrote a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogOrigin {
    /// The domain, through the `log` host function.
    Domain,
    /// The nucleus, about the domain (denials, faults, traps).
    Nucleus,
}

/// One log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// The domain it concerns.
    pub domain: DomainId,
    /// The `now` of the activation that produced it.
    pub at_ns: u64,
    /// Domain output or nucleus record.
    pub origin: LogOrigin,
    /// The text (invalid UTF-8 replaced, long lines truncated).
    pub text: String,
}

/// The capabilities a domain was granted.
///
/// Channel capabilities are name prefixes on segment boundaries: `/svc`
/// allows `/svc` and `/svc/counter` but not `/svcx`; `/` allows every name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caps {
    /// May call `log`.
    pub log: bool,
    /// May call `now`.
    pub clock: bool,
    /// Channel-name prefixes the domain may `open`.
    pub channels: Vec<String>,
}

impl Caps {
    /// No capabilities at all.
    pub fn none() -> Caps {
        Caps::default()
    }

    /// `log` and `clock`, plus the given channel prefixes.
    pub fn with_channels<I, S>(prefixes: I) -> Caps
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Caps {
            log: true,
            clock: true,
            channels: prefixes.into_iter().map(Into::into).collect(),
        }
    }

    /// Whether `name` is covered by one of the channel prefixes.
    pub fn may_open(&self, name: &str) -> bool {
        self.channels.iter().any(|p| prefix_covers(p, name))
    }
}

/// `prefix` covers `name` on a path-segment boundary.
fn prefix_covers(prefix: &str, name: &str) -> bool {
    match name.strip_prefix(prefix) {
        None => false,
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
    }
}

/// Per-domain counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Calls of [`Domain::activate`](crate::Domain::activate) (a resumed
    /// activation counts again).
    pub activations: u64,
    /// Activations that ran out of fuel and will resume.
    pub preemptions: u64,
    /// CPU time charged by the nucleus, ns.
    pub cpu_ns: u64,
    /// Fuel consumed.
    pub fuel_used: u64,
    /// Capability denials (`ERR_DENIED` returned or a call refused).
    pub denials: u64,
    /// Out-of-bounds pointers (`ERR_FAULT`).
    pub faults: u64,
    /// Traps (at most one: a trap fails the domain).
    pub traps: u64,
    /// Messages sent.
    pub sent: u64,
    /// Messages received.
    pub received: u64,
    /// Log lines dropped because the log buffer was full.
    pub logs_dropped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_respect_segments() {
        let c = Caps::with_channels(["/svc", "/tmp/"]);
        assert!(c.may_open("/svc"));
        assert!(c.may_open("/svc/counter"));
        assert!(!c.may_open("/svcx"));
        assert!(c.may_open("/tmp/a"));
        assert!(!c.may_open("/x"));
        assert!(Caps::with_channels(["/"]).may_open("/anything/at/all"));
        assert!(!Caps::none().may_open("/svc"));
    }
}
