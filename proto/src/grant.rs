//! Capabilities: rights on resources, granted by signed, chained grants.
//!
//! The *checks* (signatures, chains, narrowing, expiry) live in `metta-trust`;
//! here are only the plain data types that travel on the wire and sit in the
//! registry.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::{Subject, SubjectParseError};

/// One right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum Right {
    /// See registry state (nodes, tokens, users, grants, keys).
    Read = 1,
    /// Change registry state (tokens, users, nodes, keys).
    Write = 2,
    /// Run and manage domains.
    Run = 4,
}

impl Right {
    /// Every right, in display order.
    pub const ALL: [Right; 3] = [Right::Read, Right::Write, Right::Run];

    /// The right's name as typed on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Right::Read => "read",
            Right::Write => "write",
            Right::Run => "run",
        }
    }
}

impl fmt::Display for Right {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of rights (a bitset of [`Right`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Rights(pub u32);

impl Rights {
    /// No rights.
    pub const NONE: Rights = Rights(0);
    /// Every right.
    pub const ALL: Rights = Rights(1 | 2 | 4);

    /// The set holding just `r`.
    pub fn of(r: Right) -> Rights {
        Rights(r as u32)
    }
    /// Whether `r` is in the set.
    pub fn contains(self, r: Right) -> bool {
        self.0 & (r as u32) != 0
    }
    /// Whether every right of `other` is in `self`.
    pub fn covers(self, other: Rights) -> bool {
        other.0 & !self.0 == 0
    }
    /// Rights in both sets.
    pub fn intersect(self, other: Rights) -> Rights {
        Rights(self.0 & other.0)
    }
    /// Whether the set holds a bit that names no right.
    pub fn is_valid(self) -> bool {
        Rights::ALL.covers(self)
    }
}

impl fmt::Display for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for r in Right::ALL {
            if self.contains(r) {
                if !first {
                    f.write_str(",")?;
                }
                first = false;
                f.write_str(r.name())?;
            }
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

impl FromStr for Rights {
    type Err = SubjectParseError;
    /// Parses `read,write,run` or `all`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = Rights::NONE;
        for part in s.split(',').map(str::trim) {
            let r = match part {
                "all" => Rights::ALL,
                "read" => Rights::of(Right::Read),
                "write" => Rights::of(Right::Write),
                "run" => Rights::of(Right::Run),
                other => {
                    return Err(SubjectParseError(alloc::format!(
                        "unknown right {other:?}: rights are read, write, run (or all)"
                    )))
                }
            };
            out = Rights(out.0 | r.0);
        }
        Ok(out)
    }
}

/// The id of a grant: the blake3 hash of its encoded body.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GrantId(pub [u8; 32]);

impl fmt::Debug for GrantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GrantId({self})")
    }
}

impl fmt::Display for GrantId {
    /// The first 8 bytes in hex: what users see and type.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A capability: `issuer` lets `subject` exercise `rights` on `resource` (a
/// `/`-separated path; a grant on `/a` covers `/a/b`) until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Who signs the grant.
    pub issuer: Subject,
    /// Who receives it.
    pub subject: Subject,
    /// What it allows.
    pub rights: Rights,
    /// Where it applies: `/` is everything.
    pub resource: String,
    /// Unix seconds after which it is void; `None`: until revoked.
    pub expires_at: Option<u64>,
    /// Whether the subject may issue narrower grants from it.
    pub delegable: bool,
    /// The issuer's own grant this one derives from; `None` when the issuer is
    /// the cluster admin (the root of every chain).
    pub parent: Option<GrantId>,
    /// Unix seconds when it was issued (also makes ids unique).
    pub issued_at: u64,
}

/// A grant with the issuer's signature (ECDSA P-256, DER) over its postcard
/// encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedGrant {
    /// The grant.
    pub grant: Grant,
    /// The issuer's signature.
    pub signature: Vec<u8>,
}

/// Whether resource path `granted` covers `wanted`: equal, `/`, or a prefix
/// ending at a path-segment boundary.
pub fn resource_covers(granted: &str, wanted: &str) -> bool {
    let g = granted.trim_end_matches('/');
    if g.is_empty() {
        return true;
    }
    wanted == g || (wanted.starts_with(g) && wanted.as_bytes().get(g.len()) == Some(&b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_parse_and_display() {
        let r: Rights = "read,run".parse().unwrap();
        assert!(r.contains(Right::Read) && r.contains(Right::Run) && !r.contains(Right::Write));
        assert_eq!(r.to_string(), "read,run");
        assert_eq!("all".parse::<Rights>().unwrap(), Rights::ALL);
        assert!("fly".parse::<Rights>().is_err());
        assert!(Rights::ALL.covers(r) && !r.covers(Rights::ALL));
    }

    #[test]
    fn resource_prefixes_respect_segments() {
        assert!(resource_covers("/", "/kv/a"));
        assert!(resource_covers("/kv", "/kv/a"));
        assert!(resource_covers("/kv/", "/kv/a"));
        assert!(resource_covers("/kv/a", "/kv/a"));
        assert!(!resource_covers("/kv/a", "/kv/ab"));
        assert!(!resource_covers("/kv/a", "/kv"));
    }
}
