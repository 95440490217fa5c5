//! `batchagent_rs._core.SimServer`: the engine simulator started from Python, served on the
//! process's one tokio runtime, shared with the batch runner.

use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString};

use super::errors::{BackendUnavailable, RunError, SchemaError};
use crate::sim::{SimConfig, SimError, SimServer};

fn sim_error(error: &SimError) -> PyErr {
    match error {
        SimError::Bind { .. } => BackendUnavailable::new_err(error.to_string()),
        SimError::Engine(_) => RunError::new_err(error.to_string()),
        _ => SchemaError::new_err(error.to_string()),
    }
}

/// A running simulator. `stop()` ends it; so does dropping the last reference.
#[pyclass(name = "SimServer", module = "batchagent_rs._core", frozen)]
pub struct PySimServer {
    server: Mutex<Option<SimServer>>,
    /// The stats at `stop()`: still readable afterwards, and final.
    stopped: Mutex<Option<String>>,
    url: String,
}

#[pymethods]
impl PySimServer {
    /// Base URL, `http://127.0.0.1:PORT`.
    #[getter]
    fn url(&self) -> String {
        self.url.clone()
    }

    /// What `GET /sim/stats` returns, as a dict; after `stop()`, the final stats.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let text = {
            let guard = self.server.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match guard.as_ref() {
                Some(server) => server.stats().to_string(),
                None => match self.stopped.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone() {
                    Some(text) => text,
                    None => return Err(RunError::new_err("the simulator was stopped")),
                },
            }
        };
        py.import("json")?.call_method1("loads", (text,))
    }

    /// Stop serving and end the engine loop; a second call does nothing.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let server = self.server.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(server) = server {
            let rt = super::runtime()?;
            let last = py.allow_threads(|| rt.block_on(server.stop()));
            *self.stopped.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(last.to_string());
        }
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("SimServer(url={:?})", self.url)
    }
}

fn option_text(key: &str, value: &Bound<'_, PyAny>) -> PyResult<String> {
    // bool before int: Python's bool is an int.
    if value.is_instance_of::<PyBool>() {
        return Ok(if value.extract::<bool>()? { "true" } else { "false" }.to_owned());
    }
    if value.is_instance_of::<PyString>() || value.is_instance_of::<PyInt>() || value.is_instance_of::<PyFloat>() {
        return Ok(value.str()?.to_string());
    }
    Err(SchemaError::new_err(format!(
        "simulator option `{key}`: expected a str, int, float or bool, got {}",
        value.get_type().name()?
    )))
}

/// Start a simulator with `options` (the keys of a `sim://` URL query); returns once it listens.
#[pyfunction]
fn start_sim(py: Python<'_>, options: &Bound<'_, PyDict>) -> PyResult<PySimServer> {
    let mut config = SimConfig::default();
    // Apply in a fixed order so an error names the same key every time.
    let mut pairs: Vec<(String, String)> = options
        .iter()
        .map(|(k, v)| {
            let key: String = k.extract()?;
            let value = option_text(&key, &v)?;
            Ok((key, value))
        })
        .collect::<PyResult<_>>()?;
    pairs.sort();
    for (key, value) in &pairs {
        config.set(key, value).map_err(|e| sim_error(&e))?;
    }
    config.validate().map_err(|e| sim_error(&e))?;
    let rt = super::runtime()?;
    let server = py.allow_threads(|| rt.block_on(SimServer::start(config))).map_err(|e| sim_error(&e))?;
    let url = server.url();
    Ok(PySimServer { server: Mutex::new(Some(server)), stopped: Mutex::new(None), url })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySimServer>()?;
    m.add_function(wrap_pyfunction!(start_sim, m)?)?;
    Ok(())
}
