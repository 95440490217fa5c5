//! Finding the JSON value in a model's answer: the whole text, a fenced block, or JSON in prose.

use serde_json::Value;

use super::repair::repair_json;
use super::ExtractError;

/// Prose can hold many brackets (citations, code); trying each as a start is quadratic, so only the
/// first few are tried.
const MAX_PROSE_CANDIDATES: usize = 16;

/// A JSON value found in a model's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    pub value: Value,
    /// The value only parsed after [`repair_json`] fixed it.
    pub repaired: bool,
}

/// Find the JSON value a model meant in its answer: the whole text if it parses; else a ```json (or
/// bare ```) fenced block; else the longest balanced `{...}` or `[...]` in prose (so a citation
/// such as `[1]` before the answer is passed over); each candidate is repaired if it does not
/// parse. Returns the value and whether repair was needed.
pub fn extract_json(text: &str) -> Result<Extracted, ExtractError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(ExtractError::Empty);
    }
    if let Ok(value) = serde_json::from_str(trimmed) {
        return Ok(Extracted { value, repaired: false });
    }
    let mut first_failure: Option<ExtractError> = None;
    let mut attempt = |offset: usize, candidate: &str| match parse_or_repair(candidate) {
        Ok(found) => Some(found),
        Err(message) => {
            first_failure.get_or_insert(ExtractError::Invalid { offset, message });
            None
        }
    };
    for (offset, block) in fenced_blocks(text) {
        if let Some(found) = attempt(offset, block) {
            return Ok(found);
        }
    }
    // The longest value in prose, not the first: answers cite sources ("as [1] shows") before the
    // JSON, and a truncated answer ends in the value it was writing.
    let bytes = text.as_bytes();
    let mut best: Option<(usize, Extracted)> = None;
    let mut from = 0;
    for _ in 0..MAX_PROSE_CANDIDATES {
        let Some(start) = bytes.get(from..).and_then(|rest| rest.iter().position(|b| matches!(b, b'{' | b'['))) else {
            break;
        };
        let start = from + start;
        let end = balanced_end(bytes, start).unwrap_or(bytes.len());
        match text.get(start..end).and_then(|candidate| attempt(start, candidate)) {
            Some(found) => {
                if best.as_ref().is_none_or(|(len, _)| end - start > *len) {
                    best = Some((end - start, found));
                }
                from = end;
            }
            None => from = start + 1,
        }
    }
    if let Some((_, found)) = best {
        return Ok(found);
    }
    Err(first_failure.unwrap_or(ExtractError::NotFound))
}

/// The parse error is the one of the text as written: it points at the model's own mistake.
fn parse_or_repair(candidate: &str) -> Result<Extracted, String> {
    let candidate = candidate.trim();
    match serde_json::from_str(candidate) {
        Ok(value) => Ok(Extracted { value, repaired: false }),
        Err(error) => repair_json(candidate)
            .and_then(|fixed| serde_json::from_str(&fixed).ok())
            .map(|value| Extracted { value, repaired: true })
            .ok_or_else(|| error.to_string()),
    }
}

/// Contents of fenced code blocks with their byte offsets: blocks tagged `json` (also `json5`,
/// `jsonc`) first, then untagged ones; blocks in other languages are skipped. An unclosed fence (a
/// truncated answer) runs to the end of the text.
fn fenced_blocks(text: &str) -> Vec<(usize, &str)> {
    let mut tagged = Vec::new();
    let mut bare = Vec::new();
    let mut from = 0;
    while let Some(found) = text.get(from..).and_then(|rest| rest.find("```")) {
        let open = from + found + 3;
        if !at_line_start(text, from + found) {
            from = open;
            continue;
        }
        let rest = text.get(open..).unwrap_or_default();
        let tag_len = rest.bytes().take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-')).count();
        let content_start = open + tag_len;
        let (content_end, next) = closing_fence(text, content_start);
        let content = text.get(content_start..content_end).unwrap_or_default();
        let tag = &rest[..tag_len];
        if tag.is_empty() {
            bare.push((content_start, content));
        } else if tag.get(..4).is_some_and(|t| t.eq_ignore_ascii_case("json")) {
            tagged.push((content_start, content));
        }
        from = next;
    }
    tagged.extend(bare);
    tagged
}

/// An opening fence must start its line, as in Markdown. Serialised JSON never has a line that
/// starts inside a string, so a fence inside a JSON string is never taken for one; an inline fence
/// after prose is still found by the prose scan.
fn at_line_start(text: &str, at: usize) -> bool {
    let before = text.get(..at).unwrap_or_default().trim_end_matches([' ', '\t']);
    before.is_empty() || before.ends_with('\n')
}

/// Where a fenced block's content ends and scanning resumes. A closing fence belongs at the start
/// of a line; that rule keeps a fence inside a JSON string from ending the block. Models also close
/// fences at the end of a line, which is the fallback.
fn closing_fence(text: &str, content_start: usize) -> (usize, usize) {
    let rest = text.get(content_start..).unwrap_or_default();
    let mut line_start = 0;
    for line in rest.split_inclusive('\n') {
        if line_start > 0 && line.trim_start_matches([' ', '\t']).starts_with("```") {
            let fence = line_start + (line.len() - line.trim_start_matches([' ', '\t']).len());
            return (content_start + line_start, content_start + fence + 3);
        }
        line_start += line.len();
    }
    match rest.find("```") {
        Some(at) => (content_start + at, content_start + at + 3),
        None => (text.len(), text.len()),
    }
}

/// The end (exclusive) of the bracketed value starting at `start`, skipping brackets inside quoted
/// strings (single quotes too: models write Python dicts). `None` when the text ends first.
fn balanced_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut closers: Vec<u8> = Vec::new();
    let mut quote: Option<u8> = None;
    let mut escaped = false;
    for (i, &b) in bytes.iter().enumerate().skip(start) {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == q {
                quote = None;
            }
            continue;
        }
        match b {
            b'"' | b'\'' => quote = Some(b),
            b'{' => closers.push(b'}'),
            b'[' => closers.push(b']'),
            b'}' | b']' => {
                // A closer of the wrong kind closes the open brackets above its match, as repair does.
                let Some(depth) = closers.iter().rposition(|&c| c == b) else { return Some(i) };
                closers.truncate(depth);
                if closers.is_empty() {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::{extract_json, Extracted};
    use crate::output::ExtractError;

    fn clean(value: serde_json::Value) -> Extracted {
        Extracted { value, repaired: false }
    }

    #[test]
    fn whole_text() {
        assert_eq!(extract_json("  {\"a\": 1}\n").unwrap(), clean(json!({"a": 1})));
        assert_eq!(extract_json("42").unwrap(), clean(json!(42)));
        assert_eq!(extract_json("\"text\"").unwrap(), clean(json!("text")));
    }

    #[test]
    fn fenced_json_block() {
        let text = "Here is the review:\n```json\n{\"bugs\": [\"x\"], \"severity\": 2}\n```\nLet me know.";
        assert_eq!(extract_json(text).unwrap(), clean(json!({"bugs": ["x"], "severity": 2})));
    }

    #[test]
    fn json_block_preferred_over_bare_and_other_languages() {
        let text = "```python\nprint({'a': 1})\n```\n```\n[1]\n```\n```JSON\n{\"b\": 2}\n```";
        assert_eq!(extract_json(text).unwrap(), clean(json!({"b": 2})));
    }

    #[test]
    fn bare_fence_and_inline_fence() {
        assert_eq!(extract_json("```\n[1, 2]\n```").unwrap(), clean(json!([1, 2])));
        assert_eq!(extract_json("Answer: ```json {\"a\": 1}``` done").unwrap(), clean(json!({"a": 1})));
    }

    #[test]
    fn fence_inside_a_json_string_does_not_end_the_block() {
        let text = "```json\n{\"code\": \"```rust\\nfn main() {}\\n```\"}\n```";
        assert_eq!(extract_json(text).unwrap(), clean(json!({"code": "```rust\nfn main() {}\n```"})));
    }

    #[test]
    fn fence_marker_inside_json_in_prose_is_not_a_fence() {
        assert_eq!(extract_json("[\"```\"],").unwrap(), clean(json!(["```"])));
        assert_eq!(extract_json("Result: {\"a\": \"```json\"} ok").unwrap(), clean(json!({"a": "```json"})));
    }

    #[test]
    fn fenced_block_with_mistakes_is_repaired() {
        let text = "```json\n{'a': 1, 'b': [True, None],}\n```";
        assert_eq!(
            extract_json(text).unwrap(),
            Extracted { value: json!({"a": 1, "b": [true, null]}), repaired: true }
        );
    }

    #[test]
    fn unclosed_fence_from_a_truncated_answer() {
        let text = "```json\n{\"bugs\": [\"off by one\", \"nul";
        let found = extract_json(text).unwrap();
        assert_eq!(found, Extracted { value: json!({"bugs": ["off by one", "nul"]}), repaired: true });
    }

    #[test]
    fn json_in_prose() {
        let text = "Sure! The answer is {\"a\": {\"b\": [1, 2]}, \"c\": \"}\"} as requested.";
        assert_eq!(extract_json(text).unwrap(), clean(json!({"a": {"b": [1, 2]}, "c": "}"})));
    }

    #[test]
    fn python_dict_in_prose_is_repaired() {
        let text = "I think the result is {'severity': 3, 'bugs': ['it\\'s broken']}. Thanks!";
        let found = extract_json(text).unwrap();
        assert_eq!(found, Extracted { value: json!({"severity": 3, "bugs": ["it's broken"]}), repaired: true });
    }

    #[test]
    fn truncated_json_in_prose() {
        let found = extract_json("Result: {\"a\": [1, 2, {\"b\": tru").unwrap();
        assert_eq!(found, Extracted { value: json!({"a": [1, 2, {"b": true}]}), repaired: true });
    }

    #[test]
    fn citations_before_the_json_are_passed_over() {
        let text = "Based on [1] and [2], the result is {\"sources\": [1, 2], \"ok\": true}. See also [3].";
        assert_eq!(extract_json(text).unwrap(), clean(json!({"sources": [1, 2], "ok": true})));
        let truncated = extract_json("Per [1]: {\"a\": [1, 2, {\"b\": tru").unwrap();
        assert_eq!(truncated, Extracted { value: json!({"a": [1, 2, {"b": true}]}), repaired: true });
    }

    #[test]
    fn skips_unparseable_bracket_before_the_json() {
        let text = "As noted in [the docs], use {\"a\": 1}.";
        assert_eq!(extract_json(text).unwrap(), clean(json!({"a": 1})));
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(matches!(extract_json("  \n"), Err(ExtractError::Empty)));
        assert!(matches!(extract_json("no structured answer here"), Err(ExtractError::NotFound)));
        let err = extract_json("Result: {\"a\": 1 2 3 ?}").unwrap_err();
        assert!(matches!(err, ExtractError::Invalid { offset: 8, .. }), "{err:?}");
        assert!(err.to_string().contains("byte 8"), "{err}");
    }
}
