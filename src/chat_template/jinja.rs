//! A user-supplied Jinja chat template, rendered with `minijinja` the way Hugging Face's
//! `apply_chat_template` renders it with Jinja2: `trim_blocks` and `lstrip_blocks` on, the
//! variables `messages` (OpenAI-style dicts; a call's `arguments` parsed into a dict, as vLLM hands
//! them over), `tools` (`none` without tools), `add_generation_prompt` (true), `bos_token` and
//! `eos_token` where the tokenizer config gives them; `raise_exception`, `strftime_now`, a
//! `tojson` that writes as Python's `json.dumps` does, and Python's `str` methods (minijinja's
//! pycompat, as text-generation-inference uses).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

use super::tool_calls::ToolCallFormat;
use super::{json, today, RenderError, ToolJson, MONTHS};
use crate::conversation::{Message, Role, ToolDef};

const TEMPLATE: &str = "chat_template";

/// A compiled template and the tokens it is rendered with.
#[derive(Debug)]
pub struct JinjaTemplate {
    /// Where the template came from, for errors.
    name: String,
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    format: ToolCallFormat,
}

#[derive(Serialize)]
struct MessageJson<'a> {
    role: &'static str,
    content: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<CallJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

#[derive(Serialize)]
struct CallJson<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: CallFunctionJson<'a>,
}

#[derive(Serialize)]
struct CallFunctionJson<'a> {
    name: &'a str,
    /// Parsed into minijinja's own (insertion-ordered) map: the template dumps the arguments in
    /// the order the model wrote them, as Python's dict keeps it.
    arguments: Value,
}

fn role(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

/// Hugging Face's `tojson`: `json.dumps(value, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, each overridable by keyword.
#[allow(clippy::needless_pass_by_value)] // minijinja hands filters owned kwargs.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let separators = match separators.as_deref() {
        None => None,
        Some([item, key]) => Some((item.clone(), key.clone())),
        Some(_) => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators is (item, key)")),
    };
    let options = json::DumpOptions {
        indent: kwargs.get("indent")?,
        separators,
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let text = json::dumps_with(value, &options)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(text))
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `datetime.now().strftime(format)` for the directives chat templates use (UTC).
fn strftime_now(format: &str) -> Result<Value, Error> {
    const LONG: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let (year, month, day) = today();
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            // Writing into a String cannot fail.
            Some('d') => _ = write!(out, "{day:02}"),
            Some('m') => _ = write!(out, "{month:02}"),
            Some('Y') => _ = write!(out, "{year}"),
            Some('y') => _ = write!(out, "{:02}", year % 100),
            Some('b') => out.push_str(MONTHS[month - 1]),
            Some('B') => out.push_str(LONG[month - 1]),
            Some('%') => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: %{} is not supported (%d %m %Y %y %b %B %%)", other.unwrap_or(' ')),
                ))
            }
        }
    }
    Ok(Value::from(out))
}

/// A token in `tokenizer_config.json`: a string or an added-token object with `content`.
fn token(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        other => other.get("content").and_then(serde_json::Value::as_str).map(str::to_owned),
    }
}

impl JinjaTemplate {
    /// Compiles `source`; `name` says where it came from in errors.
    pub fn from_source(
        name: &str,
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, RenderError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE, source.to_owned())
            .map_err(|e| RenderError(format!("chat_template ({name}) does not compile: {e}")))?;
        let format = ToolCallFormat::of_template(source);
        Ok(Self { name: name.to_owned(), env, bos_token, eos_token, format })
    }

    /// A `tokenizer_config.json` (its `chat_template`, the `default` one of a list, and its
    /// `bos_token` / `eos_token`), or any other file as the template's source.
    pub fn from_file(path: &Path) -> Result<Self, RenderError> {
        let shown = path.display();
        let text = std::fs::read_to_string(path).map_err(|e| RenderError(format!("chat_template {shown}: {e}")))?;
        if path.extension().is_none_or(|e| e != "json") {
            return Self::from_source(&shown.to_string(), &text, None, None);
        }
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| RenderError(format!("chat_template {shown}: not JSON: {e}")))?;
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(serde_json::Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| RenderError(format!("chat_template {shown}: no template named \"default\"")))?,
            _ => return Err(RenderError(format!("chat_template {shown}: no \"chat_template\" string in it"))),
        };
        Self::from_source(
            &format!("{shown}, key chat_template"),
            &source,
            token(&config, "bos_token"),
            token(&config, "eos_token"),
        )
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn tool_format(&self) -> ToolCallFormat {
        self.format
    }

    /// The prompt for a conversation, with the generation prompt, without a leading `bos_token`
    /// (the server's tokenizer adds it to a completions prompt).
    pub fn render(&self, messages: &[Message], tools: &[ToolDef]) -> Result<String, RenderError> {
        let messages: Vec<MessageJson<'_>> = messages
            .iter()
            .map(|m| MessageJson {
                role: role(m.role),
                content: &m.content,
                tool_calls: m
                    .tool_calls
                    .iter()
                    .map(|c| CallJson {
                        id: &c.id,
                        kind: "function",
                        function: CallFunctionJson {
                            name: &c.name,
                            arguments: serde_json::from_str(&c.arguments)
                                .unwrap_or_else(|_| Value::from(c.arguments.as_str())),
                        },
                    })
                    .collect(),
                tool_call_id: m.tool_call_id.as_deref(),
                name: m.name.as_deref(),
            })
            .collect();
        let mut context: BTreeMap<&str, Value> = BTreeMap::new();
        context.insert("messages", Value::from_serialize(&messages));
        context.insert(
            "tools",
            if tools.is_empty() {
                Value::from(())
            } else {
                Value::from_serialize(tools.iter().map(ToolJson::of).collect::<Vec<_>>())
            },
        );
        context.insert("add_generation_prompt", Value::from(true));
        if let Some(bos) = &self.bos_token {
            context.insert("bos_token", Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            context.insert("eos_token", Value::from(eos.as_str()));
        }
        let rendered = self
            .env
            .get_template(TEMPLATE)
            .and_then(|t| t.render(&context))
            .map_err(|e| RenderError(format!("chat_template ({}) failed to render: {e}", self.name)))?;
        Ok(match self.bos_token.as_deref().filter(|b| !b.is_empty()) {
            Some(bos) => rendered.strip_prefix(bos).map_or_else(|| rendered.clone(), str::to_owned),
            None => rendered,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::super::ChatTemplate;
    use super::*;
    use crate::conversation::ToolCall;

    /// Qwen2.5-Instruct's `chat_template`, as its `tokenizer_config.json` has it.
    const QWEN25: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

    /// Meta-Llama-3.1-8B-Instruct's `chat_template`, as its `tokenizer_config.json` has it.
    const LLAMA31: &str = r#"{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

    fn conversation() -> (Vec<Message>, Vec<ToolDef>) {
        let tool = ToolDef {
            name: "quote".into(),
            description: "Look up a price.".into(),
            parameters: serde_json::json!({"type": "object", "properties": {"symbol": {"type": "string"}}}),
        };
        // Keys out of order: the model's order is kept.
        let arguments = "{\"symbol\": \"X\", \"exchange\": \"NYSE\"}";
        let call = ToolCall { id: "c1".into(), name: "quote".into(), arguments: arguments.into() };
        let mut result = Message::user("X: 42");
        result.role = Role::Tool;
        result.tool_call_id = Some("c1".into());
        let messages = vec![
            Message::system("S"),
            Message::user("price?"),
            Message::assistant("", vec![call]),
            result.clone(),
            result,
            Message::assistant("done", Vec::new()),
            Message::user("again"),
        ];
        (messages, vec![tool])
    }

    #[test]
    fn qwen25s_own_template_renders_as_the_built_in_chatml() {
        let jinja =
            ChatTemplate::Jinja(std::sync::Arc::new(JinjaTemplate::from_source("qwen", QWEN25, None, None).unwrap()));
        let (messages, tools) = conversation();
        for (m, t) in [(&messages[..], &tools[..]), (&messages[..], &[][..]), (&messages[1..2], &tools[..])] {
            assert_eq!(jinja.render(m, t).unwrap(), ChatTemplate::ChatMl.render(m, t).unwrap());
        }
        let prompt = jinja.render(&messages, &tools).unwrap().unwrap();
        assert!(prompt.contains("\"arguments\": {\"symbol\": \"X\", \"exchange\": \"NYSE\"}}"), "{prompt}");
        assert_eq!(jinja.tool_format(), ToolCallFormat::Hermes);
    }

    #[test]
    fn metas_llama31_template_renders_as_the_built_in_llama31() {
        let bos = Some("<|begin_of_text|>".to_owned());
        let t = JinjaTemplate::from_source("llama", LLAMA31, bos, Some("<|eot_id|>".into())).unwrap();
        let jinja = ChatTemplate::Jinja(std::sync::Arc::new(t));
        let (mut messages, tools) = conversation();
        messages.remove(4); // one result per call: the template takes one call per turn
        let builtin = ChatTemplate::Llama31 { today: false };
        for (m, t) in [(&messages[..], &tools[..]), (&messages[..2], &[][..]), (&messages[1..], &tools[..])] {
            assert_eq!(jinja.render(m, t).unwrap(), builtin.render(m, t).unwrap());
        }
        assert_eq!(jinja.tool_format(), ToolCallFormat::LlamaJson);
    }

    #[test]
    fn tokens_strftime_and_errors() {
        let t = JinjaTemplate::from_source(
            "t",
            "{{ bos_token }}{{ strftime_now('%Y') | length }}{% for m in messages %}{{ m.content.strip() }}{% endfor %}",
            Some("<s>".into()),
            Some("</s>".into()),
        )
        .unwrap();
        assert_eq!(t.render(&[Message::user("  hi  ")], &[]).unwrap(), "4hi");
        let dumped = JinjaTemplate::from_source(
            "j",
            "{{ {'b': 'é', 'a': [1]} | tojson(separators=(',', ':'), sort_keys=true, ensure_ascii=true) }}",
            None,
            None,
        )
        .unwrap();
        assert_eq!(dumped.render(&[], &[]).unwrap(), r#"{"a":[1],"b":"\u00e9"}"#);
        assert_eq!(ChatTemplate::Jinja(std::sync::Arc::new(t)).stop(), ["</s>"]);
        let err = JinjaTemplate::from_source("my.jinja", "{% for m in messages %}", None, None).unwrap_err();
        assert!(err.0.starts_with("chat_template (my.jinja) does not compile"), "{err}");
        let raising =
            JinjaTemplate::from_source("r", "{{ raise_exception('roles must alternate') }}", None, None).unwrap();
        let err = raising.render(&[Message::user("x")], &[]).unwrap_err();
        assert!(
            err.0.contains("chat_template (r) failed to render") && err.0.contains("roles must alternate"),
            "{err}"
        );
    }

    #[test]
    fn tokenizer_config_files() {
        let dir = std::env::temp_dir().join(format!("batchagent-jinja-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer_config.json");
        let config = serde_json::json!({
            "chat_template": [{"name": "default", "template": "{{ bos_token }}[{{ messages[0].content }}]"}],
            "bos_token": {"content": "<B>"}, "eos_token": "<E>"
        });
        std::fs::write(&path, config.to_string()).unwrap();
        let t = ChatTemplate::load(path.to_str().unwrap(), "m").unwrap();
        assert_eq!(t.render(&[Message::user("u")], &[]).unwrap().unwrap(), "[u]");
        assert_eq!(t.stop(), ["<E>"]);
        std::fs::write(&path, "{\"eos_token\": \"x\"}").unwrap();
        let err = ChatTemplate::load(path.to_str().unwrap(), "m").unwrap_err();
        assert!(err.0.contains("tokenizer_config.json: no \"chat_template\""), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
