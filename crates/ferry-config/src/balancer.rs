//! The balancer's part of the cluster config: its listeners, the workers
//! behind it, the client access list, and the SMTP probes.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalancerConfig {
    pub listeners: Vec<BalancerListener>,
    pub backends: Vec<Backend>,
    pub access: AccessList,
    /// Client connections at once over all listeners (`421 4.3.2` beyond).
    pub max_connections: u32,
    /// Connections at once from one client address (`421 4.3.2` beyond).
    pub max_connections_per_source: u32,
    /// How long a worker has to greet with `220` after the PROXY header.
    pub handoff_timeout: Duration,
    /// A relayed connection with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    pub probe: ProbeSettings,
    /// The local address the balancer's connections to workers (sessions
    /// and probes) come from, as HAProxy's `source`; `None` lets the
    /// system choose. Workers list it in `trusted_proxies`; a dedicated
    /// address keeps other local clients from being taken for the balancer.
    pub source: Option<IpAddr>,
}

/// A port the balancer listens on, and the workers' port it forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalancerListener {
    pub name: String,
    pub port: u16,
    pub backend_port: u16,
    /// Send PROXY v2 to the workers (and LOCAL on probes). Off only for
    /// backends that do not speak it.
    pub proxy_protocol: bool,
    /// Connections the kernel may hold completed and not yet accepted
    /// (`listen(2)`'s backlog, capped by `net.core.somaxconn`).
    pub backlog: u32,
}

/// A worker node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub name: String,
    pub address: IpAddr,
    pub weight: u32,
}

/// Probe schedule: a worker goes down after `fall` failed probes in a row
/// and comes back after `rise` good ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSettings {
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
            rise: 2,
            fall: 2,
        }
    }
}

/// Allow and deny ranges; the longest prefix holding the client decides,
/// deny wins a tie, and a client no range holds is denied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessList {
    rules: Vec<(IpNet, bool)>,
}

impl AccessList {
    pub fn new(allow: &[IpNet], deny: &[IpNet]) -> Self {
        let mut rules: Vec<(IpNet, bool)> = allow.iter().map(|n| (*n, true)).collect();
        rules.extend(deny.iter().map(|n| (*n, false)));
        Self { rules }
    }

    pub fn allows(&self, client: IpAddr) -> bool {
        self.rule_for(client).is_some_and(|(_, allow)| allow)
    }

    /// The range that decides for `client` and whether it allows.
    pub fn rule_for(&self, client: IpAddr) -> Option<(IpNet, bool)> {
        let client = client.to_canonical();
        self.rules
            .iter()
            .filter(|(net, _)| net.contains(&client))
            .max_by_key(|(net, allow)| (net.prefix_len(), !allow))
            .copied()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn longest_prefix_wins_and_deny_breaks_ties() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let acl = AccessList::new(
            &[net("10.0.0.0/8"), net("10.1.2.3/32"), net("2001:db8::/32")],
            &[net("10.1.0.0/16"), net("10.9.0.0/16")],
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(acl.allows(ip("10.2.0.1")));
        assert!(!acl.allows(ip("10.1.0.1")));
        assert!(acl.allows(ip("10.1.2.3")));
        assert!(acl.allows(ip("::ffff:10.2.0.1")));
        assert!(acl.allows(ip("2001:db8::1")));
        assert!(!acl.allows(ip("192.0.2.1")));
        let tie = AccessList::new(&[net("10.0.0.0/8")], &[net("10.0.0.0/8")]);
        assert!(!tie.allows(ip("10.0.0.1")));
    }
}
