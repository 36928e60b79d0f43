//! Bounded password verification. Each argon2 verification fills its
//! memory cost in blocks (19 MiB for `ferry user hash`'s parameters); run
//! without a bound, a few hundred AUTH at once take gigabytes. Here at
//! most `size` run at once, each on the blocking pool with a block buffer
//! the pool keeps and reuses: memory for hashing is `size` buffers, and
//! freeing and refilling 19 MiB per attempt (which glibc's arenas keep
//! per thread) never happens. The others wait in order (tokio's semaphore
//! is fair) up to a deadline.
//!
//! The password is held in [`Zeroizing`] and the block buffer is wiped
//! after each verification (argon2's blocks are derived from the
//! password): what memory keeps between AUTHs says nothing of the
//! passwords checked.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use argon2::password_hash::{Output, PasswordHash};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use zeroize::Zeroizing;

use crate::metric;

/// No verification could start within the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Busy;

#[derive(Default)]
struct Size {
    /// Permits that exist (free or held).
    granted: usize,
    /// Permits to retire as they come back (the pool was made smaller
    /// while they were held).
    debt: usize,
}

pub(crate) struct VerifierPool {
    permits: Arc<Semaphore>,
    size: Mutex<Size>,
    /// Block buffers of finished verifications, for the next ones.
    buffers: Mutex<Vec<Vec<Block>>>,
}

impl VerifierPool {
    pub(crate) fn new(size: usize) -> Arc<Self> {
        let pool = Arc::new(Self {
            permits: Arc::new(Semaphore::new(0)),
            size: Mutex::new(Size::default()),
            buffers: Mutex::new(Vec::new()),
        });
        pool.resize(size);
        pool
    }

    /// Makes `size` (at least 1) verifications run at once from now on;
    /// a smaller pool shrinks as running verifications end.
    pub(crate) fn resize(&self, size: usize) {
        let size = size.max(1);
        let mut s = self.size.lock().unwrap_or_else(|p| p.into_inner());
        let effective = s.granted - s.debt;
        if size > effective {
            let mut more = size - effective;
            // Cancel retirements first, then add permits.
            let cancelled = more.min(s.debt);
            s.debt -= cancelled;
            more -= cancelled;
            self.permits.add_permits(more);
            s.granted += more;
        } else if size < effective {
            let fewer = effective - size;
            let now = self.permits.forget_permits(fewer);
            s.granted -= now;
            s.debt += fewer - now;
        }
        drop(s);
        let mut b = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
        b.truncate(size);
    }

    fn give_back(&self, permit: OwnedSemaphorePermit) {
        let mut s = self.size.lock().unwrap_or_else(|p| p.into_inner());
        if s.debt > 0 {
            s.debt -= 1;
            s.granted -= 1;
            permit.forget();
        }
    }

    fn take_buffer(&self) -> Vec<Block> {
        let mut b = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
        b.pop().unwrap_or_default()
    }

    fn keep_buffer(&self, buffer: Vec<Block>) {
        let limit = {
            let s = self.size.lock().unwrap_or_else(|p| p.into_inner());
            s.granted - s.debt
        };
        let mut b = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() < limit {
            b.push(buffer);
        }
    }

    /// Checks `password` against the PHC string `hash` once a slot is
    /// free, waiting at most `wait` for one.
    ///
    /// # Errors
    /// [`Busy`]: no slot came free within `wait`.
    pub(crate) async fn verify(
        self: &Arc<Self>,
        hash: String,
        password: Zeroizing<String>,
        wait: Duration,
    ) -> Result<bool, Busy> {
        let waiting = Waiting::start();
        let permit =
            match tokio::time::timeout(wait, Arc::clone(&self.permits).acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                _ => return Err(Busy),
            };
        drop(waiting);
        let pool = Arc::clone(self);
        // The permit goes with the work: a client that hangs up does not
        // free the slot before the hashing has ended.
        let ok = tokio::task::spawn_blocking(move || {
            let mut blocks = pool.take_buffer();
            let ok = verify_with(password.as_bytes(), &hash, &mut blocks);
            drop(password);
            // The blocks are derived from the password: wipe them before
            // the buffer waits for the next verification.
            blocks.fill(Block::default());
            pool.keep_buffer(blocks);
            pool.give_back(permit);
            ok
        })
        .await
        .unwrap_or(false);
        Ok(ok)
    }
}

/// Counts one AUTH in `ferry_auth_verifications_waiting` while it lives.
struct Waiting;

impl Waiting {
    fn start() -> Self {
        metrics::gauge!(metric::AUTH_WAITING).increment(1.0);
        Waiting
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        metrics::gauge!(metric::AUTH_WAITING).decrement(1.0);
    }
}

/// argon2's own `verify_password`, with the caller's block buffer (grown
/// to the hash's memory cost when short) instead of a fresh allocation.
/// The outputs compare in constant time (`Output`'s `PartialEq`).
pub(crate) fn verify_with(password: &[u8], hash: &str, blocks: &mut Vec<Block>) -> bool {
    let Ok(phc) = PasswordHash::new(hash) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (phc.salt, phc.hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(phc.algorithm) else {
        return false;
    };
    let version = match phc.version.map(Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    let Ok(params) = Params::try_from(&phc) else {
        return false;
    };
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    let need = params.block_count();
    if blocks.len() < need {
        blocks.resize(need, Block::default());
    }
    let mut out = Zeroizing::new(vec![0u8; expected.len()]);
    let argon = Argon2::new(algorithm, version, params);
    if argon
        .hash_password_into_with_memory(password, salt, out.as_mut_slice(), blocks.as_mut_slice())
        .is_err()
    {
        return false;
    }
    Output::new(&out).is_ok_and(|computed| computed == expected)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use argon2::password_hash::{rand_core::OsRng, SaltString};
    use argon2::PasswordHasher;

    fn hash(password: &str, params: Params) -> String {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    #[test]
    fn agrees_with_argon2s_own_verification() {
        let small = Params::new(64, 1, 1, None).unwrap();
        let big = Params::new(256, 2, 2, Some(48)).unwrap();
        let mut blocks = Vec::new();
        for params in [small, big.clone(), small_again()] {
            let h = hash("right", params);
            assert!(verify_with(b"right", &h, &mut blocks), "{h}");
            assert!(!verify_with(b"wrong", &h, &mut blocks), "{h}");
        }
        // The buffer grew to the largest cost and was reused.
        assert_eq!(blocks.len(), big.block_count());
        assert!(!verify_with(b"x", "not a hash", &mut blocks));
        assert!(!verify_with(
            b"x",
            "$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ",
            &mut blocks
        ));
    }

    fn pw(s: &str) -> Zeroizing<String> {
        Zeroizing::new(s.to_string())
    }

    #[tokio::test]
    async fn the_block_buffer_is_wiped_after_each_verification() {
        let pool = VerifierPool::new(1);
        let h = hash("pw", Params::new(64, 1, 1, None).unwrap());
        assert_eq!(
            pool.verify(h, pw("pw"), Duration::from_secs(5)).await,
            Ok(true)
        );
        let kept = pool.buffers.lock().unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].len(), 64);
        assert!(kept[0].iter().all(|b| b.as_ref().iter().all(|w| *w == 0)));
    }

    fn small_again() -> Params {
        Params::new(64, 1, 1, None).unwrap()
    }

    #[tokio::test]
    async fn at_most_size_at_once_and_resizing() {
        let pool = VerifierPool::new(2);
        let held: Vec<_> = (0..2)
            .map(|_| Arc::clone(&pool.permits).try_acquire_owned().unwrap())
            .collect();
        assert!(Arc::clone(&pool.permits).try_acquire_owned().is_err());
        let h = hash("pw", Params::new(64, 1, 1, None).unwrap());
        let r = pool
            .verify(h.clone(), pw("pw"), Duration::from_millis(20))
            .await;
        assert_eq!(r, Err(Busy));
        // Shrink to 1 while both are held: one retires when it comes back.
        pool.resize(1);
        for p in held {
            pool.give_back(p);
        }
        assert_eq!(pool.permits.available_permits(), 1);
        assert_eq!(
            pool.verify(h.clone(), pw("pw"), Duration::from_secs(5))
                .await,
            Ok(true)
        );
        pool.resize(3);
        assert_eq!(pool.permits.available_permits(), 3);
    }
}
