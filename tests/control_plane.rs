//! The control plane as a real process: certificates made with
//! `ferry cert`, `ferry control` started on port 0 and its printed
//! addresses read, `ferry ctl` run as an admin would.

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
    /// `ferry cert ca --out DIR/ca`.
    pub fn new(dir: &Path) -> Self {
        let out = ferry(&["cert", "ca", "--out"], &[&dir.join("ca")]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    /// `ferry cert issue --ca DIR/ca --KIND NAME --out DIR` (KIND: admin,
    /// node or control; a control certificate for 127.0.0.1).
    pub fn issue(&self, kind: &str, name: &str) -> &Self {
        let ca = self.dir.join("ca");
        let mut args = vec!["cert", "issue", "--ca"];
        let ca = ca.to_str().unwrap();
        args.push(ca);
        let flag = format!("--{kind}");
        args.extend([flag.as_str(), name, "--out", self.dir.to_str().unwrap()]);
        if kind == "control" {
            args.extend(["--host", "127.0.0.1"]);
        }
        let out = ferry(&args, &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        self
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
        Self::start_with(store, pki, log, &[])
    }

    /// As [`ControlProcess::start`], with more flags (`--grace 2s`).
    pub fn start_with(store: &str, pki: &Pki, log: &Path, extra: &[&str]) -> Self {
        let log = std::fs::File::create(log).unwrap();
        let mut child = Command::new(ferry_bin())
            .args(["control", "--listen", "127.0.0.1:0", "--store", store])
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
