//! A valid JSON instance from a JSON Schema, as pydantic emits them: `$ref` into `$defs` (or
//! `definitions`), `anyOf`/`oneOf` (optional fields are `anyOf: [X, {"type": "null"}]`), `allOf`,
//! `enum`/`const`, type lists, string `minLength`/`maxLength`/`format`, numeric bounds (inclusive and
//! exclusive) and `multipleOf`, arrays with `items`/`prefixItems`/`minItems`/`maxItems`/`uniqueItems`,
//! objects with `properties`/`required`/`additionalProperties`. `pattern` is not honoured.
//!
//! Everything drawn comes from one seeded stream, so the same schema and seed give the same instance
//! (the scripted agent relies on that to make tool calls of different agents coincide).

use serde_json::{Map, Number, Value};

use super::draw::Draw;

/// Below this nesting depth, recursive schemas stop growing: optional properties are left out,
/// arrays take their minimum length and `anyOf` prefers a `null` branch.
const MAX_DEPTH: usize = 6;

const WORDS: &[&str] = &[
    "alpha", "bravo", "cedar", "delta", "ember", "fjord", "grove", "harbor", "island", "juniper", "kepler", "lumen",
    "meadow", "nectar", "orbit", "prairie", "quartz", "river", "summit", "tundra", "umber", "valley", "willow",
    "xenon", "yonder", "zephyr",
];

/// A valid instance of `schema` (resolved against itself for `$ref`).
pub fn generate(schema: &Value, seed: u64) -> Value {
    Generator { root: schema, draw: Draw::new(seed) }.value(schema, 0)
}

/// An instance that fails validation against `schema`: a required property removed, or a value of
/// the wrong type. `None` if the schema accepts every value (for instance `{}`).
pub fn violate(schema: &Value, seed: u64) -> Option<Value> {
    let mut draw = Draw::new(seed);
    let valid = generate(schema, seed);
    let resolved = resolve(schema, schema, 0);
    if let (Value::Object(mut obj), Some(props)) = (valid.clone(), resolved.get("properties")) {
        let required: Vec<&str> = resolved
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let typed: Vec<(&String, Value)> = props
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, s)| wrong_type_for(resolve(schema, s, 0)).map(|w| (k, w)))
            .collect();
        let remove = !required.is_empty() && (typed.is_empty() || draw.chance(0.5));
        if remove {
            obj.remove(required[draw.below(required.len() as u64) as usize]);
            return Some(Value::Object(obj));
        }
        if !typed.is_empty() {
            let (key, wrong) = &typed[draw.below(typed.len() as u64) as usize];
            obj.insert((*key).clone(), wrong.clone());
            return Some(Value::Object(obj));
        }
    }
    wrong_type_for(resolved)
}

/// A value no schema of this shape accepts, when the schema pins down its types.
fn wrong_type_for(schema: &Value) -> Option<Value> {
    if schema.get("anyOf").is_some() || schema.get("oneOf").is_some() || schema.get("allOf").is_some() {
        return None;
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        let mut candidate = String::from("not-a-member");
        while values.iter().any(|v| v.as_str() == Some(candidate.as_str())) {
            candidate.push('!');
        }
        return Some(Value::String(candidate));
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ if schema.get("properties").is_some() => vec!["object"],
        _ => return None,
    };
    let candidates = [
        ("string", Value::String("wrong type".to_owned())),
        ("object", Value::Object(Map::new())),
        ("boolean", Value::Bool(true)),
        ("array", Value::Array(Vec::new())),
    ];
    candidates.into_iter().find(|(t, _)| !types.contains(t)).map(|(_, v)| v)
}

/// Follow `$ref`s (JSON pointers into the root document) until a schema without one.
fn resolve<'a>(root: &'a Value, schema: &'a Value, hops: usize) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) if hops < 32 => match reference.strip_prefix('#') {
            Some(pointer) => root.pointer(pointer).map_or(schema, |target| resolve(root, target, hops + 1)),
            None => schema,
        },
        _ => schema,
    }
}

struct Generator<'a> {
    root: &'a Value,
    draw: Draw,
}

impl Generator<'_> {
    fn value(&mut self, schema: &Value, depth: usize) -> Value {
        let schema = resolve(self.root, schema, 0);
        let Some(obj) = schema.as_object() else {
            // `true` accepts anything; `false` accepts nothing, and null is as good as anything then.
            return if schema == &Value::Bool(true) { self.string(&Map::new()) } else { Value::Null };
        };
        if let Some(c) = obj.get("const") {
            return c.clone();
        }
        if let Some(values) = obj.get("enum").and_then(Value::as_array).filter(|v| !v.is_empty()) {
            return values[self.draw.below(values.len() as u64) as usize].clone();
        }
        if let Some(branches) =
            obj.get("anyOf").or_else(|| obj.get("oneOf")).and_then(Value::as_array).filter(|b| !b.is_empty())
        {
            let null_branch = branches.iter().position(|b| b.get("type").and_then(Value::as_str) == Some("null"));
            let pick = match null_branch {
                Some(i) if depth >= MAX_DEPTH => i,
                _ => self.draw.below(branches.len() as u64) as usize,
            };
            return self.value(&branches[pick], depth + 1);
        }
        if let Some(parts) = obj.get("allOf").and_then(Value::as_array).filter(|p| !p.is_empty()) {
            return self.all_of(obj, parts, depth);
        }
        let ty = match obj.get("type") {
            Some(Value::String(t)) => t.as_str(),
            Some(Value::Array(ts)) => {
                let non_null: Vec<&str> = ts.iter().filter_map(Value::as_str).filter(|t| *t != "null").collect();
                non_null.get(self.draw.below(non_null.len() as u64) as usize).copied().unwrap_or("null")
            }
            _ if obj.contains_key("properties") || obj.contains_key("additionalProperties") => "object",
            _ if obj.contains_key("items") || obj.contains_key("prefixItems") => "array",
            _ => "string",
        };
        match ty {
            "object" => self.object(obj, depth),
            "array" => self.array(obj, depth),
            "integer" => self.integer(obj),
            "number" => self.number(obj),
            "boolean" => Value::Bool(self.draw.chance(0.5)),
            "null" => Value::Null,
            _ => self.string(obj),
        }
    }

    fn all_of(&mut self, obj: &Map<String, Value>, parts: &[Value], depth: usize) -> Value {
        let mut merged = Map::new();
        let mut other = None;
        for part in parts {
            match self.value(part, depth + 1) {
                Value::Object(m) => merged.extend(m),
                v => other = Some(v),
            }
        }
        if obj.contains_key("properties") {
            if let Value::Object(m) = self.object(obj, depth) {
                merged.extend(m);
            }
        }
        match other {
            Some(v) if merged.is_empty() => v,
            _ => Value::Object(merged),
        }
    }

    fn object(&mut self, obj: &Map<String, Value>, depth: usize) -> Value {
        let required: Vec<&str> = obj
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut out = Map::new();
        if let Some(props) = obj.get("properties").and_then(Value::as_object) {
            for (key, sub) in props {
                if depth < MAX_DEPTH || required.contains(&key.as_str()) {
                    out.insert(key.clone(), self.value(sub, depth + 1));
                }
            }
        }
        // A required name without a property schema still has to be present.
        for key in required {
            if !out.contains_key(key) {
                let sub = obj.get("additionalProperties").filter(|a| a.is_object()).cloned().unwrap_or(Value::Null);
                let v = if sub.is_null() { Value::String(self.word()) } else { self.value(&sub, depth + 1) };
                out.insert(key.to_owned(), v);
            }
        }
        // `dict[str, X]` in pydantic: no properties, additionalProperties = X.
        if out.is_empty() && depth < MAX_DEPTH {
            if let Some(extra) = obj.get("additionalProperties").filter(|a| a.is_object()) {
                let n = 1 + self.draw.below(2);
                for i in 0..n {
                    let key = format!("{}{}", self.word(), i);
                    out.insert(key, self.value(extra, depth + 1));
                }
            }
        }
        let min = obj.get("minProperties").and_then(Value::as_u64).unwrap_or(0) as usize;
        let extra_ok = obj.get("additionalProperties") != Some(&Value::Bool(false));
        let mut i = 0;
        while out.len() < min && extra_ok {
            out.insert(format!("extra{i}"), Value::String(self.word()));
            i += 1;
        }
        Value::Object(out)
    }

    fn array(&mut self, obj: &Map<String, Value>, depth: usize) -> Value {
        let prefix: &[Value] = obj.get("prefixItems").and_then(Value::as_array).map_or(&[], Vec::as_slice);
        let min = obj.get("minItems").and_then(Value::as_u64).unwrap_or(0) as usize;
        let max = obj.get("maxItems").and_then(Value::as_u64).map(|m| m as usize);
        let items = obj.get("items").filter(|i| i.as_bool() != Some(false));
        let len = if items.is_none() {
            prefix.len().max(min).min(max.unwrap_or(usize::MAX))
        } else if depth >= MAX_DEPTH {
            min.max(prefix.len())
        } else {
            let lo = min.max(prefix.len()).max(1);
            let hi = max.unwrap_or(lo + 2).max(lo).min(lo + 2);
            lo + self.draw.below((hi - lo + 1) as u64) as usize
        };
        let len = max.map_or(len, |m| len.min(m));
        let unique = obj.get("uniqueItems").and_then(Value::as_bool).unwrap_or(false);
        let mut out: Vec<Value> = Vec::with_capacity(len);
        let mut attempts = 0;
        while out.len() < len && attempts < len * 20 + 20 {
            attempts += 1;
            let i = out.len();
            let v = match prefix.get(i) {
                Some(s) => self.value(s, depth + 1),
                None => match items {
                    Some(s) => self.value(s, depth + 1),
                    None => Value::String(self.word()),
                },
            };
            if !unique || !out.contains(&v) {
                out.push(v);
            }
        }
        Value::Array(out)
    }

    fn integer(&mut self, obj: &Map<String, Value>) -> Value {
        let num = |k: &str| obj.get(k).and_then(Value::as_f64);
        let mut lo = num("minimum").map_or(i64::MIN, |m| m.ceil() as i64);
        let mut hi = num("maximum").map_or(i64::MAX, |m| m.floor() as i64);
        if let Some(x) = num("exclusiveMinimum") {
            lo = lo.max(x.floor() as i64 + 1);
        }
        if let Some(x) = num("exclusiveMaximum") {
            hi = hi.min(x.ceil() as i64 - 1);
        }
        // Unbounded sides get a small, human-looking range.
        match (lo == i64::MIN, hi == i64::MAX) {
            (true, true) => (lo, hi) = (0, 100),
            (true, false) => lo = hi.saturating_sub(100),
            (false, true) => hi = lo.saturating_add(100),
            (false, false) => {}
        }
        let step = obj.get("multipleOf").and_then(Value::as_i64).filter(|m| *m > 0).unwrap_or(1);
        let first = lo.div_euclid(step) + i64::from(lo.rem_euclid(step) != 0);
        let last = hi.div_euclid(step);
        if last < first {
            return Value::from(lo);
        }
        let span = (last - first) as u64 + 1;
        Value::from((first + i64::try_from(self.draw.below(span)).unwrap_or(0)) * step)
    }

    fn number(&mut self, obj: &Map<String, Value>) -> Value {
        let num = |k: &str| obj.get(k).and_then(Value::as_f64);
        let ex_lo = num("exclusiveMinimum");
        let ex_hi = num("exclusiveMaximum");
        let lo = num("minimum").or(ex_lo);
        let hi = num("maximum").or(ex_hi);
        let (lo, hi) = match (lo, hi) {
            (None, None) => (0.0, 100.0),
            (Some(l), None) => (l, l + 100.0),
            (None, Some(h)) => (h - 100.0, h),
            (Some(l), Some(h)) => (l, h),
        };
        if let Some(step) = num("multipleOf").filter(|m| *m > 0.0) {
            let mut first = (lo / step).ceil();
            let mut last = (hi / step).floor();
            if ex_lo.is_some_and(|x| first * step <= x) {
                first += 1.0;
            }
            if ex_hi.is_some_and(|x| last * step >= x) {
                last -= 1.0;
            }
            let k = first + self.draw.below((last - first).max(0.0) as u64 + 1) as f64;
            return Number::from_f64(k * step).map_or(Value::Null, Value::Number);
        }
        // Two decimals read like real data; fall back to the midpoint if rounding left the range.
        let mut x = ((lo + (hi - lo) * self.draw.unit()) * 100.0).round() / 100.0;
        let outside = x < lo || x > hi || ex_lo.is_some_and(|e| x <= e) || ex_hi.is_some_and(|e| x >= e);
        if outside {
            x = f64::midpoint(lo, hi);
        }
        Number::from_f64(x).map_or(Value::Null, Value::Number)
    }

    fn word(&mut self) -> String {
        WORDS[self.draw.below(WORDS.len() as u64) as usize].to_owned()
    }

    fn string(&mut self, obj: &Map<String, Value>) -> Value {
        let min = obj.get("minLength").and_then(Value::as_u64).unwrap_or(0) as usize;
        let max = obj.get("maxLength").and_then(Value::as_u64).map_or(usize::MAX, |m| m as usize);
        let n = self.draw.below(28) + 1;
        let formatted = match obj.get("format").and_then(Value::as_str) {
            Some("date-time") => Some(format!("2024-{:02}-{:02}T{:02}:{:02}:00Z", n % 12 + 1, n, n % 24, n * 2)),
            Some("date") => Some(format!("2024-{:02}-{n:02}", n % 12 + 1)),
            Some("time") => Some(format!("{:02}:{:02}:00", n % 24, n * 2)),
            Some("email") => Some(format!("{}@example.com", self.word())),
            Some("uri" | "url") => Some(format!("https://example.com/{}", self.word())),
            Some("uuid") => Some(format!("{:08x}-0000-4000-8000-{:012x}", self.draw.next_u64() as u32, n)),
            Some("ipv4") => Some(format!("10.0.0.{n}")),
            _ => None,
        };
        let mut s = formatted.unwrap_or_else(|| {
            let words = 1 + self.draw.below(3);
            (0..words).map(|_| self.word()).collect::<Vec<_>>().join(" ")
        });
        while s.chars().count() < min {
            s.push(' ');
            s.push_str(&self.word());
        }
        if s.chars().count() > max {
            s = s.chars().take(max).collect();
        }
        Value::String(s)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// A checker for the subset the generator claims to honour; enough to catch it lying.
    fn valid(root: &Value, schema: &Value, v: &Value) -> bool {
        let schema = resolve(root, schema, 0);
        let Some(s) = schema.as_object() else { return schema != &Value::Bool(false) };
        if let Some(c) = s.get("const") {
            return c == v;
        }
        if let Some(e) = s.get("enum").and_then(Value::as_array) {
            return e.contains(v);
        }
        if let Some(b) = s.get("anyOf").or_else(|| s.get("oneOf")).and_then(Value::as_array) {
            return b.iter().any(|b| valid(root, b, v));
        }
        if let Some(parts) = s.get("allOf").and_then(Value::as_array) {
            if !parts.iter().all(|p| valid(root, p, v)) {
                return false;
            }
        }
        let types: Vec<&str> = match s.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(t)) => t.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let ty_ok = types.is_empty()
            || types.iter().any(|t| match *t {
                "object" => v.is_object(),
                "array" => v.is_array(),
                "string" => v.is_string(),
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                "boolean" => v.is_boolean(),
                "null" => v.is_null(),
                _ => false,
            });
        if !ty_ok {
            return false;
        }
        let f = |k: &str| s.get(k).and_then(Value::as_f64);
        if let Some(x) = v.as_f64() {
            if f("minimum").is_some_and(|m| x < m)
                || f("maximum").is_some_and(|m| x > m)
                || f("exclusiveMinimum").is_some_and(|m| x <= m)
                || f("exclusiveMaximum").is_some_and(|m| x >= m)
                || f("multipleOf").is_some_and(|m| ((x / m).round() * m - x).abs() > 1e-9)
            {
                return false;
            }
        }
        if let Some(st) = v.as_str() {
            let n = st.chars().count() as f64;
            if f("minLength").is_some_and(|m| n < m) || f("maxLength").is_some_and(|m| n > m) {
                return false;
            }
        }
        if let Some(a) = v.as_array() {
            let n = a.len() as f64;
            if f("minItems").is_some_and(|m| n < m) || f("maxItems").is_some_and(|m| n > m) {
                return false;
            }
            let prefix = s.get("prefixItems").and_then(Value::as_array).cloned().unwrap_or_default();
            for (i, item) in a.iter().enumerate() {
                let sub = prefix.get(i).or(s.get("items"));
                if sub.is_some_and(|sub| !valid(root, sub, item)) {
                    return false;
                }
            }
        }
        if let Some(o) = v.as_object() {
            for r in s.get("required").and_then(Value::as_array).into_iter().flatten() {
                if !o.contains_key(r.as_str().unwrap()) {
                    return false;
                }
            }
            let props = s.get("properties").and_then(Value::as_object);
            for (k, item) in o {
                match props.and_then(|p| p.get(k)) {
                    Some(sub) => {
                        if !valid(root, sub, item) {
                            return false;
                        }
                    }
                    None => {
                        if let Some(extra) = s.get("additionalProperties") {
                            if !valid(root, extra, item) {
                                return false;
                            }
                        }
                    }
                }
            }
        }
        true
    }

    /// What pydantic v2 emits for a nested, recursive model with optional, enum, list, dict and
    /// constrained fields.
    fn pydantic_schema() -> Value {
        json!({
            "$defs": {
                "Color": {"enum": ["red", "green", "blue"], "title": "Color", "type": "string"},
                "Node": {
                    "properties": {
                        "name": {"title": "Name", "type": "string", "minLength": 3, "maxLength": 12},
                        "children": {"items": {"$ref": "#/$defs/Node"}, "title": "Children", "type": "array"},
                        "weight": {"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": 1}, {"type": "null"}], "default": null}
                    },
                    "required": ["name"], "title": "Node", "type": "object"
                }
            },
            "properties": {
                "id": {"title": "Id", "type": "integer", "minimum": 10, "maximum": 20},
                "even": {"type": "integer", "multipleOf": 2, "exclusiveMaximum": 7, "minimum": 1},
                "color": {"$ref": "#/$defs/Color"},
                "tags": {"items": {"type": "string"}, "maxItems": 2, "minItems": 1, "type": "array", "uniqueItems": true},
                "scores": {"additionalProperties": {"type": "integer"}, "type": "object"},
                "pair": {"maxItems": 2, "minItems": 2, "prefixItems": [{"type": "string"}, {"type": "boolean"}], "type": "array"},
                "root": {"$ref": "#/$defs/Node"},
                "kind": {"const": "fixed"},
                "when": {"type": "string", "format": "date-time"},
                "either": {"type": ["integer", "null"]}
            },
            "required": ["id", "even", "color", "tags", "root", "kind"],
            "title": "Record", "type": "object"
        })
    }

    #[test]
    fn pydantic_schema_instance_is_valid_and_complete() {
        let schema = pydantic_schema();
        for seed in 0..200 {
            let v = generate(&schema, seed);
            assert!(valid(&schema, &schema, &v), "seed {seed}: {v}");
            assert_eq!(v["kind"], "fixed");
            assert!(v["root"]["name"].is_string());
        }
    }

    #[test]
    fn same_seed_same_instance() {
        let schema = pydantic_schema();
        assert_eq!(generate(&schema, 9), generate(&schema, 9));
        let distinct: std::collections::HashSet<String> = (0..20).map(|s| generate(&schema, s).to_string()).collect();
        assert!(distinct.len() > 10);
    }

    #[test]
    fn violations_fail_validation() {
        let schema = pydantic_schema();
        for seed in 0..200 {
            let bad = violate(&schema, seed).unwrap();
            assert!(!valid(&schema, &schema, &bad), "seed {seed}: {bad}");
        }
        assert!(violate(&json!({}), 1).is_none());
        let bad = violate(&json!({"type": "integer"}), 1).unwrap();
        assert!(!bad.is_number());
    }

    #[test]
    fn recursion_terminates() {
        let schema = json!({"$ref": "#/$defs/T", "$defs": {"T": {"type": "object", "required": ["next"],
            "properties": {"next": {"anyOf": [{"$ref": "#/$defs/T"}, {"type": "null"}]}}}}});
        for seed in 0..50 {
            assert!(valid(&schema, &schema, &generate(&schema, seed)));
        }
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            (0i64..50, 0i64..50)
                .prop_map(|(a, b)| json!({"type": "integer", "minimum": a.min(b), "maximum": a.max(b)})),
            (0u64..5, 0u64..20).prop_map(|(a, b)| json!({"type": "string", "minLength": a, "maxLength": a + b})),
            (-5.0f64..5.0, 0.1f64..5.0)
                .prop_map(|(a, w)| json!({"type": "number", "exclusiveMinimum": a, "exclusiveMaximum": a + w})),
            Just(json!({"type": "boolean"})),
            Just(json!({"enum": ["x", 1, null]})),
            Just(json!({"type": "null"})),
        ]
    }

    fn schema_strategy() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 1..4).prop_map(|props| {
                    let mut p = Map::new();
                    for (i, s) in props.into_iter().enumerate() {
                        p.insert(format!("f{i}"), s);
                    }
                    let req: Vec<String> = p.keys().take(2).cloned().collect();
                    json!({"type": "object", "properties": p, "required": req})
                }),
                (inner.clone(), 0u64..3, 0u64..3)
                    .prop_map(|(s, a, b)| json!({"type": "array", "items": s, "minItems": a, "maxItems": a + b})),
                proptest::collection::vec(inner, 1..3).prop_map(|b| json!({"anyOf": b})),
            ]
        })
    }

    proptest! {
        #[test]
        fn generated_instances_validate(schema in schema_strategy(), seed in any::<u64>()) {
            let v = generate(&schema, seed);
            prop_assert!(valid(&schema, &schema, &v), "{}", v);
        }
    }
}
