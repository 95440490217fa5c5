//! Token counting for the Python workflows (`reduce` sizes its groups with it): the counting
//! compaction uses, the server's `/tokenize` where it has one, and the context window it reports.

use std::sync::Arc;

use futures_util::stream::{self, StreamExt as _};
use pyo3::prelude::*;

use crate::backends::connect::is_embedded_sim;
use crate::backends::tokenize::{context_window, Tokenizer};
use crate::backends::url::BackendOptions;
use crate::conversation::Message;
use crate::python::errors::{backend_error, spec_error, SchemaError};
use crate::python::runtime;
use crate::scheduler::agent::RunContext;
use crate::sim::SimConfig;

/// Counts sent to a server at once.
const CONCURRENT_COUNTS: usize = 32;

enum Counter {
    /// An embedded simulator (`sim://` without a host) is started per run; its tokenizer and chat
    /// template are these, so the count is made here, exactly.
    EmbeddedSim,
    Server(Tokenizer),
}

#[pyclass(name = "TokenCounter", module = "batchagent_rs._core", frozen)]
pub struct PyTokenCounter {
    counter: Arc<Counter>,
    window: Option<u64>,
}

#[pymethods]
impl PyTokenCounter {
    #[new]
    #[pyo3(signature = (backend, model, api_key=None))]
    fn new(py: Python<'_>, backend: &str, model: &str, api_key: Option<String>) -> PyResult<Self> {
        if is_embedded_sim(backend) {
            let config = SimConfig::from_url(backend).map_err(|e| SchemaError::new_err(e.to_string()))?;
            return Ok(Self {
                counter: Arc::new(Counter::EmbeddedSim),
                window: Some(u64::from(config.context_window())),
            });
        }
        let options = BackendOptions { api_key: crate::secret::Secret::non_empty(api_key), ..Default::default() };
        let tokenizer = Tokenizer::connect(backend, &options, model).map_err(|e| backend_error(&e))?;
        let runtime = runtime()?;
        let window = py.allow_threads(|| runtime.block_on(context_window(backend, &options, model)));
        Ok(Self { counter: Arc::new(Counter::Server(tokenizer)), window })
    }

    /// The context window the backend reports (`/v1/models` `max_model_len`), if it does.
    #[getter]
    fn window(&self) -> Option<u64> {
        self.window
    }

    /// Whether counts come from the backend's tokenizer (an estimate otherwise).
    #[getter]
    fn exact(&self) -> bool {
        match &*self.counter {
            Counter::EmbeddedSim => true,
            Counter::Server(tokenizer) => tokenizer.is_exact(),
        }
    }

    /// The prompt tokens of chat requests made of an optional system message and one user message.
    fn count(&self, py: Python<'_>, prompts: Vec<(Option<String>, String)>) -> PyResult<Vec<u64>> {
        let conversations: Vec<Vec<Message>> = prompts
            .into_iter()
            .map(|(system, user)| system.into_iter().map(Message::system).chain([Message::user(user)]).collect())
            .collect();
        match &*self.counter {
            Counter::EmbeddedSim => Ok(py.allow_threads(|| {
                conversations
                    .iter()
                    .map(|m| crate::sim::tokenizer::count(&crate::sim::server::render_chatml(m, &[])) as u64)
                    .collect()
            })),
            Counter::Server(tokenizer) => {
                let runtime = runtime()?;
                Ok(py.allow_threads(|| {
                    runtime.block_on(
                        stream::iter(conversations.iter().map(|m| tokenizer.count(m, &[])))
                            .buffered(CONCURRENT_COUNTS)
                            .map(|c| c.tokens)
                            .collect(),
                    )
                }))
            }
        }
    }
}

/// The system message a run of this spec (JSON text) sends, with the schema instructions it adds
/// when the schema goes into the prompt; `None` when it sends none.
#[pyfunction]
pub fn system_prompt(spec_json: &str) -> PyResult<Option<String>> {
    let spec = crate::spec::BatchSpec::from_json(spec_json).map_err(|e| spec_error(&e))?;
    Ok(RunContext::system_message(&spec, false).map(|m| m.content))
}
