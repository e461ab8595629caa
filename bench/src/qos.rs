//! `metta-bench qos`: QoS crosstalk on a real `mettad`, side by side with
//! Linux CFS bandwidth control. See `docs/benchmarks.md`.
//!
//! Each run starts a 1-node cluster whose `mettad` (and the `mettactl init`
//! that records its resources) runs under `taskset -c CPU`, so the node has
//! one nucleus lane, on that CPU. This process pins itself to another CPU.
//!
//! - workload A: `spin` as `rt-a` with contract 10ms/100ms (no extra), alone;
//! - workload B: 8 `spin` neighbours with 1ms/100ms + extra (greedy), then
//!   `rt-b` with 10ms/100ms;
//!
//! each for `--duration`, then until the measured domain has at least
//! `--min-periods` complete periods; its `delivered_p5_ppm`, `real_p5_ppm`
//! and `latency_p99_us` are read once, at the end, from `mettactl -o json ps`.
//! Then the same two workloads as Linux processes on the same CPU (see
//! [`crate::cfs`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use serde_json::Value;

use crate::cfs::{self, LinuxRun};
use crate::metta::{self, contract, ClusterOpts, MettaCluster};
use crate::procs::{cpu_secs, machine_busy_secs, pin_self, quietly, Procs};
use crate::stats::Spread;
use crate::{find_bins, machine_info, parse_duration, Machine};

/// QoS crosstalk on a real mettad vs Linux CFS bandwidth control.
///
/// A 1-node cluster with one nucleus lane (mettad under `taskset -c CPU`)
/// runs `spin` with contract 10ms/100ms alone (workload A), then a fresh
/// `spin` with 10ms/100ms next to 8 `spin` neighbours with 1ms/100ms+extra
/// (workload B). For the measured domain it reads `delivered_p5_ppm`,
/// `real_p5_ppm` and `latency_p99_us` from `mettactl -o json ps` at the end.
/// Side by side, the same workloads as Linux processes pinned to the same
/// CPU: a busy loop in a cgroup limited to 10 ms per 100 ms (CFS bandwidth
/// control) alone, then with 8 unconstrained busy loops. Needs root (it
/// creates a cgroup) and `taskset`.
#[derive(Debug, clap::Args)]
pub struct QosArgs {
    /// How long each workload runs (per side), e.g. 20s.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    duration: Duration,
    /// Repeat everything (fresh node each time) this many times; figures are
    /// the median of the runs with their range.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Greedy neighbours in workload B.
    #[arg(long, default_value_t = 8)]
    neighbours: usize,
    /// The CPU the node (and the Linux workloads) run on.
    #[arg(long, default_value_t = 1)]
    cpu: u32,
    /// The CPU this process (the sampler, the API client) runs on.
    #[arg(long, default_value_t = 0)]
    sampler_cpu: u32,
    /// Wait until the measured domain has this many complete periods.
    #[arg(long, default_value_t = 150)]
    min_periods: u32,
    /// The spin domain.
    #[arg(long, default_value = "domains/out/spin.wasm")]
    wasm: PathBuf,
    /// Noise control: before each side of each run wait (up to 30 min) until
    /// the machine is below this many busy cores, and redo a side (up to 5
    /// times) if other processes used more than this meanwhile.
    #[arg(long)]
    quiet: Option<f64>,
    /// Skip the Linux side.
    #[arg(long)]
    no_linux: bool,
    /// Skip the mettad side.
    #[arg(long)]
    no_metta: bool,
    #[command(flatten)]
    common: crate::RunArgs,
}

/// What `ps` reports for the measured domain, converted to % and ms.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MettaFigures {
    /// Complete periods behind the figures.
    pub periods: u64,
    /// `delivered_p5_ppm` (fuel-charged CPU) as % of the slice.
    pub delivered_p5_pct: f64,
    /// `real_p5_ppm` (wall time of its activations) as % of the slice.
    pub real_p5_pct: f64,
    /// `latency_p99_us` in ms.
    pub latency_p99_ms: f64,
    /// Cores the neighbours were charged for together (fuel), B only.
    pub neighbours_cores: f64,
    /// Cores mettad used (all its threads) while the workload ran.
    pub mettad_cores: f64,
    /// Cores used meanwhile by processes the benchmark did not start (noise).
    pub other_cores: f64,
}

/// CPU seconds so far: the machine's busy time, mettad's, this process's.
fn cpu_now(mettad: u32) -> (f64, f64, f64) {
    (
        machine_busy_secs().unwrap_or(0.0),
        cpu_secs(mettad).unwrap_or(0.0),
        cpu_secs(std::process::id()).unwrap_or(0.0),
    )
}

/// One run, both sides.
#[derive(Debug, Clone, Serialize)]
struct RunResult {
    metta_alone: Option<MettaFigures>,
    metta_loaded: Option<MettaFigures>,
    /// The lane's fuel rate as mettad logged it at start.
    fuel_rate: Option<String>,
    linux: Option<LinuxRun>,
}

/// Medians (and ranges) over runs of one column.
#[derive(Debug, Clone, Serialize)]
struct Column {
    name: &'static str,
    periods: Option<Spread>,
    delivered_charged_p5_pct: Option<Spread>,
    delivered_p5_pct: Option<Spread>,
    delivered_median_pct: Option<Spread>,
    latency_p99_ms: Option<Spread>,
    neighbours_cores: Option<Spread>,
    /// mettad's own CPU (all threads), cores.
    mettad_cores: Option<Spread>,
    /// Other processes' CPU meanwhile, cores (noise).
    other_cores: Option<Spread>,
}

#[derive(Debug, Clone, Serialize)]
struct Report {
    runs: usize,
    duration_secs: f64,
    neighbours: usize,
    cpu: u32,
    machine: Machine,
    columns: Vec<Column>,
    per_run: Vec<RunResult>,
}

fn pct(ppm: Option<u64>) -> f64 {
    ppm.map_or(f64::NAN, |v| v as f64 / 10_000.0)
}

/// The measured domain's row in `mettactl -o json ps`.
async fn ps_row(c: &MettaCluster, name: &str) -> anyhow::Result<Value> {
    let out = c.ctl(&["-o", "json", "ps"]).await?;
    let v: Value = serde_json::from_str(&out).context("parsing ps -o json")?;
    v.as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == name))
        .cloned()
        .ok_or_else(|| anyhow!("{name} not in ps -o json"))
}

/// Lets `name` run for `secs`, then until it has `min_periods`; returns its
/// `ps -o json` row, the cores mettad used meanwhile, and the cores other
/// processes used.
async fn measure(
    c: &MettaCluster,
    client: &metta_control::client::Client,
    name: &str,
    args: &QosArgs,
    mettad: u32,
) -> anyhow::Result<(Value, f64, f64)> {
    let t0 = Instant::now();
    let (m0, d0, s0) = cpu_now(mettad);
    tokio::time::sleep(args.duration).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ps = metta::ps(client).await?;
        let d = ps
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| anyhow!("{name} is gone"))?;
        let rt = d
            .runtime
            .as_ref()
            .ok_or_else(|| anyhow!("{name}: its node did not answer"))?;
        if rt.state.starts_with("failed") {
            bail!("{name}: {}", rt.state);
        }
        if rt.periods >= args.min_periods {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{name} has {} periods, wanted {}",
                rt.periods,
                args.min_periods
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (m1, d1, s1) = cpu_now(mettad);
    let wall = t0.elapsed().as_secs_f64();
    let row = ps_row(c, name).await?;
    let other = ((m1 - m0) - (d1 - d0) - (s1 - s0)).max(0.0) / wall;
    Ok((row, (d1 - d0) / wall, other))
}

fn figures(
    row: &Value,
    neighbours_cores: f64,
    mettad_cores: f64,
    other_cores: f64,
) -> MettaFigures {
    MettaFigures {
        periods: row["periods"].as_u64().unwrap_or(0),
        delivered_p5_pct: pct(row["delivered_p5_ppm"].as_u64()),
        real_p5_pct: pct(row["real_p5_ppm"].as_u64()),
        latency_p99_ms: row["latency_p99_us"]
            .as_u64()
            .map_or(f64::NAN, |us| us as f64 / 1000.0),
        neighbours_cores,
        mettad_cores,
        other_cores,
    }
}

/// `FuelRate { fuel: 1769103, per_ns: 1000000 }` (mettad's log) as
/// `1.769 fuel/ns`.
fn fuel_per_ns(logged: &str) -> Option<String> {
    let num = |key: &str| -> Option<f64> {
        let rest = logged.split(key).nth(1)?;
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    let (fuel, per_ns) = (num("fuel:")?, num("per_ns:")?);
    (per_ns > 0.0).then(|| format!("{:.3} fuel/ns", fuel / per_ns))
}

async fn metta_side(
    args: &QosArgs,
    dir: &Path,
    bins: &metta::Bins,
    wasm: &Path,
) -> anyhow::Result<(MettaFigures, MettaFigures, Option<String>)> {
    let mut procs = Procs::default();
    let opts = ClusterOpts {
        nodes: 1,
        pin_cpu: Some(args.cpu),
    };
    let c = MettaCluster::start_with(dir, bins, &mut procs, &args.common.mettad_log, opts)
        .await
        .context("starting the node")?;
    c.push_images(&[("spin", wasm)]).await?;
    let client = c.client(&c.leader)?;
    let mettad = *procs
        .pids("mettad")
        .first()
        .ok_or_else(|| anyhow!("no mettad"))?;

    // A: alone.
    metta::run_domain(&client, "rt-a", "spin", contract(10, 100, false), None).await?;
    eprintln!(
        "  mettad A: rt-a (10ms/100ms) alone for {:?}",
        args.duration
    );
    let (row, cores, other) = measure(&c, &client, "rt-a", args, mettad).await?;
    let alone = figures(&row, 0.0, cores, other);
    metta::stop_domain(&client, "rt-a").await?;

    // B: neighbours first, so every period of rt-b is a loaded one.
    let names: Vec<String> = (1..=args.neighbours)
        .map(|i| format!("greedy-{i}"))
        .collect();
    for n in &names {
        metta::run_domain(&client, n, "spin", contract(1, 100, true), None).await?;
    }
    let charged = |ps: &[metta_proto::DomainStatus]| -> u64 {
        ps.iter()
            .filter(|d| names.contains(&d.name))
            .filter_map(|d| d.runtime.as_ref().map(|r| r.cpu_ns))
            .sum()
    };
    let n0 = charged(&metta::ps(&client).await?);
    let t0 = Instant::now();
    metta::run_domain(&client, "rt-b", "spin", contract(10, 100, false), None).await?;
    eprintln!(
        "  mettad B: rt-b (10ms/100ms) with {} x 1ms/100ms+extra for {:?}",
        args.neighbours, args.duration
    );
    let (row, cores, other) = measure(&c, &client, "rt-b", args, mettad).await?;
    let n1 = charged(&metta::ps(&client).await?);
    let neighbours_cores = (n1 - n0) as f64 / 1e9 / t0.elapsed().as_secs_f64();
    let loaded = figures(&row, neighbours_cores, cores, other);
    for n in names.iter().chain(std::iter::once(&"rt-b".to_string())) {
        metta::stop_domain(&client, n).await?;
    }
    client.close();
    procs.check_alive()?;
    procs.stop_all(Duration::from_secs(5));
    let log = std::fs::read_to_string(c.nodes[0].data.join("mettad.log")).unwrap_or_default();
    let rate = log
        .lines()
        .find(|l| l.contains("nucleus lane started"))
        .and_then(|l| l.split("rate=").nth(1))
        .map(|r| fuel_per_ns(r.trim()).unwrap_or_else(|| r.trim().to_string()));
    Ok((alone, loaded, rate))
}

/// Stops and joins the Linux side's thread when dropped (also when the
/// benchmark is interrupted: its children and cgroup are cleaned up first).
struct LinuxThread {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LinuxThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// [`cfs::run_linux`] on a thread of its own: it polls every 20 µs, and the
/// children it starts die with that thread (`PR_SET_PDEATHSIG`), which lives
/// until they are stopped.
async fn linux_side(args: &QosArgs, dir: &Path) -> anyhow::Result<LinuxRun> {
    let exe = std::env::current_exe()?;
    let dir = dir.to_path_buf();
    let (cpu, secs, n) = (args.cpu, args.duration.as_secs_f64(), args.neighbours);
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let handle = std::thread::Builder::new()
        .name("cfs-sampler".into())
        .spawn({
            let stop = stop.clone();
            move || {
                let _ = tx.send(cfs::run_linux(&exe, &dir, cpu, secs, n, &stop));
            }
        })?;
    let _thread = LinuxThread {
        stop,
        handle: Some(handle),
    };
    rx.await
        .map_err(|_| anyhow!("the Linux side's thread died"))?
        .context("Linux side")
}

async fn one_run(
    args: &QosArgs,
    run: usize,
    bins: &metta::Bins,
    wasm: &Path,
) -> anyhow::Result<RunResult> {
    let tmp = args.common.run_dir("metta-bench-qos-", run, args.runs)?;
    let mut r = RunResult {
        metta_alone: None,
        metta_loaded: None,
        fuel_rate: None,
        linux: None,
    };
    if !args.no_metta {
        let (a, b, rate) = quietly(
            args.quiet,
            |attempt| {
                let dir = tmp.path().join(format!("metta-{attempt}"));
                async move {
                    std::fs::create_dir_all(&dir)?;
                    metta_side(args, &dir, bins, wasm).await
                }
            },
            |(a, b, _)| a.other_cores.max(b.other_cores),
        )
        .await?;
        eprintln!(
            "  mettad: alone p5 {:.1} % charged, {:.1} % real, p99 {:.3} ms; \
             +{}: p5 {:.1} % charged, {:.1} % real, p99 {:.3} ms; lane rate {}",
            a.delivered_p5_pct,
            a.real_p5_pct,
            a.latency_p99_ms,
            args.neighbours,
            b.delivered_p5_pct,
            b.real_p5_pct,
            b.latency_p99_ms,
            rate.as_deref().unwrap_or("?")
        );
        r.metta_alone = Some(a);
        r.metta_loaded = Some(b);
        r.fuel_rate = rate;
    }
    if !args.no_linux {
        eprintln!(
            "  linux: busy loop under CFS 10ms/100ms for {:?} alone, then {:?} with {} busy loops",
            args.duration, args.duration, args.neighbours
        );
        let l = quietly(
            args.quiet,
            |_| linux_side(args, tmp.path()),
            |l| l.other_cores,
        )
        .await?;
        eprintln!(
            "  linux: alone p5 {:.1} %, p99 {:.3} ms; +{}: p5 {:.1} %, p99 {:.3} ms; \
             recorder ran {:.0} ms (schedstat {:.0} ms); {} cgroup periods, {} throttled",
            l.alone.delivered_p5_pct().unwrap_or(f64::NAN),
            l.alone.latency_p99_ms().unwrap_or(f64::NAN),
            args.neighbours,
            l.loaded.delivered_p5_pct().unwrap_or(f64::NAN),
            l.loaded.latency_p99_ms().unwrap_or(f64::NAN),
            l.ran_ms,
            l.schedstat_ms,
            l.cgroup_periods,
            l.cgroup_throttled
        );
        r.linux = Some(l);
    }
    if args.common.keep {
        eprintln!("  kept {}", tmp.keep().display());
    }
    Ok(r)
}

fn summarize(args: &QosArgs, runs: Vec<RunResult>, machine: Machine) -> Report {
    let sp = |v: Vec<f64>| Spread::of(&v);
    let metta_col = |name, pick: fn(&RunResult) -> Option<MettaFigures>| {
        let f: Vec<MettaFigures> = runs.iter().filter_map(pick).collect();
        Column {
            name,
            periods: sp(f.iter().map(|x| x.periods as f64).collect()),
            delivered_charged_p5_pct: sp(f.iter().map(|x| x.delivered_p5_pct).collect()),
            delivered_p5_pct: sp(f.iter().map(|x| x.real_p5_pct).collect()),
            delivered_median_pct: None,
            latency_p99_ms: sp(f.iter().map(|x| x.latency_p99_ms).collect()),
            neighbours_cores: sp(f.iter().map(|x| x.neighbours_cores).collect()),
            mettad_cores: sp(f.iter().map(|x| x.mettad_cores).collect()),
            other_cores: sp(f.iter().map(|x| x.other_cores).collect()),
        }
    };
    let linux_col = |name, loaded: bool| {
        let linux: Vec<&LinuxRun> = runs.iter().filter_map(|r| r.linux.as_ref()).collect();
        let f: Vec<(&cfs::Periods, f64)> = linux
            .iter()
            .map(|l| {
                if loaded {
                    (&l.loaded, l.neighbours_cores)
                } else {
                    (&l.alone, 0.0)
                }
            })
            .collect();
        let nan = |x: Option<f64>| x.unwrap_or(f64::NAN);
        Column {
            name,
            periods: sp(f
                .iter()
                .map(|(p, _)| p.delivered_ppm.len() as f64)
                .collect()),
            delivered_charged_p5_pct: None,
            delivered_p5_pct: sp(f.iter().map(|(p, _)| nan(p.delivered_p5_pct())).collect()),
            delivered_median_pct: sp(f
                .iter()
                .map(|(p, _)| nan(p.delivered_median_pct()))
                .collect()),
            latency_p99_ms: sp(f.iter().map(|(p, _)| nan(p.latency_p99_ms())).collect()),
            neighbours_cores: sp(f.iter().map(|(_, c)| *c).collect()),
            mettad_cores: None,
            other_cores: sp(linux.iter().map(|l| l.other_cores).collect()),
        }
    };
    let columns = vec![
        metta_col("mettad alone", |r| r.metta_alone),
        metta_col("mettad +N", |r| r.metta_loaded),
        linux_col("Linux CFS alone", false),
        linux_col("Linux CFS +N", true),
    ];
    Report {
        runs: runs.len(),
        duration_secs: args.duration.as_secs_f64(),
        neighbours: args.neighbours,
        cpu: args.cpu,
        machine,
        columns,
        per_run: runs,
    }
}

fn print_table(r: &Report) {
    let m = &r.machine;
    println!(
        "metta-bench qos: {} run(s), {} s per workload, {} neighbours, CPU {}; {} cores ({})",
        r.runs, r.duration_secs, r.neighbours, r.cpu, m.cores, m.cpu
    );
    println!("contract of the measured workload 10ms/100ms; figures: median of the runs (min–max)");
    println!();
    let cell = |s: &Option<Spread>, d: usize| match s {
        None => "—".to_string(),
        Some(s) if r.runs <= 1 => format!("{:.*}", d, s.median),
        Some(s) => format!("{:.*} ({:.*}–{:.*})", d, s.median, d, s.min, d, s.max),
    };
    print!("{:<34}", "");
    for c in &r.columns {
        print!(" {:>24}", c.name.replace('N', &r.neighbours.to_string()));
    }
    println!();
    type Pick = fn(&Column) -> &Option<Spread>;
    let rows: [(&str, Pick, usize); 8] = [
        ("periods", |c| &c.periods, 0),
        (
            "delivered % p5 (fuel-charged)",
            |c| &c.delivered_charged_p5_pct,
            1,
        ),
        ("delivered % p5 (CPU time)", |c| &c.delivered_p5_pct, 1),
        (
            "delivered % median (CPU time)",
            |c| &c.delivered_median_pct,
            1,
        ),
        ("latency p99 ms", |c| &c.latency_p99_ms, 3),
        ("neighbours' cores", |c| &c.neighbours_cores, 2),
        ("mettad's cores (all threads)", |c| &c.mettad_cores, 2),
        ("other processes' cores (noise)", |c| &c.other_cores, 2),
    ];
    for (name, pick, d) in rows {
        print!("{name:<34}");
        for c in &r.columns {
            print!(" {:>24}", cell(pick(c), d));
        }
        println!();
    }
    println!();
    let med = |i: usize, pick: Pick| pick(&r.columns[i]).map(|s| s.median);
    if let (Some(m), Some(l)) = (
        med(1, |c| &c.delivered_p5_pct),
        med(3, |c| &c.delivered_p5_pct),
    ) {
        println!(
            "with neighbours, delivered p5 (CPU time) mettad/Linux: {:.2}x",
            m / l
        );
    }
    if let (Some(m), Some(l)) = (med(1, |c| &c.latency_p99_ms), med(3, |c| &c.latency_p99_ms)) {
        println!("with neighbours, latency p99 mettad/Linux: {:.2}x", m / l);
    }
    let rates: Vec<&str> = r
        .per_run
        .iter()
        .filter_map(|x| x.fuel_rate.as_deref())
        .collect();
    if !rates.is_empty() {
        println!("lane fuel rate at start, per run: {}", rates.join("; "));
    }
    let noise = r
        .columns
        .iter()
        .filter_map(|c| c.other_cores.map(|s| s.max))
        .fold(0.0, f64::max);
    if noise > 0.2 {
        println!(
            "warning: other processes used up to {noise:.2} cores meanwhile: the figures are disturbed"
        );
    }
    println!();
    println!("targets (delivered p5 >= 95 % of the contract, latency p99 <= 100 ms):");
    for (i, c) in r.columns.iter().enumerate() {
        let p5 = med(i, |c| &c.delivered_p5_pct);
        let charged = med(i, |c| &c.delivered_charged_p5_pct);
        let p99 = med(i, |c| &c.latency_p99_ms);
        let (Some(p5), Some(p99)) = (p5, p99) else {
            continue;
        };
        println!(
            "  {:<18} delivered {} ({:.1} % CPU time{}), latency {} ({:.3} ms)",
            c.name.replace('N', &r.neighbours.to_string()),
            if p5 >= 95.0 { "met" } else { "NOT met" },
            p5,
            charged.map_or(String::new(), |x| format!(", {x:.1} % charged")),
            if p99 <= 100.0 { "met" } else { "NOT met" },
            p99
        );
    }
}

/// Runs the `qos` mode and prints its report.
pub async fn main(args: QosArgs) -> anyhow::Result<()> {
    if args.runs == 0 || args.runs > 20 {
        bail!("--runs must be 1 to 20");
    }
    if args.cpu == args.sampler_cpu {
        bail!("--cpu and --sampler-cpu must differ");
    }
    let bins = find_bins(args.common.bin_dir.as_deref())?;
    let wasm = std::fs::canonicalize(&args.wasm).with_context(|| {
        format!(
            "{} (build the domains with domains/build.sh)",
            args.wasm.display()
        )
    })?;
    // Before pinning: it counts the CPUs this process may use.
    let machine = machine_info(args.common.work_dir.as_deref());
    // The sampler and the API client stay off the measured CPU; children
    // inherit this unless started under `taskset -c CPU`.
    pin_self(args.sampler_cpu)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuel_rate_from_the_log() {
        assert_eq!(
            fuel_per_ns("FuelRate { fuel: 1769103, per_ns: 1000000 }").as_deref(),
            Some("1.769 fuel/ns")
        );
        assert_eq!(fuel_per_ns("something else"), None);
    }
}
