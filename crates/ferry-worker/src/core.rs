//! The worker's core: what sessions and the delivery agent need, and
//! nothing about listeners. The config snapshot in service sits here
//! behind `arc-swap`: a session takes the one current when it starts and
//! keeps it to its end; the delivery agent takes the current one for each
//! attempt. Sessions and delivery depend on this, never on the server.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ferry_queue::Spool;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::limits::ConnectionLimits;
use crate::protolog::ProtocolLogger;
use crate::tls::TlsAcceptors;
use crate::tracking::TrackingLog;

/// One config version in service on a worker: the validated config and
/// the TLS acceptors built from it.
pub type WorkerSnapshot = ferry_node::Snapshot<TlsAcceptors>;

/// The node's own settings (not part of the cluster config).
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The address every connector port is bound on.
    pub listen: IpAddr,
    pub data_dir: PathBuf,
    /// Our name in replies and Received headers.
    pub hostname: String,
}

/// What the worker's sessions and its delivery agent share: the snapshot
/// in service, the spool, the logs, the caps, the AUTH machinery and the
/// shutdown signal.
pub struct Core {
    pub(crate) options: WorkerOptions,
    snapshot: ArcSwap<WorkerSnapshot>,
    pub(crate) spool: Arc<dyn Spool>,
    pub(crate) protolog: Arc<ProtocolLogger>,
    pub(crate) tracking: Arc<TrackingLog>,
    pub(crate) limits: ConnectionLimits,
    session_base: u64,
    session_seq: AtomicU64,
    shutdown: CancellationToken,
    /// Free space in the data directory is under the floor.
    low_space: AtomicBool,
    /// This node has refused the control plane's current config for
    /// longer than its grace period ([`Core::set_config_behind`]).
    config_behind: AtomicBool,
    /// The verification pool, credential cache and failure counters:
    /// process-wide, tuned to each snapshot put in service.
    pub(crate) auth: Authenticator,
}

impl Core {
    /// A core serving `snapshot`, storing mail in `spool`, with its logs
    /// in the data directory.
    pub fn new(options: WorkerOptions, snapshot: WorkerSnapshot, spool: Arc<dyn Spool>) -> Self {
        let protolog = Arc::new(ProtocolLogger::new(&options.data_dir));
        let tracking = Arc::new(TrackingLog::new(&options.data_dir));
        // Session ids stay unique across restarts: microseconds at start,
        // then a counter.
        let session_base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
            << 8;
        crate::metric::describe();
        crate::metric::register_auth();
        crate::metric::register_alerted();
        crate::metric::register_connectors(&snapshot.config);
        let auth = Authenticator::new(&snapshot.config);
        Self {
            auth,
            options,
            snapshot: ArcSwap::from_pointee(snapshot),
            spool,
            protolog,
            tracking,
            limits: ConnectionLimits::default(),
            session_base,
            session_seq: AtomicU64::new(0),
            shutdown: CancellationToken::new(),
            low_space: AtomicBool::new(false),
            config_behind: AtomicBool::new(false),
        }
    }

    /// The snapshot new sessions and the next delivery attempt get.
    pub fn current(&self) -> Arc<WorkerSnapshot> {
        self.snapshot.load_full()
    }

    /// Puts `snapshot` in service; sessions keep the one they hold. The
    /// AUTH machinery takes its settings, and forgets cached credentials
    /// of users it changes or removes.
    pub(crate) fn swap(&self, snapshot: Arc<WorkerSnapshot>) {
        self.auth.configure(&snapshot.config);
        crate::metric::register_connectors(&snapshot.config);
        self.snapshot.store(snapshot);
    }

    /// Our host name (replies, Received, DSNs).
    pub fn hostname(&self) -> &str {
        &self.options.hostname
    }

    /// New mail is refused with `452 4.3.1` while this holds.
    pub fn is_low_on_space(&self) -> bool {
        self.low_space.load(Ordering::Relaxed)
    }

    /// Marks this worker as serving an older config than the control
    /// plane's current one, which it could not apply (a NACK) for longer
    /// than the grace period, or as back in step. While behind, the
    /// balancer's probes (PROXY `LOCAL` sessions) are refused with `421`,
    /// so every balancer takes the worker out of rotation after `fall`
    /// probes, and `/readyz` answers 503; clients that reach the worker
    /// directly are still served, under the config in service.
    pub fn set_config_behind(&self, behind: bool) {
        if behind != self.config_behind.swap(behind, Ordering::Relaxed) {
            metrics::gauge!(crate::metric::CONFIG_BEHIND).set(f64::from(u8::from(behind)));
            match behind {
                true => tracing::warn!(
                    "the control plane's config could not be applied within the grace period: \
                     refusing balancer probes until it is"
                ),
                false => tracing::info!("config back in step: answering balancer probes"),
            }
        }
    }

    /// Whether [`Core::set_config_behind`] holds.
    pub fn is_config_behind(&self) -> bool {
        self.config_behind.load(Ordering::Relaxed)
    }

    /// Compares free space in the data directory with the floor of the
    /// snapshot in service.
    pub fn check_space(&self) {
        let floor = self.current().config.min_free_space;
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

    pub(crate) fn shutting_down(&self) -> &CancellationToken {
        &self.shutdown
    }

    pub(crate) fn next_session_id(&self) -> String {
        let n = self.session_seq.fetch_add(1, Ordering::Relaxed);
        format!("{:016X}", self.session_base.wrapping_add(n))
    }

    /// Resolves once every log line made so far (tracking and protocol
    /// logs) is written to its file.
    pub async fn flush_logs(&self) {
        self.tracking.flush().await;
        self.protolog.flush().await;
    }
}
