//! End to end through the real `ferry balancer` in front of two real
//! `ferry worker` processes on 127.0.0.11 and 127.0.0.12: the client's IP
//! survives (PROXY v2), the balancer's access list, failover when a worker
//! dies, drain, and no worker at all.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_tests::binary::{http, http_with, WorkerProcess};
use ferry_tests::{free_port, SmtpClient};

const WORKERS: [&str; 2] = ["127.0.0.11", "127.0.0.12"];
/// The probes' `interval` (in ms) and `fall` in the cluster's config.
const PROBE_INTERVAL_MS: u64 = 500;
const FALL: u64 = 2;

struct Cluster {
    _dir: tempfile::TempDir,
    config: PathBuf,
    balancer: WorkerProcess,
    workers: Vec<WorkerProcess>,
    front: SocketAddr,
}

fn ip(s: &str) -> Option<IpAddr> {
    Some(s.parse().unwrap())
}

/// A port free on both worker addresses and the balancer's.
fn shared_port() -> u16 {
    loop {
        let p = free_port(ip("127.0.0.11").unwrap());
        let free_on = |a: &str| std::net::TcpListener::bind((a, p)).is_ok();
        if free_on("127.0.0.12") && free_on("127.0.0.1") {
            return p;
        }
    }
}

fn write_config(dir: &Path, worker_port: u16, balancer_port: u16) -> PathBuf {
    let text = format!(
        r#"
accepted_domains = [{{ domain = "example.test", kind = "authoritative" }}]
trusted_proxies = ["127.0.0.1/32"]

[[connectors]]
name = "Default Frontend"
port = {worker_port}
remote_ranges = ["0.0.0.0/0"]
permissions = ["anonymous"]
banner = "Default Frontend ready"

[[connectors]]
name = "Anon Relay"
port = {worker_port}
remote_ranges = ["127.0.0.30/32"]
permissions = ["anonymous", "accept_any_recipient"]
banner = "Anon Relay ready"

[[routes]]
domains = ["*"]
type = "directory"
path = "mail"

[balancer]
allow = ["127.0.0.0/8"]
deny = ["127.0.0.66/32"]
handoff_timeout = "2s"
probe = {{ interval = "{PROBE_INTERVAL_MS}ms", timeout = "1s", rise = 2, fall = {FALL} }}

[[balancer.listeners]]
name = "smtp"
port = {balancer_port}
backend_port = {worker_port}

[[balancer.backends]]
name = "w1"
address = "127.0.0.11"

[[balancer.backends]]
name = "w2"
address = "127.0.0.12"
"#
    );
    let path = dir.join("ferry.toml");
    std::fs::write(&path, text).unwrap();
    path
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let worker_port = shared_port();
        let balancer_port = free_port(ip("127.0.0.1").unwrap());
        let config = write_config(dir.path(), worker_port, balancer_port);
        let workers = (0..WORKERS.len())
            .map(|i| Cluster::worker(dir.path(), &config, i))
            .collect();
        let balancer = WorkerProcess::balancer(&config, "127.0.0.1", dir.path());
        let front = balancer.smtp[0];
        Cluster {
            _dir: dir,
            config,
            balancer,
            workers,
            front,
        }
    }

    /// Starts worker `i` (`w1.test` on 127.0.0.11, ...) on its data
    /// directory under `dir`.
    fn worker(dir: &Path, config: &Path, i: usize) -> WorkerProcess {
        let data = dir.join(format!("w{}", i + 1));
        WorkerProcess::start_as(config, WORKERS[i], &data, &format!("w{}.test", i + 1))
    }

    /// The worker that serves a session, from its EHLO reply.
    async fn ehlo_name(c: &mut SmtpClient) -> String {
        let r = c.cmd("EHLO device").await;
        r.get(4..)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    }

    /// Waits (bounded) until the balancer's view of `backend` satisfies
    /// `want`; how long that took.
    fn wait_backend(&self, backend: &str, want: impl Fn(&serde_json::Value) -> bool) -> Duration {
        self.balancer
            .wait_backend(backend, Duration::from_secs(20), want)
    }

    /// The worker a new session through the balancer gets.
    async fn next_worker(&self) -> String {
        let (mut c, _) = SmtpClient::connect(self.front, ip("127.0.0.31")).await;
        let name = Cluster::ehlo_name(&mut c).await;
        c.cmd("QUIT").await;
        name
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_ip_survives_the_balancer() {
    let cl = Cluster::start();
    // 127.0.0.30 gets the Anon Relay connector and may relay.
    let (mut c, banner) = SmtpClient::connect(cl.front, ip("127.0.0.30")).await;
    assert_eq!(banner, "220 Anon Relay ready");
    c.cmd("EHLO app").await;
    c.cmd("MAIL FROM:<app@example.test>").await;
    assert_eq!(
        c.cmd("RCPT TO:<x@elsewhere.test>").await,
        "250 2.1.5 Recipient OK"
    );
    // Any other client gets the Default Frontend, which may not.
    let (mut c, banner) = SmtpClient::connect(cl.front, ip("127.0.0.31")).await;
    assert_eq!(banner, "220 Default Frontend ready");
    c.cmd("EHLO app").await;
    c.cmd("MAIL FROM:<app@example.test>").await;
    assert_eq!(
        c.cmd("RCPT TO:<x@elsewhere.test>").await,
        "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
    );
    // A client the balancer's access list denies never reaches a worker.
    let (mut c, refused) = SmtpClient::connect(cl.front, ip("127.0.0.66")).await;
    assert_eq!(refused, "554 5.7.1 Access denied");
    assert!(c.is_closed().await);
    // Sessions spread over both workers.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let (mut c, _) = SmtpClient::connect(cl.front, ip("127.0.0.31")).await;
        seen.insert(Cluster::ehlo_name(&mut c).await);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["w1.test", "w2.test"]);
    let (_, status) = http(&cl.balancer.admin, "GET", "/status");
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["role"], "balancer");
    assert_eq!(v["ready"], true);
    assert_eq!(v["listeners"][0]["eligible_backends"], 2);
    let (_, metrics) = http(&cl.balancer.admin, "GET", "/metrics");
    assert!(
        metrics.contains(r#"ferry_balancer_connections_total{listener="smtp",result="denied"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_costs_no_client_a_connection() {
    let mut cl = Cluster::start();
    // Four clients keep connecting, 40 sessions each; the first worker
    // dies (SIGKILL) while they do.
    let front = cl.front;
    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|k| {
            let done = Arc::clone(&done);
            tokio::spawn(async move {
                let mut cut = 0;
                for i in 0..40 {
                    let (mut c, banner) = SmtpClient::connect(front, ip("127.0.0.31")).await;
                    assert_eq!(
                        banner, "220 Default Frontend ready",
                        "client {k} session {i}"
                    );
                    // A session open on the worker as it dies dies with it.
                    match c.cmd("QUIT").await.as_str() {
                        "221 2.0.0 Service closing transmission channel" => {}
                        "" => cut += 1,
                        other => panic!("{other}"),
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                cut
            })
        })
        .collect();
    // The kill comes once the clients are under way.
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.load(Ordering::SeqCst) < 8 {
        assert!(Instant::now() < deadline, "the clients did not get going");
        std::thread::sleep(Duration::from_millis(5));
    }
    cl.workers[0].kill();
    // Probes mark it down within fall × interval (1 s); 400 ms more is a
    // margin for a busy machine, short of one more probe.
    let down_after = cl.wait_backend("w1", |b| b["up"] == false);
    let promised = Duration::from_millis(FALL * PROBE_INTERVAL_MS);
    assert!(
        down_after < promised + Duration::from_millis(400),
        "down {down_after:?} after the kill"
    );
    let mut cut = 0;
    for c in clients {
        cut += c.await.expect("a client connection failed");
    }
    assert!(
        cut <= 4,
        "{cut} sessions cut: more than the ones open at the kill"
    );
    let (_, metrics) = http(&cl.balancer.admin, "GET", "/metrics");
    assert!(metrics.contains(r#"ferry_balancer_backend_up{listener="smtp",backend="w1"} 0"#));
    // Not only 1 or 0: the HELP text says what a worker a reload removed
    // reads, as the exporter keeps its series until a restart.
    for name in [
        "ferry_balancer_backend_up",
        "ferry_balancer_backend_draining",
    ] {
        let help = metrics
            .lines()
            .find(|l| l.starts_with(&format!("# HELP {name} ")))
            .unwrap_or_else(|| panic!("no HELP for {name}"));
        assert!(
            help.contains("removed") && help.contains("NaN") && help.contains("restart"),
            "{help}"
        );
    }

    // Started again, it passes `rise` probes and gets sessions again.
    cl.workers[0] = Cluster::worker(cl._dir.path(), &cl.config, 0);
    cl.wait_backend("w1", |b| b["up"] == true && b["eligible"] == true);
    let gauge = r#"ferry_balancer_backend_up{listener="smtp",backend="w1"}"#;
    assert_eq!(cl.balancer.metric(gauge), Some(1.0));
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        seen.insert(cl.next_worker().await);
    }
    assert!(seen.contains("w1.test"), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_worker_finishes_its_session_and_gets_no_new_ones() {
    let cl = Cluster::start();
    let (mut open, banner) = SmtpClient::connect(cl.front, ip("127.0.0.31")).await;
    assert_eq!(banner, "220 Default Frontend ready");
    let name = Cluster::ehlo_name(&mut open).await;
    let backend = name.trim_end_matches(".test").to_string();
    // Operations need the balancer's token.
    let drain = format!("/backends/{backend}/drain");
    let (status, _) = http(&cl.balancer.admin, "POST", &drain);
    assert_eq!(status, 401);
    let (status, _) = http_with(
        &cl.balancer.admin,
        "POST",
        &drain,
        Some("not-the-token-at-all"),
    );
    assert_eq!(status, 401);
    let (status, _) = cl.balancer.admin_call("POST", &drain);
    assert_eq!(status, 200);
    // /backends shows it drained, out of rotation, with its one session.
    let v = cl.balancer.backend(&backend);
    assert!(
        v["up"] == true && v["draining"] == true && v["eligible"] == false && v["active"] == 1,
        "{v}"
    );
    let draining =
        format!(r#"ferry_balancer_backend_draining{{listener="smtp",backend="{backend}"}}"#);
    assert_eq!(cl.balancer.metric(&draining), Some(1.0));
    for _ in 0..8 {
        assert_ne!(cl.next_worker().await, name);
    }
    // The open session on the drained worker completes a message.
    assert_eq!(
        open.cmd("MAIL FROM:<a@example.test>").await,
        "250 2.1.0 Sender OK"
    );
    assert_eq!(
        open.cmd("RCPT TO:<b@example.test>").await,
        "250 2.1.5 Recipient OK"
    );
    assert!(open.cmd("DATA").await.starts_with("354"));
    open.send(b"Subject: drained\r\n\r\nstill here\r\n.\r\n")
        .await
        .unwrap();
    assert!(open.reply().await.starts_with("250 2.6.0"));
    assert_eq!(
        open.cmd("QUIT").await,
        "221 2.0.0 Service closing transmission channel"
    );
    drop(open);
    // Its last session over, it shows "active": 0 (when an upgrade may
    // stop it).
    cl.wait_backend(&backend, |v| v["active"] == 0 && v["draining"] == true);
    let (status, _) = cl.balancer.admin_call("POST", "/backends/nope/drain");
    assert_eq!(status, 404);

    // Undrained, it is back in rotation and gets sessions again.
    let (status, _) = http(
        &cl.balancer.admin,
        "POST",
        &format!("/backends/{backend}/undrain"),
    );
    assert_eq!(status, 401);
    let (status, _) = cl
        .balancer
        .admin_call("POST", &format!("/backends/{backend}/undrain"));
    assert_eq!(status, 200);
    let v = cl.balancer.backend(&backend);
    assert!(v["draining"] == false && v["eligible"] == true, "{v}");
    assert_eq!(cl.balancer.metric(&draining), Some(0.0));
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        seen.insert(cl.next_worker().await);
    }
    assert!(seen.contains(&name), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_worker_means_an_immediate_421() {
    let mut cl = Cluster::start();
    for w in &mut cl.workers {
        w.kill();
    }
    // Before the probes notice, the handoff fails over and gives up; after,
    // no worker is even tried. Either way: 421 at once, never silence.
    for _ in 0..2 {
        let started = Instant::now();
        let (mut c, reply) = SmtpClient::connect(cl.front, ip("127.0.0.31")).await;
        assert_eq!(
            reply,
            "421 4.3.2 Service not available, closing transmission channel"
        );
        assert!(c.is_closed().await);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        cl.wait_backend("w2", |b| b["up"] == false);
    }
    let (status, _) = http(&cl.balancer.admin, "GET", "/readyz");
    assert_eq!(status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_open_sessions_finish() {
    let cl = Cluster::start();
    let front = cl.front;
    let (mut open, banner) = SmtpClient::connect(front, ip("127.0.0.31")).await;
    assert_eq!(banner, "220 Default Frontend ready");
    let Cluster {
        mut balancer,
        _dir,
        workers,
        ..
    } = cl;
    let exited = tokio::task::spawn_blocking(move || balancer.terminate());
    // New clients are no longer accepted...
    let deadline = Instant::now() + Duration::from_secs(10);
    while SmtpClient::connect_from(front, ip("127.0.0.31"))
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...while the open session completes a message.
    open.cmd("EHLO device").await;
    assert_eq!(
        open.cmd("MAIL FROM:<a@example.test>").await,
        "250 2.1.0 Sender OK"
    );
    assert_eq!(
        open.cmd("RCPT TO:<b@example.test>").await,
        "250 2.1.5 Recipient OK"
    );
    assert!(open.cmd("DATA").await.starts_with("354"));
    open.send(b"Subject: last\r\n\r\nbefore the end\r\n.\r\n")
        .await
        .unwrap();
    assert!(open.reply().await.starts_with("250 2.6.0"));
    assert_eq!(
        open.cmd("QUIT").await,
        "221 2.0.0 Service closing transmission channel"
    );
    drop(open);
    let status = exited.await.unwrap().expect("balancer did not exit");
    assert!(status.success());
    drop(workers);
}
