//! Shared-prefix identity: which requests start with the same tokens, so the fleet can send them
//! to the endpoint that already holds that prefix in its KV cache.
//!
//! The key covers what every request of a job family starts with: the system prompt and the tool
//! definitions (engines render tools into the prompt ahead of the conversation). Session-variant
//! preamble lines at the top of a system prompt (`x-anthropic-billing-header: ...`,
//! `x-amz-...: ...`: per-session headers some harnesses inject) change every session but not the
//! work, so they are stripped before hashing unless the caller keeps them.

use std::hash::Hasher;

use crate::conversation::{Message, Role, ToolDef};

/// FNV-1a, 64-bit: stable across processes and versions (routing keys may be logged and compared).
struct Fnv(fnv::FnvHasher);

impl Fnv {
    fn new() -> Self {
        Self(fnv::FnvHasher::default())
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }

    /// A byte that never occurs in UTF-8, between fields.
    fn write_sep(&mut self) {
        self.0.write(&[0xff]);
    }

    fn value(&self) -> u64 {
        self.0.finish()
    }
}

/// Is this line a session-variant header line (`x-something: value`)?
fn is_session_header(line: &str) -> bool {
    let Some((name, _)) = line.split_once(':') else { return false };
    let name = name.trim();
    name.len() > 2
        && name[..2].eq_ignore_ascii_case("x-")
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The system prompt without its leading session-variant header lines (and the blank line that
/// usually follows them).
pub fn strip_session_preamble(system: &str) -> &str {
    let mut rest = system;
    loop {
        let (line, tail) = rest.split_once('\n').unwrap_or((rest, ""));
        if is_session_header(line.trim_end_matches('\r')) {
            rest = tail;
        } else {
            break;
        }
    }
    if rest.len() < system.len() {
        rest.trim_start_matches(['\r', '\n'])
    } else {
        system
    }
}

/// Lengths (in bytes) of the first user message's prefixes that get a routing key of their own: a
/// batch that puts a shared document in the user message (one system prompt for all, a handful of
/// documents, many questions) shares prefixes there, not in the system prompt.
pub const USER_PREFIX_LENGTHS: [usize; 4] = [1 << 10, 1 << 12, 1 << 14, 1 << 16];

/// Routing keys of a request's shared prefixes with the bytes each covers, shortest first: the
/// system prompt and tools (if any), then each of [`USER_PREFIX_LENGTHS`] that the first user
/// message reaches, chained onto it. A router sends a request where its longest known key went.
pub fn prefix_keys(messages: &[Message], tools: &[ToolDef], keep_session_headers: bool) -> Vec<(u64, usize)> {
    let base = prefix_key(messages, tools, keep_session_headers);
    let base_len = base_len(messages, tools);
    let mut keys: Vec<(u64, usize)> = base.map(|k| (k, base_len)).into_iter().collect();
    if let Some(user) = messages.iter().find(|m| m.role == Role::User) {
        push_user_keys(&mut keys, base, base_len, &user.content);
    }
    keys
}

/// The bytes a request's base key covers: system prompt and tool definitions.
pub fn base_len(messages: &[Message], tools: &[ToolDef]) -> usize {
    messages.iter().take_while(|m| m.role == Role::System).map(|m| m.content.len()).sum::<usize>()
        + tools.iter().map(|t| t.name.len() + t.description.len()).sum::<usize>()
}

/// The longest of [`prefix_keys`] for a request whose base key (system prompt and tools, computed
/// once per run) is `base` and whose first user message is `user`, without building the messages:
/// what dispatch ordering groups jobs by.
pub fn longest_key(base: Option<u64>, base_len: usize, user: &str) -> Option<(u64, usize)> {
    let mut keys: Vec<(u64, usize)> = base.map(|k| (k, base_len)).into_iter().collect();
    push_user_keys(&mut keys, base, base_len, user);
    keys.pop()
}

fn push_user_keys(keys: &mut Vec<(u64, usize)>, base: Option<u64>, base_len: usize, text: &str) {
    if text.len() < USER_PREFIX_LENGTHS[0] {
        return;
    }
    let mut h = Fnv::new();
    h.write(&base.unwrap_or(0).to_le_bytes());
    let mut hashed = 0;
    for &len in &USER_PREFIX_LENGTHS {
        if text.len() < len {
            break;
        }
        // Byte prefixes: a cut inside a UTF-8 character is fine for hashing.
        h.write(&text.as_bytes()[hashed..len]);
        hashed = len;
        keys.push((h.value(), base_len + len));
    }
}

/// The routing key of a request's shared prefix, or `None` when it has no system prompt and no
/// tools (nothing shared to route by).
pub fn prefix_key(messages: &[Message], tools: &[ToolDef], keep_session_headers: bool) -> Option<u64> {
    let system = messages.iter().take_while(|m| m.role == Role::System).map(|m| m.content.as_str());
    let mut h = Fnv::new();
    let mut any = false;
    for text in system {
        let text = if keep_session_headers { text } else { strip_session_preamble(text) };
        h.write(text.as_bytes());
        h.write_sep();
        any = true;
    }
    for tool in tools {
        h.write(tool.name.as_bytes());
        h.write_sep();
        h.write(tool.description.as_bytes());
        h.write_sep();
        h.write(tool.parameters.to_string().as_bytes());
        h.write_sep();
        any = true;
    }
    any.then_some(h.value())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn session_headers_are_stripped_before_hashing() {
        let a = [
            Message::system("x-anthropic-billing-header: cc_version=1; session=aaa\nYou review code."),
            Message::user("a"),
        ];
        let b = [
            Message::system("x-anthropic-billing-header: cc_version=1; session=bbb\nYou review code."),
            Message::user("b"),
        ];
        assert_eq!(prefix_key(&a, &[], false), prefix_key(&b, &[], false));
        assert_ne!(prefix_key(&a, &[], true), prefix_key(&b, &[], true));
        assert_eq!(
            strip_session_preamble("x-amz-trace: 1\nX-Foo: 2\n\nbody\nx-not: stripped"),
            "body\nx-not: stripped"
        );
    }

    #[test]
    fn different_system_prompts_or_tools_differ() {
        let a = [Message::system("one")];
        let b = [Message::system("two")];
        assert_ne!(prefix_key(&a, &[], false), prefix_key(&b, &[], false));
        let tool = ToolDef { name: "t".into(), description: String::new(), parameters: serde_json::json!({}) };
        assert_ne!(prefix_key(&a, &[], false), prefix_key(&a, std::slice::from_ref(&tool), false));
        assert_eq!(prefix_key(&[Message::user("u")], &[], false), None);
    }

    #[test]
    fn documents_in_the_user_message_get_keys_of_their_own() {
        let doc_a = "a".repeat(5000);
        let doc_b = "b".repeat(5000);
        let ask = |doc: &str, q: &str| [Message::system("You answer questions."), Message::user(format!("{doc}\n{q}"))];
        let a1 = prefix_keys(&ask(&doc_a, "first?"), &[], false);
        let a2 = prefix_keys(&ask(&doc_a, "second?"), &[], false);
        let b1 = prefix_keys(&ask(&doc_b, "first?"), &[], false);
        // system key + 1 KiB + 4 KiB prefixes (the 5 KB message does not reach 16 KiB)
        assert_eq!(a1.len(), 3);
        assert_eq!(a1, a2, "same document, different questions: same keys");
        assert_eq!(a1[0], b1[0], "same system prompt");
        assert_ne!(a1[1], b1[1]);
        assert!(a1.windows(2).all(|w| w[0].1 < w[1].1), "shortest first");
        let system = [Message::system("You answer questions.")];
        let base = prefix_key(&system, &[], false);
        let user = format!("{doc_a}\nthird?");
        assert_eq!(longest_key(base, base_len(&system, &[]), &user), a1.last().copied());
        assert_eq!(longest_key(None, 0, "short"), None);
        // A short user message adds no key: nothing long is shared there.
        assert_eq!(prefix_keys(&ask("", "short"), &[], false).len(), 1);
    }

    #[test]
    fn ordinary_first_lines_are_kept() {
        assert_eq!(strip_session_preamble("Note: be brief\nx-a: b"), "Note: be brief\nx-a: b");
        assert_eq!(strip_session_preamble("x-: nothing"), "x-: nothing");
    }
}
