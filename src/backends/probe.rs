//! Before a run: every backend answers, and the model asked for is one it serves. One check for
//! the CLI and for Python (`Batch.check()`), sent with the key the model calls will send, so a
//! server behind a key answers it too.
//!
//! Which servers have their model list checked: those that route by the `model` field and list
//! every name they accept (vLLM, SGLang, Dynamo, Ollama, `OpenAI` and any `http(s)://` server).
//! Not checked, only reached: `llamacpp://` (llama-server answers whatever name is asked),
//! `anthropic://` (its list leaves out aliases such as `-latest`), `bedrock://` (its model list is
//! another service), and `sim://` (the simulator serves any name unless one is pinned).

use std::time::Duration;

use futures_util::future::join_all;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::url::{parse_backend_url, probe_headers, BackendOptions, Scheme};
use super::BackendError;
use crate::secret::display_url;

/// The most of a model list read; a longer answer is taken as "up, list unknown".
const MAX_LIST_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// One message per backend that did not answer, joined.
    #[error("{}", .0.join("; "))]
    Unreachable(Vec<String>),
    #[error("backend {backend} refused the API key: GET {url} answered HTTP {status}")]
    Refused { backend: String, url: String, status: u16 },
    #[error("model {model:?} is not served: {}", describe_served(.served))]
    ModelNotServed { model: String, served: Vec<(String, Vec<String>)> },
    #[error(transparent)]
    Config(#[from] BackendError),
}

fn describe_served(served: &[(String, Vec<String>)]) -> String {
    served
        .iter()
        .map(|(backend, models)| {
            if models.is_empty() {
                format!("{backend} lists no model")
            } else {
                format!("{backend} serves {}", models.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listing {
    /// `{"data": [{"id": ...}]}`
    OpenAi,
    /// Ollama's `/api/tags`: `{"models": [{"name": ...}]}`; `name` carries a tag (`:latest`).
    Ollama,
    /// Any answer means "up"; the body is not read.
    None,
}

struct Target {
    shown: String,
    /// `request_url` as it may be printed.
    url: String,
    request_url: String,
    listing: Listing,
    headers: HeaderMap,
}

fn target(address: &str, options: &BackendOptions) -> Result<Option<Target>, BackendError> {
    let parsed = parse_backend_url(address)?;
    if parsed.scheme == Scheme::Sim && parsed.base_url.is_empty() {
        // Started in this process for the run: nothing to reach yet.
        return Ok(None);
    }
    // What connecting would refuse (unknown URL options, an unreadable AWS credentials file) is
    // said first, as the run would say it; connecting sends no request.
    super::url::connect(address, options)?;
    let root = parsed.base_url.trim_end_matches('/');
    let api = if root.split_once("://").is_some_and(|(_, rest)| rest.contains('/')) {
        root.to_owned()
    } else {
        format!("{root}/v1")
    };
    let (url, listing) = match parsed.scheme {
        Scheme::Ollama if parsed.query_value("api") == Some("openai") => (format!("{api}/models"), Listing::OpenAi),
        Scheme::Ollama => (format!("{root}/api/tags"), Listing::Ollama),
        Scheme::OpenAi | Scheme::Http | Scheme::Vllm | Scheme::Sglang | Scheme::Dynamo => {
            (format!("{api}/models"), Listing::OpenAi)
        }
        Scheme::LlamaCpp | Scheme::Sim => (format!("{api}/models"), Listing::None),
        Scheme::Anthropic => (format!("{root}/v1/models"), Listing::None),
        Scheme::Bedrock => (format!("{root}/"), Listing::None),
    };
    let mut headers = probe_headers(parsed.scheme, options)?;
    if parsed.scheme == Scheme::Anthropic {
        headers.insert(HeaderName::from_static("anthropic-version"), HeaderValue::from_static("2023-06-01"));
    }
    Ok(Some(Target { shown: display_url(address), url: display_url(&url), listing, headers, request_url: url }))
}

/// What one backend said: unreachable (why), refused the key, or up with the models it lists
/// (`None` when it lists none we can read).
enum Answer {
    Down(String),
    Refused(u16),
    Up(Option<Vec<String>>),
}

async fn ask(client: &reqwest::Client, target: &Target) -> Answer {
    let response = match client.get(&target.request_url).headers(target.headers.clone()).send().await {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return Answer::Down("no answer in time".into()),
        Err(e) => return Answer::Down(reason(&e)),
    };
    let status = response.status();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return Answer::Refused(status.as_u16());
    }
    if target.listing == Listing::None || !status.is_success() {
        return Answer::Up(None);
    }
    let mut response = response;
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) if body.len() + chunk.len() <= MAX_LIST_BYTES => body.extend_from_slice(&chunk),
            Ok(None) => break,
            Ok(Some(_)) | Err(_) => return Answer::Up(None),
        }
    }
    Answer::Up(parse_listing(target.listing, &body))
}

/// The innermost cause of a request error (reqwest wraps hyper wraps the OS error).
fn reason(error: &reqwest::Error) -> String {
    let mut source: &dyn std::error::Error = error;
    while let Some(inner) = source.source() {
        source = inner;
    }
    source.to_string()
}

fn parse_listing(listing: Listing, body: &[u8]) -> Option<Vec<String>> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    if value.get("serves_any_model") == Some(&serde_json::Value::Bool(true)) {
        // An unpinned simulator (`batchagent sim serve` without --model) answers any name.
        return None;
    }
    let (array, field) = match listing {
        Listing::OpenAi => (value.get("data")?.as_array()?, "id"),
        Listing::Ollama => (value.get("models")?.as_array()?, "name"),
        Listing::None => return None,
    };
    Some(array.iter().filter_map(|m| m.get(field)?.as_str().map(str::to_owned)).collect())
}

fn lists(listing: Listing, models: &[String], model: &str) -> bool {
    models.iter().any(|m| m == model || (listing == Listing::Ollama && m.strip_suffix(":latest") == Some(model)))
}

/// Checks every backend at once: each must answer within `timeout` (any HTTP status but 401/403
/// will do), and when `model` is given, at least one backend that lists its models must list it.
pub async fn check(
    urls: &[String],
    options: &BackendOptions,
    model: Option<&str>,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let targets = urls.iter().map(|u| target(u, options)).collect::<Result<Vec<_>, _>>()?;
    let targets: Vec<Target> = targets.into_iter().flatten().collect();
    if targets.is_empty() {
        return Ok(());
    }
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| BackendError::Config(format!("HTTP client: {e}")))?;
    let answers = join_all(targets.iter().map(|t| ask(&client, t))).await;
    let mut down = Vec::new();
    let mut listed = Vec::new();
    for (target, answer) in targets.iter().zip(answers) {
        match answer {
            Answer::Down(why) => {
                down.push(format!("backend {} is unreachable: GET {}: {why}", target.shown, target.url));
            }
            Answer::Refused(status) => {
                return Err(ProbeError::Refused { backend: target.shown.clone(), url: target.url.clone(), status });
            }
            Answer::Up(Some(models)) => listed.push((target, models)),
            Answer::Up(None) => {}
        }
    }
    if !down.is_empty() {
        return Err(ProbeError::Unreachable(down));
    }
    if let Some(model) = model {
        if !listed.is_empty() && !listed.iter().any(|(t, models)| lists(t.listing, models, model)) {
            return Err(ProbeError::ModelNotServed {
                model: model.to_owned(),
                served: listed.into_iter().map(|(t, models)| (t.shown.clone(), models)).collect(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::arithmetic_side_effects)]
    use super::*;

    #[test]
    fn probe_urls_per_scheme() {
        let o = BackendOptions { api_key: Some(crate::secret::Secret::new("k")), ..BackendOptions::default() };
        let url = |a: &str| target(a, &o).unwrap().map(|t| (t.url, t.listing));
        assert_eq!(url("vllm://gpu1"), Some(("http://gpu1:8000/v1/models".into(), Listing::OpenAi)));
        assert_eq!(url("http://h:9/v1"), Some(("http://h:9/v1/models".into(), Listing::OpenAi)));
        assert_eq!(url("ollama://"), Some(("http://localhost:11434/api/tags".into(), Listing::Ollama)));
        assert_eq!(url("ollama://h?api=openai"), Some(("http://h:11434/v1/models".into(), Listing::OpenAi)));
        assert_eq!(url("llamacpp://h"), Some(("http://h:8080/v1/models".into(), Listing::None)));
        assert_eq!(url("anthropic://"), Some(("https://api.anthropic.com/v1/models".into(), Listing::None)));
        assert_eq!(url("sim://?time_scale=0"), None);
    }

    #[test]
    fn an_unpinned_simulator_lists_no_name_to_check() {
        let unpinned = br#"{"object":"list","data":[{"id":"sim-model"}],"serves_any_model":true}"#;
        assert_eq!(parse_listing(Listing::OpenAi, unpinned), None);
        let pinned = br#"{"object":"list","data":[{"id":"sim-model"}]}"#;
        assert_eq!(parse_listing(Listing::OpenAi, pinned), Some(vec!["sim-model".to_owned()]));
    }

    #[test]
    fn ollama_names_match_without_their_tag() {
        let models = vec!["mistral:latest".to_owned(), "qwen2.5:7b".to_owned()];
        assert!(lists(Listing::Ollama, &models, "mistral"));
        assert!(lists(Listing::Ollama, &models, "qwen2.5:7b"));
        assert!(!lists(Listing::Ollama, &models, "qwen2.5"));
        assert!(!lists(Listing::OpenAi, &models, "mistral"));
    }

    #[test]
    fn the_message_lists_what_is_served() {
        let e = ProbeError::ModelNotServed {
            model: "qwen".into(),
            served: vec![("vllm://a:1".into(), vec!["llama".into(), "mistral".into()])],
        };
        assert_eq!(e.to_string(), "model \"qwen\" is not served: vllm://a:1 serves llama, mistral");
    }

    #[test]
    fn the_key_is_sent_and_never_shown() {
        use reqwest::header::AUTHORIZATION;
        let o = BackendOptions { api_key: Some(crate::secret::Secret::new("s3cret")), ..BackendOptions::default() };
        let t = target("vllm://h", &o).unwrap().unwrap();
        assert_eq!(t.headers[AUTHORIZATION], "Bearer s3cret");
        assert!(t.headers[AUTHORIZATION].is_sensitive());
        assert_eq!(t.shown, "vllm://h");
        let t = target("anthropic://", &o).unwrap().unwrap();
        assert_eq!(t.headers["x-api-key"], "s3cret");
    }
}
