//! Limits that protect a backend: the adaptive concurrency limit (AIMD) driven by throttling.

pub mod aimd;

pub use aimd::AdaptiveLimit;
