//! Hostile servers on loopback, against both HTTP paths (the lean HTTP/1.1 client for plain
//! `http://`, reqwest for everything else): endless lines, huge declared bodies, bodies past the
//! limit, truncated frames, stalls, redirects to another host, arbitrary bytes. Every call must
//! end in a `Result` (never a panic, never a hang), and no buffer may outgrow `max_response_bytes`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use batchagent::backends::aws_credentials::AwsCredentials;
use batchagent::backends::bedrock::{BedrockBackend, BedrockOptions};
use batchagent::backends::ollama::OllamaBackend;
use batchagent::backends::openai::{Flavour, OpenAiBackend};
use batchagent::backends::url::BackendOptions;
use batchagent::backends::{Backend, BackendError, ChatRequest, ChatResponse};
use batchagent::conversation::{Message, TimeoutKind};
use batchagent::secret::Secret;
use futures_util::FutureExt as _;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The limit the tests run under: small, so "past the limit" is cheap to send.
const LIMIT: usize = 64 * 1024;

/// What the server does once it has read a request.
#[derive(Clone)]
enum Act {
    /// Writes these bytes and closes.
    Send(Vec<u8>),
    /// Writes the head, then `piece` again and again until the client goes away.
    Endless { head: Vec<u8>, piece: Vec<u8> },
    /// Writes these bytes, then holds the connection open without a word.
    Stall(Vec<u8>),
}

struct Server {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    /// Bytes the server managed to write to the last connection before it ended.
    written: Arc<AtomicUsize>,
}

async fn serve(act: Act) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let written = Arc::new(AtomicUsize::new(0));
    let (count, total) = (connections.clone(), written.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let act = act.clone();
            let total = total.clone();
            tokio::spawn(async move {
                read_request(&mut stream).await;
                match act {
                    Act::Send(bytes) => {
                        let _ = stream.write_all(&bytes).await;
                        let _ = stream.shutdown().await;
                    }
                    Act::Endless { head, piece } => {
                        let mut sent = head.len();
                        if stream.write_all(&head).await.is_ok() {
                            while stream.write_all(&piece).await.is_ok() {
                                sent += piece.len();
                            }
                        }
                        total.store(sent, Ordering::SeqCst);
                    }
                    Act::Stall(bytes) => {
                        let _ = stream.write_all(&bytes).await;
                        // Until the client closes: a read returns 0 or fails then.
                        let mut sink = [0u8; 1024];
                        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                    }
                }
            });
        }
    });
    Server { addr, connections, written }
}

/// Reads one request: the head, then as many body bytes as its Content-Length says.
async fn read_request(stream: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut piece = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return;
            }
        }
        match stream.read(&mut piece).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&piece[..n]),
        }
    }
}

fn options() -> BackendOptions {
    BackendOptions {
        api_key: Some(Secret::new("sk-hostile-test-key")),
        max_response_bytes: LIMIT,
        idle_timeout: Some(Duration::from_millis(300)),
        request_timeout: Duration::from_secs(30),
        ..BackendOptions::default()
    }
}

/// The same OpenAI-compatible backend over the lean client and over reqwest (user info in the
/// URL sends it through reqwest).
fn both_paths(addr: SocketAddr) -> [(&'static str, Arc<dyn Backend>); 2] {
    let lean = OpenAiBackend::new(Flavour::Vllm, &format!("http://{addr}/v1"), &options()).unwrap();
    let reqwest = OpenAiBackend::new(Flavour::Vllm, &format!("http://user@{addr}/v1"), &options()).unwrap();
    [("lean", Arc::new(lean)), ("reqwest", Arc::new(reqwest))]
}

fn bedrock(addr: SocketAddr) -> BedrockBackend {
    let credentials = AwsCredentials::new("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None);
    let options = BedrockOptions {
        max_response_bytes: LIMIT,
        idle_timeout: Some(Duration::from_millis(300)),
        ..BedrockOptions::default()
    };
    BedrockBackend::with_options("us-east-1", credentials, Some(&format!("http://{addr}")), options).unwrap()
}

fn request(stream: bool) -> ChatRequest {
    ChatRequest {
        model: "m".into(),
        messages: Arc::new(vec![Message::user("hi")]),
        tools: Arc::new(Vec::new()),
        tool_choice: None,
        response_schema: None,
        max_tokens: None,
        temperature: None,
        request_id: "req-1".into(),
        stream,
        hints: None,
        text_deltas: false,
        extra_body: None,
    }
}

async fn call(backend: &dyn Backend, stream: bool) -> Result<ChatResponse, BackendError> {
    backend.chat(request(stream), None).await
}

fn assert_over_limit(name: &str, outcome: Result<ChatResponse, BackendError>) {
    match outcome {
        Err(BackendError::Protocol(message)) => {
            assert!(message.contains(&format!("max_response_bytes ({LIMIT} bytes)")), "{name}: {message}");
        }
        other => panic!("{name}: expected a protocol error naming the limit, got {other:?}"),
    }
}

fn head(extra: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\n{extra}\r\n").into_bytes()
}

#[tokio::test]
async fn an_endless_sse_line_stops_at_the_limit() {
    let server = serve(Act::Endless {
        head: [head("content-type: text/event-stream\r\n"), b"data: ".to_vec()].concat(),
        piece: vec![b'a'; 8192],
    })
    .await;
    for (name, backend) in both_paths(server.addr) {
        assert_over_limit(name, call(backend.as_ref(), true).await);
    }
}

#[tokio::test]
async fn endless_bodies_stop_at_the_limit_in_every_framing() {
    let sse = "content-type: text/event-stream\r\n";
    let json = "content-type: application/json\r\n";
    let cases = [
        // Read until close, streamed and whole.
        (true, Act::Endless { head: head(sse), piece: b"data: {}\n\n".repeat(100) }),
        (false, Act::Endless { head: head(json), piece: vec![b' '; 8192] }),
        // Chunked, streamed and whole.
        (
            true,
            Act::Endless { head: head(&format!("{sse}transfer-encoding: chunked\r\n")), piece: chunk(b": ping\n\n") },
        ),
        (
            false,
            Act::Endless { head: head(&format!("{json}transfer-encoding: chunked\r\n")), piece: chunk(&[b' '; 4096]) },
        ),
    ];
    for (stream, act) in cases {
        let server = serve(act).await;
        for (name, backend) in both_paths(server.addr) {
            assert_over_limit(name, call(backend.as_ref(), stream).await);
        }
    }
}

fn chunk(data: &[u8]) -> Vec<u8> {
    [format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"].concat()
}

#[tokio::test]
async fn a_huge_declared_content_length_fails_before_the_body_is_read() {
    // The server never sends the body it announces: only the check of the length can end the call.
    let server = serve(Act::Stall(head("content-type: application/json\r\ncontent-length: 1000000000000\r\n"))).await;
    for (name, backend) in both_paths(server.addr) {
        assert_over_limit(name, call(backend.as_ref(), false).await);
    }
}

#[tokio::test]
async fn a_body_just_past_the_limit_fails_and_one_at_it_is_read() {
    let json = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#;
    // A body of exactly `size` bytes: the answer padded with trailing white space.
    let answer = |size: usize| {
        let body = format!("{json}{}", " ".repeat(size - json.len()));
        [head(&format!("content-type: application/json\r\ncontent-length: {size}\r\n")), body.into_bytes()].concat()
    };
    let fits = serve(Act::Send(answer(LIMIT))).await;
    let over = serve(Act::Send(answer(LIMIT + 1))).await;
    for (name, backend) in both_paths(fits.addr) {
        assert_eq!(call(backend.as_ref(), false).await.unwrap().content, "ok", "{name}");
    }
    for (name, backend) in both_paths(over.addr) {
        assert_over_limit(name, call(backend.as_ref(), false).await);
    }
}

#[tokio::test]
async fn an_endless_ndjson_line_stops_at_the_limit() {
    let server = serve(Act::Endless {
        head: [head("content-type: application/x-ndjson\r\n"), br#"{"message":{"content":""#.to_vec()].concat(),
        piece: vec![b'a'; 8192],
    })
    .await;
    let ollama = OllamaBackend::new(&format!("http://{}", server.addr), &options()).unwrap();
    assert_over_limit("ollama", call(&ollama, true).await);
}

#[tokio::test]
async fn an_endless_event_stream_stops_at_the_limit() {
    // Bedrock over reqwest: valid-looking frames would each be bounded by the framing; garbage
    // that never completes a frame is bounded by the body limit.
    let frame = batchagent::stream::eventstream::Message::new(&b"{}"[..])
        .with_string_header(":message-type", "event")
        .with_string_header(":event-type", "messageStart")
        .encode()
        .unwrap();
    let server = serve(Act::Endless {
        head: head("content-type: application/vnd.amazon.eventstream\r\n"),
        piece: frame.repeat(64),
    })
    .await;
    assert_over_limit("bedrock stream", call(&bedrock(server.addr), true).await);
    let whole = serve(Act::Endless { head: head("content-type: application/json\r\n"), piece: vec![b' '; 8192] }).await;
    assert_over_limit("bedrock whole", call(&bedrock(whole.addr), false).await);
}

#[tokio::test]
async fn the_limit_bounds_what_is_read_not_only_what_is_kept() {
    // The client hangs up soon after the limit: the server cannot push much more than the limit
    // plus what the sockets buffer, whatever it tries.
    let server =
        serve(Act::Endless { head: head("content-type: application/json\r\n"), piece: vec![b' '; 8192] }).await;
    let [(_, lean), _] = both_paths(server.addr);
    assert_over_limit("lean", call(lean.as_ref(), false).await);
    // Wait for the writer to see the closed connection (an event, not a delay).
    while server.written.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let written = server.written.load(Ordering::SeqCst);
    assert!(written < LIMIT + 16 * 1024 * 1024, "the server wrote {written} bytes");
}

#[tokio::test]
async fn truncated_bodies_and_frames_are_errors() {
    let cases: [(bool, Vec<u8>); 4] = [
        (
            false,
            [head("content-type: application/json\r\ncontent-length: 100\r\n"), b"{\"choices\":".to_vec()].concat(),
        ),
        (
            true,
            [head("content-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"), b"20\r\ndata: {".to_vec()]
                .concat(),
        ),
        (
            true,
            [
                head("content-type: text/event-stream\r\n"),
                b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x".to_vec(),
            ]
            .concat(),
        ),
        (false, b"HTTP/1.1 200 OK\r\ncontent-ty".to_vec()),
    ];
    for (stream, bytes) in cases {
        let server = serve(Act::Send(bytes)).await;
        for (name, backend) in both_paths(server.addr) {
            let outcome = call(backend.as_ref(), stream).await;
            assert!(outcome.as_ref().is_err_and(BackendError::retryable), "{name}: {outcome:?}");
        }
    }
    let mut frame = batchagent::stream::eventstream::Message::new(&b"{}"[..])
        .with_string_header(":event-type", "messageStart")
        .encode()
        .unwrap();
    frame.truncate(frame.len() - 3);
    let server = serve(Act::Send([head("content-type: application/vnd.amazon.eventstream\r\n"), frame].concat())).await;
    assert!(matches!(call(&bedrock(server.addr), true).await, Err(BackendError::Protocol(_))));
}

#[tokio::test]
async fn a_stalled_stream_ends_at_the_idle_timeout() {
    let server = serve(Act::Stall(
        [head("content-type: text/event-stream\r\n"), b"data: {\"choices\":[]}\n\n".to_vec()].concat(),
    ))
    .await;
    for (name, backend) in both_paths(server.addr) {
        let outcome = call(backend.as_ref(), true).await;
        match outcome {
            Err(e @ BackendError::Timeout { which: TimeoutKind::Idle, .. }) => {
                assert!(e.to_string().starts_with("idle_timeout (300ms) fired"), "{name}: {e}");
            }
            other => panic!("{name}: expected the idle timeout, got {other:?}"),
        }
    }
    let server = serve(Act::Stall(head("content-type: application/vnd.amazon.eventstream\r\n"))).await;
    let outcome = call(&bedrock(server.addr), true).await;
    assert!(matches!(outcome, Err(BackendError::Timeout { which: TimeoutKind::Idle, .. })), "{outcome:?}");
}

#[tokio::test]
async fn a_redirect_to_another_host_is_an_error_and_is_not_followed() {
    // The "other host" is a listener the redirect points to: it must never see a connection.
    let elsewhere = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = format!("http://localhost:{}/steal", elsewhere.local_addr().unwrap().port());
    for status in ["301 Moved Permanently", "302 Found", "307 Temporary Redirect", "308 Permanent Redirect"] {
        let server = serve(Act::Send(
            format!("HTTP/1.1 {status}\r\nlocation: {target}\r\ncontent-length: 0\r\n\r\n").into_bytes(),
        ))
        .await;
        for (name, backend) in both_paths(server.addr) {
            for stream in [false, true] {
                match call(backend.as_ref(), stream).await {
                    Err(BackendError::Rejected { status: code, message }) => {
                        assert!((300..400).contains(&code));
                        assert!(message.contains("to host localhost"), "{name}: {message}");
                        assert!(!message.contains("sk-hostile-test-key"), "{name}: {message}");
                    }
                    other => panic!("{name} {status}: expected a rejected redirect, got {other:?}"),
                }
            }
        }
        let outcome = call(&bedrock(server.addr), false).await;
        assert!(
            matches!(&outcome, Err(BackendError::Rejected { message, .. }) if message.contains("localhost")),
            "{outcome:?}"
        );
    }
    assert!(elsewhere.accept().now_or_never().is_none(), "a redirect was followed");
}

#[tokio::test]
async fn huge_tool_call_indexes_from_a_server_are_protocol_errors() {
    let sse = |data: &str| {
        [head("content-type: text/event-stream\r\n"), format!("data: {data}\n\ndata: [DONE]\n\n").into_bytes()].concat()
    };
    let calls: String = (0..300)
        .map(|i| format!(r#"{{"index":{i},"id":"c{i}","function":{{"name":"f","arguments":"{{}}"}}}}"#))
        .collect::<Vec<_>>()
        .join(",");
    let many =
        format!(r#"{{"choices":[{{"index":0,"delta":{{"tool_calls":[{calls}]}},"finish_reason":"tool_calls"}}]}}"#);
    let server = serve(Act::Send(sse(&many))).await;
    for (name, backend) in both_paths(server.addr) {
        match call(backend.as_ref(), true).await {
            Err(BackendError::Protocol(m)) => assert!(m.contains("256 tool calls"), "{name}: {m}"),
            other => panic!("{name}: {other:?}"),
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Any bytes as the whole answer, over both paths, streamed or not: a `Result`, never a panic.
    #[test]
    fn arbitrary_answers_give_a_result(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        with_head in any::<bool>(),
        stream in any::<bool>(),
    ) {
        let rt = runtime();
        rt.block_on(async {
            let answer = if with_head {
                [head("content-type: text/event-stream\r\n"), bytes].concat()
            } else {
                bytes
            };
            let server = serve(Act::Send(answer)).await;
            for (_, backend) in both_paths(server.addr) {
                let _ = call(backend.as_ref(), stream).await;
            }
            let _ = call(&bedrock(server.addr), stream).await;
            let ollama = OllamaBackend::new(&format!("http://{}", server.addr), &options()).unwrap();
            let _ = call(&ollama, stream).await;
            assert!(server.connections.load(Ordering::SeqCst) >= 4);
        });
    }
}
