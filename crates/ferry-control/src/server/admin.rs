//! `ConfigAdmin`: what `ferry ctl` calls. Every call needs an admin
//! certificate; the admin's name is the author of what it applies.

use std::path::Path;

use bytes::Bytes;
use ferry_config::{ClusterConfig, ConfigError};
use tonic::{Request, Response, Status};

use super::{admin, now, store_status, version_of, ControlPlane};
use crate::proto::config_admin_server::ConfigAdmin;
use crate::proto::{
    ApplyRequest, ApplyResponse, ConfigSnapshot, DiffRequest, DiffResponse, GetRequest,
    HistoryRequest, HistoryResponse, NodesRequest, NodesResponse, RollbackRequest, SnapshotMeta,
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

/// INVALID_ARGUMENT with every error, `NAME:LINE:COLUMN: what`, one a
/// line.
fn invalid(name: &str, e: &ConfigError) -> Status {
    let lines: Vec<String> = match e.errors() {
        [] => vec![format!("{name}: {e}")],
        errors => errors
            .iter()
            .map(|l| format!("{name}:{}:{}: {}", l.line, l.column, l.message))
            .collect(),
    };
    Status::invalid_argument(lines.join("\n"))
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
        let emptied = ferry_config::diff::emptied(&old, &new);
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
        let current = self.current();
        let current_version = current.as_deref().map_or(0, version_of);
        let mut nodes = self.shared.store.nodes().await.map_err(store_status)?;
        for node in &mut nodes {
            node.lag = current_version.saturating_sub(node.applied_version);
        }
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(Response::new(NodesResponse {
            current_version,
            nodes,
        }))
    }
}
