//! The journal spool: messages appended to segment files, many made
//! durable by one `fdatasync` (group commit).
//!
//! One committer thread owns the open segment. Sessions hand it records and
//! wait; it writes every record that arrived while the previous flush ran
//! in one `write`, flushes once with `sync_data`, applies them to the index
//! and only then answers them all. A new segment's directory entry is
//! fsynced before any record in it is acknowledged. A fresh file and an
//! fsync per message cost about three times as much disk time (see
//! `shared/BASELINES.md`), and Postfix pays it.
//!
//! Layout under `DATA/spool/`: `NNNNNNNNNNNN.seg`, numbered in order, each a
//! sequence of CRC-framed records ([`record`]'s comment has the format). A
//! `done` record retires a message; a segment whose messages are all
//! retired is deleted, oldest first. A message that stays (deferred for
//! days) would keep every later segment on disk; compaction re-appends it,
//! with its envelope and current delivery state, to the newest segment, so
//! its old one can go (`index::Index::compaction_plan` says when). At start
//! every segment is read back: a torn record at the end of the newest
//! segment (a crash mid-write, never acknowledged) is cut off, and a
//! message found twice (original and compaction copy, after a crash
//! between the copy and the deletion) is one message, the later record
//! winning.
//!
//! A message larger than [`CHUNK_SIZE`] is written as it arrives, in
//! chunk records interleaved with other sessions' records, then a commit
//! record naming them ([`stream`]'s comment says how a session's memory
//! stays at a chunk or two, and why the segments of a message still
//! arriving are pinned). Such a message keeps every segment from its first
//! chunk's to its commit record's; compaction copies it chunk by chunk.
//! Chunks no commit names (a session gone mid-DATA, a crash) are dead
//! bytes: recovery passes over them and they keep no segment.
//!
//! In memory the journal keeps an index ([`index`]): per live message
//! only where its records are and when it is due, not its envelope and
//! state, which are read back from the spool when needed ([`lookup`]).

mod committer;
#[cfg(test)]
mod group_commit_tests;
mod index;
mod lookup;
mod record;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod sim_tests;
mod storage;
mod stream;
#[cfg(test)]
mod tests;

use std::io::{self, Read};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use committer::{Committer, Effect, Job, Request};
use index::{Index, Schedule};
use record::{Record, HEADER, MAX_RECORD};
use storage::{Dir, Reader, Storage};
pub use stream::{MessageWriter, SpooledBody, CHUNK_SIZE};

use crate::envelope::{QueueId, StoredEnvelope};
use crate::state::DeliveryState;
use crate::{MessageSink, Spool, SpoolError, StoreFuture};

/// A new segment is started past this size.
pub const SEGMENT_SIZE: u64 = 64 * 1024 * 1024;

/// How often a read looks a message up again after finding its segment
/// gone (a compaction moved it meanwhile).
const MOVES: usize = 3;

/// Where a message's record and bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Location {
    segment: u64,
    /// Offset of the record (its header) in the segment, and its length.
    record: u64,
    record_len: u64,
    /// Offset of the message body in the segment, and its length (for a
    /// message streamed in chunks: of its tail, in its commit record).
    offset: u64,
    len: u64,
    /// The oldest segment holding a chunk of the message (`segment` for a
    /// message in one record). Its chunks are in this segment and the
    /// later ones up to `segment`, so the message keeps them all.
    first_segment: u64,
    /// Octets of the message before the tail: its head and chunks (0 for
    /// a message in one record).
    before_tail: u64,
}

impl Location {
    /// A message in one record: `len` body bytes at `offset`.
    fn whole(segment: u64, record: u64, record_len: u64, offset: u64, len: u64) -> Self {
        Self {
            segment,
            record,
            record_len,
            offset,
            len,
            first_segment: segment,
            before_tail: 0,
        }
    }

    /// The segments that hold a part of the message.
    fn segments(&self) -> std::ops::RangeInclusive<u64> {
        self.first_segment.min(self.segment)..=self.segment
    }

    /// Octets on disk the message keeps: its record and its chunks.
    fn stored_len(&self) -> u64 {
        self.record_len + self.before_tail
    }

    /// The message's size in octets.
    fn size(&self) -> u64 {
        self.before_tail + self.len
    }
}

/// A message in the spool, its envelope and latest delivery state read
/// back from it ([`Journal::message`]).
#[derive(Debug, Clone)]
pub struct SpooledMessage {
    pub id: QueueId,
    pub envelope: StoredEnvelope,
    /// The latest recorded delivery state.
    pub state: DeliveryState,
    location: Location,
}

/// The queue at a glance, from the index alone (no disk read).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Live messages.
    pub messages: usize,
    /// Of them, tried at least once.
    pub deferred: usize,
    /// The oldest one (queue ids are in the order they were made).
    pub oldest: Option<QueueId>,
}

impl SpooledMessage {
    /// The message's size in bytes.
    pub fn size(&self) -> u64 {
        self.location.size()
    }
}

struct Shared {
    storage: Arc<dyn Storage>,
    /// Every stored message's id, for delivery to pick up.
    arrivals: tokio::sync::mpsc::UnboundedSender<QueueId>,
    arrivals_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<QueueId>>>,
    index: Arc<Mutex<Index>>,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Shared {
    /// Lets the committer finish what it has (a compaction step included)
    /// before the spool can be opened again.
    fn drop(&mut self) {
        drop(lock(&self.tx).take());
        if let Some(thread) = lock(&self.committer).take() {
            let _ = thread.join();
        }
    }
}

/// The durable spool. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn stopped() -> io::Error {
    io::Error::other("spool committer stopped")
}

fn segment_name(n: u64) -> String {
    format!("{n:012}.seg")
}

/// A segment read back.
struct SegmentScan {
    /// Where the last whole record ends.
    good_end: u64,
    /// The file's size.
    size: u64,
}

/// Reads the records of one segment, up to the first that is torn or
/// damaged, handing each whole one to `each` with its offset and length
/// as it is read: a segment's records (decoded envelopes and states) are
/// never all held at once, which would leave a restarted worker's heap
/// with tens of megabytes it no longer uses.
fn read_segment(
    storage: &dyn Storage,
    name: &str,
    mut each: impl FnMut(u64, u64, Record),
) -> io::Result<SegmentScan> {
    let file = storage.open(name)?;
    let size = file.len()?;
    // A buffer of at most 1 MiB, no larger than the segment.
    let buffer = usize::try_from(size).map_or(1 << 20, |s| s.clamp(HEADER, 1 << 20));
    let mut file = io::BufReader::with_capacity(buffer, Reader::new(file));
    let mut offset = 0u64;
    let mut head = [0u8; HEADER];
    loop {
        if offset + HEADER as u64 > size {
            break;
        }
        file.read_exact(&mut head)?;
        let Some((len, crc)) = record::header(&head) else {
            break;
        };
        let end = offset + HEADER as u64 + u64::from(len);
        if len > MAX_RECORD || end > size {
            break;
        }
        let mut payload = vec![0u8; len as usize];
        file.read_exact(&mut payload)?;
        if crc32fast::hash(&payload) != crc {
            break;
        }
        // A whole record (its CRC matched) that does not decode was
        // written by a version that stored something this one cannot read:
        // skip it, loudly, rather than take it for a torn tail and cut
        // every acknowledged record after it.
        match record::decode(&payload, offset + HEADER as u64) {
            Some(r) => each(offset, end - offset, r),
            None => tracing::error!(
                segment = name,
                offset,
                "a spool record this version cannot read; skipped"
            ),
        }
        offset = end;
    }
    Ok(SegmentScan {
        good_end: offset,
        size,
    })
}

/// Segment numbers in the spool, oldest first.
fn segments(storage: &dyn Storage) -> io::Result<Vec<u64>> {
    let mut found: Vec<u64> = storage
        .list()?
        .iter()
        .filter_map(|name| name.strip_suffix(".seg")?.parse().ok())
        .collect();
    found.sort_unstable();
    Ok(found)
}

/// Reads a spool without changing it (for tests and inspection): every
/// live message with its envelope and body.
pub fn scan(data_dir: &Path) -> io::Result<Vec<(QueueId, StoredEnvelope, Vec<u8>)>> {
    let storage = Dir::at(&data_dir.join("spool"));
    Index::replay(&storage, false)?
        .messages
        .iter()
        .map(|(id, entry)| {
            let m = lookup::load(&storage, id, entry)?;
            Ok((m.id, m.envelope, read_body(&storage, &m.location)?))
        })
        .collect()
}

fn read_body(storage: &dyn Storage, at: &Location) -> io::Result<Vec<u8>> {
    SpooledBody::open(storage, at)?.read_all()
}

/// The delivery state of every live message (for tests and inspection),
/// as a restart would read it back. Reads without changing the spool.
pub fn scan_states(data_dir: &Path) -> io::Result<Vec<DeliveryState>> {
    let storage = Dir::at(&data_dir.join("spool"));
    Index::replay(&storage, false)?
        .messages
        .iter()
        .map(|(id, entry)| Ok(lookup::load(&storage, id, entry)?.state))
        .collect()
}

/// Bytes in the spool that are not whole, valid records (a torn write at
/// the end, or damage); 0 for a clean spool. Reads without changing it.
pub fn damaged_bytes(data_dir: &Path) -> io::Result<u64> {
    let storage = Dir::at(&data_dir.join("spool"));
    let mut bad = 0;
    for n in segments(&storage)? {
        let scan = read_segment(&storage, &segment_name(n), |_, _, _| {})?;
        bad += scan.size - scan.good_end;
    }
    Ok(bad)
}

impl Journal {
    /// Opens the spool under `data_dir/spool`, recovering every message
    /// that was acknowledged and not retired, and starts the committer.
    ///
    /// # Errors
    /// The spool directory cannot be created or read, or the segment to
    /// write cannot be opened.
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        Self::open_with(data_dir, SEGMENT_SIZE)
    }

    /// `open`, with segments rotated past `segment_size` bytes.
    ///
    /// # Errors
    /// As [`Journal::open`].
    pub fn open_with(data_dir: &Path, segment_size: u64) -> io::Result<Self> {
        let storage = Dir::create(&data_dir.join("spool"))?;
        Self::open_on(Arc::new(storage), segment_size)
    }

    /// `open_with`, on any storage (the tests' simulated disk).
    fn open_on(storage: Arc<dyn Storage>, segment_size: u64) -> io::Result<Self> {
        let index = Index::replay(&*storage, true)?;
        let current = index.current;
        let index = Arc::new(Mutex::new(index));
        let (tx, rx) = mpsc::channel();
        let (arrivals, arrivals_rx) = tokio::sync::mpsc::unbounded_channel();
        let writer = Committer::open(
            Arc::clone(&storage),
            current,
            segment_size,
            Arc::clone(&index),
        )?;
        let committer = std::thread::Builder::new()
            .name("ferry-spool-commit".into())
            .spawn(move || writer.run(rx))?;
        let journal = Self {
            shared: Arc::new(Shared {
                storage,
                arrivals,
                arrivals_rx: Mutex::new(Some(arrivals_rx)),
                index,
                tx: Mutex::new(Some(tx)),
                committer: Mutex::new(Some(committer)),
            }),
        };
        Ok(journal)
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        lock(&self.shared.index)
    }

    /// The ids of messages stored from now on, in order (for the one
    /// delivery agent; `None` once taken).
    pub fn take_arrivals(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<QueueId>> {
        lock(&self.shared.arrivals_rx).take()
    }

    /// Every live message, oldest first, each read from the spool (for
    /// tests and inspection: it reads every envelope; see
    /// [`Journal::message`]).
    ///
    /// # Errors
    /// As [`Journal::message`]; a message retired meanwhile is left out.
    pub fn messages(&self) -> io::Result<Vec<SpooledMessage>> {
        let ids = self.ids();
        let mut out = Vec::with_capacity(ids.len());
        for id in &ids {
            out.extend(self.message(id)?);
        }
        Ok(out)
    }

    /// Whether `id` is a live message.
    pub fn contains(&self, id: &QueueId) -> bool {
        self.index().messages.contains_key(id)
    }

    /// The ids of the live messages, oldest first.
    pub fn ids(&self) -> Vec<QueueId> {
        self.index().messages.keys().cloned().collect()
    }

    /// Every live message's id and next attempt (Unix seconds; 0: not
    /// tried yet), for a scheduler to start from.
    pub fn due_times(&self) -> Vec<(QueueId, i64)> {
        self.index()
            .messages
            .iter()
            .map(|(id, m)| (id.clone(), m.next_attempt))
            .collect()
    }

    /// How many messages are queued, how many of them deferred, and the
    /// oldest.
    pub fn counts(&self) -> QueueCounts {
        let index = self.index();
        QueueCounts {
            messages: index.messages.len(),
            deferred: index.tried,
            oldest: index.messages.keys().next().cloned(),
        }
    }

    /// Reads a message's bytes, from wherever it is now (compaction may
    /// have moved it since `m` was taken). For tests and small messages:
    /// delivery streams them with [`Journal::open_body`].
    ///
    /// # Errors
    /// The segment cannot be read.
    pub fn body(&self, m: &SpooledMessage) -> io::Result<Vec<u8>> {
        self.open_body(m)?.read_all()
    }

    /// Opens a message's bytes for reading in pieces, from wherever it is
    /// now. What it returns holds its segments open: it reads the message
    /// whole even if compaction moves it and deletes them meanwhile.
    ///
    /// # Errors
    /// A segment cannot be opened or the message's record read.
    pub fn open_body(&self, m: &SpooledMessage) -> io::Result<SpooledBody> {
        let mut at = m.location;
        // A segment can go between the look-up and the read (its messages
        // were just moved): look again. Bounded: a move takes a whole
        // compaction step.
        for _ in 0..MOVES {
            if let Some(now) = self.index().messages.get(&m.id) {
                at = now.location;
            }
            match SpooledBody::open(&*self.shared.storage, &at) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                other => return other,
            }
        }
        SpooledBody::open(&*self.shared.storage, &at)
    }

    /// Starts a message that arrives in chunks (see [`MessageWriter`]).
    pub fn writer(&self, id: QueueId) -> MessageWriter {
        MessageWriter::new(self.clone(), id)
    }

    /// Hands a record to the committer; resolves once it is durable and
    /// in the index.
    async fn append(&self, payload: Vec<u8>, effect: Effect) -> io::Result<()> {
        self.hand_over(payload, effect)?
            .await
            .map_err(|_| stopped())?
            .map(|_| ())
    }

    /// Hands a record to the committer; the answer says where it went
    /// (segment, offset), once it is durable.
    fn hand_over(&self, payload: Vec<u8>, effect: Effect) -> io::Result<committer::Answer> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.send(Job::Append(Request {
            payload,
            effect,
            done: Some(done),
        }))?;
        Ok(wait)
    }

    fn send(&self, job: Job) -> io::Result<()> {
        lock(&self.shared.tx)
            .as_ref()
            .ok_or_else(stopped)?
            .send(job)
            .map_err(|_| stopped())
    }

    /// Waits until everything handed to the committer so far is durable
    /// and its housekeeping (compaction step, segment deletion) is done.
    #[cfg(test)]
    async fn settled(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.send(Job::Barrier(done)).is_ok() {
            let _ = wait.await;
        }
    }

    /// Records a message's delivery state: durable before it returns.
    ///
    /// # Errors
    /// The record could not be written and flushed.
    pub async fn record_state(&self, id: &QueueId, state: &DeliveryState) -> io::Result<()> {
        let payload = record::encode_state(id, state)?;
        self.append(payload, Effect::State(id.clone(), Schedule::of(state)))
            .await
    }

    /// One live message, its envelope and latest delivery state read from
    /// the spool (two small reads: the front of its record, and its latest
    /// state record); `None` if it is not (or no longer) in the spool.
    ///
    /// # Errors
    /// Its records cannot be read, or do not decode.
    pub fn message(&self, id: &QueueId) -> io::Result<Option<SpooledMessage>> {
        // As in `body`: a compaction may move it and delete the segment
        // read between the look-up and the read.
        let mut last = None;
        for _ in 0..MOVES {
            let Some(entry) = self.index().messages.get(id).copied() else {
                return Ok(None);
            };
            match lookup::load(&*self.shared.storage, id, &entry) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => last = Some(e),
                other => return other.map(Some),
            }
        }
        Err(last.unwrap_or_else(|| io::ErrorKind::NotFound.into()))
    }

    /// Retires a message (delivered or bounced): durable before it returns.
    ///
    /// # Errors
    /// The record could not be written and flushed.
    pub async fn retire(&self, id: &QueueId) -> io::Result<()> {
        self.append(record::encode_done(id), Effect::Retire(id.clone()))
            .await
    }
}

/// The spool's error for an I/O error.
fn spool_error(e: io::Error) -> SpoolError {
    if e.kind() == io::ErrorKind::StorageFull {
        SpoolError::Full(e)
    } else {
        SpoolError::Io(e)
    }
}

impl Spool for Journal {
    fn store(&self, id: QueueId, envelope: StoredEnvelope, message: Vec<u8>) -> StoreFuture<'_> {
        Box::pin(async move {
            if message.len() > CHUNK_SIZE {
                // One large record would be held whole by compaction and
                // delivery: stored in chunks as a session streams them.
                let mut writer = self.writer(id);
                let mut rest = message.as_slice();
                while rest.len() > CHUNK_SIZE {
                    let (chunk, after) = rest.split_at(CHUNK_SIZE);
                    writer.append(chunk.to_vec()).await?;
                    rest = after;
                }
                return writer.commit(envelope, Vec::new(), rest.to_vec()).await;
            }
            self.store_whole(id, envelope, &[], &message)
                .await
                .map_err(spool_error)
        })
    }

    fn begin(&self, id: QueueId) -> Box<dyn MessageSink> {
        Box::new(self.writer(id))
    }
}

impl Journal {
    /// Stores a message in one record: `head` then `body`.
    async fn store_whole(
        &self,
        id: QueueId,
        envelope: StoredEnvelope,
        head: &[u8],
        body: &[u8],
    ) -> io::Result<QueueId> {
        let payload = record::encode_message(&id, &envelope, head, body)?;
        let body_len = (head.len() + body.len()) as u64;
        let body_at = payload.len() as u64 - body_len;
        let effect = Effect::Store {
            id: id.clone(),
            body_at,
            body_len,
            spanned: None,
        };
        self.append(payload, effect).await?;
        let _ = self.shared.arrivals.send(id.clone());
        Ok(id)
    }
}
