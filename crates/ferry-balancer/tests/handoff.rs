//! The balancer in-process against scripted backends on loopback: a
//! worker that hangs, one that greets with `421`, one that refuses
//! connections; the client only ever sees the good one. Also the probe's
//! view of each, and the relay's half-close.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_balancer::probe::{probe, ProbeResult};
use ferry_balancer::Balancer;
use ferry_config::ClusterConfig;
use ferry_node::{LoadedConfig, Role, Source};
use ferry_tests::{open_files_for, skip_for_want_of, SmtpClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Copy)]
enum Script {
    /// Reads the PROXY header, greets, answers EHLO and QUIT, and echoes
    /// what it got in a `250` reply to `SHOW`.
    Good,
    /// Accepts and never says anything.
    Hang,
    /// Greets with 421 (draining).
    Busy,
    /// Greets at once and answers the first thing it reads with a `250`
    /// reply quoting its first octets.
    Plain,
}

async fn backend(addr: SocketAddr, script: Script) -> SocketAddr {
    recording_backend(addr, script).await.0
}

/// A backend that also keeps the address each connection came from.
async fn recording_backend(
    addr: SocketAddr,
    script: Script,
) -> (SocketAddr, Arc<Mutex<Vec<IpAddr>>>) {
    let l = TcpListener::bind(addr).await.unwrap();
    let bound = l.local_addr().unwrap();
    let peers = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&peers);
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = l.accept().await {
            seen.lock().unwrap().push(peer.ip());
            tokio::spawn(async move {
                match script {
                    Script::Hang => {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    Script::Busy => {
                        let _ = s.write_all(b"421 4.3.2 draining\r\n").await;
                    }
                    Script::Plain => {
                        let _ = s.write_all(b"220 plain\r\n").await;
                        let mut buf = [0u8; 64];
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        let first: String = buf[..n.min(4)]
                            .iter()
                            .map(|b| {
                                if b.is_ascii_graphic() {
                                    *b as char
                                } else {
                                    '?'
                                }
                            })
                            .collect();
                        let _ = s
                            .write_all(format!("250 first {first}\r\n").as_bytes())
                            .await;
                    }
                    Script::Good => {
                        let mut got = Vec::new();
                        let mut buf = [0u8; 1024];
                        // The PROXY header comes first: 16 octets and more.
                        let _ = s.read(&mut buf).await;
                        let _ = s.write_all(b"220-good backend\r\n220 ready\r\n").await;
                        loop {
                            let n = match s.read(&mut buf).await {
                                Ok(0) | Err(_) => {
                                    // The client half-closed: answer, then close.
                                    let _ = s.write_all(b"250 bye after EOF\r\n").await;
                                    return;
                                }
                                Ok(n) => n,
                            };
                            got.extend_from_slice(&buf[..n]);
                            let text = String::from_utf8_lossy(&got).to_string();
                            if text.ends_with("QUIT\r\n") {
                                let _ = s.write_all(b"221 bye\r\n").await;
                                return;
                            }
                            if text.ends_with("\r\n") {
                                let _ = s.write_all(b"250 ok\r\n").await;
                                got.clear();
                            }
                        }
                    }
                }
            });
        }
    });
    (bound, peers)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A balancer whose backends, in order, are `addrs` (all on `port`).
async fn balancer(addrs: &[&str], port: u16) -> (Arc<Balancer>, SocketAddr) {
    balancer_with(addrs, port, "").await
}

/// The same, with `extra` lines in its `[balancer]` section.
async fn balancer_with(addrs: &[&str], port: u16, extra: &str) -> (Arc<Balancer>, SocketAddr) {
    balancer_full(addrs, port, extra, true).await
}

/// The same, with the listener's PROXY switch.
async fn balancer_full(
    addrs: &[&str],
    port: u16,
    extra: &str,
    proxy: bool,
) -> (Arc<Balancer>, SocketAddr) {
    let backends: String = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("[[balancer.backends]]\nname = \"b{i}\"\naddress = \"{a}\"\n"))
        .collect();
    // A test may set its own handoff timeout in `extra`.
    let handoff = match extra.contains("handoff_timeout") {
        true => "",
        false => "handoff_timeout = \"500ms\"",
    };
    let text = format!(
        r#"
# The `source` a test may give in `extra` must be trusted to send PROXY.
trusted_proxies = ["127.0.0.50"]

[balancer]
allow = ["127.0.0.0/8"]
{handoff}
idle_timeout = "600ms"
probe = {{ interval = "1h", timeout = "500ms" }}
{extra}

[[balancer.listeners]]
name = "smtp"
port = 0
backend_port = {port}
proxy_protocol = {proxy}

{backends}
"#
    );
    let config = ClusterConfig::parse("b.toml", &text, std::path::Path::new(".")).unwrap();
    let material = Balancer::prepare(&config).unwrap();
    let loaded = LoadedConfig {
        config: Arc::new(config),
        sha256: ferry_node::sha256_hex(text.as_bytes()),
        source: Source::File("b.toml".into()),
    };
    let first = Arc::new(loaded.into_snapshot(1, material));
    let b = Balancer::new(Arc::clone(&first), ip("127.0.0.1"));
    let addr = b.apply(first).await.unwrap().added[0];
    tokio::spawn(Arc::clone(&b).run(Duration::from_secs(1)));
    (b, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_workers_are_skipped_and_the_client_never_sees_them() {
    let good = backend("127.0.0.23:0".parse().unwrap(), Script::Good).await;
    let port = good.port();
    backend(SocketAddr::new(ip("127.0.0.21"), port), Script::Hang).await;
    backend(SocketAddr::new(ip("127.0.0.22"), port), Script::Busy).await;
    // 127.0.0.24 has nothing listening: refused.
    let (b, front) = balancer(
        &["127.0.0.21", "127.0.0.22", "127.0.0.24", "127.0.0.23"],
        port,
    )
    .await;
    let started = Instant::now();
    let (mut c, greeting) = SmtpClient::connect(front, None).await;
    assert_eq!(greeting, "220-good backend\r\n220 ready");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(c.cmd("NOOP").await, "250 ok");
    // Half-close: the client stops sending, the backend's last words
    // still arrive.
    c.shutdown_write().await;
    assert_eq!(c.reply().await, "250 bye after EOF");
    assert!(c.is_closed().await);

    // The skipped ones are suspect now: the next client goes straight to
    // the good one.
    let started = Instant::now();
    let (_c, greeting) = SmtpClient::connect(front, None).await;
    assert_eq!(greeting, "220-good backend\r\n220 ready");
    assert!(started.elapsed() < Duration::from_millis(400));
    let busy: Vec<_> = b
        .state()
        .frontends()
        .next()
        .unwrap()
        .targets
        .iter()
        .map(|t| t.is_eligible())
        .collect();
    assert_eq!(busy, [false, false, false, true]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_tell_up_draining_and_each_failure_stage() {
    let good = backend("127.0.0.25:0".parse().unwrap(), Script::Good).await;
    let port = good.port();
    let hang = backend(SocketAddr::new(ip("127.0.0.26"), port), Script::Hang).await;
    let busy = backend(SocketAddr::new(ip("127.0.0.27"), port), Script::Busy).await;
    let limit = Duration::from_millis(300);
    assert_eq!(probe(good, None, true, limit).await, ProbeResult::Up);
    assert_eq!(probe(busy, None, true, limit).await, ProbeResult::Draining);
    assert!(matches!(
        probe(hang, None, true, limit).await,
        ProbeResult::Failed {
            stage: "timeout",
            ..
        }
    ));
    assert!(matches!(
        probe(SocketAddr::new(ip("127.0.0.28"), port), None, true, limit).await,
        ProbeResult::Failed {
            stage: "connect",
            ..
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_over_the_per_source_cap_get_421() {
    let good = backend("127.0.0.29:0".parse().unwrap(), Script::Good).await;
    let (_b, front) = balancer(&["127.0.0.29"], good.port()).await;
    let mut open = Vec::new();
    for _ in 0..20 {
        let (c, greeting) = SmtpClient::connect(front, Some(ip("127.0.0.35"))).await;
        assert_eq!(greeting, "220-good backend\r\n220 ready");
        open.push(c);
    }
    let (mut c, refused) = SmtpClient::connect(front, Some(ip("127.0.0.35"))).await;
    assert_eq!(
        refused,
        "421 4.3.2 Too many connections from your address, try again later"
    );
    assert!(c.is_closed().await);
    let (_c, greeting) = SmtpClient::connect(front, Some(ip("127.0.0.36"))).await;
    assert_eq!(greeting, "220-good backend\r\n220 ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_total_cap_get_421() {
    let good = backend("127.0.0.38:0".parse().unwrap(), Script::Good).await;
    let (_b, front) = balancer_with(&["127.0.0.38"], good.port(), "max_connections = 3").await;
    let mut open = Vec::new();
    for k in 0..3 {
        let (c, greeting) = SmtpClient::connect(front, Some(ip(&format!("127.0.0.4{k}")))).await;
        assert_eq!(greeting, "220-good backend\r\n220 ready");
        open.push(c);
    }
    let (mut c, refused) = SmtpClient::connect(front, Some(ip("127.0.0.45"))).await;
    assert_eq!(refused, "421 4.3.2 Too many connections, try again later");
    assert!(c.is_closed().await);
    // A place freed is a place taken.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_c, greeting) = SmtpClient::connect(front, Some(ip("127.0.0.45"))).await;
        if greeting.starts_with("220") {
            break;
        }
        assert!(Instant::now() < deadline, "the freed place was not reused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_closed_and_traffic_keeps_them_open() {
    let good = backend("127.0.0.37:0".parse().unwrap(), Script::Good).await;
    let (_b, front) = balancer(&["127.0.0.37"], good.port()).await;
    let (mut c, _) = SmtpClient::connect(front, None).await;
    // A command every 300 ms keeps the session for well past the timeout.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(c.cmd("NOOP").await, "250 ok");
    }
    // Then silence: both sides are closed after about 600 ms.
    let started = Instant::now();
    assert!(c.is_closed().await);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(550) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_without_proxy_sends_the_client_bytes_only() {
    let plain = backend("127.0.0.39:0".parse().unwrap(), Script::Plain).await;
    let (_b, front) = balancer_full(&["127.0.0.39"], plain.port(), "", false).await;
    let (mut c, greeting) = SmtpClient::connect(front, None).await;
    assert_eq!(greeting, "220 plain");
    assert_eq!(c.cmd("EHLO device").await, "250 first EHLO");
    // With PROXY on, the backend's first octets are the v2 signature.
    let (_b, front) = balancer_full(&["127.0.0.39"], plain.port(), "", true).await;
    let (mut c, greeting) = SmtpClient::connect(front, None).await;
    assert_eq!(greeting, "220 plain");
    c.send(b"EHLO device\r\n").await.unwrap();
    assert_eq!(c.reply().await, "250 first ????");
}

/// Workers trust PROXY headers by the peer address: sessions and probes
/// both come from `[balancer] source`, whatever address the client used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_workers_come_from_the_configured_source() {
    let (good, peers) = recording_backend("127.0.0.51:0".parse().unwrap(), Script::Good).await;
    let (_b, front) = balancer_with(&["127.0.0.51"], good.port(), "source = \"127.0.0.50\"").await;
    let (mut c, greeting) = SmtpClient::connect(front, Some(ip("127.0.0.52"))).await;
    assert_eq!(greeting, "220-good backend\r\n220 ready");
    assert_eq!(c.cmd("NOOP").await, "250 ok");
    // The first probe runs at start; wait for it and the session.
    let deadline = Instant::now() + Duration::from_secs(10);
    while peers.lock().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "{:?}", peers.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = peers.lock().unwrap().clone();
    assert!(seen.iter().all(|p| *p == ip("127.0.0.50")), "{seen:?}");

    // Without the key the system picks (127.0.0.1 on loopback).
    let (plain, peers) = recording_backend("127.0.0.53:0".parse().unwrap(), Script::Good).await;
    let (_b, front) = balancer(&["127.0.0.53"], plain.port()).await;
    let (_c, greeting) = SmtpClient::connect(front, Some(ip("127.0.0.52"))).await;
    assert_eq!(greeting, "220-good backend\r\n220 ready");
    assert!(peers.lock().unwrap().contains(&ip("127.0.0.1")));
}

/// A burst of 1,000 clients at once: the listen queue (1,024 by default)
/// holds every connection until it is accepted, and each is greeted. (How
/// fast is for `bench/idle.sh`; this only bounds it, generously.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_a_thousand_clients_is_greeted_every_one() {
    const CLIENTS: usize = 1000;
    // Each session: the client, both ends through the balancer, the
    // backend's end.
    if skip_for_want_of(&[open_files_for(4 * CLIENTS as u64 + 256)]) {
        return;
    }
    let good = backend("127.0.0.56:0".parse().unwrap(), Script::Good).await;
    let extra = format!("handoff_timeout = \"20s\"\nmax_connections_per_source = {CLIENTS}");
    let (_b, front) = balancer_with(&["127.0.0.56"], good.port(), &extra).await;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let start = std::sync::Arc::clone(&start);
            tokio::spawn(async move {
                start.wait().await;
                let mut c = SmtpClient::connect_from(front, None).await.ok()?;
                let greeting = c.reply().await;
                Some((c, greeting))
            })
        })
        .collect();
    let all = async {
        let mut greetings = Vec::new();
        for c in clients {
            greetings.push(c.await.unwrap());
        }
        greetings
    };
    let greetings = tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("the burst was not greeted within 120 s");
    let greeted = greetings
        .iter()
        .flatten()
        .filter(|(_, g)| g == "220-good backend\r\n220 ready")
        .count();
    assert_eq!(greeted, CLIENTS);
}
