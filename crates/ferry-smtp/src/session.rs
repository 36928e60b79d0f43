//! The server-side SMTP session state machine.
//!
//! The caller pushes received bytes in and pulls [`Event`]s out until
//! `next_event` returns `None` (more input needed). Replies come out in the
//! order of the commands, so a pipelined batch is answered in order; the
//! caller writes them when the session needs more input.

use std::borrow::Cow;
use std::mem;

use smtp_proto::{Error as ParseError, Request, AUTH_LOGIN, AUTH_PLAIN};

use crate::address::{ForwardPath, ReversePath};
use crate::command::{self, CommandError, Verb};
use crate::data::{DataLimits, DataOutcome, DataReader, MessageEnd};
use crate::reply::Reply;
use crate::sasl;
use crate::{MAX_AUTH_LINE, MAX_COMMAND_LINE};

/// When AUTH is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOffer {
    /// Never: AUTH gets `503 5.5.1`.
    Never,
    /// In clear and under TLS.
    Always,
    /// Only once STARTTLS has completed; before that `530 5.7.0`.
    AfterTls,
}

/// What the session needs to know of its connector.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Our name in the greeting reply to EHLO.
    pub hostname: String,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_header_size: usize,
    pub max_hop_count: usize,
    /// Syntax and sequence errors before the session is closed.
    pub max_errors: u32,
    /// STARTTLS is configured on this connector.
    pub starttls: bool,
    pub auth: AuthOffer,
    /// Keep a transcript of received command lines for the protocol log.
    pub transcript: bool,
    /// DATA content is handed on in pieces of at least this many octets
    /// ([`Event::Chunk`]); a message no larger comes whole in
    /// [`Event::Message`].
    pub chunk_size: usize,
}

/// The reverse path and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailFrom {
    pub address: ReversePath,
    /// The SIZE= the client declared, 0 when absent.
    pub size: usize,
    pub body_8bit: bool,
    pub smtputf8: bool,
}

/// The transaction so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    pub mail_from: Option<MailFrom>,
    pub rcpt_to: Vec<ForwardPath>,
}

/// Credentials from AUTH PLAIN or LOGIN.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub mechanism: &'static str,
    pub authzid: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// What the caller must do next.
#[derive(Debug)]
pub enum Event {
    /// Send this reply; the session decided it alone.
    Reply(Reply),
    /// Send this reply, then close the connection.
    Close(Reply),
    /// Decide on this sender: answer with [`ServerSession::decide`].
    Mail(MailFrom),
    /// Decide on this recipient.
    Rcpt(ForwardPath),
    /// The next piece of the message being received (unstuffed,
    /// CRLF-normalised): store it; more follow, then [`Event::Message`].
    /// If any other event comes first, the message was refused: drop what
    /// was stored of it.
    Chunk(Vec<u8>),
    /// The end of a message for the envelope in
    /// [`ServerSession::envelope`]: its last bytes after every
    /// [`Event::Chunk`], and what its header says. Spool it and decide;
    /// the transaction ends whatever the answer.
    Message(MessageEnd),
    /// The client asked for STARTTLS: answer `220` and then run the TLS
    /// handshake, then call [`ServerSession::tls_established`].
    StartTls,
    /// Check these credentials: `235` authenticates the session.
    Auth(Credentials),
}

enum Pending {
    Mail(MailFrom),
    Rcpt(ForwardPath),
    Message,
    StartTls,
    Auth(String),
}

enum Phase {
    /// Before HELO/EHLO.
    Connected,
    /// Greeted, no transaction.
    Ready,
    /// MAIL accepted; recipients may follow.
    Transaction,
    Data(Box<DataReader>),
    AuthPlain,
    AuthLoginUser,
    AuthLoginPass(String),
    Closed,
}

/// One SMTP server session.
pub struct ServerSession {
    config: SessionConfig,
    phase: Phase,
    input: Vec<u8>,
    /// Discarding an over-long line up to its LF.
    skipping_line: bool,
    /// The line after a refused AUTH LOGIN user name is most likely the
    /// password, sent by a client that did not wait for our reply: it is
    /// shown as `****` in the transcript, whatever it turns out to be.
    mask_next_line: bool,
    pending: Option<Pending>,
    envelope: Envelope,
    helo: Option<String>,
    extended: bool,
    tls: bool,
    user: Option<String>,
    errors: u32,
    transcript: Vec<String>,
}

fn r(code: u16, text: &str) -> Reply {
    Reply::new(code, text)
}

impl ServerSession {
    pub fn new(config: SessionConfig) -> Self {
        Self {
            config,
            phase: Phase::Connected,
            input: Vec::new(),
            skipping_line: false,
            mask_next_line: false,
            pending: None,
            envelope: Envelope::default(),
            helo: None,
            extended: false,
            tls: false,
            user: None,
            errors: 0,
            transcript: Vec::new(),
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if !matches!(self.phase, Phase::Closed) {
            self.input.extend_from_slice(bytes);
        }
    }

    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    pub fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    /// The client greeted with EHLO (not HELO).
    pub fn is_esmtp(&self) -> bool {
        self.extended
    }

    /// The authenticated user, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// A message is being received, or one awaits its decision: shutdown
    /// lets such a session finish.
    pub fn in_transaction(&self) -> bool {
        matches!(self.phase, Phase::Transaction | Phase::Data(_))
            || matches!(self.pending, Some(Pending::Message))
    }

    /// Bytes received but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.input.len()
    }

    /// Octets of memory the input buffer holds (its capacity, not what it
    /// holds now): 0 while the session waits for a command.
    pub fn buffer_capacity(&self) -> usize {
        self.input.capacity()
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Received command lines since the last call, AUTH secrets masked.
    pub fn take_transcript(&mut self) -> Vec<String> {
        mem::take(&mut self.transcript)
    }

    /// Answers the pending decision; returns the reply to send. A positive
    /// reply moves the session on (sender set, recipient added, ...).
    pub fn decide(&mut self, reply: Reply) -> Reply {
        let ok = reply.is_positive();
        match self.pending.take() {
            Some(Pending::Mail(from)) if ok => {
                self.envelope = Envelope {
                    mail_from: Some(from),
                    rcpt_to: Vec::new(),
                };
                self.phase = Phase::Transaction;
            }
            Some(Pending::Rcpt(to)) if ok => self.envelope.rcpt_to.push(to),
            Some(Pending::Message) => self.reset_transaction(),
            Some(Pending::StartTls) if ok => {
                // RFC 3207 §4.2: forget everything learnt in clear, and
                // drop any command pipelined after STARTTLS.
                self.input = Vec::new();
                self.helo = None;
                self.reset_transaction();
                self.phase = Phase::Connected;
            }
            Some(Pending::Auth(user)) if ok => self.user = Some(user),
            _ => {}
        }
        reply
    }

    /// The TLS handshake after STARTTLS completed.
    pub fn tls_established(&mut self) {
        self.tls = true;
    }

    /// Ends the session now (timeouts, shutdown).
    pub fn close(&mut self) {
        self.phase = Phase::Closed;
        self.input = Vec::new();
    }

    fn reset_transaction(&mut self) {
        self.envelope = Envelope::default();
        if !matches!(self.phase, Phase::Connected | Phase::Closed) {
            self.phase = Phase::Ready;
        }
    }

    /// Gives back the input buffer's memory while the session waits for a
    /// command: an idle session holds no buffer, and one long line (up to
    /// [`MAX_AUTH_LINE`] octets, or an over-long one being skipped) or a
    /// pipelined batch does not keep its capacity for the session's life.
    fn release_input(&mut self) {
        if self.input.is_empty() {
            self.input = Vec::new();
        } else if self.input.capacity() > MAX_COMMAND_LINE
            && self.input.capacity() > 2 * self.input.len()
        {
            self.input.shrink_to_fit();
        }
    }

    /// The next thing to do, or `None` when more input is needed (or a
    /// decision is pending, or the session is closed).
    pub fn next_event(&mut self) -> Option<Event> {
        if self.pending.is_some() || self.is_closed() {
            return None;
        }
        if let Phase::Data(reader) = &mut self.phase {
            if let Some(chunk) = reader.take_chunk() {
                return Some(Event::Chunk(chunk));
            }
            let (used, done) = reader.feed(&self.input);
            self.input.drain(..used);
            if !done {
                return reader.take_chunk().map(Event::Chunk);
            }
            let Phase::Data(reader) = mem::replace(&mut self.phase, Phase::Transaction) else {
                return None;
            };
            return Some(self.finish_data(reader.finish()));
        }
        let limit = match self.phase {
            Phase::AuthPlain | Phase::AuthLoginUser | Phase::AuthLoginPass(_) => MAX_AUTH_LINE,
            _ if starts_with_ignore_case(&self.input, b"AUTH ") => MAX_AUTH_LINE,
            _ => MAX_COMMAND_LINE,
        };
        let Some(lf) = self.input.iter().position(|b| *b == b'\n') else {
            if self.input.len() > limit && !self.skipping_line {
                self.skipping_line = true;
                self.input.clear();
                return Some(self.error(500, "5.5.2 Line too long"));
            }
            if self.skipping_line {
                self.input.clear();
            }
            self.release_input();
            return None;
        };
        let line: Vec<u8> = self.input.drain(..=lf).collect();
        if mem::take(&mut self.skipping_line) {
            return self.next_event();
        }
        if line.len() > limit {
            return Some(self.error(500, "5.5.2 Line too long"));
        }
        Some(match self.phase {
            Phase::AuthPlain | Phase::AuthLoginUser | Phase::AuthLoginPass(_) => {
                self.note("****".into());
                self.sasl_line(&line)
            }
            _ => self.command(&line),
        })
    }

    fn note(&mut self, line: String) {
        if self.config.transcript {
            self.transcript.push(line);
        }
    }

    fn error(&mut self, code: u16, text: &str) -> Event {
        self.errors += 1;
        if self.errors >= self.config.max_errors {
            self.close();
            return Event::Close(r(
                421,
                "4.7.0 Too many errors on this connection, closing transmission channel",
            ));
        }
        Event::Reply(r(code, text))
    }

    fn command(&mut self, line: &[u8]) -> Event {
        let masked = mem::take(&mut self.mask_next_line);
        if self.config.transcript {
            let text = printable(String::from_utf8_lossy(line).trim_end());
            let shown = if masked {
                "****".to_string()
            } else if starts_with_ignore_case(line, b"AUTH ") {
                text.split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                text
            };
            self.note(shown);
        }
        match command::verb(line) {
            Some(Verb::Mail) => return self.mail(line),
            Some(Verb::Rcpt) => return self.rcpt(line),
            None => {}
        }
        let request = match Request::parse(&mut line.iter()) {
            Ok(request) => request,
            Err(e) => return self.parse_error(e),
        };
        match request {
            Request::Ehlo { host } => self.greet(host, true),
            Request::Helo { host } => self.greet(host, false),
            Request::Lhlo { .. } => self.error(500, "5.5.1 Command unrecognized"),
            // Never reached: MAIL and RCPT lines are ours (command.rs).
            Request::Mail { .. } | Request::Rcpt { .. } => {
                self.error(500, "5.5.1 Command unrecognized")
            }
            Request::Data => self.data(),
            Request::Rset => {
                self.reset_transaction();
                Event::Reply(r(250, "2.0.0 Resetting"))
            }
            Request::Noop { .. } => Event::Reply(r(250, "2.0.0 OK")),
            Request::Quit => {
                self.close();
                Event::Close(r(221, "2.0.0 Service closing transmission channel"))
            }
            Request::Vrfy { .. } => Event::Reply(r(
                252,
                "2.1.5 Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Request::Help { .. } => Event::Reply(self.help()),
            Request::StartTls => self.starttls(),
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, initial_response),
            Request::Bdat { .. }
            | Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => self.error(502, "5.5.1 Command not implemented"),
        }
    }

    fn parse_error(&mut self, e: ParseError) -> Event {
        match e {
            ParseError::UnknownCommand => self.error(500, "5.5.1 Command unrecognized"),
            ParseError::InvalidSenderAddress | ParseError::InvalidRecipientAddress => {
                self.error(501, "5.5.4 Invalid address")
            }
            ParseError::SyntaxError { syntax } => {
                let text = format!("5.5.4 Syntax: {syntax}");
                self.error(501, &text)
            }
            ParseError::InvalidParameter { param } => {
                let text = format!("5.5.4 Invalid parameter {param}");
                self.error(501, &text)
            }
            ParseError::UnsupportedParameter { param } => {
                let text = format!("5.5.4 Unsupported parameter {param}");
                self.error(555, &text)
            }
            ParseError::ResponseTooLong => self.error(500, "5.5.2 Line too long"),
            ParseError::NeedsMoreData { .. } | ParseError::InvalidResponse { .. } => {
                self.error(500, "5.5.2 Syntax error")
            }
        }
    }

    /// The commands this session takes now, as `HELP` lists them: the
    /// same STARTTLS and AUTH that EHLO would advertise.
    fn help(&self) -> Reply {
        let mut commands = vec!["HELO", "EHLO"];
        if self.config.starttls && !self.tls {
            commands.push("STARTTLS");
        }
        if self.auth_offered() {
            commands.push("AUTH");
        }
        commands.extend([
            "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "HELP", "VRFY",
        ]);
        Reply::multi(
            214,
            vec![
                "2.0.0 Commands supported:".into(),
                format!("2.0.0 {}", commands.join(" ")),
            ],
        )
    }

    fn greet(&mut self, host: Cow<'_, str>, extended: bool) -> Event {
        // RFC 5321 §4.1.1.1: a domain or an address literal. Names that are
        // not quite domains (underscores, bare IPs) are common on devices
        // and taken; control characters and undecodable octets are not,
        // since the name goes into the Received header and the logs.
        if host
            .chars()
            .any(|c| c.is_control() || c == char::REPLACEMENT_CHARACTER)
        {
            return self.error(501, "5.5.4 Invalid domain name");
        }
        let host = host.into_owned();
        self.reset_transaction();
        self.phase = Phase::Ready;
        let greeting = format!("{} Hello {}", self.config.hostname, host);
        let reply = if extended {
            let mut lines = vec![
                greeting,
                format!("SIZE {}", self.config.max_message_size),
                "PIPELINING".into(),
                "ENHANCEDSTATUSCODES".into(),
                "8BITMIME".into(),
                "SMTPUTF8".into(),
            ];
            if self.config.starttls && !self.tls {
                lines.push("STARTTLS".into());
            }
            if self.auth_offered() {
                lines.push("AUTH PLAIN LOGIN".into());
            }
            Reply::multi(250, lines)
        } else {
            Reply::new(250, greeting)
        };
        self.helo = Some(host);
        self.extended = extended;
        Event::Reply(reply)
    }

    fn auth_offered(&self) -> bool {
        match self.config.auth {
            AuthOffer::Never => false,
            AuthOffer::Always => true,
            AuthOffer::AfterTls => self.tls,
        }
    }

    fn mail(&mut self, line: &[u8]) -> Event {
        match self.phase {
            Phase::Connected => return self.error(503, "5.5.1 Send hello first"),
            Phase::Transaction => return self.error(503, "5.5.1 Sender already specified"),
            _ => {}
        }
        let from = match command::parse_mail(line) {
            Ok(from) => from,
            Err(e) => return self.command_error(&e, Verb::Mail),
        };
        if from.size > self.config.max_message_size {
            return Event::Reply(r(
                552,
                "5.3.4 Message size exceeds fixed maximum message size",
            ));
        }
        // RFC 6531 §3.4: a non-ASCII address only in an SMTPUTF8 transaction.
        if !from.smtputf8 && from.path.mailbox().is_some_and(|m| !m.is_ascii()) {
            return Event::Reply(r(
                553,
                "5.6.7 Non-ASCII addresses not permitted for that sender without SMTPUTF8",
            ));
        }
        let mail = MailFrom {
            address: from.path,
            size: from.size,
            body_8bit: from.body_8bit,
            smtputf8: from.smtputf8,
        };
        self.pending = Some(Pending::Mail(mail.clone()));
        Event::Mail(mail)
    }

    fn rcpt(&mut self, line: &[u8]) -> Event {
        if !matches!(self.phase, Phase::Transaction) {
            return self.error(503, "5.5.1 Need MAIL before RCPT");
        }
        let to = match command::parse_rcpt(line) {
            Ok(to) => to,
            Err(e) => return self.command_error(&e, Verb::Rcpt),
        };
        let smtputf8 = self.envelope.mail_from.as_ref().is_some_and(|m| m.smtputf8);
        if !smtputf8 && matches!(&to, ForwardPath::Mailbox(m) if !m.is_ascii()) {
            return Event::Reply(r(
                553,
                "5.6.7 Non-ASCII addresses not permitted for that recipient without SMTPUTF8",
            ));
        }
        if self.envelope.rcpt_to.len() >= self.config.max_recipients {
            return Event::Reply(r(452, "4.5.3 Too many recipients"));
        }
        self.pending = Some(Pending::Rcpt(to.clone()));
        Event::Rcpt(to)
    }

    fn command_error(&mut self, e: &CommandError, verb: Verb) -> Event {
        let (code, text) = e.reply(verb);
        self.error(code, &text)
    }

    fn data(&mut self) -> Event {
        if !matches!(self.phase, Phase::Transaction) {
            return self.error(503, "5.5.1 Need MAIL command");
        }
        if self.envelope.rcpt_to.is_empty() {
            return self.error(503, "5.5.1 Need RCPT command");
        }
        self.phase = Phase::Data(Box::new(DataReader::new(DataLimits {
            max_size: self.config.max_message_size,
            max_header: self.config.max_header_size,
            max_hops: self.config.max_hop_count,
            chunk: self.config.chunk_size,
        })));
        Event::Reply(r(354, "Start mail input; end with <CRLF>.<CRLF>"))
    }

    fn finish_data(&mut self, outcome: DataOutcome) -> Event {
        let refuse = |s: &mut Self, code, text| {
            s.reset_transaction();
            Event::Reply(r(code, text))
        };
        match outcome {
            DataOutcome::TooLarge { .. } => refuse(
                self,
                552,
                "5.3.4 Message size exceeds fixed maximum message size",
            ),
            DataOutcome::HeaderTooLarge => {
                refuse(self, 552, "5.3.4 Message header size exceeds limit")
            }
            DataOutcome::TooManyHops => {
                refuse(self, 554, "5.4.6 Hop count exceeded - possible mail loop")
            }
            DataOutcome::Message(m) => {
                self.pending = Some(Pending::Message);
                Event::Message(m)
            }
        }
    }

    fn starttls(&mut self) -> Event {
        if !self.config.starttls {
            return self.error(502, "5.5.1 Command not implemented");
        }
        if self.tls {
            return self.error(503, "5.5.1 TLS already active");
        }
        if matches!(self.phase, Phase::Transaction) {
            return self.error(503, "5.5.1 STARTTLS not allowed in a mail transaction");
        }
        self.pending = Some(Pending::StartTls);
        Event::StartTls
    }

    fn auth(&mut self, mechanism: u64, initial: Cow<'_, str>) -> Event {
        if matches!(self.config.auth, AuthOffer::Never) {
            return self.error(503, "5.5.1 Authentication not enabled");
        }
        if !self.auth_offered() {
            return Event::Reply(r(530, "5.7.0 Must issue a STARTTLS command first"));
        }
        if matches!(self.phase, Phase::Connected) {
            return self.error(503, "5.5.1 Send hello first");
        }
        if self.user.is_some() {
            return self.error(503, "5.5.1 Already authenticated");
        }
        if matches!(self.phase, Phase::Transaction) {
            return self.error(503, "5.5.1 AUTH not allowed in a mail transaction");
        }
        match (mechanism, initial.as_ref()) {
            // RFC 4954 §4: `=` is an empty initial response (no response at
            // all asks for a challenge instead).
            (AUTH_PLAIN, "=") => self.plain(""),
            (AUTH_LOGIN, "=") => {
                self.phase = Phase::AuthLoginPass(String::new());
                Event::Reply(r(334, &sasl::encode("Password:")))
            }
            (AUTH_PLAIN, "") => {
                self.phase = Phase::AuthPlain;
                Event::Reply(r(334, ""))
            }
            (AUTH_PLAIN, response) => self.plain(response),
            (AUTH_LOGIN, "") => {
                self.phase = Phase::AuthLoginUser;
                Event::Reply(r(334, &sasl::encode("Username:")))
            }
            (AUTH_LOGIN, response) => match sasl::decode_text(response) {
                Ok(user) => {
                    self.phase = Phase::AuthLoginPass(user);
                    Event::Reply(r(334, &sasl::encode("Password:")))
                }
                Err(e) => self.sasl_error(e),
            },
            _ => Event::Reply(r(504, "5.5.4 Unrecognized authentication type")),
        }
    }

    fn sasl_line(&mut self, line: &[u8]) -> Event {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\r', '\n']);
        if text == "*" {
            self.phase = Phase::Ready;
            return Event::Reply(r(501, "5.7.0 Authentication cancelled"));
        }
        match mem::replace(&mut self.phase, Phase::Ready) {
            Phase::AuthPlain => self.plain(text),
            Phase::AuthLoginUser => match sasl::decode_text(text) {
                Ok(user) => {
                    self.phase = Phase::AuthLoginPass(user);
                    Event::Reply(r(334, &sasl::encode("Password:")))
                }
                Err(e) => {
                    self.mask_next_line = true;
                    self.sasl_error(e)
                }
            },
            Phase::AuthLoginPass(username) => match sasl::decode_text(text) {
                Ok(password) => self.credentials(Credentials {
                    mechanism: "LOGIN",
                    authzid: String::new(),
                    username,
                    password,
                }),
                Err(e) => self.sasl_error(e),
            },
            other => {
                self.phase = other;
                self.error(503, "5.5.1 Bad sequence of commands")
            }
        }
    }

    fn plain(&mut self, response: &str) -> Event {
        self.phase = Phase::Ready;
        let parsed = sasl::decode(response).and_then(|d| sasl::parse_plain(&d));
        match parsed {
            Ok((authzid, username, password)) => self.credentials(Credentials {
                mechanism: "PLAIN",
                authzid,
                username,
                password,
            }),
            Err(e) => self.sasl_error(e),
        }
    }

    fn sasl_error(&mut self, e: sasl::SaslError) -> Event {
        self.phase = Phase::Ready;
        let text = format!("5.5.2 {e}");
        self.error(501, &text)
    }

    fn credentials(&mut self, c: Credentials) -> Event {
        self.pending = Some(Pending::Auth(c.username.clone()));
        Event::Auth(c)
    }
}

/// Control characters as `\xNN`, so a client cannot put terminal escapes
/// or line breaks into the protocol log.
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.push_str(&format!("\\x{:02x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

fn starts_with_ignore_case(haystack: &[u8], prefix: &[u8]) -> bool {
    haystack
        .get(..prefix.len())
        .is_some_and(|h| h.eq_ignore_ascii_case(prefix))
}
