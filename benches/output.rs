//! Cost of the structured-output path per final answer: extraction (clean, in prose, needing
//! repair) and validation against a pydantic-shaped schema.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use batchagent::output::{extract_json, repair_json, CompiledSchema};
use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::{json, Value};

fn review(bugs: usize) -> Value {
    let bugs: Vec<Value> = (0..bugs)
        .map(|i| {
            json!({"title": format!("bug number {i}"), "severity": "high", "kind": "logic",
                   "location": {"file": format!("src/file_{i}.rs"), "line": i + 1}, "tags": ["a", "b"]})
        })
        .collect();
    json!({"bugs": bugs, "summary": "several bugs", "score": 4.5, "reviewer": null})
}

fn schema() -> Value {
    json!({
        "$defs": {
            "Bug": {
                "properties": {
                    "title": {"minLength": 3, "type": "string"},
                    "severity": {"$ref": "#/$defs/Severity"},
                    "kind": {"enum": ["logic", "style"], "type": "string"},
                    "location": {"anyOf": [{"$ref": "#/$defs/Location"}, {"type": "null"}], "default": null},
                    "tags": {"items": {"type": "string"}, "type": "array"}
                },
                "required": ["title", "severity", "kind"],
                "type": "object"
            },
            "Location": {
                "additionalProperties": false,
                "properties": {"file": {"type": "string"}, "line": {"minimum": 1, "type": "integer"}},
                "required": ["file", "line"],
                "type": "object"
            },
            "Severity": {"enum": ["low", "medium", "high"], "type": "string"}
        },
        "properties": {
            "bugs": {"items": {"$ref": "#/$defs/Bug"}, "type": "array"},
            "summary": {"maxLength": 200, "type": "string"},
            "score": {"maximum": 10, "minimum": 0, "type": "number"},
            "reviewer": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": null}
        },
        "required": ["bugs", "summary", "score"],
        "type": "object"
    })
}

fn extraction(c: &mut Criterion) {
    let clean = serde_json::to_string(&review(5)).unwrap();
    let prose = format!("Here is my review of the file:\n\n{clean}\n\nLet me know if you need more.");
    let fenced = format!("Here is my review:\n```json\n{}\n```\n", serde_json::to_string_pretty(&review(5)).unwrap());
    let python = clean.replace('"', "'").replace("null", "None");
    let truncated = &clean[..clean.len() * 2 / 3];
    let mut group = c.benchmark_group("extract_json");
    group.bench_function("clean", |b| b.iter(|| extract_json(black_box(&clean))));
    group.bench_function("prose", |b| b.iter(|| extract_json(black_box(&prose))));
    group.bench_function("fenced", |b| b.iter(|| extract_json(black_box(&fenced))));
    group.bench_function("python_dict", |b| b.iter(|| extract_json(black_box(&python))));
    group.bench_function("truncated", |b| b.iter(|| extract_json(black_box(truncated))));
    group.finish();
    c.bench_function("repair_json/python_dict", |b| b.iter(|| repair_json(black_box(&python))));
}

fn validation(c: &mut Criterion) {
    let compiled = CompiledSchema::compile(&schema()).unwrap();
    let valid = review(5);
    let mut invalid = review(5);
    invalid["bugs"][2]["severity"] = json!("urgent");
    invalid["score"] = json!("8");
    let raw = schema();
    c.bench_function("compile/review", |b| b.iter(|| CompiledSchema::compile(black_box(&raw))));
    c.bench_function("validate/review_valid", |b| b.iter(|| compiled.validate(black_box(&valid))));
    c.bench_function("validate/review_invalid", |b| b.iter(|| compiled.validate(black_box(&invalid))));
}

criterion_group!(benches, extraction, validation);
criterion_main!(benches);
