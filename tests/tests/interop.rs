//! Interoperability with real peers from Debian's packages:
//! - Ferry's balancer in front of Postfix (`smtpd_upstream_proxy_protocol =
//!   haproxy`): Postfix logs the original client's address;
//! - HAProxy (`send-proxy-v2`, `option smtpchk`) in front of a Ferry
//!   worker: the worker sees the original client, and HAProxy's checks
//!   pass.
//!
//! `.ci/run` installs postfix and haproxy. Without them (or without root,
//! which a private Postfix instance needs) each test says why and skips.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::binary::{http, WorkerProcess};
use ferry_tests::{free_port, SmtpClient};

fn ip(s: &str) -> Option<IpAddr> {
    Some(s.parse().unwrap())
}

fn missing(what: &str) -> Option<String> {
    ferry_tests::missing_command(what, ".ci/run installs it")
}

fn not_root() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().unwrap();
    (String::from_utf8_lossy(&uid.stdout).trim() != "0")
        .then(|| "a private Postfix instance needs root".to_string())
}

fn skip(reasons: &[Option<String>]) -> bool {
    ferry_tests::skip_for_want_of(reasons)
}

/// Waits (bounded) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Postfix instance of our own (its own config, queue and log) with
/// one smtpd on `port` that expects PROXY headers.
struct Postfix {
    dir: tempfile::TempDir,
}

impl Postfix {
    fn start(port: u16) -> Postfix {
        let dir = tempfile::Builder::new()
            .prefix("ferry-postfix")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        for sub in ["etc", "queue", "data"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        // Postfix's daemons run as `postfix` and must reach the queue.
        Command::new("chmod").arg("755").arg(d).status().unwrap();
        Command::new("chown")
            .arg("postfix")
            .arg(d.join("data"))
            .status()
            .unwrap();
        let main_cf = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {q}\n\
             data_directory = {data}\n\
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             maillog_file_prefixes = {root}\n\
             maillog_file = {root}/maillog\n\
             myhostname = interop.test\n\
             mydestination =\n\
             mynetworks = 127.0.0.0/8\n\
             smtpd_relay_restrictions = permit_mynetworks, reject\n",
            q = d.join("queue").display(),
            data = d.join("data").display(),
            root = d.display(),
        );
        std::fs::write(d.join("etc/main.cf"), main_cf).unwrap();
        // The system's master.cf, with our smtpd instead of the usual one.
        let master = std::fs::read_to_string("/etc/postfix/master.cf")
            .or_else(|_| std::fs::read_to_string("/usr/share/postfix/master.cf.dist"))
            .unwrap();
        let mut ours: Vec<String> = master
            .lines()
            .filter(|l| {
                let first = l.split_whitespace().next().unwrap_or("");
                let usual_smtpd = first == "smtp" && l.contains(" inet ");
                let other_listener = first.contains(':');
                !(usual_smtpd || other_listener)
            })
            .map(String::from)
            .collect();
        ours.push(format!(
            "127.0.0.1:{port} inet n - n - - smtpd -o smtpd_upstream_proxy_protocol=haproxy"
        ));
        std::fs::write(d.join("etc/master.cf"), ours.join("\n") + "\n").unwrap();
        let status = Command::new("postfix")
            .arg("-c")
            .arg(d.join("etc"))
            .arg("start")
            .status()
            .unwrap();
        assert!(
            status.success(),
            "postfix did not start: {}",
            Postfix::read_log(d)
        );
        Postfix { dir }
    }

    fn read_log(d: &Path) -> String {
        std::fs::read_to_string(d.join("maillog")).unwrap_or_default()
    }

    fn log(&self) -> String {
        Postfix::read_log(self.dir.path())
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(self.dir.path().join("etc"))
            .arg("stop")
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferry_balancer_in_front_of_postfix() {
    if skip(&[missing("postfix"), not_root()]) {
        return;
    }
    let postfix_port = free_port(ip("127.0.0.1").unwrap());
    let postfix = Postfix::start(postfix_port);
    let dir = tempfile::tempdir().unwrap();
    let balancer_port = free_port(ip("127.0.0.1").unwrap());
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[balancer]
allow = ["127.0.0.0/8"]
probe = {{ interval = "300ms", timeout = "2s", rise = 1, fall = 2 }}

[[balancer.listeners]]
name = "smtp"
port = {balancer_port}
backend_port = {postfix_port}

[[balancer.backends]]
name = "postfix"
address = "127.0.0.1"
"#
        ),
    )
    .unwrap();
    let balancer = WorkerProcess::balancer(&config, "127.0.0.1", dir.path());
    let (mut c, banner) = SmtpClient::connect(balancer.smtp[0], ip("127.0.0.77")).await;
    assert!(
        banner.starts_with("220 interop.test ESMTP Postfix"),
        "{banner}"
    );
    assert!(c.cmd("EHLO device").await.starts_with("250-interop.test"));
    assert_eq!(c.cmd("QUIT").await, "221 2.0.0 Bye");
    // Postfix saw the client's own address, not the balancer's.
    eventually("postfix to log the client", || {
        postfix.log().contains("connect from unknown[127.0.0.77]")
    });
    // The balancer's probes (PROXY v2 LOCAL, EHLO, QUIT) run and pass,
    // and keep Postfix up. A backend starts up, so only the probes'
    // own traces show they ran: the balancer's count of them, and the
    // sessions Postfix logs from the balancer's address with an EHLO and
    // a QUIT (the client's came from 127.0.0.77).
    let probed = |log: &str| {
        log.lines()
            .filter(|l| l.contains("disconnect from") && l.contains("[127.0.0.1]"))
            .filter(|l| l.contains(" ehlo=1 quit=1 commands=2"))
            .count()
    };
    let count = r#"ferry_balancer_probe_duration_seconds_count{backend="postfix"}"#;
    eventually("three probes to pass", || {
        balancer.metric(count).unwrap_or(0.0) >= 3.0 && probed(&postfix.log()) >= 3
    });
    assert_eq!(balancer.backend("postfix")["up"], true);
    let (_, metrics) = http(&balancer.admin, "GET", "/metrics");
    assert!(
        !metrics.contains("ferry_balancer_probe_failures_total"),
        "{metrics}\n{}",
        postfix.log()
    );
}

/// HAProxy in the foreground, killed when dropped.
struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_in_front_of_a_ferry_worker() {
    if skip(&[missing("haproxy")]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let worker_port = free_port(ip("127.0.0.1").unwrap());
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
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
"#
        ),
    )
    .unwrap();
    let worker = WorkerProcess::start(&config, "127.0.0.1", &dir.path().join("data"));
    let (front, stats) = (
        free_port(ip("127.0.0.1").unwrap()),
        free_port(ip("127.0.0.1").unwrap()),
    );
    let cfg: PathBuf = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
             frontend smtp\n  bind 127.0.0.1:{front}\n  default_backend workers\n\
             backend workers\n  option smtpchk EHLO haproxy.test\n  \
             server w1 127.0.0.1:{worker_port} send-proxy-v2 check inter 300ms rise 1 fall 2\n\
             listen stats\n  mode http\n  bind 127.0.0.1:{stats}\n  stats enable\n  stats uri /stats\n"
        ),
    )
    .unwrap();
    let _haproxy = Haproxy(
        Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stats_url = format!("http://127.0.0.1:{stats}");
    // HAProxy's SMTP checks (PROXY v2 LOCAL, EHLO) pass.
    eventually("HAProxy to see the worker UP", || {
        std::net::TcpStream::connect(("127.0.0.1", stats)).is_ok() && {
            let (_, csv) = http(&stats_url, "GET", "/stats;csv");
            csv.lines()
                .any(|l| l.starts_with("workers,w1,") && l.contains(",UP,"))
        }
    });
    // The worker sees the original client: 127.0.0.30 gets the Anon
    // Relay connector through HAProxy, anyone else the Default Frontend.
    let addr = format!("127.0.0.1:{front}").parse().unwrap();
    let (mut c, banner) = SmtpClient::connect(addr, ip("127.0.0.30")).await;
    assert_eq!(banner, "220 Anon Relay ready");
    c.cmd("EHLO app").await;
    c.cmd("MAIL FROM:<app@example.test>").await;
    assert_eq!(
        c.cmd("RCPT TO:<x@elsewhere.test>").await,
        "250 2.1.5 Recipient OK"
    );
    let (_c, banner) = SmtpClient::connect(addr, ip("127.0.0.31")).await;
    assert_eq!(banner, "220 Default Frontend ready");
    // HAProxy's headers (sessions and checks) were all taken.
    let refused = r#"ferry_smtp_connections_refused_total{reason="proxy_header"}"#;
    assert_eq!(worker.metric(refused), Some(0.0));
}
