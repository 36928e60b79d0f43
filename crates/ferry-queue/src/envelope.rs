//! The envelope stored with each message.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A queue id: 20 hex digits, time-ordered, unique per node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QueueId(String);

impl QueueId {
    pub fn new() -> Self {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        QueueId(format!("{millis:012X}{:08X}", rand::random::<u32>()))
    }

    /// Accepts only what `new` makes, so an id can name a file safely.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 20 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| QueueId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for QueueId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who sent what to whom, and how it reached us.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEnvelope {
    /// Empty for the null sender.
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// The original client IP (from the PROXY header where there was one).
    pub client_ip: String,
    pub helo: String,
    pub connector: String,
    /// The authenticated user, if any.
    pub user: Option<String>,
    /// Unix seconds.
    pub received_at: i64,
    pub body_8bit: bool,
    pub smtputf8: bool,
    /// The session that received it, for the protocol log.
    pub session_id: String,
}
