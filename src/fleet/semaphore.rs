//! A fleet-wide limit on model calls in flight to one backend: a Redis sorted set of leases
//! (holder token -> expiry in Redis's own clock). A worker that dies mid-call holds its places
//! only until their leases run out; a live worker renews the leases of its calls with its
//! heartbeat, so a long call keeps its place.
//!
//! Waiting blocks instead of polling. A worker whose call finds every place taken registers as
//! waiting (a member of a set that expires unless refreshed) and one task of that worker blocks in
//! `BLPOP` on the limit's list of handed-over places for all of its waiting calls. While anyone is
//! registered, a release does not free its place but hands it over: the lease is renewed and its
//! token pushed onto the list, where Redis gives it to the longest-blocked waiter; the next holder
//! takes the token as its own. So a contended call costs one release and one `BLPOP`, whatever the
//! number of workers, where polling cost a try per wake-up of every waiter.
//!
//! What a kill -9 leaves behind stays safe: a dead holder's leases run out (the waiters' `BLPOP`
//! times out by the earliest expiry and tries again, which drops expired leases, and their tokens
//! from the list with them); a dead waiter's registration expires, and a place handed to it is
//! either still on the list, where the next acquire that finds the limit full takes it, or was
//! popped, and its lease runs out.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use super::connection::{Connection, FleetError};
use super::PREFIX;
use crate::backends::{Backend, Capabilities, ChatRequest};
use crate::conversation::{BackendError, ChatResponse, StreamEvent};

/// `KEYS` the leases, the list of handed-over places, the waiters; `ARGV` token, limit, lease ms,
/// waiter member (empty: do not register), registration ms. Expired leases are dropped first, with
/// their tokens on the list. Returns `{1, token held, 0}`, or `{0, '', ms until the earliest lease
/// runs out}`.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, gone in ipairs(expired) do
  redis.call('ZREM', KEYS[1], gone)
  redis.call('LREM', KEYS[2], 0, gone)
end
local lease = now + tonumber(ARGV[3])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], lease, ARGV[1])
  return {1, ARGV[1], 0}
end
local handed = redis.call('LPOP', KEYS[2])
if handed then
  redis.call('ZADD', KEYS[1], 'XX', lease, handed)
  return {1, handed, 0}
end
if ARGV[4] ~= '' then
  redis.call('SADD', KEYS[3], ARGV[4])
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, '', math.max(tonumber(first[2]) - now, 0)}
";

/// `KEYS` the leases, the list, the waiters; `ARGV` token, lease ms. With waiters registered a
/// place still held is handed over (lease renewed, token pushed), otherwise freed.
const RELEASE: &str = r"
if redis.call('EXISTS', KEYS[3]) == 1 and redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 2
end
return redis.call('ZREM', KEYS[1], ARGV[1])
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

/// The longest `BLPOP`: a waiter tries again at least this often, so a place freed without a
/// hand-over (a lease run out, a registration lost with a Redis restart) is found this late at most.
const MAX_BLOCK: Duration = Duration::from_secs(1);
/// The shortest `BLPOP` (Redis takes no timeout below a millisecond; zero would block for ever).
const MIN_BLOCK: Duration = Duration::from_millis(5);
/// A registration as waiter lasts this long unless refreshed; refreshed every [`MAX_BLOCK`].
const REGISTRATION: Duration = Duration::from_secs(5);

type Grant = oneshot::Sender<Result<String, FleetError>>;

pub struct FleetSemaphore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Connection,
    /// For `BLPOP` only: a blocked command holds up every later one on its connection.
    waits: Connection,
    key: String,
    handed: String,
    waiters: String,
    limit: usize,
    lease: Duration,
    owner: String,
    next: AtomicU64,
    held: Mutex<HashSet<String>>,
    queue: Mutex<Queue>,
    acquire: redis::Script,
    release: redis::Script,
    renew: redis::Script,
}

/// Calls of this process waiting for a place, in arrival order, and whether the task that waits
/// for them in Redis runs.
#[derive(Default)]
struct Queue {
    waiting: VecDeque<Grant>,
    task: bool,
    episodes: u64,
}

enum Try {
    Held(String),
    Full(Duration),
}

impl FleetSemaphore {
    /// `name` identifies what is limited (an endpoint); `owner` the worker, unique in the fleet.
    /// `waits` is a connection for blocking reads only (opened without a response timeout).
    pub fn new(conn: Connection, waits: Connection, name: &str, limit: usize, lease: Duration, owner: &str) -> Self {
        let key = format!("{PREFIX}limit:{name}");
        Self {
            inner: Arc::new(Inner {
                conn,
                waits,
                handed: format!("{key}:handed"),
                waiters: format!("{key}:waiters"),
                key,
                limit: limit.max(1),
                lease,
                owner: owner.to_owned(),
                next: AtomicU64::new(0),
                held: Mutex::default(),
                queue: Mutex::default(),
                acquire: redis::Script::new(ACQUIRE),
                release: redis::Script::new(RELEASE),
                renew: redis::Script::new(RENEW),
            }),
        }
    }

    /// Waits for a place; returns its token (give it to [`Self::release`]).
    pub async fn acquire(&self) -> Result<String, FleetError> {
        let inner = &self.inner;
        // Calls already waiting here go first; otherwise one try, and a wait in line if it fails.
        if !inner.lock_queue().waiting.iter().any(|w| !w.is_closed()) {
            if let Try::Held(token) = inner.attempt("").await? {
                inner.hold(&token);
                return Ok(token);
            }
        }
        let (grant, granted) = oneshot::channel();
        {
            let mut queue = inner.lock_queue();
            queue.waiting.push_back(grant);
            if !queue.task {
                queue.task = true;
                queue.episodes += 1;
                let member = format!("{}:{}", inner.owner, queue.episodes);
                tokio::spawn(Arc::clone(inner).wait_in_line(member));
            }
        }
        let token =
            granted.await.map_err(|_| FleetError::Protocol("the fleet-wide limit stopped waiting".to_owned()))??;
        inner.hold(&token);
        Ok(token)
    }

    pub async fn release(&self, token: &str) -> Result<(), FleetError> {
        self.inner.unhold(token);
        self.inner.release(token).await
    }

    /// Extends the leases of the places this process holds.
    pub async fn renew(&self) -> Result<(), FleetError> {
        let inner = &self.inner;
        let tokens: Vec<String> = inner.held.lock().map(|h| h.iter().cloned().collect()).unwrap_or_default();
        if tokens.is_empty() {
            return Ok(());
        }
        let mut invocation = inner.renew.prepare_invoke();
        invocation.key(&inner.key).arg(inner.lease.as_millis() as u64).arg(&tokens);
        inner.conn.script(&invocation).await
    }

    /// Places taken now, fleet-wide (expired leases included until the next acquire drops them,
    /// places handed over included until their next holder takes them).
    pub async fn in_use(&self) -> Result<usize, FleetError> {
        self.inner.conn.query(redis::cmd("ZCARD").arg(&self.inner.key)).await
    }
}

impl Inner {
    // Only queue operations happen under the lock: a poisoned one still holds a consistent queue.
    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn hold(&self, token: &str) {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).insert(token.to_owned());
    }

    fn unhold(&self, token: &str) {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).remove(token);
    }

    /// One try for a place; `member` registers this process as waiting if none is free.
    async fn attempt(&self, member: &str) -> Result<Try, FleetError> {
        let token = format!("{}:{}", self.owner, self.next.fetch_add(1, Relaxed));
        let mut invocation = self.acquire.prepare_invoke();
        invocation
            .key(&self.key)
            .key(&self.handed)
            .key(&self.waiters)
            .arg(&token)
            .arg(self.limit)
            .arg(self.lease.as_millis() as u64)
            .arg(member)
            .arg(REGISTRATION.as_millis() as u64);
        let (got, token, wait_ms): (u8, String, u64) = self.conn.script(&invocation).await?;
        Ok(if got == 1 { Try::Held(token) } else { Try::Full(Duration::from_millis(wait_ms)) })
    }

    async fn release(&self, token: &str) -> Result<(), FleetError> {
        let mut invocation = self.release.prepare_invoke();
        invocation.key(&self.key).key(&self.handed).key(&self.waiters).arg(token).arg(self.lease.as_millis() as u64);
        self.conn.script::<u8>(&invocation).await.map(drop)
    }

    /// Gives a place to the first call still waiting; a place nobody here waits for any more is
    /// released (and so handed to another worker, or freed).
    async fn deliver(&self, token: String) -> Result<(), FleetError> {
        let mut token = token;
        loop {
            let grant = self.lock_queue().waiting.pop_front();
            let Some(grant) = grant else { return self.release(&token).await };
            // The call takes the place into its renewals; one cancelled after this send never
            // does, and the place comes back when its lease runs out.
            match grant.send(Ok(token)) {
                Ok(()) => return Ok(()),
                Err(back) => token = back.unwrap_or_default(),
            }
        }
    }

    /// Whether calls still wait; if not, the task ends (under the same lock, so a call that comes
    /// next starts a new one).
    fn still_waiting(&self) -> bool {
        let mut queue = self.lock_queue();
        queue.waiting.retain(|w| !w.is_closed());
        if queue.waiting.is_empty() {
            queue.task = false;
        }
        queue.task
    }

    /// The task that waits in Redis for the calls of this process in line: a try that registers
    /// it as waiting, then `BLPOP` for places handed over, until nobody waits here.
    async fn wait_in_line(self: Arc<Self>, member: String) {
        let outcome = self.serve(&member).await;
        if let Err(e) = outcome {
            let mut queue = self.lock_queue();
            for grant in queue.waiting.drain(..) {
                let _ = grant.send(Err(FleetError::Protocol(e.to_string())));
            }
            queue.task = false;
        }
        // Releases stop handing places over once no worker is registered; a lost reply leaves the
        // registration to expire.
        let _ = self.conn.query::<u8>(redis::cmd("SREM").arg(&self.waiters).arg(&member)).await;
    }

    /// Delivers a place to the first call in line. Before the last call here gets its place the
    /// registration goes: otherwise that call's own release, racing the registration's removal,
    /// could hand the place over to nobody. A call that joins after that tries again first
    /// (`block` cleared), which registers it anew if the limit is full.
    async fn hand_on(&self, member: &str, token: String, block: &mut Option<Duration>) -> Result<(), FleetError> {
        let last = {
            let mut queue = self.lock_queue();
            queue.waiting.retain(|w| !w.is_closed());
            queue.waiting.len() <= 1
        };
        if last {
            self.conn.query::<u8>(redis::cmd("SREM").arg(&self.waiters).arg(member)).await?;
            *block = None;
        }
        self.deliver(token).await
    }

    async fn serve(&self, member: &str) -> Result<(), FleetError> {
        let mut block = None;
        let mut registered = Instant::now();
        while self.still_waiting() {
            let Some(timeout) = block else {
                match self.attempt(member).await? {
                    Try::Held(token) => self.hand_on(member, token, &mut block).await?,
                    Try::Full(until_expiry) => {
                        registered = Instant::now();
                        block = Some(until_expiry.clamp(MIN_BLOCK, MAX_BLOCK));
                    }
                }
                continue;
            };
            if registered.elapsed() >= MAX_BLOCK {
                // Places keep coming: the registration is refreshed before it can expire.
                let mut refresh = redis::pipe();
                refresh
                    .cmd("SADD")
                    .arg(&self.waiters)
                    .arg(member)
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(&self.waiters)
                    .arg(REGISTRATION.as_millis() as u64)
                    .ignore();
                self.conn.pipe::<()>(&refresh).await?;
                registered = Instant::now();
            }
            let popped: Option<(String, String)> =
                self.waits.query(redis::cmd("BLPOP").arg(&self.handed).arg(timeout.as_secs_f64())).await?;
            match popped {
                Some((_, token)) => self.hand_on(member, token, &mut block).await?,
                // Timed out: try again, which drops expired leases and refreshes the registration.
                None => block = None,
            }
        }
        Ok(())
    }
}

/// A place held by a call in progress; once dropped its lease is not renewed any more.
struct Unrenewed<'a>(&'a FleetSemaphore, String);

impl Drop for Unrenewed<'_> {
    fn drop(&mut self) {
        self.0.inner.unhold(&self.1);
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
