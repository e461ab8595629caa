//! `mettad`: the Metta node daemon.
//!
//! Runs one node from its data directory (created by `mettactl init` or
//! `mettactl join`) until SIGINT/SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use metta_control::config::DataDir;
use metta_control::node::Node;

/// The Metta node daemon: serves the registry (Raft over QUIC/mTLS) and the API.
///
/// A data directory is created by `mettactl init` (a new cluster) or
/// `mettactl join` (joining one); mettad then runs the node it describes.
#[derive(Debug, Parser)]
#[command(name = "mettad", version)]
struct Args {
    /// The node's data directory.
    #[arg(long, short = 'd', env = "METTA_DATA_DIR")]
    data_dir: PathBuf,
    /// Log filter (tracing env-filter syntax), e.g. `info` or `metta_control=debug`.
    #[arg(long, env = "METTA_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
            "{},openraft=warn,quinn=warn",
            args.log
        )))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let dir = DataDir(args.data_dir.clone());
    if !dir.is_configured() {
        anyhow::bail!(
            "{} holds no node: create one with `mettactl init` or `mettactl join`",
            args.data_dir.display()
        );
    }
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(async move {
        let node = Node::start(dir)
            .await
            .with_context(|| format!("starting node in {}", args.data_dir.display()))?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
            _ = node.stopped() => {
                node.shutdown().await;
                anyhow::bail!("node stopped: its identity was revoked");
            },
        }
        node.shutdown().await;
        Ok(())
    });
    // Blocking tasks (a domain start, a lane's calibration) must not hold up
    // the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
