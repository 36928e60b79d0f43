//! The Ferry balancer: the node in front of the relay workers.
//!
//! A [`Balancer`] listens on the ports of the config's `[balancer]`
//! section. For each client it applies the access list and the caps
//! before anything else, picks a worker (least connections, weighted)
//! among those its SMTP probes call healthy, connects, sends a PROXY v2
//! header with the client's addresses and a session id, and waits for the
//! worker's `220`. Only then does the client get that greeting and the
//! bytes flow both ways; a worker that refuses, hangs or greets otherwise
//! is skipped for the next, so the client never sees it. With no worker
//! left the client gets `421 4.3.2` at once.
//!
//! The balancer is a [`ferry_node::Role`]: its material is the
//! `[balancer]` section, and `apply(snapshot)` puts a new one in service
//! without dropping a session. The [`State`] new connections read (the
//! snapshot and one [`Frontend`] per listener) sits behind `arc-swap`;
//! each connection reads it once when accepted and keeps it to the end,
//! so access list, caps, timeouts, source address and listener settings
//! change for the next connection only. Apply builds the new frontends
//! first, binds new ports (a port that cannot be bound fails the whole
//! apply, the old state serving on), swaps the state, then reconciles the
//! workers: a worker port whose address, backend port and PROXY setting
//! stay keeps its health, drain flag and open sessions; a removed one gets
//! no new session while its open ones finish, and its probe stops; a
//! backend a reload adds joins the rotation after `rise` good probes,
//! while a new port of a worker already up (a new, renamed or re-pointed
//! listener) takes sessions at once (at process start every worker is up
//! at once). An administrator's drain is kept per backend name across
//! reloads. Removed ports stop accepting; their sessions run on. Once
//! shutdown has begun, apply is refused.
//!
//! Modules: [`apply`] (the state, the reconciliation of listeners, workers
//! and probes), [`pool`] (workers, their health and load), [`probe`] (SMTP
//! health probes), [`handoff`] (connect, PROXY header, verified greeting),
//! [`relay`] (bytes both ways, half-close, idle timeout), [`server`]
//! (each connection, access control, drain, shutdown), [`admin`] (drain
//! and status over the admin endpoint), `metric` (metric names). No SMTP
//! policy here: that is the workers'.
#![forbid(unsafe_code)]

pub mod admin;
pub mod apply;
pub mod handoff;
mod metric;
pub mod pool;
pub mod probe;
pub mod relay;
pub mod server;

pub use apply::{Frontend, State};
pub use server::Balancer;
