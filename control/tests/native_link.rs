//! The native node's link (`metta-link`: no_std rustls unbuffered with a
//! RustCrypto provider, the code the kernel runs) against a real `mettad`'s
//! TLS/TCP listener: join with a token, then heartbeats as a member.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::str::FromStr;
use std::time::{Duration, Instant};

use common::*;
use metta_link::{
    heartbeat_request, interpret_ack, interpret_join, join_request, JoinToken, LinkConfig,
    LinkError, NodeKey, Session,
};
use metta_proto::{NodeResources, Request, Response};

fn now() -> u64 {
    metta_control::clock::now()
}

fn entropy() -> [u8; 32] {
    rand::random()
}

/// One request over `session` on `tcp`, driven by hand as the kernel does.
fn call(session: &mut Session, tcp: &mut TcpStream, req: &Request) -> Result<Response, LinkError> {
    session.send_frame(req)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 16 * 1024];
    loop {
        let out = session.take_transmit();
        if !out.is_empty() {
            tcp.write_all(&out).expect("write");
        }
        if let Some(r) = session.poll_response()? {
            return Ok(r);
        }
        assert!(Instant::now() < deadline, "no answer within 10 s");
        match tcp.read(&mut buf) {
            Ok(0) => session.connection_closed()?,
            Ok(n) => session.receive(&buf[..n])?,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn connect(addr: &str) -> TcpStream {
    let tcp = TcpStream::connect(addr).expect("tcp connect");
    tcp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    tcp
}

#[test]
fn the_kernel_link_joins_a_real_mettad_over_tls_tcp() {
    let c = Cluster::init("1h");
    let server = c.nodes[0].addr.clone();
    let token_text = c.token("worker", 1);
    let token = JoinToken::from_str(&token_text).unwrap();
    metta_link::rng::add_entropy(&entropy());
    let key = NodeKey::from_entropy(&entropy()).unwrap();
    let resources = NodeResources {
        cpus: 1,
        memory_bytes: 256 << 20,
        arch: "x86_64".into(),
    };
    let addr = format!("{}:4243", c.ip);

    // A wrong pin: refused by the link before anything is sent.
    let mut wrong = token.clone();
    wrong.pin = metta_link::CaPin([7; 32]);
    let mut tcp = connect(&server);
    let mut s = Session::new(&LinkConfig::join(wrong.pin), now(), &entropy()).unwrap();
    let req = join_request(&wrong, &key, "kern", &addr, resources.clone()).unwrap();
    assert!(matches!(
        call(&mut s, &mut tcp, &req),
        Err(LinkError::PinMismatch)
    ));

    // The join.
    let t0 = Instant::now();
    let mut tcp = connect(&server);
    let mut s = Session::new(&LinkConfig::join(token.pin), now(), &entropy()).unwrap();
    let req = join_request(&token, &key, "kern", &addr, resources.clone()).unwrap();
    let resp = call(&mut s, &mut tcp, &req).expect("join answered");
    let joined = interpret_join(resp, &token, &key, now()).expect("joined");
    let join_ms = t0.elapsed().as_secs_f64() * 1e3;
    eprintln!("native link join: {join_ms:.1} ms");
    assert_eq!(joined.cluster, "test");

    // As a member: heartbeats with the new certificate.
    let mut tcp = connect(&server);
    let mut s = Session::new(&joined.link_config(key.clone()), now(), &entropy()).unwrap();
    let hb = heartbeat_request(resources.clone(), joined.cert_not_after, &addr);
    interpret_ack(call(&mut s, &mut tcp, &hb).expect("heartbeat answered")).expect("ack");
    let node = wait_for(Duration::from_secs(10), "the native node up", || {
        interpret_ack(call(&mut s, &mut tcp, &hb).ok()?).ok()?;
        let nodes = c.nodes_json()?;
        nodes
            .into_iter()
            .find(|n| n["name"] == "kern" && n["status"] == "up")
    });
    assert_eq!(node["kind"], "native");
    assert_eq!(node["id"], joined.node_id);
    assert_eq!(node["memory_bytes"], 256u64 << 20);
    assert_eq!(node["raft"], "-");

    // The token was single-use.
    let mut tcp = connect(&server);
    let mut s = Session::new(&LinkConfig::join(token.pin), now(), &entropy()).unwrap();
    let req = join_request(&token, &key, "kern2", &addr, resources).unwrap();
    let resp = call(&mut s, &mut tcp, &req).expect("answered");
    assert!(
        matches!(&resp, Err(metta_proto::ApiError::Token(_))),
        "{resp:?}"
    );
}
