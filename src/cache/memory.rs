//! The memory bound of the caches that keep bytes (the block cache's memory tier, decoded
//! Blosc blocks of MRC views, recent exact reads): an LRU weighed in bytes (moka) that is held
//! to its capacity as values arrive.
//!
//! moka applies its bound lazily: an inserted value is kept at once, but eviction runs only
//! once 64 writes are logged (or 300 ms have passed). With 512 KiB values that is up to 32 MiB
//! beyond the capacity, more than a small `--max-memory` (a mount with a 32 MiB budget reading
//! an MRC view held 50 MiB more than its bound). Here the bound is applied whenever the bytes
//! inserted since it was last applied reach 1/16 of the capacity.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

/// Bytes kept under a key, least recently used first out, within a capacity in bytes.
pub struct BytesLru<K> {
    cache: moka::future::Cache<K, Bytes>,
    /// Bytes inserted since the bound was last applied.
    unsettled: AtomicU64,
    /// How many bytes may be inserted before the bound is applied again.
    slack: u64,
}

impl<K: Hash + Eq + Send + Sync + 'static> BytesLru<K> {
    /// An empty cache of at most `capacity` bytes.
    pub fn new(capacity: u64) -> BytesLru<K> {
        let cache = moka::future::Cache::builder()
            .max_capacity(capacity)
            .weigher(|_, bytes: &Bytes| u32::try_from(bytes.len()).unwrap_or(u32::MAX))
            // TinyLFU would refuse new sequential blocks in favour of old ones.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        BytesLru { cache, unsettled: AtomicU64::new(0), slack: (capacity / 16).max(1) }
    }

    /// The bytes under `key`, if kept.
    pub async fn get(&self, key: &K) -> Option<Bytes> {
        self.cache.get(key).await
    }

    /// Whether bytes are kept under `key`.
    pub fn contains_key(&self, key: &K) -> bool {
        self.cache.contains_key(key)
    }

    /// Keeps `bytes` under `key`.
    pub async fn insert(&self, key: K, bytes: Bytes) {
        let len = bytes.len() as u64;
        self.cache.insert(key, bytes).await;
        self.inserted(len).await;
    }

    /// The bytes under `key`, or those `init` makes, kept, once however many callers ask at the
    /// same time.
    pub async fn try_get_with<E: Send + Sync + 'static>(
        &self,
        key: K,
        init: impl std::future::Future<Output = Result<Bytes, E>>,
    ) -> Result<Bytes, Arc<E>>
    where
        K: Clone,
    {
        let entry = self.cache.entry(key).or_try_insert_with(init).await?;
        if entry.is_fresh() {
            self.inserted(entry.value().len() as u64).await;
        }
        Ok(entry.into_value())
    }

    /// Drops what is kept under `key`.
    pub async fn invalidate(&self, key: &K) {
        self.cache.invalidate(key).await;
    }

    /// The most bytes it keeps.
    pub fn capacity(&self) -> u64 {
        self.cache.policy().max_capacity().unwrap_or(u64::MAX)
    }

    /// Bytes kept (as of the last time the bound was applied).
    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// Applies the bound now.
    pub async fn settle(&self) {
        self.cache.run_pending_tasks().await;
    }

    /// Counts `len` bytes inserted, and applies the bound once they add up to the slack.
    async fn inserted(&self, len: u64) {
        if self.unsettled.fetch_add(len, Ordering::Relaxed) + len >= self.slack {
            self.unsettled.store(0, Ordering::Relaxed);
            self.settle().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the process holds is what the cache holds: count the bytes of values still alive.
    #[tokio::test]
    async fn inserted_bytes_never_pass_the_capacity_by_more_than_the_slack_and_one_value() {
        let capacity = 16 << 20;
        let lru = BytesLru::new(capacity);
        let block = 512 << 10;
        for i in 0..200u64 {
            if i % 2 == 0 {
                lru.insert(i, Bytes::from(vec![1u8; block])).await;
            } else {
                lru.try_get_with(i, async { Ok::<_, ()>(Bytes::from(vec![2u8; block])) }).await.unwrap();
            }
            let kept = (0..=i).filter(|k| lru.contains_key(k)).count() as u64 * block as u64;
            assert!(kept <= capacity + capacity / 16 + block as u64, "{kept} bytes kept after {} inserts", i + 1);
        }
        // The most recent values are the ones kept.
        assert!(lru.contains_key(&199) && lru.contains_key(&190) && !lru.contains_key(&0));
    }
}
