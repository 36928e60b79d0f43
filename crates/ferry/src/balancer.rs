//! `ferry balancer`: one balancer node in front of the workers.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_balancer::admin::BalancerAdmin;
use ferry_balancer::Balancer;
use ferry_node::Role;

pub struct Args {
    pub config: PathBuf,
    pub listen: IpAddr,
    pub admin: SocketAddr,
    pub admin_token_file: Option<PathBuf>,
}

/// How long shutdown waits for relayed sessions.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Before anything slow: a SIGHUP while starting waits for the reloader
    // instead of ending the process.
    let hangups = ferry_node::watch_hangups().context("watching SIGHUP")?;
    let token = args
        .admin_token_file
        .as_deref()
        .map(crate::token::read)
        .transpose()?;
    let first = Arc::new(crate::node::first_snapshot::<Balancer>(&args.config).await?);
    // The recorder first: the balancer registers its metric handles once.
    ferry_telemetry::metrics_handle();
    let balancer = Balancer::new(Arc::clone(&first), args.listen);
    // The first apply binds the listeners (in the config's order) and
    // starts the probes.
    let bound = balancer.apply(first).await?.added;
    let shutdown = balancer.shutdown_token();
    let api = crate::node::reloadable(
        Arc::clone(&balancer),
        args.config.clone(),
        Arc::new(BalancerAdmin(Arc::clone(&balancer))),
        hangups,
    );
    let admin = crate::node::Admin {
        api,
        ready: {
            let b = Arc::clone(&balancer);
            Arc::new(move || b.is_ready())
        },
        token,
    };
    crate::node::start(
        "balancer",
        args.listen,
        &bound,
        args.admin,
        admin,
        &shutdown,
    )
    .await?;
    balancer.run(DRAIN_LIMIT).await;
    tracing::info!("balancer stopped");
    Ok(ExitCode::SUCCESS)
}
