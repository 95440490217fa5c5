//! Throughput of the block-hash diff codec on an agent checkpoint: a 2,048-token shared prompt and
//! six turns, encoded against an empty store (every block new), against a store that holds the
//! prompt (the common case: another agent stored it), and decoded.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use batchagent::diff::{decode, encode, MemoryBlockStore};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::json;

fn checkpoint(prompt: &str, agent: usize) -> Vec<u8> {
    let mut messages = vec![
        json!({"role": "system", "content": prompt}),
        json!({"role": "user", "content": format!("Review src/file_{agent}.py")}),
    ];
    for turn in 0..6 {
        messages.push(json!({"role": "assistant", "content": "", "tool_calls": [
            {"id": format!("call_{agent}_{turn}"), "name": "read_file", "arguments": format!("{{\"path\":\"src/file_{agent}.py\",\"line\":{}}}", turn * 40)}]}));
        messages.push(json!({"role": "tool", "tool_call_id": format!("call_{agent}_{turn}"), "name": "read_file",
            "content": format!("def handler_{agent}_{turn}(request):\n    return process(request, retries={turn})\n")}));
    }
    serde_json::to_vec(&json!({"messages": messages, "turns": 6})).unwrap()
}

fn bench(c: &mut Criterion) {
    // About 2,048 tokens of prose at four bytes a token.
    let prompt: String = (0..2048).map(|i| format!("w{:03} ", i * 7919 % 1000)).collect::<Vec<_>>().concat();
    let data = checkpoint(&prompt, 7);
    let mut group = c.benchmark_group("diff");
    group.throughput(Throughput::Bytes(data.len() as u64));
    let empty = MemoryBlockStore::default();
    group.bench_function("encode_new", |b| b.iter(|| encode(black_box(&data), &empty)));
    let mut shared = MemoryBlockStore::default();
    shared.put_all(&encode(&checkpoint(&prompt, 1), &shared).new_blocks);
    group.bench_function("encode_shared_prompt", |b| b.iter(|| encode(black_box(&data), &shared)));
    let encoded = encode(&data, &shared);
    let mut full = shared.clone();
    full.put_all(&encoded.new_blocks);
    group.bench_function("decode", |b| b.iter(|| decode(black_box(&encoded.manifest), &full).unwrap()));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
