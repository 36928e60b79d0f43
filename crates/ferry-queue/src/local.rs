//! The on-disk spool: one file per message under `DATA/queue/`.
//!
//! A file is the envelope as one JSON line, then the message as received.
//! It is written under `DATA/tmp/`, flushed with `sync_data`, renamed into
//! `DATA/queue/ID.msg`, and the queue directory is fsynced: the rename is
//! durable before `store` returns. Files left in `tmp/` were never
//! acknowledged and are removed at start.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::envelope::{QueueId, StoredEnvelope};
use crate::{Spool, SpoolError, StoreFuture};

#[derive(Debug, Clone)]
pub struct LocalSpool {
    inner: Arc<Dirs>,
}

#[derive(Debug)]
struct Dirs {
    queue: PathBuf,
    tmp: PathBuf,
}

impl LocalSpool {
    /// Opens (creating) the spool under `data_dir`; removes leftovers of
    /// messages that were never acknowledged.
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        let queue = data_dir.join("queue");
        let tmp = data_dir.join("tmp");
        fs::create_dir_all(&queue)?;
        fs::create_dir_all(&tmp)?;
        for entry in fs::read_dir(&tmp)? {
            let path = entry?.path();
            if path.is_file() {
                tracing::info!(path = %path.display(), "removing unacknowledged spool leftover");
                fs::remove_file(&path)?;
            }
        }
        Ok(Self {
            inner: Arc::new(Dirs { queue, tmp }),
        })
    }

    pub fn queue_dir(&self) -> &Path {
        &self.inner.queue
    }

    /// Ids of the messages in the queue, oldest first.
    pub fn list(&self) -> io::Result<Vec<QueueId>> {
        let mut ids: Vec<QueueId> = fs::read_dir(&self.inner.queue)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                QueueId::parse(name.strip_suffix(".msg")?)
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Reads back one message and its envelope.
    pub fn read(&self, id: &QueueId) -> io::Result<(StoredEnvelope, Vec<u8>)> {
        let bytes = fs::read(self.inner.queue.join(format!("{id}.msg")))?;
        let nl = bytes
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no envelope line"))?;
        let (head, rest) = bytes.split_at(nl);
        let envelope: StoredEnvelope = serde_json::from_slice(head)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok((envelope, rest.get(1..).unwrap_or_default().to_vec()))
    }

    fn write(
        dirs: &Dirs,
        id: QueueId,
        envelope: &StoredEnvelope,
        message: &[u8],
    ) -> io::Result<QueueId> {
        let tmp = dirs.tmp.join(format!("{id}.msg"));
        let result = (|| {
            let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            let mut head = serde_json::to_vec(envelope).map_err(io::Error::other)?;
            head.push(b'\n');
            file.write_all(&head)?;
            file.write_all(message)?;
            file.sync_data()?;
            fs::rename(&tmp, dirs.queue.join(format!("{id}.msg")))?;
            File::open(&dirs.queue)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map(|()| id)
    }
}

impl Spool for LocalSpool {
    fn store(&self, id: QueueId, envelope: StoredEnvelope, message: Vec<u8>) -> StoreFuture<'_> {
        let dirs = Arc::clone(&self.inner);
        Box::pin(async move {
            let joined =
                tokio::task::spawn_blocking(move || Self::write(&dirs, id, &envelope, &message))
                    .await;
            match joined {
                Ok(Ok(id)) => Ok(id),
                Ok(Err(e)) if e.kind() == io::ErrorKind::StorageFull => Err(SpoolError::Full(e)),
                Ok(Err(e)) => Err(SpoolError::Io(e)),
                Err(e) => Err(SpoolError::Task(e.to_string())),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> StoredEnvelope {
        StoredEnvelope {
            mail_from: "a@x.test".into(),
            rcpt_to: vec!["b@y.test".into()],
            client_ip: "127.0.0.1".into(),
            helo: "dev".into(),
            connector: "Default".into(),
            user: None,
            received_at: 0,
            body_8bit: false,
            smtputf8: false,
            session_id: "S1".into(),
        }
    }

    #[tokio::test]
    async fn stored_message_reads_back_and_leftovers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = LocalSpool::open(dir.path()).unwrap();
        let id = spool
            .store(
                QueueId::new(),
                envelope(),
                b"Subject: x\r\n\r\nhi\r\n".to_vec(),
            )
            .await
            .unwrap();
        assert_eq!(spool.list().unwrap(), vec![id.clone()]);
        let (env, msg) = spool.read(&id).unwrap();
        assert_eq!(env, envelope());
        assert_eq!(msg, b"Subject: x\r\n\r\nhi\r\n");

        fs::write(dir.path().join("tmp/partial.msg"), b"half").unwrap();
        let spool = LocalSpool::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(spool.list().unwrap().len(), 1);
    }
}
