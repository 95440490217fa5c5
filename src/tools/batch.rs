//! The batch collector: groups items that arrive within a window after the first one.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::runtime::Handle;

struct Window<T> {
    items: Vec<T>,
    /// Bumped whenever a window is taken, so a timer that outlived its window does nothing.
    generation: u64,
}

/// Collects items into batches of at most `max`. The first item of a window starts a timer; when
/// it fires, whatever the window holds is flushed. A window that fills up is returned to the
/// caller at once instead of waiting out the timer.
pub(crate) struct Batcher<T> {
    window: Duration,
    max: usize,
    state: Arc<Mutex<Window<T>>>,
}

impl<T: Send + 'static> Batcher<T> {
    pub(crate) fn new(window: Duration, max: usize) -> Self {
        Self { window, max: max.max(1), state: Arc::new(Mutex::new(Window { items: Vec::new(), generation: 0 })) }
    }

    /// Adds `item`. Returns a full batch the caller must dispatch. If `item` opened a new window,
    /// a timer is spawned on `handle` that hands the window's items to `flush` when it closes.
    pub(crate) fn push<F>(&self, item: T, handle: &Handle, flush: F) -> Option<Vec<T>>
    where
        F: FnOnce(Vec<T>) + Send + 'static,
    {
        // Only `Vec` pushes and swaps run under the lock, so a poisoned window is still consistent.
        let mut window = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        window.items.push(item);
        if window.items.len() >= self.max {
            window.generation += 1;
            return Some(std::mem::take(&mut window.items));
        }
        if window.items.len() == 1 {
            let timer = WindowTimer { state: Arc::clone(&self.state), generation: window.generation };
            let wait = self.window;
            handle.spawn(async move {
                tokio::time::sleep(wait).await;
                if let Some(items) = timer.close() {
                    flush(items);
                }
            });
        }
        None
    }
}

/// Closes one window. If its task is dropped before the window closes (the runtime shut down),
/// the window's items are dropped with it rather than left in the collector, where nothing would
/// ever take them.
struct WindowTimer<T> {
    state: Arc<Mutex<Window<T>>>,
    generation: u64,
}

impl<T> WindowTimer<T> {
    fn close(&self) -> Option<Vec<T>> {
        let mut window = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if window.generation != self.generation || window.items.is_empty() {
            return None;
        }
        window.generation += 1;
        Some(std::mem::take(&mut window.items))
    }
}

impl<T> Drop for WindowTimer<T> {
    fn drop(&mut self) {
        drop(self.close());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    type Flushed = Arc<StdMutex<Vec<Vec<u32>>>>;

    fn push(b: &Batcher<u32>, item: u32, flushed: &Flushed) -> Option<Vec<u32>> {
        let sink = Arc::clone(flushed);
        b.push(item, &Handle::current(), move |items| sink.lock().unwrap_or_else(PoisonError::into_inner).push(items))
    }

    fn taken(flushed: &Flushed) -> Vec<Vec<u32>> {
        std::mem::take(&mut *flushed.lock().unwrap_or_else(PoisonError::into_inner))
    }

    #[test]
    fn a_window_whose_timer_never_runs_releases_its_items() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap_or_else(|e| panic!("{e}"));
        let item = Arc::new(());
        let b = Batcher::new(Duration::from_secs(60), 10);
        let _ = b.push(Arc::clone(&item), rt.handle(), |_| {});
        assert_eq!(Arc::strong_count(&item), 2);
        drop(rt);
        assert_eq!(Arc::strong_count(&item), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn window_flushes_what_arrived_within_it() {
        let b = Batcher::new(Duration::from_millis(10), 100);
        let flushed = Flushed::default();
        for i in 0..3 {
            assert!(push(&b, i, &flushed).is_none());
        }
        tokio::time::sleep(Duration::from_millis(11)).await;
        assert_eq!(taken(&flushed), [vec![0, 1, 2]]);
        assert!(push(&b, 3, &flushed).is_none());
        tokio::time::sleep(Duration::from_millis(11)).await;
        assert_eq!(taken(&flushed), [vec![3]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_window_returns_at_once_and_its_timer_is_void() {
        let b = Batcher::new(Duration::from_millis(10), 2);
        let flushed = Flushed::default();
        assert!(push(&b, 0, &flushed).is_none());
        assert_eq!(push(&b, 1, &flushed), Some(vec![0, 1]));
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(push(&b, 2, &flushed).is_none());
        // The first window's timer fires at 10 ms and must not take item 2 early.
        tokio::time::sleep(Duration::from_millis(6)).await;
        assert!(taken(&flushed).is_empty());
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(taken(&flushed), [vec![2]]);
    }
}
