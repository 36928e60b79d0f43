//! `ferry balancer`: one balancer node in front of the workers.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_balancer::admin::BalancerAdmin;
use ferry_balancer::Balancer;
use ferry_config::ClusterConfig;
use tokio::net::TcpListener;

use crate::worker::wait_for_signal;

pub struct Args {
    pub config: PathBuf,
    pub listen: IpAddr,
    pub admin: SocketAddr,
    pub admin_token_file: Option<PathBuf>,
}

/// How long shutdown waits for relayed sessions.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = ClusterConfig::load(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let token = args
        .admin_token_file
        .as_deref()
        .map(crate::token::read)
        .transpose()?;
    let Some(settings) = config.balancer else {
        anyhow::bail!(
            "{} has no [balancer] section: nothing to balance",
            args.config.display()
        );
    };
    // The recorder first: the balancer registers its metric handles once.
    let metrics = ferry_telemetry::metrics_handle();
    let balancer = Balancer::new(settings, args.listen);
    let listeners = balancer.bind().await?;
    let admin = TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("cannot listen on admin address {}", args.admin))?;
    let admin_addr = admin.local_addr()?;
    let shutdown = balancer.shutdown_token();
    let state = ferry_telemetry::admin::AdminState {
        api: Some(Arc::new(BalancerAdmin(Arc::clone(&balancer)))),
        metrics,
        ready: {
            let b = Arc::clone(&balancer);
            Arc::new(move || b.is_ready())
        },
        token,
    };
    let admin_shutdown = shutdown.clone();
    tokio::spawn(ferry_telemetry::admin::serve(admin, state, async move {
        admin_shutdown.cancelled().await
    }));
    // These lines are read by `ferry up` and the end-to-end tests.
    for l in &listeners {
        println!("balancer smtp {}", l.local_addr()?);
    }
    println!("balancer admin http://{admin_addr}/metrics");
    println!("balancer ready");
    tracing::info!(listen = %args.listen, admin = %admin_addr, "balancer started");
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received; draining");
        signals.cancel();
    });
    balancer.run(listeners, DRAIN_LIMIT).await;
    tracing::info!("balancer stopped");
    Ok(ExitCode::SUCCESS)
}
