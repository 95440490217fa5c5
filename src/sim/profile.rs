//! Engine profiles: the serving limits of a vLLM-like engine and a step-time model fitted on real
//! hardware. The built-in profiles are the JSON files under `benches/calibration/`, where the script
//! that measures them writes them, embedded at build time; each file records how it was fitted.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::{Eviction, SchedulerConfig};

/// Time of one engine step (one forward pass of the batch), fitted per hardware and model:
///
/// ```text
/// step_us = base_us
///         + prefill_token_us * prefill_tokens
///         + prefill_attn_ns * sum over prefill chunks (chunk_tokens * context_len_at_chunk_end) / 1000
///         + decode_seq_us * decode_seqs
///         + kv_read_ns * kv_tokens_read / 1000
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepModel {
    /// Fixed cost of a step: reading the weights once (memory-bound decode at batch 1).
    pub base_us: f64,
    /// Linear (GEMM) cost per prefilled token.
    pub prefill_token_us: f64,
    /// Attention cost per (prefilled token x context token).
    pub prefill_attn_ns: f64,
    /// Added cost per decoding sequence.
    pub decode_seq_us: f64,
    /// Cost per KV-cache token read by decoding sequences.
    pub kv_read_ns: f64,
}

pub use crate::engine::StepLoad;

/// The terms of the step-time formula, in the order of [`StepModel::parts_us`].
pub const STEP_PARTS: [&str; 5] = ["base", "prefill", "prefill_attention", "decode", "kv_read"];

impl StepModel {
    /// A step's time split by the terms of the formula, in microseconds (see [`STEP_PARTS`]).
    pub fn parts_us(&self, load: &StepLoad) -> [f64; 5] {
        [
            self.base_us,
            self.prefill_token_us * load.prefill_tokens as f64,
            self.prefill_attn_ns * load.prefill_attn as f64 / 1000.0,
            self.decode_seq_us * load.decode_seqs as f64,
            self.kv_read_ns * load.kv_tokens_read as f64 / 1000.0,
        ]
    }

    pub fn step_time(&self, load: &StepLoad) -> Duration {
        let us: f64 = self.parts_us(load).iter().sum();
        // Whole nanoseconds keep the virtual clock exact and runs reproducible across platforms.
        Duration::from_nanos((us * 1000.0).round().max(0.0) as u64)
    }
}

fn enabled() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub name: String,
    pub hardware: String,
    pub model: String,
    /// Tokens per KV block (vLLM's default 16).
    pub block_size: usize,
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Token budget of one step (chunked prefill).
    pub max_num_batched_tokens: usize,
    /// KV-cache size in tokens.
    pub kv_capacity_tokens: usize,
    /// Automatic prefix caching (vLLM v1 turns it on by default).
    #[serde(default = "enabled")]
    pub enable_prefix_caching: bool,
    /// Which cached KV blocks go first when blocks are short (`lru` or `next_use`, the default).
    #[serde(default)]
    pub kv_eviction: Eviction,
    /// Tokens per page of the KV cache (divides `block_size`; `None`: one page per block). Smaller
    /// pages let a block that departs from a cached block partway share its pages up to there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_page_size: Option<usize>,
    pub step: StepModel,
    /// How the step model was obtained: method, measurements, fit quality.
    #[serde(default)]
    pub calibration: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read profile {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("profile {origin} is not valid JSON for a profile: {source}")]
    Parse { origin: String, source: serde_json::Error },
    #[error("profile {name}: field `{field}` {reason}")]
    Invalid { name: String, field: &'static str, reason: String },
    #[error("no built-in profile named {0:?} (built-in: {names})", names = Profile::builtin_names().join(", "))]
    UnknownBuiltin(String),
}

const BUILTIN: &[(&str, &str)] = &[
    ("h100-qwen2.5-7b", include_str!("../../benches/calibration/h100-qwen2.5-7b.json")),
    ("h100-qwen2.5-0.5b", include_str!("../../benches/calibration/h100-qwen2.5-0.5b.json")),
    ("h200-qwen2.5-7b", include_str!("../../benches/calibration/h200-qwen2.5-7b.json")),
    ("h200-qwen2.5-0.5b", include_str!("../../benches/calibration/h200-qwen2.5-0.5b.json")),
];

impl Profile {
    /// Names of the profiles compiled into the crate.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(name, _)| *name).collect()
    }

    /// A built-in profile by name; `None` if there is none of that name (or it does not parse,
    /// which the tests rule out).
    pub fn builtin(name: &str) -> Option<Profile> {
        let (_, text) = BUILTIN.iter().find(|(n, _)| *n == name)?;
        Self::from_json_str(text, name).ok()
    }

    /// A built-in profile by name, or a JSON profile file if `name_or_path` is not a built-in name.
    pub fn resolve(name_or_path: &str) -> Result<Profile, ProfileError> {
        if let Some(p) = Self::builtin(name_or_path) {
            return Ok(p);
        }
        let path = Path::new(name_or_path);
        if path.extension().is_some_and(|e| e == "json") || path.exists() {
            return Self::from_json_file(path);
        }
        Err(ProfileError::UnknownBuiltin(name_or_path.to_owned()))
    }

    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Profile, ProfileError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| ProfileError::Io { path: path.display().to_string(), source })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses and validates a profile; `origin` names the source in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Profile, ProfileError> {
        let profile: Profile =
            serde_json::from_str(text).map_err(|source| ProfileError::Parse { origin: origin.to_owned(), source })?;
        profile.validate()?;
        Ok(profile)
    }

    /// A small engine with round numbers for unit tests: 1 ms steps plus 1 us per prefill token and
    /// 10 us per decoding sequence; 64 sequences, 512-token steps, 4096 KV tokens.
    pub fn test() -> Profile {
        Profile {
            name: "test".to_owned(),
            hardware: "none".to_owned(),
            model: "test".to_owned(),
            block_size: 16,
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            kv_capacity_tokens: 4096,
            enable_prefix_caching: true,
            kv_eviction: Eviction::default(),
            kv_page_size: None,
            step: StepModel {
                base_us: 1000.0,
                prefill_token_us: 1.0,
                prefill_attn_ns: 0.0,
                decode_seq_us: 10.0,
                kv_read_ns: 0.0,
            },
            calibration: serde_json::json!({"method": "fixed constants for tests"}),
        }
    }

    /// KV capacity in whole blocks.
    /// The scheduler limits this profile's engine runs with.
    pub fn scheduler_config(&self) -> SchedulerConfig {
        SchedulerConfig {
            block_size: self.block_size,
            page_size: self.kv_page_size.unwrap_or(self.block_size),
            kv_capacity_blocks: self.kv_capacity_blocks(),
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            enable_prefix_caching: self.enable_prefix_caching,
            eviction: self.kv_eviction,
        }
    }

    pub fn kv_capacity_blocks(&self) -> usize {
        self.kv_capacity_tokens / self.block_size.max(1)
    }

    pub fn validate(&self) -> Result<(), ProfileError> {
        let invalid =
            |field: &'static str, reason: String| ProfileError::Invalid { name: self.name.clone(), field, reason };
        for (field, value) in [
            ("block_size", self.block_size),
            ("max_num_seqs", self.max_num_seqs),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1".to_owned()));
            }
        }
        if let Some(page) = self.kv_page_size {
            if page == 0 || self.block_size % page != 0 {
                return Err(invalid(
                    "kv_page_size",
                    format!("is {page}; it must divide the block size ({})", self.block_size),
                ));
            }
        }
        if self.kv_capacity_tokens < self.block_size {
            return Err(invalid(
                "kv_capacity_tokens",
                format!("is {}, less than one block of {}", self.kv_capacity_tokens, self.block_size),
            ));
        }
        let s = &self.step;
        for (field, value) in [
            ("step.base_us", s.base_us),
            ("step.prefill_token_us", s.prefill_token_us),
            ("step.prefill_attn_ns", s.prefill_attn_ns),
            ("step.decode_seq_us", s.decode_seq_us),
            ("step.kv_read_ns", s.kv_read_ns),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(invalid(field, format!("is {value}; it must be a finite number >= 0")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_builtin_profile_loads() {
        for name in Profile::builtin_names() {
            let text = BUILTIN.iter().find(|(n, _)| *n == name).unwrap().1;
            let p = Profile::from_json_str(text, name).unwrap();
            assert_eq!(p.name, name);
            assert_eq!(p.block_size, 16);
        }
        assert!(Profile::builtin("nope").is_none());
    }

    #[test]
    fn the_small_model_steps_faster() {
        let big = Profile::builtin("h100-qwen2.5-7b").unwrap();
        let small = Profile::builtin("h100-qwen2.5-0.5b").unwrap();
        let load =
            StepLoad { prefill_tokens: 2048, prefill_attn: 2048 * 2048, decode_seqs: 32, kv_tokens_read: 32 * 1000 };
        assert!(small.step.step_time(&load) < big.step.step_time(&load));
    }

    #[test]
    fn step_time_follows_the_formula() {
        let m = StepModel {
            base_us: 100.0,
            prefill_token_us: 2.0,
            prefill_attn_ns: 1.0,
            decode_seq_us: 5.0,
            kv_read_ns: 10.0,
        };
        let load = StepLoad { prefill_tokens: 10, prefill_attn: 3000, decode_seqs: 4, kv_tokens_read: 500 };
        // 100 + 20 + 3 + 20 + 5 us
        assert_eq!(m.step_time(&load), Duration::from_micros(148));
    }

    #[test]
    fn invalid_fields_are_named() {
        let mut p = Profile::test();
        p.max_num_batched_tokens = 0;
        let err = p.validate().unwrap_err().to_string();
        assert!(err.contains("max_num_batched_tokens"), "{err}");
        let mut p = Profile::test();
        p.step.decode_seq_us = f64::NAN;
        assert!(p.validate().unwrap_err().to_string().contains("step.decode_seq_us"));
        let err = Profile::from_json_str("{\"name\": 1}", "x.json").unwrap_err().to_string();
        assert!(err.contains("x.json"), "{err}");
    }

    #[test]
    fn a_user_profile_file_round_trips() {
        let dir = std::env::temp_dir().join(format!("batchagent-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mine.json");
        std::fs::write(&path, serde_json::to_string(&Profile::test()).unwrap()).unwrap();
        assert_eq!(Profile::from_json_file(&path).unwrap(), Profile::test());
        assert_eq!(Profile::resolve(path.to_str().unwrap()).unwrap(), Profile::test());
        assert!(matches!(Profile::resolve("no-such-profile"), Err(ProfileError::UnknownBuiltin(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
