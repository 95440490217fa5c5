//! Retry delays: exponential backoff with AWS-style "full jitter", floored by the server's
//! `Retry-After`, and the small deterministic PRNG that supplies the jitter.

use std::time::Duration;

/// The longest `Retry-After` honoured. A server asking for more (or a garbled header) should not
/// park a job for hours; past this the retry happens anyway and the server may throttle again.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// How often and how patiently a retryable failure is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts including the first one; 1 means "never retry".
    pub max_attempts: u32,
    /// Ceiling of the first retry's delay; it doubles with each further attempt.
    pub base: Duration,
    /// Upper bound of the backoff ceiling (a server's `Retry-After` may exceed it).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: 5, base: Duration::from_millis(500), max_delay: Duration::from_secs(30) }
    }
}

impl RetryPolicy {
    /// Whether another attempt is allowed after `attempts` attempts have failed.
    pub fn should_retry(&self, attempts: u32) -> bool {
        attempts < self.max_attempts
    }

    /// The delay before the next attempt, after `attempt` attempts have failed (1 after the first
    /// failure; 0 is read as 1).
    ///
    /// "Full jitter" (AWS Architecture Blog, "Exponential Backoff And Jitter"): the delay is uniform
    /// in `[0, min(max_delay, base * 2^(attempt-1)))`, which spreads a burst of clients that failed
    /// together better than equal or decorrelated jitter while keeping the expected wait lowest.
    /// `jitter_unit` is a draw from `[0, 1)` (values outside are clamped, NaN counts as 0).
    /// The result is never below `retry_after` (itself capped at [`MAX_RETRY_AFTER`]), even when
    /// that exceeds `max_delay`: the server knows its own recovery time better than our cap does.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, jitter_unit: f64) -> Duration {
        let exponent = attempt.max(1) - 1;
        // 2^31 * any positive base already saturates every sane `max_delay`.
        let factor = 1u32 << exponent.min(31);
        let ceiling = self.base.saturating_mul(factor).min(self.max_delay);
        let unit = if jitter_unit.is_nan() { 0.0 } else { jitter_unit.clamp(0.0, 1.0) };
        let jittered = ceiling.mul_f64(unit);
        match retry_after {
            Some(server) => jittered.max(server.min(MAX_RETRY_AFTER)),
            None => jittered,
        }
    }
}

/// `SplitMix64` (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", 2014):
/// one 64-bit state, statistically good enough for jitter, and deterministic under a seed so a
/// seeded run retries on the same schedule.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform draw from `[0, 1)`: the top 53 bits, so every value is exactly representable.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> RetryPolicy {
        RetryPolicy { max_attempts: 4, base: Duration::from_millis(100), max_delay: Duration::from_secs(2) }
    }

    #[test]
    fn ceiling_doubles_per_attempt_up_to_max_delay() {
        let p = policy();
        // A unit just below 1 gives (almost) the ceiling itself.
        let top = |attempt| p.delay(attempt, None, 0.999_999).as_millis();
        assert_eq!(top(1), 99);
        assert_eq!(top(2), 199);
        assert_eq!(top(3), 399);
        assert_eq!(top(5), 1599);
        assert_eq!(top(6), 1999);
        assert_eq!(top(60), 1999);
        assert_eq!(top(0), top(1));
    }

    #[test]
    fn full_jitter_scales_the_ceiling() {
        let p = policy();
        assert_eq!(p.delay(3, None, 0.0), Duration::ZERO);
        assert_eq!(p.delay(3, None, 0.5), Duration::from_millis(200));
        assert_eq!(p.delay(3, None, f64::NAN), Duration::ZERO);
        assert_eq!(p.delay(3, None, 7.0), Duration::from_millis(400));
    }

    #[test]
    fn retry_after_is_a_floor_that_beats_the_cap_up_to_five_minutes() {
        let p = policy();
        assert_eq!(p.delay(1, Some(Duration::from_secs(10)), 0.3), Duration::from_secs(10));
        assert_eq!(p.delay(6, Some(Duration::from_millis(50)), 0.5), Duration::from_secs(1));
        assert_eq!(p.delay(1, Some(Duration::from_secs(3600)), 0.3), MAX_RETRY_AFTER);
    }

    #[test]
    fn should_retry_counts_the_first_attempt() {
        let p = policy();
        assert!(p.should_retry(1));
        assert!(p.should_retry(3));
        assert!(!p.should_retry(4));
        assert!(!RetryPolicy { max_attempts: 1, ..p }.should_retry(1));
    }

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        let mut rng = SplitMix64::new(1_234_567);
        let got: Vec<u64> = (0..5).map(|_| rng.next_u64()).collect();
        assert_eq!(
            got,
            [
                6_457_827_717_110_365_317,
                3_203_168_211_198_807_973,
                9_817_491_932_198_370_423,
                4_593_380_528_125_082_431,
                16_408_922_859_458_223_821
            ]
        );
        assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn next_f64_is_in_the_unit_interval_and_spread() {
        let mut rng = SplitMix64::new(42);
        let draws: Vec<f64> = (0..10_000).map(|_| rng.next_f64()).collect();
        assert!(draws.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }

    proptest! {
        #[test]
        fn delay_stays_within_retry_after_and_bound(
            attempt in 0u32..100,
            base_ms in 0u64..10_000,
            max_ms in 0u64..120_000,
            retry_after_ms in proptest::option::of(0u64..1_000_000),
            unit in 0.0f64..1.0,
        ) {
            let p = RetryPolicy {
                max_attempts: 10,
                base: Duration::from_millis(base_ms),
                max_delay: Duration::from_millis(max_ms),
            };
            let retry_after = retry_after_ms.map(Duration::from_millis);
            let d = p.delay(attempt, retry_after, unit);
            let floor = retry_after.map_or(Duration::ZERO, |r| r.min(MAX_RETRY_AFTER));
            prop_assert!(d >= floor, "{d:?} below {floor:?}");
            prop_assert!(d <= p.max_delay.max(floor), "{d:?} above the bound");
        }
    }
}
