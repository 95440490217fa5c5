//! The worker fleet's protocol against a real `redis-server` started by each test on a free port
//! with its own directory: a result is written once however often it is committed, a job whose
//! worker stopped renewing it is taken over and resumes from its checkpoint, and the fleet-wide
//! limit hands places back when a holder releases them or its lease runs out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use batchagent::conversation::Message;
use batchagent::fleet::queue::{add_jobs, close_run, create_run, status, RunKeys};
use batchagent::fleet::{Connection, FleetSemaphore, FleetWorker, RedisBudgets, WorkerOptions};
use batchagent::limits::headers::Window;
use batchagent::limits::pacer::{key_id, Budget, Estimate, HandLimits, Pacer, SharedBudgets};
use batchagent::limits::RateLimitHeaders;
use batchagent::scheduler::agent::{AgentState, Job, JobResult};
use tokio::sync::mpsc;
use tokio::time::Instant;

use common::{Redis, HANG};

async fn connect(url: &str) -> Connection {
    // Retries while the server starts: the first command waits for the port to open.
    Connection::open(url, HANG, Some(HANG)).await.unwrap()
}

async fn run_with(conn: &Connection, n: u64) -> RunKeys {
    let run_id = create_run(conn, "fp", "{}").await.unwrap();
    let keys = RunKeys::new(&run_id);
    let entries: Vec<_> = (0..n).map(|i| (format!("job-{i}"), i, format!("{{\"n\":{i}}}"), None)).collect();
    add_jobs(conn, &keys, &entries).await.unwrap();
    // Sent again, as after a lost reply: no input is added twice.
    add_jobs(conn, &keys, &entries).await.unwrap();
    close_run(conn, &keys, n).await.unwrap();
    keys
}

fn options(keys: &RunKeys, consumer: &str, lease: Duration) -> WorkerOptions {
    WorkerOptions { run_id: keys.run_id.clone(), consumer: consumer.into(), lease, capacity: 100, outage: HANG }
}

fn ok(job: &Job) -> JobResult {
    let mut result = JobResult::failed(job.id.clone(), job.index, "none", String::new());
    result.ok = true;
    result.error = None;
    result.output = Some(serde_json::json!(job.index));
    result
}

async fn take(jobs: &mut mpsc::Receiver<Job>, n: usize) -> Vec<Job> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(tokio::time::timeout(HANG, jobs.recv()).await.unwrap().unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_is_written_once_and_the_entry_acknowledged() {
    let redis = Redis::start("once");
    let conn = connect(&redis.url).await;
    let keys = run_with(&conn, 3).await;
    let worker = FleetWorker::connect(&redis.url, options(&keys, "a", HANG)).await.unwrap();
    let (jobs_tx, mut jobs) = mpsc::channel(16);
    let (results_tx, _results) = mpsc::unbounded_channel();
    let feed = tokio::spawn(worker.clone().feed(jobs_tx, results_tx));
    let got = take(&mut jobs, 3).await;
    assert_eq!(got.iter().map(|j| j.index).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert_eq!(got[1].input["n"], 1);
    assert_eq!(status(&conn, &keys).await.unwrap().in_flight, 3);

    let results: Vec<JobResult> = got.iter().map(ok).collect();
    assert_eq!(worker.commit(&results[..2]).await.unwrap(), 2);
    // The same results again, and a different result for a job that has one: nothing changes.
    let mut other = results[0].clone();
    other.output = Some(serde_json::json!("another"));
    assert_eq!(worker.commit(&[results[0].clone(), other, results[1].clone()]).await.unwrap(), 0);
    assert_eq!(worker.commit(&results[2..]).await.unwrap(), 1);

    // Every input has its result: the feed ends by itself.
    tokio::time::timeout(HANG, feed).await.unwrap().unwrap().unwrap();
    let s = status(&conn, &keys).await.unwrap();
    assert_eq!((s.total, s.done, s.failed, s.in_flight, s.queued), (3, 3, 0, 0, 0));
    let first: String = conn.query(redis::cmd("HGET").arg(&keys.results).arg("job-0")).await.unwrap();
    assert!(first.contains("\"output\":0"), "{first}");
    let finished: u64 = conn.query(redis::cmd("XLEN").arg(&keys.done)).await.unwrap();
    assert_eq!(finished, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_lease_ran_out_is_taken_over_from_its_checkpoint() {
    let redis = Redis::start("claim");
    let conn = connect(&redis.url).await;
    let keys = run_with(&conn, 2).await;
    let lease = Duration::from_millis(300);
    // Worker a reads both jobs, checkpoints a turn of one, and dies: no renewal, no result.
    let a = FleetWorker::connect(&redis.url, options(&keys, "a", lease)).await.unwrap();
    let (a_tx, mut a_jobs) = mpsc::channel(16);
    let (a_results, _a_results) = mpsc::unbounded_channel();
    let a_feed = tokio::spawn(a.clone().feed(a_tx, a_results));
    let held = take(&mut a_jobs, 2).await;
    let state = AgentState { turns: 2, tool_calls: 2, ..AgentState::default() };
    a.checkpoint(&held[0].id, &serde_json::to_string(&state).unwrap()).await.unwrap();
    a_feed.abort();
    drop(a_jobs);

    let b = FleetWorker::connect(&redis.url, options(&keys, "b", lease)).await.unwrap();
    let (b_tx, mut b_jobs) = mpsc::channel(16);
    let (b_results, _b_results) = mpsc::unbounded_channel();
    let b_feed = tokio::spawn(b.clone().feed(b_tx, b_results));
    let mut taken = take(&mut b_jobs, 2).await;
    taken.sort_by_key(|j| j.index);
    assert_eq!(taken[0].resume.as_ref().map(|s| s.turns), Some(2), "resumed from its last turn");
    assert!(taken[1].resume.is_none(), "no checkpoint: starts over");
    let s = status(&conn, &keys).await.unwrap();
    assert_eq!((s.claims, s.resumed), (2, 1));
    assert_eq!(s.workers.len(), 0, "neither worker beat");

    assert_eq!(b.commit(&taken.iter().map(ok).collect::<Vec<_>>()).await.unwrap(), 2);
    // Worker a comes back with its old results: they are not written again.
    assert_eq!(a.commit(&held.iter().map(ok).collect::<Vec<_>>()).await.unwrap(), 0);
    tokio::time::timeout(HANG, b_feed).await.unwrap().unwrap().unwrap();
    let s = status(&conn, &keys).await.unwrap();
    assert_eq!((s.done, s.in_flight), (2, 0));
    let checkpoints: u64 = conn.query(redis::cmd("HLEN").arg(&keys.checkpoints)).await.unwrap();
    assert_eq!(checkpoints, 0, "a written result drops the job's checkpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_own_leases_lapsed_does_not_get_its_running_jobs_again() {
    let redis = Redis::start("own");
    let conn = connect(&redis.url).await;
    let keys = run_with(&conn, 2).await;
    // No heartbeat runs here, so the worker's leases lapse while it still runs both jobs, and its
    // own XAUTOCLAIM takes them back (each claim adds one to the entry's delivery count).
    let a = FleetWorker::connect(&redis.url, options(&keys, "a", Duration::from_millis(100))).await.unwrap();
    let (a_tx, mut a_jobs) = mpsc::channel(16);
    let (a_results, _a_results) = mpsc::unbounded_channel();
    let a_feed = tokio::spawn(a.clone().feed(a_tx, a_results));
    let held = take(&mut a_jobs, 2).await;
    // Two claims of each entry: the feed handles one claim's entries before it makes the next.
    tokio::time::timeout(HANG, async {
        loop {
            let pending: redis::streams::StreamPendingCountReply = conn
                .query(redis::cmd("XPENDING").arg(&keys.jobs).arg(batchagent::fleet::GROUP).arg("-").arg("+").arg(10))
                .await
                .unwrap();
            if pending.ids.len() == 2 && pending.ids.iter().all(|p| p.times_delivered >= 3) {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    assert!(a_jobs.try_recv().is_err(), "a job this worker runs was handed to it again");
    let s = status(&conn, &keys).await.unwrap();
    assert_eq!((s.claims, s.resumed), (0, 0));
    assert_eq!(a.commit(&held.iter().map(ok).collect::<Vec<_>>()).await.unwrap(), 2);
    tokio::time::timeout(HANG, a_feed).await.unwrap().unwrap().unwrap();
}

/// A worker's fleet-wide limit: its own connections, as a worker process opens them.
async fn limit(url: &str, name: &str, places: usize, lease: Duration, owner: &str) -> FleetSemaphore {
    let waits = Connection::open(url, HANG, None).await.unwrap();
    FleetSemaphore::new(connect(url).await, waits, name, places, lease, owner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_store_a_shared_prompt_once_and_their_blocks_go_with_the_run() {
    let redis = Redis::start("blocks");
    let conn = connect(&redis.url).await;
    let keys = run_with(&conn, 3).await;
    let lease = Duration::from_millis(300);
    let prompt: String = (0..2048).map(|i| format!("w{} ", i * 7919 % 5000)).collect::<Vec<_>>().concat();
    let state = |job: &Job, turns: u32| AgentState {
        messages: (0..turns).fold(
            vec![Message::system(prompt.clone()), Message::user(format!("job {}", job.index))],
            |mut m, t| {
                m.push(Message::assistant(format!("turn {t} of job {}: line {}", job.index, t * 31), Vec::new()));
                m
            },
        ),
        turns,
        ..AgentState::default()
    };
    let a = FleetWorker::connect(&redis.url, options(&keys, "a", lease)).await.unwrap();
    let (a_tx, mut a_jobs) = mpsc::channel(16);
    let (a_results, _a_results) = mpsc::unbounded_channel();
    let a_feed = tokio::spawn(a.clone().feed(a_tx, a_results));
    let held = take(&mut a_jobs, 3).await;
    for turns in 1..=3 {
        for job in &held {
            a.checkpoint(&job.id, &serde_json::to_string(&state(job, turns)).unwrap()).await.unwrap();
        }
    }
    let blocks: Vec<Vec<u8>> = conn.query(redis::cmd("HVALS").arg(&keys.blocks)).await.unwrap();
    let stored: usize = blocks.iter().map(Vec::len).sum();
    // Nine checkpoints of three jobs, whole states of over 9 prompts: the prompt once, plus each
    // turn's own bytes and the segments listing the chunks (16 bytes per chunk of about 64).
    assert!(stored < prompt.len() * 2, "{stored} bytes of blocks for a {}-byte prompt", prompt.len());
    a_feed.abort();
    drop(a_jobs);

    // Another worker takes the jobs over and resumes each from its last state, decoded.
    let b = FleetWorker::connect(&redis.url, options(&keys, "b", lease)).await.unwrap();
    let (b_tx, mut b_jobs) = mpsc::channel(16);
    let (b_results, _b_results) = mpsc::unbounded_channel();
    let b_feed = tokio::spawn(b.clone().feed(b_tx, b_results));
    let taken = take(&mut b_jobs, 3).await;
    for job in &taken {
        assert_eq!(job.resume.as_ref(), Some(&state(job, 3)));
    }
    // The run's last result drops its blocks.
    assert_eq!(b.commit(&taken.iter().map(ok).collect::<Vec<_>>()).await.unwrap(), 3);
    tokio::time::timeout(HANG, b_feed).await.unwrap().unwrap().unwrap();
    let left: bool = conn.query(redis::cmd("EXISTS").arg(&keys.blocks)).await.unwrap();
    assert!(!left);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_limit_hands_back_places_on_release_and_on_lease_expiry() {
    let redis = Redis::start("limit");
    let long = limit(&redis.url, "endpoint", 2, HANG, "w1").await;
    let first = long.acquire().await.unwrap();
    let _second = long.acquire().await.unwrap();
    assert_eq!(long.in_use().await.unwrap(), 2);
    let other = Arc::new(limit(&redis.url, "endpoint", 2, HANG, "w2").await);
    let waiting = tokio::spawn({
        let other = other.clone();
        async move { other.acquire().await.unwrap() }
    });
    wait_for_waiters(&redis.url, "endpoint", 1).await;
    long.release(&first).await.unwrap();
    // The place was handed over, not freed and taken again.
    assert_eq!(tokio::time::timeout(HANG, waiting).await.unwrap().unwrap(), first);
    assert_eq!(long.in_use().await.unwrap(), 2);

    // A holder that dies keeps its places only until their leases run out.
    let short = limit(&redis.url, "dying", 1, Duration::from_millis(200), "w3").await;
    let _held = short.acquire().await.unwrap();
    let after = limit(&redis.url, "dying", 1, HANG, "w4").await;
    tokio::time::timeout(HANG, after.acquire()).await.unwrap().unwrap();
}

/// Waits until `n` workers are registered as waiting for places of `name`.
async fn wait_for_waiters(url: &str, name: &str, n: usize) {
    let conn = connect(url).await;
    let key = format!("batchagent:limit:{name}:waiters");
    tokio::time::timeout(HANG, async {
        while conn.query::<usize>(redis::cmd("SCARD").arg(&key)).await.unwrap() < n {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_workers_get_released_places_one_each_in_turn() {
    let redis = Redis::start("turns");
    let holder = limit(&redis.url, "endpoint", 2, HANG, "holder").await;
    let a = holder.acquire().await.unwrap();
    let b = holder.acquire().await.unwrap();
    // Three workers, the last with two calls waiting: four calls for two places.
    let mut waiting = Vec::new();
    for (i, calls) in [1, 1, 2].into_iter().enumerate() {
        let worker = Arc::new(limit(&redis.url, "endpoint", 2, HANG, &format!("w{i}")).await);
        for _ in 0..calls {
            let worker = worker.clone();
            waiting.push(tokio::spawn(async move {
                let token = worker.acquire().await.unwrap();
                (worker, token)
            }));
        }
        wait_for_waiters(&redis.url, "endpoint", i + 1).await;
    }
    holder.release(&a).await.unwrap();
    holder.release(&b).await.unwrap();
    // Two of the four get the two places; which two is Redis's order of blocked clients.
    let mut rest = waiting;
    let mut granted = Vec::new();
    while granted.len() < 2 {
        let (finished, _, others) = tokio::time::timeout(HANG, futures_util::future::select_all(rest)).await.unwrap();
        granted.push(finished.unwrap());
        rest = others;
    }
    let mut tokens: Vec<String> = granted.iter().map(|(_, t)| t.clone()).collect();
    tokens.sort();
    assert_eq!(tokens, {
        let mut held = vec![a, b];
        held.sort();
        held
    });
    assert_eq!(holder.in_use().await.unwrap(), 2, "never more than the limit");
    assert!(rest.iter().all(|t| !t.is_finished()));
    // The rest follow as places come back.
    for (worker, token) in &granted {
        worker.release(token).await.unwrap();
    }
    for task in rest {
        let (worker, token) = tokio::time::timeout(HANG, task).await.unwrap().unwrap();
        worker.release(&token).await.unwrap();
    }
    // Every place is free or handed over: a release that raced the last waiter's registration
    // leaves its place on the list, with nobody holding it.
    let conn = connect(&redis.url).await;
    let handed_key = "batchagent:limit:endpoint:handed";
    let handed: usize = conn.query(redis::cmd("LLEN").arg(handed_key)).await.unwrap();
    assert_eq!(holder.in_use().await.unwrap(), handed, "no place held by anyone");
    // A newcomer gets every place at once, taking the handed-over ones off the list.
    let newcomer = limit(&redis.url, "endpoint", 2, HANG, "newcomer").await;
    for _ in 0..2 {
        tokio::time::timeout(HANG, newcomer.acquire()).await.unwrap().unwrap();
    }
    assert_eq!(holder.in_use().await.unwrap(), 2);
    let handed: usize = conn.query(redis::cmd("LLEN").arg(handed_key)).await.unwrap();
    assert_eq!(handed, 0, "the places handed over to nobody were taken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_handed_to_a_waiter_that_died_goes_to_the_next_caller() {
    let redis = Redis::start("deadwaiter");
    let conn = connect(&redis.url).await;
    let holder = limit(&redis.url, "endpoint", 1, HANG, "holder").await;
    let token = holder.acquire().await.unwrap();
    // A worker killed while it waited left its registration behind (until it expires).
    let key = "batchagent:limit:endpoint:waiters";
    conn.query::<()>(redis::cmd("SADD").arg(key).arg("dead:1")).await.unwrap();
    conn.query::<()>(redis::cmd("PEXPIRE").arg(key).arg(60_000)).await.unwrap();
    holder.release(&token).await.unwrap();
    let handed: Vec<String> =
        conn.query(redis::cmd("LRANGE").arg("batchagent:limit:endpoint:handed").arg(0).arg(-1)).await.unwrap();
    assert_eq!(handed, vec![token.clone()], "handed over to the dead waiter");
    // Nobody pops it: the next call that finds the limit full takes it.
    let next = limit(&redis.url, "endpoint", 1, HANG, "next").await;
    assert_eq!(tokio::time::timeout(HANG, next.acquire()).await.unwrap().unwrap(), token);
    assert_eq!(next.in_use().await.unwrap(), 1);
}

fn shared(conn: &Connection, hand: HandLimits) -> Arc<dyn Budget> {
    RedisBudgets::new(conn.clone()).budget("https://api.example.com/v1", &key_id(Some("sk-one")), hand)
}

const ONE: Estimate = Estimate { input: 10, output: 10 };

/// Waits until the shared budget's request level is at most `level`: a worker's report of an
/// answer's headers has reached it.
async fn level_at_most(conn: &Connection, level: f64) {
    tokio::time::timeout(HANG, async {
        loop {
            let keys: Vec<String> = conn.query(redis::cmd("KEYS").arg("batchagent:budget:*")).await.unwrap();
            if let Some(key) = keys.first() {
                let now: Option<String> = conn.query(redis::cmd("HGET").arg(key).arg("l1")).await.unwrap();
                if now.and_then(|l| l.parse::<f64>().ok()).is_some_and(|l| l <= level) {
                    return;
                }
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
}

fn stating(remaining: u64) -> RateLimitHeaders {
    let mut stated = RateLimitHeaders::default();
    stated.windows[0] = Some(Window { limit: Some(60), remaining: Some(remaining), reset: None });
    stated
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_on_one_key_draw_from_one_budget() {
    let redis = Redis::start("budget");
    // Two workers, each with its own connection, both told `rpm=60`: one second's worth, one
    // request, at the start, for the two together.
    let a = shared(&connect(&redis.url).await, HandLimits { rpm: Some(60), tpm: None });
    let b = shared(&connect(&redis.url).await, HandLimits { rpm: Some(60), tpm: None });
    a.try_take(ONE, Instant::now()).await.unwrap();
    let wait = b.try_take(ONE, Instant::now()).await.unwrap_err();
    assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
    // Another key, or another endpoint, has a budget of its own.
    let other_key = RedisBudgets::new(connect(&redis.url).await).budget(
        "https://api.example.com/v1",
        &key_id(Some("sk-two")),
        HandLimits { rpm: Some(60), tpm: None },
    );
    other_key.try_take(ONE, Instant::now()).await.unwrap();
    assert_eq!(b.snapshot()["requests"], serde_json::json!({"per_minute": 60, "source": "set", "shared": true}));
    let stored: Vec<String> =
        connect(&redis.url).await.query(redis::cmd("KEYS").arg("batchagent:budget:*")).await.unwrap();
    assert_eq!(stored.len(), 2);
    assert!(stored.iter().all(|k| !k.contains("sk-")), "{stored:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_one_worker_read_pace_the_others() {
    let redis = Redis::start("budgetheaders");
    let conn = connect(&redis.url).await;
    let a = shared(&connect(&redis.url).await, HandLimits::default());
    let b = shared(&connect(&redis.url).await, HandLimits::default());
    // No limit known yet: each worker's first request goes unpaced, and Redis is not asked.
    let first = a.try_take(ONE, Instant::now()).await.unwrap();
    a.observe(&first, &stating(10), Instant::now());
    level_at_most(&conn, 10.0).await;
    let first = b.try_take(ONE, Instant::now()).await.unwrap();
    b.observe(&first, &stating(9), Instant::now());
    level_at_most(&conn, 9.0).await;
    // The answer to a's next request says nothing remains: b, which read no such thing, waits.
    let ticket = a.try_take(ONE, Instant::now()).await.unwrap();
    a.observe(&ticket, &stating(0), Instant::now());
    level_at_most(&conn, 0.0).await;
    let wait = b.try_take(ONE, Instant::now()).await.unwrap_err();
    assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
    assert_eq!(a.snapshot()["requests"], serde_json::json!({"per_minute": 60, "source": "headers", "shared": true}));

    // A 429's retry-after stops every worker.
    let ticket = a.try_take(ONE, Instant::now()).await.unwrap_or_default();
    let throttled = RateLimitHeaders { retry_after: Some(Duration::from_secs(30)), ..RateLimitHeaders::default() };
    a.observe(&ticket, &throttled, Instant::now());
    tokio::time::timeout(HANG, async {
        loop {
            if let Err(wait) = b.try_take(Estimate::default(), Instant::now()).await {
                if wait > Duration::from_secs(20) {
                    return;
                }
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pacers_on_one_key_stay_within_the_limit_together() {
    let redis = Redis::start("budgetrate");
    let conn = connect(&redis.url).await;
    let hand = HandLimits { rpm: Some(600), tpm: None };
    let mut pacers = Vec::new();
    for _ in 0..2 {
        pacers.push(Arc::new(Pacer::with_budget(shared(&connect(&redis.url).await, hand))));
    }
    let redis_now = || async {
        let (s, us): (u64, u64) = conn.query(&redis::cmd("TIME")).await.unwrap();
        s as f64 + us as f64 / 1e6
    };
    let start = redis_now().await;
    let each = 15;
    let runs: Vec<_> = pacers
        .iter()
        .map(|pacer| {
            let pacer = pacer.clone();
            tokio::spawn(async move {
                for _ in 0..each {
                    pacer.admit(ONE).await;
                }
            })
        })
        .collect();
    for run in runs {
        tokio::time::timeout(HANG, run).await.unwrap().unwrap();
    }
    let elapsed = redis_now().await - start;
    // Redis's clock is the budget's: whatever the load, the two together were admitted no more
    // than the limit allows in that time (10 a second, and one second's worth at the start),
    // where each on a budget of its own would have taken that much alone.
    let admitted = f64::from(2 * each);
    assert!(admitted <= 10.0 + 10.0 * elapsed + 1.0, "{admitted} admitted in {elapsed:.2} s");
    for pacer in &pacers {
        assert_eq!(pacer.snapshot()["requests"], each);
    }
}
