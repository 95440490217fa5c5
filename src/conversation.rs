//! Provider-neutral messages, tool calls and usage counters, and the protocol types every layer
//! shares (a model call's answer, its stream events, its failure). Every backend translates to and
//! from these; the stream parsers produce them; the scheduler, the journal and the Python layer
//! only ever see these.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

/// A tool call made by the model. `arguments` is the raw JSON text the model produced (it may be
/// malformed: the scheduler turns that into an error message the model sees).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    /// Text content. Empty for an assistant turn that only calls tools.
    #[serde(default)]
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For `Role::Tool`: the id of the call this message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For `Role::Tool`: the name of the tool that produced it (Ollama and Bedrock want it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn system(content: impl Into<String>) -> Self {
        Self::text(Role::System, content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::text(Role::User, content)
    }

    pub fn assistant(content: impl Into<String>, tool_calls: Vec<ToolCall>) -> Self {
        Self { role: Role::Assistant, content: content.into(), tool_calls, tool_call_id: None, name: None }
    }

    pub fn tool_result(call: &ToolCall, content: impl Into<String>) -> Self {
        Self {
            role: Role::Tool,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: Some(call.id.clone()),
            name: Some(call.name.clone()),
        }
    }

    fn text(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into(), tool_calls: Vec::new(), tool_call_id: None, name: None }
    }
}

/// A tool offered to the model: name, description and the JSON Schema of its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolDef {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub parameters: serde_json::Value,
}

/// Token counters. `cached_tokens` is the part of `prompt_tokens` served from the engine's prefix
/// cache (OpenAI `prompt_tokens_details.cached_tokens`, Anthropic `cache_read_input_tokens`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    /// Anthropic `cache_creation_input_tokens` / Bedrock `cacheWriteInputTokens`.
    #[serde(default)]
    pub cache_creation_tokens: u64,
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, rhs: Self) {
        // The counts are a server's numbers: an absurd one saturates rather than panics.
        self.prompt_tokens = self.prompt_tokens.saturating_add(rhs.prompt_tokens);
        self.cached_tokens = self.cached_tokens.saturating_add(rhs.cached_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(rhs.completion_tokens);
        self.cache_creation_tokens = self.cache_creation_tokens.saturating_add(rhs.cache_creation_tokens);
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// The first token arrived (time to first token is measured here).
    FirstToken,
    TextDelta(String),
    /// A tool call whose arguments are complete in the stream, before the turn ends.
    ToolCallReady(ToolCall),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatResponse {
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
    pub usage: Usage,
    /// `stop`, `length`, `tool_calls`, ... as the server said it, normalised to OpenAI's words.
    pub finish_reason: String,
    pub ttft: Option<Duration>,
}

/// Which time limit ended a call: each is a setting of its own, and the error names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    /// No connection to the server within `connect_timeout`.
    Connect,
    /// No byte of the answer for `idle_timeout` (a stalled stream).
    Idle,
    /// The whole model call, answer included, took longer than `call_timeout`.
    Call,
    /// The whole job, every turn and tool call, took longer than `agent_timeout`.
    Agent,
}

impl TimeoutKind {
    /// The setting that bounds it.
    pub fn setting(self) -> &'static str {
        match self {
            Self::Connect => "connect_timeout",
            Self::Idle => "idle_timeout",
            Self::Call => "call_timeout",
            Self::Agent => "agent_timeout",
        }
    }

    fn meaning(self) -> &'static str {
        match self {
            Self::Connect => "no connection to the server within it",
            Self::Idle => "no byte from the server within it",
            Self::Call => "the model call did not finish within it",
            Self::Agent => "the job did not finish within it",
        }
    }
}

/// A failed model call. `retryable()` decides whether the scheduler tries again.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum BackendError {
    #[error("rate limited (HTTP {status}){}", retry_after.map(|d| format!(", retry after {:.1}s", d.as_secs_f64())).unwrap_or_default())]
    RateLimited { status: u16, retry_after: Option<Duration> },
    #[error("server error HTTP {status}: {message}")]
    Server { status: u16, message: String },
    #[error("engine overloaded: {0}")]
    Overloaded(String),
    #[error("{} ({after:?}) fired: {}", which.setting(), which.meaning())]
    Timeout { which: TimeoutKind, after: Duration },
    #[error("connection failed: {0}")]
    Connection(String),
    #[error("malformed response: {0}")]
    Protocol(String),
    #[error("request rejected HTTP {status}: {message}")]
    Rejected { status: u16, message: String },
    #[error("authentication failed HTTP {status}: {message}")]
    Auth { status: u16, message: String },
    #[error("invalid backend configuration: {0}")]
    Config(String),
}

/// Phrases (lowercase) of 5xx bodies that blame the request rather than the server's state: sent
/// again, the same request fails the same way.
const REQUEST_FAULT_PHRASES: [&str; 6] = [
    // llama.cpp, when a grammar-constrained output fails its own parser (HTTP 500).
    "does not match the expected",
    // llama.cpp, a JSON Schema or grammar it cannot compile.
    "failed to parse grammar",
    "failed to parse json schema",
    "unsupported json schema",
    // OpenAI-style error types and messages some proxies return with a 5xx.
    "invalid_request_error",
    "invalid request",
];

impl BackendError {
    /// A failure that goes away by itself (throttling, a flaky or overloaded server, the network):
    /// worth retrying with backoff. A 5xx whose body says the request is at fault is not.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Server { .. } => !self.request_at_fault(),
            _ => matches!(
                self,
                Self::RateLimited { .. }
                    | Self::Overloaded(_)
                    | Self::Timeout { .. }
                    | Self::Connection(_)
                    | Self::Protocol(_)
            ),
        }
    }

    /// The server refused this request as such (a 4xx other than auth and throttling, or a 5xx
    /// whose body says the request is at fault, as llama.cpp's failed grammar parse does): sending
    /// it again unchanged gives the same answer.
    pub fn request_at_fault(&self) -> bool {
        match self {
            Self::Rejected { .. } => true,
            Self::Server { message, .. } => {
                let message = message.to_ascii_lowercase();
                REQUEST_FAULT_PHRASES.iter().any(|phrase| message.contains(phrase))
            }
            _ => false,
        }
    }

    /// Throttling drives the adaptive concurrency limit down (AIMD).
    pub fn is_throttle(&self) -> bool {
        matches!(self, Self::RateLimited { .. } | Self::Overloaded(_))
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Stable, snake_case name of the error kind, as reported in `Result.error.kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RateLimited { .. } => "rate_limited",
            Self::Server { .. } => "server_error",
            Self::Overloaded(_) => "overloaded",
            Self::Timeout { .. } => "timeout",
            Self::Connection(_) => "connection",
            Self::Protocol(_) => "protocol",
            Self::Rejected { .. } => "rejected",
            Self::Auth { .. } => "auth",
            Self::Config(_) => "config",
        }
    }
}
