//! Provider batch APIs as a [`Backend`]: `OpenAI` Batch (`/v1/files` + `/v1/batches`, JSONL in and
//! out) and Anthropic Message Batches (`/v1/messages/batches`), at half the price of online calls.
//!
//! Each model call becomes a row. Rows are collected into batches under the provider's limits
//! (`OpenAI`: 50,000 requests and 200 MB per input file; Anthropic: 100,000 requests and 256 MB per
//! batch), submitted, polled with backoff and downloaded; each call's future then completes with
//! the row's answer, parsed as the online answer would be. The agent loop around it is unchanged:
//! validation, repair, retries, the journal and the results are those of any run.
//!
//! - A row the provider answered with an error is that call's error: the job's retry policy decides,
//!   and its retry goes into a new batch or online ([`RowRetry`]).
//! - A row that did not run (its batch expired or was cancelled) is submitted again in a new batch;
//!   the rows that finished are kept.
//! - Every batch is recorded through a [`BatchLedger`] (the run's journal) once created: a resumed
//!   run is given the batches still open and attaches its calls to their rows instead of
//!   submitting them again.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::anthropic::{messages_body, API_KEY_ENV as ANTHROPIC_KEY_ENV, API_VERSION};
use super::http::{limited_body, status_error};
use super::openai::{Flavour, OpenAiBackend};
use super::url::{parse_backend_url, BackendOptions, Scheme};
use super::{Backend, BackendError, Capabilities, ChatRequest, ChatResponse, StreamEvent};
use crate::scheduler::agent::split_request_id;
use crate::secret::Secret;
use crate::stream::anthropic::parse_message;
use crate::stream::openai::parse_chat_completion;

/// Most bytes of one results file read (a full `OpenAI` batch answers in a few hundred MB).
const MAX_RESULTS_BYTES: usize = 2 << 30;
/// Longest one API request (upload, create, poll, download) may take.
const API_TIMEOUT: Duration = Duration::from_secs(600);
/// Attempts of one API request that fails in a way worth retrying (429, 5xx, connection).
const API_ATTEMPTS: u32 = 8;
/// Polls in a row that may fail before the batch's rows fail with the last error.
const POLL_FAILURES: u32 = 20;

/// Which provider's batch API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchApi {
    OpenAi,
    Anthropic,
}

impl BatchApi {
    pub fn label(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
        }
    }

    /// The provider's documented limits: (requests, bytes) per batch.
    pub fn limits(self) -> (usize, usize) {
        match self {
            Self::OpenAi => (50_000, 200 * 1024 * 1024),
            Self::Anthropic => (100_000, 256 * 1024 * 1024),
        }
    }
}

/// Where a call whose row failed goes when the job's retry policy sends it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowRetry {
    /// Into a new batch (half the price, hours of latency).
    #[default]
    Batch,
    /// As an online call (full price, at once).
    Online,
}

#[derive(Debug, Clone)]
pub struct ProviderBatchOptions {
    pub retry: RowRetry,
    /// First wait before polling a batch; doubled after each poll up to `max_poll_interval`.
    pub poll_interval: Duration,
    pub max_poll_interval: Duration,
    /// A batch is submitted once no new call arrived for this long (or once it is full).
    pub linger: Duration,
    /// Rows and bytes per batch; the provider's limits when larger or zero.
    pub max_requests: usize,
    pub max_bytes: usize,
    /// Times a row that did not run (expired or cancelled batch) is submitted again.
    pub max_resubmits: u32,
}

impl Default for ProviderBatchOptions {
    fn default() -> Self {
        Self {
            retry: RowRetry::Batch,
            poll_interval: Duration::from_secs(5),
            max_poll_interval: Duration::from_secs(60),
            linger: Duration::from_secs(1),
            max_requests: 0,
            max_bytes: 0,
            max_resubmits: 5,
        }
    }
}

/// A batch as the journal keeps it: which provider, its id, the rows it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord {
    pub api: String,
    pub batch_id: String,
    pub custom_ids: Vec<String>,
}

/// Durable record of the batches of a run (the journal).
pub trait BatchLedger: Send + Sync {
    /// The batch exists; the future completes once that is durable.
    fn submitted(&self, record: BatchRecord) -> BoxFuture<'static, ()>;
    /// Its rows were handed on: a resumed run does not re-attach to it.
    fn ended(&self, batch_id: String) -> BoxFuture<'static, ()>;
}

/// Counters for the progress line and the report.
#[derive(Debug, Default)]
pub struct BatchCounters {
    pub submitted: AtomicU64,
    pub reattached: AtomicU64,
    pub in_progress: AtomicU64,
    pub expired: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    pub rows_submitted: AtomicU64,
    pub rows_done: AtomicU64,
    pub rows_errored: AtomicU64,
    pub rows_resubmitted: AtomicU64,
    pub rows_online: AtomicU64,
}

impl BatchCounters {
    pub fn to_json(&self, api: BatchApi) -> Value {
        json!({
            "api": api.label(),
            "batches_submitted": self.submitted.load(Relaxed),
            "batches_reattached": self.reattached.load(Relaxed),
            "batches_in_progress": self.in_progress.load(Relaxed),
            "batches_expired": self.expired.load(Relaxed),
            "batches_cancelled": self.cancelled.load(Relaxed),
            "batches_failed": self.failed.load(Relaxed),
            "rows_submitted": self.rows_submitted.load(Relaxed),
            "rows_done": self.rows_done.load(Relaxed),
            "rows_errored": self.rows_errored.load(Relaxed),
            "rows_resubmitted": self.rows_resubmitted.load(Relaxed),
            "rows_online": self.rows_online.load(Relaxed),
        })
    }
}

type RowResult = Result<ChatResponse, BackendError>;

/// One row on its way into a batch.
#[derive(Clone)]
struct Row {
    custom_id: String,
    /// The row as the provider takes it: an `OpenAI` JSONL line, an Anthropic `requests` item.
    line: Bytes,
    resubmits: u32,
}

/// A call waiting for its row.
struct Waiter {
    tx: oneshot::Sender<RowResult>,
    row: Row,
}

#[derive(Default)]
struct Rows {
    waiters: HashMap<String, Waiter>,
    /// Rows of re-attached batches still running, by call (job and turn): the call waits for the
    /// row under the custom id it was submitted with.
    attached: HashMap<String, String>,
    /// Answers of re-attached rows whose call has not come yet.
    ready: HashMap<String, RowResult>,
}

struct Shared {
    api: BatchApi,
    client: ApiClient,
    options: ProviderBatchOptions,
    ledger: Option<Arc<dyn BatchLedger>>,
    rows: Mutex<Rows>,
    counters: BatchCounters,
    queue: mpsc::UnboundedSender<Row>,
}

impl Shared {
    fn rows(&self) -> MutexGuard<'_, Rows> {
        self.rows.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands a row's answer to its call, or keeps it for a call of a resumed run still to come.
    fn deliver(&self, custom_id: &str, result: RowResult) {
        let mut rows = self.rows();
        if let Some(waiter) = rows.waiters.remove(custom_id) {
            let _ = waiter.tx.send(result);
        } else if let Some(key) = row_key(custom_id) {
            if rows.attached.remove(key).is_some() {
                rows.ready.insert(custom_id.to_owned(), result);
            }
        }
    }

    /// A row that did not run: into a new batch, unless it went round too often. A re-attached row
    /// whose call has not come yet is forgotten: the call will submit it.
    fn resubmit(&self, custom_id: &str, why: &str) {
        let mut rows = self.rows();
        if let Some(key) = row_key(custom_id) {
            rows.attached.remove(key);
        }
        let Some(waiter) = rows.waiters.get_mut(custom_id) else { return };
        if waiter.row.resubmits >= self.options.max_resubmits {
            let Some(waiter) = rows.waiters.remove(custom_id) else { return };
            let message = format!("the row was not run: its batch {why} {} times", self.options.max_resubmits + 1);
            let _ = waiter.tx.send(Err(BackendError::Overloaded(message)));
            return;
        }
        waiter.row.resubmits += 1;
        let row = waiter.row.clone();
        drop(rows);
        self.counters.rows_resubmitted.fetch_add(1, Relaxed);
        let _ = self.queue.send(row);
    }
}

/// Encodes calls as the provider's request bodies.
enum Encoder {
    OpenAi(Box<OpenAiBackend>),
    Anthropic,
}

pub struct ProviderBatchBackend {
    name: String,
    shared: Arc<Shared>,
    encoder: Encoder,
    online: Arc<dyn Backend>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ProviderBatchBackend {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl ProviderBatchBackend {
    /// The batch API of the server `address` (`openai://`, `anthropic://`, `sim://host:port`, any
    /// `OpenAI`-compatible `http(s)://` that has it). `online` answers the calls that are retried
    /// online. `open` are the batches a resumed run re-attaches to. Must run inside the runtime.
    pub fn connect(
        address: &str,
        options: &BackendOptions,
        batch: ProviderBatchOptions,
        online: Arc<dyn Backend>,
        ledger: Option<Arc<dyn BatchLedger>>,
        open: Vec<BatchRecord>,
    ) -> Result<Self, BackendError> {
        let parsed = parse_backend_url(address)?;
        let base = parsed.base_url.trim_end_matches('/').to_owned();
        let (api, encoder, api_base, key) = match parsed.scheme {
            Scheme::Anthropic => {
                let key = options
                    .api_key
                    .clone()
                    .filter(|k| !k.is_empty())
                    .or_else(|| Secret::non_empty(std::env::var(ANTHROPIC_KEY_ENV).ok()))
                    .ok_or_else(|| {
                        BackendError::Config(format!("no Anthropic API key: pass api_key or set {ANTHROPIC_KEY_ENV}"))
                    })?;
                (BatchApi::Anthropic, Encoder::Anthropic, format!("{base}/v1"), Some(key))
            }
            Scheme::OpenAi | Scheme::Http | Scheme::Sim | Scheme::Vllm => {
                let flavour = match parsed.scheme {
                    Scheme::OpenAi => Flavour::OpenAi,
                    Scheme::Sim => Flavour::Sim,
                    Scheme::Vllm => Flavour::Vllm,
                    _ => Flavour::Generic,
                };
                let mut options = options.clone();
                if options.api_key.is_none() {
                    options.api_key =
                        Secret::non_empty(parsed.scheme.api_key_env().and_then(|var| std::env::var(var).ok()));
                }
                let after_scheme = base.split_once("://").map_or(base.as_str(), |(_, rest)| rest);
                let api_base = if after_scheme.contains('/') { base.clone() } else { format!("{base}/v1") };
                let encoder = Encoder::OpenAi(Box::new(OpenAiBackend::new(flavour, &base, &options)?));
                (BatchApi::OpenAi, encoder, api_base, options.api_key.clone().filter(|k| !k.is_empty()))
            }
            other => {
                return Err(BackendError::Config(format!(
                    "{other:?} has no provider batch API; provider batch mode takes openai://, anthropic://, sim:// or an OpenAI-compatible http(s):// URL"
                )));
            }
        };
        let client = ApiClient::new(api, api_base, key, options)?;
        let (limit_requests, limit_bytes) = api.limits();
        let mut batch = batch;
        if batch.max_requests == 0 || batch.max_requests > limit_requests {
            batch.max_requests = limit_requests;
        }
        if batch.max_bytes == 0 || batch.max_bytes > limit_bytes {
            batch.max_bytes = limit_bytes;
        }
        let (queue, incoming) = mpsc::unbounded_channel();
        let mut rows = Rows::default();
        let open: Vec<BatchRecord> = open.into_iter().filter(|r| r.api == api.label()).collect();
        for record in &open {
            for custom_id in &record.custom_ids {
                if let Some(key) = row_key(custom_id) {
                    rows.attached.insert(key.to_owned(), custom_id.clone());
                }
            }
        }
        let shared = Arc::new(Shared {
            api,
            client,
            options: batch,
            ledger,
            rows: Mutex::new(rows),
            counters: BatchCounters::default(),
            queue,
        });
        let mut tasks = vec![tokio::spawn(collect(shared.clone(), incoming))];
        for record in open {
            shared.counters.reattached.fetch_add(1, Relaxed);
            let shared = shared.clone();
            tasks.push(tokio::spawn(async move { follow(&shared, record.batch_id, record.custom_ids).await }));
        }
        let name = format!("{} batch {}", api.label(), crate::secret::display_url(address));
        Ok(Self { name, shared, encoder, online, tasks })
    }

    pub fn api(&self) -> BatchApi {
        self.shared.api
    }

    pub fn counters(&self) -> &BatchCounters {
        &self.shared.counters
    }

    /// The row for a call: its custom id and its line in the provider's format.
    fn row(&self, request: &ChatRequest) -> Result<Row, BackendError> {
        let mut request = request.clone();
        request.stream = false;
        let body = match &self.encoder {
            Encoder::OpenAi(openai) => Bytes::from(openai.request_bytes(&request)),
            Encoder::Anthropic => Bytes::from(messages_body(&request, true, 4096)?.to_string()),
        };
        let custom_id = custom_id(&request.request_id, &body);
        let body: Value =
            serde_json::from_slice(&body).map_err(|e| BackendError::Protocol(format!("encoding a batch row: {e}")))?;
        let line = match self.shared.api {
            BatchApi::OpenAi => {
                json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})
            }
            BatchApi::Anthropic => json!({"custom_id": custom_id, "params": body}),
        };
        Ok(Row { custom_id, line: Bytes::from(line.to_string()), resubmits: 0 })
    }

    async fn call(&self, request: ChatRequest) -> RowResult {
        let shared = &self.shared;
        let attempt = split_request_id(&request.request_id).map_or(1, |(_, attempt)| attempt);
        if attempt > 1 && shared.options.retry == RowRetry::Online {
            shared.counters.rows_online.fetch_add(1, Relaxed);
            let mut request = request;
            request.stream = false;
            return self.online.chat(request, None).await;
        }
        let row = self.row(&request)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut rows = shared.rows();
            let key = row_key(&row.custom_id).unwrap_or_default().to_owned();
            let attached = rows.attached.get(&key).cloned();
            // The row of a re-attached batch answers this call, whatever attempt it was sent as.
            let custom_id = attached.clone().unwrap_or_else(|| row.custom_id.clone());
            if let Some(result) = rows.ready.remove(&custom_id) {
                return result;
            }
            let waiting = Waiter { tx, row: Row { custom_id: custom_id.clone(), ..row.clone() } };
            rows.waiters.insert(custom_id, waiting);
            if attached.is_none() {
                let _ = shared.queue.send(row);
            }
        }
        rx.await.unwrap_or_else(|_| Err(BackendError::Connection("the batch was abandoned".into())))
    }
}

impl Backend for ProviderBatchBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        // Batch rows are whole answers: no streaming, no tool rounds within one run of a batch.
        Capabilities { streaming: false, ..self.online.capabilities() }
    }

    fn batch_stats(&self) -> Option<Value> {
        Some(self.shared.counters.to_json(self.shared.api))
    }

    fn chat(
        &self,
        request: ChatRequest,
        _events: Option<mpsc::UnboundedSender<StreamEvent>>,
    ) -> BoxFuture<'_, Result<ChatResponse, BackendError>> {
        Box::pin(self.call(request))
    }
}

/// The row's custom id: readable (the call's id) where the provider's pattern allows
/// (`^[a-zA-Z0-9_-]{1,64}$`, Anthropic's), a digest of the call and its body (a validation retry
/// resends the same call with another body), and the attempt. A resumed run computes the same id
/// for the same call.
pub fn custom_id(request_id: &str, body: &[u8]) -> String {
    let (call, attempt) = split_request_id(request_id).unwrap_or((request_id, 1));
    let mut hasher = Sha256::new();
    hasher.update(call.as_bytes());
    hasher.update([0]);
    hasher.update(body);
    let digest = hasher.finalize();
    let mut out = String::with_capacity(64);
    let readable = call.len() <= 30 && call.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if readable {
        out.push_str(call);
        out.push('-');
    } else {
        out.push('r');
    }
    for byte in digest.iter().take(8) {
        let _ = write!(out, "{byte:02x}");
    }
    let _ = write!(out, "-a{attempt}");
    out
}

/// A custom id without its attempt: the call it belongs to.
fn row_key(custom_id: &str) -> Option<&str> {
    custom_id.rsplit_once("-a").map(|(key, _)| key)
}

/// Gathers rows into batches: a batch goes out when full (requests or bytes) or once no row came
/// for `linger`.
async fn collect(shared: Arc<Shared>, mut incoming: mpsc::UnboundedReceiver<Row>) {
    let (max_requests, max_bytes) = (shared.options.max_requests, shared.options.max_bytes);
    let mut carry: Option<Row> = None;
    loop {
        let first = match carry.take() {
            Some(row) => row,
            None => match incoming.recv().await {
                Some(row) => row,
                None => return,
            },
        };
        let mut bytes = first.line.len() + 1;
        let mut rows = vec![first];
        loop {
            if rows.len() >= max_requests {
                break;
            }
            match tokio::time::timeout(shared.options.linger, incoming.recv()).await {
                Ok(Some(row)) => {
                    if bytes + row.line.len() + 1 > max_bytes {
                        carry = Some(row);
                        break;
                    }
                    bytes += row.line.len() + 1;
                    rows.push(row);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let shared = shared.clone();
        tokio::spawn(async move { submit(&shared, rows).await });
    }
}

/// Creates one batch of `rows`, records it, then follows it to its end.
async fn submit(shared: &Arc<Shared>, rows: Vec<Row>) {
    let custom_ids: Vec<String> = rows.iter().map(|r| r.custom_id.clone()).collect();
    shared.counters.rows_submitted.fetch_add(rows.len() as u64, Relaxed);
    let created = match shared.api {
        BatchApi::OpenAi => shared.client.create_openai(&rows).await,
        BatchApi::Anthropic => shared.client.create_anthropic(&rows).await,
    };
    let batch_id = match created {
        Ok(id) => id,
        Err(e) => {
            for id in &custom_ids {
                shared.deliver(id, Err(e.clone()));
            }
            return;
        }
    };
    if let Some(ledger) = &shared.ledger {
        ledger
            .submitted(BatchRecord {
                api: shared.api.label().to_owned(),
                batch_id: batch_id.clone(),
                custom_ids: custom_ids.clone(),
            })
            .await;
    }
    shared.counters.submitted.fetch_add(1, Relaxed);
    follow(shared, batch_id, custom_ids).await;
}

/// How a batch ended, as far as its rows are concerned.
enum Ending {
    /// Rows answered are in the results; the rest did not run (`why`: expired, cancelled).
    Results { why: &'static str },
    /// The batch failed as a whole (its input was refused): every row fails with this.
    Failed(BackendError),
}

/// A row in the results.
enum RowOutcome {
    Answer(RowResult),
    NotRun,
}

/// Polls a batch until it ends, downloads its results and hands each row on.
async fn follow(shared: &Arc<Shared>, batch_id: String, custom_ids: Vec<String>) {
    shared.counters.in_progress.fetch_add(1, Relaxed);
    let mut wait = shared.options.poll_interval;
    let mut failures = 0u32;
    let ending = loop {
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(shared.options.max_poll_interval.max(shared.options.poll_interval));
        match shared.client.poll(&batch_id).await {
            Ok(None) => failures = 0,
            Ok(Some(ending)) => break ending,
            Err(e) if e.retryable() && failures + 1 < POLL_FAILURES => failures += 1,
            Err(e) => break Poll::Failed(e),
        }
    };
    let ending = match ending {
        Poll::Failed(e) => Ending::Failed(e),
        Poll::Ended { why, files } => match shared.client.results(&files).await {
            Ok(outcomes) => {
                deliver_all(shared, &custom_ids, outcomes, why);
                Ending::Results { why }
            }
            Err(e) => Ending::Failed(e),
        },
    };
    match ending {
        Ending::Failed(e) => {
            shared.counters.failed.fetch_add(1, Relaxed);
            for id in &custom_ids {
                shared.counters.rows_errored.fetch_add(1, Relaxed);
                shared.deliver(id, Err(e.clone()));
            }
        }
        Ending::Results { why: "expired" } => {
            shared.counters.expired.fetch_add(1, Relaxed);
        }
        Ending::Results { why: "cancelled" } => {
            shared.counters.cancelled.fetch_add(1, Relaxed);
        }
        Ending::Results { .. } => {}
    }
    if let Some(ledger) = &shared.ledger {
        ledger.ended(batch_id).await;
    }
    shared.counters.in_progress.fetch_sub(1, Relaxed);
}

fn deliver_all(shared: &Shared, custom_ids: &[String], mut outcomes: HashMap<String, RowOutcome>, why: &str) {
    for id in custom_ids {
        match outcomes.remove(id) {
            Some(RowOutcome::Answer(Ok(response))) => {
                shared.counters.rows_done.fetch_add(1, Relaxed);
                shared.deliver(id, Ok(response));
            }
            Some(RowOutcome::Answer(Err(e))) => {
                shared.counters.rows_errored.fetch_add(1, Relaxed);
                shared.deliver(id, Err(e));
            }
            // Not in the results at all counts as not run: it is sent again, never lost.
            Some(RowOutcome::NotRun) | None => shared.resubmit(id, why),
        }
    }
}

/// A poll's answer.
enum Poll {
    Ended { why: &'static str, files: Vec<String> },
    Failed(BackendError),
}

/// The provider's batch endpoints, with the key and the bounds every request shares.
struct ApiClient {
    api: BatchApi,
    http: reqwest::Client,
    base: String,
    secret: Option<Secret>,
}

impl ApiClient {
    fn new(api: BatchApi, base: String, key: Option<Secret>, options: &BackendOptions) -> Result<Self, BackendError> {
        let mut headers = HeaderMap::new();
        for (name, value) in &options.extra_headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| BackendError::Config(format!("header name {name:?}: {e}")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| BackendError::Config(format!("header {name} has a bad value")))?;
            headers.insert(name, value);
        }
        if let Some(key) = &key {
            let (name, value) = match api {
                BatchApi::OpenAi => (AUTHORIZATION, format!("Bearer {}", key.expose())),
                BatchApi::Anthropic => (HeaderName::from_static("x-api-key"), key.expose().to_owned()),
            };
            let mut value = HeaderValue::from_str(&value)
                .map_err(|_| BackendError::Config("the API key is not a valid header".into()))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        if api == BatchApi::Anthropic && !headers.contains_key("anthropic-version") {
            headers.insert(HeaderName::from_static("anthropic-version"), HeaderValue::from_static(API_VERSION));
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(options.connect_timeout)
            .timeout(API_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| BackendError::Config(format!("building the HTTP client: {e}")))?;
        Ok(Self { api, http, base, secret: key })
    }

    fn redact(&self, e: BackendError) -> BackendError {
        let Some(secret) = &self.secret else { return e };
        match e {
            BackendError::Server { status, message } => {
                BackendError::Server { status, message: secret.redact(&message) }
            }
            BackendError::Rejected { status, message } => {
                BackendError::Rejected { status, message: secret.redact(&message) }
            }
            BackendError::Auth { status, message } => BackendError::Auth { status, message: secret.redact(&message) },
            BackendError::Overloaded(m) => BackendError::Overloaded(secret.redact(&m)),
            BackendError::Connection(m) => BackendError::Connection(secret.redact(&m)),
            BackendError::Protocol(m) => BackendError::Protocol(secret.redact(&m)),
            other => other,
        }
    }

    /// Sends a request (built afresh for each attempt), retrying what is worth retrying; the whole
    /// body of a 2xx answer.
    async fn send(&self, build: impl Fn() -> reqwest::RequestBuilder) -> Result<Bytes, BackendError> {
        let mut delay = Duration::from_millis(500);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = self.send_once(build()).await.map_err(|e| self.redact(e));
            match outcome {
                Err(e) if e.retryable() && attempt < API_ATTEMPTS => {
                    tokio::time::sleep(e.retry_after().unwrap_or(delay).min(Duration::from_secs(60))).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
                other => return other,
            }
        }
    }

    async fn send_once(&self, request: reqwest::RequestBuilder) -> Result<Bytes, BackendError> {
        let response = request.send().await.map_err(|e| transport_error(&e))?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return limited_body(response, MAX_RESULTS_BYTES, None).await.map_err(super::http::BodyError::into_backend);
        }
        let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = limited_body(response, 64 * 1024, None).await.unwrap_or_default();
        Err(status_error(status, retry_after.as_deref(), &body, SystemTime::now()))
    }

    async fn json(&self, build: impl Fn() -> reqwest::RequestBuilder) -> Result<Value, BackendError> {
        let bytes = self.send(build).await?;
        serde_json::from_slice(&bytes).map_err(|e| BackendError::Protocol(format!("batch API answer is not JSON: {e}")))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn create_openai(&self, rows: &[Row]) -> Result<String, BackendError> {
        let mut jsonl = Vec::with_capacity(rows.iter().map(|r| r.line.len() + 1).sum());
        for row in rows {
            jsonl.extend_from_slice(&row.line);
            jsonl.push(b'\n');
        }
        let boundary = format!("batchagent-{:016x}", u64::from_le_bytes(digest8(&jsonl)));
        let mut form = Vec::with_capacity(jsonl.len() + 512);
        let _ = write!(
            Cursor(&mut form),
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"batchagent.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n"
        );
        form.extend_from_slice(&jsonl);
        let _ = write!(Cursor(&mut form), "\r\n--{boundary}--\r\n");
        let form = Bytes::from(form);
        let content_type = format!("multipart/form-data; boundary={boundary}");
        let file = self
            .json(|| self.http.post(self.url("/files")).header(CONTENT_TYPE, &content_type).body(form.clone()))
            .await?;
        let file_id = string_field(&file, "id", "file upload")?;
        let body = json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
                          "metadata": {"created_by": "batchagent"}})
        .to_string();
        let batch = self
            .json(|| self.http.post(self.url("/batches")).header(CONTENT_TYPE, "application/json").body(body.clone()))
            .await?;
        string_field(&batch, "id", "batch creation")
    }

    async fn create_anthropic(&self, rows: &[Row]) -> Result<String, BackendError> {
        let mut body = Vec::with_capacity(rows.iter().map(|r| r.line.len() + 1).sum::<usize>() + 16);
        body.extend_from_slice(b"{\"requests\":[");
        for (i, row) in rows.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&row.line);
        }
        body.extend_from_slice(b"]}");
        let body = Bytes::from(body);
        let batch = self
            .json(|| {
                self.http
                    .post(self.url("/messages/batches"))
                    .header(CONTENT_TYPE, "application/json")
                    .body(body.clone())
            })
            .await?;
        string_field(&batch, "id", "message batch creation")
    }

    /// `None` while the batch runs; how it ended and where its results are once it has.
    async fn poll(&self, batch_id: &str) -> Result<Option<Poll>, BackendError> {
        match self.api {
            BatchApi::OpenAi => {
                let batch = self.json(|| self.http.get(self.url(&format!("/batches/{batch_id}")))).await?;
                let status = batch.get("status").and_then(Value::as_str).unwrap_or_default();
                let why = match status {
                    "validating" | "in_progress" | "finalizing" | "cancelling" => return Ok(None),
                    "completed" => "completed",
                    "expired" => "expired",
                    "cancelled" => "cancelled",
                    "failed" => return Ok(Some(Poll::Failed(openai_batch_failure(&batch)))),
                    other => {
                        return Err(BackendError::Protocol(format!("batch {batch_id} has an unknown status {other:?}")))
                    }
                };
                let files = ["output_file_id", "error_file_id"]
                    .iter()
                    .filter_map(|key| batch.get(*key).and_then(Value::as_str))
                    .map(|id| self.url(&format!("/files/{id}/content")))
                    .collect();
                Ok(Some(Poll::Ended { why, files }))
            }
            BatchApi::Anthropic => {
                let batch = self.json(|| self.http.get(self.url(&format!("/messages/batches/{batch_id}")))).await?;
                if batch.get("processing_status").and_then(Value::as_str) != Some("ended") {
                    return Ok(None);
                }
                let counts = batch.get("request_counts");
                let count = |key: &str| counts.and_then(|c| c.get(key)).and_then(Value::as_u64).unwrap_or(0);
                let why = if count("canceled") > 0 {
                    "cancelled"
                } else if count("expired") > 0 {
                    "expired"
                } else {
                    "completed"
                };
                let url = match batch.get("results_url").and_then(Value::as_str) {
                    Some(url) => self.same_origin(url)?,
                    None => self.url(&format!("/messages/batches/{batch_id}/results")),
                };
                Ok(Some(Poll::Ended { why, files: vec![url] }))
            }
        }
    }

    /// A `results_url` is fetched with the key only when it is on the API's own host.
    fn same_origin(&self, url: &str) -> Result<String, BackendError> {
        let origin = |u: &str| {
            reqwest::Url::parse(u)
                .ok()
                .map(|u| (u.scheme().to_owned(), u.host_str().map(str::to_owned), u.port_or_known_default()))
        };
        if origin(url).is_some() && origin(url) == origin(&self.base) {
            Ok(url.to_owned())
        } else {
            Err(BackendError::Protocol(format!(
                "the batch's results_url is not on the API's host ({}); not sending the key there",
                crate::secret::display_url(url)
            )))
        }
    }

    /// Every row of the result files, by custom id.
    async fn results(&self, files: &[String]) -> Result<HashMap<String, RowOutcome>, BackendError> {
        let mut out = HashMap::new();
        for url in files {
            let bytes = self.send(|| self.http.get(url)).await?;
            for line in bytes.split(|&b| b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)) {
                let value: Value = serde_json::from_slice(line)
                    .map_err(|e| BackendError::Protocol(format!("a batch result line is not JSON: {e}")))?;
                let Some(custom_id) = value.get("custom_id").and_then(Value::as_str) else {
                    return Err(BackendError::Protocol("a batch result line has no custom_id".into()));
                };
                let outcome = match self.api {
                    BatchApi::OpenAi => openai_row(&value),
                    BatchApi::Anthropic => anthropic_row(&value),
                };
                let outcome = match outcome {
                    RowOutcome::Answer(Err(e)) => RowOutcome::Answer(Err(self.redact(e))),
                    other => other,
                };
                out.insert(custom_id.to_owned(), outcome);
            }
        }
        Ok(out)
    }
}

/// An `OpenAI` output or error line: `{"custom_id", "response": {"status_code", "body"}, "error"}`.
fn openai_row(value: &Value) -> RowOutcome {
    if let Some(response) = value.get("response").filter(|r| !r.is_null()) {
        let status = response.get("status_code").and_then(Value::as_u64).unwrap_or(0) as u16;
        let body = response.get("body").cloned().unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return RowOutcome::Answer(parse_chat_completion(&body.to_string()));
        }
        return RowOutcome::Answer(Err(status_error(status, None, body.to_string().as_bytes(), SystemTime::now())));
    }
    let error = value.get("error").cloned().unwrap_or(Value::Null);
    let code = error.get("code").and_then(Value::as_str).unwrap_or_default();
    if matches!(code, "batch_expired" | "batch_cancelled") {
        return RowOutcome::NotRun;
    }
    let message = error.get("message").and_then(Value::as_str).unwrap_or("the row failed without a message");
    RowOutcome::Answer(Err(BackendError::Rejected { status: 400, message: format!("{code}: {message}") }))
}

/// An Anthropic results line: `{"custom_id", "result": {"type": "succeeded" | "errored" | ...}}`.
fn anthropic_row(value: &Value) -> RowOutcome {
    let result = value.get("result").cloned().unwrap_or(Value::Null);
    match result.get("type").and_then(Value::as_str) {
        Some("succeeded") => {
            let message = result.get("message").cloned().unwrap_or(Value::Null);
            RowOutcome::Answer(parse_message(&message.to_string()))
        }
        Some("errored") => {
            let error = result.get("error").cloned().unwrap_or(Value::Null);
            let kind = error.pointer("/error/type").and_then(Value::as_str).unwrap_or("api_error");
            // The status the same error has online (Anthropic's documented error types).
            let status = match kind {
                "invalid_request_error" => 400,
                "authentication_error" => 401,
                "permission_error" => 403,
                "not_found_error" => 404,
                "request_too_large" => 413,
                "rate_limit_error" => 429,
                "overloaded_error" => 529,
                _ => 500,
            };
            let body = error.to_string();
            let e = status_error(status, None, body.as_bytes(), SystemTime::now());
            RowOutcome::Answer(Err(match e {
                BackendError::Server { status: 529, message } => BackendError::Overloaded(message),
                other => other,
            }))
        }
        Some("canceled" | "expired") => RowOutcome::NotRun,
        other => {
            RowOutcome::Answer(Err(BackendError::Protocol(format!("a batch result has an unknown type {other:?}"))))
        }
    }
}

/// Why an `OpenAI` batch failed, from its `errors.data` (the input lines it refused).
fn openai_batch_failure(batch: &Value) -> BackendError {
    let errors = batch.pointer("/errors/data").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut message = String::from("the batch failed");
    for error in errors.iter().take(5) {
        let code = error.get("code").and_then(Value::as_str).unwrap_or("error");
        let text = error.get("message").and_then(Value::as_str).unwrap_or_default();
        match error.get("line").and_then(Value::as_u64) {
            Some(line) => {
                let _ = write!(message, "; line {line}: {code}: {text}");
            }
            None => {
                let _ = write!(message, "; {code}: {text}");
            }
        }
    }
    BackendError::Rejected { status: 400, message }
}

fn string_field(value: &Value, key: &str, what: &str) -> Result<String, BackendError> {
    value
        .get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| BackendError::Protocol(format!("the {what} answer has no {key:?}")))
}

fn transport_error(e: &reqwest::Error) -> BackendError {
    use std::error::Error as _;
    let mut text = e.to_string();
    if let Some(at) = text.find(" for url (") {
        text.truncate(at);
    }
    let mut source = e.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    if e.is_timeout() {
        BackendError::Timeout { which: crate::conversation::TimeoutKind::Call, after: API_TIMEOUT }
    } else {
        BackendError::Connection(text)
    }
}

fn digest8(bytes: &[u8]) -> [u8; 8] {
    let digest = Sha256::digest(bytes);
    let mut out = [0u8; 8];
    for (to, from) in out.iter_mut().zip(digest.iter()) {
        *to = *from;
    }
    out
}

/// `write!` into a byte buffer.
struct Cursor<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn custom_ids_are_stable_valid_and_tell_retries_apart() {
        let a = custom_id("job-1-t0-a1", b"{\"x\":1}");
        assert_eq!(a, custom_id("job-1-t0-a1", b"{\"x\":1}"));
        assert!(a.starts_with("job-1-t0-") && a.ends_with("-a1"), "{a}");
        assert_ne!(a, custom_id("job-1-t0-a1", b"{\"x\":2}"), "a validation retry has another body");
        let retry = custom_id("job-1-t0-a2", b"{\"x\":1}");
        assert_eq!(row_key(&retry), row_key(&a));
        let odd = custom_id("a job/with spaces and a very long name indeed-t0-a1", b"{}");
        assert!(odd.starts_with('r'));
        for id in [a, retry, odd] {
            assert!(id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'), "{id}");
        }
    }

    #[test]
    fn openai_rows_map_onto_answers_errors_and_rows_not_run() {
        let ok = json!({"custom_id": "c", "response": {"status_code": 200, "body": {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}}, "error": null});
        assert!(matches!(openai_row(&ok), RowOutcome::Answer(Ok(r)) if r.content == "hi"));
        let failed = json!({"custom_id": "c", "response": {"status_code": 500, "body": {"error": {"message": "boom"}}}, "error": null});
        assert!(matches!(openai_row(&failed), RowOutcome::Answer(Err(BackendError::Server { status: 500, .. }))));
        let expired = json!({"custom_id": "c", "response": null, "error": {"code": "batch_expired", "message": "x"}});
        assert!(matches!(openai_row(&expired), RowOutcome::NotRun));
    }

    #[test]
    fn anthropic_rows_map_onto_answers_errors_and_rows_not_run() {
        let ok = json!({"custom_id": "c", "result": {"type": "succeeded", "message": {"id": "m", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "usage": {"input_tokens": 1, "output_tokens": 1}}}});
        assert!(matches!(anthropic_row(&ok), RowOutcome::Answer(Ok(r)) if r.content == "hi"));
        let errored = json!({"custom_id": "c", "result": {"type": "errored", "error": {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}}});
        assert!(matches!(anthropic_row(&errored), RowOutcome::Answer(Err(BackendError::Rejected { status: 400, .. }))));
        let overloaded = json!({"custom_id": "c", "result": {"type": "errored", "error": {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}}});
        assert!(matches!(anthropic_row(&overloaded), RowOutcome::Answer(Err(BackendError::Overloaded(_)))));
        for kind in ["canceled", "expired"] {
            let v = json!({"custom_id": "c", "result": {"type": kind}});
            assert!(matches!(anthropic_row(&v), RowOutcome::NotRun));
        }
    }
}
