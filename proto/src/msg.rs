//! Requests and responses.
//!
//! Every exchange is one request frame and one response frame. Over QUIC each
//! exchange has a fresh bidirectional stream; over TLS 1.3 on TCP (native
//! nodes) a connection carries one exchange at a time: the client sends a
//! request, the server answers it, and only then may the client send the next
//! one (see [`crate::exchange`]).
//!
//! Which requests a peer may send depends on who it proved to be in the TLS
//! handshake: an unauthenticated peer may only [`Request::Join`]; users send
//! [`Request::Api`]; nodes also send Raft traffic, heartbeats and forwarded
//! calls.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

use crate::grant::{GrantId, Rights, SignedGrant};
use crate::ids::{NodeId, NodeKind, Role, Subject};
use crate::image::{CapSet, Capability, SignedManifest};
use crate::qos::Contract;

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
    /// A node asking another about the domains it runs (nodes only). The
    /// sender has already authorized the user call this serves, if any.
    Node(NodeCall),
    /// A native node's link (native nodes only, over TLS/TCP): it reports
    /// its domains, hands over their outgoing messages, answers and log
    /// lines, and is answered with its work ([`Reply::Work`]). This is also
    /// its heartbeat. See [`NodeSync`].
    Sync(NodeSync),
    /// A [`NodeCall`] for the native node `node`, sent to the control node
    /// that holds its link (nodes only): native nodes accept no
    /// connections, so their registered address is that control node's.
    Proxy {
        /// The native node.
        node: NodeId,
        /// The call.
        call: NodeCall,
    },
}

/// The lane of the [`ReplyRef`]s a native node's proxy mints for calls it
/// relays (`mettactl call`): an answer with this lane goes back to the
/// caller waiting at the proxy, not to a domain.
pub const PROXY_LANE: u32 = u32::MAX;

/// What a native node sends on its link ([`Request::Sync`]).
///
/// A native node cannot accept connections and runs no Raft, so it pulls:
/// each sync carries everything its domains produced since the previous
/// one, and the answer ([`NodeWork`]) everything waiting for it. When
/// neither side has anything, the control node holds the answer for up to
/// [`NodeSync::hold_ms`] (a long poll), so work reaches the node as soon as
/// it exists. A sync that got no answer is sent again with the same
/// contents (plus whatever came since).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSync {
    /// Liveness and hardware (the address is ignored: a native node is
    /// reached through the control node holding its link).
    pub heartbeat: Heartbeat,
    /// Every domain the node has been given, as it stands now.
    pub domains: Vec<NativeDomain>,
    /// Messages from its domains that no domain on the node serves, in the
    /// order they were sent.
    pub outbound: Vec<OutboundMessage>,
    /// Answers of its domains to messages that came from elsewhere.
    pub answers: Vec<(ReplyRef, Vec<u8>)>,
    /// Its domains' log lines since the previous sync: `(domain, text)`.
    pub logs: Vec<(String, String)>,
    /// Lines the node dropped (its queue was full) since the previous sync.
    pub logs_dropped: u64,
    /// Runtime rows, sent when the previous answer asked for them.
    pub stats: Option<Vec<DomainRuntime>>,
    /// How long the control node may hold the answer when there is no work.
    pub hold_ms: u32,
    /// Which batch of outbound messages, answers and log lines this sync
    /// carries. A sync whose answer was lost is sent again with the same
    /// number and the same batch, and the control node takes a batch only
    /// once, so nothing is lost or doubled (0: no such promise).
    pub seq: u64,
    /// The last [`NodeWork::seq`] the node carried out: until it says so,
    /// the control node sends that batch of messages and answers again.
    pub work_seq: u64,
}

/// A domain as a native node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NativeDomain {
    /// Name.
    pub name: String,
    /// The incarnation it runs.
    pub epoch: u64,
    /// How it stands.
    pub state: NativeState,
}

/// The state of a domain on a native node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NativeState {
    /// Spawned; its first activation has not finished yet.
    Starting,
    /// Its first activation finished, this long after the spawn (µs).
    Started {
        /// Spawn to end of the first activation, µs.
        start_us: u64,
    },
    /// It could not be started, or it trapped.
    Failed(String),
}

/// A message from a domain on a native node for a domain elsewhere: the
/// control node resolves `channel` to a domain ([`Envelope::to`]) with the
/// registry, as a hosted node's lanes do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboundMessage {
    /// The sending domain.
    pub from: String,
    /// Channel name.
    pub channel: String,
    /// Bytes.
    pub payload: Vec<u8>,
    /// Where an answer goes (the native node, lane 0, a token it minted).
    pub reply: Option<ReplyRef>,
}

/// Work for a native node ([`Reply::Work`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeWork {
    /// Domains to start (placed on the node and not in its report).
    pub start: Vec<StartDomain>,
    /// Domains to stop (in its report and no longer placed there, or
    /// placed with another epoch).
    pub stop: Vec<String>,
    /// Messages for its domains, in order.
    pub deliver: Vec<Envelope>,
    /// Answers to its domains' outbound messages: `(token, bytes)`, the
    /// token of the [`ReplyRef`] it minted.
    pub answers: Vec<(u64, Vec<u8>)>,
    /// Send runtime rows with the next sync.
    pub stats: bool,
    /// Numbers the batch of [`NodeWork::deliver`] and [`NodeWork::answers`]
    /// (0: the batch is empty). It is sent again, unchanged, until a sync
    /// acknowledges it ([`NodeSync::work_seq`]); the node carries out a
    /// number it has seen only once.
    pub seq: u64,
}

/// A domain for a native node to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartDomain {
    /// Name.
    pub name: String,
    /// Incarnation.
    pub epoch: u64,
    /// Its admitted contract.
    pub contract: Contract,
    /// What it may do.
    pub caps: CapSet,
    /// The wasm module (verified against its vendor's signature when the
    /// image entered the registry).
    pub module: Vec<u8>,
}

/// Calls between nodes about the domains a node runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeCall {
    /// The runtime state of every domain the node runs.
    Stats,
    /// A domain's log lines after sequence number `after`.
    Logs {
        /// Domain.
        name: String,
        /// Last sequence number already seen (0: from the start).
        after: u64,
    },
    /// Send `payload` to a domain's channel and wait for its answer.
    Call {
        /// Domain.
        name: String,
        /// Channel name.
        channel: String,
        /// Request bytes.
        payload: Vec<u8>,
        /// How long to wait for the answer.
        timeout_ms: u32,
    },
    /// Wait until the domain has completed its first activation.
    WaitStarted {
        /// Domain.
        name: String,
        /// The epoch expected (an older incarnation does not count).
        epoch: u64,
        /// How long to wait.
        timeout_ms: u32,
    },
    /// Messages from domains on the sending node to domains on this one,
    /// in the order they were sent.
    Deliver(Vec<Envelope>),
    /// An answer to a message that carried a [`ReplyRef`] of this node.
    Answer {
        /// The reply token from the [`ReplyRef`].
        token: u64,
        /// The lane from the [`ReplyRef`].
        lane: u32,
        /// The answer.
        payload: Vec<u8>,
    },
}

/// One message between domains on different nodes (or lanes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The sending domain.
    pub from: String,
    /// The receiving domain.
    pub to: String,
    /// Channel name.
    pub channel: String,
    /// Bytes.
    pub payload: Vec<u8>,
    /// Where an answer goes (`None`: answers are dropped).
    pub reply: Option<ReplyRef>,
}

/// Where the answer to an [`Envelope`] is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyRef {
    /// Node of the sender.
    pub node: NodeId,
    /// Its lane there.
    pub lane: u32,
    /// Token minted by that lane's driver.
    pub token: u64,
}

/// How to run a domain (`mettactl run`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// The domain's name (unique in the cluster; `check_name` rules).
    pub name: String,
    /// Image name.
    pub image: String,
    /// The contract asked for.
    pub contract: Contract,
    /// Pin to this node (name or id).
    pub node: Option<String>,
    /// Only nodes carrying these labels.
    pub labels: Vec<(String, String)>,
    /// If the contract cannot be admitted anywhere, take the best
    /// counter-offer instead of failing.
    pub accept_offer: bool,
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
    /// Set or remove a node label (`key=value`, or `key-` to remove).
    NodeLabel {
        /// Node name or id.
        node: String,
        /// Key.
        key: String,
        /// Value (`None`: remove).
        value: Option<String>,
    },
    /// Trust a vendor's key for signing images.
    VendorAdd {
        /// Vendor name, as manifests name it.
        name: String,
        /// Its public key (SPKI DER, P-256).
        spki_der: Vec<u8>,
    },
    /// Stop trusting a vendor (images already pushed stay; new pushes and
    /// runs of its images are refused).
    VendorRemove {
        /// Vendor name.
        name: String,
    },
    /// List trusted vendors.
    Vendors,
    /// Store an image: a signed manifest and the module it names.
    ImagePush {
        /// The vendor-signed manifest.
        manifest: SignedManifest,
        /// The wasm module.
        wasm: Vec<u8>,
    },
    /// List images.
    Images,
    /// Place and start a domain.
    Run(RunSpec),
    /// List domains with their runtime state.
    Ps,
    /// A domain's log lines after sequence number `after`.
    Logs {
        /// Domain.
        name: String,
        /// Last sequence number already seen (0: from the start).
        after: u64,
    },
    /// Stop a domain and free its share.
    Stop {
        /// Domain.
        name: String,
    },
    /// Send a request to a domain's channel and wait for its answer.
    Call {
        /// Domain.
        name: String,
        /// Channel (`None`: the domain's first channel capability).
        channel: Option<String>,
        /// Request bytes.
        payload: Vec<u8>,
        /// How long to wait for the answer.
        timeout_ms: u32,
    },
}

/// A trusted vendor as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VendorInfo {
    /// Name.
    pub name: String,
    /// blake3 of its SPKI DER (hex), to compare with the vendor's own.
    pub key_id: String,
}

/// An image as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Vendor.
    pub vendor: String,
    /// blake3 of the module (hex): where it is stored.
    pub module_hash: String,
    /// Module size in bytes.
    pub size: u64,
    /// What the vendor says the code may use.
    pub capabilities: Vec<Capability>,
    /// Who pushed it.
    pub pushed_by: Subject,
}

/// What a node reports about one domain it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainRuntime {
    /// Domain.
    pub name: String,
    /// Incarnation.
    pub epoch: u64,
    /// `running`, `waiting`, `failed: <why>`, `starting`, `start failed: <why>`.
    pub state: String,
    /// CPU charged to it since it started, ns.
    pub cpu_ns: u64,
    /// CPU delivered over its recent complete periods as parts per million
    /// of its slice (1,000,000 = exactly the contract; more with `extra`).
    pub delivered_ppm: Option<u64>,
    /// Activations so far.
    pub activations: u64,
    /// Linear memory in use, bytes.
    pub memory_bytes: u64,
    /// Spawn to end of first activation, µs.
    pub start_us: Option<u64>,
    /// Complete periods in the node's record (a ring) behind the next two.
    pub periods: u32,
    /// 5th percentile of CPU delivered per period, ppm of the slice (the
    /// guarantee holds if this is near 1,000,000; domains that wait for
    /// messages use less than they may).
    pub delivered_p5_ppm: Option<u64>,
    /// The same, measured as wall time of its activations instead of the
    /// fuel-metered charge.
    pub real_p5_ppm: Option<u64>,
    /// 99th percentile of the activation latency per period (period start
    /// to its first activation), µs.
    pub latency_p99_us: Option<u64>,
    /// Messages it sent that could not be delivered.
    pub undelivered: u64,
}

impl DomainRuntime {
    /// The row of a domain that could not be started (incarnation `epoch`):
    /// state `start failed: <why>`, no figures.
    pub fn start_failed(name: String, epoch: u64, why: &str) -> DomainRuntime {
        DomainRuntime {
            name,
            epoch,
            state: alloc::format!("start failed: {why}"),
            cpu_ns: 0,
            delivered_ppm: None,
            activations: 0,
            memory_bytes: 0,
            start_us: None,
            periods: 0,
            delivered_p5_ppm: None,
            real_p5_ppm: None,
            latency_p99_us: None,
            undelivered: 0,
        }
    }
}

/// A row of `mettactl ps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainStatus {
    /// Name.
    pub name: String,
    /// Image name and version.
    pub image: String,
    /// blake3 of the module (hex).
    pub module_hash: String,
    /// Node it is placed on.
    pub node: NodeId,
    /// That node's name.
    pub node_name: String,
    /// CPU lane on that node.
    pub lane: u32,
    /// Its contract.
    pub contract: Contract,
    /// What it may use: policy(user, vendor).
    pub caps: CapSet,
    /// Who started it.
    pub owner: Subject,
    /// Incarnation (grows with every restart or move).
    pub epoch: u64,
    /// What its node reports (`None`: the node did not answer).
    pub runtime: Option<DomainRuntime>,
}

/// Log lines of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLines {
    /// `(sequence number, text)`, oldest first.
    pub lines: Vec<(u64, String)>,
    /// Pass as `after` to get the lines that follow.
    pub next: u64,
    /// Lines lost between `after` and the first line (the node keeps a ring).
    pub dropped: u64,
}

/// A node's periodic liveness report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Operator labels.
    pub labels: Vec<(String, String)>,
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
    /// Revoked: the grant itself, or its subject or issuer.
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
    /// Vendor list.
    Vendors(Vec<VendorInfo>),
    /// Image list (or the one image pushed).
    Images(Vec<ImageInfo>),
    /// Domain list (or the one domain started).
    Domains(Vec<DomainStatus>),
    /// What a node reports about its domains.
    Runtime(Vec<DomainRuntime>),
    /// Log lines.
    Logs(LogLines),
    /// A domain's answer.
    Answer(Vec<u8>),
    /// A domain completed its first activation (`NodeCall::WaitStarted`).
    Started {
        /// Spawn to end of the first activation, µs.
        start_us: u64,
    },
    /// Work for a native node (the answer to [`Request::Sync`]).
    Work(NodeWork),
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
    /// An image was refused (unsigned, tampered, unknown vendor, bad module).
    ImageRejected(String),
    /// No node can run the domain as asked.
    Unplaceable {
        /// Why (the scheduler's explanation).
        reason: String,
        /// The best contract some node can admit instead.
        offer: Option<CounterOffer>,
    },
    /// The domain's node could not start or reach it.
    Domain(String),
}

/// The best contract the scheduler can admit when the one asked for cannot be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterOffer {
    /// Node.
    pub node: NodeId,
    /// Its name.
    pub node_name: String,
    /// The contract it can admit.
    pub contract: Contract,
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
                f.write_str("permission denied: no client certificate was presented (only join is open to peers without one)")
            }
            ApiError::Token(r) => write!(f, "join refused: {r}"),
            ApiError::InvalidArgument(s) => write!(f, "invalid argument: {s}"),
            ApiError::NotFound(s) => write!(f, "not found: {s}"),
            ApiError::AlreadyExists(s) => write!(f, "already exists: {s}"),
            ApiError::GrantRejected(s) => write!(f, "grant rejected: {s}"),
            ApiError::Unavailable(s) => write!(f, "unavailable: {s}"),
            ApiError::Internal(s) => write!(f, "internal error: {s}"),
            ApiError::ImageRejected(s) => write!(f, "image rejected: {s}"),
            ApiError::Unplaceable { reason, .. } => f.write_str(reason),
            ApiError::Domain(s) => write!(f, "domain: {s}"),
        }
    }
}

impl core::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_failed_row_says_why_and_has_no_figures() {
        let row = DomainRuntime::start_failed("c".into(), 4, "bad image");
        assert_eq!((row.name.as_str(), row.epoch), ("c", 4));
        assert_eq!(row.state, "start failed: bad image");
        assert_eq!(
            (row.cpu_ns, row.activations, row.memory_bytes, row.periods),
            (0, 0, 0, 0)
        );
        assert_eq!((row.delivered_ppm, row.start_us), (None, None));
        assert_eq!(
            (row.delivered_p5_ppm, row.real_p5_ppm, row.latency_p99_us),
            (None, None, None)
        );
        assert_eq!(row.undelivered, 0);
    }
}
