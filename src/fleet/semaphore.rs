//! A fleet-wide limit on model calls in flight to one backend: a Redis sorted set of leases
//! (holder token -> expiry in Redis's own clock). A worker that dies mid-call holds its places
//! only until their leases run out; a live worker renews the leases of its calls with its
//! heartbeat, so a long call keeps its place.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use super::connection::{Connection, FleetError};
use super::PREFIX;
use crate::backends::{Backend, Capabilities, ChatRequest};
use crate::conversation::{BackendError, ChatResponse, StreamEvent};

/// `KEYS[1]` the set; `ARGV` token, limit, lease ms. Expired leases are dropped first.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  return 1
end
return 0
";

/// `KEYS[1]` the set; `ARGV` lease ms, then the tokens whose leases are extended (if still held).
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
end
return 0
";

/// Waits between two tries for a place, doubling up to the maximum.
const MIN_WAIT: Duration = Duration::from_millis(2);
const MAX_WAIT: Duration = Duration::from_millis(50);

pub struct FleetSemaphore {
    conn: Connection,
    key: String,
    limit: usize,
    lease: Duration,
    owner: String,
    next: AtomicU64,
    held: Mutex<HashSet<String>>,
    acquire: redis::Script,
    renew: redis::Script,
}

impl FleetSemaphore {
    /// `name` identifies what is limited (an endpoint); `owner` the worker, unique in the fleet.
    pub fn new(conn: Connection, name: &str, limit: usize, lease: Duration, owner: &str) -> Self {
        Self {
            conn,
            key: format!("{PREFIX}limit:{name}"),
            limit: limit.max(1),
            lease,
            owner: owner.to_owned(),
            next: AtomicU64::new(0),
            held: Mutex::default(),
            acquire: redis::Script::new(ACQUIRE),
            renew: redis::Script::new(RENEW),
        }
    }

    /// Waits for a place; returns its token (give it to [`Self::release`]).
    pub async fn acquire(&self) -> Result<String, FleetError> {
        let token = format!("{}:{}", self.owner, self.next.fetch_add(1, Relaxed));
        let lease_ms = self.lease.as_millis() as u64;
        let mut wait = MIN_WAIT;
        loop {
            let mut invocation = self.acquire.prepare_invoke();
            invocation.key(&self.key).arg(&token).arg(self.limit).arg(lease_ms);
            let got: u8 = self.conn.script(&invocation).await?;
            if got == 1 {
                if let Ok(mut held) = self.held.lock() {
                    held.insert(token.clone());
                }
                return Ok(token);
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(MAX_WAIT);
        }
    }

    pub async fn release(&self, token: &str) -> Result<(), FleetError> {
        if let Ok(mut held) = self.held.lock() {
            held.remove(token);
        }
        self.conn.query(redis::cmd("ZREM").arg(&self.key).arg(token)).await
    }

    /// Extends the leases of the places this process holds.
    pub async fn renew(&self) -> Result<(), FleetError> {
        let tokens: Vec<String> = self.held.lock().map(|h| h.iter().cloned().collect()).unwrap_or_default();
        if tokens.is_empty() {
            return Ok(());
        }
        let mut invocation = self.renew.prepare_invoke();
        invocation.key(&self.key).arg(self.lease.as_millis() as u64).arg(&tokens);
        self.conn.script(&invocation).await
    }

    /// Places taken now, fleet-wide (expired leases included until the next acquire drops them).
    pub async fn in_use(&self) -> Result<usize, FleetError> {
        self.conn.query(redis::cmd("ZCARD").arg(&self.key)).await
    }
}

/// A place held by a call in progress; once dropped its lease is not renewed any more.
struct Unrenewed<'a>(&'a FleetSemaphore, String);

impl Drop for Unrenewed<'_> {
    fn drop(&mut self) {
        if let Ok(mut held) = self.0.held.lock() {
            held.remove(&self.1);
        }
    }
}

/// A backend whose model calls each hold a place of a [`FleetSemaphore`].
pub struct SharedLimit {
    pub inner: Arc<dyn Backend>,
    pub semaphore: Arc<FleetSemaphore>,
}

impl Backend for SharedLimit {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn endpoint_stats(&self) -> Option<serde_json::Value> {
        self.inner.endpoint_stats()
    }

    fn batch_stats(&self) -> Option<serde_json::Value> {
        self.inner.batch_stats()
    }

    fn chat(
        &self,
        request: ChatRequest,
        events: Option<mpsc::UnboundedSender<StreamEvent>>,
    ) -> BoxFuture<'_, Result<ChatResponse, BackendError>> {
        Box::pin(async move {
            let token = self
                .semaphore
                .acquire()
                .await
                .map_err(|e| BackendError::Connection(format!("fleet-wide limit: {e}")))?;
            // Dropped with a cancelled call: its lease is no longer renewed and runs out.
            let place = Unrenewed(&self.semaphore, token);
            let response = self.inner.chat(request, events).await;
            // A release lost to an outage frees the place when its lease runs out.
            let _ = self.semaphore.release(&place.1).await;
            response
        })
    }
}
