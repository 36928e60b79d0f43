//! The node core both roles share: config snapshots and the one operation
//! that changes them.
//!
//! A [`Snapshot`] is one validated config with its version, its SHA-256,
//! where it came from, when it was loaded and the role's material built
//! from it; it is immutable, and sessions hold the one they started with.
//! A [`Role`] (the worker, the balancer) builds its material in
//! [`Role::prepare`], where everything that can fail is checked, and puts
//! a snapshot in service with [`Role::apply`]; its [`ListenerSet`] binds
//! new ports before anything changes and lets removed ports drain. The
//! [`Reloader`] is the first caller of `apply`: SIGHUP
//! ([`reload_on_hangup`]) and `POST /config/reload` ([`NodeAdmin`])
//! re-read the node's file and report the version, the SHA-256 and what
//! changed, or every error while the old snapshot keeps serving. The
//! control plane's subscriber will be the second caller.
//!
//! Modules: [`snapshot`], [`listeners`], [`reload`], [`admin`], [`metric`]
//! (the config metrics). No SMTP, no balancing here.
#![forbid(unsafe_code)]

pub mod admin;
pub mod listeners;
pub mod metric;
pub mod reload;
pub mod snapshot;

use std::sync::Arc;

use tokio::signal::unix::{signal, Signal, SignalKind};

pub use admin::NodeAdmin;
pub use listeners::{ListenError, ListenerSet, OnAccept, Reconciled};
pub use reload::{config_errors, load_file, ApplyError, ReloadReport, Reloader, Role};
pub use snapshot::{sha256_hex, LoadedConfig, Snapshot, Source};

/// Starts catching SIGHUP: call it first thing, so a SIGHUP that arrives
/// while the node starts (reading its spool, say) no longer terminates
/// it but waits in the stream for [`reload_on_hangup`].
///
/// # Errors
/// The signal handler cannot be installed.
pub fn watch_hangups() -> std::io::Result<Signal> {
    signal(SignalKind::hangup())
}

/// Reloads the config on every SIGHUP in `hangups`, for the life of the
/// process: while the node drains after SIGTERM a SIGHUP is still
/// answered, by the role refusing it (logged as a failed reload). Reloads
/// do not queue up: signals that arrive during one are folded into the
/// next.
pub fn reload_on_hangup<R: Role>(reloader: Arc<Reloader<R>>, mut hangups: Signal) {
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config");
            reloader.reload().await;
        }
    });
}
