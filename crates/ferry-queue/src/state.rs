//! Per-recipient delivery state, kept in the spool next to each message.

use ferry_smtp::Mailbox;
use serde::{Deserialize, Serialize};

/// Where one recipient stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RecipientState {
    Queued,
    Delivered {
        next_hop: String,
        reply: String,
    },
    /// A temporary failure; tried again later.
    Deferred {
        reply: String,
    },
    /// A permanent failure (or expiry); the sender gets a bounce.
    Failed {
        reply: String,
        next_hop: Option<String>,
    },
}

impl RecipientState {
    /// Still to be delivered.
    pub fn is_pending(&self) -> bool {
        matches!(
            self,
            RecipientState::Queued | RecipientState::Deferred { .. }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientStatus {
    pub address: Mailbox,
    #[serde(flatten)]
    pub state: RecipientState,
}

/// A message's delivery progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryState {
    pub recipients: Vec<RecipientStatus>,
    pub attempts: u32,
    /// Unix seconds of the next attempt.
    pub next_attempt: i64,
    /// A delay notice went to the sender.
    pub delay_notified: bool,
}

impl DeliveryState {
    /// The state of a message nobody has tried yet: one entry per mailbox
    /// (a recipient given twice is delivered once).
    pub fn new(recipients: &[Mailbox]) -> Self {
        // Envelopes are stored with each mailbox once; this also holds for
        // spools written before that.
        Self {
            recipients: ferry_smtp::address::unique_mailboxes(recipients.iter().cloned())
                .into_iter()
                .map(|address| RecipientStatus {
                    address,
                    state: RecipientState::Queued,
                })
                .collect(),
            attempts: 0,
            next_attempt: 0,
            delay_notified: false,
        }
    }

    pub fn pending(&self) -> impl Iterator<Item = &RecipientStatus> {
        self.recipients.iter().filter(|r| r.state.is_pending())
    }

    pub fn is_finished(&self) -> bool {
        self.pending().next().is_none()
    }
}
