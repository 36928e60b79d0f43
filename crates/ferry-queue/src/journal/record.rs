//! Record framing and payloads.
//!
//! A record is `len: u32 LE`, `crc32: u32 LE` (of the payload), then the
//! payload: a kind byte and the 20-byte queue id, then
//! - `message`: the envelope (length-prefixed JSON) and the message;
//! - `copy`: the same, plus the delivery state (length-prefixed JSON)
//!   between envelope and message: a live message re-appended by
//!   compaction, whole and self-contained, so the segment it came from
//!   can go;
//! - `state`: the delivery state as JSON;
//! - `done`: nothing more (the message is retired).
//!
//! The envelope's bytes are copied as they were stored, never re-encoded:
//! the journal does not need to understand them to move them.

use std::io;

use crate::envelope::{QueueId, StoredEnvelope};
use crate::state::DeliveryState;

/// The largest record read back: a 36 MB message and then some.
pub(super) const MAX_RECORD: u32 = 256 * 1024 * 1024;
pub(super) const HEADER: usize = 8;
const ID_LEN: usize = 20;
const KIND_MESSAGE: u8 = 1;
const KIND_DONE: u8 = 2;
const KIND_STATE: u8 = 3;
const KIND_COPY: u8 = 4;

/// One record read back from a segment. (Read one at a time: the size
/// of the message variant costs nothing.)
#[allow(clippy::large_enum_variant)]
pub(super) enum Record {
    /// A message, as stored (`state` is `None`) or as re-appended by
    /// compaction (with the delivery state it had then).
    Message {
        id: QueueId,
        envelope: StoredEnvelope,
        state: Option<DeliveryState>,
        /// Offset of the body in the segment, and its length.
        body_offset: u64,
        body_len: u64,
    },
    Done(QueueId),
    State(QueueId, DeliveryState),
}

/// A message record's parts, borrowed from its payload.
pub(super) struct MessageParts<'a> {
    pub id: QueueId,
    pub envelope: &'a [u8],
    pub state: Option<&'a [u8]>,
    pub body: &'a [u8],
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at.checked_add(4)?)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
}

/// Length and CRC from a record header.
pub(super) fn header(bytes: &[u8]) -> Option<(u32, u32)> {
    Some((u32_at(bytes, 0)?, u32_at(bytes, 4)?))
}

fn id_of(rest: &[u8]) -> Option<QueueId> {
    QueueId::parse(std::str::from_utf8(rest.get(..ID_LEN)?).ok()?)
}

/// A length-prefixed field at `at`; returns it and where the next starts.
fn field(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let len = u32_at(b, at)? as usize;
    let start = at + 4;
    let end = start.checked_add(len)?;
    Some((b.get(start..end)?, end))
}

/// Splits a `message` or `copy` payload; `None` for any other kind or a
/// malformed one.
pub(super) fn message_parts(payload: &[u8]) -> Option<MessageParts<'_>> {
    let (&kind, rest) = payload.split_first()?;
    let id = id_of(rest)?;
    let (envelope, next) = field(rest, ID_LEN)?;
    let (state, body_start) = match kind {
        KIND_MESSAGE => (None, next),
        KIND_COPY => {
            let (state, after) = field(rest, next)?;
            (Some(state), after)
        }
        _ => return None,
    };
    Some(MessageParts {
        id,
        envelope,
        state,
        body: rest.get(body_start..)?,
    })
}

/// Decodes a payload that starts at `payload_offset` in its segment.
pub(super) fn decode(payload: &[u8], payload_offset: u64) -> Option<Record> {
    let (&kind, rest) = payload.split_first()?;
    match kind {
        KIND_DONE => Some(Record::Done(id_of(rest)?)),
        KIND_STATE => Some(Record::State(
            id_of(rest)?,
            serde_json::from_slice(rest.get(ID_LEN..)?).ok()?,
        )),
        KIND_MESSAGE | KIND_COPY => {
            let parts = message_parts(payload)?;
            let state = match parts.state {
                Some(s) => Some(serde_json::from_slice(s).ok()?),
                None => None,
            };
            let body_len = parts.body.len() as u64;
            Some(Record::Message {
                id: parts.id,
                envelope: serde_json::from_slice(parts.envelope).ok()?,
                state,
                body_offset: payload_offset + (payload.len() as u64 - body_len),
                body_len,
            })
        }
        _ => None,
    }
}

/// A record buffer with room for the header, then the kind and the id.
fn start(kind: u8, id: &QueueId, capacity: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(HEADER + 1 + ID_LEN + capacity);
    p.extend_from_slice(&[0; HEADER]);
    p.push(kind);
    p.extend_from_slice(id.as_str().as_bytes());
    p
}

fn push_field(p: &mut Vec<u8>, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(io::Error::other)?;
    p.extend_from_slice(&len.to_le_bytes());
    p.extend_from_slice(bytes);
    Ok(())
}

/// A new message's record (header room included).
pub(super) fn encode_message(
    id: &QueueId,
    envelope: &StoredEnvelope,
    body: &[u8],
) -> io::Result<Vec<u8>> {
    let env = serde_json::to_vec(envelope).map_err(io::Error::other)?;
    encode_message_json(id, &env, body)
}

/// A new message's record from the envelope's stored (JSON) form.
pub(super) fn encode_message_json(id: &QueueId, env: &[u8], body: &[u8]) -> io::Result<Vec<u8>> {
    let mut p = start(KIND_MESSAGE, id, 4 + env.len() + body.len());
    push_field(&mut p, env)?;
    p.extend_from_slice(body);
    Ok(p)
}

/// A live message re-appended by compaction, with its current state.
pub(super) fn encode_copy(
    id: &QueueId,
    envelope: &[u8],
    state: &DeliveryState,
    body: &[u8],
) -> io::Result<Vec<u8>> {
    let state = serde_json::to_vec(state).map_err(io::Error::other)?;
    let mut p = start(KIND_COPY, id, 8 + envelope.len() + state.len() + body.len());
    push_field(&mut p, envelope)?;
    push_field(&mut p, &state)?;
    p.extend_from_slice(body);
    Ok(p)
}

pub(super) fn encode_state(id: &QueueId, state: &DeliveryState) -> io::Result<Vec<u8>> {
    let mut p = start(KIND_STATE, id, 256);
    serde_json::to_writer(&mut p, state).map_err(io::Error::other)?;
    Ok(p)
}

pub(super) fn encode_done(id: &QueueId) -> Vec<u8> {
    start(KIND_DONE, id, 0)
}

/// A record's buffer starts with `HEADER` bytes of room, filled in here
/// (length and CRC of what follows), so the payload is never copied.
pub(super) fn seal(record: &mut [u8]) -> io::Result<()> {
    let (header, payload) = record
        .split_at_mut_checked(HEADER)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "record without header"))?;
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_RECORD)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "record too large"))?;
    let crc = crc32fast::hash(payload);
    header.copy_from_slice(&[len.to_le_bytes(), crc.to_le_bytes()].concat());
    Ok(())
}
