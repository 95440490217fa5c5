//! Backends: one trait, one implementation per wire protocol. A backend turns a provider-neutral
//! [`ChatRequest`] into HTTP and the server's answer (streamed or not) into a [`ChatResponse`],
//! sending [`StreamEvent`]s as they are parsed so the scheduler can start tools early.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::conversation::{Message, ToolCall, ToolDef, Usage};

/// What a backend can do; the scheduler decides what to use from this.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub streaming: bool,
    pub tools: bool,
    /// Constrained decoding against a JSON Schema (`response_format: json_schema`).
    pub json_schema: bool,
    /// Explicit prompt caching markers (Anthropic `cache_control`, Bedrock `cachePoint`).
    pub prompt_caching: bool,
    /// A Prometheus `/metrics` endpoint with engine queue and prefix-cache figures.
    pub metrics: bool,
    /// NVIDIA Dynamo `nvext.agent_hints`.
    pub agent_hints: bool,
    /// Several prompts in one `/v1/completions` request.
    pub batch_generation: bool,
}

/// Hints a scheduler can pass to engines that take them (Dynamo `nvext.agent_hints`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentHints {
    /// Higher is more urgent.
    pub priority: i64,
    pub remaining_turns: u32,
    pub expected_output_tokens: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Arc<Vec<Message>>,
    pub tools: Arc<Vec<ToolDef>>,
    /// `None` = the server's default ("auto" when tools are given).
    pub tool_choice: Option<Value>,
    /// Ask for constrained output against this JSON Schema (only if the backend supports it).
    pub response_schema: Option<Arc<Value>>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    /// Stable id of this model call (job id + turn + attempt), sent where the server takes one
    /// (vLLM `X-Request-Id`), so a retried call can be recognised in the server's logs.
    pub request_id: String,
    pub stream: bool,
    pub hints: Option<AgentHints>,
    /// Send [`StreamEvent::TextDelta`]s to the events channel. Off for agents, which only start
    /// tool calls early: building and sending every delta was a third of a streamed call's CPU.
    pub text_deltas: bool,
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

/// A failed model call. `retryable()` decides whether the scheduler tries again.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum BackendError {
    #[error("rate limited (HTTP {status}){}", retry_after.map(|d| format!(", retry after {:.1}s", d.as_secs_f64())).unwrap_or_default())]
    RateLimited { status: u16, retry_after: Option<Duration> },
    #[error("server error HTTP {status}: {message}")]
    Server { status: u16, message: String },
    #[error("engine overloaded: {0}")]
    Overloaded(String),
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
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

impl BackendError {
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. }
                | Self::Server { .. }
                | Self::Overloaded(_)
                | Self::Timeout(_)
                | Self::Connection(_)
                | Self::Protocol(_)
        )
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
            Self::Timeout(_) => "timeout",
            Self::Connection(_) => "connection",
            Self::Protocol(_) => "protocol",
            Self::Rejected { .. } => "rejected",
            Self::Auth { .. } => "auth",
            Self::Config(_) => "config",
        }
    }
}

/// A connection to one inference server (or a fleet of them).
pub trait Backend: Send + Sync {
    /// Human-readable endpoint for logs and reports; never contains credentials.
    fn name(&self) -> &str;

    fn capabilities(&self) -> Capabilities;

    /// Per-endpoint figures (a fleet's routing and health), for reports; `None` for one endpoint.
    fn endpoint_stats(&self) -> Option<serde_json::Value> {
        None
    }

    /// Make one model call. Stream events (if `events` is given) are sent as they are parsed; a
    /// closed receiver is ignored.
    fn chat(
        &self,
        request: ChatRequest,
        events: Option<mpsc::UnboundedSender<StreamEvent>>,
    ) -> BoxFuture<'_, Result<ChatResponse, BackendError>>;
}

pub mod anthropic;
pub mod aws_credentials;
pub mod bedrock;
pub mod cached;
pub mod connect;
pub mod fleet;
pub mod h1;
pub mod http;
pub mod metrics;
pub mod ollama;
pub mod openai;
pub mod sigv4;
pub mod url;
