//! QoS crosstalk: CPU delivered to a 10 ms / 100 ms workload and its
//! activation latency, alone and next to greedy neighbours — on the hosted
//! nucleus ([`HostedNucleus`]) and, side by side, as Linux processes under a
//! CFS bandwidth limit (cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`,
//! the v1 form of cgroup v2 `cpu.max`).
//!
//! ```text
//! cargo run --release -p metta-control --example crosstalk -- \
//!     --wasm domains/out/spin.wasm [--secs 10] [--cpu 1] [--neighbours 8] [--fixed-rate]
//! ```
//!
//! Needs root (it creates a cgroup under `/sys/fs/cgroup/cpu`) and `taskset`.
//! Both sides run pinned to one CPU (`--cpu`, default 1), one after the
//! other; this process (the sampler) pins itself to CPU 0.
//!
//! **Nucleus side** (a child process, `taskset -c CPU`): a hosted nucleus
//! runs `spin` (greedy, always runnable) as `rt` with contract 10ms/100ms (no
//! extra) for `--secs`; then 8 more `spin` domains with contract
//! 1ms/100ms+extra (a small guaranteed slice plus all spare time) join for
//! another `--secs`. Per scheduler period of `rt` the driver records the wall
//! time its activations took and the first activation's delay from the
//! period start.
//!
//! **Linux side**: a busy-loop child (this binary in `--record` mode) in a
//! fresh cgroup with quota 10000 us / period 100000 us, `taskset -c CPU`,
//! alone for `--secs`; then 8 unconstrained busy-loop children (`--busy`,
//! same CPU, nice 0, in this process's cgroup) join for another `--secs`. The
//! recorder reads the clock in a tight loop and records the intervals in
//! which it ran (a gap > 20 us means it was off the CPU). Meanwhile this
//! process polls the cgroup's `cpu.stat` and timestamps each increment of
//! `nr_periods`, which gives the CFS period boundaries (when the quota is
//! refilled and a throttled task becomes runnable). Per CFS period: CPU it
//! ran, and the delay from the boundary to its first run in the period.
//!
//! `--fixed-rate` keeps the start-up fuel calibration for the whole run
//! instead of tracking it (see `metta_control::hosted`).
//!
//! The first 0.5 s of each half is skipped (start-up, neighbours starting).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metta_control::hosted::{HostedConfig, HostedNucleus, PeriodRecord};
use metta_nucleus::Caps;
use metta_proto::Contract;

const PERIOD: u64 = 100_000_000;
const SLICE: u64 = 10_000_000;
const WARMUP: u64 = 500_000_000;
/// A longer gap in the recorder's clock loop means it was off the CPU.
const GAP: u64 = 20_000;

struct Args {
    wasm: String,
    secs: u64,
    cpu: u32,
    neighbours: usize,
    fixed_rate: bool,
}

fn parse_args() -> (String, Args) {
    let mut mode = "main".to_string();
    let mut a = Args {
        wasm: "domains/out/spin.wasm".into(),
        secs: 10,
        cpu: 1,
        neighbours: 8,
        fixed_rate: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--wasm" => a.wasm = val(),
            "--secs" => a.secs = val().parse().expect("--secs N"),
            "--cpu" => a.cpu = val().parse().expect("--cpu N"),
            "--neighbours" => a.neighbours = val().parse().expect("--neighbours N"),
            "--fixed-rate" => a.fixed_rate = true,
            "--nucleus-side" | "--busy" | "--record" => mode = arg.clone(),
            other => panic!("unknown argument {other}"),
        }
    }
    (mode, a)
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
}

fn main() {
    let (mode, args) = parse_args();
    match mode.as_str() {
        "--busy" => busy(),
        "--record" => record(args.secs),
        "--nucleus-side" => nucleus_side(&args),
        _ => run(&args),
    }
}

/// A greedy Linux process.
fn busy() {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    loop {
        for _ in 0..1_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        std::hint::black_box(x);
    }
}

/// The measured Linux process: busy for 2 × `secs`, recording when it ran.
/// Prints `base <unix ns of t0>`, `half <ns>`, then `seg <start> <end>`
/// lines (ns since t0) and `sched <ns>` (its schedstat CPU time).
fn record(secs: u64) {
    let out = std::io::stdout();
    let t0 = Instant::now();
    let base = unix_ns();
    let sched0 = schedstat();
    writeln!(out.lock(), "base {base}").unwrap();
    out.lock().flush().unwrap();
    let half = secs * 1_000_000_000;
    let mut segs: Vec<(u64, u64)> = Vec::with_capacity(1 << 16);
    let (mut start, mut last) = (0u64, 0u64);
    let mut half_sent = false;
    loop {
        let t = t0.elapsed().as_nanos() as u64;
        if t - last > GAP {
            segs.push((start, last));
            start = t;
        }
        last = t;
        if !half_sent && t >= half {
            writeln!(out.lock(), "half {t}").unwrap();
            out.lock().flush().unwrap();
            half_sent = true;
        }
        if t >= 2 * half {
            break;
        }
    }
    segs.push((start, last));
    let mut o = out.lock();
    for (s, e) in segs {
        writeln!(o, "seg {s} {e}").unwrap();
    }
    writeln!(o, "sched {}", schedstat() - sched0).unwrap();
}

/// CPU time of this process's main thread, ns (`/proc/self/schedstat`).
fn schedstat() -> u64 {
    std::fs::read_to_string("/proc/self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The nucleus side, run pinned by the parent. Prints `rate`, `switch`,
/// `end`, `real_charged` and `p` (period record) lines.
fn nucleus_side(a: &Args) {
    let wasm = std::fs::read(&a.wasm).unwrap_or_else(|e| panic!("{}: {e}", a.wasm));
    let h = HostedNucleus::start(HostedConfig {
        period_records: 4096,
        recalibrate: !a.fixed_rate,
        ..HostedConfig::default()
    })
    .expect("start");
    let rate = h.fuel_rate();
    println!(
        "rate {} fuel/ms at start, {}",
        rate.fuel_for(1_000_000),
        if a.fixed_rate {
            "fixed"
        } else {
            "then tracked (EWMA)"
        }
    );
    let rt = Contract {
        period_ns: PERIOD,
        slice_ns: SLICE,
        extra: false,
        memory: 64 << 20,
    };
    h.spawn("rt", &wasm, rt, Caps::none()).expect("spawn rt");
    std::thread::sleep(Duration::from_secs(a.secs));
    println!("switch {}", h.now_ns());
    let greedy = Contract {
        period_ns: PERIOD,
        slice_ns: 1_000_000,
        extra: true,
        memory: 64 << 20,
    };
    for i in 0..a.neighbours {
        h.spawn(&format!("greedy{i}"), &wasm, greedy, Caps::none())
            .expect("spawn neighbour");
    }
    std::thread::sleep(Duration::from_secs(a.secs));
    println!("end {}", h.now_ns());
    for s in h.stats() {
        println!(
            "stat {} charged_ms {} real_ms {} guaranteed_ms {} extra_ms {} activations {}",
            s.name,
            s.cpu_ns_delivered / 1_000_000,
            s.cpu_ns_real / 1_000_000,
            s.guaranteed_ns / 1_000_000,
            s.extra_ns / 1_000_000,
            s.activations
        );
    }
    for p in h.periods("rt") {
        println!(
            "p {} {} {} {} {}",
            p.start_ns, p.latency_ns, p.cpu_ns_real, p.cpu_ns_charged, p.guaranteed_ns
        );
    }
    h.shutdown();
}

/// Per-period figures of one run.
#[derive(Debug, Default)]
struct Summary {
    periods: usize,
    /// Delivered, % of the slice, per period.
    delivered: Vec<f64>,
    /// Latency per period, ns.
    latency: Vec<u64>,
}

impl Summary {
    fn pct(v: &[f64], q: f64) -> f64 {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        if s.is_empty() {
            return f64::NAN;
        }
        s[((s.len() - 1) as f64 * q).round() as usize]
    }
    fn lat(&self, q: f64) -> f64 {
        let v: Vec<f64> = self.latency.iter().map(|&l| l as f64 / 1e6).collect();
        Summary::pct(&v, q)
    }
}

/// Periods of the nucleus's `rt` whose start is in `[from, to - PERIOD]`;
/// a period with no record got nothing (latency counted as a full period).
fn nucleus_summary(recs: &[PeriodRecord], from: u64, to: u64, charged: bool) -> Summary {
    let mut s = Summary::default();
    let Some(first) = recs.iter().find(|r| r.start_ns >= from) else {
        return s;
    };
    let mut t = first.start_ns;
    while t + PERIOD <= to {
        match recs.iter().find(|r| r.start_ns == t) {
            Some(r) => {
                let cpu = if charged {
                    r.cpu_ns_charged
                } else {
                    r.cpu_ns_real
                };
                s.delivered.push(cpu as f64 * 100.0 / SLICE as f64);
                s.latency.push(r.latency_ns);
            }
            None => {
                s.delivered.push(0.0);
                s.latency.push(PERIOD);
            }
        }
        s.periods += 1;
        t += PERIOD;
    }
    s
}

/// Periods `[b, b + PERIOD)` for the CFS boundaries `b` in `[from, to -
/// PERIOD]`: CPU the recorder ran in each, and its first run's delay.
fn linux_summary(segs: &[(u64, u64)], bounds: &[u64], from: u64, to: u64) -> Summary {
    let mut s = Summary::default();
    for &b in bounds.iter().filter(|&&b| b >= from && b + PERIOD <= to) {
        let e = b + PERIOD;
        let mut cpu = 0;
        let mut first = None;
        for &(ss, se) in segs {
            if se <= b || ss >= e {
                continue;
            }
            cpu += se.min(e) - ss.max(b);
            first.get_or_insert(ss.max(b) - b);
        }
        s.delivered.push(cpu as f64 * 100.0 / SLICE as f64);
        s.latency.push(first.unwrap_or(PERIOD));
        s.periods += 1;
    }
    s
}

fn taskset(cpu: u32) -> Command {
    let mut c = Command::new("taskset");
    c.arg("-c").arg(cpu.to_string());
    c
}

fn run(a: &Args) {
    let exe = std::env::current_exe().expect("current exe");
    // The sampler stays off the measured CPU.
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", "0", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "crosstalk: {} s alone + {} s with {} neighbours, each side pinned to CPU {}; loadavg before: {}",
        a.secs,
        a.secs,
        a.neighbours,
        a.cpu,
        load.trim()
    );

    // --- nucleus side ---
    let out = taskset(a.cpu)
        .arg(&exe)
        .args(["--nucleus-side", "--wasm", &a.wasm])
        .args(["--secs", &a.secs.to_string()])
        .args(["--neighbours", &a.neighbours.to_string()])
        .args(a.fixed_rate.then_some("--fixed-rate"))
        .output()
        .expect("run the nucleus side");
    assert!(
        out.status.success(),
        "nucleus side failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut switch, mut end) = (0u64, 0u64);
    let mut recs = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| f[i].parse::<u64>().unwrap_or(0);
        match f.first().copied() {
            Some("switch") => switch = num(1),
            Some("end") => end = num(1),
            Some("p") => recs.push(PeriodRecord {
                start_ns: num(1),
                latency_ns: num(2),
                activations: 0,
                cpu_ns_real: num(3),
                cpu_ns_charged: num(4),
                guaranteed_ns: num(5),
            }),
            Some("rate") | Some("stat") => println!("  nucleus: {line}"),
            _ => {}
        }
    }
    let n_alone = nucleus_summary(&recs, WARMUP, switch, false);
    let n_loaded = nucleus_summary(&recs, switch + WARMUP, end, false);
    let n_alone_c = nucleus_summary(&recs, WARMUP, switch, true);
    let n_loaded_c = nucleus_summary(&recs, switch + WARMUP, end, true);

    // --- Linux side ---
    let cg = format!("/sys/fs/cgroup/cpu/metta-crosstalk-{}", std::process::id());
    std::fs::create_dir(&cg).expect("create the cgroup (root, cgroup v1 cpu controller)");
    std::fs::write(format!("{cg}/cpu.cfs_period_us"), "100000").expect("cfs_period_us");
    std::fs::write(format!("{cg}/cpu.cfs_quota_us"), "10000").expect("cfs_quota_us");
    let mut rec = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {cg}/cgroup.procs && exec taskset -c {} {} --record --secs {}",
            a.cpu,
            exe.display(),
            a.secs
        ))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the recorder");
    let stdout = rec.stdout.take().expect("piped");
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    // Poll cpu.stat for period boundaries until the recorder is done.
    let stat = format!("{cg}/cpu.stat");
    let read_stat = || -> (u64, u64, u64) {
        let s = std::fs::read_to_string(&stat).unwrap_or_default();
        let get = |k: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(k)?.trim().parse().ok())
                .unwrap_or(0)
        };
        (
            get("nr_periods"),
            get("nr_throttled"),
            get("throttled_time"),
        )
    };
    let mut bounds_unix = Vec::new();
    let (mut last_periods, _, _) = read_stat();
    let stat0 = read_stat();
    let mut base = 0u64;
    let mut half = 0u64;
    let mut lines = Vec::new();
    let mut neighbours: Vec<Child> = Vec::new();
    let mut done = false;
    while !done {
        loop {
            match line_rx.try_recv() {
                Ok(l) => {
                    if let Some(v) = l.strip_prefix("base ") {
                        base = v.parse().unwrap_or(0);
                    } else if let Some(v) = l.strip_prefix("half ") {
                        half = v.parse().unwrap_or(0);
                        for _ in 0..a.neighbours {
                            neighbours.push(
                                taskset(a.cpu)
                                    .arg(&exe)
                                    .arg("--busy")
                                    .spawn()
                                    .expect("start a neighbour"),
                            );
                        }
                    } else {
                        lines.push(l);
                    }
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    done = true;
                    break;
                }
            }
        }
        let (p, _, _) = read_stat();
        if p != last_periods {
            bounds_unix.push(unix_ns());
            last_periods = p;
        }
        std::thread::sleep(Duration::from_micros(20));
    }
    let stat1 = read_stat();
    let _ = rec.wait();
    let _ = reader.join();
    for mut c in neighbours {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = std::fs::remove_dir(&cg);

    let mut segs = Vec::new();
    let mut sched = 0u64;
    for l in &lines {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["seg", s, e] => segs.push((s.parse().unwrap_or(0), e.parse().unwrap_or(0))),
            ["sched", v] => sched = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    let ran: u64 = segs.iter().map(|(s, e)| e - s).sum();
    // Boundaries in the recorder's time base.
    let bounds: Vec<u64> = bounds_unix
        .iter()
        .filter(|&&b| b >= base)
        .map(|&b| b - base)
        .collect();
    let total = 2 * a.secs * 1_000_000_000;
    let l_alone = linux_summary(&segs, &bounds, WARMUP, half);
    let l_loaded = linux_summary(&segs, &bounds, half + WARMUP, total);
    let (periods, throttled, throttled_ns) = (
        stat1.0 - stat0.0,
        stat1.1 - stat0.1,
        stat1.2.saturating_sub(stat0.2),
    );
    println!(
        "  linux: recorder ran {:.1} ms by its clock loop, {:.1} ms by schedstat; cgroup: {periods} periods, {throttled} throttled, {:.0} ms throttled; {} boundaries seen",
        ran as f64 / 1e6,
        sched as f64 / 1e6,
        throttled_ns as f64 / 1e6,
        bounds.len()
    );
    let cgline = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mine = cgline
        .lines()
        .find(|l| l.contains(":cpu,") || l.contains(":cpu:") || l.contains(",cpu"))
        .unwrap_or("?");
    println!("  linux: neighbours run in this process's cpu cgroup: {mine}");

    // --- table ---
    println!();
    println!(
        "contract 10ms/100ms; {} greedy neighbours; CPU {} for both sides",
        a.neighbours, a.cpu
    );
    println!(
        "{:<30} {:>10} {:>10} {:>10} {:>10}",
        "", "nucleus", "nucleus", "Linux CFS", "Linux CFS"
    );
    println!(
        "{:<30} {:>10} {:>10} {:>10} {:>10}",
        "",
        "alone",
        format!("+{}", a.neighbours),
        "alone",
        format!("+{}", a.neighbours)
    );
    let cols = [&n_alone, &n_loaded, &l_alone, &l_loaded];
    let row = |name: &str, f: &dyn Fn(&Summary) -> String| {
        print!("{name:<30}");
        for c in cols {
            print!(" {:>10}", f(c));
        }
        println!();
    };
    row("periods", &|s| s.periods.to_string());
    row("delivered % min (wall)", &|s| {
        format!("{:.1}", Summary::pct(&s.delivered, 0.0))
    });
    row("delivered % p5 (wall)", &|s| {
        format!("{:.1}", Summary::pct(&s.delivered, 0.05))
    });
    row("delivered % median (wall)", &|s| {
        format!("{:.1}", Summary::pct(&s.delivered, 0.5))
    });
    row("delivered % mean (wall)", &|s| {
        format!(
            "{:.1}",
            s.delivered.iter().sum::<f64>() / s.delivered.len().max(1) as f64
        )
    });
    row("delivered % max (wall)", &|s| {
        format!("{:.1}", Summary::pct(&s.delivered, 1.0))
    });
    row("latency median ms", &|s| format!("{:.3}", s.lat(0.5)));
    row("latency p99 ms", &|s| format!("{:.3}", s.lat(0.99)));
    row("latency max ms", &|s| format!("{:.3}", s.lat(1.0)));
    println!(
        "{:<30} {:>10} {:>10}",
        "nucleus charged % p5 / median",
        format!(
            "{:.1}/{:.1}",
            Summary::pct(&n_alone_c.delivered, 0.05),
            Summary::pct(&n_alone_c.delivered, 0.5)
        ),
        format!(
            "{:.1}/{:.1}",
            Summary::pct(&n_loaded_c.delivered, 0.05),
            Summary::pct(&n_loaded_c.delivered, 0.5)
        )
    );
    println!();
    let verdict = |s: &Summary| {
        let p5 = Summary::pct(&s.delivered, 0.05);
        let p99 = s.lat(0.99);
        format!(
            "delivered p5 {:.1} % {} 95 %, latency p99 {:.3} ms {} 100 ms",
            p5,
            if p5 >= 95.0 { ">=" } else { "<" },
            p99,
            if p99 <= 100.0 { "<=" } else { ">" }
        )
    };
    println!("targets (delivered >= 95 % of the contract, p99 latency <= one period):");
    println!("  nucleus alone:  {}", verdict(&n_alone));
    println!("  nucleus +{}:    {}", a.neighbours, verdict(&n_loaded));
    println!("  Linux alone:    {}", verdict(&l_alone));
    println!("  Linux +{}:      {}", a.neighbours, verdict(&l_loaded));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("loadavg after: {}", load.trim());
}
