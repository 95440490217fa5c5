//! A response cache in front of a backend: a re-run of an edited batch pays only for the model
//! calls whose request changed. Keyed by model, messages, tools and sampling parameters.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{Backend, BackendError, Capabilities, ChatRequest, ChatResponse, StreamEvent};
use crate::conversation::{ToolCall, Usage};
use crate::store::{cache_key, CacheWriter};

pub struct CachedBackend {
    inner: Arc<dyn Backend>,
    writer: CacheWriter,
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
    pub fn new(inner: Arc<dyn Backend>, writer: CacheWriter) -> Self {
        Self { inner, writer }
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

    fn endpoint_stats(&self) -> Option<serde_json::Value> {
        self.inner.endpoint_stats()
    }

    fn chat(
        &self,
        request: ChatRequest,
        events: Option<mpsc::UnboundedSender<StreamEvent>>,
    ) -> BoxFuture<'_, Result<ChatResponse, BackendError>> {
        Box::pin(async move {
            let key = Self::key(&request);
            let cache = Arc::clone(self.writer.cache());
            let hit = if cache.may_contain(&key) {
                let lookup_key = key.clone();
                // SQLite is blocking I/O: keep it off the async workers.
                tokio::task::spawn_blocking(move || cache.get(&lookup_key)).await.ok().flatten()
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
