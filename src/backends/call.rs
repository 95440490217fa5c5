//! What every backend does around one model call, whatever its wire protocol: the per-call
//! timeout, reading a non-streamed answer whole, replaying the events a streamed answer would
//! have produced, and tool arguments in the object form the Anthropic and Bedrock APIs take.

use std::future::Future;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::http::{HttpClient, Response};
use super::{BackendError, ChatRequest, ChatResponse, StreamEvent};
use crate::conversation::TimeoutKind;
use crate::limits::Estimate;

/// Merges `extra` into a request body: each key replaces the body's field of that name (the
/// openai SDK's `extra_body` semantics), so a user's value wins over the one built here.
pub fn merge_extra_body(body: &mut Map<String, Value>, extra: &Map<String, Value>) {
    for (key, value) in extra {
        body.insert(key.clone(), value.clone());
    }
}

/// What a model call will cost against a rate limit, before it is sent: the text of its messages
/// (contents and tool-call arguments) at four characters a token, plus its `max_tokens` (or
/// `default_max_tokens` where the wire protocol always sends one).
pub fn estimate(request: &ChatRequest, default_max_tokens: Option<u32>) -> Estimate {
    let chars: usize = request
        .messages
        .iter()
        .map(|m| m.content.len() + m.tool_calls.iter().map(|c| c.name.len() + c.arguments.len()).sum::<usize>())
        .sum();
    Estimate::from_text_len(chars, request.max_tokens.or(default_max_tokens))
}

/// Runs one model call under its overall time limit (`call_timeout`).
pub async fn with_call_timeout<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or(Err(BackendError::Timeout { which: TimeoutKind::Call, after: limit }))
}

/// A non-streamed answer: the whole body, checked to be UTF-8 (`what` names it in the error),
/// parsed by `parse`, then replayed to `events` as a stream would have sent it.
pub async fn whole_turn(
    http: &HttpClient,
    response: Response,
    what: &str,
    parse: impl FnOnce(&str) -> Result<ChatResponse, BackendError>,
    events: Option<&mpsc::UnboundedSender<StreamEvent>>,
    text_deltas: bool,
) -> Result<ChatResponse, BackendError> {
    let turn = {
        // The body is parsed in place (the answer's text is its one copy) and freed before the
        // answer goes on.
        let bytes = http.read_body(response).await?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|e| BackendError::Protocol(format!("{what} body is not UTF-8: {e}")))?;
        parse(text).map_err(|e| http.redact_error(e))?
    };
    if let Some(tx) = events {
        replay_events(&turn, tx, text_deltas);
    }
    Ok(turn)
}

/// Sends the events a streamed answer would have produced, for a body that came whole.
pub fn replay_events(response: &ChatResponse, tx: &mpsc::UnboundedSender<StreamEvent>, text_deltas: bool) {
    if !response.content.is_empty() || !response.tool_calls.is_empty() {
        let _ = tx.send(StreamEvent::FirstToken);
    }
    if text_deltas && !response.content.is_empty() {
        let _ = tx.send(StreamEvent::TextDelta(response.content.clone()));
    }
    for call in &response.tool_calls {
        let _ = tx.send(StreamEvent::ToolCallReady(call.clone()));
    }
}

/// The Anthropic and Bedrock APIs take the tool input as a JSON object. Arguments the model
/// produced that are not one (malformed JSON) are sent as `{}`: the tool error that follows in the
/// history tells the model.
pub fn arguments_object(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ => Value::Object(Map::new()),
    }
}
