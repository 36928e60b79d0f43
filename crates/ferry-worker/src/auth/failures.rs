//! Failed AUTH per client address (Postfix's anvil, fail2ban): after
//! `max_failures` failures within `failure_window`, AUTH from that address
//! gets `421 4.7.0` and the connection is closed, for `cooling_off`. An
//! IPv6 client counts by its /64, the block one host is usually given.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use ferry_config::AuthConfig;
use tokio::time::Instant;

use crate::metric;

/// Addresses tracked at once; beyond it a new address is not counted
/// (the verification bound still holds it to its share).
const MAX_CLIENTS: usize = 100_000;

#[derive(Default)]
struct Client {
    /// Times of recent failures, oldest first (at most `max_failures`).
    failures: VecDeque<Instant>,
    cooling_until: Option<Instant>,
}

#[derive(Default)]
pub(crate) struct FailureLimits {
    clients: Mutex<HashMap<IpAddr, Client>>,
}

/// The address failures of `client` count against.
fn counted_as(client: IpAddr) -> IpAddr {
    match client.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl FailureLimits {
    /// How long `client` has left to cool off, if it is cooling off.
    pub(crate) fn cooling_off(&self, client: IpAddr, cfg: &AuthConfig) -> Option<Duration> {
        if cfg.max_failures == 0 {
            return None;
        }
        let now = Instant::now();
        let c = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        c.get(&counted_as(client))
            .and_then(|e| e.cooling_until)
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    /// Counts one failed AUTH of `client`; true when this one starts its
    /// cooling-off.
    pub(crate) fn record(&self, client: IpAddr, cfg: &AuthConfig) -> bool {
        if cfg.max_failures == 0 {
            return false;
        }
        let now = Instant::now();
        let key = counted_as(client);
        let mut c = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if c.len() >= MAX_CLIENTS && !c.contains_key(&key) {
            Self::sweep_locked(&mut c, now, cfg.failure_window);
            if c.len() >= MAX_CLIENTS {
                return false;
            }
        }
        let e = c.entry(key).or_default();
        while e
            .failures
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= cfg.failure_window)
        {
            e.failures.pop_front();
        }
        e.failures.push_back(now);
        let max = usize::try_from(cfg.max_failures).unwrap_or(usize::MAX);
        if e.failures.len() < max {
            return false;
        }
        e.failures.clear();
        e.cooling_until = Some(now + cfg.cooling_off);
        let cooling = Self::count_cooling(&c, now);
        metrics::gauge!(metric::AUTH_CLIENTS_COOLING_OFF).set(cooling as f64);
        true
    }

    /// Forgets addresses with nothing recent and updates the gauge of
    /// clients cooling off.
    pub(crate) fn sweep(&self, window: Duration) {
        let now = Instant::now();
        let mut c = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        Self::sweep_locked(&mut c, now, window);
        let cooling = Self::count_cooling(&c, now);
        metrics::gauge!(metric::AUTH_CLIENTS_COOLING_OFF).set(cooling as f64);
    }

    fn sweep_locked(c: &mut HashMap<IpAddr, Client>, now: Instant, window: Duration) {
        c.retain(|_, e| {
            e.cooling_until.is_some_and(|u| u > now)
                || e.failures
                    .back()
                    .is_some_and(|t| now.saturating_duration_since(*t) < window)
        });
    }

    fn count_cooling(c: &HashMap<IpAddr, Client>, now: Instant) -> usize {
        c.values()
            .filter(|e| e.cooling_until.is_some_and(|u| u > now))
            .count()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limit_window_and_cooling_off() {
        let cfg = AuthConfig {
            max_failures: 3,
            failure_window: Duration::from_secs(60),
            cooling_off: Duration::from_secs(30),
            ..AuthConfig::default()
        };
        let l = FailureLimits::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(!l.record(a, &cfg));
        assert!(!l.record(a, &cfg));
        // The window slides: the first two are forgotten.
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!l.record(a, &cfg));
        assert!(!l.record(a, &cfg));
        assert!(l.cooling_off(a, &cfg).is_none());
        assert!(l.record(a, &cfg));
        assert_eq!(l.cooling_off(a, &cfg), Some(Duration::from_secs(30)));
        assert!(l.cooling_off(b, &cfg).is_none());
        // Turned off by a new config: no one is cooling off.
        let off = AuthConfig {
            max_failures: 0,
            ..cfg
        };
        assert!(l.cooling_off(a, &off).is_none());
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(l.cooling_off(a, &cfg).is_none());
        l.sweep(cfg.failure_window);
        assert!(l.clients.lock().unwrap().is_empty());
    }

    #[test]
    fn ipv6_counts_by_its_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(counted_as(a), counted_as(b));
        assert_ne!(counted_as(a), counted_as(c));
        let v4: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(counted_as(v4), "192.0.2.1".parse::<IpAddr>().unwrap());
    }
}
