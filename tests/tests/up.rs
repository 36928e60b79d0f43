//! End to end over the real `ferry up`: the demo cluster's processes (a
//! control plane, two workers and a balancer configured through it), its
//! signals, its certificates, its logs, the `ferry ctl` line it prints,
//! and a client on the balancer's host reaching a worker directly.
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

impl Up {
    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn wait_stderr(&self, what: &str) {
        wait_until(&format!("ferry up to say {what:?}"), || {
            self.stderr().contains(what)
        });
    }

    /// The `ferry ctl` command line `ferry up` printed, as words.
    fn ctl_line(&self) -> Vec<String> {
        let line = self
            .startup
            .lines()
            .find(|l| l.contains(" ctl --control "))
            .unwrap_or_else(|| panic!("no ferry ctl line:\n{}", self.startup));
        line.split_whitespace().map(String::from).collect()
    }

    /// The printed `ferry ctl` line with `args` in place of its command;
    /// the exit code, standard output and standard error.
    fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let words = self.ctl_line();
        let (program, rest) = words.split_first().unwrap();
        assert_eq!(rest.last().map(String::as_str), Some("nodes"), "{words:?}");
        let out = Command::new(program)
            .args(&rest[..rest.len() - 1])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The versions `ferry ctl history` lists, newest first.
    fn history(&self) -> Vec<u64> {
        let (code, out, err) = self.ctl(&["history"]);
        assert_eq!(code, 0, "{err}");
        out.lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect()
    }

    /// Every SMTP address a client reaches the demo on: the balancer's,
    /// then each worker's own.
    fn every_smtp(&self) -> Vec<SocketAddr> {
        let mut all = vec![SocketAddr::new(self.balancer, self.ports.0)];
        all.extend((0..self.workers.len()).map(|i| self.worker_smtp(i)));
        all
    }
}

/// The greeting a client from 127.0.0.1 gets at `addr`.
async fn greeting_at(addr: SocketAddr) -> String {
    let (mut c, greeting) = SmtpClient::connect(addr, Some(ip("127.0.0.1"))).await;
    c.cmd("QUIT").await;
    greeting
}

/// Waits (bounded) until every address in `addrs` greets with `want`.
async fn wait_greeting(addrs: &[SocketAddr], want: &str) {
    let deadline = Instant::now() + WAIT;
    for addr in addrs {
        loop {
            let got = greeting_at(*addr).await;
            if got == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{addr} greets {got:?}, not {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_directly_and_through_the_balancer_and_sigterm_stops_every_node() {
    let mut up = Up::start("127.0.0.70", ["127.0.0.71", "127.0.0.72"], &[]);
    assert_eq!(
        up.pids.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["control", "worker-1", "worker-2", "balancer"],
        "{}",
        up.startup
    );
    let data = up.data();
    // The example went to the control plane as version 1; the control
    // plane logs where the nodes' logs are.
    assert!(
        up.stderr().contains(&format!(
            "ferry up: applied {} as version 1",
            data.join("ferry.toml").display()
        )),
        "{}",
        up.stderr()
    );
    assert!(read(&data.join("logs/control.log")).contains("control plane started"));

    // The ferry ctl line works as printed: every node subscribed, with
    // the certificates ferry up made, and acknowledges version 1 (its
    // report may follow its "ready" by a moment: polled).
    let words = up.ctl_line();
    let rows = [
        ("worker-1", "127.0.0.71"),
        ("worker-2", "127.0.0.72"),
        ("balancer", "127.0.0.70"),
    ];
    let mut nodes = String::new();
    wait_until("every node to acknowledge version 1", || {
        let out = Command::new(&words[0]).args(&words[1..]).output().unwrap();
        nodes = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{words:?}: {nodes}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(nodes.starts_with("current version 1\n"), "{nodes}");
        rows.iter().all(|(name, address)| {
            nodes.lines().any(|l| {
                let row: Vec<&str> = l.split_whitespace().collect();
                row.len() >= 6 && row[0] == *name && row[2..6] == [*address, "yes", "1", "0"]
            })
        })
    });
    assert!(
        words.iter().any(|w| w.ends_with("pki/admin.crt")),
        "{words:?}"
    );
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
    // A message through the balancer lands in the example's folder under
    // DATA, as before the control plane: the nodes' relative paths are
    // taken from DATA (--config-dir).
    assert!(via.cmd("EHLO printer").await.starts_with("250-"));
    assert!(via
        .cmd("MAIL FROM:<printer@example.test>")
        .await
        .starts_with("250 "));
    assert!(via
        .cmd("RCPT TO:<alice@example.test>")
        .await
        .starts_with("250 "));
    assert!(via.cmd("DATA").await.starts_with("354 "));
    let queued = via.cmd("Subject: up and running\r\n\r\nhello\r\n.").await;
    assert!(queued.starts_with("250 2.6.0 "), "{queued}");
    via.cmd("QUIT").await;
    drop((direct, via));
    let folder = data.join("mail/example.test");
    wait_until("the message in DATA/mail/example.test", || {
        std::fs::read_dir(&folder).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| read(&e.path()).contains("Subject: up and running"))
        })
    });

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
    let (_, w2) = up.pids[2].clone();
    signal(w2, "KILL");
    wait_until("ferry up to notice worker-2", || {
        up.stderr.lock().unwrap().contains("worker-2 exited")
    });
    let err = up.stderr.lock().unwrap().clone();
    assert!(
        err.contains("the balancer sends new sessions to worker-1, the one worker left"),
        "{err}"
    );

    // The control plane dies: ferry up says the nodes keep serving and
    // carries on; they do; a SIGHUP says there is nothing to apply to.
    let (_, control) = up.pids[0].clone();
    signal(control, "KILL");
    up.wait_stderr("the control plane exited");
    assert!(up
        .stderr()
        .contains("the nodes keep serving the version they have"));
    assert_eq!(greeting_at(front).await, "220 Ferry Default Frontend ready");
    assert_eq!(
        greeting_at(up.worker_smtp(0)).await,
        "220 Ferry Default Frontend ready"
    );
    signal(up.pid(), "HUP");
    up.wait_stderr("SIGHUP: the control plane is not running");

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
    assert_eq!(up.pids.len(), 4, "{}", up.startup);
    let data = up.data();
    for name in ["control", "worker-1", "worker-2", "balancer"] {
        let path = data.join(format!("logs/{name}.log"));
        let role = name.split('-').next().unwrap();
        let started = match role {
            "control" => "control plane started".to_string(),
            _ => format!("{role} started"),
        };
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
                    .any(|v| v["fields"]["message"].as_str() == Some(&started))
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
async fn changes_go_through_the_control_plane_and_survive_a_restart() {
    let up = Up::start("127.0.0.76", ["127.0.0.77", "127.0.0.78"], &[]);
    let config = up.data().join("ferry.toml");
    assert!(
        up.startup.contains(&format!(
            "To change the config: edit {}, then kill -HUP {}",
            config.display(),
            up.pid()
        )),
        "{}",
        up.startup
    );

    // SIGHUP applies the edited file as version 2; ferry up prints the
    // change, then each node's outcome.
    let edited = read(&config).replace("Ferry Default Frontend ready", "Edited Frontend ready");
    assert_ne!(edited, read(&config), "the example has the default banner");
    std::fs::write(&config, edited).unwrap();
    signal(up.pid(), "HUP");
    up.wait_stderr(&format!(
        r#"applied {} as version 2: ~ connector "Default Frontend""#,
        config.display()
    ));
    for name in ["worker-1", "worker-2", "balancer"] {
        up.wait_stderr(&format!("ferry up: {name}: applied version 2"));
    }
    wait_greeting(&up.every_smtp(), "220 Edited Frontend ready").await;

    // A broken edit: every error with its line and column, nothing
    // applied, every node still on version 2.
    let good = read(&config);
    std::fs::write(&config, good.replace("[[connectors]]", "[[connectors]")).unwrap();
    signal(up.pid(), "HUP");
    let refused = format!(
        "{} refused, nothing applied (version 2 keeps serving):",
        config.display()
    );
    up.wait_stderr(&refused);
    let err = up.stderr();
    let errors: Vec<&str> = err
        .split(&refused)
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("    "))
        .collect();
    assert_eq!(
        errors.len(),
        3,
        "one error per broken [[connectors]]: {err}"
    );
    for e in &errors {
        let place: Vec<&str> = e
            .trim()
            .strip_prefix(&format!("{}:", config.display()))
            .unwrap_or_else(|| panic!("{e}"))
            .splitn(3, ':')
            .collect();
        assert!(
            place[0].parse::<u32>().is_ok() && place[1].parse::<u32>().is_ok(),
            "no line and column: {e}"
        );
    }
    assert_eq!(up.history(), [2, 1]);
    wait_greeting(&up.every_smtp(), "220 Edited Frontend ready").await;

    // A valid edit the workers cannot apply (a certificate file missing
    // on them): stored as version 3, and ferry up prints each worker's
    // NACK with its error; they keep serving version 2.
    let missing = good.replacen("certs/ferry.crt", "certs/missing.crt", 1);
    assert_ne!(missing, good);
    std::fs::write(&config, missing).unwrap();
    signal(up.pid(), "HUP");
    up.wait_stderr(&format!("applied {} as version 3", config.display()));
    for name in ["worker-1", "worker-2"] {
        up.wait_stderr(&format!(
            "ferry up: {name}: refused version 3 (NACK), version 2 keeps serving: "
        ));
    }
    let err = up.stderr();
    let nack = err
        .lines()
        .find(|l| l.starts_with("ferry up: worker-1: refused version 3"))
        .unwrap();
    assert!(nack.contains("missing.crt"), "{nack}");
    wait_greeting(&up.every_smtp(), "220 Edited Frontend ready").await;

    // ferry ctl apply (the printed line) of another edit changes the
    // whole demo cluster: the balancer and each worker's own address.
    let by_ctl = config.with_file_name("by-ctl.toml");
    std::fs::write(&by_ctl, good.replace("Edited Frontend", "Applied Frontend")).unwrap();
    let (code, out, err) = up.ctl(&["apply", by_ctl.to_str().unwrap(), "-m", "new banner"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("applied version 4"), "{out}");
    wait_greeting(&up.every_smtp(), "220 Applied Frontend ready").await;

    // Stopped and started again without --config: the file (repaired,
    // version 2's text) differs from the current version 4, so it is
    // applied as version 5; started again with it unchanged, it adds no
    // version.
    std::fs::write(&config, &good).unwrap();
    signal(up.pid(), "TERM");
    let up = up.restart();
    assert!(up.stderr().contains("ferry up: running"), "{}", up.stderr());
    up.wait_stderr(&format!("applied {} as version 5", config.display()));
    assert_eq!(up.history(), [5, 4, 3, 2, 1]);
    wait_greeting(&up.every_smtp(), "220 Edited Frontend ready").await;
    signal(up.pid(), "TERM");
    let up = up.restart();
    up.wait_stderr(&format!("running version 5, which is {}", config.display()));
    assert_eq!(
        up.history(),
        [5, 4, 3, 2, 1],
        "an unchanged file adds no version"
    );
    wait_greeting(&up.every_smtp(), "220 Edited Frontend ready").await;
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

/// Checks a reply against the README's walkthrough; `{n}`
/// in `want` stands for the worker's number (the session's worker).
fn readme(got: &str, want: &str) {
    let ok = ["1", "2"].iter().any(|n| got == want.replace("{n}", n));
    assert!(ok, "got {got:?}, the README shows {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walkthrough_dialogues_get_the_readme_replies_and_land_in_the_folders() {
    let up = Up::start("127.0.0.82", ["127.0.0.83", "127.0.0.84"], &[]);
    // Its children: a control plane, two workers and a balancer, each
    // running the subcommand of its role, each a child of ferry up.
    for (name, pid) in &up.pids {
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
        let role = name.split('-').next().unwrap();
        assert!(
            cmdline.split('\0').any(|a| a == role),
            "{name}: {cmdline:?}"
        );
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let ppid: i32 = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(ppid, up.pid(), "{name}'s parent");
    }
    let data = up.data();
    let smtp = SocketAddr::new(up.balancer, up.ports.0);
    let submission = SocketAddr::new(up.balancer, up.ports.1);

    // Internal relay accepted, external relay refused.
    let (mut c, greeting) = SmtpClient::connect(smtp, Some(ip("127.0.0.1"))).await;
    assert_eq!(greeting, "220 Ferry Default Frontend ready");
    readme(
        &c.cmd("EHLO printer").await,
        "250-worker-{n}.ferry.test Hello printer\r\n250-SIZE 37748736\r\n250-PIPELINING\r\n\
         250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 STARTTLS",
    );
    let dialogue = [
        ("MAIL FROM:<printer@example.test>", "250 2.1.0 Sender OK"),
        ("RCPT TO:<alice@example.test>", "250 2.1.5 Recipient OK"),
        (
            "RCPT TO:<bob@elsewhere.test>",
            "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain",
        ),
        ("DATA", "354 Start mail input; end with <CRLF>.<CRLF>"),
    ];
    for (command, reply) in dialogue {
        assert_eq!(c.cmd(command).await, reply, "{command}");
    }
    let queued = c
        .cmd("Subject: scan done\r\n\r\nYour scan is ready.\r\n.")
        .await;
    queued_reply(&queued);
    assert_eq!(
        c.cmd("QUIT").await,
        "221 2.0.0 Service closing transmission channel"
    );

    // Authenticated relay on the submission port, after STARTTLS.
    let ca = std::fs::read(data.join("certs/ca.crt")).unwrap();
    let (mut c, greeting) = SmtpClient::connect(submission, Some(ip("127.0.0.1"))).await;
    assert_eq!(greeting, "220 Ferry Client Frontend ready");
    assert!(c.cmd("EHLO scanner").await.ends_with("\r\n250 STARTTLS"));
    let auth = format!("AUTH PLAIN {}", ferry_tests::plain("scanner", "ferry-demo"));
    assert_eq!(
        c.cmd(&auth).await,
        "530 5.7.0 Must issue a STARTTLS command first"
    );
    c.starttls(&ca).await.unwrap();
    let ehlo = c.cmd("EHLO scanner").await;
    readme(
        ehlo.lines().next().unwrap(),
        "250-worker-{n}.ferry.test Hello scanner",
    );
    assert!(ehlo.ends_with("\r\n250 AUTH PLAIN LOGIN"), "{ehlo}");
    let dialogue = [
        (auth.as_str(), "235 2.7.0 Authentication successful"),
        (
            "MAIL FROM:<ceo@elsewhere.test>",
            "550 5.7.1 Sender <ceo@elsewhere.test> is not allowed for user scanner",
        ),
        ("MAIL FROM:<scanner@example.test>", "250 2.1.0 Sender OK"),
        ("RCPT TO:<someone@elsewhere.test>", "250 2.1.5 Recipient OK"),
        ("DATA", "354 Start mail input; end with <CRLF>.<CRLF>"),
    ];
    for (command, reply) in dialogue {
        assert_eq!(c.cmd(command).await, reply, "{command}");
    }
    queued_reply(&c.cmd("Subject: scan\r\n\r\nhello\r\n.").await);
    assert_eq!(
        c.cmd("QUIT").await,
        "221 2.0.0 Service closing transmission channel"
    );

    // Anonymous relay from 127.0.0.30: the most specific range wins.
    let (mut c, greeting) = SmtpClient::connect(smtp, Some(ip("127.0.0.30"))).await;
    assert_eq!(greeting, "220 Ferry Anon Relay ready");
    readme(
        &c.cmd("HELO app").await,
        "250 worker-{n}.ferry.test Hello app",
    );
    assert_eq!(
        c.cmd("MAIL FROM:<app@example.test>").await,
        "250 2.1.0 Sender OK"
    );
    assert_eq!(
        c.cmd("RCPT TO:<someone@elsewhere.test>").await,
        "250 2.1.5 Recipient OK"
    );
    c.cmd("QUIT").await;

    // Delivered along the example's routes: folders under the data dir.
    for (folder, text) in [
        (
            "mail/example.test",
            "Subject: scan done\r\n\r\nYour scan is ready.\r\n",
        ),
        ("mail/outside", "Subject: scan\r\n\r\nhello\r\n"),
    ] {
        let folder = data.join(folder);
        wait_until(&format!("{text:?} in {}", folder.display()), || {
            std::fs::read_dir(&folder)
                .is_ok_and(|d| d.flatten().any(|e| read(&e.path()).ends_with(text)))
        });
    }
}

/// `250 2.6.0 ID Queued mail for delivery`, ID being 20 hex digits.
fn queued_reply(reply: &str) {
    let id = reply
        .strip_prefix("250 2.6.0 ")
        .and_then(|r| r.strip_suffix(" Queued mail for delivery"))
        .unwrap_or_else(|| panic!("{reply}"));
    assert!(
        id.len() == 20 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "{reply}"
    );
}
