//! The OpenAI-compatible and Ollama backends against a small axum server on loopback that serves
//! the recorded transcripts in `tests/fixtures/` and misbehaves on request (HTTP errors with
//! `Retry-After`, bodies cut short, reset connections, a server that never answers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use batchagent::backends::openai::{Flavour, OpenAiBackend};
use batchagent::backends::url::{connect, BackendOptions};
use batchagent::backends::{AgentHints, Backend, BackendError, ChatRequest, StreamEvent};
use batchagent::conversation::{Message, TimeoutKind, ToolCall, ToolDef, Usage};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};

const KEY: &str = "sk-test-0123456789abcdef";

#[derive(Default)]
struct Server {
    seen: Mutex<Vec<(HeaderMap, Value)>>,
    gate: Notify,
}

impl Server {
    fn last(&self) -> (HeaderMap, Value) {
        self.seen.lock().unwrap().last().cloned().expect("the server saw no request")
    }
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// A body sent in small pieces; `gate_at` holds the rest back until the test opens the gate;
/// `fail` ends the body with an I/O error (the connection is aborted) instead of cleanly.
fn streamed(bytes: Vec<u8>, gate_at: Option<usize>, fail: bool, server: Arc<Server>, content_type: &str) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut start = 0;
        while start < bytes.len() {
            let end = (start + 13).min(bytes.len());
            let end = match gate_at {
                Some(g) if start < g && end > g => g,
                _ => end,
            };
            if gate_at == Some(start) {
                server.gate.notified().await;
            }
            if tx.send(Ok(Bytes::copy_from_slice(&bytes[start..end]))).await.is_err() {
                return;
            }
            start = end;
        }
        if fail {
            let _ = tx.send(Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"))).await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    Response::builder().header("content-type", content_type).body(Body::from_stream(stream)).unwrap()
}

fn status(code: u16, headers: &[(&str, String)], body: String) -> Response {
    let mut builder = Response::builder().status(StatusCode::from_u16(code).unwrap());
    for (k, v) in headers {
        builder = builder.header(*k, v);
    }
    builder.header("content-type", "application/json").body(Body::from(body)).unwrap()
}

async fn chat(State(server): State<Arc<Server>>, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap();
    server.seen.lock().unwrap().push((headers.clone(), body.clone()));
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let sse = "text/event-stream";
    if let Some(name) = model.strip_prefix("stream:") {
        return streamed(fixture(name), None, false, server, sse);
    }
    if let Some(name) = model.strip_prefix("json:") {
        return status(200, &[], String::from_utf8(fixture(name)).unwrap());
    }
    match model.as_str() {
        "gated" => {
            let bytes = fixture("vllm_tool_calls.sse");
            let text = String::from_utf8(bytes.clone()).unwrap();
            let second_args = text.find("S\u{e3}o Paulo").unwrap();
            let gate = text[..second_args].rfind("data: ").unwrap();
            streamed(bytes, Some(gate), false, server, sse)
        }
        "cut" => {
            let bytes = fixture("vllm_tool_calls.sse");
            let half = bytes.len() / 2;
            streamed(bytes[..half].to_vec(), None, false, server, sse)
        }
        "reset" => {
            let bytes = fixture("vllm_tool_calls.sse");
            let half = bytes.len() / 2;
            streamed(bytes[..half].to_vec(), None, true, server, sse)
        }
        "hang" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            status(200, &[], "{}".into())
        }
        "429" => status(429, &[("retry-after", "3".into())], r#"{"error":{"message":"slow down"}}"#.into()),
        "503-date" => {
            let when = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
            status(503, &[("retry-after", when)], r#"{"error":{"message":"queue full"}}"#.into())
        }
        "503" => status(503, &[], r#"{"error":{"message":"queue full"}}"#.into()),
        "500" => status(500, &[], r#"{"object":"error","message":"CUDA out of memory","code":500}"#.into()),
        "400" => status(400, &[], json!({"error": {"message": "x".repeat(2000), "code": 400}}).to_string()),
        "401-echo" => {
            // Servers have been known to echo the credential they rejected.
            let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            status(401, &[], json!({"error": {"message": format!("invalid key: {auth}")}}).to_string())
        }
        other => status(404, &[], json!({"error": {"message": format!("unknown test model {other}")}}).to_string()),
    }
}

async fn completions(State(server): State<Arc<Server>>, headers: HeaderMap, body: Bytes) -> Response {
    server.seen.lock().unwrap().push((headers, serde_json::from_slice(&body).unwrap()));
    status(200, &[], String::from_utf8(fixture("vllm_completions.json")).unwrap())
}

async fn ollama_chat(State(server): State<Arc<Server>>, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap();
    server.seen.lock().unwrap().push((headers, body.clone()));
    if body["stream"] == false {
        let last = String::from_utf8(fixture("ollama_chat.ndjson")).unwrap();
        let mut done: Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
        done["message"]["content"] = json!("whole answer");
        return status(200, &[], done.to_string());
    }
    streamed(fixture("ollama_chat.ndjson"), None, false, server, "application/x-ndjson")
}

async fn start() -> (SocketAddr, Arc<Server>) {
    let server = Arc::new(Server::default());
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/api/chat", post(ollama_chat))
        .with_state(server.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, server)
}

fn options() -> BackendOptions {
    BackendOptions { api_key: Some(KEY.into()), ..BackendOptions::default() }
}

fn request(model: &str, stream: bool) -> ChatRequest {
    ChatRequest {
        model: model.into(),
        messages: Arc::new(vec![
            Message::system("You check the weather."),
            Message::user("Z\u{fc}rich and S\u{e3}o Paulo?"),
        ]),
        tools: Arc::new(vec![ToolDef {
            name: "get_weather".into(),
            description: "Current weather for a city".into(),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        }]),
        tool_choice: None,
        response_schema: None,
        max_tokens: Some(128),
        temperature: Some(0.0),
        request_id: "job-7-turn-0-attempt-1".into(),
        stream,
        hints: None,
        text_deltas: true,
        extra_body: None,
    }
}

fn vllm(addr: SocketAddr) -> Arc<dyn Backend> {
    connect(&format!("vllm://{addr}"), &options()).unwrap()
}

async fn chat_err(backend: &dyn Backend, model: &str) -> BackendError {
    backend.chat(request(model, true), None).await.unwrap_err()
}

#[tokio::test]
async fn streamed_tool_calls_are_ready_before_the_turn_ends() {
    let (addr, server) = start().await;
    let backend = vllm(addr);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let call = tokio::spawn({
        let backend = backend.clone();
        async move { backend.chat(request("gated", true), Some(tx)).await }
    });
    let mut seen = Vec::new();
    let first_ready = loop {
        let event = rx.recv().await.expect("stream ended before any tool call was ready");
        seen.push(event.clone());
        if let StreamEvent::ToolCallReady(call) = event {
            break call;
        }
    };
    assert_eq!(seen.first(), Some(&StreamEvent::FirstToken));
    assert_eq!(first_ready.id, "chatcmpl-tool-7a1e");
    assert_eq!(first_ready.arguments, "{\"city\": \"Z\u{fc}rich\"}");
    // The server is holding the rest of the body back, so the turn cannot have finished.
    assert!(!call.is_finished());
    server.gate.notify_one();
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.tool_calls.len(), 2);
    assert_eq!(response.tool_calls[0], first_ready);
    assert_eq!(response.content, "Checking both cities \u{2014} one moment \u{1F30D}.");
    assert_eq!(response.finish_reason, "tool_calls");
    assert_eq!(response.usage, Usage { prompt_tokens: 212, completion_tokens: 50, ..Usage::default() });
    assert!(response.ttft.is_some());
    let mut rest = Vec::new();
    while let Ok(e) = rx.try_recv() {
        rest.push(e);
    }
    assert!(matches!(rest.last(), Some(StreamEvent::ToolCallReady(c)) if c.id == "chatcmpl-tool-7a1f"));

    let (headers, body) = server.last();
    assert_eq!(headers["x-request-id"], "job-7-turn-0-attempt-1");
    assert_eq!(headers["authorization"], format!("Bearer {KEY}").as_str());
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(body["max_tokens"], 128);
    assert_eq!(body["tools"][0]["type"], "function");
}

#[tokio::test]
async fn every_recorded_stream_over_http() {
    let (addr, _server) = start().await;
    let backend = vllm(addr);
    let sglang = backend.chat(request("stream:sglang_object_args.sse", true), None).await.unwrap();
    assert_eq!(
        sglang.tool_calls,
        vec![ToolCall {
            id: "call_0c1d".into(),
            name: "search".into(),
            arguments: r#"{"query":"café au lait","top_k":3}"#.into()
        }]
    );
    assert_eq!(sglang.usage.cached_tokens, 160);
    let llama = backend.chat(request("stream:llamacpp_text.sse", true), None).await.unwrap();
    assert_eq!(llama.content, "Na\u{ef}ve caf\u{e9}s \u{65e5}\u{672c} \u{1F600} done.");
    let openai = backend.chat(request("stream:openai_usage.sse", true), None).await.unwrap();
    assert_eq!(openai.usage.prompt_tokens, 19);
    let err = chat_err(backend.as_ref(), "stream:error_midstream.sse").await;
    assert!(matches!(err, BackendError::Server { status: 500, .. }), "{err:?}");
}

#[tokio::test]
async fn dynamo_sends_agent_hints_and_takes_dispatch_events() {
    let (addr, server) = start().await;
    let backend = connect(&format!("dynamo://{addr}"), &BackendOptions { agent_hints: true, ..options() }).unwrap();
    assert!(backend.capabilities().agent_hints);
    let mut req = request("stream:dynamo_dispatch.sse", true);
    req.hints = Some(AgentHints {
        priority: 5,
        remaining_turns: 0,
        expected_output_tokens: Some(512),
        ..AgentHints::default()
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    let response = backend.chat(req, Some(tx)).await.unwrap();
    let mut ready = Vec::new();
    while let Ok(e) = rx.try_recv() {
        if let StreamEvent::ToolCallReady(c) = e {
            ready.push(c);
        }
    }
    assert_eq!(ready, response.tool_calls);
    assert_eq!(ready.len(), 2);
    let (headers, body) = server.last();
    assert_eq!(body["nvext"]["agent_hints"], json!({"priority": 5, "osl": 512, "speculative_prefill": false}));
    assert!(headers.get("x-request-id").is_none());
}

#[tokio::test]
async fn non_streamed_bodies_with_tool_calls() {
    let (addr, _server) = start().await;
    let backend = vllm(addr);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let vllm = backend.chat(request("json:vllm_tool_calls.json", false), Some(tx)).await.unwrap();
    assert_eq!(vllm.content, "");
    assert_eq!(vllm.tool_calls[0].arguments, "{\"city\": \"Oslo\"}");
    assert_eq!(vllm.usage.prompt_tokens, 200);
    assert_eq!(rx.recv().await, Some(StreamEvent::FirstToken));
    assert!(matches!(rx.recv().await, Some(StreamEvent::ToolCallReady(c)) if c.id == "chatcmpl-tool-1"));
    let sglang = backend.chat(request("json:sglang_tool_calls.json", false), None).await.unwrap();
    assert_eq!(sglang.tool_calls[0].arguments, r#"{"query":"rust sse"}"#);
    assert_eq!(sglang.finish_reason, "tool_calls");
}

#[tokio::test]
async fn http_errors_map_to_kinds() {
    let (addr, _server) = start().await;
    let backend = vllm(addr);
    let b = backend.as_ref();
    assert_eq!(
        chat_err(b, "429").await,
        BackendError::RateLimited { status: 429, retry_after: Some(Duration::from_secs(3)) }
    );
    let dated = chat_err(b, "503-date").await;
    let wait = dated.retry_after().expect("an HTTP-date Retry-After is honoured");
    assert!(wait > Duration::from_secs(60) && wait <= Duration::from_secs(120), "{wait:?}");
    assert!(dated.is_throttle());
    assert!(matches!(chat_err(b, "503").await, BackendError::Overloaded(m) if m == "queue full"));
    let server = chat_err(b, "500").await;
    assert_eq!(server, BackendError::Server { status: 500, message: "CUDA out of memory".into() });
    assert!(server.retryable());
    let rejected = chat_err(b, "400").await;
    assert!(matches!(&rejected, BackendError::Rejected { status: 400, message } if message.len() <= 503));
    assert!(!rejected.retryable());
    let auth = chat_err(b, "401-echo").await;
    assert!(matches!(auth, BackendError::Auth { status: 401, .. }));
    assert!(!auth.to_string().contains(KEY), "{auth}");
    assert!(!format!("{auth:?}").contains(KEY));
}

#[tokio::test]
async fn cut_reset_timeout_and_refused() {
    let (addr, _server) = start().await;
    let backend = vllm(addr);
    let cut = chat_err(backend.as_ref(), "cut").await;
    assert!(matches!(cut, BackendError::Protocol(_)), "{cut:?}");
    assert!(cut.retryable());
    let reset = chat_err(backend.as_ref(), "reset").await;
    assert!(matches!(reset, BackendError::Connection(_)), "{reset:?}");
    let quick = BackendOptions { request_timeout: Duration::from_millis(300), ..options() };
    let impatient = connect(&format!("vllm://{addr}"), &quick).unwrap();
    let timeout = chat_err(impatient.as_ref(), "hang").await;
    assert_eq!(timeout, BackendError::Timeout { which: TimeoutKind::Call, after: Duration::from_millis(300) });
    assert!(timeout.to_string().starts_with("call_timeout (300ms) fired"), "{timeout}");

    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let refused = chat_err(vllm(closed_addr).as_ref(), "x").await;
    assert!(matches!(&refused, BackendError::Connection(_)), "{refused:?}");
    assert!(!refused.to_string().contains(KEY));
}

#[tokio::test]
async fn openai_flavour_sends_no_request_id_and_uses_max_completion_tokens() {
    let (addr, server) = start().await;
    let backend = OpenAiBackend::new(Flavour::OpenAi, &format!("http://{addr}/v1"), &options()).unwrap();
    let mut req = request("stream:openai_usage.sse", true);
    req.response_schema = Some(Arc::new(json!({"type": "object", "required": ["answer"]})));
    let response = backend.chat(req, None).await.unwrap();
    assert_eq!(response.content, "{\"answer\": 42}");
    let (headers, body) = server.last();
    assert!(headers.get("x-request-id").is_none());
    assert_eq!(body["max_completion_tokens"], 128);
    assert_eq!(body["response_format"]["type"], "json_schema");
    assert_eq!(body["response_format"]["json_schema"]["schema"]["required"][0], "answer");
}

#[tokio::test]
async fn batch_completions_in_prompt_order() {
    let (addr, server) = start().await;
    let backend = OpenAiBackend::new(Flavour::Vllm, &format!("http://{addr}"), &options()).unwrap();
    let prompts = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
    let out = backend.complete_batch("m", &prompts, Some(8), None, &[]).await.unwrap();
    let texts: Vec<&str> = out.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(texts, vec![" alpha", " beta", " gamma"]);
    let total: u64 = out.iter().map(|c| c.usage.prompt_tokens).sum();
    assert_eq!(total, 12);
    assert!(out.iter().all(|c| c.usage.estimated));
    let (_, body) = server.last();
    assert_eq!(body["prompt"], json!(["a", "b", "c"]));
    let openai = OpenAiBackend::new(Flavour::OpenAi, &format!("http://{addr}/v1"), &options()).unwrap();
    assert!(matches!(openai.complete_batch("m", &prompts, None, None, &[]).await, Err(BackendError::Config(_))));
}

#[tokio::test]
async fn ollama_native_stream_and_body() {
    let (addr, server) = start().await;
    let backend = connect(&format!("ollama://{addr}"), &BackendOptions::default()).unwrap();
    let mut req = request("qwen2.5:7b", true);
    req.response_schema = Some(Arc::new(json!({"type": "object"})));
    let call = ToolCall { id: "c0".into(), name: "get_weather".into(), arguments: r#"{"city":"Oslo"}"#.into() };
    let mut messages = (*req.messages).clone();
    messages.push(Message::assistant("", vec![call.clone()]));
    messages.push(Message::tool_result(&call, "4 C"));
    req.messages = Arc::new(messages);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let response = backend.chat(req, Some(tx)).await.unwrap();
    assert_eq!(response.content, "Let me look that up \u{2615}.");
    assert_eq!(response.tool_calls.len(), 1);
    let args: Value = serde_json::from_str(&response.tool_calls[0].arguments).unwrap();
    assert_eq!(args, json!({"city": "K\u{f8}benhavn", "unit": "celsius"}));
    assert_eq!(response.usage, Usage { prompt_tokens: 122, completion_tokens: 33, ..Usage::default() });
    assert_eq!(response.finish_reason, "tool_calls");
    let mut ready = 0;
    while let Ok(e) = rx.try_recv() {
        ready += usize::from(matches!(e, StreamEvent::ToolCallReady(_)));
    }
    assert_eq!(ready, 1);
    let (headers, body) = server.last();
    assert!(headers.get("authorization").is_none());
    assert_eq!(body["format"], json!({"type": "object"}));
    assert_eq!(body["options"]["num_predict"], 128);
    assert_eq!(body["messages"][2]["tool_calls"][0]["function"]["arguments"], json!({"city": "Oslo"}));
    assert_eq!(body["messages"][3]["tool_name"], "get_weather");

    let whole = backend.chat(request("qwen2.5:7b", false), None).await.unwrap();
    assert_eq!(whole.content, "whole answer");
    assert_eq!(whole.usage.completion_tokens, 33);
}

#[tokio::test]
async fn a_request_id_with_a_line_break_is_refused_before_sending() {
    let (addr, server) = start().await;
    let backend = vllm(addr);
    let mut req = request("stream:vllm_tool_calls.sse", true);
    req.request_id = "job-1\r\nX-Injected: yes".into();
    let err = backend.chat(req, None).await.unwrap_err();
    assert!(matches!(&err, BackendError::Config(m) if m.contains("X-Request-Id")), "{err:?}");
    assert!(server.seen.lock().unwrap().is_empty(), "a request reached the server");
}
