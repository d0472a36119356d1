//! Blocking work on the cache directory (block files, saved listings), run off the async
//! workers, bounded in number and in time.
//!
//! A cache directory can hang (an NFS server gone, a Lustre OST in recovery) or crawl (a busy
//! node disk). Every read of it goes through [`CacheDirIo::run`]: at most a fixed number of
//! such operations run at once, each on the blocking pool, and a caller that gets no answer
//! within the timeout goes on without it (a cache miss), so a sick cache dir costs latency,
//! never a stalled mount. After a timeout the directory is left alone for a while (every
//! operation is a miss at once), so a hung directory costs one timeout, not one per block. An
//! operation that hangs keeps its slot until it returns, so hung threads stay bounded too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

/// Operations on the cache directory that may run at once.
const SLOTS: usize = 16;

/// How long a mount lets one operation on its cache directory take.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// How long the directory is left alone after an operation timed out.
const REST: Duration = Duration::from_secs(30);

/// Runs blocking cache-directory work with a bound on concurrency and time.
pub struct CacheDirIo {
    slots: Arc<Semaphore>,
    timeout: Duration,
    /// Until when operations are skipped, after a timeout.
    resting_until: Mutex<Option<Instant>>,
    /// Operations abandoned because they took longer than the timeout (or found no slot).
    pub timeouts: AtomicU64,
    /// Operations handed to the blocking pool.
    pub operations: AtomicU64,
}

impl CacheDirIo {
    /// Allows each operation `timeout` (waiting for a slot included).
    pub fn new(timeout: Duration) -> CacheDirIo {
        CacheDirIo {
            slots: Arc::new(Semaphore::new(SLOTS)),
            timeout,
            resting_until: Mutex::new(None),
            timeouts: AtomicU64::new(0),
            operations: AtomicU64::new(0),
        }
    }

    /// The result of `work`, or `None` when it did not finish within the timeout (or the
    /// directory is resting after a timeout).
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        if self.resting_until.lock().expect("rest state poisoned").is_some_and(|until| Instant::now() < until) {
            return None;
        }
        let done = tokio::time::timeout(self.timeout, async {
            let slot = self.slots.clone().acquire_owned().await.expect("cache-dir slots are never closed");
            self.operations.fetch_add(1, Ordering::Relaxed);
            tokio::task::spawn_blocking(move || {
                let _slot = slot;
                work()
            })
            .await
            .ok()
        })
        .await;
        match done {
            Ok(result) => result,
            Err(_) => {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
                let mut resting = self.resting_until.lock().expect("rest state poisoned");
                if resting.is_none_or(|until| until <= Instant::now()) {
                    tracing::warn!(timeout = ?self.timeout, rest = ?REST, "the cache directory did not answer in time; reading from memory and S3 meanwhile");
                }
                *resting = Some(Instant::now() + REST);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hung_work_is_abandoned_then_the_directory_rests() {
        let io = CacheDirIo::new(Duration::from_millis(50));
        assert_eq!(io.run(|| 7).await, Some(7));
        let (release, hang) = std::sync::mpsc::channel::<()>();
        let started = Instant::now();
        assert_eq!(io.run(move || hang.recv().ok()).await, None);
        assert!(started.elapsed() < Duration::from_millis(500));
        assert_eq!(io.timeouts.load(Ordering::Relaxed), 1);
        // Resting: even work that would answer at once is skipped, without waiting.
        let started = Instant::now();
        assert_eq!(io.run(|| 7).await, None);
        assert!(started.elapsed() < Duration::from_millis(20));
        assert_eq!(io.slots.available_permits(), SLOTS - 1, "the hung operation keeps its slot");
        drop(release);
        *io.resting_until.lock().unwrap() = None;
        assert_eq!(io.run(|| 7).await, Some(7));
    }
}
