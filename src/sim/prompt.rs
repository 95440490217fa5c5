//! What the simulated model reads in a raw `/completions` prompt: a conversation rendered by a chat
//! template (`ChatML` with Qwen2.5's tool block, or Llama 3 / 3.1 headers with Llama 3.1's) is read
//! back into its messages and tools, so the scripted agent behaves on a prompt list as it does on
//! the chat endpoint, and answers tool calls in the prompt's own format.

use serde_json::Value;

use crate::chat_template::{ParsedCall, ToolCallFormat};
use crate::conversation::{Message, Role, ToolCall, ToolDef};

/// A prompt read as a chat.
pub struct ReadPrompt {
    pub messages: Vec<Message>,
    pub tools: Vec<ToolDef>,
    /// The tool-call form the prompt asks for.
    pub format: ToolCallFormat,
}

/// `None` when the prompt is not a chat template's rendering.
pub fn read(prompt: &str) -> Option<ReadPrompt> {
    if prompt.contains("<|im_start|>") {
        Some(read_chatml(prompt))
    } else if prompt.contains("<|start_header_id|>") {
        Some(read_llama(prompt))
    } else {
        None
    }
}

fn calls(parsed: Vec<ParsedCall>, turn: usize) -> Vec<ToolCall> {
    parsed
        .into_iter()
        .enumerate()
        .map(|(k, c)| ToolCall { id: format!("sim-{turn}-{k}"), name: c.name, arguments: c.arguments })
        .collect()
}

fn tool_result(content: &str) -> Message {
    let mut m = Message::user(content);
    m.role = Role::Tool;
    m
}

/// Tool definitions as the templates write them (`{"type": "function", "function": {...}}`).
fn tool_def(value: &Value) -> Option<ToolDef> {
    let function = value.get("function")?;
    Some(ToolDef {
        name: function.get("name")?.as_str()?.to_owned(),
        description: function.get("description").and_then(Value::as_str).unwrap_or_default().to_owned(),
        parameters: function.get("parameters").cloned().unwrap_or(Value::Null),
    })
}

fn read_chatml(prompt: &str) -> ReadPrompt {
    let mut messages = Vec::new();
    let mut tools = Vec::new();
    for (turn, segment) in prompt.split("<|im_start|>").skip(1).enumerate() {
        let Some(body) = segment.strip_suffix("<|im_end|>\n").or_else(|| segment.strip_suffix("<|im_end|>")) else {
            // The open assistant turn the prompt ends with.
            continue;
        };
        let (role, content) = body.split_once('\n').unwrap_or((body, ""));
        match role {
            "system" => {
                let (system, block) = content.split_once("\n\n# Tools\n\n").unwrap_or((content, ""));
                if let Some((_, listed)) = block.split_once("<tools>\n") {
                    let listed = listed.split_once("\n</tools>").map_or(listed, |(l, _)| l);
                    tools.extend(
                        listed.lines().filter_map(|l| serde_json::from_str(l).ok()).filter_map(|v| tool_def(&v)),
                    );
                }
                messages.push(Message::system(system));
            }
            "user" if content.starts_with("<tool_response>\n") => {
                for block in content.split("<tool_response>\n").skip(1) {
                    let result = block.split_once("\n</tool_response>").map_or(block, |(r, _)| r);
                    messages.push(tool_result(result));
                }
            }
            "assistant" => {
                let (text, parsed) = ToolCallFormat::Hermes.parse(content);
                messages.push(Message::assistant(text, calls(parsed, turn)));
            }
            _ => messages.push(Message::user(content)),
        }
    }
    ReadPrompt { messages, tools, format: ToolCallFormat::Hermes }
}

/// The tool definitions Llama 3.1's template writes (`tojson(indent=4)`, a blank line after each),
/// from the start of `text`; the rest of the text after them.
fn llama_tools(text: &str) -> (Vec<ToolDef>, &str) {
    let mut tools = Vec::new();
    let mut rest = text;
    loop {
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let Some(Ok(value)) = values.next() else { break };
        let Some(tool) = value.get("type").filter(|t| *t == "function").and_then(|_| tool_def(&value)) else { break };
        tools.push(tool);
        rest = &rest[values.byte_offset()..];
        rest = rest.strip_prefix("\n\n").unwrap_or(rest);
    }
    (tools, rest)
}

const TOOLS_IN_USER: &str = "Given the following functions, please respond with a JSON for a function call";
const NO_VARIABLES: &str = "Do not use variables.\n\n";

fn read_llama(prompt: &str) -> ReadPrompt {
    let mut messages = Vec::new();
    let mut tools = Vec::new();
    for (turn, segment) in prompt.split("<|start_header_id|>").skip(1).enumerate() {
        let Some((role, rest)) = segment.split_once("<|end_header_id|>\n\n") else { continue };
        let Some(content) = rest.strip_suffix("<|eot_id|>").or_else(|| rest.strip_suffix("<|eom_id|>")) else {
            continue;
        };
        match role {
            "system" => {
                let mut content = content.strip_prefix("Environment: ipython\n").unwrap_or(content);
                if content.starts_with("Cutting Knowledge Date:") {
                    content = content.split_once("\n\n").map_or("", |(_, after)| after);
                }
                if content.starts_with("You have access to the following functions") {
                    if let Some((_, after)) = content.split_once(NO_VARIABLES) {
                        let (listed, after) = llama_tools(after);
                        tools.extend(listed);
                        content = after;
                    }
                }
                messages.push(Message::system(content));
            }
            "user" if content.starts_with(TOOLS_IN_USER) => {
                let (listed, after) =
                    content.split_once(NO_VARIABLES).map_or((Vec::new(), content), |(_, a)| llama_tools(a));
                tools.extend(listed);
                messages.push(Message::user(after));
            }
            "ipython" | "tool" => {
                // Llama 3.1's template writes a result as a JSON string.
                let text = serde_json::from_str::<String>(content).unwrap_or_else(|_| content.to_owned());
                messages.push(tool_result(&text));
            }
            "assistant" => {
                let (text, parsed) = ToolCallFormat::LlamaJson.parse(content);
                messages.push(Message::assistant(text, calls(parsed, turn)));
            }
            _ => messages.push(Message::user(content)),
        }
    }
    ReadPrompt { messages, tools, format: ToolCallFormat::LlamaJson }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use crate::chat_template::ChatTemplate;

    fn conversation() -> (Vec<Message>, Vec<ToolDef>) {
        let tool = ToolDef {
            name: "quote".into(),
            description: "Look up a price.".into(),
            parameters: serde_json::json!({"type": "object", "properties": {"symbol": {"type": "string"}}}),
        };
        let call = ToolCall { id: "c".into(), name: "quote".into(), arguments: "{\"symbol\": \"X\"}".into() };
        let messages = vec![
            Message::system("S"),
            Message::user("price?"),
            Message::assistant("", vec![call]),
            tool_result("X: 42"),
        ];
        (messages, vec![tool])
    }

    #[test]
    fn rendered_conversations_read_back() {
        let (messages, tools) = conversation();
        for (template, format) in [
            (ChatTemplate::ChatMl, ToolCallFormat::Hermes),
            (ChatTemplate::Llama31 { today: false }, ToolCallFormat::LlamaJson),
        ] {
            let prompt = template.render(&messages, &tools).unwrap().unwrap();
            let read = read(&prompt).unwrap();
            assert_eq!(read.format, format);
            assert_eq!(read.tools, tools, "{template:?}");
            let roles: Vec<Role> = read.messages.iter().map(|m| m.role).collect();
            assert_eq!(roles, [Role::System, Role::User, Role::Assistant, Role::Tool], "{template:?}");
            assert_eq!(
                (read.messages[0].content.as_str(), read.messages[1].content.as_str()),
                ("S", "price?"),
                "{template:?}"
            );
            assert_eq!(read.messages[2].tool_calls[0].name, "quote");
            assert_eq!(read.messages[2].tool_calls[0].arguments, "{\"symbol\": \"X\"}");
            assert_eq!(read.messages[3].content, "X: 42");
        }
        assert!(read("just text").is_none());
    }
}
