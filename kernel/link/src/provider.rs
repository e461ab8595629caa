//! A rustls `CryptoProvider` made of RustCrypto parts, for the bare target.
//!
//! `ring` (what `mettad` uses) does not build for `x86_64-unknown-none`; these
//! pure-Rust crates do (with the portable-code cfgs of `check-bare.sh`). The
//! provider holds only what a Metta link needs to interoperate with a
//! `mettad` server (rustls + ring, TLS 1.3 only, ECDSA P-256 certificates):
//!
//! - cipher suites `TLS13_CHACHA20_POLY1305_SHA256` (first: fastest in
//!   software, constant-time without AES-NI) and `TLS13_AES_128_GCM_SHA256`;
//! - key exchange X25519 and secp256r1;
//! - signature verification `ecdsa_secp256r1_sha256` (handshake signatures
//!   and certificate chains: Metta CAs and leaves are all P-256/SHA-256);
//! - client signing keys: PKCS#8 ECDSA P-256;
//! - randomness: the caller-seeded pool of [`crate::rng`].
//!
//! Every primitive here is a thin adapter; the cryptography is the RustCrypto
//! crates' (`aes-gcm`, `chacha20poly1305`, `sha2`, `hmac`, `p256`,
//! `x25519-dalek`).

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use aes_gcm::aead::consts::{U12, U16};
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::Aes128Gcm;
use chacha20poly1305::ChaCha20Poly1305;
use hmac::Mac;
use p256::ecdsa::signature::Verifier as _;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rustls::crypto::cipher::{
    make_tls13_aad, AeadKey, InboundOpaqueMessage, InboundPlainMessage, Iv, MessageDecrypter,
    MessageEncrypter, Nonce, OutboundOpaqueMessage, OutboundPlainMessage, PrefixedPayload,
    Tls13AeadAlgorithm, UnsupportedOperationError,
};
use rustls::crypto::tls13::HkdfUsingHmac;
use rustls::crypto::{
    hash, hmac as tls_hmac, ActiveKeyExchange, CryptoProvider, KeyProvider, SharedSecret,
    SupportedKxGroup, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::{
    alg_id, AlgorithmIdentifier, InvalidSignature, PrivateKeyDer, SignatureVerificationAlgorithm,
};
use rustls::{
    CipherSuite, CipherSuiteCommon, ConnectionTrafficSecrets, ContentType, NamedGroup,
    ProtocolVersion, SignatureScheme, SupportedCipherSuite, Tls13CipherSuite,
};
use sha2::{Digest, Sha256};

use crate::key::NodeKey;
use crate::rng::PoolRandom;

/// The provider: see the module docs for what it contains.
pub fn provider() -> CryptoProvider {
    CryptoProvider {
        cipher_suites: alloc::vec![TLS13_CHACHA20_POLY1305_SHA256, TLS13_AES_128_GCM_SHA256],
        kx_groups: alloc::vec![&X25519 as &dyn SupportedKxGroup, &SECP256R1],
        signature_verification_algorithms: ALGORITHMS,
        secure_random: &PoolRandom,
        key_provider: &P256Keys,
    }
}

/// `TLS13_CHACHA20_POLY1305_SHA256`.
pub static TLS13_CHACHA20_POLY1305_SHA256: SupportedCipherSuite =
    SupportedCipherSuite::Tls13(&Tls13CipherSuite {
        common: CipherSuiteCommon {
            suite: CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
            hash_provider: &Sha256Hash,
            confidentiality_limit: u64::MAX,
        },
        hkdf_provider: &HkdfUsingHmac(&HmacSha256),
        aead_alg: &ChaChaAead,
        quic: None,
    });

/// `TLS13_AES_128_GCM_SHA256`.
pub static TLS13_AES_128_GCM_SHA256: SupportedCipherSuite =
    SupportedCipherSuite::Tls13(&Tls13CipherSuite {
        common: CipherSuiteCommon {
            suite: CipherSuite::TLS13_AES_128_GCM_SHA256,
            hash_provider: &Sha256Hash,
            // 2^24 full records per key for AES-GCM (rustls's own figure).
            confidentiality_limit: 1 << 24,
        },
        hkdf_provider: &HkdfUsingHmac(&HmacSha256),
        aead_alg: &Aes128GcmAead,
        quic: None,
    });

/// The signature algorithms: ECDSA P-256 with SHA-256 only.
pub static ALGORITHMS: WebPkiSupportedAlgorithms = WebPkiSupportedAlgorithms {
    all: &[&EcdsaP256Sha256],
    mapping: &[(SignatureScheme::ECDSA_NISTP256_SHA256, &[&EcdsaP256Sha256])],
};

// ---------------------------------------------------------------- hashing

struct Sha256Hash;

impl hash::Hash for Sha256Hash {
    fn start(&self) -> Box<dyn hash::Context> {
        Box::new(Sha256Context(Sha256::new()))
    }

    fn hash(&self, data: &[u8]) -> hash::Output {
        hash::Output::new(&Sha256::digest(data))
    }

    fn output_len(&self) -> usize {
        32
    }

    fn algorithm(&self) -> rustls::crypto::hash::HashAlgorithm {
        rustls::crypto::hash::HashAlgorithm::SHA256
    }
}

struct Sha256Context(Sha256);

impl hash::Context for Sha256Context {
    fn fork_finish(&self) -> hash::Output {
        hash::Output::new(&self.0.clone().finalize())
    }

    fn fork(&self) -> Box<dyn hash::Context> {
        Box::new(Sha256Context(self.0.clone()))
    }

    fn finish(self: Box<Self>) -> hash::Output {
        hash::Output::new(&self.0.finalize())
    }

    fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
}

struct HmacSha256;

impl tls_hmac::Hmac for HmacSha256 {
    fn with_key(&self, key: &[u8]) -> Box<dyn tls_hmac::Key> {
        // HMAC takes keys of any length: `new_from_slice` cannot fail.
        #[allow(clippy::expect_used)]
        let mac = <hmac::Hmac<Sha256> as Mac>::new_from_slice(key)
            .expect("HMAC accepts keys of any length");
        Box::new(HmacSha256Key(mac))
    }

    fn hash_output_len(&self) -> usize {
        32
    }
}

struct HmacSha256Key(hmac::Hmac<Sha256>);

impl tls_hmac::Key for HmacSha256Key {
    fn sign_concat(&self, first: &[u8], middle: &[&[u8]], last: &[u8]) -> tls_hmac::Tag {
        let mut mac = self.0.clone();
        mac.update(first);
        for m in middle {
            mac.update(m);
        }
        mac.update(last);
        tls_hmac::Tag::new(&mac.finalize().into_bytes())
    }

    fn tag_len(&self) -> usize {
        32
    }
}

// ------------------------------------------------------------------- AEAD

/// An AEAD with TLS 1.3's shape: 12-byte nonces, 16-byte tags.
trait TlsAead: AeadInPlace<NonceSize = U12, TagSize = U16> + KeyInit + Send + Sync + 'static {}
impl<T: AeadInPlace<NonceSize = U12, TagSize = U16> + KeyInit + Send + Sync + 'static> TlsAead
    for T
{
}

const TAG_LEN: usize = 16;

struct ChaChaAead;
struct Aes128GcmAead;

impl Tls13AeadAlgorithm for ChaChaAead {
    fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
        Box::new(RecordCrypter::<ChaCha20Poly1305>::new(&key, iv))
    }

    fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
        Box::new(RecordCrypter::<ChaCha20Poly1305>::new(&key, iv))
    }

    fn key_len(&self) -> usize {
        32
    }

    fn extract_keys(
        &self,
        key: AeadKey,
        iv: Iv,
    ) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        Ok(ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv })
    }
}

impl Tls13AeadAlgorithm for Aes128GcmAead {
    fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
        Box::new(RecordCrypter::<Aes128Gcm>::new(&key, iv))
    }

    fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
        Box::new(RecordCrypter::<Aes128Gcm>::new(&key, iv))
    }

    fn key_len(&self) -> usize {
        16
    }

    fn extract_keys(
        &self,
        key: AeadKey,
        iv: Iv,
    ) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        Ok(ConnectionTrafficSecrets::Aes128Gcm { key, iv })
    }
}

/// Seals or opens TLS 1.3 records with one traffic key.
struct RecordCrypter<C> {
    /// `None` if rustls handed over a key of the wrong length (it does not):
    /// every record then fails instead of the process panicking.
    cipher: Option<C>,
    iv: Iv,
}

impl<C: TlsAead> RecordCrypter<C> {
    fn new(key: &AeadKey, iv: Iv) -> Self {
        RecordCrypter {
            cipher: C::new_from_slice(key.as_ref()).ok(),
            iv,
        }
    }
}

impl<C: TlsAead> MessageEncrypter for RecordCrypter<C> {
    fn encrypt(
        &mut self,
        msg: OutboundPlainMessage<'_>,
        seq: u64,
    ) -> Result<OutboundOpaqueMessage, rustls::Error> {
        let cipher = self.cipher.as_ref().ok_or(rustls::Error::EncryptError)?;
        let total_len = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(total_len);
        payload.extend_from_chunks(&msg.payload);
        payload.extend_from_slice(&[u8::from(msg.typ)]);
        let nonce = Nonce::new(&self.iv, seq).0.into();
        let tag = cipher
            .encrypt_in_place_detached(&nonce, &make_tls13_aad(total_len), payload.as_mut())
            .map_err(|_| rustls::Error::EncryptError)?;
        payload.extend_from_slice(&tag);
        Ok(OutboundOpaqueMessage::new(
            ContentType::ApplicationData,
            // TLS 1.3 records carry the legacy version 0x0303 (RFC 8446 §5.1).
            ProtocolVersion::TLSv1_2,
            payload,
        ))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + 1 + TAG_LEN
    }
}

impl<C: TlsAead> MessageDecrypter for RecordCrypter<C> {
    fn decrypt<'a>(
        &mut self,
        mut msg: InboundOpaqueMessage<'a>,
        seq: u64,
    ) -> Result<InboundPlainMessage<'a>, rustls::Error> {
        let cipher = self.cipher.as_ref().ok_or(rustls::Error::DecryptError)?;
        let payload = &mut msg.payload;
        let len = payload.len();
        let Some(plain_len) = len.checked_sub(TAG_LEN) else {
            return Err(rustls::Error::DecryptError);
        };
        let nonce = Nonce::new(&self.iv, seq).0.into();
        let aad = make_tls13_aad(len);
        let (body, tag) = payload.split_at_mut(plain_len);
        let tag: [u8; TAG_LEN] = (&*tag)
            .try_into()
            .map_err(|_| rustls::Error::DecryptError)?;
        cipher
            .decrypt_in_place_detached(&nonce, &aad, body, &tag.into())
            .map_err(|_| rustls::Error::DecryptError)?;
        payload.truncate(plain_len);
        msg.into_tls13_unpadded_message()
    }
}

// ----------------------------------------------------------- key exchange

fn random_32() -> Result<[u8; 32], rustls::Error> {
    let mut b = [0u8; 32];
    crate::rng::fill(&mut b).map_err(|_| rustls::Error::FailedToGetRandomBytes)?;
    Ok(b)
}

#[derive(Debug)]
struct X25519Group;
static X25519: X25519Group = X25519Group;

impl SupportedKxGroup for X25519Group {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        let secret = x25519_dalek::StaticSecret::from(random_32()?);
        let public = x25519_dalek::PublicKey::from(&secret);
        Ok(Box::new(X25519Exchange {
            secret,
            public: public.to_bytes(),
        }))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

struct X25519Exchange {
    secret: x25519_dalek::StaticSecret,
    public: [u8; 32],
}

impl ActiveKeyExchange for X25519Exchange {
    fn complete(self: Box<Self>, peer_pub_key: &[u8]) -> Result<SharedSecret, rustls::Error> {
        let peer: [u8; 32] = peer_pub_key
            .try_into()
            .map_err(|_| rustls::PeerMisbehaved::InvalidKeyShare)?;
        let shared = self
            .secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(peer));
        // A low-order peer point gives an all-zero secret (RFC 7748 §6.1).
        if !shared.was_contributory() {
            return Err(rustls::PeerMisbehaved::InvalidKeyShare.into());
        }
        Ok(SharedSecret::from(&shared.as_bytes()[..]))
    }

    fn pub_key(&self) -> &[u8] {
        &self.public
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

#[derive(Debug)]
struct Secp256r1Group;
static SECP256R1: Secp256r1Group = Secp256r1Group;

impl SupportedKxGroup for Secp256r1Group {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        // Out-of-range draws (probability ~2^-32) are drawn again.
        for _ in 0..8 {
            if let Ok(secret) = p256::SecretKey::from_bytes(&random_32()?.into()) {
                let public = secret
                    .public_key()
                    .to_encoded_point(false)
                    .as_bytes()
                    .to_vec();
                return Ok(Box::new(Secp256r1Exchange { secret, public }));
            }
        }
        Err(rustls::Error::FailedToGetRandomBytes)
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::secp256r1
    }
}

struct Secp256r1Exchange {
    secret: p256::SecretKey,
    public: Vec<u8>,
}

impl ActiveKeyExchange for Secp256r1Exchange {
    fn complete(self: Box<Self>, peer_pub_key: &[u8]) -> Result<SharedSecret, rustls::Error> {
        // TLS 1.3 key shares are uncompressed points (RFC 8446 §4.2.8.2).
        if peer_pub_key.len() != 65 || peer_pub_key[0] != 4 {
            return Err(rustls::PeerMisbehaved::InvalidKeyShare.into());
        }
        let peer = p256::PublicKey::from_sec1_bytes(peer_pub_key)
            .map_err(|_| rustls::PeerMisbehaved::InvalidKeyShare)?;
        let shared = p256::ecdh::diffie_hellman(self.secret.to_nonzero_scalar(), peer.as_affine());
        Ok(SharedSecret::from(&shared.raw_secret_bytes()[..]))
    }

    fn pub_key(&self) -> &[u8] {
        &self.public
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::secp256r1
    }
}

// ------------------------------------------------------------- signatures

/// ECDSA over P-256 with SHA-256 (certificates and CertificateVerify).
#[derive(Debug)]
struct EcdsaP256Sha256;

impl SignatureVerificationAlgorithm for EcdsaP256Sha256 {
    fn verify_signature(
        &self,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), InvalidSignature> {
        let key =
            p256::ecdsa::VerifyingKey::from_sec1_bytes(public_key).map_err(|_| InvalidSignature)?;
        let sig = p256::ecdsa::Signature::from_der(signature).map_err(|_| InvalidSignature)?;
        key.verify(message, &sig).map_err(|_| InvalidSignature)
    }

    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        alg_id::ECDSA_P256
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        alg_id::ECDSA_SHA256
    }
}

/// Loads PKCS#8 ECDSA P-256 keys.
struct P256Keys;

impl fmt::Debug for P256Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("P256Keys")
    }
}

impl KeyProvider for P256Keys {
    fn load_private_key(
        &self,
        key_der: PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
        let refuse = || rustls::Error::General("only PKCS#8 ECDSA P-256 keys are supported".into());
        match key_der {
            PrivateKeyDer::Pkcs8(k) => {
                NodeKey::tls_key_from_pkcs8(k.secret_pkcs8_der()).map_err(|_| refuse())
            }
            _ => Err(refuse()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::hash::Hash as _;
    use rustls::crypto::hmac::Hmac as _;

    #[test]
    fn sha256_and_hmac_known_answers() {
        // FIPS 180-2 "abc"
        let out = Sha256Hash.hash(b"abc");
        assert_eq!(
            out.as_ref()[..4],
            [0xba, 0x78, 0x16, 0xbf],
            "sha256(abc) starts ba7816bf"
        );
        // RFC 4231 test case 2
        let tag = HmacSha256
            .with_key(b"Jefe")
            .sign(&[b"what do ya want ", b"for nothing?"]);
        assert_eq!(tag.as_ref()[..4], [0x5b, 0xdc, 0xc1, 0x46]);
    }

    #[test]
    fn kx_groups_agree() {
        crate::rng::add_entropy(&[5u8; 32]);
        for g in [&X25519 as &dyn SupportedKxGroup, &SECP256R1] {
            let a = g.start().unwrap();
            let b = g.start().unwrap();
            let b_pub = b.pub_key().to_vec();
            let a_pub = a.pub_key().to_vec();
            let s1 = a.complete(&b_pub).unwrap();
            let s2 = b.complete(&a_pub).unwrap();
            assert_eq!(s1.secret_bytes(), s2.secret_bytes());
            assert!(g.start().unwrap().complete(&[0u8; 7]).is_err());
        }
        // an all-zero X25519 point is refused
        assert!(X25519.start().unwrap().complete(&[0u8; 32]).is_err());
    }
}
