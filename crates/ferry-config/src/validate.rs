//! From the raw file to the validated model, collecting every error.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

use crate::error::{ConfigError, LineIndex, Located};
use crate::model::*;
use crate::raw::*;
use crate::read::Reader;
use crate::routes::{Delivery, DomainPattern, NextHop, Route, RouteAction, TlsPolicy};

mod balancer;

pub(crate) struct Checker<'a> {
    index: LineIndex<'a>,
    errors: Vec<Located>,
}

impl Checker<'_> {
    pub(crate) fn err<T>(&mut self, at: &Spanned<T>, message: impl Into<String>) {
        // A placeholder for a missing or unreadable key: its error is
        // already recorded, anything about its stand-in value is noise.
        if at.span().is_empty() {
            return;
        }
        let located = self.index.locate(at.span().start, message);
        self.errors.push(located);
    }

    fn range(&mut self, s: &Spanned<String>) -> Option<IpNet> {
        parse_range(s.get_ref()).or_else(|| {
            self.err(
                s,
                format!("'{}' is not an IP address or CIDR range", s.get_ref()),
            );
            None
        })
    }

    fn ranges(&mut self, list: &[Spanned<String>]) -> Vec<IpNet> {
        list.iter().filter_map(|s| self.range(s)).collect()
    }

    pub(crate) fn duration(&mut self, s: &Option<Spanned<String>>, default: Duration) -> Duration {
        let Some(s) = s else { return default };
        match humantime::parse_duration(s.get_ref()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.err(s, format!("'{}': this must be more than zero", s.get_ref()));
                default
            }
            Err(_) => {
                self.err(
                    s,
                    format!(
                        "'{}' is not a duration such as \"30s\" or \"5m\"",
                        s.get_ref()
                    ),
                );
                default
            }
        }
    }

    /// A duration where zero (`"0s"`, `"0"`) is allowed: "off".
    pub(crate) fn duration_or_zero(
        &mut self,
        s: &Option<Spanned<String>>,
        default: Duration,
    ) -> Duration {
        match s {
            Some(t) if matches!(t.get_ref().trim(), "0" | "0s") => Duration::ZERO,
            other => self.duration(other, default),
        }
    }

    fn size(&mut self, s: &Option<Spanned<RawSize>>, default: u64) -> u64 {
        let Some(s) = s else { return default };
        let parsed = match s.get_ref() {
            RawSize::Octets(n) => Some(*n),
            RawSize::Text(t) => parse_size(t),
        };
        match parsed {
            Some(n) if n > 0 => n,
            _ => {
                self.err(
                    s,
                    "a size is a positive number of octets or a string such as \"36MB\"",
                );
                default
            }
        }
    }

    /// A listen queue length: 1 to [`MAX_BACKLOG`] connections.
    pub(crate) fn backlog(&mut self, s: &Option<Spanned<i64>>) -> Option<u32> {
        let s = s.as_ref()?;
        match u32::try_from(*s.get_ref()) {
            Ok(n) if (1..=MAX_BACKLOG).contains(&n) => Some(n),
            _ => {
                self.err(
                    s,
                    format!(
                        "backlog {} is not from 1 to {MAX_BACKLOG} connections",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn count(&mut self, s: &Option<Spanned<u32>>, default: u32) -> u32 {
        match s {
            Some(v) if *v.get_ref() == 0 => {
                self.err(v, "must be at least 1");
                default
            }
            Some(v) => *v.get_ref(),
            None => default,
        }
    }
}

/// "10.0.0.0/8", "2001:db8::/32", or a single address ("10.1.2.3").
pub(crate) fn parse_range(s: &str) -> Option<IpNet> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(canonical_net(net.trunc()));
    }
    s.parse::<IpAddr>()
        .ok()
        .map(|ip| canonical_net(IpNet::from(ip)))
}

/// `::ffff:10.0.0.0/104` is `10.0.0.0/8`.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).unwrap_or(net),
            None => net,
        },
        other => other,
    }
}

/// "36MB", "256KB", "1GB", "512B" or a bare number; K/M/G are powers of 1024,
/// as in Exchange.
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = if let Some(n) = t.strip_suffix("GB") {
        (n, 1u64 << 30)
    } else if let Some(n) = t.strip_suffix("MB") {
        (n, 1 << 20)
    } else if let Some(n) = t.strip_suffix("KB") {
        (n, 1 << 10)
    } else if let Some(n) = t.strip_suffix('B') {
        (n, 1)
    } else {
        (t.as_str(), 1)
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

pub(crate) fn parse(file: &str, text: &str, base_dir: &Path) -> Result<ClusterConfig, ConfigError> {
    let mut c = Checker {
        index: LineIndex::new(text),
        errors: Vec::new(),
    };
    let mut reader = Reader::default();
    let raw = RawConfig::read(&mut reader, text);
    for (at, message) in reader.errors {
        let located = c.index.locate(at.start, message);
        c.errors.push(located);
    }
    let Some(raw) = raw else {
        c.errors.sort_by_key(|e| (e.line, e.column));
        return Err(ConfigError::Invalid {
            file: file.into(),
            errors: c.errors,
        });
    };

    let accepted_domains: Vec<AcceptedDomain> = raw
        .accepted_domains
        .iter()
        .filter_map(|d| domain(&mut c, d.get_ref()))
        .collect();
    let trusted_proxies = c.ranges(&raw.trusted_proxies);

    let mut users = BTreeMap::new();
    for u in &raw.users {
        let user = user(&mut c, u.get_ref());
        let key = user.name.to_ascii_lowercase();
        if users.contains_key(&key) {
            c.err(
                &u.get_ref().name,
                format!("user '{}' is defined twice", user.name),
            );
        }
        users.insert(key, Arc::new(user));
    }

    let mut connectors: Vec<Arc<Connector>> = Vec::new();
    for rc in &raw.connectors {
        let conn = connector(&mut c, rc.get_ref(), base_dir);
        if connectors
            .iter()
            .any(|o| o.name.eq_ignore_ascii_case(&conn.name))
        {
            c.err(
                &rc.get_ref().name,
                format!("connector '{}' is defined twice", conn.name),
            );
        }
        connectors.push(Arc::new(conn));
    }
    overlaps(&mut c, &raw.connectors, &connectors);
    let routes = raw
        .routes
        .iter()
        .filter_map(|r| route(&mut c, r.get_ref(), base_dir))
        .collect();
    let delivery = delivery(&mut c, &raw.delivery);
    let min_free_space = c.size(&raw.spool.min_free_space, DEFAULT_MIN_FREE_SPACE);
    let balancer = raw
        .balancer
        .as_ref()
        .map(|b| balancer::balancer(&mut c, b, &raw.trusted_proxies, &trusted_proxies));
    let postmaster = postmaster(&mut c, raw.postmaster.as_ref(), &accepted_domains);
    let auth = crate::auth::auth(&mut c, &raw.auth);

    if !c.errors.is_empty() {
        c.errors.sort_by_key(|e| (e.line, e.column));
        return Err(ConfigError::Invalid {
            file: file.into(),
            errors: c.errors,
        });
    }
    Ok(ClusterConfig {
        accepted_domains,
        trusted_proxies,
        connectors,
        users,
        routes,
        delivery,
        min_free_space,
        balancer,
        postmaster,
        auth,
    })
}

/// The `postmaster` key, or `postmaster@` the first authoritative domain
/// (the first accepted domain when none is authoritative).
fn postmaster(
    c: &mut Checker<'_>,
    raw: Option<&Spanned<String>>,
    domains: &[AcceptedDomain],
) -> Option<ferry_smtp::Mailbox> {
    if let Some(s) = raw {
        let text = s.get_ref().trim();
        return ferry_smtp::Mailbox::parse(text).ok().or_else(|| {
            c.err(s, format!("postmaster '{text}' is not an address"));
            None
        });
    }
    let domain = domains
        .iter()
        .filter(|d| !d.subdomains)
        .find(|d| d.kind == DomainKind::Authoritative)
        .or_else(|| domains.iter().find(|d| !d.subdomains))?;
    ferry_smtp::Mailbox::parse(&format!("postmaster@{}", domain.domain)).ok()
}

fn route(c: &mut Checker<'_>, r: &RawRoute, base_dir: &Path) -> Option<Route> {
    let mut domains = Vec::new();
    for d in r.domains.get_ref() {
        match DomainPattern::parse(d.get_ref()) {
            Some(p) => domains.push(p),
            None => c.err(
                d,
                format!("'{}' is not a domain, *.domain or *", d.get_ref()),
            ),
        }
    }
    if r.domains.get_ref().is_empty() {
        c.err(&r.domains, "a route needs at least one domain pattern");
    }
    let action = match r.kind.get_ref().as_str() {
        "smtp" => {
            let mut next_hops = Vec::new();
            for h in &r.next_hops {
                match NextHop::parse(h.get_ref()) {
                    Some(hop) => next_hops.push(hop),
                    None => c.err(
                        h,
                        format!("'{}' is not host, host:port or [v6]:port", h.get_ref()),
                    ),
                }
            }
            if r.next_hops.is_empty() {
                c.err(&r.kind, "an smtp route needs next_hops");
            }
            let tls = tls_policy(c, r);
            if r.auth.is_some() && tls != TlsPolicy::Required {
                c.err(
                    &r.kind,
                    "smarthost auth needs tls = \"required\": passwords never go in clear",
                );
            }
            let verify_certificates = r.verify_certificates.unwrap_or(true);
            RouteAction::Smtp {
                next_hops,
                tls,
                verify_certificates,
                ca_file: ca_file(c, r, tls, verify_certificates, base_dir),
                auth: r
                    .auth
                    .as_ref()
                    .map(|a| (a.username.clone(), a.password.clone())),
            }
        }
        "mx" => {
            if let Some(first) = r.next_hops.first() {
                c.err(
                    first,
                    "an mx route finds its next hops in DNS; drop next_hops",
                );
            }
            if r.auth.is_some() {
                c.err(
                    &r.kind,
                    "an mx route cannot authenticate; use an smtp route to a smarthost",
                );
            }
            let verify_certificates = r.verify_certificates.unwrap_or(false);
            let tls = tls_policy(c, r);
            RouteAction::Mx {
                port: r.port.as_ref().map_or(25, |p| *p.get_ref()),
                tls,
                verify_certificates,
                ca_file: ca_file(c, r, tls, verify_certificates, base_dir),
            }
        }
        "directory" => match &r.path {
            Some(p) if p.get_ref().trim().is_empty() => {
                c.err(p, "a directory route needs a path, not an empty one");
                return None;
            }
            Some(p) => RouteAction::Directory(base_dir.join(p.get_ref())),
            None => {
                c.err(&r.kind, "a directory route needs a path");
                return None;
            }
        },
        other => {
            c.err(
                &r.kind,
                format!("route type '{other}' is not 'smtp', 'mx' or 'directory'"),
            );
            return None;
        }
    };
    if let (Some(p), false) = (&r.port, matches!(action, RouteAction::Mx { .. })) {
        c.err(p, "port is for mx routes; give smtp next hops as host:port");
    }
    if let (Some(p), RouteAction::Directory(_)) = (&r.ca_file, &action) {
        c.err(p, "ca_file is for smtp and mx routes");
    }
    Some(Route { domains, action })
}

/// The route's `ca_file`, relative to the config's folder; it only means
/// something when TLS may be used and certificates are verified. (Whether
/// the file holds a certificate is the worker's check, when it builds its
/// TLS material.)
fn ca_file(
    c: &mut Checker<'_>,
    r: &RawRoute,
    tls: TlsPolicy,
    verify_certificates: bool,
    base_dir: &Path,
) -> Option<PathBuf> {
    let p = r.ca_file.as_ref()?;
    if p.get_ref().trim().is_empty() {
        c.err(p, "ca_file needs a path, not an empty one");
        return None;
    }
    if tls == TlsPolicy::None {
        c.err(p, "ca_file means nothing with tls = \"none\": remove one");
    } else if !verify_certificates {
        c.err(
            p,
            "ca_file is trusted only where certificates are verified: set verify_certificates = true",
        );
    }
    Some(base_dir.join(p.get_ref()))
}

fn tls_policy(c: &mut Checker<'_>, r: &RawRoute) -> TlsPolicy {
    match r.tls.as_ref().map(|t| (t, t.get_ref().as_str())) {
        None | Some((_, "opportunistic")) => TlsPolicy::Opportunistic,
        Some((_, "none")) => TlsPolicy::None,
        Some((_, "required")) => TlsPolicy::Required,
        Some((t, other)) => {
            c.err(
                t,
                format!("tls '{other}' is not 'none', 'opportunistic' or 'required'"),
            );
            TlsPolicy::Opportunistic
        }
    }
}

fn delivery(c: &mut Checker<'_>, d: &RawDelivery) -> Delivery {
    let def = Delivery::default();
    Delivery {
        retry_interval: c.duration(&d.retry_interval, def.retry_interval),
        delay_notice_after: c.duration(&d.delay_notice_after, def.delay_notice_after),
        bounce_after: c.duration(&d.bounce_after, def.bounce_after),
        connect_timeout: c.duration(&d.connect_timeout, def.connect_timeout),
        command_timeout: c.duration(&d.command_timeout, def.command_timeout),
        max_connections_per_hop: c.count(&d.max_connections_per_hop, def.max_connections_per_hop),
        dns_servers: d
            .dns_servers
            .iter()
            .flatten()
            .filter_map(|s| {
                let text = s.get_ref().trim();
                let parsed = text.parse::<SocketAddr>().ok().or_else(|| {
                    text.parse::<IpAddr>()
                        .ok()
                        .map(|ip| SocketAddr::new(ip, 53))
                });
                if parsed.is_none() {
                    c.err(s, format!("'{text}' is not an IP address or IP:port"));
                }
                parsed
            })
            .collect(),
    }
}

fn domain(c: &mut Checker<'_>, d: &RawDomain) -> Option<AcceptedDomain> {
    let kind = match d.kind.get_ref().as_str() {
        "authoritative" => Some(DomainKind::Authoritative),
        "internal_relay" => Some(DomainKind::InternalRelay),
        other => {
            c.err(
                &d.kind,
                format!("kind '{other}' is not 'authoritative' or 'internal_relay'"),
            );
            None
        }
    };
    let text = d.domain.get_ref().trim().to_ascii_lowercase();
    let (name, subdomains) = match text.strip_prefix("*.") {
        Some(rest) => (rest.to_string(), true),
        None => (text.clone(), false),
    };
    let valid = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '-')
        });
    if !valid {
        c.err(
            &d.domain,
            format!("'{text}' is not a domain name (or *.domain)"),
        );
        return None;
    }
    Some(AcceptedDomain {
        domain: name,
        subdomains,
        kind: kind?,
    })
}

fn user(c: &mut Checker<'_>, u: &RawUser) -> User {
    let name = u.name.get_ref().trim().to_string();
    if name.is_empty() || name.contains(char::is_whitespace) {
        c.err(&u.name, "a user name is one word");
    }
    let hash = u.password_hash.get_ref().clone();
    crate::auth::password_hash(c, &u.password_hash);
    let mut allowed_senders = Vec::new();
    for s in u.allowed_senders.get_ref() {
        let t = s.get_ref().trim();
        let pattern = if t == "*" {
            Some(SenderPattern::Any)
        } else if let Some(d) = t.strip_prefix("*@") {
            ferry_smtp::Domain::parse(d)
                .ok()
                .map(|d| SenderPattern::Domain(d.normalized()))
        } else {
            ferry_smtp::Mailbox::parse(t)
                .ok()
                .map(SenderPattern::Address)
        };
        match pattern {
            Some(p) => allowed_senders.push(p),
            None => c.err(s, format!("'{t}' is not an address, *@domain or *")),
        }
    }
    if u.allowed_senders.get_ref().is_empty() {
        c.err(
            &u.allowed_senders,
            "allowed_senders is empty: list addresses, *@domain, or \"*\"",
        );
    }
    let allowed_ranges = match &u.allowed_ranges {
        Some(list) => c.ranges(list),
        None => vec![
            IpNet::V4(ipnet::Ipv4Net::default()),
            IpNet::V6(ipnet::Ipv6Net::default()),
        ],
    };
    User {
        name,
        password_hash: hash,
        allowed_senders,
        allowed_ranges,
    }
}

fn connector(c: &mut Checker<'_>, r: &RawConnector, base_dir: &Path) -> Connector {
    let name = r.name.get_ref().trim().to_string();
    if name.is_empty() {
        c.err(&r.name, "a connector needs a name");
    }
    if *r.port.get_ref() == 0 {
        c.err(&r.port, "port 0 is not a port to listen on");
    }
    let local_address = r.local_address.as_ref().and_then(|s| {
        s.get_ref()
            .trim()
            .parse::<IpAddr>()
            .map(|a| a.to_canonical())
            .ok()
            .or_else(|| {
                c.err(s, format!("'{}' is not an IP address", s.get_ref()));
                None
            })
    });
    let remote_ranges = c.ranges(r.remote_ranges.get_ref());
    if r.remote_ranges.get_ref().is_empty() {
        c.err(
            &r.remote_ranges,
            "remote_ranges is empty: this connector would match no client",
        );
    }
    let mut seen = Vec::new();
    for (s, net) in r.remote_ranges.get_ref().iter().zip(&remote_ranges) {
        if seen.contains(net) {
            c.err(s, format!("{net} is listed twice"));
        }
        seen.push(*net);
    }

    let mut permissions = Permissions::default();
    for p in &r.permissions {
        match p.get_ref().as_str() {
            "anonymous" => permissions.anonymous = true,
            "accept_any_recipient" => permissions.accept_any_recipient = true,
            "users" => permissions.users = true,
            other => c.err(
                p,
                format!(
                    "permission '{other}' is not 'anonymous', 'accept_any_recipient' or 'users'"
                ),
            ),
        }
    }
    let mut auth = AuthSettings::default();
    for a in &r.auth {
        match a.get_ref().as_str() {
            "tls" => auth.starttls = true,
            "basic_auth" => auth.basic = true,
            "basic_auth_require_tls" => {
                auth.basic = true;
                auth.require_tls = true;
            }
            other => c.err(
                a,
                format!("auth '{other}' is not 'tls', 'basic_auth' or 'basic_auth_require_tls'"),
            ),
        }
    }
    if permissions.accept_any_recipient && !permissions.anonymous {
        c.err(
            &r.name,
            "permission 'accept_any_recipient' needs 'anonymous' too",
        );
    }
    if permissions.users != auth.basic {
        c.err(
            &r.name,
            "permission 'users' and auth 'basic_auth'/'basic_auth_require_tls' go together",
        );
    }
    if !permissions.anonymous && !permissions.users {
        c.err(
            &r.name,
            "a connector needs permission 'anonymous' or 'users'",
        );
    }
    if auth.require_tls && !auth.starttls {
        c.err(&r.name, "auth 'basic_auth_require_tls' needs auth 'tls'");
    }
    let tls = match (&r.tls, auth.starttls) {
        (Some(t), true) => {
            let t = t.get_ref();
            let min_version = match t.min_version.as_ref().map(|v| (v, v.get_ref().as_str())) {
                None | Some((_, "1.2")) => TlsVersion::Tls12,
                Some((_, "1.3")) => TlsVersion::Tls13,
                Some((v, other)) => {
                    c.err(
                        v,
                        format!("min_version '{other}' is not \"1.2\" or \"1.3\""),
                    );
                    TlsVersion::Tls12
                }
            };
            Some(TlsSettings {
                certificate: base_dir.join(&t.certificate),
                key: base_dir.join(&t.key),
                min_version,
            })
        }
        (None, true) => {
            c.err(
                &r.name,
                "auth 'tls' needs a [connectors.tls] certificate and key",
            );
            None
        }
        (Some(t), false) => {
            c.err(t, "TLS settings given but auth does not list 'tls'");
            None
        }
        (None, false) => None,
    };
    let protocol_log = match r.protocol_log.as_ref().map(|p| (p, p.get_ref().as_str())) {
        None | Some((_, "none")) => ProtocolLog::None,
        Some((_, "verbose")) => ProtocolLog::Verbose,
        Some((p, other)) => {
            c.err(
                p,
                format!("protocol_log '{other}' is not 'none' or 'verbose'"),
            );
            ProtocolLog::None
        }
    };
    let banner = match &r.banner {
        Some(b) if b.get_ref().contains(['\r', '\n']) => {
            c.err(b, "a banner is one line");
            String::new()
        }
        Some(b) => b.get_ref().clone(),
        None => format!("Ferry ESMTP {name} ready"),
    };
    let d = Limits::default();
    let l = &r.limits;
    let limits = Limits {
        max_message_size: c.size(&l.max_message_size, d.max_message_size),
        max_header_size: c.size(&l.max_header_size, d.max_header_size),
        max_recipients: c.count(&l.max_recipients, d.max_recipients),
        max_connections: c.count(&l.max_connections, d.max_connections),
        max_connections_per_source: c
            .count(&l.max_connections_per_source, d.max_connections_per_source),
        connection_timeout: c.duration(&l.connection_timeout, d.connection_timeout),
        command_timeout: c.duration(&l.command_timeout, d.command_timeout),
        data_timeout: c.duration(&l.data_timeout, d.data_timeout),
        max_protocol_errors: c.count(&l.max_protocol_errors, d.max_protocol_errors),
        tarpit: c.duration_or_zero(&l.tarpit, d.tarpit),
        max_hop_count: c.count(&l.max_hop_count, d.max_hop_count),
    };
    Connector {
        name,
        port: *r.port.get_ref(),
        local_address,
        remote_ranges,
        permissions,
        auth,
        tls,
        banner,
        limits,
        protocol_log,
        add_missing_headers: r.add_missing_headers.unwrap_or(true),
        backlog: c.backlog(&r.backlog),
    }
}

/// Connectors that share a port and a binding must not claim the same
/// remote range: the most specific range decides, and equal ranges would
/// leave a tie. (Two CIDR ranges either nest or are disjoint, so equality
/// is the only ambiguity.)
fn overlaps(c: &mut Checker<'_>, raw: &[Spanned<RawConnector>], connectors: &[Arc<Connector>]) {
    let mut claimed: HashMap<(u16, Option<IpAddr>, IpNet), &str> = HashMap::new();
    for (conn, rc) in connectors.iter().zip(raw) {
        for (net, at) in conn
            .remote_ranges
            .iter()
            .zip(rc.get_ref().remote_ranges.get_ref())
        {
            let key = (conn.port, conn.local_address, *net);
            match claimed.get(&key) {
                Some(other) if !other.eq_ignore_ascii_case(&conn.name) => c.err(
                    at,
                    format!(
                        "remote range {net} on port {} is also claimed by connector '{other}': \
                         connectors sharing a port need distinct ranges",
                        conn.port
                    ),
                ),
                _ => {
                    claimed.insert(key, &conn.name);
                }
            }
        }
    }
}

impl ClusterConfig {
    /// Parses and validates a config. `file` names it in errors; relative
    /// certificate paths are taken from `base_dir`.
    pub fn parse(file: &str, text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        parse(file, text, base_dir)
    }

    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        parse(&path.display().to_string(), &text, base)
    }
}
