//! `ferry up` as the control plane's admin: applies `DATA/ferry.toml`
//! (at start, and on SIGHUP) with the admin certificate it made, and
//! reads back what each node did with the version from the node's
//! `/status`.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_control::proto::config_admin_client::ConfigAdminClient;
use ferry_control::proto::{ApplyRequest, GetRequest, HistoryRequest, SnapshotMeta};
use ferry_control::server::tls::{self, Pem};
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::pki::{Pki, ADMIN};

/// How long one call to the control plane may take: it is on loopback,
/// so longer means it is stuck, and `ferry up` must say so rather than
/// wait for ever.
const CALL_LIMIT: Duration = Duration::from_secs(10);

/// How long `ferry up` waits for the nodes to report a version.
const REPORT_WAIT: Duration = Duration::from_secs(10);

/// An admin's connection to the control plane.
pub struct Control {
    client: ConfigAdminClient<Channel>,
}

/// What applying the file came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// The file is the current version already: nothing stored.
    Unchanged { version: u64 },
    /// Stored as `version` (after `previous`; 0: the first).
    Stored {
        version: u64,
        previous: u64,
        changes: Vec<String>,
    },
    /// Refused with these errors (each `FILE:LINE:COLUMN: what`); `current`
    /// keeps serving (0: there is none).
    Refused { current: u64, errors: Vec<String> },
    /// The control plane could not be asked.
    Failed(String),
}

impl Control {
    /// Connects to `url` as the admin of `pki`.
    ///
    /// # Errors
    /// The certificates cannot be read, the control plane does not answer.
    pub async fn connect(url: &str, pki: &Pki) -> anyhow::Result<Self> {
        let pem =
            Pem::read(&pki.ca(), &pki.cert(ADMIN), &pki.key(ADMIN)).map_err(anyhow::Error::msg)?;
        let channel = tls::connect(url, &pem)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the control plane at {url}: {e}"))?;
        Ok(Self {
            client: ConfigAdminClient::new(channel),
        })
    }

    /// The current version's metadata (`None`: nothing applied yet).
    async fn current(&mut self) -> Result<Option<SnapshotMeta>, Status> {
        let history = within(self.client.history(HistoryRequest { limit: 1 })).await?;
        Ok(history.into_inner().snapshots.into_iter().next())
    }

    /// The current version and its config text (`None`: nothing applied).
    ///
    /// # Errors
    /// The control plane could not be asked.
    pub async fn current_config(&mut self) -> anyhow::Result<Option<(u64, String)>> {
        match within(self.client.get(GetRequest { version: 0 })).await {
            Ok(snapshot) => {
                let snapshot = snapshot.into_inner();
                let version = snapshot.meta.map_or(0, |m| m.version);
                let text = String::from_utf8_lossy(&snapshot.config).into_owned();
                Ok(Some((version, text)))
            }
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => anyhow::bail!("the control plane: {}", s.message()),
        }
    }

    /// Applies `file` as the next version, unless its SHA-256 is the
    /// current version's (a restart or a SIGHUP with nothing edited adds
    /// no version to the history).
    pub async fn apply_file(&mut self, file: &Path, message: &str) -> Applied {
        let config = match std::fs::read(file) {
            Ok(c) => c,
            Err(e) => return Applied::Failed(format!("cannot read {}: {e}", file.display())),
        };
        let current = match self.current().await {
            Ok(c) => c,
            Err(s) => return Applied::Failed(s.message().to_string()),
        };
        let previous = current.as_ref().map_or(0, |m| m.version);
        if current.is_some_and(|m| m.sha256 == ferry_control::sha256_hex(&config)) {
            return Applied::Unchanged { version: previous };
        }
        let request = ApplyRequest {
            expected_version: previous,
            config: config.into(),
            message: message.to_string(),
            dry_run: false,
            force: false,
            name: file.display().to_string(),
        };
        match within(self.client.apply(request)).await {
            Ok(r) => {
                let r = r.into_inner();
                Applied::Stored {
                    version: r.meta.map_or(0, |m| m.version),
                    previous,
                    changes: r.changes,
                }
            }
            Err(s)
                if matches!(
                    s.code(),
                    Code::InvalidArgument | Code::FailedPrecondition | Code::Aborted
                ) =>
            {
                Applied::Refused {
                    current: previous,
                    errors: s.message().lines().map(String::from).collect(),
                }
            }
            Err(s) => Applied::Failed(s.message().to_string()),
        }
    }
}

/// A call that gives up after [`CALL_LIMIT`].
async fn within<T>(
    call: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout(CALL_LIMIT, call)
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "the control plane did not answer within {} s",
                CALL_LIMIT.as_secs()
            )))
        })
}

/// What to say about an apply of `file`, one line or a line and the
/// errors indented below it.
pub fn describe(file: &Path, applied: &Applied) -> String {
    let file = file.display();
    match applied {
        Applied::Unchanged { version } => {
            format!("{file} is version {version} already; nothing to apply")
        }
        Applied::Stored {
            version,
            previous: 0,
            ..
        } => format!("applied {file} as version {version}"),
        Applied::Stored {
            version, changes, ..
        } if changes.is_empty() => format!("applied {file} as version {version} (no changes)"),
        Applied::Stored {
            version, changes, ..
        } => format!(
            "applied {file} as version {version}: {}",
            changes.join(", ")
        ),
        Applied::Refused { current, errors } => {
            let serving = match current {
                0 => "there is no version to serve".to_string(),
                v => format!("version {v} keeps serving"),
            };
            format!(
                "{file} refused, nothing applied ({serving}):\n    {}",
                errors.join("\n    ")
            )
        }
        Applied::Failed(why) => format!(
            "cannot apply {file}: {why}; nothing applied, the nodes keep serving what they have"
        ),
    }
}

/// Says, for each node (name, admin URL), what it did with `version`:
/// waits (at most [`REPORT_WAIT`] in all) for its `/status` to report
/// that version or a later one. Blocking.
pub fn say_outcomes(nodes: &[(String, String)], version: u64) {
    let deadline = Instant::now() + REPORT_WAIT;
    for (name, admin) in nodes {
        let outcome = loop {
            let report = last_report(admin);
            if let Some(line) = report.as_ref().and_then(|r| outcome(r, version)) {
                break line;
            }
            if Instant::now() >= deadline {
                break format!(
                    "no report on version {version} within {} s; see its log",
                    REPORT_WAIT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        say!("ferry up: {name}: {outcome}");
    }
}

/// The node's last report to the control plane, from its `/status`.
fn last_report(admin: &str) -> Option<serde_json::Value> {
    let addr = admin.trim_start_matches("http://");
    // A node that does not answer (stopped, overloaded) must not hold up
    // the report of the others past REPORT_WAIT by much.
    let (status, body) =
        crate::queue::request_within(addr, None, "GET", "/status", Duration::from_secs(1)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok().filter(|_| status == 200)?;
    v.get("config")?
        .get("control_plane")?
        .get("last_report")
        .filter(|r| !r.is_null())
        .cloned()
}

/// One line for a node's report, once it is about `version` or later.
fn outcome(report: &serde_json::Value, version: u64) -> Option<String> {
    let number = |key: &str| report.get(key).and_then(serde_json::Value::as_u64);
    let for_version = number("for_version")?;
    if for_version < version {
        return None;
    }
    let applied = number("applied_version").unwrap_or(0);
    match report.get("result").and_then(|r| r.as_str()) {
        Some("ack") => Some(format!("applied version {applied}")),
        Some("nack") => {
            let error = report
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("no reason given");
            Some(format!(
                "refused version {for_version} (NACK), version {applied} keeps serving: {}",
                error.replace('\n', "; ")
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_apply_is_described_by_its_version_and_changes_or_its_errors() {
        let file = Path::new("ferry-data/ferry.toml");
        let said = |a: Applied| describe(file, &a);
        assert_eq!(
            said(Applied::Stored {
                version: 1,
                previous: 0,
                changes: vec!["+ connector \"Default Frontend\"".into()]
            }),
            "applied ferry-data/ferry.toml as version 1"
        );
        assert_eq!(
            said(Applied::Stored {
                version: 3,
                previous: 2,
                changes: vec!["~ connector \"Default Frontend\"".into(), "+ user \"fax\"".into()]
            }),
            "applied ferry-data/ferry.toml as version 3: ~ connector \"Default Frontend\", + user \"fax\""
        );
        assert_eq!(
            said(Applied::Unchanged { version: 2 }),
            "ferry-data/ferry.toml is version 2 already; nothing to apply"
        );
        assert_eq!(
            said(Applied::Refused {
                current: 2,
                errors: vec![
                    "ferry-data/ferry.toml:3:7: expected `=`".into(),
                    "ferry-data/ferry.toml:9:1: unknown key `bannr`".into()
                ]
            }),
            "ferry-data/ferry.toml refused, nothing applied (version 2 keeps serving):\n    \
             ferry-data/ferry.toml:3:7: expected `=`\n    \
             ferry-data/ferry.toml:9:1: unknown key `bannr`"
        );
    }

    #[test]
    fn a_node_outcome_waits_for_the_version_and_names_a_nack() {
        let ack = json!({"result": "ack", "for_version": 3, "applied_version": 3});
        assert_eq!(outcome(&ack, 3).as_deref(), Some("applied version 3"));
        assert_eq!(outcome(&ack, 4), None, "a report on an older version");
        let nack = json!({"result": "nack", "for_version": 4, "applied_version": 3,
            "error": "certs/relay.crt: No such file or directory"});
        assert_eq!(
            outcome(&nack, 4).as_deref(),
            Some("refused version 4 (NACK), version 3 keeps serving: certs/relay.crt: No such file or directory")
        );
    }
}
