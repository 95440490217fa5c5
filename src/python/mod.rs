//! Python bindings (PyO3): the native module `batchagent_rs._core`. Only conversions, the tool bridge and
//! the error mapping live here; everything else is the Rust core.

use std::sync::OnceLock;

use pyo3::prelude::*;

mod engine;
mod errors;
mod fleet;
mod population;
mod run;
mod sim;
mod tokens;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// The process's one tokio runtime, started on first use.
///
/// One worker thread unless `BATCHAGENT_WORKER_THREADS` says otherwise: a client's work per call is
/// tens of microseconds, and with two workers the wake-ups between them cost more CPU than the
/// second thread saves (measured: -25% client CPU per agent-turn with one). `batchagent sim serve`
/// sets the variable to use every core.
pub(crate) fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let workers = match std::env::var("BATCHAGENT_WORKER_THREADS") {
        Ok(text) => text.trim().parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| {
            errors::RunError::new_err(format!("BATCHAGENT_WORKER_THREADS={text:?} is not a positive number"))
        })?,
        Err(_) => 1,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .thread_name("batchagent")
        .build()
        .map_err(|e| errors::RunError::new_err(format!("cannot start the async runtime: {e}")))?;
    Ok(RUNTIME.get_or_init(|| runtime))
}

/// Compiles a JSON Schema (as JSON text) the way a run will; raises `SchemaError` naming the bad part.
#[pyfunction]
fn check_schema(schema_json: &str) -> PyResult<()> {
    let schema: serde_json::Value = serde_json::from_str(schema_json)
        .map_err(|e| errors::SchemaError::new_err(format!("output schema is not JSON: {e}")))?;
    crate::output::CompiledSchema::compile(&schema)
        .map(drop)
        .map_err(|e| errors::SchemaError::new_err(format!("output schema: {e}")))
}

/// Before a run: every backend answers within `timeout` seconds (sent with the key the model calls
/// will send), and `model`, when given, is one they serve. Raises `BackendUnavailable` saying which
/// backend did not answer, or which models are served.
#[pyfunction]
#[pyo3(signature = (backends, model=None, api_key=None, timeout=3.0, extra_headers=Vec::new()))]
#[allow(clippy::needless_pass_by_value)] // PyO3 extracts a list into an owned Vec.
fn check_backends(
    py: Python<'_>,
    backends: Vec<String>,
    model: Option<&str>,
    api_key: Option<String>,
    timeout: f64,
    extra_headers: Vec<(String, String)>,
) -> PyResult<()> {
    for (name, value) in &extra_headers {
        crate::backends::http::check_header(name, value).map_err(errors::SchemaError::new_err)?;
    }
    let timeout = std::time::Duration::try_from_secs_f64(timeout)
        .map_err(|_| errors::SchemaError::new_err(format!("timeout: {timeout} is not a number of seconds")))?;
    let options = crate::backends::url::BackendOptions {
        api_key: crate::secret::Secret::non_empty(api_key),
        extra_headers,
        ..Default::default()
    };
    let runtime = runtime()?;
    py.allow_threads(|| runtime.block_on(crate::backends::probe::check(&backends, &options, model, timeout)))
        .map_err(|e| errors::probe_error(&e))
}

/// Checks headers given as `extra_headers`: valid names, not the framing headers, no control
/// characters in values. Raises `SchemaError` naming the header (never its value).
#[pyfunction]
#[allow(clippy::needless_pass_by_value)] // PyO3 extracts a list into an owned Vec.
fn check_headers(headers: Vec<(String, String)>) -> PyResult<()> {
    for (name, value) in &headers {
        crate::backends::http::check_header(name, value).map_err(errors::SchemaError::new_err)?;
    }
    Ok(())
}

/// A URL as it may be printed: no query, no user info (either can hold a key).
#[pyfunction]
fn display_url(url: &str) -> String {
    crate::secret::display_url(url)
}

/// Validates a batch spec (as JSON text) the way a run will; raises `SchemaError` naming the setting.
#[pyfunction]
fn check_spec(spec_json: &str) -> PyResult<()> {
    crate::spec::BatchSpec::from_json(spec_json).map(drop).map_err(|e| errors::spec_error(&e))
}

#[pymodule]
#[pyo3(name = "_core")]
fn core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    m.add_class::<run::PyRun>()?;
    m.add_class::<fleet::PyFleetClient>()?;
    m.add_function(wrap_pyfunction!(check_schema, m)?)?;
    m.add_function(wrap_pyfunction!(check_backends, m)?)?;
    m.add_function(wrap_pyfunction!(display_url, m)?)?;
    m.add_function(wrap_pyfunction!(check_headers, m)?)?;
    m.add_function(wrap_pyfunction!(check_spec, m)?)?;
    m.add_function(wrap_pyfunction!(population::save_population, m)?)?;
    m.add_function(wrap_pyfunction!(population::load_population, m)?)?;
    m.add_class::<tokens::PyTokenCounter>()?;
    m.add_function(wrap_pyfunction!(tokens::system_prompt, m)?)?;
    sim::register(m)?;
    engine::register(m)?;
    Ok(())
}
