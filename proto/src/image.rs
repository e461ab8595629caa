//! Domain images: the manifest a vendor signs, and domain capabilities.
//!
//! A domain image is a wasm module plus a [`SignedManifest`]: the vendor's
//! statement of what the module is ([`Manifest::module_hash`], the blake3 hash
//! of the wasm bytes) and which [`Capability`]s the code may use. The checks
//! (signature, trusted vendors, hash) live in `metta-trust`; here are the plain
//! data types, their text forms and [`Manifest::validate`].
//!
//! Capabilities are what the domain ABI ([`crate::abi`]) asks for:
//! - `log`: may call [`abi::LOG`](crate::abi::LOG);
//! - `clock`: may call [`abi::NOW`](crate::abi::NOW);
//! - `channel:<prefix>`: may [`abi::OPEN`](crate::abi::OPEN) channel names
//!   under `<prefix>` (on `/` boundaries: `/svc` covers `/svc` and
//!   `/svc/counter`, not `/svcx`; `/` covers every name).
//!
//! Channel prefixes are kept in one canonical form so that comparing them is
//! plain string work: they start with `/`, have no empty, `.` or `..`
//! segments, no trailing `/` (except the root `/` itself), only printable
//! ASCII without spaces, and at most [`MAX_CHANNEL_PREFIX`] bytes.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::grant::resource_covers;
use crate::ids::check_name;

/// The longest channel prefix, in bytes (the longest name `open` accepts).
pub const MAX_CHANNEL_PREFIX: usize = 256;
/// The longest version string, in bytes.
pub const MAX_VERSION_LEN: usize = 64;
/// The most capabilities one manifest may declare.
pub const MAX_CAPABILITIES: usize = 64;

/// A malformed capability, capability set or manifest, with a message a user
/// can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilityParseError(pub String);

impl fmt::Display for CapabilityParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl core::error::Error for CapabilityParseError {}

fn err(msg: String) -> CapabilityParseError {
    CapabilityParseError(msg)
}

/// Checks that `prefix` is a channel prefix in canonical form (see the module
/// docs).
pub fn check_channel_prefix(prefix: &str) -> Result<(), CapabilityParseError> {
    let bad = |why: &str| {
        Err(err(alloc::format!(
            "invalid channel prefix {prefix:?}: {why}"
        )))
    };
    if !prefix.starts_with('/') {
        return bad("it must start with '/'");
    }
    if prefix.len() > MAX_CHANNEL_PREFIX {
        return bad("it is longer than 256 bytes");
    }
    if !prefix.bytes().all(|b| b.is_ascii_graphic()) {
        return bad("use printable ASCII without spaces");
    }
    if prefix == "/" {
        return Ok(());
    }
    if prefix.ends_with('/') {
        return bad("drop the trailing '/'");
    }
    for seg in prefix[1..].split('/') {
        match seg {
            "" => return bad("it has an empty segment ('//')"),
            "." | ".." => return bad("'.' and '..' segments are not allowed"),
            _ => {}
        }
    }
    Ok(())
}

/// One thing a domain's code may do.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Capability {
    /// Write log lines (`log`).
    Log,
    /// Read the node's monotonic clock (`now`).
    Clock,
    /// Open channels whose names lie under this prefix (see the module docs).
    Channel(String),
}

impl Capability {
    /// Checks a capability built in code or decoded from the wire (a
    /// [`Capability::Channel`] prefix must be canonical).
    pub fn validate(&self) -> Result<(), CapabilityParseError> {
        match self {
            Capability::Log | Capability::Clock => Ok(()),
            Capability::Channel(p) => check_channel_prefix(p),
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Capability::Log => f.write_str("log"),
            Capability::Clock => f.write_str("clock"),
            Capability::Channel(p) => write!(f, "channel:{p}"),
        }
    }
}

impl FromStr for Capability {
    type Err = CapabilityParseError;
    /// Parses `log`, `clock` or `channel:/svc/counter`, strictly: no spaces,
    /// lower case, canonical prefixes.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "log" => Ok(Capability::Log),
            "clock" => Ok(Capability::Clock),
            _ => match s.strip_prefix("channel:") {
                Some(p) => {
                    check_channel_prefix(p)?;
                    Ok(Capability::Channel(p.to_string()))
                }
                None => Err(err(alloc::format!(
                    "unknown capability {s:?}: capabilities are log, clock and channel:/<prefix>"
                ))),
            },
        }
    }
}

/// A set of capabilities, as held by a user or granted to a running domain.
///
/// [`CapSet::insert`] keeps `channels` minimal and sorted: no prefix in it is
/// covered by another. The set is what the nucleus enforces: `log`, `clock`,
/// and the channel prefixes `open` accepts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct CapSet {
    /// May call `log`.
    pub log: bool,
    /// May call `now`.
    pub clock: bool,
    /// Channel-name prefixes the domain may `open`.
    pub channels: Vec<String>,
}

impl CapSet {
    /// Nothing at all.
    pub fn none() -> CapSet {
        CapSet::default()
    }

    /// Everything: `log`, `clock`, `channel:/`.
    pub fn all() -> CapSet {
        CapSet {
            log: true,
            clock: true,
            channels: alloc::vec!["/".to_string()],
        }
    }

    /// Whether the set allows nothing.
    pub fn is_empty(&self) -> bool {
        !self.log && !self.clock && self.channels.is_empty()
    }

    /// Whether the channel `name` may be opened (some prefix covers it).
    pub fn may_open(&self, name: &str) -> bool {
        self.channels.iter().any(|p| resource_covers(p, name))
    }

    /// Whether the set allows `cap` (for a channel: the whole prefix).
    pub fn allows(&self, cap: &Capability) -> bool {
        match cap {
            Capability::Log => self.log,
            Capability::Clock => self.clock,
            Capability::Channel(p) => self.may_open(p),
        }
    }

    /// Adds `cap`, keeping the channel list minimal. An invalid channel prefix
    /// is refused.
    pub fn insert(&mut self, cap: Capability) -> Result<(), CapabilityParseError> {
        cap.validate()?;
        match cap {
            Capability::Log => self.log = true,
            Capability::Clock => self.clock = true,
            Capability::Channel(p) => {
                if self.may_open(&p) {
                    return Ok(());
                }
                self.channels.retain(|c| !resource_covers(&p, c));
                let at = self.channels.partition_point(|c| c.as_str() < p.as_str());
                self.channels.insert(at, p);
            }
        }
        Ok(())
    }

    /// The set as a list of capabilities (`log`, `clock`, then channels).
    pub fn capabilities(&self) -> Vec<Capability> {
        let mut out = Vec::new();
        if self.log {
            out.push(Capability::Log);
        }
        if self.clock {
            out.push(Capability::Clock);
        }
        out.extend(self.channels.iter().cloned().map(Capability::Channel));
        out
    }
}

impl fmt::Display for CapSet {
    /// `log,clock,channel:/svc`, or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let caps = self.capabilities();
        if caps.is_empty() {
            return f.write_str("none");
        }
        for (i, c) in caps.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

impl FromStr for CapSet {
    type Err = CapabilityParseError;
    /// Parses a comma-separated list of capabilities, or `none`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = CapSet::none();
        if s == "none" {
            return Ok(out);
        }
        for part in s.split(',') {
            out.insert(part.parse()?)?;
        }
        Ok(out)
    }
}

/// What a vendor states about a module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The image's name (1-63 characters of a-z, 0-9 and '-').
    pub name: String,
    /// Its version: `MAJOR.MINOR.PATCH`, optionally `-<pre-release>`.
    pub version: String,
    /// The vendor's name (same rules as `name`); the key that signs must be
    /// the one trusted under this name.
    pub vendor: String,
    /// blake3 of the wasm module's bytes.
    pub module_hash: [u8; 32],
    /// Everything the code may use; no duplicates.
    pub capabilities: Vec<Capability>,
}

/// Checks a version string: `MAJOR.MINOR.PATCH` (decimal, no leading zeros),
/// optionally followed by `-` and a pre-release of `a-z`, `0-9`, `.` and `-`.
pub fn check_version(v: &str) -> Result<(), CapabilityParseError> {
    let bad = || {
        Err(err(alloc::format!(
            "invalid version {v:?}: use MAJOR.MINOR.PATCH (e.g. 1.2.0 or 1.2.0-rc.1)"
        )))
    };
    if v.is_empty() || v.len() > MAX_VERSION_LEN {
        return bad();
    }
    let (core, pre) = match v.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (v, None),
    };
    let nums: Vec<&str> = core.split('.').collect();
    let num_ok = |n: &&str| {
        !n.is_empty()
            && n.len() <= 9
            && n.bytes().all(|b| b.is_ascii_digit())
            && (*n == "0" || !n.starts_with('0'))
    };
    if nums.len() != 3 || !nums.iter().all(num_ok) {
        return bad();
    }
    if let Some(p) = pre {
        let ok = !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !ok {
            return bad();
        }
    }
    Ok(())
}

impl Manifest {
    /// Checks the manifest's fields: names, version, and capabilities (each
    /// valid, none repeated, at most [`MAX_CAPABILITIES`]).
    pub fn validate(&self) -> Result<(), CapabilityParseError> {
        check_name("image", &self.name).map_err(|e| err(e.0))?;
        check_version(&self.version)?;
        check_name("vendor", &self.vendor).map_err(|e| err(e.0))?;
        if self.capabilities.len() > MAX_CAPABILITIES {
            return Err(err(alloc::format!(
                "too many capabilities ({}); at most {MAX_CAPABILITIES}",
                self.capabilities.len()
            )));
        }
        for (i, c) in self.capabilities.iter().enumerate() {
            c.validate()?;
            if self.capabilities[..i].contains(c) {
                return Err(err(alloc::format!("capability {c} is declared twice")));
            }
        }
        Ok(())
    }
}

/// A manifest with its vendor's signature.
///
/// `signature` is the vendor's ECDSA P-256 signature (DER) over a context
/// prefix and the postcard encoding of `manifest` (see `metta-trust`);
/// `vendor_spki` is the vendor's public key (SubjectPublicKeyInfo DER), which
/// must match the key trusted for `manifest.vendor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    /// What is signed.
    pub manifest: Manifest,
    /// The signer's public key.
    pub vendor_spki: Vec<u8>,
    /// The signature; empty when unsigned.
    pub signature: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(s: &str) -> Capability {
        s.parse().unwrap()
    }

    #[test]
    fn capabilities_parse_and_display() {
        assert_eq!(cap("log"), Capability::Log);
        assert_eq!(cap("clock"), Capability::Clock);
        assert_eq!(
            cap("channel:/svc/counter"),
            Capability::Channel("/svc/counter".into())
        );
        assert_eq!(cap("channel:/"), Capability::Channel("/".into()));
        for s in ["log", "clock", "channel:/", "channel:/svc/counter"] {
            assert_eq!(cap(s).to_string(), s);
        }
    }

    #[test]
    fn bad_capability_strings() {
        for (s, why) in [
            ("", "unknown capability"),
            ("Log", "unknown capability"),
            (" log", "unknown capability"),
            ("log ", "unknown capability"),
            ("net", "unknown capability"),
            ("channel", "unknown capability"),
            ("channel:", "must start with '/'"),
            ("channel:svc", "must start with '/'"),
            ("channel:/svc/", "trailing '/'"),
            ("channel://svc", "empty segment"),
            ("channel:/svc//a", "empty segment"),
            ("channel:/svc/../x", "'..'"),
            ("channel:/./x", "'.'"),
            ("channel:/a b", "printable ASCII"),
            ("channel:/é", "printable ASCII"),
        ] {
            let e = s.parse::<Capability>().unwrap_err();
            assert!(e.to_string().contains(why), "{s:?}: {e}");
        }
        let long = alloc::format!("channel:/{}", "a".repeat(256));
        assert!(long.parse::<Capability>().is_err());
        let ok = alloc::format!("channel:/{}", "a".repeat(255));
        assert!(ok.parse::<Capability>().is_ok());
    }

    #[test]
    fn capset_insert_keeps_minimal() {
        let mut s = CapSet::none();
        assert!(s.is_empty());
        assert_eq!(s.to_string(), "none");
        s.insert(cap("channel:/svc/a")).unwrap();
        s.insert(cap("channel:/svc/b")).unwrap();
        s.insert(cap("channel:/tmp")).unwrap();
        s.insert(cap("channel:/svc")).unwrap();
        s.insert(cap("channel:/svc/c")).unwrap();
        s.insert(cap("log")).unwrap();
        assert_eq!(s.channels, ["/svc", "/tmp"]);
        assert_eq!(s.to_string(), "log,channel:/svc,channel:/tmp");
        assert!(s.may_open("/svc/x") && s.may_open("/svc") && !s.may_open("/svcx"));
        assert!(s.allows(&cap("channel:/svc/x")) && !s.allows(&cap("clock")));
        assert!(s
            .insert(Capability::Channel("bad".into()))
            .unwrap_err()
            .to_string()
            .contains("must start with '/'"));
        let parsed: CapSet = "channel:/tmp,log,channel:/svc/q,channel:/svc"
            .parse()
            .unwrap();
        assert_eq!(parsed, s);
        assert_eq!("none".parse::<CapSet>().unwrap(), CapSet::none());
        assert!("log,,clock".parse::<CapSet>().is_err());
        assert_eq!(CapSet::all().to_string(), "log,clock,channel:/");
        assert!(CapSet::all().may_open("/anything/at/all"));
    }

    fn manifest() -> Manifest {
        Manifest {
            name: "counter".into(),
            version: "1.2.0".into(),
            vendor: "acme".into(),
            module_hash: [7; 32],
            capabilities: alloc::vec![cap("log"), cap("channel:/svc/counter")],
        }
    }

    #[test]
    fn manifest_validation() {
        manifest().validate().unwrap();
        for v in ["0.0.0", "1.2.3-rc.1", "10.20.30-alpha-2"] {
            check_version(v).unwrap();
        }
        for v in [
            "", "1", "1.2", "1.2.3.4", "01.2.3", "1.2.x", "1.2.3-", "1.2.3-RC", "v1.2.3", "1.2.3 ",
        ] {
            assert!(check_version(v).is_err(), "{v:?}");
        }
        let mut m = manifest();
        m.name = String::new();
        assert!(m.validate().unwrap_err().to_string().contains("image name"));
        let mut m = manifest();
        m.version = "1.x".into();
        assert!(m.validate().unwrap_err().to_string().contains("version"));
        let mut m = manifest();
        m.vendor = "Acme Inc".into();
        assert!(m
            .validate()
            .unwrap_err()
            .to_string()
            .contains("vendor name"));
        let mut m = manifest();
        m.capabilities.push(cap("log"));
        assert_eq!(
            m.validate().unwrap_err().to_string(),
            "capability log is declared twice"
        );
        let mut m = manifest();
        m.capabilities.push(Capability::Channel("/x/".into()));
        assert!(m.validate().unwrap_err().to_string().contains("trailing"));
        let mut m = manifest();
        m.capabilities = (0..=MAX_CAPABILITIES)
            .map(|i| Capability::Channel(alloc::format!("/c{i}")))
            .collect();
        assert!(m.validate().unwrap_err().to_string().contains("too many"));
    }

    #[test]
    fn signed_manifest_roundtrips_through_postcard() {
        let sm = SignedManifest {
            manifest: manifest(),
            vendor_spki: alloc::vec![1, 2, 3],
            signature: alloc::vec![4, 5],
        };
        let bytes = postcard::to_allocvec(&sm).unwrap();
        assert_eq!(postcard::from_bytes::<SignedManifest>(&bytes).unwrap(), sm);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever parses displays back to the same text.
            #[test]
            fn parse_display_roundtrip(s in "(log|clock|channel:[/a-z.]{0,12})") {
                if let Ok(c) = s.parse::<Capability>() {
                    prop_assert_eq!(c.to_string(), s);
                    prop_assert!(c.validate().is_ok());
                }
            }
        }
    }
}
