//! SMTP health probes: TCP connect, PROXY v2 LOCAL (when the listener
//! speaks PROXY), expect `220`, `EHLO`, expect `250`, `QUIT` — the whole
//! probe within the configured timeout. A `421` greeting means the worker
//! is draining.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_config::ProbeSettings;
use ferry_smtp::client::ReplyReader;
use ferry_smtp::Reply;
use proxy_header::ProxyHeader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
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

/// Reads one whole reply.
pub async fn read_reply(
    stream: &mut TcpStream,
    reader: &mut ReplyReader,
    raw: &mut Vec<u8>,
) -> Result<Reply, String> {
    let mut chunk = [0u8; 1024];
    loop {
        match reader.next_reply() {
            Some(Ok(reply)) => return Ok(reply),
            Some(Err(e)) => return Err(e.to_string()),
            None => {}
        }
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        let bytes = chunk.get(..n).unwrap_or_default();
        raw.extend_from_slice(bytes);
        reader.push(bytes);
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
    let mut s = match crate::handoff::connect(addr, source).await {
        Ok(s) => s,
        Err(e) => return failed("connect", e.to_string()),
    };
    let _ = s.set_nodelay(true);
    if proxy {
        if let Err(e) = s.write_all(&local_header()).await {
            return failed("connect", e.to_string());
        }
    }
    let mut reader = ReplyReader::new();
    let mut raw = Vec::new();
    match read_reply(&mut s, &mut reader, &mut raw).await {
        Ok(r) if r.code() == 220 => {}
        Ok(r) if r.code() == 421 => return ProbeResult::Draining,
        Ok(r) => return failed("greeting", format!("greeted with {}", r.code())),
        Err(e) => return failed("greeting", e),
    }
    if let Err(e) = s.write_all(b"EHLO ferry-balancer\r\n").await {
        return failed("ehlo", e.to_string());
    }
    match read_reply(&mut s, &mut reader, &mut raw).await {
        Ok(r) if r.code() == 250 => {}
        Ok(r) => return failed("ehlo", format!("EHLO answered {}", r.code())),
        Err(e) => return failed("ehlo", e),
    }
    let _ = s.write_all(b"QUIT\r\n").await;
    let _ = read_reply(&mut s, &mut reader, &mut raw).await;
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
