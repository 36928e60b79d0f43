//! A live message's envelope and delivery state, read back from its
//! records when an attempt starts or an administrator asks (the index
//! keeps only where they are).
//!
//! The envelope is read from the front of the message's record, up to
//! where the body starts: one small read, whatever the message's size.
//! Its CRC covers the body too, so it is not checked here; the record was
//! checked whole when it was written or read back at start, and records
//! are never overwritten. The state record is read whole and its CRC
//! checked. What does not decode is `InvalidData`.

use std::io;

use super::index::{Entry, StateAt};
use super::record::{self, Record, HEADER, MAX_RECORD};
use super::storage::Storage;
use super::{segment_name, SpooledMessage};
use crate::envelope::{QueueId, StoredEnvelope};
use crate::state::DeliveryState;

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// The message `id` whose index entry is `entry`, its envelope and latest
/// state read from the spool.
///
/// # Errors
/// A segment cannot be read (`NotFound` when a compaction moved the
/// message and deleted the segment since `entry` was taken: look again),
/// or what is there does not decode.
pub(super) fn load(
    storage: &dyn Storage,
    id: &QueueId,
    entry: &Entry,
) -> io::Result<SpooledMessage> {
    let at = entry.location;
    let prefix_len = at
        .offset
        .checked_sub(at.record)
        .filter(|n| *n >= HEADER as u64 && *n <= u64::from(MAX_RECORD))
        .ok_or_else(|| bad("message record without room for its envelope"))?;
    let mut prefix = vec![0u8; usize::try_from(prefix_len).map_err(io::Error::other)?];
    storage
        .open(&segment_name(at.segment))?
        .read_exact_at(&mut prefix, at.record)?;
    let parts = prefix
        .get(HEADER..)
        .and_then(record::message_parts)
        .ok_or_else(|| bad("not a message record"))?;
    if parts.id != *id {
        return Err(bad("the record of another message"));
    }
    let envelope: StoredEnvelope =
        serde_json::from_slice(parts.envelope).map_err(|e| bad(&format!("envelope: {e}")))?;
    let state = match (entry.state, parts.state) {
        (Some(state_at), _) => read_state(storage, id, &state_at)?,
        (None, Some(json)) => {
            serde_json::from_slice(json).map_err(|e| bad(&format!("delivery state: {e}")))?
        }
        (None, None) => DeliveryState::new(&envelope.rcpt_to),
    };
    Ok(SpooledMessage {
        id: id.clone(),
        envelope,
        state,
        location: at,
    })
}

/// The delivery state in the `state` record at `at`, which must be `id`'s.
pub(super) fn read_state(
    storage: &dyn Storage,
    id: &QueueId,
    at: &StateAt,
) -> io::Result<DeliveryState> {
    let len = usize::try_from(at.len.get()).map_err(io::Error::other)?;
    let mut raw = vec![0u8; len];
    storage
        .open(&segment_name(at.segment))?
        .read_exact_at(&mut raw, at.record)?;
    let (head, payload) = raw
        .split_at_checked(HEADER)
        .ok_or_else(|| bad("state record too short"))?;
    match record::header(head) {
        Some((l, crc)) if l as usize == payload.len() && crc32fast::hash(payload) == crc => {}
        _ => return Err(bad("state record damaged")),
    }
    match record::decode(payload, at.record + HEADER as u64) {
        Some(Record::State(of, state)) if of == *id => Ok(state),
        _ => Err(bad("not a state record of this message")),
    }
}
