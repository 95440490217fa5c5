//! Several endpoints behind one [`Backend`]: least-outstanding-requests routing with prefix
//! affinity, routing by served model, health checks, failover of in-flight calls, and an adaptive
//! concurrency limit per endpoint.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::http::limited_body;
use super::{Backend, BackendError, Capabilities, ChatRequest, ChatResponse, StreamEvent};
use crate::conversation::TimeoutKind;
use crate::limits::AdaptiveLimit;
use crate::prefix::prefix_keys;

/// One member of a fleet as `connect` builds it.
pub struct Member {
    pub backend: Arc<dyn Backend>,
    /// GET this URL: 2xx means the endpoint is up.
    pub health_url: String,
    /// GET this URL for the OpenAI-style model list (`{"data": [{"id": ...}]}`), if the server has one.
    pub models_url: Option<String>,
    /// Sent with both GETs: the key the model calls carry (a 401 would read as "down" and "no models").
    pub probe_headers: reqwest::header::HeaderMap,
}

/// How a fleet chooses the endpoint of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// Least outstanding requests, but jobs sharing a prefix go where it is cached.
    #[default]
    PrefixAffinity,
    LeastOutstanding,
    /// Each call to the next endpoint in turn (the baseline that affinity is measured against).
    RoundRobin,
}

#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub routing: Routing,
    /// Affinity yields to the least-loaded endpoint once the preferred one has this many more
    /// calls outstanding: a warm cache is not worth an unbounded queue.
    pub affinity_slack: usize,
    pub keep_session_headers: bool,
    pub probe_interval: Duration,
    /// Upper bound of one endpoint's adaptive concurrency limit.
    pub max_per_endpoint: usize,
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            routing: Routing::default(),
            affinity_slack: 8,
            keep_session_headers: false,
            probe_interval: Duration::from_secs(1),
            max_per_endpoint: 1024,
        }
    }
}

struct Endpoint {
    backend: Arc<dyn Backend>,
    health_url: String,
    probe_headers: reqwest::header::HeaderMap,
    outstanding: AtomicUsize,
    up: AtomicBool,
    limit: AdaptiveLimit,
    models: Mutex<Vec<String>>,
    served: AtomicU64,
    failovers: AtomicU64,
}

/// Per-endpoint figures for reports.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct EndpointStats {
    pub name: String,
    pub up: bool,
    pub outstanding: usize,
    pub served: u64,
    pub failovers: u64,
    pub limit: usize,
}

pub struct Fleet {
    name: String,
    endpoints: Arc<Vec<Endpoint>>,
    affinity: Mutex<HashMap<u64, usize>>,
    turn: AtomicUsize,
    options: FleetOptions,
    capabilities: Capabilities,
    prober: JoinHandle<()>,
}

/// Largest `/v1/models` answer read (a list of model names).
const MAX_MODEL_LIST: usize = 4 * 1024 * 1024;

/// Prefix keys remembered; beyond this the map is cleared (new arrivals re-learn their endpoint).
const MAX_AFFINITY_KEYS: usize = 100_000;

impl Fleet {
    /// Builds the fleet, reads each endpoint's model list (best effort) and starts the prober on
    /// the current tokio runtime.
    pub async fn new(members: Vec<Member>, options: FleetOptions) -> Result<Self, BackendError> {
        if members.is_empty() {
            return Err(BackendError::Config("a fleet needs at least one endpoint".into()));
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| BackendError::Config(format!("HTTP client: {e}")))?;
        let mut endpoints = Vec::with_capacity(members.len());
        let mut capabilities = members.first().map(|m| m.backend.capabilities()).unwrap_or_default();
        for member in members {
            let caps = member.backend.capabilities();
            capabilities = intersect(capabilities, caps);
            let models = match &member.models_url {
                Some(url) => fetch_models(&client, url, &member.probe_headers).await.unwrap_or_default(),
                None => Vec::new(),
            };
            endpoints.push(Endpoint {
                backend: member.backend,
                health_url: member.health_url,
                probe_headers: member.probe_headers,
                outstanding: AtomicUsize::new(0),
                up: AtomicBool::new(true),
                limit: AdaptiveLimit::new(options.max_per_endpoint, 1, options.max_per_endpoint),
                models: Mutex::new(models),
                served: AtomicU64::new(0),
                failovers: AtomicU64::new(0),
            });
        }
        let name = format!("fleet[{}]", endpoints.iter().map(|e| e.backend.name()).collect::<Vec<_>>().join(", "));
        let endpoints = Arc::new(endpoints);
        let prober = tokio::spawn(probe_loop(endpoints.clone(), client, options.probe_interval));
        Ok(Self {
            name,
            endpoints,
            affinity: Mutex::new(HashMap::new()),
            turn: AtomicUsize::new(0),
            options,
            capabilities,
            prober,
        })
    }

    pub fn endpoint_stats(&self) -> Vec<EndpointStats> {
        self.endpoints
            .iter()
            .map(|e| EndpointStats {
                name: e.backend.name().to_owned(),
                up: e.up.load(Relaxed),
                outstanding: e.outstanding.load(Relaxed),
                served: e.served.load(Relaxed),
                failovers: e.failovers.load(Relaxed),
                limit: e.limit.current(),
            })
            .collect()
    }

    /// Chooses an endpoint: among the live ones serving `model` that were not tried yet, the one
    /// holding the prefix unless it is overloaded, else the least outstanding (relative to its limit).
    fn pick(&self, model: &str, keys: &[(u64, usize)], tried: &[usize]) -> Option<usize> {
        let serves = |e: &Endpoint| e.models.lock().map_or(true, |m| m.is_empty() || m.iter().any(|x| x == model));
        let any_serves = self.endpoints.iter().any(|e| e.models.lock().is_ok_and(|m| m.iter().any(|x| x == model)));
        let candidates: Vec<usize> = (0..self.endpoints.len())
            .filter(|i| !tried.contains(i))
            .filter(|&i| self.endpoints.get(i).is_some_and(|e| e.up.load(Relaxed)))
            .filter(|&i| !any_serves || self.endpoints.get(i).is_some_and(serves))
            .collect();
        let load = |i: usize| {
            self.endpoints
                .get(i)
                .map_or(f64::INFINITY, |e| e.outstanding.load(Relaxed) as f64 / e.limit.current().max(1) as f64)
        };
        if candidates.is_empty() {
            return None;
        }
        if self.options.routing == Routing::RoundRobin {
            let turn = self.turn.fetch_add(1, Relaxed);
            return candidates.get(turn.checked_rem(candidates.len()).unwrap_or(0)).copied();
        }
        let least = candidates.iter().copied().min_by(|&a, &b| load(a).total_cmp(&load(b)))?;
        if keys.is_empty() || self.options.routing != Routing::PrefixAffinity {
            return Some(least);
        }
        let mut affinity = self.affinity.lock().ok()?;
        // The longest prefix already placed on a live candidate decides, unless most of this
        // request's shareable prefix is new (a new document behind a short shared system prompt):
        // then it goes where there is room, and its keys are learnt there.
        let longest = keys.last().map_or(0, |&(_, len)| len);
        let preferred = keys
            .iter()
            .rev()
            .find_map(|(k, len)| affinity.get(k).copied().filter(|i| candidates.contains(i)).map(|i| (i, *len)))
            .filter(|&(_, len)| 2 * len >= longest)
            .map(|(i, _)| i);
        let chosen = match preferred {
            Some(p) => {
                let outstanding = |i: usize| self.endpoints.get(i).map_or(0, |e| e.outstanding.load(Relaxed));
                let limit = self.endpoints.get(p).map_or(0, |e| e.limit.current());
                let overloaded = outstanding(p) >= limit
                    || outstanding(p) > outstanding(least).saturating_add(self.options.affinity_slack);
                if overloaded {
                    least
                } else {
                    p
                }
            }
            None => least,
        };
        if affinity.len() + keys.len() > MAX_AFFINITY_KEYS {
            affinity.clear();
        }
        for &(key, _) in keys {
            // A key keeps its endpoint while that one is live: a spill-over does not move a prefix.
            if !affinity.get(&key).is_some_and(|i| candidates.contains(i)) {
                affinity.insert(key, chosen);
            }
        }
        Some(chosen)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.prober.abort();
    }
}

/// Failures that say "this endpoint is gone", as opposed to "this request failed": the call can
/// move to another endpoint at once.
fn endpoint_failed(error: &BackendError) -> bool {
    matches!(error, BackendError::Connection(_))
}

/// A call that ran out of time: the endpoint is down for health (a frozen server accepts and never
/// answers), but the call's time is spent, so it ends here and its retry goes elsewhere.
fn endpoint_stalled(error: &BackendError) -> bool {
    matches!(error, BackendError::Timeout { which: TimeoutKind::Connect | TimeoutKind::Idle | TimeoutKind::Call, .. })
}

/// One call's place in an endpoint's outstanding count, given back on every exit path: a result,
/// an error, or the caller dropping the call (its own timeout, a cancelled run).
struct Outstanding<'a>(&'a AtomicUsize);

impl<'a> Outstanding<'a> {
    fn take(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Relaxed);
        Self(count)
    }
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Backend for Fleet {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }

    fn endpoint_stats(&self) -> Option<serde_json::Value> {
        serde_json::to_value(Fleet::endpoint_stats(self)).ok()
    }

    fn chat(
        &self,
        request: ChatRequest,
        events: Option<mpsc::UnboundedSender<StreamEvent>>,
    ) -> BoxFuture<'_, Result<ChatResponse, BackendError>> {
        Box::pin(async move {
            let keys = prefix_keys(&request.messages, &request.tools, self.options.keep_session_headers);
            let mut tried = Vec::new();
            let mut last_error = None;
            while let Some(i) = self.pick(&request.model, &keys, &tried) {
                let Some(endpoint) = self.endpoints.get(i) else { break };
                let outstanding = Outstanding::take(&endpoint.outstanding);
                let outcome = endpoint.backend.chat(request.clone(), events.clone()).await;
                drop(outstanding);
                match outcome {
                    Ok(response) => {
                        endpoint.served.fetch_add(1, Relaxed);
                        endpoint.limit.on_success();
                        return Ok(response);
                    }
                    Err(error) if endpoint_failed(&error) => {
                        // Out until the prober sees it answer again; the call moves on at once.
                        endpoint.up.store(false, Relaxed);
                        endpoint.failovers.fetch_add(1, Relaxed);
                        tried.push(i);
                        last_error = Some(error);
                    }
                    Err(error) if endpoint_stalled(&error) => {
                        endpoint.up.store(false, Relaxed);
                        return Err(error);
                    }
                    Err(error) => {
                        if error.is_throttle() {
                            endpoint.limit.on_throttle();
                        }
                        return Err(error);
                    }
                }
            }
            Err(last_error.unwrap_or_else(|| {
                BackendError::Connection(format!("no live endpoint serves model '{}'", request.model))
            }))
        })
    }
}

async fn probe_loop(endpoints: Arc<Vec<Endpoint>>, client: reqwest::Client, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        for endpoint in endpoints.iter().filter(|e| !e.up.load(Relaxed)) {
            if let Ok(response) = client.get(&endpoint.health_url).headers(endpoint.probe_headers.clone()).send().await
            {
                if response.status().is_success() {
                    endpoint.up.store(true, Relaxed);
                }
            }
        }
    }
}

async fn fetch_models(
    client: &reqwest::Client,
    url: &str,
    headers: &reqwest::header::HeaderMap,
) -> Option<Vec<String>> {
    let response = client.get(url).headers(headers.clone()).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let bytes = limited_body(response, MAX_MODEL_LIST, None).await.ok()?;
    let body: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let ids = body.get("data")?.as_array()?.iter().filter_map(|m| m.get("id")?.as_str().map(str::to_owned)).collect();
    Some(ids)
}

fn intersect(a: Capabilities, b: Capabilities) -> Capabilities {
    Capabilities {
        streaming: a.streaming && b.streaming,
        tools: a.tools && b.tools,
        json_schema: a.json_schema && b.json_schema,
        prompt_caching: a.prompt_caching && b.prompt_caching,
        metrics: a.metrics && b.metrics,
        agent_hints: a.agent_hints && b.agent_hints,
        batch_generation: a.batch_generation && b.batch_generation,
    }
}
