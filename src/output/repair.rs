//! Repair of almost-JSON as models write it: a lenient one-pass parser that re-emits strict JSON.
//!
//! The parser works on bytes: every structural character is ASCII, and string contents are copied
//! byte for byte, so multi-byte UTF-8 sequences pass through intact.

use serde::de::IgnoredAny;

/// `serde_json` refuses documents nested deeper than 128 levels, so anything deeper cannot be repaired
/// into something it would parse; stopping here also bounds this parser's own recursion.
const MAX_DEPTH: usize = 128;

/// Repair common model mistakes: trailing commas, single-quoted strings and keys, unquoted keys,
/// Python literals (True/False/None), comments, unescaped newlines in strings, a truncated document
/// (close open strings, arrays and objects; drop a dangling key or a trailing comma/colon).
///
/// Returns strict JSON text that `serde_json` parses, or `None` when the text is not a JSON value
/// with such mistakes (prose, an unknown bare word, text after the value).
pub fn repair_json(text: &str) -> Option<String> {
    let mut repairer = Repairer { src: text.as_bytes(), pos: 0, out: Vec::with_capacity(text.len() + 8) };
    repairer.skip_trivia();
    match repairer.value(0)? {
        Parsed::Value => {}
        Parsed::Missing => return None,
    }
    repairer.trailing()?;
    let out = String::from_utf8(repairer.out).ok()?;
    serde_json::from_str::<IgnoredAny>(&out).ok()?;
    Some(out)
}

/// What parsing a value produced. `None` (in the surrounding `Option`) means the text cannot be
/// repaired; `Missing` means the text ended where a value was due, which a container turns into
/// dropping the dangling member.
enum Parsed {
    Value,
    Missing,
}

struct Repairer<'a> {
    src: &'a [u8],
    pos: usize,
    out: Vec<u8>,
}

const TRUE_WORDS: [&[u8]; 3] = [b"true", b"True", b"TRUE"];
const FALSE_WORDS: [&[u8]; 3] = [b"false", b"False", b"FALSE"];
const NULL_WORDS: [&[u8]; 4] = [b"null", b"None", b"NULL", b"Null"];

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$'
}

fn is_bare_key_byte(b: u8) -> bool {
    is_word_byte(b) || b == b'-' || b == b'.' || b >= 0x80
}

fn hex_value(b: u8) -> Option<u16> {
    char::from(b).to_digit(16).map(|d| d as u16)
}

/// Four hex digits of a `\u` escape.
enum Hex4 {
    Full(u16),
    /// The text ends before four digits, and every digit present is valid.
    Truncated,
    Invalid,
}

impl Repairer<'_> {
    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.src.len()
    }

    /// Whitespace and comments (`//`, `/* */`, and Python's `#`), which models put in JSON.
    fn skip_trivia(&mut self) {
        while let Some(b) = self.peek() {
            match b {
                b' ' | b'\t' | b'\n' | b'\r' | 0x0c => self.pos += 1,
                b'#' => self.skip_line(),
                b'/' => match self.src.get(self.pos + 1) {
                    Some(b'/') => self.skip_line(),
                    Some(b'*') => {
                        let body = self.pos + 2;
                        self.pos = self
                            .src
                            .get(body..)
                            .and_then(|rest| rest.windows(2).position(|w| w == b"*/"))
                            .map_or(self.src.len(), |end| body + end + 2);
                    }
                    _ => return,
                },
                _ => return,
            }
        }
    }

    fn skip_line(&mut self) {
        while let Some(b) = self.peek() {
            self.pos += 1;
            if b == b'\n' {
                return;
            }
        }
    }

    fn value(&mut self, depth: usize) -> Option<Parsed> {
        self.skip_trivia();
        let Some(b) = self.peek() else { return Some(Parsed::Missing) };
        match b {
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b'"' | b'\'' => {
                self.string(b);
                Some(Parsed::Value)
            }
            b'-' | b'+' | b'.' | b'0'..=b'9' => self.number(),
            b if is_word_byte(b) => self.word(),
            _ => None,
        }
    }

    fn object(&mut self, depth: usize) -> Option<Parsed> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.pos += 1;
        self.out.push(b'{');
        let mut first = true;
        loop {
            self.skip_trivia();
            let Some(b) = self.peek() else { break };
            match b {
                b'}' => {
                    self.pos += 1;
                    break;
                }
                // A closer of the wrong kind closes this object too; the parent consumes it.
                b']' => break,
                b',' => {
                    self.pos += 1;
                    continue;
                }
                _ => {}
            }
            let mark = self.out.len();
            if !first {
                self.out.push(b',');
            }
            match b {
                b'"' | b'\'' => {
                    if !self.string(b) {
                        self.out.truncate(mark);
                        break;
                    }
                }
                b if is_bare_key_byte(b) => self.bare_key(),
                _ => return None,
            }
            self.skip_trivia();
            match self.peek() {
                None => {
                    self.out.truncate(mark);
                    break;
                }
                Some(b':') => self.pos += 1,
                Some(_) => return None,
            }
            self.out.push(b':');
            match self.value(depth)? {
                Parsed::Value => first = false,
                Parsed::Missing => {
                    self.out.truncate(mark);
                    break;
                }
            }
        }
        self.out.push(b'}');
        Some(Parsed::Value)
    }

    fn array(&mut self, depth: usize) -> Option<Parsed> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.pos += 1;
        self.out.push(b'[');
        let mut first = true;
        loop {
            self.skip_trivia();
            let Some(b) = self.peek() else { break };
            match b {
                b']' => {
                    self.pos += 1;
                    break;
                }
                b'}' => break,
                b',' => {
                    self.pos += 1;
                    continue;
                }
                _ => {}
            }
            let mark = self.out.len();
            if !first {
                self.out.push(b',');
            }
            match self.value(depth)? {
                Parsed::Value => first = false,
                Parsed::Missing => {
                    self.out.truncate(mark);
                    break;
                }
            }
        }
        self.out.push(b']');
        Some(Parsed::Value)
    }

    /// Whether a quote at `self.pos` ends the string. Models leave quotes unescaped inside strings
    /// (`"he said "hi""`, `'it's'`); in valid JSON a closing quote is always followed by a
    /// separator, a closer or the end, so any other quote is taken literally. A quote followed by a
    /// line break and another string is a closing quote with a missing comma.
    fn quote_closes(&self) -> bool {
        let mut i = self.pos + 1;
        let mut newline = false;
        while let Some(&b) = self.src.get(i) {
            match b {
                b' ' | b'\t' | b'\r' => i += 1,
                b'\n' => {
                    newline = true;
                    i += 1;
                }
                b',' | b':' | b'}' | b']' | b'/' | b'#' => return true,
                b'"' | b'\'' => return newline,
                _ => return false,
            }
        }
        true
    }

    /// Emits a double-quoted string; returns whether the closing quote was present (`false`: the
    /// text ended inside the string, which is closed here).
    fn string(&mut self, quote: u8) -> bool {
        self.pos += 1;
        self.out.push(b'"');
        while let Some(b) = self.peek() {
            match b {
                b if b == quote => {
                    if self.quote_closes() {
                        self.pos += 1;
                        self.out.push(b'"');
                        return true;
                    }
                    self.pos += 1;
                    self.push_literal_quote(b);
                }
                b'"' => {
                    self.pos += 1;
                    self.out.extend_from_slice(b"\\\"");
                }
                b'\\' => self.escape(),
                b'\n' => self.control(b"\\n"),
                b'\r' => self.control(b"\\r"),
                b'\t' => self.control(b"\\t"),
                0x00..=0x1f => {
                    self.pos += 1;
                    self.out.extend_from_slice(format!("\\u{b:04x}").as_bytes());
                }
                _ => {
                    let start = self.pos;
                    while self.peek().is_some_and(|c| c != quote && c != b'"' && c != b'\\' && c >= 0x20) {
                        self.pos += 1;
                    }
                    self.out.extend_from_slice(&self.src[start..self.pos]);
                }
            }
        }
        self.out.push(b'"');
        false
    }

    fn push_literal_quote(&mut self, quote: u8) {
        if quote == b'"' {
            self.out.extend_from_slice(b"\\\"");
        } else {
            self.out.push(quote);
        }
    }

    fn control(&mut self, escaped: &[u8]) {
        self.pos += 1;
        self.out.extend_from_slice(escaped);
    }

    fn escape(&mut self) {
        let Some(next) = self.src.get(self.pos + 1).copied() else {
            // A backslash as the last byte of a truncated string: the escape is lost.
            self.pos += 1;
            return;
        };
        match next {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                self.out.extend_from_slice(&[b'\\', next]);
                self.pos += 2;
            }
            b'\'' => {
                self.out.push(b'\'');
                self.pos += 2;
            }
            b'u' => self.unicode_escape(),
            // `\d`, `\x` and the like (regexes, Windows paths): the backslash was meant literally.
            _ => {
                self.out.extend_from_slice(b"\\\\");
                self.pos += 1;
            }
        }
    }

    fn hex4(&self, at: usize) -> Hex4 {
        let mut code = 0u16;
        for i in 0..4 {
            match self.src.get(at + i) {
                None => return Hex4::Truncated,
                Some(&b) => match hex_value(b) {
                    Some(d) => code = (code << 4) | d,
                    None => return Hex4::Invalid,
                },
            }
        }
        Hex4::Full(code)
    }

    /// `\uXXXX` at `self.pos`. `serde_json` rejects lone surrogates, which a truncation between the
    /// halves of a pair produces; a pair cut short is dropped, a lone half becomes U+FFFD.
    fn unicode_escape(&mut self) {
        match self.hex4(self.pos + 2) {
            Hex4::Truncated => self.pos = self.src.len(),
            Hex4::Invalid => {
                self.out.extend_from_slice(b"\\\\");
                self.pos += 1;
            }
            Hex4::Full(code) if (0xD800..0xDC00).contains(&code) => {
                let low = self.pos + 6;
                let pair = match (self.src.get(low), self.src.get(low + 1)) {
                    (None, _) | (Some(b'\\'), None) => None,
                    (Some(b'\\'), Some(b'u')) => Some(self.hex4(low + 2)),
                    _ => Some(Hex4::Invalid),
                };
                match pair {
                    None | Some(Hex4::Truncated) => self.pos = self.src.len(),
                    Some(Hex4::Full(lo)) if (0xDC00..0xE000).contains(&lo) => {
                        self.out.extend_from_slice(&self.src[self.pos..low + 6]);
                        self.pos = low + 6;
                    }
                    Some(_) => {
                        self.out.extend_from_slice(b"\\ufffd");
                        self.pos = low;
                    }
                }
            }
            Hex4::Full(code) if (0xDC00..0xE000).contains(&code) => {
                self.out.extend_from_slice(b"\\ufffd");
                self.pos += 6;
            }
            Hex4::Full(_) => {
                self.out.extend_from_slice(&self.src[self.pos..self.pos + 6]);
                self.pos += 6;
            }
        }
    }

    fn bare_key(&mut self) {
        let start = self.pos;
        while self.peek().is_some_and(is_bare_key_byte) {
            self.pos += 1;
        }
        self.out.push(b'"');
        self.out.extend_from_slice(&self.src[start..self.pos]);
        self.out.push(b'"');
    }

    fn word(&mut self) -> Option<Parsed> {
        let start = self.pos;
        while self.peek().is_some_and(is_word_byte) {
            self.pos += 1;
        }
        let word = &self.src[start..self.pos];
        let truncated = self.at_end();
        let matches = |words: &[&[u8]]| words.iter().any(|w| *w == word || (truncated && w.starts_with(word)));
        let literal: &[u8] = if matches(&TRUE_WORDS) {
            b"true"
        } else if matches(&FALSE_WORDS) {
            b"false"
        } else if matches(&NULL_WORDS) {
            b"null"
        } else {
            return None;
        };
        self.out.extend_from_slice(literal);
        Some(Parsed::Value)
    }

    /// Numbers as models write them (`+1`, `.5`, `5.`, `007`) or as a truncation leaves them
    /// (`-`, `1.`, `1e+`): normalised to JSON's grammar, a cut-off fraction or exponent dropped.
    fn number(&mut self) -> Option<Parsed> {
        let start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E')) {
            self.pos += 1;
        }
        let token = &self.src[start..self.pos];
        let truncated = self.at_end();
        let mut i = 0;
        let negative = match token.first() {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let digits = |i: &mut usize| {
            let from = *i;
            while token.get(*i).is_some_and(u8::is_ascii_digit) {
                *i += 1;
            }
            &token[from..*i]
        };
        let int = digits(&mut i);
        let mut frac: &[u8] = &[];
        if token.get(i) == Some(&b'.') {
            i += 1;
            frac = digits(&mut i);
        }
        let mut exp_sign: &[u8] = &[];
        let mut exp: &[u8] = &[];
        if matches!(token.get(i), Some(b'e' | b'E')) {
            i += 1;
            if matches!(token.get(i), Some(b'+' | b'-')) {
                exp_sign = &token[i..=i];
                i += 1;
            }
            exp = digits(&mut i);
        }
        if i != token.len() {
            return None;
        }
        if int.is_empty() && frac.is_empty() {
            return if truncated { Some(Parsed::Missing) } else { None };
        }
        if negative {
            self.out.push(b'-');
        }
        let int = match int.iter().position(|&d| d != b'0') {
            Some(first) => &int[first..],
            None => b"0",
        };
        self.out.extend_from_slice(int);
        if !frac.is_empty() {
            self.out.push(b'.');
            self.out.extend_from_slice(frac);
        }
        if !exp.is_empty() {
            self.out.push(b'e');
            self.out.extend_from_slice(exp_sign);
            self.out.extend_from_slice(exp);
        }
        Some(Parsed::Value)
    }

    /// After the value only whitespace, comments and stray closers or separators may follow.
    fn trailing(&mut self) -> Option<()> {
        loop {
            self.skip_trivia();
            match self.peek() {
                None => return Some(()),
                Some(b'}' | b']' | b',' | b';') => self.pos += 1,
                Some(_) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::{json, Value};

    use super::repair_json;

    fn repaired(text: &str) -> Value {
        let out = repair_json(text).unwrap_or_else(|| panic!("no repair for {text:?}"));
        serde_json::from_str(&out).unwrap()
    }

    #[test]
    fn valid_json_is_unchanged() {
        let text = r#"{"a": [1, -2.5e-3, "x\"y\u00e9\n", true, false, null], "b": {}}"#;
        assert_eq!(repaired(text), serde_json::from_str::<Value>(text).unwrap());
    }

    #[test]
    fn trailing_commas() {
        assert_eq!(repaired(r#"{"a": [1, 2,], "b": 3,}"#), json!({"a": [1, 2], "b": 3}));
        assert_eq!(repaired("[,1,,2,]"), json!([1, 2]));
    }

    #[test]
    fn single_quotes() {
        assert_eq!(repaired("{'a': 'b', 'c': ['d']}"), json!({"a": "b", "c": ["d"]}));
        assert_eq!(repaired(r#"{'say': 'he said "hi"'}"#), json!({"say": "he said \"hi\""}));
        assert_eq!(repaired(r"{'a': 'it\'s'}"), json!({"a": "it's"}));
    }

    #[test]
    fn apostrophe_inside_single_quoted_string() {
        assert_eq!(repaired("{'note': 'it's fine', 'n': 1}"), json!({"note": "it's fine", "n": 1}));
    }

    #[test]
    fn unescaped_double_quote_inside_string() {
        assert_eq!(repaired(r#"{"a": "the "best" one", "b": 2}"#), json!({"a": "the \"best\" one", "b": 2}));
    }

    #[test]
    fn unquoted_keys() {
        assert_eq!(repaired("{a: 1, b_c: {d-e: 2}, $f: 3}"), json!({"a": 1, "b_c": {"d-e": 2}, "$f": 3}));
    }

    #[test]
    fn python_literals() {
        assert_eq!(repaired("{'a': True, 'b': False, 'c': None}"), json!({"a": true, "b": false, "c": null}));
    }

    #[test]
    fn comments() {
        let text = "{\n // the answer\n \"a\": 1, /* inline */ \"b\": 2 # python style\n}";
        assert_eq!(repaired(text), json!({"a": 1, "b": 2}));
    }

    #[test]
    fn unescaped_control_characters_in_strings() {
        assert_eq!(repaired("{\"a\": \"line 1\nline 2\tend\r\u{1}\"}"), json!({"a": "line 1\nline 2\tend\r\u{1}"}));
    }

    #[test]
    fn invalid_escapes_keep_the_backslash() {
        assert_eq!(
            repaired(r#"{"re": "\d+\.\w", "path": "C:\Users"}"#),
            json!({"re": "\\d+\\.\\w", "path": "C:\\Users"})
        );
        assert_eq!(repaired(r#"["\uzzzz"]"#), json!(["\\uzzzz"]));
    }

    #[test]
    fn lenient_numbers() {
        assert_eq!(repaired("[+1, .5, 5., 007, -0.25e+2]"), json!([1, 0.5, 5, 7, -25.0]));
        assert_eq!(repair_json("[1-2]"), None);
    }

    #[test]
    fn missing_closers() {
        assert_eq!(repaired(r#"{"a": [1, {"b": 2"#), json!({"a": [1, {"b": 2}]}));
        assert_eq!(repaired(r#"{"a": [1, 2}"#), json!({"a": [1, 2]}));
    }

    #[test]
    fn truncated_string_is_closed() {
        assert_eq!(repaired(r#"{"a": "hello wor"#), json!({"a": "hello wor"}));
        assert_eq!(repaired(r#"["x\"#), json!(["x"]));
        assert_eq!(repaired(r#"["x\u00"#), json!(["x"]));
    }

    #[test]
    fn truncated_surrogate_pair_is_dropped() {
        assert_eq!(repaired(r#"["a\ud83d"#), json!(["a"]));
        assert_eq!(repaired(r#"["a\ud83d\ude"#), json!(["a"]));
        assert_eq!(repaired(r#"["a\ud83d\ude00"#), json!(["a\u{1F600}"]));
        assert_eq!(repaired(r#"["a\ud83d b"]"#), json!(["a\u{FFFD} b"]));
        assert_eq!(repaired(r#"["\ude00"]"#), json!(["\u{FFFD}"]));
    }

    #[test]
    fn dangling_key_and_separators_are_dropped() {
        assert_eq!(repaired(r#"{"a": 1, "b"#), json!({"a": 1}));
        assert_eq!(repaired(r#"{"a": 1, "b""#), json!({"a": 1}));
        assert_eq!(repaired(r#"{"a": 1, "b":"#), json!({"a": 1}));
        assert_eq!(repaired(r#"{"a": 1,"#), json!({"a": 1}));
        assert_eq!(repaired(r#"{"a": 1, b"#), json!({"a": 1}));
        assert_eq!(repaired("[1, 2,"), json!([1, 2]));
    }

    #[test]
    fn truncated_literals_and_numbers() {
        assert_eq!(repaired(r#"{"a": tr"#), json!({"a": true}));
        assert_eq!(repaired("[Fa"), json!([false]));
        assert_eq!(repaired("[1, n"), json!([1, null]));
        assert_eq!(repaired(r#"{"a": 1."#), json!({"a": 1}));
        assert_eq!(repaired(r#"{"a": 2e-"#), json!({"a": 2}));
        assert_eq!(repaired(r#"{"a": -"#), json!({}));
    }

    #[test]
    fn missing_comma_between_lines() {
        assert_eq!(repaired("{\"a\": \"x\"\n \"b\": 1}"), json!({"a": "x", "b": 1}));
    }

    #[test]
    fn stray_closers_after_the_value() {
        assert_eq!(repaired(r#"{"a": 1}}]"#), json!({"a": 1}));
    }

    #[test]
    fn prose_and_unknown_words_are_not_repaired() {
        assert_eq!(repair_json(""), None);
        assert_eq!(repair_json("   "), None);
        assert_eq!(repair_json("hello world"), None);
        assert_eq!(repair_json(r#"{"a": maybe}"#), None);
        assert_eq!(repair_json(r#"{"a": 1} and more text"#), None);
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        assert_eq!(repair_json(&"[".repeat(100_000)), None);
        assert!(repair_json(&"[".repeat(100)).is_some());
    }

    #[test]
    fn non_ascii_passes_through() {
        assert_eq!(repaired("{名前: 'café ☕', \"k\": \"日本"), json!({"名前": "café ☕", "k": "日本"}));
    }
}
