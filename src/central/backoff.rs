//! Exponential backoff with jitter for the uplink: 100 ms doubling to a cap,
//! each delay drawn from [d/2, d] so many sites reconnecting after a central
//! outage do not arrive in lockstep.

use std::time::Duration;

/// Backoff state; `reset` after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// Starts at `base`, never exceeds `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        Self { base, max, attempt: 0, rng: u64::from_le_bytes(seed) | 1 }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(20));
        let ceiling = exp.min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64: jitter needs spread, not cryptographic quality.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let frac = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        ceiling.mul_f64(0.5 + 0.5 * frac)
    }

    /// Retries so far since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Back to the base delay.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_with_jitter_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut prev_ceiling = Duration::ZERO;
        for i in 0..12 {
            let d = b.next_delay();
            let ceiling = (Duration::from_millis(100) * (1 << i)).min(Duration::from_secs(30));
            assert!(d <= ceiling && d >= ceiling / 2, "attempt {i}: {d:?} not in [{:?}, {ceiling:?}]", ceiling / 2);
            assert!(ceiling >= prev_ceiling);
            prev_ceiling = ceiling;
        }
        assert_eq!(prev_ceiling, Duration::from_secs(30));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let delays: std::collections::HashSet<u128> = (0..50).map(|_| b.next_delay().as_millis()).collect();
        assert!(delays.len() > 10, "{delays:?}");
    }
}
