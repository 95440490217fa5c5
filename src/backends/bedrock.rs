//! AWS Bedrock Runtime, `Converse` and `ConverseStream`: JSON requests signed with `SigV4`; the
//! streamed answer is an AWS event stream (`application/vnd.amazon.eventstream`) whose messages
//! carry one JSON event each.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::BoxFuture;
use reqwest::header::{HeaderMap, ACCEPT, RETRY_AFTER};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::aws_credentials::{self, AwsCredentials, CredentialSource, CredentialsError, CredentialsProvider};
use super::call::{arguments_object, estimate, replay_events};
use super::http::{limited_body, parse_retry_after, redirect_error, BodyError};
use super::sigv4::{self, SignableRequest, SigningScope};
use super::url::BackendOptions;
use super::{Backend, BackendError, Capabilities, ChatRequest, ChatResponse, StreamEvent};
use crate::conversation::TimeoutKind;
use crate::conversation::{Message, Role, ToolCall, Usage};
use crate::limits::pacer::{HandLimits, Pacer, SharedBudgets};
use crate::limits::{stream_index, RateLimitHeaders, TooLarge, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_RESPONSE_BYTES};
use crate::stream::eventstream::{EventStreamDecoder, Message as EventMessage};

const SERVICE: &str = "bedrock";
const MAX_ERROR_MESSAGE: usize = 500;
const MAX_ERROR_BODY: usize = 64 * 1024;

/// How long every admission stops after a `ThrottlingException` that names no `Retry-After`
/// (Bedrock states no limits and usually no wait): the AWS SDKs' standard retry mode waits up to
/// one second before the first retry of a throttled call, and a pause shared by all calls keeps
/// the others from running into the same throttle meanwhile.
const THROTTLE_PAUSE: Duration = Duration::from_secs(1);

/// Model families whose Converse API takes `cachePoint` blocks (Bedrock user guide, "Prompt
/// caching"): Claude 3.7 Sonnet, Claude 3.5 Haiku, the Claude 4 family and Amazon Nova. Claude 3.5
/// Sonnet v2 is left out on purpose: caching there was a closed preview, and a `cachePoint` sent by an
/// account without it fails the whole request with a `ValidationException`.
const PROMPT_CACHING_MODELS: &[&str] = &[
    "anthropic.claude-3-7-sonnet",
    "anthropic.claude-3-5-haiku",
    "anthropic.claude-sonnet-4",
    "anthropic.claude-opus-4",
    "anthropic.claude-haiku-4",
    "amazon.nova-micro",
    "amazon.nova-lite",
    "amazon.nova-pro",
    "amazon.nova-premier",
];

/// Whether `model_id` (a base model id, or a cross-region inference profile id such as
/// `us.anthropic.claude-3-7-sonnet-20250219-v1:0`) is on the prompt-caching allow-list.
pub fn supports_prompt_caching(model_id: &str) -> bool {
    let base = match model_id.split_once('.') {
        Some(("us" | "eu" | "apac" | "jp" | "au" | "ca" | "us-gov" | "global", rest)) => rest,
        _ => model_id,
    };
    PROMPT_CACHING_MODELS.iter().any(|p| base.starts_with(p))
}

#[derive(Clone)]
pub struct BedrockOptions {
    /// Whole model call, body included.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of the answer (`idle_timeout`); `None`: no limit.
    pub idle_timeout: Option<Duration>,
    /// Most bytes of one answer (`max_response_bytes`).
    pub max_response_bytes: usize,
    /// `max_tokens` when the request gives none.
    pub default_max_tokens: u32,
    /// `None`: add `cachePoint`s for models on the allow-list; `Some(b)`: always / never.
    pub prompt_caching: Option<bool>,
    /// Requests and tokens per minute (`rpm=`, `tpm=`): Bedrock states no limits in its answers, so
    /// these and its throttling are all the pacer has to go by.
    pub rate_limits: HandLimits,
    /// Where the budget is kept when several processes share it (a fleet's Redis).
    pub budgets: Option<Arc<dyn SharedBudgets>>,
}

impl Default for BedrockOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            default_max_tokens: 4096,
            prompt_caching: None,
            rate_limits: HandLimits::default(),
            budgets: None,
        }
    }
}

impl fmt::Debug for BedrockOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BedrockOptions")
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("default_max_tokens", &self.default_max_tokens)
            .field("prompt_caching", &self.prompt_caching)
            .field("rate_limits", &self.rate_limits)
            .field("budgets", &if self.budgets.is_some() { "shared" } else { "local" })
            .finish()
    }
}

impl From<&BackendOptions> for BedrockOptions {
    /// The timeouts and limits; Bedrock takes no API key or extra headers (requests are signed).
    fn from(options: &BackendOptions) -> Self {
        Self {
            request_timeout: options.request_timeout,
            connect_timeout: options.connect_timeout,
            idle_timeout: options.idle_timeout,
            max_response_bytes: options.max_response_bytes,
            rate_limits: options.rate_limits,
            budgets: options.budgets.clone(),
            ..Self::default()
        }
    }
}

pub struct BedrockBackend {
    client: reqwest::Client,
    region: String,
    endpoint: String,
    /// `Host` as the client will send it (`host[:port]`), which the signature covers.
    host: String,
    credentials: Arc<CredentialsProvider>,
    options: BedrockOptions,
    name: String,
    /// Paces model calls by `rpm=` / `tpm=` and stops them all for a while after a throttle.
    pacer: Arc<Pacer>,
}

impl fmt::Debug for BedrockBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BedrockBackend")
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl BedrockBackend {
    /// `endpoint` overrides `https://bedrock-runtime.{region}.amazonaws.com` (VPC endpoints, tests).
    pub fn new(region: &str, credentials: AwsCredentials, endpoint: Option<&str>) -> Result<Self, BackendError> {
        Self::with_options(region, credentials, endpoint, BedrockOptions::default())
    }

    pub fn with_options(
        region: &str,
        credentials: AwsCredentials,
        endpoint: Option<&str>,
        options: BedrockOptions,
    ) -> Result<Self, BackendError> {
        let provider = CredentialsProvider::new(CredentialSource::Static(credentials)).map_err(credentials_error)?;
        Self::with_provider(region, Arc::new(provider), endpoint, options)
    }

    /// Signs every call with what `credentials` holds at that moment (refreshed before expiry).
    pub fn with_provider(
        region: &str,
        credentials: Arc<CredentialsProvider>,
        endpoint: Option<&str>,
        options: BedrockOptions,
    ) -> Result<Self, BackendError> {
        if region.is_empty() || !region.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(BackendError::Config(format!("invalid AWS region {region:?}")));
        }
        let endpoint = endpoint.map_or_else(
            || format!("https://bedrock-runtime.{region}.amazonaws.com"),
            |e| e.trim_end_matches('/').to_owned(),
        );
        let url = reqwest::Url::parse(&endpoint)
            .map_err(|e| BackendError::Config(format!("invalid Bedrock endpoint {endpoint:?}: {e}")))?;
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => return Err(BackendError::Config(format!("Bedrock endpoint {endpoint:?} has no host"))),
        };
        let client = reqwest::Client::builder()
            // A redirect would carry the signed headers to wherever it points.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(options.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| BackendError::Config(format!("cannot build the HTTP client: {e}")))?;
        // The account's quotas are per region: the budget is the endpoint's, whatever the key.
        let pacer = Arc::new(Pacer::for_endpoint(options.budgets.as_deref(), &endpoint, None, options.rate_limits));
        Ok(Self {
            client,
            name: format!("bedrock://{region}"),
            region: region.to_owned(),
            endpoint,
            host,
            credentials,
            pacer,
            options,
        })
    }

    /// Credentials (and the region, if `region` is `None`) from the environment and the shared
    /// AWS files; see [`aws_credentials::load`].
    pub fn from_environment(
        region: Option<&str>,
        profile: Option<&str>,
        endpoint: Option<&str>,
        options: BedrockOptions,
    ) -> Result<Self, BackendError> {
        let found = aws_credentials::load(profile).map_err(|e| BackendError::Config(e.to_string()))?;
        let provider = CredentialsProvider::new(found.source).map_err(credentials_error)?;
        let region = region.map(str::to_owned).or(found.region).ok_or_else(|| {
            BackendError::Config("no AWS region: use bedrock://<region>, or set AWS_REGION".to_owned())
        })?;
        Self::with_provider(&region, Arc::new(provider), endpoint, options)
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// The pacer of this backend's model calls (its limits and how long it held calls back).
    pub fn pacer(&self) -> &Arc<Pacer> {
        &self.pacer
    }

    /// One model call, admitted by the pacer; a throttle (an HTTP 429 or a `throttlingException`
    /// in the stream) stops further admissions for its `Retry-After`, or [`THROTTLE_PAUSE`].
    async fn paced(
        &self,
        request: ChatRequest,
        events: Option<mpsc::UnboundedSender<StreamEvent>>,
    ) -> Result<ChatResponse, BackendError> {
        let ticket = self.pacer.admit(estimate(&request, Some(self.options.default_max_tokens))).await;
        let result = self.call(request, events).await;
        let retry_after = match &result {
            Err(BackendError::RateLimited { retry_after, .. }) => Some(retry_after.unwrap_or(THROTTLE_PAUSE)),
            _ => None,
        };
        self.pacer.observe(&ticket, &RateLimitHeaders { retry_after, ..RateLimitHeaders::default() });
        result
    }

    fn caching_for(&self, model: &str) -> bool {
        self.options.prompt_caching.unwrap_or_else(|| supports_prompt_caching(model))
    }

    /// Path, signed headers and body of one call.
    fn signed(
        &self,
        request: &ChatRequest,
        stream: bool,
        credentials: &AwsCredentials,
    ) -> Result<(String, HeaderMap, Vec<u8>), BackendError> {
        let body = converse_body(request, self.caching_for(&request.model), self.options.default_max_tokens)?;
        let body = serde_json::to_vec(&body).map_err(|e| BackendError::Config(format!("request body: {e}")))?;
        let operation = if stream { "converse-stream" } else { "converse" };
        let path = format!("/model/{}/{operation}", sigv4::uri_encode(request.model.as_bytes()));
        let amz_date = sigv4::amz_date(SystemTime::now());
        let mut to_sign = vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            ("host".to_owned(), self.host.clone()),
            ("x-amz-date".to_owned(), amz_date.clone()),
        ];
        if let Some(token) = &credentials.session_token {
            to_sign.push(("x-amz-security-token".to_owned(), token.expose().to_owned()));
        }
        let signature = sigv4::sign(
            &SignableRequest { method: "POST", path: &path, query: "", headers: &to_sign, payload: &body },
            credentials,
            &SigningScope { region: &self.region, service: SERVICE, amz_date: &amz_date },
        );
        let mut headers = HeaderMap::new();
        for (name, value) in
            to_sign.iter().chain(std::iter::once(&("authorization".to_owned(), signature.authorization)))
        {
            if name == "host" {
                continue;
            }
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| BackendError::Config(format!("invalid header name {name}")))?;
            let mut value = reqwest::header::HeaderValue::from_str(value)
                .map_err(|_| BackendError::Config(format!("header {name} has characters not allowed in HTTP")))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let accept = if stream { "application/vnd.amazon.eventstream" } else { "application/json" };
        headers.insert(ACCEPT, reqwest::header::HeaderValue::from_static(accept));
        Ok((path, headers, body))
    }

    async fn call(
        &self,
        request: ChatRequest,
        events: Option<mpsc::UnboundedSender<StreamEvent>>,
    ) -> Result<ChatResponse, BackendError> {
        let started = Instant::now();
        let credentials = self.credentials.credentials().await.map_err(credentials_error)?;
        let (path, headers, body) = self.signed(&request, request.stream, &credentials)?;
        let mut response = self
            .client
            .post(format!("{}{path}", self.endpoint))
            // `content-type` is among the signed headers already; a second one would break the
            // signature (AWS signs repeated headers joined with commas).
            .headers(headers)
            .timeout(self.options.request_timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport_error(&e))?;
        if response.status().is_redirection() {
            let location = response.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok());
            return Err(redirect_error(response.status().as_u16(), location));
        }
        if !response.status().is_success() {
            let error = http_error(response).await;
            if matches!(error, BackendError::Auth { .. }) {
                // Expired or revoked temporary credentials: the next call fetches new ones.
                self.credentials.invalidate();
            }
            return Err(error);
        }
        let (limit, idle) = (self.options.max_response_bytes, self.options.idle_timeout);
        if !request.stream {
            let body = limited_body(response, limit, idle).await.map_err(|e| match e {
                BodyError::Transport(e) => self.transport_error(&e),
                other => other.into_backend(),
            })?;
            let resp = parse_converse(&body)?;
            if let Some(tx) = &events {
                replay_events(&resp, tx, request.text_deltas);
            }
            return Ok(resp);
        }
        let mut decoder = EventStreamDecoder::new();
        let mut assembler = if events.is_some() && request.text_deltas {
            ConverseStreamAssembler::new()
        } else {
            ConverseStreamAssembler::without_text_deltas()
        };
        let mut messages = Vec::new();
        let mut out = Vec::new();
        let mut ttft = None;
        let mut received = 0usize;
        loop {
            let chunk = match idle {
                None => response.chunk().await,
                Some(after) => tokio::time::timeout(after, response.chunk())
                    .await
                    .map_err(|_| BackendError::Timeout { which: TimeoutKind::Idle, after })?,
            };
            let Some(chunk) = chunk.map_err(|e| self.transport_error(&e))? else { break };
            received = received.saturating_add(chunk.len());
            if received > limit {
                return Err(TooLarge { what: "the ConverseStream body", limit }.into());
            }
            messages.clear();
            decoder
                .feed_into(&chunk, &mut messages)
                .map_err(|e| BackendError::Protocol(format!("ConverseStream body: {e}")))?;
            for m in &messages {
                assembler.push_message(m, &mut out)?;
            }
            for ev in out.drain(..) {
                if ttft.is_none() && ev == StreamEvent::FirstToken {
                    ttft = Some(started.elapsed());
                }
                if let Some(tx) = &events {
                    // A receiver that went away only stops the forwarding, not the call.
                    let _ = tx.send(ev);
                }
            }
        }
        let framing = decoder.finish().map_err(|e| BackendError::Protocol(format!("ConverseStream body: {e}")));
        let mut resp = assembler.finish(framing.is_err())?;
        resp.ttft = ttft;
        Ok(resp)
    }

    #[cold]
    fn transport_error(&self, err: &reqwest::Error) -> BackendError {
        use std::error::Error as _;
        let mut text = err.to_string();
        // reqwest appends "for url (...)"; keep errors free of endpoints' query strings.
        if let Some(i) = text.find(" for url (") {
            text.truncate(i);
        }
        let mut source = err.source();
        while let Some(cause) = source {
            let c = cause.to_string();
            if !text.contains(&c) {
                text.push_str(": ");
                text.push_str(&c);
            }
            source = cause.source();
        }
        if err.is_timeout() {
            if err.is_connect() {
                BackendError::Timeout { which: TimeoutKind::Connect, after: self.options.connect_timeout }
            } else {
                BackendError::Timeout { which: TimeoutKind::Call, after: self.options.request_timeout }
            }
        } else {
            BackendError::Connection(text)
        }
    }
}

impl Backend for BedrockBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            streaming: true,
            tools: true,
            // Converse has no constrained decoding; the schema goes in the prompt.
            json_schema: false,
            // Per model; this reports what the backend can do for models on the allow-list.
            prompt_caching: self.options.prompt_caching.unwrap_or(true),
            metrics: false,
            agent_hints: false,
            batch_generation: false,
        }
    }

    fn chat(
        &self,
        request: ChatRequest,
        events: Option<mpsc::UnboundedSender<StreamEvent>>,
    ) -> BoxFuture<'_, Result<ChatResponse, BackendError>> {
        Box::pin(self.paced(request, events))
    }
}

/// The `Converse` / `ConverseStream` request body.
pub fn converse_body(
    request: &ChatRequest,
    prompt_caching: bool,
    default_max_tokens: u32,
) -> Result<Value, BackendError> {
    let mut system = Vec::new();
    let mut messages: Vec<(Role, Vec<Value>)> = Vec::new();
    let mut has_tool_blocks = false;
    for (i, m) in request.messages.iter().enumerate() {
        match m.role {
            Role::System => {
                if !m.content.is_empty() {
                    system.push(json!({ "text": m.content }));
                }
            }
            Role::User => {
                if !m.content.is_empty() {
                    push_blocks(&mut messages, Role::User, vec![json!({ "text": m.content })]);
                }
            }
            Role::Assistant => {
                let mut blocks = Vec::new();
                if !m.content.is_empty() {
                    blocks.push(json!({ "text": m.content }));
                }
                for call in &m.tool_calls {
                    has_tool_blocks = true;
                    blocks.push(json!({ "toolUse": {
                        "toolUseId": call.id,
                        "name": call.name,
                        "input": arguments_object(&call.arguments),
                    }}));
                }
                if !blocks.is_empty() {
                    push_blocks(&mut messages, Role::Assistant, blocks);
                }
            }
            Role::Tool => {
                has_tool_blocks = true;
                let id = tool_result_id(m, i)?;
                // Tool results travel in a user turn; consecutive ones share it (roles must alternate).
                push_blocks(
                    &mut messages,
                    Role::User,
                    vec![json!({ "toolResult": { "toolUseId": id, "content": [{ "text": m.content }] } })],
                );
            }
        }
    }
    if prompt_caching && !system.is_empty() {
        system.push(json!({ "cachePoint": { "type": "default" } }));
    }
    let messages: Vec<Value> = messages
        .into_iter()
        .map(|(role, content)| {
            json!({ "role": if role == Role::Assistant { "assistant" } else { "user" }, "content": content })
        })
        .collect();
    let mut body = Map::new();
    body.insert("messages".into(), Value::Array(messages));
    if !system.is_empty() {
        body.insert("system".into(), Value::Array(system));
    }
    let mut inference = Map::new();
    inference.insert("maxTokens".into(), json!(request.max_tokens.unwrap_or(default_max_tokens)));
    if let Some(t) = request.temperature {
        inference.insert("temperature".into(), json!(t));
    }
    body.insert("inferenceConfig".into(), Value::Object(inference));
    let choice = request.tool_choice.as_ref().map(tool_choice).transpose()?;
    // Converse has no "none" choice: with tool_choice "none" the tools are not offered at all,
    // unless the history already holds tool blocks, which Bedrock only accepts with a toolConfig.
    let offer_tools = !request.tools.is_empty() && (!matches!(choice, Some(None)) || has_tool_blocks);
    if offer_tools {
        let mut tools: Vec<Value> = request
            .tools
            .iter()
            .map(|t| {
                let mut spec = Map::new();
                spec.insert("name".into(), json!(t.name));
                if !t.description.is_empty() {
                    spec.insert("description".into(), json!(t.description));
                }
                spec.insert("inputSchema".into(), json!({ "json": t.parameters }));
                json!({ "toolSpec": spec })
            })
            .collect();
        if prompt_caching {
            tools.push(json!({ "cachePoint": { "type": "default" } }));
        }
        let mut config = Map::new();
        config.insert("tools".into(), Value::Array(tools));
        if let Some(Some(c)) = choice {
            config.insert("toolChoice".into(), c);
        }
        body.insert("toolConfig".into(), Value::Object(config));
    }
    if let Some(extra) = &request.extra_body {
        merge_converse_extra(&mut body, extra);
    }
    Ok(Value::Object(body))
}

/// The top-level fields of a Converse request (Bedrock API reference, "Converse", request body).
const CONVERSE_FIELDS: [&str; 10] = [
    "messages",
    "system",
    "inferenceConfig",
    "toolConfig",
    "guardrailConfig",
    "additionalModelRequestFields",
    "additionalModelResponseFieldPaths",
    "promptVariables",
    "requestMetadata",
    "performanceConfig",
];

/// `extra_body` on Bedrock: a key that is a Converse field replaces that field; any other key
/// (`top_k`, `anthropic_beta`, `reasoning_config`, ...) is a model-specific field, which Converse
/// takes only inside `additionalModelRequestFields` (it refuses unknown top-level fields).
fn merge_converse_extra(body: &mut Map<String, Value>, extra: &Map<String, Value>) {
    let mut model_fields = Map::new();
    for (key, value) in extra {
        if CONVERSE_FIELDS.contains(&key.as_str()) {
            body.insert(key.clone(), value.clone());
        } else {
            model_fields.insert(key.clone(), value.clone());
        }
    }
    if model_fields.is_empty() {
        return;
    }
    match body.get_mut("additionalModelRequestFields") {
        Some(Value::Object(fields)) => fields.extend(model_fields),
        _ => {
            body.insert("additionalModelRequestFields".into(), Value::Object(model_fields));
        }
    }
}

fn push_blocks(messages: &mut Vec<(Role, Vec<Value>)>, role: Role, blocks: Vec<Value>) {
    match messages.last_mut() {
        Some((last, content)) if *last == role => content.extend(blocks),
        _ => messages.push((role, blocks)),
    }
}

fn tool_result_id(m: &Message, index: usize) -> Result<&str, BackendError> {
    m.tool_call_id
        .as_deref()
        .ok_or_else(|| BackendError::Config(format!("messages[{index}]: tool message without tool_call_id")))
}

/// OpenAI-style `tool_choice` -> Converse `toolChoice`; `Ok(None)` means "none" (no tool use).
fn tool_choice(choice: &Value) -> Result<Option<Value>, BackendError> {
    match choice {
        Value::String(s) => match s.as_str() {
            "auto" => Ok(Some(json!({ "auto": {} }))),
            "required" | "any" => Ok(Some(json!({ "any": {} }))),
            "none" => Ok(None),
            other => Err(BackendError::Config(format!("tool_choice {other:?} is not auto, required, any or none"))),
        },
        Value::Object(o) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .or_else(|| o.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| BackendError::Config(format!("tool_choice {choice} names no tool")))?;
            Ok(Some(json!({ "tool": { "name": name } })))
        }
        other => Err(BackendError::Config(format!("tool_choice {other} is not a string or an object"))),
    }
}

/// Converse `stopReason` in `OpenAI`'s words.
pub fn map_stop_reason(reason: Option<&str>) -> String {
    match reason {
        Some("end_turn" | "stop_sequence") | None => "stop",
        Some("tool_use") => "tool_calls",
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("guardrail_intervened" | "content_filtered") => "content_filter",
        Some(other) => other,
    }
    .to_owned()
}

// Field names are the wire's.
#[allow(clippy::struct_field_names)]
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageWire {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_read_input_tokens: u64,
    #[serde(default)]
    cache_write_input_tokens: u64,
}

impl UsageWire {
    fn to_usage(&self) -> Usage {
        Usage {
            // inputTokens excludes the tokens read from or written to the cache.
            prompt_tokens: self
                .input_tokens
                .saturating_add(self.cache_read_input_tokens)
                .saturating_add(self.cache_write_input_tokens),
            cached_tokens: self.cache_read_input_tokens,
            completion_tokens: self.output_tokens,
            cache_creation_tokens: self.cache_write_input_tokens,
            estimated: false,
        }
    }
}

/// A `Converse` response body.
pub fn parse_converse(body: &[u8]) -> Result<ChatResponse, BackendError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Wire {
        output: Option<Value>,
        stop_reason: Option<String>,
        #[serde(default)]
        usage: UsageWire,
    }
    let wire: Wire = serde_json::from_slice(body).map_err(|e| {
        BackendError::Protocol(format!("malformed Converse response ({e}): {}", clip(&String::from_utf8_lossy(body))))
    })?;
    let content = wire
        .output
        .as_ref()
        .and_then(|o| o.pointer("/message/content"))
        .and_then(Value::as_array)
        .ok_or_else(|| BackendError::Protocol("Converse response has no output.message.content".into()))?;
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for (i, block) in content.iter().enumerate() {
        if let Some(t) = block.get("text").and_then(Value::as_str) {
            text.push_str(t);
        } else if let Some(tu) = block.get("toolUse") {
            let id = tu.get("toolUseId").and_then(Value::as_str);
            let name = tu.get("name").and_then(Value::as_str);
            let (Some(id), Some(name)) = (id, name) else {
                return Err(BackendError::Protocol(format!(
                    "output.message.content[{i}].toolUse has no toolUseId or name"
                )));
            };
            let arguments = tu.get("input").map_or_else(|| "{}".to_owned(), Value::to_string);
            tool_calls.push(ToolCall { id: id.to_owned(), name: name.to_owned(), arguments });
        }
    }
    Ok(ChatResponse {
        content: text,
        tool_calls,
        usage: wire.usage.to_usage(),
        finish_reason: map_stop_reason(wire.stop_reason.as_deref()),
        ttft: None,
    })
}

/// The payload of any `ConverseStream` event, in one flat shape (unknown fields such as the `p`
/// padding are skipped without being built).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventWire<'a> {
    #[serde(default)]
    content_block_index: Option<usize>,
    #[serde(default)]
    start: Option<StartWire>,
    #[serde(default, borrow)]
    delta: Option<DeltaWire<'a>>,
    #[serde(default, borrow)]
    stop_reason: Option<Cow<'a, str>>,
    #[serde(default)]
    usage: Option<UsageWire>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartWire {
    #[serde(default)]
    tool_use: Option<ToolUseStartWire>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ToolUseStartWire {
    #[serde(default)]
    tool_use_id: String,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeltaWire<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_use: Option<ToolUseDeltaWire<'a>>,
}

#[derive(Deserialize)]
struct ToolUseDeltaWire<'a> {
    #[serde(default, borrow)]
    input: Option<Cow<'a, str>>,
}

#[derive(Debug)]
enum StreamBlock {
    Text,
    Tool { id: String, name: String, input: String, announced: bool },
}

/// Assembles a `ConverseStream` turn from its decoded event-stream messages.
#[derive(Debug, Default)]
pub struct ConverseStreamAssembler {
    content: String,
    blocks: Vec<Option<StreamBlock>>,
    usage: Option<Usage>,
    stop_reason: Option<String>,
    stopped: bool,
    first_token: bool,
    /// Nobody listens to `TextDelta`s: skip building them (one allocation per event).
    no_text_deltas: bool,
}

impl ConverseStreamAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// An assembler that sends no [`StreamEvent::TextDelta`]s (the text still accumulates).
    pub fn without_text_deltas() -> Self {
        Self { no_text_deltas: true, ..Self::default() }
    }

    /// One event-stream message: an event (`:message-type` event), or a modelled exception / an
    /// error, which ends the call with the matching [`BackendError`].
    pub fn push_message(&mut self, message: &EventMessage, out: &mut Vec<StreamEvent>) -> Result<(), BackendError> {
        match message.header_str(":message-type") {
            Some("event") | None => {}
            Some("exception") => {
                let kind = message.header_str(":exception-type").unwrap_or("exception");
                return Err(exception_error(kind, &payload_message(&message.payload), None, None));
            }
            Some(other) => {
                let code = message.header_str(":error-code").unwrap_or(other);
                let text = message.header_str(":error-message").unwrap_or("");
                return Err(exception_error(code, text, None, None));
            }
        }
        let Some(event_type) = message.header_str(":event-type") else {
            return Err(BackendError::Protocol("ConverseStream event without an :event-type header".into()));
        };
        let payload: EventWire = serde_json::from_slice(&message.payload).map_err(|e| {
            BackendError::Protocol(format!(
                "ConverseStream {event_type} payload is not the expected JSON ({e}): {}",
                clip(&String::from_utf8_lossy(&message.payload))
            ))
        })?;
        let index = || {
            let index = payload.content_block_index.ok_or_else(|| missing(event_type, "contentBlockIndex"))?;
            stream_index(index, "ConverseStream content block")
        };
        match event_type {
            "contentBlockStart" => {
                let index = index()?;
                if let Some(tu) = payload.start.as_ref().and_then(|s| s.tool_use.as_ref()) {
                    self.mark_first_token(out);
                    self.set_block(
                        index,
                        StreamBlock::Tool {
                            id: tu.tool_use_id.clone(),
                            name: tu.name.clone(),
                            input: String::new(),
                            announced: false,
                        },
                    );
                }
            }
            "contentBlockDelta" => {
                let index = index()?;
                let delta = payload.delta.as_ref().ok_or_else(|| missing(event_type, "delta"))?;
                if let Some(text) = &delta.text {
                    if self.blocks.get(index).is_none_or(Option::is_none) {
                        self.set_block(index, StreamBlock::Text);
                    }
                    if !text.is_empty() {
                        self.mark_first_token(out);
                        self.content.push_str(text);
                        if !self.no_text_deltas {
                            out.push(StreamEvent::TextDelta(text.clone().into_owned()));
                        }
                    }
                } else if let Some(fragment) = delta.tool_use.as_ref().and_then(|t| t.input.as_ref()) {
                    match self.blocks.get_mut(index) {
                        Some(Some(StreamBlock::Tool { input, .. })) => input.push_str(fragment),
                        _ => {
                            return Err(BackendError::Protocol(format!(
                                "toolUse delta for content block {index}, which no toolUse contentBlockStart opened"
                            )))
                        }
                    }
                }
            }
            "contentBlockStop" => {
                let index = index()?;
                if let Some(Some(StreamBlock::Tool { id, name, input, announced })) = self.blocks.get_mut(index) {
                    if !*announced {
                        *announced = true;
                        out.push(StreamEvent::ToolCallReady(stream_call(id, name, input)));
                    }
                }
            }
            "messageStop" => {
                self.stopped = true;
                self.stop_reason = payload.stop_reason.map(Cow::into_owned);
            }
            "metadata" => {
                if let Some(u) = &payload.usage {
                    self.usage = Some(u.to_usage());
                }
            }
            // messageStart carries only the role; newer event types carry nothing we return.
            _ => {}
        }
        Ok(())
    }

    /// `index` has been bounded by [`stream_index`]: the vector grows to at most that.
    fn set_block(&mut self, index: usize, block: StreamBlock) {
        if self.blocks.len() <= index {
            self.blocks.resize_with(index.saturating_add(1), || None);
        }
        if let Some(slot) = self.blocks.get_mut(index) {
            *slot = Some(block);
        }
    }

    fn mark_first_token(&mut self, out: &mut Vec<StreamEvent>) {
        if !self.first_token {
            self.first_token = true;
            out.push(StreamEvent::FirstToken);
        }
    }

    /// Ends the turn. `truncated`: the body ended inside a frame. Without `messageStop` the stream
    /// was cut, a retryable [`BackendError::Protocol`].
    pub fn finish(self, truncated: bool) -> Result<ChatResponse, BackendError> {
        if !self.stopped || truncated {
            return Err(BackendError::Protocol(format!(
                "ConverseStream ended {} ({} bytes of text received)",
                if truncated { "inside an event-stream frame" } else { "before messageStop" },
                self.content.len()
            )));
        }
        let tool_calls = self
            .blocks
            .iter()
            .filter_map(|b| match b {
                Some(StreamBlock::Tool { id, name, input, .. }) => Some(stream_call(id, name, input)),
                _ => None,
            })
            .collect();
        Ok(ChatResponse {
            content: self.content,
            tool_calls,
            usage: self.usage.unwrap_or_default(),
            finish_reason: map_stop_reason(self.stop_reason.as_deref()),
            ttft: None,
        })
    }
}

fn stream_call(id: &str, name: &str, input: &str) -> ToolCall {
    let arguments = if input.trim().is_empty() { "{}".to_owned() } else { input.to_owned() };
    ToolCall { id: id.to_owned(), name: name.to_owned(), arguments }
}

fn missing(event: &str, field: &str) -> BackendError {
    BackendError::Protocol(format!("ConverseStream {event} event without {field}"))
}

fn payload_message(payload: &[u8]) -> String {
    serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|v| v.get("message").or_else(|| v.get("Message")).and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(payload).into_owned())
}

/// A Bedrock error type (`x-amzn-ErrorType` of an HTTP error, `:exception-type` of a stream
/// exception) as a [`BackendError`]. Throttling becomes `RateLimited`, which drives the adaptive
/// concurrency limit down.
pub fn exception_error(kind: &str, message: &str, status: Option<u16>, retry_after: Option<Duration>) -> BackendError {
    // `x-amzn-ErrorType` may carry a namespace suffix ("ThrottlingException:http://...").
    let kind = kind.split(':').next().unwrap_or(kind);
    let message = clip(message);
    match kind.to_ascii_lowercase().as_str() {
        "throttlingexception" => BackendError::RateLimited { status: status.unwrap_or(429), retry_after },
        "serviceunavailableexception" | "modelnotreadyexception" => BackendError::Overloaded(message),
        "internalserverexception" => BackendError::Server { status: status.unwrap_or(500), message },
        "modelstreamerrorexception" | "modelerrorexception" => {
            BackendError::Server { status: status.unwrap_or(424), message }
        }
        "modeltimeoutexception" => BackendError::Server { status: status.unwrap_or(408), message },
        "validationexception" => BackendError::rejected(status.unwrap_or(400), message),
        "resourcenotfoundexception" | "servicequotaexceededexception" => {
            BackendError::Rejected { status: status.unwrap_or(400), message }
        }
        "accessdeniedexception"
        | "unrecognizedclientexception"
        | "invalidsignatureexception"
        | "expiredtokenexception"
        | "incompletesignatureexception"
        | "missingauthenticationtokenexception" => BackendError::Auth { status: status.unwrap_or(403), message },
        _ => match status {
            Some(429) => BackendError::RateLimited { status: 429, retry_after },
            Some(503) => BackendError::Overloaded(message),
            Some(s @ (401 | 403)) => BackendError::Auth { status: s, message },
            Some(s) if s < 500 => BackendError::rejected(s, message),
            s => BackendError::Server { status: s.unwrap_or(500), message: format!("{kind}: {message}") },
        },
    }
}

/// A source that did not answer is worth retrying; a configuration that cannot work is not.
fn credentials_error(error: CredentialsError) -> BackendError {
    match error {
        CredentialsError::Fetch { .. } => BackendError::Connection(error.to_string()),
        other => BackendError::Config(other.to_string()),
    }
}

async fn http_error(mut response: reqwest::Response) -> BackendError {
    let status = response.status().as_u16();
    let headers = response.headers();
    let kind = headers.get("x-amzn-errortype").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let retry_after =
        headers.get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| parse_retry_after(v, SystemTime::now()));
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY {
        match response.chunk().await {
            Ok(Some(c)) => body.extend_from_slice(&c),
            Ok(None) | Err(_) => break,
        }
    }
    let message = payload_message(&body);
    let message = if message.trim().is_empty() { format!("HTTP {status} with an empty body") } else { message };
    exception_error(kind.as_deref().unwrap_or(""), &message, Some(status), retry_after)
}

fn clip(s: &str) -> String {
    match s.char_indices().nth(MAX_ERROR_MESSAGE) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::arithmetic_side_effects)]
    use std::sync::Arc;

    use super::*;
    use crate::conversation::ToolDef;

    #[test]
    fn caching_allow_list() {
        assert!(supports_prompt_caching("anthropic.claude-3-7-sonnet-20250219-v1:0"));
        assert!(supports_prompt_caching("us.anthropic.claude-sonnet-4-20250514-v1:0"));
        assert!(supports_prompt_caching("global.anthropic.claude-opus-4-1-20250805-v1:0"));
        assert!(supports_prompt_caching("amazon.nova-pro-v1:0"));
        assert!(!supports_prompt_caching("anthropic.claude-3-5-sonnet-20241022-v2:0"));
        assert!(!supports_prompt_caching("meta.llama3-70b-instruct-v1:0"));
        assert!(!supports_prompt_caching("anthropic.claude-3-haiku-20240307-v1:0"));
    }

    fn request(messages: Vec<Message>, tool_choice: Option<Value>) -> ChatRequest {
        ChatRequest {
            model: "m".into(),
            messages: Arc::new(messages),
            tools: Arc::new(vec![ToolDef {
                name: "search".into(),
                description: "web".into(),
                parameters: json!({"type":"object"}),
            }]),
            tool_choice,
            response_schema: None,
            max_tokens: None,
            temperature: Some(0.5),
            request_id: "r".into(),
            stream: true,
            hints: None,
            text_deltas: true,
            extra_body: None,
        }
    }

    #[test]
    fn body_merges_tool_results_and_places_cache_points() {
        let call = ToolCall { id: "t1".into(), name: "search".into(), arguments: "{\"q\":\"x\"}".into() };
        let call2 = ToolCall { id: "t2".into(), name: "search".into(), arguments: "not json".into() };
        let msgs = vec![
            Message::system("sys"),
            Message::user("hi"),
            Message::assistant("", vec![call.clone(), call2.clone()]),
            Message::tool_result(&call, "r1"),
            Message::tool_result(&call2, "r2"),
        ];
        let body = converse_body(&request(msgs, Some(json!("required"))), true, 4096).unwrap();
        assert_eq!(body["system"], json!([{"text":"sys"},{"cachePoint":{"type":"default"}}]));
        assert_eq!(body["messages"].as_array().unwrap().len(), 3);
        assert_eq!(body["messages"][1]["content"][0]["toolUse"]["input"], json!({"q":"x"}));
        assert_eq!(body["messages"][1]["content"][1]["toolUse"]["input"], json!({}));
        let results = &body["messages"][2];
        assert_eq!(results["role"], "user");
        assert_eq!(results["content"][1]["toolResult"]["toolUseId"], "t2");
        assert_eq!(body["toolConfig"]["tools"][1], json!({"cachePoint":{"type":"default"}}));
        assert_eq!(body["toolConfig"]["toolChoice"], json!({"any":{}}));
        assert_eq!(body["inferenceConfig"], json!({"maxTokens":4096,"temperature":0.5}));
    }

    #[test]
    fn extra_body_fields_go_where_converse_takes_them() {
        let mut req = request(vec![Message::user("hi")], None);
        let extra = json!({
            "top_k": 40,
            "additionalModelRequestFields": {"anthropic_beta": ["x"]},
            "performanceConfig": {"latency": "optimized"},
            "inferenceConfig": {"maxTokens": 5},
        });
        req.extra_body = extra.as_object().cloned().map(Arc::new);
        let body = converse_body(&req, false, 10).unwrap();
        assert_eq!(body["additionalModelRequestFields"], json!({"anthropic_beta": ["x"], "top_k": 40}));
        assert_eq!(body["performanceConfig"], json!({"latency": "optimized"}));
        assert_eq!(body["inferenceConfig"], json!({"maxTokens": 5}));
        assert!(body.get("top_k").is_none(), "Converse refuses unknown top-level fields");
    }

    #[test]
    fn tool_choice_none_drops_tools_only_without_tool_history() {
        let body = converse_body(&request(vec![Message::user("hi")], Some(json!("none"))), false, 10).unwrap();
        assert!(body.get("toolConfig").is_none());
        let named = json!({"type":"function","function":{"name":"search"}});
        let body = converse_body(&request(vec![Message::user("hi")], Some(named)), false, 10).unwrap();
        assert_eq!(body["toolConfig"]["toolChoice"], json!({"tool":{"name":"search"}}));
        assert!(body.get("system").is_none());
        let call = ToolCall { id: "t1".into(), name: "search".into(), arguments: "{}".into() };
        let history =
            vec![Message::user("hi"), Message::assistant("", vec![call.clone()]), Message::tool_result(&call, "r")];
        let body = converse_body(&request(history, Some(json!("none"))), false, 10).unwrap();
        assert!(body["toolConfig"].get("toolChoice").is_none(), "Bedrock needs toolConfig once tool blocks exist");
        assert_eq!(body["toolConfig"]["tools"][0]["toolSpec"]["name"], "search");
    }

    #[test]
    fn exception_kinds() {
        let rl = exception_error("ThrottlingException:http://internal.amazon.com/coral/", "slow", Some(429), None);
        assert!(rl.is_throttle() && matches!(rl, BackendError::RateLimited { status: 429, .. }));
        assert_eq!(exception_error("modelNotReadyException", "m", None, None), BackendError::Overloaded("m".into()));
        assert_eq!(
            exception_error("validationException", "bad", None, None),
            BackendError::Rejected { status: 400, message: "bad".into() }
        );
        assert!(exception_error("internalServerException", "x", None, None).retryable());
        assert!(matches!(exception_error("", "x", Some(502), None), BackendError::Server { status: 502, .. }));
    }
}
