//! One SMTP transaction to one next hop, on the shared client
//! (`ferry-client`): connect, EHLO, STARTTLS per the route's policy, AUTH
//! to a smarthost, MAIL, RCPT (pipelined when offered), DATA, QUIT. This
//! module maps the route's settings onto the client's and the client's
//! results onto delivery's: one outcome per recipient, or why the hop
//! could not take the message (and whether the next hop is worth a try).

use ferry_client::{AttemptFailure, Credentials, Outcome, TlsMode, TlsSettings, Verify};
use ferry_config::TlsPolicy;
use ferry_smtp::Reply;
use std::time::Duration;
use zeroize::Zeroizing;

pub use ferry_client::Transaction;

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
    /// The server refused the whole session (EHLO, AUTH, MAIL or DATA),
    /// with its reply.
    #[error("{hop} said: {reply}")]
    Refused { hop: String, reply: Reply },
    /// The server greeted with something other than `220`: even a `554`
    /// speaks for that host only, so the next hop is tried (as Postfix's
    /// `smtp_skip_5xx_greeting` does by default).
    #[error("{hop} greeted with {reply}")]
    Greeted { hop: String, reply: Reply },
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

    fn from_client(hop: &str, e: ferry_client::Error) -> Self {
        use ferry_client::Error as E;
        let hop = hop.to_string();
        match e {
            E::Unreachable { attempts, .. } => {
                if let Some(AttemptFailure::Greeted(reply)) = attempts.last().map(|a| &a.failure) {
                    return HopError::Greeted {
                        hop,
                        reply: reply.clone(),
                    };
                }
                match attempts.as_slice() {
                    [only] => match &only.failure {
                        AttemptFailure::NoGreeting(_) | AttemptFailure::GreetingTimeout(_) => {
                            HopError::Protocol {
                                hop,
                                reason: only.failure.reason(),
                            }
                        }
                        _ => HopError::Connect {
                            hop,
                            reason: only.failure.reason(),
                        },
                    },
                    _ => unreachable_hop(hop, &attempts),
                }
            }
            E::Resolve { reason, .. } => HopError::Connect { hop, reason },
            E::Refused { reply, .. } => HopError::Refused { hop, reply },
            E::TlsUnavailable { .. } => HopError::TlsUnavailable { hop },
            E::Tls { reason, .. } => HopError::Tls { hop, reason },
            E::Unsuitable { reply, .. } => HopError::Unsuitable { hop, reply },
            E::Connection { reason, .. } => HopError::Protocol { hop, reason },
            other => HopError::Protocol {
                hop,
                reason: other.to_string(),
            },
        }
    }
}

fn unreachable_hop(hop: String, attempts: &[ferry_client::Attempt]) -> HopError {
    let reason = attempts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    HopError::Connect { hop, reason }
}

/// How to talk to the hop.
pub struct HopSettings<'a> {
    pub helo: &'a str,
    pub tls: TlsPolicy,
    /// Which certificates the hop may show.
    pub verify: Verify,
    /// The CA file `verify` was read from, if any (sessions are pooled by
    /// it).
    pub ca_file: Option<&'a std::path::Path>,
    pub auth: Option<&'a (String, String)>,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
}

impl HopSettings<'_> {
    /// What a pooled session towards `hop` was opened with: only a session
    /// opened with the same TLS policy, trust and credential (user and a
    /// digest of the password: two routes to one hop may log in as one
    /// user with different passwords) serves the next message.
    pub fn session_key(&self, hop: &str) -> String {
        use std::hash::{Hash, Hasher};
        let trust = match (&self.verify, self.ca_file) {
            (Verify::Off, _) => "off".into(),
            (_, Some(path)) => format!("ca:{}", path.display()),
            _ => "webpki".into(),
        };
        let auth = self.auth.map_or(String::new(), |(user, password)| {
            let mut digest = std::hash::DefaultHasher::new();
            password.hash(&mut digest);
            format!("{user}:{:x}", digest.finish())
        });
        format!("{hop}|{:?}|{trust}|{auth}", self.tls)
    }

    fn client_settings(&self) -> ferry_client::Settings {
        let mode = match self.tls {
            TlsPolicy::None => TlsMode::Off,
            TlsPolicy::Opportunistic => TlsMode::Opportunistic,
            TlsPolicy::Required => TlsMode::Required,
        };
        ferry_client::Settings {
            helo: self.helo.to_string(),
            tls: TlsSettings {
                mode,
                verify: self.verify.clone(),
            },
            auth: self.auth.map(|(user, password)| Credentials {
                user: user.clone(),
                password: Zeroizing::new(password.clone()),
                mechanism: None,
            }),
            timeouts: ferry_client::Timeouts {
                connect: self.connect_timeout,
                greeting: self.command_timeout,
                command: self.command_timeout,
                data_end: self.command_timeout,
            },
            ..Default::default()
        }
    }
}

/// An open SMTP session with a next hop, ready for a transaction.
pub struct Session {
    inner: ferry_client::Session,
    hop: String,
}

/// Opens a session with `hop`: connect, greeting, EHLO, STARTTLS per the
/// route's policy, AUTH.
pub async fn open(target: &Target<'_>, settings: &HopSettings<'_>) -> Result<Session, HopError> {
    let hop = target.label();
    let client_target = ferry_client::Target {
        host: target.hop.host.clone(),
        port: target.hop.port,
        addresses: target.address.map(|ip| vec![ip]),
        label: Some(hop.clone()),
    };
    match ferry_client::open(&client_target, &settings.client_settings()).await {
        Ok(inner) => Ok(Session { inner, hop }),
        Err(e) => Err(HopError::from_client(&hop, e)),
    }
}

impl Session {
    /// Ends the session politely.
    pub async fn quit(self) {
        self.inner.quit().await;
    }

    /// One transaction; afterwards the session is ready for the next one
    /// (if this returned `Ok`).
    pub async fn send(&mut self, tx: &Transaction<'_>) -> Result<Vec<RecipientOutcome>, HopError> {
        let results = self
            .inner
            .send(tx)
            .await
            .map_err(|e| HopError::from_client(&self.hop, e))?;
        Ok(results
            .into_iter()
            .map(|r| match r.outcome {
                Outcome::Accepted => RecipientOutcome::Delivered(r.reply.to_string()),
                Outcome::Permanent => RecipientOutcome::Permanent(r.reply.to_string()),
                Outcome::Temporary => RecipientOutcome::Temporary(r.reply.to_string()),
            })
            .collect())
    }
}
