//! The config file's shape as serde reads it. Values that need checking
//! keep their place in the file (`Spanned`) so errors can name it.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub accepted_domains: Vec<Spanned<RawDomain>>,
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    #[serde(default)]
    pub connectors: Vec<Spanned<RawConnector>>,
    #[serde(default)]
    pub users: Vec<Spanned<RawUser>>,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    pub delivery: RawDelivery,
    #[serde(default)]
    pub spool: RawSpool,
    pub balancer: Option<Spanned<RawBalancer>>,
    pub postmaster: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBalancer {
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub deny: Vec<Spanned<String>>,
    pub max_connections: Option<Spanned<u32>>,
    pub max_connections_per_source: Option<Spanned<u32>>,
    pub handoff_timeout: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub probe: RawProbe,
    #[serde(default)]
    pub listeners: Vec<Spanned<RawBalancerListener>>,
    #[serde(default)]
    pub backends: Vec<Spanned<RawBackend>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProbe {
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub rise: Option<Spanned<u32>>,
    pub fall: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBalancerListener {
    pub name: Spanned<String>,
    pub port: Spanned<u16>,
    pub backend_port: Option<u16>,
    pub proxy_protocol: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBackend {
    pub name: Spanned<String>,
    pub address: Spanned<String>,
    pub weight: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSpool {
    pub min_free_space: Option<Spanned<RawSize>>,
    pub max_data_in_memory: Option<Spanned<RawSize>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub domains: Spanned<Vec<Spanned<String>>>,
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    #[serde(default)]
    pub next_hops: Vec<Spanned<String>>,
    pub tls: Option<Spanned<String>>,
    pub verify_certificates: Option<bool>,
    pub auth: Option<RawSmarthostAuth>,
    pub path: Option<Spanned<String>>,
    pub port: Option<Spanned<u16>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSmarthostAuth {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDelivery {
    pub retry_interval: Option<Spanned<String>>,
    pub delay_notice_after: Option<Spanned<String>>,
    pub bounce_after: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub command_timeout: Option<Spanned<String>>,
    pub max_connections_per_hop: Option<Spanned<u32>>,
    pub dns_servers: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDomain {
    pub domain: Spanned<String>,
    pub kind: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConnector {
    pub name: Spanned<String>,
    pub port: Spanned<u16>,
    pub local_address: Option<Spanned<String>>,
    pub remote_ranges: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pub permissions: Vec<Spanned<String>>,
    #[serde(default)]
    pub auth: Vec<Spanned<String>>,
    pub tls: Option<Spanned<RawTls>>,
    pub banner: Option<Spanned<String>>,
    #[serde(default)]
    pub limits: RawLimits,
    pub protocol_log: Option<Spanned<String>>,
    pub add_missing_headers: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub certificate: String,
    pub key: String,
    pub min_version: Option<Spanned<String>>,
}

/// A size is a number of octets or a string such as "36MB" or "256KB".
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawSize {
    Octets(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub max_message_size: Option<Spanned<RawSize>>,
    pub max_header_size: Option<Spanned<RawSize>>,
    pub max_recipients: Option<Spanned<u32>>,
    pub max_connections: Option<Spanned<u32>>,
    pub max_connections_per_source: Option<Spanned<u32>>,
    pub connection_timeout: Option<Spanned<String>>,
    pub command_timeout: Option<Spanned<String>>,
    pub data_timeout: Option<Spanned<String>>,
    pub max_protocol_errors: Option<Spanned<u32>>,
    pub tarpit: Option<Spanned<String>>,
    pub max_hop_count: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUser {
    pub name: Spanned<String>,
    pub password_hash: Spanned<String>,
    pub allowed_senders: Spanned<Vec<Spanned<String>>>,
    pub allowed_ranges: Option<Vec<Spanned<String>>>,
}
