//! Certificate checks: the Metta rules on top of the chain check.
//!
//! The chain itself (signature by the cluster CA, validity window, EKU
//! serverAuth) is verified by webpki inside rustls with this crate's P-256
//! algorithm (see [`crate::ServerTrust`]). These pure functions then apply the same
//! rules `metta_trust::check_cert` applies on hosted nodes, re-implemented
//! here because `metta-trust` needs `std` (rcgen, x509-parser, ring):
//!
//! - a server certificate names exactly one Metta identity, the URI SAN
//!   `metta://<cluster>/<subject>` in canonical spelling, and is not a CA;
//! - it belongs to the cluster the CA names (`metta://<cluster>/ca`);
//! - it is valid now (the caller's clock) and carries EKU serverAuth;
//! - optionally, it names the subject the caller expected.
//!
//! Revocation lists are not consulted: a native node holds none (the control
//! plane refuses a revoked node's handshakes on its side).

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use const_oid::db::rfc5280::{ID_KP_CLIENT_AUTH, ID_KP_SERVER_AUTH};
use der::{Decode, Encode};
use metta_proto::ids::check_name;
use metta_proto::Subject;
use p256::pkcs8::DecodePublicKey;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{BasicConstraints, ExtendedKeyUsage, SubjectAltName};
use x509_cert::Certificate;

/// Why a certificate is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertProblem {
    /// The bytes are not a certificate we can read.
    Malformed(String),
    /// The CA certificate is not a Metta cluster CA (what is wrong with it).
    InvalidCa(&'static str),
    /// The certificate names no Metta identity, or more than one.
    NoIdentity,
    /// A CA certificate was presented as the server's own.
    NotEndEntity,
    /// The certificate belongs to another cluster.
    ForeignCluster {
        /// The cluster of the trusted CA.
        expected: String,
        /// The certificate's cluster.
        found: String,
    },
    /// Past its expiry (unix seconds).
    Expired {
        /// Expiry.
        not_after: u64,
    },
    /// Before its start (unix seconds): usually a clock set wrong.
    NotYetValid {
        /// Start of validity.
        not_before: u64,
    },
    /// The certificate is not valid for TLS servers (EKU serverAuth missing).
    WrongEku,
    /// A member, but not a control node: a native node joins through and
    /// links to control nodes only.
    NotControl(Subject),
    /// A valid member, but not the one we meant to reach.
    WrongSubject {
        /// Who we wanted.
        expected: Subject,
        /// Who answered.
        found: Subject,
    },
    /// The chain does not lead to the trusted cluster CA (unknown issuer or
    /// a bad signature).
    UntrustedIssuer,
    /// Another failure of the chain check (webpki's words).
    Chain(String),
}

impl fmt::Display for CertProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertProblem::Malformed(m) => write!(f, "malformed certificate: {m}"),
            CertProblem::InvalidCa(m) => write!(f, "not a Metta cluster CA certificate: {m}"),
            CertProblem::NoIdentity => f.write_str(
                "the certificate names no Metta identity: exactly one metta://<cluster>/<subject> URI is required",
            ),
            CertProblem::NotEndEntity => {
                f.write_str("a CA certificate cannot be used as a node certificate")
            }
            CertProblem::ForeignCluster { expected, found } => write!(
                f,
                "the certificate belongs to cluster {found:?}, not to {expected:?}"
            ),
            CertProblem::Expired { not_after } => {
                write!(f, "the certificate expired at {not_after} (unix time)")
            }
            CertProblem::NotYetValid { not_before } => write!(
                f,
                "the certificate is not valid before {not_before} (unix time); check the clock"
            ),
            CertProblem::WrongEku => {
                f.write_str("the certificate is not valid for serverAuth (extended key usage)")
            }
            CertProblem::NotControl(found) => write!(
                f,
                "the server is {found}, which is not a control node: use a control node's address"
            ),
            CertProblem::WrongSubject { expected, found } => {
                write!(f, "connected to {found}, but expected {expected}")
            }
            CertProblem::UntrustedIssuer => {
                f.write_str("the certificate was not issued by the trusted cluster CA")
            }
            CertProblem::Chain(m) => write!(f, "certificate chain rejected: {m}"),
        }
    }
}

impl core::error::Error for CertProblem {}

/// What a node or user certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    /// Who it names.
    pub subject: Subject,
    /// Which cluster.
    pub cluster: String,
    /// Start of validity (unix seconds).
    pub not_before: u64,
    /// Expiry (unix seconds, inclusive).
    pub not_after: u64,
    /// The holder's public key, SubjectPublicKeyInfo DER.
    pub spki_der: Vec<u8>,
    /// EKU serverAuth present.
    pub server_auth: bool,
    /// EKU clientAuth present.
    pub client_auth: bool,
    /// The CA attested the control role (subject OU `metta-control`).
    pub control: bool,
}

/// The subject OU of a control node's certificate (as `metta_trust` issues
/// it).
pub const ROLE_CONTROL_OU: &str = "metta-control";

/// Whether the certificate's subject carries the OU `metta-control`.
fn is_control(cert: &Certificate) -> bool {
    const OU: const_oid::ObjectIdentifier = const_oid::db::rfc4519::OU;
    cert.tbs_certificate.subject.0.iter().any(|rdn| {
        rdn.0.iter().any(|atv| {
            atv.oid == OU
                && (atv
                    .value
                    .decode_as::<der::asn1::Utf8StringRef<'_>>()
                    .is_ok_and(|s| s.as_str() == ROLE_CONTROL_OU)
                    || atv
                        .value
                        .decode_as::<der::asn1::PrintableStringRef<'_>>()
                        .is_ok_and(|s| s.as_str() == ROLE_CONTROL_OU))
        })
    })
}

fn decode(der: &[u8]) -> Result<Certificate, CertProblem> {
    // `from_der` refuses trailing bytes.
    Certificate::from_der(der).map_err(|e| CertProblem::Malformed(e.to_string()))
}

fn is_ca(cert: &Certificate) -> Result<bool, CertProblem> {
    match cert.tbs_certificate.get::<BasicConstraints>() {
        Ok(bc) => Ok(bc.is_some_and(|(_, bc)| bc.ca)),
        Err(e) => Err(CertProblem::Malformed(e.to_string())),
    }
}

/// The URI SANs of a certificate.
fn uris(cert: &Certificate) -> Result<Vec<String>, CertProblem> {
    let mut out = Vec::new();
    for ext in cert.tbs_certificate.filter::<SubjectAltName>() {
        let (_, san) = ext.map_err(|e| CertProblem::Malformed(e.to_string()))?;
        for name in san.0 {
            if let GeneralName::UniformResourceIdentifier(u) = name {
                out.push(u.as_str().to_string());
            }
        }
    }
    Ok(out)
}

fn secs(t: x509_cert::time::Time) -> u64 {
    t.to_unix_duration().as_secs()
}

/// Reads the cluster name from a cluster CA certificate (its single
/// `metta://<cluster>/ca` URI SAN), checking that it is a CA with a P-256 key.
pub fn ca_cluster(ca_der: &[u8]) -> Result<String, CertProblem> {
    let cert = decode(ca_der)?;
    if !is_ca(&cert)? {
        return Err(CertProblem::InvalidCa(
            "it is not a CA certificate (basicConstraints CA:false)",
        ));
    }
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| CertProblem::Malformed(e.to_string()))?;
    p256::PublicKey::from_public_key_der(&spki)
        .map_err(|_| CertProblem::InvalidCa("its key is not an ECDSA P-256 key"))?;
    let mut found = None;
    for uri in uris(&cert)? {
        if let Some(cluster) = uri
            .strip_prefix("metta://")
            .and_then(|r| r.strip_suffix("/ca"))
        {
            if found.is_some() {
                return Err(CertProblem::InvalidCa("it names more than one cluster"));
            }
            check_name("cluster", cluster)
                .map_err(|_| CertProblem::InvalidCa("its cluster name is invalid"))?;
            found = Some(cluster.to_string());
        }
    }
    found.ok_or(CertProblem::InvalidCa(
        "it has no metta://<cluster>/ca name",
    ))
}

/// Reads the Metta identity and key facts out of a node or user certificate.
/// Requires exactly one `metta://` URI SAN in canonical spelling and refuses
/// CA certificates; checks no signature, time or purpose.
pub fn parse_leaf(der: &[u8]) -> Result<LeafInfo, CertProblem> {
    let cert = decode(der)?;
    if is_ca(&cert)? {
        return Err(CertProblem::NotEndEntity);
    }
    let uris = uris(&cert)?;
    let mut metta = uris.iter().filter(|u| u.starts_with("metta://"));
    let uri = match (metta.next(), metta.next()) {
        (Some(u), None) => u,
        _ => return Err(CertProblem::NoIdentity),
    };
    let (cluster, subject) = Subject::from_uri(uri).map_err(|_| CertProblem::NoIdentity)?;
    if subject.uri(&cluster) != *uri {
        // Non-canonical spellings (`metta://c/ca`, `metta://c/node/01`) are
        // not identities.
        return Err(CertProblem::NoIdentity);
    }
    let mut server_auth = false;
    let mut client_auth = false;
    for ext in cert.tbs_certificate.filter::<ExtendedKeyUsage>() {
        let (_, eku) = ext.map_err(|e| CertProblem::Malformed(e.to_string()))?;
        server_auth |= eku.0.contains(&ID_KP_SERVER_AUTH);
        client_auth |= eku.0.contains(&ID_KP_CLIENT_AUTH);
    }
    let validity = &cert.tbs_certificate.validity;
    let control = is_control(&cert);
    Ok(LeafInfo {
        subject,
        cluster,
        not_before: secs(validity.not_before),
        not_after: secs(validity.not_after),
        spki_der: cert
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .map_err(|e| CertProblem::Malformed(e.to_string()))?,
        server_auth,
        client_auth,
        control,
    })
}

/// The Metta checks for a server certificate whose chain webpki already
/// verified: identity, cluster, validity at `now`, EKU serverAuth and, if
/// given, the expected subject.
pub fn check_server_leaf(
    der: &[u8],
    cluster: &str,
    now: u64,
    expected: Option<&Subject>,
) -> Result<LeafInfo, CertProblem> {
    let info = parse_leaf(der)?;
    if info.cluster != cluster {
        return Err(CertProblem::ForeignCluster {
            expected: cluster.to_string(),
            found: info.cluster,
        });
    }
    if now < info.not_before {
        return Err(CertProblem::NotYetValid {
            not_before: info.not_before,
        });
    }
    if now > info.not_after {
        return Err(CertProblem::Expired {
            not_after: info.not_after,
        });
    }
    if !info.server_auth {
        return Err(CertProblem::WrongEku);
    }
    if let Some(expected) = expected {
        if *expected != info.subject {
            return Err(CertProblem::WrongSubject {
                expected: expected.clone(),
                found: info.subject,
            });
        }
    }
    // A native node talks only to control nodes: joining (its token) and
    // its link (its domains' work).
    if !info.control {
        return Err(CertProblem::NotControl(info.subject));
    }
    Ok(info)
}

/// Decodes the first `CERTIFICATE` block of a PEM text to DER.
pub fn pem_cert_to_der(pem: &str) -> Result<Vec<u8>, CertProblem> {
    let start = pem
        .find("-----BEGIN CERTIFICATE-----")
        .ok_or_else(|| CertProblem::Malformed("no PEM certificate found".into()))?;
    let rest = &pem[start..];
    let end_marker = "-----END CERTIFICATE-----";
    let end = rest
        .find(end_marker)
        .ok_or_else(|| CertProblem::Malformed("unterminated PEM certificate".into()))?;
    let block = &rest[..end + end_marker.len()];
    let (label, der) = der::pem::decode_vec(block.as_bytes())
        .map_err(|e| CertProblem::Malformed(e.to_string()))?;
    if label != "CERTIFICATE" {
        return Err(CertProblem::Malformed("not a CERTIFICATE block".into()));
    }
    Ok(der)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for bytes in [&b""[..], b"\x30", b"\x30\x03\x02\x01\x00", &[0xff; 40]] {
            assert!(matches!(parse_leaf(bytes), Err(CertProblem::Malformed(_))));
            assert!(matches!(ca_cluster(bytes), Err(CertProblem::Malformed(_))));
        }
        assert!(pem_cert_to_der("nothing").is_err());
        assert!(pem_cert_to_der("-----BEGIN CERTIFICATE-----\n!!\n").is_err());
        assert!(
            pem_cert_to_der("-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n")
                .is_err()
        );
    }
}
