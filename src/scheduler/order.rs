//! Dispatch order: pending jobs grouped by shared prefix, served group by group, so that the jobs
//! over one long document reach the engine together and its prefix is computed once and stays
//! cached while they run (`SGLang`'s `RadixAttention` and cascade attention gain the most when
//! same-prefix requests arrive together; an engine's LRU cache loses a document that comes back
//! after the others have pushed it out).
//!
//! Groups take turns (deficit round robin with a quantum of dispatches): a group is served until it
//! is empty or has used its quantum while others wait, then goes to the back of the line. A group
//! that appears joins the back. Every job is therefore dispatched within a bounded number of
//! dispatches, and a small group waits behind at most one quantum of each group ahead of it, never
//! behind the whole of a big one.
//!
//! A KV gate sizes the waves: a group whose shared prefix is not resident (nothing of it in flight)
//! starts only while the prefixes of the groups in flight and its own fit the engine's KV budget,
//! or when nothing is in flight. The gate holds the line rather than letting a later group overtake,
//! so the wait bound holds with it.
//!
//! The structure is plain data, no clock and no I/O: the dispatch loop pushes jobs as they are read,
//! pops the next one when the window has room, and reports each job's end. Every operation is O(1)
//! amortised (hash map and deques).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};

/// One group's share of the line.
struct Group<T> {
    items: VecDeque<T>,
    /// Estimated tokens of the shared prefix.
    prefix_tokens: usize,
    inflight: usize,
    /// Jobs ever pushed: a prefix counts against the KV budget only once it is shared (a group of
    /// one is a unique prompt, the engine's concern, not a shared prefix to keep resident).
    seen: u64,
    /// The group's prefix is counted in `resident_tokens`.
    counted: bool,
    /// In `turns` or in a lane.
    queued: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderOptions {
    /// Dispatches a group may take in a row while other groups wait.
    pub quantum: usize,
    /// Shared-prefix tokens that may be resident in flight at once (`None`: no gate).
    pub kv_budget_tokens: Option<usize>,
    /// Groups served at once, taking dispatches in turn: one per engine of a fleet, so that each
    /// engine has a group of its own instead of all of them sharing one.
    pub lanes: usize,
}

/// Jobs waiting for dispatch, grouped by prefix key.
pub struct PrefixOrder<T> {
    groups: HashMap<u64, Group<T>>,
    /// Groups with pending jobs waiting for their turn, in turn order.
    turns: VecDeque<u64>,
    /// The groups being served (at most `lanes`) and the dispatches each took in its turn.
    lanes: VecDeque<(u64, usize)>,
    pending: usize,
    inflight: usize,
    resident_tokens: usize,
    options: OrderOptions,
}

impl<T> PrefixOrder<T> {
    pub fn new(options: OrderOptions) -> Self {
        Self {
            groups: HashMap::new(),
            turns: VecDeque::new(),
            lanes: VecDeque::new(),
            pending: 0,
            inflight: 0,
            resident_tokens: 0,
            options: OrderOptions { quantum: options.quantum.max(1), lanes: options.lanes.max(1), ..options },
        }
    }

    /// Jobs pushed and not yet popped.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Jobs popped and not yet finished.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// Changes the KV budget (a new reading of the engine's capacity); applies to the next group
    /// that starts.
    pub fn set_kv_budget(&mut self, tokens: Option<usize>) {
        self.options.kv_budget_tokens = tokens;
    }

    /// Adds a job to its group. `prefix_tokens` is the estimated size of the prefix the key names.
    pub fn push(&mut self, key: u64, prefix_tokens: usize, item: T) {
        let group = self.groups.entry(key).or_insert_with(|| Group {
            items: VecDeque::new(),
            prefix_tokens,
            inflight: 0,
            seen: 0,
            counted: false,
            queued: false,
        });
        group.items.push_back(item);
        group.seen += 1;
        if !group.queued {
            group.queued = true;
            self.turns.push_back(key);
        }
        self.pending += 1;
    }

    /// The next job to dispatch and its key, or `None` when nothing is pending or the KV gate holds
    /// the next group until jobs in flight finish.
    pub fn pop(&mut self) -> Option<(u64, T)> {
        self.retire_lanes();
        // Fill free lanes from the line, in order; the gate holds the line (no overtaking), and
        // while a lane's group waits for room no other group takes a lane before it.
        let held = self.lanes.iter().any(|&(key, _)| !self.admissible(key));
        while !held && self.lanes.len() < self.options.lanes {
            let Some(&key) = self.turns.front() else { break };
            if !self.admissible(key) {
                break;
            }
            self.turns.pop_front();
            self.lanes.push_back((key, 0));
        }
        // The lanes take dispatches in rotation, so each endpoint of a fleet has a group to run.
        for _ in 0..self.lanes.len() {
            let (key, used) = self.lanes.pop_front()?;
            if !self.admissible(key) {
                self.lanes.push_back((key, used));
                continue;
            }
            let Some(group) = self.groups.get_mut(&key) else { continue };
            let Some(item) = group.items.pop_front() else {
                self.lanes.push_back((key, used));
                continue;
            };
            group.inflight += 1;
            if !group.counted && group.seen >= 2 {
                group.counted = true;
                self.resident_tokens += group.prefix_tokens;
            }
            self.lanes.push_back((key, used + 1));
            self.pending -= 1;
            self.inflight += 1;
            return Some((key, item));
        }
        None
    }

    /// Ends the turn of a lane whose group is empty, or that used its quantum while another group
    /// waits (a lane alone with its quantum used starts a fresh turn).
    fn retire_lanes(&mut self) {
        for _ in 0..self.lanes.len() {
            let Some((key, used)) = self.lanes.pop_front() else { break };
            let has_more = self.groups.get(&key).is_some_and(|g| !g.items.is_empty());
            if !has_more {
                if let Some(g) = self.groups.get_mut(&key) {
                    g.queued = false;
                }
                self.forget_if_idle(key);
            } else if used >= self.options.quantum {
                if self.turns.is_empty() {
                    self.lanes.push_back((key, 0));
                } else {
                    self.turns.push_back(key);
                }
            } else {
                self.lanes.push_back((key, used));
            }
        }
    }

    /// A job popped under `key` finished (its group's prefix may leave the engine's cache).
    pub fn finish(&mut self, key: u64) {
        let Some(group) = self.groups.get_mut(&key) else { return };
        if group.inflight == 0 {
            return;
        }
        group.inflight -= 1;
        self.inflight -= 1;
        if group.inflight == 0 && group.counted {
            group.counted = false;
            self.resident_tokens -= group.prefix_tokens;
        }
        self.forget_if_idle(key);
    }

    /// Can `key`'s group dispatch now without pushing the shared prefixes in flight past the budget?
    fn admissible(&self, key: u64) -> bool {
        let Some(group) = self.groups.get(&key) else { return true };
        let Some(budget) = self.options.kv_budget_tokens else { return true };
        // Resident already, or not shared, or nothing else in flight (a prefix larger than the
        // budget must still run).
        group.counted || group.seen < 2 || self.inflight == 0 || self.resident_tokens + group.prefix_tokens <= budget
    }

    /// Drops a group that has nothing pending, nothing in flight and no turn: memory stays bounded
    /// by the jobs held, however many distinct prefixes pass through.
    fn forget_if_idle(&mut self, key: u64) {
        if let Entry::Occupied(e) = self.groups.entry(key) {
            let g = e.get();
            if g.items.is_empty() && g.inflight == 0 && !g.queued {
                e.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::arithmetic_side_effects)]
    use super::*;
    use proptest::prelude::*;

    fn order(quantum: usize, budget: Option<usize>) -> PrefixOrder<u64> {
        lanes(quantum, budget, 1)
    }

    fn lanes(quantum: usize, budget: Option<usize>, lanes: usize) -> PrefixOrder<u64> {
        PrefixOrder::new(OrderOptions { quantum, kv_budget_tokens: budget, lanes })
    }

    #[test]
    fn interleaved_input_comes_out_grouped() {
        let mut o = order(1000, None);
        for i in 0..60u64 {
            o.push(i % 6, 20_000, i);
        }
        let keys: Vec<u64> = std::iter::from_fn(|| o.pop()).map(|(k, _)| k).collect();
        assert_eq!(keys.len(), 60);
        // Six runs of ten, in order of each group's first arrival.
        let runs: Vec<u64> = keys.chunk_by(|a, b| a == b).map(|run| run[0]).collect();
        assert_eq!(runs, vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn lanes_interleave_groups_for_a_fleet() {
        let mut o = lanes(1000, None, 3);
        for i in 0..30u64 {
            o.push(i % 5, 20_000, i);
        }
        let keys: Vec<u64> = std::iter::from_fn(|| o.pop()).map(|(k, _)| k).collect();
        assert_eq!(&keys[..6], &[0, 1, 2, 0, 1, 2], "three groups at once, in rotation");
        assert_eq!(keys.len(), 30);
    }

    #[test]
    fn a_small_group_waits_one_quantum_not_the_whole_big_group() {
        let mut o = order(8, None);
        for i in 0..100 {
            o.push(1, 100, i);
        }
        o.push(2, 100, 1000);
        let position = std::iter::from_fn(|| o.pop()).position(|(k, _)| k == 2).unwrap();
        assert_eq!(position, 8);
    }

    #[test]
    fn the_kv_gate_holds_a_new_group_until_the_resident_one_finishes() {
        let mut o = order(2, Some(30_000));
        for i in 0..4 {
            o.push(1, 20_000, i);
            o.push(2, 20_000, 10 + i);
        }
        assert_eq!(o.pop().map(|(k, _)| k), Some(1));
        assert_eq!(o.pop().map(|(k, _)| k), Some(1));
        // Group 1's quantum is used and group 2 waits, but 20k + 20k > 30k while group 1 runs.
        assert_eq!(o.pop(), None);
        o.finish(1);
        assert_eq!(o.pop(), None);
        o.finish(1);
        assert_eq!(o.pop().map(|(k, _)| k), Some(2));
        // Group 1 is not resident any more and cannot come back until group 2 is out.
        assert_eq!(o.pop().map(|(k, _)| k), Some(2));
        assert_eq!(o.pop(), None);
    }

    #[test]
    fn groups_of_one_are_not_gated_and_idle_groups_are_forgotten() {
        let mut o = order(4, Some(1));
        for i in 0..50 {
            o.push(i, 10_000, i);
        }
        let popped: Vec<u64> = std::iter::from_fn(|| o.pop()).map(|(_, v)| v).collect();
        assert_eq!(popped, (0..50).collect::<Vec<_>>(), "unique prompts keep their order and never wait");
        for i in 0..50 {
            o.finish(i);
        }
        assert!(o.groups.is_empty() && o.turns.is_empty());
        assert_eq!((o.pending(), o.inflight()), (0, 0));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push { group: u64, tokens: usize },
        Pop,
        Finish { pick: usize },
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        let op = prop_oneof![
            3 => (0u64..8, 1usize..40_000).prop_map(|(group, tokens)| Op::Push { group, tokens }),
            3 => Just(Op::Pop),
            2 => (0usize..1000).prop_map(|pick| Op::Finish { pick }),
        ];
        proptest::collection::vec(op, 0..400)
    }

    /// Drives a `PrefixOrder` and checks what comes out against what went in.
    #[derive(Default)]
    struct Harness {
        next_id: u64,
        dispatches: u64,
        /// id -> (group, dispatch count at push, jobs of its group pending at push)
        waiting: HashMap<u64, (u64, u64, u64)>,
        pending_per_group: HashMap<u64, u64>,
        inflight: Vec<u64>,
        out: std::collections::HashSet<u64>,
        max_groups: u64,
        /// (wait in dispatches, jobs ahead in its group, most groups pending so far)
        waits: Vec<(u64, u64, u64)>,
    }

    impl Harness {
        fn push(&mut self, o: &mut PrefixOrder<u64>, group: u64, tokens: usize) {
            let ahead = self.pending_per_group.get(&group).copied().unwrap_or(0);
            o.push(group, tokens, self.next_id);
            self.waiting.insert(self.next_id, (group, self.dispatches, ahead));
            *self.pending_per_group.entry(group).or_default() += 1;
            let live = self.pending_per_group.values().filter(|&&n| n > 0).count() as u64;
            self.max_groups = self.max_groups.max(live);
            self.next_id += 1;
        }

        fn pop(&mut self, o: &mut PrefixOrder<u64>) -> Option<u64> {
            let (key, id) = o.pop()?;
            assert!(self.out.insert(id), "job {id} dispatched twice");
            let (group, at, ahead) = self.waiting.remove(&id).unwrap();
            assert_eq!(group, key, "job {id} came out under another group's key");
            *self.pending_per_group.get_mut(&key).unwrap() -= 1;
            self.waits.push((self.dispatches - at, ahead, self.max_groups));
            self.dispatches += 1;
            self.inflight.push(key);
            Some(id)
        }
    }

    proptest! {
        /// Every job pushed comes out exactly once; with nothing in flight a pending job always
        /// comes out (the gate cannot stall the run); and every job's wait, counted in dispatches
        /// between its push and its pop, is bounded by the turns ahead of it: with one lane, at
        /// most `(jobs ahead in its group / quantum + 1)` turns of its group, each preceded by at
        /// most one turn (a quantum) of every other group.
        #[test]
        fn every_job_once_and_every_wait_bounded(
            ops in ops(),
            quantum in 1usize..12,
            budget in proptest::option::of(1usize..80_000),
            width in 1usize..4,
        ) {
            let mut o = lanes(quantum, budget, width);
            let mut h = Harness::default();
            for op in ops {
                match op {
                    Op::Push { group, tokens } => h.push(&mut o, group, tokens),
                    Op::Pop => {
                        let idle = o.inflight() == 0 && o.pending() > 0;
                        let got = h.pop(&mut o);
                        prop_assert!(!idle || got.is_some(), "nothing in flight, jobs pending, none dispatched");
                    }
                    Op::Finish { pick } => {
                        if !h.inflight.is_empty() {
                            let n = h.inflight.len();
                            o.finish(h.inflight.swap_remove(pick % n));
                        }
                    }
                }
                prop_assert_eq!(o.pending(), h.waiting.len());
                prop_assert_eq!(o.inflight(), h.inflight.len());
            }
            // Drain, finishing everything in flight whenever the gate holds.
            while o.pending() > 0 {
                if h.pop(&mut o).is_none() {
                    prop_assert!(!h.inflight.is_empty(), "jobs pending, nothing in flight, nothing dispatched");
                    for key in h.inflight.drain(..) {
                        o.finish(key);
                    }
                }
            }
            prop_assert_eq!(h.out.len() as u64, h.next_id);
            let q = quantum as u64;
            let w = width as u64;
            for &(wait, ahead, groups) in &h.waits {
                // One lane: its group's turns, each after at most one turn of every other group.
                // Several: during each of its turns the other lanes take up to a quantum each too,
                // and a lane may be mid-turn when the job arrives.
                let bound = if w == 1 { (ahead / q + 1) * groups * q } else { (ahead / q + 2) * (groups + w) * q };
                prop_assert!(wait <= bound, "waited {} dispatches, bound {} (ahead {}, groups {})", wait, bound, ahead, groups);
            }
        }
    }
}
