//! Metric names of the balancer. Labels come from small fixed sets:
//! listener and backend names from the config, result, stage and reason.

/// Connections by `listener` and `result`: `accepted`, `denied` (access
/// list), `over_limit` (the total or the per-source cap), `no_backend`.
pub const CONNECTIONS: &str = "ferry_balancer_connections_total";
/// Relayed connections open now, by `listener`.
pub const ACTIVE: &str = "ferry_balancer_active_connections";
/// 1 while a worker passes its probes, by `listener` and `backend`. A
/// worker a reload removed stays at 1 with draining 1, or NaN for both
/// when its listener went too (the exporter cannot delete a series; see
/// [`crate::pool::Target::retire`]).
pub const BACKEND_UP: &str = "ferry_balancer_backend_up";
/// 1 while a worker is drained (by its probe answer or an admin call); a
/// removed worker's reads as [`BACKEND_UP`] says.
pub const BACKEND_DRAINING: &str = "ferry_balancer_backend_draining";
/// Probe duration in seconds, by `backend`.
pub const PROBE_DURATION: &str = "ferry_balancer_probe_duration_seconds";
/// Failed probes by `backend` and `stage`: `connect`, `greeting`, `ehlo`,
/// `timeout`.
pub const PROBE_FAILURES: &str = "ferry_balancer_probe_failures_total";
/// Handoffs that moved on to another worker, by `listener` and `reason`:
/// `connect`, `greeting`, `timeout`.
pub const HANDOFF_RETRIES: &str = "ferry_balancer_handoff_retries_total";

/// Registers each metric's help text and unit with the recorder (call once
/// it is installed).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(CONNECTIONS, "Client connections, by listener and result");
    describe_gauge!(ACTIVE, "Relayed connections open now, by listener");
    describe_gauge!(
        BACKEND_UP,
        "1 while a worker passes its probes, else 0; a worker a reload removed \
         reads 1 (NaN if its listener went too) until a restart"
    );
    describe_gauge!(
        BACKEND_DRAINING,
        "1 while a worker is drained, else 0; a worker a reload removed \
         reads 1 (NaN if its listener went too) until a restart"
    );
    describe_histogram!(
        PROBE_DURATION,
        Unit::Seconds,
        "Duration of one SMTP probe, by backend"
    );
    describe_counter!(PROBE_FAILURES, "Failed probes, by backend and stage");
    describe_counter!(
        HANDOFF_RETRIES,
        "Handoffs that moved on to another worker, by listener and reason"
    );
}
