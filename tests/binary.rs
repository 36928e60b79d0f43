//! Runs the real `ferry` binary: starts it, reads the addresses it prints,
//! kills it on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The `ferry` binary built from this tree. Unless cargo names it
/// (`CARGO_BIN_EXE_ferry`), it is built here, once per test process, so
/// that a test never runs a stale one left in `target/` (`cargo test -p
/// ferry-tests` alone does not rebuild it; an up-to-date build costs a
/// second).
pub fn ferry_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(p) = option_env!("CARGO_BIN_EXE_ferry") {
        return PathBuf::from(p);
    }
    BUILT
        .get_or_init(|| {
            // The tests package is not the binary's package: it is beside us.
            let exe = std::env::current_exe().unwrap();
            let profile = exe.parent().unwrap().parent().unwrap();
            let bin = profile.join("ferry");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = Command::new(cargo);
            build.args(["build", "-p", "ferry", "--bin", "ferry"]);
            if profile.ends_with("release") {
                build.arg("--release");
            }
            // The etcd tests run the binary with the etcd store.
            if cfg!(feature = "etcd") {
                build.args(["--features", "etcd"]);
            }
            // The variables cargo set for this test process (its package's
            // name and folder) would look like a changed environment to
            // the build scripts that watch them, and rebuild the binary's
            // dependencies: build as from the shell.
            for (key, _) in std::env::vars_os() {
                let key = key.to_string_lossy();
                let keep = matches!(
                    key.as_ref(),
                    "CARGO_HOME" | "CARGO_TARGET_DIR" | "CARGO_TERM_COLOR" | "CARGO_BUILD_JOBS"
                );
                if (key.starts_with("CARGO_") || key == "OUT_DIR") && !keep {
                    build.env_remove(key.as_ref());
                }
            }
            let status = build.status().expect("run cargo build");
            assert!(status.success(), "building the ferry binary failed");
            assert!(bin.exists(), "no {} after building it", bin.display());
            bin
        })
        .clone()
}

/// A running Ferry node process (`ferry worker` or `ferry balancer`).
pub struct WorkerProcess {
    child: Child,
    pub smtp: Vec<SocketAddr>,
    pub admin: String,
    /// The admin bearer token it was started with, and its file.
    pub token: String,
    pub token_file: std::path::PathBuf,
    lines: mpsc::Receiver<String>,
}

/// Writes a fresh admin token into `dir`; returns it and its file.
fn token_in(dir: &Path) -> (String, std::path::PathBuf) {
    let token = format!("test-token-{:016x}", std::process::id() as u64 * 7919 + 17);
    let file = dir.join("admin.token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    (token, file)
}

impl WorkerProcess {
    /// Starts `ferry worker` and waits (bounded) until it says it is ready.
    /// Its log (stderr) goes to `worker.log` in the data directory.
    pub fn start(config: &Path, listen: &str, data: &Path) -> Self {
        Self::start_as(config, listen, data, "relay.test")
    }

    /// The same, with a host name of its own (EHLO answers with it).
    pub fn start_as(config: &Path, listen: &str, data: &Path, hostname: &str) -> Self {
        std::fs::create_dir_all(data).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.join("worker.log"))
            .unwrap();
        let (token, token_file) = token_in(data);
        let child = Command::new(ferry_bin())
            .args(["worker", "--config"])
            .arg(config)
            .args(["--listen", listen, "--data"])
            .arg(data)
            .args(["--admin", "127.0.0.1:0", "--hostname", hostname])
            .arg("--admin-token-file")
            .arg(&token_file)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start ferry worker");
        Self::ready(child, "worker", token, token_file)
    }

    /// Reads the node's address lines (`ROLE smtp ADDR`, `ROLE admin URL`)
    /// until `ROLE ready`, bounded.
    fn ready(child: Child, role: &str, token: String, token_file: std::path::PathBuf) -> Self {
        let mut w = Self::reading(child, token, token_file);
        assert!(
            w.read_until(role, "ready", Duration::from_secs(30)),
            "{role} did not report ready in time"
        );
        w
    }

    fn reading(mut child: Child, token: String, token_file: std::path::PathBuf) -> Self {
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        WorkerProcess {
            child,
            smtp: Vec::new(),
            admin: String::new(),
            token,
            token_file,
            lines: rx,
        }
    }

    /// Reads address lines until `ROLE WORD` (`ready`, `waiting`); false
    /// if it did not come within `wait`.
    pub fn read_until(&mut self, role: &str, word: &str, wait: Duration) -> bool {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok(line) = self.lines.recv_timeout(left) else {
                return false;
            };
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [r, "smtp", addr] if *r == role => self.smtp.push(addr.parse().unwrap()),
                [r, "admin", url] if *r == role => {
                    self.admin = url.trim_end_matches("/metrics").to_string()
                }
                [r, w] if *r == role && *w == word => return true,
                _ => {}
            }
        }
    }

    /// Starts `ferry ROLE ARGS… --admin 127.0.0.1:0 --admin-token-file F`
    /// (its log goes to `ROLE.log` in `logs`) and reads its lines until
    /// `ROLE WORD`: `ready`, or `waiting` for a node started with
    /// `--control` and nothing to serve yet.
    pub fn start_args(role: &str, args: &[String], logs: &Path, word: &str) -> Self {
        Self::start_args_env(role, args, &[], logs, word)
    }

    /// [`WorkerProcess::start_args`] with `env` added to its environment
    /// (`TZ`, `RUST_LOG`).
    pub fn start_args_env(
        role: &str,
        args: &[String],
        env: &[(&str, &str)],
        logs: &Path,
        word: &str,
    ) -> Self {
        std::fs::create_dir_all(logs).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(format!("{role}.log")))
            .unwrap();
        let (token, token_file) = token_in(logs);
        let child = Command::new(ferry_bin())
            .arg(role)
            .args(args)
            .envs(env.iter().copied())
            .args(["--admin", "127.0.0.1:0", "--admin-token-file"])
            .arg(&token_file)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start ferry {role}: {e}"));
        let mut w = Self::reading(child, token, token_file);
        assert!(
            w.read_until(role, word, Duration::from_secs(30)),
            "{role} did not report {word} in time"
        );
        w
    }

    /// Starts `ferry balancer` (its log goes to `balancer.log` in `logs`).
    pub fn balancer(config: &Path, listen: &str, logs: &Path) -> Self {
        std::fs::create_dir_all(logs).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join("balancer.log"))
            .unwrap();
        let (token, token_file) = token_in(logs);
        let child = Command::new(ferry_bin())
            .args(["balancer", "--config"])
            .arg(config)
            .args(["--listen", listen, "--admin", "127.0.0.1:0"])
            .arg("--admin-token-file")
            .arg(&token_file)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start ferry balancer");
        Self::ready(child, "balancer", token, token_file)
    }

    /// An admin request with this node's token.
    pub fn admin_call(&self, method: &str, path: &str) -> (u16, String) {
        http_with(&self.admin, method, path, Some(&self.token))
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends SIGHUP: the node re-reads its config file.
    pub fn hangup(&self) {
        use nix::sys::signal::{kill, Signal};
        kill(nix::unistd::Pid::from_raw(self.pid()), Signal::SIGHUP).unwrap();
    }

    /// `POST /config/reload` with the token; the status and the report.
    pub fn reload(&self) -> (u16, serde_json::Value) {
        let (status, body) = self.admin_call("POST", "/config/reload");
        let report = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("reload answered {status} {body:?}: {e}"));
        (status, report)
    }

    /// `GET /status` as JSON.
    pub fn status(&self) -> serde_json::Value {
        let (status, body) = http(&self.admin, "GET", "/status");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The value of one sample on `/metrics`, named with its labels as
    /// exported (`ferry_config_reloads_total{result="failed"}`); `None` when
    /// absent.
    pub fn metric(&self, name_and_labels: &str) -> Option<f64> {
        metric(&self.admin, name_and_labels)
    }

    /// A balancer's `GET /backends` entry for the worker `name` (behind
    /// its first listener).
    pub fn backend(&self, name: &str) -> serde_json::Value {
        let (status, body) = self.admin_call("GET", "/backends");
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["backend"] == name)
            .unwrap_or_else(|| panic!("no backend {name} in {body}"))
            .clone()
    }

    /// Waits (bounded by `wait`) until a balancer's view of the worker
    /// `name` satisfies `want`; how long that took.
    pub fn wait_backend(
        &self,
        name: &str,
        wait: Duration,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> Duration {
        let started = std::time::Instant::now();
        loop {
            let b = self.backend(name);
            if want(&b) {
                return started.elapsed();
            }
            assert!(started.elapsed() < wait, "after {wait:?}: {b}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (bounded by `wait`) until the sample `name_and_labels` on
    /// `/metrics` satisfies `want` (`None`: absent); its value then.
    pub fn wait_metric(
        &self,
        name_and_labels: &str,
        wait: Duration,
        want: impl Fn(Option<f64>) -> bool,
    ) -> Option<f64> {
        let started = std::time::Instant::now();
        loop {
            let value = self.metric(name_and_labels);
            if want(value) {
                return value;
            }
            assert!(
                started.elapsed() < wait,
                "{name_and_labels} is {value:?} after {wait:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process's resident memory (VmRSS), in KiB.
    pub fn resident_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An argon2 hash of `password`, as `ferry user hash` makes it.
pub fn user_hash(password: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(ferry_bin())
        .args(["user", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run ferry user hash");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "ferry user hash failed");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The value of one sample on the `/metrics` of the admin endpoint at
/// `base`, named with its labels as exported; `None` when absent.
pub fn metric(base: &str, name_and_labels: &str) -> Option<f64> {
    let (_, body) = http(base, "GET", "/metrics");
    body.lines()
        .find(|l| {
            l.strip_prefix(name_and_labels)
                .is_some_and(|rest| rest.starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// One HTTP/1.1 request to an admin endpoint (`http://ADDR`); the status
/// and the body.
pub fn http(base: &str, method: &str, path: &str) -> (u16, String) {
    http_with(base, method, path, None)
}

/// The same, with a bearer token if given.
pub fn http_with(base: &str, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// What a `ferry send` run printed and how it exited.
#[derive(Debug)]
pub struct SendRun {
    /// The exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl SendRun {
    /// The last line of standard output: which recipient got what.
    pub fn last_line(&self) -> &str {
        self.stdout.lines().last().unwrap_or("")
    }
}

/// Runs `ferry send ARGS` with extra environment variables and `stdin`
/// as its standard input; killed if it runs longer than a minute.
pub fn ferry_send(args: &[&str], env: &[(&str, &str)], stdin: &str) -> SendRun {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let started = std::time::Instant::now();
    let mut child = Command::new(ferry_bin())
        .arg("send")
        .args(args)
        .env_remove("FERRY_SEND_PASSWORD")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("start ferry send");
    let mut input = child.stdin.take().unwrap();
    // The child may exit without reading it: a broken pipe is fine.
    let _ = input.write_all(stdin.as_bytes());
    drop(input);
    let deadline = started + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    SendRun {
        code: status.code(),
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
        elapsed: started.elapsed(),
    }
}
