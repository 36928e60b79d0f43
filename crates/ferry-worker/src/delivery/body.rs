//! A queued message's bytes as delivery reads them: from the spool, a
//! piece (at most 256 KiB) at a time while the previous one is sent, so
//! an attempt holds a piece of a 36 MB message, not the message.

use std::io;
use std::sync::Arc;

use ferry_client::{MessageBody, PieceFuture};
use ferry_queue::SpooledBody;

/// Pieces up to this many octets are read on the runtime's own thread:
/// one read from the page cache, shorter than handing it to another
/// thread and back (measured with `bench/relay.sh`: the hand-off raised
/// the worker's CPU per 4 KiB message by about 15 %). Larger ones are read
/// on the blocking pool.
pub(super) const READ_INLINE: u64 = 64 * 1024;

/// Of a message, this much at most is read for a report's copy of its
/// header section (RFC 3462 `text/rfc822-headers`).
const HEADER_READ: usize = 512 * 1024;

/// A queued message, open for reading.
pub(crate) struct Body {
    spooled: Arc<SpooledBody>,
}

impl Body {
    pub(super) fn new(spooled: SpooledBody) -> Self {
        Self {
            spooled: Arc::new(spooled),
        }
    }

    /// The message as the spool reads it (blocking reads).
    pub(super) fn spooled(&self) -> &SpooledBody {
        &self.spooled
    }

    /// The start of the message, enough for its header section.
    pub(super) async fn header(&self) -> io::Result<Vec<u8>> {
        if self.spooled.len() <= READ_INLINE {
            return self.spooled.read_prefix(HEADER_READ);
        }
        let spooled = Arc::clone(&self.spooled);
        tokio::task::spawn_blocking(move || spooled.read_prefix(HEADER_READ))
            .await
            .map_err(io::Error::other)?
    }
}

impl MessageBody for Body {
    fn len(&self) -> u64 {
        self.spooled.len()
    }

    fn pieces(&self) -> usize {
        self.spooled.pieces()
    }

    fn piece<'a>(&'a self, i: usize, buf: &'a mut Vec<u8>) -> PieceFuture<'a> {
        Box::pin(async move {
            if self.spooled.piece_len(i) <= READ_INLINE {
                self.spooled.read_piece(i, buf)?;
                return Ok(buf.as_slice());
            }
            let spooled = Arc::clone(&self.spooled);
            let mut owned = std::mem::take(buf);
            let read = tokio::task::spawn_blocking(move || {
                spooled.read_piece(i, &mut owned).map(|()| owned)
            })
            .await
            .map_err(io::Error::other)??;
            *buf = read;
            Ok(buf.as_slice())
        })
    }
}
