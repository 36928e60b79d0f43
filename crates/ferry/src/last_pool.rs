//! A balancer's copy of the last worker pool it put in service, so that
//! after a restart while no control plane answers it still has workers to
//! send clients to (each joins once its probes pass, as always).
//!
//! One file, `last-pool.json` in the data directory, written durably as
//! the last-good config is (temp file, `sync_data`, rename, directory
//! fsync): `{"workers": [{"name": "w1", "address": "127.0.0.11"}]}`. A
//! copy that cannot be read or parsed is logged and ignored: the balancer
//! then waits for the control plane's pool, as it did before the copy.

use std::net::IpAddr;
use std::path::Path;

use ferry_config::Backend;
use ferry_control::subscriber::last_good::write_durably;
use serde::{Deserialize, Serialize};

/// The file name in the data directory.
pub const FILE: &str = "last-pool.json";

#[derive(Serialize, Deserialize)]
struct Copy {
    workers: Vec<Worker>,
}

#[derive(Serialize, Deserialize)]
struct Worker {
    name: String,
    address: IpAddr,
}

/// The workers of the copy in `dir`; none when there is no copy or it is
/// damaged (logged) (blocking).
pub fn load(dir: &Path) -> Vec<Backend> {
    let path = dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the last worker pool; waiting for the control plane's");
            return Vec::new();
        }
    };
    match serde_json::from_slice::<Copy>(&bytes) {
        Ok(copy) => copy
            .workers
            .into_iter()
            .map(|w| Backend {
                name: w.name,
                address: w.address,
                weight: 1,
            })
            .collect(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the last worker pool is damaged and is ignored; waiting for the control plane's");
            Vec::new()
        }
    }
}

/// Keeps `workers` as the copy in `dir` (blocking); a failure is logged:
/// the balancer serves on, only a restart without a control plane would
/// start from an older copy.
pub fn store(dir: &Path, workers: &[Backend]) {
    let copy = Copy {
        workers: workers
            .iter()
            .map(|b| Worker {
                name: b.name.clone(),
                address: b.address,
            })
            .collect(),
    };
    let written = serde_json::to_vec(&copy)
        .map_err(|e| e.to_string())
        .and_then(|text| write_durably(dir, FILE, &text).map_err(|e| e.to_string()));
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot keep a copy of the worker pool");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_stored_pool_reads_back_and_a_damaged_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).is_empty());
        let workers = vec![
            Backend {
                name: "w1".into(),
                address: "127.0.0.11".parse().unwrap(),
                weight: 1,
            },
            Backend {
                name: "w2".into(),
                address: "::1".parse().unwrap(),
                weight: 1,
            },
        ];
        store(dir.path(), &workers);
        assert_eq!(load(dir.path()), workers);
        assert!(!dir.path().join("last-pool.json.tmp").exists());

        // Cut short: ignored, no worker.
        let path = dir.path().join(FILE);
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - 5]).unwrap();
        assert!(load(dir.path()).is_empty());
        std::fs::write(
            &path,
            br#"{"workers": [{"name": "w1", "address": "nowhere"}]}"#,
        )
        .unwrap();
        assert!(load(dir.path()).is_empty());
    }
}
