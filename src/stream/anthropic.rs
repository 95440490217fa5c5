//! Anthropic Messages API: the streamed event sequence (`message_start`, `content_block_start`,
//! `content_block_delta`, `content_block_stop`, `message_delta`, `message_stop`, `ping`, `error`)
//! assembled into [`StreamEvent`]s and a [`ChatResponse`], and the non-streamed message body.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

use crate::conversation::{BackendError, ChatResponse, StreamEvent, ToolCall, Usage};
use crate::limits::stream_index;
use crate::stream::sse::{SseEvent, StreamEnd};

/// Anthropic's `stop_reason` in `OpenAI`'s words.
pub fn map_stop_reason(reason: Option<&str>) -> String {
    match reason {
        Some("end_turn" | "stop_sequence") | None => "stop",
        Some("tool_use") => "tool_calls",
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("refusal") => "content_filter",
        Some(other) => other,
    }
    .to_owned()
}

/// An `{"type": "error", "error": {"type": ..., "message": ...}}` object (a stream `error` event or
/// an HTTP error body) as a [`BackendError`]. `status` is the HTTP status when there was one.
pub fn error_from_object(value: &Value, status: Option<u16>) -> BackendError {
    let err = value.get("error").unwrap_or(value);
    let kind = err.get("type").and_then(Value::as_str).unwrap_or("");
    let message = clip(err.get("message").and_then(Value::as_str).unwrap_or(kind), 500);
    match (kind, status) {
        ("overloaded_error", _) | (_, Some(529)) => BackendError::Overloaded(message),
        ("rate_limit_error", _) | (_, Some(429)) => {
            BackendError::RateLimited { status: status.unwrap_or(429), retry_after: None }
        }
        ("authentication_error" | "permission_error", _) | (_, Some(401 | 403)) => {
            BackendError::Auth { status: status.unwrap_or(401), message }
        }
        ("invalid_request_error", _) => BackendError::rejected(status.unwrap_or(400), message),
        ("not_found_error", _) => BackendError::Rejected { status: status.unwrap_or(404), message },
        ("request_too_large", _) => BackendError::Rejected { status: status.unwrap_or(413), message },
        (_, Some(s)) if s < 500 => BackendError::rejected(s, message),
        // `api_error` and anything unknown mid-stream: the server failed; worth a retry.
        (_, s) => BackendError::Server { status: s.unwrap_or(500), message },
    }
}

fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let end = (0..=max).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
    format!("{}...", s.get(..end).unwrap_or_default())
}

// Field names are the wire's.
#[allow(clippy::struct_field_names)]
#[derive(Debug, Default, Deserialize)]
struct UsageWire {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

/// Running totals: `message_start` carries the input side, `message_delta` the output (and, on newer
/// API versions, cumulative input figures too, which then replace the earlier ones).
#[derive(Debug, Default, Clone, Copy)]
struct UsageParts {
    input: u64,
    output: u64,
    cache_creation: u64,
    cache_read: u64,
}

impl UsageParts {
    fn merge(&mut self, w: &UsageWire) {
        if let Some(v) = w.input_tokens {
            self.input = v;
        }
        if let Some(v) = w.output_tokens {
            self.output = v;
        }
        if let Some(v) = w.cache_creation_input_tokens {
            self.cache_creation = v;
        }
        if let Some(v) = w.cache_read_input_tokens {
            self.cache_read = v;
        }
    }

    fn to_usage(self) -> Usage {
        Usage {
            // Anthropic's input_tokens excludes the cached parts; ours is the whole prompt.
            prompt_tokens: self.input.saturating_add(self.cache_read).saturating_add(self.cache_creation),
            cached_tokens: self.cache_read,
            completion_tokens: self.output,
            cache_creation_tokens: self.cache_creation,
            estimated: false,
        }
    }
}

#[derive(Debug)]
enum Block {
    Text,
    ToolUse {
        id: String,
        name: String,
        /// `input` of `content_block_start` (`{}` in streams), used when no `partial_json` follows.
        start_input: Option<Value>,
        json: String,
        done: bool,
    },
    /// `thinking`, `redacted_thinking`, server tool blocks: not part of the turn we return.
    Other,
}

/// Every event type in one flat shape, dispatched on `type` by hand: serde's internally tagged
/// enums buffer each event into an intermediate tree first, which made parsing several times slower.
#[derive(Deserialize)]
struct EventWire<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    message: Option<MessageStartWire>,
    #[serde(default)]
    content_block: Option<Value>,
    #[serde(default, borrow)]
    delta: Option<DeltaWire<'a>>,
    #[serde(default)]
    usage: Option<UsageWire>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct MessageStartWire {
    #[serde(default)]
    usage: Option<UsageWire>,
}

/// `content_block_delta`'s delta (`text_delta`, `input_json_delta`, and the `thinking_delta`,
/// `signature_delta`, `citations_delta` kinds that carry nothing for the returned turn) and
/// `message_delta`'s (`stop_reason`).
#[derive(Deserialize)]
struct DeltaWire<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    partial_json: Option<Cow<'a, str>>,
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    #[default]
    Waiting,
    /// `message_start` seen.
    Started,
    /// `message_stop` seen.
    Stopped,
}

/// Assembles one streamed Messages turn from its SSE events.
#[derive(Debug, Default)]
pub struct AnthropicStreamAssembler {
    content: String,
    /// Content blocks by their `index`.
    blocks: Vec<Option<Block>>,
    usage: UsageParts,
    stop_reason: Option<String>,
    phase: Phase,
    first_token: bool,
    /// Nobody listens to `TextDelta`s: skip building them (one allocation per event).
    no_text_deltas: bool,
}

impl AnthropicStreamAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// An assembler that sends no [`StreamEvent::TextDelta`]s (the text still accumulates).
    pub fn without_text_deltas() -> Self {
        Self { no_text_deltas: true, ..Self::default() }
    }

    /// `message_stop` was received.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Stopped
    }

    /// Consumes one SSE event. The event's type is read from the JSON `type` field, which Anthropic
    /// always sends and which equals the SSE `event:` name.
    pub fn push_event(&mut self, event: &SseEvent, out: &mut Vec<StreamEvent>) -> Result<(), BackendError> {
        self.push_data(&event.data, out)
    }

    pub fn push_data(&mut self, data: &str, out: &mut Vec<StreamEvent>) -> Result<(), BackendError> {
        let data = data.trim_ascii();
        if data.is_empty() {
            return Ok(());
        }
        let event: EventWire = serde_json::from_str(data).map_err(|e| {
            BackendError::Protocol(format!("malformed Anthropic stream event ({e}): {}", clip(data, 200)))
        })?;
        let index = || {
            let index = event
                .index
                .ok_or_else(|| BackendError::Protocol(format!("Anthropic {} event without index", event.kind)))?;
            stream_index(index, "Anthropic content block")
        };
        match event.kind.as_ref() {
            "message_start" => {
                if self.phase == Phase::Waiting {
                    self.phase = Phase::Started;
                }
                if let Some(u) = event.message.as_ref().and_then(|m| m.usage.as_ref()) {
                    self.usage.merge(u);
                }
            }
            "content_block_start" => {
                let index = index()?;
                let content_block = event.content_block.as_ref().unwrap_or(&Value::Null);
                let block = match content_block.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let text = content_block.get("text").and_then(Value::as_str).unwrap_or("");
                        self.push_text(text, out);
                        Block::Text
                    }
                    Some("tool_use") => {
                        self.mark_first_token(out);
                        let field = |k: &str| content_block.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                        Block::ToolUse {
                            id: field("id"),
                            name: field("name"),
                            start_input: content_block.get("input").cloned(),
                            json: String::new(),
                            done: false,
                        }
                    }
                    _ => Block::Other,
                };
                // `index` is bounded by `stream_index`: the vector grows to at most that.
                if self.blocks.len() <= index {
                    self.blocks.resize_with(index.saturating_add(1), || None);
                }
                if let Some(slot) = self.blocks.get_mut(index) {
                    *slot = Some(block);
                }
            }
            "content_block_delta" => {
                let index = index()?;
                let Some(delta) = &event.delta else {
                    return Err(BackendError::Protocol("Anthropic content_block_delta event without delta".into()));
                };
                match (delta.kind.as_deref(), &delta.text, &delta.partial_json) {
                    (Some("text_delta"), Some(text), _) => self.push_text(text, out),
                    (Some("input_json_delta"), _, Some(partial)) => match self.blocks.get_mut(index) {
                        Some(Some(Block::ToolUse { json, .. })) => json.push_str(partial),
                        _ => {
                            return Err(BackendError::Protocol(format!(
                                "input_json_delta for content block {index}, which is not an open tool_use block"
                            )))
                        }
                    },
                    _ => {}
                }
            }
            "content_block_stop" => {
                let index = index()?;
                if let Some(Some(Block::ToolUse { id, name, start_input, json, done })) = self.blocks.get_mut(index) {
                    if !*done {
                        *done = true;
                        out.push(StreamEvent::ToolCallReady(tool_call(id, name, start_input.as_ref(), json)));
                    }
                }
            }
            "message_delta" => {
                if let Some(reason) = event.delta.and_then(|d| d.stop_reason) {
                    self.stop_reason = Some(reason);
                }
                if let Some(u) = &event.usage {
                    self.usage.merge(u);
                }
            }
            "message_stop" => self.phase = Phase::Stopped,
            "error" => return Err(error_from_object(event.error.as_ref().unwrap_or(&Value::Null), None)),
            // `ping`, and event types added after this was written.
            _ => {}
        }
        Ok(())
    }

    fn push_text(&mut self, text: &str, out: &mut Vec<StreamEvent>) {
        if text.is_empty() {
            return;
        }
        self.mark_first_token(out);
        self.content.push_str(text);
        if !self.no_text_deltas {
            out.push(StreamEvent::TextDelta(text.to_owned()));
        }
    }

    fn mark_first_token(&mut self, out: &mut Vec<StreamEvent>) {
        if !self.first_token {
            self.first_token = true;
            out.push(StreamEvent::FirstToken);
        }
    }

    /// Ends the turn. Without `message_stop` the stream was cut: a retryable
    /// [`BackendError::Protocol`].
    pub fn finish(self, end: StreamEnd) -> Result<ChatResponse, BackendError> {
        if self.phase != Phase::Stopped {
            let how = if end == StreamEnd::Truncated { "in the middle of an event" } else { "between events" };
            let what = if self.phase == Phase::Started { "before message_stop" } else { "before message_start" };
            return Err(BackendError::Protocol(format!(
                "Anthropic stream ended {how} {what} ({} bytes of text received)",
                self.content.len()
            )));
        }
        let tool_calls = self
            .blocks
            .iter()
            .filter_map(|b| match b {
                Some(Block::ToolUse { id, name, start_input, json, .. }) => {
                    Some(tool_call(id, name, start_input.as_ref(), json))
                }
                _ => None,
            })
            .collect();
        Ok(ChatResponse {
            content: self.content,
            tool_calls,
            usage: self.usage.to_usage(),
            finish_reason: map_stop_reason(self.stop_reason.as_deref()),
            ttft: None,
        })
    }
}

fn tool_call(id: &str, name: &str, start_input: Option<&Value>, json: &str) -> ToolCall {
    let arguments = if json.trim().is_empty() {
        // A tool with no parameters streams no `partial_json`; its input is the start block's `{}`.
        start_input.map_or_else(|| "{}".to_owned(), Value::to_string)
    } else {
        json.to_owned()
    };
    ToolCall { id: id.to_owned(), name: name.to_owned(), arguments }
}

/// A non-streamed Messages response body.
pub fn parse_message(body: &str) -> Result<ChatResponse, BackendError> {
    #[derive(Deserialize)]
    struct MessageWire {
        #[serde(rename = "type", default)]
        kind: Option<String>,
        #[serde(default)]
        content: Vec<Value>,
        #[serde(default)]
        stop_reason: Option<String>,
        #[serde(default)]
        usage: Option<UsageWire>,
        #[serde(default)]
        error: Option<Value>,
    }
    let m: MessageWire = serde_json::from_str(body)
        .map_err(|e| BackendError::Protocol(format!("malformed Anthropic message body ({e}): {}", clip(body, 200))))?;
    if m.kind.as_deref() == Some("error") || m.error.is_some() {
        let whole: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        return Err(error_from_object(&whole, None));
    }
    let mut content = String::new();
    let mut tool_calls = Vec::new();
    for (i, block) in m.content.iter().enumerate() {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => content.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => {
                let id = block.get("id").and_then(Value::as_str);
                let name = block.get("name").and_then(Value::as_str);
                let (Some(id), Some(name)) = (id, name) else {
                    return Err(BackendError::Protocol(format!("content[{i}] tool_use block without id or name")));
                };
                let arguments = block.get("input").map_or_else(|| "{}".to_owned(), Value::to_string);
                tool_calls.push(ToolCall { id: id.to_owned(), name: name.to_owned(), arguments });
            }
            _ => {}
        }
    }
    let mut usage = UsageParts::default();
    if let Some(u) = &m.usage {
        usage.merge(u);
    }
    Ok(ChatResponse {
        content,
        tool_calls,
        usage: usage.to_usage(),
        finish_reason: map_stop_reason(m.stop_reason.as_deref()),
        ttft: None,
    })
}

impl crate::stream::sse::SseTurn for AnthropicStreamAssembler {
    fn push_event(&mut self, event: &SseEvent, out: &mut Vec<StreamEvent>) -> Result<(), BackendError> {
        AnthropicStreamAssembler::push_event(self, event, out)
    }

    fn finish(self, end: StreamEnd) -> Result<ChatResponse, BackendError> {
        AnthropicStreamAssembler::finish(self, end)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::arithmetic_side_effects)]
    use super::*;
    use crate::stream::sse::SseParser;

    fn run(text: &str) -> (Vec<StreamEvent>, Result<ChatResponse, BackendError>) {
        let mut sse = SseParser::new();
        let mut asm = AnthropicStreamAssembler::new();
        let mut out = Vec::new();
        for ev in sse.feed(text.as_bytes()).unwrap() {
            if let Err(e) = asm.push_event(&ev, &mut out) {
                return (out, Err(e));
            }
        }
        let end = sse.finish();
        (out, asm.finish(end))
    }

    #[test]
    fn text_stream_with_cache_usage() {
        let text = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude\",\"stop_reason\":null,\"usage\":{\"input_tokens\":10,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":2000,\"output_tokens\":1}}}\n\n\
            event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
            event: ping\ndata: {\"type\": \"ping\"}\n\n\
            event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n\
            event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
            event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":7}}\n\n\
            event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let (events, resp) = run(text);
        assert_eq!(events, vec![StreamEvent::FirstToken, StreamEvent::TextDelta("Hi".into())]);
        let resp = resp.unwrap();
        assert_eq!(resp.content, "Hi");
        assert_eq!(resp.finish_reason, "length");
        assert_eq!(
            resp.usage,
            Usage {
                prompt_tokens: 2110,
                cached_tokens: 2000,
                completion_tokens: 7,
                cache_creation_tokens: 100,
                estimated: false
            }
        );
    }

    #[test]
    fn without_text_deltas_still_assembles_the_text() {
        let text = "data: {\"type\":\"message_start\",\"message\":{}}\n\n\
            data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"a\"}}\n\n\
            data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"b\"}}\n\n\
            data: {\"type\":\"message_stop\"}\n\n";
        let mut sse = SseParser::new();
        let mut asm = AnthropicStreamAssembler::without_text_deltas();
        let mut out = Vec::new();
        for ev in sse.feed(text.as_bytes()).unwrap() {
            asm.push_event(&ev, &mut out).unwrap();
        }
        assert_eq!(out, vec![StreamEvent::FirstToken]);
        assert_eq!(asm.finish(sse.finish()).unwrap().content, "ab");
    }

    #[test]
    fn tool_without_parameters_gets_its_start_input() {
        let text = "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3}}}\n\n\
            data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"now\",\"input\":{}}}\n\n\
            data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\"}}\n\n\
            data: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
            data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":5}}\n\n\
            data: {\"type\":\"message_stop\"}\n\n";
        let (events, resp) = run(text);
        let call = ToolCall { id: "toolu_1".into(), name: "now".into(), arguments: "{}".into() };
        assert_eq!(events, vec![StreamEvent::FirstToken, StreamEvent::ToolCallReady(call.clone())]);
        let resp = resp.unwrap();
        assert_eq!(resp.tool_calls, vec![call]);
        assert_eq!(resp.finish_reason, "tool_calls");
    }

    #[test]
    fn cut_stream_is_a_retryable_protocol_error() {
        let text = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{}}\n\n\
            event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"par";
        let err = run(text).1.unwrap_err();
        assert!(matches!(&err, BackendError::Protocol(m) if m.contains("middle of an event")), "{err}");
        assert!(err.retryable());
    }

    #[test]
    fn error_types_map_to_kinds() {
        let e = |t: &str, s: Option<u16>| {
            error_from_object(&serde_json::json!({"type":"error","error":{"type":t,"message":"m"}}), s)
        };
        assert_eq!(e("overloaded_error", None), BackendError::Overloaded("m".into()));
        assert_eq!(e("overloaded_error", Some(529)), BackendError::Overloaded("m".into()));
        assert_eq!(e("api_error", None), BackendError::Server { status: 500, message: "m".into() });
        assert_eq!(e("rate_limit_error", Some(429)), BackendError::RateLimited { status: 429, retry_after: None });
        assert_eq!(e("invalid_request_error", Some(400)), BackendError::Rejected { status: 400, message: "m".into() });
        assert_eq!(e("authentication_error", Some(401)), BackendError::Auth { status: 401, message: "m".into() });
        assert_eq!(e("something_new", Some(418)), BackendError::Rejected { status: 418, message: "m".into() });
        assert!(e("something_new", None).retryable());
    }

    #[test]
    fn non_streamed_message() {
        let body = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude",
            "content":[{"type":"thinking","thinking":"hmm","signature":"x"},{"type":"text","text":"Let me check."},
                       {"type":"tool_use","id":"toolu_9","name":"get_weather","input":{"city":"Paris"}}],
            "stop_reason":"tool_use","stop_sequence":null,
            "usage":{"input_tokens":50,"cache_read_input_tokens":1000,"cache_creation_input_tokens":0,"output_tokens":20}}"#;
        let r = parse_message(body).unwrap();
        assert_eq!(r.content, "Let me check.");
        assert_eq!(r.tool_calls[0].arguments, r#"{"city":"Paris"}"#);
        assert_eq!(r.finish_reason, "tool_calls");
        assert_eq!(r.usage.prompt_tokens, 1050);
        assert_eq!(r.usage.cached_tokens, 1000);
        let err = parse_message(r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#);
        assert_eq!(err.unwrap_err(), BackendError::Overloaded("Overloaded".into()));
    }
}
