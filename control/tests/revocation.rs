//! Revocation and certificate lifetime on a real multi-process cluster.

mod common;

use std::time::{Duration, Instant};

use common::*;
use metta_control::client::Client;
use metta_control::config::ClientConfig;
use metta_control::transport::CallError;
use metta_proto::{ApiRequest, Reply};

fn client_for(conf: &std::path::Path, endpoint: &str) -> Client {
    let mut cfg = ClientConfig::load(conf).unwrap();
    cfg.endpoints = vec![endpoint.to_string()];
    Client::new(&cfg).unwrap()
}

/// Polls an async condition with a deadline.
async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_user_loses_live_connections_on_every_node_within_5s_and_after_leader_change() {
    let mut c = tokio::task::block_in_place(|| {
        let mut c = Cluster::init("24h");
        let t = c.token("control", 2);
        c.join(&t, "n2");
        c.join(&t, "n3");
        c.wait_voters(3);
        c
    });
    let bob_conf = c.dir.path().join("bob.conf");
    c.ok(&["user", "add", "bob", "--out", bob_conf.to_str().unwrap()]);
    c.ok(&["grant", "bob", "read", "--on", "/nodes"]);

    // One live connection from bob to every node; each call works.
    let clients: Vec<Client> = c
        .nodes
        .iter()
        .map(|n| client_for(&bob_conf, &n.addr))
        .collect();
    for cl in &clients {
        let r = cl
            .call(ApiRequest::Nodes)
            .await
            .expect("bob may list nodes");
        assert!(matches!(r, Reply::Nodes(ref n) if n.len() == 3));
    }

    let revoked_at = Instant::now();
    c.ok(&["revoke", "user/bob"]);
    for (i, cl) in clients.iter().enumerate() {
        eventually(
            Duration::from_secs(5),
            "bob's connection refused",
            || async {
                matches!(
                    cl.call(ApiRequest::Nodes).await,
                    Err(CallError::Transport(_))
                )
            },
        )
        .await;
        assert!(
            revoked_at.elapsed() < Duration::from_secs(5),
            "node {i} took {:?}",
            revoked_at.elapsed()
        );
    }

    // Leader change: kill the leader, let another take over, restart it.
    let leader = tokio::task::block_in_place(|| c.leader_index().unwrap());
    c.nodes[leader].kill();
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(15), "a new leader", || {
            c.leader_index().filter(|&i| i != leader)
        });
    });
    c.nodes[leader].start();
    tokio::task::block_in_place(|| c.wait_nodes_up(3));
    for n in &c.nodes {
        let fresh = client_for(&bob_conf, &n.addr);
        let r = fresh.call(ApiRequest::Nodes).await;
        assert!(
            matches!(r, Err(CallError::Transport(_))),
            "a new handshake by bob must fail at {}: {r:?}",
            n.addr
        );
    }
    // The admin still works everywhere.
    for n in &c.nodes {
        let admin = client_for(&c.admin, &n.addr);
        admin.call(ApiRequest::Status).await.expect("admin status");
    }
}

#[test]
fn removed_node_is_cut_off_and_stops() {
    let mut c = Cluster::init("24h");
    let t = c.token("worker", 1);
    c.join(&t, "w1");
    let nodes = c.wait_nodes_up(2);
    let w = nodes.iter().find(|n| n["name"] == "w1").unwrap();
    assert_eq!(w["raft"], "learner");
    let id = w["id"].as_u64().unwrap().to_string();
    // By name (an unknown name is a clear error); by id works too.
    let o = c.ctl(&["nodes", "rm", "nope"]);
    assert!(
        stderr(&o).contains("no node named \"nope\""),
        "{}",
        stderr(&o)
    );
    let o = c.ctl(&["nodes", "rm", "w1"]);
    assert!(
        stderr(&o).contains(&format!("node/{id} removed")),
        "{}",
        stderr(&o)
    );
    // The node learns it was revoked (or is cut off) and exits.
    let child = c.nodes[1].child.as_mut().unwrap();
    wait_for(Duration::from_secs(10), "removed node to exit", || {
        child.try_wait().unwrap()
    });
    let nodes = c.nodes_json().unwrap();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    // Its identity cannot be reused: re-joining needs a new token and gets a new id.
    let t2 = c.token("worker", 1);
    let (_, _, o) = c.join_cmd(&t2, "w1b");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("node/3"), "{}", stderr(&o));
}

#[test]
fn short_lived_node_certificates_renew_without_dropping_the_node() {
    let mut c = Cluster::init("9s");
    let t = c.token("control", 1);
    let (data, addr, o) = c.join_cmd_with(&t, "n2", &["--cert-lifetime", "9s"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut n = NodeProc {
        data,
        addr,
        child: None,
    };
    n.start();
    c.nodes.push(n);
    c.add_endpoints();
    let first = c.wait_voters(2);
    let expiry = |nodes: &Vec<serde_json::Value>, name: &str| {
        nodes.iter().find(|n| n["name"] == name).unwrap()["cert_not_after"]
            .as_u64()
            .unwrap()
    };
    let (e1, e2) = (expiry(&first, "node-1"), expiry(&first, "n2"));
    // Past the original expiry both nodes are up with renewed certificates,
    // and the cluster keeps taking writes throughout.
    let original_expiry = e1.max(e2);
    let later = wait_for(Duration::from_secs(30), "both certificates renewed", || {
        assert!(
            c.ctl(&["kv", "put", "tick", "x"]).status.success(),
            "write failed during renewal"
        );
        let now = metta_control::clock::now();
        let nodes = c.nodes_json()?;
        (now > original_expiry + 1
            && nodes.iter().all(|n| n["status"] == "up")
            && expiry(&nodes, "node-1") > e1
            && expiry(&nodes, "n2") > e2)
            .then_some(nodes)
    });
    assert_eq!(
        later
            .iter()
            .filter(|n| n["raft"] == "leader" || n["raft"] == "follower")
            .count(),
        2
    );
}
