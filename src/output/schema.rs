//! JSON Schema validation, compiled once per batch and shared by every job: the `jsonschema` crate,
//! draft 2020-12 unless the schema's `$schema` names another draft. Every keyword is enforced,
//! `pattern`, `dependentSchemas` and `unevaluated*` included, and `format` as an assertion (a model
//! asked for an `email` or a `date-time` must give one; formats the crate does not know are
//! ignored). References resolve within the schema only: nothing is fetched from the network or
//! from files.
//!
//! Measured against the hand-written validator this replaced (`cargo bench --profile ci --bench
//! output`, on a loaded shared 2-core machine): validating the pydantic review schema went from 8.2
//! to 4.9 us for a valid value and from 7.8 to 8.5 us for an invalid one; compiling it, once per
//! batch, from 48 to 129 us.
//!
//! What is ours is the wording: a violation is fed back to the model on a validation retry, so it
//! names the path that failed and says what was expected and what came, in a few words, without
//! echoing a large value back.

use std::fmt::Write as _;
use std::sync::Arc;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::{Draft, ValidationError, Validator};
use serde_json::Value;

use super::SchemaError;

/// Validation recurses along the instance; a value nested this deep is refused up front so that a
/// pathological one cannot overflow a worker thread's stack. `serde_json` parses no deeper than 128.
const MAX_DEPTH: usize = 128;

/// Longest string shown in full inside a message; a model needs to recognise its value, not reread it.
const SHOWN_STRING_CHARS: usize = 60;

/// A schema violation: where in the instance (a JSON pointer, `""` for the root) and what is wrong,
/// worded for a model to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub path: String,
    pub message: String,
}

/// A compiled JSON Schema; `Send + Sync`, cheap to share in an `Arc`.
#[derive(Debug, Clone)]
pub struct CompiledSchema {
    validator: Validator,
    /// The schema as given: a message about an unexpected property lists the allowed ones from it.
    schema: Arc<Value>,
}

/// One line per violation, for feeding back to the model in a retry.
pub fn describe(violations: &[Violation]) -> String {
    let mut text = String::new();
    for (i, violation) in violations.iter().enumerate() {
        if i > 0 {
            text.push('\n');
        }
        let path = if violation.path.is_empty() { "(root)" } else { &violation.path };
        let _ = write!(text, "{path}: {}", violation.message);
    }
    text
}

impl CompiledSchema {
    /// Compile once, up front: an invalid schema (one its draft's meta-schema rejects, a `pattern`
    /// that is not a regular expression, a `$ref` that does not resolve) is an error naming the
    /// JSON pointer of the bad part.
    pub fn compile(schema: &Value) -> Result<Self, SchemaError> {
        let validator = jsonschema::options()
            .with_draft(Draft::Draft202012)
            .should_validate_formats(true)
            .build(schema)
            .map_err(|e| SchemaError::Invalid { pointer: e.instance_path().to_string(), message: e.to_string() })?;
        Ok(Self { validator, schema: Arc::new(schema.clone()) })
    }

    /// All violations, each with the instance path (JSON pointer, e.g. /bugs/2) and a message a
    /// model can act on ("expected integer, got string \"high\"", "missing required property 'severity'").
    pub fn validate(&self, instance: &Value) -> Result<(), Vec<Violation>> {
        if exceeds_depth(instance, MAX_DEPTH) {
            return Err(vec![Violation {
                path: String::new(),
                message: format!("the value is nested deeper than {MAX_DEPTH} levels"),
            }]);
        }
        if self.validator.is_valid(instance) {
            return Ok(());
        }
        let mut violations = Vec::new();
        for error in self.validator.iter_errors(instance) {
            push_violations(&self.schema, instance, &error, &mut violations);
        }
        if violations.is_empty() {
            // `is_valid` and `iter_errors` disagreeing would be a bug in the crate; never pass
            // off an invalid value as valid.
            violations.push(Violation { path: String::new(), message: "does not match the schema".to_owned() });
        }
        Err(violations)
    }
}

/// The violations one error stands for: itself, or for an `anyOf` / `oneOf` that no alternative
/// matches, the errors of the one alternative whose type fits (what the model most likely meant).
fn push_violations(schema: &Value, instance: &Value, error: &ValidationError<'_>, out: &mut Vec<Violation>) {
    let path = error.instance_path().to_string();
    let (ValidationErrorKind::AnyOf { context: branches } | ValidationErrorKind::OneOfNotValid { context: branches }) =
        error.kind()
    else {
        let violation = Violation { path, message: message(schema, instance, error) };
        // One object's several refused properties may each give the same message.
        if !out.contains(&violation) {
            out.push(violation);
        }
        return;
    };
    // An alternative is not what the model meant when the value has another type, or when a
    // property that tells the alternatives apart (a `const` or `enum` tag) has another value.
    let at = error.instance_path().to_string();
    let misfit = |e: &ValidationError<'_>| {
        let path = e.instance_path().to_string();
        match e.kind() {
            ValidationErrorKind::Type { .. } => path == at,
            ValidationErrorKind::Constant { .. } | ValidationErrorKind::Enum { .. } => {
                path.strip_prefix(at.as_str()).is_some_and(|rest| rest.len() > 1 && rest.rfind('/') == Some(0))
            }
            _ => false,
        }
    };
    let fitting: Vec<&Vec<ValidationError<'static>>> =
        branches.iter().filter(|branch| !branch.iter().any(misfit)).collect();
    if let [only] = fitting.as_slice() {
        for inner in *only {
            push_violations(schema, instance, inner, out);
        }
        return;
    }
    // Every alternative wants another type: say which types would do.
    let types: Option<Vec<String>> = branches
        .iter()
        .map(|branch| match branch.as_slice() {
            [only] => match only.kind() {
                ValidationErrorKind::Type { kind } if only.instance_path().to_string() == at => Some(type_names(kind)),
                _ => None,
            },
            _ => None,
        })
        .collect();
    if let Some(types) = types {
        let names: Vec<&str> = types.iter().flat_map(|t| t.split(" or ")).collect();
        out.push(Violation { path, message: format!("expected {}, got {}", words_or(&names), show(error.instance())) });
        return;
    }
    let mut text = format!("matches none of the {} allowed alternatives", branches.len());
    for (i, branch) in branches.iter().enumerate() {
        let messages: Vec<String> = branch.iter().map(|e| message(schema, instance, e)).collect();
        let _ = write!(text, "; alternative {}: {}", i + 1, messages.join(", "));
    }
    out.push(Violation { path, message: text });
}

fn unexpected_properties(unexpected: &[String]) -> String {
    let names: Vec<String> = unexpected.iter().map(|name| format!("'{name}'")).collect();
    let noun = if names.len() == 1 { "property" } else { "properties" };
    format!("unexpected {noun} {}", names.join(", "))
}

/// Most allowed property names listed after an unexpected one; a longer list is left out.
const LISTED_PROPERTIES: usize = 20;

/// Appends what the object that refused a property allows: its `properties` by name and its
/// `patternProperties` by pattern, read from the schema object holding the failed keyword (the
/// error's schema path is canonical, `$ref`s already resolved to where the keyword is written).
fn allowed_properties(schema: &Value, error: &ValidationError<'_>, text: &mut String) {
    let keyword_at = error.schema_path().to_string();
    let Some((parent, _)) = keyword_at.rsplit_once('/') else { return };
    let Some(object) = schema.pointer(parent) else { return };
    let names: Vec<&str> = object
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let patterns: Vec<&str> = object
        .get("patternProperties")
        .and_then(Value::as_object)
        .map(|p| p.keys().map(String::as_str).collect())
        .unwrap_or_default();
    if names.is_empty() && patterns.is_empty() {
        text.push_str("; no properties are allowed");
        return;
    }
    if names.len() + patterns.len() > LISTED_PROPERTIES {
        return;
    }
    let mut allowed: Vec<String> = names.iter().map(|name| format!("'{name}'")).collect();
    allowed.extend(patterns.iter().map(|pattern| format!("names matching '{pattern}'")));
    let _ = write!(text, "; allowed: {}", allowed.join(", "));
}

/// One violation in words. The crate's own message, with the value shown shortened, is the
/// fallback for the rarer keywords.
fn message(schema: &Value, instance: &Value, error: &ValidationError<'_>) -> String {
    let got = show(error.instance());
    match error.kind() {
        ValidationErrorKind::Type { kind } => format!("expected {}, got {got}", type_names(kind)),
        ValidationErrorKind::Required { property } => match property {
            Value::String(name) => format!("missing required property '{name}'"),
            other => format!("missing required property {other}"),
        },
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            let mut text = unexpected_properties(unexpected);
            allowed_properties(schema, error, &mut text);
            text
        }
        // Properties evaluated elsewhere (`allOf`, `$ref` siblings) are allowed too, so the
        // object's own `properties` would be an incomplete list: none is given.
        ValidationErrorKind::UnevaluatedProperties { unexpected } => unexpected_properties(unexpected),
        ValidationErrorKind::Enum { options } => format!("expected {}, got {got}", one_of_values(options)),
        ValidationErrorKind::Constant { expected_value } => format!("expected {expected_value}, got {got}"),
        ValidationErrorKind::Pattern { pattern } => format!("expected a string matching '{pattern}', got {got}"),
        ValidationErrorKind::Format { format } => format!("expected a string in format '{format}', got {got}"),
        ValidationErrorKind::MinLength { limit } => bound("at least", *limit, "character", error.instance()),
        ValidationErrorKind::MaxLength { limit } => bound("at most", *limit, "character", error.instance()),
        ValidationErrorKind::MinItems { limit } => bound("at least", *limit, "item", error.instance()),
        ValidationErrorKind::MaxItems { limit } => bound("at most", *limit, "item", error.instance()),
        ValidationErrorKind::MinProperties { limit } => bound("at least", *limit, "property", error.instance()),
        ValidationErrorKind::MaxProperties { limit } => bound("at most", *limit, "property", error.instance()),
        ValidationErrorKind::Minimum { limit } => format!("expected a number >= {limit}, got {}", error.instance()),
        ValidationErrorKind::Maximum { limit } => format!("expected a number <= {limit}, got {}", error.instance()),
        ValidationErrorKind::ExclusiveMinimum { limit } => {
            format!("expected a number > {limit}, got {}", error.instance())
        }
        ValidationErrorKind::ExclusiveMaximum { limit } => {
            format!("expected a number < {limit}, got {}", error.instance())
        }
        ValidationErrorKind::MultipleOf { multiple_of } => {
            format!("expected a number that is a multiple of {multiple_of}, got {}", error.instance())
        }
        // `additionalProperties: false` beside no `properties` or `patternProperties` fails each
        // property's value this way, at the object's path: every property is unexpected.
        ValidationErrorKind::FalseSchema => {
            let object = instance.pointer(&error.instance_path().to_string()).and_then(Value::as_object);
            match object {
                Some(object) if error.schema_path().to_string().ends_with("/additionalProperties") => {
                    let names: Vec<String> = object.keys().take(LISTED_PROPERTIES).cloned().collect();
                    format!("{}; no properties are allowed", unexpected_properties(&names))
                }
                _ => "no value is allowed here".to_owned(),
            }
        }
        ValidationErrorKind::Not { .. } => "must not match the schema given in 'not'".to_owned(),
        ValidationErrorKind::UniqueItems => match equal_items(error.instance()) {
            Some((i, j)) => format!("items {i} and {j} are equal; items must be unique"),
            None => "items must be unique".to_owned(),
        },
        ValidationErrorKind::OneOfMultipleValid { .. } => {
            "matches more than one alternative of 'oneOf', but must match exactly one".to_owned()
        }
        _ => error.masked_with(got).to_string(),
    }
}

/// "expected at most 3 items, got 4": strings count characters, arrays items, objects properties.
fn bound(relation: &str, limit: u64, noun: &str, instance: &Value) -> String {
    let count = match instance {
        Value::String(s) => s.chars().count(),
        Value::Array(items) => items.len(),
        Value::Object(map) => map.len(),
        _ => 0,
    };
    format!("expected {relation} {limit} {}, got {count}", plural(limit, noun))
}

fn type_names(kind: &TypeKind) -> String {
    match kind {
        TypeKind::Single(t) => t.to_string(),
        TypeKind::Multiple(set) => {
            let names: Vec<String> = set.iter().map(|t| t.to_string()).collect();
            words_or(&names.iter().map(String::as_str).collect::<Vec<_>>())
        }
    }
}

/// "string", "string or null", "string, integer or null".
fn words_or(names: &[&str]) -> String {
    match names.split_last() {
        None => "nothing".to_owned(),
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// The first two equal items of an array, by JSON Schema equality (1 equals 1.0).
fn equal_items(instance: &Value) -> Option<(usize, usize)> {
    let items = instance.as_array()?;
    items.iter().enumerate().find_map(|(i, a)| {
        let j = items.iter().skip(i + 1).position(|b| jsonschema::is_valid(&serde_json::json!({"const": a}), b))?;
        Some((i, i + 1 + j))
    })
}

fn plural(count: u64, noun: &str) -> String {
    match (count, noun) {
        (1, _) => noun.to_owned(),
        (_, "property") => "properties".to_owned(),
        _ => format!("{noun}s"),
    }
}

fn one_of_values(allowed: &Value) -> String {
    const LISTED: usize = 12;
    let Value::Array(allowed) = allowed else { return allowed.to_string() };
    match allowed.as_slice() {
        [] => "nothing (the schema's 'enum' is empty)".to_owned(),
        [only] => only.to_string(),
        _ if allowed.len() <= LISTED => {
            let shown: Vec<String> = allowed.iter().map(Value::to_string).collect();
            format!("one of {}", shown.join(", "))
        }
        _ => format!("one of {} allowed values", allowed.len()),
    }
}

/// The instance as a message shows it: its JSON type, then the value when it is short.
fn show(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) if n.is_f64() => format!("number {n}"),
        Value::Number(n) => format!("integer {n}"),
        Value::String(s) => match s.char_indices().nth(SHOWN_STRING_CHARS) {
            Some((cut, _)) => format!("string {}...", Value::from(&s[..cut])),
            None => format!("string {value}"),
        },
        Value::Array(items) => format!("array of {} {}", items.len(), plural(items.len() as u64, "item")),
        Value::Object(map) if map.is_empty() => "empty object".to_owned(),
        Value::Object(map) => format!("object with {} {}", map.len(), plural(map.len() as u64, "property")),
    }
}

fn exceeds_depth(value: &Value, max: usize) -> bool {
    let mut pending = vec![(value, 0)];
    while let Some((value, depth)) = pending.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match value {
            Value::Array(items) => Box::new(items.iter()),
            Value::Object(map) => Box::new(map.values()),
            _ => continue,
        };
        if depth >= max {
            return true;
        }
        pending.extend(children.map(|child| (child, depth + 1)));
    }
    false
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::needless_pass_by_value)]

    use std::sync::Arc;

    use serde_json::{json, Value};

    use super::{describe, CompiledSchema, Violation};
    use crate::output::SchemaError;

    fn schema(value: Value) -> CompiledSchema {
        CompiledSchema::compile(&value).unwrap()
    }

    fn errors(schema: &CompiledSchema, instance: Value) -> Vec<(String, String)> {
        match schema.validate(&instance) {
            Ok(()) => Vec::new(),
            Err(found) => found.into_iter().map(|v| (v.path, v.message)).collect(),
        }
    }

    fn one(path: &str, message: &str) -> Vec<(String, String)> {
        vec![(path.to_owned(), message.to_owned())]
    }

    fn compile_error(value: Value) -> String {
        match CompiledSchema::compile(&value).unwrap_err() {
            e @ SchemaError::Invalid { .. } => e.to_string(),
        }
    }

    #[test]
    fn compiled_schema_is_shareable() {
        fn assert_send_sync<T: Send + Sync>(_: &T) {}
        let shared = Arc::new(schema(json!({"type": "string"})));
        assert_send_sync(&shared);
    }

    #[test]
    fn type_keyword() {
        let s = schema(json!({"type": "integer"}));
        assert!(s.validate(&json!(3)).is_ok());
        assert!(s.validate(&json!(1.0)).is_ok(), "1.0 is an integer in JSON Schema");
        assert_eq!(errors(&s, json!(1.5)), one("", "expected integer, got number 1.5"));
        assert_eq!(errors(&s, json!("high")), one("", "expected integer, got string \"high\""));
        let s = schema(json!({"type": ["string", "null"]}));
        assert!(s.validate(&json!(null)).is_ok());
        assert_eq!(errors(&s, json!([1])).len(), 1);
        assert!(errors(&s, json!([1]))[0].1.ends_with("got array of 1 item"), "{:?}", errors(&s, json!([1])));
    }

    #[test]
    fn long_strings_are_shortened_in_messages() {
        for s in [schema(json!({"type": "integer"})), schema(json!({"pattern": "^a$"})), schema(json!({"enum": [1]}))] {
            let message = &errors(&s, json!("x".repeat(500)))[0].1;
            assert!(message.len() < 150 && message.contains("xxxx") && message.ends_with("..."), "{message}");
        }
    }

    #[test]
    fn properties_required_and_paths() {
        let s = schema(json!({
            "type": "object",
            "properties": {"bugs": {"type": "array", "items": {"type": "string"}}, "severity": {"type": "integer"}},
            "required": ["bugs", "severity"]
        }));
        assert!(s.validate(&json!({"bugs": ["a"], "severity": 2, "extra": true})).is_ok());
        assert_eq!(errors(&s, json!({"bugs": []})), one("", "missing required property 'severity'"));
        let mut found = errors(&s, json!({"bugs": ["a", "b", 3], "severity": "high"}));
        found.sort();
        assert_eq!(
            found,
            vec![
                ("/bugs/2".to_owned(), "expected string, got integer 3".to_owned()),
                ("/severity".to_owned(), "expected integer, got string \"high\"".to_owned()),
            ]
        );
        let s = schema(json!({"properties": {"a/b": {"type": "string"}}}));
        assert_eq!(errors(&s, json!({"a/b": 1}))[0].0, "/a~1b");
    }

    /// The keywords the hand-written validator skipped, each now enforced.
    #[test]
    fn every_keyword_is_enforced() {
        let s = schema(json!({"type": "string", "pattern": "^[0-9]+$"}));
        assert!(s.validate(&json!("123")).is_ok());
        assert_eq!(errors(&s, json!("12a")), one("", "expected a string matching '^[0-9]+$', got string \"12a\""));
        let s = schema(json!({"type": "string", "format": "email"}));
        assert!(s.validate(&json!("a@example.com")).is_ok());
        assert_eq!(
            errors(&s, json!("not an email")),
            one("", "expected a string in format 'email', got string \"not an email\"")
        );
        assert!(schema(json!({"format": "date-time"})).validate(&json!("yesterday")).is_err());
        assert!(schema(json!({"format": "no-such-format"})).validate(&json!("x")).is_ok());
        let s = schema(json!({"dependentSchemas": {"card": {"required": ["billing"]}}}));
        assert!(s.validate(&json!({"card": 1, "billing": 2})).is_ok());
        assert_eq!(errors(&s, json!({"card": 1})), one("", "missing required property 'billing'"));
        let s = schema(json!({"properties": {"a": {}}, "unevaluatedProperties": false}));
        assert_eq!(errors(&s, json!({"a": 1, "b": 2})), one("", "unexpected property 'b'"));
        let s = schema(json!({"prefixItems": [{"type": "integer"}], "unevaluatedItems": false}));
        assert!(s.validate(&json!([1])).is_ok());
        assert_eq!(errors(&s, json!([1, 2])).len(), 1);
        let s = schema(
            json!({"properties": {"a": {}}, "patternProperties": {"^x": {"type": "integer"}}, "additionalProperties": false}),
        );
        assert!(s.validate(&json!({"a": 1, "xa": 1})).is_ok());
        assert_eq!(errors(&s, json!({"xa": "1"})), one("/xa", "expected integer, got string \"1\""));
        assert_eq!(
            errors(&s, json!({"zz": 1})),
            one("", "unexpected property 'zz'; allowed: 'a', names matching '^x'")
        );
    }

    /// An unexpected property is named with the ones allowed in its place, also in a model reached
    /// through `$ref` (pydantic's nested models with `extra="forbid"`).
    #[test]
    fn unexpected_properties_list_the_allowed_ones() {
        let s = schema(json!({
            "type": "object",
            "properties": {"bug": {"$ref": "#/$defs/Bug"}, "severity": {"type": "integer"}},
            "additionalProperties": false,
            "$defs": {"Bug": {
                "type": "object",
                "properties": {"file": {"type": "string"}, "line": {"type": "integer"}},
                "additionalProperties": false
            }}
        }));
        assert_eq!(
            errors(&s, json!({"severity": 1, "sevrity": 2})),
            one("", "unexpected property 'sevrity'; allowed: 'bug', 'severity'")
        );
        assert_eq!(
            errors(&s, json!({"bug": {"file": "a.rs", "lines": 3}})),
            one("/bug", "unexpected property 'lines'; allowed: 'file', 'line'")
        );
        let s = schema(json!({"type": "object", "additionalProperties": false}));
        assert_eq!(errors(&s, json!({"a": 1})), one("", "unexpected property 'a'; no properties are allowed"));
        assert_eq!(
            errors(&s, json!({"a": 1, "b": 2})),
            one("", "unexpected properties 'a', 'b'; no properties are allowed")
        );
        let many: serde_json::Map<String, Value> = (0..30).map(|i| (format!("p{i}"), json!({}))).collect();
        let s = schema(json!({"properties": many, "additionalProperties": false}));
        assert_eq!(errors(&s, json!({"q": 1})), one("", "unexpected property 'q'"), "a long list is left out");
    }

    #[test]
    fn bounds_lengths_enum_const() {
        let s = schema(json!({"minimum": 0, "maximum": 10}));
        assert_eq!(errors(&s, json!(-1)), one("", "expected a number >= 0, got -1"));
        assert_eq!(errors(&s, json!(10.5)), one("", "expected a number <= 10, got 10.5"));
        let s = schema(json!({"minLength": 2, "maxLength": 3}));
        assert!(s.validate(&json!("日本語")).is_ok(), "3 characters, 9 bytes");
        assert_eq!(errors(&s, json!("a")), one("", "expected at least 2 characters, got 1"));
        let s = schema(json!({"minItems": 2}));
        assert_eq!(errors(&s, json!([1])), one("", "expected at least 2 items, got 1"));
        let s = schema(json!({"enum": ["low", "medium", "high"]}));
        assert_eq!(
            errors(&s, json!("urgent")),
            one("", "expected one of \"low\", \"medium\", \"high\", got string \"urgent\"")
        );
        assert_eq!(
            errors(&schema(json!({"const": "cat"})), json!("dog")),
            one("", "expected \"cat\", got string \"dog\"")
        );
        assert_eq!(errors(&schema(json!(false)), json!(1)), one("", "no value is allowed here"));
        let s = schema(json!({"uniqueItems": true}));
        assert_eq!(errors(&s, json!([1, 2, 1.0])), one("", "items 0 and 2 are equal; items must be unique"));
    }

    #[test]
    fn any_of_reports_the_alternative_that_fits() {
        let s = schema(json!({
            "anyOf": [
                {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
                {"type": "null"}
            ]
        }));
        assert!(s.validate(&json!(null)).is_ok());
        assert!(s.validate(&json!({"n": 1})).is_ok());
        assert_eq!(errors(&s, json!({"n": "1"})), one("/n", "expected integer, got string \"1\""));
        assert_eq!(errors(&s, json!(3)), one("", "expected object or null, got integer 3"));
        let s = schema(json!({"anyOf": [{"type": "integer", "minimum": 10}, {"type": "number", "maximum": 1}]}));
        assert_eq!(
            errors(&s, json!(5)),
            one(
                "",
                "matches none of the 2 allowed alternatives; alternative 1: expected a number >= 10, got 5; \
                 alternative 2: expected a number <= 1, got 5"
            )
        );
    }

    #[test]
    fn recursive_model_through_defs() {
        let s = schema(json!({
            "$defs": {
                "Node": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}
                    },
                    "required": ["name"]
                }
            },
            "$ref": "#/$defs/Node"
        }));
        assert!(s.validate(&json!({"name": "a", "children": [{"name": "b", "children": [{"name": "c"}]}]})).is_ok());
        assert_eq!(
            errors(&s, json!({"name": "a", "children": [{"name": "b", "children": [{"name": 3}]}]})),
            one("/children/0/children/0/name", "expected string, got integer 3")
        );
    }

    #[test]
    fn deep_instances_are_refused_without_overflowing() {
        let s = schema(
            json!({"$defs": {"L": {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/L"}}, {"type": "integer"}]}},
            "$ref": "#/$defs/L"}),
        );
        let nest = |depth: usize| (0..depth).fold(json!(1), |inner, _| json!([inner]));
        // A worker thread's stack, as tokio gives it.
        let handle = std::thread::Builder::new().stack_size(2 << 20).spawn(move || {
            let at_limit = s.validate(&nest(127)).is_ok();
            let too_deep = s.validate(&nest(1_000)).unwrap_err();
            (at_limit, too_deep)
        });
        let (at_limit, too_deep) = handle.unwrap().join().unwrap();
        assert!(at_limit);
        assert_eq!(
            too_deep,
            vec![Violation { path: String::new(), message: "the value is nested deeper than 128 levels".to_owned() }]
        );
    }

    #[test]
    fn describe_gives_one_line_per_violation() {
        let violations = vec![
            Violation { path: "/bugs/2".to_owned(), message: "expected string, got integer 3".to_owned() },
            Violation { path: String::new(), message: "missing required property 'severity'".to_owned() },
        ];
        assert_eq!(
            describe(&violations),
            "/bugs/2: expected string, got integer 3\n(root): missing required property 'severity'"
        );
    }

    #[test]
    fn invalid_schemas_are_errors_naming_the_pointer() {
        let message = compile_error(json!({"properties": {"id": {"type": "string", "pattern": "^[0-9+$"}}}));
        assert!(message.contains("/properties/id/pattern"), "{message}");
        let message = compile_error(json!({"properties": {"a": {"type": "float"}}}));
        assert!(message.contains("/properties/a/type"), "{message}");
        let message = compile_error(json!({"items": {"minItems": -1}}));
        assert!(message.contains("/items/minItems"), "{message}");
        compile_error(json!({"$ref": "#/$defs/Missing"}));
        compile_error(json!({"$ref": "https://example.com/schema.json"}));
        compile_error(json!(3));
    }
}
