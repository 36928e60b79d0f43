//! `ferry balancer`: one balancer node in front of the workers.

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
            let node = Controlled::<Balancer>::new(
                "balancer",
                NodeRole::Balancer,
                control,
                args.listen,
                &data,
            )
            .await?;
            let listen = args.listen;
            let made = crate::controlled::start(
                &node,
                listen,
                args.admin,
                token,
                hangups,
                async |snapshot| {
                    let first = Arc::new(snapshot);
                    let balancer = Balancer::new(Arc::clone(&first), listen);
                    let bound = balancer.apply(first).await?.added;
                    let ready = {
                        let b = Arc::clone(&balancer);
                        Arc::new(move || b.is_ready())
                    };
                    let serving = Serving {
                        shutdown: balancer.shutdown_token(),
                        api: Arc::new(BalancerAdmin(Arc::clone(&balancer))),
                        role: balancer,
                        ready,
                    };
                    Ok((serving, bound))
                },
            )
            .await?;
            let Some(balancer) = made else {
                tracing::info!("stopped before any config arrived");
                return Ok(ExitCode::SUCCESS);
            };
            balancer
        }
    };
    balancer.run(DRAIN_LIMIT).await;
    tracing::info!("balancer stopped");
    Ok(ExitCode::SUCCESS)
}
