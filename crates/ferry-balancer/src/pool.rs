//! The workers behind one listener, with their health and load.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_config::{Backend, ProbeSettings};

use crate::metric;
use crate::probe::ProbeResult;

/// One worker port as seen from one listener.
#[derive(Debug)]
pub struct Target {
    pub backend: Backend,
    pub listener: String,
    pub addr: SocketAddr,
    /// Shared by every listener's target for this worker: set by an admin.
    pub admin_drain: Arc<AtomicBool>,
    up: AtomicBool,
    /// The worker answered its probe with `421`: it is draining itself.
    self_drain: AtomicBool,
    good: AtomicU32,
    bad: AtomicU32,
    active: AtomicUsize,
    suspect_until: Mutex<Option<Instant>>,
}

impl Target {
    pub fn new(backend: Backend, listener: &str, port: u16, admin_drain: Arc<AtomicBool>) -> Self {
        let addr = SocketAddr::new(backend.address, port);
        let t = Self {
            backend,
            listener: listener.to_string(),
            addr,
            admin_drain,
            // Optimistic until the first probes say otherwise: the handoff
            // verifies every session anyway.
            up: AtomicBool::new(true),
            self_drain: AtomicBool::new(false),
            good: AtomicU32::new(0),
            bad: AtomicU32::new(0),
            active: AtomicUsize::new(0),
            suspect_until: Mutex::new(None),
        };
        t.publish();
        t
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

    /// Updates the state gauges.
    pub fn publish(&self) {
        let labels = [
            ("listener", self.listener.clone()),
            ("backend", self.backend.name.clone()),
        ];
        metrics::gauge!(metric::BACKEND_UP, &labels).set(if self.is_up() { 1.0 } else { 0.0 });
        metrics::gauge!(metric::BACKEND_DRAINING, &labels).set(if self.is_draining() {
            1.0
        } else {
            0.0
        });
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
            let load = (t.active() as u64 + 1) * 1_000_000 / u64::from(t.backend.weight.max(1));
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
        Arc::new(Target::new(backend, "smtp", 25, Arc::default()))
    }

    #[test]
    fn least_connections_weighted() {
        let ts = vec![target("a", 1), target("b", 3)];
        // b has three times the weight: three sessions to each one of a.
        let mut held = Vec::new();
        let mut picks = String::new();
        for _ in 0..5 {
            let i = choose(&ts, &[], 0).unwrap();
            picks.push_str(&ts[i].backend.name);
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
