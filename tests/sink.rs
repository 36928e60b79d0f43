//! A scripted SMTP next hop on loopback: records what it receives and
//! answers recipients by their local part — `temp…` gets `450 4.2.0`,
//! `perm…` gets `550 5.1.1`, anything else `250`; a message for a `slow…`
//! recipient gets its final `250` after 300 ms. Every RCPT can be made
//! slow too ([`SmtpSink::delay_rcpt`]), and the RCPTs each address got are
//! counted ([`SmtpSink::rcpt_count`]). It can greet with a refusal
//! ([`SmtpSink::greet_with`]), offer SMTPUTF8, STARTTLS with a given
//! certificate ([`SmtpSink::start_tls`]) and AUTH PLAIN over TLS
//! ([`SmtpSink::require_auth`]); each message records its MAIL line, and
//! whether its session was TLS and as whom it authenticated.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// One message as the sink got it.
#[derive(Debug, Clone)]
pub struct SinkMessage {
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// As sent (still dot-stuffed), without the final `.CRLF`.
    pub data: Vec<u8>,
    /// The MAIL command as sent, parameters included.
    pub mail_line: String,
    /// Whether the session had started TLS.
    pub tls: bool,
    /// The user the session authenticated as.
    pub auth: Option<String>,
}

#[derive(Clone)]
pub struct SmtpSink {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<SinkMessage>>>,
    accept_all: Arc<AtomicBool>,
    /// The SIZE it advertises.
    max_size: Arc<AtomicUsize>,
    /// Sessions open now, and the most ever open at once.
    sessions: Arc<(AtomicUsize, AtomicUsize)>,
    /// Milliseconds before each RCPT reply.
    rcpt_delay_ms: Arc<AtomicU64>,
    /// RCPT commands per address, whatever the reply.
    rcpts_seen: Arc<Mutex<HashMap<String, usize>>>,
    /// A greeting other than `220` (then every command but QUIT is refused).
    greeting: Arc<Mutex<Option<String>>>,
    /// Sessions greeted with a refusal that the client ended with QUIT.
    quits_after_refusal: Arc<AtomicUsize>,
    /// Whether EHLO offers SMTPUTF8.
    smtputf8: Arc<AtomicBool>,
    /// STARTTLS is offered when set.
    tls: Option<TlsAcceptor>,
    /// AUTH PLAIN is offered after STARTTLS, and required, when set.
    credentials: Arc<Mutex<Option<(String, String)>>>,
}

/// How a session ended: over, or STARTTLS accepted on this stream.
enum Ended<S> {
    Closed,
    StartTls(S),
}

impl SmtpSink {
    pub async fn start() -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// A sink on a given address (port 0 for any free port).
    pub async fn start_on(addr: SocketAddr) -> Self {
        Self::start_inner(addr, None).await
    }

    /// A sink on 127.0.0.1 that offers STARTTLS with the certificate chain
    /// and key in `cert_pem` and `key_pem`.
    pub async fn start_tls(cert_pem: &[u8], key_pem: &[u8]) -> Self {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        Self::start_inner(SocketAddr::from(([127, 0, 0, 1], 0)), Some(acceptor)).await
    }

    async fn start_inner(addr: SocketAddr, tls: Option<TlsAcceptor>) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let sink = SmtpSink {
            addr: listener.local_addr().unwrap(),
            received: Arc::default(),
            accept_all: Arc::default(),
            sessions: Arc::default(),
            max_size: Arc::new(AtomicUsize::new(100_000_000)),
            rcpt_delay_ms: Arc::default(),
            rcpts_seen: Arc::default(),
            greeting: Arc::default(),
            quits_after_refusal: Arc::default(),
            smtputf8: Arc::default(),
            tls,
            credentials: Arc::default(),
        };
        let s = sink.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let now = s.sessions.0.fetch_add(1, Ordering::SeqCst) + 1;
                    s.sessions.1.fetch_max(now, Ordering::SeqCst);
                    if let (Ok(Ended::StartTls(tcp)), Some(acceptor)) =
                        (s.serve(stream, false).await, &s.tls)
                    {
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            let _ = s.serve(tls, true).await;
                        }
                    }
                    s.sessions.0.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        sink
    }

    /// From now on `temp…` recipients are accepted too.
    pub fn accept_everything(&self) {
        self.accept_all.store(true, Ordering::SeqCst);
    }

    /// Greets new sessions with `reply` (e.g. `554 5.3.2 not now`) instead
    /// of `220`, and refuses everything but QUIT in them.
    pub fn greet_with(&self, reply: &str) {
        *self.greeting.lock().unwrap() = Some(reply.to_string());
    }

    /// Sessions greeted with a refusal that the client ended with QUIT.
    pub fn quits_after_refusal(&self) -> usize {
        self.quits_after_refusal.load(Ordering::SeqCst)
    }

    /// Offers SMTPUTF8 (RFC 6531) from now on.
    pub fn offer_smtputf8(&self) {
        self.smtputf8.store(true, Ordering::SeqCst);
    }

    /// Offers AUTH PLAIN once TLS is on, and refuses MAIL without it: only
    /// `user` with `password` is accepted.
    pub fn require_auth(&self, user: &str, password: &str) {
        *self.credentials.lock().unwrap() = Some((user.to_string(), password.to_string()));
    }

    /// Advertises `SIZE max` from now on.
    pub fn limit_size(&self, max: usize) {
        self.max_size.store(max, Ordering::SeqCst);
    }

    /// Answers every RCPT after `delay` from now on (a slow next hop).
    pub fn delay_rcpt(&self, delay: Duration) {
        self.rcpt_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// How many RCPT commands named `address`.
    pub fn rcpt_count(&self, address: &str) -> usize {
        self.rcpts_seen
            .lock()
            .unwrap()
            .get(address)
            .copied()
            .unwrap_or(0)
    }

    /// Sessions open right now.
    pub fn open_sessions(&self) -> usize {
        self.sessions.0.load(Ordering::SeqCst)
    }

    /// The most sessions ever open at once.
    pub fn peak_sessions(&self) -> usize {
        self.sessions.1.load(Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<SinkMessage> {
        self.received.lock().unwrap().clone()
    }

    /// Waits (bounded) until at least `n` messages arrived.
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<SinkMessage> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let got = self.received();
            if got.len() >= n || tokio::time::Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The EHLO reply: what this sink offers in a session with TLS on or
    /// off.
    fn ehlo(&self, tls: bool) -> String {
        let mut lines = vec![
            "sink.test".to_string(),
            "PIPELINING".into(),
            format!("SIZE {}", self.max_size.load(Ordering::SeqCst)),
            "8BITMIME".into(),
        ];
        if self.smtputf8.load(Ordering::SeqCst) {
            lines.push("SMTPUTF8".into());
        }
        if self.tls.is_some() && !tls {
            lines.push("STARTTLS".into());
        }
        if tls && self.credentials.lock().unwrap().is_some() {
            lines.push("AUTH PLAIN".into());
        }
        let last = lines.len() - 1;
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    /// `235` and the user for the right AUTH PLAIN line, else a refusal.
    fn auth(&self, line: &str, tls: bool) -> (String, Option<String>) {
        use base64::Engine;
        let credentials = self.credentials.lock().unwrap().clone();
        let Some((user, password)) = credentials.filter(|_| tls) else {
            return ("503 5.5.1 AUTH not offered".into(), None);
        };
        let given = line
            .split_whitespace()
            .nth(2)
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .unwrap_or_default();
        if given == format!("\0{user}\0{password}").into_bytes() {
            ("235 2.7.0 Authentication successful".into(), Some(user))
        } else {
            ("535 5.7.8 Authentication credentials invalid".into(), None)
        }
    }

    /// Serves one session (`tls`: on a stream that is TLS already).
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        tls: bool,
    ) -> std::io::Result<Ended<S>> {
        let refusal = self.greeting.lock().unwrap().clone();
        if let Some(greeting) = refusal {
            let quit = refuse(stream, &greeting).await?;
            self.quits_after_refusal
                .fetch_add(usize::from(quit), Ordering::SeqCst);
            return Ok(Ended::Closed);
        }
        if !tls {
            stream.write_all(b"220 sink.test ESMTP\r\n").await?;
        }
        let mut authenticated: Option<String> = None;
        let mut mail_line = String::new();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let mut from = String::new();
        let mut rcpts = Vec::new();
        let mut in_data = false;
        // Where the search for the end of data goes on: only new bytes are
        // searched, so a large message costs one pass, not one per read.
        let mut searched = 0;
        loop {
            if in_data {
                let start = searched.min(buf.len()).saturating_sub(4);
                searched = buf.len();
                if let Some(end) = buf[start..]
                    .windows(5)
                    .position(|w| w == b"\r\n.\r\n")
                    .map(|at| start + at)
                {
                    let data = buf[..end + 2].to_vec();
                    buf.drain(..end + 5);
                    in_data = false;
                    searched = 0;
                    if rcpts.iter().any(|r: &String| r.starts_with("slow")) {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    self.received.lock().unwrap().push(SinkMessage {
                        mail_from: std::mem::take(&mut from),
                        rcpt_to: std::mem::take(&mut rcpts),
                        data,
                        mail_line: std::mem::take(&mut mail_line),
                        tls,
                        auth: authenticated.clone(),
                    });
                    stream.write_all(b"250 2.0.0 queued as SINK\r\n").await?;
                    continue;
                }
            } else if let Some(lf) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=lf).collect();
                let line = String::from_utf8_lossy(&line).trim_end().to_string();
                let upper = line.to_ascii_uppercase();
                let must_auth = self.credentials.lock().unwrap().is_some();
                let reply: String = if upper.starts_with("EHLO") {
                    self.ehlo(tls)
                } else if upper == "STARTTLS" && self.tls.is_some() && !tls {
                    stream
                        .write_all(b"220 2.0.0 Ready to start TLS\r\n")
                        .await?;
                    return Ok(Ended::StartTls(stream));
                } else if upper.starts_with("AUTH ") {
                    let (reply, user) = self.auth(&line, tls);
                    authenticated = user.or(authenticated);
                    reply
                } else if upper.starts_with("MAIL FROM:") && must_auth && authenticated.is_none() {
                    "530 5.7.0 Authentication required".into()
                } else if upper.starts_with("HELO")
                    || upper.starts_with("RSET")
                    || upper.starts_with("NOOP")
                {
                    "250 2.0.0 OK".into()
                } else if upper.starts_with("MAIL FROM:") {
                    from = addr_of(&line);
                    mail_line = line.clone();
                    rcpts.clear();
                    "250 2.1.0 OK".into()
                } else if upper.starts_with("RCPT TO:") {
                    let to = addr_of(&line);
                    *self
                        .rcpts_seen
                        .lock()
                        .unwrap()
                        .entry(to.clone())
                        .or_default() += 1;
                    let delay = self.rcpt_delay_ms.load(Ordering::SeqCst);
                    if delay > 0 {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                    let local = to.trim_start_matches('"');
                    let accept_all = self.accept_all.load(Ordering::SeqCst);
                    if local.starts_with("perm") {
                        "550 5.1.1 no such user".into()
                    } else if local.starts_with("temp") && !accept_all {
                        "450 4.2.0 mailbox busy".into()
                    } else {
                        rcpts.push(to);
                        "250 2.1.5 OK".into()
                    }
                } else if upper == "DATA" {
                    in_data = true;
                    searched = 0;
                    "354 go ahead".into()
                } else if upper == "QUIT" {
                    stream.write_all(b"221 2.0.0 bye\r\n").await?;
                    return Ok(Ended::Closed);
                } else {
                    "500 5.5.1 what?".into()
                };
                stream.write_all(format!("{reply}\r\n").as_bytes()).await?;
                continue;
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(Ended::Closed);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Greets with `greeting` and answers `503` to all but QUIT (RFC 5321
/// §3.1: a server that greets with `554` waits for the client's QUIT);
/// whether the client sent QUIT.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    greeting: &str,
) -> std::io::Result<bool> {
    stream
        .write_all(format!("{greeting}\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    // Bounded: a client gets 20 commands before the sink hangs up.
    for _ in 0..20 {
        while let Some(lf) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=lf).collect();
            if String::from_utf8_lossy(&line)
                .trim()
                .eq_ignore_ascii_case("QUIT")
            {
                stream.write_all(b"221 2.0.0 bye\r\n").await?;
                return Ok(true);
            }
            stream
                .write_all(b"503 5.5.1 Bad sequence of commands\r\n")
                .await?;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(false);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(false)
}

/// The path between `<` and its `>`, exactly as sent; a quoted local part
/// may hold `>` (RFC 5321 §4.1.2), so quotes are followed.
fn addr_of(line: &str) -> String {
    let Some((_, rest)) = line.split_once('<') else {
        return String::new();
    };
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in rest.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '>' if !quoted => return rest[..i].to_string(),
            _ => {}
        }
    }
    rest.to_string()
}
