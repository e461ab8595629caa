//! Server certificate verification: the two ways a native node trusts the
//! control plane, mirroring `metta_trust`'s `PinnedServerVerifier` and
//! `ClusterServerVerifier`.
//!
//! - [`ServerTrust::Pinned`] (joining): the server must present, after its own
//!   certificate, the CA certificate whose [`CaPin`] the join token carries;
//!   its certificate must chain to that CA and pass the Metta checks for the
//!   cluster the CA names.
//! - [`ServerTrust::Cluster`] (a member): the server's certificate must chain
//!   to the cluster CA the node received at join, pass the Metta checks and,
//!   if asked, name an expected subject.
//!
//! The chain is checked by webpki (inside rustls) with this crate's P-256
//! algorithm; the Metta rules by [`crate::cert`]. The TLS server name is not
//! checked: Metta certificates name their holder in a URI SAN, not a DNS name.
//!
//! rustls reports a verifier's refusal as a generic certificate error (the
//! alert the server receives); the precise reason is kept on the side, in a
//! [`Verdict`] the [`crate::Session`] reads to report
//! [`crate::LinkError::PinMismatch`] or
//! [`crate::LinkError::CertificateRejected`].

use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use metta_proto::Subject;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use spin::Mutex;

use crate::cert::{ca_cluster, check_server_leaf, CertProblem, LeafInfo};
use crate::provider::ALGORITHMS;
use crate::token::CaPin;

/// How the node decides whether to trust the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTrust {
    /// Joining: a server presenting the CA certificate with this pin.
    Pinned(CaPin),
    /// A member: a server holding a certificate of this cluster CA.
    Cluster {
        /// The cluster CA certificate (DER), as received at join.
        ca_der: Vec<u8>,
        /// Also require the server to be this subject.
        expect: Option<Subject>,
    },
}

/// Why the verifier refused the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// The pinned CA certificate was not in the server's chain.
    PinMismatch,
    /// A certificate failed a check.
    Cert(CertProblem),
}

impl From<CertProblem> for Rejection {
    fn from(p: CertProblem) -> Self {
        Rejection::Cert(p)
    }
}

/// The outcome of the last certificate check, shared between the verifier
/// (inside rustls) and the session.
#[derive(Debug, Default)]
pub(crate) struct Verdict(Mutex<Option<Result<LeafInfo, Rejection>>>);

impl Verdict {
    fn set(&self, v: Result<LeafInfo, Rejection>) {
        *self.0.lock() = Some(v);
    }

    /// The accepted server certificate, if the check passed.
    pub(crate) fn accepted(&self) -> Option<LeafInfo> {
        match &*self.0.lock() {
            Some(Ok(info)) => Some(info.clone()),
            _ => None,
        }
    }

    /// Why the check failed, if it did.
    pub(crate) fn rejection(&self) -> Option<Rejection> {
        match &*self.0.lock() {
            Some(Err(r)) => Some(r.clone()),
            _ => None,
        }
    }
}

enum Mode {
    Pinned(CaPin),
    Cluster {
        roots: RootCertStore,
        cluster: String,
        expect: Option<Subject>,
    },
}

/// The rustls verifier for both modes.
pub(crate) struct LinkVerifier {
    mode: Mode,
    verdict: Arc<Verdict>,
}

impl fmt::Debug for LinkVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.mode {
            Mode::Pinned(pin) => write!(f, "LinkVerifier(pinned {pin})"),
            Mode::Cluster {
                cluster, expect, ..
            } => write!(f, "LinkVerifier(cluster {cluster}, expect {expect:?})"),
        }
    }
}

fn roots_of(ca_der: &[u8]) -> Result<RootCertStore, CertProblem> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_der.to_vec()))
        .map_err(|_| CertProblem::InvalidCa("unusable as a trust anchor"))?;
    Ok(roots)
}

/// webpki's verdict in Metta terms.
pub(crate) fn webpki_problem(e: &rustls::Error) -> CertProblem {
    match e {
        rustls::Error::InvalidCertificate(ce) => match ce {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                CertProblem::UntrustedIssuer
            }
            CertificateError::ExpiredContext { not_after, .. } => CertProblem::Expired {
                not_after: not_after.as_secs(),
            },
            CertificateError::NotValidYetContext { not_before, .. } => CertProblem::NotYetValid {
                not_before: not_before.as_secs(),
            },
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                CertProblem::WrongEku
            }
            CertificateError::BadEncoding => {
                CertProblem::Malformed("webpki cannot decode it".to_string())
            }
            other => CertProblem::Chain(alloc::format!("{other:?}")),
        },
        other => CertProblem::Chain(other.to_string()),
    }
}

/// The certificate error rustls turns into the alert the server receives.
fn tls_error(r: &Rejection) -> rustls::Error {
    rustls::Error::InvalidCertificate(match r {
        Rejection::PinMismatch | Rejection::Cert(CertProblem::UntrustedIssuer) => {
            CertificateError::UnknownIssuer
        }
        Rejection::Cert(CertProblem::Expired { .. }) => CertificateError::Expired,
        Rejection::Cert(CertProblem::NotYetValid { .. }) => CertificateError::NotValidYet,
        Rejection::Cert(CertProblem::WrongEku) => CertificateError::InvalidPurpose,
        Rejection::Cert(CertProblem::Malformed(_)) => CertificateError::BadEncoding,
        Rejection::Cert(_) => CertificateError::ApplicationVerificationFailure,
    })
}

fn chain(
    end_entity: &CertificateDer<'_>,
    roots: &RootCertStore,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<(), CertProblem> {
    let parsed = ParsedCertificate::try_from(end_entity).map_err(|e| webpki_problem(&e))?;
    verify_server_cert_signed_by_trust_anchor(&parsed, roots, intermediates, now, ALGORITHMS.all)
        .map_err(|e| webpki_problem(&e))
}

impl LinkVerifier {
    /// A verifier for `trust`, reporting into `verdict`. Fails if a cluster
    /// CA certificate is not a usable Metta CA.
    pub(crate) fn new(trust: &ServerTrust, verdict: Arc<Verdict>) -> Result<Self, CertProblem> {
        let mode = match trust {
            ServerTrust::Pinned(pin) => Mode::Pinned(*pin),
            ServerTrust::Cluster { ca_der, expect } => Mode::Cluster {
                cluster: ca_cluster(ca_der)?,
                roots: roots_of(ca_der)?,
                expect: expect.clone(),
            },
        };
        Ok(LinkVerifier { mode, verdict })
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<LeafInfo, Rejection> {
        match &self.mode {
            Mode::Pinned(pin) => {
                let ca = intermediates
                    .iter()
                    .find(|c| pin.matches(c))
                    .ok_or(Rejection::PinMismatch)?;
                let cluster = ca_cluster(ca)?;
                chain(end_entity, &roots_of(ca)?, intermediates, now)?;
                Ok(check_server_leaf(
                    end_entity,
                    &cluster,
                    now.as_secs(),
                    None,
                )?)
            }
            Mode::Cluster {
                roots,
                cluster,
                expect,
            } => {
                chain(end_entity, roots, intermediates, now)?;
                Ok(check_server_leaf(
                    end_entity,
                    cluster,
                    now.as_secs(),
                    expect.as_ref(),
                )?)
            }
        }
    }
}

impl ServerCertVerifier for LinkVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = self.check(end_entity, intermediates, now);
        let out = match &result {
            Ok(_) => Ok(ServerCertVerified::assertion()),
            Err(r) => Err(tls_error(r)),
        };
        self.verdict.set(result);
        out
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &ALGORITHMS)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &ALGORITHMS)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ALGORITHMS.supported_schemes()
    }
}
