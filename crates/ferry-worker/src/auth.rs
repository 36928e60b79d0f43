//! Password checks for AUTH. argon2 is deliberately slow, so checks run on
//! the blocking pool; an unknown user costs the same as a wrong password.

use std::sync::Arc;

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use ferry_config::{ClusterConfig, User};
use ferry_smtp::Credentials;

/// A hash of nothing anyone knows, checked for unknown users so that the
/// time taken does not tell which user names exist.
const DECOY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$ZmVycnlkZWNveQ$0Q0cSKsXm7ZJ9bSxXoa4wQ8r0fQ2mBqvWx1ZlZ7H6pA";

/// Checks credentials; returns the user they prove.
pub(crate) async fn verify(config: &ClusterConfig, creds: Credentials) -> Option<Arc<User>> {
    // PLAIN may name an identity to act as: only oneself is allowed.
    if !creds.authzid.is_empty() && !creds.authzid.eq_ignore_ascii_case(&creds.username) {
        return None;
    }
    let user = config.user(&creds.username).cloned();
    let hash = user
        .as_ref()
        .map_or(DECOY_HASH.to_string(), |u| u.password_hash.clone());
    let password = creds.password;
    let ok = tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash)
            .map(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false);
    if ok {
        user
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoy_hash_is_a_real_argon2_hash() {
        // If it did not parse, unknown users would be answered faster.
        let h = PasswordHash::new(DECOY_HASH).unwrap();
        assert_eq!(h.algorithm.as_str(), "argon2id");
        assert!(Argon2::default().verify_password(b"", &h).is_err());
    }
}
