//! A conversation's size in tokens, as the server will see it. vLLM serves its tokenizer at
//! `/tokenize` (`TokenizeChatRequest`: the chat template applied, tools included), and so does the
//! simulator; those counts are exact. Other servers get an estimate, marked as one. The context
//! window comes from `/v1/models` (`max_model_len`, which vLLM and the simulator report).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use serde_json::Value;

use super::http::limited_body;
use super::openai::tokenize_chat_body;
use super::url::{parse_backend_url, probe_headers, BackendOptions, Scheme};
use super::BackendError;
use crate::conversation::{Message, ToolDef};

/// Largest `/tokenize` or `/v1/models` answer read: a token list of a long context as JSON.
const MAX_TOKENIZE_BODY: usize = 16 * 1024 * 1024;
const TOKENIZE_TIMEOUT: Duration = Duration::from_secs(30);
/// Tokens a chat template adds around the messages (role markers, a tool preamble such as Qwen's
/// "# Tools ... <tools></tools>" block of about 80 tokens), for the upper bound.
const TEMPLATE_TOKENS: u64 = 256;
const TOKENS_PER_MESSAGE: u64 = 8;
/// Bytes per token of the estimate used where no tokenizer can be asked: English prose runs about
/// 4, code about 3; the lower figure errs on the side of compacting early.
const ESTIMATE_BYTES_PER_TOKEN: u64 = 3;

/// How many tokens, and whether a tokenizer counted them or they were estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCount {
    pub tokens: u64,
    pub exact: bool,
}

/// Counts tokens with the server's tokenizer where it has one, with an estimate otherwise.
pub struct Tokenizer {
    remote: Option<Remote>,
}

struct Remote {
    client: reqwest::Client,
    url: String,
    headers: HeaderMap,
    model: String,
    /// Off after the server answered that it has no `/tokenize` (an older or another server).
    working: AtomicBool,
}

impl Tokenizer {
    /// No server to ask: every count is an estimate.
    pub fn estimate() -> Self {
        Self { remote: None }
    }

    /// The tokenizer of the endpoint at `address` (a backend URL) for `model`: vLLM's and the
    /// simulator's `/tokenize`; an estimate for other servers.
    pub fn connect(address: &str, options: &BackendOptions, model: &str) -> Result<Self, BackendError> {
        let parsed = parse_backend_url(address)?;
        if !matches!(parsed.scheme, Scheme::Vllm | Scheme::Sim) {
            return Ok(Self::estimate());
        }
        let mut headers = probe_headers(parsed.scheme, options)?;
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(TOKENIZE_TIMEOUT)
            .build()
            .map_err(|e| BackendError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            remote: Some(Remote {
                client,
                url: format!("{}/tokenize", parsed.base_url.trim_end_matches('/')),
                headers,
                model: model.to_owned(),
                working: AtomicBool::new(true),
            }),
        })
    }

    /// Whether counts come from the server's tokenizer.
    pub fn is_exact(&self) -> bool {
        self.remote.as_ref().is_some_and(|r| r.working.load(Relaxed))
    }

    /// The prompt tokens of a chat request with these messages and tools. A server that has no
    /// `/tokenize` is not asked again; a transient failure falls back to the estimate this time.
    pub async fn count(&self, messages: &[Message], tools: &[ToolDef]) -> TokenCount {
        if let Some(remote) = self.remote.as_ref().filter(|r| r.working.load(Relaxed)) {
            match remote.count(messages, tools).await {
                Ok(tokens) => return TokenCount { tokens, exact: true },
                Err(Some(404 | 405 | 501)) => remote.working.store(false, Relaxed),
                Err(_) => {}
            }
        }
        TokenCount { tokens: estimate(messages, tools), exact: false }
    }
}

impl Remote {
    /// `Err(Some(status))` for an HTTP error status, `Err(None)` for anything else.
    async fn count(&self, messages: &[Message], tools: &[ToolDef]) -> Result<u64, Option<u16>> {
        let body = tokenize_chat_body(&self.model, messages, tools);
        let response =
            self.client.post(&self.url).headers(self.headers.clone()).body(body).send().await.map_err(|_| None)?;
        if !response.status().is_success() {
            return Err(Some(response.status().as_u16()));
        }
        let bytes = limited_body(response, MAX_TOKENIZE_BODY, None).await.map_err(|_| None)?;
        let answer: Value = serde_json::from_slice(&bytes).map_err(|_| None)?;
        answer.get("count").and_then(Value::as_u64).ok_or(None)
    }
}

/// Bytes of the text a chat template renders from the messages and tools, less the template.
fn text_bytes(messages: &[Message], tools: &[ToolDef]) -> u64 {
    let messages: usize = messages
        .iter()
        .map(|m| {
            m.content.len() + m.tool_calls.iter().map(|c| c.name.len() + c.arguments.len() + c.id.len()).sum::<usize>()
        })
        .sum();
    let tools: usize = tools.iter().map(|t| t.name.len() + t.description.len() + t.parameters.to_string().len()).sum();
    (messages + tools) as u64
}

/// A bound no tokenizer exceeds: every token of a byte-level (or byte-fallback) tokenizer covers at
/// least one byte, plus what the template adds. Below the budget, nothing needs counting.
pub fn upper_bound(messages: &[Message], tools: &[ToolDef]) -> u64 {
    text_bytes(messages, tools)
        + TEMPLATE_TOKENS
        + TOKENS_PER_MESSAGE * (messages.len() as u64 + tools.len() as u64)
        + 16 * messages.iter().map(|m| m.tool_calls.len() as u64).sum::<u64>()
}

/// The estimate used where no tokenizer can be asked.
pub fn estimate(messages: &[Message], tools: &[ToolDef]) -> u64 {
    text_bytes(messages, tools).div_ceil(ESTIMATE_BYTES_PER_TOKEN)
        + TOKENS_PER_MESSAGE * (messages.len() as u64 + tools.len() as u64)
}

/// The context window of `model` at `address`, from `/v1/models` `max_model_len` (vLLM, the
/// simulator); `None` where the server does not say.
pub async fn context_window(address: &str, options: &BackendOptions, model: &str) -> Option<u64> {
    let parsed = parse_backend_url(address).ok()?;
    if matches!(parsed.scheme, Scheme::Anthropic | Scheme::Bedrock | Scheme::Ollama) {
        return None;
    }
    let root = parsed.base_url.trim_end_matches('/');
    let api = if root.split_once("://").is_some_and(|(_, rest)| rest.contains('/')) {
        root.to_owned()
    } else {
        format!("{root}/v1")
    };
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(TOKENIZE_TIMEOUT)
        .build()
        .ok()?;
    let headers = probe_headers(parsed.scheme, options).ok()?;
    let response = client.get(format!("{api}/models")).headers(headers).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let bytes = limited_body(response, MAX_TOKENIZE_BODY, None).await.ok()?;
    let listing: Value = serde_json::from_slice(&bytes).ok()?;
    let entries = listing.get("data")?.as_array()?;
    let entry = entries
        .iter()
        .find(|e| e.get("id").and_then(Value::as_str) == Some(model))
        .or_else(|| (entries.len() == 1).then(|| entries.first()).flatten())?;
    entry.get("max_model_len").and_then(Value::as_u64).filter(|&n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::ToolCall;

    #[test]
    fn the_bound_is_above_the_estimate_and_the_simulators_count() {
        let call = ToolCall { id: "c1".into(), name: "search".into(), arguments: r#"{"q":"rust tokio"}"#.into() };
        let messages = vec![
            Message::system("You are careful."),
            Message::user("Find the answer to everything, then say it in one word."),
            Message::assistant("", vec![call.clone()]),
            Message::tool_result(&call, "forty-two ".repeat(50)),
        ];
        let tools = vec![ToolDef {
            name: "search".into(),
            description: "Search the web.".into(),
            parameters: serde_json::json!({"type": "object", "properties": {"q": {"type": "string"}}}),
        }];
        let bound = upper_bound(&messages, &tools);
        let rendered = crate::sim::server::render_chatml(&messages, &tools);
        let exact = crate::sim::tokenizer::count(&rendered) as u64;
        assert!(exact <= bound, "{exact} > {bound}");
        assert!(estimate(&messages, &tools) <= bound);
        assert!(estimate(&messages, &tools) > 0);
    }
}
