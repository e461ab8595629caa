//! What this crate produces is what `metta-trust` (the control plane's side)
//! accepts: CSRs, join tokens, pins.

use metta_link::{CaPin, JoinToken, NodeKey, TokenParseError};
use metta_proto::Subject;
use proptest::prelude::*;

const T0: u64 = 1_700_000_000;

#[test]
fn csr_is_accepted_by_the_cluster_ca() {
    let ca = metta_trust::ClusterCa::create("lab", T0, 86400).unwrap();
    let key = NodeKey::from_entropy(&[42u8; 32]).unwrap();
    let csr = key.csr_pem("node/0").unwrap();
    // proof of possession and key type, as the CA checks them
    assert_eq!(metta_trust::csr_public_key(&csr).unwrap(), key.spki_der());
    let cert = ca
        .issue(&csr, &Subject::Node(12), T0, 3600, [1; 16])
        .unwrap();
    let info = metta_trust::parse_cert(&cert.der).unwrap();
    assert_eq!(info.subject, Subject::Node(12));
    assert_eq!(info.cluster, "lab");
    assert_eq!(info.spki_der, key.spki_der());
    // the same facts through this crate's own parser
    let mine = metta_link::cert::parse_leaf(&cert.der).unwrap();
    assert_eq!(mine.subject, Subject::Node(12));
    assert_eq!(mine.spki_der, key.spki_der());
    assert_eq!(
        (mine.not_before, mine.not_after),
        (info.not_before, info.not_after)
    );
    assert!(mine.server_auth && mine.client_auth);
    assert_eq!(metta_link::cert::ca_cluster(ca.cert_der()).unwrap(), "lab");
    assert!(metta_link::cert::parse_leaf(ca.cert_der()).is_err());
    // rcgen's CSR parser (which also checks the signature) reads it too
    assert!(rcgen::CertificateSigningRequestParams::from_pem(&csr).is_ok());
}

#[test]
fn a_tampered_csr_is_refused() {
    let ca = metta_trust::ClusterCa::create("lab", T0, 86400).unwrap();
    let key = NodeKey::from_entropy(&[43u8; 32]).unwrap();
    let mut der = key.csr_der("node/1").unwrap();
    let pos = der.windows(6).position(|w| w == b"node/1").unwrap();
    der[pos + 5] = b'2';
    let pem = pem_of("CERTIFICATE REQUEST", &der);
    assert_eq!(
        ca.issue(&pem, &Subject::Node(1), T0, 60, [1; 16]),
        Err(metta_trust::CaError::CsrSignature)
    );
}

fn pem_of(label: &str, der: &[u8]) -> String {
    der::pem::encode_string(label, der::pem::LineEnding::LF, der).unwrap()
}

#[test]
fn keys_are_interchangeable_with_metta_trust() {
    let key = NodeKey::from_entropy(&[44u8; 32]).unwrap();
    let der = key.to_pkcs8_der().unwrap();
    let theirs = metta_trust::NodeKey::from_pkcs8_der(&der).unwrap();
    assert_eq!(theirs.public_key_der(), key.spki_der());
    let sig = key.sign(b"grant");
    metta_trust::verify_signature(&theirs.public_key_der(), b"grant", &sig).unwrap();
    let back = NodeKey::from_pkcs8_der(theirs.pkcs8_der()).unwrap();
    assert_eq!(back.spki_der(), key.spki_der());
}

#[test]
fn pins_agree() {
    let ca = metta_trust::ClusterCa::create("lab", T0, 86400).unwrap();
    assert_eq!(CaPin::of_der(ca.cert_der()).0, ca.pin().0);
    assert_eq!(
        ca.pin().to_string().parse::<CaPin>().unwrap(),
        CaPin(ca.pin().0)
    );
}

/// Both parsers' verdicts, in a comparable form.
fn both(s: &str) -> (Result<String, String>, Result<String, String>) {
    let mine = s
        .parse::<JoinToken>()
        .map(|t| format!("{t}|{}", t.credential()))
        .map_err(|e| match e {
            TokenParseError::Prefix => "prefix".to_string(),
            TokenParseError::Parts(n) => format!("parts {n}"),
            TokenParseError::Id => "id".into(),
            TokenParseError::Secret => "secret".into(),
            TokenParseError::Pin => "pin".into(),
            _ => "other".into(),
        });
    let theirs = s
        .parse::<metta_trust::JoinToken>()
        .map(|t| format!("{t}|{}", t.credential()))
        .map_err(|e| match e {
            metta_trust::TokenParseError::Prefix => "prefix".to_string(),
            metta_trust::TokenParseError::Parts(n) => format!("parts {n}"),
            metta_trust::TokenParseError::Id => "id".into(),
            metta_trust::TokenParseError::Secret => "secret".into(),
            metta_trust::TokenParseError::Pin => "pin".into(),
            _ => "other".into(),
        });
    (mine, theirs)
}

const GOOD: &str = "metta1.0a1b2c3d.00112233445566778899aabbccddeeff.000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

#[test]
fn token_parser_matches_metta_trust_on_known_cases() {
    for s in [
        GOOD,
        "",
        "metta1",
        "metta1.",
        "metta1...",
        "metta2.0a1b2c3d.00112233445566778899aabbccddeeff.00",
        " metta1.0a1b2c3d.00112233445566778899aabbccddeeff.000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
        "metta1.0A1B2C3D.00112233445566778899aabbccddeeff.000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
        "metta1.0a1b2c3d.00112233445566778899aabbccddeefg.000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
        "metta1.0a1b2c3d.00112233445566778899aabbccddeeff.000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n",
        "metta1.0a1b2c3d.00112233445566778899aabbccddeeff.000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f.x",
        "metta1.0a1b2c3é.00112233445566778899aabbccddeeff.000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    ] {
        let (mine, theirs) = both(s);
        assert_eq!(mine, theirs, "{s:?}");
    }
    assert!(both(GOOD).0.is_ok());
}

proptest! {
    #[test]
    fn token_parser_matches_metta_trust(
        edits in proptest::collection::vec((0usize..200, prop_oneof![
            Just('.'), Just('a'), Just('F'), Just('0'), Just('g'), Just(' '), Just('é'), any::<char>()
        ], 0u8..3), 0..4),
        arbitrary in ".{0,160}",
    ) {
        // mutations of a valid token: replace, insert or delete characters
        let mut chars: Vec<char> = GOOD.chars().collect();
        for (pos, c, op) in edits {
            let pos = pos % (chars.len() + 1);
            match op {
                0 if pos < chars.len() => chars[pos] = c,
                1 => chars.insert(pos, c),
                _ if pos < chars.len() => { chars.remove(pos); }
                _ => {}
            }
        }
        let s: String = chars.into_iter().collect();
        let (mine, theirs) = both(&s);
        prop_assert_eq!(mine, theirs, "{:?}", s);
        let (mine, theirs) = both(&arbitrary);
        prop_assert_eq!(mine, theirs, "{:?}", arbitrary);
    }
}
