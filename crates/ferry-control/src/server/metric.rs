//! The control plane's metrics. Label values are a small fixed set; node
//! IDs are not labels (`ferry ctl nodes` names the nodes).

use std::sync::Arc;

use tokio::sync::watch;

use super::version_of;
use crate::proto::{ConfigSnapshot, NodeStatus};

pub const CONFIG_VERSION: &str = "ferry_config_version";
pub const REPORTS: &str = "ferry_control_reports_total";
pub const NODES: &str = "ferry_control_nodes";
pub const SNAPSHOTS_SENT: &str = "ferry_control_snapshots_sent_total";

/// Describes the metrics, exports every series at zero (so an alert on
/// `increase(...)` sees the first one), and keeps `ferry_config_version`
/// at the store's current version.
pub(crate) fn follow_version(mut current: watch::Receiver<Option<Arc<ConfigSnapshot>>>) {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(CONFIG_VERSION, "The control plane's current config version");
    describe_counter!(
        REPORTS,
        "Node reports, by result (ack, nack, superseded: about a version no longer the last sent)"
    );
    describe_gauge!(
        NODES,
        "Nodes this replica serves, by state (connected; nacked: last report a NACK; lagging: not on the current version)"
    );
    describe_counter!(
        SNAPSHOTS_SENT,
        "Snapshots sent on Watch streams, by sync (first: at subscription, update: a new version)"
    );
    for result in ["ack", "nack", "superseded"] {
        metrics::counter!(REPORTS, "result" => result).increment(0);
    }
    for state in ["connected", "nacked", "lagging"] {
        metrics::gauge!(NODES, "state" => state).set(0.0);
    }
    for sync in ["first", "update"] {
        metrics::counter!(SNAPSHOTS_SENT, "sync" => sync).increment(0);
    }
    let version = |c: &Option<Arc<ConfigSnapshot>>| c.as_deref().map_or(0, version_of);
    metrics::gauge!(CONFIG_VERSION).set(version(&current.borrow()) as f64);
    // Outside a runtime (a unit test building the services) there is
    // nothing to follow.
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            while current.changed().await.is_ok() {
                metrics::gauge!(CONFIG_VERSION).set(version(&current.borrow_and_update()) as f64);
            }
        });
    }
}

pub(crate) fn report(result: &'static str) {
    metrics::counter!(REPORTS, "result" => result).increment(1);
}

pub(crate) fn sent(first: bool) {
    let sync = if first { "first" } else { "update" };
    metrics::counter!(SNAPSHOTS_SENT, "sync" => sync).increment(1);
}

/// Recounts the node gauges from this replica's node table.
pub(crate) fn nodes<'a>(nodes: impl Iterator<Item = &'a NodeStatus>, current: u64) {
    let (mut connected, mut nacked, mut lagging) = (0u32, 0u32, 0u32);
    for node in nodes.filter(|n| n.connected) {
        connected += 1;
        nacked += u32::from(node.nacked_version != 0);
        lagging += u32::from(node.applied_version < current);
    }
    metrics::gauge!(NODES, "state" => "connected").set(f64::from(connected));
    metrics::gauge!(NODES, "state" => "nacked").set(f64::from(nacked));
    metrics::gauge!(NODES, "state" => "lagging").set(f64::from(lagging));
}
