//! A scripted SMTP next hop on loopback: records what it receives and
//! answers recipients by their local part — `temp…` gets `450 4.2.0`,
//! `perm…` gets `550 5.1.1`, anything else `250`; a message for a `slow…`
//! recipient gets its final `250` after 300 ms. Every RCPT can be made
//! slow too ([`SmtpSink::delay_rcpt`]), and the RCPTs each address got are
//! counted ([`SmtpSink::rcpt_count`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One message as the sink got it.
#[derive(Debug, Clone)]
pub struct SinkMessage {
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// As sent (still dot-stuffed), without the final `.CRLF`.
    pub data: Vec<u8>,
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
}

impl SmtpSink {
    pub async fn start() -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// A sink on a given address (port 0 for any free port).
    pub async fn start_on(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let sink = SmtpSink {
            addr: listener.local_addr().unwrap(),
            received: Arc::default(),
            accept_all: Arc::default(),
            sessions: Arc::default(),
            max_size: Arc::new(AtomicUsize::new(100_000_000)),
            rcpt_delay_ms: Arc::default(),
            rcpts_seen: Arc::default(),
        };
        let s = sink.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let now = s.sessions.0.fetch_add(1, Ordering::SeqCst) + 1;
                    s.sessions.1.fetch_max(now, Ordering::SeqCst);
                    let _ = s.serve(stream).await;
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

    async fn serve(&self, mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
        stream.write_all(b"220 sink.test ESMTP\r\n").await?;
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
                    });
                    stream.write_all(b"250 2.0.0 queued as SINK\r\n").await?;
                    continue;
                }
            } else if let Some(lf) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=lf).collect();
                let line = String::from_utf8_lossy(&line).trim_end().to_string();
                let upper = line.to_ascii_uppercase();
                let reply: String = if upper.starts_with("EHLO") {
                    format!(
                        "250-sink.test\r\n250-PIPELINING\r\n250-SIZE {}\r\n250 8BITMIME",
                        self.max_size.load(Ordering::SeqCst)
                    )
                } else if upper.starts_with("HELO")
                    || upper.starts_with("RSET")
                    || upper.starts_with("NOOP")
                {
                    "250 2.0.0 OK".into()
                } else if upper.starts_with("MAIL FROM:") {
                    from = addr_of(&line);
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
                    return Ok(());
                } else {
                    "500 5.5.1 what?".into()
                };
                stream.write_all(format!("{reply}\r\n").as_bytes()).await?;
                continue;
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
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
