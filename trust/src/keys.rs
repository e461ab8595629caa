//! Keys: ECDSA P-256 private keys for nodes and users, raw signatures, CSRs.
//!
//! A [`NodeKey`] is generated on the machine that uses it and never leaves it; the
//! cluster only ever sees its public key, in a certificate signing request made
//! with [`make_csr`]. The same key signs grants ([`crate::grants::sign_grant`]).
//!
//! Signatures are ECDSA P-256 with SHA-256, DER-encoded (RFC 6979 deterministic
//! nonces, so signing needs no RNG); public keys travel as SubjectPublicKeyInfo
//! DER.

use core::fmt;

use metta_proto::ids::check_name;
use metta_proto::Subject;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::elliptic_curve::zeroize::Zeroizing;
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey, LineEnding};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// Why a key operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The system random generator or the key generator failed.
    #[error("cannot generate a key: {0}")]
    Generate(String),
    /// The private key text is not a PKCS#8 ECDSA P-256 key.
    #[error("not a usable private key (expected a PKCS#8 \"PRIVATE KEY\" PEM holding an ECDSA P-256 key): {0}")]
    InvalidPrivateKey(String),
    /// The public key is not a P-256 SubjectPublicKeyInfo.
    #[error("not an ECDSA P-256 public key: {0}")]
    InvalidPublicKey(String),
    /// The signature bytes are not a DER ECDSA signature.
    #[error("malformed signature: not a DER-encoded ECDSA signature")]
    MalformedSignature,
    /// The signature is well-formed but does not match the message and key.
    #[error("signature does not verify: the data was altered or signed by another key")]
    BadSignature,
    /// The cluster name does not follow the naming rules.
    #[error("{0}")]
    InvalidClusterName(String),
    /// The certificate request could not be built.
    #[error("cannot build the certificate request: {0}")]
    Csr(String),
}

/// An ECDSA P-256 private key (a node's or a user's).
///
/// `Debug` shows only a short fingerprint of the public key, never the secret.
#[derive(Clone)]
pub struct NodeKey {
    /// The PKCS#8 document the key was created or loaded from (kept so that
    /// `ring`, used by rcgen and rustls, sees exactly the bytes it produced).
    pkcs8: Zeroizing<Vec<u8>>,
    signing: SigningKey,
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fp = blake3::hash(&self.public_key_der());
        write!(f, "NodeKey(p256, public key {})", &fp.to_hex()[..16])
    }
}

impl NodeKey {
    /// Generates a fresh key with the system random generator.
    pub fn generate() -> Result<NodeKey, KeyError> {
        let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| KeyError::Generate(e.to_string()))?;
        Self::from_pkcs8_der(kp.serialized_der())
            .map_err(|e| KeyError::Generate(format!("generated key is unusable: {e}")))
    }

    /// Loads a key from PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem(pem: &str) -> Result<NodeKey, KeyError> {
        use rustls_pki_types::pem::PemObject;
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| KeyError::InvalidPrivateKey(e.to_string()))?;
        Self::from_pkcs8_der(der.secret_pkcs8_der())
    }

    /// Loads a key from PKCS#8 DER.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<NodeKey, KeyError> {
        let signing = SigningKey::from_pkcs8_der(der)
            .map_err(|e| KeyError::InvalidPrivateKey(e.to_string()))?;
        // rcgen/rustls (ring) must accept it too, or CSRs and TLS would fail later.
        KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(der),
            &rcgen::PKCS_ECDSA_P256_SHA256,
        )
        .map_err(|e| KeyError::InvalidPrivateKey(e.to_string()))?;
        Ok(NodeKey {
            pkcs8: Zeroizing::new(der.to_vec()),
            signing,
        })
    }

    /// The key as PKCS#8 PEM. This is the secret: store it with care.
    pub fn to_pem(&self) -> String {
        // Encoding a byte string as PEM cannot fail for a fixed, valid label.
        p256::pkcs8::der::pem::encode_string("PRIVATE KEY", LineEnding::LF, &self.pkcs8)
            .unwrap_or_default()
    }

    /// The key as PKCS#8 DER. This is the secret.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The key in the form rustls wants for `with_single_cert` /
    /// `with_client_auth_cert`.
    pub fn tls_private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.to_vec()))
    }

    /// The public key as SubjectPublicKeyInfo DER.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.signing
            .verifying_key()
            .to_public_key_der()
            .map(|d| d.into_vec())
            .unwrap_or_default()
    }

    /// Signs `msg` (ECDSA P-256, SHA-256), returning a DER signature.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let sig: Signature = self.signing.sign(msg);
        sig.to_der().as_bytes().to_vec()
    }

    /// An rcgen key pair for the same key (for CSRs and self-signing).
    pub(crate) fn rcgen_key_pair(&self) -> Result<KeyPair, KeyError> {
        KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(&self.pkcs8[..]),
            &rcgen::PKCS_ECDSA_P256_SHA256,
        )
        .map_err(|e| KeyError::InvalidPrivateKey(e.to_string()))
    }
}

/// Checks a DER ECDSA P-256/SHA-256 signature over `msg` by the key `spki_der`
/// (SubjectPublicKeyInfo DER).
pub fn verify_signature(spki_der: &[u8], msg: &[u8], sig_der: &[u8]) -> Result<(), KeyError> {
    let key = VerifyingKey::from_public_key_der(spki_der)
        .map_err(|e| KeyError::InvalidPublicKey(e.to_string()))?;
    let sig = Signature::from_der(sig_der).map_err(|_| KeyError::MalformedSignature)?;
    key.verify(msg, &sig).map_err(|_| KeyError::BadSignature)
}

/// Makes a PKCS#10 certificate signing request (PEM) for `key`, asking for
/// `subject` in `cluster` (URI SAN `subject.uri(cluster)`, CN the subject).
///
/// The CA ignores what a request asks for and certifies the identity it decided
/// on; the names are there so a request is self-describing.
pub fn make_csr(key: &NodeKey, subject: &Subject, cluster: &str) -> Result<String, KeyError> {
    check_name("cluster", cluster).map_err(|e| KeyError::InvalidClusterName(e.0))?;
    let kp = key.rcgen_key_pair()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, subject.to_string());
    params.distinguished_name = dn;
    let uri = subject
        .uri(cluster)
        .try_into()
        .map_err(|e: rcgen::Error| KeyError::Csr(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params
        .serialize_request(&kp)
        .and_then(|csr| csr.pem())
        .map_err(|e| KeyError::Csr(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_pem_roundtrip_and_sign() {
        let k = NodeKey::generate().unwrap();
        let pem = k.to_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let k2 = NodeKey::from_pem(&pem).unwrap();
        assert_eq!(k.public_key_der(), k2.public_key_der());
        let sig = k.sign(b"hello");
        verify_signature(&k2.public_key_der(), b"hello", &sig).unwrap();
        assert_eq!(
            verify_signature(&k2.public_key_der(), b"hellO", &sig),
            Err(KeyError::BadSignature)
        );
        let other = NodeKey::generate().unwrap();
        assert_eq!(
            verify_signature(&other.public_key_der(), b"hello", &sig),
            Err(KeyError::BadSignature)
        );
        assert_eq!(
            verify_signature(&k.public_key_der(), b"hello", b"junk"),
            Err(KeyError::MalformedSignature)
        );
        assert!(matches!(
            verify_signature(b"junk", b"hello", &sig),
            Err(KeyError::InvalidPublicKey(_))
        ));
    }

    #[test]
    fn debug_hides_the_secret() {
        let k = NodeKey::generate().unwrap();
        let dbg = format!("{k:?}");
        assert!(dbg.starts_with("NodeKey(p256, public key "));
        let pem = k.to_pem();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!dbg.contains(&body[..20]));
    }

    #[test]
    fn p256_encoded_pkcs8_is_accepted() {
        // A key written by another tool (here: the p256 crate's own encoder) loads.
        use p256::pkcs8::EncodePrivateKey;
        let sk = SigningKey::from_slice(&[7u8; 32]).unwrap();
        let pem = sk.to_pkcs8_pem(LineEnding::LF).unwrap();
        let k = NodeKey::from_pem(&pem).unwrap();
        make_csr(&k, &Subject::Node(1), "lab").unwrap();
    }

    #[test]
    fn non_p256_keys_are_rejected() {
        let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(matches!(
            NodeKey::from_pem(&kp.serialize_pem()),
            Err(KeyError::InvalidPrivateKey(_))
        ));
        assert!(NodeKey::from_pem("not a key").is_err());
    }

    #[test]
    fn csr_names_the_subject() {
        let k = NodeKey::generate().unwrap();
        let pem = make_csr(&k, &Subject::User("alice".into()), "lab").unwrap();
        assert!(pem.contains("CERTIFICATE REQUEST"));
        let params = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
        assert_eq!(
            params.params.subject_alt_names,
            vec![SanType::URI("metta://lab/user/alice".try_into().unwrap())]
        );
        assert!(matches!(
            make_csr(&k, &Subject::Node(1), "Bad Name"),
            Err(KeyError::InvalidClusterName(_))
        ));
    }
}
