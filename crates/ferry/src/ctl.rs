//! `ferry ctl`: the admin's client of the control plane. Exit codes: 0
//! done, 1 the control plane refused (invalid config, stale version, not
//! found, not allowed), 2 it could not be reached or failed. With
//! `--json` the answer is printed as one JSON object instead of tables
//! (errors stay text on standard error).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::Subcommand;
use ferry_control::proto::config_admin_client::ConfigAdminClient;
use ferry_control::proto::{
    ApplyRequest, ApplyResponse, DiffRequest, DrainRequest, GetRequest, HistoryRequest, NodeRole,
    NodeStatus, NodesRequest, NodesResponse, RollbackRequest, SnapshotMeta,
};
use ferry_control::server::tls::{self, Pem};
use ferry_control::MAX_CONFIG_OCTETS;
use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// What `ferry ctl` does.
#[derive(Subcommand)]
pub enum CtlCommand {
    /// Validate a cluster config and store it as the next version (every
    /// error with its line and column if it is refused)
    Apply {
        /// The cluster config file
        file: PathBuf,
        /// Why (shown by `history`)
        #[arg(short = 'm', long)]
        message: Option<String>,
        /// The version the change was made against; without it, the
        /// current version is read first (a change applied in between is
        /// still caught)
        #[arg(long)]
        expected_version: Option<u64>,
        /// Validate and show the changes; store nothing
        #[arg(long)]
        dry_run: bool,
        /// Store a change that removes every connector, route or balancer
        /// backend
        #[arg(long)]
        force: bool,
    },
    /// Show what changes: FILE against the current version, or between two
    /// stored versions
    Diff {
        /// A proposed config file (compared with --from, default the
        /// current version)
        file: Option<PathBuf>,
        /// The older stored version (default: the current one)
        #[arg(long, value_name = "N")]
        from: Option<u64>,
        /// The newer stored version (default: the current one)
        #[arg(long, value_name = "M")]
        to: Option<u64>,
    },
    /// List the stored versions, newest first
    History {
        /// At most this many (default: all that are kept)
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
    },
    /// Print a stored version's config (default: the current one)
    Get {
        /// The version to print
        version: Option<u64>,
    },
    /// Apply an old version's config as a new version
    Rollback {
        /// The stored version whose config comes back
        version: u64,
        /// Why (default: "rollback to version N")
        #[arg(short = 'm', long)]
        message: Option<String>,
        /// The version the rollback was decided against (default: the
        /// current one)
        #[arg(long)]
        expected_version: Option<u64>,
        /// Roll back to a config without connectors, routes or backends
        #[arg(long)]
        force: bool,
    },
    /// List the nodes: what each runs, whether it is connected, its lag,
    /// its last NACK, and whether a worker is in the balancers' rotation
    Nodes,
    /// Take a worker out of every balancer's rotation (its open sessions
    /// finish) until `undrain`; kept across control-plane restarts
    Drain {
        /// The worker's node ID
        node: String,
    },
    /// Put a drained worker back in rotation (once its probes pass)
    Undrain {
        /// The worker's node ID
        node: String,
    },
}

/// The connection settings of `ferry ctl`.
pub struct Target {
    pub urls: Vec<String>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Print answers as JSON.
    pub json: bool,
}

/// Why a command stopped: refused (exit 1) or failed (exit 2).
enum Failure {
    Refused(String),
    Failed(String),
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        // The code first, then the message's lines (every config error
        // is one) indented below it.
        let text = format!(
            "({}):\n  {}",
            code_name(s.code()),
            s.message().lines().collect::<Vec<_>>().join("\n  ")
        );
        match s.code() {
            Code::InvalidArgument
            | Code::Aborted
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::OutOfRange => Failure::Refused(text),
            _ => Failure::Failed(text),
        }
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::Aborted => "ABORTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::NotFound => "NOT_FOUND",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::Unauthenticated => "UNAUTHENTICATED",
        Code::Unavailable => "UNAVAILABLE",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::Internal => "INTERNAL",
        _ => "ERROR",
    }
}

/// Runs one command against the first control plane that answers.
pub async fn run(target: Target, command: CtlCommand) -> ExitCode {
    match execute(target, command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Refused(why)) => {
            eprintln!("ferry ctl: refused {why}");
            ExitCode::from(1)
        }
        Err(Failure::Failed(why)) if why.starts_with('(') => {
            eprintln!("ferry ctl: failed {why}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(why)) => {
            eprintln!("ferry ctl: {why}");
            ExitCode::from(2)
        }
    }
}

/// Connects to the first of the URLs that answers.
async fn connect(target: &Target) -> Result<ConfigAdminClient<Channel>, Failure> {
    let pem = Pem::read(&target.ca, &target.cert, &target.key).map_err(Failure::Failed)?;
    let mut errors = Vec::new();
    for url in &target.urls {
        // A control plane that accepts and never answers (stopped, hung)
        // must not hold the admin: each connection and each call is
        // bounded, and the next URL is tried.
        let channel = match tls::endpoint(url, &pem) {
            Ok(endpoint) => {
                let endpoint = endpoint.timeout(CALL_TIMEOUT);
                tokio::time::timeout(CONNECT_LIMIT, endpoint.connect()).await
            }
            Err(e) => Ok(Err(e)),
        };
        match channel {
            Ok(Ok(channel)) => return Ok(ConfigAdminClient::new(channel)),
            Ok(Err(e)) => errors.push(format!("{url}: {}", chain(&e))),
            Err(_) => errors.push(format!(
                "{url}: no TLS handshake within {} s",
                CONNECT_LIMIT.as_secs()
            )),
        }
    }
    Err(Failure::Failed(format!(
        "no control plane answered:\n  {}",
        errors.join("\n  ")
    )))
}

/// An error with its sources, which say what actually failed.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// The most a connection and its TLS handshake may take.
const CONNECT_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);
/// The most one call may take (etcd's own timeouts are 3 s).
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads a config file, refusing one larger than the control plane takes
/// before reading it whole (the wrong file named, a binary).
fn read(file: &Path) -> Result<Vec<u8>, Failure> {
    use std::io::Read;
    let cannot =
        |e: std::io::Error| Failure::Failed(format!("cannot read {}: {e}", file.display()));
    let mut bytes = Vec::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(MAX_CONFIG_OCTETS as u64 + 1).read_to_end(&mut bytes))
        .map_err(cannot)?;
    if bytes.len() > MAX_CONFIG_OCTETS {
        return Err(Failure::Refused(format!(
            "(INVALID_ARGUMENT):\n  {} is larger than {MAX_CONFIG_OCTETS} octets, the most the control plane takes",
            file.display()
        )));
    }
    Ok(bytes)
}

async fn current_version(client: &mut ConfigAdminClient<Channel>) -> Result<u64, Failure> {
    let history = client.history(HistoryRequest { limit: 1 }).await?;
    Ok(history
        .into_inner()
        .snapshots
        .first()
        .map_or(0, |m| m.version))
}

async fn execute(target: Target, command: CtlCommand) -> Result<(), Failure> {
    let mut client = connect(&target).await?;
    let json = target.json;
    match command {
        CtlCommand::Apply {
            file,
            message,
            expected_version,
            dry_run,
            force,
        } => {
            let config = read(&file)?;
            let expected_version = match expected_version {
                Some(v) => v,
                None => current_version(&mut client).await?,
            };
            let response = client
                .apply(ApplyRequest {
                    expected_version,
                    config: config.into(),
                    message: message.unwrap_or_default(),
                    dry_run,
                    force,
                    name: file.display().to_string(),
                })
                .await?;
            print_applied(&response.into_inner(), json);
        }
        CtlCommand::Rollback {
            version,
            message,
            expected_version,
            force,
        } => {
            let expected_version = match expected_version {
                Some(v) => v,
                None => current_version(&mut client).await?,
            };
            let response = client
                .rollback(RollbackRequest {
                    to_version: version,
                    expected_version,
                    message: message.unwrap_or_default(),
                    force,
                })
                .await?;
            print_applied(&response.into_inner(), json);
        }
        CtlCommand::Diff { file, from, to } => {
            let config = match &file {
                Some(f) => read(f)?,
                None => Vec::new(),
            };
            let response = client
                .diff(DiffRequest {
                    from_version: from.unwrap_or(0),
                    to_version: to.unwrap_or(0),
                    config: config.into(),
                    name: file.map(|f| f.display().to_string()).unwrap_or_default(),
                })
                .await?;
            let changes = response.into_inner().changes;
            match json {
                true => print_json(&json!({ "changes": changes })),
                false => print_changes(&changes),
            }
        }
        CtlCommand::History { limit } => {
            let response = client
                .history(HistoryRequest {
                    limit: limit.unwrap_or(0),
                })
                .await?;
            let snapshots = response.into_inner().snapshots;
            match json {
                true => print_json(&json!({
                    "snapshots": snapshots.iter().map(meta_json).collect::<Vec<_>>(),
                })),
                false => print!("{}", history_table(&snapshots)),
            }
        }
        CtlCommand::Get { version } => {
            let snapshot = client
                .get(GetRequest {
                    version: version.unwrap_or(0),
                })
                .await?
                .into_inner();
            let meta = snapshot.meta.unwrap_or_default();
            if json {
                print_json(&json!({
                    "meta": meta_json(&meta),
                    "config": String::from_utf8_lossy(&snapshot.config),
                }));
                return Ok(());
            }
            // The text alone on stdout: `ferry ctl get 3 > old.toml` works.
            eprintln!(
                "# version {} by {} at {}, sha256 {}",
                meta.version,
                meta.author,
                when(&meta),
                meta.sha256
            );
            print!("{}", String::from_utf8_lossy(&snapshot.config));
        }
        CtlCommand::Nodes => {
            let response = client.nodes(NodesRequest {}).await?.into_inner();
            match json {
                true => print_json(&nodes_json(&response)),
                false => {
                    // The first line stays `current version N`: scripts
                    // read it (the grace period is in --json).
                    println!("current version {}", response.current_version);
                    print!("{}", nodes_table(&response.nodes));
                }
            }
        }
        CtlCommand::Drain { node } => drain(&mut client, node, true, json).await?,
        CtlCommand::Undrain { node } => drain(&mut client, node, false, json).await?,
    }
    Ok(())
}

/// `drain` or `undrain` NODE, and what the control plane says of it now.
async fn drain(
    client: &mut ConfigAdminClient<Channel>,
    node: String,
    on: bool,
    json: bool,
) -> Result<(), Failure> {
    let request = DrainRequest { node_id: node };
    let response = match on {
        true => client.drain(request).await?,
        false => client.undrain(request).await?,
    };
    let status = response.into_inner().node.unwrap_or_default();
    match json {
        true => print_json(&json!({ "node": node_json(&status) })),
        false => println!(
            "{} {}: {}",
            if on { "drained" } else { "undrained" },
            status.node_id,
            rotation(&status)
        ),
    }
    Ok(())
}

fn print_json(value: &Value) {
    println!("{value:#}");
}

fn meta_json(m: &SnapshotMeta) -> Value {
    json!({
        "version": m.version,
        "sha256": m.sha256,
        "author": m.author,
        "created_at": rfc3339(m.created_at),
        "message": m.message,
        "size": m.size,
        "rollback_of": m.rollback_of,
    })
}

fn rfc3339(t: Option<prost_types::Timestamp>) -> Value {
    t.and_then(|t| SystemTime::try_from(t).ok())
        .map_or(Value::Null, |t| {
            Value::from(humantime::format_rfc3339_seconds(t).to_string())
        })
}

fn role_name(role: i32) -> Option<&'static str> {
    match NodeRole::try_from(role) {
        Ok(NodeRole::Worker) => Some("worker"),
        Ok(NodeRole::Balancer) => Some("balancer"),
        _ => None,
    }
}

fn node_json(n: &NodeStatus) -> Value {
    let worker = n.role == NodeRole::Worker as i32;
    json!({
        "node_id": n.node_id,
        "role": role_name(n.role),
        "smtp_address": n.smtp_address,
        "connected": n.connected,
        "replica": n.replica,
        "applied_version": n.applied_version,
        "applied_sha256": n.applied_sha256,
        "sent_version": n.sent_version,
        "nacked_version": n.nacked_version,
        "nack_error": n.nack_error,
        "lag": n.lag,
        "last_seen": rfc3339(n.last_seen),
        "in_rotation": worker.then_some(n.in_rotation),
        "out_reason": (worker && !n.in_rotation).then_some(n.out_reason.as_str()),
        "drained": n.drained,
    })
}

fn nodes_json(r: &NodesResponse) -> Value {
    json!({
        "current_version": r.current_version,
        "grace_ms": r.grace_ms,
        "nodes": r.nodes.iter().map(node_json).collect::<Vec<_>>(),
    })
}

/// `in`, `out (lagging)`, or `-` for a node that is not a worker.
fn rotation(n: &NodeStatus) -> String {
    match (n.role == NodeRole::Worker as i32, n.in_rotation) {
        (false, _) => "-".to_string(),
        (true, true) => "in".to_string(),
        (true, false) => format!("out ({})", n.out_reason),
    }
}

fn print_changes(changes: &[String]) {
    if changes.is_empty() {
        println!("no changes");
    }
    for change in changes {
        println!("{change}");
    }
}

fn print_applied(response: &ApplyResponse, json: bool) {
    let meta = response.meta.clone().unwrap_or_default();
    if json {
        print_json(&json!({
            "meta": meta_json(&meta),
            "changes": response.changes,
            "dry_run": response.dry_run,
        }));
        return;
    }
    print_changes(&response.changes);
    match response.dry_run {
        true => println!(
            "dry run: would be version {} (sha256 {}); nothing stored",
            meta.version, meta.sha256
        ),
        false => println!("applied version {} (sha256 {})", meta.version, meta.sha256),
    }
}

fn when(meta: &SnapshotMeta) -> String {
    let at = meta.created_at.and_then(|t| SystemTime::try_from(t).ok());
    at.map_or_else(
        || "-".to_string(),
        |t| humantime::format_rfc3339_seconds(t).to_string(),
    )
}

/// Left-aligned columns, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn history_table(snapshots: &[SnapshotMeta]) -> String {
    let mut rows = vec![
        ["VERSION", "CREATED", "AUTHOR", "SIZE", "SHA256", "MESSAGE"]
            .map(String::from)
            .to_vec(),
    ];
    for m in snapshots {
        let mut message = m.message.clone();
        if m.rollback_of != 0 && !message.contains("rollback") {
            message = format!("{message} (rollback to version {})", m.rollback_of);
        }
        rows.push(vec![
            m.version.to_string(),
            when(m),
            m.author.clone(),
            m.size.to_string(),
            m.sha256.chars().take(12).collect(),
            message,
        ]);
    }
    table(&rows)
}

fn nodes_table(nodes: &[NodeStatus]) -> String {
    let mut rows = vec![[
        "NODE",
        "ROLE",
        "ADDRESS",
        "CONNECTED",
        "APPLIED",
        "LAG",
        "ROTATION",
        "LAST NACK",
    ]
    .map(String::from)
    .to_vec()];
    for n in nodes {
        let role = role_name(n.role).unwrap_or("-");
        let nack = match n.nacked_version {
            0 => "-".to_string(),
            v => format!("version {v}: {}", n.nack_error.replace('\n', " ")),
        };
        rows.push(vec![
            n.node_id.clone(),
            role.to_string(),
            n.smtp_address.clone(),
            if n.connected { "yes" } else { "no" }.to_string(),
            n.applied_version.to_string(),
            n.lag.to_string(),
            rotation(n),
            nack,
        ]);
    }
    table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_line_up() {
        let nodes = [
            NodeStatus {
                node_id: "worker-1".into(),
                role: NodeRole::Worker as i32,
                smtp_address: "127.0.0.11:2525".into(),
                connected: true,
                applied_version: 3,
                in_rotation: true,
                ..Default::default()
            },
            NodeStatus {
                node_id: "w2".into(),
                role: NodeRole::Worker as i32,
                applied_version: 2,
                lag: 1,
                nacked_version: 3,
                nack_error: "certs/ferry.crt: not found".into(),
                out_reason: "nacked".into(),
                ..Default::default()
            },
        ];
        assert_eq!(
            nodes_table(&nodes),
            "NODE      ROLE    ADDRESS          CONNECTED  APPLIED  LAG  ROTATION      LAST NACK\n\
             worker-1  worker  127.0.0.11:2525  yes        3        0    in            -\n\
             w2        worker                   no         2        1    out (nacked)  version 3: certs/ferry.crt: not found\n"
        );
    }
}
