//! The committer thread: owns the segment being written, makes batches of
//! records durable with one `fdatasync` (group commit), applies them to the
//! index in the order they reached the disk, and between batches does the
//! spool's housekeeping off the async runtime: compaction steps and the
//! deletion of segments nothing needs any more.

use std::collections::HashMap;
use std::io;
use std::sync::{mpsc, Arc, Mutex};

use super::index::{self, Entry, Index, Schedule};
use super::record::{self, Piece, CHUNK_BODY_AT, HEADER, MAX_RECORD};
use super::storage::{Storage, StorageFile};
use super::{lock, lookup, segment_name, Location};
use crate::envelope::QueueId;
use crate::state::DeliveryState;

/// What a record does to the index once it is durable.
pub(super) enum Effect {
    /// A new message; its body (or tail) starts `body_at` bytes into the
    /// record.
    Store {
        id: QueueId,
        body_at: u64,
        body_len: u64,
        spanned: Option<Spanned>,
    },
    /// A message's new delivery state (what of it the index keeps).
    State(QueueId, Schedule),
    Retire(QueueId),
    /// A compaction copy of a live message.
    Moved {
        id: QueueId,
        body_at: u64,
        body_len: u64,
        spanned: Option<Spanned>,
    },
    /// A chunk of a message still arriving, from writer `writer`: nothing
    /// in the index, but its segment is pinned (`stream`'s comment).
    Chunk {
        writer: u64,
    },
}

/// A message stored in chunks: its writer (whose pin its commit ends),
/// the segment of its first chunk, and its octets before the tail.
#[derive(Debug, Clone, Copy)]
pub(super) struct Spanned {
    pub writer: u64,
    pub first_segment: u64,
    pub before_tail: u64,
}

/// Where a durable record went: segment, offset.
pub(super) type Answer = tokio::sync::oneshot::Receiver<io::Result<(u64, u64)>>;

/// What the committer is handed. (Barriers are rare; boxing every append
/// to shrink them would cost an allocation per record.)
#[allow(clippy::large_enum_variant)]
pub(super) enum Job {
    Append(Request),
    /// Answered once everything handed over before it is durable and the
    /// housekeeping after it is done (tests wait for compaction with it).
    #[cfg_attr(not(test), allow(dead_code))]
    Barrier(tokio::sync::oneshot::Sender<()>),
    /// Writer `n` ended without a commit: its pin goes.
    Abandon(u64),
}

pub(super) struct Request {
    /// The record, with `HEADER` bytes of room in front.
    pub payload: Vec<u8>,
    pub effect: Effect,
    /// Answered once the record is durable and in the index, with its
    /// segment and offset.
    pub done: Option<tokio::sync::oneshot::Sender<io::Result<(u64, u64)>>>,
}

/// Owns the segment being written.
pub(super) struct Committer {
    storage: Arc<dyn Storage>,
    number: u64,
    file: Box<dyn StorageFile>,
    size: u64,
    limit: u64,
    index: Arc<Mutex<Index>>,
    /// A segment whose live records could not be read back for
    /// compaction: left alone rather than tried after every batch.
    unreadable: Option<u64>,
    /// Per writer of a message still arriving, the segment of its first
    /// chunk: that segment and every later one stay.
    pins: HashMap<u64, u64>,
}

impl Committer {
    pub fn open(
        storage: Arc<dyn Storage>,
        number: u64,
        limit: u64,
        index: Arc<Mutex<Index>>,
    ) -> io::Result<Self> {
        let file = storage.open_append(&segment_name(number))?;
        let size = file.len()?;
        storage.sync_dir()?;
        Ok(Self {
            storage,
            number,
            file,
            size,
            limit,
            index,
            unreadable: None,
            pins: HashMap::new(),
        })
    }

    pub fn run(mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut batch = Vec::new();
            let mut barriers = Vec::new();
            // Everything that arrived while the last flush ran shares this one.
            for job in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                match job {
                    Job::Append(req) => batch.push(req),
                    Job::Barrier(b) => barriers.push(b),
                    Job::Abandon(writer) => {
                        self.pins.remove(&writer);
                    }
                }
            }
            if !batch.is_empty() {
                self.commit(batch);
            }
            self.compact_step();
            self.delete_retired_segments();
            for b in barriers {
                let _ = b.send(());
            }
        }
    }

    /// Writes and flushes a batch, applies it to the index, then answers.
    fn commit(&mut self, mut batch: Vec<Request>) {
        let places = self.write(&mut batch);
        let mut answers = Vec::with_capacity(batch.len());
        {
            let mut index = lock(&self.index);
            for (req, place) in batch.into_iter().zip(places) {
                let result = place.map(|(segment, at)| {
                    let len = req.payload.len() as u64;
                    index.note_segment(segment, at + len);
                    match &req.effect {
                        Effect::Chunk { writer } => {
                            self.pins.entry(*writer).or_insert(segment);
                        }
                        Effect::Store {
                            spanned: Some(s), ..
                        } => {
                            // The message keeps its segments from now on.
                            self.pins.remove(&s.writer);
                        }
                        _ => {}
                    }
                    apply(&mut index, req.effect, segment, at, len);
                    (segment, at)
                });
                answers.push((req.done, result));
            }
        }
        for (done, result) in answers {
            if let Some(done) = done {
                let _ = done.send(result);
            }
        }
    }

    /// Starts the next segment once this one is full.
    fn roll_if_full(&mut self) -> io::Result<()> {
        if self.size >= self.limit {
            let next = Committer::open(
                Arc::clone(&self.storage),
                self.number + 1,
                self.limit,
                Arc::clone(&self.index),
            )?;
            let pins = std::mem::take(&mut self.pins);
            *self = next;
            self.pins = pins;
        }
        Ok(())
    }

    /// Writes and flushes a batch; one result per request: the segment and
    /// the offset where its record starts.
    fn write(&mut self, batch: &mut [Request]) -> Vec<io::Result<(u64, u64)>> {
        let count = batch.len();
        let fail = |e: &io::Error| {
            (0..count)
                .map(|_| Err(io::Error::new(e.kind(), e.to_string())))
                .collect()
        };
        if let Err(e) = self.roll_if_full() {
            return fail(&e);
        }
        let mut places = Vec::with_capacity(batch.len());
        let mut end = self.size;
        let mut written = Ok(());
        for req in batch.iter_mut() {
            match record::seal(&mut req.payload) {
                Ok(()) if written.is_ok() => {
                    written = self.file.append(&req.payload);
                    places.push(Ok((self.number, end)));
                    end += req.payload.len() as u64;
                }
                Ok(()) => places.push(Err(io::Error::other("an earlier write failed"))),
                Err(e) => places.push(Err(e)),
            }
        }
        match written.and_then(|()| self.file.sync_data()) {
            Ok(()) => {
                self.size = end;
                places
            }
            Err(e) => {
                // Cut back whatever part of the batch reached the file, so a
                // failed write never leaves records behind that nobody holds.
                let _ = self.file.set_len(self.size);
                tracing::error!(error = %e, "spool write failed");
                fail(&e)
            }
        }
    }

    /// Re-appends some live messages of the oldest segment, if compaction
    /// is due (see `Index::compaction_plan`). The copies are made durable
    /// like any record before the index points at them; only then can the
    /// old segment become empty and be deleted. A crash at any point leaves
    /// each message in the old segment, in its copy, or in both (a restart
    /// reads both as the same message, the copy with the newer state).
    fn compact_step(&mut self) {
        // At most a quarter segment per step, so the appends that wait
        // behind it are not held up long.
        let budget = (self.limit / 4).max(1);
        let Some((segment, plan)) = lock(&self.index).compaction_plan(budget) else {
            return;
        };
        if self.unreadable == Some(segment) || segment >= self.number {
            return;
        }
        // A message in chunks is copied chunk by chunk, never held whole.
        let (spanned, plan): (Vec<_>, Vec<_>) = plan
            .into_iter()
            .partition(|(_, m)| m.location.before_tail > 0);
        for (id, m) in &spanned {
            if let Err(e) = self.copy_spanned(id, m) {
                tracing::error!(segment, queue_id = %id, error = %e, "cannot copy a message for compaction; the segment stays");
                self.unreadable = Some(segment);
                return;
            }
        }
        if plan.is_empty() {
            return;
        }
        let batch = match copies(&*self.storage, &plan) {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(segment, error = %e, "cannot read live messages back for compaction; the segment stays");
                self.unreadable = Some(segment);
                return;
            }
        };
        let bytes: usize = batch.iter().map(|r| r.payload.len()).sum();
        tracing::debug!(segment, messages = batch.len(), bytes, "compacting");
        self.commit(batch);
    }

    /// Re-appends a message stored in chunks: each chunk read back and
    /// appended in turn (one in memory at a time), then its commit record
    /// naming the new chunks, with its current state; one flush makes them
    /// durable before the index points at the copy. A failure cuts back
    /// what was appended, and the message stays where it was.
    fn copy_spanned(&mut self, id: &QueueId, m: &Entry) -> io::Result<()> {
        let at = &m.location;
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let raw = read_record(&*self.storage, at.segment, at.record, at.record_len)?;
        let parts = record::message_parts(raw.get(HEADER..).unwrap_or_default())
            .ok_or_else(|| bad("not a message"))?;
        if parts.id != *id {
            return Err(bad("record of another message"));
        }
        let state = current_state(&*self.storage, id, m, &parts)?;
        self.roll_if_full()?;
        let start = self.size;
        let copied = self.append_copy(id, state.as_ref(), &parts);
        match copied.and_then(|r| self.file.sync_data().map(|()| r)) {
            Ok((chunks_end, commit_len, body_at, before_tail)) => {
                self.size = chunks_end + commit_len;
                let mut index = lock(&self.index);
                index.note_segment(self.number, self.size);
                apply(
                    &mut index,
                    Effect::Moved {
                        id: id.clone(),
                        body_at,
                        body_len: parts.body.len() as u64,
                        spanned: Some(Spanned {
                            writer: 0,
                            first_segment: self.number,
                            before_tail,
                        }),
                    },
                    self.number,
                    chunks_end,
                    commit_len,
                );
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(start);
                Err(e)
            }
        }
    }

    /// Appends the copies of a spanned message's chunks and its new commit
    /// record to the open segment (unflushed). Returns where the commit
    /// record starts, its length, where its tail starts in it, and the
    /// message's octets before the tail.
    fn append_copy(
        &mut self,
        id: &QueueId,
        state: Option<&DeliveryState>,
        parts: &record::MessageParts<'_>,
    ) -> io::Result<(u64, u64, u64, u64)> {
        let mut end = self.size;
        let mut chunks = Vec::with_capacity(parts.chunks.len());
        let mut files: HashMap<u64, Box<dyn StorageFile>> = HashMap::new();
        let mut bytes = Vec::new();
        for c in &parts.chunks {
            let file = match files.entry(c.segment) {
                std::collections::hash_map::Entry::Occupied(f) => f.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(self.storage.open(&segment_name(c.segment))?)
                }
            };
            bytes.resize(c.len as usize, 0);
            file.read_exact_at(&mut bytes, c.offset)?;
            let mut chunk = record::encode_chunk(id, &bytes);
            record::seal(&mut chunk)?;
            self.file.append(&chunk)?;
            chunks.push(Piece {
                segment: self.number,
                offset: end + CHUNK_BODY_AT,
                len: c.len,
            });
            end += chunk.len() as u64;
        }
        let mut commit =
            record::encode_spanned(id, parts.envelope, state, parts.head, &chunks, parts.body)?;
        record::seal(&mut commit)?;
        self.file.append(&commit)?;
        let len = commit.len() as u64;
        let before_tail = parts.before_tail();
        Ok((end, len, len - parts.body.len() as u64, before_tail))
    }

    /// Deletes the files of segments nothing needs any more, oldest first,
    /// each unlink made durable before the next: a newer segment may hold
    /// the `done` records of an older one, so it must never outlive it on
    /// disk, not even after a crash. Runs here, off the async threads and
    /// outside the index lock.
    fn delete_retired_segments(&mut self) {
        // Never a segment holding chunks of a message still arriving.
        let keep_from = self.pins.values().min().copied();
        let mut doomed = lock(&self.index)
            .take_retired_segments(keep_from)
            .into_iter();
        while let Some((n, info)) = doomed.next() {
            let name = segment_name(n);
            match self
                .storage
                .remove(&name)
                .and_then(|()| self.storage.sync_dir())
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(segment = name, error = %e, "could not delete a retired segment; trying again later");
                    lock(&self.index).restore_segments(std::iter::once((n, info)).chain(doomed));
                    return;
                }
            }
        }
    }
}

/// What a durable record does to the index.
fn apply(index: &mut Index, effect: Effect, segment: u64, at: u64, len: u64) {
    match effect {
        Effect::Store {
            id,
            body_at,
            body_len,
            spanned,
        } => {
            index.insert(
                id,
                location(segment, at, len, body_at, body_len, spanned),
                Schedule::default(),
            );
        }
        Effect::State(id, schedule) => {
            if let Some(state) = index::state_at(segment, at, len) {
                index.set_state(&id, state, schedule);
            }
        }
        Effect::Retire(id) => index.remove(&id),
        Effect::Moved {
            id,
            body_at,
            body_len,
            spanned,
        } => index.relocate(&id, location(segment, at, len, body_at, body_len, spanned)),
        Effect::Chunk { .. } => {}
    }
}

/// Where a message whose record is `len` bytes at `at` in `segment` is.
fn location(
    segment: u64,
    at: u64,
    len: u64,
    body_at: u64,
    body_len: u64,
    spanned: Option<Spanned>,
) -> Location {
    let mut l = Location::whole(segment, at, len, at + body_at, body_len);
    if let Some(s) = spanned {
        l.first_segment = s.first_segment;
        l.before_tail = s.before_tail;
    }
    l
}

/// A record read back whole (header included), its CRC checked.
fn read_record(storage: &dyn Storage, segment: u64, at: u64, len: u64) -> io::Result<Vec<u8>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let len = usize::try_from(len).map_err(io::Error::other)?;
    if len < HEADER || len - HEADER > MAX_RECORD as usize {
        return Err(bad("record length out of range"));
    }
    let mut raw = vec![0u8; len];
    storage
        .open(&segment_name(segment))?
        .read_exact_at(&mut raw, at)?;
    let (head, payload) = raw.split_at(HEADER);
    match record::header(head) {
        Some((l, crc)) if l as usize == payload.len() && crc32fast::hash(payload) == crc => Ok(raw),
        _ => Err(bad("record changed on disk")),
    }
}

/// Reads the planned messages' records back (checking their CRC) and
/// makes each a `copy` record with its current state (read from its latest
/// `state` record, if it has one since its record).
fn copies(storage: &dyn Storage, plan: &[(QueueId, Entry)]) -> io::Result<Vec<Request>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut batch = Vec::with_capacity(plan.len());
    for (id, m) in plan {
        let at = &m.location;
        let raw = read_record(storage, at.segment, at.record, at.record_len)?;
        let payload = raw.get(HEADER..).unwrap_or_default();
        let parts = record::message_parts(payload).ok_or_else(|| bad("not a message"))?;
        if parts.id != *id {
            return Err(bad("record of another message"));
        }
        let payload = match current_state(storage, id, m, &parts)? {
            Some(state) => record::encode_copy(id, parts.envelope, &state, parts.body)?,
            // Never tried: copied as it was stored.
            None => record::encode_message_json(id, parts.envelope, parts.body)?,
        };
        let body_len = parts.body.len() as u64;
        let body_at = payload.len() as u64 - body_len;
        batch.push(Request {
            payload,
            effect: Effect::Moved {
                id: id.clone(),
                body_at,
                body_len,
                spanned: None,
            },
            done: None,
        });
    }
    Ok(batch)
}

/// A live message's delivery state for its compaction copy: from its
/// latest `state` record, else the one its record carries (a copy's);
/// `None` for a message never tried, copied as it was stored.
fn current_state(
    storage: &dyn Storage,
    id: &QueueId,
    m: &Entry,
    parts: &record::MessageParts<'_>,
) -> io::Result<Option<DeliveryState>> {
    match (m.state, parts.state) {
        (Some(at), _) => lookup::read_state(storage, id, &at).map(Some),
        (None, Some(json)) => serde_json::from_slice(json).map(Some).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("delivery state: {e}"))
        }),
        (None, None) => Ok(None),
    }
}
