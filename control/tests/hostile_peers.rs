//! Members that lie, against real `mettad` processes: a worker's node
//! answering the leader's Raft traffic with a vote from a far-off term (it
//! is a learner: such answers are not believed, and the leader stays), and
//! a server that is not the node the leader meant to reach.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use metta_control::config::{ClientConfig, DataDir};
use metta_control::transport::{self, read_frame, write_frame, Credentials};
use metta_proto::{Reply, Request, Response};
use metta_trust::{NodeKey, RevocationList};
use openraft::raft::{AppendEntriesResponse, InstallSnapshotResponse, VoteResponse};

fn creds_of_dir(dir: &std::path::Path) -> (Credentials, Vec<u8>) {
    let d = DataDir(dir.to_path_buf());
    let key = NodeKey::from_pem(&std::fs::read_to_string(d.node_key()).unwrap()).unwrap();
    let ca_pem = std::fs::read_to_string(d.ca_cert()).unwrap();
    let creds = Credentials::from_pem(
        &std::fs::read_to_string(d.node_cert()).unwrap(),
        &ca_pem,
        &key,
    )
    .unwrap();
    (creds, metta_trust::cert::pem_to_der(&ca_pem).unwrap())
}

/// Serves `addr` with `creds`, answering every Raft RPC with a vote of
/// term `u64::MAX - 1` for `claimed`; counts the RPCs it got.
fn lying_server(
    addr: SocketAddr,
    creds: &Credentials,
    ca_der: &[u8],
    claimed: u64,
    seen: Arc<std::sync::atomic::AtomicU64>,
) -> quinn::Endpoint {
    let cfg = transport::server_config(creds, ca_der, Arc::new(RevocationList::default().into()))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let ep = loop {
        match quinn::Endpoint::server(cfg.clone(), addr) {
            Ok(ep) => break ep,
            Err(e) if Instant::now() < deadline => {
                eprintln!("bind {addr}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    };
    let accept = ep.clone();
    tokio::spawn(async move {
        while let Some(inc) = accept.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(conn) = inc.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let Ok((req, _)) = read_frame::<Request>(&mut recv, 1 << 24, None).await
                        else {
                            return;
                        };
                        let vote = openraft::Vote::new(u64::MAX - 1, claimed);
                        let enc = |v: &dyn erased_serde_like::Enc| v.bytes();
                        let reply: Response = match req {
                            Request::Raft(metta_proto::RaftRpc::AppendEntries(_)) => {
                                seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                Ok(Reply::Raft(enc(&Ok::<_, openraft::error::RaftError<u64>>(
                                    AppendEntriesResponse::<u64>::HigherVote(vote),
                                ))))
                            }
                            Request::Raft(metta_proto::RaftRpc::Vote(_)) => Ok(Reply::Raft(enc(
                                &Ok::<_, openraft::error::RaftError<u64>>(VoteResponse::<u64> {
                                    vote,
                                    vote_granted: false,
                                    last_log_id: None,
                                }),
                            ))),
                            Request::Raft(metta_proto::RaftRpc::InstallSnapshot(_)) => {
                                Ok(Reply::Raft(enc(&Ok::<
                                    _,
                                    openraft::error::RaftError<
                                        u64,
                                        openraft::error::InstallSnapshotError,
                                    >,
                                >(
                                    InstallSnapshotResponse::<u64> { vote }
                                ))))
                            }
                            _ => Ok(Reply::Done),
                        };
                        let _ = write_frame(&mut send, &reply).await;
                    });
                }
            });
        }
    });
    ep
}

/// Object-safe postcard encoding for the replies above.
mod erased_serde_like {
    pub trait Enc {
        fn bytes(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Enc for T {
        fn bytes(&self) -> Vec<u8> {
            metta_control::network::encode(self).unwrap()
        }
    }
}

fn term_and_leader(c: &Cluster) -> (u64, u64) {
    let cfg = ClientConfig::load(&c.admin).unwrap();
    let client = metta_control::client::Client::new(&cfg).unwrap();
    let rt = tokio::runtime::Handle::current();
    let r =
        tokio::task::block_in_place(|| rt.block_on(client.call(metta_proto::ApiRequest::Status)));
    match r {
        Ok(Reply::Status(s)) => (s.term, s.leader.unwrap_or(0)),
        other => panic!("status: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cannot_depose_the_leader_with_a_vote_from_the_future() {
    let mut c = tokio::task::block_in_place(|| {
        let mut c = Cluster::init("1h");
        let t = c.token("worker", 1);
        c.join(&t, "node-2");
        let t = c.token("worker", 1);
        c.join(&t, "node-3");
        c
    });
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(30), "both workers learners", || {
            let n = c.nodes_json()?;
            (n.iter().filter(|x| x["raft"] == "learner").count() == 2).then_some(())
        })
    });
    let (term, leader) = term_and_leader(&c);
    // node-2's mettad is replaced by a liar holding its key.
    c.nodes[1].kill();
    let addr: SocketAddr = c.nodes[1].addr.parse().unwrap();
    let (creds, ca_der) = creds_of_dir(&c.nodes[1].data);
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let liar = lying_server(addr, &creds, &ca_der, 2, seen.clone());
    // The leader keeps replicating to it and keeps being told "term
    // u64::MAX - 1" — for a few seconds, far beyond an election timeout.
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.load(std::sync::atomic::Ordering::Relaxed) < 5 {
        assert!(
            Instant::now() < deadline,
            "the leader did not replicate to the worker"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Lied to again and again, for longer than an election timeout.
    let lied = seen.load(std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.load(std::sync::atomic::Ordering::Relaxed) < lied + 10 {
        assert!(Instant::now() < deadline, "the leader stopped replicating");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        term_and_leader(&c),
        (term, leader),
        "the leader was deposed"
    );
    tokio::task::block_in_place(|| c.ok(&["kv", "put", "still", "writable"]));
    assert!(c.nodes[0]
        .log()
        .contains("is not a voter and answered with a higher vote"));
    liar.close(0u32.into(), b"");
    liar.wait_idle().await;
    drop(liar);

    // Another worker's key at node-2's address: the leader will not talk
    // to a server that is not node-2.
    let (creds3, _) = creds_of_dir(&c.nodes[2].data);
    let seen3 = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let impostor = lying_server(addr, &creds3, &ca_der, 3, seen3.clone());
    tokio::task::block_in_place(|| {
        wait_for(
            Duration::from_secs(15),
            "the leader refusing the impostor",
            || {
                c.nodes[0]
                    .log()
                    .contains("expected node/2 there, but the server is node/3")
                    .then_some(())
            },
        )
    });
    assert_eq!(seen3.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(term_and_leader(&c), (term, leader));
    impostor.close(0u32.into(), b"");
}
