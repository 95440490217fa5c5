//! The HTTP layer every HTTP backend shares: one pooled keep-alive client per backend,
//! timeouts, the mapping of HTTP statuses and transport failures onto [`BackendError`], and
//! redaction of the API key from everything that can reach a log.
//!
//! What a server sends is bounded: no body longer than `max_response_bytes`, no wait for body
//! bytes longer than `idle_timeout`, and no redirect followed (a 3xx is an error naming where it
//! pointed), so credentials never travel to another host.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde_json::Value;
use tokio::sync::mpsc;

use super::h1::{H1Client, H1Error, H1Response};
use super::url::BackendOptions;
use super::{BackendError, ChatResponse, StreamEvent};
use crate::conversation::TimeoutKind;
pub use crate::limits::headers::parse_retry_after;
use crate::limits::pacer::{Estimate, Pacer, Ticket};
use crate::limits::{RateLimitHeaders, TooLarge};
use crate::secret::Secret;
use crate::stream::sse::SseParser;
pub use crate::stream::sse::SseTurn;

/// Longest server message kept in an error.
pub const MAX_ERROR_MESSAGE: usize = 500;
/// Most bytes of an error body read before giving up on the rest.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// How the key is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStyle {
    /// `Authorization: Bearer <key>` (`OpenAI` and everything compatible with it).
    Bearer,
    /// The key as the value of a named header (Anthropic's `x-api-key`).
    Header(&'static str),
}

/// Tells the pacer that a request it admitted has ended, when dropped.
struct Ended<'a>(&'a Pacer);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.answered();
    }
}

/// How requests reach the server.
#[derive(Clone)]
enum Transport {
    /// The lean HTTP/1.1 client: plain `http://` without a proxy.
    Lean(Arc<H1Client>),
    /// reqwest: TLS, proxies, HTTP/2.
    Reqwest(reqwest::Client),
}

/// A pooled client bound to one server: the lean HTTP/1.1 client of [`h1`](super::h1) for
/// plain `http://` servers reached without a proxy, reqwest for everything else.
#[derive(Clone)]
pub struct HttpClient {
    transport: Transport,
    base_url: String,
    /// The path part of `base_url` (the fast client's request targets start with it).
    base_path: String,
    headers: HeaderMap,
    secret: Option<Secret>,
    request_timeout: Duration,
    idle_timeout: Option<Duration>,
    connect_timeout: Duration,
    max_response_bytes: usize,
    /// Paces the model calls sent to this server by its rate limits (see [`Pacer`]).
    pacer: Arc<Pacer>,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("base_url", &self.base_url)
            .field("api_key", &self.secret.as_ref().map(|_| "[redacted]"))
            .field("request_timeout", &self.request_timeout)
            .field(
                "transport",
                &match self.transport {
                    Transport::Lean(_) => "http/1.1",
                    Transport::Reqwest(_) => "reqwest",
                },
            )
            .finish_non_exhaustive()
    }
}

/// A POST about to be sent: see [`HttpClient::post`] and [`HttpClient::post_to`].
pub struct Post<'a> {
    target: Target<'a>,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
    /// The pacer's admission of this request: its answer's rate-limit headers are read.
    ticket: Option<Ticket>,
}

enum Target<'a> {
    Path(&'a str),
    Endpoint(&'a Endpoint),
}

impl Post<'_> {
    #[must_use]
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// Marks the request as admitted by the client's pacer, which then learns from the answer.
    #[must_use]
    pub fn ticket(mut self, ticket: Ticket) -> Self {
        self.ticket = Some(ticket);
        self
    }
}

/// A path on the server prepared once for a backend that posts to it on every call: parsing the
/// URL (IDNA mapping included) per request was a measurable share of the client's CPU.
#[derive(Debug, Clone)]
pub struct Endpoint {
    url: reqwest::Url,
    path: String,
}

/// A response whose status is a success; its body is read through the [`HttpClient`].
pub enum Response {
    /// With the body bytes read so far (the lean client counts its own).
    Reqwest(reqwest::Response, usize),
    Fast(H1Response),
}

impl Response {
    pub fn status(&self) -> u16 {
        match self {
            Self::Reqwest(r, _) => r.status().as_u16(),
            Self::Fast(r) => r.status(),
        }
    }

    /// A header's first value; `name` in lower case.
    pub fn header(&self, name: &str) -> Option<&str> {
        match self {
            Self::Reqwest(r, _) => r.headers().get(name).and_then(|v| v.to_str().ok()),
            Self::Fast(r) => r.header(name),
        }
    }
}

/// Whether `value` may be sent as an HTTP field value (RFC 9110 section 5.5: visible characters,
/// spaces, tabs and obs-text; no CR, LF, NUL or other control character).
pub fn is_field_value(value: &[u8]) -> bool {
    value.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// Headers the client writes itself from the request it sends; one given by the user would
/// contradict them (a second `Content-Length` makes the request ambiguous to every proxy).
const FRAMING_HEADERS: [&str; 6] = ["content-length", "transfer-encoding", "host", "connection", "te", "upgrade"];

/// Checks a user-given header (`extra_headers=`): a valid field name, not one of the framing
/// headers, and a value without CR, LF or other control characters. The message names the
/// header, never its value (which may be a credential).
pub fn check_header(name: &str, value: &str) -> Result<(), String> {
    if HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Err(format!("extra_headers: {name:?} is not a valid HTTP header name"));
    }
    if FRAMING_HEADERS.iter().any(|h| name.eq_ignore_ascii_case(h)) {
        return Err(format!("extra_headers: {name} is set by the client from the request itself"));
    }
    if !is_field_value(value.as_bytes()) {
        return Err(format!(
            "extra_headers: the value of {name} contains a control character (CR, LF, NUL, ...), \
             which HTTP does not allow"
        ));
    }
    Ok(())
}

/// Whether reqwest would route plain HTTP through a proxy (it reads these variables).
fn proxy_configured() -> bool {
    ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

impl HttpClient {
    /// `base_url` is joined with the paths given to [`post`](Self::post); a trailing `/` is dropped.
    pub fn new(
        base_url: &str,
        options: &BackendOptions,
        key: Option<Secret>,
        auth: AuthStyle,
    ) -> Result<Self, BackendError> {
        let mut headers = HeaderMap::new();
        for (name, value) in &options.extra_headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| BackendError::Config(format!("extra header name {name:?} is not a valid HTTP header")))?;
            let mut value = HeaderValue::from_str(value)
                .map_err(|_| BackendError::Config(format!("extra header {name} has a value that is not valid")))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        if let Some(key) = &key {
            let (name, text) = match auth {
                AuthStyle::Bearer => (AUTHORIZATION, format!("Bearer {}", key.expose())),
                AuthStyle::Header(name) => (
                    HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| BackendError::Config(format!("auth header name {name:?} is not valid")))?,
                    key.expose().to_owned(),
                ),
            };
            let mut value = HeaderValue::from_str(&text)
                .map_err(|_| BackendError::Config("the API key contains characters not allowed in a header".into()))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let base_url = base_url.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&base_url)
            .map_err(|e| BackendError::Config(format!("backend URL {base_url:?} is not valid: {e}")))?;
        let plain = parsed.scheme() == "http"
            && parsed.username().is_empty()
            && parsed.password().is_none()
            && parsed.query().is_none()
            && !proxy_configured();
        let transport = match (plain, parsed.host_str(), parsed.port_or_known_default()) {
            (true, Some(host), Some(port)) => {
                // An IPv6 literal is bracketed in a URL and in `Host`, not when connecting.
                let connect_host = host.trim_start_matches('[').trim_end_matches(']');
                let authority = match parsed.port() {
                    Some(port) => format!("{host}:{port}"),
                    None => host.to_string(),
                };
                let fixed = headers.iter().map(|(name, value)| (name.as_str(), value.as_bytes()));
                let client = H1Client::new(connect_host, port, &authority, fixed, options.connect_timeout)
                    .with_limits(options.max_response_bytes, options.idle_timeout);
                Transport::Lean(Arc::new(client))
            }
            // Built only where it is used: building one loads the system's root certificates,
            // about 10 ms of CPU each time (measured with callgrind), which a run paid once per
            // endpoint client even when every request went through the lean client.
            _ => Transport::Reqwest(
                reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .connect_timeout(options.connect_timeout)
                    .pool_idle_timeout(Duration::from_secs(90))
                    .pool_max_idle_per_host(1024)
                    .tcp_nodelay(true)
                    .tcp_keepalive(Duration::from_secs(30))
                    .build()
                    .map_err(|e| BackendError::Config(format!("cannot build the HTTP client: {}", error_chain(&e))))?,
            ),
        };
        // Requests sent with one key to one server share its rate limits, in this process or in
        // the fleet's store.
        let pacer = Arc::new(Pacer::for_endpoint(
            options.budgets.as_deref(),
            &crate::secret::display_url(&base_url),
            key.as_ref().map(Secret::expose).filter(|k| !k.is_empty()),
            options.rate_limits,
        ));
        Ok(Self {
            transport,
            base_path: parsed.path().trim_end_matches('/').to_owned(),
            base_url,
            headers,
            secret: key.filter(|k| !k.expose().is_empty()),
            request_timeout: options.request_timeout,
            idle_timeout: options.idle_timeout,
            connect_timeout: options.connect_timeout,
            max_response_bytes: options.max_response_bytes,
            pacer,
        })
    }

    /// Waits until the server's rate limits (set by hand or stated in its headers) allow a
    /// request of this cost; the ticket goes on the request ([`Post::ticket`]).
    pub async fn admit(&self, estimate: Estimate) -> Ticket {
        self.pacer.admit(estimate).await
    }

    pub fn pacer(&self) -> &Arc<Pacer> {
        &self.pacer
    }

    /// Most bytes read of one response body (`max_response_bytes`).
    pub fn max_response_bytes(&self) -> usize {
        self.max_response_bytes
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    pub fn has_key(&self) -> bool {
        self.secret.is_some()
    }

    /// `base_url + path`, prepared for [`post_to`](Self::post_to).
    pub fn endpoint(&self, path: &str) -> Result<Endpoint, BackendError> {
        let url = format!("{}{path}", self.base_url);
        let parsed = reqwest::Url::parse(&url)
            .map_err(|e| BackendError::Config(format!("backend URL {url:?} is not valid: {e}")))?;
        Ok(Endpoint { url: parsed, path: format!("{}{path}", self.base_path) })
    }

    /// A JSON POST to `base_url + path` with the auth and extra headers.
    pub fn post<'a>(&self, path: &'a str, body: &Value) -> Post<'a> {
        Post {
            target: Target::Path(path),
            body: serde_json::to_vec(body).unwrap_or_default(),
            headers: Vec::new(),
            ticket: None,
        }
    }

    /// A POST of an already serialised JSON body to an [`Endpoint`].
    pub fn post_to<'a>(&self, endpoint: &'a Endpoint, body: Vec<u8>) -> Post<'a> {
        Post { target: Target::Endpoint(endpoint), body, headers: Vec::new(), ticket: None }
    }

    /// Sends the request; a non-2xx answer becomes the matching [`BackendError`].
    pub async fn send(&self, post: Post<'_>) -> Result<Response, BackendError> {
        // Per-request values (a job's `X-Request-Id`) are checked here for both transports: a CR
        // or LF would end the header early and let the rest be read as headers of its own.
        if let Some((name, _)) = post.headers.iter().find(|(_, value)| !is_field_value(value.as_bytes())) {
            return Err(BackendError::Config(format!("header {name} has a value with a control character")));
        }
        let ticket = post.ticket;
        // However the request ends (answered, failed, cancelled), requests held back until the
        // first answer go on.
        let _ended = ticket.map(|_| Ended(&self.pacer));
        let response = match &self.transport {
            Transport::Lean(fast) => {
                let full_path;
                let path = match post.target {
                    Target::Endpoint(endpoint) => endpoint.path.as_str(),
                    Target::Path(path) => {
                        full_path = format!("{}{path}", self.base_path);
                        full_path.as_str()
                    }
                };
                let headers: Vec<(&str, &str)> = post.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
                Response::Fast(fast.post(path, &headers, &post.body).await.map_err(|e| self.h1_error(&e))?)
            }
            Transport::Reqwest(client) => {
                let mut builder = match post.target {
                    Target::Endpoint(endpoint) => client.post(endpoint.url.clone()),
                    Target::Path(path) => client.post(format!("{}{path}", self.base_url)),
                };
                if !self.headers.is_empty() {
                    builder = builder.headers(self.headers.clone());
                }
                for (name, value) in post.headers {
                    builder = builder.header(name, value);
                }
                let request = builder.header(CONTENT_TYPE, "application/json").body(post.body);
                Response::Reqwest(request.send().await.map_err(|e| self.transport_error(&e))?, 0)
            }
        };
        let status = response.status();
        if let Some(ticket) = &ticket {
            let mut stated = RateLimitHeaders::parse(|name| response.header(name), SystemTime::now());
            if status != 429 {
                // A 503's `Retry-After` is about that call (an engine that is overloaded), not a
                // rate limit: the call's own retry waits for it.
                stated.retry_after = None;
            }
            self.pacer.observe(ticket, &stated);
        }
        if (200..300).contains(&status) {
            return Ok(response);
        }
        if (300..400).contains(&status) {
            return Err(self.redact_error(redirect_error(status, response.header("location"))));
        }
        let retry_after = response.header("retry-after").map(str::to_owned);
        let body = self.read_error_body(response).await;
        Err(self.redact_error(status_error(status, retry_after.as_deref(), &body, SystemTime::now())))
    }

    /// The next piece of a response body; `None` at its end. A failed read is a connection error,
    /// a body longer than `max_response_bytes` a protocol error, a wait longer than
    /// `idle_timeout` a timeout.
    pub async fn next_chunk(&self, response: &mut Response) -> Result<Option<Bytes>, BackendError> {
        match response {
            Response::Reqwest(r, received) => {
                let chunk = match self.idle_timeout {
                    None => r.chunk().await,
                    Some(limit) => tokio::time::timeout(limit, r.chunk())
                        .await
                        .map_err(|_| BackendError::Timeout { which: TimeoutKind::Idle, after: limit })?,
                }
                .map_err(|e| self.transport_error(&e))?;
                if let Some(piece) = &chunk {
                    *received = received.saturating_add(piece.len());
                    if *received > self.max_response_bytes {
                        return Err(self.too_large().into());
                    }
                }
                Ok(chunk)
            }
            Response::Fast(r) => r.chunk().await.map_err(|e| self.h1_error(&e)),
        }
    }

    #[cold]
    fn too_large(&self) -> TooLarge {
        TooLarge { what: "the response body", limit: self.max_response_bytes }
    }

    /// Reads an SSE body into one turn: events are parsed as the bytes come, handed on to
    /// `events` (a receiver that went away only stops the forwarding, not the call), and the
    /// first token's arrival is timed from `started`.
    pub async fn read_sse_turn<A: SseTurn>(
        &self,
        response: &mut Response,
        mut assembler: A,
        events: Option<&mpsc::UnboundedSender<StreamEvent>>,
        started: Instant,
    ) -> Result<ChatResponse, BackendError> {
        let mut sse = SseParser::with_limit(self.max_response_bytes);
        let mut out = Vec::new();
        let mut ttft = None;
        let mut failure = None;
        while let Some(chunk) = self.next_chunk(response).await? {
            sse.feed_with(&chunk, |event| {
                if failure.is_none() {
                    if let Err(e) = assembler.push_event(&event, &mut out) {
                        failure = Some(e);
                    }
                }
            })?;
            for event in out.drain(..) {
                if ttft.is_none() && event == StreamEvent::FirstToken {
                    ttft = Some(started.elapsed());
                }
                if let Some(tx) = events {
                    let _ = tx.send(event);
                }
            }
            if let Some(e) = failure {
                return Err(self.redact_error(e));
            }
        }
        let mut turn = assembler.finish(sse.finish()).map_err(|e| self.redact_error(e))?;
        turn.ttft = ttft;
        Ok(turn)
    }

    /// The whole body of a successful response, within `max_response_bytes`.
    pub async fn read_body(&self, response: Response) -> Result<Bytes, BackendError> {
        match response {
            Response::Fast(r) => r.bytes().await.map_err(|e| self.h1_error(&e)),
            Response::Reqwest(r, _) => {
                let limit = self.max_response_bytes;
                let idle = self.idle_timeout;
                limited_body(r, limit, idle).await.map_err(|e| match e {
                    BodyError::Transport(e) => self.transport_error(&e),
                    other => other.into_backend(),
                })
            }
        }
    }

    async fn read_error_body(&self, mut response: Response) -> Vec<u8> {
        let mut body = Vec::new();
        while body.len() < MAX_ERROR_BODY {
            match self.next_chunk(&mut response).await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) | Err(_) => break,
            }
        }
        body
    }

    /// A failure of the fast client as a [`BackendError`].
    #[cold]
    fn h1_error(&self, err: &H1Error) -> BackendError {
        match err {
            H1Error::ConnectTimeout(limit) => BackendError::Timeout { which: TimeoutKind::Connect, after: *limit },
            H1Error::IdleTimeout(limit) => BackendError::Timeout { which: TimeoutKind::Idle, after: *limit },
            H1Error::TooLarge(e) => (*e).into(),
            H1Error::Protocol(_) => BackendError::Protocol(self.redact(&err.to_string())),
            H1Error::InvalidHeader(_) => BackendError::Config(err.to_string()),
            _ => BackendError::Connection(self.redact(&format!("error sending request: {err}"))),
        }
    }

    /// A reqwest failure as a [`BackendError`], never carrying the URL's query or the key.
    #[cold]
    pub fn transport_error(&self, err: &reqwest::Error) -> BackendError {
        let message = self.redact(&error_chain(err));
        if err.is_timeout() {
            let which = if err.is_connect() { TimeoutKind::Connect } else { TimeoutKind::Call };
            let after = if err.is_connect() { self.connect_timeout } else { self.request_timeout };
            BackendError::Timeout { which, after }
        } else if err.is_builder() {
            BackendError::Config(message)
        } else {
            BackendError::Connection(message)
        }
    }

    /// Removes the API key from a text that may have come from a server or a library.
    pub fn redact(&self, text: &str) -> String {
        match &self.secret {
            Some(key) => key.redact(text),
            None => text.to_owned(),
        }
    }

    #[cold]
    pub fn redact_error(&self, err: BackendError) -> BackendError {
        if self.secret.is_none() {
            return err;
        }
        match err {
            BackendError::Server { status, message } => BackendError::Server { status, message: self.redact(&message) },
            BackendError::Rejected { status, message } => {
                BackendError::Rejected { status, message: self.redact(&message) }
            }
            BackendError::ContextLength { status, prompt_tokens, context_tokens, message } => {
                BackendError::ContextLength { status, prompt_tokens, context_tokens, message: self.redact(&message) }
            }
            BackendError::Auth { status, message } => BackendError::Auth { status, message: self.redact(&message) },
            BackendError::Overloaded(m) => BackendError::Overloaded(self.redact(&m)),
            BackendError::Connection(m) => BackendError::Connection(self.redact(&m)),
            BackendError::Protocol(m) => BackendError::Protocol(self.redact(&m)),
            BackendError::Config(m) => BackendError::Config(self.redact(&m)),
            other @ (BackendError::RateLimited { .. } | BackendError::Timeout { .. }) => other,
        }
    }
}

/// The error text with its causes ("error sending request: connection refused"), without the URL.
pub fn error_chain(err: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut text = strip_url(err);
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn strip_url(err: &reqwest::Error) -> String {
    // reqwest prints "... for url (<url>)"; the URL can carry a query with credentials.
    let text = err.to_string();
    match text.find(" for url (") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// A reqwest body read into one buffer, within `limit` bytes and `idle` between pieces: reqwest's
/// own `bytes()` has no bound. A body that arrives in one piece is returned without a copy.
pub async fn limited_body(
    mut response: reqwest::Response,
    limit: usize,
    idle: Option<Duration>,
) -> Result<Bytes, BodyError> {
    let announced = response.content_length().unwrap_or(0);
    if announced > limit as u64 {
        return Err(BodyError::TooLarge(TooLarge { what: "the response body", limit }));
    }
    let mut first: Option<Bytes> = None;
    let mut out = bytes::BytesMut::new();
    loop {
        let piece = match idle {
            None => response.chunk().await,
            Some(after) => tokio::time::timeout(after, response.chunk()).await.map_err(|_| BodyError::Idle(after))?,
        }
        .map_err(BodyError::Transport)?;
        let Some(piece) = piece else { break };
        let have = first.as_ref().map_or(out.len(), Bytes::len);
        if have.saturating_add(piece.len()) > limit {
            return Err(BodyError::TooLarge(TooLarge { what: "the response body", limit }));
        }
        match first.take() {
            None if out.is_empty() => first = Some(piece),
            None => out.extend_from_slice(&piece),
            Some(head) => {
                // Announced sizes are within `limit`: the one buffer is sized once.
                out.reserve((announced as usize).max(head.len().saturating_add(piece.len())));
                out.extend_from_slice(&head);
                out.extend_from_slice(&piece);
            }
        }
    }
    Ok(first.unwrap_or_else(|| out.freeze()))
}

/// Why [`limited_body`] failed.
#[derive(Debug)]
pub enum BodyError {
    Transport(reqwest::Error),
    TooLarge(TooLarge),
    Idle(Duration),
}

impl BodyError {
    /// As a [`BackendError`]; a transport failure without the URL (which can carry a query).
    #[cold]
    pub fn into_backend(self) -> BackendError {
        match self {
            Self::Transport(e) => BackendError::Connection(error_chain(&e)),
            Self::TooLarge(e) => e.into(),
            Self::Idle(after) => BackendError::Timeout { which: TimeoutKind::Idle, after },
        }
    }
}

/// A 3xx answer: redirects are not followed for API calls (a credential would travel with the
/// request), so the error says where the server pointed, by host only.
#[cold]
pub fn redirect_error(status: u16, location: Option<&str>) -> BackendError {
    let target = match location.map(|l| (l, reqwest::Url::parse(l))) {
        Some((_, Ok(url))) => format!("to host {}", url.host_str().unwrap_or("(none)")),
        Some((l, Err(_))) if l.starts_with('/') => "to a path on the same host".to_owned(),
        Some(_) => "to an unparsable Location".to_owned(),
        None => "without a Location".to_owned(),
    };
    BackendError::Rejected {
        status,
        message: format!("the server redirected {target}; redirects are not followed for API calls"),
    }
}

/// Maps an HTTP error status onto a [`BackendError`].
///
/// 503 with a `Retry-After` is reported as `RateLimited` (status 503) so the delay the server asked
/// for reaches the scheduler; without one it is `Overloaded`.
pub fn status_error(status: u16, retry_after: Option<&str>, body: &[u8], now: SystemTime) -> BackendError {
    let retry_after = retry_after.and_then(|v| parse_retry_after(v, now));
    match status {
        429 => BackendError::RateLimited { status, retry_after },
        503 if retry_after.is_some() => BackendError::RateLimited { status, retry_after },
        503 => BackendError::Overloaded(body_message(body, status)),
        401 | 403 => BackendError::Auth { status, message: body_message(body, status) },
        500..=599 => BackendError::Server { status, message: body_message(body, status) },
        _ => {
            let code = memchr::memmem::find(body, b"context_length_exceeded").map(|_| "context_length_exceeded");
            BackendError::rejected_with_code(status, body_message(body, status), code)
        }
    }
}

/// The human part of an error body: `error.message`, `message`, `detail` or `error` (as servers
/// variously put it), else the body text; clipped to [`MAX_ERROR_MESSAGE`] characters.
pub fn body_message(body: &[u8], status: u16) -> String {
    let text = String::from_utf8_lossy(body);
    let from_json = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        let pick = |v: &Value| -> Option<String> {
            match v {
                Value::String(s) => Some(s.clone()),
                Value::Null => None,
                other => Some(other.to_string()),
            }
        };
        v.get("error")
            .and_then(|e| e.get("message").and_then(pick).or_else(|| e.as_str().map(str::to_owned)))
            .or_else(|| v.get("message").and_then(pick))
            .or_else(|| v.get("detail").and_then(pick))
    });
    let message = from_json.unwrap_or_else(|| text.trim().to_owned());
    if message.is_empty() {
        return format!("HTTP {status} with an empty body");
    }
    clip_chars(&message, MAX_ERROR_MESSAGE)
}

fn clip_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn user_headers_are_checked_without_showing_their_value() {
        assert!(check_header("X-Team", "evals\tone").is_ok());
        let err = check_header("X-Key", "sk-secret\r\nX-Injected: 1").unwrap_err();
        assert!(err.contains("X-Key") && !err.contains("sk-secret"), "{err}");
        assert!(check_header("X Key", "v").is_err());
        assert!(check_header("transfer-encoding", "chunked").is_err());
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn retry_after_seconds_and_http_date() {
        assert_eq!(parse_retry_after("7", at(0)), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("0.5", at(0)), Some(Duration::from_millis(500)));
        // 784111777 = Sun, 06 Nov 1994 08:49:37 GMT (the RFC's example date).
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        assert_eq!(parse_retry_after(date, at(784_111_777 - 30)), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after(date, at(784_111_777 + 30)), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", at(0)), None);
    }

    #[test]
    fn statuses_map_to_kinds() {
        let now = at(0);
        assert_eq!(
            status_error(429, Some("2"), b"", now),
            BackendError::RateLimited { status: 429, retry_after: Some(Duration::from_secs(2)) }
        );
        assert!(matches!(status_error(503, None, b"busy", now), BackendError::Overloaded(m) if m == "busy"));
        assert!(matches!(status_error(503, Some("1"), b"", now), BackendError::RateLimited { status: 503, .. }));
        assert!(matches!(status_error(502, None, b"", now), BackendError::Server { status: 502, .. }));
        assert!(matches!(status_error(401, None, b"", now), BackendError::Auth { status: 401, .. }));
        let rejected = status_error(400, None, br#"{"error":{"message":"max_tokens too large"}}"#, now);
        assert_eq!(rejected, BackendError::Rejected { status: 400, message: "max_tokens too large".into() });
        assert!(!rejected.retryable());
    }

    #[test]
    fn body_messages_in_the_shapes_servers_use() {
        assert_eq!(body_message(br#"{"error":"model not found"}"#, 404), "model not found");
        assert_eq!(body_message(br#"{"detail":"Not Found"}"#, 404), "Not Found");
        assert_eq!(body_message(br#"{"message":"m","code":1}"#, 400), "m");
        assert_eq!(body_message(b"", 400), "HTTP 400 with an empty body");
        let long = "\u{e9}".repeat(2000);
        let clipped = body_message(long.as_bytes(), 400);
        assert_eq!(clipped.chars().count(), MAX_ERROR_MESSAGE + 3);
    }

    #[test]
    fn key_never_shows_in_debug_or_errors() {
        let options = BackendOptions { api_key: Some("sk-secret".into()), ..BackendOptions::default() };
        let client =
            HttpClient::new("http://127.0.0.1:1", &options, Some(Secret::new("sk-secret")), AuthStyle::Bearer).unwrap();
        assert!(!format!("{client:?}").contains("sk-secret"));
        let err = client.redact_error(BackendError::Auth { status: 401, message: "bad key sk-secret".into() });
        assert!(!err.to_string().contains("sk-secret"));
    }
}
