//! One SMTP transaction to one next hop: connect, EHLO, STARTTLS per the
//! route's policy, AUTH to a smarthost, MAIL, RCPT (pipelined when
//! offered), DATA, QUIT. The result is one outcome per recipient.

use std::sync::Arc;
use std::time::Duration;

use ferry_config::TlsPolicy;
use ferry_smtp::client::{Capabilities, ReplyReader};
use ferry_smtp::data::dot_stuff;
use ferry_smtp::{Mailbox, Reply, ReversePath};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::pool::Target;

/// What happened to one recipient at this hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientOutcome {
    Delivered(String),
    Temporary(String),
    Permanent(String),
}

/// Why a hop could not take the message at all; the next hop is tried.
#[derive(Debug, thiserror::Error)]
pub enum HopError {
    #[error("connection to {hop} failed: {reason}")]
    Connect { hop: String, reason: String },
    #[error("{hop} does not offer STARTTLS, and the route requires TLS")]
    TlsUnavailable { hop: String },
    #[error("TLS with {hop} failed: {reason}")]
    Tls { hop: String, reason: String },
    /// The server refused the whole session (greeting, EHLO, AUTH, MAIL or
    /// DATA), with its reply.
    #[error("{hop} said: {reply}")]
    Refused { hop: String, reply: Reply },
    #[error("{hop}: {reason}")]
    Protocol { hop: String, reason: String },
    /// The hop cannot take this message (too big for its SIZE, or it needs
    /// SMTPUTF8 the hop lacks); a reply in SMTP form for the DSN.
    #[error("{reply}")]
    Unsuitable { hop: String, reply: String },
}

impl HopError {
    /// A 5xx refusal is final for every recipient; anything else is worth
    /// trying again (elsewhere or later).
    pub fn is_permanent(&self) -> bool {
        match self {
            HopError::Refused { reply, .. } => reply.code() >= 500,
            HopError::Unsuitable { .. } => true,
            _ => false,
        }
    }
}

/// The message to send.
pub struct Transaction<'a> {
    pub mail_from: &'a ReversePath,
    pub recipients: &'a [Mailbox],
    pub message: &'a [u8],
    pub body_8bit: bool,
    pub smtputf8: bool,
}

/// How to talk to the hop.
pub struct HopSettings<'a> {
    pub helo: &'a str,
    pub tls: TlsPolicy,
    pub verify_certificates: bool,
    pub auth: Option<&'a (String, String)>,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Gone,
}

/// An open SMTP session with a next hop, ready for a transaction.
pub struct Session {
    conn: Conn,
    reader: ReplyReader,
    hop: String,
    host: String,
    helo: String,
    verify_certificates: bool,
    command_timeout: Duration,
    caps: Capabilities,
}

impl Session {
    fn error(&self, reason: impl Into<String>) -> HopError {
        HopError::Protocol {
            hop: self.hop.clone(),
            reason: reason.into(),
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), HopError> {
        let fut = async {
            match &mut self.conn {
                Conn::Plain(s) => s.write_all(bytes).await,
                Conn::Tls(s) => {
                    s.write_all(bytes).await?;
                    s.flush().await
                }
                Conn::Gone => Err(std::io::ErrorKind::NotConnected.into()),
            }
        };
        match timeout(self.command_timeout, fut).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.error(format!("write failed: {e}"))),
            Err(_) => Err(self.error("write timed out")),
        }
    }

    async fn reply(&mut self) -> Result<Reply, HopError> {
        let mut buf = [0u8; 8192];
        loop {
            match self.reader.next_reply() {
                Some(Ok(r)) => return Ok(r),
                Some(Err(e)) => return Err(self.error(e.to_string())),
                None => {}
            }
            let read = async {
                match &mut self.conn {
                    Conn::Plain(s) => s.read(&mut buf).await,
                    Conn::Tls(s) => s.read(&mut buf).await,
                    Conn::Gone => Ok(0),
                }
            };
            match timeout(self.command_timeout, read).await {
                Ok(Ok(0)) => return Err(self.error("connection closed")),
                Ok(Ok(n)) => self.reader.push(buf.get(..n).unwrap_or_default()),
                Ok(Err(e)) => return Err(self.error(format!("read failed: {e}"))),
                Err(_) => return Err(self.error("timed out waiting for a reply")),
            }
        }
    }

    async fn command(&mut self, line: &str) -> Result<Reply, HopError> {
        self.send_raw(format!("{line}\r\n").as_bytes()).await?;
        self.reply().await
    }

    fn refused(&self, reply: Reply) -> HopError {
        HopError::Refused {
            hop: self.hop.clone(),
            reply,
        }
    }

    async fn ehlo(&mut self) -> Result<Capabilities, HopError> {
        let reply = self.command(&format!("EHLO {}", self.helo)).await?;
        if reply.code() == 250 {
            return Ok(Capabilities::from_ehlo(&reply));
        }
        let reply = self.command(&format!("HELO {}", self.helo)).await?;
        match reply.code() {
            250 => Ok(Capabilities::default()),
            _ => Err(self.refused(reply)),
        }
    }

    async fn starttls(&mut self) -> Result<(), HopError> {
        let reply = self.command("STARTTLS").await?;
        if reply.code() != 220 {
            return Err(self.refused(reply));
        }
        let Conn::Plain(tcp) = std::mem::replace(&mut self.conn, Conn::Gone) else {
            return Err(self.error("TLS already active"));
        };
        let config = client_tls(self.verify_certificates).map_err(|e| HopError::Tls {
            hop: self.hop.clone(),
            reason: e.to_string(),
        })?;
        let name = ServerName::try_from(self.host.clone()).map_err(|e| HopError::Tls {
            hop: self.hop.clone(),
            reason: e.to_string(),
        })?;
        let handshake = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
        match timeout(self.command_timeout, handshake).await {
            Ok(Ok(tls)) => {
                self.conn = Conn::Tls(Box::new(tls));
                Ok(())
            }
            Ok(Err(e)) => Err(HopError::Tls {
                hop: self.hop.clone(),
                reason: e.to_string(),
            }),
            Err(_) => Err(HopError::Tls {
                hop: self.hop.clone(),
                reason: "handshake timed out".into(),
            }),
        }
    }
}

/// Opens a session with `hop`: connect, greeting, EHLO, STARTTLS per the
/// route's policy, AUTH.
pub async fn open(target: &Target<'_>, settings: &HopSettings<'_>) -> Result<Session, HopError> {
    let hop = target.hop;
    let name = target.label();
    let connect = async {
        match target.address {
            Some(ip) => TcpStream::connect((ip, hop.port)).await,
            None => TcpStream::connect((hop.host.as_str(), hop.port)).await,
        }
    };
    let tcp = match timeout(settings.connect_timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(HopError::Connect {
                hop: name,
                reason: e.to_string(),
            })
        }
        Err(_) => {
            return Err(HopError::Connect {
                hop: name,
                reason: "timed out".into(),
            })
        }
    };
    let _ = tcp.set_nodelay(true);
    let mut s = Session {
        conn: Conn::Plain(tcp),
        reader: ReplyReader::new(),
        hop: name,
        host: hop.host.clone(),
        helo: settings.helo.to_string(),
        verify_certificates: settings.verify_certificates,
        command_timeout: settings.command_timeout,
        caps: Capabilities::default(),
    };
    let greeting = s.reply().await?;
    if greeting.code() != 220 {
        return Err(s.refused(greeting));
    }
    s.caps = s.ehlo().await?;
    match (settings.tls, s.caps.starttls) {
        (TlsPolicy::None, _) | (TlsPolicy::Opportunistic, false) => {}
        (TlsPolicy::Required, false) => {
            return Err(HopError::TlsUnavailable { hop: s.hop.clone() })
        }
        (_, true) => {
            s.starttls().await?;
            s.caps = s.ehlo().await?;
        }
    }
    if let Some((user, password)) = settings.auth {
        use base64::Engine;
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        let reply = s.command(&format!("AUTH PLAIN {token}")).await?;
        if reply.code() != 235 {
            return Err(s.refused(reply));
        }
    }
    Ok(s)
}

impl Session {
    /// Ends the session politely.
    pub async fn quit(mut self) {
        let _ = timeout(Duration::from_secs(2), self.command("QUIT")).await;
    }

    /// One transaction; afterwards the session is ready for the next one
    /// (if this returned `Ok`).
    pub async fn send(&mut self, tx: &Transaction<'_>) -> Result<Vec<RecipientOutcome>, HopError> {
        let caps = self.caps.clone();
        let size = tx.message.len() as u64;
        if let Some(max) = caps.size.filter(|max| *max > 0 && size > *max) {
            return Err(HopError::Unsuitable {
                hop: self.hop.clone(),
                reply: format!(
                    "552 5.3.4 Message size {size} exceeds the limit {max} of {}",
                    self.hop
                ),
            });
        }
        if tx.smtputf8 && !caps.smtputf8 {
            return Err(HopError::Unsuitable {
                hop: self.hop.clone(),
                reply: format!(
                    "553 5.6.7 SMTPUTF8 is required, but was not offered by {}",
                    self.hop
                ),
            });
        }
        let mut mail = format!("MAIL FROM:<{}>", tx.mail_from);
        if caps.size.is_some() {
            mail.push_str(&format!(" SIZE={}", tx.message.len()));
        }
        if tx.body_8bit && caps.eight_bit_mime {
            mail.push_str(" BODY=8BITMIME");
        }
        if tx.smtputf8 && caps.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        let rcpts: Vec<String> = tx
            .recipients
            .iter()
            .map(|r| format!("RCPT TO:<{r}>\r\n"))
            .collect();
        let (mail_reply, rcpt_replies) = if caps.pipelining {
            let mut batch = format!("{mail}\r\n");
            batch.extend(rcpts.iter().map(String::as_str));
            self.send_raw(batch.as_bytes()).await?;
            let mail_reply = self.reply().await?;
            let mut replies = Vec::new();
            for _ in &rcpts {
                replies.push(self.reply().await?);
            }
            (mail_reply, replies)
        } else {
            let mail_reply = self.command(&mail).await?;
            let mut replies = Vec::new();
            if mail_reply.code() == 250 {
                for r in &rcpts {
                    self.send_raw(r.as_bytes()).await?;
                    replies.push(self.reply().await?);
                }
            }
            (mail_reply, replies)
        };
        if mail_reply.code() != 250 {
            return Err(self.refused(mail_reply));
        }
        let mut outcomes: Vec<RecipientOutcome> = rcpt_replies
            .iter()
            .map(|r| match r.code() {
                250 | 251 => RecipientOutcome::Delivered(String::new()),
                c if c >= 500 => RecipientOutcome::Permanent(r.to_string()),
                _ => RecipientOutcome::Temporary(r.to_string()),
            })
            .collect();
        if !outcomes
            .iter()
            .any(|o| matches!(o, RecipientOutcome::Delivered(_)))
        {
            let reply = self.command("RSET").await?;
            if reply.code() != 250 {
                return Err(self.refused(reply));
            }
            return Ok(outcomes);
        }
        let data = self.command("DATA").await?;
        if data.code() != 354 {
            return Err(self.refused(data));
        }
        self.send_raw(&dot_stuff(tx.message)).await?;
        let done = self.reply().await?;
        for o in outcomes.iter_mut() {
            if matches!(o, RecipientOutcome::Delivered(_)) {
                *o = match done.code() {
                    250 => RecipientOutcome::Delivered(done.to_string()),
                    c if c >= 500 => RecipientOutcome::Permanent(done.to_string()),
                    _ => RecipientOutcome::Temporary(done.to_string()),
                };
            }
        }
        Ok(outcomes)
    }
}

/// rustls client settings: the web PKI roots, or (where the route says not
/// to verify) any certificate — still encrypted, not authenticated.
fn client_tls(verify: bool) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = if verify {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// Accepts any server certificate (signatures are still checked, so the
/// handshake is real): for routes with `verify_certificates = false`.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
