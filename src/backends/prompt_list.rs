//! A tick's model calls as one `/completions` request with a list of prompts (vLLM, `SGLang`,
//! llama.cpp's server, the simulator): each conversation is rendered through the model's chat
//! template, the calls that arrive together are gathered and sent at once, and each answer goes
//! back to its caller as a chat turn. Calls with tools, and conversations holding tool turns, go
//! to the chat endpoint as they are (a raw completion's tool-call markup is not parsed here).
//!
//! Gathering: the population announces how many first calls a tick starts ([`expect`]); the calls
//! are held until that many arrived or [`GATHER_WINDOW`] passed since the first, then sent. Calls
//! nobody announced (validation retries, steps finishing after their tick) go out at once.
//!
//! [`expect`]: PromptListBackend::expect

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use super::openai::OpenAiBackend;
use super::{Backend, BackendError, Capabilities, ChatRequest, ChatResponse, StreamEvent};
use crate::conversation::{Message, Role};

/// The longest a gathered call waits for the rest of its tick before the calls in hand are sent.
pub const GATHER_WINDOW: Duration = Duration::from_millis(20);

/// `max_tokens` of a call that sets none. A chat call's default is the rest of the context, but a
/// completions request's is 16 tokens (vLLM, `OpenAI`'s legacy endpoint): too few for a decision.
pub const DEFAULT_MAX_TOKENS: u32 = 1024;

/// The request id of the scheduler's prefix warm-up call, which is sent alone at once.
pub const WARM_UP_REQUEST_ID: &str = "batchagent-warm-up";

/// A chat template known by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\n...<|im_end|>` (Qwen2 / Qwen2.5), with Qwen2.5's default system prompt
    /// when the conversation has none.
    ChatMl,
    /// Llama 3 / 3.1 instruct headers (`<|start_header_id|>role<|end_header_id|>`); the begin-of-text
    /// token is left to the server's tokenizer, which adds it to every prompt.
    Llama3,
}

impl ChatTemplate {
    /// The template a model name implies: Qwen models speak `ChatML`, Llama 3 models their own.
    pub fn for_model(model: &str) -> Option<Self> {
        let name = model.to_ascii_lowercase();
        if name.contains("qwen") {
            Some(Self::ChatMl)
        } else if ["llama-3", "llama3", "llama_3", "llama-v3"].iter().any(|p| name.contains(p)) {
            Some(Self::Llama3)
        } else {
            None
        }
    }

    /// By the name a user gives (`chatml`, `llama3`).
    pub fn by_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "chatml" | "qwen" | "qwen2.5" => Some(Self::ChatMl),
            "llama3" | "llama-3" | "llama3.1" => Some(Self::Llama3),
            _ => None,
        }
    }

    /// End-of-turn strings the completion stops at.
    pub fn stop(self) -> &'static [&'static str] {
        match self {
            Self::ChatMl => &["<|im_end|>", "<|endoftext|>"],
            Self::Llama3 => &["<|eot_id|>", "<|end_of_text|>"],
        }
    }

    /// The prompt for a conversation, ending with the assistant's header; `None` for a
    /// conversation with tool turns (those go to the chat endpoint).
    pub fn render(self, messages: &[Message]) -> Option<String> {
        if messages.iter().any(|m| m.role == Role::Tool || !m.tool_calls.is_empty()) {
            return None;
        }
        let role = |r: Role| match r {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        };
        let mut out = String::with_capacity(messages.iter().map(|m| m.content.len() + 32).sum::<usize>() + 64);
        match self {
            Self::ChatMl => {
                if messages.first().is_none_or(|m| m.role != Role::System) {
                    out.push_str(
                        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n",
                    );
                }
                for m in messages {
                    out.push_str("<|im_start|>");
                    out.push_str(role(m.role));
                    out.push('\n');
                    out.push_str(&m.content);
                    out.push_str("<|im_end|>\n");
                }
                out.push_str("<|im_start|>assistant\n");
            }
            Self::Llama3 => {
                for m in messages {
                    out.push_str("<|start_header_id|>");
                    out.push_str(role(m.role));
                    out.push_str("<|end_header_id|>\n\n");
                    out.push_str(m.content.trim());
                    out.push_str("<|eot_id|>");
                }
                out.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
            }
        }
        Some(out)
    }
}

type Answer = oneshot::Sender<Result<ChatResponse, BackendError>>;

struct Pending {
    prompt: String,
    max_tokens: Option<u32>,
    temperature: Option<f64>,
    answer: Answer,
}

#[derive(Default)]
struct Gather {
    /// First calls announced and not arrived yet.
    expected: usize,
    pending: Vec<Pending>,
    /// Bumped at every send, so a window timer set for calls already sent does nothing.
    round: u64,
}

struct Shared {
    completions: OpenAiBackend,
    model: String,
    template: ChatTemplate,
    gather: Mutex<Gather>,
    requests: std::sync::atomic::AtomicU64,
}

/// Sends the calls that arrive together as one prompt-list request (see the module docs).
pub struct PromptListBackend {
    chat: Arc<dyn Backend>,
    shared: Arc<Shared>,
}

impl PromptListBackend {
    /// `chat` answers the calls that are not rendered (tools); `completions` is the same endpoint,
    /// spoken to through `/completions`.
    pub fn new(chat: Arc<dyn Backend>, completions: OpenAiBackend, model: &str, template: ChatTemplate) -> Self {
        Self {
            chat,
            shared: Arc::new(Shared {
                completions,
                model: model.to_owned(),
                template,
                gather: Mutex::default(),
                requests: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// `calls` first calls are about to arrive together (a tick's steps): hold them for one request.
    pub fn expect(&self, calls: usize) {
        let mut gather = self.shared.gather.lock().unwrap_or_else(PoisonError::into_inner);
        gather.expected += calls;
    }

    /// Prompt-list requests sent so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Shared {
    fn send(self: &Arc<Self>, calls: Vec<Pending>) {
        if calls.is_empty() {
            return;
        }
        let shared = Arc::clone(self);
        // Its own task: a caller that stops waiting (the run cancelled) does not stop the others'.
        tokio::spawn(async move {
            // One request takes one `max_tokens` and `temperature`: calls that differ go apart.
            let mut groups: Vec<Vec<Pending>> = Vec::new();
            for call in calls {
                match groups.iter_mut().find(|g| {
                    g.first().is_some_and(|f| f.max_tokens == call.max_tokens && f.temperature == call.temperature)
                }) {
                    Some(group) => group.push(call),
                    None => groups.push(vec![call]),
                }
            }
            let sends = groups.into_iter().map(|group| shared.send_group(group));
            futures_util::future::join_all(sends).await;
        });
    }

    async fn send_group(&self, group: Vec<Pending>) {
        let Some(first) = group.first() else { return };
        let (max_tokens, temperature) = (first.max_tokens, first.temperature);
        let (prompts, answers): (Vec<String>, Vec<Answer>) = group.into_iter().map(|p| (p.prompt, p.answer)).unzip();
        self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let outcome =
            self.completions.complete_batch(&self.model, &prompts, max_tokens, temperature, self.template.stop()).await;
        match outcome {
            Ok(completions) => {
                for (answer, completion) in answers.into_iter().zip(completions) {
                    let _ = answer.send(Ok(ChatResponse {
                        content: completion.text,
                        tool_calls: Vec::new(),
                        usage: completion.usage,
                        finish_reason: completion.finish_reason,
                        ttft: None,
                    }));
                }
            }
            Err(e) => {
                for answer in answers {
                    let _ = answer.send(Err(e.clone()));
                }
            }
        }
    }
}

impl Backend for PromptListBackend {
    fn name(&self) -> &str {
        self.chat.name()
    }

    /// As the endpoint's, except constrained decoding: one request's `response_format` would hold
    /// for every prompt of the list, so the schema goes into the prompt.
    fn capabilities(&self) -> Capabilities {
        Capabilities { json_schema: false, ..self.chat.capabilities() }
    }

    fn endpoint_stats(&self) -> Option<serde_json::Value> {
        self.chat.endpoint_stats()
    }

    fn chat(
        &self,
        request: ChatRequest,
        events: Option<mpsc::UnboundedSender<StreamEvent>>,
    ) -> BoxFuture<'_, Result<ChatResponse, BackendError>> {
        let prompt = if request.tools.is_empty() { self.shared.template.render(&request.messages) } else { None };
        let Some(prompt) = prompt else { return self.chat.chat(request, events) };
        let (answer, receive) = oneshot::channel();
        let max_tokens = Some(request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS));
        let call = Pending { prompt, max_tokens, temperature: request.temperature, answer };
        let shared = Arc::clone(&self.shared);
        {
            let mut gather = shared.gather.lock().unwrap_or_else(PoisonError::into_inner);
            if request.request_id == WARM_UP_REQUEST_ID || gather.expected == 0 {
                // Not part of an announced tick: at once, with whatever else is held.
                gather.pending.push(call);
                let calls = std::mem::take(&mut gather.pending);
                gather.round += 1;
                drop(gather);
                shared.send(calls);
            } else {
                gather.expected -= 1;
                gather.pending.push(call);
                if gather.expected == 0 {
                    let calls = std::mem::take(&mut gather.pending);
                    gather.round += 1;
                    drop(gather);
                    shared.send(calls);
                } else if gather.pending.len() == 1 {
                    // The first of a tick: the rest have one window to arrive.
                    let round = gather.round;
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move {
                        tokio::time::sleep(GATHER_WINDOW).await;
                        let mut gather = shared.gather.lock().unwrap_or_else(PoisonError::into_inner);
                        if gather.round != round {
                            return;
                        }
                        gather.round += 1;
                        // The calls that did not come are not waited for again.
                        gather.expected = 0;
                        let calls = std::mem::take(&mut gather.pending);
                        drop(gather);
                        shared.send(calls);
                    });
                }
            }
        }
        Box::pin(async move {
            receive.await.unwrap_or_else(|_| Err(BackendError::Protocol("the prompt-list request was dropped".into())))
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn chatml_and_llama3_render() {
        let messages =
            [Message::system("S"), Message::user("hi"), Message::assistant("yo", Vec::new()), Message::user("next")];
        assert_eq!(
            ChatTemplate::ChatMl.render(&messages).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n\
             <|im_start|>user\nnext<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(ChatTemplate::ChatMl
            .render(&[Message::user("q")])
            .unwrap()
            .starts_with("<|im_start|>system\nYou are Qwen"));
        assert_eq!(
            ChatTemplate::Llama3.render(&messages[..2]).unwrap(),
            "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let call = crate::conversation::ToolCall { id: "c".into(), name: "f".into(), arguments: "{}".into() };
        let tool_turn = Message::assistant("", vec![call]);
        assert_eq!(ChatTemplate::ChatMl.render(&[Message::user("q"), tool_turn]), None);
        assert_eq!(ChatTemplate::for_model("Qwen/Qwen2.5-7B-Instruct"), Some(ChatTemplate::ChatMl));
        assert_eq!(ChatTemplate::for_model("meta-llama/Meta-Llama-3.1-8B-Instruct"), Some(ChatTemplate::Llama3));
        assert_eq!(ChatTemplate::for_model("mistral-7b"), None);
    }
}
