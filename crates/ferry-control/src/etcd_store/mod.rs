//! The etcd store: any number of stateless `ferry control` replicas over
//! one etcd cluster (feature `etcd`).
//!
//! Layout under the prefix (`/ferry/` by default):
//! - `current`: the current version, in decimal; absent while empty;
//! - `snapshots/VERSION` (20 digits, so that key order is version order):
//!   a prost-encoded [`ConfigSnapshot`];
//! - `meta/VERSION`: its [`SnapshotMeta`] alone, so that `History` does
//!   not read every config text;
//! - `nodes/NODE_ID`: a [`NodeStatus`], attached to the lease of the
//!   replica that last wrote it;
//! - `drained/NODE_ID`: present (empty) while an admin drains that node;
//!   without a lease, as it belongs to no replica.
//!
//! [`Store::append`] is one transaction: compare `current`, put the
//! snapshot, its metadata and the new `current`, delete what falls out of
//! the history. Every replica watches `snapshots/` (module `follow`), so an
//! append through one replica reaches the subscribers of all. Every call
//! is bounded by [`EtcdOptions::request_timeout`]: without a quorum an
//! append fails with [`StoreError::Unavailable`] instead of hanging, and
//! [`Store::current`] keeps the last snapshot, so nodes keep serving.

mod follow;
mod lease;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse,
};
use prost::Message as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::proto::{ConfigSnapshot, NodeStatus, SnapshotMeta};
use crate::store::{Store, StoreError};
use crate::{HISTORY_KEPT, MAX_CONFIG_OCTETS};

/// The largest request etcd takes by default (`--max-request-bytes`,
/// 1.5 MiB), less room for the keys and the transaction's framing.
const ETCD_REQUEST_OCTETS: usize = 1536 * 1024 - 4096;

/// How an [`EtcdStore`] uses etcd; [`Default`] suits production.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// The key prefix every key lives under; ends with `/`.
    pub prefix: String,
    /// How many versions are kept (at least 1).
    pub history_kept: usize,
    /// The TTL of this replica's lease, which holds its node entries: a
    /// dead replica's nodes disappear this long after it stopped.
    pub lease_ttl: Duration,
    /// The longest any one etcd call may take; past it the call fails
    /// with [`StoreError::Unavailable`].
    pub request_timeout: Duration,
    /// The revision the first watch starts from; `None` (the default):
    /// the one after the initial read. Only tests set it, to start the
    /// watch on a compacted revision (the store then reads again).
    pub first_watch_revision: Option<i64>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            prefix: "/ferry/".to_string(),
            history_kept: HISTORY_KEPT,
            lease_ttl: Duration::from_secs(10),
            request_timeout: Duration::from_secs(3),
            first_watch_revision: None,
        }
    }
}

/// The keys of one store, all under its prefix.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn current(&self) -> String {
        format!("{}current", self.prefix)
    }
    fn snapshots(&self) -> String {
        format!("{}snapshots/", self.prefix)
    }
    fn snapshot(&self, version: u64) -> String {
        format!("{}snapshots/{version:020}", self.prefix)
    }
    fn metas(&self) -> String {
        format!("{}meta/", self.prefix)
    }
    fn meta(&self, version: u64) -> String {
        format!("{}meta/{version:020}", self.prefix)
    }
    fn nodes(&self) -> String {
        format!("{}nodes/", self.prefix)
    }
    fn node(&self, node_id: &str) -> String {
        format!("{}nodes/{node_id}", self.prefix)
    }
    fn drains(&self) -> String {
        format!("{}drained/", self.prefix)
    }
    fn drained(&self, node_id: &str) -> String {
        format!("{}drained/{node_id}", self.prefix)
    }
}

/// What the store's background tasks share with it.
struct Shared {
    client: Client,
    keys: Keys,
    options: EtcdOptions,
    replica: String,
    /// This replica's lease (replaced when etcd lost it).
    lease: std::sync::atomic::AtomicI64,
    /// The node entries this replica wrote, to write again under a new
    /// lease.
    mine: Mutex<HashMap<String, NodeStatus>>,
}

impl Shared {
    /// Runs a call that may be repeated (a read, a put, or a transaction
    /// guarded by a compare), trying again after any failure or a try
    /// without an answer within [`try_timeout`], until the request
    /// timeout.
    async fn retried<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let timeout = self.options.request_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let per_try = try_timeout(timeout);
        let mut last = String::from("no time to try");
        // The client's channel spreads calls over the members, a dead one
        // included (it fails at once), and a member whose leader just died
        // holds a call until its election: trying again reaches a live
        // member, or the new leader.
        for _ in 0..MAX_TRIES {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(left.min(per_try), call(self.client.clone())).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = format!("no answer within {} ms", per_try.as_millis()),
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            tokio::time::sleep(RETRY_PAUSE.min(left)).await;
        }
        Err(StoreError::Unavailable(format!(
            "etcd: {what} failed for {} ms (is a majority of the etcd members up?); last error: {last}",
            timeout.as_millis()
        )))
    }
}

/// At most this many tries of one call (within the request timeout).
const MAX_TRIES: usize = 100;
/// The pause between two tries of one call.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// How long one try of a call may take: a third of the request timeout
/// (at least 300 ms), so that a call held by a member without a leader
/// is tried again elsewhere in time.
fn try_timeout(request_timeout: Duration) -> Duration {
    (request_timeout / 3).max(Duration::from_millis(300))
}

/// Runs `call` for at most `timeout`; etcd's errors and the timeout become
/// [`StoreError::Unavailable`].
async fn bounded<T>(
    timeout: Duration,
    what: &str,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(StoreError::Unavailable(format!("etcd: {what}: {e}"))),
        Err(_) => Err(StoreError::Unavailable(format!(
            "etcd: {what}: no answer within {} ms",
            timeout.as_millis()
        ))),
    }
}

/// The config store on an etcd cluster. Dropping it stops its watch and
/// revokes its lease (so its node entries go at once).
pub struct EtcdStore {
    shared: Arc<Shared>,
    current: watch::Receiver<Option<Arc<ConfigSnapshot>>>,
    publisher: Arc<watch::Sender<Option<Arc<ConfigSnapshot>>>>,
    stop: CancellationToken,
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (`http://HOST:PORT`
    /// each) as the replica named `replica` (what [`NodeStatus::replica`]
    /// says, its `--listen` address), with the default options.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when no endpoint is given, one is not a
    /// URL, or etcd does not answer within the request timeout;
    /// [`StoreError::Corrupt`] when the newest snapshot cannot be decoded.
    pub async fn connect(endpoints: &[String], replica: &str) -> Result<Self, StoreError> {
        Self::connect_with(endpoints, replica, EtcdOptions::default()).await
    }

    /// As [`EtcdStore::connect`], with `options`.
    ///
    /// # Errors
    /// As [`EtcdStore::connect`].
    pub async fn connect_with(
        endpoints: &[String],
        replica: &str,
        mut options: EtcdOptions,
    ) -> Result<Self, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Unavailable(
                "etcd: no endpoint given (etcd:http://HOST:PORT[,...])".to_string(),
            ));
        }
        options.history_kept = options.history_kept.max(1);
        if !options.prefix.ends_with('/') {
            options.prefix.push('/');
        }
        let connect = ConnectOptions::new()
            .with_connect_timeout(options.request_timeout)
            .with_timeout(options.request_timeout)
            // Dead connections are noticed within seconds, also on an idle
            // watch; a member that lost its leader refuses calls (and ends
            // watches) instead of serving stale data.
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let client = bounded(
            options.request_timeout,
            "connecting",
            Client::connect(endpoints, Some(connect)),
        )
        .await?;
        let keys = Keys {
            prefix: options.prefix.clone(),
        };
        let shared = Arc::new(Shared {
            client,
            keys,
            options,
            replica: replica.to_string(),
            lease: std::sync::atomic::AtomicI64::new(0),
            mine: Mutex::new(HashMap::new()),
        });
        let (newest, revision) = follow::read_newest(&shared).await?;
        let lease = lease::grant(&shared).await?;
        shared
            .lease
            .store(lease, std::sync::atomic::Ordering::SeqCst);
        let (publisher, current) = watch::channel(newest.map(Arc::new));
        let publisher = Arc::new(publisher);
        let stop = CancellationToken::new();
        let first = shared.options.first_watch_revision.unwrap_or(revision + 1);
        tokio::spawn(follow::follow(
            shared.clone(),
            publisher.clone(),
            stop.clone(),
            first,
        ));
        tokio::spawn(lease::keep(shared.clone(), stop.clone()));
        Ok(Self {
            shared,
            current,
            publisher,
            stop,
        })
    }

    /// The ID of this replica's current etcd lease (for tests and logs).
    #[must_use]
    pub fn lease_id(&self) -> i64 {
        self.shared.lease.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("replica", &self.shared.replica)
            .field("prefix", &self.shared.keys.prefix)
            .field("lease", &self.lease_id())
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The version of a snapshot (0 without metadata).
fn version_of(snapshot: &ConfigSnapshot) -> u64 {
    snapshot.meta.as_ref().map_or(0, |m| m.version)
}

/// Decodes a stored snapshot; `key` names it in the error.
fn decode_snapshot(key: &[u8], value: &[u8]) -> Result<ConfigSnapshot, StoreError> {
    ConfigSnapshot::decode(value).map_err(|e| {
        StoreError::Corrupt(format!(
            "etcd key {}: not a snapshot: {e}",
            String::from_utf8_lossy(key)
        ))
    })
}

impl Store for EtcdStore {
    fn current(&self) -> watch::Receiver<Option<Arc<ConfigSnapshot>>> {
        self.current.clone()
    }

    async fn get(&self, version: u64) -> Result<Option<ConfigSnapshot>, StoreError> {
        let key = self.shared.keys.snapshot(version);
        let reply = self
            .shared
            .retried("reading a snapshot", |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        reply
            .kvs()
            .first()
            .map(|kv| decode_snapshot(kv.key(), kv.value()))
            .transpose()
    }

    async fn history(&self, limit: usize) -> Result<Vec<SnapshotMeta>, StoreError> {
        let mut options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Descend);
        if limit > 0 {
            options = options.with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        }
        let key = self.shared.keys.metas();
        let reply = self
            .shared
            .retried("reading the history", |mut c| {
                let (key, options) = (key.clone(), options.clone());
                async move { c.get(key, Some(options)).await }
            })
            .await?;
        reply
            .kvs()
            .iter()
            .map(|kv| {
                SnapshotMeta::decode(kv.value()).map_err(|e| {
                    StoreError::Corrupt(format!(
                        "etcd key {}: not snapshot metadata: {e}",
                        String::from_utf8_lossy(kv.key())
                    ))
                })
            })
            .collect()
    }

    async fn append(&self, expected: u64, snapshot: ConfigSnapshot) -> Result<(), StoreError> {
        // Before anything is sent: etcd would refuse it anyway, less clearly.
        if snapshot.config.len() > MAX_CONFIG_OCTETS {
            return Err(StoreError::TooLarge {
                size: snapshot.config.len(),
                max: MAX_CONFIG_OCTETS,
            });
        }
        let version = version_of(&snapshot);
        if Some(version) != expected.checked_add(1) {
            return Err(StoreError::Corrupt(format!(
                "refusing to store a snapshot numbered {version} after version {expected}"
            )));
        }
        let meta = snapshot.meta.clone().unwrap_or_default();
        let encoded = snapshot.encode_to_vec();
        let meta_encoded = meta.encode_to_vec();
        let size = encoded.len() + meta_encoded.len();
        if size > ETCD_REQUEST_OCTETS {
            return Err(StoreError::TooLarge {
                size,
                max: ETCD_REQUEST_OCTETS,
            });
        }
        let keys = &self.shared.keys;
        let current = keys.current();
        let compare = if expected == 0 {
            Compare::version(current.clone(), CompareOp::Equal, 0)
        } else {
            Compare::value(current.clone(), CompareOp::Equal, expected.to_string())
        };
        let mut ops = vec![
            TxnOp::put(keys.snapshot(version), encoded.clone(), None),
            TxnOp::put(keys.meta(version), meta_encoded, None),
            TxnOp::put(current.clone(), version.to_string(), None),
        ];
        // Everything below the oldest kept version goes in the same
        // transaction: a range, so that a smaller bound than an earlier
        // run's trims all the excess at once.
        let oldest_kept = (version + 1).saturating_sub(self.shared.options.history_kept as u64);
        if oldest_kept > 1 {
            ops.push(TxnOp::delete(
                keys.snapshots(),
                Some(DeleteOptions::new().with_range(keys.snapshot(oldest_kept))),
            ));
            ops.push(TxnOp::delete(
                keys.metas(),
                Some(DeleteOptions::new().with_range(keys.meta(oldest_kept))),
            ));
        }
        // On a lost compare, the current version, and whether the version
        // is this very snapshot: a try whose answer was lost committed it.
        let txn = Txn::new().when([compare]).and_then(ops).or_else([
            TxnOp::get(current, None),
            TxnOp::get(keys.snapshot(version), None),
        ]);
        let reply = self
            .shared
            .retried("storing a new version", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if !reply.succeeded() {
            let mut values = reply.op_responses().into_iter().map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            });
            let now = values.next().flatten();
            let stored = values.next().flatten();
            if stored.is_some_and(|stored| stored == encoded) {
                follow::publish(&self.publisher, snapshot);
                return Ok(());
            }
            let now = now.map_or(Ok(0), |value| parse_version(&value))?;
            return Err(StoreError::Conflict {
                expected,
                current: now,
            });
        }
        // This replica's subscribers need not wait for the watch.
        follow::publish(&self.publisher, snapshot);
        Ok(())
    }

    /// Records `status` under this replica's lease, with
    /// [`NodeStatus::replica`] set to this replica's name.
    async fn put_node(&self, mut status: NodeStatus) -> Result<(), StoreError> {
        status.replica.clone_from(&self.shared.replica);
        let key = self.shared.keys.node(&status.node_id);
        let value = status.encode_to_vec();
        // Recorded first: a lease replaced meanwhile rewrites it too.
        if let Ok(mut mine) = self.shared.mine.lock() {
            mine.insert(status.node_id.clone(), status);
        }
        // The lease is read at each try: one replaced meanwhile (the old
        // one expired) is taken up by the next.
        let shared = &self.shared;
        let put = |mut c: Client| {
            let (key, value) = (key.clone(), value.clone());
            let lease = shared.lease.load(std::sync::atomic::Ordering::SeqCst);
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        };
        shared.retried("recording a node", put).await?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeStatus>, StoreError> {
        let key = self.shared.keys.nodes();
        let reply = self
            .shared
            .retried("reading the nodes", |mut c| {
                let key = key.clone();
                async move { c.get(key, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        reply
            .kvs()
            .iter()
            .map(|kv| {
                NodeStatus::decode(kv.value()).map_err(|e| {
                    StoreError::Corrupt(format!(
                        "etcd key {}: not a node status: {e}",
                        String::from_utf8_lossy(kv.key())
                    ))
                })
            })
            .collect()
    }

    async fn set_drained(&self, node_id: &str, drained: bool) -> Result<(), StoreError> {
        self.set_drained_key(node_id, drained).await
    }

    async fn drained(&self) -> Result<BTreeSet<String>, StoreError> {
        self.drained_keys().await
    }
}

impl EtcdStore {
    /// [`Store::set_drained`]: a put or a delete, both safe to repeat.
    async fn set_drained_key(&self, node_id: &str, drained: bool) -> Result<(), StoreError> {
        let key = self.shared.keys.drained(node_id);
        match drained {
            true => {
                let put = |mut c: Client| {
                    let key = key.clone();
                    async move { c.put(key, Vec::new(), None).await.map(|_| ()) }
                };
                self.shared.retried("recording a drain", put).await
            }
            false => {
                let delete = |mut c: Client| {
                    let key = key.clone();
                    async move { c.delete(key, None).await.map(|_| ()) }
                };
                self.shared.retried("clearing a drain", delete).await
            }
        }
    }

    /// [`Store::drained`]: the keys under `drained/`.
    async fn drained_keys(&self) -> Result<BTreeSet<String>, StoreError> {
        let prefix = self.shared.keys.drains();
        let reply = self
            .shared
            .retried("reading the drained nodes", |mut c| {
                let prefix = prefix.clone();
                let options = GetOptions::new().with_prefix().with_keys_only();
                async move { c.get(prefix, Some(options)).await }
            })
            .await?;
        Ok(reply
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                key.strip_prefix(&prefix).map(str::to_string)
            })
            .collect())
    }
}

/// The decimal version in the `current` key.
fn parse_version(value: &[u8]) -> Result<u64, StoreError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| {
            StoreError::Corrupt(format!(
                "the current version is not a number: {:?}",
                String::from_utf8_lossy(value)
            ))
        })
}
