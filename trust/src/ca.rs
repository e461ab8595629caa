//! The cluster certificate authority.
//!
//! A [`ClusterCa`] is a self-signed ECDSA P-256 CA certificate (CA:true, path
//! length 0, keyCertSign + cRLSign) plus its key. Its URI SAN
//! `metta://<cluster>/ca` records the cluster name, so a CA certificate alone
//! tells which cluster it belongs to ([`ca_cluster_name`]).
//!
//! [`ClusterCa::issue`] turns a CSR into a node or user certificate. It verifies
//! the CSR's self-signature (proof that the requester holds the key), requires a
//! P-256 key, and then **ignores everything else the CSR asks for**: the identity,
//! key usages and lifetime are decided by the caller.
//!
//! A [`CaPin`] is the blake3 hash of the CA certificate's DER. It travels in join
//! tokens so that a joining machine can recognise the genuine cluster CA before it
//! has any other trust anchor.

use core::fmt;
use core::str::FromStr;

use metta_proto::ids::check_name;
use metta_proto::{Role, Subject};
use p256::elliptic_curve::zeroize::Zeroizing;
use p256::pkcs8::{DecodePublicKey, EncodePublicKey};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256;
use x509_parser::prelude::FromDer;

use crate::cert::{self, der_to_pem};
use crate::keys::verify_signature;
use crate::{UnixTime, CLOCK_SKEW_SECS};

/// Why a CA operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The cluster name does not follow the naming rules.
    #[error("{0}")]
    InvalidClusterName(String),
    /// The CA key could not be generated.
    #[error("cannot generate the CA key: {0}")]
    KeyGeneration(String),
    /// The CA key text is not a PKCS#8 ECDSA P-256 key.
    #[error("not a usable CA key (expected a PKCS#8 ECDSA P-256 \"PRIVATE KEY\" PEM): {0}")]
    InvalidKey(String),
    /// The CA certificate is not a Metta cluster CA certificate.
    #[error("not a Metta cluster CA certificate: {0}")]
    InvalidCaCert(String),
    /// The key does not belong to the certificate.
    #[error("the CA key does not match the CA certificate's public key")]
    KeyMismatch,
    /// The CSR could not be decoded.
    #[error("malformed certificate request: {0}")]
    MalformedCsr(String),
    /// The CSR's signature does not verify under the key it carries.
    #[error("the certificate request's signature does not verify: it was not signed by the key it names")]
    CsrSignature,
    /// The CSR is for a key type other than ECDSA P-256.
    #[error(
        "unsupported key in certificate request: Metta certificates use ECDSA P-256 keys ({0})"
    )]
    UnsupportedKey(String),
    /// The requested validity period cannot be represented.
    #[error("invalid validity period: {0}")]
    InvalidValidity(String),
    /// The CA pin text is not 64 lowercase hex digits.
    #[error("invalid CA pin: expected 64 lowercase hex digits (a blake3 hash), got {0:?}")]
    InvalidPin(String),
    /// rcgen failed to produce the certificate.
    #[error("cannot sign the certificate: {0}")]
    Signing(String),
}

/// The fingerprint of a CA certificate: blake3 of its DER encoding.
///
/// Displayed and parsed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CaPin(pub [u8; 32]);

impl CaPin {
    /// The pin of the certificate `der`.
    pub fn of_der(der: &[u8]) -> CaPin {
        CaPin(*blake3::hash(der).as_bytes())
    }

    /// Whether `der` is the pinned certificate (constant-time comparison).
    pub fn matches(&self, der: &[u8]) -> bool {
        blake3::hash(der) == blake3::Hash::from_bytes(self.0)
    }
}

impl fmt::Display for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaPin({self})")
    }
}

impl FromStr for CaPin {
    type Err = CaError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_lower_hex::<32>(s)
            .map(CaPin)
            .ok_or_else(|| CaError::InvalidPin(s.to_string()))
    }
}

/// Decodes exactly `N` bytes from `2N` lowercase hex digits; `None` otherwise.
pub(crate) fn decode_lower_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// A certificate issued by the cluster CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub pem: String,
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Its serial number as [`crate::cert::CertInfo::serial`] reports it
    /// (big-endian, leading zero bytes stripped): what to put in a revocation list.
    pub serial: Vec<u8>,
    /// Its expiry (unix seconds).
    pub not_after: UnixTime,
}

/// The cluster CA: certificate and private key.
///
/// `Debug` shows the cluster name and pin, never the key.
pub struct ClusterCa {
    cluster: String,
    cert_der: Vec<u8>,
    cert_pem: String,
    not_after: UnixTime,
    key: KeyPair,
    key_pem: Zeroizing<String>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("cluster", &self.cluster)
            .field("pin", &self.pin())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn to_time(t: UnixTime, what: &str) -> Result<OffsetDateTime, CaError> {
    i64::try_from(t)
        .ok()
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
        .filter(|d| d.year() <= 9999)
        .ok_or_else(|| CaError::InvalidValidity(format!("{what} {t} is out of range")))
}

/// The URI SAN a CA certificate of `cluster` carries.
fn ca_uri(cluster: &str) -> String {
    format!("metta://{cluster}/ca")
}

/// Reads the cluster name from a cluster CA certificate (its `metta://<cluster>/ca`
/// URI SAN), checking that it is a CA certificate with an ECDSA P-256 key.
pub fn ca_cluster_name(ca_der: &[u8]) -> Result<String, CaError> {
    let (rest, x) =
        X509Certificate::from_der(ca_der).map_err(|e| CaError::InvalidCaCert(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CaError::InvalidCaCert(
            "trailing bytes after the certificate".into(),
        ));
    }
    ca_cluster_of(&x)
}

fn ca_cluster_of(x: &X509Certificate<'_>) -> Result<String, CaError> {
    if !x.is_ca() {
        return Err(CaError::InvalidCaCert(
            "it is not a CA certificate (basicConstraints CA:false)".into(),
        ));
    }
    p256::PublicKey::from_public_key_der(x.public_key().raw)
        .map_err(|_| CaError::InvalidCaCert("its key is not an ECDSA P-256 key".into()))?;
    let san = x
        .subject_alternative_name()
        .map_err(|e| CaError::InvalidCaCert(e.to_string()))?
        .ok_or_else(|| CaError::InvalidCaCert("it has no metta://<cluster>/ca name".into()))?;
    let mut found = None;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            if let Some(cluster) = uri
                .strip_prefix("metta://")
                .and_then(|r| r.strip_suffix("/ca"))
            {
                if found.is_some() {
                    return Err(CaError::InvalidCaCert(
                        "it names more than one cluster".into(),
                    ));
                }
                check_name("cluster", cluster).map_err(|e| CaError::InvalidCaCert(e.0))?;
                found = Some(cluster.to_string());
            }
        }
    }
    found.ok_or_else(|| CaError::InvalidCaCert("it has no metta://<cluster>/ca name".into()))
}

impl ClusterCa {
    /// Creates a new cluster CA valid from `now` (minus the clock-skew
    /// allowance) for `validity_secs`.
    pub fn create(cluster: &str, now: UnixTime, validity_secs: u64) -> Result<Self, CaError> {
        check_name("cluster", cluster).map_err(|e| CaError::InvalidClusterName(e.0))?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::KeyGeneration(e.to_string()))?;
        let not_after = now
            .checked_add(validity_secs)
            .ok_or_else(|| CaError::InvalidValidity("validity overflows".into()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Metta cluster {cluster} CA"));
        params.distinguished_name = dn;
        params.subject_alt_names =
            vec![SanType::URI(ca_uri(cluster).try_into().map_err(
                |e: rcgen::Error| CaError::Signing(e.to_string()),
            )?)];
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = to_time(now.saturating_sub(CLOCK_SKEW_SECS), "not_before")?;
        params.not_after = to_time(not_after, "not_after")?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        Ok(ClusterCa {
            cluster: cluster.to_string(),
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            not_after,
            key,
            key_pem,
        })
    }

    /// Loads a CA from its certificate and key (both PEM), checking that the key
    /// belongs to the certificate and reading the cluster name back from it.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let cert_der =
            cert::pem_to_der(cert_pem).map_err(|e| CaError::InvalidCaCert(e.to_string()))?;
        let (rest, x) = X509Certificate::from_der(&cert_der)
            .map_err(|e| CaError::InvalidCaCert(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CaError::InvalidCaCert(
                "trailing bytes after the certificate".into(),
            ));
        }
        let cluster = ca_cluster_of(&x)?;
        if x.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256
            || verify_signature(
                x.public_key().raw,
                x.tbs_certificate.as_ref(),
                &x.signature_value.data,
            )
            .is_err()
        {
            return Err(CaError::InvalidCaCert(
                "it is not validly self-signed with ECDSA P-256/SHA-256".into(),
            ));
        }
        let not_after = u64::try_from(x.validity().not_after.timestamp())
            .map_err(|_| CaError::InvalidCaCert("expiry before 1970".into()))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::InvalidKey(e.to_string()))?;
        if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::InvalidKey("not an ECDSA P-256 key".into()));
        }
        if key.subject_public_key_info() != x.public_key().raw {
            return Err(CaError::KeyMismatch);
        }
        let key_pem = Zeroizing::new(key.serialize_pem());
        Ok(ClusterCa {
            cluster,
            cert_pem: der_to_pem(&cert_der),
            cert_der,
            not_after,
            key,
            key_pem,
        })
    }

    /// The cluster name.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA key, PKCS#8 PEM. This is the cluster's root secret.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The CA certificate's expiry (unix seconds).
    pub fn not_after(&self) -> UnixTime {
        self.not_after
    }

    /// The CA's pin (blake3 of the certificate DER).
    pub fn pin(&self) -> CaPin {
        CaPin::of_der(&self.cert_der)
    }

    /// Issues a certificate naming `subject` for the key in `csr_pem`.
    ///
    /// The CSR's signature must verify under its own key, and that key must be
    /// ECDSA P-256. Nothing else in the CSR is used: the certificate gets the URI
    /// SAN `subject.uri(cluster)`, CN `subject`, EKU serverAuth + clientAuth, key
    /// usage digitalSignature, CA:false, `serial`, and validity from
    /// `now - CLOCK_SKEW_SECS` to `now + lifetime_secs` — capped at the CA's own
    /// expiry (the returned [`IssuedCert::not_after`] is the real one).
    pub fn issue(
        &self,
        csr_pem: &str,
        subject: &Subject,
        now: UnixTime,
        lifetime_secs: u64,
        serial: [u8; 16],
    ) -> Result<IssuedCert, CaError> {
        self.issue_with_role(csr_pem, subject, None, now, lifetime_secs, serial)
    }

    /// Issues a node certificate as [`issue`](Self::issue) does, and attests
    /// the node's role in its subject: OU `metta-control` or `metta-worker`
    /// ([`cert::ROLE_CONTROL_OU`], [`cert::ROLE_WORKER_OU`]). The role is what
    /// lets a peer whose view of the registry lags (a node that just joined)
    /// tell a control node — which may send Raft traffic — from a worker.
    pub fn issue_node(
        &self,
        csr_pem: &str,
        id: metta_proto::NodeId,
        role: Role,
        now: UnixTime,
        lifetime_secs: u64,
        serial: [u8; 16],
    ) -> Result<IssuedCert, CaError> {
        let subject = Subject::Node(id);
        self.issue_with_role(csr_pem, &subject, Some(role), now, lifetime_secs, serial)
    }

    fn issue_with_role(
        &self,
        csr_pem: &str,
        subject: &Subject,
        role: Option<Role>,
        now: UnixTime,
        lifetime_secs: u64,
        serial: [u8; 16],
    ) -> Result<IssuedCert, CaError> {
        let spki = csr_rcgen_key(csr_pem)?;
        let not_after = now
            .checked_add(lifetime_secs)
            .ok_or_else(|| CaError::InvalidValidity("lifetime overflows".into()))?
            .min(self.not_after);
        let not_before = now.saturating_sub(CLOCK_SKEW_SECS);
        if not_after <= not_before {
            return Err(CaError::InvalidValidity(format!(
                "the certificate would expire at {not_after}, before it becomes valid at {not_before} (is the CA expired?)"
            )));
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, subject.to_string());
        if let Some(role) = role {
            dn.push(DnType::OrganizationalUnitName, cert::role_ou(role));
        }
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            subject
                .uri(&self.cluster)
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Signing(e.to_string()))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // A user's certificate cannot serve: only nodes answer connections.
        params.extended_key_usages = if subject.is_node() {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.not_before = to_time(not_before, "not_before")?;
        params.not_after = to_time(not_after, "not_after")?;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        self.sign(&params, &spki)
    }

    /// Signs `params` for the public key `spki` and describes the result.
    fn sign(
        &self,
        params: &CertificateParams,
        spki: &impl PublicKeyData,
    ) -> Result<IssuedCert, CaError> {
        let der = self.sign_raw(params, spki)?;
        let info = cert::parse_cert(&der).map_err(|e| CaError::Signing(e.to_string()))?;
        Ok(IssuedCert {
            pem: der_to_pem(&der),
            serial: info.serial,
            not_after: info.not_after,
            der,
        })
    }

    /// Signs `params` for the public key `spki`, whatever they say (tests use
    /// this to craft deviant certificates).
    pub(crate) fn sign_raw(
        &self,
        params: &CertificateParams,
        spki: &impl PublicKeyData,
    ) -> Result<Vec<u8>, CaError> {
        let issuer = Issuer::from_ca_cert_der(&self.cert_der.clone().into(), &self.key)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let cert = params
            .signed_by(spki, &issuer)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        Ok(cert.der().to_vec())
    }
}

/// Decodes a CSR (PEM), verifies its self-signature (proof that the requester
/// holds the key) and that the key is ECDSA P-256, and returns the public key as
/// SubjectPublicKeyInfo DER (canonical: uncompressed point, as
/// [`crate::keys::NodeKey::public_key_der`] writes it). Nothing else in the
/// request is looked at.
pub fn csr_public_key(csr_pem: &str) -> Result<Vec<u8>, CaError> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| CaError::MalformedCsr(e.to_string()))?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CaError::MalformedCsr(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CaError::MalformedCsr(
            "trailing bytes after the request".into(),
        ));
    }
    let info = &csr.certification_request_info;
    let spki_der = info.subject_pki.raw;
    let key = p256::PublicKey::from_public_key_der(spki_der).map_err(|_| {
        CaError::UnsupportedKey(format!(
            "key algorithm {}",
            info.subject_pki.algorithm.algorithm
        ))
    })?;
    if csr.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
        return Err(CaError::UnsupportedKey(format!(
            "signature algorithm {}",
            csr.signature_algorithm.algorithm
        )));
    }
    // The proof of possession: the request is signed by the key it names.
    verify_signature(spki_der, info.raw, &csr.signature_value.data)
        .map_err(|_| CaError::CsrSignature)?;
    // Canonical encoding (uncompressed point), so equal keys compare equal.
    key.to_public_key_der()
        .map(|d| d.into_vec())
        .map_err(|e| CaError::UnsupportedKey(e.to_string()))
}

/// [`csr_public_key`], as rcgen wants it.
fn csr_rcgen_key(csr_pem: &str) -> Result<rcgen::SubjectPublicKeyInfo, CaError> {
    let spki = rcgen::SubjectPublicKeyInfo::from_der(&csr_public_key(csr_pem)?)
        .map_err(|e| CaError::UnsupportedKey(e.to_string()))?;
    if spki.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(CaError::UnsupportedKey("not P-256".into()));
    }
    Ok(spki)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::{check_cert, parse_cert, Purpose, RevocationList};
    use crate::keys::{make_csr, NodeKey};

    pub(crate) const T0: UnixTime = 1_700_000_000;

    #[test]
    fn create_load_roundtrip() {
        let ca = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        assert_eq!(ca.cluster(), "lab");
        assert_eq!(ca_cluster_name(ca.cert_der()).unwrap(), "lab");
        let again = ClusterCa::load(ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(again.cluster(), "lab");
        assert_eq!(again.pin(), ca.pin());
        assert_eq!(again.cert_der(), ca.cert_der());
        assert!(!format!("{ca:?}").contains("PRIVATE"));

        let other = ClusterCa::create("lab", T0, 86400).unwrap();
        assert_eq!(
            ClusterCa::load(ca.cert_pem(), other.key_pem()).unwrap_err(),
            CaError::KeyMismatch
        );
        assert!(matches!(
            ClusterCa::create("Lab!", T0, 1),
            Err(CaError::InvalidClusterName(_))
        ));
    }

    #[test]
    fn node_certificates_attest_their_role_and_user_certificates_none() {
        let ca = ClusterCa::create("lab", T0, 86400).unwrap();
        let key = NodeKey::generate().unwrap();
        for role in [Role::Control, Role::Worker] {
            let csr = make_csr(&key, &Subject::Node(4), "lab").unwrap();
            let c = ca.issue_node(&csr, 4, role, T0, 3600, [2; 16]).unwrap();
            let info = parse_cert(&c.der).unwrap();
            assert_eq!((info.subject, info.role), (Subject::Node(4), Some(role)));
        }
        let user = Subject::User("bob".into());
        let csr = make_csr(&key, &user, "lab").unwrap();
        let c = ca.issue(&csr, &user, T0, 3600, [3; 16]).unwrap();
        let info = parse_cert(&c.der).unwrap();
        assert_eq!(info.role, None);
        // A user's certificate cannot stand in for a server.
        assert!(info.client_auth && !info.server_auth);
        let none = RevocationList::default();
        assert!(check_cert(&c.der, "lab", T0, Purpose::Server, &none).is_err());
        assert!(check_cert(&c.der, "lab", T0, Purpose::Client, &none).is_ok());
    }

    #[test]
    fn load_rejects_leaf_as_ca() {
        let ca = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        let k = NodeKey::generate().unwrap();
        let csr = make_csr(&k, &Subject::Node(1), "lab").unwrap();
        let leaf = ca
            .issue(&csr, &Subject::Node(1), T0, 3600, [1; 16])
            .unwrap();
        assert!(matches!(
            ClusterCa::load(&leaf.pem, &k.to_pem()),
            Err(CaError::InvalidCaCert(_))
        ));
    }

    #[test]
    fn pin_display_parse() {
        let ca = ClusterCa::create("lab", T0, 86400).unwrap();
        let pin = ca.pin();
        let s = pin.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<CaPin>().unwrap(), pin);
        assert!(pin.matches(ca.cert_der()));
        assert!(s.to_uppercase().parse::<CaPin>().is_err());
        assert!(s[..63].parse::<CaPin>().is_err());
        assert!(format!("{s}0").parse::<CaPin>().is_err());
        assert!(format!("{}g", &s[..63]).parse::<CaPin>().is_err());
    }

    #[test]
    fn issue_ignores_what_the_csr_asks_for() {
        let ca = ClusterCa::create("lab", T0, 86400 * 365).unwrap();
        let k = NodeKey::generate().unwrap();
        // The requester asks to be user/admin in another cluster...
        let csr = make_csr(&k, &Subject::User("admin".into()), "other").unwrap();
        let cert = ca
            .issue(&csr, &Subject::Node(3), T0, 3600, [0xff; 16])
            .unwrap();
        // ...and gets node/3 in lab.
        let info = parse_cert(&cert.der).unwrap();
        assert_eq!(info.subject, Subject::Node(3));
        assert_eq!(info.cluster, "lab");
        assert_eq!(info.spki_der, k.public_key_der());
        assert_eq!(csr_public_key(&csr).unwrap(), k.public_key_der());
        assert_eq!(info.not_before, T0 - CLOCK_SKEW_SECS);
        assert_eq!(info.not_after, T0 + 3600);
        assert_eq!(info.serial, vec![0xff; 16]);
        assert_eq!(cert.serial, info.serial);
        assert_eq!(cert.not_after, T0 + 3600);
        assert!(info.server_auth && info.client_auth);
        check_cert(
            &cert.der,
            "lab",
            T0,
            Purpose::Client,
            &RevocationList::default(),
        )
        .unwrap();
        let (_, x) = X509Certificate::from_der(&cert.der).unwrap();
        assert!(!x.is_ca());
        assert_eq!(
            x.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "node/3"
        );
    }

    #[test]
    fn issue_caps_lifetime_at_ca_expiry() {
        let ca = ClusterCa::create("lab", T0, 1000).unwrap();
        let k = NodeKey::generate().unwrap();
        let csr = make_csr(&k, &Subject::Node(1), "lab").unwrap();
        let cert = ca
            .issue(&csr, &Subject::Node(1), T0, 5000, [1; 16])
            .unwrap();
        assert_eq!(cert.not_after, T0 + 1000);
        assert!(matches!(
            ca.issue(&csr, &Subject::Node(1), T0 + 2000, 5000, [1; 16]),
            Err(CaError::InvalidValidity(_))
        ));
    }

    #[test]
    fn csr_with_forged_signature_is_rejected() {
        let ca = ClusterCa::create("lab", T0, 86400).unwrap();
        let k = NodeKey::generate().unwrap();
        let csr = make_csr(&k, &Subject::Node(1), "lab").unwrap();
        use rustls_pki_types::pem::PemObject;
        let mut der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec();
        // Flip one bit inside the request info (the CN text "node/1" -> "node/0").
        let pos = der.windows(6).position(|w| w == b"node/1").unwrap();
        der[pos + 5] = b'0';
        let forged = der_to_pem_label("CERTIFICATE REQUEST", &der);
        assert_eq!(
            ca.issue(&forged, &Subject::Node(1), T0, 60, [1; 16]),
            Err(CaError::CsrSignature)
        );
        // rcgen's own parser agrees (it verifies the signature too).
        assert!(rcgen::CertificateSigningRequestParams::from_pem(&forged).is_err());
    }

    #[test]
    fn csr_with_another_keys_signature_is_rejected() {
        // Splice key B's SPKI into a CSR signed by key A.
        let ca = ClusterCa::create("lab", T0, 86400).unwrap();
        let a = NodeKey::generate().unwrap();
        let b = NodeKey::generate().unwrap();
        let csr = make_csr(&a, &Subject::Node(1), "lab").unwrap();
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        let (pa, pb) = (a.public_key_der(), b.public_key_der());
        assert_eq!(pa.len(), pb.len());
        let pos = der.windows(pa.len()).position(|w| w == pa).unwrap();
        let mut spliced = der.clone();
        spliced[pos..pos + pb.len()].copy_from_slice(&pb);
        let forged = der_to_pem_label("CERTIFICATE REQUEST", &spliced);
        assert_eq!(
            ca.issue(&forged, &Subject::Node(1), T0, 60, [1; 16]),
            Err(CaError::CsrSignature)
        );
    }

    #[test]
    fn non_p256_csr_is_rejected() {
        let ca = ClusterCa::create("lab", T0, 86400).unwrap();
        let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&kp)
            .unwrap()
            .pem()
            .unwrap();
        assert!(matches!(
            ca.issue(&csr, &Subject::Node(1), T0, 60, [1; 16]),
            Err(CaError::UnsupportedKey(_))
        ));
        let kp = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&kp)
            .unwrap()
            .pem()
            .unwrap();
        assert!(matches!(
            ca.issue(&csr, &Subject::Node(1), T0, 60, [1; 16]),
            Err(CaError::UnsupportedKey(_))
        ));
        assert!(matches!(
            ca.issue("garbage", &Subject::Node(1), T0, 60, [1; 16]),
            Err(CaError::MalformedCsr(_))
        ));
    }

    fn der_to_pem_label(label: &str, der: &[u8]) -> String {
        p256::pkcs8::der::pem::encode_string(label, p256::pkcs8::LineEnding::LF, der).unwrap()
    }
}
