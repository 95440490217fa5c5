//! Several endpoints behind one [`Backend`]: least-outstanding-requests routing with prefix
//! affinity, routing by served model, health checks, failover of in-flight calls, and an adaptive
//! concurrency limit per endpoint.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::http::limited_body;
use super::metrics::{MetricsSource, MetricsWatcher};
use super::placement::{EndpointView, Placement};
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
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct EndpointStats {
    pub name: String,
    pub up: bool,
    pub outstanding: usize,
    pub served: u64,
    pub failovers: u64,
    pub limit: usize,
    /// Prefix groups placed on this endpoint, and their prefixes' estimated tokens.
    pub prefix_groups: usize,
    pub prefix_tokens: usize,
    /// Calls it took as a busy group's second endpoint.
    pub spilled_in: u64,
    /// From its `/metrics`, where it has one.
    pub kv_capacity_tokens: Option<f64>,
    pub prefix_hit_rate: Option<f64>,
    pub preemptions: Option<f64>,
}

pub struct Fleet {
    name: String,
    endpoints: Arc<Vec<Endpoint>>,
    placement: Mutex<Placement>,
    metrics: Vec<Option<MetricsWatcher>>,
    turn: AtomicUsize,
    options: FleetOptions,
    capabilities: Capabilities,
    prober: JoinHandle<()>,
}

/// Largest `/v1/models` answer read (a list of model names).
const MAX_MODEL_LIST: usize = 4 * 1024 * 1024;

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
        let placement = Mutex::new(Placement::new(endpoints.len(), options.affinity_slack));
        let endpoints = Arc::new(endpoints);
        let prober = tokio::spawn(probe_loop(endpoints.clone(), client, options.probe_interval));
        Ok(Self {
            name,
            endpoints,
            placement,
            metrics: Vec::new(),
            turn: AtomicUsize::new(0),
            options,
            capabilities,
            prober,
        })
    }

    pub fn endpoint_stats(&self) -> Vec<EndpointStats> {
        let placed = self.placement.lock().map(|p| p.stats()).unwrap_or_default();
        self.endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let place = placed.get(i).copied();
                let engine = self.metrics.get(i).and_then(Option::as_ref).and_then(MetricsWatcher::latest);
                EndpointStats {
                    name: e.backend.name().to_owned(),
                    up: e.up.load(Relaxed),
                    outstanding: e.outstanding.load(Relaxed),
                    served: e.served.load(Relaxed),
                    failovers: e.failovers.load(Relaxed),
                    limit: e.limit.current(),
                    prefix_groups: place.map_or(0, |p| p.groups),
                    prefix_tokens: place.map_or(0, |p| p.prefix_tokens),
                    spilled_in: place.map_or(0, |p| p.spilled_in),
                    kv_capacity_tokens: engine.as_ref().and_then(|m| m.kv_capacity_tokens),
                    prefix_hit_rate: engine.as_ref().and_then(|m| m.prefix_hit_rate),
                    preemptions: engine.as_ref().and_then(|m| m.preemptions),
                }
            })
            .collect()
    }

    /// Chooses an endpoint: among the live ones serving `model` that were not tried yet, the one
    /// its prefix group is placed on unless that one's queue is past the bound (see
    /// [`Placement`]), else the least outstanding (relative to its limit).
    fn pick(
        &self,
        model: &str,
        keys: &[(u64, usize)],
        conversation: Option<(u64, bool)>,
        tried: &[usize],
    ) -> Option<usize> {
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
        if self.options.routing != Routing::PrefixAffinity {
            return Some(least);
        }
        let views: Vec<EndpointView> = self
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| EndpointView {
                up: e.up.load(Relaxed),
                eligible: candidates.contains(&i),
                outstanding: e.outstanding.load(Relaxed),
                limit: e.limit.current(),
                kv_tokens: self.kv_tokens(i),
            })
            .collect();
        // The longest shared prefix names the group: a document behind a short common system
        // prompt is its own group.
        let group = keys.last().map(|&(key, bytes)| (key, bytes / BYTES_PER_TOKEN));
        self.placement.lock().ok()?.route(group, conversation, &views)
    }

    /// An endpoint's KV capacity from its `/metrics`, or an equal weight for all where unknown.
    fn kv_tokens(&self, i: usize) -> usize {
        self.metrics
            .get(i)
            .and_then(Option::as_ref)
            .and_then(MetricsWatcher::latest)
            .and_then(|m| m.kv_capacity_tokens)
            .filter(|&t| t >= 1.0)
            .map_or(UNKNOWN_KV_TOKENS, |t| t.min(1e12) as usize)
    }

    /// Reads each endpoint's `/metrics` (KV capacity for placement; hit rate and preemptions for
    /// the report), in the order of the members. Call on the runtime the fleet runs on.
    pub fn watch_metrics(&mut self, sources: Vec<Option<MetricsSource>>) {
        self.metrics =
            sources.into_iter().map(|s| s.map(|s| MetricsWatcher::start(s, Duration::from_millis(500)))).collect();
    }
}

/// Bytes per token, for sizing a prefix without a tokenizer.
const BYTES_PER_TOKEN: usize = 4;

/// KV capacity taken for an endpoint whose `/metrics` has not said: only ratios between endpoints
/// matter to placement, so equal endpoints stay equal.
const UNKNOWN_KV_TOKENS: usize = 65_536;

/// The conversation a request belongs to, from its id (`{job}-t{turn}-a{attempt}`), and whether it
/// is a later turn (the history is cached where the earlier turns went).
fn conversation(request_id: &str) -> Option<(u64, bool)> {
    let (job, rest) = request_id.rsplit_once("-t")?;
    let (turn, _attempt) = rest.split_once("-a")?;
    let turn: u32 = turn.parse().ok()?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in job.as_bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    Some((h, turn > 0))
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
            let conversation = conversation(&request.request_id);
            let mut tried = Vec::new();
            let mut last_error = None;
            while let Some(i) = self.pick(&request.model, &keys, conversation, &tried) {
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
