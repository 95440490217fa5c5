//! Anthropic `POST /v1/messages`, stream and not, with `tool_use` / `tool_result` blocks and prompt
//! caching reported as Anthropic does it.
//!
//! Prompt caching follows Anthropic's rules rather than the engine's automatic prefix cache: only a
//! prefix that ends at a `cache_control` breakpoint is cached, in the order tools, system, messages;
//! a prefix shorter than `cache_min_tokens` is not cached at all; a request reads the longest cached
//! prefix ending at one of its breakpoints and writes (`cache_creation_input_tokens`) the rest up to
//! its last breakpoint. `input_tokens` counts only the uncached remainder.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::super::behaviour::{AgentRequest, Piece, ToolChoice};
use super::super::draw::{hash_bytes, mix};
use super::super::engine::EngineEvent;
use super::super::faults::Fault;
use super::super::tokenizer;
use super::{
    faulty_body, finish, generate_pinned, http_fault, json_response, on_event, parse_body, partial_text, render_chatml,
    request_behaviour, sse_event, stream_response, tool_wait_pin, AppState, ErrorShape, FrameSink, Generation,
    PinUnless,
};
use crate::conversation::{Message, Role, ToolCall, ToolDef};

/// Cached prefix hashes -> last use (a request counter), bounded; the oldest half goes when full.
#[derive(Default)]
pub(crate) struct PromptCacheTable {
    entries: Mutex<(HashMap<u64, u64>, u64)>,
}

const CACHE_ENTRIES: usize = 200_000;

impl PromptCacheTable {
    /// `(creation, read)` tokens for a request whose breakpoints are `(prefix hash, prefix tokens)`
    /// in prompt order.
    fn account(&self, breakpoints: &[(u64, usize)], min_tokens: usize) -> (usize, usize) {
        let Some(&(_, last_tokens)) = breakpoints.last() else { return (0, 0) };
        let mut guard = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (table, clock) = &mut *guard;
        *clock += 1;
        let now = *clock;
        let read = breakpoints.iter().rev().find(|(h, _)| table.contains_key(h)).map_or(0, |&(_, t)| t);
        let creation = if last_tokens >= min_tokens { last_tokens - read } else { 0 };
        for &(h, t) in breakpoints {
            if t >= min_tokens {
                table.insert(h, now);
            }
        }
        if table.len() > CACHE_ENTRIES {
            let mut ages: Vec<u64> = table.values().copied().collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() / 2];
            table.retain(|_, used| *used > cutoff);
        }
        (creation, read)
    }
}

fn error_body(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    json_response(status, &error_body(kind, message))
}

fn fault_shape(fault: Fault) -> Option<ErrorShape> {
    let (status, kind, message) = match fault {
        Fault::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "Rate limited."),
        Fault::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "api_error", "Internal server error"),
        Fault::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "overloaded_error", "Overloaded"),
        _ => return None,
    };
    Some(ErrorShape { status, body: error_body(kind, message) })
}

/// Text of a `content` that is a string or a list of blocks (only text blocks count).
fn block_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

#[derive(Debug)]
struct Parsed {
    req: AgentRequest,
    max_tokens: u32,
    /// `(prefix hash, prefix tokens)` at each `cache_control` breakpoint.
    breakpoints: Vec<(u64, usize)>,
}

fn parse(body: &Value) -> Result<Parsed, String> {
    let max_tokens = match body.get("max_tokens") {
        None | Some(Value::Null) => return Err("max_tokens: Field required".to_owned()),
        Some(v) => v.as_u64().filter(|n| *n >= 1).ok_or("max_tokens: must be an integer >= 1")?,
    };
    let mut hash = 0x0a11_7c0d_u64;
    let mut tokens = 0usize;
    let mut breakpoints = Vec::new();
    let mut segment = |text: &str, block: &Value| {
        hash = mix(hash, hash_bytes(text.as_bytes()));
        tokens += tokenizer::count(text);
        if block.get("cache_control").is_some_and(|c| !c.is_null()) {
            breakpoints.push((hash, tokens));
        }
    };

    let mut tools = Vec::new();
    if let Some(list) = body.get("tools").filter(|t| !t.is_null()) {
        for (i, t) in list.as_array().ok_or("tools: must be a list")?.iter().enumerate() {
            let name =
                t.get("name").and_then(Value::as_str).ok_or_else(|| format!("tools.{i}.name: Field required"))?;
            segment(&t.to_string(), t);
            tools.push(ToolDef {
                name: name.to_owned(),
                description: t.get("description").and_then(Value::as_str).unwrap_or_default().to_owned(),
                parameters: t
                    .get("input_schema")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            });
        }
    }
    let mut messages = Vec::new();
    match body.get("system") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            segment(s, &Value::Null);
            messages.push(Message::system(s.clone()));
        }
        Some(Value::Array(blocks)) => {
            let mut texts = Vec::new();
            for b in blocks {
                let text = b.get("text").and_then(Value::as_str).unwrap_or_default();
                segment(text, b);
                texts.push(text);
            }
            messages.push(Message::system(texts.join("\n")));
        }
        Some(_) => return Err("system: must be a string or a list of text blocks".to_owned()),
    }
    let list = body.get("messages").and_then(Value::as_array).ok_or("messages: Field required")?;
    if list.is_empty() {
        return Err("messages: at least one message is required".to_owned());
    }
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| format!("messages.{i}.role: Field required"))?;
        let blocks: Vec<Value> = match m.get("content") {
            Some(Value::String(s)) => vec![json!({"type": "text", "text": s})],
            Some(Value::Array(b)) => b.clone(),
            _ => return Err(format!("messages.{i}.content: must be a string or a list of blocks")),
        };
        let mut text = Vec::new();
        let mut calls = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            match b.get("type").and_then(Value::as_str) {
                Some("text") => {
                    let t = b.get("text").and_then(Value::as_str).unwrap_or_default();
                    segment(t, b);
                    text.push(t.to_owned());
                }
                Some("tool_use") if role == "assistant" => {
                    let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                    segment(&input.to_string(), b);
                    calls.push(ToolCall {
                        id: b.get("id").and_then(Value::as_str).unwrap_or_default().to_owned(),
                        name: b.get("name").and_then(Value::as_str).unwrap_or_default().to_owned(),
                        arguments: input.to_string(),
                    });
                }
                Some("tool_result") if role == "user" => {
                    let content = block_text(b.get("content"));
                    segment(&content, b);
                    messages.push(Message {
                        role: Role::Tool,
                        content,
                        tool_calls: Vec::new(),
                        tool_call_id: b.get("tool_use_id").and_then(Value::as_str).map(str::to_owned),
                        name: None,
                    });
                }
                Some("image" | "document" | "thinking" | "redacted_thinking") => segment("", b),
                other => {
                    return Err(format!(
                        "messages.{i}.content.{j}.type: `{}` is not valid for role {role}",
                        other.unwrap_or("(missing)")
                    ))
                }
            }
        }
        match role {
            "user" => {
                if !text.is_empty() {
                    messages.push(Message::user(text.join("\n")));
                }
            }
            "assistant" => messages.push(Message::assistant(text.join("\n"), calls)),
            other => return Err(format!("messages.{i}.role: `{other}` is not user or assistant")),
        }
    }
    let (tool_choice, allow_parallel) = match body.get("tool_choice").filter(|c| !c.is_null()) {
        None => (ToolChoice::Auto, true),
        Some(c) => {
            let parallel = !c.get("disable_parallel_tool_use").and_then(Value::as_bool).unwrap_or(false);
            let choice = match c.get("type").and_then(Value::as_str) {
                Some("auto") => ToolChoice::Auto,
                Some("any") => ToolChoice::Required,
                Some("none") => ToolChoice::None,
                Some("tool") => ToolChoice::Named(
                    c.get("name").and_then(Value::as_str).ok_or("tool_choice.name: Field required")?.to_owned(),
                ),
                _ => return Err("tool_choice.type: must be auto, any, tool or none".to_owned()),
            };
            (choice, parallel)
        }
    };
    if let ToolChoice::Named(name) = &tool_choice {
        if !tools.iter().any(|t| &t.name == name) {
            return Err(format!("tool_choice.name: tool `{name}` is not in tools"));
        }
    }
    Ok(Parsed {
        req: AgentRequest { messages, tools, tool_choice, response_schema: None, json_mode: false, allow_parallel },
        max_tokens: max_tokens.min(u64::from(u32::MAX)) as u32,
        breakpoints,
    })
}

fn tool_id(id: &str) -> String {
    format!("toolu_{}", id.trim_start_matches("call_"))
}

fn stop_reason(g: &Generation) -> &'static str {
    if g.truncated() {
        "max_tokens"
    } else if g.reply.tool_calls.is_empty() {
        "end_turn"
    } else {
        "tool_use"
    }
}

pub(crate) async fn messages(State(state): State<Arc<AppState>>, _headers: HeaderMap, raw: Bytes) -> Response {
    let body = match parse_body(&raw) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", &e),
    };
    let model = body.get("model").and_then(Value::as_str).unwrap_or_default();
    if !state.config.serves(model) {
        return error(StatusCode::NOT_FOUND, "not_found_error", &format!("model: {model}"));
    }
    let parsed = parse(&body).and_then(|p| Ok((p, request_behaviour(&state, &body)?, tool_wait_pin(&state, &body)?)));
    let (parsed, behaviour, pin) = match parsed {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", &e),
    };
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let mut decision = state.faults.decide(&raw);
    // Streams report overload in-band, after the 200 (Anthropic's `event: error`).
    let in_band_overload = stream && decision.fault == Some(Fault::Unavailable);
    if in_band_overload {
        decision.fault = None;
    }
    if let Some(r) = http_fault(&state, &decision, fault_shape).await {
        return r;
    }
    let prompt = render_chatml(&parsed.req.messages, &parsed.req.tools);
    let mut g = match generate_pinned(
        &state,
        &parsed.req,
        &behaviour,
        &prompt,
        Some(parsed.max_tokens),
        pin,
        PinUnless::NoToolCalls,
    ) {
        Ok(g) => g,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", &e.anthropic()),
    };
    let (creation, read) = parsed.breakpoints.last().map_or((0, 0), |_| {
        let (c, r) = state.prompt_cache.account(&parsed.breakpoints, state.config.cache_min_tokens as usize);
        (c.min(g.prompt_tokens), r.min(g.prompt_tokens - c.min(g.prompt_tokens)))
    });
    state.stats.record_prompt_cache(creation, read);
    let input_tokens = g.prompt_tokens - creation - read;
    let id = format!("msg_{:024x}", u128::from(state.stats.next_id()) ^ (u128::from(hash_bytes(&raw)) << 32));
    let model = state.config.answer_model(body.get("model").and_then(Value::as_str));
    let usage = move |output: usize| {
        json!({"input_tokens": input_tokens, "cache_creation_input_tokens": creation,
               "cache_read_input_tokens": read, "output_tokens": output})
    };
    if stream {
        let (mut sink, stream_body) = FrameSink::new(&decision, g.streamed_pieces().0 + 4);
        tokio::spawn(async move {
            let start = json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant",
                "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": usage(1)}});
            if !sink.send(sse_event("message_start", &start)).await {
                return;
            }
            if in_band_overload {
                sink.send(sse_event("error", &error_body("overloaded_error", "Overloaded"))).await;
                return;
            }
            let mut open: Option<usize> = None;
            let mut next_index = 0usize;
            let mut pinged = false;
            while let Some(event) = g.events.recv().await {
                let mut frames = Vec::new();
                match event {
                    EngineEvent::Token { index, .. } => match g.pieces.get(index) {
                        Some(Piece::Text(t)) => {
                            if open.is_none() {
                                frames.push(sse_event(
                                    "content_block_start",
                                    &json!({"type": "content_block_start",
                                    "index": next_index, "content_block": {"type": "text", "text": ""}}),
                                ));
                                open = Some(next_index);
                                next_index += 1;
                            }
                            frames.push(sse_event(
                                "content_block_delta",
                                &json!({"type": "content_block_delta",
                                "index": open, "delta": {"type": "text_delta", "text": t}}),
                            ));
                        }
                        Some(Piece::CallStart(i)) => {
                            if let Some(k) = open.take() {
                                frames.push(sse_event(
                                    "content_block_stop",
                                    &json!({"type": "content_block_stop", "index": k}),
                                ));
                            }
                            let call = &g.reply.tool_calls[*i];
                            frames.push(sse_event(
                                "content_block_start",
                                &json!({"type": "content_block_start",
                                "index": next_index, "content_block": {"type": "tool_use", "id": tool_id(&call.id),
                                "name": call.name, "input": {}}}),
                            ));
                            open = Some(next_index);
                            next_index += 1;
                        }
                        Some(Piece::CallArgs(_, frag)) => {
                            frames.push(sse_event(
                                "content_block_delta",
                                &json!({"type": "content_block_delta",
                                "index": open, "delta": {"type": "input_json_delta", "partial_json": frag}}),
                            ));
                        }
                        Some(Piece::Silent) | None => {}
                    },
                    EngineEvent::Finished { .. } => {
                        let Some(f) = on_event(&state, &event) else { return };
                        let reason = stop_reason(&g);
                        state.stats.record_reason(if reason == "max_tokens" { "length" } else { "stop" });
                        if let Some(k) = open.take() {
                            frames.push(sse_event(
                                "content_block_stop",
                                &json!({"type": "content_block_stop", "index": k}),
                            ));
                        }
                        frames.push(sse_event("message_delta", &json!({"type": "message_delta",
                            "delta": {"stop_reason": reason, "stop_sequence": null}, "usage": usage(f.completion_tokens)})));
                        frames.push(sse_event("message_stop", &json!({"type": "message_stop"})));
                        for frame in frames {
                            if !sink.send(frame).await {
                                return;
                            }
                        }
                        return;
                    }
                    EngineEvent::Started { .. } => {}
                    // Ruled out before submitting (see `generate`).
                    EngineEvent::Rejected { .. } => return,
                }
                // Anthropic sends one `ping` right after the first content block starts.
                if !pinged {
                    if let Some(at) = frames.iter().position(|f| f.starts_with(b"event: content_block_start")) {
                        frames.insert(at + 1, sse_event("ping", &json!({"type": "ping"})));
                        pinged = true;
                    }
                }
                for frame in frames {
                    if !sink.send(frame).await {
                        return;
                    }
                }
            }
        });
        return stream_response("text/event-stream", stream_body);
    }
    let Some(f) = finish(&state, &mut g).await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "overloaded_error", "The engine shut down.");
    };
    let reason = stop_reason(&g);
    state.stats.record_reason(if reason == "max_tokens" { "length" } else { "stop" });
    let mut content = Vec::new();
    if g.truncated() {
        content.push(json!({"type": "text", "text": partial_text(&g)}));
    } else {
        if !g.reply.content.is_empty() {
            content.push(json!({"type": "text", "text": g.reply.content}));
        }
        for call in &g.reply.tool_calls {
            let input: Value = serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}));
            content.push(json!({"type": "tool_use", "id": tool_id(&call.id), "name": call.name, "input": input}));
        }
    }
    let value = json!({
        "id": id, "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": reason, "stop_sequence": null, "usage": usage(f.completion_tokens),
    });
    faulty_body(&decision, StatusCode::OK, &value)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cache_reads_the_longest_cached_breakpoint_and_writes_the_rest() {
        let t = PromptCacheTable::default();
        assert_eq!(t.account(&[(1, 2000)], 1024), (2000, 0));
        assert_eq!(t.account(&[(1, 2000)], 1024), (0, 2000));
        assert_eq!(t.account(&[(1, 2000), (2, 3000)], 1024), (1000, 2000));
        assert_eq!(t.account(&[(9, 500)], 1024), (0, 0));
        assert_eq!(t.account(&[(9, 500)], 1024), (0, 0));
        assert_eq!(t.account(&[], 1024), (0, 0));
    }

    #[test]
    fn breakpoints_follow_tools_system_messages_order() {
        let body = json!({"model": "m", "max_tokens": 10,
            "tools": [{"name": "t", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}],
            "system": [{"type": "text", "text": "long system text", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]});
        let p = parse(&body).unwrap();
        assert_eq!(p.breakpoints.len(), 2);
        assert!(p.breakpoints[0].1 < p.breakpoints[1].1);
        let mut other = body.clone();
        other["system"][0]["text"] = json!("different");
        let q = parse(&other).unwrap();
        assert_eq!(p.breakpoints[0], q.breakpoints[0]);
        assert_ne!(p.breakpoints[1].0, q.breakpoints[1].0);
    }

    #[test]
    fn tool_results_become_tool_messages() {
        let body = json!({"model": "m", "max_tokens": 10, "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "42"}]}]});
        let p = parse(&body).unwrap();
        assert_eq!(p.req.messages.len(), 3);
        assert_eq!(p.req.messages[1].tool_calls[0].arguments, "{\"a\":1}");
        assert_eq!(p.req.messages[2].role, Role::Tool);
        assert!(parse(&json!({"model": "m", "messages": []})).unwrap_err().contains("max_tokens"));
    }
}
