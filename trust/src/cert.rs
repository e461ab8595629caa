//! Certificate checks that run *after* a TLS stack has verified the chain.
//!
//! webpki (inside rustls) proves that a certificate was signed by the cluster CA
//! and is within its validity period. [`check_cert`] then applies the Metta
//! rules on top: the certificate names exactly one Metta identity, of the
//! expected cluster, it is valid now, carries the extended key usage for its role
//! in the connection, and neither its subject nor its serial is revoked.
//!
//! [`parse_cert`] is the bare identity extraction, for code that already knows
//! the certificate is good (e.g. reading the peer's subject after a handshake).

use std::collections::BTreeSet;

use metta_proto::{Role, Subject};
use serde::{Deserialize, Serialize};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use std::fmt;

use crate::UnixTime;

/// Why a certificate is refused.
///
/// `Debug` prints the same text as `Display`: rustls reports a verifier's
/// error with `{:?}`, and that is what ends up in a user's terminal.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The bytes are not a certificate we can read.
    #[error("malformed certificate: {0}")]
    Malformed(String),
    /// The certificate carries no Metta identity, or more than one.
    #[error("the certificate names no Metta identity: exactly one metta://<cluster>/node/<id> or metta://<cluster>/user/<name> URI is required")]
    NoIdentity,
    /// A CA certificate was presented where a node or user certificate belongs.
    #[error("a CA certificate cannot be used as a node or user certificate")]
    NotEndEntity,
    /// The certificate belongs to another cluster.
    #[error("the certificate belongs to cluster {found:?}, not to {expected:?}")]
    ForeignCluster {
        /// Our cluster.
        expected: String,
        /// The certificate's cluster.
        found: String,
    },
    /// Past its expiry.
    #[error("the certificate expired at {not_after} (unix time); renew it")]
    Expired {
        /// Expiry (unix seconds).
        not_after: UnixTime,
    },
    /// Before its start (usually a clock set wrong on one side).
    #[error("the certificate is not valid before {not_before} (unix time); check the clocks")]
    NotYetValid {
        /// Start of validity (unix seconds).
        not_before: UnixTime,
    },
    /// The certificate is not meant for this side of a connection.
    #[error("the certificate is not valid for {needed} (extended key usage)")]
    WrongEku {
        /// The usage that was needed: `clientAuth` or `serverAuth`.
        needed: &'static str,
    },
    /// The subject or the certificate's serial number was revoked.
    #[error("{subject} has been revoked")]
    Revoked {
        /// Who the certificate names.
        subject: Subject,
    },
    /// The peer is a valid member, but not the one we meant to reach.
    #[error("connected to {found}, but expected {expected}")]
    WrongSubject {
        /// Who we wanted.
        expected: Subject,
        /// Who answered.
        found: Subject,
    },
    /// The server is a member, but not a control node (only control nodes
    /// admit joins and hold native nodes' links).
    #[error("the server is {found}, which is not a control node: join through (and link to) a control node")]
    NotControl {
        /// Who answered.
        found: Subject,
    },
    /// The server did not present the CA certificate named by the join token.
    #[error("the server did not present the cluster CA pinned by the join token: wrong cluster, or a man in the middle")]
    PinMismatch,
    /// The PEM text holds no certificate.
    #[error("no certificate found in the PEM text")]
    NoPemCertificate,
}

impl fmt::Debug for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Who it names.
    pub subject: Subject,
    /// Which cluster.
    pub cluster: String,
    /// Serial number, big-endian with leading zero bytes stripped.
    pub serial: Vec<u8>,
    /// Start of validity (unix seconds).
    pub not_before: UnixTime,
    /// Expiry (unix seconds, inclusive).
    pub not_after: UnixTime,
    /// The holder's public key, SubjectPublicKeyInfo DER.
    pub spki_der: Vec<u8>,
    /// EKU serverAuth present.
    pub server_auth: bool,
    /// EKU clientAuth present.
    pub client_auth: bool,
    /// The role the CA attested for a node (the subject's OU
    /// [`ROLE_CONTROL_OU`] or [`ROLE_WORKER_OU`]); `None` for users and for
    /// node certificates issued without one.
    pub role: Option<Role>,
}

/// The subject OU of a control node's certificate.
pub const ROLE_CONTROL_OU: &str = "metta-control";
/// The subject OU of a worker's certificate.
pub const ROLE_WORKER_OU: &str = "metta-worker";

/// The subject OU that attests `role`.
pub fn role_ou(role: Role) -> &'static str {
    match role {
        Role::Control => ROLE_CONTROL_OU,
        Role::Worker => ROLE_WORKER_OU,
    }
}

/// Which side of a connection a certificate is presented on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// The peer connected to us: needs EKU clientAuth.
    Client,
    /// We connected to the peer: needs EKU serverAuth.
    Server,
}

impl Purpose {
    fn eku_name(self) -> &'static str {
        match self {
            Purpose::Client => "clientAuth",
            Purpose::Server => "serverAuth",
        }
    }
}

fn strip_leading_zeros(bytes: &[u8]) -> Vec<u8> {
    let start = bytes
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    bytes[start..].to_vec()
}

/// Reads the Metta identity and key facts out of a node or user certificate.
///
/// Requires exactly one `metta://` URI SAN, in canonical form (exactly
/// `subject.uri(cluster)`), and refuses CA certificates. Does not check
/// signatures, time or revocation: see [`check_cert`].
pub fn parse_cert(der: &[u8]) -> Result<CertInfo, CertError> {
    let (rest, x) =
        X509Certificate::from_der(der).map_err(|e| CertError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertError::Malformed(
            "trailing bytes after the certificate".into(),
        ));
    }
    let bc = x
        .basic_constraints()
        .map_err(|e| CertError::Malformed(e.to_string()))?;
    if bc.is_some_and(|bc| bc.value.ca) {
        return Err(CertError::NotEndEntity);
    }
    let san = x
        .subject_alternative_name()
        .map_err(|e| CertError::Malformed(e.to_string()))?;
    let mut uris = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("metta://") => Some(*u),
            _ => None,
        });
    let (uri, extra) = (uris.next(), uris.next());
    let uri = match (uri, extra) {
        (Some(u), None) => u,
        _ => return Err(CertError::NoIdentity),
    };
    let (cluster, subject) = Subject::from_uri(uri).map_err(|_| CertError::NoIdentity)?;
    if subject.uri(&cluster) != uri {
        // Non-canonical spellings (`metta://c/bob`, `metta://c/ca`) are not identities.
        return Err(CertError::NoIdentity);
    }
    let eku = x
        .extended_key_usage()
        .map_err(|e| CertError::Malformed(e.to_string()))?;
    let (server_auth, client_auth) = eku.map_or((false, false), |e| {
        (e.value.server_auth, e.value.client_auth)
    });
    // Only a node's certificate carries a role, and at most one.
    let mut roles = x
        .subject()
        .iter_organizational_unit()
        .filter_map(|ou| ou.as_str().ok())
        .filter_map(|ou| match ou {
            ROLE_CONTROL_OU => Some(Role::Control),
            ROLE_WORKER_OU => Some(Role::Worker),
            _ => None,
        });
    let role = match (roles.next(), roles.next()) {
        (None, _) => None,
        (Some(r), None) if subject.is_node() => Some(r),
        _ => {
            return Err(CertError::Malformed(
                "a role OU on a user certificate, or more than one".into(),
            ))
        }
    };
    let validity = x.validity();
    let not_before = u64::try_from(validity.not_before.timestamp()).unwrap_or(0);
    let not_after = u64::try_from(validity.not_after.timestamp())
        .map_err(|_| CertError::Malformed("expiry before 1970".into()))?;
    Ok(CertInfo {
        subject,
        cluster,
        serial: strip_leading_zeros(x.raw_serial()),
        not_before,
        not_after,
        spki_der: x.public_key().raw.to_vec(),
        server_auth,
        client_auth,
        role,
    })
}

/// The Metta checks for a certificate whose chain a TLS stack already verified:
/// identity, cluster, validity at `now`, EKU for `purpose`, revocation.
pub fn check_cert(
    der: &[u8],
    cluster: &str,
    now: UnixTime,
    purpose: Purpose,
    revoked: &RevocationList,
) -> Result<CertInfo, CertError> {
    let info = parse_cert(der)?;
    if info.cluster != cluster {
        return Err(CertError::ForeignCluster {
            expected: cluster.to_string(),
            found: info.cluster,
        });
    }
    if now < info.not_before {
        return Err(CertError::NotYetValid {
            not_before: info.not_before,
        });
    }
    if now > info.not_after {
        return Err(CertError::Expired {
            not_after: info.not_after,
        });
    }
    let eku_ok = match purpose {
        Purpose::Client => info.client_auth,
        Purpose::Server => info.server_auth,
    };
    if !eku_ok {
        return Err(CertError::WrongEku {
            needed: purpose.eku_name(),
        });
    }
    if revoked.is_revoked(&info) {
        return Err(CertError::Revoked {
            subject: info.subject,
        });
    }
    Ok(info)
}

/// Decodes the first certificate of a PEM text to DER.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, CertError> {
    pem_bundle_to_der(pem)?
        .into_iter()
        .next()
        .ok_or(CertError::NoPemCertificate)
}

/// Decodes every certificate of a PEM bundle to DER, in order (non-certificate
/// sections are skipped). At least one is required.
pub fn pem_bundle_to_der(pem: &str) -> Result<Vec<Vec<u8>>, CertError> {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.map(|c| c.as_ref().to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Malformed(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(CertError::NoPemCertificate);
    }
    Ok(certs)
}

/// Encodes a DER certificate as PEM.
pub fn der_to_pem(der: &[u8]) -> String {
    p256::pkcs8::der::pem::encode_string("CERTIFICATE", p256::pkcs8::LineEnding::LF, der)
        .unwrap_or_default()
}

/// Revoked subjects and certificate serials.
///
/// Revoking a subject voids every certificate naming it (and, in
/// [`crate::grants`], every grant it issued or holds); revoking a serial voids
/// one certificate. Serials are compared with leading zero bytes stripped.
#[derive(Default, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    subjects: BTreeSet<Subject>,
    serials: BTreeSet<Vec<u8>>,
}

impl RevocationList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Revokes a subject. Returns whether it was not revoked before.
    pub fn revoke_subject(&mut self, subject: Subject) -> bool {
        self.subjects.insert(subject)
    }

    /// Revokes one certificate by serial. Returns whether it was not revoked before.
    pub fn revoke_serial(&mut self, serial: &[u8]) -> bool {
        self.serials.insert(strip_leading_zeros(serial))
    }

    /// Whether the certificate's subject or serial is revoked.
    pub fn is_revoked(&self, info: &CertInfo) -> bool {
        self.subject_revoked(&info.subject) || self.serial_revoked(&info.serial)
    }

    /// Whether `subject` is revoked.
    pub fn subject_revoked(&self, subject: &Subject) -> bool {
        self.subjects.contains(subject)
    }

    /// Whether the serial is revoked.
    pub fn serial_revoked(&self, serial: &[u8]) -> bool {
        self.serials.contains(&strip_leading_zeros(serial))
    }

    /// The revoked subjects.
    pub fn subjects(&self) -> impl Iterator<Item = &Subject> {
        self.subjects.iter()
    }

    /// The revoked serials.
    pub fn serials(&self) -> impl Iterator<Item = &[u8]> {
        self.serials.iter().map(Vec::as_slice)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ca::ClusterCa;
    use crate::keys::{make_csr, NodeKey};
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, SanType};

    pub(crate) const T0: UnixTime = 1_700_000_000;

    fn setup() -> (ClusterCa, NodeKey) {
        (
            ClusterCa::create("lab", T0, 86400 * 365).unwrap(),
            NodeKey::generate().unwrap(),
        )
    }

    fn issue(ca: &ClusterCa, k: &NodeKey, s: Subject, serial: u8) -> Vec<u8> {
        let csr = make_csr(k, &s, "lab").unwrap();
        ca.issue(&csr, &s, T0, 3600, [serial; 16]).unwrap().der
    }

    /// A certificate with hand-picked SANs and EKUs, signed by `ca`.
    pub(crate) fn custom(
        ca: &ClusterCa,
        k: &NodeKey,
        uris: &[&str],
        eku: &[ExtendedKeyUsagePurpose],
    ) -> Vec<u8> {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "x");
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        p.extended_key_usages = eku.to_vec();
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.not_before = time::OffsetDateTime::from_unix_timestamp(T0 as i64).unwrap();
        p.not_after = time::OffsetDateTime::from_unix_timestamp(T0 as i64 + 60).unwrap();
        let spki = rcgen::SubjectPublicKeyInfo::from_der(&k.public_key_der()).unwrap();
        ca.sign_raw(&p, &spki).unwrap()
    }

    #[test]
    fn good_cert_passes() {
        let (ca, k) = setup();
        let der = issue(&ca, &k, Subject::Node(4), 9);
        for p in [Purpose::Client, Purpose::Server] {
            let info = check_cert(&der, "lab", T0 + 10, p, &RevocationList::default()).unwrap();
            assert_eq!(info.subject, Subject::Node(4));
        }
    }

    #[test]
    fn foreign_cluster() {
        let (ca, k) = setup();
        let der = issue(&ca, &k, Subject::Node(4), 9);
        assert_eq!(
            check_cert(
                &der,
                "prod",
                T0,
                Purpose::Client,
                &RevocationList::default()
            ),
            Err(CertError::ForeignCluster {
                expected: "prod".into(),
                found: "lab".into()
            })
        );
    }

    #[test]
    fn validity_window() {
        let (ca, k) = setup();
        let der = issue(&ca, &k, Subject::Node(4), 9);
        let rl = RevocationList::default();
        assert!(check_cert(&der, "lab", T0 + 3600, Purpose::Client, &rl).is_ok());
        assert_eq!(
            check_cert(&der, "lab", T0 + 3601, Purpose::Client, &rl),
            Err(CertError::Expired {
                not_after: T0 + 3600
            })
        );
        assert!(check_cert(&der, "lab", T0 - 300, Purpose::Client, &rl).is_ok());
        assert_eq!(
            check_cert(&der, "lab", T0 - 301, Purpose::Client, &rl),
            Err(CertError::NotYetValid {
                not_before: T0 - 300
            })
        );
    }

    #[test]
    fn revocation_by_subject_and_serial() {
        let (ca, k) = setup();
        let der = issue(&ca, &k, Subject::User("bob".into()), 0x01);
        let mut rl = RevocationList::default();
        assert!(rl.revoke_subject(Subject::User("alice".into())));
        assert!(check_cert(&der, "lab", T0, Purpose::Client, &rl).is_ok());
        let mut rl2 = rl.clone();
        assert!(rl2.revoke_subject(Subject::User("bob".into())));
        assert_eq!(
            check_cert(&der, "lab", T0, Purpose::Client, &rl2),
            Err(CertError::Revoked {
                subject: Subject::User("bob".into())
            })
        );
        // by serial, with a redundant leading zero
        let mut serial = vec![0u8];
        serial.extend_from_slice(&[1; 16]);
        assert!(rl.revoke_serial(&serial));
        assert!(!rl.revoke_serial(&[1; 16]));
        assert!(matches!(
            check_cert(&der, "lab", T0, Purpose::Client, &rl),
            Err(CertError::Revoked { .. })
        ));
        // serde roundtrip
        let bytes = postcard::to_allocvec(&rl).unwrap();
        assert_eq!(postcard::from_bytes::<RevocationList>(&bytes).unwrap(), rl);
    }

    #[test]
    fn eku_is_enforced() {
        let (ca, k) = setup();
        let rl = RevocationList::default();
        let der = custom(
            &ca,
            &k,
            &["metta://lab/node/1"],
            &[ExtendedKeyUsagePurpose::ClientAuth],
        );
        assert!(check_cert(&der, "lab", T0, Purpose::Client, &rl).is_ok());
        assert_eq!(
            check_cert(&der, "lab", T0, Purpose::Server, &rl),
            Err(CertError::WrongEku {
                needed: "serverAuth"
            })
        );
        let der = custom(&ca, &k, &["metta://lab/node/1"], &[]);
        assert_eq!(
            check_cert(&der, "lab", T0, Purpose::Client, &rl),
            Err(CertError::WrongEku {
                needed: "clientAuth"
            })
        );
    }

    #[test]
    fn identity_rules() {
        let (ca, k) = setup();
        let both = [
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        for bad in [
            &[][..],
            &["metta://lab/node/1", "metta://lab/node/2"][..],
            &["metta://lab/ca"][..],
            &["metta://lab/bob"][..],
            &["metta://lab/node/01"][..],
            &["metta://Lab/node/1"][..],
            &["https://lab/node/1"][..],
        ] {
            let der = custom(&ca, &k, bad, &both);
            assert_eq!(parse_cert(&der), Err(CertError::NoIdentity), "{bad:?}");
        }
        // a non-metta URI next to the identity is fine
        let der = custom(
            &ca,
            &k,
            &["https://example.org/", "metta://lab/user/bob"],
            &both,
        );
        assert_eq!(
            parse_cert(&der).unwrap().subject,
            Subject::User("bob".into())
        );
        // the CA certificate itself is no identity
        assert_eq!(parse_cert(ca.cert_der()), Err(CertError::NotEndEntity));
        assert!(matches!(parse_cert(b"junk"), Err(CertError::Malformed(_))));
    }

    #[test]
    fn pem_helpers() {
        let (ca, k) = setup();
        let leaf = issue(&ca, &k, Subject::Node(1), 2);
        let bundle = format!("{}{}", der_to_pem(&leaf), ca.cert_pem());
        let ders = pem_bundle_to_der(&bundle).unwrap();
        assert_eq!(ders, vec![leaf.clone(), ca.cert_der().to_vec()]);
        assert_eq!(pem_to_der(&bundle).unwrap(), leaf);
        assert_eq!(pem_to_der("nothing here"), Err(CertError::NoPemCertificate));
        assert_eq!(pem_to_der(&k.to_pem()), Err(CertError::NoPemCertificate));
    }
}
