//! Domains on real `mettad` processes, driven with the real `mettactl`:
//! signed images, `run` with placement and counter-offers, `call`, `logs`,
//! `ps`, `stop`, channels across two nodes, authority, failure isolation.
//!
//! The example domains come from `domains/build.sh` (the project's test
//! command runs it first). Outside CI a test skips when they are not built;
//! under CI (`CI` set) a missing file fails it.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn write_wat(dir: &Path, name: &str, wat: &str) -> PathBuf {
    let p = dir.join(format!("{name}.wasm"));
    std::fs::write(&p, wat::parse_str(wat).expect("valid WAT")).unwrap();
    p
}

fn ps(c: &Cluster) -> Vec<Value> {
    let out = c.ok(&["ps", "-o", "json"]);
    serde_json::from_str::<Value>(&out)
        .expect("ps json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn ps_row(c: &Cluster, name: &str) -> Option<Value> {
    ps(c).into_iter().find(|d| d["name"] == name)
}

#[test]
fn images_are_verified_before_they_are_stored() {
    let Some(counter) = built("counter") else {
        return;
    };
    let c = Cluster::init("1h");
    let key = trust_acme(&c);
    let dir = c.dir.path();

    // Signed by a vendor the cluster does not trust.
    c.ok(&[
        "vendor",
        "keygen",
        "mallory",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let o = c.ctl(&[
        "image",
        "push",
        counter.to_str().unwrap(),
        "--key",
        dir.join("mallory.key").to_str().unwrap(),
        "--vendor",
        "mallory",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("vendor \"mallory\" is not trusted"),
        "{}",
        stderr(&o)
    );

    // Signed by acme, then the module is altered.
    let wasm = dir.join("counter.wasm");
    std::fs::copy(&counter, &wasm).unwrap();
    c.ok(&[
        "image",
        "sign",
        wasm.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--vendor",
        "acme",
        "--cap",
        "channel:/svc/counter",
    ]);
    let mut bytes = std::fs::read(&wasm).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let tampered = dir.join("tampered.wasm");
    std::fs::write(&tampered, &bytes).unwrap();
    let manifest = dir.join("counter.wasm.manifest.json");
    let o = c.ctl(&[
        "image",
        "push",
        tampered.to_str().unwrap(),
        "--manifest",
        manifest.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("does not match the manifest"),
        "{}",
        stderr(&o)
    );

    // The manifest is altered (a capability added) after signing.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut m: Value = serde_json::from_str(&text).unwrap();
    m["capabilities"] = serde_json::json!(["channel:/"]);
    let forged = dir.join("forged.json");
    std::fs::write(&forged, m.to_string()).unwrap();
    let o = c.ctl(&[
        "image",
        "push",
        wasm.to_str().unwrap(),
        "--manifest",
        forged.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("signature does not verify"),
        "{}",
        stderr(&o)
    );

    // Unsigned.
    m["capabilities"] = serde_json::json!(["channel:/svc/counter"]);
    m["signature"] = Value::String(String::new());
    std::fs::write(&forged, m.to_string()).unwrap();
    let o = c.ctl(&[
        "image",
        "push",
        wasm.to_str().unwrap(),
        "--manifest",
        forged.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unsigned"), "{}", stderr(&o));

    // Properly signed, but not a domain: garbage, and an import the ABI lacks.
    let garbage = dir.join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm\x01\0\0\0garbage").unwrap();
    let o = push(&c, &key, &garbage, "garbage", &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a domain module"), "{}", stderr(&o));
    // A file that is not wasm at all: said in one line.
    let text = dir.join("notes.wasm");
    std::fs::write(&text, b"these are not the bytes you are looking for").unwrap();
    let o = push(&c, &key, &text, "notes", &[]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("not a wasm module"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    let bogus = write_wat(
        dir,
        "bogus",
        r#"(module (import "metta" "launch_missiles" (func))
            (memory (export "memory") 1)
            (func (export "metta_activate") (param i32) (result i32) i32.const 0))"#,
    );
    let o = push(&c, &key, &bogus, "bogus", &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("launch_missiles"),
        "the refusal names the import: {}",
        stderr(&o)
    );

    // Nothing of that was stored; the good image is.
    push_ok(&c, &key, &counter, "counter", &["channel:/svc/counter"]);
    let images: Value = serde_json::from_str(&c.ok(&["image", "ls", "-o", "json"])).unwrap();
    let names: Vec<&str> = images
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["counter"]);
    let blake3 = images[0]["module_blake3"].as_str().unwrap();
    assert_eq!(
        blake3,
        blake3::hash(&std::fs::read(&counter).unwrap())
            .to_hex()
            .as_str(),
        "images are stored under the blake3 of the module"
    );

    // Out-of-range contracts are refused before anything is placed.
    for cpu in ["200ms/100ms", "0ms/100ms", "1ms/0ms", "10ms"] {
        let o = c.ctl(&["run", "counter", "--name", "bad", "--cpu", cpu]);
        assert!(!o.status.success(), "--cpu {cpu} accepted");
    }
    let o = c.ctl(&["run", "counter", "--name", "bad", "--memory", "64GiB"]);
    assert!(!o.status.success());
    assert!(ps(&c).is_empty());
}

#[test]
fn run_call_logs_ps_and_stop_a_counter() {
    let Some(counter) = built("counter") else {
        return;
    };
    let c = Cluster::init("1h");
    let key = trust_acme(&c);
    push_ok(
        &c,
        &key,
        &counter,
        "counter",
        &["log", "channel:/svc/counter"],
    );

    let out = c.ok(&[
        "run",
        "counter",
        "--name",
        "c1",
        "--cpu",
        "10ms/100ms",
        "--memory",
        "32MiB",
        "-o",
        "json",
    ]);
    let started: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(started["state"], "running");
    assert_eq!(started["node_name"], "node-1");
    assert!(started["start_us"].as_u64().is_some(), "{started}");

    assert_eq!(c.ok(&["call", "c1", "incr"]).trim(), "1");
    assert_eq!(c.ok(&["call", "c1", "add", "41"]).trim(), "42");
    assert_eq!(c.ok(&["call", "c1", "get"]).trim(), "42");
    assert_eq!(
        c.ok(&["call", "c1", "frobnicate"]).trim(),
        "err unknown command"
    );
    assert!(c.ok(&["logs", "c1"]).contains("counter: up"));

    let row = ps_row(&c, "c1").expect("c1 listed");
    assert_eq!(row["image"], "counter:0.1.0");
    assert_eq!(row["contract"]["slice_ns"], 10_000_000);
    assert_eq!(row["contract"]["memory"], 32 << 20);
    assert_eq!(row["owner"], "user/admin");
    assert!(row["activations"].as_u64().unwrap() >= 5, "{row}");
    assert!(row["memory_bytes"].as_u64().unwrap() > 0, "{row}");
    assert_eq!(
        row["capabilities"],
        serde_json::json!(["log", "channel:/svc/counter"])
    );

    // Names are unique.
    let o = c.ctl(&["run", "counter", "--name", "c1"]);
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));

    c.ok(&["stop", "c1"]);
    assert!(ps(&c).is_empty());
    let o = c.ctl(&["call", "c1", "incr"]);
    assert!(
        stderr(&o).contains("not found: domain c1"),
        "{}",
        stderr(&o)
    );
    // The name is free again, and the new incarnation starts from zero.
    c.ok(&["run", "counter", "--name", "c1"]);
    assert_eq!(c.ok(&["call", "c1", "incr"]).trim(), "1");
    assert!(ps_row(&c, "c1").unwrap()["epoch"].as_u64().unwrap() >= 2);

    // `logs -f` follows: it prints what is there, then new lines as they come.
    let mut follow = std::process::Command::new(METTACTL)
        .arg("--config")
        .arg(&c.admin)
        .args(["logs", "-f", "c1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(follow.stdout.take().unwrap()));
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "counter: up");
    let _ = follow.kill();
    let _ = follow.wait();

    // After a restart of its node the domain runs again (from its image: its
    // memory is not persisted yet).
    let mut c = c;
    c.nodes[0].kill();
    c.nodes[0].start();
    c.wait_nodes_up(1);
    wait_for(Duration::from_secs(20), "c1 back after restart", || {
        let o = c.ctl(&["call", "c1", "get"]);
        (o.status.success() && stdout(&o).trim() == "0").then_some(())
    });
}

#[test]
fn pingpong_across_two_mettads() {
    let Some(pingpong) = built("pingpong") else {
        return;
    };
    let mut c = Cluster::init("1h");
    let t = c.token("worker", 1);
    c.join(&t, "node-2");
    c.wait_nodes_up(2);
    let key = trust_acme(&c);
    push_ok(
        &c,
        &key,
        &pingpong,
        "pingpong",
        &[
            "log",
            "channel:/ctl",
            "channel:/svc/ping",
            "channel:/svc/pong",
        ],
    );
    c.ok(&["run", "pingpong", "--name", "ping", "--node", "node-1"]);
    c.ok(&["run", "pingpong", "--name", "pong", "--node", "node-2"]);
    assert_eq!(ps_row(&c, "ping").unwrap()["node_name"], "node-1");
    assert_eq!(ps_row(&c, "pong").unwrap()["node_name"], "node-2");

    assert_eq!(
        c.ok(&["call", "ping", "--channel", "/ctl", "start", "500"])
            .trim(),
        "ok"
    );
    wait_for(Duration::from_secs(60), "500 pings answered", || {
        let s = c.ok(&["call", "ping", "--channel", "/ctl", "status"]);
        (s.trim() == "ping sent 500 acked 500 target 500 gaps 0").then_some(())
    });
    assert_eq!(
        c.ok(&["call", "pong", "--channel", "/ctl", "status"])
            .trim(),
        "pong seen 500 gaps 0"
    );
    let logs = c.ok(&["logs", "ping"]);
    assert!(logs.contains("pingpong: done 500"), "{logs}");
    assert!(!logs.contains("GAP"), "{logs}");
}

#[test]
fn an_unadmittable_contract_gets_a_counter_offer() {
    let Some(counter) = built("counter") else {
        return;
    };
    let c = Cluster::init("1h");
    let key = trust_acme(&c);
    push_ok(&c, &key, &counter, "counter", &["channel:/svc/counter"]);
    let nodes = c.nodes_json().unwrap();
    let cpus = nodes[0]["cpus"].as_u64().unwrap();
    // Fill every lane to 90 % (a lane admits 95 %).
    for i in 0..cpus {
        c.ok(&[
            "run",
            "counter",
            "--name",
            &format!("big{i}"),
            "--cpu",
            "90ms/100ms",
        ]);
    }
    let o = c.ctl(&["run", "counter", "--name", "more", "--cpu", "20ms/100ms"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("best available: 5ms/100ms")
            && stderr(&o).contains("on node-1")
            && stderr(&o).contains("rerun with --accept-offer"),
        "{}",
        stderr(&o)
    );
    let o = c.ctl(&[
        "run",
        "counter",
        "--name",
        "more",
        "--cpu",
        "20ms/100ms",
        "-o",
        "json",
    ]);
    let offer: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(offer["offer"]["slice_ns"], 5_000_000);
    assert_eq!(offer["offer"]["node_name"], "node-1");
    // Never a silent downgrade: nothing was placed.
    assert!(ps_row(&c, "more").is_none());

    c.ok(&[
        "run",
        "counter",
        "--name",
        "more",
        "--cpu",
        "20ms/100ms",
        "--accept-offer",
    ]);
    let row = ps_row(&c, "more").unwrap();
    assert_eq!(row["contract"]["slice_ns"], 5_000_000);
    assert_eq!(c.ok(&["call", "more", "incr"]).trim(), "1");

    // Labels: no node carries zone=attic until it is labelled.
    let o = c.ctl(&[
        "run",
        "counter",
        "--name",
        "l1",
        "--cpu",
        "1ms/100ms",
        "--label",
        "zone=attic",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("label"), "{}", stderr(&o));
    c.ok(&["nodes", "label", "node-1", "zone=attic"]);
    c.ok(&[
        "run",
        "counter",
        "--name",
        "l1",
        "--cpu",
        "1ms/100ms",
        "--label",
        "zone=attic",
    ]);
}

#[test]
fn a_domain_runs_with_what_both_user_and_vendor_allow() {
    let Some(counter) = built("counter") else {
        return;
    };
    let c = Cluster::init("1h");
    let key = trust_acme(&c);
    push_ok(
        &c,
        &key,
        &counter,
        "counter",
        &["log", "channel:/svc/counter"],
    );
    let bob = c.dir.path().join("bob.conf");
    c.ok(&["user", "add", "bob", "--out", bob.to_str().unwrap()]);
    c.ok(&["grant", "bob", "run", "--on", "/images/counter"]);
    c.ok(&["grant", "bob", "run", "--on", "/log"]);
    c.ok(&["grant", "bob", "run", "--on", "/channels/svc/other"]);
    let bob_ctl = |args: &[&str]| ctl(&bob, args);

    // Admin's domain is invisible and untouchable for bob.
    c.ok(&["run", "counter", "--name", "admins"]);
    let o = bob_ctl(&["call", "admins", "incr"]);
    assert!(
        stderr(&o).contains("permission denied: user/bob lacks write on /domains/admins"),
        "{}",
        stderr(&o)
    );

    let o = bob_ctl(&["run", "counter", "--name", "bobs", "-o", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let row: Value = serde_json::from_str(&stdout(&o)).unwrap();
    // log from both; bob's /svc/other and acme's /svc/counter are disjoint.
    assert_eq!(row["capabilities"], serde_json::json!(["log"]));
    let denied = wait_for(Duration::from_secs(10), "the denial logged", || {
        let o = bob_ctl(&["logs", "bobs"]);
        let logs = stdout(&o);
        logs.contains("denied: open /svc/counter").then_some(logs)
    });
    assert!(denied.contains("counter: up"), "{denied}");
    let o = bob_ctl(&["call", "bobs", "--channel", "/svc/counter", "incr"]);
    assert!(
        stderr(&o).contains("cannot open /svc/counter"),
        "{}",
        stderr(&o)
    );
    let rows: Vec<String> = serde_json::from_str::<Value>(&stdout(&bob_ctl(&["ps", "-o", "json"])))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(rows, ["bobs"], "bob sees only his own domains");

    // No run grant on the image, no domain.
    let Some(spin) = built("spin") else {
        return;
    };
    push_ok(&c, &key, &spin, "spin", &["log"]);
    let o = bob_ctl(&["run", "spin", "--name", "s"]);
    assert!(
        stderr(&o).contains("user/bob lacks run on /images/spin"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_failing_domain_is_reported_and_others_keep_running() {
    let Some(counter) = built("counter") else {
        return;
    };
    let c = Cluster::init("1h");
    let key = trust_acme(&c);
    let dir = c.dir.path();
    push_ok(&c, &key, &counter, "counter", &["channel:/svc/counter"]);
    // Traps on the first message; until then it waits.
    let trap = write_wat(
        dir,
        "trap",
        r#"(module (memory (export "memory") 1)
            (func (export "metta_activate") (param $r i32) (result i32)
              (if (i32.ne (local.get $r) (i32.const 0)) (then unreachable))
              i32.const 0))"#,
    );
    push_ok(&c, &key, &trap, "trap", &["channel:/svc/trap"]);
    // Traps at once.
    let dud = write_wat(
        dir,
        "dud",
        r#"(module (memory (export "memory") 1)
            (func (export "metta_activate") (param i32) (result i32) unreachable))"#,
    );
    push_ok(&c, &key, &dud, "dud", &[]);

    c.ok(&["run", "counter", "--name", "c1", "--cpu", "10ms/100ms"]);
    c.ok(&["run", "trap", "--name", "t1"]);
    assert_eq!(c.ok(&["call", "c1", "incr"]).trim(), "1");

    // A dud never starts: `run` says why and leaves nothing behind.
    let o = c.ctl(&["run", "dud", "--name", "d1"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("could not start") && stderr(&o).contains("unreachable"),
        "{}",
        stderr(&o)
    );
    assert!(ps_row(&c, "d1").is_none());

    let o = c.ctl(&["call", "t1", "boom", "--timeout", "2s"]);
    assert!(!o.status.success());
    let row = wait_for(Duration::from_secs(10), "t1 failed", || {
        ps_row(&c, "t1").filter(|r| r["state"].as_str().unwrap_or("").starts_with("failed"))
    });
    assert!(
        row["state"].as_str().unwrap().contains("unreachable"),
        "{row}"
    );
    // The neighbour is untouched.
    assert_eq!(c.ok(&["call", "c1", "incr"]).trim(), "2");
    assert_eq!(ps_row(&c, "c1").unwrap()["state"], "waiting");
    c.ok(&["stop", "t1"]);
}
