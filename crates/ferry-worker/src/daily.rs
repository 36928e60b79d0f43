//! An append-only log file that starts anew each day (UTC), written by a
//! thread of its own.
//!
//! Sessions and delivery hand lines over a bounded channel and go on; the
//! writer thread drains whatever has queued up into one `write` and picks
//! the file by the day each line was logged (a line from 23:59:59.999 goes
//! to that day's file even if it is written after midnight). A slow or
//! stuck disk therefore never holds an async task at a lock or in a
//! syscall. What happens when the channel is full is the log's choice
//! ([`Overflow`]). On drop, and on [`DailyFile::flush`], everything queued
//! is written first: nothing is lost on a clean shutdown.
//!
//! Not `tracing-appender`: its rolling file names (`prefix.yyyy-MM-dd`)
//! differ from Exchange's `RECVyyyymmdd.LOG`, a new file cannot start with
//! a header, it rotates by the time of the write rather than of the line,
//! and its guard gives up flushing after a second at shutdown.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Mutex;
use std::thread::JoinHandle;

use chrono::{NaiveDate, Utc};

/// What `append` does when the writer is this far behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overflow {
    /// The caller waits for room (its task only: on tokio's multi-thread
    /// runtime the wait runs in `block_in_place`, so the thread's other
    /// tasks move on). For logs that must be complete.
    Wait,
    /// The line is dropped and counted (`ferry_log_lines_dropped_total`,
    /// plus a warning at 1, 2, 4, … drops). For diagnostic logs that must
    /// never slow mail down.
    Drop,
}

enum Msg {
    Line(NaiveDate, String),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Lines go to `DIR/PREFIXyyyymmdd.EXT`; a new file gets `header` first.
pub(crate) struct DailyFile {
    dir: PathBuf,
    prefix: &'static str,
    extension: &'static str,
    overflow: Overflow,
    tx: Option<SyncSender<Msg>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    dropped: AtomicU64,
}

/// Where a day's lines go.
fn path_for(dir: &Path, prefix: &str, extension: &str, day: NaiveDate) -> PathBuf {
    dir.join(format!("{prefix}{}.{extension}", day.format("%Y%m%d")))
}

impl DailyFile {
    /// Starts the writer thread; `capacity` lines may wait for it.
    pub(crate) fn new(
        dir: PathBuf,
        prefix: &'static str,
        extension: &'static str,
        header: fn() -> String,
        overflow: Overflow,
        capacity: usize,
    ) -> Self {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let writer = Writer {
            dir: dir.clone(),
            prefix,
            extension,
            header,
            open: None,
        };
        let thread = std::thread::Builder::new()
            .name(format!("ferry-log-{}", prefix.to_ascii_lowercase()))
            .spawn(move || writer.run(rx));
        let (tx, writer) = match thread {
            Ok(handle) => (Some(tx), Some(handle)),
            Err(e) => {
                tracing::error!(error = %e, log = prefix, "cannot start a log writer thread; this log stays empty");
                (None, None)
            }
        };
        Self {
            dir,
            prefix,
            extension,
            overflow,
            tx,
            writer: Mutex::new(writer),
            dropped: AtomicU64::new(0),
        }
    }

    pub(crate) fn path_for(&self, day: NaiveDate) -> PathBuf {
        path_for(&self.dir, self.prefix, self.extension, day)
    }

    /// Queues one whole line (with its line end) for the file of today.
    pub(crate) fn append(&self, line: String) {
        self.append_on(Utc::now().date_naive(), line);
    }

    /// Queues one whole line for the file of `day` (UTC).
    pub(crate) fn append_on(&self, day: NaiveDate, line: String) {
        let Some(tx) = &self.tx else { return };
        let msg = Msg::Line(day, line);
        match tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(msg)) => match self.overflow {
                Overflow::Wait => {
                    if wait_send(tx, msg).is_err() {
                        tracing::warn!(log = self.prefix, "log writer gone; line lost");
                    }
                }
                Overflow::Drop => {
                    let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    metrics::counter!(crate::metric::LOG_LINES_DROPPED, "log" => self.prefix)
                        .increment(1);
                    if n.is_power_of_two() {
                        tracing::warn!(
                            log = self.prefix,
                            dropped = n,
                            "log writer behind (slow disk?): lines dropped"
                        );
                    }
                }
            },
            Err(TrySendError::Disconnected(_)) => {
                tracing::warn!(log = self.prefix, "log writer gone; line lost");
            }
        }
    }

    /// Resolves once every line queued before the call is written.
    pub(crate) async fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done, written) = tokio::sync::oneshot::channel();
        if wait_send(tx, Msg::Flush(done)).is_ok() {
            let _ = written.await;
        }
    }
}

/// A blocking send that, on tokio's multi-thread runtime, lets the
/// thread's other tasks run elsewhere while it waits.
fn wait_send(tx: &SyncSender<Msg>, msg: Msg) -> Result<(), mpsc::SendError<Msg>> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(|| tx.send(msg)),
        _ => tx.send(msg),
    }
}

impl Drop for DailyFile {
    /// Writes out what is queued before the file goes.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(writer) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = writer.join();
        }
    }
}

/// The writer thread's side.
struct Writer {
    dir: PathBuf,
    prefix: &'static str,
    extension: &'static str,
    header: fn() -> String,
    open: Option<(NaiveDate, File)>,
}

/// Lines gathered into one write at most (then the next batch).
const BATCH_BYTES: usize = 1 << 20;

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut buf = String::new();
        while let Ok(first) = rx.recv() {
            let mut day = None;
            let mut flushed = Vec::new();
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Line(d, line) => {
                        if day.is_some_and(|cur| cur != d) {
                            self.write(day, &mut buf);
                        }
                        day = Some(d);
                        buf.push_str(&line);
                    }
                    Msg::Flush(done) => flushed.push(done),
                }
                if buf.len() < BATCH_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            self.write(day, &mut buf);
            for done in flushed {
                let _ = done.send(());
            }
        }
    }

    /// Writes `buf` (lines of `day`) to that day's file and empties it.
    fn write(&mut self, day: Option<NaiveDate>, buf: &mut String) {
        let Some(day) = day else { return };
        if let Err(e) = self.file_of(day).and_then(|f| f.write_all(buf.as_bytes())) {
            // Nothing better to do with the lines than say so where an
            // admin looks; the next batch tries the file again.
            tracing::error!(log = self.prefix, error = %e, lines = buf.lines().count(), "log write failed; lines lost");
            self.open = None;
        }
        buf.clear();
    }

    fn file_of(&mut self, day: NaiveDate) -> io::Result<&mut File> {
        if self.open.as_ref().is_none_or(|(d, _)| *d != day) {
            fs::create_dir_all(&self.dir)?;
            let path = path_for(&self.dir, self.prefix, self.extension, day);
            let new = !path.exists();
            let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
            if new {
                f.write_all((self.header)().as_bytes())?;
            }
            self.open = Some((day, f));
        }
        match self.open.as_mut() {
            Some((_, f)) => Ok(f),
            None => Err(io::Error::other("no log file open")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use std::io::{BufRead, BufReader};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;

    fn header() -> String {
        "#header\n".into()
    }

    /// The day the tests log on: a fixed one, so that no run breaks at
    /// midnight.
    fn day() -> NaiveDate {
        NaiveDate::from_ymd_opt(2025, 12, 31).unwrap()
    }

    /// A log whose file of today is a FIFO nobody reads yet: its writer
    /// blocks on it like on a stuck disk. (The file exists, so it gets no
    /// header.)
    fn stuck(overflow: Overflow, capacity: usize) -> (tempfile::TempDir, Arc<DailyFile>, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let log = DailyFile::new(dir.path().into(), "T", "log", header, overflow, capacity);
        let path = log.path_for(day());
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        (dir, Arc::new(log), path)
    }

    /// Reads `n` lines from the FIFO within 20 s.
    fn unblock(path: &Path, n: usize) -> Vec<String> {
        let path = path.to_path_buf();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let reader = BufReader::new(File::open(path).unwrap());
            let lines: Vec<String> = reader.lines().take(n).map(Result::unwrap).collect();
            let _ = tx.send(lines);
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("lines missing")
    }

    #[test]
    fn a_full_tracking_log_makes_the_caller_wait_and_loses_nothing() {
        let (_dir, log, path) = stuck(Overflow::Wait, 2);
        let writer = Arc::clone(&log);
        let sender = std::thread::spawn(move || {
            for i in 0..50 {
                writer.append_on(day(), format!("line {i}\n"));
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!sender.is_finished(), "appends did not wait for room");
        let lines = unblock(&path, 50);
        sender.join().unwrap();
        let expected: Vec<String> = (0..50).map(|i| format!("line {i}")).collect();
        assert_eq!(lines, expected);
        assert_eq!(log.dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_full_protocol_log_drops_and_counts_without_waiting() {
        let (_dir, log, path) = stuck(Overflow::Drop, 4);
        let started = Instant::now();
        for i in 0..100 {
            log.append_on(day(), format!("line {i}\n"));
        }
        assert!(started.elapsed() < Duration::from_secs(2), "appends waited");
        let dropped = log.dropped.load(Ordering::Relaxed) as usize;
        assert!(dropped > 0 && dropped < 100, "{dropped}");
        let lines = unblock(&path, 100 - dropped);
        // What was kept is in order, from the first line on.
        assert_eq!(lines[0], "line 0");
        let numbers: Vec<usize> = lines
            .iter()
            .map(|l| l.strip_prefix("line ").unwrap().parse().unwrap())
            .collect();
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
    }

    #[test]
    fn every_line_is_written_by_drop_time() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(DailyFile::new(
            dir.path().into(),
            "T",
            "log",
            header,
            Overflow::Wait,
            8,
        ));
        let path = log.path_for(day());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for i in 0..500 {
                        log.append_on(day(), format!("{t} {i}\n"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(log);
        let text = fs::read_to_string(path).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("#header"));
        let mut next = [0usize; 4];
        for l in lines {
            let (t, i) = l.split_once(' ').unwrap();
            let (t, i): (usize, usize) = (t.parse().unwrap(), i.parse().unwrap());
            assert_eq!(i, next[t], "thread {t} out of order");
            next[t] += 1;
        }
        assert_eq!(next, [500; 4]);
    }

    #[test]
    fn each_line_goes_to_the_file_of_its_own_day() {
        let dir = tempfile::tempdir().unwrap();
        let log = DailyFile::new(dir.path().into(), "RECV", "LOG", header, Overflow::Wait, 8);
        let next = day().succ_opt().unwrap();
        // The last line of a day, written after the next day's first.
        log.append_on(day(), "a\n".into());
        log.append_on(next, "b\n".into());
        log.append_on(day(), "c\n".into());
        drop(log);
        let read = |name: &str| fs::read_to_string(dir.path().join(name)).unwrap();
        assert_eq!(read("RECV20251231.LOG"), "#header\na\nc\n");
        assert_eq!(read("RECV20260101.LOG"), "#header\nb\n");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
