//! The simulator reproduces the shape of vLLM's published prefix-caching result: N simultaneous
//! requests sharing a 2,048-token prefix plus ~500 unique tokens each. Without the cache every
//! request prefills its whole prompt, so mean TTFT grows about linearly with N; with it only the
//! unique tails are prefilled after the first step, so TTFT stays nearly flat. Times are simulated,
//! hence deterministic.
#![allow(clippy::unwrap_used)]

use std::fmt::Write;
use std::time::Duration;

use batchagent::sim::engine::{Engine, EngineEvent, EngineRequest};
use batchagent::sim::profile::Profile;
use batchagent::sim::tokenizer;

const PREFIX_TOKENS: usize = 2048;
const UNIQUE_TOKENS: usize = 500;

/// The shared prefix: a long system prompt, as text through the simulator's tokenizer.
fn shared_prefix() -> Vec<u32> {
    let mut text = String::new();
    let mut i = 0;
    while tokenizer::count(&text) < PREFIX_TOKENS {
        writeln!(text, "Rule {i}: review the file carefully and report every defect you find.").unwrap();
        i += 1;
    }
    tokenizer::tokenize(&text)[..PREFIX_TOKENS].to_vec()
}

fn unique_tail(n: u32) -> Vec<u32> {
    (0..UNIQUE_TOKENS as u32).map(|i| n.wrapping_mul(1_000_003).wrapping_add(i) ^ 0x5bd1_e995).collect()
}

/// Mean simulated TTFT in seconds, and mean cached tokens, of `n` requests submitted at once.
async fn run(n: u32, caching: bool) -> (f64, f64) {
    let mut profile = Profile::builtin("h100-qwen2.5-7b").unwrap();
    profile.enable_prefix_caching = caching;
    let engine = Engine::start(profile, 0.0).unwrap();
    let prefix = shared_prefix();
    let receivers: Vec<_> = (0..n)
        .map(|i| {
            let mut prompt = prefix.clone();
            prompt.extend(unique_tail(i));
            engine.submit(EngineRequest { prompt, max_new_tokens: 8, ..EngineRequest::default() })
        })
        .collect();
    let mut ttft = Duration::ZERO;
    let mut cached = 0;
    for mut rx in receivers {
        let mut last = None;
        while let Some(event) = rx.recv().await {
            last = Some(event);
        }
        let Some(EngineEvent::Finished { ttft: t, cached_tokens, completion_tokens, .. }) = last else {
            panic!("request did not finish: {last:?}");
        };
        assert_eq!(completion_tokens, 8);
        ttft += t;
        cached += cached_tokens;
    }
    (ttft.as_secs_f64() / f64::from(n), cached as f64 / f64::from(n))
}

#[tokio::test]
async fn prefix_caching_keeps_ttft_flat_as_concurrency_grows() {
    let mut off = Vec::new();
    let mut on = Vec::new();
    for n in [5, 20, 50, 100] {
        off.push(run(n, false).await);
        on.push(run(n, true).await);
    }
    let summary =
        format!("(mean TTFT s, mean cached tokens) for N = 5, 20, 50, 100: without cache {off:?}, with {on:?}");
    // Shown with `cargo test --test sim_engine -- --nocapture`.
    eprintln!("{summary}");
    // Without the cache nothing is ever a hit, and TTFT grows with N roughly in proportion.
    assert!(off.iter().all(|&(_, cached)| cached == 0.0), "{summary}");
    for w in off.windows(2) {
        assert!(w[1].0 > w[0].0, "{summary}");
    }
    let off_growth = off[3].0 / off[0].0;
    assert!(off_growth > 6.0, "x{off_growth:.1} from 5 to 100 requests; {summary}");
    assert!(off[3].0 / off[2].0 > 1.6, "{summary}");
    // With it, nearly every request reuses the prefix, and TTFT grows far less.
    assert!(on[3].1 > 0.9 * PREFIX_TOKENS as f64, "{summary}");
    let on_growth = on[3].0 / on[0].0;
    assert!(on_growth < off_growth / 2.5, "x{on_growth:.1} vs x{off_growth:.1}; {summary}");
    assert!(on[3].0 < off[3].0 / 3.0, "{summary}");
}
