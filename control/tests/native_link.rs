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

/// Joins as native node `name`; the member session's config and the node's
/// certificate expiry.
fn join_native(c: &Cluster, name: &str, resources: &NodeResources) -> (LinkConfig, u64) {
    let token = JoinToken::from_str(&c.token("worker", 1)).unwrap();
    metta_link::rng::add_entropy(&entropy());
    let key = NodeKey::from_entropy(&entropy()).unwrap();
    let mut tcp = connect(&c.nodes[0].addr);
    let mut s = Session::new(&LinkConfig::join(token.pin), now(), &entropy()).unwrap();
    let addr = format!("{}:0", c.ip);
    let req = join_request(&token, &key, name, &addr, resources.clone()).unwrap();
    let joined =
        interpret_join(call(&mut s, &mut tcp, &req).unwrap(), &token, &key, now()).expect("joined");
    (joined.link_config(key), joined.cert_not_after)
}

/// What the native side saw of its work.
#[derive(Default)]
struct Seen {
    started: Vec<(String, u64, usize)>,
    stopped: Vec<String>,
    calls: Vec<Vec<u8>>,
}

/// The control plane's side of a native node's link: `run` places a domain
/// on it and waits for the start it reports, `call` and `logs` go through
/// the proxy, `ps` asks it for figures, `stop` reaches it — all over the
/// kernel's own link code (`metta-link` on TLS/TCP) against a real
/// `mettad`. The native node syncs with a control node that is not the
/// leader, so the leader's calls for it travel as `Request::Proxy` to that
/// follower over QUIC (a worker refuses a native node's link). The native side
/// here answers as the kernel does (the QEMU tests in `tests/` run the real
/// kernel).
#[test]
fn a_native_node_gets_its_domains_calls_and_stops_through_sync() {
    let Some(counter) = built("counter") else {
        return;
    };
    let mut c = Cluster::init("1h");
    let t = c.token("control", 1);
    c.join(&t, "node-2");
    let t = c.token("worker", 1);
    c.join(&t, "node-3");
    c.wait_voters(2);
    c.wait_nodes_up(3);
    let key = trust_acme(&c);
    push_ok(
        &c,
        &key,
        &counter,
        "counter",
        &["log", "channel:/svc/counter"],
    );
    let resources = NodeResources {
        cpus: 1,
        memory_bytes: 256 << 20,
        arch: "x86_64".into(),
    };
    let (config, cert_not_after) = join_native(&c, "kern", &resources);
    let module = std::fs::read(&counter).unwrap();

    // A worker does not hold native nodes' links: the link refuses a server
    // whose certificate is not a control node's (and the worker would
    // refuse the sync).
    {
        let mut tcp = connect(&c.nodes[2].addr);
        let mut s = Session::new(&config, now(), &entropy()).unwrap();
        let sync = Request::Sync(metta_proto::NodeSync::default());
        match call(&mut s, &mut tcp, &sync) {
            Err(e) => assert!(e.to_string().contains("not a control node"), "{e}"),
            other => panic!("a worker answered a sync with {other:?}"),
        }
    }

    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = c.nodes[1].addr.clone();
    let native = {
        let (seen, stop) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut tcp = connect(&server);
            let mut s = Session::new(&config, now(), &entropy()).unwrap();
            let mut sync = metta_proto::NodeSync {
                heartbeat: metta_proto::Heartbeat {
                    resources,
                    cert_not_after,
                    addr: String::new(),
                },
                hold_ms: 300,
                ..Default::default()
            };
            let mut count = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let work = match call(&mut s, &mut tcp, &Request::Sync(sync.clone())) {
                    Ok(Ok(metta_proto::Reply::Work(w))) => w,
                    other => panic!("sync answered {other:?}"),
                };
                sync.logs.clear();
                sync.answers.clear();
                sync.stats = None;
                // Domains report Started one sync after they were started.
                for d in &mut sync.domains {
                    d.state = metta_proto::NativeState::Started { start_us: 42 };
                }
                let mut seen = seen.lock().unwrap();
                for name in &work.stop {
                    sync.domains.retain(|d| &d.name != name);
                    seen.stopped.push(name.clone());
                }
                for d in work.start {
                    assert_eq!(d.module, module, "the module as pushed");
                    assert_eq!(d.contract.slice_ns, 10_000_000);
                    seen.started.push((d.name.clone(), d.epoch, d.module.len()));
                    sync.logs.push((d.name.clone(), "counter: up".into()));
                    sync.domains.push(metta_proto::NativeDomain {
                        name: d.name,
                        epoch: d.epoch,
                        state: metta_proto::NativeState::Starting,
                    });
                }
                // Each numbered batch once; acknowledged in the next sync.
                let fresh = work.seq == 0 || work.seq > sync.work_seq;
                sync.work_seq = sync.work_seq.max(work.seq);
                for e in work.deliver.into_iter().filter(|_| fresh) {
                    assert_eq!(e.to, "c1");
                    seen.calls.push(e.payload.clone());
                    count += 1;
                    if let Some(r) = e.reply {
                        sync.answers.push((r, count.to_string().into_bytes()));
                    }
                }
                if work.stats {
                    sync.stats = Some(
                        sync.domains
                            .iter()
                            .map(|d| metta_proto::DomainRuntime {
                                name: d.name.clone(),
                                epoch: d.epoch,
                                state: "waiting".into(),
                                cpu_ns: 1_000,
                                delivered_ppm: None,
                                activations: count,
                                memory_bytes: 65_536,
                                start_us: Some(42),
                                periods: 0,
                                delivered_p5_ppm: None,
                                real_p5_ppm: None,
                                latency_p99_us: None,
                                undelivered: 0,
                            })
                            .collect(),
                    );
                }
            }
        })
    };

    let node = wait_for(Duration::from_secs(10), "the native node up", || {
        c.nodes_json()?
            .into_iter()
            .find(|n| n["name"] == "kern" && n["status"] == "up")
    });
    assert_eq!(node["kind"], "native");
    // Its address is the node holding its link.
    assert_eq!(node["addr"], c.nodes[1].addr.as_str());

    // `run` returns once the node reports the first activation.
    c.ok(&[
        "run",
        "counter",
        "--name",
        "c1",
        "--node",
        "kern",
        "--cpu",
        "10ms/100ms",
        "--memory",
        "16MiB",
    ]);
    assert_eq!(seen.lock().unwrap().started.len(), 1);
    assert_eq!(c.ok(&["call", "c1", "incr"]).trim(), "1");
    assert_eq!(c.ok(&["call", "c1", "incr"]).trim(), "2");
    assert_eq!(
        seen.lock().unwrap().calls,
        [b"incr".to_vec(), b"incr".to_vec()]
    );
    assert_eq!(c.ok(&["logs", "c1"]).trim(), "counter: up");
    let ps: serde_json::Value = serde_json::from_str(&c.ok(&["ps", "-o", "json"])).unwrap();
    let row = &ps[0];
    assert_eq!(row["name"], "c1");
    assert_eq!(row["node_name"], "kern");
    assert_eq!(row["state"], "waiting", "{row}");
    assert_eq!(row["memory_bytes"], 65_536, "{row}");

    c.ok(&["stop", "c1"]);
    wait_for(
        Duration::from_secs(10),
        "the stop reaching the node",
        || (seen.lock().unwrap().stopped == ["c1"]).then_some(()),
    );
    let o = c.ctl(&["call", "c1", "incr"]);
    assert!(!o.status.success());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    native.join().unwrap();
}
