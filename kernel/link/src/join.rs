//! Joining the cluster and staying alive in it: the requests a native node
//! sends and what it makes of the answers.
//!
//! 1. [`join_request`]: the token's credential, a CSR for the node key, the
//!    node's name, address, [`NodeKind::Native`] and hardware;
//! 2. [`interpret_join`]: the answer must be `Reply::Joined` with the CA the
//!    token pins, a certificate for *our* key naming `node/<id>` of that
//!    cluster and chaining to that CA; the result ([`Joined`]) holds what a
//!    member session needs ([`Joined::link_config`]);
//! 3. [`heartbeat_request`] / [`interpret_ack`]: periodic liveness reports
//!    over a member session (a native node sends them inside its
//!    `Request::Sync`, whose answer its driver interprets);
//! 4. [`renew_request`] / [`interpret_renew`]: a fresh certificate for the
//!    same key before the current one expires, checked like the join's.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use metta_proto::ids::check_name;
use metta_proto::{
    ApiError, ApiRequest, Heartbeat, JoinRequest, NodeId, NodeKind, NodeResources, Reply, Request,
    Response, Role, Subject,
};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::RootCertStore;

use crate::cert::{ca_cluster, parse_leaf, pem_cert_to_der, CertProblem};
use crate::key::{KeyError, NodeKey};
use crate::provider::ALGORITHMS;
use crate::session::{ClientIdentity, LinkConfig};
use crate::token::JoinToken;
use crate::verify::webpki_problem;

/// Why a join could not be requested or its answer is unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JoinError {
    /// The node name breaks the naming rules.
    InvalidName(String),
    /// The CSR could not be made.
    Key(KeyError),
    /// The cluster refused (a bad or used-up token, ...).
    Refused(ApiError),
    /// The answer is not a join answer.
    UnexpectedReply,
    /// The CA in the answer is not the one the token pins.
    PinMismatch,
    /// The CA or node certificate in the answer is unusable.
    Certificate(CertProblem),
    /// The certificate is not for our key.
    KeyMismatch,
    /// The certificate does not name the node id / cluster the answer gives.
    WrongIdentity {
        /// What the answer said.
        expected: Subject,
        /// What the certificate names.
        found: Subject,
    },
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinError::InvalidName(m) => f.write_str(m),
            JoinError::Key(e) => write!(f, "cannot make the certificate request: {e}"),
            JoinError::Refused(e) => write!(f, "the cluster refused the join: {e}"),
            JoinError::UnexpectedReply => {
                f.write_str("the cluster answered something other than a join result")
            }
            JoinError::PinMismatch => f.write_str(
                "the cluster's CA does not match the token's pin: refusing to join an impostor",
            ),
            JoinError::Certificate(p) => write!(f, "unusable certificate in the join answer: {p}"),
            JoinError::KeyMismatch => {
                f.write_str("the issued certificate is not for this node's key")
            }
            JoinError::WrongIdentity { expected, found } => write!(
                f,
                "the issued certificate names {found}, but the answer says {expected}"
            ),
        }
    }
}

impl core::error::Error for JoinError {}

/// The common name of the CSR a joining node sends. The CA ignores it and
/// certifies `node/<id>` of its own choosing.
pub const JOIN_CSR_CN: &str = "node/0";

/// Builds the join request: the token's credential (never the pin), a CSR
/// for `key`, the node's `name` (naming rules of `check_name`), the address
/// it is reached at (`host:port`) and its hardware.
pub fn join_request(
    token: &JoinToken,
    key: &NodeKey,
    name: &str,
    addr: &str,
    resources: NodeResources,
) -> Result<Request, JoinError> {
    check_name("node", name).map_err(|e| JoinError::InvalidName(e.0))?;
    let csr_pem = key.csr_pem(JOIN_CSR_CN).map_err(JoinError::Key)?;
    Ok(Request::Join(JoinRequest {
        token: token.credential(),
        csr_pem,
        name: name.to_string(),
        addr: addr.to_string(),
        kind: NodeKind::Native,
        resources,
    }))
}

/// A successful join, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The node's id.
    pub node_id: NodeId,
    /// The cluster name.
    pub cluster: String,
    /// The role the token granted.
    pub role: Role,
    /// The node certificate (DER).
    pub cert_der: Vec<u8>,
    /// Its expiry (unix seconds): what heartbeats report.
    pub cert_not_after: u64,
    /// The cluster CA certificate (DER).
    pub ca_der: Vec<u8>,
    /// Members: id and address.
    pub members: Vec<(NodeId, String)>,
}

impl Joined {
    /// The node's identity for member sessions: its certificate, then the
    /// CA's (the chain `mettad` presents too), and `key`.
    pub fn identity(&self, key: NodeKey) -> ClientIdentity {
        ClientIdentity {
            chain: alloc::vec![self.cert_der.clone(), self.ca_der.clone()],
            key,
        }
    }

    /// A member session config: servers of this cluster's CA, our identity.
    pub fn link_config(&self, key: NodeKey) -> LinkConfig {
        LinkConfig::member(self.ca_der.clone(), self.identity(key))
    }
}

/// Checks the answer to [`join_request`].
///
/// The answer arrived over a session pinned to the token's CA, but it is
/// checked on its own as well: the CA certificate must have the token's pin,
/// the node certificate must chain to it (at `now`), be for `key` and name
/// `node/<node_id>` of the answer's cluster. A CA key in the answer (sent to
/// control nodes) is dropped: a native node never signs certificates.
pub fn interpret_join(
    resp: Response,
    token: &JoinToken,
    key: &NodeKey,
    now: u64,
) -> Result<Joined, JoinError> {
    let r = match resp {
        Ok(Reply::Joined(r)) => r,
        Ok(_) => return Err(JoinError::UnexpectedReply),
        Err(e) => return Err(JoinError::Refused(e)),
    };
    let ca_der = pem_cert_to_der(&r.ca_cert_pem).map_err(JoinError::Certificate)?;
    if !token.pin.matches(&ca_der) {
        return Err(JoinError::PinMismatch);
    }
    let cluster = ca_cluster(&ca_der).map_err(JoinError::Certificate)?;
    let (cert_der, cert_not_after) = check_node_cert(
        &r.cert_pem,
        &ca_der,
        &cluster,
        (r.node_id, &r.cluster),
        key,
        now,
    )?;
    Ok(Joined {
        node_id: r.node_id,
        cluster,
        role: r.role,
        cert_der,
        cert_not_after,
        ca_der,
        members: r.members,
    })
}

/// Checks a node certificate (PEM) the cluster issued: it must name
/// `node/<node_id>` of `cluster` (the CA's, which the answer must name
/// too: `answer`), be for `key` and chain to the CA `ca_der` at `now` (the
/// check webpki does for servers: Metta certificates carry both serverAuth
/// and clientAuth). Returns its DER and expiry.
fn check_node_cert(
    cert_pem: &str,
    ca_der: &[u8],
    cluster: &str,
    answer: (NodeId, &str),
    key: &NodeKey,
    now: u64,
) -> Result<(Vec<u8>, u64), JoinError> {
    let cert_der = pem_cert_to_der(cert_pem).map_err(JoinError::Certificate)?;
    let info = parse_leaf(&cert_der).map_err(JoinError::Certificate)?;
    let expected = Subject::Node(answer.0);
    if info.subject != expected || info.cluster != cluster || answer.1 != cluster {
        return Err(JoinError::WrongIdentity {
            expected,
            found: info.subject,
        });
    }
    if info.spki_der != key.spki_der() {
        return Err(JoinError::KeyMismatch);
    }
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_der.to_vec()))
        .map_err(|_| {
            JoinError::Certificate(CertProblem::InvalidCa("unusable as a trust anchor"))
        })?;
    let leaf = CertificateDer::from(cert_der.clone());
    let parsed = ParsedCertificate::try_from(&leaf)
        .map_err(|e| JoinError::Certificate(webpki_problem(&e)))?;
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        &[],
        UnixTime::since_unix_epoch(core::time::Duration::from_secs(now)),
        ALGORITHMS.all,
    )
    .map_err(|e| JoinError::Certificate(webpki_problem(&e)))?;
    Ok((cert_der, info.not_after))
}

/// A renewal: a CSR for the node's current key (the leader checks it is the
/// registered one and certifies `node/<id>` whatever the CSR asks for).
pub fn renew_request(key: &NodeKey) -> Result<Request, KeyError> {
    Ok(Request::Api(ApiRequest::Renew {
        csr_pem: key.csr_pem(JOIN_CSR_CN)?,
    }))
}

/// Checks the answer to [`renew_request`]: `Reply::Cert` with a certificate
/// checked as the join's is ([`interpret_join`]): for `key`, naming this
/// node of this cluster, chaining to its CA at `now`. Returns `joined` with
/// the new certificate.
pub fn interpret_renew(
    resp: Response,
    joined: &Joined,
    key: &NodeKey,
    now: u64,
) -> Result<Joined, JoinError> {
    let cert_pem = match resp {
        Ok(Reply::Cert { cert_pem, .. }) => cert_pem,
        Ok(_) => return Err(JoinError::UnexpectedReply),
        Err(e) => return Err(JoinError::Refused(e)),
    };
    let (cert_der, cert_not_after) = check_node_cert(
        &cert_pem,
        &joined.ca_der,
        &joined.cluster,
        (joined.node_id, &joined.cluster),
        key,
        now,
    )?;
    Ok(Joined {
        cert_der,
        cert_not_after,
        ..joined.clone()
    })
}

/// A heartbeat: current hardware, the expiry of the certificate in use, the
/// node's address.
pub fn heartbeat_request(resources: NodeResources, cert_not_after: u64, addr: &str) -> Request {
    Request::Api(ApiRequest::Heartbeat(Heartbeat {
        resources,
        cert_not_after,
        addr: addr.to_string(),
    }))
}

/// Why a heartbeat was not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AckError {
    /// The cluster answered with an error (e.g. the node was removed).
    Refused(ApiError),
    /// The answer is not an acknowledgement.
    UnexpectedReply,
}

impl fmt::Display for AckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AckError::Refused(e) => write!(f, "the cluster refused the heartbeat: {e}"),
            AckError::UnexpectedReply => {
                f.write_str("the cluster answered the heartbeat with something other than Done")
            }
        }
    }
}

impl core::error::Error for AckError {}

/// Checks the answer to a heartbeat (`Reply::Done`).
pub fn interpret_ack(resp: Response) -> Result<(), AckError> {
    match resp {
        Ok(Reply::Done) => Ok(()),
        Ok(_) => Err(AckError::UnexpectedReply),
        Err(e) => Err(AckError::Refused(e)),
    }
}
