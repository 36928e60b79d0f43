//! The connection under a session (plain TCP or TLS), the one loop that
//! reads a server's replies, and the transcript hook.

use std::pin::Pin;
use std::task::{Context, Poll};

use ferry_smtp::client::{ReplyError, ReplyReader};
use ferry_smtp::Reply;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Why no reply could be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent something that is not an SMTP reply.
    #[error("{0}")]
    Malformed(#[from] ReplyError),
}

/// Reads one whole reply from `stream` into `reader` (multi-line replies
/// whole, however the bytes are split). No timeout of its own: callers
/// wrap it in theirs. Afterwards [`ReplyReader::last_wire`] holds the
/// reply as sent, and [`ReplyReader::buffered`] anything that came after.
///
/// This is the workspace's only loop that reads SMTP replies: delivery,
/// the balancer's probes and hand-offs, `ferry send` and the tests' raw
/// client all read through it.
///
/// # Errors
/// The server closed the connection, reading failed, or the bytes are not
/// an SMTP reply (see [`ReplyError`]).
pub async fn read_reply<S>(stream: &mut S, reader: &mut ReplyReader) -> Result<Reply, ReadError>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let mut chunk = [0u8; 4096];
    loop {
        match reader.next_reply() {
            Some(Ok(reply)) => return Ok(reply),
            Some(Err(e)) => return Err(ReadError::Malformed(e)),
            None => {}
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        reader.push(chunk.get(..n).unwrap_or_default());
    }
}

/// One line of a session's dialogue, for a transcript (`ferry send
/// --verbose`). Secrets never reach it: AUTH responses that carry a
/// password are masked before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line<'a> {
    /// Sent to the server (one line, without CRLF).
    Sent { text: &'a str, tls: bool },
    /// Received from the server (one line, without CRLF).
    Received { text: &'a str, tls: bool },
    /// What the client did: an address tried, a failure, TLS started.
    Note(&'a str),
}

/// Receives every line of a session's dialogue, in order.
pub trait Transcript: Send + Sync {
    fn line(&self, line: Line<'_>);
}

/// The byte stream of a session: TCP, or TLS over it. Public for clients
/// that speak raw SMTP (the tests' deliberately plain client).
#[derive(Debug)]
pub enum Stream {
    /// Clear text.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Between taking the TCP stream for a handshake and getting TLS back.
    Gone,
}

impl Stream {
    /// Whether TLS is on.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The TLS version and cipher suite, once TLS is on.
    pub fn tls_description(&self) -> Option<String> {
        let Stream::Tls(s) = self else { return None };
        let conn = s.get_ref().1;
        let version = conn.protocol_version().map(|v| format!("{v:?}"))?;
        let suite = conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))?;
        Some(format!("{version} {suite}"))
    }
}

fn not_connected() -> std::io::Error {
    std::io::ErrorKind::NotConnected.into()
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Gone => Poll::Ready(Err(not_connected())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Gone => Poll::Ready(Err(not_connected())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Gone => Poll::Ready(Err(not_connected())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Gone => Poll::Ready(Ok(())),
        }
    }
}
