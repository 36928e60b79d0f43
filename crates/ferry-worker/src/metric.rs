//! Metric names; labels come from small fixed sets (connector names from
//! the config, fixed reasons), never an address.

pub const SESSIONS: &str = "ferry_smtp_sessions_total";
pub const SESSIONS_ACTIVE: &str = "ferry_smtp_sessions_active";
pub const CONNECTIONS_REFUSED: &str = "ferry_smtp_connections_refused_total";
pub const MESSAGES_ACCEPTED: &str = "ferry_smtp_messages_accepted_total";
pub const MESSAGES_REJECTED: &str = "ferry_smtp_messages_rejected_total";
pub const RECIPIENTS_REJECTED: &str = "ferry_smtp_recipients_rejected_total";
pub const SENDERS_REJECTED: &str = "ferry_smtp_senders_rejected_total";
pub const TLS_HANDSHAKES: &str = "ferry_smtp_tls_handshakes_total";
pub const AUTH_FAILURES: &str = "ferry_smtp_auth_failures_total";
pub const AUTH_SUCCESSES: &str = "ferry_smtp_auth_successes_total";
pub const AUTH_VERIFICATIONS: &str = "ferry_auth_verifications_total";
pub const AUTH_CACHE: &str = "ferry_auth_cache_total";
pub const AUTH_WAITING: &str = "ferry_auth_verifications_waiting";
pub const AUTH_REFUSED: &str = "ferry_auth_refused_total";
pub const AUTH_CLIENTS_COOLING_OFF: &str = "ferry_auth_clients_cooling_off";
pub const AUTH_CLIENTS_CUT_OFF: &str = "ferry_auth_clients_cut_off_total";
pub const RECEIVED_BYTES: &str = "ferry_smtp_received_message_bytes_total";
pub const SPOOL_FREE_BYTES: &str = "ferry_spool_free_bytes";
pub const QUEUE_MESSAGES: &str = "ferry_queue_messages";
pub const QUEUE_OLDEST_AGE: &str = "ferry_queue_oldest_message_age_seconds";
pub const DELIVERY_ATTEMPTS: &str = "ferry_delivery_attempts_total";
pub const DELIVERY_DURATION: &str = "ferry_delivery_duration_seconds";
pub const LOG_LINES_DROPPED: &str = "ferry_log_lines_dropped_total";
pub const CONFIG_BEHIND: &str = "ferry_config_behind";

/// Puts every series of the AUTH metrics on `/metrics` at 0 (call once
/// the recorder is installed): Prometheus' `increase()` sees the first
/// event of a series only when the series existed before it, and the
/// FerryAuthPasswordGuessing and FerryAuthVerificationsBusy alerts are
/// built on it.
pub fn register_auth() {
    use metrics::{counter, gauge};
    for result in ["success", "failure"] {
        counter!(AUTH_VERIFICATIONS, "result" => result).increment(0);
    }
    for result in ["hit", "negative_hit", "miss"] {
        counter!(AUTH_CACHE, "result" => result).increment(0);
    }
    for reason in ["invalid", "busy", "cooling_off"] {
        counter!(AUTH_REFUSED, "reason" => reason).increment(0);
    }
    counter!(AUTH_CLIENTS_CUT_OFF).increment(0);
    gauge!(AUTH_WAITING).set(0.0);
    gauge!(AUTH_CLIENTS_COOLING_OFF).set(0.0);
}

/// Puts the other series the shipped alerts read through `increase()` on
/// `/metrics` at 0 (call once the recorder is installed), for the reason
/// [`register_auth`] gives: FerryBadProxyHeaders and FerryDeliveryFailing
/// would otherwise miss the first event. The per-connector ones come
/// with each config ([`register_connectors`]).
pub fn register_alerted() {
    use metrics::counter;
    for reason in [
        "no_connector",
        "per_source_limit",
        "connection_limit",
        "proxy_header",
        "config_behind",
    ] {
        counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(0);
    }
    for result in ["delivered", "deferred", "failed", "no_route"] {
        counter!(DELIVERY_ATTEMPTS, "result" => result).increment(0);
    }
}

/// Puts each connector's `low_space` refusals (FerrySpoolLowSpace) on
/// `/metrics` at 0, before its first refusal: call with every config put
/// in service. A removed connector's series stays, as the exporter keeps
/// every series.
pub fn register_connectors(config: &ferry_config::ClusterConfig) {
    for c in &config.connectors {
        metrics::counter!(SENDERS_REJECTED, "connector" => c.name.clone(), "reason" => "low_space")
            .increment(0);
    }
}

/// Registers each metric's help text and unit with the recorder (call once
/// it is installed).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(SESSIONS, "SMTP sessions started, by connector");
    describe_gauge!(SESSIONS_ACTIVE, "SMTP sessions open now, by connector");
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed before a session, by reason"
    );
    describe_counter!(
        MESSAGES_ACCEPTED,
        "Messages acknowledged with 250 after DATA (durable in the spool)"
    );
    describe_counter!(
        MESSAGES_REJECTED,
        "Messages refused at the end of DATA, by reason"
    );
    describe_counter!(RECIPIENTS_REJECTED, "RCPT commands refused, by reason");
    describe_counter!(SENDERS_REJECTED, "MAIL commands refused, by reason");
    describe_counter!(TLS_HANDSHAKES, "STARTTLS handshakes, by result");
    describe_counter!(AUTH_FAILURES, "Failed AUTH attempts, by connector");
    describe_counter!(AUTH_SUCCESSES, "Successful AUTH, by connector");
    describe_counter!(
        AUTH_VERIFICATIONS,
        "Password verifications run (argon2), by result (success, failure)"
    );
    describe_counter!(
        AUTH_CACHE,
        "AUTH attempts looked up in the verified-credential cache, by result (hit, negative_hit, miss; nothing while both TTLs are 0)"
    );
    describe_gauge!(
        AUTH_WAITING,
        "AUTH attempts waiting now for a free password verification"
    );
    describe_counter!(
        AUTH_REFUSED,
        "AUTH attempts refused, by reason (invalid: 535, busy: 454 past the verification wait, cooling_off: 421)"
    );
    describe_gauge!(
        AUTH_CLIENTS_COOLING_OFF,
        "Client addresses whose AUTH is refused now after too many failures"
    );
    describe_counter!(
        AUTH_CLIENTS_CUT_OFF,
        "Client addresses put into cooling-off after too many failed AUTH"
    );
    describe_counter!(
        RECEIVED_BYTES,
        Unit::Bytes,
        "Octets of accepted messages, by connector"
    );
    describe_gauge!(
        SPOOL_FREE_BYTES,
        Unit::Bytes,
        "Free space in the data directory"
    );
    describe_gauge!(QUEUE_MESSAGES, "Messages in the queue, by state");
    describe_gauge!(
        QUEUE_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest message in the queue"
    );
    describe_counter!(
        DELIVERY_ATTEMPTS,
        "Delivery attempts per recipient, by result"
    );
    describe_counter!(
        LOG_LINES_DROPPED,
        "Protocol log lines dropped because the log writer was behind, by log"
    );
    describe_gauge!(
        CONFIG_BEHIND,
        "1 while this worker could not apply the control plane's current config for longer than the grace period (balancer probes refused)"
    );
    describe_histogram!(
        DELIVERY_DURATION,
        Unit::Seconds,
        "Duration of one delivery attempt of a message"
    );
}
