//! A node configured by the control plane (`--control URL[,URL…]`)
//! instead of a file: the glue between the subscriber (ferry-control) and
//! the role's `prepare`/`apply` (ferry-node).
//!
//! Start-up: a last-good copy in the data directory is served at once,
//! then the node subscribes. Without one, the admin endpoint comes up
//! alone (`/readyz` 503, `/status` saying why) and the role is built from
//! the first snapshot that arrives; no SMTP port opens before. Relative
//! paths in the config (certificate files, a directory route's folder)
//! are taken from the node's `--config-dir`, by default its data
//! directory: the control plane's config names files local to each node.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use ferry_config::ClusterConfig;
use ferry_control::proto::NodeRole;
use ferry_control::subscriber::{
    Applier, LastGood, Received, Subscriber, SubscriberOptions, TlsFiles,
};
use ferry_node::{config_errors, LoadedConfig, ReloadReport, Role, Snapshot, Source};
use ferry_telemetry::admin::{AdminAnswer, AdminApi};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The file in the data directory naming the newest control-plane
/// version this node refused; its modification time says when. The
/// control plane does not send a refused version again, so without it a
/// node restarted from its last-good copy would not know it is behind
/// and would go back into the balancers' rotation.
const REFUSED_FILE: &str = "refused-version";

/// `--control` and the flags that go with it.
pub struct ControlArgs {
    pub urls: Vec<String>,
    pub node_id: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// What relative paths in the config are resolved against (`None`:
    /// the data directory).
    pub config_dir: Option<PathBuf>,
    /// How long the node may refuse the control plane's newest config
    /// before it counts as behind ([`Controlled::when_behind`]).
    pub nack_grace: Option<Duration>,
}

/// Called with `true` when the node has refused the control plane's
/// newest config for longer than the grace period, `false` once it
/// applies one.
type BehindHook = Box<dyn Fn(bool) + Send + Sync>;

/// What a role serves with once it is built: its admin API and readiness.
pub struct Serving<R> {
    pub role: Arc<R>,
    pub api: Arc<dyn AdminApi>,
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Cancelled on SIGTERM/SIGINT: the role drains.
    pub shutdown: CancellationToken,
}

/// A snapshot the role may be built from, and who waits for the answer
/// (the subscriber, or nobody for the last-good copy).
struct Candidate<M> {
    snapshot: Snapshot<M>,
    reply: Option<oneshot::Sender<Result<(), String>>>,
}

type First<M> = (Snapshot<M>, oneshot::Sender<Result<(), String>>);

/// A node fed by the control plane.
pub struct Controlled<R: Role> {
    role_name: &'static str,
    data: PathBuf,
    /// What relative paths in a config are resolved against.
    base: PathBuf,
    subscriber: Arc<Subscriber>,
    serving: OnceLock<Serving<R>>,
    /// The last-good copy, built, until the role takes it.
    last_good: Mutex<Option<Snapshot<R::Material>>>,
    /// Why there is nothing to serve, while there is not.
    waiting: Mutex<String>,
    first_tx: mpsc::Sender<First<R::Material>>,
    first_rx: tokio::sync::Mutex<mpsc::Receiver<First<R::Material>>>,
    last: Mutex<Option<ReloadReport>>,
    /// Since when the newest snapshot has been refused (`None`: in step).
    refused_since: Mutex<Option<Instant>>,
    /// A version newer than the last-good copy that was refused before
    /// the node started, and when ([`REFUSED_FILE`]).
    refused_before: Option<(u64, Instant)>,
    nack_grace: Option<Duration>,
    on_behind: OnceLock<BehindHook>,
}

impl<R: Role> Controlled<R> {
    /// Reads the TLS files and the last-good copy in `data` (and builds
    /// it); subscribes to nothing yet.
    ///
    /// # Errors
    /// A bad URL or node ID, a TLS file that cannot be read.
    pub async fn new(
        role_name: &'static str,
        role: NodeRole,
        control: ControlArgs,
        smtp_address: IpAddr,
        data: &Path,
    ) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(data)
            .with_context(|| format!("creating data directory {}", data.display()))?;
        let base = control.config_dir.unwrap_or_else(|| data.to_path_buf());
        let last_good = load_last_good::<R>(data, &base).await;
        let serving = last_good.as_ref().map(|s| (s.version, s.sha256.clone()));
        let refused_before = serving
            .as_ref()
            .and_then(|(version, _)| refused_before(data, *version));
        let subscriber = Subscriber::new(
            SubscriberOptions {
                urls: control.urls,
                node_id: control.node_id,
                role,
                smtp_address: smtp_address.to_string(),
                tls: TlsFiles {
                    ca: control.ca,
                    cert: control.cert,
                    key: control.key,
                },
                data_dir: data.to_path_buf(),
            },
            serving,
        )?;
        let (first_tx, first_rx) = mpsc::channel(1);
        Ok(Arc::new(Self {
            role_name,
            data: data.to_path_buf(),
            base,
            waiting: Mutex::new(format!(
                "waiting for the control plane at {}; no last-good copy in {}",
                subscriber.urls().join(", "),
                data.display()
            )),
            subscriber,
            serving: OnceLock::new(),
            last_good: Mutex::new(last_good),
            first_tx,
            first_rx: tokio::sync::Mutex::new(first_rx),
            last: Mutex::default(),
            refused_since: Mutex::default(),
            refused_before,
            nack_grace: control.nack_grace,
            on_behind: OnceLock::new(),
        }))
    }

    /// Calls `hook(true)` once the serving role has refused the control
    /// plane's newest config for longer than `--nack-grace` (the worker
    /// then refuses balancer probes, so balancers take it out of
    /// rotation), and `hook(false)` when it next applies one. Set once.
    pub fn when_behind(&self, hook: impl Fn(bool) + Send + Sync + 'static) {
        let _ = self.on_behind.set(Box::new(hook));
    }

    /// Follows applies and refusals of `version` for
    /// [`Controlled::when_behind`], and keeps the refusal in
    /// [`REFUSED_FILE`] for a restart.
    fn track_behind(self: &Arc<Self>, applied: bool, version: u64) {
        if self.serving.get().is_none() {
            return;
        }
        let mut since = lock(&self.refused_since);
        if applied {
            *since = None;
            forget_refusal(&self.data);
            if let Some(hook) = self.on_behind.get() {
                hook(false);
            }
            return;
        }
        if since.is_some() {
            return;
        }
        remember_refusal(&self.data, version);
        self.behind_after_grace(&mut since, Instant::now());
    }

    /// Refusing since `at`: behind once the grace period from then is
    /// over, unless a version applies first.
    fn behind_after_grace(self: &Arc<Self>, since: &mut Option<Instant>, at: Instant) {
        *since = Some(at);
        let Some(grace) = self.nack_grace else {
            return;
        };
        let node = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(grace.saturating_sub(at.elapsed())).await;
            // Still refusing since the same moment: behind.
            if *lock(&node.refused_since) == Some(at) {
                if let Some(hook) = node.on_behind.get() {
                    hook(true);
                }
            }
        });
    }

    /// Serving the last-good copy after a restart: a newer version it
    /// refused before still counts, from when it was refused (the control
    /// plane will not send that version again).
    fn resume_refusal(self: &Arc<Self>) {
        let Some((version, at)) = self.refused_before else {
            return;
        };
        tracing::warn!(
            version,
            "version {version} was refused before this start and the control plane does not send it again: behind until a later version applies"
        );
        let mut since = lock(&self.refused_since);
        if since.is_none() {
            self.behind_after_grace(&mut since, at);
        }
    }

    /// The node's subscription (a balancer also watches the worker pool
    /// with it).
    pub fn subscriber(&self) -> Arc<Subscriber> {
        Arc::clone(&self.subscriber)
    }

    /// Whether the role serves and is ready.
    pub fn is_ready(&self) -> bool {
        self.serving.get().is_some_and(|s| (s.ready)())
    }

    /// The next snapshot to build the role from: the last-good copy if
    /// there is one, then each the control plane sends. `None` when
    /// `stop` is cancelled first (SIGTERM while waiting).
    async fn candidate(
        self: &Arc<Self>,
        stop: &CancellationToken,
    ) -> Option<Candidate<R::Material>> {
        if let Some(snapshot) = lock(&self.last_good).take() {
            tracing::info!(
                version = snapshot.version,
                sha256 = %snapshot.sha256,
                "serving the last-good copy of the config; subscribing to the control plane"
            );
            return Some(Candidate {
                snapshot,
                reply: None,
            });
        }
        let mut rx = self.first_rx.lock().await;
        // Say once why nothing is served, when the first attempt failed.
        let announce = {
            let me = Arc::clone(self);
            async move {
                for _ in 0..600 {
                    let s = me.subscriber.status();
                    if let Some(error) = s.last_error.filter(|_| !s.connected) {
                        let why = format!(
                            "no control plane answered ({error}) and no last-good copy in {}",
                            me.data.display()
                        );
                        tracing::warn!(why = %why, "no config to serve: no SMTP port is open");
                        *lock(&me.waiting) = why;
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                std::future::pending::<()>().await
            }
        };
        tokio::select! {
            first = rx.recv() => first.map(|(snapshot, reply)| Candidate { snapshot, reply: Some(reply) }),
            () = stop.cancelled() => None,
            () = announce => None,
        }
    }

    /// The role is built from the candidate and serves: later snapshots go
    /// to its `apply`.
    fn serve(&self, reply: Option<oneshot::Sender<Result<(), String>>>, serving: Serving<R>) {
        ferry_node::metric::started(&serving.role.current());
        let _ = self.serving.set(serving);
        if let Some(reply) = reply {
            let _ = reply.send(Ok(()));
        }
    }

    /// The role could not be built from the candidate (a port taken): the
    /// subscriber NACKs it and the node waits for the next.
    fn refuse(
        &self,
        version: u64,
        reply: Option<oneshot::Sender<Result<(), String>>>,
        error: String,
    ) {
        tracing::warn!(version, error = %error, "cannot serve the config");
        *lock(&self.waiting) = format!("version {version} could not be put in service: {error}");
        if let Some(reply) = reply {
            let _ = reply.send(Err(error));
        }
    }

    /// Subscribes, for the life of the process.
    fn subscribe(self: &Arc<Self>) {
        let subscriber = Arc::clone(&self.subscriber);
        tokio::spawn(subscriber.run(Apply(Arc::clone(self))));
    }

    /// Answers SIGHUP for the life of the process: there is no file to
    /// re-read.
    fn refuse_hangups(self: &Arc<Self>, mut hangups: tokio::signal::unix::Signal) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                tracing::warn!("SIGHUP ignored: {}", me.not_a_file());
            }
        });
    }

    fn not_a_file(&self) -> String {
        format!(
            "the config comes from the control plane {}; apply changes there (ferry ctl apply)",
            self.subscriber.urls().join(", ")
        )
    }

    /// The `config` part of `/status`.
    fn status(&self) -> serde_json::Value {
        let sub = self.subscriber.status();
        let report = sub.last_report.as_ref().map(|r| {
            json!({
                "result": if r.error.is_none() { "ack" } else { "nack" },
                "for_version": r.for_version,
                "applied_version": r.applied_version,
                "sha256": r.sha256,
                "error": r.error,
                "delivered": r.delivered,
                "at": rfc3339(r.at),
            })
        });
        let control = json!({
            "urls": self.subscriber.urls(),
            "connected": sub.connected,
            "url": sub.url,
            "since": sub.since.map(rfc3339),
            "last_error": sub.last_error,
            "failed_attempts": sub.failed_attempts,
            "last_report": report,
            "last_good_error": sub.last_good_error,
        });
        let Some(serving) = self.serving.get() else {
            return json!({
                "state": "waiting",
                "why": *lock(&self.waiting),
                "source": format!("control plane {}", self.subscriber.urls().join(", ")),
                "control_plane": control,
            });
        };
        let s = serving.role.current();
        json!({
            "state": "serving",
            "version": s.version,
            "sha256": s.sha256,
            "source": s.source.to_string(),
            "loaded_at": rfc3339(s.loaded_at),
            "control_plane": control,
            "last_apply": lock(&self.last).as_ref().map(ReloadReport::to_json),
        })
    }

    /// Applies a snapshot from the subscriber: to the role if it serves,
    /// else hands it to whoever waits in [`Controlled::candidate`].
    async fn apply(&self, received: Received) -> Result<(), String> {
        let base = self.base.clone();
        let version = received.version;
        let built = tokio::task::spawn_blocking(move || build::<R>(&received, &base))
            .await
            .unwrap_or_else(|e| Err(vec![format!("building the config failed: {e}")]));
        let Some(serving) = self.serving.get() else {
            let snapshot = built.map_err(|errors| {
                let error = errors.join("\n");
                self.refuse(version, None, error.clone());
                error
            })?;
            let (reply, answer) = oneshot::channel();
            self.first_tx
                .send((snapshot, reply))
                .await
                .map_err(|_| "the node is stopping".to_string())?;
            return answer
                .await
                .unwrap_or_else(|_| Err("the node is stopping".into()));
        };
        let old = serving.role.current();
        let outcome = match built {
            Ok(snapshot) => {
                let snapshot = Arc::new(snapshot);
                match serving.role.apply(Arc::clone(&snapshot)).await {
                    Ok(done) => Ok((snapshot, done)),
                    Err(e) => Err(vec![e.to_string()]),
                }
            }
            Err(errors) => Err(errors),
        };
        let report = match &outcome {
            Ok((snapshot, done)) => ReloadReport {
                ok: true,
                version: snapshot.version,
                sha256: snapshot.sha256.clone(),
                changes: ferry_config::diff::changes(&old.config, &snapshot.config)
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                errors: Vec::new(),
                listeners_added: done.added.iter().map(ToString::to_string).collect(),
                listeners_removed: done.removed.iter().map(ToString::to_string).collect(),
                at: SystemTime::now(),
            },
            Err(errors) => ReloadReport {
                ok: false,
                version: old.version,
                sha256: old.sha256.clone(),
                changes: Vec::new(),
                errors: errors.clone(),
                listeners_added: Vec::new(),
                listeners_removed: Vec::new(),
                at: SystemTime::now(),
            },
        };
        ferry_node::metric::reloaded(&report);
        if report.ok {
            tracing::info!(
                version = report.version,
                sha256 = %report.sha256,
                changes = %report.changes.join(", "),
                listeners_added = ?report.listeners_added,
                listeners_removed = ?report.listeners_removed,
                "{} applied the control plane's config",
                self.role_name
            );
        }
        *lock(&self.last) = Some(report);
        outcome.map(|_| ()).map_err(|errors| errors.join("\n"))
    }
}

/// The subscriber's side of [`Controlled`].
struct Apply<R: Role>(Arc<Controlled<R>>);

impl<R: Role> Applier for Apply<R> {
    async fn apply(&self, snapshot: Received) -> Result<(), String> {
        let version = snapshot.version;
        let result = self.0.apply(snapshot).await;
        self.0.track_behind(result.is_ok(), version);
        result
    }
}

impl<R: Role> AdminApi for Controlled<R> {
    fn handle<'a>(&'a self, method: &'a str, path: &'a str) -> AdminAnswer<'a> {
        Box::pin(async move {
            match (method, path) {
                // 409: the request conflicts with where the config lives.
                ("POST", "/config/reload") => {
                    let why = self.not_a_file();
                    tracing::warn!("config reload refused: {why}");
                    Some((409, json!({ "error": why }).to_string()))
                }
                (_, "/config/reload") => Some((405, r#"{"error":"POST /config/reload"}"#.into())),
                ("GET", "/status") => {
                    let mut status = match self.serving.get() {
                        Some(s) => {
                            let (_, body) = s.api.handle(method, path).await?;
                            serde_json::from_str(&body).unwrap_or_else(|_| json!({}))
                        }
                        None => json!({}),
                    };
                    if let Some(map) = status.as_object_mut() {
                        map.insert("config".into(), self.status());
                    }
                    Some((200, status.to_string()))
                }
                _ => match self.serving.get() {
                    Some(s) => s.api.handle(method, path).await,
                    None => None,
                },
            }
        })
    }

    fn allowed(&self, path: &str) -> &'static str {
        match (path, self.serving.get()) {
            ("/config/reload", _) => "POST",
            (_, Some(s)) => s.api.allowed(path),
            (_, None) => "",
        }
    }
}

/// Builds the role's snapshot from a control-plane config (blocking: it
/// reads certificate files, relative to `base`).
fn build<R: Role>(received: &Received, base: &Path) -> Result<Snapshot<R::Material>, Vec<String>> {
    let text = std::str::from_utf8(&received.config)
        .map_err(|e| vec![format!("the config is not UTF-8: {e}")])?;
    let name = format!("version {}", received.version);
    let config = ClusterConfig::parse(&name, text, base).map_err(|e| config_errors(&e))?;
    let material = R::prepare(&config)?;
    let loaded = LoadedConfig {
        config: Arc::new(config),
        sha256: received.sha256.clone(),
        source: Source::ControlPlane(received.url.clone()),
    };
    Ok(loaded.into_snapshot(received.version, material))
}

/// The last-good copy in `data`, built; `None` (logged) when there is
/// none or it cannot be served any more.
async fn load_last_good<R: Role>(data: &Path, base: &Path) -> Option<Snapshot<R::Material>> {
    let dir = data.to_path_buf();
    let base = base.to_path_buf();
    let built = tokio::task::spawn_blocking(move || {
        let copy = LastGood::load(&dir).map_err(|e| vec![e.to_string()])?;
        copy.map(|c| build::<R>(&Received::from(c), &base))
            .transpose()
    })
    .await
    .unwrap_or_else(|e| Err(vec![e.to_string()]));
    match built {
        Ok(snapshot) => snapshot,
        Err(errors) => {
            tracing::warn!(
                errors = %errors.join("; "),
                "the last-good copy of the config cannot be served; waiting for the control plane"
            );
            None
        }
    }
}

/// The version in [`REFUSED_FILE`] if it is newer than `serving`, with
/// when it was refused (the file's modification time).
fn refused_before(data: &Path, serving: u64) -> Option<(u64, Instant)> {
    let path = data.join(REFUSED_FILE);
    let version: u64 = std::fs::read_to_string(&path).ok()?.trim().parse().ok()?;
    if version <= serving {
        return None;
    }
    let age = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .unwrap_or_default();
    let now = Instant::now();
    Some((version, now.checked_sub(age).unwrap_or(now)))
}

/// Notes that `version` was refused (a small file; losing it only means a
/// restart starts the grace period again).
fn remember_refusal(data: &Path, version: u64) {
    let path = data.join(REFUSED_FILE);
    if let Err(e) = std::fs::write(&path, format!("{version}\n")) {
        tracing::warn!(path = %path.display(), error = %e, "cannot note the refused version");
    }
}

fn forget_refusal(data: &Path) {
    let path = data.join(REFUSED_FILE);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the refused-version note");
        }
        _ => {}
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Runs a control-plane node: the admin endpoint first, then the role
/// once there is a config (`make` builds and starts it and returns its
/// SMTP addresses; an error there refuses that snapshot and the node
/// waits for the next, except for the last-good copy, where it ends the
/// process as a bad `--config` file would). Returns `None` if a signal
/// came while waiting.
pub async fn start<R: Role>(
    node: &Arc<Controlled<R>>,
    listen: IpAddr,
    admin_addr: SocketAddr,
    token: Option<Arc<str>>,
    hangups: tokio::signal::unix::Signal,
    mut make: impl AsyncFnMut(Snapshot<R::Material>) -> anyhow::Result<(Serving<R>, Vec<SocketAddr>)>,
) -> anyhow::Result<Option<Arc<R>>> {
    let ready = {
        let n = Arc::clone(node);
        Arc::new(move || n.is_ready())
    };
    let api: Arc<dyn AdminApi> = Arc::clone(node) as Arc<dyn AdminApi>;
    let admin = crate::node::Admin { api, ready, token };
    crate::node::serve_admin(node.role_name, admin_addr, admin).await?;
    node.refuse_hangups(hangups);
    let stop = CancellationToken::new();
    crate::node::cancel_on_signal(stop.clone());
    let from_last_good = lock(&node.last_good).is_some();
    if !from_last_good {
        println!("{} waiting", node.role_name);
        node.subscribe();
    }
    loop {
        let Some(Candidate { snapshot, reply }) = node.candidate(&stop).await else {
            return Ok(None);
        };
        let version = snapshot.version;
        match make(snapshot).await {
            Ok((serving, smtp)) => {
                let role = Arc::clone(&serving.role);
                let role_stop = serving.shutdown.clone();
                node.serve(reply, serving);
                if from_last_good {
                    node.resume_refusal();
                }
                crate::node::announce(node.role_name, listen, &smtp);
                tokio::spawn(async move {
                    stop.cancelled().await;
                    role_stop.cancel();
                });
                if from_last_good {
                    node.subscribe();
                }
                return Ok(Some(role));
            }
            Err(e) if reply.is_none() => {
                return Err(e.context(format!("serving the last-good copy (version {version})")))
            }
            Err(e) => node.refuse(version, reply, format!("{e:#}")),
        }
    }
}

/// Where a node's config comes from: `--config FILE` or `--control URL…`
/// with its identity (exactly one of the two).
#[derive(clap::Args)]
pub struct SourceFlags {
    /// The cluster config file (re-read on SIGHUP and POST /config/reload).
    #[arg(long, required_unless_present = "control", conflicts_with = "control")]
    pub config: Option<PathBuf>,
    /// Subscribe to the control plane instead of reading a file:
    /// https://HOST:PORT, several comma-separated (tried in turn).
    #[arg(long, value_delimiter = ',', requires_all = ["node_id", "ca", "cert", "key"])]
    pub control: Option<Vec<String>>,
    /// This node's ID, as in its certificate (spiffe://ferry/node/ID).
    #[arg(long, requires = "control")]
    pub node_id: Option<String>,
    /// The cluster CA certificate (PEM): the control plane must present a
    /// certificate it issued.
    #[arg(long, requires = "control")]
    pub ca: Option<PathBuf>,
    /// This node's certificate (PEM), issued by the cluster CA.
    #[arg(long, requires = "control")]
    pub cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, requires = "control")]
    pub key: Option<PathBuf>,
    /// With --control: the folder relative paths in the config
    /// (certificate files) are taken from; the data directory if unset.
    #[arg(long, requires = "control")]
    pub config_dir: Option<PathBuf>,
    /// With --control: how long a worker may refuse the control plane's
    /// newest config (a NACK) before it refuses the balancers' probes, so
    /// that static backends leave their rotation (e.g. 30s, 2m); unset,
    /// never (a version every worker refuses would take them all out; a
    /// balancer's pool from the control plane needs no such flag).
    #[arg(long, requires = "control", value_parser = humantime::parse_duration)]
    pub nack_grace: Option<Duration>,
}

/// Where a node's config comes from.
pub enum ConfigSource {
    File(PathBuf),
    Control(ControlArgs),
}

impl SourceFlags {
    /// The source the flags name.
    ///
    /// # Errors
    /// Neither or an incomplete `--control` (clap checks this first).
    pub fn source(self) -> anyhow::Result<ConfigSource> {
        match (self.config, self.control) {
            (Some(path), None) => Ok(ConfigSource::File(path)),
            (None, Some(urls)) => {
                let (Some(node_id), Some(ca), Some(cert), Some(key)) =
                    (self.node_id, self.ca, self.cert, self.key)
                else {
                    anyhow::bail!("--control needs --node-id, --ca, --cert and --key");
                };
                Ok(ConfigSource::Control(ControlArgs {
                    urls,
                    node_id,
                    ca,
                    cert,
                    key,
                    config_dir: self.config_dir,
                    nack_grace: self.nack_grace,
                }))
            }
            _ => anyhow::bail!("give exactly one of --config FILE and --control URL"),
        }
    }
}
