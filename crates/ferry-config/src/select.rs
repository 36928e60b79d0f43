//! Connector selection: the most specific connector for a client wins.
//!
//! For a connection to local address L, port P from client C: candidates
//! are the connectors on P bound to L or to no address; one bound to L
//! beats one bound to any address; then the longest remote range holding C
//! wins. No candidate holding C means `554 5.7.1`.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::model::{ClusterConfig, Connector};

/// The chosen connector and why.
#[derive(Debug, Clone)]
pub struct Selection {
    pub connector: Arc<Connector>,
    /// The remote range that matched the client.
    pub matched: IpNet,
    /// Connectors that also hold the client but lost, with their range.
    pub shadowed: Vec<(Arc<Connector>, IpNet)>,
}

impl ClusterConfig {
    /// Picks the connector for `client` connecting to `local`:`port`.
    /// IPv4-mapped IPv6 addresses count as their IPv4 address.
    pub fn select(&self, local: IpAddr, port: u16, client: IpAddr) -> Option<Selection> {
        let local = local.to_canonical();
        let client = client.to_canonical();
        let mut matches: Vec<(Arc<Connector>, IpNet)> = self
            .connectors
            .iter()
            .filter(|c| c.port == port && c.local_address.is_none_or(|a| a == local))
            .filter_map(|c| {
                c.remote_ranges
                    .iter()
                    .filter(|net| net.contains(&client))
                    .max_by_key(|net| net.prefix_len())
                    .map(|net| (Arc::clone(c), *net))
            })
            .collect();
        // Most specific first: bound to L, then the longest prefix.
        matches.sort_by_key(|(c, net)| {
            (
                std::cmp::Reverse(c.local_address.is_some()),
                std::cmp::Reverse(net.prefix_len()),
            )
        });
        let mut iter = matches.into_iter();
        let (connector, matched) = iter.next()?;
        Some(Selection {
            connector,
            matched,
            shadowed: iter.collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::ClusterConfig;

    const CONF: &str = r#"
[[connectors]]
name = "Default"
port = 25
remote_ranges = ["0.0.0.0/0", "::/0"]
permissions = ["anonymous"]

[[connectors]]
name = "Printers"
port = 25
remote_ranges = ["10.1.0.0/16", "2001:db8:1::/48"]
permissions = ["anonymous", "accept_any_recipient"]

[[connectors]]
name = "One printer"
port = 25
remote_ranges = ["10.1.2.3"]
permissions = ["anonymous"]

[[connectors]]
name = "Bound"
port = 25
local_address = "192.0.2.1"
remote_ranges = ["0.0.0.0/0"]
permissions = ["anonymous"]
"#;

    fn pick(local: &str, client: &str) -> Option<String> {
        let c = ClusterConfig::parse("t.toml", CONF, Path::new(".")).unwrap();
        c.select(local.parse().unwrap(), 25, client.parse().unwrap())
            .map(|s| s.connector.name.clone())
    }

    #[test]
    fn longest_prefix_wins() {
        assert_eq!(
            pick("127.0.0.1", "10.1.2.3").as_deref(),
            Some("One printer")
        );
        assert_eq!(pick("127.0.0.1", "10.1.9.9").as_deref(), Some("Printers"));
        assert_eq!(pick("127.0.0.1", "10.2.0.1").as_deref(), Some("Default"));
        assert_eq!(
            pick("127.0.0.1", "2001:db8:1::5").as_deref(),
            Some("Printers")
        );
        assert_eq!(
            pick("127.0.0.1", "2001:db8:2::5").as_deref(),
            Some("Default")
        );
    }

    #[test]
    fn mapped_ipv6_counts_as_ipv4() {
        assert_eq!(
            pick("::ffff:127.0.0.1", "::ffff:10.1.2.3").as_deref(),
            Some("One printer")
        );
    }

    #[test]
    fn local_binding_beats_prefix() {
        assert_eq!(pick("192.0.2.1", "10.1.2.3").as_deref(), Some("Bound"));
    }

    #[test]
    fn shadowed_connectors_are_listed() {
        let c = ClusterConfig::parse("t.toml", CONF, Path::new(".")).unwrap();
        let s = c
            .select(
                "127.0.0.1".parse().unwrap(),
                25,
                "10.1.2.3".parse().unwrap(),
            )
            .unwrap();
        let names: Vec<_> = s
            .shadowed
            .iter()
            .map(|(c, n)| format!("{} {n}", c.name))
            .collect();
        assert_eq!(names, ["Printers 10.1.0.0/16", "Default 0.0.0.0/0"]);
    }

    #[test]
    fn no_candidate() {
        let c = ClusterConfig::parse(
            "t.toml",
            "[[connectors]]\nname='x'\nport=25\nremote_ranges=['10.0.0.0/8']\npermissions=['anonymous']\n",
            Path::new("."),
        )
        .unwrap();
        assert!(c
            .select(
                "127.0.0.1".parse().unwrap(),
                25,
                "11.0.0.1".parse().unwrap()
            )
            .is_none());
        assert!(c
            .select(
                "127.0.0.1".parse().unwrap(),
                26,
                "10.0.0.1".parse().unwrap()
            )
            .is_none());
    }
}
