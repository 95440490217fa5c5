//! The run journal: one SQLite file (WAL) per run holding each job's input, its last durable turn
//! and its final result, so a resumed run skips finished jobs, restarts unfinished ones from their
//! last turn and writes each result exactly once.
//!
//! All writes go through one background thread that commits them in groups (up to [`GROUP_MAX`]
//! records or [`GROUP_WINDOW`] after the first, whichever comes first): one transaction per group
//! instead of one per record is what lets the journal keep up with 10,000+ jobs/s. With WAL and
//! `synchronous=NORMAL` a commit is an append to the WAL file without fsync: it survives the process
//! being killed at any point (SIGKILL, abort), and a power loss can only drop the last commits,
//! never corrupt the file.
//!
//! Records are queued on a bounded channel. Code on the async runtime awaits a free place
//! (`*_async`, [`Journal::commit`]): a slow disk holds back the agents that write, never the runtime
//! thread that also serves the other agents (and, with `sim://`, the simulator). The plain methods
//! block the calling thread and are for threads outside the runtime (input feeders, tests).

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::cache::hash128;

/// Most records committed in one transaction.
pub const GROUP_MAX: usize = 4096;
/// Longest a record waits in memory before its group is committed.
pub const GROUP_WINDOW: Duration = Duration::from_millis(20);
/// Records queued for the writer before `record_*` calls wait (back-pressure keeps memory flat
/// when the disk is slower than the run).
pub const QUEUE_CAPACITY: usize = 4 * GROUP_MAX;
/// Rows fetched per page by [`Journal::results`].
const RESULTS_PAGE: usize = 512;
const SCHEMA_VERSION: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: cannot open: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error(
        "journal {path} belongs to a different batch (its settings fingerprint is {stored}, this run's is \
         {given}); use another journal file, or force reuse to continue anyway"
    )]
    Mismatch { path: PathBuf, stored: String, given: String },
    #[error("journal {path}: schema version {found} is not supported (expected {SCHEMA_VERSION})")]
    Version { path: PathBuf, found: String },
    #[error("journal {path}: {count} write(s) failed, first: {first}")]
    Write { path: PathBuf, count: u64, first: String },
    #[error("journal {path}: reading: {source}")]
    Read { path: PathBuf, source: rusqlite::Error },
    #[error("journal {path}: the writer thread stopped")]
    WriterGone { path: PathBuf },
}

/// The last durable turn of an unfinished job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub turn: u32,
    pub state_json: String,
}

/// Counters of one [`Journal`] handle since it was opened. Started / finished / turns count records
/// committed to disk, not merely queued.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalStats {
    pub jobs_started: u64,
    pub jobs_finished: u64,
    pub turns_written: u64,
    /// Finished jobs found in the journal when it was opened.
    pub previously_finished: u64,
    /// Second results for an already finished job, ignored.
    pub duplicate_results: u64,
    /// Records that could not be written (each also makes `flush` fail).
    pub write_errors: u64,
    pub read_errors: u64,
    pub first_write_error: Option<String>,
}

enum Op {
    Start {
        job_id: String,
        index: u64,
        input_json: String,
    },
    Turn {
        job_id: String,
        turn: u32,
        state_json: String,
    },
    Result {
        job_id: String,
        index: u64,
        result_json: String,
    },
    Meta {
        key: String,
        value: String,
    },
    /// A provider batch was created holding these rows (`custom_ids_json`, a JSON array).
    Batch {
        batch_id: String,
        api: String,
        custom_ids_json: String,
    },
    /// A provider batch ended and its rows were handed on.
    BatchEnded {
        batch_id: String,
    },
    Flush(oneshot::Sender<()>),
}

/// A provider batch recorded in the journal and not yet ended: a resumed run re-attaches to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenBatch {
    pub batch_id: String,
    pub api: String,
    pub custom_ids: Vec<String>,
}

/// How the writer is set up; tests change it to stand in for a full or a stalled disk.
pub(crate) struct WriterOptions<'a> {
    /// Applied to the writer's connection before it starts.
    pub configure: &'a dyn Fn(&Connection) -> rusqlite::Result<()>,
    pub capacity: usize,
    /// Called on the writer thread before each commit.
    pub before_commit: Option<Box<dyn Fn() + Send>>,
}

impl Default for WriterOptions<'_> {
    fn default() -> Self {
        Self { configure: &|_| Ok(()), capacity: QUEUE_CAPACITY, before_commit: None }
    }
}

#[derive(Default)]
struct Shared {
    started: AtomicU64,
    finished: AtomicU64,
    turns: AtomicU64,
    write_errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    #[cold]
    fn write_failed(&self, records: u64, error: &dyn std::fmt::Display) {
        self.write_errors.fetch_add(records, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(PoisonError::into_inner);
        if first.is_none() {
            *first = Some(error.to_string());
        }
    }
}

/// The run journal. `Send + Sync`: share it behind an `Arc`.
pub struct Journal {
    path: PathBuf,
    tx: Option<mpsc::Sender<Op>>,
    writer: Option<JoinHandle<()>>,
    reader: Arc<Mutex<Connection>>,
    /// 128-bit hashes of finished job ids: answers `record_result` synchronously without a round
    /// trip to the writer thread, in 16 bytes per job instead of the id itself. A collision (odds
    /// about n²/2¹²⁹) could only drop a result, never duplicate one: the table's primary key on the
    /// id, written with INSERT OR IGNORE, is what guarantees a single row per job.
    finished: Mutex<HashSet<u128>>,
    shared: Arc<Shared>,
    previously_finished: u64,
    duplicate_results: AtomicU64,
    read_errors: AtomicU64,
}

impl Journal {
    /// Opens or creates the journal at `path` for a run whose settings hash is `fingerprint`.
    /// A journal written by a run with another fingerprint is refused ([`JournalError::Mismatch`])
    /// unless `force`, which adopts the new fingerprint. A path that cannot be written fails here,
    /// naming the path and the operating system's reason, before any request is sent.
    pub fn open(path: &Path, fingerprint: &str, force: bool) -> Result<Journal, JournalError> {
        Self::open_with(path, fingerprint, force, WriterOptions::default())
    }

    /// `open` with a writer set up by `options`.
    pub(crate) fn open_with(
        path: &Path,
        fingerprint: &str,
        force: bool,
        options: WriterOptions<'_>,
    ) -> Result<Journal, JournalError> {
        let open_err = |reason: String| JournalError::Open { path: path.to_path_buf(), reason };
        // SQLite reports every failure to create a file as "unable to open database file"; opening
        // it ourselves first gets the OS reason (not a directory, no such directory, read-only fs).
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(|e| {
            match path.parent().filter(|p| !p.as_os_str().is_empty()) {
                Some(parent) if !parent.is_dir() => {
                    open_err(format!("{e} (parent {} is not a directory)", parent.display()))
                }
                _ => open_err(e.to_string()),
            }
        })?;
        let mut conn = connect(path).map_err(|e| open_err(e.to_string()))?;
        let mode: String =
            conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(|e| open_err(e.to_string()))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(open_err(format!("the file system does not support WAL mode (got {mode})")));
        }
        init_schema(&mut conn, path, fingerprint, force)?;

        let mut finished = HashSet::new();
        {
            let read_err = |source| JournalError::Read { path: path.to_path_buf(), source };
            let mut stmt = conn.prepare("SELECT job_id FROM results").map_err(read_err)?;
            let mut rows = stmt.query([]).map_err(read_err)?;
            while let Some(row) = rows.next().map_err(read_err)? {
                let id = row.get_ref(0).map_err(read_err)?;
                finished.insert(hash128(id.as_bytes().map_err(|e| read_err(e.into()))?));
            }
        }
        let previously_finished = finished.len() as u64;

        let reader = connect(path).map_err(|e| open_err(e.to_string()))?;
        reader.pragma_update(None, "query_only", true).map_err(|e| open_err(e.to_string()))?;

        (options.configure)(&conn).map_err(|e| open_err(e.to_string()))?;
        // The writer waits for records with a deadline (the group window) on a runtime of its own.
        let clock = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| open_err(format!("starting the writer's timer: {e}")))?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel(options.capacity.max(1));
        let writer = {
            let shared = Arc::clone(&shared);
            let before_commit = options.before_commit;
            std::thread::Builder::new()
                .name("batchagent-journal".into())
                .spawn(move || clock.block_on(write_loop(conn, rx, &shared, before_commit.as_deref())))
                .map_err(|e| open_err(format!("starting the writer thread: {e}")))?
        };
        Ok(Journal {
            path: path.to_path_buf(),
            tx: Some(tx),
            writer: Some(writer),
            reader: Arc::new(Mutex::new(reader)),
            finished: Mutex::new(finished),
            shared,
            previously_finished,
            duplicate_results: AtomicU64::new(0),
            read_errors: AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ids of the jobs whose result is recorded (including results still queued: it flushes first).
    pub fn finished_ids(&self) -> Result<HashSet<String>, JournalError> {
        self.flush()?;
        let reader = self.reader();
        let read_err = |source| JournalError::Read { path: self.path.clone(), source };
        let mut stmt = reader.prepare("SELECT job_id FROM results").map_err(read_err)?;
        let mut rows = stmt.query([]).map_err(read_err)?;
        let mut ids = HashSet::new();
        while let Some(row) = rows.next().map_err(read_err)? {
            ids.insert(row.get(0).map_err(read_err)?);
        }
        Ok(ids)
    }

    /// Whether `job_id` has a result (recorded through this handle or found at open).
    pub fn is_finished(&self, job_id: &str) -> bool {
        self.finished.lock().unwrap_or_else(PoisonError::into_inner).contains(&hash128(job_id.as_bytes()))
    }

    /// Removes the failed results (`"ok": false`) so their jobs run again (`--retry-failed`);
    /// returns how many. Call it right after opening, before any record: the delete goes through a
    /// connection of its own, ahead of the writer's first commit.
    pub fn forget_failed(&mut self) -> Result<u64, JournalError> {
        let err = |e: rusqlite::Error| JournalError::Open { path: self.path.clone(), reason: e.to_string() };
        let conn = connect(&self.path).map_err(err)?;
        let ids: Vec<String> = conn
            .prepare("DELETE FROM results WHERE json_extract(result, '$.ok') = 0 RETURNING job_id")
            .and_then(|mut stmt| stmt.query_map([], |r| r.get(0))?.collect())
            .map_err(err)?;
        let finished = self.finished.get_mut().unwrap_or_else(PoisonError::into_inner);
        for id in &ids {
            finished.remove(&hash128(id.as_bytes()));
        }
        self.previously_finished = self.previously_finished.saturating_sub(ids.len() as u64);
        Ok(ids.len() as u64)
    }

    /// The recorded result of `job_id`, if it has one (a read failure counts in `read_errors`).
    pub fn result_json(&self, job_id: &str) -> Option<String> {
        let reader = self.reader();
        let found = reader
            .prepare_cached("SELECT result FROM results WHERE job_id = ?1")
            .and_then(|mut stmt| stmt.query_row([job_id], |r| r.get(0)).optional());
        found.unwrap_or_else(|_| {
            self.read_errors.fetch_add(1, Ordering::Relaxed);
            None
        })
    }

    /// The last committed turn of unfinished job `job_id`, recorded under input index `index`. A
    /// state recorded for the same id at another index belongs to different input and is not
    /// returned. Read failures count in [`JournalStats::read_errors`] and give `None` (the job then
    /// restarts from its first turn, which costs requests but loses nothing).
    pub fn checkpoint(&self, job_id: &str, index: u64) -> Option<Checkpoint> {
        let reader = self.reader();
        let found = reader
            .prepare_cached(
                "SELECT c.turn, c.state FROM checkpoints c JOIN jobs j ON j.job_id = c.job_id
                 WHERE c.job_id = ?1 AND j.idx = ?2
                   AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = ?1)",
            )
            .and_then(|mut stmt| {
                stmt.query_row(params![job_id, index as i64], |r| {
                    Ok(Checkpoint { turn: r.get(0)?, state_json: r.get(1)? })
                })
                .optional()
            });
        found.unwrap_or_else(|_| {
            self.read_errors.fetch_add(1, Ordering::Relaxed);
            None
        })
    }

    /// Records that job `job_id` (input record `index`) started, with its input. Blocks while the
    /// queue is full: not for a runtime thread.
    pub fn record_start(&self, job_id: &str, index: u64, input_json: &str) {
        self.send(Op::Start { job_id: job_id.to_owned(), index, input_json: input_json.to_owned() });
    }

    /// Records the state after `turn` (messages and tool results so far). A turn older than the one
    /// stored is ignored. Blocks while the queue is full: not for a runtime thread.
    pub fn record_turn(&self, job_id: &str, turn: u32, state_json: &str) {
        self.send(Op::Turn { job_id: job_id.to_owned(), turn, state_json: state_json.to_owned() });
    }

    /// [`Journal::record_turn`] for async code: waits for a place in the queue without blocking.
    pub async fn record_turn_async(&self, job_id: &str, turn: u32, state_json: String) {
        self.send_async(Op::Turn { job_id: job_id.to_owned(), turn, state_json }).await;
    }

    /// Records the final result of `job_id`. Returns false, recording nothing, when the job already
    /// has one: the caller must then not emit it again. Blocks while the queue is full: not for a
    /// runtime thread.
    /// Stores `value` under `key` in the journal's key-value table (settings of what the journal
    /// holds, beside its schema version and fingerprint).
    pub fn record_meta(&self, key: &str, value: &str) {
        self.send(Op::Meta { key: key.to_owned(), value: value.to_owned() });
    }

    /// The value stored under `key` by [`Journal::record_meta`] (committed records only).
    pub fn meta(&self, key: &str) -> Result<Option<String>, JournalError> {
        let reader = self.reader();
        reader
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")
            .and_then(|mut stmt| stmt.query_row([key], |r| r.get(0)).optional())
            .map_err(|source| JournalError::Read { path: self.path.clone(), source })
    }

    /// Every unfinished job's last durable turn, as `(job id, index, checkpoint)` in index order
    /// (committed records only).
    pub fn checkpoints(&self) -> Result<Vec<(String, u64, Checkpoint)>, JournalError> {
        let reader = self.reader();
        let read = || -> rusqlite::Result<Vec<(String, u64, Checkpoint)>> {
            let mut stmt = reader.prepare(
                "SELECT c.job_id, j.idx, c.turn, c.state FROM checkpoints c JOIN jobs j ON j.job_id = c.job_id
                 WHERE NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = c.job_id)
                 ORDER BY j.idx, c.job_id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, Checkpoint { turn: r.get(2)?, state_json: r.get(3)? }))
            })?;
            rows.collect()
        };
        read().map_err(|source| JournalError::Read { path: self.path.clone(), source })
    }

    pub fn record_result(&self, job_id: &str, index: u64, result_json: &str) -> bool {
        if !self.first_result(job_id) {
            return false;
        }
        self.send(Op::Result { job_id: job_id.to_owned(), index, result_json: result_json.to_owned() });
        true
    }

    /// [`Journal::record_result`] for async code. The result is committed by the next
    /// [`Journal::commit`], or within [`GROUP_WINDOW`].
    pub async fn record_result_async(&self, job_id: &str, index: u64, result_json: String) -> bool {
        if !self.first_result(job_id) {
            return false;
        }
        self.send_async(Op::Result { job_id: job_id.to_owned(), index, result_json }).await;
        true
    }

    /// Records a provider batch and its rows, and waits for the commit: once this returns, a
    /// resumed run knows the batch and re-attaches to it instead of submitting its rows again.
    pub async fn record_batch(&self, batch_id: &str, api: &str, custom_ids: &[String]) -> Result<(), JournalError> {
        let custom_ids_json = serde_json::to_string(custom_ids).unwrap_or_else(|_| "[]".into());
        self.send_async(Op::Batch { batch_id: batch_id.to_owned(), api: api.to_owned(), custom_ids_json }).await;
        self.commit().await
    }

    /// Marks a provider batch as ended (its rows were handed on); committed with the next group.
    pub async fn record_batch_ended(&self, batch_id: &str) {
        self.send_async(Op::BatchEnded { batch_id: batch_id.to_owned() }).await;
    }

    /// The provider batches recorded and not ended, oldest first.
    pub fn open_batches(&self) -> Result<Vec<OpenBatch>, JournalError> {
        let reader = self.reader();
        let read_err = |source| JournalError::Read { path: self.path.clone(), source };
        let mut stmt = reader
            .prepare("SELECT batch_id, api, custom_ids FROM provider_batches WHERE ended = 0 ORDER BY rowid")
            .map_err(read_err)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))
            .map_err(read_err)?;
        let mut out = Vec::new();
        for row in rows {
            let (batch_id, api, ids) = row.map_err(read_err)?;
            let custom_ids = serde_json::from_str(&ids).unwrap_or_default();
            out.push(OpenBatch { batch_id, api, custom_ids });
        }
        Ok(out)
    }

    /// Waits until everything queued before this call is committed. Fails if any write of this
    /// handle has failed so far (the error stays: a journal with a hole cannot promise a resume).
    /// Blocks: not for a runtime thread (use [`Journal::commit`] there).
    pub fn flush(&self) -> Result<(), JournalError> {
        let (ack_tx, ack_rx) = oneshot::channel();
        let gone = || JournalError::WriterGone { path: self.path.clone() };
        self.tx.as_ref().ok_or_else(gone)?.blocking_send(Op::Flush(ack_tx)).map_err(|_| gone())?;
        ack_rx.blocking_recv().map_err(|_| gone())?;
        self.write_error()
    }

    /// [`Journal::flush`] for async code: commits what is queued now, and waits for it without
    /// blocking the thread.
    pub async fn commit(&self) -> Result<(), JournalError> {
        let (ack_tx, ack_rx) = oneshot::channel();
        let gone = || JournalError::WriterGone { path: self.path.clone() };
        self.tx.as_ref().ok_or_else(gone)?.send(Op::Flush(ack_tx)).await.map_err(|_| gone())?;
        ack_rx.await.map_err(|_| gone())?;
        self.write_error()
    }

    fn first_result(&self, job_id: &str) -> bool {
        let new = self.finished.lock().unwrap_or_else(PoisonError::into_inner).insert(hash128(job_id.as_bytes()));
        if !new {
            self.duplicate_results.fetch_add(1, Ordering::Relaxed);
        }
        new
    }

    pub fn stats(&self) -> JournalStats {
        JournalStats {
            jobs_started: self.shared.started.load(Ordering::Relaxed),
            jobs_finished: self.shared.finished.load(Ordering::Relaxed),
            turns_written: self.shared.turns.load(Ordering::Relaxed),
            previously_finished: self.previously_finished,
            duplicate_results: self.duplicate_results.load(Ordering::Relaxed),
            write_errors: self.shared.write_errors.load(Ordering::Relaxed),
            read_errors: self.read_errors.load(Ordering::Relaxed),
            first_write_error: self.shared.first_error.lock().unwrap_or_else(PoisonError::into_inner).clone(),
        }
    }

    /// Every recorded result as `(index, result_json)` in index order, read page by page (memory
    /// stays flat for millions of results). Flushes first; a failed flush is the first item.
    pub fn results(&self) -> JournalResults {
        let pending_error = self.flush().err();
        JournalResults {
            path: self.path.clone(),
            reader: Arc::clone(&self.reader),
            page: VecDeque::new(),
            after: None,
            done: false,
            pending_error,
        }
    }

    fn reader(&self) -> MutexGuard<'_, Connection> {
        // The connection holds no half-done state between calls, so a poisoned guard is reusable.
        self.reader.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn send(&self, op: Op) {
        let sent = self.tx.as_ref().is_some_and(|tx| tx.blocking_send(op).is_ok());
        if !sent {
            self.shared.write_failed(1, &"the writer thread stopped");
        }
    }

    async fn send_async(&self, op: Op) {
        let sent = match &self.tx {
            Some(tx) => tx.send(op).await.is_ok(),
            None => false,
        };
        if !sent {
            self.shared.write_failed(1, &"the writer thread stopped");
        }
    }

    fn write_error(&self) -> Result<(), JournalError> {
        let count = self.shared.write_errors.load(Ordering::Relaxed);
        if count == 0 {
            return Ok(());
        }
        let first = self.shared.first_error.lock().unwrap_or_else(PoisonError::into_inner).clone().unwrap_or_default();
        Err(JournalError::Write { path: self.path.clone(), count, first })
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // Closing the channel makes the writer commit what is queued and exit.
        self.tx = None;
        if let Some(writer) = self.writer.take() {
            // A panicked writer has nothing left to commit; its records are counted as lost already
            // or were never acknowledged by a flush.
            let _ = writer.join();
        }
    }
}

/// Iterator returned by [`Journal::results`].
pub struct JournalResults {
    path: PathBuf,
    reader: Arc<Mutex<Connection>>,
    page: VecDeque<(u64, String, String)>,
    after: Option<(i64, String)>,
    done: bool,
    pending_error: Option<JournalError>,
}

impl JournalResults {
    fn fetch_page(&mut self) -> Result<(), rusqlite::Error> {
        let reader = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
        let map = |r: &rusqlite::Row<'_>| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?));
        // Keyset paging on (idx, job_id): each page is an index range scan, never an OFFSET rescan.
        let rows: Vec<(u64, String, String)> = match &self.after {
            None => reader
                .prepare_cached("SELECT idx, job_id, result FROM results ORDER BY idx, job_id LIMIT ?1")?
                .query_map([RESULTS_PAGE as i64], map)?
                .collect::<Result<_, _>>()?,
            Some((idx, id)) => reader
                .prepare_cached(
                    "SELECT idx, job_id, result FROM results WHERE (idx, job_id) > (?1, ?2)
                     ORDER BY idx, job_id LIMIT ?3",
                )?
                .query_map(params![idx, id, RESULTS_PAGE as i64], map)?
                .collect::<Result<_, _>>()?,
        };
        if rows.len() < RESULTS_PAGE {
            self.done = true;
        }
        if let Some((idx, id, _)) = rows.last() {
            self.after = Some((*idx as i64, id.clone()));
        }
        self.page.extend(rows);
        Ok(())
    }
}

impl Iterator for JournalResults {
    type Item = Result<(u64, String), JournalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(err) = self.pending_error.take() {
            self.done = true;
            return Some(Err(err));
        }
        if self.page.is_empty() && !self.done {
            if let Err(source) = self.fetch_page() {
                self.done = true;
                return Some(Err(JournalError::Read { path: self.path.clone(), source }));
            }
        }
        self.page.pop_front().map(|(idx, _, result)| Ok((idx, result)))
    }
}

fn connect(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

fn init_schema(conn: &mut Connection, path: &Path, fingerprint: &str, force: bool) -> Result<(), JournalError> {
    let open_err = |e: rusqlite::Error| JournalError::Open { path: path.to_path_buf(), reason: e.to_string() };
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(open_err)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS jobs(job_id TEXT PRIMARY KEY NOT NULL, idx INTEGER NOT NULL, input TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS checkpoints(
             job_id TEXT PRIMARY KEY NOT NULL, turn INTEGER NOT NULL, state TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS results(job_id TEXT PRIMARY KEY NOT NULL, idx INTEGER NOT NULL, result TEXT NOT NULL);
         CREATE INDEX IF NOT EXISTS results_idx ON results(idx, job_id);
         CREATE TABLE IF NOT EXISTS provider_batches(
             batch_id TEXT PRIMARY KEY NOT NULL, api TEXT NOT NULL, custom_ids TEXT NOT NULL,
             ended INTEGER NOT NULL DEFAULT 0);",
    )
    .map_err(open_err)?;
    let meta = |key: &str| -> Result<Option<String>, JournalError> {
        tx.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional().map_err(open_err)
    };
    match meta("schema_version")? {
        Some(found) if found != SCHEMA_VERSION => {
            return Err(JournalError::Version { path: path.to_path_buf(), found });
        }
        Some(_) => {}
        None => {
            tx.execute("INSERT INTO meta(key, value) VALUES('schema_version', ?1)", [SCHEMA_VERSION])
                .map_err(open_err)?;
        }
    }
    match meta("fingerprint")? {
        Some(stored) if stored == fingerprint => {}
        Some(stored) if !force => {
            return Err(JournalError::Mismatch { path: path.to_path_buf(), stored, given: fingerprint.to_owned() });
        }
        _ => {
            tx.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('fingerprint', ?1)", [fingerprint])
                .map_err(open_err)?;
        }
    }
    tx.commit().map_err(open_err)
}

async fn write_loop(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Op>,
    shared: &Shared,
    before_commit: Option<&(dyn Fn() + Send)>,
) {
    let mut group: Vec<Op> = Vec::with_capacity(GROUP_MAX);
    let mut acks: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        let mut closed = false;
        match rx.recv().await {
            Some(Op::Flush(ack)) => acks.push(ack),
            Some(op) => {
                group.push(op);
                let deadline = Instant::now() + GROUP_WINDOW;
                while group.len() < GROUP_MAX {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(Op::Flush(ack))) => {
                            acks.push(ack);
                            break;
                        }
                        Ok(Some(op)) => group.push(op),
                        Err(_elapsed) => break,
                        Ok(None) => {
                            closed = true;
                            break;
                        }
                    }
                }
            }
            None => closed = true,
        }
        if !group.is_empty() {
            if let Some(hook) = before_commit {
                hook();
            }
            commit_group(&mut conn, &mut group, shared);
        }
        for ack in acks.drain(..) {
            // The flusher may have given up waiting; nothing to tell it then.
            let _ = ack.send(());
        }
        if closed {
            break;
        }
    }
    // Fold the WAL back into the database on a clean close; a crash leaves it for the next open.
    let _ = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
}

fn commit_group(conn: &mut Connection, group: &mut Vec<Op>, shared: &Shared) {
    let records = group.len() as u64;
    let tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => {
            group.clear();
            shared.write_failed(records, &e);
            return;
        }
    };
    let (mut started, mut finished, mut turns) = (0u64, 0u64, 0u64);
    for op in group.drain(..) {
        let applied = apply(&tx, &op);
        match (applied, &op) {
            (Ok(_), Op::Start { .. }) => started += 1,
            (Ok(true), Op::Result { .. }) => finished += 1,
            (Ok(_), Op::Turn { .. }) => turns += 1,
            (Ok(_), _) => {}
            (Err(e), _) => shared.write_failed(1, &e),
        }
    }
    match tx.commit() {
        Ok(()) => {
            shared.started.fetch_add(started, Ordering::Relaxed);
            shared.finished.fetch_add(finished, Ordering::Relaxed);
            shared.turns.fetch_add(turns, Ordering::Relaxed);
        }
        Err(e) => shared.write_failed(started + finished + turns, &e),
    }
}

/// Applies one record; `Ok(false)` for a result the table already held.
fn apply(tx: &Transaction<'_>, op: &Op) -> Result<bool, rusqlite::Error> {
    match op {
        Op::Start { job_id, index, input_json } => {
            tx.prepare_cached(
                "INSERT INTO jobs(job_id, idx, input) VALUES(?1, ?2, ?3)
                 ON CONFLICT(job_id) DO UPDATE SET idx = excluded.idx, input = excluded.input",
            )?
            .execute(params![job_id, *index as i64, input_json])?;
            Ok(true)
        }
        Op::Turn { job_id, turn, state_json } => {
            tx.prepare_cached(
                "INSERT INTO checkpoints(job_id, turn, state) VALUES(?1, ?2, ?3)
                 ON CONFLICT(job_id) DO UPDATE SET turn = excluded.turn, state = excluded.state
                 WHERE excluded.turn >= checkpoints.turn",
            )?
            .execute(params![job_id, turn, state_json])?;
            Ok(true)
        }
        Op::Batch { batch_id, api, custom_ids_json } => {
            tx.prepare_cached(
                "INSERT INTO provider_batches(batch_id, api, custom_ids) VALUES(?1, ?2, ?3)
                 ON CONFLICT(batch_id) DO NOTHING",
            )?
            .execute(params![batch_id, api, custom_ids_json])?;
            Ok(true)
        }
        Op::BatchEnded { batch_id } => {
            tx.prepare_cached("UPDATE provider_batches SET ended = 1 WHERE batch_id = ?1")?.execute([batch_id])?;
            Ok(true)
        }
        Op::Result { job_id, index, result_json } => {
            let inserted = tx
                .prepare_cached("INSERT OR IGNORE INTO results(job_id, idx, result) VALUES(?1, ?2, ?3)")?
                .execute(params![job_id, *index as i64, result_json])?;
            if inserted == 1 {
                // A finished job never resumes: its turn state is dead weight.
                tx.prepare_cached("DELETE FROM checkpoints WHERE job_id = ?1")?.execute([job_id])?;
            }
            Ok(inserted == 1)
        }
        Op::Meta { key, value } => {
            tx.prepare_cached("INSERT OR REPLACE INTO meta(key, value) VALUES(?1, ?2)")?.execute([key, value])?;
            Ok(true)
        }
        Op::Flush(_) => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ba-journal-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("j.sqlite")
    }

    #[test]
    fn later_turn_wins_and_result_clears_checkpoint() {
        let path = temp("turns");
        let j = Journal::open(&path, "fp", false).unwrap();
        j.record_start("a", 0, "{}");
        j.record_turn("a", 2, "[2]");
        j.record_turn("a", 1, "[1]");
        j.flush().unwrap();
        assert_eq!(j.checkpoint("a", 0), Some(Checkpoint { turn: 2, state_json: "[2]".into() }));
        assert_eq!(j.checkpoint("a", 5), None, "index mismatch means other input");
        assert!(j.record_result("a", 0, "{\"ok\":true}"));
        j.flush().unwrap();
        assert_eq!(j.checkpoint("a", 0), None);
        let stats = j.stats();
        assert_eq!((stats.jobs_started, stats.turns_written, stats.jobs_finished), (1, 2, 1));
    }

    #[test]
    fn write_failures_are_counted_and_returned_by_flush() {
        let path = temp("full");
        drop(Journal::open(&path, "fp", false).unwrap());
        // A page cap at the current size makes every growing write fail with SQLITE_FULL, as a
        // full disk would.
        let cap = |c: &Connection| {
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            c.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
        };
        let j = Journal::open_with(&path, "fp", false, WriterOptions { configure: &cap, ..WriterOptions::default() })
            .unwrap();
        let big = "x".repeat(64 * 1024);
        assert!(j.record_result("a", 0, &big));
        let err = j.flush().unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, JournalError::Write { count: 1, .. }), "{message}");
        assert!(message.contains("full"), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
        let stats = j.stats();
        assert_eq!(stats.write_errors, 1);
        assert_eq!(stats.jobs_finished, 0);
        assert!(stats.first_write_error.is_some());
        assert!(j.flush().is_err(), "the error stays");
    }

    #[test]
    fn meta_and_checkpoints_read_back_in_index_order() {
        let path = temp("meta");
        let j = Journal::open(&path, "fp", false).unwrap();
        j.record_meta("population", "{\"tick\":3}");
        for (id, index) in [("b", 1), ("a", 0), ("c", 2)] {
            j.record_start(id, index, "{}");
            j.record_turn(id, 3, &format!("[{index}]"));
        }
        assert!(j.record_result("c", 2, "{}"));
        j.flush().unwrap();
        assert_eq!(j.meta("population").unwrap().as_deref(), Some("{\"tick\":3}"));
        assert_eq!(j.meta("absent").unwrap(), None);
        let rows = j.checkpoints().unwrap();
        let ids: Vec<_> = rows.iter().map(|(id, index, c)| (id.as_str(), *index, c.state_json.as_str())).collect();
        assert_eq!(ids, vec![("a", 0, "[0]"), ("b", 1, "[1]")], "finished jobs have no checkpoint");
    }

    #[test]
    fn force_adopts_new_fingerprint() {
        let path = temp("force");
        drop(Journal::open(&path, "one", false).unwrap());
        assert!(matches!(Journal::open(&path, "two", false), Err(JournalError::Mismatch { .. })));
        drop(Journal::open(&path, "two", true).unwrap());
        assert!(Journal::open(&path, "two", false).is_ok());
    }
}
