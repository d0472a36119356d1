//! Data path: turns a read of (object, offset, length) into bytes.
//!
//! Today every read becomes one ranged GET of exactly the bytes asked for, clamped to the
//! object's end. This is the module that grows the block cache and the prefetcher.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use crate::store::{ObjectMeta, ObjectStore, StoreError};

/// Reads object bytes through the object store.
pub struct DataPath {
    store: Arc<dyn ObjectStore>,
}

impl DataPath {
    /// A data path that fetches through `store`.
    pub fn new(store: Arc<dyn ObjectStore>) -> DataPath {
        DataPath { store }
    }

    /// Up to `len` bytes of `object` from `offset`; fewer at the end, none past it.
    pub async fn read(&self, object: &ObjectMeta, offset: u64, len: u32) -> Result<Bytes, StoreError> {
        let range = clamp(object.size, offset, len);
        self.store.get_range(object, range).await
    }
}

/// The byte range a read of `len` bytes at `offset` covers in an object of `size` bytes.
fn clamp(size: u64, offset: u64, len: u32) -> Range<u64> {
    let start = offset.min(size);
    start..offset.saturating_add(u64::from(len)).min(size)
}

#[cfg(test)]
mod tests {
    use super::clamp;

    #[test]
    fn reads_are_clamped_to_the_object() {
        assert_eq!(clamp(100, 0, 10), 0..10);
        assert_eq!(clamp(100, 95, 10), 95..100);
        assert_eq!(clamp(100, 100, 10), 100..100);
        assert_eq!(clamp(100, 500, 10), 100..100);
        assert_eq!(clamp(0, 0, 4096), 0..0);
        assert_eq!(clamp(u64::MAX, u64::MAX - 1, 10), u64::MAX - 1..u64::MAX);
    }
}
