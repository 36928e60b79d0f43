//! `ferry up`: the demo cluster on loopback, each role its own child
//! process, with the example config and a throwaway CA and certificate.
//! The example is written to `DATA/ferry.toml` only when that file does
//! not exist, so edits survive a restart; SIGHUP makes every node re-read
//! it, and `ferry up` prints how each reload went.
//!
//! The children's output goes to `DATA/logs/NAME.log`, not to our
//! terminal, so the startup text stays readable. SIGTERM and SIGINT stop
//! every child; if `ferry up` itself dies (SIGKILL, a crash), each child
//! gets SIGTERM from the kernel (`PR_SET_PDEATHSIG`, see [`exit_with_parent`]).

use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_config::ClusterConfig;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

use crate::demo_certs;

/// A line to standard error. Errors are ignored: a terminal that went
/// away (EIO after a hangup) is no reason to stop, let alone to panic and
/// take every node down unmanaged.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// A line to standard output, errors ignored like [`say`]'s.
macro_rules! show {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

const EXAMPLE_CONFIG: &str = include_str!("../../../deploy/examples/ferry.toml");

/// Set in the environment of `ferry up`'s children: the pid of the
/// `ferry up` that started them (see [`exit_with_parent`]).
pub const PARENT_ENV: &str = "FERRY_UP_PID";

/// How long stopping waits for the children's graceful drain before
/// SIGKILL: longer than a worker's own drain, so a worker is never killed
/// between a next hop's 250 and recording it (which would deliver twice).
const STOP_LIMIT: Duration = Duration::from_secs(crate::worker::DRAIN_LIMIT.as_secs() + 5);

/// What `ferry up` was asked to run.
pub struct Args {
    /// Config, certificates, token, spools and logs.
    pub data: PathBuf,
    /// A cluster config to run instead of the example (its
    /// `[[balancer.backends]]` are the workers started).
    pub config: Option<PathBuf>,
    /// The balancer's address.
    pub listen: IpAddr,
    /// Children log JSON lines.
    pub log_json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Worker,
    Balancer,
}

/// A child node and what it printed at start.
struct Node {
    name: String,
    role: Role,
    child: Child,
    smtp: Vec<String>,
    admin: String,
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

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Before any child exists: a signal from now on stops them all.
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("handling SIGHUP")?;

    let Args {
        data,
        config: config_file,
        listen,
        log_json,
    } = args;
    let logs = data.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let config_path = data.join("ferry.toml");
    let text = match &config_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            std::fs::write(&config_path, &text).context("writing the config")?;
            text
        }
        // The user's edits survive a restart: the example is written only
        // when there is no config yet.
        None => match std::fs::read_to_string(&config_path) {
            Ok(text) => {
                say!(
                    "ferry up: running {} (delete it to start again from the example)",
                    config_path.display()
                );
                text
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::write(&config_path, EXAMPLE_CONFIG).context("writing the config")?;
                EXAMPLE_CONFIG.to_string()
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", config_path.display())),
        },
    };
    let config = ClusterConfig::parse(&config_path.display().to_string(), &text, &data)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(balancer) = &config.balancer else {
        bail!("the config has no [balancer] section: nothing for ferry up to start");
    };
    let workers: Vec<(String, IpAddr)> = balancer
        .backends
        .iter()
        .map(|b| (b.name.clone(), b.address))
        .collect();
    let mut names = vec!["localhost".to_string(), listen.to_string()];
    for (name, address) in &workers {
        names.push(hostname(name));
        names.push(address.to_string());
    }
    names.dedup();
    demo_certs::ensure(&data, &names)?;
    let token_file = data.join("admin.token");
    crate::token::ensure(&token_file)?;

    let config_arg = config_path.display().to_string();
    let token_arg = token_file.display().to_string();
    let mut nodes = Vec::new();
    for (name, address) in &workers {
        let worker_args = [
            "worker",
            "--config",
            &config_arg,
            "--listen",
            &address.to_string(),
            "--data",
            &data.join(name).display().to_string(),
            "--admin",
            "127.0.0.1:0",
            "--hostname",
            &hostname(name),
            "--admin-token-file",
            &token_arg,
        ]
        .map(String::from);
        let node = start_node(name, Role::Worker, &worker_args, &logs, log_json).await;
        let node = started(node, &mut nodes).await?;
        nodes.push(node);
    }
    let balancer_args = [
        "balancer",
        "--config",
        &config_arg,
        "--listen",
        &listen.to_string(),
        "--admin",
        "127.0.0.1:0",
        "--admin-token-file",
        &token_arg,
    ]
    .map(String::from);
    let node = start_node("balancer", Role::Balancer, &balancer_args, &logs, log_json).await;
    let node = started(node, &mut nodes).await?;
    nodes.push(node);

    print_startup(&data, &nodes, balancer, &listen, text == EXAMPLE_CONFIG);

    // A worker that dies leaves the others serving (that is the point of
    // the balancer); the balancer dying ends the demo.
    let stopped_by_user = loop {
        tokio::select! {
            _ = term.recv() => break true,
            _ = int.recv() => break true,
            _ = hup.recv() => reload_all(&nodes, &config_path),
            (name, status) = first_exit(&mut nodes) => {
                let role = nodes.iter().find(|n| n.name == name).map(|n| n.role);
                nodes.retain(|n| n.name != name);
                let log = logs.join(format!("{name}.log"));
                if role == Some(Role::Balancer) {
                    say!("ferry up: the balancer exited ({status}; see {}); stopping the workers", log.display());
                    break false;
                }
                say!("ferry up: {name} exited ({status}; see {}); {}", log.display(), after_worker_exit(&workers_left(&nodes)));
            }
        }
    };
    say!("ferry up: stopping every node");
    stop_all(&mut nodes).await;
    Ok(if stopped_by_user {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Forwards SIGHUP to every node, then says how each reload went (from
/// the `config.last_reload` of each node's `/status`, read until it
/// changes, at most [`RELOAD_WAIT`]). The waiting runs on its own thread:
/// meanwhile `ferry up` still answers Ctrl-C and notices a node's exit.
fn reload_all(nodes: &[Node], config: &Path) {
    say!("ferry up: SIGHUP: every node re-reads {}", config.display());
    let nodes: Vec<(String, String, Option<i32>)> = nodes
        .iter()
        .map(|n| {
            let pid = n.child.id().and_then(|p| i32::try_from(p).ok());
            (n.name.clone(), n.admin.clone(), pid)
        })
        .collect();
    tokio::task::spawn_blocking(move || {
        let before: Vec<_> = nodes
            .iter()
            .map(|(_, admin, _)| last_reload(admin))
            .collect();
        for (_, _, pid) in &nodes {
            if let Some(pid) = pid {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGHUP);
            }
        }
        let deadline = std::time::Instant::now() + RELOAD_WAIT;
        for ((name, admin, _), before) in nodes.iter().zip(before) {
            let report = loop {
                let now = last_reload(admin);
                if now.is_some() && now != before {
                    break now;
                }
                if std::time::Instant::now() >= deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            say!("ferry up: {name}: {}", describe_reload(report.as_ref()));
        }
    });
}

/// How long `ferry up` waits for each node to report its reload.
const RELOAD_WAIT: Duration = Duration::from_secs(10);

/// The node's last reload report, from its `/status`.
fn last_reload(admin: &str) -> Option<serde_json::Value> {
    let addr = admin.trim_start_matches("http://");
    // A node that does not answer (stopped, overloaded) must not hold up
    // the report of the others past RELOAD_WAIT by much.
    let (status, body) =
        crate::queue::request_within(addr, None, "GET", "/status", Duration::from_secs(1)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok().filter(|_| status == 200)?;
    v.get("config")?
        .get("last_reload")
        .filter(|r| !r.is_null())
        .cloned()
}

/// One line for a reload report: the version and what changed, or the
/// errors with the old version serving.
fn describe_reload(report: Option<&serde_json::Value>) -> String {
    let Some(r) = report else {
        return "no reload reported yet; see its log".into();
    };
    let list = |key: &str| -> Vec<String> {
        r.get(key)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let version = r.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    if r.get("result").and_then(|v| v.as_str()) == Some("ok") {
        let changes = list("changes");
        match changes.is_empty() {
            true => format!("config version {version}, no changes"),
            false => format!("config version {version}: {}", changes.join(", ")),
        }
    } else {
        format!(
            "reload failed, version {version} keeps serving:\n    {}",
            list("errors").join("\n    ")
        )
    }
}

/// The name a worker gives itself, and that its certificate holds.
fn hostname(worker: &str) -> String {
    format!("{worker}.ferry.test")
}

/// What the balancer does now that a worker is gone, given the workers
/// still running.
fn after_worker_exit(left: &[&str]) -> String {
    match left {
        [] => "no worker is left: the balancer answers 421 until you stop the demo".into(),
        [one] => format!("the balancer sends new sessions to {one}, the one worker left"),
        many => format!(
            "the balancer sends new sessions to the other workers ({})",
            many.join(", ")
        ),
    }
}

fn workers_left(nodes: &[Node]) -> Vec<&str> {
    nodes
        .iter()
        .filter(|n| n.role == Role::Worker)
        .map(|n| n.name.as_str())
        .collect()
}

/// A node that failed to start stops the ones already running.
async fn started(node: anyhow::Result<Node>, running: &mut [Node]) -> anyhow::Result<Node> {
    match node {
        Ok(n) => Ok(n),
        Err(e) => {
            stop_all(running).await;
            Err(e)
        }
    }
}

fn print_startup(
    data: &Path,
    nodes: &[Node],
    balancer: &ferry_config::BalancerConfig,
    listen: &IpAddr,
    example: bool,
) {
    show!();
    show!(
        "Ferry is up: a demo cluster on loopback (data in {})",
        data.display()
    );
    for n in nodes {
        show!(
            "  {:<10} pid {:<7} smtp {}  admin {}  metrics {}/metrics",
            n.name,
            n.child.id().unwrap_or(0),
            n.smtp.join(", "),
            n.admin,
            n.admin
        );
    }
    show!("Each node's log: {}/NAME.log", data.join("logs").display());
    show!(
        "Admin operations (queue, drain) need the bearer token in {}",
        data.join("admin.token").display()
    );
    show!(
        "TLS clients can verify every node against the demo CA in {}",
        data.join(demo_certs::CA_FILE).display()
    );
    let port = |i: usize| balancer.listeners.get(i).map_or(0, |l| l.port);
    let (smtp, submission) = (port(0), port(1));
    show!("Through the balancer:");
    if example {
        show!("  internal relay:      {listen}:{smtp} (anonymous, to @example.test)");
        show!("  authenticated relay: {listen}:{submission} (STARTTLS, then AUTH as scanner / ferry-demo)");
        show!(
            "  anonymous relay:     {listen}:{smtp} from source address 127.0.0.30 (to anywhere)"
        );
    } else {
        // Not the example: say only what the config says.
        for l in &balancer.listeners {
            show!("  {:<20} {listen}:{}", format!("{}:", l.name), l.port);
        }
        show!(
            "  (which connector serves a client: ferry config explain FILE --client IP --port N)"
        );
    }
    let direct: Vec<String> = nodes
        .iter()
        .filter(|n| n.role == Role::Worker)
        .filter_map(|n| n.smtp.first().cloned())
        .collect();
    match balancer.source {
        Some(source) => show!(
            "Directly to a worker: {} (the balancer connects from {source}, the workers' only trusted proxy)",
            direct.join(", ")
        ),
        None => show!("Directly to a worker: {}", direct.join(", ")),
    }
    show!(
        "To change the config: edit {}, then kill -HUP {} (every node reloads it)",
        data.join("ferry.toml").display(),
        std::process::id()
    );
    show!("Press Ctrl-C to stop (SIGTERM stops it too).");
}

async fn start_node(
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
        // `ferry up`, which stops (SIGTERM) or reloads (SIGHUP) each node
        // once, itself.
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
    };
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            copy_line(&mut log, &line);
            let mut words = line.split_whitespace().skip(1);
            match (words.next(), words.next()) {
                (Some("smtp"), Some(addr)) => node.smtp.push(addr.to_string()),
                (Some("admin"), Some(url)) => node.admin = url.to_string(),
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

async fn first_exit(nodes: &mut [Node]) -> (String, String) {
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
    futures_select_all(waits).await
}

/// The first of several futures to finish.
async fn futures_select_all<F, T>(futures: impl IntoIterator<Item = F>) -> T
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

/// SIGTERM to every node at once (a graceful drain), then SIGKILL to the
/// ones still running after [`STOP_LIMIT`].
async fn stop_all(nodes: &mut [Node]) {
    for node in nodes.iter() {
        if let Some(pid) = node.child.id().and_then(|p| i32::try_from(p).ok()) {
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

#[cfg(test)]
mod tests {
    use super::{after_worker_exit, describe_reload};

    #[test]
    fn a_reload_is_described_by_its_changes_or_its_errors() {
        let ok = serde_json::json!({"result": "ok", "version": 3, "changes": ["~ connector \"Default\"", "+ user \"fax\""]});
        assert_eq!(
            describe_reload(Some(&ok)),
            "config version 3: ~ connector \"Default\", + user \"fax\""
        );
        let same = serde_json::json!({"result": "ok", "version": 4, "changes": []});
        assert_eq!(describe_reload(Some(&same)), "config version 4, no changes");
        let bad = serde_json::json!({"result": "failed", "version": 4, "errors": ["f.toml:3:7: expected `=`"]});
        assert_eq!(
            describe_reload(Some(&bad)),
            "reload failed, version 4 keeps serving:\n    f.toml:3:7: expected `=`"
        );
        assert_eq!(describe_reload(None), "no reload reported yet; see its log");
    }

    #[test]
    fn a_worker_exit_names_the_workers_left_or_says_none_is() {
        assert_eq!(
            after_worker_exit(&["worker-1"]),
            "the balancer sends new sessions to worker-1, the one worker left"
        );
        assert_eq!(
            after_worker_exit(&["worker-1", "worker-3"]),
            "the balancer sends new sessions to the other workers (worker-1, worker-3)"
        );
        assert_eq!(
            after_worker_exit(&[]),
            "no worker is left: the balancer answers 421 until you stop the demo"
        );
    }
}
