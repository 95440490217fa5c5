//! A tick's model calls as one `/completions` request with a list of prompts (vLLM, `SGLang`,
//! llama.cpp's server, the simulator): each conversation is rendered through the model's chat
//! template, the calls that arrive together are gathered and sent at once, and each answer goes
//! back to its caller as a chat turn. Tools go into the prompt as the template writes them, and
//! the tool calls in each answer's text are read out with the template's format (a completion is
//! raw text: servers parse tool calls on the chat endpoint only). A template without a tool format
//! (Llama 3.0) sends calls with tools, and conversations holding tool turns, to the chat endpoint.
//!
//! Gathering: the population announces how many first calls a tick starts ([`expect`]), and every
//! answer that calls tools announces its agent's next call (after the tools); the calls are held
//! until that many arrived or [`GATHER_WINDOW`] passed since the first, then sent, so each round of
//! a tick is one request. Calls nobody announced (validation retries, steps finishing after their
//! tick) go out at once.
//!
//! [`expect`]: PromptListBackend::expect

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use super::openai::OpenAiBackend;
use super::{Backend, BackendError, Capabilities, ChatRequest, ChatResponse, StreamEvent};
use crate::chat_template::ChatTemplate;
use crate::conversation::ToolCall;

/// The longest a gathered call waits for the rest of its tick before the calls in hand are sent.
pub const GATHER_WINDOW: Duration = Duration::from_millis(20);

/// `max_tokens` of a call that sets none. A chat call's default is the rest of the context, but a
/// completions request's is 16 tokens (vLLM, `OpenAI`'s legacy endpoint): too few for a decision.
pub const DEFAULT_MAX_TOKENS: u32 = 1024;

/// The request id of the scheduler's prefix warm-up call, which is sent alone at once.
pub const WARM_UP_REQUEST_ID: &str = "batchagent-warm-up";

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
    stop: Vec<String>,
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
                stop: template.stop(),
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
        let stop: Vec<&str> = self.stop.iter().map(String::as_str).collect();
        let request = self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let outcome = self.completions.complete_batch(&self.model, &prompts, max_tokens, temperature, &stop).await;
        match outcome {
            Ok(completions) => {
                let answered: Vec<ChatResponse> = completions
                    .into_iter()
                    .enumerate()
                    .map(|(i, completion)| {
                        let (content, calls) = self.template.parse(&completion.text);
                        let tool_calls: Vec<ToolCall> = calls
                            .into_iter()
                            .enumerate()
                            .map(|(k, c)| ToolCall {
                                id: format!("call-{request}-{i}-{k}"),
                                name: c.name,
                                arguments: c.arguments,
                            })
                            .collect();
                        let finish_reason =
                            if tool_calls.is_empty() { completion.finish_reason } else { "tool_calls".to_owned() };
                        ChatResponse { content, tool_calls, usage: completion.usage, finish_reason, ttft: None }
                    })
                    .collect();
                // Each agent that calls tools comes back after them: its next call joins the others'.
                let follow_ups = answered.iter().filter(|a| !a.tool_calls.is_empty()).count();
                if follow_ups > 0 {
                    self.gather.lock().unwrap_or_else(PoisonError::into_inner).expected += follow_ups;
                }
                for (answer, response) in answers.into_iter().zip(answered) {
                    let _ = answer.send(Ok(response));
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
        // A prompt cannot force a tool call: `tool_choice` other than "auto" stays a chat call.
        let forced = request.tool_choice.as_ref().is_some_and(|c| c.as_str() != Some("auto"));
        let prompt = match self.shared.template.render(&request.messages, &request.tools) {
            Ok(prompt) if !forced => prompt,
            Ok(_) => None,
            Err(e) => {
                let error = BackendError::Config(format!("rendering the prompt: {e}"));
                return Box::pin(async move { Err(error) });
            }
        };
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
