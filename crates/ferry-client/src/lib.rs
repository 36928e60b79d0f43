//! Ferry's async SMTP client, shared by delivery to next hops, the
//! balancer's probes and hand-offs, `ferry send` and the test suite.
//!
//! [`connect()`] tries every address of a name (A and AAAA, or addresses
//! given), racing them as RFC 8305 "happy eyeballs" does, and keeps the
//! first that greets with `220`; each address that refused, timed out or
//! greeted otherwise is reported with its reason. A [`Session`] then does
//! EHLO (HELO when EHLO is refused), STARTTLS or implicit TLS
//! ([`tls`]), AUTH PLAIN or LOGIN, and transactions: MAIL with SIZE,
//! BODY=8BITMIME and SMTPUTF8 where offered, RCPTs pipelined when the
//! server offers PIPELINING (RFC 2920), DATA, with a result per recipient.
//! [`open`] does all of that up to a session ready for a transaction.
//!
//! Modules: [`connect`](mod@connect) (names, addresses, the race), [`session`] (the
//! dialogue), [`tls`] (when to start TLS, whom to trust), [`io`] (the one
//! reply-reading loop, over `ferry-smtp`'s sans-IO
//! [`ReplyReader`](ferry_smtp::client::ReplyReader), and the transcript
//! hook). It knows no queue and no policy: what to do with a refusal is
//! the caller's business.
#![forbid(unsafe_code)]

pub mod connect;
pub mod io;
pub mod session;
pub mod tls;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_smtp::Reply;
use zeroize::Zeroizing;

pub use connect::{connect, Attempt, AttemptFailure, Target};
pub use io::{read_reply, Line, ReadError, Transcript};
pub use session::{MessageBody, Outcome, PieceFuture, RecipientResult, Session, Transaction};
pub use tls::{TlsMode, TlsSettings, Verify};

/// Why a session or a transaction failed. [`Error::is_permanent`] says
/// whether trying again can help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The name has no address, or DNS did not answer.
    #[error("cannot resolve {name}: {reason}")]
    Resolve { name: String, reason: String },
    /// No address answered with a `220` greeting; each one tried, and why.
    #[error("{}", unreachable_text(.attempts))]
    Unreachable {
        server: String,
        attempts: Vec<Attempt>,
    },
    /// The connection failed mid-session: closed, timed out, or garbled.
    #[error("{peer}: {reason}")]
    Connection { peer: String, reason: String },
    /// The server refused a command the whole session depends on (EHLO
    /// and HELO, STARTTLS, AUTH, MAIL, DATA, the end of data).
    #[error("{peer} said: {reply}")]
    Refused {
        peer: String,
        command: &'static str,
        reply: Reply,
    },
    /// TLS is required and the server does not offer STARTTLS.
    #[error("{peer} does not offer STARTTLS, and TLS is required")]
    TlsUnavailable { peer: String },
    /// The TLS handshake failed (certificate refused, timeout, ...).
    #[error("TLS with {peer} failed: {reason}")]
    Tls { peer: String, reason: String },
    /// The server cannot take this message (over its SIZE, or it needs
    /// SMTPUTF8 the server lacks); a reply in SMTP form, as for a DSN.
    #[error("{reply}")]
    Unsuitable { peer: String, reply: String },
    /// A local problem: a CA file that cannot be read, a bad source
    /// address.
    #[error("{0}")]
    Local(String),
}

fn unreachable_text(attempts: &[Attempt]) -> String {
    match attempts {
        [] => "no address to try".into(),
        [one] => one.to_string(),
        many => many
            .iter()
            .map(Attempt::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    }
}

impl Error {
    /// A 5xx refusal or an unsuitable message is final; the rest may go
    /// through later or elsewhere.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Refused { reply, .. } => reply.code() >= 500,
            Error::Unsuitable { .. } => true,
            _ => false,
        }
    }
}

/// A SASL mechanism for AUTH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 4616, with the initial response on the AUTH line.
    Plain,
    /// The user name and password in answer to two challenges
    /// (draft-murchison-sasl-login), for servers that offer only LOGIN.
    Login,
}

/// A user name and password for AUTH.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: Zeroizing<String>,
    /// The mechanism to use; `None`: PLAIN when offered, else LOGIN when
    /// offered, else PLAIN anyway (so the server's refusal says why).
    pub mechanism: Option<Mechanism>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

/// How long each step may take. RFC 5321 §4.5.3.2 gives the minimums a
/// patient client should allow; callers with a queue behind them (that
/// retry later) may choose shorter ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// One TCP connect (and for implicit TLS, its handshake).
    pub connect: Duration,
    /// From connected to the `220` greeting.
    pub greeting: Duration,
    /// Any other command's reply, a TLS handshake, a write.
    pub command: Duration,
    /// The reply to the end of data (the server may be storing the
    /// message durably first).
    pub data_end: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(30),
            greeting: Duration::from_secs(300),
            command: Duration::from_secs(300),
            data_end: Duration::from_secs(600),
        }
    }
}

/// Everything a session needs besides where it goes.
#[derive(Clone, Default)]
pub struct Settings {
    /// The name sent with EHLO and HELO.
    pub helo: String,
    pub tls: TlsSettings,
    pub auth: Option<Credentials>,
    /// The local address to connect from (only addresses of its family
    /// are tried).
    pub source: Option<IpAddr>,
    pub timeouts: Timeouts,
    /// Bytes sent right after connecting, before the greeting (the
    /// balancer's PROXY v2 LOCAL header on probes).
    pub preamble: Option<Arc<[u8]>>,
    /// How long an address gets before the next one is tried alongside
    /// (RFC 8305 §5 "Connection Attempt Delay", 250 ms recommended).
    pub attempt_delay: Option<Duration>,
    /// Where the dialogue is written (`ferry send --verbose`).
    pub transcript: Option<Arc<dyn Transcript>>,
}

/// The RFC 8305 §8 recommended delay before racing the next address.
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Connects to `target` and readies a session for transactions: the
/// greeting, EHLO, TLS as `settings.tls` says (EHLO again after it), and
/// AUTH when `settings.auth` is set.
///
/// # Errors
/// Any [`Error`]: nothing reachable, a refusal of EHLO and HELO, STARTTLS
/// or AUTH, TLS required and unavailable or failed, the connection lost.
pub async fn open(target: &Target, settings: &Settings) -> Result<Session, Error> {
    let mut session = connect(target, settings).await?;
    match session.handshake(settings).await {
        Ok(()) => Ok(session),
        Err(e) => {
            session.quit().await;
            Err(e)
        }
    }
}
