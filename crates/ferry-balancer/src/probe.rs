//! SMTP health probes: TCP connect, PROXY v2 LOCAL (when the listener
//! speaks PROXY), expect `220`, `EHLO`, expect `250`, `QUIT` — the whole
//! probe within the configured timeout. A `421` greeting means the worker
//! is draining. The probe is the shared client's (`ferry-client`): the
//! same connect, greeting and reply reading as delivery and `ferry send`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_client::{AttemptFailure, Settings, Timeouts};
use ferry_config::ProbeSettings;
use proxy_header::ProxyHeader;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metric;
use crate::pool::Target;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeResult {
    Up,
    /// Greeted with `421`: alive, but taking no new sessions.
    Draining,
    Failed {
        stage: &'static str,
        reason: String,
    },
}

fn failed(stage: &'static str, reason: impl Into<String>) -> ProbeResult {
    ProbeResult::Failed {
        stage,
        reason: reason.into(),
    }
}

/// The PROXY v2 LOCAL header probes send.
pub fn local_header() -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    // LOCAL has no addresses: encoding cannot fail.
    let _ = ProxyHeader::with_local().encode_v2(&mut out);
    out
}

/// One probe of `addr`, connecting from `source` like sessions do (see
/// [`crate::handoff::connect`]).
pub async fn probe(
    addr: SocketAddr,
    source: Option<IpAddr>,
    proxy: bool,
    limit: Duration,
) -> ProbeResult {
    match tokio::time::timeout(limit, probe_inner(addr, source, proxy)).await {
        Ok(result) => result,
        Err(_) => failed("timeout", format!("no answer within {limit:?}")),
    }
}

async fn probe_inner(addr: SocketAddr, source: Option<IpAddr>, proxy: bool) -> ProbeResult {
    let settings = Settings {
        helo: "ferry-balancer".into(),
        source,
        preamble: proxy.then(|| Arc::from(local_header())),
        // The caller's limit bounds the whole probe.
        timeouts: Timeouts {
            connect: Duration::MAX,
            greeting: Duration::MAX,
            command: Duration::MAX,
            data_end: Duration::MAX,
        },
        ..Settings::default()
    };
    let mut session =
        match ferry_client::connect(&ferry_client::Target::address(addr), &settings).await {
            Ok(session) => session,
            Err(ferry_client::Error::Unreachable { attempts, .. }) => {
                return match attempts.last().map(|a| &a.failure) {
                    Some(AttemptFailure::Greeted(r)) if r.code() == 421 => ProbeResult::Draining,
                    Some(AttemptFailure::Greeted(r)) => {
                        failed("greeting", format!("greeted with {}", r.code()))
                    }
                    Some(
                        f @ (AttemptFailure::NoGreeting(_) | AttemptFailure::GreetingTimeout(_)),
                    ) => failed("greeting", f.reason()),
                    Some(f) => failed("connect", f.reason()),
                    None => failed("connect", "no address"),
                };
            }
            Err(e) => return failed("connect", e.to_string()),
        };
    match session.command("EHLO ferry-balancer").await {
        Ok(r) if r.code() == 250 => {}
        Ok(r) => return failed("ehlo", format!("EHLO answered {}", r.code())),
        Err(ferry_client::Error::Connection { reason, .. }) => return failed("ehlo", reason),
        Err(e) => return failed("ehlo", e.to_string()),
    }
    session.quit().await;
    ProbeResult::Up
}

/// Probes `target` every interval until `stop` (a reload that removes
/// the target or changes its probe settings, or shutdown).
pub async fn run(
    target: Arc<Target>,
    source: Option<IpAddr>,
    settings: ProbeSettings,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(settings.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let started = Instant::now();
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = probe(target.addr, source, target.proxy, settings.timeout) => r,
        };
        let backend = target.name.clone();
        metrics::histogram!(metric::PROBE_DURATION, "backend" => backend.clone())
            .record(started.elapsed().as_secs_f64());
        if let ProbeResult::Failed { stage, .. } = &result {
            metrics::counter!(metric::PROBE_FAILURES, "backend" => backend.clone(), "stage" => *stage)
                .increment(1);
        }
        match (target.record(&result, &settings), &result) {
            (Some("down"), ProbeResult::Failed { stage, reason }) => {
                warn!(backend = %backend, listener = %target.listener, addr = %target.addr, stage, reason, "worker down")
            }
            (Some(change), _) => {
                info!(backend = %backend, listener = %target.listener, addr = %target.addr, change, "worker state")
            }
            (None, _) => {}
        }
    }
}
