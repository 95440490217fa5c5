//! `Run`: one batch run driven from Python. Rust owns scheduling; Python is asked, in batches, to
//! run tool callables and pydantic validators, and is handed finished results in batches. One
//! `next_events()` await (one event-loop wake-up, one GIL acquisition) serves everything that
//! became ready since the last one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use pyo3::prelude::*;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use crate::backends::connect::{connect, ConnectOptions, Connected};
use crate::output::CompiledSchema;
use crate::python::errors::{backend_error, spec_error, InputError, RunError, SchemaError};
use crate::scheduler::agent::{Job, JobResult, OutputValidator, RunContext};
use crate::scheduler::aimd::AdaptiveLimit;
use crate::scheduler::retry::RetryPolicy;
use crate::scheduler::run::run_all;
use crate::scheduler::semaphore::PrioritySemaphore;
use crate::scheduler::stats::RunStats;
use crate::spec::{BatchSpec, SpecError};
use crate::tools::{ToolConfig, ToolExecutor, ToolPool};

type Reply<T> = oneshot::Sender<Result<T, String>>;

#[derive(Default)]
struct Outbox {
    tool_calls: Vec<(u64, String, String)>,
    batch_calls: Vec<(u64, String, Vec<String>)>,
    validations: Vec<(u64, String, String)>,
    results: Vec<JobResult>,
    done: bool,
}

/// State shared between the Python-facing handle, the tool bridge and the run task.
#[derive(Default)]
struct Shared {
    outbox: Mutex<Outbox>,
    ready: Notify,
    next_id: AtomicU64,
    tools: Mutex<HashMap<u64, Reply<String>>>,
    batches: Mutex<HashMap<u64, Reply<Vec<Result<String, String>>>>>,
    validations: Mutex<HashMap<u64, Reply<()>>>,
}

impl Shared {
    fn post(&self, f: impl FnOnce(&mut Outbox)) {
        if let Ok(mut outbox) = self.outbox.lock() {
            f(&mut outbox);
        }
        // notify_one stores a permit when nobody waits, so a post between two awaits is not lost.
        self.ready.notify_one();
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

    fn call_batch(&self, name: &str, arguments: Vec<Arc<str>>) -> BoxFuture<'static, Result<Vec<Result<String, String>>, String>> {
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
            cache_max_entries: self.cache_max_entries,
            max_concurrency: self.max_concurrency,
            rate_limit: self.rate_limit,
            batch_max: self.batch_max,
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
    api_key: Option<String>,
}

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
    /// Keeps an embedded simulator alive for as long as the run.
    _connected: Connected,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    pyo3_async_runtimes::tokio::get_runtime()
}

#[pymethods]
impl PyRun {
    /// Validates the spec and options, connects the backend (starting `sim://` if asked), and
    /// starts the run, which then waits for inputs from `feed`.
    #[new]
    fn new(py: Python<'_>, spec_json: &str, options_json: &str) -> PyResult<Self> {
        let spec = BatchSpec::from_json(spec_json).map_err(|e| spec_error(&e))?;
        let options: RunOptions =
            serde_json::from_str(options_json).map_err(|e| SchemaError::new_err(format!("run options: {e}")))?;
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
        let urls = options.backends;
        let connect_options = ConnectOptions { api_key: options.api_key, ..ConnectOptions::default() };
        let connected = py
            .allow_threads(|| runtime().block_on(connect(&urls, &connect_options)))
            .map_err(|e| backend_error(&e))?;
        let shared = Arc::new(Shared::default());
        let constrained = RunContext::use_constrained(&spec, connected.backend.capabilities().json_schema);
        let system = RunContext::system_message(&spec, constrained);
        let limit = AdaptiveLimit::new(spec.max_inflight, 1, spec.max_inflight);
        let ctx = Arc::new(RunContext {
            slots: PrioritySemaphore::new(spec.max_inflight, Duration::from_millis(250)),
            limit: Mutex::new(limit),
            retry: RetryPolicy { max_attempts: spec.max_attempts, base: Duration::from_millis(250), max_delay: Duration::from_secs(30) },
            tools: Arc::new(ToolPool::new(configs, Arc::new(PyTools(shared.clone())))),
            backend: connected.backend.clone(),
            schema,
            validator: options.python_validation.then(|| Arc::new(PyValidator(shared.clone())) as Arc<dyn OutputValidator>),
            turn_sink: None,
            stats: Arc::new(RunStats::default()),
            system,
            constrained,
            seed: options.seed,
            spec: Arc::new(spec),
        });
        let run = Self {
            shared,
            ctx,
            running: Mutex::new(Running { jobs: None, task: None }),
            cancelled: AtomicBool::new(false),
            _connected: connected,
        };
        run.start();
        Ok(run)
    }

    /// Renders the task for each input without running anything: the first input that cannot be
    /// used raises `InputError` naming its index and the missing variable.
    fn check_inputs(&self, items: Vec<(u64, String)>) -> PyResult<()> {
        for (index, json) in items {
            let input = parse_input(index, &json)?;
            self.ctx.spec.task.render(index, &input).map_err(|e| spec_error(&e))?;
        }
        Ok(())
    }

    /// Hands inputs `(id, index, json object)` to the run; resolves once the run has taken them all
    /// (the dispatch window applies back-pressure here, so inputs are consumed lazily).
    fn feed<'py>(&self, py: Python<'py>, items: Vec<(String, u64, String)>) -> PyResult<Bound<'py, PyAny>> {
        let sender = self.lock_running()?.jobs.clone().ok_or_else(|| RunError::new_err("the run's input is closed"))?;
        let mut jobs = Vec::with_capacity(items.len());
        for (id, index, json) in items {
            jobs.push(Job { id, index, input: parse_input(index, &json)?, resume: None });
        }
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            for job in jobs {
                if sender.send(job).await.is_err() {
                    return Err(RunError::new_err("the run stopped before taking all inputs"));
                }
            }
            Ok(())
        })
    }

    /// No more inputs: the run finishes once the jobs it has are done.
    fn close_input(&self) -> PyResult<()> {
        self.lock_running()?.jobs = None;
        Ok(())
    }

    /// Waits for work for Python: `(tool_calls, batch_calls, validations, results_json, done)`.
    /// `results_json` is one JSON array of the results that finished.
    fn next_events<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let shared = self.shared.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            loop {
                let taken = {
                    let mut outbox = shared.outbox.lock().map_err(|_| RunError::new_err("run state poisoned"))?;
                    let empty = outbox.tool_calls.is_empty()
                        && outbox.batch_calls.is_empty()
                        && outbox.validations.is_empty()
                        && outbox.results.is_empty();
                    if empty && !outbox.done {
                        None
                    } else {
                        let outbox = &mut *outbox;
                        let results = serde_json::to_string(&outbox.results).map_err(|e| RunError::new_err(e.to_string()))?;
                        outbox.results.clear();
                        Some((
                            std::mem::take(&mut outbox.tool_calls),
                            std::mem::take(&mut outbox.batch_calls),
                            std::mem::take(&mut outbox.validations),
                            results,
                            outbox.done && empty,
                        ))
                    }
                };
                match taken {
                    Some(events) => return Ok(events),
                    None => shared.ready.notified().await,
                }
            }
        })
    }

    /// Answers for tool calls: `(call id, ok, text)`; text is the result, or the error message.
    fn complete_tools(&self, items: Vec<(u64, bool, String)>) {
        for (id, ok, text) in items {
            answer(&self.shared.tools, id, if ok { Ok(text) } else { Err(text) });
        }
    }

    /// Answers for batch calls: `(batch id, ok, results or error)`; each result `(ok, text)`.
    fn complete_batches(&self, items: Vec<(u64, bool, Vec<(bool, String)>, String)>) {
        for (id, ok, results, error) in items {
            let value = if ok { Ok(results.into_iter().map(|(ok, t)| if ok { Ok(t) } else { Err(t) }).collect()) } else { Err(error) };
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
    fn stats_json(&self) -> PyResult<String> {
        let stats = self.ctx.stats.snapshot();
        let tools = self.ctx.tools.stats();
        let value = serde_json::json!({
            "run": stats,
            "tools": {"requests": tools.requests, "executions": tools.executions, "cache_hits": tools.cache_hits,
                      "coalesced": tools.coalesced, "errors": tools.errors, "timeouts": tools.timeouts},
            "max_inflight": self.ctx.slots.capacity(),
            "backend": self.ctx.backend.name(),
        });
        Ok(value.to_string())
    }

    /// Stops every agent now. Unfinished jobs produce no result (a journal keeps their last turn).
    fn cancel(&self) -> PyResult<()> {
        self.cancelled.store(true, Relaxed);
        let mut running = self.lock_running()?;
        running.jobs = None;
        if let Some(task) = running.task.take() {
            task.abort();
        }
        self.shared.post(|outbox| outbox.done = true);
        Ok(())
    }

    /// The base URL of the embedded simulator when the backend is `sim://`.
    #[getter]
    fn sim_url(&self) -> Option<String> {
        self._connected.sim.as_ref().map(crate::sim::SimServer::url)
    }
}

impl PyRun {
    fn start(&self) {
        let (jobs_tx, jobs_rx) = mpsc::channel(256);
        let (results_tx, mut results_rx) = mpsc::unbounded_channel::<JobResult>();
        let ctx = self.ctx.clone();
        let shared = self.shared.clone();
        let task = runtime().spawn(async move {
            let forward = {
                let shared = shared.clone();
                tokio::spawn(async move {
                    while let Some(result) = results_rx.recv().await {
                        let mut batch = vec![result];
                        while let Ok(more) = results_rx.try_recv() {
                            batch.push(more);
                        }
                        shared.post(|outbox| outbox.results.append(&mut batch));
                    }
                })
            };
            run_all(ctx, jobs_rx, results_tx).await;
            let _ = forward.await;
            shared.post(|outbox| outbox.done = true);
        });
        if let Ok(mut running) = self.running.lock() {
            running.jobs = Some(jobs_tx);
            running.task = Some(task);
        }
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

fn parse_input(index: u64, json: &str) -> PyResult<Map<String, Value>> {
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(InputError::new_err(format!("input {index}: expected an object (dict), got {}", type_name(&other)))),
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
