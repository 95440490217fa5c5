//! The Bedrock backend against a local axum server speaking `Converse` JSON and a `ConverseStream`
//! event-stream body (built with our encoder), over real loopback HTTP. The server re-derives the
//! `SigV4` signature from what it received, so a request that would not verify fails the test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use batchagent::backends::aws_credentials::AwsCredentials;
use batchagent::backends::bedrock::{BedrockBackend, BedrockOptions, ConverseStreamAssembler};
use batchagent::backends::sigv4::{self, SignableRequest, SigningScope};
use batchagent::backends::url::BackendOptions;
use batchagent::backends::{Backend, BackendError, ChatRequest, StreamEvent};
use batchagent::conversation::{Message, ToolCall, ToolDef, Usage};
use batchagent::limits::HandLimits;
use batchagent::stream::eventstream::{EventStreamDecoder, Message as Frame};
use proptest::prelude::*;
use serde_json::{json, Value};
use tokio::sync::mpsc;

const MODEL: &str = "anthropic.claude-3-7-sonnet-20250219-v1:0";

#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: HeaderMap,
    body: Value,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn event(kind: &str, payload: &Value) -> Vec<u8> {
    Frame::new(payload.to_string().into_bytes())
        .with_string_header(":event-type", kind)
        .with_string_header(":content-type", "application/json")
        .with_string_header(":message-type", "event")
        .encode()
        .unwrap()
}

fn exception(kind: &str, message: &str) -> Vec<u8> {
    Frame::new(json!({ "message": message }).to_string().into_bytes())
        .with_string_header(":exception-type", kind)
        .with_string_header(":content-type", "application/json")
        .with_string_header(":message-type", "exception")
        .encode()
        .unwrap()
}

fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bedrock").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A `ConverseStream` body from a `.jsonl` transcript (one event or exception per line).
fn stream_body(name: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for line in fixture(name).lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap();
        match (v["event"].as_str(), v["exception"].as_str()) {
            (Some(kind), _) => b.extend(event(kind, &v["payload"])),
            (_, Some(kind)) => b.extend(exception(kind, v["payload"]["message"].as_str().unwrap())),
            _ => panic!("{name}: line without event or exception: {line}"),
        }
    }
    b
}

/// The transcript's turn: text, then a tool call whose input arrives in three fragments.
fn tool_stream() -> Vec<u8> {
    stream_body("converse_stream_tool_use.jsonl")
}

/// Chunks cut at awkward places (inside preludes, headers and payloads).
fn chunked(bytes: &[u8]) -> Body {
    let mut chunks = Vec::new();
    let mut rest = bytes;
    let mut step = 1;
    while !rest.is_empty() {
        let n = step.min(rest.len());
        chunks.push(Ok::<_, std::io::Error>(Bytes::copy_from_slice(&rest[..n])));
        rest = &rest[n..];
        step = step * 3 % 97 + 1;
    }
    Body::from_stream(futures_util::stream::iter(chunks))
}

fn handler(log: &Log, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Response {
    let path = uri.path().to_owned();
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    log.lock().unwrap().push(Seen { path: path.clone(), headers: headers.clone(), body: parsed });
    if !signature_verifies(&path, headers, body) {
        return Response::builder()
            .status(StatusCode::FORBIDDEN)
            .header(
                "x-amzn-ErrorType",
                "InvalidSignatureException:http://internal.amazon.com/coral/com.amazon.coral.service/",
            )
            .body(Body::from(r#"{"message":"The request signature we calculated does not match"}"#))
            .unwrap();
    }
    let model = path.trim_start_matches("/model/").split('/').next().unwrap_or("").to_owned();
    let stream = path.ends_with("/converse-stream");
    let eventstream = |body: Body| {
        Response::builder().header("content-type", "application/vnd.amazon.eventstream").body(body).unwrap()
    };
    match (model.as_str(), stream) {
        ("throttled", _) => Response::builder()
            .status(StatusCode::TOO_MANY_REQUESTS)
            .header("x-amzn-ErrorType", "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/")
            .header("retry-after", "2")
            .body(Body::from(r#"{"message":"Too many requests, please wait before trying again."}"#))
            .unwrap(),
        ("invalid", _) => Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .header("x-amzn-ErrorType", "ValidationException:http://internal.amazon.com/coral/com.amazon.bedrock/")
            .body(Body::from(
                r#"{"message":"The model returned the following errors: messages: roles must alternate"}"#,
            ))
            .unwrap(),
        ("stream-throttled", true) => eventstream(chunked(&stream_body("converse_stream_throttled.jsonl"))),
        ("stream-unavailable", true) => eventstream(chunked(&exception(
            "serviceUnavailableException",
            "Bedrock is unable to process your request.",
        ))),
        ("stream-cut", true) => {
            let mut b = tool_stream();
            b.truncate(b.len() / 2);
            eventstream(chunked(&b))
        }
        (_, true) => eventstream(chunked(&tool_stream())),
        (_, false) => Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(fixture("converse_tool_use.json")))
            .unwrap(),
    }
}

/// Recompute the signature from the received request with the known secret.
fn signature_verifies(path: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) else { return false };
    let Some(signed) = auth.split("SignedHeaders=").nth(1).and_then(|s| s.split(',').next()) else { return false };
    let Some(date) = headers.get("x-amz-date").and_then(|v| v.to_str().ok()) else { return false };
    let signed_headers: Vec<(String, String)> = signed
        .split(';')
        .map(|n| {
            // Repeated headers are signed joined with commas, as AWS does on its side.
            let values: Vec<&str> = headers.get_all(n).iter().filter_map(|v| v.to_str().ok()).collect();
            (n.to_owned(), values.join(","))
        })
        .collect();
    let creds = credentials(headers.contains_key("x-amz-security-token"));
    let expected = sigv4::sign(
        &SignableRequest { method: "POST", path, query: "", headers: &signed_headers, payload: body },
        &creds,
        &SigningScope { region: "us-east-1", service: "bedrock", amz_date: date },
    );
    expected.authorization == auth
}

fn credentials(with_token: bool) -> AwsCredentials {
    AwsCredentials::new(
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        with_token.then(|| "session-token-value".to_owned()),
    )
}

async fn server() -> (String, Log) {
    let log: Log = Arc::default();
    let l = log.clone();
    let app = Router::new().route(
        "/model/{model}/{op}",
        post(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let response = handler(&l, &uri, &headers, &body);
            async move { response }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), log)
}

fn request(model: &str, stream: bool) -> ChatRequest {
    let call = ToolCall { id: "tooluse_0".into(), name: "search".into(), arguments: "{\"q\":\"first\"}".into() };
    ChatRequest {
        model: model.into(),
        messages: Arc::new(vec![
            Message::system("You are a careful researcher."),
            Message::user("Find the framing spec."),
            Message::assistant("", vec![call.clone()]),
            Message::tool_result(&call, "nothing found"),
        ]),
        tools: Arc::new(vec![ToolDef {
            name: "search".into(),
            description: "Search the web".into(),
            parameters: json!({"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}),
        }]),
        tool_choice: None,
        response_schema: None,
        max_tokens: Some(256),
        temperature: None,
        request_id: "job-1-turn-1".into(),
        stream,
        hints: None,
        text_deltas: true,
        extra_body: None,
    }
}

#[tokio::test]
async fn converse_stream_with_tool_call_signed_with_session_token() {
    let (url, log) = server().await;
    let backend = BedrockBackend::new("us-east-1", credentials(true), Some(&url)).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let resp = backend.chat(request(MODEL, true), Some(tx)).await.unwrap();

    assert_eq!(resp.content, "Let me search é.");
    let call = ToolCall {
        id: "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q".into(),
        name: "search".into(),
        arguments: "{\"q\": \"rust eventstream\"}".into(),
    };
    assert_eq!(resp.tool_calls, vec![call.clone()]);
    assert_eq!(resp.finish_reason, "tool_calls");
    assert_eq!(
        resp.usage,
        Usage {
            prompt_tokens: 1112,
            cached_tokens: 1000,
            completion_tokens: 30,
            cache_creation_tokens: 100,
            estimated: false
        }
    );
    assert!(resp.ttft.is_some());
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    assert_eq!(events.first(), Some(&StreamEvent::FirstToken));
    assert_eq!(events.last(), Some(&StreamEvent::ToolCallReady(call)));

    let seen = log.lock().unwrap()[0].clone();
    // The model id is percent-encoded once on the wire (and twice in the canonical request).
    assert_eq!(seen.path, "/model/anthropic.claude-3-7-sonnet-20250219-v1%3A0/converse-stream");
    let auth = seen.headers["authorization"].to_str().unwrap();
    assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"), "{auth}");
    assert!(auth.contains(
        "/us-east-1/bedrock/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, Signature="
    ));
    assert_eq!(seen.headers["x-amz-security-token"], "session-token-value");
    assert_eq!(seen.headers["x-amz-date"].len(), 16);
    assert_eq!(seen.headers["accept"], "application/vnd.amazon.eventstream");
    assert_eq!(seen.headers.get_all("content-type").iter().count(), 1);

    // Body shape: cache points after the system prompt and the tools (model on the allow-list).
    let b = &seen.body;
    assert_eq!(b["system"], json!([{"text": "You are a careful researcher."}, {"cachePoint": {"type": "default"}}]));
    assert_eq!(b["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"]["json"]["required"], json!(["q"]));
    assert_eq!(b["toolConfig"]["tools"][1], json!({"cachePoint": {"type": "default"}}));
    assert_eq!(b["messages"][1]["content"][0]["toolUse"]["input"], json!({"q": "first"}));
    assert_eq!(b["messages"][2]["role"], "user");
    assert_eq!(b["messages"][2]["content"][0]["toolResult"]["content"], json!([{"text": "nothing found"}]));
    assert_eq!(b["inferenceConfig"]["maxTokens"], 256);
}

#[tokio::test]
async fn converse_non_streamed_without_token_or_cache_points() {
    let (url, log) = server().await;
    let backend = BedrockBackend::new("us-east-1", credentials(false), Some(&url)).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let resp = backend.chat(request("meta.llama3-70b-instruct-v1:0", false), Some(tx)).await.unwrap();
    assert_eq!(resp.content, "Here you go.");
    assert_eq!(resp.tool_calls[0].arguments, "{\"q\":\"x\"}");
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    assert_eq!(events.last(), Some(&StreamEvent::ToolCallReady(resp.tool_calls[0].clone())));
    assert_eq!(resp.usage.prompt_tokens, 5);
    let seen = log.lock().unwrap()[0].clone();
    assert!(seen.path.ends_with("/converse"));
    assert!(!seen.headers.contains_key("x-amz-security-token"));
    assert!(seen.headers["authorization"].to_str().unwrap().contains("SignedHeaders=content-type;host;x-amz-date,"));
    assert_eq!(seen.body["system"].as_array().unwrap().len(), 1, "no cachePoint for a model off the allow-list");
}

#[tokio::test]
async fn throttling_maps_to_rate_limited() {
    let (url, _) = server().await;
    let backend = BedrockBackend::new("us-east-1", credentials(false), Some(&url)).unwrap();
    let err = backend.chat(request("throttled", true), None).await.unwrap_err();
    assert_eq!(err, BackendError::RateLimited { status: 429, retry_after: Some(Duration::from_secs(2)) });
    assert!(err.is_throttle());

    // A throttle holds back the backend's next calls (see `a_throttle_pauses_every_call`): each
    // of these goes to a backend of its own.
    let fresh = || BedrockBackend::new("us-east-1", credentials(false), Some(&url)).unwrap();
    let err = fresh().chat(request("stream-throttled", true), None).await.unwrap_err();
    assert!(matches!(err, BackendError::RateLimited { .. }), "{err:?}");

    let err = fresh().chat(request("stream-unavailable", true), None).await.unwrap_err();
    assert!(matches!(err, BackendError::Overloaded(_)), "{err:?}");

    let err = fresh().chat(request("invalid", false), None).await.unwrap_err();
    assert!(
        matches!(&err, BackendError::Rejected { status: 400, message } if message.contains("alternate")),
        "{err:?}"
    );
    assert!(!err.retryable());
}

#[tokio::test]
async fn rpm_set_by_hand_paces_bedrock_calls() {
    let (url, log) = server().await;
    // `rpm=60` as a run sets it: one call a second, and one second's worth at the start.
    let hand = BackendOptions { rate_limits: HandLimits { rpm: Some(60), tpm: None }, ..BackendOptions::default() };
    let backend =
        BedrockBackend::with_options("us-east-1", credentials(false), Some(&url), BedrockOptions::from(&hand)).unwrap();
    for _ in 0..2 {
        backend.chat(request("meta.llama3-70b-instruct-v1:0", false), None).await.unwrap();
    }
    assert_eq!(log.lock().unwrap().len(), 2);
    let paced = backend.pacer().snapshot();
    assert_eq!(paced["limits"]["requests"], json!({"per_minute": 60, "source": "set"}));
    assert_eq!(paced["requests"], 2);
    // The first call took the start's allowance; the second waited for the bucket to refill.
    assert_eq!(paced["delayed"], 1, "{paced}");
    assert!(paced["wait_s"].as_f64().unwrap() > 0.0, "{paced}");

    let unpaced = BedrockBackend::new("us-east-1", credentials(false), Some(&url)).unwrap();
    for _ in 0..2 {
        unpaced.chat(request("meta.llama3-70b-instruct-v1:0", false), None).await.unwrap();
    }
    assert_eq!(unpaced.pacer().snapshot()["delayed"], 0);
}

#[tokio::test]
async fn a_throttle_pauses_every_call() {
    let (url, log) = server().await;
    // A `throttlingException` in the stream names no wait: the pacer stops admissions for a second.
    let backend = BedrockBackend::new("us-east-1", credentials(false), Some(&url)).unwrap();
    let err = backend.chat(request("stream-throttled", true), None).await.unwrap_err();
    assert!(matches!(err, BackendError::RateLimited { retry_after: None, .. }), "{err:?}");
    assert_eq!(backend.pacer().snapshot()["delayed"], 0);
    backend.chat(request("meta.llama3-70b-instruct-v1:0", false), None).await.unwrap();
    assert_eq!(backend.pacer().snapshot()["delayed"], 1);

    // An HTTP 429 `ThrottlingException` with a `Retry-After`: the calls after it wait for it.
    let backend = BedrockBackend::new("us-east-1", credentials(false), Some(&url)).unwrap();
    backend.chat(request("throttled", false), None).await.unwrap_err();
    let calls: Vec<_> = (0..3).map(|_| backend.chat(request("meta.llama3-70b-instruct-v1:0", false), None)).collect();
    for result in futures_util::future::join_all(calls).await {
        result.unwrap();
    }
    // The first in line waits out the pause; the others wait behind it, then go together.
    let paced = backend.pacer().snapshot();
    assert_eq!(paced["delayed"], 1, "{paced}");
    assert!(paced["wait_s"].as_f64().unwrap() > 0.0, "{paced}");
    // No limit was set or learned: the pause is all the pacing there is.
    assert_eq!(paced["limits"], json!({}));
    assert_eq!(log.lock().unwrap().len(), 6);
}

#[tokio::test]
async fn cut_stream_is_retryable_and_wrong_secret_is_auth() {
    let (url, _) = server().await;
    let backend = BedrockBackend::new("us-east-1", credentials(false), Some(&url)).unwrap();
    let err = backend.chat(request("stream-cut", true), None).await.unwrap_err();
    assert!(matches!(err, BackendError::Protocol(_)), "{err:?}");
    assert!(err.retryable());

    let wrong = AwsCredentials::new("AKIDEXAMPLE", "not-the-secret", None);
    let backend = BedrockBackend::new("us-east-1", wrong, Some(&url)).unwrap();
    let err = backend.chat(request(MODEL, true), None).await.unwrap_err();
    assert!(matches!(err, BackendError::Auth { status: 403, .. }), "{err:?}");
    assert!(!format!("{err} {backend:?}").contains("not-the-secret"));
}

type Outcome = (Vec<StreamEvent>, Result<batchagent::backends::ChatResponse, BackendError>);

fn decode_split(bytes: &[u8], cuts: &[usize]) -> Outcome {
    let mut decoder = EventStreamDecoder::new();
    let mut asm = ConverseStreamAssembler::new();
    let mut events = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&bytes.len())) {
        let messages = match decoder.feed(&bytes[start..end]) {
            Ok(m) => m,
            Err(e) => return (events, Err(BackendError::Protocol(e.to_string()))),
        };
        for m in &messages {
            if let Err(e) = asm.push_message(m, &mut events) {
                return (events, Err(e));
            }
        }
        start = end;
    }
    (events, asm.finish(decoder.finish().is_err()))
}

proptest! {
    #[test]
    fn every_split_of_a_converse_stream_gives_the_same_turn(
        throttled in any::<bool>(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..24),
    ) {
        let bytes = stream_body(if throttled { "converse_stream_throttled.jsonl" } else { "converse_stream_tool_use.jsonl" });
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        let (events, result) = decode_split(&bytes, &points);
        let (whole_events, whole) = decode_split(&bytes, &[]);
        prop_assert_eq!(&events, &whole_events);
        prop_assert_eq!(&result, &whole);
        if throttled {
            let throttle = matches!(result, Err(BackendError::RateLimited { .. }));
            prop_assert!(throttle);
        } else {
            prop_assert_eq!(result.unwrap().content, "Let me search é.");
            prop_assert_eq!(events.len(), 4, "FirstToken, two text deltas, one ToolCallReady");
        }
    }
}
