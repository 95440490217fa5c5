//! The embedded engine's loop: the shared scheduler on a thread of its own, each step executed by a
//! [`StepExecutor`] (the Python model runner, behind feature `python`) on the step's layout.
//!
//! One step is one call: the executor gets the whole layout and returns one sampled token per
//! scheduled sequence (with its logprobs where the sequence's sampling asks), so the model runner is
//! entered once per step however many sequences run.
//! Time is real time since the engine started.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

use super::metrics::EngineMetrics;
use super::scheduler::{EngineEvent, EngineRequest, Scheduler, SchedulerConfig, StepLayout, TokenLogprobs};

/// What a step samples: a token per sequence of the layout, and either no logprobs or an entry per
/// sequence (`Some` where its sampling asked for them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sampled {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<Option<TokenLogprobs>>,
}

/// Runs one step of the model: writes the new tokens' KV at their slots and samples each
/// sequence's next token. Errors are messages (a device out of memory, a bug in the runner).
pub trait StepExecutor: Send + 'static {
    fn execute(&mut self, layout: &StepLayout) -> Result<Sampled, String>;
}

#[derive(Debug, thiserror::Error)]
pub enum LocalEngineError {
    #[error("the engine's settings: {0}")]
    Config(String),
    #[error("cannot start the engine thread: {0}")]
    Thread(#[from] std::io::Error),
}

struct Pending {
    request: EngineRequest,
    tx: UnboundedSender<EngineEvent>,
    at: Instant,
}

struct Shared {
    incoming: Mutex<Vec<Pending>>,
    /// Agents whose pins are to be released (their last reply called no tool).
    done_agents: Mutex<Vec<String>>,
    wake: Condvar,
    stopped: AtomicBool,
    rejected: AtomicU64,
    metrics: Mutex<EngineMetrics>,
    /// Why the loop stopped on its own (the executor failed), for /health and the log.
    failure: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each lock guards plain data that is consistent at every point a panic could leave it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running engine. Dropping it stops the loop after the step in progress; [`LocalEngine::shutdown`]
/// also waits for that.
pub struct LocalEngine {
    shared: Arc<Shared>,
    config: SchedulerConfig,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for LocalEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEngine").field("config", &self.config).finish_non_exhaustive()
    }
}

impl LocalEngine {
    /// Starts the loop on a new thread.
    pub fn start(config: SchedulerConfig, executor: Box<dyn StepExecutor>) -> Result<Self, LocalEngineError> {
        if let Some(why) = config.invalid() {
            return Err(LocalEngineError::Config(why));
        }
        let shared = Arc::new(Shared {
            incoming: Mutex::new(Vec::new()),
            done_agents: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            stopped: AtomicBool::new(false),
            rejected: AtomicU64::new(0),
            metrics: Mutex::new(EngineMetrics::default()),
            failure: Mutex::new(None),
        });
        let loop_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("batchagent-engine".into())
            .spawn(move || run(&loop_shared, Scheduler::new(config), executor))?;
        Ok(Self { shared, config, thread: Mutex::new(Some(thread)) })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Queues a request. Its events arrive on the returned receiver; dropping the receiver aborts the
    /// request and frees its KV blocks. After `shutdown`, or once the loop failed, the receiver is
    /// closed at once.
    pub fn submit(&self, request: EngineRequest) -> UnboundedReceiver<EngineEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(rejected) = self.config.rejection(&request) {
            // The receiver is still open, so this send cannot fail.
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

    /// Tells the scheduler, before its next step, that `agent` is done (its reply called no tool, or
    /// its client said so): its pinned KV blocks are released and its blocks' predicted next use
    /// withdrawn (see [`super::scheduler::Scheduler::agent_done`]).
    pub fn agent_done(&self, agent: String) {
        if self.shared.stopped.load(Ordering::Acquire) {
            return;
        }
        lock(&self.shared.done_agents).push(agent);
        // Taken with the wait's lock, so a loop about to sleep sees it.
        let _guard = lock(&self.shared.incoming);
        self.shared.wake.notify_one();
    }

    /// The counters as of the last completed step.
    pub fn metrics(&self) -> EngineMetrics {
        let queued = lock(&self.shared.incoming).len();
        let mut m = *lock(&self.shared.metrics);
        m.waiting += queued;
        m.requests_rejected = self.shared.rejected.load(Ordering::Relaxed);
        m
    }

    /// Why the loop stopped by itself, if it did.
    pub fn failure(&self) -> Option<String> {
        lock(&self.shared.failure).clone()
    }

    /// Stops the loop and waits for the step in progress; requests in flight see their receivers
    /// close. Call it without holding anything the executor needs (the GIL).
    pub fn shutdown(&self) {
        self.stop();
        if let Some(thread) = lock(&self.thread).take() {
            // A panic in the loop has already closed every receiver; nothing is left to report.
            let _ = thread.join();
        }
    }

    fn stop(&self) {
        self.shared.stopped.store(true, Ordering::Release);
        let _guard = lock(&self.shared.incoming);
        self.shared.wake.notify_all();
    }
}

impl Drop for LocalEngine {
    fn drop(&mut self) {
        // No join here: a drop can run where the executor's lock (the GIL) is held.
        self.stop();
    }
}

fn run(shared: &Shared, mut sched: Scheduler, mut executor: Box<dyn StepExecutor>) {
    let start = Instant::now();
    let mut batch = Vec::new();
    loop {
        {
            let mut incoming = lock(&shared.incoming);
            while incoming.is_empty()
                && sched.is_idle()
                && lock(&shared.done_agents).is_empty()
                && !shared.stopped.load(Ordering::Acquire)
            {
                *lock(&shared.metrics) = sched.snapshot();
                incoming = shared.wake.wait(incoming).unwrap_or_else(PoisonError::into_inner);
            }
            std::mem::swap(&mut *incoming, &mut batch);
        }
        if shared.stopped.load(Ordering::Acquire) {
            return;
        }
        for p in batch.drain(..) {
            sched.enqueue(p.request, p.tx, p.at.saturating_duration_since(start));
        }
        let done_agents = std::mem::take(&mut *lock(&shared.done_agents));
        if !done_agents.is_empty() {
            for agent in done_agents {
                sched.agent_done(&agent);
            }
            *lock(&shared.metrics) = sched.snapshot();
            if sched.is_idle() {
                continue;
            }
        }
        let step_start = Instant::now();
        sched.now = step_start.saturating_duration_since(start);
        let Some(load) = sched.schedule() else {
            // Only a step that preempted every running sequence schedules nothing; the next admits.
            continue;
        };
        let layout = sched.layout();
        let laid_out = step_start.elapsed();
        let result = executor.execute(&layout).and_then(|sampled| {
            let seqs = layout.num_seqs();
            if sampled.tokens.len() != seqs {
                Err(format!("the model runner returned {} tokens for {seqs} sequences", sampled.tokens.len()))
            } else if !sampled.logprobs.is_empty() && sampled.logprobs.len() != seqs {
                Err(format!("the model runner returned {} logprobs for {seqs} sequences", sampled.logprobs.len()))
            } else {
                Ok(sampled)
            }
        });
        match result {
            Ok(Sampled { tokens, logprobs }) => {
                let executed = Instant::now();
                sched.now = start.elapsed();
                sched.complete_step_with_logprobs(Some(&tokens), logprobs);
                let m = sched.metrics_mut();
                m.scheduling += laid_out + executed.elapsed();
                m.busy += step_start.elapsed();
                m.step_prefill_tokens += load.prefill_tokens;
                m.step_decode_seqs += load.decode_seqs;
                m.step_kv_tokens_read += load.kv_tokens_read;
                *lock(&shared.metrics) = sched.snapshot();
            }
            Err(message) => {
                *lock(&shared.failure) = Some(message);
                shared.stopped.store(true, Ordering::Release);
                lock(&shared.incoming).clear();
                // Dropping the scheduler closes every request's receiver.
                return;
            }
        }
    }
}
