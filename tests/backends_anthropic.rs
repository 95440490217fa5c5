//! Anthropic Messages: the recorded SSE transcripts through the parser for every way the bytes can
//! be split, and the backend against a small axum server over loopback.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use batchagent::backends::anthropic::AnthropicBackend;
use batchagent::backends::url::BackendOptions;
use batchagent::backends::{Backend, BackendError, ChatRequest, ChatResponse, StreamEvent};
use batchagent::conversation::{Message, ToolCall, ToolDef, Usage};
use batchagent::stream::anthropic::AnthropicStreamAssembler;
use batchagent::stream::sse::SseParser;
use proptest::prelude::*;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};

const KEY: &str = "sk-ant-test-0123456789-SECRET";

fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/anthropic").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

type Outcome = (Vec<StreamEvent>, Result<ChatResponse, BackendError>);

/// Feed `bytes` cut at `cuts`; stop at the first error, as the backend does.
fn parse_split(bytes: &[u8], cuts: &[usize]) -> Outcome {
    let mut sse = SseParser::new();
    let mut asm = AnthropicStreamAssembler::new();
    let mut events = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&bytes.len())) {
        for ev in sse.feed(&bytes[start..end]).unwrap() {
            if let Err(e) = asm.push_event(&ev, &mut events) {
                return (events, Err(e));
            }
        }
        start = end;
    }
    let end = sse.finish();
    (events, asm.finish(end))
}

fn weather_calls() -> Vec<ToolCall> {
    vec![
        ToolCall {
            id: "toolu_01T1x1fJ34qAmk2tNTrN7Up6".into(),
            name: "get_weather".into(),
            arguments: "{\"location\": \"San Francisco, CA\", \"unit\": \"fahrenheit\"}".into(),
        },
        ToolCall {
            id: "toolu_01Kq8vXHdPqMx5ZQcbXGmVfA".into(),
            name: "get_weather".into(),
            arguments: "{\"location\": \"Zürich\"}".into(),
        },
    ]
}

#[test]
fn transcripts_parse_to_the_documented_turns() {
    let (events, resp) = parse_split(fixture("text.sse").as_bytes(), &[]);
    let resp = resp.unwrap();
    assert_eq!(resp.content, "Bonjour, café ☕ — 日本語も大丈夫。");
    assert_eq!(resp.finish_reason, "stop");
    assert_eq!(
        resp.usage,
        Usage {
            prompt_tokens: 2073,
            cached_tokens: 2048,
            completion_tokens: 15,
            cache_creation_tokens: 0,
            estimated: false
        }
    );
    assert_eq!(events.len(), 4, "FirstToken and three text deltas: {events:?}");

    let (events, resp) = parse_split(fixture("tool_use.sse").as_bytes(), &[]);
    let resp = resp.unwrap();
    let calls = weather_calls();
    assert_eq!(resp.tool_calls, calls);
    assert_eq!(resp.finish_reason, "tool_calls");
    assert_eq!(resp.usage.cache_creation_tokens, 1536);
    assert_eq!(resp.usage.prompt_tokens, 472 + 1536);
    assert_eq!(
        events,
        vec![
            StreamEvent::FirstToken,
            StreamEvent::TextDelta("I'll look up both cities.".into()),
            StreamEvent::ToolCallReady(calls[0].clone()),
            StreamEvent::ToolCallReady(calls[1].clone()),
        ]
    );

    let (events, resp) = parse_split(fixture("overloaded.sse").as_bytes(), &[]);
    assert_eq!(resp.unwrap_err(), BackendError::Overloaded("Overloaded".into()));
    assert_eq!(events, vec![StreamEvent::FirstToken, StreamEvent::TextDelta("Partial answ".into())]);
}

/// The same transcript with CRLF line ends, and with `:` comment lines between events.
fn variants(text: &str) -> Vec<Vec<u8>> {
    vec![
        text.as_bytes().to_vec(),
        text.replace('\n', "\r\n").into_bytes(),
        text.replace("\n\nevent:", "\n\n: keep-alive\n\nevent:").into_bytes(),
    ]
}

fn same(a: &Outcome, b: &Outcome) -> bool {
    a.0 == b.0
        && match (&a.1, &b.1) {
            (Ok(x), Ok(y)) => x == y,
            (Err(x), Err(y)) => x == y,
            _ => false,
        }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn every_split_gives_the_same_turn(
        which in 0usize..3,
        variant in 0usize..3,
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..24),
    ) {
        let name = ["text.sse", "tool_use.sse", "overloaded.sse"][which];
        let text = fixture(name);
        let bytes = &variants(&text)[variant];
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        let expected = parse_split(text.as_bytes(), &[]);
        let got = parse_split(bytes, &points);
        prop_assert!(same(&got, &expected), "{name} variant {variant} cuts {points:?}: {got:?}");
    }
}

#[derive(Clone, Default)]
struct State {
    seen: Arc<Mutex<Vec<(HeaderMap, Value)>>>,
    gate: Arc<Notify>,
}

fn sse(body: Body) -> Response {
    Response::builder().header("content-type", "text/event-stream").body(body).unwrap()
}

fn error_response(status: u16, kind: &str, message: &str) -> Response {
    let mut b =
        Response::builder().status(StatusCode::from_u16(status).unwrap()).header("content-type", "application/json");
    if status == 429 {
        b = b.header("retry-after", "7");
    }
    b.body(Body::from(json!({"type": "error", "error": {"type": kind, "message": message}}).to_string())).unwrap()
}

/// Bytes in small pieces, so events and UTF-8 characters straddle network reads.
fn trickle(bytes: &[u8]) -> Body {
    let chunks: Vec<Result<Bytes, std::io::Error>> = bytes.chunks(7).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    Body::from_stream(futures_util::stream::iter(chunks))
}

fn handler(state: &State, headers: HeaderMap, body: &[u8]) -> Response {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    state.seen.lock().unwrap().push((headers, body.clone()));
    match body["model"].as_str().unwrap_or("") {
        "text" => sse(trickle(fixture("text.sse").as_bytes())),
        "tool" => sse(trickle(fixture("tool_use.sse").as_bytes())),
        "tool-gated" => {
            // Everything up to the end of the first tool_use block, then hold the rest back until
            // the test has seen that call announced.
            let text = fixture("tool_use.sse");
            let split = text.find("event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":2").unwrap();
            let parts = [text[..split].to_owned(), text[split..].to_owned()];
            let gate = state.gate.clone();
            let stream = futures_util::stream::unfold(0usize, move |i| {
                let gate = gate.clone();
                let part = parts.get(i).cloned();
                async move {
                    let part = part?;
                    if i == 1 {
                        gate.notified().await;
                    }
                    Some((Ok::<_, std::io::Error>(Bytes::from(part)), i + 1))
                }
            });
            sse(Body::from_stream(stream))
        }
        "overloaded-stream" => sse(trickle(fixture("overloaded.sse").as_bytes())),
        "cut" => {
            let bytes = fixture("tool_use.sse").into_bytes();
            sse(Body::from(bytes[..bytes.len() * 2 / 3].to_vec()))
        }
        "http-529" => error_response(529, "overloaded_error", "Overloaded"),
        "rate" => error_response(429, "rate_limit_error", "Number of request tokens has exceeded your rate limit"),
        "bad-key" => error_response(401, "authentication_error", &format!("invalid x-api-key {KEY}")),
        _ => Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(
                json!({
                    "id": "msg_1", "type": "message", "role": "assistant", "model": "json",
                    "content": [{"type": "text", "text": "Done."}],
                    "stop_reason": "end_turn", "stop_sequence": null,
                    "usage": {"input_tokens": 9, "cache_read_input_tokens": 1, "cache_creation_input_tokens": 2, "output_tokens": 3}
                })
                .to_string(),
            ))
            .unwrap(),
    }
}

async fn server() -> (String, State) {
    let state = State::default();
    let s = state.clone();
    let app = Router::new().route(
        "/v1/messages",
        post(move |headers: HeaderMap, body: Bytes| {
            let response = handler(&s, headers, &body);
            async move { response }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), state)
}

fn request(model: &str, stream: bool) -> ChatRequest {
    let calls = [
        ToolCall { id: "toolu_a".into(), name: "get_weather".into(), arguments: "{\"location\":\"Oslo\"}".into() },
        ToolCall { id: "toolu_b".into(), name: "get_time".into(), arguments: "{}".into() },
    ];
    let schema = json!({"type": "object", "properties": {"location": {"type": "string"}}});
    ChatRequest {
        model: model.into(),
        messages: Arc::new(vec![
            Message::system("You are a weather assistant."),
            Message::user("Weather and time in Oslo?"),
            Message::assistant("Checking.", calls.to_vec()),
            Message::tool_result(&calls[0], "4°C, rain"),
            Message::tool_result(&calls[1], "14:02"),
        ]),
        tools: Arc::new(vec![
            ToolDef { name: "get_weather".into(), description: "Current weather".into(), parameters: schema },
            ToolDef { name: "get_time".into(), description: String::new(), parameters: json!({"type": "object"}) },
        ]),
        tool_choice: Some(json!("required")),
        response_schema: None,
        max_tokens: None,
        temperature: Some(0.2),
        request_id: "job-7-turn-2".into(),
        stream,
        hints: None,
        text_deltas: true,
        extra_body: None,
    }
}

fn backend(url: &str) -> AnthropicBackend {
    AnthropicBackend::new(url, Some(KEY.into()), &BackendOptions::default()).unwrap()
}

#[tokio::test]
async fn streamed_text_with_headers_and_request_shape() {
    let (url, state) = server().await;
    let resp = backend(&url).chat(request("text", true), None).await.unwrap();
    assert_eq!(resp.content, "Bonjour, café ☕ — 日本語も大丈夫。");
    assert_eq!(resp.usage.cached_tokens, 2048);
    assert!(resp.ttft.is_some());

    let (headers, body) = state.seen.lock().unwrap()[0].clone();
    assert_eq!(headers["x-api-key"], KEY);
    assert_eq!(headers["anthropic-version"], "2023-06-01");
    assert!(!headers.contains_key("authorization"));

    assert_eq!(body["max_tokens"], 4096);
    assert_eq!(body["stream"], true);
    assert_eq!(body["temperature"], 0.2);
    assert_eq!(
        body["system"],
        json!([{"type": "text", "text": "You are a weather assistant.", "cache_control": {"type": "ephemeral"}}])
    );
    // cache_control only on the last tool: the tool list is one cached prefix.
    assert!(body["tools"][0].get("cache_control").is_none());
    assert_eq!(body["tools"][1]["cache_control"], json!({"type": "ephemeral"}));
    assert_eq!(body["tools"][0]["input_schema"]["properties"]["location"]["type"], "string");
    assert!(body["tools"][1].get("description").is_none());
    assert_eq!(body["tool_choice"], json!({"type": "any"}));

    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3, "user, assistant, one user turn holding both tool results");
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(
        messages[1]["content"],
        json!([
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"location": "Oslo"}},
            {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}}
        ])
    );
    assert_eq!(
        messages[2],
        json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_a", "content": "4°C, rain"},
            {"type": "tool_result", "tool_use_id": "toolu_b", "content": "14:02"}
        ]})
    );
}

#[tokio::test]
async fn tool_call_is_announced_before_the_turn_ends() {
    let (url, state) = server().await;
    let backend = Arc::new(backend(&url));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let b = backend.clone();
    let call = tokio::spawn(async move { b.chat(request("tool-gated", true), Some(tx)).await });
    let calls = weather_calls();
    // The server holds back the second tool block until this call is seen; a backend that only
    // announced calls at the end of the turn would never get here (bounded, not timed).
    let first = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(StreamEvent::ToolCallReady(c)) = rx.recv().await {
                return c;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(first, calls[0]);
    state.gate.notify_one();
    let resp = call.await.unwrap().unwrap();
    assert_eq!(resp.tool_calls, calls);
    assert_eq!(rx.recv().await, Some(StreamEvent::ToolCallReady(calls[1].clone())));
}

#[tokio::test]
async fn errors_map_to_kinds_and_never_show_the_key() {
    let (url, _) = server().await;
    let b = backend(&url);

    let err = b.chat(request("overloaded-stream", true), None).await.unwrap_err();
    assert_eq!(err, BackendError::Overloaded("Overloaded".into()));
    assert!(err.retryable() && err.is_throttle());

    let err = b.chat(request("http-529", true), None).await.unwrap_err();
    assert!(matches!(err, BackendError::Overloaded(_)), "{err:?}");

    let err = b.chat(request("rate", true), None).await.unwrap_err();
    assert_eq!(err, BackendError::RateLimited { status: 429, retry_after: Some(Duration::from_secs(7)) });

    let err = b.chat(request("cut", true), None).await.unwrap_err();
    assert!(matches!(err, BackendError::Protocol(_)) && err.retryable(), "{err:?}");

    let err = b.chat(request("bad-key", true), None).await.unwrap_err();
    assert!(matches!(err, BackendError::Auth { status: 401, .. }), "{err:?}");
    let shown = format!("{err} {err:?} {b:?}");
    assert!(!shown.contains(KEY), "{shown}");
}

#[tokio::test]
async fn non_streamed_message_replays_events() {
    let (url, state) = server().await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let resp = backend(&url).chat(request("json", false), Some(tx)).await.unwrap();
    assert_eq!(resp.content, "Done.");
    assert_eq!(resp.usage.prompt_tokens, 12);
    assert_eq!(rx.recv().await, Some(StreamEvent::FirstToken));
    assert!(state.seen.lock().unwrap()[0].1.get("stream").is_none());
}

#[test]
fn missing_key_is_a_config_error() {
    if std::env::var("ANTHROPIC_API_KEY").is_ok() {
        return;
    }
    let err = AnthropicBackend::new("http://127.0.0.1:9", None, &BackendOptions::default()).unwrap_err();
    assert!(matches!(&err, BackendError::Config(m) if m.contains("ANTHROPIC_API_KEY")), "{err:?}");
}
