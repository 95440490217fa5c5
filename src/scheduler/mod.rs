//! Scheduling: the priority semaphore that bounds in-flight model calls, adaptive limits, retries,
//! and the agent loop that drives each job through its turns.
