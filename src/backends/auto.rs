//! `mode="auto"`: each model call goes through the provider's batch API (half the price, minutes to
//! hours of latency) when the run's deadline leaves time for the agent's remaining turns to go that
//! way, and online (at once, full price) when it does not.
//!
//! The decision, for a call at turn `t` of its agent (turns counted from 0):
//!
//! ```text
//! batch  iff  now + remaining(t) * turnaround <= deadline
//! remaining(t) = max(1, expected_turns - t)
//! ```
//!
//! - `expected_turns` is the 90th percentile of the turns taken by the agents that have finished in
//!   this run (once [`MIN_FINISHED`] have), `max_turns` until then. An agent is taken to have
//!   finished when a call of its comes back without tool calls.
//! - `turnaround` is the longest a batch call has taken in this run (from the call to its answer),
//!   doubled; until one has come back, the prior the run was given (by default the providers'
//!   24-hour completion window, so that nothing is risked before a batch has been seen).
//!
//! Later turns carry the longest prompts, so when the deadline allows only some of an agent's turns
//! through the batch API, the rule sends its first turns online and the rest as batch rows, which is
//! also where the discount is worth most. Online calls are limited to `online_inflight` at once: the
//! run's own limit is set high, since a batch call holds its slot for the batch's whole turnaround.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

use super::provider_batch::ProviderBatchBackend;
use super::{Backend, BackendError, Capabilities, ChatRequest, ChatResponse, StreamEvent};
use crate::conversation::Usage;

/// Agents that must have finished before their turn counts replace `max_turns` as the estimate.
pub const MIN_FINISHED: u64 = 10;

/// The providers' completion window: the longest a batch may take by their documentation.
pub const DEFAULT_TURNAROUND: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
pub struct AutoOptions {
    /// When every agent must be done.
    pub deadline: Instant,
    /// The same, in Unix seconds (for the report).
    pub deadline_at: f64,
    /// A batch call's turnaround assumed until one has come back.
    pub prior_turnaround: Duration,
    /// The run's `max_turns`: the estimate of an agent's turns until agents have finished.
    pub max_turns: u32,
    /// Most online calls at once.
    pub online_inflight: usize,
}

/// Where one call went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Batch,
    Online,
}

/// What the run has seen so far, from which the next decision is made.
#[derive(Debug, Default)]
struct Learned {
    longest_batch: Option<Duration>,
    /// `finished[n]`: agents that finished after `n + 1` turns (the last slot holds every longer one).
    finished: Vec<u64>,
    finished_total: u64,
}

impl Learned {
    fn new(max_turns: u32) -> Self {
        Self { finished: vec![0; max_turns.max(1) as usize], ..Self::default() }
    }

    fn record_finished(&mut self, turns: u32) {
        let last = self.finished.len().saturating_sub(1);
        let slot = (turns.max(1) as usize - 1).min(last);
        if let Some(count) = self.finished.get_mut(slot) {
            *count += 1;
            self.finished_total += 1;
        }
    }

    /// The 90th percentile of the finished agents' turns, or `max_turns` before [`MIN_FINISHED`].
    fn expected_turns(&self, max_turns: u32) -> u32 {
        if self.finished_total < MIN_FINISHED {
            return max_turns;
        }
        let wanted = self.finished_total.saturating_mul(9).div_ceil(10);
        let mut seen = 0;
        for (slot, count) in self.finished.iter().enumerate() {
            seen += count;
            if seen >= wanted {
                return u32::try_from(slot + 1).unwrap_or(max_turns);
            }
        }
        max_turns
    }

    fn turnaround(&self, prior: Duration) -> Duration {
        self.longest_batch.map_or(prior, |longest| longest.saturating_mul(2))
    }
}

/// The route for a call at turn `turn` (from 0), `left` before the deadline.
pub fn choose(left: Duration, turn: u32, expected_turns: u32, turnaround: Duration) -> Route {
    let remaining = expected_turns.saturating_sub(turn).max(1);
    if turnaround.saturating_mul(remaining) <= left {
        Route::Batch
    } else {
        Route::Online
    }
}

#[derive(Debug, Default)]
struct RouteCounters {
    calls: AtomicU64,
    failed: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

impl RouteCounters {
    fn record(&self, result: &Result<ChatResponse, BackendError>) {
        self.calls.fetch_add(1, Relaxed);
        match result {
            Ok(response) => {
                let Usage { prompt_tokens, cached_tokens, completion_tokens, .. } = response.usage;
                self.prompt_tokens.fetch_add(prompt_tokens, Relaxed);
                self.cached_tokens.fetch_add(cached_tokens, Relaxed);
                self.completion_tokens.fetch_add(completion_tokens, Relaxed);
            }
            Err(_) => {
                self.failed.fetch_add(1, Relaxed);
            }
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "calls": self.calls.load(Relaxed),
            "failed": self.failed.load(Relaxed),
            "prompt_tokens": self.prompt_tokens.load(Relaxed),
            "cached_tokens": self.cached_tokens.load(Relaxed),
            "completion_tokens": self.completion_tokens.load(Relaxed),
        })
    }
}

pub struct AutoBackend {
    name: String,
    batch: ProviderBatchBackend,
    online: Arc<dyn Backend>,
    online_slots: Semaphore,
    options: AutoOptions,
    learned: Mutex<Learned>,
    batched: RouteCounters,
    direct: RouteCounters,
}

impl AutoBackend {
    /// `batch` sends rows through the provider's batch API; `online` is the same provider online.
    pub fn new(batch: ProviderBatchBackend, online: Arc<dyn Backend>, options: AutoOptions) -> Self {
        let name = format!("auto ({} / {})", batch.name(), online.name());
        Self {
            name,
            batch,
            online,
            online_slots: Semaphore::new(options.online_inflight.max(1)),
            learned: Mutex::new(Learned::new(options.max_turns)),
            options,
            batched: RouteCounters::default(),
            direct: RouteCounters::default(),
        }
    }

    fn learned(&self) -> std::sync::MutexGuard<'_, Learned> {
        self.learned.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The route for `request`, from its turn (in its request id) and what the run has seen.
    fn route(&self, request: &ChatRequest) -> Route {
        let turn = turn_of(&request.request_id).unwrap_or(0);
        let left = self.options.deadline.saturating_duration_since(Instant::now());
        let learned = self.learned();
        choose(
            left,
            turn,
            learned.expected_turns(self.options.max_turns),
            learned.turnaround(self.options.prior_turnaround),
        )
    }

    async fn call(&self, request: ChatRequest) -> Result<ChatResponse, BackendError> {
        let turn = turn_of(&request.request_id);
        let route = self.route(&request);
        let started = Instant::now();
        let result = match route {
            Route::Batch => self.batch.chat(request, None).await,
            Route::Online => {
                let _slot = self
                    .online_slots
                    .acquire()
                    .await
                    .map_err(|_| BackendError::Connection("the run is shutting down".into()))?;
                let mut request = request;
                request.stream = false;
                self.online.chat(request, None).await
            }
        };
        match route {
            Route::Batch => self.batched.record(&result),
            Route::Online => self.direct.record(&result),
        }
        if let Ok(response) = &result {
            let mut learned = self.learned();
            if route == Route::Batch {
                let took = started.elapsed();
                learned.longest_batch = Some(learned.longest_batch.map_or(took, |l| l.max(took)));
            }
            if let (true, Some(turn)) = (response.tool_calls.is_empty(), turn) {
                learned.record_finished(turn.saturating_add(1));
            }
        }
        result
    }
}

/// The turn of a call from its request id (`{job}-t{turn}-a{attempt}`, see
/// [`crate::scheduler::agent::request_id`]); `None` for any other id.
fn turn_of(request_id: &str) -> Option<u32> {
    let (call, _) = request_id.rsplit_once("-a")?;
    call.rsplit_once("-t")?.1.parse().ok()
}

impl Backend for AutoBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        // Whole answers either way: a batch row cannot stream.
        self.batch.capabilities()
    }

    fn batch_stats(&self) -> Option<Value> {
        let mut stats = match self.batch.batch_stats() {
            Some(Value::Object(stats)) => stats,
            _ => serde_json::Map::new(),
        };
        let learned = self.learned();
        let left = self.options.deadline.saturating_duration_since(Instant::now());
        let auto = json!({
            "batch": self.batched.to_json(),
            "online": self.direct.to_json(),
            "deadline_left_s": left.as_secs_f64(),
            "deadline_at": self.options.deadline_at,
            "turnaround_estimate_s": learned.turnaround(self.options.prior_turnaround).as_secs_f64(),
            "longest_batch_call_s": learned.longest_batch.map(|d| d.as_secs_f64()),
            "expected_turns": learned.expected_turns(self.options.max_turns),
            "agents_finished": learned.finished_total,
        });
        stats.insert("auto".into(), auto);
        Some(Value::Object(stats))
    }

    fn chat(
        &self,
        request: ChatRequest,
        _events: Option<mpsc::UnboundedSender<StreamEvent>>,
    ) -> BoxFuture<'_, Result<ChatResponse, BackendError>> {
        Box::pin(self.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::agent::request_id;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn a_call_goes_through_the_batch_api_only_when_its_remaining_turns_fit_before_the_deadline() {
        // Three turns expected, ten minutes per batch turnaround.
        let turnaround = 10 * MIN;
        assert_eq!(choose(30 * MIN, 0, 3, turnaround), Route::Batch);
        assert_eq!(choose(29 * MIN, 0, 3, turnaround), Route::Online);
        // Later turns need fewer turnarounds: the first turn online, the rest batched.
        assert_eq!(choose(25 * MIN, 0, 3, turnaround), Route::Online);
        assert_eq!(choose(25 * MIN, 1, 3, turnaround), Route::Batch);
        // A turn past the expectation still counts as one turn left.
        assert_eq!(choose(10 * MIN, 7, 3, turnaround), Route::Batch);
        assert_eq!(choose(9 * MIN, 7, 3, turnaround), Route::Online);
        // The deadline passed: online.
        assert_eq!(choose(Duration::ZERO, 0, 1, turnaround), Route::Online);
    }

    #[test]
    fn expected_turns_are_max_turns_until_enough_agents_finished_then_their_90th_percentile() {
        let mut learned = Learned::new(8);
        for _ in 0..MIN_FINISHED - 1 {
            learned.record_finished(2);
        }
        assert_eq!(learned.expected_turns(8), 8);
        learned.record_finished(2);
        assert_eq!(learned.expected_turns(8), 2);
        // 10 of 20 took 2 turns, 8 took 3, 2 took 6: the 90th percentile is 3.
        for _ in 0..8 {
            learned.record_finished(3);
        }
        learned.record_finished(6);
        learned.record_finished(6);
        assert_eq!(learned.expected_turns(8), 3);
        // Counts beyond max_turns land in the last slot.
        learned.record_finished(50);
        assert_eq!(learned.finished.len(), 8);
    }

    #[test]
    fn the_turnaround_is_the_prior_until_a_batch_call_came_back_then_twice_the_longest() {
        let mut learned = Learned::new(4);
        assert_eq!(learned.turnaround(DEFAULT_TURNAROUND), DEFAULT_TURNAROUND);
        learned.longest_batch = Some(Duration::from_secs(90));
        assert_eq!(learned.turnaround(DEFAULT_TURNAROUND), Duration::from_secs(180));
    }

    #[test]
    fn the_turn_is_read_from_the_scheduler_request_id() {
        assert_eq!(turn_of(&request_id("job-7-a", 3, 2)), Some(3));
        assert_eq!(turn_of(&request_id("x", 0, 1)), Some(0));
        assert_eq!(turn_of("warm-up"), None);
        assert_eq!(turn_of("job-t3-compact-a1"), None);
    }
}
