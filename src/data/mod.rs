//! Data path: turns a read of (open file, offset, length) into bytes.
//!
//! Small objects (JSON, ndjson, small chunks) are fetched whole, once, as block 0. For larger
//! objects the per-file [`prefetch::Prefetcher`] decides: a random read (the first read, an MRC
//! header, a seek) is served from cached blocks when they are all there and otherwise by one
//! ranged GET of exactly the bytes asked for; a sequential read is served from whole blocks and
//! starts background fetches of the blocks in its read-ahead window. Fetches share the block
//! cache's fixed number of fetch slots: when all are busy, windows are simply not filled, and
//! the process does not grow.

pub mod prefetch;

use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

use crate::cache::{BlockCache, BlockKey};
use crate::store::{ObjectMeta, ObjectStore, StoreError};
use prefetch::{Pattern, Prefetcher};

/// Tuning of the read path.
#[derive(Clone, Copy, Debug)]
pub struct DataConfig {
    /// Objects up to this size are fetched whole on first read.
    pub small_object: u64,
    /// First read-ahead window of a sequential stream.
    pub initial_window: u64,
    /// Largest read-ahead window of one stream.
    pub max_window: u64,
}

/// One open file: the object version it reads and its access-pattern state.
pub struct OpenFile {
    /// The object version this handle reads (pinned at open).
    pub object: Arc<ObjectMeta>,
    state: Mutex<StreamState>,
}

struct StreamState {
    prefetcher: Prefetcher,
    /// First block not yet handed to a background fetch in the current stream.
    next_unrequested: u64,
}

/// Reads object bytes through the block cache and the object store.
pub struct DataPath {
    store: Arc<dyn ObjectStore>,
    cache: Arc<BlockCache>,
    config: DataConfig,
}

impl DataPath {
    /// A data path over `cache`, fetching through `store`.
    pub fn new(store: Arc<dyn ObjectStore>, cache: Arc<BlockCache>, config: DataConfig) -> DataPath {
        DataPath { store, cache, config }
    }

    /// The block cache (for statistics).
    pub fn cache(&self) -> &BlockCache {
        &self.cache
    }

    /// Starts reading `object`.
    pub fn open(&self, object: Arc<ObjectMeta>) -> OpenFile {
        let prefetcher = Prefetcher::new(self.config.initial_window, self.config.max_window);
        OpenFile { object, state: Mutex::new(StreamState { prefetcher, next_unrequested: 0 }) }
    }

    /// Up to `len` bytes of the file from `offset`; fewer at the end, none past it.
    pub async fn read(self: &Arc<Self>, file: &OpenFile, offset: u64, len: u32) -> Result<Bytes, StoreError> {
        let object = &file.object;
        let range = clamp(object.size, offset, len);
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let block_size = self.cache.block_size();
        let blocks = self.cache.blocks_covering(&range);
        if object.size <= self.config.small_object.min(block_size) {
            return self.read_blocks(object, blocks, range).await;
        }
        let (pattern, prefetch) = {
            let mut state = file.state.lock().expect("stream state poisoned");
            let pattern = state.prefetcher.on_read(range.start, range.end - range.start);
            let mut prefetch = 0..0;
            if let Pattern::Sequential { window } = pattern {
                let window_end = (range.end + window).min(object.size).div_ceil(block_size);
                prefetch = state.next_unrequested.max(blocks.end)..window_end;
                state.next_unrequested = state.next_unrequested.max(prefetch.end);
            } else {
                state.next_unrequested = 0;
            }
            (pattern, prefetch)
        };
        match pattern {
            Pattern::Sequential { .. } => {
                self.prefetch(object, prefetch);
                self.read_blocks(object, blocks, range).await
            }
            Pattern::Random => {
                let mut cached = Vec::new();
                for index in blocks.clone() {
                    match self.cache.cached(&BlockKey { object: object.clone(), index }).await {
                        Some(block) => cached.push(block),
                        None => return self.store.get_range(object, range).await,
                    }
                }
                Ok(assemble(&cached, blocks.start * block_size, range))
            }
        }
    }

    /// The bytes `range` of `object` (clamped to its size), through the block cache.
    pub async fn read_range(&self, object: &Arc<ObjectMeta>, range: Range<u64>) -> Result<Bytes, StoreError> {
        let range = within(object, range);
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        self.read_blocks(object, self.cache.blocks_covering(&range), range).await
    }

    /// Reads whole blocks (in parallel, through the cache) and cuts `range` out of them.
    async fn read_blocks(
        &self,
        object: &Arc<ObjectMeta>,
        blocks: Range<u64>,
        range: Range<u64>,
    ) -> Result<Bytes, StoreError> {
        let first = blocks.start * self.cache.block_size();
        let loads: Vec<_> = blocks
            .map(|index| {
                let (cache, key) = (self.cache.clone(), BlockKey { object: object.clone(), index });
                tokio::spawn(async move { cache.get(key).await })
            })
            .collect();
        let mut parts = Vec::with_capacity(loads.len());
        for load in loads {
            parts.push(load.await.map_err(|e| StoreError::Other(format!("block load failed: {e}")))??);
        }
        Ok(assemble(&parts, first, range))
    }

    /// Fetches the blocks covering `range` of `object` in the background while fetch slots are
    /// free (for readers that know what they will read next).
    pub fn prefetch_range(&self, object: &Arc<ObjectMeta>, range: Range<u64>) {
        let range = within(object, range);
        if !range.is_empty() {
            self.prefetch(object, self.cache.blocks_covering(&range));
        }
    }

    /// Fetches `blocks` in the background while fetch slots are free.
    fn prefetch(&self, object: &Arc<ObjectMeta>, blocks: Range<u64>) {
        for index in blocks {
            if !self.cache.has_free_fetch_slot() {
                return;
            }
            let (cache, key) = (self.cache.clone(), BlockKey { object: object.clone(), index });
            tokio::spawn(async move { cache.get(key).await });
        }
    }
}

/// The bytes of `range` from consecutive `blocks`, the first starting at object offset `first`.
pub(crate) fn assemble(blocks: &[Bytes], first: u64, range: Range<u64>) -> Bytes {
    let start = (range.start - first) as usize;
    let len = (range.end - range.start) as usize;
    if let [block] = blocks {
        return block.slice(start..start + len);
    }
    let mut out = BytesMut::with_capacity(len);
    let mut skip = start;
    for block in blocks {
        if skip >= block.len() {
            skip -= block.len();
            continue;
        }
        let take = (block.len() - skip).min(len - out.len());
        out.extend_from_slice(&block[skip..skip + take]);
        skip = 0;
    }
    out.freeze()
}

/// The part of `range` inside `object`.
fn within(object: &ObjectMeta, range: Range<u64>) -> Range<u64> {
    range.start.min(object.size)..range.end.min(object.size)
}

/// The byte range a read of `len` bytes at `offset` covers in an object of `size` bytes.
pub(crate) fn clamp(size: u64, offset: u64, len: u32) -> Range<u64> {
    let start = offset.min(size);
    start..offset.saturating_add(u64::from(len)).min(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_clamped_to_the_object() {
        assert_eq!(clamp(100, 0, 10), 0..10);
        assert_eq!(clamp(100, 95, 10), 95..100);
        assert_eq!(clamp(100, 100, 10), 100..100);
        assert_eq!(clamp(100, 500, 10), 100..100);
        assert_eq!(clamp(0, 0, 4096), 0..0);
        assert_eq!(clamp(u64::MAX, u64::MAX - 1, 10), u64::MAX - 1..u64::MAX);
    }

    #[test]
    fn assemble_cuts_across_blocks() {
        let blocks: Vec<Bytes> =
            vec![Bytes::from_static(b"abcd"), Bytes::from_static(b"efgh"), Bytes::from_static(b"ij")];
        assert_eq!(&assemble(&blocks, 8, 9..17)[..], b"bcdefghi");
        assert_eq!(&assemble(&blocks[1..2], 12, 13..15)[..], b"fg");
        assert_eq!(&assemble(&blocks, 0, 4..10)[..], b"efghij");
    }
}
