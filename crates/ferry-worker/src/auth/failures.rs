//! Failed AUTH per client address (Postfix's anvil, fail2ban): after
//! `max_failures` failures within `failure_window`, AUTH from that address
//! gets `421 4.7.0` and the connection is closed, for `cooling_off`. An
//! IPv6 client counts by its /64, the block one host is usually given.
//!
//! A failure counts once per user-and-password pair (the pair's cache
//! key): a device retrying a stale password does not cut off its address,
//! and the right passwords of other devices behind the same NAT with it,
//! while a guesser, who changes passwords, is counted at each guess
//! (Dovecot's auth penalty does the same).
//!
//! The table is bounded: when it is full, a new address takes the place
//! of the oldest one tracked that is not cooling off, so fresh addresses
//! are still counted. Forgetting old entries is the background sweep's
//! work (every second), never a failure's.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use ferry_config::AuthConfig;
use tokio::time::Instant;

use super::cache::Key;
use crate::metric;

/// Addresses tracked at once.
const MAX_CLIENTS: usize = 100_000;
/// Entries looked at, oldest first, for one to give up its place when
/// the table is full: a full table costs a new address this much, never
/// a pass over the table.
const EVICTION_PROBES: usize = 64;

struct Client {
    /// Recent failures (when, and the pair's key), oldest first; fewer
    /// than `max_failures`.
    failures: VecDeque<(Instant, Key)>,
    cooling_until: Option<Instant>,
}

#[derive(Default)]
struct Table {
    clients: HashMap<IpAddr, Client>,
    /// The addresses of `clients`, oldest first (the order they came in).
    order: VecDeque<IpAddr>,
}

#[derive(Default)]
pub(crate) struct FailureLimits {
    table: Mutex<Table>,
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

fn is_cooling(c: &Client, now: Instant) -> bool {
    c.cooling_until.is_some_and(|u| u > now)
}

impl Table {
    /// Makes room for one more address: drops the oldest of the first
    /// [`EVICTION_PROBES`] addresses that is not cooling off (those that
    /// are go to the back), or, when all of them are, the first one.
    fn evict_one(&mut self, now: Instant) {
        let mut first_cooling = None;
        for _ in 0..EVICTION_PROBES.min(self.order.len()) {
            let Some(ip) = self.order.pop_front() else {
                break;
            };
            match self.clients.get(&ip) {
                None => continue,
                Some(c) if is_cooling(c, now) => {
                    first_cooling.get_or_insert(ip);
                    self.order.push_back(ip);
                }
                Some(_) => {
                    self.clients.remove(&ip);
                    return;
                }
            }
        }
        if let Some(ip) = first_cooling {
            self.clients.remove(&ip);
            self.order.retain(|a| *a != ip);
        }
    }

    fn count_cooling(&self, now: Instant) -> usize {
        self.clients.values().filter(|c| is_cooling(c, now)).count()
    }
}

impl FailureLimits {
    /// How long `client` has left to cool off, if it is cooling off.
    pub(crate) fn cooling_off(&self, client: IpAddr, cfg: &AuthConfig) -> Option<Duration> {
        if cfg.max_failures == 0 {
            return None;
        }
        let now = Instant::now();
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.clients
            .get(&counted_as(client))
            .and_then(|e| e.cooling_until)
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    /// Counts one failed AUTH of `client` with the pair whose key is
    /// `pair` (not again while that pair is among its recent failures);
    /// true when this one starts its cooling-off.
    pub(crate) fn record(&self, client: IpAddr, pair: &Key, cfg: &AuthConfig) -> bool {
        if cfg.max_failures == 0 {
            return false;
        }
        let now = Instant::now();
        let key = counted_as(client);
        let mut guard = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let t = &mut *guard;
        if !t.clients.contains_key(&key) {
            while t.clients.len() >= MAX_CLIENTS && !t.order.is_empty() {
                t.evict_one(now);
            }
            t.order.push_back(key);
        }
        let e = t.clients.entry(key).or_insert_with(|| Client {
            failures: VecDeque::new(),
            cooling_until: None,
        });
        while e
            .failures
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= cfg.failure_window)
        {
            e.failures.pop_front();
        }
        if e.failures.iter().any(|(_, k)| k == pair) {
            return false;
        }
        e.failures.push_back((now, *pair));
        let max = usize::try_from(cfg.max_failures).unwrap_or(usize::MAX);
        if e.failures.len() < max {
            return false;
        }
        e.failures.clear();
        e.cooling_until = now.checked_add(cfg.cooling_off);
        let cooling = t.count_cooling(now);
        metrics::gauge!(metric::AUTH_CLIENTS_COOLING_OFF).set(cooling as f64);
        true
    }

    /// Forgets addresses with nothing recent (everything when the limit
    /// is off) and updates the gauge of clients cooling off.
    pub(crate) fn sweep(&self, cfg: &AuthConfig) {
        let now = Instant::now();
        let mut guard = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let t = &mut *guard;
        if cfg.max_failures == 0 {
            t.clients.clear();
            t.order.clear();
        } else {
            t.clients.retain(|_, e| {
                is_cooling(e, now)
                    || e.failures.back().is_some_and(|(t, _)| {
                        now.saturating_duration_since(*t) < cfg.failure_window
                    })
            });
            let clients = &t.clients;
            t.order.retain(|ip| clients.contains_key(ip));
        }
        let cooling = t.count_cooling(now);
        metrics::gauge!(metric::AUTH_CLIENTS_COOLING_OFF).set(cooling as f64);
    }

    /// Addresses tracked now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.table.lock().map_or(0, |t| t.clients.len())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg() -> AuthConfig {
        AuthConfig {
            max_failures: 3,
            failure_window: Duration::from_secs(60),
            cooling_off: Duration::from_secs(30),
            ..AuthConfig::default()
        }
    }

    /// A distinct pair's key for each `n`.
    fn pair(n: u32) -> Key {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&n.to_be_bytes());
        k
    }

    #[tokio::test(start_paused = true)]
    async fn limit_window_and_cooling_off() {
        let cfg = cfg();
        let l = FailureLimits::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(!l.record(a, &pair(1), &cfg));
        assert!(!l.record(a, &pair(2), &cfg));
        // The window slides: the first two are forgotten.
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!l.record(a, &pair(3), &cfg));
        assert!(!l.record(a, &pair(4), &cfg));
        assert!(l.cooling_off(a, &cfg).is_none());
        assert!(l.record(a, &pair(5), &cfg));
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
        l.sweep(&cfg);
        assert_eq!(l.tracked(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_wrong_pair_counts_once() {
        let cfg = cfg();
        let l = FailureLimits::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..10 {
            assert!(!l.record(a, &pair(1), &cfg));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert!(l.cooling_off(a, &cfg).is_none());
        assert!(!l.record(a, &pair(2), &cfg));
        assert!(l.record(a, &pair(3), &cfg));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_still_counts_new_addresses_and_keeps_those_cooling_off() {
        let cfg = cfg();
        let l = FailureLimits::default();
        let v4 = |n: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
        // The first address is cut off, then the table fills up.
        for p in 0..3 {
            l.record(v4(0), &pair(p), &cfg);
        }
        assert!(l.cooling_off(v4(0), &cfg).is_some());
        for n in 1..MAX_CLIENTS as u32 {
            l.record(v4(n), &pair(0), &cfg);
        }
        assert_eq!(l.tracked(), MAX_CLIENTS);
        // A new address guessing is counted and cut off all the same; the
        // table stays at its bound, and the one cooling off is kept.
        let fresh: IpAddr = "198.51.100.7".parse().unwrap();
        assert!(!l.record(fresh, &pair(1), &cfg));
        assert!(!l.record(fresh, &pair(2), &cfg));
        assert!(l.record(fresh, &pair(3), &cfg));
        assert!(l.cooling_off(fresh, &cfg).is_some());
        assert!(l.cooling_off(v4(0), &cfg).is_some());
        assert_eq!(l.tracked(), MAX_CLIENTS);
        // The oldest not cooling off gave up its place.
        let t = l.table.lock().unwrap();
        assert!(!t.clients.contains_key(&v4(1)));
        assert!(t.clients.contains_key(&v4(2)));
        assert_eq!(t.order.len(), MAX_CLIENTS);
    }

    #[tokio::test(start_paused = true)]
    async fn turned_off_forgets_everyone() {
        let cfg = cfg();
        let l = FailureLimits::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for p in 0..3 {
            l.record(a, &pair(p), &cfg);
        }
        l.sweep(&cfg);
        assert_eq!(l.tracked(), 1);
        l.sweep(&AuthConfig {
            max_failures: 0,
            ..cfg
        });
        assert_eq!(l.tracked(), 0);
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
