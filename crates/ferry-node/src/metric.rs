//! The config metrics every node exports.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::reload::ReloadReport;
use crate::snapshot::Snapshot;

pub const CONFIG_VERSION: &str = "ferry_config_version";
pub const CONFIG_RELOADS: &str = "ferry_config_reloads_total";
pub const CONFIG_LAST_SUCCESS: &str = "ferry_config_last_reload_success_timestamp_seconds";
/// 1 when the last reload worked (or none was tried), 0 after a failed
/// one, as Prometheus's own `prometheus_config_last_reload_successful`.
pub const CONFIG_LAST_RELOAD_OK: &str = "ferry_config_last_reload_successful";
pub const BUILD_INFO: &str = "ferry_build_info";

fn seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Describes the metrics and sets them for the snapshot a node started
/// with (its load counts as the last successful one). Both reload results
/// are exported from the start, so an alert on `increase(...)` sees the
/// first failure.
pub fn started<M>(snapshot: &Snapshot<M>) {
    use metrics::{describe_counter, describe_gauge, Unit};
    describe_gauge!(CONFIG_VERSION, "Version of the config snapshot in service");
    describe_counter!(CONFIG_RELOADS, "Config reloads, by result (ok, failed)");
    describe_gauge!(
        CONFIG_LAST_SUCCESS,
        Unit::Seconds,
        "When the config in service was loaded (Unix time)"
    );
    describe_gauge!(
        CONFIG_LAST_RELOAD_OK,
        "1 if the last config reload worked (or none was tried), 0 if it failed"
    );
    describe_gauge!(BUILD_INFO, "Always 1; the label says the Ferry version");
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    metrics::counter!(CONFIG_RELOADS, "result" => "ok").increment(0);
    metrics::counter!(CONFIG_RELOADS, "result" => "failed").increment(0);
    metrics::gauge!(CONFIG_VERSION).set(snapshot.version as f64);
    metrics::gauge!(CONFIG_LAST_RELOAD_OK).set(1.0);
    metrics::gauge!(CONFIG_LAST_SUCCESS).set(seconds(snapshot.loaded_at));
}

/// Counts a reload (or a control-plane snapshot applied or refused) and
/// moves the version and last-success gauges when it worked.
pub fn reloaded(report: &ReloadReport) {
    let result = if report.ok { "ok" } else { "failed" };
    metrics::counter!(CONFIG_RELOADS, "result" => result).increment(1);
    metrics::gauge!(CONFIG_LAST_RELOAD_OK).set(if report.ok { 1.0 } else { 0.0 });
    if report.ok {
        metrics::gauge!(CONFIG_VERSION).set(report.version as f64);
        metrics::gauge!(CONFIG_LAST_SUCCESS).set(seconds(report.at));
    }
}
