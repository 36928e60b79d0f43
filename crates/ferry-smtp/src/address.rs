//! Envelope addresses (RFC 5321 §4.1.2, with RFC 6531's UTF-8 extension).
//!
//! One type for every place an address goes: the session parses it, the
//! relay policy and routes look at its parts, the spool stores it, DSNs and
//! the tracking log name it, and the delivery client writes it to the next
//! hop. [`Mailbox`]'s `Display` is the single way back to the wire: it is
//! always a valid `Mailbox` production, so `<{mailbox}>` is a valid path and
//! nothing inside a quoted local part can end the path or start a
//! parameter.
//!
//! A relay keeps an address as the client wrote it (RFC 5321 §2.4: the
//! local part is the receiving domain's business, case included), so the
//! local part is kept verbatim, quotes and escapes too. Comparisons for
//! policy and routing use [`Mailbox::local_part_text`] (the unquoted text)
//! and [`Domain::normalized`] (lower case).
//!
//! What is accepted beyond the strict grammar, as careful servers do:
//! - a source route (`<@a,@b:user@c>`) is parsed and dropped (RFC 5321
//!   §4.1.1.3 and appendix C: the route SHOULD be ignored);
//! - one trailing dot on a domain (`user@example.test.`) is dropped, since
//!   RFC 5321's `Domain` has none and a next hop may refuse it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest path, angle brackets excluded (RFC 5321 §4.5.3.1.3 allows
/// 256 octets with them; we allow the content that long, as smtp-proto did).
pub const MAX_PATH: usize = 256;
/// The longest domain (RFC 5321 §4.5.3.1.2).
pub const MAX_DOMAIN: usize = 255;
/// The longest label of a domain (RFC 1035 §2.3.4).
const MAX_LABEL: usize = 63;

/// Why an address did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    #[error("empty address")]
    Empty,
    #[error("address too long")]
    TooLong,
    #[error("no @ between local part and domain")]
    MissingAt,
    #[error("invalid local part")]
    LocalPart,
    #[error("invalid domain")]
    Domain,
    #[error("invalid address literal")]
    AddressLiteral,
    #[error("invalid source route")]
    SourceRoute,
    #[error("address is not UTF-8")]
    NotUtf8,
}

/// The part after `@`: a domain name or an address literal (§4.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Domain {
    /// As written, without a trailing dot.
    Name(String),
    /// `[192.0.2.1]` or `[IPv6:2001:db8::1]`: `text` is as written, brackets
    /// included.
    Literal { ip: IpAddr, text: String },
}

impl Domain {
    /// Parses a domain or an address literal.
    ///
    /// # Errors
    /// [`AddressError::Domain`] for a name that is not `sub-domain *("."
    /// sub-domain)` (letters, digits and hyphens, or UTF-8 U-labels per RFC
    /// 6531), [`AddressError::AddressLiteral`] for a literal that is not
    /// IPv4 or `IPv6:` (general literals have no registered tag to use).
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        if let Some(inner) = s.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .ok_or(AddressError::AddressLiteral)?;
            let ip = match inner.get(..5) {
                Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => inner
                    .get(5..)
                    .and_then(|a| a.parse::<Ipv6Addr>().ok())
                    .map(IpAddr::V6),
                _ => inner.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
            }
            .ok_or(AddressError::AddressLiteral)?;
            return Ok(Domain::Literal {
                ip,
                text: s.to_string(),
            });
        }
        let name = s.strip_suffix('.').unwrap_or(s);
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= MAX_LABEL
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
        };
        if name.is_empty() || name.len() > MAX_DOMAIN || !name.split('.').all(label_ok) {
            return Err(AddressError::Domain);
        }
        Ok(Domain::Name(name.to_string()))
    }

    /// The form policy and routing compare: a name in lower case, and a
    /// name with UTF-8 labels as its A-labels after UTS #46 mapping (what
    /// DNS resolves, so `bücher.test` is `xn--bcher-kva.test` to routes and
    /// accepted domains too); a literal as `[192.0.2.1]` or
    /// `[IPv6:2001:db8::1]` (canonical text).
    pub fn normalized(&self) -> String {
        match self {
            Domain::Name(n) if n.is_ascii() => n.to_ascii_lowercase(),
            Domain::Name(n) => idna::domain_to_ascii(n).unwrap_or_else(|_| n.to_lowercase()),
            Domain::Literal { ip, .. } => literal_text(*ip),
        }
    }

    /// The address of a literal, `None` for a name.
    pub fn literal(&self) -> Option<IpAddr> {
        match self {
            Domain::Literal { ip, .. } => Some(*ip),
            Domain::Name(_) => None,
        }
    }
}

/// The canonical address-literal text for an IP (RFC 5321 §4.1.3).
pub fn literal_text(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Domain::Name(n) => f.write_str(n),
            Domain::Literal { text, .. } => f.write_str(text),
        }
    }
}

/// `Local-part "@" ( Domain / address-literal )`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mailbox {
    /// As written: a dot-string, or a quoted string with its quotes and
    /// escapes.
    local_part: String,
    domain: Domain,
}

impl Mailbox {
    /// Parses `local@domain` (no angle brackets, no source route).
    ///
    /// # Errors
    /// The [`AddressError`] naming the part that is wrong.
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        if s.is_empty() {
            return Err(AddressError::Empty);
        }
        if s.len() > MAX_PATH {
            return Err(AddressError::TooLong);
        }
        let at = local_part_end(s)?;
        let (local, rest) = s.split_at(at);
        let domain = rest.strip_prefix('@').ok_or(AddressError::MissingAt)?;
        Ok(Mailbox {
            local_part: local.to_string(),
            domain: Domain::parse(domain)?,
        })
    }

    /// A mailbox from an unquoted local-part text and a domain, quoting the
    /// local part where RFC 5321 needs it (a space, `"`, `@`, a leading or
    /// doubled dot, ...).
    ///
    /// # Errors
    /// [`AddressError::LocalPart`] for an empty text or one holding a
    /// control character, which no quoted string can carry.
    pub fn from_parts(local_text: &str, domain: Domain) -> Result<Self, AddressError> {
        if is_dot_string(local_text) {
            return Ok(Mailbox {
                local_part: local_text.to_string(),
                domain,
            });
        }
        if local_text.is_empty() || local_text.chars().any(|c| c.is_ascii_control()) {
            return Err(AddressError::LocalPart);
        }
        let mut quoted = String::with_capacity(local_text.len() + 2);
        quoted.push('"');
        for c in local_text.chars() {
            if c == '"' || c == '\\' {
                quoted.push('\\');
            }
            quoted.push(c);
        }
        quoted.push('"');
        Ok(Mailbox {
            local_part: quoted,
            domain,
        })
    }

    /// `postmaster@domain` (RFC 5321 §4.5.1).
    pub fn postmaster(domain: Domain) -> Self {
        Mailbox {
            local_part: "postmaster".into(),
            domain,
        }
    }

    /// The local part as written (quotes and escapes kept).
    pub fn local_part(&self) -> &str {
        &self.local_part
    }

    /// The local part's text: quotes removed, escapes resolved. What policy
    /// compares, and where sender-specified routing (`@`, `%`, `!`) shows.
    pub fn local_part_text(&self) -> String {
        let Some(inner) = self
            .local_part
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
        else {
            return self.local_part.clone();
        };
        let mut out = String::with_capacity(inner.len());
        let mut escaped = false;
        for c in inner.chars() {
            if c == '\\' && !escaped {
                escaped = true;
                continue;
            }
            escaped = false;
            out.push(c);
        }
        out
    }

    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// Any octet outside ASCII: such an address needs SMTPUTF8 (RFC 6531).
    pub fn is_ascii(&self) -> bool {
        self.local_part.is_ascii()
            && match &self.domain {
                Domain::Name(n) => n.is_ascii(),
                Domain::Literal { .. } => true,
            }
    }

    /// Sender-specified routing in the local part (`user%elsewhere`,
    /// `host!user`, `"user@elsewhere"`), which Postfix refuses by default
    /// from clients that may not relay.
    pub fn has_sender_routing(&self) -> bool {
        self.local_part_text().contains(['%', '!', '@'])
    }
}

impl std::str::FromStr for Mailbox {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, AddressError> {
        Mailbox::parse(s)
    }
}

impl std::str::FromStr for ReversePath {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, AddressError> {
        ReversePath::parse(s)
    }
}

impl fmt::Display for Mailbox {
    /// The wire form `local@domain`: the one way an address is written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local_part, self.domain)
    }
}

/// Each mailbox once, in first-seen order, however it was written: the same
/// local-part text (quoting aside; case kept, RFC 5321 §2.4, except for
/// `postmaster`, which §4.5.1 makes case-insensitive) at the same domain
/// ([`Domain::normalized`]) is one mailbox. A message goes to each mailbox
/// once.
pub fn unique_mailboxes(mailboxes: impl IntoIterator<Item = Mailbox>) -> Vec<Mailbox> {
    let mut seen = std::collections::HashSet::new();
    mailboxes
        .into_iter()
        .filter(|m| {
            let mut local = m.local_part_text();
            if local.eq_ignore_ascii_case("postmaster") {
                local.make_ascii_lowercase();
            }
            seen.insert((local, m.domain.normalized()))
        })
        .collect()
}

/// MAIL FROM's reverse-path: a mailbox or the null sender `<>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum ReversePath {
    /// `<>`: bounces and other notifications (RFC 5321 §4.5.5).
    #[default]
    Null,
    Mailbox(Mailbox),
}

impl ReversePath {
    /// Parses the content between `<` and `>` (empty for the null sender).
    ///
    /// # Errors
    /// As [`Mailbox::parse`], and [`AddressError::SourceRoute`].
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        if s.is_empty() {
            return Ok(ReversePath::Null);
        }
        Ok(ReversePath::Mailbox(Mailbox::parse(strip_route(s)?)?))
    }

    pub fn mailbox(&self) -> Option<&Mailbox> {
        match self {
            ReversePath::Null => None,
            ReversePath::Mailbox(m) => Some(m),
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, ReversePath::Null)
    }
}

impl fmt::Display for ReversePath {
    /// The path's content: empty for the null sender.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => Ok(()),
            ReversePath::Mailbox(m) => m.fmt(f),
        }
    }
}

/// RCPT TO's forward-path: a mailbox, or the bare `<Postmaster>` that every
/// SMTP server must accept (RFC 5321 §4.5.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ForwardPath {
    Postmaster,
    Mailbox(Mailbox),
}

impl ForwardPath {
    /// Parses the content between `<` and `>`.
    ///
    /// # Errors
    /// As [`Mailbox::parse`], and [`AddressError::SourceRoute`].
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        if s.eq_ignore_ascii_case("postmaster") {
            return Ok(ForwardPath::Postmaster);
        }
        Ok(ForwardPath::Mailbox(Mailbox::parse(strip_route(s)?)?))
    }
}

impl fmt::Display for ForwardPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardPath::Postmaster => f.write_str("Postmaster"),
            ForwardPath::Mailbox(m) => m.fmt(f),
        }
    }
}

/// Drops an `A-d-l ":"` source route (RFC 5321 §4.1.2).
fn strip_route(s: &str) -> Result<&str, AddressError> {
    if !s.starts_with('@') {
        return Ok(s);
    }
    let (route, rest) = s.split_once(':').ok_or(AddressError::SourceRoute)?;
    for hop in route.split(',') {
        let domain = hop.strip_prefix('@').ok_or(AddressError::SourceRoute)?;
        Domain::parse(domain).map_err(|_| AddressError::SourceRoute)?;
    }
    Ok(rest)
}

/// RFC 5321 `atext` (RFC 5322 §3.2.3), widened to UTF-8 by RFC 6531.
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

fn is_dot_string(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// Where the local part at the start of `s` ends (the index of its `@`).
fn local_part_end(s: &str) -> Result<usize, AddressError> {
    if let Some(quoted) = s.strip_prefix('"') {
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            match c {
                // quoted-pairSMTP: backslash then %d32-126 (or UTF-8).
                _ if escaped => {
                    if c.is_ascii_control() {
                        return Err(AddressError::LocalPart);
                    }
                    escaped = false;
                }
                '\\' => escaped = true,
                '"' => {
                    let end = i + 2;
                    return match s.get(end..end + 1) {
                        Some("@") => Ok(end),
                        Some(_) => Err(AddressError::LocalPart),
                        None => Err(AddressError::MissingAt),
                    };
                }
                // qtextSMTP: %d32-33 / %d35-91 / %d93-126 (and UTF-8).
                _ if c.is_ascii_control() => return Err(AddressError::LocalPart),
                _ => {}
            }
        }
        return Err(AddressError::LocalPart);
    }
    let at = s.rfind('@').ok_or(AddressError::MissingAt)?;
    let local = s.get(..at).unwrap_or_default();
    if local.is_empty() {
        return Err(AddressError::LocalPart);
    }
    if !is_dot_string(local) {
        return Err(AddressError::LocalPart);
    }
    Ok(at)
}

impl Serialize for Mailbox {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mailbox {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        stored_mailbox(&text).map_err(serde::de::Error::custom)
    }
}

/// A mailbox read back from storage, never refused for its syntax: mail
/// that was acknowledged must not be lost because a later version parses
/// more strictly. Spools written before addresses kept their quotes hold
/// the unquoted text (`odd user@example.test`), which is re-quoted; a
/// domain or local part the parser now refuses (the old parser took `_` in
/// domains) is kept as it was stored.
///
/// # Errors
/// [`AddressError::MissingAt`] for text without `@`, which no version
/// stored as a mailbox.
fn stored_mailbox(text: &str) -> Result<Mailbox, AddressError> {
    if let Ok(m) = Mailbox::parse(text) {
        return Ok(m);
    }
    let (local, domain) = text.rsplit_once('@').ok_or(AddressError::MissingAt)?;
    let domain = Domain::parse(domain).unwrap_or_else(|_| Domain::Name(domain.to_string()));
    Ok(
        Mailbox::from_parts(local, domain.clone()).unwrap_or_else(|_| Mailbox {
            local_part: local.to_string(),
            domain,
        }),
    )
}

impl Serialize for ReversePath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ReversePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(ReversePath::Null);
        }
        stored_mailbox(&text)
            .map(ReversePath::Mailbox)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(s: &str) -> Mailbox {
        Mailbox::parse(s).unwrap()
    }

    #[test]
    fn quoted_local_parts_are_kept_as_written() {
        let m = mb(r#""odd user"@example.test"#);
        assert_eq!(m.to_string(), r#""odd user"@example.test"#);
        assert_eq!(m.local_part_text(), "odd user");
        let m = mb(r#""a>x"@example.test"#);
        assert_eq!(m.to_string(), r#""a>x"@example.test"#);
        let m = mb(r#""a\"b\\c@d"@example.test"#);
        assert_eq!(m.local_part_text(), r#"a"b\c@d"#);
        assert!(m.has_sender_routing());
    }

    #[test]
    fn address_literals_are_domains() {
        let m = mb("ops@[192.0.2.25]");
        assert_eq!(m.domain().literal(), Some("192.0.2.25".parse().unwrap()));
        assert_eq!(m.domain().normalized(), "[192.0.2.25]");
        let m = mb("ops@[ipv6:2001:DB8:0::25]");
        assert_eq!(m.domain().normalized(), "[IPv6:2001:db8::25]");
        assert_eq!(m.to_string(), "ops@[ipv6:2001:DB8:0::25]");
        for bad in [
            "ops@[192.0.2]",
            "ops@[300.0.0.1]",
            "ops@[IPv6:zz::1]",
            "ops@[x-tag:abc]",
            "ops@[192.0.2.1",
        ] {
            assert!(Mailbox::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn postmaster_source_routes_and_trailing_dots() {
        assert_eq!(
            ForwardPath::parse("PostMaster").unwrap(),
            ForwardPath::Postmaster
        );
        assert!(ReversePath::parse("Postmaster").is_err());
        assert_eq!(
            ForwardPath::parse("@a.test,@b.test:user@c.test").unwrap(),
            ForwardPath::Mailbox(mb("user@c.test"))
        );
        assert!(ForwardPath::parse("@a.test:").is_err());
        assert!(ForwardPath::parse("@a..test:u@c.test").is_err());
        let m = mb("User@Example.TEST.");
        assert_eq!(m.to_string(), "User@Example.TEST");
        assert_eq!(m.domain().normalized(), "example.test");
        assert_eq!(ReversePath::parse("").unwrap(), ReversePath::Null);
    }

    #[test]
    fn malformed_addresses_are_refused() {
        for bad in [
            "user",
            "@example.test",
            "user@",
            "a..b@example.test",
            ".a@example.test",
            "a.@example.test",
            "a b@example.test",
            "a\"b@example.test",
            r#""unterminated@example.test"#,
            r#""a"b@example.test"#,
            "\"a\tb\"@example.test",
            "user@exa_mple.test",
            "user@-example.test",
            "user@example..test",
            "a@b@example.test",
        ] {
            assert!(Mailbox::parse(bad).is_err(), "{bad}");
        }
        let long = format!("{}@example.test", "a".repeat(MAX_PATH));
        assert_eq!(Mailbox::parse(&long), Err(AddressError::TooLong));
    }

    #[test]
    fn utf8_addresses_parse_and_say_so() {
        let m = mb("jürgen@bücher.test");
        assert!(!m.is_ascii());
        assert_eq!(m.domain().normalized(), "xn--bcher-kva.test");
        // UTS #46 maps case and drops a soft hyphen, as DNS lookups do.
        assert_eq!(
            mb("a@BÜCHER.test").domain().normalized(),
            "xn--bcher-kva.test"
        );
        assert_eq!(
            mb("a@ex\u{ad}ample.test").domain().normalized(),
            "example.test"
        );
        assert_eq!(m.to_string(), "jürgen@bücher.test");
        assert!(mb("a@b.test").is_ascii());
    }

    #[test]
    fn from_parts_quotes_what_needs_it() {
        let d = || Domain::parse("example.test").unwrap();
        assert_eq!(
            Mailbox::from_parts("plain.user", d()).unwrap().to_string(),
            "plain.user@example.test"
        );
        assert_eq!(
            Mailbox::from_parts("odd user", d()).unwrap().to_string(),
            r#""odd user"@example.test"#
        );
        assert_eq!(
            Mailbox::from_parts(r#"a"b"#, d()).unwrap().to_string(),
            r#""a\"b"@example.test"#
        );
        assert!(Mailbox::from_parts("", d()).is_err());
        assert!(Mailbox::from_parts("a\r\nb", d()).is_err());
    }

    #[test]
    fn stored_unquoted_text_is_read_back_quoted() {
        let m: Mailbox = serde_json::from_str(r#""odd user@example.test""#).unwrap();
        assert_eq!(m.to_string(), r#""odd user"@example.test"#);
        let m: Mailbox = serde_json::from_str(r#""\"odd user\"@example.test""#).unwrap();
        assert_eq!(m.local_part_text(), "odd user");
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#""\"odd user\"@example.test""#
        );
        // The old parser took `_` in domains: still read back, as stored.
        let m: Mailbox = serde_json::from_str(r#""ops@mail_gw.corp.test""#).unwrap();
        assert_eq!(m.to_string(), "ops@mail_gw.corp.test");
        assert!(serde_json::from_str::<Mailbox>(r#""no-at-sign""#).is_err());
    }
}
