//! A continuous-batching engine, scheduled like vLLM v1, on a virtual clock.
//!
//! Each step: running sequences are served first, in admission order, one token each when decoding
//! or a chunk of their prompt when prefilling, within the step's token budget
//! (`max_num_batched_tokens`); the rest of the budget admits waiting requests first come, first
//! served, up to `max_num_seqs` running. KV blocks are allocated per scheduled chunk; when a running
//! sequence cannot get a block, the most recently admitted sequence is preempted and recomputed later
//! (vLLM's recompute preemption), and no new request is admitted in that step. The step that
//! completes a sequence's prefill produces its first output token.
//!
//! Time is simulated: a step lasts what the profile's step model says. The loop sleeps only when
//! simulated time, scaled by `time_scale`, runs more than a millisecond ahead of real time, so
//! `time_scale = 0.01` runs 100x faster than the GPU would and `time_scale = 0` never sleeps. Every
//! duration the engine reports is simulated, so it does not depend on the time scale.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::prefix_cache::{block_hashes, chain_hashes, PrefixCache};
use super::profile::{Profile, ProfileError, StepLoad};

/// Real time the loop may lag behind simulated time before it sleeps (tokio's timer granularity).
const SLEEP_SLACK: Duration = Duration::from_millis(1);

/// Upper bounds of vLLM's `vllm:time_to_first_token_seconds` histogram buckets (`+Inf` is implicit).
pub const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineRequest {
    /// Prompt token ids (see `sim::tokenizer`).
    pub prompt: Vec<u32>,
    /// Output tokens to produce; the output's text is decided by the caller, the engine decides when
    /// each token comes out.
    pub max_new_tokens: usize,
    /// The ids of the output the caller will stream, when it knows them (empty if not). The full KV
    /// blocks they complete are cached when the request ends, as vLLM caches decode blocks, so a
    /// next turn whose prompt repeats this answer hits them.
    pub output_tokens: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    /// The request was admitted to the running batch; its prefix-cache hit is known.
    Started { cached_tokens: usize },
    /// Output token `index` (0-based) was produced.
    Token { index: usize },
    /// The last event of a served request. Durations are simulated time from arrival.
    Finished {
        prompt_tokens: usize,
        cached_tokens: usize,
        completion_tokens: usize,
        queue_time: Duration,
        ttft: Duration,
        total: Duration,
    },
    /// The request can never run: an empty prompt, or more tokens than the whole KV cache holds
    /// (a real server answers this with HTTP 400). It is the only event of the request.
    Rejected { prompt_tokens: usize, max_new_tokens: usize, kv_capacity_tokens: usize },
}

/// A Prometheus-style histogram over [`TTFT_BUCKETS`], in seconds of simulated time.
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
    pub steps: u64,
    /// Simulated time spent in steps (the engine's busy time; `sim_time` less the idle gaps).
    pub busy: Duration,
    /// Busy time split by the terms of the step-time formula (`profile::STEP_PARTS`), in seconds.
    pub busy_parts: [f64; 5],
    /// What the steps did, summed over steps: prompt tokens computed, decode sequence-steps, KV
    /// tokens read by decode.
    pub step_prefill_tokens: u64,
    pub step_decode_seqs: u64,
    pub step_kv_tokens_read: u64,
    /// Simulated time since the engine started.
    pub sim_time: Duration,
    /// `vllm:time_to_first_token_seconds`
    pub ttft: Histogram,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the engine must be started inside a tokio runtime")]
    NoRuntime,
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("time_scale is {0}; it must be a finite number >= 0")]
    TimeScale(f64),
}

struct Pending {
    request: EngineRequest,
    tx: UnboundedSender<EngineEvent>,
    at: Instant,
}

struct Shared {
    incoming: Mutex<Vec<Pending>>,
    wake: Notify,
    stopped: AtomicBool,
    /// Counted here because rejections never reach the loop.
    rejected: AtomicU64,
    metrics: Mutex<EngineMetrics>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data behind these locks stays consistent at every await-free point, so a panic elsewhere
    // leaves nothing half-written.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running simulated engine. Dropping the last `Arc` stops its loop.
pub struct Engine {
    shared: Arc<Shared>,
    profile: Profile,
    time_scale: f64,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("profile", &self.profile.name)
            .field("time_scale", &self.time_scale)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts the engine loop on the current tokio runtime.
    pub fn start(profile: Profile, time_scale: f64) -> Result<Arc<Engine>, EngineError> {
        profile.validate()?;
        if !time_scale.is_finite() || time_scale < 0.0 {
            return Err(EngineError::TimeScale(time_scale));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| EngineError::NoRuntime)?;
        let shared = Arc::new(Shared {
            incoming: Mutex::new(Vec::new()),
            wake: Notify::new(),
            stopped: AtomicBool::new(false),
            rejected: AtomicU64::new(0),
            metrics: Mutex::new(EngineMetrics::default()),
        });
        let scheduler = Scheduler::new(profile.clone());
        let task = runtime.spawn(run(Arc::clone(&shared), scheduler, time_scale));
        Ok(Arc::new(Engine { shared, profile, time_scale, task: Mutex::new(Some(task)) }))
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    pub fn time_scale(&self) -> f64 {
        self.time_scale
    }

    /// Queues a request. Its events arrive on the returned receiver; dropping the receiver aborts the
    /// request and frees its KV blocks. After `shutdown` the receiver is closed at once.
    pub fn submit(&self, request: EngineRequest) -> UnboundedReceiver<EngineEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let capacity_tokens = self.profile.kv_capacity_blocks() * self.profile.block_size;
        let tokens = request.prompt.len() + request.max_new_tokens;
        if request.prompt.is_empty() || tokens > capacity_tokens {
            // The receiver is still open, so this send cannot fail; a closed one would not care.
            let _ = tx.send(EngineEvent::Rejected {
                prompt_tokens: request.prompt.len(),
                max_new_tokens: request.max_new_tokens,
                kv_capacity_tokens: capacity_tokens,
            });
            self.shared.rejected.fetch_add(1, Ordering::Relaxed);
            return rx;
        }
        if self.shared.stopped.load(Ordering::Acquire) {
            return rx;
        }
        lock(&self.shared.incoming).push(Pending { request, tx, at: Instant::now() });
        self.shared.wake.notify_one();
        rx
    }

    /// A snapshot of the counters as of the last completed step.
    pub fn metrics(&self) -> EngineMetrics {
        let queued = lock(&self.shared.incoming).len();
        let mut m = *lock(&self.shared.metrics);
        m.waiting += queued;
        m.requests_rejected = self.shared.rejected.load(Ordering::Relaxed);
        m
    }

    /// Stops the loop; requests in flight see their receivers close.
    pub fn shutdown(&self) {
        self.shared.stopped.store(true, Ordering::Release);
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
        lock(&self.shared.incoming).clear();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Seq {
    id: u64,
    tx: UnboundedSender<EngineEvent>,
    prompt: Vec<u32>,
    output: Vec<u32>,
    /// Chained hashes of the prompt's full blocks, made at first admission.
    hashes: Vec<u64>,
    max_new: usize,
    generated: usize,
    /// Tokens whose KV is computed (vLLM's `num_computed_tokens`).
    computed: usize,
    /// Tokens scheduled in the current step.
    step_tokens: usize,
    arrival: Duration,
    admitted: Option<Duration>,
    first_token: Option<Duration>,
    cached_tokens: usize,
    done: bool,
}

impl Seq {
    /// Tokens whose KV the sequence needs: the prompt and every output token but the newest.
    fn total(&self) -> usize {
        self.prompt.len() + self.generated
    }

    /// Chained hashes of the computed full blocks after the prompt's full blocks whose tokens are
    /// known (the prompt's tail and the produced part of `output`).
    fn known_later_hashes(&self, block_size: usize) -> Vec<u64> {
        let from = self.hashes.len() * block_size;
        let known = (self.prompt.len() + self.output.len().min(self.generated)).min(self.computed);
        let upto = known / block_size * block_size;
        if self.output.is_empty() || upto <= from || from > self.prompt.len() {
            return Vec::new();
        }
        let mut tokens = Vec::with_capacity(upto - from);
        tokens.extend_from_slice(&self.prompt[from..]);
        tokens.extend_from_slice(&self.output[..upto - self.prompt.len().min(upto)]);
        tokens.truncate(upto - from);
        chain_hashes(self.hashes.last().copied(), &tokens, block_size)
    }
}

struct Scheduler {
    profile: Profile,
    cache: PrefixCache,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    next_id: u64,
    /// The virtual clock: simulated time since start.
    now: Duration,
    m: EngineMetrics,
}

impl Scheduler {
    fn new(profile: Profile) -> Self {
        let blocks = profile.kv_capacity_blocks();
        let cache = if profile.enable_prefix_caching {
            PrefixCache::new(blocks, profile.block_size)
        } else {
            PrefixCache::without_caching(blocks, profile.block_size)
        };
        Self {
            profile,
            cache,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            now: Duration::ZERO,
            m: EngineMetrics::default(),
        }
    }

    fn enqueue(&mut self, p: Pending, arrival: Duration) {
        self.next_id += 1;
        self.waiting.push_back(Seq {
            id: self.next_id,
            tx: p.tx,
            prompt: p.request.prompt,
            output: p.request.output_tokens,
            hashes: Vec::new(),
            max_new: p.request.max_new_tokens,
            generated: 0,
            computed: 0,
            step_tokens: 0,
            arrival,
            admitted: None,
            first_token: None,
            cached_tokens: 0,
            done: false,
        });
    }

    fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Chooses this step's work; returns what the step computes, or `None` if nothing can run.
    fn schedule(&mut self) -> Option<StepLoad> {
        let cache = &mut self.cache;
        let m = &mut self.m;
        self.running.retain(|s| {
            if s.tx.is_closed() {
                cache.release(s.id);
                m.requests_aborted += 1;
                return false;
            }
            true
        });

        let mut budget = self.profile.max_num_batched_tokens;
        let mut load = StepLoad::default();
        let mut scheduled_any = false;
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let (id, computed, need) = {
                let s = &self.running[i];
                (s.id, s.computed, s.total() - s.computed)
            };
            let n = need.min(budget);
            let blocks = self.cache.blocks_for(computed + n);
            let mut fits = true;
            while self.cache.grow(id, blocks).is_err() {
                let Some(mut victim) = self.running.pop() else { break };
                self.cache.release(victim.id);
                victim.computed = 0;
                victim.step_tokens = 0;
                self.waiting.push_front(victim);
                self.m.preemptions += 1;
                preempted = true;
                if self.running.len() <= i {
                    fits = false;
                    break;
                }
            }
            if !fits {
                break;
            }
            let s = &mut self.running[i];
            s.step_tokens = n;
            account(&mut load, s, n);
            scheduled_any = true;
            budget -= n;
            i += 1;
        }

        while !preempted && budget > 0 && self.running.len() < self.profile.max_num_seqs {
            let Some(front) = self.waiting.front_mut() else { break };
            if front.tx.is_closed() {
                self.waiting.pop_front();
                self.m.requests_aborted += 1;
                continue;
            }
            if front.hashes.is_empty() && self.profile.enable_prefix_caching {
                front.hashes = block_hashes(&front.prompt, self.profile.block_size);
            }
            let total = front.total();
            let max_hit = total.saturating_sub(1) / self.profile.block_size;
            let hit_tokens =
                self.cache.lookup(&front.hashes[..max_hit.min(front.hashes.len())]) * self.profile.block_size;
            let n = (total - hit_tokens).min(budget);
            let blocks = self.cache.blocks_for(hit_tokens + n);
            let Ok(alloc) = self.cache.allocate(front.id, total, &front.hashes, blocks) else { break };
            let Some(mut s) = self.waiting.pop_front() else { break };
            s.computed = alloc.hit_blocks * self.profile.block_size;
            let n = (total - s.computed).min(budget);
            if s.admitted.is_none() {
                s.admitted = Some(self.now);
                s.cached_tokens = s.computed;
                self.m.prompt_tokens += s.prompt.len() as u64;
                if s.tx.send(EngineEvent::Started { cached_tokens: s.cached_tokens }).is_err() {
                    self.cache.release(s.id);
                    self.m.requests_aborted += 1;
                    continue;
                }
            }
            s.step_tokens = n;
            account(&mut load, &s, n);
            scheduled_any = true;
            budget -= n;
            self.running.push(s);
        }
        scheduled_any.then_some(load)
    }

    /// Applies the step that just ended at `self.now`: computed tokens, output tokens, finished
    /// requests.
    fn complete_step(&mut self) {
        let now = self.now;
        for s in &mut self.running {
            if s.step_tokens == 0 || s.done {
                continue;
            }
            s.computed += s.step_tokens;
            s.step_tokens = 0;
            self.cache.mark_computed(s.id, s.computed);
            if s.computed < s.total() {
                continue;
            }
            if s.generated < s.max_new {
                let index = s.generated;
                s.generated += 1;
                self.m.generation_tokens += 1;
                if s.first_token.is_none() {
                    s.first_token = Some(now);
                    self.m.ttft.observe(now.saturating_sub(s.arrival).as_secs_f64());
                }
                if s.tx.send(EngineEvent::Token { index }).is_err() {
                    s.done = true;
                    self.m.requests_aborted += 1;
                    continue;
                }
            }
            if s.generated >= s.max_new {
                s.done = true;
                let ttft = s.first_token.unwrap_or(now).saturating_sub(s.arrival);
                self.m.requests_finished += 1;
                // A receiver dropped now has already seen every token; nothing is left to abort.
                let _ = s.tx.send(EngineEvent::Finished {
                    prompt_tokens: s.prompt.len(),
                    cached_tokens: s.cached_tokens,
                    completion_tokens: s.generated,
                    queue_time: s.admitted.unwrap_or(now).saturating_sub(s.arrival),
                    ttft,
                    total: now.saturating_sub(s.arrival),
                });
            }
        }
        let cache = &mut self.cache;
        let block_size = self.profile.block_size;
        self.running.retain(|s| {
            if s.done {
                cache.release_caching(s.id, &s.known_later_hashes(block_size));
            }
            !s.done
        });
        self.m.steps += 1;
    }

    fn account_step(&mut self, load: &StepLoad, took: Duration) {
        self.m.busy += took;
        for (total, us) in self.m.busy_parts.iter_mut().zip(self.profile.step.parts_us(load)) {
            *total += us / 1e6;
        }
        self.m.step_prefill_tokens += load.prefill_tokens;
        self.m.step_decode_seqs += load.decode_seqs;
        self.m.step_kv_tokens_read += load.kv_tokens_read;
    }

    fn snapshot(&self) -> EngineMetrics {
        let c = self.cache.stats();
        EngineMetrics {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_usage: c.usage,
            prefix_queries: c.query_tokens,
            prefix_hits: c.hit_tokens,
            sim_time: self.now,
            ..self.m
        }
    }
}

fn account(load: &mut StepLoad, s: &Seq, n: usize) {
    if n == 1 && s.generated > 0 && s.computed + 1 == s.total() {
        load.decode_seqs += 1;
        load.kv_tokens_read += s.computed as u64;
    } else {
        load.prefill_tokens += n as u64;
        load.prefill_attn += (n * (s.computed + n)) as u64;
    }
}

fn scaled(d: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

async fn run(shared: Arc<Shared>, mut sched: Scheduler, time_scale: f64) {
    let start = Instant::now();
    let mut batch = Vec::new();
    while !shared.stopped.load(Ordering::Acquire) {
        std::mem::swap(&mut *lock(&shared.incoming), &mut batch);
        for p in batch.drain(..) {
            // Under a time scale a request arrives when it was submitted, which can be inside the step
            // that just ran; with no time scale it arrives at the current simulated instant.
            let arrival = if time_scale > 0.0 {
                scaled(p.at.saturating_duration_since(start), 1.0 / time_scale).min(sched.now)
            } else {
                sched.now
            };
            sched.enqueue(p, arrival);
        }
        if sched.is_idle() {
            *lock(&shared.metrics) = sched.snapshot();
            shared.wake.notified().await;
            if time_scale > 0.0 {
                // Idle time passes in simulated time too, so arrivals after a pause queue from now.
                sched.now = sched.now.max(scaled(start.elapsed(), 1.0 / time_scale));
            }
            continue;
        }
        let Some(load) = sched.schedule() else {
            // Only a step that preempted every running sequence schedules nothing; the next one admits.
            tokio::task::yield_now().await;
            continue;
        };
        let took = sched.profile.step.step_time(&load);
        sched.now += took;
        sched.account_step(&load, took);
        let due = start.checked_add(scaled(sched.now, time_scale));
        match due {
            Some(due) if time_scale > 0.0 && due > Instant::now() + SLEEP_SLACK => tokio::time::sleep_until(due).await,
            // Let submitters and receivers run between steps even when the loop never sleeps.
            _ => tokio::task::yield_now().await,
        }
        sched.complete_step();
        *lock(&shared.metrics) = sched.snapshot();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn prompt(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| seed.wrapping_mul(7919).wrapping_add(i)).collect()
    }

    fn request(prompt: Vec<u32>, max_new_tokens: usize) -> EngineRequest {
        EngineRequest { prompt, max_new_tokens, output_tokens: Vec::new() }
    }

    async fn events(mut rx: UnboundedReceiver<EngineEvent>) -> Vec<EngineEvent> {
        let mut out = Vec::new();
        while let Some(e) = rx.recv().await {
            out.push(e);
        }
        out
    }

    fn finished(events: &[EngineEvent]) -> (usize, usize, Duration, Duration) {
        match events.last() {
            Some(EngineEvent::Finished { cached_tokens, completion_tokens, ttft, total, .. }) => {
                (*cached_tokens, *completion_tokens, *ttft, *total)
            }
            other => panic!("last event is {other:?}"),
        }
    }

    /// Polls until `done` holds for the engine's metrics (the loop runs on the same runtime).
    async fn wait_for(engine: &Engine, done: impl Fn(&EngineMetrics) -> bool) -> EngineMetrics {
        for _ in 0..100_000 {
            let m = engine.metrics();
            if done(&m) {
                return m;
            }
            tokio::task::yield_now().await;
        }
        panic!("metrics never reached the expected state: {:?}", engine.metrics());
    }

    #[tokio::test]
    async fn a_request_streams_its_tokens_in_order() {
        let engine = Engine::start(Profile::test(), 0.0).unwrap();
        let ev = events(engine.submit(request(prompt(1, 100), 5))).await;
        assert_eq!(ev[0], EngineEvent::Started { cached_tokens: 0 });
        let indices: Vec<usize> =
            ev.iter().filter_map(|e| if let EngineEvent::Token { index } = e { Some(*index) } else { None }).collect();
        assert_eq!(indices, vec![0, 1, 2, 3, 4]);
        let (cached, completion, ttft, total) = finished(&ev);
        assert_eq!((cached, completion), (0, 5));
        // Test profile: prefill step 1 ms + 100 x 1 us; then 4 decode steps of 1 ms + 10 us.
        assert_eq!(ttft, Duration::from_micros(1100));
        assert_eq!(total, Duration::from_micros(1100 + 4 * 1010));
        let m = engine.metrics();
        assert_eq!((m.prompt_tokens, m.generation_tokens, m.requests_finished, m.steps), (100, 5, 1, 5));
        // Busy the whole time, and the split adds up: 5 base terms, 100 prefill tokens, 4 decodes.
        assert_eq!(m.busy, total);
        assert_eq!((m.step_prefill_tokens, m.step_decode_seqs), (100, 4));
        assert!((m.busy_parts.iter().sum::<f64>() - total.as_secs_f64()).abs() < 1e-9, "{:?}", m.busy_parts);
        assert!((m.busy_parts[0] - 0.005).abs() < 1e-9, "{:?}", m.busy_parts);
        assert_eq!(m.ttft.count, 1);
        // 1.1 ms falls in the (0.001, 0.005] bucket.
        assert_eq!(m.ttft.counts[1], 1);
        assert_eq!(m.ttft.cumulative()[22], 1);
    }

    #[tokio::test]
    async fn a_repeated_prompt_hits_the_prefix_cache() {
        let engine = Engine::start(Profile::test(), 0.0).unwrap();
        let p = prompt(2, 1000);
        let first = events(engine.submit(request(p.clone(), 3))).await;
        let second = events(engine.submit(request(p, 3))).await;
        assert_eq!(finished(&first).0, 0);
        assert_eq!(second[0], EngineEvent::Started { cached_tokens: 992 });
        assert_eq!(finished(&second).0, 992);
        assert!(finished(&second).2 < finished(&first).2);
        let m = engine.metrics();
        assert_eq!((m.prefix_queries, m.prefix_hits), (2000, 992));
    }

    #[tokio::test]
    async fn a_next_turn_hits_the_previous_answer_when_its_tokens_are_known() {
        let engine = Engine::start(Profile::test(), 0.0).unwrap();
        let turn1 = prompt(11, 100);
        let answer = prompt(12, 40);
        let mut first = request(turn1.clone(), answer.len());
        first.output_tokens.clone_from(&answer);
        events(engine.submit(first)).await;
        let mut turn2 = turn1.clone();
        turn2.extend(&answer);
        turn2.extend(prompt(13, 30));
        // 100 prompt + 39 computed answer tokens: 8 full blocks.
        assert_eq!(finished(&events(engine.submit(request(turn2.clone(), 1))).await).0, 128);
        // Without the answer's ids only the first turn's 6 full prompt blocks are cached.
        let engine = Engine::start(Profile::test(), 0.0).unwrap();
        events(engine.submit(request(turn1, 40))).await;
        assert_eq!(finished(&events(engine.submit(request(turn2, 1))).await).0, 96);
    }

    #[tokio::test]
    async fn concurrent_first_arrivals_of_a_prefix_miss() {
        let engine = Engine::start(Profile::test(), 0.0).unwrap();
        let p = prompt(3, 200);
        let a = engine.submit(request(p.clone(), 2));
        let b = engine.submit(request(p.clone(), 2));
        let (a, b) = tokio::join!(events(a), events(b));
        assert_eq!(finished(&a).0, 0);
        assert_eq!(finished(&b).0, 0);
        // Once computed, the prefix is a hit for a later arrival.
        assert_eq!(finished(&events(engine.submit(request(p, 2))).await).0, 192);
    }

    #[tokio::test]
    async fn a_long_prompt_is_prefilled_in_chunks() {
        let engine = Engine::start(Profile::test(), 0.0).unwrap();
        let ev = events(engine.submit(request(prompt(4, 1200), 1))).await;
        let (_, _, ttft, _) = finished(&ev);
        // 512 + 512 + 176 tokens in three steps of 1 ms plus 1 us per token.
        assert_eq!(ttft, Duration::from_micros(3000 + 1200));
        assert_eq!(engine.metrics().steps, 3);
    }

    /// Decode tokens per simulated second with `n` requests decoding together.
    async fn decode_throughput(n: usize) -> f64 {
        let mut profile = Profile::test();
        profile.kv_capacity_tokens = 1 << 20;
        let engine = Engine::start(profile, 0.0).unwrap();
        let rxs: Vec<_> = (0..n).map(|i| engine.submit(request(prompt(i as u32, 16), 200))).collect();
        let mut end = Duration::ZERO;
        for rx in rxs {
            end = end.max(finished(&events(rx).await).3);
        }
        (n * 200) as f64 / end.as_secs_f64()
    }

    #[tokio::test]
    async fn decode_throughput_grows_with_concurrency_up_to_max_num_seqs() {
        let t1 = decode_throughput(1).await;
        let t8 = decode_throughput(8).await;
        let t64 = decode_throughput(64).await;
        let t128 = decode_throughput(128).await;
        assert!(t8 > 6.0 * t1, "{t1} -> {t8}");
        assert!(t64 > 5.0 * t8, "{t8} -> {t64}");
        // Past max_num_seqs (64) the extra requests only queue.
        assert!(t128 < 1.1 * t64, "{t64} -> {t128}");
        assert!(t128 > 0.9 * t64, "{t64} -> {t128}");
    }

    #[tokio::test]
    async fn dropping_the_receiver_aborts_and_frees_the_blocks() {
        let engine = Engine::start(Profile::test(), 0.0).unwrap();
        let mut rx = engine.submit(request(prompt(5, 300), 3000));
        assert!(matches!(rx.recv().await, Some(EngineEvent::Started { .. })));
        assert!(matches!(rx.recv().await, Some(EngineEvent::Token { index: 0 })));
        let m = engine.metrics();
        assert_eq!(m.running, 1);
        assert!(m.kv_usage > 0.0);
        drop(rx);
        let m = wait_for(&engine, |m| m.requests_aborted == 1).await;
        assert_eq!(m.running, 0);
        assert!(m.kv_usage.abs() < f64::EPSILON, "{}", m.kv_usage);
        assert_eq!(m.requests_finished, 0);
    }

    #[tokio::test]
    async fn kv_pressure_preempts_and_every_request_still_completes() {
        let mut profile = Profile::test();
        // 32 blocks: 8 sequences of 16 + 100 tokens cannot all hold their KV at once.
        profile.kv_capacity_tokens = 512;
        let engine = Engine::start(profile, 0.0).unwrap();
        let rxs: Vec<_> = (0..8).map(|i| engine.submit(request(prompt(100 + i, 16), 100))).collect();
        for rx in rxs {
            let ev = events(rx).await;
            assert_eq!(finished(&ev).1, 100);
            let tokens = ev.iter().filter(|e| matches!(e, EngineEvent::Token { .. })).count();
            assert_eq!(tokens, 100);
        }
        let m = engine.metrics();
        assert!(m.preemptions > 0);
        assert_eq!(m.generation_tokens, 800);
        assert!(m.kv_usage.abs() < f64::EPSILON);
    }

    #[tokio::test]
    async fn impossible_requests_are_rejected() {
        let engine = Engine::start(Profile::test(), 0.0).unwrap();
        let ev = events(engine.submit(request(prompt(6, 4000), 200))).await;
        assert_eq!(
            ev,
            vec![EngineEvent::Rejected { prompt_tokens: 4000, max_new_tokens: 200, kv_capacity_tokens: 4096 }]
        );
        let ev = events(engine.submit(request(Vec::new(), 5))).await;
        assert!(matches!(ev[..], [EngineEvent::Rejected { prompt_tokens: 0, .. }]));
        assert_eq!(engine.metrics().requests_rejected, 2);
    }

    #[tokio::test]
    async fn zero_max_new_tokens_finishes_after_prefill() {
        let engine = Engine::start(Profile::test(), 0.0).unwrap();
        let ev = events(engine.submit(request(prompt(7, 50), 0))).await;
        assert_eq!(ev.len(), 2);
        let (_, completion, ttft, total) = finished(&ev);
        assert_eq!((completion, ttft, total), (0, Duration::from_micros(1050), Duration::from_micros(1050)));
    }

    #[tokio::test]
    async fn dropping_the_engine_closes_open_requests() {
        let engine = Engine::start(Profile::test(), 0.0).unwrap();
        let mut rx = engine.submit(request(prompt(8, 100), 3000));
        assert!(matches!(rx.recv().await, Some(EngineEvent::Started { .. })));
        drop(engine);
        let rest = events(rx).await;
        assert!(!rest.iter().any(|e| matches!(e, EngineEvent::Finished { .. })));
    }

    #[tokio::test]
    async fn shutdown_closes_later_submissions() {
        let engine = Engine::start(Profile::test(), 0.0).unwrap();
        engine.shutdown();
        assert!(events(engine.submit(request(prompt(9, 10), 3))).await.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_time_scale_paces_real_time() {
        // 20 steps of about 1 ms simulated at time scale 10 take at least ~200 ms of real time.
        let engine = Engine::start(Profile::test(), 10.0).unwrap();
        let started = std::time::Instant::now();
        let ev = events(engine.submit(request(prompt(10, 10), 20))).await;
        let sim = finished(&ev).3;
        assert!(
            started.elapsed() + SLEEP_SLACK >= scaled(sim, 10.0),
            "{:?} real for {sim:?} simulated",
            started.elapsed()
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert!(matches!(Engine::start(Profile::test(), 0.0), Err(EngineError::NoRuntime)));
        rt.block_on(async {
            assert!(matches!(Engine::start(Profile::test(), -1.0), Err(EngineError::TimeScale(_))));
            let mut p = Profile::test();
            p.block_size = 0;
            assert!(matches!(Engine::start(p, 0.0), Err(EngineError::Profile(_))));
        });
    }

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
