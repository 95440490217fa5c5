//! What a traced run records of each job: its model calls and tool calls, with wall-clock start and
//! end times and the figures that become span attributes. The records travel with the job's result;
//! the Python layer turns them into OpenTelemetry spans (the generative-AI semantic conventions) with these
//! times and the parent they belong under. An untraced run records nothing.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::conversation::Usage;

/// Turns the monotonic instants the scheduler measures with into Unix nanoseconds, from one reading
/// of both clocks taken when the run starts (spans of one run never disagree on their order).
#[derive(Debug, Clone, Copy)]
pub struct TraceClock {
    unix_ns: u64,
    at: Instant,
}

impl TraceClock {
    pub fn start() -> Self {
        let at = Instant::now();
        let unix_ns = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Self { unix_ns, at }
    }

    /// `t` in nanoseconds since the Unix epoch.
    pub fn ns(&self, t: Instant) -> u64 {
        match t.checked_duration_since(self.at) {
            Some(after) => self.unix_ns.saturating_add(after.as_nanos() as u64),
            None => self.unix_ns.saturating_sub(self.at.duration_since(t).as_nanos() as u64),
        }
    }
}

/// One job: the span of its whole run, and the spans of its calls.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct JobTrace {
    pub start_ns: u64,
    pub end_ns: u64,
    pub calls: Vec<CallSpan>,
    pub tools: Vec<ToolSpan>,
}

/// One model call: every attempt of it, retries and their backoff included (a retried call is one
/// logical operation in the generative-AI conventions).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CallSpan {
    /// The agent's turn the call was made for.
    pub turn: u32,
    pub model: String,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attempts: u32,
    pub stream: bool,
    /// A summary of old turns for compaction, not a turn of the agent.
    pub compaction: bool,
    /// Seconds from the answering attempt's request to its first token (streamed calls).
    pub ttft: Option<f64>,
    pub usage: Usage,
    pub finish_reason: Option<String>,
    /// The error kind (`rate_limited`, `call_timeout`, ...) when the call failed.
    pub error: Option<String>,
}

/// One tool call as the agent waited for it: from its start (during the model's stream when it
/// started early) to its result.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ToolSpan {
    pub turn: u32,
    pub name: String,
    pub call_id: String,
    pub start_ns: u64,
    pub end_ns: u64,
    /// The error the model was shown instead of a result.
    pub error: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn instants_map_onto_the_wall_clock_in_order() {
        let clock = TraceClock::start();
        let base = clock.ns(clock.at);
        assert_eq!(clock.ns(clock.at + Duration::from_millis(5)), base + 5_000_000);
        if let Some(before) = clock.at.checked_sub(Duration::from_millis(2)) {
            assert_eq!(clock.ns(before), base - 2_000_000);
        }
    }
}
