//! What makes a run survive a crash: jobs are checked against the journal before they start
//! (finished ones are skipped, unfinished ones resume from their last durable turn), each turn is
//! journaled, and each result is journaled before it is written to the output, once.

use std::path::Path;
use std::sync::Arc;

use crate::scheduler::agent::{AgentState, Job, JobResult, TurnSink};
use crate::store::{hash128, Journal, JournalError, JsonlSink, SinkError};

#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("result of job {id} cannot be encoded: {message}")]
    Encode { id: String, message: String },
}

/// The journal and the output file of one run; either may be absent.
pub struct Durability {
    journal: Option<Arc<Journal>>,
    sink: Option<JsonlSink>,
    /// Results already in the journal when the run started (a resumed run).
    pub previously_finished: u64,
}

/// A stable fingerprint of a run's settings, so a journal is never resumed by a different batch.
pub fn fingerprint(settings_json: &str) -> String {
    format!("{:032x}", hash128(settings_json.as_bytes()))
}

impl Durability {
    /// Opens the journal (failing before any request if it cannot be written) and the output. On
    /// a resume the output is rewritten from the journal: it may hold lines of results the journal
    /// never committed before a crash, and the journal is the truth.
    pub fn open(
        journal: Option<&Path>,
        fingerprint: &str,
        force: bool,
        output: Option<&Path>,
    ) -> Result<Self, DurableError> {
        let journal = journal.map(|path| Journal::open(path, fingerprint, force)).transpose()?.map(Arc::new);
        let mut previously_finished = 0;
        let sink = match output {
            None => None,
            Some(path) => {
                let sink = JsonlSink::create(path, false)?;
                if let Some(journal) = &journal {
                    for item in journal.results() {
                        let (_, line) = item?;
                        sink.write_line(&line)?;
                        previously_finished += 1;
                    }
                }
                Some(sink)
            }
        };
        if sink.is_none() {
            if let Some(journal) = &journal {
                previously_finished = journal.finished_ids()?.len() as u64;
            }
        }
        Ok(Self { journal, sink, previously_finished })
    }

    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.journal.as_ref()
    }

    /// `None` when the job finished in an earlier run; otherwise the job, with its last durable
    /// turn attached when it has one.
    pub fn prepare(&self, mut job: Job, input_json: &str) -> Option<Job> {
        let Some(journal) = &self.journal else { return Some(job) };
        if journal.is_finished(&job.id) {
            return None;
        }
        match journal.checkpoint(&job.id, job.index) {
            Some(checkpoint) => {
                // An undecodable checkpoint (written by another version) restarts the job cleanly.
                job.resume = serde_json::from_str::<AgentState>(&checkpoint.state_json).ok();
            }
            None => journal.record_start(&job.id, job.index, input_json),
        }
        Some(job)
    }

    /// Journals the result, then writes it out. `Ok(false)`: this job already had a result (it
    /// is neither written nor to be delivered again).
    pub fn finish(&self, result: &JobResult) -> Result<bool, DurableError> {
        if self.journal.is_none() && self.sink.is_none() {
            return Ok(true);
        }
        let line = serde_json::to_string(result)
            .map_err(|e| DurableError::Encode { id: result.id.clone(), message: e.to_string() })?;
        if let Some(journal) = &self.journal {
            if !journal.record_result(&result.id, result.index, &line) {
                return Ok(false);
            }
        }
        if let Some(sink) = &self.sink {
            sink.write_line(&line)?;
        }
        Ok(true)
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> Result<(), DurableError> {
        if let Some(journal) = &self.journal {
            journal.flush()?;
        }
        if let Some(sink) = &self.sink {
            sink.flush()?;
        }
        Ok(())
    }
}

/// Journals each completed turn of every job.
pub struct JournalTurns(pub Arc<Journal>);

impl TurnSink for JournalTurns {
    fn turn_done(&self, job_id: &str, state: &AgentState) {
        if let Ok(json) = serde_json::to_string(state) {
            self.0.record_turn(job_id, state.turns, &json);
        }
    }
}
