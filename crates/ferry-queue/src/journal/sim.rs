//! A simulated disk for the journal's crash tests, in the manner of
//! FoundationDB's and TigerBeetle's deterministic simulation: it keeps what
//! was made durable apart from what was only written, and a crash keeps
//! only what POSIX promises.
//!
//! - A file's bytes are durable once `sync_data` returned; of what was
//!   written (or cut) since, a crash keeps nothing, all, or a prefix torn
//!   at a random byte, sometimes with the tail zero-filled (the size
//!   reached the disk, the data did not).
//! - A directory entry (a file created or deleted) is durable once
//!   `sync_dir` returned; a crash keeps or loses each change since,
//!   independently (POSIX orders none of them).
//!
//! A crash comes at a chosen operation: that one and every one after fails
//! (the process is gone), and [`SimDisk::image`] is what a restart finds.
//! Every decision comes from the seed, and a gate lets the test hold the
//! committer inside its first operation while it queues more records, so
//! batches are made the same way on every run: a seed replays exactly.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::storage::{Storage, StorageFile};

/// The files a restart finds: name and bytes.
pub(super) type Image = BTreeMap<String, Vec<u8>>;

/// What crashes did, over a whole run (to show each case was reached).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct CrashStats {
    pub crashes: u64,
    /// Unsynced bytes in a file at a crash: all lost, all kept, torn
    /// (a prefix kept), or torn and zero-filled.
    pub lost_writes: u64,
    pub kept_writes: u64,
    pub torn_writes: u64,
    pub zeroed_writes: u64,
    /// A new file's entry lost; a deleted file back.
    pub lost_creates: u64,
    pub undone_removes: u64,
}

struct Inode {
    /// What reads see.
    data: Vec<u8>,
    /// What a crash keeps for sure.
    durable: Vec<u8>,
    /// The lowest offset written or cut since the last `sync_data`.
    dirty_from: Option<usize>,
}

struct Disk {
    inodes: Vec<Inode>,
    /// The directory as listed, and as a crash finds it for sure.
    entries: BTreeMap<String, usize>,
    durable_entries: BTreeMap<String, usize>,
    ops: u64,
    crash_at: Option<u64>,
    /// Crash a few operations after the `nth` of a kind.
    trigger: Option<Trigger>,
    image: Option<Image>,
    rng: SmallRng,
    stats: CrashStats,
    /// A digest of every operation and its outcome (a replay must match).
    trace: DefaultHasher,
    /// Print every operation (to read a failing seed).
    verbose: bool,
}

struct Trigger {
    kind: &'static str,
    nth: u64,
    delay: u64,
}

#[derive(Default)]
struct Gate {
    hold: bool,
    waiting: bool,
}

struct Shared {
    disk: Mutex<Disk>,
    gate: Mutex<Gate>,
    turn: Condvar,
}

/// The simulated disk; clones share it.
#[derive(Clone)]
pub(super) struct SimDisk {
    shared: Arc<Shared>,
}

fn crashed() -> io::Error {
    io::Error::other("simulated crash")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long either side waits at the gate before giving up.
const GATE_WAIT: Duration = Duration::from_secs(30);

impl SimDisk {
    /// A disk holding `image`, all of it durable, whose decisions come from
    /// `seed`; it crashes once armed ([`SimDisk::arm`]) or told to.
    pub fn new(image: Image, seed: u64, verbose: bool) -> Self {
        let mut inodes = Vec::new();
        let mut entries = BTreeMap::new();
        for (name, bytes) in image {
            entries.insert(name, inodes.len());
            inodes.push(Inode {
                durable: bytes.clone(),
                data: bytes,
                dirty_from: None,
            });
        }
        let disk = Disk {
            inodes,
            durable_entries: entries.clone(),
            entries,
            ops: 0,
            crash_at: None,
            trigger: None,
            image: None,
            rng: SmallRng::seed_from_u64(seed),
            stats: CrashStats::default(),
            trace: DefaultHasher::new(),
            verbose,
        };
        Self {
            shared: Arc::new(Shared {
                disk: Mutex::new(disk),
                gate: Mutex::new(Gate::default()),
                turn: Condvar::new(),
            }),
        }
    }

    /// Crashes at the `after`th operation from now (1: the next).
    pub fn arm(&self, after: u64) {
        let mut d = lock(&self.shared.disk);
        d.crash_at = Some(d.ops + after);
    }

    /// Crashes `delay` operations after the `nth` operation whose name
    /// starts with `kind` (`remove`, `open_append`, ...; 0: right after it):
    /// more crashes where they are most likely to find something.
    pub fn arm_after(&self, kind: &'static str, nth: u64, delay: u64) {
        lock(&self.shared.disk).trigger = Some(Trigger { kind, nth, delay });
    }

    /// No crash but by [`SimDisk::crash`].
    pub fn disarm(&self) {
        let mut d = lock(&self.shared.disk);
        d.crash_at = None;
        d.trigger = None;
    }

    /// Crashes now, if it has not yet.
    pub fn crash(&self) {
        lock(&self.shared.disk).crash();
    }

    /// What a restart finds, once crashed.
    pub fn image(&self) -> Option<Image> {
        lock(&self.shared.disk).image.clone()
    }

    /// Operations so far, this disk's crash statistics and its trace.
    pub fn report(&self) -> (u64, CrashStats, u64) {
        let d = lock(&self.shared.disk);
        (d.ops, d.stats, d.trace.finish())
    }

    /// From now on the next operation waits at the gate until
    /// [`SimDisk::release`].
    pub fn hold(&self) {
        let mut g = lock(&self.shared.gate);
        g.hold = true;
        g.waiting = false;
    }

    /// Waits (bounded) until an operation waits at the gate.
    pub fn wait_held(&self) -> bool {
        let deadline = Instant::now() + GATE_WAIT;
        let mut g = lock(&self.shared.gate);
        while !g.waiting {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .shared
                .turn
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Lets the operation at the gate go on.
    pub fn release(&self) {
        let mut g = lock(&self.shared.gate);
        g.hold = false;
        g.waiting = false;
        self.shared.turn.notify_all();
    }

    /// Passes the gate, then counts the operation (crashing at the chosen
    /// one) and runs it on the disk.
    fn op<T>(&self, what: &str, f: impl FnOnce(&mut Disk) -> io::Result<T>) -> io::Result<T> {
        {
            let deadline = Instant::now() + GATE_WAIT;
            let mut g = lock(&self.shared.gate);
            if g.hold {
                g.waiting = true;
                self.shared.turn.notify_all();
                while g.hold && Instant::now() < deadline {
                    let left = deadline.saturating_duration_since(Instant::now());
                    g = self
                        .shared
                        .turn
                        .wait_timeout(g, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        let mut d = lock(&self.shared.disk);
        d.ops += 1;
        if d.crash_at == Some(d.ops) {
            d.crash();
        }
        let result = if d.image.is_some() {
            Err(crashed())
        } else {
            f(&mut d)
        };
        let ops = d.ops;
        if let Some(t) = d.trigger.as_mut().filter(|t| what.starts_with(t.kind)) {
            t.nth = t.nth.saturating_sub(1);
            if t.nth == 0 {
                let at = ops + 1 + t.delay;
                d.crash_at = Some(at);
                d.trigger = None;
            }
        }
        let line = format!(
            "{} {what} {}",
            d.ops,
            if result.is_ok() { "ok" } else { "err" }
        );
        line.hash(&mut d.trace);
        if d.verbose {
            eprintln!("    disk: {line}");
        }
        result
    }
}

impl Disk {
    fn crash(&mut self) {
        if self.image.is_some() {
            return;
        }
        self.stats.crashes += 1;
        let names: BTreeSet<String> = self
            .entries
            .keys()
            .chain(self.durable_entries.keys())
            .cloned()
            .collect();
        let mut image = Image::new();
        for name in names {
            let now = self.entries.get(&name).copied();
            let then = self.durable_entries.get(&name).copied();
            let inode = match (then, now) {
                (a, b) if a == b => a,
                (None, Some(b)) => {
                    let keep = self.rng.random_bool(0.5);
                    if !keep {
                        self.stats.lost_creates += 1;
                    }
                    keep.then_some(b)
                }
                (Some(a), None) => {
                    let back = self.rng.random_bool(0.5);
                    if back {
                        self.stats.undone_removes += 1;
                    }
                    back.then_some(a)
                }
                (a, b) => {
                    if self.rng.random_bool(0.5) {
                        a
                    } else {
                        b
                    }
                }
            };
            let Some(i) = inode else {
                if self.verbose {
                    eprintln!("    crash: {name} gone");
                }
                continue;
            };
            let bytes = self.after_crash(i);
            if self.verbose {
                let inode = &self.inodes[i];
                eprintln!(
                    "    crash: {name}: {} bytes ({} written, {} durable)",
                    bytes.len(),
                    inode.data.len(),
                    inode.durable.len()
                );
            }
            image.insert(name, bytes);
        }
        self.image = Some(image);
    }

    /// The bytes of inode `i` a crash leaves.
    fn after_crash(&mut self, i: usize) -> Vec<u8> {
        let inode = &self.inodes[i];
        let Some(from) = inode.dirty_from else {
            return inode.durable.clone();
        };
        let from = from.min(inode.data.len());
        let unsynced = inode.data.len() - from;
        match self.rng.random_range(0..4) {
            0 => {
                self.stats.lost_writes += 1;
                inode.durable.clone()
            }
            1 => {
                self.stats.kept_writes += 1;
                inode.data.clone()
            }
            2 => {
                self.stats.torn_writes += 1;
                let keep = self.rng.random_range(0..=unsynced);
                inode.data[..from + keep].to_vec()
            }
            _ => {
                self.stats.zeroed_writes += 1;
                let keep = self.rng.random_range(0..=unsynced);
                let mut bytes = inode.data[..from + keep].to_vec();
                bytes.resize(inode.data.len(), 0);
                bytes
            }
        }
    }

    fn inode(&mut self, i: usize) -> &mut Inode {
        &mut self.inodes[i]
    }
}

impl Storage for SimDisk {
    fn list(&self) -> io::Result<Vec<String>> {
        self.op("list", |d| Ok(d.entries.keys().cloned().collect()))
    }

    fn open(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        let inode = self.op(&format!("open {name}"), |d| {
            d.entries
                .get(name)
                .copied()
                .ok_or_else(|| io::ErrorKind::NotFound.into())
        })?;
        Ok(Box::new(SimFile {
            disk: self.clone(),
            inode,
        }))
    }

    fn open_append(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        let inode = self.op(&format!("open_append {name}"), |d| {
            if let Some(&i) = d.entries.get(name) {
                return Ok(i);
            }
            d.inodes.push(Inode {
                data: Vec::new(),
                durable: Vec::new(),
                dirty_from: None,
            });
            let i = d.inodes.len() - 1;
            d.entries.insert(name.to_string(), i);
            Ok(i)
        })?;
        Ok(Box::new(SimFile {
            disk: self.clone(),
            inode,
        }))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.op(&format!("remove {name}"), |d| {
            d.entries
                .remove(name)
                .map(|_| ())
                .ok_or_else(|| io::ErrorKind::NotFound.into())
        })
    }

    fn sync_dir(&self) -> io::Result<()> {
        self.op("sync_dir", |d| {
            d.durable_entries = d.entries.clone();
            Ok(())
        })
    }
}

/// An open file of a [`SimDisk`].
struct SimFile {
    disk: SimDisk,
    inode: usize,
}

impl StorageFile for SimFile {
    fn len(&self) -> io::Result<u64> {
        self.disk
            .op("len", |d| Ok(d.inode(self.inode).data.len() as u64))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.disk.op(&format!("read {offset}+{}", buf.len()), |d| {
            let data = &d.inode(self.inode).data;
            let start = usize::try_from(offset).map_or(data.len(), |o| o.min(data.len()));
            let n = buf.len().min(data.len() - start);
            buf[..n].copy_from_slice(&data[start..start + n]);
            Ok(n)
        })
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.disk.op(&format!("append {}", bytes.len()), |d| {
            let inode = d.inode(self.inode);
            let end = inode.data.len();
            inode.dirty_from = Some(inode.dirty_from.map_or(end, |f| f.min(end)));
            inode.data.extend_from_slice(bytes);
            Ok(())
        })
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.disk.op(&format!("set_len {len}"), |d| {
            let inode = d.inode(self.inode);
            let len = usize::try_from(len).map_err(io::Error::other)?;
            let from = len.min(inode.data.len());
            inode.dirty_from = Some(inode.dirty_from.map_or(from, |f| f.min(from)));
            inode.data.resize(len, 0);
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.disk.op("sync_data", |d| {
            let inode = d.inode(self.inode);
            // Only what changed since the last flush is copied.
            if let Some(from) = inode.dirty_from.take() {
                let from = from.min(inode.durable.len()).min(inode.data.len());
                inode.durable.truncate(from);
                inode.durable.extend_from_slice(&inode.data[from..]);
            }
            Ok(())
        })
    }
}
