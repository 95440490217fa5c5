//! A response cache in front of a backend: a re-run of an edited batch pays only for the model
//! calls whose request changed. Keyed by model, messages, tools and sampling parameters.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{Backend, BackendError, Capabilities, ChatRequest, ChatResponse, StreamEvent};
use crate::conversation::{ToolCall, Usage};
use crate::store::{cache_key, ResponseCache};

pub struct CachedBackend {
    inner: Arc<dyn Backend>,
    cache: Arc<ResponseCache>,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    content: String,
    tool_calls: Vec<ToolCall>,
    usage: Usage,
    finish_reason: String,
}

impl CachedBackend {
    pub fn new(inner: Arc<dyn Backend>, cache: Arc<ResponseCache>) -> Self {
        Self { inner, cache }
    }

    fn key(request: &ChatRequest) -> String {
        let messages = serde_json::to_string(&*request.messages).unwrap_or_default();
        let tools = serde_json::to_string(&*request.tools).unwrap_or_default();
        let sampling = serde_json::json!({
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "tool_choice": request.tool_choice,
            "schema": request.response_schema.as_deref(),
        })
        .to_string();
        cache_key(&request.model, &messages, &tools, &sampling)
    }
}

impl Backend for CachedBackend {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn chat(
        &self,
        request: ChatRequest,
        events: Option<mpsc::UnboundedSender<StreamEvent>>,
    ) -> BoxFuture<'_, Result<ChatResponse, BackendError>> {
        Box::pin(async move {
            let key = Self::key(&request);
            let cache = self.cache.clone();
            let lookup_key = key.clone();
            // SQLite is blocking I/O: keep it off the async workers.
            let hit = tokio::task::spawn_blocking(move || cache.get(&lookup_key)).await.ok().flatten();
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
                let cache = self.cache.clone();
                // A failed cache write costs a future hit, never this call.
                tokio::task::spawn_blocking(move || cache.put(&key, &json));
            }
            Ok(response)
        })
    }
}
