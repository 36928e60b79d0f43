//! The `[auth]` section: how a worker verifies AUTH passwords under load.
//! Each argon2 verification holds its memory cost (19 MiB with the
//! defaults of `ferry user hash`) for tens of milliseconds, so a worker
//! bounds how many run at once, remembers credentials it verified, and
//! cuts off a client address that keeps failing (Dovecot's auth worker
//! pool and `auth_cache_ttl`, Postfix's anvil, fail2ban).

use std::time::Duration;

use toml::Spanned;

use crate::raw::RawAuth;
use crate::validate::Checker;

/// The most verifications at once a worker may be told to run: each holds
/// its hash's memory cost, and no node has cores for more.
pub const MAX_VERIFICATIONS: u32 = 1024;
/// The longest `verification_wait`: an AUTH waiting longer is a client
/// long gone.
pub const MAX_VERIFICATION_WAIT: Duration = Duration::from_secs(24 * 3600);
/// The longest cache TTL, failure window or cooling-off. Bounded so that
/// "now + duration" cannot overflow, whatever humantime accepts.
pub const MAX_AUTH_PERIOD: Duration = Duration::from_secs(30 * 24 * 3600);
/// The largest `max_failures`: a worker remembers up to this many recent
/// failures for each address it tracks.
pub const MAX_FAILURES: u32 = 1000;
/// The largest argon2 memory cost (`m`, KiB) a `password_hash` may name:
/// 1 GiB. A verification allocates it (a decoy too, for unknown users).
pub const MAX_HASH_MEMORY_KIB: u32 = 1024 * 1024;
/// The largest argon2 time cost (`t`, passes) a `password_hash` may name.
/// A verification holds one of the `max_verifications` slots for all its
/// passes: at t=3000 one AUTH held a slot for 38 s, and every other AUTH
/// waited for it. OWASP's recommendations use t from 1 to 5.
pub const MAX_HASH_PASSES: u32 = 16;
/// The largest argon2 parallelism (`p`, lanes) a `password_hash` may name.
pub const MAX_HASH_LANES: u32 = 16;

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
        let n = *v.get_ref();
        if n == 0 {
            c.err(v, "max_verifications must be at least 1");
        } else if n > MAX_VERIFICATIONS {
            c.err(
                v,
                format!("max_verifications must be at most {MAX_VERIFICATIONS}"),
            );
        }
        n.clamp(1, MAX_VERIFICATIONS)
    });
    let wait = c.duration(&raw.verification_wait, d.verification_wait);
    let cache_ttl = c.duration_or_zero(&raw.cache_ttl, d.cache_ttl);
    let negative_cache_ttl = c.duration_or_zero(&raw.negative_cache_ttl, d.negative_cache_ttl);
    let failure_window = c.duration(&raw.failure_window, d.failure_window);
    let cooling_off = c.duration(&raw.cooling_off, d.cooling_off);
    AuthConfig {
        max_verifications,
        verification_wait: at_most(
            c,
            &raw.verification_wait,
            wait,
            MAX_VERIFICATION_WAIT,
            "1 day",
        ),
        cache_ttl: at_most(c, &raw.cache_ttl, cache_ttl, MAX_AUTH_PERIOD, "30 days"),
        negative_cache_ttl: at_most(
            c,
            &raw.negative_cache_ttl,
            negative_cache_ttl,
            MAX_AUTH_PERIOD,
            "30 days",
        ),
        max_failures: raw.max_failures.as_ref().map_or(d.max_failures, |v| {
            let n = *v.get_ref();
            if n > MAX_FAILURES {
                c.err(v, format!("max_failures must be at most {MAX_FAILURES}"));
            }
            n.min(MAX_FAILURES)
        }),
        failure_window: at_most(
            c,
            &raw.failure_window,
            failure_window,
            MAX_AUTH_PERIOD,
            "30 days",
        ),
        cooling_off: at_most(c, &raw.cooling_off, cooling_off, MAX_AUTH_PERIOD, "30 days"),
    }
}

/// `value` (read from `raw`), or an error at `raw` and `max` when it is
/// longer than `max` (`said` in words).
fn at_most(
    c: &mut Checker<'_>,
    raw: &Option<Spanned<String>>,
    value: Duration,
    max: Duration,
    said: &str,
) -> Duration {
    if value <= max {
        return value;
    }
    if let Some(s) = raw {
        c.err(
            s,
            format!("'{}' is too long: at most {said}", s.get_ref().trim()),
        );
    }
    max
}

/// Checks a user's `password_hash`: an argon2 PHC string with a hash
/// output and parameters argon2 accepts, whose memory cost is at most
/// [`MAX_HASH_MEMORY_KIB`] (every verification, and the decoy for unknown
/// users, allocates it).
pub(crate) fn password_hash(c: &mut Checker<'_>, s: &Spanned<String>) {
    let Ok(phc) = argon2::PasswordHash::new(s.get_ref()) else {
        c.err(
            s,
            "password_hash is not an argon2 PHC string (make one with 'ferry user hash')",
        );
        return;
    };
    if argon2::Algorithm::try_from(phc.algorithm).is_err() {
        c.err(
            s,
            "password_hash is not an argon2 PHC string (make one with 'ferry user hash')",
        );
        return;
    }
    if phc.salt.is_none() || phc.hash.is_none() {
        c.err(
            s,
            "password_hash has no salt or no hash output (make one with 'ferry user hash')",
        );
        return;
    }
    match argon2::Params::try_from(&phc) {
        Ok(p) if p.m_cost() > MAX_HASH_MEMORY_KIB => c.err(
            s,
            format!(
                "password_hash's memory cost m={} KiB is over {MAX_HASH_MEMORY_KIB} KiB (1 GiB)",
                p.m_cost()
            ),
        ),
        Ok(p) if p.t_cost() > MAX_HASH_PASSES => c.err(
            s,
            format!(
                "password_hash's time cost t={} is over {MAX_HASH_PASSES} passes (each AUTH as this user would hold a verification slot that long)",
                p.t_cost()
            ),
        ),
        Ok(p) if p.p_cost() > MAX_HASH_LANES => c.err(
            s,
            format!(
                "password_hash's parallelism p={} is over {MAX_HASH_LANES} lanes",
                p.p_cost()
            ),
        ),
        Ok(_) => {}
        Err(_) => c.err(
            s,
            "password_hash has argon2 parameters argon2 refuses (m, t, p or the output length)",
        ),
    }
}
