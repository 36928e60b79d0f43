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

/// The part of an address after the last `@`, and the part before.
pub fn split_address(address: &str) -> Option<(&str, &str)> {
    address.rsplit_once('@')
}

fn has_sender_routing(address: &str) -> bool {
    match split_address(address) {
        Some((local, _)) => local.contains(['%', '!', '@']),
        None => address.contains(['%', '!']),
    }
}

impl ClusterConfig {
    /// MAIL FROM: may this session start a transaction with this sender?
    pub fn check_sender(
        &self,
        connector: &Connector,
        user: Option<&User>,
        client: IpAddr,
        sender: &str,
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
        let allowed = user.allowed_senders.iter().any(|p| {
            p.matches(sender) || (sender.is_empty() && *p == crate::model::SenderPattern::Any)
        });
        if !allowed {
            return Err(Refusal::SenderNotAllowed {
                user: user.name.clone(),
                sender: sender.to_string(),
            });
        }
        Ok(())
    }

    /// RCPT TO: may this session send to this recipient? (The sender was
    /// checked at MAIL.)
    pub fn check_recipient(
        &self,
        connector: &Connector,
        user: Option<&User>,
        recipient: &str,
    ) -> Result<(), Refusal> {
        if user.is_some() {
            return Ok(());
        }
        if !connector.permissions.anonymous {
            return Err(Refusal::NotAuthenticated);
        }
        if connector.permissions.accept_any_recipient {
            return Ok(());
        }
        if has_sender_routing(recipient) {
            return Err(Refusal::SenderSpecifiedRouting);
        }
        match split_address(recipient) {
            Some((_, domain)) if self.accepted_domain(domain).is_some() => Ok(()),
            _ => Err(Refusal::RelayDenied),
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

    #[test]
    fn anonymous_internal_relay() {
        let c = conf();
        let k = conn(&c, "Internal");
        assert_eq!(
            c.check_sender(&k, None, "1.2.3.4".parse().unwrap(), "a@x.test"),
            Ok(())
        );
        assert_eq!(c.check_recipient(&k, None, "bob@EXAMPLE.test"), Ok(()));
        assert_eq!(c.check_recipient(&k, None, "bob@a.corp.test"), Ok(()));
        assert_eq!(
            c.check_recipient(&k, None, "bob@corp.test"),
            Err(Refusal::RelayDenied)
        );
        assert_eq!(
            c.check_recipient(&k, None, "bob@elsewhere.test"),
            Err(Refusal::RelayDenied)
        );
        assert_eq!(
            c.check_recipient(&k, None, "bob%elsewhere.test@example.test"),
            Err(Refusal::SenderSpecifiedRouting)
        );
        assert_eq!(
            c.check_recipient(&k, None, "bob@elsewhere.test@example.test"),
            Err(Refusal::SenderSpecifiedRouting)
        );
        assert_eq!(
            Refusal::RelayDenied.to_string(),
            "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
        );
    }

    #[test]
    fn anonymous_relay_accepts_any_recipient() {
        let c = conf();
        let k = conn(&c, "Anon relay");
        assert_eq!(c.check_recipient(&k, None, "bob@elsewhere.test"), Ok(()));
    }

    #[test]
    fn users_connector_needs_auth_and_checks_sender_and_source() {
        let c = conf();
        let k = conn(&c, "Client");
        let ip = "192.0.2.9".parse().unwrap();
        assert_eq!(
            c.check_sender(&k, None, ip, "a@x"),
            Err(Refusal::NotAuthenticated)
        );
        assert_eq!(
            Refusal::NotAuthenticated.to_string(),
            "530 5.7.1 Client was not authenticated"
        );
        let u = c.user("SCANNER").unwrap().clone();
        assert_eq!(
            c.check_sender(&k, Some(&u), ip, "scanner@example.test"),
            Ok(())
        );
        assert_eq!(c.check_sender(&k, Some(&u), ip, "x@corp.test"), Ok(()));
        assert!(matches!(
            c.check_sender(&k, Some(&u), ip, "boss@example.test"),
            Err(Refusal::SenderNotAllowed { .. })
        ));
        assert!(matches!(
            c.check_sender(&k, Some(&u), ip, ""),
            Err(Refusal::SenderNotAllowed { .. })
        ));
        assert!(matches!(
            c.check_sender(
                &k,
                Some(&u),
                "198.51.100.1".parse().unwrap(),
                "scanner@example.test"
            ),
            Err(Refusal::SourceNotAllowed { .. })
        ));
        assert_eq!(
            c.check_recipient(&k, Some(&u), "anyone@elsewhere.test"),
            Ok(())
        );
    }
}
