//! The worker as a node role: its [`Core`], the listeners that reconcile
//! with each snapshot, the sessions' task tracker, readiness and graceful
//! shutdown. [`Worker::run`] waits for the shutdown token: then it stops
//! accepting, lets open transactions finish, and tells idle sessions
//! `421 4.3.2`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_config::ClusterConfig;
use ferry_node::{ApplyError, ListenerSet, OnAccept, Reconciled, Role};
use ferry_queue::Spool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::conn;
use crate::core::{Core, WorkerOptions, WorkerSnapshot};
use crate::tls::TlsAcceptors;

/// How often free space in the data directory is checked.
const SPACE_CHECK: Duration = Duration::from_secs(1);

/// A relay worker: the core its sessions share, its listeners and its
/// sessions.
pub struct Worker {
    core: Arc<Core>,
    listeners: ListenerSet,
    /// Accept loops, sessions and the space monitor: shutdown waits for
    /// them.
    tracker: TaskTracker,
    /// Listening, and not yet shutting down.
    listening: AtomicBool,
}

impl Worker {
    /// A worker that will serve `snapshot` (version 1, usually) and store
    /// mail in `spool`. It listens once [`Worker::start`] is called.
    pub fn new(
        options: WorkerOptions,
        snapshot: WorkerSnapshot,
        spool: Arc<dyn Spool>,
    ) -> Arc<Self> {
        let listen = options.listen;
        let core = Arc::new(Core::new(options, snapshot, spool));
        let tracker = TaskTracker::new();
        let listeners = ListenerSet::new(listen, tracker.clone(), core.shutdown_token());
        Arc::new(Self {
            core,
            listeners,
            tracker,
            listening: AtomicBool::new(false),
        })
    }

    /// What sessions and the delivery agent share.
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// What a listener does with a connection: a session on the tracker,
    /// with the snapshot in service when it was accepted (taken here, not
    /// when the task first runs: a connection accepted on a port that an
    /// apply is removing is served under the snapshot that has the port).
    fn on_accept(&self) -> OnAccept {
        let (core, tracker) = (Arc::clone(&self.core), self.tracker.clone());
        Arc::new(move |stream, peer, _port| {
            let snapshot = core.current();
            tracker.spawn(conn::handle(Arc::clone(&core), snapshot, stream, peer));
        })
    }

    /// Serves `listener`, bound by the caller (tests bind port 0), as the
    /// connector port `port`: later snapshots keep it while they name the
    /// port and close it when they do not.
    pub async fn adopt(&self, port: u16, listener: TcpListener) {
        self.listeners.adopt(port, listener, self.on_accept()).await;
    }

    /// Binds every connector port of the snapshot in service that is not
    /// bound yet, on the node address; returns every bound address.
    ///
    /// # Errors
    /// A port cannot be bound; nothing was bound then.
    pub async fn start(&self) -> Result<Vec<SocketAddr>, ApplyError> {
        let ports = self.core.current().config.listen_ports();
        self.listeners
            .reconcile(&ports, || {}, self.on_accept())
            .await?;
        // Ready as soon as the ports accept, before `worker ready` is
        // printed: `/readyz` must not say 503 to someone who read it.
        self.core.check_space();
        self.listening
            .store(!self.core.shutting_down().is_cancelled(), Ordering::Relaxed);
        Ok(self.listeners.addresses().await)
    }

    /// Serves until the shutdown token is cancelled and every session has
    /// ended (or `drain_limit` has passed).
    pub async fn run(self: Arc<Self>, drain_limit: Duration) {
        // Know the space situation before readiness says yes.
        self.core.check_space();
        let core = Arc::clone(&self.core);
        self.tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = core.shutting_down().cancelled() => return,
                    _ = tokio::time::sleep(SPACE_CHECK) => {
                        core.check_space();
                        core.auth.sweep(&core.current().config.auth);
                    }
                }
            }
        });
        let shutdown = self.core.shutdown_token();
        self.listening
            .store(!shutdown.is_cancelled(), Ordering::Relaxed);
        shutdown.cancelled().await;
        self.listening.store(false, Ordering::Relaxed);
        self.tracker.close();
        tracing::info!("shutting down: no new connections, letting sessions finish");
        if tokio::time::timeout(drain_limit, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("sessions still open after {drain_limit:?}; closing them");
        }
        self.core.flush_logs().await;
    }

    /// Readiness for `/readyz`: listening, not shutting down, with room
    /// in the spool, and not behind the control plane's config.
    pub fn is_ready(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
            && !self.core.shutting_down().is_cancelled()
            && !self.core.is_low_on_space()
            && !self.core.is_config_behind()
    }

    /// Cancelling this token shuts the worker down gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.core.shutdown_token()
    }

    /// Resolves once every log line made so far is written.
    pub async fn flush_logs(&self) {
        self.core.flush_logs().await;
    }
}

impl Role for Worker {
    type Material = TlsAcceptors;

    fn prepare(config: &ClusterConfig) -> Result<TlsAcceptors, Vec<String>> {
        TlsAcceptors::build(config)
            .map_err(|errors| errors.iter().map(ToString::to_string).collect())
    }

    fn current(&self) -> Arc<WorkerSnapshot> {
        self.core.current()
    }

    /// New connector ports are bound first; then the snapshot is swapped
    /// in (the first session on a new port already has it); then removed
    /// ports stop accepting while their sessions run on. Refused once
    /// shutdown has begun: a draining worker opens no new port.
    async fn apply(&self, snapshot: Arc<WorkerSnapshot>) -> Result<Reconciled, ApplyError> {
        if self.core.shutting_down().is_cancelled() {
            return Err(ApplyError::Refused("the worker is shutting down".into()));
        }
        let ports = snapshot.config.listen_ports();
        let core = Arc::clone(&self.core);
        let done = self
            .listeners
            .reconcile(&ports, move || core.swap(snapshot), self.on_accept())
            .await?;
        Ok(done)
    }
}
