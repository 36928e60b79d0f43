//! The control plane's gRPC services over any [`Store`]:
//! [`ControlPlane`] implements `ConfigAdmin` (for admin certificates) and
//! `ConfigDiscovery` (for node certificates, each as its own ID only).
//!
//! - `admin`: Apply, Rollback, Diff, History, Get, Nodes. A config is
//!   validated with `ferry_config::ClusterConfig::parse`, the code every
//!   node runs; certificate and key files a config names are node-local
//!   paths and are not checked here (a node missing one NACKs).
//! - `discovery`: Watch (one task per stream, fed from the store's
//!   `watch` channel), Report (ACK/NACK) and WatchPool (for balancers).
//! - `registry`: each worker's rotation state (in, or out: drained,
//!   disconnected, nacked, lagging) and the pool balancers watch.
//! - `tls`: the mTLS settings of the server and of its clients.
//! - `metric`: the control plane's metrics.
//!
//! [`serve`] runs both services on a bound listener until a shutdown
//! future resolves.

mod admin;
mod discovery;
mod metric;
mod registry;
pub mod tls;

pub use registry::{rotation, Out, DEFAULT_GRACE, POOL_REFRESH};

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::{Request, Status};

use crate::identity::Identity;
use crate::proto::config_admin_server::ConfigAdminServer;
use crate::proto::config_discovery_server::ConfigDiscoveryServer;
use crate::proto::{ConfigSnapshot, NodeStatus, Pool};
use crate::store::{Store, StoreError};

/// How many first-time syncs (a node whose version is not current when
/// it connects) are sent at once: after a control-plane restart every
/// node reconnects, and 1,000 snapshots encoded at once would spike
/// memory and CPU for no gain.
pub const FIRST_SYNCS_AT_ONCE: usize = 64;

/// HTTP/2 keepalive: a PING this often on an idle connection, and the
/// connection is closed when one is not answered within the timeout, so a
/// node that vanished (power cut, partition) is marked disconnected.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The control plane: the admin and discovery services over `S`.
pub struct ControlPlane<S: Store> {
    shared: Arc<Shared<S>>,
}

impl<S: Store> Clone for ControlPlane<S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

struct Shared<S> {
    store: Arc<S>,
    /// This replica's name in node status (its listen address).
    replica: String,
    first_syncs: Semaphore,
    /// What this replica knows of each node it has served.
    nodes: Mutex<HashMap<String, NodeEntry>>,
    /// Set when the server stops: every Watch stream ends (its node
    /// reconnects, to another replica or to this one restarted), so a
    /// graceful shutdown does not wait for streams that never end.
    closing: tokio::sync::watch::Sender<bool>,
    /// How long a worker may be disconnected or behind before it leaves
    /// the balancers' rotation.
    grace: Duration,
    /// When this replica started: a pool is complete only once every
    /// worker has had time to reconnect ([`registry::incomplete_for`]).
    /// Tokio's clock, so tests can pause it.
    started: Instant,
    /// The newest pool, for the WatchPool streams.
    pool: tokio::sync::watch::Sender<Arc<Pool>>,
    /// Wakes the registry task (see `registry`).
    poke: Arc<tokio::sync::Notify>,
    /// The workers this replica has seen in the store, and when.
    seen: Mutex<HashMap<String, (NodeStatus, SystemTime)>>,
}

/// A node's status and the stream serving it now.
struct NodeEntry {
    status: NodeStatus,
    /// Counts the node's streams: a stream that ends marks the node
    /// disconnected only if no newer stream has taken over.
    stream: u64,
}

impl<S: Store> ControlPlane<S> {
    /// The services over `store`; `replica` names this replica in node
    /// status (`Nodes` shows which replica serves which node). The grace
    /// period is [`DEFAULT_GRACE`].
    pub fn new(store: Arc<S>, replica: impl Into<String>) -> Self {
        Self::with_grace(store, replica, DEFAULT_GRACE)
    }

    /// As [`ControlPlane::new`], with a worker leaving the balancers'
    /// rotation once it has been disconnected or behind for `grace`.
    pub fn with_grace(store: Arc<S>, replica: impl Into<String>, grace: Duration) -> Self {
        let shared = Arc::new(Shared {
            store,
            replica: replica.into(),
            first_syncs: Semaphore::new(FIRST_SYNCS_AT_ONCE),
            nodes: Mutex::default(),
            closing: tokio::sync::watch::Sender::new(false),
            grace,
            started: Instant::now(),
            pool: tokio::sync::watch::Sender::new(Arc::default()),
            poke: Arc::default(),
            seen: Mutex::default(),
        });
        metric::follow_version(shared.store.current());
        // Outside a runtime (a unit test building the services) there is
        // nothing to follow.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(registry::follow(Arc::downgrade(&shared)));
        }
        Self { shared }
    }

    /// The gRPC services, for a tonic router.
    pub fn services(&self) -> (ConfigAdminServer<Self>, ConfigDiscoveryServer<Self>) {
        (
            ConfigAdminServer::new(self.clone()),
            ConfigDiscoveryServer::new(self.clone()),
        )
    }

    fn current(&self) -> Option<Arc<ConfigSnapshot>> {
        self.shared.store.current().borrow().clone()
    }
}

/// Serves `plane` on `listener` with mTLS (`tls`) until `shutdown`
/// resolves (then every Watch stream ends, and calls in progress finish),
/// with HTTP/2 keepalive.
///
/// # Errors
/// When the TLS settings are refused or the server fails.
pub async fn serve<S: Store>(
    plane: ControlPlane<S>,
    listener: TcpListener,
    tls: tonic::transport::ServerTlsConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (admin, discovery) = plane.services();
    let closing = plane.shared.closing.clone();
    let shutdown = async move {
        shutdown.await;
        closing.send_replace(true);
    };
    tonic::transport::Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(admin)
        .add_service(discovery)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}

/// Who calls: the Ferry identity in the verified client certificate.
/// The TLS layer has already checked it chains to the cluster CA.
fn caller<T>(request: &Request<T>) -> Result<Identity, Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    Identity::of_certificate(leaf.as_ref())
        .map_err(|e| Status::permission_denied(format!("the client certificate: {e}")))
}

/// The admin's name, or PERMISSION_DENIED for any other identity.
fn admin<T>(request: &Request<T>) -> Result<String, Status> {
    match caller(request)? {
        Identity::Admin(name) => Ok(name),
        other => Err(Status::permission_denied(format!(
            "{other} may not change or read the config history: an admin certificate is needed"
        ))),
    }
}

/// Checks that the caller is node `node_id`.
fn node<T>(request: &Request<T>, node_id: &str) -> Result<(), Status> {
    match caller(request)? {
        Identity::Node(name) if name == node_id => Ok(()),
        Identity::Node(name) => Err(Status::permission_denied(format!(
            "node {name} may not speak for node {node_id:?}"
        ))),
        other => Err(Status::permission_denied(format!(
            "{other} may not subscribe: a node certificate is needed"
        ))),
    }
}

/// The gRPC status for a store error.
fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Conflict { .. } => Status::aborted(e.to_string()),
        StoreError::TooLarge { .. } => Status::invalid_argument(e.to_string()),
        StoreError::Unavailable(_) | StoreError::Io { .. } => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn version_of(snapshot: &ConfigSnapshot) -> u64 {
    snapshot.meta.as_ref().map_or(0, |m| m.version)
}

fn sha_of(snapshot: &ConfigSnapshot) -> &str {
    snapshot.meta.as_ref().map_or("", |m| m.sha256.as_str())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(std::time::SystemTime::now())
}
