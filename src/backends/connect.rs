//! From the backend URLs a user gives to one connected [`Backend`]: `sim://` starts an embedded
//! simulator on a loopback port first; several URLs make a [`Fleet`].

use std::sync::Arc;

use super::fleet::{Fleet, FleetOptions, Member};
use super::metrics::MetricsSource;
use super::url::{self, parse_backend_url, probe_headers, BackendOptions, Scheme};
use super::{Backend, BackendError};
use crate::sim::{SimConfig, SimServer};

pub type ConnectOptions = BackendOptions;

/// A connected backend and the simulators started for it, which live as long as this value.
pub struct Connected {
    pub backend: Arc<dyn Backend>,
    pub sims: Vec<SimServer>,
    /// Prometheus `/metrics` of the endpoints that have one (vLLM, SGLang, Dynamo, sim).
    pub metrics_urls: Vec<MetricsSource>,
    /// The URL each endpoint is reached at (an embedded simulator's own loopback address).
    pub addresses: Vec<String>,
}

pub async fn connect(urls: &[String], options: &ConnectOptions) -> Result<Connected, BackendError> {
    connect_fleet(urls, options, FleetOptions::default()).await
}

pub async fn connect_fleet(
    urls: &[String],
    options: &ConnectOptions,
    fleet: FleetOptions,
) -> Result<Connected, BackendError> {
    match urls {
        [] => Err(BackendError::Config("no backend URL given".into())),
        [one] => {
            let (backend, sim, address) = connect_one(one, options).await?;
            Ok(Connected {
                backend,
                sims: sim.into_iter().collect(),
                metrics_urls: metrics_url(&address, options)?.into_iter().collect(),
                addresses: vec![address],
            })
        }
        many => {
            let mut members = Vec::with_capacity(many.len());
            let mut sims = Vec::new();
            let mut per_member = Vec::with_capacity(many.len());
            let mut addresses = Vec::with_capacity(many.len());
            for target in many {
                let (backend, sim, address) = connect_one(target, options).await?;
                sims.extend(sim);
                per_member.push(metrics_url(&address, options)?);
                members.push(member(backend, &address, options)?);
                addresses.push(address);
            }
            let metrics_urls = per_member.iter().flatten().cloned().collect();
            let mut fleet = Fleet::new(members, fleet).await?;
            fleet.watch_metrics(per_member);
            Ok(Connected { backend: Arc::new(fleet), sims, metrics_urls, addresses })
        }
    }
}

/// One backend, the simulator started for it, and the URL it is reached at.
async fn connect_one(
    target: &str,
    options: &ConnectOptions,
) -> Result<(Arc<dyn Backend>, Option<SimServer>, String), BackendError> {
    if is_embedded_sim(target) {
        let mut config = SimConfig::from_url(target).map_err(|e| BackendError::Config(e.to_string()))?;
        config.host = "127.0.0.1".into();
        config.port = 0;
        let server = SimServer::start(config).await.map_err(|e| BackendError::Config(e.to_string()))?;
        let address = format!("sim://{}", server.url().trim_start_matches("http://"));
        let backend = url::connect(&address, options)?;
        return Ok((backend, Some(server), address));
    }
    Ok((url::connect(target, options)?, None, target.to_owned()))
}

/// Where a fleet checks that an endpoint is up, and where it reads the models it serves.
fn member(backend: Arc<dyn Backend>, address: &str, options: &ConnectOptions) -> Result<Member, BackendError> {
    let parsed = parse_backend_url(address)?;
    let root = parsed.base_url.trim_end_matches('/');
    let api = if root.split_once("://").is_some_and(|(_, rest)| rest.contains('/')) {
        root.to_owned()
    } else {
        format!("{root}/v1")
    };
    let (health_url, models_url) = match parsed.scheme {
        Scheme::Ollama if parsed.query_value("api") != Some("openai") => (format!("{root}/api/tags"), None),
        Scheme::Ollama => (format!("{root}/api/tags"), Some(format!("{api}/models"))),
        Scheme::OpenAi | Scheme::Http => (format!("{api}/models"), Some(format!("{api}/models"))),
        Scheme::Anthropic | Scheme::Bedrock => {
            return Err(BackendError::Config(format!(
                "{}: hosted APIs are not fleet members; give one URL per run",
                crate::secret::display_url(address)
            )));
        }
        Scheme::Vllm | Scheme::Sglang | Scheme::Dynamo | Scheme::LlamaCpp | Scheme::Sim => {
            (format!("{root}/health"), Some(format!("{api}/models")))
        }
    };
    Ok(Member { backend, health_url, models_url, probe_headers: probe_headers(parsed.scheme, options)? })
}

fn metrics_url(address: &str, options: &ConnectOptions) -> Result<Option<MetricsSource>, BackendError> {
    let parsed = parse_backend_url(address)?;
    if !matches!(parsed.scheme, Scheme::Vllm | Scheme::Sglang | Scheme::Dynamo | Scheme::Sim) {
        return Ok(None);
    }
    Ok(Some(MetricsSource {
        url: format!("{}/metrics", parsed.base_url.trim_end_matches('/')),
        headers: probe_headers(parsed.scheme, options)?,
    }))
}

/// `sim://` or `sim://?options` (no host) asks for an embedded simulator.
pub fn is_embedded_sim(target: &str) -> bool {
    target.strip_prefix("sim://").is_some_and(|rest| rest.is_empty() || rest.starts_with('?') || rest.starts_with('/'))
}
