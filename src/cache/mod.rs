//! Block cache: fixed-size blocks of object data keyed by (key, ETag, block index).
//!
//! Two tiers: memory ([`memory::BytesLru`], bounded in bytes) in front of an optional persistent disk tier
//! ([`disk::DiskCache`]). A block is loaded once however many readers want it at the same time
//! (single-flight): memory, then disk, then S3. A block a reader waits for is fetched by one
//! ranged GET of its own; read-ahead fetches runs of blocks within one aligned part
//! ([`PART_SIZE`]) by one GET each. Fetched blocks go to the disk tier through the
//! [`write_behind::WriteBehind`] stage, and disk reads go through [`offload::CacheDirIo`], so
//! neither a slow nor a hung cache directory slows a read. GETs in flight are capped by a fixed
//! number of fetch slots (one per block), so the bytes being downloaded stay within the memory
//! budget however many files are read at once.
//!
//! An optional second disk tier, a shared cache directory (on the cluster file system, filled
//! by `cdpfs prefetch`), is read after the local one and before S3, as CVMFS's tiered cache: a
//! block found there is copied into the local tier; it is written only when the mount is told to.

pub mod admin;
pub mod bound;
pub mod disk;
pub mod memory;
pub mod offload;
pub mod write_behind;

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;

use crate::store::{ObjectMeta, ObjectStore, StoreError};
use disk::DiskCache;
use memory::BytesLru;
use offload::CacheDirIo;
use write_behind::WriteBehind;

/// The one block geometry: the unit of the memory and disk tiers and of a demand GET.
pub const BLOCK_SIZE: u64 = 512 << 10;

/// Read-ahead GETs cover at most one part, aligned to the object's start: large enough that
/// the per-request cost is small, and the same 8 MiB parts boto3 and awscli read in, so a site
/// cache in front of S3 shares its entries with them.
pub const PART_SIZE: u64 = 8 << 20;

/// A block a read-ahead GET is fetching, awaited by each of its readers.
/// What [`BlockCache::load`] does with the cache directories.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tiers {
    /// Looks for the block there first, and writes it there once loaded.
    ReadAndWrite,
    /// Only writes it there (a caller that has just looked).
    Write,
    /// Neither (blocks derived from others, which are there).
    Neither,
}

/// Released blocks remembered at most (32 GiB of data in 512 KiB blocks, in about 2 MiB).
const RELEASED_LIMIT: usize = 1 << 16;

/// Read-ahead's marks on the blocks streams have read and dropped from memory: the kernel's page
/// cache holds them (or, past it, the reader had them), so read-ahead leaves them out (a stream
/// reading up to another's start would fetch what that one has read already).
#[derive(Default)]
struct Released {
    blocks: HashSet<BlockKey>,
    /// Released blocks a reader asked for again since. One such block is a reader taking its
    /// share of a block another stream read (striped readers meet in one block); two in a row
    /// are a reader going through the object again, for whom read-ahead must fetch them again.
    asked_again: HashSet<BlockKey>,
}

impl Released {
    fn mark(&mut self, key: BlockKey) {
        if self.blocks.len() >= RELEASED_LIMIT {
            // Only read-ahead looks at these: forgetting them costs a little read-ahead.
            self.blocks.clear();
        }
        self.blocks.insert(key);
    }

    /// Notes a demand read of `key`; true when it and the block before it were both released:
    /// a reader is going through the object again.
    fn asked_again(&mut self, key: &BlockKey) -> bool {
        if !self.blocks.remove(key) {
            return false;
        }
        let previous = key.index.checked_sub(1).map(|index| BlockKey { object: key.object.clone(), index });
        if previous.is_some_and(|previous| self.asked_again.remove(&previous)) {
            return true;
        }
        if self.asked_again.len() >= RELEASED_LIMIT {
            self.asked_again.clear();
        }
        self.asked_again.insert(key.clone());
        false
    }

    /// Drops every mark on `object`'s blocks.
    fn clear(&mut self, object: &ObjectMeta) {
        self.blocks.retain(|key| key.object.key != object.key);
        self.asked_again.retain(|key| key.object.key != object.key);
    }
}

type PendingBlock = futures_util::future::Shared<futures_util::future::BoxFuture<'static, Result<Bytes, StoreError>>>;

/// Removes a block a reader's own GET is fetching from the pending blocks when dropped.
struct PendingGuard<'a> {
    pending: &'a std::sync::Mutex<HashMap<BlockKey, PendingBlock>>,
    key: &'a BlockKey,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.lock().expect("pending blocks poisoned").remove(self.key);
    }
}

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

/// Counters of where block data came from and where it went.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Blocks served from memory.
    pub memory_hits: AtomicU64,
    /// Blocks served from disk.
    pub disk_hits: AtomicU64,
    /// Blocks looked for in the cache directory and not found there (each a file-system
    /// lookup: what a mount costs a shared or network cache directory).
    pub disk_misses: AtomicU64,
    /// Blocks served from the shared cache directory.
    pub shared_hits: AtomicU64,
    /// Blocks fetched from the object store.
    pub fetches: AtomicU64,
    /// Zarr chunk objects fetched ahead of their readers (see [`crate::data::sweep`]).
    pub chunks_fetched_ahead: AtomicU64,
}

/// A disk tier as the block cache uses it: the files, the write-behind stage, the reads.
pub struct DiskTier {
    files: Arc<DiskCache>,
    writes: Option<WriteBehind>,
    reads: Arc<CacheDirIo>,
}

/// The write counters of a tier that is not written.
static NO_WRITES: write_behind::WriteCounters = write_behind::WriteCounters {
    written: AtomicU64::new(0),
    dropped: AtomicU64::new(0),
    refused: AtomicU64::new(0),
    queued_bytes: AtomicU64::new(0),
    paused: AtomicU64::new(0),
};

impl DiskTier {
    /// `files`, written through a write-behind queue of at most `queue_bytes` (unless the
    /// directory could only be opened read-only: then never written), read through `reads`.
    pub fn new(files: Arc<DiskCache>, queue_bytes: u64, reads: Arc<CacheDirIo>) -> DiskTier {
        if files.read_only() {
            return DiskTier::read_only(files, reads);
        }
        DiskTier { writes: Some(WriteBehind::start(files.clone(), queue_bytes, 2)), files, reads }
    }

    /// `files`, only read (through `reads`).
    pub fn read_only(files: Arc<DiskCache>, reads: Arc<CacheDirIo>) -> DiskTier {
        DiskTier { writes: None, files, reads }
    }

    /// Counters of the write-behind stage.
    pub fn writes(&self) -> &write_behind::WriteCounters {
        self.writes.as_ref().map_or(&NO_WRITES, WriteBehind::counters)
    }

    /// Queues the block to be written, if this tier is written.
    fn submit(&self, key: BlockKey, block: Bytes) {
        if let Some(writes) = &self.writes {
            writes.submit(key, block);
        }
    }

    /// Which of `keys` the directory has a file for, asked in one trip to the blocking pool (a
    /// directory that does not answer in time has none).
    async fn present(&self, keys: &[BlockKey]) -> Vec<bool> {
        let (files, asked) = (self.files.clone(), keys.to_vec());
        let found = self.reads.run(move || asked.iter().map(|key| files.present(key)).collect()).await;
        found.unwrap_or_else(|| vec![false; keys.len()])
    }

    /// Reads of the cache directory abandoned as too slow.
    pub fn read_timeouts(&self) -> u64 {
        self.reads.timeouts.load(Ordering::Relaxed)
    }

    /// Operations run on this tier's directory off the I/O threads (for `--cache-dir` also its
    /// saved listings and API answers, which share its gate).
    pub fn read_operations(&self) -> u64 {
        self.reads.operations.load(Ordering::Relaxed)
    }
}

/// Memory + disk block cache in front of an object store.
pub struct BlockCache {
    store: Arc<dyn ObjectStore>,
    block_size: u64,
    memory: BytesLru<BlockKey>,
    disk: Option<DiskTier>,
    /// The shared cache directory, read after `disk`.
    shared: Option<DiskTier>,
    fetch_slots: Arc<tokio::sync::Semaphore>,
    /// Blocks GETs are fetching (read-ahead runs and blocks readers wait for).
    pending: std::sync::Mutex<HashMap<BlockKey, PendingBlock>>,
    /// Blocks in one read-ahead part (never more than there are fetch slots).
    part_blocks: u64,
    /// Blocks streams have read and dropped from memory ([`BlockCache::forget`]).
    released: std::sync::Mutex<Released>,
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
        disk: Option<DiskTier>,
    ) -> BlockCache {
        let memory = BytesLru::new(memory_bytes);
        let fetch_slots = fetch_slots.max(1);
        let part_blocks = (PART_SIZE / block_size).clamp(1, fetch_slots as u64);
        let fetch_slots = Arc::new(tokio::sync::Semaphore::new(fetch_slots));
        BlockCache {
            store,
            block_size,
            memory,
            disk,
            shared: None,
            fetch_slots,
            pending: Default::default(),
            part_blocks,
            released: Default::default(),
            stats: CacheStats::default(),
        }
    }

    /// Reads blocks from `shared` (a shared cache directory) after the disk tier.
    pub fn with_shared(mut self, shared: DiskTier) -> BlockCache {
        self.shared = Some(shared);
        self
    }

    /// The most bytes of blocks memory holds.
    pub fn memory_capacity(&self) -> u64 {
        self.memory.capacity()
    }

    /// Bytes of blocks held in memory.
    pub fn memory_bytes(&self) -> u64 {
        self.memory.weighted_size()
    }

    /// The disk tier, if there is one.
    pub fn disk(&self) -> Option<&DiskTier> {
        self.disk.as_ref()
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Bytes in one read-ahead part.
    pub fn part_size(&self) -> u64 {
        self.part_blocks * self.block_size
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

    /// Whether memory or disk holds the block (answered from memory; disk copies are not
    /// verified).
    pub fn holds(&self, key: &BlockKey) -> bool {
        self.memory.contains_key(key) || self.on_disk(key)
    }

    /// Whether memory or disk holds the block, or a GET is fetching it.
    pub fn holds_or_fetches(&self, key: &BlockKey) -> bool {
        self.holds(key) || self.pending.lock().expect("pending blocks poisoned").contains_key(key)
    }

    fn on_disk(&self, key: &BlockKey) -> bool {
        [&self.disk, &self.shared].into_iter().flatten().any(|tier| tier.files.contains(key))
    }

    /// The block, if memory has it.
    pub async fn in_memory(&self, key: &BlockKey) -> Option<Bytes> {
        let block = self.memory.get(key).await?;
        self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
        Some(block)
    }

    /// Drops `blocks` of `object` from memory (a stream has read them; the disk tier keeps
    /// its copies).
    pub async fn forget(&self, object: &Arc<ObjectMeta>, blocks: Range<u64>) {
        self.evict(object, blocks.clone()).await;
        let mut released = self.released.lock().expect("released blocks poisoned");
        for index in blocks {
            released.mark(BlockKey { object: object.clone(), index });
        }
    }

    /// Drops `blocks` of `object` from memory (only; read-ahead is not told).
    pub async fn evict(&self, object: &Arc<ObjectMeta>, blocks: Range<u64>) {
        for index in blocks {
            self.memory.invalidate(&BlockKey { object: object.clone(), index }).await;
        }
    }

    /// Lets read-ahead fetch every block of `object` again, including those streams have read
    /// and dropped (a reader through the page cache after passes that bypassed it).
    pub fn read_ahead_everything(&self, object: &ObjectMeta) {
        self.released.lock().expect("released blocks poisoned").clear(object);
    }

    /// The block, if memory or disk has it or a GET is fetching it; never starts a fetch.
    pub async fn cached(&self, key: &BlockKey) -> Option<Bytes> {
        if let Some(block) = self.in_memory(key).await {
            return Some(block);
        }
        let pending = self.pending.lock().expect("pending blocks poisoned").get(key).cloned();
        if let Some(fetch) = pending {
            return fetch.await.ok();
        }
        let block = self.read_tiers(key).await?;
        self.memory.insert(key.clone(), block.clone()).await;
        Some(block)
    }

    /// The block, from memory, disk, a read-ahead GET that covers it, or one GET of its own,
    /// shared by all concurrent callers.
    pub async fn get(&self, key: BlockKey) -> Result<Bytes, StoreError> {
        let (loader_key, range) = (key.clone(), self.block_range(&key.object, key.index));
        self.load(key, Tiers::ReadAndWrite, async move {
            // Looked up only on a miss: memory hits take no lock. A block no GET is fetching
            // yet gets one of its own, registered as pending so that read-ahead leaves it out.
            let (block, own) = {
                let mut pending = self.pending.lock().expect("pending blocks poisoned");
                match pending.get(&loader_key) {
                    Some(block) => (block.clone(), false),
                    None => {
                        let (store, object, slots) =
                            (self.store.clone(), loader_key.object.clone(), self.fetch_slots.clone());
                        let fetch: PendingBlock = async move {
                            let _slot = slots.acquire_owned().await.expect("fetch slots are never closed");
                            store.get_range(&object, range).await
                        }
                        .boxed()
                        .shared();
                        pending.insert(loader_key.clone(), fetch.clone());
                        // Read again, with the block before it, after streams dropped them: the
                        // page cache has lost this object's pages (or never had them: a pass
                        // past it), so read-ahead may fetch them again. (One block alone is a
                        // striped reader's share of the block where its stripe meets the next.)
                        let mut released = self.released.lock().expect("released blocks poisoned");
                        if released.asked_again(&loader_key) {
                            released.clear(&loader_key.object);
                        }
                        (fetch, true)
                    }
                }
            };
            // Unregistered when done, or when this load is abandoned.
            let _registered = own.then(|| PendingGuard { pending: &self.pending, key: &loader_key });
            self.fetched(block).await
        })
        .await
    }

    /// The block a GET is fetching, counted as fetched when it arrives.
    async fn fetched(&self, block: PendingBlock) -> Result<Bytes, StoreError> {
        let block = block.await?;
        self.stats.fetches.fetch_add(1, Ordering::Relaxed);
        Ok(block)
    }

    /// Loads the block into the tiers in the background ([`BlockCache::get`]).
    pub fn get_in_background(self: &Arc<Self>, key: BlockKey) {
        let cache = self.clone();
        tokio::spawn(async move { cache.get(key).await });
    }

    /// Loads `blocks` of `object` in the background while fetch slots are free: blocks on disk
    /// from disk, the others by one GET per run of missing blocks within a part. A reader that
    /// wants one of them meanwhile waits for that GET.
    /// Returns where it stopped: `blocks.end`, or the first block it had no fetch slots for
    /// (the caller asks again later).
    pub fn prefetch(self: &Arc<Self>, object: &Arc<ObjectMeta>, blocks: Range<u64>) -> u64 {
        let mut next = blocks.start;
        while next < blocks.end {
            let part_end = ((next / self.part_blocks + 1) * self.part_blocks).min(blocks.end);
            let key = |index| BlockKey { object: object.clone(), index };
            // What is missing is decided and the run registered under one lock, so that two
            // readers of one stream asking at the same time do not both start it.
            let (on_disk, mut out_of_slots) = {
                let mut pending = self.pending.lock().expect("pending blocks poisoned");
                let released = self.released.lock().expect("released blocks poisoned");
                let missing = (next..part_end).filter(|&i| {
                    !self.memory.contains_key(&key(i))
                        && !pending.contains_key(&key(i))
                        && !released.blocks.contains(&key(i))
                });
                let (on_disk, to_fetch): (Vec<u64>, Vec<u64>) = missing.partition(|&i| self.on_disk(&key(i)));
                let mut out_of_slots = false;
                if let (Some(&first), Some(&last)) = (to_fetch.first(), to_fetch.last()) {
                    let run = first..last + 1;
                    match self.fetch_slots.clone().try_acquire_many_owned((run.end - run.start) as u32) {
                        Ok(slots) => self.start_run(object, run, slots, &mut pending),
                        Err(_) => out_of_slots = true,
                    }
                }
                (on_disk, out_of_slots)
            };
            // Loads from disk take fetch slots too: the blocks they bring into memory count
            // in the same bound as those GETs bring.
            for index in on_disk {
                let Ok(slot) = self.fetch_slots.clone().try_acquire_owned() else {
                    out_of_slots = true;
                    break;
                };
                let (cache, key) = (self.clone(), key(index));
                tokio::spawn(async move {
                    let _slot = slot;
                    cache.get(key).await
                });
            }
            if out_of_slots {
                return next;
            }
            next = part_end;
        }
        blocks.end
    }

    /// Starts loading the consecutive blocks `run` of `object`: those a cache directory has
    /// from there, the others by one GET. Each block is registered as pending at once (so a
    /// reader of one of them waits for it instead of fetching the block again) and can be read
    /// as soon as its own bytes have arrived, not the whole run's; each is loaded into the
    /// tiers as it comes.
    fn start_run(
        self: &Arc<Self>,
        object: &Arc<ObjectMeta>,
        run: Range<u64>,
        slots: tokio::sync::OwnedSemaphorePermit,
        pending: &mut HashMap<BlockKey, PendingBlock>,
    ) {
        let failure: Arc<std::sync::OnceLock<StoreError>> = Arc::default();
        let (senders, arrivals): (Vec<_>, Vec<_>) = run.clone().map(|_| tokio::sync::oneshot::channel()).unzip();
        let keys: Vec<BlockKey> = run.map(|index| BlockKey { object: object.clone(), index }).collect();
        {
            for (key, arrival) in keys.iter().zip(arrivals) {
                let failure = failure.clone();
                let block: PendingBlock = async move {
                    arrival.await.map_err(|_| {
                        failure.get().cloned().unwrap_or_else(|| StoreError::Other("read-ahead GET abandoned".into()))
                    })
                }
                .boxed()
                .shared();
                pending.insert(key.clone(), block);
            }
        }
        let fetched: Vec<PendingBlock> = keys.iter().map(|key| pending[key].clone()).collect();
        let (cache, object, first) = (self.clone(), object.clone(), keys[0].index);
        tokio::spawn(async move {
            let senders = std::sync::Mutex::new(senders.into_iter().map(Some).collect::<Vec<_>>());
            let send = |number: usize, block: Bytes| {
                let sender = senders.lock().expect("run senders poisoned").get_mut(number).and_then(Option::take);
                if let Some(sender) = sender {
                    let _ = sender.send(block);
                }
            };
            // Blocks a cache directory has (the index of a tier another process writes to may
            // not know them yet) come from there; the GET covers the others.
            let in_tiers = cache.read_run_from_tiers(&keys).await;
            let mut missing = Vec::new();
            for (number, (key, block)) in keys.iter().zip(in_tiers).enumerate() {
                match block {
                    Some(block) => {
                        cache.memory.insert(key.clone(), block.clone()).await;
                        send(number, block);
                    }
                    None => missing.push(number),
                }
            }
            // The GET's blocks go into memory and the disk tier as each arrives (the cache
            // directories were just looked in); the run is unregistered once all are in.
            let loads = missing.iter().map(|&number| {
                let (cache, key, block) = (cache.clone(), keys[number].clone(), fetched[number].clone());
                async move {
                    let _ = cache.load(key, Tiers::Write, cache.fetched(block)).await;
                }
            });
            let loaded = tokio::spawn({
                let (cache, keys) = (cache.clone(), keys.clone());
                let loads: Vec<_> = loads.collect();
                async move {
                    futures_util::future::join_all(loads).await;
                    let mut pending = cache.pending.lock().expect("pending blocks poisoned");
                    for key in &keys {
                        pending.remove(key);
                    }
                }
            });
            if let (Some(&low), Some(&high)) = (missing.first(), missing.last()) {
                let index = |number: usize| first + number as u64;
                let bytes = cache.block_range(&object, index(low)).start..cache.block_range(&object, index(high)).end;
                let sink = |number: usize, block: Bytes| send(low + number, block);
                let result = cache.store.get_pieces(&object, bytes, cache.block_size, &sink).await;
                if let Err(e) = result {
                    let _ = failure.set(e);
                }
            }
            drop(slots);
            // Blocks the GET did not deliver fail with its error (set above) when their
            // senders go.
            drop(senders);
            let _ = loaded.await;
        });
    }

    /// A block derived from other data (an MRC view's): from memory, or `compute` (run once
    /// for all concurrent callers). Kept in memory only: what it is computed from is on disk.
    pub async fn get_or_compute(
        &self,
        key: BlockKey,
        compute: impl std::future::Future<Output = Result<Bytes, StoreError>>,
    ) -> Result<Bytes, StoreError> {
        self.load(key, Tiers::Neither, compute).await
    }

    /// The block from memory, else (per `tiers`) from disk, else from `load`, whose result is
    /// kept in memory and (per `tiers`) queued to be written to disk.
    async fn load(
        &self,
        key: BlockKey,
        tiers: Tiers,
        load: impl std::future::Future<Output = Result<Bytes, StoreError>>,
    ) -> Result<Bytes, StoreError> {
        if let Some(block) = self.memory.get(&key).await {
            self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(block);
        }
        let loader_key = key.clone();
        self.memory
            .try_get_with(key, async move {
                if tiers == Tiers::ReadAndWrite {
                    if let Some(block) = self.read_tiers(&loader_key).await {
                        return Ok(block);
                    }
                }
                let block = load.await?;
                if tiers != Tiers::Neither {
                    for tier in [&self.disk, &self.shared].into_iter().flatten() {
                        tier.submit(loader_key.clone(), block.clone());
                    }
                }
                Ok(block)
            })
            .await
            .map_err(|e: Arc<StoreError>| (*e).clone())
    }

    /// A verified copy of the block from the disk tier, else from the shared one (then copied
    /// into the disk tier).
    async fn read_tiers(&self, key: &BlockKey) -> Option<Bytes> {
        if let Some(disk) = &self.disk {
            if let Some(block) = Self::read_tier(disk, key, &self.stats.disk_hits).await {
                return Some(block);
            }
            self.stats.disk_misses.fetch_add(1, Ordering::Relaxed);
        }
        let block = Self::read_tier(self.shared.as_ref()?, key, &self.stats.shared_hits).await?;
        if let Some(disk) = &self.disk {
            disk.submit(key.clone(), block.clone());
        }
        Some(block)
    }

    /// [`Self::read_tiers`] for the blocks of a read-ahead run: the cache directories are first
    /// asked which of them they have, all in one trip (a cold run costs one hand-off to the
    /// blocking pool, not one per block), and only those are read, in parallel.
    async fn read_run_from_tiers(&self, keys: &[BlockKey]) -> Vec<Option<Bytes>> {
        let mut candidates = vec![false; keys.len()];
        for (tier, is_disk) in [(&self.disk, true), (&self.shared, false)] {
            let Some(tier) = tier else { continue };
            let present = tier.present(keys).await;
            if is_disk {
                let absent = present.iter().filter(|found| !**found).count();
                self.stats.disk_misses.fetch_add(absent as u64, Ordering::Relaxed);
            }
            candidates.iter_mut().zip(present).for_each(|(candidate, found)| *candidate |= found);
        }
        let reads = keys.iter().zip(candidates).map(|(key, candidate)| async move {
            match candidate {
                true => self.read_tiers(key).await,
                false => None,
            }
        });
        futures_util::future::join_all(reads).await
    }

    /// A verified copy of the block from `tier`, if its directory has one and answers in time.
    /// The file itself is looked at (another process may have written it since this one
    /// started): an open that fails costs far less than a GET.
    async fn read_tier(tier: &DiskTier, key: &BlockKey, hits: &AtomicU64) -> Option<Bytes> {
        let (files, key) = (tier.files.clone(), key.clone());
        let block = tier.reads.run(move || files.read(&key)).await.flatten()?;
        hits.fetch_add(1, Ordering::Relaxed);
        Some(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{PrefixListing, StoreFuture};
    use std::time::{Duration, SystemTime};

    /// A store whose objects are `size` bytes of `offset % 251`, counting GETs and bytes.
    #[derive(Default)]
    struct CountingStore {
        gets: AtomicU64,
        bytes: AtomicU64,
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
                self.bytes.fetch_add(range.end - range.start, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(30)).await;
                Ok(range.map(|i| (i % 251) as u8).collect::<Vec<u8>>().into())
            })
        }
    }

    /// A store whose GETs hand on their first piece at once and the rest (or an error) a
    /// second later.
    struct TrickleStore {
        fail: bool,
    }

    impl ObjectStore for TrickleStore {
        fn list_prefix<'a>(&'a self, _: &'a str) -> StoreFuture<'a, PrefixListing> {
            Box::pin(async { Ok(PrefixListing::default()) })
        }

        fn list_all<'a>(&'a self, _: &'a str) -> StoreFuture<'a, Vec<ObjectMeta>> {
            Box::pin(async { Ok(Vec::new()) })
        }

        fn get_range<'a>(&'a self, _: &'a ObjectMeta, range: Range<u64>) -> StoreFuture<'a, Bytes> {
            Box::pin(async move { Ok(range.map(|i| (i % 251) as u8).collect::<Vec<u8>>().into()) })
        }

        fn get_pieces<'a>(
            &'a self,
            _: &'a ObjectMeta,
            range: Range<u64>,
            piece: u64,
            sink: crate::store::PieceSink<'a>,
        ) -> StoreFuture<'a, ()> {
            Box::pin(async move {
                let starts: Vec<u64> = range.clone().step_by(piece as usize).collect();
                for (number, &start) in starts.iter().enumerate() {
                    if number == 1 {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        if self.fail {
                            return Err(StoreError::Failed("connection reset".into()));
                        }
                    }
                    let end = (start + piece).min(range.end);
                    sink(number, (start..end).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into());
                }
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn a_read_ahead_block_is_readable_when_its_own_bytes_arrive_and_fails_with_its_get() {
        for fail in [false, true] {
            let cache = Arc::new(BlockCache::new(Arc::new(TrickleStore { fail }), 1000, 1 << 20, 64, None));
            let object = object();
            let started = std::time::Instant::now();
            cache.prefetch(&object, 0..4);
            let first = cache.get(BlockKey { object: object.clone(), index: 0 }).await.unwrap();
            assert_eq!(first[..3], [0, 1, 2]);
            assert!(started.elapsed() < Duration::from_millis(500), "waited for the whole run");
            let second = cache.get(BlockKey { object: object.clone(), index: 1 }).await;
            match fail {
                false => assert_eq!(second.unwrap()[0], (1000 % 251) as u8),
                true => {
                    assert!(matches!(second, Err(StoreError::Failed(ref m)) if m == "connection reset"), "{second:?}")
                }
            }
        }
    }

    fn io() -> Arc<CacheDirIo> {
        Arc::new(CacheDirIo::new(Duration::from_secs(1)))
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
        cache.memory.settle().await;
        assert!(cache.memory.weighted_size() <= 5000, "{}", cache.memory.weighted_size());
    }

    #[tokio::test]
    async fn disk_tier_serves_a_new_cache_without_gets_and_refetches_bad_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(CountingStore::default());
        let object = object();
        let key = BlockKey { object: object.clone(), index: 0 };
        {
            let disk = Arc::new(DiskCache::open(dir.path(), Some(1 << 20), 4096).unwrap());
            let cache =
                BlockCache::new(store.clone(), 4096, 1 << 20, 8, Some(DiskTier::new(disk.clone(), 1 << 20, io())));
            cache.get(key.clone()).await.unwrap();
            // Let the background write land.
            for _ in 0..100 {
                if disk.contains(&key) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        assert_eq!(store.gets.load(Ordering::SeqCst), 1);
        let disk = Arc::new(DiskCache::open(dir.path(), Some(1 << 20), 4096).unwrap());
        let fresh = BlockCache::new(store.clone(), 4096, 1 << 20, 8, Some(DiskTier::new(disk, 1 << 20, io())));
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
        let disk = Arc::new(DiskCache::open(dir.path(), Some(1 << 20), 4096).unwrap());
        let cold = BlockCache::new(store.clone(), 4096, 1 << 20, 8, Some(DiskTier::new(disk, 1 << 20, io())));
        assert_eq!(cold.get(key).await.unwrap(), block);
        assert_eq!(store.gets.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn read_ahead_fetches_a_run_with_one_get_and_readers_of_it_wait_for_that_get() {
        let store = Arc::new(CountingStore::default());
        let cache = Arc::new(BlockCache::new(store.clone(), 1000, 1 << 20, 64, None));
        let object = Arc::new(ObjectMeta { size: 100_000, ..(*object()).clone() });
        cache.get(BlockKey { object: object.clone(), index: 1 }).await.unwrap();
        assert_eq!(store.gets.load(Ordering::SeqCst), 1);
        // Blocks 0..20 lie in one part: one GET for all of them (block 1 too: runs have no gaps).
        cache.prefetch(&object, 0..20);
        let readers: Vec<_> = (0..20)
            .map(|index| {
                let (cache, object) = (cache.clone(), object.clone());
                tokio::spawn(async move { cache.get(BlockKey { object, index }).await.unwrap() })
            })
            .collect();
        for (index, reader) in readers.into_iter().enumerate() {
            let block = reader.await.unwrap();
            let expected: Vec<u8> = (index as u64 * 1000..(index as u64 + 1) * 1000).map(|i| (i % 251) as u8).collect();
            assert_eq!(block[..], expected[..], "block {index}");
        }
        assert_eq!(store.gets.load(Ordering::SeqCst), 2, "one GET for block 1, one for the run");
        assert_eq!(cache.fetch_slots.available_permits(), 64, "the runs' fetch slots were returned");
    }

    #[tokio::test]
    async fn a_read_ahead_run_looks_in_the_cache_dir_once_per_block_in_one_trip_and_writes_each_block_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(CountingStore::default());
        let disk = Arc::new(DiskCache::open(dir.path(), Some(1 << 30), 1000).unwrap());
        let cache =
            Arc::new(BlockCache::new(store.clone(), 1000, 1 << 20, 64, Some(DiskTier::new(disk, 1 << 20, io()))));
        let object = Arc::new(ObjectMeta { size: 100_000, ..(*object()).clone() });
        cache.prefetch(&object, 0..20);
        for index in 0..20 {
            cache.get(BlockKey { object: object.clone(), index }).await.unwrap();
        }
        let tier = cache.disk().unwrap();
        for _ in 0..500 {
            if tier.writes().written.load(Ordering::Relaxed) == 20 && cache.pending.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(store.gets.load(Ordering::SeqCst), 1);
        // Once by the run, and the first block perhaps once more by its reader, who may ask
        // before the run has looked (each block twice before).
        let misses = cache.stats.disk_misses.load(Ordering::Relaxed);
        assert!((20..=21).contains(&misses), "{misses} lookups of 20 blocks");
        // ... in one trip to the blocking pool for the run (one per block before).
        let trips = tier.read_operations();
        assert!((1..=2).contains(&trips), "{trips} cache-dir operations for one run of 20 blocks");
        assert_eq!(tier.writes().written.load(Ordering::Relaxed), 20);
        assert_eq!(cache.stats.fetches.load(Ordering::Relaxed), 20);
    }

    #[tokio::test]
    async fn read_ahead_leaves_out_blocks_a_stream_has_read_until_a_reader_goes_through_them_again() {
        let store = Arc::new(CountingStore::default());
        let cache = Arc::new(BlockCache::new(store.clone(), 1000, 1 << 20, 64, None));
        let object = Arc::new(ObjectMeta { size: 100_000, ..(*object()).clone() });
        let wait = |cache: Arc<BlockCache>| async move {
            while !cache.pending.lock().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        // A stream read blocks 10..20 and dropped them: the page cache has them.
        cache.prefetch(&object, 10..20);
        wait(cache.clone()).await;
        cache.forget(&object, 10..20).await;
        let bytes = store.bytes.load(Ordering::SeqCst);
        // Another stream's read-ahead runs up to and into them: it fetches only 5..10.
        cache.prefetch(&object, 5..20);
        wait(cache.clone()).await;
        assert_eq!(store.bytes.load(Ordering::SeqCst) - bytes, 5 * 1000, "read-ahead fetched what a stream had read");
        // A reader takes its share of one of them (striped readers meet in one block): one GET,
        // and read-ahead still leaves the others out.
        cache.get(BlockKey { object: object.clone(), index: 12 }).await.unwrap();
        wait(cache.clone()).await;
        let bytes = store.bytes.load(Ordering::SeqCst);
        cache.prefetch(&object, 13..16);
        wait(cache.clone()).await;
        assert_eq!(store.bytes.load(Ordering::SeqCst) - bytes, 0, "one block asked for again let read-ahead refetch");
        // The next one too: a reader going through the object again (the page cache lost it),
        // for whom read-ahead fetches that object's blocks again.
        cache.get(BlockKey { object: object.clone(), index: 13 }).await.unwrap();
        wait(cache.clone()).await;
        let bytes = store.bytes.load(Ordering::SeqCst);
        cache.prefetch(&object, 14..17);
        wait(cache.clone()).await;
        assert_eq!(store.bytes.load(Ordering::SeqCst) - bytes, 3 * 1000);
    }

    #[tokio::test]
    async fn read_ahead_leaves_out_a_block_a_reader_is_fetching() {
        let store = Arc::new(CountingStore::default());
        let cache = Arc::new(BlockCache::new(store.clone(), 1000, 1 << 20, 64, None));
        let object = Arc::new(ObjectMeta { size: 100_000, ..(*object()).clone() });
        let reader = {
            let (cache, object) = (cache.clone(), object.clone());
            tokio::spawn(async move { cache.get(BlockKey { object, index: 5 }).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        cache.prefetch(&object, 5..10);
        reader.await.unwrap().unwrap();
        for index in 5..10 {
            cache.get(BlockKey { object: object.clone(), index }).await.unwrap();
        }
        assert_eq!(store.bytes.load(Ordering::SeqCst), 5 * 1000, "block 5 was fetched twice");
        assert_eq!(store.gets.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn read_ahead_never_takes_more_fetch_slots_than_there_are() {
        let store = Arc::new(CountingStore::default());
        let cache = Arc::new(BlockCache::new(store.clone(), 1000, 1 << 20, 4, None));
        let object = Arc::new(ObjectMeta { size: 100_000, ..(*object()).clone() });
        cache.prefetch(&object, 0..100);
        assert_eq!(cache.fetch_slots.available_permits(), 0);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(store.gets.load(Ordering::SeqCst), 1, "parts are as large as the slots: one run fitted");
    }
}
