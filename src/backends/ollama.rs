//! Ollama's native chat API (`POST /api/chat`): an NDJSON stream of message chunks, tool-call
//! arguments as JSON objects, structured output through `format` (a JSON Schema), the output cap in
//! `options.num_predict`, and token counts in `prompt_eval_count` / `eval_count` of the last chunk.

use std::time::Instant;

use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::call::{estimate, whole_turn, with_call_timeout};
use super::http::{AuthStyle, HttpClient};
use super::openai::{role_name, tool_json};
use super::url::BackendOptions;
use super::{Backend, BackendError, Capabilities, ChatRequest, ChatResponse, StreamEvent};
use crate::conversation::{Message, Role, ToolCall, Usage};
use crate::limits::pacer::Ticket;
use crate::stream::ndjson::{NdjsonParser, StreamEnd};
use crate::stream::openai::normalise_finish_reason;

pub struct OllamaBackend {
    name: String,
    http: HttpClient,
}

impl std::fmt::Debug for OllamaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OllamaBackend").field("name", &self.name).field("http", &self.http).finish()
    }
}

#[derive(Debug, Default, Deserialize)]
struct FunctionWire {
    #[serde(default)]
    name: String,
    #[serde(default)]
    arguments: Value,
}

#[derive(Debug, Deserialize)]
struct ToolCallWire {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: FunctionWire,
}

#[derive(Debug, Default, Deserialize)]
struct MessageWire {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallWire>>,
}

#[derive(Debug, Deserialize)]
struct ChunkWire {
    #[serde(default)]
    message: Option<MessageWire>,
    #[serde(default)]
    done: bool,
    #[serde(default)]
    done_reason: Option<String>,
    #[serde(default)]
    prompt_eval_count: Option<u64>,
    #[serde(default)]
    eval_count: Option<u64>,
    #[serde(default)]
    error: Option<Value>,
}

/// One turn assembled from Ollama chunks. Ollama sends each tool call whole, so every call is
/// ready the moment its chunk arrives.
#[derive(Debug)]
struct Turn<'r> {
    request_id: &'r str,
    content: String,
    tool_calls: Vec<ToolCall>,
    usage: Usage,
    done_reason: Option<String>,
    done: bool,
    first_token: bool,
    text_deltas: bool,
}

impl<'r> Turn<'r> {
    fn new(request_id: &'r str, text_deltas: bool) -> Self {
        Self {
            request_id,
            text_deltas,
            content: String::new(),
            tool_calls: Vec::new(),
            usage: Usage::default(),
            done_reason: None,
            done: false,
            first_token: false,
        }
    }

    fn push_line(&mut self, line: &str, out: &mut Vec<StreamEvent>) -> Result<(), BackendError> {
        let chunk: ChunkWire = serde_json::from_str(line).map_err(|e| {
            let head: String = line.chars().take(200).collect();
            BackendError::Protocol(format!("invalid JSON line from ollama at column {}: {e}; line: {head}", e.column()))
        })?;
        if let Some(error) = chunk.error {
            let message = error.as_str().map_or_else(|| error.to_string(), str::to_owned);
            // An error after the 200 status is the model runner failing: retryable.
            return Err(BackendError::Server { status: 500, message: message.chars().take(500).collect() });
        }
        if let Some(message) = chunk.message {
            if let Some(text) = message.content.filter(|t| !t.is_empty()) {
                self.first(out);
                if self.text_deltas {
                    out.push(StreamEvent::TextDelta(text.clone()));
                }
                self.content.push_str(&text);
            }
            for call in message.tool_calls.unwrap_or_default() {
                self.first(out);
                let index = self.tool_calls.len();
                let arguments = match call.function.arguments {
                    Value::String(s) => s,
                    Value::Null => "{}".to_owned(),
                    other => other.to_string(),
                };
                let call = ToolCall {
                    // Ollama gives no call ids (tool results are matched by name); make ones unique
                    // across the conversation.
                    id: call
                        .id
                        .filter(|id| !id.is_empty())
                        .unwrap_or_else(|| format!("{}-call{index}", self.request_id)),
                    name: call.function.name,
                    arguments,
                };
                out.push(StreamEvent::ToolCallReady(call.clone()));
                self.tool_calls.push(call);
            }
        }
        if chunk.done {
            self.done = true;
            self.done_reason = chunk.done_reason;
            self.usage.prompt_tokens = chunk.prompt_eval_count.unwrap_or(0);
            self.usage.completion_tokens = chunk.eval_count.unwrap_or(0);
        }
        Ok(())
    }

    /// `push_line` unless an earlier line already failed; the first failure is kept.
    fn push_line_once(&mut self, line: &str, out: &mut Vec<StreamEvent>, failure: &mut Option<BackendError>) {
        if failure.is_none() {
            if let Err(e) = self.push_line(line, out) {
                *failure = Some(e);
            }
        }
    }

    fn first(&mut self, out: &mut Vec<StreamEvent>) {
        if !self.first_token {
            self.first_token = true;
            out.push(StreamEvent::FirstToken);
        }
    }

    fn finish(self) -> Result<ChatResponse, BackendError> {
        if !self.done {
            return Err(BackendError::Protocol(format!(
                "ollama stream ended before \"done\": true ({} bytes of content received)",
                self.content.len()
            )));
        }
        let has_calls = !self.tool_calls.is_empty();
        Ok(ChatResponse {
            content: self.content,
            tool_calls: self.tool_calls,
            usage: self.usage,
            finish_reason: normalise_finish_reason(self.done_reason.as_deref(), has_calls),
            ttft: None,
        })
    }
}

impl OllamaBackend {
    /// `base_url` is the server root (`http://localhost:11434`).
    pub fn new(base_url: &str, options: &BackendOptions) -> Result<Self, BackendError> {
        // Ollama itself takes no key; one given is sent as a bearer token for proxies in front of it.
        let key = options.api_key.clone().filter(|k| !k.is_empty());
        let http = HttpClient::new(base_url, options, key, AuthStyle::Bearer)?;
        Ok(Self { name: format!("ollama {}", http.base_url()), http })
    }

    /// The JSON body of an `/api/chat` request.
    pub fn request_body(&self, request: &ChatRequest) -> Value {
        let mut body = Map::new();
        body.insert("model".into(), Value::String(request.model.clone()));
        body.insert("messages".into(), Value::Array(request.messages.iter().map(message_json).collect()));
        if !request.tools.is_empty() {
            body.insert("tools".into(), Value::Array(request.tools.iter().map(tool_json).collect()));
        }
        if let Some(schema) = &request.response_schema {
            body.insert("format".into(), (**schema).clone());
        }
        let mut options = Map::new();
        if let Some(max) = request.max_tokens {
            options.insert("num_predict".into(), Value::from(max));
        }
        if let Some(t) = request.temperature {
            options.insert("temperature".into(), Value::from(t));
        }
        if !options.is_empty() {
            body.insert("options".into(), Value::Object(options));
        }
        body.insert("stream".into(), Value::Bool(request.stream));
        if let Some(extra) = &request.extra_body {
            super::call::merge_extra_body(&mut body, extra);
        }
        Value::Object(body)
    }

    async fn chat_inner(
        &self,
        request: ChatRequest,
        events: Option<mpsc::UnboundedSender<StreamEvent>>,
        ticket: Ticket,
    ) -> Result<ChatResponse, BackendError> {
        let body = self.request_body(&request);
        let started = Instant::now();
        let mut response = self.http.send(self.http.post("/api/chat", &body).ticket(ticket)).await?;
        let mut turn = Turn::new(&request.request_id, request.text_deltas);
        let mut out = Vec::new();
        if !request.stream {
            let parse = |text: &str| {
                turn.push_line(text.trim(), &mut out)?;
                turn.finish()
            };
            return whole_turn(&self.http, response, "ollama", parse, events.as_ref(), request.text_deltas).await;
        }
        let mut lines = NdjsonParser::with_limit(self.http.max_response_bytes());
        let mut ttft = None;
        let mut failure = None;
        loop {
            let chunk = self.http.next_chunk(&mut response).await?;
            match &chunk {
                Some(bytes) => lines.feed_with(bytes, |line| turn.push_line_once(line, &mut out, &mut failure))?,
                None => {
                    if lines.finish_with(|line| turn.push_line_once(line, &mut out, &mut failure))
                        == StreamEnd::Truncated
                    {
                        failure.get_or_insert(BackendError::Protocol("ollama stream ended inside a JSON line".into()));
                    }
                }
            }
            for event in out.drain(..) {
                if ttft.is_none() && event == StreamEvent::FirstToken {
                    ttft = Some(started.elapsed());
                }
                if let Some(tx) = &events {
                    let _ = tx.send(event);
                }
            }
            if let Some(e) = failure.take() {
                return Err(self.http.redact_error(e));
            }
            if chunk.is_none() {
                break;
            }
        }
        let mut response = turn.finish()?;
        response.ttft = ttft;
        Ok(response)
    }
}

impl Backend for OllamaBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { streaming: true, tools: true, json_schema: true, ..Capabilities::default() }
    }

    fn chat(
        &self,
        request: ChatRequest,
        events: Option<mpsc::UnboundedSender<StreamEvent>>,
    ) -> BoxFuture<'_, Result<ChatResponse, BackendError>> {
        Box::pin(async move {
            // Waiting for the rate limit is not part of the call's time limit.
            let ticket = self.http.admit(estimate(&request, None)).await;
            with_call_timeout(self.http.request_timeout(), self.chat_inner(request, events, ticket)).await
        })
    }
}

fn message_json(message: &Message) -> Value {
    let mut m = Map::new();
    m.insert("role".into(), Value::from(role_name(message.role)));
    m.insert("content".into(), Value::String(message.content.clone()));
    if message.role == Role::Assistant && !message.tool_calls.is_empty() {
        let calls = message
            .tool_calls
            .iter()
            .map(|c| {
                // Ollama wants the arguments as an object; text that is not JSON is passed as is.
                let arguments =
                    serde_json::from_str::<Value>(&c.arguments).unwrap_or_else(|_| Value::String(c.arguments.clone()));
                json!({"function": {"name": c.name, "arguments": arguments}})
            })
            .collect();
        m.insert("tool_calls".into(), Value::Array(calls));
    }
    if message.role == Role::Tool {
        if let Some(name) = &message.name {
            m.insert("tool_name".into(), Value::String(name.clone()));
        }
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::arithmetic_side_effects)]
    use super::*;

    #[test]
    fn chunks_assemble_into_a_turn() {
        let mut turn = Turn::new("r1", true);
        let mut out = Vec::new();
        turn.push_line(r#"{"message":{"role":"assistant","content":"Hi"},"done":false}"#, &mut out).unwrap();
        turn.push_line(
            r#"{"message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"f","arguments":{"a":1}}}]},"done":false}"#,
            &mut out,
        )
        .unwrap();
        turn.push_line(r#"{"message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","prompt_eval_count":9,"eval_count":4}"#, &mut out).unwrap();
        assert!(matches!(&out[2], StreamEvent::ToolCallReady(c) if c.arguments == r#"{"a":1}"# && c.id == "r1-call0"));
        let resp = turn.finish().unwrap();
        assert_eq!(resp.content, "Hi");
        assert_eq!(resp.finish_reason, "tool_calls");
        assert_eq!(resp.usage, Usage { prompt_tokens: 9, completion_tokens: 4, ..Usage::default() });
    }

    #[test]
    fn missing_done_is_a_protocol_error_and_error_lines_fail() {
        let mut turn = Turn::new("r", true);
        let mut out = Vec::new();
        turn.push_line(r#"{"message":{"content":"x"},"done":false}"#, &mut out).unwrap();
        assert!(matches!(turn.finish(), Err(BackendError::Protocol(_))));
        let mut turn = Turn::new("r", true);
        let err = turn.push_line(r#"{"error":"model runner crashed"}"#, &mut out).unwrap_err();
        assert!(err.retryable());
    }
}
