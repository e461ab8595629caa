//! A TLS 1.3 client session over rustls's unbuffered API, sans-IO.
//!
//! The caller owns the TCP socket (smoltcp in the kernel, an in-memory pipe
//! in tests) and the clock:
//!
//! ```text
//! let mut s = Session::new(&config, now, &entropy)?;   // ClientHello queued
//! loop {
//!     tcp.send(&s.take_transmit());                    // whatever is due
//!     s.receive(&tcp.recv())?;                         // drive the handshake / records
//!     if let Some(resp) = s.poll_response()? { ... }   // one answer per request
//! }
//! ```
//!
//! On top of TLS a session speaks the TLS/TCP rule of the Metta protocol
//! ([`metta_proto::exchange`], the same code `mettad`'s listener follows): one
//! request frame ([`Session::send_frame`]), then exactly one response frame
//! ([`Session::poll_response`]), then the next request. A request may be sent
//! before the handshake finishes: it is held and encrypted as soon as rustls
//! allows application data.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;

use metta_proto::{ClientExchange, ExchangeError, Request, Response, ALPN};
use rustls::client::{ClientConnectionData, Resumption, UnbufferedClientConnection};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::time_provider::TimeProvider;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, UnbufferedStatus, WriteTraffic,
};
use rustls::ClientConfig;

use crate::cert::LeafInfo;
use crate::error::LinkError;
use crate::key::NodeKey;
use crate::verify::{webpki_problem, LinkVerifier, Rejection, ServerTrust, Verdict};

/// The server name put in the handshake (as `mettad`'s clients do). Metta
/// certificates name their holder in a URI SAN; the name is not checked.
pub const SERVER_NAME: &str = "metta";

/// Default limit on a response frame's payload (1 MiB): a join answer or a
/// heartbeat acknowledgement is a few kilobytes.
pub const DEFAULT_MAX_RESPONSE: usize = 1024 * 1024;

/// Steps of the rustls state machine per call before giving up (each step
/// consumes a record or an internal queue entry; the bound only guards
/// against a livelock).
const MAX_STEPS: usize = 1 << 20;

/// The node's certificate chain and key, for client authentication.
#[derive(Clone)]
pub struct ClientIdentity {
    /// Certificates, DER, the node's own first (then the CA's, as `mettad`
    /// sends it).
    pub chain: Vec<Vec<u8>>,
    /// The node's key.
    pub key: NodeKey,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("chain_len", &self.chain.len())
            .field("key", &self.key)
            .finish()
    }
}

/// How to open a session.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// How the server is authenticated.
    pub trust: ServerTrust,
    /// Our certificate, if we have one (not when joining).
    pub identity: Option<ClientIdentity>,
    /// The largest response payload accepted.
    pub max_response_len: usize,
}

impl LinkConfig {
    /// For joining: trust the server holding the CA with `pin`, no client
    /// certificate.
    pub fn join(pin: crate::CaPin) -> Self {
        LinkConfig {
            trust: ServerTrust::Pinned(pin),
            identity: None,
            max_response_len: DEFAULT_MAX_RESPONSE,
        }
    }

    /// For a member: trust servers of the cluster CA `ca_der`, authenticate
    /// with `identity`.
    pub fn member(ca_der: Vec<u8>, identity: ClientIdentity) -> Self {
        LinkConfig {
            trust: ServerTrust::Cluster {
                ca_der,
                expect: None,
            },
            identity: Some(identity),
            max_response_len: DEFAULT_MAX_RESPONSE,
        }
    }

    /// Also require the server to be `subject` (member sessions only: a
    /// joiner does not know who will answer).
    pub fn expect_server(mut self, subject: metta_proto::Subject) -> Self {
        if let ServerTrust::Cluster { expect, .. } = &mut self.trust {
            *expect = Some(subject);
        }
        self
    }
}

/// The caller's wall clock, as rustls reads it (certificate validity).
#[derive(Debug)]
struct Clock(AtomicU64);

impl TimeProvider for Clock {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(Duration::from_secs(
            self.0.load(Ordering::Relaxed),
        )))
    }
}

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The handshake is under way.
    Handshaking,
    /// Requests can be exchanged.
    Established,
    /// The server closed its side; nothing more will arrive.
    PeerClosed,
    /// We closed the session.
    Closed,
    /// The session failed ([`Session::error`] says why).
    Failed,
}

/// One TLS connection to the control plane. See the module docs.
pub struct Session {
    conn: UnbufferedClientConnection,
    clock: Arc<Clock>,
    verdict: Arc<Verdict>,
    /// TLS bytes received and not yet consumed by rustls.
    incoming: Vec<u8>,
    /// TLS bytes for the caller to send, in order.
    outgoing: Vec<u8>,
    /// Request bytes waiting for rustls to allow application data.
    pending: Vec<u8>,
    /// The one-request-at-a-time rule and the response decoder.
    exchange: ClientExchange,
    response: Option<Response>,
    established: bool,
    server: Option<LeafInfo>,
    close_requested: bool,
    close_sent: bool,
    peer_closed: bool,
    failed: Option<LinkError>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("phase", &self.phase())
            .field("awaiting", &self.exchange.awaiting())
            .field("server", &self.server.as_ref().map(|s| &s.subject))
            .field("incoming", &self.incoming.len())
            .field("outgoing", &self.outgoing.len())
            .finish_non_exhaustive()
    }
}

/// What one step of the state machine asks of the loop.
enum Step {
    Continue,
    Stop,
}

impl Session {
    /// Starts a session: the ClientHello is ready in
    /// [`take_transmit`](Self::take_transmit) when this returns.
    ///
    /// `now` is the wall clock (unix seconds) used to check certificate
    /// validity (update it with [`set_time`](Self::set_time)); `entropy` is
    /// fresh randomness mixed into the random pool ([`crate::rng`]).
    pub fn new(config: &LinkConfig, now: u64, entropy: &[u8; 32]) -> Result<Session, LinkError> {
        crate::rng::add_entropy(entropy);
        let clock = Arc::new(Clock(AtomicU64::new(now)));
        let verdict = Arc::new(Verdict::default());
        let verifier =
            LinkVerifier::new(&config.trust, verdict.clone()).map_err(LinkError::InvalidCa)?;
        let builder =
            ClientConfig::builder_with_details(Arc::new(crate::provider()), clock.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(LinkError::HandshakeFailed)?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier));
        let mut tls = match &config.identity {
            Some(id) => {
                let chain = id
                    .chain
                    .iter()
                    .map(|c| CertificateDer::from(c.clone()))
                    .collect();
                let certified = CertifiedKey::new(chain, id.key.tls_key());
                certified
                    .keys_match()
                    .map_err(|e| LinkError::InvalidIdentity(alloc::format!("{e}")))?;
                builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)))
            }
            None => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = alloc::vec![ALPN.to_vec()];
        // Every connection is a full handshake, so both sides re-check the
        // other's certificate (expiry, revocation) each time.
        tls.resumption = Resumption::disabled();
        let name = ServerName::try_from(SERVER_NAME)
            .map_err(|_| LinkError::InvalidIdentity("bad server name".into()))?;
        let conn = UnbufferedClientConnection::new(Arc::new(tls), name)
            .map_err(LinkError::HandshakeFailed)?;
        let mut s = Session {
            conn,
            clock,
            verdict,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            pending: Vec::new(),
            exchange: ClientExchange::new(config.max_response_len),
            response: None,
            established: false,
            server: None,
            close_requested: false,
            close_sent: false,
            peer_closed: false,
            failed: None,
        };
        s.drive()?;
        Ok(s)
    }

    /// Sets the wall clock (unix seconds) for certificate checks.
    pub fn set_time(&mut self, now: u64) {
        self.clock.0.store(now, Ordering::Relaxed);
    }

    /// Where the connection stands.
    pub fn phase(&self) -> Phase {
        if self.failed.is_some() {
            Phase::Failed
        } else if self.close_requested {
            Phase::Closed
        } else if self.peer_closed {
            Phase::PeerClosed
        } else if self.established {
            Phase::Established
        } else {
            Phase::Handshaking
        }
    }

    /// Whether the handshake is still under way.
    pub fn is_handshaking(&self) -> bool {
        self.phase() == Phase::Handshaking
    }

    /// The error the session failed with, if it did.
    pub fn error(&self) -> Option<&LinkError> {
        self.failed.as_ref()
    }

    /// The server's certificate as verified (after the handshake).
    pub fn server(&self) -> Option<&LeafInfo> {
        self.server.as_ref()
    }

    /// Whether a request is waiting for its answer.
    pub fn awaiting(&self) -> bool {
        self.exchange.awaiting()
    }

    /// Whether TLS bytes are waiting to be sent.
    pub fn wants_transmit(&self) -> bool {
        !self.outgoing.is_empty()
    }

    /// Takes the TLS bytes to send to the server, in order (empty if none).
    /// After a failure this may still hold the alert telling the server why.
    pub fn take_transmit(&mut self) -> Vec<u8> {
        core::mem::take(&mut self.outgoing)
    }

    /// Feeds bytes received from the server and advances the connection.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.check()?;
        self.incoming.extend_from_slice(bytes);
        self.drive()
    }

    /// Queues `req` as the next request frame. Fails with
    /// [`LinkError::Busy`] while the previous request is unanswered (or its
    /// answer not yet taken with [`poll_response`](Self::poll_response)).
    pub fn send_frame(&mut self, req: &Request) -> Result<(), LinkError> {
        self.check()?;
        if self.close_requested {
            return Err(LinkError::Closed);
        }
        if self.peer_closed {
            return Err(LinkError::PeerClosed {
                awaiting: false,
                partial: 0,
            });
        }
        if self.response.is_some() {
            return Err(LinkError::Busy);
        }
        // A refused request (busy, unencodable) leaves the session as it was.
        let bytes = self.exchange.request(req).map_err(exchange_error)?;
        self.pending.extend_from_slice(&bytes);
        self.drive()
    }

    /// The answer to the outstanding request, once it has arrived in full.
    pub fn poll_response(&mut self) -> Result<Option<Response>, LinkError> {
        if let Some(r) = self.response.take() {
            return Ok(Some(r));
        }
        self.check()?;
        Ok(None)
    }

    /// Closes the session: a close_notify is queued for sending (if the
    /// handshake finished). Further requests fail with [`LinkError::Closed`].
    pub fn close(&mut self) {
        if self.failed.is_some() || self.close_requested {
            return;
        }
        self.close_requested = true;
        if self.established {
            // Errors here leave the session failed; closing needs no answer.
            let _ = self.drive();
        }
    }

    /// Call when the TCP connection ended (the server closed it): fine
    /// between exchanges, an error during the handshake or while an answer
    /// is due.
    pub fn connection_closed(&mut self) -> Result<(), LinkError> {
        self.check()?;
        let mid_handshake = !self.established && !self.close_requested;
        self.peer_closed = true;
        if mid_handshake {
            return self.fail(LinkError::PeerClosed {
                awaiting: self.exchange.awaiting(),
                partial: 0,
            });
        }
        match self.exchange.closed() {
            Ok(()) => Ok(()),
            Err(e) => self.fail(exchange_error(e)),
        }
    }

    fn check(&self) -> Result<(), LinkError> {
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn fail<T>(&mut self, e: LinkError) -> Result<T, LinkError> {
        self.failed = Some(e.clone());
        self.pending.clear();
        Err(e)
    }

    /// Runs rustls until it needs more input from the server.
    fn drive(&mut self) -> Result<(), LinkError> {
        self.check()?;
        let mut plain = Vec::new();
        for _ in 0..MAX_STEPS {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let step = match state {
                Err(e) => {
                    self.incoming.drain(..discard);
                    let err = self.classify(e);
                    self.flush_alert();
                    return self.fail(err);
                }
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    let mut bad = None;
                    while let Some(rec) = r.next_record() {
                        match rec {
                            Ok(rec) => {
                                discard += rec.discard;
                                plain.extend_from_slice(rec.payload);
                            }
                            Err(e) => {
                                bad = Some(e);
                                break;
                            }
                        }
                    }
                    if let Some(e) = bad {
                        self.incoming.drain(..discard);
                        let err = self.classify(e);
                        return self.fail(err);
                    }
                    Step::Continue
                }
                Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                    encode_into(&mut enc, &mut self.outgoing);
                    Step::Continue
                }
                Ok(ConnectionState::TransmitTlsData(mut t)) => {
                    let mut res = Ok(());
                    if let Some(mut w) = t.may_encrypt_app_data() {
                        res = encrypt_into(&mut w, &self.pending, &mut self.outgoing);
                        self.pending.clear();
                    }
                    t.done();
                    if let Err(e) = res {
                        self.incoming.drain(..discard);
                        return self.fail(e);
                    }
                    Step::Continue
                }
                Ok(ConnectionState::WriteTraffic(mut w)) => {
                    let mut res = encrypt_into(&mut w, &self.pending, &mut self.outgoing);
                    self.pending.clear();
                    if res.is_ok() && self.close_requested && !self.close_sent {
                        self.close_sent = true;
                        res = close_into(&mut w, &mut self.outgoing);
                    }
                    if let Err(e) = res {
                        self.incoming.drain(..discard);
                        return self.fail(e);
                    }
                    if !self.established {
                        self.established = true;
                        self.server = self.verdict.accepted();
                    }
                    Step::Stop
                }
                Ok(ConnectionState::PeerClosed) => {
                    self.peer_closed = true;
                    Step::Continue
                }
                Ok(ConnectionState::BlockedHandshake) | Ok(ConnectionState::Closed) => Step::Stop,
                // Early data is server-only; future states: wait for input.
                Ok(_) => Step::Stop,
            };
            self.incoming.drain(..discard);
            if !plain.is_empty() {
                let data = core::mem::take(&mut plain);
                self.on_plaintext(&data)?;
            }
            if let Step::Stop = step {
                if self.peer_closed {
                    if let Err(e) = self.exchange.closed() {
                        return self.fail(exchange_error(e));
                    }
                }
                return Ok(());
            }
        }
        self.fail(LinkError::Tls(rustls::Error::General(
            "the TLS state machine made no progress".into(),
        )))
    }

    /// Application bytes from the server: the answer to the outstanding
    /// request, never anything else.
    fn on_plaintext(&mut self, data: &[u8]) -> Result<(), LinkError> {
        match self.exchange.receive(data) {
            Ok(None) => Ok(()),
            Ok(Some(r)) => {
                self.response = Some(r);
                Ok(())
            }
            Err(e) => self.fail(exchange_error(e)),
        }
    }

    /// The error to report for a rustls failure.
    fn classify(&self, e: rustls::Error) -> LinkError {
        if let Some(r) = self.verdict.rejection() {
            return match r {
                Rejection::PinMismatch => LinkError::PinMismatch,
                Rejection::Cert(p) => LinkError::CertificateRejected(p),
            };
        }
        match e {
            rustls::Error::FailedToGetRandomBytes => LinkError::NoEntropy,
            rustls::Error::AlertReceived(a) => LinkError::ServerAlert(a),
            e @ rustls::Error::InvalidCertificate(_) if !self.established => {
                LinkError::CertificateRejected(webpki_problem(&e))
            }
            e if self.established => LinkError::Tls(e),
            e => LinkError::HandshakeFailed(e),
        }
    }

    /// After a failure rustls holds the alert telling the server why: move it
    /// to the outgoing bytes. Exactly one more call into rustls: the alert is
    /// the first thing it hands out; calling again would make it parse the
    /// rest of the (possibly garbage) input of a dead connection.
    fn flush_alert(&mut self) {
        let status = self.conn.process_tls_records(&mut self.incoming);
        if let Ok(ConnectionState::EncodeTlsData(mut enc)) = status.state {
            encode_into(&mut enc, &mut self.outgoing);
        }
    }
}

/// The exchange rule's errors in link terms.
fn exchange_error(e: ExchangeError) -> LinkError {
    match e {
        ExchangeError::Busy => LinkError::Busy,
        ExchangeError::Closed { awaiting, partial } => LinkError::PeerClosed { awaiting, partial },
        ExchangeError::Frame(f) => LinkError::BadFrame(f),
        // `Unsolicited`, and the server-side `NoRequest` that a client never
        // sees: the server said something nobody asked for.
        _ => LinkError::Unsolicited,
    }
}

/// Appends a handshake record to `out`.
fn encode_into(enc: &mut EncodeTlsData<'_, ClientConnectionData>, out: &mut Vec<u8>) {
    let start = out.len();
    let need = match enc.encode(&mut []) {
        Ok(_) | Err(EncodeError::AlreadyEncoded) => return,
        Err(EncodeError::InsufficientSize(s)) => s.required_size,
    };
    out.resize(start + need, 0);
    match enc.encode(&mut out[start..]) {
        Ok(n) => out.truncate(start + n),
        Err(_) => out.truncate(start),
    }
}

/// Encrypts `data` as application records appended to `out`.
fn encrypt_into(
    w: &mut WriteTraffic<'_, ClientConnectionData>,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), LinkError> {
    if data.is_empty() {
        return Ok(());
    }
    // Per 16 KiB record: 5 bytes of header, 1 of content type, 16 of tag.
    let bound = data.len() + (data.len() / 16384 + 1) * 32;
    let start = out.len();
    out.resize(start + bound, 0);
    let n = match w.encrypt(data, &mut out[start..]) {
        Ok(n) => Ok(n),
        Err(EncryptError::InsufficientSize(s)) => {
            out.resize(start + s.required_size, 0);
            w.encrypt(data, &mut out[start..])
        }
        Err(e) => Err(e),
    };
    match n {
        Ok(n) => {
            out.truncate(start + n);
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(LinkError::Tls(rustls::Error::General(alloc::format!(
                "{e}"
            ))))
        }
    }
}

/// Appends a close_notify alert to `out`.
fn close_into(
    w: &mut WriteTraffic<'_, ClientConnectionData>,
    out: &mut Vec<u8>,
) -> Result<(), LinkError> {
    let start = out.len();
    out.resize(start + 64, 0);
    let n = match w.queue_close_notify(&mut out[start..]) {
        Ok(n) => Ok(n),
        Err(EncryptError::InsufficientSize(s)) => {
            out.resize(start + s.required_size, 0);
            w.queue_close_notify(&mut out[start..])
        }
        Err(e) => Err(e),
    };
    match n {
        Ok(n) => {
            out.truncate(start + n);
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(LinkError::Tls(rustls::Error::General(alloc::format!(
                "{e}"
            ))))
        }
    }
}
