//! Every stream parser and turn assembler fed what a hostile server could send: arbitrary bytes,
//! lines that never end, absurd tool-call and content-block indexes, truncated frames. Properties:
//! no panic, an error instead of a buffer past its limit, and a `Result` for every input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use batchagent::backends::bedrock::ConverseStreamAssembler;
use batchagent::backends::{BackendError, StreamEvent};
use batchagent::limits::{MAX_STREAM_INDEX, MAX_TOOL_CALLS};
use batchagent::stream::anthropic::AnthropicStreamAssembler;
use batchagent::stream::eventstream::{EventStreamDecoder, Message as EventMessage};
use batchagent::stream::ndjson::NdjsonParser;
use batchagent::stream::openai::ChatStreamAssembler;
use batchagent::stream::sse::{SseEvent, SseParser, StreamEnd};
use proptest::prelude::*;

const LIMIT: usize = 4096;

fn cut(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.push(bytes.len());
    let mut start = 0;
    cuts.into_iter()
        .map(|end| {
            let piece = bytes[start..end].to_vec();
            start = end;
            piece
        })
        .collect()
}

fn sse(data: &str) -> SseEvent {
    SseEvent { event: None, data: data.to_owned(), id: None }
}

/// JSON values a server might put where a number, a string or an object belongs.
fn wild_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("18446744073709551615".to_owned()),
        Just("1000000000000".to_owned()),
        Just("-1".to_owned()),
        Just("1e300".to_owned()),
        Just("null".to_owned()),
        Just("\"0\"".to_owned()),
        Just("{}".to_owned()),
        (0u64..600).prop_map(|n| n.to_string()),
        "[a-z{}\\[\\]\":,0-9 ]{0,12}".prop_map(|s| format!("\"{s}\"")),
    ]
}

fn openai_chunk() -> impl Strategy<Value = String> {
    (wild_value(), wild_value(), wild_value(), wild_value()).prop_map(|(index, id, args, choice)| {
        format!(
            r#"{{"choices":[{{"index":{choice},"delta":{{"content":{args},"tool_calls":[{{"index":{index},"id":{id},"function":{{"name":"f","arguments":{args}}}}}]}}}}],"usage":{{"prompt_tokens":{index},"completion_tokens":{index}}}}}"#
        )
    })
}

fn anthropic_event() -> impl Strategy<Value = String> {
    let kinds = prop_oneof![
        Just("message_start"),
        Just("content_block_start"),
        Just("content_block_delta"),
        Just("content_block_stop"),
        Just("message_delta"),
        Just("message_stop"),
        Just("error"),
    ];
    (kinds, wild_value(), wild_value()).prop_map(|(kind, index, value)| {
        format!(
            r#"{{"type":"{kind}","index":{index},"content_block":{{"type":"tool_use","id":"t","name":"f","input":{value}}},"delta":{{"type":"input_json_delta","partial_json":{value},"text":{value}}},"message":{{"usage":{{"input_tokens":{index},"output_tokens":{index}}}}},"usage":{{"output_tokens":{index}}}}}"#
        )
    })
}

fn converse_event() -> impl Strategy<Value = EventMessage> {
    let kinds = prop_oneof![
        Just("messageStart"),
        Just("contentBlockStart"),
        Just("contentBlockDelta"),
        Just("contentBlockStop"),
        Just("messageStop"),
        Just("metadata"),
    ];
    (kinds, wild_value(), wild_value()).prop_map(|(kind, index, value)| {
        let payload = format!(
            r#"{{"contentBlockIndex":{index},"start":{{"toolUse":{{"toolUseId":"t","name":"f"}}}},"delta":{{"toolUse":{{"input":{value}}},"text":{value}}},"stopReason":{value},"usage":{{"inputTokens":{index},"outputTokens":{index}}}}}"#
        );
        EventMessage::new(payload.into_bytes())
            .with_string_header(":message-type", "event")
            .with_string_header(":event-type", kind)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn sse_takes_any_bytes_within_its_limit(
        bytes in proptest::collection::vec(any::<u8>(), 0..3000),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut parser = SseParser::with_limit(LIMIT);
        let mut data = 0usize;
        for piece in cut(&bytes, &cuts) {
            // Input shorter than the limit can never exceed it.
            parser.feed_with(&piece, |e| data = data.max(e.data.len())).unwrap();
        }
        prop_assert!(data <= LIMIT);
        let _ = parser.finish();
    }

    #[test]
    fn ndjson_takes_any_bytes_within_its_limit(
        bytes in proptest::collection::vec(any::<u8>(), 0..3000),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut parser = NdjsonParser::with_limit(LIMIT);
        for piece in cut(&bytes, &cuts) {
            parser.feed_with(&piece, |_| {}).unwrap();
        }
        let _ = parser.finish();
    }

    #[test]
    fn endless_lines_fail_at_the_limit_however_they_arrive(
        piece in 1usize..700,
        line_end_at in proptest::option::of(0usize..LIMIT),
    ) {
        // One line of LIMIT + 1 bytes, fed `piece` bytes at a time (a line end inside it, if
        // any, comes too late to matter only when it is past the limit).
        let mut line = vec![b'a'; LIMIT * 2];
        if let Some(at) = line_end_at {
            line[at] = b'\n';
        }
        let line = [b"data: ".as_slice(), &line].concat();
        let (mut sse, mut ndjson) = (SseParser::with_limit(LIMIT), NdjsonParser::with_limit(LIMIT));
        let (mut sse_failed, mut ndjson_failed) = (false, false);
        for chunk in line.chunks(piece) {
            sse_failed |= sse.feed_with(chunk, |_| {}).is_err();
            ndjson_failed |= ndjson.feed_with(chunk, |_| {}).is_err();
        }
        prop_assert!(sse_failed && ndjson_failed);
    }

    #[test]
    fn sse_event_data_over_many_lines_is_bounded(lines in 2usize..40) {
        // Each line is short; together they are past the limit.
        let line = format!("data: {}\n", "x".repeat(LIMIT / lines + 1));
        let mut parser = SseParser::with_limit(LIMIT);
        let outcome = parser.feed_with(line.repeat(lines).as_bytes(), |_| {});
        prop_assert!(outcome.is_err());
    }

    #[test]
    fn event_stream_takes_any_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..2000),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut decoder = EventStreamDecoder::new();
        let mut out = Vec::new();
        for piece in cut(&bytes, &cuts) {
            if decoder.feed_into(&piece, &mut out).is_err() {
                break;
            }
        }
        let _ = decoder.finish();
    }

    #[test]
    fn a_valid_frame_cut_short_is_an_error(payload in proptest::collection::vec(any::<u8>(), 0..200), keep in 0usize..1000) {
        let frame = EventMessage::new(payload).with_string_header(":event-type", "messageStop").encode().unwrap();
        let keep = keep % frame.len();
        let mut decoder = EventStreamDecoder::new();
        prop_assert!(decoder.feed(&frame[..keep]).unwrap().is_empty());
        prop_assert!(keep == 0 || decoder.finish().is_err());
    }

    #[test]
    fn openai_assembler_takes_any_chunks(chunks in proptest::collection::vec(openai_chunk(), 0..12), garbage in ".{0,40}") {
        let mut assembler = ChatStreamAssembler::new();
        let mut out = Vec::new();
        for data in chunks.iter().map(String::as_str).chain([garbage.as_str(), "[DONE]"]) {
            if assembler.push_event(&sse(data), &mut out).is_err() {
                return Ok(());
            }
        }
        let _ = assembler.finish(StreamEnd::Clean);
    }

    #[test]
    fn anthropic_assembler_takes_any_events(events in proptest::collection::vec(anthropic_event(), 0..12), garbage in ".{0,40}") {
        let mut assembler = AnthropicStreamAssembler::new();
        let mut out = Vec::new();
        for data in events.iter().map(String::as_str).chain([garbage.as_str()]) {
            if assembler.push_data(data, &mut out).is_err() {
                return Ok(());
            }
        }
        let _ = assembler.finish(StreamEnd::Clean);
    }

    #[test]
    fn converse_assembler_takes_any_events(events in proptest::collection::vec(converse_event(), 0..12)) {
        let mut assembler = ConverseStreamAssembler::new();
        let mut out = Vec::new();
        for event in &events {
            if assembler.push_message(event, &mut out).is_err() {
                return Ok(());
            }
        }
        let _ = assembler.finish(false);
    }
}

fn protocol_message(outcome: Result<(), BackendError>) -> String {
    match outcome {
        Err(BackendError::Protocol(m)) => m,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[test]
fn huge_anthropic_block_indexes_are_refused_not_allocated() {
    for index in ["18446744073709551615", "1000000000000", &MAX_STREAM_INDEX.to_string()] {
        let mut assembler = AnthropicStreamAssembler::new();
        let mut out = Vec::new();
        let start = format!(
            r#"{{"type":"content_block_start","index":{index},"content_block":{{"type":"tool_use","id":"t","name":"f","input":{{}}}}}}"#
        );
        let message = protocol_message(assembler.push_data(&start, &mut out));
        assert!(message.contains("above the limit"), "{message}");
    }
    // The last index inside the limit is taken.
    let mut assembler = AnthropicStreamAssembler::new();
    let last = MAX_STREAM_INDEX - 1;
    let start =
        format!(r#"{{"type":"content_block_start","index":{last},"content_block":{{"type":"text","text":"a"}}}}"#);
    assembler.push_data(&start, &mut Vec::new()).unwrap();
}

#[test]
fn huge_bedrock_block_indexes_are_refused_not_allocated() {
    for index in [u64::MAX, 1_000_000_000_000, MAX_STREAM_INDEX as u64] {
        let event = EventMessage::new(format!(
            r#"{{"contentBlockIndex":{index},"start":{{"toolUse":{{"toolUseId":"t","name":"f"}}}}}}"#
        ))
        .with_string_header(":message-type", "event")
        .with_string_header(":event-type", "contentBlockStart");
        let mut out: Vec<StreamEvent> = Vec::new();
        let message = protocol_message(ConverseStreamAssembler::new().push_message(&event, &mut out));
        assert!(message.contains("above the limit"), "{message}");
    }
}

#[test]
fn openai_tool_calls_past_the_limit_are_refused() {
    let mut assembler = ChatStreamAssembler::new();
    let mut out = Vec::new();
    for i in 0..MAX_TOOL_CALLS {
        let chunk = format!(
            r#"{{"choices":[{{"index":0,"delta":{{"tool_calls":[{{"index":{i},"id":"c{i}","function":{{"name":"f","arguments":"{{}}"}}}}]}}}}]}}"#
        );
        assembler.push_event(&sse(&chunk), &mut out).unwrap();
    }
    let one_more = r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":4294967295,"id":"x","function":{"name":"f","arguments":"{}"}}]}}]}"#;
    let message = protocol_message(assembler.push_event(&sse(one_more), &mut out));
    assert!(message.contains("more than 256 tool calls"), "{message}");
}
