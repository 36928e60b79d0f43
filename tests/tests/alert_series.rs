//! The series `deploy/prometheus/alerts.yml` reads, on the live
//! `/metrics` pages of real processes: every selector an alert names
//! (metric and label matchers, read from the file itself) is emitted when
//! its situation happens — a worker under its space floor, a trusted
//! proxy's bad header, deliveries deferred and failed, a refused reload,
//! AUTH cut off and saturated, a balancer listener with no worker, a
//! control-plane node that refuses a version. A series an alert reads
//! through `increase()` must be there at 0 before its first event, or
//! Prometheus never sees that event as an increase.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ferry_tests::binary::{http, user_hash, WorkerProcess};
use ferry_tests::control_plane::{ControlProcess, Pki};
use ferry_tests::sink::SmtpSink;
use ferry_tests::{free_port, make_certificate, plain, SmtpClient};

const WAIT: Duration = Duration::from_secs(20);
const ALERTS: &str = include_str!("../../deploy/prometheus/alerts.yml");

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A series an alert reads: `name` and its label matchers (`=` or `=~`),
/// without the target labels Prometheus adds (`instance`, `job`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Selector {
    name: String,
    matchers: Vec<(String, bool, String)>,
    /// Read through `increase()`.
    counted: bool,
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m: Vec<String> = self
            .matchers
            .iter()
            .map(|(l, re, v)| format!("{l}{}\"{v}\"", if *re { "=~" } else { "=" }))
            .collect();
        write!(f, "{}{{{}}}", self.name, m.join(","))
    }
}

/// Every `ferry_…` selector in the alert rules (expressions and
/// annotations).
fn alert_selectors() -> BTreeSet<Selector> {
    let mut found = BTreeSet::new();
    let mut rest = ALERTS;
    while let Some(at) = rest.find("ferry_") {
        let counted = rest[..at].ends_with("increase(");
        rest = &rest[at..];
        let end = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(rest.len());
        let name = rest[..end].to_string();
        rest = &rest[end..];
        let mut matchers = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let close = inner.find('}').unwrap();
            for m in inner[..close].split(',').filter(|m| !m.trim().is_empty()) {
                let (label, re, value) = match m.split_once("=~") {
                    Some((l, v)) => (l, true, v),
                    None => {
                        let (l, v) = m.split_once('=').unwrap();
                        (l, false, v)
                    }
                };
                let label = label.trim().to_string();
                if label != "instance" && label != "job" {
                    let value = value.trim().trim_matches(['"', '\'']).to_string();
                    matchers.push((label, re, value));
                }
            }
            rest = &inner[close..];
        }
        matchers.sort();
        found.insert(Selector {
            name,
            matchers,
            counted,
        });
    }
    found
}

/// The samples on `page` a selector matches: each alternative of an
/// `=~` matcher must have a series of its own. `None` if one is missing.
fn matching(page: &str, s: &Selector) -> Option<Vec<f64>> {
    let samples: Vec<(&str, f64)> = page
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let labels = series.strip_prefix(&s.name)?;
            (labels.is_empty() || labels.starts_with('{')).then_some((labels, value.parse().ok()?))
        })
        .collect();
    let has = |labels: &str, l: &str, v: &str| labels.contains(&format!("{l}=\"{v}\""));
    let fits = |labels: &str, alt: Option<(&str, &str)>| {
        s.matchers.iter().all(|(l, re, v)| match (re, alt) {
            (true, Some((al, av))) if al == l => has(labels, l, av),
            (true, _) => v.split('|').any(|v| has(labels, l, v)),
            (false, _) => has(labels, l, v),
        })
    };
    for (l, _, v) in s.matchers.iter().filter(|(_, re, _)| *re) {
        for alt in v.split('|') {
            if !samples
                .iter()
                .any(|(labels, _)| fits(labels, Some((l, alt))))
            {
                return None;
            }
        }
    }
    let values: Vec<f64> = samples
        .iter()
        .filter(|(labels, _)| fits(labels, None))
        .map(|(_, v)| *v)
        .collect();
    (!values.is_empty()).then_some(values)
}

/// The alerts' selectors still to be shown on a live page, by name.
struct Checklist(BTreeMap<String, Selector>);

impl Checklist {
    fn new(keep: impl Fn(&Selector) -> bool) -> Self {
        Checklist(
            alert_selectors()
                .into_iter()
                .filter(|s| keep(s))
                .map(|s| (s.to_string(), s))
                .collect(),
        )
    }

    fn get(&self, selector: &str) -> &Selector {
        self.0
            .get(selector)
            .unwrap_or_else(|| panic!("no alert reads {selector}: {:?}", self.0.keys()))
    }

    /// Each series of `node` (its metrics start with `prefix`) an alert
    /// reads through `increase()` is on its page at 0 before its first
    /// event.
    fn at_zero_first(&self, node: &WorkerProcess, prefix: &str, not: &str) {
        let (_, page) = http(&node.admin, "GET", "/metrics");
        let counted = self.0.values().filter(|s| s.counted);
        for s in counted.filter(|s| s.name.starts_with(prefix) && !s.name.starts_with(not)) {
            let values = matching(&page, s).unwrap_or_else(|| panic!("no {s} at start"));
            assert!(values.iter().all(|v| *v == 0.0), "{s} at start: {values:?}");
        }
    }

    /// Waits (bounded) until `selector` is on the page at `admin` with
    /// values (one per series it matches) that `want` accepts, and ticks
    /// it off.
    fn shown(&mut self, admin: &str, selector: &str, want: impl Fn(&[f64]) -> bool) {
        let s = self.get(selector).clone();
        let started = std::time::Instant::now();
        loop {
            let (status, page) = http(admin, "GET", "/metrics");
            assert_eq!(status, 200);
            match matching(&page, &s) {
                Some(values) if want(&values) => break,
                got => assert!(started.elapsed() < WAIT, "{s}: {got:?} on\n{page}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.0.remove(selector);
    }

    /// Every selector has been shown.
    fn done(&self) {
        assert!(self.0.is_empty(), "not shown live: {:?}", self.0.keys());
    }
}

fn worker_config(ports: (u16, u16), sink: SocketAddr, hash: &str, floor: &str) -> String {
    let (relay, devices) = ports;
    format!(
        r#"accepted_domains = [{{ domain = "example.test", kind = "authoritative" }}]
trusted_proxies = ["127.0.0.1/32"]

[[connectors]]
name = "Relay"
port = {relay}
remote_ranges = ["0.0.0.0/0"]
permissions = ["anonymous", "accept_any_recipient"]

[[connectors]]
name = "Devices"
port = {devices}
remote_ranges = ["127.0.0.0/8"]
permissions = ["users"]
auth = ["basic_auth"]
limits = {{ tarpit = "0s" }}

[[users]]
name = "scanner"
password_hash = "{hash}"
allowed_senders = ["*@example.test"]

[[routes]]
domains = ["*"]
type = "smtp"
next_hops = ["{sink}"]
tls = "none"

[spool]
min_free_space = "{floor}"

[auth]
max_verifications = 1
verification_wait = "1ms"
cache_ttl = "0s"
negative_cache_ttl = "0s"
max_failures = 2
"#
    )
}

fn balancer_config(dir: &Path, worker: u16) -> std::path::PathBuf {
    let (front, lonely) = (free_port(ip("127.0.0.1")), free_port(ip("127.0.0.1")));
    // Nothing listens on the lonely listener's backend port.
    let dead = free_port(ip("127.0.0.1"));
    let text = format!(
        r#"[balancer]
allow = ["127.0.0.0/8"]
probe = {{ interval = "200ms", timeout = "1s", rise = 2, fall = 2 }}

[[balancer.listeners]]
name = "smtp"
port = {front}
backend_port = {worker}

[[balancer.listeners]]
name = "lonely"
port = {lonely}
backend_port = {dead}

[[balancer.backends]]
name = "w1"
address = "127.0.0.1"
"#
    );
    let path = dir.join("balancer.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// AUTH PLAIN as scanner with `password` from `source` on `port`.
async fn auth(port: u16, source: &str, password: &str) -> String {
    let addr = SocketAddr::new(ip("127.0.0.1"), port);
    let (mut c, _) = SmtpClient::connect(addr, Some(ip(source))).await;
    c.cmd("EHLO device").await;
    c.cmd(&format!("AUTH PLAIN {}", plain("scanner", password)))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_and_balancer_alerts_read_series_their_situations_emit() {
    let mut list = Checklist::new(|s| !s.name.starts_with("ferry_control_"));
    let dir = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start().await;
    let ports = (free_port(ip("127.0.0.1")), free_port(ip("127.0.0.1")));
    let hash = user_hash("right");
    let config = dir.path().join("ferry.toml");
    std::fs::write(&config, worker_config(ports, sink.addr, &hash, "1MB")).unwrap();
    let w = WorkerProcess::start(&config, "127.0.0.1", &dir.path().join("data"));
    let b = WorkerProcess::balancer(
        &balancer_config(dir.path(), ports.0),
        "127.0.0.1",
        dir.path(),
    );
    list.at_zero_first(&w, "ferry_", "ferry_balancer_");
    list.at_zero_first(&b, "ferry_balancer_", "-");

    // Deliveries: one recipient delivered, one deferred (it waits in the
    // queue), one failed.
    let relay = SocketAddr::new(ip("127.0.0.1"), ports.0);
    let (mut c, _) = SmtpClient::connect(relay, Some(ip("127.0.0.31"))).await;
    c.cmd("EHLO app").await;
    c.cmd("MAIL FROM:<app@example.test>").await;
    for to in ["ok@sink.test", "temp1@sink.test", "perm1@sink.test"] {
        assert_eq!(
            c.cmd(&format!("RCPT TO:<{to}>")).await,
            "250 2.1.5 Recipient OK"
        );
    }
    c.cmd("DATA").await;
    assert!(c
        .cmd("Subject: alerts\r\n\r\nbody\r\n.")
        .await
        .starts_with("250 2.6.0"));
    c.cmd("QUIT").await;
    for result in ["delivered", "deferred|failed"] {
        let op = if result.contains('|') { "=~" } else { "=" };
        let s = format!("ferry_delivery_attempts_total{{result{op}\"{result}\"}}");
        list.shown(&w.admin, &s, |v| v.iter().sum::<f64>() >= 1.0);
    }
    list.shown(&w.admin, "ferry_queue_oldest_message_age_seconds{}", |v| {
        v == [1.0] || v.iter().all(|a| *a >= 1.0)
    });

    // A trusted proxy's connection without a PROXY header.
    let mut c = SmtpClient::connect_from(relay, Some(ip("127.0.0.1")))
        .await
        .unwrap();
    c.send(b"EHLO pretender\r\n").await.unwrap();
    assert!(c.is_closed().await);
    list.shown(
        &w.admin,
        r#"ferry_smtp_connections_refused_total{reason="proxy_header"}"#,
        |v| v == [1.0],
    );

    // A client cut off after max_failures wrong passwords; AUTH
    // saturated: one verification at a time, 1 ms to wait for it.
    // (Guesses: the same wrong password again is a stale one, not counted.)
    for guess in ["guess-1", "guess-2"] {
        assert!(auth(ports.1, "127.0.0.40", guess).await.starts_with("535"));
    }
    let cut = auth(ports.1, "127.0.0.40", "right").await;
    assert!(cut.starts_with("421 4.7.0"), "{cut}");
    list.shown(&w.admin, "ferry_auth_clients_cut_off_total{}", |v| {
        v == [1.0]
    });
    let busy = r#"ferry_auth_refused_total{reason="busy"}"#;
    for round in 0..10 {
        let tries: Vec<_> = (0..4)
            .map(|k| {
                tokio::spawn(auth(
                    ports.1,
                    ["127.0.0.41", "127.0.0.42", "127.0.0.43", "127.0.0.44"][k],
                    "guess",
                ))
            })
            .collect();
        let mut replies = Vec::new();
        for t in tries {
            replies.push(t.await.unwrap());
        }
        if replies.iter().any(|r| r.starts_with("454 4.7.0")) {
            break;
        }
        assert!(round < 9, "never 454: {replies:?}");
    }
    list.shown(&w.admin, busy, |v| v.len() == 1 && v[0] >= 1.0);

    // A refused reload, then one under a floor no disk meets.
    std::fs::write(&config, "[[connectors]\n").unwrap();
    assert_eq!(w.reload().0, 422);
    list.shown(&w.admin, "ferry_config_last_reload_successful{}", |v| {
        v == [0.0]
    });
    list.shown(&w.admin, "ferry_config_version{}", |v| v == [1.0]);
    let floor = worker_config(ports, sink.addr, &hash, "1000000000GB");
    std::fs::write(&config, floor).unwrap();
    assert_eq!(w.reload().0, 200);
    let started = std::time::Instant::now();
    loop {
        let (mut c, _) = SmtpClient::connect(relay, Some(ip("127.0.0.31"))).await;
        c.cmd("EHLO app").await;
        let reply = c.cmd("MAIL FROM:<app@example.test>").await;
        if reply == "452 4.3.1 Insufficient system resources" {
            break;
        }
        assert!(started.elapsed() < WAIT, "{reply}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    list.shown(
        &w.admin,
        r#"ferry_smtp_senders_rejected_total{reason="low_space"}"#,
        // Relay's; Devices' is there too, at 0.
        |v| v.len() == 2 && v.iter().sum::<f64>() >= 1.0,
    );

    // A balancer listener whose only worker does not answer on its port:
    // probed down, and its clients get 421.
    let lonely = b.smtp[1];
    let (_, refused) = SmtpClient::connect(lonely, Some(ip("127.0.0.31"))).await;
    assert_eq!(
        refused,
        "421 4.3.2 Service not available, closing transmission channel"
    );
    list.shown(
        &b.admin,
        r#"ferry_balancer_connections_total{result="no_backend"}"#,
        // lonely's; smtp's is there too, at 0.
        |v| v.len() == 2 && v.contains(&1.0) && v.contains(&0.0),
    );
    let up = r#"ferry_balancer_backend_up{listener="lonely",backend="w1"}"#;
    b.wait_metric(up, WAIT, |v| v == Some(0.0));
    // smtp's worker up, lonely's down; neither drained.
    list.shown(&b.admin, "ferry_balancer_backend_up{}", |v| {
        v.len() == 2 && v.contains(&1.0) && v.contains(&0.0)
    });
    list.shown(&b.admin, "ferry_balancer_backend_draining{}", |v| {
        v == [0.0, 0.0]
    });
    list.done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_alert_reads_its_nacked_nodes() {
    let mut list = Checklist::new(|s| s.name.starts_with("ferry_control_"));
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    pki.issue("control", "control").issue("admin", "alice");
    let store = format!("file:{}", dir.path().join("store").display());
    let control = ControlProcess::start(&store, &pki, &dir.path().join("control.log"));
    let port = free_port(ip("127.0.0.1"));
    let data = dir.path().join("w1");
    std::fs::create_dir_all(&data).unwrap();
    make_certificate(&data);
    let good = format!(
        r#"accepted_domains = [{{ domain = "example.test", kind = "authoritative" }}]

[[connectors]]
name = "Relay"
port = {port}
remote_ranges = ["127.0.0.0/8"]
permissions = ["anonymous"]
auth = ["tls"]
tls = {{ certificate = "test.crt", key = "test.key" }}

[[routes]]
domains = ["*"]
type = "directory"
path = "mail"
"#
    );
    let apply = |text: &str| {
        let file = dir.path().join("apply.toml");
        std::fs::write(&file, text).unwrap();
        let (code, out, err) = control.ctl(&pki, "alice", &["apply", file.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}{err}");
    };
    apply(&good);
    let args = pki.subscribed(&control.url, "w1", "127.0.0.1", &data);
    let _w = WorkerProcess::start_args("worker", &args, &data, "ready");
    // Before any refusal the series is there, at 0.
    let nacked = r#"ferry_control_nodes{state="nacked"}"#;
    assert_eq!(control.metric(nacked), Some(0.0));
    // A certificate file the worker does not have: it refuses version 2.
    apply(&good.replace("test.crt", "missing.crt"));
    list.shown(&control.admin, nacked, |v| v == [1.0]);
    list.done();
}
