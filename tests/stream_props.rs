//! Recorded transcripts in each server's documented format, fed through the stream parsers split
//! at random byte positions and re-encoded (CRLF, CR, comment lines, multi-line `data:`): the
//! assembled turn and the events must not depend on how the bytes arrived.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use batchagent::backends::{BackendError, ChatResponse, StreamEvent};
use batchagent::conversation::{ToolCall, Usage};
use batchagent::stream::ndjson::NdjsonParser;
use batchagent::stream::openai::ChatStreamAssembler;
use batchagent::stream::sse::{SseParser, StreamEnd};
use proptest::prelude::*;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

type Outcome = (Vec<StreamEvent>, Result<ChatResponse, BackendError>);

/// Feeds `bytes` in pieces cut at `cuts` through the SSE parser and the chunk assembler.
fn assemble(bytes: &[u8], cuts: &[usize]) -> Outcome {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.push(bytes.len());
    let mut sse = SseParser::new();
    let mut assembler = ChatStreamAssembler::new();
    let mut events = Vec::new();
    let mut start = 0;
    for cut in cuts {
        let mut failure = None;
        sse.feed_with(&bytes[start..cut], |event| {
            if failure.is_none() {
                failure = assembler.push_event(&event, &mut events).err();
            }
        })
        .unwrap();
        if let Some(e) = failure {
            return (events, Err(e));
        }
        start = cut;
    }
    let end = sse.finish();
    (events, assembler.finish(end))
}

fn whole(bytes: &[u8]) -> Outcome {
    assemble(bytes, &[])
}

fn crlf(bytes: &[u8]) -> Vec<u8> {
    String::from_utf8(bytes.to_vec()).unwrap().replace('\n', "\r\n").into_bytes()
}

fn cr_only(bytes: &[u8]) -> Vec<u8> {
    String::from_utf8(bytes.to_vec()).unwrap().replace('\n', "\r").into_bytes()
}

/// A keep-alive comment before every field line, as proxies and some servers send.
fn with_comments(bytes: &[u8]) -> Vec<u8> {
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let mut out = String::from(": stream opened\n");
    for line in text.split_inclusive('\n') {
        if !line.trim().is_empty() {
            out.push_str(": ping\n");
        }
        out.push_str(line);
    }
    out.into_bytes()
}

/// Every JSON payload split over two `data:` lines (the joining LF is JSON whitespace after `{`).
fn multiline_data(bytes: &[u8]) -> Vec<u8> {
    String::from_utf8(bytes.to_vec()).unwrap().replace("data: {", "data: {\ndata: ").into_bytes()
}

fn ready_calls(events: &[StreamEvent]) -> Vec<ToolCall> {
    events
        .iter()
        .filter_map(|e| match e {
            StreamEvent::ToolCallReady(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

fn text(events: &[StreamEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            StreamEvent::TextDelta(t) => Some(t.as_str()),
            _ => None,
        })
        .collect()
}

fn call(id: &str, name: &str, arguments: &str) -> ToolCall {
    ToolCall { id: id.into(), name: name.into(), arguments: arguments.into() }
}

#[test]
fn vllm_tool_call_stream() {
    let (events, resp) = whole(&fixture("vllm_tool_calls.sse"));
    let resp = resp.unwrap();
    assert_eq!(resp.content, "Checking both cities \u{2014} one moment \u{1F30D}.");
    assert_eq!(text(&events), resp.content);
    assert_eq!(
        resp.tool_calls,
        vec![
            call("chatcmpl-tool-7a1e", "get_weather", "{\"city\": \"Z\u{fc}rich\"}"),
            call("chatcmpl-tool-7a1f", "get_weather", "{\"city\": \"S\u{e3}o Paulo\"}"),
        ]
    );
    assert_eq!(resp.finish_reason, "tool_calls");
    assert_eq!(resp.usage, Usage { prompt_tokens: 212, completion_tokens: 50, ..Usage::default() });
    assert_eq!(ready_calls(&events), resp.tool_calls);
    // The first call is ready as soon as the second starts, before the second's arguments arrive.
    let text = String::from_utf8(fixture("vllm_tool_calls.sse")).unwrap();
    let second_args = text.find("S\u{e3}o Paulo").unwrap();
    let prefix = &text[..text[..second_args].rfind("data: ").unwrap()];
    let (early, resp) = whole(prefix.as_bytes());
    assert_eq!(ready_calls(&early), vec![call("chatcmpl-tool-7a1e", "get_weather", "{\"city\": \"Z\u{fc}rich\"}")]);
    assert!(resp.is_err(), "a prefix without finish_reason is not a complete turn");
}

#[test]
fn sglang_object_arguments() {
    let (events, resp) = whole(&fixture("sglang_object_args.sse"));
    let resp = resp.unwrap();
    let calls = ready_calls(&events);
    assert_eq!(calls.len(), 1);
    let args: serde_json::Value = serde_json::from_str(&calls[0].arguments).unwrap();
    assert_eq!(args, serde_json::json!({"query": "caf\u{e9} au lait", "top_k": 3}));
    assert_eq!(resp.content, "");
    assert_eq!(resp.usage, Usage { prompt_tokens: 180, cached_tokens: 160, completion_tokens: 21, ..Usage::default() });
}

#[test]
fn llamacpp_text_stream() {
    let (events, resp) = whole(&fixture("llamacpp_text.sse"));
    let resp = resp.unwrap();
    assert_eq!(resp.content, "Na\u{ef}ve caf\u{e9}s \u{65e5}\u{672c} \u{1F600} done.");
    assert_eq!(events.first(), Some(&StreamEvent::FirstToken));
    assert_eq!(resp.finish_reason, "stop");
    assert_eq!(resp.usage.prompt_tokens, 31);
    assert_eq!(resp.usage.completion_tokens, 9);
}

#[test]
fn openai_usage_chunk() {
    let (_, resp) = whole(&fixture("openai_usage.sse"));
    let resp = resp.unwrap();
    assert_eq!(resp.content, "{\"answer\": 42}");
    assert_eq!(resp.usage, Usage { prompt_tokens: 19, completion_tokens: 6, ..Usage::default() });
}

#[test]
fn dynamo_dispatch_events_announce_each_call_once_and_early() {
    let (events, resp) = whole(&fixture("dynamo_dispatch.sse"));
    let resp = resp.unwrap();
    assert_eq!(ready_calls(&events), resp.tool_calls);
    assert_eq!(resp.tool_calls.len(), 2);
    assert_eq!(resp.tool_calls[1], call("call-dyn-2", "read_file", "{\"path\":\"src/lib.rs\"}"));
}

#[test]
fn error_object_mid_stream_fails_the_call() {
    let (events, resp) = whole(&fixture("error_midstream.sse"));
    assert_eq!(text(&events), "Partial");
    let err = resp.unwrap_err();
    assert!(matches!(&err, BackendError::Server { status: 500, message } if message.starts_with("EngineCore")));
    assert!(err.retryable());
}

#[test]
fn a_stream_without_finish_or_done_is_a_retryable_protocol_error() {
    let bytes = fixture("vllm_tool_calls.sse");
    let text = String::from_utf8(bytes).unwrap();
    let cut = text.find("\"finish_reason\":\"tool_calls\"").unwrap();
    let cut = text[..cut].rfind("data: ").unwrap();
    for prefix in [&text[..cut], &text[..cut + 20]] {
        let (_, resp) = whole(prefix.as_bytes());
        let err = resp.unwrap_err();
        assert!(matches!(err, BackendError::Protocol(_)), "{err:?}");
        assert!(err.retryable());
    }
    let mut p = SseParser::new();
    p.feed(&text.as_bytes()[..cut + 20]).unwrap();
    assert_eq!(p.finish(), StreamEnd::Truncated);
}

const SSE_FIXTURES: [&str; 6] = [
    "vllm_tool_calls.sse",
    "sglang_object_args.sse",
    "llamacpp_text.sse",
    "openai_usage.sse",
    "dynamo_dispatch.sse",
    "error_midstream.sse",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn same_turn_for_every_split_and_encoding(
        which in 0..SSE_FIXTURES.len(),
        encoding in 0..5usize,
        cuts in proptest::collection::vec(any::<usize>(), 0..40),
    ) {
        let original = fixture(SSE_FIXTURES[which]);
        let expected = whole(&original);
        let bytes = match encoding {
            0 => original,
            1 => crlf(&original),
            2 => cr_only(&original),
            3 => with_comments(&crlf(&original)),
            _ => multiline_data(&original),
        };
        prop_assert_eq!(assemble(&bytes, &cuts), expected);
    }

    #[test]
    fn byte_at_a_time_equals_whole(which in 0..SSE_FIXTURES.len()) {
        let bytes = fixture(SSE_FIXTURES[which]);
        let cuts: Vec<usize> = (0..bytes.len()).collect();
        prop_assert_eq!(assemble(&bytes, &cuts), whole(&bytes));
    }

    #[test]
    fn ndjson_lines_survive_any_split(crlf_ends in any::<bool>(), cuts in proptest::collection::vec(any::<usize>(), 0..30)) {
        let mut bytes = fixture("ollama_chat.ndjson");
        if crlf_ends {
            bytes = crlf(&bytes);
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.push(bytes.len());
        let mut parser = NdjsonParser::new();
        let mut lines = Vec::new();
        let mut start = 0;
        for cut in cuts {
            lines.extend(parser.feed(&bytes[start..cut]).unwrap());
            start = cut;
        }
        let (last, end) = parser.finish();
        lines.extend(last);
        prop_assert_eq!(end, StreamEnd::Clean);
        prop_assert_eq!(lines.len(), 4);
        let values: Vec<serde_json::Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        prop_assert_eq!(values[1]["message"]["content"].as_str(), Some("that up \u{2615}."));
        prop_assert_eq!(&values[2]["message"]["tool_calls"][0]["function"]["arguments"]["city"], "K\u{f8}benhavn");
        prop_assert_eq!(values[3]["done"].as_bool(), Some(true));
    }
}
