//! A response cache in front of a backend: a re-run of an edited batch pays only for the model
//! calls whose request changed. Keyed by the endpoint's identity (its URL and the model it serves,
//! as `/v1/models` or llama.cpp's `/props` describe it), model name, messages, tools and sampling
//! parameters: a different model behind the same name is a miss.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::http::limited_body;
use super::url::{parse_backend_url, Scheme};
use super::{Backend, BackendError, Capabilities, ChatRequest, ChatResponse, StreamEvent};
use crate::conversation::{ToolCall, Usage};
use crate::secret::Secret;
use crate::store::{cache_key, CacheWriter};

pub struct CachedBackend {
    inner: Arc<dyn Backend>,
    writer: CacheWriter,
    identity: String,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    content: String,
    tool_calls: Vec<ToolCall>,
    usage: Usage,
    finish_reason: String,
}

impl CachedBackend {
    /// Answers are stored by `writer`'s thread, in groups, never on the caller's thread.
    /// `identity` is what [`endpoint_identity`] found for the endpoints behind `inner`.
    pub fn new(inner: Arc<dyn Backend>, writer: CacheWriter, identity: String) -> Self {
        Self { inner, writer, identity }
    }

    fn key(&self, request: &ChatRequest) -> u128 {
        let messages = serde_json::to_string(&*request.messages).unwrap_or_default();
        let tools = serde_json::to_string(&*request.tools).unwrap_or_default();
        let mut sampling = serde_json::json!({
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "tool_choice": request.tool_choice,
            "schema": request.response_schema.as_deref(),
        });
        // Only when set, so the keys of answers stored without it stay the same.
        if let (Some(extra), Some(fields)) = (&request.extra_body, sampling.as_object_mut()) {
            fields.insert("extra_body".into(), serde_json::Value::Object((**extra).clone()));
        }
        let sampling = sampling.to_string();
        cache_key(&self.identity, &request.model, &messages, &tools, &sampling)
    }
}

impl Backend for CachedBackend {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn endpoint_stats(&self) -> Option<serde_json::Value> {
        self.inner.endpoint_stats()
    }

    fn batch_stats(&self) -> Option<serde_json::Value> {
        self.inner.batch_stats()
    }

    fn chat(
        &self,
        request: ChatRequest,
        events: Option<mpsc::UnboundedSender<StreamEvent>>,
    ) -> BoxFuture<'_, Result<ChatResponse, BackendError>> {
        Box::pin(async move {
            let key = self.key(&request);
            let cache = Arc::clone(self.writer.cache());
            let hit = if cache.may_contain(key) {
                // SQLite is blocking I/O: keep it off the async workers.
                tokio::task::spawn_blocking(move || cache.get(key)).await.ok().flatten()
            } else {
                // Certainly not stored (every request of a new batch): no lookup at all.
                cache.count_miss();
                None
            };
            if let Some(stored) = hit.and_then(|json| serde_json::from_str::<Stored>(&json).ok()) {
                // Served from the cache: no prompt was processed and no tokens generated now.
                return Ok(ChatResponse {
                    content: stored.content,
                    tool_calls: stored.tool_calls,
                    usage: Usage::default(),
                    finish_reason: stored.finish_reason,
                    ttft: None,
                });
            }
            let response = self.inner.chat(request, events).await?;
            let stored = Stored {
                content: response.content.clone(),
                tool_calls: response.tool_calls.clone(),
                usage: response.usage,
                finish_reason: response.finish_reason.clone(),
            };
            if let Ok(json) = serde_json::to_string(&stored) {
                // A failed or dropped cache write costs a future hit, never this call.
                self.writer.put(key, json);
            }
            Ok(response)
        })
    }
}

/// Seconds in a day. A `created` this close to the local clock is the time of the listing (vLLM,
/// llama.cpp and the simulator fill it in per request), not of the model: keying on it would make
/// every run a miss.
const RECENT_SECS: u64 = 86_400;
/// Longest wait for an endpoint to describe its model.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What identifies the model an endpoint serves: for each address, its base URL and, from
/// `/v1/models`, the `id`, `root`, `created` (when it is a real date) and llama.cpp's `meta` of the
/// entries named `model` (of every entry when none is: llama.cpp ignores the name), and llama.cpp's
/// `/props` `model_path`. An endpoint that cannot be asked contributes its URL only.
pub async fn endpoint_identity(addresses: &[String], model: &str, api_key: Option<&Secret>) -> String {
    let built = reqwest::Client::builder().timeout(PROBE_TIMEOUT).redirect(reqwest::redirect::Policy::none()).build();
    let Ok(client) = built else { return addresses.join("\n") };
    let mut parts = Vec::with_capacity(addresses.len());
    for address in addresses {
        let Ok(parsed) = parse_backend_url(address) else {
            parts.push(address.clone());
            continue;
        };
        let root = parsed.base_url.trim_end_matches('/').to_owned();
        let mut part = serde_json::Map::new();
        part.insert("url".into(), root.clone().into());
        if matches!(parsed.scheme, Scheme::Anthropic | Scheme::Bedrock) {
            parts.push(serde_json::Value::Object(part).to_string());
            continue;
        }
        let api = if root.split_once("://").is_some_and(|(_, rest)| rest.contains('/')) {
            root.clone()
        } else {
            format!("{root}/v1")
        };
        if let Some(listing) = get_json(&client, &format!("{api}/models"), api_key).await {
            part.insert("models".into(), model_entries(&listing, model));
        }
        if parsed.scheme == Scheme::LlamaCpp {
            if let Some(props) = get_json(&client, &format!("{root}/props"), api_key).await {
                part.insert("model_path".into(), props.get("model_path").cloned().unwrap_or_default());
            }
        }
        parts.push(serde_json::Value::Object(part).to_string());
    }
    parts.sort();
    parts.join("\n")
}

fn model_entries(listing: &serde_json::Value, model: &str) -> serde_json::Value {
    let entries = listing.get("data").and_then(serde_json::Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let named: Vec<&serde_json::Value> =
        entries.iter().filter(|e| e.get("id").and_then(serde_json::Value::as_str) == Some(model)).collect();
    let chosen = if named.is_empty() { entries.iter().collect() } else { named };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    chosen
        .into_iter()
        .map(|e| {
            let created =
                e.get("created").and_then(serde_json::Value::as_u64).filter(|&c| c.saturating_add(RECENT_SECS) < now);
            serde_json::json!({"id": e.get("id"), "root": e.get("root"), "created": created, "meta": e.get("meta")})
        })
        .collect()
}

async fn get_json(client: &reqwest::Client, url: &str, api_key: Option<&Secret>) -> Option<serde_json::Value> {
    let mut request = client.get(url);
    if let Some(key) = api_key {
        request = request.bearer_auth(key.expose());
    }
    let response = request.send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    // A model listing is small: a body past 1 MiB is not one, and is not read further.
    let body = limited_body(response, 1 << 20, None).await.ok()?;
    serde_json::from_slice(&body).ok()
}
