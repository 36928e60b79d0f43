//! One SMTP connection: connector choice, caps, the session loop, STARTTLS,
//! AUTH, policy, and hand-over to the spool.

use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use ferry_config::{Connector, ProtocolLog, User};
use ferry_queue::{MessageSink, QueueId, SpoolError, StoredEnvelope};
use ferry_smtp::data::MessageEnd;
use ferry_smtp::{AuthOffer, Event, ForwardPath, Reply, ServerSession, SessionConfig};
use metrics::{counter, gauge};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tracing::{debug, info, warn, Instrument};

use crate::auth::{AuthRefusal, Outcome};
use crate::core::{Core, WorkerSnapshot};
use crate::limits::OverLimit;
use crate::metric;
use crate::protolog::{LogEvent, SessionLog};
use crate::proxy;
use crate::tracking::TrackingEvent;

/// The most read from a socket at once. The buffer lives on the stack
/// for the one poll that fills it (see [`Stream::read_into`]).
const READ_CHUNK: usize = 16 * 1024;
/// How long a refusal may take to write before we just close.
const REFUSAL_WRITE: Duration = Duration::from_secs(2);

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Gone,
}

impl Stream {
    /// Reads what has arrived into `session`; 0 at the end of the stream.
    /// No buffer is held while waiting: an idle session's task keeps none
    /// (the STYLE rule "buffers are taken when bytes arrive").
    async fn read_into(&mut self, session: &mut ServerSession) -> std::io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read_into(cx, session)).await
    }

    fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        session: &mut ServerSession,
    ) -> Poll<std::io::Result<usize>> {
        match self {
            Stream::Plain(s) => {
                // On the stack of this poll only, never in the task's
                // state; uninitialised, so no 16 KB memset per read.
                let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
                let mut buf = ReadBuf::uninit(&mut chunk);
                ready!(Pin::new(s).poll_read(cx, &mut buf))?;
                session.push(buf.filled());
                Poll::Ready(Ok(buf.filled().len()))
            }
            Stream::Tls(s) => {
                // Straight from rustls's plaintext buffer, no copy of ours.
                let tls = Pin::new(&mut **s);
                let data = ready!(tls.poll_fill_buf(cx))?;
                let n = data.len();
                session.push(data);
                Pin::new(&mut **s).consume(n);
                Poll::Ready(Ok(n))
            }
            Stream::Gone => Poll::Ready(Ok(0)),
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(bytes).await,
            Stream::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
            Stream::Gone => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
}

/// Writes one reply and closes: for connections refused before a session.
async fn refuse(mut stream: TcpStream, reply: Reply) {
    let _ = timeout(REFUSAL_WRITE, async {
        stream.write_all(&reply.to_wire()).await?;
        stream.shutdown().await
    })
    .await;
}

/// Serves one accepted connection with `snapshot`, the one in service
/// when it was accepted, to its end, whatever is applied meanwhile.
pub(crate) async fn handle(
    core: Arc<Core>,
    snapshot: Arc<WorkerSnapshot>,
    mut stream: TcpStream,
    peer: SocketAddr,
) {
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let session_id = core.next_session_id();
    // Only a trusted proxy may say who the client is.
    let proxied = if snapshot.config.is_trusted_proxy(peer.ip()) {
        match proxy::read_header(&mut stream).await {
            Ok(p) => Some(p),
            Err(e) => {
                counter!(metric::CONNECTIONS_REFUSED, "reason" => "proxy_header").increment(1);
                // Most often a client on the proxy's own address (a local
                // test on the balancer's host), not a broken proxy.
                warn!(
                    %session_id, %peer, error = %e,
                    hint = "peer is in trusted_proxies, so it must send a PROXY header; a client that connects directly from this address must not be trusted (give the balancer its own [balancer] source address and trust only that)",
                    "bad PROXY header from a trusted proxy; closed"
                );
                return;
            }
        }
    } else {
        None
    };
    // LOCAL: the balancer's own health probe, not a client.
    let probe = proxied.as_ref().is_some_and(|p| p.source.is_none());
    // `reached`: the address the client connected to (the balancer's, when
    // proxied), which an address literal must name to be local mail.
    let (remote, reached, proxy_session, early) = match proxied {
        Some(p) => (
            p.source.unwrap_or(peer),
            p.destination.map_or(local.ip(), |d| d.ip()),
            p.session_id,
            p.early,
        ),
        None => (peer, local.ip(), None, Vec::new()),
    };
    let client = remote.ip().to_canonical();
    if probe && core.is_config_behind() {
        counter!(metric::CONNECTIONS_REFUSED, "reason" => "config_behind").increment(1);
        debug!(%session_id, %peer, "probe refused: the config in service is behind the control plane's");
        let text = "4.3.0 This worker's config is out of date, closing transmission channel";
        refuse(stream, Reply::new(421, text)).await;
        return;
    }
    let Some(selection) = snapshot.config.select(local.ip(), local.port(), client) else {
        counter!(metric::CONNECTIONS_REFUSED, "reason" => "no_connector").increment(1);
        info!(%session_id, %peer, %client, port = local.port(), "no connector for client; refused");
        let refusal = ferry_config::Refusal::NoConnector;
        refuse(stream, Reply::new(refusal.code(), refusal.text())).await;
        return;
    };
    let connector = selection.connector;
    let limits = &connector.limits;
    let slot = match core.limits.acquire(
        &connector.name,
        client,
        limits.max_connections,
        limits.max_connections_per_source,
    ) {
        Ok(slot) => slot,
        Err(over) => {
            let (reason, text) = match over {
                OverLimit::Source => (
                    "per_source_limit",
                    "4.3.2 Too many connections from your address, try again later",
                ),
                OverLimit::Connector => (
                    "connection_limit",
                    "4.3.2 The maximum number of concurrent connections has exceeded a limit, closing transmission channel",
                ),
            };
            counter!(metric::CONNECTIONS_REFUSED, "reason" => reason).increment(1);
            info!(%session_id, %client, connector = %connector.name, reason, "connection over limit; refused");
            refuse(stream, Reply::new(421, text)).await;
            return;
        }
    };
    let span = tracing::info_span!(
        "session",
        session_id = %session_id,
        peer = %peer,
        client = %client,
        connector = %connector.name,
        proxy_session = proxy_session.as_deref().unwrap_or("-")
    );
    // Health probes stay out of the protocol log.
    let logger = (connector.protocol_log == ProtocolLog::Verbose && !probe)
        .then(|| Arc::clone(&core.protolog));
    let log = SessionLog::new(
        logger,
        &connector.name,
        &session_id,
        local,
        SocketAddr::new(client, remote.port()),
    );
    let proxy_note = (remote != peer || proxy_session.is_some()).then(|| {
        format!(
            "proxied by {peer}, session {}",
            proxy_session.as_deref().unwrap_or("-")
        )
    });
    let conn = Connection {
        session: ServerSession::new(session_config(&core, &snapshot, &connector)),
        core,
        snapshot,
        connector,
        client,
        local: reached,
        session_id,
        log,
        user: None,
        out: Vec::new(),
        early,
        proxy_note,
        probe,
        incoming: None,
        spool_failed: None,
    };
    conn.run(Stream::Plain(stream)).instrument(span).await;
    drop(slot);
}

fn session_config(core: &Core, snapshot: &WorkerSnapshot, c: &Connector) -> SessionConfig {
    let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    SessionConfig {
        hostname: core.options.hostname.clone(),
        max_message_size: size(c.limits.max_message_size),
        max_recipients: size(u64::from(c.limits.max_recipients)),
        max_header_size: size(c.limits.max_header_size),
        max_hop_count: size(u64::from(c.limits.max_hop_count)),
        max_errors: c.limits.max_protocol_errors,
        starttls: c.auth.starttls && snapshot.material.acceptor(&c.name).is_some(),
        auth: match (c.auth.basic, c.auth.require_tls) {
            (false, _) => AuthOffer::Never,
            (true, true) => AuthOffer::AfterTls,
            (true, false) => AuthOffer::Always,
        },
        transcript: c.protocol_log == ProtocolLog::Verbose,
        chunk_size: ferry_queue::CHUNK_SIZE,
    }
}

struct Connection {
    core: Arc<Core>,
    /// The snapshot in service when the session started.
    snapshot: Arc<WorkerSnapshot>,
    connector: Arc<Connector>,
    client: IpAddr,
    /// The address the client reached, the balancer's when proxied (an
    /// address literal naming it may be local mail).
    local: IpAddr,
    session_id: String,
    session: ServerSession,
    log: SessionLog,
    user: Option<Arc<User>>,
    out: Vec<u8>,
    /// Octets that came with the PROXY header, before any read.
    early: Vec<u8>,
    /// For the protocol log: which proxy, which balancer session.
    proxy_note: Option<String>,
    /// A balancer's health probe (PROXY LOCAL): logged at debug level only.
    probe: bool,
    /// The message being received, as it goes to the spool chunk by chunk
    /// (none until its first chunk; a small message goes whole at its end).
    /// Dropped with the session or the transaction, it leaves nothing.
    incoming: Option<(QueueId, Box<dyn MessageSink>)>,
    /// The spool failed to take a chunk of this message: the rest is read
    /// and dropped, and the end of data answered with this.
    spool_failed: Option<SpoolError>,
}

/// How a session ended, for the log.
enum End {
    Quit,
    ClientGone,
    Timeout,
    Shutdown,
    /// Closed by a rule (logged at info level).
    Refused(&'static str),
    Error(String),
}

impl Connection {
    fn label(&self) -> String {
        self.connector.name.clone()
    }

    fn send(&mut self, reply: &Reply) {
        if self.log.enabled() {
            for (i, line) in reply.lines().iter().enumerate() {
                let sep = if i + 1 == reply.lines().len() {
                    ' '
                } else {
                    '-'
                };
                let text = format!("{}{sep}{line}", reply.code());
                self.log.log(LogEvent::Send, &text, "");
            }
        }
        reply.write_to(&mut self.out);
    }

    async fn flush(&mut self, stream: &mut Stream) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        match timeout(
            self.connector.limits.command_timeout,
            stream.write_all(&out),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(End::Error(format!("write failed: {e}"))),
            Err(_) => Err(End::Timeout),
        }
    }

    fn log_transcript(&mut self) {
        for line in self.session.take_transcript() {
            self.log.log(LogEvent::Receive, &line, "");
        }
    }

    async fn run(mut self, mut stream: Stream) {
        let name = self.label();
        counter!(metric::SESSIONS, "connector" => name.clone()).increment(1);
        gauge!(metric::SESSIONS_ACTIVE, "connector" => name.clone()).increment(1.0);
        self.log.log(LogEvent::Connect, "", "");
        if let Some(note) = self.proxy_note.take() {
            self.log.log(LogEvent::Info, &note, "PROXY");
        }
        let p = self.connector.permissions;
        let perms = [
            (p.anonymous, "AcceptRoutingHeaders AnonymousSubmit"),
            (p.accept_any_recipient, "AcceptAnyRecipient"),
            (p.users, "AuthenticatedUsers"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, s)| *s)
        .collect::<Vec<_>>()
        .join(" ");
        self.log
            .log(LogEvent::Info, &perms, "Set Session Permissions");
        if self.probe {
            debug!("probe session started");
        } else {
            info!("session started");
        }

        let end = self.serve(&mut stream).await;
        // What arrived of an unfinished message is given up.
        self.incoming = None;
        let why = match &end {
            End::Quit => "Remote quit".to_string(),
            End::ClientGone => "Remote closed the connection".to_string(),
            End::Timeout => "Timeout".to_string(),
            End::Shutdown => "Local shutdown".to_string(),
            End::Refused(why) => (*why).to_string(),
            End::Error(e) => {
                warn!(error = %e, "session ended with an error");
                e.clone()
            }
        };
        if self.session.in_transaction() {
            info!(reason = %why, "session ended mid-transaction; nothing was queued");
        }
        self.log.log(LogEvent::Disconnect, "", &why);
        if self.probe {
            debug!(reason = %why, "probe session ended");
        } else {
            info!(reason = %why, "session ended");
        }
        gauge!(metric::SESSIONS_ACTIVE, "connector" => name).decrement(1.0);
        if let Stream::Tls(mut s) = stream {
            let _ = timeout(REFUSAL_WRITE, s.shutdown()).await;
        }
    }

    async fn serve(&mut self, stream: &mut Stream) -> End {
        let banner = Reply::new(220, self.connector.banner.clone());
        self.send(&banner);
        let early = std::mem::take(&mut self.early);
        if !early.is_empty() {
            self.session.push(&early);
        }
        let limits = self.connector.limits.clone();
        let deadline = Instant::now() + limits.connection_timeout;
        let mut draining = false;
        let shutdown = self.core.shutting_down().clone();
        loop {
            while let Some(event) = self.session.next_event() {
                self.log_transcript();
                // Boxed: the future of a STARTTLS handshake, an AUTH
                // check or a spool write is large, and inline it would
                // size every session's task, idle ones included.
                if let Some(end) = Box::pin(self.event(event, stream)).await {
                    let _ = self.flush(stream).await;
                    return end;
                }
            }
            if let Err(end) = self.flush(stream).await {
                return end;
            }
            if draining && !self.session.in_transaction() {
                return self.say_goodbye(stream).await;
            }
            let idle = if self.session.in_transaction() {
                limits.data_timeout
            } else {
                limits.command_timeout
            };
            let wait = idle.min(deadline.saturating_duration_since(Instant::now()));
            let read = tokio::select! {
                r = timeout(wait, stream.read_into(&mut self.session)) => r,
                _ = shutdown.cancelled(), if !draining => {
                    draining = true;
                    continue;
                }
            };
            match read {
                Err(_) => {
                    let reply = Reply::new(
                        421,
                        "4.4.2 Connection timed out, closing transmission channel",
                    );
                    self.send(&reply);
                    let _ = self.flush(stream).await;
                    info!("session timed out");
                    return End::Timeout;
                }
                Ok(Ok(0)) => return End::ClientGone,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return End::Error(format!("read failed: {e}")),
            }
        }
    }

    async fn say_goodbye(&mut self, stream: &mut Stream) -> End {
        let reply = Reply::new(
            421,
            "4.3.2 Service shutting down, closing transmission channel",
        );
        self.send(&reply);
        let _ = self.flush(stream).await;
        End::Shutdown
    }

    /// Handles one event; `Some` ends the session.
    async fn event(&mut self, event: Event, stream: &mut Stream) -> Option<End> {
        if !matches!(event, Event::Chunk(_) | Event::Message(_)) {
            // The message being received was refused (too large, a
            // loop, ...): what was stored of it goes.
            self.incoming = None;
            self.spool_failed = None;
        }
        match event {
            Event::Reply(r) => self.send(&r),
            Event::Close(r) => {
                self.send(&r);
                return Some(if r.code() == 221 {
                    End::Quit
                } else {
                    End::Error(r.to_string())
                });
            }
            Event::Mail(_) if self.core.is_low_on_space() => {
                counter!(metric::SENDERS_REJECTED, "connector" => self.label(), "reason" => "low_space").increment(1);
                let reply = self
                    .session
                    .decide(Reply::new(452, "4.3.1 Insufficient system resources"));
                self.send(&reply);
            }
            Event::Mail(from) => {
                let reply = match self.snapshot.config.check_sender(
                    &self.connector,
                    self.user.as_deref(),
                    self.client,
                    &from.address,
                ) {
                    Ok(()) => Reply::new(250, "2.1.0 Sender OK"),
                    Err(refusal) => {
                        counter!(metric::SENDERS_REJECTED, "connector" => self.label(), "reason" => refusal.reason()).increment(1);
                        info!(sender = %from.address, reason = refusal.reason(), "sender refused");
                        Reply::new(refusal.code(), refusal.text())
                    }
                };
                let reply = self.session.decide(reply);
                self.send(&reply);
            }
            Event::Rcpt(to) => {
                let reply = match self.snapshot.config.check_recipient(
                    &self.connector,
                    self.user.as_deref(),
                    &to,
                    self.local,
                ) {
                    Ok(()) => Reply::new(250, "2.1.5 Recipient OK"),
                    Err(refusal) => {
                        counter!(metric::RECIPIENTS_REJECTED, "connector" => self.label(), "reason" => refusal.reason()).increment(1);
                        info!(recipient = %to, reason = refusal.reason(), "recipient refused");
                        Reply::new(refusal.code(), refusal.text())
                    }
                };
                let reply = self.session.decide(reply);
                self.send(&reply);
            }
            Event::Chunk(bytes) => self.spool_chunk(bytes).await,
            Event::Message(end) => {
                let reply = self.queue(end).await;
                let reply = self.session.decide(reply);
                self.send(&reply);
            }
            Event::StartTls => {
                let reply = self
                    .session
                    .decide(Reply::new(220, "2.0.0 SMTP server ready"));
                self.send(&reply);
                if let Err(end) = self.flush(stream).await {
                    return Some(end);
                }
                if let Err(e) = self.start_tls(stream).await {
                    counter!(metric::TLS_HANDSHAKES, "connector" => self.label(), "result" => "failed").increment(1);
                    self.log
                        .log(LogEvent::Info, "", &format!("TLS negotiation failed: {e}"));
                    return Some(End::Error(format!("TLS handshake failed: {e}")));
                }
                counter!(metric::TLS_HANDSHAKES, "connector" => self.label(), "result" => "ok")
                    .increment(1);
                self.session.tls_established();
                self.log
                    .log(LogEvent::Info, "", "TLS negotiation succeeded");
            }
            Event::Auth(creds) => return self.auth(creds, stream).await,
        }
        None
    }

    /// AUTH with `creds`: refused at once for a client cooling off, then
    /// verified (from the cache, or once a verification slot is free).
    async fn auth(&mut self, creds: ferry_smtp::Credentials, stream: &mut Stream) -> Option<End> {
        // The peer chose these bytes: escaped (CR, LF, other controls) so
        // a user name cannot forge lines in the logs. Tracing fields take
        // it Debug-quoted (`?username`), the protocol log this text.
        let username = creds.username.clone();
        let printable_user = username.escape_debug().to_string();
        let mechanism = creds.mechanism;
        let settings = self.snapshot.config.auth;
        if let Some(left) = self.core.auth.cooling_off(self.client, &settings) {
            let refusal = AuthRefusal::CoolingOff;
            counter!(metric::AUTH_REFUSED, "reason" => refusal.reason()).increment(1);
            info!(
                client = %self.client, user = ?username, mechanism,
                cooling_off_left_s = left.as_secs(),
                "AUTH from a client cooling off after too many failures; 421 and closed"
            );
            self.log.log(
                LogEvent::Info,
                &printable_user,
                "client cooling off after failed AUTH",
            );
            let reply = self.session.decide(refusal.reply());
            self.send(&reply);
            self.session.close();
            return Some(End::Refused("client cooling off after failed AUTH"));
        }
        match self.core.auth.verify(&self.snapshot.config, creds).await {
            Outcome::Verified(user) => {
                counter!(metric::AUTH_SUCCESSES, "connector" => self.label()).increment(1);
                info!(user = %user.name, mechanism, "authenticated");
                self.log.log(LogEvent::Info, &user.name, "authenticated");
                self.user = Some(user);
                let reply = self
                    .session
                    .decide(Reply::new(235, "2.7.0 Authentication successful"));
                self.send(&reply);
            }
            Outcome::Busy => {
                let refusal = AuthRefusal::Busy;
                counter!(metric::AUTH_REFUSED, "reason" => refusal.reason()).increment(1);
                warn!(
                    user = ?username, mechanism,
                    wait_ms = settings.verification_wait.as_millis() as u64,
                    "no password verification free within the wait; 454"
                );
                self.log
                    .log(LogEvent::Info, &printable_user, "authentication busy");
                let reply = self.session.decide(refusal.reply());
                self.send(&reply);
            }
            Outcome::Invalid(failure) => {
                let refusal = AuthRefusal::Invalid;
                counter!(metric::AUTH_FAILURES, "connector" => self.label()).increment(1);
                counter!(metric::AUTH_REFUSED, "reason" => refusal.reason()).increment(1);
                if self.core.auth.failed(self.client, &failure, &settings) {
                    // The line an operator greps for a guessing source.
                    warn!(
                        client = %self.client, user = ?username,
                        failures = settings.max_failures,
                        window_s = settings.failure_window.as_secs(),
                        cooling_off_s = settings.cooling_off.as_secs(),
                        "too many failed AUTH from this client; it is cooling off"
                    );
                }
                info!(user = ?username, mechanism, "authentication failed; tarpitting");
                self.log
                    .log(LogEvent::Info, &printable_user, "authentication failed");
                // Answer late: slows down password guessing.
                if let Err(end) = self.flush(stream).await {
                    return Some(end);
                }
                tokio::time::sleep(self.connector.limits.tarpit).await;
                let reply = self.session.decide(refusal.reply());
                self.send(&reply);
            }
        }
        None
    }

    async fn start_tls(&mut self, stream: &mut Stream) -> Result<(), String> {
        let acceptor = self
            .snapshot
            .material
            .acceptor(&self.connector.name)
            .cloned()
            .ok_or("no TLS acceptor for this connector")?;
        let Stream::Plain(tcp) = std::mem::replace(stream, Stream::Gone) else {
            return Err("TLS already active".into());
        };
        match timeout(self.connector.limits.command_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => {
                *stream = Stream::Tls(Box::new(tls));
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("handshake timed out".into()),
        }
    }

    /// Appends the next piece of the message being received to the spool
    /// (the first one starts it there). Waits while the piece before is
    /// written: a disk slower than the client slows the client down.
    async fn spool_chunk(&mut self, bytes: Vec<u8>) {
        if self.spool_failed.is_some() {
            return;
        }
        let (_, sink) = match &mut self.incoming {
            Some(incoming) => incoming,
            empty => {
                let id = QueueId::new();
                empty.insert((id.clone(), self.core.spool.begin(id)))
            }
        };
        if let Err(e) = sink.append(bytes).await {
            warn!(error = %e, "spool write failed mid-DATA; reading the rest of the message to refuse it");
            self.incoming = None;
            self.spool_failed = Some(e);
        }
    }

    /// Puts the message in the spool: the trace fields in front of what
    /// arrived, after every chunk already stored. The reply says whether
    /// it is ours now.
    async fn queue(&mut self, end: MessageEnd) -> Reply {
        let incoming = self.incoming.take();
        if let Some(e) = self.spool_failed.take() {
            return self.spool_refusal(e);
        }
        let (id, sink) = match incoming {
            Some((id, sink)) => (id, sink),
            None => {
                let id = QueueId::new();
                let sink = self.core.spool.begin(id.clone());
                (id, sink)
            }
        };
        let env = self.session.envelope();
        let helo = self.session.helo().unwrap_or("unknown").to_string();
        // RFC 3848, and RFC 6531 §3.7.3 for SMTPUTF8 transactions.
        let utf8 = env.mail_from.as_ref().is_some_and(|m| m.smtputf8);
        let protocol = match (
            self.session.is_esmtp(),
            utf8,
            self.session.is_tls(),
            self.user.is_some(),
        ) {
            (false, _, _, _) => "SMTP",
            (true, false, false, false) => "ESMTP",
            (true, false, true, false) => "ESMTPS",
            (true, false, false, true) => "ESMTPA",
            (true, false, true, true) => "ESMTPSA",
            (true, true, false, false) => "UTF8SMTP",
            (true, true, true, false) => "UTF8SMTPS",
            (true, true, false, true) => "UTF8SMTPA",
            (true, true, true, true) => "UTF8SMTPSA",
        };
        let now = chrono::Utc::now();
        let received = format!(
            "Received: from {helo} ([{}])\r\n\tby {} (Ferry) with {protocol} id {id};\r\n\t{}\r\n",
            self.client,
            self.core.options.hostname,
            now.to_rfc2822()
        );
        let found_id = end.header.message_id.clone();
        // An empty field is kept (a second one would make the header
        // invalid, RFC 5322 §3.6) but not logged as an id.
        let mut message_id = found_id.clone().filter(|v| !v.is_empty());
        let mut added = String::new();
        if self.connector.add_missing_headers {
            // As Exchange does: receivers refuse or penalise mail without
            // them, and the tracking log needs the Message-ID.
            if found_id.is_none() {
                let made = format!("<{id}@{}>", self.core.options.hostname);
                added.push_str(&format!("Message-ID: {made}\r\n"));
                message_id = Some(made);
            }
            if !end.header.has_date {
                added.push_str(&format!("Date: {}\r\n", now.to_rfc2822()));
            }
        }
        let mut head = received.into_bytes();
        head.extend_from_slice(added.as_bytes());
        let size = head.len() + end.size;
        let mail_from = env.mail_from.clone();
        let postmaster = || {
            self.snapshot.config.postmaster.clone().unwrap_or_else(|| {
                let host = &self.core.options.hostname;
                let domain = ferry_smtp::Domain::parse(host)
                    .unwrap_or_else(|_| ferry_smtp::Domain::Name("localhost".into()));
                ferry_smtp::Mailbox::postmaster(domain)
            })
        };
        let stored = StoredEnvelope {
            mail_from: mail_from
                .as_ref()
                .map(|m| m.address.clone())
                .unwrap_or_default(),
            // `<Postmaster>` and `<postmaster@domain>`, or one address given
            // twice, are one mailbox that gets one copy.
            rcpt_to: ferry_smtp::address::unique_mailboxes(env.rcpt_to.iter().map(|r| match r {
                ForwardPath::Postmaster => postmaster(),
                ForwardPath::Mailbox(m) => m.clone(),
            })),
            client_ip: self.client.to_string(),
            helo,
            connector: self.connector.name.clone(),
            user: self.user.as_ref().map(|u| u.name.clone()),
            received_at: now.timestamp(),
            body_8bit: mail_from.as_ref().is_some_and(|m| m.body_8bit),
            smtputf8: mail_from.as_ref().is_some_and(|m| m.smtputf8),
            session_id: self.session_id.clone(),
            message_id,
        };
        let rcpts = stored.rcpt_to.len();
        let tracked = stored.clone();
        match sink.commit(stored, head, end.tail).await {
            Ok(id) => {
                let mut event = TrackingEvent::new("received", &id, &tracked);
                event.size = Some(size as u64);
                event.session_id = Some(&self.session_id);
                self.core.tracking.record(&event);
                counter!(metric::MESSAGES_ACCEPTED, "connector" => self.label()).increment(1);
                counter!(metric::RECEIVED_BYTES, "connector" => self.label())
                    .increment(size as u64);
                info!(queue_id = %id, size, recipients = rcpts, "message queued");
                self.log.log(LogEvent::Info, &id.to_string(), "Queued");
                Reply::new(250, format!("2.6.0 {id} Queued mail for delivery"))
            }
            Err(e) => self.spool_refusal(e),
        }
    }

    /// The reply to a message the spool could not take.
    fn spool_refusal(&self, e: SpoolError) -> Reply {
        match e {
            SpoolError::Full(e) => {
                counter!(metric::MESSAGES_REJECTED, "connector" => self.label(), "reason" => "spool_full").increment(1);
                warn!(error = %e, "spool full; message refused with 452");
                Reply::new(452, "4.3.1 Insufficient system resources")
            }
            e => {
                counter!(metric::MESSAGES_REJECTED, "connector" => self.label(), "reason" => "spool_error").increment(1);
                warn!(error = %e, "spool write failed; message refused with 451");
                Reply::new(451, "4.3.0 Temporary local problem, please try again later")
            }
        }
    }
}
