//! The `directory` route: each message as an `.eml` file, its envelope in
//! `X-Ferry-*` header fields on top. For tests, demos and archives.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use ferry_queue::{QueueId, StoredEnvelope};
use ferry_smtp::Mailbox;

/// Writes the message for `recipients` into `dir`, durably, under a name
/// made of the queue id and a sequence number (a message may reach one
/// directory more than once for different recipients).
pub fn write_eml(
    dir: &Path,
    id: &QueueId,
    envelope: &StoredEnvelope,
    recipients: &[Mailbox],
    message: &[u8],
) -> io::Result<String> {
    fs::create_dir_all(dir)?;
    let mut head = format!(
        "X-Ferry-Queue-Id: {id}\r\nX-Ferry-Mail-From: <{}>\r\n",
        envelope.mail_from
    );
    for r in recipients {
        head.push_str(&format!("X-Ferry-Rcpt-To: <{r}>\r\n"));
    }
    head.push_str(&format!("X-Ferry-Client: {}\r\n", envelope.client_ip));
    for n in 0u32.. {
        let name = format!("{id}-{n}.eml");
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(&name))
        {
            Ok(_) => {
                // The name is ours now; write beside it and rename over it.
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&tmp)?
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        };
        f.write_all(head.as_bytes())?;
        f.write_all(message)?;
        f.sync_data()?;
        fs::rename(&tmp, dir.join(&name))?;
        File::open(dir)?.sync_all()?;
        return Ok(name);
    }
    Err(io::Error::other("no free file name"))
}
