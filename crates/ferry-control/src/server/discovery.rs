//! `ConfigDiscovery`: what nodes call. Each Watch stream is one task
//! reading the store's `watch` channel: the channel holds only the newest
//! snapshot, so a stream that cannot keep up skips to it, and no stream
//! waits for another. Every stream sends the same `Arc`'d snapshot (its
//! config is `Bytes`: a clone is a reference count, not a copy).
//! WatchPool streams follow the registry's `watch` channel the same way.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{metric, node, now, sha_of, version_of, ControlPlane, NodeEntry};
use crate::proto::config_discovery_server::ConfigDiscovery;
use crate::proto::{
    ConfigSnapshot, NodeStatus, Pool, ReportRequest, ReportResponse, WatchPoolRequest, WatchRequest,
};
use crate::store::Store;

/// How long a first-time sync holds its place among the
/// [`super::FIRST_SYNCS_AT_ONCE`] while the transport takes the message:
/// a stuck connection must not keep a place for ever.
const FIRST_SYNC_HOLD: Duration = Duration::from_secs(10);

/// The most of a node's NACK error that is kept (octets).
const NACK_ERROR_KEPT: usize = 4096;

impl<S: Store> ControlPlane<S> {
    /// The node's entry, from this replica or, for a node first seen
    /// here, from the store (another replica, or this one before a
    /// restart with the etcd store, knew it).
    async fn entry_status(&self, node_id: &str) -> NodeStatus {
        if let Some(entry) = self.lock_nodes().get(node_id) {
            return entry.status.clone();
        }
        match self.shared.store.nodes().await {
            Ok(nodes) => nodes.into_iter().find(|n| n.node_id == node_id),
            Err(e) => {
                tracing::warn!(node = node_id, error = %e, "cannot read node status from the store");
                None
            }
        }
        .unwrap_or_else(|| NodeStatus {
            node_id: node_id.to_string(),
            ..NodeStatus::default()
        })
    }

    fn lock_nodes(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, NodeEntry>> {
        self.shared.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes a node's status with `change` (if `stream` is given, only
    /// while that stream is the node's newest), writes it to the store and
    /// refreshes the gauges.
    async fn update(
        &self,
        node_id: &str,
        stream: Option<u64>,
        change: impl FnOnce(&mut NodeEntry),
    ) {
        let base = self.entry_status(node_id).await;
        let status = {
            let mut nodes = self.lock_nodes();
            let entry = nodes.entry(node_id.to_string()).or_insert(NodeEntry {
                status: base,
                stream: 0,
            });
            if stream.is_some_and(|s| s != entry.stream) {
                return;
            }
            change(entry);
            entry.status.replica = self.shared.replica.clone();
            entry.status.last_seen = Some(now());
            let status = entry.status.clone();
            let current = self.current().as_deref().map_or(0, version_of);
            metric::nodes(nodes.values().map(|e| &e.status), current);
            status
        };
        if let Err(e) = self.shared.store.put_node(status).await {
            tracing::warn!(node = node_id, error = %e, "cannot record node status");
        }
        self.poke_registry();
    }

    /// Feeds one WatchPool stream: `first`, then each pool that differs
    /// from the last sent, the newest only, until the node goes away.
    async fn feed_pool(
        self,
        node_id: String,
        first: Pool,
        mut pools: tokio::sync::watch::Receiver<Arc<Pool>>,
        tx: mpsc::Sender<Result<Pool, Status>>,
    ) {
        let mut closing = self.shared.closing.subscribe();
        let mut last = first.clone();
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                changed = pools.changed() => if changed.is_err() { break },
                () = tx.closed() => break,
                _ = closing.wait_for(|c| *c) => break,
            }
            let pool = Pool::clone(&pools.borrow_and_update());
            if pool == last {
                continue;
            }
            tracing::debug!(
                node = %node_id,
                in_rotation = pool.members.iter().filter(|m| m.in_rotation).count(),
                members = pool.members.len(),
                "sending the pool"
            );
            if tx.send(Ok(pool.clone())).await.is_err() {
                break;
            }
            last = pool;
        }
        tracing::info!(node = %node_id, "pool stream ended");
    }

    /// Feeds one Watch stream until the node goes away.
    async fn feed(
        self,
        request: WatchRequest,
        stream: u64,
        tx: mpsc::Sender<Result<ConfigSnapshot, Status>>,
    ) {
        let node_id = request.node_id.as_str();
        let mut current = self.shared.store.current();
        let mut known = (request.known_version, request.known_sha256.clone());
        let mut first = true;
        let mut closing = self.shared.closing.subscribe();
        loop {
            let snapshot = current.borrow_and_update().clone();
            if let Some(snapshot) = snapshot {
                if self.should_send(node_id, &snapshot, &known) {
                    if !self.send(node_id, stream, &snapshot, first, &tx).await {
                        break;
                    }
                    known = (version_of(&snapshot), sha_of(&snapshot).to_string());
                }
            }
            first = false;
            tokio::select! {
                changed = current.changed() => if changed.is_err() { break },
                () = tx.closed() => break,
                _ = closing.wait_for(|c| *c) => break,
            }
        }
        self.update(node_id, Some(stream), |e| e.status.connected = false)
            .await;
        tracing::info!(node = node_id, "node stream ended");
    }

    /// Whether `snapshot` goes to the node: not when it has it already,
    /// and not when it NACKed that version (it would only NACK again; the
    /// next version may fix it).
    fn should_send(&self, node_id: &str, snapshot: &ConfigSnapshot, known: &(u64, String)) -> bool {
        let version = version_of(snapshot);
        if version == known.0 && sha_of(snapshot) == known.1 {
            return false;
        }
        let nacked = self
            .lock_nodes()
            .get(node_id)
            .is_some_and(|e| e.status.nacked_version == version);
        if nacked {
            tracing::info!(
                node = node_id,
                version,
                "not resending a version the node NACKed"
            );
        }
        !nacked
    }

    /// Sends one snapshot on the stream; false when the node is gone. A
    /// first-time sync waits for a place among the few sent at once and
    /// holds it until the transport has taken the message.
    async fn send(
        &self,
        node_id: &str,
        stream: u64,
        snapshot: &Arc<ConfigSnapshot>,
        first: bool,
        tx: &mpsc::Sender<Result<ConfigSnapshot, Status>>,
    ) -> bool {
        let place = match first {
            true => tokio::select! {
                place = self.shared.first_syncs.acquire() => place.ok(),
                () = tx.closed() => return false,
            },
            false => None,
        };
        let version = version_of(snapshot);
        self.update(node_id, Some(stream), |e| e.status.sent_version = version)
            .await;
        metric::sent(first);
        tracing::debug!(node = node_id, version, first, "sending a snapshot");
        if tx.send(Ok(ConfigSnapshot::clone(snapshot))).await.is_err() {
            return false;
        }
        if place.is_some() {
            // The channel holds one message: room again means taken.
            let _ = tokio::time::timeout(FIRST_SYNC_HOLD, tx.reserve()).await;
        }
        true
    }
}

#[tonic::async_trait]
impl<S: Store> ConfigDiscovery for ControlPlane<S> {
    type WatchStream = ReceiverStream<Result<ConfigSnapshot, Status>>;
    type WatchPoolStream = ReceiverStream<Result<Pool, Status>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        node(&request, &request.get_ref().node_id)?;
        // A worker listening on every address gave none a balancer can
        // dial: the address it calls from is the one to use.
        let peer = request.remote_addr().map(|a| a.ip());
        let mut r = request.into_inner();
        let unspecified = r
            .smtp_address
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified());
        if let (true, Some(peer)) = (unspecified, peer) {
            r.smtp_address = peer.to_string();
        }
        let mut stream = 0;
        self.update(&r.node_id, None, |e| {
            e.stream += 1;
            stream = e.stream;
            let s = &mut e.status;
            s.role = r.role;
            s.smtp_address = r.smtp_address.clone();
            s.connected = true;
            // What the node serves now (its last-good copy).
            if r.known_version != 0 {
                s.applied_version = r.known_version;
                s.applied_sha256 = r.known_sha256.clone();
            }
        })
        .await;
        tracing::info!(
            node = %r.node_id,
            role = r.role,
            smtp_address = %r.smtp_address,
            known_version = r.known_version,
            "node subscribed"
        );
        // One message of room: a slow node holds back only itself, and
        // takes the newest version once it has room again.
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(self.clone().feed(r, stream, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report(
        &self,
        request: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        node(&request, &request.get_ref().node_id)?;
        let r = request.into_inner();
        let mut outcome = "superseded";
        self.update(&r.node_id, None, |e| {
            let s = &mut e.status;
            // A report about a version older than the last one sent says
            // nothing about what the node will run.
            if r.for_version < s.sent_version {
                return;
            }
            if r.error.is_empty() {
                outcome = "ack";
                s.applied_version = r.applied_version;
                s.applied_sha256 = r.sha256.clone();
                if s.nacked_version <= r.for_version {
                    s.nacked_version = 0;
                    s.nack_error.clear();
                }
            } else {
                outcome = "nack";
                s.nacked_version = r.for_version;
                s.nack_error = truncate(&r.error, NACK_ERROR_KEPT);
                if r.applied_version != 0 {
                    s.applied_version = r.applied_version;
                    s.applied_sha256 = r.sha256.clone();
                }
            }
        })
        .await;
        metric::report(outcome);
        match outcome {
            "nack" => tracing::warn!(
                node = %r.node_id,
                version = r.for_version,
                serving = r.applied_version,
                error = %r.error,
                "node NACKed a config version; it keeps serving the one before"
            ),
            "ack" => tracing::info!(node = %r.node_id, version = r.for_version, "node ACKed"),
            _ => tracing::debug!(
                node = %r.node_id,
                version = r.for_version,
                "report for a superseded version ignored"
            ),
        }
        Ok(Response::new(ReportResponse {}))
    }

    async fn watch_pool(
        &self,
        request: Request<WatchPoolRequest>,
    ) -> Result<Response<Self::WatchPoolStream>, Status> {
        node(&request, &request.get_ref().node_id)?;
        let node_id = request.into_inner().node_id;
        // Subscribed before the first pool is read: a change after it is
        // not missed.
        let pools = self.shared.pool.subscribe();
        let first = self.pool().await.map_err(super::store_status)?;
        self.poke_registry();
        tracing::info!(
            node = %node_id,
            members = first.members.len(),
            complete = first.complete,
            "balancer watches the pool"
        );
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(self.clone().feed_pool(node_id, first, pools, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// At most `max` octets of `text`, cut at a character boundary.
fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::file_store::FileStore;
    use crate::proto::SnapshotMeta;

    fn snapshot(version: u64) -> ConfigSnapshot {
        let text = format!("# version {version}\n");
        ConfigSnapshot {
            meta: Some(SnapshotMeta {
                version,
                sha256: crate::sha256_hex(text.as_bytes()),
                ..SnapshotMeta::default()
            }),
            config: text.into_bytes().into(),
        }
    }

    fn request(id: &str) -> WatchRequest {
        WatchRequest {
            node_id: id.into(),
            ..WatchRequest::default()
        }
    }

    async fn received(rx: &mut mpsc::Receiver<Result<ConfigSnapshot, Status>>) -> u64 {
        let next = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        version_of(&next.unwrap().unwrap().unwrap())
    }

    /// A node that reads nothing holds back only itself, and when it reads
    /// again gets the newest version, not each one it missed.
    #[tokio::test]
    async fn a_stuck_stream_skips_to_the_newest_and_holds_back_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::open(dir.path()).unwrap());
        store.append(0, snapshot(1)).await.unwrap();
        let plane = ControlPlane::new(Arc::clone(&store), "test");
        let (stuck_tx, mut stuck) = mpsc::channel(1);
        let (live_tx, mut live) = mpsc::channel(1);
        tokio::spawn(plane.clone().feed(request("stuck"), 0, stuck_tx));
        tokio::spawn(plane.clone().feed(request("live"), 0, live_tx));
        assert_eq!(received(&mut live).await, 1);
        for v in 2..=20 {
            store.append(v - 1, snapshot(v)).await.unwrap();
            // The reading node gets every version as it comes.
            assert_eq!(received(&mut live).await, v);
        }
        // The stuck one: what sat in its channel, at most one more that
        // was on its way, then the newest.
        let mut seen = vec![received(&mut stuck).await];
        while seen.last() != Some(&20) && seen.len() < 20 {
            seen.push(received(&mut stuck).await);
        }
        assert_eq!(seen.first(), Some(&1), "{seen:?}");
        assert_eq!(seen.last(), Some(&20), "{seen:?}");
        assert!(seen.len() <= 3, "{seen:?}");
    }

    /// A balancer that reads nothing holds back no one, and when it reads
    /// again gets the newest pool, not each one it missed.
    #[tokio::test]
    async fn a_stuck_pool_stream_skips_to_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::open(dir.path()).unwrap());
        let plane = ControlPlane::new(store, "test");
        let pool = |v| Pool {
            current_version: v,
            ..Pool::default()
        };
        let (pools, rx) = tokio::sync::watch::channel(Arc::new(pool(0)));
        let (tx, mut stuck) = mpsc::channel(1);
        tokio::spawn(plane.feed_pool("b1".into(), pool(0), rx, tx));
        for v in 1..=20 {
            pools.send_replace(Arc::new(pool(v)));
            tokio::task::yield_now().await;
        }
        let mut seen = Vec::new();
        while seen.last() != Some(&20) && seen.len() < 20 {
            let next = tokio::time::timeout(Duration::from_secs(10), stuck.recv()).await;
            seen.push(next.unwrap().unwrap().unwrap().current_version);
        }
        assert_eq!(seen.first(), Some(&0), "{seen:?}");
        assert_eq!(seen.last(), Some(&20), "{seen:?}");
        assert!(seen.len() <= 3, "{seen:?}");
    }
}
