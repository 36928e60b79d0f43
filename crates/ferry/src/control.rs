//! `ferry control`: the control plane over a store, gRPC with mTLS on
//! `--listen`, the admin endpoint (/metrics, /livez, /readyz) on
//! `--admin`. Prints `control grpc ADDR`, `control admin URL`,
//! `control metrics URL` and `control ready`, as the nodes print theirs;
//! SIGTERM or SIGINT stops it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use ferry_control::file_store::FileStore;
use ferry_control::server::{self, tls::Pem, ControlPlane};
use ferry_control::store::Store;
use ferry_telemetry::admin::AdminState;
use tokio::net::TcpListener;

/// Where the history lives, from `--store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// `file:DIR`: one replica, the history in DIR.
    File(PathBuf),
    /// `etcd:URL[,URL…]`: any number of replicas over an etcd cluster.
    Etcd(Vec<String>),
}

impl std::str::FromStr for StoreSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("file", dir)) if !dir.is_empty() => Ok(StoreSpec::File(PathBuf::from(dir))),
            Some(("etcd", urls)) => {
                let urls: Vec<String> = urls
                    .split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(str::to_string)
                    .collect();
                match urls.is_empty() {
                    true => Err("etcd: needs at least one URL (etcd:http://HOST:2379,…)".into()),
                    false => Ok(StoreSpec::Etcd(urls)),
                }
            }
            _ => Err(format!(
                "{s:?} is not a store: use file:DIR or etcd:URL[,URL…]"
            )),
        }
    }
}

/// `ferry control`'s arguments.
pub struct Args {
    pub listen: SocketAddr,
    pub store: StoreSpec,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub admin: SocketAddr,
    /// How long a worker may be disconnected or behind before it leaves
    /// the balancers' rotation.
    pub grace: std::time::Duration,
}

/// Binds the gRPC address, opens the store and serves until SIGTERM or
/// SIGINT. The bound address names this replica in node status.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    // SIGHUP (a systemd reload, logrotate, a closed terminal) must not
    // end the control plane by its default action: it has no file to
    // re-read, so say so.
    let mut hangups = ferry_node::watch_hangups().context("watching SIGHUP")?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::warn!(
                "SIGHUP ignored: the control plane has no config file to re-read; apply changes with ferry ctl apply"
            );
        }
    });
    let pem = Pem::read(&args.ca, &args.cert, &args.key).map_err(anyhow::Error::msg)?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    match args.store.clone() {
        StoreSpec::File(dir) => {
            let opened = tokio::task::spawn_blocking(move || FileStore::open(&dir)).await?;
            let store = opened.context("cannot open the file store")?;
            serve(Arc::new(store), pem, listener, args).await
        }
        StoreSpec::Etcd(urls) => etcd(urls, pem, listener, args).await,
    }
}

#[cfg(feature = "etcd")]
async fn etcd(
    urls: Vec<String>,
    pem: Pem,
    listener: TcpListener,
    args: Args,
) -> anyhow::Result<ExitCode> {
    let replica = listener.local_addr()?.to_string();
    let store = ferry_control::etcd_store::EtcdStore::connect(&urls, &replica)
        .await
        .context("cannot open the etcd store")?;
    serve(Arc::new(store), pem, listener, args).await
}

#[cfg(not(feature = "etcd"))]
async fn etcd(
    _urls: Vec<String>,
    _pem: Pem,
    _listener: TcpListener,
    _args: Args,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("this ferry was built without the etcd store; build with --features etcd")
}

/// Serves the control plane over `store` (any [`Store`]) on `listener`.
async fn serve<S: Store>(
    store: Arc<S>,
    pem: Pem,
    listener: TcpListener,
    args: Args,
) -> anyhow::Result<ExitCode> {
    let grpc = listener.local_addr()?;
    let endpoint = TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("cannot listen on admin address {}", args.admin))?;
    let admin = endpoint.local_addr()?;
    let serving = Arc::new(AtomicBool::new(true));
    let ready = Arc::clone(&serving);
    let state = AdminState {
        api: None,
        metrics: ferry_telemetry::metrics_handle(),
        ready: Arc::new(move || ready.load(Ordering::Relaxed)),
        token: None,
    };
    tokio::spawn(ferry_telemetry::admin::serve(endpoint, state, async {
        std::future::pending::<()>().await
    }));
    let plane = ControlPlane::with_grace(store, grpc.to_string(), args.grace);
    let tls = server::tls::server_config(&pem);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut served = tokio::spawn(server::serve(plane, listener, tls, async {
        let _ = stopped.await;
    }));
    // The handlers before `control ready`: a SIGTERM right after it
    // stops the server cleanly, not by the default action.
    let signal = tokio_util::sync::CancellationToken::new();
    crate::node::cancel_on_signal(signal.clone());
    println!("control grpc {grpc}");
    println!("control admin http://{admin}");
    println!("control metrics http://{admin}/metrics");
    println!("control ready");
    tracing::info!(%grpc, %admin, "control plane started");
    tokio::select! {
        () = signal.cancelled() => {
            tracing::info!("signal received; stopping");
            serving.store(false, Ordering::Relaxed);
            let _ = stop.send(());
            // Watch streams never end on their own: give the rest a
            // moment, then exit (nodes reconnect to another replica or
            // keep serving what they have).
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), &mut served).await;
            Ok(ExitCode::SUCCESS)
        }
        result = &mut served => match result {
            Ok(Ok(())) => Ok(ExitCode::SUCCESS),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("the gRPC server failed")),
            Err(e) => Err(anyhow::Error::new(e).context("the gRPC server failed")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_specs_parse() {
        assert_eq!(
            "file:/var/lib/ferry/control".parse(),
            Ok(StoreSpec::File("/var/lib/ferry/control".into()))
        );
        assert_eq!(
            "etcd:http://10.0.0.1:2379,http://10.0.0.2:2379".parse(),
            Ok(StoreSpec::Etcd(vec![
                "http://10.0.0.1:2379".into(),
                "http://10.0.0.2:2379".into()
            ]))
        );
        assert!("etcd:".parse::<StoreSpec>().is_err());
        assert!("file:".parse::<StoreSpec>().is_err());
        assert!("/var/lib/ferry".parse::<StoreSpec>().is_err());
    }
}
