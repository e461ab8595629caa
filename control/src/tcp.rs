//! TLS 1.3 over TCP: how native nodes talk to the control plane.
//!
//! A bare-metal Metta kernel cannot run QUIC (there is no `no_std`
//! quinn-proto), so every `mettad` also listens for TLS 1.3 on **TCP at the
//! same `host:port` as its QUIC (UDP) listener** (`listen_tcp` in `node.toml`
//! overrides it). Everything above the byte stream is the same as on QUIC:
//!
//! - the same rustls server config ([`transport::tls_server_config`]): our
//!   certificate chain with the CA last, ALPN `metta/1` (required), TLS 1.3
//!   only, the cluster's client-certificate verifier with the live revocation
//!   list, client certificates optional (an anonymous peer may only `Join`),
//!   and no session resumption (a resumed session would skip the certificate
//!   and revocation checks);
//! - the same length-prefixed postcard frames ([`metta_proto::frame`]) and the
//!   same messages, dispatched to the same handler with the peer's subject
//!   read from its verified certificate.
//!
//! What differs is that a TCP connection is one byte stream, so it carries
//! one exchange at a time ([`metta_proto::exchange`]): the client sends a
//! request frame, the server answers with one response frame, and only then
//! may the client send the next request. The server never speaks unasked.
//!
//! Limits on the server side ([`Limits`]): a connection idle for
//! [`IDLE_TIMEOUT`] between requests is closed (native nodes heartbeat every
//! second); a frame must arrive whole within [`FRAME_TIMEOUT`] of its first
//! byte, and an answer must be written within [`WRITE_TIMEOUT`]; a handshake
//! must finish within [`HANDSHAKE_TIMEOUT`]; a peer without a certificate may
//! send frames of at most [`ANONYMOUS_MAX_FRAME`] bytes (a join request is a
//! few KiB), members up to [`MAX_FRAME_LEN`]. Handshakes in progress and
//! anonymous connections are bounded per source address and in all
//! ([`crate::limits::ConnBudget`]; an anonymous connection also lives at most
//! [`crate::limits::ANONYMOUS_LIFETIME`] and idles at most
//! [`ANONYMOUS_IDLE_TIMEOUT`]); members have their own
//! [`MAX_CONNECTIONS`], so a flood of strangers cannot lock them out. A
//! connection over a budget is closed at once. A frame
//! that does not parse is answered with `InvalidArgument("bad frame: ..")` and
//! the connection is closed. The node closes a TCP connection when its
//! peer's identity is revoked or its certificate expires, like a QUIC one; TCP
//! has no close codes, so the peer sees the connection end and its next
//! handshake refused.
//!
//! [`TcpClient`] is the client side, for tests and as the model of the native
//! kernel's client: it connects either with a pinned CA (joining with a token)
//! or with cluster credentials, makes one call at a time, reconnects when the
//! connection was lost, and maps TLS refusals to
//! [`TransportError::Refused`]. The protocol rule itself ([`ClientExchange`],
//! [`ServerExchange`]) is sans-IO and lives in `metta-proto`, so the kernel
//! can reuse it over rustls's unbuffered API.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use metta_proto::{
    ApiError, ClientExchange, ExchangeError, Reply, Request, Response, ServerExchange, ALPN,
    MAX_FRAME_LEN,
};
use metta_trust::{CaPin, CertInfo, RevocationList};
use rustls::AlertDescription;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::debug;

use crate::limits::{Place, SharedBudget};
use crate::transport::{self, CallError, Credentials, ServerTrust, TransportError, SERVER_NAME};

/// A connection with no request for this long is closed by the server.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A request frame must arrive whole within this long of its first byte.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// An answer must be written (the peer must read it) within this long.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
pub use crate::limits::{ANONYMOUS_MAX_FRAME, HANDSHAKE_TIMEOUT};
/// Most TCP connections of members (peers with a certificate) a node serves
/// at once; anonymous peers have their own, smaller budget
/// ([`crate::limits`]), so they cannot take these.
pub const MAX_CONNECTIONS: usize = 1024;
/// Between requests, an anonymous connection is closed sooner than a
/// member's.
pub const ANONYMOUS_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`TcpClient::call`] waits for an answer by default (longer than a
/// follower's forwarding window, so a relayed call gets its answer).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

const READ_CHUNK: usize = 16 * 1024;

/// Server-side time limits of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Between requests.
    pub idle: Duration,
    /// From a frame's first byte to its last.
    pub frame: Duration,
    /// Writing an answer.
    pub write: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            idle: IDLE_TIMEOUT,
            frame: FRAME_TIMEOUT,
            write: WRITE_TIMEOUT,
        }
    }
}

/// How a served connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ended {
    /// The peer closed it between requests.
    Closed,
    /// The owner stopped it (shutdown, revocation, expiry).
    Stopped,
    /// No request within the idle limit.
    Idle,
    /// A frame did not arrive whole within the frame limit.
    SlowFrame {
        /// Bytes of it that arrived.
        partial: usize,
    },
    /// The peer sent a bad frame (it got an error answer).
    BadFrame(String),
    /// The answer could not be written in time.
    SlowReader,
    /// The stream failed or ended inside a frame.
    Broken(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Closed => f.write_str("closed by the peer"),
            Ended::Stopped => f.write_str("closed by this node"),
            Ended::Idle => f.write_str("no request within the idle limit"),
            Ended::SlowFrame { partial } => write!(
                f,
                "a frame did not arrive whole within the frame limit ({partial} bytes did)"
            ),
            Ended::BadFrame(e) => write!(f, "bad frame: {e}"),
            Ended::SlowReader => f.write_str("peer did not read its answer"),
            Ended::Broken(e) => write!(f, "broken: {e}"),
        }
    }
}

/// Serves one connection's byte stream: reads a request, answers it with
/// `handler`'s response, repeats — until the peer closes, a limit is hit, a
/// bad frame arrives, or `stop` resolves. Requests are at most `max_frame`
/// bytes. Generic over the stream so it can be tested without sockets.
pub async fn serve_stream<S, H, Fut, St>(
    stream: &mut S,
    max_frame: usize,
    limits: Limits,
    mut handler: H,
    stop: St,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request) -> Fut,
    Fut: Future<Output = Response>,
    St: Future<Output = ()>,
{
    tokio::pin!(stop);
    let mut ex = ServerExchange::new(max_frame);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut deadline = Instant::now() + limits.idle;
    let mut in_frame = false;
    let ended = loop {
        let (response, bad) = match ex.next_request() {
            Ok(Some(req)) => {
                let response = tokio::select! {
                    r = handler(req) => r,
                    _ = &mut stop => break Ended::Stopped,
                };
                (response, None)
            }
            Ok(None) => {
                if !in_frame && ex.partial() > 0 {
                    in_frame = true;
                    deadline = Instant::now() + limits.frame;
                }
                let read = tokio::select! {
                    r = stream.read(&mut buf) => r,
                    _ = tokio::time::sleep_until(deadline) => break if in_frame {
                        Ended::SlowFrame { partial: ex.partial() }
                    } else {
                        Ended::Idle
                    },
                    _ = &mut stop => break Ended::Stopped,
                };
                match read {
                    Ok(0) => {
                        break match ex.closed() {
                            Ok(()) => Ended::Closed,
                            Err(e) => Ended::Broken(e.to_string()),
                        }
                    }
                    Ok(n) => ex.push(&buf[..n]),
                    // A peer that drops the TCP connection without a TLS
                    // close_notify between requests is just gone.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && ex.partial() == 0 => {
                        break Ended::Closed
                    }
                    Err(e) => break Ended::Broken(e.to_string()),
                }
                continue;
            }
            Err(ExchangeError::Frame(e)) => (
                Err(ApiError::InvalidArgument(format!("bad frame: {e}"))),
                Some(e.to_string()),
            ),
            Err(e) => break Ended::Broken(e.to_string()),
        };
        let bytes = match ex.respond(&response) {
            Ok(b) => b,
            // An answer too large to frame: say so instead.
            Err(e) => match ex.respond(&Err(ApiError::Internal(format!(
                "cannot send the answer: {e}"
            )))) {
                Ok(b) => b,
                Err(e) => break Ended::Broken(e.to_string()),
            },
        };
        let write = async {
            stream.write_all(&bytes).await?;
            stream.flush().await
        };
        let written = tokio::select! {
            w = tokio::time::timeout(limits.write, write) => w,
            _ = &mut stop => break Ended::Stopped,
        };
        match written {
            Err(_) => break Ended::SlowReader,
            Ok(Err(e)) => break Ended::Broken(e.to_string()),
            Ok(Ok(())) => {}
        }
        if let Some(e) = bad {
            break Ended::BadFrame(e);
        }
        in_frame = false;
        deadline = Instant::now() + limits.idle;
    };
    // A TLS close_notify and a FIN, best effort and bounded.
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    ended
}

/// The TCP listener of a node.
#[derive(Debug)]
pub struct Listener {
    listener: TcpListener,
    config: RwLock<Arc<rustls::ServerConfig>>,
    /// Handshakes in progress and anonymous connections.
    budget: SharedBudget,
    /// Members' connections.
    members: Arc<Semaphore>,
}

impl Listener {
    /// Listens on `addr` with `config` (normally [`transport::tls_server_config`]).
    pub async fn bind(
        addr: SocketAddr,
        config: rustls::ServerConfig,
    ) -> Result<Listener, TransportError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| TransportError::Connect {
                addr: addr.to_string(),
                msg: format!("cannot listen on TCP: {e}"),
            })?;
        Ok(Listener {
            listener,
            config: RwLock::new(Arc::new(config)),
            budget: SharedBudget::default(),
            members: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Replaces the TLS config for new connections (certificate renewal).
    pub fn set_config(&self, config: rustls::ServerConfig) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }

    /// Handshakes in progress and anonymous connections now.
    pub fn load(&self) -> (usize, usize) {
        self.budget.load()
    }

    /// The next connection whose source may start a handshake now; others
    /// are closed at once ([`crate::limits::ConnBudget`]).
    pub async fn accept(&self) -> io::Result<Incoming> {
        loop {
            let (stream, remote) = self.listener.accept().await?;
            let place = match self.budget.handshake(remote.ip()) {
                Ok(p) => p,
                Err(busy) => {
                    debug!(%remote, "TLS/TCP connection refused: {busy}");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let config = self
                .config
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            return Ok(Incoming {
                stream,
                remote,
                acceptor: TlsAcceptor::from(config),
                place,
                budget: self.budget.clone(),
                members: self.members.clone(),
            });
        }
    }
}

/// An accepted TCP connection before its TLS handshake.
pub struct Incoming {
    stream: TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    /// Its handshake's place in the budget.
    place: Place,
    budget: SharedBudget,
    members: Arc<Semaphore>,
}

/// What a served connection holds while it lives.
#[derive(Debug)]
enum Slot {
    Anonymous(#[allow(dead_code)] Place),
    Member(#[allow(dead_code)] OwnedSemaphorePermit),
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConn")
            .field("remote", &self.remote)
            .field("peer", &self.peer.as_ref().map(|p| &p.subject))
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// The peer's address.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// Runs the TLS handshake (bounded by [`HANDSHAKE_TIMEOUT`]). On failure
    /// the connection lingers briefly so the peer reads our alert rather than
    /// a reset.
    pub async fn handshake(self) -> Result<ServerConn, String> {
        let accept = self.acceptor.accept(self.stream).into_fallible();
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
            Err(_) => return Err("TLS handshake timed out".into()),
            Ok(Err((e, mut tcp))) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    tcp.shutdown().await?;
                    let mut sink = [0u8; 1024];
                    while tcp.read(&mut sink).await? > 0 {}
                    io::Result::Ok(())
                })
                .await;
                return Err(match tls_error(&e) {
                    Some(t) => metta_trust::describe_tls_error(t),
                    None => e.to_string(),
                });
            }
            Ok(Ok(tls)) => tls,
        };
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(ALPN) {
            return Err("the client did not negotiate ALPN metta/1".into());
        }
        // The verifier accepted the chain; its leaf names the peer.
        let peer = session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| metta_trust::parse_cert(c.as_ref()))
            .transpose()
            .map_err(|e| format!("peer certificate: {e}"))?;
        drop(self.place);
        let slot = match &peer {
            None => Slot::Anonymous(
                self.budget
                    .anonymous(self.remote.ip())
                    .map_err(|busy| busy.to_string())?,
            ),
            Some(_) => Slot::Member(
                self.members
                    .try_acquire_owned()
                    .map_err(|_| "too many member connections".to_string())?,
            ),
        };
        Ok(ServerConn {
            tls,
            remote: self.remote,
            peer,
            _slot: slot,
        })
    }
}

/// A TLS connection from a peer, ready to serve.
pub struct ServerConn {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    remote: SocketAddr,
    peer: Option<CertInfo>,
    _slot: Slot,
}

impl ServerConn {
    /// Who the peer proved to be (`None`: no client certificate).
    pub fn peer(&self) -> Option<&CertInfo> {
        self.peer.as_ref()
    }

    /// The peer's address.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// Serves requests with `handler` until the connection ends or `stop`
    /// resolves (see [`serve_stream`]).
    /// An anonymous peer gets smaller frames, a shorter idle limit and at
    /// most [`crate::limits::ANONYMOUS_LIFETIME`] in all.
    pub async fn serve<H, Fut, St>(mut self, mut limits: Limits, handler: H, stop: St) -> Ended
    where
        H: FnMut(Request) -> Fut,
        Fut: Future<Output = Response>,
        St: Future<Output = ()>,
    {
        if self.peer.is_some() {
            return serve_stream(&mut self.tls, MAX_FRAME_LEN, limits, handler, stop).await;
        }
        limits.idle = limits.idle.min(ANONYMOUS_IDLE_TIMEOUT);
        let lifetime = tokio::time::sleep(crate::limits::ANONYMOUS_LIFETIME);
        let stop = async move {
            tokio::select! {
                _ = stop => {},
                _ = lifetime => {},
            }
        };
        serve_stream(&mut self.tls, ANONYMOUS_MAX_FRAME, limits, handler, stop).await
    }
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
fn tls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Alerts by which a server says it will not talk to us (our certificate,
/// our protocol): retrying with the same credentials will not help.
fn is_refusal_alert(a: &AlertDescription) -> bool {
    matches!(
        a,
        AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateRequired
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::HandshakeFailure
            | AlertDescription::ProtocolVersion
            | AlertDescription::NoApplicationProtocol
    )
}

/// Classifies a failed connect/read/write: a TLS refusal by either side
/// becomes [`TransportError::Refused`], anything else `other(msg)`.
fn classify(
    addr: &str,
    e: &io::Error,
    other: impl FnOnce(String) -> TransportError,
) -> TransportError {
    match tls_error(e) {
        Some(rustls::Error::AlertReceived(a)) if is_refusal_alert(a) => TransportError::Refused {
            addr: addr.into(),
            msg: format!("the server refused us (TLS alert {a:?}): our certificate is revoked, expired or not of this cluster"),
        },
        Some(t @ (rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)) => {
            TransportError::Refused {
                addr: addr.into(),
                msg: metta_trust::describe_tls_error(t),
            }
        }
        Some(t) => other(metta_trust::describe_tls_error(t)),
        None => other(e.to_string()),
    }
}

/// Doubling reconnect delays with jitter, capped. Sans-IO: the caller sleeps
/// and supplies the randomness.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Default for Backoff {
    /// 100 ms doubling up to 5 s.
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

impl Backoff {
    /// Delays start at `initial` and double up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            next: initial,
        }
    }

    /// The delay before the next attempt: between half and all of the
    /// current step (`unit` in `[0, 1]` picks where; pass a random number so
    /// many nodes do not reconnect in lockstep). Then the step doubles.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        step.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    /// After a success: start again from the initial delay.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

struct ClientConn {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    exchange: ClientExchange,
}

/// A TLS/TCP client of a node: one call at a time, reconnecting as needed.
pub struct TcpClient {
    addr: String,
    connector: TlsConnector,
    conn: Option<ClientConn>,
    connects: u64,
    call_timeout: Duration,
}

impl std::fmt::Debug for TcpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpClient")
            .field("addr", &self.addr)
            .field("connected", &self.conn.is_some())
            .field("connects", &self.connects)
            .finish_non_exhaustive()
    }
}

impl TcpClient {
    /// A client of `addr` with a TLS config (normally
    /// [`transport::tls_client_config`]).
    pub fn new(addr: impl Into<String>, tls: rustls::ClientConfig) -> Self {
        TcpClient {
            addr: addr.into(),
            connector: TlsConnector::from(Arc::new(tls)),
            conn: None,
            connects: 0,
            call_timeout: CALL_TIMEOUT,
        }
    }

    /// A client with no certificate that trusts only a server presenting
    /// the CA with `pin` (from a join token): for [`Request::Join`].
    pub fn pinned(addr: impl Into<String>, pin: CaPin) -> Result<Self, TransportError> {
        let tls = transport::tls_client_config(None, &ServerTrust::Pinned(pin))?;
        Ok(Self::new(addr, tls))
    }

    /// A member's client: presents `creds`, trusts servers with a valid
    /// certificate of the cluster whose CA is `ca_der`.
    pub fn member(
        addr: impl Into<String>,
        creds: &Credentials,
        ca_der: &[u8],
    ) -> Result<Self, TransportError> {
        let tls = transport::tls_client_config(
            Some(creds),
            &ServerTrust::Cluster {
                ca_der: ca_der.to_vec(),
                revoked: Arc::new(RwLock::new(RevocationList::default())),
            },
        )?;
        Ok(Self::new(addr, tls))
    }

    /// Sets how long a call waits for its answer.
    pub fn set_call_timeout(&mut self, t: Duration) {
        self.call_timeout = t;
    }

    /// The server address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// How many connections were established so far.
    pub fn connects(&self) -> u64 {
        self.connects
    }

    /// Whether a connection is open (it may have been closed by the server
    /// since; [`call`](Self::call) checks before using it).
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Drops the connection (the next call reconnects).
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// Connects (TCP, then the TLS handshake), bounded by
    /// [`transport::CONNECT_TIMEOUT`] each.
    pub async fn connect(&mut self) -> Result<(), TransportError> {
        self.conn = None;
        let addr = self.addr.clone();
        let connect_err = |msg: String| TransportError::Connect {
            addr: addr.clone(),
            msg,
        };
        let tcp = tokio::time::timeout(transport::CONNECT_TIMEOUT, TcpStream::connect(&addr))
            .await
            .map_err(|_| connect_err("TCP connect timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(SERVER_NAME)
            .map_err(|e| TransportError::Tls(e.to_string()))?
            .to_owned();
        let tls = tokio::time::timeout(
            transport::CONNECT_TIMEOUT,
            self.connector.connect(name, tcp),
        )
        .await
        .map_err(|_| connect_err("TLS handshake timed out".into()))?
        .map_err(|e| classify(&addr, &e, connect_err))?;
        if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
            return Err(TransportError::Refused {
                addr,
                msg: "the server did not negotiate ALPN metta/1".into(),
            });
        }
        self.conn = Some(ClientConn {
            tls,
            exchange: ClientExchange::default(),
        });
        self.connects += 1;
        Ok(())
    }

    /// Whether the open connection was closed by the server (or sent bytes
    /// nobody asked for) while idle. Polls once; never waits.
    fn stale(conn: &mut ClientConn) -> bool {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        !matches!(
            Pin::new(&mut conn.tls).poll_read(&mut cx, &mut buf),
            Poll::Pending
        )
    }

    /// Sends `req` and waits for the answer, connecting first if there is no
    /// open connection (or the server closed the idle one). A failed call
    /// drops the connection; the next call makes a new one. The call itself
    /// is not retried: it may or may not have been served.
    pub async fn call(&mut self, req: &Request) -> Result<Response, TransportError> {
        if self.conn.as_mut().is_some_and(Self::stale) {
            self.conn = None;
        }
        if self.conn.is_none() {
            self.connect().await?;
        }
        let conn = self.conn.as_mut().expect("connected above");
        let addr = self.addr.clone();
        let result = tokio::time::timeout(self.call_timeout, exchange(conn, &addr, req)).await;
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(TransportError::Stream {
                addr: addr.clone(),
                msg: format!("no answer within {:?}", self.call_timeout),
            }),
        };
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    /// Like [`call`](Self::call), with an error answer as [`CallError::Api`].
    pub async fn call_api(&mut self, req: &Request) -> Result<Reply, CallError> {
        match self.call(req).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(CallError::Api(e)),
            Err(e) => Err(CallError::Transport(e)),
        }
    }

    /// Like [`call`](Self::call), but a transport failure (other than a
    /// refusal) is retried after `backoff`'s next delay, until `give_up`.
    /// Only for requests that may be served twice (heartbeats, reads).
    pub async fn call_retrying(
        &mut self,
        req: &Request,
        backoff: &mut Backoff,
        give_up: Instant,
    ) -> Result<Response, TransportError> {
        loop {
            match self.call(req).await {
                Ok(r) => {
                    backoff.reset();
                    return Ok(r);
                }
                Err(e @ TransportError::Refused { .. }) => return Err(e),
                Err(e) => {
                    let delay = backoff.next_delay(rand::random());
                    if Instant::now() + delay >= give_up {
                        return Err(e);
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Waits until the server ends the open connection (returns at once if
    /// there is none), then drops it. The reason is what the read saw.
    pub async fn closed(&mut self) -> Result<(), TransportError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        let mut byte = [0u8; 1];
        let r = conn.tls.read(&mut byte).await;
        self.conn = None;
        match r {
            Ok(0) => Ok(()),
            Ok(_) => Err(TransportError::Stream {
                addr: self.addr.clone(),
                msg: ExchangeError::Unsolicited.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
            Err(e) => Err(classify(&self.addr, &e, |msg| TransportError::Stream {
                addr: self.addr.clone(),
                msg,
            })),
        }
    }
}

/// One request/response on an open connection.
async fn exchange(
    conn: &mut ClientConn,
    addr: &str,
    req: &Request,
) -> Result<Response, TransportError> {
    let stream_err = |msg: String| TransportError::Stream {
        addr: addr.into(),
        msg,
    };
    let bytes = conn
        .exchange
        .request(req)
        .map_err(|e| stream_err(e.to_string()))?;
    let io_err = |e: io::Error| classify(addr, &e, stream_err);
    conn.tls.write_all(&bytes).await.map_err(io_err)?;
    conn.tls.flush().await.map_err(io_err)?;
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = conn.tls.read(&mut buf).await.map_err(io_err)?;
        if n == 0 {
            let e = conn
                .exchange
                .closed()
                .err()
                .unwrap_or(ExchangeError::Closed {
                    awaiting: true,
                    partial: 0,
                });
            return Err(stream_err(e.to_string()));
        }
        match conn.exchange.receive(&buf[..n]) {
            Ok(Some(r)) => return Ok(r),
            Ok(None) => {}
            Err(ExchangeError::Frame(err)) => {
                return Err(TransportError::Frame {
                    addr: addr.into(),
                    err,
                })
            }
            Err(e) => return Err(stream_err(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metta_proto::{frame, ApiRequest};

    fn echo_status(req: Request) -> std::future::Ready<Response> {
        std::future::ready(match req {
            Request::Api(ApiRequest::Status) => Ok(Reply::Done),
            _ => Err(ApiError::InvalidArgument("only status".into())),
        })
    }

    async fn read_response(c: &mut tokio::io::DuplexStream) -> Option<Response> {
        let mut ex = ClientExchange::default();
        let _ = ex.request(&Request::Api(ApiRequest::Status));
        let mut buf = [0u8; 256];
        loop {
            let n = c.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            if let Some(r) = ex.receive(&buf[..n]).ok()? {
                return Some(r);
            }
        }
    }

    fn serve(
        server: tokio::io::DuplexStream,
        max: usize,
    ) -> tokio::task::JoinHandle<(Ended, tokio::io::DuplexStream)> {
        tokio::spawn(async move {
            let mut server = server;
            let ended = serve_stream(
                &mut server,
                max,
                Limits::default(),
                echo_status,
                std::future::pending(),
            )
            .await;
            (ended, server)
        })
    }

    #[tokio::test(start_paused = true)]
    async fn requests_are_answered_in_order_then_idle_connection_closes() {
        let (mut client, server) = tokio::io::duplex(4096);
        let task = serve(server, MAX_FRAME_LEN);
        for _ in 0..3 {
            let bytes = frame::encode(&Request::Api(ApiRequest::Status)).unwrap();
            client.write_all(&bytes).await.unwrap();
            assert_eq!(read_response(&mut client).await, Some(Ok(Reply::Done)));
        }
        let start = Instant::now();
        let (ended, _) = task.await.unwrap();
        assert_eq!(ended, Ended::Idle);
        assert!(start.elapsed() >= IDLE_TIMEOUT);
        assert_eq!(read_response(&mut client).await, None, "closed");
    }

    #[tokio::test(start_paused = true)]
    async fn half_sent_frame_times_out() {
        let (mut client, server) = tokio::io::duplex(4096);
        let task = serve(server, MAX_FRAME_LEN);
        let bytes = frame::encode(&Request::Api(ApiRequest::Status)).unwrap();
        client.write_all(&bytes[..bytes.len() - 1]).await.unwrap();
        let (ended, _) = task.await.unwrap();
        assert_eq!(
            ended,
            Ended::SlowFrame {
                partial: bytes.len() - 1
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn oversized_and_garbage_frames_get_an_error_answer_and_a_close() {
        for bad in [
            (ANONYMOUS_MAX_FRAME as u32 + 1).to_be_bytes().to_vec(),
            vec![0, 0, 0, 3, 0xff, 0xff, 0xff],
            vec![0, 0, 0, 0],
        ] {
            let (mut client, server) = tokio::io::duplex(4096);
            let task = serve(server, ANONYMOUS_MAX_FRAME);
            client.write_all(&bad).await.unwrap();
            match read_response(&mut client).await {
                Some(Err(ApiError::InvalidArgument(m))) => assert!(m.contains("bad frame"), "{m}"),
                other => panic!("{bad:?}: {other:?}"),
            }
            let (ended, _) = task.await.unwrap();
            assert!(matches!(ended, Ended::BadFrame(_)), "{ended:?}");
            assert_eq!(read_response(&mut client).await, None, "closed");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn peer_close_between_requests_is_clean_and_inside_a_frame_is_not() {
        let (client, server) = tokio::io::duplex(4096);
        let task = serve(server, MAX_FRAME_LEN);
        drop(client);
        assert_eq!(task.await.unwrap().0, Ended::Closed);

        let (mut client, server) = tokio::io::duplex(4096);
        let task = serve(server, MAX_FRAME_LEN);
        client.write_all(&[0, 0]).await.unwrap();
        drop(client);
        assert!(matches!(task.await.unwrap().0, Ended::Broken(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn stop_ends_a_connection_mid_request() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve_stream(
                &mut server,
                MAX_FRAME_LEN,
                Limits::default(),
                |_req| std::future::pending::<Response>(),
                async {
                    let _ = rx.await;
                },
            )
            .await
        });
        let bytes = frame::encode(&Request::Api(ApiRequest::Status)).unwrap();
        client.write_all(&bytes).await.unwrap();
        tokio::task::yield_now().await;
        tx.send(()).unwrap();
        assert_eq!(task.await.unwrap(), Ended::Stopped);
        assert_eq!(read_response(&mut client).await, None);
    }

    /// A real TLS listener and client in one process: calls work, and a
    /// connection the server closed while idle is replaced transparently.
    #[tokio::test]
    async fn client_reconnects_transparently_after_an_idle_close() {
        use metta_proto::Subject;
        use metta_trust::{ClusterCa, NodeKey};
        let now = crate::clock::now();
        let ca = ClusterCa::create("lab", now, 3600).unwrap();
        let issue = |subject: Subject| {
            let key = NodeKey::generate().unwrap();
            let csr = metta_trust::make_csr(&key, &subject, "lab").unwrap();
            let cert = match subject {
                Subject::Node(id) => ca.issue_node(
                    &csr,
                    id,
                    metta_proto::Role::Control,
                    now,
                    3600,
                    rand::random(),
                ),
                _ => ca.issue(&csr, &subject, now, 3600, rand::random()),
            }
            .unwrap();
            Credentials::from_pem(&cert.pem, ca.cert_pem(), &key).unwrap()
        };
        let revoked = Arc::new(RwLock::new(RevocationList::default()));
        let server_cfg =
            transport::tls_server_config(&issue(Subject::Node(1)), ca.cert_der(), revoked).unwrap();
        let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), server_cfg)
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (ended_tx, mut ended_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let conn = listener.accept().await.unwrap().handshake().await.unwrap();
                let peer = conn.peer().map(|p| p.subject.clone());
                let ended_tx = ended_tx.clone();
                tokio::spawn(async move {
                    let limits = Limits {
                        idle: Duration::from_millis(200),
                        ..Limits::default()
                    };
                    let handler = move |_req: Request| {
                        let peer = peer.clone();
                        async move {
                            Ok(Reply::Status(metta_proto::ClusterStatus {
                                cluster: "lab".into(),
                                you: peer.unwrap(),
                                leader: None,
                                term: 0,
                                applied: 0,
                                node: 1,
                            }))
                        }
                    };
                    let ended = conn.serve(limits, handler, std::future::pending()).await;
                    let _ = ended_tx.send(ended);
                });
            }
        });

        let mut client = TcpClient::member(&addr, &issue(Subject::Node(2)), ca.cert_der()).unwrap();
        let status = Request::Api(ApiRequest::Status);
        match client.call_api(&status).await {
            Ok(Reply::Status(s)) => assert_eq!(s.you, Subject::Node(2)),
            other => panic!("{other:?}"),
        }
        assert_eq!(ended_rx.recv().await, Some(Ended::Idle));
        client.call_api(&status).await.expect("second call");
        assert_eq!(client.connects(), 2, "reconnected without an error");

        // The wrong cluster's CA: refused, with the reason.
        let other = ClusterCa::create("other", now, 3600).unwrap();
        let mut stranger =
            TcpClient::member(&addr, &issue(Subject::Node(3)), other.cert_der()).unwrap();
        match stranger.call(&status).await {
            Err(TransportError::Refused { .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(100));
        assert_eq!(b.next_delay(0.0), Duration::from_millis(100));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(400));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(500));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(500));
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_millis(100));
    }
}
