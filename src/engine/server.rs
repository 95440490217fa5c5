//! The embedded engine served over HTTP as vLLM serves a model: `/v1/chat/completions` (the model's
//! chat template, tools), `/v1/completions` (a prompt or a list of prompts, as text or token ids,
//! `echo`), `n` choices per prompt, streaming (SSE, `stream_options.include_usage`), usage with
//! `prompt_tokens_details.cached_tokens`, `/v1/models` (with `max_model_len`), `/health`,
//! `/metrics` (vLLM's names, the simulator's renderer with the engine's own series under
//! `batchagent:`), `stop` strings with `stop_reason`, output logprobs (chat's `logprobs` and
//! `top_logprobs`, completions' `logprobs`), and vLLM's sampling extensions `ignore_eos`,
//! `min_tokens`, `top_k`, `stop_token_ids`, `include_stop_str_in_output`.
//!
//! Text goes through a [`TextCodec`] (the model directory's tokenizer, in Python), on blocking
//! threads: at arrival to tokenize, and as tokens come out to detokenize incrementally.

// A request's checks fail with the HTTP response to send: made once per refused request, never on
// the path of a served one, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use futures_util::future::{join_all, FutureExt, Shared};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::local::LocalEngine;
use super::scheduler::{EndSignal, EngineEvent, EngineRequest, Pin, Sampling, TokenLogprobs};
use super::stop::StopStrings;
use crate::chat_template::{StreamPiece, ToolCallFormat, ToolCallStream};
use crate::sim::server::metrics::{render as render_metrics, CacheConfig, Renderer};

/// The model's tokenizer. Calls may block (they take the GIL); the server makes them from blocking
/// threads.
pub trait TextCodec: Send + Sync + 'static {
    /// The prompt of a chat request (its JSON body as sent, so objects keep their key order):
    /// `messages`, and `tools` when `with_tools`, through the model's chat template.
    fn encode_chat(&self, body_json: &str, with_tools: bool) -> Result<Vec<u32>, String>;
    fn encode(&self, text: &str) -> Result<Vec<u32>, String>;
    /// Incremental detokenization: the text `ids[read..]` adds, and the next `(prefix, read)`; no
    /// token before `prefix` is read. Text that ends in an incomplete character waits for the next
    /// token, unless `last`.
    fn detokenize(&self, ids: &[u32], prefix: usize, read: usize, last: bool)
        -> Result<(String, usize, usize), String>;
    /// Each token's own text, as logprobs show it (special tokens as written).
    fn token_texts(&self, ids: &[u32]) -> Result<Vec<String>, String>;
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    /// The name clients send as `model` (vLLM: the path given, unless `--served-model-name`).
    pub model: String,
    /// Prompt plus output tokens one request may reach.
    pub max_model_len: usize,
    /// Tokens that end an output unless `ignore_eos` (the tokenizer's EOS ids).
    pub eos_token_ids: Vec<u32>,
    /// The longest a tool-wait hint keeps an agent's KV blocks pinned (`--kv-pin-ttl`).
    pub kv_pin_ttl: Duration,
    /// The form chat answers' tool calls are read in (`--tool-call-parser`, by default the one the
    /// model's chat template asks for).
    pub tool_call_parser: ToolCallFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
}

struct AppState {
    engine: Arc<LocalEngine>,
    codec: Arc<dyn TextCodec>,
    options: ServeOptions,
    next_id: std::sync::atomic::AtomicU64,
    finish_reasons: Mutex<BTreeMap<&'static str, u64>>,
}

/// A running server; `stop` ends it (and the engine).
pub struct EngineServer {
    addr: SocketAddr,
    state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl EngineServer {
    /// Binds and serves `engine` on the current tokio runtime.
    pub async fn start(
        engine: Arc<LocalEngine>,
        codec: Arc<dyn TextCodec>,
        options: ServeOptions,
    ) -> Result<Self, ServeError> {
        let addr = format!("{}:{}", options.host, options.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| ServeError::Bind { addr: addr.clone(), source })?;
        let local = listener.local_addr().map_err(|source| ServeError::Bind { addr, source })?;
        let state = Arc::new(AppState {
            engine,
            codec,
            options,
            next_id: std::sync::atomic::AtomicU64::new(0),
            finish_reasons: Mutex::new(BTreeMap::new()),
        });
        let router = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/batchagent/done", post(agent_done))
            .route("/v1/models", get(models))
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .with_state(Arc::clone(&state));
        let (shutdown, task) = crate::sim::server::serve_until_shutdown(listener, router);
        Ok(Self { addr: local, state, shutdown: Some(shutdown), task: Some(task) })
    }

    pub fn url(&self) -> String {
        crate::sim::server::base_url(self.addr)
    }

    /// Stops accepting and serving, then stops the engine (call it where the engine's executor can
    /// run: without the GIL).
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let engine = Arc::clone(&self.state.engine);
        // Open streams end when the engine's receivers close.
        let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for EngineServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    let mut r = Response::new(Body::from(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, message: &str, param: Option<&str>) -> Response {
    let kind = match status.as_u16() {
        400 => "BadRequestError",
        404 => "NotFoundError",
        503 => "ServiceUnavailableError",
        _ => "InternalServerError",
    };
    json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": param, "code": status.as_u16()}}),
    )
}

fn bad(message: impl AsRef<str>) -> Response {
    error(StatusCode::BAD_REQUEST, message.as_ref(), None)
}

fn bad_param(message: impl AsRef<str>, param: &str) -> Response {
    error(StatusCode::BAD_REQUEST, message.as_ref(), Some(param))
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    let o = &state.options;
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": [{
            "id": o.model, "object": "model", "created": unix_now(), "owned_by": "batchagent", "root": o.model,
            "parent": null, "max_model_len": o.max_model_len, "permission": []
        }]}),
    )
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.engine.failure() {
        None => Response::new(Body::empty()),
        Some(why) => error(StatusCode::SERVICE_UNAVAILABLE, &why, None),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let config = state.engine.config();
    let cache = CacheConfig {
        block_size: config.block_size,
        num_gpu_blocks: config.kv_capacity_blocks,
        prefix_caching: config.enable_prefix_caching,
    };
    let reasons = state.finish_reasons.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let text = render_metrics(&state.options.model, &state.engine.metrics(), cache, &reasons, Renderer::Engine);
    let mut r = Response::new(Body::from(text));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What a request asks of the engine, besides its prompt.
struct Params {
    max_tokens: Option<usize>,
    sampling: Sampling,
    /// EOS (unless `ignore_eos`) and `stop_token_ids`.
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    min_tokens: usize,
    /// `stop` strings, and vLLM's `include_stop_str_in_output`.
    stop: Vec<String>,
    include_stop: bool,
    /// Sequences per prompt (`n`).
    n: usize,
    stream: bool,
    include_usage: bool,
}

/// The most sequences one prompt may ask for (`n`).
const MAX_N: u64 = 128;

/// The most top tokens a request's logprobs may list (vLLM's default `--max-logprobs`).
const MAX_LOGPROBS: u64 = 20;

/// How many top tokens each output token's logprobs list, `None` when the request asks for no
/// logprobs: chat's `logprobs` (a boolean) and `top_logprobs`, completions' `logprobs` (a count).
fn parse_logprobs(body: &Value, chat: bool) -> Result<Option<u32>, Response> {
    let count = |key: &str| match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(k) if k <= MAX_LOGPROBS => Ok(Some(k as u32)),
            _ => Err(bad_param(format!("`{key}` must be an integer from 0 to {MAX_LOGPROBS}, not {v}"), key)),
        },
    };
    if !chat {
        return count("logprobs");
    }
    let on = match body.get("logprobs") {
        None | Some(Value::Null) => false,
        Some(v) => v.as_bool().ok_or_else(|| bad_param("`logprobs` must be a boolean", "logprobs"))?,
    };
    match count("top_logprobs")? {
        Some(_) if !on => Err(bad_param("when using `top_logprobs`, `logprobs` must be set to true", "top_logprobs")),
        top => Ok(on.then(|| top.unwrap_or(0))),
    }
}

fn uint(body: &Value, key: &str) -> Result<Option<u64>, Response> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| bad(format!("`{key}` must be a non-negative integer"))),
    }
}

fn float(body: &Value, key: &str, default: f64) -> Result<f64, Response> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| bad(format!("`{key}` must be a number"))),
    }
}

fn parse_params(state: &AppState, body: &Value, max_key: &str) -> Result<Params, Response> {
    let model = body.get("model").and_then(Value::as_str).unwrap_or_default();
    if model != state.options.model {
        return Err(error(StatusCode::NOT_FOUND, &format!("The model `{model}` does not exist."), Some("model")));
    }
    let n = match body.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
            Some(n) if (1..=MAX_N as usize).contains(&n) => n,
            _ => return Err(bad_param(format!("`n` must be an integer from 1 to {MAX_N}, not {v}"), "n")),
        },
    };
    let max_tokens =
        uint(body, max_key)?.or(uint(body, "max_tokens")?).map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let temperature = float(body, "temperature", 1.0)?;
    let top_p = float(body, "top_p", 1.0)?;
    // vLLM: top_k -1 (or 0) means all tokens.
    let top_k = match body.get("top_k") {
        None | Some(Value::Null) => 0,
        Some(v) => match v.as_i64() {
            Some(k) if k <= 0 => 0,
            Some(k) => u32::try_from(k).unwrap_or(u32::MAX),
            None => return Err(bad("`top_k` must be an integer")),
        },
    };
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad(format!("temperature {temperature} is not in [0, 2]")));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(format!("top_p {top_p} is not in (0, 1]")));
    }
    let seed = match body.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_i64().ok_or_else(|| bad("`seed` must be an integer"))? as u64),
    };
    let mut stop_token_ids = Vec::new();
    let ignore_eos = body.get("ignore_eos").and_then(Value::as_bool) == Some(true);
    if !ignore_eos {
        stop_token_ids.extend(&state.options.eos_token_ids);
    }
    if let Some(ids) = body.get("stop_token_ids").filter(|v| !v.is_null()) {
        let ids = ids.as_array().ok_or_else(|| bad("`stop_token_ids` must be a list of token ids"))?;
        for id in ids {
            let id =
                id.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| bad("`stop_token_ids`: a bad id"))?;
            stop_token_ids.push(id);
        }
    }
    // Refused rather than answered with `"prompt_logprobs": null`, which a client would read as none.
    if !matches!(body.get("prompt_logprobs"), None | Some(Value::Null)) {
        return Err(bad_param("`prompt_logprobs`: this server computes no prompt logprobs", "prompt_logprobs"));
    }
    // A string or a list of them; vLLM takes lists longer than OpenAI's 4 (the request body's size
    // bounds them).
    let stop = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad_param("`stop` must be a string or a list of strings", "stop"))?,
        Some(_) => return Err(bad_param("`stop` must be a string or a list of strings", "stop")),
    };
    if stop.iter().any(String::is_empty) {
        return Err(bad_param("`stop` cannot contain an empty string", "stop"));
    }
    let include_stop = match body.get("include_stop_str_in_output") {
        None | Some(Value::Null) => false,
        Some(v) => v.as_bool().ok_or_else(|| bad("`include_stop_str_in_output` must be a boolean"))?,
    };
    Ok(Params {
        max_tokens,
        sampling: Sampling { temperature, top_p, top_k, seed, logprobs: None },
        stop_token_ids,
        ignore_eos,
        stop,
        include_stop,
        n,
        min_tokens: usize::try_from(uint(body, "min_tokens")?.unwrap_or(0)).unwrap_or(usize::MAX),
        stream: body.get("stream").and_then(Value::as_bool) == Some(true),
        include_usage: body.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true),
    })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, Response> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(bad(e)),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, &format!("the tokenizer failed: {e}"), None)),
    }
}

/// One sequence's submission: the request to the engine, after checking its length.
fn request(state: &AppState, prompt: Vec<u32>, p: &Params) -> Result<EngineRequest, Response> {
    let limit = state.options.max_model_len;
    if prompt.is_empty() {
        return Err(bad("the prompt is empty"));
    }
    let room = limit.saturating_sub(prompt.len());
    let max_new = p.max_tokens.unwrap_or(room);
    if prompt.len() + max_new > limit {
        return Err(bad(format!(
            "This model's maximum context length is {limit} tokens. However, you requested {} tokens ({} in the \
             messages, {max_new} in the completion).",
            prompt.len() + max_new,
            prompt.len()
        )));
    }
    Ok(EngineRequest {
        prompt,
        max_new_tokens: max_new,
        stop_token_ids: p.stop_token_ids.clone(),
        min_tokens: p.min_tokens,
        sampling: p.sampling,
        ..EngineRequest::default()
    })
}

/// One sequence of a request, to run through [`drive`].
struct Sequence {
    submission: Submission,
    /// Set on a prompt's first sequence when others wait for its first token.
    first_token: Option<oneshot::Sender<()>>,
    /// Its prompt's tokens (the outcome's until the engine reports them).
    prompt_tokens: usize,
    /// Ends it in the engine when a stop string comes out.
    end: Option<EndSignal>,
}

enum Submission {
    Now(mpsc::UnboundedReceiver<EngineEvent>),
    /// Submitted once the gate opens (or its sender is dropped).
    After(Shared<oneshot::Receiver<()>>, Box<EngineRequest>),
}

/// Submits the `n` sequences of one prompt, each an engine request of its own (vLLM's parallel
/// sampling: a seed becomes `seed + i` for the `i`-th). With prefix caching the first goes at once
/// and the others at its first token: its prompt's full blocks are computed and cached by hash by
/// then, so they take them instead of computing them again (a sequence admitted in the same step
/// as the first would find them still being computed).
fn submit(state: &AppState, request: &EngineRequest, n: usize) -> Vec<Sequence> {
    let prompt_tokens = request.prompt.len();
    // Each sequence its own end signal: a stop string ends one choice, not its siblings.
    let nth = |i: usize| {
        let mut r = request.clone();
        r.sampling.seed = r.sampling.seed.map(|s| s.wrapping_add(i as u64));
        r.end = Some(EndSignal::default());
        r
    };
    let sequence = |request: EngineRequest, submission: Option<Shared<oneshot::Receiver<()>>>| {
        let end = request.end.clone();
        let submission = match submission {
            None => Submission::Now(state.engine.submit(request)),
            Some(gate) => Submission::After(gate, Box::new(request)),
        };
        Sequence { submission, first_token: None, prompt_tokens, end }
    };
    if n == 1 || !state.engine.config().enable_prefix_caching {
        return (0..n).map(|i| sequence(nth(i), None)).collect();
    }
    let (tx, gate) = oneshot::channel();
    let gate = gate.shared();
    let first = Sequence { first_token: Some(tx), ..sequence(nth(0), None) };
    std::iter::once(first).chain((1..n).map(|i| sequence(nth(i), Some(gate.clone())))).collect()
}

impl Sequence {
    async fn run(
        self,
        state: Arc<AppState>,
        p: &Params,
        on_text: impl FnMut(String, &Outcome) -> bool,
        stream: bool,
    ) -> Result<Outcome, Response> {
        let rx = match self.submission {
            Submission::Now(rx) => rx,
            Submission::After(gate, request) => {
                let _ = gate.await;
                state.engine.submit(*request)
            }
        };
        drive(state, rx, p, self.prompt_tokens, on_text, stream, self.first_token, self.end).await
    }
}

/// Usage over a request's outcomes, `per_prompt` sequences of each prompt in order: a prompt's
/// tokens (and its cached ones, its first sequence's) count once, the output tokens of every
/// sequence.
fn total_usage<'a>(outs: impl IntoIterator<Item = &'a Outcome>, per_prompt: usize) -> Value {
    let (mut prompt, mut cached, mut completion) = (0, 0, 0);
    for (i, out) in outs.into_iter().enumerate() {
        if i % per_prompt.max(1) == 0 {
            prompt += out.prompt_tokens;
            cached += out.cached_tokens;
        }
        completion += out.ids.len();
    }
    usage(prompt, cached, completion)
}

/// Why a sequence ended.
#[derive(Debug, Clone, Default, PartialEq)]
enum Finish {
    /// `max_tokens`.
    #[default]
    Length,
    /// A stop token (EOS or one of `stop_token_ids`): the last output token.
    Token(u32),
    /// A stop string: the engine ended the sequence as the string came out.
    Text(String),
}

impl Finish {
    fn reason(&self) -> &'static str {
        if *self == Self::Length {
            "length"
        } else {
            "stop"
        }
    }

    /// vLLM's `stop_reason`: the stop string or the stop token id, null for EOS and `length`.
    fn stop_reason(&self, state: &AppState, p: &Params) -> Value {
        match self {
            Self::Length => Value::Null,
            Self::Token(id) if !p.ignore_eos && state.options.eos_token_ids.contains(id) => Value::Null,
            Self::Token(id) => json!(id),
            Self::Text(stop) => json!(stop),
        }
    }
}

/// What one sequence produced.
#[derive(Default)]
struct Outcome {
    /// Its output tokens (after a stop string, those up to the one that completed it).
    ids: Vec<u32>,
    /// Each output token's logprobs, when the request asks for them (as many as `ids`).
    logprobs: Vec<TokenLogprobs>,
    /// The texts of the tokens `logprobs` name.
    token_texts: HashMap<u32, String>,
    text: String,
    prompt_tokens: usize,
    cached_tokens: usize,
    finish: Finish,
}

/// Pieces of an output's text, each with the number of output tokens it brings the text to.
type Pieces = Vec<(usize, String)>;

/// The text the output's tokens after the first `seen` add, a piece per token when `per_token`
/// (else one piece), each with the number of tokens it brings the output to; the detokenizer's
/// next `(prefix, read)`. `window` holds the output's tokens from the detokenizer's `prefix` on:
/// only those cross to the tokenizer, so a call costs the window, not the output so far. `last`:
/// no more tokens come (text ending in an incomplete character is flushed).
fn decode_pieces(
    codec: &dyn TextCodec,
    window: &[u32],
    seen: usize,
    (mut prefix, mut read): (usize, usize),
    last: bool,
    per_token: bool,
) -> Result<(Pieces, (usize, usize)), String> {
    let base = prefix;
    let len = base + window.len();
    let ends: Vec<usize> = if per_token && seen < len { (seen + 1..=len).collect() } else { vec![len] };
    let mut pieces = Vec::with_capacity(ends.len());
    for end in ends {
        let ids = &window[prefix - base..end - base];
        let (text, p, r) = codec.detokenize(ids, 0, read - prefix, last && end == len)?;
        (prefix, read) = (prefix + p, prefix + r);
        pieces.push((end, text));
    }
    Ok((pieces, (prefix, read)))
}

/// Runs one sequence to its end: its text as it comes out when `stream` (`on_text` gets each piece
/// with the outcome so far, its token ids and logprobs, and returns false once the client is gone),
/// then its outcome. With stop strings each token's text is searched as it comes, as vLLM does; a match
/// ends the sequence at once (`end`: the engine finishes it at its next step, as a stop token
/// would, freeing its slot and keeping its blocks for a tool-wait pin). `first_token` fires at the
/// first output token (or is dropped when the sequence fails before one).
#[allow(clippy::too_many_arguments)]
async fn drive(
    state: Arc<AppState>,
    mut rx: mpsc::UnboundedReceiver<EngineEvent>,
    p: &Params,
    prompt_tokens: usize,
    mut on_text: impl FnMut(String, &Outcome) -> bool,
    stream: bool,
    mut first_token: Option<oneshot::Sender<()>>,
    end: Option<EndSignal>,
) -> Result<Outcome, Response> {
    let mut out = Outcome { prompt_tokens, ..Outcome::default() };
    let mut text = StopStrings::new(p.stop.clone(), p.include_stop);
    let per_token = text.has_stops();
    // Without stop strings an unstreamed output is detokenized once, at its end.
    let incremental = stream || per_token;
    let mut offsets = (0, 0);
    let mut seen = 0;
    let mut stop_token = None;
    loop {
        let Some(first) = rx.recv().await else {
            let why = state.engine.failure().unwrap_or_else(|| "the engine stopped".into());
            return Err(error(StatusCode::SERVICE_UNAVAILABLE, &why, None));
        };
        // Everything already queued goes into one detokenization.
        let mut events = vec![first];
        while let Ok(e) = rx.try_recv() {
            events.push(e);
        }
        let mut finished = false;
        for e in events {
            match e {
                EngineEvent::Token { id, stop, logprobs, .. } if stop_token.is_none() => {
                    out.ids.push(id);
                    if p.sampling.logprobs.is_some() {
                        let Some(logprobs) = logprobs else {
                            return Err(error(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "the model runner returned no logprobs",
                                None,
                            ));
                        };
                        out.logprobs.push(logprobs);
                    }
                    // The scheduler says which token stops the output (a stop token that is the
                    // last one `max_tokens` allow ends it by length, and its text is output).
                    if stop {
                        stop_token = Some(id);
                    }
                }
                EngineEvent::Token { .. } => {}
                EngineEvent::Started { cached_tokens } => out.cached_tokens = cached_tokens,
                EngineEvent::Finished { prompt_tokens, cached_tokens, .. } => {
                    out.prompt_tokens = prompt_tokens;
                    out.cached_tokens = cached_tokens;
                    finished = true;
                }
                EngineEvent::Rejected { prompt_tokens, max_new_tokens, kv_capacity_tokens } => {
                    return Err(bad(format!(
                        "{prompt_tokens} prompt tokens and {max_new_tokens} output tokens do not fit in the KV cache \
                         ({kv_capacity_tokens} tokens)"
                    )));
                }
            }
        }
        if !out.ids.is_empty() {
            if let Some(tx) = first_token.take() {
                let _ = tx.send(());
            }
        }
        let done = finished || stop_token.is_some();
        // As vLLM: the stop token's text is not output, unless stop strings are.
        let decodable = out.ids.len() - usize::from(stop_token.is_some() && !p.include_stop);
        if incremental && (seen < decodable || (done && offsets.1 < decodable)) {
            let codec = Arc::clone(&state.codec);
            let window = out.ids[offsets.0..decodable].to_vec();
            let pieces;
            (pieces, offsets) =
                blocking(move || decode_pieces(&*codec, &window, seen, offsets, done, per_token)).await?;
            seen = decodable;
            for (count, piece) in pieces {
                if text.push(&piece, count > p.min_tokens) {
                    // Tokens after the one that completed the stop string are not output.
                    out.ids.truncate(count);
                    out.logprobs.truncate(count);
                    break;
                }
            }
        }
        let matched = text.matched().map(str::to_owned);
        if stream || done || matched.is_some() {
            name_tokens(&state, &mut out).await?;
        }
        if stream {
            let ready = text.ready(done || matched.is_some());
            if !ready.is_empty() && !on_text(ready.to_owned(), &out) {
                // The client went away: dropping the receiver aborts the request.
                return Err(error(StatusCode::INTERNAL_SERVER_ERROR, "the client went away", None));
            }
        }
        if let Some(stop) = matched {
            if let Some(end) = &end {
                end.end();
            }
            out.finish = Finish::Text(stop);
            out.text = text.into_text();
            return Ok(out);
        }
        if done {
            out.finish = stop_token.map_or(Finish::Length, Finish::Token);
            out.text = if incremental {
                text.into_text()
            } else {
                let codec = Arc::clone(&state.codec);
                let ids = out.ids[..decodable].to_vec();
                blocking(move || codec.detokenize(&ids, 0, 0, true)).await?.0
            };
            return Ok(out);
        }
    }
}

/// Fetches the texts of the tokens in `out.logprobs` not yet named (one call to the tokenizer).
async fn name_tokens(state: &AppState, out: &mut Outcome) -> Result<(), Response> {
    let mut ids: Vec<u32> = out.ids[..out.logprobs.len()]
        .iter()
        .copied()
        .chain(out.logprobs.iter().flat_map(|l| l.top.iter().map(|&(id, _)| id)))
        .filter(|id| !out.token_texts.contains_key(id))
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    ids.sort_unstable();
    ids.dedup();
    let codec = Arc::clone(&state.codec);
    let asked = ids.clone();
    let texts = blocking(move || codec.token_texts(&asked)).await?;
    out.token_texts.extend(ids.into_iter().zip(texts));
    Ok(())
}

/// An output token's text and log-probability, with the top tokens' texts and theirs.
type TokenEntry<'a> = (&'a str, f32, Vec<(&'a str, f32)>);

/// A choice's logprobs as they go out, each output token's once: all at once, or a chunk's tokens
/// with each chunk of a stream. An outcome holds logprobs only when its request asked for them.
#[derive(Default)]
struct LogprobDeltas {
    /// Tokens sent so far.
    sent: usize,
    /// Characters of their texts (completions' `text_offset`).
    offset: usize,
}

impl LogprobDeltas {
    /// The output tokens after those sent, as `(text, logprobs, top tokens' texts and logprobs)`.
    fn take<'a>(&mut self, out: &'a Outcome) -> Vec<TokenEntry<'a>> {
        let text = |id: &u32| out.token_texts.get(id).map_or("", String::as_str);
        let from = self.sent.min(out.logprobs.len());
        self.sent = out.logprobs.len();
        out.ids[from..out.logprobs.len()]
            .iter()
            .zip(&out.logprobs[from..])
            .map(|(id, l)| (text(id), l.logprob, l.top.iter().map(|(id, lp)| (text(id), *lp)).collect()))
            .collect()
    }

    /// Chat's `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}]}`, null when off (or,
    /// streamed, when no token is new).
    fn chat(&mut self, out: &Outcome) -> Value {
        let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
        let content: Vec<Value> = self
            .take(out)
            .into_iter()
            .map(|(token, logprob, top)| {
                let mut e = entry(token, logprob);
                e["top_logprobs"] = top.into_iter().map(|(t, lp)| entry(t, lp)).collect();
                e
            })
            .collect();
        if content.is_empty() {
            Value::Null
        } else {
            json!({ "content": content })
        }
    }

    /// Completions' `logprobs`: `tokens`, `token_logprobs`, `top_logprobs` (the sampled token's
    /// text and each top token's, with their log-probabilities) and `text_offset` (characters into
    /// the choice's text), null when off (or, streamed, when no token is new).
    fn completion(&mut self, out: &Outcome) -> Value {
        let tokens = self.take(out);
        if tokens.is_empty() {
            return Value::Null;
        }
        let (mut texts, mut logprobs, mut tops, mut offsets) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (token, logprob, top) in tokens {
            offsets.push(self.offset);
            self.offset += token.chars().count();
            let mut entry = serde_json::Map::new();
            entry.insert(token.to_owned(), json!(logprob));
            for (t, lp) in top {
                entry.entry(t.to_owned()).or_insert(json!(lp));
            }
            texts.push(token);
            logprobs.push(logprob);
            tops.push(entry);
        }
        json!({"tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets})
    }
}

fn record(state: &AppState, reason: &'static str) {
    *state.finish_reasons.lock().unwrap_or_else(PoisonError::into_inner).entry(reason).or_default() += 1;
}

fn usage(prompt: usize, cached: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn stream_response(rx: mpsc::UnboundedReceiver<Bytes>) -> Response {
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, std::io::Error>(b), rx))
    }));
    let mut r = Response::new(body);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// The client's tool-wait hint, `"batchagent": {"agent": "<id>", "tool_wait_s": <seconds>}` (as the
/// simulator reads it): the request's KV blocks stay pinned for the agent for twice the wait, at
/// most `kv_pin_ttl`, unless the reply calls no tool, and are expected back after the wait (their
/// eviction order under `--kv-eviction next_use`). When the hint carries `"next_call_s"` (seconds
/// from the reply's end to the agent's next request: its tools and its wait for a client slot),
/// that is the wait. `None` without the field.
fn tool_wait_pin(state: &AppState, body: &Value) -> Result<Option<Pin>, Response> {
    let Some(hint) = body.get("batchagent").filter(|v| !v.is_null()) else { return Ok(None) };
    let seconds = |field: &str| hint.get(field).and_then(Value::as_f64).filter(|w| w.is_finite() && *w >= 0.0);
    let agent = hint.get("agent").and_then(Value::as_str).filter(|a| !a.is_empty());
    let next_call = hint.get("next_call_s").map(|_| seconds("next_call_s"));
    let (Some(agent), Some(wait), None | Some(Some(_))) = (agent, seconds("tool_wait_s"), next_call) else {
        return Err(bad("batchagent: expected {\"agent\": a non-empty string, \"tool_wait_s\": seconds >= 0, \
                        optionally \"next_call_s\": seconds >= 0}"));
    };
    let secs = |s: f64| Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX);
    let wait = next_call.flatten().unwrap_or(wait);
    Ok(Some(Pin::for_tool_wait(agent.to_owned(), secs(wait), state.options.kv_pin_ttl)))
}

/// `POST /v1/batchagent/done` with `{"agent": "<id>"}`: the client says an agent that sent tool-wait
/// hints is finished (on `/v1/completions` the server cannot tell from the reply, as it parses no
/// tool calls there). Its pinned blocks are released and the next use its last hint predicted is
/// withdrawn, so under `--kv-eviction next_use` its blocks are evicted before those of agents
/// still coming back. Answered at once; the engine applies it before its next step. Naming an
/// agent the engine does not know is not an error (it may have been released already).
async fn agent_done(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let agent = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("agent").and_then(Value::as_str).filter(|a| !a.is_empty()).map(str::to_owned));
    let Some(agent) = agent else {
        return bad("expected a JSON body {\"agent\": a non-empty string}");
    };
    state.engine.agent_done(agent.clone());
    json_response(StatusCode::OK, &json!({"object": "batchagent.agent_done", "agent": agent}))
}

/// A streamed chat answer's tool calls as `delta`s: content as soon as it cannot be part of a
/// call, each call whole in one `tool_calls` delta once read (see [`ToolCallStream`]).
struct ToolDeltas {
    reader: ToolCallStream,
    /// Calls sent so far (the next one's `index`).
    sent: usize,
    /// The choice's part of the calls' ids.
    id: String,
}

impl ToolDeltas {
    fn push(&mut self, text: &str) -> Vec<Value> {
        let pieces = self.reader.push(text);
        self.deltas(pieces)
    }

    fn finish(&mut self) -> Vec<Value> {
        let pieces = self.reader.finish();
        self.deltas(pieces)
    }

    fn deltas(&mut self, pieces: Vec<StreamPiece>) -> Vec<Value> {
        let mut out = Vec::with_capacity(pieces.len());
        for piece in pieces {
            out.push(match piece {
                StreamPiece::Content(text) => json!({"content": text}),
                StreamPiece::Call(call) => {
                    let k = self.sent;
                    self.sent += 1;
                    json!({"tool_calls": [{"index": k, "id": format!("chatcmpl-tool-{}-{k}", self.id),
                           "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]})
                }
            });
        }
        out
    }
}

/// Tool calls in the form the served model's chat template asks for (Hermes / Qwen2.5 blocks or
/// Llama 3.1 JSON; the shared parsers), as the chat response's `tool_calls`; the rest of the text
/// is the content.
fn parse_tool_calls(format: ToolCallFormat, text: &str, id: &str) -> (String, Vec<Value>) {
    let (content, parsed) = format.parse(text);
    let calls = parsed
        .into_iter()
        .enumerate()
        .map(|(k, call)| {
            json!({"id": format!("chatcmpl-tool-{id}-{k}"), "type": "function",
                   "function": {"name": call.name, "arguments": call.arguments}})
        })
        .collect();
    (content, calls)
}

async fn chat(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    match chat_inner(state, &body).await {
        Ok(r) | Err(r) => r,
    }
}

async fn chat_inner(state: Arc<AppState>, raw: &[u8]) -> Result<Response, Response> {
    let body: Value = serde_json::from_slice(raw).map_err(|e| bad(format!("request body is not valid JSON: {e}")))?;
    let mut p = parse_params(&state, &body, "max_completion_tokens")?;
    p.sampling.logprobs = parse_logprobs(&body, true)?;
    if !body.get("messages").is_some_and(Value::is_array) {
        return Err(bad("`messages` must be an array"));
    }
    if body.get("echo").and_then(Value::as_bool) == Some(true) {
        return Err(bad_param("`echo` on chat (vLLM's: the last message prepended) is not supported", "echo"));
    }
    let tools = body.get("tools").is_some_and(|t| t.as_array().is_some_and(|a| !a.is_empty()));
    let parser = state.options.tool_call_parser;
    let has_tools = tools && body.get("tool_choice").and_then(Value::as_str) != Some("none");
    let pin = tool_wait_pin(&state, &body)?;
    if pin.is_some() && p.n > 1 {
        return Err(bad_param("batchagent: a hint names one agent's next turn; send it with n = 1", "n"));
    }
    let codec = Arc::clone(&state.codec);
    let text = String::from_utf8_lossy(raw).into_owned();
    let prompt = blocking(move || codec.encode_chat(&text, has_tools)).await?;
    let agent = pin.as_ref().map(|p| p.key.clone());
    let sequences = submit(&state, &EngineRequest { pin, ..request(&state, prompt, &p)? }, p.n);
    let n = state.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!("chatcmpl-{n}");
    let created = unix_now();
    let model = state.options.model.clone();
    if !p.stream {
        let outs = join_all(sequences.into_iter().map(|s| s.run(Arc::clone(&state), &p, |_, _| true, false))).await;
        let outs = outs.into_iter().collect::<Result<Vec<_>, _>>()?;
        let mut choices = Vec::with_capacity(outs.len());
        let mut any_calls = false;
        for (i, out) in outs.iter().enumerate() {
            let text = out.text.clone();
            let (content, calls) =
                if has_tools { parse_tool_calls(parser, &text, &format!("{n}-{i}")) } else { (text, Vec::new()) };
            any_calls |= !calls.is_empty();
            let reason = if calls.is_empty() { out.finish.reason() } else { "tool_calls" };
            record(&state, out.finish.reason());
            let mut message = json!({"role": "assistant", "content": content});
            if !calls.is_empty() {
                message["tool_calls"] = Value::Array(calls);
            }
            choices.push(json!({"index": i, "message": message, "logprobs": LogprobDeltas::default().chat(out),
                                "finish_reason": reason, "stop_reason": out.finish.stop_reason(&state, &p)}));
        }
        if let Some(agent) = agent.filter(|_| !any_calls) {
            // No tool to wait for: the agent is done, its blocks need not be held.
            state.engine.agent_done(agent);
        }
        return Ok(json_response(
            StatusCode::OK,
            &json!({"id": id, "object": "chat.completion", "created": created, "model": model,
                    "choices": choices, "usage": total_usage(&outs, p.n)}),
        ));
    }
    let (tx, frames) = mpsc::unbounded_channel::<Bytes>();
    tokio::spawn(async move {
        let chunk = |i: usize, delta: Value, reason: Value| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": i, "delta": delta, "logprobs": null, "finish_reason": reason}]})
        };
        // As vLLM: every choice's role first.
        for i in 0..p.n {
            if tx.send(sse(&chunk(i, json!({"role": "assistant", "content": ""}), Value::Null))).is_err() {
                return;
            }
        }
        let p = &p;
        let tasks = sequences.into_iter().enumerate().map(|(i, sequence)| {
            let sink = tx.clone();
            let state = Arc::clone(&state);
            let chunk = &chunk;
            async move {
                // With tools, content goes out as it comes and each call once its block closes
                // (the pieces add up to the unstreamed answer's content and calls).
                let mut tools =
                    has_tools.then(|| ToolDeltas { reader: parser.stream(), sent: 0, id: format!("{n}-{i}") });
                // The logprobs of the tokens since the last chunk go with the next chunk sent.
                let mut logprobs = LogprobDeltas::default();
                let mut send = |deltas: Vec<Value>, out: &Outcome| {
                    let mut pending = if deltas.is_empty() { Value::Null } else { logprobs.chat(out) };
                    deltas.into_iter().all(|delta| {
                        let mut c = chunk(i, delta, Value::Null);
                        c["choices"][0]["logprobs"] = pending.take();
                        sink.send(sse(&c)).is_ok()
                    })
                };
                let on_text = |text: String, out: &Outcome| match tools.as_mut() {
                    Some(t) => send(t.push(&text), out),
                    None => send(vec![json!({"content": text})], out),
                };
                let out = sequence.run(Arc::clone(&state), p, on_text, true).await.ok()?;
                let called = match tools.as_mut() {
                    Some(t) => {
                        send(t.finish(), &out).then_some(())?;
                        t.sent > 0
                    }
                    None => false,
                };
                let reason = if called { "tool_calls" } else { out.finish.reason() };
                record(&state, out.finish.reason());
                let mut last = chunk(i, json!({}), json!(reason));
                last["choices"][0]["logprobs"] = logprobs.chat(&out);
                last["choices"][0]["stop_reason"] = out.finish.stop_reason(&state, p);
                sink.send(sse(&last)).ok()?;
                Some((out, called))
            }
        });
        let Some(ended) = join_all(tasks).await.into_iter().collect::<Option<Vec<_>>>() else { return };
        let (outs, called): (Vec<_>, Vec<_>) = ended.into_iter().unzip();
        if let Some(agent) = agent.filter(|_| !called.contains(&true)) {
            // No tool to wait for: the agent is done, its blocks need not be held.
            state.engine.agent_done(agent);
        }
        if p.include_usage {
            let u = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": total_usage(&outs, p.n)});
            let _ = tx.send(sse(&u));
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n"));
    });
    Ok(stream_response(frames))
}

/// `prompt` as one or more prompts: text, a list of texts, token ids, or a list of token id lists.
enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

fn parse_prompts(body: &Value) -> Result<Vec<PromptInput>, Response> {
    let ids = |v: &Value| -> Option<Vec<u32>> {
        v.as_array()?.iter().map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok())).collect()
    };
    let out = match body.get("prompt") {
        Some(Value::String(s)) => vec![PromptInput::Text(s.clone())],
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
            items.iter().filter_map(Value::as_str).map(|s| PromptInput::Text(s.to_owned())).collect()
        }
        Some(v @ Value::Array(items)) if items.iter().all(Value::is_number) => {
            vec![PromptInput::Ids(ids(v).ok_or_else(|| bad("`prompt`: token ids must be non-negative integers"))?)]
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| ids(v).map(PromptInput::Ids))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("`prompt` must be a string, a list of strings, or token ids"))?,
        _ => return Err(bad("`prompt` must be a string, a list of strings, or token ids")),
    };
    if out.is_empty() {
        return Err(bad("`prompt` is an empty list"));
    }
    Ok(out)
}

async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    match completions_inner(state, &body).await {
        Ok(r) | Err(r) => r,
    }
}

async fn completions_inner(state: Arc<AppState>, body: &[u8]) -> Result<Response, Response> {
    let body: Value = serde_json::from_slice(body).map_err(|e| bad(format!("request body is not valid JSON: {e}")))?;
    let mut p = parse_params(&state, &body, "max_tokens")?;
    p.sampling.logprobs = parse_logprobs(&body, false)?;
    // The completions API's default is 16 tokens.
    p.max_tokens = p.max_tokens.or(Some(16));
    // vLLM's `echo`: each choice's text starts with its prompt (token ids decoded).
    let echo = body.get("echo").and_then(Value::as_bool) == Some(true);
    if echo && p.sampling.logprobs.is_some() {
        // With `echo`, logprobs cover the prompt's tokens too, which this server does not compute.
        return Err(bad_param("`logprobs` with `echo`: this server computes no prompt logprobs", "logprobs"));
    }
    // vLLM's `return_token_ids`: each choice also carries its prompt's and its output's token ids,
    // so a client can extend a conversation token for token (text round trips need not).
    let return_token_ids = body.get("return_token_ids").and_then(Value::as_bool) == Some(true);
    let prompts = parse_prompts(&body)?;
    // A hint names one agent: one prompt. The server does not parse tool calls from a raw
    // completion, so the hint is taken at its word (the blocks pinned for the wait).
    let pin = tool_wait_pin(&state, &body)?;
    if pin.is_some() && prompts.len() > 1 {
        return Err(bad("batchagent: a hint names one agent; send a hinted prompt in a request of its own"));
    }
    if pin.is_some() && p.n > 1 {
        return Err(bad_param("batchagent: a hint names one agent's next turn; send it with n = 1", "n"));
    }
    let mut requests = Vec::with_capacity(prompts.len());
    let mut prompt_ids = Vec::new();
    let mut echoes = Vec::new();
    for input in prompts {
        let prompt = match input {
            PromptInput::Ids(ids) => {
                if echo {
                    let codec = Arc::clone(&state.codec);
                    let ids = ids.clone();
                    echoes.push(blocking(move || codec.detokenize(&ids, 0, 0, true)).await?.0);
                }
                ids
            }
            PromptInput::Text(text) => {
                if echo {
                    echoes.push(text.clone());
                }
                let codec = Arc::clone(&state.codec);
                blocking(move || codec.encode(&text)).await?
            }
        };
        if return_token_ids {
            prompt_ids.push(prompt.clone());
        }
        requests.push(EngineRequest { pin: pin.clone(), ..request(&state, prompt, &p)? });
    }
    // vLLM's order: a prompt's `n` choices together, prompt after prompt.
    let sequences: Vec<Sequence> = requests.iter().flat_map(|r| submit(&state, r, p.n)).collect();
    let n = state.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!("cmpl-{n}");
    let created = unix_now();
    let model = state.options.model.clone();
    if !p.stream {
        let outs = join_all(sequences.into_iter().map(|s| s.run(Arc::clone(&state), &p, |_, _| true, false))).await;
        let outs = outs.into_iter().collect::<Result<Vec<_>, _>>()?;
        let mut choices = Vec::with_capacity(outs.len());
        for (i, out) in outs.iter().enumerate() {
            let reason = out.finish.reason();
            record(&state, reason);
            let text = match echoes.get(i / p.n) {
                Some(prompt) => format!("{prompt}{}", out.text),
                None => out.text.clone(),
            };
            let mut choice = json!({"index": i, "text": text, "logprobs": LogprobDeltas::default().completion(out),
                                    "finish_reason": reason, "stop_reason": out.finish.stop_reason(&state, &p)});
            if return_token_ids {
                choice["prompt_token_ids"] = json!(prompt_ids.get(i / p.n));
                choice["token_ids"] = json!(out.ids);
            }
            choices.push(choice);
        }
        return Ok(json_response(
            StatusCode::OK,
            &json!({"id": id, "object": "text_completion", "created": created, "model": model,
                    "choices": choices, "usage": total_usage(&outs, p.n)}),
        ));
    }
    let (tx, frames) = mpsc::unbounded_channel::<Bytes>();
    tokio::spawn(async move {
        // vLLM's completion chunks all carry `stop_reason`, null but in a choice's last.
        let chunk = |i: usize, text: &str, reason: Value, stop_reason: Value| {
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": i, "text": text, "logprobs": null, "finish_reason": reason,
                                "stop_reason": stop_reason}]})
        };
        let p = &p;
        let echoes = &echoes;
        let prompt_ids = &prompt_ids;
        let tasks = sequences.into_iter().enumerate().map(|(i, sequence)| {
            let sink = tx.clone();
            let state = Arc::clone(&state);
            let chunk = &chunk;
            async move {
                // With `return_token_ids`, as vLLM: a choice's first chunk carries its prompt's ids,
                // each chunk the output ids since the one before (its last, the rest).
                let mut ids = TokenIdDeltas {
                    on: return_token_ids,
                    prompt: prompt_ids.get(i / p.n).map(Vec::as_slice),
                    sent: None,
                };
                if let Some(prompt) = echoes.get(i / p.n).filter(|t| !t.is_empty()) {
                    sink.send(sse(&ids.add(chunk(i, prompt, Value::Null, Value::Null), &[]))).ok()?;
                }
                let mut logprobs = LogprobDeltas::default();
                let on_text = |text: String, out: &Outcome| {
                    let mut c = chunk(i, &text, Value::Null, Value::Null);
                    c["choices"][0]["logprobs"] = logprobs.completion(out);
                    sink.send(sse(&ids.add(c, &out.ids))).is_ok()
                };
                let out = sequence.run(Arc::clone(&state), p, on_text, true).await.ok()?;
                let reason = out.finish.reason();
                record(&state, reason);
                let mut last = chunk(i, "", json!(reason), out.finish.stop_reason(&state, p));
                last["choices"][0]["logprobs"] = logprobs.completion(&out);
                sink.send(sse(&ids.add(last, &out.ids))).ok()?;
                Some(out)
            }
        });
        let Some(outs) = join_all(tasks).await.into_iter().collect::<Option<Vec<_>>>() else { return };
        if p.include_usage {
            let u = json!({"id": id, "object": "text_completion", "created": created, "model": model,
                           "choices": [], "usage": total_usage(&outs, p.n)});
            let _ = tx.send(sse(&u));
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n"));
    });
    Ok(stream_response(frames))
}

/// A streamed completion choice's token ids, as vLLM's `return_token_ids` sends them: the prompt's
/// on the choice's first chunk, on each chunk the output's ids since the chunk before.
struct TokenIdDeltas<'a> {
    on: bool,
    prompt: Option<&'a [u32]>,
    /// Output ids sent so far (`None`: no chunk yet).
    sent: Option<usize>,
}

impl TokenIdDeltas<'_> {
    /// `chunk` with the ids: `out` is the output's ids so far.
    fn add(&mut self, mut chunk: Value, out: &[u32]) -> Value {
        if !self.on {
            return chunk;
        }
        let from = self.sent;
        let choice = &mut chunk["choices"][0];
        if from.is_none() {
            choice["prompt_token_ids"] = json!(self.prompt);
        }
        let from = from.unwrap_or(0).min(out.len());
        choice["token_ids"] = json!(out[from..]);
        self.sent = Some(out.len());
        chunk
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level tokenizer (token `i` is byte `i`) detokenizing as the Python worker does: the
    /// text `ids[prefix..]` adds beyond `ids[prefix..read]`, held while it ends in an incomplete
    /// character. It records the longest `ids` it was handed.
    #[derive(Default)]
    struct ByteCodec {
        longest: Mutex<usize>,
    }

    impl TextCodec for ByteCodec {
        fn encode_chat(&self, _: &str, _: bool) -> Result<Vec<u32>, String> {
            Err("unused".into())
        }
        fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
            Ok(text.bytes().map(u32::from).collect())
        }
        fn detokenize(
            &self,
            ids: &[u32],
            prefix: usize,
            read: usize,
            last: bool,
        ) -> Result<(String, usize, usize), String> {
            let mut longest = self.longest.lock().unwrap_or_else(PoisonError::into_inner);
            *longest = (*longest).max(ids.len());
            let text = |ids: &[u32]| {
                String::from_utf8_lossy(&ids.iter().map(|&i| u8::try_from(i).unwrap_or(b'?')).collect::<Vec<_>>())
                    .into_owned()
            };
            let (before, after) = (text(&ids[prefix..read]), text(&ids[prefix..]));
            if after.len() > before.len() && (last || !after.ends_with('\u{fffd}')) {
                return Ok((after[before.len()..].to_owned(), read, ids.len()));
            }
            Ok((String::new(), prefix, read))
        }
        fn token_texts(&self, ids: &[u32]) -> Result<Vec<String>, String> {
            Ok(ids.iter().map(|&i| String::from_utf8_lossy(&[u8::try_from(i).unwrap_or(b'?')]).into_owned()).collect())
        }
    }

    #[test]
    fn pieces_add_up_to_the_text_and_only_a_window_crosses_to_the_tokenizer() {
        let text = "agents é tools \u{1F600} and more ".repeat(40);
        let codec = ByteCodec::default();
        let ids = codec.encode(&text).unwrap_or_default();
        for per_token in [true, false] {
            // Tokens arrive three at a time.
            let (mut offsets, mut seen, mut out, mut counts) = ((0, 0), 0, String::new(), Vec::new());
            for upto in (3..ids.len()).step_by(3).chain([ids.len()]) {
                let last = upto == ids.len();
                let pieces;
                (pieces, offsets) =
                    decode_pieces(&codec, &ids[offsets.0..upto], seen, offsets, last, per_token).unwrap_or_default();
                seen = upto;
                for (count, piece) in pieces {
                    counts.push(count);
                    out.push_str(&piece);
                }
            }
            assert_eq!(out, text);
            assert!(counts.windows(2).all(|w| w[0] < w[1]) && counts.last() == Some(&ids.len()));
            if per_token {
                assert_eq!(counts, (1..=ids.len()).collect::<Vec<_>>());
            }
        }
        // A call sees the tokens since the detokenizer's prefix (the batch before, a held partial
        // character, the new batch), not the whole output of over 1,000 tokens.
        let longest = *codec.longest.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(longest <= 12 && ids.len() > 1000, "{longest}");
    }

    #[test]
    fn logprobs_are_asked_for_as_each_api_asks() {
        let ask = |body: Value, chat: bool| parse_logprobs(&body, chat).map_err(|r| r.status());
        let refused = Err(StatusCode::BAD_REQUEST);
        assert_eq!(ask(json!({}), true), Ok(None));
        assert_eq!(ask(json!({"logprobs": false}), true), Ok(None));
        assert_eq!(ask(json!({"logprobs": true}), true), Ok(Some(0)));
        assert_eq!(ask(json!({"logprobs": true, "top_logprobs": 20}), true), Ok(Some(20)));
        assert_eq!(ask(json!({"top_logprobs": 2}), true), refused);
        assert_eq!(ask(json!({"logprobs": true, "top_logprobs": 21}), true), refused);
        assert_eq!(ask(json!({"logprobs": 2}), true), refused);
        assert_eq!(ask(json!({"logprobs": 0}), false), Ok(Some(0)));
        assert_eq!(ask(json!({"logprobs": 5}), false), Ok(Some(5)));
        assert_eq!(ask(json!({"logprobs": null}), false), Ok(None));
        assert_eq!(ask(json!({"logprobs": -1}), false), refused);
        assert_eq!(ask(json!({"logprobs": true}), false), refused);
    }

    #[test]
    fn hermes_tool_calls_are_parsed_out_of_the_text() {
        let (content, calls) = parse_tool_calls(
            ToolCallFormat::Hermes,
            "Let me look.\n<tool_call>\n{\"name\": \"search\", \"arguments\": {\"q\": \"rust\"}}\n</tool_call>",
            "3",
        );
        assert_eq!(content, "Let me look.");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["function"]["name"], "search");
        assert_eq!(calls[0]["function"]["arguments"], "{\"q\": \"rust\"}");
        let (content, calls) = parse_tool_calls(ToolCallFormat::Hermes, "<tool_call>not json</tool_call>", "0");
        assert_eq!((content.as_str(), calls.len()), ("<tool_call>not json</tool_call>", 0));
    }
}
