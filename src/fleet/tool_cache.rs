//! Tool results shared by every process that uses one Redis (`@tool(cache="redis")`): a call
//! identical to one made by any worker (same tool, same canonical arguments) is answered from
//! Redis, and concurrent identical calls on different workers run once.
//!
//! Keys (under [`PREFIX`]): `tool:NAME:H` holds the result of the call whose canonical arguments
//! hash to `H`; `tool:NAME:H:running` is the marker of the worker running it (`SET NX` with a
//! lease, renewed while the tool runs), so a worker that finds it waits instead of running the
//! call too. The runner stores its success, drops its marker and publishes the key on
//! [`DONE_CHANNEL`], which wakes the waiters; a waiter also looks again every few seconds, so a
//! lost message or a runner that died (its marker expires with its lease) costs time, never a
//! result. Errors are not stored: a waiter whose runner failed claims the call and runs it itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::connection::{Connection, FleetError};
use super::PREFIX;
use crate::tools::{SharedCache, SharedOutcome, ToolError};

/// Where runners announce finished calls (the payload is the result key).
pub const DONE_CHANNEL: &str = "batchagent:tool-done";

/// `KEYS` result, marker; `ARGV` token, lease ms. `{1, result}` from the cache, `{2}` when the
/// caller now holds the marker and runs the call, `{3}` when another caller holds it.
const BEGIN: &str = r"
local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, ''} end
return {3, ''}
";

/// `KEYS` result, marker; `ARGV` token, ok (1/0), result, ttl ms (0: none), channel.
const FINISH: &str = r"
if ARGV[2] == '1' then
  if tonumber(ARGV[4]) > 0 then
    redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  else
    redis.call('SET', KEYS[1], ARGV[3])
  end
end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[5], KEYS[1])
return 0
";

/// `KEYS` marker; `ARGV` token, lease ms. Extends the marker while the caller still holds it.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// The longest a waiter goes without looking at Redis itself (a lost message, a dead runner).
const MAX_RECHECK: Duration = Duration::from_secs(2);

/// The result key of a call.
pub fn result_key(tool: &str, arguments: &str) -> String {
    format!("{PREFIX}tool:{tool}:{:032x}", crate::store::hash128(arguments.as_bytes()))
}

pub struct RedisToolCache {
    inner: Arc<Inner>,
    listener: JoinHandle<()>,
}

struct Inner {
    conn: Connection,
    lease: Duration,
    owner: String,
    next: std::sync::atomic::AtomicU64,
    /// Result key -> the waiters of this process on it.
    waiting: Mutex<HashMap<String, Arc<Notify>>>,
    begin: redis::Script,
    finish: redis::Script,
    renew: redis::Script,
}

enum Begun {
    Hit(String),
    Run,
    Wait,
}

impl RedisToolCache {
    /// Connects to `url` (retrying for `outage`) and subscribes to [`DONE_CHANNEL`]. A runner's
    /// marker lives `lease` unless renewed, so a dead runner's waiters run the call after that.
    /// `owner` names this process in markers (unique in the fleet).
    pub async fn connect(url: &str, outage: Duration, lease: Duration, owner: &str) -> Result<Self, FleetError> {
        let conn = Connection::open(url, outage, Some(Duration::from_secs(30))).await?;
        let client = redis::Client::open(url)
            .map_err(|e| FleetError::Connect { url: crate::secret::display_url(url), message: e.to_string() })?;
        let inner = Arc::new(Inner {
            conn,
            lease: lease.max(Duration::from_millis(100)),
            owner: format!(
                "{owner}:{:x}",
                crate::store::hash128(format!("{:?}", std::time::Instant::now()).as_bytes())
            ),
            next: std::sync::atomic::AtomicU64::new(0),
            waiting: Mutex::default(),
            begin: redis::Script::new(BEGIN),
            finish: redis::Script::new(FINISH),
            renew: redis::Script::new(RENEW),
        });
        let listener = tokio::spawn(listen(client, Arc::downgrade(&inner)));
        Ok(Self { inner, listener })
    }

    pub fn connection(&self) -> &Connection {
        &self.inner.conn
    }
}

impl Drop for RedisToolCache {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Wakes this process's waiters on each finished call; after a lost subscription, every waiter
/// (a message may have been missed), then subscribes again.
async fn listen(client: redis::Client, inner: std::sync::Weak<Inner>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        if let Ok(mut pubsub) = client.get_async_pubsub().await {
            if pubsub.subscribe(DONE_CHANNEL).await.is_ok() {
                backoff = Duration::from_millis(50);
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    let Some(inner) = inner.upgrade() else { return };
                    if let Ok(key) = message.get_payload::<String>() {
                        inner.wake(Some(&key));
                    }
                }
            }
        }
        let Some(strong) = inner.upgrade() else { return };
        strong.wake(None);
        drop(strong);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_RECHECK);
    }
}

impl Inner {
    fn wake(&self, key: Option<&str>) {
        let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        match key {
            Some(key) => {
                if let Some(notify) = waiting.get(key) {
                    notify.notify_waiters();
                }
            }
            None => waiting.values().for_each(|n| n.notify_waiters()),
        }
    }

    fn waiter(&self, key: &str) -> Arc<Notify> {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(waiting.entry(key.to_owned()).or_default())
    }

    fn forget(&self, key: &str, notify: &Arc<Notify>) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        // The map's own reference and this one: nobody else of this process waits on the key.
        if Arc::strong_count(notify) <= 2 {
            waiting.remove(key);
        }
    }

    async fn begin(&self, key: &str, marker: &str, token: &str) -> Result<Begun, FleetError> {
        let mut invocation = self.begin.prepare_invoke();
        invocation.key(key).key(marker).arg(token).arg(self.lease.as_millis() as u64);
        let (state, value): (u8, String) = self.conn.script(&invocation).await?;
        Ok(match state {
            1 => Begun::Hit(value),
            2 => Begun::Run,
            _ => Begun::Wait,
        })
    }

    async fn finish(
        &self,
        key: &str,
        marker: &str,
        token: &str,
        outcome: &Result<Arc<str>, ToolError>,
        ttl: Option<Duration>,
    ) -> Result<(), FleetError> {
        let mut invocation = self.finish.prepare_invoke();
        invocation.key(key).key(marker).arg(token);
        match outcome {
            Ok(value) => invocation.arg("1").arg(value.as_ref()),
            Err(_) => invocation.arg("0").arg(""),
        };
        let ttl_ms = ttl.map_or(0, |t| (t.as_millis() as u64).max(1));
        invocation.arg(ttl_ms).arg(DONE_CHANNEL);
        self.conn.script(&invocation).await
    }

    /// Runs `execute` holding the marker, renewing it every third of the lease.
    async fn run(
        &self,
        marker: &str,
        token: &str,
        execute: BoxFuture<'static, Result<Arc<str>, ToolError>>,
    ) -> Result<Arc<str>, ToolError> {
        let renew = async {
            loop {
                tokio::time::sleep(self.lease / 3).await;
                let mut invocation = self.renew.prepare_invoke();
                invocation.key(marker).arg(token).arg(self.lease.as_millis() as u64);
                // A failed renewal is tried again at the next; if the marker expires meanwhile,
                // another worker may run the call as well, and both store the same kind of result.
                let _: Result<u8, FleetError> = self.conn.script(&invocation).await;
            }
        };
        tokio::select! {
            outcome = execute => outcome,
            () = renew => unreachable_renewal(),
        }
    }

    async fn through(
        self: Arc<Self>,
        tool: String,
        arguments: String,
        ttl: Option<Duration>,
        execute: BoxFuture<'static, Result<Arc<str>, ToolError>>,
    ) -> SharedOutcome {
        let key = result_key(&tool, &arguments);
        let marker = format!("{key}:running");
        let token = format!("{}:{}", self.owner, self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let recheck = (self.lease / 2).min(MAX_RECHECK);
        let notify = self.waiter(&key);
        let answer = loop {
            let notified = notify.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before Redis is asked, so a finish published in between still wakes it.
            notified.as_mut().enable();
            match self.begin(&key, &marker, &token).await {
                Ok(Begun::Hit(value)) => break SharedOutcome { outcome: Ok(Arc::from(value)), hit: true },
                Ok(Begun::Run) => {
                    let outcome = self.run(&marker, &token, execute).await;
                    // A result that cannot be stored is still this call's result.
                    let _ = self.finish(&key, &marker, &token, &outcome, ttl).await;
                    break SharedOutcome { outcome, hit: false };
                }
                Ok(Begun::Wait) => {
                    let _ = tokio::time::timeout(recheck, notified).await;
                }
                // Redis out of reach for longer than the connection waits: the call runs here.
                Err(_) => break SharedOutcome { outcome: execute.await, hit: false },
            }
        };
        self.forget(&key, &notify);
        answer
    }
}

/// The renewal loop never ends by itself.
#[cold]
fn unreachable_renewal() -> Result<Arc<str>, ToolError> {
    Err(ToolError::Failed { tool: String::new(), message: "the marker renewal stopped".into() })
}

impl SharedCache for RedisToolCache {
    fn through(
        &self,
        tool: &str,
        arguments: &str,
        ttl: Option<Duration>,
        execute: BoxFuture<'static, Result<Arc<str>, ToolError>>,
    ) -> BoxFuture<'static, SharedOutcome> {
        Box::pin(Arc::clone(&self.inner).through(tool.to_owned(), arguments.to_owned(), ttl, execute))
    }
}
