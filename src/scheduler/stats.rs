//! Run-wide counters and latency histograms: lock-free on the hot path, flat in memory however many
//! jobs a run has.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use crate::conversation::Usage;

/// Log-bucketed histogram: buckets grow by 2%, so any percentile is within 1% of the truth, from
/// 1 microsecond to about 2 days, in a fixed 1,200 counters.
#[derive(Debug)]
pub struct Histogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

const GROWTH: f64 = 1.02;
const BUCKETS: usize = 1200;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn record(&self, value: Duration) {
        let us = value.as_secs_f64() * 1e6;
        let bucket = if us <= 1.0 { 0 } else { ((us.ln() / GROWTH.ln()) as usize + 1).min(BUCKETS - 1) };
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us as u64, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// The value (in seconds) below which a fraction `q` of the samples fall; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            seen += bucket.load(Relaxed);
            if seen >= rank {
                // Midpoint of the bucket [GROWTH^(i-1), GROWTH^i).
                let upper = GROWTH.powi(i as i32);
                let lower = if i == 0 { 0.0 } else { GROWTH.powi(i as i32 - 1) };
                return Some(f64::midpoint(lower, upper) / 1e6);
            }
        }
        None
    }

    /// The sum of the samples, in seconds.
    pub fn sum(&self) -> f64 {
        self.sum_us.load(Relaxed) as f64 / 1e6
    }

    /// For each bound (seconds, ascending), the samples at or below it, as Prometheus' cumulative
    /// buckets count them; a sample within 2% under a bound may fall on either side of it.
    pub fn cumulative(&self, bounds: &[f64]) -> Vec<u64> {
        let mut counts = Vec::with_capacity(bounds.len());
        let mut seen = 0u64;
        let mut next = 0usize;
        for &bound in bounds {
            let us = bound * 1e6;
            // Buckets below this one hold only samples under GROWTH^(last - 1) <= `us`.
            let last = if us <= 1.0 { 0 } else { ((us.ln() / GROWTH.ln()) as usize + 1).min(BUCKETS) };
            while next < last {
                seen += self.buckets[next].load(Relaxed);
                next += 1;
            }
            counts.push(seen);
        }
        counts
    }

    pub fn mean(&self) -> Option<f64> {
        let count = self.count();
        (count > 0).then(|| self.sum_us.load(Relaxed) as f64 / count as f64 / 1e6)
    }

    fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count(),
            mean: self.mean(),
            p50: self.quantile(0.5),
            p90: self.quantile(0.9),
            p95: self.quantile(0.95),
            p99: self.quantile(0.99),
            max: self.quantile(1.0),
        }
    }
}

/// The gap from the end of a model call that asked for tools to the agent's next call going out,
/// kept run-wide and per slot priority of that next call (its turns left, as `max_inflight` slots
/// are handed out: fewest first). The wait for a slot, most of the gap with many agents, follows
/// that priority, so one run-wide figure would predict the same return for an agent a slot is
/// about to go to as for one that will wait behind it.
#[derive(Debug, Default)]
pub struct NextCallGap {
    all: Histogram,
    /// Indexed by `min(turns left, GAP_PRIORITIES - 1)` of the next call.
    by_priority: [Histogram; GAP_PRIORITIES],
}

/// Slot priorities the gap is kept for apart; higher ones share the last histogram (1,200
/// counters each, so 16 of them is about 150 KiB a run).
pub const GAP_PRIORITIES: usize = 16;
/// Samples a priority needs before its own 75th percentile is used rather than the run's.
pub const GAP_MIN_SAMPLES: u64 = 8;

impl NextCallGap {
    fn bucket(&self, priority: u32) -> &Histogram {
        &self.by_priority[(priority as usize).min(GAP_PRIORITIES - 1)]
    }

    /// One gap, ending in a call that took its slot with `priority` (its turns left).
    pub fn record(&self, priority: u32, gap: Duration) {
        self.all.record(gap);
        self.bucket(priority).record(gap);
    }

    /// The predicted gap after a call made with `priority` turns left, should it ask for tools:
    /// the 75th percentile of the gaps whose next call had one turn fewer left (the priority the
    /// agent's next call will wait with), or of all gaps while that priority has fewer than
    /// `GAP_MIN_SAMPLES`; `None` before any gap was seen.
    pub fn predict(&self, priority: u32) -> Option<f64> {
        let own = self.bucket(priority.saturating_sub(1));
        if own.count() >= GAP_MIN_SAMPLES {
            own.quantile(0.75)
        } else {
            self.all.quantile(0.75)
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

#[derive(Debug, Default)]
pub struct RunStats {
    pub jobs_started: AtomicU64,
    /// Jobs started and not finished.
    pub jobs_running: AtomicU64,
    pub jobs_ok: AtomicU64,
    pub jobs_failed: AtomicU64,
    pub jobs_skipped: AtomicU64,
    /// Inputs skipped because an earlier input had the same id (`dedupe`).
    pub duplicates_skipped: AtomicU64,
    pub model_calls: AtomicU64,
    /// Model calls sent and not yet answered: each holds an inference slot, so never more than
    /// `max_inflight`.
    pub model_calls_in_flight: AtomicU64,
    /// Agents waiting on their tool calls (they hold no inference slot).
    pub agents_in_tools: AtomicU64,
    /// Model calls the server stopped at `max_tokens` (`finish_reason` `length`).
    pub length_finishes: AtomicU64,
    /// Structured answers cut off at `max_tokens`, repaired and accepted (`accept_truncated`).
    pub truncated_accepted: AtomicU64,
    pub retries: AtomicU64,
    pub throttled: AtomicU64,
    pub validation_retries: AtomicU64,
    /// Jobs that fell back from constrained decoding to the schema in the prompt.
    pub schema_fallbacks: AtomicU64,
    pub repaired_outputs: AtomicU64,
    pub tool_calls: AtomicU64,
    pub tools_started_early: AtomicU64,
    /// Conversations compacted before a model call.
    pub compactions: AtomicU64,
    /// Summaries that replaced the oldest turns of a conversation.
    pub compaction_summaries: AtomicU64,
    /// Model calls made to the summariser (retries included).
    pub compaction_calls: AtomicU64,
    /// Summaries that could not be had (the conversation went on without one).
    pub compaction_failures: AtomicU64,
    /// Model calls sent still over the budget after compaction.
    pub compaction_short: AtomicU64,
    /// Prompt tokens compaction took off, before against after.
    pub compaction_tokens_dropped: AtomicU64,
    /// Conversations counted by the server's tokenizer (`/tokenize`).
    pub tokens_counted: AtomicU64,
    /// Conversations whose size was estimated (no tokenizer to ask).
    pub tokens_estimated: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub ttft: Histogram,
    pub model_latency: Histogram,
    pub job_latency: Histogram,
    /// How long an agent waited for its tool calls of one turn (all of them, run concurrently).
    pub tool_wait: Histogram,
    /// From the end of a model call that asked for tools to the agent's next call going out (its
    /// tools, then the wait for a free slot), run-wide and per slot priority of the next call.
    pub next_call_gap: NextCallGap,
    errors: Mutex<Vec<(String, u64)>>,
}

impl RunStats {
    pub fn add_usage(&self, usage: &Usage) {
        self.prompt_tokens.fetch_add(usage.prompt_tokens, Relaxed);
        self.cached_tokens.fetch_add(usage.cached_tokens, Relaxed);
        self.completion_tokens.fetch_add(usage.completion_tokens, Relaxed);
    }

    #[cold]
    pub fn count_error(&self, kind: &str) {
        let Ok(mut errors) = self.errors.lock() else { return };
        if let Some(entry) = errors.iter_mut().find(|(k, _)| k == kind) {
            entry.1 += 1;
        } else {
            errors.push((kind.to_owned(), 1));
        }
    }

    pub fn errors_by_kind(&self) -> Vec<(String, u64)> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            jobs_started: self.jobs_started.load(Relaxed),
            jobs_ok: self.jobs_ok.load(Relaxed),
            jobs_failed: self.jobs_failed.load(Relaxed),
            jobs_skipped: self.jobs_skipped.load(Relaxed),
            duplicates_skipped: self.duplicates_skipped.load(Relaxed),
            model_calls: self.model_calls.load(Relaxed),
            model_calls_in_flight: self.model_calls_in_flight.load(Relaxed),
            agents_in_tools: self.agents_in_tools.load(Relaxed),
            length_finishes: self.length_finishes.load(Relaxed),
            truncated_accepted: self.truncated_accepted.load(Relaxed),
            retries: self.retries.load(Relaxed),
            throttled: self.throttled.load(Relaxed),
            validation_retries: self.validation_retries.load(Relaxed),
            schema_fallbacks: self.schema_fallbacks.load(Relaxed),
            repaired_outputs: self.repaired_outputs.load(Relaxed),
            tool_calls: self.tool_calls.load(Relaxed),
            tools_started_early: self.tools_started_early.load(Relaxed),
            compactions: self.compactions.load(Relaxed),
            compaction_summaries: self.compaction_summaries.load(Relaxed),
            compaction_calls: self.compaction_calls.load(Relaxed),
            compaction_failures: self.compaction_failures.load(Relaxed),
            compaction_short: self.compaction_short.load(Relaxed),
            compaction_tokens_dropped: self.compaction_tokens_dropped.load(Relaxed),
            tokens_counted: self.tokens_counted.load(Relaxed),
            tokens_estimated: self.tokens_estimated.load(Relaxed),
            prompt_tokens: self.prompt_tokens.load(Relaxed),
            cached_tokens: self.cached_tokens.load(Relaxed),
            completion_tokens: self.completion_tokens.load(Relaxed),
            ttft: self.ttft.summary(),
            model_latency: self.model_latency.summary(),
            job_latency: self.job_latency.summary(),
            errors_by_kind: self.errors_by_kind(),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatsSnapshot {
    pub jobs_started: u64,
    pub jobs_ok: u64,
    pub jobs_failed: u64,
    pub jobs_skipped: u64,
    pub duplicates_skipped: u64,
    pub model_calls: u64,
    pub model_calls_in_flight: u64,
    pub agents_in_tools: u64,
    pub length_finishes: u64,
    pub truncated_accepted: u64,
    pub retries: u64,
    pub throttled: u64,
    pub validation_retries: u64,
    pub schema_fallbacks: u64,
    pub repaired_outputs: u64,
    pub tool_calls: u64,
    pub tools_started_early: u64,
    pub compactions: u64,
    pub compaction_summaries: u64,
    pub compaction_calls: u64,
    pub compaction_failures: u64,
    pub compaction_short: u64,
    pub compaction_tokens_dropped: u64,
    pub tokens_counted: u64,
    pub tokens_estimated: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub ttft: LatencySummary,
    pub model_latency: LatencySummary,
    pub job_latency: LatencySummary,
    pub errors_by_kind: Vec<(String, u64)>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn quantiles_are_within_two_percent() {
        let h = Histogram::default();
        for ms in 1..=1000u64 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5).unwrap();
        let p99 = h.quantile(0.99).unwrap();
        assert!((p50 - 0.5).abs() / 0.5 < 0.02, "p50 {p50}");
        assert!((p99 - 0.99).abs() / 0.99 < 0.02, "p99 {p99}");
        assert!((h.mean().unwrap() - 0.5005).abs() < 0.001);
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn cumulative_buckets_count_the_samples_at_or_below_each_bound() {
        let h = Histogram::default();
        for ms in [1u64, 5, 20, 20, 300, 4000] {
            h.record(Duration::from_millis(ms));
        }
        assert_eq!(h.cumulative(&[0.0005, 0.01, 0.1, 1.0, 10.0]), vec![0, 2, 4, 5, 6]);
        assert!((h.sum() - 4.346).abs() < 1e-6);
    }

    #[test]
    fn next_call_gap_predicts_from_the_next_calls_priority_once_it_has_samples() {
        let gaps = NextCallGap::default();
        assert_eq!(gaps.predict(4), None);
        // Calls that waited with 3 turns left came back after 1 s, those with 6 left after 9 s.
        for _ in 0..GAP_MIN_SAMPLES {
            gaps.record(3, Duration::from_secs(1));
            gaps.record(6, Duration::from_secs(9));
        }
        let near = |got: Option<f64>, want: f64| (got.unwrap() - want).abs() / want < 0.02;
        // A call with 4 turns left makes its next call with 3 left.
        assert!(near(gaps.predict(4), 1.0), "{:?}", gaps.predict(4));
        assert!(near(gaps.predict(7), 9.0), "{:?}", gaps.predict(7));
        // Priority 5 has no samples of its own: the run-wide 75th percentile (of 1 s and 9 s alike).
        assert!(near(gaps.predict(6), 9.0));
        // Under GAP_MIN_SAMPLES, a priority's own samples are not used yet.
        for _ in 1..GAP_MIN_SAMPLES {
            gaps.record(5, Duration::from_millis(500));
        }
        // The run-wide 75th percentile of 7 x 0.5 s, 8 x 1 s and 8 x 9 s.
        assert!(near(gaps.predict(6), 9.0), "{:?}", gaps.predict(6));
        gaps.record(5, Duration::from_millis(500));
        assert!(near(gaps.predict(6), 0.5), "{:?}", gaps.predict(6));
        // Priorities at or past the last histogram share it; the first call after priority 0 or 1
        // reads priority 0's.
        for _ in 0..GAP_MIN_SAMPLES {
            gaps.record(40, Duration::from_secs(2));
            gaps.record(0, Duration::from_secs(4));
        }
        assert!(near(gaps.predict(GAP_PRIORITIES as u32), 2.0));
        assert!(near(gaps.predict(100), 2.0));
        assert!(near(gaps.predict(0), 4.0));
        assert!(near(gaps.predict(1), 4.0));
    }
}
