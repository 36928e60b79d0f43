//! The spool stays small while a message waits: one message deferred by a
//! real next hop on loopback stays in the queue while 200 MB of other mail
//! passes through the worker, and the spool's size on disk stays bounded
//! (compaction moves the waiting message out of the old segments).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_config::ClusterConfig;
use ferry_node::{LoadedConfig, Role, Source};
use ferry_queue::{Journal, RecipientState};
use ferry_tests::sink::SmtpSink;
use ferry_tests::SmtpClient;
use ferry_worker::{Deliverer, Worker, WorkerOptions};
use tokio::net::TcpListener;

/// Small segments, so that 200 MB is many of them.
const SEGMENT: u64 = 4 * 1024 * 1024;
const MESSAGE: usize = 1024 * 1024;
const MESSAGES: usize = 200;
const SESSIONS: usize = 4;
const WAIT: Duration = Duration::from_secs(60);

/// Bytes of segment files in the spool right now.
fn spool_bytes(data: &Path) -> u64 {
    std::fs::read_dir(data.join("spool"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A message of about `MESSAGE` bytes whose text names it.
fn message(name: &str) -> Vec<u8> {
    let mut m =
        format!("Subject: {name}\r\nMessage-ID: <{name}@example.test>\r\n\r\n").into_bytes();
    let line = format!("{name} {}\r\n", "x".repeat(70));
    while m.len() < MESSAGE {
        m.extend_from_slice(line.as_bytes());
    }
    m
}

/// One transaction from `from`'s session; expects `250` at the end.
async fn send(c: &mut SmtpClient, to: &str, body: &[u8]) {
    assert_eq!(
        c.cmd("MAIL FROM:<app@example.test>").await,
        "250 2.1.0 Sender OK"
    );
    assert_eq!(
        c.cmd(&format!("RCPT TO:<{to}>")).await,
        "250 2.1.5 Recipient OK"
    );
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(body).await.unwrap();
    c.send(b".\r\n").await.unwrap();
    let reply = c.reply().await;
    assert!(reply.starts_with("250 2.6.0"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_message_does_not_pin_the_spool_while_200_mb_pass() {
    let sink = SmtpSink::start().await;
    let dir = tempfile::tempdir().unwrap();
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

[[routes]]
domains = ["sink.test"]
type = "smtp"
next_hops = ["{hop}"]
tls = "none"

[delivery]
retry_interval = "1h"
"#,
        port = addr.port(),
        hop = sink.addr,
    );
    let config = ClusterConfig::parse("test.toml", &text, dir.path()).unwrap();
    let material = Worker::prepare(&config).unwrap();
    let snapshot = LoadedConfig {
        config: Arc::new(config),
        sha256: ferry_node::sha256_hex(text.as_bytes()),
        source: Source::File("test.toml".into()),
    }
    .into_snapshot(1, material);
    let journal = Journal::open_with(dir.path(), SEGMENT).unwrap();
    let worker = Worker::new(
        WorkerOptions {
            listen: "127.0.0.1".parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            hostname: "relay.test".into(),
        },
        snapshot,
        Arc::new(journal.clone()),
    );
    worker.adopt(addr.port(), listener).await;
    let shutdown = worker.shutdown_token();
    tokio::spawn(Deliverer::new(Arc::clone(worker.core()), journal.clone()).run(shutdown.clone()));
    let serving = tokio::spawn(Arc::clone(&worker).run(Duration::from_secs(10)));

    // The message that waits: its next hop answers 450, and the next try
    // is an hour away.
    let waiting = message("waiting");
    let (mut c, _) = SmtpClient::connect(addr, None).await;
    c.cmd("EHLO app").await;
    send(&mut c, "temp@sink.test", &waiting).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let deferred = loop {
        let m = journal.messages().unwrap();
        if let Some(m) = m.iter().find(|m| m.state.attempts == 1) {
            break m.id.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "never deferred");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // The spool's size, sampled while the rest passes.
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done, data) = (
            Arc::clone(&peak),
            Arc::clone(&done),
            dir.path().to_path_buf(),
        );
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(spool_bytes(&data), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut sessions = Vec::new();
    for s in 0..SESSIONS {
        sessions.push(tokio::spawn(async move {
            let (mut c, _) = SmtpClient::connect(addr, None).await;
            c.cmd("EHLO app").await;
            for n in 0..MESSAGES / SESSIONS {
                send(&mut c, "ok@sink.test", &message(&format!("m{s}-{n}"))).await;
            }
            c.cmd("QUIT").await;
        }));
    }
    for s in sessions {
        s.await.unwrap();
    }
    let got = sink.wait_for(MESSAGES, WAIT).await;
    assert_eq!(got.len(), MESSAGES);
    assert!(got.iter().all(|m| m.rcpt_to == ["ok@sink.test"]));
    // Retiring the last of them lets the spool settle.
    let deadline = tokio::time::Instant::now() + WAIT;
    while journal.counts().messages > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let peak = peak.load(Ordering::Relaxed);
    let passed = (MESSAGES * MESSAGE) as u64;
    // Without compaction the spool would hold all 200 MB behind the
    // waiting message. With it: a few segments plus what is in flight.
    assert!(
        peak < passed / 4,
        "spool peaked at {peak} bytes while {passed} passed"
    );

    // The waiting message is still there, once, deferred, whole.
    let live = journal.messages().unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].id, deferred);
    assert_eq!(live[0].state.attempts, 1);
    assert!(matches!(
        live[0].state.recipients[0].state,
        RecipientState::Deferred { .. }
    ));
    let body = journal.body(&live[0]).unwrap();
    assert!(body.ends_with(&waiting), "the waiting message changed");

    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), serving).await;
    drop((worker, journal));
    // A restart reads it back the same, once.
    let again = ferry_queue::journal::scan(dir.path()).unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].0, deferred);
    assert!(again[0].2.ends_with(&waiting));
    eprintln!("spool peak: {peak} bytes for {passed} bytes through");
}
