//! A 3-voter Metta cluster on 127.0.0.1, set up the way an operator would
//! (`mettactl init --no-start`, a control token with 2 uses, two
//! `mettactl join --no-start`, three `mettad`), and its API clients.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use metta_control::client::Client;
use metta_control::config::ClientConfig;
use metta_control::setup::{self, JoinOptions};
use metta_proto::{ApiRequest, Reply};
use serde_json::Value;

use crate::procs::{free_udp_addr, wait_for, Procs};

/// How long the cluster may take to form.
const FORM_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one `mettactl` invocation may take.
const CTL_TIMEOUT: Duration = Duration::from_secs(30);

/// The binaries to run.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `mettad`.
    pub mettad: PathBuf,
    /// `mettactl`.
    pub mettactl: PathBuf,
}

/// One node.
#[derive(Debug, Clone)]
pub struct MettaNode {
    /// Name (`node-N`).
    pub name: String,
    /// Data directory.
    pub data: PathBuf,
    /// UDP address.
    pub addr: String,
}

/// A running cluster (its processes live in the caller's [`Procs`]).
#[derive(Debug)]
pub struct MettaCluster {
    bins: Bins,
    dir: PathBuf,
    admin_path: PathBuf,
    admin: ClientConfig,
    /// The nodes, in creation order.
    pub nodes: Vec<MettaNode>,
    /// The leader's address once the cluster formed.
    pub leader: String,
    /// A follower's address.
    pub follower: String,
    /// `join_ms` of the two setup joins (`mettactl join -o json`), made while
    /// the cluster had a single voter.
    pub setup_join_ms: Vec<f64>,
}

async fn mettactl(bins: &Bins, admin: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new(&bins.mettactl);
    cmd.arg("--config")
        .arg(admin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(CTL_TIMEOUT, cmd.output())
        .await
        .map_err(|_| anyhow!("mettactl {args:?} did not finish within {CTL_TIMEOUT:?}"))?
        .with_context(|| format!("running {}", bins.mettactl.display()))?;
    if !out.status.success() {
        bail!(
            "mettactl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn spawn_mettad(bins: &Bins, procs: &mut Procs, n: &MettaNode, log: &str) -> anyhow::Result<()> {
    let mut cmd = std::process::Command::new(&bins.mettad);
    cmd.arg("--data-dir").arg(&n.data).arg("--log").arg(log);
    procs.spawn(
        &format!("mettad {}", n.name),
        cmd,
        &n.data.join("mettad.log"),
    )?;
    Ok(())
}

impl MettaCluster {
    /// Creates and starts the cluster in `dir`; returns once `nodes -o json`
    /// lists 3 nodes, all up, one leader and two followers.
    pub async fn start(
        dir: &Path,
        bins: &Bins,
        procs: &mut Procs,
        log: &str,
    ) -> anyhow::Result<MettaCluster> {
        let admin_path = dir.join("admin.conf");
        let node = |i: usize| -> anyhow::Result<MettaNode> {
            Ok(MettaNode {
                name: format!("node-{i}"),
                data: dir.join(format!("m{i}")),
                addr: free_udp_addr()?,
            })
        };
        let first = node(1)?;
        mettactl(
            bins,
            &admin_path,
            &[
                "init",
                "--cluster",
                "bench",
                "--data-dir",
                path_str(&first.data)?,
                "--listen",
                &first.addr,
                "--name",
                &first.name,
                "--no-start",
            ],
        )
        .await?;
        spawn_mettad(bins, procs, &first, log)?;
        let mut c = MettaCluster {
            bins: bins.clone(),
            dir: dir.to_path_buf(),
            admin: ClientConfig::load(&admin_path)?,
            admin_path,
            nodes: vec![first],
            leader: String::new(),
            follower: String::new(),
            setup_join_ms: Vec::new(),
        };
        c.wait_formed(1, procs).await?;

        let token = c
            .ctl(&[
                "token", "create", "--role", "control", "--ttl", "10m", "--uses", "2",
            ])
            .await?;
        let token = token.trim().to_string();
        let seed = c.nodes[0].addr.clone();
        for i in 2..=3 {
            let n = node(i)?;
            let out = c
                .ctl(&[
                    "-o",
                    "json",
                    "join",
                    &seed,
                    "--token",
                    &token,
                    "--data-dir",
                    path_str(&n.data)?,
                    "--listen",
                    &n.addr,
                    "--name",
                    &n.name,
                    "--no-start",
                ])
                .await?;
            let v: Value = serde_json::from_str(&out)
                .with_context(|| format!("mettactl join -o json printed {out:?}"))?;
            c.setup_join_ms.push(
                v["join_ms"]
                    .as_f64()
                    .ok_or_else(|| anyhow!("no join_ms in {out}"))?,
            );
            c.nodes.push(n);
        }
        for n in &c.nodes[1..] {
            spawn_mettad(bins, procs, n, log)?;
        }
        // List every node in the admin config so `mettactl` reaches the
        // cluster whichever node answers first.
        c.admin.endpoints = c.nodes.iter().map(|n| n.addr.clone()).collect();
        c.admin.save(&c.admin_path, true)?;
        c.wait_formed(3, procs).await?;
        Ok(c)
    }

    /// Re-reads the leader and a follower (leadership may have moved), waiting
    /// for the cluster to be whole again.
    pub async fn refresh(&mut self, procs: &mut Procs) -> anyhow::Result<()> {
        let n = self.nodes.len();
        self.wait_formed(n, procs).await
    }

    async fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        mettactl(&self.bins, &self.admin_path, args).await
    }

    /// `mettactl nodes -o json`.
    async fn nodes_json(&self) -> anyhow::Result<Vec<Value>> {
        let out = self.ctl(&["nodes", "-o", "json"]).await?;
        let v: Value = serde_json::from_str(&out).context("parsing nodes -o json")?;
        v.as_array()
            .cloned()
            .ok_or_else(|| anyhow!("nodes -o json is not a list: {out}"))
    }

    /// Waits until `n` nodes are listed, all up, one leader and `n - 1`
    /// followers (voters); records the leader and a follower.
    async fn wait_formed(&mut self, n: usize, procs: &mut Procs) -> anyhow::Result<()> {
        let what = format!("{n} Metta nodes up: 1 leader + {} followers", n - 1);
        let this = &*self;
        let nodes = wait_for(FORM_TIMEOUT, Duration::from_millis(100), &what, || {
            let alive = procs.check_alive();
            async move {
                alive?;
                let nodes = this.nodes_json().await?;
                let up = nodes.iter().filter(|x| x["status"] == "up").count();
                let leaders = nodes.iter().filter(|x| x["raft"] == "leader").count();
                let followers = nodes.iter().filter(|x| x["raft"] == "follower").count();
                Ok(
                    (nodes.len() == n && up == n && leaders == 1 && followers == n - 1)
                        .then_some(nodes),
                )
            }
        })
        .await?;
        let addr_of = |role: &str| {
            nodes
                .iter()
                .find(|x| x["raft"] == role)
                .and_then(|x| x["addr"].as_str())
                .map(str::to_string)
        };
        self.leader = addr_of("leader").ok_or_else(|| anyhow!("no leader address"))?;
        self.follower = addr_of("follower").unwrap_or_default();
        Ok(())
    }

    /// An API client of its own (its own UDP socket and QUIC connection)
    /// that talks only to `addr`.
    pub fn client(&self, addr: &str) -> anyhow::Result<Client> {
        let mut cfg = self.admin.clone();
        cfg.endpoints = vec![addr.to_string()];
        Ok(Client::new(&cfg)?)
    }

    /// Joins `n` more nodes (worker role, never started) through the leader
    /// with [`setup::join`] and returns each `Joined::elapsed`: token
    /// presented to certificate on disk. Run this after the write phases: the
    /// joined nodes stay in the registry as (unreachable) learners.
    pub async fn measure_joins(&self, n: usize) -> anyhow::Result<Vec<f64>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let uses = n.to_string();
        let token = self
            .ctl(&[
                "token", "create", "--role", "worker", "--ttl", "10m", "--uses", &uses,
            ])
            .await?;
        let mut out = Vec::with_capacity(n);
        for k in 1..=n {
            let joined = setup::join(&JoinOptions {
                addr: self.leader.clone(),
                token: token.trim().to_string(),
                data_dir: self.dir.join(format!("joiner-{k}")),
                listen: free_udp_addr()?,
                advertise: None,
                name: format!("joiner-{k}"),
                cert_lifetime_secs: 3600,
            })
            .await
            .with_context(|| format!("join {k} of {n}"))?;
            out.push(joined.elapsed.as_secs_f64() * 1000.0);
        }
        Ok(out)
    }
}

/// One durable registry write.
pub async fn put(c: &Client, key: String, value: Vec<u8>) -> anyhow::Result<()> {
    match c.call(ApiRequest::KvPut { key, value }).await? {
        Reply::Done => Ok(()),
        other => bail!("unexpected reply {other:?}"),
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", p.display()))
}
