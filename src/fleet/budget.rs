//! Rate-limit budgets shared by every worker of a fleet: the token buckets of
//! [`LocalBudget`](crate::limits::pacer::LocalBudget), kept in one Redis hash per endpoint and key,
//! so workers on one API key draw from one budget instead of each spending the whole limit.
//!
//! Two Lua scripts do the bucket arithmetic atomically, by Redis's clock (`TIME`), so no worker's
//! clock matters: one refills and takes a request's estimate (or answers how long to wait), the
//! other applies what an answer's rate-limit headers stated, whichever worker read them. The
//! arithmetic is the local budget's, line for line; see its module for why it is what it is.
//!
//! Hash `budget:ID` (`ID` a fingerprint of the endpoint and of a hash of the key, never the key):
//! `blocked` (no admission before this time, from a 429's `retry-after`), and per limit `i`
//! (requests, tokens, input tokens, output tokens): `si` the stated limit, `yi` whether a stated
//! `remaining` has set the level, `ci` the server's bucket size learned from `reset`, `li` the
//! level, `ui` when it was last refilled, `ai` everything admitted so far. Limits set by hand
//! (`rpm=`, `tpm=`) travel with each call, as each worker was given them. The hash expires a day
//! after its last use.
//!
//! A budget costs Redis nothing until it has a limit: one set by hand, or stated in an answer this
//! worker read (a hosted API's first answer, which goes alone). An engine that states no limits
//! (vLLM, SGLang) is never paced, and never asks Redis.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::connection::Connection;
use super::PREFIX;
use crate::limits::headers::Kind;
use crate::limits::pacer::{Budget, Estimate, HandLimits, SharedBudgets, Ticket, COLD_START};
use crate::limits::RateLimitHeaders;
use crate::scheduler::durable::fingerprint;

/// Reads the hash and defines the bucket arithmetic. `ARGV[1]` the cold-start share of a minute,
/// `ARGV[2..5]` the limits set by hand (0: none).
const BUCKETS: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local names = {'blocked'}
for i = 1, 4 do
  for _, f in ipairs({'s', 'y', 'c', 'l', 'u', 'a'}) do names[#names + 1] = f .. i end
end
local v = redis.call('HMGET', KEYS[1], unpack(names))
local cold = tonumber(ARGV[1])
local function bucket(i)
  local o = 1 + (i - 1) * 6
  local hand = tonumber(ARGV[1 + i])
  if hand <= 0 then hand = nil end
  return {hand = hand, stated = tonumber(v[o + 1]), synced = v[o + 2] == '1', scap = tonumber(v[o + 3]),
    level = tonumber(v[o + 4]), updated = tonumber(v[o + 5]) or now, admitted = tonumber(v[o + 6]) or 0}
end
local function per_minute(b) return b.hand or b.stated end
local function capacity(b, limit)
  if b.synced then return math.min(b.scap or limit, limit) end
  return limit * cold
end
local function refill(b)
  if not b.level then b.level = b.hand and b.hand * cold or 0 end
  local limit = per_minute(b)
  if limit then
    b.level = math.min(b.level + math.max(now - b.updated, 0) * limit / 60, capacity(b, limit))
  end
  b.updated = now
end
local set = {}
local function put(field, value) set[#set + 1] = field; set[#set + 1] = tostring(value) end
local function save()
  if #set > 0 then redis.call('HSET', KEYS[1], unpack(set)) end
end
";

/// `ARGV[6..9]` the estimate per limit, `ARGV[10]` the idle expiry (ms). Returns `{'1', admitted
/// per limit...}` or `{'0', seconds to wait}`.
const TAKE: &str = r"
local wait = math.max((tonumber(v[1]) or 0) - now, 0)
local bs = {}
for i = 1, 4 do
  local b = bucket(i)
  refill(b)
  local limit = per_minute(b)
  if limit then
    local needed = math.min(tonumber(ARGV[5 + i]), capacity(b, limit))
    if b.level < needed then wait = math.max(wait, (needed - b.level) * 60 / limit) end
  end
  bs[i] = b
end
if wait > 0 then return {'0', tostring(math.min(wait, 86400))} end
local out = {'1'}
for i = 1, 4 do
  local b = bs[i]
  local cost = tonumber(ARGV[5 + i])
  b.admitted = b.admitted + cost
  put('a' .. i, b.admitted)
  if per_minute(b) then
    put('l' .. i, b.level - cost)
    put('u' .. i, now)
  end
  out[#out + 1] = tostring(b.admitted)
end
save()
redis.call('PEXPIRE', KEYS[1], ARGV[10])
return out
";

/// `ARGV[6..9]` the ticket (admitted per limit when the request was; empty for a request sent
/// before the budget had a limit), then per limit four
/// arguments (`1` if the answer stated it, its limit, remaining and reset in seconds, each empty
/// when absent) from `ARGV[10]`, `ARGV[26]` the `retry-after` in seconds (empty: none), `ARGV[27]`
/// the idle expiry (ms).
const OBSERVE: &str = r"
for i = 1, 4 do
  local o = 10 + (i - 1) * 4
  if ARGV[o] == '1' then
    local b = bucket(i)
    refill(b)
    local stated_limit = tonumber(ARGV[o + 1])
    if stated_limit then
      b.stated = stated_limit
      put('s' .. i, stated_limit)
    end
    local limit = per_minute(b)
    local remaining = tonumber(ARGV[o + 2])
    if limit and remaining then
      local ticket = tonumber(ARGV[5 + i])
      local since = ticket and math.max(b.admitted - ticket, 0) or 0
      local level = math.min(remaining, limit) - since
      if b.synced then level = math.min(b.level, level) end
      b.level = level
      put('y' .. i, 1)
      local reset = tonumber(ARGV[o + 3])
      if reset then put('c' .. i, math.max(math.min(remaining + reset * limit / 60, limit), 1)) end
    end
    put('l' .. i, b.level)
    put('u' .. i, now)
  end
end
local after = tonumber(ARGV[26])
if after then
  local upto = now + after
  if upto > (tonumber(v[1]) or 0) then put('blocked', upto) end
end
save()
redis.call('PEXPIRE', KEYS[1], ARGV[27])
return 0
";

/// A budget hash unused for this long is dropped (after a minute idle every bucket is full anyway;
/// what is lost is the limits stated).
const IDLE: Duration = Duration::from_secs(86_400);

/// How long an admission waits before asking again when Redis did not answer (the connection has
/// already retried for the fleet's outage allowance by then).
const UNREACHABLE_WAIT: Duration = Duration::from_secs(1);

/// The budgets of a fleet's endpoints, in its Redis.
pub struct RedisBudgets {
    conn: Connection,
    take: Arc<redis::Script>,
    observe: Arc<redis::Script>,
}

impl RedisBudgets {
    pub fn new(conn: Connection) -> Self {
        Self {
            conn,
            take: Arc::new(redis::Script::new(&format!("{BUCKETS}{TAKE}"))),
            observe: Arc::new(redis::Script::new(&format!("{BUCKETS}{OBSERVE}"))),
        }
    }
}

impl SharedBudgets for RedisBudgets {
    fn budget(&self, endpoint: &str, key_id: &str, hand: HandLimits) -> Arc<dyn Budget> {
        Arc::new(RedisBudget {
            conn: self.conn.clone(),
            key: format!("{PREFIX}budget:{}", fingerprint(&format!("{endpoint}\n{key_id}"))),
            hand: [hand.rpm.unwrap_or(0), hand.tpm.unwrap_or(0), 0, 0],
            take: Arc::clone(&self.take),
            observe: Arc::clone(&self.observe),
            stated: Mutex::default(),
            limited: AtomicBool::new(!hand.is_empty()),
        })
    }
}

/// One endpoint's budget, shared through Redis.
pub struct RedisBudget {
    conn: Connection,
    key: String,
    /// Per limit in the order of [`Kind::ALL`]; 0: none.
    hand: [u64; 4],
    take: Arc<redis::Script>,
    observe: Arc<redis::Script>,
    /// The limits answers stated to this process, for reports.
    stated: Mutex<[Option<u64>; 4]>,
    /// Whether a limit is known (set by hand or stated): until then requests are not paced.
    limited: AtomicBool,
}

impl fmt::Debug for RedisBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBudget").field("key", &self.key).field("hand", &self.hand).finish_non_exhaustive()
    }
}

impl RedisBudget {
    async fn take(&self, estimate: Estimate) -> Result<Ticket, Duration> {
        if !self.limited.load(Relaxed) {
            return Ok(Ticket::new([f64::NAN; 4]));
        }
        let mut invocation = self.take.prepare_invoke();
        invocation.key(&self.key).arg(COLD_START).arg(&self.hand[..]);
        for kind in Kind::ALL {
            invocation.arg(estimate.cost(kind));
        }
        invocation.arg(IDLE.as_millis() as u64);
        let Ok(reply) = self.conn.script::<Vec<String>>(&invocation).await else {
            return Err(UNREACHABLE_WAIT);
        };
        let number = |i: usize| reply.get(i).and_then(|n| n.parse::<f64>().ok()).filter(|n| n.is_finite());
        match reply.first().map(String::as_str) {
            Some("1") => {
                let mut admitted = [0.0; 4];
                for (i, slot) in admitted.iter_mut().enumerate() {
                    *slot = number(i + 1).unwrap_or(0.0);
                }
                Ok(Ticket::new(admitted))
            }
            _ => Err(number(1).map_or(UNREACHABLE_WAIT, |s| Duration::from_secs_f64(s.clamp(0.0, 86_400.0)))),
        }
    }
}

impl Budget for RedisBudget {
    fn try_take(&self, estimate: Estimate, _now: Instant) -> BoxFuture<'_, Result<Ticket, Duration>> {
        Box::pin(self.take(estimate))
    }

    fn observe(&self, ticket: &Ticket, headers: &RateLimitHeaders, _now: Instant) {
        if headers.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let mut args: Vec<String> = vec![COLD_START.to_string()];
        args.extend(self.hand.iter().map(u64::to_string));
        args.extend(ticket.admitted().iter().map(|a| if a.is_finite() { a.to_string() } else { String::new() }));
        let optional = |n: Option<u64>| n.map(|n| n.to_string()).unwrap_or_default();
        {
            let mut stated = self.stated.lock().unwrap_or_else(PoisonError::into_inner);
            for (kind, known) in Kind::ALL.into_iter().zip(stated.iter_mut()) {
                match headers.window(kind) {
                    Some(window) => {
                        *known = window.limit.or(*known);
                        args.push("1".to_owned());
                        args.push(optional(window.limit));
                        args.push(optional(window.remaining));
                        args.push(window.reset.map(|r| r.as_secs_f64().to_string()).unwrap_or_default());
                    }
                    None => args.extend(["0", "", "", ""].map(str::to_owned)),
                }
            }
        }
        args.push(headers.retry_after.map(|r| r.as_secs_f64().to_string()).unwrap_or_default());
        args.push((IDLE.as_millis() as u64).to_string());
        self.limited.store(true, Relaxed);
        let (conn, script, key) = (self.conn.clone(), Arc::clone(&self.observe), self.key.clone());
        // The answer is not held up for Redis; what it states reaches the others a round trip later.
        runtime.spawn(async move {
            let mut invocation = script.prepare_invoke();
            invocation.key(&key).arg(&args[..]);
            let _ = conn.script::<u8>(&invocation).await;
        });
    }

    fn snapshot(&self) -> Value {
        let stated = *self.stated.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = serde_json::Map::new();
        for ((kind, hand), stated) in Kind::ALL.into_iter().zip(self.hand).zip(stated) {
            let limit = if hand > 0 { Some((hand, "set")) } else { stated.map(|s| (s, "headers")) };
            if let Some((limit, source)) = limit {
                out.insert(kind.label().to_owned(), json!({"per_minute": limit, "source": source, "shared": true}));
            }
        }
        Value::Object(out)
    }
}
