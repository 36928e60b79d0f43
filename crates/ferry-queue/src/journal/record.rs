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
//! - `done`: nothing more (the message is retired);
//! - `chunk`: a piece of a message that is still arriving: its bytes, as
//!   they came. It means nothing on its own;
//! - `spanned`: the commit record of a message streamed in chunks, written
//!   after its last chunk: the envelope, the delivery state (empty for a
//!   new message; a compaction copy has one), the trace header fields put
//!   in front of the message (`head`), where its chunks are (a count, then
//!   per chunk its segment `u64`, the offset of its bytes `u64` and their
//!   length `u32`, all LE), and the message's last bytes (the tail). The
//!   message is `head`, the chunks in order, then the tail.
//!
//! A message no larger than a chunk is one `message` record, as before.
//! A larger one is chunk records, interleaved with other sessions' records
//! and possibly across segments, then its `spanned` record: until that is
//! durable the chunks are nobody's, and recovery passes over them (a
//! session that ended mid-DATA, or a crash before the commit). The commit
//! record is written only once every chunk it names is durable, so a
//! commit read back always finds them.
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
const KIND_CHUNK: u8 = 5;
const KIND_SPANNED: u8 = 6;
/// Octets of one chunk's entry in a `spanned` record.
const PIECE: usize = 8 + 8 + 4;
/// Where a chunk's bytes start in its record (after the header, the kind
/// and the id).
pub(super) const CHUNK_BODY_AT: u64 = (HEADER + 1 + ID_LEN) as u64;

/// Where one chunk's bytes are: segment, offset in it, length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Piece {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
}

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
        /// Offset of the body (for a spanned message, its tail) in the
        /// segment, and its length.
        body_offset: u64,
        body_len: u64,
        /// A spanned message's chunks (empty for one record), and the
        /// octets before its tail (head and chunks).
        chunks: Vec<Piece>,
        before_tail: u64,
    },
    /// A chunk of a message that may never be committed.
    Chunk,
    Done(QueueId),
    State(QueueId, DeliveryState),
}

/// A message record's parts, borrowed from its payload.
pub(super) struct MessageParts<'a> {
    pub id: QueueId,
    pub envelope: &'a [u8],
    pub state: Option<&'a [u8]>,
    /// The trace fields in front and the chunks (both empty for a message
    /// in one record).
    pub head: &'a [u8],
    pub chunks: Vec<Piece>,
    /// The body, or a spanned message's tail.
    pub body: &'a [u8],
}

impl MessageParts<'_> {
    /// Octets of the message before `body`.
    pub fn before_tail(&self) -> u64 {
        self.head.len() as u64 + self.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>()
    }
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at.checked_add(8)?)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
}

/// A `spanned` record's list of chunks.
fn pieces(list: &[u8]) -> Option<Vec<Piece>> {
    let count = u32_at(list, 0)? as usize;
    if list.len() != 4 + count.checked_mul(PIECE)? {
        return None;
    }
    (0..count)
        .map(|i| {
            let at = 4 + i * PIECE;
            Some(Piece {
                segment: u64_at(list, at)?,
                offset: u64_at(list, at + 8)?,
                len: u32_at(list, at + 16)?,
            })
        })
        .collect()
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

/// Splits a `message`, `copy` or `spanned` payload; `None` for any other
/// kind or a malformed one.
pub(super) fn message_parts(payload: &[u8]) -> Option<MessageParts<'_>> {
    let (&kind, rest) = payload.split_first()?;
    let id = id_of(rest)?;
    let (envelope, next) = field(rest, ID_LEN)?;
    let mut head: &[u8] = &[];
    let mut chunks = Vec::new();
    let (state, body_start) = match kind {
        KIND_MESSAGE => (None, next),
        KIND_COPY => {
            let (state, after) = field(rest, next)?;
            (Some(state), after)
        }
        KIND_SPANNED => {
            let (state, after) = field(rest, next)?;
            let (h, after) = field(rest, after)?;
            let (list, after) = field(rest, after)?;
            head = h;
            chunks = pieces(list)?;
            ((!state.is_empty()).then_some(state), after)
        }
        _ => return None,
    };
    Some(MessageParts {
        id,
        envelope,
        state,
        head,
        chunks,
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
        KIND_CHUNK => id_of(rest).map(|_| Record::Chunk),
        KIND_MESSAGE | KIND_COPY | KIND_SPANNED => {
            let parts = message_parts(payload)?;
            let state = match parts.state {
                Some(s) => Some(serde_json::from_slice(s).ok()?),
                None => None,
            };
            let body_len = parts.body.len() as u64;
            let before_tail = parts.before_tail();
            Some(Record::Message {
                id: parts.id,
                envelope: serde_json::from_slice(parts.envelope).ok()?,
                state,
                body_offset: payload_offset + (payload.len() as u64 - body_len),
                body_len,
                chunks: parts.chunks,
                before_tail,
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
/// The message is `head` then `body`.
pub(super) fn encode_message(
    id: &QueueId,
    envelope: &StoredEnvelope,
    head: &[u8],
    body: &[u8],
) -> io::Result<Vec<u8>> {
    let env = serde_json::to_vec(envelope).map_err(io::Error::other)?;
    let mut p = start(KIND_MESSAGE, id, 4 + env.len() + head.len() + body.len());
    push_field(&mut p, &env)?;
    p.extend_from_slice(head);
    p.extend_from_slice(body);
    Ok(p)
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

/// A chunk of a message still arriving: `bytes` after the id, so they
/// start [`CHUNK_BODY_AT`] octets into the record.
pub(super) fn encode_chunk(id: &QueueId, bytes: &[u8]) -> Vec<u8> {
    let mut p = start(KIND_CHUNK, id, bytes.len());
    p.extend_from_slice(bytes);
    p
}

/// A spanned message's commit record (`state` for a compaction copy).
pub(super) fn encode_spanned(
    id: &QueueId,
    envelope: &[u8],
    state: Option<&DeliveryState>,
    head: &[u8],
    chunks: &[Piece],
    tail: &[u8],
) -> io::Result<Vec<u8>> {
    let state = match state {
        Some(s) => serde_json::to_vec(s).map_err(io::Error::other)?,
        None => Vec::new(),
    };
    let list_len = 4 + chunks.len() * PIECE;
    let mut p = start(
        KIND_SPANNED,
        id,
        16 + envelope.len() + state.len() + head.len() + list_len + tail.len(),
    );
    push_field(&mut p, envelope)?;
    push_field(&mut p, &state)?;
    push_field(&mut p, head)?;
    let mut list = Vec::with_capacity(list_len);
    let count = u32::try_from(chunks.len()).map_err(io::Error::other)?;
    list.extend_from_slice(&count.to_le_bytes());
    for c in chunks {
        list.extend_from_slice(&c.segment.to_le_bytes());
        list.extend_from_slice(&c.offset.to_le_bytes());
        list.extend_from_slice(&c.len.to_le_bytes());
    }
    push_field(&mut p, &list)?;
    p.extend_from_slice(tail);
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
