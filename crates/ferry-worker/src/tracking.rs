//! The message tracking log: one JSON line per event in the life of a
//! message (`received`, `delivered`, `deferred`, `failed`, `expired`,
//! `bounced`, `delay_notified`, `deleted`), one file a day under
//! `DATA/logs/tracking/TRACKyyyymmdd.jsonl`. It answers "which device sent
//! this message, and where did it go?".

use std::path::Path;

use ferry_queue::{QueueId, StoredEnvelope};
use ferry_smtp::{Mailbox, ReversePath};
use serde::Serialize;

use crate::daily::{DailyFile, Overflow};

/// Lines that may wait for the writer thread (a few seconds of a busy
/// node's events).
const QUEUED_LINES: usize = 16 * 1024;

/// One event; fields that do not apply are left out.
#[derive(Debug, Serialize)]
pub struct TrackingEvent<'a> {
    pub event: &'static str,
    pub queue_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<&'a str>,
    pub client_ip: &'a str,
    pub connector: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
    pub sender: &'a ReversePath,
    pub recipients: Vec<&'a Mailbox>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_hop: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The queue id of a DSN this event produced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dsn_queue_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<&'a str>,
}

impl<'a> TrackingEvent<'a> {
    /// An event about a message, with the envelope's fields filled in.
    pub fn new(event: &'static str, id: &'a QueueId, env: &'a StoredEnvelope) -> Self {
        Self {
            event,
            queue_id: id.as_str(),
            message_id: env.message_id.as_deref(),
            client_ip: &env.client_ip,
            connector: &env.connector,
            user: env.user.as_deref(),
            sender: &env.mail_from,
            recipients: env.rcpt_to.iter().collect(),
            size: None,
            next_hop: None,
            reply: None,
            attempt: None,
            dsn_queue_id: None,
            session_id: None,
        }
    }
}

/// The node's tracking log. Lines are written by a thread of its own; a
/// record is never dropped: when the writer is `QUEUED_LINES` behind (a
/// disk slower than the mail), the task recording waits for room, which
/// slows the sessions and deliveries that log, rather than leave a
/// message without its record.
pub struct TrackingLog {
    file: DailyFile,
}

impl TrackingLog {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            file: DailyFile::new(
                data_dir.join("logs").join("tracking"),
                "TRACK",
                "jsonl",
                String::new,
                Overflow::Wait,
                QUEUED_LINES,
            ),
        }
    }

    pub fn record(&self, event: &TrackingEvent<'_>) {
        let mut line = serde_json::json!({ "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true) });
        if let (Some(obj), Ok(serde_json::Value::Object(fields))) =
            (line.as_object_mut(), serde_json::to_value(event))
        {
            obj.extend(fields);
        }
        let mut text = line.to_string();
        text.push('\n');
        self.file.append(text);
    }

    /// Resolves once every record made before is written.
    pub async fn flush(&self) {
        self.file.flush().await;
    }
}
