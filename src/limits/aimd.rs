//! Additive-increase / multiplicative-decrease concurrency limit, as TCP congestion control does
//! for its window: probe upward slowly while calls succeed, halve at once when the backend throttles.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Default cool-down between two decreases. One overload typically answers every in-flight call
/// with 429 within about one model-call latency; counting that burst once needs a cool-down of at
/// least that latency.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(1);

/// A concurrency limit in `[min, max]` driven by success and throttle signals. Share it behind an
/// `Arc`; after a call that returns `true`, resize the semaphore to [`AdaptiveLimit::current`].
#[derive(Debug)]
pub struct AdaptiveLimit {
    min: usize,
    max: usize,
    cooldown: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    current: usize,
    successes: usize,
    last_decrease: Option<Instant>,
}

impl AdaptiveLimit {
    /// `min` is raised to 1 (a limit of 0 would stop all work for good) and `max` to `min`;
    /// `initial` is clamped into `[min, max]`.
    pub fn new(initial: usize, min: usize, max: usize) -> Self {
        let min = min.max(1);
        let max = max.max(min);
        Self {
            min,
            max,
            cooldown: DEFAULT_COOLDOWN,
            state: Mutex::new(State { current: initial.clamp(min, max), successes: 0, last_decrease: None }),
        }
    }

    #[must_use]
    pub fn with_cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }

    pub fn current(&self) -> usize {
        self.lock().current
    }

    pub fn min(&self) -> usize {
        self.min
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Records a successful call. Every `current` successes (about one full window of round trips)
    /// raise the limit by one. Returns whether the limit changed.
    pub fn on_success(&self) -> bool {
        let mut state = self.lock();
        state.successes += 1;
        if state.successes < state.current {
            return false;
        }
        state.successes = 0;
        if state.current >= self.max {
            return false;
        }
        state.current += 1;
        true
    }

    /// Records a throttle (429, 503, an engine queue over its bound). Halves the limit unless it was
    /// already halved within the cool-down. Returns whether the limit changed.
    pub fn on_throttle(&self) -> bool {
        let now = Instant::now();
        let mut state = self.lock();
        if state.last_decrease.is_some_and(|at| now.duration_since(at) < self.cooldown) {
            return false;
        }
        state.last_decrease = Some(now);
        state.successes = 0;
        let halved = (state.current / 2).max(self.min);
        let changed = halved != state.current;
        state.current = halved;
        changed
    }

    // The critical sections only do integer arithmetic and cannot panic, so a poisoned guard still
    // holds consistent state.
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_clamps_its_bounds() {
        let l = AdaptiveLimit::new(100, 0, 10);
        assert_eq!((l.current(), l.min(), l.max()), (10, 1, 10));
        let l = AdaptiveLimit::new(0, 4, 2);
        assert_eq!((l.current(), l.min(), l.max()), (4, 4, 4));
    }

    #[test]
    fn grows_by_one_per_window_of_successes() {
        let l = AdaptiveLimit::new(4, 1, 6);
        let changes: Vec<bool> = (0..4).map(|_| l.on_success()).collect();
        assert_eq!(changes, [false, false, false, true]);
        assert_eq!(l.current(), 5);
        for _ in 0..4 {
            assert!(!l.on_success());
        }
        assert!(l.on_success());
        assert_eq!(l.current(), 6);
        for _ in 0..20 {
            assert!(!l.on_success());
        }
        assert_eq!(l.current(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn throttle_halves_once_per_cooldown_and_respects_min() {
        let l = AdaptiveLimit::new(64, 5, 64).with_cooldown(Duration::from_secs(2));
        assert!(l.on_throttle());
        assert_eq!(l.current(), 32);
        // The rest of the same burst of 429s.
        for _ in 0..10 {
            assert!(!l.on_throttle());
        }
        assert_eq!(l.current(), 32);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(l.on_throttle());
        assert_eq!(l.current(), 16);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(l.on_throttle());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(l.on_throttle());
        assert_eq!(l.current(), 5);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!l.on_throttle());
        assert_eq!(l.current(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttle_restarts_the_success_count() {
        let l = AdaptiveLimit::new(4, 1, 10);
        for _ in 0..3 {
            l.on_success();
        }
        assert!(l.on_throttle());
        assert_eq!(l.current(), 2);
        assert!(!l.on_success());
        assert!(l.on_success());
        assert_eq!(l.current(), 3);
    }
}
