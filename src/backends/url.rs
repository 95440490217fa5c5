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

/// How to reach a backend. `api_key: None` means "from the environment, if the scheme has a
/// variable for it" (see [`Scheme::api_key_env`]).
#[derive(Clone)]
pub struct BackendOptions {
    pub api_key: Option<String>,
    /// Whole model call, body included.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Send NVIDIA Dynamo `nvext.agent_hints` when a request carries hints.
    pub agent_hints: bool,
    pub extra_headers: Vec<(String, String)>,
}

impl Default for BackendOptions {
    fn default() -> Self {
        Self {
            api_key: None,
            request_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(10),
            agent_hints: false,
            extra_headers: Vec::new(),
        }
    }
}

impl fmt::Debug for BackendOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendOptions")
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("agent_hints", &self.agent_hints)
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
}

impl ParsedUrl {
    pub fn query_value(&self, key: &str) -> Option<&str> {
        self.query.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Parses a backend URL. Plain `http` is used for self-hosted engines unless the scheme carries
/// `+https` (`vllm+https://host`), in which case the scheme's default port is not applied (443).
pub fn parse_backend_url(url: &str) -> Result<ParsedUrl, BackendError> {
    let url = url.trim();
    let (scheme_text, rest) = url.split_once("://").ok_or_else(|| {
        BackendError::Config(format!("backend URL {url:?} has no scheme (expected e.g. vllm://host:port)"))
    })?;
    let scheme_text = scheme_text.to_ascii_lowercase();
    let (name, tls) = match scheme_text.strip_suffix("+https") {
        Some(name) => (name, true),
        None => (scheme_text.as_str(), scheme_text == "https"),
    };
    let scheme = Scheme::from_name(name).ok_or_else(|| {
        BackendError::Config(format!(
            "unknown backend scheme {scheme_text:?} in {url:?} (expected openai, vllm, sglang, dynamo, ollama, \
             llamacpp, anthropic, bedrock, sim, http or https)"
        ))
    })?;
    let (rest, query_text) = rest.split_once('?').unwrap_or((rest, ""));
    let query = parse_query(query_text, url)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err(BackendError::Config(
            "credentials in a backend URL are not accepted; pass api_key or set the environment variable".into(),
        ));
    }
    let base_url = match scheme {
        Scheme::Sim if authority.is_empty() => String::new(),
        Scheme::Bedrock => bedrock_endpoint(authority)?,
        Scheme::OpenAi if authority.is_empty() => "https://api.openai.com/v1".to_owned(),
        Scheme::Anthropic if authority.is_empty() => "https://api.anthropic.com".to_owned(),
        Scheme::Http if authority.is_empty() => {
            return Err(BackendError::Config(format!("backend URL {url:?} has no host")));
        }
        _ => {
            let hosted = matches!(scheme, Scheme::OpenAi | Scheme::Anthropic);
            let host = if authority.is_empty() { "localhost" } else { authority };
            let has_port = host_has_port(host);
            let port = match scheme.default_port() {
                Some(port) if !has_port && !tls => format!(":{port}"),
                _ => String::new(),
            };
            let http = if tls || hosted { "https" } else { "http" };
            format!("{http}://{host}{port}{path}")
        }
    };
    if !base_url.is_empty() {
        reqwest::Url::parse(&base_url)
            .map_err(|e| BackendError::Config(format!("backend URL {url:?} is not a valid address: {e}")))?;
    }
    Ok(ParsedUrl { scheme, base_url, query })
}

fn host_has_port(host: &str) -> bool {
    // "[::1]:8000" has a port, "[::1]" has not; "host:8000" has one.
    match host.rfind(']') {
        Some(close) => host[close..].contains(':'),
        None => host.contains(':'),
    }
}

fn bedrock_endpoint(region: &str) -> Result<String, BackendError> {
    let region = if region.is_empty() {
        std::env::var("AWS_REGION").or_else(|_| std::env::var("AWS_DEFAULT_REGION")).map_err(|_| {
            BackendError::Config("bedrock:// needs a region (bedrock://us-east-1) or AWS_REGION set".into())
        })?
    } else {
        region.to_owned()
    };
    if region.is_empty() || !region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err(BackendError::Config(format!("bedrock region {region:?} is not a region name like us-east-1")));
    }
    Ok(format!("https://bedrock-runtime.{region}.amazonaws.com"))
}

fn parse_query(text: &str, url: &str) -> Result<Vec<(String, String)>, BackendError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    // Let the URL parser do the percent-decoding.
    let parsed = reqwest::Url::parse(&format!("http://q/?{text}"))
        .map_err(|e| BackendError::Config(format!("query of backend URL {url:?} is not valid: {e}")))?;
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
        _ => &[],
    };
    if parsed.scheme != Scheme::Sim {
        if let Some((key, _)) = parsed.query.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            return Err(BackendError::Config(format!("unknown option {key:?} in backend URL {url:?}")));
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
            // base_url is https://bedrock-runtime.{region}.amazonaws.com
            let region = parsed
                .base_url
                .trim_start_matches("https://bedrock-runtime.")
                .trim_end_matches(".amazonaws.com")
                .to_owned();
            let profile = parsed.query_value("profile");
            return Ok(Arc::new(BedrockBackend::from_environment(Some(&region), profile, (&options).into())?));
        }
    };
    Ok(Arc::new(OpenAiBackend::new(flavour, &parsed.base_url, &options)?))
}

fn with_env_key(scheme: Scheme, options: &BackendOptions) -> BackendOptions {
    let mut options = options.clone();
    if options.api_key.is_none() {
        options.api_key = scheme.api_key_env().and_then(|var| std::env::var(var).ok()).filter(|k| !k.is_empty());
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
        assert_eq!(with_env_key(Scheme::Dynamo, &BackendOptions::default()).api_key.as_deref(), Some("dyn-key"));
        assert_eq!(with_env_key(Scheme::Sglang, &BackendOptions::default()).api_key, None);
        let given = BackendOptions { api_key: Some("given".into()), ..BackendOptions::default() };
        assert_eq!(with_env_key(Scheme::Dynamo, &given).api_key.as_deref(), Some("given"));
        assert_eq!(with_env_key(Scheme::Http, &BackendOptions::default()).api_key, None);
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
