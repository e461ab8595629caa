//! `metta-bench start-latency`: how long `run` takes, from the client's
//! request to the reply that the domain's first activation completed, on a
//! loopback cluster; with starting a Linux process (`true`) as the anchor.
//! See `docs/benchmarks.md`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Serialize;

use crate::metta::{self, ClusterOpts, MettaCluster};
use crate::procs::{cpu_secs, machine_busy_secs, quietly, Procs};
use crate::stats::{percentile, Spread};
use crate::{find_bins, machine_info, Machine};

/// Domain start latency: `run` → first activation, on 127.0.0.1.
///
/// Each run starts a 1-node cluster (and, unless --no-three, then a 3-node
/// cluster) from scratch in a temporary directory, pushes counter.wasm, opens
/// one API connection (`metta_control::client::Client`, QUIC + mTLS; the
/// handshake is made before timing) and makes `--n` runs of the image under
/// distinct names with contract --cpu, stopping each after (untimed). In the
/// 3-node cluster the client talks to the leader and the domain is pinned to
/// a follower. Per run: the client's round trip of `ApiRequest::Run` (the
/// reply comes once the first activation completed on the node) and the
/// node's `start_us` (spawn → end of first activation). For reference, `--n`
/// registry writes (`KvPut`, one Raft write each) on the same connection.
/// Side by side: `--n` times starting `true` and waiting for it
/// (`Command::status`).
#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// Timed `run`s per cluster (and `true` starts) per run.
    #[arg(long, default_value_t = 50)]
    n: usize,
    /// Untimed `run`s first (the first is reported as "cold").
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Repeat (fresh clusters) this many times; figures are the median of
    /// the runs with their range.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The image to run.
    #[arg(long, default_value = "domains/out/counter.wasm")]
    wasm: PathBuf,
    /// CPU contract of each domain, <slice>/<period>.
    #[arg(long, default_value = "1ms/100ms")]
    cpu: String,
    /// Noise control: before each cluster wait (up to 30 min) until the
    /// machine is below this many busy cores, and redo it (up to 5 times) if
    /// other processes used more than this during the timed runs.
    #[arg(long)]
    quiet: Option<f64>,
    /// Only the 1-node cluster.
    #[arg(long)]
    no_three: bool,
    #[command(flatten)]
    common: crate::RunArgs,
}

/// Percentiles of one series of one run, ms.
#[derive(Debug, Clone, Copy, Serialize)]
struct Pcts {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Pcts {
    fn of(us: &[u64]) -> Option<Pcts> {
        let mut v = us.to_vec();
        v.sort_unstable();
        let ms = |q| percentile(&v, q).map(|x| x as f64 / 1000.0);
        Some(Pcts {
            p50: ms(0.50)?,
            p90: ms(0.90)?,
            p99: ms(0.99)?,
            max: ms(1.0)?,
        })
    }
}

/// One cluster's figures in one run.
#[derive(Debug, Clone, Serialize)]
struct ClusterRun {
    /// `1-node` or `3-node (on a follower)`.
    setup: String,
    /// Client round trip of each timed `run`, µs.
    rtt_us: Vec<u64>,
    /// The node's spawn → first activation of each, µs.
    start_us: Vec<u64>,
    /// The first (cold) run: round trip and start_us, µs.
    cold_rtt_us: u64,
    cold_start_us: u64,
    /// Lanes the timed runs were placed on.
    lanes: Vec<u32>,
    /// Cores used by processes the benchmark did not start during the runs.
    other_cores: f64,
    /// Round trip of a registry write (`KvPut`, one Raft write) on the same
    /// connection, µs, for reference.
    put_us: Vec<u64>,
    rtt: Pcts,
    start: Pcts,
    put: Pcts,
}

#[derive(Debug, Clone, Serialize)]
struct RunResult {
    clusters: Vec<ClusterRun>,
    /// `true` start + wait, µs.
    process_us: Vec<u64>,
    process: Pcts,
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    what: String,
    p50_ms: Spread,
    p90_ms: Spread,
    p99_ms: Spread,
    /// p50 over the anchor's p50 (medians of the runs).
    vs_process: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Report {
    runs: usize,
    n: usize,
    cpu: String,
    wasm: String,
    machine: Machine,
    rows: Vec<Row>,
    per_run: Vec<RunResult>,
}

async fn measure_cluster(
    args: &StartArgs,
    dir: &Path,
    bins: &metta::Bins,
    wasm: &Path,
    nodes: usize,
) -> anyhow::Result<ClusterRun> {
    let (slice_ns, period_ns) =
        metta_proto::qos::parse_cpu(&args.cpu).map_err(|e| anyhow!("--cpu {}: {e}", args.cpu))?;
    let contract = metta_proto::Contract {
        period_ns,
        slice_ns,
        extra: false,
        memory: 64 << 20,
    };
    let mut procs = Procs::default();
    let t = Instant::now();
    let opts = ClusterOpts {
        nodes,
        pin_cpu: None,
    };
    let c = MettaCluster::start_with(dir, bins, &mut procs, &args.common.mettad_log, opts)
        .await
        .with_context(|| format!("starting a {nodes}-node cluster"))?;
    c.push_images(&[("counter", wasm)]).await?;
    let (setup, on) = if nodes == 1 {
        ("1-node".to_string(), None)
    } else {
        (
            format!("{nodes}-node, on a follower"),
            Some(c.follower_name.clone()),
        )
    };
    eprintln!(
        "  {setup}: cluster up in {:.1} s; {} + {} runs",
        t.elapsed().as_secs_f64(),
        args.warmup,
        args.n
    );
    let client = c.client(&c.leader)?;
    // Open the connection (QUIC + mTLS handshake) before timing.
    metta::ps(&client).await?;
    let mut r = ClusterRun {
        setup,
        rtt_us: Vec::with_capacity(args.n),
        start_us: Vec::with_capacity(args.n),
        cold_rtt_us: 0,
        cold_start_us: 0,
        lanes: Vec::with_capacity(args.n),
        other_cores: 0.0,
        put_us: Vec::with_capacity(args.n),
        put: Pcts {
            p50: 0.0,
            p90: 0.0,
            p99: 0.0,
            max: 0.0,
        },
        rtt: Pcts {
            p50: 0.0,
            p90: 0.0,
            p99: 0.0,
            max: 0.0,
        },
        start: Pcts {
            p50: 0.0,
            p90: 0.0,
            p99: 0.0,
            max: 0.0,
        },
    };
    let servers = procs.pids("mettad");
    let cpu = || {
        (
            machine_busy_secs().unwrap_or(0.0),
            servers.iter().filter_map(|&p| cpu_secs(p)).sum::<f64>(),
            cpu_secs(std::process::id()).unwrap_or(0.0),
        )
    };
    let mut cpu0 = cpu();
    let mut t_timed = Instant::now();
    for i in 0..args.warmup + args.n {
        if i == args.warmup {
            cpu0 = cpu();
            t_timed = Instant::now();
        }
        let name = format!("start-{i:03}");
        let t0 = Instant::now();
        let d = metta::run_domain(&client, &name, "counter", contract, on.as_deref()).await?;
        let rtt = t0.elapsed().as_micros() as u64;
        let start = d
            .runtime
            .as_ref()
            .and_then(|rt| rt.start_us)
            .ok_or_else(|| anyhow!("{name}: no start_us in the run reply"))?;
        if let Some(node) = &on {
            if &d.node_name != node {
                bail!("{name} placed on {}, not {node}", d.node_name);
            }
        }
        if i == 0 {
            r.cold_rtt_us = rtt;
            r.cold_start_us = start;
        }
        if i >= args.warmup {
            r.rtt_us.push(rtt);
            r.start_us.push(start);
            r.lanes.push(d.lane);
        }
        metta::stop_domain(&client, &name).await?;
    }
    let cpu1 = cpu();
    // Reference: one Raft write through the same connection.
    for i in 0..args.n {
        let t0 = Instant::now();
        metta::put(&client, format!("bench/start/k{i:03}"), vec![7; 256]).await?;
        r.put_us.push(t0.elapsed().as_micros() as u64);
    }
    r.other_cores = ((cpu1.0 - cpu0.0) - (cpu1.1 - cpu0.1) - (cpu1.2 - cpu0.2)).max(0.0)
        / t_timed.elapsed().as_secs_f64();
    client.close();
    procs.check_alive()?;
    procs.stop_all(Duration::from_secs(5));
    r.rtt = Pcts::of(&r.rtt_us).ok_or_else(|| anyhow!("no timed runs"))?;
    r.start = Pcts::of(&r.start_us).ok_or_else(|| anyhow!("no timed runs"))?;
    r.put = Pcts::of(&r.put_us).ok_or_else(|| anyhow!("no timed runs"))?;
    eprintln!(
        "  {}: run round trip p50 {:.2} p90 {:.2} p99 {:.2} ms; start_us p50 {:.2} p90 {:.2} \
         p99 {:.2} ms; cold {:.2} / {:.2} ms; KvPut p50 {:.2} ms",
        r.setup,
        r.rtt.p50,
        r.rtt.p90,
        r.rtt.p99,
        r.start.p50,
        r.start.p90,
        r.start.p99,
        r.cold_rtt_us as f64 / 1000.0,
        r.cold_start_us as f64 / 1000.0,
        r.put.p50
    );
    Ok(r)
}

/// Starts `true` and waits for it, `n` times; µs each.
fn process_anchor(n: usize) -> anyhow::Result<Vec<u64>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let s = std::process::Command::new("true")
            .status()
            .context("running `true`")?;
        out.push(t0.elapsed().as_micros() as u64);
        if !s.success() {
            bail!("`true` failed ({s})");
        }
    }
    Ok(out)
}

async fn one_run(
    args: &StartArgs,
    run: usize,
    bins: &metta::Bins,
    wasm: &Path,
) -> anyhow::Result<RunResult> {
    let tmp = args.common.run_dir("metta-bench-start-", run, args.runs)?;
    let mut clusters = Vec::new();
    let sizes: &[usize] = if args.no_three { &[1] } else { &[1, 3] };
    for &nodes in sizes {
        let c = quietly(
            args.quiet,
            |attempt| {
                let dir = tmp.path().join(format!("c{nodes}-{attempt}"));
                async move {
                    std::fs::create_dir_all(&dir)?;
                    measure_cluster(args, &dir, bins, wasm, nodes).await
                }
            },
            |c| c.other_cores,
        )
        .await?;
        clusters.push(c);
    }
    let process_us = tokio::task::block_in_place(|| process_anchor(args.n))?;
    let process = Pcts::of(&process_us).ok_or_else(|| anyhow!("no process starts"))?;
    eprintln!(
        "  process start (`true`): p50 {:.2} p90 {:.2} p99 {:.2} ms",
        process.p50, process.p90, process.p99
    );
    if args.common.keep {
        eprintln!("  kept {}", tmp.keep().display());
    }
    Ok(RunResult {
        clusters,
        process_us,
        process,
    })
}

fn summarize(args: &StartArgs, runs: Vec<RunResult>, machine: Machine) -> Report {
    let spread = |v: Vec<f64>| {
        Spread::of(&v).unwrap_or(Spread {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        })
    };
    let row = |what: String, p: Vec<Pcts>, anchor: f64| {
        let p50 = spread(p.iter().map(|x| x.p50).collect());
        Row {
            what,
            vs_process: p50.median / anchor,
            p50_ms: p50,
            p90_ms: spread(p.iter().map(|x| x.p90).collect()),
            p99_ms: spread(p.iter().map(|x| x.p99).collect()),
        }
    };
    let anchor = spread(runs.iter().map(|r| r.process.p50).collect()).median;
    let mut rows = Vec::new();
    let setups: Vec<String> = runs
        .first()
        .map(|r| r.clusters.iter().map(|c| c.setup.clone()).collect())
        .unwrap_or_default();
    for (i, setup) in setups.iter().enumerate() {
        let of = |f: fn(&ClusterRun) -> Pcts| -> Vec<Pcts> {
            runs.iter()
                .filter_map(|r| r.clusters.get(i))
                .map(f)
                .collect()
        };
        rows.push(row(
            format!("{setup}: run round trip"),
            of(|c| c.rtt),
            anchor,
        ));
        rows.push(row(
            format!("{setup}: start_us (node)"),
            of(|c| c.start),
            anchor,
        ));
        rows.push(row(
            format!("{setup}: KvPut round trip (ref.)"),
            of(|c| c.put),
            anchor,
        ));
    }
    rows.push(row(
        "Linux process start (`true`)".into(),
        runs.iter().map(|r| r.process).collect(),
        anchor,
    ));
    Report {
        runs: runs.len(),
        n: args.n,
        cpu: args.cpu.clone(),
        wasm: args.wasm.display().to_string(),
        machine,
        rows,
        per_run: runs,
    }
}

/// Distinct lanes, sorted.
fn lanes(l: &[u32]) -> Vec<u32> {
    let mut v = l.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

fn print_table(r: &Report) {
    let m = &r.machine;
    println!(
        "metta-bench start-latency: {} run(s) x {} runs of {} ({}), loopback; {} cores ({})",
        r.runs, r.n, r.wasm, r.cpu, m.cores, m.cpu
    );
    println!("figures: median of the runs (min–max), ms; nearest-rank percentiles per run");
    println!();
    let cell = |s: &Spread| {
        if r.runs <= 1 {
            format!("{:.2}", s.median)
        } else {
            format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max)
        }
    };
    println!(
        "{:<48} {:>20} {:>20} {:>20} {:>10}",
        "", "p50", "p90", "p99", "p50/true"
    );
    for row in &r.rows {
        println!(
            "{:<48} {:>20} {:>20} {:>20} {:>9.1}x",
            row.what,
            cell(&row.p50_ms),
            cell(&row.p90_ms),
            cell(&row.p99_ms),
            row.vs_process
        );
    }
    println!();
    for (i, run) in r.per_run.iter().enumerate() {
        let cold: Vec<String> = run
            .clusters
            .iter()
            .map(|c| {
                format!(
                    "{} {:.2} ms (start_us {:.2} ms), lanes {:?}, other load {:.2} cores",
                    c.setup,
                    c.cold_rtt_us as f64 / 1000.0,
                    c.cold_start_us as f64 / 1000.0,
                    lanes(&c.lanes),
                    c.other_cores
                )
            })
            .collect();
        println!(
            "run {}: first run (cold, untimed): {}",
            i + 1,
            cold.join("; ")
        );
    }
    let noise = r
        .per_run
        .iter()
        .flat_map(|x| x.clusters.iter().map(|c| c.other_cores))
        .fold(0.0, f64::max);
    if noise > 0.2 {
        println!(
            "warning: other processes used up to {noise:.2} cores meanwhile: the figures are disturbed"
        );
    }
    let p50 = r
        .rows
        .iter()
        .find(|x| x.what.starts_with("1-node: run"))
        .map(|x| x.p50_ms.median);
    println!();
    if let Some(p) = p50 {
        println!(
            "target run -> first activation < 20 ms (1-node, median): {} ({p:.2} ms)",
            if p < 20.0 { "met" } else { "NOT met" }
        );
    }
}

/// Runs the `start-latency` mode and prints its report.
pub async fn main(args: StartArgs) -> anyhow::Result<()> {
    if args.runs == 0 || args.runs > 20 {
        bail!("--runs must be 1 to 20");
    }
    if args.n == 0 || args.n > 10_000 {
        bail!("--n must be 1 to 10000");
    }
    let bins = find_bins(args.common.bin_dir.as_deref())?;
    let wasm = std::fs::canonicalize(&args.wasm).with_context(|| {
        format!(
            "{} (build the domains with domains/build.sh)",
            args.wasm.display()
        )
    })?;
    let machine = machine_info(args.common.work_dir.as_deref());
    let mut runs = Vec::with_capacity(args.runs);
    for run in 0..args.runs {
        runs.push(
            one_run(&args, run, &bins, &wasm)
                .await
                .with_context(|| format!("run {}", run + 1))?,
        );
    }
    let report = summarize(&args, runs, machine);
    crate::emit(
        &report,
        args.common.output,
        args.common.save_json.as_deref(),
        print_table,
    )
}
