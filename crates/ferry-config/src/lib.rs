//! The Ferry cluster config: one TOML file for the whole cluster.
//!
//! [`ClusterConfig::parse`] turns the file into validated types that cannot
//! hold invalid values, reporting every error in the file at once with its
//! line and column. The same types answer the questions the data plane
//! asks of the config: which receive connector handles a client
//! ([`select`]), whether a sender or recipient is allowed ([`policy`]), and
//! where a recipient's mail goes next ([`routes`]).
//! [`explain`] renders both for `ferry config explain`.
//!
//! Modules: `raw` (the file's shape) read key by key by `read` (so every
//! unknown key and wrong type is reported, not only the first), [`model`] (the
//! validated types), [`auth`] (the `[auth]` section), [`select`], [`policy`], [`routes`], [`balancer`]
//! (listeners, backends, access list and probes of balancer nodes),
//! [`explain`], [`diff`] (what changed between two configs), [`error`].
//! This crate does no I/O beyond reading the config file: certificates are
//! loaded by the nodes that use them.
#![forbid(unsafe_code)]

pub mod auth;
pub mod balancer;
pub mod diff;
pub mod error;
pub mod explain;
pub mod model;
pub mod policy;
mod raw;
mod read;
pub mod routes;
pub mod select;
mod validate;

pub use auth::AuthConfig;
pub use balancer::{AccessList, Backend, BalancerConfig, BalancerListener, ProbeSettings};
pub use error::{ConfigError, Located};
pub use model::{
    AcceptedDomain, AuthSettings, ClusterConfig, Connector, DomainKind, Limits, ListenPort,
    Permissions, ProtocolLog, TlsSettings, TlsVersion, User, DEFAULT_BACKLOG, MAX_BACKLOG,
};
pub use policy::Refusal;
pub use routes::{Delivery, DomainPattern, NextHop, Route, RouteAction, TlsPolicy};
pub use select::Selection;
