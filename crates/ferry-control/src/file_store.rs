//! The embedded store, `file:DIR`: one control-plane replica, the history
//! in a directory.
//!
//! Each version is one file, `VERSION.snapshot` (the prost-encoded
//! [`ConfigSnapshot`], version zero-padded so names sort), never changed
//! once written. A file is written durably before the version counts as
//! applied: temp file, `sync_data`, rename, fsync of the directory (the
//! rename is only durable once the directory is). A crash leaves at most a
//! temp file, removed at the next open. Node status is kept in memory: with
//! one replica, it dies with the process that would refresh it. The
//! drained nodes are one file, `drained` (a node ID a line), rewritten
//! whole and as durably at each change.
//!
//! One process at a time: the store holds an exclusive `flock` on
//! `DIR/lock` while open, since two control planes appending to one
//! directory would both win the compare-and-swap.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prost::Message;
use tokio::sync::watch;

use crate::proto::{ConfigSnapshot, NodeStatus, SnapshotMeta};
use crate::store::{Store, StoreError};
use crate::{sha256_hex, HISTORY_KEPT, MAX_CONFIG_OCTETS};

const SUFFIX: &str = ".snapshot";
const TEMP_SUFFIX: &str = ".snapshot.tmp";
const LOCK: &str = "lock";
const DRAINED: &str = "drained";

/// The history in a directory, node status in memory.
pub struct FileStore {
    dir: PathBuf,
    /// The kept versions' metadata, oldest first; the lock also makes
    /// appends one at a time (the compare-and-swap).
    history: tokio::sync::Mutex<BTreeMap<u64, SnapshotMeta>>,
    current: watch::Sender<Option<Arc<ConfigSnapshot>>>,
    nodes: Mutex<BTreeMap<String, NodeStatus>>,
    /// The drained nodes, as in the `drained` file; the lock also makes
    /// their writes one at a time.
    drained: tokio::sync::Mutex<BTreeSet<String>>,
    /// Held while open; released when the store is dropped.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl FileStore {
    /// Opens (creating it if needed) the store in `dir`: reads every kept
    /// snapshot, checks each one's version and SHA-256, and removes a temp
    /// file a crash left. Blocking: call it before serving, or off the
    /// async threads.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the directory cannot be created or read;
    /// [`StoreError::Corrupt`] naming the file when a snapshot does not
    /// decode or does not match its name or its SHA-256 (the store does
    /// not guess: move the file away to start without it).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| io(format!("cannot create {}", dir.display()), e))?;
        let lock = lock(dir)?;
        let entries =
            std::fs::read_dir(dir).map_err(|e| io(format!("cannot read {}", dir.display()), e))?;
        let mut history = BTreeMap::new();
        let mut newest: Option<ConfigSnapshot> = None;
        for entry in entries {
            let entry = entry.map_err(|e| io(format!("cannot read {}", dir.display()), e))?;
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.ends_with(TEMP_SUFFIX) {
                // A write a crash cut short: that version was never applied.
                tracing::warn!(file = %path.display(), "removing a half-written snapshot");
                std::fs::remove_file(&path)
                    .map_err(|e| io(format!("cannot remove {}", path.display()), e))?;
                continue;
            }
            let Some(version) = name
                .strip_suffix(SUFFIX)
                .and_then(|v| v.parse::<u64>().ok())
            else {
                continue;
            };
            let snapshot = read_snapshot(&path, version)?;
            let meta = snapshot.meta.clone().unwrap_or_default();
            if newest
                .as_ref()
                .is_none_or(|n| n.meta.as_ref().is_some_and(|m| m.version < version))
            {
                newest = Some(snapshot);
            }
            history.insert(version, meta);
        }
        tracing::info!(
            dir = %dir.display(),
            versions = history.len(),
            current = history.keys().next_back().copied().unwrap_or(0),
            "file store opened"
        );
        let drained = read_drained(&dir.join(DRAINED))?;
        let (current, _) = watch::channel(newest.map(Arc::new));
        Ok(Self {
            dir: dir.to_path_buf(),
            history: tokio::sync::Mutex::new(history),
            current,
            nodes: Mutex::default(),
            drained: tokio::sync::Mutex::new(drained),
            _lock: lock,
        })
    }

    fn path_of(&self, version: u64) -> PathBuf {
        self.dir.join(format!("{version:020}{SUFFIX}"))
    }
}

/// Takes the store's lock, or says who holds it.
fn lock(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, StoreError> {
    let path = dir.join(LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io(format!("cannot open {}", path.display()), e))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| match errno {
            nix::errno::Errno::EWOULDBLOCK => StoreError::Unavailable(format!(
                "{} is in use by another ferry control (it holds {})",
                dir.display(),
                path.display()
            )),
            other => io(
                format!("cannot lock {}", path.display()),
                std::io::Error::from(other),
            ),
        },
    )
}

/// The node IDs in the `drained` file (none when it does not exist).
fn read_drained(path: &Path) -> Result<BTreeSet<String>, StoreError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(io(format!("cannot read {}", path.display()), e)),
    }
}

/// Reads and checks one snapshot file.
fn read_snapshot(path: &Path, version: u64) -> Result<ConfigSnapshot, StoreError> {
    let bytes =
        std::fs::read(path).map_err(|e| io(format!("cannot read {}", path.display()), e))?;
    let corrupt = |what: String| StoreError::Corrupt(format!("{}: {what}", path.display()));
    let snapshot = ConfigSnapshot::decode(bytes.as_slice())
        .map_err(|e| corrupt(format!("not a snapshot ({e})")))?;
    let meta = snapshot
        .meta
        .as_ref()
        .ok_or_else(|| corrupt("no metadata".into()))?;
    if meta.version != version {
        return Err(corrupt(format!(
            "holds version {}, its name says {version}",
            meta.version
        )));
    }
    if meta.sha256 != sha256_hex(&snapshot.config) {
        return Err(corrupt(
            "the config does not match its SHA-256 (damaged on disk)".into(),
        ));
    }
    Ok(snapshot)
}

/// Writes `bytes` as `path` durably: temp file, `sync_data`, rename, then
/// fsync of the directory.
fn write_durably(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let temp = path.with_extension(TEMP_SUFFIX.trim_start_matches('.'));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_data()?;
        std::fs::rename(&temp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        io(format!("cannot write {}", path.display()), e)
    })
}

fn io(context: String, source: std::io::Error) -> StoreError {
    StoreError::Io { context, source }
}

impl Store for FileStore {
    fn current(&self) -> watch::Receiver<Option<Arc<ConfigSnapshot>>> {
        self.current.subscribe()
    }

    async fn get(&self, version: u64) -> Result<Option<ConfigSnapshot>, StoreError> {
        if !self.history.lock().await.contains_key(&version) {
            return Ok(None);
        }
        if let Some(current) = self.current.borrow().as_ref() {
            if current.meta.as_ref().is_some_and(|m| m.version == version) {
                return Ok(Some(ConfigSnapshot::clone(current)));
            }
        }
        let path = self.path_of(version);
        match tokio::task::spawn_blocking(move || read_snapshot(&path, version)).await {
            Ok(read) => read.map(Some),
            Err(e) => Err(StoreError::Unavailable(format!("reading a snapshot: {e}"))),
        }
    }

    async fn history(&self, limit: usize) -> Result<Vec<SnapshotMeta>, StoreError> {
        let history = self.history.lock().await;
        let limit = if limit == 0 { usize::MAX } else { limit };
        Ok(history.values().rev().take(limit).cloned().collect())
    }

    async fn append(&self, expected: u64, snapshot: ConfigSnapshot) -> Result<(), StoreError> {
        let mut history = self.history.lock().await;
        let current = history.keys().next_back().copied().unwrap_or(0);
        if current != expected {
            return Err(StoreError::Conflict { expected, current });
        }
        if snapshot.config.len() > MAX_CONFIG_OCTETS {
            return Err(StoreError::TooLarge {
                size: snapshot.config.len(),
                max: MAX_CONFIG_OCTETS,
            });
        }
        let meta = snapshot.meta.clone().unwrap_or_default();
        if meta.version != expected + 1 {
            return Err(StoreError::Corrupt(format!(
                "a snapshot numbered {} cannot follow version {expected}",
                meta.version
            )));
        }
        let path = self.path_of(meta.version);
        let dir = self.dir.clone();
        let bytes = snapshot.encode_to_vec();
        tokio::task::spawn_blocking(move || write_durably(&dir, &path, &bytes))
            .await
            .map_err(|e| StoreError::Unavailable(format!("writing a snapshot: {e}")))??;
        history.insert(meta.version, meta);
        // Past the kept number, the oldest go; a file that will not go is
        // only logged: the new version is applied either way.
        let mut dropped = Vec::new();
        while history.len() > HISTORY_KEPT {
            let Some((old, _)) = history.pop_first() else {
                break;
            };
            dropped.push(self.path_of(old));
        }
        if !dropped.is_empty() {
            tokio::task::spawn_blocking(move || {
                for path in dropped {
                    if let Err(e) = std::fs::remove_file(&path) {
                        tracing::warn!(file = %path.display(), error = %e, "cannot remove an old snapshot");
                    }
                }
            });
        }
        self.current.send_replace(Some(Arc::new(snapshot)));
        Ok(())
    }

    async fn put_node(&self, status: NodeStatus) -> Result<(), StoreError> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.insert(status.node_id.clone(), status);
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeStatus>, StoreError> {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        Ok(nodes.values().cloned().collect())
    }

    async fn set_drained(&self, node_id: &str, drained: bool) -> Result<(), StoreError> {
        let mut set = self.drained.lock().await;
        let mut next = set.clone();
        let changed = match drained {
            true => next.insert(node_id.to_string()),
            false => next.remove(node_id),
        };
        if !changed {
            return Ok(());
        }
        let text: String = next.iter().map(|id| format!("{id}\n")).collect();
        let dir = self.dir.clone();
        let path = dir.join(DRAINED);
        tokio::task::spawn_blocking(move || write_durably(&dir, &path, text.as_bytes()))
            .await
            .map_err(|e| StoreError::Unavailable(format!("writing the drained nodes: {e}")))??;
        *set = next;
        Ok(())
    }

    async fn drained(&self) -> Result<BTreeSet<String>, StoreError> {
        Ok(self.drained.lock().await.clone())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn snapshot(version: u64, text: &str) -> ConfigSnapshot {
        ConfigSnapshot {
            meta: Some(SnapshotMeta {
                version,
                sha256: sha256_hex(text.as_bytes()),
                author: "alice".into(),
                message: format!("change {version}"),
                size: text.len() as u64,
                ..Default::default()
            }),
            config: bytes::Bytes::copy_from_slice(text.as_bytes()),
        }
    }

    fn version_of(store: &FileStore) -> u64 {
        store
            .current()
            .borrow()
            .as_ref()
            .and_then(|s| s.meta.as_ref().map(|m| m.version))
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn appends_are_a_compare_and_swap_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(version_of(&store), 0);
        store.append(0, snapshot(1, "a = 1")).await.unwrap();
        store.append(1, snapshot(2, "a = 2")).await.unwrap();
        // A change made against version 1 lost the race.
        let lost = store.append(1, snapshot(2, "a = 3")).await.unwrap_err();
        assert!(
            matches!(
                lost,
                StoreError::Conflict {
                    expected: 1,
                    current: 2
                }
            ),
            "{lost}"
        );
        let too_large = "x".repeat(MAX_CONFIG_OCTETS + 1);
        let refused = store.append(2, snapshot(3, &too_large)).await.unwrap_err();
        assert!(matches!(refused, StoreError::TooLarge { .. }), "{refused}");
        drop(store);

        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(version_of(&store), 2);
        let history = store.history(0).await.unwrap();
        let versions: Vec<u64> = history.iter().map(|m| m.version).collect();
        assert_eq!(versions, [2, 1]);
        assert_eq!(history[1].message, "change 1");
        assert_eq!(&store.get(1).await.unwrap().unwrap().config[..], b"a = 1");
        assert!(store.get(3).await.unwrap().is_none());
        assert_eq!(store.history(1).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let busy = FileStore::open(dir.path()).unwrap_err().to_string();
        assert!(busy.contains("in use by another ferry control"), "{busy}");
        drop(store);
        FileStore::open(dir.path()).unwrap();
    }

    #[tokio::test]
    async fn keeps_a_bounded_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let total = HISTORY_KEPT as u64 + 3;
        for v in 1..=total {
            store
                .append(v - 1, snapshot(v, &format!("v = {v}")))
                .await
                .unwrap();
        }
        let history = store.history(0).await.unwrap();
        assert_eq!(history.len(), HISTORY_KEPT);
        assert_eq!(history.last().unwrap().version, 4);
        assert!(store.get(3).await.unwrap().is_none());
        drop(store);
        // The removal runs in the background: poll, bounded.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // The snapshots and the lock file.
        let count = || std::fs::read_dir(dir.path()).unwrap().count() - 1;
        while count() != HISTORY_KEPT && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(count(), HISTORY_KEPT);
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(version_of(&store), total);
    }

    #[tokio::test]
    async fn a_damaged_file_is_named_and_a_temp_file_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        store.append(0, snapshot(1, "a = 1")).await.unwrap();
        drop(store);
        // A crash during the write of version 2 leaves its temp file.
        let temp = dir.path().join(format!("{:020}{TEMP_SUFFIX}", 2));
        std::fs::write(&temp, b"half").unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(version_of(&store), 1);
        assert!(!temp.exists());
        drop(store);

        let file = dir.path().join(format!("{:020}{SUFFIX}", 1));
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x20;
        std::fs::write(&file, &bytes).unwrap();
        let err = FileStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(err.contains("SHA-256"), "{err}");

        std::fs::write(&file, b"\xff\xff\xff").unwrap();
        let err = FileStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a snapshot"), "{err}");
    }

    #[tokio::test]
    async fn drains_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        store.set_drained("w1", true).await.unwrap();
        store.set_drained("w2", true).await.unwrap();
        store.set_drained("w2", false).await.unwrap();
        // Clearing what is not set is no error and changes nothing.
        store.set_drained("w3", false).await.unwrap();
        drop(store);
        let store = FileStore::open(dir.path()).unwrap();
        let drained: Vec<String> = store.drained().await.unwrap().into_iter().collect();
        assert_eq!(drained, ["w1"]);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(DRAINED)).unwrap(),
            "w1\n"
        );
    }

    #[tokio::test]
    async fn node_status_is_kept_per_node() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        for sent in [1, 2] {
            store
                .put_node(NodeStatus {
                    node_id: "w1".into(),
                    sent_version: sent,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        let nodes = store.nodes().await.unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].sent_version, 2);
    }
}
