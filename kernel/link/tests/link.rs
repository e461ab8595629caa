//! Real TLS 1.3 handshakes between a `metta_link::Session` and a rustls
//! (ring) server configured like `mettad`'s listener.

mod common;

use common::*;
use metta_link::{
    heartbeat_request, interpret_ack, interpret_join, interpret_renew, join_request, renew_request,
    CertProblem, JoinError, JoinToken, LinkConfig, LinkError, NodeKey, Phase, ServerTrust, Session,
};
use metta_proto::{
    ApiError, ApiRequest, JoinResponse, NodeKind, NodeResources, Reply, Request, Role, Subject,
};
use rustls::crypto::ring;

fn resources() -> NodeResources {
    NodeResources {
        cpus: 2,
        memory_bytes: 512 << 20,
        arch: "x86_64".into(),
    }
}

fn token_for(ca: &metta_trust::ClusterCa) -> JoinToken {
    format!(
        "metta1.0a1b2c3d.00112233445566778899aabbccddeeff.{}",
        ca.pin()
    )
    .parse()
    .unwrap()
}

/// The server half of a join: checks the request and issues `node/<id>`.
fn answer_join(server: &mut Server, ca: &metta_trust::ClusterCa, token: &JoinToken, id: u64) {
    let Some(Request::Join(j)) = server.request() else {
        panic!("expected a join request")
    };
    assert_eq!(j.kind, NodeKind::Native);
    assert_eq!(j.token, token.credential());
    assert_eq!(j.name, "n7");
    assert_eq!(j.addr, "10.0.0.7:7000");
    assert_eq!(j.resources, resources());
    let cert = ca
        .issue(&j.csr_pem, &Subject::Node(id), T0, 3600, [7; 16])
        .unwrap();
    server.respond(&Ok(Reply::Joined(JoinResponse {
        node_id: id,
        cluster: ca.cluster().into(),
        role: Role::Worker,
        cert_pem: cert.pem,
        ca_cert_pem: ca.cert_pem().into(),
        ca_key_pem: None,
        members: vec![(1, "10.0.0.1:7000".into())],
    })));
}

#[test]
fn join_then_member_session_then_heartbeat() {
    let ca = ca("lab");
    let server_party = party(&ca, Subject::Node(1), 3600, true);
    let cfg = server_config(&ca, &server_party, T0 + 10);
    let token = token_for(&ca);
    let key = NodeKey::from_entropy(&entropy()).unwrap();

    // (a) pinned join: the request is queued before the handshake finishes.
    let mut client = Session::new(&LinkConfig::join(token.pin), T0 + 10, &entropy()).unwrap();
    assert_eq!(client.phase(), Phase::Handshaking);
    let req = join_request(&token, &key, "n7", "10.0.0.7:7000", resources()).unwrap();
    client.send_frame(&req).unwrap();
    assert_eq!(
        client.send_frame(&req).unwrap_err().to_string(),
        LinkError::Busy.to_string()
    );
    let mut server = Server::new(cfg.clone());
    pump(&mut client, &mut server).unwrap();
    assert_eq!(client.phase(), Phase::Established);
    assert_eq!(client.server().unwrap().subject, Subject::Node(1));
    assert_eq!(server.peer_subject(), None, "a joiner has no certificate");
    assert_eq!(server.conn.alpn_protocol(), Some(&b"metta/1"[..]));
    answer_join(&mut server, &ca, &token, 7);
    pump(&mut client, &mut server).unwrap();
    let resp = client.poll_response().unwrap().expect("the join answer");
    assert_eq!(client.poll_response().unwrap(), None);
    let joined = interpret_join(resp, &token, &key, T0 + 10).unwrap();
    assert_eq!(joined.node_id, 7);
    assert_eq!(joined.cluster, "lab");
    assert_eq!(joined.cert_not_after, T0 + 3600);
    assert_eq!(joined.ca_der, ca.cert_der());
    client.close();
    pump(&mut client, &mut server).unwrap();
    assert_eq!(client.phase(), Phase::Closed);
    assert!(matches!(client.send_frame(&req), Err(LinkError::Closed)));

    // (c) member session: the server sees the node's identity.
    let mut client = Session::new(&joined.link_config(key), T0 + 20, &entropy()).unwrap();
    let mut server = Server::new(cfg);
    pump(&mut client, &mut server).unwrap();
    assert_eq!(client.phase(), Phase::Established);
    assert_eq!(server.peer_subject(), Some(Subject::Node(7)));
    for round in 0..3 {
        client
            .send_frame(&heartbeat_request(
                resources(),
                joined.cert_not_after,
                "10.0.0.7:7000",
            ))
            .unwrap();
        pump(&mut client, &mut server).unwrap();
        let Some(Request::Api(ApiRequest::Heartbeat(hb))) = server.request() else {
            panic!("expected a heartbeat in round {round}")
        };
        assert_eq!(hb.cert_not_after, T0 + 3600);
        server.respond(&Ok(Reply::Done));
        pump(&mut client, &mut server).unwrap();
        interpret_ack(client.poll_response().unwrap().unwrap()).unwrap();
    }
    // An error answer is an answer too.
    client
        .send_frame(&heartbeat_request(resources(), 0, "x"))
        .unwrap();
    pump(&mut client, &mut server).unwrap();
    server.request().unwrap();
    server.respond(&Err(ApiError::Unauthenticated));
    pump(&mut client, &mut server).unwrap();
    assert!(interpret_ack(client.poll_response().unwrap().unwrap()).is_err());
}

#[test]
fn every_suite_and_group_interoperates() {
    use rustls::crypto::ring::{cipher_suite, kx_group};
    let ca = ca("lab");
    let server_party = party(&ca, Subject::Node(1), 3600, true);
    let suites = [
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    let groups: [&'static dyn rustls::crypto::SupportedKxGroup; 2] =
        [kx_group::X25519, kx_group::SECP256R1];
    for suite in suites {
        for group in groups {
            let provider = rustls::crypto::CryptoProvider {
                cipher_suites: vec![suite],
                kx_groups: vec![group],
                ..ring::default_provider()
            };
            let cfg = server_config_with(provider, &ca, &server_party, T0);
            let mut client = Session::new(&LinkConfig::join(pin(&ca)), T0, &entropy()).unwrap();
            let mut server = Server::new(cfg);
            client
                .send_frame(&Request::Api(ApiRequest::KvGet {
                    key: "k".repeat(40_000),
                }))
                .unwrap();
            pump(&mut client, &mut server).unwrap();
            assert_eq!(server.conn.negotiated_cipher_suite(), Some(suite));
            let Some(Request::Api(ApiRequest::KvGet { key })) = server.request() else {
                panic!("{suite:?} {group:?}: no request")
            };
            assert_eq!(key.len(), 40_000);
            // a multi-record answer
            server.respond(&Ok(Reply::Value(Some(vec![9u8; 50_000]))));
            pump(&mut client, &mut server).unwrap();
            assert_eq!(
                client.poll_response().unwrap(),
                Some(Ok(Reply::Value(Some(vec![9u8; 50_000])))),
                "{suite:?} {group:?}"
            );
        }
    }
}

#[test]
fn wrong_pin_is_a_pin_mismatch() {
    let ca = ca("lab");
    let other = ca_with_same_name();
    let server_party = party(&ca, Subject::Node(1), 3600, true);
    let mut client = Session::new(&LinkConfig::join(pin(&other)), T0, &entropy()).unwrap();
    let mut server = Server::new(server_config(&ca, &server_party, T0));
    let err = pump(&mut client, &mut server).unwrap_err();
    assert!(matches!(err, LinkError::PinMismatch), "{err}");
    assert_eq!(client.phase(), Phase::Failed);
    // the server was told (alert unknown_ca)
    assert!(
        matches!(
            server.error,
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::UnknownCA
            ))
        ),
        "{:?}",
        server.error
    );
    // sticky
    assert!(matches!(client.receive(b"x"), Err(LinkError::PinMismatch)));
    assert!(err.to_string().contains("pinned by the join token"));
}

fn ca_with_same_name() -> metta_trust::ClusterCa {
    ca("lab")
}

#[test]
fn server_without_ca_in_chain_is_a_pin_mismatch() {
    let ca = ca("lab");
    let server_party = party(&ca, Subject::Node(1), 3600, false);
    let mut client = Session::new(&LinkConfig::join(pin(&ca)), T0, &entropy()).unwrap();
    let mut server = Server::new(server_config(&ca, &server_party, T0));
    assert!(matches!(
        pump(&mut client, &mut server),
        Err(LinkError::PinMismatch)
    ));
}

#[test]
fn server_cert_from_another_ca_is_rejected() {
    let ca = ca("lab");
    let evil = ca_with_same_name();

    // Member mode: the server's certificate is from another CA.
    let joined_key = NodeKey::from_entropy(&entropy()).unwrap();
    let client_cert = ca
        .issue(
            &joined_key.csr_pem("node/0").unwrap(),
            &Subject::Node(5),
            T0,
            3600,
            [5; 16],
        )
        .unwrap();
    let identity = metta_link::ClientIdentity {
        chain: vec![client_cert.der.clone(), ca.cert_der().to_vec()],
        key: joined_key.clone(),
    };
    let evil_server = party(&evil, Subject::Node(1), 3600, true);
    let mut client = Session::new(
        &LinkConfig::member(ca.cert_der().to_vec(), identity.clone()),
        T0,
        &entropy(),
    )
    .unwrap();
    let mut server = Server::new(server_config(&evil, &evil_server, T0));
    let err = pump(&mut client, &mut server).unwrap_err();
    assert!(
        matches!(
            err,
            LinkError::CertificateRejected(CertProblem::UntrustedIssuer)
        ),
        "{err}"
    );

    // Pinned mode: the attacker shows the genuine CA certificate (it is
    // public) next to a leaf of its own CA.
    let mut forged = party(&evil, Subject::Node(1), 3600, false);
    forged.chain.push(rustls_pki_types::CertificateDer::from(
        ca.cert_der().to_vec(),
    ));
    let mut client = Session::new(&LinkConfig::join(pin(&ca)), T0, &entropy()).unwrap();
    let mut server = Server::new(server_config(&evil, &forged, T0));
    let err = pump(&mut client, &mut server).unwrap_err();
    assert!(
        matches!(
            err,
            LinkError::CertificateRejected(CertProblem::UntrustedIssuer)
        ),
        "{err}"
    );

    // A server of our CA but another cluster name... is another CA: the same.
    // A server refusing *our* certificate: the client sees the alert.
    let good_server = party(&ca, Subject::Node(1), 3600, true);
    let mut client = Session::new(
        &LinkConfig::member(ca.cert_der().to_vec(), identity),
        T0,
        &entropy(),
    )
    .unwrap();
    // the server trusts only the evil CA for clients
    let mut server = Server::new(server_config_with(
        ring::default_provider(),
        &evil,
        &good_server,
        T0,
    ));
    client
        .send_frame(&Request::Api(ApiRequest::Status))
        .unwrap();
    let err = pump(&mut client, &mut server).unwrap_err();
    assert!(matches!(err, LinkError::ServerAlert(_)), "{err}");
}

#[test]
fn expired_and_unexpected_servers_are_rejected() {
    let ca = ca("lab");
    let server_party = party(&ca, Subject::Node(1), 3600, true);
    // the client's clock is past the server certificate's expiry
    let mut client = Session::new(&LinkConfig::join(pin(&ca)), T0 + 7200, &entropy()).unwrap();
    let mut server = Server::new(server_config(&ca, &server_party, T0));
    let err = pump(&mut client, &mut server).unwrap_err();
    assert!(
        matches!(
            err,
            LinkError::CertificateRejected(CertProblem::Expired { not_after }) if not_after == T0 + 3600
        ),
        "{err}"
    );

    // expecting node/9, reaching node/1
    let key = NodeKey::from_entropy(&entropy()).unwrap();
    let cert = ca
        .issue(
            &key.csr_pem("x").unwrap(),
            &Subject::Node(2),
            T0,
            3600,
            [2; 16],
        )
        .unwrap();
    let cfg = LinkConfig::member(
        ca.cert_der().to_vec(),
        metta_link::ClientIdentity {
            chain: vec![cert.der],
            key,
        },
    )
    .expect_server(Subject::Node(9));
    let mut client = Session::new(&cfg, T0, &entropy()).unwrap();
    let mut server = Server::new(server_config(&ca, &server_party, T0));
    let err = pump(&mut client, &mut server).unwrap_err();
    assert_eq!(
        err.to_string(),
        "server certificate rejected: connected to node/1, but expected node/9"
    );

    // a leaf instead of a CA is refused up front
    let err = Session::new(
        &LinkConfig {
            trust: ServerTrust::Cluster {
                ca_der: server_party.chain[0].to_vec(),
                expect: None,
            },
            identity: None,
            max_response_len: 1024,
        },
        T0,
        &entropy(),
    )
    .unwrap_err();
    assert!(matches!(err, LinkError::InvalidCa(_)), "{err}");
}

#[test]
fn renewal_over_a_member_session_checks_the_new_certificate() {
    let ca = ca("lab");
    let server_party = party(&ca, Subject::Node(1), 3600, true);
    let cfg = server_config(&ca, &server_party, T0 + 10);
    let token = token_for(&ca);
    let key = NodeKey::from_entropy(&entropy()).unwrap();
    let mut client = Session::new(&LinkConfig::join(token.pin), T0 + 10, &entropy()).unwrap();
    let mut server = Server::new(cfg.clone());
    client
        .send_frame(&join_request(&token, &key, "n7", "10.0.0.7:7000", resources()).unwrap())
        .unwrap();
    pump(&mut client, &mut server).unwrap();
    answer_join(&mut server, &ca, &token, 7);
    pump(&mut client, &mut server).unwrap();
    let joined =
        interpret_join(client.poll_response().unwrap().unwrap(), &token, &key, T0).unwrap();

    // The renewal request travels on a member session; the server issues
    // a certificate for the CSR's key, as mettad's renew_for does.
    let mut client = Session::new(&joined.link_config(key.clone()), T0 + 2400, &entropy()).unwrap();
    let mut server = Server::new(server_config(&ca, &server_party, T0 + 2400));
    client.send_frame(&renew_request(&key).unwrap()).unwrap();
    pump(&mut client, &mut server).unwrap();
    let Some(Request::Api(ApiRequest::Renew { csr_pem })) = server.request() else {
        panic!("expected a renewal")
    };
    assert_eq!(server.peer_subject(), Some(Subject::Node(7)));
    assert_eq!(
        metta_trust::csr_public_key(&csr_pem).unwrap(),
        key.spki_der(),
        "the CSR is for the node's registered key"
    );
    let issued = ca
        .issue(&csr_pem, &Subject::Node(7), T0 + 2400, 3600, [8; 16])
        .unwrap();
    server.respond(&Ok(Reply::Cert {
        cert_pem: issued.pem.clone(),
        not_after: issued.not_after,
    }));
    pump(&mut client, &mut server).unwrap();
    let resp = client.poll_response().unwrap().unwrap();
    let renewed = interpret_renew(resp, &joined, &key, T0 + 2400).unwrap();
    assert_eq!(renewed.cert_not_after, T0 + 2400 + 3600);
    assert_eq!(renewed.cert_der, issued.der);
    assert_eq!((renewed.node_id, &renewed.ca_der), (7, &joined.ca_der));

    // The new certificate works for a member session, after the old one
    // expired (T0 + 3600, as the server's clock has it).
    let mut client =
        Session::new(&renewed.link_config(key.clone()), T0 + 3500, &entropy()).unwrap();
    let mut server = Server::new(server_config(&ca, &server_party, T0 + 3700));
    pump(&mut client, &mut server).unwrap();
    assert_eq!(client.phase(), Phase::Established);
    assert_eq!(server.peer_subject(), Some(Subject::Node(7)));

    // Refused: a certificate for another node, for another key, an error,
    // something else.
    let other = ca
        .issue(&csr_pem, &Subject::Node(8), T0, 3600, [9; 16])
        .unwrap();
    let cert = |pem: String| {
        Ok(Reply::Cert {
            cert_pem: pem,
            not_after: 0,
        })
    };
    assert!(matches!(
        interpret_renew(cert(other.pem), &joined, &key, T0),
        Err(JoinError::WrongIdentity { .. })
    ));
    let stranger = NodeKey::from_entropy(&[3; 32]).unwrap();
    let theirs = ca
        .issue(
            &stranger.csr_pem("x").unwrap(),
            &Subject::Node(7),
            T0,
            3600,
            [10; 16],
        )
        .unwrap();
    assert_eq!(
        interpret_renew(cert(theirs.pem), &joined, &key, T0),
        Err(JoinError::KeyMismatch)
    );
    assert!(matches!(
        interpret_renew(
            Err(ApiError::Unavailable("no leader".into())),
            &joined,
            &key,
            T0
        ),
        Err(JoinError::Refused(ApiError::Unavailable(_)))
    ));
    assert_eq!(
        interpret_renew(Ok(Reply::Done), &joined, &key, T0),
        Err(JoinError::UnexpectedReply)
    );
    // Another CA's certificate for the same name and key does not chain.
    let impostor = ca_with_same_name()
        .issue(&csr_pem, &Subject::Node(7), T0, 3600, [11; 16])
        .unwrap();
    assert!(matches!(
        interpret_renew(cert(impostor.pem), &joined, &key, T0),
        Err(JoinError::Certificate(_))
    ));
}

#[test]
fn identity_with_the_wrong_key_is_refused() {
    let ca = ca("lab");
    let key = NodeKey::from_entropy(&entropy()).unwrap();
    let other = NodeKey::from_entropy(&entropy()).unwrap();
    let cert = ca
        .issue(
            &key.csr_pem("x").unwrap(),
            &Subject::Node(2),
            T0,
            3600,
            [2; 16],
        )
        .unwrap();
    let err = Session::new(
        &LinkConfig::member(
            ca.cert_der().to_vec(),
            metta_link::ClientIdentity {
                chain: vec![cert.der],
                key: other,
            },
        ),
        T0,
        &entropy(),
    )
    .unwrap_err();
    assert!(matches!(err, LinkError::InvalidIdentity(_)), "{err}");
}

/// An established join session and its server.
fn established() -> (Session, Server) {
    let ca = ca("lab");
    let server_party = party(&ca, Subject::Node(1), 3600, true);
    let mut client = Session::new(&LinkConfig::join(pin(&ca)), T0, &entropy()).unwrap();
    let mut server = Server::new(server_config(&ca, &server_party, T0));
    pump(&mut client, &mut server).unwrap();
    assert_eq!(client.phase(), Phase::Established);
    (client, server)
}

#[test]
fn garbage_and_truncation_give_clear_errors() {
    // garbage instead of a ServerHello
    let ca = ca("lab");
    let mut client = Session::new(&LinkConfig::join(pin(&ca)), T0, &entropy()).unwrap();
    client.take_transmit();
    let err = client
        .receive(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        .unwrap_err();
    assert!(matches!(err, LinkError::HandshakeFailed(_)), "{err}");

    // the server's first flight cut short, then the TCP connection ends
    let server_party = party(&ca, Subject::Node(1), 3600, true);
    let mut client = Session::new(&LinkConfig::join(pin(&ca)), T0, &entropy()).unwrap();
    let mut server = Server::new(server_config(&ca, &server_party, T0));
    let hello = client.take_transmit();
    server.feed(&hello);
    let flight = server.take();
    client.receive(&flight[..flight.len() / 2]).unwrap();
    assert!(client.is_handshaking());
    let err = client.connection_closed().unwrap_err();
    assert!(
        matches!(
            err,
            LinkError::PeerClosed {
                awaiting: false,
                ..
            }
        ),
        "{err}"
    );

    // a corrupted record after the handshake
    let (mut client, mut server) = established();
    client
        .send_frame(&Request::Api(ApiRequest::Status))
        .unwrap();
    pump(&mut client, &mut server).unwrap();
    server.respond(&Ok(Reply::Done));
    let mut bytes = server.take();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let err = client.receive(&bytes).unwrap_err();
    assert!(matches!(err, LinkError::Tls(_)), "{err}");

    // a response that is not a frame of a Response
    let (mut client, mut server) = established();
    client
        .send_frame(&Request::Api(ApiRequest::Status))
        .unwrap();
    pump(&mut client, &mut server).unwrap();
    server.send_raw(&[0, 0, 0, 2, 200, 1]);
    let err = pump(&mut client, &mut server).unwrap_err();
    assert!(matches!(err, LinkError::BadFrame(_)), "{err}");

    // an oversized frame header is refused before buffering
    let (mut client, mut server) = established();
    client
        .send_frame(&Request::Api(ApiRequest::Status))
        .unwrap();
    pump(&mut client, &mut server).unwrap();
    server.send_raw(&u32::MAX.to_be_bytes());
    let err = pump(&mut client, &mut server).unwrap_err();
    assert!(matches!(err, LinkError::BadFrame(_)), "{err}");

    // data nobody asked for
    let (mut client, mut server) = established();
    server.respond(&Ok(Reply::Done));
    let err = pump(&mut client, &mut server).unwrap_err();
    assert!(matches!(err, LinkError::Unsolicited), "{err}");

    // two answers to one request
    let (mut client, mut server) = established();
    client
        .send_frame(&Request::Api(ApiRequest::Status))
        .unwrap();
    pump(&mut client, &mut server).unwrap();
    server.respond(&Ok(Reply::Done));
    server.respond(&Ok(Reply::Done));
    let err = pump(&mut client, &mut server).unwrap_err();
    assert!(matches!(err, LinkError::Unsolicited), "{err}");

    // the server closes (close_notify) while an answer is due
    let (mut client, mut server) = established();
    client
        .send_frame(&Request::Api(ApiRequest::Status))
        .unwrap();
    pump(&mut client, &mut server).unwrap();
    server.send_raw(&[0, 0]);
    server.conn.send_close_notify();
    let err = pump(&mut client, &mut server).unwrap_err();
    assert!(
        matches!(
            err,
            LinkError::PeerClosed {
                awaiting: true,
                partial: 2
            }
        ),
        "{err}"
    );

    // ... or the TCP connection just ends
    let (mut client, mut server) = established();
    client
        .send_frame(&Request::Api(ApiRequest::Status))
        .unwrap();
    pump(&mut client, &mut server).unwrap();
    assert!(matches!(
        client.connection_closed(),
        Err(LinkError::PeerClosed { awaiting: true, .. })
    ));

    // a clean close between exchanges is fine
    let (mut client, mut server) = established();
    server.conn.send_close_notify();
    pump(&mut client, &mut server).unwrap();
    assert_eq!(client.phase(), Phase::PeerClosed);
    client.connection_closed().unwrap();
    assert!(matches!(
        client.send_frame(&Request::Api(ApiRequest::Status)),
        Err(LinkError::PeerClosed { .. })
    ));
}

#[test]
fn session_tickets_from_a_server_are_ignored() {
    // mettad sends none; a server that does must not confuse the session.
    let ca = ca("lab");
    let server_party = party(&ca, Subject::Node(1), 3600, true);
    let mut cfg = (*server_config(&ca, &server_party, T0)).clone();
    cfg.send_tls13_tickets = 3;
    let mut client = Session::new(&LinkConfig::join(pin(&ca)), T0, &entropy()).unwrap();
    let mut server = Server::new(std::sync::Arc::new(cfg));
    client
        .send_frame(&Request::Api(ApiRequest::Status))
        .unwrap();
    pump(&mut client, &mut server).unwrap();
    assert!(server.request().is_some());
    server.respond(&Ok(Reply::Done));
    pump(&mut client, &mut server).unwrap();
    assert_eq!(client.poll_response().unwrap(), Some(Ok(Reply::Done)));
}
