//! The simulated engine: the shared continuous-batching scheduler (`crate::engine`) on a virtual
//! clock, each step lasting what the profile's step model says.
//!
//! The loop sleeps only when simulated time, scaled by `time_scale`, runs more than a millisecond
//! ahead of real time, so `time_scale = 0.01` runs 100x faster than the GPU would and
//! `time_scale = 0` never sleeps. Every duration the engine reports is simulated, so it does not
//! depend on the time scale.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use crate::engine::{EngineEvent, EngineMetrics, EngineRequest, Histogram, Pin, TTFT_BUCKETS};
use crate::engine::{Scheduler, StepLoad};

use super::profile::{Profile, ProfileError};

/// Real time the loop may lag behind simulated time before it sleeps (tokio's timer granularity).
const SLEEP_SLACK: Duration = Duration::from_millis(1);

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
        let scheduler = Scheduler::new(profile.scheduler_config());
        let task = runtime.spawn(run(Arc::clone(&shared), scheduler, profile.clone(), time_scale));
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
        if let Some(rejected) = self.profile.scheduler_config().rejection(&request) {
            // The receiver is still open, so this send cannot fail; a closed one would not care.
            let _ = tx.send(rejected);
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

fn account_step(sched: &mut Scheduler, profile: &Profile, load: &StepLoad, took: Duration) {
    let m = sched.metrics_mut();
    m.busy += took;
    for (total, us) in m.busy_parts.iter_mut().zip(profile.step.parts_us(load)) {
        *total += us / 1e6;
    }
    m.step_prefill_tokens += load.prefill_tokens;
    m.step_decode_seqs += load.decode_seqs;
    m.step_kv_tokens_read += load.kv_tokens_read;
}

fn scaled(d: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

async fn run(shared: Arc<Shared>, mut sched: Scheduler, profile: Profile, time_scale: f64) {
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
            sched.enqueue(p.request, p.tx, arrival);
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
        let took = profile.step.step_time(&load);
        sched.now += took;
        account_step(&mut sched, &profile, &load, took);
        let due = start.checked_add(scaled(sched.now, time_scale));
        match due {
            Some(due) if time_scale > 0.0 && due > Instant::now() + SLEEP_SLACK => tokio::time::sleep_until(due).await,
            // Let submitters and receivers run between steps even when the loop never sleeps.
            _ => tokio::task::yield_now().await,
        }
        sched.complete_step(None);
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
        EngineRequest { prompt, max_new_tokens, ..EngineRequest::default() }
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
        let indices: Vec<usize> = ev
            .iter()
            .filter_map(|e| if let EngineEvent::Token { index, .. } = e { Some(*index) } else { None })
            .collect();
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
        assert!(matches!(rx.recv().await, Some(EngineEvent::Token { index: 0, .. })));
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
}
