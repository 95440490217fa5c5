//! The worker fleet from Python: `FleetClient` (submit, status, results, collect) and the options
//! that make a `Run` a fleet worker (jobs from the stream, results and checkpoints to Redis).

use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use serde::Deserialize;

use crate::backends::Backend;
use crate::fleet::connection::Connection;
use crate::fleet::queue::{self, Entry, RunKeys};
use crate::fleet::semaphore::{FleetSemaphore, SharedLimit};
use crate::fleet::{FleetWorker, RedisBudgets, RedisToolCache, WorkerOptions};
use crate::limits::pacer::SharedBudgets;
use crate::python::errors::{fleet_error, spec_error, InputError, SchemaError};
use crate::python::runtime;
use crate::scheduler::durable::fingerprint;
use crate::store::{InputFormat, InputReader};

/// The `fleet` run option: this run is a worker of the fleet run `run_id`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetRunOptions {
    redis: String,
    run_id: String,
    consumer: String,
    #[serde(default = "default_lease")]
    lease_seconds: f64,
    #[serde(default = "default_outage")]
    outage_seconds: f64,
    /// Jobs read beyond the dispatch window.
    #[serde(default)]
    read_ahead: usize,
    /// Model calls in flight to the run's backend, summed over every worker.
    shared_inflight: usize,
}

fn default_lease() -> f64 {
    30.0
}
fn default_outage() -> f64 {
    300.0
}

fn seconds(field: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| SchemaError::new_err(format!("{field}: {value} is not a positive number of seconds")))
}

/// The shared result cache of `cache="redis"` tools: at `url`, else at the fleet's Redis for a
/// worker; `tool` names the first such tool in the error when there is neither.
pub fn tool_cache(
    py: Python<'_>,
    tool: &str,
    url: Option<&str>,
    fleet: Option<&FleetRunOptions>,
) -> PyResult<Arc<dyn crate::tools::SharedCache>> {
    let Some(url) = url.or(fleet.map(|f| f.redis.as_str())) else {
        return Err(SchemaError::new_err(format!(
            "tool '{tool}' has cache=\"redis\": pass redis=URL (the Redis its results are shared through)"
        )));
    };
    let lease = seconds("lease_seconds", fleet.map_or(default_lease(), |f| f.lease_seconds))?;
    let outage = seconds("outage_seconds", fleet.map_or(default_outage(), |f| f.outage_seconds))?;
    let owner = fleet.map_or_else(|| format!("pid{}", std::process::id()), |f| f.consumer.clone());
    let runtime = runtime()?;
    let cache = py
        .allow_threads(|| runtime.block_on(RedisToolCache::connect(url, outage, lease, &owner)))
        .map_err(|e| fleet_error(&e))?;
    Ok(Arc::new(cache))
}

/// Connects the worker and wraps `backend` in the fleet-wide limit of `max_inflight` calls to the
/// backend's endpoints (named by their URLs, without credentials).
pub fn attach(
    py: Python<'_>,
    options: FleetRunOptions,
    window: usize,
    urls: &[String],
    backend: Arc<dyn Backend>,
) -> PyResult<(Arc<FleetWorker>, Arc<dyn Backend>)> {
    let lease = seconds("lease_seconds", options.lease_seconds)?;
    let outage = seconds("outage_seconds", options.outage_seconds)?;
    let worker_options = WorkerOptions {
        run_id: options.run_id,
        consumer: options.consumer.clone(),
        lease,
        capacity: window.saturating_add(options.read_ahead).max(1),
        outage,
    };
    let runtime = runtime()?;
    let (worker, waits) = py
        .allow_threads(|| {
            runtime.block_on(async {
                let worker = FleetWorker::connect(&options.redis, worker_options).await?;
                // The fleet-wide limit's blocking waits get a connection of their own.
                Ok::<_, crate::fleet::FleetError>((worker, Connection::open(&options.redis, outage, None).await?))
            })
        })
        .map_err(|e| fleet_error(&e))?;
    let shown: Vec<String> = urls.iter().map(|u| crate::secret::display_url(u)).collect();
    let semaphore = Arc::new(FleetSemaphore::new(
        worker.connection().clone(),
        waits,
        &fingerprint(&shown.join("\n")),
        options.shared_inflight,
        lease,
        &options.consumer,
    ));
    worker.set_semaphore(semaphore.clone());
    Ok((worker, Arc::new(SharedLimit { inner: backend, semaphore })))
}

/// The rate-limit budgets of the run's endpoints, kept in the fleet's Redis: every worker on one
/// key draws from one budget.
pub fn shared_budgets(py: Python<'_>, options: &FleetRunOptions) -> PyResult<Arc<dyn SharedBudgets>> {
    let outage = seconds("outage_seconds", options.outage_seconds)?;
    let runtime = runtime()?;
    let conn = py
        .allow_threads(|| runtime.block_on(Connection::open(&options.redis, outage, Some(Duration::from_secs(30)))))
        .map_err(|e| fleet_error(&e))?;
    Ok(Arc::new(RedisBudgets::new(conn)))
}

/// Inputs added per round trip.
const FILE_CHUNK: usize = 500;

#[pyclass(name = "FleetClient", module = "batchagent_rs._core", frozen)]
pub struct PyFleetClient {
    conn: Connection,
}

impl PyFleetClient {
    fn block<T: Send>(
        py: Python<'_>,
        f: impl std::future::Future<Output = Result<T, crate::fleet::FleetError>> + Send,
    ) -> PyResult<T> {
        let runtime = runtime()?;
        py.allow_threads(|| runtime.block_on(f)).map_err(|e| fleet_error(&e))
    }
}

#[pymethods]
impl PyFleetClient {
    /// The consumer group of every run's job stream.
    #[classattr]
    #[pyo3(name = "GROUP")]
    fn group() -> &'static str {
        crate::fleet::GROUP
    }

    /// The key of run `run_id`'s job stream.
    #[staticmethod]
    fn jobs_stream(run_id: &str) -> String {
        RunKeys::new(run_id).jobs
    }

    /// Connects to Redis at `url`; commands are retried while Redis is unreachable, for up to
    /// `outage_seconds`.
    #[new]
    #[pyo3(signature = (url, outage_seconds=30.0))]
    fn new(py: Python<'_>, url: &str, outage_seconds: f64) -> PyResult<Self> {
        let outage = seconds("outage_seconds", outage_seconds)?;
        let runtime = runtime()?;
        let conn = py
            .allow_threads(|| runtime.block_on(Connection::open(url, outage, Some(Duration::from_secs(30)))))
            .map_err(|e| fleet_error(&e))?;
        Ok(Self { conn })
    }

    /// Creates a run for `spec_json` (stored once per fingerprint): `(run id, fingerprint)`.
    fn create_run(&self, py: Python<'_>, spec_json: &str) -> PyResult<(String, String)> {
        let print = fingerprint(spec_json);
        let run_id = Self::block(py, queue::create_run(&self.conn, &print, spec_json))?;
        Ok((run_id, print))
    }

    /// Adds inputs `(id, index, input JSON, extra_body JSON)` to the run's stream, in index order.
    #[allow(clippy::needless_pass_by_value)] // PyO3 extracts a list into an owned Vec.
    fn add_jobs(&self, py: Python<'_>, run_id: &str, items: Vec<Entry>) -> PyResult<()> {
        Self::block(py, queue::add_jobs(&self.conn, &RunKeys::new(run_id), &items))
    }

    /// Adds every record of an input file (JSONL, CSV or text, as `batchagent run` reads them) to
    /// the run's stream, after checking the whole file against the spec's task template (a bad
    /// line, a missing variable or a repeated id fails before anything is added). Returns the
    /// number of inputs.
    #[pyo3(signature = (run_id, spec_json, path, format="auto"))]
    fn add_file(&self, py: Python<'_>, run_id: &str, spec_json: &str, path: &str, format: &str) -> PyResult<u64> {
        let path = std::path::Path::new(path);
        let spec = crate::spec::BatchSpec::from_json(spec_json).map_err(|e| spec_error(&e))?;
        let format: InputFormat =
            format.parse().map_err(|e: crate::store::input::InputError| InputError::new_err(e.to_string()))?;
        py.allow_threads(|| crate::scheduler::feed::prescan(path, format, &spec.task, false, false))
            .map_err(|e| InputError::new_err(e.to_string()))?;
        let reader = InputReader::open(path, format).map_err(|e| InputError::new_err(e.to_string()))?;
        let keys = RunKeys::new(run_id);
        let mut chunk: Vec<Entry> = Vec::with_capacity(FILE_CHUNK);
        let mut total = 0u64;
        for record in reader {
            let record = record.map_err(|e| InputError::new_err(e.to_string()))?;
            let id = record.id().unwrap_or_else(|| record.index.to_string());
            let json = serde_json::to_string(&record.fields).map_err(|e| InputError::new_err(e.to_string()))?;
            chunk.push((id, record.index, json, None));
            total += 1;
            if chunk.len() == FILE_CHUNK {
                Self::block(py, queue::add_jobs(&self.conn, &keys, &chunk))?;
                chunk.clear();
            }
        }
        Self::block(py, queue::add_jobs(&self.conn, &keys, &chunk))?;
        Ok(total)
    }

    /// Marks the run's input complete with `total` inputs.
    fn close_run(&self, py: Python<'_>, run_id: &str, total: u64) -> PyResult<()> {
        Self::block(py, queue::close_run(&self.conn, &RunKeys::new(run_id), total))
    }

    /// `(fingerprint, spec JSON)` of a run.
    fn load_spec(&self, py: Python<'_>, run_id: &str) -> PyResult<(String, String)> {
        Self::block(py, queue::load_spec(&self.conn, &RunKeys::new(run_id)))
    }

    /// Runs that are not complete, oldest first.
    fn open_runs(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        Self::block(py, queue::open_runs(&self.conn))
    }

    /// Records that `worker` does not take the run, and why (shown by `status`).
    fn refuse(&self, py: Python<'_>, run_id: &str, worker: &str, message: &str) -> PyResult<()> {
        Self::block(py, queue::refuse(&self.conn, &RunKeys::new(run_id), worker, message))
    }

    /// The run's status as JSON.
    fn status_json(&self, py: Python<'_>, run_id: &str) -> PyResult<String> {
        let status = Self::block(py, queue::status(&self.conn, &RunKeys::new(run_id)))?;
        serde_json::to_string(&status).map_err(|e| SchemaError::new_err(e.to_string()))
    }

    /// Results finished after `cursor` ("0": from the start): `(next cursor, result JSON lines)`,
    /// waiting up to `block_ms` for the first.
    #[pyo3(signature = (run_id, cursor, count=1000, block_ms=0))]
    fn results_since(
        &self,
        py: Python<'_>,
        run_id: &str,
        cursor: &str,
        count: usize,
        block_ms: u64,
    ) -> PyResult<(String, Vec<String>)> {
        Self::block(py, queue::results_since(&self.conn, &RunKeys::new(run_id), cursor, count, block_ms))
    }

    /// Writes one line per input, in input order, to `path`; `None` (nothing written) while the run
    /// is not complete, else the number of lines.
    fn collect(&self, py: Python<'_>, run_id: &str, path: &str) -> PyResult<Option<u64>> {
        Self::block(py, queue::collect(&self.conn, &RunKeys::new(run_id), std::path::Path::new(path)))
    }
}
