//! Ollama `POST /api/chat` (NDJSON stream by default, one object with `"stream": false`) and
//! `GET /api/tags`. Ollama hands over a tool call whole, with `arguments` as an object, once its
//! arguments are complete; durations are nanoseconds (simulated time here).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::super::behaviour::{AgentRequest, Piece};
use super::super::engine::EngineEvent;
use super::super::faults::Fault;
use super::{
    faulty_body, finish, generate, http_fault, json_response, on_event, openai_tools, parse_body, partial_text,
    render_chatml, request_behaviour, rfc3339_now, stream_response, AppState, ErrorShape, Finish, FrameSink,
    Generation,
};
use crate::conversation::{Message, Role, ToolCall};

fn error(status: StatusCode, message: &str) -> Response {
    json_response(status, &json!({"error": message}))
}

fn fault_shape(fault: Fault) -> Option<ErrorShape> {
    let (status, message) = match fault {
        Fault::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "too many requests"),
        Fault::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "llama runner process has terminated"),
        Fault::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server busy, please try again"),
        _ => return None,
    };
    Some(ErrorShape { status, body: json!({"error": message}) })
}

fn parse(body: &Value) -> Result<(AgentRequest, Option<u32>), String> {
    let list = body.get("messages").and_then(Value::as_array).ok_or("messages: expected a list")?;
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| format!("messages[{i}].role is missing"))?;
        let content = m.get("content").and_then(Value::as_str).unwrap_or_default().to_owned();
        messages.push(match role {
            "system" => Message::system(content),
            "user" => Message::user(content),
            "assistant" => {
                let calls = m.get("tool_calls").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
                let calls = calls
                    .iter()
                    .map(|c| ToolCall {
                        id: c.get("id").and_then(Value::as_str).unwrap_or_default().to_owned(),
                        name: c.pointer("/function/name").and_then(Value::as_str).unwrap_or_default().to_owned(),
                        arguments: match c.pointer("/function/arguments") {
                            Some(Value::String(s)) => s.clone(),
                            Some(v) => v.to_string(),
                            None => "{}".to_owned(),
                        },
                    })
                    .collect();
                Message::assistant(content, calls)
            }
            "tool" => Message {
                role: Role::Tool,
                content,
                tool_calls: Vec::new(),
                tool_call_id: None,
                name: m.get("tool_name").or_else(|| m.get("name")).and_then(Value::as_str).map(str::to_owned),
            },
            other => return Err(format!("messages[{i}].role `{other}` is not system, user, assistant or tool")),
        });
    }
    let tools = openai_tools(body)?;
    let (response_schema, json_mode) = match body.get("format") {
        None | Some(Value::Null) => (None, false),
        Some(Value::String(s)) if s == "json" => (None, true),
        Some(Value::String(s)) if s.is_empty() => (None, false),
        Some(schema @ Value::Object(_)) => (Some(schema.clone()), true),
        Some(_) => return Err("format: expected \"json\" or a JSON schema object".to_owned()),
    };
    let num_predict = body
        .pointer("/options/num_predict")
        .and_then(Value::as_i64)
        .filter(|n| *n > 0)
        .map(|n| n.min(i64::from(u32::MAX)) as u32);
    Ok((
        AgentRequest { messages, tools, response_schema, json_mode, allow_parallel: true, ..AgentRequest::default() },
        num_predict,
    ))
}

fn call_json(call: &ToolCall) -> Value {
    let arguments: Value = serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}));
    json!({"function": {"name": call.name, "arguments": arguments}})
}

fn final_fields(model: &str, g: &Generation, f: &Finish, message: &Value) -> Value {
    let ns = |d: std::time::Duration| d.as_nanos() as u64;
    json!({
        "model": model, "created_at": rfc3339_now(), "message": message,
        "done_reason": if g.truncated() { "length" } else { "stop" }, "done": true,
        "total_duration": ns(f.total), "load_duration": 0,
        "prompt_eval_count": f.prompt_tokens, "prompt_eval_duration": ns(f.ttft.saturating_sub(f.queue_time)),
        "eval_count": f.completion_tokens, "eval_duration": ns(f.total.saturating_sub(f.ttft)),
    })
}

pub(crate) async fn chat(State(state): State<Arc<AppState>>, _headers: HeaderMap, raw: Bytes) -> Response {
    let body = match parse_body(&raw) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let model = body.get("model").and_then(Value::as_str).unwrap_or_default();
    // Ollama accepts a missing `:latest` tag.
    if !state.config.serves(model) && !model.strip_suffix(":latest").is_some_and(|m| state.config.serves(m)) {
        return error(StatusCode::NOT_FOUND, &format!("model \"{model}\" not found, try pulling it first"));
    }
    let ((req, num_predict), behaviour) = match parse(&body).and_then(|p| Ok((p, request_behaviour(&state, &body)?))) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let decision = state.faults.decide(&raw);
    if let Some(r) = http_fault(&state, &decision, fault_shape).await {
        return r;
    }
    let prompt = render_chatml(&req.messages, &req.tools);
    let mut g = match generate(&state, &req, &behaviour, &prompt, num_predict) {
        Ok(g) => g,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.vllm()),
    };
    let model = state.config.answer_model(body.get("model").and_then(Value::as_str));
    if body.get("stream").and_then(Value::as_bool).unwrap_or(true) {
        let (mut sink, stream_body) = FrameSink::new(&decision, {
            // Ollama sends a tool call as one line once its arguments are complete.
            let (_, calls) = g.streamed_pieces();
            let produced = &g.pieces[..g.max_new.min(g.pieces.len())];
            produced.iter().filter(|p| matches!(p, Piece::Text(_))).count() + calls + 1
        });
        tokio::spawn(async move {
            let line = |v: Value| Bytes::from(format!("{v}\n"));
            while let Some(event) = g.events.recv().await {
                let frame = match event {
                    EngineEvent::Token { index, .. } => match g.pieces.get(index) {
                        Some(Piece::Text(t)) => json!({"model": model, "created_at": rfc3339_now(),
                            "message": {"role": "assistant", "content": t}, "done": false}),
                        // The whole call goes out once its last argument token is out.
                        Some(Piece::CallArgs(i, _))
                            if !matches!(g.pieces.get(index + 1), Some(Piece::CallArgs(j, _)) if j == i)
                                && index < g.max_new =>
                        {
                            json!({"model": model, "created_at": rfc3339_now(), "message": {"role": "assistant",
                                "content": "", "tool_calls": [call_json(&g.reply.tool_calls[*i])]}, "done": false})
                        }
                        _ => continue,
                    },
                    EngineEvent::Finished { .. } => {
                        let Some(f) = on_event(&state, &event) else { return };
                        state.stats.record_reason(if g.truncated() { "length" } else { "stop" });
                        let last = final_fields(&model, &g, &f, &json!({"role": "assistant", "content": ""}));
                        sink.send(line(last)).await;
                        return;
                    }
                    EngineEvent::Started { .. } => continue,
                    EngineEvent::Rejected { .. } => return,
                };
                if !sink.send(line(frame)).await {
                    return;
                }
            }
        });
        return stream_response("application/x-ndjson", stream_body);
    }
    let Some(f) = finish(&state, &mut g).await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the model runner stopped");
    };
    state.stats.record_reason(if g.truncated() { "length" } else { "stop" });
    let message = if g.truncated() || g.reply.tool_calls.is_empty() {
        json!({"role": "assistant", "content": partial_text(&g)})
    } else {
        let calls: Vec<Value> = g.reply.tool_calls.iter().map(call_json).collect();
        json!({"role": "assistant", "content": g.reply.content, "tool_calls": calls})
    };
    faulty_body(&decision, StatusCode::OK, &final_fields(&model, &g, &f, &message))
}

pub(crate) async fn tags(State(state): State<Arc<AppState>>) -> Response {
    let model = &state.config.model;
    json_response(
        StatusCode::OK,
        &json!({"models": [{
            "name": model, "model": model, "modified_at": rfc3339_now(), "size": 0,
            "digest": format!("{:064x}", super::super::draw::hash_bytes(model.as_bytes())),
            "details": {"parent_model": "", "format": "gguf", "family": "qwen2", "families": ["qwen2"],
                        "parameter_size": "unknown", "quantization_level": "BF16"}
        }]}),
    )
}
