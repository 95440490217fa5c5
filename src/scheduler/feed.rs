//! Inputs read from a file by the core itself: a first pass that fails fast on a bad line or a
//! missing template variable (before any request), then a streaming pass that feeds the run with
//! back-pressure, skipping jobs the journal already finished.

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::conversation::Usage;
use crate::scheduler::agent::{Job, JobError, JobResult};
use crate::scheduler::durable::Durability;
use crate::scheduler::stats::RunStats;
use crate::spec::Template;
use crate::store::{InputError, InputFormat, InputReader};

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("input {path}, line {line}: {message}")]
    Template { path: String, line: u64, message: String },
}

/// Reads the whole file once: the number of records, or the first bad line (unless bad lines are
/// to be skipped) or the first record the task template cannot be rendered for.
pub fn prescan(path: &Path, format: InputFormat, template: &Template, skip_bad_lines: bool) -> Result<u64, FeedError> {
    let mut count = 0;
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
            }
            Err(InputError::BadLine { .. }) if skip_bad_lines => {}
            Err(e) => return Err(e.into()),
        }
        count += 1;
    }
    Ok(count)
}

/// Streams the file into the run (blocking: run it on a blocking thread). A bad line that appears
/// now (the file changed since the prescan, or bad lines are skipped) becomes a failed result.
pub fn feed_file(
    path: &Path,
    format: InputFormat,
    durable: &Durability,
    stats: &Arc<RunStats>,
    jobs: &mpsc::Sender<Job>,
    results: &mpsc::UnboundedSender<JobResult>,
) -> Result<(), InputError> {
    for item in InputReader::open(path, format)? {
        match item {
            Ok(record) => {
                let id = record.id().unwrap_or_else(|| record.index.to_string());
                let input_json = if durable.journal().is_some() {
                    serde_json::to_string(&record.fields).unwrap_or_default()
                } else {
                    String::new()
                };
                let job = Job { id, index: record.index, input: record.fields, resume: None };
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
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn bad_input(id: String, index: u64, message: String) -> JobResult {
    JobResult {
        id,
        index,
        ok: false,
        output: None,
        text: None,
        error: Some(JobError { kind: "bad_input".into(), message, retryable: false, attempts: 0 }),
        usage: Usage::default(),
        turns: 0,
        tool_calls: 0,
        attempts: 0,
        repaired: false,
        ttft_s: None,
        total_s: 0.0,
    }
}
