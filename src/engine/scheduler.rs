//! The continuous-batching scheduler, as vLLM v1 schedules.
//!
//! Each step: running sequences are served first, in admission order, one token each when decoding
//! or a chunk of their prompt when prefilling, within the step's token budget
//! (`max_num_batched_tokens`); the rest of the budget admits waiting requests first come, first
//! served, up to `max_num_seqs` running. KV blocks are allocated per scheduled chunk; when a running
//! sequence cannot get a block, the most recently admitted sequence is preempted and recomputed later
//! (vLLM's recompute preemption), and no new request is admitted in that step. The step that
//! completes a sequence's prefill produces its first output token.
//!
//! The scheduler does not run steps: [`Scheduler::schedule`] decides one, the caller executes it
//! (the simulator by its step-time model, the embedded engine by the model runner, from
//! [`Scheduler::layout`]) and hands back the sampled tokens with [`Scheduler::complete_step`]. Time
//! is the caller's too ([`Scheduler::now`]): simulated time in the simulator, real time in the engine.
//!
//! Tool-wait retention: a request carrying a [`Pin`] keeps its KV blocks after it finishes, under
//! its agent's key, until the pin's deadline; the agent's next request with the same key takes
//! them over (its whole history is then a prefix-cache hit). Pins are a hint, never a reason to
//! stall: a pin is dropped whenever a block is missing, before any preemption and before a waiting
//! request is turned away (the oldest, or under [`Eviction::NextUse`] the one whose
//! agent is due back last), and expired pins are dropped at each step.
//!
//! Eviction by next use: a request carrying a [`Pin`] also says when its agent is expected back
//! ([`Pin::return_after`], from the end of the request; `None`: the agent is done), which the
//! block manager orders evictions by under [`Eviction::NextUse`] (see `blocks`). The prediction
//! stands until twice that wait has passed, as the pin does.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use super::blocks::{block_hashes, chain_hashes, Eviction, NextUse, PrefixCache};
use super::metrics::EngineMetrics;

/// The limits a scheduler works within (vLLM's engine arguments of the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Tokens per KV block: the unit of prefix caching (a block hits only whole).
    pub block_size: usize,
    /// Tokens per page of the paged KV cache; divides `block_size`. Smaller pages let a block that
    /// departs from a cached one partway share the pages before (a diff, see `blocks`).
    pub page_size: usize,
    /// Blocks in the KV cache.
    pub kv_capacity_blocks: usize,
    pub max_num_seqs: usize,
    /// Tokens computed per step, prefill chunks and decodes together.
    pub max_num_batched_tokens: usize,
    pub enable_prefix_caching: bool,
    /// Which cached blocks go first when blocks are short.
    pub eviction: Eviction,
}

impl SchedulerConfig {
    pub fn kv_capacity_tokens(&self) -> usize {
        self.kv_capacity_blocks * self.block_size
    }

    /// Why these limits cannot run, if they cannot.
    pub fn invalid(&self) -> Option<String> {
        if self.block_size == 0 || self.kv_capacity_blocks == 0 {
            return Some("block_size and the KV cache's blocks must be positive".into());
        }
        if self.page_size == 0 || self.block_size % self.page_size != 0 {
            return Some(format!(
                "the KV page size ({}) must divide the block size ({})",
                self.page_size, self.block_size
            ));
        }
        if self.max_num_seqs == 0 || self.max_num_batched_tokens == 0 {
            return Some("max_num_seqs and max_num_batched_tokens must be positive".into());
        }
        None
    }

    /// The event that refuses `request` at once, when it can never run: an empty prompt, or more
    /// tokens than the whole KV cache holds (a server answers this with HTTP 400).
    pub fn rejection(&self, request: &EngineRequest) -> Option<EngineEvent> {
        let capacity = self.kv_capacity_tokens();
        let tokens = request.prompt.len() + request.max_new_tokens;
        (request.prompt.is_empty() || tokens > capacity).then_some(EngineEvent::Rejected {
            prompt_tokens: request.prompt.len(),
            max_new_tokens: request.max_new_tokens,
            kv_capacity_tokens: capacity,
        })
    }
}

/// How the model runner picks each next token of a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0: greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches `top_p` (1: all).
    pub top_p: f64,
    /// Only the `top_k` most likely tokens (0: all).
    pub top_k: u32,
    /// Makes sampling reproducible: the draw for output token `i` depends only on the seed, `i` and
    /// the logits.
    pub seed: Option<u64>,
    /// Report each output token's log-probability and those of this many most likely tokens
    /// ([`TokenLogprobs`], vLLM's `logprobs`); `None`: none.
    pub logprobs: Option<u32>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: 0, seed: None, logprobs: None }
    }
}

/// An output token's log-probability and the most likely tokens' at its position, from the model's
/// raw distribution (the log-softmax of its logits before temperature, top-k/top-p and banned
/// tokens, as vLLM's default `raw_logprobs`).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// `(token id, log-probability)`, the most likely first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// The most output tokens to produce.
    pub max_new_tokens: usize,
    /// The ids of the output, when the caller decides them (the simulator; empty if not known). The
    /// full KV blocks they complete are cached when the request ends, as vLLM caches decode blocks,
    /// so a next turn whose prompt repeats this answer hits them. The engine fills this with the
    /// sampled tokens instead.
    pub output_tokens: Vec<u32>,
    /// Tokens that end the output (EOS and `stop_token_ids`); the stop token counts as output.
    pub stop_token_ids: Vec<u32>,
    /// Stop tokens are suppressed until this many tokens are out.
    pub min_tokens: usize,
    pub sampling: Sampling,
    /// Keep the request's KV blocks after it finishes, for its agent's return (the client's
    /// tool-wait hint).
    pub pin: Option<Pin>,
    /// Set by the caller to end the output where it is, as a stop token would (a stop string in its
    /// text): the request finishes at the scheduler's next step, or as its next token goes out, and
    /// its pin holds. Dropping the receiver without it aborts the request instead.
    pub end: Option<EndSignal>,
}

/// A caller's signal that a request's output ends now (see [`EngineRequest::end`]). Clones share
/// the signal; requests compare equal when they share it.
#[derive(Debug, Clone, Default)]
pub struct EndSignal(Arc<AtomicBool>);

impl EndSignal {
    pub fn end(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_ended(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

impl PartialEq for EndSignal {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// A finished request's blocks held for its agent: they cannot be evicted until the agent's next
/// request is admitted (which takes them over), `hold` passes from the request's end, or a request
/// needs the room. A request whose `hold` is zero pins nothing but still takes its agent's pin over
/// (an agent's last turn, which has no tool wait to come back from, or retention turned off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The agent; its next request with the same key takes the blocks over.
    pub key: String,
    pub hold: Duration,
    /// When the agent's next request is expected, from this one's end (`None`: it is done): the
    /// blocks' predicted next use, for [`Eviction::NextUse`], once they are released.
    pub return_after: Option<Duration>,
}

impl Pin {
    /// The pin for a tool-wait hint: the blocks are held for twice the expected wait, at most
    /// `ttl`, and expected back after the wait. `wait` and `ttl` are in the scheduler's time.
    pub fn for_tool_wait(key: String, wait: Duration, ttl: Duration) -> Self {
        Self { key, hold: wait.saturating_mul(2).min(ttl), return_after: Some(wait) }
    }

    /// The prediction for blocks released by a request that ended at `end`.
    fn next_use(&self, end: Duration) -> NextUse {
        match self.return_after {
            None => NextUse::Never,
            Some(wait) => {
                NextUse::At { at: end.saturating_add(wait), until: end.saturating_add(wait.saturating_mul(2)) }
            }
        }
    }
}

/// What an agent's last release predicted for its blocks, kept until the agent is back, says it is
/// done ([`Scheduler::agent_done`]), or the prediction is spent: a done agent's prediction is
/// withdrawn, so its blocks are evicted before those of agents still coming back.
struct Predicted {
    hashes: Vec<u64>,
    next_use: NextUse,
}

/// The computed blocks after a sequence's full prompt blocks whose tokens are known: the chained
/// hashes of the full ones (`later`), and the tokens of the partial one after them (`tail`).
#[derive(Debug, Default)]
struct Known {
    later: Vec<u64>,
    tail: Vec<u32>,
}

/// The blocks of a finished sequence, held for its agent (see [`Pin`]).
struct Pinned {
    seq: u64,
    /// When the pin was made (its sequence finished) and when it ends.
    made: Duration,
    until: Duration,
    known: Known,
    /// Their predicted next use once released.
    next_use: NextUse,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// The request was admitted to the running batch; its prefix-cache hit is known.
    Started { cached_tokens: usize },
    /// Output token `index` (0-based) was produced; `id` is the sampled token (in the simulator, the
    /// request's `output_tokens[index]`, 0 when not given). `stop`: it is a stop token that ends the
    /// output (once `min_tokens` are out, and not the last token `max_new_tokens` allow, which ends
    /// it by length, as vLLM's `check_stop` has it).
    /// `logprobs`: when the request's sampling asks for them (and the executor computes them).
    Token { index: usize, id: u32, stop: bool, logprobs: Option<TokenLogprobs> },
    /// The last event of a served request. Durations are the scheduler's time from arrival.
    Finished {
        prompt_tokens: usize,
        cached_tokens: usize,
        completion_tokens: usize,
        queue_time: Duration,
        ttft: Duration,
        total: Duration,
        /// A stop token ended it (otherwise `max_new_tokens` did).
        stopped: bool,
    },
    /// The request can never run (see [`SchedulerConfig::rejection`]). It is its only event.
    Rejected { prompt_tokens: usize, max_new_tokens: usize, kv_capacity_tokens: usize },
}

/// What one step computes, as the simulator's step-time model sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepLoad {
    pub prefill_tokens: u64,
    /// Sum over prefill chunks of `chunk_tokens * context_len_at_chunk_end`.
    pub prefill_attn: u64,
    pub decode_seqs: u64,
    pub kv_tokens_read: u64,
}

/// The layout of one step for the model runner (`batchagent_rs.engine.StepLayout`): the new tokens
/// of every scheduled sequence packed one sequence after another, no padding.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepLayout {
    pub input_ids: Vec<i64>,
    /// Each token's position in its sequence.
    pub positions: Vec<i64>,
    /// `seqs + 1` entries: sequence `i`'s tokens are `input_ids[starts[i]..starts[i + 1]]`.
    pub query_starts: Vec<i64>,
    /// Tokens in the cache for each sequence once this step's are written.
    pub context_lens: Vec<i64>,
    /// `seqs x table_width` page ids (pages of `page_size` tokens), row-major, each row padded
    /// with 0.
    pub block_tables: Vec<i32>,
    pub table_width: usize,
    /// Cache slot of each new token: `page * page_size + offset`.
    pub slot_mapping: Vec<i64>,
    /// Per sequence: how to sample its next token, which output token that is (for seeded
    /// sampling), and the tokens banned from it (stop tokens before `min_tokens`).
    pub sampling: Vec<Sampling>,
    pub output_index: Vec<u64>,
    pub banned: Vec<Vec<u32>>,
}

impl StepLayout {
    pub fn num_seqs(&self) -> usize {
        self.context_lens.len()
    }
}

struct Seq {
    id: u64,
    tx: UnboundedSender<EngineEvent>,
    prompt: Vec<u32>,
    output: Vec<u32>,
    stop_ids: Vec<u32>,
    min_tokens: usize,
    sampling: Sampling,
    /// Chained hashes of the prompt's full blocks, made at first admission.
    hashes: Vec<u64>,
    max_new: usize,
    generated: usize,
    /// Tokens whose KV is computed (vLLM's `num_computed_tokens`).
    computed: usize,
    /// Tokens scheduled in the current step.
    step_tokens: usize,
    arrival: Duration,
    admitted: Option<Duration>,
    first_token: Option<Duration>,
    cached_tokens: usize,
    done: bool,
    pin: Option<Pin>,
    end: Option<EndSignal>,
}

impl Seq {
    fn ended(&self) -> bool {
        self.end.as_ref().is_some_and(EndSignal::is_ended)
    }

    /// Tokens whose KV the sequence needs: the prompt and every output token but the newest.
    fn total(&self) -> usize {
        self.prompt.len() + self.generated
    }

    fn token(&self, position: usize) -> u32 {
        match position.checked_sub(self.prompt.len()) {
            None => self.prompt[position],
            Some(i) => self.output.get(i).copied().unwrap_or(0),
        }
    }

    /// What is known of the computed blocks after the prompt's full blocks (the prompt's tail and
    /// the produced part of `output`), for the block manager to keep on release.
    fn known_after_prompt(&self, block_size: usize) -> Known {
        let from = self.hashes.len() * block_size;
        let known = (self.prompt.len() + self.output.len().min(self.generated)).min(self.computed);
        if known <= from {
            return Known::default();
        }
        let tokens: Vec<u32> = (from..known).map(|p| self.token(p)).collect();
        let upto = (known - from) / block_size * block_size;
        Known {
            later: chain_hashes(self.hashes.last().copied(), &tokens[..upto], block_size),
            tail: tokens[upto..].to_vec(),
        }
    }
}

/// The scheduler and the block manager of one engine.
pub struct Scheduler {
    config: SchedulerConfig,
    cache: PrefixCache,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    pins: HashMap<String, Pinned>,
    /// Hinted releases not held by a pin, by agent.
    predicted: HashMap<String, Predicted>,
    /// `predicted` is pruned of spent predictions when it grows past this.
    prune_predicted_at: usize,
    next_id: u64,
    /// The caller's clock: time since the engine started.
    pub now: Duration,
    m: EngineMetrics,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("config", &self.config)
            .field("waiting", &self.waiting.len())
            .field("running", &self.running.len())
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        let blocks = config.kv_capacity_blocks;
        let cache = if config.enable_prefix_caching {
            PrefixCache::new(blocks, config.block_size)
        } else {
            PrefixCache::without_caching(blocks, config.block_size)
        }
        .with_eviction(config.eviction)
        .with_page_size(config.page_size);
        Self {
            config,
            cache,
            waiting: VecDeque::new(),
            running: Vec::new(),
            pins: HashMap::new(),
            predicted: HashMap::new(),
            prune_predicted_at: 64,
            next_id: 0,
            now: Duration::ZERO,
            m: EngineMetrics::default(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Queues a request that arrived at `arrival`; its events go to `tx`, and closing `tx`'s receiver
    /// aborts it. The caller has checked [`SchedulerConfig::rejection`].
    pub fn enqueue(&mut self, request: EngineRequest, tx: UnboundedSender<EngineEvent>, arrival: Duration) {
        self.next_id += 1;
        self.waiting.push_back(Seq {
            id: self.next_id,
            tx,
            prompt: request.prompt,
            output: request.output_tokens,
            stop_ids: request.stop_token_ids,
            min_tokens: request.min_tokens,
            sampling: request.sampling,
            hashes: Vec::new(),
            max_new: request.max_new_tokens,
            generated: 0,
            computed: 0,
            step_tokens: 0,
            arrival,
            admitted: None,
            first_token: None,
            cached_tokens: 0,
            done: false,
            pin: request.pin,
            end: request.end,
        });
    }

    /// Releases `key`'s pin (its blocks stay cached, evictable); `false` if it has none.
    fn unpin(&mut self, key: &str) -> bool {
        let Some(pinned) = self.pins.remove(key) else { return false };
        self.release_predicted(key.to_owned(), pinned.seq, &pinned.known, pinned.next_use);
        true
    }

    /// Releases sequence `seq` of agent `key` with its prediction, remembered for
    /// [`Scheduler::agent_done`].
    fn release_predicted(&mut self, key: String, seq: u64, known: &Known, next_use: NextUse) {
        if matches!(next_use, NextUse::At { .. }) && self.config.eviction == Eviction::NextUse {
            let mut hashes = self.cache.prompt_hashes(seq).to_vec();
            hashes.extend_from_slice(&known.later);
            self.predicted.insert(key, Predicted { hashes, next_use });
            if self.predicted.len() > self.prune_predicted_at {
                let now = self.now;
                self.predicted.retain(|_, p| matches!(p.next_use, NextUse::At { until, .. } if until > now));
                self.prune_predicted_at = 2 * self.predicted.len() + 64;
            }
        }
        self.cache.release_hinted(seq, &known.later, &known.tail, next_use);
    }

    /// Agent `key` is done (the engine's server, once a hinted reply turns out to call no tool, or
    /// the client saying so): its pin is released with no next use, and the prediction its last
    /// release made is withdrawn, so its blocks are the first to evict. `false` if it had neither.
    /// A released pin is counted with the expired.
    pub fn agent_done(&mut self, key: &str) -> bool {
        let predicted = self.predicted.remove(key);
        if let Some(p) = &predicted {
            self.cache.withdraw_prediction(&p.hashes, p.next_use);
        }
        let Some(pinned) = self.pins.remove(key) else { return predicted.is_some() };
        self.cache.release_hinted(pinned.seq, &pinned.known.later, &pinned.known.tail, NextUse::Never);
        self.m.pins_expired += 1;
        true
    }

    /// Releases a pin to make room; `false` if there is none. Under [`Eviction::Lru`], the oldest
    /// pin (least recently released, as LRU takes blocks; pins' holds differ with their agents'
    /// predicted waits, so the one ending first may be the newest); under [`Eviction::NextUse`], the
    /// one whose agent is due back last (Belady, as for the blocks themselves), the one ending first
    /// among equals.
    fn drop_a_pin(&mut self) -> bool {
        let by_age =
            |a: &(&String, &Pinned), b: &(&String, &Pinned)| a.1.made.cmp(&b.1.made).then_with(|| a.0.cmp(b.0));
        let by_deadline =
            |a: &(&String, &Pinned), b: &(&String, &Pinned)| a.1.until.cmp(&b.1.until).then_with(|| a.0.cmp(b.0));
        // Larger is further: not coming back, unknown, then the predicted return.
        let rank = |p: &Pinned| match p.next_use {
            NextUse::Never => (2, Duration::ZERO),
            NextUse::Unknown => (1, Duration::ZERO),
            NextUse::At { at, .. } => (0, at),
        };
        let chosen = match self.config.eviction {
            Eviction::Lru => self.pins.iter().min_by(by_age),
            Eviction::NextUse => {
                self.pins.iter().min_by(|a, b| rank(b.1).cmp(&rank(a.1)).then_with(|| by_deadline(a, b)))
            }
        };
        let Some(key) = chosen.map(|(k, _)| k.clone()) else { return false };
        self.m.pins_dropped += 1;
        self.unpin(&key)
    }

    /// Releases the pins whose deadline is at or before [`Scheduler::now`].
    fn expire_pins(&mut self) {
        let now = self.now;
        let ended: Vec<String> = self.pins.iter().filter(|(_, p)| p.until <= now).map(|(k, _)| k.clone()).collect();
        for key in ended {
            self.m.pins_expired += 1;
            self.unpin(&key);
        }
    }

    /// The agents whose blocks are pinned now, with each pin's deadline.
    pub fn pinned(&self) -> Vec<(String, Duration)> {
        let mut pins: Vec<_> = self.pins.iter().map(|(k, p)| (k.clone(), p.until)).collect();
        pins.sort();
        pins
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// The counters, for the caller to add its own (the simulator's busy time).
    pub fn metrics_mut(&mut self) -> &mut EngineMetrics {
        &mut self.m
    }

    /// Chooses this step's work; returns what the step computes, or `None` if nothing can run.
    pub fn schedule(&mut self) -> Option<StepLoad> {
        // Outputs their callers ended (a stop string): finished as by a stop token, pins kept.
        let now = self.now;
        let mut ended = false;
        for s in self.running.iter_mut().filter(|s| !s.done && s.ended()) {
            finish(s, now, true, &mut self.m);
            ended = true;
        }
        if ended {
            self.retire_done();
        }
        let cache = &mut self.cache;
        let m = &mut self.m;
        let block_size = self.config.block_size;
        self.running.retain(|s| {
            if s.tx.is_closed() {
                // As a sequence that finished (and vLLM, for any request it frees): its computed
                // blocks stay cached, the output's too, for a next turn that repeats them.
                let known = s.known_after_prompt(block_size);
                cache.release_caching(s.id, &known.later, &known.tail);
                m.requests_aborted += 1;
                return false;
            }
            true
        });
        self.expire_pins();
        self.cache.advance(self.now);

        let block_size = self.config.block_size;
        let mut budget = self.config.max_num_batched_tokens;
        let mut load = StepLoad::default();
        let mut scheduled_any = false;
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let (id, computed, need) = {
                let s = &self.running[i];
                (s.id, s.computed, s.total() - s.computed)
            };
            let n = need.min(budget);
            let blocks = self.cache.blocks_for(computed + n);
            let mut fits = true;
            while self.cache.grow(id, blocks).is_err() {
                if self.drop_a_pin() {
                    continue;
                }
                let Some(mut victim) = self.running.pop() else { break };
                self.cache.release(victim.id);
                victim.computed = 0;
                victim.step_tokens = 0;
                self.waiting.push_front(victim);
                self.m.preemptions += 1;
                preempted = true;
                if self.running.len() <= i {
                    fits = false;
                    break;
                }
            }
            if !fits {
                break;
            }
            let s = &mut self.running[i];
            s.step_tokens = n;
            account(&mut load, s, n);
            scheduled_any = true;
            budget -= n;
            i += 1;
        }

        while !preempted && budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(front) = self.waiting.front_mut() else { break };
            if front.tx.is_closed() {
                self.waiting.pop_front();
                self.m.requests_aborted += 1;
                continue;
            }
            if front.hashes.is_empty() && self.config.enable_prefix_caching {
                front.hashes = block_hashes(&front.prompt, block_size);
            }
            // The agent is back: its pinned blocks (and the hashes of its answer's blocks) become
            // ordinary cached blocks, which the lookup below finds and the allocation references.
            if let Some(key) = front.pin.as_ref().map(|p| p.key.clone()) {
                if self.unpin(&key) {
                    self.m.pins_returned += 1;
                }
                self.predicted.remove(&key);
            }
            let Some(front) = self.waiting.front_mut() else { break };
            let total = front.total();
            let hit_tokens = self.cache.find(&front.prompt, total, &front.hashes).tokens;
            let n = (total - hit_tokens).min(budget);
            let blocks = self.cache.blocks_for(hit_tokens + n);
            let Some(mut s) = self.waiting.pop_front() else { break };
            let alloc = loop {
                match self.cache.allocate(s.id, &s.prompt, total, &s.hashes, blocks) {
                    Ok(alloc) => break Some(alloc),
                    Err(_) if self.drop_a_pin() => {}
                    Err(_) => break None,
                }
            };
            let Some(alloc) = alloc else {
                self.waiting.push_front(s);
                break;
            };
            s.computed = alloc.hit_tokens;
            let n = (total - s.computed).min(budget);
            if s.admitted.is_none() {
                s.admitted = Some(self.now);
                s.cached_tokens = s.computed;
                self.m.prompt_tokens += s.prompt.len() as u64;
                if s.tx.send(EngineEvent::Started { cached_tokens: s.cached_tokens }).is_err() {
                    self.cache.release(s.id);
                    self.m.requests_aborted += 1;
                    continue;
                }
            }
            s.step_tokens = n;
            account(&mut load, &s, n);
            scheduled_any = true;
            budget -= n;
            self.running.push(s);
        }
        scheduled_any.then_some(load)
    }

    /// The scheduled step as the model runner takes it: sequences in the order `complete_step`
    /// expects their tokens back.
    pub fn layout(&self) -> StepLayout {
        let page_size = self.cache.page_size();
        let scheduled = || self.running.iter().filter(|s| s.step_tokens > 0);
        let width = scheduled().map(|s| self.cache.page_table(s.id).len()).max().unwrap_or(0);
        let mut l = StepLayout { table_width: width, query_starts: vec![0], ..StepLayout::default() };
        for s in scheduled() {
            let table = self.cache.page_table(s.id);
            let end = s.computed + s.step_tokens;
            for p in s.computed..end {
                l.input_ids.push(i64::from(s.token(p)));
                l.positions.push(p as i64);
                let page = table.get(p / page_size).copied().unwrap_or(0);
                l.slot_mapping.push(i64::from(page) * page_size as i64 + (p % page_size) as i64);
            }
            l.query_starts.push(l.input_ids.len() as i64);
            l.context_lens.push(end as i64);
            l.block_tables.extend(table.iter().map(|&b| b as i32));
            l.block_tables.extend(std::iter::repeat_n(0, width - table.len()));
            l.sampling.push(s.sampling);
            l.output_index.push(s.generated as u64);
            l.banned.push(if s.generated < s.min_tokens { s.stop_ids.clone() } else { Vec::new() });
        }
        l
    }

    /// Applies the step that just ended at `self.now`: computed tokens, output tokens, finished
    /// requests. `sampled` holds one token per sequence of the step's layout, in its order (a
    /// sequence still in the middle of its prompt ignores its token); `None` when the caller
    /// samples nothing (the simulator: tokens come from `output_tokens`).
    pub fn complete_step(&mut self, sampled: Option<&[u32]>) {
        self.complete_step_with_logprobs(sampled, Vec::new());
    }

    /// [`Self::complete_step`] with each row's logprobs (empty, or one entry per row of the layout:
    /// `Some` for the rows whose sampling asked for them).
    pub fn complete_step_with_logprobs(&mut self, sampled: Option<&[u32]>, mut logprobs: Vec<Option<TokenLogprobs>>) {
        let now = self.now;
        let mut row = 0;
        for s in &mut self.running {
            if s.step_tokens == 0 || s.done {
                continue;
            }
            let token = sampled.and_then(|t| t.get(row).copied());
            let token_logprobs = logprobs.get_mut(row).and_then(Option::take);
            row += 1;
            s.computed += s.step_tokens;
            s.step_tokens = 0;
            self.cache.mark_computed(s.id, s.computed);
            if s.computed < s.total() {
                continue;
            }
            let mut stopped = false;
            if s.generated < s.max_new {
                let index = s.generated;
                if let Some(t) = token {
                    s.output.push(t);
                }
                let id = s.output.get(index).copied().unwrap_or(0);
                s.generated += 1;
                self.m.generation_tokens += 1;
                if s.first_token.is_none() {
                    s.first_token = Some(now);
                    self.m.ttft.observe(now.saturating_sub(s.arrival).as_secs_f64());
                }
                stopped = token.is_some()
                    && s.generated > s.min_tokens
                    && s.generated < s.max_new
                    && s.stop_ids.contains(&id);
                if s.tx.send(EngineEvent::Token { index, id, stop: stopped, logprobs: token_logprobs }).is_err() {
                    if s.ended() {
                        // Its caller ended it (and went): a finish, not an abort.
                        finish(s, now, true, &mut self.m);
                        continue;
                    }
                    s.done = true;
                    s.pin = None;
                    self.m.requests_aborted += 1;
                    continue;
                }
            }
            if stopped || s.generated >= s.max_new {
                finish(s, now, stopped, &mut self.m);
            }
        }
        self.retire_done();
        self.m.steps += 1;
    }

    /// Releases the finished sequences' blocks, or pins them for their agents.
    fn retire_done(&mut self) {
        let now = self.now;
        let cache = &mut self.cache;
        let block_size = self.config.block_size;
        let mut pinned = Vec::new();
        let mut hinted = Vec::new();
        self.running.retain_mut(|s| {
            if s.done {
                let known = s.known_after_prompt(block_size);
                match s.pin.take() {
                    Some(pin) if !pin.hold.is_zero() => {
                        let until = now.saturating_add(pin.hold);
                        let next_use = pin.next_use(now);
                        pinned.push((pin.key, Pinned { seq: s.id, made: now, until, known, next_use }));
                    }
                    Some(pin) => {
                        let next_use = pin.next_use(now);
                        hinted.push((pin.key, s.id, known, next_use));
                    }
                    None => {
                        cache.release_caching(s.id, &known.later, &known.tail);
                    }
                }
            }
            !s.done
        });
        for (key, seq, known, next_use) in hinted {
            self.release_predicted(key, seq, &known, next_use);
        }
        for (key, held) in pinned {
            self.m.pins += 1;
            if let Some(old) = self.pins.insert(key.clone(), held) {
                self.release_predicted(key, old.seq, &old.known, old.next_use);
            }
        }
    }

    /// The counters and the state now.
    pub fn snapshot(&self) -> EngineMetrics {
        let c = self.cache.stats();
        EngineMetrics {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_usage: c.usage,
            prefix_queries: c.query_tokens,
            prefix_hits: c.hit_tokens,
            sim_time: self.now,
            kv_used_tokens: c.used_pages * self.config.page_size,
            kv_table_tokens: c.table_pages * self.config.page_size,
            kv_sequences: c.sequences,
            kv_evictions: c.evictions,
            ..self.m
        }
    }
}

/// Marks `s` done and tells its receiver (if still there) how it finished.
fn finish(s: &mut Seq, now: Duration, stopped: bool, m: &mut EngineMetrics) {
    s.done = true;
    m.requests_finished += 1;
    // A receiver dropped now has already seen every token; nothing is left to abort.
    let _ = s.tx.send(EngineEvent::Finished {
        prompt_tokens: s.prompt.len(),
        cached_tokens: s.cached_tokens,
        completion_tokens: s.generated,
        queue_time: s.admitted.unwrap_or(now).saturating_sub(s.arrival),
        ttft: s.first_token.unwrap_or(now).saturating_sub(s.arrival),
        total: now.saturating_sub(s.arrival),
        stopped,
    });
}

fn account(load: &mut StepLoad, s: &Seq, n: usize) {
    if n == 1 && s.generated > 0 && s.computed + 1 == s.total() {
        load.decode_seqs += 1;
        load.kv_tokens_read += s.computed as u64;
    } else {
        load.prefill_tokens += n as u64;
        load.prefill_attn += (n * (s.computed + n)) as u64;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    const VOCAB: u32 = 40;
    const STOP: u32 = 0;

    fn config(blocks: usize, budget: usize) -> SchedulerConfig {
        SchedulerConfig {
            block_size: 4,
            page_size: 4,
            kv_capacity_blocks: blocks,
            max_num_seqs: 6,
            max_num_batched_tokens: budget,
            enable_prefix_caching: true,
            eviction: Eviction::default(),
        }
    }

    /// The "model": the next token is a hash of the whole context, as a causal LM's is a function of it.
    fn next_token(context: &[u32]) -> u32 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &t in context {
            h = (h ^ u64::from(t)).wrapping_mul(0x0100_0000_01b3);
        }
        (h % u64::from(VOCAB)) as u32
    }

    /// What generating alone gives: the reference each scheduled run must equal.
    fn reference(prompt: &[u32], max_new: usize, min_tokens: usize) -> Vec<u32> {
        let mut ctx = prompt.to_vec();
        let mut out = Vec::new();
        while out.len() < max_new {
            let mut t = next_token(&ctx);
            if out.len() < min_tokens && t == STOP {
                t = 1; // the runner's ban, as the test executor applies it below
            }
            out.push(t);
            ctx.push(t);
            if t == STOP {
                break;
            }
        }
        out
    }

    /// Executes a step on a paged "KV cache" that stores token ids: writes the new tokens to their
    /// slots, then reads every sequence's context back through its block table, so a wrong page, slot
    /// or shared block changes the context and with it the output.
    fn execute(kv: &mut [Option<u32>], l: &StepLayout, page: usize) -> Vec<u32> {
        for (&slot, &id) in l.slot_mapping.iter().zip(&l.input_ids) {
            kv[slot as usize] = Some(id as u32);
        }
        let mut out = Vec::new();
        for i in 0..l.num_seqs() {
            let (a, b) = (l.query_starts[i] as usize, l.query_starts[i + 1] as usize);
            let ctx = l.context_lens[i] as usize;
            assert!(b > a && ctx >= b - a);
            assert_eq!(l.positions[a..b], ((ctx - (b - a)) as i64..ctx as i64).collect::<Vec<_>>()[..]);
            let table = &l.block_tables[i * l.table_width..(i + 1) * l.table_width];
            let context: Vec<u32> =
                (0..ctx).map(|p| kv[table[p / page] as usize * page + p % page].expect("an unwritten slot")).collect();
            let mut t = next_token(&context);
            if l.banned[i].contains(&t) {
                t = 1;
            }
            out.push(t);
        }
        out
    }

    fn drain(rx: &mut UnboundedReceiver<EngineEvent>, tokens: &mut Vec<u32>) -> Option<EngineEvent> {
        while let Ok(e) = rx.try_recv() {
            match e {
                EngineEvent::Token { index, id, .. } => {
                    assert_eq!(index, tokens.len());
                    tokens.push(id);
                }
                EngineEvent::Finished { .. } => return Some(e),
                _ => {}
            }
        }
        None
    }

    struct Run {
        rx: UnboundedReceiver<EngineEvent>,
        prompt: Vec<u32>,
        max_new: usize,
        min_tokens: usize,
        tokens: Vec<u32>,
        finished: Option<EngineEvent>,
    }

    /// Runs `requests` (arrival step, prompt, max new tokens, min tokens) to completion.
    fn run(cfg: SchedulerConfig, requests: &[(usize, Vec<u32>, usize, usize)]) -> (Vec<Run>, EngineMetrics) {
        run_hinted(cfg, requests, &vec![None; requests.len()])
    }

    /// `run`, request `i` carrying `pins[i]`, 10 ms of the scheduler's time a step; the pins left
    /// at the end are let expire.
    fn run_hinted(
        cfg: SchedulerConfig,
        requests: &[(usize, Vec<u32>, usize, usize)],
        pins: &[Option<Pin>],
    ) -> (Vec<Run>, EngineMetrics) {
        let mut sched = Scheduler::new(cfg);
        let mut kv = vec![None; cfg.kv_capacity_tokens()];
        let mut runs = Vec::new();
        let mut step = 0;
        loop {
            for ((at, prompt, max_new, min_tokens), pin) in requests.iter().zip(pins) {
                if *at == step {
                    let (tx, rx) = unbounded_channel();
                    let request = EngineRequest {
                        prompt: prompt.clone(),
                        max_new_tokens: *max_new,
                        stop_token_ids: vec![STOP],
                        min_tokens: *min_tokens,
                        pin: pin.clone(),
                        ..EngineRequest::default()
                    };
                    assert!(cfg.rejection(&request).is_none());
                    sched.enqueue(request, tx, Duration::ZERO);
                    let (prompt, max_new, min_tokens) = (prompt.clone(), *max_new, *min_tokens);
                    runs.push(Run { rx, prompt, max_new, min_tokens, tokens: Vec::new(), finished: None });
                }
            }
            let pending = requests.iter().any(|r| r.0 > step);
            if sched.is_idle() && !pending {
                break;
            }
            sched.now += Duration::from_millis(10);
            if sched.schedule().is_some() {
                let l = sched.layout();
                let sampled = execute(&mut kv, &l, cfg.page_size);
                sched.complete_step(Some(&sampled));
            }
            for r in &mut runs {
                if let Some(f) = drain(&mut r.rx, &mut r.tokens) {
                    r.finished = Some(f);
                }
            }
            step += 1;
            assert!(step < 100_000, "the scheduler made no progress");
        }
        sched.now += Duration::from_secs(3600);
        assert!(sched.schedule().is_none());
        assert!(sched.pinned().is_empty());
        (runs, sched.snapshot())
    }

    fn check(runs: &[Run]) {
        for r in runs {
            assert_eq!(r.tokens, reference(&r.prompt, r.max_new, r.min_tokens), "prompt {:?}", r.prompt);
            let Some(EngineEvent::Finished { completion_tokens, stopped, prompt_tokens, .. }) = r.finished else {
                panic!("no Finished event");
            };
            assert_eq!((completion_tokens, prompt_tokens), (r.tokens.len(), r.prompt.len()));
            let n = r.tokens.len();
            assert_eq!(stopped, r.tokens.last() == Some(&STOP) && n > r.min_tokens && n < r.max_new);
        }
    }

    fn toks(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| 1 + (seed.wrapping_mul(31).wrapping_add(i * 7)) % (VOCAB - 1)).collect()
    }

    /// Serves one request alone to its end, 10 ms of the scheduler's time a step, as the simulator
    /// does (its output tokens given); returns its prefix-cache hit.
    fn serve(s: &mut Scheduler, prompt: &[u32], output: &[u32], pin: Option<Pin>) -> usize {
        let (tx, mut rx) = unbounded_channel();
        let request = EngineRequest {
            prompt: prompt.to_vec(),
            max_new_tokens: output.len(),
            output_tokens: output.to_vec(),
            pin,
            ..EngineRequest::default()
        };
        assert!(s.config().rejection(&request).is_none());
        s.enqueue(request, tx, s.now);
        let mut tokens = Vec::new();
        loop {
            s.now += Duration::from_millis(10);
            assert!(s.schedule().is_some(), "a lone request that fits always runs");
            s.complete_step(None);
            if let Some(EngineEvent::Finished { cached_tokens, .. }) = drain(&mut rx, &mut tokens) {
                return cached_tokens;
            }
        }
    }

    /// Queues `request` and steps, 10 ms of the scheduler's time each, until `n` of its tokens are
    /// out; returns its receiver and the tokens.
    fn run_until_tokens(
        s: &mut Scheduler,
        request: EngineRequest,
        n: usize,
    ) -> (UnboundedReceiver<EngineEvent>, Vec<u32>) {
        let (tx, mut rx) = unbounded_channel();
        s.enqueue(request, tx, s.now);
        let mut tokens = Vec::new();
        while tokens.len() < n {
            s.now += Duration::from_millis(10);
            assert!(s.schedule().is_some());
            s.complete_step(None);
            drain(&mut rx, &mut tokens);
        }
        (rx, tokens)
    }

    fn pin(key: &str, secs: u64) -> Pin {
        Pin { key: key.to_owned(), hold: Duration::from_secs(secs), return_after: Some(Duration::from_secs(secs / 2)) }
    }

    /// An agent's first turn (40 prompt + 8 output tokens), three other 48-token requests in its
    /// tool wait, then its next turn (the whole history + 8 tokens) on a 32-block cache: returns the
    /// next turn's hit and the counters.
    fn next_turn_after_other_traffic(hint: Option<Pin>) -> (usize, EngineMetrics) {
        let mut s = Scheduler::new(config(32, 64));
        let (prompt, answer) = (toks(7, 40), toks(8, 8));
        serve(&mut s, &prompt, &answer, hint.clone());
        for other in 0..3 {
            serve(&mut s, &toks(20 + other, 40), &toks(30 + other, 8), None);
        }
        let history: Vec<u32> = [prompt, answer, toks(9, 8)].concat();
        let cached = serve(&mut s, &history, &toks(10, 4), hint);
        (cached, s.snapshot())
    }

    #[test]
    fn a_pinned_agent_finds_its_whole_history_cached_after_other_traffic() {
        let (unpinned, m) = next_turn_after_other_traffic(None);
        assert_eq!(unpinned, 0, "LRU evicted the agent's blocks");
        assert_eq!(m.pins, 0);
        let (pinned, m) = next_turn_after_other_traffic(Some(pin("agent-1", 10)));
        // Its prompt and its answer but the newest token: 47 tokens computed, 11 full blocks.
        assert_eq!(pinned, 44);
        // Both turns pinned; the second took the first's pin over.
        assert_eq!((m.pins, m.pins_returned, m.pins_dropped, m.pins_expired), (2, 1, 0, 0));
        assert_eq!(m.preemptions, 0);
    }

    #[test]
    fn a_dropped_request_leaves_its_output_blocks_cached() {
        let mut s = Scheduler::new(config(32, 64));
        let (prompt, output) = (toks(7, 10), toks(8, 20));
        let request = EngineRequest {
            prompt: prompt.clone(),
            max_new_tokens: output.len(),
            output_tokens: output.clone(),
            ..EngineRequest::default()
        };
        let (rx, _) = run_until_tokens(&mut s, request, 12);
        // The client went away: the next step drops the request.
        drop(rx);
        let history = [prompt, output[..12].to_vec(), toks(9, 4)].concat();
        // 21 tokens computed (the prompt and 11 outputs fed back): 5 full blocks, 3 of them past
        // the prompt's.
        assert_eq!(serve(&mut s, &history, &toks(10, 2), None), 20);
        assert_eq!(s.snapshot().requests_aborted, 1);
    }

    #[test]
    fn an_output_its_caller_ends_finishes_as_stopped_and_keeps_its_pin() {
        // Ended while the receiver waits (seen at the next step), or in the middle of a step by a
        // caller that went at once (seen as the step's token goes out).
        for caller_stays in [true, false] {
            let mut s = Scheduler::new(config(32, 64));
            let (prompt, output) = (toks(7, 10), toks(8, 20));
            let end = EndSignal::default();
            let request = EngineRequest {
                prompt: prompt.clone(),
                max_new_tokens: output.len(),
                output_tokens: output.clone(),
                pin: Some(pin("a", 60)),
                end: Some(end.clone()),
                ..EngineRequest::default()
            };
            let (mut rx, mut tokens) = run_until_tokens(&mut s, request, 12);
            s.now += Duration::from_millis(10);
            if caller_stays {
                end.end();
                assert!(s.schedule().is_none(), "nothing is left to run");
                let finished = drain(&mut rx, &mut tokens);
                assert!(matches!(finished, Some(EngineEvent::Finished { stopped: true, completion_tokens: 12, .. })));
            } else {
                assert!(s.schedule().is_some());
                end.end();
                drop(rx);
                s.complete_step(None);
            }
            let m = s.snapshot();
            assert_eq!((m.requests_finished, m.requests_aborted, m.pins), (1, 0, 1), "caller stays: {caller_stays}");
            assert_eq!(s.pinned().len(), 1);
            // The agent's next turn takes the pin over: its history's full blocks are all cached.
            let history = [prompt.clone(), output[..12].to_vec(), toks(9, 4)].concat();
            assert_eq!(serve(&mut s, &history, &toks(10, 2), Some(pin("a", 60))), 20);
            assert_eq!(s.snapshot().pins_returned, 1);
        }
    }

    #[test]
    fn the_next_request_takes_the_pin_over_and_a_pin_ends_at_its_deadline() {
        let mut s = Scheduler::new(config(32, 64));
        let (prompt, answer) = (toks(7, 12), toks(8, 4));
        serve(&mut s, &prompt, &answer, Some(pin("a", 3)));
        let finished = s.now;
        assert_eq!(s.pinned(), vec![("a".to_owned(), finished + Duration::from_secs(3))]);
        // Its last turn has no tool wait to hint (a zero hold): it takes the pin over and pins nothing.
        let history: Vec<u32> = [prompt.clone(), answer.clone(), toks(9, 4)].concat();
        assert_eq!(serve(&mut s, &history, &toks(10, 2), Some(pin("a", 0))), 12);
        assert!(s.pinned().is_empty());
        assert_eq!((s.snapshot().pins, s.snapshot().pins_returned), (1, 1));

        // Pinned again; a step just before the deadline keeps it, the first step at it releases it.
        serve(&mut s, &prompt, &answer, Some(pin("a", 3)));
        let until = s.now + Duration::from_secs(3);
        s.now = until.saturating_sub(Duration::from_millis(20));
        serve(&mut s, &toks(11, 4), &toks(12, 1), None);
        assert_eq!(s.pinned(), vec![("a".to_owned(), until)]);
        serve(&mut s, &toks(13, 4), &toks(14, 1), None);
        assert!(s.pinned().is_empty());
        let m = s.snapshot();
        assert_eq!((m.pins, m.pins_returned, m.pins_dropped, m.pins_expired), (2, 1, 0, 1));
        // Expired, its blocks are cached but evictable: nothing is held.
        assert!(m.kv_usage.abs() < f64::EPSILON, "{}", m.kv_usage);
    }

    /// Three agents pinned in turn (24 of 32 blocks; agent k held `holds[k]` s, back in half
    /// that), then a 64-token request needing 16 blocks: returns the agents still pinned and the
    /// counters.
    fn one_pin_gives_way(eviction: Eviction, holds: [u64; 3]) -> (Vec<String>, EngineMetrics) {
        let mut s = Scheduler::new(SchedulerConfig { eviction, ..config(32, 64) });
        for (agent, hold) in (0..3u32).zip(holds) {
            serve(&mut s, &toks(40 + agent, 28), &toks(50 + agent, 4), Some(pin(&format!("agent-{agent}"), hold)));
        }
        serve(&mut s, &toks(60, 60), &toks(61, 4), None);
        (s.pinned().into_iter().map(|p| p.0).collect(), s.snapshot())
    }

    #[test]
    fn pins_are_dropped_before_any_preemption() {
        // LRU: the oldest pin gives way; next use: the agent due back last.
        let (pinned, m) = one_pin_gives_way(Eviction::Lru, [10, 11, 12]);
        assert_eq!(pinned, vec!["agent-1", "agent-2"]);
        assert_eq!((m.pins, m.pins_dropped, m.preemptions), (3, 1, 0));
        let (pinned, m) = one_pin_gives_way(Eviction::NextUse, [10, 11, 12]);
        assert_eq!(pinned, vec!["agent-0", "agent-1"]);
        assert_eq!((m.pins, m.pins_dropped, m.preemptions), (3, 1, 0));
        // The oldest pin ends last: LRU still drops it, not the newest one that ends first.
        assert_eq!(one_pin_gives_way(Eviction::Lru, [30, 12, 10]).0, vec!["agent-1", "agent-2"]);
        assert_eq!(one_pin_gives_way(Eviction::NextUse, [30, 12, 10]).0, vec!["agent-1", "agent-2"]);

        // Two running sequences outgrowing the cache: the last pin goes before either is preempted.
        let mut s = Scheduler::new(config(16, 64));
        serve(&mut s, &toks(70, 16), &toks(71, 4), Some(pin("a", 10)));
        let mut rxs = Vec::new();
        for seed in [80, 81] {
            let (tx, rx) = unbounded_channel();
            let out = toks(seed + 10, 12);
            s.enqueue(
                EngineRequest {
                    prompt: toks(seed, 12),
                    max_new_tokens: 12,
                    output_tokens: out,
                    ..EngineRequest::default()
                },
                tx,
                s.now,
            );
            rxs.push(rx);
        }
        let mut finished = 0;
        while finished < 2 {
            s.now += Duration::from_millis(10);
            if s.schedule().is_some() {
                s.complete_step(None);
            }
            for rx in &mut rxs {
                while let Ok(e) = rx.try_recv() {
                    finished += usize::from(matches!(e, EngineEvent::Finished { .. }));
                }
            }
        }
        let m = s.snapshot();
        assert_eq!((m.pins_dropped, m.preemptions), (1, 0), "{m:?}");
    }

    /// Three agents' turns (24 prompt + 4 output tokens) released unpinned with their next-use
    /// hints (back in 1 s, back in 100 s, done), then a 92-token request on a 32-block cache, then
    /// the first agent's next turn: returns its hit and the evictions.
    fn an_agent_due_back_soon_after_pressure(eviction: Eviction) -> (usize, u64) {
        let mut s = Scheduler::new(SchedulerConfig { eviction, ..config(32, 64) });
        let hint = |key: &str, back: Option<u64>| Pin {
            key: key.to_owned(),
            hold: Duration::ZERO,
            return_after: back.map(Duration::from_secs),
        };
        let (prompt, answer) = (toks(7, 24), toks(8, 4));
        serve(&mut s, &prompt, &answer, Some(hint("soon", Some(1))));
        serve(&mut s, &toks(20, 24), &toks(21, 4), Some(hint("late", Some(100))));
        serve(&mut s, &toks(22, 24), &toks(23, 4), Some(hint("done", None)));
        // 3 x 6 cached blocks (27 computed tokens each); 23 blocks needed, 14 free: 9 evicted.
        serve(&mut s, &toks(30, 88), &toks(31, 4), None);
        let evictions = s.snapshot().kv_evictions;
        let history: Vec<u32> = [prompt, answer, toks(9, 4)].concat();
        (serve(&mut s, &history, &toks(10, 2), Some(hint("soon", None))), evictions)
    }

    #[test]
    fn under_pressure_next_use_keeps_the_history_of_the_agent_due_back_first() {
        // LRU evicts the oldest release: the agent coming back first loses its whole history.
        assert_eq!(an_agent_due_back_soon_after_pressure(Eviction::Lru), (0, 9));
        // Next use evicts the done agent's 6 blocks and 3 of the late one's: all 24 tokens hit.
        assert_eq!(an_agent_due_back_soon_after_pressure(Eviction::NextUse), (24, 9));
    }

    /// Two agents' turns released unpinned (retention off) with their next-use hints: one back in
    /// 100 s, one back in 1 s that turns out to be done (told or not), then a 92-token request
    /// evicting 3 of their 12 cached blocks, then the first agent's next turn: returns its hit.
    fn a_live_agent_after_another_is_done(told: bool) -> usize {
        let mut s = Scheduler::new(config(32, 64));
        let hint = |key: &str, back: u64| Pin {
            key: key.to_owned(),
            hold: Duration::ZERO,
            return_after: Some(Duration::from_secs(back)),
        };
        let (prompt, answer) = (toks(7, 24), toks(8, 4));
        serve(&mut s, &prompt, &answer, Some(hint("live", 100)));
        serve(&mut s, &toks(20, 24), &toks(21, 4), Some(hint("done", 1)));
        if told {
            assert!(s.agent_done("done"));
            assert!(!s.agent_done("done"), "told once, forgotten");
        }
        serve(&mut s, &toks(30, 88), &toks(31, 4), None);
        assert_eq!(s.snapshot().kv_evictions, 3);
        let history: Vec<u32> = [prompt, answer, toks(9, 4)].concat();
        serve(&mut s, &history, &toks(10, 2), Some(hint("live", 100)))
    }

    #[test]
    fn a_done_agent_s_withdrawn_prediction_no_longer_keeps_its_blocks() {
        // Untold, the done agent's blocks are predicted back first: the live agent loses 3 blocks.
        assert_eq!(a_live_agent_after_another_is_done(false), 12);
        // Told, its blocks go first and the live agent's whole prompt hits.
        assert_eq!(a_live_agent_after_another_is_done(true), 24);
    }

    /// An unhinted request's turn, then a pinned agent's turn whose pin the server releases (its
    /// reply called no tool), then a 92-token request evicting 3 of their 12 cached blocks: returns
    /// the blocks of each prompt still cached (unhinted, then the done agent).
    fn a_released_pin_under_pressure(eviction: Eviction) -> (usize, usize) {
        let mut s = Scheduler::new(SchedulerConfig { eviction, ..config(32, 64) });
        let wait = Pin::for_tool_wait("b".to_owned(), Duration::from_secs(5), Duration::from_secs(30));
        let (a, b) = ((toks(7, 24), toks(8, 4)), (toks(20, 24), toks(21, 4)));
        serve(&mut s, &a.0, &a.1, None);
        serve(&mut s, &b.0, &b.1, Some(wait));
        assert!(s.agent_done("b"));
        serve(&mut s, &toks(30, 88), &toks(31, 4), None);
        let m = s.snapshot();
        assert_eq!((m.pins, m.pins_expired, m.kv_evictions), (1, 1, 3));
        (s.cache.lookup(&block_hashes(&a.0, 4)), s.cache.lookup(&block_hashes(&b.0, 4)))
    }

    #[test]
    fn a_pin_released_for_a_reply_without_tool_calls_is_evicted_first() {
        assert_eq!(a_released_pin_under_pressure(Eviction::Lru), (3, 6));
        assert_eq!(a_released_pin_under_pressure(Eviction::NextUse), (6, 3));
    }

    #[test]
    fn a_tool_wait_pin_holds_twice_the_wait_at_most_the_ttl() {
        let ttl = Duration::from_secs(30);
        assert_eq!(Pin::for_tool_wait("a".into(), Duration::from_secs(4), ttl).hold, Duration::from_secs(8));
        assert_eq!(Pin::for_tool_wait("a".into(), Duration::from_secs(20), ttl).hold, ttl);
        assert_eq!(Pin::for_tool_wait("a".into(), Duration::MAX, ttl).hold, ttl);
    }

    #[test]
    fn ragged_arrivals_shared_prefixes_and_preemption_equal_one_at_a_time() {
        let shared = toks(1, 13);
        let mut sibling = shared.clone();
        sibling.extend(toks(2, 5));
        let requests = vec![
            (0, toks(3, 5), 12, 0),
            (0, shared.clone(), 12, 0),
            (0, toks(4, 1), 12, 12),
            (2, sibling, 12, 0),
            (6, toks(5, 20), 12, 3),
            (9, shared, 12, 0),
        ];
        // 14 blocks of 4: not enough for all six at once, so some are preempted and recomputed.
        let (runs, m) = run(config(14, 10), &requests);
        check(&runs);
        assert!(m.preemptions > 0, "{m:?}");
        assert!(m.prefix_hits >= 12, "{m:?}");
        assert!(m.kv_usage.abs() < f64::EPSILON);
    }

    #[test]
    fn min_tokens_bans_the_stop_token_and_a_stop_token_ends_the_output() {
        // A prompt whose first greedy token is the stop token.
        let prompt = (0..500).map(|s| toks(s, 6)).find(|p| next_token(p) == STOP).unwrap();
        let (runs, _) = run(config(64, 16), &[(0, prompt.clone(), 8, 0), (0, prompt, 8, 3)]);
        check(&runs);
        assert_eq!(runs[0].tokens, vec![STOP]);
        assert!(runs[1].tokens.len() > 3);
    }

    #[test]
    fn logprobs_go_out_with_the_token_of_their_row() {
        let mut sched = Scheduler::new(config(32, 64));
        let asking = Sampling { logprobs: Some(1), ..Sampling::default() };
        let mut receivers = Vec::new();
        for (seed, sampling) in [(3, Sampling::default()), (4, asking)] {
            let (tx, rx) = unbounded_channel();
            let request =
                EngineRequest { prompt: toks(seed, 5), max_new_tokens: 1, sampling, ..EngineRequest::default() };
            sched.enqueue(request, tx, Duration::ZERO);
            receivers.push(rx);
        }
        sched.schedule().unwrap();
        let layout = sched.layout();
        assert_eq!(layout.sampling.iter().map(|s| s.logprobs).collect::<Vec<_>>(), [None, Some(1)]);
        let asked = TokenLogprobs { logprob: -0.5, top: vec![(9, -0.25)] };
        sched.complete_step_with_logprobs(Some(&[7, 9]), vec![None, Some(asked.clone())]);
        let tokens: Vec<_> = receivers
            .iter_mut()
            .map(|rx| {
                std::iter::from_fn(|| rx.try_recv().ok()).find_map(|e| {
                    if let EngineEvent::Token { id, logprobs, .. } = e {
                        Some((id, logprobs))
                    } else {
                        None
                    }
                })
            })
            .collect();
        assert_eq!(tokens, [Some((7, None)), Some((9, Some(asked)))]);
    }

    #[test]
    fn the_layout_lists_shared_prefix_pages_in_both_block_tables() {
        let mut sched = Scheduler::new(config(32, 64));
        let prompt = toks(7, 10);
        let (tx, _rx1) = unbounded_channel();
        sched.enqueue(
            EngineRequest { prompt: prompt.clone(), max_new_tokens: 2, ..EngineRequest::default() },
            tx,
            Duration::ZERO,
        );
        sched.schedule().unwrap();
        let first = sched.layout();
        sched.complete_step(Some(&[5]));
        let (tx, _rx2) = unbounded_channel();
        sched.enqueue(EngineRequest { prompt, max_new_tokens: 2, ..EngineRequest::default() }, tx, Duration::ZERO);
        sched.schedule().unwrap();
        let second = sched.layout();
        // First: 10 prompt tokens in 3 pages. Second step: the first sequence decodes one token, the
        // second reuses the first two pages (8 tokens) and computes its last 2 prompt tokens.
        assert_eq!(first.query_starts, vec![0, 10]);
        assert_eq!(second.query_starts, vec![0, 1, 3]);
        assert_eq!(second.context_lens, vec![11, 10]);
        assert_eq!(second.table_width, 3);
        assert_eq!(second.block_tables[..2], first.block_tables[..2]);
        assert_eq!(second.block_tables[3..5], first.block_tables[..2]);
        assert_ne!(second.block_tables[5], first.block_tables[2]);
        assert_eq!(second.input_ids[0], 5);
        assert_eq!(second.positions, vec![10, 8, 9]);
    }

    #[test]
    fn a_sibling_departing_mid_block_shares_its_pages_up_to_there() {
        let shared = toks(1, 10);
        let sibling = |seed| {
            let mut p = shared.clone();
            p.extend(toks(seed, 5));
            p
        };
        // The first sibling's 4 pinned blocks hold 16 rows. The second departs at token 10: with
        // one page per block it finds the 8 tokens of 2 whole blocks and holds 2 blocks of its own;
        // with pages of 1 token it finds all 10 (the first 2 rows of block 2 are the first
        // sibling's) and holds 2 + 4 rows.
        for (page_size, cached, held) in [(4, 8, 16 + 8), (1, 10, 16 + 6)] {
            let mut s = Scheduler::new(SchedulerConfig { page_size, ..config(32, 64) });
            serve(&mut s, &sibling(2), &[5], Some(pin("a", 60)));
            let (tx, mut rx) = unbounded_channel();
            let request = EngineRequest { prompt: sibling(3), max_new_tokens: 1, ..EngineRequest::default() };
            s.enqueue(request, tx, Duration::ZERO);
            s.schedule();
            assert_eq!(rx.try_recv().unwrap(), EngineEvent::Started { cached_tokens: cached });
            let m = s.snapshot();
            assert_eq!(m.kv_used_tokens, held, "page size {page_size}");
            assert_eq!(m.kv_table_tokens, 2 * 16);
        }
    }

    #[test]
    fn an_agent_s_next_turn_shares_the_pages_of_its_last_partial_block() {
        // 9 prompt + 3 output tokens: 11 computed (the last token's KV never is), 2 full blocks of 4
        // and 3 tokens in the third. The next turn goes on from there.
        for (page_size, cached) in [(4, 8), (2, 10), (1, 11)] {
            let mut s = Scheduler::new(SchedulerConfig { page_size, ..config(32, 64) });
            let (prompt, answer) = (toks(3, 9), toks(4, 3));
            serve(&mut s, &prompt, &answer, Some(pin("a", 60)));
            let history: Vec<u32> = [prompt, answer, toks(5, 5)].concat();
            assert_eq!(serve(&mut s, &history, &toks(6, 2), Some(pin("a", 60))), cached, "page size {page_size}");
        }
    }

    fn request_strategy() -> impl Strategy<Value = (usize, Vec<u32>, usize, usize)> {
        // Prompts drawn from three stems so they share prefixes of various lengths.
        (0..12usize, 0..3u32, 1..30usize, prop::collection::vec(1..VOCAB, 0..6), 1..10usize, 0..3usize).prop_map(
            |(at, stem, stem_len, tail, max_new, min_tokens)| {
                let mut prompt = toks(stem, stem_len);
                prompt.extend(tail);
                (at, prompt, max_new, min_tokens)
            },
        )
    }

    /// An agent hint: no hint, or agent `key` holding its blocks `hold` steps and back after
    /// `back` steps (`None`: done).
    fn hint_strategy() -> impl Strategy<Value = Option<Pin>> {
        prop::option::of((0..3u8, 0..3u64, prop::option::of(0..20u64))).prop_map(|h| {
            h.map(|(key, hold, back)| Pin {
                key: format!("agent-{key}"),
                hold: Duration::from_millis(10 * hold),
                return_after: back.map(|b| Duration::from_millis(10 * b)),
            })
        })
    }

    proptest! {
        #[test]
        fn any_schedule_gives_every_request_its_one_at_a_time_output(
            requests in prop::collection::vec((request_strategy(), hint_strategy()), 1..10),
            blocks in 12..40usize,
            budget in 1..24usize,
            next_use in any::<bool>(),
            page_size in prop::sample::select(vec![4usize, 2, 1]),
            next_turns in prop::collection::vec((0..10usize, prop::collection::vec(1..VOCAB, 1..6), 10..30usize), 0..4),
        ) {
            let eviction = if next_use { Eviction::NextUse } else { Eviction::Lru };
            let (mut requests, mut pins): (Vec<_>, Vec<_>) = requests.into_iter().unzip();
            // Next turns: an earlier request's prompt and output, then new tokens (a tool result),
            // under the same agent's pin: the prompt's blocks, its output's and its last partial
            // block's pages are found again.
            for (of, result, at) in next_turns {
                let Some((_, prompt, max_new, min_tokens)) = requests.get(of).cloned() else { continue };
                let next = [prompt.clone(), reference(&prompt, max_new, min_tokens), result].concat();
                if next.len() + 3 <= blocks * 4 {
                    requests.push((at, next, 3, 0));
                    pins.push(pins[of].clone());
                }
            }
            let cfg = SchedulerConfig { page_size, eviction, ..config(blocks, budget) };
            let (runs, m) = run_hinted(cfg, &requests, &pins);
            check(&runs);
            prop_assert!(m.kv_usage.abs() < f64::EPSILON);
        }
    }
}
