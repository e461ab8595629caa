//! Bounds on peers that have proved nothing (`metta_control::limits`),
//! against a real `mettad`: anonymous frames, streams, connections per
//! source and in all, their lifetime and idle time, handshakes in progress,
//! the memory they can make a node hold — and members served throughout.
//! Join attempts are rate-limited per token id and per source, and refused
//! joins are logged with their source.
//!
//! The floods come from several loopback source addresses the test binds
//! (127.x.y.2, .3, ...); members connect from others.

mod common;

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use metta_control::config::ClientConfig;
use metta_control::limits::{
    ANONYMOUS_LIFETIME, ANONYMOUS_MAX, ANONYMOUS_PER_SOURCE, ANONYMOUS_STREAMS, JOIN_TOKEN_BURST,
    PENDING_PER_SOURCE,
};
use metta_control::tcp::{TcpClient, ANONYMOUS_IDLE_TIMEOUT, HANDSHAKE_TIMEOUT};
use metta_control::transport::{self, CallError, Credentials, ServerTrust, CLOSE_BUSY};
use metta_proto::{
    frame, ApiError, ApiRequest, JoinRequest, NodeKind, NodeResources, Reply, Request, Response,
    Subject, TokenRejection,
};
use metta_trust::{CaPin, JoinToken, NodeKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ca_der(c: &Cluster) -> Vec<u8> {
    metta_trust::cert::pem_to_der(&ClientConfig::load(&c.admin).unwrap().ca_pem).unwrap()
}

fn anonymous_quic(c: &Cluster) -> quinn::ClientConfig {
    transport::client_config(None, &ServerTrust::Pinned(CaPin::of_der(&ca_der(c)))).unwrap()
}

fn anonymous_tls(c: &Cluster) -> Arc<rustls::ClientConfig> {
    Arc::new(
        transport::tls_client_config(None, &ServerTrust::Pinned(CaPin::of_der(&ca_der(c))))
            .unwrap(),
    )
}

/// The `n`-th flood source: another loopback address of the cluster's /24.
fn source(c: &Cluster, n: u8) -> std::net::IpAddr {
    let mut o: Vec<u8> = c.ip.split('.').map(|p| p.parse().unwrap()).collect();
    o[3] = 10 + n;
    std::net::IpAddr::from([o[0], o[1], o[2], o[3]])
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn admin_nodes_ok(c: &Cluster) {
    let o = c.ctl(&["nodes"]);
    assert!(
        o.status.success(),
        "a member was not served: {}",
        stderr(&o)
    );
}

/// A QUIC connection from `ep` to `server`, handshake done.
async fn dial(
    ep: &quinn::Endpoint,
    cfg: &quinn::ClientConfig,
    server: SocketAddr,
) -> quinn::Connection {
    ep.connect_with(cfg.clone(), server, transport::SERVER_NAME)
        .unwrap()
        .await
        .unwrap()
}

/// Whether the server closed `conn` as over budget.
async fn closed_busy(conn: &quinn::Connection, within: Duration) -> bool {
    match tokio::time::timeout(within, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(a)) => a.error_code == CLOSE_BUSY.into(),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_quic_peers_are_bounded_and_members_are_served() {
    let c = tokio::task::block_in_place(|| Cluster::init("1h"));
    let server: SocketAddr = c.nodes[0].addr.parse().unwrap();
    let pid = c.nodes[0].child.as_ref().unwrap().id();
    let cfg = anonymous_quic(&c);
    let rss_before = rss_kib(pid);

    // A frame larger than an anonymous peer may send is refused at its
    // header, before anything is buffered.
    let ep = quinn::Endpoint::client(SocketAddr::new(source(&c, 0), 0)).unwrap();
    let conn = dial(&ep, &cfg, server).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
    send.write_all(&[0; 1000]).await.unwrap();
    let out = recv.read_to_end(1 << 16).await.unwrap();
    let mut d = metta_proto::FrameDecoder::default();
    d.push(&out);
    let r: Response = d.next_message().unwrap().unwrap();
    assert!(
        matches!(&r, Err(ApiError::InvalidArgument(m)) if m.contains("exceeds")),
        "{r:?}"
    );
    conn.close(0u32.into(), b"done");
    // Streams: ANONYMOUS_STREAMS at once, each holding a partial frame;
    // the next cannot be opened.
    let conn = dial(&ep, &cfg, server).await;
    let mut open = Vec::new();
    for _ in 0..ANONYMOUS_STREAMS {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&(60u32 * 1024).to_be_bytes()).await.unwrap();
        send.write_all(&[1; 1024]).await.unwrap();
        open.push((send, recv));
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(1), conn.open_bi())
            .await
            .is_err(),
        "stream {} of an anonymous connection was opened",
        ANONYMOUS_STREAMS + 1
    );
    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;

    // Anonymous connections: ANONYMOUS_PER_SOURCE from each of enough
    // sources to fill ANONYMOUS_MAX, each with every stream it may open
    // holding a partial frame of almost the anonymous maximum.
    let sources = (ANONYMOUS_MAX / ANONYMOUS_PER_SOURCE) as u8;
    let mut held = Vec::new();
    let mut endpoints = Vec::new();
    let partial = vec![7u8; 60 * 1024];
    for s in 1..=sources {
        let ep = quinn::Endpoint::client(SocketAddr::new(source(&c, s), 0)).unwrap();
        for _ in 0..ANONYMOUS_PER_SOURCE {
            let conn = dial(&ep, &cfg, server).await;
            // One whole exchange on its first stream, so the server has
            // taken the connection's place before the next one arrives;
            // the other streams hold partial frames.
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            let status = frame::encode(&Request::Api(ApiRequest::Status)).unwrap();
            send.write_all(&status).await.unwrap();
            send.finish().unwrap();
            recv.read_to_end(1 << 16).await.unwrap();
            let mut streams = Vec::new();
            for _ in 1..ANONYMOUS_STREAMS {
                let (mut send, recv) = conn.open_bi().await.unwrap();
                send.write_all(&(64u32 * 1024 - 8).to_be_bytes())
                    .await
                    .unwrap();
                send.write_all(&partial).await.unwrap();
                streams.push((send, recv));
            }
            held.push((conn, streams));
        }
        // The source's next connection is closed at once.
        let extra = dial(&ep, &cfg, server).await;
        assert!(
            closed_busy(&extra, Duration::from_secs(5)).await,
            "source {s}: connection {} was not refused",
            ANONYMOUS_PER_SOURCE + 1
        );
        endpoints.push(ep);
    }
    // Every anonymous place is taken: a fresh source is refused too.
    let ep = quinn::Endpoint::client(SocketAddr::new(source(&c, sources + 1), 0)).unwrap();
    let extra = dial(&ep, &cfg, server).await;
    assert!(
        closed_busy(&extra, Duration::from_secs(5)).await,
        "anonymous connection {} was not refused",
        ANONYMOUS_MAX + 1
    );
    let (conn0, _) = &held[0];
    // Members are served while anonymous peers hold everything.
    tokio::task::block_in_place(|| admin_nodes_ok(&c));
    let rss_full = rss_kib(pid);
    let grown = rss_full.saturating_sub(rss_before);
    eprintln!("mettad RSS {rss_before} KiB before, {rss_full} KiB with the flood held");
    assert!(
        grown < 96 * 1024,
        "anonymous peers made the node hold {grown} KiB more"
    );

    // Their lifetime ends: the server closes them.
    let started = Instant::now();
    assert!(
        closed_busy(conn0, ANONYMOUS_LIFETIME + Duration::from_secs(10)).await,
        "a held anonymous connection outlived its lifetime"
    );
    assert!(started.elapsed() < ANONYMOUS_LIFETIME + Duration::from_secs(10));
    for (conn, _) in &held {
        assert!(closed_busy(conn, Duration::from_secs(5)).await);
    }
    // Their places are given back: a new anonymous peer may join again.
    let t = tokio::task::block_in_place(|| c.token("worker", 1));
    let token = JoinToken::from_str(&t).unwrap();
    let anon = transport::Transport::client(cfg).unwrap();
    let r = anon
        .call(
            &c.nodes[0].addr,
            &join_request(&token, "late", &format!("{}:9", c.ip)),
        )
        .await
        .unwrap();
    assert!(matches!(r, Ok(Reply::Joined(_))), "{r:?}");
    tokio::task::block_in_place(|| admin_nodes_ok(&c));
}

fn join_request(token: &JoinToken, name: &str, addr: &str) -> Request {
    let key = NodeKey::generate().unwrap();
    Request::Join(JoinRequest {
        token: token.credential(),
        csr_pem: metta_trust::make_csr(&key, &Subject::Node(0), "join").unwrap(),
        name: name.into(),
        addr: addr.into(),
        kind: NodeKind::Native,
        resources: NodeResources {
            cpus: 1,
            memory_bytes: 1 << 20,
            arch: "x86_64".into(),
        },
    })
}

/// A TLS/TCP connection from `from`, anonymous, handshake done.
async fn anonymous_tcp(
    c: &Cluster,
    from: std::net::IpAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from, 0)).unwrap();
    let tcp = sock
        .connect(c.nodes[0].addr.parse().unwrap())
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(anonymous_tls(c))
        .connect(
            rustls_pki_types::ServerName::try_from(transport::SERVER_NAME).unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

/// [`anonymous_tcp`] after one whole exchange, so the server has taken
/// its place.
async fn anonymous_tcp_served(
    c: &Cluster,
    from: std::net::IpAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut t = anonymous_tcp(c, from).await;
    let status = frame::encode(&Request::Api(ApiRequest::Status)).unwrap();
    t.write_all(&status).await.unwrap();
    let mut d = metta_proto::FrameDecoder::default();
    let mut buf = [0u8; 4096];
    loop {
        let n = t.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before answering");
        d.push(&buf[..n]);
        if let Some(r) = d.next_message::<Response>().unwrap() {
            assert!(matches!(r, Err(ApiError::Unauthenticated)), "{r:?}");
            return t;
        }
    }
}

/// Whether the server ends the stream (EOF or reset) within `within`.
async fn ends<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_tcp_peers_are_bounded_and_a_native_node_still_connects() {
    let c = tokio::task::block_in_place(|| Cluster::init("1h"));
    let token = JoinToken::from_str(&tokio::task::block_in_place(|| c.token("worker", 1))).unwrap();
    // The native node joins before the flood.
    let key = NodeKey::generate().unwrap();
    let mut joiner = TcpClient::pinned(c.nodes[0].addr.clone(), token.pin).unwrap();
    let req = Request::Join(JoinRequest {
        token: token.credential(),
        csr_pem: metta_trust::make_csr(&key, &Subject::Node(0), "join").unwrap(),
        name: "kern".into(),
        addr: format!("{}:9", c.ip),
        kind: NodeKind::Native,
        resources: NodeResources::default(),
    });
    let Reply::Joined(j) = joiner.call_api(&req).await.unwrap() else {
        panic!("not joined")
    };
    let creds = Credentials::from_pem(&j.cert_pem, &j.ca_cert_pem, &key).unwrap();
    // Its anonymous connection would hold one of the places below.
    drop(joiner);

    // Anonymous peers hold every anonymous place: ANONYMOUS_PER_SOURCE
    // idle TLS connections from each of enough sources.
    let sources = (ANONYMOUS_MAX / ANONYMOUS_PER_SOURCE) as u8;
    let mut held = Vec::new();
    for s in 1..=sources {
        for _ in 0..ANONYMOUS_PER_SOURCE {
            held.push(anonymous_tcp_served(&c, source(&c, s)).await);
        }
        let mut extra = anonymous_tcp(&c, source(&c, s)).await;
        assert!(
            ends(&mut extra, Duration::from_secs(5)).await,
            "source {s}: anonymous TLS connection {} was kept",
            ANONYMOUS_PER_SOURCE + 1
        );
    }
    let mut extra = anonymous_tcp(&c, source(&c, sources + 1)).await;
    assert!(
        ends(&mut extra, Duration::from_secs(5)).await,
        "anonymous TLS connection {} was kept",
        ANONYMOUS_MAX + 1
    );
    // Connections that never start a handshake: PENDING_PER_SOURCE from
    // one source are kept until the handshake timeout, the next at once
    // closed.
    let raw_from = source(&c, sources + 2);
    let mut raw = Vec::new();
    for _ in 0..PENDING_PER_SOURCE {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(raw_from, 0)).unwrap();
        raw.push(
            sock.connect(c.nodes[0].addr.parse().unwrap())
                .await
                .unwrap(),
        );
    }
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(raw_from, 0)).unwrap();
    let mut over = sock
        .connect(c.nodes[0].addr.parse().unwrap())
        .await
        .unwrap();
    assert!(
        ends(&mut over, Duration::from_secs(2)).await,
        "handshake {} from one source was let wait",
        PENDING_PER_SOURCE + 1
    );

    // The native node connects and is served through all of it.
    let mut member = TcpClient::member(c.nodes[0].addr.clone(), &creds, &ca_der(&c)).unwrap();
    let r = member
        .call(&Request::Api(ApiRequest::Status))
        .await
        .unwrap();
    assert!(matches!(r, Ok(Reply::Status(_))), "{r:?}");
    tokio::task::block_in_place(|| admin_nodes_ok(&c));

    // Handshakes that do not happen end after the handshake timeout.
    let started = Instant::now();
    for r in &mut raw {
        assert!(ends(r, HANDSHAKE_TIMEOUT + Duration::from_secs(3)).await);
    }
    assert!(started.elapsed() < HANDSHAKE_TIMEOUT + Duration::from_secs(3));
    // Idle anonymous connections end after their idle limit; the member's
    // connection is still there.
    for h in &mut held {
        assert!(ends(h, ANONYMOUS_IDLE_TIMEOUT + Duration::from_secs(3)).await);
    }
    let r = member
        .call(&Request::Api(ApiRequest::Status))
        .await
        .unwrap();
    assert!(matches!(r, Ok(Reply::Status(_))), "{r:?}");
    assert_eq!(member.connects(), 1, "the member's connection was kept");
    // A frame larger than an anonymous peer may send is refused.
    let mut t = anonymous_tcp(&c, source(&c, 1)).await;
    t.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
    t.write_all(&[0; 100]).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut out)).await;
    let mut d = metta_proto::FrameDecoder::default();
    d.push(&out);
    let r: Response = d.next_message().unwrap().expect("an answer");
    assert!(
        matches!(&r, Err(ApiError::InvalidArgument(m)) if m.contains("exceeds")),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_attempts_are_rate_limited_per_token_and_source_and_logged() {
    let c = tokio::task::block_in_place(|| Cluster::init("1h"));
    // A multi-use token admits its machines at once: good joins do not
    // count against the token.
    let many = JoinToken::from_str(&tokio::task::block_in_place(|| c.token("worker", 8))).unwrap();
    let mut client = TcpClient::pinned(c.nodes[0].addr.clone(), many.pin).unwrap();
    for i in 0..8 {
        let r = client
            .call_api(&join_request(
                &many,
                &format!("m{i}"),
                &format!("{}:9", c.ip),
            ))
            .await;
        assert!(matches!(r, Ok(Reply::Joined(_))), "join {i}: {r:?}");
    }
    drop(client);
    let text = tokio::task::block_in_place(|| c.token("worker", 1));
    let good = JoinToken::from_str(&text).unwrap();
    // The right id, a wrong secret.
    let mut bad = good.clone();
    bad.secret = [0; 16];
    let mut client = TcpClient::pinned(c.nodes[0].addr.clone(), good.pin).unwrap();
    let (mut refused, mut limited) = (0, 0);
    for i in 0..20 {
        match client
            .call_api(&join_request(
                &bad,
                &format!("x{i}"),
                &format!("{}:9", c.ip),
            ))
            .await
        {
            Err(CallError::Api(ApiError::Token(TokenRejection::Unknown))) => refused += 1,
            Err(CallError::Api(ApiError::Unavailable(m))) if m.contains("too many join") => {
                limited += 1
            }
            other => panic!("attempt {i}: {other:?}"),
        }
    }
    assert_eq!(
        refused, JOIN_TOKEN_BURST as usize,
        "attempts before the limit"
    );
    assert_eq!(limited, 20 - JOIN_TOKEN_BURST as usize);
    // Refusals are logged with the source and the token id.
    let log = c.nodes[0].log();
    assert!(
        log.lines()
            .any(|l| l.contains("join refused") && l.contains("source=") && l.contains(&good.id)),
        "no refusal logged with its source and token id"
    );
    assert!(log.contains("join attempts rate-limited"));

    // Per source: new token ids each time, from one address.
    let (mut unknown, mut by_source) = (0, 0);
    for i in 0..40 {
        let mut t = bad.clone();
        t.id = format!("{:08x}", 0x1000_0000u32 + i);
        match client
            .call_api(&join_request(&t, &format!("y{i}"), &format!("{}:9", c.ip)))
            .await
        {
            Err(CallError::Api(ApiError::Token(_))) => unknown += 1,
            Err(CallError::Api(ApiError::Unavailable(m))) if m.contains("too many join") => {
                by_source += 1
            }
            other => panic!("attempt {i}: {other:?}"),
        }
    }
    assert!(
        by_source > 0 && unknown < 40,
        "{unknown} refused, {by_source} limited"
    );

    // The real token still gets its node in once the limit has passed.
    let joined = wait_until(Duration::from_secs(30), || async {
        let mut client = TcpClient::pinned(c.nodes[0].addr.clone(), good.pin).unwrap();
        match client
            .call_api(&join_request(&good, "real", &format!("{}:9", c.ip)))
            .await
        {
            Ok(Reply::Joined(j)) => Some(j),
            Err(CallError::Api(ApiError::Unavailable(m))) if m.contains("too many") => None,
            other => panic!("the real join: {other:?}"),
        }
    })
    .await;
    assert_eq!(joined.role, metta_proto::Role::Worker);
}

/// Polls `f` every 250 ms until it returns `Some`, or panics after `within`.
async fn wait_until<T, F, Fut>(within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A member (here a user without grants: any certificate will do) cannot
/// make a node hold more than its frame budget by announcing large frames
/// on many streams and connections; other members are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_frames_in_progress_are_bounded() {
    let c = tokio::task::block_in_place(|| Cluster::init("1h"));
    let bob = c.dir.path().join("bob.conf");
    tokio::task::block_in_place(|| c.ok(&["user", "add", "bob", "--out", bob.to_str().unwrap()]));
    let cfg = ClientConfig::load(&bob).unwrap();
    let key = NodeKey::from_pem(&cfg.key_pem).unwrap();
    let creds = Credentials::from_pem(&cfg.cert_pem, &cfg.ca_pem, &key).unwrap();
    let client = transport::client_config(
        Some(&creds),
        &ServerTrust::Cluster {
            ca_der: ca_der(&c),
            revoked: Default::default(),
        },
    )
    .unwrap();
    let pid = c.nodes[0].child.as_ref().unwrap().id();
    let server: SocketAddr = c.nodes[0].addr.parse().unwrap();
    let rss_before = rss_kib(pid);
    // 4 connections × 100 streams, each announcing a 16 MiB frame and
    // sending 2 MiB of it: 800 MiB if the node took all it was sent.
    let ep = quinn::Endpoint::client(SocketAddr::new(source(&c, 0), 0)).unwrap();
    let chunk = Arc::new(vec![3u8; 2 << 20]);
    let mut writers = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..4 {
        let conn = dial(&ep, &client, server).await;
        for _ in 0..100 {
            let (conn, chunk) = (conn.clone(), chunk.clone());
            writers.push(tokio::spawn(async move {
                let Ok((mut send, recv)) = conn.open_bi().await else {
                    return;
                };
                let _ = send
                    .write_all(&(metta_proto::MAX_FRAME_LEN as u32 - 8).to_be_bytes())
                    .await;
                let _ = send.write_all(&chunk).await;
                // Hold the stream open.
                std::future::pending::<()>().await;
                drop(recv);
            }));
        }
        conns.push(conn);
    }
    // Let it push for a while, then look.
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        peak = peak.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grown = peak.saturating_sub(rss_before);
    eprintln!(
        "mettad RSS {rss_before} KiB before, peak {peak} KiB under 800 MiB of announced frames"
    );
    // Budget 64 MiB of frames + 4 × 16 MiB windows, with room for the
    // allocator; taking what was sent would be 800 MiB.
    assert!(grown < 256 * 1024, "the node took {grown} KiB");
    // The admin is served meanwhile.
    tokio::task::block_in_place(|| admin_nodes_ok(&c));
    for w in writers {
        w.abort();
    }
    for conn in conns {
        conn.close(0u32.into(), b"done");
    }
}
