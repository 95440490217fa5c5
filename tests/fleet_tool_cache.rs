//! `@tool(cache="redis")`'s shared cache against a real `redis-server` started by each test: two
//! caches stand for two workers. An identical call runs once however many workers make it, a
//! waiter takes over the call of a runner that died, and errors are not shared.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use batchagent::fleet::tool_cache::result_key;
use batchagent::fleet::{Connection, RedisToolCache};
use batchagent::tools::{SharedCache, ToolError};
use futures_util::future::BoxFuture;
use tokio::sync::oneshot;

use common::{Redis, HANG};

async fn cache(url: &str, lease: Duration, owner: &str) -> Arc<RedisToolCache> {
    // Retries while the server starts: the first command waits for the port to open.
    Arc::new(RedisToolCache::connect(url, HANG, lease, owner).await.unwrap())
}

type Execute = BoxFuture<'static, Result<Arc<str>, ToolError>>;

fn counted(runs: &Arc<AtomicU64>, value: &'static str) -> Execute {
    let runs = Arc::clone(runs);
    Box::pin(async move {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok(Arc::from(value))
    })
}

/// A `GET` that found nothing: each `BEGIN` of a call not cached yet makes one.
async fn misses(conn: &Connection) -> u64 {
    let info: String = conn.query(redis::cmd("INFO").arg("stats")).await.unwrap();
    info.lines().find_map(|l| l.strip_prefix("keyspace_misses:")).unwrap().trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_calls_on_two_workers_run_once() {
    let redis = Redis::start("once");
    let a = cache(&redis.url, HANG, "a").await;
    let b = cache(&redis.url, HANG, "b").await;
    let conn = a.connection().clone();
    let (started_tx, started) = oneshot::channel::<()>();
    let (release, gate) = oneshot::channel::<()>();
    let slow: Execute = Box::pin(async move {
        let _ = started_tx.send(());
        gate.await.unwrap();
        Ok(Arc::from("notes on x"))
    });
    let args = r#"{"topic":"x"}"#;
    let first = tokio::spawn(a.through("lookup", args, Some(Duration::from_secs(600)), slow));
    tokio::time::timeout(HANG, started).await.unwrap().unwrap();

    // Worker b makes the same call while a runs it: b waits for a's result.
    let b_runs = Arc::new(AtomicU64::new(0));
    let before = misses(&conn).await;
    let second = tokio::spawn(b.through("lookup", args, None, counted(&b_runs, "b's own")));
    tokio::time::timeout(HANG, async {
        while misses(&conn).await == before {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    release.send(()).unwrap();

    let first = tokio::time::timeout(HANG, first).await.unwrap().unwrap();
    let second = tokio::time::timeout(HANG, second).await.unwrap().unwrap();
    assert_eq!((first.outcome.unwrap().as_ref(), first.hit), ("notes on x", false));
    assert_eq!((second.outcome.unwrap().as_ref(), second.hit), ("notes on x", true));
    assert_eq!(b_runs.load(Ordering::SeqCst), 0, "b never ran the call");

    // Stored with its time to live; the marker is gone.
    let key = result_key("lookup", args);
    let ttl: i64 = conn.query(redis::cmd("PTTL").arg(&key)).await.unwrap();
    assert!(ttl > 0 && ttl <= 600_000, "{ttl}");
    let running: bool = conn.query(redis::cmd("EXISTS").arg(format!("{key}:running"))).await.unwrap();
    assert!(!running);

    // A later call anywhere is answered from Redis; other arguments run.
    let later = b.through("lookup", args, None, counted(&b_runs, "b's own")).await;
    assert_eq!((later.outcome.unwrap().as_ref(), later.hit), ("notes on x", true));
    let other = b.through("lookup", r#"{"topic":"y"}"#, None, counted(&b_runs, "notes on y")).await;
    assert_eq!((other.outcome.unwrap().as_ref(), other.hit), ("notes on y", false));
    assert_eq!(b_runs.load(Ordering::SeqCst), 1);
    let ttl: i64 = conn.query(redis::cmd("PTTL").arg(result_key("lookup", r#"{"topic":"y"}"#))).await.unwrap();
    assert_eq!(ttl, -1, "no ttl: kept until Redis evicts it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_runs_the_call_of_a_runner_that_died() {
    let redis = Redis::start("dead");
    let lease = Duration::from_millis(300);
    let a = cache(&redis.url, lease, "a").await;
    let b = cache(&redis.url, lease, "b").await;
    let (started_tx, started) = oneshot::channel::<()>();
    let never: Execute = Box::pin(async move {
        let _ = started_tx.send(());
        std::future::pending().await
    });
    let args = r#"{"topic":"z"}"#;
    let dying = tokio::spawn(a.through("lookup", args, None, never));
    tokio::time::timeout(HANG, started).await.unwrap().unwrap();
    // Worker a dies mid-call: its marker is not renewed any more and runs out with its lease.
    dying.abort();
    drop(a);
    let b_runs = Arc::new(AtomicU64::new(0));
    let answer =
        tokio::time::timeout(HANG, b.through("lookup", args, None, counted(&b_runs, "notes on z"))).await.unwrap();
    assert_eq!((answer.outcome.unwrap().as_ref(), answer.hit), ("notes on z", false));
    assert_eq!(b_runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_call_is_not_shared() {
    let redis = Redis::start("error");
    let a = cache(&redis.url, HANG, "a").await;
    let b = cache(&redis.url, HANG, "b").await;
    let args = r#"{"topic":"w"}"#;
    let failing: Execute =
        Box::pin(async { Err(ToolError::Failed { tool: "lookup".into(), message: "ValueError: no".into() }) });
    let failed = a.through("lookup", args, None, failing).await;
    assert!(failed.outcome.is_err() && !failed.hit);
    let b_runs = Arc::new(AtomicU64::new(0));
    let retried = b.through("lookup", args, None, counted(&b_runs, "notes on w")).await;
    assert_eq!((retried.outcome.unwrap().as_ref(), retried.hit), ("notes on w", false));
    assert_eq!(b_runs.load(Ordering::SeqCst), 1);
}
