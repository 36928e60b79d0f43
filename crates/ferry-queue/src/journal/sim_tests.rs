//! The journal on a simulated disk (`sim`): random workloads (stores,
//! messages streamed in chunks that interleave with each other and cross
//! segments, messages abandoned mid-way, delivery states, retirements, in
//! batches; segments small enough that they roll over and get compacted),
//! a crash at a random operation, and after each the rule the spool exists
//! for: every message whose store returned is back, byte for byte, with its
//! envelope and its latest acknowledged delivery state; nothing retired or
//! abandoned comes back; and of what was in flight (handed to the
//! committer, never answered) each record is there or not, in the order
//! written, never damaged or in part.
//!
//! Each seed is a run of its own; a run tries as many as fit its time
//! budget. A failure names its seed, and `FERRY_SIM_SEED=N` replays that
//! one run (the disk's every operation printed).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng as StdRng;
use rand::{Rng, SeedableRng};

use super::sim::{CrashStats, Image, SimDisk};
use super::*;
use crate::state::RecipientState;

/// How long one test run tries seeds (`FERRY_SIM_SECONDS` to change it),
/// and at most how many in that time.
const BUDGET: Duration = Duration::from_secs(20);
const MAX_SEEDS_PER_SECOND: u64 = 250;
/// Rounds of the workload before a crash that has not come yet is forced.
const MAX_ROUNDS: usize = 80;

const REPLAY: &str = "cargo test -p ferry-queue --lib journal::sim_tests -- --nocapture";

/// A live message as the spool should hold it.
#[derive(Debug, Clone, PartialEq)]
struct Msg {
    envelope: StoredEnvelope,
    body: Vec<u8>,
    state: DeliveryState,
}

type Spooled = BTreeMap<QueueId, Msg>;

/// One operation of the workload. (A few per round: their size costs
/// nothing.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Op {
    Store(QueueId, StoredEnvelope, Vec<u8>),
    /// A message streamed in chunks: its head, chunks and tail.
    Chunked(QueueId, StoredEnvelope, Chunked),
    /// Chunks of a message whose writer is dropped before its commit.
    Abandon(QueueId, Vec<Vec<u8>>),
    State(QueueId, DeliveryState),
    Retire(QueueId),
}

#[derive(Debug, Clone)]
struct Chunked {
    head: Vec<u8>,
    chunks: Vec<Vec<u8>>,
    tail: Vec<u8>,
}

impl Chunked {
    fn body(&self) -> Vec<u8> {
        let mut b = self.head.clone();
        for c in &self.chunks {
            b.extend_from_slice(c);
        }
        b.extend_from_slice(&self.tail);
        b
    }
}

impl Op {
    /// The operation in a few words.
    fn describe(&self) -> String {
        match self {
            Op::Store(id, env, body) => {
                format!(
                    "store {id}: {} bytes to {} recipients",
                    body.len(),
                    env.rcpt_to.len()
                )
            }
            Op::Chunked(id, _, c) => format!(
                "store {id} in {} chunks: {} bytes",
                c.chunks.len(),
                c.body().len()
            ),
            Op::Abandon(id, chunks) => format!("abandon {id} after {} chunks", chunks.len()),
            Op::State(id, state) => format!("state {id}: attempt {}", state.attempts),
            Op::Retire(id) => format!("retire {id}"),
        }
    }

    fn apply(&self, s: &mut Spooled) {
        match self {
            Op::Store(id, envelope, body) => {
                s.insert(
                    id.clone(),
                    Msg {
                        state: DeliveryState::new(&envelope.rcpt_to),
                        envelope: envelope.clone(),
                        body: body.clone(),
                    },
                );
            }
            Op::Chunked(id, envelope, c) => {
                s.insert(
                    id.clone(),
                    Msg {
                        state: DeliveryState::new(&envelope.rcpt_to),
                        envelope: envelope.clone(),
                        body: c.body(),
                    },
                );
            }
            Op::Abandon(..) => {}
            Op::State(id, state) => {
                if let Some(m) = s.get_mut(id) {
                    m.state = state.clone();
                }
            }
            Op::Retire(id) => {
                s.remove(id);
            }
        }
    }

    /// Hands the operation to the journal (a chunked one's commit to its
    /// `writer`, whose chunks are durable); the future resolves with its
    /// answer.
    fn submit<'a>(
        &self,
        j: &'a Journal,
        writer: Option<MessageWriter>,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + 'a>> {
        let text = |e: &dyn std::fmt::Display| e.to_string();
        match self.clone() {
            Op::Chunked(_, env, c) => Box::pin(async move {
                let w = writer.ok_or("no writer")?;
                w.commit(env, c.head, c.tail)
                    .await
                    .map(|_| ())
                    .map_err(|e| text(&e))
            }),
            Op::Abandon(..) => Box::pin(async { Err("abandoned".to_string()) }),
            Op::Store(id, env, body) => Box::pin(async move {
                j.store(id, env, body)
                    .await
                    .map(|_| ())
                    .map_err(|e| text(&e))
            }),
            Op::State(id, state) => {
                Box::pin(async move { j.record_state(&id, &state).await.map_err(|e| text(&e)) })
            }
            Op::Retire(id) => Box::pin(async move { j.retire(&id).await.map_err(|e| text(&e)) }),
        }
    }
}

/// What the runs reached, added up (to show every case was).
#[derive(Debug, Default)]
struct Coverage {
    seeds: u64,
    disk: CrashStats,
    rounds: u64,
    acknowledged: u64,
    /// Crashes with records in flight after which some came back / none.
    in_flight_kept: u64,
    in_flight_lost: u64,
    /// Crashes in a round that ran a compaction step; while opening.
    during_compaction: u64,
    during_recovery: u64,
    /// The most segments a run's spool had at once.
    max_segments: usize,
    /// Messages in chunks acknowledged; of them, with chunks in more than
    /// one segment; moved by compaction; writers abandoned.
    chunked: u64,
    chunked_across_segments: u64,
    chunked_moved: u64,
    abandoned: u64,
}

impl Coverage {
    fn merge(&mut self, o: &Coverage) {
        self.seeds += o.seeds;
        self.add_disk(o.disk);
        self.rounds += o.rounds;
        self.acknowledged += o.acknowledged;
        self.in_flight_kept += o.in_flight_kept;
        self.in_flight_lost += o.in_flight_lost;
        self.during_compaction += o.during_compaction;
        self.during_recovery += o.during_recovery;
        self.max_segments = self.max_segments.max(o.max_segments);
        self.chunked += o.chunked;
        self.chunked_across_segments += o.chunked_across_segments;
        self.chunked_moved += o.chunked_moved;
        self.abandoned += o.abandoned;
    }

    fn add_disk(&mut self, s: CrashStats) {
        let d = &mut self.disk;
        d.crashes += s.crashes;
        d.lost_writes += s.lost_writes;
        d.kept_writes += s.kept_writes;
        d.torn_writes += s.torn_writes;
        d.zeroed_writes += s.zeroed_writes;
        d.lost_creates += s.lost_creates;
        d.undone_removes += s.undone_removes;
    }
}

/// A few envelopes per run (made from their stored form, which is slow
/// unoptimised); each store takes one and changes what varies per message.
fn envelopes(rng: &mut StdRng) -> Vec<StoredEnvelope> {
    (0..8).map(|n| envelope(rng, n)).collect()
}

fn envelope(rng: &mut StdRng, n: u64) -> StoredEnvelope {
    let rcpts: BTreeSet<String> = (0..rng.random_range(1..=3))
        .map(|_| {
            format!(
                "r{}@d{}.test",
                rng.random_range(0..5),
                rng.random_range(0..2)
            )
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "mail_from": if rng.random_bool(0.1) { String::new() } else { format!("s{n}@x.test") },
        "rcpt_to": rcpts,
        "client_ip": format!("127.0.0.{}", rng.random_range(1..255)),
        "helo": "sim",
        "connector": "Default",
        "user": rng.random_bool(0.2).then_some("üser"),
        "received_at": rng.random_range(0..2_000_000_000i64),
        "body_8bit": rng.random_bool(0.5),
        "smtputf8": rng.random_bool(0.1),
        "session_id": format!("S{}", rng.random_range(0..1000)),
        "message_id": rng.random_bool(0.5).then(|| format!("<{n}@x.test>")),
    }))
    .unwrap()
}

/// Any bytes, mostly a few hundred, sometimes more than a segment.
fn body(rng: &mut StdRng) -> Vec<u8> {
    let len = match rng.random_range(0..20) {
        0..=13 => rng.random_range(0..300),
        14..=18 => rng.random_range(300..3000),
        _ => rng.random_range(3000..20_000),
    };
    let mut b = vec![0u8; len];
    rng.fill(&mut b[..]);
    b
}

/// Bytes cut into a head, 1 to 6 chunks and a tail.
fn chunked(rng: &mut StdRng) -> Chunked {
    let part = |rng: &mut StdRng, max: usize| {
        let mut b = vec![0u8; rng.random_range(0..max)];
        rng.fill(&mut b[..]);
        b
    };
    Chunked {
        head: part(rng, 200),
        chunks: (0..rng.random_range(1..=6))
            .map(|_| part(rng, 4000))
            .collect(),
        tail: part(rng, 300),
    }
}

/// A later delivery state: some pending recipients move on.
fn next_state(rng: &mut StdRng, state: &DeliveryState) -> DeliveryState {
    let mut s = state.clone();
    for r in s.recipients.iter_mut().filter(|r| r.state.is_pending()) {
        r.state = match rng.random_range(0..4) {
            0 => continue,
            1 => RecipientState::Delivered {
                next_hop: format!("127.0.0.{}:25", rng.random_range(1..9)),
                reply: "250 2.0.0 ok".into(),
            },
            2 => RecipientState::Deferred {
                reply: format!("451 4.3.0 later, ünd später ({})", rng.random::<u16>()),
            },
            _ => RecipientState::Failed {
                reply: "550 5.1.1 no such user".into(),
                next_hop: rng.random_bool(0.5).then(|| "127.0.0.1:25".into()),
            },
        };
    }
    s.attempts += 1;
    s.next_attempt = rng.random_range(0..2_000_000_000);
    s.delay_notified |= rng.random_bool(0.1);
    s
}

/// One round: a few operations on distinct messages, as sessions and
/// delivery would send them at once. Retirements favour recent messages,
/// so a few old ones stay behind and compaction has work.
fn round(
    rng: &mut StdRng,
    model: &Spooled,
    next_id: &mut u64,
    envelopes: &[StoredEnvelope],
) -> Vec<Op> {
    let n = match rng.random_range(0..10) {
        0..=4 => 1,
        5..=7 => rng.random_range(2..=4),
        _ => rng.random_range(5..=12),
    };
    let live: Vec<&QueueId> = model.keys().collect();
    let mut touched = BTreeSet::new();
    let mut ops = Vec::with_capacity(n);
    for _ in 0..n {
        let kind = rng.random_range(0..100);
        let pick = if live.is_empty() || kind < 45 {
            None
        } else if rng.random_bool(0.7) {
            let from = live.len().saturating_sub(4);
            Some(live[rng.random_range(from..live.len())])
        } else {
            Some(live[rng.random_range(0..live.len())])
        };
        match pick {
            Some(id) if touched.insert(id) => ops.push(if kind < 70 {
                Op::State(id.clone(), next_state(rng, &model[id].state))
            } else {
                Op::Retire(id.clone())
            }),
            _ => {
                *next_id += 1;
                let id = QueueId::parse(&format!("{:020X}", *next_id)).unwrap();
                let mut env = envelopes[rng.random_range(0..envelopes.len())].clone();
                env.received_at = rng.random_range(0..2_000_000_000);
                env.session_id = format!("S{next_id}");
                ops.push(match rng.random_range(0..20) {
                    0..=3 => Op::Chunked(id, env, chunked(rng)),
                    4 => Op::Abandon(id, chunked(rng).chunks),
                    _ => Op::Store(id, env, body(rng)),
                });
            }
        }
    }
    ops
}

fn poll_once<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
    f.poll(&mut Context::from_waker(Waker::noop()))
}

/// Writes the chunks of the round's chunked and abandoned messages, each
/// writer's in turn (so they interleave), each chunk durable before the
/// next is handed over and an abandoned writer dropped after its last,
/// the committer settled after each step: the batches are the same on
/// every run of a seed. Returns the chunked messages' writers, ready to
/// commit, by operation; `None` if the disk crashed meanwhile.
fn write_chunks(
    rt: &tokio::runtime::Runtime,
    j: &Journal,
    ops: &[Op],
    cov: &mut Coverage,
) -> Option<Vec<Option<MessageWriter>>> {
    let mut writers: Vec<Option<MessageWriter>> = ops
        .iter()
        .map(|op| match op {
            Op::Chunked(id, ..) | Op::Abandon(id, _) => Some(j.writer(id.clone())),
            _ => None,
        })
        .collect();
    let chunks_of = |op: &Op| match op {
        Op::Chunked(_, _, c) => c.chunks.clone(),
        Op::Abandon(_, chunks) => chunks.clone(),
        _ => Vec::new(),
    };
    let most = ops.iter().map(|op| chunks_of(op).len()).max().unwrap_or(0);
    for step in 0..most {
        for (op, writer) in ops.iter().zip(writers.iter_mut()) {
            let chunks = chunks_of(op);
            let Some(w) = writer.as_mut() else { continue };
            if let Some(chunk) = chunks.get(step) {
                let written = rt.block_on(async {
                    w.append(chunk.clone()).await?;
                    w.flush().await
                });
                if written.is_err() {
                    return None;
                }
            }
            if matches!(op, Op::Abandon(..)) && step + 1 == chunks.len() {
                *writer = None;
                cov.abandoned += 1;
            }
            rt.block_on(j.settled());
        }
    }
    Some(writers)
}

/// Runs a round: the first operation alone, then, while the committer is
/// held inside its first disk operation, the rest (one batch, one flush);
/// then waits for the housekeeping after them. Holding the committer makes
/// the batches the same on every run of a seed. Chunked messages' chunks
/// are written before (`write_chunks`), their commits here like any
/// record; abandoned ones take no part.
fn run_round(
    rt: &tokio::runtime::Runtime,
    j: &Journal,
    disk: &SimDisk,
    ops: &[Op],
    writers: Vec<Option<MessageWriter>>,
) -> Vec<Result<(), String>> {
    let mut futures: Vec<_> = ops
        .iter()
        .zip(writers)
        .map(|(op, w)| op.submit(j, w))
        .collect();
    let mut results: Vec<Option<Result<(), String>>> = vec![None; ops.len()];
    if ops.is_empty() {
        return Vec::new();
    }
    if ops.len() > 1 {
        disk.hold();
    }
    if let Poll::Ready(r) = poll_once(futures[0].as_mut()) {
        results[0] = Some(r);
    }
    if ops.len() > 1 {
        let held = results[0].is_none() && disk.wait_held();
        for (f, r) in futures.iter_mut().zip(&mut results).skip(1) {
            if let Poll::Ready(done) = poll_once(f.as_mut()) {
                *r = Some(done);
            }
        }
        disk.release();
        assert!(
            held || results[0].is_some(),
            "the committer never reached the disk"
        );
    }
    let results = futures
        .into_iter()
        .zip(results)
        .map(|(f, r)| r.unwrap_or_else(|| rt.block_on(f)))
        .collect();
    rt.block_on(j.settled());
    results
}

/// What the journal holds, read through it.
fn spooled(j: &Journal) -> io::Result<Spooled> {
    j.messages()?
        .into_iter()
        .map(|m| {
            let body = j.body(&m)?;
            Ok((
                m.id,
                Msg {
                    envelope: m.envelope,
                    body,
                    state: m.state,
                },
            ))
        })
        .collect()
}

/// How `got` differs from `want`, briefly.
fn diff(want: &Spooled, got: &Spooled) -> String {
    let mut out = Vec::new();
    for (id, w) in want {
        match got.get(id) {
            None => out.push(format!("{id} lost")),
            Some(g) if g.body != w.body => out.push(format!(
                "{id} body {} bytes, want {}",
                g.body.len(),
                w.body.len()
            )),
            Some(g) if g.envelope != w.envelope => out.push(format!("{id} envelope differs")),
            Some(g) if g.state != w.state => {
                out.push(format!("{id} state {:?}, want {:?}", g.state, w.state))
            }
            Some(_) => {}
        }
    }
    for id in got.keys().filter(|id| !want.contains_key(*id)) {
        out.push(format!("{id} should not be there"));
    }
    let more = out.len().saturating_sub(6);
    out.truncate(6);
    if more > 0 {
        out.push(format!("and {more} more"));
    }
    out.join("; ")
}

/// One seed's run: cycles of open (checking what came back), workload,
/// crash. Returns a digest of everything the disk saw and answered.
fn run_seed(seed: u64, verbose: bool, cov: &mut Coverage) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let segment_size = [512, 1024, 4096, 16384][rng.random_range(0..4)];
    let cycles = rng.random_range(1..=3);
    let envelopes = envelopes(&mut rng);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut digest = DefaultHasher::new();
    let mut image = Image::new();
    // What may come back: the acknowledged state, then that with each
    // further record in flight at the crash.
    let mut outcomes = vec![Spooled::new()];
    let mut next_id = 0u64;
    let mut cycle = 0;
    let mut opening_crashes = 0;
    // Bounded: each pass runs a cycle or crashes while opening (at most
    // twice a cycle).
    for _ in 0..cycles * 3 + 1 {
        let last = cycle == cycles;
        let disk = SimDisk::new(std::mem::take(&mut image), rng.random(), verbose);
        // Sometimes the crash comes while the spool is read back and cut.
        if !last && opening_crashes < 2 && rng.random_bool(0.15) {
            disk.arm(rng.random_range(1..=12));
        }
        let opened = Journal::open_on(Arc::new(disk.clone()), segment_size);
        let journal = match opened {
            Ok(j) => j,
            Err(e) => {
                let Some(left) = disk.image() else {
                    panic!("seed {seed}: open failed without a crash: {e}");
                };
                cov.during_recovery += 1;
                opening_crashes += 1;
                finish_disk(&disk, cov, &mut digest);
                image = left;
                continue;
            }
        };
        disk.disarm();
        let got = spooled(&journal).unwrap();
        let Some(k) = outcomes.iter().position(|o| *o == got) else {
            panic!(
                "seed {seed}, cycle {cycle}: the spool read back is none of the {} allowed \
                 outcomes; against the acknowledged one: {}",
                outcomes.len(),
                diff(&outcomes[0], &got)
            );
        };
        if outcomes.len() > 1 {
            if k > 0 {
                cov.in_flight_kept += 1;
            } else {
                cov.in_flight_lost += 1;
            }
        }
        k.hash(&mut digest);
        if verbose {
            eprintln!("cycle {cycle}: {} messages back (outcome {k})", got.len());
        }
        let mut model = got;
        if last {
            drop(journal);
            finish_disk(&disk, cov, &mut digest);
            return digest.finish();
        }
        // A crash at any operation, or (as often) just after one of a kind
        // where a missing flush would show.
        if rng.random_bool(0.5) {
            disk.arm(rng.random_range(1..=300));
        } else {
            let kinds = [
                "remove",
                "remove",
                "open_append",
                "sync_dir",
                "sync_data",
                "append",
                "set_len",
            ];
            let kind = kinds[rng.random_range(0..kinds.len())];
            disk.arm_after(kind, rng.random_range(1..=6), rng.random_range(0..=4));
        }
        let mut in_flight = Vec::new();
        for _ in 0..MAX_ROUNDS {
            let all = round(&mut rng, &model, &mut next_id, &envelopes);
            let compacting = {
                let index = journal.index();
                index
                    .compaction_plan((segment_size / 4).max(1))
                    .is_some_and(|(s, _)| s < index.current)
            };
            let spanned_before: BTreeMap<QueueId, Location> = journal
                .index()
                .messages
                .iter()
                .filter(|(_, m)| m.location.before_tail > 0)
                .map(|(id, m)| (id.clone(), m.location))
                .collect();
            let Some(writers) = write_chunks(&rt, &journal, &all, cov) else {
                // Crashed while chunks were written: no commit was sent.
                cov.rounds += 1;
                break;
            };
            // Abandoned messages are done with; the rest commit now.
            let (ops, writers): (Vec<Op>, Vec<Option<MessageWriter>>) = all
                .into_iter()
                .zip(writers)
                .filter(|(op, _)| !matches!(op, Op::Abandon(..)))
                .unzip();
            let results = run_round(&rt, &journal, &disk, &ops, writers);
            cov.rounds += 1;
            if verbose {
                for (op, r) in ops.iter().zip(&results) {
                    eprintln!("  {} -> {r:?}", op.describe());
                }
            }
            let acked = results.iter().take_while(|r| r.is_ok()).count();
            assert!(
                results[acked..].iter().all(Result::is_err),
                "seed {seed}: answered out of order: {results:?}"
            );
            for op in &ops[..acked] {
                op.apply(&mut model);
                if let Op::Chunked(id, ..) = op {
                    cov.chunked += 1;
                    let index = journal.index();
                    if index
                        .messages
                        .get(id)
                        .is_some_and(|m| m.location.first_segment < m.location.segment)
                    {
                        cov.chunked_across_segments += 1;
                    }
                }
            }
            {
                let index = journal.index();
                cov.chunked_moved += spanned_before
                    .iter()
                    .filter(|(id, at)| index.messages.get(*id).is_some_and(|m| m.location != **at))
                    .count() as u64;
            }
            cov.acknowledged += acked as u64;
            results.hash(&mut digest);
            cov.max_segments = cov.max_segments.max(journal.index().segments.len());
            if disk.image().is_some() {
                in_flight = ops[acked..].to_vec();
                if compacting {
                    cov.during_compaction += 1;
                }
                break;
            }
            assert_eq!(acked, ops.len(), "seed {seed}: failed without a crash");
            // What the index says is what a restart would read.
            assert!(
                journal.index().messages.keys().eq(model.keys()),
                "seed {seed}: the index differs from what was acknowledged"
            );
        }
        disk.crash();
        drop(journal);
        image = disk.image().unwrap();
        finish_disk(&disk, cov, &mut digest);
        outcomes = vec![model];
        for op in &in_flight {
            let mut next = outcomes.last().unwrap().clone();
            op.apply(&mut next);
            outcomes.push(next);
        }
        cycle += 1;
        opening_crashes = 0;
    }
    panic!("seed {seed}: crashed while opening too often");
}

/// Adds a finished disk's figures to the run's.
fn finish_disk(disk: &SimDisk, cov: &mut Coverage, digest: &mut DefaultHasher) {
    let (ops, stats, trace) = disk.report();
    cov.add_disk(stats);
    (ops, trace).hash(digest);
}

/// Runs a seed; a failure is printed with how to replay it.
fn try_seed(seed: u64, cov: &mut Coverage) -> Result<u64, Box<dyn std::any::Any + Send>> {
    catch_unwind(AssertUnwindSafe(|| run_seed(seed, false, cov))).inspect_err(|p| {
        eprintln!(
            "seed {seed} failed: {}\nreplay it with FERRY_SIM_SEED={seed} {REPLAY}",
            panic_text(&**p)
        );
    })
}

/// The message of a caught panic.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[test]
fn crashes_on_a_simulated_disk_lose_nothing_acknowledged() {
    let mut cov = Coverage::default();
    if let Ok(seed) = std::env::var("FERRY_SIM_SEED") {
        let seed = seed.trim().parse().expect("FERRY_SIM_SEED: a number");
        run_seed(seed, true, &mut cov);
        eprintln!("seed {seed} passed: {cov:?}");
        return;
    }
    // Other seeds each run, so that runs together cover more; the first
    // is printed so a run can be told apart.
    let base = {
        use std::hash::BuildHasher;
        std::collections::hash_map::RandomState::new().hash_one(0u8) >> 16
    };
    let budget = std::env::var("FERRY_SIM_SECONDS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .map_or(BUDGET, Duration::from_secs);
    let max_seeds = budget.as_secs().max(1) * MAX_SEEDS_PER_SECOND;
    let started = Instant::now();
    let failure = Mutex::new(None);
    // A seed replays exactly: the same operations, answers and crashes.
    let mut once = Coverage::default();
    let first = try_seed(base, &mut once).map_err(|p| *lock(&failure) = Some(p));
    if let Ok(digest) = first {
        assert_eq!(
            Ok(digest),
            try_seed(base, &mut once).map_err(|_| ()),
            "seed {base} ran differently twice"
        );
    }
    // Seeds from `base` on, as many as fit the budget, on a thread per
    // core; the first failure stops them all.
    let next = AtomicU64::new(base);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut cov = Coverage::default();
                    while started.elapsed() < budget && lock(&failure).is_none() {
                        let seed = next.fetch_add(1, Ordering::Relaxed);
                        if seed >= base + max_seeds {
                            break;
                        }
                        match try_seed(seed, &mut cov) {
                            Ok(_) => cov.seeds += 1,
                            Err(p) => {
                                lock(&failure).get_or_insert(p);
                            }
                        }
                    }
                    cov
                })
            })
            .collect();
        for w in workers {
            cov.merge(&w.join().unwrap());
        }
    });
    if let Some(p) = failure.into_inner().unwrap() {
        resume_unwind(p);
    }
    eprintln!(
        "simulated disk: {} seeds from {base} on {threads} threads, {:.1?}: {cov:?}",
        cov.seeds,
        started.elapsed()
    );
    // Every case was reached, so a run that passes tested them.
    let d = &cov.disk;
    assert!(
        cov.seeds >= budget.as_secs() * 15,
        "only {} seeds ran in {budget:?}",
        cov.seeds
    );
    for (what, n) in [
        ("crashes", d.crashes),
        ("unsynced writes lost", d.lost_writes),
        ("unsynced writes torn", d.torn_writes),
        ("unsynced writes zero-filled", d.zeroed_writes),
        ("new files' entries lost", d.lost_creates),
        ("deleted files back", d.undone_removes),
        ("records in flight kept", cov.in_flight_kept),
        ("records in flight lost", cov.in_flight_lost),
        ("crashes in a compaction round", cov.during_compaction),
        ("crashes while opening", cov.during_recovery),
        ("messages in chunks", cov.chunked),
        (
            "messages in chunks across segments",
            cov.chunked_across_segments,
        ),
        ("messages in chunks moved by compaction", cov.chunked_moved),
        ("messages abandoned mid-way", cov.abandoned),
    ] {
        assert!(n > 0, "no {what} in {} seeds", cov.seeds);
    }
    assert!(cov.max_segments >= 6, "segments never piled up: {cov:?}");
}
