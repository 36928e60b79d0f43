//! A whole cluster under the real control plane: `ferry control` (file
//! store), two `ferry worker --control` on 127.0.0.11 and 127.0.0.12 and
//! a `ferry balancer --control` in front of them, each with its own
//! certificate from `ferry cert`; every change goes through `ferry ctl`.
//! What a user relies on: a change reaches every worker within a second;
//! a bad change changes nothing; a worker that cannot apply a change says
//! so, keeps serving and leaves the rotation; the cluster serves through
//! a control-plane outage and converges without a storm when it is back;
//! history, compare-and-swap and rollback work across restarts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_tests::binary::WorkerProcess;
use ferry_tests::control_plane::{ControlProcess, Pki};
use ferry_tests::{banner, free_port, greets, make_certificate, SmtpClient};

/// The workers' addresses, in the order of their node IDs w1, w2.
const WORKERS: [&str; 2] = ["127.0.0.11", "127.0.0.12"];
const BALANCER: &str = "127.0.0.1";
/// Where the balancer's sessions and probes come from: the one address
/// the workers trust for PROXY headers (a client on 127.0.0.1 is not).
const BALANCER_SOURCE: &str = "127.0.0.9";
/// How long a test waits for what should happen at once.
const WAIT: Duration = Duration::from_secs(15);
/// How long a node may take to come back to a restarted control plane
/// (gRPC's connection backoff after a few failed attempts).
const RECONNECT: Duration = Duration::from_secs(30);
/// How long a worker may refuse the newest config before it leaves the
/// rotation.
const NACK_GRACE: Duration = Duration::from_secs(2);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A port free on both worker addresses (one config names it for both).
fn worker_port() -> u16 {
    for _ in 0..100 {
        let p = free_port(ip(WORKERS[0]));
        if std::net::TcpListener::bind((WORKERS[1], p)).is_ok() {
            return p;
        }
    }
    panic!("no port free on both worker addresses");
}

/// The ports one cluster's configs name.
#[derive(Clone, Copy)]
struct Ports {
    /// The connector "Relay" on each worker.
    relay: u16,
    /// The balancer's listener.
    front: u16,
}

/// The cluster config: the connector "Relay" greeting with `banner`,
/// `extra` connectors after it, and the balancer in front of both workers.
fn config(p: Ports, banner: &str, extra: &str) -> String {
    let (relay, front) = (p.relay, p.front);
    let [w1, w2] = WORKERS;
    format!(
        r#"accepted_domains = [{{ domain = "example.test", kind = "authoritative" }}]
trusted_proxies = ["{BALANCER_SOURCE}/32"]

[[connectors]]
name = "Relay"
port = {relay}
remote_ranges = ["127.0.0.0/8"]
permissions = ["anonymous"]
banner = "{banner}"
{extra}
[[routes]]
domains = ["*"]
type = "directory"
path = "mail"

[balancer]
allow = ["127.0.0.0/8"]
source = "{BALANCER_SOURCE}"
handoff_timeout = "2s"
probe = {{ interval = "200ms", timeout = "1s", rise = 1, fall = 2 }}

[[balancer.listeners]]
name = "smtp"
port = {front}
backend_port = {relay}

[[balancer.backends]]
name = "w1"
address = "{w1}"

[[balancer.backends]]
name = "w2"
address = "{w2}"
"#
    )
}

/// A connector on `port` greeting with `banner`.
fn connector(name: &str, port: u16, banner: &str) -> String {
    format!(
        r#"
[[connectors]]
name = "{name}"
port = {port}
remote_ranges = ["127.0.0.0/8"]
permissions = ["anonymous"]
banner = "{banner}"
"#
    )
}

/// A TLS connector whose certificate is the node's own `certs/test.crt`.
fn tls_connector(port: u16) -> String {
    format!(
        r#"
[[connectors]]
name = "Devices"
port = {port}
remote_ranges = ["127.0.0.0/8"]
permissions = ["anonymous"]
auth = ["tls"]
tls = {{ certificate = "certs/test.crt", key = "certs/test.key" }}
banner = "Devices ready"
"#
    )
}

/// Polls `check` every 50 ms until it holds; panics with `what` and the
/// last value after `wait`.
fn until<T: std::fmt::Debug>(what: &str, wait: Duration, mut check: impl FnMut() -> (bool, T)) {
    let deadline = Instant::now() + wait;
    loop {
        let (done, seen) = check();
        if done {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {seen:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    pki: Pki,
    store: String,
    control: ControlProcess,
    /// w1 on 127.0.0.11, w2 on 127.0.0.12.
    workers: Vec<WorkerProcess>,
    /// The balancer, once started.
    front_node: Option<WorkerProcess>,
    ports: Ports,
}

impl Cluster {
    /// The control plane with `first` applied as version 1, then the
    /// workers and the balancer subscribed to it, all serving it.
    async fn start(first: impl Fn(Ports) -> String) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(&dir.path().join("pki"));
        pki.issue("control", "control").issue("admin", "alice");
        let store = format!("file:{}", dir.path().join("store").display());
        let control = ControlProcess::start(&store, &pki, &dir.path().join("control.log"));
        let ports = Ports {
            relay: worker_port(),
            front: free_port(ip(BALANCER)),
        };
        let mut cluster = Cluster {
            pki,
            store,
            control,
            workers: Vec::new(),
            front_node: None,
            ports,
            dir,
        };
        let v1 = cluster.apply(&first(ports), "first");
        assert_eq!(v1, 1);
        cluster.workers = (0..WORKERS.len()).map(|i| cluster.worker(i)).collect();
        cluster.front_node = Some(cluster.start_balancer());
        cluster.converged(1, WAIT);
        cluster
    }

    fn data(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("w{}", i + 1))
    }

    /// Starts worker `i` (again): `ferry worker --control` on its
    /// address, node ID and host name `wN`, its own data directory.
    fn worker(&self, i: usize) -> WorkerProcess {
        let id = format!("w{}", i + 1);
        let data = self.data(i);
        let mut args = vec![
            "--control".to_string(),
            self.control.url.clone(),
            "--listen".into(),
            WORKERS[i].into(),
            "--data".into(),
            data.display().to_string(),
            "--hostname".into(),
            format!("{id}.test"),
            "--nack-grace".into(),
            format!("{}s", NACK_GRACE.as_secs()),
        ];
        args.extend(self.pki.node_flags(&id));
        WorkerProcess::start_args("worker", &args, &data, "ready")
    }

    fn start_balancer(&self) -> WorkerProcess {
        let data = self.dir.path().join("balancer");
        let mut args = vec![
            "--control".to_string(),
            self.control.url.clone(),
            "--listen".into(),
            BALANCER.into(),
            "--data".into(),
            data.display().to_string(),
        ];
        args.extend(self.pki.node_flags("b1"));
        WorkerProcess::start_args("balancer", &args, &data, "ready")
    }

    /// `ferry ctl ARGS` as admin alice.
    fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        self.control.ctl(&self.pki, "alice", args)
    }

    /// Writes `text` to a file and `ferry ctl apply`s it; the version
    /// applied.
    fn apply(&self, text: &str, message: &str) -> u64 {
        let file = self.dir.path().join("change.toml");
        std::fs::write(&file, text).unwrap();
        let (code, out, err) = self.ctl(&["apply", file.to_str().unwrap(), "-m", message]);
        assert_eq!(code, 0, "{out}{err}");
        let version = out
            .lines()
            .find_map(|l| l.strip_prefix("applied version "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse().ok());
        version.unwrap_or_else(|| panic!("no version in {out:?}"))
    }

    /// `ferry ctl nodes`, by node ID.
    fn nodes(&self) -> (u64, BTreeMap<String, BTreeMap<String, String>>) {
        let (current, rows) = self.control.nodes(&self.pki, "alice");
        let by_id = rows.into_iter().map(|r| (r["NODE"].clone(), r)).collect();
        (current, by_id)
    }

    /// Waits (bounded) until `ferry ctl nodes` shows all three nodes
    /// connected at `version` with lag 0 and no NACK.
    fn converged(&self, version: u64, wait: Duration) {
        until("every node at the current version", wait, || {
            let (current, nodes) = self.nodes();
            let done = current == version
                && ["w1", "w2", "b1"].iter().all(|id| {
                    nodes.get(*id).is_some_and(|n| {
                        n["CONNECTED"] == "yes"
                            && n["APPLIED"] == version.to_string()
                            && n["LAG"] == "0"
                            && n["LAST NACK"] == "-"
                    })
                });
            (done, (current, nodes))
        });
    }

    /// Worker `i`'s address for `port`.
    fn at(&self, i: usize, port: u16) -> SocketAddr {
        SocketAddr::new(ip(WORKERS[i]), port)
    }

    fn front(&self) -> SocketAddr {
        SocketAddr::new(ip(BALANCER), self.ports.front)
    }

    /// The config version worker `i`'s `/status` says it serves.
    fn serving(&self, i: usize) -> u64 {
        self.workers[i].status()["config"]["version"]
            .as_u64()
            .unwrap()
    }

    fn balancer(&self) -> &WorkerProcess {
        self.front_node.as_ref().unwrap()
    }

    /// The balancer's view of backend `name`.
    fn backend(&self, name: &str) -> serde_json::Value {
        let (_, body) = self.balancer().admin_call("GET", "/backends");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let list = v["backends"].as_array().unwrap();
        list.iter().find(|b| b["backend"] == name).unwrap().clone()
    }

    /// Which worker serves a session through the balancer (its EHLO
    /// name), and the greeting the client got.
    async fn through_balancer(&self) -> (String, String) {
        let (mut c, greeting) = SmtpClient::connect(self.front(), None).await;
        let ehlo = c.cmd("EHLO client.test").await;
        let name = ehlo.get(4..).unwrap_or("").split_whitespace().next();
        let name = name.unwrap_or("").to_string();
        c.cmd("QUIT").await;
        (name, greeting)
    }

    /// A new control plane on the old one's address and store (the old
    /// one stopped or killed first), logging to `log`.
    fn restart_control(&mut self, log: &str) {
        let listen = self.control.listen().to_string();
        let log = self.dir.path().join(log);
        self.control = ControlProcess::start_on(&listen, &self.store, &self.pki, &log, &[]);
    }
}

/// A change that adds a connector on a new port is served at every
/// worker's own address within a second of `ferry ctl apply` returning,
/// and `ferry ctl nodes` shows every node on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connector_is_served_by_every_worker_within_a_second() {
    let cl = Cluster::start(|p| config(p, "Relay ready", "")).await;
    let scanners = worker_port();
    for i in 0..WORKERS.len() {
        assert_eq!(banner(cl.at(i, cl.ports.relay)).await, "220 Relay ready");
        assert_eq!(banner(cl.at(i, scanners)).await, "", "nothing there yet");
    }

    let extra = connector("Scanners", scanners, "Scanners ready");
    let v2 = cl.apply(&config(cl.ports, "Relay ready", &extra), "scanners");
    let applied = Instant::now();
    for i in 0..WORKERS.len() {
        greets(cl.at(i, scanners), "220 Scanners ready", WAIT).await;
    }
    let took = applied.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "served by both after {took:?}"
    );
    assert_eq!(v2, 2);
    cl.converged(v2, WAIT);
    for (i, w) in cl.workers.iter().enumerate() {
        let config = &w.status()["config"];
        assert_eq!(config["version"], v2, "w{}", i + 1);
        assert_eq!(
            config["last_apply"]["changes"][0],
            "+ connector \"Scanners\""
        );
        assert_eq!(banner(cl.at(i, cl.ports.relay)).await, "220 Relay ready");
    }
    assert_eq!(cl.through_balancer().await.1, "220 Relay ready");
}

/// An invalid change is refused by `ferry ctl apply` with every error
/// and its place, exit 1, and nothing changes on any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_change_is_refused_with_every_error_and_changes_nothing() {
    let cl = Cluster::start(|p| config(p, "Relay ready", "")).await;
    let (_, history, _) = cl.ctl(&["history"]);

    // Two mistakes: a port out of range and a misspelt key.
    let good = config(cl.ports, "Relay ready", "");
    let bad = good
        .replacen(&format!("port = {}\n", cl.ports.relay), "port = 99999\n", 1)
        .replacen(
            "banner = \"Relay ready\"",
            "banner = \"Changed\"\nbannr = \"typo\"",
            1,
        );
    let line_of = |start: &str| bad.lines().position(|l| l.starts_with(start)).unwrap() + 1;
    let file = cl.dir.path().join("bad.toml");
    std::fs::write(&file, &bad).unwrap();
    let (code, out, err) = cl.ctl(&["apply", file.to_str().unwrap(), "-m", "bad"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("INVALID_ARGUMENT"), "{err}");
    let port = format!("{}:{}:8: ", file.display(), line_of("port = 99999"));
    let key = format!("{}:{}:1: ", file.display(), line_of("bannr"));
    assert!(err.contains(&port), "{err}");
    assert!(err.contains(&key) && err.contains("bannr"), "{err}");

    // Nothing changed: the history, what each node serves, its banner.
    assert_eq!(cl.ctl(&["history"]).1, history);
    for i in 0..WORKERS.len() {
        assert_eq!(cl.serving(i), 1);
        assert_eq!(banner(cl.at(i, cl.ports.relay)).await, "220 Relay ready");
    }
    assert_eq!(cl.balancer().status()["config"]["version"], 1);
    assert_eq!(cl.through_balancer().await.1, "220 Relay ready");

    // Nor was anything sent: the next good change is version 2, and it is
    // the only one any node got after version 1.
    let v2 = cl.apply(&config(cl.ports, "Second ready", ""), "second");
    assert_eq!(v2, 2);
    for i in 0..WORKERS.len() {
        greets(cl.at(i, cl.ports.relay), "220 Second ready", WAIT).await;
    }
    cl.converged(v2, WAIT);
    for w in cl.workers.iter().chain([cl.balancer()]) {
        let reports = |r: &str| w.metric(&format!("ferry_control_reports_total{{result=\"{r}\"}}"));
        assert_eq!((reports("ack"), reports("nack")), (Some(2.0), Some(0.0)));
    }
    let sent = |sync: &str| {
        cl.control.metric(&format!(
            "ferry_control_snapshots_sent_total{{sync=\"{sync}\"}}"
        ))
    };
    assert_eq!((sent("first"), sent("update")), (Some(3.0), Some(3.0)));
}

/// A change one worker cannot apply (the certificate it names is on w1
/// only): w2 NACKs, `ferry ctl nodes` says so for w2 alone, w2 keeps
/// serving the old version, leaves the balancer's rotation after the
/// grace period, and is not sent the version again; the file put in
/// place, the next version brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_apply_a_change_nacks_keeps_serving_and_leaves_the_rotation() {
    let mut cl = Cluster::start(|p| config(p, "One ready", "")).await;
    let certs: Vec<PathBuf> = (0..WORKERS.len())
        .map(|i| cl.data(i).join("certs"))
        .collect();
    std::fs::create_dir_all(&certs[0]).unwrap();
    make_certificate(&certs[0]);
    for name in ["w1", "w2"] {
        until("both workers in rotation", WAIT, || {
            let b = cl.backend(name);
            (b["eligible"] == true, b)
        });
    }

    let devices = worker_port();
    // Taken before the apply: the grace runs from when the control plane
    // stores the version, which is before `ferry ctl` returns.
    let applied = Instant::now();
    let v2 = cl.apply(
        &config(cl.ports, "Two ready", &tls_connector(devices)),
        "devices",
    );
    greets(cl.at(0, cl.ports.relay), "220 Two ready", WAIT).await;
    greets(cl.at(0, devices), "220 Devices ready", WAIT).await;

    // The NACK, with its error, for w2 only.
    let missing = certs[1].join("test.crt");
    let nack = format!(
        "version {v2}: connector 'Devices': cannot read {}",
        missing.display()
    );
    until("w2's NACK in ferry ctl nodes", WAIT, || {
        let (current, nodes) = cl.nodes();
        let w2 = &nodes["w2"];
        let done = current == v2
            && w2["LAST NACK"].starts_with(&nack)
            && (w2["APPLIED"].as_str(), w2["LAG"].as_str()) == ("1", "1")
            && ["w1", "b1"].iter().all(|id| {
                let n = &nodes[*id];
                n["LAST NACK"] == "-" && n["APPLIED"] == v2.to_string() && n["LAG"] == "0"
            });
        (done, nodes)
    });
    // w2 serves the version before.
    assert_eq!(banner(cl.at(1, cl.ports.relay)).await, "220 One ready");
    assert_eq!(banner(cl.at(1, devices)).await, "");
    assert_eq!(cl.serving(1), 1);

    // Past the grace period the balancer takes w2 out of rotation (its
    // probes get 421: it counts as draining), and every client lands on w1.
    until("w2 out of rotation", WAIT, || {
        let b = cl.backend("w2");
        (b["eligible"] == false, b)
    });
    assert!(applied.elapsed() >= NACK_GRACE, "{:?}", applied.elapsed());
    assert_eq!(cl.backend("w2")["draining"], true);
    assert_eq!(cl.backend("w1")["eligible"], true);
    for _ in 0..6 {
        let (name, greeting) = cl.through_balancer().await;
        assert_eq!(
            (name.as_str(), greeting.as_str()),
            ("w1.test", "220 Two ready")
        );
    }
    // Over those seconds version 2 went out once to each node, and w2
    // refused it once: no resend loop.
    let sent = |sync: &str| {
        cl.control.metric(&format!(
            "ferry_control_snapshots_sent_total{{sync=\"{sync}\"}}"
        ))
    };
    let nacks = "ferry_control_reports_total{result=\"nack\"}";
    assert_eq!(sent("update"), Some(3.0));
    assert_eq!(cl.control.metric(nacks), Some(1.0));
    assert_eq!(cl.workers[1].metric(nacks), Some(1.0));
    assert_eq!(cl.workers[0].metric(nacks), Some(0.0));

    // w2 restarted: it serves version 1 from its last-good copy, is not
    // sent version 2 again on its new stream, and, having refused the
    // newest version for longer than the grace period, stays out of
    // rotation.
    cl.workers[1].kill();
    until("w2's stream gone", WAIT, || {
        let (_, nodes) = cl.nodes();
        (nodes["w2"]["CONNECTED"] == "no", nodes)
    });
    until("w2 down for the balancer", WAIT, || {
        let b = cl.backend("w2");
        (b["up"] == false, b)
    });
    cl.workers[1] = cl.worker(1);
    assert_eq!(banner(cl.at(1, cl.ports.relay)).await, "220 One ready");
    until("w2 subscribed again", WAIT, || {
        let (_, nodes) = cl.nodes();
        (nodes["w2"]["CONNECTED"] == "yes", nodes)
    });
    until("w2 probed again, and refusing the probes", WAIT, || {
        let b = cl.backend("w2");
        (b["up"] == true && b["draining"] == true, b)
    });
    assert_eq!(cl.backend("w2")["eligible"], false);
    for _ in 0..4 {
        assert_eq!(cl.through_balancer().await.0, "w1.test");
    }

    // The file in place on w2, the next version applies everywhere and
    // w2 is back in rotation.
    std::fs::create_dir_all(&certs[1]).unwrap();
    make_certificate(&certs[1]);
    let v3 = cl.apply(
        &config(cl.ports, "Three ready", &tls_connector(devices)),
        "again",
    );
    for i in 0..WORKERS.len() {
        greets(cl.at(i, cl.ports.relay), "220 Three ready", WAIT).await;
        greets(cl.at(i, devices), "220 Devices ready", WAIT).await;
    }
    cl.converged(v3, WAIT);
    until("w2 back in rotation", WAIT, || {
        let b = cl.backend("w2");
        (b["eligible"] == true, b)
    });
    let mut landed = Vec::new();
    while !landed.iter().any(|n| n == "w2.test") && landed.len() < 10 {
        landed.push(cl.through_balancer().await.0);
    }
    assert!(landed.iter().any(|n| n == "w2.test"), "{landed:?}");
    // The restarted w2 got version 3 and nothing before it: version 2 was
    // not sent to it again.
    let acks = "ferry_control_reports_total{result=\"ack\"}";
    assert_eq!(cl.workers[1].metric(nacks), Some(0.0));
    assert_eq!(cl.workers[1].metric(acks), Some(1.0));
    assert_eq!(cl.control.metric(nacks), Some(1.0));
}

/// The control plane killed: the workers and the balancer keep serving,
/// a worker restarted meanwhile serves its last-good copy; the control
/// plane back on its address and store, every node converges, and only
/// the node that was behind gets a snapshot; the next change reaches all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_serves_through_a_control_plane_outage_and_converges_without_a_storm() {
    let mut cl = Cluster::start(|p| config(p, "One ready", "")).await;
    // w2 is down while version 2 is applied: it will be behind.
    cl.workers[1].kill();
    let v2 = cl.apply(&config(cl.ports, "Two ready", ""), "second");
    greets(cl.at(0, cl.ports.relay), "220 Two ready", WAIT).await;
    until("w1 and b1 on version 2", WAIT, || {
        let (_, nodes) = cl.nodes();
        let done = ["w1", "b1"]
            .iter()
            .all(|id| nodes.get(*id).is_some_and(|n| n["APPLIED"] == "2"));
        (done, nodes)
    });

    cl.control.kill();
    until("w1 sees the control plane gone", WAIT, || {
        let c = cl.workers[0].status()["config"]["control_plane"].clone();
        (c["connected"] == false, c)
    });
    assert_eq!(banner(cl.at(0, cl.ports.relay)).await, "220 Two ready");
    assert_eq!(
        cl.through_balancer().await,
        ("w1.test".into(), "220 Two ready".into())
    );

    // w2 restarted while no control plane answers: its last-good copy,
    // version 1, at once.
    cl.workers[1] = cl.worker(1);
    assert_eq!(banner(cl.at(1, cl.ports.relay)).await, "220 One ready");
    assert_eq!(cl.serving(1), 1);
    let log = std::fs::read_to_string(cl.data(1).join("worker.log")).unwrap();
    assert!(
        log.contains("serving the last-good copy of the config"),
        "{log}"
    );

    cl.restart_control("control-2.log");
    cl.converged(v2, RECONNECT);
    greets(cl.at(1, cl.ports.relay), "220 Two ready", WAIT).await;
    // One first-time sync, for w2; w1 and the balancer had version 2 and
    // got nothing.
    let sent = |cl: &Cluster, sync: &str| {
        cl.control.metric(&format!(
            "ferry_control_snapshots_sent_total{{sync=\"{sync}\"}}"
        ))
    };
    assert_eq!(
        (sent(&cl, "first"), sent(&cl, "update")),
        (Some(1.0), Some(0.0))
    );

    let v3 = cl.apply(&config(cl.ports, "Three ready", ""), "third");
    for i in 0..WORKERS.len() {
        greets(cl.at(i, cl.ports.relay), "220 Three ready", WAIT).await;
    }
    cl.converged(v3, WAIT);
    assert_eq!(
        (sent(&cl, "first"), sent(&cl, "update")),
        (Some(1.0), Some(3.0))
    );
}

/// A change made against a version that is no longer current is refused;
/// a rollback is a new version every worker serves; the history is whole
/// after the control plane restarts, and nodes that are current get no
/// snapshot from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_change_is_refused_rollback_is_served_and_history_survives_a_restart() {
    let mut cl = Cluster::start(|p| config(p, "One ready", "")).await;
    let v2 = cl.apply(&config(cl.ports, "Two ready", ""), "second");
    for i in 0..WORKERS.len() {
        greets(cl.at(i, cl.ports.relay), "220 Two ready", WAIT).await;
    }

    // Made against version 1: someone applied version 2 since.
    let file = cl.dir.path().join("stale.toml");
    std::fs::write(&file, config(cl.ports, "Stale ready", "")).unwrap();
    let path = file.to_str().unwrap();
    let (code, out, err) = cl.ctl(&["apply", path, "--expected-version", "1"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("ABORTED"), "{err}");
    let (current, _) = cl.nodes();
    assert_eq!(current, v2);
    for i in 0..WORKERS.len() {
        assert_eq!(banner(cl.at(i, cl.ports.relay)).await, "220 Two ready");
    }

    let (code, out, err) = cl.ctl(&["rollback", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("applied version 3 "), "{out}");
    for i in 0..WORKERS.len() {
        greets(cl.at(i, cl.ports.relay), "220 One ready", WAIT).await;
    }
    cl.converged(3, WAIT);
    assert_eq!(cl.ctl(&["get", "3"]).1, cl.ctl(&["get", "1"]).1);

    assert!(cl.control.terminate().is_some_and(|s| s.success()));
    cl.restart_control("control-2.log");
    let (code, out, err) = cl.ctl(&["history"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<(&str, &str, &str)> = out
        .lines()
        .skip(1)
        .map(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            let message = l.split_once(cells[4]).unwrap().1.trim();
            (cells[0], cells[2], message)
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("3", "alice", "rollback to version 1"),
            ("2", "alice", "second"),
            ("1", "alice", "first"),
        ],
        "{out}"
    );
    // Every node comes back on version 3, which it has: no payload.
    cl.converged(3, RECONNECT);
    let first = "ferry_control_snapshots_sent_total{sync=\"first\"}";
    assert_eq!(cl.control.metric(first), Some(0.0));
}
