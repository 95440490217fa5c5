//! A worker's side of a run: jobs read from the stream with XREADGROUP (and taken over with
//! XAUTOCLAIM once another worker's lease ran out) are handed to the scheduler, resumed from their
//! last checkpointed turn; each finished turn is checkpointed; each result is written by job id and
//! its entry acknowledged in one script, so a job never has two results and a job whose result is
//! written is never run again. While a job runs its lease is renewed, with the worker's heartbeat.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, Notify};

use super::connection::{Connection, FleetError};
use super::queue::RunKeys;
use super::semaphore::FleetSemaphore;
use super::{now_ms, GROUP};
use crate::diff::{self, BlockHash, BlockStore, DiffError, Manifest, MemoryBlockStore};
use crate::scheduler::agent::{AgentState, Job, JobResult, TurnSink};
use crate::scheduler::feed::bad_input;

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub run_id: String,
    /// This worker's consumer name: unique among the run's workers.
    pub consumer: String,
    /// A job not renewed for this long is taken over by another worker.
    pub lease: Duration,
    /// Jobs held at once: the dispatch window plus a few read ahead.
    pub capacity: usize,
    /// How long Redis may be unreachable before the worker gives up.
    pub outage: Duration,
}

/// Writes a batch of results: `KEYS` results, counts, checkpoints, jobs, done, meta, blocks;
/// `ARGV` group, consumer, then (job id, entry id, ok, result JSON) per result. A job that has a
/// result already keeps it; its entry is acknowledged either way. Once every input of the run has
/// a result, no checkpoint is read again: the blocks go. Returns the results written.
const COMMIT: &str = r"
local written = 0
for i = 3, #ARGV, 4 do
  local job, entry, ok, json = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('HSETNX', KEYS[1], job, json) == 1 then
    redis.call('HINCRBY', KEYS[2], ok == '1' and 'done' or 'failed', 1)
    redis.call('HINCRBY', KEYS[2], 'by:' .. ARGV[2], 1)
    redis.call('XADD', KEYS[5], '*', 'id', job)
    written = written + 1
  end
  redis.call('HDEL', KEYS[3], job)
  if entry ~= '' then
    redis.call('XACK', KEYS[4], ARGV[1], entry)
  end
end
local total = tonumber(redis.call('HGET', KEYS[6], 'total') or '')
if total then
  local finished = tonumber(redis.call('HGET', KEYS[2], 'done') or '0')
    + tonumber(redis.call('HGET', KEYS[2], 'failed') or '0')
  if finished >= total then redis.call('DEL', KEYS[7]) end
end
return written
";

/// How a worker writes checkpoints: set by [`CHECKPOINTS_ENV`], `diff` when unset.
pub const CHECKPOINTS_ENV: &str = "BATCHAGENT_FLEET_CHECKPOINTS";

/// Block hashes a worker remembers as stored; past this many it forgets them all (and sends
/// again the blocks it next meets, which Redis already holds: correct, a little more traffic).
const KNOWN_MAX: usize = 1 << 20;

/// The blocks a worker knows the run's block hash holds: what [`diff::encode`] leaves out.
struct KnownBlocks<'a>(&'a HashSet<BlockHash>);

impl BlockStore for KnownBlocks<'_> {
    fn contains(&self, hash: &BlockHash) -> bool {
        self.0.contains(hash)
    }

    fn get(&self, _hash: &BlockHash) -> Result<Option<Vec<u8>>, DiffError> {
        Ok(None)
    }
}

/// Heartbeats and lease renewals happen this often at most (more often for short leases).
const BEAT: Duration = Duration::from_secs(1);

/// How long one blocking read waits for new entries before the worker looks at claims again.
const READ_BLOCK_MS: u64 = 250;

pub struct FleetWorker {
    conn: Connection,
    /// A connection of its own for blocking reads: a blocked command holds up every reply after it.
    reader: Connection,
    pub keys: RunKeys,
    options: WorkerOptions,
    /// Job id -> stream entry id, from the read until the result is written.
    held: Mutex<HashMap<String, String>>,
    room: Notify,
    stopped: AtomicBool,
    stop: Notify,
    started_ms: u64,
    results: AtomicU64,
    commit: redis::Script,
    semaphore: Mutex<Option<Arc<FleetSemaphore>>>,
    /// Checkpoints as block-hash diffs (`false`: whole states, `BATCHAGENT_FLEET_CHECKPOINTS=full`).
    diff: bool,
    /// Blocks this worker wrote to (or found in) the run's block hash.
    known: Mutex<HashSet<BlockHash>>,
}

impl FleetWorker {
    pub async fn connect(url: &str, options: WorkerOptions) -> Result<Arc<Self>, FleetError> {
        let conn = Connection::open(url, options.outage, Some(Duration::from_secs(30))).await?;
        let reader = Connection::open(url, options.outage, None).await?;
        let keys = RunKeys::new(&options.run_id);
        let exists: bool = conn.query(redis::cmd("EXISTS").arg(&keys.meta)).await?;
        if !exists {
            return Err(FleetError::NoSuchRun(options.run_id.clone()));
        }
        let diff = match std::env::var(CHECKPOINTS_ENV) {
            Err(std::env::VarError::NotPresent) => true,
            Ok(value) if value == "diff" => true,
            Ok(value) if value == "full" => false,
            Ok(value) => {
                return Err(FleetError::Protocol(format!(
                    "{CHECKPOINTS_ENV}={value:?} is not one of \"diff\", \"full\""
                )))
            }
            Err(e) => return Err(FleetError::Protocol(format!("{CHECKPOINTS_ENV}: {e}"))),
        };
        Ok(Arc::new(Self {
            conn,
            reader,
            keys,
            options,
            held: Mutex::default(),
            room: Notify::new(),
            stopped: AtomicBool::new(false),
            stop: Notify::new(),
            started_ms: now_ms(),
            results: AtomicU64::new(0),
            commit: redis::Script::new(COMMIT),
            semaphore: Mutex::default(),
            diff,
            known: Mutex::default(),
        }))
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The fleet-wide limit whose leases the heartbeat renews.
    pub fn set_semaphore(&self, semaphore: Arc<FleetSemaphore>) {
        if let Ok(mut slot) = self.semaphore.lock() {
            *slot = Some(semaphore);
        }
    }

    fn held_len(&self) -> usize {
        self.held.lock().map_or(0, |h| h.len())
    }

    /// Reads jobs into `jobs` until every input of the run has a result (or `stop`). Inputs that
    /// cannot be parsed become failed results on `results`.
    pub async fn feed(
        self: Arc<Self>,
        jobs: mpsc::Sender<Job>,
        results: mpsc::UnboundedSender<JobResult>,
    ) -> Result<(), FleetError> {
        let claim_every = (self.options.lease / 4).max(Duration::from_millis(100));
        let mut last_claim: Option<Instant> = None;
        let mut cursor = "0-0".to_owned();
        let lease_ms = self.options.lease.as_millis() as u64;
        while !self.stopped.load(Relaxed) {
            let free = self.options.capacity.saturating_sub(self.held_len());
            if free == 0 {
                tokio::select! {
                    () = self.room.notified() => {}
                    () = self.stop.notified() => break,
                }
                continue;
            }
            let mut entries = Vec::new();
            if last_claim.is_none_or(|t| t.elapsed() >= claim_every) {
                let reply: redis::streams::StreamAutoClaimReply = self
                    .conn
                    .query(
                        redis::cmd("XAUTOCLAIM")
                            .arg(&self.keys.jobs)
                            .arg(GROUP)
                            .arg(&self.options.consumer)
                            .arg(lease_ms)
                            .arg(&cursor)
                            .arg("COUNT")
                            .arg(free),
                    )
                    .await?;
                cursor = reply.next_stream_id;
                if cursor == "0-0" {
                    last_claim = Some(Instant::now());
                }
                // A late heartbeat lets this worker's own leases lapse, and XAUTOCLAIM then hands
                // its own running jobs back to it: they are running already, not to start again.
                let claimed = self.not_held(reply.claimed);
                if !claimed.is_empty() {
                    entries = self.resumable(claimed).await?;
                }
            }
            if entries.is_empty() {
                let reply: Option<redis::streams::StreamReadReply> = self
                    .reader
                    .query(
                        redis::cmd("XREADGROUP")
                            .arg("GROUP")
                            .arg(GROUP)
                            .arg(&self.options.consumer)
                            .arg("COUNT")
                            .arg(free)
                            .arg("BLOCK")
                            .arg(READ_BLOCK_MS)
                            .arg("STREAMS")
                            .arg(&self.keys.jobs)
                            .arg(">"),
                    )
                    .await?;
                let ids = reply.and_then(|r| r.keys.into_iter().next()).map(|k| k.ids).unwrap_or_default();
                entries = ids.into_iter().map(|e| (e, None)).collect();
            }
            if entries.is_empty() {
                if self.held_len() == 0 && self.finished().await? {
                    break;
                }
                continue;
            }
            for (entry, resume) in entries {
                match job_of(&entry, resume) {
                    Ok(job) => {
                        self.hold(&job.id, &entry.id);
                        if jobs.send(job).await.is_err() {
                            return Ok(());
                        }
                    }
                    Err((id, index, message)) => {
                        self.hold(&id, &entry.id);
                        let _ = results.send(bad_input(id, index, message));
                    }
                }
            }
        }
        Ok(())
    }

    fn hold(&self, job_id: &str, entry_id: &str) {
        if let Ok(mut held) = self.held.lock() {
            held.insert(job_id.to_owned(), entry_id.to_owned());
        }
    }

    /// Claimed entries with the checkpoint of each job that has one; counted for `status`.
    fn not_held(&self, claimed: Vec<redis::streams::StreamId>) -> Vec<redis::streams::StreamId> {
        let Ok(held) = self.held.lock() else { return claimed };
        let running: HashSet<&str> = held.values().map(String::as_str).collect();
        claimed.into_iter().filter(|e| !running.contains(e.id.as_str())).collect()
    }

    async fn resumable(
        &self,
        claimed: Vec<redis::streams::StreamId>,
    ) -> Result<Vec<(redis::streams::StreamId, Option<AgentState>)>, FleetError> {
        let ids: Vec<String> = claimed.iter().map(|e| e.get::<String>("id").unwrap_or_default()).collect();
        let stored: Vec<Option<Vec<u8>>> =
            self.conn.query(redis::cmd("HMGET").arg(&self.keys.checkpoints).arg(&ids)).await?;
        let texts = self.decode_checkpoints(stored).await?;
        // A checkpoint written by another version does not decode: that job starts over.
        let states: Vec<Option<AgentState>> =
            texts.into_iter().map(|s| s.and_then(|s| serde_json::from_slice(&s).ok())).collect();
        let resumed = states.iter().filter(|s| s.is_some()).count();
        let mut pipe = redis::pipe();
        pipe.cmd("HINCRBY").arg(&self.keys.counts).arg("claims").arg(claimed.len()).ignore();
        pipe.cmd("HINCRBY").arg(&self.keys.counts).arg("resumed").arg(resumed).ignore();
        self.conn.pipe::<()>(&pipe).await?;
        Ok(claimed.into_iter().zip(states).collect())
    }

    /// Whether every input of the run has its result.
    async fn finished(&self) -> Result<bool, FleetError> {
        let (total, done, failed): (Option<u64>, Option<u64>, Option<u64>) = self
            .conn
            .pipe(
                redis::pipe()
                    .cmd("HGET")
                    .arg(&self.keys.meta)
                    .arg("total")
                    .cmd("HGET")
                    .arg(&self.keys.counts)
                    .arg("done")
                    .cmd("HGET")
                    .arg(&self.keys.counts)
                    .arg("failed"),
            )
            .await?;
        Ok(total.is_some_and(|total| done.unwrap_or(0) + failed.unwrap_or(0) >= total))
    }

    /// Writes results (a job's first result only) and acknowledges their entries, in one script.
    pub async fn commit(&self, results: &[JobResult]) -> Result<u64, FleetError> {
        if results.is_empty() {
            return Ok(0);
        }
        let entries: Vec<String> = {
            let held = self.held.lock().map_err(|_| FleetError::Protocol("worker state poisoned".into()))?;
            results.iter().map(|r| held.get(&r.id).cloned().unwrap_or_default()).collect()
        };
        let mut invocation = self.commit.prepare_invoke();
        invocation
            .key(&self.keys.results)
            .key(&self.keys.counts)
            .key(&self.keys.checkpoints)
            .key(&self.keys.jobs)
            .key(&self.keys.done)
            .key(&self.keys.meta)
            .key(&self.keys.blocks)
            .arg(GROUP)
            .arg(&self.options.consumer);
        for (result, entry) in results.iter().zip(&entries) {
            let json = serde_json::to_string(result)
                .map_err(|e| FleetError::Protocol(format!("result of job {} cannot be encoded: {e}", result.id)))?;
            invocation.arg(&result.id).arg(entry).arg(if result.ok { "1" } else { "0" }).arg(json);
        }
        let written: u64 = self.conn.script(&invocation).await?;
        self.results.fetch_add(written, Relaxed);
        if let Ok(mut held) = self.held.lock() {
            for result in results {
                held.remove(&result.id);
            }
        }
        self.room.notify_one();
        Ok(written)
    }

    /// Checkpoints a job's state after a finished turn: a manifest of block hashes, written with
    /// the blocks this worker has not stored in the run before (one round trip); with
    /// `BATCHAGENT_FLEET_CHECKPOINTS=full`, the state itself.
    pub async fn checkpoint(&self, job_id: &str, state_json: &str) -> Result<(), FleetError> {
        if !self.diff {
            return self.conn.query(redis::cmd("HSET").arg(&self.keys.checkpoints).arg(job_id).arg(state_json)).await;
        }
        let encoded = {
            let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
            diff::encode(state_json.as_bytes(), &KnownBlocks(&known))
        };
        let mut pipe = redis::pipe();
        if !encoded.new_blocks.is_empty() {
            // A block's bytes never change for its hash: writing one again is harmless.
            let cmd = pipe.cmd("HSET").arg(&self.keys.blocks);
            for block in &encoded.new_blocks {
                cmd.arg(block.hash.as_bytes()).arg(&block.data);
            }
            cmd.ignore();
        }
        // After the blocks, on the same connection: no manifest is stored before its blocks.
        pipe.cmd("HSET").arg(&self.keys.checkpoints).arg(job_id).arg(encoded.manifest.to_bytes()).ignore();
        self.conn.pipe::<()>(&pipe).await?;
        // Known only once stored, so a checkpoint encoded meanwhile still sends them itself.
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        if known.len() + encoded.new_blocks.len() > KNOWN_MAX {
            known.clear();
        }
        known.extend(encoded.new_blocks.iter().map(|b| b.hash));
        Ok(())
    }

    /// The states stored checkpoints hold (whole JSON states, or manifests whose blocks are read
    /// in two round trips for all of them); `None` for one that is absent or does not decode.
    async fn decode_checkpoints(&self, stored: Vec<Option<Vec<u8>>>) -> Result<Vec<Option<Vec<u8>>>, FleetError> {
        let manifests: Vec<Option<Manifest>> = stored
            .iter()
            .map(|s| s.as_deref().filter(|b| b.first() != Some(&b'{')).and_then(|b| Manifest::from_bytes(b).ok()))
            .collect();
        let mut blocks = MemoryBlockStore::default();
        let segments: HashSet<BlockHash> =
            manifests.iter().flatten().flat_map(|m| m.segments.iter().copied()).collect();
        let chunks = self.fetch_blocks(segments.into_iter().collect(), &mut blocks).await?;
        let chunks: HashSet<BlockHash> =
            chunks.iter().filter_map(|(_, data)| diff::segment_children(data).ok()).flatten().collect();
        self.fetch_blocks(chunks.into_iter().collect(), &mut blocks).await?;
        Ok(stored
            .into_iter()
            .zip(manifests)
            .map(|(state, manifest)| match manifest {
                Some(manifest) => diff::decode(&manifest, &blocks).ok(),
                None => state.filter(|b| b.first() == Some(&b'{')),
            })
            .collect())
    }

    /// Reads `hashes` from the run's blocks into `into`; returns those found.
    async fn fetch_blocks(
        &self,
        hashes: Vec<BlockHash>,
        into: &mut MemoryBlockStore,
    ) -> Result<Vec<(BlockHash, Vec<u8>)>, FleetError> {
        if hashes.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&self.keys.blocks);
        for hash in &hashes {
            cmd.arg(hash.as_bytes());
        }
        let found: Vec<Option<Vec<u8>>> = self.conn.query(&cmd).await?;
        let found: Vec<(BlockHash, Vec<u8>)> =
            hashes.into_iter().zip(found).filter_map(|(hash, data)| data.map(|d| (hash, d))).collect();
        for (hash, data) in &found {
            into.insert(*hash, data.clone());
        }
        Ok(found)
    }

    /// Renews the leases of the jobs held and writes the heartbeat, every [`BEAT`] (or a third of
    /// the lease), until `stop`.
    pub async fn keep_alive(self: Arc<Self>) {
        let every = (self.options.lease / 3).min(BEAT).max(Duration::from_millis(50));
        loop {
            // A failed beat is retried at the next one; a worker cut off from Redis for longer
            // than its lease loses its jobs to others, and their results are written once anyway.
            let _ = self.beat(false).await;
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = self.stop.notified() => break,
            }
            if self.stopped.load(Relaxed) {
                break;
            }
        }
    }

    async fn beat(&self, stopped: bool) -> Result<(), FleetError> {
        let entries: Vec<String> = self.held.lock().map(|h| h.values().cloned().collect()).unwrap_or_default();
        let record = serde_json::json!({
            "beat_ms": now_ms(),
            "started_ms": self.started_ms,
            "host": hostname(),
            "pid": std::process::id(),
            "holding": entries.len(),
            "stopped": stopped,
        });
        let mut pipe = redis::pipe();
        pipe.cmd("HSET").arg(&self.keys.workers).arg(&self.options.consumer).arg(record.to_string()).ignore();
        if !entries.is_empty() {
            // Resets the entries' idle time: no other worker's XAUTOCLAIM takes them.
            pipe.cmd("XCLAIM")
                .arg(&self.keys.jobs)
                .arg(GROUP)
                .arg(&self.options.consumer)
                .arg(0)
                .arg(&entries)
                .arg("JUSTID")
                .ignore();
        }
        self.conn.pipe::<()>(&pipe).await?;
        let semaphore = self.semaphore.lock().ok().and_then(|s| s.clone());
        if let Some(semaphore) = semaphore {
            semaphore.renew().await?;
        }
        Ok(())
    }

    /// Stops reading and renewing; the last heartbeat says the worker stopped.
    pub async fn stop(&self) {
        self.stopped.store(true, Relaxed);
        self.stop.notify_waiters();
        self.room.notify_one();
        let _ = self.beat(true).await;
    }
}

/// A job from its stream entry, or `(id, index, why)` when the entry cannot be used.
fn job_of(entry: &redis::streams::StreamId, resume: Option<AgentState>) -> Result<Job, (String, u64, String)> {
    let id: String = entry.get("id").unwrap_or_else(|| entry.id.clone());
    let index: u64 = entry.get("i").unwrap_or(0);
    let input: String = entry.get("in").unwrap_or_default();
    let Ok(Value::Object(input)) = serde_json::from_str::<Value>(&input) else {
        return Err((id, index, format!("input {index}: the stream entry holds no JSON object")));
    };
    let extra_body = match entry.get::<String>("x") {
        None => None,
        Some(text) => match serde_json::from_str::<Map<String, Value>>(&text) {
            Ok(map) if map.is_empty() => None,
            Ok(map) => Some(Arc::new(map)),
            Err(e) => return Err((id, index, format!("input {index}: extra_body is not a JSON object: {e}"))),
        },
    };
    Ok(Job { id, index, input, resume, extra_body, keep_conversation: false })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

/// Checkpoints each finished turn in Redis.
pub struct FleetTurns(pub Arc<FleetWorker>);

impl TurnSink for FleetTurns {
    fn turn_done(&self, job_id: &str, state: &AgentState) -> BoxFuture<'static, ()> {
        let worker = Arc::clone(&self.0);
        let job_id = job_id.to_owned();
        let json = serde_json::to_string(state);
        Box::pin(async move {
            if let Ok(json) = json {
                // Awaited: the next turn is sent only once this one is durable. A checkpoint lost to
                // an outage longer than the worker waits costs a taken-over job a turn, not a result.
                let _ = worker.checkpoint(&job_id, &json).await;
            }
        })
    }
}
