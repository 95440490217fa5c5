//! Lazy input readers: JSONL, CSV (RFC 4180, parsed by `csv-core`, the `csv` crate's parser) and
//! plain text, one record at a time through a `BufReader`, so memory stays flat however large the
//! file. Every record carries the line it
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

enum Kind {
    Jsonl,
    /// Quoted fields (with commas, doubled quotes, line breaks), CRLF and a leading UTF-8 BOM as
    /// `csv-core` reads them. A quote inside an unquoted field is kept literally, as Python's
    /// `csv` and Excel do, and so is text after a closing quote. Physical lines are fed to the
    /// parser one at a time, so each record knows the line it starts on.
    Csv(Box<CsvKind>),
    Text,
}

struct CsvKind {
    parser: csv_core::Reader,
    header: Vec<String>,
    /// The current record's fields, back to back, and where each ends (the first `count` of
    /// `ends`); both grow to the largest record seen.
    fields: Vec<u8>,
    ends: Vec<usize>,
    count: usize,
    /// Bytes of `InputReader::buf` the parser has consumed.
    consumed: usize,
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
            InputFormat::Csv => Kind::Csv(Box::new(CsvKind {
                parser: csv_core::Reader::new(),
                header: Vec::new(),
                fields: vec![0; 4096],
                ends: vec![0; 64],
                count: 0,
                consumed: 0,
            })),
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
        if let Kind::Csv(_) = reader.kind {
            let header = reader.read_header()?;
            if let Kind::Csv(csv) = &mut reader.kind {
                csv.header = header;
            }
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

    fn read_header(&mut self) -> Result<Vec<String>, InputError> {
        let header_err = |path: &Path, message: String| InputError::BadHeader { path: path.to_path_buf(), message };
        let Some((line, unclosed)) = self.read_csv_record()? else { return Ok(Vec::new()) };
        if unclosed {
            return Err(header_err(&self.path, format!("line {line}: {}", never_closed(line))));
        }
        let Kind::Csv(csv) = &self.kind else { return Ok(Vec::new()) };
        let mut names: Vec<String> = Vec::with_capacity(csv.count);
        for (i, raw) in csv_fields(csv).enumerate() {
            let name = std::str::from_utf8(raw)
                .map_err(|_| header_err(&self.path, format!("column {} is not valid UTF-8", i + 1)))?;
            if names.iter().any(|seen| seen == name) {
                return Err(header_err(&self.path, format!("column name {name:?} appears twice")));
            }
            names.push(name.to_owned());
        }
        Ok(names)
    }

    /// Parses the next CSV record into the parser's buffers: the line it starts on, and whether it
    /// ran to the end of the file inside a quoted field. Blank lines between records are skipped.
    fn read_csv_record(&mut self) -> Result<Option<(u64, bool)>, InputError> {
        use csv_core::ReadRecordResult;
        // What is left of the current line once a record ended: nothing, the LF of a CRLF, or
        // (after a lone CR, which also ends a record) the start of the next record.
        loop {
            let Kind::Csv(csv) = &self.kind else { return Ok(None) };
            let rest = self.buf.get(csv.consumed..).unwrap_or_default();
            if !rest.iter().all(|&b| b == b'\r' || b == b'\n') {
                break;
            }
            if !self.read_line()? {
                return Ok(None);
            }
            if let Kind::Csv(csv) = &mut self.kind {
                csv.consumed = 0;
            }
        }
        let first_line = self.line;
        let (mut nfields, mut nends) = (0, 0);
        let mut at_eof = false;
        // Whether the last line fed ended in LF: a record still open after it is open inside quotes.
        let mut fed_lf = false;
        loop {
            let Kind::Csv(csv) = &mut self.kind else { return Ok(None) };
            let input = if at_eof { &[][..] } else { self.buf.get(csv.consumed..).unwrap_or_default() };
            let (result, nin, nout, nend) =
                csv.parser.read_record(input, &mut csv.fields[nfields..], &mut csv.ends[nends..]);
            csv.consumed += nin;
            nfields += nout;
            nends += nend;
            match result {
                ReadRecordResult::Record => {
                    csv.count = nends;
                    // A line that ended in LF without ending the record ended inside quotes.
                    let unclosed = at_eof && fed_lf;
                    return Ok(Some((first_line, unclosed)));
                }
                ReadRecordResult::End => return Ok(None),
                ReadRecordResult::OutputFull => {
                    let grown = (csv.fields.len() * 2).max(4096);
                    csv.fields.resize(grown, 0);
                }
                ReadRecordResult::OutputEndsFull => {
                    let grown = (csv.ends.len() * 2).max(64);
                    csv.ends.resize(grown, 0);
                }
                ReadRecordResult::InputEmpty => {
                    fed_lf = self.buf.ends_with(b"\n");
                    if !self.read_line()? {
                        at_eof = true;
                    } else if let Kind::Csv(csv) = &mut self.kind {
                        csv.consumed = 0;
                    }
                }
            }
        }
    }

    fn next_csv(&mut self) -> Option<Result<InputRecord, InputError>> {
        let (line, unclosed) = match self.read_csv_record() {
            Ok(Some(record)) => record,
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        };
        let index = self.next_index();
        if unclosed {
            return Some(Err(self.bad_line(line, index, never_closed(line))));
        }
        let Kind::Csv(csv) = &self.kind else { return None };
        let count = csv.count;
        if count != csv.header.len() {
            let message = format!("the row has {count} field(s), the header has {}", csv.header.len());
            return Some(Err(self.bad_line(line, index, message)));
        }
        let mut fields = Map::with_capacity(count);
        for (i, (name, value)) in csv.header.iter().zip(csv_fields(csv)).enumerate() {
            let Ok(value) = std::str::from_utf8(value) else {
                let message = format!("field {} ({name:?}) is not valid UTF-8", i + 1);
                return Some(Err(self.bad_line(line, index, message)));
            };
            fields.insert(name.clone(), Value::String(value.to_owned()));
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
            Kind::Csv(_) => self.next_csv(),
            Kind::Text => self.next_text(),
        };
        match &item {
            None | Some(Err(InputError::Read { .. })) => self.done = true,
            _ => {}
        }
        item
    }
}

/// The fields of the record last parsed.
fn csv_fields(csv: &CsvKind) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    csv.ends.iter().take(csv.count).map(move |&end| {
        let field = csv.fields.get(start..end).unwrap_or_default();
        start = end;
        field
    })
}

#[cold]
fn never_closed(line: u64) -> String {
    format!("a quoted field opened on line {line} or after it is never closed")
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
