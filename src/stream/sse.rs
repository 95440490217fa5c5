//! Incremental Server-Sent Events parser following the WHATWG `EventSource` parsing rules.
//!
//! Bytes are fed as they arrive from the network, split anywhere. Only complete lines are decoded,
//! so a UTF-8 character split across chunks is never mangled, and a CR at the end of one chunk
//! followed by an LF at the start of the next counts as one line end. Lines that lie wholly inside
//! a chunk are parsed in place; only the unfinished tail of a chunk is copied into a buffer.

use memchr::{memchr, memchr2};

use crate::conversation::{BackendError, ChatResponse, StreamEvent};
use crate::limits::{TooLarge, DEFAULT_MAX_RESPONSE_BYTES};

/// One dispatched event. `event` is `None` when the stream gave no `event:` field (the spec's
/// default type "message"); `id` is the last event id seen on the stream, which persists across
/// events as the spec requires.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
    pub id: Option<String>,
}

/// How a byte stream ended, as reported by `finish()` of the stream parsers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Every byte belonged to a complete line and no event was left half-built.
    Clean,
    /// The stream stopped inside a line or inside an event (fields seen, no blank line yet): the
    /// connection was probably cut, and the partial event has been discarded.
    Truncated,
}

/// Turns parsed SSE events into one assembled turn (`OpenAI` chunks, Anthropic events).
pub trait SseTurn {
    fn push_event(&mut self, event: &SseEvent, out: &mut Vec<StreamEvent>) -> Result<(), BackendError>;
    fn finish(self, end: StreamEnd) -> Result<ChatResponse, BackendError>;
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

#[derive(Debug)]
pub struct SseParser {
    /// Longest line, and most event data, accepted (`max_response_bytes`).
    max: usize,
    /// Bytes of a line that has not ended yet.
    partial: Vec<u8>,
    /// The previous chunk ended with CR: an LF starting the next chunk belongs to that line end.
    skip_lf: bool,
    /// A leading byte-order mark may still be in `partial`, undecided.
    bom_done: bool,
    event_type: String,
    /// `None` until a `data:` line arrives: an event without data is never dispatched.
    data: Option<String>,
    last_id: Option<String>,
    /// Any field line seen since the last dispatch (for truncation detection).
    in_event: bool,
    retry_ms: Option<u64>,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::with_limit(DEFAULT_MAX_RESPONSE_BYTES)
    }
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// A parser that fails once a line or an event's data outgrows `max` bytes.
    pub fn with_limit(max: usize) -> Self {
        Self {
            max,
            partial: Vec::new(),
            skip_lf: false,
            bom_done: false,
            event_type: String::new(),
            data: None,
            last_id: None,
            in_event: false,
            retry_ms: None,
        }
    }

    /// The reconnection time the server last asked for with a `retry:` field, in milliseconds.
    pub fn retry_ms(&self) -> Option<u64> {
        self.retry_ms
    }

    /// Feeds the next bytes of the stream and returns the events completed by them.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, TooLarge> {
        let mut out = Vec::new();
        self.feed_with(chunk, |e| out.push(e))?;
        Ok(out)
    }

    /// Like [`feed`](Self::feed), handing each completed event to `on_event` without collecting.
    /// After an error the parser's state is undefined: the stream is to be abandoned.
    pub fn feed_with(&mut self, chunk: &[u8], mut on_event: impl FnMut(SseEvent)) -> Result<(), TooLarge> {
        if !self.bom_done {
            let mut head = std::mem::take(&mut self.partial);
            head.extend_from_slice(chunk);
            if head.len() < BOM.len() && BOM.starts_with(&head) {
                self.partial = head;
                return Ok(());
            }
            self.bom_done = true;
            let rest = head.strip_prefix(BOM).unwrap_or(&head);
            return self.feed_lines(rest, &mut on_event);
        }
        self.feed_lines(chunk, &mut on_event)
    }

    /// Ends the stream. A line or event left unfinished is discarded (the spec never dispatches
    /// it); the return value tells whether that happened.
    pub fn finish(&mut self) -> StreamEnd {
        let truncated = !self.partial.is_empty() || self.in_event;
        self.partial.clear();
        self.reset_event();
        self.skip_lf = false;
        if truncated {
            StreamEnd::Truncated
        } else {
            StreamEnd::Clean
        }
    }

    fn feed_lines(&mut self, mut chunk: &[u8], on_event: &mut impl FnMut(SseEvent)) -> Result<(), TooLarge> {
        if self.skip_lf {
            let Some((&first, rest)) = chunk.split_first() else { return Ok(()) };
            self.skip_lf = false;
            if first == b'\n' {
                chunk = rest;
            }
        }
        if !self.partial.is_empty() {
            let Some(end) = memchr2(b'\n', b'\r', chunk) else {
                return self.keep_partial(chunk);
            };
            let (head, _) = chunk.split_at(end);
            self.check_line(self.partial.len().saturating_add(head.len()))?;
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(head);
            self.process_line(&line, on_event)?;
            // Keep the allocation for the next partial line.
            line.clear();
            self.partial = line;
            chunk = self.skip_line_end(chunk, end);
        }
        while let Some(end) = memchr2(b'\n', b'\r', chunk) {
            let (line, _) = chunk.split_at(end);
            self.process_line(line, on_event)?;
            chunk = self.skip_line_end(chunk, end);
        }
        self.keep_partial(chunk)
    }

    /// Keeps the unfinished end of a chunk for the next one, within the limit.
    #[inline]
    fn keep_partial(&mut self, tail: &[u8]) -> Result<(), TooLarge> {
        self.check_line(self.partial.len().saturating_add(tail.len()))?;
        self.partial.extend_from_slice(tail);
        Ok(())
    }

    #[inline]
    fn check_line(&self, len: usize) -> Result<(), TooLarge> {
        if len > self.max {
            return Err(TooLarge { what: "an SSE line", limit: self.max });
        }
        Ok(())
    }

    /// Returns the rest of `chunk` after the line end at `end` (CRLF, CR or LF).
    #[inline]
    fn skip_line_end<'a>(&mut self, chunk: &'a [u8], end: usize) -> &'a [u8] {
        let rest = chunk.get(end.saturating_add(1)..).unwrap_or_default();
        if chunk.get(end) == Some(&b'\r') {
            match rest.split_first() {
                Some((b'\n', after)) => after,
                Some(_) => rest,
                None => {
                    self.skip_lf = true;
                    &[]
                }
            }
        } else {
            rest
        }
    }

    #[inline]
    fn process_line(&mut self, line: &[u8], on_event: &mut impl FnMut(SseEvent)) -> Result<(), TooLarge> {
        let Some(&first) = line.first() else {
            self.dispatch(on_event);
            return Ok(());
        };
        if first == b':' {
            return Ok(());
        }
        let (field, value) = match memchr(b':', line) {
            Some(i) => {
                let (field, rest) = line.split_at(i);
                let v = rest.get(1..).unwrap_or_default();
                (field, v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if let Some(data) = &mut self.data {
                    if data.len().saturating_add(value.len()) >= self.max {
                        return Err(TooLarge { what: "an SSE event's data", limit: self.max });
                    }
                    data.push('\n');
                    push_lossy(data, value);
                } else {
                    let mut data = String::with_capacity(value.len());
                    push_lossy(&mut data, value);
                    self.data = Some(data);
                }
                self.in_event = true;
            }
            b"event" => {
                self.event_type.clear();
                push_lossy(&mut self.event_type, value);
                self.in_event = true;
            }
            b"id" => {
                // The spec ignores an id containing NUL.
                if memchr(0, value).is_none() {
                    let mut id = String::new();
                    push_lossy(&mut id, value);
                    self.last_id = Some(id);
                }
                self.in_event = true;
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                self.retry_ms = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok());
            }
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(SseEvent)) {
        if let Some(data) = self.data.take() {
            let event = SseEvent {
                event: if self.event_type.is_empty() { None } else { Some(std::mem::take(&mut self.event_type)) },
                data,
                id: self.last_id.clone().filter(|id| !id.is_empty()),
            };
            on_event(event);
        }
        self.reset_event();
    }

    fn reset_event(&mut self) {
        self.event_type.clear();
        self.data = None;
        self.in_event = false;
    }
}

#[inline]
fn push_lossy(dst: &mut String, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => dst.push_str(s),
        Err(_) => dst.push_str(&String::from_utf8_lossy(bytes)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::arithmetic_side_effects)]
    use proptest::prelude::*;

    use super::*;

    fn parse_all(bytes: &[u8]) -> (Vec<SseEvent>, StreamEnd) {
        let mut p = SseParser::new();
        let events = p.feed(bytes).unwrap();
        (events, p.finish())
    }

    fn data(e: &[SseEvent]) -> Vec<&str> {
        e.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn basic_events_with_types_and_ids() {
        let (events, end) = parse_all(b"event: ping\ndata: {}\n\nid: 7\ndata: a\n\n");
        assert_eq!(end, StreamEnd::Clean);
        assert_eq!(
            events,
            vec![
                SseEvent { event: Some("ping".into()), data: "{}".into(), id: None },
                SseEvent { event: None, data: "a".into(), id: Some("7".into()) },
            ]
        );
    }

    #[test]
    fn all_line_endings_are_equivalent() {
        for sep in ["\n", "\r\n", "\r"] {
            let text = format!("data: x{sep}data: y{sep}{sep}: c{sep}data:z{sep}{sep}");
            let (events, end) = parse_all(text.as_bytes());
            assert_eq!(data(&events), vec!["x\ny", "z"], "separator {sep:?}");
            assert_eq!(end, StreamEnd::Clean);
        }
    }

    #[test]
    fn cr_at_chunk_end_then_lf_is_one_line_end() {
        let mut p = SseParser::new();
        assert!(p.feed(b"data: a\r").unwrap().is_empty());
        // If the LF were a second line end, the event would be dispatched here with an empty line.
        assert!(p.feed(b"\ndata: b\r").unwrap().is_empty());
        let events = p.feed(b"\n\r\n").unwrap();
        assert_eq!(data(&events), vec!["a\nb"]);
        assert_eq!(p.finish(), StreamEnd::Clean);
    }

    #[test]
    fn only_one_space_after_colon_is_stripped() {
        let (events, _) = parse_all(b"data:  two\ndata:none\ndata\n\n");
        assert_eq!(data(&events), vec![" two\nnone\n"]);
    }

    #[test]
    fn event_without_data_is_not_dispatched_and_type_resets() {
        let (events, end) = parse_all(b"event: lonely\n\ndata: x\n\n");
        assert_eq!(events, vec![SseEvent { event: None, data: "x".into(), id: None }]);
        assert_eq!(end, StreamEnd::Clean);
    }

    #[test]
    fn empty_data_line_is_dispatched_as_empty_string() {
        let (events, _) = parse_all(b"data:\n\n");
        assert_eq!(data(&events), vec![""]);
    }

    #[test]
    fn id_persists_and_nul_id_is_ignored() {
        let (events, _) = parse_all(b"id: 1\ndata: a\n\ndata: b\n\nid: x\0y\ndata: c\n\nid\ndata: d\n\n");
        let ids: Vec<_> = events.iter().map(|e| e.id.as_deref()).collect();
        assert_eq!(ids, vec![Some("1"), Some("1"), Some("1"), None]);
    }

    #[test]
    fn trailing_event_without_blank_line_is_dropped_and_reported() {
        let (events, end) = parse_all(b"data: a\n\ndata: cut");
        assert_eq!(data(&events), vec!["a"]);
        assert_eq!(end, StreamEnd::Truncated);
        let (events, end) = parse_all(b"data: a\n\ndata: complete line but no blank\n");
        assert_eq!(data(&events), vec!["a"]);
        assert_eq!(end, StreamEnd::Truncated);
    }

    #[test]
    fn trailing_comment_is_a_clean_end() {
        let (_, end) = parse_all(b"data: a\n\n: keep-alive\n");
        assert_eq!(end, StreamEnd::Clean);
    }

    #[test]
    fn leading_bom_is_skipped_even_when_split() {
        let mut p = SseParser::new();
        assert!(p.feed(b"\xEF").unwrap().is_empty());
        assert!(p.feed(b"\xBB").unwrap().is_empty());
        let events = p.feed(b"\xBFdata: x\n\n").unwrap();
        assert_eq!(data(&events), vec!["x"]);
    }

    #[test]
    fn retry_field_is_recorded_only_when_all_digits() {
        let mut p = SseParser::new();
        p.feed(b"retry: 1500\n\nretry: 12a\n\n").unwrap();
        assert_eq!(p.retry_ms(), Some(1500));
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        let (events, _) = parse_all(b"data: a\xFFb\n\n");
        assert_eq!(data(&events), vec!["a\u{FFFD}b"]);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let (events, _) = parse_all(b"foo: bar\ndata: x\n\n");
        assert_eq!(data(&events), vec!["x"]);
    }

    fn split_feed(bytes: &[u8], cuts: &[usize]) -> (Vec<SseEvent>, StreamEnd) {
        let mut p = SseParser::new();
        let mut events = Vec::new();
        let mut start = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        for c in cuts {
            events.extend(p.feed(&bytes[start..c]).unwrap());
            start = c;
        }
        events.extend(p.feed(&bytes[start..]).unwrap());
        (events, p.finish())
    }

    const SAMPLE: &str = "\u{FEFF}: comment\r\nevent: delta\r\ndata: {\"t\":\"h\u{e9}llo \u{1F600}\"}\r\n\r\n\
                          id: 9\rdata: line1\rdata: line2\r\r\
                          data: [DONE]\n\ndata: tail";

    proptest! {
        #[test]
        fn any_split_gives_the_same_events(cuts in proptest::collection::vec(0usize..200, 0..12)) {
            let whole = parse_all(SAMPLE.as_bytes());
            prop_assert_eq!(whole.0.len(), 3);
            prop_assert_eq!(whole.1, StreamEnd::Truncated);
            prop_assert_eq!(split_feed(SAMPLE.as_bytes(), &cuts), whole);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_split_invariant(
            bytes in proptest::collection::vec(prop_oneof![
                Just(b'\n'), Just(b'\r'), Just(b':'), Just(b' '), Just(b'd'), Just(b'a'), Just(b't'),
                Just(0xE2u8), Just(0x82u8), Just(0xACu8), any::<u8>()
            ], 0..120),
            cuts in proptest::collection::vec(0usize..130, 0..8),
        ) {
            prop_assert_eq!(split_feed(&bytes, &cuts), parse_all(&bytes));
        }
    }
}
