//! A 3-member etcd cluster on 127.0.0.1 and a minimal client of its real v3
//! gRPC API.
//!
//! The `etcd-client` crate generates its stubs with `tonic-prost-build`,
//! which needs `protoc` at build time; to keep `cargo build --workspace`
//! free of system tools, the three messages used here (field numbers from
//! etcd's `rpc.proto`) are declared with prost's derive and called with
//! tonic's generic unary client. It is the same wire protocol `etcdctl` uses:
//! HTTP/2, one connection per [`EtcdConn`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

use crate::procs::{free_tcp_port, wait_for, Procs};

/// How long the cluster may take to become healthy.
const FORM_TIMEOUT: Duration = Duration::from_secs(60);

/// `etcdserverpb.ResponseHeader`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    /// Cluster id.
    #[prost(uint64, tag = "1")]
    pub cluster_id: u64,
    /// Id of the member that answered.
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
    /// Store revision.
    #[prost(int64, tag = "3")]
    pub revision: i64,
    /// Raft term.
    #[prost(uint64, tag = "4")]
    pub raft_term: u64,
}

/// `etcdserverpb.PutRequest` (lease, prev_kv, ignore_* left at their defaults).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    /// Key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// Value.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// `etcdserverpb.PutResponse` (prev_kv is never asked for).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

/// `etcdserverpb.StatusRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusRequest {}

/// `etcdserverpb.StatusResponse` (the fields used here).
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusResponse {
    /// Header (its `member_id` names the answering member).
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// Server version.
    #[prost(string, tag = "2")]
    pub version: String,
    /// Member id of the current leader (0: none).
    #[prost(uint64, tag = "4")]
    pub leader: u64,
}

/// One gRPC client with its own HTTP/2 connection to one member.
#[derive(Debug, Clone)]
pub struct EtcdConn {
    grpc: tonic::client::Grpc<Channel>,
}

impl EtcdConn {
    /// Connects to `addr` (`127.0.0.1:port`).
    pub async fn connect(addr: &str) -> anyhow::Result<EtcdConn> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .with_context(|| format!("connecting to etcd at {addr}"))?;
        Ok(EtcdConn {
            grpc: tonic::client::Grpc::new(channel),
        })
    }

    async fn unary<Req, Resp>(&mut self, path: &'static str, req: Req) -> anyhow::Result<Resp>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.grpc
            .ready()
            .await
            .map_err(|e| anyhow!("etcd channel not ready: {e}"))?;
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        let resp = self
            .grpc
            .unary(
                tonic::Request::new(req),
                PathAndQuery::from_static(path),
                codec,
            )
            .await
            .map_err(|s| anyhow!("etcd {path}: {}: {}", s.code(), s.message()))?;
        Ok(resp.into_inner())
    }

    /// `KV.Put`: a durable write (etcd fsyncs its WAL before acknowledging).
    pub async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> anyhow::Result<()> {
        let _: PutResponse = self
            .unary("/etcdserverpb.KV/Put", PutRequest { key, value })
            .await?;
        Ok(())
    }

    /// `Maintenance.Status`.
    pub async fn status(&mut self) -> anyhow::Result<StatusResponse> {
        self.unary("/etcdserverpb.Maintenance/Status", StatusRequest {})
            .await
    }
}

/// One member.
#[derive(Debug, Clone)]
pub struct EtcdMember {
    /// Name (`e1`..`e3`).
    pub name: String,
    /// Client address (`127.0.0.1:port`).
    pub client: String,
    /// Data directory.
    pub data: PathBuf,
}

/// A running cluster (its processes live in the caller's [`Procs`]).
#[derive(Debug)]
pub struct EtcdCluster {
    /// The members.
    pub members: Vec<EtcdMember>,
    /// The leader's client address.
    pub leader: String,
    /// A follower's client address.
    pub follower: String,
    /// `etcd --version` of the binary.
    pub version: String,
}

impl EtcdCluster {
    /// Starts 3 members with default durability (WAL fsync on every commit)
    /// and waits until all agree on a leader and a put through it succeeds.
    pub async fn start(dir: &Path, etcd: &Path, procs: &mut Procs) -> anyhow::Result<EtcdCluster> {
        let mut members = Vec::new();
        let mut peers = Vec::new();
        for i in 1..=3 {
            let (c, p) = (free_tcp_port()?, free_tcp_port()?);
            if c == p {
                bail!("port probe returned the same port twice");
            }
            let name = format!("e{i}");
            peers.push((name.clone(), format!("http://127.0.0.1:{p}")));
            members.push(EtcdMember {
                data: dir.join(&name),
                name,
                client: format!("127.0.0.1:{c}"),
            });
        }
        let initial_cluster = peers
            .iter()
            .map(|(n, u)| format!("{n}={u}"))
            .collect::<Vec<_>>()
            .join(",");
        for (m, (_, peer)) in members.iter().zip(&peers) {
            let client_url = format!("http://{}", m.client);
            let mut cmd = Command::new(etcd);
            cmd.env_clear()
                .env("PATH", "/usr/bin:/bin")
                .arg("--name")
                .arg(&m.name)
                .arg("--data-dir")
                .arg(&m.data)
                .arg("--listen-client-urls")
                .arg(&client_url)
                .arg("--advertise-client-urls")
                .arg(&client_url)
                .arg("--listen-peer-urls")
                .arg(peer)
                .arg("--initial-advertise-peer-urls")
                .arg(peer)
                .arg("--initial-cluster")
                .arg(&initial_cluster)
                .arg("--initial-cluster-token")
                .arg(format!("metta-bench-{}", std::process::id()))
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--logger")
                .arg("zap")
                .arg("--log-outputs")
                .arg("stderr")
                .arg("--log-level")
                .arg("warn");
            std::fs::create_dir_all(&m.data)?;
            procs.spawn(
                &format!("etcd {}", m.name),
                cmd,
                &dir.join(format!("{}.log", m.name)),
            )?;
        }

        let (leader, follower) = find_leader(&members, procs).await?;
        let version = Command::new(etcd)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
            .unwrap_or_default();
        Ok(EtcdCluster {
            members,
            leader,
            follower,
            version,
        })
    }

    /// Re-reads the leader and a follower (leadership may have moved).
    pub async fn refresh(&mut self, procs: &mut Procs) -> anyhow::Result<()> {
        (self.leader, self.follower) = find_leader(&self.members, procs).await?;
        Ok(())
    }
}

/// Waits until every member answers `Status` naming the same leader and a
/// put through that leader succeeds; returns the client addresses of the
/// leader and of a follower.
async fn find_leader(
    members: &[EtcdMember],
    procs: &mut Procs,
) -> anyhow::Result<(String, String)> {
    let what = "3 etcd members agreeing on a leader";
    wait_for(FORM_TIMEOUT, Duration::from_millis(100), what, || {
        let alive = procs.check_alive();
        async move {
            alive?;
            let mut ids = Vec::new();
            let mut leaders = Vec::new();
            for m in members {
                let s = EtcdConn::connect(&m.client).await?.status().await?;
                ids.push(s.header.map(|h| h.member_id).unwrap_or(0));
                leaders.push(s.leader);
            }
            let l = leaders[0];
            if l == 0 || leaders.iter().any(|x| *x != l) {
                return Ok(None);
            }
            let Some(li) = ids.iter().position(|id| *id == l) else {
                return Ok(None);
            };
            let fi = (li + 1) % ids.len();
            EtcdConn::connect(&members[li].client)
                .await?
                .put(b"metta-bench/health".to_vec(), b"ok".to_vec())
                .await?;
            Ok(Some((
                members[li].client.clone(),
                members[fi].client.clone(),
            )))
        }
    })
    .await
}
