//! The run's figures in the Prometheus text exposition format (0.0.4), served on `GET /metrics` for
//! as long as the run goes (`metrics_port=`, `--metrics-port`). Each scrape reads the run's atomic
//! counters; nothing is computed on the hot path for it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use axum::Router;
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::scheduler::agent::RunContext;
use crate::scheduler::stats::Histogram;

/// Upper bounds (seconds) of the latency histograms' buckets: from a cached prefill's first token
/// to a long agent's whole run.
const LATENCY_BOUNDS: [f64; 17] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0];

const CONTENT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A `/metrics` endpoint; stopped by [`MetricsServer::stop`] or when dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` (`host:port`; port 0 takes a free one) and serves what `render` returns.
    pub async fn start(addr: &str, render: Arc<dyn Fn() -> String + Send + Sync>) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let router = Router::new().route(
            "/metrics",
            get(move || {
                let render = Arc::clone(&render);
                async move { ([(CONTENT_TYPE, CONTENT)], render()) }
            }),
        );
        let task = tokio::spawn(async move {
            // Serving ends only when stopped or on a listener failure; neither has anyone to tell.
            let _ = axum::serve(listener, router).await;
        });
        Ok(Self { addr: local, task: Some(task) })
    }

    /// `http://host:port/metrics` (an unspecified bind address is given as loopback).
    pub fn url(&self) -> String {
        let ip = if self.addr.ip().is_unspecified() { "127.0.0.1".to_owned() } else { self.addr.ip().to_string() };
        if self.addr.is_ipv6() && !self.addr.ip().is_unspecified() {
            format!("http://[{ip}]:{}/metrics", self.addr.port())
        } else {
            format!("http://{ip}:{}/metrics", self.addr.port())
        }
    }

    /// Closes the listening socket; returns once the port is free. (A scraper's open keep-alive
    /// connection is answered until it closes it.)
    pub async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The run's figures, in the text format. `cache_hits`: answers that came from the response cache
/// (counted as model calls by the scheduler, but none was sent).
pub fn render(ctx: &RunContext, cache_hits: u64) -> String {
    let stats = &ctx.stats;
    let mut out = Exposition::default();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Relaxed) as f64;

    out.family("batchagent_jobs_started_total", "counter", "Jobs started (each input runs as one job).");
    out.sample("batchagent_jobs_started_total", &[], load(&stats.jobs_started));
    out.family("batchagent_jobs_finished_total", "counter", "Jobs with a result, by outcome.");
    out.sample("batchagent_jobs_finished_total", &[("outcome", "ok")], load(&stats.jobs_ok));
    out.sample("batchagent_jobs_finished_total", &[("outcome", "failed")], load(&stats.jobs_failed));
    out.family("batchagent_jobs_in_flight", "gauge", "Jobs started and not finished.");
    out.sample("batchagent_jobs_in_flight", &[], load(&stats.jobs_running));
    out.family(
        "batchagent_jobs_skipped_total",
        "counter",
        "Inputs whose result a journal held from an earlier run (not run again).",
    );
    out.sample("batchagent_jobs_skipped_total", &[], load(&stats.jobs_skipped));
    out.family("batchagent_job_errors_total", "counter", "Failed jobs by error kind.");
    for (kind, count) in stats.errors_by_kind() {
        out.sample("batchagent_job_errors_total", &[("kind", &kind)], count as f64);
    }

    out.family("batchagent_model_calls_total", "counter", "Model calls sent, retries included.");
    out.sample("batchagent_model_calls_total", &[], (load(&stats.model_calls) - cache_hits as f64).max(0.0));
    out.family("batchagent_model_calls_in_flight", "gauge", "Model calls sent and not yet answered.");
    out.sample("batchagent_model_calls_in_flight", &[], load(&stats.model_calls_in_flight));
    out.family("batchagent_max_inflight", "gauge", "Model calls allowed in flight now (adaptive).");
    out.sample("batchagent_max_inflight", &[], ctx.slots.capacity() as f64);
    out.family("batchagent_model_call_retries_total", "counter", "Model calls sent again after a failure.");
    out.sample("batchagent_model_call_retries_total", &[], load(&stats.retries));
    out.family("batchagent_model_calls_throttled_total", "counter", "Model calls answered 429 or throttled.");
    out.sample("batchagent_model_calls_throttled_total", &[], load(&stats.throttled));
    out.family("batchagent_agents_waiting_on_tools", "gauge", "Agents waiting on their tool calls.");
    out.sample("batchagent_agents_waiting_on_tools", &[], load(&stats.agents_in_tools));

    let prompt = load(&stats.prompt_tokens);
    let cached = load(&stats.cached_tokens);
    out.family("batchagent_prompt_tokens_total", "counter", "Prompt tokens of the answered model calls.");
    out.sample("batchagent_prompt_tokens_total", &[], prompt);
    out.family(
        "batchagent_cached_prompt_tokens_total",
        "counter",
        "Prompt tokens the engine's prefix cache (or the provider's prompt cache) served.",
    );
    out.sample("batchagent_cached_prompt_tokens_total", &[], cached);
    out.family("batchagent_completion_tokens_total", "counter", "Completion tokens of the answered model calls.");
    out.sample("batchagent_completion_tokens_total", &[], load(&stats.completion_tokens));
    out.family("batchagent_prefix_cache_hit_ratio", "gauge", "Cached prompt tokens over prompt tokens, so far.");
    out.sample("batchagent_prefix_cache_hit_ratio", &[], if prompt > 0.0 { cached / prompt } else { 0.0 });

    out.histogram(
        "batchagent_model_call_duration_seconds",
        "Model call latency (answered calls).",
        &stats.model_latency,
    );
    out.histogram(
        "batchagent_time_to_first_token_seconds",
        "Time to first token of streamed model calls.",
        &stats.ttft,
    );
    out.histogram("batchagent_job_duration_seconds", "Job latency, from start to result.", &stats.job_latency);

    let tools = ctx.tools.stats();
    out.family("batchagent_tool_calls_total", "counter", "Tool calls the models made, by tool.");
    for (name, counts) in &tools.per_tool {
        out.sample("batchagent_tool_calls_total", &[("tool", name)], counts.requests as f64);
    }
    out.family("batchagent_tool_executions_total", "counter", "Tool executions (after caching and coalescing).");
    for (name, counts) in &tools.per_tool {
        out.sample("batchagent_tool_executions_total", &[("tool", name)], counts.executions as f64);
    }
    out.family("batchagent_tool_cache_hits_total", "counter", "Tool calls answered from the result cache.");
    for (name, counts) in &tools.per_tool {
        out.sample("batchagent_tool_cache_hits_total", &[("tool", name)], counts.cache_hits as f64);
    }
    out.family("batchagent_tool_errors_total", "counter", "Tool calls that ended in an error (timeouts included).");
    for (name, counts) in &tools.per_tool {
        out.sample("batchagent_tool_errors_total", &[("tool", name)], counts.errors as f64);
    }

    endpoints(&mut out, ctx, stats.model_calls_in_flight.load(Relaxed), stats.model_calls.load(Relaxed));
    out.text
}

/// Per-endpoint load: a fleet's own figures, or the one backend's.
fn endpoints(out: &mut Exposition, ctx: &RunContext, in_flight: u64, calls: u64) {
    out.family("batchagent_endpoint_outstanding", "gauge", "Model calls in flight, by endpoint.");
    let Some(Value::Array(fleet)) = ctx.backend.endpoint_stats() else {
        let name = ctx.backend.name();
        out.sample("batchagent_endpoint_outstanding", &[("endpoint", name)], in_flight as f64);
        out.family("batchagent_endpoint_requests_total", "counter", "Model calls answered, by endpoint.");
        out.sample("batchagent_endpoint_requests_total", &[("endpoint", name)], calls as f64);
        return;
    };
    let field = |e: &Value, key: &str| e.get(key).and_then(Value::as_f64).unwrap_or(0.0);
    let name = |e: &Value| e.get("name").and_then(Value::as_str).unwrap_or("").to_owned();
    for e in &fleet {
        out.sample("batchagent_endpoint_outstanding", &[("endpoint", &name(e))], field(e, "outstanding"));
    }
    out.family("batchagent_endpoint_requests_total", "counter", "Model calls answered, by endpoint.");
    for e in &fleet {
        out.sample("batchagent_endpoint_requests_total", &[("endpoint", &name(e))], field(e, "served"));
    }
    out.family("batchagent_endpoint_up", "gauge", "1 while the endpoint takes calls, 0 while it is out.");
    for e in &fleet {
        let up = e.get("up").and_then(Value::as_bool).unwrap_or(false);
        out.sample("batchagent_endpoint_up", &[("endpoint", &name(e))], if up { 1.0 } else { 0.0 });
    }
    out.family("batchagent_endpoint_limit", "gauge", "Model calls the endpoint may have in flight (adaptive).");
    for e in &fleet {
        out.sample("batchagent_endpoint_limit", &[("endpoint", &name(e))], field(e, "limit"));
    }
}

#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{key}=\"{}\"", escape(value));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", number(value));
    }

    fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for (bound, count) in LATENCY_BOUNDS.iter().zip(histogram.cumulative(&LATENCY_BOUNDS)) {
            self.sample(&bucket, &[("le", &number(*bound))], count as f64);
        }
        let count = histogram.count() as f64;
        self.sample(&bucket, &[("le", "+Inf")], count);
        self.sample(&format!("{name}_sum"), &[], histogram.sum());
        self.sample(&format!("{name}_count"), &[], count);
    }
}

/// A label value as the format escapes it: backslash, double quote and line feed.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        // Integers without a fraction (counters), the rest as Rust prints them (shortest exact).
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histograms_are_cumulative_buckets_with_sum_and_count() {
        let h = Histogram::default();
        h.record(Duration::from_millis(3));
        h.record(Duration::from_millis(700));
        let mut out = Exposition::default();
        out.histogram("x_seconds", "X.", &h);
        let text = out.text;
        assert!(text.starts_with("# HELP x_seconds X.\n# TYPE x_seconds histogram\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"0.005\"} 1\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"0.5\"} 1\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"1\"} 2\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"+Inf\"} 2\n"), "{text}");
        assert!(text.contains("x_seconds_sum 0.703\n") && text.ends_with("x_seconds_count 2\n"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = Exposition::default();
        out.sample("m", &[("tool", "a\"b\\c\nd")], 1.0);
        assert_eq!(out.text, "m{tool=\"a\\\"b\\\\c\\nd\"} 1\n");
    }
}
