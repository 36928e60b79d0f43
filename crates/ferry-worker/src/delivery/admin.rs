//! The worker's part of the admin endpoint: `GET /status` and queue
//! administration (`GET /queue`, `GET /queue/ID`, `POST /queue/ID/retry`,
//! `POST /queue/ID/bounce`, `DELETE /queue/ID`). Answers are JSON.

use std::sync::Arc;

use ferry_queue::{QueueId, RecipientState, SpooledMessage};
use ferry_telemetry::admin::{AdminAnswer, AdminApi};
use serde_json::{json, Value};

use super::Deliverer;

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

fn error(status: u16, text: &str) -> Option<(u16, String)> {
    Some((status, json!({ "error": text }).to_string()))
}

/// The queue, as the admin endpoint shows and changes it.
pub struct QueueAdmin(pub Arc<Deliverer>);

impl QueueAdmin {
    /// The node at a glance.
    fn status(&self) -> String {
        let d = &self.0;
        let messages = d.journal.messages();
        let deferred = messages.iter().filter(|m| m.state.attempts > 0).count();
        json!({
            "role": "worker",
            "version": env!("CARGO_PKG_VERSION"),
            "hostname": d.worker.options.hostname,
            "ready": d.worker.is_ready(),
            "low_on_space": d.worker.is_low_on_space(),
            "queue": { "messages": messages.len(), "deferred": deferred },
        })
        .to_string()
    }

    async fn answer(&self, method: &str, path: &str) -> Option<(u16, String)> {
        if (method, path) == ("GET", "/status") {
            return Some((200, self.status()));
        }
        let rest = path.strip_prefix("/queue")?;
        let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
        let d = &self.0;
        if parts.is_empty() {
            if method != "GET" {
                return error(405, "GET /queue");
            }
            let list: Vec<Value> = d.journal.messages().iter().map(describe).collect();
            return Some((200, json!({ "messages": list }).to_string()));
        }
        let Some(id) = parts.first().and_then(|p| QueueId::parse(p)) else {
            return error(400, "a queue id is 20 hex digits");
        };
        let Some(m) = d.journal.message(&id) else {
            return error(404, &format!("no message {id} in the queue"));
        };
        match (method, parts.get(1).copied()) {
            ("GET", None) => Some((200, describe(&m).to_string())),
            ("POST", Some("retry")) => {
                let mut state = m.state.clone();
                state.next_attempt = 0;
                if let Err(e) = d.journal.record_state(&id, &state).await {
                    return error(500, &e.to_string());
                }
                d.kick(id.clone());
                Some((
                    200,
                    json!({ "id": id.as_str(), "action": "retry" }).to_string(),
                ))
            }
            ("POST", Some("bounce")) => {
                let mut state = m.state.clone();
                for r in state.recipients.iter_mut().filter(|r| r.state.is_pending()) {
                    r.state = RecipientState::Failed {
                        reply: "5.0.0 Bounced by an administrator".into(),
                        next_hop: None,
                    };
                }
                let message = match d.journal.body(&m) {
                    Ok(b) => b,
                    Err(e) => return error(500, &e.to_string()),
                };
                let config = d.worker.runtime().config.clone();
                d.conclude(&config, &m, state, &message).await;
                Some((
                    200,
                    json!({ "id": id.as_str(), "action": "bounce" }).to_string(),
                ))
            }
            ("DELETE", None) => match d.journal.retire(&id).await {
                Ok(()) => {
                    tracing::warn!(queue_id = %id, "message deleted by an administrator, without a bounce");
                    Some((
                        200,
                        json!({ "id": id.as_str(), "action": "delete" }).to_string(),
                    ))
                }
                Err(e) => error(500, &e.to_string()),
            },
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
}
