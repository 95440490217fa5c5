//! The dispatch loop: admits jobs while the window has room, runs each as its own task and hands
//! results on as they finish. Dropping the future cancels every agent of the run.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crate::backends::ChatRequest;
use crate::conversation::{Message, Usage};
use crate::scheduler::agent::{run_job, Job, JobError, JobResult, RunContext};
use crate::scheduler::stats::RunStats;

/// System prompts shorter than this (about 250 tokens) are not worth a warm-up request.
const WARM_UP_MIN_CHARS: usize = 1000;

pub async fn run_all(ctx: Arc<RunContext>, mut jobs: mpsc::Receiver<Job>, results: mpsc::UnboundedSender<JobResult>) {
    let window = Arc::new(Semaphore::new(ctx.spec.window));
    let mut tasks = JoinSet::new();
    let mut warmed = !ctx.spec.warm_prefix;
    while let Some(job) = jobs.recv().await {
        if !warmed {
            warmed = true;
            warm_up(&ctx).await;
        }
        let Ok(permit) = window.clone().acquire_owned().await else { break };
        let ctx = ctx.clone();
        let results = results.clone();
        tasks.spawn(async move {
            let (id, index) = (job.id.clone(), job.index);
            let stats = ctx.stats.clone();
            // A bug must cost one job its result, not its result silently.
            let result = match AssertUnwindSafe(run_job(ctx, job)).catch_unwind().await {
                Ok(result) => result,
                Err(payload) => panicked(&stats, id, index, payload.as_ref()),
            };
            drop(permit);
            // A closed receiver means the caller stopped listening (cancelled run); nothing to do.
            let _ = results.send(result);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// The result of a job whose task panicked: error kind `internal`, with the panic's message.
#[cold]
fn panicked(stats: &RunStats, id: String, index: u64, payload: &(dyn Any + Send)) -> JobResult {
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    let error = JobError {
        kind: "internal".into(),
        message: format!("internal error: the job's task panicked: {message}"),
        retryable: false,
        attempts: 0,
    };
    stats.jobs_failed.fetch_add(1, Relaxed);
    stats.count_error(&error.kind);
    JobResult {
        id,
        index,
        ok: false,
        output: None,
        text: None,
        error: Some(error),
        usage: Usage::default(),
        turns: 0,
        tool_calls: 0,
        attempts: 0,
        repaired: false,
        ttft_s: None,
        total_s: 0.0,
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
    };
    let permit = ctx.slots.acquire(0).await;
    // A failed warm-up only costs the cache hit; the jobs themselves report real errors.
    let _ = tokio::time::timeout(ctx.spec.call_timeout.min(Duration::from_secs(120)), ctx.backend.chat(request, None))
        .await;
    drop(permit);
}
