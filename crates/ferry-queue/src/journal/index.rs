//! What the spool holds, in memory: every live message and where it is,
//! and per segment which live messages it holds. Only the committer
//! thread changes it once the journal is open, in the order its records
//! reach the disk, so the index always says what a restart would read.

use std::collections::{BTreeMap, HashSet};
use std::io;

use super::record::{Piece, Record, CHUNK_BODY_AT};
use super::storage::Storage;
use super::{read_segment, segment_name, segments, Location, SegmentScan, SpooledMessage};
use crate::envelope::QueueId;
use crate::state::DeliveryState;

/// Compaction waits until the oldest live segment has this many newer
/// ones behind it (see [`Index::compaction_plan`]).
pub(super) const COMPACT_SPAN: u64 = 4;

/// One segment file.
#[derive(Debug, Default)]
pub(super) struct SegmentInfo {
    /// The live messages with a record in this segment (a message in
    /// chunks counts in every segment from its first chunk's to its
    /// commit record's).
    pub live: HashSet<QueueId>,
    /// Their records' bytes.
    pub live_bytes: u64,
    /// Bytes in the file.
    pub size: u64,
}

#[derive(Debug, Default)]
pub(super) struct Index {
    pub messages: BTreeMap<QueueId, SpooledMessage>,
    /// Every segment on disk. Segments are deleted from the oldest on,
    /// once empty: a newer one may hold the `done` records that retire
    /// messages of an older one, so it must outlive them.
    pub segments: BTreeMap<u64, SegmentInfo>,
    /// The segment written to.
    pub current: u64,
}

impl Index {
    /// Reads every segment back. With `repair`, a torn record at the end of
    /// the newest segment is cut off; without, nothing is changed.
    pub fn replay(storage: &dyn Storage, repair: bool) -> io::Result<Self> {
        let mut index = Index::default();
        // Every chunk read back, so that a commit naming one that is not
        // there (damage) is seen here rather than at delivery.
        let mut chunks = HashSet::new();
        let found = segments(storage)?;
        let newest = found.last().copied();
        for &n in &found {
            let name = segment_name(n);
            let SegmentScan {
                records,
                good_end,
                size,
            } = match read_segment(storage, &name) {
                // Deleted since the listing by the journal that runs (an
                // inspection while it works): it held nothing live.
                Err(e) if e.kind() == io::ErrorKind::NotFound && !repair => continue,
                other => other?,
            };
            let mut kept = size;
            if good_end < size && repair {
                if Some(n) == newest {
                    tracing::warn!(
                        segment = name,
                        cut = size - good_end,
                        "cutting a torn record (never acknowledged) off the spool's end"
                    );
                    storage.open_append(&name)?.set_len(good_end)?;
                    kept = good_end;
                } else {
                    tracing::error!(
                        segment = name,
                        offset = good_end,
                        "spool segment damaged; later records in it are skipped"
                    );
                }
            }
            index.note_segment(n, kept);
            for (at, len, r) in records {
                index.apply(n, at, len, r, &mut chunks);
            }
        }
        index.current = newest.unwrap_or(0);
        index.segments.entry(index.current).or_default();
        Ok(index)
    }

    /// One record read back: `len` bytes at `at` in segment `n`. A chunk
    /// only goes into `seen`: a message's chunks mean nothing until its
    /// commit record, and those of a message never committed nothing at
    /// all.
    fn apply(&mut self, n: u64, at: u64, len: u64, record: Record, seen: &mut HashSet<Piece>) {
        match record {
            Record::Chunk => {
                seen.insert(Piece {
                    segment: n,
                    offset: at + CHUNK_BODY_AT,
                    len: u32::try_from(len.saturating_sub(CHUNK_BODY_AT)).unwrap_or(u32::MAX),
                });
            }
            Record::Message {
                id,
                envelope,
                state,
                body_offset,
                body_len,
                chunks,
                before_tail,
            } => {
                if let Some(c) = chunks.iter().find(|c| !seen.contains(c)) {
                    tracing::error!(
                        queue_id = %id,
                        segment = c.segment,
                        offset = c.offset,
                        "a message's chunk is not in the spool (damaged); the message is skipped"
                    );
                    return;
                }
                let state = state.unwrap_or_else(|| DeliveryState::new(&envelope.rcpt_to));
                let mut location = Location::whole(n, at, len, body_offset, body_len);
                if let Some(first) = chunks.first() {
                    location.first_segment = first.segment;
                    location.before_tail = before_tail;
                }
                self.insert(SpooledMessage {
                    id,
                    envelope,
                    state,
                    location,
                });
            }
            Record::Done(id) => self.remove(&id),
            Record::State(id, state) => self.set_state(&id, state),
        }
    }

    /// Adds a message, or moves it where `m` says (a compaction copy).
    pub fn insert(&mut self, m: SpooledMessage) {
        self.unlink(&m.id);
        let at = m.location;
        for n in at.segments() {
            let info = self.segments.entry(n).or_default();
            info.live.insert(m.id.clone());
            // Chunk bytes counted in the first chunk's segment: close
            // enough for when compaction is due.
            if n == at.first_segment {
                info.live_bytes += at.before_tail;
            }
            if n == at.segment {
                info.live_bytes += at.record_len;
            }
        }
        self.messages.insert(m.id.clone(), m);
    }

    /// Takes a message out of its segments' live sets.
    fn unlink(&mut self, id: &QueueId) {
        let Some(at) = self.messages.get(id).map(|m| m.location) else {
            return;
        };
        for n in at.segments() {
            if let Some(info) = self.segments.get_mut(&n) {
                if info.live.remove(id) {
                    let mut bytes = 0;
                    if n == at.first_segment {
                        bytes += at.before_tail;
                    }
                    if n == at.segment {
                        bytes += at.record_len;
                    }
                    info.live_bytes = info.live_bytes.saturating_sub(bytes);
                }
            }
        }
    }

    pub fn remove(&mut self, id: &QueueId) {
        self.unlink(id);
        self.messages.remove(id);
    }

    pub fn set_state(&mut self, id: &QueueId, state: DeliveryState) {
        if let Some(m) = self.messages.get_mut(id) {
            m.state = state;
        }
    }

    /// Moves a live message's location (its compaction copy is durable).
    pub fn relocate(&mut self, id: &QueueId, location: Location) {
        let Some(mut m) = self.messages.get(id).cloned() else {
            return;
        };
        m.location = location;
        self.insert(m);
    }

    /// Segment `n` exists and is at least `end` bytes long.
    pub fn note_segment(&mut self, n: u64, end: u64) {
        self.current = self.current.max(n);
        let info = self.segments.entry(n).or_default();
        info.size = info.size.max(end);
    }

    /// Takes the empty segments from the oldest on, never the one written
    /// to nor any from `keep_from` on (chunks of messages still arriving),
    /// out of the index; the caller deletes their files in this order.
    pub fn take_retired_segments(&mut self, keep_from: Option<u64>) -> Vec<(u64, SegmentInfo)> {
        let keep_from = keep_from.unwrap_or(self.current).min(self.current);
        let mut out = Vec::new();
        while let Some(entry) = self.segments.first_entry() {
            if !entry.get().live.is_empty() || *entry.key() >= keep_from {
                break;
            }
            out.push(entry.remove_entry());
        }
        out
    }

    /// Puts back segments whose files could not be deleted.
    pub fn restore_segments(&mut self, back: impl IntoIterator<Item = (u64, SegmentInfo)>) {
        self.segments.extend(back);
    }

    /// Which live messages to re-append now, up to `budget` bytes of
    /// records (at least one), all from the oldest segment; `None` when
    /// compaction is not due.
    ///
    /// Due when the oldest segment holding live messages has at least
    /// [`COMPACT_SPAN`] newer segments behind it *and* at least half the
    /// bytes of the closed segments are dead (retired messages, old states,
    /// `done` records). The span keeps ordinary churn (mail that leaves
    /// within a segment or two) from ever being copied; the half rule
    /// keeps a real backlog (a next hop down for a day: everything live)
    /// from being rewritten over and over, and bounds the cost: a pass
    /// copies at most the live bytes to free at least as many dead ones.
    /// So the spool on disk stays under about twice its live data plus
    /// `COMPACT_SPAN + 1` segments, whatever a few old messages do.
    pub fn compaction_plan(&self, budget: u64) -> Option<(u64, Vec<SpooledMessage>)> {
        let (&oldest, info) = self.segments.first_key_value()?;
        if info.live.is_empty() || self.current.saturating_sub(oldest) < COMPACT_SPAN {
            return None;
        }
        let (closed, live) = self
            .segments
            .range(..self.current)
            .fold((0u64, 0u64), |(c, l), (_, s)| {
                (c + s.size, l + s.live_bytes)
            });
        if closed < live.saturating_mul(2) {
            return None;
        }
        let mut victims: Vec<&SpooledMessage> = info
            .live
            .iter()
            .filter_map(|id| self.messages.get(id))
            .collect();
        victims.sort_by_key(|m| (m.location.segment, m.location.record));
        let mut taken = 0u64;
        let plan = victims
            .into_iter()
            .take_while(|m| {
                let first = taken == 0;
                taken += m.location.stored_len();
                first || taken <= budget
            })
            .cloned()
            .collect();
        Some((oldest, plan))
    }
}
