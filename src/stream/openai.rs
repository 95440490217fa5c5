//! `OpenAI` chat-completion chunks -> deltas -> one assembled turn, with the quirks of the servers
//! that speak the format: `content: null`, content as a list of parts, legacy `choices[].text`,
//! tool-call deltas by `index` (`SGLang` sends `arguments` as a JSON object instead of a string),
//! usage only in the final chunk or not at all, `prompt_tokens_details: null`, `[DONE]`, an error
//! object in the middle of a stream, and NVIDIA Dynamo's `tool_call_dispatch` events.
//!
//! Chunks are deserialised into borrowed structs rather than `serde_json::Value`: text deltas
//! without escapes are never copied before they are appended to the turn.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::sse::{SseEvent, StreamEnd};
use crate::conversation::{BackendError, ChatResponse, StreamEvent, ToolCall, Usage};
use crate::limits::MAX_TOOL_CALLS;

/// `content` as servers send it: a string, `null`, or a list of parts (`[{"type":"text","text":..}]`).
#[derive(Debug, Default)]
struct Content<'a>(Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for Content<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Content<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, null or a list of content parts")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Content(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Content(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Content(Some(Cow::Owned(v))))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Content(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Content(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                #[derive(Deserialize)]
                struct Part<'a> {
                    #[serde(default, borrow, rename = "type")]
                    kind: Option<Cow<'a, str>>,
                    #[serde(default, borrow)]
                    text: Option<Cow<'a, str>>,
                }
                let mut text = String::new();
                while let Some(part) = seq.next_element::<Part>()? {
                    if part.kind.as_deref().is_none_or(|k| k == "text" || k == "output_text") {
                        text.push_str(part.text.as_deref().unwrap_or_default());
                    }
                }
                Ok(Content(Some(Cow::Owned(text))))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// Tool-call `arguments`: a JSON text (the `OpenAI` format) or, from `SGLang`, the JSON value itself.
#[derive(Debug, Default)]
struct Arguments<'a>(Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for Arguments<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Arguments<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON string or object")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Arguments(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Arguments(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Arguments(Some(Cow::Owned(v))))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Arguments(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Arguments(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let value = Value::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Arguments(Some(Cow::Owned(value.to_string()))))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                let value = Value::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                Ok(Arguments(Some(Cow::Owned(value.to_string()))))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

#[derive(Debug, Deserialize)]
struct FunctionWire<'a> {
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    arguments: Arguments<'a>,
}

#[derive(Debug, Deserialize)]
struct ToolCallWire<'a> {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    function: Option<FunctionWire<'a>>,
}

#[derive(Debug, Default, Deserialize)]
struct MessageWire<'a> {
    #[serde(default, borrow)]
    content: Content<'a>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<ToolCallWire<'a>>>,
}

#[derive(Debug, Deserialize)]
struct ChoiceWire<'a> {
    #[serde(default)]
    index: u32,
    #[serde(default, borrow)]
    delta: Option<MessageWire<'a>>,
    #[serde(default, borrow)]
    message: Option<MessageWire<'a>>,
    /// Legacy completions-style `choices[].text`.
    #[serde(default, borrow)]
    text: Content<'a>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
    /// A choice's own usage, where a server gives one per prompt of a list.
    #[serde(default)]
    usage: Option<UsageWire>,
}

#[derive(Debug, Default, Deserialize)]
struct CachedWire {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct UsageWire {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<CachedWire>,
}

impl UsageWire {
    pub(crate) fn to_usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens.unwrap_or(0),
            cached_tokens: self.prompt_tokens_details.as_ref().and_then(|d| d.cached_tokens).unwrap_or(0),
            completion_tokens: self.completion_tokens.unwrap_or(0),
            cache_creation_tokens: 0,
            estimated: false,
        }
    }
}

#[derive(Debug, Deserialize)]
struct ChunkWire<'a> {
    #[serde(default, borrow)]
    choices: Vec<ChoiceWire<'a>>,
    #[serde(default)]
    usage: Option<UsageWire>,
    #[serde(default)]
    error: Option<Value>,
    /// vLLM before its error envelope: `{"object":"error","message":..,"code":..}`.
    #[serde(default, borrow)]
    object: Option<Cow<'a, str>>,
}

/// A tool call being assembled from deltas.
#[derive(Debug)]
struct PartialCall {
    index: Option<u32>,
    id: String,
    name: String,
    arguments: String,
    announced: bool,
}

impl PartialCall {
    fn to_call(&self) -> ToolCall {
        ToolCall { id: self.id.clone(), name: self.name.clone(), arguments: self.arguments.clone() }
    }
}

/// Assembles one streamed chat turn. Feed it SSE events (or chunk JSON texts); it pushes
/// [`StreamEvent`]s as they become known and yields the [`ChatResponse`] at the end.
#[derive(Debug, Default)]
pub struct ChatStreamAssembler {
    content: String,
    calls: Vec<PartialCall>,
    usage: Option<Usage>,
    finish_reason: Option<String>,
    done: bool,
    first_token: bool,
    /// Ids already announced through Dynamo `tool_call_dispatch`.
    dispatched: HashSet<String>,
    /// Skip `TextDelta` events (nobody listens): saves a copy of every delta.
    quiet_text: bool,
}

impl ChatStreamAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// An assembler that emits `FirstToken` and `ToolCallReady` but no `TextDelta` events.
    pub fn without_text_deltas() -> Self {
        Self { quiet_text: true, ..Self::default() }
    }

    /// `[DONE]` was received.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Consumes one SSE event. Dynamo's `tool_call_dispatch` events announce a complete call ahead
    /// of the chunk that carries it; `error` events carry a server failure.
    pub fn push_event(&mut self, event: &SseEvent, out: &mut Vec<StreamEvent>) -> Result<(), BackendError> {
        match event.event.as_deref() {
            None | Some("message" | "") => self.push_data(&event.data, out),
            Some("tool_call_dispatch") => self.push_dispatch(&event.data, out),
            Some("error") => Err(error_event(&event.data)),
            // Other named events (Dynamo's `reasoning_dispatch`, keep-alives) carry nothing for the turn.
            Some(_) => Ok(()),
        }
    }

    /// Consumes the `data` of one chunk: chunk JSON or `[DONE]`.
    pub fn push_data(&mut self, data: &str, out: &mut Vec<StreamEvent>) -> Result<(), BackendError> {
        let data = data.trim_ascii();
        if data == "[DONE]" {
            self.done = true;
            self.announce_pending(out);
            return Ok(());
        }
        if data.is_empty() {
            return Ok(());
        }
        let chunk: ChunkWire = serde_json::from_str(data).map_err(|e| bad_json("stream chunk", &e, data))?;
        if let Some(err) = chunk.error {
            return Err(error_object(&err));
        }
        if chunk.object.as_deref() == Some("error") {
            let whole: Value = serde_json::from_str(data).map_err(|e| bad_json("stream chunk", &e, data))?;
            return Err(error_object(&whole));
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage.to_usage());
        }
        for choice in chunk.choices {
            // Only the first choice makes the turn (n = 1 is what we ask for).
            if choice.index != 0 {
                continue;
            }
            if let Some(text) = choice.text.0 {
                self.push_text(&text, out);
            }
            if let Some(delta) = choice.delta.or(choice.message) {
                if let Some(text) = delta.content.0 {
                    self.push_text(&text, out);
                }
                for call in delta.tool_calls.unwrap_or_default() {
                    self.push_tool_delta(call, out)?;
                }
            }
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(reason.into_owned());
                self.announce_pending(out);
            }
        }
        Ok(())
    }

    fn push_text(&mut self, text: &str, out: &mut Vec<StreamEvent>) {
        if text.is_empty() {
            return;
        }
        self.mark_first_token(out);
        self.content.push_str(text);
        if !self.quiet_text {
            out.push(StreamEvent::TextDelta(text.to_owned()));
        }
    }

    fn mark_first_token(&mut self, out: &mut Vec<StreamEvent>) {
        if !self.first_token {
            self.first_token = true;
            out.push(StreamEvent::FirstToken);
        }
    }

    fn push_tool_delta(&mut self, call: ToolCallWire, out: &mut Vec<StreamEvent>) -> Result<(), BackendError> {
        self.mark_first_token(out);
        let position = match call.index {
            Some(index) => self.calls.iter().position(|c| c.index == Some(index)),
            // Servers that omit `index` send one call's deltas in a row; a new id starts a new call.
            None => match (&call.id, self.calls.last()) {
                (Some(id), Some(last)) if !last.id.is_empty() && last.id != **id => None,
                (_, Some(_)) => self.calls.len().checked_sub(1),
                (_, None) => None,
            },
        };
        let position = if let Some(position) = position {
            position
        } else {
            // The index is only a key here, but each new one is a call kept and searched.
            if self.calls.len() >= MAX_TOOL_CALLS {
                return Err(too_many_calls());
            }
            // A new call starts: every earlier call is complete.
            self.announce_pending(out);
            self.calls.push(PartialCall {
                index: call.index,
                id: String::new(),
                name: String::new(),
                arguments: String::new(),
                announced: false,
            });
            self.calls.len().saturating_sub(1)
        };
        let Some(partial) = self.calls.get_mut(position) else { return Ok(()) };
        if let Some(id) = call.id.filter(|id| !id.is_empty()) {
            partial.id = id.into_owned();
        }
        if let Some(function) = call.function {
            if let Some(name) = function.name.filter(|n| !n.is_empty()) {
                partial.name = name.into_owned();
            }
            if let Some(args) = function.arguments.0 {
                partial.arguments.push_str(&args);
            }
        }
        Ok(())
    }

    fn push_dispatch(&mut self, data: &str, out: &mut Vec<StreamEvent>) -> Result<(), BackendError> {
        #[derive(Deserialize)]
        struct Dispatch<'a> {
            #[serde(default)]
            choice_index: u32,
            #[serde(borrow)]
            tool_call: ToolCallWire<'a>,
        }
        let dispatch: Dispatch =
            serde_json::from_str(data).map_err(|e| bad_json("tool_call_dispatch event", &e, data))?;
        if dispatch.choice_index != 0 {
            return Ok(());
        }
        let call = dispatch.tool_call;
        let (Some(id), Some(function)) = (call.id, call.function) else {
            return Err(BackendError::Protocol("tool_call_dispatch event without tool_call.id or function".into()));
        };
        let id = id.into_owned();
        if !self.dispatched.insert(id.clone()) {
            return Ok(());
        }
        self.mark_first_token(out);
        out.push(StreamEvent::ToolCallReady(ToolCall {
            id,
            name: function.name.map(Cow::into_owned).unwrap_or_default(),
            arguments: function.arguments.0.map(Cow::into_owned).unwrap_or_default(),
        }));
        Ok(())
    }

    fn announce_pending(&mut self, out: &mut Vec<StreamEvent>) {
        for call in &mut self.calls {
            if !call.announced {
                call.announced = true;
                if !self.dispatched.contains(&call.id) {
                    out.push(StreamEvent::ToolCallReady(call.to_call()));
                }
            }
        }
    }

    /// Ends the turn. A stream that stopped before both `[DONE]` and a `finish_reason` was cut:
    /// that is a retryable [`BackendError::Protocol`].
    pub fn finish(self, end: StreamEnd) -> Result<ChatResponse, BackendError> {
        if !self.done && self.finish_reason.is_none() {
            let how = if end == StreamEnd::Truncated { "in the middle of an event" } else { "between events" };
            return Err(BackendError::Protocol(format!(
                "stream ended {how} before finish_reason or [DONE] ({} bytes of content received)",
                self.content.len()
            )));
        }
        let tool_calls: Vec<ToolCall> = self.calls.iter().map(PartialCall::to_call).collect();
        let finish_reason = normalise_finish_reason(self.finish_reason.as_deref(), !tool_calls.is_empty());
        Ok(ChatResponse {
            content: self.content,
            tool_calls,
            usage: self.usage.unwrap_or_default(),
            finish_reason,
            ttft: None,
        })
    }
}

/// Maps servers' finish reasons onto `OpenAI`'s words. A turn with tool calls that says `stop` (some
/// servers' tool parsers do) is reported as `tool_calls`, which is what the turn did.
pub fn normalise_finish_reason(reason: Option<&str>, has_tool_calls: bool) -> String {
    let reason = match reason {
        Some("tool_calls" | "function_call" | "tool_use") => "tool_calls",
        Some("length" | "max_tokens" | "model_length") => "length",
        Some("stop" | "eos" | "end_turn" | "stop_sequence") | None => "stop",
        Some(other) => other,
    };
    if has_tool_calls && reason == "stop" {
        "tool_calls".to_owned()
    } else {
        reason.to_owned()
    }
}

#[derive(Debug, Deserialize)]
struct CompletionWire<'a> {
    #[serde(default, borrow)]
    choices: Vec<ChoiceWire<'a>>,
    #[serde(default)]
    usage: Option<UsageWire>,
    #[serde(default)]
    error: Option<Value>,
    #[serde(default, borrow)]
    object: Option<Cow<'a, str>>,
}

fn parse_completion_body(body: &str) -> Result<CompletionWire<'_>, BackendError> {
    let parsed: CompletionWire = serde_json::from_str(body).map_err(|e| bad_json("response body", &e, body))?;
    if let Some(err) = &parsed.error {
        return Err(error_object(err));
    }
    if parsed.object.as_deref() == Some("error") {
        let whole: Value = serde_json::from_str(body).map_err(|e| bad_json("response body", &e, body))?;
        return Err(error_object(&whole));
    }
    Ok(parsed)
}

/// Parses a non-streamed `/v1/chat/completions` response body, with the same quirks as the stream.
pub fn parse_chat_completion(body: &str) -> Result<ChatResponse, BackendError> {
    let parsed = parse_completion_body(body)?;
    let choice = parsed
        .choices
        .into_iter()
        .find(|c| c.index == 0)
        .ok_or_else(|| BackendError::Protocol("response body has no choices[0]".into()))?;
    let mut content = choice.text.0.map(Cow::into_owned).unwrap_or_default();
    let mut tool_calls = Vec::new();
    if let Some(message) = choice.message.or(choice.delta) {
        if let Some(text) = message.content.0 {
            content.push_str(&text);
        }
        for (i, call) in message.tool_calls.unwrap_or_default().into_iter().enumerate() {
            let function = call
                .function
                .ok_or_else(|| BackendError::Protocol(format!("choices[0].message.tool_calls[{i}] has no function")))?;
            tool_calls.push(ToolCall {
                id: call.id.map(Cow::into_owned).unwrap_or_default(),
                name: function.name.map(Cow::into_owned).unwrap_or_default(),
                arguments: function.arguments.0.map(Cow::into_owned).unwrap_or_default(),
            });
        }
    }
    let finish_reason = normalise_finish_reason(choice.finish_reason.as_deref(), !tool_calls.is_empty());
    Ok(ChatResponse {
        content,
        tool_calls,
        usage: parsed.usage.map(|u| u.to_usage()).unwrap_or_default(),
        finish_reason,
        ttft: None,
    })
}

/// Parses a `/v1/completions` response to a prompt list: one text per prompt, by `choices[].index`.
/// Servers report usage for the whole request only, so the totals go with the first entry and the
/// others carry zero: summing the entries gives the request's usage.
/// One prompt's answer from a `/completions` request with a list of prompts.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    /// Normalised as [`normalise_finish_reason`] does.
    pub finish_reason: String,
    /// The server's own figures where it gave them per choice (`choices[].usage`); otherwise a
    /// share of the request's total, marked `estimated`.
    pub usage: Usage,
}

/// How a server reports usage for a request with several prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListUsage {
    /// One `usage` for the whole request (vLLM, SGLang, the simulator).
    Total,
    /// `usage` counts the first prompt only (llama.cpp's server).
    FirstPrompt,
}

/// Parses a `/completions` body answering `prompt_chars.len()` prompts (each prompt's length in
/// bytes, the weights by which a total is shared out); choices are matched by `index`.
pub fn parse_completions(
    body: &str,
    prompt_chars: &[usize],
    list_usage: ListUsage,
) -> Result<Vec<Completion>, BackendError> {
    let prompts = prompt_chars.len();
    let parsed = parse_completion_body(body)?;
    let mut slots: Vec<Option<(String, String, Option<Usage>)>> = vec![None; prompts];
    for choice in parsed.choices {
        let index = choice.index as usize;
        let slot = slots.get_mut(index).ok_or_else(|| {
            BackendError::Protocol(format!("choices[].index {index} out of range for {prompts} prompts"))
        })?;
        let reason = normalise_finish_reason(choice.finish_reason.as_deref(), false);
        *slot = Some((
            choice.text.0.map(Cow::into_owned).unwrap_or_default(),
            reason,
            choice.usage.as_ref().map(UsageWire::to_usage),
        ));
    }
    let mut answers = Vec::with_capacity(prompts);
    for (i, slot) in slots.into_iter().enumerate() {
        answers.push(slot.ok_or_else(|| BackendError::Protocol(format!("no choice with index {i} in the response")))?);
    }
    let total = parsed.usage.map(|u| u.to_usage()).unwrap_or_default();
    let usages = if answers.iter().all(|(_, _, u)| u.is_some()) {
        answers.iter().map(|(_, _, u)| u.unwrap_or_default()).collect()
    } else {
        let completion_chars: Vec<usize> = answers.iter().map(|(t, _, _)| t.len()).collect();
        share_usage(total, prompt_chars, &completion_chars, list_usage)
    };
    Ok(answers
        .into_iter()
        .zip(usages)
        .map(|((text, finish_reason, _), usage)| Completion { text, finish_reason, usage })
        .collect())
}

/// Each prompt's part of a request's usage. One prompt keeps the server's figures. With a total
/// for the whole request, prompt (and cached) tokens are shared by prompt length and completion
/// tokens by answer length, exactly summing to the total; with the first prompt's figures only,
/// the first keeps them and the others are estimated at the first's tokens per byte.
fn share_usage(total: Usage, prompt_chars: &[usize], completion_chars: &[usize], list_usage: ListUsage) -> Vec<Usage> {
    if prompt_chars.len() <= 1 {
        return vec![total; prompt_chars.len()];
    }
    match list_usage {
        ListUsage::Total => {
            let prompt = share(total.prompt_tokens, prompt_chars);
            let cached = share(total.cached_tokens, prompt_chars);
            let completion = share(total.completion_tokens, completion_chars);
            prompt
                .into_iter()
                .zip(cached)
                .zip(completion)
                .map(|((prompt_tokens, cached), completion_tokens)| Usage {
                    prompt_tokens,
                    cached_tokens: cached.min(prompt_tokens),
                    completion_tokens,
                    cache_creation_tokens: 0,
                    estimated: true,
                })
                .collect()
        }
        ListUsage::FirstPrompt => {
            let rate = |tokens: u64, chars: usize| if chars == 0 { 0.25 } else { tokens as f64 / chars as f64 };
            let (p0, c0) = (prompt_chars.first().copied().unwrap_or(0), completion_chars.first().copied().unwrap_or(0));
            let prompt_rate = rate(total.prompt_tokens, p0);
            let completion_rate = rate(total.completion_tokens, c0);
            prompt_chars
                .iter()
                .zip(completion_chars)
                .enumerate()
                .map(|(i, (&p, &c))| {
                    if i == 0 {
                        return total;
                    }
                    Usage {
                        prompt_tokens: (p as f64 * prompt_rate).round() as u64,
                        cached_tokens: 0,
                        completion_tokens: (c as f64 * completion_rate).round().max(1.0) as u64,
                        cache_creation_tokens: 0,
                        estimated: true,
                    }
                })
                .collect()
        }
    }
}

/// `total` split in proportion to `weights` (equal parts when they are all zero), by largest
/// remainder so the parts sum to `total`.
fn share(total: u64, weights: &[usize]) -> Vec<u64> {
    let sum: u128 = weights.iter().map(|&w| w as u128).sum();
    let n = weights.len().max(1) as u128;
    // u64 x usize fits u128: no step below overflows.
    let exact: Vec<(u64, u128)> = weights
        .iter()
        .map(|&w| {
            let (num, den) =
                if sum == 0 { (u128::from(total), n) } else { (u128::from(total).saturating_mul(w as u128), sum) };
            (u64::try_from(num.checked_div(den).unwrap_or(0)).unwrap_or(u64::MAX), num.checked_rem(den).unwrap_or(0))
        })
        .collect();
    let mut parts: Vec<u64> = exact.iter().map(|(q, _)| *q).collect();
    let mut left = total.saturating_sub(parts.iter().fold(0u64, |a, &b| a.saturating_add(b)));
    let mut order: Vec<(usize, u128)> = exact.iter().map(|(_, r)| *r).enumerate().collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (i, _) in order {
        if left == 0 {
            break;
        }
        if let Some(part) = parts.get_mut(i) {
            *part = part.saturating_add(1);
            left = left.saturating_sub(1);
        }
    }
    parts
}

#[cold]
fn bad_json(what: &str, err: &serde_json::Error, data: &str) -> BackendError {
    BackendError::Protocol(format!(
        "invalid JSON in {what} at column {}: {err}; data: {}",
        err.column(),
        clip(data, 200)
    ))
}

fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let end = (0..=max).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
    s.get(..end).unwrap_or_default()
}

/// Maps an error object found in a body or stream (`{"message","type","code"}`, or the envelope
/// around it) onto a [`BackendError`] with the same status rules as an HTTP error.
#[cold]
pub fn error_object(value: &Value) -> BackendError {
    let obj = value.get("error").filter(|e| e.is_object()).unwrap_or(value);
    let message = obj
        .get("message")
        .and_then(Value::as_str)
        .map_or_else(|| clip(&obj.to_string(), 500).to_owned(), |m| clip(m, 500).to_owned());
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or_default();
    let code = obj.get("code").and_then(|c| c.as_u64().or_else(|| c.as_str().and_then(|s| s.parse().ok())));
    let status = code.and_then(|c| u16::try_from(c).ok()).filter(|c| (400..600).contains(c));
    match (status, kind) {
        (_, "overloaded_error" | "server_overloaded") | (Some(503), _) => BackendError::Overloaded(message),
        (Some(429), _) | (_, "rate_limit_error" | "rate_limit_exceeded") => {
            BackendError::RateLimited { status: 429, retry_after: None }
        }
        (Some(s @ (401 | 403)), _) => BackendError::Auth { status: s, message },
        (Some(s), _) if s < 500 => BackendError::rejected(s, message),
        // OpenAI's `{"code": "context_length_exceeded"}` carries no status number.
        (None, _) if obj.get("code").and_then(Value::as_str) == Some("context_length_exceeded") => {
            BackendError::rejected_with_code(400, message, Some("context_length_exceeded"))
        }
        // An error in the middle of a stream with no status is the engine failing: retryable.
        (s, _) => BackendError::Server { status: s.unwrap_or(500), message },
    }
}

#[cold]
fn error_event(data: &str) -> BackendError {
    match serde_json::from_str::<Value>(data) {
        Ok(v) if v.is_object() => error_object(&v),
        _ => BackendError::Server { status: 500, message: clip(data, 500).to_owned() },
    }
}

impl crate::stream::sse::SseTurn for ChatStreamAssembler {
    fn push_event(&mut self, event: &SseEvent, out: &mut Vec<StreamEvent>) -> Result<(), BackendError> {
        ChatStreamAssembler::push_event(self, event, out)
    }

    fn finish(self, end: StreamEnd) -> Result<ChatResponse, BackendError> {
        ChatStreamAssembler::finish(self, end)
    }
}

#[cold]
fn too_many_calls() -> BackendError {
    BackendError::Protocol(format!("more than {MAX_TOOL_CALLS} tool calls in one turn"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::arithmetic_side_effects)]
    use super::*;

    fn run(chunks: &[&str]) -> (Vec<StreamEvent>, Result<ChatResponse, BackendError>) {
        let mut a = ChatStreamAssembler::new();
        let mut out = Vec::new();
        for c in chunks {
            if let Err(e) = a.push_data(c, &mut out) {
                return (out, Err(e));
            }
        }
        (out, a.finish(StreamEnd::Clean))
    }

    #[test]
    fn text_deltas_null_content_and_parts() {
        let (events, resp) = run(&[
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":[{"type":"text","text":"lo"}]}}]}"#,
            r#"{"choices":[{"index":0,"text":"!"}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"prompt_tokens_details":null}}"#,
            "[DONE]",
        ]);
        let resp = resp.unwrap();
        assert_eq!(resp.content, "Hello!");
        assert_eq!(resp.finish_reason, "stop");
        assert_eq!(resp.usage, Usage { prompt_tokens: 5, completion_tokens: 3, ..Usage::default() });
        assert_eq!(events[0], StreamEvent::FirstToken);
        assert_eq!(events.iter().filter(|e| matches!(e, StreamEvent::FirstToken)).count(), 1);
        assert_eq!(events[1], StreamEvent::TextDelta("Hel".into()));
    }

    #[test]
    fn tool_calls_are_announced_when_the_next_starts_and_at_finish() {
        let (events, resp) = run(&[
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"a","type":"function","function":{"name":"f","arguments":""}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"x\":"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"b","function":{"name":"g","arguments":"{}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
        ]);
        let ready: Vec<_> = events.iter().filter(|e| matches!(e, StreamEvent::ToolCallReady(_))).collect();
        assert_eq!(ready.len(), 2);
        // Call a is announced before call b's delta is even processed further.
        let pos_a = events.iter().position(|e| matches!(e, StreamEvent::ToolCallReady(c) if c.id == "a")).unwrap();
        assert_eq!(
            events[pos_a],
            StreamEvent::ToolCallReady(ToolCall { id: "a".into(), name: "f".into(), arguments: "{\"x\":1}".into() })
        );
        let resp = resp.unwrap();
        assert_eq!(resp.tool_calls.len(), 2);
        assert_eq!(resp.finish_reason, "tool_calls");
        assert_eq!(resp.usage, Usage::default());
    }

    #[test]
    fn sglang_object_arguments_are_serialised() {
        let (_, resp) = run(&[
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"f","arguments":{"q":"a b"}}}]},"finish_reason":"tool_calls"}]}"#,
        ]);
        let resp = resp.unwrap();
        assert_eq!(resp.tool_calls[0].arguments, r#"{"q":"a b"}"#);
    }

    #[test]
    fn cut_stream_is_a_retryable_protocol_error() {
        let (_, resp) = run(&[r#"{"choices":[{"index":0,"delta":{"content":"par"}}]}"#]);
        let err = resp.unwrap_err();
        assert!(matches!(err, BackendError::Protocol(_)));
        assert!(err.retryable());
    }

    #[test]
    fn error_object_mid_stream() {
        let (_, resp) = run(&[
            r#"{"choices":[{"index":0,"delta":{"content":"x"}}]}"#,
            r#"{"error":{"message":"engine died","type":"InternalServerError","code":500}}"#,
        ]);
        assert_eq!(resp.unwrap_err(), BackendError::Server { status: 500, message: "engine died".into() });
        let (_, resp) = run(&[r#"{"object":"error","message":"bad","type":"BadRequestError","code":400}"#]);
        assert_eq!(resp.unwrap_err(), BackendError::Rejected { status: 400, message: "bad".into() });
    }

    #[test]
    fn dynamo_dispatch_announces_once() {
        let mut a = ChatStreamAssembler::new();
        let mut out = Vec::new();
        let dispatch = SseEvent {
            event: Some("tool_call_dispatch".into()),
            data: r#"{"choice_index":0,"tool_call":{"index":0,"id":"d1","type":"function","function":{"name":"f","arguments":"{}"}}}"#.into(),
            id: None,
        };
        a.push_event(&dispatch, &mut out).unwrap();
        assert!(matches!(&out[..], [StreamEvent::FirstToken, StreamEvent::ToolCallReady(c)] if c.id == "d1"));
        let chunk = r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"d1","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"tool_calls"}]}"#;
        a.push_data(chunk, &mut out).unwrap();
        a.push_data("[DONE]", &mut out).unwrap();
        assert_eq!(out.iter().filter(|e| matches!(e, StreamEvent::ToolCallReady(_))).count(), 1);
        assert_eq!(a.finish(StreamEnd::Clean).unwrap().tool_calls.len(), 1);
    }

    #[test]
    fn non_streamed_body_with_quirks() {
        let body = r#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":null,
            "tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":{"a":1}}}]},
            "finish_reason":"tool_calls"}],
            "usage":{"prompt_tokens":10,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":8}}}"#;
        let resp = parse_chat_completion(body).unwrap();
        assert_eq!(resp.content, "");
        assert_eq!(
            resp.tool_calls,
            vec![ToolCall { id: "t".into(), name: "f".into(), arguments: r#"{"a":1}"#.into() }]
        );
        assert_eq!(resp.usage.cached_tokens, 8);
        let err = parse_chat_completion(r#"{"error":{"message":"nope","code":429}}"#).unwrap_err();
        assert!(err.is_throttle());
    }

    #[test]
    fn completions_by_index() {
        let body = r#"{"choices":[{"index":1,"text":"b"},{"index":0,"text":"a"}],"usage":{"prompt_tokens":4,"completion_tokens":2}}"#;
        let out = parse_completions(body, &[1, 3], ListUsage::Total).unwrap();
        assert_eq!(out[0].text, "a");
        assert_eq!(out[1].text, "b");
        assert_eq!((out[0].usage.prompt_tokens, out[1].usage.prompt_tokens), (1, 3));
        assert_eq!(out[0].usage.completion_tokens + out[1].usage.completion_tokens, 2);
        assert!(out.iter().all(|c| c.usage.estimated));
        assert!(parse_completions(body, &[1, 1, 1], ListUsage::Total).is_err());
    }

    #[test]
    fn completions_usage_per_choice_first_prompt_or_shared() {
        // Per choice where the server gives it: the server's figures, not estimated.
        let body = r#"{"choices":[{"index":0,"text":"ab","finish_reason":"length","usage":{"prompt_tokens":5,"completion_tokens":2}},
            {"index":1,"text":"c","usage":{"prompt_tokens":7,"completion_tokens":1}}]}"#;
        let out = parse_completions(body, &[10, 10], ListUsage::Total).unwrap();
        assert_eq!((out[0].usage.prompt_tokens, out[1].usage.prompt_tokens), (5, 7));
        assert!(!out[0].usage.estimated && !out[1].usage.estimated);
        assert_eq!((out[0].finish_reason.as_str(), out[1].finish_reason.as_str()), ("length", "stop"));
        // llama.cpp: usage of the first prompt only; the others at its tokens per byte.
        let body = r#"{"choices":[{"index":0,"text":"abcd"},{"index":1,"text":"abcdefgh"}],"usage":{"prompt_tokens":10,"completion_tokens":2}}"#;
        let out = parse_completions(body, &[40, 80], ListUsage::FirstPrompt).unwrap();
        assert_eq!(
            (out[0].usage.prompt_tokens, out[0].usage.completion_tokens, out[0].usage.estimated),
            (10, 2, false)
        );
        assert_eq!((out[1].usage.prompt_tokens, out[1].usage.completion_tokens, out[1].usage.estimated), (20, 4, true));
        // A total with cached tokens: shares sum to it, cached never above prompt.
        let body = r#"{"choices":[{"index":0,"text":"x"},{"index":1,"text":"y"},{"index":2,"text":"z"}],
            "usage":{"prompt_tokens":100,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":64}}}"#;
        let out = parse_completions(body, &[1, 1, 1], ListUsage::Total).unwrap();
        assert_eq!(out.iter().map(|c| c.usage.prompt_tokens).sum::<u64>(), 100);
        assert_eq!(out.iter().map(|c| c.usage.cached_tokens).sum::<u64>(), 64);
        assert_eq!(out.iter().map(|c| c.usage.completion_tokens).collect::<Vec<_>>(), vec![1, 1, 1]);
    }
}
