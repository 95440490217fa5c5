//! PyO3 bindings: the native module `batchagent_rs._core`. Only conversions, the tool bridge and
//! the error mapping live here; everything else is the Rust core.

use pyo3::prelude::*;

mod errors;
mod run;
mod sim;

#[pymodule]
#[pyo3(name = "_core")]
fn core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    m.add_class::<run::PyRun>()?;
    sim::register(m)?;
    Ok(())
}
