//! A config snapshot: one validated config, where it came from, and what
//! the node built from it, immutable once built.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use ferry_config::{ClusterConfig, ConfigError};

/// Where a snapshot's config came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file on this node, re-read on SIGHUP and `POST /config/reload`.
    File(PathBuf),
    /// A control plane, named by the address the node subscribed to.
    ControlPlane(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(path) => write!(f, "file {}", path.display()),
            Source::ControlPlane(url) => write!(f, "control plane {url}"),
        }
    }
}

/// One config version in service on a node: the validated config plus the
/// role's material built from it (`M`: the worker's TLS acceptors, the
/// balancer's section). Sessions hold an `Arc` of the snapshot they
/// started with, so a snapshot lives as long as its last session.
#[derive(Debug)]
pub struct Snapshot<M> {
    /// Counts applied snapshots on this node for a file source (1 at
    /// start); the control plane's version for a control-plane source.
    pub version: u64,
    /// SHA-256 of the config text, lower-case hex: two nodes with the same
    /// digest serve the same config.
    pub sha256: String,
    pub source: Source,
    pub loaded_at: SystemTime,
    pub config: Arc<ClusterConfig>,
    pub material: M,
}

/// A config read and validated, before the role built its material.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: Arc<ClusterConfig>,
    /// SHA-256 of the text, lower-case hex.
    pub sha256: String,
    pub source: Source,
}

impl LoadedConfig {
    /// Reads and validates the config file at `path` (blocking: call it
    /// off the async threads).
    ///
    /// # Errors
    /// The file cannot be read, or every problem in it with line and
    /// column ([`ConfigError`]).
    pub fn read_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let config = ClusterConfig::parse(&path.display().to_string(), &text, base)?;
        Ok(Self {
            config: Arc::new(config),
            sha256: sha256_hex(text.as_bytes()),
            source: Source::File(path.to_path_buf()),
        })
    }

    /// The snapshot of this config as `version`, with the role's material.
    pub fn into_snapshot<M>(self, version: u64, material: M) -> Snapshot<M> {
        Snapshot {
            version,
            sha256: self.sha256,
            source: self.source,
            loaded_at: SystemTime::now(),
            config: self.config,
            material,
        }
    }
}

/// SHA-256 of `bytes` as lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_text() {
        // FIPS 180-2 appendix B.1.
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
