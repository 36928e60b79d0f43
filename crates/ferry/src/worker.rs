//! `ferry worker`: one relay worker node.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_control::proto::NodeRole;
use ferry_node::Snapshot;
use ferry_queue::Journal;
use ferry_worker::delivery::{QueueAdmin, Readiness};
use ferry_worker::{Deliverer, Worker, WorkerOptions};

use crate::controlled::{ConfigSource, Controlled, Serving};

pub struct Args {
    pub source: ConfigSource,
    pub listen: IpAddr,
    pub data: PathBuf,
    pub admin: SocketAddr,
    pub admin_token_file: Option<PathBuf>,
    pub hostname: Option<String>,
}

/// How long shutdown waits for open transactions.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// A worker built and listening, not yet running.
struct Started {
    worker: Arc<Worker>,
    deliverer: Arc<Deliverer>,
    ready: Readiness,
    api: Arc<QueueAdmin>,
    smtp: Vec<SocketAddr>,
}

/// Builds the worker from its first snapshot and opens its ports.
async fn build(
    listen: IpAddr,
    data: &std::path::Path,
    hostname: &str,
    spool: &Journal,
    snapshot: Snapshot<<Worker as ferry_node::Role>::Material>,
) -> anyhow::Result<Started> {
    let worker = Worker::new(
        WorkerOptions {
            listen,
            data_dir: data.to_path_buf(),
            hostname: hostname.to_string(),
        },
        snapshot,
        Arc::new(spool.clone()),
    );
    let deliverer = Deliverer::new(Arc::clone(worker.core()), spool.clone());
    let smtp = worker
        .start()
        .await
        .context("opening the connector ports")?;
    let ready: Readiness = {
        let w = Arc::clone(&worker);
        Arc::new(move || w.is_ready())
    };
    let api = Arc::new(QueueAdmin::new(Arc::clone(&deliverer), Arc::clone(&ready)));
    Ok(Started {
        worker,
        deliverer,
        ready,
        api,
        smtp,
    })
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Before anything slow: a SIGHUP while starting waits for the reloader
    // instead of ending the process.
    let hangups = ferry_node::watch_hangups().context("watching SIGHUP")?;
    // Every problem of the file and of the certificates it names at once.
    let source = args.source;
    let first = match &source {
        ConfigSource::File(path) => Some(crate::node::first_snapshot::<Worker>(path).await?),
        ConfigSource::Control(_) => None,
    };
    let token = args
        .admin_token_file
        .as_deref()
        .map(crate::token::read)
        .transpose()?;
    // The recorder first: the worker describes its metrics when created.
    ferry_telemetry::metrics_handle();
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating data directory {}", args.data.display()))?;
    let spool = Journal::open(&args.data)
        .with_context(|| format!("opening the spool in {}", args.data.display()))?;
    // After a crash, the first thing an admin asks: what came back?
    tracing::info!(
        messages = spool.counts().messages,
        "spool recovered: messages still to deliver"
    );
    let hostname = args.hostname.unwrap_or_else(system_hostname);
    let (worker, deliverer) = match (first, source) {
        (Some(snapshot), ConfigSource::File(path)) => {
            let s = build(args.listen, &args.data, &hostname, &spool, snapshot).await?;
            let api = crate::node::reloadable(Arc::clone(&s.worker), path, s.api, hangups);
            let admin = crate::node::Admin {
                api,
                ready: s.ready,
                token,
            };
            let shutdown = s.worker.shutdown_token();
            crate::node::start("worker", args.listen, &s.smtp, args.admin, admin, &shutdown)
                .await?;
            (s.worker, s.deliverer)
        }
        (_, ConfigSource::Control(control)) => {
            let node = Controlled::<Worker>::new(
                "worker",
                NodeRole::Worker,
                control,
                args.listen,
                &args.data,
            )
            .await?;
            let mut deliverer = None;
            let made = crate::controlled::start(
                &node,
                args.listen,
                args.admin,
                token,
                hangups,
                async |snapshot| {
                    let s = build(args.listen, &args.data, &hostname, &spool, snapshot).await?;
                    deliverer = Some(Arc::clone(&s.deliverer));
                    let core = Arc::clone(s.worker.core());
                    node.when_behind(move |behind| core.set_config_behind(behind));
                    let serving = Serving {
                        shutdown: s.worker.shutdown_token(),
                        role: s.worker,
                        api: s.api,
                        ready: s.ready,
                    };
                    Ok((serving, s.smtp))
                },
            )
            .await?;
            match (made, deliverer) {
                (Some(worker), Some(deliverer)) => (worker, deliverer),
                _ => {
                    tracing::info!("stopped before any config arrived");
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        (None, ConfigSource::File(_)) => anyhow::bail!("no config"),
    };
    let shutdown = worker.shutdown_token();
    tokio::spawn(deliverer.run(shutdown));
    worker.run(DRAIN_LIMIT).await;
    tracing::info!("worker stopped");
    Ok(ExitCode::SUCCESS)
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
