//! Backend URLs (`vllm://host:port`, `openai://`, `ollama://`, ...) parsed into a scheme and the
//! server's HTTP base URL, and turned into a connected [`Backend`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::anthropic::AnthropicBackend;
use super::bedrock::BedrockBackend;
use super::ollama::OllamaBackend;
use super::openai::{Flavour, OpenAiBackend};
use super::{Backend, BackendError};
use crate::limits::{DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_RESPONSE_BYTES};
use crate::secret::{display_url, Secret};

/// How to reach a backend. `api_key: None` means "from the environment, if the scheme has a
/// variable for it" (see [`Scheme::api_key_env`]).
#[derive(Clone)]
pub struct BackendOptions {
    pub api_key: Option<Secret>,
    /// Whole model call, body included (`call_timeout`).
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response body (`idle_timeout`); `None`: no limit.
    pub idle_timeout: Option<Duration>,
    /// Most bytes of one response body (`max_response_bytes`).
    pub max_response_bytes: usize,
    /// Send NVIDIA Dynamo `nvext.agent_hints` when a request carries hints.
    pub agent_hints: bool,
    /// Send vLLM's `priority` request field when a request carries hints (vLLM refuses it unless
    /// started with `--scheduling-policy priority`, so it is never sent by default).
    pub engine_priority: bool,
    pub extra_headers: Vec<(String, String)>,
    /// Requests and tokens per minute set by hand (`rpm=`, `tpm=`); otherwise learned from the
    /// rate-limit headers of the answers.
    pub rate_limits: crate::limits::HandLimits,
    /// Where the rate-limit budgets are kept when several processes share them (a fleet's Redis);
    /// `None`: in this process.
    pub budgets: Option<Arc<dyn crate::limits::pacer::SharedBudgets>>,
}

impl Default for BackendOptions {
    fn default() -> Self {
        Self {
            api_key: None,
            request_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            agent_hints: false,
            engine_priority: false,
            extra_headers: Vec::new(),
            rate_limits: crate::limits::HandLimits::default(),
            budgets: None,
        }
    }
}

impl fmt::Debug for BackendOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendOptions")
            .field("api_key", &self.api_key)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("agent_hints", &self.agent_hints)
            .field("engine_priority", &self.engine_priority)
            .field("rate_limits", &self.rate_limits)
            .field("budgets", &if self.budgets.is_some() { "shared" } else { "local" })
            .field("extra_headers", &self.extra_headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    OpenAi,
    Vllm,
    Sglang,
    Dynamo,
    Ollama,
    LlamaCpp,
    Anthropic,
    Bedrock,
    Sim,
    /// `http://` / `https://`: a generic `OpenAI`-compatible server.
    Http,
}

impl Scheme {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "openai" => Self::OpenAi,
            "vllm" => Self::Vllm,
            "sglang" => Self::Sglang,
            "dynamo" => Self::Dynamo,
            "ollama" => Self::Ollama,
            "llamacpp" | "llama.cpp" | "llama-cpp" => Self::LlamaCpp,
            "anthropic" => Self::Anthropic,
            "bedrock" => Self::Bedrock,
            "sim" => Self::Sim,
            "http" | "https" => Self::Http,
            _ => return None,
        })
    }

    /// The port a server of this kind listens on by default.
    pub fn default_port(self) -> Option<u16> {
        match self {
            Self::Vllm | Self::Dynamo => Some(8000),
            Self::Sglang => Some(30000),
            Self::Ollama => Some(11434),
            Self::LlamaCpp => Some(8080),
            Self::OpenAi | Self::Anthropic | Self::Bedrock | Self::Sim | Self::Http => None,
        }
    }

    /// The environment variable an API key is read from when none is given. The generic `http://`
    /// scheme has none on purpose: an `OpenAI` key must not be sent to an arbitrary server.
    pub fn api_key_env(self) -> Option<&'static str> {
        match self {
            Self::OpenAi => Some("OPENAI_API_KEY"),
            Self::Vllm => Some("VLLM_API_KEY"),
            Self::Sglang => Some("SGLANG_API_KEY"),
            Self::Dynamo => Some("DYNAMO_API_KEY"),
            Self::LlamaCpp => Some("LLAMACPP_API_KEY"),
            Self::Anthropic => Some("ANTHROPIC_API_KEY"),
            Self::Ollama | Self::Bedrock | Self::Sim | Self::Http => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedUrl {
    pub scheme: Scheme,
    /// `http(s)://host[:port][/path]`, no trailing slash. Empty for `sim://` without a host (the
    /// caller starts a simulator); for `bedrock://region` the regional runtime endpoint.
    pub base_url: String,
    pub query: Vec<(String, String)>,
    /// `bedrock://region`: the region (the endpoint may be overridden, see [`parse_backend_url`]).
    pub region: Option<String>,
}

impl ParsedUrl {
    pub fn query_value(&self, key: &str) -> Option<&str> {
        self.query.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Parses a backend URL. Plain `http` is used for self-hosted engines unless the scheme carries
/// `+https` (`vllm+https://host`), in which case the scheme's default port is not applied (443).
/// The hosted APIs are reached over https unless the scheme carries `+http`
/// (`anthropic+http://host:port`, any server speaking that protocol); a bare `openai://` or
/// `anthropic://` goes to `OPENAI_BASE_URL` / `ANTHROPIC_BASE_URL` when set, as the official SDKs do.
pub fn parse_backend_url(url: &str) -> Result<ParsedUrl, BackendError> {
    parse_backend_url_with(url, &|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
}

/// [`parse_backend_url`] with the environment passed in.
pub fn parse_backend_url_with(url: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<ParsedUrl, BackendError> {
    let url = url.trim();
    let shown = display_url(url);
    let (scheme_text, rest) = url.split_once("://").ok_or_else(|| {
        BackendError::Config(format!("backend URL {shown:?} has no scheme (expected e.g. vllm://host:port)"))
    })?;
    let scheme_text = scheme_text.to_ascii_lowercase();
    let (name, tls) = if let Some(name) = scheme_text.strip_suffix("+https") {
        (name, Some(true))
    } else if let Some(name) = scheme_text.strip_suffix("+http") {
        (name, Some(false))
    } else {
        (scheme_text.as_str(), (scheme_text == "https").then_some(true))
    };
    let suffixed = name.len() != scheme_text.len();
    let scheme = Scheme::from_name(name)
        .filter(|s| !suffixed || !matches!(s, Scheme::Http | Scheme::Bedrock | Scheme::Sim))
        .ok_or_else(|| {
            BackendError::Config(format!(
                "unknown backend scheme {scheme_text:?} in {shown:?} (expected openai, vllm, sglang, dynamo, ollama, \
                 llamacpp, anthropic, bedrock, sim, http or https, with +http or +https where the protocol \
                 is not tied to one)"
            ))
        })?;
    let (rest, query_text) = rest.split_once('?').unwrap_or((rest, ""));
    let query = parse_query(query_text, &shown)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err(BackendError::Config(
            "credentials in a backend URL are not accepted; pass api_key or set the environment variable".into(),
        ));
    }
    let hosted = matches!(scheme, Scheme::OpenAi | Scheme::Anthropic);
    let mut region = None;
    let base_url = match scheme {
        Scheme::Sim if authority.is_empty() => String::new(),
        Scheme::Bedrock => {
            let name = bedrock_region(authority, env)?;
            // The SDKs' endpoint overrides (VPC endpoints, proxies, local stand-ins).
            let endpoint = match env("AWS_ENDPOINT_URL_BEDROCK_RUNTIME").or_else(|| env("AWS_ENDPOINT_URL")) {
                Some(url) => url.trim().trim_end_matches('/').to_owned(),
                None => format!("https://bedrock-runtime.{name}.amazonaws.com"),
            };
            region = Some(name);
            endpoint
        }
        Scheme::OpenAi | Scheme::Anthropic if authority.is_empty() && tls.is_none() => {
            let (var, default) = match scheme {
                Scheme::OpenAi => ("OPENAI_BASE_URL", "https://api.openai.com/v1"),
                _ => ("ANTHROPIC_BASE_URL", "https://api.anthropic.com"),
            };
            match env(var) {
                Some(from_env) => base_url_from_env(var, &from_env)?,
                None => default.to_owned(),
            }
        }
        Scheme::Http | Scheme::OpenAi | Scheme::Anthropic if authority.is_empty() => {
            return Err(BackendError::Config(format!("backend URL {shown:?} has no host")));
        }
        _ => {
            let host = if authority.is_empty() { "localhost" } else { authority };
            let has_port = host_has_port(host);
            let secure = tls.unwrap_or(hosted);
            let port = match scheme.default_port() {
                Some(port) if !has_port && !secure => format!(":{port}"),
                _ => String::new(),
            };
            let http = if secure { "https" } else { "http" };
            format!("{http}://{host}{port}{path}")
        }
    };
    if !base_url.is_empty() {
        reqwest::Url::parse(&base_url)
            .map_err(|e| BackendError::Config(format!("backend URL {shown:?} is not a valid address: {e}")))?;
    }
    Ok(ParsedUrl { scheme, base_url, query, region })
}

/// `OPENAI_BASE_URL` / `ANTHROPIC_BASE_URL`: an http(s) URL with no credentials or query in it.
fn base_url_from_env(var: &str, value: &str) -> Result<String, BackendError> {
    let value = value.trim().trim_end_matches('/');
    let parsed = reqwest::Url::parse(value)
        .map_err(|e| BackendError::Config(format!("{var} ({:?}) is not a valid URL: {e}", display_url(value))))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(BackendError::Config(format!("{var} ({:?}) is not an http(s) URL", display_url(value))));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() || parsed.query().is_some() {
        return Err(BackendError::Config(format!(
            "{var} carries credentials or a query; give the key through the API key variable instead"
        )));
    }
    Ok(value.to_owned())
}

fn host_has_port(host: &str) -> bool {
    // "[::1]:8000" has a port, "[::1]" has not; "host:8000" has one.
    match host.rfind(']') {
        Some(close) => host[close..].contains(':'),
        None => host.contains(':'),
    }
}

fn bedrock_region(region: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, BackendError> {
    let region = if region.is_empty() {
        env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")).ok_or_else(|| {
            BackendError::Config("bedrock:// needs a region (bedrock://us-east-1) or AWS_REGION set".into())
        })?
    } else {
        region.to_owned()
    };
    if region.is_empty() || !region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err(BackendError::Config(format!("bedrock region {region:?} is not a region name like us-east-1")));
    }
    Ok(region)
}

fn parse_query(text: &str, shown: &str) -> Result<Vec<(String, String)>, BackendError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    // Let the URL parser do the percent-decoding.
    let parsed = reqwest::Url::parse(&format!("http://q/?{text}"))
        .map_err(|e| BackendError::Config(format!("query of backend URL {shown:?} is not valid: {e}")))?;
    Ok(parsed.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
}

/// Connects to the backend a URL names. No request is made here: the first model call opens the
/// connection. `ollama://` speaks the native `/api/chat`; `ollama://host?api=openai` its
/// `OpenAI`-compatible endpoint.
pub fn connect(url: &str, options: &BackendOptions) -> Result<Arc<dyn Backend>, BackendError> {
    let parsed = parse_backend_url(url)?;
    let allowed: &[&str] = match parsed.scheme {
        Scheme::Ollama => &["api"],
        Scheme::Bedrock => &["profile"],
        // `engine=batchagent`: the server is BatchAgent's embedded engine (how `local://` is
        // spoken to), which reads the tool-wait hint.
        Scheme::Vllm => &["engine"],
        _ => &[],
    };
    if parsed.scheme != Scheme::Sim {
        if let Some((key, _)) = parsed.query.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            let hint = if looks_like_credential(key) {
                ": credentials in a backend URL are not accepted; pass api_key or set the environment variable"
            } else {
                ""
            };
            return Err(BackendError::Config(format!(
                "unknown option {key:?} in backend URL {:?}{hint}",
                display_url(url)
            )));
        }
    }
    let options = with_env_key(parsed.scheme, options);
    let flavour = match parsed.scheme {
        Scheme::OpenAi => Flavour::OpenAi,
        Scheme::Vllm => Flavour::Vllm,
        Scheme::Sglang => Flavour::Sglang,
        Scheme::Dynamo => Flavour::Dynamo,
        Scheme::LlamaCpp => Flavour::LlamaCpp,
        Scheme::Http => Flavour::Generic,
        Scheme::Sim if parsed.base_url.is_empty() => {
            return Err(BackendError::Config(
                "sim:// without host:port is started by the simulator, not connected to".into(),
            ));
        }
        Scheme::Sim => Flavour::Sim,
        Scheme::Ollama => match parsed.query_value("api") {
            None | Some("native") => return Ok(Arc::new(OllamaBackend::new(&parsed.base_url, &options)?)),
            Some("openai") => Flavour::Ollama,
            Some(other) => {
                return Err(BackendError::Config(format!("ollama api={other:?} is not one of \"native\", \"openai\"")));
            }
        },
        Scheme::Anthropic => {
            return Ok(Arc::new(AnthropicBackend::new(&parsed.base_url, options.api_key.clone(), &options)?))
        }
        Scheme::Bedrock => {
            let profile = parsed.query_value("profile");
            return Ok(Arc::new(BedrockBackend::from_environment(
                parsed.region.as_deref(),
                profile,
                Some(&parsed.base_url),
                (&options).into(),
            )?));
        }
    };
    let backend = OpenAiBackend::new(flavour, &parsed.base_url, &options)?;
    match parsed.query_value("engine") {
        None => Ok(Arc::new(backend)),
        Some("batchagent") if flavour == Flavour::Vllm => Ok(Arc::new(backend.with_tool_wait_hint())),
        Some(other) => Err(BackendError::Config(format!("engine={other:?} is not \"batchagent\""))),
    }
}

/// The `/completions` side of an endpoint that takes a list of prompts in one request (vLLM,
/// `SGLang`, llama.cpp's server, a running simulator); `None` for other backends.
pub fn connect_completions(url: &str, options: &BackendOptions) -> Result<Option<OpenAiBackend>, BackendError> {
    let parsed = parse_backend_url(url)?;
    let flavour = match parsed.scheme {
        Scheme::Vllm => Flavour::Vllm,
        Scheme::Sglang => Flavour::Sglang,
        Scheme::LlamaCpp => Flavour::LlamaCpp,
        Scheme::Sim if !parsed.base_url.is_empty() => Flavour::Sim,
        _ => return Ok(None),
    };
    let options = with_env_key(parsed.scheme, options);
    Ok(Some(OpenAiBackend::new(flavour, &parsed.base_url, &options)?))
}

fn looks_like_credential(option: &str) -> bool {
    let option = option.to_ascii_lowercase();
    ["key", "token", "secret", "password", "auth"].iter().any(|word| option.contains(word))
}

/// The headers a side request to the endpoint (health, model list, `/metrics`) carries: the extra
/// headers and the key the model calls send, so a server that requires a key on every route
/// answers those too.
pub fn probe_headers(scheme: Scheme, options: &BackendOptions) -> Result<reqwest::header::HeaderMap, BackendError> {
    use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
    let options = with_env_key(scheme, options);
    let mut headers = HeaderMap::new();
    let mut put = |name: HeaderName, value: &str| -> Result<(), BackendError> {
        let mut value = HeaderValue::from_str(value)
            .map_err(|_| BackendError::Config(format!("header {name} has a value that is not valid")))?;
        value.set_sensitive(true);
        headers.insert(name, value);
        Ok(())
    };
    for (name, value) in &options.extra_headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| BackendError::Config(format!("extra header name {name:?} is not a valid HTTP header")))?;
        put(name, value)?;
    }
    if let Some(key) = &options.api_key {
        match scheme {
            Scheme::Anthropic => put(HeaderName::from_static("x-api-key"), key.expose())?,
            _ => put(AUTHORIZATION, &format!("Bearer {}", key.expose()))?,
        }
    }
    Ok(headers)
}

fn with_env_key(scheme: Scheme, options: &BackendOptions) -> BackendOptions {
    let mut options = options.clone();
    if options.api_key.is_none() {
        options.api_key = Secret::non_empty(scheme.api_key_env().and_then(|var| std::env::var(var).ok()));
    }
    options
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn base(url: &str) -> String {
        parse_backend_url(url).unwrap().base_url
    }

    #[test]
    fn defaults_per_scheme() {
        assert_eq!(base("vllm://gpu1"), "http://gpu1:8000");
        assert_eq!(base("vllm://gpu1:9000"), "http://gpu1:9000");
        assert_eq!(base("vllm+https://gpu1"), "https://gpu1");
        assert_eq!(base("sglang://h"), "http://h:30000");
        assert_eq!(base("dynamo://h"), "http://h:8000");
        assert_eq!(base("llamacpp://"), "http://localhost:8080");
        assert_eq!(base("ollama://"), "http://localhost:11434");
        assert_eq!(base("openai://"), "https://api.openai.com/v1");
        assert_eq!(base("anthropic://"), "https://api.anthropic.com");
        assert_eq!(base("bedrock://us-east-1"), "https://bedrock-runtime.us-east-1.amazonaws.com");
        assert_eq!(base("http://10.0.0.1:8000/v1/"), "http://10.0.0.1:8000/v1");
        assert_eq!(base("vllm://[::1]"), "http://[::1]:8000");
        assert_eq!(base("vllm://[::1]:7000"), "http://[::1]:7000");
    }

    #[test]
    fn sim_query_is_left_to_the_caller() {
        let p = parse_backend_url("sim://?profile=h100-qwen2.5-7b&seed=3").unwrap();
        assert_eq!(p.scheme, Scheme::Sim);
        assert_eq!(p.base_url, "");
        assert_eq!(p.query_value("seed"), Some("3"));
        assert_eq!(base("sim://127.0.0.1:4000"), "http://127.0.0.1:4000");
    }

    #[test]
    fn bad_urls_are_named() {
        let err = parse_backend_url("gopher://x").unwrap_err();
        assert!(err.to_string().contains("gopher"));
        assert!(parse_backend_url("localhost:8000").is_err());
        assert!(parse_backend_url("bedrock://US EAST").is_err());
        let err = parse_backend_url("vllm://user:pw@host").unwrap_err();
        assert!(!err.to_string().contains("pw"));
        let err = connect("vllm://h?bogus=1", &BackendOptions::default()).err().unwrap();
        assert!(err.to_string().contains("bogus"));
        assert!(matches!(connect("anthropic://", &BackendOptions::default()), Err(BackendError::Config(_))));
    }

    #[test]
    fn keys_come_from_the_scheme_variable_only() {
        // Only this test touches these two variables.
        std::env::set_var("DYNAMO_API_KEY", "dyn-key");
        std::env::set_var("SGLANG_API_KEY", "");
        let key =
            |options: &BackendOptions, scheme| with_env_key(scheme, options).api_key.map(|k| k.expose().to_owned());
        assert_eq!(key(&BackendOptions::default(), Scheme::Dynamo).as_deref(), Some("dyn-key"));
        assert_eq!(with_env_key(Scheme::Sglang, &BackendOptions::default()).api_key, None);
        let given = BackendOptions { api_key: Some("given".into()), ..BackendOptions::default() };
        assert_eq!(key(&given, Scheme::Dynamo).as_deref(), Some("given"));
        assert_eq!(with_env_key(Scheme::Http, &BackendOptions::default()).api_key, None);
    }

    #[test]
    fn hosted_protocols_over_plain_http_and_base_url_variables() {
        let none = |_: &str| None;
        let base_with = |url: &str, env: &dyn Fn(&str) -> Option<String>| parse_backend_url_with(url, env).unwrap();
        assert_eq!(base_with("anthropic+http://127.0.0.1:4000", &none).base_url, "http://127.0.0.1:4000");
        assert_eq!(base_with("anthropic+http://127.0.0.1:4000", &none).scheme, Scheme::Anthropic);
        assert_eq!(base_with("openai+http://h:8000/v1", &none).base_url, "http://h:8000/v1");
        assert_eq!(base_with("openai+https://gw.example/v1", &none).base_url, "https://gw.example/v1");
        assert_eq!(base_with("vllm+http://gpu1", &none).base_url, "http://gpu1:8000");
        let env = |name: &str| match name {
            "OPENAI_BASE_URL" => Some("http://127.0.0.1:9000/v1/".to_owned()),
            "ANTHROPIC_BASE_URL" => Some("http://127.0.0.1:9001".to_owned()),
            _ => None,
        };
        assert_eq!(base_with("openai://", &env).base_url, "http://127.0.0.1:9000/v1");
        assert_eq!(base_with("anthropic://", &env).base_url, "http://127.0.0.1:9001");
        // A host in the URL wins over the variable.
        assert_eq!(base_with("openai://api.example/v1", &env).base_url, "https://api.example/v1");
        for bad in ["ftp://x", "http://u:k3y-in-env@h/v1", "http://h/v1?key=k3y-in-env", "not a url"] {
            let env = |name: &str| (name == "OPENAI_BASE_URL").then(|| bad.to_owned());
            let err = parse_backend_url_with("openai://", &env).unwrap_err().to_string();
            assert!(err.contains("OPENAI_BASE_URL") && !err.contains("k3y-in-env"), "{err}");
        }
        for bad in ["http+http://h", "bedrock+http://us-east-1", "anthropic+http://"] {
            assert!(parse_backend_url_with(bad, &none).is_err(), "{bad}");
        }
    }

    #[test]
    fn bedrock_endpoint_overrides_keep_the_region() {
        let env =
            |name: &str| (name == "AWS_ENDPOINT_URL_BEDROCK_RUNTIME").then(|| "http://127.0.0.1:4566/".to_owned());
        let p = parse_backend_url_with("bedrock://eu-west-1", &env).unwrap();
        assert_eq!((p.base_url.as_str(), p.region.as_deref()), ("http://127.0.0.1:4566", Some("eu-west-1")));
        let p = parse_backend_url_with("bedrock://us-east-1", &|_: &str| None).unwrap();
        assert_eq!(p.base_url, "https://bedrock-runtime.us-east-1.amazonaws.com");
        let env = |name: &str| (name == "AWS_REGION").then(|| "ap-south-1".to_owned());
        assert_eq!(parse_backend_url_with("bedrock://", &env).unwrap().region.as_deref(), Some("ap-south-1"));
    }

    #[test]
    fn errors_never_print_a_query_or_user_info() {
        for url in ["vllm://h?api_key=k3y-in-url", "gopher://h?token=k3y-in-url", "nope?k=k3y-in-url"] {
            let err = connect(url, &BackendOptions::default()).err().unwrap().to_string();
            assert!(!err.contains("k3y-in-url"), "{err}");
        }
        let err = connect("vllm://h?api_key=k3y-in-url", &BackendOptions::default()).err().unwrap().to_string();
        assert!(err.contains("\"api_key\"") && err.contains("credentials in a backend URL"), "{err}");
    }

    #[test]
    fn connect_picks_the_implementation() {
        let o = BackendOptions::default();
        assert!(connect("vllm://h", &o).unwrap().capabilities().batch_generation);
        assert!(connect("ollama://", &o).unwrap().name().contains("ollama"));
        assert!(!connect("ollama://?api=openai", &o).unwrap().capabilities().batch_generation);
        assert!(!format!("{:?}", BackendOptions { api_key: Some("k3y".into()), ..o }).contains("k3y"));
    }
}
