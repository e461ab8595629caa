//! rustls certificate verifiers for Metta connections.
//!
//! - [`ClusterClientVerifier`] (server side): the client's chain must lead to the
//!   cluster CA (webpki), then [`check_cert`] with [`Purpose::Client`] and the
//!   current revocation list. Clients **without** a certificate are let through
//!   the handshake: the application sees no peer certificate and allows them only
//!   to join.
//! - [`ClusterServerVerifier`] (client side): the server's chain must lead to the
//!   cluster CA, then [`check_cert`] with [`Purpose::Server`], optionally
//!   requiring a particular subject. Metta certificates carry URI SANs, not DNS
//!   names, so the TLS server name is **not** checked; identity comes from the
//!   URI SAN instead.
//! - [`PinnedServerVerifier`] (joining machine): the server must present, after
//!   its own certificate, the CA certificate whose [`CaPin`] the join token
//!   carries; the chain must lead to it and the server certificate must pass
//!   [`check_cert`] for the cluster that CA names. **Servers must therefore send
//!   the CA certificate as the last element of their chain.**
//!
//! All three verify handshake signatures with the `ring` provider's algorithms.
//! Time is whatever rustls passes in (its `TimeProvider`).

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use metta_proto::Subject;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime as TlsTime};

use crate::ca::{ca_cluster_name, CaError, CaPin};
use crate::cert::{check_cert, CertError, Purpose, RevocationList};

/// A revocation list shared between the verifiers and whoever updates it.
pub type SharedRevocations = Arc<RwLock<RevocationList>>;

/// Why a verifier could not be built.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum VerifierError {
    /// The CA certificate is unusable.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// rustls refused the configuration.
    #[error("cannot build the certificate verifier: {0}")]
    Build(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

fn roots_of(ca_der: &[u8]) -> Result<Arc<RootCertStore>, VerifierError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_der.to_vec()))
        .map_err(|e| VerifierError::Build(e.to_string()))?;
    Ok(Arc::new(roots))
}

fn read(list: &SharedRevocations) -> std::sync::RwLockReadGuard<'_, RevocationList> {
    // A writer that panicked leaves the list as it was; keep using it.
    list.read().unwrap_or_else(|e| e.into_inner())
}

fn secs(t: u64) -> TlsTime {
    TlsTime::since_unix_epoch(Duration::from_secs(t))
}

/// Maps a Metta certificate error onto the closest rustls error (so the peer
/// gets a meaningful alert); Metta-specific ones keep their message.
fn tls_error(e: CertError, now: TlsTime) -> rustls::Error {
    rustls::Error::InvalidCertificate(match e {
        CertError::Expired { not_after } => CertificateError::ExpiredContext {
            time: now,
            not_after: secs(not_after),
        },
        CertError::NotYetValid { not_before } => CertificateError::NotValidYetContext {
            time: now,
            not_before: secs(not_before),
        },
        CertError::Revoked { .. } => CertificateError::Revoked,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    })
}

/// The Metta certificate error inside a rustls error, if the handshake failed
/// on a Metta rule (rather than in webpki or the TLS protocol).
pub fn cert_error(e: &rustls::Error) -> Option<&CertError> {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<CertError>()
        }
        _ => None,
    }
}

/// A user-facing description of a handshake error: the Metta message when a
/// Metta rule failed (rustls itself would print its debug form), else rustls's.
pub fn describe_tls_error(e: &rustls::Error) -> String {
    match cert_error(e) {
        Some(ce) => format!("invalid peer certificate: {ce}"),
        None => e.to_string(),
    }
}

/// Server side: accepts clients with a valid cluster certificate, and clients
/// with no certificate at all (joiners).
pub struct ClusterClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    cluster: String,
    revoked: SharedRevocations,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for ClusterClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterClientVerifier")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl ClusterClientVerifier {
    /// A verifier trusting only the cluster CA `ca_der` (DER), consulting
    /// `revoked` on every handshake.
    pub fn new(ca_der: &[u8], revoked: SharedRevocations) -> Result<Self, VerifierError> {
        let cluster = ca_cluster_name(ca_der)?;
        let inner = WebPkiClientVerifier::builder_with_provider(roots_of(ca_der)?, provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| VerifierError::Build(e.to_string()))?;
        Ok(ClusterClientVerifier {
            inner,
            cluster,
            revoked,
            algs: algorithms(),
        })
    }

    /// The cluster name read from the CA certificate.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }
}

impl ClientCertVerifier for ClusterClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: TlsTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_cert(
            end_entity,
            &self.cluster,
            now.as_secs(),
            Purpose::Client,
            &read(&self.revoked),
        )
        .map_err(|e| tls_error(e, now))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// What a server certificate is checked against.
struct ServerPolicy<'a> {
    roots: &'a RootCertStore,
    cluster: &'a str,
    revoked: &'a RevocationList,
    expected: Option<&'a Subject>,
    /// The server must be a control node (its certificate's role).
    control_only: bool,
    algs: &'a WebPkiSupportedAlgorithms,
}

impl ServerPolicy<'_> {
    /// Chain to `roots` (webpki, EKU serverAuth), then the Metta checks.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: TlsTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let info = check_cert(
            end_entity,
            self.cluster,
            now.as_secs(),
            Purpose::Server,
            self.revoked,
        )
        .map_err(|e| tls_error(e, now))?;
        if let Some(expected) = self.expected {
            if *expected != info.subject {
                return Err(tls_error(
                    CertError::WrongSubject {
                        expected: expected.clone(),
                        found: info.subject,
                    },
                    now,
                ));
            }
        }
        if self.control_only && info.role != Some(metta_proto::Role::Control) {
            return Err(tls_error(
                CertError::NotControl {
                    found: info.subject,
                },
                now,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }
}

/// Client side, for members: the server must hold a valid certificate of the
/// cluster (and, if set, name the expected subject).
pub struct ClusterServerVerifier {
    roots: Arc<RootCertStore>,
    cluster: String,
    revoked: SharedRevocations,
    expected: Option<Subject>,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for ClusterServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterServerVerifier")
            .field("cluster", &self.cluster)
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl ClusterServerVerifier {
    /// A verifier trusting only the cluster CA `ca_der` (DER), consulting
    /// `revoked` on every handshake.
    pub fn new(ca_der: &[u8], revoked: SharedRevocations) -> Result<Self, VerifierError> {
        Ok(ClusterServerVerifier {
            cluster: ca_cluster_name(ca_der)?,
            roots: roots_of(ca_der)?,
            revoked,
            expected: None,
            algs: algorithms(),
        })
    }

    /// Also require the server to be `subject` (e.g. the node we dialled).
    pub fn expect_subject(mut self, subject: Subject) -> Self {
        self.expected = Some(subject);
        self
    }

    /// The cluster name read from the CA certificate.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: TlsTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        ServerPolicy {
            roots: &self.roots,
            cluster: &self.cluster,
            revoked: &read(&self.revoked),
            expected: self.expected.as_ref(),
            // Members reach workers too (the leader asks them about their
            // domains): who is meant is checked by name.
            control_only: false,
            algs: &self.algs,
        }
        .verify(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Client side, for a joining machine that knows only the CA pin from its join
/// token.
pub struct PinnedServerVerifier {
    pin: CaPin,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for PinnedServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedServerVerifier")
            .field("pin", &self.pin)
            .finish_non_exhaustive()
    }
}

impl PinnedServerVerifier {
    /// A verifier accepting only servers of the cluster whose CA has `pin`.
    pub fn new(pin: CaPin) -> Self {
        PinnedServerVerifier {
            pin,
            algs: algorithms(),
        }
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: TlsTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| self.pin.matches(c))
            .ok_or_else(|| tls_error(CertError::PinMismatch, now))?;
        let bad_ca = |e: &dyn std::error::Error| {
            tls_error(
                CertError::Malformed(format!("the pinned CA certificate is unusable: {e}")),
                now,
            )
        };
        let cluster = ca_cluster_name(ca).map_err(|e| bad_ca(&e))?;
        let roots = roots_of(ca).map_err(|e| bad_ca(&e))?;
        ServerPolicy {
            roots: &roots,
            cluster: &cluster,
            revoked: &RevocationList::default(),
            expected: None,
            // A joining machine hands its token to the server: only a
            // control node (whose certificate says so) may have it.
            control_only: true,
            algs: &self.algs,
        }
        .verify(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::ClusterCa;
    use crate::cert::tests::custom;
    use crate::keys::{make_csr, NodeKey};
    use rcgen::ExtendedKeyUsagePurpose;
    use rustls::time_provider::TimeProvider;
    use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

    const T0: u64 = 1_700_000_000;

    #[derive(Debug)]
    struct FixedTime(u64);
    impl TimeProvider for FixedTime {
        fn current_time(&self) -> Option<TlsTime> {
            Some(secs(self.0))
        }
    }

    /// A party: key + chain (leaf first).
    struct Party {
        key: NodeKey,
        chain: Vec<CertificateDer<'static>>,
    }

    fn party(ca: &ClusterCa, subject: Subject, lifetime: u64, with_ca: bool) -> Party {
        let key = NodeKey::generate().unwrap();
        let csr = make_csr(&key, &subject, ca.cluster()).unwrap();
        // Nodes in these tests are control nodes (as a pinned server must be).
        let cert = match subject {
            Subject::Node(id) => {
                ca.issue_node(&csr, id, metta_proto::Role::Control, T0, lifetime, [3; 16])
            }
            _ => ca.issue(&csr, &subject, T0, lifetime, [3; 16]),
        }
        .unwrap();
        let mut chain = vec![CertificateDer::from(cert.der)];
        if with_ca {
            chain.push(CertificateDer::from(ca.cert_der().to_vec()));
        }
        Party { key, chain }
    }

    fn server_config(
        ca: &ClusterCa,
        me: &Party,
        revoked: SharedRevocations,
        now: u64,
    ) -> ServerConfig {
        ServerConfig::builder_with_details(provider(), Arc::new(FixedTime(now)))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(Arc::new(
                ClusterClientVerifier::new(ca.cert_der(), revoked).unwrap(),
            ))
            .with_single_cert(me.chain.clone(), me.key.tls_private_key())
            .unwrap()
    }

    fn client_config(
        verifier: Arc<dyn ServerCertVerifier>,
        me: Option<&Party>,
        now: u64,
    ) -> ClientConfig {
        let b = ClientConfig::builder_with_details(provider(), Arc::new(FixedTime(now)))
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        match me {
            Some(p) => b
                .with_client_auth_cert(p.chain.clone(), p.key.tls_private_key())
                .unwrap(),
            None => b.with_no_client_auth(),
        }
    }

    #[derive(Debug)]
    enum Failed {
        Client(rustls::Error),
        Server(rustls::Error),
    }

    /// Pumps bytes between the two ends until both finish the handshake (and the
    /// server has seen the client's first flight in TLS 1.3) or one fails.
    fn handshake(client: ClientConfig, server: ServerConfig) -> Result<ServerConnection, Failed> {
        let mut c = ClientConnection::new(Arc::new(client), ServerName::try_from("metta").unwrap())
            .unwrap();
        let mut s = ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                s.read_tls(&mut &buf[..]).unwrap();
                s.process_new_packets().map_err(Failed::Server)?;
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                c.read_tls(&mut &buf[..]).unwrap();
                c.process_new_packets().map_err(Failed::Client)?;
            }
            if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
                return Ok(s);
            }
        }
        panic!("handshake did not finish");
    }

    fn rl() -> SharedRevocations {
        Arc::new(RwLock::new(RevocationList::default()))
    }

    fn cluster_verifier(ca: &ClusterCa, revoked: SharedRevocations) -> Arc<dyn ServerCertVerifier> {
        Arc::new(ClusterServerVerifier::new(ca.cert_der(), revoked).unwrap())
    }

    fn peer_subject(s: &ServerConnection) -> Option<Subject> {
        s.peer_certificates()
            .map(|c| crate::cert::parse_cert(&c[0]).unwrap().subject)
    }

    #[test]
    fn mutual_tls_succeeds() {
        let ca = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        let server = party(&ca, Subject::Node(1), 3600, false);
        let client = party(&ca, Subject::User("alice".into()), 3600, false);
        let s = handshake(
            client_config(cluster_verifier(&ca, rl()), Some(&client), T0 + 10),
            server_config(&ca, &server, rl(), T0 + 10),
        )
        .unwrap();
        assert_eq!(peer_subject(&s), Some(Subject::User("alice".into())));
    }

    #[test]
    fn expected_subject_is_enforced() {
        let ca = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        let server = party(&ca, Subject::Node(1), 3600, false);
        let client = party(&ca, Subject::Node(2), 3600, false);
        let ok = ClusterServerVerifier::new(ca.cert_der(), rl())
            .unwrap()
            .expect_subject(Subject::Node(1));
        handshake(
            client_config(Arc::new(ok), Some(&client), T0),
            server_config(&ca, &server, rl(), T0),
        )
        .unwrap();
        let wrong = ClusterServerVerifier::new(ca.cert_der(), rl())
            .unwrap()
            .expect_subject(Subject::Node(9));
        let err = handshake(
            client_config(Arc::new(wrong), Some(&client), T0),
            server_config(&ca, &server, rl(), T0),
        )
        .unwrap_err();
        let Failed::Client(e) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(
            cert_error(e),
            Some(&CertError::WrongSubject {
                expected: Subject::Node(9),
                found: Subject::Node(1)
            })
        );
        assert_eq!(
            describe_tls_error(e),
            "invalid peer certificate: connected to node/1, but expected node/9"
        );
    }

    #[test]
    fn anonymous_client_is_admitted_without_identity() {
        let ca = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        let server = party(&ca, Subject::Node(1), 3600, true);
        let s = handshake(
            client_config(Arc::new(PinnedServerVerifier::new(ca.pin())), None, T0),
            server_config(&ca, &server, rl(), T0),
        )
        .unwrap();
        assert_eq!(peer_subject(&s), None);
    }

    #[test]
    fn foreign_ca_client_fails() {
        let ca = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        // same cluster name, different CA
        let impostor_ca = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        let server = party(&ca, Subject::Node(1), 3600, false);
        let client = party(&impostor_ca, Subject::User("admin".into()), 3600, false);
        let err = handshake(
            client_config(cluster_verifier(&ca, rl()), Some(&client), T0),
            server_config(&ca, &server, rl(), T0),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                // same issuer name, other key: webpki reports the bad signature
                Failed::Server(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature
                ))
            ),
            "{err:?}"
        );
        // and the client refuses a server of the impostor CA
        let impostor = party(&impostor_ca, Subject::Node(1), 3600, false);
        let err = handshake(
            client_config(cluster_verifier(&ca, rl()), Some(&client), T0),
            server_config(&impostor_ca, &impostor, rl(), T0),
        )
        .unwrap_err();
        assert!(matches!(err, Failed::Client(_)), "{err:?}");
    }

    #[test]
    fn expired_client_cert_fails() {
        let ca = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        let server = party(&ca, Subject::Node(1), 86400, false);
        let client = party(&ca, Subject::Node(2), 100, false);
        let now = T0 + 1000;
        let err = handshake(
            client_config(cluster_verifier(&ca, rl()), Some(&client), now),
            server_config(&ca, &server, rl(), now),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                Failed::Server(rustls::Error::InvalidCertificate(
                    CertificateError::ExpiredContext { .. }
                ))
            ),
            "{err:?}"
        );
    }

    #[test]
    fn expired_server_cert_fails() {
        let ca = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        let server = party(&ca, Subject::Node(1), 100, false);
        let client = party(&ca, Subject::Node(2), 86400, false);
        let now = T0 + 1000;
        let err = handshake(
            client_config(cluster_verifier(&ca, rl()), Some(&client), now),
            server_config(&ca, &server, rl(), now),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                Failed::Client(rustls::Error::InvalidCertificate(
                    CertificateError::ExpiredContext { .. }
                ))
            ),
            "{err:?}"
        );
    }

    #[test]
    fn client_only_cert_cannot_serve() {
        let ca = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        let key = NodeKey::generate().unwrap();
        let der = custom(
            &ca,
            &key,
            &["metta://lab/node/1"],
            &[ExtendedKeyUsagePurpose::ClientAuth],
        );
        let server = Party {
            key,
            chain: vec![CertificateDer::from(der)],
        };
        let client = party(&ca, Subject::Node(2), 3600, false);
        let err = handshake(
            client_config(cluster_verifier(&ca, rl()), Some(&client), T0),
            server_config(&ca, &server, rl(), T0),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                Failed::Client(rustls::Error::InvalidCertificate(
                    CertificateError::InvalidPurpose
                        | CertificateError::InvalidPurposeContext { .. }
                ))
            ),
            "{err:?}"
        );
        // the Metta check alone says the same (in case webpki ever accepted it)
        assert_eq!(
            check_cert(
                &server.chain[0],
                "lab",
                T0,
                Purpose::Server,
                &RevocationList::default()
            ),
            Err(CertError::WrongEku {
                needed: "serverAuth"
            })
        );
    }

    #[test]
    fn revoked_subject_fails_at_runtime() {
        let ca = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        let server = party(&ca, Subject::Node(1), 3600, false);
        let client = party(&ca, Subject::User("mallory".into()), 3600, false);
        let shared = rl();
        handshake(
            client_config(cluster_verifier(&ca, rl()), Some(&client), T0),
            server_config(&ca, &server, shared.clone(), T0),
        )
        .unwrap();
        shared
            .write()
            .unwrap()
            .revoke_subject(Subject::User("mallory".into()));
        let err = handshake(
            client_config(cluster_verifier(&ca, rl()), Some(&client), T0),
            server_config(&ca, &server, shared.clone(), T0),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                Failed::Server(rustls::Error::InvalidCertificate(CertificateError::Revoked))
            ),
            "{err:?}"
        );
        // a revoked server is refused by clients too
        let client_side = rl();
        client_side
            .write()
            .unwrap()
            .revoke_subject(Subject::Node(1));
        let err = handshake(
            client_config(cluster_verifier(&ca, client_side), None, T0),
            server_config(&ca, &server, rl(), T0),
        )
        .unwrap_err();
        assert!(matches!(err, Failed::Client(_)), "{err:?}");
    }

    #[test]
    fn pinned_join_succeeds_with_right_pin() {
        let ca = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        let server = party(&ca, Subject::Node(1), 3600, true);
        handshake(
            client_config(Arc::new(PinnedServerVerifier::new(ca.pin())), None, T0),
            server_config(&ca, &server, rl(), T0),
        )
        .unwrap();
    }

    #[test]
    fn pinned_join_refuses_a_worker_standing_in_for_the_control_plane() {
        let ca = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        let key = NodeKey::generate().unwrap();
        let csr = make_csr(&key, &Subject::Node(7), ca.cluster()).unwrap();
        let cert = ca
            .issue_node(&csr, 7, metta_proto::Role::Worker, T0, 3600, [5; 16])
            .unwrap();
        let worker = Party {
            key,
            chain: vec![
                CertificateDer::from(cert.der),
                CertificateDer::from(ca.cert_der().to_vec()),
            ],
        };
        let err = handshake(
            client_config(Arc::new(PinnedServerVerifier::new(ca.pin())), None, T0),
            server_config(&ca, &worker, rl(), T0),
        )
        .unwrap_err();
        let Failed::Client(e) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(
            cert_error(e),
            Some(&CertError::NotControl {
                found: Subject::Node(7)
            })
        );
    }

    #[test]
    fn pinned_join_fails_with_wrong_pin() {
        let ca = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        let other = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        let server = party(&ca, Subject::Node(1), 3600, true);
        let err = handshake(
            client_config(Arc::new(PinnedServerVerifier::new(other.pin())), None, T0),
            server_config(&ca, &server, rl(), T0),
        )
        .unwrap_err();
        let Failed::Client(e) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(cert_error(e), Some(&CertError::PinMismatch));
    }

    #[test]
    fn pinned_join_fails_without_ca_in_chain() {
        let ca = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        let server = party(&ca, Subject::Node(1), 3600, false);
        let err = handshake(
            client_config(Arc::new(PinnedServerVerifier::new(ca.pin())), None, T0),
            server_config(&ca, &server, rl(), T0),
        )
        .unwrap_err();
        assert!(matches!(err, Failed::Client(_)), "{err:?}");
    }

    #[test]
    fn pinned_join_fails_when_leaf_not_from_pinned_ca() {
        // An attacker presents the genuine CA certificate (it is public) next to a
        // leaf from its own CA.
        let ca = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        let evil = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        let mut server = party(&evil, Subject::Node(1), 3600, false);
        server
            .chain
            .push(CertificateDer::from(ca.cert_der().to_vec()));
        let err = handshake(
            client_config(Arc::new(PinnedServerVerifier::new(ca.pin())), None, T0),
            server_config(&evil, &server, rl(), T0),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                Failed::Client(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature
                ))
            ),
            "{err:?}"
        );
    }

    #[test]
    fn verifier_rejects_non_ca_root() {
        let ca = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        let p = party(&ca, Subject::Node(1), 3600, false);
        assert!(matches!(
            ClusterClientVerifier::new(&p.chain[0], rl()),
            Err(VerifierError::Ca(_))
        ));
        assert!(ClusterServerVerifier::new(b"junk", rl()).is_err());
    }
}
