//! JSON written as the chat templates write it: Hugging Face's `tojson` filter is Python's
//! `json.dumps(value, ensure_ascii=False, indent=indent)`, whose separators are `", "` and `": "`
//! (`","` before a newline with an indent), not `serde_json`'s compact ones. A prompt rendered here
//! has to be byte-identical with the server's rendering of the same chat for its prefix cache.

use std::io;

use serde::Serialize;
use serde_json::ser::{Formatter, PrettyFormatter, Serializer};

/// `json.dumps(value)`'s separators without an indent.
struct PythonCompact;

impl Formatter for PythonCompact {
    fn begin_array_value<W: ?Sized + io::Write>(&mut self, writer: &mut W, first: bool) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(&mut self, writer: &mut W, first: bool) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }
}

/// `json.dumps(value, ensure_ascii=False, indent=indent)` (`indent` spaces per level; `None` on
/// one line). Object keys come in the value's own order (sorted for a `serde_json::Value`). Fails
/// where the value does not serialize as JSON (a map with keys that are not strings).
pub fn dumps(value: &(impl Serialize + ?Sized), indent: Option<usize>) -> Result<String, serde_json::Error> {
    let mut out = Vec::with_capacity(128);
    match indent {
        None => value.serialize(&mut Serializer::with_formatter(&mut out, PythonCompact)),
        Some(n) => {
            let spaces = vec![b' '; n];
            value.serialize(&mut Serializer::with_formatter(&mut out, PrettyFormatter::with_indent(&spaces)))
        }
    }?;
    // serde_json writes UTF-8.
    Ok(String::from_utf8(out).unwrap_or_default())
}

/// JSON text as `json.dumps(json.loads(text))` writes it, keeping the key order of the text (a
/// `serde_json::Value` here sorts keys): a tool call's arguments as the model wrote them are
/// rendered back in the model's order, as the server's template does with the dict it parsed.
/// Hand-written because the crate's `Value` is built without `preserve_order` (the tool cache keys
/// on sorted JSON). Spacing outside strings is rewritten; strings and numbers are kept as written.
/// `None` when `text` is not JSON.
pub fn respace(text: &str) -> Option<String> {
    serde_json::from_str::<serde::de::IgnoredAny>(text).ok()?;
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    for c in text.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            ',' => out.push_str(", "),
            ':' => out.push_str(": "),
            c if c.is_ascii_whitespace() => {}
            c => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn python_separators_with_and_without_indent() {
        let v = json!({"b": [1, 2.5, "é\n"], "a": {}, "c": []});
        assert_eq!(dumps(&v, None).unwrap(), r#"{"a": {}, "b": [1, 2.5, "é\n"], "c": []}"#);
        assert_eq!(
            dumps(&json!({"a": [1], "b": {"c": null}}), Some(4)).unwrap(),
            "{\n    \"a\": [\n        1\n    ],\n    \"b\": {\n        \"c\": null\n    }\n}"
        );
    }

    #[test]
    fn respace_keeps_order_and_strings() {
        assert_eq!(respace(r#"{"z":1,"a":{"k":"x, y: z \" ,"}}"#).unwrap(), r#"{"z": 1, "a": {"k": "x, y: z \" ,"}}"#);
        assert_eq!(respace("{\n  \"q\" : [1 , 2]\n}").unwrap(), r#"{"q": [1, 2]}"#);
        assert_eq!(respace("{not json"), None);
    }
}
