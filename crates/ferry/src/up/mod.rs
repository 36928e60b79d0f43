//! `ferry up`: the demo cluster on loopback, each role its own child
//! process: a control plane (`ferry control`, its history in
//! `DATA/control`), then two workers and the balancer, all configured
//! through it, with the control-plane certificates it makes in
//! `DATA/pki` and the demo's SMTP certificates in `DATA/certs`.
//!
//! `DATA/ferry.toml` is the config: the example, written only when that
//! file does not exist, so edits survive a restart. It is applied through
//! the control plane at start (version 1 the first time; on a restart
//! only if it changed, as the next version), and again on SIGHUP, after
//! which `ferry up` prints the result and each node's outcome. `ferry ctl`
//! with the admin certificate, whose command line `ferry up` prints, does
//! the same and more.
//!
//! The children's output goes to `DATA/logs/NAME.log`, not to our
//! terminal, so the startup text stays readable. SIGTERM and SIGINT stop
//! every child; if `ferry up` itself dies (SIGKILL, a crash), each child
//! gets SIGTERM from the kernel (`PR_SET_PDEATHSIG`, see
//! [`exit_with_parent`]).

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

mod children;
mod cluster;
mod pki;
mod startup;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use ferry_config::ClusterConfig;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Mutex;

pub use children::exit_with_parent;
use children::{Node, Role};
use cluster::{Applied, Control};
use pki::Pki;

use crate::demo_certs;

const EXAMPLE_CONFIG: &str = include_str!("../../../../deploy/examples/ferry.toml");

/// The names `ferry up` takes for itself (node IDs, certificate, log and
/// data directory names): no worker may have one.
const RESERVED: [&str; 3] = ["balancer", pki::CONTROL, pki::ADMIN];

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

/// The cluster once every node runs.
struct Running {
    /// The admin's connection to the control plane.
    control: Control,
    /// The control plane's `https://` URL.
    url: String,
    /// The version every node started with, and its config.
    version: u64,
    config: ClusterConfig,
    /// That config is the example, untouched.
    example: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Before any child exists: a signal from now on stops them all.
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("handling SIGHUP")?;

    let logs = args.data.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let config_path = args.data.join("ferry.toml");
    write_config(&config_path, args.config.as_deref())?;

    let mut nodes = Vec::new();
    let running = match start_all(&args, &config_path, &mut nodes).await {
        Ok(r) => r,
        Err(e) => {
            children::stop_all(&mut nodes).await;
            return Err(e);
        }
    };
    let Some(balancer) = &running.config.balancer else {
        // start_all checked it before starting anything.
        children::stop_all(&mut nodes).await;
        bail!("the config has no [balancer] section");
    };
    startup::print(&startup::Startup {
        data: &args.data,
        nodes: &nodes,
        balancer,
        listen: &args.listen,
        example: running.example,
        url: &running.url,
        pki: &Pki::new(args.data.join("pki")),
        version: running.version,
    });
    let control = Arc::new(Mutex::new(running.control));

    // A worker that dies leaves the others serving (that is the point of
    // the balancer); the balancer dying ends the demo. The control plane
    // dying does not: the nodes keep serving the version they have (from
    // their last-good copy if they restart), which is what an outage of
    // the control plane looks like in production and what a newcomer who
    // kills it wants to see, rather than a demo that falls over.
    let stopped_by_user = loop {
        tokio::select! {
            _ = term.recv() => break true,
            _ = int.recv() => break true,
            _ = hup.recv() => {
                if !nodes.iter().any(|n| n.role == Role::Control) {
                    say!("ferry up: SIGHUP: the control plane is not running (it exited); restart ferry up to change the config");
                    continue;
                }
                let watch = nodes
                    .iter()
                    .filter(|n| n.role != Role::Control)
                    .map(|n| (n.name.clone(), n.admin.clone()))
                    .collect();
                tokio::spawn(apply_on_hangup(Arc::clone(&control), config_path.clone(), watch));
            }
            (name, status) = children::first_exit(&mut nodes) => {
                let role = nodes.iter().find(|n| n.name == name).map(|n| n.role);
                nodes.retain(|n| n.name != name);
                let log = logs.join(format!("{name}.log"));
                match role {
                    Some(Role::Balancer) => {
                        say!("ferry up: the balancer exited ({status}; see {}); stopping the other nodes", log.display());
                        break false;
                    }
                    Some(Role::Control) => say!(
                        "ferry up: the control plane exited ({status}; see {}); the nodes keep serving \
                         the version they have, but nothing can change it (ferry ctl, SIGHUP) until \
                         ferry up is restarted",
                        log.display()
                    ),
                    _ => say!(
                        "ferry up: {name} exited ({status}; see {}); {}",
                        log.display(),
                        after_worker_exit(&workers_left(&nodes))
                    ),
                }
            }
        }
    };
    say!("ferry up: stopping every node");
    children::stop_all(&mut nodes).await;
    Ok(if stopped_by_user {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Puts the config in `path`: a copy of `given`, else the example unless
/// there is a config already (the user's edits survive a restart).
fn write_config(path: &Path, given: Option<&Path>) -> anyhow::Result<()> {
    if let Some(given) = given {
        let text = std::fs::read_to_string(given)
            .with_context(|| format!("reading {}", given.display()))?;
        return std::fs::write(path, text).context("writing the config");
    }
    match std::fs::metadata(path) {
        Ok(_) => {
            say!(
                "ferry up: running {} (delete it to start again from the example)",
                path.display()
            );
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(path, EXAMPLE_CONFIG).context("writing the config")
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Starts the control plane, applies the config through it, then starts
/// the workers and the balancer its current version names. Every child
/// started is in `nodes`, also on an error (for the caller to stop).
async fn start_all(
    args: &Args,
    config_path: &Path,
    nodes: &mut Vec<Node>,
) -> anyhow::Result<Running> {
    let data = &args.data;
    let logs = data.join("logs");
    let pki = Pki::new(data.join("pki"));
    pki.ensure_control()?;
    let control = children::start(
        "control",
        Role::Control,
        &control_args(data, &pki),
        &logs,
        args.log_json,
    )
    .await?;
    let url = format!("https://{}", control.grpc);
    nodes.push(control);
    let mut admin = Control::connect(&url, &pki).await?;
    let (version, text) = apply_at_start(&mut admin, config_path).await?;
    // What the control plane holds is what runs (the file may have been
    // refused): its workers, its ports. Relative paths are the nodes'
    // own, under --config-dir DATA.
    let config = ClusterConfig::parse(&format!("version {version}"), &text, data)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(balancer) = &config.balancer else {
        bail!("version {version} has no [balancer] section: nothing for ferry up to start");
    };
    let workers: Vec<(String, IpAddr)> = balancer
        .backends
        .iter()
        .map(|b| (b.name.clone(), b.address))
        .collect();
    if let Some((name, _)) = workers.iter().find(|(n, _)| RESERVED.contains(&n.as_str())) {
        bail!("a backend is named {name:?}: ferry up takes that name for itself; rename it");
    }
    let mut ids: Vec<String> = workers.iter().map(|(n, _)| n.clone()).collect();
    ids.push("balancer".into());
    pki.ensure_nodes(&ids)?;
    let mut names = vec!["localhost".to_string(), args.listen.to_string()];
    for (name, address) in &workers {
        names.push(hostname(name));
        names.push(address.to_string());
    }
    names.dedup();
    demo_certs::ensure(data, &names)?;
    let token_file = data.join("admin.token");
    crate::token::ensure(&token_file)?;
    let token = token_file.display().to_string();

    for (name, address) in &workers {
        let mut worker_args = vec!["worker".to_string()];
        worker_args.extend(node_args(data, &pki, &url, name));
        worker_args.extend(
            [
                "--listen",
                &address.to_string(),
                "--hostname",
                &hostname(name),
                "--admin",
                "127.0.0.1:0",
                "--admin-token-file",
                &token,
            ]
            .map(String::from),
        );
        let node = children::start(name, Role::Worker, &worker_args, &logs, args.log_json).await?;
        nodes.push(node);
    }
    let mut balancer_args = vec!["balancer".to_string()];
    balancer_args.extend(node_args(data, &pki, &url, "balancer"));
    balancer_args.extend(
        [
            "--listen",
            &args.listen.to_string(),
            "--admin",
            "127.0.0.1:0",
            "--admin-token-file",
            &token,
        ]
        .map(String::from),
    );
    let node = children::start(
        "balancer",
        Role::Balancer,
        &balancer_args,
        &logs,
        args.log_json,
    )
    .await?;
    nodes.push(node);
    Ok(Running {
        control: admin,
        url,
        version,
        example: text == EXAMPLE_CONFIG,
        config,
    })
}

/// `ferry control` on a port of loopback's own choosing, its history in
/// `DATA/control`. The port changes at each start; `ferry up` tells the
/// nodes and prints the `ferry ctl` line with it.
fn control_args(data: &Path, pki: &Pki) -> Vec<String> {
    let path = |p: PathBuf| p.display().to_string();
    vec![
        "control".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--store".into(),
        format!("file:{}", data.join("control").display()),
        "--ca".into(),
        path(pki.ca()),
        "--cert".into(),
        path(pki.cert(pki::CONTROL)),
        "--key".into(),
        path(pki.key(pki::CONTROL)),
        "--admin".into(),
        "127.0.0.1:0".into(),
    ]
}

/// What makes node `name` subscribe to the control plane at `url`: its
/// node certificate, its data directory `DATA/NAME` (spool, last-good
/// copy) and `--config-dir DATA`, so that the example's relative paths
/// (`certs/ferry.crt`, `mail/…`) are the ones `ferry up` made.
fn node_args(data: &Path, pki: &Pki, url: &str, name: &str) -> Vec<String> {
    let path = |p: PathBuf| p.display().to_string();
    vec![
        "--control".into(),
        url.into(),
        "--node-id".into(),
        name.into(),
        "--ca".into(),
        path(pki.ca()),
        "--cert".into(),
        path(pki.cert(name)),
        "--key".into(),
        path(pki.key(name)),
        "--config-dir".into(),
        path(data.to_path_buf()),
        "--data".into(),
        path(data.join(name)),
    ]
}

/// Applies the config file at start (only if it changed: a restart adds
/// no version), says how that went, and returns the version to run and
/// its text: the file's, or the current one if the file was refused.
///
/// # Errors
/// The control plane cannot be asked, or it holds no version at all (the
/// file was refused on the first start).
async fn apply_at_start(control: &mut Control, file: &Path) -> anyhow::Result<(u64, String)> {
    let applied = control
        .apply_file(file, "applied by ferry up at start")
        .await;
    match &applied {
        Applied::Unchanged { version } => {
            say!(
                "ferry up: running version {version}, which is {}",
                file.display()
            );
        }
        Applied::Failed(why) => bail!("cannot apply {}: {why}", file.display()),
        other => say!("ferry up: {}", cluster::describe(file, other)),
    }
    match control.current_config().await? {
        Some(current) => Ok(current),
        None => bail!(
            "no config to run: the control plane refused {} (above)",
            file.display()
        ),
    }
}

/// SIGHUP: applies the config file through the control plane, says the
/// result, then each node's outcome. One at a time (a second SIGHUP
/// waits), and off the main loop: meanwhile `ferry up` still answers
/// Ctrl-C and notices a node's exit.
async fn apply_on_hangup(
    control: Arc<Mutex<Control>>,
    file: PathBuf,
    nodes: Vec<(String, String)>,
) {
    let mut control = control.lock().await;
    say!(
        "ferry up: SIGHUP: applying {} through the control plane",
        file.display()
    );
    let applied = control
        .apply_file(&file, "applied by ferry up on SIGHUP")
        .await;
    say!("ferry up: {}", cluster::describe(&file, &applied));
    if let Applied::Stored { version, .. } = applied {
        let _ = tokio::task::spawn_blocking(move || cluster::say_outcomes(&nodes, version)).await;
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

#[cfg(test)]
mod tests {
    use super::after_worker_exit;

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
