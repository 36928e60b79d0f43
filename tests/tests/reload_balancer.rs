//! Live reconfiguration of the real `ferry balancer` in front of real
//! `ferry worker` processes: each test has a client in the middle of a
//! session when the reload happens (SIGHUP or `POST /config/reload`), and
//! that session completes a message under what it started with.
//!
//! The workers read their own file; the balancer's file holds only its
//! `[balancer]` section, rewritten before each reload.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_tests::binary::WorkerProcess;
use ferry_tests::{free_port, SmtpClient};
use serde_json::Value;

/// The workers' addresses, by name.
const W1: &str = "127.0.0.101";
const W2: &str = "127.0.0.102";

fn ip(s: &str) -> Option<IpAddr> {
    Some(s.parse().unwrap())
}

/// A port free on both worker addresses.
fn worker_port() -> u16 {
    for _ in 0..100 {
        let p = free_port(ip(W1).unwrap());
        if std::net::TcpListener::bind((W2, p)).is_ok() {
            return p;
        }
    }
    panic!("no port free on both worker addresses");
}

fn write_worker_config(dir: &Path, port: u16) -> PathBuf {
    let text = format!(
        r#"
accepted_domains = [{{ domain = "example.test", kind = "authoritative" }}]
trusted_proxies = ["127.0.0.1/32"]

[[connectors]]
name = "Default Frontend"
port = {port}
remote_ranges = ["0.0.0.0/0"]
permissions = ["anonymous"]
banner = "Default Frontend ready"

[[routes]]
domains = ["*"]
type = "directory"
path = "mail"
"#
    );
    let path = dir.join("workers.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The balancer's config: `listeners` as (name, port), `backends` as
/// (name, address), and `extra` lines in `[balancer]`.
fn balancer_text(
    listeners: &[(&str, u16)],
    backends: &[(&str, &str)],
    extra: &str,
    worker_port: u16,
) -> String {
    let mut text = format!(
        "[balancer]\nallow = [\"127.0.0.0/8\"]\nhandoff_timeout = \"2s\"\n\
         probe = {{ interval = \"300ms\", timeout = \"1s\", rise = 2, fall = 2 }}\n{extra}\n"
    );
    for (name, port) in listeners {
        text += &format!(
            "[[balancer.listeners]]\nname = \"{name}\"\nport = {port}\nbackend_port = {worker_port}\n"
        );
    }
    for (name, address) in backends {
        text += &format!("[[balancer.backends]]\nname = \"{name}\"\naddress = \"{address}\"\n");
    }
    text
}

struct Cluster {
    dir: tempfile::TempDir,
    worker_config: PathBuf,
    worker_port: u16,
    /// The balancer's own file.
    config: PathBuf,
    balancer: WorkerProcess,
    workers: Vec<WorkerProcess>,
}

impl Cluster {
    /// Workers `names` (of w1, w2) running; the balancer with `text`.
    fn start(workers: &[&str], text: impl Fn(u16) -> String) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let worker_port = worker_port();
        let worker_config = write_worker_config(dir.path(), worker_port);
        let config = dir.path().join("balancer.toml");
        std::fs::write(&config, text(worker_port)).unwrap();
        let mut cl = Cluster {
            worker_config,
            worker_port,
            config: config.clone(),
            balancer: WorkerProcess::balancer(&config, "127.0.0.1", dir.path()),
            workers: Vec::new(),
            dir,
        };
        for name in workers {
            cl.start_worker(name);
        }
        cl
    }

    fn start_worker(&mut self, name: &str) {
        let addr = if name == "w1" { W1 } else { W2 };
        let data = self.dir.path().join(name);
        self.workers.push(WorkerProcess::start_as(
            &self.worker_config,
            addr,
            &data,
            &format!("{name}.test"),
        ));
    }

    fn front(&self) -> SocketAddr {
        self.balancer.smtp[0]
    }

    fn rewrite(&self, text: &str) {
        std::fs::write(&self.config, text).unwrap();
    }

    /// SIGHUP, as an operator's `kill -HUP`.
    fn hangup(&self) {
        use nix::sys::signal::{kill, Signal};
        kill(
            nix::unistd::Pid::from_raw(self.balancer.pid()),
            Signal::SIGHUP,
        )
        .unwrap();
    }

    /// `POST /config/reload`: the status and the report.
    fn reload(&self) -> (u16, Value) {
        let (status, body) = self.balancer.admin_call("POST", "/config/reload");
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    fn status(&self) -> Value {
        let (_, body) = self.balancer.admin_call("GET", "/status");
        serde_json::from_str(&body).unwrap()
    }

    /// Waits (bounded) until `/status` says a reload has ended as `result`
    /// with `version` in service.
    fn wait_reloaded(&self, result: &str, version: u64) -> Value {
        wait_for("the reload", || {
            let s = self.status();
            let last = &s["config"]["last_reload"];
            (last["result"] == result && s["config"]["version"] == version).then(|| last.clone())
        })
    }

    /// The balancer's view of `backend` behind the first listener.
    fn backend(&self, backend: &str) -> Option<Value> {
        let (_, body) = self.balancer.admin_call("GET", "/backends");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["backend"] == backend)
            .cloned()
    }

    fn metrics(&self) -> String {
        self.balancer.admin_call("GET", "/metrics").1
    }
}

/// Polls `probe` every 20 ms until it gives a value, for at most 20 s.
fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A session through `front` from `source`, after EHLO; and the worker
/// that serves it (its host name, from the EHLO reply).
async fn session(front: SocketAddr, source: &str) -> (SmtpClient, String) {
    let (mut c, banner) = SmtpClient::connect(front, ip(source)).await;
    assert_eq!(banner, "220 Default Frontend ready");
    let ehlo = c.cmd("EHLO device").await;
    let name = ehlo.get(4..).unwrap().split_whitespace().next().unwrap();
    let name = name.to_string();
    (c, name)
}

/// The rest of a transaction begun with MAIL: one recipient, a message,
/// QUIT; asserts each reply.
async fn finish_message(c: &mut SmtpClient, subject: &str) {
    assert_eq!(
        c.cmd("RCPT TO:<b@example.test>").await,
        "250 2.1.5 Recipient OK"
    );
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(format!("Subject: {subject}\r\n\r\nbody\r\n.\r\n").as_bytes())
        .await
        .unwrap();
    let queued = c.reply().await;
    assert!(queued.starts_with("250 2.6.0"), "{queued}");
    assert_eq!(
        c.cmd("QUIT").await,
        "221 2.0.0 Service closing transmission channel"
    );
}

fn metric(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_moved_to_deny_holds_for_the_next_connection_only() {
    let port = free_port(ip("127.0.0.1").unwrap());
    let cl = Cluster::start(&["w1"], |wp| {
        balancer_text(&[("smtp", port)], &[("w1", W1)], "", wp)
    });
    let (mut open, _) = session(cl.front(), "127.0.0.41").await;
    assert_eq!(
        open.cmd("MAIL FROM:<a@example.test>").await,
        "250 2.1.0 Sender OK"
    );

    cl.rewrite(&balancer_text(
        &[("smtp", port)],
        &[("w1", W1)],
        "deny = [\"127.0.0.40/29\"]",
        cl.worker_port,
    ));
    cl.hangup();
    let report = cl.wait_reloaded("ok", 2);
    assert_eq!(
        report["changes"],
        serde_json::json!(["~ balancer settings"])
    );

    // The open session completes under the list it started with...
    finish_message(&mut open, "before the deny").await;
    // ...the next one from that range is refused, others are not.
    let (mut c, refused) = SmtpClient::connect(cl.front(), ip("127.0.0.41")).await;
    assert_eq!(refused, "554 5.7.1 Access denied");
    assert!(c.is_closed().await);
    let (_c, served_by) = session(cl.front(), "127.0.0.50").await;
    assert_eq!(served_by, "w1.test");
    let m = cl.metrics();
    assert_eq!(metric(&m, "ferry_config_version"), Some(2.0), "{m}");
    assert_eq!(
        metric(&m, r#"ferry_config_reloads_total{result="ok"}"#),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_backend_joins_after_its_probes_and_a_drain_survives_the_reload() {
    let port = free_port(ip("127.0.0.1").unwrap());
    // w2 is not running yet: it can only come up by passing its probes.
    let mut cl = Cluster::start(&["w1"], |wp| {
        balancer_text(&[("smtp", port)], &[("w1", W1)], "", wp)
    });
    let (mut open, served_by) = session(cl.front(), "127.0.0.42").await;
    assert_eq!(served_by, "w1.test");
    assert_eq!(
        open.cmd("MAIL FROM:<a@example.test>").await,
        "250 2.1.0 Sender OK"
    );
    let (status, _) = cl.balancer.admin_call("POST", "/backends/w1/drain");
    assert_eq!(status, 200);

    cl.rewrite(&balancer_text(
        &[("smtp", port)],
        &[("w1", W1), ("w2", W2)],
        "",
        cl.worker_port,
    ));
    let (status, report) = cl.reload();
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["result"], "ok");
    assert_eq!(report["version"], 2);
    assert_eq!(
        report["changes"],
        serde_json::json!(["+ balancer backend \"w2\""])
    );
    // The new backend starts down (an optimistic start would show up
    // until two probes had failed); w1 is still drained.
    let w2 = cl.backend("w2").unwrap();
    assert_eq!(
        (w2["up"].clone(), w2["eligible"].clone()),
        (false.into(), false.into()),
        "{w2}"
    );
    assert_eq!(cl.backend("w1").unwrap()["draining"], true);
    let (mut c, reply) = SmtpClient::connect(cl.front(), ip("127.0.0.43")).await;
    assert_eq!(
        reply,
        "421 4.3.2 Service not available, closing transmission channel"
    );
    assert!(c.is_closed().await);

    // w2 starts: after two good probes it takes the next session.
    cl.start_worker("w2");
    wait_for("w2 up", || (cl.backend("w2")?["up"] == true).then_some(()));
    let (mut c, served_by) = session(cl.front(), "127.0.0.43").await;
    assert_eq!(served_by, "w2.test");
    assert_eq!(
        c.cmd("QUIT").await,
        "221 2.0.0 Service closing transmission channel"
    );
    // The session that was open on the drained w1 all along completes.
    finish_message(&mut open, "through the reload").await;
    let w1 = cl.backend("w1").unwrap();
    assert_eq!(
        (w1["up"].clone(), w1["draining"].clone()),
        (true.into(), true.into()),
        "{w1}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_backend_gets_no_new_session_while_its_open_one_completes() {
    let port = free_port(ip("127.0.0.1").unwrap());
    let both = [("w1", W1), ("w2", W2)];
    let cl = Cluster::start(&["w1", "w2"], |wp| {
        balancer_text(&[("smtp", port)], &both, "", wp)
    });
    let (mut open, served_by) = session(cl.front(), "127.0.0.44").await;
    let (gone, stays) = match served_by.as_str() {
        "w1.test" => ("w1", ("w2", W2)),
        _ => ("w2", ("w1", W1)),
    };
    assert_eq!(
        open.cmd("MAIL FROM:<a@example.test>").await,
        "250 2.1.0 Sender OK"
    );

    cl.rewrite(&balancer_text(
        &[("smtp", port)],
        &[stays],
        "",
        cl.worker_port,
    ));
    cl.hangup();
    let report = cl.wait_reloaded("ok", 2);
    assert_eq!(
        report["changes"],
        serde_json::json!([format!("- balancer backend \"{gone}\"")])
    );
    assert!(cl.backend(gone).is_none());
    // Held open: least connections would send the second or third to the
    // removed worker (one session, the open one) were it still eligible.
    let mut held = Vec::new();
    for _ in 0..6 {
        let (c, served_by) = session(cl.front(), "127.0.0.45").await;
        assert_eq!(served_by, format!("{}.test", stays.0));
        held.push(c);
    }
    finish_message(&mut open, "on a removed backend").await;
    drop(held);
    // Its gauges no longer say it is a worker down, nor one in rotation.
    let m = cl.metrics();
    let labels = format!(r#"{{listener="smtp",backend="{gone}"}}"#);
    assert_eq!(
        metric(&m, &format!("ferry_balancer_backend_up{labels}")),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, &format!("ferry_balancer_backend_draining{labels}")),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_port_added_then_the_first_one_removed() {
    let first = free_port(ip("127.0.0.1").unwrap());
    let second = free_port(ip("127.0.0.1").unwrap());
    let cl = Cluster::start(&["w1"], |wp| {
        balancer_text(&[("smtp", first)], &[("w1", W1)], "", wp)
    });
    let (mut open, _) = session(cl.front(), "127.0.0.46").await;
    assert_eq!(
        open.cmd("MAIL FROM:<a@example.test>").await,
        "250 2.1.0 Sender OK"
    );

    // w1 up behind smtp (its probes may have seen it start late).
    wait_for("w1 up and the balancer ready", || {
        let up = cl.backend("w1")?["up"] == true;
        (up && cl.balancer.admin_call("GET", "/readyz").0 == 200).then_some(())
    });

    let both = [("smtp", first), ("submission", second)];
    cl.rewrite(&balancer_text(&both, &[("w1", W1)], "", cl.worker_port));
    let (status, report) = cl.reload();
    assert_eq!(status, 200, "{report}");
    let added = SocketAddr::from(([127, 0, 0, 1], second));
    assert_eq!(
        report["listeners_added"],
        serde_json::json!([added.to_string()])
    );
    // w1 is up behind smtp, so behind the new listener too, at once: the
    // balancer stays ready and the first client there is served, no 421
    // while the probes (rise = 2, every 300 ms) catch up.
    let (status, body) = cl.balancer.admin_call("GET", "/readyz");
    assert_eq!(status, 200, "a new listener made /readyz say {body:?}");
    let (mut c, served_by) = session(added, "127.0.0.47").await;
    assert_eq!(served_by, "w1.test");

    cl.rewrite(&balancer_text(
        &[("submission", second)],
        &[("w1", W1)],
        "",
        cl.worker_port,
    ));
    let (status, report) = cl.reload();
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report["listeners_removed"],
        serde_json::json!([cl.front().to_string()])
    );
    // The removed port refuses new clients; both open sessions complete.
    wait_for("the first port closed", || {
        std::net::TcpStream::connect(cl.front())
            .is_err()
            .then_some(())
    });
    finish_message(&mut open, "on a removed port").await;
    assert_eq!(
        c.cmd("MAIL FROM:<a@example.test>").await,
        "250 2.1.0 Sender OK"
    );
    finish_message(&mut c, "on the new port").await;
    // The removed listener's worker gauges are no number: no alert sums
    // them to "no worker for listener smtp".
    let m = cl.metrics();
    let up = metric(
        &m,
        r#"ferry_balancer_backend_up{listener="smtp",backend="w1"}"#,
    );
    assert!(up.is_some_and(f64::is_nan), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_reload_is_refused_with_its_errors_and_the_old_config_serves() {
    let port = free_port(ip("127.0.0.1").unwrap());
    let cl = Cluster::start(&["w1"], |wp| {
        balancer_text(&[("smtp", port)], &[("w1", W1)], "", wp)
    });
    let (mut open, _) = session(cl.front(), "127.0.0.48").await;
    assert_eq!(
        open.cmd("MAIL FROM:<a@example.test>").await,
        "250 2.1.0 Sender OK"
    );
    let sha = cl.status()["config"]["sha256"].clone();

    // A port another process holds, with a deny that must not apply.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let t = taken.local_addr().unwrap().port();
    cl.rewrite(&balancer_text(
        &[("smtp", port), ("submission", t)],
        &[("w1", W1)],
        "deny = [\"127.0.0.48/32\"]",
        cl.worker_port,
    ));
    let (status, report) = cl.reload();
    assert_eq!(status, 422, "{report}");
    assert_eq!(report["result"], "failed");
    assert_eq!(report["version"], 1);
    let errors = report["errors"].as_array().unwrap();
    assert!(
        errors[0]
            .as_str()
            .unwrap()
            .starts_with(&format!("cannot listen on 127.0.0.1:{t}: ")),
        "{report}"
    );

    // A config without a [balancer] section, by SIGHUP.
    std::fs::copy(&cl.worker_config, &cl.config).unwrap();
    cl.hangup();
    let report = wait_for("the second failed reload", || {
        let m = cl.metrics();
        (metric(&m, r#"ferry_config_reloads_total{result="failed"}"#)? == 2.0)
            .then(|| cl.status()["config"]["last_reload"].clone())
    });
    assert_eq!(
        report["errors"],
        serde_json::json!([
            "the config has no [balancer] section: a balancer has nothing to balance"
        ])
    );

    // A syntax error: every error with its file, line and column.
    cl.rewrite("[balancer\nallow = [\"127.0.0.0/8\"]\n");
    let (status, report) = cl.reload();
    assert_eq!(status, 422, "{report}");
    let first_error = report["errors"][0].as_str().unwrap().to_string();
    let file = cl.config.display().to_string();
    assert!(first_error.starts_with(&format!("{file}:1:")), "{report}");

    // Version 1 serves on: its one listener, the open session completes,
    // the deny never applied.
    let s = cl.status();
    assert_eq!(s["listeners"].as_array().unwrap().len(), 1, "{s}");
    assert_eq!(
        (
            s["config"]["version"].clone(),
            s["config"]["sha256"].clone()
        ),
        (1.into(), sha)
    );
    assert_eq!(s["config"]["last_reload"]["result"], "failed");
    finish_message(&mut open, "through three failed reloads").await;
    let (_c, served_by) = session(cl.front(), "127.0.0.48").await;
    assert_eq!(served_by, "w1.test");
    let m = cl.metrics();
    assert_eq!(
        metric(&m, r#"ferry_config_reloads_total{result="failed"}"#),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"ferry_config_reloads_total{result="ok"}"#),
        Some(0.0),
        "{m}"
    );
    assert_eq!(metric(&m, "ferry_config_version"), Some(1.0), "{m}");
    // The listener that never served left no series behind.
    assert!(!m.contains(r#"listener="submission""#), "{m}");
    drop(taken);
}
