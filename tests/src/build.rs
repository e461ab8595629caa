//! The artifacts under test, built or found once per test process: the
//! kernel image, `mettad` and `mettactl`, the example domains.
//!
//! Builds go through cargo (`$CARGO`, the cargo running the tests) with
//! `--message-format=json-render-diagnostics`, and the executables are taken
//! from its artifact messages, so `CARGO_TARGET_DIR` and profiles are
//! followed wherever they point. A failed build panics in every test that
//! needs it, with cargo's error output.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use serde_json::Value;

/// The main workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

/// The cargo that runs the tests, else the one on `PATH`.
fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// The variables cargo sets for the test process that describe *this*
/// package (`CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`, `OUT_DIR`, ...).
fn is_package_env(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_BIN_EXE_")
        || matches!(
            key,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "OUT_DIR"
        )
}

/// `cargo` without the test process's package variables: cargo compares
/// build scripts' `rerun-if-env-changed` variables (ring's include
/// `CARGO_PKG_NAME` and `CARGO_MANIFEST_DIR`) with its own environment, so
/// with them a nested build would rerun ring's build script and rebuild
/// everything above it, and the next ordinary build would rebuild it all
/// back.
fn cargo_command() -> Command {
    without_package_env(Command::new(cargo()))
}

/// `cmd` with the package variables removed (see [`cargo_command`]).
fn without_package_env(mut cmd: Command) -> Command {
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(is_package_env) {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Runs `cargo ARGS` in `dir`; the executables of bin targets it produced
/// (or found fresh), as (target name, path).
fn cargo_build(what: &str, dir: &Path, args: &[&str]) -> Result<Vec<(String, PathBuf)>, String> {
    let shown = format!("(cd {} && cargo {})", dir.display(), args.join(" "));
    let start = Instant::now();
    let out = cargo_command()
        .current_dir(dir)
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run cargo to build {what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building {what} failed: {shown} ({}):\n{}",
            out.status,
            crate::tail(&String::from_utf8_lossy(&out.stderr), 80)
        ));
    }
    eprintln!("{what}: {shown} took {:.1?}", start.elapsed());
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        // Executables of `bin` targets, not test harnesses (`cargo test`
        // also builds each bin's unit tests, under the same target name).
        let is_bin = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "bin"));
        if msg["reason"] != "compiler-artifact" || !is_bin || msg["profile"]["test"] != false {
            continue;
        }
        if let (Some(name), Some(exe)) =
            (msg["target"]["name"].as_str(), msg["executable"].as_str())
        {
            exes.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    Ok(exes)
}

fn find(exes: &[(String, PathBuf)], name: &str, what: &str) -> Result<PathBuf, String> {
    exes.iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p.clone())
        .ok_or_else(|| format!("building {what}: cargo reported no executable `{name}`"))
}

/// The native kernel image (ELF with a multiboot1 header), built with the
/// command `kernel/image/test.sh` uses: `cargo build --release` from
/// `kernel/image` (its `.cargo/config.toml` selects the bare target and the
/// linker script, and cargo reads it from the working directory).
pub fn kernel_image() -> &'static Path {
    static IMAGE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let image = IMAGE.get_or_init(|| {
        let dir = workspace_root().join("kernel/image");
        let manifest = dir.join("Cargo.toml");
        let exes = cargo_build(
            "the kernel image",
            &dir,
            &[
                "build",
                "--release",
                "--manifest-path",
                manifest.to_str().unwrap(),
            ],
        )?;
        find(&exes, "metta-kernel", "the kernel image")
    });
    match image {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// The kernel's version (`kernel/image/Cargo.toml`), as its banner prints it.
pub fn kernel_version() -> String {
    let path = workspace_root().join("kernel/image/Cargo.toml");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .find_map(|l| {
            l.strip_prefix("version = \"")
                .and_then(|v| v.strip_suffix('"'))
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no version in {}", path.display()))
}

/// `mettad` and `mettactl`.
#[derive(Debug)]
pub struct ControlBins {
    /// The node daemon.
    pub mettad: PathBuf,
    /// The command-line client.
    pub mettactl: PathBuf,
}

/// `mettad` and `mettactl`, built the way the project's test command
/// builds them for the control plane's own tests: `cargo test --workspace
/// --no-run`, in the profile of the running test binary. Inside `cargo test
/// --workspace` that is a no-op; a narrower build (`cargo build -p
/// metta-control --bins`) resolves features differently (no
/// dev-dependencies) and would compile the TLS stack and the control plane a
/// second time.
pub fn control_bins() -> &'static ControlBins {
    static BINS: OnceLock<Result<ControlBins, String>> = OnceLock::new();
    let bins = BINS.get_or_init(|| {
        let mut args = vec!["test".to_string(), "--workspace".into(), "--no-run".into()];
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        // target/<profile>/deps/<test binary>
        let profile = exe
            .parent()
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .unwrap_or("debug")
            .to_string();
        match profile.as_str() {
            "debug" => {}
            "release" => args.push("--release".into()),
            other => args.extend(["--profile".into(), other.to_string()]),
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let exes = cargo_build("mettad and mettactl", &workspace_root(), &args)?;
        Ok(ControlBins {
            mettad: find(&exes, "mettad", "mettad")?,
            mettactl: find(&exes, "mettactl", "mettactl")?,
        })
    });
    match bins {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    }
}

/// An example domain module, `domains/out/<name>.wasm`. When it is missing
/// (the project's test command builds them first) `domains/build.sh` is run
/// once; a domain that still cannot be found fails the test.
pub fn domain_wasm(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let root = workspace_root();
    let path = root.join("domains/out").join(format!("{name}.wasm"));
    if !path.exists() {
        let built = BUILT.get_or_init(|| {
            let start = Instant::now();
            let out = without_package_env(Command::new("bash"))
                .arg(root.join("domains/build.sh"))
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run domains/build.sh: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "domains/build.sh failed ({}):\n{}",
                    out.status,
                    crate::tail(&String::from_utf8_lossy(&out.stderr), 60)
                ));
            }
            eprintln!("domains/build.sh took {:.1?}", start.elapsed());
            Ok(())
        });
        if let Err(e) = built {
            panic!("{} is missing and building it failed: {e}", path.display());
        }
    }
    assert!(
        path.exists(),
        "{} is missing (domains/build.sh did not make it)",
        path.display()
    );
    path
}

/// `qemu-system-x86_64` from `PATH`; panics saying how to install it when it
/// is not there.
pub fn qemu_binary() -> &'static Path {
    static QEMU: OnceLock<Option<PathBuf>> = OnceLock::new();
    let found = QEMU.get_or_init(|| {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => p,
        None => panic!(
            "qemu-system-x86_64 is not on PATH: these tests boot the native kernel image \
             in QEMU (Debian: apt-get install qemu-system-x86)"
        ),
    }
}
