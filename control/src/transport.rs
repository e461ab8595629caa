//! QUIC transport: one request frame and one response frame per bidirectional
//! stream, over mutually authenticated TLS 1.3 with ALPN `metta/1`.
//!
//! A [`Transport`] is one UDP socket acting as server (when given a server
//! config) and as client, with a cache of outgoing connections. The certificate
//! checks themselves live in `metta-trust` (its rustls verifiers); this module
//! wires them into rustls configs ([`tls_server_config`], [`tls_client_config`])
//! that quinn uses here and that the TLS/TCP listener for native nodes
//! ([`crate::tcp`]) uses unchanged, so both transports admit exactly the same
//! peers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use metta_proto::{frame, ApiError, FrameError, Reply, Request, Response, ALPN, MAX_FRAME_LEN};
use metta_trust::{CaPin, ClusterClientVerifier, ClusterServerVerifier, PinnedServerVerifier};
use metta_trust::{NodeKey, RevocationList};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{de::DeserializeOwned, Serialize};

/// The server name clients put in the TLS handshake. Metta certificates name
/// their subject in a URI SAN and the verifiers check that, not DNS names.
pub const SERVER_NAME: &str = "metta";

/// How long a QUIC handshake may take before the peer counts as unreachable
/// (a dead peer sends nothing back over UDP, so this bounds fail-over to the
/// next endpoint).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Transport failures (as opposed to the peer answering with an [`ApiError`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The address does not resolve.
    #[error("cannot resolve {addr}: {msg}")]
    Resolve {
        /// The address.
        addr: String,
        /// Why.
        msg: String,
    },
    /// No connection could be made (unreachable, handshake refused, ...).
    #[error("cannot connect to {addr}: {msg}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        msg: String,
    },
    /// The peer was reached but refused the handshake (or we refused its
    /// certificate): retrying will not help.
    #[error("{addr} refused the connection: {msg}")]
    Refused {
        /// The address.
        addr: String,
        /// Why.
        msg: String,
    },
    /// The connection or stream failed mid-exchange.
    #[error("connection to {addr} failed: {msg}")]
    Stream {
        /// The address.
        addr: String,
        /// Why.
        msg: String,
    },
    /// The peer sent bytes that are not a valid frame.
    #[error("bad frame from {addr}: {err}")]
    Frame {
        /// The address.
        addr: String,
        /// Why.
        err: FrameError,
    },
    /// Local TLS setup failed.
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// A node's or user's TLS credentials.
#[derive(Debug)]
pub struct Credentials {
    /// Leaf certificate then the CA certificate.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Credentials {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Credentials {
    /// From PEM texts of the leaf certificate, the CA and the key.
    pub fn from_pem(cert_pem: &str, ca_pem: &str, key: &NodeKey) -> Result<Self, TransportError> {
        let leaf = metta_trust::cert::pem_to_der(cert_pem)
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        let ca = metta_trust::cert::pem_to_der(ca_pem)
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        Ok(Credentials {
            chain: vec![CertificateDer::from(leaf), CertificateDer::from(ca)],
            key: key.tls_private_key(),
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    Arc::new(base_transport_config())
}

fn base_transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // A silent peer (killed, partitioned) is declared gone after 2 s; until
    // then calls on its connection wait.
    t.keep_alive_interval(Some(Duration::from_millis(400)));
    t.max_idle_timeout(Some(
        Duration::from_secs(2)
            .try_into()
            .expect("2 s is a valid idle timeout"),
    ));
    t
}

/// What a peer gets before it has shown a certificate: the anonymous
/// bounds of [`crate::limits`] (few streams, a small receive window, no
/// unidirectional streams). The accept loop raises them for members
/// ([`admit_member`]).
fn server_transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = base_transport_config();
    t.max_concurrent_bidi_streams(crate::limits::ANONYMOUS_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.receive_window(crate::limits::ANONYMOUS_WINDOW.into());
    t.stream_receive_window(crate::limits::ANONYMOUS_WINDOW.into());
    Arc::new(t)
}

/// Raises the stream and flow-control limits of an incoming connection whose
/// peer presented a cluster certificate. (The per-stream window stays at
/// [`crate::limits::ANONYMOUS_WINDOW`]: a large frame flows at that many
/// bytes per round trip.)
pub fn admit_member(conn: &quinn::Connection) {
    conn.set_max_concurrent_bi_streams(crate::limits::MEMBER_STREAMS.into());
    conn.set_receive_window(crate::limits::MEMBER_WINDOW.into());
}

/// The TLS server side every Metta listener uses (QUIC and TLS/TCP alike): our
/// credentials, TLS 1.3 only, ALPN `metta/1`, client certificates optional
/// (joiners have none) but verified against the cluster CA and the revocation
/// list when sent.
pub fn tls_server_config(
    creds: &Credentials,
    ca_der: &[u8],
    revoked: Arc<RwLock<RevocationList>>,
) -> Result<rustls::ServerConfig, TransportError> {
    let verifier = ClusterClientVerifier::new(ca_der, revoked)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No session resumption: a resumed session skips the client-certificate
    // check, and with it the revocation list and expiry.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    Ok(tls)
}

/// QUIC server config: [`tls_server_config`] plus our QUIC timing.
pub fn server_config(
    creds: &Credentials,
    ca_der: &[u8],
    revoked: Arc<RwLock<RevocationList>>,
) -> Result<quinn::ServerConfig, TransportError> {
    let tls = tls_server_config(creds, ca_der, revoked)?;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(server_transport_config());
    // Connection attempts waiting for the accept loop, and the bytes they
    // may buffer before it looks at them.
    cfg.max_incoming(crate::limits::PENDING_MAX * 2);
    cfg.incoming_buffer_size(64 * 1024);
    cfg.incoming_buffer_size_total(8 * 1024 * 1024);
    Ok(cfg)
}

/// How a client decides whether to trust the server.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// A member of the cluster with this CA (the cluster name is read from it).
    Cluster {
        /// CA certificate (DER).
        ca_der: Vec<u8>,
        /// Revoked identities.
        revoked: Arc<RwLock<RevocationList>>,
    },
    /// A server presenting a CA with this pin (joining: we do not have the CA yet).
    Pinned(CaPin),
}

/// The TLS client side every Metta dialer uses (QUIC and TLS/TCP alike): the
/// server is checked per `trust`, we present `creds` if any, TLS 1.3 only,
/// ALPN `metta/1`, no session resumption.
pub fn tls_client_config(
    creds: Option<&Credentials>,
    trust: &ServerTrust,
) -> Result<rustls::ClientConfig, TransportError> {
    let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = match trust {
        ServerTrust::Cluster { ca_der, revoked } => Arc::new(
            ClusterServerVerifier::new(ca_der, revoked.clone())
                .map_err(|e| TransportError::Tls(e.to_string()))?,
        ),
        ServerTrust::Pinned(pin) => Arc::new(PinnedServerVerifier::new(*pin)),
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut tls = match creds {
        Some(c) => builder
            .with_client_auth_cert(c.chain.clone(), c.key.clone_key())
            .map_err(|e| TransportError::Tls(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // Every connection is a full handshake, so the server re-checks our
    // certificate (and we re-check theirs) against revocations each time.
    tls.resumption = rustls::client::Resumption::disabled();
    Ok(tls)
}

/// QUIC client config: [`tls_client_config`] plus our QUIC timing.
pub fn client_config(
    creds: Option<&Credentials>,
    trust: &ServerTrust,
) -> Result<quinn::ClientConfig, TransportError> {
    let tls = tls_client_config(creds, trust)?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport_config());
    Ok(cfg)
}

/// Application close code: the peer's identity was revoked.
pub const CLOSE_REVOKED: u32 = 1;
/// Application close code: the peer's certificate expired.
pub const CLOSE_EXPIRED: u32 = 2;
/// Application close code: over a budget for peers without a certificate
/// (too many from its address, or its lifetime is over); try again later.
pub const CLOSE_BUSY: u32 = 3;

/// Whether a connection ended because a side refused the other's identity
/// (a TLS alert, or a revocation/expiry close) rather than a network failure.
pub fn is_refusal(e: &quinn::ConnectionError) -> bool {
    let crypto = |code: u64| (0x100..0x200).contains(&code);
    match e {
        quinn::ConnectionError::TransportError(t) => crypto(u64::from(t.code)),
        quinn::ConnectionError::ConnectionClosed(c) => crypto(u64::from(c.error_code)),
        quinn::ConnectionError::ApplicationClosed(a) => {
            a.error_code == CLOSE_REVOKED.into() || a.error_code == CLOSE_EXPIRED.into()
        }
        _ => false,
    }
}

/// Writes one frame and finishes the send side.
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), String> {
    let bytes = frame::encode(msg).map_err(|e| e.to_string())?;
    send.write_all(&bytes).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    Ok(())
}

/// Why reading a frame failed.
#[derive(Debug)]
pub enum ReadError {
    /// Transport-level failure.
    Io(String),
    /// The bytes are not a valid frame.
    Frame(FrameError),
}

/// What a request costs of its sender's budget at least, however small.
pub const MIN_CHARGE: usize = 16 * 1024;

/// Reads exactly one frame from the stream (the header's length is checked
/// against `max` before the payload is read). With a `budget`, the frame's
/// length is taken from it (in bytes, waiting while others hold it) until
/// the caller drops the permit returned with it (after handling the
/// request), so one peer's requests in progress are bounded in all,
/// whatever it announces on how many streams.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
    budget: Option<&Arc<tokio::sync::Semaphore>>,
) -> Result<(T, Option<tokio::sync::OwnedSemaphorePermit>), ReadError> {
    let mut header = [0u8; frame::HEADER_LEN];
    recv.read_exact(&mut header).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(n) => {
            ReadError::Frame(FrameError::Truncated { have: n })
        }
        quinn::ReadExactError::ReadError(e) => ReadError::Io(e.to_string()),
    })?;
    let len = frame::parse_header(header, max).map_err(ReadError::Frame)?;
    let held = match budget {
        Some(b) => Some(
            // Every request costs at least MIN_CHARGE, so the number in
            // progress is bounded too.
            b.clone()
                .acquire_many_owned(u32::try_from(len.max(MIN_CHARGE)).unwrap_or(u32::MAX))
                .await
                .map_err(|_| ReadError::Io("shutting down".into()))?,
        ),
        None => None,
    };
    // Grown as bytes arrive: a length announced is not memory taken.
    let mut payload = Vec::with_capacity(len.min(64 * 1024));
    let mut chunk = [0u8; 16 * 1024];
    while payload.len() < len {
        let want = (len - payload.len()).min(chunk.len());
        match recv.read(&mut chunk[..want]).await {
            Ok(Some(n)) => payload.extend_from_slice(&chunk[..n]),
            Ok(None) => {
                return Err(ReadError::Frame(FrameError::Truncated {
                    have: frame::HEADER_LEN + payload.len(),
                }))
            }
            Err(e) => return Err(ReadError::Io(e.to_string())),
        }
    }
    let msg = frame::decode(&payload).map_err(ReadError::Frame)?;
    Ok((msg, held))
}

/// One UDP socket: a server (optionally) and a client with a connection cache.
#[derive(Debug)]
pub struct Transport {
    endpoint: quinn::Endpoint,
    client: RwLock<quinn::ClientConfig>,
    conns: Mutex<HashMap<SocketAddr, quinn::Connection>>,
}

impl Transport {
    /// A client-only transport on an ephemeral port.
    pub fn client(client: quinn::ClientConfig) -> Result<Arc<Self>, TransportError> {
        let bind: SocketAddr = "0.0.0.0:0".parse().expect("valid literal");
        let endpoint = quinn::Endpoint::client(bind).map_err(|e| TransportError::Connect {
            addr: bind.to_string(),
            msg: e.to_string(),
        })?;
        Ok(Arc::new(Transport {
            endpoint,
            client: RwLock::new(client),
            conns: Mutex::new(HashMap::new()),
        }))
    }

    /// A server listening on `listen` that also dials out.
    pub fn server(
        listen: SocketAddr,
        server: quinn::ServerConfig,
        client: quinn::ClientConfig,
    ) -> Result<Arc<Self>, TransportError> {
        let endpoint =
            quinn::Endpoint::server(server, listen).map_err(|e| TransportError::Connect {
                addr: listen.to_string(),
                msg: format!("cannot listen: {e}"),
            })?;
        Ok(Arc::new(Transport {
            endpoint,
            client: RwLock::new(client),
            conns: Mutex::new(HashMap::new()),
        }))
    }

    /// The underlying endpoint (to accept connections).
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Replaces the credentials used for new connections (certificate renewal).
    pub fn set_configs(&self, server: Option<quinn::ServerConfig>, client: quinn::ClientConfig) {
        if let Some(s) = server {
            self.endpoint.set_server_config(Some(s));
        }
        *self.client.write().unwrap_or_else(|e| e.into_inner()) = client;
    }

    /// Live outgoing connections (for revocation enforcement).
    pub fn outgoing(&self) -> Vec<quinn::Connection> {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    async fn resolve(addr: &str) -> Result<SocketAddr, TransportError> {
        if let Ok(a) = addr.parse() {
            return Ok(a);
        }
        tokio::net::lookup_host(addr)
            .await
            .map_err(|e| TransportError::Resolve {
                addr: addr.into(),
                msg: e.to_string(),
            })?
            .next()
            .ok_or_else(|| TransportError::Resolve {
                addr: addr.into(),
                msg: "no addresses".into(),
            })
    }

    async fn connection(&self, addr: &str) -> Result<quinn::Connection, TransportError> {
        let sa = Self::resolve(addr).await?;
        if let Some(c) = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&sa)
        {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let cfg = self
            .client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let connecting = self
            .endpoint
            .connect_with(cfg, sa, SERVER_NAME)
            .map_err(|e| TransportError::Connect {
                addr: addr.into(),
                msg: e.to_string(),
            })?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| TransportError::Connect {
                addr: addr.into(),
                msg: "handshake timed out".into(),
            })?
            .map_err(|e| match e {
                e if is_refusal(&e) => TransportError::Refused {
                    addr: addr.into(),
                    msg: e.to_string(),
                },
                e => TransportError::Connect {
                    addr: addr.into(),
                    msg: e.to_string(),
                },
            })?;
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sa, conn.clone());
        Ok(conn)
    }

    /// Sends `req` to `addr` and waits for the response.
    pub async fn call(&self, addr: &str, req: &Request) -> Result<Response, TransportError> {
        self.call_checked(addr, None, req).await
    }

    /// Like [`call`](Self::call), and the server's certificate must name
    /// `expect` (a cluster certificate is not enough: any member's would
    /// pass the CA check).
    pub async fn call_node(
        &self,
        addr: &str,
        expect: &metta_proto::Subject,
        req: &Request,
    ) -> Result<Response, TransportError> {
        self.call_checked(addr, Some(expect), req).await
    }

    async fn call_checked(
        &self,
        addr: &str,
        expect: Option<&metta_proto::Subject>,
        req: &Request,
    ) -> Result<Response, TransportError> {
        let conn = self.connection(addr).await?;
        if let Some(expect) = expect {
            let found = conn
                .peer_identity()
                .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
                .and_then(|c| {
                    c.first()
                        .and_then(|d| metta_trust::parse_cert(d.as_ref()).ok())
                })
                .map(|c| c.subject);
            if found.as_ref() != Some(expect) {
                let msg = format!(
                    "expected {expect} there, but the server is {}",
                    found.map_or("unknown".to_string(), |s| s.to_string())
                );
                tracing::warn!(%addr, "{msg}");
                return Err(TransportError::Refused {
                    addr: addr.into(),
                    msg,
                });
            }
        }
        // In TLS 1.3 the server checks the client's certificate after the
        // client's handshake is done: a refusal shows up as the connection
        // closing under the first stream.
        let stream_err = |msg: String| match conn.close_reason() {
            Some(reason) if is_refusal(&reason) => TransportError::Refused {
                addr: addr.into(),
                msg: reason.to_string(),
            },
            _ => TransportError::Stream {
                addr: addr.into(),
                msg,
            },
        };
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        write_frame(&mut send, req).await.map_err(stream_err)?;
        match read_frame::<Response>(&mut recv, MAX_FRAME_LEN, None).await {
            Ok((r, _)) => Ok(r),
            Err(ReadError::Io(e)) => Err(stream_err(e)),
            Err(ReadError::Frame(err)) => Err(TransportError::Frame {
                addr: addr.into(),
                err,
            }),
        }
    }

    /// Like [`call`](Self::call), flattening an API error into `Err(Ok(e))`-free form.
    pub async fn call_api(&self, addr: &str, req: &Request) -> Result<Reply, CallError> {
        match self.call(addr, req).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(CallError::Api(e)),
            Err(e) => Err(CallError::Transport(e)),
        }
    }

    /// [`call_api`](Self::call_api) to the node `expect` at `addr`.
    pub async fn call_api_node(
        &self,
        addr: &str,
        expect: &metta_proto::Subject,
        req: &Request,
    ) -> Result<Reply, CallError> {
        match self.call_node(addr, expect, req).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(CallError::Api(e)),
            Err(e) => Err(CallError::Transport(e)),
        }
    }

    /// Closes every connection and the endpoint.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
    }
}

/// A call failed either in transport or by the peer's answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Could not reach the peer or the exchange broke.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The peer answered with an error.
    #[error(transparent)]
    Api(ApiError),
}
