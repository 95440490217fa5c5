//! The simulator's HTTP server: `OpenAI` (as vLLM serves it), Anthropic and Ollama protocols over one
//! engine model, plus `/metrics` (vLLM names) and `/sim/stats`.
//!
//! Every protocol translates its request into an [`AgentRequest`], renders it into one `ChatML` prompt
//! (Qwen's template, tools in the system block) and tokenizes that, so a system prompt shared by
//! requests of any protocol is a shared token prefix for the engine's prefix cache.

mod anthropic;
mod batches;
pub(crate) mod metrics;
mod ollama;
mod openai;
mod ratelimit;
mod stats;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::behaviour::{self, AgentRequest, Piece, Reply};
use super::config::{BehaviourConfig, SimConfig, SimError};
use super::engine::{Engine, EngineEvent, EngineRequest, Pin};
use super::faults::{Decision, Fault, Faults};
use super::profile::Profile;
use super::tokenizer;
use crate::chat_template::ToolCallFormat;
use crate::conversation::{Message, Role, ToolDef};
use stats::Stats;

pub(crate) struct AppState {
    config: SimConfig,
    engine: Arc<Engine>,
    faults: Faults,
    stats: Stats,
    prompt_cache: anthropic::PromptCacheTable,
    batches: batches::BatchStore,
    /// `rate_limit_rpm` / `rate_limit_tpm`, when either is set.
    limiter: Option<ratelimit::RateLimiter>,
}

/// A running simulator bound to `host:port`.
pub struct SimServer {
    addr: SocketAddr,
    state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Serves `router` on `listener` until the returned sender is used (or dropped); the task ends
/// once serving has stopped. Shared by the simulator and the embedded engine's server.
pub(crate) fn serve_until_shutdown(
    listener: tokio::net::TcpListener,
    router: Router,
) -> (oneshot::Sender<()>, JoinHandle<()>) {
    // Token-by-token SSE frames are tiny writes: without TCP_NODELAY, Nagle's algorithm holds
    // each one back until the client's delayed ACK (~40 ms), which no real server does.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
            let _ = rx.await;
        });
        // Serving ends only on shutdown or a listener failure; neither has anyone left to tell.
        let _ = serve.await;
    });
    (tx, task)
}

/// Base URL of a server bound to `addr`, e.g. `http://127.0.0.1:PORT` (an unspecified bind
/// address is reported as loopback; an IPv6 one in brackets).
pub(crate) fn base_url(addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() { "127.0.0.1".to_owned() } else { addr.ip().to_string() };
    if addr.is_ipv6() && !addr.ip().is_unspecified() {
        format!("http://[{ip}]:{}", addr.port())
    } else {
        format!("http://{ip}:{}", addr.port())
    }
}

impl SimServer {
    /// Bind, start the engine loop and serve. Port 0 takes an ephemeral port (see [`SimServer::url`]).
    pub async fn start(config: SimConfig) -> Result<SimServer, SimError> {
        config.validate()?;
        let mut profile = Profile::resolve(&config.profile)?;
        profile.enable_prefix_caching = profile.enable_prefix_caching && config.prefix_caching;
        profile.kv_eviction = config.kv_eviction.unwrap_or(profile.kv_eviction);
        profile.kv_page_size = config.kv_page_size.or(profile.kv_page_size);
        profile.validate()?;
        let addr = format!("{}:{}", config.host, config.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| SimError::Bind { addr: addr.clone(), source })?;
        let local = listener.local_addr().map_err(|source| SimError::Bind { addr, source })?;
        let engine = Engine::start(profile, config.time_scale)?;
        let state = Arc::new(AppState {
            faults: Faults::new(config.faults.clone(), config.seed),
            stats: Stats::new(config.ttft_window),
            prompt_cache: anthropic::PromptCacheTable::default(),
            batches: batches::BatchStore::default(),
            limiter: ratelimit::RateLimiter::new(config.rate_limit_rpm, config.rate_limit_tpm, config.rate_limit_burst),
            engine,
            config,
        });
        let (shutdown, task) = serve_until_shutdown(listener, router(Arc::clone(&state)));
        Ok(SimServer { addr: local, state, shutdown: Some(shutdown), task: Some(task) })
    }

    /// Base URL, e.g. `http://127.0.0.1:PORT` (an unspecified bind address is reported as loopback).
    pub fn url(&self) -> String {
        base_url(self.addr)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// What `GET /sim/stats` returns.
    pub fn stats(&self) -> Value {
        stats_json(&self.state)
    }

    /// Stop accepting, end the engine loop (open streams end with it) and wait for the server task.
    /// Returns the final stats: nothing is served after this, so they are the last word.
    pub async fn stop(mut self) -> Value {
        self.shutdown_now().await;
        self.stats()
    }

    async fn shutdown_now(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.state.engine.shutdown();
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            // Graceful shutdown waits for open connections; idle keep-alive ones close at once, but a
            // client that holds a stream open must not keep the caller waiting forever.
            if tokio::time::timeout(Duration::from_secs(5), task).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.state.engine.shutdown();
    }
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/tokenize", post(openai::tokenize))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/metrics", get(metrics::handler))
        .route("/v1/messages", post(anthropic::messages))
        .merge(batches::routes())
        .route("/api/chat", post(ollama::chat))
        .route("/api/tags", get(ollama::tags))
        .route(
            "/sim/stats",
            get(|State(s): State<Arc<AppState>>| async move { json_response(StatusCode::OK, &stats_json(&s)) }),
        )
        .layer(middleware::from_fn_with_state(Arc::clone(&state), ratelimit::layer))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), require_key))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), count_route))
        .with_state(state)
}

/// With `api_key` set: 401 unless the request carries the key as a bearer token or `x-api-key`.
/// The answer quotes what was presented, as `OpenAI`'s does, so clients are tested on keeping a
/// server's message out of their logs.
async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(key) = &state.config.api_key else { return next.run(req).await };
    if req.uri().path() == "/sim/stats" {
        return next.run(req).await;
    }
    let headers = req.headers();
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    if presented == Some(key.expose()) {
        return next.run(req).await;
    }
    let message = match presented {
        Some(p) => format!("Incorrect API key provided: {p}"),
        None => "no API key provided".to_owned(),
    };
    json_response(
        StatusCode::UNAUTHORIZED,
        &serde_json::json!({"type": "error", "error": {"message": message, "type": "authentication_error"}}),
    )
}

async fn count_route(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = match req.uri().path() {
        p @ ("/v1/chat/completions"
        | "/v1/completions"
        | "/v1/models"
        | "/tokenize"
        | "/health"
        | "/metrics"
        | "/v1/messages"
        | "/api/chat"
        | "/api/tags"
        | "/sim/stats") => p.to_owned(),
        _ => "other".to_owned(),
    };
    let response = next.run(req).await;
    state.stats.record_status(&route, response.status().as_u16());
    response
}

fn stats_json(state: &AppState) -> Value {
    let engine = state.engine.metrics();
    let mut snapshot = state.stats.snapshot(&state.faults, &engine, &state.config);
    if let Some(fields) = snapshot.as_object_mut() {
        let profile = state.engine.profile();
        // The KV cache now: blocks held (a block shared by hash once) against the blocks in the
        // holders' block tables (what they would hold without sharing).
        fields.insert(
            "kv".into(),
            serde_json::json!({
                "eviction": profile.kv_eviction.as_str(),
                "block_size": profile.block_size,
                "page_size": profile.kv_page_size.unwrap_or(profile.block_size),
                "capacity_blocks": profile.kv_capacity_blocks(),
                "used_tokens": engine.kv_used_tokens,
                "table_tokens": engine.kv_table_tokens,
                "sequences": engine.kv_sequences,
                "evictions": engine.kv_evictions,
            }),
        );
        fields.insert("batches".into(), state.batches.counters());
        if let Some(limiter) = &state.limiter {
            fields.insert("rate_limit".into(), limiter.stats());
        }
    }
    snapshot
}

pub(crate) fn json_response(status: StatusCode, value: &Value) -> Response {
    bytes_response(status, "application/json", Bytes::from(value.to_string()))
}

fn bytes_response(status: StatusCode, content_type: &'static str, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The request's `X-Request-Id`, or a fresh id.
pub(crate) fn request_id(headers: &HeaderMap, state: &AppState) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map_or_else(|| format!("{:032x}", state.stats.next_id()), str::to_owned)
}

/// Qwen2.5's `ChatML` template: tools in the system block, tool calls as `<tool_call>` JSON, tool
/// results as `<tool_response>` in a user turn; ends with the open assistant turn.
pub(crate) fn render_chatml(messages: &[Message], tools: &[ToolDef]) -> String {
    let mut out = String::with_capacity(256 + messages.iter().map(|m| m.content.len() + 32).sum::<usize>());
    let (system, rest) = match messages.first() {
        Some(m) if m.role == Role::System => (Some(m.content.as_str()), &messages[1..]),
        _ => (None, messages),
    };
    if !tools.is_empty() || system.is_some() {
        out.push_str("<|im_start|>system\n");
        out.push_str(system.unwrap_or("You are a helpful assistant."));
        if !tools.is_empty() {
            out.push_str("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>");
            for tool in tools {
                let def = serde_json::json!({"type": "function", "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters}});
                out.push('\n');
                out.push_str(&def.to_string());
            }
            out.push_str("\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>");
        }
        out.push_str("<|im_end|>\n");
    }
    for m in rest {
        match m.role {
            Role::Tool => {
                out.push_str("<|im_start|>user\n<tool_response>\n");
                out.push_str(&m.content);
                out.push_str("\n</tool_response><|im_end|>\n");
            }
            role => {
                out.push_str("<|im_start|>");
                out.push_str(match role {
                    Role::System => "system",
                    Role::User => "user",
                    _ => "assistant",
                });
                out.push('\n');
                out.push_str(&m.content);
                for call in &m.tool_calls {
                    if !out.ends_with('\n') {
                        out.push('\n');
                    }
                    out.push_str("<tool_call>\n{\"name\": ");
                    out.push_str(&Value::String(call.name.clone()).to_string());
                    out.push_str(", \"arguments\": ");
                    out.push_str(&call.arguments);
                    out.push_str("}\n</tool_call>");
                }
                out.push_str("<|im_end|>\n");
            }
        }
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

/// One model call on its way through the engine.
pub(crate) struct Generation {
    pub reply: Reply,
    pub pieces: Vec<Piece>,
    /// Output tokens the engine was asked for: the reply's, or fewer under `max_tokens`.
    pub max_new: usize,
    pub prompt_tokens: usize,
    pub events: mpsc::UnboundedReceiver<EngineEvent>,
}

impl Generation {
    /// `length` when `max_tokens` cut the reply short.
    pub fn truncated(&self) -> bool {
        self.max_new < self.pieces.len()
    }

    /// Output tokens that will be streamed as something (not swallowed markup), and how many tool
    /// calls start among them: where a reset, truncation or malformed frame can land.
    pub fn streamed_pieces(&self) -> (usize, usize) {
        let produced = &self.pieces[..self.max_new.min(self.pieces.len())];
        let visible = produced.iter().filter(|p| !matches!(p, Piece::Silent)).count();
        let calls = produced.iter().filter(|p| matches!(p, Piece::CallStart(_))).count();
        (visible, calls)
    }
}

/// What the engine reported when the call finished.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Finish {
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub ttft: Duration,
    pub total: Duration,
    pub queue_time: Duration,
}

/// Why a request is refused before it reaches the engine (a 400), worded per protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    EmptyPrompt,
    /// The prompt plus the tokens asked for do not fit `limit` (the context, or the KV cache).
    TooLong {
        prompt: usize,
        completion: usize,
        limit: usize,
    },
}

impl Refusal {
    /// vLLM's words (also used for Ollama's endpoints).
    pub(crate) fn vllm(self) -> String {
        match self {
            Self::EmptyPrompt => "The prompt is empty.".to_owned(),
            Self::TooLong { prompt, completion, limit } => format!(
                "This model's maximum context length is {limit} tokens. However, you requested {} tokens ({prompt} in the messages, {completion} in the completion). Please reduce the length of the messages or completion.",
                prompt + completion
            ),
        }
    }

    /// Anthropic's words.
    pub(crate) fn anthropic(self) -> String {
        match self {
            Self::EmptyPrompt => "messages: at least one message is required".to_owned(),
            Self::TooLong { prompt, completion, limit } => {
                format!("prompt is too long: {} tokens > {limit} maximum", prompt + completion)
            }
        }
    }
}

/// Decide the reply and submit the prompt. `prompt` is the engine's view: the rendered chat, or a
/// raw completion prompt. Refused when the prompt and the tokens asked for exceed the context
/// (`max_model_len`) or can never fit the KV cache.
pub(crate) fn generate(
    state: &AppState,
    req: &AgentRequest,
    behaviour: &BehaviourConfig,
    prompt: &str,
    max_tokens: Option<u32>,
) -> Result<Generation, Refusal> {
    generate_pinned(state, req, behaviour, prompt, max_tokens, None, PinUnless::Never)
}

/// When a hinted request's blocks are not pinned after all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PinUnless {
    /// A chat turn that calls no tool: the agent is done (its blocks are not expected back).
    NoToolCalls,
    /// Never: a server reads no tool calls out of a raw completion; the client's word is taken.
    Never,
}

/// The client's tool-wait hint, `"batchagent": {"agent": "<id>", "tool_wait_s": <seconds>}`: when
/// the reply ends in tool calls, the request's KV blocks are kept for the agent for twice the wait
/// (in simulated time, which the tool wait is scaled into), at most `kv_pin_ttl`, and expected back
/// after the wait (their eviction order under `kv_eviction=next_use`). When the hint carries
/// `"next_call_s"` (seconds from the reply's end to the agent's next request), that is the wait.
/// `None` without the field.
pub(crate) fn tool_wait_pin(state: &AppState, body: &Value) -> Result<Option<Pin>, String> {
    let Some(hint) = body.get("batchagent").filter(|v| !v.is_null()) else { return Ok(None) };
    let seconds = |field: &str| hint.get(field).and_then(Value::as_f64).filter(|w| w.is_finite() && *w >= 0.0);
    let agent = hint.get("agent").and_then(Value::as_str).filter(|a| !a.is_empty());
    let next_call = hint.get("next_call_s").map(|_| seconds("next_call_s"));
    let (Some(agent), Some(wait), None | Some(Some(_))) = (agent, seconds("tool_wait_s"), next_call) else {
        return Err("batchagent: expected {\"agent\": a non-empty string, \"tool_wait_s\": seconds >= 0, \
                    optionally \"next_call_s\": seconds >= 0}"
            .to_owned());
    };
    let scale = state.engine.time_scale();
    // Under time scale 0 the engine never waits for real time: only the TTL bounds the pin.
    let sim = |s: f64| {
        if scale > 0.0 {
            Duration::try_from_secs_f64(s / scale).unwrap_or(Duration::MAX)
        } else {
            Duration::MAX
        }
    };
    let ttl = Duration::try_from_secs_f64(state.config.kv_pin_ttl).unwrap_or(Duration::MAX);
    let wait = next_call.flatten().unwrap_or(wait);
    Ok(Some(Pin::for_tool_wait(agent.to_owned(), sim(wait), ttl)))
}

/// [`generate`], with the request's blocks pinned for its agent after it finishes (see
/// [`PinUnless`]).
pub(crate) fn generate_pinned(
    state: &AppState,
    req: &AgentRequest,
    behaviour: &BehaviourConfig,
    prompt: &str,
    max_tokens: Option<u32>,
    pin: Option<Pin>,
    unless: PinUnless,
) -> Result<Generation, Refusal> {
    let reply = behaviour::reply(behaviour, state.config.seed, req);
    let pieces = behaviour::pieces(&reply);
    submit(state, reply, pieces, prompt, max_tokens, pin, unless)
}

/// A raw completion's reply: the text the model writes, its tool calls in `format` (servers parse
/// no tool calls on `/completions`, so their markup is text like the rest); a hinted request's
/// blocks are pinned as the client says (a server does not read the text for calls).
pub(crate) fn generate_text(
    state: &AppState,
    req: &AgentRequest,
    behaviour: &BehaviourConfig,
    prompt: &str,
    max_tokens: Option<u32>,
    format: ToolCallFormat,
    pin: Option<Pin>,
) -> Result<Generation, Refusal> {
    let reply = behaviour::reply(behaviour, state.config.seed, req);
    let text = reply_text(&reply, format);
    let pieces = tokenizer::pieces(&text).into_iter().map(|p| Piece::Text(p.to_owned())).collect();
    submit(state, reply, pieces, prompt, max_tokens, pin, PinUnless::Never)
}

/// The reply as one text: the content, then each call as `format` writes it (after a newline in the
/// Hermes form; Llama 3.1's form is the calls alone, `;`-joined).
fn reply_text(reply: &Reply, format: ToolCallFormat) -> String {
    let calls = reply.tool_calls.iter().map(|c| format.write(&c.name, &c.arguments));
    match format {
        ToolCallFormat::LlamaJson if !reply.tool_calls.is_empty() => calls.collect::<Vec<_>>().join("; "),
        _ => {
            let mut text = reply.content.clone();
            for call in calls {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&call);
            }
            text
        }
    }
}

/// The request's reply, as `pieces`, into the engine.
fn submit(
    state: &AppState,
    reply: Reply,
    pieces: Vec<Piece>,
    prompt: &str,
    max_tokens: Option<u32>,
    pin: Option<Pin>,
    unless: PinUnless,
) -> Result<Generation, Refusal> {
    let max_new = max_tokens.map_or(pieces.len(), |m| pieces.len().min(m as usize));
    let tokens = tokenizer::tokenize(prompt);
    let prompt_tokens = tokens.len();
    // Every request produces at least one token on a real engine; an empty reply is one EOS token.
    let max_new_tokens = max_new.max(1);
    let profile = state.engine.profile();
    let capacity = profile.kv_capacity_blocks() * profile.block_size;
    if prompt_tokens == 0 {
        return Err(Refusal::EmptyPrompt);
    }
    if let Some(limit) = state.config.max_model_len {
        // As vLLM: the prompt plus the `max_tokens` asked for (one token when not given) must fit.
        let completion = max_tokens.map_or(1, |m| m as usize);
        if prompt_tokens + completion > limit as usize {
            return Err(Refusal::TooLong { prompt: prompt_tokens, completion, limit: limit as usize });
        }
    }
    if prompt_tokens + max_new_tokens > capacity {
        return Err(Refusal::TooLong { prompt: prompt_tokens, completion: max_new_tokens, limit: capacity });
    }
    // Only a chat turn that ends in tool calls has a return to wait for; the agent's other turns
    // still take its pin over, and their blocks are not expected back.
    let done = unless == PinUnless::NoToolCalls && reply.tool_calls.is_empty();
    let pin = pin.map(|p| if done { Pin { hold: Duration::ZERO, return_after: None, ..p } } else { p });
    let events = state.engine.submit(EngineRequest { prompt: tokens, max_new_tokens, pin, ..EngineRequest::default() });
    Ok(Generation { reply, pieces, max_new, prompt_tokens, events })
}

/// Wait for the call to finish; `None` if the engine stopped first.
pub(crate) async fn finish(state: &AppState, generation: &mut Generation) -> Option<Finish> {
    while let Some(event) = generation.events.recv().await {
        if let Some(f) = on_event(state, &event) {
            return Some(f);
        }
    }
    None
}

/// Book-keeping for an engine event; the `Finish` when it is the last one.
pub(crate) fn on_event(state: &AppState, event: &EngineEvent) -> Option<Finish> {
    match *event {
        EngineEvent::Finished { prompt_tokens, cached_tokens, completion_tokens, queue_time, ttft, total, .. } => {
            state.stats.record_finish(prompt_tokens, cached_tokens, completion_tokens, ttft);
            Some(Finish { prompt_tokens, cached_tokens, completion_tokens, ttft, total, queue_time })
        }
        _ => None,
    }
}

/// The text a cut-short reply actually produced (what a server returns when it cannot parse the
/// partial tool-call markup): the content tokens plus the raw markup tokens.
pub(crate) fn partial_text(generation: &Generation) -> String {
    let mut raw = generation.reply.content.clone();
    for call in &generation.reply.tool_calls {
        raw.push_str("<tool_call>\n{\"name\": ");
        raw.push_str(&Value::String(call.name.clone()).to_string());
        raw.push_str(", \"arguments\": ");
        raw.push_str(&call.arguments);
        raw.push_str("}\n</tool_call>");
    }
    tokenizer::pieces(&raw).into_iter().take(generation.max_new).collect()
}

/// The protocol-specific parts of an injected HTTP error.
pub(crate) struct ErrorShape {
    pub status: StatusCode,
    pub body: Value,
}

/// Sleep for a slow first byte, then the HTTP error of a 429/500/503 fault (`None` otherwise).
pub(crate) async fn http_fault(
    state: &AppState,
    decision: &Decision,
    shape: impl Fn(Fault) -> Option<ErrorShape>,
) -> Option<Response> {
    if let Some(delay) = decision.slow_first_byte {
        tokio::time::sleep(delay).await;
    }
    let fault = decision.fault?;
    let ErrorShape { status, body } = shape(fault)?;
    let mut response = json_response(status, &body);
    if fault == Fault::RateLimited {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(state.config.faults.retry_after));
    }
    Some(response)
}

/// A complete (non-streamed) JSON body, damaged as the decision says.
pub(crate) fn faulty_body(decision: &Decision, status: StatusCode, value: &Value) -> Response {
    let body = value.to_string().into_bytes();
    let cut = body.len() * decision.cut_permille as usize / 1000;
    match decision.fault {
        Some(Fault::Reset) => {
            let head = Bytes::copy_from_slice(&body[..cut]);
            let chunks: Vec<Result<Bytes, io::Error>> =
                vec![Ok(head), Err(io::Error::new(io::ErrorKind::ConnectionReset, "simulated connection reset"))];
            let mut response = Response::new(Body::from_stream(futures_util::stream::iter(chunks)));
            *response.status_mut() = status;
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Some(Fault::Truncate) => bytes_response(status, "application/json", Bytes::copy_from_slice(&body[..cut])),
        Some(Fault::Malformed) => {
            let mut damaged = body[..cut].to_vec();
            damaged.extend_from_slice(b"\x00<html>upstream error</html>");
            bytes_response(status, "application/json", Bytes::from(damaged))
        }
        _ => bytes_response(status, "application/json", Bytes::from(body)),
    }
}

/// Frames of a streamed response, damaged as the decision says: after `cut` frames a reset aborts
/// the connection, a truncation ends the body cleanly, a malformed fault garbles that one frame.
pub(crate) struct FrameSink {
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
    fault: Option<Fault>,
    cut: usize,
    sent: usize,
    closed: bool,
}

impl FrameSink {
    /// A sink and the streaming response body it feeds. `expected_frames` sizes where a fault hits.
    pub fn new(decision: &Decision, expected_frames: usize) -> (FrameSink, Body) {
        let (tx, rx) = mpsc::channel::<Result<Bytes, io::Error>>(64);
        let cut = (expected_frames * decision.cut_permille as usize / 1000).max(1);
        let fault = decision.fault.filter(|f| matches!(f, Fault::Reset | Fault::Truncate | Fault::Malformed));
        let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }));
        (FrameSink { tx, fault, cut, sent: 0, closed: false }, body)
    }

    /// Send one frame; `false` once nothing more should be produced (client gone, or cut).
    pub async fn send(&mut self, frame: impl Into<Bytes>) -> bool {
        if self.closed {
            return false;
        }
        let mut frame: Bytes = frame.into();
        if self.sent == self.cut {
            match self.fault {
                Some(Fault::Reset) => {
                    let _ = self
                        .tx
                        .send(Err(io::Error::new(io::ErrorKind::ConnectionReset, "simulated connection reset")))
                        .await;
                    self.closed = true;
                    return false;
                }
                Some(Fault::Truncate) => {
                    self.closed = true;
                    return false;
                }
                Some(Fault::Malformed) => {
                    let text = String::from_utf8_lossy(&frame);
                    let garbled = match text.find('{') {
                        Some(at) => format!("{}{{\"id\": \"garbled\", \"choices\": [{{]\n\n", &text[..at]),
                        None => "data: {not json\n\n".to_owned(),
                    };
                    frame = Bytes::from(garbled);
                }
                _ => {}
            }
        }
        self.sent += 1;
        if self.tx.send(Ok(frame)).await.is_err() {
            self.closed = true;
            return false;
        }
        true
    }
}

/// A streamed response with the given content type around `body`.
pub(crate) fn stream_response(content_type: &'static str, body: Body) -> Response {
    let mut response = Response::new(body);
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `data: {json}\n\n`
pub(crate) fn sse_data(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// `event: NAME\ndata: {json}\n\n`
pub(crate) fn sse_event(name: &str, value: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {value}\n\n"))
}

/// Parse a JSON request body; the error text names what is wrong.
pub(crate) fn parse_body(body: &[u8]) -> Result<Value, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("request body is not valid JSON: {e}"))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err("request body must be a JSON object".to_owned())
    }
}

/// The behaviour for this request: the server's, with the body's `"sim": {...}` applied.
pub(crate) fn request_behaviour(state: &AppState, body: &Value) -> Result<BehaviourConfig, String> {
    match body.get("sim") {
        None | Some(Value::Null) => Ok(state.config.behaviour.clone()),
        Some(overrides) => behaviour::with_overrides(&state.config.behaviour, overrides).map_err(|e| e.to_string()),
    }
}

/// Tools in the `OpenAI` shape (`{"type": "function", "function": {...}}`), as `OpenAI` and Ollama
/// clients send them.
pub(crate) fn openai_tools(body: &Value) -> Result<Vec<ToolDef>, String> {
    let Some(tools) = body.get("tools").filter(|t| !t.is_null()) else { return Ok(Vec::new()) };
    let tools = tools.as_array().ok_or("`tools` must be an array")?;
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let f = t.get("function").ok_or_else(|| format!("tools[{i}].function is missing"))?;
            let name =
                f.get("name").and_then(Value::as_str).ok_or_else(|| format!("tools[{i}].function.name is missing"))?;
            Ok(ToolDef {
                name: name.to_owned(),
                description: f.get("description").and_then(Value::as_str).unwrap_or_default().to_owned(),
                parameters: f
                    .get("parameters")
                    .cloned()
                    .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
            })
        })
        .collect()
}

/// RFC 3339 UTC timestamp with nanoseconds, as Ollama writes `created_at`.
pub(crate) fn rfc3339_now() -> String {
    rfc3339_at(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default())
}

/// RFC 3339 UTC timestamp of a time given as the duration since the Unix epoch.
pub(crate) fn rfc3339_at(now: Duration) -> String {
    let secs = now.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (year, month, day) = crate::limits::headers::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::ToolCall;

    #[test]
    fn chatml_shares_prefixes_across_turns() {
        let tools = vec![ToolDef {
            name: "f".into(),
            description: "d".into(),
            parameters: serde_json::json!({"type": "object"}),
        }];
        let mut msgs = vec![Message::system("You are terse."), Message::user("hi")];
        let first = render_chatml(&msgs, &tools);
        assert!(first.starts_with("<|im_start|>system\nYou are terse.\n\n# Tools"));
        assert!(first.ends_with("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"));
        let call = ToolCall { id: "c".into(), name: "f".into(), arguments: "{\"a\":1}".into() };
        msgs.push(Message::assistant("", vec![call.clone()]));
        msgs.push(Message::tool_result(&call, "42"));
        let second = render_chatml(&msgs, &tools);
        assert!(second.starts_with(&first));
        assert!(second.contains("<tool_response>\n42\n</tool_response>"));
        let (a, b) = (tokenizer::tokenize(&first), tokenizer::tokenize(&second));
        assert_eq!(&b[..a.len()], a.as_slice());
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 30, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T");
    }
}
