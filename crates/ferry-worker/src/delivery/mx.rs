//! Finding a domain's mail exchangers (RFC 5321 section 5.1): MX records in
//! preference order, equal preferences shuffled, the domain's own A/AAAA
//! records when it has no MX, and RFC 7505's null MX refused.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use rand::seq::SliceRandom;

/// Addresses tried per message and attempt, over all exchangers (as
/// Postfix's `smtp_mx_address_limit`).
pub const MAX_ADDRESSES: usize = 5;

/// One mail exchanger and its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchanger {
    pub name: String,
    pub addresses: Vec<IpAddr>,
}

/// Why there is nowhere to deliver; each carries the SMTP reply recorded
/// for the recipients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxError {
    /// The domain does not exist, publishes a null MX, or its exchangers
    /// have no addresses: the recipients fail.
    Permanent(String),
    /// DNS did not answer (timeout, SERVFAIL): the recipients are deferred.
    Temporary(String),
}

/// A resolver built from the config's `dns_servers`, rebuilt when they
/// change.
#[derive(Default)]
pub struct MxResolver {
    current: Mutex<Option<(Vec<SocketAddr>, TokioResolver)>>,
}

impl MxResolver {
    fn resolver(&self, servers: &[SocketAddr]) -> Result<TokioResolver, MxError> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((built_for, resolver)) = current.as_ref() {
            if built_for == servers {
                return Ok(resolver.clone());
            }
        }
        let temporary = |e: NetError| MxError::Temporary(format!("451 4.4.3 no resolver: {e}"));
        let builder = if servers.is_empty() {
            TokioResolver::builder_tokio().map_err(temporary)?
        } else {
            let name_servers = servers
                .iter()
                .map(|s| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = s.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = s.port();
                    NameServerConfig::new(s.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), name_servers),
                TokioRuntimeProvider::default(),
            )
        };
        let resolver = builder.build().map_err(temporary)?;
        *current = Some((servers.to_vec(), resolver.clone()));
        Ok(resolver)
    }

    /// The exchangers for `domain`, most preferred first.
    pub async fn exchangers(
        &self,
        servers: &[SocketAddr],
        domain: &str,
    ) -> Result<Vec<Exchanger>, MxError> {
        let resolver = self.resolver(servers)?;
        // Fully qualified: never tried under a search domain.
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let mut records: Vec<(u16, String)> = match resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                    _ => None,
                })
                .collect(),
            Err(e) if e.is_nx_domain() => {
                return Err(MxError::Permanent(format!(
                    "550 5.1.2 Host or domain name not found: {domain}"
                )))
            }
            // No MX: the domain itself is the exchanger (RFC 5321 5.1).
            Err(e) if e.is_no_records_found() => vec![(0, fqdn.clone())],
            Err(e) => {
                return Err(MxError::Temporary(format!(
                    "451 4.4.3 DNS lookup of MX for {domain} failed: {e}"
                )))
            }
        };
        let is_root = |name: &str| name == "." || name.is_empty();
        if records.iter().any(|(_, name)| is_root(name)) && records.len() == 1 {
            return Err(MxError::Permanent(format!(
                "556 5.1.10 Domain {domain} does not accept mail (null MX)"
            )));
        }
        records.retain(|(_, name)| !is_root(name));
        // Preference order; equal preferences in random order.
        records.shuffle(&mut rand::rng());
        records.sort_by_key(|(preference, _)| *preference);

        let mut exchangers = Vec::new();
        let mut temporary = None;
        let mut budget = MAX_ADDRESSES;
        for (_, name) in records {
            if budget == 0 {
                break;
            }
            match resolver.lookup_ip(name.as_str()).await {
                Ok(ips) => {
                    let addresses: Vec<IpAddr> = ips.iter().take(budget).collect();
                    budget -= addresses.len();
                    exchangers.push(Exchanger {
                        name: name.trim_end_matches('.').to_string(),
                        addresses,
                    });
                }
                Err(e) if e.is_no_records_found() => {}
                Err(e) => temporary = Some(format!("{name}: {e}")),
            }
        }
        exchangers.retain(|x| !x.addresses.is_empty());
        match (exchangers.is_empty(), temporary) {
            (false, _) => Ok(exchangers),
            (true, Some(e)) => Err(MxError::Temporary(format!(
                "451 4.4.3 DNS lookup of the exchangers for {domain} failed: {e}"
            ))),
            (true, None) => Err(MxError::Permanent(format!(
                "550 5.4.4 Unable to route: no address for any mail exchanger of {domain}"
            ))),
        }
    }
}
