//! The `BatchAgent` core: the scheduler, the tool pool, the backends and their stream parsers, structured
//! output, the journal and the engine simulator. Python bindings live in `python` (feature `python`).

pub mod backends;
pub mod chat_template;
pub mod conversation;
pub mod diff;
pub mod engine;
pub mod fleet;
pub mod limits;
pub mod output;
pub mod prefix;
pub mod scheduler;
pub mod secret;
pub mod sim;
pub mod spec;
pub mod store;
pub mod stream;
pub mod telemetry;
pub mod tools;

#[cfg(feature = "python")]
mod python;
