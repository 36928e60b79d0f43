//! The node's copy of the last config it applied from the control plane,
//! so that it serves at once after a restart while no control plane
//! answers.
//!
//! One file, `last-good.toml` in the data directory: a comment line with
//! the version, the SHA-256 and the control plane it came from, then the
//! config text as the control plane sent it (an admin can read it, and
//! `ferry config check` it once the first line is removed). Written
//! durably: temp file, `sync_data`, rename, fsync of the directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;

/// The file name in the data directory.
pub const FILE: &str = "last-good.toml";
const HEADER: &str = "# ferry last-good";

/// A config the node applied, as kept on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastGood {
    /// The control plane's version.
    pub version: u64,
    /// SHA-256 of `config`, lower-case hex.
    pub sha256: String,
    /// The control-plane URL it came from.
    pub source: String,
    pub config: Bytes,
}

/// Why the last-good copy could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LastGoodError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not one this code wrote, or its text does not match
    /// its SHA-256 (cut short, edited).
    #[error("{path}: {why}; delete it to wait for the control plane instead")]
    Damaged { path: PathBuf, why: String },
}

impl LastGood {
    /// The file's path in `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE)
    }

    /// Reads the copy in `dir`; `Ok(None)` when there is none.
    ///
    /// # Errors
    /// [`LastGoodError`] when it cannot be read or is damaged.
    pub fn load(dir: &Path) -> Result<Option<Self>, LastGoodError> {
        let path = Self::path(dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(LastGoodError::Io { path, source }),
        };
        Self::decode(&bytes)
            .map(Some)
            .map_err(|why| LastGoodError::Damaged { path, why })
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let newline = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("no header line")?;
        let (head, rest) = bytes.split_at(newline);
        let config = Bytes::copy_from_slice(rest.get(1..).unwrap_or_default());
        let head = std::str::from_utf8(head).map_err(|_| "the header is not UTF-8")?;
        let fields = head
            .strip_prefix(HEADER)
            .ok_or("the first line is not a ferry last-good header")?;
        let (mut version, mut sha256, mut source) = (None, None, None);
        for field in fields.split_whitespace() {
            match field.split_once('=') {
                Some(("version", v)) => version = v.parse::<u64>().ok(),
                Some(("sha256", v)) => sha256 = Some(v.to_string()),
                Some(("source", v)) => source = Some(v.to_string()),
                _ => {}
            }
        }
        let (Some(version), Some(sha256), Some(source)) = (version, sha256, source) else {
            return Err("the header lacks its version, sha256 or source".into());
        };
        let actual = crate::subscriber::sha256_hex(&config);
        if actual != sha256 {
            return Err(format!(
                "the text's SHA-256 is {actual}, not {sha256} as written"
            ));
        }
        Ok(Self {
            version,
            sha256,
            source,
            config,
        })
    }

    /// Writes the copy into `dir` (created if missing), durably: a crash
    /// at any point leaves the old copy or the new one, whole (blocking).
    ///
    /// # Errors
    /// [`LastGoodError::Io`].
    pub fn store(&self, dir: &Path) -> Result<(), LastGoodError> {
        let mut text = format!(
            "{HEADER} version={} sha256={} source={}\n",
            self.version, self.sha256, self.source
        )
        .into_bytes();
        text.extend_from_slice(&self.config);
        write_durably(dir, FILE, &text)
    }
}

/// Writes `contents` to `name` in `dir` (created if missing), durably:
/// temp file, `sync_data`, rename, fsync of the directory, so a crash at
/// any point leaves the old file or the new one, whole (blocking). Other
/// copies a node keeps in its data directory (a balancer's last pool) are
/// written the same way.
///
/// # Errors
/// [`LastGoodError::Io`].
pub fn write_durably(dir: &Path, name: &str, contents: &[u8]) -> Result<(), LastGoodError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LastGoodError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(name);
    let temp = dir.join(format!("{name}.tmp"));
    let mut file = std::fs::File::create(&temp).map_err(io(&temp))?;
    file.write_all(contents)
        .and_then(|()| file.sync_data())
        .map_err(io(&temp))?;
    drop(file);
    std::fs::rename(&temp, &path).map_err(io(&path))?;
    // The rename is durable only once the directory is.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_stored_copy_reads_back_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(LastGood::load(dir.path()).unwrap(), None);
        let text = Bytes::from_static(b"[[connectors]]\nname = \"x\"\n");
        let copy = LastGood {
            version: 7,
            sha256: crate::subscriber::sha256_hex(&text),
            source: "https://127.0.0.1:7000".into(),
            config: text,
        };
        copy.store(dir.path()).unwrap();
        assert_eq!(LastGood::load(dir.path()).unwrap(), Some(copy.clone()));
        assert!(!dir.path().join("last-good.toml.tmp").exists());

        // Cut short: the digest no longer matches.
        let path = LastGood::path(dir.path());
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - 3]).unwrap();
        let err = LastGood::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("SHA-256"), "{err}");
        std::fs::write(&path, b"accepted_domains = []\n").unwrap();
        let err = LastGood::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a ferry last-good header"), "{err}");
    }
}
