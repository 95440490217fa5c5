//! The paged KV block manager with automatic prefix caching, as vLLM v1 does it, and blocks stored
//! as diffs of the blocks they depart from.
//!
//! The cache has `capacity` physical pages, numbered `0..capacity`: the page ids of the model
//! runner's paged KV cache. A block is `block_size / page_size` pages (one, unless
//! [`PrefixCache::with_page_size`] says otherwise). Each sequence holds a page table (its blocks'
//! pages in order, see [`PrefixCache::page_table`]).
//!
//! Diffs. With pages smaller than blocks, a block that departs partway from a cached block (same
//! parent, the same first tokens: a sibling agent's task after the shared system prompt) is stored
//! as a diff of it: its first pages are the cached block's, up to the last whole page before the
//! first differing token, and only the rest are its own. Those tokens are a prefix hit too (their KV
//! is the same: it depends only on the tokens before it). Only that much can be shared exactly:
//! after the first differing token, no row of any layer but the first equals the base's, whatever
//! the tokens (`benches/sibling_kv.py` measures it). A computed block is found as a base by the
//! hashes of its page-aligned prefixes ([`PrefixCache::find`]). A released sequence's last, partial
//! block is kept as a base too (the pages its computed tokens fill): its agent's next turn goes on
//! from there. A referenced diff block holds a reference on its base, so a base outlives every use
//! of its pages; an unreferenced base's diff blocks are unreferenced too, and are evicted with it.
//!
//! A full block of a prompt is named by a chained hash: its parent block's hash and its own token ids,
//! so a block can only hit when the whole prefix before it matches. A running sequence holds its
//! blocks (shared cached blocks are reference-counted); a block is offered to other sequences only
//! once its prefill has run (`mark_computed`), so concurrent first arrivals of one prefix all miss.
//! Released full blocks (the prompt's, and the output's when the caller knows its tokens) stay
//! cached, unreferenced, and are evicted when new blocks are needed, a sequence's tail blocks before
//! its head (vLLM frees in reverse order for that reason), in the order of the cache's [`Eviction`]
//! policy:
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
/// Keys the hashes of page-aligned block prefixes apart from those of whole blocks.
const PREFIX_KEY: u64 = 0x243f_6a88_85a3_08d3;

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
    avalanche(fnv.finish())
}

/// A final avalanche (splitmix64) so hashes of blocks that differ in one token differ widely.
fn avalanche(mut h: u64) -> u64 {
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
    #[error("no KV space: {needed} pages needed, {available} can be freed (capacity {capacity})")]
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
    /// Leading prompt tokens found computed: the hit blocks', then the pages the next block shares
    /// with the cached block it is a diff of (see [`Hit`]).
    pub hit_tokens: usize,
}

/// A block stored as a diff: its first `pages` pages are those of the cached block `base`, whose
/// tokens it shares up to there (same parent, same leading tokens); only the rest are its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Diff {
    pub base: u64,
    pub pages: usize,
}

/// What [`PrefixCache::find`] finds of a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hit {
    /// Leading full blocks cached and computed.
    pub blocks: usize,
    /// The block after them, as a diff of a cached block (only with pages smaller than blocks).
    pub diff: Option<Diff>,
    /// Prompt tokens whose KV needs no prefill.
    pub tokens: usize,
}

/// Counters since the cache was made, in the units of vLLM's metrics; sizes are in pages.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CacheStats {
    /// Prompt tokens looked up (`vllm:prefix_cache_queries`).
    pub query_tokens: u64,
    /// Prompt tokens found computed (`vllm:prefix_cache_hits`).
    pub hit_tokens: u64,
    /// Cached blocks evicted to make room.
    pub evictions: u64,
    /// Pages held by running sequences over capacity (`vllm:kv_cache_usage_perc`, as a fraction).
    pub usage: f64,
    /// Pages held by running sequences.
    pub used_pages: usize,
    /// Pages of unreferenced blocks kept for reuse.
    pub cached_free_pages: usize,
    /// Pages in the page tables of the sequences holding blocks, a page shared by k sequences
    /// counted k times: what they would hold without sharing blocks by hash or as diffs
    /// (`used_pages` is what they hold).
    pub table_pages: usize,
    /// Sequences holding blocks (running, and finished ones pinned for their agent).
    pub sequences: usize,
}

#[derive(Debug)]
struct Block {
    /// Its physical pages in token order, `block_size / page_size` of them (fewer for a partial
    /// block kept as a diff base: the pages its tokens fill): a diff block's first `own_from` are
    /// its base's, the rest its own.
    pages: Box<[u32]>,
    /// A diff block's base. A referenced diff block holds a reference on it, so a base outlives
    /// the use of its pages; an unreferenced base's diff blocks are unreferenced too, and are
    /// evicted with it.
    base: Option<u64>,
    own_from: usize,
    /// Registered blocks that are diffs of this one.
    diffs: Vec<u64>,
    /// Its page-prefix hashes (see [`prefix_hashes`]), under which it is found as a diff base once
    /// computed; empty when its tokens were not given or a block is one page.
    prefixes: Box<[u64]>,
    /// Holders: sequences, and referenced diff blocks built on it.
    refs: u32,
    computed: bool,
    /// Set each time the block becomes unreferenced; an eviction-queue entry with another stamp is
    /// stale.
    stamp: u64,
    /// The soonest next use predicted by a sequence that released it, as (at, until) in nanoseconds
    /// (only under [`Eviction::NextUse`]).
    next_use: Option<(u64, u64)>,
}

impl Block {
    fn new(pages: Vec<u32>, diff: Option<Diff>, prefixes: Box<[u64]>, refs: u32, computed: bool) -> Self {
        Self {
            pages: pages.into_boxed_slice(),
            base: diff.map(|d| d.base),
            own_from: diff.map_or(0, |d| d.pages),
            diffs: Vec::new(),
            prefixes,
            refs,
            computed,
            stamp: 0,
            next_use: None,
        }
    }

    /// The pages it owns (all but a diff block's base pages).
    fn own(&self) -> &[u32] {
        &self.pages[self.own_from..]
    }
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
    /// Page-prefix hashes of the full prompt blocks from `prefixes_from` on, `pages_per_block - 1`
    /// per block (empty without the prompt's tokens, or with blocks of one page).
    prefixes: Vec<u64>,
    prefixes_from: usize,
    held: Vec<Held>,
    /// The physical pages of `held`, `pages_per_block` per block: the sequence's page table.
    pages: Vec<u32>,
    /// The sequence's diff block while it is private (its index in `held`): the sequence holds the
    /// reference on its base. Once registered, the block holds it.
    diff: Option<(usize, Diff)>,
    /// Leading blocks already marked computed.
    computed_blocks: usize,
}

#[derive(Debug)]
pub struct PrefixCache {
    /// In pages.
    capacity: usize,
    block_size: usize,
    page_size: usize,
    pages_per_block: usize,
    caching: bool,
    blocks: U64Map<Block>,
    seqs: U64Map<SeqBlocks>,
    /// Computed blocks by their page-prefix hashes: where a diff finds its base.
    bases: U64Map<u64>,
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
    /// Sum of the live sequences' page-table lengths.
    table_pages: usize,
    /// Own pages of registered blocks with refs > 0.
    referenced: usize,
    /// Own pages of registered blocks with refs == 0 (evictable).
    unreferenced: usize,
    /// Own pages of private blocks.
    private: usize,
    /// Physical pages that hold nothing (neither held nor cached).
    free: Vec<u32>,
    stats: CacheStats,
}

impl PrefixCache {
    /// A cache of `capacity_blocks` blocks of `block_size` tokens, one page each (at most
    /// `u32::MAX` pages: page ids are `u32`).
    pub fn new(capacity_blocks: usize, block_size: usize) -> Self {
        let capacity = capacity_blocks.min(u32::MAX as usize);
        Self {
            capacity,
            block_size: block_size.max(1),
            page_size: block_size.max(1),
            pages_per_block: 1,
            caching: true,
            blocks: U64Map::default(),
            seqs: U64Map::default(),
            bases: U64Map::default(),
            eviction: Eviction::default(),
            now: 0,
            lru: VecDeque::new(),
            never: VecDeque::new(),
            ahead: BinaryHeap::new(),
            due: BinaryHeap::new(),
            next_stamp: 0,
            table_pages: 0,
            referenced: 0,
            unreferenced: 0,
            private: 0,
            free: free_list(capacity),
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

    /// The same cache (still empty) with blocks of `block_size / page_size` pages: a block whose
    /// leading pages match those of a cached block (the same tokens after the same parent) shares
    /// them and stores only the rest, a diff against that base. `page_size` must divide the block
    /// size (`SchedulerConfig::validate` checks); otherwise blocks stay one page.
    #[must_use]
    pub fn with_page_size(self, page_size: usize) -> Self {
        if page_size == 0 || self.block_size % page_size != 0 || !self.blocks.is_empty() || !self.seqs.is_empty() {
            return self;
        }
        let pages_per_block = self.block_size / page_size;
        let capacity = (self.capacity / self.pages_per_block).saturating_mul(pages_per_block).min(u32::MAX as usize);
        Self { capacity, page_size, pages_per_block, free: free_list(capacity), ..self }
    }

    pub fn eviction(&self) -> Eviction {
        self.eviction
    }

    /// Capacity in pages.
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

    pub fn page_size(&self) -> usize {
        self.page_size
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

    /// What a sequence of `total` tokens whose prompt is `prompt`, with full-block hashes `hashes`,
    /// finds computed: the leading cached blocks, never all `total` tokens (the last token is always
    /// computed so the step produces logits, as in vLLM); then, with pages smaller than blocks, the
    /// cached block sharing the most whole leading pages of the prompt's next block, which that
    /// block becomes a diff of. `prompt` may be empty (no diff is looked for).
    pub fn find(&self, prompt: &[u32], total: usize, hashes: &[u64]) -> Hit {
        let bs = self.block_size;
        let max_hit = (total.saturating_sub(1) / bs).min(hashes.len());
        let blocks = self.lookup(&hashes[..max_hit]);
        let mut hit = Hit { blocks, diff: None, tokens: blocks * bs };
        if !self.caching || self.pages_per_block == 1 || self.bases.is_empty() {
            return hit;
        }
        let start = blocks * bs;
        // Whole pages of the next block that the prompt holds, short of the last token and of a
        // whole block (which would have been a hit).
        let end = total.saturating_sub(1).min(prompt.len()).min(start + bs - self.page_size);
        let pages = end.saturating_sub(start) / self.page_size;
        if pages == 0 {
            return hit;
        }
        let parent = blocks.checked_sub(1).map_or(ROOT_HASH, |i| hashes[i]);
        let prefixes = prefix_hashes(parent, &prompt[start..start + pages * self.page_size], self.page_size);
        for (i, p) in prefixes.iter().enumerate().rev() {
            let Some(&base) = self.bases.get(p) else { continue };
            if self.blocks.get(&base).is_some_and(|b| b.computed) {
                hit.diff = Some(Diff { base, pages: i + 1 });
                hit.tokens += (i + 1) * self.page_size;
                break;
            }
        }
        hit
    }

    /// Pages that are free or could be freed by eviction.
    pub fn available(&self) -> usize {
        self.capacity - self.referenced - self.private
    }

    pub fn stats(&self) -> CacheStats {
        let used = self.referenced + self.private;
        CacheStats {
            usage: if self.capacity == 0 { 0.0 } else { used as f64 / self.capacity as f64 },
            used_pages: used,
            cached_free_pages: self.unreferenced,
            table_pages: self.table_pages,
            sequences: self.seqs.len(),
            ..self.stats
        }
    }

    /// Gives sequence `seq` of `total` tokens blocks for its first `blocks_needed` blocks. Its
    /// prompt is `prompt` (its tokens may be left out: then no block becomes a diff, nor a base
    /// for one), with full-block hashes `hashes`; what [`PrefixCache::find`] finds is reused.
    /// Nothing changes on error.
    pub fn allocate(
        &mut self,
        seq: u64,
        prompt: &[u32],
        total: usize,
        hashes: &[u64],
        blocks_needed: usize,
    ) -> Result<Allocation, PrefixCacheError> {
        if self.seqs.contains_key(&seq) {
            return Err(PrefixCacheError::AlreadyAllocated(seq));
        }
        let mut hit = self.find(prompt, total, hashes);
        if blocks_needed <= hit.blocks {
            hit.diff = None;
        }
        let ppb = self.pages_per_block;
        // Unreferenced hits and base (and the bases they reference in turn) leave the evictable
        // pool when referenced, so they cannot pay for new pages. Each sits at its own position in
        // the prompt, so none is counted twice.
        let pinned: usize =
            hashes[..hit.blocks].iter().chain(hit.diff.as_ref().map(|d| &d.base)).map(|&h| self.pinned_with(h)).sum();
        let new_blocks = blocks_needed.saturating_sub(hit.blocks);
        let needed = new_blocks * ppb - hit.diff.map_or(0, |d| d.pages);
        let available = self.available().saturating_sub(pinned);
        if needed > available {
            return Err(PrefixCacheError::NoSpace { needed, available, capacity: self.capacity });
        }
        let mut entry = SeqBlocks {
            hashes: hashes.to_vec(),
            prefixes_from: hit.blocks,
            computed_blocks: hit.blocks,
            held: Vec::with_capacity(blocks_needed.max(hit.blocks)),
            pages: Vec::with_capacity(blocks_needed.max(hit.blocks) * ppb),
            ..SeqBlocks::default()
        };
        if ppb > 1 && self.caching {
            let bs = self.block_size;
            for i in hit.blocks..hashes.len().min(prompt.len() / bs) {
                let parent = i.checked_sub(1).map_or(ROOT_HASH, |j| hashes[j]);
                entry.prefixes.extend(prefix_hashes(
                    parent,
                    &prompt[i * bs..(i + 1) * bs - self.page_size],
                    self.page_size,
                ));
            }
        }
        for &h in &hashes[..hit.blocks] {
            self.reference(h);
            if let Some(b) = self.blocks.get(&h) {
                entry.pages.extend_from_slice(&b.pages);
                entry.held.push(Held::Shared(h));
            }
        }
        if let Some(d) = hit.diff {
            // Referenced before `extend` evicts for room, so the base cannot be evicted.
            self.reference(d.base);
            entry.diff = Some((hit.blocks, d));
        }
        self.stats.query_tokens += total as u64;
        self.stats.hit_tokens += hit.tokens as u64;
        self.table_pages += hit.blocks * ppb;
        self.extend(&mut entry, blocks_needed);
        self.seqs.insert(seq, entry);
        Ok(Allocation { hit_blocks: hit.blocks, hit_tokens: hit.tokens })
    }

    /// Own pages of block `h` and of every block a first reference to it would reference too (its
    /// base, and on), while unreferenced.
    fn pinned_with(&self, mut h: u64) -> usize {
        let mut pages = 0;
        while let Some(b) = self.blocks.get(&h).filter(|b| b.refs == 0) {
            pages += b.own().len();
            match b.base {
                Some(base) => h = base,
                None => break,
            }
        }
        pages
    }

    /// Grows sequence `seq` to `blocks_needed` blocks (a new prefill chunk, or decode crossing into a
    /// new block). Nothing changes on error.
    pub fn grow(&mut self, seq: u64, blocks_needed: usize) -> Result<(), PrefixCacheError> {
        let mut entry = self.seqs.remove(&seq).ok_or(PrefixCacheError::UnknownSequence(seq))?;
        let needed = blocks_needed.saturating_sub(entry.held.len()) * self.pages_per_block;
        let available = self.available();
        if needed > available {
            self.seqs.insert(seq, entry);
            return Err(PrefixCacheError::NoSpace { needed, available, capacity: self.capacity });
        }
        self.extend(&mut entry, blocks_needed);
        self.seqs.insert(seq, entry);
        Ok(())
    }

    /// Blocks held by `seq`, if it holds any.
    pub fn held_blocks(&self, seq: u64) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.held.len())
    }

    /// The physical pages of `seq`'s blocks, in token order (empty if it holds none).
    pub fn page_table(&self, seq: u64) -> &[u32] {
        self.seqs.get(&seq).map_or(&[], |s| &s.pages)
    }

    /// Adds blocks up to `blocks_needed`; the caller has checked there is room.
    fn extend(&mut self, entry: &mut SeqBlocks, blocks_needed: usize) {
        let ppb = self.pages_per_block;
        while entry.held.len() < blocks_needed {
            let i = entry.held.len();
            let diff = entry.diff.filter(|&(at, _)| at == i).map(|(_, d)| d);
            let own = ppb - diff.map_or(0, |d| d.pages);
            while self.free.len() < own {
                // The caller checked `available()`, which counts evictable pages as free.
                if !self.evict_one() {
                    debug_assert!(false, "no page to evict: `available` was wrong");
                    return;
                }
            }
            let mut pages = Vec::with_capacity(ppb);
            if let Some(d) = diff {
                pages.extend_from_slice(self.blocks.get(&d.base).map_or(&[][..], |b| &b.pages[..d.pages]));
            }
            pages.extend(self.free.drain(self.free.len() - own..).rev());
            entry.pages.extend_from_slice(&pages);
            let held = match entry.hashes.get(i) {
                Some(&h) if self.caching => match self.blocks.entry(h) {
                    MapEntry::Vacant(v) => {
                        let prefixes = i
                            .checked_sub(entry.prefixes_from)
                            .and_then(|k| entry.prefixes.get(k * (ppb - 1)..(k + 1) * (ppb - 1)))
                            .unwrap_or_default();
                        v.insert(Block::new(pages, diff, prefixes.into(), 1, false));
                        self.referenced += own;
                        Held::Shared(h)
                    }
                    // Another sequence holds or computed this block after a miss earlier in our
                    // prompt; we compute our own copy, as vLLM does.
                    MapEntry::Occupied(_) => {
                        self.private += own;
                        Held::Private
                    }
                },
                _ => {
                    self.private += own;
                    Held::Private
                }
            };
            if let (Held::Shared(h), Some(d)) = (held, diff) {
                // The block holds the reference on its base now.
                entry.diff = None;
                if let Some(base) = self.blocks.get_mut(&d.base) {
                    base.diffs.push(h);
                }
            }
            entry.held.push(held);
            self.table_pages += ppb;
        }
    }

    /// Takes a reference on block `h`; a block referenced for the first time references its base.
    fn reference(&mut self, mut h: u64) {
        loop {
            let Some(b) = self.blocks.get_mut(&h) else { return };
            b.refs += 1;
            if b.refs > 1 {
                return;
            }
            let own = b.own().len();
            self.unreferenced -= own;
            self.referenced += own;
            match b.base {
                Some(base) => h = base,
                None => return,
            }
        }
    }

    /// Drops a reference on block `h`, folding `hint` (the releaser's prediction) into its own. A
    /// block left unreferenced is queued for eviction if computed (freed otherwise) and drops the
    /// reference it held on its base.
    fn unreference(&mut self, mut h: u64, hint: NextUse) {
        loop {
            self.note_next_use(h, hint);
            let MapEntry::Occupied(mut o) = self.blocks.entry(h) else { return };
            let b = o.get_mut();
            b.refs -= 1;
            if b.refs > 0 {
                return;
            }
            let own = b.own().len();
            let base = b.base;
            self.referenced -= own;
            if b.computed && self.caching {
                self.queue_unreferenced(h, hint);
            } else {
                let b = o.remove();
                self.free.extend_from_slice(b.own());
                self.forget(h, &b);
            }
            match base {
                Some(base) => h = base,
                None => return,
            }
        }
    }

    /// Removes the traces of block `h`, just taken out of the map: its prefixes as a diff base, its
    /// entry among its base's diffs.
    fn forget(&mut self, h: u64, b: &Block) {
        for p in &b.prefixes {
            if self.bases.get(p) == Some(&h) {
                self.bases.remove(p);
            }
        }
        if let Some(base) = b.base.and_then(|base| self.blocks.get_mut(&base)) {
            base.diffs.retain(|&d| d != h);
        }
    }

    /// Evicts the first cached block in the policy's order (see the module's documentation), with
    /// the diff blocks built on it; `false` if nothing can be evicted.
    fn evict_one(&mut self) -> bool {
        while let Some((h, stamp)) = self.never.pop_front().or_else(|| self.lru.pop_front()) {
            if self.evict_if_current(h, stamp) {
                return true;
            }
        }
        while let Some((_, Reverse(stamp), h)) = self.ahead.pop() {
            if self.evict_if_current(h, stamp) {
                return true;
            }
        }
        false
    }

    /// Evicts block `h` if it is unreferenced and `stamp` is its current queue entry.
    fn evict_if_current(&mut self, h: u64, stamp: u64) -> bool {
        if !self.blocks.get(&h).is_some_and(|b| b.refs == 0 && b.stamp == stamp) {
            return false;
        }
        // Its diff blocks are unreferenced too (a referenced one references its base), and read
        // its pages: they go with it.
        let mut evict = vec![h];
        while let Some(h) = evict.pop() {
            let Some(b) = self.blocks.remove(&h) else { continue };
            self.free.extend_from_slice(b.own());
            self.unreferenced -= b.own().len();
            self.stats.evictions += 1;
            self.forget(h, &b);
            evict.extend(b.diffs.iter().copied());
        }
        true
    }

    /// Queues block `h`, just unreferenced, for eviction; `hint` is its last releaser's prediction
    /// (already folded into the block's own).
    fn queue_unreferenced(&mut self, h: u64, hint: NextUse) {
        let Some(b) = self.blocks.get_mut(&h) else { return };
        self.next_stamp += 1;
        let stamp = self.next_stamp;
        b.stamp = stamp;
        self.unreferenced += b.pages.len() - b.own_from;
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
    /// prompt blocks among them become hits for later lookups (and bases for diffs).
    pub fn mark_computed(&mut self, seq: u64, computed_tokens: usize) {
        let Some(entry) = self.seqs.get_mut(&seq) else { return };
        let upto = (computed_tokens / self.block_size).min(entry.held.len());
        while entry.computed_blocks < upto {
            if let Held::Shared(h) = entry.held[entry.computed_blocks] {
                if let Some(b) = self.blocks.get_mut(&h) {
                    if !b.computed {
                        b.computed = true;
                        for &p in &b.prefixes {
                            self.bases.entry(p).or_insert(h);
                        }
                    }
                }
            }
            entry.computed_blocks += 1;
        }
    }

    /// Unpins all blocks of `seq`. Computed full prompt blocks stay cached until evicted; the rest
    /// are freed. Returns the number of blocks it held.
    pub fn release(&mut self, seq: u64) -> usize {
        self.release_caching(seq, &[], &[])
    }

    /// `release`, also keeping the blocks after the prompt whose content is known: `later` are the
    /// chained hashes of the computed full blocks that follow the prompt's full blocks (the prompt's
    /// tail and the output), as vLLM caches decode blocks, so a next turn that repeats this answer
    /// hits them. `tail` are the computed tokens of the block after those, which is not full: with
    /// pages smaller than blocks its whole pages stay cached as a diff base, so the agent's next
    /// turn, whose prompt goes on from there, shares them instead of computing them again.
    pub fn release_caching(&mut self, seq: u64, later: &[u64], tail: &[u32]) -> usize {
        self.release_hinted(seq, later, tail, NextUse::Unknown)
    }

    /// `release_caching`, with the prediction of when the sequence's blocks are used next (its
    /// agent's next request), which orders their eviction under [`Eviction::NextUse`].
    pub fn release_hinted(&mut self, seq: u64, later: &[u64], tail: &[u32], next_use: NextUse) -> usize {
        let Some(entry) = self.seqs.remove(&seq) else { return 0 };
        let ppb = self.pages_per_block;
        self.table_pages -= entry.pages.len();
        let prompt_blocks = entry.hashes.len();
        // The partial block's whole pages, under the hashes a diff finds its base by; the block is
        // kept under the longest (its own key: no whole block's hash).
        let tail_at = prompt_blocks + later.len();
        let tail_pages = tail.len() / self.page_size;
        let mut tail_prefixes = if self.caching && ppb > 1 && tail_pages > 0 && tail.len() < self.block_size {
            let parent = later.last().or(entry.hashes.last()).copied().unwrap_or(ROOT_HASH);
            prefix_hashes(parent, &tail[..tail_pages * self.page_size], self.page_size)
        } else {
            Vec::new()
        };
        for (i, held) in entry.held.iter().enumerate().rev() {
            match *held {
                Held::Private => {
                    let pages = &entry.pages[i * ppb..(i + 1) * ppb];
                    let diff = entry.diff.filter(|&(at, _)| at == i).map(|(_, d)| d);
                    let own_from = diff.map_or(0, |d| d.pages);
                    self.private -= ppb - own_from;
                    // What is kept: a known full block whole; of the partial block, the pages its
                    // computed tokens fill (some of its own among them), the rest freed.
                    let (key, prefixes, keep) = match i.checked_sub(prompt_blocks).and_then(|j| later.get(j)) {
                        Some(&h) => (Some(h), Vec::new(), ppb),
                        None if i == tail_at && tail_pages > own_from => {
                            (tail_prefixes.last().copied(), std::mem::take(&mut tail_prefixes), tail_pages)
                        }
                        None => (None, Vec::new(), ppb),
                    };
                    match key {
                        Some(h) if self.caching && !self.blocks.contains_key(&h) => {
                            for &p in &prefixes {
                                self.bases.entry(p).or_insert(h);
                            }
                            self.free.extend_from_slice(&pages[keep..]);
                            let block = Block::new(pages[..keep].to_vec(), diff, prefixes.into(), 0, true);
                            self.blocks.insert(h, block);
                            if let Some(base) = diff.and_then(|d| self.blocks.get_mut(&d.base)) {
                                base.diffs.push(h);
                            }
                            self.note_next_use(h, next_use);
                            self.queue_unreferenced(h, next_use);
                        }
                        _ => self.free.extend_from_slice(&pages[own_from..]),
                    }
                    // Cached or freed, the block is unreferenced: it holds its base no more.
                    if let Some(d) = diff {
                        self.unreference(d.base, next_use);
                    }
                }
                Held::Shared(h) => self.unreference(h, next_use),
            }
        }
        // Stale queue entries pile up when cached blocks are re-pinned without eviction; keep the
        // queues within a constant factor of the live entries.
        let queued = self.lru.len() + self.never.len() + self.ahead.len() + self.due.len();
        if queued > 4 * self.blocks.len() + 1024 {
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

/// Page ids `0..capacity`, popped from the end: low ids first.
fn free_list(capacity: usize) -> Vec<u32> {
    (0..u32::try_from(capacity).unwrap_or(u32::MAX)).rev().collect()
}

/// The hashes a block is found by as a diff base: one per whole `page` of `tokens` (the block's
/// leading tokens), of its parent's hash `parent` and the tokens up to that page's end. They differ
/// from full-block hashes (another key), so a prefix never stands for a whole block.
fn prefix_hashes(parent: u64, tokens: &[u32], page: usize) -> Vec<u64> {
    let mut fnv = fnv::FnvHasher::with_key(parent ^ PREFIX_KEY);
    tokens
        .chunks_exact(page.max(1))
        .map(|chunk| {
            for &t in chunk {
                fnv.write(&t.to_le_bytes());
            }
            avalanche(fnv.finish())
        })
        .collect()
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
        assert_eq!(c.allocate(1, &[], 100, &h, 7).unwrap().hit_blocks, 0);
        c.mark_computed(1, 100);
        c.release(1);
        assert_eq!(c.stats().used_pages, 0);
        assert_eq!(c.stats().cached_free_pages, 6);
        assert_eq!(c.allocate(2, &[], 100, &h, 7).unwrap().hit_blocks, 6);
        let s = c.stats();
        assert_eq!((s.query_tokens, s.hit_tokens), (200, 96));
    }

    #[test]
    fn blocks_are_hits_only_once_computed() {
        let mut c = PrefixCache::new(100, 16);
        let h = block_hashes(&toks(1, 64), 16);
        c.allocate(1, &[], 64, &h, 4).unwrap();
        assert_eq!(c.allocate(2, &[], 64, &h, 4).unwrap().hit_blocks, 0);
        c.mark_computed(1, 40);
        assert_eq!(c.lookup(&h), 2);
    }

    #[test]
    fn the_whole_prompt_never_hits() {
        let mut c = PrefixCache::new(100, 16);
        let h = block_hashes(&toks(1, 32), 16);
        c.allocate(1, &[], 32, &h, 2).unwrap();
        c.mark_computed(1, 32);
        c.release(1);
        assert_eq!(c.allocate(2, &[], 32, &h, 2).unwrap().hit_blocks, 1);
    }

    #[test]
    fn no_space_changes_nothing() {
        let mut c = PrefixCache::new(4, 16);
        let h = block_hashes(&toks(1, 48), 16);
        c.allocate(1, &[], 48, &h, 3).unwrap();
        let before = c.stats();
        let err = c.allocate(2, &[], 48, &block_hashes(&toks(2, 48), 16), 3).unwrap_err();
        assert_eq!(err, PrefixCacheError::NoSpace { needed: 3, available: 1, capacity: 4 });
        assert_eq!(c.stats(), before);
        assert!(c.grow(1, 5).is_err());
        assert_eq!(c.held_blocks(1), Some(3));
    }

    #[test]
    fn tail_blocks_are_evicted_before_head_blocks() {
        let mut c = PrefixCache::new(4, 16);
        let h = block_hashes(&toks(1, 64), 16);
        c.allocate(1, &[], 65, &h, 4).unwrap();
        c.mark_computed(1, 64);
        c.release(1);
        // Two new blocks evict the last two blocks of the released prompt.
        c.allocate(2, &[], 32, &block_hashes(&toks(2, 32), 16), 2).unwrap();
        assert_eq!(c.lookup(&h), 2);
        assert_eq!(c.stats().evictions, 2);
    }

    #[test]
    fn output_blocks_are_cached_on_release() {
        let mut c = PrefixCache::new(100, 16);
        let prompt = toks(1, 40);
        let h = block_hashes(&prompt, 16);
        // 40 prompt tokens + 30 computed output tokens = 70 tokens in 5 blocks, 4 of them full.
        c.allocate(1, &[], 40, &h, 5).unwrap();
        c.mark_computed(1, 70);
        let mut all = prompt.clone();
        all.extend(toks(9, 30));
        let later = chain_hashes(h.last().copied(), &all[32..64], 16);
        assert_eq!(later.len(), 2);
        assert_eq!(c.release_caching(1, &later, &[]), 5);
        assert_eq!(c.stats().cached_free_pages, 4);
        assert_eq!(c.stats().used_pages, 0);
        // The next turn repeats the prompt and the answer: 4 full blocks hit.
        all.extend(toks(5, 20));
        assert_eq!(c.allocate(2, &[], all.len(), &block_hashes(&all, 16), 6).unwrap().hit_blocks, 4);
    }

    #[test]
    fn disabled_caching_never_hits() {
        let mut c = PrefixCache::without_caching(10, 16);
        let h = block_hashes(&toks(1, 64), 16);
        c.allocate(1, &[], 64, &h, 4).unwrap();
        c.mark_computed(1, 64);
        c.release(1);
        assert_eq!(c.allocate(2, &[], 64, &h, 4).unwrap().hit_blocks, 0);
        assert_eq!(c.stats().cached_free_pages, 0);
    }

    /// A prompt of `n` tokens that is `a` up to token `k`, then its own.
    fn departing(a: &[u32], k: usize, n: usize) -> Vec<u32> {
        let mut b = a[..k].to_vec();
        b.extend(toks(77, n - k));
        b
    }

    #[test]
    fn a_block_departing_partway_is_a_diff_of_the_cached_one() {
        let mut c = PrefixCache::new(10, 16).with_page_size(4);
        assert_eq!(c.capacity(), 40);
        let a = toks(1, 48);
        c.allocate(1, &a, 48, &block_hashes(&a, 16), 3).unwrap();
        c.mark_computed(1, 48);
        // B shares A's first 27 tokens: block 0 whole, and of block 1 the first 2 pages (8 of its
        // 11 shared tokens: whole pages only).
        let b = departing(&a, 27, 48);
        let hb = block_hashes(&b, 16);
        let hit = c.find(&b, 48, &hb);
        assert_eq!((hit.blocks, hit.tokens), (1, 24));
        assert_eq!(hit.diff.map(|d| d.pages), Some(2));
        let alloc = c.allocate(2, &b, 48, &hb, 3).unwrap();
        assert_eq!((alloc.hit_blocks, alloc.hit_tokens), (1, 24));
        let (ta, tb) = (c.page_table(1).to_vec(), c.page_table(2).to_vec());
        assert_eq!(ta[..6], tb[..6]);
        assert!(tb[6..].iter().all(|p| !ta.contains(p)));
        // A holds 12 pages, B 6 of its own (2 of block 1, 4 of block 2): 18, not 24.
        let s = c.stats();
        assert_eq!((s.used_pages, s.table_pages, s.hit_tokens), (18, 24, 24));
    }

    #[test]
    fn a_base_stays_while_its_diff_is_used_and_goes_with_its_diffs() {
        let mut c = PrefixCache::new(4, 16).with_page_size(4);
        let a = toks(1, 32);
        c.allocate(1, &a, 33, &block_hashes(&a, 16), 3).unwrap();
        c.mark_computed(1, 32);
        c.release(1);
        // B departs from A at token 20: block 0 hits, block 1 shares A's first page.
        let b = departing(&a, 20, 32);
        let hb = block_hashes(&b, 16);
        assert_eq!(c.allocate(2, &b, 33, &hb, 3).unwrap().hit_tokens, 20);
        // 16 pages: A's 8 cached (4 referenced by B), B's 3 + 4 own; 1 free. A third prompt
        // needing 2 pages can evict nothing B uses, so it gets none.
        assert_eq!(c.available(), 1);
        let other = toks(3, 8);
        let err = c.allocate(3, &other, 8, &block_hashes(&other, 16), 1).unwrap_err();
        assert!(matches!(err, PrefixCacheError::NoSpace { needed: 4, available: 1, .. }));
        c.mark_computed(2, 32);
        c.release(2);
        // Everything is evictable now: A's two blocks, B's diff (3 own pages; its last block, not
        // full, is freed). A's block 1 is evicted with B's diff of it.
        let s = c.stats();
        assert_eq!((s.used_pages, s.cached_free_pages), (0, 11));
        let whole = toks(4, 60);
        c.allocate(4, &whole, 60, &block_hashes(&whole, 16), 4).unwrap();
        assert_eq!(c.lookup(&block_hashes(&a, 16)), 0);
        assert_eq!(c.lookup(&hb), 0);
        assert_eq!(c.stats().evictions, 3);
    }

    #[test]
    fn a_whole_matching_block_is_a_hit_not_a_diff_and_one_page_blocks_never_diff() {
        let a = toks(1, 48);
        for page in [4, 16] {
            let mut c = PrefixCache::new(20, 16).with_page_size(page);
            c.allocate(1, &a, 48, &block_hashes(&a, 16), 3).unwrap();
            c.mark_computed(1, 48);
            let b = departing(&a, 32, 48);
            let hit = c.find(&b, 48, &block_hashes(&b, 16));
            assert_eq!((hit.blocks, hit.diff, hit.tokens), (2, None, 32));
            let b = departing(&a, 40, 48);
            let hit = c.find(&b, 48, &block_hashes(&b, 16));
            assert_eq!(hit.tokens, if page == 4 { 40 } else { 32 });
            // The last token is always computed: a prompt that is A's first 44 tokens shares 2 of
            // block 2's pages, not 3.
            let hit = c.find(&a[..44], 44, &block_hashes(&a[..44], 16));
            assert_eq!(hit.tokens, if page == 4 { 40 } else { 32 });
        }
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
        c.allocate(seq, &[], 65, &h, 5).unwrap();
        c.mark_computed(seq, 64);
        c.release_hinted(seq, &[], &[], next_use);
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
            assert_eq!(c.stats().cached_free_pages, 12);
            // Six new blocks, one free: five evicted. LRU takes the oldest releases (the agent due
            // back first, then the late one's tail); next-use takes the done agent's, then the
            // late agent's tail.
            c.allocate(4, &[], 96, &block_hashes(&toks(4, 96), 16), 6).unwrap();
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
        c.allocate(1, &[], 65, &ha, 5).unwrap();
        c.mark_computed(1, 64);
        assert_eq!(c.allocate(2, &[], 65, &hb, 5).unwrap().hit_blocks, 2);
        // A is back at 5 and releases while B still holds the prefix; B is done.
        c.release_hinted(1, &[], &[], at(5, 10));
        c.mark_computed(2, 64);
        c.release_hinted(2, &[], &[], NextUse::Never);
        // A third agent, back at 20, releases 4 blocks of its own.
        let other = serve_and_release(&mut c, 4, 9, at(20, 40));
        // Four new blocks, one free: three evicted, B's own 2 blocks (never), then the furthest
        // return's tail; not the prefix B released last, which A is due back for.
        c.allocate(5, &[], 64, &block_hashes(&toks(7, 64), 16), 4).unwrap();
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
        c.allocate(3, &[], 32, &block_hashes(&toks(3, 32), 16), 2).unwrap();
        assert_eq!((c.lookup(&early), c.lookup(&late)), (4, 3));
        // At 2 s its prediction is spent: it has not come back, so its blocks go first.
        d.advance(secs(2));
        d.allocate(3, &[], 32, &block_hashes(&toks(3, 32), 16), 2).unwrap();
        assert_eq!((d.lookup(&early), d.lookup(&late)), (3, 4));
    }

    /// Two agents sharing a 2-block prefix, each with 2 blocks of its own, released in order with
    /// the predictions given.
    fn siblings(first: NextUse, second: NextUse) -> (PrefixCache, Vec<u64>, Vec<u64>) {
        let mut c = PrefixCache::new(9, 16).with_eviction(Eviction::NextUse);
        let (ha, hb) = (block_hashes(&prompt_tokens(0, 64), 16), block_hashes(&prompt_tokens(1, 64), 16));
        c.allocate(1, &[], 65, &ha, 5).unwrap();
        c.mark_computed(1, 64);
        c.release_hinted(1, &[], &[], first);
        assert_eq!(c.allocate(2, &[], 65, &hb, 5).unwrap().hit_blocks, 2);
        c.mark_computed(2, 64);
        c.release_hinted(2, &[], &[], second);
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
            c.allocate(3, &[], 80, &block_hashes(&toks(3, 80), 16), 5).unwrap();
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
        c.allocate(3, &[], 96, &block_hashes(&toks(3, 96), 16), 6).unwrap();
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
                c.allocate(u64::from(seq), &[], tokens.len(), &block_hashes(&tokens, 16), need).is_ok()
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
                c.release_hinted(u64::from(seq), &[], &[], next_use);
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
            && current.iter().map(|h| c.blocks[h].own().len()).sum::<usize>() == c.unreferenced
    }

    /// Prompts share prefixes: prompt `p` is the first `len` tokens of a stream that depends on `p`
    /// only after token 40, so different prompts share their first 2 blocks.
    fn prompt_tokens(p: u8, len: usize) -> Vec<u32> {
        (0..len as u32).map(|i| if i < 40 { i } else { i * 7 + u32::from(p) * 100_000 }).collect()
    }

    proptest! {
        /// Under any operations, with any page size: the counters add up, every page has one
        /// owner, pinned blocks stay, and (modelling the KV rows themselves) every token a sequence
        /// finds computed, in a hit block or in the pages a diff block shares with its base, sits in
        /// a row written for the same prefix.
        #[test]
        fn invariants_hold_under_any_operations(
            ops in prop::collection::vec(op(), 1..80),
            cap in 1..24usize,
            next_use in any::<bool>(),
            page in prop::sample::select(vec![16usize, 8, 4, 1]),
        ) {
            let eviction = if next_use { Eviction::NextUse } else { Eviction::Lru };
            let mut c = PrefixCache::new(cap, 16).with_eviction(eviction).with_page_size(page);
            let ppb = 16 / page;
            let cap_pages = cap * ppb;
            // Per live sequence: its prompt, blocks held, and rows written (all below it computed).
            let mut live: HashMap<u64, (u8, usize, usize)> = HashMap::new();
            // (page, row) -> the content written there: which prefix's KV (see `content`).
            let mut rows: HashMap<(u32, usize), u64> = HashMap::new();
            let mut now = Duration::ZERO;
            for op in ops {
                match op {
                    Op::Allocate { seq, prompt, len, extra } => {
                        let seq = u64::from(seq);
                        let tokens = prompt_tokens(prompt, usize::from(len));
                        let h = block_hashes(&tokens, 16);
                        let need = c.blocks_for(tokens.len()) + usize::from(extra);
                        let before = c.stats();
                        if let Ok(a) = c.allocate(seq, &tokens, tokens.len(), &h, need) {
                            prop_assert!(!live.contains_key(&seq));
                            prop_assert!(a.hit_tokens < tokens.len());
                            prop_assert!(a.hit_tokens >= a.hit_blocks * 16 && a.hit_tokens % page == 0);
                            let table = c.page_table(seq);
                            for pos in 0..a.hit_tokens {
                                let at = (table[pos / page], pos % page);
                                prop_assert_eq!(rows.get(&at), Some(&content(prompt, pos)), "row {:?}", at);
                            }
                            live.insert(seq, (prompt, need.max(a.hit_blocks), a.hit_tokens));
                            let after = c.stats();
                            prop_assert!(after.hit_tokens - before.hit_tokens <= after.query_tokens - before.query_tokens);
                        } else {
                            prop_assert_eq!(c.stats(), before);
                        }
                    }
                    Op::Compute { seq, tokens } => {
                        let seq = u64::from(seq);
                        c.mark_computed(seq, usize::from(tokens));
                        if let Some((prompt, n, written)) = live.get_mut(&seq) {
                            // The model runner writes the rows of the tokens it computes.
                            let table = c.page_table(seq);
                            let upto = usize::from(tokens).min(*n * 16);
                            for pos in *written..upto {
                                rows.insert((table[pos / page], pos % page), content(*prompt, pos));
                            }
                            *written = (*written).max(upto);
                        }
                    }
                    Op::Grow { seq, extra } => {
                        let seq = u64::from(seq);
                        if let Some((_, n, _)) = live.get_mut(&seq) {
                            if c.grow(seq, *n + usize::from(extra)).is_ok() {
                                *n += usize::from(extra);
                            }
                        } else {
                            prop_assert!(c.grow(seq, 1).is_err());
                        }
                    }
                    Op::Release { seq, hint: code } => {
                        let seq = u64::from(seq);
                        // The computed tokens of the block after the prompt's full ones, when it is
                        // not full itself: they stay as a diff base.
                        let tail = live.get(&seq).map_or_else(Vec::new, |&(prompt, _, written)| {
                            let full = c.prompt_hashes(seq).len() * 16;
                            let tokens = prompt_tokens(prompt, written);
                            if written > full && written < full + 16 { tokens[full..].to_vec() } else { Vec::new() }
                        });
                        let held = c.release_hinted(seq, &[], &tail, hint(code, now));
                        prop_assert_eq!(held, live.remove(&seq).map_or(0, |(_, n, _)| n));
                    }
                    Op::Advance { .. } | Op::Withdraw { .. } => {
                        apply(&mut c, &op, &mut now, true);
                    }
                }
                let s = c.stats();
                prop_assert_eq!(s.table_pages, live.values().map(|(_, n, _)| *n * ppb).sum::<usize>());
                prop_assert_eq!(s.sequences, live.len());
                prop_assert!(every_cached_block_is_queued(&c));
                prop_assert!(s.used_pages + s.cached_free_pages <= cap_pages);
                prop_assert!(ids_are_consistent(&c, cap_pages));
                let distinct: std::collections::HashSet<u32> =
                    live.keys().flat_map(|seq| c.page_table(*seq).iter().copied()).collect();
                prop_assert!(distinct.len() <= s.used_pages);
                if ppb == 1 {
                    prop_assert_eq!(s.used_pages, distinct.len());
                }
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

    /// Every physical page is in exactly one place: the free list, a registered block's own pages,
    /// or the own pages of one private block of one sequence; a registered block's pages are the
    /// ones in every table that lists it, and a diff block's leading pages are its base's.
    fn ids_are_consistent(c: &PrefixCache, cap: usize) -> bool {
        let ppb = c.pages_per_block;
        let mut owner: HashMap<u32, &str> = HashMap::new();
        let mut ok = true;
        for &id in &c.free {
            ok &= owner.insert(id, "free").is_none();
        }
        for b in c.blocks.values() {
            // Whole, or a partial block kept as a base (never held by a sequence).
            ok &= b.pages.len() <= ppb && b.own_from < b.pages.len();
            for &id in b.own() {
                ok &= owner.insert(id, "registered").is_none();
            }
            if let Some(base) = b.base {
                ok &= c.blocks.get(&base).is_some_and(|a| a.pages[..b.own_from] == b.pages[..b.own_from]);
                // A referenced diff block references its base.
                ok &= b.refs == 0 || c.blocks[&base].refs > 0;
            }
        }
        for s in c.seqs.values() {
            ok &= s.pages.len() == s.held.len() * ppb;
            for (i, held) in s.held.iter().enumerate() {
                let pages = &s.pages[i * ppb..(i + 1) * ppb];
                match held {
                    Held::Shared(h) => ok &= c.blocks.get(h).is_some_and(|b| *b.pages == *pages),
                    Held::Private => {
                        let own_from = s.diff.filter(|&(at, _)| at == i).map_or(0, |(_, d)| d.pages);
                        for &id in &pages[own_from..] {
                            ok &= owner.insert(id, "private").is_none();
                        }
                    }
                }
            }
        }
        ok && owner.len() == cap && owner.keys().all(|&id| (id as usize) < cap)
    }

    /// What the KV row of position `pos` of prompt `p` holds: the prefix before it decides it,
    /// and `prompt_tokens` are the same for every prompt up to token 40.
    fn content(p: u8, pos: usize) -> u64 {
        if pos < 40 {
            pos as u64
        } else {
            (u64::from(p) + 1) << 32 | pos as u64
        }
    }
}
