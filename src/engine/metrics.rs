//! The engine's counters, named after the vLLM metrics they feed.

use std::time::Duration;

/// Upper bounds of vLLM's `vllm:time_to_first_token_seconds` histogram buckets (`+Inf` is implicit).
pub const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];

/// A Prometheus-style histogram over [`TTFT_BUCKETS`], in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    pub counts: [u64; 23],
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        let i = TTFT_BUCKETS.iter().position(|&le| seconds <= le).unwrap_or(TTFT_BUCKETS.len());
        self.counts[i] += 1;
        self.sum += seconds;
        self.count += 1;
    }

    /// Cumulative counts, as Prometheus `_bucket{le=...}` lines expose them.
    pub fn cumulative(&self) -> [u64; 23] {
        let mut out = self.counts;
        for i in 1..out.len() {
            out[i] += out[i - 1];
        }
        out
    }
}

/// A snapshot of the engine's state and counters, named after the vLLM metrics they feed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineMetrics {
    /// `vllm:num_requests_running`
    pub running: usize,
    /// `vllm:num_requests_waiting` (including requests not yet seen by the loop)
    pub waiting: usize,
    /// `vllm:kv_cache_usage_perc`, as a fraction: blocks held by running sequences over capacity.
    pub kv_usage: f64,
    /// `vllm:prefix_cache_queries` (tokens)
    pub prefix_queries: u64,
    /// `vllm:prefix_cache_hits` (tokens)
    pub prefix_hits: u64,
    /// `vllm:prompt_tokens`
    pub prompt_tokens: u64,
    /// `vllm:generation_tokens`
    pub generation_tokens: u64,
    /// `vllm:request_success`
    pub requests_finished: u64,
    /// Requests whose receiver was dropped before they finished.
    pub requests_aborted: u64,
    pub requests_rejected: u64,
    /// `vllm:num_preemptions`
    pub preemptions: u64,
    /// Finished requests whose blocks were pinned for their agent's return (tool-wait hints).
    pub pins: u64,
    /// Pins taken over by their agent's next request.
    pub pins_returned: u64,
    /// Pins released early because a request needed the room.
    pub pins_dropped: u64,
    /// Pins that ended at their deadline, or were released because the reply called no tool (the
    /// embedded engine's server learns that only after generation).
    pub pins_expired: u64,
    pub steps: u64,
    /// Simulated time spent in steps (the engine's busy time; `sim_time` less the idle gaps).
    pub busy: Duration,
    /// Of `busy`, the embedded engine's host time in its scheduler: choosing each step and laying it
    /// out, then applying its tokens (the rest is the model runner's).
    pub scheduling: Duration,
    /// Busy time split by the terms of the step-time formula (`profile::STEP_PARTS`), in seconds.
    pub busy_parts: [f64; 5],
    /// What the steps did, summed over steps: prompt tokens computed, decode sequence-steps, KV
    /// tokens read by decode.
    pub step_prefill_tokens: u64,
    pub step_decode_seqs: u64,
    pub step_kv_tokens_read: u64,
    /// Time since the engine started (simulated time in the simulator).
    pub sim_time: Duration,
    /// KV cache tokens (rows) held by sequences: physical, each shared page once.
    pub kv_used_tokens: usize,
    /// KV cache tokens in the sequences' page tables, a shared page counted once per sequence:
    /// what they would hold without sharing blocks by hash or as diffs.
    pub kv_table_tokens: usize,
    /// Sequences holding KV blocks (running, and finished ones pinned for their agent).
    pub kv_sequences: usize,
    /// Cached blocks evicted to make room.
    pub kv_evictions: u64,
    /// `vllm:time_to_first_token_seconds`
    pub ttft: Histogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_follow_vllm() {
        let mut h = Histogram::default();
        for s in [0.0005, 0.001, 0.3, 3000.0] {
            h.observe(s);
        }
        assert_eq!(h.counts[0], 2);
        assert_eq!(h.counts[9], 1);
        assert_eq!(h.counts[22], 1);
        assert_eq!(h.cumulative()[9], 3);
        assert_eq!(h.count, 4);
    }
}
