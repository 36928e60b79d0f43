//! End to end over the real `ferry up`: the demo cluster's processes, its
//! signals, its certificates, its logs, and a client on the balancer's host
//! reaching a worker directly.
//!
//! The demo's own ports are fixed (2525, 2587), so each test runs the
//! example config on free ports and other loopback addresses (`ferry up`'s
//! hidden `--config` and `--listen`); everything else is the demo's.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_tests::binary::ferry_bin;
use ferry_tests::{free_port, SmtpClient};

const EXAMPLE: &str = include_str!("../../deploy/examples/ferry.toml");
const WAIT: Duration = Duration::from_secs(60);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A running `ferry up` and the nodes it said it started.
struct Up {
    child: Option<Child>,
    data: tempfile::TempDir,
    /// Its standard output up to "Press Ctrl-C".
    startup: String,
    stderr: Arc<Mutex<String>>,
    pids: Vec<(String, i32)>,
    /// (worker address, smtp port, submission port)
    workers: Vec<IpAddr>,
    ports: (u16, u16),
    balancer: IpAddr,
}

impl Up {
    /// `ferry up` with the example config, its balancer on `balancer` and
    /// its workers on `workers`, all on free ports.
    fn start(balancer: &str, workers: [&str; 2], extra_args: &[&str]) -> Up {
        Up::start_to(balancer, workers, extra_args, false)
    }

    /// [`Up::start`]; with `stderr_full`, `ferry up`'s standard error is
    /// `/dev/full`, where every write fails (as on a terminal that hung up).
    fn start_to(balancer: &str, workers: [&str; 2], extra_args: &[&str], stderr_full: bool) -> Up {
        let (b, w1, w2) = (ip(balancer), ip(workers[0]), ip(workers[1]));
        // One port free on all three addresses, for each listener.
        let port = || {
            for _ in 0..50 {
                let p = free_port(b);
                let free = [w1, w2]
                    .iter()
                    .all(|a| std::net::TcpListener::bind(SocketAddr::new(*a, p)).is_ok());
                if free {
                    return p;
                }
            }
            panic!("no common free port");
        };
        let (smtp, submission) = (port(), port());
        let config = EXAMPLE
            .replace("2525", &smtp.to_string())
            .replace("2587", &submission.to_string())
            .replace("127.0.0.11", workers[0])
            .replace("127.0.0.12", workers[1]);
        let data = tempfile::tempdir().unwrap();
        let config_file = data.path().join("given.toml");
        std::fs::write(&config_file, config).unwrap();
        Up::spawn(
            data,
            Some(&config_file),
            extra_args,
            (b, [w1, w2]),
            (smtp, submission),
            stderr_full,
        )
    }

    /// `ferry up` on `data` again, with the config it left there (no
    /// `--config`), after this one stopped.
    fn restart(mut self) -> Up {
        self.wait_exit();
        let data = std::mem::replace(&mut self.data, tempfile::tempdir().unwrap());
        let (b, w, ports) = (
            self.balancer,
            [self.workers[0], self.workers[1]],
            self.ports,
        );
        drop(self);
        Up::spawn(data, None, &[], (b, w), ports, false)
    }

    fn spawn(
        data: tempfile::TempDir,
        config_file: Option<&Path>,
        extra_args: &[&str],
        (b, [w1, w2]): (IpAddr, [IpAddr; 2]),
        (smtp, submission): (u16, u16),
        stderr_full: bool,
    ) -> Up {
        let mut command = Command::new(ferry_bin());
        command
            .args(extra_args)
            .arg("up")
            .arg("--data")
            .arg(data.path().join("ferry-data"));
        if let Some(file) = config_file {
            command.arg("--config").arg(file);
        }
        let mut child = command
            .args(["--listen", &b.to_string()])
            .stdout(Stdio::piped())
            .stderr(match stderr_full {
                true => Stdio::from(std::fs::File::create("/dev/full").unwrap()),
                false => Stdio::piped(),
            })
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take();
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let Some(mut err) = err else { return };
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut up = Up {
            child: Some(child),
            data,
            startup: String::new(),
            stderr,
            pids: Vec::new(),
            workers: vec![w1, w2],
            ports: (smtp, submission),
            balancer: b,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "ferry up did not start:\n{}\n{}",
                    up.startup,
                    up.stderr.lock().unwrap()
                )
            });
            up.startup.push_str(&line);
            up.startup.push('\n');
            let words: Vec<&str> = line.split_whitespace().collect();
            if let [name, "pid", pid, ..] = words.as_slice() {
                up.pids.push((name.to_string(), pid.parse().unwrap()));
            }
            if line.starts_with("Press Ctrl-C") {
                break;
            }
        }
        up
    }

    fn data(&self) -> PathBuf {
        self.data.path().join("ferry-data")
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn worker_smtp(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.workers[i], self.ports.0)
    }

    /// Waits (bounded) for `ferry up` itself to exit; its status.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "ferry up did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        for (_, pid) in &self.pids {
            signal(*pid, "KILL");
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn signal(pid: i32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// Gone, or a zombie waiting for a parent that is not us to reap it.
fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `openssl s_client` checking the server's chain against `ca` and its
/// name (`-verify_ip` for an address).
fn openssl_verify(addr: SocketAddr, name: &str, ca: &Path) -> String {
    let check = if name.parse::<IpAddr>().is_ok() {
        "-verify_ip"
    } else {
        "-verify_hostname"
    };
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string()])
        .args(["-starttls", "smtp", "-verify_return_error", check, name])
        .arg("-CAfile")
        .arg(ca)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_directly_and_through_the_balancer_and_sigterm_stops_every_node() {
    let mut up = Up::start("127.0.0.70", ["127.0.0.71", "127.0.0.72"], &[]);
    assert_eq!(
        up.pids.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["worker-1", "worker-2", "balancer"],
        "{}",
        up.startup
    );
    let data = up.data();
    // The startup text says where the logs and the CA are, and gives each
    // node's admin URL then its metrics URL.
    assert!(
        up.startup.contains(&format!(
            "Each node's log: {}/NAME.log",
            data.join("logs").display()
        )),
        "{}",
        up.startup
    );
    assert!(up.startup.contains(&format!(
        "demo CA in {}",
        data.join("certs/ca.crt").display()
    )));
    let worker_line = up.startup.lines().find(|l| l.contains("worker-1")).unwrap();
    let admin = worker_line
        .split("admin ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert!(
        worker_line.ends_with(&format!("metrics {admin}/metrics")),
        "{worker_line}"
    );
    assert!(!admin.ends_with("/metrics"), "{worker_line}");

    // A client on the balancer's own host (127.0.0.1) reaches a worker
    // directly: only the balancer's source address is a trusted proxy.
    let (mut direct, greeting) =
        SmtpClient::connect(up.worker_smtp(0), Some(ip("127.0.0.1"))).await;
    assert_eq!(greeting, "220 Ferry Default Frontend ready", "direct");
    assert!(direct
        .cmd("EHLO direct")
        .await
        .starts_with("250-worker-1.ferry.test"));
    direct.cmd("QUIT").await;
    // Through the balancer too.
    let front = SocketAddr::new(up.balancer, up.ports.0);
    let (mut via, greeting) = SmtpClient::connect(front, Some(ip("127.0.0.1"))).await;
    assert_eq!(greeting, "220 Ferry Default Frontend ready", "balancer");
    via.cmd("QUIT").await;
    drop((direct, via));

    // From the trusted address without a PROXY header: closed, and the
    // worker's log says why and what to do.
    let mut c = SmtpClient::connect_from(up.worker_smtp(0), Some(ip("127.0.0.2")))
        .await
        .unwrap();
    c.send(b"EHLO pretender\r\n").await.unwrap();
    assert!(c.is_closed().await);
    let log = data.join("logs/worker-1.log");
    wait_until("the bad-header hint in worker-1.log", || {
        read(&log).contains("peer is in trusted_proxies")
    });
    assert!(read(&log).contains("worker started"), "{}", read(&log));
    // None of that reached ferry up's own output.
    assert!(!up.startup.contains("INFO") && !up.startup.contains("WARN"));
    assert!(!up.stderr.lock().unwrap().contains("trusted_proxies"));

    // The demo CA verifies every node's certificate for the names clients
    // use, with openssl as a user would run it.
    let ca = data.join("certs/ca.crt");
    for (addr, name) in [
        (up.worker_smtp(0), "localhost"),
        (up.worker_smtp(1), "worker-2.ferry.test"),
        (up.worker_smtp(1), "127.0.0.72"),
        (front, "localhost"),
    ] {
        let out = openssl_verify(addr, name, &ca);
        assert!(
            out.contains("Verify return code: 0 (ok)"),
            "{addr} {name}: {out}"
        );
    }
    let out = openssl_verify(up.worker_smtp(0), "elsewhere.test", &ca);
    assert!(!out.contains("Verify return code: 0 (ok)"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("certs/ferry.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // ferry queue pointed at the balancer says it is not a worker's.
    let balancer_line = up
        .startup
        .lines()
        .find(|l| l.contains("balancer   pid"))
        .unwrap();
    let balancer_admin = balancer_line
        .split("admin ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let out = Command::new(ferry_bin())
        .args(["queue", "--admin", balancer_admin, "--token-file"])
        .arg(data.join("admin.token"))
        .arg("list")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("that is a balancer's admin endpoint, not a worker's"),
        "{err}"
    );
    let out = Command::new(ferry_bin())
        .args(["queue", "--admin", admin, "--token-file"])
        .arg(data.join("admin.token"))
        .arg("list")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("\n0 messages\n"));

    // A worker dies: the message names the worker that is left.
    let (_, w2) = up.pids[1].clone();
    signal(w2, "KILL");
    wait_until("ferry up to notice worker-2", || {
        up.stderr.lock().unwrap().contains("worker-2 exited")
    });
    let err = up.stderr.lock().unwrap().clone();
    assert!(
        err.contains("the balancer sends new sessions to worker-1, the one worker left"),
        "{err}"
    );

    // SIGTERM: ferry up stops every node, then exits.
    signal(up.pid(), "TERM");
    let status = up.wait_exit();
    assert!(status.success(), "{status}");
    // Every node drained and stopped by itself, none had to be killed.
    let err = up.stderr.lock().unwrap().clone();
    assert!(!err.contains("did not stop in time"), "{err}");
    for (name, pid) in &up.pids {
        assert!(is_gone(*pid), "{name} ({pid}) still runs after SIGTERM");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_log_json_and_exit_when_ferry_up_is_killed() {
    let mut up = Up::start("127.0.0.73", ["127.0.0.74", "127.0.0.75"], &["--log-json"]);
    assert_eq!(up.pids.len(), 3, "{}", up.startup);
    let data = up.data();
    for name in ["worker-1", "worker-2", "balancer"] {
        let path = data.join(format!("logs/{name}.log"));
        let role = name.split('-').next().unwrap();
        let json = |log: &str| -> Vec<serde_json::Value> {
            log.lines()
                .filter(|l| l.starts_with('{'))
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
                .collect()
        };
        wait_until(
            &format!("{name} to log that it started ({})", path.display()),
            || {
                json(&read(&path))
                    .iter()
                    .any(|v| v["fields"]["message"].as_str() == Some(&format!("{role} started")))
            },
        );
        // Only the address lines are not JSON.
        let log = read(&path);
        assert!(
            log.lines()
                .all(|l| l.starts_with('{') || l.starts_with(&format!("{role} "))),
            "{name}: {log}"
        );
    }

    // SIGKILL leaves no chance to clean up: the kernel stops the children.
    signal(up.pid(), "KILL");
    up.wait_exit();
    for (name, pid) in up.pids.clone() {
        wait_until(&format!("{name} ({pid}) to exit with ferry up"), || {
            is_gone(pid)
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_every_node_and_edits_survive_a_restart() {
    let up = Up::start("127.0.0.76", ["127.0.0.77", "127.0.0.78"], &[]);
    assert!(
        up.startup.contains(&format!(
            "To change the config: edit {}, then kill -HUP {}",
            up.data().join("ferry.toml").display(),
            up.pid()
        )),
        "{}",
        up.startup
    );
    let config = up.data().join("ferry.toml");
    let edited = read(&config).replace("Ferry Default Frontend ready", "Edited Frontend ready");
    assert_ne!(edited, read(&config), "the example has the default banner");
    std::fs::write(&config, edited).unwrap();
    signal(up.pid(), "HUP");
    for name in ["worker-1", "worker-2", "balancer"] {
        wait_until(&format!("{name} to report its reload"), || {
            up.stderr
                .lock()
                .unwrap()
                .contains(&format!("{name}: config version 2"))
        });
    }
    let err = up.stderr.lock().unwrap().clone();
    assert!(
        err.contains(r#"worker-1: config version 2: ~ connector "Default Frontend""#),
        "{err}"
    );
    let (mut c, greeting) = SmtpClient::connect(up.worker_smtp(0), Some(ip("127.0.0.1"))).await;
    assert_eq!(greeting, "220 Edited Frontend ready");
    c.cmd("QUIT").await;

    // A broken edit: each node says so with the line, and keeps serving.
    let good = read(&config);
    std::fs::write(&config, good.replace("[[connectors]]", "[[connectors]")).unwrap();
    signal(up.pid(), "HUP");
    wait_until("the failed reload to be reported", || {
        up.stderr
            .lock()
            .unwrap()
            .contains("worker-2: reload failed, version 2 keeps serving")
    });
    let err = up.stderr.lock().unwrap().clone();
    assert!(err.contains("ferry.toml:"), "{err}");
    let (mut c, greeting) = SmtpClient::connect(up.worker_smtp(1), Some(ip("127.0.0.1"))).await;
    assert_eq!(greeting, "220 Edited Frontend ready");
    c.cmd("QUIT").await;
    drop(c);

    // Stopped and started again without --config, ferry up runs the
    // edited file (repaired first), not the example.
    std::fs::write(&config, good).unwrap();
    signal(up.pid(), "TERM");
    let up = up.restart();
    assert!(
        up.stderr.lock().unwrap().contains("ferry up: running"),
        "{}",
        up.stderr.lock().unwrap()
    );
    let (mut c, greeting) = SmtpClient::connect(up.worker_smtp(0), Some(ip("127.0.0.1"))).await;
    assert_eq!(greeting, "220 Edited Frontend ready");
    c.cmd("QUIT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_terminal_neither_stops_nor_breaks_the_demo() {
    // Every write to standard error fails, as after a terminal hangup:
    // ferry up still reloads on SIGHUP and drains every node on SIGTERM.
    let mut up = Up::start_to("127.0.0.79", ["127.0.0.80", "127.0.0.81"], &[], true);
    let config = up.data().join("ferry.toml");
    let edited = read(&config).replace("Ferry Default Frontend ready", "Still here ready");
    std::fs::write(&config, edited).unwrap();
    signal(up.pid(), "HUP");
    let deadline = Instant::now() + WAIT;
    loop {
        let (mut c, greeting) = SmtpClient::connect(up.worker_smtp(1), Some(ip("127.0.0.1"))).await;
        c.cmd("QUIT").await;
        if greeting == "220 Still here ready" {
            break;
        }
        assert!(Instant::now() < deadline, "no reload: {greeting}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up.child.as_mut().unwrap().try_wait().unwrap().is_none());
    signal(up.pid(), "TERM");
    let status = up.wait_exit();
    assert!(status.success(), "{status}");
    for (name, pid) in &up.pids {
        assert!(is_gone(*pid), "{name} ({pid}) still runs");
    }
}
