//! A multi-process cluster harness: real `mettad` processes on loopback
//! addresses, driven with the real `mettactl`.
#![allow(dead_code)]

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const METTAD: &str = env!("CARGO_BIN_EXE_mettad");
pub const METTACTL: &str = env!("CARGO_BIN_EXE_mettactl");

/// Each test process picks its own loopback /24-ish octet so parallel test
/// binaries do not collide.
static NEXT_HOST: AtomicU8 = AtomicU8::new(1);

/// A free UDP port on `ip`.
pub fn free_addr(ip: &str) -> String {
    let s = UdpSocket::bind(format!("{ip}:0")).expect("bind probe socket");
    s.local_addr().expect("local addr").to_string()
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct NodeProc {
    pub data: PathBuf,
    pub addr: String,
    pub child: Option<Child>,
}

impl NodeProc {
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "node already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.join("mettad.log"))
            .expect("log file");
        let child = Command::new(METTAD)
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--log")
            .arg("info,metta_control=debug")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn mettad");
        self.child = Some(child);
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("mettad.log")).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub ip: String,
    pub admin: PathBuf,
    pub nodes: Vec<NodeProc>,
}

pub fn ctl(config: &Path, args: &[&str]) -> Output {
    Command::new(METTACTL)
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run mettactl")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::env::var_os("METTA_TEST_KEEP").is_some() {
            for n in &mut self.nodes {
                n.kill();
            }
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()).keep();
            eprintln!("kept test state in {}", kept.display());
        }
    }
}

impl Cluster {
    /// A new cluster with one control node (node/1), started.
    pub fn init(cert_lifetime: &str) -> Cluster {
        let host = NEXT_HOST.fetch_add(1, Ordering::SeqCst);
        let ip = format!("127.{}.{}.1", std::process::id() % 200 + 20, host);
        let dir = tempfile::tempdir().expect("tempdir");
        let admin = dir.path().join("admin.conf");
        let data = dir.path().join("n1");
        let addr = free_addr(&ip);
        let o = ctl(
            &admin,
            &[
                "init",
                "--cluster",
                "test",
                "--data-dir",
                data.to_str().unwrap(),
                "--listen",
                &addr,
                "--cert-lifetime",
                cert_lifetime,
                "--no-start",
            ],
        );
        assert!(o.status.success(), "init failed: {}", stderr(&o));
        let mut n = NodeProc {
            data,
            addr,
            child: None,
        };
        n.start();
        let c = Cluster {
            dir,
            ip,
            admin,
            nodes: vec![n],
        };
        c.wait_nodes_up(1);
        c
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl(&self.admin, args)
    }

    /// Runs mettactl and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(
            o.status.success(),
            "mettactl {args:?} failed: {}",
            stderr(&o)
        );
        stdout(&o)
    }

    pub fn token(&self, role: &str, uses: u32) -> String {
        self.ok(&[
            "token",
            "create",
            "--role",
            role,
            "--ttl",
            "10m",
            "--uses",
            &uses.to_string(),
        ])
        .trim()
        .to_string()
    }

    /// Joins a node (not started) and returns the `mettactl join` output.
    pub fn join_cmd(&self, token: &str, name: &str) -> (PathBuf, String, Output) {
        self.join_cmd_with(token, name, &[])
    }

    /// Like [`join_cmd`](Self::join_cmd) with extra `mettactl join` arguments.
    pub fn join_cmd_with(
        &self,
        token: &str,
        name: &str,
        extra: &[&str],
    ) -> (PathBuf, String, Output) {
        let data = self.dir.path().join(name);
        let addr = free_addr(&self.ip);
        let mut args = vec![
            "join",
            &self.nodes[0].addr,
            "--token",
            token,
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &addr,
            "--name",
            name,
            "--no-start",
        ];
        args.extend_from_slice(extra);
        let o = ctl(&self.admin, &args);
        (data, addr, o)
    }

    /// Joins and starts a node.
    pub fn join(&mut self, token: &str, name: &str) {
        let (data, addr, o) = self.join_cmd(token, name);
        assert!(o.status.success(), "join failed: {}", stderr(&o));
        let mut n = NodeProc {
            data,
            addr,
            child: None,
        };
        n.start();
        self.nodes.push(n);
        self.add_endpoints();
    }

    /// Lists every node's address in the admin config, so calls survive the
    /// loss of any one node.
    pub fn add_endpoints(&self) {
        let text = std::fs::read_to_string(&self.admin).unwrap();
        let mut v: toml::Value = toml::from_str(&text).unwrap();
        v["endpoints"] = toml::Value::Array(
            self.nodes
                .iter()
                .map(|n| toml::Value::String(n.addr.clone()))
                .collect(),
        );
        std::fs::write(&self.admin, toml::to_string(&v).unwrap()).unwrap();
    }

    pub fn nodes_json(&self) -> Option<Vec<Value>> {
        let o = self.ctl(&["nodes", "-o", "json"]);
        if !o.status.success() {
            return None;
        }
        serde_json::from_str::<Value>(&stdout(&o))
            .ok()?
            .as_array()
            .cloned()
    }

    /// Waits until `n` nodes are listed and up, with one leader.
    pub fn wait_nodes_up(&self, n: usize) -> Vec<Value> {
        wait_for(Duration::from_secs(30), &format!("{n} nodes up"), || {
            let nodes = self.nodes_json()?;
            let up = nodes.iter().filter(|x| x["status"] == "up").count();
            let leaders = nodes.iter().filter(|x| x["raft"] == "leader").count();
            (nodes.len() == n && up == n && leaders == 1).then_some(nodes)
        })
    }

    /// Waits until there are `voters` voters (leader + followers) among up nodes.
    pub fn wait_voters(&self, voters: usize) -> Vec<Value> {
        wait_for(Duration::from_secs(30), &format!("{voters} voters"), || {
            let nodes = self.nodes_json()?;
            let v = nodes
                .iter()
                .filter(|x| x["raft"] == "leader" || x["raft"] == "follower")
                .count();
            (v == voters).then_some(nodes)
        })
    }

    pub fn leader_index(&self) -> Option<usize> {
        let nodes = self.nodes_json()?;
        let leader = nodes.iter().find(|x| x["raft"] == "leader")?;
        let addr = leader["addr"].as_str()?;
        self.nodes.iter().position(|n| n.addr == addr)
    }
}

// ------------------------------------------------------------ images

/// An example domain from `domains/out` (built by `domains/build.sh`, which
/// the project's test command runs first). Outside CI a test skips when it
/// is missing; under CI (`CI` set) a missing file fails it.
pub fn built(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../domains/out/{name}.wasm"));
    if p.exists() {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{} is missing (scripts/test builds it first)", p.display());
    }
    eprintln!("skipping: {} not built (run domains/build.sh)", p.display());
    None
}

/// A vendor `acme` trusted by the cluster; returns its key file.
pub fn trust_acme(c: &Cluster) -> PathBuf {
    let dir = c.dir.path();
    c.ok(&["vendor", "keygen", "acme", "--out", dir.to_str().unwrap()]);
    let public = dir.join("acme.pub");
    c.ok(&["vendor", "add", "acme", public.to_str().unwrap()]);
    dir.join("acme.key")
}

/// Signs and pushes `wasm` as vendor acme with `caps`.
pub fn push(
    c: &Cluster,
    key: &Path,
    wasm: &Path,
    name: &str,
    caps: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "image",
        "push",
        wasm.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--vendor",
        "acme",
        "--name",
        name,
    ];
    for cap in caps {
        args.push("--cap");
        args.push(cap);
    }
    c.ctl(&args)
}

pub fn push_ok(c: &Cluster, key: &Path, wasm: &Path, name: &str, caps: &[&str]) {
    let o = push(c, key, wasm, name, caps);
    assert!(o.status.success(), "push {name}: {}", stderr(&o));
}
