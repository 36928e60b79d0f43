//! The node side of the control plane: subscribe with `Watch`, hand each
//! snapshot to the node, keep the one that worked as last-good, report
//! `ACK` or `NACK`, and reconnect with backoff when the stream ends.
//!
//! The subscriber knows nothing of workers or balancers: the node passes
//! an [`Applier`] that builds the role's material from the config text and
//! puts it in service. That keeps this crate free of the data plane (the
//! control-plane server is built from the same crate) and the glue, a few
//! lines, in the binary.
//!
//! What a node relies on:
//! - the control planes named are tried in turn, one per attempt, with
//!   gRPC's connection backoff between attempts ([`backoff`]), reset after
//!   a stream that was open; HTTP/2 keepalive pings notice a control plane
//!   that died without closing its connections;
//! - a balancer also watches the worker pool ([`Subscriber::watch_pool`]),
//!   kept through an outage like the config;
//! - a snapshot is reported only after it was applied and written as
//!   last-good ([`last_good`]); one that cannot be applied is reported
//!   with its error while the version in service keeps serving;
//! - while no control plane answers the node keeps serving what it has;
//!   a disconnect and the reconnect that ends it are logged once each.

pub mod backoff;
pub mod last_good;
mod pool;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rand::SeedableRng as _;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::proto::config_discovery_client::ConfigDiscoveryClient;
use crate::proto::{ConfigSnapshot, NodeRole, ReportRequest, WatchRequest};
pub use backoff::Backoff;
pub use last_good::{LastGood, LastGoodError};

/// 1 while a Watch stream is open, else 0.
pub const CONNECTED: &str = "ferry_control_connected";
/// Reports sent to the control plane, by result (`ack`, `nack`).
pub const REPORTS: &str = "ferry_control_reports_total";

/// How long one connection attempt (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// An HTTP/2 ping this often, idle or not; a control plane that does not
/// answer one within [`KEEPALIVE_TIMEOUT`] is taken for dead. 20 s + 10 s:
/// a dead control plane is noticed within half a minute, and the pings
/// cost nothing worth counting.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a Report may take before the node gives up on it (the next
/// Watch tells the control plane what the node serves anyway).
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The files of the node's mTLS identity.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The cluster CA certificate (PEM): the control plane must present a
    /// certificate it signed.
    pub ca: PathBuf,
    /// The node's certificate and key (PEM), issued by the cluster CA for
    /// `spiffe://ferry/node/ID`.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a subscriber needs.
#[derive(Debug, Clone)]
pub struct SubscriberOptions {
    /// `https://HOST:PORT` of each control-plane replica, tried in turn.
    pub urls: Vec<String>,
    /// The node ID, as in the node's certificate.
    pub node_id: String,
    pub role: NodeRole,
    /// The node's SMTP address as the control plane shows it.
    pub smtp_address: String,
    pub tls: TlsFiles,
    /// Where the last-good copy lives.
    pub data_dir: PathBuf,
}

/// Why a subscriber could not be set up (at start-up: a flag or a file).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    #[error("no control-plane URL given")]
    NoUrl,
    #[error("{0:?} is not a control-plane URL: use https://HOST:PORT")]
    BadUrl(String),
    #[error("node ID: {0}")]
    NodeId(#[from] crate::identity::IdentityError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A snapshot for the node to put in service.
#[derive(Debug, Clone)]
pub struct Received {
    /// The control plane's version.
    pub version: u64,
    /// SHA-256 of `config`, lower-case hex (checked against the text).
    pub sha256: String,
    /// The config text, TOML.
    pub config: Bytes,
    /// The control plane it came from (or, for a last-good copy, came
    /// from once).
    pub url: String,
}

impl From<LastGood> for Received {
    fn from(l: LastGood) -> Self {
        Self {
            version: l.version,
            sha256: l.sha256,
            config: l.config,
            url: l.source,
        }
    }
}

/// What the node does with a snapshot.
pub trait Applier: Send + Sync + 'static {
    /// Builds and applies `snapshot`. `Err` holds every reason it could
    /// not (one line each); the version in service keeps serving then.
    fn apply(&self, snapshot: Received) -> impl Future<Output = Result<(), String>> + Send;
}

/// The last report the node made (or tried to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastReport {
    pub for_version: u64,
    pub applied_version: u64,
    pub sha256: String,
    /// `None` for an ACK.
    pub error: Option<String>,
    pub at: SystemTime,
    /// Whether the control plane took it.
    pub delivered: bool,
}

/// What the subscriber knows now, for `/status`.
#[derive(Debug, Clone, Default)]
pub struct SubscriberStatus {
    /// A Watch stream is open.
    pub connected: bool,
    /// The control plane connected to, or last tried.
    pub url: Option<String>,
    /// When the stream opened or ended last.
    pub since: Option<SystemTime>,
    /// Why the last attempt or stream failed.
    pub last_error: Option<String>,
    /// Attempts that failed since the last stream that opened.
    pub failed_attempts: u32,
    /// The version and SHA-256 in service (0 and empty before any).
    pub version: u64,
    pub sha256: String,
    pub last_report: Option<LastReport>,
    /// Why the last-good copy could not be written, if it could not.
    pub last_good_error: Option<String>,
}

/// One node's subscription to the control plane.
pub struct Subscriber {
    options: SubscriberOptions,
    tls: ClientTlsConfig,
    status: Mutex<SubscriberStatus>,
}

impl Subscriber {
    /// Checks the options and reads the TLS files. `serving` is what the
    /// node serves already (its last-good copy), sent as the known version
    /// so that the control plane sends nothing when it is current.
    ///
    /// # Errors
    /// [`SubscribeError`] for a missing or malformed URL, a bad node ID,
    /// or a TLS file that cannot be read.
    pub fn new(
        options: SubscriberOptions,
        serving: Option<(u64, String)>,
    ) -> Result<Arc<Self>, SubscribeError> {
        if options.urls.is_empty() {
            return Err(SubscribeError::NoUrl);
        }
        for url in &options.urls {
            let ok = url.strip_prefix("https://").is_some_and(|rest| {
                !rest.is_empty() && rest.parse::<tonic::codegen::http::Uri>().is_ok()
            });
            if !ok {
                return Err(SubscribeError::BadUrl(url.clone()));
            }
        }
        crate::identity::valid_name(&options.node_id)?;
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| SubscribeError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&options.tls.ca)?))
            .identity(Identity::from_pem(
                read(&options.tls.cert)?,
                read(&options.tls.key)?,
            ))
            .timeout(CONNECT_TIMEOUT);
        describe_metrics();
        let (version, sha256) = serving.unwrap_or_default();
        Ok(Arc::new(Self {
            options,
            tls,
            status: Mutex::new(SubscriberStatus {
                version,
                sha256,
                ..SubscriberStatus::default()
            }),
        }))
    }

    /// What the subscriber knows now.
    pub fn status(&self) -> SubscriberStatus {
        self.lock().clone()
    }

    /// The URLs it subscribes to, as given.
    pub fn urls(&self) -> &[String] {
        &self.options.urls
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SubscriberStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes for the life of the process: each URL in turn, with
    /// backoff between attempts; each snapshot goes to `applier`.
    pub async fn run<A: Applier>(self: Arc<Self>, applier: A) {
        let mut backoff = Backoff::default();
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let urls = self.options.urls.clone();
        for url in urls.iter().cycle() {
            let (opened, why) = self.attempt(url, &applier).await;
            self.ended(url, opened, &why);
            if opened {
                backoff.reset();
            }
            tokio::time::sleep(backoff.next_delay(&mut rng)).await;
        }
    }

    /// One connection and its stream, until it ends: whether the stream
    /// opened, and why it ended.
    async fn attempt<A: Applier>(&self, url: &str, applier: &A) -> (bool, String) {
        let channel = match self.connect(url).await {
            Ok(c) => c,
            Err(why) => return (false, why),
        };
        let mut client = ConfigDiscoveryClient::new(channel);
        let (known_version, known_sha256) = {
            let s = self.lock();
            (s.version, s.sha256.clone())
        };
        let request = WatchRequest {
            node_id: self.options.node_id.clone(),
            role: self.options.role as i32,
            smtp_address: self.options.smtp_address.clone(),
            known_version,
            known_sha256,
        };
        let mut stream = match client.watch(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => return (false, describe_status(&status)),
        };
        self.connected(url);
        loop {
            match stream.message().await {
                Ok(Some(snapshot)) => self.handle(&mut client, url, snapshot, applier).await,
                Ok(None) => return (true, "the control plane ended the stream".into()),
                Err(status) => return (true, describe_status(&status)),
            }
        }
    }

    async fn connect(&self, url: &str) -> Result<Channel, String> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .and_then(|e| e.tls_config(self.tls.clone()))
            .map_err(|e| chain(&e))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        endpoint.connect().await.map_err(|e| chain(&e))
    }

    fn connected(&self, url: &str) {
        let mut s = self.lock();
        match s.failed_attempts {
            0 => tracing::info!(control_plane = url, "subscribed to the control plane"),
            n => tracing::info!(
                control_plane = url,
                failed_attempts = n,
                last_error = s.last_error.as_deref().unwrap_or(""),
                "subscribed to the control plane again"
            ),
        }
        s.connected = true;
        s.url = Some(url.to_string());
        s.since = Some(SystemTime::now());
        s.failed_attempts = 0;
        metrics::gauge!(CONNECTED).set(1.0);
    }

    /// Logs a lost stream, or the first failed attempt after one, once;
    /// later failures only at debug level (they come every few seconds
    /// to two minutes while the control plane is down).
    fn ended(&self, url: &str, opened: bool, why: &str) {
        let mut s = self.lock();
        if opened {
            tracing::warn!(
                control_plane = url,
                error = why,
                version = s.version,
                "lost the control plane; serving version {} until it is back",
                s.version
            );
            s.since = Some(SystemTime::now());
        } else if s.failed_attempts == 0 && s.since.is_none() {
            tracing::warn!(
                control_plane = url,
                error = why,
                "cannot reach the control plane; retrying with backoff"
            );
        } else {
            tracing::debug!(
                control_plane = url,
                error = why,
                "control plane unreachable"
            );
        }
        if !opened {
            s.failed_attempts = s.failed_attempts.saturating_add(1);
        }
        s.connected = false;
        s.url = Some(url.to_string());
        s.last_error = Some(why.to_string());
        metrics::gauge!(CONNECTED).set(0.0);
    }

    async fn handle<A: Applier>(
        &self,
        client: &mut ConfigDiscoveryClient<Channel>,
        url: &str,
        snapshot: ConfigSnapshot,
        applier: &A,
    ) {
        let meta = snapshot.meta.unwrap_or_default();
        let sha256 = sha256_hex(&snapshot.config);
        let (old_version, old_sha256) = {
            let s = self.lock();
            (s.version, s.sha256.clone())
        };
        let result = if !meta.sha256.eq_ignore_ascii_case(&sha256) {
            Err(format!(
                "the config text's SHA-256 is {sha256}, not {} as its metadata says",
                meta.sha256
            ))
        } else if meta.version == old_version && sha256 == old_sha256 {
            // Already in service (the stream's first message after a
            // reconnect that raced a change): nothing to do but say so.
            Ok(())
        } else {
            let received = Received {
                version: meta.version,
                sha256: sha256.clone(),
                config: snapshot.config.clone(),
                url: url.to_string(),
            };
            applier.apply(received).await
        };
        let report = match result {
            Ok(()) => {
                self.keep(LastGood {
                    version: meta.version,
                    sha256: sha256.clone(),
                    source: url.to_string(),
                    config: snapshot.config,
                })
                .await;
                ReportRequest {
                    node_id: self.options.node_id.clone(),
                    for_version: meta.version,
                    applied_version: meta.version,
                    sha256,
                    error: String::new(),
                }
            }
            Err(error) => {
                tracing::warn!(
                    version = meta.version,
                    serving = old_version,
                    error = %error,
                    "cannot apply the control plane's config; the version in service keeps serving"
                );
                ReportRequest {
                    node_id: self.options.node_id.clone(),
                    for_version: meta.version,
                    applied_version: old_version,
                    sha256: old_sha256,
                    error,
                }
            }
        };
        self.report(client, report).await;
    }

    /// Records `applied` as in service and writes it as last-good. A
    /// failed write is logged and shown in the status: the node serves
    /// the version anyway, and a restart would then start from the copy
    /// before it.
    async fn keep(&self, applied: LastGood) {
        {
            let mut s = self.lock();
            s.version = applied.version;
            s.sha256 = applied.sha256.clone();
        }
        let dir = self.options.data_dir.clone();
        let written = tokio::task::spawn_blocking(move || applied.store(&dir))
            .await
            .unwrap_or_else(|e| {
                Err(LastGoodError::Io {
                    path: self.options.data_dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                })
            });
        let mut s = self.lock();
        s.last_good_error = match written {
            Ok(()) => None,
            Err(e) => {
                tracing::error!(error = %e, "cannot write the last-good copy of the config");
                Some(e.to_string())
            }
        };
    }

    async fn report(&self, client: &mut ConfigDiscoveryClient<Channel>, report: ReportRequest) {
        let ack = report.error.is_empty();
        let mut last = LastReport {
            for_version: report.for_version,
            applied_version: report.applied_version,
            sha256: report.sha256.clone(),
            error: (!ack).then(|| report.error.clone()),
            at: SystemTime::now(),
            delivered: false,
        };
        let sent = tokio::time::timeout(REPORT_TIMEOUT, client.report(report)).await;
        match sent {
            Ok(Ok(_)) => {
                last.delivered = true;
                let result = if ack { "ack" } else { "nack" };
                metrics::counter!(REPORTS, "result" => result).increment(1);
                tracing::info!(
                    version = last.for_version,
                    applied = last.applied_version,
                    result,
                    "reported to the control plane"
                );
            }
            Ok(Err(status)) => tracing::warn!(
                version = last.for_version,
                error = %describe_status(&status),
                "the control plane refused the report"
            ),
            Err(_) => tracing::warn!(
                version = last.for_version,
                "the report to the control plane timed out"
            ),
        }
        self.lock().last_report = Some(last);
    }
}

fn describe_metrics() {
    metrics::describe_gauge!(CONNECTED, "1 while the node's Watch stream is open, else 0");
    metrics::describe_counter!(
        REPORTS,
        "Reports the node made to the control plane, by result (ack, nack)"
    );
    metrics::gauge!(CONNECTED).set(0.0);
    metrics::counter!(REPORTS, "result" => "ack").increment(0);
    metrics::counter!(REPORTS, "result" => "nack").increment(0);
}

/// An error with its causes: tonic's own says only "transport error".
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}

fn describe_status(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(status) {
        text = format!("{text} ({})", chain(source));
    }
    text
}

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
