//! Routes: where mail for a recipient domain goes next, and the delivery
//! schedule.

use std::net::{IpAddr, SocketAddr};

use ferry_smtp::Domain;
use std::path::PathBuf;
use std::time::Duration;

/// Matches recipient domains: `example.test`, `*.example.test` (any
/// subdomain), an address literal (`[192.0.2.25]`, `[IPv6:2001:db8::25]`),
/// or `*` (everything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainPattern {
    Exact(String),
    Subdomains(String),
    Literal(IpAddr),
    Any,
}

impl DomainPattern {
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.starts_with('[') {
            return Domain::parse(s)
                .ok()
                .and_then(|d| d.literal())
                .map(|ip| DomainPattern::Literal(ip.to_canonical()));
        }
        let s = s.trim_end_matches('.').to_ascii_lowercase();
        let valid = |d: &str| {
            !d.is_empty()
                && d.split('.').all(|l| {
                    !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                })
        };
        match s.strip_prefix("*.") {
            _ if s == "*" => Some(DomainPattern::Any),
            Some(d) if valid(d) => Some(DomainPattern::Subdomains(d.to_string())),
            None if valid(&s) => Some(DomainPattern::Exact(s)),
            _ => None,
        }
    }

    /// How specific a match is (higher wins), or `None` for no match. A
    /// literal only matches its own address; names compare without case.
    pub fn rank(&self, domain: &Domain) -> Option<usize> {
        if let Some(ip) = domain.literal() {
            return match self {
                DomainPattern::Literal(p) => (*p == ip.to_canonical()).then_some(usize::MAX),
                DomainPattern::Any => Some(0),
                _ => None,
            };
        }
        let domain = domain.normalized();
        match self {
            DomainPattern::Literal(_) => None,
            DomainPattern::Exact(d) => (*d == domain).then_some(usize::MAX),
            DomainPattern::Subdomains(d) => domain
                .strip_suffix(d.as_str())
                .is_some_and(|head| head.ends_with('.'))
                .then_some(d.len() + 1),
            DomainPattern::Any => Some(0),
        }
    }
}

impl std::fmt::Display for DomainPattern {
    /// As the config writes it: `example.test`, `*.example.test`,
    /// `[192.0.2.25]`, `*`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DomainPattern::Exact(d) => f.write_str(d),
            DomainPattern::Subdomains(d) => write!(f, "*.{d}"),
            DomainPattern::Literal(ip) => f.write_str(&ferry_smtp::address::literal_text(*ip)),
            DomainPattern::Any => f.write_str("*"),
        }
    }
}

/// TLS towards a next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered; clear text otherwise.
    Opportunistic,
    /// STARTTLS or no delivery (the message is deferred, never sent in clear).
    Required,
}

/// A next hop: host name or address, and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    pub host: String,
    pub port: u16,
}

impl NextHop {
    /// `host`, `host:port`, `1.2.3.4:25`, `[::1]:25`; port 25 by default.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix('[') {
            let (host, port) = rest.split_once(']')?;
            host.parse::<std::net::Ipv6Addr>().ok()?;
            let port = match port.strip_prefix(':') {
                Some(p) => p.parse().ok()?,
                None if port.is_empty() => 25,
                None => return None,
            };
            return Some(NextHop {
                host: host.to_string(),
                port,
            });
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (s, 25),
        };
        let ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        ok.then(|| NextHop {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for NextHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// What a route does with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteAction {
    /// Relay over SMTP to the first next hop that answers, in order.
    Smtp {
        next_hops: Vec<NextHop>,
        tls: TlsPolicy,
        verify_certificates: bool,
        /// Trust only the CA certificates in this PEM file (a private CA)
        /// instead of the web PKI's roots; only with `verify_certificates`.
        ca_file: Option<PathBuf>,
        /// AUTH PLAIN towards a smarthost (only ever over TLS).
        auth: Option<(String, String)>,
    },
    /// Look up the recipient domain's MX records and relay to its mail
    /// exchangers in preference order (RFC 5321 section 5.1), falling back to
    /// the domain's own A/AAAA records when it has no MX.
    Mx {
        /// The exchangers' SMTP port: 25 except in tests.
        port: u16,
        tls: TlsPolicy,
        /// Checked against the exchanger's host name from the MX record.
        verify_certificates: bool,
        /// As for `Smtp`.
        ca_file: Option<PathBuf>,
    },
    /// Write each message as an `.eml` file, envelope in `X-Ferry-*` headers.
    Directory(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub domains: Vec<DomainPattern>,
    pub action: RouteAction,
}

/// The delivery schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Between attempts after a temporary failure (Exchange's
    /// MessageRetryInterval), with up to 10 % jitter.
    pub retry_interval: Duration,
    pub delay_notice_after: Duration,
    pub bounce_after: Duration,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    /// Sessions open at once towards one next hop.
    pub max_connections_per_hop: u32,
    /// Name servers for `mx` routes; empty means the system's
    /// (`/etc/resolv.conf`).
    pub dns_servers: Vec<SocketAddr>,
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            retry_interval: Duration::from_secs(5 * 60),
            delay_notice_after: Duration::from_secs(4 * 3600),
            bounce_after: Duration::from_secs(2 * 86400),
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(5 * 60),
            max_connections_per_hop: 20,
            dns_servers: Vec::new(),
        }
    }
}

impl crate::ClusterConfig {
    /// The most specific route for a recipient domain.
    pub fn route_for(&self, domain: &Domain) -> Option<&Route> {
        self.routes
            .iter()
            .filter_map(|r| {
                r.domains
                    .iter()
                    .filter_map(|p| p.rank(domain))
                    .max()
                    .map(|k| (k, r))
            })
            .max_by_key(|(k, _)| *k)
            .map(|(_, r)| r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_hops_parse() {
        assert_eq!(
            NextHop::parse("mx.example.test"),
            Some(NextHop {
                host: "mx.example.test".into(),
                port: 25
            })
        );
        assert_eq!(
            NextHop::parse("127.0.0.1:2526"),
            Some(NextHop {
                host: "127.0.0.1".into(),
                port: 2526
            })
        );
        assert_eq!(
            NextHop::parse("[::1]:2526"),
            Some(NextHop {
                host: "::1".into(),
                port: 2526
            })
        );
        assert_eq!(NextHop::parse("[::1]").map(|h| h.port), Some(25));
        assert_eq!(NextHop::parse("bad host:25"), None);
        assert_eq!(NextHop::parse("h:99999"), None);
    }

    #[test]
    fn domain_patterns_rank() {
        let exact = DomainPattern::parse("example.test").unwrap();
        let sub = DomainPattern::parse("*.example.test").unwrap();
        let any = DomainPattern::parse("*").unwrap();
        let d = |s: &str| Domain::parse(s).unwrap();
        assert_eq!(exact.rank(&d("EXAMPLE.test")), Some(usize::MAX));
        assert_eq!(exact.rank(&d("example.test.")), Some(usize::MAX));
        assert_eq!(sub.rank(&d("example.test")), None);
        assert!(sub.rank(&d("a.example.test")).unwrap() > any.rank(&d("a.example.test")).unwrap());
        assert_eq!(DomainPattern::parse("*.*"), None);
        let v4 = DomainPattern::parse("[192.0.2.25]").unwrap();
        let v6 = DomainPattern::parse("[IPv6:2001:DB8::25]").unwrap();
        assert_eq!(v4.rank(&d("[192.0.2.25]")), Some(usize::MAX));
        assert_eq!(v4.rank(&d("[192.0.2.26]")), None);
        assert_eq!(v6.rank(&d("[ipv6:2001:db8:0::25]")), Some(usize::MAX));
        assert_eq!(any.rank(&d("[192.0.2.26]")), Some(0));
        assert_eq!(exact.rank(&d("[192.0.2.25]")), None);
        assert_eq!(DomainPattern::parse("[192.0.2]"), None);
    }
}
