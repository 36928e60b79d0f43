//! The config file's shape. Values that need checking keep their place in
//! the file (`Spanned`) so errors can name it. Each table is read key by
//! key (`read`), so every unknown key and wrong type in the file is
//! reported, not just the first: adding a key is a field here and a line in
//! its table's `read` function.

use serde::Deserialize;
use toml::Spanned;

use crate::read::{Reader, Table};

#[derive(Debug)]
pub(crate) struct RawConfig {
    pub accepted_domains: Vec<Spanned<RawDomain>>,
    pub trusted_proxies: Vec<Spanned<String>>,
    pub connectors: Vec<Spanned<RawConnector>>,
    pub users: Vec<Spanned<RawUser>>,
    pub routes: Vec<Spanned<RawRoute>>,
    pub delivery: RawDelivery,
    pub spool: RawSpool,
    pub balancer: Option<Spanned<RawBalancer>>,
    pub postmaster: Option<Spanned<String>>,
    pub auth: RawAuth,
}

#[derive(Debug, Default)]
pub(crate) struct RawAuth {
    pub max_verifications: Option<Spanned<u32>>,
    pub verification_wait: Option<Spanned<String>>,
    pub cache_ttl: Option<Spanned<String>>,
    pub negative_cache_ttl: Option<Spanned<String>>,
    pub max_failures: Option<Spanned<u32>>,
    pub failure_window: Option<Spanned<String>>,
    pub cooling_off: Option<Spanned<String>>,
}

#[derive(Debug)]
pub(crate) struct RawBalancer {
    pub allow: Vec<Spanned<String>>,
    pub deny: Vec<Spanned<String>>,
    pub max_connections: Option<Spanned<u32>>,
    pub max_connections_per_source: Option<Spanned<u32>>,
    pub handoff_timeout: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub source: Option<Spanned<String>>,
    pub probe: RawProbe,
    pub listeners: Vec<Spanned<RawBalancerListener>>,
    pub backends: Vec<Spanned<RawBackend>>,
}

#[derive(Debug, Default)]
pub(crate) struct RawProbe {
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub rise: Option<Spanned<u32>>,
    pub fall: Option<Spanned<u32>>,
}

#[derive(Debug)]
pub(crate) struct RawBalancerListener {
    pub name: Spanned<String>,
    pub port: Spanned<u16>,
    pub backend_port: Option<u16>,
    pub proxy_protocol: Option<bool>,
    pub backlog: Option<Spanned<i64>>,
}

#[derive(Debug)]
pub(crate) struct RawBackend {
    pub name: Spanned<String>,
    pub address: Spanned<String>,
    pub weight: Option<Spanned<u32>>,
}

#[derive(Debug, Default)]
pub(crate) struct RawSpool {
    pub min_free_space: Option<Spanned<RawSize>>,
}

#[derive(Debug)]
pub(crate) struct RawRoute {
    pub domains: Spanned<Vec<Spanned<String>>>,
    pub kind: Spanned<String>,
    pub next_hops: Vec<Spanned<String>>,
    pub tls: Option<Spanned<String>>,
    pub verify_certificates: Option<bool>,
    pub ca_file: Option<Spanned<String>>,
    pub auth: Option<RawSmarthostAuth>,
    pub path: Option<Spanned<String>>,
    pub port: Option<Spanned<u16>>,
}

#[derive(Debug)]
pub(crate) struct RawSmarthostAuth {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Default)]
pub(crate) struct RawDelivery {
    pub retry_interval: Option<Spanned<String>>,
    pub delay_notice_after: Option<Spanned<String>>,
    pub bounce_after: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub command_timeout: Option<Spanned<String>>,
    pub max_connections_per_hop: Option<Spanned<u32>>,
    pub dns_servers: Option<Vec<Spanned<String>>>,
}

#[derive(Debug)]
pub(crate) struct RawDomain {
    pub domain: Spanned<String>,
    pub kind: Spanned<String>,
}

#[derive(Debug)]
pub(crate) struct RawConnector {
    pub name: Spanned<String>,
    pub port: Spanned<u16>,
    pub local_address: Option<Spanned<String>>,
    pub remote_ranges: Spanned<Vec<Spanned<String>>>,
    pub permissions: Vec<Spanned<String>>,
    pub auth: Vec<Spanned<String>>,
    pub tls: Option<Spanned<RawTls>>,
    pub banner: Option<Spanned<String>>,
    pub limits: RawLimits,
    pub protocol_log: Option<Spanned<String>>,
    pub add_missing_headers: Option<bool>,
    pub backlog: Option<Spanned<i64>>,
}

#[derive(Debug)]
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

#[derive(Debug, Default)]
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

#[derive(Debug)]
pub(crate) struct RawUser {
    pub name: Spanned<String>,
    pub password_hash: Spanned<String>,
    pub allowed_senders: Spanned<Vec<Spanned<String>>>,
    pub allowed_ranges: Option<Vec<Spanned<String>>>,
}

impl RawConfig {
    /// Reads the whole file, recording every problem in `r`; `None` only
    /// for a syntax error.
    pub(crate) fn read(r: &mut Reader, text: &str) -> Option<Self> {
        let mut t = r.document(text)?;
        let raw = RawConfig {
            accepted_domains: t.tables(r, "accepted_domains", |r, t| RawDomain {
                domain: t.req(r, "domain"),
                kind: t.req(r, "kind"),
            }),
            trusted_proxies: t.or_default(r, "trusted_proxies"),
            connectors: t.tables(r, "connectors", RawConnector::read),
            users: t.tables(r, "users", |r, t| RawUser {
                name: t.req(r, "name"),
                password_hash: t.req(r, "password_hash"),
                allowed_senders: t.req(r, "allowed_senders"),
                allowed_ranges: t.opt(r, "allowed_ranges"),
            }),
            routes: t.tables(r, "routes", RawRoute::read),
            delivery: t
                .table(r, "delivery", |r, t| RawDelivery {
                    retry_interval: t.opt(r, "retry_interval"),
                    delay_notice_after: t.opt(r, "delay_notice_after"),
                    bounce_after: t.opt(r, "bounce_after"),
                    connect_timeout: t.opt(r, "connect_timeout"),
                    command_timeout: t.opt(r, "command_timeout"),
                    max_connections_per_hop: t.opt(r, "max_connections_per_hop"),
                    dns_servers: t.opt(r, "dns_servers"),
                })
                .map(Spanned::into_inner)
                .unwrap_or_default(),
            spool: t
                .table(r, "spool", |r, t| {
                    t.removed(
                        r,
                        "max_data_in_memory",
                        "a message is written to the spool as it arrives, so a session \
                         holds a chunk of it (256 KiB), never the whole message",
                    );
                    RawSpool {
                        min_free_space: t.opt(r, "min_free_space"),
                    }
                })
                .map(Spanned::into_inner)
                .unwrap_or_default(),
            balancer: t.table(r, "balancer", RawBalancer::read),
            postmaster: t.opt(r, "postmaster"),
            auth: t
                .table(r, "auth", |r, t| RawAuth {
                    max_verifications: t.opt(r, "max_verifications"),
                    verification_wait: t.opt(r, "verification_wait"),
                    cache_ttl: t.opt(r, "cache_ttl"),
                    negative_cache_ttl: t.opt(r, "negative_cache_ttl"),
                    max_failures: t.opt(r, "max_failures"),
                    failure_window: t.opt(r, "failure_window"),
                    cooling_off: t.opt(r, "cooling_off"),
                })
                .map(Spanned::into_inner)
                .unwrap_or_default(),
        };
        t.finish(r);
        Some(raw)
    }
}

impl RawBalancer {
    fn read(r: &mut Reader, t: &mut Table<'_>) -> Self {
        RawBalancer {
            allow: t.or_default(r, "allow"),
            deny: t.or_default(r, "deny"),
            max_connections: t.opt(r, "max_connections"),
            max_connections_per_source: t.opt(r, "max_connections_per_source"),
            handoff_timeout: t.opt(r, "handoff_timeout"),
            idle_timeout: t.opt(r, "idle_timeout"),
            source: t.opt(r, "source"),
            probe: t
                .table(r, "probe", |r, t| RawProbe {
                    interval: t.opt(r, "interval"),
                    timeout: t.opt(r, "timeout"),
                    rise: t.opt(r, "rise"),
                    fall: t.opt(r, "fall"),
                })
                .map(Spanned::into_inner)
                .unwrap_or_default(),
            listeners: t.tables(r, "listeners", |r, t| RawBalancerListener {
                name: t.req(r, "name"),
                port: t.req(r, "port"),
                backend_port: t.opt(r, "backend_port"),
                proxy_protocol: t.opt(r, "proxy_protocol"),
                backlog: t.opt(r, "backlog"),
            }),
            backends: t.tables(r, "backends", |r, t| RawBackend {
                name: t.req(r, "name"),
                address: t.req(r, "address"),
                weight: t.opt(r, "weight"),
            }),
        }
    }
}

impl RawRoute {
    fn read(r: &mut Reader, t: &mut Table<'_>) -> Self {
        RawRoute {
            domains: t.req(r, "domains"),
            kind: t.req(r, "type"),
            next_hops: t.or_default(r, "next_hops"),
            tls: t.opt(r, "tls"),
            verify_certificates: t.opt(r, "verify_certificates"),
            ca_file: t.opt(r, "ca_file"),
            auth: t
                .table(r, "auth", |r, t| RawSmarthostAuth {
                    username: t.req(r, "username"),
                    password: t.req(r, "password"),
                })
                .map(Spanned::into_inner),
            path: t.opt(r, "path"),
            port: t.opt(r, "port"),
        }
    }
}

impl RawConnector {
    fn read(r: &mut Reader, t: &mut Table<'_>) -> Self {
        RawConnector {
            name: t.req(r, "name"),
            port: t.req(r, "port"),
            local_address: t.opt(r, "local_address"),
            remote_ranges: t.req(r, "remote_ranges"),
            permissions: t.or_default(r, "permissions"),
            auth: t.or_default(r, "auth"),
            tls: t.table(r, "tls", |r, t| RawTls {
                certificate: t.req(r, "certificate"),
                key: t.req(r, "key"),
                min_version: t.opt(r, "min_version"),
            }),
            banner: t.opt(r, "banner"),
            limits: t
                .table(r, "limits", |r, t| RawLimits {
                    max_message_size: t.opt(r, "max_message_size"),
                    max_header_size: t.opt(r, "max_header_size"),
                    max_recipients: t.opt(r, "max_recipients"),
                    max_connections: t.opt(r, "max_connections"),
                    max_connections_per_source: t.opt(r, "max_connections_per_source"),
                    connection_timeout: t.opt(r, "connection_timeout"),
                    command_timeout: t.opt(r, "command_timeout"),
                    data_timeout: t.opt(r, "data_timeout"),
                    max_protocol_errors: t.opt(r, "max_protocol_errors"),
                    tarpit: t.opt(r, "tarpit"),
                    max_hop_count: t.opt(r, "max_hop_count"),
                })
                .map(Spanned::into_inner)
                .unwrap_or_default(),
            protocol_log: t.opt(r, "protocol_log"),
            add_missing_headers: t.opt(r, "add_missing_headers"),
            backlog: t.opt(r, "backlog"),
        }
    }
}
