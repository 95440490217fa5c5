//! The one place Rust errors become Python exceptions. Each class subclasses the builtin a user
//! would already catch.

use pyo3::create_exception;
use pyo3::exceptions::{PyConnectionError, PyOSError, PyRuntimeError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;

use crate::backends::probe::ProbeError;
use crate::backends::BackendError;
use crate::spec::SpecError;

create_exception!(_core, SchemaError, PyValueError, "An output schema, tool signature or setting is invalid.");
create_exception!(
    _core,
    InputError,
    PyValueError,
    "An input cannot be used: a missing template variable, a malformed line."
);
create_exception!(
    _core,
    BackendUnavailable,
    PyConnectionError,
    "The backend cannot be reached or refused the configuration."
);
create_exception!(_core, BackendTimeout, PyTimeoutError, "The backend did not answer in time.");
create_exception!(_core, JournalError, PyOSError, "The journal, cache or output file cannot be used.");
create_exception!(_core, RunError, PyRuntimeError, "The run cannot continue.");

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("SchemaError", py.get_type::<SchemaError>())?;
    m.add("InputError", py.get_type::<InputError>())?;
    m.add("BackendUnavailable", py.get_type::<BackendUnavailable>())?;
    m.add("BackendTimeout", py.get_type::<BackendTimeout>())?;
    m.add("JournalError", py.get_type::<JournalError>())?;
    m.add("RunError", py.get_type::<RunError>())?;
    Ok(())
}

pub fn spec_error(error: &SpecError) -> PyErr {
    match error {
        SpecError::MissingVariable { .. } | SpecError::BadInput { .. } => InputError::new_err(error.to_string()),
        SpecError::Template { .. } | SpecError::Invalid { .. } | SpecError::Setting { .. } => {
            SchemaError::new_err(error.to_string())
        }
    }
}

pub fn backend_error(error: &BackendError) -> PyErr {
    match error {
        BackendError::Timeout { .. } => BackendTimeout::new_err(error.to_string()),
        BackendError::Config(_) => SchemaError::new_err(error.to_string()),
        _ => BackendUnavailable::new_err(error.to_string()),
    }
}

pub fn probe_error(error: &ProbeError) -> PyErr {
    match error {
        ProbeError::Config(inner) => backend_error(inner),
        _ => BackendUnavailable::new_err(error.to_string()),
    }
}

pub fn fleet_error(error: &crate::fleet::FleetError) -> PyErr {
    use crate::fleet::FleetError;
    match error {
        FleetError::Connect { .. } | FleetError::Unavailable { .. } => PyConnectionError::new_err(error.to_string()),
        FleetError::Output { .. } => JournalError::new_err(error.to_string()),
        _ => RunError::new_err(error.to_string()),
    }
}
