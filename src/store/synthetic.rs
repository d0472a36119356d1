//! A generated object store, for measuring cdpfs without a network: one folder holding one
//! object of a chosen size whose bytes are generated (as gcsfuse's dummy-I/O mode), so a read
//! through the mount costs only the FUSE adapter, the data path and the cache tiers.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use super::{ObjectMeta, ObjectStore, PrefixListing, StoreCounters, StoreFuture};

/// The generated object's key.
pub const KEY: &str = "synthetic.bin";

/// Bytes one pattern buffer holds; every GET is a slice of it (no copy, no generation cost).
const PATTERN: usize = 16 << 20;

/// The store: `size` bytes at [`KEY`], byte `i` being `i % 251`.
pub struct SyntheticStore {
    object: ObjectMeta,
    pattern: Bytes,
    counters: Arc<StoreCounters>,
}

impl SyntheticStore {
    /// A store whose one object has `size` bytes.
    pub fn new(size: u64) -> SyntheticStore {
        let object = ObjectMeta { key: KEY.into(), size, etag: "\"synthetic\"".into(), mtime: SystemTime::UNIX_EPOCH };
        // 251 * k bytes, so any offset maps into the buffer with the same pattern.
        let len = PATTERN / 251 * 251 + 251 * 64;
        let pattern = (0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
        SyntheticStore { object, pattern, counters: Arc::default() }
    }

    /// What this store has served.
    pub fn counters(&self) -> Arc<StoreCounters> {
        self.counters.clone()
    }
}

impl ObjectStore for SyntheticStore {
    fn list_prefix<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, PrefixListing> {
        Box::pin(async move {
            self.counters.lists.fetch_add(1, Ordering::Relaxed);
            let objects = if prefix.is_empty() { vec![self.object.clone()] } else { Vec::new() };
            Ok(PrefixListing { prefixes: Vec::new(), objects })
        })
    }

    fn list_all<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<ObjectMeta>> {
        Box::pin(async move { Ok(self.list_prefix(prefix).await?.objects) })
    }

    fn get_range<'a>(&'a self, _object: &'a ObjectMeta, range: Range<u64>) -> StoreFuture<'a, Bytes> {
        Box::pin(async move {
            let len = (range.end - range.start) as usize;
            let mut start = (range.start % 251) as usize;
            // A slice when it fits in the pattern (every block and part does), else a copy.
            let bytes = if start + len <= self.pattern.len() {
                self.pattern.slice(start..start + len)
            } else {
                let mut out = Vec::with_capacity(len);
                while out.len() < len {
                    let take = (len - out.len()).min(self.pattern.len() - start);
                    out.extend_from_slice(&self.pattern[start..start + take]);
                    start = 0;
                }
                out.into()
            };
            self.counters.gets.fetch_add(1, Ordering::Relaxed);
            self.counters.bytes.fetch_add(len as u64, Ordering::Relaxed);
            Ok(bytes)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_follow_the_pattern_at_any_offset_and_length() {
        let store = SyntheticStore::new(1 << 40);
        let object = store.list_prefix("").await.unwrap().objects.remove(0);
        for (start, len) in [(0u64, 10usize), (1_000_003, 4096), ((1 << 40) - 100, 100), (7, 40 << 20)] {
            let bytes = store.get_range(&object, start..start + len as u64).await.unwrap();
            assert_eq!(bytes.len(), len);
            assert!(bytes.iter().enumerate().all(|(i, b)| *b == ((start + i as u64) % 251) as u8), "at {start}");
        }
        assert!(store.list_prefix("other/").await.unwrap().objects.is_empty());
    }
}
