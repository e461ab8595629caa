//! A running `mettad`: the Raft member, the QUIC server, the TLS/TCP server
//! for native nodes ([`crate::tcp`]), the API, and the background duties
//! (heartbeats, certificate renewal, membership reconciliation on the leader,
//! revocation enforcement).
//!
//! Both servers hand every request to [`Node::handle`] with the subject of
//! the peer's verified certificate, and register every live connection so
//! revocation and expiry cut QUIC and TCP peers alike. Native nodes are
//! registry members but never Raft members: they heartbeat (over TCP, to any
//! node; followers forward to the leader) and are listed with the resources
//! they report.
//!
//! This is the I/O driver. Decisions are made by pure code elsewhere:
//! [`crate::registry`] (state transitions), [`crate::policy`] (what a call
//! needs), `metta_trust` (tokens, certificates, grants).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use metta_proto::{
    ApiError, ApiRequest, ClusterStatus, Heartbeat, JoinRequest, JoinResponse, NodeId, NodeKind,
    NodeStatus, RaftRole, RaftRpc, Reply, Request, Response, Role, Subject, MAX_FRAME_LEN,
};
use metta_trust::{ClusterCa, JoinToken, NodeKey, RevocationList, TokenRecord, UnixTime};
use openraft::{BasicNode, ChangeMembers, ServerState};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::authz::{self, Decision, Identity, Peer, Via};
use crate::clock;
use crate::config::{DataDir, NodeConfig};
use crate::domains::Domains;
use crate::limits::{Attempts, SharedBudget};
use crate::native::NativeLinks;
use crate::network::{self, NetworkFactory};
use crate::policy::{requirement, Requirement};
use crate::raft_types::Raft;
use crate::registry::{Admission, Applied, Command, Registry, UserRecord};
use crate::store;
use crate::tcp;
use crate::transport::{
    self, read_frame, write_frame, CallError, Credentials, ReadError, ServerTrust, Transport,
};

/// How long without a heartbeat before a node counts as down.
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(3);
/// How often nodes send heartbeats.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(1000);
/// How often revocations and certificate expiry are enforced on live connections.
pub const ENFORCE_EVERY: Duration = Duration::from_millis(500);

/// How long a follower keeps trying to relay a call to a leader (across
/// elections) before answering "unavailable".
pub const FORWARD_WINDOW: Duration = Duration::from_secs(5);

/// Lifetime of user certificates issued by `user add` (one year).
pub const USER_CERT_LIFETIME: u64 = 365 * 24 * 3600;

/// The Raft timing used by every node.
pub fn raft_config(cluster: &str) -> openraft::Config {
    openraft::Config {
        cluster_name: cluster.to_string(),
        heartbeat_interval: 150,
        election_timeout_min: 750,
        election_timeout_max: 1500,
        max_payload_entries: 512,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(10_000),
        max_in_snapshot_log_to_keep: 1_000,
        ..Default::default()
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Configuration problem.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Key or certificate problem.
    #[error("credentials: {0}")]
    Credentials(String),
    /// Storage problem.
    #[error("storage: {0}")]
    Store(String),
    /// Network problem.
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    /// Raft problem.
    #[error("raft: {0}")]
    Raft(String),
}

/// A live incoming connection, for revocation and expiry enforcement.
struct Conn {
    subject: Option<Subject>,
    serial: Vec<u8>,
    not_after: UnixTime,
    closer: Closer,
}

/// How to cut a live connection.
enum Closer {
    Quic(quinn::Connection),
    /// Tells the TLS/TCP connection's task to close it (TCP has no close
    /// codes: the peer sees the connection end).
    Tcp(watch::Sender<bool>),
}

impl Conn {
    fn close(&self, code: u32, reason: &'static [u8]) {
        match &self.closer {
            Closer::Quic(c) => c.close(code.into(), reason),
            Closer::Tcp(tx) => {
                let _ = tx.send(true);
            }
        }
    }
}

/// Keys of the live-connection table (QUIC ids and TCP ids are separate spaces).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ConnKey {
    Quic(usize),
    Tcp(u64),
}

/// Resolves once `rx` holds `true`; never if its sender is gone first.
async fn raised(mut rx: watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// A running node.
pub struct Node {
    cfg: NodeConfig,
    dir: DataDir,
    raft: Raft,
    registry: Arc<RwLock<Registry>>,
    transport: Arc<Transport>,
    tcp: tcp::Listener,
    next_tcp_conn: AtomicU64,
    revoked: Arc<RwLock<RevocationList>>,
    key: NodeKey,
    ca: Option<ClusterCa>,
    ca_pem: String,
    ca_der: Vec<u8>,
    cert_not_after: AtomicU64,
    /// Start of the current certificate's validity: with its expiry, when
    /// to renew (the certificate's own lifetime, whatever this node's
    /// configuration says: a joined node's certificates are issued with the
    /// leader's lifetime).
    cert_not_before: AtomicU64,
    conns: Mutex<HashMap<ConnKey, Conn>>,
    heartbeats: Mutex<HashMap<NodeId, (Instant, Heartbeat)>>,
    shutdown: watch::Sender<bool>,
    writes: mpsc::UnboundedSender<PendingWrite>,
    domains: Arc<Domains>,
    /// The links of native nodes that sync with this node.
    native: Arc<NativeLinks>,
    /// Ticks after every applied registry entry.
    applied: watch::Receiver<u64>,
    /// Held while a domain is placed and committed, so two `run`s do not
    /// both take the last free share.
    place_lock: tokio::sync::Mutex<()>,
    /// QUIC handshakes in progress and anonymous QUIC connections.
    quic_budget: SharedBudget,
    /// Join and renewal attempts.
    attempts: Mutex<Attempts>,
    /// Per member identity: bytes of QUIC frames in progress
    /// ([`crate::limits::MEMBER_FRAME_BUDGET`]).
    frame_budgets: Mutex<HashMap<Subject, Arc<tokio::sync::Semaphore>>>,
    /// Per member identity and transport: connections held.
    members: Mutex<HashMap<(Subject, Via), usize>>,
}

/// What an incoming QUIC connection holds while it is served.
enum Held {
    Anonymous(#[allow(dead_code)] crate::limits::Place),
    Member(#[allow(dead_code)] MemberSlot),
}

/// A member's connection, counted per identity and transport while it
/// lives.
struct MemberSlot {
    node: Arc<Node>,
    key: (Subject, Via),
}

impl Drop for MemberSlot {
    fn drop(&mut self) {
        let mut m = self.node.members.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// Where a request came from: who the peer proved to be, over which
/// transport, from which address.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The peer's certificate (`None`: it presented none).
    pub peer: Option<Peer>,
    /// The transport.
    pub via: Via,
    /// Its address.
    pub remote: SocketAddr,
}

impl Caller {
    fn subject(&self) -> Option<&Subject> {
        self.peer.as_ref().map(|p| &p.subject)
    }
}

#[path = "node_domains.rs"]
mod domain_api;

/// A registry write waiting for the batcher, and where its result goes.
type PendingWrite = (Command, oneshot::Sender<Result<Applied, ApiError>>);

/// Most commands grouped into one Raft entry.
pub const MAX_BATCH: usize = 512;
/// Raft entries (batches) proposed but not yet committed at once.
pub const BATCHES_IN_FLIGHT: usize = 4;

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.cfg.node_id)
            .field("cluster", &self.cfg.cluster)
            .finish_non_exhaustive()
    }
}

fn read_pem(path: &std::path::Path) -> Result<String, StartError> {
    Ok(crate::config::read(path)?)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

impl Node {
    /// Opens the data directory and starts serving.
    pub async fn start(dir: DataDir) -> Result<Arc<Node>, StartError> {
        let cfg = dir.load_config()?;
        let key = NodeKey::from_pem(&read_pem(&dir.node_key())?)
            .map_err(|e| StartError::Credentials(e.to_string()))?;
        let cert_pem = read_pem(&dir.node_cert())?;
        let ca_pem = read_pem(&dir.ca_cert())?;
        let ca = if cfg.role == Role::Control && dir.ca_key().exists() {
            Some(
                ClusterCa::load(&ca_pem, &read_pem(&dir.ca_key())?)
                    .map_err(|e| StartError::Credentials(e.to_string()))?,
            )
        } else {
            None
        };
        let ca_der = metta_trust::cert::pem_to_der(&ca_pem)
            .map_err(|e| StartError::Credentials(format!("ca.pem: {e}")))?;
        let cert_info = metta_trust::parse_cert(
            &metta_trust::cert::pem_to_der(&cert_pem)
                .map_err(|e| StartError::Credentials(format!("node.pem: {e}")))?,
        )
        .map_err(|e| StartError::Credentials(format!("node.pem: {e}")))?;
        if cert_info.subject != Subject::Node(cfg.node_id) || cert_info.cluster != cfg.cluster {
            return Err(StartError::Credentials(format!(
                "node.pem names {} in cluster {}, but node.toml says node/{} in {}",
                cert_info.subject, cert_info.cluster, cfg.node_id, cfg.cluster
            )));
        }

        let (log_store, sm) =
            store::open(&dir.store()).map_err(|e| StartError::Store(e.to_string()))?;
        let registry = sm.registry();
        let applied = sm.subscribe();
        let revoked = Arc::new(RwLock::new(
            registry
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .revoked
                .clone(),
        ));

        let creds = Credentials::from_pem(&cert_pem, &ca_pem, &key)?;
        let server = transport::server_config(&creds, &ca_der, revoked.clone())?;
        let tcp_server = transport::tls_server_config(&creds, &ca_der, revoked.clone())?;
        let client = transport::client_config(
            Some(&creds),
            &ServerTrust::Cluster {
                ca_der: ca_der.clone(),
                revoked: revoked.clone(),
            },
        )?;
        let listen: SocketAddr = cfg.listen.parse().map_err(|e| {
            StartError::Credentials(format!("listen address {:?}: {e}", cfg.listen))
        })?;
        let transport = Transport::server(listen, server, client)?;
        let tcp_listen: SocketAddr = cfg.tcp_listen().parse().map_err(|e| {
            StartError::Credentials(format!("TCP listen address {:?}: {e}", cfg.tcp_listen()))
        })?;
        let tcp = tcp::Listener::bind(tcp_listen, tcp_server).await?;

        let raft_cfg = Arc::new(
            raft_config(&cfg.cluster)
                .validate()
                .map_err(|e| StartError::Raft(e.to_string()))?,
        );
        let raft = Raft::new(
            cfg.node_id,
            raft_cfg,
            NetworkFactory {
                transport: transport.clone(),
                registry: registry.clone(),
            },
            log_store,
            sm,
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;

        let native = Arc::new(NativeLinks::new(registry.clone()));
        let domains = Domains::start(
            cfg.node_id,
            registry.clone(),
            transport.clone(),
            native.clone(),
            applied.clone(),
        );
        domains.warm_up();
        let (shutdown, _) = watch::channel(false);
        let (writes, pending) = mpsc::unbounded_channel();
        let node = Arc::new(Node {
            cert_not_after: AtomicU64::new(cert_info.not_after),
            cert_not_before: AtomicU64::new(cert_info.not_before),
            cfg,
            dir,
            raft,
            registry,
            transport,
            tcp,
            next_tcp_conn: AtomicU64::new(0),
            revoked,
            key,
            ca,
            ca_pem,
            ca_der,
            conns: Mutex::new(HashMap::new()),
            heartbeats: Mutex::new(HashMap::new()),
            shutdown,
            writes,
            domains,
            native,
            applied: applied.clone(),
            place_lock: tokio::sync::Mutex::new(()),
            quic_budget: SharedBudget::default(),
            attempts: Mutex::new(Attempts::default()),
            frame_budgets: Mutex::new(HashMap::new()),
            members: Mutex::new(HashMap::new()),
        });

        node.maybe_initialize().await?;
        tokio::spawn(node.clone().accept_loop());
        tokio::spawn(node.clone().tcp_accept_loop());
        tokio::spawn(node.clone().enforce_loop(applied));
        tokio::spawn(node.clone().heartbeat_loop());
        tokio::spawn(node.clone().reconcile_loop());
        tokio::spawn(node.clone().renew_loop());
        tokio::spawn(node.clone().batch_loop(pending));
        let tcp_addr = node
            .tcp
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| node.cfg.tcp_listen().to_string());
        info!(
            node = node.cfg.node_id,
            cluster = %node.cfg.cluster,
            listen = %node.cfg.listen,
            tcp = %tcp_addr,
            "mettad serving"
        );
        Ok(node)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.cfg.node_id
    }

    /// The Raft handle.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Resolves once the node has stopped (shut down, or its identity revoked).
    pub async fn stopped(&self) {
        let mut rx = self.shutdown.subscribe();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Stops serving.
    pub async fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        self.domains.shutdown();
        self.transport.close();
        let _ = self.raft.shutdown().await;
    }

    /// A first start after `mettactl init`: make this node the single voter.
    async fn maybe_initialize(&self) -> Result<(), StartError> {
        let initialized = self
            .raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        if !initialized && self.dir.bootstrap().exists() {
            let mut members = BTreeMap::new();
            members.insert(
                self.cfg.node_id,
                BasicNode {
                    addr: self.cfg.advertise.clone(),
                },
            );
            self.raft
                .initialize(members)
                .await
                .map_err(|e| StartError::Raft(e.to_string()))?;
        }
        Ok(())
    }

    fn registry(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|e| e.into_inner())
    }

    fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())?;
        Some((id, addr))
    }

    fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.cfg.node_id)
            && self.raft.metrics().borrow().state == ServerState::Leader
    }

    // ---------------------------------------------------------------- serving

    async fn accept_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let incoming = tokio::select! {
                i = self.transport.endpoint().accept() => i,
                _ = shutdown.changed() => return,
            };
            let Some(incoming) = incoming else { return };
            let remote = incoming.remote_address();
            // Under load, a source must prove it receives at its address
            // (a Retry round trip) before it takes a handshake place, so
            // spoofed packets cannot fill them.
            if !incoming.remote_address_validated()
                && self.quic_budget.load().0 >= crate::limits::PENDING_MAX / 4
            {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
                continue;
            }
            let place = match self.quic_budget.handshake(remote.ip()) {
                Ok(p) => p,
                Err(busy) => {
                    debug!(%remote, "QUIC connection refused: {busy}");
                    incoming.refuse();
                    continue;
                }
            };
            let node = self.clone();
            tokio::spawn(async move {
                let conn =
                    match tokio::time::timeout(crate::limits::HANDSHAKE_TIMEOUT, incoming).await {
                        Ok(Ok(c)) => c,
                        Ok(Err(e)) => {
                            debug!(%remote, "handshake failed: {e}");
                            return;
                        }
                        Err(_) => {
                            debug!(%remote, "handshake timed out");
                            return;
                        }
                    };
                drop(place);
                node.serve_connection(conn, remote).await;
            });
        }
    }

    fn peer_of(conn: &quinn::Connection) -> Option<metta_trust::CertInfo> {
        let certs = conn
            .peer_identity()?
            .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
            .ok()?;
        metta_trust::parse_cert(certs.first()?.as_ref()).ok()
    }

    async fn serve_connection(self: Arc<Self>, conn: quinn::Connection, remote: SocketAddr) {
        let peer = Self::peer_of(&conn);
        // Anonymous peers (they may only join) take a place in the anonymous
        // budget and keep the small limits; members get room.
        let held = match &peer {
            None => match self.quic_budget.anonymous(remote.ip()) {
                Ok(p) => Held::Anonymous(p),
                Err(busy) => {
                    debug!(%remote, "anonymous QUIC connection refused: {busy}");
                    conn.close(transport::CLOSE_BUSY.into(), b"busy");
                    return;
                }
            },
            Some(p) => {
                let Some(slot) = self.member_slot(&p.subject, Via::Quic) else {
                    debug!(%remote, peer = %p.subject, "QUIC connection refused: too many from one identity");
                    conn.close(transport::CLOSE_BUSY.into(), b"busy: too many connections");
                    return;
                };
                transport::admit_member(&conn);
                Held::Member(slot)
            }
        };
        let anonymous = matches!(held, Held::Anonymous(_));
        let max_frame = if anonymous {
            crate::limits::ANONYMOUS_MAX_FRAME
        } else {
            MAX_FRAME_LEN
        };
        // One identity's frames in progress, over all its connections.
        let budget = peer.as_ref().map(|p| {
            self.frame_budgets
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(p.subject.clone())
                .or_insert_with(|| {
                    Arc::new(tokio::sync::Semaphore::new(
                        crate::limits::MEMBER_FRAME_BUDGET,
                    ))
                })
                .clone()
        });
        let lifetime = async {
            if anonymous {
                tokio::time::sleep(crate::limits::ANONYMOUS_LIFETIME).await
            } else {
                std::future::pending().await
            }
        };
        tokio::pin!(lifetime);
        let key = ConnKey::Quic(conn.stable_id());
        self.register_conn(key, peer.as_ref(), Closer::Quic(conn.clone()));
        let caller = Caller {
            peer: peer.as_ref().map(Peer::from),
            via: Via::Quic,
            remote,
        };
        loop {
            let (mut send, mut recv) = tokio::select! {
                s = conn.accept_bi() => match s {
                    Ok(s) => s,
                    Err(_) => break,
                },
                _ = &mut lifetime => {
                    conn.close(transport::CLOSE_BUSY.into(), b"anonymous connection lifetime");
                    break;
                }
            };
            let node = self.clone();
            let caller = caller.clone();
            let budget = budget.clone();
            tokio::spawn(async move {
                let read = read_frame::<Request>(&mut recv, max_frame, budget.as_ref()).await;
                let response: Response = match read {
                    // The budget is held until the request is handled.
                    Ok((req, held)) => {
                        let r = node.handle(&caller, req).await;
                        drop(held);
                        r
                    }
                    Err(ReadError::Frame(e)) => {
                        Err(ApiError::InvalidArgument(format!("bad frame: {e}")))
                    }
                    Err(ReadError::Io(_)) => return,
                };
                let _ = write_frame(&mut send, &response).await;
            });
        }
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        drop(held);
    }

    fn register_conn(&self, key: ConnKey, peer: Option<&metta_trust::CertInfo>, closer: Closer) {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).insert(
            key,
            Conn {
                subject: peer.map(|p| p.subject.clone()),
                serial: peer.map(|p| p.serial.clone()).unwrap_or_default(),
                not_after: peer.map(|p| p.not_after).unwrap_or(u64::MAX),
                closer,
            },
        );
    }

    /// Accepts TLS/TCP connections (native nodes) until shutdown.
    async fn tcp_accept_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let incoming = tokio::select! {
                i = self.tcp.accept() => i,
                _ = shutdown.changed() => return,
            };
            match incoming {
                Ok(incoming) => {
                    tokio::spawn(self.clone().serve_tcp(incoming));
                }
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    warn!("TCP accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// One TLS/TCP connection: handshake, then one request at a time to
    /// [`handle`](Self::handle), until the peer leaves, a limit is hit, the
    /// node shuts down, or the peer's identity is revoked or expires.
    async fn serve_tcp(self: Arc<Self>, incoming: tcp::Incoming) {
        let remote = incoming.remote();
        let conn = match incoming.handshake().await {
            Ok(c) => c,
            Err(e) => {
                debug!(%remote, "TLS/TCP handshake failed: {e}");
                return;
            }
        };
        let peer = conn.peer().cloned();
        let _member = match &peer {
            Some(p) => match self.member_slot(&p.subject, Via::Tcp) {
                Some(m) => Some(m),
                None => {
                    debug!(%remote, peer = %p.subject, "TLS/TCP connection refused: too many from one identity");
                    return;
                }
            },
            None => None,
        };
        let key = ConnKey::Tcp(self.next_tcp_conn.fetch_add(1, Ordering::Relaxed));
        let (close, closed) = watch::channel(false);
        self.register_conn(key, peer.as_ref(), Closer::Tcp(close));
        let subject = peer.as_ref().map(|p| p.subject.clone());
        debug!(%remote, peer = ?subject, "TLS/TCP connection");
        let node = self.clone();
        let caller = Caller {
            peer: peer.as_ref().map(Peer::from),
            via: Via::Tcp,
            remote,
        };
        // What TCP may carry (no Raft, relaying or proxying: native nodes
        // speak only for themselves) is the matrix's Transports column.
        let handler = move |req: Request| {
            let node = node.clone();
            let caller = caller.clone();
            async move { node.handle(&caller, req).await }
        };
        let stop = {
            let shutdown = self.shutdown.subscribe();
            async move {
                tokio::select! {
                    _ = raised(closed) => {},
                    _ = raised(shutdown) => {},
                }
            }
        };
        let ended = conn.serve(tcp::Limits::default(), handler, stop).await;
        debug!(%remote, peer = ?subject, "TLS/TCP connection ended: {ended}");
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }

    /// A place among `subject`'s connections over `via`, given back on
    /// drop (`None`: it holds [`crate::limits::MEMBER_TCP_PER_SUBJECT`] or
    /// [`crate::limits::MEMBER_QUIC_PER_SUBJECT`] already).
    fn member_slot(self: &Arc<Self>, subject: &Subject, via: Via) -> Option<MemberSlot> {
        let cap = match via {
            Via::Tcp => crate::limits::MEMBER_TCP_PER_SUBJECT,
            Via::Quic => crate::limits::MEMBER_QUIC_PER_SUBJECT,
        };
        let key = (subject.clone(), via);
        let mut m = self.members.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(MemberSlot {
            node: self.clone(),
            key,
        })
    }

    /// Handles one request from `caller`: first the authorization matrix
    /// ([`authz`]) for who the caller is, what it sends and over which
    /// transport — a refusal changes nothing and reads nothing — then the
    /// claims the message makes about identities, then the request.
    pub async fn handle(self: &Arc<Self>, caller: &Caller, req: Request) -> Response {
        let kind = authz::kind(&req);
        let who = authz::identify(&self.registry(), caller.peer.as_ref());
        let decision = authz::decide(kind, who, caller.via);
        if decision == Decision::Deny {
            return Err(self.denied(caller, who, kind, caller.subject()));
        }
        let node_id = match caller.subject() {
            Some(Subject::Node(id)) => Some(*id),
            _ => None,
        };
        match req {
            Request::Join(j) => {
                // The token id as parsed (8 hex digits), never the raw text:
                // it keys the rate limit and goes into the log.
                let token_id = metta_trust::token::parse_credential(&j.token)
                    .map_or_else(|_| "malformed".to_string(), |(id, _)| id);
                // Relayed joins were limited where they arrived.
                if who != Identity::Control {
                    self.limit_join(caller, &token_id)?;
                }
                let source = caller.remote;
                let r = self.join(j).await;
                if let Err(e) = &r {
                    if matches!(e, ApiError::Token(_) | ApiError::InvalidArgument(_)) {
                        warn!(%source, token = %token_id, "join refused: {e}");
                    }
                    if matches!(e, ApiError::Token(_)) {
                        let mut a = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
                        let _ = a.join_token.take(&token_id, Instant::now());
                    }
                }
                r
            }
            Request::Api(call) => {
                let Some(subject) = caller.subject().cloned() else {
                    return Err(ApiError::Unauthenticated);
                };
                if let (ApiRequest::Renew { .. }, Some(id)) = (&call, node_id) {
                    self.limit_renew(caller, id)?;
                }
                let call = match call {
                    // A native node is reached through the control node
                    // holding its link: only its sync says which.
                    ApiRequest::Heartbeat(mut hb) if who == Identity::Native => {
                        hb.addr = node_id
                            .and_then(|id| self.registry().nodes.get(&id).map(|n| n.addr.clone()))
                            .unwrap_or_default();
                        ApiRequest::Heartbeat(hb)
                    }
                    call => call,
                };
                self.api(subject, call, true).await
            }
            Request::Forwarded { origin, call } => {
                // The relaying control node vouches for who made the call;
                // the matrix is applied again, to the origin.
                let origin_peer = Peer {
                    subject: origin.clone(),
                    serial: Vec::new(),
                    role: None,
                };
                let origin_who = authz::identify(&self.registry(), Some(&origin_peer));
                let origin_kind = authz::api_kind(&call);
                if authz::decide(origin_kind, origin_who, Via::Quic) == Decision::Deny {
                    return Err(self.denied(caller, origin_who, origin_kind, Some(&origin)));
                }
                self.api(origin, call, false).await
            }
            Request::Node(call) => {
                if decision == Decision::OwnClaims {
                    self.check_node_claims(caller, node_id, self.cfg.node_id, &call)?;
                }
                self.domains.serve(call).await
            }
            Request::Proxy { node, call } => {
                if decision == Decision::OwnClaims {
                    self.check_node_claims(caller, node_id, node, &call)?;
                }
                if !self.native.holds(node) {
                    return Err(ApiError::Unavailable(format!(
                        "native node/{node} has no link to node/{}",
                        self.cfg.node_id
                    )));
                }
                self.native.serve(node, call).await
            }
            Request::Sync(sync) => match node_id {
                Some(id) => self.native_sync(id, sync).await,
                None => Err(ApiError::Unauthenticated),
            },
            Request::Raft(rpc) => match node_id {
                Some(id) => self.raft_rpc(caller, id, rpc).await,
                None => Err(ApiError::Unauthenticated),
            },
        }
    }

    /// The refusal of `kind` by `who` (`subject`), logged with its source.
    fn denied(
        &self,
        caller: &Caller,
        who: Identity,
        kind: authz::Kind,
        subject: Option<&Subject>,
    ) -> ApiError {
        let resource = authz::resource(kind);
        match subject {
            None => {
                debug!(source = %caller.remote, %resource, "refused: anonymous");
                ApiError::Unauthenticated
            }
            Some(s) => {
                // Members are not expected to try what the matrix refuses.
                if matches!(who, Identity::Control | Identity::Worker | Identity::Native) {
                    warn!(source = %caller.remote, peer = %s, %resource, "refused by the authorization matrix");
                } else {
                    debug!(source = %caller.remote, peer = %s, %resource, "refused by the authorization matrix");
                }
                ApiError::PermissionDenied {
                    subject: s.clone(),
                    rights: metta_proto::Rights::ALL,
                    resource,
                }
            }
        }
    }

    /// A worker's message between domains, or answer to one, must be about
    /// its own domains ([`authz::envelope_claims`]); an answer must redeem a
    /// token this node minted for a message it sent to that worker.
    fn check_node_claims(
        &self,
        caller: &Caller,
        node_id: Option<NodeId>,
        here: NodeId,
        call: &metta_proto::NodeCall,
    ) -> Result<(), ApiError> {
        let Some(peer) = node_id else {
            return Err(ApiError::Unauthenticated);
        };
        let refuse = |why: String| {
            warn!(source = %caller.remote, peer = %Subject::Node(peer), "refused: {why}");
            ApiError::PermissionDenied {
                subject: Subject::Node(peer),
                rights: metta_proto::Rights::of(metta_proto::Right::Write),
                resource: format!("/domains ({why})"),
            }
        };
        match call {
            metta_proto::NodeCall::Deliver(envs) => {
                let reg = self.registry();
                for env in envs {
                    authz::envelope_claims(&reg, peer, here, env).map_err(&refuse)?;
                }
                Ok(())
            }
            metta_proto::NodeCall::Answer { token, lane, .. } => {
                if self.domains.answer_expected_from(here, *lane, *token, peer) {
                    Ok(())
                } else {
                    Err(refuse(format!(
                        "no message sent to node/{peer} awaits answer {lane}/{token}"
                    )))
                }
            }
            _ => Err(refuse("not a message between domains".into())),
        }
    }

    /// One join attempt from `caller` (per source address and token id).
    fn limit_join(&self, caller: &Caller, token_id: &str) -> Result<(), ApiError> {
        let now = Instant::now();
        let mut a = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        // Every attempt counts against its source; only failures against
        // the token (below), so a multi-use token admits machines at once.
        let limited = a
            .join_source
            .take(&crate::limits::source_of(caller.remote.ip()), now)
            .and_then(|()| a.join_token.check(&token_id.to_string(), now));
        limited.map_err(|l| {
            if l.first {
                warn!(source = %caller.remote, token = %token_id, "join attempts rate-limited");
            }
            ApiError::Unavailable(format!(
                "too many join attempts from {} or with token {token_id}; retry in {:.1} s",
                caller.remote.ip(),
                l.retry_after.as_secs_f64()
            ))
        })
    }

    /// One renewal attempt by node `id`.
    fn limit_renew(&self, caller: &Caller, id: NodeId) -> Result<(), ApiError> {
        let mut a = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        a.renew.take(&id, Instant::now()).map_err(|l| {
            if l.first {
                warn!(source = %caller.remote, node = id, "renewals rate-limited");
            }
            ApiError::Unavailable(format!(
                "too many renewals by node/{id}; retry in {:.1} s",
                l.retry_after.as_secs_f64()
            ))
        })
    }

    /// A Raft RPC from control node `peer`: the leader or candidate it
    /// names must be `peer` itself ([`authz::raft_claims`]).
    async fn raft_rpc(&self, caller: &Caller, peer: NodeId, rpc: RaftRpc) -> Response {
        fn enc<T: serde::Serialize>(v: &T) -> Response {
            network::encode(v).map(Reply::Raft).map_err(internal)
        }
        let bad = |e: postcard::Error| ApiError::InvalidArgument(format!("bad raft message: {e}"));
        let claims = |claimed: Option<NodeId>| {
            if authz::raft_claims(peer, claimed) {
                return Ok(());
            }
            warn!(source = %caller.remote, peer, ?claimed, "refused: a Raft message for another node");
            Err(ApiError::PermissionDenied {
                subject: Subject::Node(peer),
                rights: metta_proto::Rights::ALL,
                resource: "/raft (it names another node as leader or candidate)".into(),
            })
        };
        match rpc {
            RaftRpc::AppendEntries(b) => {
                let req: openraft::raft::AppendEntriesRequest<crate::raft_types::TypeConfig> =
                    network::decode(&b).map_err(bad)?;
                claims(req.vote.leader_id().voted_for())?;
                enc(&self.raft.append_entries(req).await)
            }
            RaftRpc::Vote(b) => {
                let req: openraft::raft::VoteRequest<NodeId> = network::decode(&b).map_err(bad)?;
                claims(req.vote.leader_id().voted_for())?;
                enc(&self.raft.vote(req).await)
            }
            RaftRpc::InstallSnapshot(b) => {
                let req: openraft::raft::InstallSnapshotRequest<crate::raft_types::TypeConfig> =
                    network::decode(&b).map_err(bad)?;
                claims(req.vote.leader_id().voted_for())?;
                enc(&self.raft.install_snapshot(req).await)
            }
        }
    }

    /// Relays `req` to the leader (used by followers).
    async fn to_leader(&self, req: Request) -> Response {
        let deadline = tokio::time::Instant::now() + FORWARD_WINDOW;
        let mut metrics = self.raft.metrics();
        loop {
            let leader = self.leader();
            let current = leader.as_ref().map(|l| l.0);
            let expect = Subject::Node(current.unwrap_or_default());
            let outcome = match &leader {
                Some((id, _)) if *id == self.cfg.node_id => {
                    return Err(ApiError::Unavailable(
                        "this node just became leader; retry".into(),
                    ))
                }
                Some((id, addr)) => tokio::select! {
                    r = self.transport.call_node(addr, &expect, &req) => Some(r.unwrap_or_else(|e| Err(
                        ApiError::Unavailable(format!("leader node/{id} at {addr} unreachable: {e}"))
                    ))),
                    _ = leader_changed(&mut metrics, current) => None,
                    _ = tokio::time::sleep_until(deadline) => Some(Err(ApiError::Unavailable(
                        format!("leader node/{id} did not answer within {FORWARD_WINDOW:?}")
                    ))),
                },
                None => tokio::select! {
                    _ = leader_changed(&mut metrics, None) => None,
                    _ = tokio::time::sleep_until(deadline) => Some(Err(ApiError::Unavailable(
                        "no leader elected; retry".into()
                    ))),
                },
            };
            match outcome {
                // A new leader while we waited: ask it instead.
                None => continue,
                Some(r) => return r,
            }
        }
    }

    /// Commits `cmd` to the registry (through the batcher) and returns what
    /// applying it produced; a refused command is an error.
    async fn write(&self, cmd: Command) -> Result<Applied, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.writes
            .send((cmd, tx))
            .map_err(|_| ApiError::Unavailable("node is shutting down".into()))?;
        rx.await
            .map_err(|_| ApiError::Unavailable("node is shutting down".into()))?
    }

    /// Group commit: writes that arrive while earlier ones are being
    /// replicated are proposed together as one [`Command::Batch`] entry — one
    /// log append and one fsync per node for the whole group, instead of one
    /// each (openraft appends client writes one entry at a time). Each command
    /// in a batch is applied, and may be refused, on its own.
    async fn batch_loop(self: Arc<Self>, mut pending: mpsc::UnboundedReceiver<PendingWrite>) {
        let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
        while let Some(first) = pending.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match pending.try_recv() {
                    Ok(w) => batch.push(w),
                    Err(_) => break,
                }
            }
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let node = self.clone();
            tokio::spawn(async move {
                let (cmds, replies): (Vec<Command>, Vec<_>) = batch.into_iter().unzip();
                let results = node.propose(cmds).await;
                drop(slot);
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            });
        }
    }

    /// Proposes `cmds` as one entry; one result per command.
    async fn propose(&self, mut cmds: Vec<Command>) -> Vec<Result<Applied, ApiError>> {
        let n = cmds.len();
        let entry = if n == 1 {
            cmds.pop().expect("one command")
        } else {
            Command::Batch(cmds)
        };
        let unbatch = |a: Applied| match a {
            Applied::Refused(e) => Err(e),
            ok => Ok(ok),
        };
        match self.raft.client_write(entry).await {
            Ok(resp) => match resp.data {
                Applied::Batch(results) if results.len() == n => {
                    results.into_iter().map(unbatch).collect()
                }
                single if n == 1 => vec![unbatch(single)],
                other => {
                    let e = internal(format!("batch of {n} applied as {other:?}"));
                    vec![Err(e); n]
                }
            },
            Err(e) => {
                let e = ApiError::Unavailable(format!("registry write failed: {e}"));
                vec![Err(e); n]
            }
        }
    }

    fn check(&self, subject: &Subject, call: &ApiRequest, now: UnixTime) -> Result<(), ApiError> {
        match requirement(subject, call) {
            Requirement::Authenticated => {
                if self.registry().revoked.subject_revoked(subject) {
                    return Err(ApiError::PermissionDenied {
                        subject: subject.clone(),
                        rights: metta_proto::Rights::NONE,
                        resource: "/".into(),
                    });
                }
                Ok(())
            }
            Requirement::NodeOnly => match subject {
                Subject::Node(id) if self.registry().nodes.contains_key(id) => Ok(()),
                _ => Err(ApiError::PermissionDenied {
                    subject: subject.clone(),
                    rights: metta_proto::Rights::ALL,
                    resource: "/nodes/self".into(),
                }),
            },
            Requirement::Right(rights, resource) => {
                self.registry().authorize(subject, rights, &resource, now)
            }
        }
    }

    /// An authenticated API call by `subject`.
    async fn api(
        self: &Arc<Self>,
        subject: Subject,
        call: ApiRequest,
        may_forward: bool,
    ) -> Response {
        let now = clock::now();
        if let ApiRequest::Status = call {
            return Ok(Reply::Status(self.status(subject)));
        }
        if !self.is_leader() {
            if !may_forward {
                return Err(ApiError::Unavailable("not the leader; retry".into()));
            }
            // Only control nodes are believed when they relay a call for
            // someone else (the matrix's `forwarded` row).
            if self.cfg.role != Role::Control {
                let leader = self
                    .leader()
                    .map(|(id, addr)| format!(" (the leader is node/{id} at {addr})"))
                    .unwrap_or_default();
                return Err(ApiError::Unavailable(format!(
                    "node/{} is a worker and does not relay calls: send them to a control node{leader}",
                    self.cfg.node_id
                )));
            }
            return self
                .to_leader(Request::Forwarded {
                    origin: subject,
                    call,
                })
                .await;
        }
        if self.registry().cluster.is_empty() {
            // Between `init` and the commit of the bootstrap entry there is
            // no admin to authorize anyone: "retry", not "permission denied".
            return Err(ApiError::Unavailable(
                "the cluster is still being bootstrapped; retry".into(),
            ));
        }
        self.check(&subject, &call, now)?;
        match call {
            ApiRequest::Status => Ok(Reply::Status(self.status(subject))),
            ApiRequest::Nodes => Ok(Reply::Nodes(self.node_statuses())),
            ApiRequest::NodeRemove { id } => {
                if id == self.cfg.node_id {
                    return Err(ApiError::InvalidArgument(
                        "cannot remove the leader; remove it from another node after it steps down"
                            .into(),
                    ));
                }
                self.write(Command::NodeRemove { id }).await?;
                Ok(Reply::Done)
            }
            ApiRequest::TokenCreate {
                role,
                ttl_secs,
                uses,
            } => {
                if ttl_secs == 0 || ttl_secs > 30 * 24 * 3600 {
                    return Err(ApiError::InvalidArgument(
                        "token ttl must be between 1 s and 30 days".into(),
                    ));
                }
                if uses == 0 {
                    return Err(ApiError::InvalidArgument(
                        "token uses must be at least 1".into(),
                    ));
                }
                let ca = self
                    .ca
                    .as_ref()
                    .ok_or_else(|| internal("leader has no CA key"))?;
                let token = JoinToken::generate(&mut rand::rng(), ca.pin());
                let rec = TokenRecord {
                    id: token.id.clone(),
                    secret_hash: metta_trust::token::secret_hash(&token.secret),
                    role,
                    expires_at: now + ttl_secs,
                    uses_left: uses,
                    revoked: false,
                    created_by: subject,
                };
                let expires_at = rec.expires_at;
                self.write(Command::TokenCreate(rec)).await?;
                Ok(Reply::Token {
                    token: token.to_string(),
                    id: token.id,
                    expires_at,
                })
            }
            ApiRequest::TokenList => Ok(Reply::Tokens(self.registry().token_infos())),
            ApiRequest::TokenRevoke { id } => {
                self.write(Command::TokenRevoke { id }).await?;
                Ok(Reply::Done)
            }
            ApiRequest::UserAdd { name, csr_pem } => {
                metta_proto::ids::check_name("user", &name)
                    .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
                let ca = self
                    .ca
                    .as_ref()
                    .ok_or_else(|| internal("leader has no CA key"))?;
                let spki = metta_trust::csr_public_key(&csr_pem)
                    .map_err(|e| ApiError::InvalidArgument(format!("CSR: {e}")))?;
                let not_after = now + USER_CERT_LIFETIME;
                self.write(Command::UserAdd(UserRecord {
                    name: name.clone(),
                    spki_der: spki,
                    cert_not_after: not_after,
                }))
                .await?;
                let issued = ca
                    .issue(
                        &csr_pem,
                        &Subject::User(name),
                        now,
                        USER_CERT_LIFETIME,
                        rand::random(),
                    )
                    .map_err(|e| ApiError::InvalidArgument(format!("CSR: {e}")))?;
                Ok(Reply::Cert {
                    cert_pem: issued.pem,
                    not_after: issued.not_after,
                })
            }
            ApiRequest::UserList => Ok(Reply::Users(self.registry().user_infos())),
            ApiRequest::Grant(signed) => {
                if signed.grant.issuer != subject {
                    return Err(ApiError::GrantRejected(format!(
                        "the grant is issued by {}, but the caller is {subject}",
                        signed.grant.issuer
                    )));
                }
                if signed.grant.resource.len() > 1024 || signed.signature.len() > 128 {
                    return Err(ApiError::InvalidArgument(
                        "a grant's resource is at most 1024 bytes".into(),
                    ));
                }
                // Checked now, so a grant that cannot hold never reaches the
                // log (and again when applied, in log order).
                {
                    let reg = self.registry();
                    metta_trust::verify_grant(&signed, &*reg, now)
                        .map_err(|e| ApiError::GrantRejected(e.to_string()))?;
                    let g = &signed.grant;
                    let exists = match &g.subject {
                        Subject::User(n) => reg.users.contains_key(n),
                        Subject::Node(id) => reg.nodes.contains_key(id),
                    };
                    if !exists {
                        return Err(ApiError::NotFound(match &g.subject {
                            Subject::User(n) => {
                                format!("no user {n} (add it first: `mettactl user add {n}`)")
                            }
                            s => format!("no {s} in the cluster"),
                        }));
                    }
                    let same = reg.grants.iter().find(|(_, r)| {
                        let h = &r.signed.grant;
                        !r.revoked
                            && (
                                &h.issuer,
                                &h.subject,
                                h.rights,
                                &h.resource,
                                h.expires_at,
                                h.delegable,
                            ) == (
                                &g.issuer,
                                &g.subject,
                                g.rights,
                                &g.resource,
                                g.expires_at,
                                g.delegable,
                            )
                    });
                    if let Some((id, _)) = same {
                        return Err(ApiError::AlreadyExists(format!(
                            "{} already holds {} on {} (grant {id})",
                            g.subject, g.rights, g.resource
                        )));
                    }
                }
                match self.write(Command::GrantAdd { signed, now }).await? {
                    Applied::Granted(id) => Ok(Reply::GrantAdded(id)),
                    other => Err(internal(format!("unexpected apply result {other:?}"))),
                }
            }
            ApiRequest::Grants { subject: filter } => {
                Ok(Reply::Grants(self.registry().grant_infos(filter.as_ref())))
            }
            ApiRequest::RevokeGrant { id } => {
                let (gid, issuer) = {
                    let reg = self.registry();
                    let gid = reg.find_grant(&id)?;
                    let issuer = reg.grants[&gid].signed.grant.issuer.clone();
                    (gid, issuer)
                };
                if issuer != subject {
                    self.registry().authorize(
                        &subject,
                        metta_proto::Rights::of(metta_proto::Right::Write),
                        "/grants",
                        now,
                    )?;
                }
                self.write(Command::GrantRevoke { id: gid }).await?;
                Ok(Reply::Done)
            }
            ApiRequest::RevokeSubject(s) => {
                if s == Subject::Node(self.cfg.node_id) {
                    return Err(ApiError::InvalidArgument(
                        "cannot revoke the current leader from itself".into(),
                    ));
                }
                self.write(Command::RevokeSubject(s)).await?;
                Ok(Reply::Done)
            }
            ApiRequest::KvPut { key, value } => {
                if key.is_empty() || key.len() > 1024 || value.len() > 1024 * 1024 {
                    return Err(ApiError::InvalidArgument(
                        "keys are 1-1024 bytes, values at most 1 MiB".into(),
                    ));
                }
                self.write(Command::KvPut { key, value }).await?;
                Ok(Reply::Done)
            }
            ApiRequest::KvGet { key } => {
                self.raft
                    .ensure_linearizable()
                    .await
                    .map_err(|e| ApiError::Unavailable(e.to_string()))?;
                Ok(Reply::Value(self.registry().kv.get(&key).cloned()))
            }
            ApiRequest::Heartbeat(hb) => {
                let Subject::Node(id) = subject else {
                    return Err(internal("heartbeat from a non-node"));
                };
                self.record_heartbeat(id, hb).await?;
                Ok(Reply::Done)
            }
            ApiRequest::Renew { csr_pem } => {
                let Subject::Node(id) = subject else {
                    return Err(internal("renewal from a non-node"));
                };
                self.renew_for(id, &csr_pem, now).await
            }
            ApiRequest::NodeLabel { node, key, value } => self.label_node(&node, key, value).await,
            call @ (ApiRequest::VendorAdd { .. }
            | ApiRequest::VendorRemove { .. }
            | ApiRequest::Vendors
            | ApiRequest::ImagePush { .. }
            | ApiRequest::Images
            | ApiRequest::Run(_)
            | ApiRequest::Ps
            | ApiRequest::Logs { .. }
            | ApiRequest::Stop { .. }
            | ApiRequest::Call { .. }) => self.domain_call(subject, call, now).await,
        }
    }

    fn status(&self, you: Subject) -> ClusterStatus {
        let m = self.raft.metrics().borrow().clone();
        ClusterStatus {
            cluster: self.cfg.cluster.clone(),
            you,
            leader: m.current_leader,
            term: m.current_term,
            applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            node: self.cfg.node_id,
        }
    }

    fn node_statuses(&self) -> Vec<NodeStatus> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let learners: BTreeSet<u64> = membership.learner_ids().collect();
        let hbs = self
            .heartbeats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let reg = self.registry();
        reg.nodes
            .values()
            .map(|n| {
                let hb = hbs.get(&n.id);
                let last_seen = if n.id == self.cfg.node_id {
                    Some(Duration::ZERO)
                } else {
                    hb.map(|(t, _)| t.elapsed())
                };
                let raft = if m.current_leader == Some(n.id) {
                    RaftRole::Leader
                } else if voters.contains(&n.id) {
                    RaftRole::Follower
                } else if learners.contains(&n.id) {
                    RaftRole::Learner
                } else {
                    RaftRole::None
                };
                let (resources, cert_not_after) = match hb {
                    Some((_, h)) => (h.resources.clone(), h.cert_not_after),
                    None if n.id == self.cfg.node_id => (
                        local_resources(),
                        self.cert_not_after.load(Ordering::Relaxed),
                    ),
                    None => (n.resources.clone(), n.cert_not_after),
                };
                NodeStatus {
                    id: n.id,
                    name: n.name.clone(),
                    role: n.role,
                    kind: n.kind,
                    addr: n.addr.clone(),
                    up: last_seen.is_some_and(|d| d < LIVENESS_WINDOW),
                    last_seen_ms: last_seen.map(|d| d.as_millis() as u64),
                    resources,
                    cert_not_after,
                    raft,
                    labels: n
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                }
            })
            .collect()
    }

    /// A native node's sync ([`crate::native`]): its heartbeat (recorded
    /// with this node's address, so calls for it come here), what its
    /// domains produced, then its work.
    async fn native_sync(
        self: &Arc<Self>,
        id: NodeId,
        mut sync: metta_proto::NodeSync,
    ) -> Response {
        let is_native = self
            .registry()
            .nodes
            .get(&id)
            .map(|n| n.kind == NodeKind::Native);
        if self.cfg.role != Role::Control {
            return Err(ApiError::InvalidArgument(format!(
                "node/{} is a worker: a native node links to a control node",
                self.cfg.node_id
            )));
        }
        match is_native {
            Some(true) => {}
            Some(false) => {
                return Err(ApiError::InvalidArgument(format!(
                    "node/{id} is not a native node: hosted nodes run their own domains"
                )))
            }
            None => return Err(ApiError::NotFound(format!("node/{id}"))),
        }
        if self.native.heartbeat_due(id, Instant::now()) {
            let mut hb = sync.heartbeat.clone();
            hb.addr = self.cfg.advertise.clone();
            self.api(Subject::Node(id), ApiRequest::Heartbeat(hb), true)
                .await?;
        }
        let produced = self.native.report(id, &mut sync);
        for (to_node, env) in produced.messages {
            self.domains.send(to_node, env);
        }
        for (r, payload) in produced.answers {
            self.domains.send_answer(r, payload);
        }
        let hold = Duration::from_millis(sync.hold_ms.into());
        let work = self.native.work(id, hold, self.applied.clone()).await;
        Ok(Reply::Work(work))
    }

    async fn record_heartbeat(&self, id: NodeId, hb: Heartbeat) -> Result<(), ApiError> {
        if hb.addr.len() > 256 || hb.addr.parse::<SocketAddr>().is_err() {
            return Err(ApiError::InvalidArgument(format!(
                "heartbeat address {:?} is not ip:port",
                hb.addr.chars().take(64).collect::<String>()
            )));
        }
        let addr_changed = self
            .registry()
            .nodes
            .get(&id)
            .is_some_and(|n| n.addr != hb.addr);
        // A moving address is a registry write: a few, then one per 10 s.
        let addr_changed = addr_changed && {
            let mut a = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
            match a.addr_change.take(&id, Instant::now()) {
                Ok(()) => true,
                Err(l) => {
                    if l.first {
                        warn!(node = id, "address changes rate-limited");
                    }
                    false
                }
            }
        };
        let addr = hb.addr.clone();
        self.heartbeats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (Instant::now(), hb));
        if addr_changed {
            let _ = self.write(Command::NodeAddr { id, addr }).await;
        }
        Ok(())
    }

    async fn renew_for(&self, id: NodeId, csr_pem: &str, now: UnixTime) -> Response {
        let ca = self
            .ca
            .as_ref()
            .ok_or_else(|| internal("leader has no CA key"))?;
        let spki = metta_trust::csr_public_key(csr_pem)
            .map_err(|e| ApiError::InvalidArgument(format!("CSR: {e}")))?;
        let known = self.registry().nodes.get(&id).map(|n| n.spki_der.clone());
        if known.as_deref() != Some(spki.as_slice()) {
            return Err(ApiError::InvalidArgument(
                "renewal must use the node's registered key".into(),
            ));
        }
        let issued = self.issue_node_cert(ca, id, csr_pem, now).await?;
        Ok(Reply::Cert {
            cert_pem: issued.pem,
            not_after: issued.not_after,
        })
    }

    /// Signs a node certificate and records its expiry in the registry.
    async fn issue_node_cert(
        &self,
        ca: &ClusterCa,
        id: NodeId,
        csr_pem: &str,
        now: UnixTime,
    ) -> Result<metta_trust::IssuedCert, ApiError> {
        let role = self
            .registry()
            .nodes
            .get(&id)
            .map(|n| n.role)
            .ok_or_else(|| ApiError::NotFound(format!("node/{id}")))?;
        let issued = ca
            .issue_node(
                csr_pem,
                id,
                role,
                now,
                self.cfg.cert_lifetime_secs,
                rand::random(),
            )
            .map_err(|e| ApiError::InvalidArgument(format!("CSR: {e}")))?;
        self.write(Command::NodeCert {
            id,
            not_after: issued.not_after,
        })
        .await?;
        Ok(issued)
    }

    // ---------------------------------------------------------------- join

    async fn join(self: &Arc<Self>, j: JoinRequest) -> Response {
        if !self.is_leader() {
            return self.to_leader(Request::Join(j)).await;
        }
        let now = clock::now();
        let (token_id, secret) =
            metta_trust::token::parse_credential(&j.token).map_err(ApiError::Token)?;
        {
            let reg = self.registry();
            let rec = reg.tokens.get(&token_id);
            metta_trust::check_token(rec, &secret, now).map_err(ApiError::Token)?;
            // A native node is never a Raft member and must not receive the
            // CA key that control nodes get.
            if j.kind == metta_proto::NodeKind::Native
                && rec.is_some_and(|t| t.role == Role::Control)
            {
                return Err(ApiError::InvalidArgument(
                    "a native node cannot join with a control token; use a worker token".into(),
                ));
            }
        }
        metta_proto::ids::check_name("node", &j.name)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        if j.addr.parse::<SocketAddr>().is_err() {
            return Err(ApiError::InvalidArgument(format!(
                "node address {:?} is not ip:port",
                j.addr
            )));
        }
        let ca = self
            .ca
            .as_ref()
            .ok_or_else(|| internal("leader has no CA key"))?;
        let spki = metta_trust::csr_public_key(&j.csr_pem)
            .map_err(|e| ApiError::InvalidArgument(format!("CSR: {e}")))?;
        let applied = self
            .write(Command::AdmitNode {
                token_id,
                secret_hash: metta_trust::token::secret_hash(&secret),
                node: Admission {
                    name: j.name.clone(),
                    kind: j.kind,
                    addr: j.addr.clone(),
                    resources: j.resources.clone(),
                    spki_der: spki,
                },
                now,
            })
            .await?;
        let Applied::Admitted(id) = applied else {
            return Err(internal(format!("unexpected apply result {applied:?}")));
        };
        let issued = self.issue_node_cert(ca, id, &j.csr_pem, now).await?;
        let role = self
            .registry()
            .nodes
            .get(&id)
            .map(|n| n.role)
            .unwrap_or(Role::Worker);
        let members = self
            .registry()
            .nodes
            .values()
            .filter(|n| n.id != id)
            .map(|n| (n.id, n.addr.clone()))
            .collect();
        info!(node = id, name = %j.name, %role, "admitted");
        Ok(Reply::Joined(JoinResponse {
            node_id: id,
            cluster: self.cfg.cluster.clone(),
            role,
            cert_pem: issued.pem,
            ca_cert_pem: self.ca_pem.clone(),
            ca_key_pem: (role == Role::Control).then(|| ca.key_pem().to_string()),
            members,
        }))
    }

    // ---------------------------------------------------------------- duties

    /// Keeps the verifiers' revocation list in step with the registry and closes
    /// live connections of revoked or expired identities.
    async fn enforce_loop(self: Arc<Self>, mut applied: watch::Receiver<u64>) {
        let mut shutdown = self.shutdown.subscribe();
        let mut tick = tokio::time::interval(ENFORCE_EVERY);
        loop {
            tokio::select! {
                _ = applied.changed() => {},
                _ = tick.tick() => {},
                _ = shutdown.changed() => return,
            }
            let list = self.registry().revoked.clone();
            let changed = {
                let mut cur = self.revoked.write().unwrap_or_else(|e| e.into_inner());
                let changed = *cur != list;
                *cur = list.clone();
                changed
            };
            let now = clock::now();
            {
                let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
                for c in conns.values() {
                    let revoked = c.subject.as_ref().is_some_and(|s| list.subject_revoked(s))
                        || (!c.serial.is_empty() && list.serial_revoked(&c.serial));
                    if revoked {
                        info!(peer = ?c.subject, "closing connection of revoked identity");
                        c.close(transport::CLOSE_REVOKED, b"identity revoked");
                    } else if now >= c.not_after {
                        c.close(transport::CLOSE_EXPIRED, b"certificate expired");
                    }
                }
            }
            if changed {
                for c in self.transport.outgoing() {
                    if let Some(p) = Self::peer_of(&c) {
                        if list.subject_revoked(&p.subject) {
                            c.close(transport::CLOSE_REVOKED.into(), b"identity revoked");
                        }
                    }
                }
            }
            if list.subject_revoked(&Subject::Node(self.cfg.node_id)) {
                warn!("this node's identity was revoked; shutting down");
                let _ = self.shutdown.send(true);
                self.transport.close();
                let _ = self.raft.shutdown().await;
                return;
            }
        }
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {},
                _ = shutdown.changed() => return,
            }
            let hb = Heartbeat {
                resources: local_resources(),
                cert_not_after: self.cert_not_after.load(Ordering::Relaxed),
                addr: self.cfg.advertise.clone(),
            };
            if self.is_leader() {
                if let Err(e) = self.record_heartbeat(self.cfg.node_id, hb).await {
                    warn!("own heartbeat: {e}");
                }
                continue;
            }
            let Some((leader, addr)) = self.leader() else {
                continue;
            };
            if let Err(e) = self
                .transport
                .call_api_node(
                    &addr,
                    &Subject::Node(leader),
                    &Request::Api(ApiRequest::Heartbeat(hb)),
                )
                .await
            {
                debug!("heartbeat to {addr}: {e}");
            }
        }
    }

    /// On the leader: make Raft membership follow the registry — admitted
    /// hosted nodes become learners, caught-up control nodes become voters,
    /// removed nodes leave; native nodes are never members. Also commits the
    /// bootstrap entry of a new cluster.
    async fn reconcile_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(300));
        loop {
            tokio::select! {
                _ = tick.tick() => {},
                _ = shutdown.changed() => return,
            }
            if !self.is_leader() {
                continue;
            }
            if let Err(e) = self.reconcile_once().await {
                debug!("reconcile: {e}");
            }
        }
    }

    async fn reconcile_once(&self) -> Result<(), String> {
        if self.registry().cluster.is_empty() {
            if let Ok(text) = crate::config::read(&self.dir.bootstrap()) {
                let cmd: Command = serde_json::from_str(&text).map_err(|e| e.to_string())?;
                self.write(cmd).await.map_err(|e| e.to_string())?;
                let _ = std::fs::remove_file(self.dir.bootstrap());
                info!("cluster bootstrapped");
            }
            return Ok(());
        }
        let _ = std::fs::remove_file(self.dir.bootstrap());
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let members: BTreeMap<u64, BasicNode> =
            membership.nodes().map(|(k, v)| (*k, v.clone())).collect();
        // Native nodes talk to the control plane over TLS/TCP and cannot
        // take part in Raft (no QUIC): they are never members.
        let nodes: Vec<(u64, Role, String)> = self
            .registry()
            .nodes
            .values()
            .filter(|n| n.kind != NodeKind::Native)
            .map(|n| (n.id, n.role, n.addr.clone()))
            .collect();
        let last = m.last_log_index.unwrap_or(0);
        for (id, role, addr) in &nodes {
            match members.get(id) {
                None => {
                    info!(node = id, %addr, "adding as learner");
                    self.raft
                        .add_learner(*id, BasicNode { addr: addr.clone() }, false)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Some(n) if &n.addr != addr => {
                    let mut set = BTreeMap::new();
                    set.insert(*id, BasicNode { addr: addr.clone() });
                    self.raft
                        .change_membership(ChangeMembers::SetNodes(set), true)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Some(_) if *role == Role::Control && !voters.contains(id) => {
                    let matched = m
                        .replication
                        .as_ref()
                        .and_then(|r| r.get(id).cloned().flatten())
                        .map(|l| l.index)
                        .unwrap_or(0);
                    if matched + 64 >= last && matched > 0 {
                        info!(node = id, "promoting to voter");
                        let mut ids = BTreeSet::new();
                        ids.insert(*id);
                        self.raft
                            .change_membership(ChangeMembers::AddVoterIds(ids), true)
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                }
                Some(_) => {}
            }
        }
        let registered: BTreeSet<u64> = nodes.iter().map(|n| n.0).collect();
        let gone: BTreeSet<u64> = members
            .keys()
            .filter(|id| !registered.contains(id) && **id != self.cfg.node_id)
            .copied()
            .collect();
        if !gone.is_empty() {
            let gone_voters: BTreeSet<u64> = gone.intersection(&voters).copied().collect();
            if !gone_voters.is_empty() {
                info!(nodes = ?gone_voters, "removing voters");
                self.raft
                    .change_membership(ChangeMembers::RemoveVoters(gone_voters), false)
                    .await
                    .map_err(|e| e.to_string())?;
            } else {
                info!(nodes = ?gone, "removing learners");
                self.raft
                    .change_membership(ChangeMembers::RemoveNodes(gone), false)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Renews this node's certificate once two thirds of its lifetime are gone.
    async fn renew_loop(self: Arc<Self>) {
        let mut shutdown = self.shutdown.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {},
                _ = shutdown.changed() => return,
            }
            let not_after = self.cert_not_after.load(Ordering::Relaxed);
            let not_before = self.cert_not_before.load(Ordering::Relaxed);
            if clock::now() < renew_at(not_before, not_after) {
                continue;
            }
            match self.renew().await {
                Ok(na) => info!(not_after = na, "certificate renewed"),
                Err(e) => warn!("certificate renewal failed (will retry): {e}"),
            }
        }
    }

    async fn renew(self: &Arc<Self>) -> Result<UnixTime, String> {
        let csr = metta_trust::make_csr(
            &self.key,
            &Subject::Node(self.cfg.node_id),
            &self.cfg.cluster,
        )
        .map_err(|e| e.to_string())?;
        let reply = if self.is_leader() {
            self.renew_for(self.cfg.node_id, &csr, clock::now()).await
        } else {
            let (leader, addr) = self.leader().ok_or("no leader")?;
            self.transport
                .call_api_node(
                    &addr,
                    &Subject::Node(leader),
                    &Request::Api(ApiRequest::Renew { csr_pem: csr }),
                )
                .await
                .map_err(|e: CallError| ApiError::Unavailable(e.to_string()))
        };
        let Ok(Reply::Cert {
            cert_pem,
            not_after,
        }) = reply.map_err(|e| e.to_string())
        else {
            return Err("unexpected renewal reply".into());
        };
        crate::config::write_atomic(&self.dir.node_cert(), cert_pem.as_bytes(), 0o644)
            .map_err(|e| e.to_string())?;
        let creds =
            Credentials::from_pem(&cert_pem, &self.ca_pem, &self.key).map_err(|e| e.to_string())?;
        let server = transport::server_config(&creds, &self.ca_der, self.revoked.clone())
            .map_err(|e| e.to_string())?;
        let client = transport::client_config(
            Some(&creds),
            &ServerTrust::Cluster {
                ca_der: self.ca_der.clone(),
                revoked: self.revoked.clone(),
            },
        )
        .map_err(|e| e.to_string())?;
        let tcp_server = transport::tls_server_config(&creds, &self.ca_der, self.revoked.clone())
            .map_err(|e| e.to_string())?;
        self.transport.set_configs(Some(server), client);
        self.tcp.set_config(tcp_server);
        let not_before = metta_trust::cert::pem_to_der(&cert_pem)
            .ok()
            .and_then(|d| metta_trust::parse_cert(&d).ok())
            .map_or(clock::now(), |c| c.not_before);
        self.cert_not_before.store(not_before, Ordering::Relaxed);
        self.cert_not_after.store(not_after, Ordering::Relaxed);
        Ok(not_after)
    }
}

/// When a certificate valid from `not_before` to `not_after` is renewed:
/// two thirds into its lifetime, counted from when it was issued (the CA
/// dates `not_before` back by [`metta_trust::CLOCK_SKEW_SECS`]).
pub fn renew_at(not_before: UnixTime, not_after: UnixTime) -> UnixTime {
    let issued = (not_before + metta_trust::CLOCK_SKEW_SECS).min(not_after);
    issued + not_after.saturating_sub(issued) / 3 * 2
}

/// Resolves when Raft's known leader differs from `from`.
async fn leader_changed(
    rx: &mut watch::Receiver<openraft::RaftMetrics<u64, BasicNode>>,
    from: Option<NodeId>,
) {
    loop {
        if rx.borrow_and_update().current_leader != from {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// This machine's CPUs, memory and architecture.
pub fn local_resources() -> metta_proto::NodeResources {
    use std::sync::OnceLock;
    static CACHE: OnceLock<metta_proto::NodeResources> = OnceLock::new();
    CACHE
        .get_or_init(|| {
            let memory_bytes = sysinfo::System::new()
                .map(|mut sys| {
                    sys.refresh_memory();
                    sys.total_memory()
                })
                .unwrap_or(0);
            metta_proto::NodeResources {
                cpus: std::thread::available_parallelism()
                    .map(|n| n.get() as u32)
                    .unwrap_or(1),
                memory_bytes,
                arch: std::env::consts::ARCH.to_string(),
            }
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::renew_at;

    #[test]
    fn renewal_comes_two_thirds_into_the_certificates_own_lifetime() {
        // Issued at t (valid from 5 min back): a 1 h certificate is renewed
        // after 40 min, a 9 s one after 6 s.
        let t = 1_700_000_000;
        let skew = metta_trust::CLOCK_SKEW_SECS;
        assert_eq!(renew_at(t - skew, t + 3600), t + 2400);
        assert_eq!(renew_at(t - skew, t + 9), t + 6);
        assert_eq!(
            renew_at(t - skew, t - skew),
            t - skew,
            "an empty window renews at once"
        );
    }
}
