//! What every node process does around its role: the admin endpoint, the
//! address lines that `ferry up` and the tests read, SIGTERM/SIGINT
//! starting a graceful shutdown, and SIGHUP and `POST /config/reload`
//! re-reading the config file.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use ferry_node::{NodeAdmin, Reloader, Role, Snapshot};
use ferry_telemetry::admin::{AdminApi, AdminState};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Reads the config file and builds the role's first snapshot (version
/// 1), every error at once.
pub async fn first_snapshot<R: Role>(path: &Path) -> anyhow::Result<Snapshot<R::Material>> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || ferry_node::load_file::<R>(&owned, 1))
        .await?
        .map_err(|errors| {
            anyhow::anyhow!(
                "{} cannot be put in service:\n  {}",
                path.display(),
                errors.join("\n  ")
            )
        })
}

/// Makes `role` reloadable from `config`: on each SIGHUP in `hangups`
/// (from [`ferry_node::watch_hangups`]) for the life of the process, and
/// with `POST /config/reload` on the admin API returned (the role's `api`
/// plus reload and the `config` part of `/status`).
pub fn reloadable<R: Role>(
    role: Arc<R>,
    config: PathBuf,
    api: Arc<dyn AdminApi>,
    hangups: tokio::signal::unix::Signal,
) -> Arc<dyn AdminApi> {
    let reloader = Reloader::new(role, config);
    ferry_node::reload_on_hangup(Arc::clone(&reloader), hangups);
    Arc::new(NodeAdmin {
        role: api,
        reloader,
    })
}

/// The role's part of the admin endpoint.
pub struct Admin {
    pub api: Arc<dyn AdminApi>,
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
    pub token: Option<Arc<str>>,
}

/// Serves the admin endpoint on `admin_addr` until the process exits, prints
/// `ROLE smtp ADDR` for each listener, `ROLE admin URL`, `ROLE metrics
/// URL` and `ROLE ready`,
/// and cancels `shutdown` on SIGTERM or SIGINT.
pub async fn start(
    role: &str,
    listen: IpAddr,
    smtp: &[SocketAddr],
    admin_addr: SocketAddr,
    admin: Admin,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    serve_admin(role, admin_addr, admin).await?;
    // The handlers before `ROLE ready`: a SIGTERM right after it drains.
    cancel_on_signal(shutdown.clone());
    announce(role, listen, smtp);
    Ok(())
}

/// Serves the admin endpoint on `admin_addr` until the process exits and
/// prints `ROLE admin URL` and `ROLE metrics URL`.
pub async fn serve_admin(role: &str, admin_addr: SocketAddr, admin: Admin) -> anyhow::Result<()> {
    let endpoint = TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("cannot listen on admin address {admin_addr}"))?;
    let bound = endpoint.local_addr()?;
    let state = AdminState {
        api: Some(admin.api),
        metrics: ferry_telemetry::metrics_handle(),
        ready: admin.ready,
        token: admin.token,
    };
    // The endpoint serves until the process exits, drain included: then
    // /readyz answers 503, /status and /metrics show the drain, and a
    // reload is refused with a reason rather than a refused connection.
    tokio::spawn(ferry_telemetry::admin::serve(endpoint, state, async move {
        std::future::pending::<()>().await
    }));
    println!("{role} admin http://{bound}");
    println!("{role} metrics http://{bound}/metrics");
    tracing::info!(admin = %bound, "{role} admin endpoint up");
    Ok(())
}

/// Prints `ROLE smtp ADDR` for each listener and `ROLE ready`.
pub fn announce(role: &str, listen: IpAddr, smtp: &[SocketAddr]) {
    for addr in smtp {
        println!("{role} smtp {addr}");
    }
    println!("{role} ready");
    tracing::info!(%listen, smtp = ?smtp, "{role} started");
}

/// Cancels `shutdown` on SIGTERM or SIGINT. The handlers are installed
/// before this returns (not when a spawned task first runs), so a signal
/// that comes right after is a drain, not the default action's exit.
pub fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still stops on SIGTERM (default action).
        tracing::warn!("cannot install SIGTERM/SIGINT handlers: a signal ends the process at once");
        return;
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received; draining");
        shutdown.cancel();
    });
}
