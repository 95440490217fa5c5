//! The pool itself: one in-flight execution per distinct call, shared by every identical caller.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tokio::runtime::Handle;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::batch::Batcher;
use super::cache::ResultCache;
use super::canonical::canonical_arguments;
use super::limit::RateLimiter;
use super::stats::{bump, Counters, ToolStats};
use super::{SharedCache, ToolConfig, ToolError, ToolExecutor};

type Outcome = Result<Arc<str>, ToolError>;

/// Runs tool calls for every agent of a batch: coalesces identical calls in flight, serves
/// cacheable tools from cache, enforces per-tool concurrency, rate and timeout, and groups calls to
/// batchable tools. Share it behind an `Arc`.
pub struct ToolPool {
    tools: HashMap<String, Arc<Tool>>,
    unknown: AtomicU64,
}

struct Tool {
    config: ToolConfig,
    executor: Arc<dyn ToolExecutor>,
    entries: Mutex<Entries>,
    concurrency: Option<Arc<Semaphore>>,
    rate: Option<RateLimiter>,
    batcher: Option<Batcher<Execution>>,
    /// Set for a tool whose results are shared by the fleet (`cache_shared`).
    shared: Option<Arc<dyn SharedCache>>,
    counters: Counters,
}

struct Entries {
    flights: HashMap<Arc<str>, Arc<Flight>>,
    cache: Option<ResultCache>,
}

/// The shared outcome of one execution. Callers hold an `Arc` and wait on `done`; the execution
/// runs in its own task, so no caller's cancellation can reach it.
struct Flight {
    outcome: OnceLock<Outcome>,
    done: Notify,
}

impl Flight {
    fn new() -> Self {
        Self { outcome: OnceLock::new(), done: Notify::new() }
    }

    async fn wait(&self) -> Outcome {
        loop {
            let notified = self.done.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a completion between the check and the await still
            // wakes this waiter.
            notified.as_mut().enable();
            if let Some(outcome) = self.outcome.get() {
                return outcome.clone();
            }
            notified.await;
        }
    }

    fn publish(&self, outcome: Outcome) {
        // Only the flight's single `Execution` publishes, so the cell is always empty here.
        let _ = self.outcome.set(outcome);
        self.done.notify_waiters();
    }
}

/// The right and duty to finish one flight. Dropping it unfinished (the tool's future panicked, or
/// the runtime shut down with the task pending) publishes an error, so waiters never hang on an
/// execution that no longer exists.
struct Execution {
    tool: Arc<Tool>,
    key: Arc<str>,
    flight: Arc<Flight>,
    finished: bool,
}

impl Execution {
    fn finish(mut self, outcome: Outcome) {
        self.finished = true;
        self.tool.complete(&self.key, &self.flight, outcome);
    }
}

impl Drop for Execution {
    fn drop(&mut self) {
        if !self.finished {
            let outcome = Err(self.tool.failed("the execution was aborted before it finished"));
            self.tool.complete(&self.key, &self.flight, outcome);
        }
    }
}

enum Joined {
    Cached(Arc<str>),
    Flight(Arc<Flight>),
}

impl ToolPool {
    /// A later config with the same name replaces an earlier one.
    #[allow(clippy::needless_pass_by_value, reason = "owning the executor is the natural API; each tool keeps a clone")]
    pub fn new(configs: Vec<ToolConfig>, executor: Arc<dyn ToolExecutor>) -> Self {
        Self::with_shared_cache(configs, executor, None)
    }

    /// Like [`Self::new`]; tools configured with `cache_shared` go through `shared` as well (a
    /// tool so configured without a shared cache keeps its results in this process only).
    #[allow(clippy::needless_pass_by_value, reason = "owning the executor is the natural API; each tool keeps a clone")]
    pub fn with_shared_cache(
        configs: Vec<ToolConfig>,
        executor: Arc<dyn ToolExecutor>,
        shared: Option<Arc<dyn SharedCache>>,
    ) -> Self {
        let tools = configs
            .into_iter()
            .map(|config| {
                let tool = Tool {
                    executor: Arc::clone(&executor),
                    entries: Mutex::new(Entries {
                        flights: HashMap::new(),
                        cache: ((config.cache || config.cache_shared) && !config.side_effects)
                            .then(|| ResultCache::new(config.cache_ttl, config.cache_max_entries)),
                    }),
                    concurrency: config
                        .max_concurrency
                        .map(|n| Arc::new(Semaphore::new(n.clamp(1, Semaphore::MAX_PERMITS)))),
                    rate: config.rate_limit.and_then(RateLimiter::new),
                    batcher: config.batch_window.map(|window| Batcher::new(window, config.batch_max)),
                    shared: shared.clone().filter(|_| config.cache_shared && !config.side_effects),
                    counters: Counters::default(),
                    config,
                };
                (tool.config.name.clone(), Arc::new(tool))
            })
            .collect();
        Self { tools, unknown: AtomicU64::new(0) }
    }

    /// Calls tool `name` with the model's raw JSON `arguments`.
    ///
    /// The arguments are canonicalised ([`canonical_arguments`]) and `(name, canonical)` is the key:
    /// identical calls in flight share one execution and its outcome, error included; a cacheable
    /// tool's successes are then served from cache until TTL or LRU eviction, errors never are.
    /// The execution runs in a task of its own on the current tokio runtime, so dropping this
    /// future, or a timeout around it, only stops this caller waiting: the other waiters and the
    /// cache still get the result.
    pub async fn call(&self, name: &str, arguments: &str) -> Result<Arc<str>, ToolError> {
        let Some(tool) = self.tools.get(name) else {
            bump(&self.unknown, 1);
            return Err(ToolError::Unknown { name: name.to_owned() });
        };
        bump(&tool.counters.requests, 1);
        let key = canonical_arguments(arguments).map_err(|message| {
            bump(&tool.counters.errors, 1);
            ToolError::InvalidArguments { tool: name.to_owned(), message }
        })?;
        match Tool::join_or_start(tool, key)? {
            Joined::Cached(value) => Ok(value),
            Joined::Flight(flight) => flight.wait().await,
        }
    }

    pub fn has_tool(&self, name: &str) -> bool {
        self.tools.contains_key(name)
    }

    pub fn config(&self, name: &str) -> Option<&ToolConfig> {
        self.tools.get(name).map(|tool| &tool.config)
    }

    pub fn stats(&self) -> ToolStats {
        let unknown = self.unknown.load(std::sync::atomic::Ordering::Relaxed);
        ToolStats::collect(unknown, self.tools.iter().map(|(name, tool)| (name.as_str(), tool.counters.snapshot())))
    }
}

impl fmt::Debug for ToolPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.tools.keys().map(String::as_str).collect();
        names.sort_unstable();
        f.debug_struct("ToolPool").field("tools", &names).finish_non_exhaustive()
    }
}

impl Tool {
    fn failed(&self, message: impl Into<String>) -> ToolError {
        ToolError::Failed { tool: self.config.name.clone(), message: message.into() }
    }

    /// Answers from cache, joins the identical flight, or registers a new flight and starts it.
    fn join_or_start(self: &Arc<Self>, key: String) -> Result<Joined, ToolError> {
        let execution = {
            let mut entries = self.entries.lock().map_err(|_| {
                bump(&self.counters.errors, 1);
                self.failed("internal state is unusable after an earlier panic")
            })?;
            if let Some(value) = entries.cache.as_mut().and_then(|cache| cache.get(&key)) {
                bump(&self.counters.cache_hits, 1);
                return Ok(Joined::Cached(value));
            }
            // A side-effecting call is never merged with another: each one is its own execution.
            let coalesce = !self.config.side_effects;
            if let Some(flight) = entries.flights.get(key.as_str()).filter(|_| coalesce) {
                bump(&self.counters.coalesced, 1);
                return Ok(Joined::Flight(Arc::clone(flight)));
            }
            let key: Arc<str> = Arc::from(key);
            let flight = Arc::new(Flight::new());
            if coalesce {
                entries.flights.insert(Arc::clone(&key), Arc::clone(&flight));
            }
            Execution { tool: Arc::clone(self), key, flight, finished: false }
        };
        let flight = Arc::clone(&execution.flight);
        self.start(execution);
        Ok(Joined::Flight(flight))
    }

    fn start(self: &Arc<Self>, execution: Execution) {
        let Ok(handle) = Handle::try_current() else {
            let error = self.failed("the tool pool was called outside a tokio runtime");
            execution.finish(Err(error));
            return;
        };
        let Some(batcher) = &self.batcher else {
            handle.spawn(async move {
                let outcome = Arc::clone(&execution.tool).execute_shared(Arc::clone(&execution.key)).await;
                execution.finish(outcome);
            });
            return;
        };
        let tool = Arc::clone(self);
        let spawner = handle.clone();
        let on_close = move |batch| {
            spawner.spawn(tool.execute_batch(batch));
        };
        if let Some(full) = batcher.push(execution, &handle, on_close) {
            handle.spawn(Arc::clone(self).execute_batch(full));
        }
    }

    /// Waits for a concurrency slot, then for the rate limit. In that order, so a rate token is
    /// never spent by an execution that then sits waiting for a slot.
    async fn admit(&self) -> Result<Option<OwnedSemaphorePermit>, ToolError> {
        let permit = match &self.concurrency {
            Some(slots) => {
                Some(Arc::clone(slots).acquire_owned().await.map_err(|_| self.failed("concurrency limit closed"))?)
            }
            None => None,
        };
        if let Some(rate) = &self.rate {
            rate.wait().await;
        }
        Ok(permit)
    }

    async fn with_timeout<T>(&self, work: impl Future<Output = T>) -> Result<T, ToolError> {
        match self.config.timeout {
            Some(after) => tokio::time::timeout(after, work)
                .await
                .map_err(|_| ToolError::Timeout { tool: self.config.name.clone(), after }),
            None => Ok(work.await),
        }
    }

    /// Runs the call through the shared cache when the tool has one, else here.
    async fn execute_shared(self: Arc<Self>, arguments: Arc<str>) -> Outcome {
        let Some(shared) = self.shared.clone() else { return self.execute_one(arguments).await };
        let tool = Arc::clone(&self);
        let args = Arc::clone(&arguments);
        let execute = Box::pin(async move { tool.execute_one(args).await });
        let answer = shared.through(&self.config.name, &arguments, self.config.cache_ttl, execute).await;
        if answer.hit {
            bump(&self.counters.cache_hits, 1);
        }
        answer.outcome
    }

    async fn execute_one(&self, arguments: Arc<str>) -> Outcome {
        let _permit = self.admit().await?;
        bump(&self.counters.executions, 1);
        let result = self.with_timeout(self.executor.call(&self.config.name, arguments)).await?;
        result.map(Arc::from).map_err(|message| self.failed(message))
    }

    async fn execute_batch(self: Arc<Self>, batch: Vec<Execution>) {
        let count = batch.len();
        let arguments: Vec<Arc<str>> = batch.iter().map(|execution| Arc::clone(&execution.key)).collect();
        let outcome = async {
            let _permit = self.admit().await?;
            bump(&self.counters.batches, 1);
            bump(&self.counters.executions, count as u64);
            self.with_timeout(self.executor.call_batch(&self.config.name, arguments)).await
        }
        .await;
        let error = match outcome {
            Ok(Ok(results)) if results.len() == count => {
                for (execution, result) in batch.into_iter().zip(results) {
                    execution.finish(result.map(Arc::from).map_err(|message| self.failed(message)));
                }
                return;
            }
            Ok(Ok(results)) => {
                self.failed(format!("the batch handler returned {} results for {count} calls", results.len()))
            }
            Ok(Err(message)) => self.failed(message),
            Err(error) => error,
        };
        for execution in batch {
            execution.finish(Err(error.clone()));
        }
    }

    /// Retires a flight: caches a success, counts an error, then wakes every waiter. The flight
    /// leaves the map before its outcome is published, so a call that finds no flight sees either
    /// the cached value or starts a fresh execution; never a finished flight.
    fn complete(&self, key: &Arc<str>, flight: &Arc<Flight>, outcome: Outcome) {
        match &outcome {
            Ok(_) => {}
            Err(ToolError::Timeout { .. }) => {
                bump(&self.counters.errors, 1);
                bump(&self.counters.timeouts, 1);
            }
            Err(_) => bump(&self.counters.errors, 1),
        }
        {
            // Map operations cannot panic half-way, so a poisoned guard still holds consistent
            // state; retiring the flight matters more than the poison flag.
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            if entries.flights.get(key).is_some_and(|current| Arc::ptr_eq(current, flight)) {
                entries.flights.remove(key);
            }
            if let (Ok(value), Some(cache)) = (&outcome, entries.cache.as_mut()) {
                cache.insert(Arc::clone(key), Arc::clone(value));
            }
        }
        flight.publish(outcome);
    }
}
