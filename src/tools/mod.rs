//! The tool pool: in-flight coalescing of identical calls, result caching, per-tool limits and the
//! batch collector.

mod batch;
mod cache;
mod canonical;
mod limit;
mod pool;
mod stats;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

pub use canonical::canonical_arguments;
pub use pool::ToolPool;

pub use stats::{ToolCounts, ToolStats};

/// How the pool runs one tool.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolConfig {
    pub name: String,
    /// Keep successful results after completion (errors are never kept). Ignored for a tool with
    /// side effects.
    pub cache: bool,
    /// How long a cached result stays valid; `None` = until evicted.
    pub cache_ttl: Option<Duration>,
    /// LRU bound on cached results of this tool.
    pub cache_max_entries: usize,
    /// Results are also kept in the pool's [`SharedCache`] (Redis), for every process that uses
    /// it: an identical call made anywhere runs once. Implies `cache`.
    pub cache_shared: bool,
    /// Executions of this tool at once (a batch call counts as one); `Some(0)` is read as 1.
    pub max_concurrency: Option<usize>,
    /// Executions started per second: a token bucket holding `max(1, rate)` tokens, so up to one
    /// second's worth may start back to back, then they are spaced `1/rate` apart. Non-positive or
    /// non-finite rates mean no limit.
    pub rate_limit: Option<f64>,
    /// Limit on one execution (a batch call counts as one), measured from its start, after any
    /// concurrency or rate wait.
    pub timeout: Option<Duration>,
    /// `Some` makes the tool batchable: distinct calls arriving within the window after the first
    /// go to one `call_batch`.
    pub batch_window: Option<Duration>,
    /// Most argument sets per batch call; a full batch is dispatched without waiting out the window.
    /// 0 is read as 1.
    pub batch_max: usize,
    /// The tool changes something outside the run (sends a message, writes a row): it starts only
    /// once the model's turn is complete, never from a stream that may still fail, and identical
    /// calls are not merged into one execution (each decision to call it runs once).
    pub side_effects: bool,
    /// What an error of this tool does to the job.
    pub on_error: OnToolError,
}

/// What an error of a tool (an exception, a timeout, arguments it rejects) does to the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnToolError {
    /// The error text goes back to the model as the call's result; the job goes on.
    #[default]
    Report,
    /// The job fails with error kind `tool`.
    Raise,
}

pub const DEFAULT_CACHE_MAX_ENTRIES: usize = 10_000;
pub const DEFAULT_BATCH_MAX: usize = 64;

impl ToolConfig {
    /// A tool with no caching, limits, timeout or batching.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), ..Self::default() }
    }
}

impl Default for ToolConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            cache: false,
            cache_ttl: None,
            cache_max_entries: DEFAULT_CACHE_MAX_ENTRIES,
            cache_shared: false,
            max_concurrency: None,
            rate_limit: None,
            timeout: None,
            batch_window: None,
            batch_max: DEFAULT_BATCH_MAX,
            side_effects: false,
            on_error: OnToolError::Report,
        }
    }
}

/// Executes tools; implemented by the Python bridge (and by tests). Errors are messages (a Python
/// exception's "Type: message"), becoming a tool error the model sees.
pub trait ToolExecutor: Send + Sync + 'static {
    /// `arguments` is the canonical JSON object text.
    fn call(&self, name: &str, arguments: Arc<str>) -> BoxFuture<'static, Result<String, String>>;

    /// One result per argument set, in order. `Err` fails every call of the batch.
    fn call_batch(
        &self,
        name: &str,
        arguments: Vec<Arc<str>>,
    ) -> BoxFuture<'static, Result<Vec<Result<String, String>>, String>>;
}

/// Where a call of a shared-cache tool got its result.
pub struct SharedOutcome {
    pub outcome: Result<Arc<str>, ToolError>,
    /// Answered by the shared cache (another process's execution); `false` when `execute` ran.
    pub hit: bool,
}

/// A result cache shared by every process of a fleet (Redis). `through` answers from the cache,
/// or waits while another process runs the same call, or runs `execute` and stores its success;
/// `execute` runs at most once, and runs anyway when the cache cannot be reached.
pub trait SharedCache: Send + Sync + 'static {
    /// `arguments` is the canonical JSON object text; a stored success lives `ttl` (`None`: until
    /// the store evicts it).
    fn through(
        &self,
        tool: &str,
        arguments: &str,
        ttl: Option<Duration>,
        execute: BoxFuture<'static, Result<Arc<str>, ToolError>>,
    ) -> BoxFuture<'static, SharedOutcome>;
}

/// Why a tool call produced no result. The `Display` text is what the model is shown.
#[derive(thiserror::Error, Clone, Debug, PartialEq)]
pub enum ToolError {
    #[error("unknown tool `{name}`")]
    Unknown { name: String },
    #[error("invalid arguments for tool `{tool}`: {message}")]
    InvalidArguments { tool: String, message: String },
    #[error("tool `{tool}` failed: {message}")]
    Failed { tool: String, message: String },
    #[error("tool `{tool}` timed out after {after:?}")]
    Timeout { tool: String, after: Duration },
}
