//! Password checks for AUTH, built to hold under load: verifications run
//! a bounded number at once ([`pool`]), verified credentials are
//! remembered for a while under a keyed hash ([`cache`]), and a client
//! address that keeps failing is cut off for a cooling-off period
//! ([`failures`]). All three live in the worker's core, so they survive
//! reloads; [`Authenticator::configure`] tunes them to each new config.
//! An unknown user costs a verification of a decoy hash with the
//! parameters the configured users' hashes have, so the time taken does
//! not tell which user names exist.

mod cache;
mod failures;
mod pool;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{Output, PasswordHash, Salt};
use ferry_config::{AuthConfig, ClusterConfig, User};
use ferry_smtp::{Credentials, Reply};
use metrics::counter;
use zeroize::Zeroizing;

use crate::metric;
use cache::{CredentialCache, Known};
use failures::FailureLimits;
use pool::VerifierPool;

/// A hash of nothing anyone knows, checked for unknown users when no
/// configured user has a hash to take the parameters from.
const DECOY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$ZmVycnlkZWNveQ$0Q0cSKsXm7ZJ9bSxXoa4wQ8r0fQ2mBqvWx1ZlZ7H6pA";
/// The decoy's salt ("ferrydecoy", base64 without padding).
const DECOY_SALT: &str = "ZmVycnlkZWNveQ";

/// What an AUTH attempt comes to.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The credentials prove this user.
    Verified(Arc<User>),
    /// A wrong password, an unknown user, or another identity asked for.
    Invalid(Failure),
    /// No verification could start within `verification_wait`.
    Busy,
}

/// A failed AUTH, as the failure limit counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failure {
    /// The pair's cache key: one pair counts once per client.
    pair: cache::Key,
    /// The pair was answered from the negative cache: it failed before,
    /// so it is not counted again (a device retrying a stale password).
    remembered: bool,
}

/// The replies AUTH handling sends besides `235`, each with its metric
/// reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthRefusal {
    /// RFC 4954 §6: `535 5.7.8`.
    Invalid,
    /// RFC 4954 §6: `454 4.7.0`, try again later.
    Busy,
    /// Too many failures from this client: `421 4.7.0`, then closed
    /// (RFC 5321 §3.8 lets a server close with 421).
    CoolingOff,
}

impl AuthRefusal {
    pub(crate) fn reply(self) -> Reply {
        match self {
            AuthRefusal::Invalid => Reply::new(535, "5.7.8 Authentication credentials invalid"),
            AuthRefusal::Busy => Reply::new(454, "4.7.0 Temporary authentication failure"),
            AuthRefusal::CoolingOff => Reply::new(
                421,
                "4.7.0 Too many failed authentication attempts, closing transmission channel",
            ),
        }
    }

    /// The `reason` label of `ferry_auth_refused_total`.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            AuthRefusal::Invalid => "invalid",
            AuthRefusal::Busy => "busy",
            AuthRefusal::CoolingOff => "cooling_off",
        }
    }
}

/// The verification pool, the credential cache and the failure counters
/// of one worker process.
pub(crate) struct Authenticator {
    pool: Arc<VerifierPool>,
    cache: CredentialCache,
    failures: FailureLimits,
}

/// The node's cores: the default bound on verifications at once.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

impl Authenticator {
    pub(crate) fn new(config: &ClusterConfig) -> Self {
        let a = Self {
            pool: VerifierPool::new(1),
            cache: CredentialCache::new(),
            failures: FailureLimits::default(),
        };
        a.configure(config);
        a
    }

    /// Tunes to a config going into service: the pool's size, and the
    /// cache keeps only entries of users it defines as they were.
    pub(crate) fn configure(&self, config: &ClusterConfig) {
        let auth = &config.auth;
        self.pool.resize(
            auth.max_verifications
                .map_or_else(cores, |n| usize::try_from(n).unwrap_or(usize::MAX)),
        );
        let users: HashSet<[u8; 32]> = config
            .users
            .values()
            .map(|u| cache::user_digest(u))
            .collect();
        self.cache
            .configure(&users, auth.cache_ttl, auth.negative_cache_ttl);
    }

    /// How long `client` has left to cool off, if it is cooling off.
    pub(crate) fn cooling_off(&self, client: IpAddr, config: &AuthConfig) -> Option<Duration> {
        self.failures.cooling_off(client, config)
    }

    /// Counts a failed AUTH of `client` (not a pair that failed before);
    /// true when it starts cooling off.
    pub(crate) fn failed(&self, client: IpAddr, failure: &Failure, config: &AuthConfig) -> bool {
        if failure.remembered {
            return false;
        }
        let cut = self.failures.record(client, &failure.pair, config);
        if cut {
            counter!(metric::AUTH_CLIENTS_CUT_OFF).increment(1);
        }
        cut
    }

    /// Forgets old failures and updates the cooling-off gauge.
    pub(crate) fn sweep(&self, config: &AuthConfig) {
        self.failures.sweep(config);
    }

    /// Checks `creds` against the users of `config` (the session's
    /// snapshot), from the cache when it knows the pair. The cache's TTLs
    /// are those of the config in service, which may be newer.
    pub(crate) async fn verify(&self, config: &ClusterConfig, creds: Credentials) -> Outcome {
        let Credentials {
            username,
            password,
            authzid,
            ..
        } = creds;
        // Wiped when dropped, here or after the verification.
        let password = Zeroizing::new(password);
        let user = config.user(&username).cloned();
        let digest = user.as_deref().map_or(cache::NO_USER, cache::user_digest);
        let key = self.cache.key(&username, &password, &digest);
        let failure = |remembered| {
            Outcome::Invalid(Failure {
                pair: key,
                remembered,
            })
        };
        // PLAIN may name an identity to act as: only oneself is allowed.
        if !authzid.is_empty() && !authzid.eq_ignore_ascii_case(&username) {
            return failure(false);
        }
        match (self.cache.lookup(&key), &user) {
            (Some(Known::Verified), Some(user)) => {
                counter!(metric::AUTH_CACHE, "result" => "hit").increment(1);
                return Outcome::Verified(Arc::clone(user));
            }
            (Some(Known::Failed), _) => {
                counter!(metric::AUTH_CACHE, "result" => "negative_hit").increment(1);
                return failure(true);
            }
            // With the cache off there is nothing to miss.
            _ if self.cache.is_on() => {
                counter!(metric::AUTH_CACHE, "result" => "miss").increment(1);
            }
            _ => {}
        }
        let hash = user
            .as_ref()
            .map_or_else(|| decoy(config), |u| u.password_hash.clone());
        let ok = match self
            .pool
            .verify(hash, password, config.auth.verification_wait)
            .await
        {
            Ok(ok) => ok,
            Err(pool::Busy) => return Outcome::Busy,
        };
        let result = if ok { "success" } else { "failure" };
        counter!(metric::AUTH_VERIFICATIONS, "result" => result).increment(1);
        match user {
            Some(user) if ok => {
                self.cache.insert(key, digest, Known::Verified);
                Outcome::Verified(user)
            }
            _ => {
                self.cache.insert(key, digest, Known::Failed);
                failure(false)
            }
        }
    }
}

/// A hash no password matches with the parameters (algorithm, version,
/// costs, output length) of the first configured user's hash, so an
/// unknown user costs what a known one does.
fn decoy(config: &ClusterConfig) -> String {
    config
        .users
        .values()
        .find_map(|u| decoy_like(&u.password_hash))
        .unwrap_or_else(|| DECOY_HASH.to_string())
}

fn decoy_like(hash: &str) -> Option<String> {
    let mut phc = PasswordHash::new(hash).ok()?;
    let len = phc.hash?.len();
    phc.salt = Some(Salt::from_b64(DECOY_SALT).ok()?);
    phc.hash = Some(Output::new(&vec![0u8; len]).ok()?);
    Some(phc.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use argon2::{Argon2, PasswordVerifier};

    #[test]
    fn decoy_hash_is_a_real_argon2_hash() {
        // If it did not parse, unknown users would be answered faster.
        let h = PasswordHash::new(DECOY_HASH).unwrap();
        assert_eq!(h.algorithm.as_str(), "argon2id");
        assert!(Argon2::default().verify_password(b"", &h).is_err());
    }

    #[test]
    fn the_decoy_takes_a_users_parameters() {
        let user = "$argon2id$v=19$m=65536,t=3,p=4$c29tZXNhbHRzb21lc2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let d = decoy_like(user).unwrap();
        assert!(
            d.starts_with("$argon2id$v=19$m=65536,t=3,p=4$ZmVycnlkZWNveQ$"),
            "{d}"
        );
        let mut blocks = Vec::new();
        assert!(!pool::verify_with(b"", &d, &mut blocks));
        assert_eq!(blocks.len(), 65536);
        assert!(decoy_like("plain text").is_none());
    }
}
