//! A priority semaphore for inference slots: waiters are served by virtual deadline
//! (enqueue time + urgency x aging), and the capacity can change while permits are held.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

/// Virtual deadline since the semaphore's creation, then arrival order (FIFO among equal deadlines).
type Key = (Duration, u64);

/// Bounds concurrent holders to `capacity`, serving waiters in order of virtual deadline.
///
/// A waiter's deadline is its enqueue time plus `urgency * aging`, so lower urgency is served
/// first, equal urgency is FIFO, and a waiter that has waited `k * aging` beats a newcomer whose
/// urgency is `k` lower: nothing starves.
pub struct PrioritySemaphore {
    aging: Duration,
    origin: Instant,
    next_seq: AtomicU64,
    state: Mutex<State>,
}

struct State {
    capacity: usize,
    in_use: usize,
    /// Waiters not yet granted. A waiter absent from this map after registering has been granted a
    /// slot (counted in `in_use`) that its `Acquire` must claim or pass on.
    waiters: BTreeMap<Key, Waker>,
}

impl State {
    /// Grants free slots to the best waiters; returns the wakers to call once the lock is released.
    fn grant(&mut self) -> Vec<Waker> {
        let mut woken = Vec::new();
        while self.in_use < self.capacity {
            let Some((_, waker)) = self.waiters.pop_first() else { break };
            self.in_use += 1;
            woken.push(waker);
        }
        woken
    }
}

impl PrioritySemaphore {
    pub fn new(capacity: usize, aging: Duration) -> Arc<Self> {
        Arc::new(Self {
            aging,
            origin: Instant::now(),
            next_seq: AtomicU64::new(0),
            state: Mutex::new(State { capacity, in_use: 0, waiters: BTreeMap::new() }),
        })
    }

    /// Waits for a slot; lower `urgency` is served first. The enqueue time is taken now, at the
    /// call, not at the first poll.
    pub fn acquire(self: &Arc<Self>, urgency: u32) -> Acquire {
        let since_origin = Instant::now().saturating_duration_since(self.origin);
        let deadline = since_origin.saturating_add(self.aging.saturating_mul(urgency));
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        Acquire { semaphore: Arc::clone(self), key: (deadline, seq), stage: Stage::Unpolled }
    }

    /// Shrinking never revokes held permits (releases just stop granting until `in_use` is below the
    /// new capacity); growing grants waiting acquirers at once.
    pub fn set_capacity(&self, n: usize) {
        let woken = {
            let mut state = self.lock();
            state.capacity = n;
            state.grant()
        };
        woken.into_iter().for_each(Waker::wake);
    }

    pub fn capacity(&self) -> usize {
        self.lock().capacity
    }

    pub fn in_use(&self) -> usize {
        self.lock().in_use
    }

    pub fn waiting(&self) -> usize {
        self.lock().waiters.len()
    }

    fn release(&self) {
        let woken = {
            let mut state = self.lock();
            state.in_use = state.in_use.saturating_sub(1);
            state.grant()
        };
        woken.into_iter().for_each(Waker::wake);
    }

    // Critical sections only move integers and map entries and cannot panic half-way, so a
    // poisoned guard still holds consistent state; recovering beats stranding every waiter.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for PrioritySemaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("PrioritySemaphore")
            .field("capacity", &state.capacity)
            .field("in_use", &state.in_use)
            .field("waiting", &state.waiters.len())
            .field("aging", &self.aging)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Unpolled,
    Waiting,
    Done,
}

/// The future returned by [`PrioritySemaphore::acquire`]. Dropping it before completion removes
/// its waiter; if the slot had already been granted, the slot passes to the next waiter.
#[must_use = "a semaphore slot is only acquired when the future is awaited"]
pub struct Acquire {
    semaphore: Arc<PrioritySemaphore>,
    key: Key,
    stage: Stage,
}

impl Future for Acquire {
    type Output = Permit;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Permit> {
        let this = &mut *self;
        let mut state = this.semaphore.lock();
        match this.stage {
            // Polled after completion: behave like a fused future that never resolves again.
            Stage::Done => Poll::Pending,
            Stage::Unpolled => {
                // Every release and resize grants waiters first, so a free slot means nobody waits.
                if state.in_use < state.capacity {
                    state.in_use += 1;
                    drop(state);
                    this.stage = Stage::Done;
                    return Poll::Ready(Permit { semaphore: Arc::clone(&this.semaphore) });
                }
                state.waiters.insert(this.key, cx.waker().clone());
                this.stage = Stage::Waiting;
                Poll::Pending
            }
            Stage::Waiting => {
                if let Some(waker) = state.waiters.get_mut(&this.key) {
                    if !waker.will_wake(cx.waker()) {
                        waker.clone_from(cx.waker());
                    }
                    return Poll::Pending;
                }
                drop(state);
                this.stage = Stage::Done;
                Poll::Ready(Permit { semaphore: Arc::clone(&this.semaphore) })
            }
        }
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        if self.stage != Stage::Waiting {
            return;
        }
        let still_waiting = self.semaphore.lock().waiters.remove(&self.key).is_some();
        if !still_waiting {
            // Granted between the last poll and this drop: the slot is ours to give back.
            self.semaphore.release();
        }
    }
}

impl fmt::Debug for Acquire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acquire").field("deadline", &self.key.0).field("stage", &self.stage).finish_non_exhaustive()
    }
}

/// One held slot; dropping it releases the slot to the waiter with the earliest virtual deadline.
pub struct Permit {
    semaphore: Arc<PrioritySemaphore>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.semaphore.release();
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Permit")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn poll(fut: &mut Pin<Box<Acquire>>) -> Option<Permit> {
        match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(p) => Some(p),
            Poll::Pending => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn urgency_orders_waiters_and_aging_lets_old_waiters_win() {
        let sem = PrioritySemaphore::new(1, Duration::from_secs(1));
        let held = sem.acquire(0).await;
        let mut old_low = Box::pin(sem.acquire(5));
        assert!(poll(&mut old_low).is_none());
        tokio::time::advance(Duration::from_secs(10)).await;
        // Deadline 0+5 s against 10+0 s: the old, low-priority waiter is due first.
        let mut new_high = Box::pin(sem.acquire(0));
        assert!(poll(&mut new_high).is_none());
        assert_eq!(sem.waiting(), 2);
        drop(held);
        let first = poll(&mut old_low).expect("the aged waiter is granted");
        assert!(poll(&mut new_high).is_none());
        drop(first);
        assert!(poll(&mut new_high).is_some());
        assert_eq!(sem.in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_granted_but_dropped_acquire_passes_its_slot_on() {
        let sem = PrioritySemaphore::new(1, Duration::from_millis(10));
        let held = sem.acquire(0).await;
        let mut a = Box::pin(sem.acquire(0));
        let mut b = Box::pin(sem.acquire(0));
        assert!(poll(&mut a).is_none());
        assert!(poll(&mut b).is_none());
        drop(held);
        // `a` was granted but is cancelled before it observes the grant.
        assert_eq!(sem.waiting(), 1);
        drop(a);
        assert_eq!(sem.in_use(), 1);
        let permit = poll(&mut b).expect("the slot moved on to b");
        drop(permit);
        assert_eq!(sem.in_use(), 0);
        assert_eq!(sem.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn growing_grants_at_once_and_shrinking_keeps_held_permits() {
        let sem = PrioritySemaphore::new(2, Duration::from_millis(10));
        let p1 = sem.acquire(0).await;
        let p2 = sem.acquire(0).await;
        let mut waiters: Vec<_> = (0..3).map(|_| Box::pin(sem.acquire(0))).collect();
        for w in &mut waiters {
            assert!(poll(w).is_none());
        }
        sem.set_capacity(4);
        assert_eq!(sem.in_use(), 4);
        let p3 = poll(&mut waiters[0]).expect("granted by growth");
        let p4 = poll(&mut waiters[1]).expect("granted by growth");
        assert!(poll(&mut waiters[2]).is_none());
        sem.set_capacity(1);
        assert_eq!(sem.in_use(), 4);
        drop((p1, p2, p3));
        assert!(poll(&mut waiters[2]).is_none(), "still over the shrunk capacity");
        drop(p4);
        assert!(poll(&mut waiters[2]).is_some());
    }
}
