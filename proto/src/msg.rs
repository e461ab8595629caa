//! Requests and responses.
//!
//! Every exchange is one request frame and one response frame on a fresh
//! bidirectional stream. Which requests a peer may send depends on who it proved
//! to be in the TLS handshake: an unauthenticated peer may only [`Request::Join`];
//! users send [`Request::Api`]; nodes also send Raft traffic, heartbeats and
//! forwarded calls.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

use crate::grant::{GrantId, Rights, SignedGrant};
use crate::ids::{NodeId, NodeKind, Role, Subject};

/// A request frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Join the cluster with a token (the only request an unauthenticated peer may make).
    Join(JoinRequest),
    /// An API call by the authenticated peer.
    Api(ApiRequest),
    /// A node relaying a call to the leader on behalf of the subject that made it.
    Forwarded {
        /// Who made the call (authenticated by the relaying node).
        origin: Subject,
        /// The call.
        call: ApiRequest,
    },
    /// Raft traffic between members (postcard-encoded openraft messages).
    Raft(RaftRpc),
}

/// Raft RPCs; the payloads are the encoded openraft request types.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftRpc {
    /// `AppendEntriesRequest`.
    AppendEntries(Vec<u8>),
    /// `VoteRequest`.
    Vote(Vec<u8>),
    /// `InstallSnapshotRequest`.
    InstallSnapshot(Vec<u8>),
}

/// A response frame.
pub type Response = Result<Reply, ApiError>;

/// Hardware a node reports at join and in heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeResources {
    /// Logical CPUs.
    pub cpus: u32,
    /// Physical memory in bytes.
    pub memory_bytes: u64,
    /// CPU architecture (`x86_64`, ...).
    pub arch: String,
}

/// What a joining machine sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The token's id and secret (`<id>.<secret>`); the CA pin stays with the joiner.
    pub token: String,
    /// A PKCS#10 CSR (PEM) for the node's key.
    pub csr_pem: String,
    /// A human name for the node (`check_name` rules).
    pub name: String,
    /// The address other members reach it at (`host:port`).
    pub addr: String,
    /// Its runtime.
    pub kind: NodeKind,
    /// Its hardware.
    pub resources: NodeResources,
}

/// What an admitted machine receives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinResponse {
    /// The node's new id.
    pub node_id: NodeId,
    /// The cluster name.
    pub cluster: String,
    /// The role the token granted.
    pub role: Role,
    /// The node's certificate (PEM).
    pub cert_pem: String,
    /// The cluster CA certificate (PEM).
    pub ca_cert_pem: String,
    /// The CA key (PEM): only for control nodes, which sign certificates.
    pub ca_key_pem: Option<String>,
    /// Current members: id and address.
    pub members: Vec<(NodeId, String)>,
}

/// An API call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiRequest {
    /// Who am I, and what is the cluster's state.
    Status,
    /// List nodes.
    Nodes,
    /// Remove a node: revoke its identity and drop it from Raft membership.
    NodeRemove {
        /// The node.
        id: NodeId,
    },
    /// Create a join token.
    TokenCreate {
        /// Role granted to whoever joins with it.
        role: Role,
        /// Lifetime in seconds.
        ttl_secs: u64,
        /// How many joins it admits.
        uses: u32,
    },
    /// List tokens (never their secrets).
    TokenList,
    /// Revoke a token.
    TokenRevoke {
        /// Token id.
        id: String,
    },
    /// Add a user: the registry signs a client certificate for `csr_pem`.
    UserAdd {
        /// The user's name.
        name: String,
        /// CSR (PEM) for the user's key.
        csr_pem: String,
    },
    /// List users.
    UserList,
    /// Store a signed grant.
    Grant(SignedGrant),
    /// List grants, optionally only those held by one subject.
    Grants {
        /// Filter.
        subject: Option<Subject>,
    },
    /// Revoke a grant by (a prefix of) its id.
    RevokeGrant {
        /// Hex id or unique prefix.
        id: String,
    },
    /// Revoke a subject: its certificates stop working everywhere.
    RevokeSubject(Subject),
    /// Write a key in the registry's key space.
    KvPut {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
    },
    /// Read a key (linearizable: served by the leader).
    KvGet {
        /// Key.
        key: String,
    },
    /// A node reports it is alive (nodes only).
    Heartbeat(Heartbeat),
    /// A node asks for a fresh certificate for its key (nodes only).
    Renew {
        /// CSR (PEM) for the node's current key.
        csr_pem: String,
    },
}

/// A node's periodic liveness report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Current hardware.
    pub resources: NodeResources,
    /// Expiry (unix seconds) of the certificate the node is using.
    pub cert_not_after: u64,
    /// The node's address.
    pub addr: String,
}

/// Raft role as seen by the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftRole {
    /// Current leader.
    Leader,
    /// Voter, not leader.
    Follower,
    /// Non-voting member.
    Learner,
    /// Admitted but not (yet, or any more) a Raft member.
    None,
}

impl fmt::Display for RaftRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RaftRole::Leader => "leader",
            RaftRole::Follower => "follower",
            RaftRole::Learner => "learner",
            RaftRole::None => "-",
        })
    }
}

/// One row of `mettactl nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Id.
    pub id: NodeId,
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Runtime.
    pub kind: NodeKind,
    /// Address.
    pub addr: String,
    /// Heartbeat seen within the liveness window.
    pub up: bool,
    /// Milliseconds since the last heartbeat, if any was seen by this leader.
    pub last_seen_ms: Option<u64>,
    /// Hardware.
    pub resources: NodeResources,
    /// Certificate expiry (unix seconds).
    pub cert_not_after: u64,
    /// Raft role.
    pub raft: RaftRole,
}

/// A token as listed (no secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Id.
    pub id: String,
    /// Role it grants.
    pub role: Role,
    /// Expiry (unix seconds).
    pub expires_at: u64,
    /// Joins left.
    pub uses_left: u32,
    /// Revoked by an operator.
    pub revoked: bool,
    /// Who created it.
    pub created_by: Subject,
}

/// A user as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// Name.
    pub name: String,
    /// Revoked.
    pub revoked: bool,
    /// Whether this is the cluster admin.
    pub admin: bool,
}

/// A grant as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantInfo {
    /// Id.
    pub id: GrantId,
    /// The grant.
    pub grant: SignedGrant,
    /// Revoked.
    pub revoked: bool,
}

/// Cluster status as seen by the node that answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Cluster name.
    pub cluster: String,
    /// Who the caller is.
    pub you: Subject,
    /// Current leader.
    pub leader: Option<NodeId>,
    /// Raft term.
    pub term: u64,
    /// Last applied log index.
    pub applied: u64,
    /// The answering node.
    pub node: NodeId,
}

/// A successful reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Generic success.
    Done,
    /// Join accepted.
    Joined(JoinResponse),
    /// Raft response payload (encoded openraft response type).
    Raft(Vec<u8>),
    /// Cluster status.
    Status(ClusterStatus),
    /// Node list.
    Nodes(Vec<NodeStatus>),
    /// A token was created: the full token text, to hand to the joining machine.
    Token {
        /// `metta1.<id>.<secret>.<ca pin>`
        token: String,
        /// Token id.
        id: String,
        /// Expiry (unix seconds).
        expires_at: u64,
    },
    /// Token list.
    Tokens(Vec<TokenInfo>),
    /// A signed certificate.
    Cert {
        /// PEM.
        cert_pem: String,
        /// Expiry (unix seconds).
        not_after: u64,
    },
    /// User list.
    Users(Vec<UserInfo>),
    /// A grant was stored.
    GrantAdded(GrantId),
    /// Grant list.
    Grants(Vec<GrantInfo>),
    /// A key's value (`None`: absent).
    Value(Option<Vec<u8>>),
}

/// Why a join token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenRejection {
    /// Not of the token format.
    Malformed,
    /// No such token id, or the secret does not match.
    Unknown,
    /// Past its expiry.
    Expired,
    /// All its uses are spent.
    Used,
    /// Revoked by an operator.
    Revoked,
}

impl fmt::Display for TokenRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenRejection::Malformed => "malformed token",
            TokenRejection::Unknown => "unknown token",
            TokenRejection::Expired => "token expired",
            TokenRejection::Used => "token already used",
            TokenRejection::Revoked => "token revoked",
        })
    }
}

/// Why a call failed. The state of the cluster is unchanged by a failed call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ApiError {
    /// The caller lacks a right.
    PermissionDenied {
        /// Who called.
        subject: Subject,
        /// What was missing.
        rights: Rights,
        /// On what.
        resource: String,
    },
    /// The peer did not authenticate and may only join.
    Unauthenticated,
    /// A join token was refused.
    Token(TokenRejection),
    /// A request field is invalid.
    InvalidArgument(String),
    /// Something named does not exist.
    NotFound(String),
    /// Something named exists already.
    AlreadyExists(String),
    /// A grant failed verification.
    GrantRejected(String),
    /// No leader is known, or it cannot be reached.
    Unavailable(String),
    /// An internal failure of the answering node.
    Internal(String),
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::PermissionDenied {
                subject,
                rights,
                resource,
            } => write!(
                f,
                "permission denied: {subject} lacks {rights} on {resource}"
            ),
            ApiError::Unauthenticated => {
                f.write_str("unauthenticated: present a cluster certificate (only join is open)")
            }
            ApiError::Token(r) => write!(f, "join refused: {r}"),
            ApiError::InvalidArgument(s) => write!(f, "invalid argument: {s}"),
            ApiError::NotFound(s) => write!(f, "not found: {s}"),
            ApiError::AlreadyExists(s) => write!(f, "already exists: {s}"),
            ApiError::GrantRejected(s) => write!(f, "grant rejected: {s}"),
            ApiError::Unavailable(s) => write!(f, "unavailable: {s}"),
            ApiError::Internal(s) => write!(f, "internal error: {s}"),
        }
    }
}

impl core::error::Error for ApiError {}
