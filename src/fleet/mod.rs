//! The worker fleet: a run is a Redis stream of jobs read by a consumer group, so any number of
//! workers on any number of machines share it. Results are written once by job id, each agent turn
//! is checkpointed, a dead worker's jobs are claimed after their lease, and limits that protect an
//! endpoint are shared by every worker: the number of calls in flight (a semaphore of leases) and
//! the rate-limit budget per endpoint and key (`budget:ID`, see [`budget`]).
//!
//! Keys of a run `R` (all under the prefix `batchagent:`):
//! - `run:R` (hash): the spec's fingerprint, `total` once every input is on the stream;
//! - `spec:F` (hash): the spec and run options, stored once per fingerprint `F`;
//! - `run:R:jobs` (stream, consumer group `workers`): one entry per input, in input order;
//! - `run:R:results` (hash): job id -> result JSON, written with HSETNX in the same script that
//!   acknowledges the entry;
//! - `run:R:done` (stream): a job id per new result, in completion order (for `results()`);
//! - `run:R:checkpoints` (hash): job id -> the agent's state after its last finished turn, as a
//!   block-hash diff manifest ([`crate::diff`]) whose blocks are in `run:R:blocks`;
//! - `run:R:blocks` (hash): block hash (16 bytes) -> the block, stored once for every job of the
//!   run (the shared system prompt and tools once, each turn's new bytes once); dropped when the
//!   run's last result is written, and by `collect`;
//! - `run:R:counts` (hash): `done`, `failed`, `claims`, `resumed`, and results per worker;
//! - `run:R:workers` (hash): worker name -> its last heartbeat (JSON), or why it refused the run;
//! - `runs` (sorted set): run ids by submission time.
//!
//! Shared by every run: `tool:NAME:H` and `tool:NAME:H:running`, the results of
//! `@tool(cache="redis")` calls and the markers of calls running ([`tool_cache`]).

pub mod budget;
pub mod connection;
pub mod queue;
pub mod semaphore;
pub mod tool_cache;
pub mod worker;

pub use budget::RedisBudgets;
pub use connection::{Connection, FleetError};
pub use queue::{RunKeys, Status};
pub use semaphore::FleetSemaphore;
pub use tool_cache::RedisToolCache;
pub use worker::{FleetWorker, WorkerOptions};

/// The prefix of every key the fleet writes.
pub const PREFIX: &str = "batchagent:";

/// The consumer group of every run's job stream.
pub const GROUP: &str = "workers";

/// Milliseconds since the Unix epoch by this machine's clock (heartbeats, submission times).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
