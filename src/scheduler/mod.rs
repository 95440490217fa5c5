//! Scheduling: the priority semaphore that bounds in-flight model calls, adaptive limits, retries,
//! and the agent loop that drives each job through its turns.

pub mod agent;
pub mod run;
pub mod stats;
