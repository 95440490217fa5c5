//! Incremental newline-delimited JSON splitter (Ollama's native streaming format).
//!
//! Yields each complete, non-blank line as text; the caller parses the JSON. LF and CRLF line ends,
//! lines split anywhere across chunks (UTF-8 included), blank lines skipped.

use memchr::memchr;

pub use super::sse::StreamEnd;
use crate::limits::{TooLarge, DEFAULT_MAX_RESPONSE_BYTES};

#[derive(Debug)]
pub struct NdjsonParser {
    partial: Vec<u8>,
    /// Longest line accepted (`max_response_bytes`).
    max: usize,
}

impl Default for NdjsonParser {
    fn default() -> Self {
        Self::with_limit(DEFAULT_MAX_RESPONSE_BYTES)
    }
}

impl NdjsonParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// A parser that fails once an unfinished line outgrows `max` bytes.
    pub fn with_limit(max: usize) -> Self {
        Self { partial: Vec::new(), max }
    }

    /// Feeds the next bytes and returns the complete lines they finish.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<String>, TooLarge> {
        let mut out = Vec::new();
        self.feed_with(chunk, |line| out.push(line.to_owned()))?;
        Ok(out)
    }

    /// Like [`feed`](Self::feed), lending each line to `on_line` without copying it when the line
    /// lies wholly inside `chunk`.
    pub fn feed_with(&mut self, mut chunk: &[u8], mut on_line: impl FnMut(&str)) -> Result<(), TooLarge> {
        if !self.partial.is_empty() {
            let Some(end) = memchr(b'\n', chunk) else {
                return self.keep_partial(chunk);
            };
            let (head, rest) = chunk.split_at(end);
            self.check(self.partial.len().saturating_add(head.len()))?;
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(head);
            emit(&line, &mut on_line);
            line.clear();
            self.partial = line;
            chunk = rest.get(1..).unwrap_or_default();
        }
        while let Some(end) = memchr(b'\n', chunk) {
            let (line, rest) = chunk.split_at(end);
            emit(line, &mut on_line);
            chunk = rest.get(1..).unwrap_or_default();
        }
        self.keep_partial(chunk)
    }

    #[inline]
    fn keep_partial(&mut self, tail: &[u8]) -> Result<(), TooLarge> {
        self.check(self.partial.len().saturating_add(tail.len()))?;
        self.partial.extend_from_slice(tail);
        Ok(())
    }

    #[inline]
    fn check(&self, len: usize) -> Result<(), TooLarge> {
        if len > self.max {
            return Err(TooLarge { what: "an NDJSON line", limit: self.max });
        }
        Ok(())
    }

    /// Ends the stream. A final line without a newline is still a complete JSON value if it parses
    /// (servers may omit the last newline), so it is handed out; `Truncated` is reported only when
    /// it does not parse as JSON.
    pub fn finish_with(&mut self, mut on_line: impl FnMut(&str)) -> StreamEnd {
        let line = std::mem::take(&mut self.partial);
        let trimmed = trim_line(&line);
        if trimmed.iter().all(u8::is_ascii_whitespace) {
            return StreamEnd::Clean;
        }
        if serde_json::from_slice::<serde::de::IgnoredAny>(trimmed).is_ok() {
            emit(trimmed, &mut on_line);
            StreamEnd::Clean
        } else {
            StreamEnd::Truncated
        }
    }

    /// [`finish_with`](Self::finish_with), collecting the last line if there is one.
    pub fn finish(&mut self) -> (Option<String>, StreamEnd) {
        let mut last = None;
        let end = self.finish_with(|l| last = Some(l.to_owned()));
        (last, end)
    }
}

#[inline]
fn trim_line(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[inline]
fn emit(line: &[u8], on_line: &mut impl FnMut(&str)) {
    let line = trim_line(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    match std::str::from_utf8(line) {
        Ok(s) => on_line(s),
        Err(_) => on_line(&String::from_utf8_lossy(line)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::arithmetic_side_effects)]
    use proptest::prelude::*;

    use super::*;

    fn all(bytes: &[u8]) -> (Vec<String>, StreamEnd) {
        let mut p = NdjsonParser::new();
        let mut lines = p.feed(bytes).unwrap();
        let (last, end) = p.finish();
        lines.extend(last);
        (lines, end)
    }

    #[test]
    fn lines_crlf_and_blank_lines() {
        let (lines, end) = all(b"{\"a\":1}\r\n\n  \r\n{\"b\":2}\n");
        assert_eq!(lines, vec!["{\"a\":1}", "{\"b\":2}"]);
        assert_eq!(end, StreamEnd::Clean);
    }

    #[test]
    fn final_line_without_newline_is_kept_if_complete() {
        let (lines, end) = all(b"{\"a\":1}\n{\"done\":true}");
        assert_eq!(lines, vec!["{\"a\":1}", "{\"done\":true}"]);
        assert_eq!(end, StreamEnd::Clean);
    }

    #[test]
    fn cut_final_line_is_truncated() {
        let (lines, end) = all(b"{\"a\":1}\n{\"done\":tr");
        assert_eq!(lines, vec!["{\"a\":1}"]);
        assert_eq!(end, StreamEnd::Truncated);
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_lines(cuts in proptest::collection::vec(0usize..80, 0..10)) {
            let text = "{\"m\":\"h\u{e9}\u{1F600}\"}\r\n\n{\"x\":[1,2]}\n{\"done\":true}".as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (text.len() + 1)).collect();
            cuts.sort_unstable();
            let mut p = NdjsonParser::new();
            let mut lines = Vec::new();
            let mut start = 0;
            for c in cuts {
                lines.extend(p.feed(&text[start..c]).unwrap());
                start = c;
            }
            lines.extend(p.feed(&text[start..]).unwrap());
            let (last, end) = p.finish();
            lines.extend(last);
            prop_assert_eq!((lines, end), all(text));
        }
    }
}
