//! The committer thread: owns the segment being written, makes batches of
//! records durable with one `fdatasync` (group commit), applies them to the
//! index in the order they reached the disk, and between batches does the
//! spool's housekeeping off the async runtime: compaction steps and the
//! deletion of segments nothing needs any more.

use std::io;
use std::sync::{mpsc, Arc, Mutex};

use super::index::{self, Entry, Index, Schedule};
use super::record::{self, HEADER, MAX_RECORD};
use super::storage::{Storage, StorageFile};
use super::{lock, lookup, segment_name, Location};
use crate::envelope::QueueId;
use crate::state::DeliveryState;

/// What a record does to the index once it is durable.
pub(super) enum Effect {
    /// A new message; its body starts `body_at` bytes into the record.
    Store {
        id: QueueId,
        body_at: u64,
        body_len: u64,
    },
    /// A message's new delivery state (what of it the index keeps).
    State(QueueId, Schedule),
    Retire(QueueId),
    /// A compaction copy of a live message.
    Moved {
        id: QueueId,
        body_at: u64,
        body_len: u64,
    },
}

/// What the committer is handed. (Barriers are rare; boxing every append
/// to shrink them would cost an allocation per record.)
#[allow(clippy::large_enum_variant)]
pub(super) enum Job {
    Append(Request),
    /// Answered once everything handed over before it is durable and the
    /// housekeeping after it is done (tests wait for compaction with it).
    #[cfg_attr(not(test), allow(dead_code))]
    Barrier(tokio::sync::oneshot::Sender<()>),
}

pub(super) struct Request {
    /// The record, with `HEADER` bytes of room in front.
    pub payload: Vec<u8>,
    pub effect: Effect,
    /// Answered once the record is durable and in the index.
    pub done: Option<tokio::sync::oneshot::Sender<io::Result<()>>>,
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
                    apply(&mut index, req.effect, segment, at, len);
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

    /// Writes and flushes a batch; one result per request: the segment and
    /// the offset where its record starts.
    fn write(&mut self, batch: &mut [Request]) -> Vec<io::Result<(u64, u64)>> {
        let count = batch.len();
        let fail = |e: &io::Error| {
            (0..count)
                .map(|_| Err(io::Error::new(e.kind(), e.to_string())))
                .collect()
        };
        if self.size >= self.limit {
            match Committer::open(
                Arc::clone(&self.storage),
                self.number + 1,
                self.limit,
                Arc::clone(&self.index),
            ) {
                Ok(next) => *self = next,
                Err(e) => return fail(&e),
            }
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
        let batch = match copies(&*self.storage, segment, &plan) {
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

    /// Deletes the files of segments nothing needs any more, oldest first,
    /// each unlink made durable before the next: a newer segment may hold
    /// the `done` records of an older one, so it must never outlive it on
    /// disk, not even after a crash. Runs here, off the async threads and
    /// outside the index lock.
    fn delete_retired_segments(&mut self) {
        let mut doomed = lock(&self.index).take_retired_segments().into_iter();
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
        } => {
            let location = Location {
                segment,
                record: at,
                record_len: len,
                offset: at + body_at,
                len: body_len,
            };
            index.insert(id, location, Schedule::default());
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
        } => index.relocate(
            &id,
            Location {
                segment,
                record: at,
                record_len: len,
                offset: at + body_at,
                len: body_len,
            },
        ),
    }
}

/// Reads the planned messages' records back from `segment` (checking
/// their CRC) and makes each a `copy` record with its current state (read
/// from its latest `state` record, if it has one since its record).
fn copies(
    storage: &dyn Storage,
    segment: u64,
    plan: &[(QueueId, Entry)],
) -> io::Result<Vec<Request>> {
    let file = storage.open(&segment_name(segment))?;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut batch = Vec::with_capacity(plan.len());
    for (id, m) in plan {
        let len = usize::try_from(m.location.record_len).map_err(io::Error::other)?;
        if len < HEADER || len - HEADER > MAX_RECORD as usize {
            return Err(bad("record length out of range"));
        }
        let mut raw = vec![0u8; len];
        file.read_exact_at(&mut raw, m.location.record)?;
        let (head, payload) = raw.split_at(HEADER);
        match record::header(head) {
            Some((l, crc)) if l as usize == payload.len() && crc32fast::hash(payload) == crc => {}
            _ => return Err(bad("record changed on disk")),
        }
        let parts = record::message_parts(payload).ok_or_else(|| bad("not a message"))?;
        if parts.id != *id {
            return Err(bad("record of another message"));
        }
        let payload = match (m.state, parts.state) {
            (Some(at), _) => {
                let state = lookup::read_state(storage, id, &at)?;
                record::encode_copy(id, parts.envelope, &state, parts.body)?
            }
            (None, Some(json)) => {
                let state: DeliveryState = serde_json::from_slice(json)
                    .map_err(|e| bad(&format!("delivery state: {e}")))?;
                record::encode_copy(id, parts.envelope, &state, parts.body)?
            }
            // Never tried: copied as it was stored.
            (None, None) => record::encode_message_json(id, parts.envelope, parts.body)?,
        };
        let body_len = parts.body.len() as u64;
        let body_at = payload.len() as u64 - body_len;
        batch.push(Request {
            payload,
            effect: Effect::Moved {
                id: id.clone(),
                body_at,
                body_len,
            },
            done: None,
        });
    }
    Ok(batch)
}
