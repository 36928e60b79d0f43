//! The control plane on etcd, end to end over the real processes: a real
//! three-member etcd cluster on loopback (`ferry_tests::etcd`), two
//! `ferry control --store etcd:…` replicas A and B, real `ferry worker
//! --control` processes, all over mTLS with certificates from `ferry
//! cert`, changes made with `ferry ctl`. What a user relies on: an Apply
//! through one replica is served by the workers of every replica within
//! a second; a worker of a dead replica moves to another one; Apply
//! survives the death of the etcd leader, and without an etcd majority it
//! fails clearly while every worker keeps serving.
//!
//! Feature `etcd`, and the `ferry` binary built with it (`cargo build -p
//! ferry --features etcd`); with `FERRY_REQUIRE_ETCD=1` a missing etcd
//! fails the tests instead of skipping them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_tests::binary::{http, WorkerProcess};
use ferry_tests::control_plane::{ControlProcess, Pki};
use ferry_tests::etcd::Cluster;
use ferry_tests::{banner, free_port, greets};

/// How long a worker may take to reconnect to another replica: the
/// backoff after a failed attempt or two (1 s, 1.6 s, +20 %) and the
/// attempt itself, with room for a slow machine.
const RECONNECT: Duration = Duration::from_secs(30);
/// "Within a second": from `ferry ctl apply` returning to the new banner.
const AT_ONCE: Duration = Duration::from_secs(1);

/// A cluster config: the connector "Relay" on `port` (on each worker's
/// own `--listen` address) greeting with `banner`.
fn config(port: u16, banner: &str) -> String {
    format!(
        r#"accepted_domains = [{{ domain = "example.test", kind = "authoritative" }}]

[[connectors]]
name = "Relay"
port = {port}
remote_ranges = ["127.0.0.0/8"]
permissions = ["anonymous"]
banner = "{banner}"

[[routes]]
domains = ["*"]
type = "directory"
path = "mail"
"#
    )
}

/// A port free on every one of `ips` right now (the workers share the
/// config, so each binds the same port on its own address).
fn port_free_on(ips: &[IpAddr]) -> u16 {
    // Bounded: another process taking the port on one address in between
    // is rare.
    for _ in 0..20 {
        let port = free_port(ips[0]);
        if ips
            .iter()
            .all(|ip| std::net::TcpListener::bind(SocketAddr::new(*ip, port)).is_ok())
        {
            return port;
        }
    }
    panic!("no port free on all of {ips:?}");
}

/// The test's world: the etcd cluster, the certificates, and files.
struct Setup {
    dir: tempfile::TempDir,
    pki: Pki,
    cluster: Cluster,
    store: String,
}

impl Setup {
    /// `None` when etcd is missing (and not required).
    async fn new(nodes: &[&str]) -> Option<Self> {
        let cluster = Cluster::start().await?;
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(&dir.path().join("pki"));
        pki.issue("control", "control").issue("admin", "alice");
        for node in nodes {
            pki.issue("node", node);
        }
        let store = format!("etcd:{}", cluster.endpoints().join(","));
        Some(Self {
            dir,
            pki,
            cluster,
            store,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Worker `id`'s log, for a failing assertion.
    fn log(&self, id: &str) -> String {
        let log = self.path(id).join("worker.log");
        std::fs::read_to_string(&log).unwrap_or_else(|e| format!("{}: {e}", log.display()))
    }

    /// `ferry control --store etcd:…` named `name` (its log `NAME.log`).
    fn replica(&self, name: &str) -> ControlProcess {
        let log = self.path(&format!("{name}.log"));
        let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ControlProcess::start(&self.store, &self.pki, &log)
        }));
        match started {
            Ok(replica) => replica,
            Err(_) => {
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                assert!(
                    !said.contains("built without the etcd store"),
                    "the ferry binary lacks the etcd store: run `cargo build -p ferry --features etcd` first\n{said}"
                );
                panic!("replica {name} did not start: {said}");
            }
        }
    }

    /// `ferry worker --control URLS` as node `id` on `listen`, once it
    /// serves (a version is current).
    fn worker(&self, id: &str, listen: IpAddr, urls: &[&ControlProcess]) -> WorkerProcess {
        let urls: Vec<&str> = urls.iter().map(|r| r.url.as_str()).collect();
        let data = self.path(id);
        let s = |p: &Path| p.display().to_string();
        let args = [
            "--control".to_string(),
            urls.join(","),
            "--node-id".into(),
            id.into(),
            "--ca".into(),
            s(&self.pki.ca()),
            "--cert".into(),
            s(&self.pki.cert(id)),
            "--key".into(),
            s(&self.pki.key(id)),
            "--listen".into(),
            listen.to_string(),
            "--data".into(),
            s(&data),
            "--hostname".into(),
            format!("{id}.test"),
        ];
        WorkerProcess::start_args("worker", &args, &data, "ready")
    }

    /// `ferry ctl apply` through `replica` of the config greeting with
    /// `banner`: the exit code, standard output and standard error, and
    /// how long it took.
    fn apply(
        &self,
        replica: &ControlProcess,
        port: u16,
        banner: &str,
    ) -> (i32, String, String, Duration) {
        let file = self.path(&format!("{}.toml", banner.replace(' ', "-")));
        std::fs::write(&file, config(port, banner)).unwrap();
        let start = Instant::now();
        let (code, out, err) = replica.ctl(
            &self.pki,
            "alice",
            &["apply", file.to_str().unwrap(), "-m", banner],
        );
        (code, out, err, start.elapsed())
    }

    /// As [`Setup::apply`], which must succeed.
    fn applied(&self, replica: &ControlProcess, port: u16, banner: &str) {
        let (code, out, err, _) = self.apply(replica, port, banner);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("applied version "), "{out}");
    }
}

/// One row of `ferry ctl nodes`: node, address, connected, applied.
#[derive(Debug, PartialEq)]
struct Row {
    node: String,
    address: String,
    connected: String,
    applied: u64,
}

/// `ferry ctl nodes` through `replica`, its rows sorted by node.
fn nodes(s: &Setup, replica: &ControlProcess) -> Vec<Row> {
    let (code, out, err) = replica.ctl(&s.pki, "alice", &["nodes"]);
    assert_eq!(code, 0, "{out}{err}");
    let mut rows: Vec<Row> = out
        .lines()
        .skip_while(|l| !l.starts_with("NODE "))
        .skip(1)
        .map(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            Row {
                node: cells[0].into(),
                address: cells[2].into(),
                connected: cells[3].into(),
                applied: cells[4].parse().unwrap(),
            }
        })
        .collect();
    rows.sort_by(|a, b| a.node.cmp(&b.node));
    rows
}

/// Polls `ferry ctl nodes` through `replica` (bounded by `wait`) until
/// its rows are `want`.
fn nodes_until(s: &Setup, replica: &ControlProcess, want: &[Row], wait: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let rows = nodes(s, replica);
        if rows == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < wait,
            "nodes through {}: {rows:#?}, not {want:#?}",
            replica.url
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn row(node: &str, address: IpAddr, applied: u64) -> Row {
    Row {
        node: node.into(),
        address: address.to_string(),
        connected: "yes".into(),
        applied,
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_apply_through_a_is_served_through_b_and_a_dead_replica_s_worker_moves_to_b() {
    let Some(s) = Setup::new(&["wa", "wb", "wc"]).await else {
        return;
    };
    let (ip_a, ip_b, ip_c) = (ip("127.0.0.61"), ip("127.0.0.62"), ip("127.0.0.63"));
    let port = port_free_on(&[ip_a, ip_b, ip_c]);
    let at = |ip| SocketAddr::new(ip, port);
    let a = s.replica("a");
    let b = s.replica("b");
    s.applied(&a, port, "One");
    // wa tries A first, then B; wb knows only B; wc only A.
    let wa = s.worker("wa", ip_a, &[&a, &b]);
    let wb = s.worker("wb", ip_b, &[&b]);
    let wc = s.worker("wc", ip_c, &[&a]);
    for (id, ip) in [("wa", ip_a), ("wb", ip_b), ("wc", ip_c)] {
        let greeting = banner(at(ip)).await;
        assert_eq!(greeting, "220 One", "{id}: {}", s.log(id));
    }

    // Through A, served by B's worker (and A's) within a second.
    let (code, out, err, _) = s.apply(&a, port, "Two");
    assert_eq!(code, 0, "{out}{err}");
    let took = greets(at(ip_b), "220 Two", AT_ONCE).await;
    eprintln!("B's worker served A's apply {took:?} after ferry ctl returned");
    greets(at(ip_a), "220 Two", AT_ONCE).await;
    greets(at(ip_c), "220 Two", AT_ONCE).await;
    // Every replica lists every node, whichever replica it is on.
    let all = [row("wa", ip_a, 2), row("wb", ip_b, 2), row("wc", ip_c, 2)];
    nodes_until(&s, &a, &all, Duration::from_secs(5));
    nodes_until(&s, &b, &all, Duration::from_secs(5));

    // A killed (SIGKILL): wa moves to B, wc (which knows only A) serves on.
    let a_url = a.url.clone();
    drop(a);
    let killed = Instant::now();
    let deadline = killed + RECONNECT;
    loop {
        let control = &wa.status()["config"]["control_plane"];
        if control["connected"] == true && control["url"] == b.url.as_str() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "wa not on B ({}) {RECONNECT:?} after A ({a_url}) died: {control:#}",
            b.url
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("wa reconnected to B {:?} after A died", killed.elapsed());
    s.applied(&b, port, "Three");
    greets(at(ip_a), "220 Three", AT_ONCE).await;
    greets(at(ip_b), "220 Three", AT_ONCE).await;
    // wc keeps serving what it had. Its entry, on A's etcd lease, goes
    // when the lease expires (10 s); B, which had seen it, lists it from
    // then on as disconnected (for twice the grace period), so the
    // balancers take it out of the pool once the grace period is over.
    assert_eq!(banner(at(ip_c)).await, "220 Two");
    let mut gone = row("wc", ip_c, 2);
    gone.connected = "no".into();
    let moved = [row("wa", ip_a, 3), row("wb", ip_b, 3), gone];
    let took = nodes_until(&s, &b, &moved, Duration::from_secs(15));
    eprintln!(
        "B lists wc as disconnected {:?} after A died ({took:?} after the apply)",
        killed.elapsed()
    );
    assert_eq!(banner(at(ip_c)).await, "220 Two");
    drop((wa, wb, wc));
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_survives_the_etcd_leader_and_fails_clearly_without_a_majority() {
    let Some(mut s) = Setup::new(&["wa", "wb"]).await else {
        return;
    };
    let (ip_a, ip_b) = (ip("127.0.0.71"), ip("127.0.0.72"));
    let port = port_free_on(&[ip_a, ip_b]);
    let at = |ip| SocketAddr::new(ip, port);
    let a = s.replica("a");
    let b = s.replica("b");
    s.applied(&a, port, "One");
    let wa = s.worker("wa", ip_a, &[&a]);
    let wb = s.worker("wb", ip_b, &[&b]);

    // The etcd leader killed: Apply works again within a few seconds.
    let leader = s.cluster.leader().await;
    s.cluster.kill(leader);
    let killed = Instant::now();
    let mut tries = 0;
    // Bounded: 20 tries, 15 s (each try is bounded by the store's 3 s).
    loop {
        tries += 1;
        let (code, out, err, _) = s.apply(&a, port, "Two");
        if code == 0 {
            break;
        }
        assert!(
            tries < 20 && killed.elapsed() < Duration::from_secs(15),
            "no apply {:?} after the etcd leader died ({tries} tries): {out}{err}",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = killed.elapsed();
    eprintln!("applied {took:?} after the etcd leader died ({tries} tries)");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // Each replica's watch carries on, whichever member it was on.
    greets(at(ip_a), "220 Two", Duration::from_secs(10)).await;
    greets(at(ip_b), "220 Two", Duration::from_secs(10)).await;

    // Two of three members down: Apply fails, saying why, in bounded time.
    let follower = (0..3).find(|i| *i != leader).unwrap();
    s.cluster.kill(follower);
    let (code, out, err, took) = s.apply(&b, port, "Three");
    eprintln!("without an etcd majority, ferry ctl apply failed after {took:?}: {err}");
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.starts_with("ferry ctl: failed (UNAVAILABLE):"), "{err}");
    assert!(
        err.contains("is a majority of the etcd members up?"),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    // Every worker serves on, ready, with what was current.
    for (w, ip) in [(&wa, ip_a), (&wb, ip_b)] {
        assert_eq!(banner(at(ip)).await, "220 Two");
        assert_eq!(http(&w.admin, "GET", "/readyz").0, 200);
        assert_eq!(w.status()["config"]["state"], "serving");
    }
    let (code, _, err) = a.ctl(&s.pki, "alice", &["history"]);
    assert_eq!(code, 2, "{err}");
}
