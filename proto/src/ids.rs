//! Identifiers: nodes, subjects, roles.

use alloc::string::{String, ToString};
use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Serialize};

/// A node's cluster-wide id, allocated by the registry when the node is admitted.
/// It is also the node's Raft id.
pub type NodeId = u64;

/// The role a node is admitted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// A control-plane node: a Raft voter, holds the cluster CA key.
    Control,
    /// A worker: a non-voting Raft member (learner) that runs domains.
    Worker,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Control => "control",
            Role::Worker => "worker",
        })
    }
}

impl FromStr for Role {
    type Err = SubjectParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "control" => Ok(Role::Control),
            "worker" => Ok(Role::Worker),
            _ => Err(SubjectParseError(
                "role must be `control` or `worker`".to_string(),
            )),
        }
    }
}

/// Which runtime a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodeKind {
    /// `mettad` on Linux.
    Hosted,
    /// The bare-metal `metta-kernel`.
    Native,
}

impl fmt::Display for NodeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeKind::Hosted => "hosted",
            NodeKind::Native => "native",
        })
    }
}

/// Who a certificate, a grant or an API call names.
///
/// Written `node/<id>` or `user/<name>`; in certificates it is the path of the URI
/// SAN `metta://<cluster>/node/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Subject {
    /// A cluster node.
    Node(NodeId),
    /// A person (or script) holding a client config.
    User(String),
}

/// A subject, role or name that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectParseError(pub String);

impl fmt::Display for SubjectParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl core::error::Error for SubjectParseError {}

/// Checks a user or cluster name: 1–63 characters of `[a-z0-9-]`, starting with a
/// letter or digit. The same rule as a DNS label, so names are safe in URIs, file
/// names and scripts.
pub fn check_name(kind: &str, name: &str) -> Result<(), SubjectParseError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(SubjectParseError(alloc::format!(
            "invalid {kind} name {name:?}: use 1-63 characters of a-z, 0-9 and '-', not starting with '-'"
        )))
    }
}

impl Subject {
    /// The URI naming this subject in `cluster`, as put in certificate SANs.
    pub fn uri(&self, cluster: &str) -> String {
        alloc::format!("metta://{cluster}/{self}")
    }

    /// Parses a SAN URI, returning the cluster name and the subject.
    pub fn from_uri(uri: &str) -> Result<(String, Subject), SubjectParseError> {
        let rest = uri
            .strip_prefix("metta://")
            .ok_or_else(|| SubjectParseError(alloc::format!("not a metta:// URI: {uri:?}")))?;
        let (cluster, path) = rest
            .split_once('/')
            .ok_or_else(|| SubjectParseError(alloc::format!("URI names no subject: {uri:?}")))?;
        check_name("cluster", cluster)?;
        Ok((cluster.to_string(), path.parse()?))
    }

    /// Whether this is a node.
    pub fn is_node(&self) -> bool {
        matches!(self, Subject::Node(_))
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Node(id) => write!(f, "node/{id}"),
            Subject::User(name) => write!(f, "user/{name}"),
        }
    }
}

impl FromStr for Subject {
    type Err = SubjectParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(id) = s.strip_prefix("node/") {
            let id = id
                .parse()
                .map_err(|_| SubjectParseError(alloc::format!("bad node id in {s:?}")))?;
            return Ok(Subject::Node(id));
        }
        let name = s.strip_prefix("user/").unwrap_or(s);
        check_name("user", name)?;
        Ok(Subject::User(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_uri_roundtrip() {
        for s in [Subject::Node(7), Subject::User("alice".into())] {
            let uri = s.uri("homelab");
            assert_eq!(Subject::from_uri(&uri).unwrap(), ("homelab".into(), s));
        }
    }

    #[test]
    fn bad_subjects_are_rejected() {
        for bad in ["node/x", "user/Alice", "user/", "user/a b", "-bob"] {
            assert!(bad.parse::<Subject>().is_err(), "{bad}");
        }
        assert!(Subject::from_uri("https://x/node/1").is_err());
        assert!(Subject::from_uri("metta://BAD/node/1").is_err());
        assert_eq!(
            "bob".parse::<Subject>().unwrap(),
            Subject::User("bob".into())
        );
    }
}
