//! Inputs read from a file by the core itself: a first pass that fails fast on a bad line or a
//! missing template variable (before any request), then a streaming pass that feeds the run with
//! back-pressure, skipping jobs the journal already finished.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::scheduler::agent::{Job, JobResult};
use crate::scheduler::durable::Durability;
use crate::scheduler::stats::RunStats;
use crate::spec::{check_job_id, Template};
use crate::store::{hash128, InputError, InputFormat, InputReader};

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("input {path}, line {line}: {message}")]
    Template { path: String, line: u64, message: String },
    #[error("input {path}, line {line}: {message}")]
    BadId { path: String, line: u64, message: String },
    #[error(
        "input {path}, line {line}: id {id:?} is also the id of line {first_line}; \
         ids must be unique (dedupe keeps the first and skips the rest)"
    )]
    Duplicate { path: String, id: String, first_line: u64, line: u64 },
    #[error("{0}")]
    Output(String),
}

/// The ids of a run's inputs so far, each with where it first appeared (a line or an index), to
/// find a repeated id before it is sent. Memory is bounded by the number of inputs, not their
/// size: a 128-bit hash of each id and its position, 24 bytes plus the table's overhead (about
/// 50 MB at a million inputs). Two different ids collide with a probability near 2^-128 per pair.
#[derive(Default)]
pub struct SeenIds {
    first: HashMap<[u64; 2], u64>,
}

impl SeenIds {
    /// Records `id` at `position`; the position it had before if it was already there.
    pub fn insert(&mut self, id: &str, position: u64) -> Option<u64> {
        let hash = hash128(id.as_bytes());
        let key = [hash as u64, (hash >> 64) as u64];
        match self.first.entry(key) {
            std::collections::hash_map::Entry::Occupied(seen) => Some(*seen.get()),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(position);
                None
            }
        }
    }
}

/// Reads the whole file once: the number of records, or the first bad line (unless bad lines are
/// to be skipped) or the first record the task template cannot be rendered for.
/// An id with a control character, and (unless `dedupe`) an id that repeats an earlier line's, fail
/// here too, naming the line(s).
pub fn prescan(
    path: &Path,
    format: InputFormat,
    template: &Template,
    skip_bad_lines: bool,
    dedupe: bool,
) -> Result<u64, FeedError> {
    let mut count = 0;
    let mut seen = SeenIds::default();
    for item in InputReader::open(path, format)? {
        match item {
            Ok(record) => {
                if let Err(e) = template.render(record.index, &record.fields) {
                    return Err(FeedError::Template {
                        path: path.display().to_string(),
                        line: record.line,
                        message: e.to_string(),
                    });
                }
                let id = record.id().unwrap_or_else(|| record.index.to_string());
                if let Err(message) = check_job_id(&id) {
                    return Err(FeedError::BadId { path: path.display().to_string(), line: record.line, message });
                }
                if !dedupe {
                    if let Some(first_line) = seen.insert(&id, record.line) {
                        return Err(FeedError::Duplicate {
                            path: path.display().to_string(),
                            id,
                            first_line,
                            line: record.line,
                        });
                    }
                }
            }
            Err(InputError::BadLine { .. }) if skip_bad_lines => {}
            Err(e) => return Err(e.into()),
        }
        count += 1;
    }
    Ok(count)
}

/// Streams the file into the run (blocking: run it on a blocking thread). A bad line that appears
/// now (the file changed since the prescan, or bad lines are skipped) becomes a failed result. An
/// input whose id an earlier line has gets a result of kind `duplicate`, written to the output
/// but not journaled (see [`Durability::write_unjournaled`]): skipped when `dedupe`, failed
/// otherwise (the file changed since the prescan).
pub fn feed_file(
    path: &Path,
    format: InputFormat,
    dedupe: bool,
    durable: &Durability,
    stats: &Arc<RunStats>,
    jobs: &mpsc::Sender<Job>,
    results: &mpsc::UnboundedSender<JobResult>,
) -> Result<(), FeedError> {
    let mut seen = SeenIds::default();
    for item in InputReader::open(path, format)? {
        match item {
            Ok(record) => {
                let id = record.id().unwrap_or_else(|| record.index.to_string());
                if let Err(message) = check_job_id(&id) {
                    stats.jobs_failed.fetch_add(1, Relaxed);
                    stats.count_error("bad_input");
                    let index = record.index;
                    let _ =
                        results.send(bad_input(index.to_string(), index, format!("line {}: {message}", record.line)));
                    continue;
                }
                if let Some(first_line) = seen.insert(&id, record.line) {
                    let result = duplicate(id, record.index, record.line, first_line, dedupe);
                    if dedupe {
                        stats.duplicates_skipped.fetch_add(1, Relaxed);
                    } else {
                        stats.jobs_failed.fetch_add(1, Relaxed);
                        stats.count_error("duplicate");
                    }
                    if let Err(e) = durable.write_unjournaled(&result) {
                        return Err(FeedError::Output(e.to_string()));
                    }
                    continue;
                }
                let input_json = if durable.journal().is_some() {
                    serde_json::to_string(&record.fields).unwrap_or_default()
                } else {
                    String::new()
                };
                let job = Job {
                    id,
                    index: record.index,
                    input: record.fields,
                    resume: None,
                    extra_body: None,
                    keep_conversation: false,
                };
                match durable.prepare(job, &input_json) {
                    Some(job) => {
                        if jobs.blocking_send(job).is_err() {
                            return Ok(());
                        }
                    }
                    None => {
                        stats.jobs_skipped.fetch_add(1, Relaxed);
                    }
                }
            }
            Err(InputError::BadLine { line, index, message, .. }) => {
                let id = index.to_string();
                if durable.journal().is_some_and(|j| j.is_finished(&id)) {
                    stats.jobs_skipped.fetch_add(1, Relaxed);
                    continue;
                }
                stats.jobs_failed.fetch_add(1, Relaxed);
                stats.count_error("bad_input");
                let _ = results.send(bad_input(id, index, format!("line {line}: {message}")));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The result of an input skipped (`skipped`) or failed because line `first_line` has its id.
pub fn duplicate(id: String, index: u64, line: u64, first_line: u64, skipped: bool) -> JobResult {
    let outcome = if skipped { "skipped" } else { "not run" };
    let message = format!("line {line}: id {id:?} is also the id of line {first_line}; {outcome}");
    JobResult::failed(id, index, "duplicate", message)
}

pub fn bad_input(id: String, index: u64, message: String) -> JobResult {
    JobResult::failed(id, index, "bad_input", message)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn file(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("batchagent-feed-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn scan(path: &Path, dedupe: bool) -> Result<u64, FeedError> {
        prescan(path, InputFormat::Auto, &Template::parse("{q}").unwrap(), false, dedupe)
    }

    #[test]
    fn seen_ids_remember_the_first_position() {
        let mut seen = SeenIds::default();
        assert_eq!(seen.insert("a", 1), None);
        assert_eq!(seen.insert("b", 2), None);
        assert_eq!(seen.insert("a", 7), Some(1));
        assert_eq!(seen.insert("a", 9), Some(1));
        assert_eq!(seen.insert("A", 10), None);
    }

    #[test]
    fn a_repeated_id_fails_the_prescan_naming_both_lines() {
        let path =
            file("dup.jsonl", "{\"id\": \"x\", \"q\": 1}\n\n{\"id\": \"y\", \"q\": 2}\n{\"id\": \"x\", \"q\": 3}\n");
        let err = scan(&path, false).unwrap_err().to_string();
        assert!(err.contains("line 4") && err.contains("line 1") && err.contains("\"x\""), "{err}");
        assert_eq!(scan(&path, true).unwrap(), 3);
        // Ids given as numbers and the index used when there is no id collide like strings do.
        let path = file("num.jsonl", "{\"q\": 1}\n{\"id\": 0, \"q\": 2}\n");
        let err = scan(&path, false).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("line 1"), "{err}");
    }

    #[test]
    fn an_id_with_a_control_character_fails_the_prescan_naming_its_line() {
        let path = file("ctl.jsonl", "{\"id\": \"ok\", \"q\": 1}\n{\"id\": \"a\\r\\nX-Injected: 1\", \"q\": 2}\n");
        let err = scan(&path, true).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("U+000D"), "{err}");
        assert!(!err.contains('\r'), "the message itself must stay on one line: {err:?}");
    }
}
