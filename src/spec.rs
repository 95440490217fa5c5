//! The batch specification, validated once, up front: a task template that fails fast on a missing
//! variable, limits with sane defaults, and the settings that decide how a job travels.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::conversation::ToolDef;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("task template: {message} at character {position}")]
    Template { position: usize, message: String },
    #[error("input {index}: template variable '{variable}' is missing (the input has: {available})")]
    MissingVariable { index: u64, variable: String, available: String },
    #[error("input {index}: {message}")]
    BadInput { index: u64, message: String },
    #[error("invalid setting '{field}': {message}")]
    Invalid { field: &'static str, message: String },
    /// A setting that does not deserialize (wrong type, out of range); `field` is its path
    /// (`max_inflight`, `tools[0].timeout`).
    #[error("invalid setting '{field}': {message}")]
    Setting { field: String, message: String },
}

/// Why a job id cannot be used, if it cannot: ids travel in HTTP headers (`X-Request-Id`), logs and
/// the journal, where a control character (CR, LF, NUL, ...) would split or corrupt a line.
pub fn check_job_id(id: &str) -> Result<(), String> {
    match id.chars().find(|c| c.is_control()) {
        None => Ok(()),
        Some(c) => {
            Err(format!("id {id:?} contains the control character U+{:04X}; ids must be printable", u32::from(c)))
        }
    }
}

/// Deserializes settings from JSON; an error names the field that failed and says what it takes,
/// in words rather than Rust types ("an integer from 0 to 4294967295", not "u32").
pub fn parse_settings<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, SpecError> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let field = match e.path().to_string() {
            path if path == "." => "settings".to_owned(),
            path => path,
        };
        SpecError::Setting { field, message: setting_message(e.inner()) }
    })
}

#[cold]
fn setting_message(e: &serde_json::Error) -> String {
    const WORDS: [(&str, &str); 6] = [
        ("expected usize", "expected an integer from 0 to 18446744073709551615"),
        ("expected u64", "expected an integer from 0 to 18446744073709551615"),
        ("expected u32", "expected an integer from 0 to 4294967295"),
        ("expected u16", "expected an integer from 0 to 65535"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ];
    let mut message = e.to_string();
    // The position is in JSON the user never wrote (it was built from their arguments).
    if let Some(at) = message.rfind(" at line ") {
        message.truncate(at);
    }
    for (rust, words) in WORDS {
        if message.ends_with(rust) {
            message.truncate(message.len() - rust.len());
            message.push_str(words);
            break;
        }
    }
    message
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Variable(String),
}

/// A task template in Python `str.format` syntax: `{name}` is replaced by the input's field, `{{` and
/// `}}` are literal braces. Strings are inserted as they are, other JSON values as compact JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(source: &str) -> Result<Self, SpecError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((position, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, n)| n) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|&(_, n)| n) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some((_, '}')) => break,
                            Some((_, '{')) => {
                                return Err(SpecError::Template { position, message: "'{' inside a field".into() })
                            }
                            Some((_, c)) => name.push(c),
                            None => return Err(SpecError::Template { position, message: "unclosed '{'".into() }),
                        }
                    }
                    let name = name.trim();
                    if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                        return Err(SpecError::Template {
                            position,
                            message: format!(
                                "field '{{{name}}}' must be a plain name (letters, digits, '_'); write '{{{{' for a literal brace"
                            ),
                        });
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Variable(name.to_owned()));
                }
                '}' => {
                    return Err(SpecError::Template {
                        position,
                        message: "single '}' (write '}}' for a literal brace)".into(),
                    })
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Self { parts })
    }

    /// The variables the template uses, in order of first use.
    pub fn variables(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for part in &self.parts {
            if let Part::Variable(name) = part {
                if !out.contains(&name.as_str()) {
                    out.push(name);
                }
            }
        }
        out
    }

    pub fn render(&self, index: u64, input: &Map<String, Value>) -> Result<String, SpecError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Variable(name) => match input.get(name) {
                    Some(Value::String(s)) => out.push_str(s),
                    Some(other) => {
                        let _ = write!(out, "{other}");
                    }
                    None => return Err(missing_variable(index, name, input)),
                },
            }
        }
        Ok(out)
    }
}

#[cold]
fn missing_variable(index: u64, variable: &str, input: &Map<String, Value>) -> SpecError {
    let mut available: Vec<&str> = input.keys().map(String::as_str).collect();
    available.sort_unstable();
    SpecError::MissingVariable {
        index,
        variable: variable.to_owned(),
        available: if available.is_empty() { "no fields".into() } else { available.join(", ") },
    }
}

/// How the requested output schema reaches the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SchemaMode {
    /// Constrained decoding where the backend supports it, otherwise the schema in the prompt.
    #[default]
    Auto,
    /// Always in the prompt, never constrained decoding.
    Prompt,
}

/// Everything a run needs to know that is the same for every job. Built from JSON by the Python
/// layer (`BatchSpec::from_json`), validated there once.
#[derive(Debug, Clone)]
pub struct BatchSpec {
    pub model: String,
    pub system: Option<String>,
    pub task: Template,
    pub tools: Arc<Vec<ToolDef>>,
    pub output_schema: Option<Arc<Value>>,
    pub schema_mode: SchemaMode,
    pub max_turns: u32,
    pub max_inflight: usize,
    /// Live agents at once (memory bound); jobs beyond it wait unread in the input.
    pub window: usize,
    /// Attempts per model call for retryable failures (429, 5xx, timeouts, resets).
    pub max_attempts: u32,
    /// Extra answers allowed when the output fails validation.
    pub validation_retries: u32,
    pub call_timeout: Duration,
    pub agent_timeout: Option<Duration>,
    /// Longest wait for the next bytes of a model's answer.
    pub idle_timeout: Duration,
    /// Most bytes of one answer read from a server.
    pub max_response_bytes: usize,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    /// Stream model calls. `None` (the default): stream when tools are offered (so a tool call can
    /// start before the turn ends), not otherwise (one JSON body costs less than a token stream).
    pub stream: Option<bool>,
    /// Warm the engine's prefix cache with one request before fanning out.
    pub warm_prefix: bool,
    /// Send Dynamo agent hints.
    pub agent_hints: bool,
    /// Send the engine's own request priority where it takes one (vLLM `priority`).
    pub engine_hints: bool,
    /// Requests per minute allowed per endpoint, set by hand (otherwise learned from the answers'
    /// rate-limit headers).
    pub rpm: Option<u64>,
    /// Tokens (prompt + completion) per minute allowed per endpoint, set by hand.
    pub tpm: Option<u64>,
    /// Fields merged into every request body (`extra_body=`); a job's own extra fields go on top.
    pub extra_body: Option<Arc<Map<String, Value>>>,
    pub compaction: CompactionSpec,
}

/// When and how an agent's conversation is made to fit the context (see
/// [`crate::scheduler::compaction`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionSpec {
    /// Compact at all; off, a conversation that outgrows the context fails as the server says.
    pub enabled: bool,
    /// The caller's limit on a request's tokens (prompt plus `max_tokens`); the backend's
    /// `max_model_len` applies too, and the lower of the two wins.
    pub max_context_tokens: Option<u64>,
    /// Turns at the end of the conversation whose tool outputs are kept whole (only cut to
    /// `tool_output_chars`) and which a summary never replaces.
    pub keep_turns: u32,
    /// Tool outputs longer than this (in characters) are cut, head and tail kept, with a marker.
    pub tool_output_chars: usize,
    /// The model that summarises the oldest turns when dropping tool outputs is not enough; `None`
    /// with no summariser backend: no summaries.
    pub model: Option<String>,
    /// Tokens a summary may take.
    pub summary_tokens: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    model: String,
    #[serde(default)]
    system: Option<String>,
    task: String,
    #[serde(default)]
    tools: Vec<ToolDef>,
    #[serde(default)]
    output_schema: Option<Value>,
    #[serde(default)]
    schema_mode: SchemaMode,
    #[serde(default = "default_max_turns")]
    max_turns: u32,
    #[serde(default = "default_max_inflight")]
    max_inflight: usize,
    #[serde(default)]
    window: Option<usize>,
    #[serde(default = "default_max_attempts")]
    max_attempts: u32,
    #[serde(default = "default_validation_retries")]
    validation_retries: u32,
    #[serde(default = "default_call_timeout")]
    call_timeout: f64,
    #[serde(default)]
    agent_timeout: Option<f64>,
    #[serde(default = "default_idle_timeout")]
    idle_timeout: f64,
    #[serde(default = "default_max_response_bytes")]
    max_response_bytes: u64,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default = "default_true")]
    warm_prefix: bool,
    #[serde(default)]
    agent_hints: bool,
    #[serde(default)]
    engine_hints: bool,
    #[serde(default)]
    rpm: Option<u64>,
    #[serde(default)]
    tpm: Option<u64>,
    #[serde(default)]
    extra_body: Option<Map<String, Value>>,
    #[serde(default = "default_true")]
    compaction: bool,
    #[serde(default)]
    max_context_tokens: Option<u64>,
    #[serde(default = "default_keep_turns")]
    compaction_keep_turns: u32,
    #[serde(default = "default_tool_output_chars")]
    compaction_tool_output_chars: usize,
    #[serde(default)]
    compaction_model: Option<String>,
    #[serde(default = "default_summary_tokens")]
    compaction_summary_tokens: u32,
}

fn default_keep_turns() -> u32 {
    4
}
fn default_tool_output_chars() -> usize {
    4000
}
fn default_summary_tokens() -> u32 {
    512
}

fn default_max_turns() -> u32 {
    8
}
fn default_max_inflight() -> usize {
    64
}
fn default_max_attempts() -> u32 {
    6
}
fn default_validation_retries() -> u32 {
    2
}
fn default_call_timeout() -> f64 {
    600.0
}
fn default_idle_timeout() -> f64 {
    crate::limits::DEFAULT_IDLE_TIMEOUT.as_secs_f64()
}
fn default_max_response_bytes() -> u64 {
    crate::limits::DEFAULT_MAX_RESPONSE_BYTES as u64
}
fn default_true() -> bool {
    true
}

/// Room for the head, the tail and the marker of a cut tool output.
const MIN_TOOL_OUTPUT_CHARS: usize = 200;

fn seconds(field: &'static str, value: f64) -> Result<Duration, SpecError> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| SpecError::Invalid { field, message: format!("{value} is not a positive number of seconds") })
}

impl BatchSpec {
    /// Whether model calls are streamed (see [`BatchSpec::stream`]).
    pub fn streams(&self) -> bool {
        self.stream.unwrap_or(!self.tools.is_empty())
    }

    pub fn from_json(text: &str) -> Result<Self, SpecError> {
        let raw: RawSpec = parse_settings(text)?;
        if raw.model.trim().is_empty() {
            return Err(SpecError::Invalid { field: "model", message: "must not be empty".into() });
        }
        if raw.max_turns == 0 {
            return Err(SpecError::Invalid { field: "max_turns", message: "must be at least 1".into() });
        }
        for (field, value) in [("rpm", raw.rpm), ("tpm", raw.tpm)] {
            if value == Some(0) {
                return Err(SpecError::Invalid {
                    field,
                    message: "must be at least 1 (leave it out for no limit)".into(),
                });
            }
        }
        if raw.max_inflight == 0 {
            return Err(SpecError::Invalid { field: "max_inflight", message: "must be at least 1".into() });
        }
        if raw.max_attempts == 0 {
            return Err(SpecError::Invalid { field: "max_attempts", message: "must be at least 1".into() });
        }
        let window = raw.window.unwrap_or_else(|| (raw.max_inflight * 4).max(256));
        if window == 0 {
            return Err(SpecError::Invalid { field: "window", message: "must be at least 1".into() });
        }
        if raw.max_context_tokens == Some(0) {
            return Err(SpecError::Invalid { field: "max_context_tokens", message: "must be at least 1".into() });
        }
        if raw.compaction_keep_turns == 0 {
            return Err(SpecError::Invalid { field: "compaction_keep_turns", message: "must be at least 1".into() });
        }
        if raw.compaction_tool_output_chars < MIN_TOOL_OUTPUT_CHARS {
            return Err(SpecError::Invalid {
                field: "compaction_tool_output_chars",
                message: format!("must be at least {MIN_TOOL_OUTPUT_CHARS}, got {}", raw.compaction_tool_output_chars),
            });
        }
        if raw.compaction_summary_tokens == 0 {
            return Err(SpecError::Invalid {
                field: "compaction_summary_tokens",
                message: "must be at least 1".into(),
            });
        }
        if raw.compaction_model.as_deref().is_some_and(|m| m.trim().is_empty()) {
            return Err(SpecError::Invalid { field: "compaction_model", message: "must not be empty".into() });
        }
        let mut names = std::collections::HashSet::new();
        for tool in &raw.tools {
            if !names.insert(tool.name.as_str()) {
                return Err(SpecError::Invalid {
                    field: "tools",
                    message: format!("tool '{}' is defined twice", tool.name),
                });
            }
        }
        Ok(Self {
            model: raw.model,
            system: raw.system.filter(|s| !s.is_empty()),
            task: Template::parse(&raw.task)?,
            tools: Arc::new(raw.tools),
            output_schema: raw.output_schema.map(Arc::new),
            schema_mode: raw.schema_mode,
            max_turns: raw.max_turns,
            max_inflight: raw.max_inflight,
            window,
            max_attempts: raw.max_attempts,
            validation_retries: raw.validation_retries,
            call_timeout: seconds("call_timeout", raw.call_timeout)?,
            agent_timeout: raw.agent_timeout.map(|s| seconds("agent_timeout", s)).transpose()?,
            idle_timeout: seconds("idle_timeout", raw.idle_timeout)?,
            max_response_bytes: usize::try_from(raw.max_response_bytes).ok().filter(|&n| n > 0).ok_or_else(|| {
                SpecError::Invalid {
                    field: "max_response_bytes",
                    message: format!("must be at least 1, got {}", raw.max_response_bytes),
                }
            })?,
            max_tokens: raw.max_tokens,
            temperature: raw.temperature,
            stream: raw.stream,
            warm_prefix: raw.warm_prefix,
            agent_hints: raw.agent_hints,
            engine_hints: raw.engine_hints,
            rpm: raw.rpm,
            tpm: raw.tpm,
            extra_body: raw.extra_body.filter(|m| !m.is_empty()).map(Arc::new),
            compaction: CompactionSpec {
                enabled: raw.compaction,
                max_context_tokens: raw.max_context_tokens,
                keep_turns: raw.compaction_keep_turns,
                tool_output_chars: raw.compaction_tool_output_chars,
                model: raw.compaction_model,
                summary_tokens: raw.compaction_summary_tokens,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn map(v: &Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn renders_strings_and_json_values() {
        let t = Template::parse("Review {path} ({n} lines) {{literal}}").unwrap();
        assert_eq!(t.render(0, &map(&json!({"path": "a.py", "n": 3}))).unwrap(), "Review a.py (3 lines) {literal}");
        assert_eq!(t.variables(), vec!["path", "n"]);
    }

    #[test]
    fn out_of_range_settings_name_their_field() {
        let spec = |extra: &str| format!(r#"{{"model": "m", "task": "t", {extra}}}"#);
        let cases = [
            (r#""max_inflight": -5"#, "invalid setting 'max_inflight': invalid value: integer `-5`, expected an integer from 0 to 18446744073709551615"),
            (r#""max_turns": 5000000000"#, "invalid setting 'max_turns': invalid value: integer `5000000000`, expected an integer from 0 to 4294967295"),
            (r#""max_tokens": -1"#, "invalid setting 'max_tokens': invalid value: integer `-1`, expected an integer from 0 to 4294967295"),
            (r#""window": 1.5"#, "invalid setting 'window': invalid type: floating point `1.5`, expected an integer from 0 to 18446744073709551615"),
            (r#""call_timeout": "x""#, "invalid setting 'call_timeout': invalid type: string \"x\", expected a number"),
            (r#""tools": [{"name": 3}]"#, "invalid setting 'tools[0].name': invalid type: integer `3`, expected a string"),
        ];
        for (extra, expected) in cases {
            let err = BatchSpec::from_json(&spec(extra)).unwrap_err();
            assert_eq!(err.to_string(), expected, "{extra}");
        }
        let err = BatchSpec::from_json(&spec(r#""max_inflight": 0"#)).unwrap_err();
        assert_eq!(err.to_string(), "invalid setting 'max_inflight': must be at least 1");
    }

    #[test]
    fn missing_variable_names_input_and_variable() {
        let t = Template::parse("Review {path}").unwrap();
        let err = t.render(7, &map(&json!({"file": "a.py"}))).unwrap_err();
        assert_eq!(err.to_string(), "input 7: template variable 'path' is missing (the input has: file)");
    }

    #[test]
    fn malformed_templates_are_rejected_with_position() {
        assert!(matches!(Template::parse("a {b"), Err(SpecError::Template { position: 2, .. })));
        assert!(matches!(Template::parse("a } b"), Err(SpecError::Template { position: 2, .. })));
        assert!(matches!(Template::parse("{a.b}"), Err(SpecError::Template { .. })));
        assert!(matches!(Template::parse("{}"), Err(SpecError::Template { .. })));
    }

    #[test]
    fn spec_defaults_and_validation() {
        let spec = BatchSpec::from_json(r#"{"model": "m", "task": "do {x}"}"#).unwrap();
        assert_eq!(spec.max_turns, 8);
        assert_eq!(spec.window, 256);
        let err = BatchSpec::from_json(r#"{"model": "m", "task": "t", "max_turns": 0}"#).unwrap_err();
        assert!(err.to_string().contains("max_turns"));
        let err = BatchSpec::from_json(r#"{"model": "m", "task": "t", "bogus": 1}"#).unwrap_err();
        assert!(err.to_string().contains("bogus"));
    }
}
