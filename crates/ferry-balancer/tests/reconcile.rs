//! `apply` on an in-process balancer in front of scripted workers on
//! loopback: what a reload keeps (a worker's health, drain flag and open
//! sessions), what it adds (a worker that must pass its probes first, a
//! port served at once by the workers up behind the others), what it
//! removes (a worker, a port: open sessions finish), a port that cannot
//! be bound, which changes nothing, and a reload during shutdown, refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_balancer::pool::Target;
use ferry_balancer::Balancer;
use ferry_config::{BalancerConfig, ClusterConfig};
use ferry_node::{ApplyError, LoadedConfig, Role, Snapshot, Source};
use ferry_tests::SmtpClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A worker that greets `220 NAME ready`, answers every line `250 NAME`
/// and QUIT `221`, after reading the PROXY header.
async fn worker(addr: SocketAddr, name: &'static str) -> SocketAddr {
    let l = TcpListener::bind(addr).await.unwrap();
    let bound = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                // The PROXY header arrives alone: the balancer waits for
                // the greeting before relaying a byte.
                if s.read(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
                let _ = s
                    .write_all(format!("220 {name} ready\r\n").as_bytes())
                    .await;
                let mut line = Vec::new();
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    line.extend_from_slice(&buf[..n]);
                    while let Some(end) = line.windows(2).position(|w| w == b"\r\n") {
                        let cmd: Vec<u8> = line.drain(..end + 2).collect();
                        let reply = if cmd.starts_with(b"QUIT") {
                            "221 bye\r\n".to_string()
                        } else {
                            format!("250 {name}\r\n")
                        };
                        if s.write_all(reply.as_bytes()).await.is_err() || reply.starts_with("221")
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    bound
}

/// The snapshot of a config whose `[balancer]` section is `section`.
fn snapshot(version: u64, section: &str) -> Arc<Snapshot<BalancerConfig>> {
    let text = format!("[balancer]\n{section}");
    let config = ClusterConfig::parse("b.toml", &text, std::path::Path::new(".")).unwrap();
    let material = Balancer::prepare(&config).unwrap();
    let loaded = LoadedConfig {
        config: Arc::new(config),
        sha256: ferry_node::sha256_hex(text.as_bytes()),
        source: Source::File("b.toml".into()),
    };
    Arc::new(loaded.into_snapshot(version, material))
}

fn backends(list: &[(&str, &str, u32)]) -> String {
    list.iter()
        .map(|(name, addr, weight)| {
            format!(
                "[[balancer.backends]]\nname = \"{name}\"\naddress = \"{addr}\"\nweight = {weight}\n"
            )
        })
        .collect()
}

fn listener(name: &str, port: u16, backend_port: u16) -> String {
    format!(
        "[[balancer.listeners]]\nname = \"{name}\"\nport = {port}\nbackend_port = {backend_port}\n"
    )
}

/// The target of `backend` behind the first listener, as new connections
/// see it now.
fn target(b: &Balancer, backend: &str) -> Option<Arc<Target>> {
    let state = b.state();
    let f = state.frontends().next()?;
    f.targets.iter().find(|t| t.name == backend).cloned()
}

async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const NO_WORKER: &str = "421 4.3.2 Service not available, closing transmission channel";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_staying_workers_and_adds_new_ones_down() {
    let port = worker("127.0.0.71:0".parse().unwrap(), "w1").await.port();
    worker(SocketAddr::new(ip("127.0.0.72"), port), "w2").await;
    // One probe at each (re)start of a probe task and then none for an
    // hour: a worker a reload adds stays down (rise = 2).
    let settings = "allow = [\"127.0.0.0/8\"]\nhandoff_timeout = \"500ms\"\n\
                    probe = { interval = \"1h\", timeout = \"500ms\", rise = 2 }\n";
    let w1 = backends(&[("w1", "127.0.0.71", 1)]);
    let first = snapshot(1, &format!("{settings}{}{w1}", listener("smtp", 0, port)));
    let b = Balancer::new(Arc::clone(&first), ip("127.0.0.1"));
    let front = b.apply(first).await.unwrap().added[0];
    tokio::spawn(Arc::clone(&b).run(Duration::from_secs(1)));
    // At process start a worker is up at once.
    let (mut open, greeting) = SmtpClient::connect(front, None).await;
    assert_eq!(greeting, "220 w1 ready");
    let w1_before = target(&b, "w1").unwrap();
    assert!(b.set_drain("w1", true));

    // w2 added, w1's weight changed: w1 keeps its target (drain flag and
    // open session with it); w2 waits for its probes.
    let both = backends(&[("w1", "127.0.0.71", 3), ("w2", "127.0.0.72", 1)]);
    let section =
        |settings: &str, list: &str| format!("{settings}{}{list}", listener("smtp", 0, port));
    b.apply(snapshot(2, &section(settings, &both)))
        .await
        .unwrap();
    let w1_now = target(&b, "w1").unwrap();
    assert!(Arc::ptr_eq(&w1_before, &w1_now));
    assert_eq!(
        (w1_now.weight(), w1_now.is_draining(), w1_now.active()),
        (3, true, 1)
    );
    let w2 = target(&b, "w2").unwrap();
    assert!(!w2.is_up(), "a worker a reload adds starts down");
    let (_c, reply) = SmtpClient::connect(front, None).await;
    assert_eq!(reply, NO_WORKER, "w1 drained, w2 not yet probed up");
    assert_eq!(open.cmd("NOOP").await, "250 w1");
    assert!(b.set_drain("w1", false));
    let (c, greeting) = SmtpClient::connect(front, None).await;
    assert_eq!(greeting, "220 w1 ready");
    drop(c);

    // w1 removed: its open session goes on, new ones cannot reach it.
    let w2_only = backends(&[("w2", "127.0.0.72", 1)]);
    b.apply(snapshot(3, &section(settings, &w2_only)))
        .await
        .unwrap();
    assert!(target(&b, "w1").is_none());
    assert!(w1_before.is_retired());
    assert!(
        !b.set_drain("w1", true),
        "no drain flag for a removed worker"
    );
    let (_c, reply) = SmtpClient::connect(front, None).await;
    assert_eq!(reply, NO_WORKER);
    assert_eq!(open.cmd("NOOP").await, "250 w1");

    // New probe settings restart w2's probe on the same target: it comes
    // up after two good probes and takes the next session.
    let fast = settings.replace("\"1h\"", "\"50ms\"");
    b.apply(snapshot(4, &section(&fast, &w2_only)))
        .await
        .unwrap();
    let w2_now = target(&b, "w2").unwrap();
    assert!(Arc::ptr_eq(&w2, &w2_now));
    wait_until("w2 up", || w2_now.is_up()).await;
    let (_c, greeting) = SmtpClient::connect(front, None).await;
    assert_eq!(greeting, "220 w2 ready");
    assert_eq!(open.cmd("QUIT").await, "221 bye");
    drop(open);
    wait_until("w1's session released", || w1_before.active() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_that_cannot_be_bound_changes_nothing_and_ports_come_and_go() {
    let port = worker("127.0.0.73:0".parse().unwrap(), "w1").await.port();
    let settings = "allow = [\"127.0.0.0/8\"]\nhandoff_timeout = \"500ms\"\n\
                    probe = { interval = \"50ms\", timeout = \"500ms\", rise = 2 }\n";
    let w1 = backends(&[("w1", "127.0.0.73", 1)]);
    let first = snapshot(1, &format!("{settings}{}{w1}", listener("smtp", 0, port)));
    let b = Balancer::new(Arc::clone(&first), ip("127.0.0.1"));
    let front = b.apply(first).await.unwrap().added[0];
    let (mut open, greeting) = SmtpClient::connect(front, None).await;
    assert_eq!(greeting, "220 w1 ready");
    let kept = target(&b, "w1").unwrap();

    // (Port 0 stays the port it bound while the config says 0.)
    // A port another process holds: the whole apply fails, the old state
    // (its access list too) keeps serving.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let t = taken.local_addr().unwrap().port();
    let broken = format!(
        "{}{}{}{w1}",
        settings.replace("allow = [\"127.0.0.0/8\"]", "allow = [\"10.0.0.0/8\"]"),
        listener("smtp", 0, port),
        listener("submission", t, port)
    );
    let err = b.apply(snapshot(2, &broken)).await.unwrap_err();
    assert!(
        matches!(err, ApplyError::Listen(ref e) if e.addr.port() == t),
        "{err}"
    );
    assert_eq!(b.current().version, 1);
    assert_eq!(b.addresses().await, [front]);
    assert!(Arc::ptr_eq(&kept, &target(&b, "w1").unwrap()));
    let (_c, greeting) = SmtpClient::connect(front, None).await;
    assert_eq!(greeting, "220 w1 ready");

    // A free port instead: served at once, w1 being up behind the other.
    drop(taken);
    let sub_port = ferry_tests::free_port(ip("127.0.0.1"));
    let two = format!(
        "{settings}{}{}{w1}",
        listener("smtp", 0, port),
        listener("submission", sub_port, port)
    );
    let done = b.apply(snapshot(2, &two)).await.unwrap();
    let sub = SocketAddr::new(ip("127.0.0.1"), sub_port);
    assert_eq!(done.added, [sub]);
    let state = b.state();
    assert!(state.frontends[&sub_port].targets[0].is_up());
    let (mut on_sub, greeting) = SmtpClient::connect(sub, None).await;
    assert_eq!(greeting, "220 w1 ready");

    // The first port removed: it stops accepting; its open session ends
    // normally, and so does the one on the port that stays.
    let done = b
        .apply(snapshot(
            3,
            &format!("{settings}{}{w1}", listener("submission", sub_port, port)),
        ))
        .await
        .unwrap();
    assert_eq!(done.removed, [front]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(front).await.is_ok() {
        assert!(Instant::now() < deadline, "{front} still accepting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open.cmd("NOOP").await, "250 w1");
    assert_eq!(open.cmd("QUIT").await, "221 bye");
    assert_eq!(on_sub.cmd("NOOP").await, "250 w1");
    assert!(kept.is_retired(), "its listener is gone");
}

/// The target of `backend` behind the listener on configured port `port`.
fn target_on(b: &Balancer, port: u16, backend: &str) -> Arc<Target> {
    let state = b.state();
    let f = &state.frontends[&port];
    Arc::clone(f.targets.iter().find(|t| t.name == backend).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_or_renamed_listener_serves_at_once_through_workers_already_up() {
    let port = worker("127.0.0.75:0".parse().unwrap(), "w1").await.port();
    worker(SocketAddr::new(ip("127.0.0.76"), port), "w2").await;
    worker(SocketAddr::new(ip("127.0.0.78"), port), "w4").await;
    // One probe when a probe task starts, then none for an hour: a target
    // that must wait for rise = 2 stays down for the whole test. w3 has
    // nothing listening: its first probe takes it down (fall = 1).
    let settings = "allow = [\"127.0.0.0/8\"]\nhandoff_timeout = \"500ms\"\n\
                    probe = { interval = \"1h\", timeout = \"500ms\", rise = 2, fall = 1 }\n";
    let known = [
        ("w1", "127.0.0.75", 1),
        ("w2", "127.0.0.76", 1),
        ("w3", "127.0.0.77", 1),
    ];
    let first = snapshot(
        1,
        &format!(
            "{settings}{}{}",
            listener("smtp", 0, port),
            backends(&known)
        ),
    );
    let b = Balancer::new(Arc::clone(&first), ip("127.0.0.1"));
    let front = b.apply(first).await.unwrap().added[0];
    tokio::spawn(Arc::clone(&b).run(Duration::from_secs(1)));
    let w3 = target(&b, "w3").unwrap();
    wait_until("w3 down", || !w3.is_up()).await;
    assert!(b.is_ready());

    // A second listener, and w4, a backend new to the config.
    let sub_port = ferry_tests::free_port(ip("127.0.0.1"));
    let mut with_w4 = known.to_vec();
    with_w4.push(("w4", "127.0.0.78", 1));
    let two = format!(
        "{settings}{}{}{}",
        listener("smtp", 0, port),
        listener("submission", sub_port, port),
        backends(&with_w4)
    );
    b.apply(snapshot(2, &two)).await.unwrap();
    // Ready all along: the new listener has workers up at once.
    assert!(b.is_ready(), "a new listener made the balancer unready");
    for name in ["w1", "w2"] {
        assert!(
            target_on(&b, sub_port, name).is_up(),
            "{name} is up behind smtp: up behind the new listener too"
        );
    }
    assert!(
        !target_on(&b, sub_port, "w3").is_up(),
        "w3 is down: down behind the new listener too"
    );
    for port in [0, sub_port] {
        assert!(
            !target_on(&b, port, "w4").is_up(),
            "w4 is new to the config: it waits for its probes"
        );
    }
    let sub = SocketAddr::new(ip("127.0.0.1"), sub_port);
    let (mut c, greeting) = SmtpClient::connect(sub, None).await;
    assert!(
        greeting == "220 w1 ready" || greeting == "220 w2 ready",
        "the new listener's first client: {greeting}"
    );
    assert_eq!(c.cmd("QUIT").await, "221 bye");

    // The first listener renamed: new targets, up as their workers are.
    let renamed = two.replacen("name = \"smtp\"", "name = \"relay\"", 1);
    b.apply(snapshot(3, &renamed)).await.unwrap();
    assert!(b.is_ready(), "a renamed listener made the balancer unready");
    let relay_w1 = target_on(&b, 0, "w1");
    assert_eq!(relay_w1.listener, "relay");
    assert!(relay_w1.is_up());
    let (mut c, greeting) = SmtpClient::connect(front, None).await;
    assert!(
        greeting == "220 w1 ready" || greeting == "220 w2 ready",
        "the renamed listener's first client: {greeting}"
    );
    assert_eq!(c.cmd("QUIT").await, "221 bye");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_after_shutdown_began_is_refused_and_changes_nothing() {
    let port = worker("127.0.0.79:0".parse().unwrap(), "w1").await.port();
    let settings = "allow = [\"127.0.0.0/8\"]\nhandoff_timeout = \"500ms\"\n\
                    probe = { interval = \"1h\", timeout = \"500ms\" }\n";
    let w1 = backends(&[("w1", "127.0.0.79", 1)]);
    let first = snapshot(1, &format!("{settings}{}{w1}", listener("smtp", 0, port)));
    let b = Balancer::new(Arc::clone(&first), ip("127.0.0.1"));
    let front = b.apply(first).await.unwrap().added[0];
    let stopped = tokio::spawn(Arc::clone(&b).run(Duration::from_secs(1)));
    assert!(b.is_ready());

    b.shutdown_token().cancel();
    wait_until("not ready once shutdown began", || !b.is_ready()).await;
    let sub_port = ferry_tests::free_port(ip("127.0.0.1"));
    let two = format!(
        "{settings}{}{}{w1}",
        listener("smtp", 0, port),
        listener("submission", sub_port, port)
    );
    let err = b.apply(snapshot(2, &two)).await.unwrap_err();
    assert!(
        matches!(err, ApplyError::Refused(ref why) if why == "the balancer is shutting down"),
        "{err}"
    );
    assert!(!b.is_ready(), "a reload while draining made it ready");
    assert_eq!(b.current().version, 1);
    assert_eq!(b.addresses().await, [front]);
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", sub_port)).is_ok(),
        "a reload while draining bound a port"
    );
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_list_and_caps_change_for_the_next_connection() {
    let port = worker("127.0.0.74:0".parse().unwrap(), "w1").await.port();
    let section = |access: &str| {
        format!(
            "{access}\nhandoff_timeout = \"500ms\"\nprobe = {{ interval = \"1h\" }}\n{}{}",
            listener("smtp", 0, port),
            backends(&[("w1", "127.0.0.74", 1)])
        )
    };
    let first = snapshot(1, &section("allow = [\"127.0.0.0/8\"]"));
    let b = Balancer::new(Arc::clone(&first), ip("127.0.0.1"));
    let front = b.apply(first).await.unwrap().added[0];
    let (mut open, greeting) = SmtpClient::connect(front, Some(ip("127.0.0.81"))).await;
    assert_eq!(greeting, "220 w1 ready");

    let denied = "allow = [\"127.0.0.0/8\"]\ndeny = [\"127.0.0.80/29\"]\n\
                  max_connections_per_source = 1";
    b.apply(snapshot(2, &section(denied))).await.unwrap();
    // The session that started under the old list goes on.
    assert_eq!(open.cmd("NOOP").await, "250 w1");
    let (mut c, refused) = SmtpClient::connect(front, Some(ip("127.0.0.81"))).await;
    assert_eq!(refused, "554 5.7.1 Access denied");
    assert!(c.is_closed().await);
    // The new per-source cap: one at a time from 127.0.0.90.
    let (_one, greeting) = SmtpClient::connect(front, Some(ip("127.0.0.90"))).await;
    assert_eq!(greeting, "220 w1 ready");
    let (_two, refused) = SmtpClient::connect(front, Some(ip("127.0.0.90"))).await;
    assert_eq!(
        refused,
        "421 4.3.2 Too many connections from your address, try again later"
    );
    assert_eq!(open.cmd("QUIT").await, "221 bye");
}

#[test]
fn a_config_without_a_balancer_section_is_refused() {
    let config = ClusterConfig::parse("w.toml", "", std::path::Path::new(".")).unwrap();
    let errors = Balancer::prepare(&config).unwrap_err();
    assert_eq!(
        errors,
        ["the config has no [balancer] section: a balancer has nothing to balance"]
    );
}
