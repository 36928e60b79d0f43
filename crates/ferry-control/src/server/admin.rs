//! `ConfigAdmin`: what `ferry ctl` calls. Every call needs an admin
//! certificate; the admin's name is the author of what it applies (and
//! is logged with a drain).

use std::path::Path;

use bytes::Bytes;
use ferry_config::{ClusterConfig, ConfigError};
use tonic::{Request, Response, Status};

use super::{admin, now, store_status, version_of, ControlPlane};
use crate::proto::config_admin_server::ConfigAdmin;
use crate::proto::{
    ApplyRequest, ApplyResponse, ConfigSnapshot, DiffRequest, DiffResponse, DrainRequest,
    DrainResponse, GetRequest, HistoryRequest, HistoryResponse, NodeRole, NodeStatus, NodesRequest,
    NodesResponse, RollbackRequest, SnapshotMeta,
};
use crate::store::Store;
use crate::{sha256_hex, MAX_CONFIG_OCTETS};

/// The name a config gets in error locations when the admin gave none.
const UNNAMED: &str = "config";

/// One change to store: Apply's and Rollback's common part.
struct Proposal {
    author: String,
    expected: u64,
    name: String,
    config: Bytes,
    message: String,
    dry_run: bool,
    force: bool,
    rollback_of: u64,
}

/// Validates `config` as the nodes do. Relative paths (certificates,
/// directories) are node-local and only resolved by each node, so none is
/// read here.
fn parse(name: &str, config: &[u8]) -> Result<ClusterConfig, Status> {
    if config.len() > MAX_CONFIG_OCTETS {
        return Err(Status::invalid_argument(format!(
            "the config is {} octets; the most the control plane takes is {MAX_CONFIG_OCTETS} octets",
            config.len()
        )));
    }
    let text = std::str::from_utf8(config)
        .map_err(|e| Status::invalid_argument(format!("{name}: the config is not UTF-8 ({e})")))?;
    ClusterConfig::parse(name, text, Path::new(".")).map_err(|e| invalid(name, &e))
}

/// The most of an error list a reply carries, in octets: the status
/// message travels in an HTTP/2 header (`grpc-message`), and a header
/// block over the peer's limit (16 KiB by default) breaks the call.
const ERRORS_SHOWN_OCTETS: usize = 8 * 1024;

/// INVALID_ARGUMENT with every error, `NAME:LINE:COLUMN: what`, one a
/// line; past [`ERRORS_SHOWN_OCTETS`], the first ones and how many more.
fn invalid(name: &str, e: &ConfigError) -> Status {
    let lines: Vec<String> = match e.errors() {
        [] => vec![format!("{name}: {e}")],
        errors => errors
            .iter()
            .map(|l| format!("{name}:{}:{}: {}", l.line, l.column, l.message))
            .collect(),
    };
    let mut shown = String::new();
    for (i, line) in lines.iter().enumerate() {
        if shown.len() + line.len() > ERRORS_SHOWN_OCTETS {
            shown.push_str(&format!(
                "... and {} more errors (`ferry config check FILE` lists them all)",
                lines.len() - i
            ));
            break;
        }
        shown.push_str(line);
        shown.push('\n');
    }
    Status::invalid_argument(shown.trim_end().to_string())
}

/// The longest change message kept, in characters.
const MESSAGE_CHARS: usize = 1024;

/// A change message is one line of text: a newline or another control
/// character would forge lines in the log and in `ferry ctl history`.
fn check_message(message: &str) -> Result<(), Status> {
    if message.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "the message may not hold control characters (a newline, a tab): keep it to one line",
        ));
    }
    if message.chars().count() > MESSAGE_CHARS {
        return Err(Status::invalid_argument(format!(
            "the message is longer than {MESSAGE_CHARS} characters"
        )));
    }
    Ok(())
}

/// A stored config, parsed to compare against. A stored version always
/// parsed when it was applied; if this build refuses it, say so rather
/// than diff against nothing.
fn parse_stored(snapshot: &ConfigSnapshot) -> Result<ClusterConfig, Status> {
    let name = format!("version {}", version_of(snapshot));
    parse(&name, &snapshot.config).map_err(|e| {
        Status::failed_precondition(format!(
            "the stored {name} does not validate with this build: {}",
            e.message()
        ))
    })
}

fn empty_config() -> Result<ClusterConfig, Status> {
    ClusterConfig::parse(UNNAMED, "", Path::new("."))
        .map_err(|e| Status::internal(format!("an empty config does not parse: {e}")))
}

fn lines(changes: &[ferry_config::diff::Change]) -> Vec<String> {
    changes.iter().map(ToString::to_string).collect()
}

impl<S: Store> ControlPlane<S> {
    async fn propose(&self, p: Proposal) -> Result<ApplyResponse, Status> {
        let new = parse(&p.name, &p.config)?;
        let current = self.current();
        let current_version = current.as_deref().map_or(0, version_of);
        if p.expected != current_version {
            return Err(Status::aborted(format!(
                "version {} is no longer current: the current version is {current_version}; \
                 read it and retry",
                p.expected
            )));
        }
        let old = match current.as_deref() {
            Some(snapshot) => parse_stored(snapshot)?,
            None => empty_config()?,
        };
        // Workers in the registry's rotation are backends too: a config
        // that leaves the balancers to the registry empties nothing.
        let emptied = ferry_config::diff::emptied_with_pool(&old, &new, self.in_rotation().await);
        if !emptied.is_empty() && !p.force {
            return Err(Status::failed_precondition(format!(
                "{}\n(force stores it anyway: `ferry ctl apply --force`)",
                emptied.join("\n")
            )));
        }
        let changes = lines(&ferry_config::diff::changes(&old, &new));
        let meta = SnapshotMeta {
            version: current_version + 1,
            sha256: sha256_hex(&p.config),
            author: p.author,
            created_at: Some(now()),
            message: p.message,
            size: p.config.len() as u64,
            rollback_of: p.rollback_of,
        };
        if p.dry_run {
            return Ok(ApplyResponse {
                meta: Some(meta),
                changes,
                dry_run: true,
            });
        }
        let snapshot = ConfigSnapshot {
            meta: Some(meta.clone()),
            config: p.config,
        };
        self.shared
            .store
            .append(current_version, snapshot)
            .await
            .map_err(store_status)?;
        tracing::info!(
            version = meta.version,
            sha256 = %meta.sha256,
            author = %meta.author,
            message = %meta.message,
            rollback_of = meta.rollback_of,
            changes = %changes.join(", "),
            "config applied"
        );
        Ok(ApplyResponse {
            meta: Some(meta),
            changes,
            dry_run: false,
        })
    }

    /// How many workers are in the registry's rotation now (0 when the
    /// registry cannot be read: then the rule is the static one).
    async fn in_rotation(&self) -> usize {
        match self.registry().await {
            Ok((_, nodes)) => nodes.iter().filter(|n| n.in_rotation).count(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the node registry");
                0
            }
        }
    }

    /// Drain's and Undrain's common part.
    async fn set_drain(
        &self,
        request: Request<DrainRequest>,
        on: bool,
    ) -> Result<Response<DrainResponse>, Status> {
        let author = admin(&request)?;
        let node_id = request.into_inner().node_id;
        crate::identity::valid_name(&node_id)
            .map_err(|e| Status::invalid_argument(format!("node ID {node_id:?}: {e}")))?;
        let (_, nodes) = self.registry().await.map_err(store_status)?;
        let known = nodes
            .iter()
            .find(|n| n.node_id == node_id && n.role == NodeRole::Worker as i32);
        // Undrain is always allowed: a node drained, then gone, must not
        // stay drained for ever.
        if on && known.is_none() {
            return Err(Status::not_found(format!(
                "no worker {node_id:?} has subscribed (`ferry ctl nodes` lists them)"
            )));
        }
        self.shared
            .store
            .set_drained(&node_id, on)
            .await
            .map_err(store_status)?;
        self.poke_registry();
        tracing::info!(node = %node_id, drained = on, admin = %author, "drain set by an admin");
        let (_, nodes) = self.registry().await.map_err(store_status)?;
        let node = nodes
            .into_iter()
            .find(|n| n.node_id == node_id)
            .unwrap_or_else(|| NodeStatus {
                node_id,
                drained: on,
                ..NodeStatus::default()
            });
        Ok(Response::new(DrainResponse { node: Some(node) }))
    }

    /// A stored version (0: the current one), or NOT_FOUND.
    async fn stored(&self, version: u64) -> Result<ConfigSnapshot, Status> {
        if version == 0 {
            return self
                .current()
                .map(|s| ConfigSnapshot::clone(&s))
                .ok_or_else(|| Status::not_found("no config has been applied yet"));
        }
        self.shared
            .store
            .get(version)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("version {version} is not in the history")))
    }
}

#[tonic::async_trait]
impl<S: Store> ConfigAdmin for ControlPlane<S> {
    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let author = admin(&request)?;
        let r = request.into_inner();
        check_message(&r.message)?;
        let name = match r.name.is_empty() {
            true => UNNAMED.to_string(),
            false => r.name,
        };
        let applied = self
            .propose(Proposal {
                author,
                expected: r.expected_version,
                name,
                config: r.config,
                message: r.message,
                dry_run: r.dry_run,
                force: r.force,
                rollback_of: 0,
            })
            .await;
        if let Err(status) = &applied {
            tracing::info!(
                code = ?status.code(),
                error = %status.message().replace('\n', "; "),
                "apply refused"
            );
        }
        applied.map(Response::new)
    }

    async fn rollback(
        &self,
        request: Request<RollbackRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let author = admin(&request)?;
        let r = request.into_inner();
        check_message(&r.message)?;
        let old = self.stored(r.to_version).await?;
        let message = match r.message.is_empty() {
            true => format!("rollback to version {}", r.to_version),
            false => r.message,
        };
        self.propose(Proposal {
            author,
            expected: r.expected_version,
            name: format!("version {}", r.to_version),
            config: old.config,
            message,
            dry_run: false,
            force: r.force,
            rollback_of: r.to_version,
        })
        .await
        .map(Response::new)
    }

    async fn diff(&self, request: Request<DiffRequest>) -> Result<Response<DiffResponse>, Status> {
        admin(&request)?;
        let r = request.into_inner();
        let from = match (r.from_version, self.current()) {
            // An empty store: a proposal is all additions.
            (0, None) => empty_config()?,
            (v, _) => parse_stored(&self.stored(v).await?)?,
        };
        let name = match r.name.is_empty() {
            true => UNNAMED,
            false => r.name.as_str(),
        };
        let to = match r.config.is_empty() {
            false => parse(name, &r.config)?,
            true => parse_stored(&self.stored(r.to_version).await?)?,
        };
        Ok(Response::new(DiffResponse {
            changes: lines(&ferry_config::diff::changes(&from, &to)),
        }))
    }

    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        admin(&request)?;
        let limit = request.into_inner().limit as usize;
        let snapshots = self
            .shared
            .store
            .history(limit)
            .await
            .map_err(store_status)?;
        Ok(Response::new(HistoryResponse { snapshots }))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<ConfigSnapshot>, Status> {
        admin(&request)?;
        let snapshot = self.stored(request.into_inner().version).await?;
        Ok(Response::new(snapshot))
    }

    async fn nodes(
        &self,
        request: Request<NodesRequest>,
    ) -> Result<Response<NodesResponse>, Status> {
        admin(&request)?;
        let (current_version, nodes) = self.registry().await.map_err(store_status)?;
        Ok(Response::new(NodesResponse {
            current_version,
            nodes,
            grace_ms: u64::try_from(self.shared.grace.as_millis()).unwrap_or(u64::MAX),
        }))
    }

    async fn drain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        self.set_drain(request, true).await
    }

    async fn undrain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        self.set_drain(request, false).await
    }
}
