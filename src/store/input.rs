//! Lazy input readers: JSONL, CSV (RFC 4180) and plain text, one record at a time through a
//! `BufReader`, so memory stays flat however large the file. Every record carries the line it
//! starts on, for error messages a person can act on, and its index among the file's records.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("input {path}: cannot open: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("input {path}: reading after line {line}: {source}")]
    Read { path: PathBuf, line: u64, source: std::io::Error },
    /// One record is malformed; the reader goes on with the next one. `index` is the index the
    /// record would have had, so it can be recorded as a failed job.
    #[error("input {path}, line {line}: {message}")]
    BadLine { path: PathBuf, line: u64, index: u64, message: String },
    #[error("input {path}: CSV header: {message}")]
    BadHeader { path: PathBuf, message: String },
    #[error("unknown input format {0:?} (expected auto, jsonl, csv or text)")]
    UnknownFormat(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InputFormat {
    /// By extension: `.jsonl`, `.ndjson`, `.json`, `.jsonlines` are JSONL; `.csv` is CSV; anything
    /// else is text.
    #[default]
    Auto,
    Jsonl,
    Csv,
    Text,
}

impl InputFormat {
    /// The concrete format for `path` (`Auto` resolved by extension, case-insensitively).
    #[must_use]
    pub fn resolve(self, path: &Path) -> InputFormat {
        if self != InputFormat::Auto {
            return self;
        }
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "ndjson" | "json" | "jsonlines" => InputFormat::Jsonl,
            "csv" => InputFormat::Csv,
            _ => InputFormat::Text,
        }
    }
}

impl FromStr for InputFormat {
    type Err = InputError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(InputFormat::Auto),
            "jsonl" | "ndjson" | "json" => Ok(InputFormat::Jsonl),
            "csv" => Ok(InputFormat::Csv),
            "text" | "txt" => Ok(InputFormat::Text),
            _ => Err(InputError::UnknownFormat(s.to_owned())),
        }
    }
}

/// One input record: `line` is the 1-based line it starts on, `index` its 0-based position among
/// the file's records (blank lines and the CSV header are not records; malformed ones are).
#[derive(Debug, Clone, PartialEq)]
pub struct InputRecord {
    pub line: u64,
    pub index: u64,
    pub fields: Map<String, Value>,
}

impl InputRecord {
    /// The record's `id` field as text: a string as is, a number in its JSON spelling.
    pub fn id(&self) -> Option<String> {
        match self.fields.get("id")? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

/// A CSV record as read: its first line, its raw fields, and what was wrong with it if anything.
type CsvRecord = (u64, Vec<Vec<u8>>, Option<String>);

enum Kind {
    Jsonl,
    Csv { header: Vec<String> },
    Text,
}

/// Streaming reader over an input file; an `Iterator` of records. A malformed record is an
/// [`InputError::BadLine`] item and reading goes on; an I/O error ends the iteration.
pub struct InputReader {
    path: PathBuf,
    reader: BufReader<File>,
    kind: Kind,
    /// Physical lines consumed so far.
    line: u64,
    index: u64,
    buf: Vec<u8>,
    done: bool,
}

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

impl InputReader {
    /// Opens `path`; for CSV the header row is read here (a bad header fails the open).
    pub fn open(path: &Path, format: InputFormat) -> Result<Self, InputError> {
        let file = File::open(path).map_err(|source| InputError::Open { path: path.to_path_buf(), source })?;
        let kind = match format.resolve(path) {
            InputFormat::Csv => Kind::Csv { header: Vec::new() },
            InputFormat::Text => Kind::Text,
            InputFormat::Jsonl | InputFormat::Auto => Kind::Jsonl,
        };
        let mut reader = InputReader {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(256 * 1024, file),
            kind,
            line: 0,
            index: 0,
            buf: Vec::with_capacity(4096),
            done: false,
        };
        if let Kind::Csv { .. } = reader.kind {
            let header = reader.read_header()?;
            reader.kind = Kind::Csv { header };
        }
        Ok(reader)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads one physical line (with its terminator) into `buf`; false at end of file.
    fn read_line(&mut self) -> Result<bool, InputError> {
        self.buf.clear();
        let n = self.reader.read_until(b'\n', &mut self.buf).map_err(|source| InputError::Read {
            path: self.path.clone(),
            line: self.line,
            source,
        })?;
        if n == 0 {
            return Ok(false);
        }
        self.line += 1;
        if self.line == 1 && self.buf.starts_with(UTF8_BOM) {
            self.buf.drain(..UTF8_BOM.len());
        }
        Ok(true)
    }

    fn bad_line(&self, line: u64, index: u64, message: String) -> InputError {
        InputError::BadLine { path: self.path.clone(), line, index, message }
    }

    fn read_header(&mut self) -> Result<Vec<String>, InputError> {
        let header_err = |path: &Path, message: String| InputError::BadHeader { path: path.to_path_buf(), message };
        let Some((line, fields, error)) = self.read_csv_record()? else { return Ok(Vec::new()) };
        if let Some(message) = error {
            return Err(header_err(&self.path, format!("line {line}: {message}")));
        }
        let mut names: Vec<String> = Vec::with_capacity(fields.len());
        for (i, raw) in fields.into_iter().enumerate() {
            let name = String::from_utf8(raw)
                .map_err(|_| header_err(&self.path, format!("column {} is not valid UTF-8", i + 1)))?;
            if names.contains(&name) {
                return Err(header_err(&self.path, format!("column name {name:?} appears twice")));
            }
            names.push(name);
        }
        Ok(names)
    }

    /// Reads one CSV record: its first line, its raw fields, and what was wrong with it if anything.
    /// Blank lines between records are skipped.
    fn read_csv_record(&mut self) -> Result<Option<CsvRecord>, InputError> {
        #[derive(PartialEq, Clone, Copy)]
        enum State {
            FieldStart,
            Unquoted,
            Quoted,
            /// A quote seen inside a quoted field: the closing one, or the first of a doubled pair.
            QuoteInQuoted,
        }
        loop {
            if !self.read_line()? {
                return Ok(None);
            }
            if !self.buf.iter().all(|&b| b == b'\n' || b == b'\r') {
                break;
            }
        }
        let first_line = self.line;
        let mut fields: Vec<Vec<u8>> = Vec::new();
        let mut field: Vec<u8> = Vec::new();
        let mut state = State::FieldStart;
        let mut error: Option<String> = None;
        loop {
            let line = std::mem::take(&mut self.buf);
            // Without its terminator (LF or CRLF); inside quotes the terminator is field content.
            let mut content_len = line.len();
            if line[..content_len].ends_with(b"\n") {
                content_len -= 1;
            }
            if line[..content_len].ends_with(b"\r") {
                content_len -= 1;
            }
            for (i, &b) in line.iter().enumerate() {
                let in_terminator = i >= content_len;
                state = match state {
                    State::Quoted if b == b'"' => State::QuoteInQuoted,
                    State::Quoted => {
                        field.push(b);
                        State::Quoted
                    }
                    _ if in_terminator => state,
                    State::FieldStart if b == b'"' => State::Quoted,
                    State::QuoteInQuoted if b == b'"' => {
                        field.push(b'"');
                        State::Quoted
                    }
                    State::FieldStart | State::Unquoted | State::QuoteInQuoted if b == b',' => {
                        fields.push(std::mem::take(&mut field));
                        State::FieldStart
                    }
                    State::QuoteInQuoted => {
                        if error.is_none() {
                            error = Some(format!(
                                "unexpected {:?} after the closing quote of field {}",
                                char::from(b),
                                fields.len() + 1
                            ));
                        }
                        field.push(b);
                        State::Unquoted
                    }
                    // A quote inside an unquoted field is kept literally, as most CSV writers and
                    // readers (Python's csv, Excel) do, rather than rejecting the row.
                    State::FieldStart | State::Unquoted => {
                        field.push(b);
                        State::Unquoted
                    }
                };
            }
            self.buf = line;
            if state != State::Quoted {
                break;
            }
            if !self.read_line()? {
                error = Some(format!("a quoted field opened on line {first_line} is never closed"));
                break;
            }
        }
        fields.push(field);
        Ok(Some((first_line, fields, error)))
    }

    fn next_jsonl(&mut self) -> Option<Result<InputRecord, InputError>> {
        loop {
            match self.read_line() {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => return Some(Err(e)),
            }
            if trim_ascii(&self.buf).is_empty() {
                continue;
            }
            let index = self.next_index();
            let record = match serde_json::from_slice::<Value>(trim_ascii(&self.buf)) {
                Ok(Value::Object(fields)) => Ok(InputRecord { line: self.line, index, fields }),
                Ok(other) => {
                    Err(self.bad_line(self.line, index, format!("expected a JSON object, found {}", json_kind(&other))))
                }
                Err(e) => Err(self.bad_line(self.line, index, json_error(&e))),
            };
            return Some(record);
        }
    }

    fn next_text(&mut self) -> Option<Result<InputRecord, InputError>> {
        loop {
            match self.read_line() {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => return Some(Err(e)),
            }
            if trim_ascii(&self.buf).is_empty() {
                continue;
            }
            let index = self.next_index();
            let mut end = self.buf.len();
            if self.buf[..end].ends_with(b"\n") {
                end -= 1;
            }
            if self.buf[..end].ends_with(b"\r") {
                end -= 1;
            }
            let record = match std::str::from_utf8(&self.buf[..end]) {
                Ok(prompt) => {
                    let mut fields = Map::with_capacity(1);
                    fields.insert("prompt".to_owned(), Value::String(prompt.to_owned()));
                    Ok(InputRecord { line: self.line, index, fields })
                }
                Err(e) => {
                    Err(self.bad_line(self.line, index, format!("not valid UTF-8 (byte {})", e.valid_up_to() + 1)))
                }
            };
            return Some(record);
        }
    }

    fn next_csv(&mut self) -> Option<Result<InputRecord, InputError>> {
        let (line, raw, error) = match self.read_csv_record() {
            Ok(Some(record)) => record,
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        };
        let index = self.next_index();
        if let Some(message) = error {
            return Some(Err(self.bad_line(line, index, message)));
        }
        let Kind::Csv { header } = &self.kind else { return None };
        if raw.len() != header.len() {
            let message = format!("the row has {} field(s), the header has {}", raw.len(), header.len());
            return Some(Err(self.bad_line(line, index, message)));
        }
        let mut fields = Map::with_capacity(header.len());
        for (i, (name, value)) in header.iter().zip(raw).enumerate() {
            let Ok(value) = String::from_utf8(value) else {
                let message = format!("field {} ({name:?}) is not valid UTF-8", i + 1);
                return Some(Err(self.bad_line(line, index, message)));
            };
            fields.insert(name.clone(), Value::String(value));
        }
        Some(Ok(InputRecord { line, index, fields }))
    }

    fn next_index(&mut self) -> u64 {
        let index = self.index;
        self.index += 1;
        index
    }
}

impl Iterator for InputReader {
    type Item = Result<InputRecord, InputError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = match self.kind {
            Kind::Jsonl => self.next_jsonl(),
            Kind::Csv { .. } => self.next_csv(),
            Kind::Text => self.next_text(),
        };
        match &item {
            None | Some(Err(InputError::Read { .. })) => self.done = true,
            _ => {}
        }
        item
    }
}

fn trim_ascii(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |p| p + 1);
    &bytes[start..end]
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `serde_json`'s message without its "at line 1 column N" (always line 1 here: the file's line is
/// reported instead), keeping the column.
#[cold]
fn json_error(e: &serde_json::Error) -> String {
    let mut message = e.to_string();
    if let Some(pos) = message.rfind(" at line ") {
        message.truncate(pos);
    }
    format!("invalid JSON at column {}: {message}", e.column())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn auto_format_by_extension() {
        let cases = [
            ("a.jsonl", InputFormat::Jsonl),
            ("a.NDJSON", InputFormat::Jsonl),
            ("a.json", InputFormat::Jsonl),
            ("a.csv", InputFormat::Csv),
            ("a.txt", InputFormat::Text),
            ("prompts", InputFormat::Text),
        ];
        for (name, expected) in cases {
            assert_eq!(InputFormat::Auto.resolve(Path::new(name)), expected, "{name}");
        }
        assert_eq!(InputFormat::Csv.resolve(Path::new("a.jsonl")), InputFormat::Csv);
        assert_eq!("TEXT".parse::<InputFormat>().unwrap(), InputFormat::Text);
        assert!("parquet".parse::<InputFormat>().is_err());
    }

    #[test]
    fn json_error_names_the_column() {
        let e = serde_json::from_str::<Value>("{\"a\": }").unwrap_err();
        let message = json_error(&e);
        assert!(message.starts_with("invalid JSON at column 7"), "{message}");
        assert!(!message.contains("line"), "{message}");
    }
}
