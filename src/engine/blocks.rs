//! The paged KV block manager with automatic prefix caching, as vLLM v1 does it.
//!
//! The cache has `capacity` physical blocks, numbered `0..capacity`: the page ids of the model
//! runner's paged KV cache. Each sequence holds a block table (its pages in order, see
//! [`PrefixCache::block_table`]).
//!
//! A full block of a prompt is named by a chained hash: its parent block's hash and its own token ids,
//! so a block can only hit when the whole prefix before it matches. The cache holds `capacity` physical
//! blocks. A running sequence holds its blocks (shared cached blocks are reference-counted); a block is
//! offered to other sequences only once its prefill has run (`mark_computed`), so concurrent first
//! arrivals of one prefix all miss. Released full blocks (the prompt's, and the output's when the
//! caller knows its tokens) stay cached, unreferenced, and are evicted when new blocks are needed, a
//! sequence's tail blocks before its head (vLLM frees in reverse order for that reason), in the order
//! of the cache's [`Eviction`] policy:
//!
//! - [`Eviction::Lru`]: least recently released first, as vLLM.
//! - [`Eviction::NextUse`]: furthest predicted next use first (Belady's rule). A release may say when
//!   its blocks are expected back ([`NextUse`], from the client's hint of its agent's next call). Three
//!   tiers, evicted in this order: blocks whose releaser is not coming back ([`NextUse::Never`]); blocks
//!   released without a prediction, least recently released first (exactly the LRU order, so a
//!   workload without hints is served as under `Lru`); blocks with a live prediction, the furthest
//!   first. A block keeps the soonest live prediction of any sequence that released it (a system
//!   prompt shared by many agents ranks by the agent due back first), so it falls to a lower tier only
//!   once that prediction is spent. A prediction is live until its `until` (twice the predicted wait:
//!   the agent is late, perhaps gone); then an unused block joins the LRU tier as if released at that
//!   moment. Predictions are never cleared by reuse: a block used by an agent that came back early
//!   keeps that agent's prediction until it passes (one time per block, not one per releaser, keeps
//!   this O(1) per release).
//!
//! Eviction costs amortised O(1) for the first two tiers (queues with lazy deletion, as the free list)
//! and O(log n) for the third (a binary heap keyed by the predicted time, and a second one by `until`
//! to demote spent predictions), n the cached blocks.

use std::cmp::Reverse;
use std::collections::hash_map::Entry as MapEntry;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Duration;

/// Parent hash of a prompt's first block.
const ROOT_HASH: u64 = 0x9e37_79b9_7f4a_7c15;

/// Chained hashes of the full `block_size`-token blocks of `tokens` (a trailing partial block has none).
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    chain_hashes(None, tokens, block_size)
}

/// Chained hashes of the full blocks of `tokens`, which follow a block hashed `parent` (`None`: they
/// start the sequence).
pub fn chain_hashes(parent: Option<u64>, tokens: &[u32], block_size: usize) -> Vec<u64> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut parent = parent.unwrap_or(ROOT_HASH);
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            parent = hash_block(parent, block);
            parent
        })
        .collect()
}

fn hash_block(parent: u64, block: &[u32]) -> u64 {
    // FNV-1a seeded with the parent's hash, so a block's hash covers everything before it.
    let mut fnv = fnv::FnvHasher::with_key(parent ^ 0xcbf2_9ce4_8422_2325);
    for &t in block {
        fnv.write(&t.to_le_bytes());
    }
    let mut h = fnv.finish();
    // A final avalanche (splitmix64) so hashes of blocks that differ in one token differ widely.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Hasher for `u64` keys that are already hashes or sequence numbers: one multiply (Fibonacci
/// hashing) spreads them over the high bits the hash table probes with, far cheaper than `SipHash` on
/// the engine's hot path.
#[derive(Default)]
struct U64Hasher(u64);

impl Hasher for U64Hasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type U64Map<V> = HashMap<u64, V, BuildHasherDefault<U64Hasher>>;

/// Which cached blocks are evicted first (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Eviction {
    /// Least recently released first; next-use predictions are ignored.
    Lru,
    /// Blocks not coming back, then blocks without a prediction (least recently released first),
    /// then the furthest predicted next use. The default: without hints it is `Lru`.
    #[default]
    NextUse,
}

impl Eviction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lru => "lru",
            Self::NextUse => "next_use",
        }
    }
}

impl std::str::FromStr for Eviction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lru" => Ok(Self::Lru),
            "next_use" => Ok(Self::NextUse),
            _ => Err(format!("unknown KV eviction policy {s:?}: expected lru or next_use")),
        }
    }
}

/// When a released sequence's blocks are expected to be used again, in the scheduler's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NextUse {
    /// No prediction: least-recently-released order among such blocks.
    #[default]
    Unknown,
    /// Expected at `at`; the prediction stands until `until`, after which the block counts as
    /// `Unknown`, released at `until`.
    At { at: Duration, until: Duration },
    /// Not expected back: its agent is done.
    Never,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixCacheError {
    #[error("no KV space: {needed} blocks needed, {available} can be freed (capacity {capacity})")]
    NoSpace { needed: usize, available: usize, capacity: usize },
    #[error("sequence {0} already holds blocks")]
    AlreadyAllocated(u64),
    #[error("sequence {0} holds no blocks")]
    UnknownSequence(u64),
}

/// What `allocate` gave a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Leading prompt blocks found computed in the cache (their tokens need no prefill).
    pub hit_blocks: usize,
}

/// Counters since the cache was made, in the units of vLLM's metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CacheStats {
    /// Prompt tokens looked up (`vllm:prefix_cache_queries`).
    pub query_tokens: u64,
    /// Prompt tokens found computed (`vllm:prefix_cache_hits`).
    pub hit_tokens: u64,
    /// Cached blocks evicted to make room.
    pub evictions: u64,
    /// Blocks held by running sequences over capacity (`vllm:kv_cache_usage_perc`, as a fraction).
    pub usage: f64,
    /// Blocks held by running sequences.
    pub used_blocks: usize,
    /// Unreferenced blocks kept for reuse.
    pub cached_free_blocks: usize,
    /// Blocks in the block tables of the sequences holding blocks, a block shared by k sequences
    /// counted k times: what they would hold without sharing blocks by hash (`used_blocks` is what
    /// they hold).
    pub table_blocks: usize,
    /// Sequences holding blocks (running, and finished ones pinned for their agent).
    pub sequences: usize,
}

#[derive(Debug)]
struct Block {
    /// The physical block (page) id.
    id: u32,
    refs: u32,
    computed: bool,
    /// Set each time the block becomes unreferenced; an eviction-queue entry with another stamp is
    /// stale.
    stamp: u64,
    /// The soonest next use predicted by a sequence that released it, as (at, until) in nanoseconds
    /// (only under [`Eviction::NextUse`]).
    next_use: Option<(u64, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// A block registered under this hash (a hit, or one this sequence computes for others).
    Shared(u64),
    /// A block no one else can use: partial, decode, or a duplicate of a block another sequence is
    /// still computing.
    Private,
}

#[derive(Debug, Default)]
struct SeqBlocks {
    hashes: Vec<u64>,
    held: Vec<Held>,
    /// The physical ids of `held`, in order: the sequence's block table.
    ids: Vec<u32>,
    /// Leading blocks already marked computed.
    computed_blocks: usize,
}

#[derive(Debug)]
pub struct PrefixCache {
    capacity: usize,
    block_size: usize,
    caching: bool,
    blocks: U64Map<Block>,
    seqs: U64Map<SeqBlocks>,
    eviction: Eviction,
    /// The scheduler's clock as of the last [`PrefixCache::advance`], in nanoseconds.
    now: u64,
    /// Unreferenced cached blocks without a live prediction (all of them under `Lru`), oldest
    /// first, as (hash, stamp) with lazy deletion (see `Block::stamp`).
    lru: VecDeque<(u64, u64)>,
    /// Unreferenced cached blocks not expected back, oldest first.
    never: VecDeque<(u64, u64)>,
    /// Unreferenced cached blocks with a live prediction: the furthest first, then the oldest
    /// release (tail before head).
    ahead: BinaryHeap<(u64, Reverse<u64>, u64)>,
    /// The same blocks by the end of their prediction, the soonest first, as (until, stamp, hash).
    due: BinaryHeap<Reverse<(u64, u64, u64)>>,
    next_stamp: u64,
    /// Sum of the live sequences' block-table lengths.
    table_blocks: usize,
    /// Registered blocks with refs > 0.
    referenced: usize,
    /// Registered blocks with refs == 0 (evictable).
    unreferenced: usize,
    private: usize,
    /// Physical ids of blocks that hold nothing (neither held nor cached).
    free: Vec<u32>,
    stats: CacheStats,
}

impl PrefixCache {
    /// A cache of `capacity_blocks` blocks (at most `u32::MAX`: block ids are `u32`).
    pub fn new(capacity_blocks: usize, block_size: usize) -> Self {
        let capacity_blocks = capacity_blocks.min(u32::MAX as usize);
        Self {
            capacity: capacity_blocks,
            block_size: block_size.max(1),
            caching: true,
            blocks: U64Map::default(),
            seqs: U64Map::default(),
            eviction: Eviction::default(),
            now: 0,
            lru: VecDeque::new(),
            never: VecDeque::new(),
            ahead: BinaryHeap::new(),
            due: BinaryHeap::new(),
            next_stamp: 0,
            table_blocks: 0,
            referenced: 0,
            unreferenced: 0,
            private: 0,
            // Popped from the end: low ids first.
            free: (0..u32::try_from(capacity_blocks).unwrap_or(u32::MAX)).rev().collect(),
            stats: CacheStats::default(),
        }
    }

    /// The same KV allocator with prefix caching off (vLLM `--no-enable-prefix-caching`): nothing hits
    /// and released blocks are freed at once.
    pub fn without_caching(capacity_blocks: usize, block_size: usize) -> Self {
        Self { caching: false, ..Self::new(capacity_blocks, block_size) }
    }

    /// The same cache evicting in `eviction`'s order.
    #[must_use]
    pub fn with_eviction(self, eviction: Eviction) -> Self {
        Self { eviction, ..self }
    }

    pub fn eviction(&self) -> Eviction {
        self.eviction
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Moves the cache's clock to `now` (the scheduler's time): blocks whose prediction has ended
    /// unused join the LRU tier. Amortised O(log n) per such block.
    pub fn advance(&mut self, now: Duration) {
        self.now = self.now.max(nanos(now));
        while let Some(&Reverse((until, stamp, h))) = self.due.peek() {
            if until > self.now {
                break;
            }
            self.due.pop();
            let Some(b) = self.blocks.get_mut(&h) else { continue };
            if b.refs != 0 || b.stamp != stamp {
                continue;
            }
            b.next_use = None;
            self.next_stamp += 1;
            b.stamp = self.next_stamp;
            self.lru.push_back((h, self.next_stamp));
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Number of leading blocks of `hashes` that are cached and computed.
    pub fn lookup(&self, hashes: &[u64]) -> usize {
        if !self.caching {
            return 0;
        }
        hashes.iter().take_while(|h| self.blocks.get(h).is_some_and(|b| b.computed)).count()
    }

    /// Blocks that are free or could be freed by eviction.
    pub fn available(&self) -> usize {
        self.capacity - self.referenced - self.private
    }

    pub fn stats(&self) -> CacheStats {
        let used = self.referenced + self.private;
        CacheStats {
            usage: if self.capacity == 0 { 0.0 } else { used as f64 / self.capacity as f64 },
            used_blocks: used,
            cached_free_blocks: self.unreferenced,
            table_blocks: self.table_blocks,
            sequences: self.seqs.len(),
            ..self.stats
        }
    }

    /// Gives sequence `seq` blocks for its first `blocks_needed` blocks. Its prompt of `prompt_len`
    /// tokens has full-block hashes `hashes`; leading cached blocks are reused, but never the whole
    /// prompt: the last prompt token is always computed so the step produces logits (as in vLLM).
    /// Nothing changes on error.
    pub fn allocate(
        &mut self,
        seq: u64,
        prompt_len: usize,
        hashes: &[u64],
        blocks_needed: usize,
    ) -> Result<Allocation, PrefixCacheError> {
        if self.seqs.contains_key(&seq) {
            return Err(PrefixCacheError::AlreadyAllocated(seq));
        }
        let max_hit = (prompt_len.saturating_sub(1) / self.block_size).min(hashes.len());
        let hit_blocks = self.lookup(&hashes[..max_hit]);
        // Unreferenced hits leave the evictable pool when pinned, so they cannot pay for new blocks.
        let unref_hits =
            hashes[..hit_blocks].iter().filter(|h| self.blocks.get(h).is_some_and(|b| b.refs == 0)).count();
        let new_blocks = blocks_needed.saturating_sub(hit_blocks);
        let available = self.available() - unref_hits;
        if new_blocks > available {
            return Err(PrefixCacheError::NoSpace { needed: new_blocks, available, capacity: self.capacity });
        }
        let mut entry = SeqBlocks {
            hashes: hashes.to_vec(),
            held: Vec::with_capacity(blocks_needed.max(hit_blocks)),
            ids: Vec::with_capacity(blocks_needed.max(hit_blocks)),
            computed_blocks: hit_blocks,
        };
        for &h in &hashes[..hit_blocks] {
            if let Some(b) = self.blocks.get_mut(&h) {
                if b.refs == 0 {
                    self.unreferenced -= 1;
                    self.referenced += 1;
                }
                b.refs += 1;
                entry.ids.push(b.id);
                entry.held.push(Held::Shared(h));
            }
        }
        self.stats.query_tokens += prompt_len as u64;
        self.stats.hit_tokens += (hit_blocks * self.block_size) as u64;
        self.table_blocks += hit_blocks;
        self.extend(&mut entry, blocks_needed);
        self.seqs.insert(seq, entry);
        Ok(Allocation { hit_blocks })
    }

    /// Grows sequence `seq` to `blocks_needed` blocks (a new prefill chunk, or decode crossing into a
    /// new block). Nothing changes on error.
    pub fn grow(&mut self, seq: u64, blocks_needed: usize) -> Result<(), PrefixCacheError> {
        let mut entry = self.seqs.remove(&seq).ok_or(PrefixCacheError::UnknownSequence(seq))?;
        let new_blocks = blocks_needed.saturating_sub(entry.held.len());
        let available = self.available();
        if new_blocks > available {
            self.seqs.insert(seq, entry);
            return Err(PrefixCacheError::NoSpace { needed: new_blocks, available, capacity: self.capacity });
        }
        self.extend(&mut entry, blocks_needed);
        self.seqs.insert(seq, entry);
        Ok(())
    }

    /// Blocks held by `seq`, if it holds any.
    pub fn held_blocks(&self, seq: u64) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.held.len())
    }

    /// The physical block ids `seq` holds, in token order (empty if it holds none).
    pub fn block_table(&self, seq: u64) -> &[u32] {
        self.seqs.get(&seq).map_or(&[], |s| &s.ids)
    }

    /// Adds blocks up to `blocks_needed`; the caller has checked there is room.
    fn extend(&mut self, entry: &mut SeqBlocks, blocks_needed: usize) {
        while entry.held.len() < blocks_needed {
            let i = entry.held.len();
            if self.free.is_empty() {
                self.evict_one();
            }
            // The caller checked `available()`, which counts evictable blocks as free.
            let Some(id) = self.free.pop() else { return };
            let held = match entry.hashes.get(i) {
                Some(&h) if self.caching => match self.blocks.entry(h) {
                    MapEntry::Vacant(v) => {
                        v.insert(Block { id, refs: 1, computed: false, stamp: 0, next_use: None });
                        self.referenced += 1;
                        Held::Shared(h)
                    }
                    // Another sequence holds or computed this block after a miss earlier in our
                    // prompt; we compute our own copy, as vLLM does.
                    MapEntry::Occupied(_) => {
                        self.private += 1;
                        Held::Private
                    }
                },
                _ => {
                    self.private += 1;
                    Held::Private
                }
            };
            entry.held.push(held);
            entry.ids.push(id);
            self.table_blocks += 1;
        }
    }

    /// Evicts the first cached block in the policy's order (see the module's documentation).
    fn evict_one(&mut self) {
        while let Some((h, stamp)) = self.never.pop_front().or_else(|| self.lru.pop_front()) {
            if self.evict_if_current(h, stamp) {
                return;
            }
        }
        while let Some((_, Reverse(stamp), h)) = self.ahead.pop() {
            if self.evict_if_current(h, stamp) {
                return;
            }
        }
    }

    /// Evicts block `h` if it is unreferenced and `stamp` is its current queue entry.
    fn evict_if_current(&mut self, h: u64, stamp: u64) -> bool {
        let MapEntry::Occupied(o) = self.blocks.entry(h) else { return false };
        let b = o.get();
        if b.refs != 0 || b.stamp != stamp {
            return false;
        }
        self.free.push(b.id);
        o.remove();
        self.unreferenced -= 1;
        self.stats.evictions += 1;
        true
    }

    /// Queues block `h`, just unreferenced, for eviction; `hint` is its last releaser's prediction
    /// (already folded into the block's own).
    fn queue_unreferenced(&mut self, h: u64, hint: NextUse) {
        let Some(b) = self.blocks.get_mut(&h) else { return };
        self.next_stamp += 1;
        let stamp = self.next_stamp;
        b.stamp = stamp;
        self.unreferenced += 1;
        if self.eviction == Eviction::Lru {
            self.lru.push_back((h, stamp));
            return;
        }
        match (b.next_use.filter(|&(_, until)| until > self.now), hint) {
            (Some((at, until)), _) => {
                self.ahead.push((at, Reverse(stamp), h));
                self.due.push(Reverse((until, stamp, h)));
            }
            (None, NextUse::Never) => self.never.push_back((h, stamp)),
            (None, _) => {
                b.next_use = None;
                self.lru.push_back((h, stamp));
            }
        }
    }

    /// Folds a releaser's prediction into block `h`'s: the soonest live one stands.
    fn note_next_use(&mut self, h: u64, hint: NextUse) {
        let NextUse::At { at, until } = hint else { return };
        if self.eviction == Eviction::Lru {
            return;
        }
        let (at, until) = (nanos(at), nanos(until));
        if until <= self.now {
            return;
        }
        let Some(b) = self.blocks.get_mut(&h) else { return };
        match b.next_use {
            Some((a, u)) if u > self.now && a <= at => {}
            _ => b.next_use = Some((at, until)),
        }
    }

    /// Withdraws a prediction made by an agent that turned out to be done: each unreferenced block of
    /// `hashes` whose standing prediction is exactly `prediction` (no other releaser predicted a
    /// sooner live use) joins the LRU tier as if that prediction were spent now, ahead of every
    /// block still predicted to be used. Blocks whose prediction came from another agent keep it.
    /// Returns how many blocks moved.
    pub fn withdraw_prediction(&mut self, hashes: &[u64], prediction: NextUse) -> usize {
        let NextUse::At { at, until } = prediction else { return 0 };
        let standing = Some((nanos(at), nanos(until)));
        let mut moved = 0;
        // Tail before head, as a release queues them.
        for &h in hashes.iter().rev() {
            let Some(b) = self.blocks.get_mut(&h) else { continue };
            if b.refs != 0 || b.next_use != standing {
                continue;
            }
            b.next_use = None;
            // A new stamp makes its entries in `ahead` and `due` stale.
            self.next_stamp += 1;
            b.stamp = self.next_stamp;
            self.lru.push_back((h, self.next_stamp));
            moved += 1;
        }
        moved
    }

    /// The chained hashes of `seq`'s full prompt blocks (empty if it holds no blocks).
    pub fn prompt_hashes(&self, seq: u64) -> &[u64] {
        self.seqs.get(&seq).map_or(&[], |s| &s.hashes)
    }

    /// Records that the first `computed_tokens` tokens of `seq` have their KV computed; the full
    /// prompt blocks among them become hits for later lookups.
    pub fn mark_computed(&mut self, seq: u64, computed_tokens: usize) {
        let Some(entry) = self.seqs.get_mut(&seq) else { return };
        let upto = (computed_tokens / self.block_size).min(entry.held.len());
        while entry.computed_blocks < upto {
            if let Held::Shared(h) = entry.held[entry.computed_blocks] {
                if let Some(b) = self.blocks.get_mut(&h) {
                    b.computed = true;
                }
            }
            entry.computed_blocks += 1;
        }
    }

    /// Unpins all blocks of `seq`. Computed full prompt blocks stay cached until evicted; the rest
    /// are freed. Returns the number of blocks it held.
    pub fn release(&mut self, seq: u64) -> usize {
        self.release_caching(seq, &[])
    }

    /// `release`, also keeping the blocks after the prompt whose content is known: `later` are the
    /// chained hashes of the computed full blocks that follow the prompt's full blocks (the prompt's
    /// tail and the output), as vLLM caches decode blocks, so a next turn that repeats this answer
    /// hits them.
    pub fn release_caching(&mut self, seq: u64, later: &[u64]) -> usize {
        self.release_hinted(seq, later, NextUse::Unknown)
    }

    /// `release_caching`, with the prediction of when the sequence's blocks are used next (its
    /// agent's next request), which orders their eviction under [`Eviction::NextUse`].
    pub fn release_hinted(&mut self, seq: u64, later: &[u64], next_use: NextUse) -> usize {
        let Some(entry) = self.seqs.remove(&seq) else { return 0 };
        self.table_blocks -= entry.held.len();
        let prompt_blocks = entry.hashes.len();
        for (i, (held, &id)) in entry.held.iter().zip(&entry.ids).enumerate().rev() {
            match *held {
                Held::Private => {
                    self.private -= 1;
                    let known = i.checked_sub(prompt_blocks).and_then(|j| later.get(j));
                    match (known, self.caching) {
                        (Some(&h), true) if !self.blocks.contains_key(&h) => {
                            self.blocks.insert(h, Block { id, refs: 0, computed: true, stamp: 0, next_use: None });
                            self.note_next_use(h, next_use);
                            self.queue_unreferenced(h, next_use);
                        }
                        _ => self.free.push(id),
                    }
                }
                Held::Shared(h) => {
                    self.note_next_use(h, next_use);
                    let MapEntry::Occupied(mut o) = self.blocks.entry(h) else { continue };
                    let b = o.get_mut();
                    b.refs -= 1;
                    if b.refs > 0 {
                        continue;
                    }
                    self.referenced -= 1;
                    if b.computed && self.caching {
                        self.queue_unreferenced(h, next_use);
                    } else {
                        self.free.push(b.id);
                        o.remove();
                    }
                }
            }
        }
        // Stale queue entries pile up when cached blocks are re-pinned without eviction; keep the
        // queues within a constant factor of the live entries.
        let queued = self.lru.len() + self.never.len() + self.ahead.len() + self.due.len();
        if queued > 4 * self.unreferenced + 1024 {
            let blocks = &self.blocks;
            let current = |h: u64, stamp: u64| blocks.get(&h).is_some_and(|b| b.refs == 0 && b.stamp == stamp);
            self.lru.retain(|&(h, stamp)| current(h, stamp));
            self.never.retain(|&(h, stamp)| current(h, stamp));
            self.ahead.retain(|&(_, Reverse(stamp), h)| current(h, stamp));
            self.due.retain(|&Reverse((_, stamp, h))| current(h, stamp));
        }
        entry.held.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    fn toks(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| seed.wrapping_mul(1_000_003).wrapping_add(i)).collect()
    }

    #[test]
    fn a_released_prompt_hits_the_second_time() {
        let mut c = PrefixCache::new(100, 16);
        let p = toks(1, 100);
        let h = block_hashes(&p, 16);
        assert_eq!(h.len(), 6);
        assert_eq!(c.allocate(1, 100, &h, 7).unwrap().hit_blocks, 0);
        c.mark_computed(1, 100);
        c.release(1);
        assert_eq!(c.stats().used_blocks, 0);
        assert_eq!(c.stats().cached_free_blocks, 6);
        assert_eq!(c.allocate(2, 100, &h, 7).unwrap().hit_blocks, 6);
        let s = c.stats();
        assert_eq!((s.query_tokens, s.hit_tokens), (200, 96));
    }

    #[test]
    fn blocks_are_hits_only_once_computed() {
        let mut c = PrefixCache::new(100, 16);
        let h = block_hashes(&toks(1, 64), 16);
        c.allocate(1, 64, &h, 4).unwrap();
        assert_eq!(c.allocate(2, 64, &h, 4).unwrap().hit_blocks, 0);
        c.mark_computed(1, 40);
        assert_eq!(c.lookup(&h), 2);
    }

    #[test]
    fn the_whole_prompt_never_hits() {
        let mut c = PrefixCache::new(100, 16);
        let h = block_hashes(&toks(1, 32), 16);
        c.allocate(1, 32, &h, 2).unwrap();
        c.mark_computed(1, 32);
        c.release(1);
        assert_eq!(c.allocate(2, 32, &h, 2).unwrap().hit_blocks, 1);
    }

    #[test]
    fn no_space_changes_nothing() {
        let mut c = PrefixCache::new(4, 16);
        let h = block_hashes(&toks(1, 48), 16);
        c.allocate(1, 48, &h, 3).unwrap();
        let before = c.stats();
        let err = c.allocate(2, 48, &block_hashes(&toks(2, 48), 16), 3).unwrap_err();
        assert_eq!(err, PrefixCacheError::NoSpace { needed: 3, available: 1, capacity: 4 });
        assert_eq!(c.stats(), before);
        assert!(c.grow(1, 5).is_err());
        assert_eq!(c.held_blocks(1), Some(3));
    }

    #[test]
    fn tail_blocks_are_evicted_before_head_blocks() {
        let mut c = PrefixCache::new(4, 16);
        let h = block_hashes(&toks(1, 64), 16);
        c.allocate(1, 65, &h, 4).unwrap();
        c.mark_computed(1, 64);
        c.release(1);
        // Two new blocks evict the last two blocks of the released prompt.
        c.allocate(2, 32, &block_hashes(&toks(2, 32), 16), 2).unwrap();
        assert_eq!(c.lookup(&h), 2);
        assert_eq!(c.stats().evictions, 2);
    }

    #[test]
    fn output_blocks_are_cached_on_release() {
        let mut c = PrefixCache::new(100, 16);
        let prompt = toks(1, 40);
        let h = block_hashes(&prompt, 16);
        // 40 prompt tokens + 30 computed output tokens = 70 tokens in 5 blocks, 4 of them full.
        c.allocate(1, 40, &h, 5).unwrap();
        c.mark_computed(1, 70);
        let mut all = prompt.clone();
        all.extend(toks(9, 30));
        let later = chain_hashes(h.last().copied(), &all[32..64], 16);
        assert_eq!(later.len(), 2);
        assert_eq!(c.release_caching(1, &later), 5);
        assert_eq!(c.stats().cached_free_blocks, 4);
        assert_eq!(c.stats().used_blocks, 0);
        // The next turn repeats the prompt and the answer: 4 full blocks hit.
        all.extend(toks(5, 20));
        assert_eq!(c.allocate(2, all.len(), &block_hashes(&all, 16), 6).unwrap().hit_blocks, 4);
    }

    #[test]
    fn disabled_caching_never_hits() {
        let mut c = PrefixCache::without_caching(10, 16);
        let h = block_hashes(&toks(1, 64), 16);
        c.allocate(1, 64, &h, 4).unwrap();
        c.mark_computed(1, 64);
        c.release(1);
        assert_eq!(c.allocate(2, 64, &h, 4).unwrap().hit_blocks, 0);
        assert_eq!(c.stats().cached_free_blocks, 0);
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn at(at: u64, until: u64) -> NextUse {
        NextUse::At { at: secs(at), until: secs(until) }
    }

    /// Computes and releases a 4-block prompt of seed `seed` with `next_use`; returns its hashes.
    fn serve_and_release(c: &mut PrefixCache, seq: u64, seed: u32, next_use: NextUse) -> Vec<u64> {
        let h = block_hashes(&toks(seed, 64), 16);
        c.allocate(seq, 65, &h, 5).unwrap();
        c.mark_computed(seq, 64);
        c.release_hinted(seq, &[], next_use);
        h
    }

    #[test]
    fn next_use_evicts_agents_not_coming_back_then_the_furthest_return() {
        for eviction in [Eviction::Lru, Eviction::NextUse] {
            let mut c = PrefixCache::new(13, 16).with_eviction(eviction);
            // Released in this order: back soon, back late, done.
            let soon = serve_and_release(&mut c, 1, 1, at(5, 10));
            let late = serve_and_release(&mut c, 2, 2, at(50, 100));
            let done = serve_and_release(&mut c, 3, 3, NextUse::Never);
            assert_eq!(c.stats().cached_free_blocks, 12);
            // Six new blocks, one free: five evicted. LRU takes the oldest releases (the agent due
            // back first, then the late one's tail); next-use takes the done agent's, then the
            // late agent's tail.
            c.allocate(4, 96, &block_hashes(&toks(4, 96), 16), 6).unwrap();
            let kept = (c.lookup(&soon), c.lookup(&late), c.lookup(&done));
            match eviction {
                Eviction::Lru => assert_eq!(kept, (0, 3, 4)),
                Eviction::NextUse => assert_eq!(kept, (4, 3, 0)),
            }
            assert_eq!(c.stats().evictions, 5);
        }
    }

    #[test]
    fn a_shared_block_keeps_the_soonest_next_use_of_its_releasers() {
        let mut c = PrefixCache::new(11, 16).with_eviction(Eviction::NextUse);
        // Two agents share a 2-block prefix (prompt_tokens: the first 40 tokens are common).
        let (a, b) = (prompt_tokens(0, 64), prompt_tokens(1, 64));
        let (ha, hb) = (block_hashes(&a, 16), block_hashes(&b, 16));
        assert_eq!(ha[..2], hb[..2]);
        assert_ne!(ha[2], hb[2]);
        c.allocate(1, 65, &ha, 5).unwrap();
        c.mark_computed(1, 64);
        assert_eq!(c.allocate(2, 65, &hb, 5).unwrap().hit_blocks, 2);
        // A is back at 5 and releases while B still holds the prefix; B is done.
        c.release_hinted(1, &[], at(5, 10));
        c.mark_computed(2, 64);
        c.release_hinted(2, &[], NextUse::Never);
        // A third agent, back at 20, releases 4 blocks of its own.
        let other = serve_and_release(&mut c, 4, 9, at(20, 40));
        // Four new blocks, one free: three evicted, B's own 2 blocks (never), then the furthest
        // return's tail; not the prefix B released last, which A is due back for.
        c.allocate(5, 64, &block_hashes(&toks(7, 64), 16), 4).unwrap();
        assert_eq!((c.lookup(&ha), c.lookup(&hb), c.lookup(&other)), (4, 2, 3));
    }

    #[test]
    fn a_spent_prediction_joins_the_lru_tier() {
        let mut c = PrefixCache::new(9, 16).with_eviction(Eviction::NextUse);
        let early = serve_and_release(&mut c, 1, 1, at(1, 2));
        let late = serve_and_release(&mut c, 2, 2, at(5, 10));
        let mut d = PrefixCache::new(9, 16).with_eviction(Eviction::NextUse);
        serve_and_release(&mut d, 1, 1, at(1, 2));
        serve_and_release(&mut d, 2, 2, at(5, 10));
        // Two new blocks, one free. Before 2 s the early agent's blocks are kept over the late one's.
        c.advance(secs(1));
        c.allocate(3, 32, &block_hashes(&toks(3, 32), 16), 2).unwrap();
        assert_eq!((c.lookup(&early), c.lookup(&late)), (4, 3));
        // At 2 s its prediction is spent: it has not come back, so its blocks go first.
        d.advance(secs(2));
        d.allocate(3, 32, &block_hashes(&toks(3, 32), 16), 2).unwrap();
        assert_eq!((d.lookup(&early), d.lookup(&late)), (3, 4));
    }

    /// Two agents sharing a 2-block prefix, each with 2 blocks of its own, released in order with
    /// the predictions given.
    fn siblings(first: NextUse, second: NextUse) -> (PrefixCache, Vec<u64>, Vec<u64>) {
        let mut c = PrefixCache::new(9, 16).with_eviction(Eviction::NextUse);
        let (ha, hb) = (block_hashes(&prompt_tokens(0, 64), 16), block_hashes(&prompt_tokens(1, 64), 16));
        c.allocate(1, 65, &ha, 5).unwrap();
        c.mark_computed(1, 64);
        c.release_hinted(1, &[], first);
        assert_eq!(c.allocate(2, 65, &hb, 5).unwrap().hit_blocks, 2);
        c.mark_computed(2, 64);
        c.release_hinted(2, &[], second);
        (c, ha, hb)
    }

    #[test]
    fn a_withdrawn_prediction_is_evicted_before_live_ones() {
        // A is due back at 20, B at 3: B's blocks (the shared prefix too) stand at B's prediction.
        let (mut kept, ha, hb) = siblings(at(20, 40), at(3, 6));
        let (mut withdrawn, _, _) = siblings(at(20, 40), at(3, 6));
        // B turns out to be done; a prediction it did not make withdraws nothing.
        assert_eq!(withdrawn.withdraw_prediction(&hb, at(3, 7)), 0);
        assert_eq!(withdrawn.withdraw_prediction(&hb, at(3, 6)), 4);
        // Five new blocks, three free. Furthest first takes A's own blocks; once B is known done,
        // B's own blocks go (its tail before its head), and the prefix A needs stays.
        for c in [&mut kept, &mut withdrawn] {
            c.allocate(3, 80, &block_hashes(&toks(3, 80), 16), 5).unwrap();
        }
        assert_eq!((kept.lookup(&ha), kept.lookup(&hb)), (2, 4));
        assert_eq!((withdrawn.lookup(&ha), withdrawn.lookup(&hb)), (4, 2));
    }

    #[test]
    fn withdrawing_leaves_a_sooner_prediction_of_another_agent() {
        // A (due back at 5) released the prefix before B (due at 8): the prefix keeps A's.
        let (mut c, ha, hb) = siblings(at(5, 10), at(8, 16));
        assert_eq!(c.withdraw_prediction(&hb, at(8, 16)), 2);
        // Six new blocks, three free: B's own two, then the furthest live prediction: A's tail.
        c.allocate(3, 96, &block_hashes(&toks(3, 96), 16), 6).unwrap();
        assert_eq!((c.lookup(&ha), c.lookup(&hb)), (3, 2));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Allocate {
            seq: u8,
            prompt: u8,
            len: u8,
            extra: u8,
        },
        Compute {
            seq: u8,
            tokens: u16,
        },
        Grow {
            seq: u8,
            extra: u8,
        },
        /// `hint`: 0 unknown, 1 never, k >= 2 back in k seconds (prediction spent after 2k).
        Release {
            seq: u8,
            hint: u8,
        },
        Advance {
            secs: u8,
        },
        /// Withdraws the prediction `hint` (as `Release` makes it now) from prompt `prompt`'s blocks.
        Withdraw {
            prompt: u8,
            hint: u8,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..8u8, 0..4u8, 1..120u8, 0..3u8).prop_map(|(seq, prompt, len, extra)| Op::Allocate {
                seq,
                prompt,
                len,
                extra
            }),
            (0..8u8, 0..200u16).prop_map(|(seq, tokens)| Op::Compute { seq, tokens }),
            (0..8u8, 0..3u8).prop_map(|(seq, extra)| Op::Grow { seq, extra }),
            (0..8u8, 0..6u8).prop_map(|(seq, hint)| Op::Release { seq, hint }),
            (0..4u8).prop_map(|secs| Op::Advance { secs }),
            (0..4u8, 2..6u8).prop_map(|(prompt, hint)| Op::Withdraw { prompt, hint }),
        ]
    }

    fn hint(code: u8, now: Duration) -> NextUse {
        match code {
            0 => NextUse::Unknown,
            1 => NextUse::Never,
            k => NextUse::At { at: now + secs(u64::from(k)), until: now + secs(2 * u64::from(k)) },
        }
    }

    /// Applies `op` at `now`; false if it was refused.
    fn apply(c: &mut PrefixCache, op: &Op, now: &mut Duration, hints: bool) -> bool {
        match *op {
            Op::Allocate { seq, prompt, len, extra } => {
                let tokens = prompt_tokens(prompt, usize::from(len));
                let need = c.blocks_for(tokens.len()) + usize::from(extra);
                c.allocate(u64::from(seq), tokens.len(), &block_hashes(&tokens, 16), need).is_ok()
            }
            Op::Compute { seq, tokens } => {
                c.mark_computed(u64::from(seq), usize::from(tokens));
                true
            }
            Op::Grow { seq, extra } => {
                let seq = u64::from(seq);
                let n = c.held_blocks(seq).unwrap_or(0);
                c.grow(seq, n + usize::from(extra)).is_ok()
            }
            Op::Release { seq, hint: code } => {
                let next_use = if hints { hint(code, *now) } else { NextUse::Unknown };
                c.release_hinted(u64::from(seq), &[], next_use);
                true
            }
            Op::Advance { secs: s } => {
                *now += secs(u64::from(s));
                c.advance(*now);
                true
            }
            Op::Withdraw { prompt, hint: code } => {
                let h = block_hashes(&prompt_tokens(prompt, 119), 16);
                c.withdraw_prediction(&h, hint(code, *now));
                true
            }
        }
    }

    /// Every unreferenced block can be evicted: it has a current entry in an eviction queue.
    fn every_cached_block_is_queued(c: &PrefixCache) -> bool {
        let mut current: std::collections::HashSet<u64> = std::collections::HashSet::new();
        let is_current = |h: u64, stamp: u64| c.blocks.get(&h).is_some_and(|b| b.refs == 0 && b.stamp == stamp);
        for &(h, stamp) in c.lru.iter().chain(&c.never) {
            if is_current(h, stamp) {
                current.insert(h);
            }
        }
        for &(_, Reverse(stamp), h) in &c.ahead {
            if is_current(h, stamp) {
                current.insert(h);
            }
        }
        c.blocks.iter().filter(|(_, b)| b.refs == 0).all(|(h, _)| current.contains(h))
            && current.len() == c.unreferenced
    }

    /// Prompts share prefixes: prompt `p` is the first `len` tokens of a stream that depends on `p`
    /// only after token 40, so different prompts share their first 2 blocks.
    fn prompt_tokens(p: u8, len: usize) -> Vec<u32> {
        (0..len as u32).map(|i| if i < 40 { i } else { i * 7 + u32::from(p) * 100_000 }).collect()
    }

    proptest! {
        #[test]
        fn invariants_hold_under_any_operations(
            ops in prop::collection::vec(op(), 1..80),
            cap in 1..24usize,
            next_use in any::<bool>(),
        ) {
            let eviction = if next_use { Eviction::NextUse } else { Eviction::Lru };
            let mut c = PrefixCache::new(cap, 16).with_eviction(eviction);
            let mut live: HashMap<u64, (Vec<u64>, usize)> = HashMap::new();
            let mut now = Duration::ZERO;
            for op in ops {
                match op {
                    Op::Allocate { seq, prompt, len, extra } => {
                        let seq = u64::from(seq);
                        let tokens = prompt_tokens(prompt, usize::from(len));
                        let h = block_hashes(&tokens, 16);
                        let need = c.blocks_for(tokens.len()) + usize::from(extra);
                        let before = c.stats();
                        if let Ok(a) = c.allocate(seq, tokens.len(), &h, need) {
                            prop_assert!(!live.contains_key(&seq));
                            prop_assert!(a.hit_blocks * 16 < tokens.len());
                            live.insert(seq, (h.clone(), need.max(a.hit_blocks)));
                            let after = c.stats();
                            prop_assert!(after.hit_tokens - before.hit_tokens <= after.query_tokens - before.query_tokens);
                        } else {
                            prop_assert_eq!(c.stats(), before);
                        }
                    }
                    Op::Compute { seq, tokens } => c.mark_computed(u64::from(seq), usize::from(tokens)),
                    Op::Grow { seq, extra } => {
                        let seq = u64::from(seq);
                        if let Some((_, n)) = live.get_mut(&seq) {
                            if c.grow(seq, *n + usize::from(extra)).is_ok() {
                                *n += usize::from(extra);
                            }
                        } else {
                            prop_assert!(c.grow(seq, 1).is_err());
                        }
                    }
                    Op::Release { seq, hint: code } => {
                        let seq = u64::from(seq);
                        let held = c.release_hinted(seq, &[], hint(code, now));
                        prop_assert_eq!(held, live.remove(&seq).map_or(0, |(_, n)| n));
                    }
                    Op::Advance { .. } | Op::Withdraw { .. } => {
                        apply(&mut c, &op, &mut now, true);
                    }
                }
                let s = c.stats();
                prop_assert_eq!(s.table_blocks, live.values().map(|(_, n)| *n).sum::<usize>());
                prop_assert_eq!(s.sequences, live.len());
                prop_assert!(every_cached_block_is_queued(&c));
                prop_assert!(s.used_blocks + s.cached_free_blocks <= cap);
                prop_assert_eq!(s.used_blocks, live.values().map(|(_, n)| *n).sum::<usize>() - shared_overlap(&c, &live));
                prop_assert!(ids_are_consistent(&c, cap));
                // Pinned blocks are never evicted: every registered block a live sequence holds is
                // still in the map.
                for seq in live.keys() {
                    for held in &c.seqs[seq].held {
                        if let Held::Shared(h) = held {
                            prop_assert!(c.blocks.get(h).is_some_and(|b| b.refs > 0));
                        }
                    }
                }
            }
        }

        /// Without predictions, next-use eviction is LRU: the same hits and evictions at every step.
        #[test]
        fn without_hints_next_use_evicts_as_lru(ops in prop::collection::vec(op(), 1..80), cap in 1..24usize) {
            let mut lru = PrefixCache::new(cap, 16).with_eviction(Eviction::Lru);
            let mut next = PrefixCache::new(cap, 16).with_eviction(Eviction::NextUse);
            let (mut t1, mut t2) = (Duration::ZERO, Duration::ZERO);
            for op in &ops {
                prop_assert_eq!(apply(&mut lru, op, &mut t1, false), apply(&mut next, op, &mut t2, false));
                prop_assert_eq!(lru.stats(), next.stats());
                for p in 0..4 {
                    let h = block_hashes(&prompt_tokens(p, 119), 16);
                    prop_assert_eq!(lru.lookup(&h), next.lookup(&h));
                }
            }
        }

        #[test]
        fn a_block_hits_only_if_its_whole_prefix_matches(
            a in prop::collection::vec(0..4u32, 16..80),
            b in prop::collection::vec(0..4u32, 16..80),
        ) {
            let ha = block_hashes(&a, 16);
            let hb = block_hashes(&b, 16);
            for (i, (x, y)) in ha.iter().zip(&hb).enumerate() {
                let same_prefix = a[..16 * (i + 1)] == b[..16 * (i + 1)];
                prop_assert_eq!(x == y, same_prefix);
            }
        }
    }

    /// Every physical id is in exactly one place: the free list, a cached block, or one private
    /// block of one sequence; a registered block's id is the one in every table that lists it.
    fn ids_are_consistent(c: &PrefixCache, cap: usize) -> bool {
        let mut owner: HashMap<u32, &str> = HashMap::new();
        let mut ok = true;
        for &id in &c.free {
            ok &= owner.insert(id, "free").is_none();
        }
        for b in c.blocks.values() {
            ok &= owner.insert(b.id, "registered").is_none();
        }
        for s in c.seqs.values() {
            ok &= s.ids.len() == s.held.len();
            for (held, id) in s.held.iter().zip(&s.ids) {
                match held {
                    Held::Shared(h) => ok &= c.blocks.get(h).is_some_and(|b| b.id == *id),
                    Held::Private => ok &= owner.insert(*id, "private").is_none(),
                }
            }
        }
        ok && owner.len() == cap && owner.keys().all(|&id| (id as usize) < cap)
    }

    /// Blocks counted more than once in the per-sequence totals because several sequences share them.
    fn shared_overlap(c: &PrefixCache, live: &HashMap<u64, (Vec<u64>, usize)>) -> usize {
        let mut refs: HashMap<u64, usize> = HashMap::new();
        for seq in live.keys() {
            for held in &c.seqs[seq].held {
                if let Held::Shared(h) = held {
                    *refs.entry(*h).or_default() += 1;
                }
            }
        }
        refs.values().map(|n| n - 1).sum()
    }
}
