//! Incremental stream parsers: SSE, NDJSON, the AWS event-stream framing, and tool-call delta
//! assembly.

#![warn(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

pub mod anthropic;
pub mod eventstream;
pub mod ndjson;
pub mod openai;
pub mod sse;
