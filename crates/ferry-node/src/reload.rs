//! The one operation every role has, `apply(snapshot)`, and its first
//! caller: re-reading the node's config file on SIGHUP or
//! `POST /config/reload`, with the change summary or every error in the
//! reply, the log and `/status`, and the reload metrics.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use ferry_config::{ClusterConfig, ConfigError};
use serde_json::json;

use crate::listeners::{ListenError, Reconciled};
use crate::metric;
use crate::snapshot::{LoadedConfig, Snapshot};

/// Why a snapshot was not put in service; the old one keeps serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// A new port could not be bound (taken by another process, no
    /// permission).
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The role cannot serve this config (a balancer given a config
    /// without a `[balancer]` section).
    #[error("{0}")]
    Refused(String),
}

/// A node role (worker or balancer) as the core sees it.
pub trait Role: Send + Sync + 'static {
    /// What the role builds from a config besides the config itself (the
    /// worker's TLS acceptors).
    type Material: Send + Sync + 'static;

    /// Builds the material, running every check that can fail before
    /// anything changes (certificate and key files are read here:
    /// blocking, call it off the async threads). `ferry config check`
    /// runs the same.
    ///
    /// # Errors
    /// Every problem found, one line each.
    fn prepare(config: &ClusterConfig) -> Result<Self::Material, Vec<String>>;

    /// The snapshot new sessions get.
    fn current(&self) -> Arc<Snapshot<Self::Material>>;

    /// Puts `snapshot` in service: new ports are bound first, then the
    /// snapshot is swapped in, then removed ports stop accepting. Open
    /// sessions keep the snapshot they started with.
    ///
    /// # Errors
    /// [`ApplyError`] when anything fails; nothing has changed then.
    fn apply(
        &self,
        snapshot: Arc<Snapshot<Self::Material>>,
    ) -> impl Future<Output = Result<Reconciled, ApplyError>> + Send;
}

/// Every problem a config file has, one line each (`FILE:LINE:COL: what`).
pub fn config_errors(e: &ConfigError) -> Vec<String> {
    match e {
        ConfigError::Invalid { file, errors } => {
            errors.iter().map(|l| format!("{file}:{l}")).collect()
        }
        other => vec![other.to_string()],
    }
}

/// Reads the config file at `path` and builds the role's snapshot as
/// `version` (blocking: it reads files).
///
/// # Errors
/// Every problem with the file and with what it names, one line each.
pub fn load_file<R: Role>(path: &Path, version: u64) -> Result<Snapshot<R::Material>, Vec<String>> {
    let loaded = LoadedConfig::read_file(path).map_err(|e| config_errors(&e))?;
    let material = R::prepare(&loaded.config)?;
    Ok(loaded.into_snapshot(version, material))
}

/// How one reload went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub ok: bool,
    /// The version in service after the reload (the old one if it failed).
    pub version: u64,
    pub sha256: String,
    /// What changed (`+ connector "X"`, `~ user "y"`), when it worked.
    pub changes: Vec<String>,
    /// Every error, with line and column for the file's own, when it failed.
    pub errors: Vec<String>,
    pub listeners_added: Vec<String>,
    pub listeners_removed: Vec<String>,
    pub at: SystemTime,
}

impl ReloadReport {
    /// The report as the admin endpoint and `/status` give it.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "result": if self.ok { "ok" } else { "failed" },
            "version": self.version,
            "sha256": self.sha256,
            "changes": self.changes,
            "errors": self.errors,
            "listeners_added": self.listeners_added,
            "listeners_removed": self.listeners_removed,
            "at": rfc3339(self.at),
        })
    }
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Re-reads a role's config file and applies it, one reload at a time.
pub struct Reloader<R: Role> {
    role: Arc<R>,
    path: PathBuf,
    one_at_a_time: tokio::sync::Mutex<()>,
    last: Mutex<Option<ReloadReport>>,
}

impl<R: Role> Reloader<R> {
    /// A reloader of `role` from the file at `path`. Sets the config
    /// metrics for the snapshot in service.
    pub fn new(role: Arc<R>, path: PathBuf) -> Arc<Self> {
        metric::started(&role.current());
        Arc::new(Self {
            role,
            path,
            one_at_a_time: tokio::sync::Mutex::default(),
            last: Mutex::default(),
        })
    }

    /// Reads the file, builds and applies the new snapshot (version + 1;
    /// an unchanged file is applied too, which re-reads certificates). On
    /// any error the old snapshot keeps serving. Logs and counts the
    /// result.
    pub async fn reload(&self) -> ReloadReport {
        let _one = self.one_at_a_time.lock().await;
        let old = self.role.current();
        let path = self.path.clone();
        let version = old.version + 1;
        let built = tokio::task::spawn_blocking(move || load_file::<R>(&path, version))
            .await
            .unwrap_or_else(|e| Err(vec![format!("loading the config failed: {e}")]))
            .and_then(|snapshot| {
                match ferry_config::diff::emptied(&old.config, &snapshot.config) {
                    errors if errors.is_empty() => Ok(snapshot),
                    errors => Err(errors),
                }
            });
        let report = match built {
            Ok(snapshot) => {
                let snapshot = Arc::new(snapshot);
                match self.role.apply(Arc::clone(&snapshot)).await {
                    Ok(done) => ReloadReport {
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
                    Err(e) => failed(&old, vec![e.to_string()]),
                }
            }
            Err(errors) => failed(&old, errors),
        };
        metric::reloaded(&report);
        if report.ok {
            tracing::info!(
                version = report.version,
                sha256 = %report.sha256,
                changes = %summary(&report.changes),
                listeners_added = ?report.listeners_added,
                listeners_removed = ?report.listeners_removed,
                "config reloaded"
            );
        } else {
            tracing::warn!(
                version = report.version,
                errors = %report.errors.join("; "),
                "config reload failed; the old version keeps serving"
            );
        }
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
        report
    }

    /// The `config` part of `/status`: the snapshot in service and the
    /// last reload.
    pub fn status(&self) -> serde_json::Value {
        let s = self.role.current();
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        json!({
            "version": s.version,
            "sha256": s.sha256,
            "source": s.source.to_string(),
            "loaded_at": rfc3339(s.loaded_at),
            "last_reload": last.as_ref().map(ReloadReport::to_json),
        })
    }
}

fn failed<M>(old: &Snapshot<M>, errors: Vec<String>) -> ReloadReport {
    ReloadReport {
        ok: false,
        version: old.version,
        sha256: old.sha256.clone(),
        changes: Vec::new(),
        errors,
        listeners_added: Vec::new(),
        listeners_removed: Vec::new(),
        at: SystemTime::now(),
    }
}

fn summary(changes: &[String]) -> String {
    match changes.is_empty() {
        true => "no changes".into(),
        false => changes.join(", "),
    }
}
