//! Per-tool result cache: least-recently-used eviction with an optional time to live.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

struct Slot {
    value: Arc<str>,
    expires: Option<Instant>,
    last_used: u64,
}

/// Recency is a counter rather than a linked list: a hit moves one entry in a `BTreeMap`, which is
/// O(log n) at the 10,000-entry default and needs no unsafe code.
pub(crate) struct ResultCache {
    ttl: Option<Duration>,
    max_entries: usize,
    slots: HashMap<Arc<str>, Slot>,
    by_recency: BTreeMap<u64, Arc<str>>,
    clock: u64,
}

impl ResultCache {
    pub(crate) fn new(ttl: Option<Duration>, max_entries: usize) -> Self {
        Self { ttl, max_entries, slots: HashMap::new(), by_recency: BTreeMap::new(), clock: 0 }
    }

    /// The live value under `key`, marked most recently used; an expired one is dropped.
    pub(crate) fn get(&mut self, key: &str) -> Option<Arc<str>> {
        let slot = self.slots.get_mut(key)?;
        if slot.expires.is_some_and(|at| Instant::now() >= at) {
            let last_used = slot.last_used;
            self.by_recency.remove(&last_used);
            self.slots.remove(key);
            return None;
        }
        self.clock += 1;
        if let Some(key) = self.by_recency.remove(&slot.last_used) {
            self.by_recency.insert(self.clock, key);
        }
        slot.last_used = self.clock;
        Some(Arc::clone(&slot.value))
    }

    pub(crate) fn insert(&mut self, key: Arc<str>, value: Arc<str>) {
        if self.max_entries == 0 {
            return;
        }
        let expires = self.ttl.and_then(|ttl| Instant::now().checked_add(ttl));
        self.clock += 1;
        let slot = Slot { value, expires, last_used: self.clock };
        if let Some(old) = self.slots.insert(Arc::clone(&key), slot) {
            self.by_recency.remove(&old.last_used);
        }
        self.by_recency.insert(self.clock, key);
        while self.slots.len() > self.max_entries {
            let Some((_, oldest)) = self.by_recency.pop_first() else { break };
            self.slots.remove(&oldest);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arc(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn evicts_the_least_recently_used() {
        let mut c = ResultCache::new(None, 2);
        c.insert(arc("a"), arc("1"));
        c.insert(arc("b"), arc("2"));
        assert_eq!(c.get("a").as_deref(), Some("1"));
        c.insert(arc("c"), arc("3"));
        assert_eq!(c.len(), 2);
        assert!(c.get("b").is_none());
        assert_eq!(c.get("a").as_deref(), Some("1"));
        assert_eq!(c.get("c").as_deref(), Some("3"));
    }

    #[test]
    fn reinserting_a_key_replaces_it_without_growing() {
        let mut c = ResultCache::new(None, 2);
        c.insert(arc("a"), arc("1"));
        c.insert(arc("a"), arc("2"));
        c.insert(arc("b"), arc("3"));
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("a").as_deref(), Some("2"));
        assert_eq!(c.by_recency.len(), 2);
    }

    #[test]
    fn zero_entries_caches_nothing() {
        let mut c = ResultCache::new(None, 0);
        c.insert(arc("a"), arc("1"));
        assert!(c.get("a").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_their_ttl() {
        let mut c = ResultCache::new(Some(Duration::from_secs(5)), 10);
        c.insert(arc("a"), arc("1"));
        tokio::time::advance(Duration::from_millis(4_999)).await;
        assert_eq!(c.get("a").as_deref(), Some("1"));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(c.get("a").is_none());
        assert_eq!(c.len(), 0);
        assert!(c.by_recency.is_empty());
    }
}
