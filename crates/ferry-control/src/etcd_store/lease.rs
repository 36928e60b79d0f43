//! This replica's lease: its node entries live while it does. Kept alive
//! every third of its TTL; when etcd has let it expire (etcd was
//! unreachable for longer than the TTL), a new one is granted and this
//! replica's node entries are written again under it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::store::StoreError;

/// Grants a lease of the configured TTL; returns its ID.
///
/// # Errors
/// [`StoreError::Unavailable`].
pub(super) async fn grant(shared: &Shared) -> Result<i64, StoreError> {
    let ttl = i64::try_from(shared.options.lease_ttl.as_secs().max(1)).unwrap_or(10);
    // A lease granted twice (an answer lost) expires unused.
    let reply = shared
        .retried("granting a lease", |mut c| async move {
            c.lease_grant(ttl, None).await
        })
        .await?;
    Ok(reply.id())
}

/// What one keep-alive found.
enum Kept {
    Alive,
    /// etcd no longer knows the lease.
    Expired,
    Unreachable(StoreError),
}

async fn keep_alive(shared: &Shared, id: i64) -> Kept {
    let mut lease = shared.client.lease_client();
    let timeout = shared.options.request_timeout;
    match tokio::time::timeout(timeout, lease.keep_alive(id)).await {
        Ok(Ok(_)) => Kept::Alive,
        // The client reports a TTL of 0 (lease unknown) this way.
        Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => Kept::Expired,
        Ok(Err(e)) => Kept::Unreachable(StoreError::Unavailable(format!(
            "etcd: keeping the lease alive: {e}"
        ))),
        Err(_) => Kept::Unreachable(StoreError::Unavailable(format!(
            "etcd: keeping the lease alive: no answer within {} ms",
            timeout.as_millis()
        ))),
    }
}

/// Keeps the lease alive until `stop`, then revokes it, so that this
/// replica's node entries go at once.
pub(super) async fn keep(shared: Arc<Shared>, stop: CancellationToken) {
    let period = (shared.options.lease_ttl / 3).max(Duration::from_millis(200));
    let mut lost = false;
    // Runs until the store is dropped, one keep-alive per period.
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(period) => {}
        }
        let id = shared.lease.load(Ordering::SeqCst);
        match keep_alive(&shared, id).await {
            Kept::Alive => {
                if lost {
                    tracing::info!(replica = %shared.replica, "etcd store: the lease is kept alive again");
                    lost = false;
                }
            }
            Kept::Unreachable(e) => {
                if !lost {
                    tracing::warn!(replica = %shared.replica, error = %e, "etcd store: cannot keep the lease alive; retrying");
                    lost = true;
                }
            }
            Kept::Expired => {
                tracing::warn!(replica = %shared.replica, lease = id,
                    "etcd store: etcd let this replica's lease expire; granting a new one and recording its nodes again"
                );
                match grant(&shared).await {
                    Ok(new) => {
                        shared.lease.store(new, Ordering::SeqCst);
                        rewrite_nodes(&shared, id, new).await;
                        lost = false;
                    }
                    Err(e) => {
                        tracing::warn!(replica = %shared.replica, error = %e, "etcd store: cannot grant a new lease; retrying");
                        lost = true;
                    }
                }
            }
        }
    }
    let id = shared.lease.load(Ordering::SeqCst);
    let revoke = |mut c: etcd_client::Client| async move { c.lease_revoke(id).await };
    if let Err(e) = shared.retried("revoking the lease", revoke).await {
        tracing::info!(replica = %shared.replica, error = %e, "etcd store: could not revoke the lease; its nodes expire with it");
    }
}

/// Writes this replica's node entries again under lease `new`, each only
/// if it is still this replica's (under `old`) or gone: a node that moved
/// to another replica meanwhile stays with that one (and is forgotten
/// here).
async fn rewrite_nodes(shared: &Shared, old: i64, new: i64) {
    let mine: Vec<_> = match shared.mine.lock() {
        Ok(mine) => mine.values().cloned().collect(),
        Err(_) => return,
    };
    for status in mine {
        let key = shared.keys.node(&status.node_id);
        let read = shared
            .retried("reading a node", |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await;
        let (revision, lease) = match read {
            Ok(reply) => reply
                .kvs()
                .first()
                .map_or((0, old), |kv| (kv.mod_revision(), kv.lease())),
            Err(e) => {
                tracing::warn!(replica = %shared.replica, error = %e, node = %status.node_id, "etcd store: cannot record a node again");
                continue;
            }
        };
        if lease != old && lease != new {
            if let Ok(mut mine) = shared.mine.lock() {
                mine.remove(&status.node_id);
            }
            continue;
        }
        // Unchanged since the read (mod revision 0: still absent).
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::put(
                key,
                status.encode_to_vec(),
                Some(PutOptions::new().with_lease(new)),
            )]);
        let rewrite = |mut c: etcd_client::Client| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        };
        if let Err(e) = shared.retried("recording a node again", rewrite).await {
            tracing::warn!(replica = %shared.replica, error = %e, node = %status.node_id, "etcd store: cannot record a node again");
        }
    }
}
