//! From a name to a greeted connection: the name's addresses (A and AAAA,
//! or given), raced as RFC 8305 "happy eyeballs" does, the first to greet
//! with `220` kept.
//!
//! Devices that use a relay pool's DNS round-robin name often try one
//! address and give up; this tries them all. An attempt is a TCP connect,
//! implicit TLS where asked, and the greeting: an address that accepts
//! but never greets is as dead as one that refuses. The next address
//! starts when the one before fails, or after a short head start
//! ([`crate::ATTEMPT_DELAY`]) while it is still pending; the first
//! greeting wins and the attempts still pending are dropped.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ferry_smtp::client::ReplyReader;
use ferry_smtp::Reply;
use hickory_resolver::proto::rr::RecordType;
use hickory_resolver::TokioResolver;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};

use crate::io::{read_reply, Line, Stream};
use crate::session::Session;
use crate::tls::{server_name, TlsMode};
use crate::{Error, Settings, ATTEMPT_DELAY};

/// How long a QUIT after a refusing greeting may take (seconds: 2).
const QUIT_AFTER_REFUSAL: Duration = Duration::from_secs(2);

/// RFC 8305 §3 "Resolution Delay": when the A answer comes first, how
/// long the AAAA answer is waited for.
const RESOLUTION_DELAY: Duration = Duration::from_millis(50);

/// Where a session goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// A name or an IP literal; a certificate must carry it.
    pub host: String,
    pub port: u16,
    /// The addresses to try instead of asking DNS (already resolved MX
    /// hosts, or `ferry send --resolve`), in order.
    pub addresses: Option<Vec<IpAddr>>,
    /// How errors name the server; `host[ip]:port` by default, as Postfix
    /// logs it (`ip:port` when the host is an IP literal).
    pub label: Option<String>,
}

impl Target {
    /// `host` on `port`, its addresses from DNS.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            addresses: None,
            label: None,
        }
    }

    /// One address, without DNS.
    pub fn address(addr: SocketAddr) -> Self {
        Self {
            host: addr.ip().to_string(),
            port: addr.port(),
            addresses: Some(vec![addr.ip()]),
            label: None,
        }
    }

    fn label_for(&self, addr: SocketAddr) -> String {
        if let Some(label) = &self.label {
            return label.clone();
        }
        match self.host.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(_) => addr.to_string(),
            Err(_) => format!("{}[{}]:{}", self.host, addr.ip(), addr.port()),
        }
    }
}

/// One address that did not give a session, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub addr: SocketAddr,
    pub failure: AttemptFailure,
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.addr, self.failure)
    }
}

/// Why an address did not give a session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttemptFailure {
    /// The TCP connect failed (refused, unreachable, source not local).
    Connect(String),
    /// No TCP connection within the connect timeout.
    ConnectTimeout(Duration),
    /// Connected, but sending the preamble or the TLS handshake failed.
    Setup(String),
    /// Connected, and the connection closed or said something other than
    /// an SMTP reply before any greeting.
    NoGreeting(String),
    /// Connected, and no greeting within the greeting timeout.
    GreetingTimeout(Duration),
    /// Greeted with something other than `220` (`421`: not taking
    /// sessions now; `554`: not for this client).
    Greeted(Reply),
    /// Still waiting for its greeting when another address greeted.
    Overtaken { waited: Duration, by: SocketAddr },
    /// Not of the source address's family.
    WrongFamily,
}

impl AttemptFailure {
    /// The reason alone, without the address.
    pub fn reason(&self) -> String {
        match self {
            AttemptFailure::Connect(e) => e.clone(),
            AttemptFailure::ConnectTimeout(_) => "timed out".into(),
            AttemptFailure::Setup(e) | AttemptFailure::NoGreeting(e) => e.clone(),
            AttemptFailure::GreetingTimeout(_) => "timed out waiting for a reply".into(),
            AttemptFailure::Greeted(reply) => reply.to_string(),
            other => other.to_string(),
        }
    }
}

impl fmt::Display for AttemptFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptFailure::Connect(e) => write!(f, "connect failed: {e}"),
            AttemptFailure::ConnectTimeout(d) => write!(f, "no connection within {d:?}"),
            AttemptFailure::Setup(e) => write!(f, "connected, then {e}"),
            AttemptFailure::NoGreeting(e) => write!(f, "connected, no greeting: {e}"),
            AttemptFailure::GreetingTimeout(d) => {
                write!(f, "connected, no greeting within {d:?}")
            }
            AttemptFailure::Greeted(reply) => write!(f, "greeted with {reply}"),
            AttemptFailure::Overtaken { waited, by } => write!(
                f,
                "connected, no greeting after {} ms; {by} greeted first",
                waited.as_millis()
            ),
            AttemptFailure::WrongFamily => write!(f, "not of the source address's family"),
        }
    }
}

/// A resolver with the system's settings (`/etc/resolv.conf`,
/// `/etc/hosts`). Built for each lookup rather than kept for the process:
/// its connections belong to the runtime that made them, and a process
/// may run several runtimes one after the other (tests do). Only names
/// need it; addresses given or literal never do.
fn system_resolver() -> Result<TokioResolver, String> {
    TokioResolver::builder_tokio()
        .map_err(|e| e.to_string())?
        .build()
        .map_err(|e| e.to_string())
}

/// The addresses of `target`, in the order to try them.
async fn addresses(target: &Target) -> Result<Vec<IpAddr>, Error> {
    if let Some(given) = &target.addresses {
        return Ok(interleave(given));
    }
    if let Ok(ip) = target.host.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let failed = |reason: String| Error::Resolve {
        name: target.host.clone(),
        reason,
    };
    let resolver = system_resolver().map_err(failed)?;
    let name = target.host.as_str();
    let v6 = resolver.lookup(name, RecordType::AAAA);
    let v4 = resolver.lookup(name, RecordType::A);
    tokio::pin!(v6, v4);
    // RFC 8305 §3: AAAA first if it comes first; an A answer waits a
    // little for the AAAA one, not for ever.
    let (v6, v4) = tokio::select! {
        r6 = &mut v6 => (Some(r6), v4.await),
        r4 = &mut v4 => (timeout(RESOLUTION_DELAY, v6).await.ok(), r4),
    };
    let mut found = Vec::new();
    let mut errors = Vec::new();
    for lookup in [v6, Some(v4)].into_iter().flatten() {
        match lookup {
            Ok(lookup) => found.extend(
                hickory_resolver::lookup_ip::LookupIp::from(lookup)
                    .iter()
                    .filter(|ip| !found.contains(ip))
                    .collect::<Vec<_>>(),
            ),
            Err(e) if e.is_no_records_found() => {}
            Err(e) => errors.push(e.to_string()),
        }
    }
    if found.is_empty() {
        let reason = errors
            .first()
            .cloned()
            .unwrap_or_else(|| "no A or AAAA record".into());
        return Err(failed(reason));
    }
    // DNS gave no preference between families: IPv6 first (RFC 8305 §4).
    found.sort_by_key(|ip| ip.is_ipv4());
    Ok(interleave(&found))
}

/// RFC 8305 §4: alternate the families, starting with the first
/// address's; the order within a family is kept.
fn interleave(addresses: &[IpAddr]) -> Vec<IpAddr> {
    let Some(first) = addresses.first() else {
        return Vec::new();
    };
    let (mut same, mut other): (Vec<IpAddr>, Vec<IpAddr>) = addresses
        .iter()
        .partition(|ip| ip.is_ipv4() == first.is_ipv4());
    same.reverse();
    other.reverse();
    let mut out = Vec::with_capacity(addresses.len());
    while !same.is_empty() || !other.is_empty() {
        out.extend(same.pop());
        out.extend(other.pop());
    }
    out
}

/// What every attempt of one connect shares.
struct Setup {
    target: Target,
    settings: Settings,
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
}

impl Setup {
    fn note(&self, text: &str) {
        if let Some(t) = &self.settings.transcript {
            t.line(Line::Note(text));
        }
    }
}

/// Connects to the first address of `target` that greets with `220`
/// (RFC 8305 racing, see the module's text). The session has its
/// greeting and nothing more; [`Session::failed_attempts`] lists the
/// addresses that did not make it.
///
/// # Errors
/// [`Error::Resolve`] when the name has no address, [`Error::Unreachable`]
/// (every attempt with its reason) when none greeted, [`Error::Local`]
/// for bad TLS settings.
pub async fn connect(target: &Target, settings: &Settings) -> Result<Session, Error> {
    let addresses = addresses(target).await?;
    let tls = if settings.tls.mode == TlsMode::Implicit {
        let name = server_name(&target.host).map_err(|e| Error::Tls {
            peer: target.host.clone(),
            reason: e,
        })?;
        Some((settings.tls.verify.client_config()?, name))
    } else {
        None
    };
    let setup = Arc::new(Setup {
        target: target.clone(),
        settings: settings.clone(),
        tls,
    });
    let mut failures = Vec::new();
    let usable: Vec<IpAddr> = addresses
        .into_iter()
        .filter(|ip| {
            let fits = settings.source.is_none_or(|s| s.is_ipv4() == ip.is_ipv4());
            if !fits {
                failures.push(Attempt {
                    addr: SocketAddr::new(*ip, target.port),
                    failure: AttemptFailure::WrongFamily,
                });
            }
            fits
        })
        .collect();
    let unreachable = |attempts| Error::Unreachable {
        server: format!("{}:{}", target.host, target.port),
        attempts,
    };
    // One address: no race, no task.
    if let [only] = usable.as_slice() {
        let addr = SocketAddr::new(*only, target.port);
        return match attempt(Arc::clone(&setup), addr).await {
            Ok(session) => Ok(session.connected(failures)),
            Err(failure) => {
                failures.push(Attempt { addr, failure });
                Err(unreachable(failures))
            }
        };
    }
    let delay = settings.attempt_delay.unwrap_or(ATTEMPT_DELAY);
    let mut queue = usable
        .into_iter()
        .map(|ip| SocketAddr::new(ip, target.port));
    let mut next = queue.next();
    let mut running = JoinSet::new();
    let mut pending: HashMap<tokio::task::Id, (SocketAddr, Instant)> = HashMap::new();
    let mut start_next_at = Instant::now();
    loop {
        if running.is_empty() || Instant::now() >= start_next_at {
            match next.take() {
                Some(addr) => {
                    let id = running.spawn(attempt(Arc::clone(&setup), addr)).id();
                    pending.insert(id, (addr, Instant::now()));
                    next = queue.next();
                    start_next_at = Instant::now() + delay;
                }
                None if running.is_empty() => return Err(unreachable(failures)),
                None => {}
            }
        }
        let joined = tokio::select! {
            joined = running.join_next_with_id() => joined,
            _ = tokio::time::sleep_until(start_next_at), if next.is_some() => continue,
        };
        let (id, result) = match joined {
            Some(Ok((id, result))) => (id, result),
            Some(Err(e)) => (e.id(), Err(AttemptFailure::Setup(e.to_string()))),
            None => continue,
        };
        let Some((addr, _)) = pending.remove(&id) else {
            continue;
        };
        match result {
            Ok(session) => {
                for (other, since) in pending.into_values() {
                    let failure = AttemptFailure::Overtaken {
                        waited: since.elapsed(),
                        by: addr,
                    };
                    setup.note(&format!("{other}: {failure}"));
                    failures.push(Attempt {
                        addr: other,
                        failure,
                    });
                }
                running.abort_all();
                return Ok(session.connected(failures));
            }
            Err(failure) => {
                failures.push(Attempt { addr, failure });
                // RFC 8305 §5: a failure starts the next attempt at once.
                start_next_at = Instant::now();
            }
        }
    }
}

/// One address: connect (from the source address, if set), the preamble,
/// implicit TLS, the greeting.
async fn attempt(setup: Arc<Setup>, addr: SocketAddr) -> Result<Session, AttemptFailure> {
    let s = &setup.settings;
    setup.note(&format!("Trying {addr}..."));
    let result = async {
        let tcp = match timeout(s.timeouts.connect, tcp_connect(addr, s.source)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(AttemptFailure::Connect(e.to_string())),
            Err(_) => return Err(AttemptFailure::ConnectTimeout(s.timeouts.connect)),
        };
        let _ = tcp.set_nodelay(true);
        let mut tcp = tcp;
        if let Some(preamble) = &s.preamble {
            match timeout(s.timeouts.command, tcp.write_all(preamble)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(AttemptFailure::Setup(format!("write failed: {e}"))),
                Err(_) => return Err(AttemptFailure::Setup("write timed out".into())),
            }
        }
        let mut stream = match &setup.tls {
            None => Stream::Plain(tcp),
            Some((config, name)) => {
                let handshake =
                    tokio_rustls::TlsConnector::from(Arc::clone(config)).connect(name.clone(), tcp);
                match timeout(s.timeouts.connect, handshake).await {
                    Ok(Ok(tls)) => Stream::Tls(Box::new(tls)),
                    Ok(Err(e)) => return Err(AttemptFailure::Setup(format!("TLS failed: {e}"))),
                    Err(_) => return Err(AttemptFailure::Setup("TLS handshake timed out".into())),
                }
            }
        };
        let mut reader = ReplyReader::new();
        let greeting =
            match timeout(s.timeouts.greeting, read_reply(&mut stream, &mut reader)).await {
                Ok(Ok(reply)) => reply,
                Ok(Err(e)) => return Err(AttemptFailure::NoGreeting(e.to_string())),
                Err(_) => return Err(AttemptFailure::GreetingTimeout(s.timeouts.greeting)),
            };
        if greeting.code() != 220 {
            // RFC 5321 §3.1: a server that greets with 554 waits for QUIT
            // before it closes; say it, briefly, and move on.
            let quit = async {
                stream.write_all(b"QUIT\r\n").await?;
                stream.flush().await?;
                read_reply(&mut stream, &mut reader)
                    .await
                    .map_err(std::io::Error::other)
            };
            let _ = timeout(QUIT_AFTER_REFUSAL, quit).await;
            return Err(AttemptFailure::Greeted(greeting));
        }
        Ok(Session::new(
            stream,
            reader,
            addr,
            setup.target.label_for(addr),
            setup.target.host.clone(),
            greeting,
            s,
        ))
    }
    .await;
    if let Err(failure) = &result {
        setup.note(&format!("{addr}: {failure}"));
    }
    result
}

/// A TCP connection to `addr`, from `source` (any port) if given.
async fn tcp_connect(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(addr).await;
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(source, 0)).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot bind source address {source}: {e}"),
        )
    })?;
    socket.connect(addr).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn families_alternate_from_the_first_address() {
        assert_eq!(
            interleave(&ips(&["::1", "::2", "::3", "10.0.0.1", "10.0.0.2"])),
            ips(&["::1", "10.0.0.1", "::2", "10.0.0.2", "::3"])
        );
        assert_eq!(
            interleave(&ips(&["10.0.0.1", "10.0.0.2", "::1"])),
            ips(&["10.0.0.1", "::1", "10.0.0.2"])
        );
        assert_eq!(
            interleave(&ips(&["127.0.0.61", "127.0.0.62", "127.0.0.12"])),
            ips(&["127.0.0.61", "127.0.0.62", "127.0.0.12"])
        );
        assert!(interleave(&[]).is_empty());
    }

    #[test]
    fn labels_as_postfix_logs_them() {
        let addr: SocketAddr = "192.0.2.1:25".parse().unwrap();
        assert_eq!(
            Target::new("mx.example", 25).label_for(addr),
            "mx.example[192.0.2.1]:25"
        );
        assert_eq!(Target::address(addr).label_for(addr), "192.0.2.1:25");
    }
}
