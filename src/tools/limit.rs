//! Per-tool rate limit: a token bucket that hands out start times.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Each call reserves the next token and is told how long to wait for it, so waiting happens
/// outside the lock and starts stay spaced `1/rate` apart however many callers queue. A reserved
/// token is spent even if its caller goes away; the pool only reserves from execution tasks that
/// are not cancelled, so none are wasted in practice.
pub(crate) struct RateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    /// `None` for a rate that is not a positive finite number (no limit).
    pub(crate) fn new(rate: f64) -> Option<Self> {
        if !(rate.is_finite() && rate > 0.0) {
            return None;
        }
        let burst = rate.max(1.0);
        Some(Self { rate, burst, state: Mutex::new(Bucket { tokens: burst, updated: Instant::now() }) })
    }

    /// How long the caller must wait before starting: zero while the bucket has tokens.
    pub(crate) fn reserve(&self) -> Duration {
        let now = Instant::now();
        // Only float arithmetic runs under the lock, so a poisoned bucket is still consistent.
        let mut bucket = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst) - 1.0;
        bucket.updated = now;
        if bucket.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-bucket.tokens / self.rate)
        }
    }

    pub(crate) async fn wait(&self) {
        let delay = self.reserve();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_positive_rates() {
        assert!(RateLimiter::new(0.0).is_none());
        assert!(RateLimiter::new(-1.0).is_none());
        assert!(RateLimiter::new(f64::NAN).is_none());
        assert!(RateLimiter::new(f64::INFINITY).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn bursts_one_second_then_spaces_by_the_rate() {
        let Some(limiter) = RateLimiter::new(4.0) else { panic!("4/s is a valid rate") };
        let delays: Vec<u128> = (0..7).map(|_| limiter.reserve().as_millis()).collect();
        assert_eq!(delays, [0, 0, 0, 0, 250, 500, 750]);
        tokio::time::advance(Duration::from_secs(2)).await;
        // 2 s refill 8 tokens against a debt of 3, capped at the burst of 4.
        let delays: Vec<u128> = (0..5).map(|_| limiter.reserve().as_millis()).collect();
        assert_eq!(delays, [0, 0, 0, 0, 250]);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_rates_keep_a_burst_of_one() {
        let Some(limiter) = RateLimiter::new(0.5) else { panic!("0.5/s is a valid rate") };
        assert_eq!(limiter.reserve(), Duration::ZERO);
        assert_eq!(limiter.reserve(), Duration::from_secs(2));
        assert_eq!(limiter.reserve(), Duration::from_secs(4));
    }
}
