//! A hosted control plane for native nodes to join: `mettactl init` makes a
//! cluster whose first node (`node-1`, control, hosted) listens on a free
//! 127.0.0.1 port, and `mettad` runs it until the handle is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::qemu::{Boot, Nic, Qemu};
use crate::{build, wait_for, TestDir};

/// The cluster's name.
pub const CLUSTER: &str = "lab";

/// The first node's name, as `mettactl init` names it.
pub const HOSTED_NODE: &str = "node-1";

/// A one-node cluster served by a real `mettad`. The process is killed on
/// drop; if the test is failing, the tail of its log is printed.
#[derive(Debug)]
pub struct Control<'a> {
    dir: &'a TestDir,
    port: u16,
    admin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    mettad: Option<Child>,
}

/// `stdout` of a finished command, lossily.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `stderr` of a finished command, lossily.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

impl<'a> Control<'a> {
    /// `mettactl init --cluster lab` on a free loopback port, then `mettad`,
    /// and waits (30 s) until the registry is bootstrapped (`token ls`
    /// answers).
    pub fn start(dir: &'a TestDir) -> Control<'a> {
        let bins = build::control_bins();
        let port = crate::free_loopback_port();
        let mut c = Control {
            dir,
            port,
            admin: dir.file("admin.conf"),
            data: dir.file("n1"),
            log: dir.file("mettad.log"),
            mettad: None,
        };
        let o = c.ctl(&[
            "init",
            "--cluster",
            CLUSTER,
            "--data-dir",
            c.data.to_str().expect("utf-8 path"),
            "--listen",
            &c.addr(),
            "--no-start",
        ]);
        assert!(o.status.success(), "mettactl init failed: {}", stderr(&o));
        let log = std::fs::File::create(&c.log).expect("create the mettad log");
        let child = Command::new(&bins.mettad)
            .arg("--data-dir")
            .arg(&c.data)
            .arg("--log")
            .arg("info,metta_control=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bins.mettad.display()));
        c.mettad = Some(child);
        wait_for(
            Duration::from_secs(30),
            "mettad to serve a bootstrapped registry",
            || {
                c.check_running();
                c.ctl(&["token", "ls"]).status.success().then_some(())
            },
        );
        c
    }

    /// Panics if `mettad` has exited.
    fn check_running(&mut self) {
        if let Some(child) = &mut self.mettad {
            if let Some(status) = child.try_wait().expect("wait for mettad") {
                self.mettad = None;
                panic!("mettad exited ({status})");
            }
        }
    }

    /// The node's address on the host, `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The same address as a QEMU guest on user-mode networking reaches it.
    pub fn guest_addr(&self) -> String {
        format!("10.0.2.2:{}", self.port)
    }

    /// The admin's client config.
    pub fn admin_config(&self) -> &Path {
        &self.admin
    }

    /// The test directory.
    pub fn dir(&self) -> &'a TestDir {
        self.dir
    }

    /// Runs `mettactl --config <admin> ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(&build::control_bins().mettactl)
            .arg("--config")
            .arg(&self.admin)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run mettactl")
    }

    /// Runs `mettactl ARGS`, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(
            o.status.success(),
            "mettactl {} failed ({}): {}",
            args.join(" "),
            o.status,
            stderr(&o)
        );
        stdout(&o)
    }

    /// Runs `mettactl ARGS`; stdout if it succeeded.
    pub fn try_ok(&self, args: &[&str]) -> Option<String> {
        let o = self.ctl(args);
        o.status.success().then(|| stdout(&o))
    }

    /// Runs `mettactl ARGS -o json` and parses stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.ok(&all);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("mettactl {}: not JSON ({e}): {out}", all.join(" ")))
    }

    /// A fresh single-use worker join token.
    pub fn worker_token(&self) -> String {
        let out = self.ok(&[
            "token", "create", "--role", "worker", "--uses", "1", "--ttl", "10m",
        ]);
        let token = out.trim().to_string();
        assert!(token.starts_with("metta1."), "not a join token: {out}");
        token
    }

    /// `mettactl nodes -o json`, if it answers.
    pub fn nodes(&self) -> Option<Vec<Value>> {
        let o = self.ctl(&["nodes", "-o", "json"]);
        if !o.status.success() {
            return None;
        }
        serde_json::from_str::<Value>(&stdout(&o))
            .ok()?
            .as_array()
            .cloned()
    }

    /// The node called `name` from `mettactl nodes -o json`.
    pub fn node(&self, name: &str) -> Option<Value> {
        self.nodes()?.into_iter().find(|n| n["name"] == name)
    }

    /// Waits until the node `name` is listed with status up; returns its row.
    pub fn wait_node_up(&self, name: &str, timeout: Duration) -> Value {
        wait_for(
            timeout,
            &format!("node {name} up in `mettactl nodes`"),
            || self.node(name).filter(|n| n["status"] == "up"),
        )
    }

    /// `mettactl ps -o json`.
    pub fn ps(&self) -> Vec<Value> {
        self.json(&["ps"]).as_array().cloned().unwrap_or_default()
    }

    /// The row of domain `name` in `mettactl ps -o json`.
    pub fn ps_row(&self, name: &str) -> Option<Value> {
        self.ps().into_iter().find(|d| d["name"] == name)
    }

    /// Creates vendor `name` (`vendor keygen` into the test directory) and
    /// makes the cluster trust it (`vendor add`); returns its secret key file.
    pub fn trust_vendor(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().to_str().expect("utf-8 path");
        self.ok(&["vendor", "keygen", name, "--out", dir]);
        let public = self.dir.file(&format!("{name}.pub"));
        self.ok(&["vendor", "add", name, public.to_str().expect("utf-8 path")]);
        self.dir.file(&format!("{name}.key"))
    }

    /// Signs `wasm` as `vendor` with `key`, declaring `caps`, and pushes it
    /// as image `name`.
    pub fn push_image(&self, key: &Path, vendor: &str, wasm: &Path, name: &str, caps: &[&str]) {
        let mut args = vec![
            "image",
            "push",
            wasm.to_str().expect("utf-8 path"),
            "--key",
            key.to_str().expect("utf-8 path"),
            "--vendor",
            vendor,
            "--name",
            name,
        ];
        for cap in caps {
            args.extend(["--cap", cap]);
        }
        self.ok(&args);
    }

    /// The kernel command line that joins this cluster with `token` as
    /// `name`.
    pub fn join_cmdline(&self, token: &str, name: &str) -> String {
        format!(
            "net=dhcp metta.ctl={} metta.token={token} metta.name={name}",
            self.guest_addr()
        )
    }

    /// Boots a native node called `name` with a fresh worker token (`-cpu
    /// max` for RDRAND, virtio-net on user networking, `memory_mib` of RAM,
    /// `extra` appended to the command line) and waits (60 s) until serial
    /// says it joined. The VM's files are named after the node.
    pub fn boot_native(&self, name: &str, memory_mib: u32, extra: &str) -> Qemu<'a> {
        let token = self.worker_token();
        let mut cmdline = self.join_cmdline(&token, name);
        if !extra.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        let boot = Boot::new(cmdline)
            .memory_mib(memory_mib)
            .cpu("max")
            .nic(Nic::UserVirtio);
        let mut vm = Qemu::boot(self.dir, name, &boot);
        vm.wait_line(
            &format!("`joined cluster {CLUSTER} as node/<id>`"),
            Duration::from_secs(60),
            |l| crate::qemu::text(l).starts_with(&format!("joined cluster {CLUSTER} as node/")),
        );
        vm
    }

    /// The mettad log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Control<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.mettad.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- mettad log ({}) ----\n{}---- end of mettad log ----",
                self.log.display(),
                crate::tail(&self.log(), 250)
            );
        }
    }
}
