//! `GET /metrics`: Prometheus text exposition with vLLM's metric names and `model_name` label, so
//! tools that scrape a vLLM server (queue depth, prefix-cache hit rate, TTFT) work unchanged.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use super::super::engine::{EngineMetrics, TTFT_BUCKETS};
use super::super::profile::STEP_PARTS;
use super::{bytes_response, AppState};

pub(crate) async fn handler(State(state): State<Arc<AppState>>) -> Response {
    let profile = state.engine.profile();
    let cache = CacheConfig {
        block_size: profile.block_size,
        num_gpu_blocks: profile.kv_capacity_tokens / profile.block_size.max(1),
        prefix_caching: profile.enable_prefix_caching,
    };
    let text =
        render(&state.config.model, &state.engine.metrics(), cache, &state.stats.finish_reasons(), Renderer::Simulator);
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

/// The KV cache's shape as vLLM reports it in `vllm:cache_config_info` (an info gauge whose labels
/// carry the values): clients size their dispatch by it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CacheConfig {
    pub block_size: usize,
    pub num_gpu_blocks: usize,
    pub prefix_caching: bool,
}

/// Whose metrics are rendered: the step series (busy time, steps and what they computed) are the
/// simulator's own (`sim:`, with its busy time split by the terms of its step-time formula) or
/// the embedded engine's (`batchagent:`, real seconds, no formula).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Renderer {
    Simulator,
    Engine,
}

pub(crate) fn render(
    model: &str,
    m: &EngineMetrics,
    cache: CacheConfig,
    reasons: &std::collections::BTreeMap<&'static str, u64>,
    renderer: Renderer,
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
    let name = "vllm:cache_config_info";
    family(&mut out, name, "gauge", "Information of the LLMEngine CacheConfig.");
    let _ = writeln!(
        out,
        "{name}{{block_size=\"{}\",enable_prefix_caching=\"{}\",num_gpu_blocks=\"{}\",{label}}} 1.0",
        cache.block_size,
        if cache.prefix_caching { "True" } else { "False" },
        cache.num_gpu_blocks
    );
    let counters: [(&str, &str, u64); 5] = [
        (
            "vllm:prefix_cache_queries_total",
            "Prefix cache queries, in terms of number of queried tokens.",
            m.prefix_queries,
        ),
        ("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.", m.prefix_hits),
        ("vllm:prompt_tokens_total", "Number of prefill tokens processed.", m.prompt_tokens),
        ("vllm:generation_tokens_total", "Number of generation tokens processed.", m.generation_tokens),
        ("vllm:num_preemptions_total", "Cumulative number of preemption from the engine.", m.preemptions),
    ];
    for (name, help, value) in counters {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name}{{{label}}} {value}");
    }
    // Not vLLM's: tool-wait retention (pins made, taken over by their agent, dropped for room,
    // expired or released).
    let name = "batchagent:kv_pins_total";
    family(&mut out, name, "counter", "Tool-wait pins of finished requests' KV blocks, by what became of them.");
    for (event, value) in
        [("made", m.pins), ("returned", m.pins_returned), ("dropped", m.pins_dropped), ("expired", m.pins_expired)]
    {
        let _ = writeln!(out, "{name}{{event=\"{event}\",{label}}} {value}");
    }
    // Not vLLM's: the KV cache tokens held by sequences (each shared page once) against the tokens
    // in their page tables (a shared page once per sequence: without sharing), and the cached
    // blocks evicted.
    let name = "batchagent:kv_tokens";
    family(
        &mut out,
        name,
        "gauge",
        "KV cache tokens held by sequences (held) and listed in their page tables (tables).",
    );
    for (kind, value) in [("held", m.kv_used_tokens), ("tables", m.kv_table_tokens)] {
        let _ = writeln!(out, "{name}{{kind=\"{kind}\",{label}}} {value}");
    }
    let name = "batchagent:kv_evictions_total";
    family(&mut out, name, "counter", "Cached KV blocks evicted to make room.");
    let _ = writeln!(out, "{name}{{{label}}} {}", m.kv_evictions);
    // Not vLLM's: the engine's busy time and what its steps cost, so a benchmark can compute the
    // makespan no scheduler could beat at these step costs.
    let (prefix, busy_help) = match renderer {
        Renderer::Simulator => ("sim", "Simulated seconds the engine spent in steps."),
        Renderer::Engine => ("batchagent", "Seconds the engine spent in steps."),
    };
    let name = format!("{prefix}:engine_busy_seconds_total");
    family(&mut out, &name, "counter", busy_help);
    let _ = writeln!(out, "{name}{{{label}}} {}", float(m.busy.as_secs_f64()));
    if renderer == Renderer::Engine {
        let name = "batchagent:engine_scheduler_seconds_total";
        family(&mut out, name, "counter", "Of the busy seconds, those in the scheduler (choosing and applying steps).");
        let _ = writeln!(out, "{name}{{{label}}} {}", float(m.scheduling.as_secs_f64()));
    }
    if renderer == Renderer::Simulator {
        let name = "sim:engine_step_seconds_total";
        family(&mut out, name, "counter", "Busy seconds by term of the step-time formula.");
        for (part, seconds) in STEP_PARTS.iter().zip(m.busy_parts) {
            let _ = writeln!(out, "{name}{{part=\"{part}\",{label}}} {}", float(seconds));
        }
    }
    let step_counters: [(&str, &str, u64); 4] = [
        ("engine_steps_total", "Engine steps run.", m.steps),
        ("engine_step_prefill_tokens_total", "Prompt tokens computed in steps.", m.step_prefill_tokens),
        ("engine_step_decode_seqs_total", "Decode sequence-steps.", m.step_decode_seqs),
        ("engine_step_kv_tokens_read_total", "KV tokens read by decode steps.", m.step_kv_tokens_read),
    ];
    for (name, help, value) in step_counters {
        let name = format!("{prefix}:{name}");
        family(&mut out, &name, "counter", help);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_reads_the_kv_capacity_and_preemptions_it_exports() {
        let m = EngineMetrics { preemptions: 7, kv_usage: 0.5, ..EngineMetrics::default() };
        let cache = CacheConfig { block_size: 16, num_gpu_blocks: 6250, prefix_caching: true };
        let text = render("m", &m, cache, &std::collections::BTreeMap::new(), Renderer::Engine);
        let read = crate::backends::metrics::parse(&text);
        assert_eq!(read.kv_capacity_tokens, Some(100_000.0));
        assert_eq!(read.preemptions, Some(7.0));
        assert_eq!(read.kv_usage, Some(0.5));
    }

    #[test]
    fn busy_time_and_step_costs_are_exported() {
        let m = EngineMetrics {
            busy: std::time::Duration::from_millis(1500),
            busy_parts: [0.5, 0.75, 0.0, 0.25, 0.0],
            steps: 42,
            step_decode_seqs: 9,
            ..EngineMetrics::default()
        };
        let cache = CacheConfig { block_size: 16, num_gpu_blocks: 1, prefix_caching: true };
        let text = render("m", &m, cache, &std::collections::BTreeMap::new(), Renderer::Simulator);
        assert!(text.contains("sim:engine_busy_seconds_total{model_name=\"m\"} 1.5\n"), "{text}");
        assert!(text.contains("sim:engine_step_seconds_total{part=\"prefill\",model_name=\"m\"} 0.75\n"));
        assert!(text.contains("sim:engine_steps_total{model_name=\"m\"} 42\n"));
        assert!(text.contains("sim:engine_step_decode_seqs_total{model_name=\"m\"} 9\n"));
    }

    #[test]
    fn the_embedded_engine_exports_no_simulator_series() {
        let m = EngineMetrics {
            busy: std::time::Duration::from_millis(1500),
            scheduling: std::time::Duration::from_millis(250),
            steps: 42,
            step_prefill_tokens: 7,
            ..EngineMetrics::default()
        };
        let cache = CacheConfig { block_size: 16, num_gpu_blocks: 1, prefix_caching: true };
        let text = render("m", &m, cache, &std::collections::BTreeMap::new(), Renderer::Engine);
        assert!(!text.contains("sim:"), "{text}");
        assert!(text.contains("batchagent:engine_busy_seconds_total{model_name=\"m\"} 1.5\n"), "{text}");
        assert!(text.contains("batchagent:engine_steps_total{model_name=\"m\"} 42\n"));
        assert!(text.contains("batchagent:engine_scheduler_seconds_total{model_name=\"m\"} 0.25\n"));
        assert!(text.contains("batchagent:engine_step_prefill_tokens_total{model_name=\"m\"} 7\n"));
        // The names clients scrape stay vLLM's and the engine's own.
        for name in ["vllm:num_requests_waiting{", "vllm:prefix_cache_hits_total{", "batchagent:kv_pins_total{"] {
            assert!(text.contains(name), "{name}");
        }
    }
}
