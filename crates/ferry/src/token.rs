//! The admin endpoint's bearer token, read from a file.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};

/// The shortest token accepted.
const MIN_LEN: usize = 16;

/// Reads the token in `path` (surrounding ASCII whitespace ignored: a
/// no-break space around it is refused, not silently dropped, since a
/// client sending the file's contents would send it too).
pub fn read(path: &Path) -> anyhow::Result<Arc<str>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the admin token file {}", path.display()))?;
    let token = text.trim_matches(|c: char| c.is_ascii_whitespace());
    if token.len() < MIN_LEN || token.chars().any(|c| !c.is_ascii_graphic()) {
        bail!(
            "{}: an admin token is at least {MIN_LEN} printable ASCII characters without spaces",
            path.display()
        );
    }
    Ok(Arc::from(token))
}

/// Makes a random token in `path` (mode 0600) unless one is there.
pub fn ensure(path: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        return Ok(());
    }
    let token: String = (0..32)
        .map(|_| format!("{:x}", rand::random::<u8>() & 0x0f))
        .collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{token}")?;
    Ok(())
}
