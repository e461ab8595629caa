//! Child processes that die with the benchmark, loopback ports, and bounded
//! polling.

use std::net::{TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Every process the benchmark started. Dropping it (normal exit, error,
/// panic, or the future that owns it being dropped on Ctrl-C) stops them all:
/// SIGTERM, a bounded wait, then SIGKILL. Each child also gets
/// `PR_SET_PDEATHSIG = SIGKILL`, so even a `kill -9` of the benchmark takes
/// its daemons with it.
#[derive(Debug, Default)]
pub struct Procs {
    children: Vec<(String, Child)>,
}

/// CPU time (user + system) used so far by process `pid`, in seconds.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14,
    // stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks())
}

/// CPU time of every CPU on the machine that was busy (not idle or
/// waiting for I/O), in seconds.
pub fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7)?;
    Some(busy as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

impl Procs {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(&mut self, name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<u32> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe calls (prctl, getppid) without allocating.
        // PDEATHSIG fires when the spawning *thread* exits: spawn only from
        // the main thread or runtime workers, never from a blocking-pool
        // thread (those exit when idle).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        let pid = child.id();
        self.children.push((name.to_string(), child));
        Ok(pid)
    }

    /// Process ids of the children whose name starts with `prefix`.
    pub fn pids(&self, prefix: &str) -> Vec<u32> {
        self.children
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, c)| c.id())
            .collect()
    }

    /// The exit status of child `pid` if it has exited (`None`: still
    /// running, or not ours).
    pub fn exited(&mut self, pid: u32) -> anyhow::Result<Option<std::process::ExitStatus>> {
        for (_, c) in &mut self.children {
            if c.id() == pid {
                return Ok(c.try_wait()?);
            }
        }
        Ok(None)
    }

    /// Fails if any child has exited (naming it and its status).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, c) in &mut self.children {
            if let Some(status) = c.try_wait()? {
                bail!("{name} exited unexpectedly ({status}); see its log");
            }
        }
        Ok(())
    }

    /// Stops every child (SIGTERM, up to `grace`, then SIGKILL).
    pub fn stop_all(&mut self, grace: Duration) {
        for (_, c) in &mut self.children {
            if let Ok(None) = c.try_wait() {
                if let Ok(pid) = i32::try_from(c.id()) {
                    // SAFETY: plain kill(2) on a pid we spawned and have not yet
                    // reaped, so it cannot have been reused.
                    unsafe {
                        libc::kill(pid, libc::SIGTERM);
                    }
                }
            }
        }
        let deadline = Instant::now() + grace;
        for (_, c) in &mut self.children {
            while Instant::now() < deadline {
                match c.try_wait() {
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                    _ => break,
                }
            }
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop_all(Duration::from_secs(3));
    }
}

/// Pins every thread of this process (and so every child it starts later,
/// unless the child is started under `taskset`) to `cpu`.
pub fn pin_self(cpu: u32) -> anyhow::Result<()> {
    let status = Command::new("taskset")
        .args([
            "-a",
            "-p",
            "-c",
            &cpu.to_string(),
            &std::process::id().to_string(),
        ])
        .stdout(Stdio::null())
        .status()
        .context("running taskset (util-linux)")?;
    if !status.success() {
        bail!("taskset -a -p -c {cpu} failed ({status})");
    }
    Ok(())
}

/// The wall clock in ns since 1970 (a time base shared between processes).
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Waits until the machine's busy CPU time over a 5 s window is below
/// `max_cores` (call it while the benchmark's own processes are idle), for at
/// most `timeout`; returns whether it got there.
pub async fn wait_quiet(max_cores: f64, timeout: Duration) -> bool {
    const WINDOW: Duration = Duration::from_secs(5);
    let deadline = Instant::now() + timeout;
    let mut said = false;
    loop {
        let a = machine_busy_secs().unwrap_or(0.0);
        tokio::time::sleep(WINDOW).await;
        let busy = (machine_busy_secs().unwrap_or(0.0) - a) / WINDOW.as_secs_f64();
        if busy < max_cores {
            return true;
        }
        if Instant::now() >= deadline {
            eprintln!("  note: the machine did not get quiet ({busy:.2} cores busy); going on");
            return false;
        }
        if !said {
            eprintln!("  waiting for the machine to be quiet ({busy:.2} cores busy)...");
            said = true;
        }
    }
}

/// How long `--quiet` waits for the machine at most, per attempt.
pub const QUIET_TIMEOUT: Duration = Duration::from_secs(1800);
/// How often `--quiet` tries one measurement.
pub const MAX_ATTEMPTS: usize = 5;

/// The noise control of `--quiet <cores>`: before each attempt of `measure`
/// (given the attempt number, from 1) waits (up to [`QUIET_TIMEOUT`]) until
/// the machine is below `quiet` busy cores, and measures again (up to
/// [`MAX_ATTEMPTS`] times) while other processes used more than that
/// meanwhile (`noise` of the result). Without `quiet`, measures once.
pub async fn quietly<T, Fut>(
    quiet: Option<f64>,
    mut measure: impl FnMut(usize) -> Fut,
    noise: impl Fn(&T) -> f64,
) -> anyhow::Result<T>
where
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut attempt = 1;
    loop {
        if let Some(q) = quiet {
            wait_quiet(q, QUIET_TIMEOUT).await;
        }
        let r = measure(attempt).await?;
        let other = noise(&r);
        match quiet {
            Some(q) if other > q && attempt < MAX_ATTEMPTS => {
                eprintln!("  other processes used {other:.2} cores meanwhile: again");
                attempt += 1;
            }
            _ => return Ok(r),
        }
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A free UDP address on 127.0.0.1.
pub fn free_udp_addr() -> anyhow::Result<String> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.to_string())
}

/// Polls `f` every `every` until it yields `Some`, failing after `timeout`
/// with `what` and the last error seen.
pub async fn wait_for<T, F, Fut>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut f: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    loop {
        match tokio::time::timeout_at(deadline.into(), f()).await {
            Ok(Ok(Some(v))) => return Ok(v),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => last = format!("{e:#}"),
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what} (last: {last})");
        }
        tokio::time::sleep(every).await;
    }
}
