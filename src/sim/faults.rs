//! Injected failures. Each request draws from hash(seed, hash of the body, how many times this exact
//! body was seen before): a run replays identically under the same seed, and a client that retries the
//! same body gets a fresh draw, as it would from a flaky server.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::config::FaultConfig;
use super::draw::{hash_bytes, mix, Draw};

/// At most one of these per request; `slow_first_byte` comes on top, drawn separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 429 with `Retry-After`.
    RateLimited,
    /// HTTP 500.
    Internal,
    /// HTTP 503 (Anthropic streams: an `overloaded_error` event).
    Unavailable,
    /// The connection drops after part of the body.
    Reset,
    /// The body ends early but cleanly: no `[DONE]` / `message_stop` / `done: true`.
    Truncate,
    /// Invalid JSON where the protocol promises JSON.
    Malformed,
}

impl Fault {
    pub const ALL: [Fault; 6] =
        [Self::RateLimited, Self::Internal, Self::Unavailable, Self::Reset, Self::Truncate, Self::Malformed];

    /// The name used in `/sim/stats` and in the option keys (`fault_<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Self::RateLimited => "429",
            Self::Internal => "500",
            Self::Unavailable => "503",
            Self::Reset => "reset",
            Self::Truncate => "truncate",
            Self::Malformed => "malformed",
        }
    }

    fn rate(self, cfg: &FaultConfig) -> f64 {
        match self {
            Self::RateLimited => cfg.fault_429,
            Self::Internal => cfg.fault_500,
            Self::Unavailable => cfg.fault_503,
            Self::Reset => cfg.fault_reset,
            Self::Truncate => cfg.fault_truncate,
            Self::Malformed => cfg.fault_malformed,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decision {
    pub fault: Option<Fault>,
    pub slow_first_byte: Option<Duration>,
    /// Where a reset or truncation cuts the body, as a fraction in 1/1000 of the full output.
    pub cut_permille: u32,
    /// End a streamed reply just after its second tool call starts (`fault_cut_after_call`).
    pub cut_after_call: bool,
}

/// Distinct bodies remembered for retry counting (about 40 MB at the bound).
const SEEN_BODIES: usize = 1 << 20;

pub struct Faults {
    cfg: FaultConfig,
    seed: u64,
    seen: Mutex<HashMap<u64, u32>>,
    injected: [AtomicU64; 8],
    grammar: AtomicU64,
}

impl Faults {
    pub fn new(cfg: FaultConfig, seed: u64) -> Self {
        Self { cfg, seed, seen: Mutex::new(HashMap::new()), injected: Default::default(), grammar: AtomicU64::new(0) }
    }

    pub fn config(&self) -> &FaultConfig {
        &self.cfg
    }

    fn enabled(&self) -> bool {
        self.cfg.exclusive_total() > 0.0 || self.cfg.slow_first_byte > 0.0 || self.cfg.fault_cut_after_call > 0.0
    }

    /// Decide the fate of one request with this body, and count what was injected.
    pub fn decide(&self, body: &[u8]) -> Decision {
        if !self.enabled() {
            return Decision::default();
        }
        let body_hash = hash_bytes(body);
        let attempt = {
            // Each update leaves the map consistent, so a panic elsewhere cannot corrupt it.
            let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // Bounded memory over a long run; forgetting happens at the same request in every replay
            // of the same sequence, so outcomes stay reproducible.
            if seen.len() >= SEEN_BODIES {
                seen.clear();
            }
            let n = seen.entry(body_hash).or_insert(0);
            *n += 1;
            *n - 1
        };
        let mut draw = Draw::new(mix(mix(self.seed, body_hash), u64::from(attempt)));
        let u = draw.unit();
        let mut acc = 0.0;
        let mut fault = None;
        for kind in Fault::ALL {
            acc += kind.rate(&self.cfg);
            if u < acc {
                fault = Some(kind);
                break;
            }
        }
        let slow = draw.chance(self.cfg.slow_first_byte).then(|| Duration::from_millis(self.cfg.slow_first_byte_ms));
        let cut_permille = 200 + draw.below(600) as u32;
        // Drawn last, so adding it left every other fault's draws as they were.
        let cut_after_call = attempt == 0 && draw.chance(self.cfg.fault_cut_after_call);
        if let Some(kind) = fault {
            self.injected[kind as usize].fetch_add(1, Ordering::Relaxed);
        }
        if slow.is_some() {
            self.injected[6].fetch_add(1, Ordering::Relaxed);
        }
        Decision { fault, slow_first_byte: slow, cut_permille, cut_after_call }
    }

    /// Whether this grammar-constrained request fails its own output parser, as llama.cpp's does
    /// when the model's output does not match the grammar. A property of the request, not of the
    /// attempt: sent again, it fails again.
    pub fn grammar_fails(&self, body: &[u8]) -> bool {
        if self.cfg.fault_grammar <= 0.0 {
            return false;
        }
        let fails = Draw::new(mix(self.seed ^ 0x0067_7261_6d6d_6172, hash_bytes(body))).chance(self.cfg.fault_grammar);
        if fails {
            self.grammar.fetch_add(1, Ordering::Relaxed);
        }
        fails
    }

    /// Injected faults by kind name (`429`, `500`, `503`, `reset`, `truncate`, `malformed`,
    /// `slow_first_byte`, `cut_after_call`).
    pub fn injected(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut out = serde_json::Map::new();
        for kind in Fault::ALL {
            out.insert(kind.name().to_owned(), self.injected[kind as usize].load(Ordering::Relaxed).into());
        }
        out.insert("slow_first_byte".to_owned(), self.injected[6].load(Ordering::Relaxed).into());
        out.insert("cut_after_call".to_owned(), self.injected[7].load(Ordering::Relaxed).into());
        out.insert("grammar".to_owned(), self.grammar.load(Ordering::Relaxed).into());
        out
    }

    /// A `cut_after_call` decision was carried out (the reply had a second tool call).
    pub fn count_cut_after_call(&self) {
        self.injected[7].fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg() -> FaultConfig {
        FaultConfig {
            fault_429: 0.1,
            fault_500: 0.05,
            fault_reset: 0.2,
            slow_first_byte: 0.3,
            ..FaultConfig::default()
        }
    }

    #[test]
    fn rates_are_met_and_counted() {
        let f = Faults::new(cfg(), 1);
        let n = 4000;
        let decisions: Vec<Decision> = (0..n).map(|i| f.decide(format!("body {i}").as_bytes())).collect();
        let share = |k: Fault| decisions.iter().filter(|d| d.fault == Some(k)).count() as f64 / f64::from(n);
        assert!((share(Fault::RateLimited) - 0.1).abs() < 0.02);
        assert!((share(Fault::Internal) - 0.05).abs() < 0.015);
        assert!((share(Fault::Reset) - 0.2).abs() < 0.03);
        assert!(decisions.iter().all(|d| d.fault != Some(Fault::Malformed)));
        let slow = decisions.iter().filter(|d| d.slow_first_byte.is_some()).count() as f64 / f64::from(n);
        assert!((slow - 0.3).abs() < 0.03);
        let counts = f.injected();
        assert_eq!(
            counts["reset"].as_u64().unwrap() as usize,
            decisions.iter().filter(|d| d.fault == Some(Fault::Reset)).count()
        );
    }

    #[test]
    fn same_seed_replays_and_retries_draw_afresh() {
        let run = |seed| {
            let f = Faults::new(cfg(), seed);
            (0..300).map(|i| f.decide(format!("b{}", i % 100).as_bytes())).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
        // The three sightings of one body are not all alike.
        let r = run(3);
        let differs = (0..100).filter(|&i| r[i] != r[i + 100] || r[i] != r[i + 200]).count();
        assert!(differs > 50);
    }

    #[test]
    fn cut_after_call_spares_the_retry() {
        let f = Faults::new(FaultConfig { fault_cut_after_call: 1.0, ..FaultConfig::default() }, 5);
        assert!(f.decide(b"body").cut_after_call);
        assert!(!f.decide(b"body").cut_after_call);
        assert!(f.decide(b"other body").cut_after_call);
        assert_eq!(f.decide(b"third").fault, None);
    }

    #[test]
    fn no_faults_configured_means_none_injected() {
        let f = Faults::new(FaultConfig::default(), 0);
        assert!((0..100).all(|i| f.decide(&[i]) == Decision::default()));
    }
}
