//! `ferry up`'s child processes: each role is the `ferry` binary started
//! again, in a process group of its own, its output in `DATA/logs/NAME.log`,
//! stopped with SIGTERM (and by the kernel if `ferry up` dies).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Set in the environment of `ferry up`'s children: the pid of the
/// `ferry up` that started them (see [`exit_with_parent`]).
pub const PARENT_ENV: &str = "FERRY_UP_PID";

/// How long stopping waits for the children's graceful drain before
/// SIGKILL: longer than a worker's own drain, so a worker is never killed
/// between a next hop's 250 and recording it (which would deliver twice).
const STOP_LIMIT: Duration = Duration::from_secs(crate::worker::DRAIN_LIMIT.as_secs() + 5);

/// How long a child may take to say it is ready.
const START_LIMIT: Duration = Duration::from_secs(30);

/// What a child runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    Control,
    Worker,
    Balancer,
}

/// A child and what it printed at start.
pub struct Node {
    pub name: String,
    pub role: Role,
    pub child: Child,
    /// Its SMTP addresses (`ROLE smtp ADDR`).
    pub smtp: Vec<String>,
    /// Its admin URL (`ROLE admin URL`).
    pub admin: String,
    /// The control plane's gRPC address (`control grpc ADDR`).
    pub grpc: String,
}

impl Node {
    pub fn pid(&self) -> Option<i32> {
        self.child.id().and_then(|p| i32::try_from(p).ok())
    }
}

/// Makes the child exit with the `ferry up` that started it: called first
/// thing in `main`. When [`PARENT_ENV`] is set, asks the kernel for SIGTERM
/// (a graceful drain) once the parent is gone, then checks that the parent
/// did not die before that request (then it exits at once). A no-op for a
/// process that `ferry up` did not start.
pub fn exit_with_parent() {
    let Some(parent) = std::env::var(PARENT_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return;
    };
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM) {
        say!("ferry: cannot ask to be stopped with ferry up ({e}); stop this process yourself");
        return;
    }
    if nix::unistd::getppid() != Pid::from_raw(parent) {
        say!("ferry: the ferry up that started this process (pid {parent}) is gone; exiting");
        std::process::exit(1);
    }
}

/// Starts `ferry ARGS` as `name` and waits (at most [`START_LIMIT`]) for
/// its `ROLE ready` line, noting the addresses it prints before.
pub async fn start(
    name: &str,
    role: Role,
    args: &[String],
    logs: &Path,
    log_json: bool,
) -> anyhow::Result<Node> {
    let exe = std::env::current_exe().context("locating the ferry binary")?;
    let log_path = logs.join(format!("{name}.log"));
    let mut log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let stderr = log.try_clone()?;
    let mut command = Command::new(exe);
    if log_json {
        command.arg("--log-json");
    }
    let mut child = command
        .args(args)
        .env(PARENT_ENV, std::process::id().to_string())
        .stdin(Stdio::null())
        // A group of its own: Ctrl-C and a terminal's hangup reach only
        // `ferry up`, which stops (SIGTERM) each child once, or applies
        // the config (SIGHUP), itself.
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let Some(stdout) = child.stdout.take() else {
        bail!("{name}: no stdout")
    };
    let mut lines = BufReader::new(stdout).lines();
    let mut node = Node {
        name: name.into(),
        role,
        child,
        smtp: Vec::new(),
        admin: String::new(),
        grpc: String::new(),
    };
    let ready = tokio::time::timeout(START_LIMIT, async {
        while let Some(line) = lines.next_line().await? {
            copy_line(&mut log, &line);
            let mut words = line.split_whitespace().skip(1);
            match (words.next(), words.next()) {
                (Some("smtp"), Some(addr)) => node.smtp.push(addr.to_string()),
                (Some("admin"), Some(url)) => node.admin = url.to_string(),
                (Some("grpc"), Some(addr)) => node.grpc = addr.to_string(),
                (Some("ready"), None) => return Ok(true),
                _ => {}
            }
        }
        Ok::<_, std::io::Error>(false)
    })
    .await;
    if !matches!(ready, Ok(Ok(true))) {
        let _ = node.child.start_kill();
        let _ = node.child.wait().await;
        let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(10).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{name} did not start; the end of {}:\n{}",
            log_path.display(),
            tail.join("\n")
        );
    }
    // Keep its stdout flowing into the log so it never blocks on a full pipe.
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            copy_line(&mut log, &line);
        }
    });
    Ok(node)
}

/// Appends one of the child's stdout lines to its log. One write call for
/// the line and its newline: the child's own log lines go to the same
/// file (O_APPEND) and must not land between the two.
fn copy_line(log: &mut File, line: &str) {
    let _ = log.write_all(format!("{line}\n").as_bytes());
}

/// The name and exit status of the first child to exit.
pub async fn first_exit(nodes: &mut [Node]) -> (String, String) {
    if nodes.is_empty() {
        return std::future::pending().await;
    }
    let waits = nodes.iter_mut().map(|n| {
        Box::pin(async move {
            let status = n.child.wait().await;
            (
                n.name.clone(),
                status.map_or_else(|e| e.to_string(), |s| s.to_string()),
            )
        })
    });
    select_all(waits).await
}

/// The first of several futures to finish.
async fn select_all<F, T>(futures: impl IntoIterator<Item = F>) -> T
where
    F: std::future::Future<Output = T> + Unpin,
{
    let mut futures: Vec<F> = futures.into_iter().collect();
    std::future::poll_fn(|cx| {
        for f in futures.iter_mut() {
            if let std::task::Poll::Ready(v) = std::pin::Pin::new(f).poll(cx) {
                return std::task::Poll::Ready(v);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Stops every child: the nodes first, then the control plane, so that
/// no node spends its drain reconnecting to a control plane that went
/// first. Each group gets SIGTERM at once (a graceful drain), then
/// SIGKILL for whoever still runs after [`STOP_LIMIT`].
pub async fn stop_all(nodes: &mut [Node]) {
    let (mut control, mut rest): (Vec<&mut Node>, Vec<&mut Node>) =
        nodes.iter_mut().partition(|n| n.role == Role::Control);
    stop_group(&mut rest).await;
    stop_group(&mut control).await;
}

async fn stop_group(nodes: &mut [&mut Node]) {
    for node in nodes.iter() {
        if let Some(pid) = node.pid() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
    let deadline = tokio::time::Instant::now() + STOP_LIMIT;
    for node in nodes.iter_mut() {
        if tokio::time::timeout_at(deadline, node.child.wait())
            .await
            .is_err()
        {
            say!("ferry up: {} did not stop in time; killing it", node.name);
            let _ = node.child.kill().await;
        }
    }
}
