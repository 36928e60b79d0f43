//! Putting a snapshot in service: the state each new connection reads,
//! and the reconciliation of listeners, workers and their probes.
//!
//! A worker port (listener name, backend name) whose address, backend
//! port and PROXY setting stay keeps its [`Target`]: health, drain and
//! open sessions carry over, and its probe task runs on unless the probe
//! settings changed (then it restarts on the same target). A target the
//! new config drops leaves the frontends, so it gets no new session; its
//! probe stops and its open sessions finish, holding their `Arc`.
//!
//! A new target (a new backend, or a new, renamed or re-pointed listener)
//! starts up only if its worker is: at process start every worker is
//! taken as up, as is a new target of a backend (same name and address)
//! with a target up before the apply (the handoff verifies every session,
//! so a listener added for workers already up serves its first client at
//! once). A backend new to the config, or one whose targets are all down,
//! waits for `rise` good probes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use ferry_config::{
    Backend, BalancerConfig, BalancerListener, ClusterConfig, ListenPort, ProbeSettings,
};
use ferry_node::{ApplyError, Reconciled, Role, Snapshot};
use metrics::{Counter, Gauge};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::metric;
use crate::pool::{Start, Target};
use crate::Balancer;

/// One listener and the workers behind it, as one snapshot has them.
pub struct Frontend {
    pub listener: BalancerListener,
    pub targets: Vec<Arc<Target>>,
    /// Where round-robin among equally loaded workers starts next.
    pub(crate) rotation: AtomicU64,
    /// Registered once the frontend is in service, so an apply that fails
    /// leaves no series for a listener that never served.
    metrics: OnceLock<FrontendMetrics>,
}

impl Frontend {
    fn new(listener: BalancerListener, targets: Vec<Arc<Target>>) -> Self {
        Self {
            listener,
            targets,
            rotation: AtomicU64::new(0),
            metrics: OnceLock::new(),
        }
    }

    pub(crate) fn metrics(&self) -> &FrontendMetrics {
        self.metrics
            .get_or_init(|| FrontendMetrics::new(&self.listener.name))
    }
}

/// The listener's metric handles, registered once per snapshot (the
/// per-connection path only touches atomics).
pub(crate) struct FrontendMetrics {
    pub accepted: Counter,
    pub denied: Counter,
    pub over_limit: Counter,
    pub no_backend: Counter,
    pub active: Gauge,
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

/// What a new connection reads, once, when it is accepted: the snapshot
/// (access list, caps, timeouts, source, probe settings) and one frontend
/// per listener, keyed by configured port. A relayed session keeps the
/// state it started with.
pub struct State {
    pub snapshot: Arc<Snapshot<BalancerConfig>>,
    pub frontends: BTreeMap<u16, Arc<Frontend>>,
}

impl State {
    /// The `[balancer]` section in service.
    pub fn config(&self) -> &BalancerConfig {
        &self.snapshot.material
    }

    /// The frontends in the config's listener order.
    pub fn frontends(&self) -> impl Iterator<Item = &Arc<Frontend>> {
        self.config()
            .listeners
            .iter()
            .filter_map(|l| self.frontends.get(&l.port))
    }

    /// Before the first apply: the snapshot, no listener.
    pub(crate) fn empty(snapshot: Arc<Snapshot<BalancerConfig>>) -> Self {
        Self {
            snapshot,
            frontends: BTreeMap::new(),
        }
    }
}

/// What a probe task was started with; a change restarts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProbePlan {
    source: Option<IpAddr>,
    settings: ProbeSettings,
}

/// A target in service and its probe task.
struct Probed {
    target: Arc<Target>,
    plan: ProbePlan,
    stop: CancellationToken,
}

/// (listener name, which listener of that name in config order (0 unless
/// the config names two alike), backend name).
type TargetKey = (String, usize, String);

/// The targets in service with their probes. Behind an async mutex held
/// across a whole apply, so two applies never interleave.
#[derive(Default)]
pub(crate) struct Targets {
    by_key: HashMap<TargetKey, Probed>,
    /// Some snapshot was applied: a target a later one adds starts as
    /// its backend's targets are ([`Targets::start_for`]).
    applied: bool,
}

impl Targets {
    /// How a new target of `backend` starts: up at the first apply, and
    /// when a target of the same backend (name and address, on any
    /// listener) is up now; otherwise (a backend new to the config, or
    /// down everywhere) after `rise` good probes.
    fn start_for(&self, backend: &Backend) -> Start {
        let up = self.by_key.values().any(|p| {
            p.target.name == backend.name
                && p.target.addr.ip() == backend.address
                && p.target.is_up()
        });
        match !self.applied || up {
            true => Start::Optimistic,
            false => Start::AfterRise,
        }
    }
}

impl Role for Balancer {
    type Material = BalancerConfig;

    /// The config's `[balancer]` section; a config without one is refused.
    fn prepare(config: &ClusterConfig) -> Result<BalancerConfig, Vec<String>> {
        config.balancer.clone().ok_or_else(|| {
            vec!["the config has no [balancer] section: a balancer has nothing to balance".into()]
        })
    }

    fn current(&self) -> Arc<Snapshot<BalancerConfig>> {
        Arc::clone(&self.state().snapshot)
    }

    /// Refused once shutdown has begun: a draining balancer binds no
    /// port, starts no probe and does not turn ready again.
    async fn apply(
        &self,
        snapshot: Arc<Snapshot<BalancerConfig>>,
    ) -> Result<Reconciled, ApplyError> {
        self.apply_snapshot(snapshot).await
    }
}

impl Balancer {
    /// Builds the new frontends (keeping the targets that stay), binds the
    /// new ports, swaps the state, then starts and stops probes. A port
    /// that cannot be bound returns before anything changed.
    async fn apply_snapshot(
        &self,
        snapshot: Arc<Snapshot<BalancerConfig>>,
    ) -> Result<Reconciled, ApplyError> {
        let mut table = self.targets.lock().await;
        // Checked under the lock: a reload that waited for another one
        // may find shutdown begun meanwhile.
        if self.shutdown.is_cancelled() {
            return Err(ApplyError::Refused("the balancer is shutting down".into()));
        }
        let config = &snapshot.material;
        let drains = self.drain_flags_for(config);
        let mut next: Vec<(TargetKey, Arc<Target>, u32)> = Vec::new();
        let mut frontends = BTreeMap::new();
        for (i, l) in config.listeners.iter().enumerate() {
            let twin = config
                .listeners
                .iter()
                .take(i)
                .filter(|o| o.name == l.name)
                .count();
            let mut targets = Vec::with_capacity(config.backends.len());
            for b in &config.backends {
                let key = (l.name.clone(), twin, b.name.clone());
                let target = match table.by_key.get(&key) {
                    Some(p) if p.target.serves(b, l) => Arc::clone(&p.target),
                    _ => {
                        let drain = drains.get(&b.name).cloned().unwrap_or_default();
                        // The table still holds the targets in service
                        // before this apply.
                        Arc::new(Target::new(b, l, drain, table.start_for(b)))
                    }
                };
                targets.push(Arc::clone(&target));
                next.push((key, target, b.weight));
            }
            frontends.insert(l.port, Arc::new(Frontend::new(l.clone(), targets)));
        }
        let state = Arc::new(State {
            snapshot: Arc::clone(&snapshot),
            frontends,
        });
        let ports: Vec<ListenPort> = config
            .listeners
            .iter()
            .map(|l| ListenPort {
                port: l.port,
                backlog: l.backlog,
            })
            .collect();
        let done = self
            .listeners
            .reconcile(&ports, || self.state.store(state), self.on_accept())
            .await?;

        // In service: nothing below can fail.
        for f in self.state().frontends.values() {
            f.metrics();
        }
        *self.drains.lock().unwrap_or_else(|p| p.into_inner()) = drains;
        let plan = ProbePlan {
            source: config.source,
            settings: config.probe,
        };
        let listeners: HashSet<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
        let mut old = std::mem::take(&mut table.by_key);
        // Retire first: a replacement with the same labels publishes after.
        old.retain(|key, p| {
            let kept = next
                .iter()
                .any(|(k, t, _)| k == key && Arc::ptr_eq(t, &p.target));
            if !kept {
                p.stop.cancel();
                p.target.retire(!listeners.contains(key.0.as_str()));
                info!(listener = %key.0, backend = %key.2, addr = %p.target.addr, active = p.target.active(), "worker removed: no new sessions, open ones finish");
            }
            kept
        });
        for (key, target, weight) in next {
            target.set_weight(weight);
            let probed = match old.remove(&key) {
                Some(p) if p.plan == plan => p,
                Some(p) => {
                    // New probe settings: a new task, the same state.
                    p.stop.cancel();
                    self.spawn_probe(p.target, plan)
                }
                None => {
                    match (table.applied, target.is_up()) {
                        (false, _) => {}
                        (true, true) => {
                            info!(listener = %key.0, backend = %key.2, addr = %target.addr, "worker added: in rotation at once, as its worker is up")
                        }
                        (true, false) => {
                            info!(listener = %key.0, backend = %key.2, addr = %target.addr, rise = plan.settings.rise, "worker added: in rotation after its probes pass")
                        }
                    }
                    self.spawn_probe(target, plan)
                }
            };
            probed.target.publish();
            table.by_key.insert(key, probed);
        }
        table.applied = true;
        // Shutdown may have begun during this apply; `is_ready` checks it
        // too, for a shutdown that begins right after this check.
        if !self.shutdown.is_cancelled() {
            self.listening.store(true, Ordering::Relaxed);
        }
        Ok(done)
    }

    /// The drain flag of each backend `config` names: the one it had, or a
    /// new one (clear). Flags of backends no longer named are dropped.
    fn drain_flags_for(&self, config: &BalancerConfig) -> HashMap<String, Arc<AtomicBool>> {
        let old = self.drains.lock().unwrap_or_else(|p| p.into_inner());
        config
            .backends
            .iter()
            .map(|b| {
                let flag = old.get(&b.name).cloned().unwrap_or_default();
                (b.name.clone(), flag)
            })
            .collect()
    }

    fn spawn_probe(&self, target: Arc<Target>, plan: ProbePlan) -> Probed {
        let stop = self.probes.child_token();
        tokio::spawn(crate::probe::run(
            Arc::clone(&target),
            plan.source,
            plan.settings,
            stop.clone(),
        ));
        Probed { target, plan, stop }
    }
}
