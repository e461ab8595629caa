//! Native nodes over TLS 1.3 on TCP, against real `mettad` processes.
//!
//! A simulated native node (this test process) joins with a token over TCP,
//! heartbeats with the certificate it got, and must show in `mettactl nodes`
//! as kind `native` with the resources it reported and no Raft role; it
//! reconnects after a control-plane restart, and revocation cuts it off.

mod common;

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use metta_control::node::HEARTBEAT_EVERY;
use metta_control::tcp::{Backoff, TcpClient};
use metta_control::transport::{self, CallError, Credentials, ServerTrust, TransportError};
use metta_proto::{
    frame, ApiError, ApiRequest, Heartbeat, JoinRequest, NodeId, NodeKind, NodeResources, Reply,
    Request, Response, Subject, TokenRejection,
};
use metta_trust::{CaPin, JoinToken, NodeKey};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// What the simulated native node reports in its heartbeats.
fn reported() -> NodeResources {
    NodeResources {
        cpus: 7,
        memory_bytes: 3 * 1024 * 1024 * 1024 + 12_345 * 4096,
        arch: "x86_64".into(),
    }
}

/// A simulated native node after joining.
struct Native {
    id: NodeId,
    addr: String,
    creds: Credentials,
    ca_der: Vec<u8>,
    cert_not_after: u64,
}

impl Native {
    fn client(&self, server: &str) -> TcpClient {
        TcpClient::member(server, &self.creds, &self.ca_der).expect("client config")
    }

    fn heartbeat(&self) -> Request {
        Request::Api(ApiRequest::Heartbeat(Heartbeat {
            resources: reported(),
            cert_not_after: self.cert_not_after,
            addr: self.addr.clone(),
        }))
    }
}

fn join_request(token: &JoinToken, name: &str, addr: &str, key: &NodeKey) -> Request {
    Request::Join(JoinRequest {
        token: token.credential(),
        // The subject is a placeholder: the cluster assigns the id.
        csr_pem: metta_trust::make_csr(key, &Subject::Node(0), "join").unwrap(),
        name: name.into(),
        addr: addr.into(),
        kind: NodeKind::Native,
        // At join a native node knows little; its heartbeats tell the truth.
        resources: NodeResources {
            cpus: 1,
            memory_bytes: 1 << 20,
            arch: "x86_64".into(),
        },
    })
}

/// Joins over TLS/TCP with `token` (pinned CA, no certificate).
async fn join_native(
    server: &str,
    token: &str,
    name: &str,
    addr: &str,
) -> Result<Native, CallError> {
    let token = JoinToken::from_str(token).expect("token text");
    let key = NodeKey::generate().unwrap();
    let mut c = TcpClient::pinned(server, token.pin).unwrap();
    let reply = c.call_api(&join_request(&token, name, addr, &key)).await?;
    let Reply::Joined(j) = reply else {
        panic!("unexpected reply {reply:?}");
    };
    let ca_der = metta_trust::cert::pem_to_der(&j.ca_cert_pem).unwrap();
    assert_eq!(CaPin::of_der(&ca_der), token.pin, "the CA matches the pin");
    assert!(j.ca_key_pem.is_none(), "a worker gets no CA key");
    let info =
        metta_trust::parse_cert(&metta_trust::cert::pem_to_der(&j.cert_pem).unwrap()).unwrap();
    assert_eq!(info.subject, Subject::Node(j.node_id));
    Ok(Native {
        id: j.node_id,
        addr: addr.into(),
        creds: Credentials::from_pem(&j.cert_pem, &j.ca_cert_pem, &key).unwrap(),
        ca_der,
        cert_not_after: info.not_after,
    })
}

/// What the simulated node's heartbeat loop has seen.
#[derive(Default)]
struct BeatStats {
    ok: AtomicU64,
    failed: AtomicU64,
    connects: AtomicU64,
    refused: AtomicBool,
    last_error: Mutex<Option<String>>,
}

/// The native node's heartbeat duty: one heartbeat per [`HEARTBEAT_EVERY`]
/// on one TLS/TCP connection; on failure, reconnect after a backoff delay.
struct Beats {
    stats: Arc<BeatStats>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Beats {
    fn start(mut client: TcpClient, hb: Request) -> Beats {
        let stats = Arc::new(BeatStats::default());
        let (stop, mut stopped) = watch::channel(false);
        let s = stats.clone();
        let task = tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
            let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => return,
                }
                let r = client.call_api(&hb).await;
                s.connects.store(client.connects(), Ordering::SeqCst);
                match r {
                    Ok(_) => {
                        s.ok.fetch_add(1, Ordering::SeqCst);
                        backoff.reset();
                    }
                    Err(e) => {
                        if matches!(e, CallError::Transport(TransportError::Refused { .. })) {
                            s.refused.store(true, Ordering::SeqCst);
                        }
                        *s.last_error.lock().unwrap() = Some(e.to_string());
                        s.failed.fetch_add(1, Ordering::SeqCst);
                        tokio::select! {
                            _ = tokio::time::sleep(backoff.next_delay(rand::random())) => {}
                            _ = stopped.changed() => return,
                        }
                    }
                }
            }
        });
        Beats { stats, stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

fn node_json(nodes: &[Value], id: NodeId) -> Option<Value> {
    nodes.iter().find(|n| n["id"] == id).cloned()
}

/// Waits until `mettactl nodes` shows the native node up with what it reported.
fn wait_native_up(c: &Cluster, id: NodeId) -> Value {
    let want = reported();
    wait_for(Duration::from_secs(20), "native node up", || {
        let n = node_json(&c.nodes_json()?, id)?;
        (n["status"] == "up"
            && n["cpus"] == want.cpus
            && n["memory_bytes"] == want.memory_bytes
            && n["arch"] == want.arch.as_str())
        .then_some(n)
    })
}

/// Blocking harness calls from an async test.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A raw TLS connection (no framing help) to `server`.
async fn raw_tls(
    server: &str,
    creds: Option<&Credentials>,
    trust: ServerTrust,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let cfg = transport::tls_client_config(creds, &trust).unwrap();
    let tcp = tokio::net::TcpStream::connect(server).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::try_from(transport::SERVER_NAME).unwrap(),
            tcp,
        )
        .await
        .expect("TLS handshake")
}

/// Reads one response frame and then expects the server to close.
async fn read_error_then_close<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> ApiError {
    let read = async {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return all,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    };
    let all = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the server closes the connection");
    let len = frame::parse_header(all[..4].try_into().unwrap(), frame::MAX_FRAME_LEN).unwrap();
    assert_eq!(all.len(), 4 + len, "one response frame, then the close");
    match frame::decode::<Response>(&all[4..]).unwrap() {
        Err(e) => e,
        Ok(r) => panic!("expected an error answer, got {r:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_node_joins_over_tcp_heartbeats_and_is_listed_as_native_without_raft_role() {
    let c = blocking(|| Cluster::init("24h"));
    let server = c.nodes[0].addr.clone();
    let token = blocking(|| c.token("worker", 1));
    let native_addr = format!("{}:4242", c.ip);

    // (b) The wrong CA pin: our client refuses the server, and says why.
    let good = JoinToken::from_str(&token).unwrap();
    let mut wrong_pin = good.clone();
    wrong_pin.pin = CaPin([0x5a; 32]);
    let e = join_native(&server, &wrong_pin.to_string(), "nat", &native_addr)
        .await
        .err()
        .expect("a wrong pin must fail");
    match &e {
        CallError::Transport(TransportError::Refused { msg, .. }) => {
            assert!(msg.contains("pin"), "{msg}")
        }
        other => panic!("expected a pin refusal, got {other:?}"),
    }

    // (c) A bad secret: the server answers with a token rejection.
    let mut wrong_secret = good.clone();
    wrong_secret.secret[0] ^= 1;
    match join_native(&server, &wrong_secret.to_string(), "nat", &native_addr).await {
        Err(CallError::Api(ApiError::Token(TokenRejection::Unknown))) => {}
        other => panic!("expected an unknown-token rejection, got {:?}", other.err()),
    }

    // A control token would make the native node a CA holder: refused, and
    // the token is not consumed.
    let control = blocking(|| c.token("control", 1));
    match join_native(&server, &control, "nat", &native_addr).await {
        Err(CallError::Api(ApiError::InvalidArgument(m))) => {
            assert!(m.contains("worker token"), "{m}")
        }
        other => panic!("expected a refusal, got {:?}", other.err()),
    }

    // (a) The real join, then heartbeats with the issued certificate.
    let started = Instant::now();
    let native = join_native(&server, &token, "nat", &native_addr)
        .await
        .expect("native join over TCP");
    eprintln!("TCP join took {:?}", started.elapsed());
    // The token had one use.
    let key = NodeKey::generate().unwrap();
    let mut again = TcpClient::pinned(&server, good.pin).unwrap();
    match again
        .call_api(&join_request(&good, "nat2", &native_addr, &key))
        .await
    {
        Err(CallError::Api(ApiError::Token(TokenRejection::Used))) => {}
        other => panic!("expected a used-token rejection, got {other:?}"),
    }

    let beats = Beats::start(native.client(&server), native.heartbeat());
    let n = blocking(|| wait_native_up(&c, native.id));
    assert_eq!(n["kind"], "native", "{n}");
    assert_eq!(n["name"], "nat");
    assert_eq!(n["role"], "worker");
    assert_eq!(n["raft"], "-", "a native node is not a Raft member: {n}");
    assert_eq!(n["cert_not_after"], native.cert_not_after);
    // Everything rode on one connection.
    assert_eq!(beats.stats.connects.load(Ordering::SeqCst), 1);
    // Several reconcile rounds later it is still not a learner.
    let ok_before = beats.stats.ok.load(Ordering::SeqCst);
    blocking(|| {
        wait_for(Duration::from_secs(10), "two more heartbeats", || {
            (beats.stats.ok.load(Ordering::SeqCst) >= ok_before + 2).then_some(())
        })
    });
    let nodes = blocking(|| c.nodes_json()).unwrap();
    assert_eq!(node_json(&nodes, native.id).unwrap()["raft"], "-");
    assert_eq!(nodes.iter().filter(|n| n["raft"] == "leader").count(), 1);
    assert!(
        !c.nodes[0]
            .log()
            .contains(&format!("adding as learner node={}", native.id)),
        "the leader must not add a native node to Raft"
    );

    // (d) Garbage on the socket: plain bytes instead of TLS are closed ...
    let mut plain = tokio::net::TcpStream::connect(&server).await.unwrap();
    plain.write_all(&[0xde; 64]).await.unwrap();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "a non-TLS peer is disconnected");
    // ... an oversized length prefix from an anonymous peer gets an error ...
    let mut anon = raw_tls(&server, None, ServerTrust::Pinned(good.pin)).await;
    anon.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    anon.flush().await.unwrap();
    match read_error_then_close(&mut anon).await {
        ApiError::InvalidArgument(m) => assert!(m.contains("bad frame"), "{m}"),
        other => panic!("{other:?}"),
    }
    // ... and so does a member sending a frame that is not a request.
    let mut member = raw_tls(&server, Some(&native.creds), ServerTrust::Pinned(good.pin)).await;
    member
        .write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    member.flush().await.unwrap();
    match read_error_then_close(&mut member).await {
        ApiError::InvalidArgument(m) => assert!(m.contains("bad frame"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The node keeps serving: the heartbeat connection and new calls work.
    let ok_before = beats.stats.ok.load(Ordering::SeqCst);
    blocking(|| {
        wait_for(Duration::from_secs(10), "heartbeats after garbage", || {
            (beats.stats.ok.load(Ordering::SeqCst) > ok_before).then_some(())
        })
    });
    let mut fresh = native.client(&server);
    match fresh.call_api(&Request::Api(ApiRequest::Status)).await {
        Ok(Reply::Status(s)) => assert_eq!(s.you, Subject::Node(native.id)),
        other => panic!("status over TCP: {other:?}"),
    }
    // Raft traffic is not accepted over TCP.
    match fresh
        .call_api(&Request::Raft(metta_proto::RaftRpc::Vote(vec![])))
        .await
    {
        Err(CallError::Api(ApiError::PermissionDenied { .. })) => {}
        other => panic!("raft over TCP must be refused: {other:?}"),
    }
    // Nor may a native node speak for someone else.
    match fresh
        .call_api(&Request::Forwarded {
            origin: Subject::User("admin".into()),
            call: ApiRequest::TokenList,
        })
        .await
    {
        Err(CallError::Api(ApiError::PermissionDenied { .. })) => {}
        other => panic!("a forwarded call over TCP must be refused: {other:?}"),
    }
    assert_eq!(beats.stats.failed.load(Ordering::SeqCst), 0);
    beats.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_node_reconnects_after_the_control_plane_restarts() {
    let mut c = blocking(|| Cluster::init("24h"));
    let server = c.nodes[0].addr.clone();
    let token = blocking(|| c.token("worker", 1));
    let native = join_native(&server, &token, "nat", &format!("{}:4242", c.ip))
        .await
        .expect("join");
    let beats = Beats::start(native.client(&server), native.heartbeat());
    blocking(|| wait_native_up(&c, native.id));
    assert_eq!(beats.stats.connects.load(Ordering::SeqCst), 1);

    blocking(|| c.nodes[0].kill());
    blocking(|| {
        wait_for(Duration::from_secs(10), "heartbeats failing", || {
            (beats.stats.failed.load(Ordering::SeqCst) >= 2).then_some(())
        })
    });
    assert!(!beats.stats.refused.load(Ordering::SeqCst));
    c.nodes[0].start();
    let n = blocking(|| {
        c.wait_nodes_up(2);
        wait_native_up(&c, native.id)
    });
    assert_eq!(n["kind"], "native");
    assert_eq!(n["raft"], "-");
    let connects = beats.stats.connects.load(Ordering::SeqCst);
    assert!(connects >= 2, "reconnected ({connects} connects)");
    assert!(!beats.stats.refused.load(Ordering::SeqCst));
    beats.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_native_node_cuts_its_tcp_connections_and_refuses_new_ones() {
    let c = blocking(|| {
        let mut c = Cluster::init("24h");
        let t = c.token("control", 1);
        c.join(&t, "n2");
        c.wait_voters(2);
        c
    });
    let leader = c.nodes[0].addr.clone();
    let follower = c.nodes[1].addr.clone();
    let token = blocking(|| c.token("worker", 1));
    // Join and heartbeat through the follower: it relays both to the leader.
    let native = join_native(&follower, &token, "nat", &format!("{}:4242", c.ip))
        .await
        .expect("join via the follower");
    let beats = Beats::start(native.client(&follower), native.heartbeat());
    blocking(|| wait_native_up(&c, native.id));
    // A second live connection, to the leader, idle after one call.
    let mut idle = native.client(&leader);
    idle.call_api(&Request::Api(ApiRequest::Status))
        .await
        .expect("status");

    let revoked_at = Instant::now();
    blocking(|| c.ok(&["revoke", &format!("node/{}", native.id)]));
    // The idle connection to the leader is cut ...
    tokio::time::timeout(Duration::from_secs(5), idle.closed())
        .await
        .expect("the leader cuts the revoked node's connection")
        .expect("a clean close");
    // ... the heartbeat connection to the follower too, and its reconnect is refused.
    blocking(|| {
        wait_for(Duration::from_secs(5), "heartbeats refused", || {
            beats.stats.refused.load(Ordering::SeqCst).then_some(())
        })
    });
    eprintln!(
        "revocation cut and refused within {:?}: {:?}",
        revoked_at.elapsed(),
        beats.stats.last_error.lock().unwrap()
    );
    for server in [&leader, &follower] {
        let mut fresh = native.client(server);
        match fresh.call(&native.heartbeat()).await {
            Err(TransportError::Refused { msg, .. }) => {
                assert!(msg.contains("CertificateRevoked"), "{msg}")
            }
            other => panic!("a new handshake at {server} must be refused: {other:?}"),
        }
    }
    beats.stop().await;
    // The cluster itself is fine.
    blocking(|| c.ok(&["status"]));
}

/// `cargo test --test native_tcp -- --ignored --nocapture tcp_join_latency`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn tcp_join_latency() {
    let c = blocking(|| Cluster::init("24h"));
    let server = c.nodes[0].addr.clone();
    let token = blocking(|| c.token("worker", 10));
    let mut times = Vec::new();
    for i in 0..10 {
        let t = Instant::now();
        join_native(
            &server,
            &token,
            &format!("nat{i}"),
            &format!("{}:{}", c.ip, 4000 + i),
        )
        .await
        .expect("join");
        times.push(t.elapsed());
    }
    times.sort();
    eprintln!(
        "TCP join over 10: min {:?} median {:?} max {:?}",
        times[0], times[5], times[9]
    );
}
