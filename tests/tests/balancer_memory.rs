//! What an idle session costs the real `ferry balancer` process: with a
//! thousand greeted sessions open and silent in front of a real `ferry
//! worker`, its resident memory grew by a few kilobytes per session, not
//! by the buffers a busy session uses (the former relay held 32 KiB per
//! session, 23 KB of it resident).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ferry_tests::binary::WorkerProcess;
use ferry_tests::{free_port, open_files_for, skip_for_want_of, SmtpClient};

const SESSIONS: usize = 1000;
/// Opened first, and kept: one-time allocations (each runtime thread's
/// buffer and allocator arena, maps, metric handles) are not counted.
const WARM_UP: usize = 200;
/// Clearly under what a buffer per session costs, clearly over the ~2 KB
/// measured (debug and release builds alike).
const MAX_PER_SESSION: u64 = 8 * 1024;

/// Opens `n` sessions, `wave` at a time, each greeted by the worker.
async fn open_sessions(front: SocketAddr, n: usize, wave: usize) -> Vec<SmtpClient> {
    let mut open = Vec::with_capacity(n);
    while open.len() < n {
        let batch: Vec<_> = (0..wave.min(n - open.len()))
            .map(|_| tokio::spawn(async move { SmtpClient::connect(front, None).await }))
            .collect();
        for c in batch {
            let (c, greeting) = c.await.unwrap();
            assert_eq!(greeting, "220 Idle ready");
            open.push(c);
        }
    }
    open
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_costs_the_balancer_a_few_kilobytes() {
    let total = (WARM_UP + SESSIONS) as u64;
    // The balancer holds two descriptors a session; it inherits the limit.
    if skip_for_want_of(&[open_files_for(2 * total + 512)]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let worker_ip: IpAddr = "127.0.0.13".parse().unwrap();
    let worker_port = free_port(worker_ip);
    let front_port = free_port("127.0.0.1".parse().unwrap());
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            r#"
trusted_proxies = ["127.0.0.1/32"]

[[connectors]]
name = "Idle"
port = {worker_port}
remote_ranges = ["127.0.0.0/8"]
permissions = ["anonymous"]
banner = "Idle ready"
limits = {{ max_connections_per_source = {total} }}

[balancer]
allow = ["127.0.0.0/8"]
max_connections_per_source = {total}

[[balancer.listeners]]
name = "smtp"
port = {front_port}
backend_port = {worker_port}

[[balancer.backends]]
name = "w1"
address = "127.0.0.13"
"#
        ),
    )
    .unwrap();
    let _worker = WorkerProcess::start(&config, "127.0.0.13", &dir.path().join("w1"));
    let balancer = WorkerProcess::balancer(&config, "127.0.0.1", dir.path());
    let front = balancer.smtp[0];

    let run = async {
        let warm = open_sessions(front, WARM_UP, WARM_UP).await;
        let before = balancer.resident_kib();
        let idle = open_sessions(front, SESSIONS, 100).await;
        let after = balancer.resident_kib();
        drop((warm, idle));
        (before, after)
    };
    let (before, after) = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the sessions were not all greeted within 120 s");
    let per_session = after.saturating_sub(before) * 1024 / SESSIONS as u64;
    assert!(
        per_session < MAX_PER_SESSION,
        "{per_session} bytes of resident memory per idle session ({before} KiB -> {after} KiB)"
    );
}
