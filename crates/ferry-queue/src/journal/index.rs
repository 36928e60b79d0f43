//! What the spool holds, in memory: every live message and where it is,
//! and per segment which live messages it holds. Only the committer
//! thread changes it once the journal is open, in the order its records
//! reach the disk, so the index always says what a restart would read.

use std::collections::{BTreeMap, HashSet};
use std::io;

use super::record::Record;
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
    /// The live messages whose record is in this segment.
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
                index.apply(n, at, len, r);
            }
        }
        index.current = newest.unwrap_or(0);
        index.segments.entry(index.current).or_default();
        Ok(index)
    }

    /// One record read back: `len` bytes at `at` in segment `n`.
    fn apply(&mut self, n: u64, at: u64, len: u64, record: Record) {
        match record {
            Record::Message {
                id,
                envelope,
                state,
                body_offset,
                body_len,
            } => {
                let state = state.unwrap_or_else(|| DeliveryState::new(&envelope.rcpt_to));
                let location = Location {
                    segment: n,
                    record: at,
                    record_len: len,
                    offset: body_offset,
                    len: body_len,
                };
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
        let info = self.segments.entry(m.location.segment).or_default();
        info.live.insert(m.id.clone());
        info.live_bytes += m.location.record_len;
        self.messages.insert(m.id.clone(), m);
    }

    /// Takes a message out of its segment's live set.
    fn unlink(&mut self, id: &QueueId) {
        if let Some(old) = self.messages.get(id) {
            if let Some(info) = self.segments.get_mut(&old.location.segment) {
                if info.live.remove(id) {
                    info.live_bytes = info.live_bytes.saturating_sub(old.location.record_len);
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
    /// to, out of the index; the caller deletes their files in this order.
    pub fn take_retired_segments(&mut self) -> Vec<(u64, SegmentInfo)> {
        let mut out = Vec::new();
        while let Some(entry) = self.segments.first_entry() {
            if !entry.get().live.is_empty() || *entry.key() >= self.current {
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
        victims.sort_by_key(|m| m.location.record);
        let mut taken = 0u64;
        let plan = victims
            .into_iter()
            .take_while(|m| {
                let first = taken == 0;
                taken += m.location.record_len;
                first || taken <= budget
            })
            .cloned()
            .collect();
        Some((oldest, plan))
    }
}
