//! The node registry: every worker that subscribed is a pool member, and
//! the balancers send new sessions to those in rotation.
//!
//! A worker is in rotation unless an admin drained it, it has been
//! disconnected for longer than the grace period, or it has been behind
//! the current version for longer than the grace period ("nacked" when it
//! refused the version after its own, else "lagging"). The grace period
//! rides out a control-plane restart, a worker's reconnect, and the
//! moments between an Apply and the workers' ACKs; past it, a worker that
//! does not serve the config the others serve takes no new client.
//!
//! The state is computed, not stored: from the node statuses every
//! replica writes, the drained set, and the history's `created_at` (a
//! worker is behind since the version after its own was applied). So any
//! replica computes the same pool. A worker whose status vanished from
//! the store (its replica died and its lease expired) counts as
//! disconnected since this replica last saw it, until it reconnects
//! elsewhere.
//!
//! One task per replica recomputes the pool each [`POOL_REFRESH`], and at
//! once when a node's status, a drain or the current version changes here,
//! while some balancer watches it; `WatchPool` streams read the newest
//! from a `watch` channel.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use super::{lock, version_of, ControlPlane, Shared};
use crate::proto::{NodeRole, NodeStatus, Pool, PoolMember};
use crate::store::{Store, StoreError};
use crate::subscriber::backoff;

/// The default grace period (`ferry control --grace`).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// How often the pool is recomputed while a balancer watches it: changes
/// on other replicas and grace periods running out are seen this late at
/// most.
pub const POOL_REFRESH: Duration = Duration::from_secs(1);

/// How long after a replica starts its pool is marked incomplete (a
/// balancer keeps the workers it does not list yet): the longer of the
/// grace period and the longest a node can wait before it calls again.
/// That wait is the reconnect backoff's cap with its jitter
/// ([`backoff::MAX`] × (1 + [`backoff::JITTER`]), 144 s): the backoff
/// clamps its sleep to the cap, so the jitter's share is the margin for
/// the attempt itself (connect, TLS, the first report), bounded at 5 s
/// by the subscriber's connect timeout.
pub fn incomplete_for(grace: Duration) -> Duration {
    grace.max(backoff::MAX.mul_f64(1.0 + backoff::JITTER))
}

/// Why a worker is out of rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    /// An admin drained it (`ferry ctl drain`).
    Drained,
    /// Its stream ended longer than the grace period ago.
    Disconnected,
    /// Behind the current version past the grace period, having refused
    /// the version after its own.
    Nacked,
    /// Behind the current version past the grace period.
    Lagging,
}

impl Out {
    /// The word `Nodes` and `WatchPool` carry.
    pub fn as_str(self) -> &'static str {
        match self {
            Out::Drained => "drained",
            Out::Disconnected => "disconnected",
            Out::Nacked => "nacked",
            Out::Lagging => "lagging",
        }
    }
}

/// Whether a worker is in rotation (`None`) or why not. `behind_since` is
/// when the version after the worker's own was applied (`None`: not
/// known, so long ago).
pub fn rotation(
    node: &NodeStatus,
    current: u64,
    behind_since: Option<SystemTime>,
    drained: bool,
    now: SystemTime,
    grace: Duration,
) -> Option<Out> {
    let past_grace = |since: SystemTime| now.duration_since(since).is_ok_and(|d| d >= grace);
    if drained {
        return Some(Out::Drained);
    }
    let last_seen = node
        .last_seen
        .and_then(|t| SystemTime::try_from(t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if !node.connected && past_grace(last_seen) {
        return Some(Out::Disconnected);
    }
    if node.applied_version < current && past_grace(behind_since.unwrap_or(SystemTime::UNIX_EPOCH))
    {
        return Some(match node.nacked_version > node.applied_version {
            true => Out::Nacked,
            false => Out::Lagging,
        });
    }
    None
}

fn is_worker(node: &NodeStatus) -> bool {
    node.role == NodeRole::Worker as i32
}

impl<S: Store> ControlPlane<S> {
    /// Every node with its lag and, for a worker, its rotation state;
    /// sorted by node ID. The current version first.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub(super) async fn registry(&self) -> Result<(u64, Vec<NodeStatus>), StoreError> {
        let current = self.current().as_deref().map_or(0, version_of);
        let mut nodes = self.shared.store.nodes().await?;
        let drained = self.shared.store.drained().await?;
        let now = SystemTime::now();
        let grace = self.shared.grace;
        self.remember(&mut nodes, now);
        // When each version a worker lacks was applied: the history's
        // newest, as far back as the worker furthest behind.
        let furthest = nodes
            .iter()
            .filter(|n| is_worker(n))
            .map(|n| current.saturating_sub(n.applied_version))
            .max()
            .unwrap_or(0);
        let applied_at: HashMap<u64, SystemTime> = match furthest {
            0 => HashMap::new(),
            n => self
                .shared
                .store
                .history(usize::try_from(n).unwrap_or(usize::MAX))
                .await?
                .into_iter()
                .filter_map(|m| {
                    let at = SystemTime::try_from(m.created_at?).ok()?;
                    Some((m.version, at))
                })
                .collect(),
        };
        let mut outs = Vec::with_capacity(nodes.len());
        for node in &mut nodes {
            node.lag = current.saturating_sub(node.applied_version);
            node.drained = drained.contains(&node.node_id);
            let behind_since = applied_at.get(&(node.applied_version + 1)).copied();
            outs.push(
                is_worker(node)
                    .then(|| rotation(node, current, behind_since, node.drained, now, grace))
                    .flatten(),
            );
        }
        // Being behind takes a worker out only while another serves the
        // current version: a version that every worker refuses (a typo in
        // a certificate path) must not take the whole pool out, when each
        // still serves the one before (Envoy's panic threshold, at zero).
        let in_step = nodes
            .iter()
            .zip(&outs)
            .any(|(n, out)| is_worker(n) && out.is_none());
        for (node, out) in nodes.iter_mut().zip(outs) {
            if !is_worker(node) {
                continue;
            }
            let out = out.filter(|o| in_step || !matches!(o, Out::Nacked | Out::Lagging));
            node.in_rotation = out.is_none();
            node.out_reason = out.map(Out::as_str).unwrap_or_default().to_string();
        }
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok((current, nodes))
    }

    /// Remembers the workers the store lists, and adds those it no longer
    /// lists (their replica's lease expired) as disconnected since this
    /// replica last saw them, for twice the grace period.
    fn remember(&self, nodes: &mut Vec<NodeStatus>, now: SystemTime) {
        let mut seen = lock(&self.shared.seen);
        let present: HashSet<String> = nodes.iter().map(|n| n.node_id.clone()).collect();
        for node in nodes.iter().filter(|n| is_worker(n)) {
            seen.insert(node.node_id.clone(), (node.clone(), now));
        }
        let forget_after = self.shared.grace * 2;
        seen.retain(|_, (_, at)| now.duration_since(*at).is_ok_and(|d| d < forget_after));
        for (id, (status, at)) in seen.iter() {
            if present.contains(id) {
                continue;
            }
            let mut status = status.clone();
            if status.connected {
                status.connected = false;
                status.last_seen = Some(prost_types::Timestamp::from(*at));
            }
            nodes.push(status);
        }
    }

    /// The worker pool as `WatchPool` sends it now: every worker with
    /// whether it is in the balancers' rotation and why not.
    ///
    /// # Errors
    /// The store cannot be read ([`StoreError`]).
    pub async fn pool(&self) -> Result<Pool, StoreError> {
        let (current_version, nodes) = self.registry().await?;
        let members = nodes
            .into_iter()
            .filter(is_worker)
            .map(|n| PoolMember {
                node_id: n.node_id,
                smtp_address: n.smtp_address,
                in_rotation: n.in_rotation,
                out_reason: n.out_reason,
            })
            .collect();
        Ok(Pool {
            members,
            complete: self.shared.started.elapsed() >= incomplete_for(self.shared.grace),
            current_version,
        })
    }

    /// Something the pool depends on changed here: recompute it now.
    pub(super) fn poke_registry(&self) {
        self.shared.poke.notify_one();
    }
}

/// Recomputes the pool while a balancer watches it, until the control
/// plane is dropped.
pub(super) async fn follow<S: Store>(shared: Weak<Shared<S>>) {
    let Some((poke, mut current)) = shared
        .upgrade()
        .map(|s| (Arc::clone(&s.poke), s.store.current()))
    else {
        return;
    };
    let mut failing = false;
    // Runs while the control plane lives, one round per change or refresh.
    loop {
        {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let plane = ControlPlane { shared };
            if plane.shared.pool.receiver_count() > 0 {
                match plane.pool().await {
                    Ok(pool) => {
                        if failing {
                            tracing::info!("the node registry can be read again");
                            failing = false;
                        }
                        plane.shared.pool.send_if_modified(|old| {
                            let changed = **old != pool;
                            if changed {
                                *old = Arc::new(pool);
                            }
                            changed
                        });
                    }
                    Err(e) => {
                        // The balancers keep the pool they have.
                        if !failing {
                            tracing::warn!(error = %e, "cannot read the node registry; the balancers keep their pool");
                            failing = true;
                        }
                    }
                }
            }
        }
        tokio::select! {
            () = poke.notified() => {}
            () = tokio::time::sleep(POOL_REFRESH) => {}
            changed = current.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn worker(connected: bool, applied: u64, nacked: u64, last_seen: SystemTime) -> NodeStatus {
        NodeStatus {
            node_id: "w".into(),
            role: NodeRole::Worker as i32,
            connected,
            applied_version: applied,
            nacked_version: nacked,
            last_seen: Some(last_seen.into()),
            ..NodeStatus::default()
        }
    }

    /// After a start the pool stays incomplete past the grace period,
    /// for as long as a node in its longest backoff takes to call again.
    #[tokio::test(start_paused = true)]
    async fn a_started_pool_is_incomplete_until_every_node_had_its_longest_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::file_store::FileStore::open(dir.path()).unwrap());
        let plane = ControlPlane::with_grace(store, "test", Duration::from_secs(30));
        assert_eq!(
            incomplete_for(Duration::from_secs(30)),
            Duration::from_secs(144)
        );
        assert!(!plane.pool().await.unwrap().complete);
        // Past the grace period, a node may still be in a 120 s backoff.
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(!plane.pool().await.unwrap().complete);
        tokio::time::advance(Duration::from_secs(112)).await;
        assert!(!plane.pool().await.unwrap().complete);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(plane.pool().await.unwrap().complete);
        // A grace period longer than any backoff wins.
        let long = Duration::from_secs(600);
        assert_eq!(incomplete_for(long), long);
    }

    #[test]
    fn states_follow_the_grace_period() {
        let now = SystemTime::now();
        let grace = Duration::from_secs(30);
        let ago = |s| now - Duration::from_secs(s);
        let state = |n: &NodeStatus, since: Option<SystemTime>, drained| {
            rotation(n, 5, since, drained, now, grace).map(Out::as_str)
        };
        assert_eq!(state(&worker(true, 5, 0, ago(100)), None, false), None);
        assert_eq!(
            state(&worker(true, 5, 0, ago(0)), None, true),
            Some("drained")
        );
        // Disconnected: in for the grace period, then out.
        assert_eq!(state(&worker(false, 5, 0, ago(10)), None, false), None);
        assert_eq!(
            state(&worker(false, 5, 0, ago(31)), None, false),
            Some("disconnected")
        );
        // Behind: since version 5 was applied.
        assert_eq!(
            state(&worker(true, 4, 5, ago(0)), Some(ago(10)), false),
            None
        );
        assert_eq!(
            state(&worker(true, 4, 5, ago(0)), Some(ago(40)), false),
            Some("nacked")
        );
        assert_eq!(
            state(&worker(true, 4, 0, ago(0)), Some(ago(40)), false),
            Some("lagging")
        );
        // Behind since a version no longer in the history: long ago.
        assert_eq!(
            state(&worker(true, 1, 0, ago(0)), None, false),
            Some("lagging")
        );
    }
}
