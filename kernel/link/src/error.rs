//! What can go wrong on a link.

use alloc::string::String;
use core::fmt;

use metta_proto::FrameError;
use rustls::AlertDescription;

use crate::cert::CertProblem;

/// Why a [`crate::Session`] failed. Errors are sticky: once a session has
/// failed, every call returns the same error and the TCP connection should be
/// dropped.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LinkError {
    /// The cluster CA certificate given for [`crate::ServerTrust::Cluster`]
    /// is unusable.
    InvalidCa(CertProblem),
    /// The node's certificate chain or key is unusable (e.g. the key does not
    /// belong to the certificate).
    InvalidIdentity(String),
    /// The random pool was never seeded ([`crate::rng::add_entropy`]).
    NoEntropy,
    /// The server did not present the cluster CA pinned by the join token:
    /// the wrong cluster, or a man in the middle.
    PinMismatch,
    /// The server's certificate was refused.
    CertificateRejected(CertProblem),
    /// The server sent a TLS alert: during the handshake this usually means it
    /// refused our certificate (`bad_certificate`, `certificate_revoked`,
    /// `certificate_expired`, `unknown_ca`) or has nothing in common with us.
    ServerAlert(AlertDescription),
    /// The TLS handshake failed (protocol error, garbage from the peer, no
    /// common parameters).
    HandshakeFailed(rustls::Error),
    /// TLS failed after the handshake (a corrupted or forged record).
    Tls(rustls::Error),
    /// The server's bytes are not a valid response frame (or a request could
    /// not be encoded).
    BadFrame(FrameError),
    /// A request was sent while the previous one is unanswered (one request
    /// at a time per connection).
    Busy,
    /// The server sent data while no request was outstanding.
    Unsolicited,
    /// The server closed the connection.
    PeerClosed {
        /// A request was waiting for its answer.
        awaiting: bool,
        /// Bytes of an incomplete frame left over.
        partial: usize,
    },
    /// This side closed the session.
    Closed,
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::InvalidCa(p) => write!(f, "unusable cluster CA certificate: {p}"),
            LinkError::InvalidIdentity(m) => write!(f, "unusable node identity: {m}"),
            LinkError::NoEntropy => {
                f.write_str("no entropy: the random pool was never seeded (add_entropy)")
            }
            LinkError::PinMismatch => f.write_str(
                "the server did not present the cluster CA pinned by the join token: wrong cluster, or a man in the middle",
            ),
            LinkError::CertificateRejected(p) => write!(f, "server certificate rejected: {p}"),
            LinkError::ServerAlert(a) => write!(f, "the server sent TLS alert {a:?}"),
            LinkError::HandshakeFailed(e) => write!(f, "TLS handshake failed: {e}"),
            LinkError::Tls(e) => write!(f, "TLS failure: {e}"),
            LinkError::BadFrame(e) => write!(f, "bad frame: {e}"),
            LinkError::Busy => f.write_str("the previous request is not answered yet"),
            LinkError::Unsolicited => f.write_str("the server sent data nobody asked for"),
            LinkError::PeerClosed { awaiting, partial } => {
                f.write_str("the server closed the connection")?;
                if *awaiting {
                    f.write_str(" before the answer arrived")?;
                }
                if *partial > 0 {
                    write!(f, " inside a frame ({partial} bytes of it arrived)")?;
                }
                Ok(())
            }
            LinkError::Closed => f.write_str("the session is closed"),
        }
    }
}

impl core::error::Error for LinkError {}
