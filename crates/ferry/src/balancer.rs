//! `ferry balancer`: one balancer node in front of the workers. With
//! `--control`, its workers are the config's static backends and the
//! control plane's worker pool (see [`crate::pool`]).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_balancer::admin::BalancerAdmin;
use ferry_balancer::Balancer;
use ferry_control::proto::NodeRole;
use ferry_node::Role;

use crate::controlled::{ConfigSource, Controlled, Serving};
use crate::pool::Pooled;

pub struct Args {
    pub source: ConfigSource,
    pub listen: IpAddr,
    pub admin: SocketAddr,
    pub admin_token_file: Option<PathBuf>,
    /// Where a balancer fed by the control plane keeps its last-good copy.
    pub data: Option<PathBuf>,
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
    let balancer = match args.source {
        ConfigSource::File(config) => {
            let first = Arc::new(crate::node::first_snapshot::<Balancer>(&config).await?);
            // The recorder first: the balancer registers its metric handles once.
            ferry_telemetry::metrics_handle();
            let balancer = Balancer::new(Arc::clone(&first), args.listen);
            // The first apply binds the listeners (in the config's order) and
            // starts the probes.
            let bound = balancer.apply(first).await?.added;
            let shutdown = balancer.shutdown_token();
            let api = crate::node::reloadable(
                Arc::clone(&balancer),
                config,
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
            balancer
        }
        ConfigSource::Control(control) => {
            let data = args
                .data
                .context("--control needs --data DIR for the last-good copy")?;
            ferry_telemetry::metrics_handle();
            let node = Controlled::<Pooled>::new(
                "balancer",
                NodeRole::Balancer,
                control,
                args.listen,
                &data,
            )
            .await?;
            // The worker pool, watched from the start: the first config is
            // applied with the workers known by then.
            let (pool_tx, mut pools) = tokio::sync::watch::channel(None);
            tokio::spawn(node.subscriber().watch_pool(pool_tx));
            let listen = args.listen;
            let first_pools = pools.clone();
            let pool_dir = data.clone();
            let made = crate::controlled::start(
                &node,
                listen,
                args.admin,
                token,
                hangups,
                async |snapshot| {
                    let pool = first_pools.borrow().clone();
                    let (pooled, bound) =
                        Pooled::start(snapshot, listen, pool.as_ref(), &pool_dir).await?;
                    let balancer = Arc::clone(&pooled.balancer);
                    let ready = {
                        let b = Arc::clone(&balancer);
                        Arc::new(move || b.is_ready())
                    };
                    let serving = Serving {
                        shutdown: balancer.shutdown_token(),
                        api: Arc::new(BalancerAdmin(balancer)),
                        role: pooled,
                        ready,
                    };
                    Ok((serving, bound))
                },
            )
            .await?;
            let Some(pooled) = made else {
                tracing::info!("stopped before any config arrived");
                return Ok(ExitCode::SUCCESS);
            };
            let follower = Arc::clone(&pooled);
            // For the life of the process: each pool the control plane sends.
            tokio::spawn(async move {
                while pools.changed().await.is_ok() {
                    let pool = pools.borrow_and_update().clone();
                    if let Some(pool) = pool {
                        follower.set_pool(&pool).await;
                    }
                }
            });
            Arc::clone(&pooled.balancer)
        }
    };
    balancer.run(DRAIN_LIMIT).await;
    tracing::info!("balancer stopped");
    Ok(ExitCode::SUCCESS)
}
