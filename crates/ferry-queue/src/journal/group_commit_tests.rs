//! Group commit, counted: the records sessions hand over while the
//! committer is flushing are all made durable by its next one
//! `fdatasync`, whatever their number. The simulated disk's gate holds
//! the committer inside its first write while the other stores arrive,
//! so the batches are the same on every run; a storage wrapper counts
//! the flushes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Waker};

use super::sim::{Image, SimDisk};
use super::storage::{Storage, StorageFile};
use super::*;

/// A storage that counts `sync_data` calls on its files.
struct Counted {
    disk: SimDisk,
    syncs: Arc<AtomicU64>,
}

struct CountedFile {
    file: Box<dyn StorageFile>,
    syncs: Arc<AtomicU64>,
}

impl Storage for Counted {
    fn list(&self) -> io::Result<Vec<String>> {
        self.disk.list()
    }

    fn open(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        self.disk.open(name)
    }

    fn open_append(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        Ok(Box::new(CountedFile {
            file: self.disk.open_append(name)?,
            syncs: Arc::clone(&self.syncs),
        }))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.disk.remove(name)
    }

    fn sync_dir(&self) -> io::Result<()> {
        self.disk.sync_dir()
    }
}

impl StorageFile for CountedFile {
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.append(bytes)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        self.file.sync_data()
    }
}

#[test]
fn stores_that_arrive_during_a_flush_share_the_next_one() {
    const SESSIONS: usize = 50;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let disk = SimDisk::new(Image::new(), 1, false);
    let syncs = Arc::new(AtomicU64::new(0));
    let storage = Counted {
        disk: disk.clone(),
        syncs: Arc::clone(&syncs),
    };
    let j = Journal::open_on(Arc::new(storage), SEGMENT_SIZE).unwrap();
    let at_open = syncs.load(Ordering::SeqCst);
    let mut stores: Vec<_> = (0..SESSIONS)
        .map(|n| {
            let body = format!("Subject: {n}\r\n\r\nfrom session {n}\r\n").into_bytes();
            j.store(QueueId::new(), tests::envelope(n), body)
        })
        .collect();
    let mut poll = |n: usize| {
        let waker = Waker::noop();
        stores[n].as_mut().poll(&mut Context::from_waker(waker))
    };
    // The first store alone: the committer takes it and is held in its
    // write. Every other session hands its record over meanwhile.
    disk.hold();
    assert!(poll(0).is_pending());
    assert!(disk.wait_held(), "the committer never wrote");
    for n in 1..SESSIONS {
        assert!(poll(n).is_pending(), "store {n} done before any flush");
    }
    disk.release();
    for store in stores {
        rt.block_on(store).unwrap();
    }
    // One flush for the first, one for the 49 that came during it.
    let flushes = syncs.load(Ordering::SeqCst) - at_open;
    assert_eq!(flushes, 2, "{SESSIONS} stores, {flushes} fdatasyncs");
    assert_eq!(j.counts().messages, SESSIONS);
}
