//! Telemetry for every Ferry node: logs, metrics and the admin endpoint.
//!
//! [`init_logging`] sets up `tracing` (plain or JSON lines, filtered by
//! `RUST_LOG`); [`metrics_handle`] installs the process-wide Prometheus
//! recorder once; [`admin::serve`] runs the admin HTTP endpoint (hyper)
//! with `/metrics`, `/livez` and `/readyz`.
//!
//! No business logic lives here: the data-plane crates record their own
//! metrics through the `metrics` facade.
#![forbid(unsafe_code)]

pub mod admin;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Sets up logging to stderr. `RUST_LOG` overrides the default `info`.
/// Colours only when stderr is a terminal: log files stay plain text.
pub fn init_logging(json: bool) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // A second call (tests) keeps the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed; ours still renders.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
