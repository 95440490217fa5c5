//! Limits that protect a run: the adaptive concurrency limit (AIMD) driven by throttling, request
//! and token pacing from the rate limits hosted APIs state in their headers, and the bounds on what
//! a server may send, so that no answer can exhaust the client's memory.

pub mod aimd;
pub mod headers;
pub mod pacer;

pub use aimd::AdaptiveLimit;
pub use headers::RateLimitHeaders;
pub use pacer::{Estimate, HandLimits, Pacer};

/// Default of `max_response_bytes`: the most bytes of one response body (streamed or not) read
/// from a server, and so the bound of every buffer fed from it (SSE lines and event data, NDJSON
/// lines, tool-call arguments). A real answer is far smaller: 64 MiB is about 16 million tokens.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Default of `idle_timeout`: the longest wait for the next bytes of a response body. A stream
/// sends a token every few milliseconds; a non-streamed body comes at once after its head.
pub const DEFAULT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Most tool calls in one model turn. A tool-call or content-block index is a number the server
/// chose; above [`MAX_STREAM_INDEX`] it is a protocol error rather than the size of a vector.
pub const MAX_TOOL_CALLS: usize = 256;

/// Largest tool-call or content-block index accepted in a stream: every one of
/// [`MAX_TOOL_CALLS`] calls may come after a text or thinking block of its own.
pub const MAX_STREAM_INDEX: usize = 2 * MAX_TOOL_CALLS;

/// A server sent more than `max_response_bytes` bytes for one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{what} is larger than max_response_bytes ({limit} bytes)")]
pub struct TooLarge {
    /// What outgrew the limit ("response body", "SSE line", ...).
    pub what: &'static str,
    pub limit: usize,
}

impl From<TooLarge> for crate::conversation::BackendError {
    #[cold]
    fn from(e: TooLarge) -> Self {
        Self::Protocol(e.to_string())
    }
}

/// An index a server sent, checked against [`MAX_STREAM_INDEX`] before anything is sized by it.
#[inline]
pub fn stream_index(index: usize, what: &str) -> Result<usize, crate::conversation::BackendError> {
    if index < MAX_STREAM_INDEX {
        Ok(index)
    } else {
        Err(index_error(index, what))
    }
}

#[cold]
fn index_error(index: usize, what: &str) -> crate::conversation::BackendError {
    crate::conversation::BackendError::Protocol(format!(
        "{what} index {index} is above the limit of {MAX_STREAM_INDEX} (at most {MAX_TOOL_CALLS} tool calls in a turn)"
    ))
}
