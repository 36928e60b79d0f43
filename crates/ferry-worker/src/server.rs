//! The worker's listeners: accept loops, connection caps and graceful
//! shutdown. `run` takes bound listeners and stops when `shutdown` is
//! cancelled: it stops accepting, lets open transactions finish, and tells
//! idle sessions `421 4.3.2`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ferry_queue::Spool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::conn;
use crate::limits::{ConnectionLimits, DataBudget};
use crate::protolog::ProtocolLogger;
use crate::runtime::Runtime;
use crate::tracking::TrackingLog;

/// How often free space in the data directory is checked.
const SPACE_CHECK: Duration = Duration::from_secs(1);

/// The node's own settings (not part of the cluster config).
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The address every connector port is bound on.
    pub listen: IpAddr,
    pub data_dir: PathBuf,
    /// Our name in replies and Received headers.
    pub hostname: String,
}

/// A relay worker: config, spool and live state shared by its sessions.
pub struct Worker {
    pub(crate) options: WorkerOptions,
    runtime: ArcSwap<Runtime>,
    pub(crate) spool: Arc<dyn Spool>,
    pub(crate) protolog: Arc<ProtocolLogger>,
    pub(crate) tracking: Arc<TrackingLog>,
    pub(crate) limits: ConnectionLimits,
    /// DATA held in memory by all sessions.
    pub(crate) data_budget: DataBudget,
    session_base: u64,
    session_seq: AtomicU64,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Listening and not shutting down.
    listening: AtomicBool,
    /// Free space in the data directory is under the floor.
    low_space: AtomicBool,
}

impl Worker {
    pub fn new(options: WorkerOptions, runtime: Runtime, spool: Arc<dyn Spool>) -> Arc<Self> {
        let protolog = Arc::new(ProtocolLogger::new(&options.data_dir));
        let tracking = Arc::new(TrackingLog::new(&options.data_dir));
        let session_base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
            << 8;
        crate::metric::describe();
        Arc::new(Self {
            options,
            runtime: ArcSwap::from_pointee(runtime),
            spool,
            protolog,
            tracking,
            limits: ConnectionLimits::default(),
            data_budget: DataBudget::default(),
            session_base,
            session_seq: AtomicU64::new(0),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            listening: AtomicBool::new(false),
            low_space: AtomicBool::new(false),
        })
    }

    /// The config snapshot new sessions get.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Swaps in a new config; open sessions keep theirs.
    pub fn apply(&self, runtime: Runtime) {
        self.runtime.store(Arc::new(runtime));
    }

    /// Readiness for `/readyz`: listening, not shutting down, and with
    /// room in the spool.
    pub fn is_ready(&self) -> bool {
        self.listening.load(Ordering::Relaxed) && !self.is_low_on_space()
    }

    /// New mail is refused with `452 4.3.1` while this holds.
    pub fn is_low_on_space(&self) -> bool {
        self.low_space.load(Ordering::Relaxed)
    }

    /// Compares free space in the data directory with the config's floor.
    pub fn check_space(&self) {
        let floor = self.runtime().config.min_free_space;
        match nix::sys::statvfs::statvfs(&self.options.data_dir) {
            Ok(st) => {
                let free = st.blocks_available().saturating_mul(st.fragment_size());
                metrics::gauge!(crate::metric::SPOOL_FREE_BYTES).set(free as f64);
                let low = free < floor;
                if low != self.low_space.swap(low, Ordering::Relaxed) {
                    if low {
                        tracing::warn!(
                            free,
                            floor,
                            "spool space under the floor: refusing new mail with 452 4.3.1"
                        );
                    } else {
                        tracing::info!(
                            free,
                            floor,
                            "spool space back over the floor: accepting mail"
                        );
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read free space of the data directory"),
        }
    }

    /// Cancelling this token shuts the worker down gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub(crate) fn next_session_id(&self) -> String {
        let n = self.session_seq.fetch_add(1, Ordering::Relaxed);
        format!("{:016X}", self.session_base.wrapping_add(n))
    }

    /// Binds every connector port of the current config on the node
    /// address.
    pub async fn bind(&self) -> std::io::Result<Vec<TcpListener>> {
        let mut listeners = Vec::new();
        for port in self.runtime().config.ports() {
            let addr = SocketAddr::new(self.options.listen, port);
            let l = TcpListener::bind(addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
            })?;
            listeners.push(l);
        }
        Ok(listeners)
    }

    /// Serves on `listeners` until the shutdown token is cancelled and
    /// every session has ended (or `drain_limit` has passed).
    pub async fn run(self: Arc<Self>, listeners: Vec<TcpListener>, drain_limit: Duration) {
        // Know the space situation before the first session starts.
        self.check_space();
        for listener in listeners {
            let worker = Arc::clone(&self);
            self.tracker
                .spawn(async move { worker.accept_loop(listener).await });
        }
        let monitor = Arc::clone(&self);
        self.tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = monitor.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(SPACE_CHECK) => monitor.check_space(),
                }
            }
        });
        self.listening.store(true, Ordering::Relaxed);
        self.shutdown.cancelled().await;
        self.listening.store(false, Ordering::Relaxed);
        self.tracker.close();
        tracing::info!("shutting down: no new connections, letting sessions finish");
        if tokio::time::timeout(drain_limit, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("sessions still open after {drain_limit:?}; closing them");
        }
        self.flush_logs().await;
    }

    /// Resolves once every log line made so far (tracking and protocol
    /// logs) is written to its file.
    pub async fn flush_logs(&self) {
        self.tracking.flush().await;
        self.protolog.flush().await;
    }

    pub(crate) fn shutting_down(&self) -> &CancellationToken {
        &self.shutdown
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let worker = Arc::clone(&self);
                    self.tracker
                        .spawn(async move { conn::handle(worker, stream, peer).await });
                }
                Err(e) => {
                    // Out of descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}
