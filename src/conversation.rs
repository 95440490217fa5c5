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

/// How a compaction summary opens: the number of tool-calling turns it stands for, so a reader (a
/// model, the simulator's scripted agent) knows how far the work had gone.
const SUMMARY_OPENING: &str = "[Summary of ";
const SUMMARY_CLOSING: &str = " earlier turns, compacted to fit the context]\n";

/// The user message that replaces `turns` earlier tool-calling turns with their summary.
pub fn compaction_summary(turns: u32, summary: &str) -> Message {
    Message::user(format!("{SUMMARY_OPENING}{turns}{SUMMARY_CLOSING}{summary}"))
}

/// The turns a compaction summary stands for, when `message` is one.
pub fn summarised_turns(message: &Message) -> Option<u32> {
    if message.role != Role::User {
        return None;
    }
    let rest = message.content.strip_prefix(SUMMARY_OPENING)?;
    let (number, after) = rest.split_at(rest.find(|c: char| !c.is_ascii_digit())?);
    after.starts_with(SUMMARY_CLOSING).then(|| number.parse().ok()).flatten()
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
    /// Some of the counts are estimated, not the server's: a prompt list answered with one total
    /// for the whole request (vLLM) or with the first prompt's only (llama.cpp).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub estimated: bool,
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, rhs: Self) {
        // The counts are a server's numbers: an absurd one saturates rather than panics.
        self.prompt_tokens = self.prompt_tokens.saturating_add(rhs.prompt_tokens);
        self.cached_tokens = self.cached_tokens.saturating_add(rhs.cached_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(rhs.completion_tokens);
        self.cache_creation_tokens = self.cache_creation_tokens.saturating_add(rhs.cache_creation_tokens);
        self.estimated = self.estimated || rhs.estimated;
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
    /// The prompt (with the room asked for the answer) does not fit the model's context window.
    #[error(
        "prompt too long for the model's context{}{} (HTTP {status}): {message}",
        prompt_tokens.map(|n| format!(": {n} tokens requested")).unwrap_or_default(),
        context_tokens.map(|n| format!(", {n} available")).unwrap_or_default()
    )]
    ContextLength { status: u16, prompt_tokens: Option<u64>, context_tokens: Option<u64>, message: String },
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

    /// A client error (4xx) from a server: `ContextLength` when its message says the prompt does
    /// not fit the context window (with the numbers the server gave), `Rejected` otherwise.
    #[cold]
    pub fn rejected(status: u16, message: String) -> Self {
        Self::rejected_with_code(status, message, None)
    }

    /// As [`BackendError::rejected`], also taking the error object's `code` (OpenAI names a context
    /// overflow `context_length_exceeded` there).
    #[cold]
    pub fn rejected_with_code(status: u16, message: String, code: Option<&str>) -> Self {
        let overflow =
            context_overflow(&message).or_else(|| (code == Some("context_length_exceeded")).then_some((None, None)));
        match overflow {
            Some((prompt_tokens, context_tokens)) => {
                Self::ContextLength { status, prompt_tokens, context_tokens, message }
            }
            None => Self::Rejected { status, message },
        }
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
            Self::ContextLength { .. } => "context_length",
            Self::Auth { .. } => "auth",
            Self::Config(_) => "config",
        }
    }
}

/// `(prompt tokens, context tokens)` as far as the message gives them, when it says the prompt is
/// longer than the context window, in the words of the servers we speak to:
/// - llama.cpp: "request (18039 tokens) exceeds the available context size (2048 tokens), ..."
/// - vLLM and OpenAI (`context_length_exceeded`): "This model's maximum context length is 4096
///   tokens. However, you requested 5000 tokens (...)" / "... your messages resulted in 5000
///   tokens" / "... your request has 5000 input tokens"
/// - SGLang: "The input (5000 tokens) is longer than the model's context length (4096 tokens)."
/// - Anthropic: "prompt is too long: 208310 tokens > 200000 maximum"
/// - Bedrock: "Input is too long for requested model." (no numbers)
fn context_overflow(message: &str) -> Option<(Option<u64>, Option<u64>)> {
    let lower = message.to_ascii_lowercase();
    let after = |marker: &str| lower.find(marker).and_then(|i| leading_number(&lower[i + marker.len()..]));
    if lower.contains("exceeds the available context size") {
        return Some((after("request ("), after("available context size (")));
    }
    if lower.contains("maximum context length is") {
        let prompt = after("you requested ").or_else(|| after("resulted in ")).or_else(|| after("request has "));
        return Some((prompt, after("maximum context length is ")));
    }
    if lower.contains("longer than the model's context length") {
        return Some((after("input ("), after("context length (")));
    }
    if lower.contains("prompt is too long") {
        return Some((after("prompt is too long: "), after(" > ")));
    }
    if lower.contains("context_length_exceeded") || lower.contains("input is too long") {
        return Some((None, None));
    }
    None
}

/// The number at the start of `text` (`,` and `_` digit separators allowed), if it starts with one.
fn leading_number(text: &str) -> Option<u64> {
    let digits: String = text
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',' || *c == '_')
        .filter(char::is_ascii_digit)
        .collect();
    // 20 digits would overflow: such a number is not a token count.
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(message: &str) -> BackendError {
        BackendError::rejected(400, message.to_owned())
    }

    fn numbers(e: &BackendError) -> (Option<u64>, Option<u64>) {
        match e {
            BackendError::ContextLength { prompt_tokens, context_tokens, .. } => (*prompt_tokens, *context_tokens),
            other => panic!("not a context-length error: {other:?}"),
        }
    }

    #[test]
    fn context_overflow_messages_of_each_server() {
        let cases = [
            (
                "request (18039 tokens) exceeds the available context size (2048 tokens), try increasing it",
                (Some(18039), Some(2048)),
            ),
            (
                "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (4000 in \
                 the messages, 1000 in the completion). Please reduce the length of the messages or completion.",
                (Some(5000), Some(4096)),
            ),
            (
                "This model's maximum context length is 8192 tokens. However, your messages resulted in 9,001 \
                 tokens. Please reduce the length of the messages.",
                (Some(9001), Some(8192)),
            ),
            (
                "This model's maximum context length is 2048 tokens. However, your request has 3000 input tokens.",
                (Some(3000), Some(2048)),
            ),
            (
                "The input (5000 tokens) is longer than the model's context length (4096 tokens).",
                (Some(5000), Some(4096)),
            ),
            ("prompt is too long: 208310 tokens > 200000 maximum", (Some(208_310), Some(200_000))),
            ("Input is too long for requested model.", (None, None)),
        ];
        for (message, expected) in cases {
            let e = kind(message);
            assert_eq!(e.kind(), "context_length", "{message}");
            assert!(!e.retryable());
            assert_eq!(numbers(&e), expected, "{message}");
        }
        let shown = kind(cases[0].0).to_string();
        assert!(shown.contains("18039 tokens requested, 2048 available"), "{shown}");
    }

    #[test]
    fn other_client_errors_stay_rejected() {
        for message in ["max_tokens too large", "The model `x` does not exist.", "context is fine", ""] {
            assert_eq!(kind(message), BackendError::Rejected { status: 400, message: message.to_owned() });
        }
        // A token count too large to be one is left out, not wrapped around.
        assert_eq!(numbers(&kind("prompt is too long: 99999999999999999999999 tokens > 5 maximum")), (None, Some(5)));
    }
}
