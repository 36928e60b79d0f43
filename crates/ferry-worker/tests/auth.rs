//! AUTH under load, over real TCP and TLS on loopback: the bound on
//! verifications at once (`454 4.7.0` past the wait), the credential
//! cache (a wrong password never enters it, a changed password in a newer
//! config is not answered from it), and the per-client failure limit
//! (`421 4.7.0` and closed, back after the cooling-off, another client
//! unaffected, a retried stale password not counted again, clients behind
//! one balancer counted apart). Clients bind 127.0.0.x source addresses
//! to be different clients.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod harness;

use std::time::{Duration, Instant};

use argon2::password_hash::{rand_core::OsRng, SaltString};
use argon2::{Algorithm, Argon2, Params, PasswordHasher, Version};
use harness::*;

const LIMITS: &str = r#"{ tarpit = "0s" }"#;
const WAIT: Duration = Duration::from_secs(15);

/// A hash that takes a few hundred milliseconds to verify (argon2id,
/// 50 MiB, 16 passes: the most passes a config allows), so that
/// verifications overlap for sure.
fn slow_hash(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        Params::new(51_200, 16, 1, None).unwrap(),
    )
    .hash_password(password.as_bytes(), &salt)
    .unwrap()
    .to_string()
}

/// A session on the Client Frontend from `source`, after STARTTLS and
/// EHLO, ready for AUTH.
async fn ready(h: &Harness, source: &str) -> SmtpClient {
    let (mut c, banner) = SmtpClient::connect(h.client, ip(source)).await;
    assert_eq!(banner, "220 Client Frontend ready");
    c.cmd("EHLO device").await;
    c.starttls(&h.ca).await.unwrap();
    c.cmd("EHLO device").await;
    c
}

async fn auth(c: &mut SmtpClient, user: &str, password: &str) -> String {
    c.cmd(&format!("AUTH PLAIN {}", plain(user, password)))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_more_than_the_bound_waits_then_gets_454() {
    let extra = format!(
        "[[users]]\nname = \"slow\"\npassword_hash = \"{}\"\nallowed_senders = [\"*\"]\n\n[auth]\nmax_verifications = 2\nverification_wait = \"200ms\"\n",
        slow_hash("slow-secret")
    );
    let h = Harness::start_extra(LIMITS, &extra).await;
    let mut clients = Vec::new();
    for i in 1..=3 {
        clients.push(ready(&h, &format!("127.0.0.{i}")).await);
    }
    // Three verifications asked for at once, two may run.
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let r = auth(&mut c, "slow", "slow-secret").await;
                (r, start.elapsed(), c)
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    results.sort_by_key(|(_, at, _)| *at);
    let replies: Vec<&str> = results.iter().map(|(r, _, _)| r.as_str()).collect();
    assert_eq!(
        replies,
        [
            "454 4.7.0 Temporary authentication failure",
            "235 2.7.0 Authentication successful",
            "235 2.7.0 Authentication successful",
        ],
        "{results:?}",
        results = results.iter().map(|(r, at, _)| (r, at)).collect::<Vec<_>>()
    );
    // It waited for the deadline, and it was answered before the two
    // verifications ended.
    let (_, refused_at, _) = &results[0];
    let (_, first_done, _) = &results[1];
    assert!(*refused_at >= Duration::from_millis(200), "{refused_at:?}");
    assert!(refused_at < first_done, "{refused_at:?} {first_done:?}");
    // The session goes on: AUTH again works (now from the cache).
    let (_, _, mut c) = results.remove(0);
    assert_eq!(
        auth(&mut c, "slow", "slow-secret").await,
        "235 2.7.0 Authentication successful"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_never_cached_as_right_and_a_changed_password_is_not_answered_from_the_cache(
) {
    let h = Harness::start_extra(LIMITS, "[auth]\nmax_failures = 0\n").await;
    // A wrong pair, twice (the second from the negative cache): never 235.
    for _ in 0..2 {
        let mut c = ready(&h, "127.0.0.1").await;
        assert_eq!(
            auth(&mut c, "scanner", "wrong").await,
            "535 5.7.8 Authentication credentials invalid"
        );
    }
    // The right one, then again: verified, then from the cache.
    for _ in 0..2 {
        let mut c = ready(&h, "127.0.0.1").await;
        assert_eq!(
            auth(&mut c, "scanner", PASSWORD).await,
            "235 2.7.0 Authentication successful"
        );
    }
    // A new config changes scanner's password: the old one, cached as
    // right a moment ago, is refused; the new one works.
    let old_line = h
        .text
        .lines()
        .find(|l| l.starts_with("password_hash"))
        .unwrap()
        .to_string();
    let text = h.text.replacen(
        &old_line,
        &format!("password_hash = \"{}\"", hash("n3w-secret")),
        1,
    );
    h.apply(&text, 2).await;
    let mut c = ready(&h, "127.0.0.1").await;
    assert_eq!(
        auth(&mut c, "scanner", PASSWORD).await,
        "535 5.7.8 Authentication credentials invalid"
    );
    let mut c = ready(&h, "127.0.0.1").await;
    assert_eq!(
        auth(&mut c, "scanner", "n3w-secret").await,
        "235 2.7.0 Authentication successful"
    );
    // printer's definition did not change: its password still works.
    let mut c = ready(&h, "127.0.0.40").await;
    assert_eq!(
        auth(&mut c, "printer", PASSWORD).await,
        "235 2.7.0 Authentication successful"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guessing_client_is_cut_off_and_comes_back_after_cooling_off() {
    let h = Harness::start_extra(
        LIMITS,
        "[auth]\nmax_failures = 3\nfailure_window = \"1m\"\ncooling_off = \"2s\"\n",
    )
    .await;
    let mut c = ready(&h, "127.0.0.7").await;
    for guess in ["a", "b", "c"] {
        assert_eq!(
            auth(&mut c, "scanner", guess).await,
            "535 5.7.8 Authentication credentials invalid"
        );
    }
    let cut_at = Instant::now();
    // The next AUTH, even with the right password: 421 and closed.
    assert_eq!(
        auth(&mut c, "scanner", PASSWORD).await,
        "421 4.7.0 Too many failed authentication attempts, closing transmission channel"
    );
    assert!(c.is_closed().await);
    let mut c = ready(&h, "127.0.0.7").await;
    assert!(auth(&mut c, "scanner", PASSWORD)
        .await
        .starts_with("421 4.7.0"));
    assert!(c.is_closed().await);
    // Another client is unaffected.
    let mut other = ready(&h, "127.0.0.8").await;
    assert_eq!(
        auth(&mut other, "scanner", PASSWORD).await,
        "235 2.7.0 Authentication successful"
    );
    // After the cooling-off the first client is back.
    let back = loop {
        assert!(cut_at.elapsed() < WAIT, "still cut off after {WAIT:?}");
        let mut c = ready(&h, "127.0.0.7").await;
        let r = auth(&mut c, "scanner", PASSWORD).await;
        if r.starts_with("235") {
            break cut_at.elapsed();
        }
        assert!(r.starts_with("421 4.7.0"), "{r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(back >= Duration::from_secs(2), "{back:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_password_retried_does_not_cut_off_its_address_but_guesses_do() {
    // With the negative cache on, and off (the failure limit itself
    // remembers the pairs it counted).
    for negative in ["1m", "0s"] {
        let h = Harness::start_extra(
            LIMITS,
            &format!(
                "[auth]\nmax_failures = 3\nfailure_window = \"1m\"\ncooling_off = \"1m\"\nnegative_cache_ttl = \"{negative}\"\n"
            ),
        )
        .await;
        // A device with a stale password retries it, ten times.
        for i in 0..10 {
            let mut c = ready(&h, "127.0.0.7").await;
            assert_eq!(
                auth(&mut c, "scanner", "old-password").await,
                "535 5.7.8 Authentication credentials invalid",
                "retry {i}, negative_cache_ttl {negative}"
            );
        }
        // Another device behind the same address still gets in.
        let mut c = ready(&h, "127.0.0.7").await;
        assert_eq!(
            auth(&mut c, "scanner", PASSWORD).await,
            "235 2.7.0 Authentication successful",
            "negative_cache_ttl {negative}"
        );
        // A guesser changes passwords: two more distinct wrong pairs make
        // three failures, and the next AUTH gets 421.
        let mut c = ready(&h, "127.0.0.7").await;
        for guess in ["guess-1", "guess-2"] {
            assert_eq!(
                auth(&mut c, "scanner", guess).await,
                "535 5.7.8 Authentication credentials invalid"
            );
        }
        assert!(
            auth(&mut c, "scanner", PASSWORD)
                .await
                .starts_with("421 4.7.0"),
            "negative_cache_ttl {negative}"
        );
        assert!(c.is_closed().await);
        h.stop().await;
    }
}

/// A session on the Client Frontend through the trusted balancer, whose
/// PROXY v2 header names `client`; after STARTTLS and EHLO.
async fn ready_behind_balancer(h: &Harness, client: &str) -> SmtpClient {
    let (mut c, greeting) = h.proxied(h.client, client).await;
    assert_eq!(greeting, "220 Client Frontend ready");
    c.cmd("EHLO device").await;
    c.starttls(&h.ca).await.unwrap();
    c.cmd("EHLO device").await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_balancer_the_limit_counts_the_original_client() {
    let h = Harness::start_extra(
        LIMITS,
        "[auth]\nmax_failures = 3\nfailure_window = \"1m\"\ncooling_off = \"1m\"\n",
    )
    .await;
    // Two clients, one balancer address: the guesser is cut off.
    let mut guesser = ready_behind_balancer(&h, "192.0.2.10:40000").await;
    for guess in ["a", "b", "c"] {
        assert_eq!(
            auth(&mut guesser, "scanner", guess).await,
            "535 5.7.8 Authentication credentials invalid"
        );
    }
    assert!(auth(&mut guesser, "scanner", PASSWORD)
        .await
        .starts_with("421 4.7.0"));
    assert!(guesser.is_closed().await);
    // The other client behind the same balancer is not.
    let mut device = ready_behind_balancer(&h, "192.0.2.11:40001").await;
    assert_eq!(
        auth(&mut device, "scanner", PASSWORD).await,
        "235 2.7.0 Authentication successful"
    );
    // The guesser stays cut off on a new connection through the balancer.
    let mut again = ready_behind_balancer(&h, "192.0.2.10:40002").await;
    assert!(auth(&mut again, "scanner", PASSWORD)
        .await
        .starts_with("421 4.7.0"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_failed_and_cached_then_set_by_a_reload_works_at_once() {
    let h = Harness::start_extra(LIMITS, "[auth]\nnegative_cache_ttl = \"10m\"\n").await;
    // Twice: the second is answered from the negative cache.
    for _ in 0..2 {
        let mut c = ready(&h, "127.0.0.1").await;
        assert_eq!(
            auth(&mut c, "scanner", "n3w-secret").await,
            "535 5.7.8 Authentication credentials invalid"
        );
    }
    let old_line = h
        .text
        .lines()
        .find(|l| l.starts_with("password_hash"))
        .unwrap()
        .to_string();
    let text = h.text.replacen(
        &old_line,
        &format!("password_hash = \"{}\"", hash("n3w-secret")),
        1,
    );
    h.apply(&text, 2).await;
    // The very next AUTH with it works: the negative entry is not used.
    let mut c = ready(&h, "127.0.0.1").await;
    assert_eq!(
        auth(&mut c, "scanner", "n3w-secret").await,
        "235 2.7.0 Authentication successful"
    );
    h.stop().await;
}
