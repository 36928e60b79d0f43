//! The verified-credential cache (Dovecot's `auth_cache_ttl` and
//! `auth_cache_negative_ttl`). An entry's key is an HMAC-SHA256, under a
//! key drawn at random when the process starts, of the user name, the
//! password and a digest of the user's definition (hash, allowed senders,
//! allowed ranges): the password is never stored, and a user whose hash
//! or permissions change in a newer config no longer matches an old
//! entry. The HMAC key lives in the same process, so the entries are only
//! as safe as the process's memory: one who can read it (a core dump, a
//! debugger) has the key and can test guesses against the entries
//! offline, at HMAC speed rather than argon2's.
//! Those entries are also dropped when such a config is applied.
//!
//! Positive and negative entries live apart, each map capped, so that a
//! client sending random passwords churns only the negative one.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use ferry_config::User;
use rand::RngCore;
use ring::{digest, hmac};
use tokio::time::Instant;

/// Entries per map; beyond it expired entries go first, then any.
const MAX_ENTRIES: usize = 100_000;

/// The digest of an unknown user.
pub(crate) const NO_USER: [u8; 32] = [0; 32];

/// What the cache knows of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    Verified,
    Failed,
}

#[derive(Clone, Copy)]
struct Entry {
    /// When the pair was verified (or failed). An entry lives for the TTL
    /// of the config in service, not the one of the session that made it:
    /// a reload that lowers the TTL shortens every entry at once.
    made: Instant,
    /// The user's digest when the entry was made.
    user: [u8; 32],
}

impl Entry {
    fn live(&self, now: Instant, ttl: Duration) -> bool {
        now.saturating_duration_since(self.made) < ttl
    }
}

/// The TTLs of the config in service.
#[derive(Clone, Copy, Default)]
struct Ttls {
    positive: Duration,
    negative: Duration,
}

/// An entry's key (an HMAC tag).
pub(crate) type Key = [u8; 32];

pub(crate) struct CredentialCache {
    secret: hmac::Key,
    ttls: Mutex<Ttls>,
    positive: Mutex<HashMap<Key, Entry>>,
    negative: Mutex<HashMap<Key, Entry>>,
}

/// A digest of everything about `user` that decides its AUTH and what it
/// may do afterwards.
pub(crate) fn user_digest(user: &User) -> [u8; 32] {
    let mut d = digest::Context::new(&digest::SHA256);
    for part in [user.name.to_ascii_lowercase(), user.password_hash.clone()] {
        d.update(&(part.len() as u64).to_be_bytes());
        d.update(part.as_bytes());
    }
    for s in &user.allowed_senders {
        let s = s.to_string();
        d.update(&(s.len() as u64).to_be_bytes());
        d.update(s.as_bytes());
    }
    for r in &user.allowed_ranges {
        let r = r.to_string();
        d.update(&(r.len() as u64).to_be_bytes());
        d.update(r.as_bytes());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(d.finish().as_ref());
    out
}

impl CredentialCache {
    pub(crate) fn new() -> Self {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        Self {
            secret: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            ttls: Mutex::new(Ttls::default()),
            positive: Mutex::new(HashMap::new()),
            negative: Mutex::new(HashMap::new()),
        }
    }

    /// The key of `username` (any case) with `password`, for the user
    /// whose digest is `user`.
    pub(crate) fn key(&self, username: &str, password: &str, user: &[u8; 32]) -> Key {
        let mut ctx = hmac::Context::with_key(&self.secret);
        let name = username.to_ascii_lowercase();
        // Length prefixes: no two different pairs give the same input.
        ctx.update(&(name.len() as u64).to_be_bytes());
        ctx.update(name.as_bytes());
        ctx.update(&(password.len() as u64).to_be_bytes());
        ctx.update(password.as_bytes());
        ctx.update(user);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    fn ttls(&self) -> Ttls {
        *self.ttls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether either map is in use (a TTL of the config in service is
    /// not zero).
    pub(crate) fn is_on(&self) -> bool {
        let t = self.ttls();
        !t.positive.is_zero() || !t.negative.is_zero()
    }

    /// What is remembered of `key`, if it is younger than the TTL of the
    /// config in service.
    pub(crate) fn lookup(&self, key: &Key) -> Option<Known> {
        let now = Instant::now();
        let ttls = self.ttls();
        let live = |map: &Mutex<HashMap<Key, Entry>>, ttl| {
            let m = map.lock().unwrap_or_else(|p| p.into_inner());
            m.get(key).is_some_and(|e| e.live(now, ttl))
        };
        if live(&self.positive, ttls.positive) {
            Some(Known::Verified)
        } else if live(&self.negative, ttls.negative) {
            Some(Known::Failed)
        } else {
            None
        }
    }

    /// Remembers `key` as `known`, for the TTL of the config in service
    /// (nothing while that is zero, whatever the session's config says).
    /// A verified pair drops a negative entry of the same pair.
    pub(crate) fn insert(&self, key: Key, user: [u8; 32], known: Known) {
        let ttls = self.ttls();
        let ttl = match known {
            Known::Verified => ttls.positive,
            Known::Failed => ttls.negative,
        };
        if ttl.is_zero() {
            return;
        }
        let entry = Entry {
            made: Instant::now(),
            user,
        };
        let map = match known {
            Known::Verified => {
                let mut n = self.negative.lock().unwrap_or_else(|p| p.into_inner());
                n.remove(&key);
                &self.positive
            }
            Known::Failed => &self.negative,
        };
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_ENTRIES && !m.contains_key(&key) {
            let now = Instant::now();
            m.retain(|_, e| e.live(now, ttl));
            if m.len() >= MAX_ENTRIES {
                if let Some(any) = m.keys().next().copied() {
                    m.remove(&any);
                }
            }
        }
        m.insert(key, entry);
    }

    /// Takes the TTLs of a config going into service, and keeps only
    /// entries of users as `users` (their digests) define them, and of
    /// unknown users; clears a map whose TTL is now zero.
    pub(crate) fn configure(
        &self,
        users: &HashSet<[u8; 32]>,
        positive_ttl: Duration,
        negative_ttl: Duration,
    ) {
        *self.ttls.lock().unwrap_or_else(|p| p.into_inner()) = Ttls {
            positive: positive_ttl,
            negative: negative_ttl,
        };
        for (map, ttl) in [
            (&self.positive, positive_ttl),
            (&self.negative, negative_ttl),
        ] {
            let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
            if ttl.is_zero() {
                m.clear();
            } else {
                m.retain(|_, e| e.user == NO_USER || users.contains(&e.user));
            }
        }
    }

    /// Entries held (positive, negative), expired ones included.
    #[cfg(test)]
    pub(crate) fn len(&self) -> (usize, usize) {
        let n = |m: &Mutex<HashMap<Key, Entry>>| m.lock().map_or(0, |m| m.len());
        (n(&self.positive), n(&self.negative))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_differ_by_every_part_and_by_process() {
        let c = CredentialCache::new();
        let u = [7u8; 32];
        let k = c.key("Scanner", "pw", &u);
        assert_eq!(k, c.key("scanner", "pw", &u));
        assert_ne!(k, c.key("scanner", "pw2", &u));
        assert_ne!(k, c.key("scanne", "rpw", &u));
        assert_ne!(k, c.key("scanner", "pw", &[8u8; 32]));
        assert_ne!(k, CredentialCache::new().key("scanner", "pw", &u));
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_and_changed_users_are_dropped() {
        let c = CredentialCache::new();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let ka = c.key("a", "pw", &a);
        let kb = c.key("b", "bad", &b);
        c.configure(
            &[a, b].into(),
            Duration::from_secs(60),
            Duration::from_secs(10),
        );
        c.insert(ka, a, Known::Verified);
        c.insert(kb, b, Known::Failed);
        c.insert(c.key("n", "x", &NO_USER), NO_USER, Known::Failed);
        assert_eq!(c.lookup(&ka), Some(Known::Verified));
        assert_eq!(c.lookup(&kb), Some(Known::Failed));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(c.lookup(&kb), None);
        assert_eq!(c.lookup(&ka), Some(Known::Verified));
        // User a changed (its digest is gone), b stays.
        c.configure(
            &[b].into(),
            Duration::from_secs(60),
            Duration::from_secs(10),
        );
        assert_eq!(c.lookup(&ka), None);
        assert_eq!(c.len(), (0, 2));
        c.configure(&[b].into(), Duration::from_secs(60), Duration::ZERO);
        assert_eq!(c.len(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_ttl_in_service_rules_lookups_and_inserts() {
        let c = CredentialCache::new();
        let u = [1u8; 32];
        let long = Duration::from_secs(600);
        c.configure(&[u].into(), long, long);
        let k = c.key("a", "pw", &u);
        c.insert(k, u, Known::Verified);
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(c.lookup(&k), Some(Known::Verified));
        // Lowered to 10 s: the 20 s old entry is no longer a hit.
        c.configure(&[u].into(), Duration::from_secs(10), long);
        assert_eq!(c.lookup(&k), None);
        // Off: a session still on the old config inserts nothing.
        c.configure(&[u].into(), Duration::ZERO, long);
        c.insert(k, u, Known::Verified);
        assert_eq!(c.len(), (0, 0));
        assert!(c.is_on());
        c.configure(&[u].into(), Duration::ZERO, Duration::ZERO);
        assert!(!c.is_on());
    }
}
