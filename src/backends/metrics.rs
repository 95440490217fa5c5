//! Engine metrics from a Prometheus `/metrics` endpoint (vLLM and SGLang names): queue depth,
//! running requests, prefix-cache hit rate and KV-cache usage, polled in the background. The
//! scheduler can hold new model calls while the engine's queue is above a ceiling (back-pressure):
//! requests queued inside the engine only add latency and cannot be re-prioritised there.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::http::{limited_body, BodyError};

/// Largest `/metrics` page read (vLLM's is tens of kilobytes).
const MAX_METRICS_BODY: usize = 8 * 1024 * 1024;

/// One reading of an engine's metrics. Missing metrics are `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EngineMetrics {
    pub waiting: Option<f64>,
    pub running: Option<f64>,
    /// Fraction of the KV cache in use, 0..1.
    pub kv_usage: Option<f64>,
    /// Cumulative prefix-cache figures in tokens (vLLM); SGLang reports only the rate.
    pub prefix_queries: Option<f64>,
    pub prefix_hits: Option<f64>,
    pub prefix_hit_rate: Option<f64>,
    /// Tokens the KV cache holds: vLLM's `cache_config_info` labels `num_gpu_blocks` x
    /// `block_size`, SGLang's `max_total_num_tokens`.
    pub kv_capacity_tokens: Option<f64>,
    /// Cumulative preemptions (vLLM `num_preemptions`).
    pub preemptions: Option<f64>,
}

/// Parses Prometheus text exposition. Sums a metric over its label sets (several models or
/// engines behind one endpoint add up).
pub fn parse(text: &str) -> EngineMetrics {
    let mut m = EngineMetrics::default();
    // Older vLLM calls KV usage `gpu_cache_usage_perc`; newer ones export both names.
    let mut legacy_kv: Option<f64> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // "name{labels} value [timestamp]": label values may hold spaces, so split after the '}'.
        let (name, rest) = match line.find('{') {
            Some(open) => match line[open..].find('}') {
                Some(close) => (&line[..open], &line[open + close + 1..]),
                None => continue,
            },
            None => line.split_once(char::is_whitespace).unwrap_or((line, "")),
        };
        let Some(Ok(value)) = rest.split_whitespace().next().map(str::parse::<f64>) else { continue };
        if name == "vllm:cache_config_info" {
            // An info gauge: the figures are label values, `1` is the sample.
            let labels = &line[name.len()..line.len() - rest.len()];
            if let (Some(blocks), Some(size)) = (label(labels, "num_gpu_blocks"), label(labels, "block_size")) {
                m.kv_capacity_tokens = Some(m.kv_capacity_tokens.unwrap_or(0.0) + blocks * size);
            }
            continue;
        }
        let slot = match name {
            "vllm:num_requests_waiting" | "sglang:num_queue_reqs" => &mut m.waiting,
            "vllm:num_requests_running" | "sglang:num_running_reqs" => &mut m.running,
            "vllm:kv_cache_usage_perc" | "sglang:token_usage" => &mut m.kv_usage,
            "vllm:gpu_cache_usage_perc" => &mut legacy_kv,
            "vllm:prefix_cache_queries_total" | "vllm:prefix_cache_queries" | "vllm:gpu_prefix_cache_queries_total" => {
                &mut m.prefix_queries
            }
            "vllm:prefix_cache_hits_total" | "vllm:prefix_cache_hits" | "vllm:gpu_prefix_cache_hits_total" => {
                &mut m.prefix_hits
            }
            "sglang:cache_hit_rate" => &mut m.prefix_hit_rate,
            "sglang:max_total_num_tokens" => &mut m.kv_capacity_tokens,
            "vllm:num_preemptions_total" | "vllm:num_preemptions" => &mut m.preemptions,
            _ => continue,
        };
        *slot = Some(slot.unwrap_or(0.0) + value);
    }
    m.kv_usage = m.kv_usage.or(legacy_kv);
    if m.prefix_hit_rate.is_none() {
        if let (Some(q), Some(h)) = (m.prefix_queries, m.prefix_hits) {
            m.prefix_hit_rate = (q > 0.0).then(|| h / q);
        }
    }
    m
}

/// Where an endpoint's `/metrics` are read, with the headers (the API key) its server asks for.
#[derive(Clone)]
pub struct MetricsSource {
    pub url: String,
    pub headers: reqwest::header::HeaderMap,
}

impl MetricsSource {
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), headers: reqwest::header::HeaderMap::new() }
    }
}

/// A numeric label value from `{a="1",b="2"}`, if it is there and is a finite non-negative number.
fn label(labels: &str, key: &str) -> Option<f64> {
    let inner = labels.strip_prefix('{')?.strip_suffix('}')?;
    inner
        .split(',')
        .find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').parse::<f64>().ok())?
        })
        .filter(|v| v.is_finite() && *v >= 0.0)
}

/// Polls a `/metrics` URL in the background; the latest reading is always at hand.
pub struct MetricsWatcher {
    latest: watch::Receiver<Option<(Instant, EngineMetrics)>>,
    errors: Arc<Mutex<Option<String>>>,
    task: JoinHandle<()>,
}

impl MetricsWatcher {
    pub fn start(source: MetricsSource, interval: Duration) -> Self {
        let (tx, rx) = watch::channel(None);
        let errors = Arc::new(Mutex::new(None));
        let last_error = errors.clone();
        let task = tokio::spawn(async move {
            let Ok(client) = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(5))
                .build()
            else {
                return;
            };
            loop {
                match scrape(&client, &source).await {
                    Ok(metrics) => {
                        let _ = tx.send(Some((Instant::now(), metrics)));
                    }
                    Err(e) => {
                        if let Ok(mut slot) = last_error.lock() {
                            *slot = Some(e);
                        }
                    }
                }
                tokio::time::sleep(interval).await;
            }
        });
        Self { latest: rx, errors, task }
    }

    pub fn latest(&self) -> Option<EngineMetrics> {
        self.latest.borrow().as_ref().map(|(_, m)| m.clone())
    }

    pub fn last_error(&self) -> Option<String> {
        self.errors.lock().ok().and_then(|e| e.clone())
    }

    /// Waits while the engine's queue is above `ceiling`. A stale or missing reading (the endpoint
    /// stopped answering) never blocks: back-pressure must not turn into a stall.
    pub async fn wait_for_room(&self, ceiling: f64) {
        let mut rx = self.latest.clone();
        loop {
            let blocked = match rx.borrow_and_update().as_ref() {
                Some((at, m)) => at.elapsed() < Duration::from_secs(5) && m.waiting.is_some_and(|w| w > ceiling),
                None => false,
            };
            if !blocked {
                return;
            }
            if tokio::time::timeout(Duration::from_secs(5), rx.changed()).await.is_err() {
                return;
            }
        }
    }
}

impl Drop for MetricsWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The metrics of every endpoint of a run, read together.
pub struct EngineWatch {
    watchers: Vec<MetricsWatcher>,
}

impl EngineWatch {
    /// Starts one watcher per URL (on the current tokio runtime).
    pub fn start(sources: &[MetricsSource], interval: Duration) -> Self {
        Self { watchers: sources.iter().map(|s| MetricsWatcher::start(s.clone(), interval)).collect() }
    }

    /// The latest reading of each endpoint (`None` where none has come yet).
    pub fn latest(&self) -> Vec<Option<EngineMetrics>> {
        self.watchers.iter().map(MetricsWatcher::latest).collect()
    }

    /// Waits while every endpoint's queue is above `ceiling` (a call can still go to one with room).
    pub async fn wait_for_room(&self, ceiling: f64) {
        if self.watchers.is_empty() {
            return;
        }
        let has_room = |w: &MetricsWatcher| w.latest().and_then(|m| m.waiting).is_none_or(|q| q <= ceiling);
        if self.watchers.iter().any(has_room) {
            return;
        }
        // Wait on the first endpoint; the others are checked again on the next call.
        if let Some(first) = self.watchers.first() {
            first.wait_for_room(ceiling).await;
        }
    }
}

async fn scrape(client: &reqwest::Client, source: &MetricsSource) -> Result<EngineMetrics, String> {
    let url = &source.url;
    let response = client
        .get(url)
        .headers(source.headers.clone())
        .send()
        .await
        .map_err(|e| format!("GET {url}: {}", e.without_url()))?;
    if !response.status().is_success() {
        return Err(format!("GET {url}: HTTP {}", response.status().as_u16()));
    }
    let body = limited_body(response, MAX_METRICS_BODY, None).await.map_err(|e| match e {
        BodyError::Transport(e) => format!("GET {url}: {}", e.without_url()),
        other => format!("GET {url}: {}", other.into_backend()),
    })?;
    Ok(parse(&String::from_utf8_lossy(&body)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen"} 12.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen"} 7.0
vllm:kv_cache_usage_perc{engine="0",model_name="qwen"} 0.25
vllm:gpu_cache_usage_perc{engine="0",model_name="qwen"} 0.25
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="qwen"} 4000.0
vllm:prefix_cache_hits_total{engine="0",model_name="qwen"} 3000.0
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="qwen"} 0.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",num_gpu_blocks="6250",engine="0"} 1.0
vllm:num_preemptions_total{engine="0",model_name="qwen"} 3.0
"#;

    const SGLANG: &str = "sglang:num_running_reqs{model_name=\"m\"} 3\nsglang:num_queue_reqs{model_name=\"m\"} 9\nsglang:token_usage{model_name=\"m\"} 0.5\nsglang:cache_hit_rate{model_name=\"m\"} 0.8\nsglang:max_total_num_tokens{model_name=\"m\"} 500000\n";

    #[test]
    fn reads_vllm_names() {
        let m = parse(VLLM);
        assert_eq!(m.running, Some(12.0));
        assert_eq!(m.waiting, Some(7.0));
        assert_eq!(m.kv_usage, Some(0.25));
        assert_eq!(m.prefix_hit_rate, Some(0.75));
        assert_eq!(m.kv_capacity_tokens, Some(100_000.0));
        assert_eq!(m.preemptions, Some(3.0));
    }

    #[test]
    fn reads_sglang_names() {
        let m = parse(SGLANG);
        assert_eq!((m.running, m.waiting, m.kv_usage, m.prefix_hit_rate), (Some(3.0), Some(9.0), Some(0.5), Some(0.8)));
        assert_eq!(m.kv_capacity_tokens, Some(500_000.0));
    }

    #[test]
    fn sums_over_label_sets_and_skips_timestamps() {
        let m = parse("vllm:num_requests_waiting{model_name=\"a\"} 2\nvllm:num_requests_waiting{model_name=\"b\"} 3 1700000000000\n");
        assert_eq!(m.waiting, Some(5.0));
    }
}
