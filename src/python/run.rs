//! `Run`: one batch run driven from Python. Rust owns scheduling; Python is asked, in batches, to
//! run tool callables and pydantic validators, and is handed finished results in batches.
//!
//! Tokio threads never take the GIL. When work for Python appears they write one byte to a socket
//! whose other end the asyncio loop watches (`loop.add_reader(run.wake_fd())`); the loop's callback
//! then takes everything that became ready since the last wake-up with one `take_events()` call.
//! One wake-up, one GIL acquisition, many items; and no Rust thread is ever blocked on (or torn
//! down by) the interpreter, not even at interpreter shutdown.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt as _;
use pyo3::prelude::*;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use std::path::PathBuf;

use crate::backends::auto::{AutoBackend, AutoOptions, DEFAULT_TURNAROUND};
use crate::backends::cached::{endpoint_identity, CachedBackend};
use crate::backends::connect::{connect_fleet, ConnectOptions, Connected};
use crate::backends::fleet::{FleetOptions, Routing};
use crate::backends::metrics::EngineWatch;
use crate::backends::prompt_list::PromptListBackend;
use crate::backends::provider_batch::{BatchLedger, ProviderBatchBackend, ProviderBatchOptions, RowRetry};
use crate::chat_template::ChatTemplate;
use crate::conversation::Message;
use crate::fleet::worker::FleetTurns;
use crate::fleet::FleetWorker;
use crate::limits::AdaptiveLimit;
use crate::limits::HandLimits;
use crate::output::CompiledSchema;
use crate::python::errors::{backend_error, spec_error, InputError, JournalError, RunError, SchemaError};
use crate::scheduler::agent::TurnSink;
use crate::scheduler::agent::{Job, JobResult, OutputValidator, RunContext};
use crate::scheduler::compaction::Compactor;
use crate::scheduler::durable::{auto_first_start, fingerprint, Durability, JournalBatches, JournalTurns};
use crate::scheduler::feed::{bad_input, feed_file, prescan, SeenIds};
use crate::scheduler::population::Population;
use crate::scheduler::retry::RetryPolicy;
use crate::scheduler::run::{panic_message, run_all, Dispatch, DEFAULT_LOOKAHEAD};
use crate::scheduler::semaphore::PrioritySemaphore;
use crate::scheduler::stats::RunStats;
use crate::scheduler::trace::{JobTrace, TraceClock};
use crate::spec::{check_job_id, parse_settings, BatchSpec, SpecError};
use crate::store::{CacheWriter, InputFormat, ResponseCache};
use crate::telemetry::prometheus::{self, MetricsServer};
use crate::tools::{OnToolError, ToolConfig, ToolExecutor, ToolPool};

type Reply<T> = oneshot::Sender<Result<T, String>>;
/// Waiters for Python's answers, by request id.
type Pending<T> = Mutex<HashMap<u64, Reply<T>>>;
/// `(batch id, ok, per-call (ok, text), error)` as Python sends it.
type BatchAnswer = (u64, bool, Vec<(bool, String)>, String);
/// A finished job as Python receives it: `(id, index, ok, output_json, text, error, usage, counts,
/// (repaired, truncated, finish_reason, text_is_output), ttft, total)` with `error = (kind,
/// message, retryable, attempts)`, `usage = (prompt, cached, completion, cache_creation)` and
/// `counts = (turns, tool_calls, attempts)`. Without a schema the output is the answer text: it
/// comes as `text` with `text_is_output` set and no `output_json`.
/// Tuples rather than JSON: no serialising here and no parsing there.
type ResultTuple = (
    String,
    u64,
    bool,
    Option<String>,
    Option<String>,
    Option<(String, String, bool, u32)>,
    (u64, u64, u64, u64, bool),
    (u32, u32, u32),
    (bool, bool, Option<String>, bool),
    Option<f64>,
    f64,
);
/// One step of a persistent agent as Python sends it: `(agent id, job id, index, observation text,
/// observation fields as JSON)`, one of the last two given.
type AgentStep = (String, String, u64, Option<String>, Option<String>);
/// `(tool_calls, batch_calls, validations, results, credit, done)`.
type Events = (
    Vec<(u64, String, String)>,
    Vec<(u64, String, Vec<String>)>,
    Vec<(u64, String, String)>,
    Vec<ResultTuple>,
    usize,
    bool,
);

fn result_tuple(r: JobResult) -> ResultTuple {
    let u = r.usage;
    // A long answer without a schema is moved into one Python string, not written out as JSON text
    // for Python to parse back (two more copies of it, and of the peak memory).
    let (output_json, text, text_is_output) = match (r.output, r.text) {
        (Some(Value::String(answer)), None) => (None, Some(answer), true),
        (output, text) => (output.map(|v| v.to_string()), text, false),
    };
    (
        r.id,
        r.index,
        r.ok,
        output_json,
        text,
        r.error.map(|e| (e.kind, e.message, e.retryable, e.attempts)),
        (u.prompt_tokens, u.cached_tokens, u.completion_tokens, u.cache_creation_tokens, u.estimated),
        (r.turns, r.tool_calls, r.attempts),
        (r.repaired, r.truncated, r.finish_reason, text_is_output),
        r.ttft_s,
        r.total_s,
    )
}

#[derive(Default)]
struct Outbox {
    tool_calls: Vec<(u64, String, String)>,
    batch_calls: Vec<(u64, String, Vec<String>)>,
    validations: Vec<(u64, String, String)>,
    results: Vec<JobResult>,
    /// Span records of finished jobs of a traced run, as JSON (`take_traces`).
    traces: Vec<String>,
    /// Free places in the dispatch window since the last take: Python may feed this many inputs.
    credit: usize,
    done: bool,
}

/// State shared between the Python-facing handle, the tool bridge and the run task.
struct Shared {
    outbox: Mutex<Outbox>,
    /// Set when a wake-up byte is on its way and the loop has not taken the events since.
    signalled: AtomicBool,
    wake_tx: UnixStream,
    wake_rx: UnixStream,
    next_id: AtomicU64,
    tools: Pending<String>,
    batches: Pending<Vec<Result<String, String>>>,
    validations: Pending<()>,
}

impl Shared {
    fn new() -> std::io::Result<Self> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        Ok(Self {
            outbox: Mutex::new(Outbox::default()),
            signalled: AtomicBool::new(false),
            wake_tx,
            wake_rx,
            next_id: AtomicU64::new(0),
            tools: Mutex::default(),
            batches: Mutex::default(),
            validations: Mutex::default(),
        })
    }

    fn post(&self, f: impl FnOnce(&mut Outbox)) {
        if let Ok(mut outbox) = self.outbox.lock() {
            f(&mut outbox);
        }
        if !self.signalled.swap(true, SeqCst) {
            // WouldBlock means the socket already holds unread wake-ups: the loop will come.
            let _ = (&self.wake_tx).write(&[1]);
        }
    }

    fn ask<T: Send + 'static>(
        &self,
        pending: &Mutex<HashMap<u64, Reply<T>>>,
        post: impl FnOnce(&mut Outbox, u64),
    ) -> BoxFuture<'static, Result<T, String>> {
        let id = self.next_id.fetch_add(1, Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut pending) = pending.lock() {
            pending.insert(id, tx);
        }
        self.post(|outbox| post(outbox, id));
        Box::pin(async move { rx.await.unwrap_or_else(|_| Err("the run was closed before Python answered".into())) })
    }
}

fn answer<T>(pending: &Mutex<HashMap<u64, Reply<T>>>, id: u64, value: Result<T, String>) {
    let sender = pending.lock().ok().and_then(|mut p| p.remove(&id));
    // A missing sender means the waiter gave up (tool timeout): nobody needs the answer.
    if let Some(sender) = sender {
        let _ = sender.send(value);
    }
}

struct PyTools(Arc<Shared>);

impl ToolExecutor for PyTools {
    fn call(&self, name: &str, arguments: Arc<str>) -> BoxFuture<'static, Result<String, String>> {
        let name = name.to_owned();
        self.0.ask(&self.0.tools, move |outbox, id| outbox.tool_calls.push((id, name, arguments.to_string())))
    }

    fn call_batch(
        &self,
        name: &str,
        arguments: Vec<Arc<str>>,
    ) -> BoxFuture<'static, Result<Vec<Result<String, String>>, String>> {
        let name = name.to_owned();
        self.0.ask(&self.0.batches, move |outbox, id| {
            outbox.batch_calls.push((id, name, arguments.iter().map(ToString::to_string).collect()));
        })
    }
}

struct PyValidator(Arc<Shared>);

impl OutputValidator for PyValidator {
    fn validate(&self, job_id: &str, json: String) -> BoxFuture<'static, Result<(), String>> {
        let job_id = job_id.to_owned();
        self.0.ask(&self.0.validations, move |outbox, id| outbox.validations.push((id, job_id, json)))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolOptions {
    name: String,
    #[serde(default)]
    cache: bool,
    /// `cache="redis"`: results shared through the run's Redis by every process using it.
    #[serde(default)]
    cache_shared: bool,
    #[serde(default)]
    cache_ttl: Option<f64>,
    #[serde(default = "default_cache_entries")]
    cache_max_entries: usize,
    #[serde(default)]
    max_concurrency: Option<usize>,
    #[serde(default)]
    rate_limit: Option<f64>,
    #[serde(default)]
    timeout: Option<f64>,
    #[serde(default)]
    batch_window: Option<f64>,
    #[serde(default = "default_batch_max")]
    batch_max: usize,
    #[serde(default)]
    side_effects: bool,
    #[serde(default)]
    on_error: OnToolError,
}

fn default_cache_entries() -> usize {
    10_000
}
fn default_batch_max() -> usize {
    64
}

fn secs(field: &'static str, value: Option<f64>) -> Result<Option<Duration>, SpecError> {
    value
        .map(|v| {
            Duration::try_from_secs_f64(v)
                .map_err(|_| SpecError::Invalid { field, message: format!("{v} is not a number of seconds") })
        })
        .transpose()
}

impl ToolOptions {
    fn into_config(self) -> Result<ToolConfig, SpecError> {
        Ok(ToolConfig {
            cache_ttl: secs("cache_ttl", self.cache_ttl)?,
            timeout: secs("timeout", self.timeout)?,
            batch_window: secs("batch_window", self.batch_window)?,
            name: self.name,
            cache: self.cache,
            cache_shared: self.cache_shared,
            cache_max_entries: self.cache_max_entries,
            max_concurrency: self.max_concurrency,
            rate_limit: self.rate_limit,
            batch_max: self.batch_max,
            side_effects: self.side_effects,
            on_error: self.on_error,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunOptions {
    backends: Vec<String>,
    #[serde(default)]
    tools: Vec<ToolOptions>,
    #[serde(default)]
    python_validation: bool,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    api_key: Option<crate::secret::Secret>,
    #[serde(default)]
    journal: Option<PathBuf>,
    #[serde(default)]
    journal_force: bool,
    /// Drop the journal's failed results so those jobs run again.
    #[serde(default)]
    retry_failed: bool,
    /// Accept structured answers cut off at `max_tokens` once repaired (marked `truncated`).
    #[serde(default)]
    accept_truncated: bool,
    /// Results are written here (JSONL) by the core.
    #[serde(default)]
    output: Option<PathBuf>,
    /// Inputs are read from this file by the core instead of being fed from Python.
    #[serde(default)]
    input: Option<FileInput>,
    /// Hand finished results to Python (`take_events`); off when only the output file matters.
    #[serde(default = "default_true")]
    deliver_results: bool,
    #[serde(default)]
    response_cache: Option<PathBuf>,
    /// Fleet routing: `prefix_affinity` (default), `least_outstanding` or `round_robin`.
    #[serde(default)]
    routing: Routing,
    /// Keep `x-...:` session header lines of the system prompt when hashing prefixes for routing.
    #[serde(default)]
    keep_session_headers: bool,
    /// Back-pressure: send no new model call while every engine's queue holds more than this.
    #[serde(default)]
    max_engine_queue: Option<f64>,
    /// Inputs read ahead of the window and grouped by shared prefix (default
    /// [`DEFAULT_LOOKAHEAD`]; the Python layer passes a list's length).
    #[serde(default)]
    lookahead: Option<usize>,
    /// The engine's KV capacity in tokens, where its `/metrics` does not say.
    #[serde(default)]
    kv_capacity_tokens: Option<usize>,
    /// Inputs fed from Python: an id seen before is returned by `check_inputs` as a duplicate to
    /// skip, instead of raising `InputError`.
    #[serde(default)]
    dedupe: bool,
    /// Headers sent with every request (`extra_headers=`), checked by `check_header`.
    #[serde(default)]
    extra_headers: Vec<(String, String)>,
    /// Where the compaction summariser runs (a backend URL); the run's backend when not given.
    #[serde(default)]
    compaction_backend: Option<String>,
    /// Send the model calls through the provider's batch API (single-turn jobs).
    #[serde(default)]
    provider_batch: Option<ProviderBatchSettings>,
    /// Record span data of every job for OpenTelemetry (`take_traces`).
    #[serde(default)]
    trace: bool,
    /// Serve the run's figures for Prometheus on `host:port` (`GET /metrics`).
    #[serde(default)]
    metrics: Option<String>,
    /// A fault for the test of what a panic in the result forwarder does: each batch of results
    /// panics on its way to Python. The Python API never sets it.
    #[serde(default, rename = "_panic_forwarder")]
    panic_forwarder: bool,
    /// Work on a run of the Redis worker fleet: jobs come from its stream, results and turn
    /// checkpoints go to Redis.
    #[serde(default)]
    fleet: Option<crate::python::fleet::FleetRunOptions>,
    /// The Redis of tools with `cache="redis"` (a fleet worker uses the fleet's by default).
    #[serde(default)]
    redis: Option<String>,
    /// A population's ticks as one `/completions` request with a prompt list: `auto` where the
    /// endpoint takes one and the chat template is known, `on` (refused where it cannot), `off`.
    #[serde(default)]
    prompt_list: PromptListMode,
    /// The chat template: a name (`chatml`, `llama3`, `llama3.1`), Jinja source, or a file holding
    /// one (`tokenizer_config.json`, `.jinja`); from the model name when not given.
    #[serde(default)]
    chat_template: Option<String>,
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum PromptListMode {
    Auto,
    On,
    #[default]
    Off,
}

/// The prompt-list path of a population run (see [`PromptListMode`]); `None` where it is off or,
/// under `auto`, the endpoint or template does not allow it.
fn prompt_list_backend(
    mode: PromptListMode,
    template_name: Option<&str>,
    urls: &[String],
    connected: &Connected,
    spec: &BatchSpec,
    options: &ConnectOptions,
) -> PyResult<Option<Arc<PromptListBackend>>> {
    if mode == PromptListMode::Off {
        return Ok(None);
    }
    let model = spec.model.as_str();
    let template = match template_name {
        Some(name) => Some(ChatTemplate::load(name, model).map_err(|e| SchemaError::new_err(e.to_string()))?),
        None => ChatTemplate::for_model(model),
    };
    if let Some(template) = &template {
        // A template that cannot render this population's conversations fails here, before any
        // request: a system prompt, its tools, an observation.
        let mut probe: Vec<Message> = spec.system.iter().map(|s| Message::system(s.as_str())).collect();
        probe.push(Message::user("observation"));
        template.render(&probe, &spec.tools).map_err(|e| SchemaError::new_err(e.to_string()))?;
    }
    let refuse = |why: String| {
        if mode == PromptListMode::On {
            Err(SchemaError::new_err(format!("prompt_list=True: {why}")))
        } else {
            Ok(None)
        }
    };
    let [address] = connected.addresses.as_slice() else {
        return refuse(format!("{} backends: a prompt list goes to one endpoint", urls.len()));
    };
    if !connected.backend.capabilities().batch_generation {
        return refuse(format!("{} does not take a list of prompts in one request", connected.backend.name()));
    }
    let Some(template) = template else {
        return refuse(format!(
            "no chat template is known for model {model:?}; give chat_template=\"chatml\", \"llama3\", \"llama3.1\" \
             or a Jinja template"
        ));
    };
    if matches!(template, ChatTemplate::Llama3) && !spec.tools.is_empty() {
        return refuse(
            "the \"llama3\" template (Llama 3.0) has no tool format, so calls with tools go as chat calls; \
             give chat_template=\"llama3.1\" for a Llama 3.1+ model"
                .to_owned(),
        );
    }
    let Some(completions) =
        crate::backends::url::connect_completions(address, options).map_err(|e| backend_error(&e))?
    else {
        return refuse(format!("{} does not take a list of prompts in one request", connected.backend.name()));
    };
    Ok(Some(Arc::new(PromptListBackend::new(connected.backend.clone(), completions, model, template))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderBatchSettings {
    #[serde(default)]
    retry: RowRetry,
    #[serde(default = "default_poll_interval")]
    poll_interval: f64,
    #[serde(default = "default_max_poll_interval")]
    max_poll_interval: f64,
    #[serde(default = "default_linger")]
    linger: f64,
    #[serde(default)]
    max_requests: usize,
    #[serde(default)]
    max_bytes: usize,
    #[serde(default = "default_max_resubmits")]
    max_resubmits: u32,
    /// `mode="auto"`: each call goes through the batch API or online, by the deadline.
    #[serde(default)]
    auto: Option<AutoSettings>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AutoSettings {
    /// Seconds to the deadline: from the first start of the run when `from_first_start` (a resumed
    /// run takes that start from its journal), otherwise from now.
    deadline: f64,
    #[serde(default)]
    from_first_start: bool,
    /// A batch call's turnaround assumed until one has come back (seconds).
    #[serde(default)]
    turnaround: Option<f64>,
    online_inflight: usize,
}

impl AutoSettings {
    /// `first_start`: when the first run in auto mode on this journal started (Unix seconds; now
    /// without a journal), `now` the Unix time now.
    fn into_options(self, max_turns: u32, first_start: f64, now: f64) -> Result<AutoOptions, SpecError> {
        let seconds = |field: &'static str, v: f64| {
            Duration::try_from_secs_f64(v)
                .map_err(|_| SpecError::Invalid { field, message: format!("{v} is not a number of seconds >= 0") })
        };
        seconds("deadline", self.deadline)?;
        let deadline_at = if self.from_first_start { first_start + self.deadline } else { now + self.deadline };
        // Passed already (a run resumed after its deadline): every call goes online.
        let left = Duration::try_from_secs_f64(deadline_at - now).unwrap_or(Duration::ZERO);
        let prior_turnaround = match self.turnaround {
            Some(t) => seconds("batch_turnaround", t)?,
            None => DEFAULT_TURNAROUND,
        };
        if self.online_inflight == 0 {
            return Err(SpecError::Invalid { field: "online_inflight", message: "must be at least 1".into() });
        }
        Ok(AutoOptions {
            deadline: std::time::Instant::now() + left,
            deadline_at,
            prior_turnaround,
            max_turns,
            online_inflight: self.online_inflight,
        })
    }
}

/// The Unix time now, in seconds.
fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn default_poll_interval() -> f64 {
    5.0
}
fn default_max_poll_interval() -> f64 {
    60.0
}
fn default_linger() -> f64 {
    1.0
}
fn default_max_resubmits() -> u32 {
    5
}

impl ProviderBatchSettings {
    fn into_options(self) -> Result<ProviderBatchOptions, SpecError> {
        let positive = |field: &'static str, v: f64| {
            Duration::try_from_secs_f64(v).ok().filter(|d| !d.is_zero()).ok_or_else(|| SpecError::Invalid {
                field,
                message: format!("{v} is not a positive number of seconds"),
            })
        };
        Ok(ProviderBatchOptions {
            retry: self.retry,
            poll_interval: positive("batch_poll_interval", self.poll_interval)?,
            max_poll_interval: positive("batch_max_poll_interval", self.max_poll_interval)?,
            linger: positive("batch_linger", self.linger)?,
            max_requests: self.max_requests,
            max_bytes: self.max_bytes,
            max_resubmits: self.max_resubmits,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileInput {
    path: PathBuf,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    skip_bad_lines: bool,
    /// Keep the first input of each id and skip the rest (a result of kind `duplicate` each),
    /// instead of refusing the file.
    #[serde(default)]
    dedupe: bool,
}

fn default_true() -> bool {
    true
}

/// Inputs held ahead of the window at most (the job channel's capacity must stay far below
/// tokio's limit).
const MAX_LOOKAHEAD: usize = 1 << 32;

struct Running {
    jobs: Option<mpsc::Sender<Job>>,
    task: Option<JoinHandle<()>>,
}

#[pyclass(name = "Run", module = "batchagent_rs._core", frozen)]
pub struct PyRun {
    shared: Arc<Shared>,
    ctx: Arc<RunContext>,
    running: Mutex<Running>,
    cancelled: AtomicBool,
    durable: Arc<Durability>,
    input: Option<(PathBuf, InputFormat, bool)>,
    input_total: Option<u64>,
    /// Ids of the inputs checked so far (`check_inputs`), to find a repeated one.
    seen: Mutex<SeenIds>,
    dedupe: bool,
    deliver: bool,
    panic_forwarder: bool,
    /// The first error that makes the run's output incomplete (a failed journal or output write).
    fatal: Arc<Mutex<Option<String>>>,
    response_cache: Option<Arc<ResponseCache>>,
    /// Keeps an embedded simulator alive for as long as the run.
    connected: Connected,
    /// The compaction summariser's own backend (and simulator), when it has one.
    _summariser: Option<Connected>,
    dispatch: Dispatch,
    /// The conversations of persistent agents stepped through this run (`feed_agents`).
    population: Mutex<Population>,
    /// The run's `/metrics` endpoint, while it serves.
    metrics: Mutex<Option<MetricsServer>>,
    metrics_url: Option<String>,
    /// The fleet worker this run is, if it is one.
    fleet: Option<Arc<FleetWorker>>,
    /// A population's ticks sent as prompt lists (`prompt_list`), told how many calls each brings.
    prompt_list: Option<Arc<PromptListBackend>>,
}

use crate::python::runtime;

#[pymethods]
impl PyRun {
    /// Validates the spec and options, connects the backend (starting `sim://` if asked), and
    /// starts the run, which then waits for inputs from `feed`.
    #[new]
    fn new(py: Python<'_>, spec_json: &str, options_json: &str) -> PyResult<Self> {
        let spec = BatchSpec::from_json(spec_json).map_err(|e| spec_error(&e))?;
        let options: RunOptions = parse_settings(options_json).map_err(|e| spec_error(&e))?;
        let schema = spec
            .output_schema
            .as_deref()
            .map(CompiledSchema::compile)
            .transpose()
            .map_err(|e| SchemaError::new_err(format!("output schema: {e}")))?
            .map(Arc::new);
        let configs = options
            .tools
            .into_iter()
            .map(ToolOptions::into_config)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| spec_error(&e))?;
        for def in spec.tools.iter() {
            if !configs.iter().any(|c| c.name == def.name) {
                return Err(SchemaError::new_err(format!("tool '{}' has a definition but no callable", def.name)));
            }
        }
        let mut input = None;
        let mut input_total = None;
        if let Some(file) = &options.input {
            let format = match &file.format {
                Some(name) => name.parse::<InputFormat>().map_err(|e| InputError::new_err(e.to_string()))?,
                None => InputFormat::Auto,
            };
            let total = py
                .allow_threads(|| prescan(&file.path, format, &spec.task, file.skip_bad_lines, file.dedupe))
                .map_err(|e| InputError::new_err(e.to_string()))?;
            input = Some((file.path.clone(), format, file.dedupe));
            input_total = Some(total);
        }
        // The journal and the output open after the input checked out (a refused run leaves no
        // journal behind), and before any request.
        if options.kv_capacity_tokens == Some(0) {
            return Err(SchemaError::new_err("kv_capacity_tokens: must be at least 1"));
        }
        if options.lookahead.is_some_and(|n| n > MAX_LOOKAHEAD) {
            return Err(SchemaError::new_err(format!("lookahead: at most {MAX_LOOKAHEAD} inputs")));
        }
        let dispatch = Dispatch {
            lookahead: options.lookahead.unwrap_or(DEFAULT_LOOKAHEAD),
            kv_capacity_tokens: options.kv_capacity_tokens,
            feeding: Arc::default(),
            lanes: options.backends.len().max(1),
        };
        // Rewriting the output from the journal reads the whole journal: not under the GIL.
        let durable = py
            .allow_threads(|| {
                Durability::open(
                    options.journal.as_deref(),
                    &fingerprint(spec_json),
                    options.journal_force,
                    options.retry_failed,
                    options.output.as_deref(),
                )
            })
            .map_err(|e| JournalError::new_err(e.to_string()))?;
        let runtime = runtime()?;
        let urls = options.backends;
        let fleet_options = FleetOptions {
            routing: options.routing,
            keep_session_headers: options.keep_session_headers,
            ..FleetOptions::default()
        };
        for (name, value) in &options.extra_headers {
            crate::backends::http::check_header(name, value).map_err(SchemaError::new_err)?;
        }
        let connect_options = ConnectOptions {
            api_key: options.api_key,
            extra_headers: options.extra_headers,
            agent_hints: spec.agent_hints,
            engine_priority: spec.engine_hints,
            rate_limits: HandLimits { rpm: spec.rpm, tpm: spec.tpm },
            request_timeout: spec.call_timeout,
            idle_timeout: Some(spec.idle_timeout),
            max_response_bytes: spec.max_response_bytes,
            budgets: options.fleet.as_ref().map(|fleet| crate::python::fleet::shared_budgets(py, fleet)).transpose()?,
            ..ConnectOptions::default()
        };
        let mut connected = py
            .allow_threads(|| runtime.block_on(connect_fleet(&urls, &connect_options, fleet_options)))
            .map_err(|e| backend_error(&e))?;
        let prompt_list = prompt_list_backend(
            options.prompt_list,
            options.chat_template.as_deref(),
            &urls,
            &connected,
            &spec,
            &connect_options,
        )?;
        if let Some(list) = &prompt_list {
            connected.backend = list.clone();
        }
        let summariser = match &options.compaction_backend {
            Some(url) => Some(
                py.allow_threads(|| {
                    // `rpm=` / `tpm=` are the run's backend's limits, not the summariser's.
                    let options = ConnectOptions { rate_limits: HandLimits::default(), ..connect_options.clone() };
                    runtime.block_on(connect_fleet(std::slice::from_ref(url), &options, FleetOptions::default()))
                })
                .map_err(|e| backend_error(&e))?,
            ),
            None => None,
        };
        let compactor = py
            .allow_threads(|| {
                runtime.block_on(Compactor::resolve(
                    &spec,
                    &connected.addresses,
                    &connect_options,
                    &connected.backend,
                    summariser.as_ref().map(|s| s.backend.clone()),
                ))
            })
            .map_err(|e| backend_error(&e))?
            .map(Arc::new);
        if let Some(mut settings) = options.provider_batch {
            let auto = match settings.auto.take() {
                Some(auto) => {
                    let now = unix_now();
                    let first_start = match durable.journal() {
                        Some(journal) => py
                            .allow_threads(|| auto_first_start(journal, now))
                            .map_err(|e| JournalError::new_err(e.to_string()))?,
                        None => now,
                    };
                    Some(auto.into_options(spec.max_turns, first_start, now).map_err(|e| spec_error(&e))?)
                }
                None => None,
            };
            let batch = settings.into_options().map_err(|e| spec_error(&e))?;
            if auto.is_none() && !spec.tools.is_empty() {
                return Err(SchemaError::new_err(
                    "provider batch mode runs single-turn jobs: a job with tools needs several model turns",
                ));
            }
            let [address] = connected.addresses.as_slice() else {
                return Err(SchemaError::new_err("provider batch mode takes one backend URL, not a fleet"));
            };
            let journal = durable.journal().map(|j| JournalBatches(j.clone()));
            let open = journal.as_ref().map(JournalBatches::open).transpose();
            let open = open.map_err(|e| JournalError::new_err(e.to_string()))?.unwrap_or_default();
            let ledger = journal.map(|j| Arc::new(j) as Arc<dyn BatchLedger>);
            let _guard = runtime.enter();
            let backend = ProviderBatchBackend::connect(
                address,
                &connect_options,
                batch,
                connected.backend.clone(),
                ledger,
                open,
            )
            .map_err(|e| backend_error(&e))?;
            connected.backend = match auto {
                Some(auto) => Arc::new(AutoBackend::new(backend, connected.backend.clone(), auto)),
                None => Arc::new(backend),
            };
        }
        let mut response_cache = None;
        if let Some(path) = &options.response_cache {
            let cache = Arc::new(ResponseCache::open(path).map_err(|e| JournalError::new_err(e.to_string()))?);
            let writer = CacheWriter::start(cache.clone()).map_err(|e| JournalError::new_err(e.to_string()))?;
            let identity = py.allow_threads(|| {
                runtime.block_on(endpoint_identity(&connected.addresses, &spec.model, connect_options.api_key.as_ref()))
            });
            connected.backend = Arc::new(CachedBackend::new(connected.backend, writer, identity));
            response_cache = Some(cache);
        }
        let tool_cache = match configs.iter().find(|c| c.cache_shared) {
            Some(config) => Some(crate::python::fleet::tool_cache(
                py,
                &config.name,
                options.redis.as_deref(),
                options.fleet.as_ref(),
            )?),
            None => None,
        };
        let fleet = match options.fleet {
            Some(fleet) => {
                let (worker, backend) = crate::python::fleet::attach(
                    py,
                    fleet,
                    spec.window,
                    &connected.addresses,
                    connected.backend.clone(),
                )?;
                connected.backend = backend;
                Some(worker)
            }
            None => None,
        };
        let turn_sink = match &fleet {
            Some(worker) => Some(Arc::new(FleetTurns(worker.clone())) as Arc<dyn TurnSink>),
            None => durable.journal().map(|j| Arc::new(JournalTurns(j.clone())) as Arc<dyn TurnSink>),
        };
        let shared = Arc::new(Shared::new().map_err(|e| RunError::new_err(format!("wake-up socket: {e}")))?);
        let constrained = RunContext::use_constrained(&spec, connected.backend.capabilities().json_schema);
        let system = RunContext::system_message(&spec, constrained);
        let limit = AdaptiveLimit::new(spec.max_inflight, 1, spec.max_inflight);
        let ctx = Arc::new(RunContext {
            slots: PrioritySemaphore::new(spec.max_inflight, Duration::from_millis(250)),
            limit,
            retry: RetryPolicy {
                max_attempts: spec.max_attempts,
                base: Duration::from_millis(250),
                max_delay: Duration::from_secs(30),
            },
            tools: Arc::new(ToolPool::with_shared_cache(configs, Arc::new(PyTools(shared.clone())), tool_cache)),
            backend: connected.backend.clone(),
            schema,
            validator: options
                .python_validation
                .then(|| Arc::new(PyValidator(shared.clone())) as Arc<dyn OutputValidator>),
            turn_sink,
            stats: Arc::new(RunStats::default()),
            engine: (!connected.metrics_urls.is_empty()).then(|| {
                let _guard = runtime.enter();
                Arc::new(EngineWatch::start(&connected.metrics_urls, Duration::from_millis(500)))
            }),
            queue_ceiling: options.max_engine_queue,
            system,
            constrained,
            accept_truncated: options.accept_truncated,
            seed: options.seed,
            compactor,
            trace: options.trace.then(TraceClock::start),
            spec: Arc::new(spec),
        });
        let metrics = match &options.metrics {
            Some(addr) => {
                let (ctx, cache) = (ctx.clone(), response_cache.clone());
                let render: Arc<dyn Fn() -> String + Send + Sync> =
                    Arc::new(move || prometheus::render(&ctx, cache.as_ref().map_or(0, |c| c.stats().hits)));
                let server = py
                    .allow_threads(|| runtime.block_on(MetricsServer::start(addr, render)))
                    .map_err(|e| RunError::new_err(format!("metrics endpoint {addr}: {e}")))?;
                Some(server)
            }
            None => None,
        };
        let metrics_url = metrics.as_ref().map(MetricsServer::url);
        let run = Self {
            metrics: Mutex::new(metrics),
            metrics_url,
            shared,
            ctx,
            running: Mutex::new(Running { jobs: None, task: None }),
            cancelled: AtomicBool::new(false),
            durable: Arc::new(durable),
            input,
            input_total,
            seen: Mutex::new(SeenIds::default()),
            dedupe: options.dedupe,
            deliver: options.deliver_results,
            panic_forwarder: options.panic_forwarder,
            fatal: Arc::new(Mutex::new(None)),
            response_cache,
            connected,
            _summariser: summariser,
            dispatch,
            population: Mutex::default(),
            fleet,
            prompt_list,
        };
        run.start()?;
        Ok(run)
    }

    /// Checks inputs `(id, index, json object)` without running anything: the first input that
    /// cannot be used (a missing template variable, an id with a control character, an id an
    /// earlier input has) raises `InputError` naming its index. With `dedupe`, a repeated id is
    /// skipped instead: its result (kind `duplicate`) is written to the output file, if the run
    /// has one, and returned.
    fn check_inputs(&self, py: Python<'_>, items: Vec<FedInput>) -> PyResult<Vec<ResultTuple>> {
        let mut duplicates = Vec::new();
        {
            let mut seen = self.seen.lock().map_err(|_| RunError::new_err("run state poisoned"))?;
            for (id, index, json, extra) in items {
                let input = parse_input(index, &json)?;
                parse_extra_body(index, extra.as_deref())?;
                self.ctx.spec.task.render(index, &input).map_err(|e| spec_error(&e))?;
                check_job_id(&id).map_err(|message| InputError::new_err(format!("input {index}: {message}")))?;
                if let Some(first) = seen.insert(&id, index) {
                    if !self.dedupe {
                        return Err(InputError::new_err(format!(
                            "input {index}: id {id:?} is also the id of input {first}; ids must be unique \
                             (dedupe=True keeps the first and skips the rest)"
                        )));
                    }
                    self.ctx.stats.duplicates_skipped.fetch_add(1, Relaxed);
                    let message = format!("input {index}: id {id:?} is also the id of input {first}; skipped");
                    duplicates.push(JobResult::failed(id, index, "duplicate", message));
                }
            }
        }
        self.write_unjournaled(py, &duplicates);
        Ok(duplicates.into_iter().map(result_tuple).collect())
    }

    /// An input read lazily that `check_inputs` refused with `message`: a failed result of kind
    /// `bad_input`, counted, written to the output file if the run has one, and returned.
    fn refuse_input(&self, py: Python<'_>, id: String, index: u64, message: String) -> ResultTuple {
        self.ctx.stats.jobs_failed.fetch_add(1, Relaxed);
        self.ctx.stats.count_error("bad_input");
        let result = bad_input(id, index, message);
        self.write_unjournaled(py, std::slice::from_ref(&result));
        result_tuple(result)
    }

    /// Hands inputs `(id, index, json object)` to the run. Feed no more than the credit
    /// `take_events()` grants (the first time: `initial_credit`), so inputs are consumed lazily.
    fn feed(&self, py: Python<'_>, items: Vec<FedInput>) -> PyResult<()> {
        let sender = self.lock_running()?.jobs.clone().ok_or_else(|| RunError::new_err("the run's input is closed"))?;
        // Whether a skipped job's earlier result is looked up (for Python, which wants one result
        // per input even when the journal already had some).
        let earlier_wanted = self.deliver && self.durable.journal().is_some();
        // Checking each job against the journal reads SQLite (and may wait for the writer's
        // queue): not under the GIL.
        let (skipped, mut earlier) = py.allow_threads(|| -> PyResult<(usize, Vec<JobResult>)> {
            // Parsed and checked first, sent after: the dispatch loop sees a fed list at once
            // rather than trickling in while JSON is parsed, so it can group the whole of it.
            let mut jobs = Vec::with_capacity(items.len());
            let mut skipped = 0;
            let mut earlier = Vec::new();
            for (id, index, json, extra) in items {
                let input = parse_input(index, &json)?;
                let extra_body = parse_extra_body(index, extra.as_deref())?;
                let skipped_id = earlier_wanted.then(|| id.clone());
                let job = Job { id, index, input, resume: None, extra_body, keep_conversation: false };
                if let Some(job) = self.durable.prepare(job, &json) {
                    jobs.push(job);
                } else {
                    skipped += 1;
                    // Finished in an earlier run: Python still gets its result, so a resumed
                    // `run` returns one result per input.
                    if let Some(id) = skipped_id {
                        earlier.extend(self.durable.earlier_result(&id).map(|mut r| {
                            r.index = index;
                            r
                        }));
                    }
                }
            }
            // A poisoned lock only means a feed failed half-way; the order is still sound.
            let _feeding = self.dispatch.feeding.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for job in jobs {
                sender.try_send(job).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => {
                        RunError::new_err("more inputs fed than the run's credit allows")
                    }
                    mpsc::error::TrySendError::Closed(_) => {
                        RunError::new_err("the run stopped before taking all inputs")
                    }
                })?;
            }
            Ok((skipped, earlier))
        })?;
        if skipped > 0 {
            // Finished in an earlier run: their places in the window are free at once.
            self.ctx.stats.jobs_skipped.fetch_add(skipped as u64, Relaxed);
            self.shared.post(|outbox| {
                outbox.credit += skipped;
                outbox.results.append(&mut earlier);
            });
        }
        Ok(())
    }

    /// Starts one step of persistent agents, each from its conversation so far plus its new
    /// observation: items `(agent id, job id, index, text, fields)` where the observation is `text`
    /// as it is, or `fields` (a JSON object) rendered by the task template. Every observation is
    /// rendered and every id checked before any step starts. A step whose request would hold more
    /// than `max_context_tokens` (estimated from its size) does not start: it is returned as
    /// `(job id, message)`. Finished steps come back through `take_events` like any job; a
    /// successful one becomes its agent's history unless `expire` was called for it first.
    #[pyo3(signature = (items, max_context_tokens=None))]
    fn feed_agents(
        &self,
        py: Python<'_>,
        items: Vec<AgentStep>,
        max_context_tokens: Option<usize>,
    ) -> PyResult<Vec<(String, String)>> {
        let sender = self.lock_running()?.jobs.clone().ok_or_else(|| RunError::new_err("the run's input is closed"))?;
        py.allow_threads(|| {
            let mut steps = Vec::with_capacity(items.len());
            for (agent, job_id, index, text, fields) in items {
                check_job_id(&job_id).map_err(|message| InputError::new_err(format!("agent {agent:?}: {message}")))?;
                let observation = match (text, fields) {
                    (Some(text), _) => text,
                    (None, Some(json)) => {
                        let fields = parse_input(index, &json)?;
                        self.ctx.spec.task.render(index, &fields).map_err(|e| {
                            InputError::new_err(format!("agent {agent:?}: observation: {}", without_index(&e)))
                        })?
                    }
                    (None, None) => return Err(InputError::new_err(format!("agent {agent:?}: no observation"))),
                };
                steps.push((agent, job_id, index, observation));
            }
            let mut refused = Vec::new();
            let mut jobs = Vec::with_capacity(steps.len());
            {
                let mut population = self.lock_population()?;
                let system = self.ctx.system.as_ref();
                for (agent, job_id, index, observation) in steps {
                    if let Some(limit) = max_context_tokens {
                        let wanted = population.estimated_tokens(&agent, &observation, system, &self.ctx.spec.tools)
                            + self.ctx.spec.max_tokens.map_or(0, |n| n as usize);
                        if wanted > limit {
                            refused.push((
                                job_id,
                                format!(
                                    "agent {agent:?}: the conversation would hold about {wanted} tokens \
                                     (estimated from its size, answer included), over max_context_tokens={limit}"
                                ),
                            ));
                            continue;
                        }
                    }
                    jobs.push(population.start(&agent, job_id, index, observation, system));
                }
            }
            let _feeding = self.dispatch.feeding.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(list) = &self.prompt_list {
                list.expect(jobs.len());
            }
            for job in jobs {
                sender.try_send(job).map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => {
                        RunError::new_err("more steps started than the run's window holds")
                    }
                    mpsc::error::TrySendError::Closed(_) => {
                        RunError::new_err("the run stopped before taking all steps")
                    }
                })?;
            }
            Ok(refused)
        })
    }

    /// The caller stopped waiting for these steps (its deadline passed): when they finish, their
    /// results still come back (their tokens count) but their conversations are dropped.
    #[allow(clippy::needless_pass_by_value)] // PyO3 extracts a list into an owned Vec.
    fn expire(&self, job_ids: Vec<String>) -> PyResult<()> {
        self.lock_population()?.expire(job_ids.iter().map(String::as_str));
        Ok(())
    }

    /// The state of each agent that has one, as `(agent id, JSON)`: its conversation (without the
    /// system message) and counters over its accepted steps.
    fn agent_states(&self, agents: Vec<String>) -> PyResult<Vec<(String, String)>> {
        let population = self.lock_population()?;
        agents
            .into_iter()
            .filter_map(|agent| {
                let state = population.agent(&agent)?;
                Some(
                    serde_json::to_string(state)
                        .map(|json| (agent, json))
                        .map_err(|e| RunError::new_err(format!("agent state: {e}"))),
                )
            })
            .collect()
    }

    /// Sets agents' states `(agent id, JSON)` as `agent_states` returns them (a loaded population).
    fn restore_agents(&self, items: Vec<(String, String)>) -> PyResult<()> {
        let mut population = self.lock_population()?;
        for (agent, json) in items {
            let state = serde_json::from_str(&json)
                .map_err(|e| InputError::new_err(format!("agent {agent:?}: state cannot be read: {e}")))?;
            population.set_agent(agent, state);
        }
        Ok(())
    }

    /// Live agents at once.
    #[getter]
    fn window(&self) -> usize {
        self.ctx.spec.window
    }

    /// Inputs the run takes before its first result: the window plus the lookahead (inputs read
    /// ahead to be grouped by shared prefix). The first feed may hand over this many.
    #[getter]
    fn initial_credit(&self) -> usize {
        self.ctx.spec.window.saturating_add(self.dispatch.lookahead)
    }

    /// The file descriptor to watch for readability (`loop.add_reader`): readable means
    /// `take_events()` has something. Read and discard its bytes before calling `take_events()`.
    fn wake_fd(&self) -> i32 {
        self.shared.wake_rx.as_raw_fd()
    }

    /// No more inputs: the run finishes once the jobs it has are done.
    fn close_input(&self) -> PyResult<()> {
        self.lock_running()?.jobs = None;
        Ok(())
    }

    /// Everything that became ready: `(tool_calls, batch_calls, validations, results, credit,
    /// done)`. `results` are the finished jobs (see `ResultTuple`); `credit` is how many more
    /// inputs the run can take; `done` means the run is over and nothing more will come.
    fn take_events(&self) -> PyResult<Events> {
        // Drain the wake-up bytes and clear the flag first: a post that races with this take
        // sends a fresh byte, so nothing is left behind without a wake-up.
        // One read: a post writes a byte only when none is pending, so the socket holds one or a
        // few; any left over just cause one more (empty-handed) wake-up.
        let mut sink = [0u8; 256];
        let _ = std::io::Read::read(&mut &self.shared.wake_rx, &mut sink);
        self.shared.signalled.store(false, SeqCst);
        let (events, results) = {
            let mut outbox = self.shared.outbox.lock().map_err(|_| RunError::new_err("run state poisoned"))?;
            let events = (
                std::mem::take(&mut outbox.tool_calls),
                std::mem::take(&mut outbox.batch_calls),
                std::mem::take(&mut outbox.validations),
                std::mem::take(&mut outbox.credit),
                outbox.done,
            );
            (events, std::mem::take(&mut outbox.results))
        };
        // Converted outside the lock: tokio threads posting meanwhile never wait on it.
        let mut results = results;
        {
            // Persistent agents' steps settle here, on the caller's thread: a step that `expire`
            // reached before this take is dropped, one taken before it is kept, never both.
            let mut population = self.lock_population()?;
            for result in &mut results {
                population.finish(result);
            }
        }
        let results = results.into_iter().map(result_tuple).collect();
        let (tool_calls, batch_calls, validations, credit, done) = events;
        Ok((tool_calls, batch_calls, validations, results, credit, done))
    }

    /// The span records of the jobs that finished since the last take, one JSON object each (see
    /// `trace_json`); always empty when the run is not traced.
    fn take_traces(&self) -> PyResult<Vec<String>> {
        let mut outbox = self.shared.outbox.lock().map_err(|_| RunError::new_err("run state poisoned"))?;
        Ok(std::mem::take(&mut outbox.traces))
    }

    /// Answers for tool calls: `(call id, ok, text)`; text is the result, or the error message.
    fn complete_tools(&self, items: Vec<(u64, bool, String)>) {
        for (id, ok, text) in items {
            answer(&self.shared.tools, id, if ok { Ok(text) } else { Err(text) });
        }
    }

    /// Answers for batch calls: `(batch id, ok, results or error)`; each result `(ok, text)`.
    fn complete_batches(&self, items: Vec<BatchAnswer>) {
        for (id, ok, results, error) in items {
            let value = if ok {
                Ok(results.into_iter().map(|(ok, t)| if ok { Ok(t) } else { Err(t) }).collect())
            } else {
                Err(error)
            };
            answer(&self.shared.batches, id, value);
        }
    }

    /// Answers for validations: `(id, ok, error message)`.
    fn complete_validations(&self, items: Vec<(u64, bool, String)>) {
        for (id, ok, message) in items {
            answer(&self.shared.validations, id, if ok { Ok(()) } else { Err(message) });
        }
    }

    /// Counters so far, as JSON (the run report is built from these).
    fn stats_json(&self) -> String {
        let mut stats = self.ctx.stats.snapshot();
        let cache_stats = self.response_cache.as_ref().map(|c| c.stats());
        if let Some(cache) = &cache_stats {
            // Answers from the response cache are not model calls: none was made.
            stats.model_calls = stats.model_calls.saturating_sub(cache.hits);
        }
        let tools = self.ctx.tools.stats();
        let counts = |c: &crate::tools::ToolCounts| {
            serde_json::json!({"requests": c.requests, "executions": c.executions, "cache_hits": c.cache_hits,
                               "coalesced": c.coalesced, "errors": c.errors, "timeouts": c.timeouts, "batches": c.batches})
        };
        let mut tool_json = counts(&tools.total);
        tool_json["per_tool"] = tools.per_tool.iter().map(|(name, c)| (name.clone(), counts(c))).collect();
        // Tools that ended in an error at least once (raised, timed out, rejected their arguments).
        let tool_errors: serde_json::Map<String, Value> = tools
            .per_tool
            .iter()
            .filter(|(_, c)| c.errors > 0)
            .map(|(name, c)| (name.clone(), c.errors.into()))
            .collect();
        let journal = self.durable.journal().map(|j| {
            let s = j.stats();
            serde_json::json!({"jobs_started": s.jobs_started, "jobs_finished": s.jobs_finished,
                               "turns_written": s.turns_written, "write_errors": s.write_errors,
                               "checkpoint_bytes": s.checkpoint_bytes,
                               "checkpoint_encoded_bytes": s.checkpoint_encoded_bytes,
                               "blocks_written": s.blocks_written, "blocks_deleted": s.blocks_deleted})
        });
        let value = serde_json::json!({
            "run": stats,
            "journal": journal,
            "tools": tool_json,
            "tool_errors": tool_errors,
            "max_inflight": self.ctx.slots.capacity(),
            "input_total": self.input_total,
            "previously_finished": self.durable.previously_finished,
            "backend": self.ctx.backend.name(),
            "endpoints": self.ctx.backend.endpoint_stats(),
            "provider_batch": self.ctx.backend.batch_stats(),
            "engine": self.ctx.engine.as_ref().map(|e| e.latest()),
            "response_cache": cache_stats.map(|s| serde_json::json!({"hits": s.hits, "misses": s.misses, "puts": s.puts})),
            "metrics_url": self.metrics_url,
        });
        value.to_string()
    }

    /// Stops every agent now. Unfinished jobs produce no result (a journal keeps their last turn).
    fn cancel(&self) -> PyResult<()> {
        self.cancelled.store(true, Relaxed);
        let mut running = self.lock_running()?;
        running.jobs = None;
        if let Some(task) = running.task.take() {
            task.abort();
        }
        if let Some(worker) = self.fleet.clone() {
            // Its jobs stay pending: another worker takes them over once their lease runs out.
            runtime()?.spawn(async move { worker.stop().await });
        }
        self.shared.post(|outbox| outbox.done = true);
        Ok(())
    }

    /// `http://host:port/metrics` while the run serves its figures (option `metrics`).
    #[getter]
    fn metrics_url(&self) -> Option<String> {
        self.metrics_url.clone()
    }

    /// Stops serving `/metrics`; returns once the port is free. Also done when the run is dropped.
    fn stop_metrics(&self, py: Python<'_>) -> PyResult<()> {
        let server = self.metrics.lock().map_err(|_| RunError::new_err("run state poisoned"))?.take();
        if let Some(mut server) = server {
            let runtime = runtime()?;
            py.allow_threads(|| runtime.block_on(server.stop()));
        }
        Ok(())
    }

    /// The base URL of the embedded simulator when the backend is `sim://`.
    #[getter]
    fn sim_url(&self) -> Option<String> {
        self.connected.sims.first().map(crate::sim::SimServer::url)
    }

    /// Why the run's output is incomplete, if it is (a journal or output file that failed).
    fn error(&self) -> Option<String> {
        self.fatal.lock().ok().and_then(|f| f.clone())
    }
}

impl PyRun {
    /// Results of inputs that never became jobs: not journaled (a resumed run meets the same inputs
    /// again and writes them again), written to the output file. A failed write makes the run's
    /// output incomplete, which `error()` says at the end.
    fn write_unjournaled(&self, py: Python<'_>, results: &[JobResult]) {
        if results.is_empty() {
            return;
        }
        let written = py.allow_threads(|| results.iter().try_for_each(|r| self.durable.write_unjournaled(r)));
        if let Err(e) = written {
            record_fatal(&self.fatal, e.to_string());
        }
    }

    fn start(&self) -> PyResult<()> {
        let runtime = runtime()?;
        let (jobs_tx, jobs_rx) = mpsc::channel(self.ctx.spec.window.saturating_add(self.dispatch.lookahead).max(1));
        let (results_tx, mut results_rx) = mpsc::unbounded_channel::<JobResult>();
        let ctx = self.ctx.clone();
        let shared = self.shared.clone();
        let durable = self.durable.clone();
        let fatal = self.fatal.clone();
        let deliver = self.deliver;
        let feeds_from_python = self.input.is_none();
        let panic_hook = self.panic_forwarder;
        let fleet = self.fleet.clone();
        let forward = runtime.spawn(async move {
            while let Some(result) = results_rx.recv().await {
                let mut batch = vec![result];
                while let Ok(more) = results_rx.try_recv() {
                    batch.push(more);
                }
                let freed = batch.len();
                let mut traces: Vec<String> = batch.iter_mut().filter_map(trace_json).collect();
                // Which inputs this batch answers, should handing it over panic: each still gets a
                // result. Only kept when Python wants the results.
                let answers: Vec<(String, u64)> =
                    if deliver { batch.iter().map(|r| (r.id.clone(), r.index)).collect() } else { Vec::new() };
                let handed = AssertUnwindSafe(async {
                    assert!(!panic_hook, "injected by the run option _panic_forwarder");
                    // Handed to Python (`stream`, `on_result`) only once committed: what a user has
                    // seen is never run again by a resume.
                    // A fleet worker's results are written to Redis and acknowledged there.
                    let (mut batch, error) = if let Some(worker) = &fleet {
                        let error = worker.commit(&batch).await.err().map(|e| e.to_string());
                        (batch, error)
                    } else {
                        let (batch, error) = durable.commit(batch).await;
                        (batch, error.map(|e| e.to_string()))
                    };
                    if let Some(e) = error {
                        record_fatal(&fatal, e);
                    }
                    // When the core reads the inputs itself and Python does not want the results,
                    // nothing here concerns Python: no wake-up (it would cost a syscall and a loop
                    // turn per batch of results for nothing).
                    if deliver || feeds_from_python || !traces.is_empty() {
                        shared.post(|outbox| {
                            outbox.credit += freed;
                            outbox.traces.append(&mut traces);
                            if deliver {
                                outbox.results.append(&mut batch);
                            }
                        });
                    }
                })
                .catch_unwind()
                .await;
                if let Err(payload) = handed {
                    let message =
                        format!("internal error: the result forwarder panicked: {}", panic_message(&*payload));
                    record_fatal(&fatal, message.clone());
                    let mut failed: Vec<JobResult> = answers
                        .into_iter()
                        .map(|(id, index)| JobResult::failed(id, index, "internal", message.clone()))
                        .collect();
                    shared.post(|outbox| {
                        outbox.credit += freed;
                        outbox.results.append(&mut failed);
                    });
                }
            }
            if let Err(e) = durable.flush().await {
                record_fatal(&fatal, e.to_string());
            }
            if let Some(worker) = &fleet {
                worker.stop().await;
            }
            shared.post(|outbox| outbox.done = true);
        });
        let mut running = self.lock_running()?;
        if let Some(worker) = self.fleet.clone() {
            runtime.spawn(worker.clone().keep_alive());
            let results = results_tx.clone();
            let fatal = self.fatal.clone();
            runtime.spawn(async move {
                if let Err(e) = worker.feed(jobs_tx, results).await {
                    record_fatal(&fatal, e.to_string());
                }
            });
        } else if let Some((path, format, dedupe)) = self.input.clone() {
            let durable = self.durable.clone();
            let stats = self.ctx.stats.clone();
            let results = results_tx.clone();
            let fatal = self.fatal.clone();
            runtime.spawn_blocking(move || {
                if let Err(e) = feed_file(&path, format, dedupe, &durable, &stats, &jobs_tx, &results) {
                    record_fatal(&fatal, e.to_string());
                }
            });
        } else {
            running.jobs = Some(jobs_tx);
        }
        let (shared, fatal) = (self.shared.clone(), self.fatal.clone());
        let dispatch = self.dispatch.clone();
        let task = runtime.spawn(async move {
            run_all(ctx, dispatch, jobs_rx, results_tx).await;
            // The forwarder ends when the last sender (run_all's and the file feeder's) is gone.
            if let Err(e) = forward.await {
                // Python waits for `done`: a forwarder that died must still say the run is over.
                if e.is_panic() {
                    let payload = e.into_panic();
                    let message = panic_message(&*payload);
                    record_fatal(&fatal, format!("internal error: the result forwarder panicked: {message}"));
                }
                shared.post(|outbox| outbox.done = true);
            }
        });
        running.task = Some(task);
        Ok(())
    }

    fn lock_population(&self) -> PyResult<std::sync::MutexGuard<'_, Population>> {
        self.population.lock().map_err(|_| RunError::new_err("run state poisoned"))
    }

    fn lock_running(&self) -> PyResult<std::sync::MutexGuard<'_, Running>> {
        self.running.lock().map_err(|_| RunError::new_err("run state poisoned"))
    }
}

impl Drop for PyRun {
    fn drop(&mut self) {
        if let Ok(mut running) = self.running.lock() {
            if let Some(task) = running.task.take() {
                task.abort();
            }
        }
    }
}

/// A finished job's span records with what its span needs of the result: `{id, index, ok, error,
/// message, turns, tool_calls, usage, start_ns, end_ns, calls, tools}` (`error` the kind).
fn trace_json(result: &mut JobResult) -> Option<String> {
    #[derive(serde::Serialize)]
    struct Traced<'a> {
        id: &'a str,
        index: u64,
        ok: bool,
        error: Option<&'a str>,
        message: Option<&'a str>,
        turns: u32,
        tool_calls: u32,
        usage: &'a crate::conversation::Usage,
        #[serde(flatten)]
        trace: &'a JobTrace,
    }
    let trace = result.trace.take()?;
    let error = result.error.as_ref();
    serde_json::to_string(&Traced {
        id: &result.id,
        index: result.index,
        ok: result.ok,
        error: error.map(|e| e.kind.as_str()),
        message: error.map(|e| e.message.as_str()),
        turns: result.turns,
        tool_calls: result.tool_calls,
        usage: &result.usage,
        trace: &trace,
    })
    .ok()
}

fn record_fatal(slot: &Mutex<Option<String>>, message: String) {
    if let Ok(mut slot) = slot.lock() {
        slot.get_or_insert(message);
    }
}

/// An input as Python hands it over: id, index, the input as a JSON object, and the request-body
/// fields of `extra_body=` as a function of the input (a JSON object), if any.
type FedInput = (String, u64, String, Option<String>);

fn parse_extra_body(index: u64, json: Option<&str>) -> PyResult<Option<Arc<Map<String, Value>>>> {
    let Some(json) = json else { return Ok(None) };
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(map)) if map.is_empty() => Ok(None),
        Ok(Value::Object(map)) => Ok(Some(Arc::new(map))),
        Ok(other) => {
            Err(InputError::new_err(format!("input {index}: extra_body returned {}, not a dict", type_name(&other))))
        }
        Err(e) => Err(InputError::new_err(format!("input {index}: extra_body is not JSON: {e}"))),
    }
}

/// A template error without its "input N:" prefix (an agent is named instead).
fn without_index(error: &SpecError) -> String {
    match error {
        SpecError::MissingVariable { variable, available, .. } => {
            format!("template variable '{variable}' is missing (the observation has: {available})")
        }
        other => other.to_string(),
    }
}

fn parse_input(index: u64, json: &str) -> PyResult<Map<String, Value>> {
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => {
            Err(InputError::new_err(format!("input {index}: expected an object (dict), got {}", type_name(&other))))
        }
        Err(e) => Err(InputError::new_err(format!("input {index}: {e}"))),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
