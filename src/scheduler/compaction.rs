//! Keeping an agent's conversation within the model's context. Before a model call whose prompt
//! would not fit, the conversation is compacted in steps, each tried only when the one before was
//! not enough:
//! 1. tool outputs longer than `tool_output_chars` are cut (head and tail kept, with a marker);
//! 2. tool outputs older than the last `keep_turns` turns are replaced by a marker;
//! 3. a summariser model rewrites the oldest turns as one message (`compaction_model`), keeping
//!    the last `keep_turns` turns, then the last one only.
//!
//! The system message, the tool definitions and the first user message are never touched, so the
//! engine's prefix cache keeps serving them. Messages are replaced or cut, never reordered, and an
//! assistant turn keeps every one of its tool results: the conversation stays well-formed for every
//! protocol.

use std::ops::Range;
use std::sync::Arc;

use crate::backends::tokenize::{context_window, Tokenizer};
use crate::backends::url::BackendOptions;
use crate::backends::{Backend, BackendError};
use crate::conversation::{compaction_summary, summarised_turns, Message, Role};
use crate::spec::BatchSpec;

/// What a run compacts against, resolved once when it starts.
pub struct Compactor {
    /// Prompt tokens a request may have: the context limit less the room kept for the answer.
    pub budget: u64,
    /// The context limit itself (the lower of `max_context_tokens` and the server's window).
    pub limit: u64,
    pub keep_turns: usize,
    pub tool_output_chars: usize,
    pub tokenizer: Tokenizer,
    pub summariser: Option<Summariser>,
}

/// The model that writes summaries, and where it runs.
pub struct Summariser {
    pub backend: Arc<dyn Backend>,
    pub model: String,
    pub max_tokens: u32,
    /// The run's own backend: a summary call then takes an inference slot like any model call.
    pub shared_backend: bool,
}

impl Compactor {
    /// The run's compactor: its limit is the lower of `max_context_tokens` and the context window
    /// the endpoints at `addresses` report; `None` when compaction is off or no limit is known.
    /// Summaries come from `summariser` (another backend) or the run's own `backend`, by
    /// `compaction_model` or the run's model; none when neither a model nor a backend was named.
    pub async fn resolve(
        spec: &BatchSpec,
        addresses: &[String],
        options: &BackendOptions,
        backend: &Arc<dyn Backend>,
        summariser: Option<Arc<dyn Backend>>,
    ) -> Result<Option<Self>, BackendError> {
        let settings = &spec.compaction;
        if !settings.enabled {
            return Ok(None);
        }
        let mut window: Option<u64> = None;
        for address in addresses {
            if let Some(n) = context_window(address, options, &spec.model).await {
                window = Some(window.map_or(n, |w| w.min(n)));
            }
        }
        let limit = match (settings.max_context_tokens, window) {
            (Some(a), Some(b)) => a.min(b),
            (Some(n), None) | (None, Some(n)) => n,
            (None, None) => return Ok(None),
        };
        let tokenizer = match addresses.first() {
            Some(address) => Tokenizer::connect(address, options, &spec.model)?,
            None => Tokenizer::estimate(),
        };
        let summariser = match (summariser, &settings.model) {
            (None, None) => None,
            (other, model) => Some(Summariser {
                shared_backend: other.is_none(),
                backend: other.unwrap_or_else(|| backend.clone()),
                model: model.clone().unwrap_or_else(|| spec.model.clone()),
                max_tokens: settings.summary_tokens,
            }),
        };
        Ok(Some(Self {
            budget: Self::budget_for(limit, spec.max_tokens),
            limit,
            keep_turns: settings.keep_turns as usize,
            tool_output_chars: settings.tool_output_chars,
            tokenizer,
            summariser,
        }))
    }

    /// The prompt budget for a context `limit` when answers may take `max_tokens`: without a
    /// `max_tokens`, an eighth of the context is kept for the answer.
    pub fn budget_for(limit: u64, max_tokens: Option<u32>) -> u64 {
        let room = max_tokens.map_or(limit / 8, u64::from);
        limit.saturating_sub(room).max(1)
    }
}

/// The instructions the summariser gets.
pub const SUMMARY_PROMPT: &str = "You compact the working memory of an agent that is part-way through a task. \
Summarise the excerpt of its conversation below: keep every fact, tool result, number, name and decision the \
agent needs to continue, and what it was about to do next; leave out everything else. Reply with the summary only.";

/// Where the conversation proper starts: after the system message and the first user message (the
/// task), which compaction never changes.
pub fn protected_len(messages: &[Message]) -> usize {
    let system = usize::from(messages.first().is_some_and(|m| m.role == Role::System));
    (system + 1).min(messages.len())
}

/// Index of the first message of the last `keep` turns (a turn starts at an assistant message),
/// never inside the protected head.
pub fn recent_start(messages: &[Message], keep: usize) -> usize {
    let head = protected_len(messages);
    let mut seen = 0;
    for (i, m) in messages.iter().enumerate().skip(head).rev() {
        if m.role == Role::Assistant {
            seen += 1;
            if seen == keep {
                return i;
            }
        }
    }
    head
}

/// Step 1: cuts every tool output longer than `max_chars` to its head and tail around a marker
/// saying how much was cut. Returns whether anything changed.
pub fn cut_long_outputs(messages: &mut [Message], max_chars: usize) -> bool {
    let head = protected_len(messages);
    let mut changed = false;
    for m in messages.iter_mut().skip(head).filter(|m| m.role == Role::Tool) {
        let chars = m.content.chars().count();
        if chars <= max_chars {
            continue;
        }
        // The marker's own length comes out of the allowance, so the result stays within it.
        let keep = max_chars.saturating_sub(80);
        let (front, back) = (keep / 2, keep - keep / 2);
        let start: String = m.content.chars().take(front).collect();
        let end: String = m.content.chars().skip(chars - back).collect();
        let cut = chars - front - back;
        m.content = format!("{start}\n[... {cut} characters cut to fit the context ...]\n{end}");
        changed = true;
    }
    changed
}

/// Step 2: replaces the tool outputs of every turn before the last `keep` with a marker. Returns
/// whether anything changed.
pub fn drop_old_outputs(messages: &mut [Message], keep: usize) -> bool {
    let (head, recent) = (protected_len(messages), recent_start(messages, keep));
    let mut changed = false;
    for m in messages.iter_mut().take(recent).skip(head).filter(|m| m.role == Role::Tool) {
        if m.content.starts_with(DROPPED) {
            continue;
        }
        m.content = format!("{DROPPED}{} characters]", m.content.chars().count());
        changed = true;
    }
    changed
}

const DROPPED: &str = "[tool output dropped to fit the context: ";

/// Step 3's span: the messages a summary replaces (after the protected head, before the last
/// `keep` turns), when there are at least two of them (one message is not worth a summary).
pub fn summary_span(messages: &[Message], keep: usize) -> Option<Range<usize>> {
    let span = protected_len(messages)..recent_start(messages, keep);
    (span.len() >= 2).then_some(span)
}

/// The tool-calling turns a span stands for (a summary in it counts the turns it replaced).
pub fn turns_in(messages: &[Message]) -> u32 {
    messages
        .iter()
        .map(|m| {
            summarised_turns(m).unwrap_or_else(|| u32::from(m.role == Role::Assistant && !m.tool_calls.is_empty()))
        })
        .sum()
}

/// The span as plain text for the summariser, at most `max_chars` characters (the middle is cut).
pub fn transcript(messages: &[Message], max_chars: usize) -> String {
    let mut out = String::new();
    for m in messages {
        match m.role {
            Role::Tool => {
                out.push_str("Tool result");
                if let Some(name) = &m.name {
                    out.push_str(" (");
                    out.push_str(name);
                    out.push(')');
                }
                out.push_str(": ");
            }
            Role::Assistant => out.push_str("Agent: "),
            Role::User => out.push_str("User: "),
            Role::System => out.push_str("System: "),
        }
        out.push_str(&m.content);
        for call in &m.tool_calls {
            out.push_str("\n  called ");
            out.push_str(&call.name);
            out.push_str(&call.arguments);
        }
        out.push_str("\n\n");
    }
    let chars = out.chars().count();
    if chars > max_chars {
        let half = max_chars / 2;
        let start: String = out.chars().take(half).collect();
        let end: String = out.chars().skip(chars - half).collect();
        out = format!("{start}\n[... {} characters left out ...]\n{end}", chars - 2 * half);
    }
    out
}

/// Replaces `span` by one summary message; returns how many messages went (the span's length less
/// the one that replaced it).
pub fn replace_with_summary(messages: &mut Vec<Message>, span: Range<usize>, summary: &str) -> usize {
    let turns = turns_in(&messages[span.clone()]);
    let removed = span.len() - 1;
    messages.splice(span, std::iter::once(compaction_summary(turns, summary.trim())));
    removed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::conversation::ToolCall;
    use proptest::prelude::*;

    /// A system message, the task, then `turns` turns of one tool call each with an output of
    /// `output_chars` characters.
    fn conversation(turns: usize, output_chars: usize) -> Vec<Message> {
        let mut messages = vec![Message::system("You are an agent."), Message::user("Do the task.")];
        for t in 0..turns {
            let call = ToolCall { id: format!("c{t}"), name: "fetch".into(), arguments: format!("{{\"n\":{t}}}") };
            messages.push(Message::assistant(format!("step {t}"), vec![call.clone()]));
            messages.push(Message::tool_result(&call, "x".repeat(output_chars)));
        }
        messages
    }

    /// Every assistant message with calls is followed by one result per call, ids matching.
    fn well_formed(messages: &[Message]) -> bool {
        messages.iter().enumerate().all(|(i, m)| {
            m.tool_calls.iter().enumerate().all(|(j, c)| {
                messages
                    .get(i + 1 + j)
                    .is_some_and(|r| r.role == Role::Tool && r.tool_call_id.as_deref() == Some(&c.id))
            })
        })
    }

    #[test]
    fn long_outputs_are_cut_to_the_allowance_with_a_marker() {
        let mut messages = conversation(3, 10_000);
        assert!(cut_long_outputs(&mut messages, 1000));
        for m in messages.iter().filter(|m| m.role == Role::Tool) {
            assert!(m.content.chars().count() <= 1000, "{}", m.content.len());
            assert!(m.content.contains("characters cut to fit the context"));
        }
        assert!(!cut_long_outputs(&mut messages, 1000), "a second pass changes nothing");
    }

    #[test]
    fn old_outputs_are_dropped_and_the_recent_turns_kept() {
        let mut messages = conversation(6, 500);
        let before = messages.clone();
        assert!(drop_old_outputs(&mut messages, 2));
        let tools: Vec<&Message> = messages.iter().filter(|m| m.role == Role::Tool).collect();
        assert!(tools[..4].iter().all(|m| m.content == "[tool output dropped to fit the context: 500 characters]"));
        assert!(tools[4..].iter().all(|m| m.content.len() == 500));
        assert_eq!(messages[..2], before[..2], "system and task untouched");
        assert!(well_formed(&messages));
    }

    #[test]
    fn a_summary_replaces_the_oldest_turns_and_counts_them() {
        let mut messages = conversation(10, 100);
        let span = summary_span(&messages, 3).unwrap();
        assert_eq!(span, 2..16);
        let removed = replace_with_summary(&mut messages, span, " what happened ");
        assert_eq!(removed, 13);
        assert_eq!(messages.len(), 2 + 1 + 6);
        assert_eq!(summarised_turns(&messages[2]), Some(7));
        assert!(messages[2].content.ends_with("\nwhat happened"));
        assert_eq!(messages[3].role, Role::Assistant);
        assert!(well_formed(&messages));
        // A later summary over the first one counts the turns the first one stood for.
        let span = summary_span(&messages, 1).unwrap();
        replace_with_summary(&mut messages, span, "more");
        assert_eq!(summarised_turns(&messages[2]), Some(9));
    }

    #[test]
    fn nothing_to_summarise_in_a_short_conversation() {
        assert_eq!(summary_span(&conversation(2, 10), 2), None);
        assert_eq!(summary_span(&[Message::user("only the task")], 1), None);
    }

    proptest! {
        #[test]
        fn every_step_keeps_the_head_and_the_pairing(turns in 0usize..12, chars in 0usize..3000, keep in 1usize..5, limit in 200usize..2000) {
            let mut messages = conversation(turns, chars);
            let head = messages[..2].to_vec();
            cut_long_outputs(&mut messages, limit);
            prop_assert!(messages.iter().filter(|m| m.role == Role::Tool).all(|m| m.content.chars().count() <= limit.max(chars.min(limit))));
            drop_old_outputs(&mut messages, keep);
            if let Some(span) = summary_span(&messages, keep) {
                replace_with_summary(&mut messages, span, "s");
            }
            prop_assert_eq!(&messages[..2], &head[..]);
            prop_assert!(well_formed(&messages));
            prop_assert_eq!(turns_in(&messages) as usize, turns);
        }
    }
}
