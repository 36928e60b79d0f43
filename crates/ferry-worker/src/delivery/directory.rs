//! The `directory` route: each message as an `.eml` file, its envelope in
//! `X-Ferry-*` header fields on top. For tests, demos and archives.
//!
//! A file is named by the queue id and the group of recipients it is for,
//! never by the attempt: a message delivered again after a crash (written,
//! but killed before its state was recorded) replaces its own file instead
//! of adding a second one. Blocking: call these on the blocking pool.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use ferry_queue::{QueueId, SpooledBody, StoredEnvelope};
use ferry_smtp::Mailbox;

/// Hex digits of the recipient group's digest in a file name: 64 bits, so
/// two groups of one message never share a name in practice.
const GROUP_DIGITS: usize = 16;

/// `ID-GROUP.eml`: the queue id, and a digest of the recipients (sorted,
/// so their order does not matter).
pub fn file_name(id: &QueueId, recipients: &[Mailbox]) -> String {
    let mut sorted: Vec<String> = recipients.iter().map(Mailbox::to_string).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let digest = ring::digest::digest(&ring::digest::SHA256, sorted.join("\n").as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let group = hex.get(..GROUP_DIGITS).unwrap_or(&hex);
    format!("{id}-{group}.eml")
}

/// Writes the message for `recipients` into `dir`, durably, replacing the
/// file an earlier attempt for the same recipients may have left. Returns
/// the file name.
pub fn write_eml(
    dir: &Path,
    id: &QueueId,
    envelope: &StoredEnvelope,
    recipients: &[Mailbox],
    message: &SpooledBody,
) -> io::Result<String> {
    let mut head = format!(
        "X-Ferry-Queue-Id: {id}\r\nX-Ferry-Mail-From: <{}>\r\n",
        envelope.mail_from
    );
    for r in recipients {
        head.push_str(&format!("X-Ferry-Rcpt-To: <{r}>\r\n"));
    }
    head.push_str(&format!("X-Ferry-Client: {}\r\n", envelope.client_ip));
    let name = file_name(id, recipients);
    // The message is copied a piece at a time, never read whole.
    let mut piece = Vec::new();
    write_durably(dir, &name, |f| {
        f.write_all(head.as_bytes())?;
        for i in 0..message.pieces() {
            message.read_piece(i, &mut piece)?;
            f.write_all(&piece)?;
        }
        Ok(())
    })?;
    Ok(name)
}

/// `parts` as the file `dir/name`: temp file, `sync_data`, rename,
/// directory fsync. The temp file's name is fixed too: one a crash left
/// is truncated and reused.
fn write_durably(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    write(&mut f)?;
    f.sync_data()?;
    drop(f);
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

/// Whether `name` is a temp file [`write_eml`] makes: `.ID-GROUP.eml.tmp`.
fn is_temp_name(name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.strip_suffix(".eml.tmp"))
        .and_then(|n| n.split_once('-'))
        .is_some_and(|(id, _)| QueueId::parse(id).is_some())
}

/// Removes the temp files a crash left in `dir` (a missing folder has
/// none). Only names [`write_eml`] makes are touched. Another worker
/// writing to the same folder at this moment loses nothing: its rename
/// fails and that delivery is retried.
pub fn remove_leftovers(dir: &Path) -> io::Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_str().is_some_and(is_temp_name) {
            match fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_same_message_and_recipients_make_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let id = QueueId::new();
        let (a, b): (Mailbox, Mailbox) = (
            "a@example.test".parse().unwrap(),
            "b@example.test".parse().unwrap(),
        );
        let first = file_name(&id, &[a.clone(), b.clone()]);
        assert_eq!(first, file_name(&id, &[b.clone(), a.clone()]));
        assert!(first.starts_with(&format!("{id}-")) && first.ends_with(".eml"));
        write_durably(dir.path(), &first, |f| f.write_all(b"one\r\n")).unwrap();
        // A crash left a torn temp file of the next write.
        fs::write(dir.path().join(format!(".{first}.tmp")), b"torn").unwrap();
        write_durably(dir.path(), &first, |f| f.write_all(b"head\r\ntwo\r\n")).unwrap();
        assert_eq!(names(dir.path()), vec![first.clone()]);
        let text = fs::read_to_string(dir.path().join(&first)).unwrap();
        assert_eq!(text, "head\r\ntwo\r\n");
        // Another group of the same message, or another message, has a
        // name of its own.
        assert_ne!(file_name(&id, std::slice::from_ref(&a)), first);
        assert_ne!(file_name(&QueueId::new(), &[a, b]), first);
    }

    #[test]
    fn leftovers_go_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let id = QueueId::new();
        let left = format!(".{id}-0123456789abcdef.eml.tmp");
        for name in [left.as_str(), ".notes.tmp", "keep.eml", ".x-1.eml.tmp"] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(remove_leftovers(dir.path()).unwrap(), 1);
        assert_eq!(
            names(dir.path()),
            vec![".notes.tmp", ".x-1.eml.tmp", "keep.eml"]
        );
        assert_eq!(remove_leftovers(&dir.path().join("absent")).unwrap(), 0);
    }
}
