//! Counters of what the pool did, in total and per tool.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// One tool's counters (or the pool's totals).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ToolCounts {
    /// Calls made, whatever their outcome.
    pub requests: u64,
    /// Argument sets actually executed (each item of a batch counts once).
    pub executions: u64,
    /// Calls answered from the result cache.
    pub cache_hits: u64,
    /// Calls that joined an identical execution already in flight.
    pub coalesced: u64,
    /// Calls rejected up front (unknown tool, invalid arguments) plus executions that ended in an
    /// error, timeouts included. An error shared by coalesced waiters counts once.
    pub errors: u64,
    /// Executions (or batch items) that ran past the tool's timeout.
    pub timeouts: u64,
    /// `call_batch` invocations.
    pub batches: u64,
}

impl ToolCounts {
    fn add(&mut self, other: &ToolCounts) {
        self.requests += other.requests;
        self.executions += other.executions;
        self.cache_hits += other.cache_hits;
        self.coalesced += other.coalesced;
        self.errors += other.errors;
        self.timeouts += other.timeouts;
        self.batches += other.batches;
    }
}

/// A snapshot of the pool's counters. `total` also counts calls to unknown tools, which have no
/// per-tool entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolStats {
    pub total: ToolCounts,
    pub per_tool: BTreeMap<String, ToolCounts>,
}

impl ToolStats {
    pub(crate) fn collect<'a>(unknown: u64, tools: impl Iterator<Item = (&'a str, ToolCounts)>) -> Self {
        let mut total = ToolCounts { requests: unknown, errors: unknown, ..ToolCounts::default() };
        let mut per_tool = BTreeMap::new();
        for (name, counts) in tools {
            total.add(&counts);
            per_tool.insert(name.to_owned(), counts);
        }
        Self { total, per_tool }
    }
}

/// Live counters; relaxed atomics, since each is read only for reporting.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) executions: AtomicU64,
    pub(crate) cache_hits: AtomicU64,
    pub(crate) coalesced: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) batches: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self) -> ToolCounts {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ToolCounts {
            requests: read(&self.requests),
            executions: read(&self.executions),
            cache_hits: read(&self.cache_hits),
            coalesced: read(&self.coalesced),
            errors: read(&self.errors),
            timeouts: read(&self.timeouts),
            batches: read(&self.batches),
        }
    }
}
