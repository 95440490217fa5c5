//! The `OpenAI`-compatible chat backend: one implementation, with the per-server differences
//! (flavours) in request building and capabilities. vLLM, `SGLang`, NVIDIA Dynamo, Ollama's `/v1`
//! endpoint, llama.cpp server, the `OpenAI` API and the simulator all speak it.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::future::BoxFuture;
use serde::ser::{SerializeMap as _, SerializeSeq as _, Serializer};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::call::{estimate, merge_extra_body, whole_turn, with_call_timeout};
use super::http::{AuthStyle, Endpoint, HttpClient};
use super::url::BackendOptions;
use super::{AgentHints, Backend, BackendError, Capabilities, ChatRequest, ChatResponse, StreamEvent};
use crate::conversation::{Message, Role, ToolCall, ToolDef};
use crate::limits::pacer::{Estimate, Ticket};
use crate::stream::openai::{parse_chat_completion, parse_completions, ChatStreamAssembler, Completion, ListUsage};

/// Which server sits behind the `OpenAI`-compatible API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavour {
    OpenAi,
    Vllm,
    Sglang,
    Dynamo,
    /// Ollama's `OpenAI`-compatible endpoint (`/v1`).
    Ollama,
    LlamaCpp,
    /// The built-in simulator, which answers as vLLM does.
    Sim,
    /// Any other server that claims `OpenAI` compatibility: only the common subset is used.
    Generic,
}

impl Flavour {
    pub fn label(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Vllm => "vllm",
            Self::Sglang => "sglang",
            Self::Dynamo => "dynamo",
            Self::Ollama => "ollama-openai",
            Self::LlamaCpp => "llamacpp",
            Self::Sim => "sim",
            Self::Generic => "openai-compatible",
        }
    }

    /// What the server supports. `agent_hints` is whether the caller enabled Dynamo hints.
    pub fn capabilities(self, agent_hints: bool) -> Capabilities {
        use Flavour::{Dynamo, Generic, LlamaCpp, Ollama, OpenAi, Sglang, Sim, Vllm};
        if self == Generic {
            // An unknown server may reject fields it does not know; promise only the common subset.
            return Capabilities { streaming: true, tools: true, ..Capabilities::default() };
        }
        Capabilities {
            streaming: true,
            tools: true,
            json_schema: matches!(self, OpenAi | Vllm | Sglang | Sim | LlamaCpp | Ollama),
            prompt_caching: false,
            metrics: matches!(self, Vllm | Sglang | Sim | Dynamo),
            agent_hints: agent_hints && self == Dynamo,
            batch_generation: matches!(self, Vllm | Sglang | Sim | LlamaCpp),
        }
    }

    fn sends_request_id(self) -> bool {
        matches!(self, Self::Vllm | Self::Sim)
    }
}

pub struct OpenAiBackend {
    flavour: Flavour,
    name: String,
    http: HttpClient,
    /// `{api_base}/chat/completions`, parsed once.
    chat_url: Endpoint,
    agent_hints: bool,
    engine_priority: bool,
    /// The endpoint reads the tool-wait hint: the simulator, or the embedded engine
    /// (`local://`, served as `vllm://...?engine=batchagent`).
    tool_wait_hint: bool,
    prepared: Mutex<Prepared>,
}

/// JSON that every request of a run repeats, serialised once: the tool list (the requests of a run
/// share one `Arc` of it) and the system message (compared by text). Escaping a long system prompt
/// with its schema, and the tools' parameter schemas, on every call was a tenth of a call's CPU.
#[derive(Default)]
struct Prepared {
    tools: Option<(Arc<Vec<ToolDef>>, Box<RawValue>)>,
    system: Option<(String, Box<RawValue>)>,
}

/// The tool list as JSON, serialised again only when a request carries another list.
fn prepared_tools<'c>(
    cache: &'c mut Option<(Arc<Vec<ToolDef>>, Box<RawValue>)>,
    tools: &Arc<Vec<ToolDef>>,
) -> Option<&'c RawValue> {
    if tools.is_empty() {
        return None;
    }
    if cache.as_ref().is_none_or(|(cached, _)| !Arc::ptr_eq(cached, tools)) {
        let json = serde_json::to_string(&WireTools::Typed(tools)).ok()?;
        *cache = Some((tools.clone(), RawValue::from_string(json).ok()?));
    }
    cache.as_ref().map(|(_, json)| &**json)
}

/// A system message as JSON, serialised again only when its text changes.
fn prepared_system<'c>(cache: &'c mut Option<(String, Box<RawValue>)>, message: &Message) -> Option<&'c RawValue> {
    if message.role != Role::System {
        return None;
    }
    if cache.as_ref().is_none_or(|(text, _)| *text != message.content) {
        let json = serde_json::to_string(&WireMessage(message)).ok()?;
        *cache = Some((message.content.clone(), RawValue::from_string(json).ok()?));
    }
    cache.as_ref().map(|(_, json)| &**json)
}

impl std::fmt::Debug for OpenAiBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiBackend")
            .field("flavour", &self.flavour)
            .field("name", &self.name)
            .field("http", &self.http)
            .field("chat_url", &self.chat_url)
            .field("agent_hints", &self.agent_hints)
            .field("engine_priority", &self.engine_priority)
            .finish_non_exhaustive()
    }
}

impl OpenAiBackend {
    /// Sends the tool-wait hint, which the endpoint reads (the embedded engine behind a
    /// `vllm://` URL).
    #[must_use]
    pub fn with_tool_wait_hint(mut self) -> Self {
        self.tool_wait_hint = true;
        self
    }

    /// `base_url` is the server (`http://host:8000`, `/v1` is added) or the API root when it has a
    /// path (`https://api.openai.com/v1`, `http://host/custom/v1`, used as given).
    pub fn new(flavour: Flavour, base_url: &str, options: &BackendOptions) -> Result<Self, BackendError> {
        let base_url = base_url.trim_end_matches('/');
        let after_scheme = base_url.split_once("://").map_or(base_url, |(_, rest)| rest);
        let api_base = if after_scheme.contains('/') { base_url.to_owned() } else { format!("{base_url}/v1") };
        let key = options.api_key.clone().filter(|k| !k.is_empty());
        let http = HttpClient::new(&api_base, options, key, AuthStyle::Bearer)?;
        let chat_url = http.endpoint("/chat/completions")?;
        if flavour == Flavour::OpenAi {
            // A hosted API's limits are learned from its answers: the first call goes alone.
            http.pacer().probe_first();
        }
        Ok(Self {
            flavour,
            name: format!("{} {api_base}", flavour.label()),
            http,
            chat_url,
            agent_hints: options.agent_hints,
            engine_priority: options.engine_priority,
            tool_wait_hint: flavour == Flavour::Sim,
            prepared: Mutex::default(),
        })
    }

    pub fn flavour(&self) -> Flavour {
        self.flavour
    }

    /// The JSON body of a `/chat/completions` request, as a value (the bytes sent are
    /// [`request_bytes`](Self::request_bytes)).
    pub fn request_body(&self, request: &ChatRequest) -> Value {
        let mut body = serde_json::to_value(self.wire_request(request)).unwrap_or(Value::Null);
        if let (Some(extra), Some(fields)) = (&request.extra_body, body.as_object_mut()) {
            merge_extra_body(fields, extra);
        }
        body
    }

    /// The JSON body of a `/chat/completions` request, serialised straight from the request: no
    /// intermediate `Value` tree, so no copy of the conversation, the tool schemas or the system
    /// prompt per call (building that tree was the largest share of the client's CPU per call).
    pub fn request_bytes(&self, request: &ChatRequest) -> Vec<u8> {
        let mut wire = self.wire_request(request);
        // Serialising borrowed strings and `Value`s into a Vec cannot fail.
        let Ok(mut prepared) = self.prepared.lock() else { return serde_json::to_vec(&wire).unwrap_or_default() };
        let Prepared { tools, system } = &mut *prepared;
        if let Some(json) = prepared_tools(tools, &request.tools) {
            wire.tools = Some(WireTools::Raw(json));
        }
        wire.messages.system = request.messages.first().and_then(|m| prepared_system(system, m));
        if let Some(extra) = &request.extra_body {
            // Keys of `extra_body` replace the built fields: through a `Value`, only when set.
            let mut body = serde_json::to_value(&wire).unwrap_or(Value::Null);
            if let Some(fields) = body.as_object_mut() {
                merge_extra_body(fields, extra);
            }
            return serde_json::to_vec(&body).unwrap_or_default();
        }
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    fn wire_request<'a>(&self, request: &'a ChatRequest) -> WireRequest<'a> {
        let caps = self.capabilities();
        let response_format = match (&request.response_schema, caps.json_schema) {
            (Some(schema), true) => Some(
                json!({"type": "json_schema", "json_schema": {"name": "output", "schema": **schema, "strict": true}}),
            ),
            _ => None,
        };
        let nvext = match (&request.hints, caps.agent_hints) {
            (Some(hints), true) => {
                // Field names from Dynamo's agent-hints request schema: `priority`, `osl` (expected
                // output tokens) and `speculative_prefill` (warm the next turn's prefix).
                let mut agent_hints = Map::new();
                agent_hints.insert("priority".into(), Value::from(hints.priority));
                if let Some(osl) = hints.expected_output_tokens {
                    agent_hints.insert("osl".into(), Value::from(osl));
                }
                agent_hints.insert("speculative_prefill".into(), Value::Bool(hints.remaining_turns > 0));
                Some(json!({ "agent_hints": agent_hints }))
            }
            _ => None,
        };
        // vLLM's `priority`: lower is served first (and preempted last) under
        // `--scheduling-policy priority`; the remaining turns are the semaphore's own order.
        let priority = match &request.hints {
            Some(hints) if self.engine_priority && self.flavour == Flavour::Vllm => Some(hints.remaining_turns),
            _ => None,
        };
        // The tool-wait hint: only the simulator and the embedded engine read it (see the README's
        // engine hints); vLLM, SGLang and Dynamo have no KV retention field in their request schemas.
        let batchagent = match &request.hints {
            Some(AgentHints { agent, tool_wait_s: Some(wait), next_call_s, .. }) if self.tool_wait_hint => {
                Some(match next_call_s {
                    Some(gap) => json!({"agent": agent, "tool_wait_s": wait, "next_call_s": gap}),
                    None => json!({"agent": agent, "tool_wait_s": wait}),
                })
            }
            _ => None,
        };
        // OpenAI deprecated `max_tokens` for chat and its reasoning models reject it.
        let (max_tokens, max_completion_tokens) =
            if self.flavour == Flavour::OpenAi { (None, request.max_tokens) } else { (request.max_tokens, None) };
        WireRequest {
            model: &request.model,
            messages: WireMessages { messages: &request.messages, system: None },
            tools: (!request.tools.is_empty()).then(|| WireTools::Typed(&request.tools)),
            tool_choice: request.tool_choice.as_ref(),
            response_format,
            max_tokens,
            max_completion_tokens,
            temperature: request.temperature,
            stream: request.stream,
            stream_options: request.stream.then_some(StreamOptions { include_usage: true }),
            nvext,
            priority,
            batchagent,
        }
    }

    /// Several prompts in one `/completions` request; one [`Completion`] per prompt, in order, with
    /// its usage as the server gave it per prompt or else shared out of the total (marked
    /// `estimated`; see [`parse_completions`]).
    pub async fn complete_batch(
        &self,
        model: &str,
        prompts: &[String],
        max_tokens: Option<u32>,
        temperature: Option<f64>,
        stop: &[&str],
    ) -> Result<Vec<Completion>, BackendError> {
        if !self.capabilities().batch_generation {
            return Err(BackendError::Config(format!("{} does not take a list of prompts", self.name)));
        }
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let mut body = json!({"model": model, "prompt": prompts, "stream": false});
        if let Some(fields) = body.as_object_mut() {
            if let Some(max) = max_tokens {
                fields.insert("max_tokens".into(), Value::from(max));
            }
            if let Some(t) = temperature {
                fields.insert("temperature".into(), Value::from(t));
            }
            if !stop.is_empty() {
                fields.insert("stop".into(), Value::from(stop.to_vec()));
            }
        }
        let chars: Vec<usize> = prompts.iter().map(String::len).collect();
        let mut cost = Estimate::from_text_len(chars.iter().sum(), max_tokens);
        cost.output = cost.output.saturating_mul(prompts.len() as u64);
        let list_usage = if self.flavour == Flavour::LlamaCpp { ListUsage::FirstPrompt } else { ListUsage::Total };
        let ticket = self.http.admit(cost).await;
        let call = async {
            let response = self.http.send(self.http.post("/completions", &body).ticket(ticket)).await?;
            let bytes = self.http.read_body(response).await?;
            let text = std::str::from_utf8(&bytes)
                .map_err(|e| BackendError::Protocol(format!("completions body is not UTF-8: {e}")))?;
            parse_completions(text, &chars, list_usage).map_err(|e| self.http.redact_error(e))
        };
        with_call_timeout(self.http.request_timeout(), call).await
    }

    async fn chat_inner(
        &self,
        request: ChatRequest,
        events: Option<mpsc::UnboundedSender<StreamEvent>>,
        ticket: Ticket,
    ) -> Result<ChatResponse, BackendError> {
        let mut post = self.http.post_to(&self.chat_url, self.request_bytes(&request)).ticket(ticket);
        if self.flavour.sends_request_id() && !request.request_id.is_empty() {
            post = post.header("X-Request-Id", request.request_id.as_str());
        }
        let started = Instant::now();
        let mut response = self.http.send(post).await?;
        let is_json = response.header("content-type").is_some_and(|v| v.starts_with("application/json"));
        // A server may answer a streamed request with one JSON body (an error, or stream ignored).
        if !request.stream || is_json {
            let (events, deltas) = (events.as_ref(), request.text_deltas);
            return whole_turn(&self.http, response, "chat completion", parse_chat_completion, events, deltas).await;
        }
        let assembler = if events.is_some() && request.text_deltas {
            ChatStreamAssembler::new()
        } else {
            ChatStreamAssembler::without_text_deltas()
        };
        self.http.read_sse_turn(&mut response, assembler, events.as_ref(), started).await
    }
}

impl Backend for OpenAiBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        self.flavour.capabilities(self.agent_hints)
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

pub(crate) fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

/// A vLLM `/tokenize` body for a chat (`TokenizeChatRequest`): the messages and tools exactly as a
/// `/chat/completions` request sends them, with the generation prompt the model call adds.
pub(crate) fn tokenize_chat_body(model: &str, messages: &[Message], tools: &[ToolDef]) -> Vec<u8> {
    #[derive(Serialize)]
    struct TokenizeChat<'a> {
        model: &'a str,
        messages: WireMessages<'a>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tools: Option<WireTools<'a>>,
        add_generation_prompt: bool,
    }
    let body = TokenizeChat {
        model,
        messages: WireMessages { messages, system: None },
        tools: (!tools.is_empty()).then_some(WireTools::Typed(tools)),
        add_generation_prompt: true,
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

/// A `/chat/completions` body borrowing from its [`ChatRequest`].
#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: WireMessages<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<WireTools<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nvext: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    batchagent: Option<Value>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

struct WireMessages<'a> {
    messages: &'a [Message],
    /// The first message (the system message) already serialised.
    system: Option<&'a RawValue>,
}

impl Serialize for WireMessages<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.messages.len()))?;
        let rest = match self.system {
            Some(json) => {
                seq.serialize_element(json)?;
                self.messages.get(1..).unwrap_or_default()
            }
            None => self.messages,
        };
        for message in rest {
            seq.serialize_element(&WireMessage(message))?;
        }
        seq.end()
    }
}

struct WireMessage<'a>(&'a Message);

impl Serialize for WireMessage<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let message = self.0;
        let calls = message.role == Role::Assistant && !message.tool_calls.is_empty();
        let call_id = if message.role == Role::Tool { message.tool_call_id.as_deref() } else { None };
        let mut map = serializer.serialize_map(Some(2 + usize::from(calls) + usize::from(call_id.is_some())))?;
        map.serialize_entry("role", role_name(message.role))?;
        // Always a string, even next to tool calls: some servers reject `content: null` in requests.
        map.serialize_entry("content", &message.content)?;
        if calls {
            map.serialize_entry("tool_calls", &WireCalls(&message.tool_calls))?;
        }
        if let Some(id) = call_id {
            map.serialize_entry("tool_call_id", id)?;
        }
        map.end()
    }
}

struct WireCalls<'a>(&'a [ToolCall]);

impl Serialize for WireCalls<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|c| WireCall {
            id: &c.id,
            kind: "function",
            function: WireFunction { name: &c.name, arguments: &c.arguments },
        }))
    }
}

#[derive(Serialize)]
struct WireCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireFunction<'a>,
}

#[derive(Serialize)]
struct WireFunction<'a> {
    name: &'a str,
    arguments: &'a str,
}

enum WireTools<'a> {
    Typed(&'a [ToolDef]),
    /// Already serialised (see [`prepared_tools`]).
    Raw(&'a RawValue),
}

impl Serialize for WireTools<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Typed(tools) => serializer.collect_seq(tools.iter().map(|t| WireTool {
                kind: "function",
                function: WireToolFunction { name: &t.name, description: &t.description, parameters: &t.parameters },
            })),
            Self::Raw(json) => json.serialize(serializer),
        }
    }
}

#[derive(Serialize)]
struct WireTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireToolFunction<'a>,
}

#[derive(Serialize)]
struct WireToolFunction<'a> {
    name: &'a str,
    description: &'a str,
    parameters: &'a Value,
}

pub(crate) fn tool_json(tool: &ToolDef) -> Value {
    json!({
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters},
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::arithmetic_side_effects)]
    use std::sync::Arc;

    use super::*;
    use crate::backends::AgentHints;
    use crate::conversation::ToolCall;

    fn request() -> ChatRequest {
        let call = ToolCall { id: "c1".into(), name: "read".into(), arguments: "{\"p\":1}".into() };
        ChatRequest {
            model: "m".into(),
            messages: Arc::new(vec![
                Message::system("s"),
                Message::user("u"),
                Message::assistant("", vec![call.clone()]),
                Message::tool_result(&call, "r"),
            ]),
            tools: Arc::new(vec![ToolDef {
                name: "read".into(),
                description: "d".into(),
                parameters: json!({"type": "object"}),
            }]),
            tool_choice: None,
            response_schema: Some(Arc::new(json!({"type": "object"}))),
            max_tokens: Some(64),
            temperature: Some(0.0),
            request_id: "job-1-t0-a0".into(),
            stream: true,
            hints: Some(AgentHints {
                priority: 3,
                remaining_turns: 1,
                expected_output_tokens: Some(200),
                ..AgentHints::default()
            }),
            text_deltas: true,
            extra_body: None,
        }
    }

    fn backend(flavour: Flavour, hints: bool) -> OpenAiBackend {
        let options = BackendOptions { agent_hints: hints, ..BackendOptions::default() };
        OpenAiBackend::new(flavour, "http://127.0.0.1:1", &options).unwrap()
    }

    #[test]
    fn vllm_body_has_the_openai_shape() {
        let body = backend(Flavour::Vllm, false).request_body(&request());
        assert_eq!(body["messages"][2]["tool_calls"][0]["type"], "function");
        assert_eq!(body["messages"][2]["tool_calls"][0]["function"]["arguments"], "{\"p\":1}");
        assert_eq!(body["messages"][2]["content"], "");
        assert_eq!(body["messages"][3], json!({"role": "tool", "content": "r", "tool_call_id": "c1"}));
        assert_eq!(body["tools"][0]["function"]["name"], "read");
        assert_eq!(body["response_format"]["json_schema"]["name"], "output");
        assert_eq!(body["response_format"]["json_schema"]["strict"], true);
        assert_eq!(body["max_tokens"], 64);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert!(body.get("nvext").is_none());
    }

    #[test]
    fn sent_bytes_match_the_body_with_the_repeated_parts_prepared_once() {
        let backend = backend(Flavour::Vllm, false);
        let first = request();
        let as_sent = |r: &ChatRequest| serde_json::from_slice::<Value>(&backend.request_bytes(r)).unwrap();
        assert_eq!(as_sent(&first), backend.request_body(&first));
        // The same tool list and system text again (served from the prepared JSON) ...
        let mut second = request();
        second.tools = first.tools.clone();
        assert_eq!(as_sent(&second), backend.request_body(&second));
        // ... then another system text and another tool list, which must not be.
        let mut third = request();
        Arc::make_mut(&mut third.messages)[0] = Message::system("another \"quoted\" prompt");
        third.tools =
            Arc::new(vec![ToolDef { name: "other".into(), description: String::new(), parameters: json!({}) }]);
        let sent = as_sent(&third);
        assert_eq!(sent, backend.request_body(&third));
        assert_eq!(sent["messages"][0]["content"], "another \"quoted\" prompt");
        assert_eq!(sent["tools"][0]["function"]["name"], "other");
        // No system message first: nothing prepared stands in for the first message.
        let mut fourth = request();
        Arc::make_mut(&mut fourth.messages).remove(0);
        assert_eq!(as_sent(&fourth), backend.request_body(&fourth));
    }

    #[test]
    fn extra_body_replaces_built_fields_in_the_bytes_sent() {
        let backend = backend(Flavour::Vllm, false);
        let mut request = request();
        let extra = json!({"max_tokens": 7, "top_k": 20, "chat_template_kwargs": {"enable_thinking": false}});
        request.extra_body = extra.as_object().cloned().map(Arc::new);
        let sent = serde_json::from_slice::<Value>(&backend.request_bytes(&request)).unwrap();
        assert_eq!(sent, backend.request_body(&request));
        assert_eq!(sent["max_tokens"], 7);
        assert_eq!(sent["top_k"], 20);
        assert_eq!(sent["chat_template_kwargs"]["enable_thinking"], false);
        assert_eq!(sent["tools"][0]["function"]["name"], "read", "the rest of the body is unchanged");
    }

    #[test]
    fn openai_uses_max_completion_tokens() {
        let body = backend(Flavour::OpenAi, false).request_body(&request());
        assert_eq!(body["max_completion_tokens"], 64);
        assert!(body.get("max_tokens").is_none());
    }

    #[test]
    fn dynamo_hints_only_when_enabled() {
        let body = backend(Flavour::Dynamo, true).request_body(&request());
        assert_eq!(body["nvext"]["agent_hints"], json!({"priority": 3, "osl": 200, "speculative_prefill": true}));
        assert!(body.get("response_format").is_none(), "dynamo is not promised json_schema");
        assert!(backend(Flavour::Dynamo, false).request_body(&request()).get("nvext").is_none());
    }

    #[test]
    fn vllm_priority_only_when_asked_and_only_to_vllm() {
        let with = |flavour: Flavour, on: bool| {
            let options = BackendOptions { engine_priority: on, ..BackendOptions::default() };
            OpenAiBackend::new(flavour, "http://127.0.0.1:1", &options).unwrap().request_body(&request())
        };
        // One turn left: served before agents with more to go.
        assert_eq!(with(Flavour::Vllm, true)["priority"], 1);
        assert!(with(Flavour::Vllm, false).get("priority").is_none());
        for other in [Flavour::Sglang, Flavour::OpenAi, Flavour::Dynamo, Flavour::Generic] {
            assert!(with(other, true).get("priority").is_none(), "{other:?}");
        }
        let mut plain = request();
        plain.hints = None;
        let options = BackendOptions { engine_priority: true, ..BackendOptions::default() };
        let backend = OpenAiBackend::new(Flavour::Vllm, "http://127.0.0.1:1", &options).unwrap();
        assert!(backend.request_body(&plain).get("priority").is_none());
    }

    #[test]
    fn the_tool_wait_hint_goes_to_the_simulator_and_the_embedded_engine_only() {
        let mut hinted = request();
        if let Some(hints) = hinted.hints.as_mut() {
            hints.agent = "job-7".to_owned();
            hints.tool_wait_s = Some(1.5);
        }
        let body = backend(Flavour::Sim, false).request_body(&hinted);
        assert_eq!(body["batchagent"], json!({"agent": "job-7", "tool_wait_s": 1.5}));
        for other in [Flavour::Vllm, Flavour::Sglang, Flavour::OpenAi, Flavour::Dynamo, Flavour::Generic] {
            assert!(backend(other, true).request_body(&hinted).get("batchagent").is_none(), "{other:?}");
        }
        // The embedded engine, spoken to as vLLM, reads it too.
        let engine = backend(Flavour::Vllm, false).with_tool_wait_hint();
        assert_eq!(engine.request_body(&hinted)["batchagent"], json!({"agent": "job-7", "tool_wait_s": 1.5}));
        // The gap to the agent's next call, once one was seen, goes with it.
        if let Some(hints) = hinted.hints.as_mut() {
            hints.next_call_s = Some(2.5);
        }
        let body = backend(Flavour::Sim, false).request_body(&hinted);
        assert_eq!(body["batchagent"], json!({"agent": "job-7", "tool_wait_s": 1.5, "next_call_s": 2.5}));
        // No wait seen yet (or an agent without tools): nothing to say.
        assert!(backend(Flavour::Sim, false).request_body(&request()).get("batchagent").is_none());
    }

    #[test]
    fn api_base_gets_v1_only_without_a_path() {
        assert_eq!(backend(Flavour::Vllm, false).name(), "vllm http://127.0.0.1:1/v1");
        let b = OpenAiBackend::new(Flavour::OpenAi, "https://api.openai.com/v1", &BackendOptions::default()).unwrap();
        assert_eq!(b.name(), "openai https://api.openai.com/v1");
    }

    #[test]
    fn capabilities_per_flavour() {
        assert!(Flavour::Sglang.capabilities(false).batch_generation);
        assert!(!Flavour::OpenAi.capabilities(false).batch_generation);
        assert!(Flavour::Dynamo.capabilities(false).metrics);
        assert!(!Flavour::Generic.capabilities(true).json_schema);
        assert!(Flavour::Ollama.capabilities(false).json_schema);
    }
}
