//! Differential test: this crate's certificate checks (`metta_link::cert`,
//! no_std, x509-cert) against `metta_trust::check_cert` (std, x509-parser) on
//! the same certificates, including deviant ones crafted with rcgen.

use metta_link::cert::{check_server_leaf, CertProblem};
use metta_link::NodeKey;
use metta_proto::Subject;
use metta_trust::{check_cert, CertError, ClusterCa, Purpose, RevocationList};
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
    SubjectPublicKeyInfo,
};

const T0: u64 = 1_700_000_000;

fn craft(
    ca: &ClusterCa,
    key: &NodeKey,
    uris: &[&str],
    eku: &[ExtendedKeyUsagePurpose],
    is_ca: bool,
) -> Vec<u8> {
    // Node certificates carry the control role, as control nodes' do.
    let node = uris.iter().any(|u| u.contains("/node/"));
    craft_with_ou(ca, key, uris, eku, is_ca, node.then_some("metta-control"))
}

fn craft_with_ou(
    ca: &ClusterCa,
    key: &NodeKey,
    uris: &[&str],
    eku: &[ExtendedKeyUsagePurpose],
    is_ca: bool,
    ou: Option<&str>,
) -> Vec<u8> {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "crafted");
    if let Some(ou) = ou {
        p.distinguished_name
            .push(DnType::OrganizationalUnitName, ou);
    }
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    p.extended_key_usages = eku.to_vec();
    p.is_ca = if is_ca {
        IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
    } else {
        IsCa::ExplicitNoCa
    };
    p.not_before = time::OffsetDateTime::from_unix_timestamp(T0 as i64).unwrap();
    p.not_after = time::OffsetDateTime::from_unix_timestamp(T0 as i64 + 60).unwrap();
    let ca_key = KeyPair::from_pem(ca.key_pem()).unwrap();
    let issuer = Issuer::from_ca_cert_der(&ca.cert_der().to_vec().into(), ca_key).unwrap();
    let spki = SubjectPublicKeyInfo::from_der(&key.spki_der()).unwrap();
    p.signed_by(&spki, &issuer).unwrap().der().to_vec()
}

fn class_mine(r: Result<metta_link::LeafInfo, CertProblem>) -> String {
    match r {
        Ok(i) => format!("ok {}", i.subject),
        Err(CertProblem::NoIdentity) => "no identity".into(),
        Err(CertProblem::NotEndEntity) => "not end entity".into(),
        Err(CertProblem::ForeignCluster { found, .. }) => format!("foreign {found}"),
        Err(CertProblem::Expired { not_after }) => format!("expired {not_after}"),
        Err(CertProblem::NotYetValid { not_before }) => format!("not yet {not_before}"),
        Err(CertProblem::WrongEku) => "eku".into(),
        Err(CertProblem::WrongSubject { found, .. }) => format!("subject {found}"),
        Err(CertProblem::NotControl(found)) => format!("not control {found}"),
        Err(other) => format!("other {other}"),
    }
}

fn class_theirs(r: Result<metta_trust::CertInfo, CertError>) -> String {
    match r {
        Ok(i) => format!("ok {}", i.subject),
        Err(CertError::NoIdentity) => "no identity".into(),
        Err(CertError::NotEndEntity) => "not end entity".into(),
        Err(CertError::ForeignCluster { found, .. }) => format!("foreign {found}"),
        Err(CertError::Expired { not_after }) => format!("expired {not_after}"),
        Err(CertError::NotYetValid { not_before }) => format!("not yet {not_before}"),
        Err(CertError::WrongEku { .. }) => "eku".into(),
        Err(CertError::WrongSubject { found, .. }) => format!("subject {found}"),
        Err(CertError::NotControl { found }) => format!("not control {found}"),
        Err(other) => format!("other {other}"),
    }
}

#[test]
fn same_verdicts_as_metta_trust() {
    use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let ca = ClusterCa::create("lab", T0 - 1000, 86400).unwrap();
    let key = NodeKey::from_entropy(&[11u8; 32]).unwrap();
    let both = [ServerAuth, ClientAuth];
    let certs: Vec<(&str, Vec<u8>)> = vec![
        (
            "good",
            craft(&ca, &key, &["metta://lab/node/4"], &both, false),
        ),
        (
            "user",
            craft(&ca, &key, &["metta://lab/user/alice"], &both, false),
        ),
        (
            "client only",
            craft(&ca, &key, &["metta://lab/node/4"], &[ClientAuth], false),
        ),
        (
            "no eku",
            craft(&ca, &key, &["metta://lab/node/4"], &[], false),
        ),
        ("no uri", craft(&ca, &key, &[], &both, false)),
        (
            "two uris",
            craft(
                &ca,
                &key,
                &["metta://lab/node/4", "metta://lab/node/5"],
                &both,
                false,
            ),
        ),
        (
            "other scheme only",
            craft(&ca, &key, &["https://lab/node/4"], &both, false),
        ),
        (
            "other scheme too",
            craft(
                &ca,
                &key,
                &["https://x/y", "metta://lab/node/4"],
                &both,
                false,
            ),
        ),
        (
            "non canonical",
            craft(&ca, &key, &["metta://lab/node/04"], &both, false),
        ),
        (
            "ca path",
            craft(&ca, &key, &["metta://lab/ca"], &both, false),
        ),
        (
            "foreign",
            craft(&ca, &key, &["metta://prod/node/4"], &both, false),
        ),
        (
            "bad cluster",
            craft(&ca, &key, &["metta://Lab!/node/4"], &both, false),
        ),
        (
            "is a ca",
            craft(&ca, &key, &["metta://lab/node/4"], &both, true),
        ),
        ("the ca itself", ca.cert_der().to_vec()),
        (
            "a worker",
            craft_with_ou(
                &ca,
                &key,
                &["metta://lab/node/4"],
                &both,
                false,
                Some("metta-worker"),
            ),
        ),
        (
            "no role",
            craft_with_ou(&ca, &key, &["metta://lab/node/4"], &both, false, None),
        ),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for (name, der) in &certs {
        for now in [T0 - 1, T0, T0 + 30, T0 + 60, T0 + 61] {
            for expect in [None, Some(Subject::Node(4)), Some(Subject::Node(5))] {
                let mine = class_mine(check_server_leaf(der, "lab", now, expect.as_ref()));
                let theirs =
                    check_cert(der, "lab", now, Purpose::Server, &RevocationList::default())
                        .and_then(|info| match &expect {
                            Some(e) if *e != info.subject => Err(CertError::WrongSubject {
                                expected: e.clone(),
                                found: info.subject,
                            }),
                            // A native node talks only to control nodes.
                            _ if info.role != Some(metta_proto::Role::Control) => {
                                Err(CertError::NotControl {
                                    found: info.subject,
                                })
                            }
                            _ => Ok(info),
                        });
                let theirs = class_theirs(theirs);
                assert_eq!(mine, theirs, "{name} at {now} expecting {expect:?}");
                seen.insert(mine);
            }
        }
    }
    // every rule was exercised
    for class in [
        "ok node/4",
        "no identity",
        "not end entity",
        "foreign prod",
        "eku",
        "subject node/4",
        "not control node/4",
    ] {
        assert!(seen.contains(class), "{class} not exercised: {seen:?}");
    }
    assert!(seen.iter().any(|s| s.starts_with("expired")));
    assert!(seen.iter().any(|s| s.starts_with("not yet")));
}
