//! A fleet sees what really happened: a frozen endpoint (it accepts connections and never
//! answers, as a server stopped with `SIGSTOP` does) is marked down when its calls time out, and
//! every call gives back its place in the endpoint's outstanding count, however it ends. Also: a
//! job whose task panics still gets a result.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use batchagent::backends::fleet::{EndpointStats, Fleet, FleetOptions, Member, Routing};
use batchagent::backends::openai::{Flavour, OpenAiBackend};
use batchagent::backends::url::BackendOptions;
use batchagent::backends::{Backend, BackendError, Capabilities, ChatRequest, ChatResponse, StreamEvent};
use batchagent::conversation::{Message, TimeoutKind};
use batchagent::limits::AdaptiveLimit;
use batchagent::scheduler::agent::{Job, RunContext};
use batchagent::scheduler::run::{run_all, Dispatch};
use batchagent::scheduler::stats::RunStats;
use batchagent::scheduler::{PrioritySemaphore, RetryPolicy};
use batchagent::sim::{SimConfig, SimServer};
use batchagent::spec::BatchSpec;
use batchagent::tools::{ToolExecutor, ToolPool};
use futures_util::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// A server that accepts every connection and never sends a byte.
async fn frozen() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    format!("http://{addr}")
}

fn member(base: &str, call_timeout: Duration) -> Member {
    let options = BackendOptions { request_timeout: call_timeout, ..BackendOptions::default() };
    Member {
        backend: Arc::new(OpenAiBackend::new(Flavour::Vllm, &format!("{base}/v1"), &options).unwrap()),
        health_url: format!("{base}/health"),
        models_url: None,
        probe_headers: reqwest::header::HeaderMap::new(),
    }
}

async fn fleet(members: Vec<Member>) -> Fleet {
    // No probing during the test: only the calls decide what the fleet knows.
    let options = FleetOptions {
        routing: Routing::LeastOutstanding,
        probe_interval: Duration::from_secs(3600),
        ..FleetOptions::default()
    };
    Fleet::new(members, options).await.unwrap()
}

fn request() -> ChatRequest {
    ChatRequest {
        model: "sim-model".into(),
        messages: Arc::new(vec![Message::user("hello")]),
        tools: Arc::new(Vec::new()),
        tool_choice: None,
        response_schema: None,
        max_tokens: Some(8),
        temperature: None,
        request_id: "r".into(),
        stream: false,
        hints: None,
        text_deltas: false,
        extra_body: None,
    }
}

fn stats(fleet: &Fleet) -> Vec<EndpointStats> {
    fleet.endpoint_stats()
}

async fn sim() -> SimServer {
    SimServer::start(SimConfig::from_url("sim://?time_scale=0&seed=3").unwrap()).await.unwrap()
}

#[tokio::test]
async fn a_frozen_endpoint_is_marked_down_and_releases_its_calls() {
    let good = sim().await;
    let fleet =
        fleet(vec![member(&frozen().await, Duration::from_millis(300)), member(&good.url(), Duration::from_secs(30))])
            .await;
    // Equal loads: the first endpoint, the frozen one, takes the first call.
    let outcome = fleet.chat(request(), None).await;
    assert!(matches!(outcome, Err(BackendError::Timeout { which: TimeoutKind::Call, .. })), "{outcome:?}");
    let frozen_stats = &stats(&fleet)[0];
    assert_eq!(frozen_stats.outstanding, 0);
    assert!(!frozen_stats.up, "a frozen endpoint stays up: {frozen_stats:?}");
    // The retry goes to the live endpoint.
    fleet.chat(request(), None).await.unwrap();
    assert_eq!(stats(&fleet)[1].served, 1);
    assert!(stats(&fleet).iter().all(|e| e.outstanding == 0));
}

#[tokio::test]
async fn a_call_dropped_by_its_caller_gives_back_its_place() {
    let fleet = fleet(vec![member(&frozen().await, Duration::from_secs(3600))]).await;
    // The caller's own limit (the scheduler's call_timeout, an agent_timeout, a cancelled run)
    // drops the call while it waits on the frozen endpoint.
    let mut calls = Vec::new();
    for _ in 0..5 {
        calls.push(tokio::time::timeout(Duration::from_millis(100), fleet.chat(request(), None)));
    }
    for call in futures_util::future::join_all(calls).await {
        assert!(call.is_err(), "the frozen endpoint answered");
    }
    assert_eq!(stats(&fleet)[0].outstanding, 0);
}

/// A backend with a bug: it panics.
struct Panicking;

impl Backend for Panicking {
    fn name(&self) -> &'static str {
        "panicking"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    fn chat(
        &self,
        _request: ChatRequest,
        _events: Option<mpsc::UnboundedSender<StreamEvent>>,
    ) -> BoxFuture<'_, Result<ChatResponse, BackendError>> {
        Box::pin(async { panic!("index out of bounds: the len is 0 but the index is 7") })
    }
}

struct NoTools;

impl ToolExecutor for NoTools {
    fn call(&self, _name: &str, _arguments: Arc<str>) -> BoxFuture<'static, Result<String, String>> {
        Box::pin(async { Err("no tools".to_owned()) })
    }
    fn call_batch(
        &self,
        _name: &str,
        _arguments: Vec<Arc<str>>,
    ) -> BoxFuture<'static, Result<Vec<Result<String, String>>, String>> {
        Box::pin(async { Err("no tools".to_owned()) })
    }
}

#[tokio::test]
async fn a_job_whose_task_panics_gets_an_internal_error_result() {
    let spec = BatchSpec::from_json(r#"{"model": "m", "task": "Say {x}", "max_attempts": 1}"#).unwrap();
    let ctx = Arc::new(RunContext {
        spec: Arc::new(spec),
        backend: Arc::new(Panicking),
        tools: Arc::new(ToolPool::new(Vec::new(), Arc::new(NoTools))),
        slots: PrioritySemaphore::new(4, Duration::from_millis(250)),
        limit: AdaptiveLimit::new(4, 1, 4),
        retry: RetryPolicy { max_attempts: 1, base: Duration::from_millis(1), max_delay: Duration::from_millis(1) },
        schema: None,
        validator: None,
        turn_sink: None,
        stats: Arc::new(RunStats::default()),
        engine: None,
        queue_ceiling: None,
        system: None,
        constrained: false,
        accept_truncated: false,
        seed: 0,
        compactor: None,
        trace: None,
    });
    let (jobs_tx, jobs_rx) = mpsc::channel(8);
    let (results_tx, mut results_rx) = mpsc::unbounded_channel();
    for index in 0..3u64 {
        let input = serde_json::json!({"x": index}).as_object().unwrap().clone();
        jobs_tx
            .send(Job {
                id: format!("job-{index}"),
                index,
                input,
                resume: None,
                extra_body: None,
                keep_conversation: false,
            })
            .await
            .unwrap();
    }
    drop(jobs_tx);
    run_all(ctx.clone(), Dispatch::default(), jobs_rx, results_tx).await;
    let mut results = Vec::new();
    while let Some(result) = results_rx.recv().await {
        results.push(result);
    }
    results.sort_by_key(|r| r.index);
    assert_eq!(results.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["job-0", "job-1", "job-2"]);
    for result in &results {
        let error = result.error.as_ref().unwrap();
        assert_eq!(error.kind, "internal");
        assert!(error.message.contains("the len is 0 but the index is 7"), "{}", error.message);
    }
    assert_eq!(ctx.stats.jobs_failed.load(std::sync::atomic::Ordering::Relaxed), 3);
}
