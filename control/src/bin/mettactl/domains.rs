//! `mettactl vendor | image | run | ps | logs | stop | call`: domains.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Subcommand;
use metta_control::client::Client;
use metta_control::transport::CallError;
use metta_proto::{
    ApiError, ApiRequest, Capability, Contract, DomainStatus, ImageInfo, Manifest, Reply, RunSpec,
    SignedManifest,
};
use metta_trust::NodeKey;
use serde_json::json;

use super::{call, fmt_bytes, print_json, Output};

#[derive(Debug, Subcommand)]
pub enum VendorCmd {
    /// Make a vendor signing key: writes `NAME.key` (private, mode 0600) and
    /// `NAME.pub` (the public key to give to clusters).
    Keygen {
        /// Vendor name (a-z, 0-9, '-'), as manifests will name it.
        name: String,
        /// Directory to write the two files to.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Trust a vendor's public key (PEM from `vendor keygen`) for images.
    Add {
        /// Vendor name.
        name: String,
        /// Its public key file (PEM).
        public_key: PathBuf,
    },
    /// List trusted vendors.
    Ls,
    /// Stop trusting a vendor: its images can no longer be pushed or run.
    Rm {
        /// Vendor name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Sign a wasm module as a vendor: writes a manifest (JSON) naming the
    /// module's blake3 hash and the capabilities the code may use.
    Sign {
        /// The wasm module.
        wasm: PathBuf,
        #[command(flatten)]
        sign: SignArgs,
        /// Where to write the manifest (default: <wasm>.manifest.json).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Store a signed image in the cluster (content-addressed by blake3). The
    /// cluster checks the signature against its trusted vendors and the
    /// module against the domain ABI.
    Push {
        /// The wasm module.
        wasm: PathBuf,
        /// Its signed manifest (default: <wasm>.manifest.json). Not needed
        /// with --key: the image is then signed and pushed in one step.
        #[arg(long, conflicts_with = "key")]
        manifest: Option<PathBuf>,
        #[command(flatten)]
        sign: OptSignArgs,
    },
    /// List images.
    Ls,
}

#[derive(Debug, Clone, clap::Args)]
pub struct SignArgs {
    /// The vendor's private key (from `vendor keygen`).
    #[arg(long)]
    key: PathBuf,
    /// Vendor name.
    #[arg(long)]
    vendor: String,
    /// Image name (default: the file name without .wasm).
    #[arg(long)]
    name: Option<String>,
    /// Image version.
    #[arg(long = "image-version", default_value = "0.1.0")]
    image_version: String,
    /// A capability the code may use: log, clock or channel:/<prefix>.
    /// Repeat for several.
    #[arg(long = "cap")]
    caps: Vec<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct OptSignArgs {
    /// Sign with this vendor key before pushing.
    #[arg(long, requires = "vendor")]
    key: Option<PathBuf>,
    /// Vendor name (with --key).
    #[arg(long, requires = "key")]
    vendor: Option<String>,
    /// Image name (with --key; default: the file name without .wasm).
    #[arg(long, requires = "key")]
    name: Option<String>,
    /// Image version (with --key).
    #[arg(long = "image-version", requires = "key", default_value = "0.1.0")]
    image_version: String,
    /// Capability (with --key): log, clock or channel:/<prefix>.
    #[arg(long = "cap", requires = "key")]
    caps: Vec<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Image name.
    image: String,
    /// Domain name (unique in the cluster).
    #[arg(long)]
    name: String,
    /// CPU contract: <slice>/<period>, e.g. 10ms/100ms — guaranteed every
    /// period.
    #[arg(long, default_value = "1ms/100ms")]
    cpu: String,
    /// Also run in time nobody is guaranteed.
    #[arg(long)]
    extra: bool,
    /// Memory limit, e.g. 64MiB, 1GiB.
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    memory: u64,
    /// Run on this node (name or id).
    #[arg(long)]
    node: Option<String>,
    /// Only on nodes with this label (k=v; repeat for several).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// If no node can admit the contract, take the best counter-offer.
    #[arg(long)]
    accept_offer: bool,
}

/// Parses `64MiB`, `1GiB`, `512KiB` or plain bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad size {s:?}: use e.g. 64MiB, 1GiB"))?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        _ => {
            return Err(format!(
                "bad size unit in {s:?}: use B, KiB, MiB, GiB or TiB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label {s:?} must be key=value"))?;
    Ok((k.to_string(), v.to_string()))
}

fn image_name(wasm: &Path, name: Option<&str>) -> anyhow::Result<String> {
    match name {
        Some(n) => Ok(n.to_string()),
        None => wasm
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("cannot take an image name from {}", wasm.display())),
    }
}

fn manifest_path(wasm: &Path) -> PathBuf {
    let mut p = wasm.as_os_str().to_owned();
    p.push(".manifest.json");
    PathBuf::from(p)
}

fn read_wasm(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn sign(wasm_path: &Path, wasm: &[u8], a: &SignArgs) -> anyhow::Result<SignedManifest> {
    let key_pem = std::fs::read_to_string(&a.key)
        .with_context(|| format!("reading vendor key {}", a.key.display()))?;
    let key =
        NodeKey::from_pem(&key_pem).map_err(|e| anyhow!("vendor key {}: {e}", a.key.display()))?;
    let capabilities = a
        .caps
        .iter()
        .map(|c| {
            c.parse::<Capability>()
                .map_err(|e| anyhow!("--cap {c}: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let manifest = Manifest {
        name: image_name(wasm_path, a.name.as_deref())?,
        version: a.image_version.clone(),
        vendor: a.vendor.clone(),
        module_hash: metta_trust::image::module_hash(wasm),
        capabilities,
    };
    manifest.validate().map_err(|e| anyhow!("manifest: {e}"))?;
    Ok(metta_trust::image::sign_manifest(manifest, &key))
}

/// The manifest file: readable JSON with hex bytes.
fn manifest_to_json(m: &SignedManifest) -> serde_json::Value {
    json!({
        "name": m.manifest.name,
        "version": m.manifest.version,
        "vendor": m.manifest.vendor,
        "module_blake3": hex::encode(m.manifest.module_hash),
        "capabilities": m.manifest.capabilities.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "vendor_key": hex::encode(&m.vendor_spki),
        "signature": hex::encode(&m.signature),
    })
}

fn manifest_from_json(text: &str) -> anyhow::Result<SignedManifest> {
    let v: serde_json::Value = serde_json::from_str(text).context("not JSON")?;
    let s = |k: &str| -> anyhow::Result<String> {
        v.get(k)
            .and_then(|x| x.as_str())
            .map(str::to_string)
            .ok_or_else(|| anyhow!("missing string field {k:?}"))
    };
    let bytes = |k: &str| -> anyhow::Result<Vec<u8>> {
        hex::decode(s(k)?).map_err(|e| anyhow!("field {k:?}: {e}"))
    };
    let hash: [u8; 32] = bytes("module_blake3")?
        .try_into()
        .map_err(|_| anyhow!("field \"module_blake3\" must be 32 bytes"))?;
    let capabilities = v
        .get("capabilities")
        .and_then(|c| c.as_array())
        .ok_or_else(|| anyhow!("missing array field \"capabilities\""))?
        .iter()
        .map(|c| {
            c.as_str()
                .ok_or_else(|| anyhow!("capabilities must be strings"))?
                .parse::<Capability>()
                .map_err(|e| anyhow!("{e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(SignedManifest {
        manifest: Manifest {
            name: s("name")?,
            version: s("version")?,
            vendor: s("vendor")?,
            module_hash: hash,
            capabilities,
        },
        vendor_spki: bytes("vendor_key")?,
        signature: bytes("signature")?,
    })
}

fn image_json(i: &ImageInfo) -> serde_json::Value {
    json!({
        "name": i.name, "version": i.version, "vendor": i.vendor,
        "module_blake3": i.module_hash, "size": i.size,
        "capabilities": i.capabilities.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "pushed_by": i.pushed_by.to_string(),
    })
}

pub async fn vendor(c: Option<&Client>, cmd: &VendorCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        VendorCmd::Keygen { name, out: dir } => {
            metta_proto::ids::check_name("vendor", name).map_err(|e| anyhow!("{e}"))?;
            let key = NodeKey::generate().map_err(|e| anyhow!("{e}"))?;
            let key_path = dir.join(format!("{name}.key"));
            let pub_path = dir.join(format!("{name}.pub"));
            if key_path.exists() {
                bail!("{} exists; not overwriting a key", key_path.display());
            }
            metta_control::config::write_atomic(&key_path, key.to_pem().as_bytes(), 0o600)?;
            let pem = p256::pkcs8::der::pem::encode_string(
                "PUBLIC KEY",
                p256::pkcs8::LineEnding::LF,
                &key.public_key_der(),
            )
            .map_err(|e| anyhow!("{e}"))?;
            metta_control::config::write_atomic(&pub_path, pem.as_bytes(), 0o644)?;
            if out == Output::Json {
                print_json(json!({"key": key_path, "public_key": pub_path,
                    "key_id": blake3::hash(&key.public_key_der()).to_hex().to_string()}));
            } else {
                eprintln!(
                    "vendor {name}: private key {} (keep it secret), public key {}",
                    key_path.display(),
                    pub_path.display()
                );
            }
            Ok(())
        }
        VendorCmd::Add { name, public_key } => {
            let c = c.ok_or_else(|| anyhow!("no client"))?;
            let text = std::fs::read_to_string(public_key)
                .with_context(|| format!("reading {}", public_key.display()))?;
            use rustls_pki_types::pem::PemObject;
            let spki =
                rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(text.as_bytes())
                    .map_err(|e| anyhow!("{}: not a PEM public key: {e}", public_key.display()))?;
            call(
                c,
                ApiRequest::VendorAdd {
                    name: name.clone(),
                    spki_der: spki.as_ref().to_vec(),
                },
            )
            .await?;
            eprintln!(
                "vendor {name} trusted (key id {})",
                blake3::hash(spki.as_ref()).to_hex()
            );
            Ok(())
        }
        VendorCmd::Ls => {
            let c = c.ok_or_else(|| anyhow!("no client"))?;
            let Reply::Vendors(vs) = call(c, ApiRequest::Vendors).await? else {
                bail!("unexpected reply");
            };
            if out == Output::Json {
                print_json(serde_json::Value::Array(
                    vs.iter()
                        .map(|v| json!({"name": v.name, "key_id": v.key_id}))
                        .collect(),
                ));
            } else {
                println!("{:<16} KEY ID", "VENDOR");
                for v in vs {
                    println!("{:<16} {}", v.name, v.key_id);
                }
            }
            Ok(())
        }
        VendorCmd::Rm { name } => {
            let c = c.ok_or_else(|| anyhow!("no client"))?;
            call(c, ApiRequest::VendorRemove { name: name.clone() }).await?;
            eprintln!("vendor {name} no longer trusted");
            Ok(())
        }
    }
}

pub async fn image(c: Option<&Client>, cmd: &ImageCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        ImageCmd::Sign {
            wasm,
            sign: a,
            out: dest,
        } => {
            let bytes = read_wasm(wasm)?;
            let signed = sign(wasm, &bytes, a)?;
            let dest = dest.clone().unwrap_or_else(|| manifest_path(wasm));
            let text = serde_json::to_string_pretty(&manifest_to_json(&signed))?;
            std::fs::write(&dest, text + "\n")
                .with_context(|| format!("writing {}", dest.display()))?;
            eprintln!(
                "signed {} {} as {} (blake3 {}); manifest in {}",
                signed.manifest.name,
                signed.manifest.version,
                signed.manifest.vendor,
                hex::encode(signed.manifest.module_hash),
                dest.display()
            );
            Ok(())
        }
        ImageCmd::Push {
            wasm,
            manifest,
            sign: a,
        } => {
            let c = c.ok_or_else(|| anyhow!("no client"))?;
            let bytes = read_wasm(wasm)?;
            let signed = match (&a.key, &a.vendor) {
                (Some(key), Some(vendor)) => sign(
                    wasm,
                    &bytes,
                    &SignArgs {
                        key: key.clone(),
                        vendor: vendor.clone(),
                        name: a.name.clone(),
                        image_version: a.image_version.clone(),
                        caps: a.caps.clone(),
                    },
                )?,
                _ => {
                    let path = manifest.clone().unwrap_or_else(|| manifest_path(wasm));
                    let text = std::fs::read_to_string(&path).with_context(|| {
                        format!(
                            "reading manifest {} (sign the image first: `mettactl image sign`, or pass --key)",
                            path.display()
                        )
                    })?;
                    manifest_from_json(&text)
                        .with_context(|| format!("manifest {}", path.display()))?
                }
            };
            let Reply::Images(infos) = call(
                c,
                ApiRequest::ImagePush {
                    manifest: signed,
                    wasm: bytes,
                },
            )
            .await?
            else {
                bail!("unexpected reply");
            };
            let info = infos.first().ok_or_else(|| anyhow!("empty reply"))?;
            if out == Output::Json {
                print_json(image_json(info));
            } else {
                eprintln!(
                    "pushed {} {} ({} bytes, blake3 {}) from vendor {}",
                    info.name,
                    info.version,
                    info.size,
                    &info.module_hash[..16],
                    info.vendor
                );
            }
            Ok(())
        }
        ImageCmd::Ls => {
            let c = c.ok_or_else(|| anyhow!("no client"))?;
            let Reply::Images(is) = call(c, ApiRequest::Images).await? else {
                bail!("unexpected reply");
            };
            if out == Output::Json {
                print_json(serde_json::Value::Array(
                    is.iter().map(image_json).collect(),
                ));
            } else {
                println!(
                    "{:<16} {:<10} {:<12} {:>8} {:<16} CAPABILITIES",
                    "IMAGE", "VERSION", "VENDOR", "SIZE", "BLAKE3"
                );
                for i in is {
                    println!(
                        "{:<16} {:<10} {:<12} {:>8} {:<16} {}",
                        i.name,
                        i.version,
                        i.vendor,
                        i.size,
                        &i.module_hash[..16],
                        i.capabilities
                            .iter()
                            .map(|c| c.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    );
                }
            }
            Ok(())
        }
    }
}

fn status_json(d: &DomainStatus) -> serde_json::Value {
    let rt = d.runtime.as_ref();
    json!({
        "name": d.name, "image": d.image, "module_blake3": d.module_hash,
        "node": d.node, "node_name": d.node_name, "lane": d.lane,
        "contract": {
            "slice_ns": d.contract.slice_ns, "period_ns": d.contract.period_ns,
            "extra": d.contract.extra, "memory": d.contract.memory,
        },
        "capabilities": d.caps.capabilities().iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "owner": d.owner.to_string(), "epoch": d.epoch,
        "state": rt.map(|r| r.state.clone()).unwrap_or_else(|| "unknown".into()),
        "cpu_ns": rt.map(|r| r.cpu_ns),
        "delivered_ppm": rt.and_then(|r| r.delivered_ppm),
        "activations": rt.map(|r| r.activations),
        "memory_bytes": rt.map(|r| r.memory_bytes),
        "start_us": rt.and_then(|r| r.start_us),
        "undelivered": rt.map(|r| r.undelivered),
        "periods": rt.map(|r| r.periods),
        "delivered_p5_ppm": rt.and_then(|r| r.delivered_p5_ppm),
        "real_p5_ppm": rt.and_then(|r| r.real_p5_ppm),
        "latency_p99_us": rt.and_then(|r| r.latency_p99_us),
    })
}

fn cpu_text(c: &Contract) -> String {
    let mut s = c.to_string();
    // Contract's Display ends with the memory; ps shows memory separately.
    if let Some(i) = s.rfind(' ') {
        s.truncate(i);
    }
    s
}

pub async fn run(c: &Client, a: &RunArgs, out: Output) -> anyhow::Result<()> {
    let (slice_ns, period_ns) =
        metta_proto::qos::parse_cpu(&a.cpu).map_err(|e| anyhow!("--cpu {}: {e}", a.cpu))?;
    let contract = Contract {
        period_ns,
        slice_ns,
        extra: a.extra,
        memory: a.memory,
    };
    contract.validate().map_err(|e| anyhow!("contract: {e}"))?;
    let spec = RunSpec {
        name: a.name.clone(),
        image: a.image.clone(),
        contract,
        node: a.node.clone(),
        labels: a.labels.clone(),
        accept_offer: a.accept_offer,
    };
    let t0 = std::time::Instant::now();
    let reply = match c.call(ApiRequest::Run(spec)).await {
        Ok(r) => r,
        Err(CallError::Api(ApiError::Unplaceable {
            reason,
            offer: Some(o),
        })) if out == Output::Json => {
            print_json(json!({
                "error": reason,
                "offer": {"node": o.node, "node_name": o.node_name,
                    "slice_ns": o.contract.slice_ns, "period_ns": o.contract.period_ns,
                    "memory": o.contract.memory, "cpu": cpu_text(&o.contract)},
            }));
            bail!("{reason}");
        }
        Err(e) => return Err(anyhow!("{e}")),
    };
    let elapsed = t0.elapsed();
    let Reply::Domains(ds) = reply else {
        bail!("unexpected reply");
    };
    let d = ds.first().ok_or_else(|| anyhow!("empty reply"))?;
    if out == Output::Json {
        let mut v = status_json(d);
        v["run_ms"] = json!(elapsed.as_secs_f64() * 1000.0);
        print_json(v);
    } else {
        let offered = d.contract != contract;
        eprintln!(
            "{} running on {} (lane {}, epoch {}) with {}{}; first activation {} after start",
            d.name,
            d.node_name,
            d.lane,
            d.epoch,
            d.contract,
            if offered {
                " (counter-offer accepted)"
            } else {
                ""
            },
            d.runtime
                .as_ref()
                .and_then(|r| r.start_us)
                .map(|us| format!("{:.2} ms", us as f64 / 1000.0))
                .unwrap_or_else(|| "?".into()),
        );
        if d.caps.is_empty() {
            eprintln!(
                "note: it runs with no capabilities (your run grants and the manifest have none in common)"
            );
        }
    }
    Ok(())
}

pub async fn ps(c: &Client, out: Output) -> anyhow::Result<()> {
    let Reply::Domains(ds) = call(c, ApiRequest::Ps).await? else {
        bail!("unexpected reply");
    };
    if out == Output::Json {
        print_json(serde_json::Value::Array(
            ds.iter().map(status_json).collect(),
        ));
        return Ok(());
    }
    println!(
        "{:<14} {:<16} {:<10} {:<18} {:>9} {:>8} {:<10} {:>5}",
        "NAME", "IMAGE", "NODE", "CONTRACT", "DELIVERED", "MEMORY", "STATE", "EPOCH"
    );
    for d in ds {
        let rt = d.runtime.as_ref();
        println!(
            "{:<14} {:<16} {:<10} {:<18} {:>9} {:>8} {:<10} {:>5}",
            d.name,
            d.image,
            d.node_name,
            cpu_text(&d.contract),
            rt.and_then(|r| r.delivered_ppm)
                .map(|p| format!("{:.1}%", p as f64 / 10_000.0))
                .unwrap_or_else(|| "-".into()),
            format!(
                "{}/{}",
                rt.map(|r| fmt_bytes(r.memory_bytes))
                    .unwrap_or_else(|| "-".into()),
                fmt_bytes(d.contract.memory)
            ),
            rt.map(|r| r.state.clone())
                .unwrap_or_else(|| "unknown".into()),
            d.epoch
        );
    }
    Ok(())
}

pub async fn logs(c: &Client, name: &str, follow: bool, out: Output) -> anyhow::Result<()> {
    let mut after = 0;
    loop {
        let Reply::Logs(chunk) = call(
            c,
            ApiRequest::Logs {
                name: name.to_string(),
                after,
            },
        )
        .await?
        else {
            bail!("unexpected reply");
        };
        if chunk.dropped > 0 {
            eprintln!("({} earlier line(s) dropped by the node)", chunk.dropped);
        }
        for (seq, text) in &chunk.lines {
            if out == Output::Json {
                println!("{}", json!({"seq": seq, "text": text}));
            } else {
                println!("{text}");
            }
        }
        after = chunk.next;
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn stop(c: &Client, name: &str) -> anyhow::Result<()> {
    call(
        c,
        ApiRequest::Stop {
            name: name.to_string(),
        },
    )
    .await?;
    eprintln!("{name} stopped");
    Ok(())
}

pub async fn call_domain(
    c: &Client,
    name: &str,
    message: &[String],
    channel: Option<&str>,
    timeout: Duration,
    out: Output,
) -> anyhow::Result<()> {
    let payload = message.join(" ").into_bytes();
    let Reply::Answer(a) = call(
        c,
        ApiRequest::Call {
            name: name.to_string(),
            channel: channel.map(str::to_string),
            payload,
            timeout_ms: timeout.as_millis().min(60_000) as u32,
        },
    )
    .await?
    else {
        bail!("unexpected reply");
    };
    let text = String::from_utf8_lossy(&a);
    if out == Output::Json {
        print_json(json!({"answer": text, "bytes": a.len()}));
    } else {
        println!("{text}");
    }
    Ok(())
}
