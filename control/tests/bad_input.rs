//! Bad input against a real `mettad`: every case gets a clear error, changes
//! nothing, and the node keeps serving.

mod common;

use std::sync::{Arc, RwLock};

use common::*;
use metta_control::client::Client;
use metta_control::config::ClientConfig;
use metta_control::transport::{self, CallError, Credentials, ServerTrust};
use metta_proto::{frame, ApiError, ApiRequest, Grant, Reply, Request, Response, Rights, Subject};
use metta_trust::{ClusterCa, NodeKey, RevocationList};

fn admin_cfg(c: &Cluster) -> ClientConfig {
    ClientConfig::load(&c.admin).unwrap()
}

/// A client config for `subject` whose certificate the given CA issued at
/// `issued_at` for `lifetime` seconds.
fn forged_config(
    base: &ClientConfig,
    ca: &ClusterCa,
    subject: &Subject,
    issued_at: u64,
    lifetime: u64,
) -> ClientConfig {
    let key = NodeKey::generate().unwrap();
    let csr = metta_trust::make_csr(&key, subject, ca.cluster()).unwrap();
    let cert = ca
        .issue(&csr, subject, issued_at, lifetime, rand::random())
        .unwrap();
    ClientConfig {
        subject: subject.to_string(),
        cert_pem: cert.pem,
        key_pem: key.to_pem(),
        ..base.clone()
    }
}

fn cluster_ca(c: &Cluster) -> ClusterCa {
    let d = &c.nodes[0].data;
    ClusterCa::load(
        &std::fs::read_to_string(d.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(d.join("ca.key")).unwrap(),
    )
    .unwrap()
}

async fn still_serving(c: &Cluster) {
    let admin = Client::new(&admin_cfg(c)).unwrap();
    let r = admin
        .call(ApiRequest::Nodes)
        .await
        .expect("node still serves");
    assert!(matches!(r, Reply::Nodes(n) if n.len() == 1));
}

fn handshake_refused(r: &Result<Reply, CallError>) -> bool {
    matches!(r, Err(CallError::Transport(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_expired_and_future_certificates_are_refused() {
    let c = tokio::task::block_in_place(|| Cluster::init("24h"));
    let base = admin_cfg(&c);
    let now = metta_control::clock::now();
    let admin = Subject::User("admin".into());

    // A CA of another cluster with the same name signs an "admin" certificate.
    let foreign = ClusterCa::create("test", now, 3600).unwrap();
    let cfg = forged_config(&base, &foreign, &admin, now, 3600);
    let r = Client::new(&cfg).unwrap().call(ApiRequest::Nodes).await;
    assert!(handshake_refused(&r), "foreign CA: {r:?}");

    // The real CA, but expired (issued two days ago for one day).
    let ca = cluster_ca(&c);
    let cfg = forged_config(&base, &ca, &admin, now - 2 * 86400, 86400);
    let r = Client::new(&cfg).unwrap().call(ApiRequest::Nodes).await;
    assert!(handshake_refused(&r), "expired: {r:?}");

    // The real CA, not valid until tomorrow.
    let cfg = forged_config(&base, &ca, &admin, now + 86400, 86400);
    let r = Client::new(&cfg).unwrap().call(ApiRequest::Nodes).await;
    assert!(handshake_refused(&r), "not yet valid: {r:?}");

    still_serving(&c).await;
}

/// Opens an mTLS QUIC connection as the admin and sends raw bytes on a stream.
async fn raw_exchange(c: &Cluster, bytes: &[u8]) -> Vec<u8> {
    let cfg = admin_cfg(c);
    let key = NodeKey::from_pem(&cfg.key_pem).unwrap();
    let creds = Credentials::from_pem(&cfg.cert_pem, &cfg.ca_pem, &key).unwrap();
    let client = transport::client_config(
        Some(&creds),
        &ServerTrust::Cluster {
            ca_der: metta_trust::cert::pem_to_der(&cfg.ca_pem).unwrap(),
            revoked: Arc::new(RwLock::new(RevocationList::default())),
        },
    )
    .unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep
        .connect_with(
            client,
            c.nodes[0].addr.parse().unwrap(),
            transport::SERVER_NAME,
        )
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    let out = recv.read_to_end(1 << 20).await.unwrap();
    conn.close(0u32.into(), b"done");
    out
}

fn decode_response(bytes: &[u8]) -> Response {
    let mut d = metta_proto::FrameDecoder::default();
    d.push(bytes);
    d.next_message::<Response>()
        .unwrap()
        .expect("a whole response frame")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_unknown_frames_get_errors_and_the_node_keeps_serving() {
    let c = tokio::task::block_in_place(|| Cluster::init("24h"));
    // unknown message type (Request variant 99)
    let r = decode_response(&raw_exchange(&c, &[0, 0, 0, 2, 99, 0]).await);
    assert!(
        matches!(&r, Err(ApiError::InvalidArgument(m)) if m.contains("bad frame")),
        "{r:?}"
    );
    // a frame announcing 4 GiB
    let r = decode_response(&raw_exchange(&c, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await);
    assert!(
        matches!(&r, Err(ApiError::InvalidArgument(m)) if m.contains("exceeds")),
        "{r:?}"
    );
    // a truncated frame
    let r = decode_response(&raw_exchange(&c, &[0, 0, 0, 9, 1]).await);
    assert!(matches!(&r, Err(ApiError::InvalidArgument(_))), "{r:?}");
    // garbage inside a well-sized frame
    let r = decode_response(&raw_exchange(&c, &[0, 0, 0, 3, 1, 0xff, 0xff]).await);
    assert!(matches!(&r, Err(ApiError::InvalidArgument(_))), "{r:?}");
    // a valid frame on a fresh stream still works
    let ok = frame::encode(&Request::Api(ApiRequest::Status)).unwrap();
    let r = decode_response(&raw_exchange(&c, &ok).await);
    assert!(matches!(r, Ok(Reply::Status(_))), "{r:?}");
    still_serving(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_without_a_certificate_is_unauthenticated() {
    let c = tokio::task::block_in_place(|| Cluster::init("24h"));
    let ca_der = metta_trust::cert::pem_to_der(&admin_cfg(&c).ca_pem).unwrap();
    let pin = metta_trust::CaPin::of_der(&ca_der);
    let cfg = transport::client_config(None, &ServerTrust::Pinned(pin)).unwrap();
    let t = transport::Transport::client(cfg).unwrap();
    let r = t
        .call_api(&c.nodes[0].addr, &Request::Api(ApiRequest::TokenList))
        .await;
    assert!(
        matches!(r, Err(CallError::Api(ApiError::Unauthenticated))),
        "{r:?}"
    );
    still_serving(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_expired_grants_are_rejected_and_stored_nothing() {
    let c = tokio::task::block_in_place(|| {
        let c = Cluster::init("24h");
        let bob = c.dir.path().join("bob.conf");
        c.ok(&["user", "add", "bob", "--out", bob.to_str().unwrap()]);
        c.ok(&["grant", "bob", "read", "--on", "/kv"]);
        c
    });
    let admin = Client::new(&admin_cfg(&c)).unwrap();
    let grants_before = match admin.call(ApiRequest::Grants { subject: None }).await {
        Ok(Reply::Grants(g)) => g,
        other => panic!("{other:?}"),
    };
    let now = metta_control::clock::now();
    let grant = Grant {
        issuer: Subject::User("admin".into()),
        subject: Subject::User("bob".into()),
        rights: Rights::ALL,
        resource: "/".into(),
        expires_at: None,
        delegable: true,
        parent: None,
        issued_at: now,
    };
    // Signed by a key that is not the admin's.
    let stranger = NodeKey::generate().unwrap();
    let forged = metta_trust::grants::sign_grant(grant.clone(), &stranger);
    let r = admin.call(ApiRequest::Grant(forged)).await;
    assert!(
        matches!(&r, Err(CallError::Api(ApiError::GrantRejected(_)))),
        "{r:?}"
    );
    // Properly signed, but a tampered body.
    let admin_key = NodeKey::from_pem(&admin_cfg(&c).key_pem).unwrap();
    let mut tampered = metta_trust::grants::sign_grant(grant.clone(), &admin_key);
    tampered.grant.rights = Rights::of(metta_proto::Right::Run);
    tampered.grant.resource = "/nodes".into();
    let r = admin.call(ApiRequest::Grant(tampered)).await;
    assert!(
        matches!(&r, Err(CallError::Api(ApiError::GrantRejected(_)))),
        "{r:?}"
    );
    // Expired.
    let expired = metta_trust::grants::sign_grant(
        Grant {
            expires_at: Some(now - 10),
            issued_at: now - 20,
            ..grant.clone()
        },
        &admin_key,
    );
    let r = admin.call(ApiRequest::Grant(expired)).await;
    assert!(
        matches!(&r, Err(CallError::Api(ApiError::GrantRejected(ref m))) if m.contains("expired")),
        "{r:?}"
    );
    // Issued in someone else's name.
    let bob_cfg = ClientConfig::load(&c.dir.path().join("bob.conf")).unwrap();
    let bob = Client::new(&bob_cfg).unwrap();
    let in_admins_name = metta_trust::grants::sign_grant(grant, bob.key());
    let r = bob.call(ApiRequest::Grant(in_admins_name)).await;
    assert!(
        matches!(&r, Err(CallError::Api(ApiError::GrantRejected(_)))),
        "{r:?}"
    );
    let grants_after = match admin.call(ApiRequest::Grants { subject: None }).await {
        Ok(Reply::Grants(g)) => g,
        other => panic!("{other:?}"),
    };
    assert_eq!(grants_before, grants_after);
}

#[test]
fn a_missing_client_config_says_so_once() {
    let o = ctl(std::path::Path::new("/nonexistent/metta.conf"), &["nodes"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("reading client config /nonexistent/metta.conf"),
        "{e}"
    );
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
}
