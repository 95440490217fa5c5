//! Anthropic Messages API (`POST {base}/v1/messages`, `x-api-key`, `anthropic-version: 2023-06-01`),
//! streamed as SSE or not.

use std::fmt;
use std::time::Instant;

use futures_util::future::BoxFuture;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::call::{arguments_object, estimate, whole_turn, with_call_timeout};
use super::http::{AuthStyle, HttpClient};
use super::url::BackendOptions;
use super::{Backend, BackendError, Capabilities, ChatRequest, ChatResponse, StreamEvent};
use crate::conversation::Role;
use crate::limits::pacer::Ticket;
use crate::secret::Secret;
use crate::stream::anthropic::{parse_message, AnthropicStreamAssembler};

pub const API_VERSION: &str = "2023-06-01";
pub const API_KEY_ENV: &str = "ANTHROPIC_API_KEY";

#[derive(Debug, Clone)]
pub struct AnthropicSettings {
    /// `max_tokens` is required by the API; this is sent when the request gives none.
    pub default_max_tokens: u32,
    /// Mark the system prompt and the tool list (the prefix jobs share) with
    /// `cache_control: {"type": "ephemeral"}`.
    pub prompt_caching: bool,
}

impl Default for AnthropicSettings {
    fn default() -> Self {
        Self { default_max_tokens: 4096, prompt_caching: true }
    }
}

pub struct AnthropicBackend {
    http: HttpClient,
    name: String,
    settings: AnthropicSettings,
}

impl fmt::Debug for AnthropicBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicBackend")
            .field("name", &self.name)
            .field("http", &self.http)
            .field("settings", &self.settings)
            .finish()
    }
}

impl AnthropicBackend {
    /// `base_url` is the API root (`https://api.anthropic.com`); `api_key` falls back to
    /// `ANTHROPIC_API_KEY`, and the options' own `api_key` is used if both are absent.
    pub fn new(base_url: &str, api_key: Option<Secret>, options: &BackendOptions) -> Result<Self, BackendError> {
        Self::with_settings(base_url, api_key, options, AnthropicSettings::default())
    }

    pub fn with_settings(
        base_url: &str,
        api_key: Option<Secret>,
        options: &BackendOptions,
        settings: AnthropicSettings,
    ) -> Result<Self, BackendError> {
        let key = api_key
            .or_else(|| options.api_key.clone())
            .filter(|k| !k.is_empty())
            .or_else(|| Secret::non_empty(std::env::var(API_KEY_ENV).ok()))
            .ok_or_else(|| BackendError::Config(format!("no Anthropic API key: pass api_key or set {API_KEY_ENV}")))?;
        let mut options = options.clone();
        if !options.extra_headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("anthropic-version")) {
            options.extra_headers.push(("anthropic-version".to_owned(), API_VERSION.to_owned()));
        }
        let http = HttpClient::new(base_url, &options, Some(key), AuthStyle::Header("x-api-key"))?;
        let name = format!("anthropic {}", http.base_url());
        // The API's limits are learned from its answers: the first call goes alone.
        http.pacer().probe_first();
        Ok(Self { http, name, settings })
    }

    /// The `/v1/messages` request body.
    pub fn request_body(&self, request: &ChatRequest) -> Result<Value, BackendError> {
        messages_body(request, self.settings.prompt_caching, self.settings.default_max_tokens)
    }

    async fn chat_inner(
        &self,
        request: ChatRequest,
        events: Option<mpsc::UnboundedSender<StreamEvent>>,
        ticket: Ticket,
    ) -> Result<ChatResponse, BackendError> {
        let body = self.request_body(&request)?;
        let started = Instant::now();
        let mut response =
            self.http.send(self.http.post("/v1/messages", &body).ticket(ticket)).await.map_err(overloaded_529)?;
        if !request.stream {
            let (events, deltas) = (events.as_ref(), request.text_deltas);
            return whole_turn(&self.http, response, "Anthropic message", parse_message, events, deltas).await;
        }
        let assembler = if events.is_some() && request.text_deltas {
            AnthropicStreamAssembler::new()
        } else {
            AnthropicStreamAssembler::without_text_deltas()
        };
        self.http.read_sse_turn(&mut response, assembler, events.as_ref(), started).await
    }
}

/// Anthropic's own "overloaded" status, 529, which the shared mapping sees as a plain 5xx.
fn overloaded_529(err: BackendError) -> BackendError {
    match err {
        BackendError::Server { status: 529, message } => BackendError::Overloaded(message),
        other => other,
    }
}

impl Backend for AnthropicBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            streaming: true,
            tools: true,
            // No json_schema response format: the schema goes in the prompt.
            json_schema: false,
            prompt_caching: self.settings.prompt_caching,
            metrics: false,
            agent_hints: false,
            batch_generation: false,
        }
    }

    fn chat(
        &self,
        request: ChatRequest,
        events: Option<mpsc::UnboundedSender<StreamEvent>>,
    ) -> BoxFuture<'_, Result<ChatResponse, BackendError>> {
        Box::pin(async move {
            // Waiting for the rate limit is not part of the call's time limit.
            let ticket = self.http.admit(estimate(&request, Some(self.settings.default_max_tokens))).await;
            with_call_timeout(self.http.request_timeout(), self.chat_inner(request, events, ticket)).await
        })
    }
}

/// The Messages request body: system prompt as top-level text blocks, tool calls as `tool_use`
/// blocks, tool results as `tool_result` blocks in user turns (consecutive ones merged, since the
/// API wants user and assistant turns to alternate).
pub fn messages_body(
    request: &ChatRequest,
    prompt_caching: bool,
    default_max_tokens: u32,
) -> Result<Value, BackendError> {
    let mut system: Vec<Value> = Vec::new();
    let mut turns: Vec<(Role, Vec<Value>)> = Vec::new();
    for (i, m) in request.messages.iter().enumerate() {
        match m.role {
            Role::System => {
                if !m.content.is_empty() {
                    system.push(json!({ "type": "text", "text": m.content }));
                }
            }
            // The API rejects empty text blocks.
            Role::User => {
                if !m.content.is_empty() {
                    push_blocks(&mut turns, Role::User, vec![json!({ "type": "text", "text": m.content })]);
                }
            }
            Role::Assistant => {
                let mut blocks = Vec::new();
                if !m.content.is_empty() {
                    blocks.push(json!({ "type": "text", "text": m.content }));
                }
                for call in &m.tool_calls {
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.name,
                        "input": arguments_object(&call.arguments),
                    }));
                }
                if !blocks.is_empty() {
                    push_blocks(&mut turns, Role::Assistant, blocks);
                }
            }
            Role::Tool => {
                let id = m
                    .tool_call_id
                    .as_deref()
                    .ok_or_else(|| BackendError::Config(format!("messages[{i}]: tool message without tool_call_id")))?;
                push_blocks(
                    &mut turns,
                    Role::User,
                    vec![json!({ "type": "tool_result", "tool_use_id": id, "content": m.content })],
                );
            }
        }
    }
    if prompt_caching {
        if let Some(Value::Object(last)) = system.last_mut() {
            last.insert("cache_control".into(), json!({ "type": "ephemeral" }));
        }
    }
    let messages: Vec<Value> = turns
        .into_iter()
        .map(|(role, content)| {
            json!({ "role": if role == Role::Assistant { "assistant" } else { "user" }, "content": content })
        })
        .collect();
    let mut body = Map::new();
    body.insert("model".into(), json!(request.model));
    body.insert("max_tokens".into(), json!(request.max_tokens.unwrap_or(default_max_tokens)));
    if !system.is_empty() {
        body.insert("system".into(), Value::Array(system));
    }
    body.insert("messages".into(), Value::Array(messages));
    if !request.tools.is_empty() {
        let mut tools: Vec<Value> = request
            .tools
            .iter()
            .map(|t| {
                let mut tool = Map::new();
                tool.insert("name".into(), json!(t.name));
                if !t.description.is_empty() {
                    tool.insert("description".into(), json!(t.description));
                }
                tool.insert("input_schema".into(), t.parameters.clone());
                Value::Object(tool)
            })
            .collect();
        if prompt_caching {
            if let Some(Value::Object(last)) = tools.last_mut() {
                last.insert("cache_control".into(), json!({ "type": "ephemeral" }));
            }
        }
        body.insert("tools".into(), Value::Array(tools));
        if let Some(choice) = &request.tool_choice {
            body.insert("tool_choice".into(), tool_choice(choice)?);
        }
    }
    if let Some(t) = request.temperature {
        body.insert("temperature".into(), json!(t));
    }
    if request.stream {
        body.insert("stream".into(), json!(true));
    }
    if let Some(extra) = &request.extra_body {
        // As the anthropic SDK's `extra_body`: top-level fields of the Messages request
        // (`top_k`, `metadata`, `thinking`, ...), replacing those built here.
        super::call::merge_extra_body(&mut body, extra);
    }
    Ok(Value::Object(body))
}

fn push_blocks(turns: &mut Vec<(Role, Vec<Value>)>, role: Role, blocks: Vec<Value>) {
    match turns.last_mut() {
        Some((last, content)) if *last == role => content.extend(blocks),
        _ => turns.push((role, blocks)),
    }
}

/// OpenAI-style `tool_choice` ("auto", "required", "none", `{"type":"function","function":{"name"}}`)
/// as Anthropic's `{"type": "auto" | "any" | "none" | "tool", "name"}`. An Anthropic-shaped value
/// is passed through.
pub fn tool_choice(choice: &Value) -> Result<Value, BackendError> {
    match choice {
        Value::String(s) => match s.as_str() {
            "auto" => Ok(json!({ "type": "auto" })),
            "required" | "any" => Ok(json!({ "type": "any" })),
            "none" => Ok(json!({ "type": "none" })),
            other => Err(BackendError::Config(format!("tool_choice {other:?} is not auto, required, any or none"))),
        },
        Value::Object(o) => {
            if let Some(name) = o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
                return Ok(json!({ "type": "tool", "name": name }));
            }
            match o.get("type").and_then(Value::as_str) {
                Some("auto" | "any" | "none" | "tool") => Ok(choice.clone()),
                _ => Err(BackendError::Config(format!("tool_choice {choice} is neither OpenAI- nor Anthropic-shaped"))),
            }
        }
        other => Err(BackendError::Config(format!("tool_choice {other} is not a string or an object"))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tool_choice_mapping() {
        assert_eq!(tool_choice(&json!("auto")).unwrap(), json!({"type":"auto"}));
        assert_eq!(tool_choice(&json!("required")).unwrap(), json!({"type":"any"}));
        assert_eq!(tool_choice(&json!("none")).unwrap(), json!({"type":"none"}));
        assert_eq!(
            tool_choice(&json!({"type":"function","function":{"name":"search"}})).unwrap(),
            json!({"type":"tool","name":"search"})
        );
        assert_eq!(tool_choice(&json!({"type":"tool","name":"x"})).unwrap(), json!({"type":"tool","name":"x"}));
        assert!(tool_choice(&json!("sometimes")).is_err());
        assert!(tool_choice(&json!({"type":"function"})).is_err());
    }

    #[test]
    fn status_529_is_overloaded() {
        let e = overloaded_529(BackendError::Server { status: 529, message: "Overloaded".into() });
        assert_eq!(e, BackendError::Overloaded("Overloaded".into()));
        let e = overloaded_529(BackendError::Server { status: 500, message: "x".into() });
        assert!(matches!(e, BackendError::Server { status: 500, .. }));
    }
}
