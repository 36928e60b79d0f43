//! A greeted SMTP session: EHLO or HELO, STARTTLS, AUTH, transactions.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ferry_smtp::client::{Capabilities, ReplyReader};
use ferry_smtp::data::DotStuffer;
use ferry_smtp::{Mailbox, Reply, ReversePath};
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;
use zeroize::Zeroizing;

use crate::connect::Attempt;
use crate::io::{read_reply, Line, Stream, Transcript};
use crate::tls::{server_name, TlsMode, Verify};
use crate::{Credentials, Error, Mechanism, Settings, Timeouts};

/// What a transcript shows instead of a secret.
const MASK: &str = "********";

/// One piece of a message, once read.
pub type PieceFuture<'a> = Pin<Box<dyn Future<Output = std::io::Result<&'a [u8]>> + Send + 'a>>;

/// A message's bytes (CRLF line endings, not dot-stuffed), sent piece by
/// piece: delivery reads a large message from its spool a piece at a time
/// while it sends, never the whole of it into memory. Bytes in memory
/// (`Vec<u8>`, `&[u8]`, a byte string) are one piece.
pub trait MessageBody: Sync {
    /// Octets in all (for `SIZE=`).
    fn len(&self) -> u64;
    /// The message is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// How many pieces it is sent in.
    fn pieces(&self) -> usize;
    /// Piece `i`, read into `buf` if it has to be read.
    fn piece<'a>(&'a self, i: usize, buf: &'a mut Vec<u8>) -> PieceFuture<'a>;
}

impl<T: AsRef<[u8]> + Sync + ?Sized> MessageBody for T {
    fn len(&self) -> u64 {
        self.as_ref().len() as u64
    }

    fn pieces(&self) -> usize {
        1
    }

    fn piece<'a>(&'a self, i: usize, _buf: &'a mut Vec<u8>) -> PieceFuture<'a> {
        let bytes = if i == 0 { self.as_ref() } else { &[] };
        Box::pin(async move { Ok(bytes) })
    }
}

/// The message of one transaction.
#[derive(Clone, Copy)]
pub struct Transaction<'a> {
    pub mail_from: &'a ReversePath,
    pub recipients: &'a [Mailbox],
    /// The message.
    pub message: &'a dyn MessageBody,
    /// The message has 8-bit bytes (`BODY=8BITMIME` where offered,
    /// RFC 6152).
    pub body_8bit: bool,
    /// An address is not ASCII (`SMTPUTF8`, RFC 6531; refused where not
    /// offered).
    pub smtputf8: bool,
}

/// What became of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The server took the message for it.
    Accepted,
    /// Refused for now (4xx): try again later.
    Temporary,
    /// Refused (5xx).
    Permanent,
}

impl Outcome {
    fn of(reply: &Reply) -> Self {
        match reply.code() {
            200..=399 => Outcome::Accepted,
            c if c >= 500 => Outcome::Permanent,
            _ => Outcome::Temporary,
        }
    }
}

/// One recipient's result: its outcome and the reply that decided it (the
/// RCPT reply when refused there, else the reply to the end of data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientResult {
    pub recipient: Mailbox,
    pub outcome: Outcome,
    pub reply: Reply,
}

/// An open SMTP session.
pub struct Session {
    stream: Stream,
    reader: ReplyReader,
    peer: SocketAddr,
    label: String,
    host: String,
    greeting: Reply,
    caps: Capabilities,
    timeouts: Timeouts,
    transcript: Option<Arc<dyn Transcript>>,
    failed: Vec<Attempt>,
}

impl Session {
    pub(crate) fn new(
        stream: Stream,
        reader: ReplyReader,
        peer: SocketAddr,
        label: String,
        host: String,
        greeting: Reply,
        settings: &Settings,
    ) -> Self {
        Self {
            stream,
            reader,
            peer,
            label,
            host,
            greeting,
            caps: Capabilities::default(),
            timeouts: settings.timeouts,
            transcript: settings.transcript.clone(),
            failed: Vec::new(),
        }
    }

    /// Marks the session as the one kept, with the attempts that failed.
    pub(crate) fn connected(mut self, failed: Vec<Attempt>) -> Self {
        self.failed = failed;
        self.note(&format!("Connected to {}", self.peer));
        if let Some(description) = self.stream.tls_description() {
            self.note(&format!("TLS started: {description}"));
        }
        self.echo_received();
        self
    }

    /// The server's `220` greeting.
    pub fn greeting(&self) -> &Reply {
        &self.greeting
    }

    /// What the last EHLO offered (nothing after HELO).
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The address connected to.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// How errors name the server (see [`crate::Target::label`]).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Whether TLS is on (implicit, or after STARTTLS).
    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }

    /// The addresses tried before this one, and why each failed.
    pub fn failed_attempts(&self) -> &[Attempt] {
        &self.failed
    }

    fn note(&self, text: &str) {
        if let Some(t) = &self.transcript {
            t.line(Line::Note(text));
        }
    }

    fn echo_sent(&self, text: &str) {
        if let Some(t) = &self.transcript {
            let tls = self.is_tls();
            for line in text.split_terminator('\n') {
                t.line(Line::Sent {
                    text: line.trim_end_matches('\r'),
                    tls,
                });
            }
        }
    }

    fn echo_received(&self) {
        if let Some(t) = &self.transcript {
            let tls = self.is_tls();
            let wire = String::from_utf8_lossy(self.reader.last_wire());
            for line in wire.split_terminator('\n') {
                t.line(Line::Received {
                    text: line.trim_end_matches('\r'),
                    tls,
                });
            }
        }
    }

    fn lost(&self, reason: impl Into<String>) -> Error {
        Error::Connection {
            peer: self.label.clone(),
            reason: reason.into(),
        }
    }

    fn refused(&self, command: &'static str, reply: Reply) -> Error {
        Error::Refused {
            peer: self.label.clone(),
            command,
            reply,
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let stream = &mut self.stream;
        let write = async {
            stream.write_all(bytes).await?;
            stream.flush().await
        };
        match timeout(self.timeouts.command, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.lost(format!("write failed: {e}"))),
            Err(_) => Err(self.lost("write timed out")),
        }
    }

    async fn read(&mut self, limit: Duration) -> Result<Reply, Error> {
        match timeout(limit, read_reply(&mut self.stream, &mut self.reader)).await {
            Ok(Ok(reply)) => {
                self.echo_received();
                Ok(reply)
            }
            Ok(Err(e)) => Err(self.lost(e.to_string())),
            Err(_) => Err(self.lost("timed out waiting for a reply")),
        }
    }

    /// Sends one command line (without CRLF) and reads its reply, within
    /// the command timeout.
    ///
    /// # Errors
    /// [`Error::Connection`]: the write or the read failed or timed out,
    /// or the answer is not an SMTP reply.
    pub async fn command(&mut self, line: &str) -> Result<Reply, Error> {
        self.echo_sent(line);
        self.write(format!("{line}\r\n").as_bytes()).await?;
        self.read(self.timeouts.command).await
    }

    /// A command whose line carries a secret: the transcript shows
    /// `shown` instead.
    async fn secret_command(&mut self, line: &str, shown: &str) -> Result<Reply, Error> {
        self.echo_sent(shown);
        let wire = Zeroizing::new(format!("{line}\r\n"));
        self.write(wire.as_bytes()).await?;
        self.read(self.timeouts.command).await
    }

    /// EHLO, and HELO when EHLO is refused (RFC 5321 §3.2); the
    /// capabilities are those of the EHLO reply, none after HELO.
    ///
    /// # Errors
    /// [`Error::Refused`] with HELO's reply when both are refused (or
    /// with EHLO's `421`, after which the server closes).
    pub async fn hello(&mut self, helo: &str) -> Result<(), Error> {
        let reply = self.command(&format!("EHLO {helo}")).await?;
        if reply.code() == 250 {
            self.caps = Capabilities::from_ehlo(&reply);
            return Ok(());
        }
        if reply.code() == 421 {
            return Err(self.refused("EHLO", reply));
        }
        let reply = self.command(&format!("HELO {helo}")).await?;
        if reply.code() == 250 {
            self.caps = Capabilities::default();
            return Ok(());
        }
        Err(self.refused("HELO", reply))
    }

    /// STARTTLS and the handshake (RFC 3207). What the server said before
    /// is forgotten, its capabilities included: send EHLO again.
    ///
    /// # Errors
    /// [`Error::Refused`] when STARTTLS is refused, [`Error::Tls`] when
    /// the handshake fails (a certificate not trusted, a timeout).
    pub async fn starttls(&mut self, verify: &Verify) -> Result<(), Error> {
        let reply = self.command("STARTTLS").await?;
        if reply.code() != 220 {
            return Err(self.refused("STARTTLS", reply));
        }
        let tls_failed = |peer: &str, reason: String| Error::Tls {
            peer: peer.to_string(),
            reason,
        };
        let config = verify.client_config()?;
        let name = server_name(&self.host).map_err(|e| tls_failed(&self.label, e))?;
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            return Err(self.lost("TLS already active"));
        };
        let handshake = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
        match timeout(self.timeouts.command, handshake).await {
            Ok(Ok(tls)) => self.stream = Stream::Tls(Box::new(tls)),
            Ok(Err(e)) => return Err(tls_failed(&self.label, e.to_string())),
            Err(_) => return Err(tls_failed(&self.label, "handshake timed out".into())),
        }
        // Nothing read before the handshake may count after it (RFC 3207
        // §4.2: a man in the middle could have injected it).
        self.reader = ReplyReader::new();
        self.caps = Capabilities::default();
        if let Some(description) = self.stream.tls_description() {
            self.note(&format!("TLS started: {description}"));
        }
        Ok(())
    }

    /// AUTH (RFC 4954) with the credentials' mechanism, or by default
    /// PLAIN when offered (RFC 4616), else LOGIN when offered, else PLAIN
    /// anyway, so the server's refusal says why.
    ///
    /// # Errors
    /// [`Error::Refused`] with the server's reply.
    pub async fn authenticate(&mut self, credentials: &Credentials) -> Result<(), Error> {
        let user = &credentials.user;
        let mechanism =
            credentials
                .mechanism
                .unwrap_or(if self.caps.auth_login && !self.caps.auth_plain {
                    Mechanism::Login
                } else {
                    Mechanism::Plain
                });
        if mechanism == Mechanism::Login {
            let reply = self.command("AUTH LOGIN").await?;
            if reply.code() != 334 {
                return Err(self.refused("AUTH", reply));
            }
            let reply = self.command(&STANDARD.encode(user)).await?;
            if reply.code() != 334 {
                return Err(self.refused("AUTH", reply));
            }
            let password = Zeroizing::new(STANDARD.encode(credentials.password.as_bytes()));
            let reply = self.secret_command(&password, MASK).await?;
            if reply.code() != 235 {
                return Err(self.refused("AUTH", reply));
            }
            return Ok(());
        }
        let token = Zeroizing::new(STANDARD.encode(Zeroizing::new(format!(
            "\0{user}\0{}",
            credentials.password.as_str()
        ))));
        let line = Zeroizing::new(format!("AUTH PLAIN {}", token.as_str()));
        let reply = self
            .secret_command(&line, &format!("AUTH PLAIN {MASK}"))
            .await?;
        if reply.code() != 235 {
            return Err(self.refused("AUTH", reply));
        }
        Ok(())
    }

    /// EHLO, TLS as `settings.tls` says (EHLO again after STARTTLS), and
    /// AUTH when `settings.auth` is set.
    ///
    /// # Errors
    /// As [`Session::hello`], [`Session::starttls`] and
    /// [`Session::authenticate`], and [`Error::TlsUnavailable`] when TLS
    /// is required and not offered.
    pub async fn handshake(&mut self, settings: &Settings) -> Result<(), Error> {
        self.hello(&settings.helo).await?;
        let start_tls = match settings.tls.mode {
            TlsMode::Off | TlsMode::Implicit => false,
            TlsMode::Opportunistic => self.caps.starttls,
            TlsMode::Required if !self.caps.starttls => {
                return Err(Error::TlsUnavailable {
                    peer: self.label.clone(),
                })
            }
            TlsMode::Required => true,
        };
        if start_tls {
            self.starttls(&settings.tls.verify).await?;
            self.hello(&settings.helo).await?;
        }
        if let Some(credentials) = &settings.auth {
            self.authenticate(credentials).await?;
        }
        Ok(())
    }

    /// One transaction: MAIL (with SIZE, BODY=8BITMIME, SMTPUTF8 where
    /// offered and needed), the RCPTs (pipelined with MAIL when the server
    /// offers PIPELINING), DATA. Afterwards the session is ready for the
    /// next transaction, if this returned `Ok`. When no recipient is
    /// accepted the transaction is reset (RSET) and nothing is sent.
    ///
    /// # Errors
    /// [`Error::Unsuitable`] before anything is sent when the message is
    /// over the server's SIZE or needs SMTPUTF8 it lacks;
    /// [`Error::Refused`] when MAIL, DATA or RSET is refused;
    /// [`Error::Connection`] when the connection fails; [`Error::Local`]
    /// when the message cannot be read (the connection is then closed
    /// mid-data, so the server keeps nothing of it).
    pub async fn send(&mut self, tx: &Transaction<'_>) -> Result<Vec<RecipientResult>, Error> {
        let size = tx.message.len();
        if let Some(max) = self.caps.size.filter(|max| *max > 0 && size > *max) {
            return Err(Error::Unsuitable {
                peer: self.label.clone(),
                reply: format!(
                    "552 5.3.4 Message size {size} exceeds the limit {max} of {}",
                    self.label
                ),
            });
        }
        if tx.smtputf8 && !self.caps.smtputf8 {
            return Err(Error::Unsuitable {
                peer: self.label.clone(),
                reply: format!(
                    "553 5.6.7 SMTPUTF8 is required, but was not offered by {}",
                    self.label
                ),
            });
        }
        let mut mail = format!("MAIL FROM:<{}>", tx.mail_from);
        if self.caps.size.is_some() {
            mail.push_str(&format!(" SIZE={size}"));
        }
        if tx.body_8bit && self.caps.eight_bit_mime {
            mail.push_str(" BODY=8BITMIME");
        }
        if tx.smtputf8 && self.caps.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        let rcpts: Vec<String> = tx
            .recipients
            .iter()
            .map(|r| format!("RCPT TO:<{r}>\r\n"))
            .collect();
        let mut rcpt_replies = Vec::with_capacity(rcpts.len());
        let mail_reply = if self.caps.pipelining {
            // RFC 2920: MAIL and every RCPT in one write, the replies in
            // order after.
            let mut batch = format!("{mail}\r\n");
            batch.extend(rcpts.iter().map(String::as_str));
            self.echo_sent(&batch);
            self.write(batch.as_bytes()).await?;
            let mail_reply = self.read(self.timeouts.command).await?;
            for _ in &rcpts {
                rcpt_replies.push(self.read(self.timeouts.command).await?);
            }
            mail_reply
        } else {
            let mail_reply = self.command(&mail).await?;
            if mail_reply.code() == 250 {
                for r in &rcpts {
                    self.echo_sent(r);
                    self.write(r.as_bytes()).await?;
                    rcpt_replies.push(self.read(self.timeouts.command).await?);
                }
            }
            mail_reply
        };
        if mail_reply.code() != 250 {
            return Err(self.refused("MAIL", mail_reply));
        }
        let mut results: Vec<RecipientResult> = tx
            .recipients
            .iter()
            .zip(rcpt_replies)
            .map(|(recipient, reply)| RecipientResult {
                recipient: recipient.clone(),
                outcome: match reply.code() {
                    250 | 251 => Outcome::Accepted,
                    _ => Outcome::of(&reply),
                },
                reply,
            })
            .collect();
        if !results.iter().any(|r| r.outcome == Outcome::Accepted) {
            let reply = self.command("RSET").await?;
            if reply.code() != 250 {
                return Err(self.refused("RSET", reply));
            }
            return Ok(results);
        }
        let data = self.command("DATA").await?;
        if data.code() != 354 {
            return Err(self.refused("DATA", data));
        }
        self.send_body(tx.message).await?;
        let done = self.read(self.timeouts.data_end).await?;
        for r in results.iter_mut() {
            if r.outcome == Outcome::Accepted {
                r.outcome = match done.code() {
                    250 => Outcome::Accepted,
                    _ => Outcome::of(&done).min_refusal(),
                };
                r.reply = done.clone();
            }
        }
        Ok(results)
    }

    /// Sends the message, dot-stuffed, piece by piece, and the end of
    /// data.
    async fn send_body(&mut self, message: &dyn MessageBody) -> Result<(), Error> {
        let mut stuffer = DotStuffer::default();
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let pieces = message.pieces();
        for i in 0..pieces {
            let piece = match message.piece(i, &mut buf).await {
                Ok(piece) => piece,
                Err(e) => {
                    // Never end the data of a message sent in part.
                    let _ = timeout(Duration::from_secs(1), self.stream.shutdown()).await;
                    return Err(Error::Local(format!("cannot read the message: {e}")));
                }
            };
            if self.transcript.is_some() {
                self.echo_sent(&String::from_utf8_lossy(piece));
            }
            out.clear();
            stuffer.push(piece, &mut out);
            if i + 1 < pieces {
                self.write(&out).await?;
            }
        }
        // The end of data goes with the last piece: one write for most mail.
        stuffer.finish(&mut out);
        self.echo_sent(".");
        self.write(&out).await
    }

    /// Ends the session politely (QUIT, a short wait for its reply, TLS
    /// closed cleanly).
    pub async fn quit(mut self) {
        let _ = timeout(Duration::from_secs(2), self.command("QUIT")).await;
        let _ = timeout(Duration::from_secs(1), self.stream.shutdown()).await;
        self.note("Connection closed");
    }
}

impl Outcome {
    /// Anything but `250` after the data is a refusal: a 2xx or 3xx other
    /// than 250 there is a confused server, and counts as temporary.
    fn min_refusal(self) -> Self {
        match self {
            Outcome::Accepted => Outcome::Temporary,
            other => other,
        }
    }
}
