//! Backends: one trait, one implementation per wire protocol. A backend turns a provider-neutral
//! [`ChatRequest`] into HTTP and the server's answer (streamed or not) into a [`ChatResponse`],
//! sending [`StreamEvent`]s as they are parsed so the scheduler can start tools early.

#![warn(clippy::indexing_slicing)]

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::conversation::{Message, ToolDef};
// The protocol types live with the conversation types (stream/ shares them); re-exported here
// because every backend speaks in them.
pub use crate::conversation::{BackendError, ChatResponse, StreamEvent};

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

/// Hints a scheduler can pass to engines that take them (Dynamo `nvext.agent_hints`, vLLM
/// `priority`, the simulator's `batchagent` field).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentHints {
    /// Higher is more urgent.
    pub priority: i64,
    pub remaining_turns: u32,
    pub expected_output_tokens: Option<u32>,
    /// The agent making the call (its job id), so the engine can tell its calls apart.
    pub agent: String,
    /// Seconds the agent is expected to be away in its tools should this call end in tool calls
    /// (the run's 75th percentile of tool waits so far); `None` for an agent without tools or
    /// before any tool wait was seen.
    pub tool_wait_s: Option<f64>,
    /// Seconds from the end of this call to the agent's next call should it end in tool calls:
    /// the 75th percentile of that gap so far (the tools and the wait for a free slot) among the
    /// calls that took their slot with one turn fewer left than this one, as the agent's next call
    /// will (slots go to the fewest turns left first), or among all calls while those number
    /// fewer than 8 (`scheduler::stats::NextCallGap`); `None` as for `tool_wait_s`.
    pub next_call_s: Option<f64>,
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
    /// Fields merged into the request body as the backend builds it (`Batch(extra_body=...)`),
    /// overriding the fields of the same name, as the openai SDK's `extra_body` does; see
    /// [`call::merge_extra_body`] and each backend for where they go.
    pub extra_body: Option<Arc<serde_json::Map<String, Value>>>,
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

    /// Provider batch figures (batches submitted, in progress, rows done), for the progress line
    /// and reports; `None` for online backends.
    fn batch_stats(&self) -> Option<serde_json::Value> {
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
pub mod auto;
pub mod aws_credentials;
pub mod bedrock;
pub mod cached;
pub mod call;
pub mod connect;
pub mod fleet;
pub mod h1;
pub mod http;
pub mod metrics;
pub mod ollama;
pub mod openai;
pub mod placement;
pub mod probe;
pub mod prompt_list;
pub mod provider_batch;
pub mod sigv4;
pub mod tokenize;
pub mod url;
