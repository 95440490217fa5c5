//! OpenAI-compatible endpoints as vLLM serves them: `/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`. Errors use vLLM's `{"error": {"message", "type", "param", "code"}}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::super::behaviour::{AgentRequest, Piece, ToolChoice};
use super::super::engine::EngineEvent;
use super::super::faults::Fault;
use super::super::prompt;
use super::super::tokenizer;
use super::{
    faulty_body, finish, generate_text, http_fault, json_response, on_event, openai_tools, parse_body, partial_text,
    render_chatml, request_behaviour, request_id, sse_data, stream_response, unix_now, AppState, ErrorShape, FrameSink,
    Generation,
};
use crate::chat_template::ToolCallFormat;
use crate::conversation::{Message, Role, ToolCall};

fn error_body(status: StatusCode, message: &str, param: Option<&str>) -> Value {
    let kind = match status.as_u16() {
        400 => "BadRequestError",
        404 => "NotFoundError",
        429 => "RateLimitError",
        503 => "ServiceUnavailableError",
        _ => "InternalServerError",
    };
    json!({"error": {"message": message, "type": kind, "param": param, "code": status.as_u16()}})
}

fn error(status: StatusCode, message: &str, param: Option<&str>) -> Response {
    json_response(status, &error_body(status, message, param))
}

fn fault_shape(fault: Fault) -> Option<ErrorShape> {
    let (status, message) = match fault {
        Fault::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "Rate limit exceeded, retry later."),
        Fault::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "Internal server error."),
        Fault::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "The engine is overloaded."),
        _ => return None,
    };
    Some(ErrorShape { status, body: error_body(status, message, None) })
}

fn with_request_id(mut response: Response, rid: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(rid) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// Common checks: `model` names the served model, `n` is 1; the error response if not.
fn check_common(state: &AppState, body: &Value) -> Option<Response> {
    let model = body.get("model").and_then(Value::as_str).unwrap_or_default();
    if !state.config.serves(model) {
        return Some(error(StatusCode::NOT_FOUND, &format!("The model `{model}` does not exist."), Some("model")));
    }
    match body.get("n") {
        None | Some(Value::Null) => None,
        Some(n) if n.as_u64() == Some(1) => None,
        Some(n) => Some(error(
            StatusCode::BAD_REQUEST,
            &format!("n = {n} is not supported by this server: only n = 1."),
            Some("n"),
        )),
    }
}

fn text_of(content: Option<&Value>) -> Result<String, String> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => Ok(parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n")),
        Some(_) => Err("content must be a string, an array of parts or null".to_owned()),
    }
}

fn parse_messages(body: &Value) -> Result<Vec<Message>, String> {
    let messages = body.get("messages").and_then(Value::as_array).ok_or("`messages` must be an array")?;
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| format!("messages[{i}].role is missing"))?;
            let content = text_of(m.get("content")).map_err(|e| format!("messages[{i}].{e}"))?;
            Ok(match role {
                "system" | "developer" => Message::system(content),
                "user" => Message::user(content),
                "assistant" => {
                    let calls = m.get("tool_calls").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
                    let calls = calls
                        .iter()
                        .enumerate()
                        .map(|(j, c)| {
                            let f = c
                                .get("function")
                                .ok_or_else(|| format!("messages[{i}].tool_calls[{j}].function is missing"))?;
                            let arguments = match f.get("arguments") {
                                Some(Value::String(s)) => s.clone(),
                                Some(other) => other.to_string(),
                                None => "{}".to_owned(),
                            };
                            Ok(ToolCall {
                                id: c.get("id").and_then(Value::as_str).unwrap_or_default().to_owned(),
                                name: f.get("name").and_then(Value::as_str).unwrap_or_default().to_owned(),
                                arguments,
                            })
                        })
                        .collect::<Result<Vec<_>, String>>()?;
                    Message::assistant(content, calls)
                }
                "tool" | "function" => Message {
                    role: Role::Tool,
                    content,
                    tool_calls: Vec::new(),
                    tool_call_id: m.get("tool_call_id").and_then(Value::as_str).map(str::to_owned),
                    name: m.get("name").and_then(Value::as_str).map(str::to_owned),
                },
                other => {
                    return Err(format!(
                        "messages[{i}].role `{other}` is not one of system, developer, user, assistant, tool"
                    ))
                }
            })
        })
        .collect()
}

fn parse_tool_choice(body: &Value) -> Result<ToolChoice, String> {
    match body.get("tool_choice") {
        None | Some(Value::Null) => Ok(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Ok(ToolChoice::Auto),
            "none" => Ok(ToolChoice::None),
            "required" => Ok(ToolChoice::Required),
            other => Err(format!("tool_choice `{other}` is not auto, none, required or a named function")),
        },
        Some(obj) => obj
            .pointer("/function/name")
            .and_then(Value::as_str)
            .map(|n| ToolChoice::Named(n.to_owned()))
            .ok_or_else(|| "tool_choice object needs function.name".to_owned()),
    }
}

/// `(schema, json_mode)` from `response_format`.
fn parse_response_format(body: &Value) -> Result<(Option<Value>, bool), String> {
    let Some(rf) = body.get("response_format").filter(|v| !v.is_null()) else { return Ok((None, false)) };
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok((None, false)),
        Some("json_object") => Ok((None, true)),
        Some("json_schema") => {
            let schema =
                rf.pointer("/json_schema/schema").cloned().ok_or("response_format.json_schema.schema is missing")?;
            Ok((Some(schema), true))
        }
        _ => Err("response_format.type must be text, json_object or json_schema".to_owned()),
    }
}

fn max_tokens(body: &Value, key_default: Option<u32>) -> Result<Option<u32>, String> {
    for key in ["max_completion_tokens", "max_tokens"] {
        match body.get(key) {
            None | Some(Value::Null) => {}
            Some(v) => {
                let n = v.as_u64().filter(|n| *n >= 1).ok_or_else(|| format!("{key} must be an integer >= 1"))?;
                return Ok(Some(n.min(u64::from(u32::MAX)) as u32));
            }
        }
    }
    Ok(key_default)
}

fn include_usage(body: &Value) -> bool {
    body.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false)
}

fn usage_json(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

fn finish_reason(g: &Generation) -> &'static str {
    if g.truncated() {
        "length"
    } else if g.reply.tool_calls.is_empty() {
        "stop"
    } else {
        "tool_calls"
    }
}

pub(crate) async fn chat(State(state): State<Arc<AppState>>, headers: HeaderMap, raw: Bytes) -> Response {
    let rid = request_id(&headers, &state);
    let response = chat_inner(state, &rid, &raw).await;
    with_request_id(response, &rid)
}

async fn chat_inner(state: Arc<AppState>, rid: &str, raw: &[u8]) -> Response {
    let body = match parse_body(raw) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e, None),
    };
    if let Some(r) = check_common(&state, &body) {
        return r;
    }
    let parsed = (|| -> Result<_, String> {
        let messages = parse_messages(&body)?;
        if messages.is_empty() {
            return Err("messages must not be empty".to_owned());
        }
        let tools = openai_tools(&body)?;
        let tool_choice = parse_tool_choice(&body)?;
        if let ToolChoice::Named(name) = &tool_choice {
            if !tools.iter().any(|t| &t.name == name) {
                return Err(format!("tool_choice names the function `{name}`, which is not in `tools`"));
            }
        }
        if matches!(tool_choice, ToolChoice::Required) && tools.is_empty() {
            return Err("tool_choice `required` needs at least one tool in `tools`".to_owned());
        }
        let (response_schema, json_mode) = parse_response_format(&body)?;
        let allow_parallel = body.get("parallel_tool_calls").and_then(Value::as_bool).unwrap_or(true);
        let behaviour = request_behaviour(&state, &body)?;
        let max = max_tokens(&body, None)?;
        let pin = super::tool_wait_pin(&state, &body)?;
        Ok((
            AgentRequest { messages, tools, tool_choice, response_schema, json_mode, allow_parallel },
            behaviour,
            max,
            pin,
        ))
    })();
    let (req, behaviour, max, pin) = match parsed {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e, None),
    };
    let decision = state.faults.decide(raw);
    if let Some(r) = http_fault(&state, &decision, fault_shape).await {
        return r;
    }
    if req.response_schema.is_some() && state.faults.grammar_fails(raw) {
        // llama.cpp's words when a constrained output fails its own parser (server-common, 500).
        let message = "The model produced output that does not match the expected JSON schema format: \
                       parse error at position 0";
        return error(StatusCode::INTERNAL_SERVER_ERROR, message, None);
    }
    let prompt = render_chatml(&req.messages, &req.tools);
    let mut g = match super::generate_pinned(&state, &req, &behaviour, &prompt, max, pin, super::PinUnless::NoToolCalls)
    {
        Ok(g) => g,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.vllm(), Some("messages")),
    };
    let id = format!("chatcmpl-{rid}");
    let created = unix_now();
    let model = state.config.answer_model(body.get("model").and_then(Value::as_str));
    if body.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        let (mut sink, stream_body) = FrameSink::new(&decision, g.streamed_pieces().0 + 3);
        let usage = include_usage(&body);
        tokio::spawn(async move {
            let chunk = |delta: Value, finish: Option<&str>| {
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
            };
            let mut started = false;
            while let Some(event) = g.events.recv().await {
                match event {
                    EngineEvent::Token { index, .. } => {
                        if !started {
                            started = true;
                            if !sink.send(sse_data(&chunk(json!({"role": "assistant", "content": ""}), None))).await {
                                return;
                            }
                        }
                        let mut cut = false;
                        let delta = match g.pieces.get(index) {
                            Some(Piece::Text(t)) => json!({"content": t}),
                            Some(Piece::CallStart(i)) => {
                                cut = *i == 1 && decision.cut_after_call;
                                let call = &g.reply.tool_calls[*i];
                                json!({"tool_calls": [{"index": i, "id": call.id, "type": "function",
                                        "function": {"name": call.name, "arguments": ""}}]})
                            }
                            Some(Piece::CallArgs(i, frag)) => {
                                json!({"tool_calls": [{"index": i, "function": {"arguments": frag}}]})
                            }
                            Some(Piece::Silent) | None => continue,
                        };
                        if !sink.send(sse_data(&chunk(delta, None))).await {
                            return;
                        }
                        if cut {
                            // The body ends here, cleanly: a reset could lose the frame just sent
                            // in the server's buffers, and with it the point of this fault.
                            state.faults.count_cut_after_call();
                            return;
                        }
                    }
                    EngineEvent::Finished { .. } => {
                        let Some(f) = on_event(&state, &event) else { return };
                        let reason = finish_reason(&g);
                        state.stats.record_reason(if reason == "length" { "length" } else { "stop" });
                        if !sink.send(sse_data(&chunk(json!({}), Some(reason)))).await {
                            return;
                        }
                        if usage {
                            let u = json!({"id": id, "object": "chat.completion.chunk", "created": created,
                                           "model": model, "choices": [],
                                           "usage": usage_json(f.prompt_tokens, f.completion_tokens, f.cached_tokens)});
                            if !sink.send(sse_data(&u)).await {
                                return;
                            }
                        }
                        sink.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                        return;
                    }
                    EngineEvent::Started { .. } => {}
                    // Ruled out before submitting (see `generate`).
                    EngineEvent::Rejected { .. } => return,
                }
            }
        });
        return stream_response("text/event-stream", stream_body);
    }
    let Some(f) = finish(&state, &mut g).await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "The engine shut down.", None);
    };
    let reason = finish_reason(&g);
    state.stats.record_reason(if reason == "length" { "length" } else { "stop" });
    let message = if g.truncated() {
        json!({"role": "assistant", "content": partial_text(&g), "tool_calls": []})
    } else {
        let calls: Vec<Value> = g
            .reply
            .tool_calls
            .iter()
            .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect();
        let content =
            if g.reply.content.is_empty() && !calls.is_empty() { Value::Null } else { json!(g.reply.content) };
        json!({"role": "assistant", "content": content, "tool_calls": calls})
    };
    let value = json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": reason}],
        "usage": usage_json(f.prompt_tokens, f.completion_tokens, f.cached_tokens),
    });
    faulty_body(&decision, StatusCode::OK, &value)
}

/// The text a completion produced: its pieces up to `max_tokens` (all text: no markup is parsed).
fn completion_text(g: &Generation) -> String {
    g.pieces.iter().take(g.max_new).map(|p| if let Piece::Text(t) = p { t.as_str() } else { "" }).collect()
}

pub(crate) async fn completions(State(state): State<Arc<AppState>>, headers: HeaderMap, raw: Bytes) -> Response {
    let rid = request_id(&headers, &state);
    let response = completions_inner(state, &rid, &raw).await;
    with_request_id(response, &rid)
}

async fn completions_inner(state: Arc<AppState>, rid: &str, raw: &[u8]) -> Response {
    let body = match parse_body(raw) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e, None),
    };
    if let Some(r) = check_common(&state, &body) {
        return r;
    }
    let prompts: Vec<String> = match body.get("prompt") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_string) => {
            items.iter().filter_map(Value::as_str).map(str::to_owned).collect()
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "prompt must be a string or a non-empty list of strings",
                Some("prompt"),
            )
        }
    };
    // vLLM (like OpenAI's legacy endpoint) defaults completions to 16 tokens.
    let (behaviour, max) = match request_behaviour(&state, &body).and_then(|b| Ok((b, max_tokens(&body, Some(16))?))) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e, None),
    };
    // A hint names one agent: one prompt. A completion shows no tool calls, so the hint is taken
    // at its word (pinned for the wait).
    let pin = match super::tool_wait_pin(&state, &body) {
        Ok(Some(_)) if prompts.len() > 1 => {
            let e = "batchagent: a hint names one agent; send a hinted prompt in a request of its own";
            return error(StatusCode::BAD_REQUEST, e, Some("prompt"));
        }
        Ok(pin) => pin,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e, None),
    };
    let decision = state.faults.decide(raw);
    if let Some(r) = http_fault(&state, &decision, fault_shape).await {
        return r;
    }
    let gens: Result<Vec<Generation>, String> = prompts
        .iter()
        .map(|p| {
            // A chat template's rendering is read as the chat it is (its tools, calls and results);
            // the answer's calls come back as text in the prompt's form.
            let (req, format) = match prompt::read(p) {
                Some(read) => {
                    // Llama 3.1's format has one call per turn.
                    let allow_parallel = read.format == ToolCallFormat::Hermes;
                    let req = AgentRequest {
                        messages: read.messages,
                        tools: read.tools,
                        allow_parallel,
                        ..AgentRequest::default()
                    };
                    (req, read.format)
                }
                None => (
                    AgentRequest { messages: vec![Message::user(p.clone())], ..AgentRequest::default() },
                    ToolCallFormat::Hermes,
                ),
            };
            generate_text(&state, &req, &behaviour, p, max, format, pin.clone()).map_err(super::Refusal::vllm)
        })
        .collect();
    let mut gens = match gens {
        Ok(g) => g,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e, Some("prompt")),
    };
    let id = format!("cmpl-{rid}");
    let created = unix_now();
    let model = state.config.answer_model(body.get("model").and_then(Value::as_str));
    let reason_of = |g: &Generation| if g.truncated() { "length" } else { "stop" };
    if body.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        let expected = gens.iter().map(|g| g.streamed_pieces().0 + 1).sum::<usize>() + 2;
        let (mut sink, stream_body) = FrameSink::new(&decision, expected);
        let usage = include_usage(&body);
        let (tx, mut rx) = mpsc::unbounded_channel::<(usize, EngineEvent)>();
        let mut texts = Vec::with_capacity(gens.len());
        let mut reasons = Vec::with_capacity(gens.len());
        for (i, g) in gens.iter_mut().enumerate() {
            let pieces: Vec<String> =
                g.pieces.iter().map(|p| if let Piece::Text(t) = p { t.clone() } else { String::new() }).collect();
            texts.push(pieces);
            reasons.push(reason_of(g));
            let mut events = std::mem::replace(&mut g.events, mpsc::unbounded_channel().1);
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(e) = events.recv().await {
                    if tx.send((i, e)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        tokio::spawn(async move {
            let chunk = |i: usize, text: &str, finish: Option<&str>| {
                json!({"id": id, "object": "text_completion", "created": created, "model": model,
                       "choices": [{"index": i, "text": text, "logprobs": null, "finish_reason": finish, "stop_reason": null}]})
            };
            let (mut prompt_total, mut completion_total, mut cached_total, mut done) = (0, 0, 0, 0);
            while let Some((i, event)) = rx.recv().await {
                let frame = match event {
                    EngineEvent::Token { index, .. } => match texts[i].get(index) {
                        Some(t) => chunk(i, t, None),
                        None => continue,
                    },
                    EngineEvent::Finished { .. } => {
                        let Some(f) = on_event(&state, &event) else { continue };
                        state.stats.record_reason(reasons[i]);
                        prompt_total += f.prompt_tokens;
                        completion_total += f.completion_tokens;
                        cached_total += f.cached_tokens;
                        done += 1;
                        chunk(i, "", Some(reasons[i]))
                    }
                    EngineEvent::Started { .. } => continue,
                    EngineEvent::Rejected { .. } => return,
                };
                if !sink.send(sse_data(&frame)).await {
                    return;
                }
            }
            if done < texts.len() {
                return;
            }
            if usage {
                let u = json!({"id": id, "object": "text_completion", "created": created, "model": model,
                               "choices": [], "usage": usage_json(prompt_total, completion_total, cached_total)});
                if !sink.send(sse_data(&u)).await {
                    return;
                }
            }
            sink.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        });
        return stream_response("text/event-stream", stream_body);
    }
    let mut choices = Vec::with_capacity(gens.len());
    let (mut prompt_total, mut completion_total, mut cached_total) = (0, 0, 0);
    let finishes = futures_util::future::join_all(gens.iter_mut().map(|g| {
        let state = &state;
        async move { finish(state, g).await }
    }))
    .await;
    for (i, (g, f)) in gens.iter().zip(finishes).enumerate() {
        let Some(f) = f else {
            return error(StatusCode::SERVICE_UNAVAILABLE, "The engine shut down.", None);
        };
        state.stats.record_reason(reason_of(g));
        prompt_total += f.prompt_tokens;
        completion_total += f.completion_tokens;
        cached_total += f.cached_tokens;
        choices.push(json!({"index": i, "text": completion_text(g), "logprobs": null,
                            "finish_reason": reason_of(g), "stop_reason": null}));
    }
    let value = json!({
        "id": id, "object": "text_completion", "created": created, "model": model, "choices": choices,
        "usage": usage_json(prompt_total, completion_total, cached_total),
    });
    faulty_body(&decision, StatusCode::OK, &value)
}

/// vLLM's `/tokenize`: a `TokenizeChatRequest` (`messages`, optional `tools`,
/// `add_generation_prompt` default true) is rendered with the chat template the model calls are;
/// a `TokenizeCompletionRequest` (`prompt`) is tokenized as it is. The answer is vLLM's
/// `TokenizeResponse`: `count`, `max_model_len`, `tokens`, and `token_strs` when
/// `return_token_strs` is set.
pub(crate) async fn tokenize(State(state): State<Arc<AppState>>, raw: Bytes) -> Response {
    let body = match parse_body(&raw) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e, None),
    };
    if let Some(r) = check_common(&state, &body) {
        return r;
    }
    let text = if body.get("messages").is_some() {
        let parsed = (|| -> Result<_, String> { Ok((parse_messages(&body)?, openai_tools(&body)?)) })();
        let (messages, tools) = match parsed {
            Ok(p) => p,
            Err(e) => return error(StatusCode::BAD_REQUEST, &e, None),
        };
        let mut text = render_chatml(&messages, &tools);
        if body.get("add_generation_prompt").and_then(Value::as_bool) == Some(false) {
            text.truncate(text.len() - "<|im_start|>assistant\n".len());
        }
        text
    } else {
        match body.get("prompt") {
            Some(Value::String(prompt)) => prompt.clone(),
            _ => return error(StatusCode::BAD_REQUEST, "either `messages` or a `prompt` string is required", None),
        }
    };
    let tokens = tokenizer::tokenize(&text);
    let token_strs = if body.get("return_token_strs").and_then(Value::as_bool) == Some(true) {
        json!(tokenizer::pieces(&text))
    } else {
        Value::Null
    };
    json_response(
        StatusCode::OK,
        &json!({
            "count": tokens.len(), "max_model_len": state.config.context_window(),
            "tokens": tokens, "token_strs": token_strs,
        }),
    )
}

pub(crate) async fn models(State(state): State<Arc<AppState>>) -> Response {
    let model = &state.config.model;
    let root = state.config.model_root.as_ref().unwrap_or(model);
    let mut listing = json!({"object": "list", "data": [{
        "id": model, "object": "model", "created": unix_now(), "owned_by": "vllm", "root": root,
        "parent": null, "max_model_len": state.config.context_window(), "permission": []
    }]});
    if !state.config.model_pinned {
        // Not a vLLM field: it tells a client's pre-run check that any model name is served here
        // (OpenAI-compatible clients ignore fields they do not know).
        listing["serves_any_model"] = json!(true);
    }
    json_response(StatusCode::OK, &listing)
}
