//! Block cache: fixed-size blocks of object data keyed by (key, ETag, block index).
//!
//! Two tiers: memory (moka, bounded in bytes, LRU) in front of an optional persistent disk tier
//! ([`disk::DiskCache`]). A block is loaded once however many readers want it at the same time
//! (single-flight): memory, then disk, then one ranged GET, after which the block is written to
//! disk in the background. GETs in flight are capped by a fixed number of fetch slots, so the
//! bytes being downloaded stay within the memory budget however many files are read at once.

pub mod admin;
pub mod disk;

use std::hash::{Hash, Hasher};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::store::{ObjectMeta, ObjectStore, StoreError};
use disk::DiskCache;

/// One block of one object version.
#[derive(Clone, Debug)]
pub struct BlockKey {
    /// The object (its key and ETag identify the block's bytes).
    pub object: Arc<ObjectMeta>,
    /// Block number: the block covers `index * block_size ..` of the object.
    pub index: u64,
}

impl BlockKey {
    /// A stable 64-bit hash of the object's key and ETag (FNV-1a), used for file names.
    pub fn object_hash(&self) -> u64 {
        crate::hash::stable_hash(&[self.object.key.as_bytes(), self.object.etag.as_bytes()])
    }
}

impl PartialEq for BlockKey {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index && self.object.key == other.object.key && self.object.etag == other.object.etag
    }
}

impl Eq for BlockKey {}

impl Hash for BlockKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.object.key.hash(state);
        self.object.etag.hash(state);
        self.index.hash(state);
    }
}

/// Counters of where block data came from.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Blocks served from memory.
    pub memory_hits: AtomicU64,
    /// Blocks served from disk.
    pub disk_hits: AtomicU64,
    /// Blocks fetched from the object store.
    pub fetches: AtomicU64,
}

/// Memory + disk block cache in front of an object store.
pub struct BlockCache {
    store: Arc<dyn ObjectStore>,
    block_size: u64,
    memory: moka::future::Cache<BlockKey, Bytes>,
    disk: Option<Arc<DiskCache>>,
    fetch_slots: Arc<tokio::sync::Semaphore>,
    /// Where block data came from.
    pub stats: CacheStats,
}

impl BlockCache {
    /// A cache of `block_size` blocks holding at most `memory_bytes` in memory, with at most
    /// `fetch_slots` blocks being fetched at once.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        block_size: u64,
        memory_bytes: u64,
        fetch_slots: usize,
        disk: Option<Arc<DiskCache>>,
    ) -> BlockCache {
        let memory = moka::future::Cache::builder()
            .max_capacity(memory_bytes)
            .weigher(|_, block: &Bytes| u32::try_from(block.len()).unwrap_or(u32::MAX))
            // TinyLFU would refuse new sequential blocks in favour of old ones.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        let fetch_slots = Arc::new(tokio::sync::Semaphore::new(fetch_slots.max(1)));
        BlockCache { store, block_size, memory, disk, fetch_slots, stats: CacheStats::default() }
    }

    /// Bytes of blocks held in memory.
    pub fn memory_bytes(&self) -> u64 {
        self.memory.weighted_size()
    }

    /// Whether a fetch could start now without waiting for a slot.
    pub fn has_free_fetch_slot(&self) -> bool {
        self.fetch_slots.available_permits() > 0
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// The byte range block `index` covers in `object`.
    pub fn block_range(&self, object: &ObjectMeta, index: u64) -> Range<u64> {
        let start = index * self.block_size;
        start.min(object.size)..(start + self.block_size).min(object.size)
    }

    /// The blocks holding the bytes `range` (not empty) of an object.
    pub fn blocks_covering(&self, range: &Range<u64>) -> Range<u64> {
        range.start / self.block_size..(range.end - 1) / self.block_size + 1
    }

    /// Bytes of `object` held in memory or on disk (whole blocks; disk copies are not verified).
    pub fn cached_bytes(&self, object: &ObjectMeta) -> u64 {
        let object = Arc::new(object.clone());
        let blocks = (0..object.size.div_ceil(self.block_size)).map(|index| (index, self.block_range(&object, index)));
        self.held_bytes(&object, blocks)
    }

    /// The bytes of those of `blocks` (number and byte range) of `object` that memory or disk
    /// holds.
    pub fn held_bytes(&self, object: &Arc<ObjectMeta>, blocks: impl Iterator<Item = (u64, Range<u64>)>) -> u64 {
        blocks
            .filter(|(index, _)| self.holds(&BlockKey { object: object.clone(), index: *index }))
            .map(|(_, range)| range.end - range.start)
            .sum()
    }

    /// Whether memory or disk holds the block (disk copies are not verified).
    pub fn holds(&self, key: &BlockKey) -> bool {
        self.memory.contains_key(key) || self.disk.as_ref().is_some_and(|d| d.contains(key))
    }

    /// The block, if memory or disk has it; never fetches.
    pub async fn cached(&self, key: &BlockKey) -> Option<Bytes> {
        if let Some(block) = self.memory.get(key).await {
            self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Some(block);
        }
        let block = self.read_disk(key).await?;
        self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
        self.memory.insert(key.clone(), block.clone()).await;
        Some(block)
    }

    /// The block, from memory, disk or one GET shared by all concurrent callers.
    pub async fn get(&self, key: BlockKey) -> Result<Bytes, StoreError> {
        let (object, range) = (key.object.clone(), self.block_range(&key.object, key.index));
        self.load(key, true, async move {
            let _slot = self.fetch_slots.acquire().await.expect("fetch slots are never closed");
            let block = self.store.get_range(&object, range).await?;
            self.stats.fetches.fetch_add(1, Ordering::Relaxed);
            Ok(block)
        })
        .await
    }

    /// A block derived from other data (an MRC view's): from memory, or `compute` (run once
    /// for all concurrent callers). Kept in memory only: what it is computed from is on disk.
    pub async fn get_or_compute(
        &self,
        key: BlockKey,
        compute: impl std::future::Future<Output = Result<Bytes, StoreError>>,
    ) -> Result<Bytes, StoreError> {
        self.load(key, false, compute).await
    }

    /// The block from memory, else (when `persisted`) from disk, else from `load`, whose
    /// result is kept in memory and (when `persisted`) written to disk in the background.
    async fn load(
        &self,
        key: BlockKey,
        persisted: bool,
        load: impl std::future::Future<Output = Result<Bytes, StoreError>>,
    ) -> Result<Bytes, StoreError> {
        if let Some(block) = self.memory.get(&key).await {
            self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(block);
        }
        let loader_key = key.clone();
        self.memory
            .try_get_with(key, async move {
                let disk = self.disk.as_ref().filter(|_| persisted);
                if disk.is_some() {
                    if let Some(block) = self.read_disk(&loader_key).await {
                        self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(block);
                    }
                }
                let block = load.await?;
                if let Some(disk) = disk {
                    let (disk, block) = (disk.clone(), block.clone());
                    tokio::task::spawn_blocking(move || disk.write(&loader_key, &block));
                }
                Ok(block)
            })
            .await
            .map_err(|e: Arc<StoreError>| (*e).clone())
    }

    async fn read_disk(&self, key: &BlockKey) -> Option<Bytes> {
        let disk = self.disk.clone()?;
        let key = key.clone();
        tokio::task::spawn_blocking(move || disk.read(&key)).await.ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{PrefixListing, StoreFuture};
    use std::time::{Duration, SystemTime};

    /// A store whose objects are `size` bytes of `offset % 251`, counting GETs.
    #[derive(Default)]
    struct CountingStore {
        gets: AtomicU64,
    }

    impl ObjectStore for CountingStore {
        fn list_prefix<'a>(&'a self, _: &'a str) -> StoreFuture<'a, PrefixListing> {
            Box::pin(async { Ok(PrefixListing::default()) })
        }

        fn list_all<'a>(&'a self, _: &'a str) -> StoreFuture<'a, Vec<ObjectMeta>> {
            Box::pin(async { Ok(Vec::new()) })
        }

        fn get_range<'a>(&'a self, _: &'a ObjectMeta, range: Range<u64>) -> StoreFuture<'a, Bytes> {
            Box::pin(async move {
                self.gets.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(30)).await;
                Ok(range.map(|i| (i % 251) as u8).collect::<Vec<u8>>().into())
            })
        }
    }

    fn object() -> Arc<ObjectMeta> {
        Arc::new(ObjectMeta { key: "k".into(), size: 10_000, etag: "\"e\"".into(), mtime: SystemTime::UNIX_EPOCH })
    }

    #[tokio::test]
    async fn concurrent_readers_of_one_block_cause_one_get() {
        let store = Arc::new(CountingStore::default());
        let cache = Arc::new(BlockCache::new(store.clone(), 4096, 1 << 20, 8, None));
        let object = object();
        let readers: Vec<_> = (0..16)
            .map(|_| {
                let (cache, object) = (cache.clone(), object.clone());
                tokio::spawn(async move { cache.get(BlockKey { object, index: 1 }).await.unwrap() })
            })
            .collect();
        for reader in readers {
            let block = reader.await.unwrap();
            assert_eq!(block.len(), 4096);
            assert_eq!(block[0], (4096 % 251) as u8);
        }
        assert_eq!(store.gets.load(Ordering::SeqCst), 1);
        // The last block is short.
        assert_eq!(cache.get(BlockKey { object, index: 2 }).await.unwrap().len(), 10_000 - 8192);
    }

    #[tokio::test]
    async fn memory_tier_respects_its_bound() {
        let store = Arc::new(CountingStore::default());
        let cache = BlockCache::new(store, 1000, 5000, 8, None);
        let object = Arc::new(ObjectMeta { size: 1_000_000, ..(*object()).clone() });
        for index in 0..50 {
            cache.get(BlockKey { object: object.clone(), index }).await.unwrap();
        }
        cache.memory.run_pending_tasks().await;
        assert!(cache.memory.weighted_size() <= 5000, "{}", cache.memory.weighted_size());
    }

    #[tokio::test]
    async fn disk_tier_serves_a_new_cache_without_gets_and_refetches_bad_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(CountingStore::default());
        let object = object();
        let key = BlockKey { object: object.clone(), index: 0 };
        {
            let disk = Arc::new(DiskCache::open(dir.path(), 1 << 20).unwrap());
            let cache = BlockCache::new(store.clone(), 4096, 1 << 20, 8, Some(disk.clone()));
            cache.get(key.clone()).await.unwrap();
            // Let the background write land.
            for _ in 0..100 {
                if disk.used_bytes() > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        assert_eq!(store.gets.load(Ordering::SeqCst), 1);
        let disk = Arc::new(DiskCache::open(dir.path(), 1 << 20).unwrap());
        let fresh = BlockCache::new(store.clone(), 4096, 1 << 20, 8, Some(disk));
        let block = fresh.get(key.clone()).await.unwrap();
        assert_eq!(store.gets.load(Ordering::SeqCst), 1, "a persisted block was fetched again");
        assert_eq!(block[..], (0..4096u64).map(|i| (i % 251) as u8).collect::<Vec<_>>()[..]);

        // Corrupt the file: the next cold cache must refetch, and serve the right bytes.
        for shard in std::fs::read_dir(dir.path().join("blocks")).unwrap().flatten() {
            for file in std::fs::read_dir(shard.path()).unwrap().flatten() {
                let mut raw = std::fs::read(file.path()).unwrap();
                let last = raw.len() - 1;
                raw[last] ^= 0x55;
                std::fs::write(file.path(), raw).unwrap();
            }
        }
        let disk = Arc::new(DiskCache::open(dir.path(), 1 << 20).unwrap());
        let cold = BlockCache::new(store.clone(), 4096, 1 << 20, 8, Some(disk));
        assert_eq!(cold.get(key).await.unwrap(), block);
        assert_eq!(store.gets.load(Ordering::SeqCst), 2);
    }
}
