//! Operations on the real `ferry worker` and `ferry balancer`: the admin
//! token's minimum length, `--log-json` lines carrying the session span's
//! fields, and the protocol and tracking logs named by the UTC date of
//! their lines (whatever the node's time zone; asserted so that a run
//! across midnight passes).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::binary::{ferry_bin, http_with, WorkerProcess};
use ferry_tests::{free_port, SmtpClient};

const WAIT: Duration = Duration::from_secs(20);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A worker config on `port`: anonymous mail to example.test, kept in a
/// folder; 127.0.0.1 may send PROXY headers; protocol log on.
fn config(dir: &Path, port: u16) -> PathBuf {
    let text = format!(
        r#"accepted_domains = [{{ domain = "example.test", kind = "authoritative" }}]
trusted_proxies = ["127.0.0.1/32"]

[[connectors]]
name = "Default Frontend"
port = {port}
remote_ranges = ["0.0.0.0/0"]
permissions = ["anonymous"]
protocol_log = "verbose"

[[routes]]
domains = ["*"]
type = "directory"
path = "mail"

[balancer]
allow = ["127.0.0.0/8"]

[[balancer.listeners]]
name = "smtp"
port = {port}

[[balancer.backends]]
name = "w1"
address = "127.0.0.1"
"#
    );
    let path = dir.join("ferry.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `ferry ROLE --config … --admin-token-file FILE` with `token` in the
/// file: `Err(stderr)` if it exits; once it is ready, `while_up` is given
/// its admin URL, then it is killed.
fn start_with_token(
    role: &str,
    config: &Path,
    dir: &Path,
    token: &str,
    while_up: impl FnOnce(&str),
) -> Result<(), String> {
    let file = dir.join(format!("{role}.token"));
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let listen = free_port(ip("127.0.0.1"));
    let mut command = Command::new(ferry_bin());
    command.arg(role).arg("--config").arg(config);
    command.args(["--listen", "127.0.0.1", "--admin", "127.0.0.1:0"]);
    if role == "worker" {
        command
            .arg("--data")
            .arg(dir.join(format!("data-{listen}")));
    }
    let mut child = command
        .arg("--admin-token-file")
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut admin = None;
    for line in stdout.by_ref() {
        let line = line.unwrap();
        if let Some(url) = line.strip_prefix(&format!("{role} admin ")) {
            admin = Some(url.to_string());
        }
        if line == format!("{role} ready") {
            break;
        }
    }
    match admin {
        Some(url) if child.try_wait().unwrap().is_none() => while_up(&url),
        _ => {
            let out = child.wait_with_output().unwrap();
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}

#[test]
fn an_admin_token_has_at_least_16_printable_characters() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), free_port(ip("127.0.0.1")));
    let refusal = "an admin token is at least 16 printable ASCII characters without spaces";
    for role in ["worker", "balancer"] {
        for token in [
            "fifteen-chars-x",
            "sixteen chars ok",
            "sixteen-chars-ok\u{a0}",
        ] {
            let err = start_with_token(role, &config, dir.path(), token, |_| {})
                .expect_err(&format!("{role} started with {token:?}"));
            assert!(err.contains(refusal), "{role}: {err}");
        }
        // Sixteen will do: the token opens the operations, another not.
        let token = "sixteen-chars-ok";
        let path = if role == "worker" {
            "/queue"
        } else {
            "/backends"
        };
        start_with_token(role, &config, dir.path(), token, |admin| {
            assert_eq!(http_with(admin, "GET", path, Some(token)).0, 200);
            let other = "sixteen-chars-no";
            assert_eq!(http_with(admin, "GET", path, Some(other)).0, 401);
        })
        .unwrap();
    }
}

/// A PROXY v2 header for a TCP/IPv4 client `from` that reached `to`.
fn proxy_v2(from: SocketAddr, to: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(from), SocketAddr::V4(to)) = (from, to) else {
        panic!("IPv4 only")
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    h.extend_from_slice(&from.ip().octets());
    h.extend_from_slice(&to.ip().octets());
    h.extend_from_slice(&from.port().to_be_bytes());
    h.extend_from_slice(&to.port().to_be_bytes());
    h
}

/// `date -u +FORMAT` now.
fn utc(format: &str) -> String {
    let out = Command::new("date")
        .arg("-u")
        .arg(format!("+{format}"))
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The one file in `dir`, waited for (bounded).
fn only_file(dir: &Path) -> PathBuf {
    let deadline = Instant::now() + WAIT;
    loop {
        let files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        if let [one] = files.as_slice() {
            if std::fs::metadata(one).unwrap().len() > 0 {
                return one.clone();
            }
        }
        assert!(files.len() <= 1, "{files:?}");
        assert!(Instant::now() < deadline, "no file in {}", dir.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (bounded) until `path` holds a line containing `needle`; that line.
fn line_with(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        assert!(Instant::now() < deadline, "no {needle:?} in {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_session_span_and_log_files_are_named_by_utc_date() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(ip("127.0.0.1"));
    let config = config(dir.path(), port);
    let data = dir.path().join("data");
    // A time zone whose date is not UTC's now: 12 hours behind before
    // noon UTC, 14 ahead after.
    let tz = match utc("%H").parse::<u32>().unwrap() {
        h if h < 12 => "XYZ+12",
        _ => "XYZ-14",
    };
    let args: Vec<String> = ["--log-json", "--config"]
        .into_iter()
        .map(String::from)
        .chain([config.display().to_string(), "--listen".into()])
        .chain(["127.0.0.1".into(), "--data".into()])
        .chain([data.display().to_string()])
        .collect();
    let _worker = WorkerProcess::start_args_env("worker", &args, &[("TZ", tz)], &data, "ready");
    let days_before = utc("%Y%m%d");

    // A client at 192.0.2.7, by way of a trusted proxy (127.0.0.1).
    let smtp = SocketAddr::new(ip("127.0.0.1"), port);
    let mut c = SmtpClient::connect_from(smtp, Some(ip("127.0.0.1")))
        .await
        .unwrap();
    c.send(&proxy_v2("192.0.2.7:40001".parse().unwrap(), smtp))
        .await
        .unwrap();
    assert!(c.reply().await.starts_with("220 "));
    c.cmd("EHLO printer").await;
    c.cmd("MAIL FROM:<printer@example.test>").await;
    c.cmd("RCPT TO:<alice@example.test>").await;
    c.cmd("DATA").await;
    let queued = c.cmd("Subject: spans\r\n\r\nhello\r\n.").await;
    let id = queued
        .strip_prefix("250 2.6.0 ")
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("{queued}"))
        .to_string();
    c.cmd("QUIT").await;
    drop(c);

    // The log line of the queued message, a JSON object whose span names
    // the session, the peer, the original client and the connector.
    let line = line_with(&data.join("worker.log"), &format!("\"queue_id\":\"{id}\""));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["fields"]["message"], "message queued", "{line}");
    let span = &v["span"];
    assert_eq!(span["name"], "session", "{line}");
    assert_eq!(span["client"], "192.0.2.7", "{line}");
    assert_eq!(span["connector"], "Default Frontend", "{line}");
    assert!(
        span["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{line}"
    );
    let session = span["session_id"].as_str().unwrap().to_string();
    assert!(!session.is_empty(), "{line}");

    // Each log's one file is named by the UTC date of its lines, which
    // is the date of the run (either one, if it crossed midnight), not
    // the node's local date.
    let days: Vec<String> = vec![days_before, utc("%Y%m%d")];
    let logs = data.join("logs");
    let tracking = only_file(&logs.join("tracking"));
    let received = line_with(&tracking, "\"event\":\"received\"");
    let event: serde_json::Value = serde_json::from_str(&received).unwrap();
    assert_eq!(event["session_id"], session.as_str(), "{received}");
    let protocol = only_file(&logs.join("smtp-receive"));
    for (file, prefix, ext, date) in [
        (&tracking, "TRACK", "jsonl", event["time"].as_str().unwrap()),
        (
            &protocol,
            "RECV",
            "LOG",
            &line_with(&protocol, &session)[..10],
        ),
    ] {
        let day = date.get(..10).unwrap().replace('-', "");
        let name = file.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, format!("{prefix}{day}.{ext}"), "{date}");
        assert!(days.contains(&day), "{name}: not a UTC date of {days:?}");
    }
}
