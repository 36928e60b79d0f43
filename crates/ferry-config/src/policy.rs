//! Relay decisions, with Exchange's semantics and wording.
//!
//! | session | recipient in accepted domain | other recipient |
//! |---|---|---|
//! | anonymous, connector has `anonymous` | accepted | `550 5.7.54` |
//! | anonymous, `anonymous` + `accept_any_recipient` | accepted | accepted |
//! | authenticated user | accepted | accepted, if the sender is allowed |
//! | anonymous, connector without `anonymous` | `530 5.7.1` at MAIL | same |

use std::fmt;
use std::net::IpAddr;

use ferry_smtp::{ForwardPath, ReversePath};

use crate::model::{ClusterConfig, Connector, User};

/// Why a sender or recipient was refused; gives the SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// No connector holds the client's address.
    NoConnector,
    NotAuthenticated,
    RelayDenied,
    /// `%`, `!` or a quoted `@` in the local part, from a session that may
    /// not relay.
    SenderSpecifiedRouting,
    SenderNotAllowed {
        user: String,
        sender: String,
    },
    SourceNotAllowed {
        user: String,
        client: IpAddr,
    },
}

impl Refusal {
    pub fn code(&self) -> u16 {
        match self {
            Refusal::NoConnector => 554,
            Refusal::NotAuthenticated => 530,
            _ => 550,
        }
    }

    /// The reply text, enhanced status code first.
    pub fn text(&self) -> String {
        match self {
            Refusal::NoConnector => {
                "5.7.1 No receive connector accepts connections from your address".into()
            }
            Refusal::NotAuthenticated => "5.7.1 Client was not authenticated".into(),
            Refusal::RelayDenied => {
                "5.7.54 SMTP; Unable to relay recipient in non-accepted domain".into()
            }
            Refusal::SenderSpecifiedRouting => {
                "5.7.1 Sender-specified routing is not allowed".into()
            }
            Refusal::SenderNotAllowed { user, sender } => {
                format!("5.7.1 Sender <{sender}> is not allowed for user {user}")
            }
            Refusal::SourceNotAllowed { user, client } => {
                format!("5.7.1 User {user} may not send from {client}")
            }
        }
    }

    /// A short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoConnector => "no_connector",
            Refusal::NotAuthenticated => "not_authenticated",
            Refusal::RelayDenied => "relay_denied",
            Refusal::SenderSpecifiedRouting => "sender_routing",
            Refusal::SenderNotAllowed { .. } => "sender_not_allowed",
            Refusal::SourceNotAllowed { .. } => "source_not_allowed",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.text())
    }
}

impl ClusterConfig {
    /// MAIL FROM: may this session start a transaction with this sender?
    pub fn check_sender(
        &self,
        connector: &Connector,
        user: Option<&User>,
        client: IpAddr,
        sender: &ReversePath,
    ) -> Result<(), Refusal> {
        let Some(user) = user else {
            return match connector.permissions.anonymous {
                true => Ok(()),
                false => Err(Refusal::NotAuthenticated),
            };
        };
        let client = client.to_canonical();
        if !user.allowed_ranges.iter().any(|n| n.contains(&client)) {
            return Err(Refusal::SourceNotAllowed {
                user: user.name.clone(),
                client,
            });
        }
        if !user.allowed_senders.iter().any(|p| p.matches(sender)) {
            return Err(Refusal::SenderNotAllowed {
                user: user.name.clone(),
                sender: sender.to_string(),
            });
        }
        Ok(())
    }

    /// RCPT TO: may this session send to this recipient? (The sender was
    /// checked at MAIL.) `local` is the address the client reached this
    /// node at: an address literal naming it is local mail.
    ///
    /// `<Postmaster>` is always accepted (RFC 5321 §4.5.1), whatever the
    /// connector's permissions.
    pub fn check_recipient(
        &self,
        connector: &Connector,
        user: Option<&User>,
        recipient: &ForwardPath,
        local: IpAddr,
    ) -> Result<(), Refusal> {
        let recipient = match recipient {
            ForwardPath::Postmaster => return Ok(()),
            ForwardPath::Mailbox(m) => m,
        };
        if user.is_some() {
            return Ok(());
        }
        if !connector.permissions.anonymous {
            return Err(Refusal::NotAuthenticated);
        }
        if connector.permissions.accept_any_recipient {
            return Ok(());
        }
        if recipient.has_sender_routing() {
            return Err(Refusal::SenderSpecifiedRouting);
        }
        match self.accepts_domain(recipient.domain(), local) {
            true => Ok(()),
            false => Err(Refusal::RelayDenied),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const CONF: &str = r#"
accepted_domains = [{ domain = "example.test", kind = "authoritative" }, { domain = "*.corp.test", kind = "internal_relay" }]

[[connectors]]
name = "Internal"
port = 25
remote_ranges = ["0.0.0.0/0"]
permissions = ["anonymous"]

[[connectors]]
name = "Anon relay"
port = 25
remote_ranges = ["10.0.0.0/8"]
permissions = ["anonymous", "accept_any_recipient"]

[[connectors]]
name = "Client"
port = 587
remote_ranges = ["0.0.0.0/0"]
permissions = ["users"]
auth = ["tls", "basic_auth_require_tls"]
tls = { certificate = "c.pem", key = "k.pem" }

[[users]]
name = "scanner"
password_hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$9sTbSlTio3Biev89thdrlKKiCaYsjjYVJxGAL3swxpQ"
allowed_senders = ["scanner@example.test", "*@corp.test"]
allowed_ranges = ["192.0.2.0/24"]
"#;

    fn conf() -> ClusterConfig {
        ClusterConfig::parse("t.toml", CONF, Path::new(".")).unwrap()
    }

    fn conn(c: &ClusterConfig, name: &str) -> std::sync::Arc<Connector> {
        c.connectors
            .iter()
            .find(|x| x.name == name)
            .unwrap()
            .clone()
    }

    fn rp(s: &str) -> ReversePath {
        ReversePath::parse(s).unwrap()
    }

    fn fp(s: &str) -> ForwardPath {
        ForwardPath::parse(s).unwrap()
    }

    const LOCAL: &str = "192.0.2.1";

    #[test]
    fn anonymous_internal_relay() {
        let c = conf();
        let k = conn(&c, "Internal");
        let local = LOCAL.parse().unwrap();
        let rcpt = |a: &str| c.check_recipient(&k, None, &fp(a), local);
        assert_eq!(
            c.check_sender(&k, None, "1.2.3.4".parse().unwrap(), &rp("a@x.test")),
            Ok(())
        );
        assert_eq!(rcpt("bob@EXAMPLE.test"), Ok(()));
        assert_eq!(rcpt("bob@example.test."), Ok(()));
        assert_eq!(rcpt("bob@a.corp.test"), Ok(()));
        assert_eq!(rcpt("bob@corp.test"), Err(Refusal::RelayDenied));
        assert_eq!(rcpt("bob@elsewhere.test"), Err(Refusal::RelayDenied));
        assert_eq!(
            rcpt("bob%elsewhere.test@example.test"),
            Err(Refusal::SenderSpecifiedRouting)
        );
        assert_eq!(
            rcpt("\"bob@elsewhere.test\"@example.test"),
            Err(Refusal::SenderSpecifiedRouting)
        );
        assert_eq!(
            Refusal::RelayDenied.to_string(),
            "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
        );
    }

    /// RFC 5321 §4.5.1 and §4.1.3: Postmaster always; an address literal
    /// is ours only when it names the address the client reached.
    #[test]
    fn postmaster_and_address_literals() {
        let c = conf();
        let k = conn(&c, "Internal");
        let local = LOCAL.parse().unwrap();
        assert_eq!(
            c.check_recipient(&k, None, &fp("Postmaster"), local),
            Ok(())
        );
        let client = conn(&c, "Client");
        assert_eq!(
            c.check_recipient(&client, None, &fp("postmaster"), local),
            Ok(())
        );
        // This node's own address, but no route names it: the `*` route
        // would send it out and back here.
        assert_eq!(
            c.check_recipient(&k, None, &fp("ops@[192.0.2.1]"), local),
            Err(Refusal::RelayDenied)
        );
        let routed = format!(
            "{CONF}\n[[routes]]\ndomains = [\"[192.0.2.1]\"]\ntype = \"directory\"\npath = \"m\"\n"
        );
        let routed = ClusterConfig::parse("t.toml", &routed, Path::new(".")).unwrap();
        let rk = conn(&routed, "Internal");
        assert_eq!(
            routed.check_recipient(&rk, None, &fp("ops@[192.0.2.1]"), local),
            Ok(())
        );
        assert_eq!(
            routed.check_recipient(
                &rk,
                None,
                &fp("ops@[192.0.2.1]"),
                "192.0.2.2".parse().unwrap()
            ),
            Err(Refusal::RelayDenied)
        );
        assert_eq!(
            c.check_recipient(&k, None, &fp("ops@[192.0.2.25]"), local),
            Err(Refusal::RelayDenied)
        );
        assert_eq!(
            c.check_recipient(&k, None, &fp("ops@[IPv6:2001:db8::25]"), local),
            Err(Refusal::RelayDenied)
        );
        let anon = conn(&c, "Anon relay");
        assert_eq!(
            c.check_recipient(&anon, None, &fp("ops@[IPv6:2001:db8::25]"), local),
            Ok(())
        );
        assert_eq!(
            c.postmaster.as_ref().map(|m| m.to_string()).as_deref(),
            Some("postmaster@example.test")
        );
    }

    #[test]
    fn anonymous_relay_accepts_any_recipient() {
        let c = conf();
        let k = conn(&c, "Anon relay");
        assert_eq!(
            c.check_recipient(&k, None, &fp("bob@elsewhere.test"), LOCAL.parse().unwrap()),
            Ok(())
        );
    }

    #[test]
    fn users_connector_needs_auth_and_checks_sender_and_source() {
        let c = conf();
        let k = conn(&c, "Client");
        let ip = "192.0.2.9".parse().unwrap();
        assert_eq!(
            c.check_sender(&k, None, ip, &rp("a@x")),
            Err(Refusal::NotAuthenticated)
        );
        assert_eq!(
            Refusal::NotAuthenticated.to_string(),
            "530 5.7.1 Client was not authenticated"
        );
        let u = c.user("SCANNER").unwrap().clone();
        let sender = |a: &str| c.check_sender(&k, Some(&u), ip, &rp(a));
        assert_eq!(sender("scanner@example.test"), Ok(()));
        assert_eq!(sender("Scanner@EXAMPLE.test."), Ok(()));
        assert_eq!(sender("\"scanner\"@example.test"), Ok(()));
        assert_eq!(sender("x@corp.test"), Ok(()));
        assert_eq!(sender("x@Corp.Test"), Ok(()));
        assert!(matches!(
            sender("boss@example.test"),
            Err(Refusal::SenderNotAllowed { .. })
        ));
        assert!(matches!(sender(""), Err(Refusal::SenderNotAllowed { .. })));
        assert!(matches!(
            c.check_sender(
                &k,
                Some(&u),
                "198.51.100.1".parse().unwrap(),
                &rp("scanner@example.test")
            ),
            Err(Refusal::SourceNotAllowed { .. })
        ));
        assert_eq!(
            c.check_recipient(&k, Some(&u), &fp("anyone@elsewhere.test"), ip),
            Ok(())
        );
    }
}
