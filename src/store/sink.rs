//! The JSONL result sink: one JSON document per line, appended as results finish.
//!
//! Lines are buffered and written in whole-line chunks (at [`FLUSH_BYTES`], at least every
//! [`FLUSH_INTERVAL`] by a background thread, on [`JsonlSink::flush`] and on drop), each chunk with a
//! single `write_all` of complete lines, so a killed process leaves at most one torn line at the end
//! of the file, which [`JsonlSink::create`] in append mode cuts away. Flushing hands the bytes to the
//! OS (they survive the process, not a power loss); the journal, not this file, is the durable
//! record, and [`super::journal::Journal::results`] can rewrite it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest a written line stays in memory.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// Buffered bytes that trigger a write without waiting for the interval.
pub const FLUSH_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("output {path}: cannot open: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("output {path}: repairing the torn last line: {source}")]
    Repair { path: PathBuf, source: std::io::Error },
    #[error("output {path}: write failed: {message}")]
    Write { path: PathBuf, message: String },
    #[error("output {path}: a record contains a line break, which would split it across JSONL lines")]
    LineBreak { path: PathBuf },
    #[error("output {path}: serializing a record: {source}")]
    Serialize { path: PathBuf, source: serde_json::Error },
}

/// A partial last line found and removed when opening for append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornLine {
    /// Byte offset where the torn line started (the file's new length).
    pub offset: u64,
    /// Bytes removed.
    pub len: u64,
}

struct Inner {
    file: File,
    buf: Vec<u8>,
    lines: u64,
    /// The first write failure, repeated by every later call: lines after a failed write would
    /// leave a gap the caller never hears about.
    failed: Option<String>,
}

impl Inner {
    fn write_out(&mut self) {
        if self.buf.is_empty() || self.failed.is_some() {
            return;
        }
        match self.file.write_all(&self.buf) {
            Ok(()) => self.buf.clear(),
            Err(e) => self.failed = Some(e.to_string()),
        }
    }
}

/// A JSONL output file. `Send + Sync`; lines from several threads never interleave.
pub struct JsonlSink {
    path: PathBuf,
    inner: Arc<Mutex<Inner>>,
    stop: Option<SyncSender<()>>,
    flusher: Option<JoinHandle<()>>,
    torn: Option<TornLine>,
}

impl JsonlSink {
    /// Creates (truncating) or, with `append`, opens `path` for appending. In append mode a last
    /// line without its newline (a write cut by a crash) is truncated away and reported by
    /// [`JsonlSink::torn_line`].
    pub fn create(path: &Path, append: bool) -> Result<Self, SinkError> {
        let open_err = |source| SinkError::Open { path: path.to_path_buf(), source };
        let mut file = if append {
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(open_err)?
        } else {
            File::create(path).map_err(open_err)?
        };
        let torn = if append {
            let repair_err = |source| SinkError::Repair { path: path.to_path_buf(), source };
            let torn = cut_torn_line(&mut file).map_err(repair_err)?;
            file.seek(SeekFrom::End(0)).map_err(repair_err)?;
            torn
        } else {
            None
        };
        let inner = Arc::new(Mutex::new(Inner { file, buf: Vec::with_capacity(FLUSH_BYTES), lines: 0, failed: None }));
        let (stop, stopped) = mpsc::sync_channel::<()>(1);
        let flusher = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("batchagent-sink".into())
                .spawn(move || {
                    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(FLUSH_INTERVAL) {
                        inner.lock().unwrap_or_else(PoisonError::into_inner).write_out();
                    }
                })
                .map_err(open_err)?
        };
        Ok(Self { path: path.to_path_buf(), inner, stop: Some(stop), flusher: Some(flusher), torn })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The torn last line removed at open, if there was one.
    pub fn torn_line(&self) -> Option<&TornLine> {
        self.torn.as_ref()
    }

    /// Lines accepted so far by this handle.
    pub fn lines(&self) -> u64 {
        self.lock().lines
    }

    /// Appends one record, given as compact JSON text (no line breaks).
    pub fn write_line(&self, json: &str) -> Result<(), SinkError> {
        if json.contains('\n') || json.contains('\r') {
            return Err(SinkError::LineBreak { path: self.path.clone() });
        }
        let mut inner = self.lock();
        self.check(&inner)?;
        inner.buf.extend_from_slice(json.as_bytes());
        inner.buf.push(b'\n');
        inner.lines += 1;
        if inner.buf.len() >= FLUSH_BYTES {
            inner.write_out();
        }
        self.check(&inner)
    }

    /// Appends one record serialized from `value` (`serde_json`'s compact form has no line breaks).
    pub fn write_value<T: serde::Serialize + ?Sized>(&self, value: &T) -> Result<(), SinkError> {
        let mut inner = self.lock();
        self.check(&inner)?;
        let start = inner.buf.len();
        if let Err(source) = serde_json::to_writer(&mut inner.buf, value) {
            inner.buf.truncate(start);
            return Err(SinkError::Serialize { path: self.path.clone(), source });
        }
        inner.buf.push(b'\n');
        inner.lines += 1;
        if inner.buf.len() >= FLUSH_BYTES {
            inner.write_out();
        }
        self.check(&inner)
    }

    /// Hands every buffered line to the OS.
    pub fn flush(&self) -> Result<(), SinkError> {
        let mut inner = self.lock();
        inner.write_out();
        self.check(&inner)
    }

    /// Flushes, then asks the OS to put the file on disk (fsync).
    pub fn sync(&self) -> Result<(), SinkError> {
        let mut inner = self.lock();
        inner.write_out();
        self.check(&inner)?;
        if let Err(e) = inner.file.sync_data() {
            inner.failed = Some(e.to_string());
        }
        self.check(&inner)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every mutation of Inner leaves it consistent between statements, so a poisoned guard is
        // still a valid sink.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check(&self, inner: &Inner) -> Result<(), SinkError> {
        match &inner.failed {
            None => Ok(()),
            Some(message) => Err(SinkError::Write { path: self.path.clone(), message: message.clone() }),
        }
    }
}

impl Drop for JsonlSink {
    fn drop(&mut self) {
        self.stop = None;
        if let Some(flusher) = self.flusher.take() {
            // The flusher only ever writes under the lock; if it panicked the final write below
            // still runs.
            let _ = flusher.join();
        }
        // Drop cannot report a failure; callers that must know call `flush` first.
        self.lock().write_out();
    }
}

/// Truncates `file` after its last newline, returning what was cut. Reads backwards in blocks, so
/// a large output costs a few reads.
fn cut_torn_line(file: &mut File) -> std::io::Result<Option<TornLine>> {
    const BLOCK: u64 = 64 * 1024;
    let len = file.seek(SeekFrom::End(0))?;
    let mut end = len;
    let mut buf = vec![0u8; BLOCK as usize];
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(pos) = chunk.iter().rposition(|&b| b == b'\n') {
            let keep = start + pos as u64 + 1;
            if keep == len {
                return Ok(None);
            }
            file.set_len(keep)?;
            return Ok(Some(TornLine { offset: keep, len: len - keep }));
        }
        end = start;
    }
    if len == 0 {
        return Ok(None);
    }
    file.set_len(0)?;
    Ok(Some(TornLine { offset: 0, len }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ba-sink-unit-{}-{name}.jsonl", std::process::id()))
    }

    #[test]
    fn background_flush_reaches_the_file_without_explicit_flush() {
        let path = temp("bg");
        let sink = JsonlSink::create(&path, false).unwrap();
        sink.write_line("{\"a\":1}").unwrap();
        let mut seen = String::new();
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(50));
            seen = std::fs::read_to_string(&path).unwrap();
            if !seen.is_empty() {
                break;
            }
        }
        assert_eq!(seen, "{\"a\":1}\n");
        drop(sink);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn torn_line_longer_than_a_block_is_cut() {
        let path = temp("bigtorn");
        let torn = "x".repeat(200_000);
        std::fs::write(&path, format!("{{\"ok\":1}}\n{torn}")).unwrap();
        let sink = JsonlSink::create(&path, true).unwrap();
        assert_eq!(sink.torn_line(), Some(&TornLine { offset: 9, len: 200_000 }));
        sink.write_value(&serde_json::json!({"ok": 2})).unwrap();
        drop(sink);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"ok\":1}\n{\"ok\":2}\n");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn line_breaks_are_refused() {
        let path = temp("nl");
        let sink = JsonlSink::create(&path, false).unwrap();
        assert!(matches!(sink.write_line("{\n}"), Err(SinkError::LineBreak { .. })));
        assert_eq!(sink.lines(), 0);
        drop(sink);
        let _ = std::fs::remove_file(&path);
    }
}
