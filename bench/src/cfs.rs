//! The Linux side of `metta-bench qos`: the same two workloads as Linux
//! processes pinned to one CPU — the measured one a busy loop under CFS
//! bandwidth control (quota 10 ms per 100 ms period), the neighbours
//! unconstrained busy loops — measured the way
//! `control/examples/crosstalk.rs` measures them.
//!
//! The measured process (`metta-bench cfs-record`) reads the clock in a tight
//! loop and records the intervals in which it ran (a gap > 20 µs means it was
//! off the CPU). Meanwhile the benchmark polls the cgroup's `cpu.stat` and
//! timestamps each increment of `nr_periods`: the CFS period boundaries, where
//! the quota is refilled and a throttled task becomes runnable again. Per CFS
//! period: CPU the process ran (as ppm of the 10 ms quota) and the delay from
//! the boundary to its first run.
//!
//! cgroup v1 (`/sys/fs/cgroup/cpu`, `cpu.cfs_quota_us` / `cpu.cfs_period_us`)
//! is used when mounted, else cgroup v2 with the cpu controller (`cpu.max`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Serialize;

use crate::procs::{cpu_secs, machine_busy_secs, unix_ns, Procs};
use crate::stats::percentile;

/// The CFS period (and the nucleus contract's period), ns.
pub const PERIOD_NS: u64 = 100_000_000;
/// The quota of the measured process (the contract's slice), ns.
pub const SLICE_NS: u64 = 10_000_000;
/// A longer gap in the recorder's clock loop means it was off the CPU.
const GAP_NS: u64 = 20_000;
/// The start of each half (start-up, neighbours starting) is not counted.
const SKIP_NS: u64 = 500_000_000;

/// A greedy process (`metta-bench cfs-busy`).
pub fn busy() -> ! {
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

/// The measured process (`metta-bench cfs-record`): always runnable for
/// `secs`, recording when it ran. Writes to `out`: `base <unix ns of its
/// time 0>`, `sched <ns of CPU by /proc/self/schedstat>`, then `seg <start>
/// <end>` lines (ns since time 0).
pub fn record(secs: f64, out: &Path) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let base = unix_ns();
    let sched0 = schedstat();
    let end = (secs * 1e9) as u64;
    let mut segs: Vec<(u64, u64)> = Vec::with_capacity(1 << 16);
    let (mut start, mut last) = (0u64, 0u64);
    loop {
        let t = t0.elapsed().as_nanos() as u64;
        if t - last > GAP_NS {
            segs.push((start, last));
            start = t;
        }
        last = t;
        if t >= end {
            break;
        }
    }
    segs.push((start, last));
    let sched = schedstat().saturating_sub(sched0);
    let mut f = BufWriter::new(File::create(out).with_context(|| out.display().to_string())?);
    writeln!(f, "base {base}")?;
    writeln!(f, "sched {sched}")?;
    for (s, e) in segs {
        writeln!(f, "seg {s} {e}")?;
    }
    f.flush()?;
    Ok(())
}

/// CPU time of this process's main thread, ns (`/proc/self/schedstat`).
fn schedstat() -> u64 {
    std::fs::read_to_string("/proc/self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CgroupVersion {
    V1,
    V2,
}

/// A fresh cpu cgroup with a CFS bandwidth limit; removed on drop (drop it
/// after the processes in it are gone).
#[derive(Debug)]
pub struct CfsGroup {
    path: PathBuf,
    version: CgroupVersion,
}

/// Counters of `cpu.stat`.
#[derive(Debug, Clone, Copy, Default)]
struct CpuStat {
    nr_periods: u64,
    nr_throttled: u64,
    throttled_ns: u64,
}

impl CfsGroup {
    /// Creates the cgroup with `quota_us` per `period_us`.
    pub fn create(quota_us: u64, period_us: u64) -> anyhow::Result<CfsGroup> {
        let name = format!("metta-bench-{}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/cpu");
        let v2 = Path::new("/sys/fs/cgroup");
        let has_cpu_v2 = std::fs::read_to_string(v2.join("cgroup.subtree_control"))
            .is_ok_and(|s| s.split_whitespace().any(|c| c == "cpu"));
        let g = if v1.join("cpu.cfs_quota_us").is_file() {
            CfsGroup {
                path: v1.join(&name),
                version: CgroupVersion::V1,
            }
        } else if has_cpu_v2 {
            CfsGroup {
                path: v2.join(&name),
                version: CgroupVersion::V2,
            }
        } else {
            bail!(
                "no cgroup cpu controller: neither /sys/fs/cgroup/cpu (v1) nor `cpu` in \
                 /sys/fs/cgroup/cgroup.subtree_control (v2); use --no-linux"
            );
        };
        std::fs::create_dir(&g.path)
            .with_context(|| format!("creating {} (needs root)", g.path.display()))?;
        let set = |file: &str, value: String| {
            std::fs::write(g.path.join(file), &value)
                .with_context(|| format!("writing {value:?} to {}/{file}", g.path.display()))
        };
        match g.version {
            CgroupVersion::V1 => {
                set("cpu.cfs_period_us", period_us.to_string())?;
                set("cpu.cfs_quota_us", quota_us.to_string())?;
            }
            CgroupVersion::V2 => set("cpu.max", format!("{quota_us} {period_us}"))?,
        }
        Ok(g)
    }

    /// Its `cgroup.procs` (write a pid to move that process in).
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Which interface it uses, for the report.
    pub fn describe(&self) -> String {
        match self.version {
            CgroupVersion::V1 => format!(
                "cgroup v1 {} (cpu.cfs_quota_us / cpu.cfs_period_us)",
                self.path.display()
            ),
            CgroupVersion::V2 => format!("cgroup v2 {} (cpu.max)", self.path.display()),
        }
    }

    fn stat(&self) -> CpuStat {
        let s = std::fs::read_to_string(self.path.join("cpu.stat")).unwrap_or_default();
        let get = |k: &str| {
            s.lines()
                .find_map(|l| {
                    let (key, v) = l.split_once(' ')?;
                    (key == k).then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0u64)
        };
        CpuStat {
            nr_periods: get("nr_periods"),
            nr_throttled: get("nr_throttled"),
            throttled_ns: match self.version {
                CgroupVersion::V1 => get("throttled_time"),
                CgroupVersion::V2 => get("throttled_usec") * 1_000,
            },
        }
    }
}

impl Drop for CfsGroup {
    fn drop(&mut self) {
        // The last task may still be exiting: retry briefly.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("note: could not remove {}", self.path.display());
    }
}

/// Per-period figures of one workload.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Periods {
    /// CPU in each period, ppm of the slice.
    pub delivered_ppm: Vec<u64>,
    /// Delay from each period's start to the first run in it, µs.
    pub latency_us: Vec<u64>,
}

impl Periods {
    /// 5th percentile of delivered, % of the slice (nearest rank).
    pub fn delivered_p5_pct(&self) -> Option<f64> {
        pct_of(&self.delivered_ppm, 0.05)
    }

    /// Median delivered, % of the slice.
    pub fn delivered_median_pct(&self) -> Option<f64> {
        pct_of(&self.delivered_ppm, 0.50)
    }

    /// 99th percentile of the latency, ms (nearest rank).
    pub fn latency_p99_ms(&self) -> Option<f64> {
        let mut v = self.latency_us.clone();
        v.sort_unstable();
        percentile(&v, 0.99).map(|us| us as f64 / 1000.0)
    }
}

fn pct_of(ppm: &[u64], q: f64) -> Option<f64> {
    let mut v = ppm.to_vec();
    v.sort_unstable();
    percentile(&v, q).map(|x| x as f64 / 10_000.0)
}

/// What one Linux run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LinuxRun {
    /// The measured process alone.
    pub alone: Periods,
    /// The measured process with the neighbours.
    pub loaded: Periods,
    /// CPU the recorder ran by its clock loop, ms.
    pub ran_ms: f64,
    /// CPU the recorder ran by `/proc/self/schedstat`, ms.
    pub schedstat_ms: f64,
    /// Periods, throttled periods and throttled time the cgroup counted.
    pub cgroup_periods: u64,
    /// Periods in which the cgroup was throttled.
    pub cgroup_throttled: u64,
    /// Cores the neighbours used together while they ran.
    pub neighbours_cores: f64,
    /// Cores used by processes the benchmark did not start, over both halves
    /// (noise).
    pub other_cores: f64,
    /// How the limit was set.
    pub cgroup: String,
}

/// Runs the Linux side: the recorder in a CFS-limited cgroup on `cpu` for
/// `secs` alone, then for `secs` more with `neighbours` busy processes on
/// the same CPU. `exe` is this benchmark (it has the `cfs-record` and
/// `cfs-busy` modes); `dir` holds the recorder's output. Blocks until done
/// or `stop` is set; the children die with the calling thread
/// (`PR_SET_PDEATHSIG`), so call it from a thread that lives until it returns.
pub fn run_linux(
    exe: &Path,
    dir: &Path,
    cpu: u32,
    secs: f64,
    neighbours: usize,
    stop: &AtomicBool,
) -> anyhow::Result<LinuxRun> {
    // Declared before `procs`, so removed after the processes are stopped.
    let cg = CfsGroup::create(SLICE_NS / 1_000, PERIOD_NS / 1_000)?;
    let mut procs = Procs::default();
    let out = dir.join("cfs-record.txt");
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "echo $$ > {} && exec taskset -c {cpu} {} cfs-record --secs {} --out {}",
        quote(&cg.procs_file()),
        quote(exe),
        2.0 * secs,
        quote(&out)
    ));
    let rec = procs.spawn("cfs recorder", cmd, &dir.join("cfs-record.log"))?;
    let started = Instant::now();
    let machine0 = machine_busy_secs().unwrap_or(0.0);
    let self0 = cpu_secs(std::process::id()).unwrap_or(0.0);
    let neighbours_at = started + Duration::from_secs_f64(secs);
    let deadline = started + Duration::from_secs_f64(2.0 * secs + 30.0);
    let stat0 = cg.stat();
    let mut last = stat0.nr_periods;
    let mut bounds_unix = Vec::with_capacity((2.0 * secs * 10.0) as usize + 16);
    let mut half_unix = None;
    let mut busy_pids = Vec::new();
    let mut busy_cpu0 = 0.0;
    let status = loop {
        if let Some(s) = procs.exited(rec)? {
            break s;
        }
        if half_unix.is_none() && Instant::now() >= neighbours_at {
            half_unix = Some(unix_ns());
            for i in 0..neighbours {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpu.to_string()).arg(exe).arg("cfs-busy");
                busy_pids.push(procs.spawn(
                    &format!("cfs neighbour {i}"),
                    c,
                    &dir.join("cfs-busy.log"),
                )?);
            }
            busy_cpu0 = busy_pids.iter().filter_map(|&p| cpu_secs(p)).sum::<f64>();
        }
        let p = cg.stat().nr_periods;
        if p != last {
            bounds_unix.push(unix_ns());
            last = p;
        }
        if Instant::now() > deadline {
            bail!("the CFS recorder did not finish in time");
        }
        if stop.load(Ordering::Relaxed) {
            bail!("stopped");
        }
        std::thread::sleep(Duration::from_micros(20));
    };
    let busy_cpu1 = busy_pids.iter().filter_map(|&p| cpu_secs(p)).sum::<f64>();
    let machine1 = machine_busy_secs().unwrap_or(0.0);
    let self1 = cpu_secs(std::process::id()).unwrap_or(0.0);
    let wall = started.elapsed().as_secs_f64();
    let busy_wall = half_unix.map_or(0.0, |h| (unix_ns() - h) as f64 / 1e9);
    let stat1 = cg.stat();
    if !status.success() {
        bail!(
            "the CFS recorder failed ({status}); see {}",
            dir.join("cfs-record.log").display()
        );
    }
    procs.stop_all(Duration::from_secs(2));
    let half_unix =
        half_unix.ok_or_else(|| anyhow!("the recorder ended before the neighbours started"))?;

    let text = std::fs::read_to_string(&out).with_context(|| out.display().to_string())?;
    let (mut base, mut sched) = (0u64, 0u64);
    let mut segs = Vec::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let num = |s: &str| s.parse::<u64>().unwrap_or(0);
        match f.as_slice() {
            ["base", v] => base = num(v),
            ["sched", v] => sched = num(v),
            ["seg", s, e] => segs.push((num(s), num(e))),
            _ => {}
        }
    }
    if base == 0 {
        bail!("no `base` line in {}", out.display());
    }
    // Boundaries and the neighbours' start in the recorder's time base.
    let bounds: Vec<u64> = bounds_unix
        .iter()
        .filter(|&&b| b >= base)
        .map(|&b| b - base)
        .collect();
    let half = half_unix.saturating_sub(base);
    let end = (2.0 * secs * 1e9) as u64;
    Ok(LinuxRun {
        alone: periods(&segs, &bounds, SKIP_NS, half),
        loaded: periods(&segs, &bounds, half + SKIP_NS, end),
        ran_ms: segs.iter().map(|(s, e)| e - s).sum::<u64>() as f64 / 1e6,
        schedstat_ms: sched as f64 / 1e6,
        cgroup_periods: stat1.nr_periods - stat0.nr_periods,
        cgroup_throttled: stat1.nr_throttled - stat0.nr_throttled,
        neighbours_cores: if busy_wall > 0.0 {
            (busy_cpu1 - busy_cpu0) / busy_wall
        } else {
            0.0
        },
        other_cores: ((machine1 - machine0)
            - (busy_cpu1 - busy_cpu0)
            - (self1 - self0)
            - sched as f64 / 1e9)
            .max(0.0)
            / wall,
        cgroup: format!(
            "{}; {:.0} ms throttled",
            cg.describe(),
            stat1.throttled_ns.saturating_sub(stat0.throttled_ns) as f64 / 1e6
        ),
    })
}

/// The periods `[b, b + PERIOD)` for the boundaries `b` in `[from, to -
/// PERIOD]`: CPU the recorder ran in each, and the delay to its first run.
fn periods(segs: &[(u64, u64)], bounds: &[u64], from: u64, to: u64) -> Periods {
    let mut p = Periods::default();
    for &b in bounds.iter().filter(|&&b| b >= from && b + PERIOD_NS <= to) {
        let e = b + PERIOD_NS;
        let mut cpu = 0;
        let mut first = None;
        for &(ss, se) in segs {
            if se <= b || ss >= e {
                continue;
            }
            cpu += se.min(e) - ss.max(b);
            first.get_or_insert(ss.max(b) - b);
        }
        p.delivered_ppm.push(cpu * 1_000_000 / SLICE_NS);
        p.latency_us.push(first.unwrap_or(PERIOD_NS) / 1_000);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_first_run_per_period() {
        let ms = 1_000_000;
        // Runs 0–10 ms, 100.5–105 ms and 108–113 ms, 250–251 ms.
        let segs = [
            (0, 10 * ms),
            (100 * ms + ms / 2, 105 * ms),
            (108 * ms, 113 * ms),
            (250 * ms, 251 * ms),
        ];
        let bounds = [0, 100 * ms, 200 * ms, 300 * ms];
        let p = periods(&segs, &bounds, 0, 400 * ms);
        assert_eq!(p.delivered_ppm, vec![1_000_000, 950_000, 100_000, 0]);
        assert_eq!(p.latency_us, vec![0, 500, 50_000, 100_000]);
        // Only boundaries whose whole period lies in the window count.
        let p = periods(&segs, &bounds, 50 * ms, 300 * ms);
        assert_eq!(p.delivered_ppm, vec![950_000, 100_000]);
        assert_eq!(p.delivered_p5_pct(), Some(10.0));
        assert_eq!(p.latency_p99_ms(), Some(50.0));
    }
}
