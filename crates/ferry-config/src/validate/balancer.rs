//! The `[balancer]` section, and its cross-check with `trusted_proxies`.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

use super::Checker;
use crate::balancer::*;
use crate::raw::RawBalancer;

/// Validates `[balancer]`. `raw_trusted` and `trusted` are the config's
/// `trusted_proxies` as written and as parsed: a `source` the workers do
/// not trust must not send them PROXY headers.
pub(super) fn balancer(
    c: &mut Checker<'_>,
    raw: &Spanned<RawBalancer>,
    raw_trusted: &[Spanned<String>],
    trusted: &[IpNet],
) -> BalancerConfig {
    let b = raw.get_ref();
    let allow = c.ranges(&b.allow);
    let deny = c.ranges(&b.deny);
    if b.allow.is_empty() {
        c.err(
            raw,
            "balancer.allow is empty: every client would be refused",
        );
    }
    let mut listeners: Vec<BalancerListener> = Vec::new();
    for l in &b.listeners {
        let l = l.get_ref();
        if listeners.iter().any(|o| o.port == *l.port.get_ref()) {
            c.err(
                &l.port,
                format!("port {} has two balancer listeners", l.port.get_ref()),
            );
        }
        listeners.push(BalancerListener {
            name: l.name.get_ref().clone(),
            port: *l.port.get_ref(),
            backend_port: l.backend_port.unwrap_or(*l.port.get_ref()),
            proxy_protocol: l.proxy_protocol.unwrap_or(true),
            backlog: c.backlog(&l.backlog).unwrap_or(crate::DEFAULT_BACKLOG),
        });
    }
    if listeners.is_empty() {
        c.err(raw, "a balancer needs at least one [[balancer.listeners]]");
    }
    let mut backends: Vec<Backend> = Vec::new();
    for r in &b.backends {
        let r = r.get_ref();
        let Ok(address) = r.address.get_ref().parse::<IpAddr>() else {
            c.err(
                &r.address,
                format!("'{}' is not an IP address", r.address.get_ref()),
            );
            continue;
        };
        if backends.iter().any(|o| o.address == address) {
            c.err(
                &r.address,
                format!("backend address {address} is listed twice"),
            );
        }
        if backends.iter().any(|o| o.name == *r.name.get_ref()) {
            c.err(
                &r.name,
                format!("backend '{}' is defined twice", r.name.get_ref()),
            );
        }
        backends.push(Backend {
            name: r.name.get_ref().clone(),
            address,
            weight: c.count(&r.weight, 1),
        });
    }
    let source = b.source.as_ref().and_then(|s| {
        let Ok(ip) = s.get_ref().trim().parse::<IpAddr>() else {
            c.err(s, format!("'{}' is not an IP address", s.get_ref()));
            return None;
        };
        let ip = ip.to_canonical();
        if let Some(other) = backends
            .iter()
            .find(|w| w.address.is_ipv4() != ip.is_ipv4())
        {
            c.err(
                s,
                format!(
                    "source {ip} and backend '{}' ({}) are of different IP families",
                    other.name, other.address
                ),
            );
        }
        // Workers read a PROXY header only from a trusted proxy; from any
        // other peer it is an unknown SMTP command (`500 5.5.1`), so every
        // client through this balancer would be dropped. Skipped when a
        // trusted range is unreadable: that error is reported already.
        let sends_proxy = listeners.iter().any(|l| l.proxy_protocol);
        let all_read = trusted.len() == raw_trusted.len();
        if sends_proxy && all_read && !trusted.iter().any(|n| n.contains(&ip)) {
            c.err(
                s,
                format!(
                    "balancer source {ip} is not in trusted_proxies: \
                     the workers would refuse its PROXY headers"
                ),
            );
        }
        Some(ip)
    });
    let def = ProbeSettings::default();
    BalancerConfig {
        source,
        listeners,
        backends,
        access: AccessList::new(&allow, &deny),
        max_connections: c.count(&b.max_connections, 10_000),
        max_connections_per_source: c.count(&b.max_connections_per_source, 20),
        handoff_timeout: c.duration(&b.handoff_timeout, Duration::from_secs(5)),
        idle_timeout: c.duration(&b.idle_timeout, Duration::from_secs(10 * 60)),
        probe: ProbeSettings {
            interval: c.duration(&b.probe.interval, def.interval),
            timeout: c.duration(&b.probe.timeout, def.timeout),
            rise: c.count(&b.probe.rise, def.rise),
            fall: c.count(&b.probe.fall, def.fall),
        },
    }
}
