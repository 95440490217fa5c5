//! Simulator settings: one flat set of `key=value` options shared by the `sim://` URL query, the
//! `batchagent sim serve` flags (`--time-scale 0.01` is the key `time-scale`, same as `time_scale`)
//! and the per-request `"sim": {...}` body field (behaviour keys only).
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `host`, `port` | `127.0.0.1`, `0` | where to listen (0 = a free port) |
//! | `profile` | `h100-qwen2.5-7b` | built-in engine profile name, or a profile JSON path |
//! | `time_scale` | `1` | real seconds per simulated second (0 = never wait) |
//! | `seed` | `0` | every draw (behaviour, faults) derives from it |
//! | `model` | any | pins the served model name; unset, any name is served (and echoed back), `/v1/models` lists `sim-model` |
//! | `prefix_caching` | `true` | the engine's automatic prefix cache |
//! | `cache_min_tokens` | `1024` | shortest prefix Anthropic `cache_control` caches |
//! | `ttft_window` | `4096` | recent TTFTs kept for `/sim/stats` |
//! | `api_key` | none | require this key (`Authorization: Bearer` or `x-api-key`) on every route but `/sim/stats`; 401 otherwise |
//! | `tool_rounds` | `1` | tool-calling turns before the answer |
//! | `parallel_tool_calls` | `1` | calls per tool-calling turn |
//! | `distinct_args` | `10` | distinct argument sets per tool and round |
//! | `output_tokens` | `uniform:20:80` | text length: `fixed:N`, `uniform:A:B`, `normal:MEAN:SD` |
//! | `invalid_json_rate`, `prose_json_rate`, `fenced_json_rate`, `truncated_json_rate` | `0` | JSON answer defects |
//! | `fault_429` (+ `retry_after` s), `fault_500`, `fault_503`, `fault_reset`, `fault_truncate`, `fault_malformed` | `0` | exclusive fault rates (sum <= 1) |
//! | `slow_first_byte` (+ `slow_first_byte_ms`, default 2000) | `0` | rate of a delayed first byte |
//! | `fault_cut_after_call` | `0` | rate of streamed OpenAI replies with two or more tool calls that end (no `finish_reason`, no `[DONE]`) just after the second call starts, when the first is complete; only the first request with a given body, so its retry gets through |
//! | `batch_delay` | `60` | real seconds (not scaled by `time_scale`) from creating a provider batch (`/v1/batches`, `/v1/messages/batches`) to its end; rows finish spread over it; `POST /sim/batches/complete` ends every running batch at once |
//! | `batch_failure_rate` | `0` | rate of batch rows answered with a server error (500 / `api_error`) |
//! | `batch_expire_rate` | `0` | rate of batches whose completion window ends half-way: rows not finished by then expire |
//! | `rate_limit_rpm`, `rate_limit_tpm` | none | requests / tokens per minute, enforced in real time (not scaled by `time_scale`) as hosted APIs do: a token bucket holding `rate_limit_burst` seconds of allowance (default `60`: one minute's; `1` enforces 3,000 RPM as 50 requests a second, as `OpenAI` says it may), refilled continuously; a request's tokens are its messages' characters / 4 plus its `max_tokens`; every answer of `/v1/chat/completions` and `/v1/completions` carries `OpenAI`'s `x-ratelimit-*` headers, of `/v1/messages` Anthropic's `anthropic-ratelimit-*`; beyond the limit, 429 with `retry-after` |
//! | `kv_pin_ttl` | `30` | simulated seconds a tool-wait hint may keep an agent's KV blocks at most: a chat request with `"batchagent": {"agent": ID, "tool_wait_s": W}` keeps its blocks after it ends, unevictable, for min(`kv_pin_ttl`, 2 x W scaled to simulated time) (W: the hint's `next_call_s` when it carries one), until that agent's next request takes them over, or until another request needs the room |
//! | `kv_eviction` | profile's, `next_use` | which cached KV blocks are evicted first when blocks are short: `next_use` (blocks of agents whose reply called no tool, then blocks released without a hint least recently released first, then the furthest predicted next use: the end of the request plus the hint's `tool_wait_s`, or its `next_call_s`, scaled to simulated time) or `lru` (least recently released first, as vLLM) |
//! | `kv_page_size` | profile's, one page per block | tokens per page of the KV cache; must divide the block size (16). A prompt block that departs from a cached block partway (a sibling agent's task after the shared text) shares that block's pages up to the last whole page before the first differing token and stores only the rest, a diff against it |
//! | `fault_grammar` | `0` | rate of grammar-constrained requests (`response_format` with a schema) answered, every time they are sent, with llama.cpp's HTTP 500 "does not match the expected format" |

use std::fmt;

use crate::engine::Eviction;
use crate::secret::Secret;

/// Everything that can go wrong configuring or starting the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("unknown simulator option `{0}`")]
    UnknownOption(String),
    #[error("invalid value `{value}` for simulator option `{key}`: {reason}")]
    InvalidValue { key: String, value: String, reason: String },
    #[error("not a sim:// URL: `{0}`")]
    NotSimUrl(String),
    #[error(transparent)]
    Profile(#[from] super::profile::ProfileError),
    #[error(transparent)]
    Engine(#[from] super::engine::EngineError),
    #[error("fault rates add up to {0}, more than 1 (fault_429 + fault_500 + fault_503 + fault_reset + fault_truncate + fault_malformed)")]
    FaultRatesTooHigh(f64),
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
}

/// How many tokens a text answer has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OutputLen {
    Fixed(u32),
    Uniform(u32, u32),
    Normal { mean: f64, sd: f64 },
}

impl OutputLen {
    /// Draw a length from `u1`, `u2` uniform in [0, 1); never below 1.
    pub fn draw(self, u1: f64, u2: f64) -> u32 {
        match self {
            Self::Fixed(n) => n.max(1),
            Self::Uniform(a, b) => {
                let span = f64::from(b - a + 1);
                (a + ((u1 * span) as u32).min(b - a)).max(1)
            }
            Self::Normal { mean, sd } => {
                // Box-Muller; 1 - u1 keeps the logarithm finite.
                let z = (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                (mean + sd * z).round().max(1.0) as u32
            }
        }
    }

    fn parse(key: &str, value: &str) -> Result<Self, SimError> {
        let bad = |reason: &str| SimError::InvalidValue {
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        let parts: Vec<&str> = value.split(':').collect();
        let int = |s: &str| s.trim().parse::<u32>().map_err(|_| bad("expected a whole number of tokens"));
        let float = |s: &str| s.trim().parse::<f64>().map_err(|_| bad("expected a number"));
        match parts.as_slice() {
            ["fixed", n] | [n] => Ok(Self::Fixed(int(n)?)),
            ["uniform", a, b] => {
                let (a, b) = (int(a)?, int(b)?);
                if a > b {
                    return Err(bad("uniform:A:B needs A <= B"));
                }
                Ok(Self::Uniform(a, b))
            }
            ["normal", m, s] => {
                let (mean, sd) = (float(m)?, float(s)?);
                if !mean.is_finite() || !sd.is_finite() || sd < 0.0 {
                    return Err(bad("normal:MEAN:SD needs finite MEAN and SD >= 0"));
                }
                Ok(Self::Normal { mean, sd })
            }
            _ => Err(bad("expected fixed:N, uniform:A:B or normal:MEAN:SD")),
        }
    }
}

impl fmt::Display for OutputLen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(n) => write!(f, "fixed:{n}"),
            Self::Uniform(a, b) => write!(f, "uniform:{a}:{b}"),
            Self::Normal { mean, sd } => write!(f, "normal:{mean}:{sd}"),
        }
    }
}

/// What the scripted agent says. Every key can also be overridden per request.
#[derive(Debug, Clone, PartialEq)]
pub struct BehaviourConfig {
    /// Assistant turns that call tools before the agent answers.
    pub tool_rounds: u32,
    /// Tool calls per tool-calling turn.
    pub parallel_tool_calls: u32,
    /// How many different argument sets a tool is called with across all conversations.
    pub distinct_args: u32,
    pub output_tokens: OutputLen,
    pub invalid_json_rate: f64,
    pub prose_json_rate: f64,
    pub fenced_json_rate: f64,
    pub truncated_json_rate: f64,
}

impl Default for BehaviourConfig {
    fn default() -> Self {
        Self {
            tool_rounds: 1,
            parallel_tool_calls: 1,
            distinct_args: 10,
            output_tokens: OutputLen::Uniform(20, 80),
            invalid_json_rate: 0.0,
            prose_json_rate: 0.0,
            fenced_json_rate: 0.0,
            truncated_json_rate: 0.0,
        }
    }
}

impl BehaviourConfig {
    /// Set one behaviour key; `Ok(false)` if the key is not a behaviour key.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool, SimError> {
        match key {
            "tool_rounds" => self.tool_rounds = parse_num(key, value)?,
            "parallel_tool_calls" => {
                self.parallel_tool_calls = parse_num(key, value)?;
                if self.parallel_tool_calls == 0 {
                    return Err(invalid(key, value, "at least 1 call per turn"));
                }
            }
            "distinct_args" => {
                self.distinct_args = parse_num(key, value)?;
                if self.distinct_args == 0 {
                    return Err(invalid(key, value, "at least 1 distinct value"));
                }
            }
            "output_tokens" => self.output_tokens = OutputLen::parse(key, value)?,
            "invalid_json_rate" => self.invalid_json_rate = parse_rate(key, value)?,
            "prose_json_rate" => self.prose_json_rate = parse_rate(key, value)?,
            "fenced_json_rate" => self.fenced_json_rate = parse_rate(key, value)?,
            "truncated_json_rate" => self.truncated_json_rate = parse_rate(key, value)?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// Injected failures; each rate is the probability per request, drawn deterministically.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    pub fault_429: f64,
    /// Seconds sent in `Retry-After` with a 429.
    pub retry_after: u32,
    pub fault_500: f64,
    pub fault_503: f64,
    pub fault_reset: f64,
    pub fault_truncate: f64,
    pub fault_malformed: f64,
    pub slow_first_byte: f64,
    pub slow_first_byte_ms: u64,
    /// Drawn apart from the exclusive faults, on a body's first sighting only.
    pub fault_cut_after_call: f64,
    /// Drawn per request body, not per attempt: the same request always fails the same way.
    pub fault_grammar: f64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            fault_429: 0.0,
            retry_after: 1,
            fault_500: 0.0,
            fault_503: 0.0,
            fault_reset: 0.0,
            fault_truncate: 0.0,
            fault_malformed: 0.0,
            slow_first_byte: 0.0,
            slow_first_byte_ms: 2000,
            fault_cut_after_call: 0.0,
            fault_grammar: 0.0,
        }
    }
}

impl FaultConfig {
    fn set(&mut self, key: &str, value: &str) -> Result<bool, SimError> {
        match key {
            "fault_429" => self.fault_429 = parse_rate(key, value)?,
            "retry_after" => self.retry_after = parse_num(key, value)?,
            "fault_500" => self.fault_500 = parse_rate(key, value)?,
            "fault_503" => self.fault_503 = parse_rate(key, value)?,
            "fault_reset" => self.fault_reset = parse_rate(key, value)?,
            "fault_truncate" => self.fault_truncate = parse_rate(key, value)?,
            "fault_malformed" => self.fault_malformed = parse_rate(key, value)?,
            "slow_first_byte" => self.slow_first_byte = parse_rate(key, value)?,
            "slow_first_byte_ms" => self.slow_first_byte_ms = parse_num(key, value)?,
            "fault_cut_after_call" => self.fault_cut_after_call = parse_rate(key, value)?,
            "fault_grammar" => self.fault_grammar = parse_rate(key, value)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The exclusive faults share one draw, so their rates must fit in [0, 1] together.
    pub fn exclusive_total(&self) -> f64 {
        self.fault_429 + self.fault_500 + self.fault_503 + self.fault_reset + self.fault_truncate + self.fault_malformed
    }
}

/// How the provider batch APIs behave: when a batch ends, which rows fail, which batches expire.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSimConfig {
    /// Real seconds from creation to the end of a batch (not scaled by `time_scale`).
    pub delay: f64,
    pub failure_rate: f64,
    pub expire_rate: f64,
}

impl Default for BatchSimConfig {
    fn default() -> Self {
        Self { delay: 60.0, failure_rate: 0.0, expire_rate: 0.0 }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    pub host: String,
    pub port: u16,
    /// A built-in profile name or a path to a profile JSON file.
    pub profile: String,
    /// Real seconds per simulated second (0.01 = 100x faster; 0 = no waiting at all).
    pub time_scale: f64,
    pub seed: u64,
    /// The model name `/v1/models` lists; when `model_pinned`, the only name served.
    pub model: String,
    /// Set by the `model` option: requests for any other name are answered 404, as a real server
    /// does. Unset, the simulator serves whatever name it is asked for.
    pub model_pinned: bool,
    /// What `/v1/models` gives as the model's `root` (the checkpoint behind the name); the name
    /// itself when unset.
    pub model_root: Option<String>,
    pub behaviour: BehaviourConfig,
    pub faults: FaultConfig,
    pub prefix_caching: bool,
    /// Anthropic only caches prefixes at least this long (1024 tokens for most Claude models).
    pub cache_min_tokens: u32,
    /// How many recent TTFTs `/sim/stats` keeps.
    pub ttft_window: usize,
    /// When set, every route but `/sim/stats` answers 401 to a request without this key, as a
    /// gateway in front of an engine does.
    pub api_key: Option<Secret>,
    pub batches: BatchSimConfig,
    /// The context window (vLLM's `--max-model-len`): a request whose prompt plus `max_tokens`
    /// exceeds it is refused with a 400 in the server's words. `None`: only the KV cache bounds it.
    pub max_model_len: Option<u32>,
    /// Requests per minute allowed (`rate_limit_rpm`); `None`: no limit.
    pub rate_limit_rpm: Option<u64>,
    /// Tokens per minute allowed (`rate_limit_tpm`); `None`: no limit.
    pub rate_limit_tpm: Option<u64>,
    /// Seconds of allowance the rate-limit buckets hold (`rate_limit_burst`).
    pub rate_limit_burst: f64,
    /// Longest a tool-wait hint keeps an agent's KV blocks pinned, in simulated seconds.
    pub kv_pin_ttl: f64,
    /// The KV eviction order; `None`: the profile's.
    pub kv_eviction: Option<Eviction>,
    /// Tokens per KV page; `None`: the profile's.
    pub kv_page_size: Option<usize>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port: 0,
            profile: "h100-qwen2.5-7b".to_owned(),
            time_scale: 1.0,
            seed: 0,
            model: "sim-model".to_owned(),
            model_pinned: false,
            model_root: None,
            behaviour: BehaviourConfig::default(),
            faults: FaultConfig::default(),
            prefix_caching: true,
            cache_min_tokens: 1024,
            ttft_window: 4096,
            api_key: None,
            batches: BatchSimConfig::default(),
            max_model_len: None,
            rate_limit_rpm: None,
            rate_limit_tpm: None,
            rate_limit_burst: 60.0,
            kv_pin_ttl: 30.0,
            kv_eviction: None,
            kv_page_size: None,
        }
    }
}

impl SimConfig {
    /// The context window `/v1/models` and `/tokenize` report: `max_model_len`, or 32,768 tokens
    /// when it is not set (and nothing is refused for length but what the KV cache cannot hold).
    pub fn context_window(&self) -> u32 {
        self.max_model_len.unwrap_or(32768)
    }

    /// Parse `sim://` or `sim://?profile=h100-qwen2.5-0.5b&time_scale=0.01&seed=7&fault_429=0.05`.
    /// A host part (`sim://127.0.0.1:8000?...`) sets where the embedded server listens.
    pub fn from_url(url: &str) -> Result<SimConfig, SimError> {
        let rest = url.strip_prefix("sim://").ok_or_else(|| SimError::NotSimUrl(url.to_owned()))?;
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut config = SimConfig::default();
        let authority = authority.trim_end_matches('/');
        if !authority.is_empty() {
            match authority.rsplit_once(':') {
                Some((host, port)) => {
                    config.set("host", host)?;
                    config.set("port", port)?;
                }
                None => config.set("host", authority)?,
            }
        }
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
            config.set(&percent_decode(key), &percent_decode(value))?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Whether a request for `requested` is served: any non-empty name, or only the pinned one.
    pub fn serves(&self, requested: &str) -> bool {
        if self.model_pinned {
            requested == self.model
        } else {
            !requested.is_empty()
        }
    }

    /// The name a response carries: the one asked for, when it is served.
    pub fn answer_model(&self, requested: Option<&str>) -> String {
        match requested {
            Some(name) if self.serves(name) => name.to_owned(),
            _ => self.model.clone(),
        }
    }

    /// Set one option by name. Dashes and underscores are interchangeable and a leading `--` is
    /// ignored, so CLI flags map one to one.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), SimError> {
        let key = key.trim_start_matches("--").replace('-', "_");
        let key = key.as_str();
        match key {
            "host" => value.clone_into(&mut self.host),
            "port" => self.port = parse_num(key, value)?,
            "profile" => value.clone_into(&mut self.profile),
            "time_scale" => {
                let scale: f64 = parse_num(key, value)?;
                if !scale.is_finite() || scale < 0.0 {
                    return Err(invalid(key, value, "a time scale is a finite number >= 0"));
                }
                self.time_scale = scale;
            }
            "seed" => self.seed = parse_num(key, value)?,
            "kv_pin_ttl" => {
                let ttl: f64 = parse_num(key, value)?;
                if !ttl.is_finite() || ttl < 0.0 {
                    return Err(invalid(key, value, "seconds: a finite number >= 0"));
                }
                self.kv_pin_ttl = ttl;
            }
            "kv_eviction" => {
                let eviction = value.parse().map_err(|e: String| invalid(key, value, &e))?;
                self.kv_eviction = Some(eviction);
            }
            "kv_page_size" => {
                let page: usize = parse_num(key, value)?;
                if page == 0 {
                    return Err(invalid(key, value, "a page holds at least 1 token"));
                }
                self.kv_page_size = Some(page);
            }
            "max_model_len" => {
                let limit: u32 = parse_num(key, value)?;
                if limit == 0 {
                    return Err(invalid(key, value, "a context holds at least 1 token"));
                }
                self.max_model_len = Some(limit);
            }
            "model" => {
                value.clone_into(&mut self.model);
                self.model_pinned = true;
            }
            "rate_limit_rpm" | "rate_limit_tpm" => {
                let limit: u64 = parse_num(key, value)?;
                if limit == 0 {
                    return Err(invalid(key, value, "a limit allows at least 1 per minute"));
                }
                if key == "rate_limit_rpm" {
                    self.rate_limit_rpm = Some(limit);
                } else {
                    self.rate_limit_tpm = Some(limit);
                }
            }
            "rate_limit_burst" => {
                let seconds: f64 = parse_num(key, value)?;
                if !seconds.is_finite() || !(0.001..=60.0).contains(&seconds) {
                    return Err(invalid(key, value, "seconds of allowance, above 0 and at most 60"));
                }
                self.rate_limit_burst = seconds;
            }
            "model_root" => self.model_root = Some(value.to_owned()),
            "api_key" => self.api_key = Secret::non_empty(Some(value.to_owned())),
            "prefix_caching" => self.prefix_caching = parse_bool(key, value)?,
            "cache_min_tokens" => self.cache_min_tokens = parse_num(key, value)?,
            "ttft_window" => {
                self.ttft_window = parse_num(key, value)?;
                if self.ttft_window == 0 {
                    return Err(invalid(key, value, "keep at least 1 TTFT"));
                }
            }
            "batch_delay" => {
                let delay: f64 = parse_num(key, value)?;
                if !delay.is_finite() || delay < 0.0 {
                    return Err(invalid(key, value, "a delay is a finite number of seconds >= 0"));
                }
                self.batches.delay = delay;
            }
            "batch_failure_rate" => self.batches.failure_rate = parse_rate(key, value)?,
            "batch_expire_rate" => self.batches.expire_rate = parse_rate(key, value)?,
            _ => {
                if !self.behaviour.set(key, value)? && !self.faults.set(key, value)? {
                    return Err(SimError::UnknownOption(key.to_owned()));
                }
            }
        }
        Ok(())
    }

    /// Checks that need several options at once.
    pub fn validate(&self) -> Result<(), SimError> {
        let total = self.faults.exclusive_total();
        if total > 1.0 + 1e-9 {
            return Err(SimError::FaultRatesTooHigh(total));
        }
        Ok(())
    }
}

fn invalid(key: &str, value: &str, reason: &str) -> SimError {
    SimError::InvalidValue { key: key.to_owned(), value: value.to_owned(), reason: reason.to_owned() }
}

fn parse_num<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, SimError>
where
    T::Err: fmt::Display,
{
    value.trim().parse::<T>().map_err(|e| invalid(key, value, &e.to_string()))
}

fn parse_rate(key: &str, value: &str) -> Result<f64, SimError> {
    let rate: f64 = parse_num(key, value)?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(invalid(key, value, "a rate is between 0 and 1"))
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool, SimError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(invalid(key, value, "expected true or false")),
    }
}

/// A query component as forms encode it: `+` is a space, `%XX` a byte.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bare_url_gives_defaults() {
        assert_eq!(SimConfig::from_url("sim://").unwrap(), SimConfig::default());
    }

    #[test]
    fn url_query_sets_options() {
        let c = SimConfig::from_url(
            "sim://?profile=h100-qwen2.5-0.5b&time_scale=0.01&seed=7&fault_429=0.05&tool_rounds=2&distinct_args=3&output_tokens=normal:40:5",
        )
        .unwrap();
        assert_eq!(c.profile, "h100-qwen2.5-0.5b");
        assert!((c.time_scale - 0.01).abs() < 1e-12);
        assert_eq!(c.seed, 7);
        assert!((c.faults.fault_429 - 0.05).abs() < 1e-12);
        assert_eq!(c.behaviour.tool_rounds, 2);
        assert_eq!(c.behaviour.distinct_args, 3);
        assert_eq!(c.behaviour.output_tokens, OutputLen::Normal { mean: 40.0, sd: 5.0 });
    }

    #[test]
    fn url_authority_sets_host_and_port() {
        let c = SimConfig::from_url("sim://0.0.0.0:8123/?model=m%2Fx").unwrap();
        assert_eq!((c.host.as_str(), c.port, c.model.as_str()), ("0.0.0.0", 8123, "m/x"));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = SimConfig::from_url("sim://?tool_roundz=1").unwrap_err();
        assert!(err.to_string().contains("tool_roundz"), "{err}");
    }

    #[test]
    fn bad_values_name_key_and_value() {
        for (k, v) in [("fault_500", "1.5"), ("seed", "x"), ("output_tokens", "uniform:9:3"), ("time_scale", "-1")] {
            let err = SimConfig::default().set(k, v).unwrap_err().to_string();
            assert!(err.contains(k) && err.contains(v), "{err}");
        }
    }

    #[test]
    fn cli_flags_map_to_keys() {
        let mut c = SimConfig::default();
        c.set("--time-scale", "0.5").unwrap();
        c.set("slow-first-byte-ms", "30").unwrap();
        assert!((c.time_scale - 0.5).abs() < 1e-12);
        assert_eq!(c.faults.slow_first_byte_ms, 30);
    }

    #[test]
    fn fault_rates_over_one_are_rejected() {
        assert!(matches!(
            SimConfig::from_url("sim://?fault_429=0.6&fault_500=0.6"),
            Err(SimError::FaultRatesTooHigh(_))
        ));
    }

    #[test]
    fn output_len_draws_stay_in_range() {
        for i in 0..100 {
            let u = f64::from(i) / 100.0;
            let n = OutputLen::Uniform(20, 80).draw(u, 0.5);
            assert!((20..=80).contains(&n));
            assert!(OutputLen::Normal { mean: 1.0, sd: 50.0 }.draw(u, u) >= 1);
        }
        assert_eq!(OutputLen::Uniform(5, 5).draw(0.999, 0.0), 5);
    }
}
