//! Python bindings (PyO3): the native module `batchagent_rs._core`. Only conversions, the tool bridge and
//! the error mapping live here; everything else is the Rust core.

use std::sync::OnceLock;

use pyo3::prelude::*;

mod errors;
mod run;
mod sim;

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// The process's one tokio runtime, started on first use.
pub(crate) fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
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

#[pymodule]
#[pyo3(name = "_core")]
fn core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    m.add_class::<run::PyRun>()?;
    m.add_function(wrap_pyfunction!(check_schema, m)?)?;
    sim::register(m)?;
    Ok(())
}
