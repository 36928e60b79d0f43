//! Following the newest snapshot: a watch on `snapshots/`, and after a
//! compaction or a lost watch, a fresh read and a new watch from there.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{GetOptions, SortOrder, SortTarget, WatchOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{decode_snapshot, version_of, Shared};
use crate::proto::ConfigSnapshot;
use crate::store::StoreError;

/// The first pause before reading again after a failure; it doubles up to
/// [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// Sets `snapshot` as the current one unless a newer one is there already
/// (the watch and this replica's own appends both publish).
pub(super) fn publish(
    publisher: &watch::Sender<Option<Arc<ConfigSnapshot>>>,
    snapshot: ConfigSnapshot,
) {
    let version = version_of(&snapshot);
    publisher.send_if_modified(|current| {
        if current.as_ref().is_some_and(|c| version_of(c) >= version) {
            return false;
        }
        *current = Some(Arc::new(snapshot));
        true
    });
}

/// The newest stored snapshot (`None` while empty) and the revision it was
/// read at.
///
/// # Errors
/// [`StoreError::Unavailable`], [`StoreError::Corrupt`].
pub(super) async fn read_newest(
    shared: &Shared,
) -> Result<(Option<ConfigSnapshot>, i64), StoreError> {
    let options = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Key, SortOrder::Descend)
        .with_limit(1);
    let key = shared.keys.snapshots();
    let reply = shared
        .retried("reading the current version", |mut c| {
            let (key, options) = (key.clone(), options.clone());
            async move { c.get(key, Some(options)).await }
        })
        .await?;
    let revision = reply.header().map_or(0, |h| h.revision());
    let newest = reply
        .kvs()
        .first()
        .map(|kv| decode_snapshot(kv.key(), kv.value()))
        .transpose()?;
    Ok((newest, revision))
}

/// Why one watch ended.
enum Ended {
    Stopped,
    Compacted(i64),
    Lost(String),
}

/// Publishes every snapshot appended through any replica, from revision
/// `from` on, until `stop`. Each loss (compaction, broken watch, etcd
/// unreachable) is logged once, and once more when following resumes.
pub(super) async fn follow(
    shared: Arc<Shared>,
    publisher: Arc<watch::Sender<Option<Arc<ConfigSnapshot>>>>,
    stop: CancellationToken,
    from: i64,
) {
    let mut from = Some(from);
    let mut lost = false;
    let mut pause = FIRST_PAUSE;
    // Runs until the store is dropped; each failed round waits `pause`.
    while !stop.is_cancelled() {
        let start = match from.take() {
            Some(revision) => revision,
            None => match read_newest(&shared).await {
                Ok((newest, revision)) => {
                    if let Some(snapshot) = newest {
                        publish(&publisher, snapshot);
                    }
                    revision + 1
                }
                Err(e) => {
                    if !lost {
                        tracing::warn!(replica = %shared.replica, error = %e, "etcd store: cannot read the current version; retrying");
                        lost = true;
                        pause = FIRST_PAUSE;
                    }
                    if pause_or_stop(&stop, &mut pause).await {
                        return;
                    }
                    continue;
                }
            },
        };
        match watch_from(&shared, &publisher, &stop, start, &mut lost).await {
            Ended::Stopped => return,
            Ended::Compacted(compacted) => {
                // Not a failure to report as such: read again, go on.
                tracing::info!(replica = %shared.replica, revision = start,
                    compacted,
                    "etcd store: the watch's revision was compacted; reading the current version again"
                );
                pause = FIRST_PAUSE;
            }
            Ended::Lost(why) => {
                if !lost {
                    tracing::warn!(replica = %shared.replica, error = %why, "etcd store: lost the watch on etcd; reading again and watching anew");
                    lost = true;
                    pause = FIRST_PAUSE;
                }
                if pause_or_stop(&stop, &mut pause).await {
                    return;
                }
            }
        }
    }
}

/// Waits `pause` (then doubles it, up to [`MAX_PAUSE`]); `true` when
/// stopped meanwhile.
async fn pause_or_stop(stop: &CancellationToken, pause: &mut Duration) -> bool {
    let wait = *pause;
    *pause = (*pause * 2).min(MAX_PAUSE);
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(wait) => false,
    }
}

/// One watch on `snapshots/` from `start`, publishing each snapshot put,
/// until it ends.
async fn watch_from(
    shared: &Shared,
    publisher: &watch::Sender<Option<Arc<ConfigSnapshot>>>,
    stop: &CancellationToken,
    start: i64,
    lost: &mut bool,
) -> Ended {
    let options = WatchOptions::new().with_prefix().with_start_revision(start);
    let key = shared.keys.snapshots();
    let opened = shared
        .retried("watching the snapshots", |mut c| {
            let (key, options) = (key.clone(), options.clone());
            async move { c.watch(key, Some(options)).await }
        })
        .await;
    let mut stream = match opened {
        Ok(stream) => stream,
        Err(e) => return Ended::Lost(e.to_string()),
    };
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return Ended::Stopped,
            message = stream.message() => message,
        };
        let response = match message {
            Ok(Some(response)) => response,
            Ok(None) => return Ended::Lost("etcd ended the watch".to_string()),
            Err(e) => return Ended::Lost(e.to_string()),
        };
        if response.compact_revision() > 0 {
            return Ended::Compacted(response.compact_revision());
        }
        if response.canceled() {
            let reason = response.cancel_reason();
            return Ended::Lost(format!("etcd canceled the watch: {reason}"));
        }
        if *lost {
            tracing::info!(replica = %shared.replica, "etcd store: following etcd again");
            *lost = false;
        }
        // Deletions (history trimmed) carry no value; the kind of an
        // event is not read, as the client panics on an unknown one.
        for kv in response.events().iter().filter_map(|event| event.kv()) {
            if kv.value().is_empty() {
                continue;
            }
            match decode_snapshot(kv.key(), kv.value()) {
                Ok(snapshot) => publish(publisher, snapshot),
                Err(e) => {
                    tracing::warn!(replica = %shared.replica, error = %e, "etcd store: skipping a damaged snapshot")
                }
            }
        }
    }
}
