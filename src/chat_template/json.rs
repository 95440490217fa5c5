//! JSON written as the chat templates write it: Hugging Face's `tojson` filter is Python's
//! `json.dumps(value, ensure_ascii=False, indent=indent)`, whose separators are `", "` and `": "`
//! (`","` before a newline with an indent), not `serde_json`'s compact ones. A prompt rendered here
//! has to be byte-identical with the server's rendering of the same chat for its prefix cache.

use std::fmt::Write as _;
use std::io;

use serde::Serialize;
use serde_json::ser::{Formatter, Serializer};

/// The arguments of `json.dumps` that chat templates pass to `tojson`.
#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    /// Spaces per level; `None` writes one line.
    pub indent: Option<usize>,
    /// `(item, key)` separators; Python's default is `(", ", ": ")` on one line, `(",", ": ")`
    /// with an indent.
    pub separators: Option<(String, String)>,
    /// Escape every non-ASCII character as `\uXXXX` (Hugging Face's `tojson` defaults to false).
    pub ensure_ascii: bool,
    pub sort_keys: bool,
}

/// Python's `json` encoder layout: separators and optional indentation (`serde_json`'s
/// `PrettyFormatter` has fixed separators, so its logic is repeated here with Python's).
struct Python<'a> {
    item: &'a str,
    key: &'a str,
    indent: Option<Vec<u8>>,
    level: usize,
    has_value: bool,
}

impl Python<'_> {
    fn newline<W: ?Sized + io::Write>(&self, writer: &mut W) -> io::Result<()> {
        if let Some(indent) = &self.indent {
            writer.write_all(b"\n")?;
            for _ in 0..self.level {
                writer.write_all(indent)?;
            }
        }
        Ok(())
    }

    fn open<W: ?Sized + io::Write>(&mut self, writer: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.level += 1;
        self.has_value = false;
        writer.write_all(bracket)
    }

    fn close<W: ?Sized + io::Write>(&mut self, writer: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.level -= 1;
        if self.has_value {
            self.newline(writer)?;
        }
        writer.write_all(bracket)
    }

    fn element<W: ?Sized + io::Write>(&mut self, writer: &mut W, first: bool) -> io::Result<()> {
        if !first {
            writer.write_all(self.item.as_bytes())?;
        }
        self.newline(writer)
    }
}

impl Formatter for Python<'_> {
    fn begin_array<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.open(writer, b"[")
    }

    fn end_array<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.close(writer, b"]")
    }

    fn begin_array_value<W: ?Sized + io::Write>(&mut self, writer: &mut W, first: bool) -> io::Result<()> {
        self.element(writer, first)
    }

    fn end_array_value<W: ?Sized + io::Write>(&mut self, _writer: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.open(writer, b"{")
    }

    fn end_object<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.close(writer, b"}")
    }

    fn begin_object_key<W: ?Sized + io::Write>(&mut self, writer: &mut W, first: bool) -> io::Result<()> {
        self.element(writer, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(self.key.as_bytes())
    }

    fn end_object_value<W: ?Sized + io::Write>(&mut self, _writer: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

/// `json.dumps(value, ensure_ascii=False, indent=indent)` (`indent` spaces per level; `None` on
/// one line). Object keys come in the value's own order (sorted for a `serde_json::Value`). Fails
/// where the value does not serialize as JSON (a map with keys that are not strings).
pub fn dumps(value: &(impl Serialize + ?Sized), indent: Option<usize>) -> Result<String, serde_json::Error> {
    dumps_with(value, &DumpOptions { indent, ..DumpOptions::default() })
}

/// `json.dumps` with the given options.
pub fn dumps_with(value: &(impl Serialize + ?Sized), options: &DumpOptions) -> Result<String, serde_json::Error> {
    if options.sort_keys {
        // A `serde_json::Value`'s maps are sorted.
        let sorted = serde_json::to_value(value)?;
        return dumps_with(&sorted, &DumpOptions { sort_keys: false, ..options.clone() });
    }
    let (item, key) = match (&options.separators, options.indent) {
        (Some((item, key)), _) => (item.as_str(), key.as_str()),
        (None, Some(_)) => (",", ": "),
        (None, None) => (", ", ": "),
    };
    let indent = options.indent.map(|n| vec![b' '; n]);
    let mut out = Vec::with_capacity(128);
    value.serialize(&mut Serializer::with_formatter(
        &mut out,
        Python { item, key, indent, level: 0, has_value: false },
    ))?;
    // serde_json writes UTF-8.
    let text = String::from_utf8(out).unwrap_or_default();
    if !options.ensure_ascii || text.is_ascii() {
        return Ok(text);
    }
    // Outside strings JSON is ASCII, so escaping every other character escapes the strings'.
    let mut escaped = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c.is_ascii() {
            escaped.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                // Writing into a String cannot fail.
                _ = write!(escaped, "\\u{unit:04x}");
            }
        }
    }
    Ok(escaped)
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
    fn python_options() {
        let v = json!({"b": "é😀", "a": [1, 2]});
        let opts =
            DumpOptions { separators: Some((",".into(), ":".into())), ensure_ascii: true, ..DumpOptions::default() };
        assert_eq!(dumps_with(&v, &opts).unwrap(), r#"{"a":[1,2],"b":"\u00e9\ud83d\ude00"}"#);
        let two = DumpOptions { indent: Some(2), ..DumpOptions::default() };
        assert_eq!(dumps_with(&json!([]), &two).unwrap(), "[]");
        assert_eq!(dumps_with(&json!({"a": {}}), &two).unwrap(), "{\n  \"a\": {}\n}");
    }

    #[test]
    fn respace_keeps_order_and_strings() {
        assert_eq!(respace(r#"{"z":1,"a":{"k":"x, y: z \" ,"}}"#).unwrap(), r#"{"z": 1, "a": {"k": "x, y: z \" ,"}}"#);
        assert_eq!(respace("{\n  \"q\" : [1 , 2]\n}").unwrap(), r#"{"q": [1, 2]}"#);
        assert_eq!(respace("{not json"), None);
    }
}
