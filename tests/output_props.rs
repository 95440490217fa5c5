//! Structured output against generated JSON and against schemas as pydantic v2 emits them.
#![allow(clippy::unwrap_used, clippy::needless_pass_by_value)]

use std::fmt::Write as _;

use batchagent::output::{describe, extract_json, repair_json, CompiledSchema, Extracted};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// Floats with few significant digits: the default float parser of `serde_json` is exact for these, so a
/// round trip through text gives back the same `f64`.
fn float() -> impl Strategy<Value = f64> {
    (-(1i32 << 20)..(1i32 << 20), 0u32..6).prop_map(|(m, e)| f64::from(m) / f64::from(1u32 << e))
}

/// Strings heavy in the characters that matter to a JSON scanner, and arbitrary Unicode.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[\"'\\\\{}\\[\\]`\n\t ,:a-z]{0,12}",
        any::<String>(),
        Just("```".to_owned()),
        Just("it's \"quoted\" ```json\n{".to_owned()),
    ]
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        float().prop_map(Value::from),
        text().prop_map(Value::String),
    ]
}

fn container(inner: impl Strategy<Value = Value> + Clone) -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
        prop::collection::btree_map(text(), inner, 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
    ]
}

fn json_value() -> impl Strategy<Value = Value> + Clone {
    scalar().prop_recursive(4, 40, 5, container)
}

fn json_container() -> impl Strategy<Value = Value> {
    container(json_value())
}

fn json_object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(text(), json_value(), 0..5).prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// Prose a model might put around its answer, without brackets or fences.
fn prose() -> impl Strategy<Value = String> {
    "[A-Za-z0-9 ,.:!?'\n-]{0,40}"
}

fn clean(value: Value) -> Extracted {
    Extracted { value, repaired: false }
}

/// The value as a model imitating Python writes it: single quotes, `True`/`False`/`None`, a
/// trailing comma in every container.
fn python_literal(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => {
            out.push('\'');
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\'' => out.push_str("\\'"),
                    '\n' => out.push_str("\\n"),
                    c if u32::from(c) < 0x20 => {
                        let _ = write!(out, "\\u{:04x}", u32::from(c));
                    }
                    c => out.push(c),
                }
            }
            out.push('\'');
        }
        Value::Array(items) => {
            out.push('[');
            for item in items {
                python_literal(item, out);
                out.push_str(", ");
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (key, item) in map {
                python_literal(&Value::String(key.clone()), out);
                out.push_str(": ");
                python_literal(item, out);
                out.push_str(", ");
            }
            out.push('}');
        }
    }
}

fn char_boundaries(text: &str) -> impl Iterator<Item = usize> + '_ {
    (1..text.len()).filter(|&i| text.is_char_boundary(i))
}

proptest! {
    #[test]
    fn serialised_value_is_extracted_unchanged(v in json_value()) {
        prop_assert_eq!(extract_json(&serde_json::to_string(&v).unwrap()).unwrap(), clean(v.clone()));
        prop_assert_eq!(extract_json(&serde_json::to_string_pretty(&v).unwrap()).unwrap(), clean(v));
    }

    #[test]
    fn value_in_prose_is_extracted_unchanged(v in json_container(), before in prose(), after in prose(), pretty in any::<bool>()) {
        let json = if pretty { serde_json::to_string_pretty(&v) } else { serde_json::to_string(&v) }.unwrap();
        let text = format!("{before}{json}{after}");
        prop_assert_eq!(extract_json(&text).unwrap(), clean(v));
    }

    #[test]
    fn value_in_a_fence_is_extracted_unchanged(
        v in json_value(), before in prose(), after in prose(), tag in prop_oneof![Just("json"), Just("")],
    ) {
        let text = format!("{before}\n```{tag}\n{}\n```\n{after}", serde_json::to_string_pretty(&v).unwrap());
        prop_assert_eq!(extract_json(&text).unwrap(), clean(v));
    }

    #[test]
    fn repairing_valid_json_keeps_the_value(v in json_value()) {
        for text in [serde_json::to_string(&v).unwrap(), serde_json::to_string_pretty(&v).unwrap()] {
            let repaired = repair_json(&text).unwrap();
            prop_assert_eq!(serde_json::from_str::<Value>(&repaired).unwrap(), v.clone());
        }
    }

    #[test]
    fn python_literal_is_repaired_to_the_value(v in json_value()) {
        let mut text = String::new();
        python_literal(&v, &mut text);
        let repaired = repair_json(&text);
        prop_assert!(repaired.is_some(), "no repair for {text:?}");
        prop_assert_eq!(serde_json::from_str::<Value>(&repaired.unwrap()).unwrap(), v.clone());
        if v.is_object() || v.is_array() {
            let in_prose = extract_json(&format!("Here you go: {text} Anything else?")).unwrap();
            prop_assert_eq!(in_prose.value, v);
        }
    }

    #[test]
    fn repair_never_panics_and_its_output_parses(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let text = String::from_utf8_lossy(&bytes);
        if let Some(out) = repair_json(&text) {
            prop_assert!(serde_json::from_str::<Value>(&out).is_ok(), "{out:?}");
        }
        let _ = extract_json(&text);
    }

    #[test]
    fn repair_of_json_like_noise_never_panics(text in "[\\[\\]{}\"',:0-9a-zA-Z\\\\/*# \n.eE+-]{0,80}") {
        if let Some(out) = repair_json(&text) {
            prop_assert!(serde_json::from_str::<Value>(&out).is_ok(), "{out:?}");
        }
        let _ = extract_json(&text);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_truncation_of_an_object_repairs_to_json(v in json_object(), pretty in any::<bool>()) {
        let json = if pretty { serde_json::to_string_pretty(&v) } else { serde_json::to_string(&v) }.unwrap();
        for end in char_boundaries(&json) {
            let repaired = repair_json(&json[..end]);
            prop_assert!(repaired.is_some(), "no repair for {:?}", &json[..end]);
            let value: Value = serde_json::from_str(&repaired.unwrap()).unwrap();
            prop_assert!(value.is_object());
        }
    }

    #[test]
    fn every_truncation_of_a_python_literal_repairs_to_json(v in json_object()) {
        let mut text = String::new();
        python_literal(&v, &mut text);
        for end in char_boundaries(&text) {
            let repaired = repair_json(&text[..end]);
            prop_assert!(repaired.is_some(), "no repair for {:?}", &text[..end]);
        }
    }

    #[test]
    fn truncation_inside_a_string_value_closes_the_string(key in text(), s in text()) {
        let mut object = Map::new();
        object.insert(key.clone(), Value::String(s.clone()));
        let json = serde_json::to_string(&Value::Object(object)).unwrap();
        let opening_quote = serde_json::to_string(&key).unwrap().len() + 2;
        for end in char_boundaries(&json).filter(|&end| end > opening_quote) {
            let value: Value = serde_json::from_str(&repair_json(&json[..end]).unwrap()).unwrap();
            let kept = value[&key].as_str();
            prop_assert!(kept.is_some_and(|kept| s.starts_with(kept)), "{:?} -> {value}", &json[..end]);
        }
    }
}

/// `Review.model_json_schema()` for:
/// ```python
/// class Severity(str, Enum): low = "low"; medium = "medium"; high = "high"
/// class Location(BaseModel):
///     model_config = ConfigDict(extra="forbid")
///     file: str
///     line: int = Field(ge=1)
/// class Bug(BaseModel):
///     title: str = Field(min_length=3)
///     severity: Severity
///     kind: Literal["logic", "style"]
///     location: Optional[Location] = None
///     tags: list[str] = []
/// class Review(BaseModel):
///     bugs: list[Bug]
///     summary: str = Field(max_length=20)
///     score: float = Field(ge=0, le=10)
///     reviewer: Optional[str] = None
///     counts: dict[str, int] = {}
///     span: tuple[int, int] | None = None
///     labels: set[str] = set()
/// ```
fn review_schema() -> Value {
    json!({
        "$defs": {
            "Bug": {
                "properties": {
                    "title": {"minLength": 3, "title": "Title", "type": "string"},
                    "severity": {"$ref": "#/$defs/Severity"},
                    "kind": {"enum": ["logic", "style"], "title": "Kind", "type": "string"},
                    "location": {"anyOf": [{"$ref": "#/$defs/Location"}, {"type": "null"}], "default": null},
                    "tags": {"default": [], "items": {"type": "string"}, "title": "Tags", "type": "array"}
                },
                "required": ["title", "severity", "kind"],
                "title": "Bug",
                "type": "object"
            },
            "Location": {
                "additionalProperties": false,
                "properties": {
                    "file": {"title": "File", "type": "string"},
                    "line": {"minimum": 1, "title": "Line", "type": "integer"}
                },
                "required": ["file", "line"],
                "title": "Location",
                "type": "object"
            },
            "Severity": {"enum": ["low", "medium", "high"], "title": "Severity", "type": "string"}
        },
        "properties": {
            "bugs": {"items": {"$ref": "#/$defs/Bug"}, "title": "Bugs", "type": "array"},
            "summary": {"maxLength": 20, "title": "Summary", "type": "string"},
            "score": {"maximum": 10, "minimum": 0, "title": "Score", "type": "number"},
            "reviewer": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": null, "title": "Reviewer"},
            "counts": {"additionalProperties": {"type": "integer"}, "default": {}, "title": "Counts", "type": "object"},
            "span": {
                "anyOf": [
                    {"maxItems": 2, "minItems": 2, "prefixItems": [{"type": "integer"}, {"type": "integer"}], "type": "array"},
                    {"type": "null"}
                ],
                "default": null,
                "title": "Span"
            },
            "labels": {"default": [], "items": {"type": "string"}, "title": "Labels", "type": "array", "uniqueItems": true}
        },
        "required": ["bugs", "summary", "score"],
        "title": "Review",
        "type": "object"
    })
}

fn violations(schema: &CompiledSchema, instance: Value) -> Vec<(String, String)> {
    schema.validate(&instance).err().unwrap_or_default().into_iter().map(|v| (v.path, v.message)).collect()
}

#[test]
fn pydantic_review_accepts_valid_answers() {
    let schema = CompiledSchema::compile(&review_schema()).unwrap();
    let minimal = json!({"bugs": [], "summary": "fine", "score": 7});
    assert_eq!(violations(&schema, minimal), []);
    let full = json!({
        "bugs": [
            {"title": "off by one", "severity": "high", "kind": "logic",
             "location": {"file": "a.rs", "line": 3}, "tags": ["loop"]},
            {"title": "naming", "severity": "low", "kind": "style", "location": null}
        ],
        "summary": "two bugs",
        "score": 4.5,
        "reviewer": null,
        "counts": {"high": 1, "low": 1},
        "span": [1, 40],
        "labels": ["a", "b"]
    });
    assert_eq!(violations(&schema, full), []);
}

#[test]
fn pydantic_review_reports_each_mistake_where_it_is() {
    let schema = CompiledSchema::compile(&review_schema()).unwrap();
    let answer = json!({
        "bugs": [
            {"title": "ok title", "severity": "high", "kind": "logic"},
            {"title": "x", "severity": "urgent", "kind": "logic", "location": {"file": "a.rs", "line": 0, "col": 2}},
            {"title": "missing kind", "severity": "low", "tags": ["a", 3]}
        ],
        "summary": "this summary is far too long for the limit",
        "score": "8",
        "reviewer": 5,
        "counts": {"high": "one"},
        "span": [1, 2, 3],
        "labels": ["a", "a"]
    });
    let found = violations(&schema, answer);
    let expected = [
        ("/bugs/1/title", "expected at least 3 characters, got 1"),
        ("/bugs/1/severity", "expected one of \"low\", \"medium\", \"high\", got string \"urgent\""),
        ("/bugs/1/location", "unexpected property 'col'; allowed: 'file', 'line'"),
        ("/bugs/1/location/line", "expected a number >= 1, got 0"),
        ("/bugs/2", "missing required property 'kind'"),
        ("/bugs/2/tags/1", "expected string, got integer 3"),
        ("/counts/high", "expected integer, got string \"one\""),
        ("/labels", "items 0 and 1 are equal; items must be unique"),
        ("/reviewer", "expected string or null, got integer 5"),
        ("/score", "expected number, got string \"8\""),
        ("/span", "expected at most 2 items, got 3"),
        ("/summary", "expected at most 20 characters, got 42"),
    ];
    let mut found_sorted = found.clone();
    found_sorted.sort();
    let mut expected: Vec<(String, String)> =
        expected.iter().map(|(p, m)| ((*p).to_owned(), (*m).to_owned())).collect();
    expected.sort();
    assert_eq!(found_sorted, expected);
    let missing = violations(&schema, json!({"bugs": []}));
    assert_eq!(
        missing,
        [
            (String::new(), "missing required property 'summary'".to_owned()),
            (String::new(), "missing required property 'score'".to_owned())
        ]
    );
    let feedback = describe(&schema.validate(&json!({"bugs": [], "summary": 1, "score": 1})).unwrap_err());
    assert_eq!(feedback, "/summary: expected string, got integer 1");
}

/// `Tree.model_json_schema()` for a self-referencing model with a discriminated union:
/// ```python
/// class Leaf(BaseModel):
///     type: Literal["leaf"]
///     value: int
/// class Tree(BaseModel):
///     type: Literal["tree"]
///     children: list[Annotated[Union[Tree, Leaf], Field(discriminator="type")]]
/// ```
fn tree_schema() -> Value {
    json!({
        "$defs": {
            "Leaf": {
                "properties": {
                    "type": {"const": "leaf", "enum": ["leaf"], "title": "Type", "type": "string"},
                    "value": {"title": "Value", "type": "integer"}
                },
                "required": ["type", "value"],
                "title": "Leaf",
                "type": "object"
            },
            "Tree": {
                "properties": {
                    "type": {"const": "tree", "enum": ["tree"], "title": "Type", "type": "string"},
                    "children": {
                        "items": {
                            "discriminator": {"mapping": {"leaf": "#/$defs/Leaf", "tree": "#/$defs/Tree"}, "propertyName": "type"},
                            "oneOf": [{"$ref": "#/$defs/Tree"}, {"$ref": "#/$defs/Leaf"}]
                        },
                        "title": "Children",
                        "type": "array"
                    }
                },
                "required": ["type", "children"],
                "title": "Tree",
                "type": "object"
            }
        },
        "$ref": "#/$defs/Tree"
    })
}

#[test]
fn pydantic_recursive_discriminated_union() {
    let schema = CompiledSchema::compile(&tree_schema()).unwrap();
    let tree = json!({"type": "tree", "children": [
        {"type": "leaf", "value": 1},
        {"type": "tree", "children": [{"type": "leaf", "value": 2}, {"type": "tree", "children": []}]}
    ]});
    assert_eq!(violations(&schema, tree), []);
    let bad = json!({"type": "tree", "children": [{"type": "tree", "children": [{"type": "leaf", "value": "2"}]}]});
    let found = violations(&schema, bad);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found, [("/children/0/children/0/value".to_owned(), "expected integer, got string \"2\"".to_owned())]);
}

#[test]
fn schema_from_a_model_answer_end_to_end() {
    let schema = CompiledSchema::compile(&review_schema()).unwrap();
    let answer = "Here is my review:\n```json\n{\n  'bugs': [{'title': 'unchecked unwrap', 'severity': 'high', \
                  'kind': 'logic',}],\n  'summary': 'one bug', 'score': 3, 'reviewer': None,\n}\n```";
    let extracted = extract_json(answer).unwrap();
    assert!(extracted.repaired);
    assert_eq!(violations(&schema, extracted.value), []);
}
