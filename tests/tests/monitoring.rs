//! What `deploy/` gives Prometheus users: alert rules that fire when they
//! should (promtool's unit tests), a dashboard and rules that name only
//! metrics Ferry exports, and live `/metrics` pages that pass promtool's
//! lint. `.ci/run` installs prometheus (for promtool); without it the
//! promtool checks say why and skip, or fail in CI (`FERRY_REQUIRE_PEERS`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeSet;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ferry_tests::binary::{http, WorkerProcess};
use ferry_tests::{free_port, SmtpClient};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn have_promtool() -> bool {
    !ferry_tests::skip_for_want_of(&[ferry_tests::missing_command(
        "promtool",
        ".ci/run installs prometheus",
    )])
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(root().join("deploy/prometheus"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `ferry_…` names in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("ferry_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        names.insert(text[start..end].to_string());
        i = end.max(start + 1);
    }
    names
}

#[test]
fn alert_rules_fire_when_they_should() {
    if !have_promtool() {
        return;
    }
    let (ok, out) = promtool(&["check", "rules", "alerts.yml"], None);
    assert!(ok, "{out}");
    let (ok, out) = promtool(&["test", "rules", "alerts.test.yml"], None);
    assert!(ok, "{out}");
    let (ok, out) = promtool(&["check", "config", "prometheus.yml"], None);
    assert!(ok, "{out}");
}

#[test]
fn rules_and_dashboard_name_only_exported_metrics() {
    let mut exported = BTreeSet::new();
    for src in [
        "crates/ferry-worker/src/metric.rs",
        "crates/ferry-balancer/src/metric.rs",
        "crates/ferry-node/src/metric.rs",
        "crates/ferry-control/src/server/metric.rs",
    ] {
        let text = std::fs::read_to_string(root().join(src)).unwrap();
        exported.extend(metric_names(&text));
    }
    assert!(exported.len() > 20, "{exported:?}");
    let dashboard =
        std::fs::read_to_string(root().join("deploy/grafana/ferry-dashboard.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert!(parsed["panels"].as_array().unwrap().len() >= 10);
    let alerts = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap();
    for (file, text) in [("dashboard", &dashboard), ("alerts", &alerts)] {
        for name in metric_names(text) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                exported.contains(&name) || exported.contains(base),
                "the {file} names {name}, which Ferry does not export"
            );
        }
    }
}

/// An operator who reloads a node sees it on the dashboard: the version
/// each instance serves, and reloads by result with whether the last one
/// worked.
#[test]
fn the_dashboard_shows_the_config_metrics() {
    let dashboard =
        std::fs::read_to_string(root().join("deploy/grafana/ferry-dashboard.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let exprs: Vec<String> = parsed["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    let shown = |metric: &str, by: &str| {
        exprs
            .iter()
            .any(|e| e.contains(metric) && e.contains(&format!("by ({by})")))
    };
    assert!(shown("ferry_config_version", "instance"), "{exprs:#?}");
    assert!(shown("ferry_config_reloads_total", "result"), "{exprs:#?}");
    assert!(
        shown("ferry_config_last_reload_successful", "instance"),
        "{exprs:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_metrics_pass_promtool_lint() {
    if !have_promtool() {
        return;
    }
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let worker_port = free_port(ip("127.0.0.1"));
    let balancer_port = free_port(ip("127.0.0.1"));
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

[[routes]]
domains = ["*"]
type = "directory"
path = "mail"

[balancer]
allow = ["127.0.0.0/8"]
probe = {{ interval = "200ms" }}

[[balancer.listeners]]
name = "smtp"
port = {balancer_port}
backend_port = {worker_port}

[[balancer.backends]]
name = "w1"
address = "127.0.0.1"
"#
        ),
    )
    .unwrap();
    let worker = WorkerProcess::start(&config, "127.0.0.1", &dir.path().join("data"));
    let balancer = WorkerProcess::balancer(&config, "127.0.0.1", dir.path());
    // Some traffic, so that every kind of series exists.
    let (mut c, banner) = SmtpClient::connect(balancer.smtp[0], Some(ip("127.0.0.31"))).await;
    assert!(banner.starts_with("220"), "{banner}");
    c.cmd("EHLO device").await;
    c.cmd("MAIL FROM:<a@example.test>").await;
    c.cmd("RCPT TO:<b@example.test>").await;
    c.cmd("RCPT TO:<x@elsewhere.test>").await;
    c.cmd("DATA").await;
    c.send(b"Subject: m\r\n\r\nbody\r\n.\r\n").await.unwrap();
    assert!(c.reply().await.starts_with("250 2.6.0"));
    c.cmd("QUIT").await;
    // Until a probe has run and the message is delivered, some kinds of
    // series are not there yet.
    let wait = std::time::Duration::from_secs(20);
    let once = |v: Option<f64>| v.is_some_and(|v| v >= 1.0);
    balancer.wait_metric(
        r#"ferry_balancer_probe_duration_seconds_count{backend="w1"}"#,
        wait,
        once,
    );
    worker.wait_metric(
        r#"ferry_delivery_attempts_total{result="delivered"}"#,
        wait,
        once,
    );
    for node in [&worker, &balancer] {
        let (status, page) = http(&node.admin, "GET", "/metrics");
        assert_eq!(status, 200);
        assert!(page.contains("# HELP ferry_"), "{page}");
        let (ok, out) = promtool(&["check", "metrics"], Some(&page));
        assert!(ok, "{out}\n{page}");
    }
}
