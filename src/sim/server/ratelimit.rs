//! Rate limits as hosted APIs enforce and state them (`rate_limit_rpm`, `rate_limit_tpm`).
//!
//! Each limit is a token bucket that holds `rate_limit_burst` seconds of allowance (one minute's by
//! default) and refills continuously at `limit / 60` per second, the way `OpenAI` and Anthropic
//! describe theirs; it starts full. A
//! request costs one request and its tokens, counted before it runs as the providers do: the
//! characters of its messages / 4, plus its `max_tokens`. A request that does not fit is answered
//! 429 with `retry-after` (whole seconds until it would fit) and costs nothing. Every answer of a
//! model route states the limits in the provider's headers: `OpenAI`'s `x-ratelimit-*` (resets as
//! Go durations) on `/v1/chat/completions` and `/v1/completions`, Anthropic's
//! `anthropic-ratelimit-*` (resets as RFC 3339 times) on `/v1/messages`.
//!
//! The clock is real time (tokio's, so tests can pause it), never scaled by `time_scale`: a run
//! with a fast engine still meets the limit as it would in production.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::{json_response, AppState};
use crate::limits::headers::{format_go_duration, format_rfc3339};

/// The most bytes of a request body read to count its tokens (axum's default body limit, which the
/// routes themselves apply).
const MAX_BODY: usize = 2 * 1024 * 1024;

/// Which provider's headers and error body a route answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    OpenAi,
    Anthropic,
}

impl Dialect {
    fn of(path: &str) -> Option<Self> {
        match path {
            "/v1/chat/completions" | "/v1/completions" => Some(Self::OpenAi),
            "/v1/messages" => Some(Self::Anthropic),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Per minute.
    limit: f64,
    capacity: f64,
    level: f64,
}

impl Bucket {
    fn new(limit: u64, burst: f64) -> Self {
        let capacity = (limit as f64 * burst / 60.0).max(1.0);
        Self { limit: limit as f64, capacity, level: capacity }
    }

    fn refill(&mut self, seconds: f64) {
        self.level = (self.level + seconds * self.limit / 60.0).min(self.capacity);
    }

    /// A cost above the whole bucket is let through when the bucket is full (never refused forever).
    fn shortfall(&self, cost: f64) -> f64 {
        (cost.min(self.capacity) - self.level).max(0.0)
    }

    fn wait(&self, cost: f64) -> Duration {
        Duration::from_secs_f64(self.shortfall(cost) * 60.0 / self.limit)
    }

    fn state(&self) -> Limit {
        let remaining = self.level.max(0.0).floor();
        Limit {
            per_minute: self.limit as u64,
            remaining: remaining as u64,
            reset: Duration::from_secs_f64(((self.capacity - self.level.max(0.0)) * 60.0 / self.limit).max(0.0)),
        }
    }
}

/// One limit as an answer states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limit {
    pub per_minute: u64,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// What the limiter decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// `None`: admitted; otherwise how long until it would fit.
    pub refused: Option<Duration>,
    pub requests: Option<Limit>,
    pub tokens: Option<Limit>,
}

#[derive(Debug)]
struct Buckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    updated: Instant,
    admitted: u64,
    refused: u64,
    admitted_tokens: u64,
}

/// The simulator's rate limits.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    state: Mutex<Buckets>,
}

impl RateLimiter {
    /// `None` when neither limit is set; `burst` is the seconds of allowance a bucket holds.
    pub fn new(rpm: Option<u64>, tpm: Option<u64>, burst: f64) -> Option<Self> {
        if rpm.is_none() && tpm.is_none() {
            return None;
        }
        Some(Self {
            state: Mutex::new(Buckets {
                requests: rpm.map(|l| Bucket::new(l, burst)),
                tokens: tpm.map(|l| Bucket::new(l, burst)),
                updated: Instant::now(),
                admitted: 0,
                refused: 0,
                admitted_tokens: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a request of `tokens` tokens at `now`, or says how long until it would fit.
    pub fn check(&self, tokens: u64, now: Instant) -> Verdict {
        let mut guard = self.lock();
        let state = &mut *guard;
        let seconds = now.saturating_duration_since(state.updated).as_secs_f64();
        state.updated = now;
        let cost = tokens as f64;
        for bucket in [&mut state.requests, &mut state.tokens].into_iter().flatten() {
            bucket.refill(seconds);
        }
        let wait = state
            .requests
            .map_or(Duration::ZERO, |b| b.wait(1.0))
            .max(state.tokens.map_or(Duration::ZERO, |b| b.wait(cost)));
        let refused = if wait.is_zero() {
            state.admitted += 1;
            state.admitted_tokens += tokens;
            if let Some(b) = &mut state.requests {
                b.level -= 1.0;
            }
            if let Some(b) = &mut state.tokens {
                b.level -= cost;
            }
            None
        } else {
            state.refused += 1;
            Some(wait)
        };
        Verdict { refused, requests: state.requests.map(|b| b.state()), tokens: state.tokens.map(|b| b.state()) }
    }

    /// For `/sim/stats`.
    pub fn stats(&self) -> Value {
        let state = self.lock();
        json!({
            "rpm": state.requests.map(|b| b.limit as u64),
            "tpm": state.tokens.map(|b| b.limit as u64),
            "admitted": state.admitted,
            "refused": state.refused,
            "admitted_tokens": state.admitted_tokens,
        })
    }
}

/// The tokens a request counts against the limit: the characters of its messages (`OpenAI` chat
/// contents and tool-call arguments, completion prompts, Anthropic system and content blocks) / 4,
/// plus `max_tokens` (per prompt for a list of completion prompts).
pub(crate) fn request_tokens(body: &Value) -> u64 {
    fn text_len(v: &Value) -> usize {
        match v {
            Value::String(s) => s.len(),
            Value::Array(parts) => parts.iter().map(text_len).sum(),
            Value::Object(part) => {
                let mut n = 0;
                for key in ["text", "content", "name", "arguments"] {
                    n += part.get(key).map_or(0, text_len);
                }
                if let Some(input) = part.get("input") {
                    n += input.to_string().len();
                }
                if let Some(function) = part.get("function") {
                    n += text_len(function);
                }
                if let Some(Value::Array(calls)) = part.get("tool_calls") {
                    n += calls.iter().map(text_len).sum::<usize>();
                }
                n
            }
            _ => 0,
        }
    }
    let mut chars = body.get("messages").map_or(0, text_len) + body.get("system").map_or(0, text_len);
    let mut prompts = 1u64;
    match body.get("prompt") {
        Some(Value::String(s)) => chars += s.len(),
        Some(Value::Array(items)) => {
            chars += items.iter().map(text_len).sum::<usize>();
            prompts = items.len().max(1) as u64;
        }
        _ => {}
    }
    let max_tokens = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|key| body.get(*key).and_then(Value::as_u64))
        .unwrap_or(0);
    (chars as u64).div_ceil(4).saturating_add(max_tokens.saturating_mul(prompts))
}

fn put(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

/// The provider's rate-limit headers for a verdict.
pub(crate) fn write_headers(dialect: Dialect, verdict: &Verdict, headers: &mut HeaderMap) {
    let now = SystemTime::now();
    let limits = [("requests", verdict.requests), ("tokens", verdict.tokens)];
    for (what, limit) in limits {
        let Some(l) = limit else { continue };
        match (dialect, what) {
            (Dialect::OpenAi, "requests") => {
                put(headers, "x-ratelimit-limit-requests", &l.per_minute.to_string());
                put(headers, "x-ratelimit-remaining-requests", &l.remaining.to_string());
                put(headers, "x-ratelimit-reset-requests", &format_go_duration(l.reset));
            }
            (Dialect::OpenAi, _) => {
                put(headers, "x-ratelimit-limit-tokens", &l.per_minute.to_string());
                put(headers, "x-ratelimit-remaining-tokens", &l.remaining.to_string());
                put(headers, "x-ratelimit-reset-tokens", &format_go_duration(l.reset));
            }
            (Dialect::Anthropic, "requests") => {
                put(headers, "anthropic-ratelimit-requests-limit", &l.per_minute.to_string());
                put(headers, "anthropic-ratelimit-requests-remaining", &l.remaining.to_string());
                put(headers, "anthropic-ratelimit-requests-reset", &format_rfc3339(now + l.reset));
            }
            (Dialect::Anthropic, _) => {
                put(headers, "anthropic-ratelimit-tokens-limit", &l.per_minute.to_string());
                put(headers, "anthropic-ratelimit-tokens-remaining", &l.remaining.to_string());
                put(headers, "anthropic-ratelimit-tokens-reset", &format_rfc3339(now + l.reset));
            }
        }
    }
    if let Some(wait) = verdict.refused {
        // Whole seconds, rounded up: a client that waits this long finds room.
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    }
}

fn refusal(dialect: Dialect) -> Response {
    let status = StatusCode::TOO_MANY_REQUESTS;
    match dialect {
        Dialect::OpenAi => json_response(
            status,
            &json!({"error": {"message": "Rate limit reached: requests or tokens per minute. Please try again later.",
                              "type": "requests", "param": null, "code": "rate_limit_exceeded"}}),
        ),
        Dialect::Anthropic => json_response(
            status,
            &json!({"type": "error", "error": {"type": "rate_limit_error",
                    "message": "This request would exceed your organization's rate limit. Please try again later."}}),
        ),
    }
}

/// The layer in front of the model routes: admits or refuses each request, and states the limits.
pub(crate) async fn layer(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let (Some(limiter), Some(dialect)) = (&state.limiter, Dialect::of(req.uri().path())) else {
        return next.run(req).await;
    };
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
        return json_response(StatusCode::PAYLOAD_TOO_LARGE, &json!({"error": {"message": "request body too large"}}));
    };
    // A body that does not parse costs one request and no tokens; the route answers it with a 400.
    let tokens = serde_json::from_slice::<Value>(&bytes).map_or(0, |v| request_tokens(&v));
    let verdict = limiter.check(tokens, Instant::now());
    let mut response = if verdict.refused.is_some() {
        refusal(dialect)
    } else {
        next.run(Request::from_parts(parts, Body::from(bytes))).await
    };
    write_headers(dialect, &verdict, response.headers_mut());
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::headers::{Kind, RateLimitHeaders};

    #[tokio::test(start_paused = true)]
    async fn a_bucket_admits_a_minute_then_the_refill_rate() {
        let limiter = RateLimiter::new(Some(60), None, 60.0).expect("a limit");
        let now = Instant::now();
        for i in 0..60 {
            let v = limiter.check(0, now);
            assert_eq!(v.refused, None, "request {i}");
        }
        let v = limiter.check(0, now);
        assert_eq!(v.refused, Some(Duration::from_secs(1)));
        assert_eq!(v.requests, Some(Limit { per_minute: 60, remaining: 0, reset: Duration::from_secs(60) }));
        // One a second comes back.
        assert_eq!(limiter.check(0, now + Duration::from_secs(1)).refused, None);
        assert!(limiter.check(0, now + Duration::from_secs(1)).refused.is_some());
        assert_eq!(limiter.stats()["admitted"], 61);
        assert_eq!(limiter.stats()["refused"], 2);
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_count_against_their_own_limit() {
        let limiter = RateLimiter::new(None, Some(1000), 60.0).expect("a limit");
        let now = Instant::now();
        assert_eq!(limiter.check(600, now).refused, None);
        // 400 left; 500 more takes 100 tokens' refill: 6 seconds at 1000 a minute.
        assert_eq!(limiter.check(500, now).refused, Some(Duration::from_secs(6)));
        // Larger than the whole bucket: waits for a full one.
        let v = limiter.check(5000, now + Duration::from_secs(36));
        assert_eq!(v.refused, None);
        assert_eq!(v.tokens.map(|t| t.remaining), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_burst_enforces_the_rate_per_second() {
        // 600 a minute held as one second's worth: 10 at once, then one every 100 ms.
        let limiter = RateLimiter::new(Some(600), None, 1.0).expect("a limit");
        let now = Instant::now();
        for _ in 0..10 {
            assert_eq!(limiter.check(0, now).refused, None);
        }
        let v = limiter.check(0, now);
        assert_eq!(v.refused, Some(Duration::from_millis(100)));
        assert_eq!(v.requests.map(|r| (r.per_minute, r.remaining)), Some((600, 0)));
        assert_eq!(limiter.check(0, now + Duration::from_millis(100)).refused, None);
    }

    #[test]
    fn tokens_of_each_protocol() {
        let chat = json!({"messages": [{"role": "user", "content": "12345678"},
            {"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "ab", "arguments": "{}"}}]}],
            "max_tokens": 10});
        assert_eq!(request_tokens(&chat), 2 + 1 + 10);
        let anthropic = json!({"system": "abcd", "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "abcdefgh"}]}]});
        assert_eq!(request_tokens(&anthropic), 3 + 5);
        let completions = json!({"prompt": ["abcd", "efgh"], "max_tokens": 3});
        assert_eq!(request_tokens(&completions), 2 + 6);
    }

    #[tokio::test(start_paused = true)]
    async fn headers_read_back_as_stated() {
        let limiter = RateLimiter::new(Some(3000), Some(1_000_000), 60.0).expect("a limit");
        let verdict = limiter.check(1000, Instant::now());
        for dialect in [Dialect::OpenAi, Dialect::Anthropic] {
            let mut headers = HeaderMap::new();
            write_headers(dialect, &verdict, &mut headers);
            let stated = RateLimitHeaders::parse(|n| headers.get(n).and_then(|v| v.to_str().ok()), SystemTime::now());
            let requests = stated.window(Kind::Requests).copied().unwrap_or_default();
            assert_eq!((requests.limit, requests.remaining), (Some(3000), Some(2999)), "{dialect:?}");
            let tokens = stated.window(Kind::Tokens).copied().unwrap_or_default();
            assert_eq!((tokens.limit, tokens.remaining), (Some(1_000_000), Some(999_000)), "{dialect:?}");
            assert_eq!(stated.retry_after, None);
        }
        let mut headers = HeaderMap::new();
        let refused = Verdict { refused: Some(Duration::from_millis(20)), ..verdict };
        write_headers(Dialect::OpenAi, &refused, &mut headers);
        assert_eq!(headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
        assert_eq!(headers.get("x-ratelimit-reset-requests").and_then(|v| v.to_str().ok()), Some("20ms"));
    }
}
