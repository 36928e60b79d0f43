//! The Ferry relay worker: the receive side of SMTP, and delivery.
//!
//! The worker is a node role ([`ferry_node::Role`]). Its config arrives
//! as an immutable [`WorkerSnapshot`]: the validated config plus the TLS
//! acceptors built from it ([`tls::TlsAcceptors`], every certificate and
//! key read and checked before the snapshot can be applied). The
//! [`Core`] holds what sessions and the delivery agent need: the snapshot
//! in service behind `arc-swap`, the spool, the protocol and tracking
//! logs, the caps and the shutdown signal. A session takes the current
//! snapshot when it starts and keeps it to its end (banner, limits,
//! policy, users); the delivery agent takes the current one for each
//! attempt, so a changed route applies to the next one. The [`Worker`]
//! is the core plus the listeners: `apply` binds the new connector ports
//! first, swaps the snapshot in, then stops accepting on removed ports
//! while their sessions finish. Each session picks its connector from
//! the client IP and runs STARTTLS (rustls), AUTH against argon2 hashes,
//! the relay policy and limits, and hands each accepted message to the
//! spool before the `250`.
//!
//! Modules: [`core`] (the core and the snapshot type), [`server`] (the
//! worker as a role: listeners, readiness, graceful shutdown), [`tls`]
//! (TLS acceptors from a config), [`delivery`] (routes, the SMTP client,
//! retries, bounces, queue administration), `conn` (one SMTP
//! connection), [`proxy`] (PROXY headers from trusted balancers), `auth`
//! (password checks: a bounded verification pool, a verified-credential
//! cache, per-client failure limits), [`protolog`] (Exchange-format protocol
//! logs), [`tracking`] (message tracking log), `limits` (per-source
//! caps), `metric` (metric names). Balancing and config reloading are
//! not done here (the reload is `ferry-node`'s).
#![forbid(unsafe_code)]

mod auth;
mod conn;
pub mod core;
mod daily;
pub mod delivery;
mod limits;
mod metric;
pub mod protolog;
pub mod proxy;
pub mod server;
pub mod tls;
pub mod tracking;

pub use crate::core::{Core, WorkerOptions, WorkerSnapshot};
pub use delivery::Deliverer;
pub use server::Worker;
pub use tls::{TlsAcceptors, TlsError};
