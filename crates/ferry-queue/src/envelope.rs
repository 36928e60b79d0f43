//! The envelope stored with each message.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_smtp::{Mailbox, ReversePath};
use serde::{Deserialize, Serialize};

/// A queue id: 20 hex digits, unique per node, and in the order the ids
/// were made (microseconds since 1970, bumped past the last one made, then
/// four random digits).
///
/// Held as its 20 ASCII digits, inline: the queue's index and the delivery
/// schedule keep one or two per queued message, and a `String` would cost
/// a heap allocation and 24 more bytes each time. Serialized as the string.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueId([u8; ID_DIGITS]);

const ID_DIGITS: usize = 20;

impl QueueId {
    pub fn new() -> Self {
        static LAST: AtomicU64 = AtomicU64::new(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let mut last = LAST.load(Ordering::Relaxed);
        let stamp = loop {
            let next = now.max(last + 1);
            match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break next,
                Err(seen) => last = seen,
            }
        };
        let digits = format!("{stamp:016X}{:04X}", rand::random::<u16>());
        // Always 20 digits: the stamp's 16 cover every u64.
        Self::parse(&digits).unwrap_or(QueueId([b'0'; ID_DIGITS]))
    }

    /// Accepts only what `new` makes, so an id can name a file safely; in
    /// any case, since people type and copy ids (`new` makes upper case).
    pub fn parse(s: &str) -> Option<Self> {
        let digits: [u8; ID_DIGITS] = s.as_bytes().try_into().ok()?;
        digits
            .iter()
            .all(u8::is_ascii_hexdigit)
            .then(|| QueueId(digits.map(|b| b.to_ascii_uppercase())))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits get in (`parse`).
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl Serialize for QueueId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for QueueId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        QueueId::parse(&s).ok_or_else(|| serde::de::Error::custom("a queue id is 20 hex digits"))
    }
}

impl Default for QueueId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Who sent what to whom, and how it reached us.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEnvelope {
    /// As the client wrote it (stored in its wire form).
    pub mail_from: ReversePath,
    /// As the client wrote them; a bare `<Postmaster>` is stored as the
    /// cluster's postmaster address it was delivered to.
    pub rcpt_to: Vec<Mailbox>,
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
    /// The message's Message-ID header field, if it has one.
    #[serde(default)]
    pub message_id: Option<String>,
}
