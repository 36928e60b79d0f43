//! Nothing acknowledged is lost: clients send messages while the worker is
//! killed with SIGKILL again and again and restarted on the same data
//! directory; in the end every message that got a `250` has reached its
//! destination, byte for byte and to its recipient. Half go to a next hop
//! (a real SMTP sink on loopback) that refuses them for now (`450` to every
//! recipient) until the last kill, after which the load has stopped: so each
//! of those was delivered by a process that never received it, read back
//! from the spool. The other half go to a directory route, delivered while
//! the kills go on, where a re-delivery after a crash replaces its own file
//! (no duplicates) and no temp file is left behind.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_tests::binary::WorkerProcess;
use ferry_tests::sink::SmtpSink;
use ferry_tests::{free_port, SmtpClient};

const KILLS: usize = 20;
const CLIENTS: usize = 8;
/// Bounds on the load: the kills end it, or whichever of these comes first
/// (the test fails if one does).
const MAX_MESSAGES: usize = 20_000;
const MAX_LOAD_TIME: Duration = Duration::from_secs(90);
/// How long a restarted worker may take to acknowledge its first message.
const FIRST_ACK_WAIT: Duration = Duration::from_secs(30);

/// Where message `n` goes: odd ones to the directory route.
fn to_directory(n: usize) -> bool {
    n % 2 == 1
}

/// Message `n`'s recipient. The sink answers `450` to a `temp…` local
/// part until told to take everything.
fn recipient(n: usize) -> String {
    if to_directory(n) {
        format!("r{n}@dir.test")
    } else {
        format!("temp{n}@sink.test")
    }
}

/// Message `n` as sent after DATA (without the final `.CRLF`): about
/// 4 KB, every line its own, so a message put together from pieces of
/// others, or cut, does not compare equal.
fn message(n: usize) -> String {
    let mut m = format!("Subject: crash-{n}\r\nMessage-ID: <crash-{n}@example.test>\r\n\r\n");
    for line in 0..50u64 {
        let word = (n as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ line;
        m.push_str(&format!(
            "{n:08} {line:02} {word:016x} {}\r\n",
            "x".repeat(50)
        ));
    }
    m
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

/// How one session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Session {
    /// `250` after DATA.
    Acked,
    /// No greeting: the worker was down.
    Refused,
    /// Greeted, then the connection broke before the reply to DATA's end:
    /// a kill cut it.
    Cut,
    /// Greeted, then a reply that was not the one expected.
    Other,
}

/// One SMTP session sending message `n`.
async fn send_one(addr: SocketAddr, n: usize) -> Session {
    let Ok(mut c) = SmtpClient::connect_from(addr, None).await else {
        return Session::Refused;
    };
    if !c.reply().await.starts_with("220") {
        return Session::Refused;
    }
    let commands = format!(
        "HELO crash\r\nMAIL FROM:<load@example.test>\r\nRCPT TO:<{}>\r\nDATA\r\n",
        recipient(n)
    );
    if c.send(commands.as_bytes()).await.is_err() {
        return Session::Cut;
    }
    for want in ["250", "250", "250", "354"] {
        let reply = c.reply().await;
        if reply.is_empty() {
            return Session::Cut;
        }
        if !reply.starts_with(want) {
            return Session::Other;
        }
    }
    if c.send(format!("{}.\r\n", message(n)).as_bytes())
        .await
        .is_err()
    {
        return Session::Cut;
    }
    let reply = c.reply().await;
    let _ = c.send(b"QUIT\r\n").await;
    match reply {
        r if r.starts_with("250 2.6.0") => Session::Acked,
        r if r.is_empty() => Session::Cut,
        _ => Session::Other,
    }
}

/// What the clients saw.
#[derive(Default)]
struct Load {
    acked: HashSet<usize>,
    sessions: HashMap<&'static str, usize>,
}

impl Load {
    fn count(&mut self, n: usize, s: Session) {
        if s == Session::Acked {
            self.acked.insert(n);
        }
        let name = match s {
            Session::Acked => "acked",
            Session::Refused => "refused",
            Session::Cut => "cut",
            Session::Other => "other",
        };
        *self.sessions.entry(name).or_default() += 1;
    }
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
    let mut worker = Some(WorkerProcess::start(&config, "127.0.0.1", &data));

    let load = Arc::new(Mutex::new(Load::default()));
    let acked_count = || load.lock().unwrap().acked.len();
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (load, next, stop) = (load.clone(), next.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) && started.elapsed() < MAX_LOAD_TIME {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= MAX_MESSAGES {
                    break;
                }
                let session = send_one(addr, n).await;
                load.lock().unwrap().count(n, session);
                if session != Session::Acked {
                    // The worker is down; come back in a moment.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }

    // Each kill comes after the process killed has acknowledged a message
    // (so the load ran until the last kill) and at a random moment after.
    // After the last one the load stops before the restart: the process
    // that delivers to the sink received none of what it delivers.
    let mut acked_between = Vec::new();
    for kill in 0..KILLS {
        let seen = acked_count();
        let deadline = Instant::now() + FIRST_ACK_WAIT;
        while acked_count() == seen && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let pause = rand_u64() % 300;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let mut killed = worker.take().unwrap();
        tokio::task::spawn_blocking(move || killed.kill())
            .await
            .unwrap();
        acked_between.push(acked_count() - seen);
        if kill + 1 == KILLS {
            stop.store(true, Ordering::SeqCst);
            for c in clients.drain(..) {
                c.await.unwrap();
            }
        }
        let (config, data) = (config.clone(), data.clone());
        worker = Some(
            tokio::task::spawn_blocking(move || WorkerProcess::start(&config, "127.0.0.1", &data))
                .await
                .unwrap(),
        );
        eprintln!("kill {} done after {:?}", kill + 1, started.elapsed());
    }
    let worker = worker.unwrap();
    let Load { acked, sessions } = std::mem::take(&mut *load.lock().unwrap());
    let attempted = next.load(Ordering::SeqCst).min(MAX_MESSAGES);
    eprintln!("acknowledged between kills: {acked_between:?}; sessions: {sessions:?}");
    // The load ran until the last kill, not cut short by its bounds.
    assert!(
        acked_between.iter().all(|n| *n > 0),
        "a worker acknowledged nothing before it was killed: {acked_between:?}"
    );
    assert!(attempted < MAX_MESSAGES && started.elapsed() < MAX_LOAD_TIME);
    // The kills hit sessions in the middle of a transaction.
    let cut = sessions.get("cut").copied().unwrap_or(0);
    assert!(cut >= KILLS / 4, "only {cut} sessions cut by {KILLS} kills");
    assert_eq!(sessions.get("other"), None, "unexpected replies");
    // Nothing reached the sink while the kills went on: what it gets now
    // comes from the spool.
    assert!(
        sink.received().is_empty(),
        "the sink took mail while refusing"
    );
    sink.accept_everything();

    // Every acknowledged message reaches the sink or the folder.
    let acked_in_folder = acked.iter().filter(|n| to_directory(**n)).count();
    let acked_at_sink = acked.len() - acked_in_folder;
    assert!(
        acked_at_sink > 100 && acked_in_folder > 100,
        "too little load got through: {acked_at_sink} for the sink, {acked_in_folder} for the folder"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut counts: HashMap<usize, usize> = HashMap::new();
    let mut folder_counts: HashMap<usize, usize> = HashMap::new();
    let mut damaged = Vec::new();
    loop {
        counts.clear();
        damaged.clear();
        for m in sink.received() {
            let Some(n) = number_in(&String::from_utf8_lossy(&m.data)) else {
                damaged.push(format!("at the sink without a number: {:?}", m.rcpt_to));
                continue;
            };
            *counts.entry(n).or_default() += 1;
            // Byte for byte, below the worker's `Received:` field, from the
            // sender to the recipient.
            if !m.data.ends_with(message(n).as_bytes())
                || !m.data.starts_with(b"Received: ")
                || m.mail_from != "load@example.test"
                || m.rcpt_to != [recipient(n)]
            {
                damaged.push(format!(
                    "{n} at the sink: {:?} -> {:?}",
                    m.mail_from, m.rcpt_to
                ));
            }
        }
        // Reading every file only once there may be enough of them.
        let (eml, _) = folder_names(&folder);
        if eml.len() >= acked_in_folder {
            folder_counts.clear();
            for name in eml {
                let bytes = std::fs::read(folder.join(&name)).unwrap_or_default();
                let text = String::from_utf8_lossy(&bytes);
                let Some(n) = number_in(&text) else {
                    damaged.push(format!("{name} without a number"));
                    continue;
                };
                *folder_counts.entry(n).or_default() += 1;
                let envelope = format!(
                    "X-Ferry-Mail-From: <load@example.test>\r\nX-Ferry-Rcpt-To: <{}>\r\n",
                    recipient(n)
                );
                if !bytes.ends_with(message(n).as_bytes()) || !text.contains(&envelope) {
                    damaged.push(format!("{name} (message {n}) differs"));
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
    let duplicates: Vec<(&usize, &usize)> = counts.iter().filter(|(_, c)| **c > 1).collect();
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
        let (status, body) = worker.admin_call("GET", "/queue");
        if (status == 200 && body.contains("\"messages\":[]")) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, leftovers) = folder_names(&folder);
    eprintln!(
        "crash test: {KILLS} SIGKILLs, {attempted} sessions tried, {cut} cut, {} acknowledged \
         ({acked_at_sink} delivered from the spool after the last kill), {} lost, {} damaged, \
         {} duplicates at the next hop, {} in the folder, \
         {unacked_delivered} delivered without an acknowledgement, {} temp files left",
        acked.len(),
        lost.len(),
        damaged.len(),
        duplicates.len(),
        folder_duplicates.len(),
        leftovers.len()
    );
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
    assert!(damaged.is_empty(), "delivered damaged: {damaged:?}");
    // No crash after the sink began to take mail: each exactly once.
    assert!(
        duplicates.is_empty(),
        "at the sink more than once: {duplicates:?}"
    );
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
