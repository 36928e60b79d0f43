//! The worker's part of the admin endpoint: `GET /status` and queue
//! administration (`GET /queue`, `GET /queue/ID`, `POST /queue/ID/retry`,
//! `POST /queue/ID/bounce`, `DELETE /queue/ID`). Answers are JSON.
//!
//! A retry goes through the schedule (coalesced with an attempt under
//! way). A bounce or delete takes the message over from the schedule
//! first: an attempt under way is asked to stop at its next safe point and
//! finishes its state update before the operation reads the message; the
//! operation runs to its end even if the caller hangs up.
//!
//! Envelopes and delivery states are read from the spool for each answer
//! (the queue's index holds neither): a message's answer reads that
//! message, a listing reads one message at a time, off the runtime's
//! threads, and holds only the JSON it writes.

use std::sync::Arc;

use ferry_queue::{Journal, QueueId, RecipientState, SpooledMessage};
use ferry_telemetry::admin::{AdminAnswer, AdminApi};
use serde_json::{json, Value};
use tracing::warn;

use super::schedule::{Kick, Outcome};
use super::Deliverer;
use crate::tracking::TrackingEvent;

fn describe(m: &SpooledMessage) -> Value {
    json!({
        "id": m.id.as_str(),
        "message_id": m.envelope.message_id,
        "sender": m.envelope.mail_from,
        "client_ip": m.envelope.client_ip,
        "connector": m.envelope.connector,
        "user": m.envelope.user,
        "received_at": m.envelope.received_at,
        "size": m.size(),
        "attempts": m.state.attempts,
        "next_attempt": m.state.next_attempt,
        "delay_notified": m.state.delay_notified,
        "recipients": m.state.recipients,
    })
}

/// Every queued message as `describe` says it, oldest first: `{"messages":
/// [...]}`. One that cannot be read is listed with its id and the error.
fn list(journal: &Journal) -> String {
    let mut out = String::from("{\"messages\":[");
    let mut first = true;
    for id in journal.ids() {
        let item = match journal.message(&id) {
            Ok(Some(m)) => describe(&m),
            // Delivered or removed since the ids were taken.
            Ok(None) => continue,
            Err(e) => json!({ "id": id.as_str(), "error": e.to_string() }),
        };
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(&item.to_string());
    }
    out.push_str("]}");
    out
}

fn error(status: u16, text: &str) -> Option<(u16, String)> {
    Some(answer_error(status, text))
}

fn answer_error(status: u16, text: &str) -> (u16, String) {
    (status, json!({ "error": text }).to_string())
}

fn not_queued(id: &QueueId) -> String {
    format!("no message {id} in the queue")
}

fn done(id: &QueueId, action: &str) -> (u16, String) {
    (
        200,
        json!({ "id": id.as_str(), "action": action }).to_string(),
    )
}

impl Deliverer {
    /// Fails every pending recipient of `id` and bounces them to the
    /// sender, once the message is ours (an attempt under way stops first).
    async fn bounce_now(self: Arc<Self>, id: QueueId) -> (u16, String) {
        let lease = self.schedule.hold(&id, true).await;
        // Read after the hold: the attempt's state update is in.
        let m = match self.journal.message(&id) {
            Ok(Some(m)) => m,
            Ok(None) => {
                lease.release(Outcome::Done);
                return answer_error(404, &not_queued(&id));
            }
            Err(e) => {
                lease.release(Outcome::Unchanged);
                return answer_error(500, &e.to_string());
            }
        };
        let message = match self.read_body(&m).await {
            Ok(b) => b,
            Err(e) => {
                lease.release(Outcome::Unchanged);
                return answer_error(500, &e.to_string());
            }
        };
        let mut state = m.state.clone();
        for r in state.recipients.iter_mut().filter(|r| r.state.is_pending()) {
            r.state = RecipientState::Failed {
                reply: "5.0.0 Bounced by an administrator".into(),
                next_hop: None,
            };
        }
        let config = Arc::clone(&self.core.current().config);
        let next = self.conclude(&config, &m, state, &message).await;
        lease.release(next.map_or(Outcome::Done, Outcome::RetryAt));
        done(&id, "bounce")
    }

    /// Removes `id` without a bounce, once the message is ours (an attempt
    /// under way stops first), and says so in the tracking log.
    async fn delete_now(self: Arc<Self>, id: QueueId) -> (u16, String) {
        let lease = self.schedule.hold(&id, true).await;
        // A message whose envelope cannot be read can still be deleted
        // (that may be why): without its tracking event.
        let m = match self.journal.message(&id) {
            Ok(Some(m)) => Some(m),
            Ok(None) => {
                lease.release(Outcome::Done);
                return answer_error(404, &not_queued(&id));
            }
            Err(e) => {
                warn!(queue_id = %id, error = %e, "deleting a message whose envelope cannot be read");
                None
            }
        };
        if let Err(e) = self.journal.retire(&id).await {
            lease.release(Outcome::Unchanged);
            return answer_error(500, &e.to_string());
        }
        lease.release(Outcome::Done);
        warn!(queue_id = %id, "message deleted by an administrator, without a bounce");
        if let Some(m) = m {
            let mut e = TrackingEvent::new("deleted", &m.id, &m.envelope);
            e.recipients = m.state.pending().map(|r| &r.address).collect();
            e.attempt = Some(m.state.attempts);
            self.core.tracking.record(&e);
        }
        done(&id, "delete")
    }
}

/// Readiness as `/readyz` answers it (the worker's: listening, not
/// shutting down, room in the spool).
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

/// The queue, as the admin endpoint shows and changes it.
pub struct QueueAdmin {
    deliverer: Arc<Deliverer>,
    ready: Readiness,
}

impl QueueAdmin {
    /// The admin API of `deliverer`'s queue; `/status` says `ready` as
    /// `ready` answers.
    pub fn new(deliverer: Arc<Deliverer>, ready: Readiness) -> Self {
        Self { deliverer, ready }
    }

    /// The node at a glance.
    fn status(&self) -> String {
        let d = &self.deliverer;
        let counts = d.journal.counts();
        json!({
            "role": "worker",
            "version": env!("CARGO_PKG_VERSION"),
            "hostname": d.core.hostname(),
            "ready": (self.ready)(),
            "low_on_space": d.core.is_low_on_space(),
            "queue": { "messages": counts.messages, "deferred": counts.deferred },
        })
        .to_string()
    }

    async fn answer(&self, method: &str, path: &str) -> Option<(u16, String)> {
        if (method, path) == ("GET", "/status") {
            return Some((200, self.status()));
        }
        let rest = path.strip_prefix("/queue")?;
        let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
        let d = &self.deliverer;
        if parts.is_empty() {
            if method != "GET" {
                return error(405, "GET /queue");
            }
            let journal = d.journal.clone();
            return Some(
                match tokio::task::spawn_blocking(move || list(&journal)).await {
                    Ok(listing) => (200, listing),
                    Err(e) => answer_error(500, &e.to_string()),
                },
            );
        }
        let Some(id) = parts.first().and_then(|p| QueueId::parse(p)) else {
            return error(400, "a queue id is 20 hex digits");
        };
        if !d.journal.contains(&id) {
            return error(404, &not_queued(&id));
        }
        match (method, parts.get(1).copied()) {
            ("GET", None) => match d.journal.message(&id) {
                Ok(Some(m)) => Some((200, describe(&m).to_string())),
                Ok(None) => error(404, &not_queued(&id)),
                Err(e) => error(500, &format!("cannot read {id} from the spool: {e}")),
            },
            ("POST", Some("retry")) => {
                let when = match d.kick(&id) {
                    Kick::AfterCurrent => "after the current attempt",
                    // Unknown: stored an instant ago, about to be tried.
                    Kick::Now | Kick::Unknown => "now",
                };
                Some((
                    200,
                    json!({ "id": id.as_str(), "action": "retry", "attempt": when }).to_string(),
                ))
            }
            ("POST", Some("bounce")) => {
                let d = Arc::clone(d);
                let done = tokio::spawn(async move { d.bounce_now(id).await }).await;
                Some(done.unwrap_or_else(|e| (500, json!({ "error": e.to_string() }).to_string())))
            }
            ("DELETE", None) => {
                let d = Arc::clone(d);
                let done = tokio::spawn(async move { d.delete_now(id).await }).await;
                Some(done.unwrap_or_else(|e| (500, json!({ "error": e.to_string() }).to_string())))
            }
            _ => error(
                405,
                "GET /queue/ID, POST /queue/ID/retry, POST /queue/ID/bounce, DELETE /queue/ID",
            ),
        }
    }
}

impl AdminApi for QueueAdmin {
    fn handle<'a>(&'a self, method: &'a str, path: &'a str) -> AdminAnswer<'a> {
        Box::pin(self.answer(method, path))
    }

    fn allowed(&self, path: &str) -> &'static str {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        match parts.as_slice() {
            ["queue"] => "GET",
            ["queue", _] => "GET, DELETE",
            ["queue", _, "retry" | "bounce"] => "POST",
            _ => "GET, POST, DELETE",
        }
    }
}
