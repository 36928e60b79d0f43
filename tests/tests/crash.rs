//! Nothing acknowledged is lost: clients send messages while the worker is
//! killed with SIGKILL again and again and restarted on the same data
//! directory; in the end every message that got a `250` has reached its
//! destination: half go to a next hop (a real SMTP sink on loopback), half
//! to a directory route, where a re-delivery after a crash replaces its
//! own file (no duplicates) and no temp file is left behind.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_tests::binary::WorkerProcess;
use ferry_tests::sink::SmtpSink;
use ferry_tests::{free_port, SmtpClient};

const KILLS: usize = 20;
const CLIENTS: usize = 8;
/// Bounds on the load: the kills end it, or whichever of these comes first.
const MAX_MESSAGES: usize = 20_000;
const MAX_LOAD_TIME: Duration = Duration::from_secs(90);

/// Where message `n` goes: odd ones to the directory route.
fn to_directory(n: usize) -> bool {
    n % 2 == 1
}

/// The message number in a `Subject: crash-N` line.
fn number_in(text: &str) -> Option<usize> {
    text.split("Subject: crash-")
        .nth(1)
        .and_then(|rest| rest.split("\r\n").next())
        .and_then(|n| n.parse().ok())
}

/// The names of the files in `folder`: `.eml` files and temp files.
fn folder_names(folder: &Path) -> (Vec<String>, Vec<String>) {
    let names: Vec<String> = std::fs::read_dir(folder)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let (tmp, eml) = names.into_iter().partition(|n| n.ends_with(".tmp"));
    (eml, tmp)
}

/// One SMTP session sending message `n`; true if it got a 250 after DATA.
async fn send_one(addr: SocketAddr, n: usize) -> bool {
    let Ok(mut c) = SmtpClient::connect_from(addr, None).await else {
        return false;
    };
    if !c.reply().await.starts_with("220") {
        return false;
    }
    let domain = if to_directory(n) {
        "dir.test"
    } else {
        "sink.test"
    };
    let body = format!(
        "HELO crash\r\nMAIL FROM:<load@example.test>\r\nRCPT TO:<r{n}@{domain}>\r\nDATA\r\n"
    );
    if c.send(body.as_bytes()).await.is_err() {
        return false;
    }
    for want in ["250", "250", "250", "354"] {
        if !c.reply().await.starts_with(want) {
            return false;
        }
    }
    let msg = format!("Subject: crash-{n}\r\n\r\n{}\r\n.\r\n", "x".repeat(4000));
    if c.send(msg.as_bytes()).await.is_err() {
        return false;
    }
    let acked = c.reply().await.starts_with("250 2.6.0");
    let _ = c.send(b"QUIT\r\n").await;
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_nothing() {
    let sink = SmtpSink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let port = free_port(ip);
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[connectors]]
name = "Load"
port = {port}
remote_ranges = ["127.0.0.0/8"]
permissions = ["anonymous", "accept_any_recipient"]
limits = {{ max_connections_per_source = 1000 }}

[[routes]]
domains = ["dir.test"]
type = "directory"
path = "folder"

[[routes]]
domains = ["*"]
type = "smtp"
next_hops = ["{}"]
tls = "none"

[delivery]
retry_interval = "1s"
"#,
            sink.addr
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let folder = dir.path().join("folder");
    let addr = SocketAddr::new(ip, port);
    let worker = Arc::new(Mutex::new(Some(WorkerProcess::start(
        &config,
        "127.0.0.1",
        &data,
    ))));

    let acked = Arc::new(Mutex::new(HashSet::new()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (acked, next, stop) = (acked.clone(), next.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) && started.elapsed() < MAX_LOAD_TIME {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= MAX_MESSAGES {
                    break;
                }
                if send_one(addr, n).await {
                    acked.lock().unwrap().insert(n);
                } else {
                    // The worker is down; come back in a moment.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }

    for kill in 0..KILLS {
        let pause = 100 + (rand_u64() % 300);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let w = worker.clone();
        let config = config.clone();
        let data = data.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = w.lock().unwrap();
            drop(guard.take()); // SIGKILL (kill on drop), then wait
            *guard = Some(WorkerProcess::start(&config, "127.0.0.1", &data));
        })
        .await
        .unwrap();
        eprintln!("kill {} done after {:?}", kill + 1, started.elapsed());
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let acked: HashSet<usize> = acked.lock().unwrap().clone();
    let attempted = next.load(Ordering::SeqCst).min(MAX_MESSAGES);
    assert!(
        acked.len() > 200,
        "too little load got through: {}",
        acked.len()
    );

    // Every acknowledged message reaches the sink or the folder.
    let acked_in_folder = acked.iter().filter(|n| to_directory(**n)).count();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut counts: HashMap<usize, usize> = HashMap::new();
    let mut folder_counts: HashMap<usize, usize> = HashMap::new();
    loop {
        counts.clear();
        for m in sink.received() {
            if let Some(n) = number_in(&String::from_utf8_lossy(&m.data)) {
                *counts.entry(n).or_default() += 1;
            }
        }
        // Reading every file only once there may be enough of them.
        let (eml, _) = folder_names(&folder);
        if eml.len() >= acked_in_folder {
            folder_counts.clear();
            for name in eml {
                let text = std::fs::read_to_string(folder.join(name)).unwrap_or_default();
                if let Some(n) = number_in(&text) {
                    *folder_counts.entry(n).or_default() += 1;
                }
            }
        }
        let arrived = |n: &usize| {
            if to_directory(*n) {
                folder_counts.contains_key(n)
            } else {
                counts.contains_key(n)
            }
        };
        if acked.iter().all(arrived) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lost: Vec<&usize> = acked
        .iter()
        .filter(|n| !counts.contains_key(n) && !folder_counts.contains_key(n))
        .collect();
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    let folder_duplicates: Vec<(&usize, &usize)> =
        folder_counts.iter().filter(|(_, c)| **c > 1).collect();
    let unacked_delivered = counts
        .keys()
        .chain(folder_counts.keys())
        .filter(|n| !acked.contains(n))
        .count();
    // Once the queue is empty nothing writes to the folder any more.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = {
            let guard = worker.lock().unwrap();
            guard.as_ref().unwrap().admin_call("GET", "/queue")
        };
        if (status == 200 && body.contains("\"messages\":[]")) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, leftovers) = folder_names(&folder);
    eprintln!(
        "crash test: {KILLS} SIGKILLs, {attempted} sessions tried, {} acknowledged, {} lost, \
         {duplicates} duplicates at the next hop, {} in the folder, \
         {unacked_delivered} delivered without an acknowledgement, {} temp files left",
        acked.len(),
        lost.len(),
        folder_duplicates.len(),
        leftovers.len()
    );
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
    // A re-delivery after a crash replaces its own file.
    assert!(
        folder_duplicates.is_empty(),
        "in the folder more than once: {folder_duplicates:?}"
    );
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    drop(worker);
}

/// A random number (each `RandomState` is seeded afresh).
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}
