//! The submitting and reading side of a run: creating it (spec stored once by fingerprint), adding
//! its inputs to the stream, its status, its results in input order or as they finish.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::connection::{Connection, FleetError};
use super::{now_ms, GROUP, PREFIX};

/// The keys of one run (see the module comment of [`crate::fleet`]).
#[derive(Debug, Clone)]
pub struct RunKeys {
    pub run_id: String,
    pub meta: String,
    pub jobs: String,
    pub results: String,
    pub done: String,
    pub checkpoints: String,
    /// The blocks of the checkpoints (hash: 16-byte block hash -> its bytes), shared by every job.
    pub blocks: String,
    pub counts: String,
    pub workers: String,
}

impl RunKeys {
    pub fn new(run_id: &str) -> Self {
        let base = format!("{PREFIX}run:{run_id}");
        Self {
            run_id: run_id.to_owned(),
            jobs: format!("{base}:jobs"),
            results: format!("{base}:results"),
            done: format!("{base}:done"),
            checkpoints: format!("{base}:checkpoints"),
            blocks: format!("{base}:blocks"),
            counts: format!("{base}:counts"),
            workers: format!("{base}:workers"),
            meta: base,
        }
    }
}

fn runs_key() -> String {
    format!("{PREFIX}runs")
}

fn spec_key(fingerprint: &str) -> String {
    format!("{PREFIX}spec:{fingerprint}")
}

/// A new run id: the submission time and a random part, so ids sort by time and never collide.
pub fn new_run_id() -> String {
    let random = crate::store::hash128(
        format!("{}-{:?}-{}", std::process::id(), std::time::Instant::now(), now_ms()).as_bytes(),
    );
    format!("{:x}-{:08x}", now_ms(), random as u32)
}

/// Creates a run: the spec (stored once per fingerprint), the run's record, its stream and
/// consumer group. Returns the run id.
pub async fn create_run(conn: &Connection, fingerprint: &str, spec_json: &str) -> Result<String, FleetError> {
    let run_id = new_run_id();
    let keys = RunKeys::new(&run_id);
    let mut pipe = redis::pipe();
    pipe.cmd("HSETNX").arg(spec_key(fingerprint)).arg("spec").arg(spec_json).ignore();
    pipe.cmd("HSET").arg(&keys.meta).arg("fingerprint").arg(fingerprint).arg("created_ms").arg(now_ms()).ignore();
    // MKSTREAM: the group exists before the first input, so no worker can miss one.
    pipe.cmd("XGROUP").arg("CREATE").arg(&keys.jobs).arg(GROUP).arg("0").arg("MKSTREAM").ignore();
    pipe.cmd("ZADD").arg(runs_key()).arg(now_ms()).arg(&run_id).ignore();
    conn.pipe::<()>(&pipe).await?;
    Ok(run_id)
}

/// An input on its way to the stream: job id, index, the input (a JSON object) and its
/// request-body fields, if any.
pub type Entry = (String, u64, String, Option<String>);

/// Adds inputs to the run's stream in one round trip. Entry ids are chosen here (`0-(index+1)`),
/// so adding the same inputs again after a lost reply is refused by Redis instead of duplicating
/// them: a retried batch can only fail for entries already there, which are skipped.
pub async fn add_jobs(conn: &Connection, keys: &RunKeys, entries: &[Entry]) -> Result<(), FleetError> {
    if entries.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for (id, index, input, extra) in entries {
        let cmd = pipe.cmd("XADD").arg(&keys.jobs).arg(format!("0-{}", index + 1));
        cmd.arg("id").arg(id).arg("i").arg(*index).arg("in").arg(input);
        if let Some(extra) = extra {
            cmd.arg("x").arg(extra);
        }
    }
    // Each reply is an id or an error ("equal or smaller than the target stream top item" for an
    // entry a lost reply had already added); either way the entry is on the stream.
    pipe.ignore_errors();
    let _: Vec<redis::Value> = conn.pipe(&pipe).await?;
    Ok(())
}

/// Marks a run's input complete: `total` inputs are on the stream.
pub async fn close_run(conn: &Connection, keys: &RunKeys, total: u64) -> Result<(), FleetError> {
    conn.query::<()>(redis::cmd("HSET").arg(&keys.meta).arg("total").arg(total)).await
}

/// The spec a run was submitted with: `(fingerprint, spec JSON)`.
pub async fn load_spec(conn: &Connection, keys: &RunKeys) -> Result<(String, String), FleetError> {
    let fingerprint: Option<String> = conn.query(redis::cmd("HGET").arg(&keys.meta).arg("fingerprint")).await?;
    let fingerprint = fingerprint.ok_or_else(|| FleetError::NoSuchRun(keys.run_id.clone()))?;
    let spec: Option<String> = conn.query(redis::cmd("HGET").arg(spec_key(&fingerprint)).arg("spec")).await?;
    let spec =
        spec.ok_or_else(|| FleetError::Protocol(format!("run {}: its spec {fingerprint} is missing", keys.run_id)))?;
    Ok((fingerprint, spec))
}

/// Runs not complete yet, oldest first.
pub async fn open_runs(conn: &Connection) -> Result<Vec<String>, FleetError> {
    let runs: Vec<String> = conn.query(redis::cmd("ZRANGE").arg(runs_key()).arg(0).arg(-1)).await?;
    let mut open = Vec::new();
    for run in runs {
        let keys = RunKeys::new(&run);
        let (total, done, failed): (Option<u64>, Option<u64>, Option<u64>) = conn
            .pipe(
                redis::pipe()
                    .cmd("HGET")
                    .arg(&keys.meta)
                    .arg("total")
                    .cmd("HGET")
                    .arg(&keys.counts)
                    .arg("done")
                    .cmd("HGET")
                    .arg(&keys.counts)
                    .arg("failed"),
            )
            .await?;
        let finished = done.unwrap_or(0) + failed.unwrap_or(0);
        if total.is_none_or(|total| finished < total) {
            open.push(run);
        }
    }
    Ok(open)
}

/// Records why a worker does not take a run (a tool it cannot import), for `status`.
pub async fn refuse(conn: &Connection, keys: &RunKeys, worker: &str, message: &str) -> Result<(), FleetError> {
    let record = serde_json::json!({"beat_ms": now_ms(), "refused": message});
    conn.query::<()>(redis::cmd("HSET").arg(&keys.workers).arg(worker).arg(record.to_string())).await
}

/// A worker as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerStatus {
    pub name: String,
    /// Seconds since its last heartbeat.
    pub last_seen_s: f64,
    pub alive: bool,
    /// Results it wrote (first writes only).
    pub results: u64,
    /// Jobs it holds now (pending entries).
    pub in_flight: u64,
    /// Its results per second since it started on the run.
    pub rate: Option<f64>,
    pub host: Option<String>,
    pub pid: Option<u64>,
    /// Why it refused the run, if it did.
    pub refused: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub run_id: String,
    /// Inputs on the stream once submission is complete; until then, those added so far.
    pub total: u64,
    pub submitted: bool,
    pub done: u64,
    pub failed: u64,
    pub in_flight: u64,
    pub queued: u64,
    /// Jobs taken over from a worker whose lease ran out, and of those, resumed from a checkpoint.
    pub claims: u64,
    pub resumed: u64,
    /// Results per second over the last 10 s, and over the whole run so far.
    pub rate: f64,
    pub rate_overall: Option<f64>,
    pub workers: Vec<WorkerStatus>,
}

/// A worker counts as alive while its last heartbeat is younger than this.
const ALIVE_MS: u64 = 15_000;

/// `status`'s pipeline: meta, counts, workers, stream length, pending summary, first and last
/// results, results of the last 10 s.
type StatusReply = (
    HashMap<String, String>,
    HashMap<String, String>,
    HashMap<String, String>,
    u64,
    redis::Value,
    redis::streams::StreamRangeReply,
    redis::streams::StreamRangeReply,
    redis::streams::StreamRangeReply,
);

pub async fn status(conn: &Connection, keys: &RunKeys) -> Result<Status, FleetError> {
    let now = now_ms();
    let mut pipe = redis::pipe();
    pipe.cmd("HGETALL").arg(&keys.meta);
    pipe.cmd("HGETALL").arg(&keys.counts);
    pipe.cmd("HGETALL").arg(&keys.workers);
    pipe.cmd("XLEN").arg(&keys.jobs);
    pipe.cmd("XPENDING").arg(&keys.jobs).arg(GROUP);
    pipe.cmd("XRANGE").arg(&keys.done).arg("-").arg("+").arg("COUNT").arg(1);
    pipe.cmd("XREVRANGE").arg(&keys.done).arg("+").arg("-").arg("COUNT").arg(1);
    pipe.cmd("XRANGE").arg(&keys.done).arg(now.saturating_sub(10_000)).arg("+").arg("COUNT").arg(1_000_000);
    let (meta, counts, workers, length, pending, first, last, recent): StatusReply = conn.pipe(&pipe).await?;
    if meta.is_empty() {
        return Err(FleetError::NoSuchRun(keys.run_id.clone()));
    }
    let count = |name: &str| counts.get(name).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let (in_flight, per_consumer) = pending_summary(pending);
    let total_field = meta.get("total").and_then(|v| v.parse::<u64>().ok());
    let (done, failed) = (count("done"), count("failed"));
    let total = total_field.unwrap_or(length);
    let entry_ms = |reply: &redis::streams::StreamRangeReply| {
        reply.ids.first().and_then(|e| e.id.split('-').next()).and_then(|ms| ms.parse::<u64>().ok())
    };
    let rate_overall = match (entry_ms(&first), entry_ms(&last)) {
        (Some(a), Some(b)) if b > a => Some((done + failed).saturating_sub(1) as f64 * 1000.0 / (b - a) as f64),
        _ => None,
    };
    let mut listed: Vec<WorkerStatus> = workers
        .into_iter()
        .map(|(name, json)| {
            let beat: Value = serde_json::from_str(&json).unwrap_or(Value::Null);
            let beat_ms = beat.get("beat_ms").and_then(Value::as_u64).unwrap_or(0);
            let started_ms = beat.get("started_ms").and_then(Value::as_u64);
            let results = count(&format!("by:{name}"));
            let rate = started_ms.filter(|&s| beat_ms > s).map(|s| results as f64 * 1000.0 / (beat_ms - s) as f64);
            let refused = beat.get("refused").and_then(Value::as_str).map(str::to_owned);
            WorkerStatus {
                last_seen_s: now.saturating_sub(beat_ms) as f64 / 1000.0,
                alive: refused.is_none()
                    && now.saturating_sub(beat_ms) < ALIVE_MS
                    && !beat.get("stopped").is_some_and(|s| s == true),
                results,
                in_flight: per_consumer.get(&name).copied().unwrap_or(0),
                rate,
                host: beat.get("host").and_then(Value::as_str).map(str::to_owned),
                pid: beat.get("pid").and_then(Value::as_u64),
                refused,
                name,
            }
        })
        .collect();
    listed.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Status {
        run_id: keys.run_id.clone(),
        total,
        submitted: total_field.is_some(),
        done,
        failed,
        in_flight,
        queued: total.saturating_sub(done + failed + in_flight),
        claims: count("claims"),
        resumed: count("resumed"),
        rate: recent.ids.len() as f64 / 10.0,
        rate_overall,
        workers: listed,
    })
}

/// `XPENDING key group` (summary form): the count, and the count per consumer.
fn pending_summary(value: redis::Value) -> (u64, HashMap<String, u64>) {
    let mut per = HashMap::new();
    let redis::Value::Array(items) = value else { return (0, per) };
    let total = items.first().and_then(|v| redis::from_redis_value_ref::<u64>(v).ok()).unwrap_or(0);
    if let Some(redis::Value::Array(consumers)) = items.get(3) {
        for consumer in consumers {
            if let Ok((name, count)) = redis::from_redis_value_ref::<(String, String)>(consumer) {
                per.insert(name, count.parse().unwrap_or(0));
            }
        }
    }
    (total, per)
}

/// Results finished after `cursor` (a `done` stream id; "0" for the start), at most `count`,
/// waiting up to `block_ms` for the first: `(next cursor, result JSON lines)`.
pub async fn results_since(
    conn: &Connection,
    keys: &RunKeys,
    cursor: &str,
    count: usize,
    block_ms: u64,
) -> Result<(String, Vec<String>), FleetError> {
    let mut read = redis::cmd("XREAD");
    read.arg("COUNT").arg(count.max(1));
    if block_ms > 0 {
        read.arg("BLOCK").arg(block_ms);
    }
    read.arg("STREAMS").arg(&keys.done).arg(cursor);
    let reply: Option<redis::streams::StreamReadReply> = conn.query(&read).await?;
    let entries = reply.and_then(|r| r.keys.into_iter().next()).map(|k| k.ids).unwrap_or_default();
    let Some(last) = entries.last() else { return Ok((cursor.to_owned(), Vec::new())) };
    let next = last.id.clone();
    let ids: Vec<String> = entries.iter().filter_map(|e| e.get::<String>("id")).collect();
    let lines: Vec<Option<String>> = conn.query(redis::cmd("HMGET").arg(&keys.results).arg(&ids)).await?;
    Ok((next, lines.into_iter().flatten().collect()))
}

/// Inputs read per round trip by `collect`.
const COLLECT_CHUNK: usize = 1000;

/// Writes one line per input, in input order, to `path`; `Ok(None)` when the run is not complete
/// (nothing is written then), else the number of lines written.
pub async fn collect(conn: &Connection, keys: &RunKeys, path: &Path) -> Result<Option<u64>, FleetError> {
    let status = status(conn, keys).await?;
    if !status.submitted || status.done + status.failed < status.total {
        return Ok(None);
    }
    let output = |e: std::io::Error| FleetError::Output { path: path.display().to_string(), message: e.to_string() };
    let partial = path.with_extension("partial");
    let file = std::fs::File::create(&partial).map_err(output)?;
    let mut out = std::io::BufWriter::new(file);
    let mut start = "-".to_owned();
    let mut written = 0u64;
    loop {
        let range: redis::streams::StreamRangeReply = conn
            .query(redis::cmd("XRANGE").arg(&keys.jobs).arg(&start).arg("+").arg("COUNT").arg(COLLECT_CHUNK))
            .await?;
        let Some(last) = range.ids.last() else { break };
        start = format!("({}", last.id);
        let ids: Vec<String> = range.ids.iter().filter_map(|e| e.get::<String>("id")).collect();
        let lines: Vec<Option<String>> = conn.query(redis::cmd("HMGET").arg(&keys.results).arg(&ids)).await?;
        for (id, line) in ids.iter().zip(lines) {
            let line = line.ok_or_else(|| FleetError::Protocol(format!("job {id} has no result")))?;
            out.write_all(line.as_bytes()).map_err(output)?;
            out.write_all(b"\n").map_err(output)?;
            written += 1;
        }
        if range.ids.len() < COLLECT_CHUNK {
            break;
        }
    }
    out.flush().map_err(output)?;
    out.into_inner().map_err(|e| output(e.into_error()))?.sync_all().map_err(output)?;
    std::fs::rename(&partial, path).map_err(output)?;
    // Every input has its result: no checkpoint is read again (the last commit dropped the
    // blocks already, unless a worker cut off from the run wrote a checkpoint after it).
    conn.query::<()>(redis::cmd("DEL").arg(&keys.blocks)).await?;
    Ok(Some(written))
}
