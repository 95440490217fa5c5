//! `/sim/stats`: what the simulator saw and did, for tests and benchmarks to assert on.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};

use super::super::config::SimConfig;
use super::super::engine::EngineMetrics;
use super::super::faults::Faults;

/// Routes that are calls to the model.
const MODEL_ROUTES: [&str; 4] = ["/v1/chat/completions", "/v1/completions", "/v1/messages", "/api/chat"];

#[derive(Default)]
struct Inner {
    /// route -> HTTP status -> count
    by_route: BTreeMap<String, BTreeMap<u16, u64>>,
    prompt_tokens: u64,
    cached_tokens: u64,
    completion_tokens: u64,
    finished: u64,
    cache_hit_requests: u64,
    cache_creation_tokens: u64,
    cache_read_tokens: u64,
    finish_reasons: BTreeMap<&'static str, u64>,
    /// Simulated seconds, most recent last.
    ttft: VecDeque<f64>,
}

pub(crate) struct Stats {
    inner: Mutex<Inner>,
    window: usize,
    ids: AtomicU64,
}

impl Stats {
    pub fn new(window: usize) -> Self {
        Self { inner: Mutex::new(Inner::default()), window: window.max(1), ids: AtomicU64::new(1) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Counters stay meaningful even if a holder panicked mid-update.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    pub fn record_status(&self, route: &str, status: u16) {
        let mut inner = self.lock();
        *inner.by_route.entry(route.to_owned()).or_default().entry(status).or_insert(0) += 1;
    }

    pub fn record_finish(&self, prompt: usize, cached: usize, completion: usize, ttft: Duration) {
        let mut inner = self.lock();
        inner.prompt_tokens += prompt as u64;
        inner.cached_tokens += cached as u64;
        inner.completion_tokens += completion as u64;
        inner.finished += 1;
        if cached > 0 {
            inner.cache_hit_requests += 1;
        }
        if inner.ttft.len() == self.window {
            inner.ttft.pop_front();
        }
        inner.ttft.push_back(ttft.as_secs_f64());
    }

    /// vLLM's `finished_reason` label: `stop` or `length`.
    pub fn record_reason(&self, reason: &'static str) {
        *self.lock().finish_reasons.entry(reason).or_insert(0) += 1;
    }

    pub fn record_prompt_cache(&self, creation: usize, read: usize) {
        let mut inner = self.lock();
        inner.cache_creation_tokens += creation as u64;
        inner.cache_read_tokens += read as u64;
    }

    pub fn finish_reasons(&self) -> BTreeMap<&'static str, u64> {
        self.lock().finish_reasons.clone()
    }

    pub fn snapshot(&self, faults: &Faults, engine: &EngineMetrics, config: &SimConfig) -> Value {
        let inner = self.lock();
        let routes: serde_json::Map<String, Value> = inner
            .by_route
            .iter()
            .map(|(route, statuses)| {
                let by_status: serde_json::Map<String, Value> =
                    statuses.iter().map(|(s, n)| (s.to_string(), Value::from(*n))).collect();
                let total: u64 = statuses.values().sum();
                (route.clone(), json!({"total": total, "by_status": by_status}))
            })
            .collect();
        // Model calls only: probes of /health, /metrics or /v1/models are not requests to the model.
        let mut requests_by_status: BTreeMap<u16, u64> = BTreeMap::new();
        for (route, statuses) in &inner.by_route {
            if MODEL_ROUTES.contains(&route.as_str()) {
                for (status, n) in statuses {
                    *requests_by_status.entry(*status).or_insert(0) += n;
                }
            }
        }
        let requests = json!({
            "total": requests_by_status.values().sum::<u64>(),
            "by_status": requests_by_status.iter().map(|(s, n)| (s.to_string(), Value::from(*n))).collect::<serde_json::Map<String, Value>>(),
        });
        let mut sorted: Vec<f64> = inner.ttft.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let pct = |p: f64| -> Value {
            if sorted.is_empty() {
                return Value::Null;
            }
            let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
            json!(sorted[rank.min(sorted.len() - 1)])
        };
        let mean =
            if sorted.is_empty() { Value::Null } else { json!(sorted.iter().sum::<f64>() / sorted.len() as f64) };
        json!({
            "model": config.model,
            "profile": config.profile,
            "seed": config.seed,
            "time_scale": config.time_scale,
            "requests": requests,
            "routes": routes,
            "requests_finished": inner.finished,
            "finish_reasons": inner.finish_reasons,
            "tokens": {
                "prompt": inner.prompt_tokens,
                "cached": inner.cached_tokens,
                "completion": inner.completion_tokens,
            },
            "cache": {
                "hit_requests": inner.cache_hit_requests,
                "prefix_queries_tokens": engine.prefix_queries,
                "prefix_hits_tokens": engine.prefix_hits,
                "anthropic_creation_tokens": inner.cache_creation_tokens,
                "anthropic_read_tokens": inner.cache_read_tokens,
            },
            "faults": faults.injected(),
            "engine": {
                "running": engine.running,
                "waiting": engine.waiting,
                "kv_usage": engine.kv_usage,
                "steps": engine.steps,
                "preemptions": engine.preemptions,
                "kv_pins": {"made": engine.pins, "returned": engine.pins_returned, "dropped": engine.pins_dropped, "expired": engine.pins_expired},
                "requests_rejected": engine.requests_rejected,
                "requests_aborted": engine.requests_aborted,
                "sim_time_seconds": engine.sim_time.as_secs_f64(),
                "busy_seconds": engine.busy.as_secs_f64(),
                "busy_seconds_by_part": crate::sim::profile::STEP_PARTS
                    .iter()
                    .zip(engine.busy_parts)
                    .map(|(part, s)| ((*part).to_owned(), serde_json::Value::from(s)))
                    .collect::<serde_json::Map<_, _>>(),
                "step_prefill_tokens": engine.step_prefill_tokens,
                "step_decode_seqs": engine.step_decode_seqs,
                "step_kv_tokens_read": engine.step_kv_tokens_read,
            },
            "ttft_seconds": {
                "recent": inner.ttft.iter().copied().collect::<Vec<f64>>(),
                "count": sorted.len(),
                "mean": mean,
                "p50": pct(50.0),
                "p90": pct(90.0),
                "p99": pct(99.0),
            },
        })
    }
}
