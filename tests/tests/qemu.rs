//! The native kernel image in QEMU (TCG), end to end: it boots and talks on
//! serial, tracks the exact pages a domain dirties, joins a real `mettad`
//! over DHCP and TLS and shows up in `mettactl nodes`, and runs domains the
//! control plane places on it — called, listed, logged and stopped with
//! `mettactl`, and exchanging messages with a domain on a hosted node.
//!
//! Each test keeps its files (serial logs, QEMU command lines, the mettad
//! data directory and log) in its own temporary directory, printed on failure
//! with the logs; `METTA_TEST_KEEP=1` keeps it. QEMU is required: without
//! `qemu-system-x86_64` the tests fail saying so.

use std::time::{Duration, Instant};

use metta_tests::build::{domain_wasm, kernel_version};
use metta_tests::control::{stderr, stdout, Control, CLUSTER, HOSTED_NODE};
use metta_tests::qemu::{stamped, text, Boot, Nic, Qemu, EXIT_SUCCESS};
use metta_tests::{wait_for, TestDir};
use serde_json::Value;

/// A plain boot, to the exit.
const BOOT_EXIT: Duration = Duration::from_secs(60);
/// A boot to "joined" (DHCP, a key from RDRAND, TLS under TCG).
const JOIN: Duration = Duration::from_secs(60);
/// Placement, a call, a log line reaching `mettactl` through the native link.
const CONTROL: Duration = Duration::from_secs(30);
/// RAM of the VMs that run domains: the scheduler keeps 32 MiB of a native
/// node for itself, so ~220 MiB is left for contracts (two of 32 MiB here).
const DOMAIN_VM_MIB: u32 = 256;

/// The value after `prefix` up to the next space, in the first serial line
/// whose text contains `prefix`.
fn field<'l>(lines: &'l [String], prefix: &str) -> Option<&'l str> {
    lines.iter().find_map(|l| {
        let t = text(l);
        let at = t.find(prefix)? + prefix.len();
        t[at..].split(' ').next()
    })
}

/// `[0, 5, 19]` → `[0, 5, 19]`; `None` unless the text is a list of numbers.
fn page_list(s: &str) -> Option<Vec<u32>> {
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    if inner.is_empty() {
        return Some(Vec::new());
    }
    inner.split(", ").map(|n| n.parse().ok()).collect()
}

/// The pages the kernel reports after `"dirty: <what>: "`: the list before
/// `" (want "` — what the page-table Dirty bits said, not what the kernel
/// expected.
fn reported_pages(lines: &[String], what: &str) -> Vec<u32> {
    let prefix = format!("dirty: {what}: ");
    let line = lines
        .iter()
        .map(|l| text(l))
        .find(|t| t.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}...` line on serial"));
    let list = line[prefix.len()..]
        .split(" (want ")
        .next()
        .unwrap_or_default();
    page_list(list).unwrap_or_else(|| panic!("not a page list: {line}"))
}

#[test]
fn boot_to_serial_banner() {
    let dir = TestDir::new("boot");
    let cmdline = "console=ttyS0 metta.test=boot";
    let mut vm = Qemu::boot(&dir, "boot", &Boot::new(cmdline));
    let code = vm.wait_exit(BOOT_EXIT);
    let took = vm.elapsed();
    let lines = vm.lines();

    assert_eq!(code, EXIT_SUCCESS, "QEMU's exit status is the success code");
    assert!(!lines.is_empty(), "nothing on serial");
    assert_eq!(
        text(&lines[0]),
        format!("metta-kernel {} booted", kernel_version()),
        "the banner comes first"
    );
    // Every line carries a timestamp, and time does not go backwards.
    let mut last = 0.0;
    for l in &lines {
        let (t, _) = stamped(l).unwrap_or_else(|| panic!("line without a timestamp: {l:?}"));
        assert!(t >= last, "timestamps go backwards at {l:?}");
        last = t;
    }
    assert!(
        lines
            .iter()
            .any(|l| text(l).starts_with("cmdline: \"")
                && text(l).ends_with(&format!(" {cmdline}\""))),
        "the command line is echoed"
    );
    let usable: u64 = field(&lines, "usable memory: ")
        .and_then(|v| v.parse().ok())
        .expect("a `usable memory: <bytes> bytes` line");
    assert!(
        (100 << 20..=128 << 20).contains(&usable),
        "usable memory {usable} bytes of the VM's 128 MiB"
    );
    assert!(!lines.iter().any(|l| text(l).contains("PANIC")), "no panic");
    assert_eq!(
        text(lines.last().unwrap()),
        "boot complete, exiting",
        "the boot runs to its end"
    );
    eprintln!("booted and exited in {took:.2?}");
}

#[test]
fn dirty_pages_exact() {
    let dir = TestDir::new("dirty");
    let mut vm = Qemu::boot(&dir, "dirty", &Boot::new("test=dirty"));
    let code = vm.wait_exit(BOOT_EXIT);
    let lines = vm.lines();
    assert_eq!(code, EXIT_SUCCESS, "the self-test passes");
    let texts: Vec<&str> = lines.iter().map(|l| text(l)).collect();

    // The domain's memory is a page-aligned stretch of 32 pages with an
    // unmapped guard page below.
    let mem = texts
        .iter()
        .find(|t| t.starts_with("dirty: memory at 0x"))
        .expect("the memory line");
    assert!(
        mem.ends_with("000, 131072 bytes (32 4 KiB pages); guard page below unmapped"),
        "{mem}"
    );
    // All pages are dirty right after spawn (the memory was zeroed).
    assert!(
        texts.contains(&"dirty: after spawn: all 32 pages (0..32) (the memory was just zeroed)"),
        "after spawn: every page"
    );
    // Writes at 0x0000, 0x5000, 0x5008 and 0x13000: pages 0, 5 and 19,
    // exactly (two writes in one page count once).
    assert_eq!(
        reported_pages(&lines, "activation 1 (0x0000, 0x5000, 0x5008, 0x13000)"),
        [0, 5, 19]
    );
    // Reading the bits clears them: the next activation's write is alone.
    assert_eq!(reported_pages(&lines, "activation 2 (0x2000)"), [2]);
    // Nothing ran: nothing is dirty.
    assert_eq!(reported_pages(&lines, "no activation"), [] as [u32; 0]);
    // memory.grow moves the memory; the tracker follows it, and every page
    // of the new stretch counts as written.
    let grow = texts
        .iter()
        .find(|t| t.starts_with("dirty: activation 3 (memory.grow 1): memory moved from 0x"))
        .expect("the memory.grow line");
    assert!(
        grow.ends_with(", 196608 bytes; all 48 pages (0..48)"),
        "{grow}"
    );
    assert_eq!(reported_pages(&lines, "activation 4 (0x21000)"), [33]);
    // And the writes landed where the pages say.
    assert!(
        texts.contains(
            &"dirty: values written: [11111111, 22222222, 33333333, 44444444, 55555555, 66666666]"
        ),
        "the values written"
    );
    assert!(texts.contains(&"dirty: ok"));
}

#[test]
fn boot_dhcp_and_join() {
    const NAME: &str = "native-1";
    const MIB: u64 = 128;
    // Acknowledged syncs, which the idle node's control plane holds for
    // 500 ms each: ~8 s of heartbeats, well past the liveness window.
    const HEARTBEATS: u32 = 16;
    let dir = TestDir::new("join");
    let ctl = Control::start(&dir);
    let token = ctl.worker_token();
    let secret = token.split('.').nth(2).expect("token secret").to_string();
    let boot = Boot::new(format!(
        "{} metta.heartbeats={HEARTBEATS}",
        ctl.join_cmdline(&token, NAME)
    ))
    .memory_mib(MIB as u32)
    .cpu("max")
    .nic(Nic::UserVirtio);
    let mut vm = Qemu::boot(&dir, NAME, &boot);

    // "joined cluster lab as node/2 in 1234 ms (certificate until 2026-...Z)"
    let joined = vm.wait_line("the joined line", JOIN, |l| {
        text(l).starts_with("joined cluster ")
    });
    let joined_at = Instant::now();
    let joined = text(&joined).to_string();
    let id: u64 = joined
        .strip_prefix(&format!("joined cluster {CLUSTER} as node/"))
        .and_then(|r| r.split(' ').next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("joined cluster {CLUSTER} as node/<id>: {joined}"));
    assert!(
        joined.contains(" ms (certificate until ") && joined.ends_with("Z)"),
        "{joined}"
    );
    let lines = vm.lines();
    let lease = field(&lines, "net: dhcp lease ").expect("a DHCP lease line");
    assert!(
        lease.starts_with("10.0.2.") && lease.ends_with("/24"),
        "lease {lease}"
    );
    let usable: u64 = field(&lines, "usable memory: ")
        .and_then(|v| v.parse().ok())
        .expect("a `usable memory: <bytes> bytes` line");

    // `mettactl nodes` lists it: a native worker, up, with the VM's CPU and
    // the memory the kernel found — close to QEMU's -m.
    let node = ctl.wait_node_up(NAME, CONTROL);
    assert_eq!(node["id"], id, "{node}");
    assert_eq!(node["kind"], "native", "{node}");
    assert_eq!(node["role"], "worker", "{node}");
    assert_eq!(
        node["raft"], "-",
        "native nodes are not Raft members: {node}"
    );
    assert_eq!(node["cpus"], 1, "{node}");
    let memory = node["memory_bytes"].as_u64().expect("memory_bytes");
    assert_eq!(memory, usable, "the memory the kernel reported: {node}");
    assert!(
        memory > (MIB - 8) << 20 && memory <= MIB << 20,
        "{memory} bytes is not close to the VM's {MIB} MiB"
    );

    // It heartbeats: acknowledged on serial, and while the VM runs the node
    // stays up past the liveness window (3 s) after the join.
    vm.wait_line("the first heartbeat acknowledged", CONTROL, |l| {
        text(l).starts_with("link: heartbeat 1 acknowledged (cpus 1, memory ")
    });
    wait_for(CONTROL, "the node up 4 s after its join", || {
        let n = ctl.node(NAME)?;
        assert_eq!(n["status"], "up", "went down while heartbeating: {n}");
        if joined_at.elapsed() < Duration::from_secs(4) {
            return None;
        }
        assert!(
            vm.poll_exit().is_none(),
            "the VM stopped heartbeating before the check"
        );
        Some(())
    });
    vm.wait_text("link: heartbeat 10 acknowledged", CONTROL);
    let done =
        format!("link: {HEARTBEATS} heartbeats acknowledged (metta.heartbeats={HEARTBEATS}); done");
    vm.wait_text(&done, CONTROL);
    assert_eq!(vm.wait_exit(CONTROL), EXIT_SUCCESS);

    // Gone quiet, it is down.
    wait_for(CONTROL, "the node down once the VM is gone", || {
        ctl.node(NAME).filter(|n| n["status"] == "down")
    });
    assert!(
        !vm.serial().contains(&secret),
        "the token's secret appears on serial"
    );
}

/// `mettactl run IMAGE --name NAME --node NODE --cpu 10ms/100ms --memory
/// 32MiB -o json`; checks it started there.
fn run_on(ctl: &Control, image: &str, name: &str, node: &str) -> Value {
    let started = ctl.json(&[
        "run",
        image,
        "--name",
        name,
        "--node",
        node,
        "--cpu",
        "10ms/100ms",
        "--memory",
        "32MiB",
    ]);
    assert_eq!(started["state"], "running", "{started}");
    assert_eq!(started["node_name"], node, "{started}");
    started
}

#[test]
fn counter_on_native_called_from_mettactl() {
    const NAME: &str = "native-1";
    let dir = TestDir::new("counter-native");
    let ctl = Control::start(&dir);
    let key = ctl.trust_vendor("acme");
    ctl.push_image(
        &key,
        "acme",
        &domain_wasm("counter"),
        "counter",
        &["log", "channel:/svc/counter"],
    );
    let mut vm = ctl.boot_native(NAME, DOMAIN_VM_MIB, "");
    ctl.wait_node_up(NAME, CONTROL);

    let t = Instant::now();
    run_on(&ctl, "counter", "c1", NAME);
    eprintln!("run on the native node took {:.2?}", t.elapsed());

    assert_eq!(ctl.ok(&["call", "c1", "incr"]).trim(), "1");
    assert_eq!(ctl.ok(&["call", "c1", "add", "41"]).trim(), "42");
    assert_eq!(ctl.ok(&["call", "c1", "get"]).trim(), "42");
    assert_eq!(
        ctl.ok(&["call", "c1", "frobnicate"]).trim(),
        "err unknown command"
    );

    let row = ctl.ps_row("c1").expect("c1 in `mettactl ps`");
    assert_eq!(row["node_name"], NAME, "{row}");
    assert_eq!(row["image"], "counter:0.1.0", "{row}");
    // Live: runnable, or waiting for its next message (not starting, not
    // failed), with figures from the native node's nucleus.
    assert!(
        row["state"] == "running" || row["state"] == "waiting",
        "{row}"
    );
    assert!(row["activations"].as_u64().unwrap_or(0) >= 1, "{row}");
    assert!(row["memory_bytes"].as_u64().unwrap_or(0) > 0, "{row}");
    assert_eq!(row["contract"]["slice_ns"], 10_000_000, "{row}");
    assert_eq!(row["contract"]["period_ns"], 100_000_000, "{row}");
    assert_eq!(row["contract"]["memory"], 32 << 20, "{row}");

    wait_for(CONTROL, "`counter: up` in `mettactl logs c1`", || {
        ctl.try_ok(&["logs", "c1"])?
            .contains("counter: up")
            .then_some(())
    });
    // The native machine's console agrees: the domain started there, with
    // its contract, and its log line is there too.
    vm.wait_text(
        "node: domain c1 started (epoch 1, 10000/100000 us, memory 32768 KiB",
        CONTROL,
    );
    vm.wait_text("c1: counter: up", CONTROL);

    ctl.ok(&["stop", "c1"]);
    wait_for(CONTROL, "c1 gone from `mettactl ps`", || {
        ctl.ps_row("c1").is_none().then_some(())
    });
    let o = ctl.ctl(&["call", "c1", "incr"]);
    assert!(
        !o.status.success() && stderr(&o).contains("not found: domain c1"),
        "a stopped domain is not called: {} {}",
        stdout(&o),
        stderr(&o)
    );
    vm.wait_text("node: domain c1 stopped", CONTROL);

    assert!(vm.poll_exit().is_none(), "the kernel is still running");
    assert!(!vm.serial().contains("PANIC"));
}

/// Ping on `ping_node`, pong on `pong_node`: `n` pings, every one answered
/// in order, none missing; both stopped at the end.
fn pingpong(ctl: &Control, ping_node: &str, pong_node: &str, n: u32, tag: &str) {
    let ping = format!("ping-{tag}");
    let pong = format!("pong-{tag}");
    run_on(ctl, "pingpong", &ping, ping_node);
    run_on(ctl, "pingpong", &pong, pong_node);
    assert_eq!(
        ctl.ps_row(&ping).expect("ping listed")["node_name"],
        ping_node
    );
    assert_eq!(
        ctl.ps_row(&pong).expect("pong listed")["node_name"],
        pong_node
    );

    let t = Instant::now();
    let start = format!("start {n}");
    assert_eq!(
        ctl.ok(&["call", &ping, "--channel", "/ctl", &start]).trim(),
        "ok"
    );
    let want = format!("ping sent {n} acked {n} target {n} gaps 0");
    let mut last = String::new();
    wait_for(
        Duration::from_secs(120),
        &format!("{n} pings from {ping_node} answered from {pong_node}"),
        || {
            last = ctl.ok(&["call", &ping, "--channel", "/ctl", "status"]);
            assert!(last.trim().ends_with(" gaps 0"), "{ping} saw a gap: {last}");
            (last.trim() == want).then_some(())
        },
    );
    eprintln!(
        "{n} pings {ping_node} -> {pong_node} answered in {:.2?}",
        t.elapsed()
    );
    assert_eq!(
        ctl.ok(&["call", &pong, "--channel", "/ctl", "status"])
            .trim(),
        format!("pong seen {n} gaps 0")
    );
    let done = format!("pingpong: done {n}");
    let logs = wait_for(
        CONTROL,
        &format!("`{done}` in `mettactl logs {ping}`"),
        || {
            let logs = ctl.try_ok(&["logs", &ping])?;
            logs.contains(&done).then_some(logs)
        },
    );
    assert!(logs.contains("pingpong: 100 ok"), "{logs}");
    assert!(!logs.contains("GAP"), "{logs}");
    let logs = ctl.ok(&["logs", &pong]);
    assert!(!logs.contains("GAP"), "{logs}");

    ctl.ok(&["stop", &ping]);
    ctl.ok(&["stop", &pong]);
    wait_for(CONTROL, "both stopped", || {
        (ctl.ps_row(&ping).is_none() && ctl.ps_row(&pong).is_none()).then_some(())
    });
}

#[test]
fn pingpong_split_native_hosted() {
    const NAME: &str = "native-1";
    const PINGS: u32 = 300;
    let dir = TestDir::new("pingpong-native");
    let ctl = Control::start(&dir);
    let key = ctl.trust_vendor("acme");
    ctl.push_image(
        &key,
        "acme",
        &domain_wasm("pingpong"),
        "pingpong",
        &[
            "log",
            "channel:/ctl",
            "channel:/svc/ping",
            "channel:/svc/pong",
        ],
    );
    let mut vm = ctl.boot_native(NAME, DOMAIN_VM_MIB, "");
    ctl.wait_node_up(NAME, CONTROL);

    // Native ping, hosted pong; then the other way round.
    pingpong(&ctl, NAME, HOSTED_NODE, PINGS, "a");
    vm.wait_text(&format!("ping-a: pingpong: done {PINGS}"), CONTROL);
    pingpong(&ctl, HOSTED_NODE, NAME, PINGS, "b");
    vm.wait_text(&format!("pong-b: pingpong: {PINGS} ok"), CONTROL);
    vm.wait_text("node: domain pong-b stopped", CONTROL);

    assert!(vm.poll_exit().is_none(), "the kernel is still running");
    assert!(!vm.serial().contains("PANIC"));
}
