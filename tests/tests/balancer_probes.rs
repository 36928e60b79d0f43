//! The real `ferry balancer` process in front of scripted workers on
//! loopback (`ferry_tests::backend`): each probe stage that fails is
//! counted by its name and takes the worker down, good probes bring it
//! back; a failed handoff moves the client on, is counted by its reason
//! and makes the worker suspect for one probe interval, after which it
//! gets sessions again; a worker that closes its side first leaves the
//! client's side open until 30 s of silence.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::backend::{Answer, Backend};
use ferry_tests::binary::WorkerProcess;
use ferry_tests::{free_port, SmtpClient};

const WAIT: Duration = Duration::from_secs(20);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `ferry balancer` with one listener `smtp` in front of `backends`
/// (name, address) on `port`, and `settings` in its `[balancer]` section.
fn balancer(dir: &Path, port: u16, backends: &[(&str, &str)], settings: &str) -> WorkerProcess {
    let front = free_port(ip("127.0.0.1"));
    let listed: String = backends
        .iter()
        .map(|(name, addr)| {
            format!("[[balancer.backends]]\nname = \"{name}\"\naddress = \"{addr}\"\n\n")
        })
        .collect();
    let text = format!(
        "[balancer]\nallow = [\"127.0.0.0/8\"]\n{settings}\n\n\
         [[balancer.listeners]]\nname = \"smtp\"\nport = {front}\nbackend_port = {port}\n\n{listed}"
    );
    let config = dir.join("ferry.toml");
    std::fs::write(&config, text).unwrap();
    WorkerProcess::balancer(&config, "127.0.0.1", dir)
}

/// A client's greeting through the balancer, and its session.
async fn client(b: &WorkerProcess) -> (SmtpClient, String) {
    SmtpClient::connect(b.smtp[0], Some(ip("127.0.0.1"))).await
}

/// Up and not drained, but out of rotation: suspect after a handoff.
fn suspect(v: &serde_json::Value) -> bool {
    v["up"] == true && v["draining"] == false && v["eligible"] == false
}

fn sample(b: &WorkerProcess, name_and_labels: &str) -> f64 {
    b.metric(name_and_labels).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failed_probe_stage_is_counted_and_good_probes_bring_a_worker_back() {
    let addrs = ["127.0.0.101", "127.0.0.102", "127.0.0.103", "127.0.0.105"];
    let group = Backend::start_group(&addrs, &["b1", "b2", "b3", "b5"]).await;
    let [greeting, ehlo, hang, good] = &group[..] else {
        unreachable!()
    };
    greeting.answer_probes(Answer::Greet("554 5.3.2 Not today"));
    ehlo.answer_probes(Answer::RefuseEhlo);
    hang.answer_probes(Answer::Hang);
    // 127.0.0.104 has nothing on the port: connections are refused.
    let dir = tempfile::tempdir().unwrap();
    let b = balancer(
        dir.path(),
        good.addr.port(),
        &[
            ("b1", addrs[0]),
            ("b2", addrs[1]),
            ("b3", addrs[2]),
            ("b4", "127.0.0.104"),
            ("b5", addrs[3]),
        ],
        r#"probe = { interval = "200ms", timeout = "300ms", rise = 2, fall = 2 }"#,
    );
    for (name, stage) in [
        ("b1", "greeting"),
        ("b2", "ehlo"),
        ("b3", "timeout"),
        ("b4", "connect"),
    ] {
        b.wait_backend(name, WAIT, |v| v["up"] == false);
        let failures = |stage: &str| {
            sample(
                &b,
                &format!(
                    r#"ferry_balancer_probe_failures_total{{backend="{name}",stage="{stage}"}}"#
                ),
            )
        };
        assert!(failures(stage) >= 2.0, "{name}: {}", failures(stage));
        for other in ["connect", "greeting", "ehlo", "timeout"] {
            if other != stage {
                assert_eq!(failures(other), 0.0, "{name} counted as {other}");
            }
        }
        let gauge = format!(r#"ferry_balancer_backend_up{{listener="smtp",backend="{name}"}}"#);
        assert_eq!(b.metric(&gauge), Some(0.0), "{gauge}");
    }
    // The good one passes every probe, and only it gets clients.
    assert!(good.probes() >= 2);
    let count = r#"ferry_balancer_probe_duration_seconds_count{backend="b5"}"#;
    assert!(sample(&b, count) >= 2.0);
    assert!(b.backend("b5")["up"] == true);
    for _ in 0..4 {
        assert_eq!(client(&b).await.1, "220 b5 ready");
    }

    // Repaired, b1 and b2 pass `rise` probes in a row and are up again.
    greeting.answer_probes(Answer::Serve);
    ehlo.answer_probes(Answer::Serve);
    for name in ["b1", "b2"] {
        b.wait_backend(name, WAIT, |v| v["up"] == true && v["eligible"] == true);
        let gauge = format!(r#"ferry_balancer_backend_up{{listener="smtp",backend="{name}"}}"#);
        assert_eq!(b.metric(&gauge), Some(1.0), "{gauge}");
    }
    let mut served = BTreeSet::new();
    for _ in 0..9 {
        served.insert(client(&b).await.1);
    }
    let expected: BTreeSet<String> = ["b1", "b2", "b5"]
        .iter()
        .map(|n| format!("220 {n} ready"))
        .collect();
    assert_eq!(served, expected);
    assert_eq!(b.backend("b3")["up"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handoff_moves_the_client_on_and_is_counted_by_reason() {
    let addrs = ["127.0.0.111", "127.0.0.112", "127.0.0.114"];
    let group = Backend::start_group(&addrs, &["b1", "b2", "b4"]).await;
    // Probes pass everywhere; sessions fail at the greeting on b1 and hang
    // on b2. 127.0.0.113 refuses connections: its first probe fails, one
    // short of `fall`, so it stays up until a session tries it.
    group[0].answer_sessions(Answer::Greet("554 5.3.2 No sessions here"));
    group[1].answer_sessions(Answer::Hang);
    let dir = tempfile::tempdir().unwrap();
    // Probes once an hour: nothing but the handoffs changes the picture.
    let b = balancer(
        dir.path(),
        group[0].addr.port(),
        &[
            ("b1", addrs[0]),
            ("b2", addrs[1]),
            ("b3", "127.0.0.113"),
            ("b4", addrs[2]),
        ],
        "handoff_timeout = \"500ms\"\n\
         probe = { interval = \"1h\", timeout = \"1s\", rise = 2, fall = 2 }",
    );
    for backend in &group {
        backend.wait_probes(1, WAIT).await;
    }
    for _ in 0..4 {
        let (mut c, greeting) = client(&b).await;
        assert_eq!(greeting, "220 b4 ready");
        assert_eq!(c.cmd("EHLO device").await, "250 b4");
    }
    for reason in ["greeting", "timeout", "connect"] {
        let series =
            format!(r#"ferry_balancer_handoff_retries_total{{listener="smtp",reason="{reason}"}}"#);
        assert_eq!(b.metric(&series), Some(1.0), "{series}");
    }
    // Each was tried once and is suspect now: up, not drained, not
    // eligible for an hour.
    for name in ["b1", "b2", "b3"] {
        let v = b.backend(name);
        assert!(suspect(&v), "{v}");
    }
    assert_eq!(group[0].sessions().len(), 1);
    assert_eq!(group[1].sessions().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspect_worker_gets_sessions_again_one_probe_interval_later() {
    let addrs = ["127.0.0.121", "127.0.0.122"];
    let group = Backend::start_group(&addrs, &["b1", "b2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let interval = Duration::from_secs(2);
    let b = balancer(
        dir.path(),
        group[0].addr.port(),
        &[("b1", addrs[0]), ("b2", addrs[1])],
        "probe = { interval = \"2s\", timeout = \"1s\", rise = 2, fall = 2 }",
    );
    // b1 greets sessions with 421 (its probes pass): a client that is
    // handed to it goes on to b2.
    group[0].answer_sessions(Answer::Greet("421 4.3.2 Busy right now"));
    let retries = r#"ferry_balancer_handoff_retries_total{listener="smtp",reason="greeting"}"#;
    let mut tries = 0;
    let (failed_before, failed_after) = loop {
        tries += 1;
        assert!(tries <= 4, "no client was handed to b1");
        let before = Instant::now();
        let (_c, greeting) = client(&b).await;
        assert_eq!(greeting, "220 b2 ready");
        if sample(&b, retries) == 1.0 {
            break (before, Instant::now());
        }
    };
    let v = b.backend("b1");
    assert!(suspect(&v), "{v}");
    group[0].answer_sessions(Answer::Serve);
    // Good probes do not end the suspicion; time does.
    b.wait_backend("b1", WAIT, |v| v["eligible"] == true);
    // It failed between `failed_before` and `failed_after`.
    let (at_least, at_most) = (failed_after.elapsed(), failed_before.elapsed());
    assert!(
        at_most >= interval && at_least < interval + Duration::from_millis(1500),
        "suspect for {at_least:?}..{at_most:?}, not one interval of {interval:?}"
    );
    let mut greetings = Vec::new();
    for _ in 0..4 {
        greetings.push(client(&b).await.1);
    }
    assert!(
        greetings.contains(&"220 b1 ready".to_string()),
        "{greetings:?}"
    );
    assert_eq!(sample(&b, retries), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_closes_first_leaves_the_client_30_seconds_to_finish() {
    let group = Backend::start_group(&["127.0.0.131"], &["b1"]).await;
    group[0].answer_sessions(Answer::HalfClose);
    let dir = tempfile::tempdir().unwrap();
    // idle_timeout stays at its 10 minutes: the 30 s are the half-close's.
    let b = balancer(
        dir.path(),
        group[0].addr.port(),
        &[("b1", "127.0.0.131")],
        "probe = { interval = \"1s\" }",
    );
    let (mut c, greeting) = client(&b).await;
    assert_eq!(greeting, "220 b1 ready");
    // The worker's EOF reaches the client...
    assert!(c.is_closed().await);
    // ...while what the client still sends reaches the worker.
    let sent_at = Instant::now();
    c.send(b"NOOP\r\nlast words\r\n").await.unwrap();
    let deadline = Instant::now() + WAIT;
    while group[0].sessions()[0].received != b"NOOP\r\nlast words\r\n" {
        assert!(Instant::now() < deadline, "{:?}", group[0].sessions());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let arrived_at = Instant::now();
    // Then silence: the balancer closes the worker's side 30 s after the
    // last byte.
    let deadline = Instant::now() + Duration::from_secs(60);
    let closed_at = loop {
        if let Some(at) = group[0].sessions()[0].closed_at {
            break at;
        }
        assert!(Instant::now() < deadline, "still open after 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (at_least, at_most) = (
        closed_at.duration_since(arrived_at),
        closed_at.duration_since(sent_at),
    );
    assert!(
        at_most >= Duration::from_millis(29_990) && at_least < Duration::from_secs(35),
        "closed {at_least:?}..{at_most:?} after the last byte"
    );
}
