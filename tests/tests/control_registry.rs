//! The node registry end to end over the real binaries: `ferry control`
//! (a short `--grace`), two `ferry worker --control` and one `ferry
//! balancer --control` whose config lists no backend at all. What a user
//! relies on: both workers join the balancer's pool on their own; `ferry
//! ctl drain` sends every new client to the other worker, `undrain` brings
//! it back; a worker that dies leaves the pool once the grace period has
//! passed; a balancer restarted while the control plane is down still
//! reaches the workers of the last pool it kept. Clients tell the
//! workers apart by the host name in their EHLO reply.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::binary::WorkerProcess;
use ferry_tests::control_plane::{ControlProcess, Pki};
use ferry_tests::{free_port, SmtpClient};
use serde_json::Value;

/// The control plane's grace period here.
const GRACE: Duration = Duration::from_secs(2);
/// How long a test waits for what should happen soon.
const WAIT: Duration = Duration::from_secs(20);

/// The cluster config: one connector on the workers, a balancer from
/// 127.0.0.2 (a trusted proxy) with fast probes and no backends.
fn config(worker_port: u16, balancer_port: u16) -> String {
    format!(
        r#"trusted_proxies = ["127.0.0.2/32"]
accepted_domains = [{{ domain = "example.test", kind = "authoritative" }}]

[[connectors]]
name = "Relay"
port = {worker_port}
remote_ranges = ["127.0.0.0/8"]
permissions = ["anonymous"]
banner = "Relay ready"

[[routes]]
domains = ["*"]
type = "directory"
path = "mail"

[balancer]
allow = ["127.0.0.0/8"]
source = "127.0.0.2"

[balancer.probe]
interval = "200ms"
rise = 2
fall = 2

[[balancer.listeners]]
name = "smtp"
port = {balancer_port}
backend_port = {worker_port}
"#
    )
}

fn node_flags(pki: &Pki, id: &str) -> Vec<String> {
    let s = |p: &Path| p.display().to_string();
    vec![
        "--node-id".into(),
        id.into(),
        "--ca".into(),
        s(&pki.ca()),
        "--cert".into(),
        s(&pki.cert(id)),
        "--key".into(),
        s(&pki.key(id)),
    ]
}

/// Certificates for a control plane, the admin `alice`, workers `w1` and
/// `w2` and balancer `b1`.
fn pool_pki(dir: &Path) -> Pki {
    let pki = Pki::new(&dir.join("pki"));
    pki.issue("control", "control").issue("admin", "alice");
    for id in ["w1", "w2", "b1"] {
        pki.issue("node", id);
    }
    pki
}

/// Applies [`config`] through `ferry ctl` as `alice`; the balancer's port.
fn apply_pool_config(control: &ControlProcess, pki: &Pki, dir: &Path) -> u16 {
    let worker_port = free_port("127.0.0.11".parse().unwrap());
    let balancer_port = free_port("127.0.0.1".parse().unwrap());
    let file = dir.join("ferry.toml");
    std::fs::write(&file, config(worker_port, balancer_port)).unwrap();
    let (code, out, err) = control.ctl(pki, "alice", &["apply", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    balancer_port
}

/// `ferry balancer --control` as `b1` on 127.0.0.1, with no static
/// backend: its workers come from the pool.
fn balancer_args(pki: &Pki, url: &str, data: &Path) -> Vec<String> {
    let mut args = vec![
        "--control".to_string(),
        url.into(),
        "--listen".into(),
        "127.0.0.1".into(),
        "--data".into(),
        data.display().to_string(),
    ];
    args.extend(node_flags(pki, "b1"));
    args
}

/// `ferry worker --control` as `id` on `listen`, EHLO host name
/// `ID.relay.test`.
fn worker(pki: &Pki, url: &str, id: &str, listen: &str, data: &Path) -> WorkerProcess {
    let mut args = vec![
        "--control".to_string(),
        url.into(),
        "--listen".into(),
        listen.into(),
        "--data".into(),
        data.display().to_string(),
        "--hostname".into(),
        format!("{id}.relay.test"),
    ];
    args.extend(node_flags(pki, id));
    WorkerProcess::start_args("worker", &args, data, "ready")
}

/// The worker a new client through the balancer reaches: the host name
/// its EHLO reply starts with (`w1`), or why there was none.
async fn reached(balancer: SocketAddr) -> Result<String, String> {
    let mut client = SmtpClient::connect_from(balancer, None)
        .await
        .map_err(|e| e.to_string())?;
    let greeting = client.reply().await;
    if !greeting.starts_with("220 ") {
        return Err(greeting);
    }
    let ehlo = client.cmd("EHLO client.test").await;
    let _ = client.cmd("QUIT").await;
    ehlo.strip_prefix("250-")
        .and_then(|rest| rest.split('.').next())
        .map(str::to_string)
        .ok_or(ehlo)
}

/// Waits (bounded) until clients through the balancer have reached every
/// worker of `wanted`.
async fn reaches_all(balancer: SocketAddr, wanted: &[&str]) {
    let start = Instant::now();
    let mut seen = BTreeSet::new();
    let mut last = Ok(String::new());
    while start.elapsed() < WAIT {
        last = reached(balancer).await;
        if let Ok(name) = &last {
            seen.insert(name.clone());
        }
        if wanted.iter().all(|w| seen.contains(*w)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("clients reached {seen:?}, not all of {wanted:?}; last: {last:?}");
}

/// Waits (bounded) until `n` clients in a row reach `only`, then checks
/// that `n` more do too.
async fn all_land_on(balancer: SocketAddr, only: &str, n: usize) {
    let start = Instant::now();
    let mut streak = 0;
    let mut last = Ok(String::new());
    while streak < n && start.elapsed() < WAIT {
        last = reached(balancer).await;
        streak = match &last {
            Ok(name) if name == only => streak + 1,
            _ => 0,
        };
    }
    assert_eq!(
        streak, n,
        "clients did not settle on {only}; last: {last:?}"
    );
    for _ in 0..n {
        assert_eq!(reached(balancer).await.as_deref(), Ok(only));
    }
}

/// The workers the balancer has in its backend list now.
fn backends(balancer: &WorkerProcess) -> BTreeSet<String> {
    let (code, body) = balancer.admin_call("GET", "/backends");
    assert_eq!(code, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    body["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["backend"].as_str().unwrap().to_string())
        .collect()
}

/// `ferry ctl --json nodes`: each node's JSON by ID.
fn nodes(control: &ControlProcess, pki: &Pki) -> Value {
    let (code, out, err) = control.ctl(pki, "alice", &["--json", "nodes"]);
    assert_eq!(code, 0, "{out}{err}");
    let all: Value = serde_json::from_str(&out).unwrap();
    let mut by_id = serde_json::Map::new();
    for n in all["nodes"].as_array().unwrap() {
        by_id.insert(n["node_id"].as_str().unwrap().to_string(), n.clone());
    }
    Value::Object(by_id)
}

#[tokio::test]
async fn workers_join_the_balancer_from_the_registry_drain_moves_clients_and_a_dead_one_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pool_pki(dir.path());
    let store = format!("file:{}", dir.path().join("store").display());
    let control = ControlProcess::start_with(
        &store,
        &pki,
        &dir.path().join("control.log"),
        &["--grace", "2s"],
    );
    let balancer_port = apply_pool_config(&control, &pki, dir.path());

    let mut w1 = worker(
        &pki,
        &control.url,
        "w1",
        "127.0.0.11",
        &dir.path().join("w1"),
    );
    let _w2 = worker(
        &pki,
        &control.url,
        "w2",
        "127.0.0.12",
        &dir.path().join("w2"),
    );
    let data = dir.path().join("b1");
    let args = balancer_args(&pki, &control.url, &data);
    let balancer = WorkerProcess::start_args("balancer", &args, &data, "ready");
    let front = SocketAddr::new("127.0.0.1".parse().unwrap(), balancer_port);
    assert_eq!(balancer.smtp, [front]);

    // Both workers join on their own: clients reach each.
    reaches_all(front, &["w1", "w2"]).await;
    let both: BTreeSet<String> = ["w1", "w2"].map(String::from).into();
    assert_eq!(backends(&balancer), both);
    let status = nodes(&control, &pki);
    for id in ["w1", "w2"] {
        assert_eq!(status[id]["in_rotation"], true, "{status:#}");
        assert_eq!(status[id]["smtp_address"], format!("127.0.0.1{}", &id[1..]));
    }
    assert_eq!(status["b1"]["role"], "balancer", "{status:#}");
    assert_eq!(status["b1"]["in_rotation"], Value::Null, "{status:#}");

    // Drained: every new client lands on w2.
    let (code, out, err) = control.ctl(&pki, "alice", &["drain", "w1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.trim(), "drained w1: out (drained)");
    all_land_on(front, "w2", 10).await;
    assert_eq!(backends(&balancer), ["w2".to_string()].into());
    let (_, table, _) = control.ctl(&pki, "alice", &["nodes"]);
    let w1_row = table.lines().find(|l| l.starts_with("w1 ")).unwrap();
    assert!(w1_row.contains("out (drained)"), "{table}");
    // A node that never subscribed cannot be drained: refused, exit 1.
    let (code, _, err) = control.ctl(&pki, "alice", &["drain", "w9"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("NOT_FOUND"), "{err}");

    // Undrained: w1 is reached again once its probes pass.
    let (code, out, err) = control.ctl(&pki, "alice", &["--json", "undrain", "w1"]);
    assert_eq!(code, 0, "{out}{err}");
    let undrained: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(undrained["node"]["drained"], false, "{out}");
    reaches_all(front, &["w1"]).await;

    // w1 dies: clients go on to w2 at once (the handoff skips it), and
    // the balancer drops it from its list once the grace period passed.
    w1.kill();
    let killed = Instant::now();
    assert_eq!(reached(front).await.as_deref(), Ok("w2"));
    let mut left = None;
    while killed.elapsed() < WAIT {
        if !backends(&balancer).contains("w1") {
            left = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = left.expect("w1 never left the balancer's backends");
    assert!(
        left >= GRACE - Duration::from_millis(300),
        "left after {left:?}"
    );
    let status = nodes(&control, &pki);
    assert_eq!(status["w1"]["connected"], false, "{status:#}");
    assert_eq!(status["w1"]["out_reason"], "disconnected", "{status:#}");
    all_land_on(front, "w2", 5).await;
}

/// A balancer restarted while the control plane is down serves the last
/// pool it kept: with no static backend, clients still reach the workers.
#[tokio::test]
async fn a_balancer_restarted_during_a_control_plane_outage_keeps_its_workers() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pool_pki(dir.path());
    let store = format!("file:{}", dir.path().join("store").display());
    let mut control = ControlProcess::start_with(
        &store,
        &pki,
        &dir.path().join("control.log"),
        &["--grace", "2s"],
    );
    let balancer_port = apply_pool_config(&control, &pki, dir.path());
    let _w1 = worker(
        &pki,
        &control.url,
        "w1",
        "127.0.0.11",
        &dir.path().join("w1"),
    );
    let _w2 = worker(
        &pki,
        &control.url,
        "w2",
        "127.0.0.12",
        &dir.path().join("w2"),
    );
    let data = dir.path().join("b1");
    let args = balancer_args(&pki, &control.url, &data);
    let mut balancer = WorkerProcess::start_args("balancer", &args, &data, "ready");
    let front = SocketAddr::new("127.0.0.1".parse().unwrap(), balancer_port);
    reaches_all(front, &["w1", "w2"]).await;

    // The control plane goes away, then the balancer restarts: it serves
    // its last-good config with the last pool it kept.
    control.kill();
    balancer.kill();
    let balancer = WorkerProcess::start_args("balancer", &args, &data, "ready");
    assert_eq!(balancer.smtp, [front]);
    reaches_all(front, &["w1", "w2"]).await;
    let both: BTreeSet<String> = ["w1", "w2"].map(String::from).into();
    assert_eq!(backends(&balancer), both);
    let log = std::fs::read_to_string(data.join("balancer.log")).unwrap();
    assert!(log.contains("serving the last pool kept"), "{log}");

    // A damaged copy is ignored: no worker, so every client gets 421.
    drop(balancer);
    std::fs::write(data.join("last-pool.json"), b"{\"workers\": [").unwrap();
    let balancer = WorkerProcess::start_args("balancer", &args, &data, "ready");
    assert!(backends(&balancer).is_empty());
    let mut client = SmtpClient::connect_from(front, None).await.unwrap();
    let greeting = client.reply().await;
    assert!(greeting.starts_with("421 "), "{greeting}");
    let log = std::fs::read_to_string(data.join("balancer.log")).unwrap();
    assert!(log.contains("the last worker pool is damaged"), "{log}");
}
