//! The dispatch loop: reads jobs up to a lookahead beyond the window, admits them grouped by shared
//! prefix (see [`crate::scheduler::order`]) while the window has room, runs each as its own task
//! and hands results on as they finish. Dropping the future cancels every agent of the run.

use std::any::Any;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt as _;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::task::JoinSet;

use crate::backends::ChatRequest;
use crate::conversation::Message;
use crate::prefix::{base_len, longest_key, prefix_key};
use crate::scheduler::agent::{run_job, Job, JobResult, RunContext};
use crate::scheduler::order::{OrderOptions, PrefixOrder};
use crate::scheduler::stats::RunStats;

/// System prompts shorter than this (about 250 tokens) are not worth a warm-up request.
const WARM_UP_MIN_CHARS: usize = 1000;

pub async fn run_all(
    ctx: Arc<RunContext>,
    dispatch: Dispatch,
    mut jobs: mpsc::Receiver<Job>,
    results: mpsc::UnboundedSender<JobResult>,
) {
    let keyer = Keyer::new(&ctx, dispatch.lookahead > 0);
    let mut order = PrefixOrder::new(OrderOptions {
        quantum: (16 * ctx.spec.max_inflight).max(MIN_QUANTUM),
        kv_budget_tokens: kv_budget(&ctx, &dispatch),
        lanes: dispatch.lanes,
    });
    let hold = dispatch.lookahead.max(1);
    let mut tasks = JoinSet::new();
    let mut keys: HashMap<tokio::task::Id, u64> = HashMap::new();
    let mut warmed = !ctx.spec.warm_prefix;
    let mut open = true;
    let mut since_refresh = 0usize;
    loop {
        // A feed in progress finishes before the order is read: a list fed at once is grouped
        // whole, not dispatched piecemeal as it trickles in.
        let feeding = dispatch.feeding.lock();
        while open && order.pending() < hold {
            match jobs.try_recv() {
                Ok(job) => keyer.push(&mut order, job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        drop(feeding);
        while tasks.len() < ctx.spec.window {
            let Some((key, job)) = order.pop() else {
                // Held by the KV gate: a new reading of the engine's capacity may lift it.
                since_refresh = 0;
                order.set_kv_budget(kv_budget(&ctx, &dispatch));
                break;
            };
            if !warmed {
                warmed = true;
                warm_up(&ctx).await;
            }
            since_refresh += 1;
            if since_refresh >= BUDGET_REFRESH {
                since_refresh = 0;
                order.set_kv_budget(kv_budget(&ctx, &dispatch));
            }
            let ctx = ctx.clone();
            let results = results.clone();
            let handle = tasks.spawn(async move {
                let (id, index) = (job.id.clone(), job.index);
                let stats = ctx.stats.clone();
                // A bug must cost one job its result, not its result silently.
                let result = match AssertUnwindSafe(run_job(ctx, job)).catch_unwind().await {
                    Ok(result) => result,
                    Err(payload) => panicked(&stats, id, index, payload.as_ref()),
                };
                // A closed receiver means the caller stopped listening (cancelled run); nothing to do.
                let _ = results.send(result);
            });
            keys.insert(handle.id(), key);
        }
        if !open && order.pending() == 0 && tasks.is_empty() {
            break;
        }
        tokio::select! {
            job = jobs.recv(), if open && order.pending() < hold => match job {
                Some(job) => keyer.push(&mut order, job),
                None => open = false,
            },
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => e.id(),
                };
                if let Some(key) = keys.remove(&id) {
                    order.finish(key);
                }
            }
            // Not reached: with nothing in flight the order always yields a pending job.
            else => break,
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// The result of a job whose task panicked: error kind `internal`, with the panic's message.
#[cold]
fn panicked(stats: &RunStats, id: String, index: u64, payload: &(dyn Any + Send)) -> JobResult {
    let message = panic_message(payload);
    stats.jobs_failed.fetch_add(1, Relaxed);
    stats.count_error("internal");
    JobResult::failed(id, index, "internal", format!("internal error: the job's task panicked: {message}"))
}

/// The message a panic was raised with (`panic!` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Jobs read ahead of the dispatch window, to be grouped by shared prefix.
#[derive(Debug, Clone)]
pub struct Dispatch {
    /// Jobs held beyond the window (0: dispatch in input order).
    pub lookahead: usize,
    /// The engine's KV capacity in tokens as the user gave it; otherwise read from `/metrics`.
    pub kv_capacity_tokens: Option<usize>,
    /// Held by the feeder while it sends a batch of inputs.
    pub feeding: Arc<Mutex<()>>,
    /// Prefix groups dispatched at once: the number of endpoints.
    pub lanes: usize,
}

impl Default for Dispatch {
    fn default() -> Self {
        Self { lookahead: DEFAULT_LOOKAHEAD, kv_capacity_tokens: None, feeding: Arc::default(), lanes: 1 }
    }
}

/// Inputs read ahead of the window from a lazy source (a list is read whole).
pub const DEFAULT_LOOKAHEAD: usize = 2048;

/// A group's turn is at least this many dispatches (16 x `max_inflight` above 64): long enough that
/// a document's prefix is computed a handful of times per thousand prompts over it at worst.
const MIN_QUANTUM: usize = 1024;

/// Dispatches between two readings of the engine's KV capacity.
const BUDGET_REFRESH: usize = 256;

/// KV capacity assumed for an engine that exports metrics but has not reported its capacity (yet):
/// a 7B model on a 24 GB card holds about 100k tokens; less is safe, more would thrash it.
const DEFAULT_KV_TOKENS: usize = 65_536;

/// Share of the KV capacity that the shared prefixes in flight may take; the rest holds each
/// request's own prompt and answer.
const PREFIX_SHARE: f64 = 0.6;

/// Bytes per token, for sizing prefixes without a tokenizer (English prose runs about 4).
const BYTES_PER_TOKEN: usize = 4;

/// The budget of shared-prefix tokens in flight: from the user's `kv_capacity_tokens`, else the
/// engines' exported capacity (summed over a fleet), else a conservative default for an engine that
/// has metrics; none for an API without (a hosted service's cache is not ours to size).
fn kv_budget(ctx: &RunContext, dispatch: &Dispatch) -> Option<usize> {
    let capacity = match (dispatch.kv_capacity_tokens, &ctx.engine) {
        (Some(tokens), _) => tokens,
        (None, Some(engine)) => {
            let readings = engine.latest();
            let total: f64 = readings.iter().flatten().filter_map(|m| m.kv_capacity_tokens).sum();
            if total >= 1.0 {
                total.min(1e12) as usize
            } else {
                DEFAULT_KV_TOKENS
            }
        }
        (None, None) => return None,
    };
    Some((capacity as f64 * PREFIX_SHARE) as usize)
}

/// Computes a job's grouping key: the longest of the routing keys its first request will have
/// (system prompt and tools, hashed once per run, then prefixes of the rendered task).
struct Keyer {
    base: Option<u64>,
    base_len: usize,
    task: crate::spec::Template,
    enabled: bool,
}

impl Keyer {
    fn new(ctx: &RunContext, enabled: bool) -> Self {
        let system: Vec<Message> = ctx.system.iter().cloned().collect();
        Self {
            base: prefix_key(&system, &ctx.spec.tools, false),
            base_len: base_len(&system, &ctx.spec.tools),
            task: ctx.spec.task.clone(),
            enabled,
        }
    }

    fn push(&self, order: &mut PrefixOrder<Job>, job: Job) {
        let (key, bytes) = if self.enabled {
            // A job whose template fails to render fails in `run_job`, which reports it.
            let prompt = self.task.render(job.index, &job.input).unwrap_or_default();
            longest_key(self.base, self.base_len, &prompt).unwrap_or((0, 0))
        } else {
            (0, 0)
        };
        order.push(key, bytes / BYTES_PER_TOKEN, job);
    }
}

/// Concurrent first arrivals of a prefix all miss the engine's prefix cache (none of them has
/// computed it yet), so a fan-out of N jobs would prefill the shared system prompt N times. One
/// short request first makes it a cache hit for everyone after.
async fn warm_up(ctx: &RunContext) {
    let Some(system) = &ctx.system else { return };
    let tool_chars: usize = ctx.spec.tools.iter().map(|t| t.parameters.to_string().len() + t.description.len()).sum();
    if system.content.len() + tool_chars < WARM_UP_MIN_CHARS {
        return;
    }
    let request = ChatRequest {
        model: ctx.spec.model.clone(),
        messages: Arc::new(vec![system.clone(), Message::user("Reply with OK.")]),
        tools: ctx.spec.tools.clone(),
        tool_choice: None,
        response_schema: None,
        max_tokens: Some(1),
        temperature: ctx.spec.temperature,
        request_id: "batchagent-warm-up".into(),
        stream: false,
        hints: None,
        text_deltas: false,
        extra_body: ctx.spec.extra_body.clone(),
    };
    let permit = ctx.slots.acquire(0).await;
    // A failed warm-up only costs the cache hit; the jobs themselves report real errors.
    let _ = tokio::time::timeout(ctx.spec.call_timeout.min(Duration::from_secs(120)), ctx.backend.chat(request, None))
        .await;
    drop(permit);
}
