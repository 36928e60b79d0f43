//! DATA streamed to the spool: a message larger than a chunk reaches a
//! real next hop on loopback byte for byte; a message given up mid-DATA
//! (the client went away, or it went over the size limit) is not in the
//! queue of the restarted worker, and the segments its chunks went to are
//! deleted like any others.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_config::ClusterConfig;
use ferry_node::{LoadedConfig, Role, Source};
use ferry_queue::Journal;
use ferry_smtp::data::dot_stuff;
use ferry_telemetry::admin::AdminApi;
use ferry_tests::sink::SmtpSink;
use ferry_tests::SmtpClient;
use ferry_worker::delivery::QueueAdmin;
use ferry_worker::{Deliverer, Worker, WorkerOptions};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Small segments, so that a message's chunks cross them.
const SEGMENT: u64 = 1024 * 1024;
const WAIT: Duration = Duration::from_secs(30);

/// A worker on `dir` relaying to `hop`, delivering as it goes.
struct Running {
    addr: SocketAddr,
    journal: Journal,
    deliverer: Arc<Deliverer>,
    shutdown: CancellationToken,
    serving: JoinHandle<()>,
    _worker: Arc<Worker>,
}

async fn start(dir: &Path, hop: SocketAddr) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let text = format!(
        r#"
accepted_domains = [{{ domain = "example.test", kind = "authoritative" }}]

[[connectors]]
name = "Relay"
port = {port}
remote_ranges = ["127.0.0.0/8"]
permissions = ["anonymous", "accept_any_recipient"]
limits = {{ max_message_size = "3MB" }}

[[routes]]
domains = ["sink.test"]
type = "smtp"
next_hops = ["{hop}"]
tls = "none"
"#,
        port = addr.port(),
    );
    let config = ClusterConfig::parse("test.toml", &text, dir).unwrap();
    let material = Worker::prepare(&config).unwrap();
    let snapshot = LoadedConfig {
        config: Arc::new(config),
        sha256: ferry_node::sha256_hex(text.as_bytes()),
        source: Source::File("test.toml".into()),
    }
    .into_snapshot(1, material);
    let journal = Journal::open_with(dir, SEGMENT).unwrap();
    let worker = Worker::new(
        WorkerOptions {
            listen: "127.0.0.1".parse().unwrap(),
            data_dir: dir.to_path_buf(),
            hostname: "relay.test".into(),
        },
        snapshot,
        Arc::new(journal.clone()),
    );
    worker.adopt(addr.port(), listener).await;
    let shutdown = worker.shutdown_token();
    let deliverer = Deliverer::new(Arc::clone(worker.core()), journal.clone());
    tokio::spawn(Arc::clone(&deliverer).run(shutdown.clone()));
    let serving = tokio::spawn(Arc::clone(&worker).run(Duration::from_secs(10)));
    Running {
        addr,
        journal,
        deliverer,
        shutdown,
        serving,
        _worker: worker,
    }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.serving).await;
    }

    /// What `GET /queue` on the worker's admin endpoint answers.
    async fn queue(&self) -> serde_json::Value {
        let admin = QueueAdmin::new(Arc::clone(&self.deliverer), Arc::new(|| true));
        let answer = admin.handle("GET", "/queue").await;
        let (status, body) = answer.expect("the queue API answers /queue");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }
}

/// About `len` bytes of CRLF lines that make dot-stuffing and 8-bit
/// content show: lines that start with a dot, a line that is only a dot,
/// every byte value above 127; each line numbered, so a piece out of
/// place shows.
fn content(len: usize) -> Vec<u8> {
    let mut m = b"Subject: big\r\nMessage-ID: <big@example.test>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
        .to_vec();
    let mut n = 0u32;
    while m.len() < len {
        match n % 37 {
            0 => m.extend_from_slice(b".\r\n"),
            1 => m.extend_from_slice(format!(".{n:08} starts with a dot\r\n").as_bytes()),
            _ => {
                m.extend_from_slice(format!("{n:08} ").as_bytes());
                m.extend((0..70u32).map(|i| (128 + (n + i) % 128) as u8));
                m.extend_from_slice(b"\r\n");
            }
        }
        n += 1;
    }
    m
}

/// Bytes in the spool's segment files now.
fn spool_bytes(data: &Path) -> u64 {
    std::fs::read_dir(data.join("spool"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

async fn open_transaction(addr: SocketAddr, to: &str) -> SmtpClient {
    let (mut c, _) = SmtpClient::connect(addr, None).await;
    c.cmd("EHLO app").await;
    assert_eq!(
        c.cmd("MAIL FROM:<app@example.test> BODY=8BITMIME").await,
        "250 2.1.0 Sender OK"
    );
    assert_eq!(
        c.cmd(&format!("RCPT TO:<{to}>")).await,
        "250 2.1.5 Recipient OK"
    );
    assert!(c.cmd("DATA").await.starts_with("354"));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_a_chunk_arrives_byte_for_byte() {
    let sink = SmtpSink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let w = start(dir.path(), sink.addr).await;
    let message = content(2 * 1024 * 1024 + 777);
    assert!(message.len() > 4 * ferry_queue::CHUNK_SIZE);
    let mut c = open_transaction(w.addr, "ok@sink.test").await;
    c.send(&dot_stuff(&message)).await.unwrap();
    let reply = c.reply().await;
    assert!(reply.starts_with("250 2.6.0"), "{reply}");
    c.cmd("QUIT").await;

    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    // On the wire: the Received field on top, then the message as sent
    // (dot-stuffed again), up to the end of data.
    let wire = dot_stuff(&message);
    let sent = &wire[..wire.len() - 3];
    let data = &got[0].data;
    assert!(data.ends_with(sent), "the message changed on its way");
    let head = &data[..data.len() - sent.len()];
    let head = String::from_utf8_lossy(head);
    assert!(
        head.starts_with("Received: from app ([127.0.0.1])"),
        "{head}"
    );
    assert_eq!(head.matches("\r\n").count(), 3, "{head}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_given_up_mid_data_leaves_nothing() {
    let sink = SmtpSink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let w = start(dir.path(), sink.addr).await;

    // The client goes away after 2 MB, with chunks of it in the spool.
    let mut c = open_transaction(w.addr, "gone@sink.test").await;
    let part = content(2 * 1024 * 1024);
    c.send(&dot_stuff(&part)[..part.len()]).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while spool_bytes(dir.path()) < 3 * SEGMENT / 2 {
        assert!(tokio::time::Instant::now() < deadline, "no chunk written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(c);
    // Another goes over the size limit (3 MB): 552, after its first chunks
    // were written.
    let mut c = open_transaction(w.addr, "big@sink.test").await;
    c.send(&dot_stuff(&content(4 * 1024 * 1024))).await.unwrap();
    assert_eq!(
        c.reply().await,
        "552 5.3.4 Message size exceeds fixed maximum message size"
    );
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 OK");
    drop(c);
    assert_eq!(w.queue().await["messages"], serde_json::json!([]));
    w.stop().await;

    // The restarted worker has nothing queued, and sends nothing.
    let w = start(dir.path(), sink.addr).await;
    assert_eq!(w.queue().await["messages"], serde_json::json!([]));
    // Closed segments of given-up chunks may be gone already; the one
    // written to last still holds some.
    let before = spool_bytes(dir.path());
    assert!(
        before > ferry_queue::CHUNK_SIZE as u64,
        "the given-up chunks are on disk"
    );

    // Mail goes on; once it is delivered, the segments the given-up chunks
    // went to are deleted like any others.
    let mut c = open_transaction(w.addr, "ok@sink.test").await;
    c.send(&dot_stuff(b"Subject: after\r\n\r\nsmall\r\n"))
        .await
        .unwrap();
    assert!(c.reply().await.starts_with("250 2.6.0"));
    c.cmd("QUIT").await;
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_to, vec!["ok@sink.test"]);
    let deadline = tokio::time::Instant::now() + WAIT;
    while w.journal.counts().messages > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never retired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Retired segments go after the next write: a second message.
    let mut c = open_transaction(w.addr, "ok@sink.test").await;
    c.send(&dot_stuff(b"Subject: again\r\n\r\nsmall\r\n"))
        .await
        .unwrap();
    assert!(c.reply().await.starts_with("250 2.6.0"));
    c.cmd("QUIT").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while spool_bytes(dir.path()) > SEGMENT {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the given-up chunks' segments stay: {} bytes",
            spool_bytes(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sink.wait_for(2, WAIT).await.len(), 2);
    assert!(sink
        .received()
        .iter()
        .all(|m| m.rcpt_to == ["ok@sink.test"]));
    w.stop().await;
}
