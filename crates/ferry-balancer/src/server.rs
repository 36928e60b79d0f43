//! Accept loops, access control, the per-source cap, the choice of a
//! worker with retries, and graceful shutdown.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_config::{BalancerConfig, BalancerListener};
use metrics::{counter, Counter, Gauge};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::handoff::{handoff, proxy_header};
use crate::metric;
use crate::pool::{choose, Target};
use crate::relay::relay;

const DENIED: &[u8] = b"554 5.7.1 Access denied\r\n";
const OVER_LIMIT: &[u8] = b"421 4.3.2 Too many connections from your address, try again later\r\n";
const OVER_TOTAL: &[u8] = b"421 4.3.2 Too many connections, try again later\r\n";
const NO_BACKEND: &[u8] = b"421 4.3.2 Service not available, closing transmission channel\r\n";
/// How long a refusal may take to write before we just close.
const REFUSAL_WRITE: Duration = Duration::from_secs(2);

/// One listener and the workers behind it.
pub struct Frontend {
    pub listener: BalancerListener,
    pub targets: Vec<Arc<Target>>,
    /// Where round-robin among equally loaded workers starts next.
    rotation: AtomicU64,
    metrics: FrontendMetrics,
}

/// The listener's metric handles, registered once (the per-connection
/// path only touches atomics).
struct FrontendMetrics {
    accepted: Counter,
    denied: Counter,
    over_limit: Counter,
    no_backend: Counter,
    active: Gauge,
}

impl FrontendMetrics {
    fn new(listener: &str) -> Self {
        let result = |r: &'static str| metrics::counter!(metric::CONNECTIONS, "listener" => listener.to_string(), "result" => r);
        Self {
            accepted: result("accepted"),
            denied: result("denied"),
            over_limit: result("over_limit"),
            no_backend: result("no_backend"),
            active: metrics::gauge!(metric::ACTIVE, "listener" => listener.to_string()),
        }
    }
}

/// A balancer node.
pub struct Balancer {
    pub config: BalancerConfig,
    listen: IpAddr,
    pub frontends: Vec<Frontend>,
    per_source: Mutex<HashMap<IpAddr, u32>>,
    /// Client connections open now, over all listeners.
    open: AtomicU64,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    listening: AtomicBool,
    session_base: u64,
    session_seq: AtomicU64,
}

/// A connection's place under the total cap; freed when dropped.
struct OpenSlot<'a>(&'a Balancer);

impl Drop for OpenSlot<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client's place under the per-source cap; freed when dropped.
struct SourceSlot<'a>(&'a Balancer, IpAddr);

impl Drop for SourceSlot<'_> {
    fn drop(&mut self) {
        let mut map = self.0.per_source.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

async fn refuse(mut stream: TcpStream, reply: &[u8]) {
    let _ = tokio::time::timeout(REFUSAL_WRITE, async {
        stream.write_all(reply).await?;
        stream.shutdown().await
    })
    .await;
}

impl Balancer {
    /// A balancer for `config` listening on `listen`.
    pub fn new(config: BalancerConfig, listen: IpAddr) -> Arc<Self> {
        metric::describe();
        let drains: HashMap<String, Arc<AtomicBool>> = config
            .backends
            .iter()
            .map(|b| (b.name.clone(), Arc::default()))
            .collect();
        let frontends = config
            .listeners
            .iter()
            .map(|l| Frontend {
                listener: l.clone(),
                targets: config
                    .backends
                    .iter()
                    .map(|b| {
                        let drain = drains.get(&b.name).cloned().unwrap_or_default();
                        Arc::new(Target::new(b.clone(), &l.name, l.backend_port, drain))
                    })
                    .collect(),
                rotation: AtomicU64::new(0),
                metrics: FrontendMetrics::new(&l.name),
            })
            .collect();
        let session_base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
            << 8;
        Arc::new(Self {
            config,
            listen,
            frontends,
            per_source: Mutex::default(),
            open: AtomicU64::new(0),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            listening: AtomicBool::new(false),
            session_base,
            session_seq: AtomicU64::new(0),
        })
    }

    /// Cancelling this token shuts the balancer down gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Listening, and some worker behind every listener takes sessions.
    pub fn is_ready(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
            && self
                .frontends
                .iter()
                .all(|f| f.targets.iter().any(|t| t.is_eligible()))
    }

    /// Sets or clears an administrator's drain of the worker `name`;
    /// false if there is no such worker.
    pub fn set_drain(&self, name: &str, on: bool) -> bool {
        let mut found = false;
        for t in self.frontends.iter().flat_map(|f| &f.targets) {
            if t.backend.name == name {
                t.admin_drain.store(on, Ordering::Relaxed);
                t.publish();
                found = true;
            }
        }
        if found {
            info!(
                backend = name,
                drained = on,
                "drain set by an administrator"
            );
        }
        found
    }

    /// Binds one socket per listener on the node address.
    pub async fn bind(&self) -> std::io::Result<Vec<TcpListener>> {
        let mut out = Vec::new();
        for f in &self.frontends {
            let addr = SocketAddr::new(self.listen, f.listener.port);
            let l = TcpListener::bind(addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
            })?;
            out.push(l);
        }
        Ok(out)
    }

    /// Serves `listeners` (one per frontend, in order) and probes the
    /// workers until shutdown; then waits up to `drain_limit` for open
    /// sessions.
    pub async fn run(self: Arc<Self>, listeners: Vec<TcpListener>, drain_limit: Duration) {
        let probes = CancellationToken::new();
        for f in &self.frontends {
            for t in &f.targets {
                tokio::spawn(crate::probe::run(
                    Arc::clone(t),
                    self.config.source,
                    f.listener.proxy_protocol,
                    self.config.probe,
                    probes.clone(),
                ));
            }
        }
        for (i, listener) in listeners.into_iter().enumerate() {
            let me = Arc::clone(&self);
            self.tracker
                .spawn(async move { me.accept_loop(i, listener).await });
        }
        self.listening.store(true, Ordering::Relaxed);
        self.shutdown.cancelled().await;
        self.listening.store(false, Ordering::Relaxed);
        self.tracker.close();
        info!("shutting down: no new connections, letting sessions finish");
        if tokio::time::timeout(drain_limit, self.tracker.wait())
            .await
            .is_err()
        {
            warn!("sessions still open after {drain_limit:?}; closing them");
        }
        probes.cancel();
    }

    async fn accept_loop(self: Arc<Self>, frontend: usize, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let me = Arc::clone(&self);
                    self.tracker
                        .spawn(async move { me.handle(frontend, stream, peer).await });
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn next_session_id(&self) -> String {
        let n = self.session_seq.fetch_add(1, Ordering::Relaxed);
        format!("{:016X}", self.session_base.wrapping_add(n))
    }

    fn take_open_slot(&self) -> Option<OpenSlot<'_>> {
        let before = self.open.fetch_add(1, Ordering::Relaxed);
        let slot = OpenSlot(self);
        (before < u64::from(self.config.max_connections)).then_some(slot)
    }

    fn take_source_slot(&self, client: IpAddr) -> Option<SourceSlot<'_>> {
        let mut map = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(client).or_insert(0);
        if *n >= self.config.max_connections_per_source {
            return None;
        }
        *n += 1;
        Some(SourceSlot(self, client))
    }

    async fn handle(&self, frontend: usize, client: TcpStream, peer: SocketAddr) {
        let Some(f) = self.frontends.get(frontend) else {
            return;
        };
        let ip = peer.ip().to_canonical();
        if !self.config.access.allows(ip) {
            f.metrics.denied.increment(1);
            info!(listener = %f.listener.name, client = %ip, "client denied by the access list");
            refuse(client, DENIED).await;
            return;
        }
        let Some(_open) = self.take_open_slot() else {
            f.metrics.over_limit.increment(1);
            warn!(listener = %f.listener.name, client = %ip, max = self.config.max_connections, "connection limit reached");
            refuse(client, OVER_TOTAL).await;
            return;
        };
        let Some(_slot) = self.take_source_slot(ip) else {
            f.metrics.over_limit.increment(1);
            info!(listener = %f.listener.name, client = %ip, "too many connections from one client");
            refuse(client, OVER_LIMIT).await;
            return;
        };
        let session_id = self.next_session_id();
        self.serve(f, client, peer, &session_id).await;
    }

    async fn serve(&self, f: &Frontend, mut client: TcpStream, peer: SocketAddr, session_id: &str) {
        let name = &f.listener.name;
        let header = match (f.listener.proxy_protocol, client.local_addr()) {
            (true, Ok(local)) => Some(proxy_header(peer, local, session_id)),
            (true, Err(_)) => return,
            (false, _) => None,
        };
        let mut tried = Vec::new();
        let start = f.rotation.fetch_add(1, Ordering::Relaxed) as usize;
        let (worker, greeting, target) = loop {
            let Some(i) = choose(&f.targets, &tried, start) else {
                f.metrics.no_backend.increment(1);
                warn!(session_id, client = %peer, listener = %name, tried = tried.len(), "no worker available; 421 to the client");
                refuse(client, NO_BACKEND).await;
                return;
            };
            tried.push(i);
            let Some(t) = f.targets.get(i) else { return };
            match handoff(
                t.addr,
                self.config.source,
                header.as_deref(),
                self.config.handoff_timeout,
            )
            .await
            {
                Ok((worker, greeting)) => break (worker, greeting, Arc::clone(t)),
                Err(e) => {
                    counter!(metric::HANDOFF_RETRIES, "listener" => name.clone(), "reason" => e.reason)
                        .increment(1);
                    warn!(session_id, client = %peer, listener = %name, backend = %t.backend.name, error = %e, "worker skipped");
                    t.mark_suspect(self.config.probe.interval);
                }
            }
        };
        f.metrics.accepted.increment(1);
        let _session = target.session();
        f.metrics.active.increment(1.0);
        if client.write_all(&greeting).await.is_ok() {
            let r = relay(client, worker, self.config.idle_timeout).await;
            info!(session_id, client = %peer, listener = %name, backend = %target.backend.name, to_worker = r.to_worker, to_client = r.to_client, end = ?r.end, "session relayed");
        }
        f.metrics.active.decrement(1.0);
    }
}
