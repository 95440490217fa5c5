//! The lean HTTP/1.1 client against a raw TCP server on loopback that answers each request with a
//! scripted byte string: keep-alive reuse, `Connection: close`, a pooled connection the server
//! closed, interim 1xx answers, chunked bodies with trailers, bodies cut short.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use batchagent::backends::h1::{H1Client, H1Error};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the server does after answering.
#[derive(Clone, Copy, PartialEq)]
enum After {
    KeepOpen,
    Close,
}

struct Script {
    answers: Vec<(Vec<u8>, After)>,
    next: AtomicUsize,
    connections: AtomicUsize,
    requests: Mutex<Vec<(String, Vec<u8>)>>,
}

async fn serve(script: Vec<(&[u8], After)>) -> (Arc<Script>, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = Arc::new(Script {
        answers: script.into_iter().map(|(b, a)| (b.to_vec(), a)).collect(),
        next: AtomicUsize::new(0),
        connections: AtomicUsize::new(0),
        requests: Mutex::new(Vec::new()),
    });
    let shared = script.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            shared.connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(connection(stream, shared.clone()));
        }
    });
    (script, port)
}

async fn connection(mut stream: TcpStream, script: Arc<Script>) {
    let mut buf = Vec::new();
    loop {
        let Some((head, body)) = read_request(&mut stream, &mut buf).await else { return };
        script.requests.lock().unwrap().push((head, body));
        let i = script.next.fetch_add(1, Ordering::SeqCst);
        let Some((answer, after)) = script.answers.get(i).cloned() else { return };
        // Written in small pieces, as a server that flushes as it goes would.
        for piece in answer.chunks(7) {
            if stream.write_all(piece).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
        if after == After::Close {
            return;
        }
    }
}

async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end].to_vec()).unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_owned))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < end + 4 + length {
                let mut more = [0u8; 4096];
                let n = stream.read(&mut more).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&more[..n]);
            }
            let body = buf[end + 4..end + 4 + length].to_vec();
            buf.drain(..end + 4 + length);
            return Some((head, body));
        }
        let mut more = [0u8; 4096];
        let n = stream.read(&mut more).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&more[..n]);
    }
}

fn client(port: u16) -> Arc<H1Client> {
    let headers: [(&str, &[u8]); 1] = [("authorization", b"Bearer sk-test")];
    Arc::new(H1Client::new("127.0.0.1", port, &format!("127.0.0.1:{port}"), headers, Duration::from_secs(2)))
}

async fn body_of(client: &Arc<H1Client>, path: &str) -> Result<(u16, Vec<u8>), H1Error> {
    let response = client.post(path, &[("x-request-id", "r-1")], br#"{"a":1}"#).await?;
    let status = response.status();
    Ok((status, response.bytes().await?.to_vec()))
}

const OK_LENGTH: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";

#[tokio::test]
async fn keep_alive_reuses_one_connection_and_sends_the_headers() {
    let (script, port) = serve(vec![(OK_LENGTH, After::KeepOpen), (OK_LENGTH, After::KeepOpen)]).await;
    let client = client(port);
    for _ in 0..2 {
        assert_eq!(body_of(&client, "/v1/chat/completions").await.unwrap(), (200, b"{\"ok\":true}".to_vec()));
    }
    assert_eq!(script.connections.load(Ordering::SeqCst), 1);
    assert_eq!(client.idle_connections(), 1);
    let requests = script.requests.lock().unwrap();
    let (head, body) = &requests[0];
    assert!(head.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"), "{head}");
    for line in [
        format!("Host: 127.0.0.1:{port}"),
        "authorization: Bearer sk-test".into(),
        "Content-Type: application/json".into(),
        "Content-Length: 7".into(),
        "x-request-id: r-1".into(),
    ] {
        assert!(head.lines().any(|l| l == line), "{line:?} missing from\n{head}");
    }
    assert_eq!(body, br#"{"a":1}"#);
}

#[tokio::test]
async fn connection_close_and_read_until_close_are_not_reused() {
    let close = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi";
    let until_close = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it";
    let (script, port) = serve(vec![(close, After::Close), (until_close, After::Close)]).await;
    let client = client(port);
    assert_eq!(body_of(&client, "/a").await.unwrap().1, b"hi");
    assert_eq!(body_of(&client, "/b").await.unwrap().1, b"all of it");
    assert_eq!(script.connections.load(Ordering::SeqCst), 2);
    assert_eq!(client.idle_connections(), 0);
}

#[tokio::test]
async fn a_pooled_connection_the_server_closed_is_replaced() {
    // The server answers keep-alive, then closes the connection anyway (as at its idle timeout).
    let (script, port) = serve(vec![(OK_LENGTH, After::Close), (OK_LENGTH, After::KeepOpen)]).await;
    let client = client(port);
    assert_eq!(body_of(&client, "/").await.unwrap().0, 200);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(body_of(&client, "/").await.unwrap().0, 200);
    assert_eq!(script.connections.load(Ordering::SeqCst), 2);
    assert_eq!(script.requests.lock().unwrap().len(), 2, "the request reached the server exactly once");
}

#[tokio::test]
async fn interim_answers_chunked_trailers_and_empty_bodies() {
    let chunked = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: yes\r\n\r\n";
    let empty = b"HTTP/1.1 204 No Content\r\n\r\n";
    let (script, port) = serve(vec![(chunked, After::KeepOpen), (empty, After::KeepOpen)]).await;
    let client = client(port);
    assert_eq!(body_of(&client, "/").await.unwrap(), (200, b"hello world".to_vec()));
    assert_eq!(body_of(&client, "/").await.unwrap(), (204, Vec::new()));
    assert_eq!(script.connections.load(Ordering::SeqCst), 1, "both framings leave the connection reusable");
}

#[tokio::test]
async fn streamed_pieces_arrive_as_they_come() {
    let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n";
    let (_script, port) = serve(vec![(chunked, After::KeepOpen)]).await;
    let client = client(port);
    let mut response = client.post("/", &[], b"{}").await.unwrap();
    let mut pieces = Vec::new();
    while let Some(piece) = response.chunk().await.unwrap() {
        pieces.push(piece);
    }
    assert_eq!(pieces.concat(), b"abcdef");
    assert!(pieces.len() >= 2, "chunks are handed on one by one: {pieces:?}");
}

#[tokio::test]
async fn bodies_cut_short_and_garbage_are_errors() {
    let short = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this";
    let cut_chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10\r\nabc";
    let garbage = b"SMTP ready\r\n\r\n";
    // A length no memory could hold: refused by the size limit before anything is allocated.
    let absurd = b"HTTP/1.1 200 OK\r\ncontent-length: 999999999999\r\n\r\nabc";
    let (_script, port) = serve(vec![
        (short, After::Close),
        (cut_chunked, After::Close),
        (garbage, After::Close),
        (absurd, After::Close),
    ])
    .await;
    let client = client(port);
    assert!(matches!(body_of(&client, "/").await, Err(H1Error::Truncated)));
    assert!(matches!(body_of(&client, "/").await, Err(H1Error::Truncated)));
    assert!(matches!(body_of(&client, "/").await, Err(H1Error::Protocol(_))));
    assert!(matches!(body_of(&client, "/").await, Err(H1Error::TooLarge(_))));
}

#[tokio::test]
async fn refused_connections_fail_without_resending_forever() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    assert!(matches!(body_of(&client(port), "/").await, Err(H1Error::Connect(_))));
}

#[tokio::test]
async fn a_header_value_with_a_line_break_is_never_written() {
    let (script, port) = serve(vec![(OK_LENGTH, After::KeepOpen)]).await;
    let client = client(port);
    for value in ["r-1\r\nX-Injected: yes", "r-1\nX", "r\0", "r\x7f"] {
        let err = client.post("/v1/chat/completions", &[("x-request-id", value)], b"{}").await.err();
        assert!(matches!(&err, Some(H1Error::InvalidHeader(name)) if name == "x-request-id"), "{value:?}: {err:?}");
    }
    assert_eq!(script.connections.load(Ordering::SeqCst), 0, "nothing may be sent");
    // A tab and non-ASCII text are valid field content.
    assert_eq!(
        client.post("/v1/chat/completions", &[("x-request-id", "r\t\u{e9}")], b"{}").await.map(|r| r.status()).ok(),
        Some(200)
    );
}
