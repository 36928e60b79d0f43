#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

use super::index::COMPACT_SPAN;
use super::*;
use crate::state::{RecipientState, RecipientStatus};

/// An envelope, made from its stored (JSON) form so that these tests do
/// not depend on how the address types are spelled in Rust.
fn envelope_to(n: usize, rcpt_to: &[&str]) -> StoredEnvelope {
    serde_json::from_value(serde_json::json!({
        "mail_from": format!("a{n}@x.test"),
        "rcpt_to": rcpt_to,
        "client_ip": "127.0.0.1",
        "helo": "dev",
        "connector": "Default",
        "user": null,
        "received_at": 0,
        "body_8bit": false,
        "smtputf8": false,
        "session_id": "S1",
        "message_id": null,
    }))
    .unwrap()
}

/// The file of segment `n` in `spool`.
fn segment_path(spool: &Path, n: u64) -> PathBuf {
    spool.join(segment_name(n))
}

/// The segment numbers in `spool`, oldest first.
fn segments_in(spool: &Path) -> io::Result<Vec<u64>> {
    segments(&Dir::at(spool))
}

pub(super) fn envelope(n: usize) -> StoredEnvelope {
    envelope_to(n, &["b@y.test"])
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
    let all = j.messages().unwrap();
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
    let live = j.messages().unwrap();
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
    assert_eq!(segments_in(&spool).unwrap(), vec![0, 1, 2, 3, 4, 5]);
    // Segments 1-2 empty out while 0 still holds a live message: they
    // stay, since they come after it (and too little of the spool is dead
    // yet for compaction).
    for id in &ids[1..3] {
        j.retire(id).await.unwrap();
    }
    j.settled().await;
    // The done records went to a new segment 6.
    assert_eq!(segments_in(&spool).unwrap(), vec![0, 1, 2, 3, 4, 5, 6]);
    j.retire(&ids[0]).await.unwrap();
    j.settled().await;
    assert_eq!(segments_in(&spool).unwrap(), vec![3, 4, 5, 6]);
    drop(j);
    let j = Journal::open_with(dir.path(), 1000).unwrap();
    let live: Vec<QueueId> = j.messages().unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(live, ids[3..].to_vec());
}

/// A state where one recipient is done and one waits.
fn half_done(env: &StoredEnvelope) -> DeliveryState {
    let mut state = DeliveryState::new(&env.rcpt_to);
    state.recipients[0].state = RecipientState::Delivered {
        next_hop: "127.0.0.1:25".into(),
        reply: "250 ok".into(),
    };
    state.recipients[1].state = RecipientState::Deferred {
        reply: "451 later".into(),
    };
    state.attempts = 1;
    state.next_attempt = 1234;
    state
}

fn two_recipients(n: usize) -> StoredEnvelope {
    envelope_to(n, &["a@y.test", "b@y.test"])
}

#[tokio::test]
async fn delivery_state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    let env = two_recipients(1);
    let id = j
        .store(QueueId::new(), env.clone(), b"m\r\n".to_vec())
        .await
        .unwrap();
    assert_eq!(j.message(&id).unwrap().unwrap().state.pending().count(), 2);
    let state = half_done(&env);
    j.record_state(&id, &state).await.unwrap();
    drop(j);
    let j = Journal::open(dir.path()).unwrap();
    let m = j.message(&id).unwrap().unwrap();
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
    assert!(Journal::open(dir.path())
        .unwrap()
        .messages()
        .unwrap()
        .is_empty());
}

/// Bytes of the segment files in `spool`.
fn disk_bytes(spool: &Path) -> u64 {
    segments_in(spool)
        .unwrap()
        .iter()
        .map(|n| fs::metadata(segment_path(spool, *n)).map_or(0, |m| m.len()))
        .sum()
}

#[tokio::test]
async fn a_deferred_message_does_not_pin_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let j = Journal::open_with(dir.path(), 1000).unwrap();
    let env = two_recipients(0);
    let body = b"Subject: stays\r\n\r\nstill here\r\n".to_vec();
    let stays = j
        .store(QueueId::new(), env.clone(), body.clone())
        .await
        .unwrap();
    let state = half_done(&env);
    j.record_state(&stays, &state).await.unwrap();
    // As delivery holds it: taken before any compaction moves it.
    let held = j.message(&stays).unwrap().unwrap();
    let mut peak = 0;
    for n in 1..=300 {
        let id = j
            .store(QueueId::new(), envelope(n), vec![b'x'; 900])
            .await
            .unwrap();
        j.retire(&id).await.unwrap();
        j.settled().await;
        peak = peak.max(disk_bytes(&spool));
    }
    // 300 segments went through; at most the span and a little more stay.
    let bound = (COMPACT_SPAN + 3) * 1000;
    assert!(peak <= bound, "spool grew to {peak} bytes (bound {bound})");
    assert!(segments_in(&spool).unwrap()[0] > 250);
    // The message moved, whole, with its state, and reads back from a
    // location taken before it moved.
    assert_ne!(j.message(&stays).unwrap().unwrap().location, held.location);
    assert_eq!(j.body(&held).unwrap(), body);
    drop(j);
    let j = Journal::open_with(dir.path(), 1000).unwrap();
    let live = j.messages().unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].id, stays);
    assert_eq!(live[0].envelope, env);
    assert_eq!(live[0].state, state);
    assert_eq!(j.body(&live[0]).unwrap(), body);
}

/// Every file of a spool directory.
fn snapshot(spool: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(spool)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().to_string(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The spool a crash leaves when the disk holds the files of `before`
/// plus the first `cut` bytes that the run to `after` appended (segments
/// only grow; new ones come after the old), and no deletion yet.
fn crashed(
    before: &BTreeMap<String, Vec<u8>>,
    after: &BTreeMap<String, Vec<u8>>,
    cut: usize,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    fs::create_dir_all(&spool).unwrap();
    let mut left = cut;
    for (name, old) in before {
        fs::write(spool.join(name), old).unwrap();
    }
    for (name, new) in after {
        let old_len = before.get(name).map_or(0, Vec::len);
        assert!(new.len() >= old_len, "{name} shrank");
        let take = (new.len() - old_len).min(left);
        left -= take;
        if before.contains_key(name) || take > 0 {
            fs::write(spool.join(name), &new[..old_len + take]).unwrap();
        }
    }
    dir
}

#[tokio::test]
async fn a_crash_at_any_point_of_a_compaction_recovers_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let j = Journal::open_with(dir.path(), 1000).unwrap();
    let env = two_recipients(0);
    let body = b"Subject: stays\r\n\r\nstill here\r\n".to_vec();
    let stays = j
        .store(QueueId::new(), env.clone(), body.clone())
        .await
        .unwrap();
    let state = half_done(&env);
    j.record_state(&stays, &state).await.unwrap();
    j.settled().await;
    // Until a store sets compaction off: what was on disk before it, and
    // after it and the compaction step it caused.
    let mut found = None;
    for n in 1..50 {
        let before = snapshot(&spool);
        let first = j.message(&stays).unwrap().unwrap().location;
        let id = j
            .store(QueueId::new(), envelope(n), vec![b'x'; 900])
            .await
            .unwrap();
        j.settled().await;
        if j.message(&stays).unwrap().unwrap().location != first {
            found = Some((before, snapshot(&spool), id));
            break;
        }
        j.retire(&id).await.unwrap();
    }
    drop(j);
    let (before, after, last) = found.expect("compaction never ran");
    assert!(after.len() < before.len(), "no segment was deleted");
    let appended: usize = after
        .iter()
        .map(|(name, new)| new.len() - before.get(name).map_or(0, Vec::len))
        .sum();
    // Crash points in what was appended (the store's record, then the
    // copy), without the deletions: at, just before and just after every
    // record boundary, and every 50th byte in between; then the end state
    // with the deletions.
    let mut cuts: Vec<usize> = (0..=appended).step_by(50).collect();
    let mut at = 0;
    for (name, new) in &after {
        let mut offset = before.get(name).map_or(0, Vec::len);
        while let Some((len, _)) = record::header(&new[offset..]) {
            at += HEADER + len as usize;
            offset += HEADER + len as usize;
            cuts.extend([at - 1, at, at + 1]);
        }
    }
    assert_eq!(at, appended);
    cuts.sort_unstable();
    cuts.dedup();
    let mut states = Vec::new();
    for cut in cuts.into_iter().filter(|c| *c <= appended) {
        states.push((cut, crashed(&before, &after, cut)));
    }
    states.push((appended, crashed(&after, &after, 0)));
    for (cut, dir) in states {
        let j = Journal::open_with(dir.path(), 1000).unwrap();
        let live = j.messages().unwrap();
        let ids: Vec<&QueueId> = live.iter().map(|m| &m.id).collect();
        // The deferred message exactly once, its state and bytes intact;
        // the last store's message there once it was whole.
        assert!(ids.contains(&&stays), "cut {cut}: lost it");
        assert!(ids.len() <= 2, "cut {cut}: {ids:?}");
        assert!(ids.iter().all(|id| **id == stays || **id == last));
        let m = j.message(&stays).unwrap().unwrap();
        assert_eq!(m.state, state, "cut {cut}");
        assert_eq!(m.envelope, env, "cut {cut}");
        assert_eq!(j.body(&m).unwrap(), body, "cut {cut}");
        if cut == appended {
            assert_eq!(ids.len(), 2, "cut {cut}");
        }
        // And it keeps working: the next restart reads the same.
        drop(j);
        let again = Journal::open_with(dir.path(), 1000).unwrap();
        assert_eq!(again.messages().unwrap().len(), live.len(), "cut {cut}");
        assert_eq!(again.message(&stays).unwrap().unwrap().state, state);
    }
}

/// A record the previous version wrote, with an address this version's
/// parser refuses (the old one took `_` in domains), is read back as it was
/// stored; one that cannot be read at all is skipped, and neither cuts the
/// acknowledged records after it.
#[tokio::test]
async fn records_this_version_parses_differently_cut_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    let a = j
        .store(QueueId::new(), envelope(1), b"one\r\n".to_vec())
        .await
        .unwrap();
    drop(j);
    let old = serde_json::json!({
        "mail_from": "dev@x.test", "rcpt_to": ["ops@mail_gw.corp.test"],
        "client_ip": "127.0.0.1", "helo": "dev", "connector": "Default", "user": null,
        "received_at": 0, "body_8bit": false, "smtputf8": false, "session_id": "S1",
        "message_id": null,
    })
    .to_string();
    let (b, unreadable, c) = (QueueId::new(), QueueId::new(), QueueId::new());
    let mut records = vec![
        record::encode_message_json(&b, old.as_bytes(), b"two\r\n").unwrap(),
        record::encode_message_json(&unreadable, b"{\"what\":1}", b"?\r\n").unwrap(),
        record::encode_message(&c, &envelope(3), b"", b"three\r\n").unwrap(),
    ];
    let seg = segment_path(&dir.path().join("spool"), 0);
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    for r in &mut records {
        record::seal(r).unwrap();
        f.write_all(r).unwrap();
    }
    drop(f);
    let j = Journal::open(dir.path()).unwrap();
    let mut live: Vec<QueueId> = j.messages().unwrap().into_iter().map(|m| m.id).collect();
    live.sort();
    let mut want = vec![a, b.clone(), c];
    want.sort();
    assert_eq!(live, want);
    let old = j
        .messages()
        .unwrap()
        .into_iter()
        .find(|m| m.id == b)
        .unwrap();
    assert_eq!(old.envelope.rcpt_to[0].to_string(), "ops@mail_gw.corp.test");
    assert_eq!(j.body(&old).unwrap(), b"two\r\n");
}

/// Bytes that differ from one offset to the next, so a piece out of place
/// shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[tokio::test]
async fn a_large_message_is_stored_in_chunks_and_read_back_in_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let body = pattern(3 * CHUNK_SIZE + 1234);
    // Segments smaller than the message: its chunks cross them.
    let j = Journal::open_with(dir.path(), (CHUNK_SIZE + 100) as u64).unwrap();
    let id = j
        .store(QueueId::new(), envelope(1), body.clone())
        .await
        .unwrap();
    let m = j.message(&id).unwrap().unwrap();
    assert_eq!(m.size(), body.len() as u64);
    assert!(m.location.first_segment < m.location.segment);
    let opened = j.open_body(&m).unwrap();
    assert!(opened.pieces() >= 4);
    assert!((0..opened.pieces()).all(|i| opened.piece_len(i) <= CHUNK_SIZE as u64));
    assert_eq!(opened.read_all().unwrap(), body);
    assert_eq!(opened.read_prefix(10).unwrap(), body[..10]);
    drop(j);
    let j = Journal::open_with(dir.path(), (CHUNK_SIZE + 100) as u64).unwrap();
    let m = j.message(&id).unwrap().unwrap();
    assert_eq!(j.body(&m).unwrap(), body);
    // Retired, it keeps none of its segments.
    j.retire(&id).await.unwrap();
    j.store(QueueId::new(), envelope(2), b"x\r\n".to_vec())
        .await
        .unwrap();
    j.settled().await;
    let left = segments_in(&spool).unwrap();
    assert_eq!(left.len(), 1, "segments left: {left:?}");
}

#[tokio::test]
async fn a_message_still_arriving_keeps_its_chunks_segment_and_an_abandoned_one_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let j = Journal::open_with(dir.path(), 1000).unwrap();
    // Two messages start in segment 0.
    let mut kept = j.writer(QueueId::new());
    let mut dropped = j.writer(QueueId::new());
    kept.append(pattern(600)).await.unwrap();
    dropped.append(pattern(700)).await.unwrap();
    kept.flush().await.unwrap();
    dropped.flush().await.unwrap();
    // Other mail comes and goes: later segments fill and empty out.
    for n in 0..4 {
        let id = j
            .store(QueueId::new(), envelope(n), vec![b'y'; 900])
            .await
            .unwrap();
        j.retire(&id).await.unwrap();
    }
    j.settled().await;
    assert_eq!(segments_in(&spool).unwrap()[0], 0, "a pinned segment went");
    kept.append(pattern(300)).await.unwrap();
    let id = kept
        .commit(
            envelope(9),
            b"Received: x\r\n".to_vec(),
            b"end\r\n".to_vec(),
        )
        .await
        .unwrap();
    let mut want = b"Received: x\r\n".to_vec();
    want.extend_from_slice(&pattern(600));
    want.extend_from_slice(&pattern(300));
    want.extend_from_slice(b"end\r\n");
    assert_eq!(j.body(&j.message(&id).unwrap().unwrap()).unwrap(), want);
    // The one given up leaves nothing; once the committed one is retired
    // its segments go too, abandoned chunks or not.
    drop(dropped);
    j.retire(&id).await.unwrap();
    j.store(QueueId::new(), envelope(10), b"x\r\n".to_vec())
        .await
        .unwrap();
    j.settled().await;
    let left = segments_in(&spool).unwrap();
    assert!(!left.contains(&0), "segments left: {left:?}");
    drop(j);
    let j = Journal::open_with(dir.path(), 1000).unwrap();
    assert_eq!(j.messages().unwrap().len(), 1);
}

/// What the index keeps of a message is a few dozen bytes: its id inline,
/// where its records are, when it is due. (An envelope and a state held
/// in memory cost kilobytes a message.)
#[test]
fn an_index_entry_stays_small() {
    assert_eq!(std::mem::size_of::<QueueId>(), 20);
    assert!(std::mem::size_of::<index::Entry>() <= 96);
    assert_eq!(
        std::mem::size_of::<Option<index::StateAt>>(),
        std::mem::size_of::<index::StateAt>()
    );
}

/// The state a message is read back with is the one last recorded, from
/// its state record, from a compaction copy, or from a state record
/// written after the copy; the index's counts and due times follow.
#[tokio::test]
async fn the_latest_state_is_read_from_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open_with(dir.path(), 1000).unwrap();
    let env = two_recipients(0);
    let body = b"Subject: stays\r\n\r\nstill here\r\n".to_vec();
    let id = j
        .store(QueueId::new(), env.clone(), body.clone())
        .await
        .unwrap();
    let fresh = j.message(&id).unwrap().unwrap();
    assert_eq!(fresh.state, DeliveryState::new(&env.rcpt_to));
    assert_eq!(fresh.envelope, env);
    let counts = j.counts();
    assert_eq!((counts.messages, counts.deferred), (1, 0));
    assert_eq!(counts.oldest.as_ref(), Some(&id));
    assert_eq!(j.due_times(), vec![(id.clone(), 0)]);

    let mut state = half_done(&env);
    j.record_state(&id, &state).await.unwrap();
    assert_eq!(j.message(&id).unwrap().unwrap().state, state);
    assert_eq!(j.counts().deferred, 1);
    assert_eq!(j.due_times(), vec![(id.clone(), 1234)]);

    // Churn until a compaction copies it (with that state) and its old
    // segment goes.
    let first = j.message(&id).unwrap().unwrap().location;
    for n in 1..=40 {
        let other = j
            .store(QueueId::new(), envelope(n), vec![b'x'; 900])
            .await
            .unwrap();
        j.retire(&other).await.unwrap();
        j.settled().await;
    }
    let moved = j.message(&id).unwrap().unwrap();
    assert_ne!(moved.location, first, "never compacted");
    assert_eq!(moved.state, state);
    assert_eq!(j.body(&moved).unwrap(), body);

    // A state recorded after the copy wins over the copy's.
    state.attempts = 2;
    state.next_attempt = 5678;
    j.record_state(&id, &state).await.unwrap();
    assert_eq!(j.message(&id).unwrap().unwrap().state, state);
    drop(j);
    let j = Journal::open_with(dir.path(), 1000).unwrap();
    let m = j.message(&id).unwrap().unwrap();
    assert_eq!((m.envelope, m.state), (env, state));
    assert_eq!(j.due_times(), vec![(id.clone(), 5678)]);
    assert_eq!(j.counts().deferred, 1);
}

/// A message never tried is copied by compaction as it was stored, and
/// reads back with its first state.
#[tokio::test]
async fn a_message_never_tried_is_compacted_as_stored() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open_with(dir.path(), 1000).unwrap();
    let env = two_recipients(0);
    let id = j
        .store(QueueId::new(), env.clone(), b"waits\r\n".to_vec())
        .await
        .unwrap();
    let first = j.message(&id).unwrap().unwrap().location;
    for n in 1..=40 {
        let other = j
            .store(QueueId::new(), envelope(n), vec![b'x'; 900])
            .await
            .unwrap();
        j.retire(&other).await.unwrap();
        j.settled().await;
    }
    assert!(!segments_in(&dir.path().join("spool"))
        .unwrap()
        .contains(&first.segment));
    drop(j);
    let j = Journal::open_with(dir.path(), 1000).unwrap();
    let m = j.message(&id).unwrap().unwrap();
    assert_ne!(m.location, first);
    assert_eq!(m.state, DeliveryState::new(&env.rcpt_to));
    assert_eq!(m.envelope, env);
    assert_eq!(j.body(&m).unwrap(), b"waits\r\n");
    assert_eq!(j.counts().deferred, 0);
}

/// An envelope damaged on disk after the start (read back then, so in the
/// index) makes reading that message an error, not a panic or a wrong
/// envelope; the rest of the queue is still read, and the message can
/// still be retired.
#[tokio::test]
async fn an_envelope_damaged_after_the_start_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    let bad = j
        .store(QueueId::new(), envelope(1), b"one\r\n".to_vec())
        .await
        .unwrap();
    let good = j
        .store(QueueId::new(), envelope(2), b"two\r\n".to_vec())
        .await
        .unwrap();
    let seg = segment_path(&dir.path().join("spool"), 0);
    let mut bytes = fs::read(&seg).unwrap();
    // The first record's envelope starts after header, kind, id and length.
    let at = HEADER + 1 + 20 + 4;
    assert_eq!(bytes[at], b'{');
    bytes[at] = b'!';
    fs::write(&seg, bytes).unwrap();
    let e = j.message(&bad).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    assert!(j.messages().is_err());
    assert_eq!(j.message(&good).unwrap().unwrap().envelope, envelope(2));
    assert_eq!(j.counts().messages, 2);
    j.retire(&bad).await.unwrap();
    assert!(j.message(&bad).unwrap().is_none());
    assert_eq!(j.messages().unwrap().len(), 1);
}
