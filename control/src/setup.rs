//! Creating a cluster (`mettactl init`) and joining one (`mettactl join`):
//! everything that happens before a node's `mettad` first starts.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Instant;

use metta_proto::{ApiError, JoinRequest, NodeKind, Reply, Request, Role, Subject};
use metta_trust::{CaPin, ClusterCa, JoinToken, NodeKey};

use crate::clock;
use crate::config::{write_atomic, ClientConfig, ConfigError, DataDir, NodeConfig};
use crate::node::{local_resources, USER_CERT_LIFETIME};
use crate::registry::{Admission, Command, UserRecord};
use crate::transport::{self, CallError, ServerTrust, Transport};

/// Validity of a new cluster CA (10 years).
pub const CA_VALIDITY: u64 = 10 * 365 * 24 * 3600;
/// Default node certificate lifetime (24 h).
pub const DEFAULT_CERT_LIFETIME: u64 = 24 * 3600;

/// Setup failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// Config files.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory already holds a node.
    #[error("{0} already holds a configured node (node.toml); use another --data-dir")]
    AlreadyConfigured(PathBuf),
    /// Bad argument.
    #[error("{0}")]
    Invalid(String),
    /// Key, CA or certificate failure.
    #[error("credentials: {0}")]
    Credentials(String),
    /// The cluster could not be reached or refused.
    #[error(transparent)]
    Call(#[from] CallError),
    /// The cluster answered with a CA that does not match the token's pin.
    #[error("the cluster's CA does not match the token's pin: refusing to join an impostor")]
    PinMismatch,
}

fn cred(e: impl std::fmt::Display) -> SetupError {
    SetupError::Credentials(e.to_string())
}

/// What `init` needs.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Cluster name.
    pub cluster: String,
    /// The first node's data directory.
    pub data_dir: PathBuf,
    /// Address to listen on.
    pub listen: String,
    /// Address others reach it at (defaults to `listen`).
    pub advertise: Option<String>,
    /// The first node's name.
    pub name: String,
    /// Where to write the admin client config.
    pub admin_config: PathBuf,
    /// Overwrite an existing admin config.
    pub force: bool,
    /// Node certificate lifetime in seconds.
    pub cert_lifetime_secs: u64,
}

/// Creates the CA, the first node and the admin credentials.
pub fn init(o: &InitOptions) -> Result<NodeConfig, SetupError> {
    metta_proto::ids::check_name("cluster", &o.cluster)
        .map_err(|e| SetupError::Invalid(e.to_string()))?;
    metta_proto::ids::check_name("node", &o.name)
        .map_err(|e| SetupError::Invalid(e.to_string()))?;
    check_addr(&o.listen)?;
    let advertise = o.advertise.clone().unwrap_or_else(|| o.listen.clone());
    check_addr(&advertise)?;
    check_lifetime(o.cert_lifetime_secs)?;
    let dir = DataDir(o.data_dir.clone());
    if dir.is_configured() {
        return Err(SetupError::AlreadyConfigured(o.data_dir.clone()));
    }
    if o.admin_config.exists() && !o.force {
        return Err(ConfigError::Exists(o.admin_config.clone()).into());
    }
    let now = clock::now();
    let ca = ClusterCa::create(&o.cluster, now, CA_VALIDITY).map_err(cred)?;

    let node_key = NodeKey::generate().map_err(cred)?;
    let node_csr = metta_trust::make_csr(&node_key, &Subject::Node(1), &o.cluster).map_err(cred)?;
    let node_cert = ca
        .issue_node(
            &node_csr,
            1,
            metta_proto::Role::Control,
            now,
            o.cert_lifetime_secs,
            rand::random(),
        )
        .map_err(cred)?;

    let admin_key = NodeKey::generate().map_err(cred)?;
    let admin = Subject::User("admin".into());
    let admin_csr = metta_trust::make_csr(&admin_key, &admin, &o.cluster).map_err(cred)?;
    let admin_cert = ca
        .issue(&admin_csr, &admin, now, USER_CERT_LIFETIME, rand::random())
        .map_err(cred)?;

    let cfg = NodeConfig {
        cluster: o.cluster.clone(),
        node_id: 1,
        name: o.name.clone(),
        role: Role::Control,
        listen: o.listen.clone(),
        listen_tcp: None,
        advertise: advertise.clone(),
        cert_lifetime_secs: o.cert_lifetime_secs,
        seeds: vec![],
    };
    let bootstrap = Command::Bootstrap {
        cluster: o.cluster.clone(),
        ca_cert_pem: ca.cert_pem().to_string(),
        admin: UserRecord {
            name: "admin".into(),
            spki_der: admin_key.public_key_der(),
            cert_not_after: admin_cert.not_after,
        },
        node: Admission {
            name: o.name.clone(),
            kind: NodeKind::Hosted,
            addr: advertise.clone(),
            resources: local_resources(),
            spki_der: node_key.public_key_der(),
        },
        node_cert_not_after: node_cert.not_after,
        now,
    };
    write_atomic(&dir.ca_cert(), ca.cert_pem().as_bytes(), 0o644)?;
    write_atomic(&dir.ca_key(), ca.key_pem().as_bytes(), 0o600)?;
    write_atomic(&dir.node_key(), node_key.to_pem().as_bytes(), 0o600)?;
    write_atomic(&dir.node_cert(), node_cert.pem.as_bytes(), 0o644)?;
    write_atomic(
        &dir.bootstrap(),
        serde_json::to_string(&bootstrap)
            .map_err(|e| SetupError::Invalid(e.to_string()))?
            .as_bytes(),
        0o600,
    )?;
    dir.save_config(&cfg)?;
    ClientConfig {
        cluster: o.cluster.clone(),
        subject: admin.to_string(),
        endpoints: vec![advertise],
        ca_pem: ca.cert_pem().to_string(),
        cert_pem: admin_cert.pem,
        key_pem: admin_key.to_pem(),
    }
    .save(&o.admin_config, o.force)?;
    Ok(cfg)
}

/// Node certificates renew at two thirds of their lifetime; below a few seconds
/// that cannot keep up with a round trip to the leader.
fn check_lifetime(secs: u64) -> Result<(), SetupError> {
    if !(5..=CA_VALIDITY).contains(&secs) {
        return Err(SetupError::Invalid(
            "certificate lifetime must be between 5 s and 10 years".into(),
        ));
    }
    Ok(())
}

fn check_addr(a: &str) -> Result<(), SetupError> {
    a.parse::<std::net::SocketAddr>()
        .map(|_| ())
        .map_err(|_| SetupError::Invalid(format!("address {a:?} is not ip:port")))
}

/// What `join` needs.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// Any member's address.
    pub addr: String,
    /// The token text.
    pub token: String,
    /// This node's data directory.
    pub data_dir: PathBuf,
    /// Address to listen on.
    pub listen: String,
    /// Address others reach it at (defaults to `listen`).
    pub advertise: Option<String>,
    /// Node name.
    pub name: String,
    /// Node certificate lifetime in seconds.
    pub cert_lifetime_secs: u64,
}

/// The outcome of a join.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The node's config as written.
    pub config: NodeConfig,
    /// Time from sending the token to the certificate being on disk.
    pub elapsed: std::time::Duration,
}

/// Joins a cluster: key, CSR + token over QUIC to a pinned-CA server, then the
/// data directory. The node is not started.
pub async fn join(o: &JoinOptions) -> Result<Joined, SetupError> {
    let token =
        JoinToken::from_str(o.token.trim()).map_err(|e| SetupError::Invalid(e.to_string()))?;
    metta_proto::ids::check_name("node", &o.name)
        .map_err(|e| SetupError::Invalid(e.to_string()))?;
    check_addr(&o.listen)?;
    check_lifetime(o.cert_lifetime_secs)?;
    let advertise = o.advertise.clone().unwrap_or_else(|| o.listen.clone());
    check_addr(&advertise)?;
    let dir = DataDir(o.data_dir.clone());
    if dir.is_configured() {
        return Err(SetupError::AlreadyConfigured(o.data_dir.clone()));
    }
    let key = NodeKey::generate().map_err(cred)?;
    // The CSR's subject is a placeholder: the cluster assigns the id.
    let csr = metta_trust::make_csr(&key, &Subject::Node(0), "join").map_err(cred)?;
    let client = transport::client_config(None, &ServerTrust::Pinned(token.pin)).map_err(cred)?;
    let t = Transport::client(client).map_err(cred)?;
    let start = Instant::now();
    let reply = t
        .call_api(
            &o.addr,
            &Request::Join(JoinRequest {
                token: token.credential(),
                csr_pem: csr,
                name: o.name.clone(),
                addr: advertise.clone(),
                kind: NodeKind::Hosted,
                resources: local_resources(),
            }),
        )
        .await;
    t.close();
    let resp = match reply? {
        Reply::Joined(r) => r,
        other => {
            return Err(SetupError::Call(CallError::Api(ApiError::Internal(
                format!("unexpected reply {other:?}"),
            ))))
        }
    };
    let ca_der = metta_trust::cert::pem_to_der(&resp.ca_cert_pem).map_err(cred)?;
    if CaPin::of_der(&ca_der) != token.pin {
        return Err(SetupError::PinMismatch);
    }
    let cfg = NodeConfig {
        cluster: resp.cluster.clone(),
        node_id: resp.node_id,
        name: o.name.clone(),
        role: resp.role,
        listen: o.listen.clone(),
        listen_tcp: None,
        advertise,
        cert_lifetime_secs: o.cert_lifetime_secs,
        seeds: std::iter::once(o.addr.clone())
            .chain(resp.members.iter().map(|m| m.1.clone()))
            .collect(),
    };
    write_atomic(&dir.ca_cert(), resp.ca_cert_pem.as_bytes(), 0o644)?;
    if let Some(k) = &resp.ca_key_pem {
        write_atomic(&dir.ca_key(), k.as_bytes(), 0o600)?;
    }
    write_atomic(&dir.node_key(), key.to_pem().as_bytes(), 0o600)?;
    write_atomic(&dir.node_cert(), resp.cert_pem.as_bytes(), 0o644)?;
    let elapsed = start.elapsed();
    dir.save_config(&cfg)?;
    Ok(Joined {
        config: cfg,
        elapsed,
    })
}
