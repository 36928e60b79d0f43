//! The journal spool: messages appended to segment files, many made
//! durable by one `fdatasync` (group commit).
//!
//! One committer thread owns the open segment. Sessions hand it records and
//! wait; it writes every record that arrived while the previous flush ran
//! in one `write`, flushes once with `sync_data`, and only then answers them
//! all. A new segment's directory entry is fsynced before any record in it
//! is acknowledged. A fresh file and an fsync per message cost about three
//! times as much disk time (see `shared/BASELINES.md`), and Postfix pays it.
//!
//! Layout under `DATA/spool/`: `NNNNNNNNNNNN.seg`, numbered in order. A
//! record is `len: u32 LE`, `crc32: u32 LE` (of the payload), then the
//! payload: a kind byte, the 20-byte queue id, and for a message the
//! envelope as JSON (length-prefixed) followed by the message. A `done`
//! record retires a message; a segment whose messages are all retired is
//! deleted. At start every segment is read back: a torn record at the end
//! of the newest segment (a crash mid-write, never acknowledged) is cut off.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::envelope::{QueueId, StoredEnvelope};
use crate::state::DeliveryState;
use crate::{Spool, SpoolError, StoreFuture};

/// A new segment is started past this size.
pub const SEGMENT_SIZE: u64 = 64 * 1024 * 1024;
/// The largest record read back: a 36 MB message and then some.
const MAX_RECORD: u32 = 256 * 1024 * 1024;
const KIND_MESSAGE: u8 = 1;
const KIND_DONE: u8 = 2;
const KIND_STATE: u8 = 3;
const ID_LEN: usize = 20;
const HEADER: usize = 8;

/// Where a message's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Location {
    segment: u64,
    /// Offset of the message body in the segment.
    offset: u64,
    len: u64,
}

/// A message in the spool.
#[derive(Debug, Clone)]
pub struct SpooledMessage {
    pub id: QueueId,
    pub envelope: StoredEnvelope,
    /// The latest recorded delivery state.
    pub state: DeliveryState,
    location: Location,
}

impl SpooledMessage {
    pub fn size(&self) -> u64 {
        self.location.len
    }
}

#[derive(Default)]
struct Index {
    messages: BTreeMap<QueueId, SpooledMessage>,
    /// Live messages per existing segment. Segments are deleted from the
    /// oldest on, once empty: a newer one may hold the `done` records that
    /// retire messages of an older one, so it must outlive them.
    live: BTreeMap<u64, HashSet<QueueId>>,
    current: u64,
}

struct Request {
    payload: Vec<u8>,
    done: tokio::sync::oneshot::Sender<io::Result<(u64, u64)>>,
}

struct Shared {
    dir: PathBuf,
    /// Every stored message's id, for delivery to pick up.
    arrivals: tokio::sync::mpsc::UnboundedSender<QueueId>,
    arrivals_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<QueueId>>>,
    index: Mutex<Index>,
    tx: Mutex<mpsc::Sender<Request>>,
}

/// The durable spool. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    shared: Arc<Shared>,
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:012}.seg"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// One record read back from a segment.
enum Record {
    Message {
        id: QueueId,
        envelope: Box<StoredEnvelope>,
        body_offset: u64,
        body_len: u64,
    },
    Done(QueueId),
    State(QueueId, DeliveryState),
}

fn encode_message(id: &QueueId, envelope: &StoredEnvelope, body: &[u8]) -> io::Result<Vec<u8>> {
    let env = serde_json::to_vec(envelope).map_err(io::Error::other)?;
    let env_len = u32::try_from(env.len()).map_err(io::Error::other)?;
    let mut p = Vec::with_capacity(HEADER + 1 + ID_LEN + 4 + env.len() + body.len());
    p.extend_from_slice(&[0; HEADER]);
    p.push(KIND_MESSAGE);
    p.extend_from_slice(id.as_str().as_bytes());
    p.extend_from_slice(&env_len.to_le_bytes());
    p.extend_from_slice(&env);
    p.extend_from_slice(body);
    Ok(p)
}

/// A record's buffer starts with `HEADER` bytes of room, filled in here
/// (length and CRC of what follows), so the payload is never copied.
fn seal(record: &mut [u8]) -> io::Result<()> {
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

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
}

fn decode(payload: &[u8], payload_offset: u64) -> Option<Record> {
    let (&kind, rest) = payload.split_first()?;
    let id = QueueId::parse(std::str::from_utf8(rest.get(..ID_LEN)?).ok()?)?;
    match kind {
        KIND_DONE => Some(Record::Done(id)),
        KIND_STATE => Some(Record::State(
            id,
            serde_json::from_slice(rest.get(ID_LEN..)?).ok()?,
        )),
        KIND_MESSAGE => {
            let env_len = u32_at(rest, ID_LEN)? as usize;
            let env_start = ID_LEN + 4;
            let envelope =
                serde_json::from_slice(rest.get(env_start..env_start + env_len)?).ok()?;
            let body_start = 1 + env_start + env_len;
            Some(Record::Message {
                id,
                envelope,
                body_offset: payload_offset + body_start as u64,
                body_len: (payload.len() - body_start) as u64,
            })
        }
        _ => None,
    }
}

/// Reads the records of one segment; returns them and the offset where
/// the last whole record ends.
fn read_segment(path: &Path) -> io::Result<(Vec<Record>, u64, u64)> {
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut records = Vec::new();
    let mut offset = 0u64;
    let mut header = [0u8; HEADER];
    loop {
        if offset + HEADER as u64 > size {
            break;
        }
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(&mut header)?;
        let (Some(len), Some(crc)) = (u32_at(&header, 0), u32_at(&header, 4)) else {
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
        match decode(&payload, offset + HEADER as u64) {
            Some(r) => records.push(r),
            None => break,
        }
        offset = end;
    }
    Ok((records, offset, size))
}

/// Segment numbers in `dir`, oldest first.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut found: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
        .collect();
    found.sort_unstable();
    Ok(found)
}

/// Reads a spool without changing it (for tests and inspection): every
/// live message with its envelope and body.
pub fn scan(data_dir: &Path) -> io::Result<Vec<(QueueId, StoredEnvelope, Vec<u8>)>> {
    let dir = data_dir.join("spool");
    Index::replay(&dir, false)?
        .messages
        .into_values()
        .map(|m| Ok((m.id, m.envelope, read_body(&dir, &m.location)?)))
        .collect()
}

fn read_body(dir: &Path, at: &Location) -> io::Result<Vec<u8>> {
    let mut body = vec![0u8; at.len as usize];
    File::open(segment_path(dir, at.segment))?.read_exact_at(&mut body, at.offset)?;
    Ok(body)
}

/// The delivery state of every live message (for tests and inspection),
/// as a restart would read it back. Reads without changing the spool.
pub fn scan_states(data_dir: &Path) -> io::Result<Vec<DeliveryState>> {
    let index = Index::replay(&data_dir.join("spool"), false)?;
    Ok(index.messages.into_values().map(|m| m.state).collect())
}

/// Bytes in the spool that are not whole, valid records (a torn write at
/// the end, or damage); 0 for a clean spool. Reads without changing it.
pub fn damaged_bytes(data_dir: &Path) -> io::Result<u64> {
    let dir = data_dir.join("spool");
    let mut bad = 0;
    for n in segments(&dir)? {
        let (_, good_end, size) = read_segment(&segment_path(&dir, n))?;
        bad += size - good_end;
    }
    Ok(bad)
}

impl Journal {
    /// Opens the spool under `data_dir/spool`, recovering every message
    /// that was acknowledged and not retired, and starts the committer.
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        Self::open_with(data_dir, SEGMENT_SIZE)
    }

    /// `open`, with segments rotated past `segment_size` bytes.
    pub fn open_with(data_dir: &Path, segment_size: u64) -> io::Result<Self> {
        let dir = data_dir.join("spool");
        fs::create_dir_all(&dir)?;
        let mut index = Index::replay(&dir, true)?;
        index.live.entry(index.current).or_default();
        index.delete_retired_segments(&dir);
        let current = index.current;
        let (tx, rx) = mpsc::channel();
        let (arrivals, arrivals_rx) = tokio::sync::mpsc::unbounded_channel();
        let writer = Committer::open(&dir, current, segment_size)?;
        std::thread::Builder::new()
            .name("ferry-spool-commit".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self {
            shared: Arc::new(Shared {
                dir,
                arrivals,
                arrivals_rx: Mutex::new(Some(arrivals_rx)),
                index: Mutex::new(index),
                tx: Mutex::new(tx),
            }),
        })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.shared.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ids of messages stored from now on, in order (for the one
    /// delivery agent; `None` once taken).
    pub fn take_arrivals(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<QueueId>> {
        self.shared
            .arrivals_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The live messages, oldest first.
    pub fn messages(&self) -> Vec<SpooledMessage> {
        self.index().messages.values().cloned().collect()
    }

    /// Reads a message's bytes.
    pub fn body(&self, m: &SpooledMessage) -> io::Result<Vec<u8>> {
        read_body(&self.shared.dir, &m.location)
    }

    async fn append(&self, payload: Vec<u8>) -> io::Result<(u64, u64)> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.shared
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Request { payload, done })
            .map_err(|_| io::Error::other("spool committer stopped"))?;
        wait.await
            .map_err(|_| io::Error::other("spool committer stopped"))?
    }

    /// Records a message's delivery state: durable before it returns.
    pub async fn record_state(&self, id: &QueueId, state: &DeliveryState) -> io::Result<()> {
        let mut payload = vec![0; HEADER];
        payload.push(KIND_STATE);
        payload.extend_from_slice(id.as_str().as_bytes());
        serde_json::to_writer(&mut payload, state).map_err(io::Error::other)?;
        let (segment, _) = self.append(payload).await?;
        let mut index = self.index();
        index.note_segment(segment);
        if let Some(m) = index.messages.get_mut(id) {
            m.state = state.clone();
        }
        Ok(())
    }

    /// One live message.
    pub fn message(&self, id: &QueueId) -> Option<SpooledMessage> {
        self.index().messages.get(id).cloned()
    }

    /// Retires a message (delivered or bounced): durable before it returns.
    pub async fn retire(&self, id: &QueueId) -> io::Result<()> {
        let mut payload = vec![0; HEADER];
        payload.push(KIND_DONE);
        payload.extend_from_slice(id.as_str().as_bytes());
        let (segment, _) = self.append(payload).await?;
        let mut index = self.index();
        index.note_segment(segment);
        if let Some(m) = index.messages.remove(id) {
            if let Some(set) = index.live.get_mut(&m.location.segment) {
                set.remove(id);
            }
        }
        index.delete_retired_segments(&self.shared.dir);
        Ok(())
    }
}

impl Index {
    /// Reads every segment back. With `repair`, a torn record at the end of
    /// the newest segment is cut off; without, nothing is changed.
    fn replay(dir: &Path, repair: bool) -> io::Result<Self> {
        let mut index = Index::default();
        let found = segments(dir)?;
        let newest = found.last().copied();
        for &n in &found {
            index.live.entry(n).or_default();
            let path = segment_path(dir, n);
            let (records, good_end, size) = read_segment(&path)?;
            if good_end < size && repair {
                if Some(n) == newest {
                    tracing::warn!(segment = %path.display(), cut = size - good_end, "cutting a torn record (never acknowledged) off the spool's end");
                    OpenOptions::new()
                        .write(true)
                        .open(&path)?
                        .set_len(good_end)?;
                } else {
                    tracing::error!(segment = %path.display(), offset = good_end, "spool segment damaged; later records in it are skipped");
                }
            }
            for r in records {
                index.apply(n, r);
            }
        }
        index.current = newest.unwrap_or(0);
        Ok(index)
    }

    /// One record read back from segment `n`.
    fn apply(&mut self, n: u64, record: Record) {
        match record {
            Record::Message {
                id,
                envelope,
                body_offset,
                body_len,
            } => {
                self.live.entry(n).or_default().insert(id.clone());
                let location = Location {
                    segment: n,
                    offset: body_offset,
                    len: body_len,
                };
                let state = DeliveryState::new(&envelope.rcpt_to);
                self.messages.insert(
                    id.clone(),
                    SpooledMessage {
                        id,
                        envelope: *envelope,
                        state,
                        location,
                    },
                );
            }
            Record::Done(id) => {
                if let Some(m) = self.messages.remove(&id) {
                    if let Some(set) = self.live.get_mut(&m.location.segment) {
                        set.remove(&id);
                    }
                }
            }
            Record::State(id, state) => {
                if let Some(m) = self.messages.get_mut(&id) {
                    m.state = state;
                }
            }
        }
    }

    /// A record landed in `segment` (which may be new).
    fn note_segment(&mut self, segment: u64) {
        self.current = self.current.max(segment);
        self.live.entry(segment).or_default();
    }

    /// Deletes empty segments from the oldest on, never the one written to.
    fn delete_retired_segments(&mut self, dir: &Path) {
        while let Some((&oldest, set)) = self.live.first_key_value() {
            if !set.is_empty() || oldest >= self.current {
                return;
            }
            self.live.remove(&oldest);
            let path = segment_path(dir, oldest);
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(segment = %path.display(), error = %e, "could not delete a retired segment");
                return;
            }
        }
    }
}

impl Spool for Journal {
    fn store(&self, id: QueueId, envelope: StoredEnvelope, message: Vec<u8>) -> StoreFuture<'_> {
        Box::pin(async move {
            let payload = encode_message(&id, &envelope, &message)?;
            let body_in_record = (payload.len() - message.len()) as u64;
            let len = message.len() as u64;
            drop(message);
            let (segment, record_offset) = self.append(payload).await.map_err(|e| {
                if e.kind() == io::ErrorKind::StorageFull {
                    SpoolError::Full(e)
                } else {
                    SpoolError::Io(e)
                }
            })?;
            let location = Location {
                segment,
                offset: record_offset + body_in_record,
                len,
            };
            let mut index = self.index();
            index.note_segment(segment);
            index.live.entry(segment).or_default().insert(id.clone());
            let state = DeliveryState::new(&envelope.rcpt_to);
            index.messages.insert(
                id.clone(),
                SpooledMessage {
                    id: id.clone(),
                    envelope,
                    state,
                    location,
                },
            );
            drop(index);
            let _ = self.shared.arrivals.send(id.clone());
            Ok(id)
        })
    }
}

/// Owns the segment being written.
struct Committer {
    dir: PathBuf,
    number: u64,
    file: File,
    size: u64,
    limit: u64,
}

impl Committer {
    fn open(dir: &Path, number: u64, limit: u64) -> io::Result<Self> {
        let path = segment_path(dir, number);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        sync_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            number,
            file,
            size,
            limit,
        })
    }

    fn run(mut self, rx: mpsc::Receiver<Request>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            // Everything that arrived while the last flush ran shares this one.
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let result = self.commit(&mut batch);
            for (req, r) in batch.into_iter().zip(result) {
                let _ = req.done.send(r);
            }
        }
    }

    /// Writes and flushes a batch; one result per request: the segment and
    /// the offset where its record starts.
    fn commit(&mut self, batch: &mut [Request]) -> Vec<io::Result<(u64, u64)>> {
        let count = batch.len();
        let fail = |e: &io::Error| {
            (0..count)
                .map(|_| Err(io::Error::new(e.kind(), e.to_string())))
                .collect()
        };
        if self.size >= self.limit {
            match Committer::open(&self.dir, self.number + 1, self.limit) {
                Ok(next) => *self = next,
                Err(e) => return fail(&e),
            }
        }
        let mut places = Vec::with_capacity(batch.len());
        let mut end = self.size;
        let mut written = Ok(());
        for req in batch.iter_mut() {
            match seal(&mut req.payload) {
                Ok(()) if written.is_ok() => {
                    written = self.file.write_all(&req.payload);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(n: usize) -> StoredEnvelope {
        StoredEnvelope {
            mail_from: format!("a{n}@x.test").parse().unwrap(),
            rcpt_to: vec!["b@y.test".parse().unwrap()],
            client_ip: "127.0.0.1".into(),
            helo: "dev".into(),
            connector: "Default".into(),
            user: None,
            received_at: 0,
            body_8bit: false,
            smtputf8: false,
            session_id: "S1".into(),
            message_id: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_stores_share_flushes_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut tasks = Vec::new();
        for n in 0..200 {
            let j = j.clone();
            tasks.push(tokio::spawn(async move {
                let body = format!("Subject: {n}\r\n\r\n{}\r\n", "x".repeat(n * 10)).into_bytes();
                j.store(QueueId::new(), envelope(n), body).await.unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let all = j.messages();
        assert_eq!(all.len(), 200);
        for m in &all {
            let body = j.body(m).unwrap();
            let n: usize = m.envelope.mail_from.to_string()[1..]
                .split('@')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(
                body,
                format!("Subject: {n}\r\n\r\n{}\r\n", "x".repeat(n * 10)).into_bytes()
            );
        }
    }

    #[tokio::test]
    async fn recovery_keeps_live_drops_retired_and_cuts_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let a = j
            .store(QueueId::new(), envelope(1), b"one\r\n".to_vec())
            .await
            .unwrap();
        let b = j
            .store(QueueId::new(), envelope(2), b"two\r\n".to_vec())
            .await
            .unwrap();
        j.retire(&a).await.unwrap();
        drop(j);
        // A crash in the middle of a write leaves half a record.
        let seg = segment_path(&dir.path().join("spool"), 0);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 1, 2]).unwrap();
        drop(f);

        let j = Journal::open(dir.path()).unwrap();
        let live = j.messages();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].id, b);
        assert_eq!(j.body(&live[0]).unwrap(), b"two\r\n");
        // New writes land after the cut and are read back too.
        let c = j
            .store(QueueId::new(), envelope(3), b"three\r\n".to_vec())
            .await
            .unwrap();
        drop(j);
        let scanned: Vec<QueueId> = scan(dir.path())
            .unwrap()
            .into_iter()
            .map(|(id, _, _)| id)
            .collect();
        assert_eq!(scanned, vec![b, c]);
    }

    #[tokio::test]
    async fn retired_segments_are_deleted_oldest_first_and_stay_retired() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let j = Journal::open_with(dir.path(), 1000).unwrap();
        let mut ids = Vec::new();
        for n in 0..6 {
            ids.push(
                j.store(QueueId::new(), envelope(n), vec![b'x'; 900])
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(segments(&spool).unwrap(), vec![0, 1, 2, 3, 4, 5]);
        // Segments 1-3 empty out while 0 still holds a live message: they
        // stay, since they come after it.
        for id in &ids[1..4] {
            j.retire(id).await.unwrap();
        }
        // The done records went to a new segment 6.
        assert_eq!(segments(&spool).unwrap(), vec![0, 1, 2, 3, 4, 5, 6]);
        j.retire(&ids[0]).await.unwrap();
        assert_eq!(segments(&spool).unwrap(), vec![4, 5, 6]);
        drop(j);
        let j = Journal::open_with(dir.path(), 1000).unwrap();
        let live: Vec<QueueId> = j.messages().into_iter().map(|m| m.id).collect();
        assert_eq!(live, ids[4..].to_vec());
    }

    #[tokio::test]
    async fn delivery_state_survives_a_restart() {
        use crate::state::{RecipientState, RecipientStatus};
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut env = envelope(1);
        env.rcpt_to = vec!["a@y.test".parse().unwrap(), "b@y.test".parse().unwrap()];
        let id = j
            .store(QueueId::new(), env, b"m\r\n".to_vec())
            .await
            .unwrap();
        let mut state = j.message(&id).unwrap().state;
        assert_eq!(state.pending().count(), 2);
        state.recipients[0].state = RecipientState::Delivered {
            next_hop: "127.0.0.1:25".into(),
            reply: "250 ok".into(),
        };
        state.recipients[1].state = RecipientState::Deferred {
            reply: "451 later".into(),
        };
        state.attempts = 1;
        state.next_attempt = 1234;
        j.record_state(&id, &state).await.unwrap();
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        let m = j.message(&id).unwrap();
        assert_eq!(m.state, state);
        let pending: Vec<&RecipientStatus> = m.state.pending().collect();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].address.to_string(), "b@y.test");
    }

    #[tokio::test]
    async fn corrupt_record_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.store(QueueId::new(), envelope(1), b"one\r\n".to_vec())
            .await
            .unwrap();
        drop(j);
        let seg = segment_path(&dir.path().join("spool"), 0);
        let mut bytes = fs::read(&seg).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&seg, bytes).unwrap();
        assert!(Journal::open(dir.path()).unwrap().messages().is_empty());
    }
}
