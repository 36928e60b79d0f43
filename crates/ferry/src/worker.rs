//! `ferry worker`: one relay worker node.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_queue::Journal;
use ferry_worker::delivery::{QueueAdmin, Readiness};
use ferry_worker::{Deliverer, Worker, WorkerOptions};

pub struct Args {
    pub config: PathBuf,
    pub listen: IpAddr,
    pub data: PathBuf,
    pub admin: SocketAddr,
    pub admin_token_file: Option<PathBuf>,
    pub hostname: Option<String>,
}

/// How long shutdown waits for open transactions.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(60);

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Before anything slow: a SIGHUP while starting waits for the reloader
    // instead of ending the process.
    let hangups = ferry_node::watch_hangups().context("watching SIGHUP")?;
    // Every problem of the file and of the certificates it names at once.
    let snapshot = crate::node::first_snapshot::<Worker>(&args.config).await?;
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
        messages = spool.messages().len(),
        "spool recovered: messages still to deliver"
    );
    let hostname = args.hostname.unwrap_or_else(system_hostname);
    let worker = Worker::new(
        WorkerOptions {
            listen: args.listen,
            data_dir: args.data.clone(),
            hostname,
        },
        snapshot,
        Arc::new(spool.clone()),
    );
    let deliverer = Deliverer::new(Arc::clone(worker.core()), spool);
    let smtp = worker
        .start()
        .await
        .context("opening the connector ports")?;
    let shutdown = worker.shutdown_token();
    let ready: Readiness = {
        let w = Arc::clone(&worker);
        Arc::new(move || w.is_ready())
    };
    let api = crate::node::reloadable(
        Arc::clone(&worker),
        args.config.clone(),
        Arc::new(QueueAdmin::new(Arc::clone(&deliverer), Arc::clone(&ready))),
        hangups,
    );
    let admin = crate::node::Admin { api, ready, token };
    crate::node::start("worker", args.listen, &smtp, args.admin, admin, &shutdown).await?;
    tokio::spawn(deliverer.run(shutdown.clone()));
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
