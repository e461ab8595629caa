//! `metta-bench flood`: what peers that have proved nothing can do to a
//! real `mettad` — its memory (RSS) and how fast it answers a member
//! (`nodes`, in-process and as `mettactl nodes`) — before, during and after
//! a bounded flood of anonymous QUIC and TLS/TCP peers on loopback.
//! See `docs/benchmarks.md`.
//!
//! The flood, from `--sources` loopback addresses (127.0.0.10, .11, ...)
//! for `--secs`: per source, QUIC connections that each try to open 100
//! streams carrying the header of a 16 MiB frame and 64 KiB of it (the
//! attack of issue 9: 4 such connections took a node from 49 MB to ~4 GB),
//! TLS/TCP connections that complete the handshake and then idle, and TCP
//! connections that never start one — each kind re-opened as soon as the
//! node closes it, at most `--rate` new connections a second per source and
//! kind.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use metta_control::config::ClientConfig;
use metta_control::transport::{self, ServerTrust};
use metta_proto::ApiRequest;
use serde::Serialize;

use crate::metta::{ClusterOpts, MettaCluster};
use crate::procs::Procs;
use crate::stats::percentile;
use crate::{find_bins, machine_info, Machine, Output};

/// RSS and member latency of a real mettad under a bounded anonymous flood.
///
/// Starts a 1-node cluster, measures (1) idle, (2) while the flood runs,
/// (3) after it stopped: mettad's RSS (sampled every 100 ms), the round trip
/// of `ApiRequest::Nodes` on an open admin connection, and the wall time of
/// `mettactl nodes` (a new process, handshake included).
#[derive(Debug, clap::Args)]
pub struct FloodArgs {
    /// Flood duration, s.
    #[arg(long, default_value_t = 15)]
    secs: u64,
    /// Source addresses the flood comes from (127.0.0.10 upwards).
    #[arg(long, default_value_t = 10)]
    sources: u8,
    /// New connections a second, per source and kind, at most.
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// `Nodes` round trips per phase.
    #[arg(long, default_value_t = 50)]
    n: usize,
    /// `mettactl nodes` runs per phase.
    #[arg(long, default_value_t = 10)]
    ctl_n: usize,
    #[command(flatten)]
    common: crate::RunArgs,
}

#[derive(Debug, Clone, Default, Serialize)]
struct Phase {
    what: String,
    rss_mib_p50: f64,
    rss_mib_max: f64,
    nodes_ms_p50: f64,
    nodes_ms_p99: f64,
    nodes_errors: usize,
    mettactl_nodes_ms_p50: f64,
    mettactl_errors: usize,
}

#[derive(Debug, Default, Serialize)]
struct Counts {
    quic_connections: u64,
    quic_closed_by_node: u64,
    quic_streams: u64,
    tls_connections: u64,
    tcp_without_handshake: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    secs: u64,
    sources: u8,
    rate: u32,
    machine: Machine,
    phases: Vec<Phase>,
    flood: Counts,
}

#[derive(Default)]
struct Counters {
    quic: AtomicU64,
    quic_closed: AtomicU64,
    streams: AtomicU64,
    tls: AtomicU64,
    raw: AtomicU64,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn ms(sorted_us: &[u64], q: f64) -> f64 {
    percentile(sorted_us, q).map_or(f64::NAN, |v| v as f64 / 1000.0)
}

/// Measures one phase while `rss` samples run.
async fn phase(what: &str, args: &FloodArgs, c: &MettaCluster, pid: u32) -> anyhow::Result<Phase> {
    let client = c.client(&c.leader)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut v = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(k) = rss_kib(pid) {
                    v.push(k);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            v
        })
    };
    let mut rtt = Vec::new();
    let mut errors = 0;
    for _ in 0..args.n {
        let t = Instant::now();
        match client.call(ApiRequest::Nodes).await {
            Ok(_) => rtt.push(t.elapsed().as_micros() as u64),
            Err(_) => errors += 1,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ctl = Vec::new();
    let mut ctl_errors = 0;
    for _ in 0..args.ctl_n {
        let t = Instant::now();
        match c.ctl(&["nodes"]).await {
            Ok(_) => ctl.push(t.elapsed().as_micros() as u64),
            Err(_) => ctl_errors += 1,
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut rss = sampler.await?;
    rss.sort_unstable();
    rtt.sort_unstable();
    ctl.sort_unstable();
    let mib = |k: Option<u64>| k.map_or(f64::NAN, |k| k as f64 / 1024.0);
    Ok(Phase {
        what: what.into(),
        rss_mib_p50: mib(percentile(&rss, 0.5)),
        rss_mib_max: mib(rss.last().copied()),
        nodes_ms_p50: ms(&rtt, 0.5),
        nodes_ms_p99: ms(&rtt, 0.99),
        nodes_errors: errors,
        mettactl_nodes_ms_p50: ms(&ctl, 0.5),
        mettactl_errors: ctl_errors,
    })
}

/// One source's QUIC attacker until `until`.
async fn quic_attacker(
    from: IpAddr,
    server: SocketAddr,
    cfg: quinn::ClientConfig,
    rate: u32,
    until: Instant,
    n: Arc<Counters>,
) {
    let Ok(ep) = quinn::Endpoint::client(SocketAddr::new(from, 0)) else {
        return;
    };
    let gap = Duration::from_secs(1) / rate.max(1);
    let mut tasks = Vec::new();
    while Instant::now() < until {
        tokio::time::sleep(gap).await;
        let Ok(connecting) = ep.connect_with(cfg.clone(), server, transport::SERVER_NAME) else {
            continue;
        };
        let n = n.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(3), connecting).await
            else {
                return;
            };
            n.quic.fetch_add(1, Ordering::Relaxed);
            let chunk = vec![0u8; 64 * 1024];
            let mut streams = Vec::new();
            for _ in 0..100 {
                let open = tokio::time::timeout(Duration::from_millis(200), conn.open_bi()).await;
                let Ok(Ok((mut send, recv))) = open else {
                    break;
                };
                n.streams.fetch_add(1, Ordering::Relaxed);
                let _ = send.write_all(&(16u32 << 20).to_be_bytes()).await;
                let _ = send.write_all(&chunk).await;
                streams.push((send, recv));
            }
            let left = until.saturating_duration_since(Instant::now());
            if let Ok(quinn::ConnectionError::ApplicationClosed(_)) =
                tokio::time::timeout(left, conn.closed()).await
            {
                n.quic_closed.fetch_add(1, Ordering::Relaxed);
            }
            conn.close(0u32.into(), b"");
        }));
        tasks.retain(|t| !t.is_finished());
    }
    for t in tasks {
        t.abort();
    }
    ep.close(0u32.into(), b"");
}

/// One source's TCP attacker until `until`: handshakes that idle, and
/// connections that never start one.
async fn tcp_attacker(
    from: IpAddr,
    server: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    rate: u32,
    until: Instant,
    n: Arc<Counters>,
) {
    let gap = Duration::from_secs(1) / rate.max(1);
    let mut tasks = Vec::new();
    let mut handshake = true;
    while Instant::now() < until {
        tokio::time::sleep(gap / 2).await;
        handshake = !handshake;
        let (tls, n) = (tls.clone(), n.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(sock) = tokio::net::TcpSocket::new_v4() else {
                return;
            };
            if sock.bind(SocketAddr::new(from, 0)).is_err() {
                return;
            }
            let Ok(tcp) = sock.connect(server).await else {
                return;
            };
            let left = until.saturating_duration_since(Instant::now());
            let mut buf = [0u8; 64];
            use tokio::io::AsyncReadExt;
            if handshake {
                let name = rustls_pki_types::ServerName::try_from(transport::SERVER_NAME)
                    .expect("a valid name");
                let connect = tokio_rustls::TlsConnector::from(tls).connect(name, tcp);
                let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(6), connect).await
                else {
                    return;
                };
                n.tls.fetch_add(1, Ordering::Relaxed);
                let _ = tokio::time::timeout(left, s.read(&mut buf)).await;
            } else {
                n.raw.fetch_add(1, Ordering::Relaxed);
                let mut tcp = tcp;
                let _ = tokio::time::timeout(left, tcp.read(&mut buf)).await;
            }
        }));
        tasks.retain(|t| !t.is_finished());
    }
    for t in tasks {
        t.abort();
    }
}

pub async fn main(args: FloodArgs) -> anyhow::Result<()> {
    let bins = find_bins(args.common.bin_dir.as_deref())?;
    let tmp = args.common.run_dir("metta-flood-", 0, 1)?;
    let mut procs = Procs::default();
    let c = MettaCluster::start_with(
        tmp.path(),
        &bins,
        &mut procs,
        &args.common.mettad_log,
        ClusterOpts {
            nodes: 1,
            pin_cpu: None,
        },
    )
    .await?;
    let pid = *procs.pids("mettad").first().context("the mettad process")?;
    let server: SocketAddr = c.leader.parse().context("the leader's address")?;
    let admin = ClientConfig::load(&tmp.path().join("admin.conf"))?;
    let ca_der = metta_trust_pem_to_der(&admin.ca_pem)?;
    // The flood checks only that it reached the cluster (not the node's
    // role), so it runs against earlier releases too.
    let trust = ServerTrust::Cluster {
        ca_der,
        revoked: Default::default(),
    };
    let quic = transport::client_config(None, &trust)?;
    let tls = Arc::new(transport::tls_client_config(None, &trust)?);

    eprintln!("idle: measuring");
    let mut phases = vec![phase("idle", &args, &c, pid).await?];

    eprintln!(
        "flood: {} sources, {} s, up to {} new connections/s per source and kind",
        args.sources, args.secs, args.rate
    );
    let counters = Arc::new(Counters::default());
    let until = Instant::now() + Duration::from_secs(args.secs);
    let mut attackers = Vec::new();
    for s in 0..args.sources {
        let from = IpAddr::from([127, 0, 0, 10u8.saturating_add(s)]);
        attackers.push(tokio::spawn(quic_attacker(
            from,
            server,
            quic.clone(),
            args.rate,
            until,
            counters.clone(),
        )));
        attackers.push(tokio::spawn(tcp_attacker(
            from,
            server,
            tls.clone(),
            args.rate,
            until,
            counters.clone(),
        )));
    }
    // Measure once the flood has filled what the node lets anonymous peers
    // hold (every source at its per-source cap), or a quarter of the way in.
    let full = u64::from(args.sources) * metta_control::limits::ANONYMOUS_PER_SOURCE as u64;
    let steady = Instant::now() + Duration::from_secs(args.secs / 4);
    while counters.quic.load(Ordering::Relaxed) < full && Instant::now() < steady {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    phases.push(phase("during the flood", &args, &c, pid).await?);
    for a in attackers {
        let _ = a.await;
    }
    // A settling window (not a condition): what the node still holds 2 s
    // after the flood is what "after" reports.
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("after: measuring");
    phases.push(phase("after the flood", &args, &c, pid).await?);
    procs.stop_all(Duration::from_secs(5));

    let n = &counters;
    let report = Report {
        secs: args.secs,
        sources: args.sources,
        rate: args.rate,
        machine: machine_info(args.common.work_dir.as_deref()),
        phases,
        flood: Counts {
            quic_connections: n.quic.load(Ordering::Relaxed),
            quic_closed_by_node: n.quic_closed.load(Ordering::Relaxed),
            quic_streams: n.streams.load(Ordering::Relaxed),
            tls_connections: n.tls.load(Ordering::Relaxed),
            tcp_without_handshake: n.raw.load(Ordering::Relaxed),
        },
    };
    if let Some(p) = &args.common.save_json {
        std::fs::write(p, serde_json::to_string_pretty(&report)? + "\n")?;
    }
    match args.common.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => {
            println!(
                "{:<18} {:>12} {:>12} {:>14} {:>14} {:>20}",
                "phase",
                "RSS p50 MiB",
                "RSS max MiB",
                "nodes p50 ms",
                "nodes p99 ms",
                "mettactl nodes ms"
            );
            for p in &report.phases {
                println!(
                    "{:<18} {:>12.1} {:>12.1} {:>14.2} {:>14.2} {:>20.1}{}",
                    p.what,
                    p.rss_mib_p50,
                    p.rss_mib_max,
                    p.nodes_ms_p50,
                    p.nodes_ms_p99,
                    p.mettactl_nodes_ms_p50,
                    if p.nodes_errors + p.mettactl_errors > 0 {
                        format!("  ({} errors)", p.nodes_errors + p.mettactl_errors)
                    } else {
                        String::new()
                    }
                );
            }
            let f = &report.flood;
            println!(
                "flood: {} QUIC connections ({} closed by the node), {} streams opened, {} TLS/TCP handshakes, {} TCP connections without one",
                f.quic_connections, f.quic_closed_by_node, f.quic_streams, f.tls_connections, f.tcp_without_handshake
            );
        }
    }
    Ok(())
}

fn metta_trust_pem_to_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    metta_trust::cert::pem_to_der(pem).map_err(|e| anyhow::anyhow!("CA certificate: {e}"))
}
