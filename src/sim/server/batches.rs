//! The provider batch APIs, with their documented wire formats: `OpenAI`'s Files
//! (`POST /v1/files` multipart with `purpose=batch`, `GET /v1/files/{id}`, `GET
//! /v1/files/{id}/content`) and Batches (`POST /v1/batches`, `GET /v1/batches[/{id}]`, `POST
//! /v1/batches/{id}/cancel`; statuses `validating` -> `in_progress` -> `finalizing` -> `completed`,
//! or `failed`, `expired`, `cancelling` -> `cancelled`; results as JSONL output and error files), and
//! Anthropic's Message Batches (`POST /v1/messages/batches`, `GET /v1/messages/batches[/{id}]`,
//! `POST /v1/messages/batches/{id}/cancel`, `GET /v1/messages/batches/{id}/results`; status
//! `in_progress` -> `canceling` -> `ended` with `request_counts`; result types `succeeded`,
//! `errored`, `canceled`, `expired`).
//!
//! Each row is answered by the same handler, engine and behaviour model as an online call with the
//! same body, so a batch row and an online call give the same answer. When a row counts as finished
//! is modelled: row `i` finishes at `u_i x batch_delay` after creation (`u_i` a seeded draw), so
//! `request_counts` progress while the batch runs, a cancelled batch keeps the rows finished before
//! the cancel, and an expiring batch (`batch_expire_rate`) keeps those finished in the first half of
//! the delay. `POST /sim/batches/complete` ends every running batch at once (tests use it instead
//! of waiting).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{Notify, Semaphore};

use super::super::draw::{hash_bytes, mix};
use super::{anthropic, json_response, openai, rfc3339_at, AppState};

/// `OpenAI`: requests per input file, bytes per batch input file.
pub const OPENAI_MAX_REQUESTS: usize = 50_000;
pub const OPENAI_MAX_FILE_BYTES: usize = 200 * 1024 * 1024;
/// Anthropic: requests and bytes per message batch.
pub const ANTHROPIC_MAX_REQUESTS: usize = 100_000;
pub const ANTHROPIC_MAX_BYTES: usize = 256 * 1024 * 1024;
/// Rows of one batch run through the engine at once.
const ROW_CONCURRENCY: usize = 256;
/// Longest answer body read from the online handler for one row.
const MAX_ROW_BYTES: usize = 64 * 1024 * 1024;
/// How long a batch may run before it expires, as both APIs document it (24 hours).
const WINDOW_SECS: u64 = 24 * 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    OpenAi,
    Anthropic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Validating,
    InProgress,
    Finalizing,
    Completed,
    Failed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Phase {
    fn openai(self) -> &'static str {
        match self {
            Self::Validating => "validating",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }

    fn anthropic(self) -> &'static str {
        match self {
            Self::Validating | Self::InProgress | Self::Finalizing => "in_progress",
            Self::Cancelling => "canceling",
            Self::Completed | Self::Failed | Self::Expired | Self::Cancelled => "ended",
        }
    }

    fn ended(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Expired | Self::Cancelled)
    }
}

/// How a row ended.
#[derive(Debug, Clone)]
enum Outcome {
    Answer { status: u16, body: Value },
    Expired,
    Cancelled,
}

struct StoredFile {
    bytes: Bytes,
    filename: String,
    purpose: String,
    created_at: u64,
}

struct SimBatch {
    id: String,
    api: Api,
    seq: u64,
    phase: Phase,
    created: Duration,
    /// Unix seconds of each phase change.
    times: HashMap<&'static str, Duration>,
    total: usize,
    /// Rows answered so far (custom id, outcome, finish offset from creation), in input order.
    rows: Vec<(String, Outcome, Duration)>,
    input_file_id: Option<String>,
    endpoint: String,
    completion_window: String,
    metadata: Value,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    errors: Option<Value>,
    /// Anthropic results JSONL, once ended.
    results: Option<Bytes>,
    cancel: bool,
    wake: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    files: HashMap<String, StoredFile>,
    batches: BTreeMap<u64, SimBatch>,
    by_id: HashMap<String, u64>,
    next_file: u64,
    next_batch: u64,
    /// `POST /sim/batches/complete` was called this many times; a batch ends when it has been.
    completed_on_demand: u64,
    counters: BTreeMap<&'static str, u64>,
}

#[derive(Default)]
pub(crate) struct BatchStore {
    inner: Mutex<Inner>,
    ends: AtomicU64,
}

impl BatchStore {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts for `/sim/stats`: batches created and how they ended, rows by outcome.
    pub fn counters(&self) -> Value {
        let inner = self.lock();
        let mut out = serde_json::Map::new();
        for key in [
            "created",
            "completed",
            "failed",
            "expired",
            "cancelled",
            "rows",
            "rows_succeeded",
            "rows_errored",
            "rows_expired",
            "rows_cancelled",
            "files",
        ] {
            out.insert(key.into(), Value::from(inner.counters.get(key).copied().unwrap_or(0)));
        }
        out.insert("in_progress".into(), Value::from(inner.batches.values().filter(|b| !b.phase.ended()).count()));
        Value::Object(out)
    }
}

fn bump(inner: &mut Inner, key: &'static str, by: u64) {
    *inner.counters.entry(key).or_insert(0) += by;
}

fn now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

pub(super) fn routes() -> Router<Arc<AppState>> {
    // Batch inputs are far larger than one chat request: the documented limits, plus the framing.
    let upload_limit = DefaultBodyLimit::max(ANTHROPIC_MAX_BYTES + 1024 * 1024);
    Router::new()
        .route("/v1/files", post(upload_file).layer(upload_limit))
        .route("/v1/files/{id}", get(file_info))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(openai_create).get(openai_list))
        .route("/v1/batches/{id}", get(openai_retrieve))
        .route("/v1/batches/{id}/cancel", post(openai_cancel))
        .route("/v1/messages/batches", post(anthropic_create).get(anthropic_list).layer(upload_limit))
        .route("/v1/messages/batches/{id}", get(anthropic_retrieve))
        .route("/v1/messages/batches/{id}/cancel", post(anthropic_cancel))
        .route("/v1/messages/batches/{id}/results", get(anthropic_results))
        .route("/sim/batches/complete", post(complete_now))
}

fn openai_error(status: StatusCode, message: &str, param: Option<&str>) -> Response {
    json_response(
        status,
        &json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": null}}),
    )
}

fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    json_response(status, &json!({"type": "error", "error": {"type": kind, "message": message}}))
}

// ---------------------------------------------------------------- OpenAI files

/// The parts of a `multipart/form-data` body: (field name, file name, bytes). Only what the Files
/// API takes is understood: named parts, with or without a file name.
fn multipart_parts(content_type: &str, body: &[u8]) -> Result<Vec<(String, Option<String>, Bytes)>, String> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))
        .map(|b| b.trim_matches('"'))
        .filter(|b| !b.is_empty())
        .ok_or("expected a multipart/form-data body with a boundary")?;
    let delimiter = format!("--{boundary}");
    let finder = memchr::memmem::Finder::new(delimiter.as_bytes());
    let starts: Vec<usize> = finder.find_iter(body).collect();
    let mut parts = Vec::new();
    for pair in starts.windows(2) {
        let (from, to) = (pair[0] + delimiter.len(), pair[1]);
        let Some(part) = body.get(from..to) else { continue };
        let part = part.strip_prefix(b"\r\n").unwrap_or(part);
        let part = part.strip_suffix(b"\r\n").unwrap_or(part);
        let split = memchr::memmem::find(part, b"\r\n\r\n").ok_or("a multipart part has no header end")?;
        let headers = String::from_utf8_lossy(&part[..split]);
        let content = Bytes::copy_from_slice(&part[split + 4..]);
        let disposition = headers
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))
            .ok_or("a multipart part has no Content-Disposition")?;
        let field = |name: &str| {
            disposition.split(';').map(str::trim).find_map(|p| {
                p.strip_prefix(name).and_then(|v| v.strip_prefix('=')).map(|v| v.trim_matches('"').to_owned())
            })
        };
        let name = field("name").ok_or("a multipart part has no name")?;
        parts.push((name, field("filename"), content));
    }
    Ok(parts)
}

fn file_object(id: &str, file: &StoredFile) -> Value {
    json!({
        "id": id, "object": "file", "bytes": file.bytes.len(), "created_at": file.created_at,
        "filename": file.filename, "purpose": file.purpose, "status": "processed", "status_details": null,
        "expires_at": null,
    })
}

async fn upload_file(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let parts = match multipart_parts(content_type, &body) {
        Ok(parts) => parts,
        Err(e) => return openai_error(StatusCode::BAD_REQUEST, &e, None),
    };
    let purpose =
        parts.iter().find(|(n, _, _)| n == "purpose").map(|(_, _, v)| String::from_utf8_lossy(v).into_owned());
    let Some(purpose) = purpose else {
        return openai_error(StatusCode::BAD_REQUEST, "Missing required parameter: 'purpose'.", Some("purpose"));
    };
    if purpose != "batch" {
        return openai_error(
            StatusCode::BAD_REQUEST,
            &format!("'{purpose}' is not one of the purposes this server takes: 'batch'"),
            Some("purpose"),
        );
    }
    let Some((_, filename, bytes)) = parts.into_iter().find(|(n, _, _)| n == "file") else {
        return openai_error(StatusCode::BAD_REQUEST, "Missing required parameter: 'file'.", Some("file"));
    };
    if bytes.len() > OPENAI_MAX_FILE_BYTES {
        return openai_error(
            StatusCode::BAD_REQUEST,
            &format!("File is too large: {} bytes; a batch input file holds at most 200 MB.", bytes.len()),
            Some("file"),
        );
    }
    let mut inner = state.batches.lock();
    let id = new_file(&mut inner, bytes, filename.unwrap_or_else(|| "upload.jsonl".into()), "batch");
    json_response(StatusCode::OK, &file_object(&id, &inner.files[&id]))
}

fn new_file(inner: &mut Inner, bytes: Bytes, filename: String, purpose: &str) -> String {
    inner.next_file += 1;
    let id = format!("file-{:024x}", mix(0x6669_6c65, inner.next_file));
    inner
        .files
        .insert(id.clone(), StoredFile { bytes, filename, purpose: purpose.to_owned(), created_at: now().as_secs() });
    bump(inner, "files", 1);
    id
}

async fn file_info(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let inner = state.batches.lock();
    match inner.files.get(&id) {
        Some(file) => json_response(StatusCode::OK, &file_object(&id, file)),
        None => openai_error(StatusCode::NOT_FOUND, &format!("No such File object: {id}"), Some("id")),
    }
}

async fn file_content(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let inner = state.batches.lock();
    match inner.files.get(&id) {
        Some(file) => bytes_response("application/octet-stream", file.bytes.clone()),
        None => openai_error(StatusCode::NOT_FOUND, &format!("No such File object: {id}"), Some("id")),
    }
}

fn bytes_response(content_type: &'static str, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

// ---------------------------------------------------------------- OpenAI batches

fn openai_batch(batch: &SimBatch) -> Value {
    let at = |key: &str| batch.times.get(key).map(Duration::as_secs);
    let (completed, failed) = batch.rows.iter().fold((0, 0), |(ok, bad), (_, outcome, _)| match outcome {
        Outcome::Answer { status, .. } if (200..300).contains(status) => (ok + 1, bad),
        _ => (ok, bad + 1),
    });
    let visible = batch.phase.ended();
    json!({
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint, "errors": batch.errors,
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
        "status": batch.phase.openai(),
        "output_file_id": if visible { batch.output_file_id.clone() } else { None },
        "error_file_id": if visible { batch.error_file_id.clone() } else { None },
        "created_at": batch.created.as_secs(), "in_progress_at": at("in_progress"),
        "expires_at": batch.created.as_secs() + WINDOW_SECS, "finalizing_at": at("finalizing"),
        "completed_at": at("completed"), "failed_at": at("failed"), "expired_at": at("expired"),
        "cancelling_at": at("cancelling"), "cancelled_at": at("cancelled"),
        "request_counts": {"total": batch.total, "completed": if visible { completed } else { 0 }, "failed": if visible { failed } else { 0 }},
        "metadata": batch.metadata,
    })
}

/// One input line, checked as `OpenAI` checks them; `Err` is a `BatchError` (code, message).
fn openai_line(line: &str, endpoint: &str) -> Result<(String, Value), (&'static str, String)> {
    let value: Value = serde_json::from_str(line)
        .map_err(|e| ("invalid_json_line", format!("This line is not parseable as valid JSON: {e}")))?;
    let custom_id = value
        .get("custom_id")
        .and_then(Value::as_str)
        .ok_or(("missing_required_parameter", "Missing required parameter: 'custom_id'.".to_owned()))?;
    if value.get("method").and_then(Value::as_str) != Some("POST") {
        return Err(("invalid_method", "The 'method' of each request must be POST.".to_owned()));
    }
    let url = value.get("url").and_then(Value::as_str).unwrap_or_default();
    if url != endpoint {
        return Err((
            "mismatched_endpoint",
            format!("The 'url' of this request ('{url}') does not match the batch's endpoint ('{endpoint}')."),
        ));
    }
    let body = value
        .get("body")
        .filter(|b| b.is_object())
        .ok_or(("missing_required_parameter", "Missing required parameter: 'body' (a JSON object).".to_owned()))?;
    Ok((custom_id.to_owned(), body.clone()))
}

async fn openai_create(State(state): State<Arc<AppState>>, raw: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&raw) else {
        return openai_error(StatusCode::BAD_REQUEST, "We could not parse the JSON body of your request.", None);
    };
    let Some(file_id) = body.get("input_file_id").and_then(Value::as_str) else {
        return openai_error(
            StatusCode::BAD_REQUEST,
            "Missing required parameter: 'input_file_id'.",
            Some("input_file_id"),
        );
    };
    let endpoint = body.get("endpoint").and_then(Value::as_str).unwrap_or_default().to_owned();
    if !matches!(endpoint.as_str(), "/v1/chat/completions" | "/v1/completions") {
        return openai_error(
            StatusCode::BAD_REQUEST,
            &format!(
                "Invalid value: '{endpoint}'. Supported values are: '/v1/chat/completions' and '/v1/completions'."
            ),
            Some("endpoint"),
        );
    }
    let window = body.get("completion_window").and_then(Value::as_str).unwrap_or_default().to_owned();
    if window != "24h" {
        return openai_error(
            StatusCode::BAD_REQUEST,
            &format!("Invalid value: '{window}'. Supported values are: '24h'."),
            Some("completion_window"),
        );
    }
    let mut inner = state.batches.lock();
    let Some(file) = inner.files.get(file_id) else {
        return openai_error(StatusCode::NOT_FOUND, &format!("No such File object: {file_id}"), Some("input_file_id"));
    };
    let input = file.bytes.clone();
    let (seq, id) = new_batch(&mut inner, Api::OpenAi, "batch_");
    let batch = SimBatch {
        input_file_id: Some(file_id.to_owned()),
        endpoint: endpoint.clone(),
        completion_window: window,
        metadata: body.get("metadata").cloned().unwrap_or(Value::Null),
        ..SimBatch::new(id, Api::OpenAi, seq)
    };
    let reply = openai_batch(&batch);
    let wake = batch.wake.clone();
    insert_batch(&mut inner, batch);
    drop(inner);
    tokio::spawn(run_openai(state, seq, input, endpoint, wake));
    json_response(StatusCode::OK, &reply)
}

async fn run_openai(state: Arc<AppState>, seq: u64, input: Bytes, endpoint: String, wake: Arc<Notify>) {
    let text = String::from_utf8_lossy(&input);
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        match openai_line(line, &endpoint) {
            Ok((custom_id, body)) => {
                if !seen.insert(custom_id.clone()) {
                    errors.push(json!({"code": "duplicate_custom_id", "message": format!("The custom_id '{custom_id}' is used more than once in this batch."), "param": "custom_id", "line": n + 1}));
                }
                rows.push((custom_id, body));
            }
            Err((code, message)) => {
                errors.push(json!({"code": code, "message": message, "param": null, "line": n + 1}));
            }
        }
    }
    if rows.is_empty() && errors.is_empty() {
        errors.push(
            json!({"code": "empty_file", "message": "The batch input file is empty.", "param": null, "line": null}),
        );
    }
    if rows.len() > OPENAI_MAX_REQUESTS {
        errors.push(json!({"code": "too_many_requests", "message": format!("The batch input file holds {} requests; at most {OPENAI_MAX_REQUESTS} are allowed.", rows.len()), "param": null, "line": null}));
    }
    if !errors.is_empty() {
        let mut inner = state.batches.lock();
        if let Some(batch) = inner.batches.get_mut(&seq) {
            batch.errors = Some(json!({"object": "list", "data": errors}));
            batch.set_phase(Phase::Failed);
        }
        bump(&mut inner, "failed", 1);
        return;
    }
    run_rows(&state, seq, rows, wake, Api::OpenAi, &endpoint).await;
}

async fn openai_retrieve(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let inner = state.batches.lock();
    match find(&inner, &id, Api::OpenAi) {
        Some(batch) => json_response(StatusCode::OK, &openai_batch(batch)),
        None => openai_error(StatusCode::NOT_FOUND, &format!("No batch found with id '{id}'."), Some("batch_id")),
    }
}

async fn openai_cancel(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let mut inner = state.batches.lock();
    let Some(&seq) = inner.by_id.get(&id) else {
        return openai_error(StatusCode::NOT_FOUND, &format!("No batch found with id '{id}'."), Some("batch_id"));
    };
    let Some(batch) = inner.batches.get_mut(&seq).filter(|b| b.api == Api::OpenAi) else {
        return openai_error(StatusCode::NOT_FOUND, &format!("No batch found with id '{id}'."), Some("batch_id"));
    };
    if batch.phase.ended() {
        let message = format!("Cannot cancel a batch with status '{}'.", batch.phase.openai());
        return openai_error(StatusCode::CONFLICT, &message, None);
    }
    request_cancel(batch);
    json_response(StatusCode::OK, &openai_batch(batch))
}

#[derive(serde::Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    after: Option<String>,
    after_id: Option<String>,
    before_id: Option<String>,
}

async fn openai_list(State(state): State<Arc<AppState>>, Query(q): Query<ListQuery>) -> Response {
    let inner = state.batches.lock();
    let (page, has_more) = list_page(&inner, Api::OpenAi, &q);
    let data: Vec<Value> = page.iter().map(|b| openai_batch(b)).collect();
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data, "first_id": page.first().map(|b| &b.id),
                "last_id": page.last().map(|b| &b.id), "has_more": has_more}),
    )
}

/// Most recent first; `after` / `after_id` is a cursor into that order, `before_id` the other way.
fn list_page<'a>(inner: &'a Inner, api: Api, q: &ListQuery) -> (Vec<&'a SimBatch>, bool) {
    let limit = q.limit.unwrap_or(20).clamp(1, 1000);
    let all: Vec<&SimBatch> = inner.batches.values().rev().filter(|b| b.api == api).collect();
    let position = |id: &str| all.iter().position(|b| b.id == id);
    let (from, to) = match (q.after.as_deref().or(q.after_id.as_deref()), q.before_id.as_deref()) {
        (Some(after), _) => (position(after).map_or(all.len(), |p| p + 1), all.len()),
        (None, Some(before)) => {
            let end = position(before).unwrap_or(0);
            (end.saturating_sub(limit), end)
        }
        (None, None) => (0, all.len()),
    };
    let slice = &all[from.min(to)..to];
    let page: Vec<&SimBatch> = slice.iter().take(limit).copied().collect();
    let has_more = slice.len() > page.len();
    (page, has_more)
}

// ---------------------------------------------------------------- Anthropic message batches

fn anthropic_batch(batch: &SimBatch, base: &str) -> Value {
    let at = |key: &str| batch.times.get(key).map(|t| rfc3339_at(*t));
    let mut counts = BTreeMap::from([("succeeded", 0u64), ("errored", 0), ("canceled", 0), ("expired", 0)]);
    if batch.phase.ended() {
        for (_, outcome, _) in &batch.rows {
            let key = match outcome {
                Outcome::Answer { status, .. } if (200..300).contains(status) => "succeeded",
                Outcome::Answer { .. } => "errored",
                Outcome::Expired => "expired",
                Outcome::Cancelled => "canceled",
            };
            *counts.entry(key).or_insert(0) += 1;
        }
    }
    let settled: u64 = counts.values().sum();
    let ended = batch.phase.ended();
    json!({
        "id": batch.id, "type": "message_batch", "processing_status": batch.phase.anthropic(),
        "request_counts": {"processing": batch.total as u64 - settled, "succeeded": counts["succeeded"],
                           "errored": counts["errored"], "canceled": counts["canceled"], "expired": counts["expired"]},
        "ended_at": if ended { at("ended") } else { None },
        "created_at": rfc3339_at(batch.created),
        "expires_at": rfc3339_at(batch.created + Duration::from_secs(WINDOW_SECS)),
        "archived_at": null, "cancel_initiated_at": at("cancelling"),
        "results_url": if ended { Some(format!("{base}/v1/messages/batches/{}/results", batch.id)) } else { None },
    })
}

/// `http://host:port` as the client reached this server: `results_url` is absolute.
fn base_url(headers: &HeaderMap) -> String {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("127.0.0.1");
    format!("http://{host}")
}

fn valid_custom_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

async fn anthropic_create(State(state): State<Arc<AppState>>, headers: HeaderMap, raw: Bytes) -> Response {
    let invalid = |message: String| anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", &message);
    if raw.len() > ANTHROPIC_MAX_BYTES {
        return anthropic_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            "Request exceeds the maximum allowed number of bytes (256 MB).",
        );
    }
    let Ok(body) = serde_json::from_slice::<Value>(&raw) else {
        return invalid("request body is not valid JSON".into());
    };
    let Some(requests) = body.get("requests").and_then(Value::as_array) else {
        return invalid("requests: Field required".into());
    };
    if requests.is_empty() {
        return invalid("requests: List should have at least 1 item after validation, not 0".into());
    }
    if requests.len() > ANTHROPIC_MAX_REQUESTS {
        return invalid(format!(
            "requests: List should have at most {ANTHROPIC_MAX_REQUESTS} items after validation, not {}",
            requests.len()
        ));
    }
    let mut rows = Vec::with_capacity(requests.len());
    let mut seen = HashSet::new();
    for (i, request) in requests.iter().enumerate() {
        let custom_id = request.get("custom_id").and_then(Value::as_str).unwrap_or_default();
        if !valid_custom_id(custom_id) {
            return invalid(format!("requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"));
        }
        if !seen.insert(custom_id) {
            return invalid(format!("requests.{i}.custom_id: Duplicate custom_id '{custom_id}' in batch"));
        }
        let Some(params) = request.get("params").filter(|p| p.is_object()) else {
            return invalid(format!("requests.{i}.params: Field required"));
        };
        if params.get("stream").and_then(Value::as_bool) == Some(true) {
            return invalid(format!("requests.{i}.params.stream: streaming is not supported in batches"));
        }
        rows.push((custom_id.to_owned(), params.clone()));
    }
    let mut inner = state.batches.lock();
    let (seq, id) = new_batch(&mut inner, Api::Anthropic, "msgbatch_");
    let mut batch = SimBatch::new(id, Api::Anthropic, seq);
    batch.total = rows.len();
    batch.set_phase(Phase::InProgress);
    let reply = anthropic_batch(&batch, &base_url(&headers));
    let wake = batch.wake.clone();
    insert_batch(&mut inner, batch);
    drop(inner);
    tokio::spawn(async move { run_rows(&state, seq, rows, wake, Api::Anthropic, "/v1/messages").await });
    json_response(StatusCode::OK, &reply)
}

async fn anthropic_retrieve(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let inner = state.batches.lock();
    match find(&inner, &id, Api::Anthropic) {
        Some(batch) => json_response(StatusCode::OK, &anthropic_batch(batch, &base_url(&headers))),
        None => anthropic_error(StatusCode::NOT_FOUND, "not_found_error", &format!("message batch {id} not found")),
    }
}

async fn anthropic_cancel(State(state): State<Arc<AppState>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let mut inner = state.batches.lock();
    let seq = inner.by_id.get(&id).copied();
    let Some(batch) = seq.and_then(|s| inner.batches.get_mut(&s)).filter(|b| b.api == Api::Anthropic) else {
        return anthropic_error(StatusCode::NOT_FOUND, "not_found_error", &format!("message batch {id} not found"));
    };
    if !batch.phase.ended() {
        request_cancel(batch);
    }
    json_response(StatusCode::OK, &anthropic_batch(batch, &base_url(&headers)))
}

async fn anthropic_list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    let inner = state.batches.lock();
    let (page, has_more) = list_page(&inner, Api::Anthropic, &q);
    let base = base_url(&headers);
    let data: Vec<Value> = page.iter().map(|b| anthropic_batch(b, &base)).collect();
    json_response(
        StatusCode::OK,
        &json!({"data": data, "has_more": has_more, "first_id": page.first().map(|b| &b.id), "last_id": page.last().map(|b| &b.id)}),
    )
}

async fn anthropic_results(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let inner = state.batches.lock();
    let Some(batch) = find(&inner, &id, Api::Anthropic) else {
        return anthropic_error(StatusCode::NOT_FOUND, "not_found_error", &format!("message batch {id} not found"));
    };
    match &batch.results {
        Some(results) => bytes_response("application/binary", results.clone()),
        None => anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!("No batch results available for message batch {id}: it has not ended."),
        ),
    }
}

// ---------------------------------------------------------------- running a batch

impl SimBatch {
    fn new(id: String, api: Api, seq: u64) -> Self {
        let created = now();
        Self {
            id,
            api,
            seq,
            phase: Phase::Validating,
            created,
            times: HashMap::new(),
            total: 0,
            rows: Vec::new(),
            input_file_id: None,
            endpoint: String::new(),
            completion_window: "24h".into(),
            metadata: Value::Null,
            output_file_id: None,
            error_file_id: None,
            errors: None,
            results: None,
            cancel: false,
            wake: Arc::new(Notify::new()),
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
        let key = match phase {
            Phase::Validating => return,
            Phase::InProgress => "in_progress",
            Phase::Finalizing => "finalizing",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Expired => "expired",
            Phase::Cancelling => "cancelling",
            Phase::Cancelled => "cancelled",
        };
        let t = now();
        self.times.insert(key, t);
        if phase.ended() {
            self.times.insert("ended", t);
        }
    }
}

fn new_batch(inner: &mut Inner, api: Api, prefix: &str) -> (u64, String) {
    inner.next_batch += 1;
    let seq = inner.next_batch;
    let tag = if api == Api::OpenAi { 0x6f61 } else { 0x616e };
    let mut id = prefix.to_owned();
    let _ = write!(id, "{:024x}", mix(tag, seq));
    bump(inner, "created", 1);
    (seq, id)
}

fn insert_batch(inner: &mut Inner, batch: SimBatch) {
    inner.by_id.insert(batch.id.clone(), batch.seq);
    inner.batches.insert(batch.seq, batch);
}

fn find<'a>(inner: &'a Inner, id: &str, api: Api) -> Option<&'a SimBatch> {
    inner.by_id.get(id).and_then(|seq| inner.batches.get(seq)).filter(|b| b.api == api)
}

fn request_cancel(batch: &mut SimBatch) {
    batch.cancel = true;
    batch.set_phase(Phase::Cancelling);
    batch.wake.notify_one();
}

async fn complete_now(State(state): State<Arc<AppState>>) -> Response {
    let mut inner = state.batches.lock();
    inner.completed_on_demand += 1;
    state.batches.ends.store(inner.completed_on_demand, Relaxed);
    let running: Vec<Arc<Notify>> =
        inner.batches.values().filter(|b| !b.phase.ended()).map(|b| b.wake.clone()).collect();
    for wake in &running {
        wake.notify_one();
    }
    json_response(StatusCode::OK, &json!({"ending": running.len()}))
}

/// A uniform draw in [0, 1) from the seed, the batch and the row: the same batch sent to a server
/// with the same seed fails, finishes and expires the same way.
fn unit(seed: u64, seq: u64, custom_id: &str, salt: u64) -> f64 {
    (mix(mix(seed ^ salt, seq), hash_bytes(custom_id.as_bytes())) >> 11) as f64 / (1u64 << 53) as f64
}

/// One row through the online handler: the same engine, behaviour model and faults as a call.
async fn answer_row(state: &Arc<AppState>, api: Api, endpoint: &str, mut body: Value) -> Outcome {
    if let Some(fields) = body.as_object_mut() {
        fields.remove("stream");
        fields.remove("stream_options");
    }
    let raw = Bytes::from(body.to_string());
    let response = match (api, endpoint) {
        (Api::Anthropic, _) => anthropic::messages(State(state.clone()), HeaderMap::new(), raw).await,
        (Api::OpenAi, "/v1/completions") => openai::completions(State(state.clone()), HeaderMap::new(), raw).await,
        (Api::OpenAi, _) => openai::chat(State(state.clone()), HeaderMap::new(), raw).await,
    };
    let status = response.status().as_u16();
    match axum::body::to_bytes(response.into_body(), MAX_ROW_BYTES).await {
        Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(body) => Outcome::Answer { status, body },
            Err(_) => server_error(api),
        },
        Err(_) => server_error(api),
    }
}

fn server_error(api: Api) -> Outcome {
    let body = match api {
        Api::OpenAi => {
            json!({"error": {"message": "The server had an error processing this request.", "type": "server_error", "param": null, "code": null}})
        }
        Api::Anthropic => json!({"type": "error", "error": {"type": "api_error", "message": "Internal server error"}}),
    };
    Outcome::Answer { status: 500, body }
}

async fn run_rows(
    state: &Arc<AppState>,
    seq: u64,
    rows: Vec<(String, Value)>,
    wake: Arc<Notify>,
    api: Api,
    endpoint: &str,
) {
    let config = &state.config;
    let seed = config.seed;
    // Real seconds: a batch's hours are not engine time, and tests want an instant engine with a
    // batch that waits.
    let delay = Duration::try_from_secs_f64(config.batches.delay).unwrap_or_default();
    let expires = unit(seed, seq, "", 0xe4) < config.batches.expire_rate;
    let ends_at_start = state.batches.ends.load(Relaxed);
    {
        let mut inner = state.batches.lock();
        bump(&mut inner, "rows", rows.len() as u64);
        if let Some(batch) = inner.batches.get_mut(&seq) {
            batch.total = rows.len();
            if batch.phase == Phase::Validating {
                batch.set_phase(Phase::InProgress);
            }
        }
    }
    // Every row's answer, computed through the engine; when it counts as finished is its own draw.
    let limit = Arc::new(Semaphore::new(ROW_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (custom_id, body)) in rows.iter().cloned().enumerate() {
        let (state, limit, endpoint) = (state.clone(), limit.clone(), endpoint.to_owned());
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            (i, custom_id, answer_row(&state, api, &endpoint, body).await)
        });
    }
    let mut answers: Vec<Option<(String, Outcome)>> = vec![None; rows.len()];
    while let Some(done) = tasks.join_next().await {
        if let Ok((i, custom_id, outcome)) = done {
            if let Some(slot) = answers.get_mut(i) {
                *slot = Some((custom_id, outcome));
            }
        }
    }
    let started = tokio::time::Instant::now() - now().saturating_sub(created_of(state, seq));
    let end = if expires { delay / 2 } else { delay };
    // Wait for the end, a cancel, or `POST /sim/batches/complete`.
    let cancelled = loop {
        let cancelled = state.batches.lock().batches.get(&seq).is_some_and(|b| b.cancel);
        if cancelled || state.batches.ends.load(Relaxed) != ends_at_start {
            break cancelled;
        }
        tokio::select! {
            () = tokio::time::sleep_until(started + end) => break false,
            () = wake.notified() => {}
        }
    };
    let elapsed = started.elapsed();
    let cut = if cancelled {
        Some(elapsed)
    } else if expires {
        Some(end)
    } else {
        None
    };
    let mut settled = Vec::with_capacity(rows.len());
    let mut inner = state.batches.lock();
    for (i, answer) in answers.into_iter().enumerate() {
        let (custom_id, outcome) =
            answer.unwrap_or_else(|| (rows.get(i).map(|r| r.0.clone()).unwrap_or_default(), server_error(api)));
        let finish = delay.mul_f64(unit(seed, seq, &custom_id, 0xf1));
        let outcome = match cut {
            Some(cut) if finish > cut => {
                if cancelled {
                    Outcome::Cancelled
                } else {
                    Outcome::Expired
                }
            }
            _ if unit(seed, seq, &custom_id, 0xfa) < config.batches.failure_rate => server_error(api),
            _ => outcome,
        };
        let key = match &outcome {
            Outcome::Answer { status, .. } if (200..300).contains(status) => "rows_succeeded",
            Outcome::Answer { .. } => "rows_errored",
            Outcome::Expired => "rows_expired",
            Outcome::Cancelled => "rows_cancelled",
        };
        bump(&mut inner, key, 1);
        settled.push((custom_id, outcome, finish));
    }
    let phase = if cancelled {
        Phase::Cancelled
    } else if expires {
        Phase::Expired
    } else {
        Phase::Completed
    };
    bump(&mut inner, phase.openai(), 1);
    let (output, errors) = match api {
        Api::OpenAi => openai_files(seq, &settled),
        Api::Anthropic => (anthropic_results_jsonl(&settled), Bytes::new()),
    };
    let mut output_id = None;
    let mut error_id = None;
    if api == Api::OpenAi {
        if !output.is_empty() {
            output_id = Some(new_file(&mut inner, output.clone(), format!("batch_{seq}_output.jsonl"), "batch_output"));
        }
        if !errors.is_empty() {
            error_id = Some(new_file(&mut inner, errors, format!("batch_{seq}_error.jsonl"), "batch_output"));
        }
    }
    if let Some(batch) = inner.batches.get_mut(&seq) {
        if api == Api::OpenAi {
            batch.set_phase(Phase::Finalizing);
        }
        batch.rows = settled;
        batch.output_file_id = output_id;
        batch.error_file_id = error_id;
        if api == Api::Anthropic {
            batch.results = Some(output);
        }
        batch.set_phase(phase);
    }
}

fn created_of(state: &AppState, seq: u64) -> Duration {
    state.batches.lock().batches.get(&seq).map_or_else(now, |b| b.created)
}

/// The output file (rows answered 2xx) and the error file (the rest) of an `OpenAI` batch.
fn openai_files(seq: u64, rows: &[(String, Outcome, Duration)]) -> (Bytes, Bytes) {
    let mut output = String::new();
    let mut errors = String::new();
    for (n, (custom_id, outcome, _)) in rows.iter().enumerate() {
        let id = format!("batch_req_{:016x}", mix(seq, n as u64));
        let (line, ok) = match outcome {
            Outcome::Answer { status, body } => (
                json!({"id": id, "custom_id": custom_id,
                       "response": {"status_code": status, "request_id": format!("req_{:016x}", mix(seq ^ 0x7271, n as u64)), "body": body},
                       "error": null}),
                (200..300).contains(status),
            ),
            Outcome::Expired => (
                json!({"id": id, "custom_id": custom_id, "response": null,
                       "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}}),
                false,
            ),
            Outcome::Cancelled => (
                json!({"id": id, "custom_id": custom_id, "response": null,
                       "error": {"code": "batch_cancelled", "message": "This request was not executed because the batch was cancelled."}}),
                false,
            ),
        };
        let target = if ok { &mut output } else { &mut errors };
        target.push_str(&line.to_string());
        target.push('\n');
    }
    (Bytes::from(output), Bytes::from(errors))
}

/// The results of an Anthropic message batch, one JSON line per request.
fn anthropic_results_jsonl(rows: &[(String, Outcome, Duration)]) -> Bytes {
    let mut out = String::new();
    for (custom_id, outcome, _) in rows {
        let result = match outcome {
            Outcome::Answer { status, body } if (200..300).contains(status) => {
                json!({"type": "succeeded", "message": body})
            }
            Outcome::Answer { body, .. } => {
                let error = body
                    .get("error")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "api_error", "message": "Internal server error"}));
                json!({"type": "errored", "error": {"type": "error", "error": error}})
            }
            Outcome::Expired => json!({"type": "expired"}),
            Outcome::Cancelled => json!({"type": "canceled"}),
        };
        out.push_str(&json!({"custom_id": custom_id, "result": result}).to_string());
        out.push('\n');
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn multipart_parts_are_split_on_the_boundary() {
        let body = b"--xyz\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n{\"a\":1}\n{\"b\":\"--xy\"}\n\r\n--xyz--\r\n";
        let parts = multipart_parts("multipart/form-data; boundary=xyz", body).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!((parts[0].0.as_str(), parts[0].1.as_deref(), &parts[0].2[..]), ("purpose", None, &b"batch"[..]));
        assert_eq!(parts[1].1.as_deref(), Some("in.jsonl"));
        assert_eq!(&parts[1].2[..], b"{\"a\":1}\n{\"b\":\"--xy\"}\n");
        assert!(multipart_parts("application/json", body).is_err());
    }

    #[test]
    fn anthropic_custom_ids_follow_the_documented_pattern() {
        assert!(valid_custom_id("job-1_a"));
        assert!(!valid_custom_id(""));
        assert!(!valid_custom_id("a b"));
        assert!(!valid_custom_id(&"x".repeat(65)));
    }
}
