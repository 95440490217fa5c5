//! `batchagent_rs._core.Engine`: the embedded engine's loop (`crate::engine::LocalEngine`) driving a
//! Python model worker (`batchagent_rs.engine.EngineWorker`), one GIL acquisition per step.

use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict, PyList, PyTuple};

use super::errors::{RunError, SchemaError};
use crate::chat_template::ToolCallFormat;
use crate::engine::server::{EngineServer, ServeOptions, TextCodec};
use crate::engine::{
    EngineEvent, EngineRequest, Eviction, LocalEngine, Sampled, Sampling, SchedulerConfig, StepExecutor, StepLayout,
    TokenLogprobs,
};

/// Little-endian bytes of `values`, which the worker reads with `torch.frombuffer` (a bytearray:
/// torch warns on a read-only buffer).
fn le_bytes<'py, const N: usize, T: Copy>(
    py: Python<'py>,
    values: &[T],
    to_bytes: impl Fn(T) -> [u8; N],
) -> PyResult<Bound<'py, PyByteArray>> {
    PyByteArray::new_with(py, values.len() * N, |buf| {
        for (chunk, &v) in buf.chunks_exact_mut(N).zip(values) {
            chunk.copy_from_slice(&to_bytes(v));
        }
        Ok(())
    })
}

/// The step crossing: the layout's arrays as bytes, the sampling rows only when some row samples,
/// the rows that ask for logprobs (with how many top tokens) only when some do.
pub(crate) struct PyStepExecutor {
    worker: Py<PyAny>,
}

/// A row's logprobs as the worker returns them: the sampled token's, the top tokens' ids and theirs.
type LogprobsRow = (f32, Vec<u32>, Vec<f32>);

impl PyStepExecutor {
    fn call(&self, py: Python<'_>, l: &StepLayout) -> PyResult<Sampled> {
        let sampling = if l.sampling.iter().any(|s| s.temperature > 0.0) {
            let rows = l.sampling.iter().zip(&l.output_index).map(|(s, &index)| {
                (s.temperature, s.top_p, s.top_k, s.seed, index).into_pyobject(py).map(Bound::into_any)
            });
            PyList::new(py, rows.collect::<PyResult<Vec<_>>>()?)?.into_any()
        } else {
            py.None().into_bound(py)
        };
        let banned: Vec<(usize, &Vec<u32>)> = l.banned.iter().enumerate().filter(|(_, b)| !b.is_empty()).collect();
        let asked: Vec<(usize, u32)> =
            l.sampling.iter().enumerate().filter_map(|(row, s)| s.logprobs.map(|k| (row, k))).collect();
        let args = PyTuple::new(
            py,
            [
                le_bytes(py, &l.input_ids, i64::to_le_bytes)?.into_any(),
                le_bytes(py, &l.positions, i64::to_le_bytes)?.into_any(),
                le_bytes(py, &l.query_starts, i64::to_le_bytes)?.into_any(),
                le_bytes(py, &l.context_lens, i64::to_le_bytes)?.into_any(),
                le_bytes(py, &l.block_tables, i32::to_le_bytes)?.into_any(),
                l.table_width.into_pyobject(py)?.into_any(),
                le_bytes(py, &l.slot_mapping, i64::to_le_bytes)?.into_any(),
                sampling,
                banned.into_pyobject(py)?.into_any(),
                asked.clone().into_pyobject(py)?.into_any(),
            ],
        )?;
        let out = self.worker.bind(py).call_method1("step", args)?;
        if asked.is_empty() {
            return Ok(Sampled { tokens: out.extract()?, logprobs: Vec::new() });
        }
        let (tokens, rows): (Vec<u32>, Vec<LogprobsRow>) = out.extract()?;
        if rows.len() != asked.len() {
            return Err(PyValueError::new_err(format!(
                "the worker returned logprobs for {} rows, not the {} asked",
                rows.len(),
                asked.len()
            )));
        }
        let mut logprobs = vec![None; l.num_seqs()];
        for ((row, _), (logprob, ids, values)) in asked.into_iter().zip(rows) {
            let top = ids.into_iter().zip(values).collect();
            if let Some(slot) = logprobs.get_mut(row) {
                *slot = Some(TokenLogprobs { logprob, top });
            }
        }
        Ok(Sampled { tokens, logprobs })
    }
}

impl StepExecutor for PyStepExecutor {
    fn execute(&mut self, layout: &StepLayout) -> Result<Sampled, String> {
        Python::with_gil(|py| {
            self.call(py, layout).map_err(|e| {
                // The traceback goes to stderr, where a server's operator looks; the message travels on.
                e.print(py);
                format!("the model runner failed: {e}")
            })
        })
    }
}

/// Reads the scheduler's limits from the worker (`num_pages`, `page_size`) and the arguments.
pub(crate) fn start_engine(
    worker: &Bound<'_, PyAny>,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    enable_prefix_caching: bool,
    eviction: Eviction,
) -> PyResult<LocalEngine> {
    let block_size: usize = worker.getattr("block_size")?.extract()?;
    let page_size: usize = worker.getattr("page_size")?.extract()?;
    let num_pages: usize = worker.getattr("num_pages")?.extract()?;
    let config = SchedulerConfig {
        block_size,
        page_size,
        // Whole blocks: a page left over could never be used.
        kv_capacity_blocks: num_pages / (block_size / page_size.max(1)).max(1),
        max_num_seqs,
        max_num_batched_tokens,
        enable_prefix_caching,
        eviction,
    };
    let executor = Box::new(PyStepExecutor { worker: worker.clone().unbind() });
    LocalEngine::start(config, executor).map_err(|e| SchemaError::new_err(e.to_string()))
}

/// The embedded engine over a model worker; `generate` runs prompts through continuous batching.
#[pyclass(name = "Engine", module = "batchagent_rs._core", frozen)]
pub struct PyEngine {
    engine: Arc<LocalEngine>,
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (worker, *, max_num_seqs=256, max_num_batched_tokens=8192, enable_prefix_caching=true))]
    fn new(
        worker: &Bound<'_, PyAny>,
        max_num_seqs: usize,
        max_num_batched_tokens: usize,
        enable_prefix_caching: bool,
    ) -> PyResult<Self> {
        // Requests of `generate` carry no agent hints, so the eviction policy makes no difference.
        let engine =
            start_engine(worker, max_num_seqs, max_num_batched_tokens, enable_prefix_caching, Eviction::default())?;
        Ok(Self { engine: Arc::new(engine) })
    }

    /// Generates for every prompt (token ids) at once, through the engine's continuous batching;
    /// returns each prompt's output token ids, in order.
    #[pyo3(signature = (prompts, max_tokens, *, stop_token_ids=Vec::new(), min_tokens=0, temperature=0.0, top_p=1.0, top_k=0, seed=None))]
    #[allow(clippy::too_many_arguments, clippy::needless_pass_by_value)] // Python keyword arguments.
    fn generate(
        &self,
        py: Python<'_>,
        prompts: Vec<Vec<u32>>,
        max_tokens: usize,
        stop_token_ids: Vec<u32>,
        min_tokens: usize,
        temperature: f64,
        top_p: f64,
        top_k: u32,
        seed: Option<u64>,
    ) -> PyResult<Vec<Vec<u32>>> {
        let sampling = check_sampling(temperature, top_p, top_k, seed)?;
        let mut receivers: Vec<_> = prompts
            .into_iter()
            .map(|prompt| {
                self.engine.submit(EngineRequest {
                    prompt,
                    max_new_tokens: max_tokens,
                    stop_token_ids: stop_token_ids.clone(),
                    min_tokens,
                    sampling,
                    ..EngineRequest::default()
                })
            })
            .collect();
        let runtime = super::runtime()?;
        let mut outputs = vec![Vec::new(); receivers.len()];
        for (rx, out) in receivers.iter_mut().zip(&mut outputs) {
            loop {
                // Wake now and then to let Ctrl-C through; dropping the receivers aborts the rest.
                let event = py.allow_threads(|| {
                    runtime.block_on(async { tokio::time::timeout(Duration::from_millis(200), rx.recv()).await })
                });
                match event {
                    Err(_) => py.check_signals()?,
                    Ok(Some(EngineEvent::Token { id, .. })) => out.push(id),
                    Ok(Some(EngineEvent::Finished { .. })) => break,
                    Ok(Some(EngineEvent::Started { .. })) => {}
                    Ok(Some(EngineEvent::Rejected { prompt_tokens, max_new_tokens, kv_capacity_tokens })) => {
                        return Err(SchemaError::new_err(format!(
                            "a prompt of {prompt_tokens} tokens with max_tokens {max_new_tokens} cannot fit in the \
                             KV cache ({kv_capacity_tokens} tokens)"
                        )));
                    }
                    Ok(None) => {
                        let why = self.engine.failure().unwrap_or_else(|| "the engine was shut down".into());
                        return Err(RunError::new_err(why));
                    }
                }
            }
        }
        Ok(outputs)
    }

    /// The counters (vLLM's metric names without the prefix) as of the last step.
    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = self.engine.metrics();
        let d = PyDict::new(py);
        d.set_item("num_requests_running", m.running)?;
        d.set_item("num_requests_waiting", m.waiting)?;
        d.set_item("kv_cache_usage_perc", m.kv_usage)?;
        d.set_item("prefix_cache_queries", m.prefix_queries)?;
        d.set_item("prefix_cache_hits", m.prefix_hits)?;
        d.set_item("prompt_tokens", m.prompt_tokens)?;
        d.set_item("generation_tokens", m.generation_tokens)?;
        d.set_item("request_success", m.requests_finished)?;
        d.set_item("num_preemptions", m.preemptions)?;
        d.set_item("steps", m.steps)?;
        d.set_item("step_prefill_tokens", m.step_prefill_tokens)?;
        d.set_item("busy_seconds", m.busy.as_secs_f64())?;
        Ok(d)
    }

    /// Stops the loop after the step in progress.
    fn shutdown(&self, py: Python<'_>) {
        let engine = Arc::clone(&self.engine);
        py.allow_threads(move || engine.shutdown());
    }
}

/// Sampling settings as the OpenAI API bounds them.
pub(crate) fn check_sampling(temperature: f64, top_p: f64, top_k: u32, seed: Option<u64>) -> PyResult<Sampling> {
    if !(0.0..=2.0).contains(&temperature) {
        return Err(SchemaError::new_err(format!("temperature {temperature} is not in [0, 2]")));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(SchemaError::new_err(format!("top_p {top_p} is not in (0, 1]")));
    }
    Ok(Sampling { temperature, top_p, top_k, seed, logprobs: None })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEngine>()?;
    m.add_class::<PyEngineServer>()?;
    m.add_function(wrap_pyfunction!(serve_engine, m)?)?;
    Ok(())
}

/// The worker's tokenizer, called from the server's blocking threads.
struct PyCodec {
    worker: Py<PyAny>,
}

fn py_message(e: &PyErr) -> String {
    e.to_string()
}

impl TextCodec for PyCodec {
    fn encode_chat(&self, body_json: &str, with_tools: bool) -> Result<Vec<u32>, String> {
        Python::with_gil(|py| {
            self.worker.bind(py).call_method1("encode_chat", (body_json, with_tools))?.extract::<Vec<u32>>()
        })
        .map_err(|e| py_message(&e))
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        Python::with_gil(|py| self.worker.bind(py).call_method1("encode", (text,))?.extract::<Vec<u32>>())
            .map_err(|e| py_message(&e))
    }

    fn detokenize(
        &self,
        ids: &[u32],
        prefix: usize,
        read: usize,
        last: bool,
    ) -> Result<(String, usize, usize), String> {
        Python::with_gil(|py| self.worker.bind(py).call_method1("detokenize", (ids, prefix, read, last))?.extract())
            .map_err(|e| py_message(&e))
    }

    fn token_texts(&self, ids: &[u32]) -> Result<Vec<String>, String> {
        Python::with_gil(|py| self.worker.bind(py).call_method1("token_texts", (ids,))?.extract())
            .map_err(|e| py_message(&e))
    }
}

/// A running `batchagent engine serve`.
#[pyclass(name = "EngineServer", module = "batchagent_rs._core", frozen)]
pub struct PyEngineServer {
    server: std::sync::Mutex<Option<EngineServer>>,
    url: String,
}

#[pymethods]
impl PyEngineServer {
    #[getter]
    fn url(&self) -> String {
        self.url.clone()
    }

    /// Stops serving and the engine loop; a second call does nothing.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let server = self.server.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(server) = server {
            let rt = super::runtime()?;
            py.allow_threads(|| rt.block_on(server.stop()));
        }
        Ok(())
    }
}

/// Serves `worker`'s model over the OpenAI-compatible API; returns once it listens.
#[pyfunction]
#[pyo3(signature = (worker, *, model, max_model_len, eos_token_ids, host="127.0.0.1".to_owned(), port=8000, max_num_seqs=256, max_num_batched_tokens=8192, enable_prefix_caching=true, kv_pin_ttl=30.0, kv_eviction="next_use", tool_call_parser=None, chat_template=None))]
#[allow(clippy::too_many_arguments)] // Python keyword arguments.
fn serve_engine(
    py: Python<'_>,
    worker: &Bound<'_, PyAny>,
    model: String,
    max_model_len: usize,
    eos_token_ids: Vec<u32>,
    host: String,
    port: u16,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    enable_prefix_caching: bool,
    kv_pin_ttl: f64,
    kv_eviction: &str,
    tool_call_parser: Option<&str>,
    chat_template: Option<&str>,
) -> PyResult<PyEngineServer> {
    // vLLM's `--tool-call-parser`; by default the form the model's chat template asks for.
    let tool_call_parser = match tool_call_parser {
        Some(name) => name.parse().map_err(|e: String| PyValueError::new_err(format!("tool_call_parser: {e}")))?,
        None => chat_template.map_or(ToolCallFormat::Hermes, ToolCallFormat::of_template),
    };
    let kv_pin_ttl = Duration::try_from_secs_f64(kv_pin_ttl)
        .map_err(|_| PyValueError::new_err(format!("kv_pin_ttl {kv_pin_ttl} is not a number of seconds >= 0")))?;
    let eviction: Eviction =
        kv_eviction.parse().map_err(|e: String| PyValueError::new_err(format!("kv_eviction: {e}")))?;
    let engine = Arc::new(start_engine(worker, max_num_seqs, max_num_batched_tokens, enable_prefix_caching, eviction)?);
    let codec = Arc::new(PyCodec { worker: worker.clone().unbind() });
    let options = ServeOptions { host, port, model, max_model_len, eos_token_ids, kv_pin_ttl, tool_call_parser };
    let rt = super::runtime()?;
    let started = py.allow_threads(|| rt.block_on(EngineServer::start(Arc::clone(&engine), codec, options)));
    match started {
        Ok(server) => {
            let url = server.url();
            Ok(PyEngineServer { server: std::sync::Mutex::new(Some(server)), url })
        }
        Err(e) => {
            py.allow_threads(|| engine.shutdown());
            Err(super::errors::BackendUnavailable::new_err(e.to_string()))
        }
    }
}
