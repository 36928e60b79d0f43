//! A real `ferry worker` process under pressure, as its admin endpoint
//! shows it: under the space floor (`[spool] min_free_space`) `/readyz`
//! answers 503 and `MAIL` gets `452 4.3.1` while mail already accepted is
//! still delivered to its next hop.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::binary::{http, WorkerProcess};
use ferry_tests::sink::SmtpSink;
use ferry_tests::{free_port, SmtpClient};

const LISTEN: &str = "127.0.0.1";
const WAIT: Duration = Duration::from_secs(30);
const LOW: &str = "452 4.3.1 Insufficient system resources";
/// More than any disk has free: the worker is under its floor at once.
const UNREACHABLE_FLOOR: &str = "1000000000GB";

/// One anonymous connector on `port` that may relay, everything routed to
/// `hop`, retried every second, and `spool` as the `[spool]` section.
fn config(port: u16, hop: SocketAddr, spool: &str) -> String {
    format!(
        r#"accepted_domains = [{{ domain = "example.test", kind = "authoritative" }}]

[[connectors]]
name = "Relay"
port = {port}
remote_ranges = ["127.0.0.0/8"]
permissions = ["anonymous", "accept_any_recipient"]
banner = "Relay ready"

[[routes]]
domains = ["*"]
type = "smtp"
next_hops = ["{hop}"]
tls = "none"

[delivery]
retry_interval = "1s"

[spool]
{spool}
"#
    )
}

fn start(dir: &Path, text: &str) -> (WorkerProcess, SocketAddr, std::path::PathBuf) {
    let path = dir.join("ferry.toml");
    std::fs::write(&path, text).unwrap();
    let w = WorkerProcess::start(&path, LISTEN, &dir.join("data"));
    let addr = w.smtp[0];
    (w, addr, path)
}

/// Polls `/readyz` (bounded) until it answers `want`.
async fn readyz_becomes(w: &WorkerProcess, want: u16) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, _) = http(&w.admin, "GET", "/readyz");
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {status}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A transaction from app@example.test to `to`; the reply to its end.
async fn send(c: &mut SmtpClient, to: &str, body: &[u8]) -> String {
    c.send_mail("app@example.test", to, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_space_floor_readyz_is_503_and_accepted_mail_is_still_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start().await;
    let port = free_port(LISTEN.parse::<IpAddr>().unwrap());
    let (w, addr, path) = start(
        dir.path(),
        &config(port, sink.addr, "min_free_space = \"1MB\""),
    );
    assert_eq!(http(&w.admin, "GET", "/readyz").0, 200);

    // Accepted while there is room; its next hop defers it for now.
    let (mut c, _) = SmtpClient::connect(addr, None).await;
    c.cmd("EHLO app").await;
    let r = send(
        &mut c,
        "temp1@elsewhere.test",
        b"Subject: waiting\r\n\r\nbody\r\n",
    )
    .await;
    assert!(r.starts_with("250 2.6.0"), "{r}");
    let deadline = Instant::now() + WAIT;
    while sink.rcpt_count("temp1@elsewhere.test") == 0 {
        assert!(Instant::now() < deadline, "never tried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The floor goes over the free space.
    let floor = format!("min_free_space = \"{UNREACHABLE_FLOOR}\"");
    std::fs::write(&path, config(port, sink.addr, &floor)).unwrap();
    assert_eq!(w.reload().0, 200);
    readyz_becomes(&w, 503).await;
    assert!(w.metric("ferry_spool_free_bytes").unwrap() > 0.0);
    assert_eq!(c.cmd("MAIL FROM:<app@example.test>").await, LOW);
    assert_eq!(
        w.metric(r#"ferry_smtp_senders_rejected_total{connector="Relay",reason="low_space"}"#),
        Some(1.0)
    );

    // The next hop takes it now: the queued message is delivered while
    // the worker is still under its floor.
    sink.accept_everything();
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1, "the accepted message was not delivered");
    assert_eq!(got[0].rcpt_to, ["temp1@elsewhere.test"]);
    assert_eq!(http(&w.admin, "GET", "/readyz").0, 503);
    assert_eq!(c.cmd("MAIL FROM:<app@example.test>").await, LOW);

    // Back over the floor: ready, and mail is taken again.
    std::fs::write(&path, config(port, sink.addr, "min_free_space = \"1MB\"")).unwrap();
    assert_eq!(w.reload().0, 200);
    readyz_becomes(&w, 200).await;
    let r = send(
        &mut c,
        "back@elsewhere.test",
        b"Subject: back\r\n\r\nbody\r\n",
    )
    .await;
    assert!(r.starts_with("250 2.6.0"), "{r}");
}
