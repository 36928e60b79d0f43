//! End to end over the real `ferry worker` process: a config file, real
//! ports, real TLS, the admin endpoint, SIGTERM, and a restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use ferry_tests::binary::{ferry_bin, http, WorkerProcess};
use ferry_tests::{free_port, make_certificate, plain, SmtpClient};

const LISTEN: &str = "127.0.0.1";

/// Writes a config like the example's, on free ports; returns (path, front port, client port).
fn write_config(dir: &Path, password_hash: &str) -> (std::path::PathBuf, u16, u16) {
    let ip: IpAddr = LISTEN.parse().unwrap();
    let (front, client) = (free_port(ip), free_port(ip));
    // Nothing listens there: mail for the outside world stays deferred.
    let dead = free_port(ip);
    let text = format!(
        r#"
accepted_domains = [{{ domain = "example.test", kind = "authoritative" }}]

[[connectors]]
name = "Default Frontend"
port = {front}
remote_ranges = ["0.0.0.0/0", "::/0"]
permissions = ["anonymous"]
auth = ["tls"]
tls = {{ certificate = "test.crt", key = "test.key" }}
banner = "Default Frontend ready"

[[connectors]]
name = "Anon Relay"
port = {front}
remote_ranges = ["127.0.0.30/32"]
permissions = ["anonymous", "accept_any_recipient"]
banner = "Anon Relay ready"

[[connectors]]
name = "Client Frontend"
port = {client}
remote_ranges = ["0.0.0.0/0"]
permissions = ["users"]
auth = ["tls", "basic_auth_require_tls"]
tls = {{ certificate = "test.crt", key = "test.key" }}
banner = "Client Frontend ready"
limits = {{ tarpit = "100ms" }}

[[users]]
name = "scanner"
password_hash = "{password_hash}"
allowed_senders = ["*@example.test"]

[[routes]]
domains = ["example.test"]
type = "directory"
path = "mailbox"

[[routes]]
domains = ["*"]
type = "smtp"
next_hops = ["127.0.0.1:{dead}"]
tls = "none"
"#
    );
    let path = dir.join("ferry.toml");
    std::fs::write(&path, text).unwrap();
    (path, front, client)
}

fn hash(password: &str) -> String {
    let mut child = std::process::Command::new(ferry_bin())
        .args(["user", "hash"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    String::from_utf8(child.wait_with_output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string()
}

/// GET over plain HTTP/1.1; returns (status, body).
fn http_get(base: &str, path: &str) -> (u16, String) {
    http(base, "GET", path)
}

fn metric(body: &str, name_and_labels: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_process_relays_reports_and_drains() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_certificate(dir.path());
    let (config, front, client) = write_config(dir.path(), &hash("pw-e2e"));
    let data = dir.path().join("data");
    let mut w = WorkerProcess::start(&config, LISTEN, &data);
    let front_addr = format!("{LISTEN}:{front}").parse().unwrap();
    let client_addr = format!("{LISTEN}:{client}").parse().unwrap();
    assert!(
        w.smtp.contains(&front_addr) && w.smtp.contains(&client_addr),
        "{:?}",
        w.smtp
    );

    // Internal relay: accepted for example.test, refused elsewhere.
    let (mut c, banner) = SmtpClient::connect(front_addr, None).await;
    assert_eq!(banner, "220 Default Frontend ready");
    c.cmd("EHLO printer").await;
    assert_eq!(
        c.cmd("MAIL FROM:<printer@example.test>").await,
        "250 2.1.0 Sender OK"
    );
    assert_eq!(
        c.cmd("RCPT TO:<x@elsewhere.test>").await,
        "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
    );
    assert_eq!(
        c.cmd("RCPT TO:<alice@example.test>").await,
        "250 2.1.5 Recipient OK"
    );
    c.cmd("DATA").await;
    c.send(b"Subject: one\r\n\r\nfrom the printer\r\n.\r\n")
        .await
        .unwrap();
    assert!(c.reply().await.starts_with("250 2.6.0"));
    c.cmd("QUIT").await;

    // Anonymous relay from its one address.
    let (mut c, banner) =
        SmtpClient::connect(front_addr, Some("127.0.0.30".parse().unwrap())).await;
    assert_eq!(banner, "220 Anon Relay ready");
    c.cmd("HELO app").await;
    c.cmd("MAIL FROM:<app@example.test>").await;
    assert_eq!(
        c.cmd("RCPT TO:<x@elsewhere.test>").await,
        "250 2.1.5 Recipient OK"
    );
    c.cmd("QUIT").await;

    // Authenticated relay: one failure, then success after STARTTLS.
    let (mut c, _) = SmtpClient::connect(client_addr, None).await;
    c.cmd("EHLO scanner").await;
    c.starttls(&ca).await.unwrap();
    c.cmd("EHLO scanner").await;
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", plain("scanner", "nope")))
            .await,
        "535 5.7.8 Authentication credentials invalid"
    );
    assert!(c
        .cmd(&format!("AUTH PLAIN {}", plain("scanner", "pw-e2e")))
        .await
        .starts_with("235"));
    c.cmd("MAIL FROM:<scanner@example.test>").await;
    assert_eq!(
        c.cmd("RCPT TO:<x@elsewhere.test>").await,
        "250 2.1.5 Recipient OK"
    );
    c.cmd("DATA").await;
    c.send(b"Subject: two\r\n\r\nscan attached\r\n.\r\n")
        .await
        .unwrap();
    assert!(c.reply().await.starts_with("250 2.6.0"));
    c.cmd("QUIT").await;

    // The admin endpoint.
    assert_eq!(http_get(&w.admin, "/livez").0, 200);
    assert_eq!(http_get(&w.admin, "/readyz").0, 200);
    let (status, m) = http_get(&w.admin, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        metric(
            &m,
            "ferry_smtp_messages_accepted_total{connector=\"Default Frontend\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "ferry_smtp_messages_accepted_total{connector=\"Client Frontend\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "ferry_smtp_recipients_rejected_total{connector=\"Default Frontend\",reason=\"relay_denied\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "ferry_smtp_tls_handshakes_total{connector=\"Client Frontend\",result=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "ferry_smtp_auth_failures_total{connector=\"Client Frontend\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "ferry_smtp_sessions_total{connector=\"Anon Relay\"}"),
        1.0
    );

    // SIGTERM: an idle session is told, the process exits cleanly.
    let (mut idle, _) = SmtpClient::connect(front_addr, None).await;
    idle.cmd("HELO idle").await;
    let status = tokio::task::spawn_blocking(move || {
        let s = w.terminate();
        (s, w)
    });
    assert_eq!(
        idle.reply().await,
        "421 4.3.2 Service shutting down, closing transmission channel"
    );
    let (status, w) = status.await.unwrap();
    assert!(status.expect("worker did not exit").success());
    drop(w);

    // The log file is plain text: one line per event, no terminal colours.
    let log = std::fs::read_to_string(data.join("worker.log")).unwrap();
    assert!(log.contains("INFO ferry::node: worker started"), "{log}");
    assert!(log.contains("message done"), "{log}");
    assert!(!log.contains('\x1b'), "colour codes in the log file");

    // Mail for example.test was delivered to its folder; the scanner's
    // message for the outside world waits for its next hop, and the
    // restarted worker still has it queued.
    let mailbox: Vec<String> = std::fs::read_dir(dir.path().join("mailbox"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(mailbox.len(), 1);
    assert!(mailbox[0].contains("X-Ferry-Rcpt-To: <alice@example.test>\r\n"));
    assert!(mailbox[0].ends_with("Subject: one\r\n\r\nfrom the printer\r\n"));
    let w = WorkerProcess::start(&config, LISTEN, &data);
    let (ok, listing) = queue_cmd(&w, &["list"]);
    assert!(ok && listing.ends_with("\n1 message\n"), "{listing}");
    let id = listing
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .unwrap();
    let (ok, shown) = queue_cmd(&w, &["show", id]);
    assert!(ok, "{shown}");
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["user"], "scanner");
    assert_eq!(shown["sender"], "scanner@example.test");
    assert_eq!(shown["recipients"][0]["address"], "x@elsewhere.test");
    assert!(
        ["queued", "deferred"].contains(&shown["recipients"][0]["state"].as_str().unwrap()),
        "{shown}"
    );
    drop(w);
}

#[test]
fn worker_with_a_bad_config_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.toml");
    std::fs::write(&path, "[[connectors]]\nname = \"A\"\nport = 25\nremote_ranges = [\"nonsense\"]\npermissions = [\"anonymous\"]\n").unwrap();
    let err = worker_fails_to_start(&path, dir.path());
    assert!(
        err.contains("ferry.toml:4:18: 'nonsense' is not an IP address or CIDR range"),
        "{err}"
    );
}

#[test]
fn worker_with_a_missing_certificate_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, _) = write_config(dir.path(), &hash("x"));
    let err = worker_fails_to_start(&config, dir.path());
    assert!(
        err.contains("connector 'Default Frontend': cannot read") && err.contains("test.crt"),
        "{err}"
    );
    // Every problem at once: both files of both connectors that use them.
    for connector in ["Default Frontend", "Client Frontend"] {
        for file in ["test.crt", "test.key"] {
            let wanted = format!(
                "connector '{connector}': cannot read {}",
                dir.path().join(file).display()
            );
            assert!(err.contains(&wanted), "{wanted} in {err}");
        }
    }
}

/// Runs `ferry worker` expecting it to refuse to start; returns its stderr.
fn worker_fails_to_start(config: &Path, dir: &Path) -> String {
    let out = std::process::Command::new(ferry_bin())
        .args(["worker", "--config"])
        .arg(config)
        .args(["--listen", LISTEN, "--data"])
        .arg(dir.join("data"))
        .args(["--admin", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the worker started");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Runs `ferry queue ARGS` until its output passes `done` (bounded: 20 s);
/// that output, or `None`.
fn poll_queue(w: &WorkerProcess, args: &[&str], done: impl Fn(&str) -> bool) -> Option<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        let (ok, out) = queue_cmd(w, args);
        if ok && done(&out) {
            return Some(out);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Runs `ferry queue ...` with the worker's token; returns (success,
/// stdout).
fn queue_cmd(w: &WorkerProcess, args: &[&str]) -> (bool, String) {
    let admin = w.admin.trim_start_matches("http://");
    let out = std::process::Command::new(ferry_bin())
        .args(["queue", "--admin", admin, "--token-file"])
        .arg(&w.token_file)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_administration_through_the_admin_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    make_certificate(dir.path());
    let (config, front, _) = write_config(dir.path(), &hash("pw"));
    let data = dir.path().join("data");
    let w = WorkerProcess::start(&config, LISTEN, &data);
    let front_addr = format!("{LISTEN}:{front}").parse().unwrap();
    // Two messages for the outside world; its next hop is down.
    for subject in ["first", "second"] {
        let (mut c, _) = SmtpClient::connect(front_addr, Some("127.0.0.30".parse().unwrap())).await;
        c.cmd("HELO app").await;
        c.cmd("MAIL FROM:<app@example.test>").await;
        c.cmd("RCPT TO:<x@elsewhere.test>").await;
        c.cmd("DATA").await;
        c.send(format!("Subject: {subject}\r\n\r\nbody\r\n.\r\n").as_bytes())
            .await
            .unwrap();
        assert!(c.reply().await.starts_with("250 2.6.0"));
        c.cmd("QUIT").await;
    }
    let listing = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let (ok, out) = queue_cmd(&w, &["list"]);
            assert!(ok, "{out}");
            if out.matches("(deferred)").count() == 2 {
                return out;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("both messages deferred");
    assert!(
        listing.contains("app@example.test") && listing.ends_with("2 messages\n"),
        "{listing}"
    );
    let ids: Vec<String> = listing
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter(|id| id.len() == 20)
        .map(String::from)
        .collect();
    assert_eq!(ids.len(), 2);
    // Without the token, the queue stays closed.
    let out = std::process::Command::new(ferry_bin())
        .args([
            "queue",
            "--admin",
            w.admin.trim_start_matches("http://"),
            "list",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") && err.contains("bearer token"), "{err}");
    assert!(err.contains("pass its file with --token-file"), "{err}");
    // The node at a glance (open to monitoring, no token).
    let (status, body) = http_get(&w.admin, "/status");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["role"], "worker");
    assert_eq!(v["ready"], true);
    assert_eq!(
        v["queue"],
        serde_json::json!({ "messages": 2, "deferred": 2 })
    );

    // Ids in any case; times in RFC 3339.
    let (ok, shown) = queue_cmd(&w, &["show", &ids[0].to_ascii_lowercase()]);
    assert!(ok, "{shown}");
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["id"], ids[0].as_str());
    let received = shown["received_at"].as_str().unwrap();
    assert!(
        received.len() == 20 && received.as_bytes()[10] == b'T' && received.ends_with('Z'),
        "{received}"
    );
    assert_eq!(shown["client_ip"], "127.0.0.30");
    assert_eq!(shown["recipients"][0]["state"], "deferred");
    assert!(shown["recipients"][0]["reply"]
        .as_str()
        .unwrap()
        .starts_with("451 4.4.0 connection to 127.0.0.1:"));

    // A retry is an attempt now (the next one was minutes away): the
    // count goes up.
    let attempts = shown["attempts"].as_u64().unwrap();
    assert_eq!(attempts, 1, "{shown}");
    assert!(queue_cmd(&w, &["retry", &ids[0]]).0);
    assert!(
        poll_queue(&w, &["show", &ids[0]], |out| {
            serde_json::from_str::<serde_json::Value>(out)
                .is_ok_and(|v| v["attempts"].as_u64() == Some(attempts + 1))
        })
        .is_some(),
        "ferry queue retry made no attempt"
    );
    // Bounce the first: the sender hears of it; delete the second quietly.
    assert!(queue_cmd(&w, &["bounce", &ids[0]]).0);
    assert!(queue_cmd(&w, &["delete", &ids[1]]).0);
    let (ok, out) = queue_cmd(&w, &["show", &ids[1]]);
    assert!(!ok && out.is_empty());
    let bounce = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let found = std::fs::read_dir(dir.path().join("mailbox"))
                .map(|d| {
                    d.filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
                        .find(|t| t.contains("Undeliverable: first"))
                })
                .unwrap_or(None);
            if let Some(b) = found {
                return b;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a bounce for the first message");
    assert!(
        bounce.contains("Diagnostic-Code: smtp; 5.0.0 Bounced by an administrator"),
        "{bounce}"
    );
    // The bounce itself is delivered and retired a moment after its file
    // appears; then the queue is empty.
    let out = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let (_, out) = queue_cmd(&w, &["list"]);
            if out.ends_with("0 messages\n") {
                return out;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(out.is_ok(), "the queue did not empty");
    // The bounce of the first is delivered and nothing else is queued: the
    // deleted second got none.
    let bounced: Vec<String> = std::fs::read_dir(dir.path().join("mailbox"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .filter_map(|t| {
            t.lines()
                .find(|l| l.starts_with("Subject: Undeliverable"))
                .map(String::from)
        })
        .collect();
    assert_eq!(bounced, ["Subject: Undeliverable: first"]);
    // The delete is in the tracking log, with the recipient it dropped.
    let deleted = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let found = std::fs::read_dir(data.join("logs").join("tracking"))
                .map(|d| {
                    d.filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
                        .flat_map(|t| t.lines().map(String::from).collect::<Vec<_>>())
                        .find(|l| l.contains(r#""event":"deleted""#))
                })
                .unwrap_or(None);
            if let Some(line) = found {
                return line;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a deleted event in the tracking log");
    let event: serde_json::Value = serde_json::from_str(&deleted).unwrap();
    assert_eq!(event["queue_id"], ids[1].as_str());
    assert_eq!(event["recipients"], serde_json::json!(["x@elsewhere.test"]));
    drop(w);
}
