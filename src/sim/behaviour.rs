//! The scripted agent: what the simulated model says, decided from the request and the seed alone.
//!
//! With tools on offer it calls them for `tool_rounds` assistant turns, then answers. Tool `i` of
//! round `r` is `tools[(r * parallel + i) % tools.len()]`; its arguments are generated from the
//! tool's parameter schema with a seed picked among `distinct_args` values by a hash of the first
//! user message, so conversations with the same first message make identical calls and a batch of
//! agents makes at most `distinct_args` different calls per tool and round. The answer is JSON when a
//! schema is requested (`response_format`, or found in the prompt) and text otherwise.

use serde_json::Value;

use super::config::{BehaviourConfig, SimError};
use super::draw::{hash_bytes, mix, Draw};
use super::schema_gen;
use super::tokenizer;
use crate::conversation::{summarised_turns, Message, Role, ToolCall, ToolDef};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    #[default]
    Auto,
    None,
    Required,
    Named(String),
}

/// One model call, translated from whichever protocol carried it.
#[derive(Debug, Clone, Default)]
pub struct AgentRequest {
    pub messages: Vec<Message>,
    pub tools: Vec<ToolDef>,
    pub tool_choice: ToolChoice,
    /// `response_format: json_schema` (`OpenAI`) or `format: {schema}` (Ollama).
    pub response_schema: Option<Value>,
    /// `response_format: json_object` / `format: "json"`: any JSON object will do.
    pub json_mode: bool,
    /// `parallel_tool_calls: false` limits a turn to one call.
    pub allow_parallel: bool,
}

/// What the model says in this turn, before any `max_tokens` cut.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reply {
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
}

/// One output token as the protocols stream it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    /// The tool call's name is complete: the first streamed delta of call `n`.
    CallStart(usize),
    CallArgs(usize, String),
    /// A token of the tool-call markup that the server's parser swallows.
    Silent,
}

/// A copy of `base` with the keys of a request's `"sim": {...}` object applied.
pub fn with_overrides(base: &BehaviourConfig, overrides: &Value) -> Result<BehaviourConfig, SimError> {
    let mut cfg = base.clone();
    let Some(map) = overrides.as_object() else {
        return Err(SimError::InvalidValue {
            key: "sim".to_owned(),
            value: overrides.to_string(),
            reason: "expected an object of simulator options".to_owned(),
        });
    };
    for (key, value) in map {
        let text = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if !cfg.set(&key.replace('-', "_"), &text)? {
            return Err(SimError::UnknownOption(format!("sim.{key}")));
        }
    }
    Ok(cfg)
}

/// Decide the reply. `seed` is the simulator's seed.
pub fn reply(cfg: &BehaviourConfig, seed: u64, req: &AgentRequest) -> Reply {
    let conversation = conversation_hash(&req.messages);
    let mut draw = Draw::new(mix(seed, conversation));
    // A compaction summary stands for the turns it replaced: the agent knows how far it had got.
    let rounds_done = req
        .messages
        .iter()
        .map(|m| match summarised_turns(m) {
            Some(turns) => turns as usize,
            None => usize::from(m.role == Role::Assistant && !m.tool_calls.is_empty()),
        })
        .sum::<usize>();
    let wants_tools = !req.tools.is_empty()
        && match &req.tool_choice {
            ToolChoice::None => false,
            ToolChoice::Auto => rounds_done < cfg.tool_rounds as usize,
            ToolChoice::Required | ToolChoice::Named(_) => true,
        };
    if wants_tools {
        return Reply { content: String::new(), tool_calls: tool_calls(cfg, seed, req, rounds_done, conversation) };
    }
    let schema = req.response_schema.clone().or_else(|| schema_in_prompt(&req.messages));
    let content = match (schema, req.json_mode) {
        (Some(schema), _) => json_answer(cfg, &schema, &mut draw),
        (None, true) => json_answer(
            cfg,
            &serde_json::json!({"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}),
            &mut draw,
        ),
        (None, false) => text_answer(cfg, &mut draw),
    };
    Reply { content, tool_calls: Vec::new() }
}

/// The reply as output tokens, in order: the text, then each tool call in the Hermes/Qwen markup
/// (`<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`) whose tokens a real server counts
/// as completion tokens but streams only as name + argument fragments.
pub fn pieces(reply: &Reply) -> Vec<Piece> {
    let mut out: Vec<Piece> =
        tokenizer::pieces(&reply.content).into_iter().map(|p| Piece::Text(p.to_owned())).collect();
    for (i, call) in reply.tool_calls.iter().enumerate() {
        let head = format!("<tool_call>\n{{\"name\": {}, \"arguments\": ", Value::String(call.name.clone()));
        let head_len = tokenizer::count(&head);
        out.extend((1..head_len).map(|_| Piece::Silent));
        out.push(Piece::CallStart(i));
        out.extend(tokenizer::pieces(&call.arguments).into_iter().map(|p| Piece::CallArgs(i, p.to_owned())));
        out.extend((0..tokenizer::count("}\n</tool_call>")).map(|_| Piece::Silent));
    }
    out
}

fn conversation_hash(messages: &[Message]) -> u64 {
    messages.iter().fold(0x5151_5151, |h, m| {
        let role = m.role as u64;
        let calls = m.tool_calls.iter().fold(0, |c, t| mix(c, hash_bytes(t.arguments.as_bytes())));
        mix(mix(h, role), mix(hash_bytes(m.content.as_bytes()), calls))
    })
}

fn tool_calls(cfg: &BehaviourConfig, seed: u64, req: &AgentRequest, round: usize, conversation: u64) -> Vec<ToolCall> {
    let first_user = req.messages.iter().find(|m| m.role == Role::User).map_or("", |m| m.content.as_str());
    let k = mix(seed, hash_bytes(first_user.as_bytes())) % u64::from(cfg.distinct_args.max(1));
    let per_turn = if req.allow_parallel { cfg.parallel_tool_calls.max(1) as usize } else { 1 };
    (0..per_turn)
        .map(|i| {
            let tool = match &req.tool_choice {
                ToolChoice::Named(name) => req.tools.iter().find(|t| &t.name == name).unwrap_or(&req.tools[0]),
                _ => &req.tools[(round * per_turn + i) % req.tools.len()],
            };
            let arg_seed = mix(mix(seed, hash_bytes(tool.name.as_bytes())), mix((round * per_turn + i) as u64, k));
            let args = schema_gen::generate(&tool.parameters, arg_seed);
            let args = if args.is_object() { args } else { Value::Object(serde_json::Map::new()) };
            ToolCall {
                id: format!("call_{:016x}", mix(conversation, i as u64)),
                name: tool.name.clone(),
                arguments: args.to_string(),
            }
        })
        .collect()
}

/// A JSON Schema the caller embedded in the prompt: after a line `JSON Schema:` or in a fenced
/// ```` ```json ```` block of a system or user message.
pub fn schema_in_prompt(messages: &[Message]) -> Option<Value> {
    messages.iter().filter(|m| matches!(m.role, Role::System | Role::User)).find_map(|m| {
        let text = m.content.as_str();
        let mut starts: Vec<usize> = Vec::new();
        for marker in ["JSON Schema:", "```json"] {
            let mut from = 0;
            while let Some(at) = text[from..].find(marker) {
                starts.push(from + at + marker.len());
                from += at + marker.len();
            }
        }
        starts.sort_unstable();
        starts.into_iter().find_map(|at| {
            let rest = text[at..].trim_start();
            let value = serde_json::Deserializer::from_str(rest).into_iter::<Value>().next()?.ok()?;
            let looks_like_schema = value.as_object().is_some_and(|o| {
                ["type", "properties", "$defs", "$ref", "anyOf", "oneOf", "enum"].iter().any(|k| o.contains_key(*k))
            });
            looks_like_schema.then_some(value)
        })
    })
}

fn json_answer(cfg: &BehaviourConfig, schema: &Value, draw: &mut Draw) -> String {
    let instance_seed = draw.next_u64();
    let invalid = draw.chance(cfg.invalid_json_rate);
    let truncated = draw.chance(cfg.truncated_json_rate);
    let fenced = draw.chance(cfg.fenced_json_rate);
    let prose = draw.chance(cfg.prose_json_rate);
    let value = if invalid { schema_gen::violate(schema, instance_seed) } else { None }
        .unwrap_or_else(|| schema_gen::generate(schema, instance_seed));
    let mut text = value.to_string();
    if truncated {
        // Cut right before the closing brackets, as a model that hit its token limit at the end of
        // the answer leaves it: everything is there except what a JSON repair adds back.
        let closers = text.chars().rev().take_while(|c| matches!(c, '}' | ']')).count();
        let cut = match closers {
            0 if text.ends_with('"') => text.len() - 1,
            0 => text.len() / 2,
            n => text.len() - n,
        };
        let cut = (0..=cut).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        text.truncate(cut);
        // A model that ran out of tokens never writes what would have come after.
        let before = if prose { "Here is the result:\n" } else { "" };
        let fence = if fenced { "```json\n" } else { "" };
        return format!("{before}{fence}{text}");
    }
    if fenced {
        text = format!("```json\n{text}\n```");
    }
    if prose {
        text = format!("Here is the result:\n{text}\nLet me know if you need anything else.");
    }
    text
}

const WORDS: &[&str] = &[
    "the",
    "model",
    "reviewed",
    "input",
    "and",
    "found",
    "that",
    "result",
    "is",
    "consistent",
    "with",
    "expected",
    "behaviour",
    "of",
    "system",
    "under",
    "load",
    "a",
    "summary",
    "follows",
    "data",
    "shows",
    "clear",
    "trend",
    "in",
    "each",
    "case",
    "report",
    "notes",
    "further",
    "work",
    "needed",
];

fn text_answer(cfg: &BehaviourConfig, draw: &mut Draw) -> String {
    let n = cfg.output_tokens.draw(draw.unit(), draw.unit()) as usize;
    let mut text = String::with_capacity(n * 5);
    let mut sentence_len = 0;
    while tokenizer::count(&text) < n {
        let word = WORDS[draw.below(WORDS.len() as u64) as usize];
        if sentence_len == 0 {
            let mut chars = word.chars();
            if let Some(first) = chars.next() {
                if !text.is_empty() {
                    text.push(' ');
                }
                text.extend(first.to_uppercase());
                text.push_str(chars.as_str());
            }
        } else {
            text.push(' ');
            text.push_str(word);
        }
        sentence_len += 1;
        if sentence_len >= 8 + draw.below(6) as usize {
            text.push('.');
            sentence_len = 0;
        }
    }
    let cut: usize = tokenizer::pieces(&text).iter().take(n).map(|p| p.len()).sum();
    text.truncate(cut);
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::sim::config::OutputLen;
    use serde_json::json;

    fn weather_tool() -> ToolDef {
        ToolDef {
            name: "get_weather".into(),
            description: "Weather in a city".into(),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city"]}),
        }
    }

    fn ask(first: &str) -> AgentRequest {
        AgentRequest {
            messages: vec![Message::system("You help."), Message::user(first)],
            tools: vec![weather_tool()],
            allow_parallel: true,
            ..AgentRequest::default()
        }
    }

    #[test]
    fn calls_tools_for_the_configured_rounds_then_answers() {
        let cfg = BehaviourConfig { tool_rounds: 2, ..BehaviourConfig::default() };
        let mut req = ask("Plan my trip");
        for _ in 0..2 {
            let r = reply(&cfg, 1, &req);
            assert_eq!(r.tool_calls.len(), 1);
            let args: Value = serde_json::from_str(&r.tool_calls[0].arguments).unwrap();
            assert!(args["city"].is_string());
            req.messages.push(Message::assistant("", r.tool_calls.clone()));
            req.messages.push(Message::tool_result(&r.tool_calls[0], "sunny"));
        }
        let answer = reply(&cfg, 1, &req);
        assert!(answer.tool_calls.is_empty());
        assert!(!answer.content.is_empty());
    }

    #[test]
    fn distinct_args_bounds_distinct_calls() {
        let cfg = BehaviourConfig { distinct_args: 3, ..BehaviourConfig::default() };
        let args: std::collections::HashSet<String> =
            (0..200).map(|i| reply(&cfg, 5, &ask(&format!("task {i}"))).tool_calls[0].arguments.clone()).collect();
        assert_eq!(args.len(), 3);
        // The same first message gives the same call, whatever else differs.
        let mut a = ask("same");
        a.messages[0] = Message::system("other system prompt");
        assert_eq!(reply(&cfg, 5, &a).tool_calls[0].arguments, reply(&cfg, 5, &ask("same")).tool_calls[0].arguments);
    }

    #[test]
    fn tool_choice_is_obeyed() {
        let cfg = BehaviourConfig { tool_rounds: 0, parallel_tool_calls: 3, ..BehaviourConfig::default() };
        let mut req = ask("x");
        assert!(reply(&cfg, 0, &req).tool_calls.is_empty());
        req.tool_choice = ToolChoice::Required;
        assert_eq!(reply(&cfg, 0, &req).tool_calls.len(), 3);
        req.allow_parallel = false;
        assert_eq!(reply(&cfg, 0, &req).tool_calls.len(), 1);
        req.tool_choice = ToolChoice::None;
        req.messages.truncate(1);
        assert!(reply(&BehaviourConfig::default(), 0, &req).tool_calls.is_empty());
    }

    #[test]
    fn text_length_follows_the_distribution() {
        let cfg = BehaviourConfig { output_tokens: OutputLen::Fixed(37), ..BehaviourConfig::default() };
        for i in 0..20 {
            let mut req = ask(&format!("q{i}"));
            req.tools.clear();
            assert_eq!(tokenizer::count(&reply(&cfg, 0, &req).content), 37);
        }
    }

    #[test]
    fn schema_in_prompt_is_answered_with_valid_json() {
        let schema = json!({"type": "object", "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 5}}, "required": ["score"]});
        for text in [format!("Rate it.\nJSON Schema: {schema}\nThanks"), format!("Rate it.\n```json\n{schema:#}\n```")]
        {
            let req = AgentRequest { messages: vec![Message::user(text)], ..AgentRequest::default() };
            let r = reply(&BehaviourConfig::default(), 3, &req);
            let v: Value = serde_json::from_str(&r.content).unwrap();
            assert!(v["score"].as_i64().is_some_and(|s| (0..=5).contains(&s)), "{v}");
        }
    }

    #[test]
    fn json_defects_follow_their_rates() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "required": ["a", "b"]});
        let cfg = BehaviourConfig { fenced_json_rate: 1.0, ..BehaviourConfig::default() };
        let req = AgentRequest {
            messages: vec![Message::user("go")],
            response_schema: Some(schema.clone()),
            ..AgentRequest::default()
        };
        let fenced = reply(&cfg, 0, &req).content;
        assert!(fenced.starts_with("```json\n") && fenced.ends_with("\n```"));
        let cfg = BehaviourConfig { truncated_json_rate: 1.0, ..BehaviourConfig::default() };
        let cut = reply(&cfg, 0, &req).content;
        assert!(serde_json::from_str::<Value>(&cut).is_err());
        // Only the closers are missing: a repair that closes the brackets gets the whole answer back.
        let repaired: Value = serde_json::from_str(&format!("{cut}}}")).unwrap();
        assert!(repaired["a"].is_string() && repaired["b"].is_i64());
        let cfg = BehaviourConfig { invalid_json_rate: 0.5, ..BehaviourConfig::default() };
        let invalid = (0..400)
            .filter(|i| {
                let mut r = req.clone();
                r.messages = vec![Message::user(format!("go {i}"))];
                let v: Value = serde_json::from_str(&reply(&cfg, 0, &r).content).unwrap();
                !(v["a"].is_string() && v["b"].is_i64())
            })
            .count();
        assert!((150..250).contains(&invalid), "{invalid}");
    }

    #[test]
    fn pieces_stream_name_then_argument_fragments() {
        let r = reply(&BehaviourConfig::default(), 0, &ask("x"));
        let p = pieces(&r);
        let start = p.iter().position(|x| *x == Piece::CallStart(0)).unwrap();
        assert!(p[..start].iter().all(|x| *x == Piece::Silent));
        let args: String =
            p.iter().filter_map(|x| if let Piece::CallArgs(0, s) = x { Some(s.as_str()) } else { None }).collect();
        assert_eq!(args, r.tool_calls[0].arguments);
    }

    #[test]
    fn overrides_apply_and_unknown_keys_fail() {
        let cfg = with_overrides(&BehaviourConfig::default(), &json!({"tool_rounds": 3, "output_tokens": "fixed:5"}))
            .unwrap();
        assert_eq!((cfg.tool_rounds, cfg.output_tokens), (3, OutputLen::Fixed(5)));
        assert!(with_overrides(&BehaviourConfig::default(), &json!({"bogus": 1}))
            .unwrap_err()
            .to_string()
            .contains("bogus"));
    }
}
