//! A Metta cluster on 127.0.0.1 (one node, or three voters), set up the way
//! an operator would (`mettactl init --no-start`, a control token with 2
//! uses, two `mettactl join --no-start`, one `mettad` per node), its API
//! clients, and the domain calls the benchmarks make (vendor, image push,
//! run, ps, stop).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use metta_control::client::Client;
use metta_control::config::ClientConfig;
use metta_control::setup::{self, JoinOptions};
use metta_proto::{ApiRequest, Contract, DomainStatus, Reply, RunSpec};
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
    /// That follower's node name.
    pub follower_name: String,
    /// `join_ms` of the two setup joins (`mettactl join -o json`), made while
    /// the cluster had a single voter.
    pub setup_join_ms: Vec<f64>,
}

/// How to start a cluster.
#[derive(Debug, Clone, Copy)]
pub struct ClusterOpts {
    /// 1 (a single voter) or 3 (three voters).
    pub nodes: usize,
    /// Run `mettactl init` and every `mettad` under `taskset -c CPU`: the
    /// node records 1 CPU and runs 1 nucleus lane, on that CPU.
    pub pin_cpu: Option<u32>,
}

/// `mettactl --config ADMIN ARGS...` (under `taskset -c CPU` if `pin`), run
/// in the directory holding the admin config (`vendor keygen` writes there).
async fn mettactl(
    bins: &Bins,
    admin: &Path,
    pin: Option<u32>,
    args: &[&str],
) -> anyhow::Result<String> {
    let mut cmd = match pin {
        Some(cpu) => {
            let mut c = tokio::process::Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(&bins.mettactl);
            c
        }
        None => tokio::process::Command::new(&bins.mettactl),
    };
    if let Some(dir) = admin.parent() {
        cmd.current_dir(dir);
    }
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

fn spawn_mettad(
    bins: &Bins,
    procs: &mut Procs,
    n: &MettaNode,
    log: &str,
    pin: Option<u32>,
) -> anyhow::Result<()> {
    let mut cmd = match pin {
        // taskset execs mettad: same pid, and PDEATHSIG survives the exec.
        Some(cpu) => {
            let mut c = std::process::Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(&bins.mettad);
            c
        }
        None => std::process::Command::new(&bins.mettad),
    };
    cmd.arg("--data-dir").arg(&n.data).arg("--log").arg(log);
    procs.spawn(
        &format!("mettad {}", n.name),
        cmd,
        &n.data.join("mettad.log"),
    )?;
    Ok(())
}

impl MettaCluster {
    /// Creates and starts a 3-voter cluster in `dir`; returns once `nodes -o
    /// json` lists 3 nodes, all up, one leader and two followers.
    pub async fn start(
        dir: &Path,
        bins: &Bins,
        procs: &mut Procs,
        log: &str,
    ) -> anyhow::Result<MettaCluster> {
        let opts = ClusterOpts {
            nodes: 3,
            pin_cpu: None,
        };
        MettaCluster::start_with(dir, bins, procs, log, opts).await
    }

    /// Creates and starts a cluster of `opts.nodes` voters (1 or 3) in
    /// `dir`; returns once all are up, with one leader.
    pub async fn start_with(
        dir: &Path,
        bins: &Bins,
        procs: &mut Procs,
        log: &str,
        opts: ClusterOpts,
    ) -> anyhow::Result<MettaCluster> {
        if opts.nodes != 1 && opts.nodes != 3 {
            bail!("a benchmark cluster has 1 or 3 nodes, not {}", opts.nodes);
        }
        let pin = opts.pin_cpu;
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
            pin,
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
        spawn_mettad(bins, procs, &first, log, pin)?;
        let mut c = MettaCluster {
            bins: bins.clone(),
            dir: dir.to_path_buf(),
            admin: ClientConfig::load(&admin_path)?,
            admin_path,
            nodes: vec![first],
            leader: String::new(),
            follower: String::new(),
            follower_name: String::new(),
            setup_join_ms: Vec::new(),
        };
        c.wait_formed(1, procs).await?;
        if opts.nodes == 1 {
            return Ok(c);
        }

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
            spawn_mettad(bins, procs, n, log, pin)?;
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

    /// `mettactl ARGS...` with the admin config; its stdout.
    pub async fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        mettactl(&self.bins, &self.admin_path, None, args).await
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
        self.follower_name = nodes
            .iter()
            .find(|x| x["raft"] == "follower")
            .and_then(|x| x["name"].as_str())
            .unwrap_or_default()
            .to_string();
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

    /// Makes a vendor key, trusts it, and pushes each `(image name, wasm
    /// file)` signed with it (capability `log`).
    pub async fn push_images(&self, images: &[(&str, &Path)]) -> anyhow::Result<()> {
        self.ctl(&["vendor", "keygen", "bench"]).await?;
        self.ctl(&["vendor", "add", "bench", "bench.pub"]).await?;
        for (name, wasm) in images {
            self.ctl(&[
                "image",
                "push",
                path_str(wasm)?,
                "--key",
                "bench.key",
                "--vendor",
                "bench",
                "--name",
                name,
                "--cap",
                "log",
            ])
            .await
            .with_context(|| format!("pushing {}", wasm.display()))?;
        }
        Ok(())
    }
}

/// A contract of `slice_ms` per `period_ms`, 64 MiB.
pub fn contract(slice_ms: u64, period_ms: u64, extra: bool) -> Contract {
    Contract {
        period_ns: period_ms * 1_000_000,
        slice_ns: slice_ms * 1_000_000,
        extra,
        memory: 64 << 20,
    }
}

/// `ApiRequest::Run`; the reply comes once the domain's first activation
/// completed on its node. Returns its status as the reply gives it.
pub async fn run_domain(
    c: &Client,
    name: &str,
    image: &str,
    contract: Contract,
    node: Option<&str>,
) -> anyhow::Result<DomainStatus> {
    let spec = RunSpec {
        name: name.to_string(),
        image: image.to_string(),
        contract,
        node: node.map(str::to_string),
        labels: Vec::new(),
        accept_offer: false,
    };
    match c
        .call(ApiRequest::Run(spec))
        .await
        .with_context(|| format!("run {name}"))?
    {
        Reply::Domains(mut v) if v.len() == 1 => Ok(v.remove(0)),
        other => bail!("run {name}: unexpected reply {other:?}"),
    }
}

/// `ApiRequest::Stop`.
pub async fn stop_domain(c: &Client, name: &str) -> anyhow::Result<()> {
    c.call(ApiRequest::Stop {
        name: name.to_string(),
    })
    .await
    .with_context(|| format!("stop {name}"))?;
    Ok(())
}

/// `ApiRequest::Ps`: every domain with what its node reports.
pub async fn ps(c: &Client) -> anyhow::Result<Vec<DomainStatus>> {
    match c.call(ApiRequest::Ps).await.context("ps")? {
        Reply::Domains(v) => Ok(v),
        other => bail!("ps: unexpected reply {other:?}"),
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
