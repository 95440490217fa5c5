//! Request and token pacing for one endpoint, so a run at a hosted API's limit keeps under it
//! instead of bouncing off 429s.
//!
//! Each limit (requests, tokens, input tokens, output tokens per minute) is a token bucket that
//! holds at most one minute's allowance and refills continuously at `limit / 60` per second, as
//! `OpenAI` and Anthropic describe theirs. A request is admitted when every bucket it draws from
//! holds its estimated cost (prompt estimate + `max_tokens`); it then takes that cost, so calls go
//! out at the rate the limit allows. Limits come from `rpm=` / `tpm=` or from the headers of
//! every response: the stated `limit` sets the rate; the stated `remaining`, less what was
//! admitted here since the request it answers, sets the bucket's level the first time and lowers
//! it whenever it is below the local view (another client on the same key, a cost estimated too
//! low), so the local view never runs ahead of the server's. A 429's `retry-after` stops all
//! admissions until it has passed.
//!
//! A limit set by hand, before any answer has stated what remains, holds one second of allowance
//! (the server's bucket may be small or already drawn on). A pacer that must learn its limits
//! from a hosted API first sends one request alone ([`Pacer::probe_first`]): the first wave of
//! calls would otherwise all go out before any header has been read.
//!
//! Where the budget lives is the [`Budget`] trait: [`LocalBudget`] keeps it in this process; a
//! store shared by processes (a fleet of workers on one key) implements the same calls, and
//! [`SharedBudgets`] hands out its budget per endpoint and key.

use std::fmt;
use std::sync::atomic::{
    AtomicU64, AtomicU8,
    Ordering::{AcqRel, Acquire, Relaxed},
};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::headers::{Kind, RateLimitHeaders};

/// Allowance a limit set by hand starts with before any response states what remains: one second
/// of it, so a cold start never bursts a minute's worth into a server that may already be busy.
pub const COLD_START: f64 = 1.0 / 60.0;

const NO_PROBE: u8 = 0;
const PROBE_ARMED: u8 = 1;
const PROBE_IN_FLIGHT: u8 = 2;

/// What a request is expected to cost, known before it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Estimate {
    /// Prompt tokens (estimated from its text).
    pub input: u64,
    /// Completion tokens it may produce (`max_tokens`).
    pub output: u64,
}

impl Estimate {
    /// `OpenAI`'s and Anthropic's own estimate before a request runs: about four characters per
    /// token of the text sent, plus the `max_tokens` asked for.
    pub fn from_text_len(chars: usize, max_tokens: Option<u32>) -> Self {
        Self { input: (chars as u64).div_ceil(4), output: max_tokens.map_or(0, u64::from) }
    }

    /// What the request counts against the limit of `kind`.
    pub fn cost(&self, kind: Kind) -> f64 {
        (match kind {
            Kind::Requests => 1,
            Kind::Tokens => self.input.saturating_add(self.output),
            Kind::InputTokens => self.input,
            Kind::OutputTokens => self.output,
        }) as f64
    }
}

/// Limits set by hand (`rpm=`, `tpm=`); they override what headers state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HandLimits {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
}

impl HandLimits {
    pub fn is_empty(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none()
    }
}

/// Proof of one admission: what had been admitted up to and including it, per limit, so the
/// headers of its answer can be matched with what was sent after it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Ticket {
    admitted: [f64; 4],
}

impl Ticket {
    /// A ticket from what a budget had admitted, per limit in the order of [`Kind::ALL`].
    pub fn new(admitted: [f64; 4]) -> Self {
        Self { admitted }
    }

    pub fn admitted(&self) -> [f64; 4] {
        self.admitted
    }
}

/// Where a pacer's budget is kept.
pub trait Budget: Send + Sync + fmt::Debug {
    /// Takes `estimate` from every known limit, or says how long to wait before asking again.
    fn try_take(&self, estimate: Estimate, now: Instant) -> BoxFuture<'_, Result<Ticket, Duration>>;
    /// What the answer to the request of `ticket` stated (a shared store is told in the background).
    fn observe(&self, ticket: &Ticket, headers: &RateLimitHeaders, now: Instant);
    /// The limits in force, for reports.
    fn snapshot(&self) -> Value;
}

/// A store of budgets that several processes share: one per endpoint and key.
pub trait SharedBudgets: Send + Sync {
    /// The budget of requests to `endpoint` (a URL without credentials) sent with the key
    /// identified by `key_id` (see [`key_id`]); `hand` are this process's `rpm=` / `tpm=`.
    fn budget(&self, endpoint: &str, key_id: &str, hand: HandLimits) -> Arc<dyn Budget>;
}

/// Names a key without revealing it: the first 16 bytes of its SHA-256, in hex (empty without one).
pub fn key_id(key: Option<&str>) -> String {
    key.map(|k| {
        let digest = Sha256::digest(k.as_bytes());
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        format!("{:032x}", u128::from_be_bytes(first))
    })
    .unwrap_or_default()
}

/// A budget kept in this process.
#[derive(Debug)]
pub struct LocalBudget {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    limits: [Bucket; 4],
    /// No admission before this (a 429's `retry-after`).
    blocked_until: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    hand: Option<f64>,
    stated: Option<f64>,
    /// Whether an answer has stated what remains (until then a hand limit holds one second).
    synced: bool,
    /// How much the server's bucket holds, from a stated `remaining` and `reset` (the time until
    /// it is full again): a minute's allowance, or less where the server enforces the limit over
    /// a shorter span (3,000 a minute as 50 a second).
    stated_capacity: Option<f64>,
    level: f64,
    updated: Instant,
    /// Everything admitted so far.
    admitted: f64,
}

impl Bucket {
    fn per_minute(&self) -> Option<f64> {
        self.hand.or(self.stated)
    }

    fn capacity(&self, limit: f64) -> f64 {
        if self.synced {
            self.stated_capacity.unwrap_or(limit).min(limit)
        } else {
            limit * COLD_START
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(limit) = self.per_minute() {
            let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
            self.level = (self.level + elapsed * limit / 60.0).min(self.capacity(limit));
        }
        self.updated = now;
    }

    /// How long until `cost` fits (a cost above the whole bucket waits for a full one and runs
    /// into debt, so no request is refused for its size).
    fn wait_for(&self, cost: f64) -> Duration {
        let Some(limit) = self.per_minute() else { return Duration::ZERO };
        let needed = cost.min(self.capacity(limit));
        if self.level >= needed {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(((needed - self.level) * 60.0 / limit).min(86_400.0))
    }
}

impl LocalBudget {
    pub fn new(hand: HandLimits) -> Self {
        let now = Instant::now();
        let bucket = |hand: Option<u64>| {
            let hand = hand.filter(|n| *n > 0).map(|n| n as f64);
            Bucket {
                hand,
                stated: None,
                synced: false,
                stated_capacity: None,
                level: hand.map_or(0.0, |h| h * COLD_START),
                updated: now,
                admitted: 0.0,
            }
        };
        Self {
            state: Mutex::new(State {
                limits: [bucket(hand.rpm), bucket(hand.tpm), bucket(None), bucket(None)],
                blocked_until: None,
            }),
        }
    }

    // Only arithmetic happens under the lock: a poisoned one still holds consistent numbers.
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl LocalBudget {
    fn take(&self, estimate: &Estimate, now: Instant) -> Result<Ticket, Duration> {
        let mut state = self.lock();
        let mut wait = state.blocked_until.map_or(Duration::ZERO, |until| until.saturating_duration_since(now));
        for (bucket, kind) in state.limits.iter_mut().zip(Kind::ALL) {
            bucket.refill(now);
            wait = wait.max(bucket.wait_for(estimate.cost(kind)));
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        state.blocked_until = None;
        let mut ticket = Ticket::default();
        for ((bucket, kind), slot) in state.limits.iter_mut().zip(Kind::ALL).zip(&mut ticket.admitted) {
            let cost = estimate.cost(kind);
            bucket.admitted += cost;
            if bucket.per_minute().is_some() {
                bucket.level -= cost;
            }
            *slot = bucket.admitted;
        }
        Ok(ticket)
    }
}

impl Budget for LocalBudget {
    fn try_take(&self, estimate: Estimate, now: Instant) -> BoxFuture<'_, Result<Ticket, Duration>> {
        Box::pin(std::future::ready(self.take(&estimate, now)))
    }

    fn observe(&self, ticket: &Ticket, headers: &RateLimitHeaders, now: Instant) {
        if headers.is_empty() {
            return;
        }
        let mut state = self.lock();
        for ((bucket, kind), admitted) in state.limits.iter_mut().zip(Kind::ALL).zip(ticket.admitted) {
            let Some(window) = headers.window(kind) else { continue };
            bucket.refill(now);
            if let Some(limit) = window.limit {
                bucket.stated = Some(limit as f64);
            }
            let Some(limit) = bucket.per_minute() else { continue };
            if let Some(remaining) = window.remaining {
                // What the server had left when it answered, less everything admitted here since
                // this request was (some of it reached the server before the answer: counting it
                // twice errs on the side of fewer 429s). A request admitted before this one may
                // reach the server after it, so a stated level above the local one is not taken.
                let since = (bucket.admitted - admitted).max(0.0);
                let stated = (remaining as f64).min(limit) - since;
                bucket.level = if bucket.synced { bucket.level.min(stated) } else { stated };
                bucket.synced = true;
                if let Some(reset) = window.reset {
                    let full = remaining as f64 + reset.as_secs_f64() * limit / 60.0;
                    bucket.stated_capacity = Some(full.clamp(1.0, limit));
                }
            }
        }
        if let Some(after) = headers.retry_after {
            let until = now + after;
            state.blocked_until = Some(state.blocked_until.map_or(until, |b| b.max(until)));
        }
    }

    fn snapshot(&self) -> Value {
        let state = self.lock();
        let mut out = serde_json::Map::new();
        for (bucket, kind) in state.limits.iter().zip(Kind::ALL) {
            if let Some(limit) = bucket.per_minute() {
                let source = if bucket.hand.is_some() { "set" } else { "headers" };
                out.insert(kind.label().to_owned(), json!({"per_minute": limit as u64, "source": source}));
            }
        }
        Value::Object(out)
    }
}

/// Admits one endpoint's requests in arrival order, each when the budget allows it.
pub struct Pacer {
    budget: Arc<dyn Budget>,
    /// [`NO_PROBE`], [`PROBE_ARMED`] (the next request goes alone) or [`PROBE_IN_FLIGHT`].
    probe: AtomicU8,
    /// Wakes the requests that waited for the first answer.
    answered: tokio::sync::Notify,
    /// Waiters queue here (tokio's mutex is fair): only the one at the head watches the clock.
    queue: tokio::sync::Mutex<()>,
    admitted: AtomicU64,
    delayed: AtomicU64,
    waited_us: AtomicU64,
}

impl fmt::Debug for Pacer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pacer").field("budget", &self.budget).finish_non_exhaustive()
    }
}

impl Pacer {
    pub fn new(hand: HandLimits) -> Self {
        Self::with_budget(Arc::new(LocalBudget::new(hand)))
    }

    /// The pacer of requests to `endpoint` sent with `key`: its budget is kept in `shared` where
    /// the run has a store shared by processes, otherwise in this process.
    pub fn for_endpoint(
        shared: Option<&dyn SharedBudgets>,
        endpoint: &str,
        key: Option<&str>,
        hand: HandLimits,
    ) -> Self {
        match shared {
            Some(store) => Self::with_budget(store.budget(endpoint, &key_id(key), hand)),
            None => Self::new(hand),
        }
    }

    pub fn with_budget(budget: Arc<dyn Budget>) -> Self {
        Self {
            budget,
            probe: AtomicU8::new(NO_PROBE),
            answered: tokio::sync::Notify::new(),
            queue: tokio::sync::Mutex::new(()),
            admitted: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
            waited_us: AtomicU64::new(0),
        }
    }

    /// The first request goes alone, and the others wait for its answer (or its failure, see
    /// [`Pacer::answered`]): for a hosted API whose limits are learned from its headers.
    pub fn probe_first(&self) {
        self.probe.store(PROBE_ARMED, Relaxed);
    }

    /// Waits until `estimate` fits the budget and takes it. Dropping the future gives up the
    /// place in the queue; nothing is taken.
    pub async fn admit(&self, estimate: Estimate) -> Ticket {
        self.admitted.fetch_add(1, Relaxed);
        loop {
            match self.probe.load(Acquire) {
                PROBE_ARMED => {
                    if self.probe.compare_exchange(PROBE_ARMED, PROBE_IN_FLIGHT, AcqRel, Acquire).is_ok() {
                        break;
                    }
                }
                PROBE_IN_FLIGHT => {
                    let notified = self.answered.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if self.probe.load(Acquire) == PROBE_IN_FLIGHT {
                        notified.await;
                    }
                }
                _ => break,
            }
        }
        let turn = self.queue.lock().await;
        let start = Instant::now();
        let mut delayed = false;
        let ticket = loop {
            match self.budget.try_take(estimate, Instant::now()).await {
                Ok(ticket) => break ticket,
                Err(wait) => {
                    delayed = true;
                    tokio::time::sleep(wait).await;
                }
            }
        };
        drop(turn);
        if delayed {
            self.delayed.fetch_add(1, Relaxed);
            let waited = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.waited_us.fetch_add(waited, Relaxed);
        }
        ticket
    }

    /// What the answer to the request of `ticket` stated (a success's headers or a 429's).
    pub fn observe(&self, ticket: &Ticket, headers: &RateLimitHeaders) {
        self.budget.observe(ticket, headers, Instant::now());
        self.answered();
    }

    /// A request ended, answered or not (a connection error, a cancelled call): the requests
    /// waiting for the first answer go on.
    pub fn answered(&self) {
        if self.probe.load(Acquire) != NO_PROBE && self.probe.swap(NO_PROBE, AcqRel) != NO_PROBE {
            self.answered.notify_waiters();
        }
    }

    /// The limits in force and how much pacing held requests back.
    pub fn snapshot(&self) -> Value {
        json!({
            "limits": self.budget.snapshot(),
            "requests": self.admitted.load(Relaxed),
            "delayed": self.delayed.load(Relaxed),
            "wait_s": self.waited_us.load(Relaxed) as f64 / 1e6,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::headers::Window;

    fn stated(kind: Kind, limit: u64, remaining: u64) -> RateLimitHeaders {
        let mut h = RateLimitHeaders::default();
        h.windows[kind as usize] = Some(Window { limit: Some(limit), remaining: Some(remaining), reset: None });
        h
    }

    const ONE: Estimate = Estimate { input: 10, output: 10 };

    #[tokio::test(start_paused = true)]
    async fn without_limits_nothing_waits() {
        let pacer = Pacer::new(HandLimits::default());
        let start = Instant::now();
        for _ in 0..1000 {
            pacer.admit(ONE).await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hand_limit_paces_at_its_rate() {
        // 600 per minute: 10 per second, a cold start of one second's worth.
        let pacer = Pacer::new(HandLimits { rpm: Some(600), tpm: None });
        let start = Instant::now();
        for _ in 0..110 {
            pacer.admit(ONE).await;
        }
        // 10 at once, then 100 more at 10 a second.
        let elapsed = start.elapsed().as_secs_f64();
        assert!((elapsed - 10.0).abs() < 0.01, "{elapsed}");
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_pace_by_the_estimate() {
        let pacer = Pacer::new(HandLimits { rpm: None, tpm: Some(6000) });
        let start = Instant::now();
        // 100 tokens a second; a cold start of 100; each request 20 tokens.
        for _ in 0..55 {
            pacer.admit(ONE).await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        assert!((elapsed - 10.0).abs() < 0.01, "{elapsed}");
    }

    #[tokio::test(start_paused = true)]
    async fn stated_remaining_opens_the_bucket_and_later_admissions_count() {
        let pacer = Pacer::new(HandLimits::default());
        let first = pacer.admit(ONE).await;
        let _second = pacer.admit(ONE).await;
        // The first answer says 50 of 60 remain; the second request was admitted after it.
        pacer.observe(&first, &stated(Kind::Requests, 60, 50));
        let start = Instant::now();
        for _ in 0..49 {
            pacer.admit(ONE).await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        pacer.admit(ONE).await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert_eq!(pacer.snapshot()["limits"]["requests"]["source"], "headers");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stated_level_above_the_local_one_is_not_taken() {
        let pacer = Pacer::new(HandLimits::default());
        let first = pacer.admit(ONE).await;
        pacer.observe(&first, &stated(Kind::Requests, 60, 2));
        let second = pacer.admit(ONE).await;
        let third = pacer.admit(ONE).await;
        // An answer that overtook the others says more remain than the pacer knows to be left.
        pacer.observe(&second, &stated(Kind::Requests, 60, 30));
        pacer.observe(&third, &stated(Kind::Requests, 60, 30));
        let start = Instant::now();
        pacer.admit(ONE).await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_request_goes_alone_until_it_is_answered() {
        let pacer = Arc::new(Pacer::new(HandLimits::default()));
        pacer.probe_first();
        let probe = pacer.admit(ONE).await;
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let pacer = Arc::clone(&pacer);
                tokio::spawn(async move { pacer.admit(ONE).await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(waiting.iter().all(|w| !w.is_finished()));
        // The answer states 2 remaining: two go at once, the third a second later.
        pacer.observe(&probe, &stated(Kind::Requests, 60, 2));
        let start = Instant::now();
        for w in waiting {
            w.await.expect("admitted");
        }
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        // A failed request also releases the waiters of the next pacer.
        let other = Arc::new(Pacer::new(HandLimits::default()));
        other.probe_first();
        other.admit(ONE).await;
        let next = tokio::spawn({
            let other = Arc::clone(&other);
            async move { other.admit(ONE).await }
        });
        tokio::task::yield_now().await;
        assert!(!next.is_finished());
        other.answered();
        next.await.expect("admitted");
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_bucket_smaller_than_a_minute_is_learned_from_its_reset() {
        let pacer = Pacer::new(HandLimits::default());
        let first = pacer.admit(ONE).await;
        // 600 a minute, 9 left, full again in 100 ms: the server holds 10, one second's worth.
        let mut h = stated(Kind::Requests, 600, 9);
        h.windows[0] = h.windows[0].map(|w| Window { reset: Some(Duration::from_millis(100)), ..w });
        pacer.observe(&first, &h);
        // A minute idle refills the local bucket to 10, not 600.
        tokio::time::advance(Duration::from_secs(60)).await;
        let start = Instant::now();
        for _ in 0..10 {
            pacer.admit(ONE).await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        pacer.admit(ONE).await;
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_blocks_every_admission() {
        let pacer = Pacer::new(HandLimits::default());
        let ticket = pacer.admit(ONE).await;
        let h = RateLimitHeaders { retry_after: Some(Duration::from_secs(3)), ..RateLimitHeaders::default() };
        pacer.observe(&ticket, &h);
        let start = Instant::now();
        pacer.admit(ONE).await;
        pacer.admit(ONE).await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_larger_than_the_bucket_goes_into_debt() {
        let pacer = Pacer::new(HandLimits { rpm: None, tpm: Some(600) });
        let big = Estimate { input: 1000, output: 200 };
        let start = Instant::now();
        // The cold start holds 10 tokens: the request goes when the bucket is full, and the next
        // waits until the 1,200 it took are refilled at 10 a second.
        pacer.admit(big).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        pacer.admit(ONE).await;
        assert_eq!(start.elapsed().as_secs(), 120);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hand_limit_wins_over_a_stated_one() {
        let pacer = Pacer::new(HandLimits { rpm: Some(60), tpm: None });
        let t = pacer.admit(ONE).await;
        pacer.observe(&t, &stated(Kind::Requests, 6000, 0));
        let start = Instant::now();
        pacer.admit(ONE).await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert_eq!(pacer.snapshot()["limits"]["requests"], json!({"per_minute": 60, "source": "set"}));
    }

    #[test]
    fn estimates_count_four_characters_a_token() {
        assert_eq!(Estimate::from_text_len(9, Some(100)), Estimate { input: 3, output: 100 });
        assert_eq!(Estimate::from_text_len(0, None), Estimate::default());
    }
}
