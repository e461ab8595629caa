//! On-disk configuration: a node's data directory and a client config file.
//!
//! Data directory of a node:
//!
//! ```text
//! node.toml        NodeConfig: cluster, id, role, addresses (QUIC on UDP, TLS on
//!                  TCP for native nodes), certificate lifetime
//! node.key         the node's P-256 key (PKCS#8 PEM, 0600)
//! node.pem         its current certificate
//! ca.pem           the cluster CA certificate
//! ca.key           the CA key — control nodes only (0600)
//! raft.redb        Raft log, vote, snapshots (fsync'd)
//! bootstrap.json   the cluster's first registry entry, until it is committed
//! ```
//!
//! A client config (`mettactl --config`, default `$METTA_CONFIG` or
//! `~/.metta/config`) holds everything a client needs — cluster name, node
//! addresses, the CA, the user's certificate and key — in one 0600 TOML file, in
//! the spirit of kubeconfig / talosconfig.
//!
//! Every file is written atomically (temporary file, fsync, rename), so a crash
//! never leaves half a key or half a config behind.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use metta_proto::{NodeId, Role, Subject};
use serde::{Deserialize, Serialize};

/// Errors reading or writing configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A file could not be read or written.
    // The cause is part of the message, not a `source`: printed once.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        cause: std::io::Error,
    },
    /// A file is not valid TOML / JSON of the expected shape.
    #[error("{path}: {msg}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Refusing to overwrite.
    #[error("{0} already exists (remove it or choose another path)")]
    Exists(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ConfigError + '_ {
    move |cause| ConfigError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

/// Writes `bytes` to `path` atomically with the given Unix mode.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ConfigError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id() ^ rand::random::<u32>()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads a file to a string.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    fs::read_to_string(path).map_err(io_err(path))
}

/// A node's own configuration (`node.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfig {
    /// Cluster name.
    pub cluster: String,
    /// This node's id.
    pub node_id: NodeId,
    /// Human name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Address to listen on: QUIC on this UDP port, and TLS/TCP for native
    /// nodes on the same TCP port unless `listen_tcp` says otherwise.
    pub listen: String,
    /// TCP address for native nodes (TLS 1.3; default: `listen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_tcp: Option<String>,
    /// Address other members use to reach this node.
    pub advertise: String,
    /// Lifetime of node certificates in seconds (renewed at 2/3 of it).
    pub cert_lifetime_secs: u64,
    /// Addresses of other members known at join (used to find the leader).
    #[serde(default)]
    pub seeds: Vec<String>,
}

impl NodeConfig {
    /// The TCP address to listen on for native nodes.
    pub fn tcp_listen(&self) -> &str {
        self.listen_tcp.as_deref().unwrap_or(&self.listen)
    }
}

/// Paths within a node's data directory.
#[derive(Debug, Clone)]
pub struct DataDir(pub PathBuf);

impl DataDir {
    /// `node.toml`.
    pub fn node_toml(&self) -> PathBuf {
        self.0.join("node.toml")
    }
    /// `node.key`.
    pub fn node_key(&self) -> PathBuf {
        self.0.join("node.key")
    }
    /// `node.pem`.
    pub fn node_cert(&self) -> PathBuf {
        self.0.join("node.pem")
    }
    /// `ca.pem`.
    pub fn ca_cert(&self) -> PathBuf {
        self.0.join("ca.pem")
    }
    /// `ca.key`.
    pub fn ca_key(&self) -> PathBuf {
        self.0.join("ca.key")
    }
    /// `bootstrap.json`.
    pub fn bootstrap(&self) -> PathBuf {
        self.0.join("bootstrap.json")
    }
    /// The Raft store directory (the data dir itself).
    pub fn store(&self) -> PathBuf {
        self.0.clone()
    }
    /// Whether a node was configured here.
    pub fn is_configured(&self) -> bool {
        self.node_toml().exists()
    }

    /// Reads `node.toml`.
    pub fn load_config(&self) -> Result<NodeConfig, ConfigError> {
        let p = self.node_toml();
        toml::from_str(&read(&p)?).map_err(|e| ConfigError::Parse {
            path: p,
            msg: e.to_string(),
        })
    }

    /// Writes `node.toml`.
    pub fn save_config(&self, c: &NodeConfig) -> Result<(), ConfigError> {
        let text = toml::to_string(c).map_err(|e| ConfigError::Parse {
            path: self.node_toml(),
            msg: e.to_string(),
        })?;
        write_atomic(&self.node_toml(), text.as_bytes(), 0o644)
    }
}

/// A client's view of a cluster and its credentials.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientConfig {
    /// Cluster name.
    pub cluster: String,
    /// Who the credentials name (`user/<name>`).
    pub subject: String,
    /// Node addresses to try, in order.
    pub endpoints: Vec<String>,
    /// The cluster CA (PEM).
    pub ca_pem: String,
    /// The client certificate (PEM).
    pub cert_pem: String,
    /// The client key (PKCS#8 PEM).
    pub key_pem: String,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("cluster", &self.cluster)
            .field("subject", &self.subject)
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// The default location: `$METTA_CONFIG`, else `~/.metta/config`.
    pub fn default_path() -> PathBuf {
        if let Some(p) = std::env::var_os("METTA_CONFIG") {
            return PathBuf::from(p);
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
        PathBuf::from(home).join(".metta").join("config")
    }

    /// Loads a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let c: ClientConfig = toml::from_str(&read(path)?).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        if c.endpoints.is_empty() {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                msg: "no endpoints listed".into(),
            });
        }
        Ok(c)
    }

    /// Writes the config with mode 0600; refuses to overwrite unless `force`.
    pub fn save(&self, path: &Path, force: bool) -> Result<(), ConfigError> {
        if path.exists() && !force {
            return Err(ConfigError::Exists(path.to_path_buf()));
        }
        let text = toml::to_string(self).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        write_atomic(path, text.as_bytes(), 0o600)
    }

    /// The subject the credentials name.
    pub fn subject(&self) -> Option<Subject> {
        self.subject.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn client_config_is_private_and_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/admin.conf");
        let c = ClientConfig {
            cluster: "lab".into(),
            subject: "user/admin".into(),
            endpoints: vec!["127.0.0.1:7000".into()],
            ca_pem: "ca".into(),
            cert_pem: "cert".into(),
            key_pem: "secret".into(),
        };
        c.save(&p, false).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(c.save(&p, false), Err(ConfigError::Exists(_))));
        assert_eq!(ClientConfig::load(&p).unwrap(), c);
        assert!(!format!("{c:?}").contains("secret"));
    }

    #[test]
    fn node_toml_without_listen_tcp_still_loads_and_defaults_to_listen() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir(dir.path().to_path_buf());
        fs::write(
            d.node_toml(),
            "cluster = \"lab\"\nnode_id = 1\nname = \"n1\"\nrole = \"Control\"\n\
             listen = \"127.0.0.1:7000\"\nadvertise = \"127.0.0.1:7000\"\n\
             cert_lifetime_secs = 86400\n",
        )
        .unwrap();
        let mut c = d.load_config().unwrap();
        assert_eq!(c.listen_tcp, None);
        assert_eq!(c.tcp_listen(), "127.0.0.1:7000");
        c.listen_tcp = Some("127.0.0.1:7001".into());
        d.save_config(&c).unwrap();
        let back = d.load_config().unwrap();
        assert_eq!(back.tcp_listen(), "127.0.0.1:7001");
        assert_eq!(back, c);
    }

    #[test]
    fn garbage_config_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        fs::write(&p, "cluster = 3\n").unwrap();
        let e = ClientConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
    }
}
