//! The Ferry balancer: the node in front of the relay workers.
//!
//! A [`Balancer`] listens on the ports of the config's `[balancer]`
//! section. For each client it applies the access list and the per-source
//! cap before anything else, picks a worker (least connections, weighted)
//! among those its SMTP probes call healthy, connects, sends a PROXY v2
//! header with the client's addresses and a session id, and waits for the
//! worker's `220`. Only then does the client get that greeting and the
//! bytes flow both ways; a worker that refuses, hangs or greets otherwise
//! is skipped for the next, so the client never sees it. With no worker
//! left the client gets `421 4.3.2` at once.
//!
//! Modules: [`pool`] (workers, their health and load), [`probe`] (SMTP
//! health probes), [`handoff`] (connect, PROXY header, verified greeting),
//! [`relay`] (bytes both ways, half-close, idle timeout), [`server`]
//! (accept loops, access control, shutdown), [`admin`] (drain and status
//! over the admin endpoint), `metric` (metric names).
#![forbid(unsafe_code)]

pub mod admin;
pub mod handoff;
mod metric;
pub mod pool;
pub mod probe;
pub mod relay;
pub mod server;

pub use server::Balancer;
