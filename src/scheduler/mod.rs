//! Scheduling: the priority semaphore that bounds in-flight model calls, adaptive limits, retries,
//! and the agent loop that drives each job through its turns.

pub mod agent;
pub mod compaction;
pub mod durable;
pub mod feed;
pub mod order;
pub mod population;
pub mod retry;
pub mod run;
pub mod semaphore;
pub mod stats;
pub mod trace;

pub use crate::limits::{aimd, AdaptiveLimit};
pub use retry::{RetryPolicy, SplitMix64};
pub use semaphore::{Acquire, Permit, PrioritySemaphore};
