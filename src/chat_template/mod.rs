//! Chat templates: a conversation (with its tool definitions, calls and results) rendered into the
//! prompt text a model's chat template makes of it, for servers that take raw prompts
//! (`/completions` with a list of prompts), and the tool calls read back out of the answer's text.
//!
//! The built-in templates write what the models' own Jinja templates write, byte for byte, so a
//! prompt sent here hits the same prefix-cache blocks as the chat endpoint's rendering would:
//! - `chatml`: Qwen2.5-Instruct's `chat_template` (its `tokenizer_config.json`): the `# Tools`
//!   block with one `tojson` line per tool inside `<tools></tools>` in the system turn,
//!   `<tool_call>` answers, results as `<tool_response>` blocks inside one user turn;
//! - `llama3`: Llama 3 Instruct's headers (no tool format);
//! - `llama3.1`: Meta-Llama-3.1-8B-Instruct's `chat_template`: the system header
//!   `Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024` (the template's default
//!   `date_string`; Llama 3.2's template writes today's date), `Environment: ipython` with tools,
//!   the tool definitions (`tojson(indent=4)`) in the first user turn (`tools_in_user_message`
//!   defaults to true), calls as `{"name": ..., "parameters": ...}`, results in `ipython` turns.
//!
//! A template given as Jinja source (or a `tokenizer_config.json` / `.jinja` file) is rendered by
//! `minijinja` as Hugging Face's `apply_chat_template` does (see [`jinja`]).

pub mod jinja;
pub mod json;
pub mod tool_calls;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::conversation::{Message, Role, ToolCall, ToolDef};
use crate::limits::headers::civil_from_days;
pub use jinja::JinjaTemplate;
pub use tool_calls::{
    partial_match_len, HermesStream, LlamaJsonStream, ParsedCall, StreamPiece, ToolCallFormat, ToolCallStream,
};

/// Qwen2.5's system prompt when the conversation has none.
const QWEN_DEFAULT_SYSTEM: &str = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

/// The date Llama 3.1's template writes when it is given no `date_string`.
const LLAMA31_DEFAULT_DATE: &str = "26 Jul 2024";

/// A chat template: built in, or Jinja source.
#[derive(Debug, Clone)]
pub enum ChatTemplate {
    /// Qwen2 / Qwen2.5 `ChatML` with Qwen2.5's tool format.
    ChatMl,
    /// Llama 3 Instruct headers; no tool format (calls with tools go to the chat endpoint).
    Llama3,
    /// Llama 3.1+ Instruct: the dated system header and the JSON tool-call format. `today`: the
    /// header carries today's date (Llama 3.2's template) instead of 26 Jul 2024.
    Llama31 { today: bool },
    /// A user-supplied Jinja template.
    Jinja(Arc<JinjaTemplate>),
}

/// Why a conversation could not be rendered.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct RenderError(pub String);

/// A tool as the chat templates see it: `{"type": "function", "function": {"name", "description",
/// "parameters"}}` in the field order vLLM's request model dumps it in.
#[derive(Serialize)]
pub(crate) struct ToolJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionJson<'a>,
}

#[derive(Serialize)]
struct FunctionJson<'a> {
    name: &'a str,
    description: &'a str,
    parameters: &'a serde_json::Value,
}

impl<'a> ToolJson<'a> {
    pub(crate) fn of(tool: &'a ToolDef) -> Self {
        Self {
            kind: "function",
            function: FunctionJson { name: &tool.name, description: &tool.description, parameters: &tool.parameters },
        }
    }
}

/// A tool's definition as `tojson` writes it.
fn tool_json(tool: &ToolDef, indent: Option<usize>) -> String {
    json::dumps(&ToolJson::of(tool), indent).unwrap_or_default()
}

/// A call's arguments as `tool_call.arguments | tojson` writes them: the server parsed the JSON
/// text into a dict and dumps it again; text that is not JSON stays a string.
fn arguments_json(call: &ToolCall) -> String {
    json::respace(&call.arguments)
        .unwrap_or_else(|| json::dumps(&serde_json::Value::String(call.arguments.clone()), None).unwrap_or_default())
}

impl ChatTemplate {
    /// The template a model name implies: Qwen models speak `ChatML`, Llama 3.1 and later their
    /// dated format, Llama 3 its headers.
    pub fn for_model(model: &str) -> Option<Self> {
        let name = model.to_ascii_lowercase();
        if name.contains("qwen") {
            return Some(Self::ChatMl);
        }
        let llama3 = ["llama-3", "llama3", "llama_3", "llama-v3"].iter().any(|p| name.contains(p));
        llama3.then(|| Self::llama3_for(&name))
    }

    /// Llama 3.x by the model's minor version: 3.1 and later have the dated header and tools.
    fn llama3_for(name: &str) -> Self {
        let minor = ["llama-3.", "llama3.", "llama_3.", "llama-v3.", "llama-3-", "llama3-", "llama-v3-", "llama_3_"]
            .iter()
            .find_map(|p| name.split_once(p).map(|(_, after)| after.chars().next()));
        match minor.flatten() {
            Some('2') => Self::Llama31 { today: true },
            Some('1' | '3') => Self::Llama31 { today: false },
            _ => Self::Llama3,
        }
    }

    /// By the name a user gives: `chatml`, `llama3` (Llama 3.1's format where the model name says
    /// 3.1 or later), `llama3.1`.
    pub fn by_name(name: &str, model: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "chatml" | "qwen" | "qwen2.5" => Some(Self::ChatMl),
            "llama3" | "llama-3" => Some(Self::llama3_for(&model.to_ascii_lowercase())),
            "llama3.1" | "llama-3.1" => Some(Self::Llama31 { today: false }),
            _ => None,
        }
    }

    /// A template by name, Jinja source, or a file holding one (`tokenizer_config.json`, `.jinja`).
    pub fn load(spec: &str, model: &str) -> Result<Self, RenderError> {
        if let Some(template) = Self::by_name(spec, model) {
            return Ok(template);
        }
        if spec.contains("{{") || spec.contains("{%") {
            return Ok(Self::Jinja(Arc::new(JinjaTemplate::from_source("the chat_template given", spec, None, None)?)));
        }
        let path = std::path::Path::new(spec);
        if path.is_file() {
            return Ok(Self::Jinja(Arc::new(JinjaTemplate::from_file(path)?)));
        }
        Err(RenderError(format!(
            "chat_template {spec:?}: not a built-in template (\"chatml\", \"llama3\", \"llama3.1\"), not Jinja source, \
             and no file by that name"
        )))
    }

    /// End-of-turn strings the completion stops at.
    pub fn stop(&self) -> Vec<String> {
        let words: &[&str] = match self {
            Self::ChatMl => &["<|im_end|>", "<|endoftext|>"],
            Self::Llama3 => &["<|eot_id|>", "<|end_of_text|>"],
            Self::Llama31 { .. } => &["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"],
            Self::Jinja(t) => return t.eos_token().map(str::to_owned).into_iter().collect(),
        };
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    /// How the template asks the model for tool calls.
    pub fn tool_format(&self) -> ToolCallFormat {
        match self {
            Self::ChatMl | Self::Llama3 => ToolCallFormat::Hermes,
            Self::Llama31 { .. } => ToolCallFormat::LlamaJson,
            Self::Jinja(t) => t.tool_format(),
        }
    }

    /// The content and calls of an answer's text.
    pub fn parse(&self, text: &str) -> (String, Vec<ParsedCall>) {
        self.tool_format().parse(text)
    }

    /// The prompt for a conversation, ending with the assistant's header. `Ok(None)` where this
    /// template has no tool format and the conversation needs one (those calls go to the chat
    /// endpoint). The begin-of-text token is left out: the server's tokenizer adds it to every
    /// completions prompt (the chat endpoint renders it and adds none).
    pub fn render(&self, messages: &[Message], tools: &[ToolDef]) -> Result<Option<String>, RenderError> {
        let with_tools = !tools.is_empty() || messages.iter().any(|m| m.role == Role::Tool || !m.tool_calls.is_empty());
        match self {
            Self::ChatMl => Ok(Some(render_chatml(messages, tools))),
            Self::Llama3 if with_tools => Ok(None),
            Self::Llama3 => Ok(Some(render_llama3(messages))),
            Self::Llama31 { today } => {
                let date = if *today { today_date() } else { LLAMA31_DEFAULT_DATE.to_owned() };
                render_llama31(messages, tools, &date).map(Some)
            }
            Self::Jinja(t) => t.render(messages, tools).map(Some),
        }
    }
}

fn render_chatml(messages: &[Message], tools: &[ToolDef]) -> String {
    let mut out = String::with_capacity(messages.iter().map(|m| m.content.len() + 32).sum::<usize>() + 256);
    let system = messages.first().filter(|m| m.role == Role::System).map(|m| m.content.as_str());
    out.push_str("<|im_start|>system\n");
    out.push_str(system.unwrap_or(QWEN_DEFAULT_SYSTEM));
    if !tools.is_empty() {
        out.push_str(
            "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
        );
        for tool in tools {
            out.push('\n');
            out.push_str(&tool_json(tool, None));
        }
        out.push_str(
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments within \
             <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": \
             <args-json-object>}\n</tool_call>",
        );
    }
    out.push_str("<|im_end|>\n");
    for (i, m) in messages.iter().enumerate() {
        match m.role {
            Role::System if i == 0 => {}
            Role::Tool => {
                if i == 0 || messages[i - 1].role != Role::Tool {
                    out.push_str("<|im_start|>user");
                }
                out.push_str("\n<tool_response>\n");
                out.push_str(&m.content);
                out.push_str("\n</tool_response>");
                if messages.get(i + 1).is_none_or(|next| next.role != Role::Tool) {
                    out.push_str("<|im_end|>\n");
                }
            }
            Role::Assistant if !m.tool_calls.is_empty() => {
                out.push_str("<|im_start|>assistant");
                if !m.content.is_empty() {
                    out.push('\n');
                    out.push_str(&m.content);
                }
                for call in &m.tool_calls {
                    out.push_str("\n<tool_call>\n{\"name\": \"");
                    out.push_str(&call.name);
                    out.push_str("\", \"arguments\": ");
                    out.push_str(&arguments_json(call));
                    out.push_str("}\n</tool_call>");
                }
                out.push_str("<|im_end|>\n");
            }
            role => {
                out.push_str("<|im_start|>");
                out.push_str(role_name(role));
                out.push('\n');
                out.push_str(&m.content);
                out.push_str("<|im_end|>\n");
            }
        }
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

fn llama_header(out: &mut String, role: &str) {
    out.push_str("<|start_header_id|>");
    out.push_str(role);
    out.push_str("<|end_header_id|>\n\n");
}

fn render_llama3(messages: &[Message]) -> String {
    let mut out = String::with_capacity(messages.iter().map(|m| m.content.len() + 32).sum::<usize>() + 64);
    for m in messages {
        llama_header(&mut out, role_name(m.role));
        out.push_str(m.content.trim());
        out.push_str("<|eot_id|>");
    }
    llama_header(&mut out, "assistant");
    out
}

fn render_llama31(messages: &[Message], tools: &[ToolDef], date: &str) -> Result<String, RenderError> {
    let mut out = String::with_capacity(messages.iter().map(|m| m.content.len() + 32).sum::<usize>() + 512);
    let (system, mut rest) = match messages.split_first() {
        Some((first, rest)) if first.role == Role::System => (first.content.trim(), rest),
        _ => ("", messages),
    };
    llama_header(&mut out, "system");
    if !tools.is_empty() {
        out.push_str("Environment: ipython\n");
    }
    out.push_str("Cutting Knowledge Date: December 2023\nToday Date: ");
    out.push_str(date);
    out.push_str("\n\n");
    out.push_str(system);
    out.push_str("<|eot_id|>");
    if !tools.is_empty() {
        let Some((first, after)) = rest.split_first() else {
            return Err(RenderError(
                "Cannot put tools in the first user message when there's no first user message!".into(),
            ));
        };
        rest = after;
        llama_header(&mut out, "user");
        out.push_str(
            "Given the following functions, please respond with a JSON for a function call with its proper \
             arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, \
             \"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n",
        );
        for tool in tools {
            out.push_str(&tool_json(tool, Some(4)));
            out.push_str("\n\n");
        }
        out.push_str(first.content.trim());
        out.push_str("<|eot_id|>");
    }
    for m in rest {
        match m.role {
            Role::Tool => {
                llama_header(&mut out, "ipython");
                // The template's `content is mapping or content is iterable` holds for a string
                // too (Jinja2's `iterable` test), so the result goes in as a JSON string.
                out.push_str(&json::dumps(&m.content, None).unwrap_or_default());
            }
            Role::Assistant if !m.tool_calls.is_empty() => {
                llama_header(&mut out, "assistant");
                // The template refuses more than one call per turn; several calls parsed from one
                // answer (`;`-joined, as vLLM's parser reads them) are written back that way.
                for (k, call) in m.tool_calls.iter().enumerate() {
                    if k > 0 {
                        out.push_str("; ");
                    }
                    out.push_str("{\"name\": \"");
                    out.push_str(&call.name);
                    out.push_str("\", \"parameters\": ");
                    out.push_str(&arguments_json(call));
                    out.push('}');
                }
            }
            role => {
                llama_header(&mut out, role_name(role));
                out.push_str(m.content.trim());
            }
        }
        out.push_str("<|eot_id|>");
    }
    llama_header(&mut out, "assistant");
    Ok(out)
}

/// Today's date as `strftime("%d %b %Y")` writes it (UTC), for Llama 3.2's header.
fn today_date() -> String {
    let (year, month, day) = today();
    format!("{day:02} {} {year}", MONTHS[month - 1])
}

const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/// Today's date in UTC as (year, month 1..=12, day).
pub(crate) fn today() -> (i64, usize, i64) {
    let days = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400);
    let (year, month, day) = civil_from_days(i64::try_from(days).unwrap_or(0));
    // `month` is 1..=12 by construction.
    (year, usize::try_from(month).unwrap_or(1), day)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use serde_json::json;

    fn quote_tool() -> ToolDef {
        ToolDef {
            name: "quote".into(),
            description: "Look up a price.".into(),
            parameters: json!({"type": "object", "properties": {"symbol": {"type": "string"}}, "required": ["symbol"]}),
        }
    }

    fn tool_conversation() -> Vec<Message> {
        let call = ToolCall { id: "c1".into(), name: "quote".into(), arguments: "{\"symbol\":\"X\"}".into() };
        let mut result = Message::user("X: 42");
        result.role = Role::Tool;
        result.tool_call_id = Some("c1".into());
        vec![Message::system("S"), Message::user("price?"), Message::assistant("", vec![call]), result]
    }

    #[test]
    fn chatml_without_tools_as_qwen_renders_it() {
        let messages =
            [Message::system("S"), Message::user("hi"), Message::assistant("yo", Vec::new()), Message::user("next")];
        assert_eq!(
            ChatTemplate::ChatMl.render(&messages, &[]).unwrap().unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n\
             <|im_start|>user\nnext<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(ChatTemplate::ChatMl
            .render(&[Message::user("q")], &[])
            .unwrap()
            .unwrap()
            .starts_with("<|im_start|>system\nYou are Qwen"));
    }

    #[test]
    fn chatml_with_tools_as_qwen25_renders_it() {
        let prompt = ChatTemplate::ChatMl.render(&tool_conversation(), &[quote_tool()]).unwrap().unwrap();
        let expected = concat!(
            "<|im_start|>system\nS\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n",
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
            r#"{"type": "function", "function": {"name": "quote", "description": "Look up a price.", "parameters": {"properties": {"symbol": {"type": "string"}}, "required": ["symbol"], "type": "object"}}}"#,
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments within ",
            "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n",
            "</tool_call><|im_end|>\n<|im_start|>user\nprice?<|im_end|>\n",
            "<|im_start|>assistant\n<tool_call>\n{\"name\": \"quote\", \"arguments\": {\"symbol\": \"X\"}}\n</tool_call><|im_end|>\n",
            "<|im_start|>user\n<tool_response>\nX: 42\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
        );
        assert_eq!(prompt, expected);
        // Consecutive results share one user turn.
        let mut two = tool_conversation();
        two.push(two[3].clone());
        let prompt = ChatTemplate::ChatMl.render(&two, &[quote_tool()]).unwrap().unwrap();
        assert!(prompt.ends_with(
            "<|im_start|>user\n<tool_response>\nX: 42\n</tool_response>\n<tool_response>\nX: 42\n</tool_response>\
             <|im_end|>\n<|im_start|>assistant\n"
        ));
    }

    #[test]
    fn llama3_headers_and_no_tool_format() {
        let messages = [Message::system("S"), Message::user(" hi ")];
        assert_eq!(
            ChatTemplate::Llama3.render(&messages, &[]).unwrap().unwrap(),
            "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert!(ChatTemplate::Llama3.render(&tool_conversation(), &[quote_tool()]).unwrap().is_none());
    }

    #[test]
    fn llama31_as_metas_template_renders_it() {
        let plain = ChatTemplate::Llama31 { today: false }.render(&[Message::user("hi")], &[]).unwrap().unwrap();
        assert_eq!(
            plain,
            "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n\
             <|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let prompt =
            ChatTemplate::Llama31 { today: false }.render(&tool_conversation(), &[quote_tool()]).unwrap().unwrap();
        let expected = concat!(
            "<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge Date: December 2023\n",
            "Today Date: 26 Jul 2024\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
            "Given the following functions, please respond with a JSON for a function call with its proper arguments ",
            "that best answers the given prompt.\n\nRespond in the format {\"name\": function name, \"parameters\": ",
            "dictionary of argument name and its value}.Do not use variables.\n\n",
            "{\n    \"type\": \"function\",\n    \"function\": {\n        \"name\": \"quote\",\n",
            "        \"description\": \"Look up a price.\",\n        \"parameters\": {\n",
            "            \"properties\": {\n                \"symbol\": {\n                    \"type\": \"string\"\n",
            "                }\n            },\n            \"required\": [\n                \"symbol\"\n            ],\n",
            "            \"type\": \"object\"\n        }\n    }\n}\n\nprice?<|eot_id|>",
            "<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"quote\", \"parameters\": {\"symbol\": \"X\"}}<|eot_id|>",
            "<|start_header_id|>ipython<|end_header_id|>\n\n\"X: 42\"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        );
        assert_eq!(prompt, expected);
        assert!(ChatTemplate::Llama31 { today: false }.render(&[Message::system("S")], &[quote_tool()]).is_err());
    }

    #[test]
    fn templates_by_model_and_name() {
        let is = |t: Option<ChatTemplate>, want: &str| assert_eq!(format!("{t:?}"), want);
        is(ChatTemplate::for_model("Qwen/Qwen2.5-7B-Instruct"), "Some(ChatMl)");
        is(ChatTemplate::for_model("meta-llama/Meta-Llama-3.1-8B-Instruct"), "Some(Llama31 { today: false })");
        is(ChatTemplate::for_model("meta-llama/Llama-3.3-70B-Instruct"), "Some(Llama31 { today: false })");
        is(ChatTemplate::for_model("meta-llama/Llama-3.2-3B-Instruct"), "Some(Llama31 { today: true })");
        is(ChatTemplate::for_model("meta-llama/Meta-Llama-3-8B-Instruct"), "Some(Llama3)");
        is(ChatTemplate::for_model("mistral-7b"), "None");
        is(ChatTemplate::by_name("llama3", "sim-model"), "Some(Llama3)");
        is(ChatTemplate::by_name("llama3", "llama-3.1-8b"), "Some(Llama31 { today: false })");
        is(ChatTemplate::by_name("llama3.1", "x"), "Some(Llama31 { today: false })");
        assert!(ChatTemplate::load("nonsense", "x").unwrap_err().0.contains("no file by that name"));
    }
}
