//! # metta-tests: cross-crate tests
//!
//! The workspace layout reserves `tests/` for tests that span crates and
//! processes: multi-process clusters, faults, the QEMU lab. This crate's
//! harness boots the native kernel image (`kernel/image`) in QEMU under TCG
//! and runs it against real `mettad` processes driven by the real `mettactl`:
//!
//! - [`build`]: the kernel image (built once per test process with the cargo
//!   command `kernel/image/test.sh` uses), `mettad` and `mettactl` (built by
//!   cargo from this workspace, in the test binary's profile), the example
//!   domains (`domains/out/*.wasm`);
//! - [`qemu`]: a VM booted with `-kernel` and a command line, its serial
//!   console captured to a file; waiting for a serial line or the exit code,
//!   always with a deadline;
//! - [`control`]: a control plane made by `mettactl init` with `mettad` on a
//!   free 127.0.0.1 port, worker tokens, `mettactl` calls;
//! - [`TestDir`]: every artifact of a test (serial logs, QEMU's stderr, the
//!   node's data directory and log, the admin config) in one temporary
//!   directory.
//!
//! Everything started is killed when its handle is dropped. When a test
//! fails, the handles print the serial logs and the tail of the mettad log
//! on the way out (the test harness shows them with the failure);
//! `METTA_TEST_KEEP=1` keeps the directory.
//!
//! Networking stays on loopback: `mettad` listens on 127.0.0.1 (UDP for QUIC,
//! TCP for native nodes) and the guest reaches it as 10.0.2.2 through QEMU's
//! user-mode network, which lives inside the QEMU process.
//!
//! QEMU is required: without `qemu-system-x86_64` on `PATH` the tests fail
//! saying so (CI installs it), they do not skip.

pub mod build;
pub mod control;
pub mod qemu;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often [`wait_for`] looks again.
pub const POLL: Duration = Duration::from_millis(50);

/// Polls `f` until it returns `Some`, and panics after `timeout` naming
/// `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// A port on 127.0.0.1 free for both TCP and UDP at the time of the call
/// (`mettad` listens on both).
pub fn free_loopback_port() -> u16 {
    for _ in 0..100 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a TCP probe socket");
        let port = tcp.local_addr().expect("probe address").port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no loopback port free for both TCP and UDP after 100 tries");
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    let mut out = String::new();
    if from > 0 {
        out.push_str(&format!("[... {from} earlier lines]\n"));
    }
    for l in &lines[from..] {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// The temporary directory holding every artifact of one test. Removed on
/// drop unless `METTA_TEST_KEEP` is set.
#[derive(Debug)]
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    /// A new directory named after the test.
    pub fn new(test: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("metta-{test}-"))
            .tempdir()
            .expect("create a temporary directory");
        let path = dir.path().to_path_buf();
        TestDir {
            dir: Some(dir),
            path,
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` inside it.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("METTA_TEST_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("kept the test's artifacts in {}", d.keep().display());
            }
        } else if std::thread::panicking() {
            eprintln!(
                "the test's artifacts were in {} (set METTA_TEST_KEEP=1 to keep them)",
                self.path.display()
            );
        }
    }
}
