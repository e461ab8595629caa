//! `mettactl`: the Metta operator's command-line tool.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use metta_control::client::Client;
use metta_control::config::{ClientConfig, DataDir};
use metta_control::setup::{self, InitOptions, JoinOptions};
use metta_control::transport::CallError;
use metta_proto::{ApiError, ApiRequest, Grant, Reply, Rights, Role, Subject};
use metta_trust::NodeKey;
use serde_json::json;

#[path = "mettactl/domains.rs"]
mod domains;
use domains::{ImageCmd, RunArgs, VendorCmd};

/// Drive a Metta cluster: create it, join machines, see nodes, manage tokens,
/// users and grants; sign and push images, run domains and operate them.
///
/// Credentials come from a client config file (`--config`, `$METTA_CONFIG`, or
/// `~/.metta/config`), written by `mettactl init` for the admin and by
/// `mettactl user add` for everyone else.
#[derive(Debug, Parser)]
#[command(name = "mettactl", version, propagate_version = true)]
struct Cli {
    /// Client config file (cluster address, CA, your certificate and key).
    #[arg(long, global = true, env = "METTA_CONFIG")]
    config: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Human-readable table.
    Table,
    /// JSON, for scripts.
    Json,
}

#[derive(Debug, Clone, clap::Args)]
struct StartArgs {
    /// Start mettad in the background (log in <data-dir>/mettad.log) and
    /// return once it serves.
    #[arg(long, conflicts_with = "no_start")]
    detach: bool,
    /// Only write the data directory; start it later with `mettad --data-dir`.
    #[arg(long)]
    no_start: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a new cluster: its CA, the first (control) node and the admin's
    /// client config, then start the first node as Raft leader.
    Init {
        /// Cluster name (a-z, 0-9, '-').
        #[arg(long, default_value = "metta")]
        cluster: String,
        /// Data directory of the first node.
        #[arg(long, short = 'd')]
        data_dir: PathBuf,
        /// UDP address to listen on, e.g. 127.0.0.1:7001.
        #[arg(long)]
        listen: String,
        /// Address other machines use to reach this node (default: --listen).
        #[arg(long)]
        advertise: Option<String>,
        /// Node name (default: node-1).
        #[arg(long, default_value = "node-1")]
        name: String,
        /// Node certificate lifetime, e.g. 24h, 90m (renewed automatically).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        cert_lifetime: Duration,
        /// Overwrite an existing admin config file.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        start: StartArgs,
    },
    /// Join this machine to a cluster with a token from `mettactl token create`.
    Join {
        /// Address of any member, e.g. 127.0.0.1:7001.
        addr: String,
        /// The join token (it pins the cluster CA: an impostor is refused).
        #[arg(long, env = "METTA_TOKEN")]
        token: String,
        /// This node's data directory.
        #[arg(long, short = 'd')]
        data_dir: PathBuf,
        /// UDP address to listen on.
        #[arg(long)]
        listen: String,
        /// Address other machines use to reach this node (default: --listen).
        #[arg(long)]
        advertise: Option<String>,
        /// Node name (default: the host name part of the data dir).
        #[arg(long)]
        name: Option<String>,
        /// Node certificate lifetime, e.g. 24h.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        cert_lifetime: Duration,
        #[command(flatten)]
        start: StartArgs,
    },
    /// Cluster status as seen by the node answering.
    Status,
    /// List nodes (or remove one).
    Nodes {
        #[command(subcommand)]
        cmd: Option<NodesCmd>,
    },
    /// Join tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Users.
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Grant rights to a user or node: `mettactl grant alice read,write --on /kv`.
    Grant {
        /// Who receives the grant: `alice`, `user/alice` or `node/3`.
        subject: String,
        /// Rights: comma-separated read, write, run (or all).
        rights: String,
        /// Resource path the grant applies to (`/` is everything).
        #[arg(long = "on", default_value = "/")]
        resource: String,
        /// Let the subject grant (narrower) rights onward.
        #[arg(long)]
        delegable: bool,
        /// Lifetime, e.g. 30d, 12h (default: until revoked).
        #[arg(long, value_parser = parse_duration)]
        expires: Option<Duration>,
        /// Your own grant this one derives from (default: found automatically;
        /// not needed for the admin).
        #[arg(long)]
        from: Option<String>,
    },
    /// List grants.
    Grants {
        /// Only grants held by this subject.
        #[arg(long)]
        subject: Option<String>,
    },
    /// Revoke a user or node identity (`user/alice`, `node/3`), or a grant.
    Revoke {
        /// The subject to revoke.
        #[arg(required_unless_present = "grant")]
        subject: Option<String>,
        /// Revoke a grant by id (or a unique prefix) instead.
        #[arg(long, conflicts_with = "subject")]
        grant: Option<String>,
    },
    /// The registry's key space.
    Kv {
        #[command(subcommand)]
        cmd: KvCmd,
    },
    /// Image-signing vendors: make a key, trust a vendor, list, remove.
    Vendor {
        #[command(subcommand)]
        cmd: VendorCmd,
    },
    /// Domain images: sign, push (content-addressed), list.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Run a domain: the scheduler places it on a node that can admit its
    /// contract, or answers with a counter-offer.
    ///
    /// The domain may use what both you and the image's vendor allow: your
    /// `run` grants on /log, /clock and /channels/<prefix> intersected with
    /// the manifest's capabilities.
    ///
    /// Example: mettactl run counter --name c1 --cpu 10ms/100ms --memory 64MiB
    Run(RunArgs),
    /// List domains: node, contract, CPU delivered over the last periods as a
    /// share of the contract, memory, state, epoch.
    Ps,
    /// A domain's log lines (and the nucleus's notes about it, such as
    /// denied calls).
    Logs {
        /// Domain.
        name: String,
        /// Keep printing new lines.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Stop a domain and free its share.
    Stop {
        /// Domain.
        name: String,
    },
    /// Send a message to a domain's channel and print its answer:
    /// `mettactl call c1 incr`.
    Call {
        /// Domain.
        name: String,
        /// The message (words are joined with spaces).
        #[arg(required = true, trailing_var_arg = true)]
        message: Vec<String>,
        /// Channel (default: the domain's first channel).
        #[arg(long)]
        channel: Option<String>,
        /// How long to wait for the answer, e.g. 5s.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum NodesCmd {
    /// List nodes (the default).
    Ls,
    /// Remove a node: revoke its identity and drop it from the Raft group.
    Rm {
        /// Node name or id.
        node: String,
    },
    /// Label a node (`zone=attic`) or remove a label (`zone-`); `run
    /// --label` places domains by them.
    Label {
        /// Node name or id.
        node: String,
        /// `key=value` to set, `key-` to remove.
        #[arg(required = true)]
        labels: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Create a join token.
    Create {
        /// Role of the machine that joins with it.
        #[arg(long, value_parser = parse_role, default_value = "worker")]
        role: Role,
        /// Lifetime, e.g. 1h, 30m.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// How many machines may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// List tokens (without secrets).
    Ls,
    /// Revoke a token.
    Revoke {
        /// Token id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum UserCmd {
    /// Add a user and write their client config.
    Add {
        /// User name (a-z, 0-9, '-').
        name: String,
        /// Where to write the new user's config (default: ./<name>.mettaconfig).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List users.
    Ls,
}

#[derive(Debug, Subcommand)]
enum KvCmd {
    /// Write a key.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
    /// Read a key.
    Get {
        /// Key.
        key: String,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
        .map_err(|e: metta_proto::SubjectParseError| e.to_string())
}

/// Parses `90s`, `30m`, `24h`, `7d` or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: use e.g. 90s, 30m, 24h, 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("bad duration unit in {s:?}: use s, m, h or d")),
    };
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("duration {s:?} is too long"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_path(cli: &Cli) -> PathBuf {
    cli.config
        .clone()
        .unwrap_or_else(ClientConfig::default_path)
}

fn client(cli: &Cli) -> anyhow::Result<Client> {
    let path = config_path(cli);
    let cfg = ClientConfig::load(&path).with_context(|| {
        format!(
            "reading client config {} (create a cluster with `mettactl init`, or pass --config)",
            path.display()
        )
    })?;
    Ok(Client::new(&cfg)?)
}

fn api_err(e: CallError) -> anyhow::Error {
    anyhow!("{e}")
}

async fn call(c: &Client, req: ApiRequest) -> anyhow::Result<Reply> {
    c.call(req).await.map_err(api_err)
}

fn print_json(v: serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}

/// What a token is good for now: `revoked`, `used` (no joins left),
/// `expired` or `active`.
fn token_state(t: &metta_proto::TokenInfo) -> &'static str {
    if t.revoked {
        "revoked"
    } else if t.uses_left == 0 {
        "used"
    } else if t.expires_at <= metta_control::clock::now() {
        "expired"
    } else {
        "active"
    }
}

/// What a grant is good for now: `revoked` (it, its subject or its issuer),
/// `expired` or `active`.
fn grant_state(g: &metta_proto::GrantInfo) -> &'static str {
    if g.revoked {
        "revoked"
    } else if g
        .grant
        .grant
        .expires_at
        .is_some_and(|t| t <= metta_control::clock::now())
    {
        "expired"
    } else {
        "active"
    }
}

fn fmt_time(t: u64) -> String {
    let now = metta_control::clock::now();
    if t <= now {
        return "expired".into();
    }
    let d = t - now;
    if d >= 86400 * 2 {
        format!("in {}d", d / 86400)
    } else if d >= 7200 {
        format!("in {}h", d / 3600)
    } else if d >= 120 {
        format!("in {}m", d / 60)
    } else {
        format!("in {d}s")
    }
}

fn fmt_bytes(b: u64) -> String {
    const GIB: u64 = 1 << 30;
    if b >= GIB {
        format!("{:.1}GiB", b as f64 / GIB as f64)
    } else {
        format!("{}MiB", b >> 20)
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.cmd {
        Cmd::Init {
            cluster,
            data_dir,
            listen,
            advertise,
            name,
            cert_lifetime,
            force,
            start,
        } => {
            let admin_config = config_path(&cli);
            let cfg = setup::init(&InitOptions {
                cluster: cluster.clone(),
                data_dir: data_dir.clone(),
                listen: listen.clone(),
                advertise: advertise.clone(),
                name: name.clone(),
                admin_config: admin_config.clone(),
                force: *force,
                cert_lifetime_secs: cert_lifetime.as_secs(),
            })?;
            eprintln!(
                "created cluster {} (CA and node/1 in {}); admin config written to {}",
                cfg.cluster,
                data_dir.display(),
                admin_config.display()
            );
            let admin = ClientConfig::load(&admin_config)?;
            start_node(data_dir, start, &admin).await
        }
        Cmd::Join {
            addr,
            token,
            data_dir,
            listen,
            advertise,
            name,
            cert_lifetime,
            start,
        } => {
            let name = match name {
                Some(n) => n.clone(),
                None => default_name(data_dir),
            };
            let joined = setup::join(&JoinOptions {
                addr: addr.clone(),
                token: token.clone(),
                data_dir: data_dir.clone(),
                listen: listen.clone(),
                advertise: advertise.clone(),
                name,
                cert_lifetime_secs: cert_lifetime.as_secs(),
            })
            .await?;
            eprintln!(
                "joined cluster {} as node/{} ({}) in {} ms; data in {}",
                joined.config.cluster,
                joined.config.node_id,
                joined.config.role,
                joined.elapsed.as_millis(),
                data_dir.display()
            );
            if cli.output == Output::Json {
                print_json(json!({
                    "cluster": joined.config.cluster,
                    "node_id": joined.config.node_id,
                    "role": joined.config.role.to_string(),
                    "join_ms": joined.elapsed.as_secs_f64() * 1000.0,
                }));
            }
            let node_client = node_client_config(data_dir)?;
            start_node(data_dir, start, &node_client).await
        }
        Cmd::Status => {
            let c = client(&cli)?;
            let Reply::Status(s) = call(&c, ApiRequest::Status).await? else {
                bail!("unexpected reply");
            };
            if cli.output == Output::Json {
                print_json(json!({
                    "cluster": s.cluster, "you": s.you.to_string(), "leader": s.leader,
                    "term": s.term, "applied": s.applied, "answered_by": s.node,
                }));
            } else {
                println!("cluster:  {}", s.cluster);
                println!("you:      {}", s.you);
                println!(
                    "leader:   {}",
                    s.leader
                        .map(|l| format!("node/{l}"))
                        .unwrap_or("none".into())
                );
                println!("term:     {}", s.term);
                println!("applied:  {}", s.applied);
            }
            Ok(())
        }
        Cmd::Nodes { cmd } => {
            let c = client(&cli)?;
            match cmd {
                None | Some(NodesCmd::Ls) => {
                    let Reply::Nodes(nodes) = call(&c, ApiRequest::Nodes).await? else {
                        bail!("unexpected reply");
                    };
                    if cli.output == Output::Json {
                        print_json(serde_json::Value::Array(
                            nodes
                                .iter()
                                .map(|n| {
                                    json!({
                                        "id": n.id, "name": n.name, "role": n.role.to_string(),
                                        "kind": n.kind.to_string(), "addr": n.addr,
                                        "status": if n.up {"up"} else {"down"},
                                        "last_seen_ms": n.last_seen_ms,
                                        "cpus": n.resources.cpus,
                                        "memory_bytes": n.resources.memory_bytes,
                                        "arch": n.resources.arch,
                                        "cert_not_after": n.cert_not_after,
                                        "raft": n.raft.to_string(),
                                        "labels": n.labels.iter().cloned()
                                            .collect::<std::collections::BTreeMap<_, _>>(),
                                    })
                                })
                                .collect(),
                        ));
                    } else {
                        println!(
                            "{:<4} {:<12} {:<8} {:<7} {:<22} {:<6} {:>4} {:>9} {:<10} RAFT",
                            "ID",
                            "NAME",
                            "ROLE",
                            "KIND",
                            "ADDRESS",
                            "STATUS",
                            "CPUS",
                            "MEMORY",
                            "CERT"
                        );
                        for n in nodes {
                            println!(
                                "{:<4} {:<12} {:<8} {:<7} {:<22} {:<6} {:>4} {:>9} {:<10} {}",
                                n.id,
                                n.name,
                                n.role.to_string(),
                                n.kind.to_string(),
                                n.addr,
                                if n.up { "up" } else { "down" },
                                n.resources.cpus,
                                fmt_bytes(n.resources.memory_bytes),
                                fmt_time(n.cert_not_after),
                                n.raft
                            );
                            if !n.labels.is_empty() {
                                let ls: Vec<String> =
                                    n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                                println!("     labels: {}", ls.join(" "));
                            }
                        }
                    }
                }
                Some(NodesCmd::Rm { node }) => {
                    let id = match node.parse::<u64>() {
                        Ok(id) => id,
                        Err(_) => {
                            let Reply::Nodes(ns) = call(&c, ApiRequest::Nodes).await? else {
                                bail!("unexpected reply");
                            };
                            ns.iter()
                                .find(|n| n.name == *node)
                                .map(|n| n.id)
                                .ok_or_else(|| {
                                    anyhow!("no node named {node:?} (see `mettactl nodes`)")
                                })?
                        }
                    };
                    call(&c, ApiRequest::NodeRemove { id }).await?;
                    eprintln!("node/{id} removed and its identity revoked");
                }
                Some(NodesCmd::Label { node, labels }) => {
                    for l in labels {
                        let (key, value) = match (l.split_once('='), l.strip_suffix('-')) {
                            (Some((k, v)), _) => (k.to_string(), Some(v.to_string())),
                            (None, Some(k)) => (k.to_string(), None),
                            (None, None) => bail!("label {l:?}: use key=value or key-"),
                        };
                        call(
                            &c,
                            ApiRequest::NodeLabel {
                                node: node.clone(),
                                key,
                                value,
                            },
                        )
                        .await?;
                    }
                    eprintln!("node {node} labelled");
                }
            }
            Ok(())
        }
        Cmd::Token { cmd } => {
            let c = client(&cli)?;
            match cmd {
                TokenCmd::Create { role, ttl, uses } => {
                    let Reply::Token {
                        token,
                        id,
                        expires_at,
                    } = call(
                        &c,
                        ApiRequest::TokenCreate {
                            role: *role,
                            ttl_secs: ttl.as_secs(),
                            uses: *uses,
                        },
                    )
                    .await?
                    else {
                        bail!("unexpected reply");
                    };
                    if cli.output == Output::Json {
                        print_json(json!({"token": token, "id": id, "expires_at": expires_at}));
                    } else {
                        println!("{token}");
                        eprintln!(
                            "token {id}: role {role}, {uses} use(s), expires {}",
                            fmt_time(expires_at)
                        );
                    }
                }
                TokenCmd::Ls => {
                    let Reply::Tokens(ts) = call(&c, ApiRequest::TokenList).await? else {
                        bail!("unexpected reply");
                    };
                    if cli.output == Output::Json {
                        print_json(serde_json::Value::Array(
                            ts.iter()
                                .map(|t| {
                                    json!({"id": t.id, "role": t.role.to_string(),
                                    "expires_at": t.expires_at, "uses_left": t.uses_left,
                                    "revoked": t.revoked, "state": token_state(t),
                                    "created_by": t.created_by.to_string()})
                                })
                                .collect(),
                        ));
                    } else {
                        println!(
                            "{:<10} {:<8} {:<10} {:>4} {:<8} CREATED BY",
                            "ID", "ROLE", "EXPIRES", "USES", "STATE"
                        );
                        for t in ts {
                            println!(
                                "{:<10} {:<8} {:<10} {:>4} {:<8} {}",
                                t.id,
                                t.role.to_string(),
                                fmt_time(t.expires_at),
                                t.uses_left,
                                token_state(&t),
                                t.created_by
                            );
                        }
                    }
                }
                TokenCmd::Revoke { id } => {
                    call(&c, ApiRequest::TokenRevoke { id: id.clone() }).await?;
                    eprintln!("token {id} revoked");
                }
            }
            Ok(())
        }
        Cmd::User { cmd } => {
            let c = client(&cli)?;
            match cmd {
                UserCmd::Add { name, out } => {
                    let out = out
                        .clone()
                        .unwrap_or_else(|| PathBuf::from(format!("{name}.mettaconfig")));
                    if out.exists() {
                        bail!("{} already exists", out.display());
                    }
                    let subject: Subject = format!("user/{name}").parse()?;
                    let key = NodeKey::generate()?;
                    let csr = metta_trust::make_csr(&key, &subject, c.cluster())?;
                    let Reply::Cert { cert_pem, .. } = call(
                        &c,
                        ApiRequest::UserAdd {
                            name: name.clone(),
                            csr_pem: csr,
                        },
                    )
                    .await?
                    else {
                        bail!("unexpected reply");
                    };
                    let mine = ClientConfig::load(&config_path(&cli))?;
                    ClientConfig {
                        cluster: mine.cluster,
                        subject: subject.to_string(),
                        endpoints: mine.endpoints,
                        ca_pem: mine.ca_pem,
                        cert_pem,
                        key_pem: key.to_pem(),
                    }
                    .save(&out, false)?;
                    eprintln!(
                        "user {name} added; their client config is {} (mode 0600) — hand it over privately",
                        out.display()
                    );
                    if cli.output == Output::Json {
                        print_json(json!({"user": name, "config": out}));
                    }
                }
                UserCmd::Ls => {
                    let Reply::Users(us) = call(&c, ApiRequest::UserList).await? else {
                        bail!("unexpected reply");
                    };
                    if cli.output == Output::Json {
                        print_json(serde_json::Value::Array(
                            us.iter()
                                .map(|u| json!({"name": u.name, "admin": u.admin, "revoked": u.revoked}))
                                .collect(),
                        ));
                    } else {
                        println!("{:<16} STATE", "NAME");
                        for u in us {
                            let state = if u.revoked {
                                "revoked"
                            } else if u.admin {
                                "admin"
                            } else {
                                "active"
                            };
                            println!("{:<16} {state}", u.name);
                        }
                    }
                }
            }
            Ok(())
        }
        Cmd::Grant {
            subject,
            rights,
            resource,
            delegable,
            expires,
            from,
        } => {
            let c = client(&cli)?;
            let subject: Subject = subject.parse()?;
            let rights: Rights = rights.parse()?;
            if !resource.starts_with('/') {
                bail!("resource must be a path starting with '/', e.g. /kv or /nodes");
            }
            let now = metta_control::clock::now();
            let parent = match from {
                Some(prefix) => Some(find_grant(&c, prefix).await?),
                None => auto_parent(&c, rights, resource, now).await?,
            };
            let grant = Grant {
                issuer: c.subject().clone(),
                subject,
                rights,
                resource: resource.clone(),
                expires_at: expires.map(|d| now + d.as_secs()),
                delegable: *delegable,
                parent,
                issued_at: now,
            };
            let signed = metta_trust::grants::sign_grant(grant, c.key());
            let Reply::GrantAdded(id) = call(&c, ApiRequest::Grant(signed)).await? else {
                bail!("unexpected reply");
            };
            if cli.output == Output::Json {
                print_json(json!({"id": hex::encode(id.0)}));
            } else {
                println!("{id}");
            }
            Ok(())
        }
        Cmd::Grants { subject } => {
            let c = client(&cli)?;
            let subject = subject.as_deref().map(str::parse).transpose()?;
            let Reply::Grants(gs) = call(&c, ApiRequest::Grants { subject }).await? else {
                bail!("unexpected reply");
            };
            if cli.output == Output::Json {
                print_json(serde_json::Value::Array(
                    gs.iter()
                        .map(|g| {
                            let gr = &g.grant.grant;
                            json!({"id": hex::encode(g.id.0), "issuer": gr.issuer.to_string(),
                            "subject": gr.subject.to_string(), "rights": gr.rights.to_string(),
                            "resource": gr.resource, "expires_at": gr.expires_at,
                            "delegable": gr.delegable,
                            "parent": gr.parent.map(|p| hex::encode(p.0)),
                            "revoked": g.revoked, "state": grant_state(g)})
                        })
                        .collect(),
                ));
            } else {
                println!(
                    "{:<16} {:<14} {:<14} {:<16} {:<12} {:<10} {:<9} STATE",
                    "ID", "ISSUER", "SUBJECT", "RIGHTS", "RESOURCE", "EXPIRES", "DELEGABLE"
                );
                for g in gs {
                    let gr = &g.grant.grant;
                    println!(
                        "{:<16} {:<14} {:<14} {:<16} {:<12} {:<10} {:<9} {}",
                        g.id.to_string(),
                        gr.issuer.to_string(),
                        gr.subject.to_string(),
                        gr.rights.to_string(),
                        gr.resource,
                        gr.expires_at.map(fmt_time).unwrap_or("never".into()),
                        if gr.delegable { "yes" } else { "no" },
                        grant_state(&g)
                    );
                }
            }
            Ok(())
        }
        Cmd::Revoke { subject, grant } => {
            let c = client(&cli)?;
            if let Some(g) = grant {
                call(&c, ApiRequest::RevokeGrant { id: g.clone() }).await?;
                eprintln!("grant {g} revoked");
            } else if let Some(s) = subject {
                let s: Subject = s.parse()?;
                call(&c, ApiRequest::RevokeSubject(s.clone())).await?;
                eprintln!(
                    "{s} revoked: its connections close and new handshakes fail on every node"
                );
            }
            Ok(())
        }
        Cmd::Vendor { cmd } => {
            let c = match cmd {
                VendorCmd::Keygen { .. } => None,
                _ => Some(client(&cli)?),
            };
            domains::vendor(c.as_ref(), cmd, cli.output).await
        }
        Cmd::Image { cmd } => {
            let c = match cmd {
                ImageCmd::Sign { .. } => None,
                _ => Some(client(&cli)?),
            };
            domains::image(c.as_ref(), cmd, cli.output).await
        }
        Cmd::Run(args) => domains::run(&client(&cli)?, args, cli.output).await,
        Cmd::Ps => domains::ps(&client(&cli)?, cli.output).await,
        Cmd::Logs { name, follow } => {
            domains::logs(&client(&cli)?, name, *follow, cli.output).await
        }
        Cmd::Stop { name } => domains::stop(&client(&cli)?, name).await,
        Cmd::Call {
            name,
            message,
            channel,
            timeout,
        } => {
            domains::call_domain(
                &client(&cli)?,
                name,
                message,
                channel.as_deref(),
                *timeout,
                cli.output,
            )
            .await
        }
        Cmd::Kv { cmd } => {
            let c = client(&cli)?;
            match cmd {
                KvCmd::Put { key, value } => {
                    call(
                        &c,
                        ApiRequest::KvPut {
                            key: key.clone(),
                            value: value.as_bytes().to_vec(),
                        },
                    )
                    .await?;
                }
                KvCmd::Get { key } => {
                    let Reply::Value(v) = call(&c, ApiRequest::KvGet { key: key.clone() }).await?
                    else {
                        bail!("unexpected reply");
                    };
                    match v {
                        Some(v) => println!("{}", String::from_utf8_lossy(&v)),
                        None => bail!("key {key:?} not found"),
                    }
                }
            }
            Ok(())
        }
    }
}

async fn find_grant(c: &Client, prefix: &str) -> anyhow::Result<metta_proto::GrantId> {
    let Reply::Grants(gs) = call(c, ApiRequest::Grants { subject: None }).await? else {
        bail!("unexpected reply");
    };
    let m: Vec<_> = gs
        .iter()
        .filter(|g| hex::encode(g.id.0).starts_with(&prefix.to_ascii_lowercase()))
        .collect();
    match m.as_slice() {
        [one] => Ok(one.id),
        [] => bail!("no grant with id {prefix}"),
        _ => bail!("grant id prefix {prefix} is ambiguous"),
    }
}

/// For a non-admin issuer: the first of its own live, delegable grants that
/// covers what is being granted.
async fn auto_parent(
    c: &Client,
    rights: Rights,
    resource: &str,
    now: u64,
) -> anyhow::Result<Option<metta_proto::GrantId>> {
    if c.subject() == &Subject::User("admin".into()) {
        return Ok(None);
    }
    let Reply::Grants(gs) = call(
        c,
        ApiRequest::Grants {
            subject: Some(c.subject().clone()),
        },
    )
    .await?
    else {
        bail!("unexpected reply");
    };
    Ok(gs
        .iter()
        .find(|g| {
            let gr = &g.grant.grant;
            !g.revoked
                && gr.delegable
                && gr.rights.covers(rights)
                && metta_proto::grant::resource_covers(&gr.resource, resource)
                && gr.expires_at.is_none_or(|e| e > now)
        })
        .map(|g| g.id))
}

fn default_name(dir: &Path) -> String {
    let base = dir
        .file_name()
        .map(|s| s.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let clean: String = base
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .trim_matches('-')
        .chars()
        .take(63)
        .collect();
    if clean.is_empty() {
        "node".into()
    } else {
        clean
    }
}

/// A client config carrying a node's own credentials (to ask it for status).
fn node_client_config(data_dir: &Path) -> anyhow::Result<ClientConfig> {
    let dir = DataDir(data_dir.to_path_buf());
    let cfg = dir.load_config()?;
    Ok(ClientConfig {
        cluster: cfg.cluster,
        subject: format!("node/{}", cfg.node_id),
        endpoints: vec![cfg.advertise],
        ca_pem: std::fs::read_to_string(dir.ca_cert())?,
        cert_pem: std::fs::read_to_string(dir.node_cert())?,
        key_pem: std::fs::read_to_string(dir.node_key())?,
    })
}

fn mettad_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let sibling = exe.with_file_name("mettad");
    if sibling.exists() {
        sibling
    } else {
        PathBuf::from("mettad")
    }
}

async fn start_node(
    data_dir: &Path,
    start: &StartArgs,
    probe: &ClientConfig,
) -> anyhow::Result<()> {
    if start.no_start {
        eprintln!("start it with: mettad --data-dir {}", data_dir.display());
        return Ok(());
    }
    let mettad = mettad_path();
    if !start.detach {
        use std::os::unix::process::CommandExt;
        let err = std::process::Command::new(&mettad)
            .arg("--data-dir")
            .arg(data_dir)
            .exec();
        bail!("cannot run {}: {err}", mettad.display());
    }
    let log_path = data_dir.join("mettad.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new(&mettad)
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", mettad.display()))?;
    let client = Client::new(probe)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "mettad exited ({status}) during start-up; see {}",
                log_path.display()
            );
        }
        match client.call(ApiRequest::Status).await {
            Ok(Reply::Status(s)) if s.leader.is_some() => {
                eprintln!(
                    "mettad (pid {}) serving node/{} on {}; log: {}",
                    child.id(),
                    s.node,
                    probe.endpoints[0],
                    log_path.display()
                );
                client.close();
                return Ok(());
            }
            Ok(_)
            | Err(CallError::Transport(_))
            | Err(CallError::Api(ApiError::Unavailable(_))) => {}
            Err(e) => bail!("node answered with an error during start-up: {e}"),
        }
        if Instant::now() > deadline {
            bail!(
                "mettad did not become ready within 30 s; see {}",
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
