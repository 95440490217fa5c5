//! What makes a run survive a crash: jobs are checked against the journal before they start
//! (finished ones are skipped, unfinished ones resume from their last durable turn), each turn is
//! journaled, and each result is committed to the journal before it is written to the output or
//! handed to the caller, once: whatever a user has seen survives a kill, so a resumed run re-sends
//! only jobs the output does not show.

use std::path::Path;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::backends::provider_batch::{BatchLedger, BatchRecord};
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
    #[error("output writer stopped: {0}")]
    Stopped(String),
}

/// The journal and the output file of one run; either may be absent.
pub struct Durability {
    journal: Option<Arc<Journal>>,
    sink: Option<Arc<JsonlSink>>,
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
    ///
    /// With `retry_failed`, the journal's failed results are dropped first: those jobs run again
    /// and the output holds their new results in place of the old ones.
    pub fn open(
        journal: Option<&Path>,
        fingerprint: &str,
        force: bool,
        retry_failed: bool,
        output: Option<&Path>,
    ) -> Result<Self, DurableError> {
        let mut journal = journal.map(|path| Journal::open(path, fingerprint, force)).transpose()?;
        if retry_failed {
            if let Some(journal) = &mut journal {
                journal.forget_failed()?;
            }
        }
        let journal = journal.map(Arc::new);
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
                Some(Arc::new(sink))
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

    /// The result an earlier run recorded for `job_id` (a job `prepare` skipped).
    pub fn earlier_result(&self, job_id: &str) -> Option<JobResult> {
        let json = self.journal.as_ref()?.result_json(job_id)?;
        serde_json::from_str(&json).ok()
    }

    /// Commits `results` to the journal, then writes them to the output, and returns those to
    /// hand on (a job that already had a result is neither written nor delivered again) with the
    /// first failure, if any. A result whose journal or output write failed is still returned:
    /// the failure makes the run's output incomplete, and the caller reports it.
    ///
    /// Never blocks the calling thread: the journal is awaited, the file is written on a blocking
    /// thread. Results are in the output and returned only once their commit is on disk.
    pub async fn commit(&self, mut results: Vec<JobResult>) -> (Vec<JobResult>, Option<DurableError>) {
        if self.journal.is_none() && self.sink.is_none() {
            return (results, None);
        }
        let mut first_error = None;
        let mut lines = Vec::with_capacity(results.len());
        let mut keep = Vec::with_capacity(results.len());
        for result in &results {
            let line = match serde_json::to_string(result) {
                Ok(line) => line,
                Err(e) => {
                    first_error.get_or_insert(DurableError::Encode { id: result.id.clone(), message: e.to_string() });
                    keep.push(true);
                    continue;
                }
            };
            if let Some(journal) = &self.journal {
                if !journal.record_result_async(&result.id, result.index, line.clone()).await {
                    keep.push(false);
                    continue;
                }
            }
            keep.push(true);
            lines.push(line);
        }
        let mut keep = keep.into_iter();
        results.retain(|_| keep.next().unwrap_or(true));
        if let Some(journal) = &self.journal {
            if let Err(e) = journal.commit().await {
                first_error.get_or_insert(e.into());
            }
        }
        if let Some(sink) = &self.sink {
            if !lines.is_empty() {
                let sink = Arc::clone(sink);
                let written = tokio::task::spawn_blocking(move || {
                    for line in &lines {
                        sink.write_line(line)?;
                    }
                    // Handed to the OS at once: the output keeps up with the journal.
                    sink.flush()
                })
                .await;
                match written {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        first_error.get_or_insert(e.into());
                    }
                    Err(e) => {
                        first_error.get_or_insert(DurableError::Stopped(e.to_string()));
                    }
                }
            }
        }
        (results, first_error)
    }

    /// Writes a result that has no journal entry of its own: an input skipped because an earlier
    /// input has its id (the journal keys results by id, and that id belongs to the earlier one).
    /// A resumed run meets the duplicate again and writes it again after rewriting the output.
    pub fn write_unjournaled(&self, result: &JobResult) -> Result<(), DurableError> {
        if let Some(sink) = &self.sink {
            sink.write_value(result)?;
        }
        Ok(())
    }

    /// Makes everything written so far durable, without blocking the calling thread.
    pub async fn flush(&self) -> Result<(), DurableError> {
        if let Some(journal) = &self.journal {
            journal.commit().await?;
        }
        if let Some(sink) = &self.sink {
            let sink = Arc::clone(sink);
            tokio::task::spawn_blocking(move || sink.flush())
                .await
                .map_err(|e| DurableError::Stopped(e.to_string()))??;
        }
        Ok(())
    }
}

/// Journals each completed turn of every job.
pub struct JournalTurns(pub Arc<Journal>);

impl TurnSink for JournalTurns {
    fn turn_done(&self, job_id: &str, state: &AgentState) -> BoxFuture<'static, ()> {
        let journal = Arc::clone(&self.0);
        let job_id = job_id.to_owned();
        let (turn, json) = (state.turns, serde_json::to_string(state));
        Box::pin(async move {
            if let Ok(json) = json {
                journal.record_turn_async(&job_id, turn, json).await;
            }
        })
    }
}

/// Provider batches recorded in the run's journal: a resumed run re-attaches to those not ended.
pub struct JournalBatches(pub Arc<Journal>);

impl BatchLedger for JournalBatches {
    fn submitted(&self, record: BatchRecord) -> BoxFuture<'static, ()> {
        let journal = Arc::clone(&self.0);
        Box::pin(async move {
            // A failed write is counted by the journal and fails its next flush: the run reports it.
            let _ = journal.record_batch(&record.batch_id, &record.api, &record.custom_ids).await;
        })
    }

    fn ended(&self, batch_id: String) -> BoxFuture<'static, ()> {
        let journal = Arc::clone(&self.0);
        Box::pin(async move { journal.record_batch_ended(&batch_id).await })
    }
}

impl JournalBatches {
    /// The batches still open, as the backend takes them.
    pub fn open(&self) -> Result<Vec<BatchRecord>, JournalError> {
        Ok(self
            .0
            .open_batches()?
            .into_iter()
            .map(|b| BatchRecord { api: b.api, batch_id: b.batch_id, custom_ids: b.custom_ids })
            .collect())
    }
}

/// The journal key under which the first run in auto mode records when it started (Unix seconds).
pub const AUTO_FIRST_START: &str = "auto_first_start";

/// When the first run on `journal` in auto mode started (Unix seconds): the time stored by an
/// earlier run, or `now`, which is then stored (and committed before this returns), so a resumed
/// run counts a deadline given in seconds from the first start rather than from its own.
pub fn auto_first_start(journal: &Journal, now: f64) -> Result<f64, JournalError> {
    if let Some(stored) = journal.meta(AUTO_FIRST_START)? {
        if let Some(start) = stored.parse::<f64>().ok().filter(|s| s.is_finite()) {
            return Ok(start);
        }
        // Written by nothing but this function: a value that is not a time is a damaged journal.
        return Err(JournalError::Open {
            path: journal.path().to_path_buf(),
            reason: format!("its {AUTO_FIRST_START} is {stored:?}, not a time"),
        });
    }
    journal.record_meta(AUTO_FIRST_START, &now.to_string());
    journal.flush()?;
    Ok(now)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::mpsc as std_mpsc;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::backends::connect::{connect_fleet, ConnectOptions};
    use crate::backends::fleet::FleetOptions;
    use crate::backends::ChatRequest;
    use crate::conversation::Message;
    use crate::scheduler::feed::bad_input;
    use crate::store::journal::WriterOptions;
    use crate::tools::{ToolConfig, ToolExecutor, ToolPool};

    /// Only guards against a hang; no assertion depends on how long anything takes.
    const HANG: Duration = Duration::from_secs(120);

    struct Echo;

    impl ToolExecutor for Echo {
        fn call(&self, _name: &str, arguments: Arc<str>) -> BoxFuture<'static, Result<String, String>> {
            Box::pin(async move {
                tokio::task::yield_now().await;
                Ok(arguments.to_string())
            })
        }

        fn call_batch(
            &self,
            _name: &str,
            arguments: Vec<Arc<str>>,
        ) -> BoxFuture<'static, Result<Vec<Result<String, String>>, String>> {
            Box::pin(async move { Ok(arguments.iter().map(|a| Ok(a.to_string())).collect()) })
        }
    }

    /// The runtime of a run has one worker thread, shared with the embedded simulator. With the
    /// journal's writer stuck before a commit and its queue full, turn records and result commits
    /// wait, and meanwhile a model call to the simulator and a tool call on the same runtime still
    /// complete; once the writer goes on, everything is committed and only then written out.
    #[test]
    fn a_stuck_journal_writer_holds_back_its_writers_not_the_runtime() {
        let dir = std::env::temp_dir().join(format!("ba-durable-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();

        let (stuck_tx, stuck_rx) = std_mpsc::channel::<()>();
        let (release_tx, release_rx) = std_mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let hook = move || {
            let _ = stuck_tx.send(());
            // Returns once `release_tx` is dropped.
            let _ = release_rx.lock().unwrap().recv();
        };
        let capacity = 4;
        let options = WriterOptions { capacity, before_commit: Some(Box::new(hook)), ..WriterOptions::default() };
        let journal = Arc::new(Journal::open_with(&dir.join("run.sqlite"), "fp", false, options).unwrap());
        let output = dir.join("out.jsonl");
        let durable = Arc::new(Durability {
            journal: Some(Arc::clone(&journal)),
            sink: Some(Arc::new(JsonlSink::create(&output, false).unwrap())),
            previously_finished: 0,
        });

        // More turn records than the writer's group and its queue hold together: the writer stops
        // on its first commit with the rest still to come, so the writing task must wait.
        let records = crate::store::journal::GROUP_MAX + capacity + 100;
        let turns = JournalTurns(Arc::clone(&journal));
        let (turns_done_tx, turns_done_rx) = std_mpsc::channel();
        rt.spawn(async move {
            for i in 0..records {
                turns.turn_done(&format!("job-{i}"), &AgentState::default()).await;
            }
            let _ = turns_done_tx.send(());
        });
        stuck_rx.recv_timeout(HANG).expect("the writer reached its first commit");
        let committed = {
            let durable = Arc::clone(&durable);
            let (tx, rx) = std_mpsc::channel();
            rt.spawn(async move {
                let result = bad_input("r-1".into(), 0, "a result".into());
                let _ = tx.send(durable.commit(vec![result]).await);
            });
            rx
        };

        // A model call served by the simulator on the same runtime thread.
        let connected = rt
            .block_on(connect_fleet(
                &["sim://?time_scale=0&seed=3".to_owned()],
                &ConnectOptions::default(),
                FleetOptions::default(),
            ))
            .unwrap();
        let request = ChatRequest {
            model: "sim-model".into(),
            messages: Arc::new(vec![Message::user("Say something.")]),
            tools: Arc::default(),
            tool_choice: None,
            response_schema: None,
            max_tokens: Some(8),
            temperature: None,
            request_id: "while-stuck".into(),
            stream: true,
            hints: None,
            text_deltas: false,
            extra_body: None,
        };
        let (model_tx, model_rx) = std_mpsc::channel();
        let backend = Arc::clone(&connected.backend);
        rt.spawn(async move {
            let _ = model_tx.send(backend.chat(request, None).await.map(|r| r.content));
        });
        let answer = model_rx.recv_timeout(HANG).expect("the model call completed while the journal was stuck");
        assert!(answer.is_ok_and(|text| !text.is_empty()));

        let pool = Arc::new(ToolPool::new(vec![ToolConfig::new("echo")], Arc::new(Echo)));
        let (tool_tx, tool_rx) = std_mpsc::channel();
        rt.spawn(async move {
            let _ = tool_tx.send(pool.call("echo", r#"{"x":1}"#).await.map(|r| r.to_string()));
        });
        let tool = tool_rx.recv_timeout(HANG).expect("the tool call completed while the journal was stuck");
        assert_eq!(tool.unwrap(), r#"{"x":1}"#);

        // Still stuck: the turn writer waits for room, and nothing uncommitted has been shown.
        assert!(turns_done_rx.try_recv().is_err(), "the queue is bounded");
        assert!(committed.try_recv().is_err(), "a result is handed on only after its commit");
        assert_eq!(std::fs::read_to_string(&output).unwrap(), "");

        drop(release_tx);
        turns_done_rx.recv_timeout(HANG).unwrap();
        let (kept, error) = committed.recv_timeout(HANG).unwrap();
        assert!(error.is_none(), "{error:?}");
        assert_eq!(kept.len(), 1);
        let written = std::fs::read_to_string(&output).unwrap();
        assert!(written.starts_with("{\"id\":\"r-1\""), "{written}");
        journal.flush().unwrap();
        assert_eq!(journal.stats().jobs_finished, 1);
        assert_eq!(journal.stats().turns_written, records as u64);
        drop(connected);
        rt.shutdown_background();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    #[allow(clippy::float_cmp)] // the stored time must come back exactly
    fn the_first_start_in_auto_mode_is_kept_by_the_journal_for_the_runs_that_resume_it() {
        let dir = std::env::temp_dir().join(format!("ba-durable-auto-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.sqlite");
        {
            let journal = Journal::open(&path, "fp", false).unwrap();
            assert_eq!(auto_first_start(&journal, 1_000.5).unwrap(), 1_000.5);
        }
        let journal = Journal::open(&path, "fp", false).unwrap();
        assert_eq!(auto_first_start(&journal, 9_000.0).unwrap(), 1_000.5);
        journal.record_meta(AUTO_FIRST_START, "soon");
        journal.flush().unwrap();
        let error = auto_first_start(&journal, 9_000.0).unwrap_err().to_string();
        assert!(error.contains("auto_first_start") && error.contains("soon"), "{error}");
        drop(journal);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
