//! The balancer node: each accepted connection under the state it was
//! accepted with (access control, the caps, the choice of a worker with
//! retries, the relay), the admin's drain, and graceful shutdown.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use ferry_config::BalancerConfig;
use ferry_node::{ListenerSet, OnAccept, Snapshot};
use metrics::counter;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::apply::{Frontend, State, Targets};
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

/// A balancer node: the state new connections read behind `arc-swap`,
/// the listening ports, the probes, and the counters every snapshot
/// shares (open connections, per-source counts, drain flags).
pub struct Balancer {
    pub(crate) state: ArcSwap<State>,
    pub(crate) listeners: ListenerSet,
    /// The targets in service and their probe tasks (see [`crate::apply`]).
    pub(crate) targets: tokio::sync::Mutex<Targets>,
    /// An administrator's drain flag per backend name; it survives
    /// reloads that keep the name.
    pub(crate) drains: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// Parent of every probe task's token.
    pub(crate) probes: CancellationToken,
    pub(crate) listening: AtomicBool,
    /// For the accept callback, which outlives no balancer.
    me: Weak<Balancer>,
    per_source: Mutex<HashMap<IpAddr, u32>>,
    /// Client connections open now, over all listeners.
    open: AtomicU64,
    pub(crate) shutdown: CancellationToken,
    tracker: TaskTracker,
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
    refuse_in_place(&mut stream, reply).await;
}

async fn refuse_in_place(stream: &mut TcpStream, reply: &[u8]) {
    let _ = tokio::time::timeout(REFUSAL_WRITE, async {
        stream.write_all(reply).await?;
        stream.shutdown().await
    })
    .await;
}

impl Balancer {
    /// A balancer on the node address `listen`, holding `first` but not
    /// listening yet: [`ferry_node::Role::apply`] it (the first apply binds the
    /// listeners and starts the probes, every worker up at once).
    pub fn new(first: Arc<Snapshot<BalancerConfig>>, listen: IpAddr) -> Arc<Self> {
        metric::describe();
        let session_base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
            << 8;
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        Arc::new_cyclic(|me| Self {
            state: ArcSwap::from_pointee(State::empty(first)),
            listeners: ListenerSet::new(listen, tracker.clone(), shutdown.clone()),
            targets: tokio::sync::Mutex::default(),
            drains: Mutex::default(),
            probes: CancellationToken::new(),
            listening: AtomicBool::new(false),
            me: me.clone(),
            per_source: Mutex::default(),
            open: AtomicU64::new(0),
            shutdown,
            tracker,
            session_base,
            session_seq: AtomicU64::new(0),
        })
    }

    /// The state new connections get now.
    pub fn state(&self) -> Arc<State> {
        self.state.load_full()
    }

    /// The bound listening addresses, in port order.
    pub async fn addresses(&self) -> Vec<SocketAddr> {
        self.listeners.addresses().await
    }

    /// Cancelling this token shuts the balancer down gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Listening, not shutting down, and some worker behind every
    /// listener takes sessions.
    pub fn is_ready(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
            && !self.shutdown.is_cancelled()
            && self
                .state()
                .frontends
                .values()
                .all(|f| f.targets.iter().any(|t| t.is_eligible()))
    }

    /// Sets or clears an administrator's drain of the worker `name` (on
    /// every listener, and across reloads that keep the name); false if
    /// the config in service has no such worker.
    pub fn set_drain(&self, name: &str, on: bool) -> bool {
        let flag = {
            let drains = self.drains.lock().unwrap_or_else(|p| p.into_inner());
            drains.get(name).cloned()
        };
        let Some(flag) = flag else { return false };
        flag.store(on, Ordering::Relaxed);
        for t in self.state().frontends.values().flat_map(|f| &f.targets) {
            if t.name == name {
                t.publish();
            }
        }
        info!(
            backend = name,
            drained = on,
            "drain set by an administrator"
        );
        true
    }

    /// Waits for shutdown; then stops accepting, waits up to
    /// `drain_limit` for open sessions, and stops the probes.
    pub async fn run(self: Arc<Self>, drain_limit: Duration) {
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
        self.probes.cancel();
    }

    /// What the listeners do with a connection: read the state once and
    /// serve the connection under it on the session tracker.
    pub(crate) fn on_accept(&self) -> OnAccept {
        let me = self.me.clone();
        Arc::new(move |stream, peer, port| {
            let Some(b) = me.upgrade() else { return };
            let state = b.state();
            let tracker = b.tracker.clone();
            tracker.spawn(async move { b.handle(state, port, stream, peer).await });
        })
    }

    /// A session id: printed as 16 hex digits ([`SessionId`]), kept as a
    /// number so an idle session holds no string for it.
    fn next_session_id(&self) -> SessionId {
        let n = self.session_seq.fetch_add(1, Ordering::Relaxed);
        SessionId(self.session_base.wrapping_add(n))
    }

    fn take_open_slot(&self, max: u32) -> Option<OpenSlot<'_>> {
        let before = self.open.fetch_add(1, Ordering::Relaxed);
        let slot = OpenSlot(self);
        (before < u64::from(max)).then_some(slot)
    }

    fn take_source_slot(&self, client: IpAddr, max: u32) -> Option<SourceSlot<'_>> {
        let mut map = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(client).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot(self, client))
    }

    /// One client connection on configured port `port`, under `state`
    /// (read when it was accepted) from start to end.
    async fn handle(&self, state: Arc<State>, port: u16, client: TcpStream, peer: SocketAddr) {
        let Some(f) = state.frontends.get(&port) else {
            // Accepted on a port this state no longer has, just as a
            // reload removed it: never a silent close.
            info!(port, client = %peer, "connection on a port just removed; 421");
            refuse(client, NO_BACKEND).await;
            return;
        };
        let config = state.config();
        let ip = peer.ip().to_canonical();
        if !config.access.allows(ip) {
            f.metrics().denied.increment(1);
            info!(listener = %f.listener.name, client = %ip, "client denied by the access list");
            refuse(client, DENIED).await;
            return;
        }
        let Some(_open) = self.take_open_slot(config.max_connections) else {
            f.metrics().over_limit.increment(1);
            warn!(listener = %f.listener.name, client = %ip, max = config.max_connections, "connection limit reached");
            refuse(client, OVER_TOTAL).await;
            return;
        };
        let Some(_slot) = self.take_source_slot(ip, config.max_connections_per_source) else {
            f.metrics().over_limit.increment(1);
            info!(listener = %f.listener.name, client = %ip, "too many connections from one client");
            refuse(client, OVER_LIMIT).await;
            return;
        };
        serve(config, f, client, peer, self.next_session_id()).await;
    }
}

/// The balancer's id of a session, sent to the worker in the PROXY
/// header (UNIQUE_ID) and logged by both: 16 hex digits.
#[derive(Debug, Clone, Copy)]
struct SessionId(u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

/// Hands the client to a worker, then relays. The handoff (connects,
/// PROXY header, reading the greeting: some 5 KB of future) runs boxed
/// and is freed before the relay starts, so an idle session's task holds
/// only the relay's state, its two sockets and a few handles.
async fn serve(
    config: &BalancerConfig,
    f: &Frontend,
    mut client: TcpStream,
    peer: SocketAddr,
    session_id: SessionId,
) {
    let handed = Box::pin(hand_over(config, f, &mut client, peer, session_id)).await;
    let Some((worker, greeting, target)) = handed else {
        return;
    };
    f.metrics().accepted.increment(1);
    let _session = target.session();
    f.metrics().active.increment(1.0);
    let greeted = client.write_all(&greeting).await.is_ok();
    drop(greeting);
    if greeted {
        let r = relay(client, worker, config.idle_timeout).await;
        info!(%session_id, client = %peer, listener = %f.listener.name, backend = %target.name, to_worker = r.to_worker, to_client = r.to_client, end = ?r.end, "session relayed");
    }
    f.metrics().active.decrement(1.0);
}

/// Finds a worker that greets with `220` (see [`handoff`]): its stream,
/// its greeting and its target; `None` if no worker would (the client
/// got `421`).
async fn hand_over(
    config: &BalancerConfig,
    f: &Frontend,
    client: &mut TcpStream,
    peer: SocketAddr,
    session_id: SessionId,
) -> Option<(TcpStream, Vec<u8>, Arc<Target>)> {
    let name = &f.listener.name;
    let header = match (f.listener.proxy_protocol, client.local_addr()) {
        (true, Ok(local)) => Some(proxy_header(peer, local, &session_id.to_string())),
        (true, Err(_)) => return None,
        (false, _) => None,
    };
    let mut tried = Vec::new();
    let start = f.rotation.fetch_add(1, Ordering::Relaxed) as usize;
    loop {
        let Some(i) = choose(&f.targets, &tried, start) else {
            f.metrics().no_backend.increment(1);
            warn!(%session_id, client = %peer, listener = %name, tried = tried.len(), "no worker available; 421 to the client");
            refuse_in_place(client, NO_BACKEND).await;
            return None;
        };
        tried.push(i);
        let t = f.targets.get(i)?;
        match handoff(
            t.addr,
            config.source,
            header.as_deref(),
            config.handoff_timeout,
        )
        .await
        {
            Ok((worker, greeting)) => return Some((worker, greeting, Arc::clone(t))),
            Err(e) => {
                counter!(metric::HANDOFF_RETRIES, "listener" => name.clone(), "reason" => e.reason)
                    .increment(1);
                warn!(%session_id, client = %peer, listener = %name, backend = %t.name, error = %e, "worker skipped");
                t.mark_suspect(config.probe.interval);
            }
        }
    }
}
