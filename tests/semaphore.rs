//! The priority semaphore under random interleavings of acquire, release, cancellation, resizing
//! and the passage of (paused) time, checked against a model of who should hold a slot.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use batchagent::scheduler::{Acquire, Permit, PrioritySemaphore};
use proptest::prelude::*;
use tokio::time::Instant;

const AGING: Duration = Duration::from_millis(10);

#[derive(Debug, Clone)]
enum Op {
    Acquire(u32),
    Release(usize),
    Cancel(usize),
    /// Releases a permit, then drops the waiter it was granted to before that waiter is polled.
    ReleaseAndDropGranted(usize),
    SetCapacity(usize),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u32..4).prop_map(Op::Acquire),
        3 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Cancel),
        1 => any::<usize>().prop_map(Op::ReleaseAndDropGranted),
        1 => (0usize..5).prop_map(Op::SetCapacity),
        2 => (0u64..40).prop_map(Op::Advance),
    ]
}

/// (virtual deadline since the test started, arrival order): what the semaphore must order by.
type Key = (Duration, u64);

struct Waiter {
    key: Key,
    future: Pin<Box<Acquire>>,
}

struct Model {
    sem: Arc<PrioritySemaphore>,
    origin: Instant,
    seq: u64,
    waiting: Vec<Waiter>,
    held: Vec<Permit>,
}

impl Model {
    /// Polls every waiter; returns the keys of those that now hold a permit.
    fn observe(&mut self) -> Vec<Key> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut granted = Vec::new();
        let mut still = Vec::new();
        for mut w in self.waiting.drain(..) {
            match w.future.as_mut().poll(&mut cx) {
                Poll::Ready(permit) => {
                    self.held.push(permit);
                    granted.push(w.key);
                }
                Poll::Pending => still.push(w),
            }
        }
        self.waiting = still;
        granted
    }

    fn best_waiter(&self) -> Option<usize> {
        (0..self.waiting.len()).min_by_key(|&i| self.waiting[i].key)
    }
}

fn check_step(model: &mut Model, before: &[Key], capacity_before: usize) -> Result<(), TestCaseError> {
    let mut granted = model.observe();
    granted.sort();
    let mut expected: Vec<Key> = before.to_vec();
    expected.sort();
    expected.truncate(granted.len());
    // Only the waiters with the smallest virtual deadlines may have been served.
    prop_assert_eq!(&granted, &expected);
    let capacity = model.sem.capacity();
    if !granted.is_empty() {
        prop_assert!(
            model.held.len() <= capacity.max(capacity_before),
            "{} held, capacity {capacity}",
            model.held.len()
        );
    }
    prop_assert_eq!(model.sem.in_use(), model.held.len(), "in_use disagrees with the permits alive");
    prop_assert_eq!(model.sem.waiting(), model.waiting.len(), "ghost or lost waiter");
    if !model.waiting.is_empty() {
        prop_assert!(model.held.len() >= capacity, "a waiter waits while a slot is free");
    }
    Ok(())
}

fn run_ops(initial: usize, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    rt.block_on(async move {
        let mut m = Model {
            sem: PrioritySemaphore::new(initial, AGING),
            origin: Instant::now(),
            seq: 0,
            waiting: Vec::new(),
            held: Vec::new(),
        };
        for op in ops {
            let capacity_before = m.sem.capacity();
            let before: Vec<Key> = m.waiting.iter().map(|w| w.key).collect();
            match op {
                Op::Acquire(urgency) => {
                    let key = (m.origin.elapsed() + AGING * urgency, m.seq);
                    m.seq += 1;
                    let mut future = Box::pin(m.sem.acquire(urgency));
                    let mut cx = Context::from_waker(Waker::noop());
                    match future.as_mut().poll(&mut cx) {
                        Poll::Ready(permit) => {
                            prop_assert!(m.waiting.is_empty(), "jumped the queue");
                            prop_assert!(m.held.len() < capacity_before);
                            m.held.push(permit);
                        }
                        Poll::Pending => m.waiting.push(Waiter { key, future }),
                    }
                }
                Op::Release(i) if !m.held.is_empty() => {
                    let n = m.held.len();
                    drop(m.held.swap_remove(i % n));
                }
                Op::Cancel(i) if !m.waiting.is_empty() => {
                    let n = m.waiting.len();
                    drop(m.waiting.swap_remove(i % n));
                }
                Op::ReleaseAndDropGranted(i) if !m.held.is_empty() && !m.waiting.is_empty() => {
                    let n = m.held.len();
                    drop(m.held.swap_remove(i % n));
                    let best = m.best_waiter().unwrap();
                    let granted = m.held.len() < m.sem.capacity() || m.sem.in_use() > m.held.len();
                    drop(m.waiting.swap_remove(best));
                    let before: Vec<Key> = m.waiting.iter().map(|w| w.key).collect();
                    if granted {
                        // The cancelled grantee's slot must reach the next waiter in line.
                        check_step(&mut m, &before, capacity_before)?;
                        continue;
                    }
                }
                Op::SetCapacity(n) => m.sem.set_capacity(n),
                Op::Advance(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
                _ => {}
            }
            check_step(&mut m, &before, capacity_before)?;
        }
        // Every waiter eventually acquires once permits are released and capacity is non-zero.
        m.sem.set_capacity(m.sem.capacity().max(1));
        let mut rounds = 0;
        while !m.waiting.is_empty() {
            let before: Vec<Key> = m.waiting.iter().map(|w| w.key).collect();
            let capacity_before = m.sem.capacity();
            m.held.pop();
            check_step(&mut m, &before, capacity_before)?;
            rounds += 1;
            prop_assert!(rounds < 10_000, "waiters never drained");
        }
        m.held.clear();
        prop_assert_eq!(m.sem.in_use(), 0);
        prop_assert_eq!(m.sem.waiting(), 0);
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn semaphore_matches_the_model(initial in 0usize..4, ops in proptest::collection::vec(op(), 0..120)) {
        run_ops(initial, ops)?;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tasks_never_exceed_capacity_and_all_finish() {
    let sem = PrioritySemaphore::new(3, Duration::from_millis(1));
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..200u32)
        .map(|i| {
            let (sem, running, peak) = (Arc::clone(&sem), Arc::clone(&running), Arc::clone(&peak));
            tokio::spawn(async move {
                let _permit = sem.acquire(i % 5).await;
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::task::yield_now().await;
                running.fetch_sub(1, Ordering::SeqCst);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert!(peak.load(Ordering::SeqCst) <= 3);
    assert_eq!(sem.in_use(), 0);
    assert_eq!(sem.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn timed_out_and_aborted_acquires_leave_nothing_behind() {
    let sem = PrioritySemaphore::new(1, Duration::from_millis(5));
    let held = sem.acquire(0).await;
    let timed_out = tokio::time::timeout(Duration::from_millis(10), sem.acquire(0)).await;
    assert!(timed_out.is_err());
    let aborted = tokio::spawn({
        let sem = Arc::clone(&sem);
        async move { drop(sem.acquire(0).await) }
    });
    let patient = tokio::spawn({
        let sem = Arc::clone(&sem);
        async move { drop(sem.acquire(3).await) }
    });
    tokio::task::yield_now().await;
    assert_eq!(sem.waiting(), 2);
    aborted.abort();
    assert!(aborted.await.unwrap_err().is_cancelled());
    assert_eq!(sem.waiting(), 1);
    drop(held);
    patient.await.unwrap();
    assert_eq!(sem.in_use(), 0);
    assert_eq!(sem.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn capacity_zero_holds_everyone_until_it_grows() {
    let sem = PrioritySemaphore::new(0, Duration::from_millis(5));
    let task = tokio::spawn({
        let sem = Arc::clone(&sem);
        async move { drop(sem.acquire(0).await) }
    });
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!task.is_finished());
    sem.set_capacity(1);
    task.await.unwrap();
    assert_eq!(sem.in_use(), 0);
}
