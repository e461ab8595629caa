//! `metta-bench`: registry write throughput and latency of a 3-voter Metta
//! cluster side by side with a 3-member etcd cluster, both on 127.0.0.1 with
//! fsync'd logs, and the latency of joining a node (the default mode);
//! domain start latency (`start-latency`); QoS crosstalk on a real `mettad`
//! vs Linux CFS bandwidth control (`qos`). See `docs/benchmarks.md`.

mod cfs;
mod etcd;
mod flood;
mod metta;
mod procs;
mod qos;
mod start;
mod stats;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::etcd::{EtcdCluster, EtcdConn};
use crate::metta::{Bins, MettaCluster};
use crate::procs::Procs;
use crate::stats::{PhaseStats, Spread};

/// Upper bound on the requests one client makes in one phase.
const MAX_OPS_PER_CLIENT: u64 = 10_000_000;
/// A single request taking longer than this counts as an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Metta benchmarks on 127.0.0.1. Without a subcommand: registry write
/// throughput and p50/p99 latency of a 3-voter Metta cluster against a
/// 3-member etcd cluster, plus join latency (the options below).
/// `start-latency` and `qos` have their own options (`--help` on each).
///
/// Each run starts both clusters from scratch in a temporary directory: Metta
/// with `mettactl init --no-start`, a control token with 2 uses, two
/// `mettactl join --no-start` and three `mettad`; etcd with three members
/// (`--initial-cluster`, default durability: the WAL is fsync'd before a write
/// is acknowledged). Metta's Raft log (redb) fsyncs every append. Then, for
/// each client count, each system in turn gets a warm-up and a timed phase of
/// puts: every client is a closed loop with its own connection (QUIC+mTLS for
/// Metta, HTTP/2 gRPC `KV.Put` for etcd) to the leader, writing its own keys
/// with a fixed value size; every request's latency is recorded. The same is
/// repeated through a follower (which forwards to the leader) unless
/// --no-follower. Finally --joins nodes join the 3-voter Metta cluster and
/// the time from presenting the token to the certificate being on disk is
/// recorded.
///
/// mettad and mettactl are not built here: build them first with
/// `cargo build --release -p metta-control -p metta-bench`; they are looked
/// up next to this binary unless --bin-dir says otherwise. etcd comes from
/// Debian's `etcd-server` package (`--etcd`). Everything started is stopped on
/// exit, on error and on Ctrl-C.
#[derive(Debug, Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    #[command(flatten)]
    writes: Args,
}

#[derive(Debug, clap::Subcommand)]
enum Mode {
    /// Domain start latency: `run` -> first activation, on loopback.
    StartLatency(start::StartArgs),
    /// QoS crosstalk on a real 1-lane mettad vs Linux CFS bandwidth control.
    Qos(qos::QosArgs),
    /// A real mettad's RSS and member latency under a bounded anonymous flood.
    Flood(flood::FloodArgs),
    /// (internal) A busy loop: a greedy Linux neighbour for `qos`.
    #[command(hide = true)]
    CfsBusy,
    /// (internal) The measured Linux process of `qos`.
    #[command(hide = true)]
    CfsRecord {
        /// How long to stay busy, s.
        #[arg(long)]
        secs: f64,
        /// Where to write what it recorded.
        #[arg(long)]
        out: PathBuf,
    },
}

/// The options every `mettad` benchmark (`qos`, `start-latency`) shares.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// Directory holding release `mettad` and `mettactl` (default: the
    /// directory of this binary).
    #[arg(long)]
    pub(crate) bin_dir: Option<PathBuf>,
    /// mettad's log filter.
    #[arg(long, default_value = "info")]
    pub(crate) mettad_log: String,
    /// Where to create the temporary directories (default: $TMPDIR or /tmp).
    #[arg(long)]
    pub(crate) work_dir: Option<PathBuf>,
    /// Keep the temporary directories.
    #[arg(long)]
    pub(crate) keep: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub(crate) save_json: Option<PathBuf>,
    /// Output format of the report (progress goes to stderr).
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub(crate) output: Output,
}

impl RunArgs {
    /// A fresh temporary directory for run `run` (of `runs`) in
    /// `--work-dir`, announced on stderr.
    pub(crate) fn run_dir(
        &self,
        prefix: &str,
        run: usize,
        runs: usize,
    ) -> anyhow::Result<tempfile::TempDir> {
        let parent = self.work_dir.clone().unwrap_or_else(std::env::temp_dir);
        let tmp = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&parent)
            .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
        eprintln!("run {}/{}: in {}", run + 1, runs, tmp.path().display());
        Ok(tmp)
    }
}

/// Options of the registry write benchmark (the default mode).
#[derive(Debug, clap::Args)]
struct Args {
    /// Length of each timed phase, e.g. 8s, 1m.
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    duration: Duration,
    /// Warm-up before each timed phase (requests made then are not counted).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Concurrent clients, comma-separated: one phase per count.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    clients: Vec<usize>,
    /// Size of every value written, in bytes.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Distinct keys each client cycles through (keys are never shared
    /// between clients).
    #[arg(long, default_value_t = 1000)]
    keys_per_client: u64,
    /// Repeat the whole benchmark (fresh clusters) this many times and report
    /// the median of the runs with their range.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Joins to time per run, against the 3-voter Metta cluster (0: none).
    #[arg(long, default_value_t = 5)]
    joins: usize,
    /// Skip the phases that send writes through a follower.
    #[arg(long)]
    no_follower: bool,
    /// Skip etcd (Metta only).
    #[arg(long)]
    no_etcd: bool,
    /// Directory holding release `mettad` and `mettactl` (default: the
    /// directory of this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The etcd server binary (a name is looked up on PATH).
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// mettad's log filter (its production default is `info`).
    #[arg(long, default_value = "info")]
    mettad_log: String,
    /// Where to create the temporary cluster directories (default: $TMPDIR
    /// or /tmp). Both systems' logs live on the same file system.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the temporary directories (data and logs) instead of removing them.
    #[arg(long)]
    keep: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    save_json: Option<PathBuf>,
    /// Output format of the final report (progress always goes to stderr).
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Human-readable table.
    Table,
    /// JSON, for scripts.
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 8s, 500ms, 1m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s or m)")),
    };
    if !(0.0..=3600.0).contains(&secs) {
        return Err(format!("duration {s:?} out of range (0 to 1 h)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The two systems.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
enum System {
    Metta,
    Etcd,
}

/// Which member the clients talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
enum Via {
    Leader,
    Follower,
}

/// One client's connection.
enum Conn {
    Metta(metta_control::client::Client),
    Etcd(EtcdConn),
}

impl Conn {
    async fn put(&mut self, key: String, value: Vec<u8>) -> anyhow::Result<()> {
        match self {
            Conn::Metta(c) => metta::put(c, key, value).await,
            Conn::Etcd(c) => c.put(key.into_bytes(), value).await,
        }
    }

    fn close(&self) {
        if let Conn::Metta(c) = self {
            c.close();
        }
    }
}

/// What one client did in one phase.
#[derive(Debug, Default)]
struct ClientResult {
    latencies_us: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// CPU use during a timed window.
#[derive(Debug, Clone, Copy, Serialize)]
struct CpuUse {
    /// CPU time of the 3 server processes under test per successful write (µs).
    server_us_per_op: f64,
    /// CPU time of this benchmark process (the clients) per successful write (µs).
    client_us_per_op: f64,
    /// Cores the 3 servers kept busy on average.
    server_cores: f64,
    /// Cores kept busy by processes this benchmark did not start (noise).
    other_cores: f64,
}

/// A CPU reading: the servers under test, everything we started, this
/// process, the whole machine.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    servers: f64,
    ours: f64,
    this: f64,
    machine: f64,
}

fn sample_cpu(servers: &[u32], ours: &[u32]) -> CpuSample {
    let sum = |p: &[u32]| p.iter().filter_map(|&p| procs::cpu_secs(p)).sum::<f64>();
    CpuSample {
        servers: sum(servers),
        ours: sum(ours),
        this: procs::cpu_secs(std::process::id()).unwrap_or(0.0),
        machine: procs::machine_busy_secs().unwrap_or(0.0),
    }
}

/// Runs one warm-up + timed phase with one task per connection. `servers`
/// are the pids of the system under test, `ours` every pid we started.
async fn run_phase(
    conns: Vec<Conn>,
    args: &Args,
    servers: Vec<u32>,
    ours: Vec<u32>,
) -> anyhow::Result<(PhaseStats, CpuUse)> {
    let value: Vec<u8> = (0..args.value_size)
        .map(|i| (i.wrapping_mul(31) % 251) as u8)
        .collect();
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let keys = args.keys_per_client.max(1);
    let mut tasks = Vec::with_capacity(conns.len());
    for (i, mut conn) in conns.into_iter().enumerate() {
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let mut r = ClientResult {
                latencies_us: Vec::with_capacity(4096),
                ..ClientResult::default()
            };
            for seq in 0..MAX_OPS_PER_CLIENT {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let key = format!("bench/c{i:03}/k{:06}", seq % keys);
                let res = tokio::time::timeout(CALL_TIMEOUT, conn.put(key, value.clone())).await;
                let us = t0.elapsed().as_micros() as u64;
                let res = res.map_err(|_| anyhow!("no answer within {CALL_TIMEOUT:?}"));
                match res.and_then(|r| r) {
                    Ok(()) if t0 >= measure_from => r.latencies_us.push(us),
                    Ok(()) => {}
                    Err(e) => {
                        if t0 >= measure_from {
                            r.errors += 1;
                        }
                        r.first_error.get_or_insert_with(|| format!("{e:#}"));
                        // A failing target answers fast: do not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            conn.close();
            r
        }));
    }
    let window = args.duration.as_secs_f64();
    let sampler = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        let a = sample_cpu(&servers, &ours);
        tokio::time::sleep_until(end.into()).await;
        let b = sample_cpu(&servers, &ours);
        (a, b)
    });
    let mut all = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    let deadline = end + CALL_TIMEOUT + Duration::from_secs(5);
    for t in tasks {
        let r = tokio::time::timeout_at(deadline.into(), t)
            .await
            .map_err(|_| anyhow!("a client did not finish in time"))?
            .context("client task")?;
        all.extend(r.latencies_us);
        errors += r.errors;
        if first_error.is_none() {
            first_error = r.first_error;
        }
    }
    if let Some(e) = first_error {
        eprintln!("    note: {errors} failed requests in the timed window; first error: {e}");
    }
    let stats = PhaseStats::from_latencies(all, errors, window);
    if stats.ops == 0 {
        bail!("no request succeeded in the timed window");
    }
    let (a, b) = sampler.await.context("CPU sampler")?;
    let ops = stats.ops as f64;
    let cpu = CpuUse {
        server_us_per_op: (b.servers - a.servers) / ops * 1e6,
        client_us_per_op: (b.this - a.this) / ops * 1e6,
        server_cores: (b.servers - a.servers) / window,
        other_cores: ((b.machine - a.machine) - (b.ours - a.ours) - (b.this - a.this)).max(0.0)
            / window,
    };
    Ok((stats, cpu))
}

/// One measured phase.
#[derive(Debug, Clone, Serialize)]
struct Row {
    system: System,
    via: Via,
    clients: usize,
    #[serde(flatten)]
    stats: PhaseStats,
    cpu: CpuUse,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
struct RunResult {
    rows: Vec<Row>,
    /// `mettactl join` times of the two setup joins (single-voter cluster).
    setup_join_ms: Vec<f64>,
    /// Join times against the 3-voter cluster.
    join_ms: Vec<f64>,
    etcd_version: Option<String>,
}

/// `mettad` and `mettactl` in `bin_dir`, or next to this binary.
fn find_bins(bin_dir: Option<&Path>) -> anyhow::Result<Bins> {
    let dir = match bin_dir {
        // Absolute: mettactl runs in the cluster's directory.
        Some(d) => std::path::absolute(d).with_context(|| format!("--bin-dir {}", d.display()))?,
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow!("this binary has no parent directory"))?
            .to_path_buf(),
    };
    let bins = Bins {
        mettad: dir.join("mettad"),
        mettactl: dir.join("mettactl"),
    };
    for b in [&bins.mettad, &bins.mettactl] {
        if !b.is_file() {
            bail!(
                "{} not found: build with `cargo build --release -p metta-control -p metta-bench` \
                 or pass --bin-dir",
                b.display()
            );
        }
    }
    Ok(bins)
}

fn find_on_path(p: &Path) -> anyhow::Result<PathBuf> {
    if p.components().count() > 1 {
        return Ok(p.to_path_buf());
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(p))
        .find(|c| c.is_file())
        .ok_or_else(|| {
            anyhow!(
                "{} not found on PATH: `apt-get install -y etcd-server etcd-client`, \
                 pass --etcd, or use --no-etcd",
                p.display()
            )
        })
}

async fn connect(
    system: System,
    via: Via,
    n: usize,
    metta: &MettaCluster,
    etcd: Option<&EtcdCluster>,
) -> anyhow::Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(match system {
            System::Metta => Conn::Metta(metta.client(match via {
                Via::Leader => &metta.leader,
                Via::Follower => &metta.follower,
            })?),
            System::Etcd => {
                let e = etcd.ok_or_else(|| anyhow!("etcd is not running"))?;
                Conn::Etcd(
                    EtcdConn::connect(match via {
                        Via::Leader => &e.leader,
                        Via::Follower => &e.follower,
                    })
                    .await?,
                )
            }
        });
    }
    Ok(conns)
}

async fn one_run(
    args: &Args,
    run: usize,
    bins: &Bins,
    etcd_bin: Option<&Path>,
) -> anyhow::Result<RunResult> {
    let parent = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("metta-bench-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
    // Declared after `tmp`, so dropped (processes stopped) before the
    // directory is removed.
    let mut procs = Procs::default();
    let root = tmp.path().to_path_buf();
    eprintln!(
        "run {}/{}: clusters in {}",
        run + 1,
        args.runs,
        root.display()
    );

    let t = Instant::now();
    std::fs::create_dir_all(root.join("metta"))?;
    let mut metta = MettaCluster::start(&root.join("metta"), bins, &mut procs, &args.mettad_log)
        .await
        .context("starting the Metta cluster")?;
    eprintln!(
        "  metta: 3 voters up in {:.1} s (leader {}, setup joins {:?} ms)",
        t.elapsed().as_secs_f64(),
        metta.leader,
        metta
            .setup_join_ms
            .iter()
            .map(|x| x.round())
            .collect::<Vec<_>>()
    );
    let mut etcd = None;
    if let Some(bin) = etcd_bin {
        let t = Instant::now();
        std::fs::create_dir_all(root.join("etcd"))?;
        let e = EtcdCluster::start(&root.join("etcd"), bin, &mut procs)
            .await
            .context("starting the etcd cluster")?;
        eprintln!(
            "  etcd: 3 members healthy in {:.1} s (leader {})",
            t.elapsed().as_secs_f64(),
            e.leader
        );
        etcd = Some(e);
    }

    let mut rows = Vec::new();
    let vias: &[Via] = if args.no_follower {
        &[Via::Leader]
    } else {
        &[Via::Leader, Via::Follower]
    };
    for (ci, &n) in args.clients.iter().enumerate() {
        for &via in vias {
            // Alternate which system goes first, so neither always runs on
            // the warmer (or more fragmented) disk.
            let mut order = vec![System::Metta];
            if etcd.is_some() {
                order.push(System::Etcd);
                if (run + ci) % 2 == 1 {
                    order.reverse();
                }
            }
            for system in order {
                procs.check_alive()?;
                // Leadership may have moved since the last phase.
                match system {
                    System::Metta => metta.refresh(&mut procs).await?,
                    System::Etcd => {
                        if let Some(e) = etcd.as_mut() {
                            e.refresh(&mut procs).await?;
                        }
                    }
                }
                let conns = connect(system, via, n, &metta, etcd.as_ref()).await?;
                let servers = procs.pids(match system {
                    System::Metta => "mettad",
                    System::Etcd => "etcd",
                });
                let (stats, cpu) = run_phase(conns, args, servers, procs.pids(""))
                    .await
                    .with_context(|| format!("{system:?} via {via:?}, {n} clients"))?;
                eprintln!(
                    "  {:<6} via {:<8} {:>3} clients: {:>8.0} ops/s  p50 {:>7.2} ms  \
                     p99 {:>7.2} ms  server cpu {:>5.0} µs/op  other load {:.2} cores{}",
                    format!("{system:?}").to_lowercase(),
                    format!("{via:?}").to_lowercase(),
                    n,
                    stats.ops_per_sec,
                    stats.p50_ms,
                    stats.p99_ms,
                    cpu.server_us_per_op,
                    cpu.other_cores,
                    if stats.errors > 0 {
                        format!("  ({} errors)", stats.errors)
                    } else {
                        String::new()
                    }
                );
                rows.push(Row {
                    system,
                    via,
                    clients: n,
                    stats,
                    cpu,
                });
            }
        }
    }

    procs.check_alive()?;
    metta.refresh(&mut procs).await?;
    let join_ms = metta
        .measure_joins(args.joins)
        .await
        .context("timing joins")?;
    if !join_ms.is_empty() {
        eprintln!(
            "  joins (3-voter cluster): {:?} ms",
            join_ms
                .iter()
                .map(|x| (x * 10.0).round() / 10.0)
                .collect::<Vec<_>>()
        );
    }
    procs.stop_all(Duration::from_secs(5));
    if args.keep {
        let kept = tmp.keep();
        eprintln!("  kept {}", kept.display());
    }
    Ok(RunResult {
        rows,
        setup_join_ms: metta.setup_join_ms.clone(),
        join_ms,
        etcd_version: etcd.map(|e| e.version),
    })
}

/// Median and range of each figure of one (system, via, clients) over runs.
#[derive(Debug, Clone, Serialize)]
struct Summary {
    system: System,
    via: Via,
    clients: usize,
    ops_per_sec: Spread,
    p50_ms: Spread,
    p99_ms: Spread,
    server_cpu_us_per_op: Spread,
    client_cpu_us_per_op: Spread,
    other_cores: Spread,
    errors: u64,
}

/// Metta over etcd, from the medians.
#[derive(Debug, Clone, Serialize)]
struct Ratio {
    via: Via,
    clients: usize,
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// The machine, for the reports.
#[derive(Debug, Clone, Serialize)]
struct Machine {
    cores: usize,
    cpu: String,
    kernel: String,
    work_dir: String,
}

#[derive(Debug, Clone, Serialize)]
struct Targets {
    /// Metta ops/s ≥ etcd ops/s at the largest client count (leader).
    throughput_at_max_clients: Option<bool>,
    /// Metta p99 ≤ etcd p99 at the largest client count (leader).
    p99_at_max_clients: Option<bool>,
    /// Median join < 100 ms.
    join_under_100ms: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
struct Report {
    runs: usize,
    duration_secs: f64,
    warmup_secs: f64,
    clients: Vec<usize>,
    value_size: usize,
    keys_per_client: u64,
    mettad_log: String,
    etcd_version: Option<String>,
    machine: Machine,
    summary: Vec<Summary>,
    ratios: Vec<Ratio>,
    join_ms: Option<Spread>,
    setup_join_ms: Option<Spread>,
    targets: Targets,
    per_run: Vec<RunResult>,
}

fn machine_info(work_dir: Option<&Path>) -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        work_dir: work_dir
            .map_or_else(std::env::temp_dir, Path::to_path_buf)
            .display()
            .to_string(),
    }
}

fn summarize(args: &Args, runs: Vec<RunResult>) -> Report {
    let mut groups: BTreeMap<(usize, Via, System), Vec<&Row>> = BTreeMap::new();
    for r in &runs {
        for row in &r.rows {
            groups
                .entry((row.clients, row.via, row.system))
                .or_default()
                .push(row);
        }
    }
    let spread = |rows: &[&Row], f: fn(&Row) -> f64| {
        Spread::of(&rows.iter().map(|r| f(r)).collect::<Vec<_>>()).unwrap_or(Spread {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        })
    };
    let summary: Vec<Summary> = groups
        .iter()
        .map(|((clients, via, system), rows)| Summary {
            system: *system,
            via: *via,
            clients: *clients,
            ops_per_sec: spread(rows, |r| r.stats.ops_per_sec),
            p50_ms: spread(rows, |r| r.stats.p50_ms),
            p99_ms: spread(rows, |r| r.stats.p99_ms),
            server_cpu_us_per_op: spread(rows, |r| r.cpu.server_us_per_op),
            client_cpu_us_per_op: spread(rows, |r| r.cpu.client_us_per_op),
            other_cores: spread(rows, |r| r.cpu.other_cores),
            errors: rows.iter().map(|r| r.stats.errors).sum(),
        })
        .collect();
    let find = |c: usize, v: Via, s: System| {
        summary
            .iter()
            .find(|x| x.clients == c && x.via == v && x.system == s)
    };
    let mut ratios = Vec::new();
    for s in &summary {
        if s.system != System::Metta {
            continue;
        }
        if let Some(e) = find(s.clients, s.via, System::Etcd) {
            ratios.push(Ratio {
                via: s.via,
                clients: s.clients,
                ops_per_sec: s.ops_per_sec.median / e.ops_per_sec.median,
                p50_ms: s.p50_ms.median / e.p50_ms.median,
                p99_ms: s.p99_ms.median / e.p99_ms.median,
            });
        }
    }
    let max_clients = args.clients.iter().copied().max().unwrap_or(0);
    let at_max = ratios
        .iter()
        .find(|r| r.clients == max_clients && r.via == Via::Leader);
    let all_joins: Vec<f64> = runs.iter().flat_map(|r| r.join_ms.clone()).collect();
    let setup_joins: Vec<f64> = runs.iter().flat_map(|r| r.setup_join_ms.clone()).collect();
    let join_ms = Spread::of(&all_joins);
    Report {
        runs: runs.len(),
        duration_secs: args.duration.as_secs_f64(),
        warmup_secs: args.warmup.as_secs_f64(),
        clients: args.clients.clone(),
        value_size: args.value_size,
        keys_per_client: args.keys_per_client,
        mettad_log: args.mettad_log.clone(),
        etcd_version: runs.iter().find_map(|r| r.etcd_version.clone()),
        machine: machine_info(args.work_dir.as_deref()),
        targets: Targets {
            throughput_at_max_clients: at_max.map(|r| r.ops_per_sec >= 1.0),
            p99_at_max_clients: at_max.map(|r| r.p99_ms <= 1.0),
            join_under_100ms: join_ms.map(|j| j.median < 100.0),
        },
        summary,
        ratios,
        join_ms,
        setup_join_ms: Spread::of(&setup_joins),
        per_run: runs,
    }
}

fn fmt_spread(s: &Spread, decimals: usize, runs: usize) -> String {
    if runs <= 1 {
        format!("{:.*}", decimals, s.median)
    } else {
        format!(
            "{:.*} ({:.*}–{:.*})",
            decimals, s.median, decimals, s.min, decimals, s.max
        )
    }
}

fn print_table(r: &Report) {
    let m = &r.machine;
    println!(
        "metta-bench: {} run(s), {} s warm-up + {} s timed per phase, {}-byte values, \
         {} keys per client; {} cores ({}), {}",
        r.runs,
        r.warmup_secs,
        r.duration_secs,
        r.value_size,
        r.keys_per_client,
        m.cores,
        m.cpu,
        r.etcd_version.as_deref().unwrap_or("etcd not run")
    );
    if r.runs > 1 {
        println!("figures: median of the runs (min–max)");
    }
    println!();
    println!(
        "{:<22} {:>7} {:>22} {:>24} {:>24} {:>10} {:>7}",
        "system", "clients", "ops/s", "p50 ms", "p99 ms", "cpu µs/op", "errors"
    );
    let mut last = None;
    for s in &r.summary {
        if last.is_some() && last != Some((s.clients, s.via)) {
            println!();
        }
        last = Some((s.clients, s.via));
        let name = format!(
            "{} ({})",
            format!("{:?}", s.system).to_lowercase(),
            format!("{:?}", s.via).to_lowercase()
        );
        println!(
            "{:<22} {:>7} {:>22} {:>24} {:>24} {:>10.0} {:>7}",
            name,
            s.clients,
            fmt_spread(&s.ops_per_sec, 0, r.runs),
            fmt_spread(&s.p50_ms, 2, r.runs),
            fmt_spread(&s.p99_ms, 2, r.runs),
            s.server_cpu_us_per_op.median,
            s.errors
        );
        if s.system == System::Etcd {
            if let Some(x) = r
                .ratios
                .iter()
                .find(|x| x.clients == s.clients && x.via == s.via)
            {
                println!(
                    "{:<22} {:>7} {:>22} {:>24} {:>24}",
                    "  metta/etcd",
                    s.clients,
                    format!("{:.2}x", x.ops_per_sec),
                    format!("{:.2}x", x.p50_ms),
                    format!("{:.2}x", x.p99_ms)
                );
            }
        }
    }
    println!();
    let other = r
        .summary
        .iter()
        .map(|s| s.other_cores.max)
        .fold(0.0, f64::max);
    println!(
        "cpu µs/op: CPU time of the 3 server processes per write (median of runs); \
         load from other processes during the phases: up to {other:.2} cores"
    );
    if let Some(j) = &r.join_ms {
        println!(
            "join (token presented -> certificate on disk), 3-voter cluster: median {:.1} ms \
             ({:.1}–{:.1}) over {} joins",
            j.median,
            j.min,
            j.max,
            r.per_run.iter().map(|x| x.join_ms.len()).sum::<usize>()
        );
    }
    if let Some(j) = &r.setup_join_ms {
        println!(
            "join via `mettactl join` during setup (1 voter): median {:.1} ms ({:.1}–{:.1})",
            j.median, j.min, j.max
        );
    }
    let verdict = |v: Option<bool>| match v {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    };
    let max_clients = r.clients.iter().max().copied().unwrap_or(0);
    println!();
    println!("targets:");
    println!(
        "  ops/s >= etcd at {max_clients} clients (leader): {}",
        verdict(r.targets.throughput_at_max_clients)
    );
    println!(
        "  p99 <= etcd at {max_clients} clients (leader):   {}",
        verdict(r.targets.p99_at_max_clients)
    );
    println!(
        "  join < 100 ms (median):            {}",
        verdict(r.targets.join_under_100ms)
    );
}

async fn bench(args: &Args) -> anyhow::Result<Report> {
    if args.clients.is_empty()
        || args.clients.contains(&0)
        || args.clients.iter().any(|&c| c > 1024)
    {
        bail!("--clients takes counts from 1 to 1024");
    }
    if args.runs == 0 || args.runs > 20 {
        bail!("--runs must be 1 to 20");
    }
    if args.duration.is_zero() {
        bail!("--duration must be positive");
    }
    if args.value_size == 0 || args.value_size > 1024 * 1024 {
        bail!("--value-size must be 1 byte to 1 MiB");
    }
    let bins = find_bins(args.bin_dir.as_deref())?;
    let etcd_bin = if args.no_etcd {
        None
    } else {
        Some(find_on_path(&args.etcd)?)
    };
    let mut runs = Vec::with_capacity(args.runs);
    for run in 0..args.runs {
        runs.push(
            one_run(args, run, &bins, etcd_bin.as_deref())
                .await
                .with_context(|| format!("run {}", run + 1))?,
        );
    }
    Ok(summarize(args, runs))
}

/// Runs `start-latency` or `qos` on a runtime, stopping everything on
/// Ctrl-C/SIGTERM (the future, and with it every `Procs` guard, is dropped).
fn other_mode(mode: Mode) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("metta-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let run = async {
            match mode {
                Mode::StartLatency(a) => start::main(a).await,
                Mode::Qos(a) => qos::main(a).await,
                Mode::Flood(a) => flood::main(a).await,
                _ => Err(anyhow!("not a benchmark mode")),
            }
        };
        tokio::select! {
            r = run => r,
            why = interrupted() => Err(anyhow!(why)),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("metta-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn interrupted() -> &'static str {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted (Ctrl-C)",
        _ = term => "terminated (SIGTERM)",
    }
}

/// Prints `report` as `output` asks and writes it as JSON to `save_json`.
fn emit<R: Serialize>(
    report: &R,
    output: Output,
    save_json: Option<&Path>,
    table: impl Fn(&R),
) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report).context("encoding the report")?;
    if let Some(p) = save_json {
        std::fs::write(p, text.clone() + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    match output {
        Output::Table => table(report),
        Output::Json => println!("{text}"),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = cli.writes;
    match cli.mode {
        None => {}
        Some(Mode::CfsBusy) => cfs::busy(),
        Some(Mode::CfsRecord { secs, out }) => {
            return match cfs::record(secs, &out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("metta-bench cfs-record: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(mode @ (Mode::StartLatency(_) | Mode::Qos(_) | Mode::Flood(_))) => {
            return other_mode(mode)
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("metta-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // When a signal wins the race, the benchmark future is dropped, and with
    // it every `Procs` guard: the clusters are stopped before we return.
    let result = rt.block_on(async {
        tokio::select! {
            r = bench(&args) => r,
            why = interrupted() => Err(anyhow!(why)),
        }
    });
    match result {
        Ok(report) => {
            if let Some(p) = &args.save_json {
                let text = serde_json::to_string_pretty(&report).unwrap_or_default();
                if let Err(e) = std::fs::write(p, text + "\n") {
                    eprintln!("metta-bench: writing {}: {e}", p.display());
                    return ExitCode::FAILURE;
                }
            }
            match args.output {
                Output::Table => print_table(&report),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("metta-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
