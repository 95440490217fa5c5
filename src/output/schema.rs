//! JSON Schema validation, compiled once per batch and shared by every job.
//!
//! Covers what pydantic v2's `model_json_schema()` emits and the usual hand-written schemas: the
//! draft 2020-12 assertions and applicators (`type`, `enum`, `const`, numeric and length bounds,
//! `properties`, `required`, `additionalProperties`, `propertyNames`, `dependentRequired`,
//! `prefixItems`, `items`, `contains`, `uniqueItems`, `allOf`/`anyOf`/`oneOf`/`not`,
//! `if`/`then`/`else`, local `$ref`), plus the draft 4..7 forms of `items`/`additionalItems` and of
//! boolean `exclusiveMinimum`/`exclusiveMaximum`. Two keywords need regular expressions and are
//! left out rather than half done: `pattern` is checked by pydantic on the Python side, and where
//! `patternProperties` is present `additionalProperties` is not enforced (a property might match a
//! pattern). `format`, `title`, `description`, `default`, `examples` are annotations; other unknown
//! keywords (`dependentSchemas`, `unevaluatedProperties`, ...) are ignored, as the specification
//! says of keywords a validator does not know.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;

use serde_json::{Map, Number, Value};

use super::SchemaError;

type NodeId = usize;

const NULL: u8 = 1;
const BOOLEAN: u8 = 2;
const INTEGER: u8 = 4;
const NUMBER: u8 = 8;
const STRING: u8 = 16;
const ARRAY: u8 = 32;
const OBJECT: u8 = 64;

/// In the order a message lists them: `null` last reads naturally ("integer or null").
const TYPE_NAMES: [(u8, &str); 7] = [
    (STRING, "string"),
    (INTEGER, "integer"),
    (NUMBER, "number"),
    (BOOLEAN, "boolean"),
    (OBJECT, "object"),
    (ARRAY, "array"),
    (NULL, "null"),
];

/// Validation recurses along the instance; a value nested this deep is refused up front so that a
/// pathological one cannot overflow a worker thread's stack. `serde_json` parses no deeper than 128.
const MAX_DEPTH: usize = 128;

/// Longest string shown in full inside a message; a model needs to recognise its value, not reread it.
const SHOWN_STRING_CHARS: usize = 60;

#[derive(Debug, Clone)]
enum Node {
    Any,
    Never,
    Rules(Box<Rules>),
}

#[derive(Debug, Clone, Default)]
struct Rules {
    types: u8,
    reference: Option<NodeId>,
    /// Sorted by name, for binary search when looking for additional properties.
    properties: Vec<(String, NodeId)>,
    required: Vec<String>,
    additional_properties: Option<NodeId>,
    has_pattern_properties: bool,
    property_names: Option<NodeId>,
    dependent_required: Vec<(String, Vec<String>)>,
    min_properties: Option<u64>,
    max_properties: Option<u64>,
    prefix_items: Vec<NodeId>,
    /// Items after `prefix_items`.
    items: Option<NodeId>,
    min_items: Option<u64>,
    max_items: Option<u64>,
    unique_items: bool,
    contains: Option<NodeId>,
    min_contains: Option<u64>,
    max_contains: Option<u64>,
    min_length: Option<u64>,
    max_length: Option<u64>,
    minimum: Option<f64>,
    maximum: Option<f64>,
    exclusive_minimum: Option<f64>,
    exclusive_maximum: Option<f64>,
    multiple_of: Option<f64>,
    enumeration: Option<Vec<Value>>,
    constant: Option<Value>,
    all_of: Vec<NodeId>,
    any_of: Vec<NodeId>,
    one_of: Vec<NodeId>,
    not: Option<NodeId>,
    if_then_else: Option<(NodeId, Option<NodeId>, Option<NodeId>)>,
}

impl Rules {
    /// Subschemas applied to the same instance: a cycle through these never terminates.
    fn in_place(&self) -> impl Iterator<Item = NodeId> + '_ {
        let conditional = self.if_then_else.iter().flat_map(|&(i, t, e)| [Some(i), t, e]).flatten();
        self.reference
            .iter()
            .chain(&self.all_of)
            .chain(&self.any_of)
            .chain(&self.one_of)
            .chain(&self.not)
            .copied()
            .chain(conditional)
    }
}

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
    nodes: Vec<Node>,
    root: NodeId,
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
    /// Compile once, up front: an invalid schema is an error naming the JSON pointer of the bad part.
    pub fn compile(schema: &Value) -> Result<Self, SchemaError> {
        let mut compiler =
            Compiler { root: schema, nodes: Vec::new(), pointers: Vec::new(), by_pointer: HashMap::new() };
        let root = compiler.compile(schema, String::new())?;
        if let Some(node) = find_cycle(&compiler.nodes) {
            return Err(SchemaError::Cycle { pointer: compiler.pointers.swap_remove(node) });
        }
        Ok(Self { nodes: compiler.nodes, root })
    }

    /// All violations, each with the instance path (JSON pointer, e.g. /bugs/2) and a message a
    /// model can act on ("expected integer, got string \"high\"", "missing required property 'severity'").
    pub fn validate(&self, instance: &Value) -> Result<(), Vec<Violation>> {
        if exceeds_depth(instance, MAX_DEPTH) {
            return Err(vec![violation("", format!("the value is nested deeper than {MAX_DEPTH} levels"))]);
        }
        let mut violations = Vec::new();
        self.check(self.root, instance, &mut String::new(), &mut violations);
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations)
        }
    }

    fn check(&self, node: NodeId, instance: &Value, path: &mut String, out: &mut Vec<Violation>) {
        let rules = match &self.nodes[node] {
            Node::Any => return,
            Node::Never => {
                out.push(violation(path, "no value is allowed here".to_owned()));
                return;
            }
            Node::Rules(rules) => rules,
        };
        if rules.types != 0 && rules.types & type_bits(instance) == 0 {
            out.push(violation(path, format!("expected {}, got {}", type_list(rules.types), show(instance))));
            return;
        }
        if let Some(target) = rules.reference {
            self.check(target, instance, path, out);
        }
        if let Some(constant) = &rules.constant {
            if !json_eq(constant, instance) {
                out.push(violation(path, format!("expected {constant}, got {}", show(instance))));
            }
        }
        if let Some(allowed) = &rules.enumeration {
            if !allowed.iter().any(|value| json_eq(value, instance)) {
                out.push(violation(path, format!("expected {}, got {}", one_of_values(allowed), show(instance))));
            }
        }
        match instance {
            Value::Object(map) => self.check_object(rules, map, path, out),
            Value::Array(items) => self.check_array(rules, items, path, out),
            Value::String(text) => check_string(rules, text, path, out),
            Value::Number(number) => check_number(rules, number, path, out),
            Value::Null | Value::Bool(_) => {}
        }
        for &sub in &rules.all_of {
            self.check(sub, instance, path, out);
        }
        if !rules.any_of.is_empty() {
            self.check_any_of(&rules.any_of, instance, path, out);
        }
        if !rules.one_of.is_empty() {
            self.check_one_of(&rules.one_of, instance, path, out);
        }
        if let Some(not) = rules.not {
            if self.violations(not, instance, path).is_empty() {
                out.push(violation(path, "must not match the schema given in 'not'".to_owned()));
            }
        }
        if let Some((condition, then, otherwise)) = rules.if_then_else {
            let branch = if self.violations(condition, instance, path).is_empty() { then } else { otherwise };
            if let Some(branch) = branch {
                self.check(branch, instance, path, out);
            }
        }
    }

    fn violations(&self, node: NodeId, instance: &Value, path: &mut String) -> Vec<Violation> {
        let mut out = Vec::new();
        self.check(node, instance, path, &mut out);
        out
    }

    fn check_object(&self, rules: &Rules, map: &Map<String, Value>, path: &mut String, out: &mut Vec<Violation>) {
        for name in &rules.required {
            if !map.contains_key(name) {
                out.push(violation(path, format!("missing required property '{name}'")));
            }
        }
        for (name, sub) in &rules.properties {
            if let Some(value) = map.get(name) {
                let len = push_segment(path, name);
                self.check(*sub, value, path, out);
                path.truncate(len);
            }
        }
        if let Some(additional) = rules.additional_properties {
            if !rules.has_pattern_properties {
                for (key, value) in map {
                    if rules.properties.binary_search_by(|(name, _)| name.as_str().cmp(key)).is_ok() {
                        continue;
                    }
                    if matches!(self.nodes[additional], Node::Never) {
                        out.push(violation(path, unexpected_property(key, &rules.properties)));
                    } else {
                        let len = push_segment(path, key);
                        self.check(additional, value, path, out);
                        path.truncate(len);
                    }
                }
            }
        }
        if let Some(names) = rules.property_names {
            for key in map.keys() {
                let found = self.violations(names, &Value::String(key.clone()), path);
                if let Some(first) = found.first() {
                    out.push(violation(path, format!("property name '{key}' is not allowed: {}", first.message)));
                }
            }
        }
        for (name, needed) in &rules.dependent_required {
            if map.contains_key(name) {
                for other in needed.iter().filter(|other| !map.contains_key(*other)) {
                    out.push(violation(path, format!("missing property '{other}', required when '{name}' is present")));
                }
            }
        }
        let count = map.len() as u64;
        if let Some(min) = rules.min_properties.filter(|&min| count < min) {
            out.push(violation(path, format!("expected at least {min} {}, got {count}", plural(min, "property"))));
        }
        if let Some(max) = rules.max_properties.filter(|&max| count > max) {
            out.push(violation(path, format!("expected at most {max} {}, got {count}", plural(max, "property"))));
        }
    }

    fn check_array(&self, rules: &Rules, items: &[Value], path: &mut String, out: &mut Vec<Violation>) {
        for (i, item) in items.iter().enumerate() {
            if let Some(sub) = rules.prefix_items.get(i).copied().or(rules.items) {
                let len = path.len();
                let _ = write!(path, "/{i}");
                self.check(sub, item, path, out);
                path.truncate(len);
            }
        }
        let count = items.len() as u64;
        if let Some(min) = rules.min_items.filter(|&min| count < min) {
            out.push(violation(path, format!("expected at least {min} {}, got {count}", plural(min, "item"))));
        }
        if let Some(max) = rules.max_items.filter(|&max| count > max) {
            out.push(violation(path, format!("expected at most {max} {}, got {count}", plural(max, "item"))));
        }
        if let Some(contains) = rules.contains {
            let matching = items.iter().filter(|item| self.violations(contains, item, path).is_empty()).count() as u64;
            if let Some(min) = Some(rules.min_contains.unwrap_or(1)).filter(|&min| matching < min) {
                out.push(violation(
                    path,
                    format!("expected at least {min} {} matching 'contains', got {matching}", plural(min, "item")),
                ));
            }
            if let Some(max) = rules.max_contains.filter(|&max| matching > max) {
                out.push(violation(
                    path,
                    format!("expected at most {max} {} matching 'contains', got {matching}", plural(max, "item")),
                ));
            }
        }
        if rules.unique_items {
            let mut seen: HashMap<String, usize> = HashMap::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let mut key = String::new();
                canonical(item, &mut key);
                if let Some(first) = seen.insert(key, i) {
                    out.push(violation(path, format!("items {first} and {i} are equal; items must be unique")));
                    break;
                }
            }
        }
    }

    fn check_any_of(&self, branches: &[NodeId], instance: &Value, path: &mut String, out: &mut Vec<Violation>) {
        let mut failures = Vec::with_capacity(branches.len());
        for &branch in branches {
            let found = self.violations(branch, instance, path);
            if found.is_empty() {
                return;
            }
            failures.push(found);
        }
        self.no_alternative_matches(branches, failures, instance, path, out);
    }

    fn check_one_of(&self, branches: &[NodeId], instance: &Value, path: &mut String, out: &mut Vec<Violation>) {
        let mut failures = Vec::with_capacity(branches.len());
        let mut matched = Vec::new();
        for (i, &branch) in branches.iter().enumerate() {
            let found = self.violations(branch, instance, path);
            if found.is_empty() {
                matched.push((i + 1).to_string());
            } else {
                failures.push(found);
            }
        }
        match matched.len() {
            0 => self.no_alternative_matches(branches, failures, instance, path, out),
            1 => {}
            _ => out.push(violation(
                path,
                format!("matches alternatives {} of 'oneOf', but must match exactly one", matched.join(", ")),
            )),
        }
    }

    /// The most useful account of an `anyOf`/`oneOf` that nothing matched. `Optional[Model]` is
    /// `anyOf [Model, null]`: when exactly one alternative accepts the instance's type, its own
    /// violations say what to fix; when none does, the accepted types do.
    fn no_alternative_matches(
        &self,
        branches: &[NodeId],
        mut failures: Vec<Vec<Violation>>,
        instance: &Value,
        path: &str,
        out: &mut Vec<Violation>,
    ) {
        let fitting: Vec<usize> = (0..branches.len())
            .filter(|&i| self.admits_type(branches[i], instance) && !self.tag_differs(branches[i], instance))
            .collect();
        if let [only] = fitting[..] {
            out.append(&mut failures[only]);
            return;
        }
        if fitting.is_empty() {
            if let Some(types) = branches.iter().try_fold(0, |acc, &b| self.declared_types(b).map(|t| acc | t)) {
                out.push(violation(path, format!("expected {}, got {}", type_list(types), show(instance))));
                return;
            }
        }
        let shown: Vec<usize> = if fitting.is_empty() { (0..branches.len()).collect() } else { fitting };
        let mut message = format!("matches none of the {} allowed alternatives", branches.len());
        for i in shown {
            if let Some(first) = failures[i].first() {
                let at = if first.path == path { String::new() } else { format!("{}: ", first.path) };
                let _ = write!(message, "; alternative {}: {at}{}", i + 1, first.message);
            }
        }
        out.push(violation(path, message));
    }

    /// Whether the schema's `type` (following `$ref`) accepts the instance's type.
    fn admits_type(&self, node: NodeId, instance: &Value) -> bool {
        match &self.nodes[node] {
            Node::Any => true,
            Node::Never => false,
            Node::Rules(rules) => {
                (rules.types == 0 || rules.types & type_bits(instance) != 0)
                    && rules.reference.is_none_or(|target| self.admits_type(target, instance))
            }
        }
    }

    /// Whether the instance has a property whose value differs from the one the schema fixes with
    /// `const` (or a one-value `enum`): the tag of a tagged union, pydantic's `Literal` field. A
    /// branch with another tag is not the one the model meant, whatever else fails in it.
    fn tag_differs(&self, node: NodeId, instance: &Value) -> bool {
        let (Node::Rules(rules), Value::Object(map)) = (&self.nodes[node], instance) else { return false };
        rules.reference.is_some_and(|target| self.tag_differs(target, instance))
            || rules.properties.iter().any(|(name, sub)| {
                let tag = match &self.nodes[*sub] {
                    Node::Rules(tag) => tag.constant.as_ref().or(match tag.enumeration.as_deref() {
                        Some([only]) => Some(only),
                        _ => None,
                    }),
                    Node::Any | Node::Never => None,
                };
                tag.zip(map.get(name)).is_some_and(|(tag, value)| !json_eq(tag, value))
            })
    }

    /// The types a schema declares (following `$ref`); `None` when it accepts any type.
    fn declared_types(&self, node: NodeId) -> Option<u8> {
        match &self.nodes[node] {
            Node::Any => None,
            Node::Never => Some(0),
            Node::Rules(rules) => {
                let own = (rules.types != 0).then_some(rules.types);
                match (own, rules.reference.map(|target| self.declared_types(target))) {
                    (Some(types), None | Some(None)) | (None, Some(Some(types))) => Some(types),
                    (Some(own), Some(Some(target))) => Some(own & target),
                    (None, None | Some(None)) => None,
                }
            }
        }
    }
}

fn check_string(rules: &Rules, text: &str, path: &str, out: &mut Vec<Violation>) {
    if rules.min_length.is_none() && rules.max_length.is_none() {
        return;
    }
    let count = text.chars().count() as u64;
    if let Some(min) = rules.min_length.filter(|&min| count < min) {
        out.push(violation(path, format!("expected at least {min} {}, got {count}", plural(min, "character"))));
    }
    if let Some(max) = rules.max_length.filter(|&max| count > max) {
        out.push(violation(path, format!("expected at most {max} {}, got {count}", plural(max, "character"))));
    }
}

fn check_number(rules: &Rules, number: &Number, path: &str, out: &mut Vec<Violation>) {
    let Some(value) = number.as_f64() else { return };
    let mut fail = |bound: &str| out.push(violation(path, format!("expected a number {bound}, got {number}")));
    if let Some(min) = rules.minimum.filter(|&min| value < min) {
        fail(&format!(">= {min}"));
    }
    if let Some(min) = rules.exclusive_minimum.filter(|&min| value <= min) {
        fail(&format!("> {min}"));
    }
    if let Some(max) = rules.maximum.filter(|&max| value > max) {
        fail(&format!("<= {max}"));
    }
    if let Some(max) = rules.exclusive_maximum.filter(|&max| value >= max) {
        fail(&format!("< {max}"));
    }
    if let Some(divisor) = rules.multiple_of.filter(|&divisor| !is_multiple(number, value, divisor)) {
        fail(&format!("that is a multiple of {divisor}"));
    }
}

/// Exact for integers; for fractions a relative tolerance, since 0.3 / 0.1 is 2.9999999999999996.
fn is_multiple(number: &Number, value: f64, divisor: f64) -> bool {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if let Some(int) = number.as_i64() {
        if divisor.fract() == 0.0 && divisor.abs() < EXACT {
            return int % (divisor as i64) == 0;
        }
    }
    let quotient = value / divisor;
    quotient.is_finite() && (quotient - quotient.round()).abs() <= 1e-9 * quotient.abs().max(1.0)
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

fn violation(path: &str, message: String) -> Violation {
    Violation { path: path.to_owned(), message }
}

/// Appends `/key` (escaped per RFC 6901) and returns the length to truncate back to.
fn push_segment(path: &mut String, key: &str) -> usize {
    let len = path.len();
    path.push('/');
    path.push_str(&escape_pointer(key));
    len
}

fn escape_pointer(key: &str) -> Cow<'_, str> {
    if key.contains(['~', '/']) {
        Cow::Owned(key.replace('~', "~0").replace('/', "~1"))
    } else {
        Cow::Borrowed(key)
    }
}

fn plural(count: u64, noun: &str) -> String {
    match (count, noun) {
        (1, _) => noun.to_owned(),
        (_, "property") => "properties".to_owned(),
        _ => format!("{noun}s"),
    }
}

fn unexpected_property(key: &str, properties: &[(String, NodeId)]) -> String {
    const LISTED: usize = 20;
    let mut message = format!("unexpected property '{key}'");
    if properties.is_empty() {
        message.push_str("; no properties are allowed");
    } else if properties.len() <= LISTED {
        let names: Vec<&str> = properties.iter().map(|(name, _)| name.as_str()).collect();
        let _ = write!(message, "; allowed properties: {}", names.join(", "));
    }
    message
}

fn is_integral(number: &Number) -> bool {
    number.is_i64() || number.is_u64() || number.as_f64().is_some_and(|f| f.is_finite() && f.fract() == 0.0)
}

fn type_bits(value: &Value) -> u8 {
    match value {
        Value::Null => NULL,
        Value::Bool(_) => BOOLEAN,
        Value::Number(number) if is_integral(number) => NUMBER | INTEGER,
        Value::Number(_) => NUMBER,
        Value::String(_) => STRING,
        Value::Array(_) => ARRAY,
        Value::Object(_) => OBJECT,
    }
}

/// "integer", "integer or null", "string, integer or null". Any number is also accepted where
/// "number" is, so "integer" is not listed beside it.
fn type_list(types: u8) -> String {
    let types = if types & NUMBER != 0 { types & !INTEGER } else { types };
    let names: Vec<&str> = TYPE_NAMES.iter().filter(|(bit, _)| types & bit != 0).map(|(_, name)| *name).collect();
    match names.split_last() {
        None => "nothing".to_owned(),
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

fn one_of_values(allowed: &[Value]) -> String {
    const LISTED: usize = 12;
    match allowed {
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
        Value::Object(_) => "object".to_owned(),
    }
}

/// JSON Schema equality: numbers compare by value (1 == 1.0), objects regardless of key order.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => number_eq(x, y),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(key, value)| y.get(key).is_some_and(|other| json_eq(value, other)))
        }
        _ => a == b,
    }
}

fn number_eq(x: &Number, y: &Number) -> bool {
    if let (Some(x), Some(y)) = (x.as_i64(), y.as_i64()) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (x.as_u64(), y.as_u64()) {
        return x == y;
    }
    x.as_f64() == y.as_f64()
}

/// A text form under which `json_eq` values are equal strings, for `uniqueItems` in linear time.
fn canonical(value: &Value, out: &mut String) {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    match value {
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => {
                let _ = write!(out, "{i}");
            }
            (None, Some(u), _) => {
                let _ = write!(out, "{u}");
            }
            (None, None, Some(f)) if f.fract() == 0.0 && f.abs() < EXACT => {
                let _ = write!(out, "{}", f as i64);
            }
            _ => {
                let _ = write!(out, "{n}");
            }
        },
        Value::Array(items) => {
            out.push('[');
            for item in items {
                canonical(item, out);
                out.push(',');
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by_key(|(key, _)| *key);
            out.push('{');
            for (key, value) in entries {
                let _ = write!(out, "{}:", Value::from(key.as_str()));
                canonical(value, out);
                out.push(',');
            }
            out.push('}');
        }
        Value::Null | Value::Bool(_) | Value::String(_) => {
            let _ = write!(out, "{value}");
        }
    }
}

/// A node reached from itself through in-place applicators only (a `$ref` to itself, `allOf` of a
/// definition that refers back) would make validation loop forever.
fn find_cycle(nodes: &[Node]) -> Option<NodeId> {
    const NEW: u8 = 0;
    const ACTIVE: u8 = 1;
    const DONE: u8 = 2;
    let edges = |node: NodeId| -> Vec<NodeId> {
        match &nodes[node] {
            Node::Rules(rules) => rules.in_place().collect(),
            Node::Any | Node::Never => Vec::new(),
        }
    };
    let mut state = vec![NEW; nodes.len()];
    for start in 0..nodes.len() {
        if state[start] != NEW {
            continue;
        }
        state[start] = ACTIVE;
        let mut stack = vec![(edges(start), 0usize, start)];
        while let Some((children, next, node)) = stack.last_mut() {
            if let Some(&child) = children.get(*next) {
                *next += 1;
                match state[child] {
                    NEW => {
                        state[child] = ACTIVE;
                        stack.push((edges(child), 0, child));
                    }
                    ACTIVE => return Some(child),
                    _ => {}
                }
            } else {
                state[*node] = DONE;
                stack.pop();
            }
        }
    }
    None
}

struct Compiler<'a> {
    root: &'a Value,
    nodes: Vec<Node>,
    /// The schema pointer of each node, for errors found after compiling.
    pointers: Vec<String>,
    /// Every compiled subschema by pointer: `$ref`s to the same place share a node, and a recursive
    /// reference finds its target already reserved instead of compiling it again.
    by_pointer: HashMap<String, NodeId>,
}

fn invalid(pointer: String, expected: &str, found: &Value) -> SchemaError {
    SchemaError::InvalidKeyword { pointer, expected: format!("{expected}, got {}", show(found)) }
}

fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn count(value: &Value, pointer: String) -> Result<u64, SchemaError> {
    // `2.0` is a valid count: JSON Schema compares numbers by value.
    let whole = || value.as_f64().filter(|f| *f >= 0.0 && f.fract() == 0.0 && *f <= u64::MAX as f64).map(|f| f as u64);
    value.as_u64().or_else(whole).ok_or_else(|| invalid(pointer, "must be a non-negative integer", value))
}

fn number(value: &Value, pointer: String) -> Result<f64, SchemaError> {
    value.as_f64().ok_or_else(|| invalid(pointer, "must be a number", value))
}

fn percent_decode(text: &str) -> Option<String> {
    if !text.contains('%') {
        return Some(text.to_owned());
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl<'a> Compiler<'a> {
    fn compile(&mut self, schema: &'a Value, pointer: String) -> Result<NodeId, SchemaError> {
        if let Some(&id) = self.by_pointer.get(&pointer) {
            return Ok(id);
        }
        let id = self.nodes.len();
        self.nodes.push(Node::Any);
        self.pointers.push(pointer.clone());
        self.by_pointer.insert(pointer.clone(), id);
        self.nodes[id] = match schema {
            Value::Bool(true) => Node::Any,
            Value::Bool(false) => Node::Never,
            Value::Object(map) => Node::Rules(Box::new(self.rules(map, &pointer)?)),
            other => return Err(SchemaError::NotASchema { pointer, found: json_type_name(other) }),
        };
        Ok(id)
    }

    fn schema_list(&mut self, value: &'a Value, pointer: &str) -> Result<Vec<NodeId>, SchemaError> {
        match value {
            Value::Array(list) if !list.is_empty() => {
                list.iter().enumerate().map(|(i, sub)| self.compile(sub, format!("{pointer}/{i}"))).collect()
            }
            other => Err(invalid(pointer.to_owned(), "must be a non-empty array of schemas", other)),
        }
    }

    fn schema_map(&mut self, value: &'a Value, pointer: &str) -> Result<Vec<(String, NodeId)>, SchemaError> {
        let Value::Object(map) = value else {
            return Err(invalid(pointer.to_owned(), "must be an object of schemas", value));
        };
        map.iter()
            .map(|(name, sub)| Ok((name.clone(), self.compile(sub, format!("{pointer}/{}", escape_pointer(name)))?)))
            .collect()
    }

    fn reference(&mut self, reference: &str, pointer: &str) -> Result<NodeId, SchemaError> {
        let unsupported =
            || SchemaError::UnsupportedRef { pointer: pointer.to_owned(), reference: reference.to_owned() };
        let fragment = reference.strip_prefix('#').ok_or_else(unsupported)?;
        if !(fragment.is_empty() || fragment.starts_with('/')) {
            return Err(unsupported());
        }
        let target_pointer = percent_decode(fragment).ok_or_else(unsupported)?;
        if let Some(&id) = self.by_pointer.get(&target_pointer) {
            return Ok(id);
        }
        let root = self.root;
        let target = root.pointer(&target_pointer).ok_or_else(|| SchemaError::UnresolvedRef {
            pointer: pointer.to_owned(),
            reference: reference.to_owned(),
        })?;
        self.compile(target, target_pointer)
    }

    fn rules(&mut self, map: &'a Map<String, Value>, pointer: &str) -> Result<Rules, SchemaError> {
        let at = |keyword: &str| format!("{pointer}/{keyword}");
        let mut rules = Rules::default();
        for keyword in ["$defs", "definitions"] {
            if let Some(defs) = map.get(keyword) {
                self.schema_map(defs, &at(keyword))?;
            }
        }
        if let Some(value) = map.get("type") {
            rules.types = parse_types(value, &at("type"))?;
        }
        if let Some(value) = map.get("$ref") {
            let Value::String(reference) = value else { return Err(invalid(at("$ref"), "must be a string", value)) };
            rules.reference = Some(self.reference(reference, &at("$ref"))?);
        }
        self.object_rules(map, pointer, &mut rules)?;
        self.array_rules(map, pointer, &mut rules)?;
        for (keyword, slot) in [("minLength", &mut rules.min_length), ("maxLength", &mut rules.max_length)] {
            if let Some(value) = map.get(keyword) {
                *slot = Some(count(value, at(keyword))?);
            }
        }
        for keyword in ["pattern", "format"] {
            if let Some(value) = map.get(keyword).filter(|value| !value.is_string()) {
                return Err(invalid(at(keyword), "must be a string", value));
            }
        }
        number_rules(map, pointer, &mut rules)?;
        if let Some(value) = map.get("enum") {
            let Value::Array(allowed) = value else { return Err(invalid(at("enum"), "must be an array", value)) };
            rules.enumeration = Some(allowed.clone());
        }
        rules.constant = map.get("const").cloned();
        for (keyword, slot) in
            [("allOf", &mut rules.all_of), ("anyOf", &mut rules.any_of), ("oneOf", &mut rules.one_of)]
        {
            if let Some(value) = map.get(keyword) {
                *slot = self.schema_list(value, &at(keyword))?;
            }
        }
        if let Some(value) = map.get("not") {
            rules.not = Some(self.compile(value, at("not"))?);
        }
        let mut optional = |keyword: &str| map.get(keyword).map(|value| self.compile(value, at(keyword))).transpose();
        let (condition, then, otherwise) = (optional("if")?, optional("then")?, optional("else")?);
        rules.if_then_else = condition.map(|condition| (condition, then, otherwise));
        Ok(rules)
    }

    fn object_rules(
        &mut self,
        map: &'a Map<String, Value>,
        pointer: &str,
        rules: &mut Rules,
    ) -> Result<(), SchemaError> {
        let at = |keyword: &str| format!("{pointer}/{keyword}");
        if let Some(value) = map.get("properties") {
            rules.properties = self.schema_map(value, &at("properties"))?;
            rules.properties.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        }
        if let Some(value) = map.get("required") {
            let names = value.as_array().and_then(|list| list.iter().map(|v| v.as_str().map(str::to_owned)).collect());
            rules.required = names.ok_or_else(|| invalid(at("required"), "must be an array of strings", value))?;
        }
        if let Some(value) = map.get("additionalProperties") {
            rules.additional_properties = Some(self.compile(value, at("additionalProperties"))?);
        }
        if let Some(value) = map.get("propertyNames") {
            rules.property_names = Some(self.compile(value, at("propertyNames"))?);
        }
        if let Some(value) = map.get("dependentRequired") {
            let expected = "must be an object of arrays of property names";
            let Value::Object(dependencies) = value else {
                return Err(invalid(at("dependentRequired"), expected, value));
            };
            for (name, needed) in dependencies {
                let names =
                    needed.as_array().and_then(|list| list.iter().map(|v| v.as_str().map(str::to_owned)).collect());
                let pointer = format!("{}/{}", at("dependentRequired"), escape_pointer(name));
                rules.dependent_required.push((name.clone(), names.ok_or_else(|| invalid(pointer, expected, needed))?));
            }
        }
        if let Some(value) = map.get("patternProperties") {
            self.schema_map(value, &at("patternProperties"))?;
            rules.has_pattern_properties = true;
        }
        for (keyword, slot) in
            [("minProperties", &mut rules.min_properties), ("maxProperties", &mut rules.max_properties)]
        {
            if let Some(value) = map.get(keyword) {
                *slot = Some(count(value, at(keyword))?);
            }
        }
        Ok(())
    }

    fn array_rules(
        &mut self,
        map: &'a Map<String, Value>,
        pointer: &str,
        rules: &mut Rules,
    ) -> Result<(), SchemaError> {
        let at = |keyword: &str| format!("{pointer}/{keyword}");
        if let Some(value) = map.get("prefixItems") {
            rules.prefix_items = self.schema_list(value, &at("prefixItems"))?;
        }
        match map.get("items") {
            // Draft 4..7 tuple form: `items` is the prefix and `additionalItems` the rest.
            Some(value @ Value::Array(_)) if !map.contains_key("prefixItems") => {
                rules.prefix_items = self.schema_list(value, &at("items"))?;
                if let Some(rest) = map.get("additionalItems") {
                    rules.items = Some(self.compile(rest, at("additionalItems"))?);
                }
            }
            Some(value) => rules.items = Some(self.compile(value, at("items"))?),
            None => {}
        }
        if let Some(value) = map.get("contains") {
            rules.contains = Some(self.compile(value, at("contains"))?);
        }
        for (keyword, slot) in [
            ("minItems", &mut rules.min_items),
            ("maxItems", &mut rules.max_items),
            ("minContains", &mut rules.min_contains),
            ("maxContains", &mut rules.max_contains),
        ] {
            if let Some(value) = map.get(keyword) {
                *slot = Some(count(value, at(keyword))?);
            }
        }
        if let Some(value) = map.get("uniqueItems") {
            rules.unique_items =
                value.as_bool().ok_or_else(|| invalid(at("uniqueItems"), "must be a boolean", value))?;
        }
        Ok(())
    }
}

fn parse_types(value: &Value, pointer: &str) -> Result<u8, SchemaError> {
    let one = |name: &Value| -> Result<u8, SchemaError> {
        let Value::String(name) = name else {
            return Err(invalid(pointer.to_owned(), "must be a type name or an array of them", name));
        };
        TYPE_NAMES
            .iter()
            .find(|(_, known)| known == name)
            .map(|(bit, _)| *bit)
            .ok_or_else(|| SchemaError::UnknownType { pointer: pointer.to_owned(), name: name.clone() })
    };
    match value {
        Value::Array(names) => names.iter().try_fold(0, |types, name| Ok(types | one(name)?)),
        name => one(name),
    }
}

fn number_rules(map: &Map<String, Value>, pointer: &str, rules: &mut Rules) -> Result<(), SchemaError> {
    let at = |keyword: &str| format!("{pointer}/{keyword}");
    for (keyword, slot) in [("minimum", &mut rules.minimum), ("maximum", &mut rules.maximum)] {
        if let Some(value) = map.get(keyword) {
            *slot = Some(number(value, at(keyword))?);
        }
    }
    // Draft 4 spells exclusive bounds as a boolean modifying minimum/maximum.
    for (keyword, slot, inclusive) in [
        ("exclusiveMinimum", &mut rules.exclusive_minimum, &mut rules.minimum),
        ("exclusiveMaximum", &mut rules.exclusive_maximum, &mut rules.maximum),
    ] {
        match map.get(keyword) {
            Some(Value::Bool(true)) => *slot = inclusive.take(),
            Some(Value::Bool(false)) | None => {}
            Some(value) => *slot = Some(number(value, at(keyword))?),
        }
    }
    if let Some(value) = map.get("multipleOf") {
        let divisor = number(value, at("multipleOf"))?;
        if divisor <= 0.0 {
            return Err(invalid(at("multipleOf"), "must be a number greater than 0", value));
        }
        rules.multiple_of = Some(divisor);
    }
    Ok(())
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

    fn compile_error(value: Value) -> SchemaError {
        CompiledSchema::compile(&value).unwrap_err()
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
        assert!(s.validate(&json!(-3)).is_ok());
        assert!(s.validate(&json!(1.0)).is_ok(), "1.0 is an integer in JSON Schema");
        assert_eq!(errors(&s, json!(1.5)), one("", "expected integer, got number 1.5"));
        assert_eq!(errors(&s, json!("high")), one("", "expected integer, got string \"high\""));
        let s = schema(json!({"type": "number"}));
        assert!(s.validate(&json!(3)).is_ok());
        assert_eq!(errors(&s, json!(null)), one("", "expected number, got null"));
        let s = schema(json!({"type": ["string", "null"]}));
        assert!(s.validate(&json!(null)).is_ok());
        assert!(s.validate(&json!("x")).is_ok());
        assert_eq!(errors(&s, json!([1])), one("", "expected string or null, got array of 1 item"));
        let s = schema(json!({"type": ["boolean", "object", "array"]}));
        assert_eq!(errors(&s, json!(0)), one("", "expected boolean, object or array, got integer 0"));
    }

    #[test]
    fn long_strings_are_shortened_in_messages() {
        let s = schema(json!({"type": "integer"}));
        let message = &errors(&s, json!("x".repeat(500)))[0].1;
        assert!(message.len() < 100 && message.ends_with("...") && message.contains("xxxx"), "{message}");
    }

    #[test]
    fn properties_and_required() {
        let s = schema(json!({
            "type": "object",
            "properties": {"bugs": {"type": "array", "items": {"type": "string"}}, "severity": {"type": "integer"}},
            "required": ["bugs", "severity"]
        }));
        assert!(s.validate(&json!({"bugs": ["a"], "severity": 2, "extra": true})).is_ok());
        assert_eq!(errors(&s, json!({"bugs": []})), one("", "missing required property 'severity'"));
        assert_eq!(
            errors(&s, json!({"bugs": ["a", "b", 3], "severity": "high"})),
            vec![
                ("/bugs/2".to_owned(), "expected string, got integer 3".to_owned()),
                ("/severity".to_owned(), "expected integer, got string \"high\"".to_owned()),
            ]
        );
    }

    #[test]
    fn property_names_are_escaped_in_paths() {
        let s = schema(json!({"properties": {"a/b": {"type": "string"}, "c~d": {"type": "string"}}}));
        let found = errors(&s, json!({"a/b": 1, "c~d": 2}));
        assert_eq!(found.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), ["/a~1b", "/c~0d"]);
    }

    #[test]
    fn additional_properties() {
        let s = schema(json!({"properties": {"a": {}, "b": {}}, "additionalProperties": false}));
        assert!(s.validate(&json!({"a": 1})).is_ok());
        assert_eq!(errors(&s, json!({"a": 1, "zz": 2})), one("", "unexpected property 'zz'; allowed properties: a, b"));
        let s = schema(json!({"type": "object", "additionalProperties": {"type": "integer"}}));
        assert!(s.validate(&json!({"x": 1, "y": 2})).is_ok());
        assert_eq!(errors(&s, json!({"x": 1, "y": "2"})), one("/y", "expected integer, got string \"2\""));
        let s = schema(json!({"additionalProperties": true}));
        assert!(s.validate(&json!({"x": 1})).is_ok());
    }

    #[test]
    fn pattern_properties_lift_additional_properties() {
        let s = schema(json!({"patternProperties": {"^x": {}}, "additionalProperties": false}));
        assert!(s.validate(&json!({"xa": 1})).is_ok());
    }

    #[test]
    fn min_and_max_properties() {
        let s = schema(json!({"minProperties": 1, "maxProperties": 2}));
        assert_eq!(errors(&s, json!({})), one("", "expected at least 1 property, got 0"));
        assert_eq!(errors(&s, json!({"a": 1, "b": 2, "c": 3})), one("", "expected at most 2 properties, got 3"));
        assert!(s.validate(&json!({"a": 1})).is_ok());
    }

    #[test]
    fn items_and_prefix_items() {
        let s = schema(json!({"prefixItems": [{"type": "integer"}, {"type": "string"}], "items": {"type": "boolean"}}));
        assert!(s.validate(&json!([1, "a", true, false])).is_ok());
        assert!(s.validate(&json!([1])).is_ok());
        assert_eq!(
            errors(&s, json!(["a", "a", 1])),
            vec![
                ("/0".to_owned(), "expected integer, got string \"a\"".to_owned()),
                ("/2".to_owned(), "expected boolean, got integer 1".to_owned()),
            ]
        );
        let s = schema(json!({"prefixItems": [{"type": "integer"}], "items": false}));
        assert_eq!(errors(&s, json!([1, 2])), one("/1", "no value is allowed here"));
        let draft7 = schema(json!({"items": [{"type": "integer"}], "additionalItems": {"type": "string"}}));
        assert!(draft7.validate(&json!([1, "a"])).is_ok());
        assert_eq!(errors(&draft7, json!([1, 2])), one("/1", "expected string, got integer 2"));
    }

    #[test]
    fn min_max_items() {
        let s = schema(json!({"minItems": 2, "maxItems": 3}));
        assert_eq!(errors(&s, json!([1])), one("", "expected at least 2 items, got 1"));
        assert_eq!(errors(&s, json!([1, 2, 3, 4])), one("", "expected at most 3 items, got 4"));
        assert!(s.validate(&json!([1, 2])).is_ok());
    }

    #[test]
    fn unique_items_compares_as_json_schema_does() {
        let s = schema(json!({"uniqueItems": true}));
        assert!(s.validate(&json!([1, 2, "1", [1], {"a": 1}, {"a": 2}])).is_ok());
        assert_eq!(errors(&s, json!([1, 2, 1.0])), one("", "items 0 and 2 are equal; items must be unique"));
        assert_eq!(errors(&s, json!([{"a": 1, "b": [2]}, {"b": [2.0], "a": 1}])).len(), 1);
        assert!(schema(json!({"uniqueItems": false})).validate(&json!([1, 1])).is_ok());
    }

    #[test]
    fn contains() {
        let s = schema(json!({"contains": {"type": "integer"}}));
        assert!(s.validate(&json!(["a", 1])).is_ok());
        assert_eq!(errors(&s, json!(["a"])), one("", "expected at least 1 item matching 'contains', got 0"));
        let s = schema(json!({"contains": {"const": 1}, "minContains": 2, "maxContains": 3}));
        assert!(s.validate(&json!([1, 1, 2])).is_ok());
        assert_eq!(errors(&s, json!([1, 2])), one("", "expected at least 2 items matching 'contains', got 1"));
        assert_eq!(errors(&s, json!([1, 1, 1, 1])), one("", "expected at most 3 items matching 'contains', got 4"));
        assert!(schema(json!({"contains": false, "minContains": 0})).validate(&json!([1])).is_ok());
    }

    #[test]
    fn property_names_and_dependent_required() {
        let s = schema(json!({"propertyNames": {"maxLength": 7}, "dependentRequired": {"card": ["billing"]}}));
        assert!(s.validate(&json!({"name": 1})).is_ok());
        assert!(s.validate(&json!({"card": 1, "billing": 2})).is_ok());
        assert_eq!(
            errors(&s, json!({"card": 1})),
            one("", "missing property 'billing', required when 'card' is present")
        );
        assert_eq!(
            errors(&s, json!({"too_long": 1})),
            one("", "property name 'too_long' is not allowed: expected at most 7 characters, got 8")
        );
        assert!(matches!(compile_error(json!({"dependentRequired": {"a": "b"}})),
            SchemaError::InvalidKeyword { pointer, .. } if pointer == "/dependentRequired/a"));
    }

    #[test]
    fn enum_and_const() {
        let s = schema(json!({"enum": ["low", "medium", "high"]}));
        assert!(s.validate(&json!("low")).is_ok());
        assert_eq!(
            errors(&s, json!("urgent")),
            one("", "expected one of \"low\", \"medium\", \"high\", got string \"urgent\"")
        );
        let s = schema(json!({"enum": [1, [1, 2]]}));
        assert!(s.validate(&json!(1.0)).is_ok());
        assert!(s.validate(&json!([1.0, 2])).is_ok());
        assert_eq!(
            errors(&schema(json!({"enum": []})), json!(1)),
            one("", "expected nothing (the schema's 'enum' is empty), got integer 1")
        );
        assert!(schema(json!({"minItems": 2.0})).validate(&json!([1, 2])).is_ok());
        let s = schema(json!({"const": "cat"}));
        assert!(s.validate(&json!("cat")).is_ok());
        assert_eq!(errors(&s, json!("dog")), one("", "expected \"cat\", got string \"dog\""));
    }

    #[test]
    fn string_length_counts_characters() {
        let s = schema(json!({"minLength": 2, "maxLength": 3}));
        assert!(s.validate(&json!("日本語")).is_ok(), "3 characters, 9 bytes");
        assert_eq!(errors(&s, json!("a")), one("", "expected at least 2 characters, got 1"));
        assert_eq!(errors(&s, json!("abcd")), one("", "expected at most 3 characters, got 4"));
        assert!(s.validate(&json!(5)).is_ok(), "length applies to strings only");
    }

    #[test]
    fn pattern_and_format_are_not_checked_here() {
        let s = schema(json!({"type": "string", "pattern": "^[a-z]+$", "format": "email"}));
        assert!(s.validate(&json!("NOT AN EMAIL 123")).is_ok());
    }

    #[test]
    fn numeric_bounds() {
        let s = schema(json!({"minimum": 0, "maximum": 10}));
        assert!(s.validate(&json!(0)).is_ok());
        assert!(s.validate(&json!(10.0)).is_ok());
        assert_eq!(errors(&s, json!(-1)), one("", "expected a number >= 0, got -1"));
        assert_eq!(errors(&s, json!(10.5)), one("", "expected a number <= 10, got 10.5"));
        let s = schema(json!({"exclusiveMinimum": 0, "exclusiveMaximum": 1.5}));
        assert!(s.validate(&json!(1)).is_ok());
        assert_eq!(errors(&s, json!(0)), one("", "expected a number > 0, got 0"));
        assert_eq!(errors(&s, json!(1.5)), one("", "expected a number < 1.5, got 1.5"));
        let draft4 = schema(json!({"minimum": 0, "exclusiveMinimum": true, "maximum": 5, "exclusiveMaximum": false}));
        assert_eq!(errors(&draft4, json!(0)), one("", "expected a number > 0, got 0"));
        assert!(draft4.validate(&json!(5)).is_ok());
        assert!(s.validate(&json!("text")).is_ok(), "bounds apply to numbers only");
    }

    #[test]
    fn multiple_of() {
        let s = schema(json!({"multipleOf": 5}));
        assert!(s.validate(&json!(-15)).is_ok());
        assert!(s.validate(&json!(10.0)).is_ok());
        assert_eq!(errors(&s, json!(7)), one("", "expected a number that is a multiple of 5, got 7"));
        let s = schema(json!({"multipleOf": 0.1}));
        assert!(s.validate(&json!(0.3)).is_ok());
        assert!(s.validate(&json!(2)).is_ok());
        assert_eq!(errors(&s, json!(0.35)).len(), 1);
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
    }

    #[test]
    fn any_of_with_several_fitting_alternatives() {
        let s = schema(json!({"anyOf": [{"type": "integer", "minimum": 10}, {"type": "number", "maximum": 1}]}));
        assert!(s.validate(&json!(12)).is_ok());
        assert!(s.validate(&json!(0.5)).is_ok());
        let found = errors(&s, json!(5));
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0].1,
            "matches none of the 2 allowed alternatives; alternative 1: expected a number >= 10, got 5; \
             alternative 2: expected a number <= 1, got 5"
        );
    }

    #[test]
    fn one_of() {
        let s = schema(json!({"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 2}]}));
        assert!(s.validate(&json!(1)).is_ok());
        assert!(s.validate(&json!(2.5)).is_ok());
        assert_eq!(errors(&s, json!(3)), one("", "matches alternatives 1, 2 of 'oneOf', but must match exactly one"));
        assert_eq!(errors(&s, json!("x")), one("", "expected number, got string \"x\""));
    }

    #[test]
    fn all_of_and_not() {
        let s = schema(json!({"allOf": [{"minimum": 1}, {"maximum": 3}], "not": {"const": 2}}));
        assert!(s.validate(&json!(1)).is_ok());
        assert_eq!(errors(&s, json!(2)), one("", "must not match the schema given in 'not'"));
        assert_eq!(errors(&s, json!(4)), one("", "expected a number <= 3, got 4"));
    }

    #[test]
    fn if_then_else() {
        let s = schema(json!({
            "if": {"properties": {"kind": {"const": "file"}}},
            "then": {"required": ["path"]},
            "else": {"required": ["url"]}
        }));
        assert!(s.validate(&json!({"kind": "file", "path": "a"})).is_ok());
        assert!(s.validate(&json!({"kind": "web", "url": "a"})).is_ok());
        assert_eq!(errors(&s, json!({"kind": "file"})), one("", "missing required property 'path'"));
        assert_eq!(errors(&s, json!({"kind": "web"})), one("", "missing required property 'url'"));
    }

    #[test]
    fn boolean_schemas() {
        assert!(schema(json!(true)).validate(&json!({"anything": 1})).is_ok());
        assert_eq!(errors(&schema(json!(false)), json!(1)), one("", "no value is allowed here"));
    }

    #[test]
    fn unknown_keywords_and_annotations_are_ignored() {
        let s = schema(
            json!({"type": "string", "title": "T", "description": "d", "default": 3, "examples": [1], "x-custom": {}}),
        );
        assert!(s.validate(&json!("x")).is_ok());
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
    fn root_and_definitions_references() {
        let s = schema(json!({
            "type": "object",
            "properties": {"next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}, "v": {"$ref": "#/definitions/V"}},
            "definitions": {"V": {"type": "integer"}}
        }));
        assert!(s.validate(&json!({"v": 1, "next": {"v": 2, "next": null}})).is_ok());
        assert_eq!(errors(&s, json!({"next": {"v": "x"}})), one("/next/v", "expected integer, got string \"x\""));
    }

    #[test]
    fn percent_encoded_and_escaped_references() {
        let s = schema(json!({"$defs": {"a b": {"type": "integer"}, "c/d": {"type": "string"}},
            "properties": {"x": {"$ref": "#/$defs/a%20b"}, "y": {"$ref": "#/$defs/c~1d"}}}));
        assert_eq!(errors(&s, json!({"x": "1", "y": 1})).len(), 2);
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
        assert_eq!(describe(&[]), "");
    }

    #[test]
    fn invalid_schemas_name_the_pointer() {
        let err = compile_error(json!({"properties": {"a": {"required": "x"}}}));
        assert_eq!(
            err.to_string(),
            "schema keyword at '#/properties/a/required' must be an array of strings, got string \"x\""
        );
        assert!(matches!(compile_error(json!({"properties": {"a": 3}})),
            SchemaError::NotASchema { pointer, found: "number" } if pointer == "/properties/a"));
        assert!(matches!(compile_error(json!({"type": "float"})),
            SchemaError::UnknownType { pointer, name } if pointer == "/type" && name == "float"));
        assert!(matches!(compile_error(json!({"items": {"minItems": -1}})),
            SchemaError::InvalidKeyword { pointer, .. } if pointer == "/items/minItems"));
        assert!(
            matches!(compile_error(json!({"anyOf": []})), SchemaError::InvalidKeyword { pointer, .. } if pointer == "/anyOf")
        );
        assert!(matches!(compile_error(json!({"multipleOf": 0})), SchemaError::InvalidKeyword { .. }));
        assert!(matches!(compile_error(json!({"uniqueItems": "yes"})), SchemaError::InvalidKeyword { .. }));
        assert!(matches!(compile_error(json!({"pattern": 1})), SchemaError::InvalidKeyword { .. }));
        assert!(matches!(compile_error(json!({"enum": "a"})), SchemaError::InvalidKeyword { .. }));
        assert!(matches!(compile_error(json!({"$defs": {"A": {"type": 1}}})),
            SchemaError::InvalidKeyword { pointer, .. } if pointer == "/$defs/A/type"));
        assert!(matches!(compile_error(json!(3)), SchemaError::NotASchema { pointer, .. } if pointer.is_empty()));
    }

    #[test]
    fn bad_references_are_errors() {
        assert!(matches!(compile_error(json!({"$ref": "#/$defs/Missing"})),
            SchemaError::UnresolvedRef { pointer, reference } if pointer == "/$ref" && reference == "#/$defs/Missing"));
        assert!(matches!(compile_error(json!({"$ref": "other.json#/a"})), SchemaError::UnsupportedRef { .. }));
        assert!(matches!(compile_error(json!({"$ref": "#anchor"})), SchemaError::UnsupportedRef { .. }));
        assert!(matches!(compile_error(json!({"$ref": 5})), SchemaError::InvalidKeyword { .. }));
    }

    #[test]
    fn references_that_never_descend_are_rejected() {
        assert!(matches!(compile_error(json!({"$ref": "#"})), SchemaError::Cycle { .. }));
        let mutual = json!({"$defs": {"A": {"anyOf": [{"$ref": "#/$defs/B"}]}, "B": {"allOf": [{"$ref": "#/$defs/A"}]}},
            "$ref": "#/$defs/A"});
        assert!(matches!(compile_error(mutual), SchemaError::Cycle { .. }));
        assert!(matches!(compile_error(json!({"not": {"$ref": "#"}})), SchemaError::Cycle { .. }));
    }
}
