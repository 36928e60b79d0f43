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
pub const RECEIVED_BYTES: &str = "ferry_smtp_received_message_bytes_total";
pub const SPOOL_FREE_BYTES: &str = "ferry_spool_free_bytes";
pub const QUEUE_MESSAGES: &str = "ferry_queue_messages";
pub const QUEUE_OLDEST_AGE: &str = "ferry_queue_oldest_message_age_seconds";
pub const DELIVERY_ATTEMPTS: &str = "ferry_delivery_attempts_total";
pub const DELIVERY_DURATION: &str = "ferry_delivery_duration_seconds";
