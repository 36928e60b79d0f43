//! `ferry send` as a process against a real `ferry worker`: a DNS
//! round-robin name whose first address refuses and second never greets
//! still gets the message through the third, and every exit code comes
//! from a real server on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_tests::binary::{ferry_send, WorkerProcess};
use ferry_tests::free_port;
use ferry_tests::sink::SmtpSink;

const WAIT: Duration = Duration::from_secs(15);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// One anonymous connector on `port` for clients in `ranges`, taking
/// mail for example.test (internal relay) and at most two recipients per
/// message; every message goes on to the sink.
fn config(port: u16, ranges: &str, sink: SocketAddr) -> String {
    format!(
        r#"accepted_domains = [{{ domain = "example.test", kind = "authoritative" }}]

[[connectors]]
name = "Relay"
port = {port}
remote_ranges = [{ranges}]
permissions = ["anonymous"]
banner = "Relay ready"
limits = {{ max_recipients = 2 }}

[[routes]]
domains = ["*"]
type = "smtp"
next_hops = ["{sink}"]
tls = "none"
"#
    )
}

fn start_worker(
    dir: &Path,
    listen: &str,
    port: u16,
    ranges: &str,
    sink: &SmtpSink,
) -> WorkerProcess {
    let file = dir.join("ferry.toml");
    std::fs::write(&file, config(port, ranges, sink.addr)).unwrap();
    WorkerProcess::start(&file, listen, &dir.join("data"))
}

/// A listener that accepts connections and never says a word; counts them.
fn silent_listener(listener: TcpListener) -> Arc<AtomicUsize> {
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        // Bounded: the test makes one connection, a stray client a few.
        for stream in listener.incoming().take(16) {
            let Ok(stream) = stream else { break };
            count.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_skips_a_refusing_and_a_silent_address() {
    let sink = SmtpSink::start().await;
    // One port free on all three addresses: nothing will listen on
    // .61 (refused), a silent listener on .62, the worker on .12.
    let (port, silent) = (0..50)
        .find_map(|_| {
            let p = free_port(ip("127.0.0.12"));
            let refused_free = TcpListener::bind(("127.0.0.61", p)).is_ok();
            let silent = TcpListener::bind(("127.0.0.62", p)).ok()?;
            refused_free.then_some((p, silent))
        })
        .expect("no port free on 127.0.0.12, .61 and .62");
    let accepted = silent_listener(silent);
    let dir = tempfile::tempdir().unwrap();
    let _worker = start_worker(dir.path(), "127.0.0.12", port, r#""127.0.0.0/8""#, &sink);

    let server = format!("relay.test:{port}");
    let run = tokio::task::spawn_blocking(move || {
        ferry_send(
            &[
                "--server",
                &server,
                "--resolve",
                "relay.test:127.0.0.61,127.0.0.62,127.0.0.12",
                "--from",
                "printer@example.test",
                "--to",
                "desk@example.test",
                "--subject",
                "round robin",
                "--body",
                "through the third address",
            ],
            &[],
            "",
        )
    })
    .await
    .unwrap();
    assert_eq!(run.code, Some(0), "{run:?}");
    // Both failures are reported, each with its address and reason.
    assert!(
        run.stderr.contains(&format!(
            "127.0.0.61:{port}: connect failed: Connection refused"
        )),
        "{run:?}"
    );
    assert!(
        run.stderr
            .contains(&format!("127.0.0.62:{port}: connected, no greeting")),
        "{run:?}"
    );
    // The listener's thread may take its connection from the queue a
    // little after ferry send exits.
    let deadline = std::time::Instant::now() + WAIT;
    while accepted.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the silent address was tried"
    );
    // Within ferry send's connect (10 s) and greeting (60 s) timeouts: the
    // silent address had its head start (250 ms), not its full timeout.
    assert!(run.elapsed < Duration::from_secs(10), "{:?}", run.elapsed);
    assert!(
        run.last_line()
            .starts_with("sent: desk@example.test: 250 2.6.0"),
        "{run:?}"
    );
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1, "the message reached the next hop");
    assert_eq!(got[0].mail_from, "printer@example.test");
    assert_eq!(got[0].rcpt_to, ["desk@example.test"]);
    let text = String::from_utf8_lossy(&got[0].data);
    assert!(text.contains("Subject: round robin\r\n"), "{text}");
    assert!(text.contains("through the third address"), "{text}");
    for header in ["Date: ", "Message-ID: <", "MIME-Version: 1.0\r\n"] {
        assert!(text.contains(header), "{header} missing: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exit_code_from_a_real_server() {
    let sink = SmtpSink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(ip("127.0.0.1"));
    // Clients 127.0.0.0 to .31 only: 127.0.0.40 finds no connector.
    let _worker = start_worker(dir.path(), "127.0.0.1", port, r#""127.0.0.0/27""#, &sink);
    let server = format!("127.0.0.1:{port}");
    let send = |extra: Vec<String>, stdin: &'static str| {
        let server = server.clone();
        tokio::task::spawn_blocking(move || {
            let mut args = vec![
                "--server".to_string(),
                server,
                "--from".into(),
                "app@example.test".into(),
            ];
            args.extend(extra);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ferry_send(&args, &[], stdin)
        })
    };
    let words = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();

    // 0: accepted for every recipient (the body from standard input).
    let run = send(words("--to a@example.test"), "from stdin\n")
        .await
        .unwrap();
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.last_line()
            .starts_with("sent: a@example.test: 250 2.6.0"),
        "{run:?}"
    );

    // 1: refused permanently, the worker's Exchange wording.
    let run = send(words("--to a@example.test x@elsewhere.test --body b"), "")
        .await
        .unwrap();
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.last_line().contains(
            "x@elsewhere.test: 550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
        ),
        "{run:?}"
    );
    assert!(
        run.last_line().starts_with("refused: a@example.test: 250"),
        "{run:?}"
    );

    // 2: a temporary refusal (the third recipient is over the limit of 2).
    let run = send(
        words("--to a@example.test b@example.test c@example.test --body b"),
        "",
    )
    .await
    .unwrap();
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.last_line()
            .contains("c@example.test: 452 4.5.3 Too many recipients"),
        "{run:?}"
    );
    assert!(run.last_line().starts_with("deferred: "), "{run:?}");

    // 3: the server greets this client with 554 (no connector for it).
    let run = send(
        words("--source 127.0.0.40 --to a@example.test --body b"),
        "",
    )
    .await
    .unwrap();
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(
        run.last_line().contains(&format!(
            "127.0.0.1:{port}: greeted with 554 5.7.1 No receive connector accepts connections from your address"
        )),
        "{run:?}"
    );
    assert!(
        run.last_line()
            .starts_with("unreachable: a@example.test: not sent"),
        "{run:?}"
    );

    // 3: nothing listens there at all.
    let closed = free_port(ip("127.0.0.1"));
    let run = tokio::task::spawn_blocking(move || {
        let server = format!("127.0.0.1:{closed}");
        ferry_send(
            &[
                "--server",
                &server,
                "--from",
                "a@example.test",
                "--to",
                "b@example.test",
                "--body",
                "x",
            ],
            &[],
            "",
        )
    })
    .await
    .unwrap();
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(run.stderr.contains("Connection refused"), "{run:?}");

    // 4: usage and local errors, before any connection.
    let run = send(words("--body b"), "").await.unwrap();
    assert_eq!(run.code, Some(4), "{run:?}");
    assert!(run.stderr.contains("--to <ADDR>"), "{run:?}");
    let run = send(
        words("--to a@example.test --body b --attach /nonexistent/file.pdf"),
        "",
    )
    .await
    .unwrap();
    assert_eq!(run.code, Some(4), "{run:?}");
    assert!(
        run.stderr.contains("--attach /nonexistent/file.pdf"),
        "{run:?}"
    );
    // The password is read from standard input, so the body cannot be.
    let run = send(words("--to a@example.test --auth scanner"), "pw\n")
        .await
        .unwrap();
    assert_eq!(run.code, Some(4), "{run:?}");
    assert!(run.stderr.contains("FERRY_SEND_PASSWORD"), "{run:?}");

    // Only the accepted messages reached the next hop: one for a, one
    // for a (the refused recipient dropped), one for a and b.
    let got = sink.wait_for(3, WAIT).await;
    // Delivered in any order: each message has its own delivery.
    let mut rcpts: Vec<Vec<String>> = got.iter().map(|m| m.rcpt_to.clone()).collect();
    rcpts.sort();
    assert_eq!(
        rcpts,
        [
            vec!["a@example.test".to_string()],
            vec!["a@example.test".to_string()],
            vec!["a@example.test".to_string(), "b@example.test".to_string()],
        ]
    );
    assert!(got
        .iter()
        .any(|m| String::from_utf8_lossy(&m.data).contains("from stdin")));
}
