//! `GET /metrics`: Prometheus text exposition with vLLM's metric names and `model_name` label, so
//! tools that scrape a vLLM server (queue depth, prefix-cache hit rate, TTFT) work unchanged.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use super::super::engine::{EngineMetrics, TTFT_BUCKETS};
use super::{bytes_response, AppState};

pub(crate) async fn handler(State(state): State<Arc<AppState>>) -> Response {
    let text = render(&state.config.model, &state.engine.metrics(), &state.stats.finish_reasons());
    bytes_response(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", Bytes::from(text))
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn float(x: f64) -> String {
    if x.is_infinite() {
        "+Inf".to_owned()
    } else {
        format!("{x}")
    }
}

pub(crate) fn render(
    model: &str,
    m: &EngineMetrics,
    reasons: &std::collections::BTreeMap<&'static str, u64>,
) -> String {
    let label = format!("model_name=\"{}\"", model.replace('\\', "\\\\").replace('"', "\\\""));
    let mut out = String::with_capacity(4096);
    let gauges: [(&str, &str, f64); 4] = [
        ("vllm:num_requests_running", "Number of requests in model execution batches.", m.running as f64),
        ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", m.waiting as f64),
        ("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.", m.kv_usage),
        ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", m.kv_usage),
    ];
    for (name, help, value) in gauges {
        family(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name}{{{label}}} {}", float(value));
    }
    let counters: [(&str, &str, u64); 4] = [
        (
            "vllm:prefix_cache_queries_total",
            "Prefix cache queries, in terms of number of queried tokens.",
            m.prefix_queries,
        ),
        ("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.", m.prefix_hits),
        ("vllm:prompt_tokens_total", "Number of prefill tokens processed.", m.prompt_tokens),
        ("vllm:generation_tokens_total", "Number of generation tokens processed.", m.generation_tokens),
    ];
    for (name, help, value) in counters {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name}{{{label}}} {value}");
    }
    let name = "vllm:request_success_total";
    family(&mut out, name, "counter", "Count of successfully processed requests.");
    for reason in ["stop", "length", "abort"] {
        let n = reasons.get(reason).copied().unwrap_or(0);
        let _ = writeln!(out, "{name}{{finished_reason=\"{reason}\",{label}}} {n}");
    }
    let name = "vllm:time_to_first_token_seconds";
    family(&mut out, name, "histogram", "Histogram of time to first token in seconds.");
    let bounds = TTFT_BUCKETS.iter().copied().chain(std::iter::once(f64::INFINITY));
    for (le, count) in bounds.zip(m.ttft.cumulative()) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{}\",{label}}} {count}", float(le));
    }
    let _ = writeln!(out, "{name}_sum{{{label}}} {}", float(m.ttft.sum));
    let _ = writeln!(out, "{name}_count{{{label}}} {}", m.ttft.count);
    out
}
