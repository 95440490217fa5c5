//! A lean HTTP/1.1 client for plain-`http://` servers (vLLM, SGLang, Ollama, llama.cpp, the
//! simulator, on the local network).
//!
//! The task making a call owns the connection while the call is in flight: no connection task and
//! no channel between it and the caller, one `write` per request and as few reads as the server
//! makes writes. Finished connections go back to a LIFO pool (the most recently used one is the
//! least likely to have been closed by the server). Measured against reqwest on the same calls,
//! the HTTP layer's share of the client's CPU per call dropped by more than half; reqwest stays for
//! `https://`, proxies and everything else.
//!
//! Framing follows RFC 9112: interim 1xx answers are skipped, no body for 204/304, chunked
//! transfer coding before `Content-Length`, and read-until-close otherwise. A pooled connection the
//! server closed while idle is noticed when taken (its socket reads as closed) or, failing that,
//! when the request gets no answer byte at all; then the request goes once more on a new connection.
//!
//! Redirects are never followed (a 3xx is handed up like any other status). A body longer than
//! `max_response_bytes` (announced or actually sent) is an error, and so is a read that waits
//! longer than the idle timeout.

#![warn(clippy::arithmetic_side_effects)]

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::limits::{TooLarge, DEFAULT_MAX_RESPONSE_BYTES};

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most headers in a response head.
const MAX_HEADERS: usize = 64;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 4096;
/// Idle connections kept per server; more than the number of calls ever in flight at once.
const MAX_IDLE: usize = 1024;
/// An idle connection older than this is closed rather than reused (servers close theirs after
/// 5 to 75 s; uvicorn, which serves vLLM, after 5).
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
const READ_SIZE: usize = 16 * 1024;

/// Why a call failed below HTTP status level.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the server closed the connection before answering")]
    ClosedBeforeAnswer,
    #[error("the server closed the connection before the end of the body")]
    Truncated,
    #[error("invalid HTTP response: {0}")]
    Protocol(String),
    #[error("{0}")]
    TooLarge(TooLarge),
    #[error("no byte from the server for {0:?}")]
    IdleTimeout(Duration),
    #[error("header {0} has a value with a control character; the request was not sent")]
    InvalidHeader(String),
}

/// A server's address, the `Host` header and the headers sent with every request.
pub struct H1Client {
    host: String,
    port: u16,
    /// `Host`, `User-Agent`, auth and extra headers, each line ending in CRLF. Holds the API key:
    /// never printed.
    fixed_headers: Vec<u8>,
    connect_timeout: Duration,
    /// Most body bytes read for one response.
    max_body: u64,
    /// Longest wait for the next bytes of a body; `None`: no limit.
    read_timeout: Option<Duration>,
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    stream: TcpStream,
    since: Instant,
}

impl H1Client {
    /// `host` as it appears in the URL (an IPv6 literal without brackets), `authority` as the
    /// `Host` header carries it, `headers` the name-value pairs added to every request.
    pub fn new<'a>(
        host: &str,
        port: u16,
        authority: &str,
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        connect_timeout: Duration,
    ) -> Self {
        let mut fixed_headers = Vec::with_capacity(256);
        push_header(&mut fixed_headers, "Host", authority.as_bytes());
        push_header(&mut fixed_headers, "User-Agent", concat!("batchagent/", env!("CARGO_PKG_VERSION")).as_bytes());
        for (name, value) in headers {
            push_header(&mut fixed_headers, name, value);
        }
        Self {
            host: host.to_owned(),
            port,
            fixed_headers,
            connect_timeout,
            max_body: DEFAULT_MAX_RESPONSE_BYTES as u64,
            read_timeout: None,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Bounds every response body to `max_body` bytes and every wait for body bytes to
    /// `read_timeout` (`max_response_bytes` and `idle_timeout`).
    #[must_use]
    pub fn with_limits(mut self, max_body: usize, read_timeout: Option<Duration>) -> Self {
        self.max_body = max_body as u64;
        self.read_timeout = read_timeout;
        self
    }

    /// POSTs `body` (JSON) to `path` with `headers` besides the fixed ones, and reads the answer's
    /// head. The body is read from the returned [`H1Response`].
    pub async fn post(
        self: &Arc<Self>,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<H1Response, H1Error> {
        if let Some((name, _)) = headers.iter().find(|(_, value)| !super::http::is_field_value(value.as_bytes())) {
            return Err(H1Error::InvalidHeader((*name).to_owned()));
        }
        let size = self.fixed_headers.len().saturating_add(path.len()).saturating_add(body.len()).saturating_add(128);
        let mut request = Vec::with_capacity(size);
        request.extend_from_slice(b"POST ");
        request.extend_from_slice(path.as_bytes());
        request.extend_from_slice(b" HTTP/1.1\r\n");
        request.extend_from_slice(&self.fixed_headers);
        request.extend_from_slice(b"Content-Type: application/json\r\nContent-Length: ");
        request.extend_from_slice(body.len().to_string().as_bytes());
        request.extend_from_slice(b"\r\n");
        for (name, value) in headers {
            push_header(&mut request, name, value.as_bytes());
        }
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(body);
        loop {
            let (mut stream, reused) = match self.take_idle() {
                Some(stream) => (stream, true),
                None => (self.connect().await?, false),
            };
            let mut buf = BytesMut::with_capacity(READ_SIZE);
            let outcome = match stream.write_all(&request).await {
                Ok(()) => read_head(&mut stream, &mut buf).await,
                Err(e) => Err(HeadError { error: e.into(), answered: false }),
            };
            match outcome {
                Ok(head) => return Ok(H1Response::new(head, stream, buf, self.clone())),
                // A reused connection that the server had closed: nothing was processed, send again.
                Err(HeadError { answered: false, .. }) if reused => {}
                Err(HeadError { error, .. }) => return Err(error),
            }
        }
    }

    async fn connect(&self) -> Result<TcpStream, H1Error> {
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        let stream = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| H1Error::ConnectTimeout(self.connect_timeout))?
            .map_err(H1Error::Connect)?;
        stream.set_nodelay(true).map_err(H1Error::Connect)?;
        Ok(stream)
    }

    /// The most recently returned live connection, if any.
    fn take_idle(&self) -> Option<TcpStream> {
        loop {
            let idle = self.idle.lock().ok()?.pop()?;
            if idle.since.elapsed() > IDLE_TIMEOUT {
                // Everything under it in the stack is older still.
                if let Ok(mut all) = self.idle.lock() {
                    all.clear();
                }
                return None;
            }
            // A readable idle socket is one the server closed (or wrote to uninvited): either way
            // it cannot carry a request. `try_read` asks the readiness the runtime already knows
            // about, so a quiet socket costs no system call here.
            let mut probe = [0u8; 1];
            match idle.stream.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(idle.stream),
                _ => {}
            }
        }
    }

    fn put_idle(&self, stream: TcpStream) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < MAX_IDLE {
                idle.push(Idle { stream, since: Instant::now() });
            }
        }
    }

    /// Idle connections now in the pool.
    pub fn idle_connections(&self) -> usize {
        self.idle.lock().map_or(0, |idle| idle.len())
    }
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

struct Head {
    status: u16,
    /// Names in lower case.
    headers: Vec<(String, String)>,
    framing: Framing,
    keep_alive: bool,
}

struct HeadError {
    error: H1Error,
    /// Some of the answer arrived (so the request reached the server).
    answered: bool,
}

async fn read_head(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Head, HeadError> {
    let mut answered = false;
    loop {
        if !buf.is_empty() {
            answered = true;
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut slots);
            let parsed = response
                .parse(buf)
                .map_err(|e| HeadError { error: H1Error::Protocol(e.to_string()), answered: true })?;
            if let httparse::Status::Complete(len) = parsed {
                let status = response.code.unwrap_or(0);
                let version = response.version.unwrap_or(1);
                let headers: Vec<(String, String)> = response
                    .headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect();
                buf.advance(len);
                // Interim answers (100 Continue, 103 Early Hints) precede the real one.
                if (100..200).contains(&status) && status != 101 {
                    continue;
                }
                let head = head_of(status, version, headers).map_err(|error| HeadError { error, answered: true })?;
                return Ok(head);
            }
            if buf.len() >= MAX_HEAD {
                return Err(HeadError {
                    error: H1Error::Protocol(format!("response head longer than {MAX_HEAD} bytes")),
                    answered: true,
                });
            }
        }
        buf.reserve(READ_SIZE);
        match stream.read_buf(buf).await {
            Ok(0) if answered => {
                return Err(HeadError {
                    error: H1Error::Protocol("the connection closed inside the response head".into()),
                    answered,
                })
            }
            Ok(0) => return Err(HeadError { error: H1Error::ClosedBeforeAnswer, answered }),
            Ok(_) => {}
            Err(e) => return Err(HeadError { error: e.into(), answered }),
        }
    }
}

fn head_of(status: u16, version: u8, headers: Vec<(String, String)>) -> Result<Head, H1Error> {
    fn values<'h>(headers: &'h [(String, String)], name: &'static str) -> impl Iterator<Item = &'h str> {
        headers.iter().filter(move |(n, _)| n == name).map(|(_, v)| v.as_str())
    }
    let get = |name: &'static str| values(&headers, name);
    let connection_has =
        |token: &str| get("connection").flat_map(|v| v.split(',')).any(|t| t.trim().eq_ignore_ascii_case(token));
    let mut keep_alive = if version == 0 { connection_has("keep-alive") } else { !connection_has("close") };
    let chunked = get("transfer-encoding")
        .flat_map(|v| v.split(','))
        .last()
        .is_some_and(|coding| coding.trim().eq_ignore_ascii_case("chunked"));
    let framing = if status == 204 || status == 304 {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked(ChunkedDecoder::default())
    } else if let Some(length) = get("content-length").next() {
        let length = length
            .trim()
            .parse::<u64>()
            .map_err(|_| H1Error::Protocol(format!("Content-Length {length:?} is not a number")))?;
        Framing::Length(length)
    } else {
        keep_alive = false;
        Framing::UntilClose
    };
    Ok(Head { status, headers, framing, keep_alive })
}

enum Framing {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
}

/// An answer whose head has been read; its body is read with [`chunk`](Self::chunk).
pub struct H1Response {
    status: u16,
    headers: Vec<(String, String)>,
    framing: Framing,
    keep_alive: bool,
    /// `None` once the body is complete (the connection is back in the pool or closed).
    stream: Option<TcpStream>,
    buf: BytesMut,
    /// Body bytes handed out so far.
    received: u64,
    client: Arc<H1Client>,
}

impl H1Response {
    fn new(head: Head, stream: TcpStream, buf: BytesMut, client: Arc<H1Client>) -> Self {
        let mut response = Self {
            status: head.status,
            headers: head.headers,
            framing: head.framing,
            keep_alive: head.keep_alive,
            stream: Some(stream),
            buf,
            received: 0,
            client,
        };
        if matches!(response.framing, Framing::Length(0)) {
            response.finish();
        }
        response
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    /// The first value of a header; `name` in lower case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The next piece of the body as it arrives; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, H1Error> {
        let piece = self.next_piece().await?;
        if let Some(piece) = &piece {
            self.count(piece.len())?;
        }
        Ok(piece)
    }

    /// Counts body bytes against the limit; a `Content-Length` over it fails before any is read.
    #[inline]
    fn count(&mut self, len: usize) -> Result<(), H1Error> {
        self.received = self.received.saturating_add(len as u64);
        let announced = match self.framing {
            Framing::Length(remaining) => remaining,
            _ => 0,
        };
        if self.received.saturating_add(announced) > self.client.max_body {
            self.stream = None;
            return Err(self.too_large());
        }
        Ok(())
    }

    #[cold]
    fn too_large(&self) -> H1Error {
        H1Error::TooLarge(TooLarge { what: "the response body", limit: self.client.max_body as usize })
    }

    async fn next_piece(&mut self) -> Result<Option<Bytes>, H1Error> {
        loop {
            if self.stream.is_none() {
                return Ok(None);
            }
            match &mut self.framing {
                Framing::Length(remaining) => {
                    if !self.buf.is_empty() {
                        let take = (*remaining).min(self.buf.len() as u64);
                        *remaining = remaining.saturating_sub(take);
                        let data = self.buf.split_to(take as usize).freeze();
                        if *remaining == 0 {
                            self.finish();
                        }
                        return Ok(Some(data));
                    }
                    if self.fill().await? == 0 {
                        return Err(H1Error::Truncated);
                    }
                }
                Framing::Chunked(decoder) => match decoder.decode(&mut self.buf)? {
                    Decoded::Data(data) => return Ok(Some(data)),
                    Decoded::Done => self.finish(),
                    Decoded::NeedMore => {
                        if self.fill().await? == 0 {
                            return Err(H1Error::Truncated);
                        }
                    }
                },
                Framing::UntilClose => {
                    if !self.buf.is_empty() {
                        return Ok(Some(self.buf.split().freeze()));
                    }
                    if self.fill().await? == 0 {
                        self.finish();
                    }
                }
            }
        }
    }

    /// The rest of the body in one piece.
    pub async fn bytes(mut self) -> Result<Bytes, H1Error> {
        if let Framing::Length(remaining) = self.framing {
            if self.received.saturating_add(remaining) > self.client.max_body {
                return Err(self.too_large());
            }
            // One buffer of the announced size (within `max_body`), read into in place: no
            // copying of pieces together, no regrowth.
            let want = usize::try_from(remaining).unwrap_or(usize::MAX);
            self.buf.reserve(want.saturating_sub(self.buf.len()));
            while (self.buf.len() as u64) < remaining {
                if self.fill().await? == 0 {
                    return Err(H1Error::Truncated);
                }
            }
        }
        let mut out = BytesMut::new();
        while let Some(piece) = self.chunk().await? {
            if out.is_empty() && self.stream.is_none() {
                return Ok(piece);
            }
            out.extend_from_slice(&piece);
        }
        Ok(out.freeze())
    }

    async fn fill(&mut self) -> Result<usize, H1Error> {
        let Some(stream) = self.stream.as_mut() else { return Ok(0) };
        let spare = self.buf.capacity().saturating_sub(self.buf.len());
        // A body of known length that fits the spare room is read into it as it is: growing the
        // buffer at its last bytes would copy the whole body into one twice its size.
        let rest_fits = matches!(self.framing, Framing::Length(remaining)
            if remaining.saturating_sub(self.buf.len() as u64) <= spare as u64);
        if spare < READ_SIZE / 4 && !rest_fits {
            self.buf.reserve(READ_SIZE);
        }
        match self.client.read_timeout {
            None => Ok(stream.read_buf(&mut self.buf).await?),
            Some(limit) => {
                if let Ok(read) = tokio::time::timeout(limit, stream.read_buf(&mut self.buf)).await {
                    Ok(read?)
                } else {
                    self.stream = None;
                    Err(H1Error::IdleTimeout(limit))
                }
            }
        }
    }

    /// The body is complete: the connection goes back to the pool if it can carry another call.
    fn finish(&mut self) {
        if let Some(stream) = self.stream.take() {
            // Bytes past the body mean the server and this client disagree on framing.
            if self.keep_alive && self.buf.is_empty() {
                self.client.put_idle(stream);
            }
        }
    }
}

/// Decodes the chunked transfer coding (RFC 9112 7.1) incrementally, without copying the data.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailer,
    Done,
}

/// One step of [`ChunkedDecoder::decode`].
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    NeedMore,
    Done,
}

impl ChunkedDecoder {
    /// Consumes framing from the front of `buf` and returns the next piece of data, or says that
    /// more input is needed, or that the body (trailers included) is complete.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, H1Error> {
        loop {
            match self.state {
                ChunkState::Done => return Ok(Decoded::Done),
                ChunkState::Size => {
                    let Some(line) = take_line(buf)? else { return Ok(Decoded::NeedMore) };
                    let digits = line[..].split(|&b| b == b';').next().unwrap_or_default();
                    let digits = std::str::from_utf8(digits).unwrap_or_default().trim_matches([' ', '\t']);
                    let size = u64::from_str_radix(digits, 16)
                        .ok()
                        .filter(|_| !digits.is_empty() && !digits.starts_with('+'))
                        .ok_or_else(|| {
                            H1Error::Protocol(format!("bad chunk size line {:?}", String::from_utf8_lossy(&line)))
                        })?;
                    self.state = if size == 0 { ChunkState::Trailer } else { ChunkState::Data(size) };
                }
                ChunkState::Data(remaining) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = remaining.min(buf.len() as u64);
                    let left = remaining.saturating_sub(take);
                    self.state = if left == 0 { ChunkState::DataEnd } else { ChunkState::Data(left) };
                    return Ok(Decoded::Data(buf.split_to(take as usize).freeze()));
                }
                ChunkState::DataEnd => {
                    let Some(line) = take_line(buf)? else { return Ok(Decoded::NeedMore) };
                    if !line.is_empty() {
                        return Err(H1Error::Protocol("chunk data longer than its size".into()));
                    }
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailer => {
                    let Some(line) = take_line(buf)? else { return Ok(Decoded::NeedMore) };
                    if line.is_empty() {
                        self.state = ChunkState::Done;
                    }
                }
            }
        }
    }
}

/// A line (without its CRLF or LF) from the front of `buf`, if a whole one is there.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, H1Error> {
    match memchr::memchr(b'\n', buf) {
        Some(end) => {
            // `end` is an index into `buf`: `end + 1` is at most its length.
            let mut line = buf.split_to(end.saturating_add(1));
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end.saturating_sub(1));
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(H1Error::Protocol("chunk framing line too long".into())),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::arithmetic_side_effects)]
    use super::*;

    fn decode_all(input: &[u8], splits: &[usize]) -> Result<(Vec<u8>, bool), H1Error> {
        let mut decoder = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut start = 0;
        let mut cuts: Vec<usize> = splits.iter().map(|&s| s.min(input.len())).collect();
        cuts.sort_unstable();
        cuts.push(input.len());
        for end in cuts {
            buf.extend_from_slice(&input[start..end.max(start)]);
            start = end.max(start);
            loop {
                match decoder.decode(&mut buf)? {
                    Decoded::Data(d) => out.extend_from_slice(&d),
                    Decoded::NeedMore => break,
                    Decoded::Done => return Ok((out, true)),
                }
            }
        }
        Ok((out, false))
    }

    #[test]
    fn chunked_with_extensions_and_trailers() {
        let body = b"4;name=value\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nExpires: never\r\n\r\n";
        let (data, done) = decode_all(body, &[]).unwrap();
        assert!(done);
        assert_eq!(data, b"Wikipedia in\r\n\r\nchunks.");
    }

    #[test]
    fn chunked_rejects_bad_sizes_and_overlong_data() {
        assert!(decode_all(b"zz\r\nab\r\n0\r\n\r\n", &[]).is_err());
        assert!(decode_all(b"\r\nab\r\n0\r\n\r\n", &[]).is_err());
        assert!(decode_all(b"2\r\nabc\r\n0\r\n\r\n", &[]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn chunked_any_split_gives_the_same_body(
            pieces in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..40), 0..8),
            splits in proptest::collection::vec(0usize..400, 0..12),
            lf_only in proptest::bool::ANY,
        ) {
            let eol: &[u8] = if lf_only { b"\n" } else { b"\r\n" };
            let mut wire = Vec::new();
            for p in &pieces {
                wire.extend_from_slice(format!("{:x}", p.len()).as_bytes());
                wire.extend_from_slice(eol);
                wire.extend_from_slice(p);
                wire.extend_from_slice(eol);
            }
            wire.extend_from_slice(b"0");
            wire.extend_from_slice(eol);
            wire.extend_from_slice(eol);
            let (data, done) = decode_all(&wire, &splits).unwrap();
            proptest::prop_assert!(done);
            proptest::prop_assert_eq!(data, pieces.concat());
        }
    }
}
