//! The listen queue of each port of a real `ferry worker` and `ferry
//! balancer`, as the kernel has it (`ss`, which asks the kernel's socket
//! diagnostics): the `backlog` a connector or listener sets, 1,024 when
//! none is set, capped by the kernel's `somaxconn` with a log line; and a
//! reload that changes a backlog applies it to the open socket (same
//! inode: nothing rebound, nothing waiting in the queue lost).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use ferry_tests::binary::WorkerProcess;
use ferry_tests::{
    free_port, listen_queue, missing_command, skip_for_want_of, somaxconn, SmtpClient,
};
use serde_json::Value;

const LISTEN: &str = "127.0.0.1";

fn addr(port: u16) -> SocketAddr {
    SocketAddr::new(LISTEN.parse().unwrap(), port)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// Two connectors: "Printers" on `printers` with `backlog` (a line, or
/// ""), "Apps" on `apps` with `apps_backlog`.
fn worker_config(printers: u16, backlog: &str, apps: u16, apps_backlog: &str) -> String {
    format!(
        r#"
[[connectors]]
name = "Printers"
port = {printers}
remote_ranges = ["127.0.0.0/8"]
permissions = ["anonymous"]
banner = "Printers ready"
{backlog}

[[connectors]]
name = "Apps"
port = {apps}
remote_ranges = ["127.0.0.0/8"]
permissions = ["anonymous"]
{apps_backlog}
"#
    )
}

fn log_mentions(log: &Path, what: &str) -> bool {
    std::fs::read_to_string(log).is_ok_and(|l| l.contains(what))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_ports_take_their_backlog_and_a_reload_resizes_the_open_socket() {
    if skip_for_want_of(&[missing_command("ss", "iproute2")]) {
        return;
    }
    let max = somaxconn();
    let dir = tempfile::tempdir().unwrap();
    let ip: IpAddr = LISTEN.parse().unwrap();
    let (printers, apps) = (free_port(ip), free_port(ip));
    let path = dir.path().join("ferry.toml");
    std::fs::write(&path, worker_config(printers, "backlog = 300", apps, "")).unwrap();
    let data = dir.path().join("data");
    let w = WorkerProcess::start(&path, LISTEN, &data);
    let (queue, inode) = listen_queue(addr(printers)).expect("printers port listens");
    assert_eq!(queue, 300.min(max));
    let (default_queue, apps_inode) = listen_queue(addr(apps)).expect("apps port listens");
    assert_eq!(default_queue, 1024.min(max));

    // A new backlog for both; the second beyond the kernel's cap (when
    // the cap is below the largest backlog a config may set).
    std::fs::write(
        &path,
        worker_config(printers, "backlog = 500", apps, "backlog = 65535"),
    )
    .unwrap();
    let (code, report) = w.reload();
    assert_eq!(code, 200, "{report}");
    assert_eq!(
        strings(&report["changes"]),
        [r#"~ connector "Printers""#, r#"~ connector "Apps""#]
    );
    assert!(strings(&report["listeners_added"]).is_empty(), "{report}");
    assert!(strings(&report["listeners_removed"]).is_empty(), "{report}");
    assert_eq!(listen_queue(addr(printers)), Some((500.min(max), inode)));
    assert_eq!(listen_queue(addr(apps)), Some((65535.min(max), apps_inode)));
    if max < 65535 {
        assert!(
            log_mentions(&data.join("worker.log"), "net.core.somaxconn"),
            "no log line says the kernel capped the backlog"
        );
    }
    // The port kept serving through it.
    let (_c, greeting) = SmtpClient::connect(addr(printers), None).await;
    assert_eq!(greeting, "220 Printers ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancer_listeners_take_their_backlog_and_a_reload_resizes_the_open_socket() {
    if skip_for_want_of(&[missing_command("ss", "iproute2")]) {
        return;
    }
    let max = somaxconn();
    let dir = tempfile::tempdir().unwrap();
    let ip: IpAddr = LISTEN.parse().unwrap();
    let (smtp, submission) = (free_port(ip), free_port(ip));
    let config = |backlog: u32| {
        format!(
            r#"
[balancer]
allow = ["127.0.0.0/8"]

[[balancer.listeners]]
name = "smtp"
port = {smtp}
backlog = {backlog}

[[balancer.listeners]]
name = "submission"
port = {submission}

[[balancer.backends]]
name = "w1"
address = "127.0.0.61"
"#
        )
    };
    let path = dir.path().join("ferry.toml");
    std::fs::write(&path, config(200)).unwrap();
    let b = WorkerProcess::balancer(&path, LISTEN, dir.path());
    let (queue, inode) = listen_queue(addr(smtp)).expect("smtp port listens");
    assert_eq!(queue, 200.min(max));
    let (default_queue, _) = listen_queue(addr(submission)).expect("submission port listens");
    assert_eq!(default_queue, 1024.min(max));

    std::fs::write(&path, config(700)).unwrap();
    let (code, report) = b.reload();
    assert_eq!(code, 200, "{report}");
    assert_eq!(
        strings(&report["changes"]),
        [r#"~ balancer listener "smtp""#]
    );
    assert_eq!(listen_queue(addr(smtp)), Some((700.min(max), inode)));
}
