//! Where the control plane keeps its state: the history of immutable
//! snapshots and the status of every node.
//!
//! A replica of the control plane holds nothing a store does not: with
//! the etcd store any number of replicas serve the same history, each its
//! own subscribers. The rules the server relies on:
//! - [`Store::append`] is a compare-and-swap on the current version: of
//!   two admins applying against the same version, one wins and the other
//!   gets [`StoreError::Conflict`];
//! - [`Store::current`] follows the newest version, wherever it was
//!   applied (a `watch` channel: a slow reader only ever sees the newest);
//! - node status written by one replica is read by every replica, and
//!   goes away when the replica that wrote it dies;
//! - an admin's drain of a node is durable and tied to no replica: it
//!   stays until cleared, across restarts.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

use crate::proto::{ConfigSnapshot, NodeStatus, SnapshotMeta};

/// Why a store could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The current version is not the one the change was made against
    /// (someone applied in between); read the current one and retry.
    #[error("version {expected} is no longer current: the current version is {current}")]
    Conflict { expected: u64, current: u64 },
    /// The snapshot is larger than [`crate::MAX_CONFIG_OCTETS`].
    #[error("the config is {size} octets; the most a store takes is {max} octets")]
    TooLarge { size: usize, max: usize },
    /// The store cannot be reached or cannot commit (etcd without a
    /// quorum); temporary.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// A local file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// What the store holds cannot be decoded.
    #[error("the store holds a damaged record: {0}")]
    Corrupt(String),
}

/// A history of snapshots and the node registry.
pub trait Store: Send + Sync + 'static {
    /// The newest snapshot (`None` while the store is empty), updated
    /// whenever any replica appends one.
    fn current(&self) -> watch::Receiver<Option<Arc<ConfigSnapshot>>>;

    /// One stored version, `None` when it is unknown or no longer kept.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Io`],
    /// [`StoreError::Corrupt`].
    fn get(
        &self,
        version: u64,
    ) -> impl Future<Output = Result<Option<ConfigSnapshot>, StoreError>> + Send;

    /// The metadata of the kept versions, newest first, at most `limit`
    /// (0 for all).
    ///
    /// # Errors
    /// As [`Store::get`].
    fn history(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<SnapshotMeta>, StoreError>> + Send;

    /// Stores `snapshot` (its `meta.version` must be `expected + 1`) if
    /// the current version is `expected` (0 for an empty store), durably
    /// before returning; drops versions beyond [`crate::HISTORY_KEPT`].
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when `expected` is not current;
    /// [`StoreError::TooLarge`]; otherwise as [`Store::get`].
    fn append(
        &self,
        expected: u64,
        snapshot: ConfigSnapshot,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records what this replica knows of a node, visible to every
    /// replica until this replica dies or writes it again.
    ///
    /// # Errors
    /// As [`Store::get`].
    fn put_node(&self, status: NodeStatus) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every node any live replica has recorded.
    ///
    /// # Errors
    /// As [`Store::get`].
    fn nodes(&self) -> impl Future<Output = Result<Vec<NodeStatus>, StoreError>> + Send;

    /// Sets (`drained`) or clears an admin's drain of node `node_id`,
    /// durably before returning, visible to every replica.
    ///
    /// # Errors
    /// As [`Store::get`].
    fn set_drained(
        &self,
        node_id: &str,
        drained: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The IDs of the drained nodes.
    ///
    /// # Errors
    /// As [`Store::get`].
    fn drained(&self) -> impl Future<Output = Result<BTreeSet<String>, StoreError>> + Send;
}
