//! The `[auth]` section: how a worker verifies AUTH passwords under load.
//! Each argon2 verification holds its memory cost (19 MiB with the
//! defaults of `ferry user hash`) for tens of milliseconds, so a worker
//! bounds how many run at once, remembers credentials it verified, and
//! cuts off a client address that keeps failing (Dovecot's auth worker
//! pool and `auth_cache_ttl`, Postfix's anvil, fail2ban).

use std::time::Duration;

use crate::raw::RawAuth;
use crate::validate::Checker;

/// The `[auth]` settings; every key is optional.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthConfig {
    /// Password verifications running at once on a worker; `None` means
    /// the node's number of cores. Memory for hashing is bounded by this
    /// times the hashes' memory cost.
    pub max_verifications: Option<u32>,
    /// How long an AUTH waits for a free verification before it gets
    /// `454 4.7.0 Temporary authentication failure` (RFC 4954 §6).
    pub verification_wait: Duration,
    /// How long a verified user-and-password pair is remembered (a keyed
    /// hash of it, never the password); zero turns the cache off.
    pub cache_ttl: Duration,
    /// How long a pair that failed is remembered (answered `535` without
    /// a verification); zero turns this off.
    pub negative_cache_ttl: Duration,
    /// Failed AUTH from one client address within `failure_window` after
    /// which its AUTH gets `421 4.7.0` for `cooling_off`; 0 turns the
    /// limit off.
    pub max_failures: u32,
    pub failure_window: Duration,
    pub cooling_off: Duration,
}

impl Default for AuthConfig {
    /// fail2ban's defaults for the failure limit (5 in 10 minutes, 10
    /// minutes out); a 10-minute cache, a 1-minute negative cache.
    fn default() -> Self {
        Self {
            max_verifications: None,
            verification_wait: Duration::from_secs(10),
            cache_ttl: Duration::from_secs(10 * 60),
            negative_cache_ttl: Duration::from_secs(60),
            max_failures: 5,
            failure_window: Duration::from_secs(10 * 60),
            cooling_off: Duration::from_secs(10 * 60),
        }
    }
}

/// Validates the `[auth]` table.
pub(crate) fn auth(c: &mut Checker<'_>, raw: &RawAuth) -> AuthConfig {
    let d = AuthConfig::default();
    let max_verifications = raw.max_verifications.as_ref().map(|v| {
        if *v.get_ref() == 0 {
            c.err(v, "max_verifications must be at least 1");
        }
        (*v.get_ref()).max(1)
    });
    AuthConfig {
        max_verifications,
        verification_wait: c.duration(&raw.verification_wait, d.verification_wait),
        cache_ttl: c.duration_or_zero(&raw.cache_ttl, d.cache_ttl),
        negative_cache_ttl: c.duration_or_zero(&raw.negative_cache_ttl, d.negative_cache_ttl),
        max_failures: raw
            .max_failures
            .as_ref()
            .map_or(d.max_failures, |v| *v.get_ref()),
        failure_window: c.duration(&raw.failure_window, d.failure_window),
        cooling_off: c.duration(&raw.cooling_off, d.cooling_off),
    }
}
