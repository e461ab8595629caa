//! The authorization matrix (`metta_control::authz::TABLE`, the table in
//! `docs/ARCHITECTURE.md`) tried cell by cell against a real cluster: two
//! hosted control nodes (the leader and a follower), a hosted worker, a
//! native worker that joined through the kernel's link crate, the admin, a
//! user holding every right, a user holding none, a revoked user, and an
//! anonymous peer — each sending every kind of request, over QUIC and over
//! TCP, to the leader and to the follower.
//!
//! An allowed cell must get an answer that is not a refusal; a denied cell
//! must be refused (`permission denied`, `unauthenticated`, or for a revoked
//! identity the TLS handshake) and must **change nothing**: the registry's
//! applied index and contents, the Raft term and the leader are compared
//! before and after every denied request. The attacks found in issue 9 are
//! also asserted on their own, not only through the table.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use common::*;
use metta_control::authz::{self, Decision, Identity, Kind, Via};
use metta_control::config::{ClientConfig, DataDir};
use metta_control::policy::{domain_right, requirement, Requirement};
use metta_control::tcp::TcpClient;
use metta_control::transport::{self, Credentials, ServerTrust, Transport, TransportError};
use metta_proto::{
    ApiError, ApiRequest, Contract, Envelope, Heartbeat, JoinRequest, NodeCall, NodeKind,
    NodeResources, NodeSync, RaftRpc, Reply, Request, Response, Rights, Role, RunSpec, Subject,
};
use metta_trust::{NodeKey, RevocationList};

type TypeConfig = metta_control::raft_types::TypeConfig;

/// What a cell's request got.
#[derive(Debug)]
enum Got {
    /// Refused: `permission denied` or `unauthenticated`, or the handshake.
    Refused(String),
    /// Answered otherwise (success, or an error that is not a refusal).
    Answered(Response),
}

fn classify(r: Result<Response, TransportError>) -> Got {
    match r {
        Ok(Err(e @ (ApiError::PermissionDenied { .. } | ApiError::Unauthenticated))) => {
            Got::Refused(e.to_string())
        }
        Ok(r) => Got::Answered(r),
        Err(e @ TransportError::Refused { .. }) => Got::Refused(e.to_string()),
        Err(e) => panic!("transport failure (not a verdict): {e}"),
    }
}

/// One identity the matrix has a column for.
struct Who {
    label: &'static str,
    identity: Identity,
    subject: Option<Subject>,
    /// Holds read, write and run on `/`.
    granted: bool,
    creds: Option<Credentials>,
    /// The native worker speaks TCP through the kernel's link crate.
    link: Option<(metta_link::LinkConfig, u64)>,
}

struct Ctx {
    rt: tokio::runtime::Runtime,
    ca_der: Vec<u8>,
    admin: Arc<Transport>,
    leader: String,
    follower: String,
    native_id: u64,
}

fn creds_of_dir(dir: &std::path::Path) -> Credentials {
    let d = DataDir(dir.to_path_buf());
    let key = NodeKey::from_pem(&std::fs::read_to_string(d.node_key()).unwrap()).unwrap();
    Credentials::from_pem(
        &std::fs::read_to_string(d.node_cert()).unwrap(),
        &std::fs::read_to_string(d.ca_cert()).unwrap(),
        &key,
    )
    .unwrap()
}

fn creds_of_config(path: &std::path::Path) -> Credentials {
    let cfg = ClientConfig::load(path).unwrap();
    let key = NodeKey::from_pem(&cfg.key_pem).unwrap();
    Credentials::from_pem(&cfg.cert_pem, &cfg.ca_pem, &key).unwrap()
}

fn trust(ca_der: &[u8]) -> ServerTrust {
    ServerTrust::Cluster {
        ca_der: ca_der.to_vec(),
        revoked: Arc::new(RwLock::new(RevocationList::default())),
    }
}

impl Ctx {
    fn quic(&self, creds: Option<&Credentials>) -> Arc<Transport> {
        let _g = self.rt.enter();
        Transport::client(transport::client_config(creds, &trust(&self.ca_der)).unwrap()).unwrap()
    }

    fn admin(&self, call: ApiRequest) -> Reply {
        self.rt
            .block_on(self.admin.call(&self.leader, &Request::Api(call.clone())))
            .unwrap_or_else(|e| panic!("admin {call:?}: {e}"))
            .unwrap_or_else(|e| panic!("admin {call:?}: {e}"))
    }

    fn status(&self, at: &str) -> (u64, u64, Option<u64>) {
        match self
            .rt
            .block_on(self.admin.call(at, &Request::Api(ApiRequest::Status)))
        {
            Ok(Ok(Reply::Status(s))) => (s.applied, s.term, s.leader),
            other => panic!("status at {at}: {other:?}"),
        }
    }

    /// What a denied request must not change: the leader's applied index,
    /// every node's term and leader, and the registry's contents as the
    /// admin lists them.
    fn state(&self) -> String {
        let nodes = match self.admin(ApiRequest::Nodes) {
            Reply::Nodes(ns) => ns
                .into_iter()
                .map(|n| {
                    format!(
                        "{} {} {} {} {} {:?}",
                        n.id, n.name, n.role, n.kind, n.addr, n.labels
                    )
                })
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        format!(
            "leader {:?} follower {:?}\nnodes {nodes:?}\ntokens {:?}\nusers {:?}\ngrants {:?}\nvendors {:?}\nimages {:?}\nkv {:?}",
            self.status(&self.leader),
            {
                let (_, term, leader) = self.status(&self.follower);
                (term, leader)
            },
            self.admin(ApiRequest::TokenList),
            self.admin(ApiRequest::UserList),
            self.admin(ApiRequest::Grants { subject: None }),
            self.admin(ApiRequest::Vendors),
            self.admin(ApiRequest::Images),
            self.admin(ApiRequest::KvGet {
                key: "matrix".into()
            }),
        )
    }

    fn addr_of(&self, id: u64) -> String {
        match self.admin(ApiRequest::Nodes) {
            Reply::Nodes(ns) => ns
                .into_iter()
                .find(|n| n.id == id)
                .map(|n| n.addr)
                .unwrap_or_default(),
            other => panic!("{other:?}"),
        }
    }
}

fn vote(term: u64, node: u64) -> openraft::Vote<u64> {
    openraft::Vote::new(term, node)
}

/// The request of each kind that `who` sends: harmless when it is allowed,
/// a real attack when it is not (a worker's Raft traffic carries term 101).
fn sample(ctx: &Ctx, kind: Kind, who: &Who) -> Request {
    let node_id = match &who.subject {
        Some(Subject::Node(id)) => *id,
        _ => 3,
    };
    // A control node's Raft messages are allowed: make them stale, so the
    // cluster ignores them. Everyone else's would depose the leader.
    let term = if who.identity == Identity::Control {
        0
    } else {
        101
    };
    let env = Envelope {
        from: "ghost".into(),
        to: "c1".into(),
        channel: "/svc/counter".into(),
        payload: b"incr".to_vec(),
        reply: Some(metta_proto::ReplyRef {
            node: 1,
            lane: 0,
            token: 7,
        }),
    };
    let answer = NodeCall::Answer {
        token: 12_345,
        lane: 0,
        payload: b"forged".to_vec(),
    };
    let node = |call: NodeCall| Request::Node(call);
    let proxy = |call: NodeCall| Request::Proxy {
        node: ctx.native_id,
        call,
    };
    let logs = || NodeCall::Logs {
        name: "c1".into(),
        after: 0,
    };
    let call = || NodeCall::Call {
        name: "c1".into(),
        channel: "/svc/counter".into(),
        payload: b"incr".to_vec(),
        timeout_ms: 100,
    };
    let wait = || NodeCall::WaitStarted {
        name: "c1".into(),
        epoch: 1,
        timeout_ms: 100,
    };
    let api = Request::Api;
    let issuer = who
        .subject
        .clone()
        .unwrap_or(Subject::User("nobody".into()));
    match kind {
        Kind::Join => Request::Join(JoinRequest {
            token: "bogusid.bogussecret".into(),
            csr_pem: "not a csr".into(),
            name: "intruder".into(),
            addr: "127.0.0.1:9".into(),
            kind: NodeKind::Hosted,
            resources: NodeResources::default(),
        }),
        Kind::ApiStatus => api(ApiRequest::Status),
        Kind::ApiNodes => api(ApiRequest::Nodes),
        Kind::ApiNodeRemove => api(ApiRequest::NodeRemove { id: 999 }),
        Kind::ApiNodeLabel => api(ApiRequest::NodeLabel {
            node: "node-1".into(),
            key: "matrix".into(),
            value: Some(who.label.replace(' ', "-")),
        }),
        Kind::ApiTokenCreate => api(ApiRequest::TokenCreate {
            role: Role::Control,
            ttl_secs: 60,
            uses: 1,
        }),
        Kind::ApiTokenList => api(ApiRequest::TokenList),
        Kind::ApiTokenRevoke => api(ApiRequest::TokenRevoke { id: "nope".into() }),
        Kind::ApiUserAdd => api(ApiRequest::UserAdd {
            name: "mallory".into(),
            csr_pem: "not a csr".into(),
        }),
        Kind::ApiUserList => api(ApiRequest::UserList),
        Kind::ApiGrant => api(ApiRequest::Grant(metta_proto::SignedGrant {
            grant: metta_proto::Grant {
                issuer,
                subject: Subject::User("mallory".into()),
                rights: Rights::ALL,
                resource: "/".into(),
                expires_at: None,
                delegable: true,
                parent: None,
                issued_at: 1,
            },
            signature: vec![0; 64],
        })),
        Kind::ApiGrants => api(ApiRequest::Grants { subject: None }),
        Kind::ApiRevokeGrant => api(ApiRequest::RevokeGrant { id: "ffff".into() }),
        Kind::ApiRevokeSubject => api(ApiRequest::RevokeSubject(Subject::User("zed".into()))),
        Kind::ApiKvPut => api(ApiRequest::KvPut {
            key: "matrix".into(),
            value: who.label.as_bytes().to_vec(),
        }),
        Kind::ApiKvGet => api(ApiRequest::KvGet {
            key: "matrix".into(),
        }),
        Kind::ApiHeartbeat => api(ApiRequest::Heartbeat(Heartbeat {
            resources: NodeResources {
                cpus: 1,
                memory_bytes: 256 << 20,
                arch: "x86_64".into(),
            },
            cert_not_after: 0,
            // Its registered address, so an allowed heartbeat moves nothing.
            addr: ctx.addr_of(node_id),
        })),
        Kind::ApiRenew => api(ApiRequest::Renew {
            csr_pem: "not a csr".into(),
        }),
        Kind::ApiVendorAdd => api(ApiRequest::VendorAdd {
            name: "matrix".into(),
            spki_der: vec![1, 2, 3],
        }),
        Kind::ApiVendorRemove => api(ApiRequest::VendorRemove {
            name: "nope".into(),
        }),
        Kind::ApiVendors => api(ApiRequest::Vendors),
        Kind::ApiImagePush => api(ApiRequest::ImagePush {
            manifest: metta_proto::SignedManifest {
                manifest: metta_proto::Manifest {
                    name: "matrix".into(),
                    version: "1.0.0".into(),
                    vendor: "nope".into(),
                    module_hash: [0; 32],
                    capabilities: vec![],
                },
                vendor_spki: vec![],
                signature: vec![],
            },
            wasm: vec![0, 97, 115, 109],
        }),
        Kind::ApiImages => api(ApiRequest::Images),
        Kind::ApiRun => api(ApiRequest::Run(RunSpec {
            name: "m1".into(),
            image: "nope".into(),
            contract: Contract {
                period_ns: 100_000_000,
                slice_ns: 1_000_000,
                extra: false,
                memory: 1 << 24,
            },
            node: None,
            labels: vec![],
            accept_offer: false,
        })),
        Kind::ApiPs => api(ApiRequest::Ps),
        Kind::ApiLogs => api(ApiRequest::Logs {
            name: "nope".into(),
            after: 0,
        }),
        Kind::ApiStop => api(ApiRequest::Stop {
            name: "nope".into(),
        }),
        Kind::ApiCall => api(ApiRequest::Call {
            name: "nope".into(),
            channel: None,
            payload: vec![],
            timeout_ms: 100,
        }),
        // The attack of issue 9: a control token in the admin's name.
        Kind::Forwarded => Request::Forwarded {
            origin: Subject::User("admin".into()),
            call: ApiRequest::TokenCreate {
                role: Role::Control,
                ttl_secs: 60,
                uses: 1,
            },
        },
        Kind::RaftAppendEntries => Request::Raft(RaftRpc::AppendEntries(enc(
            &openraft::raft::AppendEntriesRequest::<TypeConfig> {
                vote: vote(term, node_id),
                prev_log_id: None,
                entries: vec![],
                leader_commit: None,
            },
        ))),
        Kind::RaftVote => Request::Raft(RaftRpc::Vote(enc(&openraft::raft::VoteRequest::<u64> {
            vote: vote(term, node_id),
            last_log_id: None,
        }))),
        Kind::RaftInstallSnapshot => Request::Raft(RaftRpc::InstallSnapshot(enc(
            &openraft::raft::InstallSnapshotRequest::<TypeConfig> {
                vote: vote(term, node_id),
                meta: openraft::SnapshotMeta {
                    last_log_id: None,
                    last_membership: Default::default(),
                    snapshot_id: "forged".into(),
                },
                offset: 0,
                data: vec![],
                done: false,
            },
        ))),
        Kind::NodeStats => node(NodeCall::Stats),
        Kind::NodeLogs => node(logs()),
        Kind::NodeCall => node(call()),
        Kind::NodeWaitStarted => node(wait()),
        Kind::NodeDeliver => node(NodeCall::Deliver(vec![env.clone()])),
        Kind::NodeAnswer => node(answer.clone()),
        Kind::ProxyStats => proxy(NodeCall::Stats),
        Kind::ProxyLogs => proxy(logs()),
        Kind::ProxyCall => proxy(call()),
        Kind::ProxyWaitStarted => proxy(wait()),
        Kind::ProxyDeliver => proxy(NodeCall::Deliver(vec![env])),
        Kind::ProxyAnswer => proxy(answer),
        Kind::Sync => Request::Sync(NodeSync {
            heartbeat: Heartbeat {
                resources: NodeResources {
                    cpus: 1,
                    memory_bytes: 256 << 20,
                    arch: "x86_64".into(),
                },
                cert_not_after: 0,
                addr: String::new(),
            },
            hold_ms: 0,
            ..NodeSync::default()
        }),
    }
}

/// postcard encoding of openraft messages, as `metta_control::network` does.
fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
    metta_control::network::encode(v).unwrap()
}

/// Whether the matrix allows `kind` from `who` over `via` for this sample.
fn allowed(kind: Kind, who: &Who, via: Via, req: &Request) -> bool {
    match authz::decide(kind, who.identity, via) {
        Decision::Deny => false,
        Decision::Allow | Decision::Relay => true,
        Decision::Grant => match (&who.subject, req) {
            (_, _) if who.identity == Identity::Admin || who.granted => true,
            // Without grants: what the policy opens to every user — and
            // the samples name domains that are not theirs.
            (Some(s), Request::Api(call)) => {
                !matches!(requirement(s, call), Requirement::Right(..))
                    && domain_right(call).is_none()
            }
            _ => false,
        },
        // Every sample is about its sender except the worker's domain
        // messages and answers, which claim a domain it does not run.
        Decision::OwnClaims => !matches!(
            kind,
            Kind::NodeDeliver | Kind::NodeAnswer | Kind::ProxyDeliver | Kind::ProxyAnswer
        ),
    }
}

fn link_call(
    cfg: &metta_link::LinkConfig,
    addr: &str,
    req: &Request,
) -> Result<Response, TransportError> {
    let mut tcp = TcpStream::connect(addr).expect("tcp connect");
    tcp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut s = metta_link::Session::new(
        cfg,
        metta_control::clock::now(),
        &rand::random::<[u8; 32]>(),
    )
    .unwrap();
    s.send_frame(req).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 16 * 1024];
    loop {
        let out = s.take_transmit();
        if !out.is_empty() {
            tcp.write_all(&out).expect("write");
        }
        match s.poll_response() {
            Ok(Some(r)) => return Ok(r),
            Ok(None) => {}
            Err(e) => {
                return Err(TransportError::Refused {
                    addr: addr.into(),
                    msg: e.to_string(),
                })
            }
        }
        assert!(Instant::now() < deadline, "no answer within 15 s");
        match tcp.read(&mut buf) {
            Ok(0) => {
                if let Err(e) = s.connection_closed() {
                    return Err(TransportError::Refused {
                        addr: addr.into(),
                        msg: e.to_string(),
                    });
                }
            }
            Ok(n) => {
                if let Err(e) = s.receive(&buf[..n]) {
                    return Err(TransportError::Refused {
                        addr: addr.into(),
                        msg: e.to_string(),
                    });
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

#[test]
fn every_cell_of_the_authorization_matrix_holds_against_a_real_cluster() {
    let mut c = Cluster::init("1h");
    let t = c.token("control", 1);
    c.join(&t, "node-2");
    let t = c.token("worker", 1);
    c.join(&t, "node-3");
    c.wait_voters(2);
    c.wait_nodes_up(3);
    // Membership settled (the worker a learner), so nothing but the
    // requests below writes to the registry.
    wait_for(Duration::from_secs(30), "node-3 a learner", || {
        c.nodes_json()?
            .into_iter()
            .any(|n| n["name"] == "node-3" && n["raft"] == "learner")
            .then_some(())
    });

    // Users: alice holds every right, bob none, eve is revoked.
    let users = c.dir.path().to_path_buf();
    for u in ["alice", "bob", "eve"] {
        let out = users.join(format!("{u}.conf"));
        c.ok(&["user", "add", u, "--out", out.to_str().unwrap()]);
    }
    c.ok(&["grant", "alice", "read,write,run", "--on", "/"]);
    c.ok(&["revoke", "user/eve"]);

    // The native worker joins through the kernel's link crate.
    let token = metta_link::JoinToken::from_str(&c.token("worker", 1)).unwrap();
    metta_link::rng::add_entropy(&rand::random::<[u8; 32]>());
    let link_key = metta_link::NodeKey::from_entropy(&rand::random::<[u8; 32]>()).unwrap();
    let join = metta_link::join_request(
        &token,
        &link_key,
        "kern",
        &format!("{}:0", c.ip),
        NodeResources {
            cpus: 1,
            memory_bytes: 256 << 20,
            arch: "x86_64".into(),
        },
    )
    .unwrap();
    let joined = metta_link::interpret_join(
        link_call(
            &metta_link::LinkConfig::join(token.pin),
            &c.nodes[0].addr,
            &join,
        )
        .unwrap(),
        &token,
        &link_key,
        metta_control::clock::now(),
    )
    .expect("the native node joined");
    let native_id = joined.node_id;
    let native_creds = Credentials {
        chain: vec![joined.cert_der.clone().into(), joined.ca_der.clone().into()],
        key: NodeKey::from_pkcs8_der(&link_key.to_pkcs8_der().unwrap())
            .unwrap()
            .tls_private_key(),
    };
    let native_link = (joined.link_config(link_key), joined.cert_not_after);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let admin_creds = creds_of_config(&c.admin);
    let ca_der = admin_creds.chain[1].to_vec();
    let admin = {
        let _g = rt.enter();
        Transport::client(transport::client_config(Some(&admin_creds), &trust(&ca_der)).unwrap())
            .unwrap()
    };
    let ctx = Ctx {
        rt,
        ca_der,
        admin,
        leader: c.nodes[0].addr.clone(),
        follower: c.nodes[1].addr.clone(),
        native_id,
    };
    // Membership changes end with a second entry (joint consensus, then
    // the new configuration): wait until the applied index stays put.
    let mut last = (ctx.status(&ctx.leader).0, Instant::now());
    wait_for(Duration::from_secs(30), "the registry to settle", || {
        let applied = ctx.status(&ctx.leader).0;
        if applied != last.0 {
            last = (applied, Instant::now());
        }
        (last.1.elapsed() > Duration::from_secs(2)).then_some(())
    });
    // The native node's first sync, so it is up and linked to the leader.
    let mut first = sample(
        &ctx,
        Kind::Sync,
        &Who {
            label: "native",
            identity: Identity::Native,
            subject: None,
            granted: false,
            creds: None,
            link: None,
        },
    );
    if let Request::Sync(s) = &mut first {
        s.heartbeat.cert_not_after = native_link.1;
    }
    assert!(matches!(
        link_call(&native_link.0, &ctx.leader, &first),
        Ok(Ok(Reply::Work(_)))
    ));

    let who = vec![
        Who {
            label: "anonymous",
            identity: Identity::Anonymous,
            subject: None,
            granted: false,
            creds: None,
            link: None,
        },
        Who {
            label: "user without grants",
            identity: Identity::User,
            subject: Some(Subject::User("bob".into())),
            granted: false,
            creds: Some(creds_of_config(&users.join("bob.conf"))),
            link: None,
        },
        Who {
            label: "user with every right",
            identity: Identity::User,
            subject: Some(Subject::User("alice".into())),
            granted: true,
            creds: Some(creds_of_config(&users.join("alice.conf"))),
            link: None,
        },
        Who {
            label: "admin",
            identity: Identity::Admin,
            subject: Some(Subject::User("admin".into())),
            granted: false,
            creds: Some(admin_creds.clone()),
            link: None,
        },
        Who {
            label: "control node",
            identity: Identity::Control,
            subject: Some(Subject::Node(2)),
            granted: false,
            creds: Some(creds_of_dir(&c.nodes[1].data)),
            link: None,
        },
        Who {
            label: "hosted worker",
            identity: Identity::Worker,
            subject: Some(Subject::Node(3)),
            granted: false,
            creds: Some(creds_of_dir(&c.nodes[2].data)),
            link: None,
        },
        Who {
            label: "native worker",
            identity: Identity::Native,
            subject: Some(Subject::Node(native_id)),
            granted: false,
            creds: Some(native_creds),
            link: Some(native_link),
        },
        Who {
            label: "revoked user",
            identity: Identity::Revoked,
            subject: Some(Subject::User("eve".into())),
            granted: false,
            creds: Some(creds_of_config(&users.join("eve.conf"))),
            link: None,
        },
    ];

    let mut cells = 0;
    let mut denied = 0;
    let mut failures = Vec::new();
    for w in &who {
        let quic = ctx.quic(w.creds.as_ref());
        for target in [ctx.leader.clone(), ctx.follower.clone()] {
            let mut tcp = TcpClient::new(
                target.clone(),
                transport::tls_client_config(w.creds.as_ref(), &trust(&ctx.ca_der)).unwrap(),
            );
            for (kind, _, _, _) in authz::TABLE {
                for via in [Via::Quic, Via::Tcp] {
                    let mut req = sample(&ctx, *kind, w);
                    if let (Request::Sync(s), Some((_, not_after))) = (&mut req, &w.link) {
                        s.heartbeat.cert_not_after = *not_after;
                    }
                    let expect = allowed(*kind, w, via, &req);
                    let before = (!expect).then(|| ctx.state());
                    let got = match (via, &w.link) {
                        (Via::Quic, _) => classify(ctx.rt.block_on(quic.call(&target, &req))),
                        (Via::Tcp, Some((cfg, _))) => classify(link_call(cfg, &target, &req)),
                        (Via::Tcp, None) => classify(ctx.rt.block_on(tcp.call(&req))),
                    };
                    cells += 1;
                    let cell = format!("{} → {kind:?} over {via:?} at {target}", w.label);
                    match (expect, &got) {
                        (true, Got::Answered(_)) => {}
                        (false, Got::Refused(_)) => {
                            denied += 1;
                            let after = ctx.state();
                            if before.as_deref() != Some(after.as_str()) {
                                failures.push(format!(
                                    "{cell}: refused but changed the cluster:\n{}\n---\n{after}",
                                    before.unwrap_or_default()
                                ));
                            }
                        }
                        (true, Got::Refused(e)) => {
                            failures.push(format!("{cell}: should be allowed, was refused: {e}"))
                        }
                        (false, Got::Answered(r)) => {
                            failures.push(format!("{cell}: should be refused, got {r:?}"))
                        }
                    }
                }
            }
        }
    }
    // The attacks of issue 9 on their own, whatever the table says.
    let worker = &who[5];
    let control = &who[4];
    let w = ctx.quic(worker.creds.as_ref());
    let before = ctx.state();
    let (_, term, _) = ctx.status(&ctx.leader);
    for req in [
        sample(&ctx, Kind::Forwarded, worker),
        sample(&ctx, Kind::RaftVote, worker),
        sample(&ctx, Kind::RaftAppendEntries, worker),
        sample(&ctx, Kind::NodeLogs, worker),
        sample(&ctx, Kind::NodeCall, worker),
        Request::Forwarded {
            origin: Subject::User("admin".into()),
            call: ApiRequest::Stop { name: "c1".into() },
        },
    ] {
        let got = classify(ctx.rt.block_on(w.call(&ctx.leader, &req)));
        assert!(
            matches!(&got, Got::Refused(e) if e.contains("permission denied")),
            "a worker's {req:?} got {got:?}"
        );
    }
    // A control node relaying a worker's call: the origin is checked too.
    let cq = ctx.quic(control.creds.as_ref());
    let relayed = Request::Forwarded {
        origin: Subject::Node(3),
        call: ApiRequest::TokenCreate {
            role: Role::Control,
            ttl_secs: 60,
            uses: 1,
        },
    };
    let got = classify(ctx.rt.block_on(cq.call(&ctx.leader, &relayed)));
    assert!(
        matches!(&got, Got::Refused(e) if e.contains("node/3")),
        "{got:?}"
    );
    // A control node's Raft message must speak for itself.
    let mut impostor = sample(&ctx, Kind::RaftVote, worker);
    if let Request::Raft(RaftRpc::Vote(b)) = &mut impostor {
        *b = enc(&openraft::raft::VoteRequest::<u64> {
            vote: vote(101, 1),
            last_log_id: None,
        });
    }
    let got = classify(ctx.rt.block_on(cq.call(&ctx.leader, &impostor)));
    assert!(
        matches!(&got, Got::Refused(e) if e.contains("another node")),
        "{got:?}"
    );
    assert_eq!(ctx.status(&ctx.leader).1, term, "the term moved");
    assert_eq!(ctx.state(), before, "a refused attack changed the cluster");

    assert!(
        failures.is_empty(),
        "{} of {cells} cells wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{cells} cells tried, {denied} refused without a change");
    assert!(
        denied > cells / 2,
        "most cells are refusals ({denied} of {cells})"
    );
}
