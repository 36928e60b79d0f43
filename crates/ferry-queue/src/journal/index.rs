//! What the spool holds, in memory: for every live message only what
//! scheduling and the spool's housekeeping need (its id, its next attempt,
//! where its record and its latest state record are), and per segment how
//! many live messages it holds and their bytes. The envelope and the
//! per-recipient state stay on disk and are read back when an attempt or
//! an administrator needs them ([`super::lookup`]): a message costs the
//! index 100 bytes (under 200 with the B-tree's half-full nodes), not the
//! kilobytes of its envelope and state, so a next hop down for a day does not fill the worker's memory
//! (Postfix likewise keeps only a bounded active queue in memory).
//!
//! Only the committer thread changes the index once the journal is open,
//! in the order its records reach the disk, so the index always says what
//! a restart would read.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::num::NonZeroU32;

use super::record::{Piece, Record, CHUNK_BODY_AT};
use super::storage::Storage;
use super::{read_segment, segment_name, segments, Location, SegmentScan};
use crate::envelope::QueueId;
use crate::state::DeliveryState;

/// Compaction waits until the oldest live segment has this many newer
/// ones behind it (see [`Index::compaction_plan`]).
pub(super) const COMPACT_SPAN: u64 = 4;

/// One segment file.
#[derive(Debug, Default)]
pub(super) struct SegmentInfo {
    /// How many live messages have a record in this segment (a message in
    /// chunks counts in every segment from its first chunk's to its commit
    /// record's).
    pub live: usize,
    /// Their records' bytes.
    pub live_bytes: u64,
    /// Bytes in the file.
    pub size: u64,
}

/// Where a `state` record is: the whole record, header included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StateAt {
    pub segment: u64,
    pub record: u64,
    /// Never 0 (a record has a header), which keeps `Option<StateAt>` as
    /// small as `StateAt`.
    pub len: NonZeroU32,
}

/// A live message, as the index holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry {
    /// Its `message` or `copy` record: envelope and body (and for a copy
    /// the delivery state it had when it was copied).
    pub location: Location,
    /// Its latest `state` record; `None` while the state is the one in its
    /// record (a copy's) or, never tried, the first one.
    pub state: Option<StateAt>,
    /// Unix seconds of the next attempt, as its latest state says.
    pub next_attempt: i64,
    /// Tried at least once (deferred rather than new).
    pub tried: bool,
}

/// What the latest state of a message says that the index keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Schedule {
    pub next_attempt: i64,
    pub tried: bool,
}

impl Schedule {
    pub fn of(state: &DeliveryState) -> Self {
        Schedule {
            next_attempt: state.next_attempt,
            tried: state.attempts > 0,
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Index {
    pub messages: BTreeMap<QueueId, Entry>,
    /// Every segment on disk. Segments are deleted from the oldest on,
    /// once empty: a newer one may hold the `done` records that retire
    /// messages of an older one, so it must outlive them. (A message's
    /// `state` records are never older than its record, so they too stay
    /// as long as it does; once a compaction copy carries the state, the
    /// older ones are not needed.)
    pub segments: BTreeMap<u64, SegmentInfo>,
    /// The segment written to.
    pub current: u64,
    /// Live messages tried at least once.
    pub tried: usize,
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
            let SegmentScan { good_end, size } = match read_segment(storage, &name, |at, len, r| {
                index.apply(n, at, len, r, &mut chunks)
            }) {
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
        }
        index.current = newest.unwrap_or(0);
        index.segments.entry(index.current).or_default();
        Ok(index)
    }

    /// One record read back: `len` bytes at `at` in segment `n`. Of the
    /// envelope and state it holds, only the schedule stays. A chunk only
    /// goes into `seen`: a message's chunks mean nothing until its commit
    /// record, and those of a message never committed nothing at all.
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
                // Decoded only to know that it reads back (a record that
                // does not is skipped); the index keeps none of it.
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
                drop(envelope);
                let mut location = Location::whole(n, at, len, body_offset, body_len);
                if let Some(first) = chunks.first() {
                    location.first_segment = first.segment;
                    location.before_tail = before_tail;
                }
                let schedule = state.as_ref().map(Schedule::of).unwrap_or_default();
                self.insert(id, location, schedule);
            }
            Record::Done(id) => self.remove(&id),
            Record::State(id, state) => {
                if let Some(at) = state_at(n, at, len) {
                    self.set_state(&id, at, Schedule::of(&state));
                }
            }
        }
    }

    /// Adds a message whose record is at `location` with the state in that
    /// record (a compaction copy's, or the first one), or moves it there.
    pub fn insert(&mut self, id: QueueId, location: Location, schedule: Schedule) {
        self.unlink(&id);
        for n in location.segments() {
            let info = self.segments.entry(n).or_default();
            info.live += 1;
            info.live_bytes += bytes_in(&location, n);
        }
        self.tried += usize::from(schedule.tried);
        self.messages.insert(
            id,
            Entry {
                location,
                state: None,
                next_attempt: schedule.next_attempt,
                tried: schedule.tried,
            },
        );
    }

    /// Takes a message out of its segments' counts (and out of `tried`).
    fn unlink(&mut self, id: &QueueId) {
        if let Some(old) = self.messages.get(id) {
            for n in old.location.segments() {
                if let Some(info) = self.segments.get_mut(&n) {
                    info.live = info.live.saturating_sub(1);
                    info.live_bytes = info.live_bytes.saturating_sub(bytes_in(&old.location, n));
                }
            }
            self.tried -= usize::from(old.tried);
        }
    }

    pub fn remove(&mut self, id: &QueueId) {
        self.unlink(id);
        self.messages.remove(id);
    }

    /// A message's latest state is the `state` record at `at`.
    pub fn set_state(&mut self, id: &QueueId, at: StateAt, schedule: Schedule) {
        if let Some(m) = self.messages.get_mut(id) {
            self.tried = self.tried - usize::from(m.tried) + usize::from(schedule.tried);
            m.state = Some(at);
            m.next_attempt = schedule.next_attempt;
            m.tried = schedule.tried;
        }
    }

    /// Moves a live message's record (its compaction copy, which carries
    /// its state, is durable).
    pub fn relocate(&mut self, id: &QueueId, location: Location) {
        let Some(m) = self.messages.get(id).copied() else {
            return;
        };
        let schedule = Schedule {
            next_attempt: m.next_attempt,
            tried: m.tried,
        };
        self.insert(id.clone(), location, schedule);
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
            if entry.get().live > 0 || *entry.key() >= keep_from {
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
    ///
    /// The index keeps no list of each segment's messages (it would cost
    /// as much again as the entries): a due plan looks through them all,
    /// which only happens while a compaction is due.
    pub fn compaction_plan(&self, budget: u64) -> Option<(u64, Vec<(QueueId, Entry)>)> {
        let (&oldest, info) = self.segments.first_key_value()?;
        if info.live == 0 || self.current.saturating_sub(oldest) < COMPACT_SPAN {
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
        let mut victims: Vec<(&QueueId, &Entry)> = self
            .messages
            .iter()
            .filter(|(_, m)| m.location.segments().contains(&oldest))
            .collect();
        victims.sort_by_key(|(_, m)| (m.location.segment, m.location.record));
        let mut taken = 0u64;
        let plan = victims
            .into_iter()
            .take_while(|(_, m)| {
                let first = taken == 0;
                taken += m.location.stored_len();
                first || taken <= budget
            })
            .map(|(id, m)| (id.clone(), *m))
            .collect();
        Some((oldest, plan))
    }
}

/// Where a `state` record of `len` bytes at `at` in segment `n` is; `None`
/// for a length no record has (never, for a record read back or written).
pub(super) fn state_at(n: u64, at: u64, len: u64) -> Option<StateAt> {
    Some(StateAt {
        segment: n,
        record: at,
        len: NonZeroU32::new(u32::try_from(len).ok()?)?,
    })
}

/// The bytes a message keeps in segment `n`: its chunks counted in the
/// first chunk's segment (close enough for when compaction is due), its
/// record in its own.
fn bytes_in(at: &Location, n: u64) -> u64 {
    let mut bytes = 0;
    if n == at.first_segment {
        bytes += at.before_tail;
    }
    if n == at.segment {
        bytes += at.record_len;
    }
    bytes
}
