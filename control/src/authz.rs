//! The authorization matrix: who may send which request, over which
//! transport. Pure; [`crate::node::Node::handle`] asks it about every request
//! before anything else happens, and `docs/ARCHITECTURE.md` shows the same
//! table ([`matrix_markdown`] renders it; a test compares the two), so the
//! document and the code cannot drift.
//!
//! Two layers decide a request:
//!
//! 1. **Who the peer is** ([`Identity`], from its verified certificate and
//!    the registry) against **what it sends** ([`Kind`], one per `Request`
//!    variant, API call, Raft RPC and node call) and **how** ([`Via`]):
//!    [`decide`] reads [`TABLE`]. This is checked on the node that receives
//!    the request, and again on the leader for a call a control node relays
//!    ([`Request::Forwarded`]), against the identity of the call's origin.
//! 2. For the cells that say [`Decision::Grant`], the right on the resource
//!    that [`crate::policy::requirement`] names, checked by the leader
//!    against the caller's signed grants (the admin holds every right).
//!
//! Cells that say [`Decision::OwnClaims`] are allowed only when what the
//! message claims about identities is the sender's own: a Raft RPC's leader
//! or candidate id is the sender; a message between domains comes from a
//! domain placed on the sender and asks for its answer to go back to the
//! sender; a heartbeat or renewal is for the sender's own node. The checks
//! are in [`raft_claims`], [`envelope_claims`] and the node's handlers.

use metta_proto::{ApiRequest, NodeCall, NodeKind, RaftRpc, Request, Role, Subject};
use metta_trust::CertInfo;

use crate::registry::Registry;

/// Who a peer is, as far as authorization goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Identity {
    /// No client certificate.
    Anonymous,
    /// A user other than the admin (what it may do further depends on its
    /// grants).
    User,
    /// The cluster admin (root of every grant chain).
    Admin,
    /// A control node: a Raft voter that holds the CA key.
    Control,
    /// A hosted worker (`mettad` admitted with a worker token).
    Worker,
    /// A native worker (the bare-metal kernel).
    Native,
    /// A revoked identity, a removed node, or a node certificate the
    /// registry cannot place.
    Revoked,
}

impl Identity {
    /// Every identity, in the matrix's column order.
    pub const ALL: [Identity; 7] = [
        Identity::Anonymous,
        Identity::User,
        Identity::Admin,
        Identity::Control,
        Identity::Worker,
        Identity::Native,
        Identity::Revoked,
    ];

    /// The column heading.
    pub fn name(self) -> &'static str {
        match self {
            Identity::Anonymous => "anonymous",
            Identity::User => "user",
            Identity::Admin => "admin",
            Identity::Control => "control node",
            Identity::Worker => "hosted worker",
            Identity::Native => "native worker",
            Identity::Revoked => "revoked/removed",
        }
    }

    fn column(self) -> usize {
        Identity::ALL
            .iter()
            .position(|i| *i == self)
            .expect("every identity has a column")
    }
}

/// Which transport a request came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    /// QUIC (hosted nodes, `mettactl`).
    Quic,
    /// TLS 1.3 over TCP (native nodes).
    Tcp,
}

/// Which transports a kind of request is served on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transports {
    /// QUIC and TCP.
    Both,
    /// QUIC only (between `mettad`s, and `mettactl`).
    Quic,
    /// TCP only (native nodes' links).
    Tcp,
}

impl Transports {
    fn admits(self, via: Via) -> bool {
        matches!(
            (self, via),
            (Transports::Both, _) | (Transports::Quic, Via::Quic) | (Transports::Tcp, Via::Tcp)
        )
    }

    fn name(self) -> &'static str {
        match self {
            Transports::Both => "QUIC, TCP",
            Transports::Quic => "QUIC",
            Transports::Tcp => "TCP",
        }
    }
}

/// What the matrix says about one (request kind, identity) cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Refused with `permission denied` (`unauthenticated` for an
    /// anonymous peer), before anything is read or changed.
    Deny,
    /// Allowed.
    Allow,
    /// Allowed if the caller holds the right that
    /// [`crate::policy::requirement`] names (the admin holds all).
    Grant,
    /// Allowed only about the sender itself: the ids the message claims are
    /// checked against the sender's identity.
    OwnClaims,
    /// A relayed call: allowed from control nodes, then decided again for
    /// the call's origin.
    Relay,
}

impl Decision {
    fn cell(self) -> &'static str {
        match self {
            Decision::Deny => "–",
            Decision::Allow => "yes",
            Decision::Grant => "grant",
            Decision::OwnClaims => "own",
            Decision::Relay => "relay",
        }
    }
}

/// A kind of request: one row of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Kind {
    Join,
    ApiStatus,
    ApiNodes,
    ApiNodeRemove,
    ApiNodeLabel,
    ApiTokenCreate,
    ApiTokenList,
    ApiTokenRevoke,
    ApiUserAdd,
    ApiUserList,
    ApiGrant,
    ApiGrants,
    ApiRevokeGrant,
    ApiRevokeSubject,
    ApiKvPut,
    ApiKvGet,
    ApiHeartbeat,
    ApiRenew,
    ApiVendorAdd,
    ApiVendorRemove,
    ApiVendors,
    ApiImagePush,
    ApiImages,
    ApiRun,
    ApiPs,
    ApiLogs,
    ApiStop,
    ApiCall,
    Forwarded,
    RaftAppendEntries,
    RaftVote,
    RaftInstallSnapshot,
    NodeStats,
    NodeLogs,
    NodeCall,
    NodeWaitStarted,
    NodeDeliver,
    NodeAnswer,
    ProxyStats,
    ProxyLogs,
    ProxyCall,
    ProxyWaitStarted,
    ProxyDeliver,
    ProxyAnswer,
    Sync,
}

use Decision::{Allow as Y, Deny as N, Grant as G, OwnClaims as O, Relay as R};

/// One row: the kind, its name in the document, where it is served, and
/// the decision for each identity in [`Identity::ALL`] order (anonymous,
/// user, admin, control node, hosted worker, native worker, revoked).
pub type Row = (Kind, &'static str, Transports, [Decision; 7]);

/// The matrix. Every request a node serves is in exactly one row.
pub const TABLE: &[Row] = &[
    // The token is the authority: anyone may present one (rate-limited per
    // source and per token id).
    (Kind::Join, "join", Transports::Both, [Y, Y, Y, Y, Y, Y, N]),
    (
        Kind::ApiStatus,
        "api status",
        Transports::Both,
        [N, Y, Y, Y, Y, Y, N],
    ),
    (
        Kind::ApiNodes,
        "api nodes",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiNodeRemove,
        "api node remove",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiNodeLabel,
        "api node label",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiTokenCreate,
        "api token create",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiTokenList,
        "api token ls",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiTokenRevoke,
        "api token revoke",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiUserAdd,
        "api user add",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiUserList,
        "api user ls",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiGrant,
        "api grant",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiGrants,
        "api grants",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiRevokeGrant,
        "api revoke grant",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiRevokeSubject,
        "api revoke subject",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiKvPut,
        "api kv put",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiKvGet,
        "api kv get",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiHeartbeat,
        "api heartbeat",
        Transports::Both,
        [N, N, N, O, O, O, N],
    ),
    (
        Kind::ApiRenew,
        "api renew",
        Transports::Both,
        [N, N, N, O, O, O, N],
    ),
    (
        Kind::ApiVendorAdd,
        "api vendor add",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiVendorRemove,
        "api vendor rm",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiVendors,
        "api vendor ls",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiImagePush,
        "api image push",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiImages,
        "api image ls",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiRun,
        "api run",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiPs,
        "api ps",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiLogs,
        "api logs",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiStop,
        "api stop",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    (
        Kind::ApiCall,
        "api call",
        Transports::Both,
        [N, G, Y, N, N, N, N],
    ),
    // A follower relays its callers' calls to the leader; only control
    // nodes are believed about who the caller was.
    (
        Kind::Forwarded,
        "forwarded",
        Transports::Quic,
        [N, N, N, R, N, N, N],
    ),
    // Only voters send Raft traffic, and every voter is a control node.
    (
        Kind::RaftAppendEntries,
        "raft append-entries",
        Transports::Quic,
        [N, N, N, O, N, N, N],
    ),
    (
        Kind::RaftVote,
        "raft vote",
        Transports::Quic,
        [N, N, N, O, N, N, N],
    ),
    (
        Kind::RaftInstallSnapshot,
        "raft install-snapshot",
        Transports::Quic,
        [N, N, N, O, N, N, N],
    ),
    // What the leader asks a domain's node on behalf of a user call it has
    // authorized: only control nodes.
    (
        Kind::NodeStats,
        "node stats",
        Transports::Quic,
        [N, N, N, Y, N, N, N],
    ),
    (
        Kind::NodeLogs,
        "node logs",
        Transports::Quic,
        [N, N, N, Y, N, N, N],
    ),
    (
        Kind::NodeCall,
        "node call",
        Transports::Quic,
        [N, N, N, Y, N, N, N],
    ),
    (
        Kind::NodeWaitStarted,
        "node wait-started",
        Transports::Quic,
        [N, N, N, Y, N, N, N],
    ),
    // Messages between domains: from the node their sender is placed on
    // (control nodes also carry native nodes' messages).
    (
        Kind::NodeDeliver,
        "node deliver",
        Transports::Quic,
        [N, N, N, Y, O, N, N],
    ),
    (
        Kind::NodeAnswer,
        "node answer",
        Transports::Quic,
        [N, N, N, Y, O, N, N],
    ),
    // The same calls for a native node, to the control node holding its link.
    (
        Kind::ProxyStats,
        "proxy stats",
        Transports::Quic,
        [N, N, N, Y, N, N, N],
    ),
    (
        Kind::ProxyLogs,
        "proxy logs",
        Transports::Quic,
        [N, N, N, Y, N, N, N],
    ),
    (
        Kind::ProxyCall,
        "proxy call",
        Transports::Quic,
        [N, N, N, Y, N, N, N],
    ),
    (
        Kind::ProxyWaitStarted,
        "proxy wait-started",
        Transports::Quic,
        [N, N, N, Y, N, N, N],
    ),
    (
        Kind::ProxyDeliver,
        "proxy deliver",
        Transports::Quic,
        [N, N, N, Y, O, N, N],
    ),
    (
        Kind::ProxyAnswer,
        "proxy answer",
        Transports::Quic,
        [N, N, N, Y, O, N, N],
    ),
    // A native node's link: its own domains only, to a control node.
    (Kind::Sync, "sync", Transports::Tcp, [N, N, N, N, N, O, N]),
];

/// The row of a kind.
pub fn row(kind: Kind) -> &'static Row {
    TABLE
        .iter()
        .find(|r| r.0 == kind)
        .expect("every kind has a row (tested)")
}

/// What the matrix says about `kind` sent by `who` over `via`.
pub fn decide(kind: Kind, who: Identity, via: Via) -> Decision {
    let (_, _, transports, cells) = row(kind);
    if !transports.admits(via) {
        return Decision::Deny;
    }
    cells[who.column()]
}

/// The resource a refusal names (what `permission denied` says was
/// missing).
pub fn resource(kind: Kind) -> String {
    format!("/{}", row(kind).1.replace(' ', "/"))
}

/// The row of an API call.
pub fn api_kind(call: &ApiRequest) -> Kind {
    match call {
        ApiRequest::Status => Kind::ApiStatus,
        ApiRequest::Nodes => Kind::ApiNodes,
        ApiRequest::NodeRemove { .. } => Kind::ApiNodeRemove,
        ApiRequest::NodeLabel { .. } => Kind::ApiNodeLabel,
        ApiRequest::TokenCreate { .. } => Kind::ApiTokenCreate,
        ApiRequest::TokenList => Kind::ApiTokenList,
        ApiRequest::TokenRevoke { .. } => Kind::ApiTokenRevoke,
        ApiRequest::UserAdd { .. } => Kind::ApiUserAdd,
        ApiRequest::UserList => Kind::ApiUserList,
        ApiRequest::Grant(_) => Kind::ApiGrant,
        ApiRequest::Grants { .. } => Kind::ApiGrants,
        ApiRequest::RevokeGrant { .. } => Kind::ApiRevokeGrant,
        ApiRequest::RevokeSubject(_) => Kind::ApiRevokeSubject,
        ApiRequest::KvPut { .. } => Kind::ApiKvPut,
        ApiRequest::KvGet { .. } => Kind::ApiKvGet,
        ApiRequest::Heartbeat(_) => Kind::ApiHeartbeat,
        ApiRequest::Renew { .. } => Kind::ApiRenew,
        ApiRequest::VendorAdd { .. } => Kind::ApiVendorAdd,
        ApiRequest::VendorRemove { .. } => Kind::ApiVendorRemove,
        ApiRequest::Vendors => Kind::ApiVendors,
        ApiRequest::ImagePush { .. } => Kind::ApiImagePush,
        ApiRequest::Images => Kind::ApiImages,
        ApiRequest::Run(_) => Kind::ApiRun,
        ApiRequest::Ps => Kind::ApiPs,
        ApiRequest::Logs { .. } => Kind::ApiLogs,
        ApiRequest::Stop { .. } => Kind::ApiStop,
        ApiRequest::Call { .. } => Kind::ApiCall,
    }
}

fn node_kind(call: &NodeCall, proxy: bool) -> Kind {
    match (call, proxy) {
        (NodeCall::Stats, false) => Kind::NodeStats,
        (NodeCall::Logs { .. }, false) => Kind::NodeLogs,
        (NodeCall::Call { .. }, false) => Kind::NodeCall,
        (NodeCall::WaitStarted { .. }, false) => Kind::NodeWaitStarted,
        (NodeCall::Deliver(_), false) => Kind::NodeDeliver,
        (NodeCall::Answer { .. }, false) => Kind::NodeAnswer,
        (NodeCall::Stats, true) => Kind::ProxyStats,
        (NodeCall::Logs { .. }, true) => Kind::ProxyLogs,
        (NodeCall::Call { .. }, true) => Kind::ProxyCall,
        (NodeCall::WaitStarted { .. }, true) => Kind::ProxyWaitStarted,
        (NodeCall::Deliver(_), true) => Kind::ProxyDeliver,
        (NodeCall::Answer { .. }, true) => Kind::ProxyAnswer,
    }
}

/// The row of a request.
pub fn kind(req: &Request) -> Kind {
    match req {
        Request::Join(_) => Kind::Join,
        Request::Api(call) => api_kind(call),
        Request::Forwarded { .. } => Kind::Forwarded,
        Request::Raft(RaftRpc::AppendEntries(_)) => Kind::RaftAppendEntries,
        Request::Raft(RaftRpc::Vote(_)) => Kind::RaftVote,
        Request::Raft(RaftRpc::InstallSnapshot(_)) => Kind::RaftInstallSnapshot,
        Request::Node(call) => node_kind(call, false),
        Request::Proxy { call, .. } => node_kind(call, true),
        Request::Sync(_) => Kind::Sync,
    }
}

/// What a peer's certificate says, as far as [`identify`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Who the certificate names.
    pub subject: Subject,
    /// Its serial (revocation by serial).
    pub serial: Vec<u8>,
    /// The role the CA attested, for node certificates that carry one.
    pub role: Option<Role>,
}

impl From<&CertInfo> for Peer {
    fn from(c: &CertInfo) -> Peer {
        Peer {
            subject: c.subject.clone(),
            serial: c.serial.clone(),
            role: c.role,
        }
    }
}

/// Who `peer` is, by the registry `reg` (`None`: no certificate).
///
/// A node the registry does not list is a control node only if its
/// certificate says so (a node that has just joined has not yet applied
/// the entries that admitted the others, and must still take the leader's
/// Raft traffic); any other unlisted node is treated as removed. When the
/// certificate's role and the registry disagree, the lesser one counts.
pub fn identify(reg: &Registry, peer: Option<&Peer>) -> Identity {
    let Some(peer) = peer else {
        return Identity::Anonymous;
    };
    if reg.revoked.subject_revoked(&peer.subject) || reg.revoked.serial_revoked(&peer.serial) {
        return Identity::Revoked;
    }
    match &peer.subject {
        Subject::User(_) if reg.admin.as_ref() == Some(&peer.subject) => Identity::Admin,
        Subject::User(_) => Identity::User,
        Subject::Node(id) => match reg.nodes.get(id) {
            Some(n) => match (n.role, n.kind, peer.role) {
                (Role::Control, NodeKind::Hosted, None | Some(Role::Control)) => Identity::Control,
                (_, NodeKind::Native, _) => Identity::Native,
                _ => Identity::Worker,
            },
            None if peer.role == Some(Role::Control) && !removed(reg, *id) => Identity::Control,
            None => Identity::Revoked,
        },
    }
}

/// Whether node `id` was admitted once and is gone (ids are allocated in
/// order, so an id below the next one that is not listed was removed).
fn removed(reg: &Registry, id: metta_proto::NodeId) -> bool {
    !reg.cluster.is_empty() && id < reg.next_node_id
}

/// Checks that a Raft RPC from node `peer` speaks for itself: the vote it
/// carries (a leader's or a candidate's) names `peer`.
pub fn raft_claims(peer: metta_proto::NodeId, claimed: Option<metta_proto::NodeId>) -> bool {
    claimed == Some(peer)
}

/// Checks a worker's message between domains: it comes from a domain placed
/// on `peer`, goes to the domain placed on `here` (this node, or the native
/// node a proxied call is for) that serves the channel for that sender, and
/// asks for its answer to go back to `peer`. Returns why not.
pub fn envelope_claims(
    reg: &Registry,
    peer: metta_proto::NodeId,
    here: metta_proto::NodeId,
    env: &metta_proto::Envelope,
) -> Result<(), String> {
    let from = reg
        .domains
        .get(&env.from)
        .ok_or_else(|| format!("no domain {:?}", env.from))?;
    if from.node != peer {
        return Err(format!("domain {} is not placed on node/{peer}", env.from));
    }
    if !may_send(&from.caps, &env.channel) {
        return Err(format!("domain {} may not open {}", env.from, env.channel));
    }
    match reg.route(&env.from, &env.channel) {
        Some(to) if to.name == env.to && to.node == here => {}
        Some(to) if to.name == env.to => {
            return Err(format!(
                "{} is placed on node/{}, not node/{here}",
                env.to, to.node
            ))
        }
        _ => {
            return Err(format!(
                "{} is not the domain serving {} for {}",
                env.to, env.channel, env.from
            ))
        }
    }
    if let Some(r) = env.reply {
        if r.node != peer {
            return Err(format!(
                "its answer would go to node/{} instead of the sender node/{peer}",
                r.node
            ));
        }
    }
    Ok(())
}

/// Whether a domain with `caps` may open `channel` (what the nucleus checks
/// on an honest node, checked again for what a peer says its domain sent).
pub fn may_send(caps: &metta_proto::CapSet, channel: &str) -> bool {
    caps.channels
        .iter()
        .any(|p| metta_proto::grant::resource_covers(p, channel))
}

/// The matrix as the Markdown table `docs/ARCHITECTURE.md` shows.
pub fn matrix_markdown() -> String {
    let mut s = String::from("| request | over |");
    for i in Identity::ALL {
        s.push_str(&format!(" {} |", i.name()));
    }
    s.push_str("\n|---|---|");
    for _ in Identity::ALL {
        s.push_str("---|");
    }
    s.push('\n');
    for (_, name, via, cells) in TABLE {
        s.push_str(&format!("| {name} | {} |", via.name()));
        for c in cells {
            s.push_str(&format!(" {} |", c.cell()));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_exactly_one_row_and_a_unique_name() {
        let mut kinds = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for (k, name, _, _) in TABLE {
            assert!(kinds.insert(*k), "{k:?} has two rows");
            assert!(names.insert(*name), "{name} names two rows");
        }
        // `kind` is an exhaustive match over the request types, so every
        // request maps to some Kind; each of those must have its row.
        assert_eq!(kinds.len(), TABLE.len());
        assert_eq!(TABLE.len(), 45);
    }

    #[test]
    fn the_document_shows_the_matrix_the_code_enforces() {
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/ARCHITECTURE.md"
        ))
        .expect("docs/ARCHITECTURE.md");
        let begin = "<!-- authz-matrix:begin (generated by control/src/authz.rs) -->\n";
        let end = "<!-- authz-matrix:end -->";
        let start = doc.find(begin).expect("the matrix's begin marker") + begin.len();
        let stop = doc[start..].find(end).expect("the matrix's end marker") + start;
        let shown = &doc[start..stop];
        assert_eq!(
            shown,
            matrix_markdown(),
            "docs/ARCHITECTURE.md's matrix differs from authz::TABLE; paste the output of matrix_markdown()"
        );
    }

    #[test]
    fn nothing_is_open_to_revoked_identities_and_anonymous_peers_only_join() {
        for (k, _, _, cells) in TABLE {
            assert_eq!(cells[Identity::Revoked.column()], Decision::Deny, "{k:?}");
            let anon = cells[Identity::Anonymous.column()];
            assert_eq!(anon == Decision::Allow, *k == Kind::Join, "{k:?}");
        }
    }

    #[test]
    fn workers_never_speak_raft_relay_calls_or_ask_about_domains() {
        for who in [Identity::Worker, Identity::Native] {
            for k in [
                Kind::Forwarded,
                Kind::RaftAppendEntries,
                Kind::RaftVote,
                Kind::RaftInstallSnapshot,
                Kind::NodeLogs,
                Kind::NodeCall,
                Kind::ProxyCall,
                Kind::ApiTokenCreate,
                Kind::ApiStop,
            ] {
                for via in [Via::Quic, Via::Tcp] {
                    assert_eq!(decide(k, who, via), Decision::Deny, "{k:?} {who:?} {via:?}");
                }
            }
        }
        assert_eq!(
            decide(Kind::Forwarded, Identity::Control, Via::Quic),
            Decision::Relay
        );
        assert_eq!(
            decide(Kind::Forwarded, Identity::Control, Via::Tcp),
            Decision::Deny
        );
        assert_eq!(
            decide(Kind::Sync, Identity::Native, Via::Quic),
            Decision::Deny
        );
    }

    #[test]
    fn every_request_maps_to_its_row() {
        use metta_proto::{Envelope, NodeSync};
        let env = Envelope {
            from: "a".into(),
            to: "b".into(),
            channel: "/c".into(),
            payload: vec![],
            reply: None,
        };
        let cases = [
            (Request::Raft(RaftRpc::Vote(vec![])), Kind::RaftVote),
            (
                Request::Proxy {
                    node: 3,
                    call: NodeCall::Deliver(vec![env.clone()]),
                },
                Kind::ProxyDeliver,
            ),
            (
                Request::Node(NodeCall::Deliver(vec![env])),
                Kind::NodeDeliver,
            ),
            (Request::Sync(NodeSync::default()), Kind::Sync),
            (Request::Api(ApiRequest::Ps), Kind::ApiPs),
        ];
        for (req, k) in cases {
            assert_eq!(kind(&req), k);
        }
        assert_eq!(resource(Kind::RaftVote), "/raft/vote");
        assert_eq!(resource(Kind::ApiTokenCreate), "/api/token/create");
    }
}
