//! Nodes fed by a control plane (`ferry worker --control`, `ferry
//! balancer --control`): the real binary against a fake control plane
//! (a real gRPC server over real mTLS on loopback, from a test CA) that
//! pushes snapshots and records the reports. What a user relies on: a
//! change is served within a second and acknowledged; a change the node
//! cannot apply is refused with the reason while the old one serves; the
//! node serves through a control-plane outage and after a restart from
//! its last-good copy; with nothing to serve it opens no port and says
//! why.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_control::identity::Identity;
use ferry_control::proto::NodeRole;
use ferry_tests::binary::{http, WorkerProcess};
use ferry_tests::control::{FakeControlPlane, Pki};
use ferry_tests::{free_port, make_certificate, SmtpClient};
use serde_json::Value;

const LISTEN: &str = "127.0.0.1";
/// How long a test waits for what should happen at once.
const WAIT: Duration = Duration::from_secs(15);
/// How long a reconnect may take: the backoff after a few failed
/// attempts (1 + 1.6 + 2.6 + 4.1 + 6.6 s, +20 %) and the attempt itself.
const RECONNECT: Duration = Duration::from_secs(30);

fn addr(port: u16) -> SocketAddr {
    SocketAddr::new(LISTEN.parse().unwrap(), port)
}

/// A worker config: the connector "Relay" on `port` greeting with
/// `banner`, mail kept in a directory, and `extra` at the end.
fn worker_config(port: u16, banner: &str, extra: &str) -> String {
    format!(
        r#"accepted_domains = [{{ domain = "example.test", kind = "authoritative" }}]

[[connectors]]
name = "Relay"
port = {port}
remote_ranges = ["127.0.0.0/8"]
permissions = ["anonymous"]
banner = "{banner}"

[[routes]]
domains = ["*"]
type = "directory"
path = "mail"
{extra}"#
    )
}

/// A second connector whose certificate and key are `cert` and `key`.
fn tls_connector(port: u16, cert: &str, key: &str) -> String {
    format!(
        r#"
[[connectors]]
name = "Devices"
port = {port}
remote_ranges = ["127.0.0.0/8"]
permissions = ["anonymous"]
auth = ["tls"]
tls = {{ certificate = "{cert}", key = "{key}" }}
"#
    )
}

/// `ferry worker --control URLS` as node `id`, data in `data`; waits for
/// `word` (`ready`, or `waiting` with nothing to serve).
fn worker(pki: &Pki, urls: &[String], id: &str, data: &Path, word: &str) -> WorkerProcess {
    let mut args = vec![
        "--control".to_string(),
        urls.join(","),
        "--listen".into(),
        LISTEN.into(),
        "--data".into(),
        data.display().to_string(),
        "--hostname".into(),
        "relay.test".into(),
    ];
    args.extend(pki.node_flags(id));
    WorkerProcess::start_args("worker", &args, data, word)
}

/// The greeting at `port` now, or "" when nothing listens.
async fn banner(port: u16) -> String {
    ferry_tests::banner(addr(port)).await
}

/// Waits (bounded by `wait`) until `port` greets with `want`; the time
/// it took.
async fn greets(port: u16, want: &str, wait: Duration) -> Duration {
    ferry_tests::greets(addr(port), want, wait).await
}

fn config_status(w: &WorkerProcess) -> Value {
    w.status()["config"].clone()
}

/// Waits (bounded) until `check` holds for the node's `/status` config.
fn status_until(w: &WorkerProcess, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + RECONNECT;
    loop {
        let config = config_status(w);
        if check(&config) {
            return config;
        }
        assert!(Instant::now() < deadline, "{what}: {config:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (bounded) until `/readyz` answers 200.
fn ready(w: &WorkerProcess) {
    let deadline = Instant::now() + WAIT;
    while http(&w.admin, "GET", "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "not ready in time");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    pki: Pki,
    data: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let data = dir.path().join("data");
    Setup {
        pki,
        data,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pushed_snapshot_is_served_within_a_second_and_acknowledged() {
    let s = setup();
    let fake = FakeControlPlane::start(&s.pki).await;
    let port = free_port(LISTEN.parse().unwrap());
    let (v1, sha1) = fake.push(&worker_config(port, "One ready", ""));
    let w = worker(&s.pki, &[fake.url()], "w1", &s.data, "ready");
    assert_eq!(w.smtp, [addr(port)]);
    assert_eq!(banner(port).await, "220 One ready");
    let ack = fake.report_for(v1, WAIT).await.expect("a report for v1");
    assert_eq!(
        (
            ack.node_id.as_str(),
            ack.applied_version,
            ack.sha256.as_str(),
            ack.error.as_str()
        ),
        ("w1", v1, sha1.as_str(), "")
    );
    // The node said who it is, with its certificate.
    let watch = &fake.watches()[0];
    assert_eq!(watch.identity, Some(Identity::Node("w1".into())));
    assert_eq!(watch.request.role, NodeRole::Worker as i32);
    assert_eq!(watch.request.smtp_address, LISTEN);
    assert_eq!(watch.request.known_version, 0);

    let (v2, sha2) = fake.push(&worker_config(port, "Two ready", ""));
    let took = greets(port, "220 Two ready", WAIT).await;
    assert!(took < Duration::from_secs(1), "served after {took:?}");
    let ack = fake.report_for(v2, WAIT).await.expect("a report for v2");
    assert_eq!(
        (
            ack.for_version,
            ack.applied_version,
            ack.sha256.as_str(),
            ack.error.as_str()
        ),
        (v2, v2, sha2.as_str(), "")
    );

    let config = config_status(&w);
    assert_eq!(config["state"], "serving");
    assert_eq!(config["version"], v2);
    assert_eq!(config["sha256"], sha2);
    assert_eq!(config["source"], format!("control plane {}", fake.url()));
    assert_eq!(config["control_plane"]["connected"], true);
    assert_eq!(config["control_plane"]["last_report"]["result"], "ack");
    assert_eq!(config["last_apply"]["changes"][0], "~ connector \"Relay\"");
    assert_eq!(w.metric("ferry_control_connected"), Some(1.0));
    assert_eq!(
        w.metric("ferry_control_reports_total{result=\"ack\"}"),
        Some(2.0)
    );
    assert_eq!(w.metric("ferry_config_version"), Some(v2 as f64));
    assert_eq!(
        w.metric("ferry_config_reloads_total{result=\"ok\"}"),
        Some(1.0)
    );
    // The last-good copy is the version served.
    let copy = std::fs::read_to_string(s.data.join("last-good.toml")).unwrap();
    assert!(
        copy.starts_with(&format!("# ferry last-good version={v2} sha256={sha2} ")),
        "{copy}"
    );
    assert!(copy.contains("Two ready"));

    // No file to re-read: a reload is refused, saying where to go.
    let (status, body) = w.admin_call("POST", "/config/reload");
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("apply changes there"), "{body}");
    assert!(body.contains(&fake.url()), "{body}");
    w.hangup();
    let deadline = Instant::now() + WAIT;
    let log = loop {
        let log = std::fs::read_to_string(s.data.join("worker.log")).unwrap();
        if log.contains("SIGHUP ignored") || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        log.contains("SIGHUP ignored: the config comes from the control plane"),
        "{log}"
    );
    assert_eq!(banner(port).await, "220 Two ready");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_naming_a_missing_certificate_is_refused_and_the_old_one_serves() {
    let s = setup();
    let fake = FakeControlPlane::start(&s.pki).await;
    let port = free_port(LISTEN.parse().unwrap());
    let (v1, sha1) = fake.push(&worker_config(port, "One ready", ""));
    let w = worker(&s.pki, &[fake.url()], "w1", &s.data, "ready");
    fake.report_for(v1, WAIT).await.expect("a report for v1");

    // Relative paths are the node's own, under its data directory.
    let tls_port = free_port(LISTEN.parse().unwrap());
    let extra = tls_connector(tls_port, "certs/test.crt", "certs/test.key");
    let (v2, _) = fake.push(&worker_config(port, "Two ready", &extra));
    let nack = fake.report_for(v2, WAIT).await.expect("a report for v2");
    let missing = s.data.join("certs/test.crt");
    assert!(
        nack.error.contains(&format!(
            "connector 'Devices': cannot read {}",
            missing.display()
        )),
        "{}",
        nack.error
    );
    assert_eq!(
        (nack.applied_version, nack.sha256.as_str()),
        (v1, sha1.as_str())
    );
    assert_eq!(banner(port).await, "220 One ready");
    assert_eq!(banner(tls_port).await, "");
    let config = config_status(&w);
    assert_eq!(config["version"], v1);
    assert_eq!(config["control_plane"]["last_report"]["result"], "nack");
    assert_eq!(
        w.metric("ferry_control_reports_total{result=\"nack\"}"),
        Some(1.0)
    );
    assert_eq!(
        w.metric("ferry_config_reloads_total{result=\"failed\"}"),
        Some(1.0)
    );
    assert_eq!(w.metric("ferry_config_last_reload_successful"), Some(0.0));
    let copy = std::fs::read_to_string(s.data.join("last-good.toml")).unwrap();
    assert!(copy.contains("One ready") && !copy.contains("Two ready"));

    // The files put in place, the next version is served.
    std::fs::create_dir_all(s.data.join("certs")).unwrap();
    make_certificate(&s.data.join("certs"));
    let (v3, sha3) = fake.push(&worker_config(port, "Three ready", &extra));
    let ack = fake.report_for(v3, WAIT).await.expect("a report for v3");
    assert_eq!(
        (ack.applied_version, ack.sha256, ack.error),
        (v3, sha3, String::new())
    );
    assert_eq!(banner(port).await, "220 Three ready");
    assert_eq!(banner(tls_port).await, "220 Ferry ESMTP Devices ready");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_serves_through_an_outage_and_from_last_good_after_a_restart() {
    let s = setup();
    let mut fake = FakeControlPlane::start(&s.pki).await;
    let port = free_port(LISTEN.parse().unwrap());
    let (v1, _) = fake.push(&worker_config(port, "One ready", ""));
    let mut w = worker(&s.pki, &[fake.url()], "w1", &s.data, "ready");
    fake.report_for(v1, WAIT).await.expect("a report for v1");

    // The control plane goes away: the worker notices and serves on.
    fake.stop().await;
    status_until(&w, "the worker sees the control plane gone", |c| {
        c["control_plane"]["connected"] == false
    });
    assert_eq!(w.metric("ferry_control_connected"), Some(0.0));
    assert_eq!(banner(port).await, "220 One ready");

    // Restarted while the control plane is down: it serves its last-good
    // copy at once.
    w.kill();
    let w = worker(&s.pki, &[fake.url()], "w1", &s.data, "ready");
    assert_eq!(banner(port).await, "220 One ready");
    let config = config_status(&w);
    assert_eq!(
        (config["state"].clone(), config["version"].clone()),
        ("serving".into(), v1.into())
    );
    let log = std::fs::read_to_string(s.data.join("worker.log")).unwrap();
    assert!(
        log.contains("serving the last-good copy of the config"),
        "{log}"
    );
    ready(&w);
    // Several attempts fail while it is away (logged once, below).
    status_until(&w, "two failed attempts", |c| {
        c["control_plane"]["failed_attempts"].as_u64() >= Some(2)
    });

    // The control plane back on its address: the worker subscribes again,
    // saying what it serves, and takes the next version.
    fake.resume().await;
    let (v2, sha2) = fake.push(&worker_config(port, "Two ready", ""));
    let ack = fake
        .report_for(v2, RECONNECT)
        .await
        .expect("a report for v2");
    assert_eq!(
        (ack.applied_version, ack.sha256, ack.error),
        (v2, sha2, String::new())
    );
    assert_eq!(banner(port).await, "220 Two ready");
    let last = fake.watches().last().cloned().unwrap();
    assert_eq!(last.request.known_version, v1, "{last:?}");
    // A lost stream is logged once, not once per attempt.
    let log = std::fs::read_to_string(s.data.join("worker.log")).unwrap();
    assert_eq!(log.matches("lost the control plane").count(), 1, "{log}");
    assert_eq!(
        log.matches("cannot reach the control plane").count(),
        1,
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_neither_control_plane_nor_last_good_no_port_opens_until_a_snapshot_comes() {
    let s = setup();
    // The control plane's address, told to the worker before it is up.
    let reserved = addr(free_port(LISTEN.parse().unwrap()));
    let url = format!("https://{reserved}");
    let port = free_port(LISTEN.parse().unwrap());
    let mut w = worker(&s.pki, &[url], "w1", &s.data, "waiting");
    assert!(w.smtp.is_empty());
    let config = status_until(&w, "the worker says why it waits", |c| {
        c["why"]
            .as_str()
            .unwrap_or("")
            .contains("no control plane answered")
    });
    assert_eq!(config["state"], "waiting");
    let why = config["why"].as_str().unwrap();
    assert!(
        why.contains(&format!("no last-good copy in {}", s.data.display())),
        "{why}"
    );
    let (status, _) = http(&w.admin, "GET", "/readyz");
    assert_eq!(status, 503);
    assert_eq!(banner(port).await, "");
    let log = std::fs::read_to_string(s.data.join("worker.log")).unwrap();
    assert!(log.contains("no SMTP port is open"), "{log}");

    let fake = FakeControlPlane::start_at(&s.pki, reserved).await;
    let (v1, _) = fake.push(&worker_config(port, "One ready", ""));
    assert!(
        w.read_until("worker", "ready", RECONNECT),
        "the worker did not start serving"
    );
    assert_eq!(w.smtp, [addr(port)]);
    assert_eq!(banner(port).await, "220 One ready");
    ready(&w);
    let ack = fake.report_for(v1, WAIT).await.expect("a report for v1");
    assert_eq!(ack.error, "");
    assert_eq!(config_status(&w)["version"], v1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_balancer_takes_its_config_from_the_control_plane() {
    let s = setup();
    // A worker from a file, as the balancer's backend.
    let worker_port = free_port(LISTEN.parse().unwrap());
    let file = s.data.join("worker.toml");
    std::fs::create_dir_all(&s.data).unwrap();
    // It trusts the balancer's PROXY header (both on 127.0.0.1).
    let text = worker_config(worker_port, "Backend ready", "");
    std::fs::write(
        &file,
        format!("trusted_proxies = [\"127.0.0.1/32\"]\n{text}"),
    )
    .unwrap();
    let _backend = WorkerProcess::start(&file, LISTEN, &s.data.join("worker"));

    let fake = FakeControlPlane::start(&s.pki).await;
    let port = free_port(LISTEN.parse().unwrap());
    let (v1, sha1) = fake.push(&format!(
        r#"[balancer]
allow = ["127.0.0.0/8"]
probe = {{ interval = "200ms", timeout = "1s", rise = 1, fall = 2 }}

[[balancer.listeners]]
name = "smtp"
port = {port}
backend_port = {worker_port}

[[balancer.backends]]
name = "w1"
address = "{LISTEN}"
"#
    ));
    let data = s.data.join("balancer");
    let mut args = vec![
        "--control".to_string(),
        fake.url(),
        "--listen".into(),
        LISTEN.into(),
        "--data".into(),
        data.display().to_string(),
    ];
    args.extend(s.pki.node_flags("b1"));
    let b = WorkerProcess::start_args("balancer", &args, &data, "ready");
    assert_eq!(b.smtp, [addr(port)]);
    let ack = fake.report_for(v1, WAIT).await.expect("a report for v1");
    assert_eq!(
        (ack.applied_version, ack.sha256, ack.error),
        (v1, sha1, String::new())
    );
    assert_eq!(fake.watches()[0].request.role, NodeRole::Balancer as i32);
    greets(port, "220 Backend ready", WAIT).await;
    assert!(data.join("last-good.toml").exists());
    assert_eq!(
        config_status(&b)["source"],
        format!("control plane {}", fake.url())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn relative_paths_follow_config_dir_when_given() {
    let s = setup();
    let fake = FakeControlPlane::start(&s.pki).await;
    let certs = s.pki.dir.parent().unwrap().join("node-certs");
    std::fs::create_dir_all(&certs).unwrap();
    make_certificate(&certs);
    let (port, tls_port) = (
        free_port(LISTEN.parse().unwrap()),
        free_port(LISTEN.parse().unwrap()),
    );
    let extra = tls_connector(tls_port, "test.crt", "test.key");
    let (v1, _) = fake.push(&worker_config(port, "One ready", &extra));
    let mut args = vec![
        "--control".to_string(),
        fake.url(),
        "--config-dir".into(),
        certs.display().to_string(),
        "--listen".into(),
        LISTEN.into(),
        "--data".into(),
        s.data.display().to_string(),
    ];
    args.extend(s.pki.node_flags("w1"));
    let _w = WorkerProcess::start_args("worker", &args, &s.data, "ready");
    let ack = fake.report_for(v1, WAIT).await.expect("a report for v1");
    assert_eq!(ack.error, "");
    assert_eq!(banner(tls_port).await, "220 Ferry ESMTP Devices ready");
}

/// What a balancer's probe (from 127.0.0.9, a trusted proxy) sees after
/// a PROXY v2 `LOCAL` header (haproxy's proxy-protocol.txt, 2.2).
async fn probe(port: u16) -> String {
    const LOCAL: [u8; 16] = [
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x20, 0x00, 0x00,
        0x00,
    ];
    let balancer = Some("127.0.0.9".parse().unwrap());
    let mut c = SmtpClient::connect_from(addr(port), balancer)
        .await
        .unwrap();
    c.send(&LOCAL).await.unwrap();
    c.reply().await
}

/// A worker that keeps refusing the control plane's newest config past
/// `--nack-grace` refuses the balancers' probes (so they take it out of
/// rotation) and says not ready, while clients are still served; the
/// next config it applies puts it back.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_refusing_the_newest_config_past_the_grace_period_refuses_probes() {
    let s = setup();
    let fake = FakeControlPlane::start(&s.pki).await;
    let port = free_port(LISTEN.parse().unwrap());
    let trusting = |banner: &str, extra: &str| {
        format!(
            "trusted_proxies = [\"127.0.0.9/32\"]\n{}",
            worker_config(port, banner, extra)
        )
    };
    let (v1, _) = fake.push(&trusting("One ready", ""));
    let mut args = vec![
        "--control".to_string(),
        fake.url(),
        "--listen".into(),
        LISTEN.into(),
        "--data".into(),
        s.data.display().to_string(),
        "--nack-grace".into(),
        "1s".into(),
    ];
    args.extend(s.pki.node_flags("w1"));
    let w = WorkerProcess::start_args("worker", &args, &s.data, "ready");
    fake.report_for(v1, WAIT).await.expect("a report for v1");
    assert_eq!(probe(port).await, "220 One ready");

    let tls_port = free_port(LISTEN.parse().unwrap());
    let extra = tls_connector(tls_port, "certs/test.crt", "certs/test.key");
    let (v2, _) = fake.push(&trusting("Two ready", &extra));
    let refused_at = Instant::now();
    assert!(!fake.report_for(v2, WAIT).await.unwrap().error.is_empty());
    // Within the grace period nothing changes for the balancers...
    assert_eq!(probe(port).await, "220 One ready");
    // ...after it, probes are refused and /readyz says not ready.
    let deadline = Instant::now() + WAIT;
    while http(&w.admin, "GET", "/readyz").0 != 503 {
        assert!(
            Instant::now() < deadline,
            "still ready past the grace period"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(refused_at.elapsed() >= Duration::from_secs(1));
    assert_eq!(
        probe(port).await,
        "421 4.3.0 This worker's config is out of date, closing transmission channel"
    );
    assert_eq!(
        banner(port).await,
        "220 One ready",
        "clients are still served"
    );
    assert_eq!(w.metric("ferry_config_behind"), Some(1.0));

    // The next version applies: back in rotation.
    std::fs::create_dir_all(s.data.join("certs")).unwrap();
    make_certificate(&s.data.join("certs"));
    let (v3, _) = fake.push(&trusting("Three ready", &extra));
    assert!(fake.report_for(v3, WAIT).await.unwrap().error.is_empty());
    ready(&w);
    assert_eq!(probe(port).await, "220 Three ready");
    assert_eq!(w.metric("ferry_config_behind"), Some(0.0));
}
