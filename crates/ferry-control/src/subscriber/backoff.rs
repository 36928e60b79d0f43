//! When to try the control plane again: gRPC's connection backoff
//! (`doc/connection-backoff.md` in grpc/grpc): 1 s at first, ×1.6 after
//! each failure, ±20 % jitter so that nodes cut off together do not come
//! back together, at most 120 s.

use std::time::Duration;

/// The first delay.
pub const INITIAL: Duration = Duration::from_secs(1);
/// Each failure multiplies the delay by this.
pub const MULTIPLIER: f64 = 1.6;
/// Each delay is moved by up to this fraction, either way.
pub const JITTER: f64 = 0.2;
/// No delay is longer, jitter included.
pub const MAX: Duration = Duration::from_secs(120);

/// The delays between connection attempts. The random source is passed
/// in, so tests can seed it.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// The delay before jitter.
    current: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { current: INITIAL }
    }
}

impl Backoff {
    /// How long to wait before the next attempt; moves the base delay on.
    /// The jitter is applied to the base (as gRPC does), then capped at
    /// [`MAX`], so no wait is ever longer than 120 s.
    pub fn next_delay(&mut self, rng: &mut impl rand::Rng) -> Duration {
        let base = self.current.as_secs_f64();
        let jittered = base * (1.0 + rng.random_range(-JITTER..=JITTER));
        self.current = Duration::from_secs_f64((base * MULTIPLIER).min(MAX.as_secs_f64()));
        Duration::from_secs_f64(jittered.clamp(0.0, MAX.as_secs_f64()))
    }

    /// Back to the first delay: after a stream that worked.
    pub fn reset(&mut self) {
        self.current = INITIAL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn delays_grow_by_1_6_within_20_percent_and_stop_at_120_s() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut backoff = Backoff::default();
        let mut base = 1.0_f64;
        let mut delays = Vec::new();
        for _ in 0..30 {
            let d = backoff.next_delay(&mut rng).as_secs_f64();
            assert!(
                d >= base * 0.8 - 1e-9 && d <= (base * 1.2).min(120.0) + 1e-9,
                "{d} s for a base of {base} s"
            );
            delays.push(d);
            base = (base * 1.6).min(120.0);
        }
        // 1, 1.6, 2.56, 4.1, ... reaches the cap at the 12th attempt
        // (1.6^11 = 176 > 120) and stays there.
        assert!(delays.iter().skip(11).all(|&d| (96.0..=120.0).contains(&d)));
        assert!(delays.iter().all(|&d| d <= 120.0));
        // The jitter is not constant: two nodes do not retry in step.
        let first: Vec<f64> = delays.iter().take(5).copied().collect();
        let mut other = Backoff::default();
        let mut rng2 = rand::rngs::StdRng::seed_from_u64(8);
        let second: Vec<f64> = (0..5)
            .map(|_| other.next_delay(&mut rng2).as_secs_f64())
            .collect();
        assert_ne!(first, second);
    }

    #[test]
    fn jitter_covers_both_sides_and_reset_starts_over() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let firsts: Vec<f64> = (0..200)
            .map(|_| Backoff::default().next_delay(&mut rng).as_secs_f64())
            .collect();
        assert!(firsts.iter().all(|d| (0.8..=1.2).contains(d)));
        assert!(firsts.iter().any(|&d| d < 0.9) && firsts.iter().any(|&d| d > 1.1));
        let mut backoff = Backoff::default();
        for _ in 0..10 {
            backoff.next_delay(&mut rng);
        }
        backoff.reset();
        let d = backoff.next_delay(&mut rng).as_secs_f64();
        assert!((0.8..=1.2).contains(&d), "{d}");
    }
}
