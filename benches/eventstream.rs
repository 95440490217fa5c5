//! Parsing throughput on one core, in bytes of wire data per second, for the two hosted-API
//! stream formats: the AWS event-stream framing alone (prelude and message CRC-32 checked, headers
//! decoded), Bedrock `ConverseStream` assembly on top of it (JSON decoding of every event), and
//! Anthropic Messages SSE assembly. The body is fed in 16 KiB pieces, as it comes off a socket.
//!
//! `cargo bench --bench eventstream`

use std::hint::black_box;

use batchagent::backends::bedrock::ConverseStreamAssembler;
use batchagent::backends::StreamEvent;
use batchagent::stream::anthropic::AnthropicStreamAssembler;
use batchagent::stream::eventstream::{EventStreamDecoder, Message};
use batchagent::stream::sse::SseParser;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const PIECE: usize = 16 * 1024;
const TARGET_BYTES: usize = 4 * 1024 * 1024;
const WORDS: [&str; 10] =
    [" The", " quick", " caf\u{e9}", " fox", " \u{1F98A}", " jumps", " over", " 42", " lazy", " dogs."];

fn frame(event_type: &str, payload: &str) -> Vec<u8> {
    match Message::new(payload.as_bytes().to_vec())
        .with_string_header(":event-type", event_type)
        .with_string_header(":content-type", "application/json")
        .with_string_header(":message-type", "event")
        .encode()
    {
        Ok(bytes) => bytes,
        Err(e) => panic!("benchmark frame encodes: {e}"),
    }
}

/// A long `ConverseStream` body: one text delta of a word per frame, as Bedrock sends them.
fn converse_stream() -> Vec<u8> {
    let mut out = frame("messageStart", r#"{"p":"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNO","role":"assistant"}"#);
    let mut i = 0;
    while out.len() < TARGET_BYTES {
        let payload = format!(
            r#"{{"contentBlockIndex":0,"delta":{{"text":"{}"}},"p":"abcdefghijklmnopqrstu"}}"#,
            WORDS[i % WORDS.len()]
        );
        out.extend(frame("contentBlockDelta", &payload));
        i += 1;
    }
    out.extend(frame("contentBlockStop", r#"{"contentBlockIndex":0}"#));
    out.extend(frame("messageStop", r#"{"stopReason":"end_turn"}"#));
    out.extend(frame(
        "metadata",
        r#"{"usage":{"inputTokens":10,"outputTokens":100000,"totalTokens":100010},"metrics":{"latencyMs":9000}}"#,
    ));
    out
}

/// A long Anthropic Messages stream of `text_delta` events.
fn anthropic_stream() -> Vec<u8> {
    let mut out = String::from(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01XFDUDYJgAACzvnptvVoYEL\",\
         \"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-20250514\",\
         \"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
         event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    );
    let mut i = 0;
    while out.len() < TARGET_BYTES {
        out.push_str("event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"");
        out.push_str(WORDS[i % WORDS.len()]);
        out.push_str("\"}}\n\n");
        i += 1;
    }
    out.push_str(
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
         event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":100000}}\n\n\
         event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    out.into_bytes()
}

fn bench(c: &mut Criterion) {
    let converse = converse_stream();
    let anthropic = anthropic_stream();
    let mut group = c.benchmark_group("hosted_streams");
    group.sample_size(20);

    group.throughput(Throughput::Bytes(converse.len() as u64));
    group.bench_function("eventstream_framing", |b| {
        b.iter(|| {
            let mut decoder = EventStreamDecoder::new();
            let mut messages = Vec::new();
            let mut payload_bytes = 0usize;
            for piece in converse.chunks(PIECE) {
                messages.clear();
                if let Err(e) = decoder.feed_into(black_box(piece), &mut messages) {
                    panic!("benchmark stream is valid: {e}");
                }
                payload_bytes += messages.iter().map(|m| m.payload.len()).sum::<usize>();
            }
            black_box((payload_bytes, decoder.finish().is_ok()))
        });
    });
    group.bench_function("converse_stream_assembled", |b| {
        b.iter(|| {
            let mut decoder = EventStreamDecoder::new();
            let mut assembler = ConverseStreamAssembler::without_text_deltas();
            let mut messages = Vec::new();
            let mut events: Vec<StreamEvent> = Vec::new();
            for piece in converse.chunks(PIECE) {
                messages.clear();
                if let Err(e) = decoder.feed_into(black_box(piece), &mut messages) {
                    panic!("benchmark stream is valid: {e}");
                }
                for m in &messages {
                    if let Err(e) = assembler.push_message(m, &mut events) {
                        panic!("benchmark stream is valid: {e}");
                    }
                }
                events.clear();
            }
            black_box(assembler.finish(decoder.finish().is_err()).map(|r| r.content.len()))
        });
    });

    group.throughput(Throughput::Bytes(anthropic.len() as u64));
    group.bench_function("sse_anthropic_assembled", |b| {
        b.iter(|| {
            let mut parser = SseParser::new();
            let mut assembler = AnthropicStreamAssembler::without_text_deltas();
            let mut events: Vec<StreamEvent> = Vec::new();
            for piece in anthropic.chunks(PIECE) {
                let fed = parser.feed_with(black_box(piece), |event| {
                    if let Err(e) = assembler.push_event(&event, &mut events) {
                        panic!("benchmark stream is valid: {e}");
                    }
                });
                if let Err(e) = fed {
                    panic!("benchmark stream is within the limit: {e}");
                }
                events.clear();
            }
            black_box(assembler.finish(parser.finish()).map(|r| r.content.len()))
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
