//! The control plane as a real process: certificates made with
//! `ferry cert`, `ferry control` started on port 0 and its printed
//! addresses read, `ferry ctl` run as an admin would.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::binary::ferry_bin;

/// A cluster CA and certificates in a directory, made by `ferry cert`:
/// `ca/ca.crt`, and `NAME.crt`/`NAME.key` for each one issued.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// `ferry cert init DIR/ca`.
    pub fn new(dir: &Path) -> Self {
        let out = ferry(&["cert", "init"], &[&dir.join("ca")]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    /// `ferry cert issue --ca DIR/ca --role KIND NAME --out DIR` (KIND:
    /// admin, node or control; a control certificate for 127.0.0.1).
    pub fn issue(&self, kind: &str, name: &str) -> &Self {
        let ca = self.dir.join("ca");
        let mut args = vec!["cert", "issue", "--ca"];
        let ca = ca.to_str().unwrap();
        args.push(ca);
        args.extend(["--role", kind, name, "--out", self.dir.to_str().unwrap()]);
        if kind == "control" {
            args.extend(["--host", "127.0.0.1"]);
        }
        let out = ferry(&args, &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        self
    }

    /// Issues a node certificate for `id` (unless it was, for a restart)
    /// and returns the flags a node subscribes with: `--node-id ID --ca …
    /// --cert … --key …`.
    pub fn node_flags(&self, id: &str) -> Vec<String> {
        if !self.cert(id).exists() {
            self.issue("node", id);
        }
        let s = |p: PathBuf| p.display().to_string();
        vec![
            "--node-id".into(),
            id.into(),
            "--ca".into(),
            s(self.ca()),
            "--cert".into(),
            s(self.cert(id)),
            "--key".into(),
            s(self.key(id)),
        ]
    }

    /// The flags of a node `id` subscribed to the control plane at `url`:
    /// `--control URL --listen LISTEN --data DATA` and [`Pki::node_flags`].
    pub fn subscribed(&self, url: &str, id: &str, listen: &str, data: &Path) -> Vec<String> {
        let mut args: Vec<String> = vec!["--control".into(), url.into(), "--listen".into()];
        args.extend([listen.into(), "--data".into(), data.display().to_string()]);
        args.extend(self.node_flags(id));
        args
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca/ca.crt")
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.crt"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }
}

/// The rows of a table `ferry ctl` prints (left-aligned columns, two
/// spaces apart, under `header`), each cell by its column's title. A
/// column starts where its title does; the last runs to the end of the line.
fn table_rows<'a>(
    header: &str,
    lines: impl Iterator<Item = &'a str>,
) -> Vec<BTreeMap<String, String>> {
    let mut columns: Vec<(usize, String)> = Vec::new();
    let mut start = 0;
    for cell in header.split("  ").filter(|c| !c.trim().is_empty()) {
        let at = header[start..].find(cell.trim()).unwrap() + start;
        columns.push((at, cell.trim().to_string()));
        start = at + cell.trim().len();
    }
    lines
        .map(|line| {
            columns
                .iter()
                .enumerate()
                .map(|(i, (at, name))| {
                    let end = columns.get(i + 1).map_or(line.len(), |(next, _)| *next);
                    let cell = line.get(*at..end.min(line.len())).unwrap_or("");
                    (name.clone(), cell.trim().to_string())
                })
                .collect()
        })
        .collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `ferry ARGS PATHS…` to completion.
fn ferry(args: &[&str], paths: &[&Path]) -> Output {
    Command::new(ferry_bin())
        .args(args)
        .args(paths)
        .output()
        .expect("run ferry")
}

/// A running `ferry control`.
pub struct ControlProcess {
    child: Child,
    /// `https://ADDR` as it printed `control grpc ADDR`.
    pub url: String,
    pub admin: String,
}

impl ControlProcess {
    /// Starts `ferry control --store STORE` with the `control` certificate
    /// of `pki`; its log goes to `log`. Waits (bounded) for `control
    /// ready`.
    pub fn start(store: &str, pki: &Pki, log: &Path) -> Self {
        Self::start_on("127.0.0.1:0", store, pki, log, &[])
    }

    /// As [`ControlProcess::start`], with more flags (`--grace 2s`).
    pub fn start_with(store: &str, pki: &Pki, log: &Path, extra: &[&str]) -> Self {
        Self::start_on("127.0.0.1:0", store, pki, log, extra)
    }

    /// The same on `listen` (`IP:PORT`) with `extra` flags: a restart on
    /// the address the nodes know, with [`ControlProcess::listen`] of the
    /// one before.
    pub fn start_on(listen: &str, store: &str, pki: &Pki, log: &Path, extra: &[&str]) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut child = Command::new(ferry_bin())
            .args(["control", "--listen", listen, "--store", store])
            .args(extra)
            .arg("--ca")
            .arg(pki.ca())
            .arg("--cert")
            .arg(pki.cert("control"))
            .arg("--key")
            .arg(pki.key("control"))
            .args(["--admin", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start ferry control");
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
        let mut process = ControlProcess {
            child,
            url: String::new(),
            admin: String::new(),
        };
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("ferry control did not report ready in time");
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["control", "grpc", addr] => process.url = format!("https://{addr}"),
                ["control", "admin", url] => process.admin = url.to_string(),
                ["control", "ready"] => break,
                _ => {}
            }
        }
        process
    }

    /// `ferry ctl --control URL` as admin `admin` of `pki`, with `args`;
    /// the exit code, standard output and standard error.
    pub fn ctl(&self, pki: &Pki, admin: &str, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(ferry_bin())
            .args(["ctl", "--control", &self.url])
            .arg("--ca")
            .arg(pki.ca())
            .arg("--cert")
            .arg(pki.cert(admin))
            .arg("--key")
            .arg(pki.key(admin))
            .args(args)
            .output()
            .expect("run ferry ctl");
        (
            out.status.code().unwrap_or(-1),
            text(&out.stdout),
            text(&out.stderr),
        )
    }

    /// The `IP:PORT` it serves gRPC on.
    pub fn listen(&self) -> &str {
        self.url.trim_start_matches("https://")
    }

    /// The value of one sample on its `/metrics`
    /// (`ferry_control_snapshots_sent_total{sync="first"}`).
    pub fn metric(&self, name_and_labels: &str) -> Option<f64> {
        crate::binary::metric(&self.admin, name_and_labels)
    }

    /// `ferry ctl nodes` as admin `admin`: the current version and a row
    /// per node, each column by its header (`NODE`, `APPLIED`, `LAG`,
    /// `LAST NACK`…). Panics when the command fails.
    pub fn nodes(&self, pki: &Pki, admin: &str) -> (u64, Vec<BTreeMap<String, String>>) {
        let (code, out, err) = self.ctl(pki, admin, &["nodes"]);
        assert_eq!(code, 0, "ferry ctl nodes: {out}{err}");
        let mut lines = out.lines();
        let current = lines
            .next()
            .and_then(|l| l.strip_prefix("current version "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no current version in {out:?}"));
        let header = lines.next().unwrap_or_default().to_string();
        (current, table_rows(&header, lines))
    }

    /// SIGKILL, and reap: the control plane dies without a word to anyone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGHUP.
    pub fn hang_up(&self) {
        use nix::sys::signal::{kill, Signal};
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        kill(pid, Signal::SIGHUP).unwrap();
    }

    /// Whether the process has exited.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// SIGTERM, and the exit status (bounded wait).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        use nix::sys::signal::{kill, Signal};
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        kill(pid, Signal::SIGTERM).ok()?;
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

impl Drop for ControlProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
