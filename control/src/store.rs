//! Durable Raft storage: the log store and the state machine, both backed by
//! one redb database (`<data_dir>/raft.redb`).
//!
//! # Layout
//!
//! | table           | key                                  | value (postcard)                 |
//! |-----------------|--------------------------------------|----------------------------------|
//! | `raft_log`      | log index (`u64`)                    | `openraft::Entry<TypeConfig>`    |
//! | `raft_meta`     | `"vote"`, `"committed"`, `"last_purged"` | `Vote` / `Option<LogId>` / `LogId` |
//! | `raft_snapshot` | `"meta"`, `"data"`                   | `SnapshotMeta` / snapshot bytes  |
//!
//! # Durability
//!
//! Every write transaction commits with [`Durability::Immediate`] (redb
//! fsyncs before `commit` returns), and `LogStore::append` reports the
//! entries flushed to openraft only after that commit. One append batch is one
//! transaction; a purge removes the entries and records `last_purged` in one
//! transaction, so the two never disagree. redb's copy-on-write commits make
//! the file consistent after a crash (a torn commit is rolled back to the last
//! durable one, repaired on the next open).
//!
//! All redb work runs on tokio's blocking pool, so an fsync never stalls the
//! async workers that also carry the Raft and API traffic.
//!
//! # The state machine
//!
//! The [`Registry`] lives in memory behind an `Arc<RwLock<_>>` that the API
//! server reads ([`StateMachine::registry`]). Applying entries does **not**
//! write to redb: the log is the durable record, and a restarted node rebuilds
//! its registry from the last persisted snapshot plus the committed log after
//! it (openraft re-applies `(snapshot.last_log_id, committed]` at start-up,
//! using the committed log id saved by [`LogStore`]'s `save_committed`).
//! Snapshots therefore bound replay time: every snapshot that is built or
//! installed is persisted (metadata and data, in one durable transaction)
//! before openraft is told about it, and so before openraft may purge the log
//! it covers. A built snapshot never overwrites a newer stored one (a snapshot
//! installed from the leader while the build was running).
//!
//! Snapshot data is the postcard encoding of a format version, the last
//! applied log id, the last membership and the registry.
//!
//! [`StateMachine::subscribe`] hands out a watch on the last applied log
//! index, bumped after every applied batch and every installed snapshot.

use std::fmt::Debug;
use std::io::{self, Cursor};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    Entry, EntryPayload, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::raft_types::{LogId, StoredMembership, TypeConfig};
use crate::registry::{Applied, Registry};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "raft.redb";

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_snapshot");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";
const KEY_SNAPSHOT_META: &str = "meta";
const KEY_SNAPSHOT_DATA: &str = "data";

/// Version of the snapshot data encoding.
/// 2: the registry gained vendors, images, blobs, domains and node labels.
const SNAPSHOT_FORMAT: u8 = 2;

type Error = StorageError<u64>;
type Meta = SnapshotMeta<u64, openraft::BasicNode>;

/// An error of the Raft store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created.
    #[error("cannot create data directory {}: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Another process (or another handle in this one) holds the database.
    #[error(
        "raft database {} is locked by another process (is another mettad using this data directory?)",
        path.display()
    )]
    Locked {
        /// The database file.
        path: PathBuf,
    },
    /// The file is not a valid redb database.
    #[error("raft database {} is corrupt or not a redb database: {source}", path.display())]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// The cause.
        source: redb::DatabaseError,
    },
    /// The database could not be opened for another reason.
    #[error("cannot open raft database {}: {source}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// The cause.
        source: redb::DatabaseError,
    },
    /// A database operation failed.
    #[error("raft database: {0}")]
    Db(#[from] redb::Error),
    /// A stored value could not be decoded.
    #[error("cannot decode stored {what}: {source}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// The cause.
        source: postcard::Error,
    },
    /// A value could not be encoded.
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The cause.
        source: postcard::Error,
    },
    /// Snapshot data of an unknown format version.
    #[error("unsupported snapshot format version {0} (this build reads {SNAPSHOT_FORMAT})")]
    SnapshotFormat(u8),
    /// Snapshot data whose last applied log id or membership disagrees with
    /// the snapshot's metadata.
    #[error("snapshot data is for log id {data:?}, its metadata says {meta:?}")]
    SnapshotMismatch {
        /// Last applied log id in the data.
        data: Option<LogId>,
        /// Last log id in the metadata.
        meta: Option<LogId>,
    },
    /// A lock around the in-memory state was poisoned by a panic.
    #[error("state machine lock poisoned")]
    Poisoned,
    /// A blocking storage task failed (panicked or was cancelled).
    #[error("storage task failed: {0}")]
    Task(String),
}

/// Converts any redb error into [`StoreError::Db`].
trait DbResult<T> {
    fn db(self) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> DbResult<T> for Result<T, E> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Db(e.into()))
    }
}

fn encode<T: Serialize + ?Sized>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(value).map_err(|source| StoreError::Encode { what, source })
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|source| StoreError::Decode { what, source })
}

/// Runs blocking database work on tokio's blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

/// Begins a write transaction that fsyncs on commit.
fn begin_durable(db: &Database) -> Result<redb::WriteTransaction, StoreError> {
    let mut txn = db.begin_write().db()?;
    txn.set_durability(Durability::Immediate).db()?;
    Ok(txn)
}

fn read_value<T: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    key: &'static str,
) -> Result<Option<T>, StoreError> {
    let txn = db.begin_read().db()?;
    let table = txn.open_table(table).db()?;
    let value = table.get(key).db()?;
    value.map(|v| decode(key, v.value())).transpose()
}

fn write_meta<T: Serialize>(db: &Database, key: &'static str, value: &T) -> Result<(), StoreError> {
    let bytes = encode(key, value)?;
    let txn = begin_durable(db)?;
    {
        let mut table = txn.open_table(META).db()?;
        table.insert(key, bytes.as_slice()).db()?;
    }
    txn.commit().db()
}

fn read_snapshot(db: &Database) -> Result<Option<(Meta, Vec<u8>)>, StoreError> {
    let txn = db.begin_read().db()?;
    let table = txn.open_table(SNAPSHOT).db()?;
    let Some(meta) = table.get(KEY_SNAPSHOT_META).db()? else {
        return Ok(None);
    };
    let meta: Meta = decode("snapshot meta", meta.value())?;
    let data = table
        .get(KEY_SNAPSHOT_DATA)
        .db()?
        .map(|d| d.value().to_vec())
        .unwrap_or_default();
    Ok(Some((meta, data)))
}

/// Stores a snapshot. With `only_if_newer`, a stored snapshot of a later log
/// id is kept instead; returns whether `meta` was written.
fn write_snapshot(
    db: &Database,
    meta: &Meta,
    data: &[u8],
    only_if_newer: bool,
) -> Result<bool, StoreError> {
    let meta_bytes = encode("snapshot meta", meta)?;
    let txn = begin_durable(db)?;
    {
        let mut table = txn.open_table(SNAPSHOT).db()?;
        if only_if_newer {
            if let Some(stored) = table.get(KEY_SNAPSHOT_META).db()? {
                let stored: Meta = decode("snapshot meta", stored.value())?;
                if stored.last_log_id > meta.last_log_id {
                    return Ok(false);
                }
            }
        }
        table
            .insert(KEY_SNAPSHOT_META, meta_bytes.as_slice())
            .db()?;
        table.insert(KEY_SNAPSHOT_DATA, data).db()?;
    }
    txn.commit().db()?;
    Ok(true)
}

/// Opens (creating if needed) the Raft store in `dir`.
///
/// Blocking: call it before starting Raft (or from a blocking task). Fails
/// with [`StoreError::Locked`] if another process has the database open and
/// with [`StoreError::Corrupt`] if the file is not a valid database. The state
/// machine starts from the last persisted snapshot, if any.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachine), StoreError> {
    std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join(DB_FILE);
    let db = Database::create(&path).map_err(|source| match source {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked { path: path.clone() },
        // redb reports a file that is not a database (bad magic number) as
        // InvalidData I/O, and damaged structures as Corrupted.
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)) => StoreError::Corrupt {
            path: path.clone(),
            source,
        },
        redb::DatabaseError::Storage(redb::StorageError::Io(ref e))
            if e.kind() == io::ErrorKind::InvalidData =>
        {
            StoreError::Corrupt {
                path: path.clone(),
                source,
            }
        }
        source => StoreError::Open {
            path: path.clone(),
            source,
        },
    })?;

    // Create the tables so that readers can always open them.
    let txn = begin_durable(&db)?;
    txn.open_table(LOGS).db()?;
    txn.open_table(META).db()?;
    txn.open_table(SNAPSHOT).db()?;
    txn.commit().db()?;

    let (state, registry) = match read_snapshot(&db)? {
        Some((meta, data)) => {
            let registry = decode_snapshot(&meta, &data)?;
            let state = AppliedState {
                last_applied: meta.last_log_id,
                membership: meta.last_membership,
            };
            (state, registry)
        }
        None => (AppliedState::default(), Registry::default()),
    };

    let db = Arc::new(db);
    let (applied_tx, _) = watch::channel(state.last_applied.map_or(0, |l| l.index));
    let sm = StateMachine {
        shared: Arc::new(SmShared {
            db: db.clone(),
            registry: Arc::new(RwLock::new(registry)),
            applied: Mutex::new(state),
            applied_tx,
            snapshot_seq: AtomicU64::new(0),
        }),
    };
    Ok((LogStore { db }, sm))
}

// ---------------------------------------------------------------------------
// Log store

/// The Raft log, vote and committed log id, in redb.
///
/// Cloning is cheap (it shares the database); a clone is the log reader.
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    fn last_log_id(db: &Database) -> Result<Option<LogId>, StoreError> {
        let txn = db.begin_read().db()?;
        let table = txn.open_table(LOGS).db()?;
        let last = table.last().db()?;
        match last {
            Some((_, v)) => {
                let entry: Entry<TypeConfig> = decode("log entry", v.value())?;
                Ok(Some(entry.log_id))
            }
            None => Ok(None),
        }
    }
}

fn read_logs_err(e: StoreError) -> Error {
    StorageIOError::read_logs(&e).into()
}

fn write_logs_err(e: StoreError) -> Error {
    StorageIOError::write_logs(&e).into()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, Error> {
        let bounds: (Bound<u64>, Bound<u64>) =
            (range.start_bound().cloned(), range.end_bound().cloned());
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_read().db()?;
            let table = txn.open_table(LOGS).db()?;
            let mut entries = Vec::new();
            for item in table.range::<u64>(bounds).db()? {
                let (_, v) = item.db()?;
                entries.push(decode("log entry", v.value())?);
            }
            Ok(entries)
        })
        .await
        .map_err(read_logs_err)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, Error> {
        let db = self.db.clone();
        blocking(move || {
            let last_purged_log_id: Option<LogId> = read_value(&db, META, KEY_LAST_PURGED)?;
            let last_log_id = Self::last_log_id(&db)?.or(last_purged_log_id);
            Ok(LogState {
                last_purged_log_id,
                last_log_id,
            })
        })
        .await
        .map_err(read_logs_err)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), Error> {
        let db = self.db.clone();
        let vote = *vote;
        blocking(move || write_meta(&db, KEY_VOTE, &vote))
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, Error> {
        let db = self.db.clone();
        blocking(move || read_value(&db, META, KEY_VOTE))
            .await
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), Error> {
        let db = self.db.clone();
        blocking(move || write_meta(&db, KEY_COMMITTED, &committed))
            .await
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, Error> {
        let db = self.db.clone();
        blocking(move || Ok(read_value::<Option<LogId>>(&db, META, KEY_COMMITTED)?.flatten()))
            .await
            .map_err(|e| StorageIOError::read(&e).into())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index, encode("log entry", &e)?)))
            .collect::<Result<Vec<(u64, Vec<u8>)>, StoreError>>();
        let db = self.db.clone();
        let result = match encoded {
            Ok(encoded) => {
                blocking(move || {
                    let txn = begin_durable(&db)?;
                    {
                        let mut table = txn.open_table(LOGS).db()?;
                        for (index, bytes) in &encoded {
                            table.insert(*index, bytes.as_slice()).db()?;
                        }
                    }
                    txn.commit().db()
                })
                .await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io::Error::other(e.to_string())));
                Err(write_logs_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), Error> {
        let db = self.db.clone();
        blocking(move || {
            let txn = begin_durable(&db)?;
            {
                let mut table = txn.open_table(LOGS).db()?;
                table.retain_in(log_id.index.., |_, _| false).db()?;
            }
            txn.commit().db()
        })
        .await
        .map_err(write_logs_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), Error> {
        let db = self.db.clone();
        blocking(move || {
            let bytes = encode(KEY_LAST_PURGED, &log_id)?;
            let txn = begin_durable(&db)?;
            {
                let mut meta = txn.open_table(META).db()?;
                meta.insert(KEY_LAST_PURGED, bytes.as_slice()).db()?;
                let mut table = txn.open_table(LOGS).db()?;
                table.retain_in(..=log_id.index, |_, _| false).db()?;
            }
            txn.commit().db()
        })
        .await
        .map_err(write_logs_err)
    }
}

// ---------------------------------------------------------------------------
// State machine

/// Last applied log id and membership.
#[derive(Debug, Clone, Default)]
struct AppliedState {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

/// State shared by the state machine and its snapshot builders.
///
/// Lock order: `registry` before `applied`. `applied` is only changed while
/// the registry write lock is held, so a reader holding the registry lock sees
/// a registry and applied state that match.
#[derive(Debug)]
struct SmShared {
    db: Arc<Database>,
    registry: Arc<RwLock<Registry>>,
    applied: Mutex<AppliedState>,
    applied_tx: watch::Sender<u64>,
    snapshot_seq: AtomicU64,
}

/// Snapshot data as encoded (borrowing the registry).
#[derive(Serialize)]
struct SnapshotDataRef<'a> {
    format: u8,
    last_applied: Option<LogId>,
    membership: &'a StoredMembership,
    registry: &'a Registry,
}

/// Snapshot data as decoded.
#[derive(Deserialize)]
struct SnapshotDataOwned {
    format: u8,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    registry: Registry,
}

/// Decodes snapshot data, checking it against its metadata.
fn decode_snapshot(meta: &Meta, data: &[u8]) -> Result<Registry, StoreError> {
    let format = data.first().copied().unwrap_or_default();
    if format != SNAPSHOT_FORMAT {
        return Err(StoreError::SnapshotFormat(format));
    }
    let decoded: SnapshotDataOwned = decode("snapshot data", data)?;
    debug_assert_eq!(decoded.format, SNAPSHOT_FORMAT);
    if decoded.last_applied != meta.last_log_id || decoded.membership != meta.last_membership {
        return Err(StoreError::SnapshotMismatch {
            data: decoded.last_applied,
            meta: meta.last_log_id,
        });
    }
    Ok(decoded.registry)
}

impl SmShared {
    fn snapshot_now(&self) -> Result<(Meta, Vec<u8>), StoreError> {
        let registry = self.registry.read().map_err(|_| StoreError::Poisoned)?;
        let state = self.applied.lock().map_err(|_| StoreError::Poisoned)?;
        let data = encode(
            "snapshot data",
            &SnapshotDataRef {
                format: SNAPSHOT_FORMAT,
                last_applied: state.last_applied,
                membership: &state.membership,
                registry: &registry,
            },
        )?;
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match state.last_applied {
            Some(l) => format!("{l}-{seq}"),
            None => format!("none-{seq}"),
        };
        let meta = Meta {
            last_log_id: state.last_applied,
            last_membership: state.membership.clone(),
            snapshot_id,
        };
        Ok((meta, data))
    }
}

/// The Raft state machine: the in-memory [`Registry`], with snapshots in redb.
#[derive(Debug)]
pub struct StateMachine {
    shared: Arc<SmShared>,
}

impl StateMachine {
    /// The registry, for readers. Only the state machine writes it.
    pub fn registry(&self) -> Arc<RwLock<Registry>> {
        self.shared.registry.clone()
    }

    /// A watch on the last applied log index (0 before anything is applied),
    /// bumped after every applied batch and installed snapshot.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.applied_tx.subscribe()
    }
}

/// Builds snapshots of the [`StateMachine`].
#[derive(Debug)]
pub struct SnapshotBuilder {
    shared: Arc<SmShared>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, Error> {
        let (meta, data) = self
            .shared
            .snapshot_now()
            .map_err(|e| StorageIOError::read_state_machine(&e))?;
        let db = self.shared.db.clone();
        let stored_meta = meta.clone();
        let data = blocking(move || {
            write_snapshot(&db, &stored_meta, &data, true)?;
            Ok(data)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), Error> {
        let state = self
            .shared
            .applied
            .lock()
            .map_err(|_| StorageIOError::read_state_machine(&StoreError::Poisoned))?;
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let poisoned = || StorageIOError::write_state_machine(&StoreError::Poisoned);
        let shared = &self.shared;
        let mut registry = shared.registry.write().map_err(|_| poisoned())?;
        let mut state = shared.applied.lock().map_err(|_| poisoned())?;
        let entries = entries.into_iter();
        let mut results = Vec::with_capacity(entries.size_hint().0);
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            results.push(match entry.payload {
                EntryPayload::Blank => Applied::Done,
                EntryPayload::Normal(cmd) => registry.apply(&cmd),
                EntryPayload::Membership(m) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), m);
                    Applied::Done
                }
            });
        }
        let last = state.last_applied.map_or(0, |l| l.index);
        drop(state);
        drop(registry);
        shared.applied_tx.send_replace(last);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, Error> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), Error> {
        let signature = Some(meta.signature());
        let data = snapshot.into_inner();
        let registry = decode_snapshot(meta, &data)
            .map_err(|e| StorageIOError::read_snapshot(signature.clone(), &e))?;

        // Persist first: once the state below changes, openraft may purge the
        // log this snapshot covers.
        let db = self.shared.db.clone();
        let stored_meta = meta.clone();
        blocking(move || write_snapshot(&db, &stored_meta, &data, false))
            .await
            .map_err(|e| StorageIOError::write_snapshot(signature.clone(), &e))?;

        let poisoned = || StorageIOError::write_snapshot(signature.clone(), &StoreError::Poisoned);
        {
            let mut current = self.shared.registry.write().map_err(|_| poisoned())?;
            let mut state = self.shared.applied.lock().map_err(|_| poisoned())?;
            *current = registry;
            state.last_applied = meta.last_log_id;
            state.membership = meta.last_membership.clone();
        }
        self.shared
            .applied_tx
            .send_replace(meta.last_log_id.map_or(0, |l| l.index));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, Error> {
        let db = self.shared.db.clone();
        let stored = blocking(move || read_snapshot(&db))
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(stored.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use openraft::storage::RaftLogStorageExt;
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::{CommittedLeaderId, Membership, RaftLogReader, StorageHelper};
    use tempfile::TempDir;

    use super::*;
    use crate::registry::Command;

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
        async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), Error> {
            let dir = TempDir::new().map_err(|e| StorageIOError::write(&e))?;
            let (log, sm) = open(dir.path()).map_err(|e| StorageIOError::write(&e))?;
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn openraft_conformance_suite() {
        Suite::test_all(Builder).expect("openraft storage suite");
    }

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn blank(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Blank,
        }
    }

    fn put(term: u64, index: u64, key: &str, value: &[u8]) -> Entry<TypeConfig> {
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Normal(Command::KvPut {
                key: key.to_string(),
                value: value.to_vec(),
            }),
        }
    }

    fn membership(term: u64, index: u64, voters: &[u64]) -> Entry<TypeConfig> {
        let voters: BTreeSet<u64> = voters.iter().copied().collect();
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Membership(Membership::new(vec![voters], None)),
        }
    }

    fn kv(sm: &StateMachine) -> Vec<(String, Vec<u8>)> {
        let registry = sm.registry();
        let registry = registry.read().expect("registry lock");
        registry
            .kv
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    #[tokio::test]
    async fn log_vote_and_committed_survive_reopen() {
        let dir = TempDir::new().unwrap();
        let entries = vec![
            blank(1, 1),
            membership(1, 2, &[1, 2, 3]),
            put(1, 3, "a", b"1"),
            put(2, 4, "b", b"22"),
        ];
        let vote = Vote::new_committed(2, 1);
        {
            let (mut log, _sm) = open(dir.path()).unwrap();
            log.blocking_append(entries.clone()).await.unwrap();
            log.save_vote(&vote).await.unwrap();
            log.save_committed(Some(log_id(2, 4))).await.unwrap();
        }
        let (mut log, _sm) = open(dir.path()).unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, None);
        assert_eq!(state.last_log_id, Some(log_id(2, 4)));
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 4)));
        let mut reader = log.get_log_reader().await;
        assert_eq!(reader.try_get_log_entries(0..).await.unwrap(), entries);
        assert_eq!(
            reader.try_get_log_entries(2..4).await.unwrap(),
            entries[1..3].to_vec()
        );

        // Truncation survives a reopen too.
        log.truncate(log_id(1, 3)).await.unwrap();
        drop((log, reader, _sm));
        let (mut log, _sm) = open(dir.path()).unwrap();
        assert_eq!(
            log.get_log_state().await.unwrap().last_log_id,
            Some(log_id(1, 2))
        );
        assert_eq!(
            log.try_get_log_entries(0..).await.unwrap(),
            entries[..2].to_vec()
        );
    }

    #[tokio::test]
    async fn purge_survives_reopen() {
        let dir = TempDir::new().unwrap();
        {
            let (mut log, _sm) = open(dir.path()).unwrap();
            log.blocking_append((1..=6).map(|i| blank(1, i)))
                .await
                .unwrap();
            log.purge(log_id(1, 3)).await.unwrap();
        }
        let (mut log, _sm) = open(dir.path()).unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 3)));
        assert_eq!(state.last_log_id, Some(log_id(1, 6)));
        let indexes: Vec<u64> = log
            .try_get_log_entries(0..)
            .await
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect();
        assert_eq!(indexes, vec![4, 5, 6]);

        // Purging everything: the last log id is the purged one, across reopen.
        log.purge(log_id(1, 6)).await.unwrap();
        drop((log, _sm));
        let (mut log, _sm) = open(dir.path()).unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 6)));
        assert_eq!(state.last_log_id, Some(log_id(1, 6)));
        assert!(log.try_get_log_entries(0..).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn apply_updates_registry_and_watch() {
        let dir = TempDir::new().unwrap();
        let (_log, mut sm) = open(dir.path()).unwrap();
        let mut rx = sm.subscribe();
        assert_eq!(*rx.borrow_and_update(), 0);
        let results = sm
            .apply([blank(1, 1), membership(1, 2, &[1]), put(1, 3, "k", b"v")])
            .await
            .unwrap();
        assert_eq!(results, vec![Applied::Done, Applied::Done, Applied::Done]);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 3);
        assert_eq!(kv(&sm), vec![("k".to_string(), b"v".to_vec())]);
        let (applied, mem) = sm.applied_state().await.unwrap();
        assert_eq!(applied, Some(log_id(1, 3)));
        assert_eq!(mem.log_id(), &Some(log_id(1, 2)));
    }

    #[tokio::test]
    async fn snapshot_survives_reopen() {
        let dir = TempDir::new().unwrap();
        let built;
        {
            let (_log, mut sm) = open(dir.path()).unwrap();
            assert!(sm.get_current_snapshot().await.unwrap().is_none());
            sm.apply([
                membership(1, 1, &[1, 2]),
                put(1, 2, "alpha", b"one"),
                put(1, 3, "beta", b"two"),
            ])
            .await
            .unwrap();
            built = sm
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
            assert_eq!(built.meta.last_log_id, Some(log_id(1, 3)));
            // Applied after the snapshot: not in it, lost with the process
            // (the log would replay it).
            sm.apply([put(1, 4, "gamma", b"three")]).await.unwrap();
        }
        let (_log, mut sm) = open(dir.path()).unwrap();
        assert_eq!(
            kv(&sm),
            vec![
                ("alpha".to_string(), b"one".to_vec()),
                ("beta".to_string(), b"two".to_vec()),
            ]
        );
        let (applied, mem) = sm.applied_state().await.unwrap();
        assert_eq!(applied, Some(log_id(1, 3)));
        assert_eq!(mem, built.meta.last_membership);
        assert_eq!(*sm.subscribe().borrow(), 3);
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, built.meta);
        assert_eq!(current.snapshot.into_inner(), built.snapshot.into_inner());
    }

    /// The restart path: snapshot at 3, committed up to 5 in the log;
    /// openraft's start-up re-applies 4..=5 on top of the snapshot.
    #[tokio::test]
    async fn restart_replays_committed_log_after_snapshot() {
        let dir = TempDir::new().unwrap();
        let entries = vec![
            membership(1, 1, &[1]),
            put(1, 2, "a", b"1"),
            put(1, 3, "b", b"2"),
            put(1, 4, "c", b"3"),
            put(1, 5, "a", b"4"),
        ];
        {
            let (mut log, mut sm) = open(dir.path()).unwrap();
            log.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
            log.blocking_append(entries.clone()).await.unwrap();
            sm.apply(entries[..3].to_vec()).await.unwrap();
            sm.get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
            log.purge(log_id(1, 2)).await.unwrap();
            sm.apply(entries[3..].to_vec()).await.unwrap();
            log.save_committed(Some(log_id(1, 5))).await.unwrap();
        }
        let (mut log, mut sm) = open(dir.path()).unwrap();
        assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 3)));
        let state = StorageHelper::new(&mut log, &mut sm)
            .get_initial_state()
            .await
            .unwrap();
        assert_eq!(state.vote_ref(), &Vote::new_committed(1, 1));
        assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 5)));
        assert_eq!(
            kv(&sm),
            vec![
                ("a".to_string(), b"4".to_vec()),
                ("b".to_string(), b"2".to_vec()),
                ("c".to_string(), b"3".to_vec()),
            ]
        );
        assert_eq!(*sm.subscribe().borrow(), 5);
    }

    #[tokio::test]
    async fn installed_snapshot_survives_reopen() {
        let leader_dir = TempDir::new().unwrap();
        let follower_dir = TempDir::new().unwrap();
        let (_l, mut leader) = open(leader_dir.path()).unwrap();
        leader
            .apply([membership(1, 1, &[1, 2]), put(1, 2, "x", b"y")])
            .await
            .unwrap();
        let snap = leader
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        {
            let (_f, mut follower) = open(follower_dir.path()).unwrap();
            let rx = follower.subscribe();
            let mut buf = follower.begin_receiving_snapshot().await.unwrap();
            *buf = Cursor::new(snap.snapshot.get_ref().clone());
            follower.install_snapshot(&snap.meta, buf).await.unwrap();
            assert!(rx.has_changed().unwrap());
            assert_eq!(*rx.borrow(), 2);
            assert_eq!(kv(&follower), vec![("x".to_string(), b"y".to_vec())]);
        }
        let (_f, mut follower) = open(follower_dir.path()).unwrap();
        assert_eq!(kv(&follower), vec![("x".to_string(), b"y".to_vec())]);
        let (applied, mem) = follower.applied_state().await.unwrap();
        assert_eq!(applied, Some(log_id(1, 2)));
        assert_eq!(mem, snap.meta.last_membership);
        let current = follower.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, snap.meta);
    }

    /// Every kind of registry data survives the log and the snapshot
    /// encodings, not just the key space.
    #[tokio::test]
    async fn rich_registry_round_trips() {
        use metta_proto::{Role, Subject};
        use metta_trust::TokenRecord;

        use crate::registry::UserRecord;

        let commands = vec![
            Command::TokenCreate(TokenRecord {
                id: "tok1".into(),
                secret_hash: [7; 32],
                role: Role::Worker,
                expires_at: 2_000_000_000,
                uses_left: 3,
                revoked: false,
                created_by: Subject::User("admin".into()),
            }),
            Command::UserAdd(UserRecord {
                name: "alice".into(),
                spki_der: vec![1, 2, 3, 4],
                cert_not_after: 1_900_000_000,
            }),
            Command::RevokeSubject(Subject::User("alice".into())),
            Command::TokenRevoke { id: "tok1".into() },
            Command::KvPut {
                key: "k".into(),
                value: vec![0, 255],
            },
        ];
        let mut expected = Registry::default();
        for cmd in &commands {
            assert_eq!(expected.apply(cmd), Applied::Done, "{cmd:?}");
        }
        assert_eq!(expected.tokens.len(), 1);
        assert!(expected.tokens["tok1"].revoked);
        assert!(expected
            .revoked
            .subject_revoked(&Subject::User("alice".into())));

        let entries: Vec<Entry<TypeConfig>> = commands
            .into_iter()
            .zip(1..)
            .map(|(cmd, i)| Entry {
                log_id: log_id(1, i),
                payload: EntryPayload::Normal(cmd),
            })
            .collect();
        let dir = TempDir::new().unwrap();
        {
            let (mut log, mut sm) = open(dir.path()).unwrap();
            log.blocking_append(entries.clone()).await.unwrap();
            assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries);
            sm.apply(entries.clone()).await.unwrap();
            sm.get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
        }
        let (mut log, sm) = open(dir.path()).unwrap();
        assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries);
        let registry = sm.registry();
        assert_eq!(*registry.read().unwrap(), expected);
    }

    /// A build racing with an install must not overwrite the newer,
    /// installed snapshot (the log it covers may already be purged).
    #[tokio::test]
    async fn older_snapshot_does_not_replace_newer() {
        let dir = TempDir::new().unwrap();
        let (_log, mut sm) = open(dir.path()).unwrap();
        sm.apply([put(1, 1, "a", b"1"), put(1, 2, "b", b"2")])
            .await
            .unwrap();
        let newer = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(newer.meta.last_log_id, Some(log_id(1, 2)));

        let older = Meta {
            last_log_id: Some(log_id(1, 1)),
            last_membership: StoredMembership::default(),
            snapshot_id: "older".into(),
        };
        assert!(!write_snapshot(&sm.shared.db, &older, b"", true).unwrap());
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, newer.meta);

        // A build at the same or a later point does replace it.
        sm.apply([put(1, 3, "c", b"3")]).await.unwrap();
        let rebuilt = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, rebuilt.meta);
        assert_eq!(current.meta.last_log_id, Some(log_id(1, 3)));
    }

    const CRASH_DIR_ENV: &str = "METTA_STORE_CRASH_TEST_DIR";
    const CRASH_EXIT: i32 = 86;

    /// The child half of `recovers_after_process_crash`: writes, then exits
    /// without closing the database (no destructors run).
    #[tokio::test]
    #[ignore = "run as a child process by recovers_after_process_crash"]
    async fn crash_child() {
        let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else {
            return;
        };
        let (mut log, mut sm) = open(Path::new(&dir)).unwrap();
        let entries: Vec<_> = (1..=50)
            .map(|i| put(3, i, &format!("k{i:02}"), b"v"))
            .collect();
        log.save_vote(&Vote::new_committed(3, 1)).await.unwrap();
        log.blocking_append(entries.clone()).await.unwrap();
        sm.apply(entries[..20].to_vec()).await.unwrap();
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        log.purge(log_id(3, 10)).await.unwrap();
        log.save_committed(Some(log_id(3, 50))).await.unwrap();
        std::process::exit(CRASH_EXIT);
    }

    #[tokio::test]
    async fn recovers_after_process_crash() {
        let dir = TempDir::new().unwrap();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::tests::crash_child",
                "--ignored",
                "--test-threads=1",
            ])
            .env(CRASH_DIR_ENV, dir.path())
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_eq!(
            status.code(),
            Some(CRASH_EXIT),
            "child did not reach its exit"
        );

        let (mut log, mut sm) = open(dir.path()).unwrap();
        assert_eq!(
            log.read_vote().await.unwrap(),
            Some(Vote::new_committed(3, 1))
        );
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(3, 50)));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(3, 10)));
        assert_eq!(state.last_log_id, Some(log_id(3, 50)));
        assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(3, 20)));
        assert_eq!(kv(&sm).len(), 20);
        StorageHelper::new(&mut log, &mut sm)
            .get_initial_state()
            .await
            .unwrap();
        assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(3, 50)));
        let keys: Vec<String> = kv(&sm).into_iter().map(|(k, _)| k).collect();
        let expected: Vec<String> = (1..=50).map(|i| format!("k{i:02}")).collect();
        assert_eq!(keys, expected);
    }

    #[test]
    fn second_open_is_refused_as_locked() {
        let dir = TempDir::new().unwrap();
        let _first = open(dir.path()).unwrap();
        match open(dir.path()) {
            Err(StoreError::Locked { path }) => assert_eq!(path, dir.path().join(DB_FILE)),
            other => panic!("expected Locked, got {other:?}"),
        }
    }

    #[test]
    fn garbage_file_is_refused() {
        let dir = TempDir::new().unwrap();
        std::fs::write(dir.path().join(DB_FILE), vec![0x5a; 64 * 1024]).unwrap();
        let err = open(dir.path()).expect_err("garbage must not open");
        assert!(
            matches!(err, StoreError::Corrupt { .. }),
            "unexpected error {err:?}"
        );
        assert!(err.to_string().contains(DB_FILE), "{err}");
    }

    #[test]
    fn creates_missing_data_dir() {
        let dir = TempDir::new().unwrap();
        let nested = dir.path().join("a").join("b");
        let _store = open(&nested).unwrap();
        assert!(nested.join(DB_FILE).is_file());
    }
}
