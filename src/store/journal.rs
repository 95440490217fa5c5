//! The run journal: one SQLite file (WAL) per run holding each job's input, its last durable turn
//! and its final result, so a resumed run skips finished jobs, restarts unfinished ones from their
//! last turn and writes each result exactly once.
//!
//! Checkpoints are stored as block-hash diffs ([`crate::diff`]): a `blocks` table holds each block
//! once by hash, and a checkpoint row holds the manifest (the segment hashes). The writer thread
//! counts references to every block in memory, so a block dies (its row is deleted) in the same
//! transaction as the last checkpoint that used it: the file holds the live checkpoints' blocks,
//! never the history of finished jobs. Schema 1 journals (whole JSON states) are read as they are
//! and upgraded in place; setting `BATCHAGENT_JOURNAL_CHECKPOINTS=full` writes whole states again
//! (to compare sizes, or to read checkpoints with the `sqlite3` shell).
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

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::cache::hash128;
use crate::diff::{self, BlockHash, BlockKind, BlockStore, DiffError};

/// Most records committed in one transaction.
pub const GROUP_MAX: usize = 4096;
/// Longest a record waits in memory before its group is committed.
pub const GROUP_WINDOW: Duration = Duration::from_millis(20);
/// Records queued for the writer before `record_*` calls wait (back-pressure keeps memory flat
/// when the disk is slower than the run).
pub const QUEUE_CAPACITY: usize = 4 * GROUP_MAX;
/// Rows fetched per page by [`Journal::results`].
const RESULTS_PAGE: usize = 512;
const SCHEMA_VERSION: &str = "2";
/// Journals of this version are read as they are (their checkpoints are whole JSON states, which
/// schema 2 still reads) and marked as version 2 when opened.
const UPGRADABLE_VERSION: &str = "1";
/// Set to `full` to store whole JSON states instead of block diffs (`diff`, the default).
pub const CHECKPOINTS_ENV: &str = "BATCHAGENT_JOURNAL_CHECKPOINTS";

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: cannot open: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error(
        "journal {path} belongs to a different batch (its settings fingerprint is {stored}, this run's is \
         {given}); use another journal file, or force reuse to continue anyway"
    )]
    Mismatch { path: PathBuf, stored: String, given: String },
    #[error(
        "journal {path}: schema version {found} is not supported (this version reads {UPGRADABLE_VERSION} and \
         {SCHEMA_VERSION}); finish the run with the batchagent that wrote it, or use a new journal file"
    )]
    Version { path: PathBuf, found: String },
    #[error("journal {path}: {count} write(s) failed, first: {first}")]
    Write { path: PathBuf, count: u64, first: String },
    #[error("journal {path}: reading: {source}")]
    Read { path: PathBuf, source: rusqlite::Error },
    #[error("journal {path}: checkpoint of job {job_id} cannot be read: {source}")]
    Checkpoint { path: PathBuf, job_id: String, source: DiffError },
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
    /// Bytes of the turn states given to the journal (what whole-state checkpoints would write).
    pub checkpoint_bytes: u64,
    /// Bytes those checkpoints carried once encoded: manifests and new blocks with their hashes
    /// (with `BATCHAGENT_JOURNAL_CHECKPOINTS=full`, the states themselves).
    pub checkpoint_encoded_bytes: u64,
    /// Blocks written (new to the journal), and blocks deleted with the last checkpoint using them.
    pub blocks_written: u64,
    pub blocks_deleted: u64,
}

/// How checkpoints are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// A manifest of block hashes, blocks stored once in the `blocks` table.
    Diff,
    /// The whole JSON state in the checkpoint row (schema 1's format).
    Full,
}

impl CheckpointFormat {
    /// The format set by [`CHECKPOINTS_ENV`] (`diff` when unset).
    pub fn from_env() -> Result<CheckpointFormat, String> {
        match std::env::var(CHECKPOINTS_ENV) {
            Err(std::env::VarError::NotPresent) => Ok(CheckpointFormat::Diff),
            Ok(value) if value == "diff" => Ok(CheckpointFormat::Diff),
            Ok(value) if value == "full" => Ok(CheckpointFormat::Full),
            Ok(value) => Err(format!("{CHECKPOINTS_ENV}={value:?} is not one of \"diff\", \"full\"")),
            Err(e) => Err(format!("{CHECKPOINTS_ENV}: {e}")),
        }
    }
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
    /// `None`: as [`CheckpointFormat::from_env`] says.
    pub format: Option<CheckpointFormat>,
}

impl Default for WriterOptions<'_> {
    fn default() -> Self {
        Self { configure: &|_| Ok(()), capacity: QUEUE_CAPACITY, before_commit: None, format: None }
    }
}

#[derive(Default)]
struct Shared {
    started: AtomicU64,
    finished: AtomicU64,
    turns: AtomicU64,
    write_errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    checkpoint_bytes: AtomicU64,
    checkpoint_encoded_bytes: AtomicU64,
    blocks_written: AtomicU64,
    blocks_deleted: AtomicU64,
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
        let format = match options.format {
            Some(format) => format,
            None => CheckpointFormat::from_env().map_err(open_err)?,
        };
        init_schema(&mut conn, path, fingerprint, force)?;
        let mut blocks = BlockRefs::default();
        // Counts the live checkpoints' blocks, and deletes blocks no checkpoint uses (none unless
        // a write failed half-way through a record).
        blocks.rebuild(&mut conn).map_err(|e| open_err(format!("counting checkpoint blocks: {e}")))?;

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
                .spawn(move || {
                    let writer = Writer { conn, blocks, format, shared: &shared };
                    clock.block_on(write_loop(writer, rx, before_commit.as_deref()));
                })
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
        // One read transaction: the writer may replace the checkpoint (and delete its blocks)
        // between the row and its blocks otherwise.
        let found = reader.unchecked_transaction().map_err(CheckpointReadError::from).and_then(|tx| {
            let row = tx
                .prepare_cached(
                    "SELECT c.turn, c.state FROM checkpoints c JOIN jobs j ON j.job_id = c.job_id
                     WHERE c.job_id = ?1 AND j.idx = ?2
                       AND NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = ?1)",
                )
                .and_then(|mut stmt| {
                    stmt.query_row(params![job_id, index as i64], |r| Ok((r.get::<_, u32>(0)?, stored_state(r, 1)?)))
                        .optional()
                })?;
            row.map(|(turn, state)| Ok(Checkpoint { turn, state_json: state.decode(&tx)? })).transpose()
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
        let read_err = |source| JournalError::Read { path: self.path.clone(), source };
        let tx = reader.unchecked_transaction().map_err(read_err)?;
        let rows = {
            let mut stmt = tx
                .prepare(
                    "SELECT c.job_id, j.idx, c.turn, c.state FROM checkpoints c JOIN jobs j ON j.job_id = c.job_id
                     WHERE NOT EXISTS (SELECT 1 FROM results r WHERE r.job_id = c.job_id)
                     ORDER BY j.idx, c.job_id",
                )
                .map_err(read_err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64, r.get::<_, u32>(2)?, stored_state(r, 3)?))
                })
                .map_err(read_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(read_err)?
        };
        rows.into_iter()
            .map(|(job_id, index, turn, state)| match state.decode(&tx) {
                Ok(state_json) => Ok((job_id, index, Checkpoint { turn, state_json })),
                Err(CheckpointReadError::Sql(source)) => Err(read_err(source)),
                Err(CheckpointReadError::Diff(source)) => {
                    Err(JournalError::Checkpoint { path: self.path.clone(), job_id, source })
                }
            })
            .collect()
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
            checkpoint_bytes: self.shared.checkpoint_bytes.load(Ordering::Relaxed),
            checkpoint_encoded_bytes: self.shared.checkpoint_encoded_bytes.load(Ordering::Relaxed),
            blocks_written: self.shared.blocks_written.load(Ordering::Relaxed),
            blocks_deleted: self.shared.blocks_deleted.load(Ordering::Relaxed),
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
             job_id TEXT PRIMARY KEY NOT NULL, turn INTEGER NOT NULL, state NOT NULL);
         CREATE TABLE IF NOT EXISTS blocks(id INTEGER PRIMARY KEY, hash BLOB NOT NULL, data BLOB NOT NULL);
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
        Some(found) if found == SCHEMA_VERSION => {}
        // Schema 1 differs only in lacking the blocks table (created above): its checkpoints are
        // whole states, which are read as they are and replaced by diffs as their jobs go on.
        Some(found) if found != UPGRADABLE_VERSION => {
            return Err(JournalError::Version { path: path.to_path_buf(), found });
        }
        _ => {
            tx.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('schema_version', ?1)", [SCHEMA_VERSION])
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

/// A checkpoint row's state as stored: a whole JSON state (schema 1, or the `full` format) or a
/// manifest of block ids.
enum StoredState {
    Full(String),
    Diff(IdManifest),
}

/// A diff checkpoint as the journal stores it: the length of the state and its segments' row ids.
///
/// The journal's block rows are keyed by an increasing id, not by hash: new blocks are appended to
/// the end of the table (a few pages written per commit), where random hash keys would dirty a
/// page of the table per block and write more bytes than whole states do. The hashes stay in a
/// column, read into the writer's memory at open, and are checked again when a checkpoint is read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IdManifest {
    len: u64,
    segments: Vec<i64>,
}

const ID_MANIFEST_FORMAT: u8 = 2;

impl IdManifest {
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![ID_MANIFEST_FORMAT];
        put_varint(&mut out, self.len);
        for &id in &self.segments {
            put_varint(&mut out, id as u64);
        }
        out
    }

    fn from_bytes(bytes: &[u8]) -> Result<IdManifest, DiffError> {
        match bytes.split_first() {
            Some((&ID_MANIFEST_FORMAT, rest)) => {
                let mut values = varints(rest)?.into_iter();
                let len = values.next().ok_or_else(|| DiffError::Corrupt("empty manifest".into()))?;
                Ok(IdManifest { len, segments: values.map(|v| v as i64).collect() })
            }
            Some((format, _)) => Err(DiffError::Corrupt(format!("manifest format {format} is not supported"))),
            None => Err(DiffError::Corrupt("empty manifest".into())),
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn varints(mut bytes: &[u8]) -> Result<Vec<u64>, DiffError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let mut value = 0u64;
        let mut shift = 0u32;
        loop {
            let (&byte, rest) = bytes.split_first().ok_or_else(|| DiffError::Corrupt("a number cut short".into()))?;
            bytes = rest;
            if shift > 63 {
                return Err(DiffError::Corrupt("a number over 64 bits".into()));
            }
            value |= u64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
        out.push(value);
    }
    Ok(out)
}

#[derive(Debug)]
enum CheckpointReadError {
    Sql(rusqlite::Error),
    Diff(DiffError),
}

impl From<rusqlite::Error> for CheckpointReadError {
    fn from(e: rusqlite::Error) -> Self {
        CheckpointReadError::Sql(e)
    }
}

impl From<DiffError> for CheckpointReadError {
    fn from(e: DiffError) -> Self {
        CheckpointReadError::Diff(e)
    }
}

/// Column `index` of `row` as a [`StoredState`]: text is a whole state, a blob a manifest.
fn stored_state(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<StoredState> {
    match row.get_ref(index)? {
        ValueRef::Text(text) => Ok(StoredState::Full(String::from_utf8_lossy(text).into_owned())),
        ValueRef::Blob(blob) => IdManifest::from_bytes(blob)
            .map(StoredState::Diff)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Blob, Box::new(e))),
        other => Err(rusqlite::Error::InvalidColumnType(index, "state".into(), other.data_type())),
    }
}

impl StoredState {
    /// The JSON state. Each block is checked against its hash, each segment against its chunks'
    /// hashes, and the total against the manifest, so a damaged file gives an error, never other
    /// bytes. Call it inside a read transaction.
    fn decode(self, conn: &Connection) -> Result<String, CheckpointReadError> {
        let manifest = match self {
            StoredState::Full(state) => return Ok(state),
            StoredState::Diff(manifest) => manifest,
        };
        let bound = manifest.segments.len().saturating_mul(diff::SEGMENT_MAX * diff::CHUNK_MAX);
        let mut out = Vec::with_capacity((manifest.len as usize).min(bound));
        let mut stmt = conn.prepare_cached("SELECT hash, data FROM blocks WHERE id = ?1")?;
        let mut block = |id: i64| -> Result<(Vec<u8>, Vec<u8>), CheckpointReadError> {
            stmt.query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?
                .ok_or_else(|| DiffError::Corrupt(format!("block {id} is missing")).into())
        };
        for &segment in &manifest.segments {
            let (segment_hash, members) = block(segment)?;
            let mut hashes = Vec::new();
            for chunk in varints(&members)? {
                let (hash, data) = block(chunk as i64)?;
                if BlockHash::of(BlockKind::Chunk, &data).as_bytes() != hash.as_slice() {
                    return Err(DiffError::Corrupt(format!("block {chunk} does not match its hash")).into());
                }
                hashes.extend_from_slice(&hash);
                out.extend_from_slice(&data);
            }
            if BlockHash::of(BlockKind::Segment, &hashes).as_bytes() != segment_hash.as_slice() {
                return Err(DiffError::Corrupt(format!("segment {segment} does not match its hash")).into());
            }
        }
        if out.len() as u64 != manifest.len {
            return Err(
                DiffError::Corrupt(format!("decoded {} bytes, the manifest says {}", out.len(), manifest.len)).into()
            );
        }
        String::from_utf8(out).map_err(|_| DiffError::Corrupt("the decoded state is not UTF-8".into()).into())
    }
}

/// The writer's view of the `blocks` table: each block's row id by hash, and the references to each
/// row (segments are referenced by checkpoint manifests, chunks by segments). A row is in the table
/// exactly when it has references.
#[derive(Default)]
struct BlockRefs {
    ids: HashMap<BlockHash, i64>,
    refs: HashMap<i64, u32>,
}

impl BlockStore for BlockRefs {
    fn contains(&self, hash: &BlockHash) -> bool {
        self.ids.contains_key(hash)
    }

    fn get(&self, _hash: &BlockHash) -> Result<Option<Vec<u8>>, DiffError> {
        Err(DiffError::Store("the writer's block index holds no block bytes".into()))
    }
}

impl BlockRefs {
    /// Reads the ids and counts the references of the checkpoints on disk, and deletes
    /// unreferenced blocks.
    fn rebuild(&mut self, conn: &mut Connection) -> rusqlite::Result<()> {
        self.ids.clear();
        self.refs.clear();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let manifests: Vec<StoredState> = tx
            .prepare("SELECT state FROM checkpoints")?
            .query_map([], |r| stored_state(r, 0))?
            .collect::<Result<_, _>>()?;
        for state in manifests {
            let StoredState::Diff(manifest) = state else { continue };
            for segment in manifest.segments {
                let count = self.refs.entry(segment).or_insert(0);
                *count += 1;
                if *count > 1 {
                    continue;
                }
                let members: Option<Vec<u8>> = tx
                    .prepare_cached("SELECT data FROM blocks WHERE id = ?1")?
                    .query_row([segment], |r| r.get(0))
                    .optional()?;
                // A missing or damaged segment fails that checkpoint's decode, which restarts its job.
                for chunk in members.and_then(|m| varints(&m).ok()).unwrap_or_default() {
                    *self.refs.entry(chunk as i64).or_insert(0) += 1;
                }
            }
        }
        let stored: Vec<(i64, Vec<u8>)> = tx
            .prepare("SELECT id, hash FROM blocks")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (id, hash) in stored {
            match BlockHash::from_slice(&hash) {
                Some(hash) if self.refs.contains_key(&id) => {
                    self.ids.insert(hash, id);
                }
                _ => {
                    tx.prepare_cached("DELETE FROM blocks WHERE id = ?1")?.execute([id])?;
                }
            }
        }
        tx.commit()
    }

    /// Stores the blocks of `encoded` that are new and references its segments; returns the
    /// manifest to store.
    fn acquire(&mut self, tx: &Transaction<'_>, encoded: &diff::Encoded) -> rusqlite::Result<IdManifest> {
        // Chunks come before the segments that list them in `new_blocks`.
        for block in &encoded.new_blocks {
            let data = match block.kind {
                BlockKind::Chunk => block.data.clone(),
                BlockKind::Segment => {
                    let mut members = Vec::with_capacity(block.data.len() / 8);
                    for chunk in diff::segment_children(&block.data).unwrap_or_default() {
                        let id = self.ids.get(&chunk).copied().unwrap_or_default();
                        *self.refs.entry(id).or_insert(0) += 1;
                        put_varint(&mut members, id as u64);
                    }
                    members
                }
            };
            tx.prepare_cached("INSERT INTO blocks(hash, data) VALUES(?1, ?2)")?
                .execute(params![block.hash.as_bytes(), data])?;
            let id = tx.last_insert_rowid();
            self.ids.insert(block.hash, id);
            self.refs.entry(id).or_insert(0);
        }
        let mut segments = Vec::with_capacity(encoded.manifest.segments.len());
        for segment in &encoded.manifest.segments {
            let id = self.ids.get(segment).copied().unwrap_or_default();
            *self.refs.entry(id).or_insert(0) += 1;
            segments.push(id);
        }
        Ok(IdManifest { len: encoded.manifest.len, segments })
    }

    /// Drops one reference to each segment of `manifest`; deletes the blocks no longer referenced
    /// and returns how many.
    fn release(&mut self, tx: &Transaction<'_>, manifest: &IdManifest) -> rusqlite::Result<u64> {
        let mut deleted = 0;
        for &segment in &manifest.segments {
            let Some(members) = self.drop_ref(tx, segment)? else { continue };
            deleted += 1;
            for chunk in varints(&members).unwrap_or_default() {
                if self.drop_ref(tx, chunk as i64)?.is_some() {
                    deleted += 1;
                }
            }
        }
        Ok(deleted)
    }

    /// Takes one reference off block `id`; when that was the last, deletes the row and returns its data.
    fn drop_ref(&mut self, tx: &Transaction<'_>, id: i64) -> rusqlite::Result<Option<Vec<u8>>> {
        match self.refs.get_mut(&id) {
            Some(count) if *count > 1 => {
                *count -= 1;
                Ok(None)
            }
            Some(_) => {
                self.refs.remove(&id);
                let row: Option<(Vec<u8>, Vec<u8>)> = tx
                    .prepare_cached("DELETE FROM blocks WHERE id = ?1 RETURNING hash, data")?
                    .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let Some((hash, data)) = row else { return Ok(None) };
                if let Some(hash) = BlockHash::from_slice(&hash) {
                    self.ids.remove(&hash);
                }
                Ok(Some(data))
            }
            None => Ok(None),
        }
    }
}

/// What the writer thread owns.
struct Writer<'a> {
    conn: Connection,
    blocks: BlockRefs,
    format: CheckpointFormat,
    shared: &'a Shared,
}

/// Counters of one group, added to the shared ones once it is committed.
#[derive(Default)]
struct GroupCounts {
    started: u64,
    finished: u64,
    turns: u64,
    checkpoint_bytes: u64,
    encoded_bytes: u64,
    blocks_written: u64,
    blocks_deleted: u64,
}

async fn write_loop(mut writer: Writer<'_>, mut rx: mpsc::Receiver<Op>, before_commit: Option<&(dyn Fn() + Send)>) {
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
            writer.commit_group(&mut group);
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
    let _ = writer.conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
}

impl Writer<'_> {
    fn commit_group(&mut self, group: &mut Vec<Op>) {
        let records = group.len() as u64;
        let shared = self.shared;
        let tx = match self.conn.transaction() {
            Ok(tx) => tx,
            Err(e) => {
                group.clear();
                shared.write_failed(records, &e);
                return;
            }
        };
        let mut counts = GroupCounts::default();
        let mut failed = false;
        for op in group.drain(..) {
            let applied = apply(&tx, &op, &mut self.blocks, self.format, &mut counts);
            match (applied, &op) {
                (Ok(_), Op::Start { .. }) => counts.started += 1,
                (Ok(true), Op::Result { .. }) => counts.finished += 1,
                (Ok(_), Op::Turn { .. }) => counts.turns += 1,
                (Ok(_), _) => {}
                (Err(e), _) => {
                    failed = true;
                    shared.write_failed(1, &e);
                }
            }
        }
        match tx.commit() {
            Ok(()) => {
                shared.started.fetch_add(counts.started, Ordering::Relaxed);
                shared.finished.fetch_add(counts.finished, Ordering::Relaxed);
                shared.turns.fetch_add(counts.turns, Ordering::Relaxed);
                shared.checkpoint_bytes.fetch_add(counts.checkpoint_bytes, Ordering::Relaxed);
                shared.checkpoint_encoded_bytes.fetch_add(counts.encoded_bytes, Ordering::Relaxed);
                shared.blocks_written.fetch_add(counts.blocks_written, Ordering::Relaxed);
                shared.blocks_deleted.fetch_add(counts.blocks_deleted, Ordering::Relaxed);
            }
            Err(e) => {
                failed = true;
                shared.write_failed(counts.started + counts.finished + counts.turns, &e);
            }
        }
        if failed {
            // A record that failed half-way, or a group rolled back, leaves the counts ahead of
            // the file: count again from what is on disk (and drop blocks left unreferenced).
            if let Err(e) = self.blocks.rebuild(&mut self.conn) {
                shared.write_failed(0, &format!("recounting checkpoint blocks: {e}"));
            }
        }
    }
}

/// Applies one record; `Ok(false)` for a result the table already held.
fn apply(
    tx: &Transaction<'_>,
    op: &Op,
    blocks: &mut BlockRefs,
    format: CheckpointFormat,
    counts: &mut GroupCounts,
) -> Result<bool, rusqlite::Error> {
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
            let old = stored_checkpoint(tx, job_id)?;
            if old.as_ref().is_some_and(|(stored_turn, _)| stored_turn > turn) {
                return Ok(true);
            }
            // A turn recorded after the job's result (a late writer) would hold blocks forever.
            let finished = tx
                .prepare_cached("SELECT 1 FROM results WHERE job_id = ?1")?
                .query_row([job_id], |_| Ok(()))
                .optional()?;
            if finished.is_some() {
                return Ok(true);
            }
            counts.checkpoint_bytes += state_json.len() as u64;
            let upsert = "INSERT INTO checkpoints(job_id, turn, state) VALUES(?1, ?2, ?3)
                 ON CONFLICT(job_id) DO UPDATE SET turn = excluded.turn, state = excluded.state";
            match format {
                CheckpointFormat::Full => {
                    counts.encoded_bytes += state_json.len() as u64;
                    tx.prepare_cached(upsert)?.execute(params![job_id, turn, state_json])?;
                }
                CheckpointFormat::Diff => {
                    let encoded = diff::encode(state_json.as_bytes(), blocks);
                    counts.encoded_bytes += encoded.wire_len() as u64;
                    counts.blocks_written += encoded.new_blocks.len() as u64;
                    // Referenced before the old manifest is released, so blocks both use stay put.
                    let manifest = blocks.acquire(tx, &encoded)?;
                    tx.prepare_cached(upsert)?.execute(params![job_id, turn, manifest.to_bytes()])?;
                }
            }
            if let Some((_, Some(manifest))) = old {
                counts.blocks_deleted += blocks.release(tx, &manifest)?;
            }
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
                if let Some((_, Some(manifest))) = stored_checkpoint(tx, job_id)? {
                    tx.prepare_cached("DELETE FROM checkpoints WHERE job_id = ?1")?.execute([job_id])?;
                    counts.blocks_deleted += blocks.release(tx, &manifest)?;
                } else {
                    tx.prepare_cached("DELETE FROM checkpoints WHERE job_id = ?1")?.execute([job_id])?;
                }
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

/// The stored turn of `job_id` and, when its state is a diff, its manifest (a whole state is not read).
fn stored_checkpoint(tx: &Transaction<'_>, job_id: &str) -> rusqlite::Result<Option<(u32, Option<IdManifest>)>> {
    tx.prepare_cached(
        "SELECT turn, CASE WHEN typeof(state) = 'blob' THEN state END FROM checkpoints WHERE job_id = ?1",
    )?
    .query_row([job_id], |r| {
        let manifest =
            match r.get_ref(1)? {
                ValueRef::Blob(blob) => Some(IdManifest::from_bytes(blob).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Blob, Box::new(e))
                })?),
                _ => None,
            };
        Ok((r.get(0)?, manifest))
    })
    .optional()
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

    fn state(prompt: &str, agent: usize, turns: usize) -> String {
        let mut messages = vec![serde_json::json!({"role": "system", "content": prompt})];
        for turn in 0..turns {
            messages.push(serde_json::json!({"role": "assistant", "content": format!("agent {agent} turn {turn}")}));
        }
        serde_json::json!({"messages": messages, "turns": turns}).to_string()
    }

    fn block_rows(path: &Path) -> i64 {
        Connection::open(path).unwrap().query_row("SELECT count(*) FROM blocks", [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn shared_blocks_are_stored_once_and_die_with_the_last_checkpoint() {
        let path = temp("diff");
        let prompt: String = (0..2048).map(|i| format!("t{} ", i * 7919 % 4000)).collect::<Vec<_>>().concat();
        let j = Journal::open_with(
            &path,
            "fp",
            false,
            WriterOptions { format: Some(CheckpointFormat::Diff), ..WriterOptions::default() },
        )
        .unwrap();
        for agent in 0..50 {
            j.record_start(&format!("a{agent}"), agent as u64, "{}");
            for turn in 1..=3 {
                j.record_turn(&format!("a{agent}"), turn, &state(&prompt, agent, turn as usize));
            }
        }
        j.flush().unwrap();
        for agent in 0..50 {
            let got = j.checkpoint(&format!("a{agent}"), agent as u64).unwrap();
            assert_eq!(got, Checkpoint { turn: 3, state_json: state(&prompt, agent, 3) });
        }
        let stats = j.stats();
        assert!(
            stats.checkpoint_encoded_bytes * 10 < stats.checkpoint_bytes,
            "{} encoded of {} bytes",
            stats.checkpoint_encoded_bytes,
            stats.checkpoint_bytes
        );
        // The prompt's blocks once, then each agent's own turns.
        let live = block_rows(&path);
        assert!(live < 2 * (prompt.len() / 48) as i64 + 50 * 20, "{live} blocks");
        for agent in 0..50 {
            assert!(j.record_result(&format!("a{agent}"), agent as u64, "{}"));
        }
        j.flush().unwrap();
        assert_eq!(block_rows(&path), 0, "finished jobs leave no blocks");
        assert_eq!(j.stats().blocks_written, j.stats().blocks_deleted);
    }

    #[test]
    fn counts_survive_reopening_and_whole_states_stay_readable() {
        let path = temp("reopen");
        let prompt = "shared system prompt ".repeat(300);
        let full = WriterOptions { format: Some(CheckpointFormat::Full), ..WriterOptions::default() };
        let j = Journal::open_with(&path, "fp", false, full).unwrap();
        j.record_start("a", 0, "{}");
        j.record_turn("a", 1, &state(&prompt, 0, 1));
        drop(j);
        let diff = || WriterOptions { format: Some(CheckpointFormat::Diff), ..WriterOptions::default() };
        let j = Journal::open_with(&path, "fp", false, diff()).unwrap();
        assert_eq!(j.checkpoint("a", 0).unwrap().state_json, state(&prompt, 0, 1), "a whole state is read as it is");
        j.record_turn("a", 2, &state(&prompt, 0, 2));
        j.record_start("b", 1, "{}");
        j.record_turn("b", 1, &state(&prompt, 1, 1));
        drop(j);
        let j = Journal::open_with(&path, "fp", false, diff()).unwrap();
        // Counted again at open: finishing one job keeps the blocks the other still uses.
        assert!(j.record_result("a", 0, "{}"));
        j.flush().unwrap();
        assert_eq!(j.checkpoint("b", 1).unwrap().state_json, state(&prompt, 1, 1));
        assert!(j.record_result("b", 1, "{}"));
        j.flush().unwrap();
        assert_eq!(block_rows(&path), 0);
    }

    #[test]
    fn schema_1_is_upgraded_and_unknown_versions_are_refused() {
        let path = temp("v1");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE meta(key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL);
                 CREATE TABLE jobs(job_id TEXT PRIMARY KEY NOT NULL, idx INTEGER NOT NULL, input TEXT NOT NULL);
                 CREATE TABLE checkpoints(job_id TEXT PRIMARY KEY NOT NULL, turn INTEGER NOT NULL, state TEXT NOT NULL);
                 CREATE TABLE results(job_id TEXT PRIMARY KEY NOT NULL, idx INTEGER NOT NULL, result TEXT NOT NULL);
                 INSERT INTO meta VALUES('schema_version', '1'), ('fingerprint', 'fp');
                 INSERT INTO jobs VALUES('a', 0, '{}');
                 INSERT INTO checkpoints VALUES('a', 4, '{\"old\":true}');",
            )
            .unwrap();
        }
        let j = Journal::open(&path, "fp", false).unwrap();
        assert_eq!(j.checkpoint("a", 0), Some(Checkpoint { turn: 4, state_json: "{\"old\":true}".into() }));
        j.record_turn("a", 5, &"{\"new\":1}".repeat(40));
        j.flush().unwrap();
        assert_eq!(j.checkpoint("a", 0).unwrap().state_json, "{\"new\":1}".repeat(40));
        assert_eq!(j.meta("schema_version").unwrap().as_deref(), Some("2"));
        drop(j);
        Connection::open(&path)
            .unwrap()
            .execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'", [])
            .unwrap();
        let err = Journal::open(&path, "fp", false).err().unwrap();
        assert!(matches!(err, JournalError::Version { .. }), "{err}");
        assert!(err.to_string().contains("schema version 7"), "{err}");
    }

    #[test]
    fn a_damaged_block_restarts_the_job_instead_of_resuming_other_bytes() {
        let path = temp("damaged");
        let j = Journal::open_with(
            &path,
            "fp",
            false,
            WriterOptions { format: Some(CheckpointFormat::Diff), ..WriterOptions::default() },
        )
        .unwrap();
        j.record_start("a", 0, "{}");
        j.record_turn("a", 1, &state("prompt ", 0, 3));
        j.flush().unwrap();
        Connection::open(&path).unwrap().execute("UPDATE blocks SET data = x'00'", []).unwrap();
        assert_eq!(j.checkpoint("a", 0), None);
        assert_eq!(j.stats().read_errors, 1);
        assert!(matches!(j.checkpoints(), Err(JournalError::Checkpoint { .. })));
    }
}
