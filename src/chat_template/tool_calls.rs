//! Tool calls read out of a completion's text, in the forms the chat templates ask the model for
//! (a `/completions` answer is raw text: vLLM runs its tool parsers on chat requests only).

use serde::Deserialize;
use serde_json::value::RawValue;

/// A call as the model wrote it: the tool's name and its arguments' JSON text, unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: String,
}

/// How a template asks for tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallFormat {
    /// Hermes / Qwen2.5: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block
    /// per call, text before them as the content (vLLM's `hermes` parser).
    Hermes,
    /// Llama 3.1: the whole answer is `{"name": ..., "parameters": {...}}`, optionally after
    /// `<|python_tag|>`, several joined by `;` (vLLM's `llama3_json` parser, which also takes
    /// `"arguments"`).
    LlamaJson,
}

#[derive(Deserialize)]
struct Call<'a> {
    name: String,
    #[serde(borrow, default)]
    arguments: Option<&'a RawValue>,
    #[serde(borrow, default)]
    parameters: Option<&'a RawValue>,
}

impl Call<'_> {
    fn into_parsed(self) -> ParsedCall {
        let arguments = self.arguments.or(self.parameters).map_or_else(|| "{}".to_owned(), |raw| raw.get().to_owned());
        ParsedCall { name: self.name, arguments }
    }
}

impl std::str::FromStr for ToolCallFormat {
    type Err = String;

    /// vLLM's `--tool-call-parser` names.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hermes" => Ok(Self::Hermes),
            "llama3_json" => Ok(Self::LlamaJson),
            _ => Err(format!("unknown tool call parser {s:?}: expected hermes or llama3_json")),
        }
    }
}

impl ToolCallFormat {
    /// The form a chat template (its Jinja source) asks the model to call tools in: Hermes blocks
    /// where it writes `<tool_call>`, Llama 3.1 JSON where it speaks of `ipython` results or
    /// `"parameters"`, Hermes otherwise.
    pub fn of_template(source: &str) -> Self {
        if source.contains("<tool_call>") {
            Self::Hermes
        } else if source.contains("ipython") || source.contains("\"parameters\"") {
            Self::LlamaJson
        } else {
            Self::Hermes
        }
    }

    /// vLLM's name for this form's parser.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hermes => "hermes",
            Self::LlamaJson => "llama3_json",
        }
    }

    /// A reader of this form's calls as an answer streams.
    pub fn stream(self) -> ToolCallStream {
        match self {
            Self::Hermes => ToolCallStream::Hermes(HermesStream::default()),
            Self::LlamaJson => ToolCallStream::LlamaJson(LlamaJsonStream::default()),
        }
    }

    /// The content and the calls of an answer. Markup that does not parse stays in the content, as
    /// the servers' parsers leave it.
    pub fn parse(self, text: &str) -> (String, Vec<ParsedCall>) {
        match self {
            Self::Hermes => hermes(text),
            Self::LlamaJson => {
                llama_json(text).map_or_else(|| (text.to_owned(), Vec::new()), |calls| (String::new(), calls))
            }
        }
    }

    /// One call in this form, as the model writes it (what the simulator answers).
    pub fn write(self, name: &str, arguments: &str) -> String {
        let name = serde_json::Value::String(name.to_owned()).to_string();
        match self {
            Self::Hermes => format!("<tool_call>\n{{\"name\": {name}, \"arguments\": {arguments}}}\n</tool_call>"),
            Self::LlamaJson => format!("{{\"name\": {name}, \"parameters\": {arguments}}}"),
        }
    }
}

fn hermes(text: &str) -> (String, Vec<ParsedCall>) {
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("<tool_call>") {
        let after = &rest[start + "<tool_call>".len()..];
        let Some(end) = after.find("</tool_call>") else { break };
        let Ok(call) = serde_json::from_str::<Call<'_>>(after[..end].trim()) else { break };
        content.push_str(&rest[..start]);
        calls.push(call.into_parsed());
        rest = &after[end + "</tool_call>".len()..];
    }
    content.push_str(rest);
    (content.trim().to_owned(), calls)
}

/// What a streamed Hermes answer adds, as [`HermesStream`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamPiece {
    /// Text of the content.
    Content(String),
    /// A whole tool call, once its block has closed.
    Call(ParsedCall),
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// The length in bytes of the longest suffix of `text` that is a proper prefix of one of `needles`:
/// what a stream holds back, since more text could complete a needle there (a tool-call tag, a
/// stop string).
pub fn partial_match_len<S: AsRef<str>>(text: &str, needles: &[S]) -> usize {
    let longest = needles.iter().map(|n| n.as_ref().len()).max().unwrap_or(0);
    let mut from = text.len().saturating_sub(longest.saturating_sub(1));
    while !text.is_char_boundary(from) {
        from += 1;
    }
    (from..text.len())
        .filter(|&p| text.is_char_boundary(p))
        .find(|&p| {
            let tail = &text[p..];
            needles.iter().any(|n| n.as_ref().len() > tail.len() && n.as_ref().starts_with(tail))
        })
        .map_or(0, |p| text.len() - p)
}

/// Reads Hermes tool calls out of an answer as it streams: content goes out as soon as it cannot be
/// the start of a `<tool_call>` block, and each call once its block has closed. The pieces add up to
/// [`ToolCallFormat::parse`] of the whole text: the same content, byte for byte (leading and
/// trailing whitespace dropped, whitespace between pieces held until more content follows), and the
/// same calls; a block that does not parse, or is never closed, is content from its tag on, and so
/// is everything after it, as in the unstreamed parser.
#[derive(Debug, Default)]
pub struct HermesStream {
    /// Text not yet given out: after the last block outside one, the block's body inside one.
    buf: String,
    inside: bool,
    /// A block failed to parse: the rest is content.
    failed: bool,
    /// Content given out so far is not empty (leading whitespace is dropped until then).
    started: bool,
    /// Trailing whitespace of the content, given out only if more content follows.
    pending_ws: String,
}

impl HermesStream {
    /// The pieces `text` completes.
    pub fn push(&mut self, text: &str) -> Vec<StreamPiece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.failed {
                let all = std::mem::take(&mut self.buf);
                self.content(&all, &mut out);
                return out;
            }
            if self.inside {
                let Some(end) = self.buf.find(CLOSE) else { return out };
                let body = self.buf[..end].to_owned();
                let rest = self.buf[end + CLOSE.len()..].to_owned();
                self.inside = false;
                if let Ok(call) = serde_json::from_str::<Call<'_>>(body.trim()) {
                    out.push(StreamPiece::Call(call.into_parsed()));
                    self.buf = rest;
                } else {
                    self.failed = true;
                    self.buf = format!("{OPEN}{body}{CLOSE}{rest}");
                }
                continue;
            }
            if let Some(start) = self.buf.find(OPEN) {
                let before = self.buf[..start].to_owned();
                self.content(&before, &mut out);
                self.buf.drain(..start + OPEN.len());
                self.inside = true;
                continue;
            }
            // Hold back what could be the start of a tag.
            let keep = partial_match_len(&self.buf, &[OPEN]);
            let ready = self.buf[..self.buf.len() - keep].to_owned();
            self.buf.drain(..self.buf.len() - keep);
            self.content(&ready, &mut out);
            return out;
        }
    }

    /// The pieces left at the end of the answer: an unclosed block and held text are content.
    pub fn finish(&mut self) -> Vec<StreamPiece> {
        if self.inside {
            self.inside = false;
            self.buf.insert_str(0, OPEN);
        }
        self.failed = true;
        let mut out = self.push("");
        // Trailing whitespace is dropped, as the unstreamed parser trims it.
        self.pending_ws.clear();
        out.retain(|p| !matches!(p, StreamPiece::Content(c) if c.is_empty()));
        out
    }

    fn content(&mut self, text: &str, out: &mut Vec<StreamPiece>) {
        let text = if self.started { text } else { text.trim_start() };
        if text.is_empty() {
            return;
        }
        let body = text.trim_end();
        if body.is_empty() {
            self.pending_ws.push_str(text);
            return;
        }
        let mut piece = std::mem::take(&mut self.pending_ws);
        piece.push_str(body);
        self.pending_ws.push_str(&text[body.len()..]);
        self.started = true;
        match out.last_mut() {
            Some(StreamPiece::Content(last)) => last.push_str(&piece),
            _ => out.push(StreamPiece::Content(piece)),
        }
    }
}

/// Reads Llama 3.1 JSON calls out of an answer as it streams. The whole answer is the calls or is
/// content, so an answer that could still be calls (its first characters, past whitespace, are
/// `{` or a prefix of `<|python_tag|>`) is held to its end and parsed whole; any other answer goes
/// out as content as it comes. The pieces add up to [`ToolCallFormat::parse`] of the whole text.
#[derive(Debug, Default)]
pub struct LlamaJsonStream {
    held: String,
    /// `Some(true)`: held to the end; `Some(false)`: content as it comes; `None`: undecided.
    calls: Option<bool>,
}

const PYTHON_TAG: &str = "<|python_tag|>";

impl LlamaJsonStream {
    pub fn push(&mut self, text: &str) -> Vec<StreamPiece> {
        if self.calls == Some(false) {
            return if text.is_empty() { Vec::new() } else { vec![StreamPiece::Content(text.to_owned())] };
        }
        self.held.push_str(text);
        if self.calls.is_none() {
            let start = self.held.trim_start();
            if start.is_empty() {
                return Vec::new();
            }
            let could_be_calls = start.starts_with('{')
                || start.starts_with(PYTHON_TAG)
                || (start.len() < PYTHON_TAG.len() && PYTHON_TAG.starts_with(start));
            if !could_be_calls {
                self.calls = Some(false);
                return vec![StreamPiece::Content(std::mem::take(&mut self.held))];
            }
            if start.starts_with('{') || start.starts_with(PYTHON_TAG) {
                self.calls = Some(true);
            }
        }
        Vec::new()
    }

    pub fn finish(&mut self) -> Vec<StreamPiece> {
        let held = std::mem::take(&mut self.held);
        if held.is_empty() {
            return Vec::new();
        }
        let (content, calls) = ToolCallFormat::LlamaJson.parse(&held);
        let mut out: Vec<StreamPiece> = calls.into_iter().map(StreamPiece::Call).collect();
        if !content.is_empty() {
            out.insert(0, StreamPiece::Content(content));
        }
        out
    }
}

/// A streamed answer's tool-call reader, in the form the served model's template asks for.
#[derive(Debug)]
pub enum ToolCallStream {
    Hermes(HermesStream),
    LlamaJson(LlamaJsonStream),
}

impl ToolCallStream {
    /// The pieces `text` completes.
    pub fn push(&mut self, text: &str) -> Vec<StreamPiece> {
        match self {
            Self::Hermes(s) => s.push(text),
            Self::LlamaJson(s) => s.push(text),
        }
    }

    /// The pieces left at the end of the answer.
    pub fn finish(&mut self) -> Vec<StreamPiece> {
        match self {
            Self::Hermes(s) => s.finish(),
            Self::LlamaJson(s) => s.finish(),
        }
    }
}

fn llama_json(text: &str) -> Option<Vec<ParsedCall>> {
    let mut rest = text.trim();
    rest = rest.strip_prefix("<|python_tag|>").unwrap_or(rest).trim_start();
    if !rest.starts_with('{') {
        return None;
    }
    let mut calls = Vec::new();
    while !rest.is_empty() {
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Call<'_>>();
        let call = values.next()?.ok()?;
        let used = values.byte_offset();
        calls.push(call.into_parsed());
        rest = rest[used..].trim_start();
        if let Some(next) = rest.strip_prefix(';') {
            rest = next.trim_start();
        }
    }
    Some(calls)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn hermes_blocks_are_calls_and_the_rest_is_content() {
        let (content, calls) = ToolCallFormat::Hermes.parse(
            "Let me look.\n<tool_call>\n{\"name\": \"search\", \"arguments\": {\"q\": \"rust\", \"a\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
        );
        assert_eq!(content, "Let me look.");
        assert_eq!(calls[0], ParsedCall { name: "search".into(), arguments: "{\"q\": \"rust\", \"a\": 1}".into() });
        assert_eq!(calls[1].arguments, "{}");
        let (content, calls) = ToolCallFormat::Hermes.parse("<tool_call>not json</tool_call>");
        assert_eq!((content.as_str(), calls.len()), ("<tool_call>not json</tool_call>", 0));
    }

    /// `text`'s pieces when streamed in the given chunk lengths (in chars), merged: the content
    /// joined and the calls in order.
    fn streamed(text: &str, cuts: &[usize]) -> (String, Vec<ParsedCall>) {
        streamed_as(ToolCallFormat::Hermes, text, cuts)
    }

    fn streamed_as(format: ToolCallFormat, text: &str, cuts: &[usize]) -> (String, Vec<ParsedCall>) {
        let chars: Vec<char> = text.chars().collect();
        let mut s = format.stream();
        let mut pieces = Vec::new();
        let mut at = 0usize;
        for &n in cuts.iter().chain(std::iter::once(&usize::MAX)) {
            let end = at.saturating_add(n).min(chars.len());
            pieces.extend(s.push(&chars[at..end].iter().collect::<String>()));
            at = end;
            if at == chars.len() {
                break;
            }
        }
        pieces.extend(s.finish());
        let mut content = String::new();
        let mut calls = Vec::new();
        for p in pieces {
            match p {
                StreamPiece::Content(c) => content.push_str(&c),
                StreamPiece::Call(c) => calls.push(c),
            }
        }
        (content, calls)
    }

    #[test]
    fn a_streamed_hermes_answer_gives_the_unstreamed_content_and_calls() {
        let text = "  Let me look. \n<tool_call>\n{\"name\": \"search\", \"arguments\": {\"q\": \"é\"}}\n</tool_call> and <tool_call>{\"name\": \"f\"}</tool_call>\n";
        for cut in 1..12 {
            assert_eq!(streamed(text, &[cut; 200]), ToolCallFormat::Hermes.parse(text), "cut {cut}");
        }
        // Content before a block goes out before the block closes; the call once it does.
        let mut s = HermesStream::default();
        assert_eq!(s.push("Hi <tool"), vec![StreamPiece::Content("Hi".into())]);
        assert_eq!(s.push("_call>{\"name\": \"f\", "), vec![]);
        assert_eq!(
            s.push("\"arguments\": {}}</tool_call>"),
            vec![StreamPiece::Call(ParsedCall { name: "f".into(), arguments: "{}".into() })]
        );
        assert_eq!(s.finish(), vec![]);
        // An unclosed or broken block is content from its tag on.
        for bad in [
            "x <tool_call>{\"name\": \"f\"}",
            "x <tool_call>nope</tool_call> y <tool_call>{\"name\": \"f\"}</tool_call>",
        ] {
            assert_eq!(streamed(bad, &[3; 100]), ToolCallFormat::Hermes.parse(bad));
        }
    }

    proptest::proptest! {
        #[test]
        fn streamed_llama_json_equals_unstreamed(
            parts in proptest::collection::vec(proptest::sample::select(vec![
                "<|python_tag|>", "<|python", "{\"name\": \"a\", \"parameters\": {\"x\": 1}}", "{\"name\": \"b\"}",
                "; ", " ", "\n", "word", "{", "}", "é", "<",
            ]), 0..16),
            cuts in proptest::collection::vec(1..6usize, 0..40),
        ) {
            let text: String = parts.concat();
            let format = ToolCallFormat::LlamaJson;
            proptest::prop_assert_eq!(streamed_as(format, &text, &cuts), format.parse(&text));
        }

        #[test]
        fn streamed_hermes_equals_unstreamed(
            parts in proptest::collection::vec(proptest::sample::select(vec![
                "<tool_call>", "</tool_call>", "{\"name\": \"f\", \"arguments\": {\"a\": 1}}", "{\"name\": \"g\"}",
                "not json", " ", "\n", "word", "<tool", "é", "<", "call>",
            ]), 0..24),
            cuts in proptest::collection::vec(1..6usize, 0..40),
        ) {
            let text: String = parts.concat();
            proptest::prop_assert_eq!(streamed(&text, &cuts), ToolCallFormat::Hermes.parse(&text));
        }
    }

    #[test]
    fn a_template_names_its_parser() {
        assert_eq!(ToolCallFormat::of_template("{{ '<tool_call>' }}"), ToolCallFormat::Hermes);
        assert_eq!(ToolCallFormat::of_template("{% if m.role == 'ipython' %}"), ToolCallFormat::LlamaJson);
        assert_eq!(ToolCallFormat::of_template("{{ m.content }}"), ToolCallFormat::Hermes);
        for f in [ToolCallFormat::Hermes, ToolCallFormat::LlamaJson] {
            assert_eq!(f.as_str().parse::<ToolCallFormat>(), Ok(f));
        }
        assert!("pythonic".parse::<ToolCallFormat>().unwrap_err().contains("hermes or llama3_json"));
        // Plain text streams as it comes; a call is held to the end.
        let mut s = ToolCallFormat::LlamaJson.stream();
        assert_eq!(s.push(" Hel"), vec![StreamPiece::Content(" Hel".into())]);
        let mut s = ToolCallFormat::LlamaJson.stream();
        assert_eq!(s.push(" <|pyth"), vec![]);
        assert_eq!(s.push("on_tag|>{\"name\": \"a\"}"), vec![]);
        assert_eq!(s.finish(), vec![StreamPiece::Call(ParsedCall { name: "a".into(), arguments: "{}".into() })]);
    }

    #[test]
    fn llama_json_calls_or_plain_text() {
        let (content, calls) = ToolCallFormat::LlamaJson
            .parse("<|python_tag|>{\"name\": \"a\", \"parameters\": {\"x\": 1}}; {\"name\": \"b\", \"arguments\": {}}");
        assert_eq!(content, "");
        assert_eq!(calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(calls[0].arguments, "{\"x\": 1}");
        let answer = "{\"move\": \"buy\", \"amount\": 3}";
        assert_eq!(ToolCallFormat::LlamaJson.parse(answer), (answer.to_owned(), Vec::new()));
        assert_eq!(ToolCallFormat::LlamaJson.parse("hello").1, Vec::new());
    }

    #[test]
    fn written_calls_parse_back() {
        for format in [ToolCallFormat::Hermes, ToolCallFormat::LlamaJson] {
            let text = format.write("quote", "{\"symbol\": \"X\"}");
            let (_, calls) = format.parse(&text);
            assert_eq!(calls, [ParsedCall { name: "quote".into(), arguments: "{\"symbol\": \"X\"}".into() }]);
        }
    }
}
