//! The workers behind one listener, with their health and load.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_config::{Backend, BalancerListener, ProbeSettings};

use crate::metric;
use crate::probe::ProbeResult;

/// How a target starts before its first probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Up at once (the handoff verifies every session anyway): at process
    /// start, and for a new port of a worker that is up behind another.
    Optimistic,
    /// Down until `rise` good probes: a backend new to the config, or one
    /// that is down everywhere.
    AfterRise,
}

/// One worker port as seen from one listener. A reload keeps it (with its
/// health, drain and sessions) as long as the worker's address, the
/// listener's backend port and its PROXY setting stay.
#[derive(Debug)]
pub struct Target {
    /// The backend's name in the config.
    pub name: String,
    pub listener: String,
    pub addr: SocketAddr,
    /// Whether sessions and probes send a PROXY v2 header first.
    pub proxy: bool,
    /// Shared by every listener's target for this worker, and across
    /// reloads: set by an admin.
    pub admin_drain: Arc<AtomicBool>,
    /// The backend's weight; a reload may change it in place.
    weight: AtomicU32,
    up: AtomicBool,
    /// The worker answered its probe with `421`: it is draining itself.
    self_drain: AtomicBool,
    good: AtomicU32,
    bad: AtomicU32,
    active: AtomicUsize,
    suspect_until: Mutex<Option<Instant>>,
    /// True once a reload removed it: its gauges are no longer updated.
    /// A lock, not an atomic, so a probe's last update cannot land after
    /// the retirement.
    retired: Mutex<bool>,
}

impl Target {
    /// The target for `backend` behind `listener`. Its gauges are set on
    /// the first [`Target::publish`], once it is in service.
    pub fn new(
        backend: &Backend,
        listener: &BalancerListener,
        admin_drain: Arc<AtomicBool>,
        start: Start,
    ) -> Self {
        Self {
            name: backend.name.clone(),
            listener: listener.name.clone(),
            addr: SocketAddr::new(backend.address, listener.backend_port),
            proxy: listener.proxy_protocol,
            admin_drain,
            weight: AtomicU32::new(backend.weight),
            up: AtomicBool::new(start == Start::Optimistic),
            self_drain: AtomicBool::new(false),
            good: AtomicU32::new(0),
            bad: AtomicU32::new(0),
            active: AtomicUsize::new(0),
            suspect_until: Mutex::new(None),
            retired: Mutex::new(false),
        }
    }

    /// The same worker port for `listener` and `backend`: a reload keeps
    /// this target's state.
    pub fn serves(&self, backend: &Backend, listener: &BalancerListener) -> bool {
        self.addr == SocketAddr::new(backend.address, listener.backend_port)
            && self.proxy == listener.proxy_protocol
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight, Ordering::Relaxed);
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.admin_drain.load(Ordering::Relaxed) || self.self_drain.load(Ordering::Relaxed)
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    fn is_suspect(&self) -> bool {
        let s = self.suspect_until.lock().unwrap_or_else(|p| p.into_inner());
        s.is_some_and(|until| Instant::now() < until)
    }

    /// May get a new session now.
    pub fn is_eligible(&self) -> bool {
        self.is_up() && !self.is_draining() && !self.is_suspect()
    }

    /// A handoff failed: no new sessions for `for_how_long` (the next good
    /// probe does not clear it; time does).
    pub fn mark_suspect(&self, for_how_long: Duration) {
        let mut s = self.suspect_until.lock().unwrap_or_else(|p| p.into_inner());
        *s = Some(Instant::now() + for_how_long);
    }

    /// Counts a session for least-connections; released when dropped.
    pub fn session(self: &Arc<Self>) -> SessionGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        SessionGuard(Arc::clone(self))
    }

    /// Applies one probe result; returns a change worth logging.
    pub fn record(&self, result: &ProbeResult, settings: &ProbeSettings) -> Option<&'static str> {
        let change = match result {
            ProbeResult::Up | ProbeResult::Draining => {
                self.bad.store(0, Ordering::Relaxed);
                let good = self.good.fetch_add(1, Ordering::Relaxed) + 1;
                let draining = matches!(result, ProbeResult::Draining);
                let was_draining = self.self_drain.swap(draining, Ordering::Relaxed);
                if !self.is_up() && good >= settings.rise {
                    self.up.store(true, Ordering::Relaxed);
                    Some("up")
                } else if draining != was_draining {
                    Some(if draining { "draining" } else { "drain ended" })
                } else {
                    None
                }
            }
            ProbeResult::Failed { .. } => {
                self.good.store(0, Ordering::Relaxed);
                let bad = self.bad.fetch_add(1, Ordering::Relaxed) + 1;
                if self.is_up() && bad >= settings.fall {
                    self.up.store(false, Ordering::Relaxed);
                    Some("down")
                } else {
                    None
                }
            }
        };
        self.publish();
        change
    }

    fn labels(&self) -> [(&'static str, String); 2] {
        [
            ("listener", self.listener.clone()),
            ("backend", self.name.clone()),
        ]
    }

    /// Updates the state gauges (not once retired).
    pub fn publish(&self) {
        let retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        if *retired {
            return;
        }
        let labels = self.labels();
        metrics::gauge!(metric::BACKEND_UP, &labels).set(if self.is_up() { 1.0 } else { 0.0 });
        metrics::gauge!(metric::BACKEND_DRAINING, &labels).set(if self.is_draining() {
            1.0
        } else {
            0.0
        });
    }

    /// A reload removed this target: its open sessions run on, its gauges
    /// stop. The exporter cannot delete a series, so they are left where
    /// the shipped alerts and dashboard count no worker: while its
    /// listener stays, up 1 and draining 1 (neither a worker down nor one
    /// in rotation); with its listener gone, NaN (so that listener's sum
    /// is no number, not a "no worker" zero). A later target with the
    /// same listener and backend names publishes over them.
    pub fn retire(&self, listener_gone: bool) {
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        *retired = true;
        let labels = self.labels();
        let value = if listener_gone { f64::NAN } else { 1.0 };
        metrics::gauge!(metric::BACKEND_UP, &labels).set(value);
        metrics::gauge!(metric::BACKEND_DRAINING, &labels).set(value);
    }

    /// Whether a reload removed this target.
    pub fn is_retired(&self) -> bool {
        *self.retired.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One session on a target.
pub struct SessionGuard(Arc<Target>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Picks the eligible target with the fewest sessions per unit of weight,
/// skipping those already tried for this client. Ties go round-robin:
/// the first in order from `start`.
pub fn choose(targets: &[Arc<Target>], tried: &[usize], start: usize) -> Option<usize> {
    let n = targets.len().max(1);
    targets
        .iter()
        .enumerate()
        .filter(|(i, t)| !tried.contains(i) && t.is_eligible())
        .min_by_key(|(i, t)| {
            // Sessions per unit of weight, in millionths.
            let load = (t.active() as u64 + 1) * 1_000_000 / u64::from(t.weight().max(1));
            (load, (i + n - start % n) % n)
        })
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn target(name: &str, weight: u32) -> Arc<Target> {
        let backend = Backend {
            name: name.into(),
            address: "127.0.0.1".parse().unwrap(),
            weight,
        };
        let listener = BalancerListener {
            name: "smtp".into(),
            port: 25,
            backend_port: 25,
            proxy_protocol: true,
            backlog: ferry_config::DEFAULT_BACKLOG,
        };
        Arc::new(Target::new(
            &backend,
            &listener,
            Arc::default(),
            Start::Optimistic,
        ))
    }

    #[test]
    fn least_connections_weighted() {
        let ts = vec![target("a", 1), target("b", 3)];
        // b has three times the weight: three sessions to each one of a.
        let mut held = Vec::new();
        let mut picks = String::new();
        for _ in 0..5 {
            let i = choose(&ts, &[], 0).unwrap();
            picks.push_str(&ts[i].name);
            held.push(ts[i].session());
        }
        assert_eq!(picks, "bbabb");
        assert_eq!(choose(&ts, &[0, 1], 0), None);
        drop(held);
        // Idle and equal: round-robin from the start offset.
        let even = vec![target("a", 1), target("b", 1), target("c", 1)];
        let order: Vec<usize> = (0..4).map(|k| choose(&even, &[], k).unwrap()).collect();
        assert_eq!(order, [0, 1, 2, 0]);
        ts[1].mark_suspect(Duration::from_secs(60));
        assert_eq!(choose(&ts, &[], 0), Some(0));
        ts[0].admin_drain.store(true, Ordering::Relaxed);
        assert_eq!(choose(&ts, &[], 0), None);
    }

    #[test]
    fn rise_and_fall_need_consecutive_results() {
        let t = target("a", 1);
        let s = ProbeSettings {
            rise: 2,
            fall: 3,
            ..ProbeSettings::default()
        };
        let fail = ProbeResult::Failed {
            stage: "connect",
            reason: String::new(),
        };
        assert_eq!(t.record(&fail, &s), None);
        assert_eq!(t.record(&fail, &s), None);
        assert_eq!(t.record(&ProbeResult::Up, &s), None);
        assert!(t.is_up(), "a good probe resets the count");
        for _ in 0..2 {
            t.record(&fail, &s);
        }
        assert_eq!(t.record(&fail, &s), Some("down"));
        assert!(!t.is_eligible());
        assert_eq!(t.record(&ProbeResult::Up, &s), None);
        assert_eq!(t.record(&ProbeResult::Up, &s), Some("up"));
        assert_eq!(t.record(&ProbeResult::Draining, &s), Some("draining"));
        assert!(t.is_up() && !t.is_eligible());
    }
}
