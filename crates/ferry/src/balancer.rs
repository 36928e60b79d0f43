//! `ferry balancer`: one balancer node in front of the workers.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ferry_balancer::admin::BalancerAdmin;
use ferry_balancer::Balancer;
use ferry_config::ClusterConfig;

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
    ferry_telemetry::metrics_handle();
    let balancer = Balancer::new(settings, args.listen);
    let listeners = balancer.bind().await?;
    let shutdown = balancer.shutdown_token();
    let admin = crate::node::Admin {
        api: Arc::new(BalancerAdmin(Arc::clone(&balancer))),
        ready: {
            let b = Arc::clone(&balancer);
            Arc::new(move || b.is_ready())
        },
        token,
    };
    crate::node::start(
        "balancer",
        args.listen,
        &listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect::<Vec<_>>(),
        args.admin,
        admin,
        &shutdown,
    )
    .await?;
    balancer.run(listeners, DRAIN_LIMIT).await;
    tracing::info!("balancer stopped");
    Ok(ExitCode::SUCCESS)
}
