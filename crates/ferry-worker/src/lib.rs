//! The Ferry relay worker: the receive side of SMTP.
//!
//! A [`Worker`] holds the current cluster config as an atomically swapped
//! [`Runtime`] (sessions keep the snapshot they started with), listens on
//! every connector port of its node address, picks each connection's
//! connector from the client IP, and runs the session: STARTTLS
//! (rustls), AUTH against argon2 hashes, the relay policy, limits, and
//! hand-over of accepted messages to the spool before the `250`.
//!
//! Modules: [`server`] (accept loops, connection caps, graceful shutdown),
//! [`delivery`] (routes, the SMTP client, retries, bounces),
//! `conn` (one SMTP connection), [`runtime`] (config snapshot and TLS
//! acceptors), [`proxy`] (PROXY headers from trusted balancers), `auth`
//! (password checks and tarpit), [`protolog`]
//! (Exchange-format protocol logs), [`tracking`] (message tracking log), `limits` (per-source caps), `metric`
//! (metric names). Balancing is not done here.
#![forbid(unsafe_code)]

mod auth;
mod conn;
mod daily;
pub mod delivery;
mod limits;
mod metric;
pub mod protolog;
pub mod proxy;
pub mod runtime;
pub mod server;
pub mod tracking;

pub use delivery::Deliverer;
pub use runtime::{Runtime, RuntimeError};
pub use server::{Worker, WorkerOptions};
