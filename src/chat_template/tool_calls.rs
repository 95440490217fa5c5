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

impl ToolCallFormat {
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
