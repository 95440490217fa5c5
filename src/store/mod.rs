//! Durable state: the SQLite run journal (checkpoint and resume), the response cache, the JSONL
//! result sink and the streaming input readers.

pub mod cache;
pub mod input;
pub mod journal;
pub mod sink;

pub use cache::{cache_key, hash128, CacheError, CacheStats, CacheWriter, ResponseCache};
pub use input::{InputError, InputFormat, InputReader, InputRecord};
pub use journal::{Checkpoint, Journal, JournalError, JournalResults, JournalStats, OpenBatch};
pub use sink::{JsonlSink, SinkError, TornLine};
