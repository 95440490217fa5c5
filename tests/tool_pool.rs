//! `ToolPool` behaviour as the agent loop sees it: coalescing, cancellation safety, caching, limits
//! and batching, against a recording executor.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use batchagent::tools::{ToolConfig, ToolError, ToolExecutor, ToolPool};
use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Executes by echoing `name:arguments` after `delay`. Arguments may ask for `"sleep": ms`,
/// `"fail": true` or `"panic": true`.
#[derive(Clone, Default)]
struct Recorder(Arc<State>);

#[derive(Default)]
struct State {
    delay: Duration,
    gate: Option<Arc<Semaphore>>,
    calls: AtomicUsize,
    finished: AtomicUsize,
    running: AtomicUsize,
    peak: AtomicUsize,
    starts: Mutex<Vec<Instant>>,
    batches: Mutex<Vec<Vec<String>>>,
    /// Results a batch call returns beyond (positive) or short of (negative) one per argument set.
    batch_len_error: isize,
    batch_fails: bool,
}

impl Recorder {
    fn new(delay: Duration) -> Self {
        Self(Arc::new(State { delay, ..State::default() }))
    }

    fn executor(&self) -> Arc<dyn ToolExecutor> {
        Arc::new(self.clone())
    }

    fn calls(&self) -> usize {
        self.0.calls.load(Ordering::SeqCst)
    }

    fn peak(&self) -> usize {
        self.0.peak.load(Ordering::SeqCst)
    }
}

fn echo(name: &str, arguments: &str) -> Result<String, String> {
    let args: Value = serde_json::from_str(arguments).unwrap();
    if args.get("fail").is_some() {
        return Err("ValueError: boom".to_owned());
    }
    Ok(format!("{name}:{arguments}"))
}

impl ToolExecutor for Recorder {
    fn call(&self, name: &str, arguments: Arc<str>) -> BoxFuture<'static, Result<String, String>> {
        let state = Arc::clone(&self.0);
        let name = name.to_owned();
        Box::pin(async move {
            state.calls.fetch_add(1, Ordering::SeqCst);
            state.starts.lock().unwrap().push(Instant::now());
            let now = state.running.fetch_add(1, Ordering::SeqCst) + 1;
            state.peak.fetch_max(now, Ordering::SeqCst);
            let args: Value = serde_json::from_str(&arguments).unwrap();
            assert!(args.get("panic").is_none(), "the tool panicked");
            if let Some(gate) = &state.gate {
                drop(gate.acquire().await.unwrap());
            }
            let sleep = args.get("sleep").and_then(Value::as_u64).map_or(state.delay, Duration::from_millis);
            tokio::time::sleep(sleep).await;
            state.running.fetch_sub(1, Ordering::SeqCst);
            state.finished.fetch_add(1, Ordering::SeqCst);
            echo(&name, &arguments)
        })
    }

    fn call_batch(
        &self,
        name: &str,
        arguments: Vec<Arc<str>>,
    ) -> BoxFuture<'static, Result<Vec<Result<String, String>>, String>> {
        let state = Arc::clone(&self.0);
        let name = name.to_owned();
        Box::pin(async move {
            state.batches.lock().unwrap().push(arguments.iter().map(ToString::to_string).collect());
            tokio::time::sleep(state.delay).await;
            if state.batch_fails {
                return Err("RuntimeError: batch handler down".to_owned());
            }
            let mut results: Vec<_> = arguments.iter().map(|a| echo(&name, a)).collect();
            let wanted = results.len().saturating_add_signed(state.batch_len_error);
            results.resize(wanted, Ok(String::new()));
            Ok(results)
        })
    }
}

fn pool(configs: Vec<ToolConfig>, recorder: &Recorder) -> Arc<ToolPool> {
    Arc::new(ToolPool::new(configs, recorder.executor()))
}

fn spawn_call(
    pool: &Arc<ToolPool>,
    name: &'static str,
    args: String,
) -> tokio::task::JoinHandle<Result<Arc<str>, ToolError>> {
    let pool = Arc::clone(pool);
    tokio::spawn(async move { pool.call(name, &args).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_callers_over_ten_arguments_execute_ten_times() {
    let gate = Arc::new(Semaphore::new(0));
    let recorder = Recorder(Arc::new(State { gate: Some(Arc::clone(&gate)), ..State::default() }));
    let pool = pool(vec![ToolConfig::new("search")], &recorder);
    let calls: Vec<_> = (0..200)
        .map(|i| {
            let k = i % 10;
            // Same arguments, spelled three ways.
            let args = match i % 3 {
                0 => format!(r#"{{"q":{k},"lang":"en"}}"#),
                1 => format!("{{ \"lang\" : \"en\",\n  \"q\" : {k} }}"),
                _ => format!(r#"{{"lang":"en","q":{k}}}"#),
            };
            (k, spawn_call(&pool, "search", args))
        })
        .collect();
    let waited = Instant::now();
    while pool.stats().total.requests < 200 {
        assert!(waited.elapsed() < Duration::from_secs(30), "callers never arrived");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let stats = pool.stats().total;
    assert_eq!(stats.executions, 10);
    assert_eq!(stats.coalesced, 190);
    gate.add_permits(1_000);
    for (k, call) in calls {
        let result = call.await.unwrap().unwrap();
        assert_eq!(&*result, format!(r#"search:{{"lang":"en","q":{k}}}"#));
    }
    assert_eq!(recorder.calls(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_calls_of_a_tool_with_side_effects_each_execute_and_are_never_cached() {
    let gate = Arc::new(Semaphore::new(0));
    let recorder = Recorder(Arc::new(State { gate: Some(Arc::clone(&gate)), ..State::default() }));
    let config = ToolConfig { side_effects: true, cache: true, ..ToolConfig::new("send") };
    let pool = pool(vec![config], &recorder);
    let args = r#"{"to":"a@example.com"}"#;
    // All five are in flight at once (the gate holds them), yet none joins another.
    let calls: Vec<_> = (0..5).map(|_| spawn_call(&pool, "send", args.to_owned())).collect();
    let waited = Instant::now();
    while recorder.calls() < 5 {
        assert!(waited.elapsed() < Duration::from_secs(30), "the calls were merged: {} executions", recorder.calls());
        tokio::task::yield_now().await;
    }
    gate.add_permits(100);
    for call in calls {
        assert_eq!(&*call.await.unwrap().unwrap(), r#"send:{"to":"a@example.com"}"#);
    }
    assert_eq!(&*pool.call("send", args).await.unwrap(), r#"send:{"to":"a@example.com"}"#);
    let stats = pool.stats().total;
    assert_eq!((stats.executions, stats.coalesced, stats.cache_hits), (6, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn dropped_and_timed_out_waiters_do_not_cancel_or_poison_the_execution() {
    let recorder = Recorder::new(Duration::from_millis(100));
    let pool = pool(vec![ToolConfig::new("fetch")], &recorder);
    let args = r#"{"url":"a"}"#;
    let kept: Vec<_> = (0..2).map(|_| spawn_call(&pool, "fetch", args.to_owned())).collect();
    let dropped: Vec<_> = (0..2).map(|_| spawn_call(&pool, "fetch", args.to_owned())).collect();
    let impatient = {
        let pool = Arc::clone(&pool);
        tokio::spawn(async move { tokio::time::timeout(Duration::from_millis(30), pool.call("fetch", args)).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(recorder.calls(), 1);
    for d in &dropped {
        d.abort();
    }
    for d in dropped {
        assert!(d.await.unwrap_err().is_cancelled());
    }
    assert!(impatient.await.unwrap().is_err(), "the timeout fired before the result");
    for k in kept {
        assert_eq!(&*k.await.unwrap().unwrap(), r#"fetch:{"url":"a"}"#);
    }
    assert_eq!(recorder.calls(), 1);
    assert_eq!(recorder.0.finished.load(Ordering::SeqCst), 1);
    // Not cacheable: after completion the same call runs again, and works.
    assert_eq!(&*pool.call("fetch", args).await.unwrap(), r#"fetch:{"url":"a"}"#);
    assert_eq!(recorder.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_execution_whose_waiters_all_left_still_completes_and_fills_the_cache() {
    let recorder = Recorder::new(Duration::from_millis(100));
    let pool = pool(vec![ToolConfig { cache: true, ..ToolConfig::new("fetch") }], &recorder);
    let gone = tokio::time::timeout(Duration::from_millis(10), pool.call("fetch", "{}")).await;
    assert!(gone.is_err());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(recorder.0.finished.load(Ordering::SeqCst), 1);
    assert_eq!(&*pool.call("fetch", "{}").await.unwrap(), "fetch:{}");
    assert_eq!(recorder.calls(), 1);
    assert_eq!(pool.stats().per_tool["fetch"].cache_hits, 1);
}

#[tokio::test(start_paused = true)]
async fn an_error_is_shared_by_its_flight_but_never_cached() {
    let recorder = Recorder::new(Duration::from_millis(50));
    let pool = pool(vec![ToolConfig { cache: true, ..ToolConfig::new("lookup") }], &recorder);
    let args = r#"{"fail":true}"#;
    let calls: Vec<_> = (0..3).map(|_| spawn_call(&pool, "lookup", args.to_owned())).collect();
    let expected = ToolError::Failed { tool: "lookup".into(), message: "ValueError: boom".into() };
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap_err(), expected);
    }
    assert_eq!(recorder.calls(), 1);
    assert_eq!(pool.call("lookup", args).await.unwrap_err(), expected);
    assert_eq!(recorder.calls(), 2);
    let stats = pool.stats().per_tool["lookup"];
    assert_eq!((stats.requests, stats.executions, stats.errors, stats.cache_hits), (4, 2, 2, 0));
    assert_eq!(expected.to_string(), "tool `lookup` failed: ValueError: boom");
}

#[tokio::test(start_paused = true)]
async fn a_slow_execution_times_out_for_every_waiter_and_the_tool_recovers() {
    let recorder = Recorder::new(Duration::from_secs(5));
    let timeout = Duration::from_millis(50);
    let pool = pool(vec![ToolConfig { timeout: Some(timeout), ..ToolConfig::new("slow") }], &recorder);
    let calls: Vec<_> = (0..2).map(|_| spawn_call(&pool, "slow", "{}".to_owned())).collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap_err(), ToolError::Timeout { tool: "slow".into(), after: timeout });
    }
    assert_eq!(pool.call("slow", r#"{"sleep":10}"#).await.unwrap().as_ref(), r#"slow:{"sleep":10}"#);
    let stats = pool.stats().per_tool["slow"];
    assert_eq!((stats.executions, stats.timeouts, stats.errors, stats.coalesced), (2, 1, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_tool_fails_its_waiters_instead_of_hanging_them() {
    let recorder = Recorder::new(Duration::from_millis(10));
    let pool = pool(vec![ToolConfig::new("bad")], &recorder);
    let calls: Vec<_> = (0..2).map(|_| spawn_call(&pool, "bad", r#"{"panic":true}"#.to_owned())).collect();
    for call in calls {
        let err = call.await.unwrap().unwrap_err();
        assert!(
            matches!(&err, ToolError::Failed { tool, message } if tool == "bad" && message.contains("aborted")),
            "{err}"
        );
    }
    assert_eq!(pool.call("bad", r#"{"x":1}"#).await.unwrap().as_ref(), r#"bad:{"x":1}"#);
}

#[tokio::test(start_paused = true)]
async fn cached_results_expire_after_the_ttl_and_respect_the_lru_bound() {
    let recorder = Recorder::new(Duration::from_millis(1));
    let config = ToolConfig {
        cache: true,
        cache_ttl: Some(Duration::from_secs(10)),
        cache_max_entries: 2,
        ..ToolConfig::new("kb")
    };
    let pool = pool(vec![config, ToolConfig::new("plain")], &recorder);
    let call = |args: &'static str| {
        let pool = Arc::clone(&pool);
        async move { pool.call("kb", args).await.unwrap() }
    };
    call(r#"{"k":"a"}"#).await;
    call(r#"{ "k": "a" }"#).await;
    assert_eq!(recorder.calls(), 1);
    tokio::time::advance(Duration::from_secs(10)).await;
    call(r#"{"k":"a"}"#).await;
    assert_eq!(recorder.calls(), 2, "expired after the TTL");
    call(r#"{"k":"b"}"#).await;
    call(r#"{"k":"a"}"#).await; // a is now the most recent
    call(r#"{"k":"c"}"#).await; // evicts b
    assert_eq!(recorder.calls(), 4);
    call(r#"{"k":"a"}"#).await;
    call(r#"{"k":"c"}"#).await;
    assert_eq!(recorder.calls(), 4);
    call(r#"{"k":"b"}"#).await;
    assert_eq!(recorder.calls(), 5, "b was evicted");
    // A tool without `cache` re-executes every completed call.
    pool.call("plain", "{}").await.unwrap();
    pool.call("plain", "{}").await.unwrap();
    assert_eq!(recorder.calls(), 7);
    assert_eq!(pool.stats().per_tool["kb"].cache_hits, 4);
}

#[tokio::test(start_paused = true)]
async fn max_concurrency_bounds_executions() {
    let recorder = Recorder::new(Duration::from_millis(100));
    let pool = pool(vec![ToolConfig { max_concurrency: Some(3), ..ToolConfig::new("db") }], &recorder);
    let calls: Vec<_> = (0..20).map(|i| spawn_call(&pool, "db", format!(r#"{{"row":{i}}}"#))).collect();
    // Coalesced duplicates wait on the flight and take no slot.
    let dupes: Vec<_> = (0..20).map(|i| spawn_call(&pool, "db", format!(r#"{{"row":{i}}}"#))).collect();
    for call in calls.into_iter().chain(dupes) {
        call.await.unwrap().unwrap();
    }
    assert_eq!(recorder.peak(), 3);
    assert_eq!(recorder.calls(), 20);
}

#[tokio::test(start_paused = true)]
async fn rate_limit_spaces_execution_starts() {
    let recorder = Recorder::new(Duration::ZERO);
    let pool = pool(vec![ToolConfig { rate_limit: Some(5.0), ..ToolConfig::new("api") }], &recorder);
    let t0 = Instant::now();
    let calls: Vec<_> = (0..12).map(|i| spawn_call(&pool, "api", format!(r#"{{"i":{i}}}"#))).collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let mut offsets: Vec<u128> = recorder.0.starts.lock().unwrap().iter().map(|s| (*s - t0).as_millis()).collect();
    offsets.sort_unstable();
    // A burst of one second's worth (5), then one start every 200 ms.
    assert_eq!(offsets, [0, 0, 0, 0, 0, 200, 400, 600, 800, 1000, 1200, 1400]);
}

#[tokio::test(start_paused = true)]
async fn calls_within_the_window_go_out_in_batches_of_at_most_batch_max() {
    let recorder = Recorder::new(Duration::from_millis(5));
    let config =
        ToolConfig { batch_window: Some(Duration::from_millis(20)), batch_max: 10, ..ToolConfig::new("embed") };
    let pool = pool(vec![config], &recorder);
    let mut calls: Vec<_> = (0..25).map(|i| (i, spawn_call(&pool, "embed", format!(r#"{{"t":{i}}}"#)))).collect();
    // Duplicates coalesce before batching.
    calls.extend((0..5).map(|i| (i, spawn_call(&pool, "embed", format!(r#"{{ "t": {i} }}"#)))));
    for (i, call) in calls {
        assert_eq!(&*call.await.unwrap().unwrap(), format!(r#"embed:{{"t":{i}}}"#));
    }
    let batches = recorder.0.batches.lock().unwrap().clone();
    let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
    assert_eq!(sizes, [10, 10, 5]);
    let mut all: Vec<String> = batches.into_iter().flatten().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 25);
    assert_eq!(recorder.calls(), 0, "no single calls for a batchable tool");
    let stats = pool.stats().per_tool["embed"];
    assert_eq!((stats.batches, stats.executions, stats.coalesced), (3, 25, 5));
}

#[tokio::test(start_paused = true)]
async fn a_batch_answer_of_the_wrong_length_fails_every_call_in_it() {
    let recorder = Recorder(Arc::new(State { batch_len_error: -1, ..State::default() }));
    let config = ToolConfig { batch_window: Some(Duration::from_millis(20)), ..ToolConfig::new("embed") };
    let pool = pool(vec![config], &recorder);
    let calls: Vec<_> = (0..4).map(|i| spawn_call(&pool, "embed", format!(r#"{{"t":{i}}}"#))).collect();
    for call in calls {
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(
            err,
            ToolError::Failed {
                tool: "embed".into(),
                message: "the batch handler returned 3 results for 4 calls".into()
            }
        );
    }
    assert_eq!(pool.stats().per_tool["embed"].errors, 4);
}

#[tokio::test(start_paused = true)]
async fn a_failing_batch_handler_fails_its_calls_and_per_item_errors_stay_per_item() {
    let down = Recorder(Arc::new(State { batch_fails: true, ..State::default() }));
    let config = ToolConfig { batch_window: Some(Duration::from_millis(20)), ..ToolConfig::new("embed") };
    let pool_down = pool(vec![config.clone()], &down);
    let err = pool_down.call("embed", "{}").await.unwrap_err();
    assert_eq!(err, ToolError::Failed { tool: "embed".into(), message: "RuntimeError: batch handler down".into() });

    let up = Recorder::default();
    let pool_up = pool(vec![config], &up);
    let good = spawn_call(&pool_up, "embed", r#"{"t":1}"#.to_owned());
    let bad = spawn_call(&pool_up, "embed", r#"{"fail":true}"#.to_owned());
    assert_eq!(&*good.await.unwrap().unwrap(), r#"embed:{"t":1}"#);
    assert!(matches!(bad.await.unwrap(), Err(ToolError::Failed { .. })));
    assert_eq!(up.0.batches.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn unknown_tools_and_bad_arguments_are_errors_the_model_can_read() {
    let recorder = Recorder::default();
    let pool = pool(vec![ToolConfig::new("search")], &recorder);
    assert!(pool.has_tool("search"));
    assert!(!pool.has_tool("serch"));
    let err = pool.call("serch", "{}").await.unwrap_err();
    assert_eq!(err.to_string(), "unknown tool `serch`");
    let err = pool.call("search", "{\"q\": ").await.unwrap_err();
    assert!(matches!(&err, ToolError::InvalidArguments { tool, .. } if tool == "search"));
    assert!(err.to_string().starts_with("invalid arguments for tool `search`: not valid JSON"), "{err}");
    let err = pool.call("search", "[1, 2]").await.unwrap_err();
    assert_eq!(err.to_string(), "invalid arguments for tool `search`: expected a JSON object, got an array");
    assert_eq!(recorder.calls(), 0);
    let stats = pool.stats();
    assert_eq!((stats.total.requests, stats.total.errors), (3, 3));
    assert_eq!(stats.per_tool["search"].errors, 2);
}
