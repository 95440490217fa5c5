//! Stream parsing throughput on one core, in bytes of wire data per second: the SSE framing alone,
//! SSE plus `OpenAI` chunk assembly (JSON decoding of every chunk), and NDJSON line splitting.
//! The body is fed in 16 KiB pieces, as it comes off a socket.
//!
//! `cargo bench --bench stream`

use std::hint::black_box;

use batchagent::backends::StreamEvent;
use batchagent::stream::ndjson::NdjsonParser;
use batchagent::stream::openai::ChatStreamAssembler;
use batchagent::stream::sse::SseParser;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const PIECE: usize = 16 * 1024;
const TARGET_BYTES: usize = 4 * 1024 * 1024;

/// A long vLLM-style chat stream: text deltas of a few tokens each, then a finish and usage chunk.
fn openai_stream() -> Vec<u8> {
    let words = ["The", " quick", " caf\u{e9}", " fox", " \u{1F98A}", " jumps", " over", " 42", " lazy", " dogs."];
    let mut out = String::new();
    let mut i = 0;
    while out.len() < TARGET_BYTES {
        out.push_str(
            "data: {\"id\":\"chatcmpl-9f2c1a\",\"object\":\"chat.completion.chunk\",\"created\":1732550400,\
             \"model\":\"Qwen/Qwen2.5-7B-Instruct\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"",
        );
        out.push_str(words[i % words.len()]);
        out.push_str("\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n");
        i += 1;
    }
    out.push_str(
        "data: {\"id\":\"chatcmpl-9f2c1a\",\"object\":\"chat.completion.chunk\",\"created\":1732550400,\
         \"model\":\"Qwen/Qwen2.5-7B-Instruct\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
         data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":10,\"prompt_tokens_details\":null}}\n\n\
         data: [DONE]\n\n",
    );
    out.into_bytes()
}

/// A long Ollama `/api/chat` stream.
fn ndjson_stream() -> Vec<u8> {
    let mut out = String::new();
    while out.len() < TARGET_BYTES {
        out.push_str(
            "{\"model\":\"qwen2.5:7b\",\"created_at\":\"2024-11-25T18:20:00.1234Z\",\
             \"message\":{\"role\":\"assistant\",\"content\":\" caf\u{e9}\"},\"done\":false}\n",
        );
    }
    out.push_str("{\"model\":\"qwen2.5:7b\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true}\n");
    out.into_bytes()
}

fn bench(c: &mut Criterion) {
    let sse = openai_stream();
    let ndjson = ndjson_stream();
    let mut group = c.benchmark_group("stream");
    group.sample_size(20);

    group.throughput(Throughput::Bytes(sse.len() as u64));
    group.bench_function("sse_openai_framing", |b| {
        b.iter(|| {
            let mut parser = SseParser::new();
            let mut bytes = 0usize;
            for piece in sse.chunks(PIECE) {
                parser.feed_with(black_box(piece), |event| bytes += event.data.len()).expect("within the limit");
            }
            black_box((bytes, parser.finish()))
        });
    });
    group.bench_function("sse_openai_assembled", |b| {
        b.iter(|| {
            let mut parser = SseParser::new();
            let mut assembler = ChatStreamAssembler::without_text_deltas();
            let mut events: Vec<StreamEvent> = Vec::new();
            for piece in sse.chunks(PIECE) {
                parser
                    .feed_with(black_box(piece), |event| {
                        if let Err(e) = assembler.push_event(&event, &mut events) {
                            panic!("benchmark stream is valid: {e}");
                        }
                    })
                    .expect("within the limit");
                events.clear();
            }
            black_box(assembler.finish(parser.finish()).map(|r| r.content.len()))
        });
    });

    group.throughput(Throughput::Bytes(ndjson.len() as u64));
    group.bench_function("ndjson_lines", |b| {
        b.iter(|| {
            let mut parser = NdjsonParser::new();
            let mut bytes = 0usize;
            for piece in ndjson.chunks(PIECE) {
                parser.feed_with(black_box(piece), |line| bytes += line.len()).expect("within the limit");
            }
            black_box((bytes, parser.finish()))
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
