//! AUTH on a real `ferry worker` process: the verified-credential cache
//! counted on `/metrics` (a hit runs no verification), a password changed
//! by `POST /config/reload` no longer answered from the cache, and a
//! password-guessing client cut off with `421 4.7.0`, logged with its
//! address, counted, and let back after its cooling-off while another
//! client is unaffected; every AUTH series exported at 0 from the start,
//! a lowered or zero `cache_ttl` obeyed at once, a user name with CR/LF
//! logged escaped.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::binary::{user_hash, WorkerProcess};
use ferry_tests::{free_port, plain, SmtpClient};

const LISTEN: &str = "127.0.0.1";
const WAIT: Duration = Duration::from_secs(15);
const OK: &str = "235 2.7.0 Authentication successful";
const INVALID: &str = "535 5.7.8 Authentication credentials invalid";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// One connector "Devices" on `port` with AUTH (no TLS: loopback only),
/// the user scanner with `hash`, and `auth` as the `[auth]` section.
fn config(port: u16, hash: &str, auth: &str) -> String {
    format!(
        r#"accepted_domains = [{{ domain = "example.test", kind = "authoritative" }}]

[[connectors]]
name = "Devices"
port = {port}
remote_ranges = ["127.0.0.0/8"]
permissions = ["users"]
auth = ["basic_auth"]
banner = "Devices ready"
limits = {{ tarpit = "0s" }}

[[users]]
name = "scanner"
password_hash = "{hash}"
allowed_senders = ["*@example.test"]

[auth]
{auth}
"#
    )
}

/// A session from `source`: EHLO, then AUTH PLAIN as scanner; the client
/// and the reply.
async fn auth(port: u16, source: &str, password: &str) -> (SmtpClient, String) {
    let addr = SocketAddr::new(ip(LISTEN), port);
    let (mut c, banner) = SmtpClient::connect(addr, Some(ip(source))).await;
    assert_eq!(banner, "220 Devices ready");
    assert!(c.cmd("EHLO scanner").await.starts_with("250-"));
    let reply = c
        .cmd(&format!("AUTH PLAIN {}", plain("scanner", password)))
        .await;
    (c, reply)
}

/// The value of `name` on `/metrics`; every AUTH series is there from
/// the start (at 0), so a missing one fails the test.
fn metric(w: &WorkerProcess, name: &str) -> f64 {
    w.metric(name)
        .unwrap_or_else(|| panic!("{name} is not on /metrics"))
}

/// Every series of the AUTH metrics, each at 0 on a fresh worker.
const AUTH_SERIES: [&str; 11] = [
    r#"ferry_auth_verifications_total{result="success"}"#,
    r#"ferry_auth_verifications_total{result="failure"}"#,
    r#"ferry_auth_cache_total{result="hit"}"#,
    r#"ferry_auth_cache_total{result="negative_hit"}"#,
    r#"ferry_auth_cache_total{result="miss"}"#,
    r#"ferry_auth_refused_total{reason="invalid"}"#,
    r#"ferry_auth_refused_total{reason="busy"}"#,
    r#"ferry_auth_refused_total{reason="cooling_off"}"#,
    "ferry_auth_clients_cut_off_total",
    "ferry_auth_verifications_waiting",
    "ferry_auth_clients_cooling_off",
];

fn start(dir: &Path, text: &str) -> (WorkerProcess, std::path::PathBuf) {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let path = dir.join("ferry.toml");
    std::fs::write(&path, text).unwrap();
    (WorkerProcess::start(&path, LISTEN, &data), path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_hit_runs_no_verification_and_a_reloaded_password_is_verified_again() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(ip(LISTEN));
    let settings = "cache_ttl = \"10m\"\nnegative_cache_ttl = \"1m\"";
    let (w, path) = start(
        dir.path(),
        &config(port, &user_hash("old-secret"), settings),
    );
    let success = r#"ferry_auth_verifications_total{result="success"}"#;
    let failure = r#"ferry_auth_verifications_total{result="failure"}"#;
    let hits = r#"ferry_auth_cache_total{result="hit"}"#;
    let negative = r#"ferry_auth_cache_total{result="negative_hit"}"#;
    // Before any AUTH every series is there, at 0, so that increase()
    // sees the first event.
    for series in AUTH_SERIES {
        assert_eq!(w.metric(series), Some(0.0), "{series}");
    }

    // Three sessions with the right password: one verification.
    for _ in 0..3 {
        assert_eq!(auth(port, "127.0.0.2", "old-secret").await.1, OK);
    }
    assert_eq!(metric(&w, success), 1.0);
    assert_eq!(metric(&w, hits), 2.0);
    // A wrong password twice: one verification, then the negative entry;
    // never answered 235.
    for _ in 0..2 {
        assert_eq!(auth(port, "127.0.0.3", "guess").await.1, INVALID);
    }
    assert_eq!(metric(&w, failure), 1.0);
    assert_eq!(metric(&w, negative), 1.0);
    assert_eq!(metric(&w, success), 1.0);

    // A new password through a real reload: the old one, cached as right,
    // is verified again (and refused), the new one verified once.
    std::fs::write(&path, config(port, &user_hash("new-secret"), settings)).unwrap();
    let (code, report) = w.reload();
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["changes"][0], r#"~ user "scanner""#);
    assert_eq!(auth(port, "127.0.0.2", "old-secret").await.1, INVALID);
    assert_eq!(metric(&w, failure), 2.0);
    assert_eq!(metric(&w, hits), 2.0);
    for _ in 0..2 {
        assert_eq!(auth(port, "127.0.0.2", "new-secret").await.1, OK);
    }
    assert_eq!(metric(&w, success), 2.0);
    assert_eq!(metric(&w, hits), 3.0);
    assert_eq!(w.metric("ferry_auth_verifications_waiting"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guessing_client_is_cut_off_logged_and_let_back() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(ip(LISTEN));
    let (w, _) = start(
        dir.path(),
        &config(
            port,
            &user_hash("s3cret"),
            "max_failures = 3\nfailure_window = \"1m\"\ncooling_off = \"2s\"",
        ),
    );
    let (mut c, r) = auth(port, "127.0.0.66", "guess-1").await;
    assert_eq!(r, INVALID);
    for guess in ["guess-2", "guess-3"] {
        let r = c
            .cmd(&format!("AUTH PLAIN {}", plain("scanner", guess)))
            .await;
        assert_eq!(r, INVALID);
    }
    let cut_at = Instant::now();
    let r = c
        .cmd(&format!("AUTH PLAIN {}", plain("scanner", "s3cret")))
        .await;
    assert_eq!(
        r,
        "421 4.7.0 Too many failed authentication attempts, closing transmission channel"
    );
    assert!(c.is_closed().await);
    assert_eq!(metric(&w, "ferry_auth_clients_cut_off_total"), 1.0);
    assert_eq!(metric(&w, "ferry_auth_clients_cooling_off"), 1.0);
    assert_eq!(
        metric(&w, r#"ferry_auth_refused_total{reason="cooling_off"}"#),
        1.0
    );
    // Another client is unaffected.
    assert_eq!(auth(port, "127.0.0.67", "s3cret").await.1, OK);
    // The log names the guessing client's address.
    let log = dir.path().join("data/worker.log");
    let line = loop {
        assert!(cut_at.elapsed() < WAIT, "no cut-off line in the log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(l) = text
            .lines()
            .find(|l| l.contains("too many failed AUTH from this client"))
        {
            break l.to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(line.contains("client=127.0.0.66"), "{line}");
    // Back after the cooling-off; the gauge goes back to 0.
    loop {
        assert!(cut_at.elapsed() < WAIT, "still cut off after {WAIT:?}");
        let (_, r) = auth(port, "127.0.0.66", "s3cret").await;
        if r == OK {
            break;
        }
        assert!(r.starts_with("421 4.7.0"), "{r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(cut_at.elapsed() >= Duration::from_secs(2));
    loop {
        assert!(cut_at.elapsed() < WAIT, "gauge still not 0");
        if metric(&w, "ferry_auth_clients_cooling_off") == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_lowers_or_turns_off_the_cache_ttl_stops_hits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(ip(LISTEN));
    let hash = user_hash("s3cret");
    let (w, path) = start(dir.path(), &config(port, &hash, "cache_ttl = \"10m\""));
    let success = r#"ferry_auth_verifications_total{result="success"}"#;
    let hits = r#"ferry_auth_cache_total{result="hit"}"#;
    let reload = |settings: &str| {
        std::fs::write(&path, config(port, &hash, settings)).unwrap();
        let (code, report) = w.reload();
        assert_eq!(code, 200, "{report}");
    };
    for _ in 0..2 {
        assert_eq!(auth(port, "127.0.0.2", "s3cret").await.1, OK);
    }
    assert_eq!(metric(&w, success), 1.0);
    assert_eq!(metric(&w, hits), 1.0);

    // Lowered to 1 s: the entry, made under 10 minutes, is older than
    // that once a second has passed, and is verified again.
    reload("cache_ttl = \"1s\"");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(auth(port, "127.0.0.2", "s3cret").await.1, OK);
    assert_eq!(metric(&w, success), 2.0);
    assert_eq!(metric(&w, hits), 1.0);

    // A session opened under 1 s authenticates after a reload that turns
    // the cache off: what it verifies is not remembered.
    let (mut old, banner) =
        SmtpClient::connect(SocketAddr::new(ip(LISTEN), port), Some(ip("127.0.0.3"))).await;
    assert_eq!(banner, "220 Devices ready");
    assert!(old.cmd("EHLO scanner").await.starts_with("250-"));
    reload("cache_ttl = \"0s\"");
    let r = old
        .cmd(&format!("AUTH PLAIN {}", plain("scanner", "s3cret")))
        .await;
    assert_eq!(r, OK);
    assert_eq!(metric(&w, success), 3.0);
    assert_eq!(auth(port, "127.0.0.2", "s3cret").await.1, OK);
    assert_eq!(metric(&w, success), 4.0);
    assert_eq!(metric(&w, hits), 1.0);

    // Both TTLs zero: the cache is off, and no lookup is counted a miss.
    let misses = r#"ferry_auth_cache_total{result="miss"}"#;
    let before = metric(&w, misses);
    reload("cache_ttl = \"0s\"\nnegative_cache_ttl = \"0s\"");
    assert_eq!(auth(port, "127.0.0.2", "s3cret").await.1, OK);
    assert_eq!(auth(port, "127.0.0.2", "wrong").await.1, INVALID);
    assert_eq!(metric(&w, success), 5.0);
    assert_eq!(metric(&w, misses), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_name_with_cr_lf_is_logged_escaped_and_the_limit_turned_off_cools_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(ip(LISTEN));
    let hash = user_hash("s3cret");
    let (w, path) = start(dir.path(), &config(port, &hash, "max_failures = 2"));
    let evil = "x\r\n2030-01-01T00:00:00Z  INFO forged: authenticated user=admin";
    let addr = SocketAddr::new(ip(LISTEN), port);
    let (mut c, _) = SmtpClient::connect(addr, Some(ip("127.0.0.70"))).await;
    assert!(c.cmd("EHLO scanner").await.starts_with("250-"));
    for password in ["one", "two"] {
        let r = c
            .cmd(&format!("AUTH PLAIN {}", plain(evil, password)))
            .await;
        assert_eq!(r, INVALID);
    }
    // Both the per-attempt line and the cut-off line carry the name.
    let log = dir.path().join("data/worker.log");
    let start = Instant::now();
    let text = loop {
        assert!(start.elapsed() < WAIT, "no cut-off line in the log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("too many failed AUTH from this client") {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        !text
            .lines()
            .any(|l| l.contains("forged") && !l.contains("x\\r\\n")),
        "a forged line:\n{text}"
    );
    let escaped = r#"user="x\r\n2030-01-01T00:00:00Z  INFO forged: authenticated user=admin""#;
    for what in [
        "authentication failed; tarpitting",
        "too many failed AUTH from this client",
    ] {
        let line = text.lines().find(|l| l.contains(what)).unwrap();
        assert!(line.contains(escaped), "{line}");
    }

    // The limit turned off by a reload: no client is cooling off any more,
    // and the gauge says so (within the 1 s sweep).
    assert_eq!(metric(&w, "ferry_auth_clients_cooling_off"), 1.0);
    std::fs::write(&path, config(port, &hash, "max_failures = 0")).unwrap();
    let (code, report) = w.reload();
    assert_eq!(code, 200, "{report}");
    let start = Instant::now();
    while metric(&w, "ferry_auth_clients_cooling_off") != 0.0 {
        assert!(
            start.elapsed() < WAIT,
            "gauge still not 0 with the limit off"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
