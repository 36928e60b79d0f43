//! Messages in more than one record: the writer a session streams DATA
//! into, and the reader delivery streams a message out of.
//!
//! A writer makes each [`CHUNK_SIZE`] of the message a `chunk` record as
//! soon as it is full, and ends with the commit record ([`record`]'s
//! comment has the format). At most one chunk is being written while the
//! session reads the next, so a session holds about two chunks whatever
//! the message's size, and a disk slower than the client slows the client
//! down instead of filling memory. Each chunk is durable (group commit,
//! like any record) before the next is handed over, so the commit record,
//! written last, never names a chunk a crash could lose.
//!
//! The committer pins the segment of a writer's first chunk until the
//! message is committed (then the message keeps it, as any live message
//! keeps its segments) or abandoned: chunks of a message still arriving
//! are nobody's in the index, and without the pin their segment could be
//! deleted under them. A writer dropped before its commit (the client
//! went away, a timeout, `552`) gives its pin back at once: its chunks are
//! dead bytes like retired records, and a restart passes over them.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use super::committer::{Answer, Effect, Job, Spanned};
use super::record::{self, Piece, CHUNK_BODY_AT, HEADER, MAX_RECORD};
use super::storage::{Storage, StorageFile};
use super::{segment_name, spool_error, stopped, Journal, Location};
use crate::envelope::{QueueId, StoredEnvelope};
use crate::{AppendFuture, MessageSink, SpoolError, StoreFuture};

/// Octets of a message per chunk record. A message no larger is stored in
/// one record. 256 KiB: large enough that the per-record cost (header,
/// queue id, an entry in the commit record) is lost in the noise, small
/// enough that 30 sessions each holding two are a few MB.
pub const CHUNK_SIZE: usize = 256 * 1024;

/// Delivery reads a message at most this much at a time.
const READ_PIECE: u64 = 256 * 1024;

/// Writers' tokens, for the committer's pins.
static NEXT_WRITER: AtomicU64 = AtomicU64::new(1);

/// A message written to the spool as it arrives (see the module comment).
/// Dropped without [`MessageWriter::commit`], it leaves nothing that a
/// restart or the index would count as a message.
pub struct MessageWriter {
    journal: Journal,
    id: QueueId,
    token: u64,
    /// The durable chunks, in order.
    chunks: Vec<Piece>,
    appended: u64,
    /// The chunk being written, and its length.
    in_flight: Option<(Answer, u32)>,
    /// Committed, or never wrote a chunk: nothing to give back.
    done: bool,
}

impl MessageWriter {
    pub(super) fn new(journal: Journal, id: QueueId) -> Self {
        Self {
            journal,
            id,
            token: NEXT_WRITER.fetch_add(1, Ordering::Relaxed),
            chunks: Vec::new(),
            appended: 0,
            in_flight: None,
            done: false,
        }
    }

    /// Waits until the chunk being written is durable.
    ///
    /// # Errors
    /// It could not be written; the message can only be refused.
    pub async fn flush(&mut self) -> Result<(), SpoolError> {
        if let Some((answer, len)) = self.in_flight.take() {
            let (segment, at) = answer
                .await
                .map_err(|_| SpoolError::Io(stopped()))?
                .map_err(spool_error)?;
            self.chunks.push(Piece {
                segment,
                offset: at + CHUNK_BODY_AT,
                len,
            });
        }
        Ok(())
    }

    /// Appends the message's next bytes as one chunk record, once the one
    /// before is durable; returns without waiting for this one.
    ///
    /// # Errors
    /// The chunk before could not be written, or this one is too large
    /// for a record.
    pub async fn append(&mut self, bytes: Vec<u8>) -> Result<(), SpoolError> {
        self.flush().await?;
        if bytes.is_empty() {
            return Ok(());
        }
        let len = u32::try_from(bytes.len())
            .ok()
            .filter(|l| *l < MAX_RECORD / 2)
            .ok_or_else(|| SpoolError::Io(io::Error::other("chunk too large")))?;
        let payload = record::encode_chunk(&self.id, &bytes);
        drop(bytes);
        let answer = self
            .journal
            .hand_over(payload, Effect::Chunk { writer: self.token })
            .map_err(SpoolError::Io)?;
        self.in_flight = Some((answer, len));
        self.appended += u64::from(len);
        Ok(())
    }

    /// Octets appended so far.
    pub fn appended(&self) -> u64 {
        self.appended
    }

    /// Ends the message: `head` in front of the chunks, `tail` after them.
    /// Resolves once the commit record is durable, after every chunk.
    ///
    /// # Errors
    /// A chunk or the commit record could not be written.
    pub async fn commit(
        mut self,
        envelope: StoredEnvelope,
        head: Vec<u8>,
        tail: Vec<u8>,
    ) -> Result<QueueId, SpoolError> {
        self.flush().await?;
        let id = self.id.clone();
        let Some(first) = self.chunks.first().map(|c| c.segment) else {
            // Small enough for one record: stored as one.
            self.done = true;
            return self
                .journal
                .store_whole(id, envelope, &head, &tail)
                .await
                .map_err(spool_error);
        };
        let env = serde_json::to_vec(&envelope).map_err(|e| SpoolError::Io(io::Error::other(e)))?;
        let payload = record::encode_spanned(&id, &env, None, &head, &self.chunks, &tail)
            .map_err(SpoolError::Io)?;
        let body_len = tail.len() as u64;
        let before_tail = head.len() as u64 + self.appended;
        let effect = Effect::Store {
            id: id.clone(),
            body_at: payload.len() as u64 - body_len,
            body_len,
            spanned: Some(Spanned {
                writer: self.token,
                first_segment: first,
                before_tail,
            }),
        };
        self.journal
            .append(payload, effect)
            .await
            .map_err(spool_error)?;
        self.done = true;
        let _ = self.journal.shared.arrivals.send(id.clone());
        Ok(id)
    }
}

impl Drop for MessageWriter {
    /// Gives the pin back: the chunks written are garbage now.
    fn drop(&mut self) {
        if !self.done && (self.in_flight.is_some() || !self.chunks.is_empty()) {
            let _ = self.journal.send(Job::Abandon(self.token));
        }
    }
}

impl MessageSink for MessageWriter {
    fn append(&mut self, bytes: Vec<u8>) -> AppendFuture<'_> {
        Box::pin(MessageWriter::append(self, bytes))
    }

    fn appended(&self) -> u64 {
        self.appended
    }

    fn commit(
        self: Box<Self>,
        envelope: StoredEnvelope,
        head: Vec<u8>,
        tail: Vec<u8>,
    ) -> StoreFuture<'static> {
        Box::pin(MessageWriter::commit(*self, envelope, head, tail))
    }
}

/// One piece of a message to read.
enum Part {
    /// Bytes already read (a spanned message's head, from its commit
    /// record).
    Bytes(Vec<u8>),
    /// `len` octets at `offset` of the `file`th open segment.
    File { file: usize, offset: u64, len: u64 },
}

/// A message's bytes, opened for reading in pieces of at most 256 KiB
/// (delivery sends one while it reads the next, never the whole message
/// in memory). Holds its segments open, so compaction moving the message
/// and deleting them meanwhile changes nothing for it.
pub struct SpooledBody {
    files: Vec<Box<dyn StorageFile>>,
    parts: Vec<Part>,
    len: u64,
}

impl SpooledBody {
    /// Opens the message at `at`: for a spanned one, its commit record is
    /// read (and checked) for the list of its chunks.
    pub(super) fn open(storage: &dyn Storage, at: &Location) -> io::Result<Self> {
        let commit = storage.open(&segment_name(at.segment))?;
        let mut body = SpooledBody {
            files: Vec::new(),
            parts: Vec::new(),
            len: 0,
        };
        if at.before_tail == 0 {
            body.files.push(commit);
            body.push_range(0, at.offset, at.len);
            return Ok(body);
        }
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let len = usize::try_from(at.record_len).map_err(io::Error::other)?;
        if len < HEADER || len - HEADER > MAX_RECORD as usize {
            return Err(bad("record length out of range"));
        }
        let mut raw = vec![0u8; len];
        commit.read_exact_at(&mut raw, at.record)?;
        let (head, payload) = raw.split_at(HEADER);
        match record::header(head) {
            Some((l, crc)) if l as usize == payload.len() && crc32fast::hash(payload) == crc => {}
            _ => return Err(bad("a message's commit record changed on disk")),
        }
        let parts = record::message_parts(payload).ok_or_else(|| bad("not a message"))?;
        if !parts.head.is_empty() {
            body.len += parts.head.len() as u64;
            body.parts.push(Part::Bytes(parts.head.to_vec()));
        }
        let mut open: Vec<u64> = vec![at.segment];
        body.files.push(commit);
        for c in &parts.chunks {
            let file = match open.iter().position(|s| *s == c.segment) {
                Some(i) => i,
                None => {
                    body.files.push(storage.open(&segment_name(c.segment))?);
                    open.push(c.segment);
                    body.files.len() - 1
                }
            };
            body.push_range(file, c.offset, u64::from(c.len));
        }
        body.push_range(0, at.offset, at.len);
        Ok(body)
    }

    /// Adds `len` octets at `offset` of a file, in pieces of at most
    /// [`READ_PIECE`].
    fn push_range(&mut self, file: usize, offset: u64, len: u64) {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(READ_PIECE);
            self.parts.push(Part::File {
                file,
                offset: offset + done,
                len: n,
            });
            done += n;
        }
        self.len += len;
    }

    /// The message's size in octets.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The message is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many pieces it is read in.
    pub fn pieces(&self) -> usize {
        self.parts.len()
    }

    /// Octets of piece `i` (0 past the end).
    pub fn piece_len(&self, i: usize) -> u64 {
        match self.parts.get(i) {
            Some(Part::Bytes(b)) => b.len() as u64,
            Some(Part::File { len, .. }) => *len,
            None => 0,
        }
    }

    /// Reads piece `i` into `buf` (replacing what it held). Blocking: a
    /// read from the page cache, or the disk.
    ///
    /// # Errors
    /// `i` is past the end, or the read failed.
    pub fn read_piece(&self, i: usize, buf: &mut Vec<u8>) -> io::Result<()> {
        buf.clear();
        match self.parts.get(i) {
            Some(Part::Bytes(b)) => buf.extend_from_slice(b),
            Some(Part::File { file, offset, len }) => {
                let file = self
                    .files
                    .get(*file)
                    .ok_or_else(|| io::Error::other("no such file"))?;
                buf.resize(usize::try_from(*len).map_err(io::Error::other)?, 0);
                file.read_exact_at(buf, *offset)?;
            }
            None => return Err(io::ErrorKind::UnexpectedEof.into()),
        }
        Ok(())
    }

    /// The first `max` octets at most (a message's header section, for a
    /// report), read piece by piece.
    ///
    /// # Errors
    /// A read failed.
    pub fn read_prefix(&self, max: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(max.min(usize::try_from(self.len).unwrap_or(max)));
        let mut piece = Vec::new();
        for i in 0..self.parts.len() {
            if out.len() >= max {
                break;
            }
            self.read_piece(i, &mut piece)?;
            let take = piece.len().min(max - out.len());
            out.extend_from_slice(piece.get(..take).unwrap_or_default());
        }
        Ok(out)
    }

    /// The whole message (for tests and small messages).
    ///
    /// # Errors
    /// A read failed.
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        self.read_prefix(usize::try_from(self.len).map_err(io::Error::other)?)
    }
}
