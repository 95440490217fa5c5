//! The embedded engine's Rust half: the continuous-batching scheduler and the paged KV block
//! manager, shared by the simulator (which times each step by its profile) and the embedded engine
//! (which runs each step through the Python model runner, once per step).

pub mod blocks;
pub mod local;
pub mod metrics;
pub mod scheduler;
pub mod server;
pub mod stop;

pub use blocks::Eviction;
pub use local::{LocalEngine, LocalEngineError, Sampled, StepExecutor};
pub use metrics::{EngineMetrics, Histogram, TTFT_BUCKETS};
pub use scheduler::{
    EngineEvent, EngineRequest, Pin, Sampling, Scheduler, SchedulerConfig, StepLayout, StepLoad, TokenLogprobs,
};
