//! One job's life: render, then turns of (model call -> tool calls) until a final answer, which is
//! extracted, repaired and validated. A model call holds an inference slot only while it is in
//! flight; tool waits, backoff sleeps and validation hold none.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::backends::metrics::EngineWatch;
use crate::backends::{AgentHints, Backend, BackendError, ChatRequest, ChatResponse, StreamEvent};
use crate::conversation::{Message, Role, TimeoutKind, ToolCall, Usage};
use crate::limits::AdaptiveLimit;
use crate::output::{describe, extract_json, CompiledSchema};
use crate::scheduler::compaction::{self, Compactor};
use crate::scheduler::retry::{RetryPolicy, SplitMix64};
use crate::scheduler::semaphore::PrioritySemaphore;
use crate::scheduler::stats::RunStats;
use crate::scheduler::trace::{CallSpan, JobTrace, ToolSpan, TraceClock};
use crate::spec::{BatchSpec, SchemaMode};
use crate::tools::{canonical_arguments, OnToolError, ToolError, ToolPool};

/// How long after `call_timeout` the scheduler gives up on a backend that did not enforce it.
const CALL_TIMEOUT_BACKSTOP: Duration = Duration::from_secs(1);

/// The Python side of output validation (pydantic, custom validators). Receives the JSON text that
/// passed the JSON Schema check; `Err` is a message fed back to the model.
pub trait OutputValidator: Send + Sync {
    fn validate(&self, job_id: &str, json: String) -> BoxFuture<'static, Result<(), String>>;
}

/// Persists a job's conversation after each completed turn so a resumed run restarts it there.
/// The future completes once the state is queued: a slow store holds back this job, not the thread.
pub trait TurnSink: Send + Sync {
    fn turn_done(&self, job_id: &str, state: &AgentState) -> BoxFuture<'static, ()>;
}

/// One input to run.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub index: u64,
    pub input: Map<String, Value>,
    /// A durable state from an earlier run of this job (resume), or the conversation a persistent
    /// agent starts this step from (its history and the new observation).
    pub resume: Option<AgentState>,
    /// This input's own request-body fields (`extra_body=` as a function of the input), merged
    /// over the batch's.
    pub extra_body: Option<Arc<Map<String, Value>>>,
    /// Hand the finished conversation back in [`JobResult::conversation`] (persistent agents).
    pub keep_conversation: bool,
}

/// What survives a crash: the conversation so far and the counters that go into the result.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentState {
    pub messages: Vec<Message>,
    pub turns: u32,
    pub tool_calls: u32,
    pub usage: Usage,
    /// Model calls sent again after a retryable failure (429, 5xx, reset, timeout).
    #[serde(default)]
    pub retries: u32,
    /// Times the conversation was compacted to fit the context, and the prompt tokens that took off.
    #[serde(default)]
    pub compactions: u32,
    #[serde(default)]
    pub compacted_tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobError {
    pub kind: String,
    pub message: String,
    /// The failure was of a kind that is retried (429, 5xx, reset, timeout) and the attempts ran out.
    pub retryable: bool,
    /// As [`JobResult::attempts`].
    pub attempts: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobResult {
    pub id: String,
    pub index: u64,
    pub ok: bool,
    /// The validated JSON output (when a schema was given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// The model's final text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    pub usage: Usage,
    pub turns: u32,
    pub tool_calls: u32,
    /// 1 + the retries of its model calls (0 when no call was made): a clean job is 1 however
    /// many turns it took (those are `turns`).
    pub attempts: u32,
    pub repaired: bool,
    /// How the last model call ended, in OpenAI's words (`stop`, `length`, `tool_calls`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// The final answer was cut off at `max_tokens` (`finish_reason` `length`).
    #[serde(default)]
    pub truncated: bool,
    /// Seconds to the first token of the first model call.
    #[serde(rename = "ttft", alias = "ttft_s")]
    pub ttft_s: Option<f64>,
    /// Seconds from the job's start to its result.
    #[serde(rename = "total", alias = "total_s")]
    pub total_s: f64,
    /// The whole conversation, the final answer included, of a successful job that asked for it
    /// ([`Job::keep_conversation`]). Not journaled: a persistent agent's history is its owner's.
    #[serde(skip)]
    pub conversation: Option<Vec<Message>>,
    /// The job's span records, when the run is traced. Not journaled.
    #[serde(skip)]
    pub trace: Option<Box<JobTrace>>,
}

impl JobResult {
    /// The result of a job that ran no model call: failed with `kind` and `message`.
    pub fn failed(id: String, index: u64, kind: &str, message: String) -> Self {
        Self {
            id,
            index,
            ok: false,
            output: None,
            text: None,
            error: Some(JobError { kind: kind.to_owned(), message, retryable: false, attempts: 0 }),
            usage: Usage::default(),
            turns: 0,
            tool_calls: 0,
            attempts: 0,
            repaired: false,
            finish_reason: None,
            truncated: false,
            ttft_s: None,
            total_s: 0.0,
            conversation: None,
            trace: None,
        }
    }
}

/// Everything the agents of one run share.
pub struct RunContext {
    pub spec: Arc<BatchSpec>,
    pub backend: Arc<dyn Backend>,
    pub tools: Arc<ToolPool>,
    pub slots: Arc<PrioritySemaphore>,
    pub limit: AdaptiveLimit,
    pub retry: RetryPolicy,
    pub schema: Option<Arc<CompiledSchema>>,
    pub validator: Option<Arc<dyn OutputValidator>>,
    pub turn_sink: Option<Arc<dyn TurnSink>>,
    pub stats: Arc<RunStats>,
    /// Engine metrics, and the queue depth above which no new model call is sent (back-pressure).
    pub engine: Option<Arc<EngineWatch>>,
    pub queue_ceiling: Option<f64>,
    /// The system message every job starts with (schema instructions included), built once.
    pub system: Option<Message>,
    /// Ask the backend for constrained decoding of the final answer.
    pub constrained: bool,
    /// Accept a structured answer cut off at `max_tokens` once repair closed its JSON (marked
    /// `truncated`); otherwise such an answer fails the job with kind `truncated`.
    pub accept_truncated: bool,
    pub seed: u64,
    /// Compaction of conversations that outgrow the context; `None` when off or no limit is known.
    pub compactor: Option<Arc<Compactor>>,
    /// Set when the run is traced: jobs then record their calls ([`JobTrace`]).
    pub trace: Option<TraceClock>,
}

impl RunContext {
    /// Decides once how the schema reaches the model and builds the shared system message.
    pub fn system_message(spec: &BatchSpec, constrained: bool) -> Option<Message> {
        let mut system = spec.system.clone().unwrap_or_default();
        if let (Some(schema), false) = (&spec.output_schema, constrained) {
            let compact = schema.to_string();
            let pretty = serde_json::to_string_pretty(schema.as_ref()).unwrap_or_default();
            // Never twice: a caller whose system prompt already carries the schema keeps it as is.
            if !system.contains(&compact) && !system.contains(&pretty) {
                if !system.is_empty() {
                    system.push_str("\n\n");
                }
                system.push_str(
                    "When you give your final answer, reply with only a JSON value that conforms to this JSON Schema:\n```json\n",
                );
                system.push_str(&compact);
                system.push_str("\n```");
            }
        }
        (!system.is_empty()).then(|| Message::system(system))
    }

    /// Constrained decoding applies to every turn of a request it is set on, which would stop a
    /// tool-using agent from calling tools; so with tools the schema goes into the prompt instead.
    pub fn use_constrained(spec: &BatchSpec, backend_supports: bool) -> bool {
        spec.output_schema.is_some()
            && backend_supports
            && spec.schema_mode == SchemaMode::Auto
            && spec.tools.is_empty()
    }
}

#[derive(Debug)]
enum Failure {
    Backend(BackendError),
    MaxTurns,
    Validation(String),
    Template(String),
    /// A tool declared `on_error = raise` failed.
    Tool(String),
    Truncated,
}

struct Agent<'a> {
    ctx: &'a RunContext,
    job_id: &'a str,
    state: AgentState,
    ttft: Option<Duration>,
    repaired: bool,
    truncated: bool,
    finish_reason: Option<String>,
    /// A model call was sent (in this run or, for a resumed job, in an earlier one).
    called: bool,
    rng: SplitMix64,
    /// Constrained decoding for this job: off after the server failed a constrained request
    /// deterministically (the schema then goes into the prompt instead).
    constrained: bool,
    /// The batch's `extra_body` with this job's own on top, built once for all its calls.
    extra_body: Option<Arc<Map<String, Value>>>,
    /// The job's span records, when the run is traced.
    trace: Option<Box<JobTrace>>,
    /// When the last model call ended.
    last_call_end: Option<Instant>,
    /// When the call whose tools just ran ended: the next call records the gap.
    tools_asked_at: Option<Instant>,
}

/// The batch's extra body fields with a job's own merged over them (a job's key wins).
fn job_extra_body(
    batch: Option<&Arc<Map<String, Value>>>,
    job: Option<&Arc<Map<String, Value>>>,
) -> Option<Arc<Map<String, Value>>> {
    match (batch, job) {
        (None, None) => None,
        (Some(one), None) | (None, Some(one)) => Some(Arc::clone(one)),
        (Some(batch), Some(job)) => {
            let mut merged = (**batch).clone();
            merged.extend(job.iter().map(|(k, v)| (k.clone(), v.clone())));
            Some(Arc::new(merged))
        }
    }
}

/// The id of one model call: job id, turn, attempt (`review-7-t0-a1`).
pub fn request_id(job_id: &str, turn: u32, attempt: u32) -> String {
    format!("{job_id}-t{turn}-a{attempt}")
}

/// A [`request_id`] split into the call (job id and turn) and its attempt; `None` for another id.
pub fn split_request_id(id: &str) -> Option<(&str, u32)> {
    let (call, attempt) = id.rsplit_once("-a")?;
    let attempt = attempt.parse().ok().filter(|_| attempt.bytes().all(|b| b.is_ascii_digit()))?;
    let (_, turn) = call.rsplit_once("-t")?;
    (!turn.is_empty() && turn.bytes().all(|b| b.is_ascii_digit())).then_some((call, attempt))
}

pub async fn run_job(ctx: Arc<RunContext>, job: Job) -> JobResult {
    let started = Instant::now();
    ctx.stats.jobs_started.fetch_add(1, Relaxed);
    // Left however the job ends: its result, a panic, or the run cancelled.
    let _running = Gauge::enter(&ctx.stats.jobs_running);
    let rng = SplitMix64::new(ctx.seed ^ job.index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut agent = Agent {
        ctx: &ctx,
        job_id: &job.id,
        state: AgentState::default(),
        ttft: None,
        repaired: false,
        truncated: false,
        finish_reason: None,
        called: false,
        rng,
        constrained: ctx.constrained,
        extra_body: job_extra_body(ctx.spec.extra_body.as_ref(), job.extra_body.as_ref()),
        trace: ctx.trace.map(|clock| Box::new(JobTrace { start_ns: clock.ns(started), ..JobTrace::default() })),
        last_call_end: None,
        tools_asked_at: None,
    };
    let outcome = match ctx.spec.agent_timeout {
        Some(limit) => match tokio::time::timeout(limit, agent.run(&job)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Failure::Backend(BackendError::Timeout { which: TimeoutKind::Agent, after: limit })),
        },
        None => agent.run(&job).await,
    };
    let elapsed = started.elapsed();
    ctx.stats.job_latency.record(elapsed);
    let attempts = if agent.called || agent.state.turns > 0 { 1 + agent.state.retries } else { 0 };
    let mut result = JobResult {
        id: job.id.clone(),
        index: job.index,
        ok: false,
        output: None,
        text: None,
        error: None,
        usage: agent.state.usage,
        turns: agent.state.turns,
        tool_calls: agent.state.tool_calls,
        attempts,
        repaired: agent.repaired,
        finish_reason: agent.finish_reason.take(),
        truncated: agent.truncated,
        ttft_s: agent.ttft.map(|d| d.as_secs_f64()),
        total_s: elapsed.as_secs_f64(),
        conversation: None,
        trace: None,
    };
    if let (Some(clock), Some(mut trace)) = (ctx.trace, agent.trace.take()) {
        trace.end_ns = clock.ns(started + elapsed);
        result.trace = Some(trace);
    }
    match outcome {
        Ok((text, output)) => {
            ctx.stats.jobs_ok.fetch_add(1, Relaxed);
            result.ok = true;
            if job.keep_conversation {
                let mut messages = std::mem::take(&mut agent.state.messages);
                messages.push(Message::assistant(text.clone(), Vec::new()));
                result.conversation = Some(messages);
            }
            // Without a schema the answer text is the output; with one, the text is kept beside
            // the validated value (what the model actually wrote, for debugging).
            match output {
                Some(value) => {
                    result.output = Some(value);
                    result.text = Some(text);
                }
                None => result.output = Some(Value::String(text)),
            }
        }
        Err(failure) => {
            let error = match failure {
                Failure::Backend(e) => {
                    JobError { kind: e.kind().into(), message: e.to_string(), retryable: e.retryable(), attempts }
                }
                Failure::MaxTurns => JobError {
                    kind: "max_turns".into(),
                    message: format!("no final answer within max_turns={}", ctx.spec.max_turns),
                    retryable: false,
                    attempts,
                },
                Failure::Validation(message) => {
                    JobError { kind: "validation".into(), message, retryable: false, attempts }
                }
                Failure::Template(message) => {
                    JobError { kind: "bad_input".into(), message, retryable: false, attempts }
                }
                Failure::Tool(message) => JobError { kind: "tool".into(), message, retryable: false, attempts },
                // Not retryable: the same request with the same `max_tokens` is cut off again; a
                // larger limit is the caller's choice (its cost and the server's context are theirs).
                Failure::Truncated => JobError {
                    kind: "truncated".into(),
                    message: format!(
                        "the answer was cut off at max_tokens={} (finish_reason \"length\") before its JSON was \
                         complete; raise max_tokens, or pass accept_truncated=True to accept the repaired JSON",
                        ctx.spec.max_tokens.map_or_else(|| "the server's limit".to_owned(), |n| n.to_string())
                    ),
                    retryable: false,
                    attempts,
                },
            };
            ctx.stats.jobs_failed.fetch_add(1, Relaxed);
            ctx.stats.count_error(&error.kind);
            result.error = Some(error);
        }
    }
    result
}

impl Agent<'_> {
    async fn run(&mut self, job: &Job) -> Result<(String, Option<Value>), Failure> {
        let ctx = self.ctx;
        if let Some(state) = &job.resume {
            self.state = state.clone();
        } else {
            let prompt = ctx.spec.task.render(job.index, &job.input).map_err(|e| Failure::Template(e.to_string()))?;
            self.state.messages.extend(ctx.system.iter().cloned());
            self.state.messages.push(Message::user(prompt));
        }
        // Validation retries replace the failed attempt: the conversation is `base` plus at most one
        // (bad answer, feedback) pair, so it never grows without bound.
        let mut validation_failures = 0u32;
        let mut base_len: Option<usize> = None;
        while self.state.turns < ctx.spec.max_turns {
            if let Some(compactor) = &ctx.compactor {
                let removed = self.compact(compactor).await;
                if let Some(base) = base_len.as_mut() {
                    *base -= removed;
                }
            }
            let response = self.model_call().await?;
            self.state.turns += 1;
            if response.0.tool_calls.is_empty() {
                let cut_off = response.0.finish_reason == "length";
                let text = response.0.content;
                let Some(schema) = &ctx.schema else {
                    self.truncated = cut_off;
                    return Ok((text, None));
                };
                // Repair would close the JSON of a cut-off answer, changing what it says: only on
                // the caller's explicit say-so.
                if cut_off && !ctx.accept_truncated {
                    self.truncated = true;
                    return Err(Failure::Truncated);
                }
                match self.check_output(schema, &text).await {
                    Ok(value) => {
                        if cut_off {
                            self.truncated = true;
                            ctx.stats.truncated_accepted.fetch_add(1, Relaxed);
                        }
                        return Ok((text, Some(value)));
                    }
                    Err(feedback) => {
                        validation_failures += 1;
                        if validation_failures > ctx.spec.validation_retries {
                            return Err(Failure::Validation(feedback));
                        }
                        ctx.stats.validation_retries.fetch_add(1, Relaxed);
                        let base = *base_len.get_or_insert(self.state.messages.len());
                        self.state.messages.truncate(base);
                        self.state.messages.push(Message::assistant(text, Vec::new()));
                        self.state.messages.push(Message::user(format!(
                            "Your answer was not valid: {feedback}\nReply again with only the corrected JSON."
                        )));
                        // A validation retry is not a turn of the agent's work.
                        self.state.turns -= 1;
                        continue;
                    }
                }
            }
            let (response, early) = response;
            self.run_tools(response, early).await?;
            if let Some(sink) = &ctx.turn_sink {
                sink.turn_done(self.job_id, &self.state).await;
            }
        }
        Err(Failure::MaxTurns)
    }

    /// Makes the conversation fit the prompt budget before a model call (see
    /// [`crate::scheduler::compaction`]); returns how many messages a summary took out. Counted
    /// only when a bound on its size says it might not fit.
    async fn compact(&mut self, compactor: &Compactor) -> usize {
        let ctx = self.ctx;
        let tools = ctx.spec.tools.clone();
        if crate::backends::tokenize::upper_bound(&self.state.messages, &tools) <= compactor.budget {
            return 0;
        }
        let before = self.count(compactor).await;
        if before <= compactor.budget {
            return 0;
        }
        let mut now = before;
        let mut removed = 0;
        let keep = compactor.keep_turns;
        if compaction::cut_long_outputs(&mut self.state.messages, compactor.tool_output_chars) {
            now = self.count(compactor).await;
        }
        if now > compactor.budget && compaction::drop_old_outputs(&mut self.state.messages, keep) {
            now = self.count(compactor).await;
        }
        if let Some(summariser) = &compactor.summariser {
            for keep in [keep, 1] {
                if now <= compactor.budget {
                    break;
                }
                let Some(span) = compaction::summary_span(&self.state.messages, keep) else { continue };
                // The summariser reads at most the budget's worth (about 3 characters a token).
                let text = compaction::transcript(&self.state.messages[span.clone()], compactor.budget as usize * 3);
                let Some(summary) = self.summarise(summariser, text).await else {
                    ctx.stats.compaction_failures.fetch_add(1, Relaxed);
                    break;
                };
                removed += compaction::replace_with_summary(&mut self.state.messages, span, &summary);
                ctx.stats.compaction_summaries.fetch_add(1, Relaxed);
                now = self.count(compactor).await;
            }
        }
        if now < before {
            self.state.compactions += 1;
            self.state.compacted_tokens += before - now;
            ctx.stats.compactions.fetch_add(1, Relaxed);
            ctx.stats.compaction_tokens_dropped.fetch_add(before - now, Relaxed);
        }
        if now > compactor.budget {
            // Sent as it is: the server has the last word on what fits.
            ctx.stats.compaction_short.fetch_add(1, Relaxed);
        }
        removed
    }

    async fn count(&self, compactor: &Compactor) -> u64 {
        let count = compactor.tokenizer.count(&self.state.messages, &self.ctx.spec.tools).await;
        let counter = if count.exact { &self.ctx.stats.tokens_counted } else { &self.ctx.stats.tokens_estimated };
        counter.fetch_add(1, Relaxed);
        count.tokens
    }

    /// One summary from the summariser model (retried as model calls are), its usage the job's;
    /// `None` when it could not be had.
    async fn summarise(&mut self, summariser: &compaction::Summariser, transcript: String) -> Option<String> {
        let ctx = self.ctx;
        let remaining = ctx.spec.max_turns.saturating_sub(self.state.turns);
        let mut span = self.call_span(&summariser.model, false, true);
        for attempt in 1..=ctx.spec.max_attempts {
            if let Some((_, span)) = &mut span {
                span.attempts = attempt;
            }
            let request = ChatRequest {
                model: summariser.model.clone(),
                messages: Arc::new(vec![
                    Message::system(compaction::SUMMARY_PROMPT),
                    Message::user(transcript.clone()),
                ]),
                tools: Arc::default(),
                tool_choice: None,
                response_schema: None,
                max_tokens: Some(summariser.max_tokens),
                temperature: ctx.spec.temperature,
                request_id: format!("{}-t{}-compact-a{attempt}", self.job_id, self.state.turns),
                stream: false,
                hints: None,
                text_deltas: false,
                // The job's extra fields are for the run's backend; another server may reject them.
                extra_body: if summariser.shared_backend { self.extra_body.clone() } else { None },
            };
            let permit = if summariser.shared_backend { Some(ctx.slots.acquire(remaining).await) } else { None };
            ctx.stats.compaction_calls.fetch_add(1, Relaxed);
            let outcome = tokio::time::timeout(
                ctx.spec.call_timeout.saturating_add(CALL_TIMEOUT_BACKSTOP),
                summariser.backend.chat(request, None),
            )
            .await;
            drop(permit);
            match outcome {
                Ok(Ok(response)) => {
                    self.state.usage += response.usage;
                    ctx.stats.add_usage(&response.usage);
                    self.end_call_span(span, Ok(&response));
                    let summary = response.content.trim();
                    return (!summary.is_empty()).then(|| summary.to_owned());
                }
                Ok(Err(error)) if error.retryable() && attempt < ctx.spec.max_attempts => {
                    let delay = ctx.retry.delay(attempt, error.retry_after(), self.rng.next_f64());
                    tokio::time::sleep(delay).await;
                }
                Ok(Err(error)) => {
                    self.end_call_span(span, Err(error.kind()));
                    return None;
                }
                Err(_) => {
                    self.end_call_span(span, Err("timeout"));
                    return None;
                }
            }
        }
        None
    }

    /// A model call's span record, started now, when the run is traced.
    fn call_span(&self, model: &str, stream: bool, compaction: bool) -> Option<(Instant, CallSpan)> {
        self.trace.as_ref()?;
        Some((
            Instant::now(),
            CallSpan {
                turn: self.state.turns,
                model: model.to_owned(),
                start_ns: 0,
                end_ns: 0,
                attempts: 0,
                stream,
                compaction,
                ttft: None,
                usage: Usage::default(),
                finish_reason: None,
                error: None,
            },
        ))
    }

    fn end_call_span(&mut self, span: Option<(Instant, CallSpan)>, outcome: Result<&ChatResponse, &str>) {
        let (Some((started, mut span)), Some(clock), Some(trace)) = (span, self.ctx.trace, self.trace.as_mut()) else {
            return;
        };
        span.start_ns = clock.ns(started);
        span.end_ns = clock.ns(Instant::now());
        match outcome {
            Ok(response) => {
                span.ttft = response.ttft.map(|d| d.as_secs_f64());
                span.usage = response.usage;
                span.finish_reason = (!response.finish_reason.is_empty()).then(|| response.finish_reason.clone());
            }
            Err(kind) => span.error = Some(kind.to_owned()),
        }
        trace.calls.push(span);
    }

    /// Extract (and repair) JSON, check it against the schema, then run the Python validator.
    async fn check_output(&mut self, schema: &CompiledSchema, text: &str) -> Result<Value, String> {
        let extracted = extract_json(text).map_err(|e| format!("no JSON value found ({e})"))?;
        if let Err(violations) = schema.validate(&extracted.value) {
            return Err(describe(&violations));
        }
        if extracted.repaired {
            self.repaired = true;
            self.ctx.stats.repaired_outputs.fetch_add(1, Relaxed);
        }
        if let Some(validator) = &self.ctx.validator {
            validator.validate(self.job_id, extracted.value.to_string()).await?;
        }
        Ok(extracted.value)
    }

    /// One model call with retries. The slot is taken per attempt and released before any backoff.
    async fn model_call(&mut self) -> Result<(ChatResponse, EarlyTools), Failure> {
        let ctx = self.ctx;
        let remaining = ctx.spec.max_turns.saturating_sub(self.state.turns);
        let mut attempt = 0u32;
        // Lives across the attempts of this turn: what a failed attempt started from its stream is
        // handed to the retry that asks for the same call, never run a second time.
        let mut early = EarlyTools::default();
        let mut request_faults = 0u32;
        let mut span = self.call_span(&ctx.spec.model, ctx.spec.streams(), false);
        let outcome = loop {
            attempt += 1;
            if let Some((_, span)) = &mut span {
                span.attempts = attempt;
            }
            let request = ChatRequest {
                model: ctx.spec.model.clone(),
                messages: Arc::new(self.state.messages.clone()),
                tools: ctx.spec.tools.clone(),
                tool_choice: None,
                response_schema: if self.constrained { ctx.spec.output_schema.clone() } else { None },
                max_tokens: ctx.spec.max_tokens,
                temperature: ctx.spec.temperature,
                request_id: request_id(self.job_id, self.state.turns, attempt),
                stream: ctx.spec.streams(),
                hints: (ctx.spec.agent_hints || ctx.spec.engine_hints).then(|| AgentHints {
                    priority: -i64::from(remaining),
                    remaining_turns: remaining,
                    expected_output_tokens: ctx.spec.max_tokens,
                    agent: self.job_id.to_owned(),
                    tool_wait_s: if ctx.spec.engine_hints && !ctx.spec.tools.is_empty() {
                        ctx.stats.tool_wait.quantile(0.75)
                    } else {
                        None
                    },
                    next_call_s: if ctx.spec.engine_hints && !ctx.spec.tools.is_empty() {
                        ctx.stats.next_call_gap.predict(remaining)
                    } else {
                        None
                    },
                }),
                text_deltas: false,
                extra_body: self.extra_body.clone(),
            };
            // Agents nearer completion go first (fewer remaining turns = lower urgency value);
            // the semaphore's aging keeps fresh agents from starving.
            if let (Some(engine), Some(ceiling)) = (&ctx.engine, ctx.queue_ceiling) {
                // Requests queued inside the engine cannot be re-prioritised there; hold them here.
                engine.wait_for_room(ceiling).await;
            }
            let permit = ctx.slots.acquire(remaining).await;
            if let Some(asked) = self.tools_asked_at.take() {
                ctx.stats.next_call_gap.record(remaining, asked.elapsed());
            }
            self.called = true;
            ctx.stats.model_calls.fetch_add(1, Relaxed);
            let in_flight = Gauge::enter(&ctx.stats.model_calls_in_flight);
            let started = Instant::now();
            let outcome = self.streamed_call(request, &mut early).await;
            drop(in_flight);
            drop(permit);
            match outcome {
                Ok(response) => {
                    self.last_call_end = Some(Instant::now());
                    ctx.stats.model_latency.record(started.elapsed());
                    if let Some(ttft) = response.ttft {
                        ctx.stats.ttft.record(ttft);
                        self.ttft.get_or_insert(ttft);
                    }
                    self.state.usage += response.usage;
                    ctx.stats.add_usage(&response.usage);
                    if response.finish_reason == "length" {
                        ctx.stats.length_finishes.fetch_add(1, Relaxed);
                    }
                    if !response.finish_reason.is_empty() {
                        self.finish_reason = Some(response.finish_reason.clone());
                    }
                    if ctx.limit.on_success() {
                        ctx.slots.set_capacity(ctx.limit.current());
                    }
                    break Ok((response, early));
                }
                Err(error) => {
                    early.attempt_failed();
                    if error.is_throttle() {
                        ctx.stats.throttled.fetch_add(1, Relaxed);
                        if ctx.limit.on_throttle() {
                            ctx.slots.set_capacity(ctx.limit.current());
                        }
                    }
                    if error.request_at_fault() {
                        // Deterministic: one more try (a server can still be flaky), then the
                        // same request is not sent again. A constrained one is sent with the schema
                        // in the prompt instead.
                        request_faults += 1;
                        let again = request_faults == 1 && matches!(error, BackendError::Server { .. });
                        if !again {
                            if self.constrained && attempt < ctx.spec.max_attempts {
                                self.schema_to_prompt();
                                ctx.stats.schema_fallbacks.fetch_add(1, Relaxed);
                                continue;
                            }
                            break Err(error);
                        }
                    } else if !error.retryable() {
                        break Err(error);
                    }
                    if attempt >= ctx.spec.max_attempts {
                        break Err(error);
                    }
                    ctx.stats.retries.fetch_add(1, Relaxed);
                    self.state.retries += 1;
                    let delay = ctx.retry.delay(attempt, error.retry_after(), self.rng.next_f64());
                    tokio::time::sleep(delay).await;
                }
            }
        };
        match outcome {
            Ok((response, early)) => {
                self.end_call_span(span, Ok(&response));
                Ok((response, early))
            }
            Err(error) => {
                self.end_call_span(span, Err(error.kind()));
                Err(Failure::Backend(error))
            }
        }
    }

    /// Stops asking for constrained decoding for this job and puts the schema instructions into its
    /// system message, as a run against a backend without constrained decoding does.
    fn schema_to_prompt(&mut self) {
        self.constrained = false;
        let Some(Message { content, .. }) = RunContext::system_message(&self.ctx.spec, false) else { return };
        match self.state.messages.first_mut() {
            Some(first) if first.role == Role::System => first.content = content,
            _ => self.state.messages.insert(0, Message::system(content)),
        }
    }

    /// The call itself, starting each tool call as soon as its arguments are complete in the stream.
    async fn streamed_call(&self, request: ChatRequest, early: &mut EarlyTools) -> Result<ChatResponse, BackendError> {
        let ctx = self.ctx;
        let timeout = ctx.spec.call_timeout;
        // Backends enforce `call_timeout` themselves (a fleet learns from it which endpoint stalled);
        // this later deadline only catches one that does not.
        let backstop = timeout.saturating_add(CALL_TIMEOUT_BACKSTOP);
        if !request.stream || ctx.spec.tools.is_empty() {
            return tokio::time::timeout(backstop, ctx.backend.chat(request, None))
                .await
                .map_err(|_| BackendError::Timeout { which: TimeoutKind::Call, after: timeout })?;
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let call = tokio::time::timeout(backstop, ctx.backend.chat(request, Some(tx)));
        tokio::pin!(call);
        let outcome = loop {
            tokio::select! {
                outcome = &mut call => {
                    break outcome.map_err(|_| BackendError::Timeout { which: TimeoutKind::Call, after: timeout }).and_then(|r| r)
                }
                Some(event) = rx.recv() => self.start_early(event, early),
            }
        };
        // Calls announced only as the turn ended (the last one always is) start with the others in
        // `run_tools`: they were not early, and counting them would overstate the overlap.
        if outcome.is_err() {
            // A call that was complete in the stream before it broke starts as it would have had the
            // break come a moment later; whether the retry reuses it must not depend on which of the
            // two the select above happened to see first.
            while let Ok(event) = rx.try_recv() {
                self.start_early(event, early);
            }
        }
        outcome
    }

    fn start_early(&self, event: StreamEvent, early: &mut EarlyTools) {
        let StreamEvent::ToolCallReady(call) = event else { return };
        if early.current.contains_key(&call.id) {
            return;
        }
        // A tool with side effects waits for the complete turn: the stream may still fail.
        let Some(config) = self.ctx.tools.config(&call.name) else { return };
        if config.side_effects {
            return;
        }
        let handle = early.take_carried(&call).unwrap_or_else(|| {
            self.ctx.stats.tools_started_early.fetch_add(1, Relaxed);
            spawn_tool(&self.ctx.tools, &call)
        });
        early.current.insert(call.id.clone(), (call, handle));
    }

    /// Runs every tool call of a turn concurrently (reusing those started from the stream) and
    /// appends the assistant turn and the results, errors included, for the model to see; or fails
    /// the job when a tool declared `on_error = raise` failed.
    async fn run_tools(&mut self, response: ChatResponse, mut early: EarlyTools) -> Result<(), Failure> {
        let calls = response.tool_calls;
        self.ctx.stats.tool_calls.fetch_add(calls.len() as u64, Relaxed);
        self.state.tool_calls += calls.len() as u32;
        // Counted before any call starts: whoever sees a tool running sees its agent waiting.
        let waiting = Gauge::enter(&self.ctx.stats.agents_in_tools);
        let wait_started = Instant::now();
        let handles: Vec<_> =
            calls.iter().map(|call| early.take(call).unwrap_or_else(|| spawn_tool(&self.ctx.tools, call))).collect();
        // What the stream started and the final turn did not ask for is not waited on.
        drop(early);
        let mut results = Vec::with_capacity(calls.len());
        let mut raised = None;
        for (call, handle) in calls.iter().zip(handles) {
            let (text, times) = match handle.await {
                Ok(ToolOutcome { result: Ok(text), started, ended }) => {
                    (text.to_string(), Some((started, ended, false)))
                }
                Ok(ToolOutcome { result: Err(error), started, ended }) => {
                    if raised.is_none() && self.raises(&call.name, &error) {
                        raised = Some(error.to_string());
                    }
                    (format!("Error: {error}"), Some((started, ended, true)))
                }
                Err(join) => (format!("Error: the tool call was interrupted ({join})"), None),
            };
            if let (Some(clock), Some(trace), Some((started, ended, error))) =
                (self.ctx.trace, self.trace.as_mut(), times)
            {
                trace.tools.push(ToolSpan {
                    // The turn of the model call that asked for it (counted once it answered).
                    turn: self.state.turns.saturating_sub(1),
                    name: call.name.clone(),
                    call_id: call.id.clone(),
                    start_ns: clock.ns(started),
                    end_ns: clock.ns(ended),
                    error,
                });
            }
            results.push(text);
        }
        self.ctx.stats.tool_wait.record(wait_started.elapsed());
        self.tools_asked_at = self.last_call_end.take();
        drop(waiting);
        if let Some(message) = raised {
            return Err(Failure::Tool(message));
        }
        self.state.messages.push(Message::assistant(response.content, calls.clone()));
        for (call, text) in calls.iter().zip(results) {
            self.state.messages.push(Message::tool_result(call, text));
        }
        Ok(())
    }

    #[cold]
    fn raises(&self, tool: &str, error: &ToolError) -> bool {
        !matches!(error, ToolError::Unknown { .. })
            && self.ctx.tools.config(tool).is_some_and(|config| config.on_error == OnToolError::Raise)
    }
}

/// A tool call's result, with when it started and when the result was there.
struct ToolOutcome {
    result: Result<Arc<str>, ToolError>,
    started: Instant,
    ended: Instant,
}

type ToolHandle = JoinHandle<ToolOutcome>;

/// Tool calls started from the stream of one turn's model call, kept across that call's retries.
#[derive(Default)]
struct EarlyTools {
    /// Started during the current attempt, by call id.
    current: HashMap<String, (ToolCall, ToolHandle)>,
    /// Started during failed attempts, with (tool name, canonical arguments): a retry that asks
    /// for the same call takes over the execution instead of running the tool again.
    carried: Vec<(String, String, ToolHandle)>,
}

impl EarlyTools {
    fn take(&mut self, call: &ToolCall) -> Option<ToolHandle> {
        match self.current.remove(&call.id) {
            Some((_, handle)) => Some(handle),
            None => self.take_carried(call),
        }
    }

    fn take_carried(&mut self, call: &ToolCall) -> Option<ToolHandle> {
        if self.carried.is_empty() {
            return None;
        }
        let key = canonical_arguments(&call.arguments).ok()?;
        let at = self.carried.iter().position(|(name, k, _)| *name == call.name && *k == key)?;
        Some(self.carried.swap_remove(at).2)
    }

    /// The attempt failed: what it started waits for the retry.
    fn attempt_failed(&mut self) {
        for (_, (call, handle)) in self.current.drain() {
            // Arguments that are not a JSON object were rejected by the pool without running.
            match canonical_arguments(&call.arguments) {
                Ok(key) => self.carried.push((call.name, key, handle)),
                Err(_) => handle.abort(),
            }
        }
    }
}

impl Drop for EarlyTools {
    /// Stops waiting for calls the final turn did not ask for. The executions themselves finish in
    /// the pool (a running tool cannot be stopped half-way); their results are not used.
    fn drop(&mut self) {
        for (_, handle) in self.current.values() {
            handle.abort();
        }
        for (_, _, handle) in &self.carried {
            handle.abort();
        }
    }
}

/// One unit of a gauge for as long as it lives: an agent cancelled mid-wait (timeout, Ctrl-C)
/// leaves the count as surely as one that finishes.
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn enter(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Relaxed);
        Self(gauge)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

fn spawn_tool(pool: &Arc<ToolPool>, call: &ToolCall) -> ToolHandle {
    let pool = pool.clone();
    let name = call.name.clone();
    let arguments = call.arguments.clone();
    let started = Instant::now();
    tokio::spawn(async move {
        let result = pool.call(&name, &arguments).await;
        ToolOutcome { result, started, ended: Instant::now() }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn call(id: &str, name: &str, arguments: &str) -> ToolCall {
        ToolCall { id: id.into(), name: name.into(), arguments: arguments.into() }
    }

    fn finished(text: &'static str) -> ToolHandle {
        let started = Instant::now();
        tokio::spawn(async move { ToolOutcome { result: Ok(Arc::from(text)), started, ended: Instant::now() } })
    }

    #[test]
    fn request_ids_split_into_call_and_attempt() {
        assert_eq!(split_request_id(&request_id("job-a1-t2", 3, 12)), Some(("job-a1-t2-t3", 12)));
        assert_eq!(split_request_id("batchagent-warm-up"), None);
        assert_eq!(split_request_id("x-t-a1"), None);
    }

    #[tokio::test]
    async fn a_failed_attempt_hands_its_calls_to_the_retry_by_tool_and_canonical_arguments() {
        let mut early = EarlyTools::default();
        let first = call("a1", "search", r#"{"q":"x","lang":"en"}"#);
        early.current.insert(first.id.clone(), (first, finished("found")));
        early.attempt_failed();
        assert!(early.current.is_empty());
        // Another tool, or other arguments: not the same call.
        assert!(early.take(&call("b1", "fetch", r#"{"q":"x","lang":"en"}"#)).is_none());
        assert!(early.take(&call("b1", "search", r#"{"q":"y","lang":"en"}"#)).is_none());
        // The same call, spelled differently and under a new id: its execution is taken over, once.
        let taken = early.take(&call("b2", "search", "{ \"lang\": \"en\",\n \"q\": \"x\" }")).unwrap();
        assert_eq!(&*taken.await.unwrap().result.unwrap(), "found");
        assert!(early.take(&call("b3", "search", r#"{"q":"x","lang":"en"}"#)).is_none());
    }

    #[tokio::test]
    async fn a_call_of_the_current_attempt_is_found_by_its_id() {
        let mut early = EarlyTools::default();
        let first = call("c1", "search", r#"{"q":"x"}"#);
        early.current.insert(first.id.clone(), (first, finished("one")));
        assert!(early.take(&call("c2", "search", r#"{"q":"x"}"#)).is_none(), "another id is another call");
        let taken = early.take(&call("c1", "search", r#"{"q":"x"}"#)).unwrap();
        assert_eq!(&*taken.await.unwrap().result.unwrap(), "one");
    }
}
