//! The validated cluster config.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_smtp::{Domain, Mailbox, ReversePath};
use ipnet::IpNet;

/// The whole cluster config, valid by construction.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub accepted_domains: Vec<AcceptedDomain>,
    pub trusted_proxies: Vec<IpNet>,
    pub connectors: Vec<Arc<Connector>>,
    /// Users by lower-cased name.
    pub users: BTreeMap<String, Arc<User>>,
    pub routes: Vec<crate::routes::Route>,
    pub delivery: crate::routes::Delivery,
    /// Below this much free space in the data directory, new mail gets
    /// `452 4.3.1` and the node reports not ready (back-pressure).
    pub min_free_space: u64,
    /// The `[balancer]` section, read by balancer nodes.
    pub balancer: Option<crate::balancer::BalancerConfig>,
    /// Where mail to the bare `<Postmaster>` goes (RFC 5321 §4.5.1): the
    /// `postmaster` key, by default `postmaster@` the first authoritative
    /// domain; `None` when there is neither (the worker then uses
    /// `postmaster@` its host name).
    pub postmaster: Option<Mailbox>,
    /// The `[auth]` section: verification bound, credential cache and
    /// per-client failure limit.
    pub auth: crate::auth::AuthConfig,
}

/// The default floor of free space for the spool.
pub const DEFAULT_MIN_FREE_SPACE: u64 = 128 * 1024 * 1024;
/// The default listen queue of a port: connections the kernel has
/// completed and holds until the node accepts them (`listen(2)`'s
/// backlog; the kernel caps it at `net.core.somaxconn`). HAProxy and
/// nginx default to the same order; 128, the usual library default,
/// drops SYNs in a burst of a few hundred devices.
pub const DEFAULT_BACKLOG: u32 = 1024;
/// The largest backlog a config may ask for.
pub const MAX_BACKLOG: u32 = 65_535;

/// A port to listen on with the length of its listen queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenPort {
    pub port: u16,
    /// Connections the kernel may hold completed and not yet accepted.
    pub backlog: u32,
}

/// How an accepted domain is handled. Both kinds accept mail from the
/// internal-relay connectors; `internal_relay` is for domains whose
/// mailboxes live partly elsewhere (routing, a later concern, forwards them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainKind {
    Authoritative,
    InternalRelay,
}

/// `example.test` or `*.example.test` (any subdomain, not the domain itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedDomain {
    /// Lower case, without the `*.`.
    pub domain: String,
    pub subdomains: bool,
    pub kind: DomainKind,
}

impl AcceptedDomain {
    pub fn matches(&self, domain: &str) -> bool {
        let domain = domain.trim_end_matches('.');
        if self.subdomains {
            domain.len() > self.domain.len()
                && domain
                    .to_ascii_lowercase()
                    .strip_suffix(&self.domain)
                    .is_some_and(|head| head.ends_with('.'))
        } else {
            domain.eq_ignore_ascii_case(&self.domain)
        }
    }
}

/// An Exchange-style receive connector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connector {
    pub name: String,
    pub port: u16,
    /// Bound to one local address, or to any.
    pub local_address: Option<IpAddr>,
    pub remote_ranges: Vec<IpNet>,
    pub permissions: Permissions,
    pub auth: AuthSettings,
    pub tls: Option<TlsSettings>,
    /// The text after `220 ` in the greeting.
    pub banner: String,
    pub limits: Limits,
    pub protocol_log: ProtocolLog,
    /// Add `Message-ID` and `Date` to a message that lacks them, as
    /// Exchange does (RFC 5322 §3.6 requires Date and asks for Message-ID).
    pub add_missing_headers: bool,
    /// The listen queue this connector asks for its port; `None` leaves
    /// it to the other connectors on the port, or [`DEFAULT_BACKLOG`].
    pub backlog: Option<u32>,
}

/// Exchange's permission groups, as far as a relay needs them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Permissions {
    /// Anonymous senders may send to accepted domains.
    pub anonymous: bool,
    /// Anonymous senders may send anywhere (anonymous relay).
    pub accept_any_recipient: bool,
    /// Users may authenticate and then relay anywhere.
    pub users: bool,
}

/// Exchange's AuthMechanism: `tls` (STARTTLS offered), `basic_auth` (AUTH
/// PLAIN and LOGIN), `basic_auth_require_tls` (AUTH only after STARTTLS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuthSettings {
    pub starttls: bool,
    pub basic: bool,
    pub require_tls: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// Certificate and key as PEM files, relative to the config file's folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub certificate: PathBuf,
    pub key: PathBuf,
    pub min_version: TlsVersion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolLog {
    None,
    Verbose,
}

/// Receive-connector limits; defaults are Exchange 2016's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_message_size: u64,
    pub max_header_size: u64,
    pub max_recipients: u32,
    pub max_connections: u32,
    pub max_connections_per_source: u32,
    pub connection_timeout: Duration,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub max_protocol_errors: u32,
    pub tarpit: Duration,
    pub max_hop_count: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: 36 * 1024 * 1024,
            max_header_size: 256 * 1024,
            max_recipients: 200,
            max_connections: 5000,
            max_connections_per_source: 20,
            connection_timeout: Duration::from_secs(10 * 60),
            command_timeout: Duration::from_secs(5 * 60),
            data_timeout: Duration::from_secs(5 * 60),
            max_protocol_errors: 5,
            tarpit: Duration::from_secs(5),
            max_hop_count: 30,
        }
    }
}

/// A device or application that authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    /// PHC string of an argon2 hash.
    pub password_hash: String,
    pub allowed_senders: Vec<SenderPattern>,
    pub allowed_ranges: Vec<IpNet>,
}

/// An allowed sender: one address, every address of a domain, or anyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderPattern {
    Address(Mailbox),
    /// Lower case.
    Domain(String),
    Any,
}

impl SenderPattern {
    /// Does this pattern allow `sender`? Local parts compare by their text
    /// (quoting aside) and without case, domains by [`Domain::normalized`];
    /// the null sender `<>` only matches `*`.
    pub fn matches(&self, sender: &ReversePath) -> bool {
        let Some(sender) = sender.mailbox() else {
            return *self == SenderPattern::Any;
        };
        match self {
            SenderPattern::Any => true,
            SenderPattern::Address(a) => {
                a.local_part_text()
                    .eq_ignore_ascii_case(&sender.local_part_text())
                    && a.domain().normalized() == sender.domain().normalized()
            }
            SenderPattern::Domain(d) => sender.domain().normalized() == *d,
        }
    }
}

impl std::fmt::Display for SenderPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SenderPattern::Any => f.write_str("*"),
            SenderPattern::Address(a) => a.fmt(f),
            SenderPattern::Domain(d) => write!(f, "*@{d}"),
        }
    }
}

impl ClusterConfig {
    pub fn user(&self, name: &str) -> Option<&Arc<User>> {
        self.users.get(&name.to_ascii_lowercase())
    }

    /// Is `domain` one of ours?
    pub fn accepted_domain(&self, domain: &str) -> Option<&AcceptedDomain> {
        self.accepted_domains.iter().find(|d| d.matches(domain))
    }

    /// Is mail to `domain` ours to accept from anyone? A name must be an
    /// accepted domain. An address literal is the host itself (RFC 5321
    /// §4.1.3), so one naming another host is relaying; one naming `local`,
    /// the address this node was reached at, is ours only when a route
    /// names that literal: the catch-all `*` route leads out, and would
    /// send such mail back to this node in a loop.
    pub fn accepts_domain(&self, domain: &Domain, local: IpAddr) -> bool {
        match domain.literal() {
            Some(ip) => {
                let ip = ip.to_canonical();
                ip == local.to_canonical()
                    && self.routes.iter().any(|r| {
                        r.domains
                            .contains(&crate::routes::DomainPattern::Literal(ip))
                    })
            }
            None => self.accepted_domain(&domain.normalized()).is_some(),
        }
    }

    /// The ports some connector listens on, each once.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.connectors.iter().map(|c| c.port).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// The ports some connector listens on, each once, in port order,
    /// with its listen queue: connectors that share a port share one
    /// socket, which gets the largest backlog any of them sets
    /// ([`DEFAULT_BACKLOG`] if none does).
    pub fn listen_ports(&self) -> Vec<ListenPort> {
        self.ports()
            .into_iter()
            .map(|port| ListenPort {
                port,
                backlog: self
                    .connectors
                    .iter()
                    .filter(|c| c.port == port)
                    .filter_map(|c| c.backlog)
                    .max()
                    .unwrap_or(DEFAULT_BACKLOG),
            })
            .collect()
    }

    /// Is `peer` allowed to send a PROXY header?
    pub fn is_trusted_proxy(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.trusted_proxies.iter().any(|n| n.contains(&peer))
    }
}
