//! The store of an `--offline` mount: asks S3 nothing, so only saved listings and cached blocks
//! are served, and every read of anything else fails at once.

use std::ops::Range;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use bytes::Bytes;

use super::{ObjectMeta, ObjectStore, PrefixListing, StoreCounters, StoreError, StoreFuture};

/// A store that is never reachable.
pub struct OfflineStore {
    counters: Arc<StoreCounters>,
}

impl Default for OfflineStore {
    fn default() -> Self {
        OfflineStore { counters: Arc::new(StoreCounters { unreachable: AtomicBool::new(true), ..Default::default() }) }
    }
}

impl OfflineStore {
    /// Its counters (all zero; unreachable).
    pub fn counters(&self) -> Arc<StoreCounters> {
        self.counters.clone()
    }

    fn refuse<'a, T: Send + 'a>() -> StoreFuture<'a, T> {
        Box::pin(async { Err(StoreError::Unreachable("offline (--offline): S3 is not asked".into())) })
    }
}

impl ObjectStore for OfflineStore {
    fn list_prefix<'a>(&'a self, _prefix: &'a str) -> StoreFuture<'a, PrefixListing> {
        Self::refuse()
    }

    fn list_all<'a>(&'a self, _prefix: &'a str) -> StoreFuture<'a, Vec<ObjectMeta>> {
        Self::refuse()
    }

    fn get_range<'a>(&'a self, _object: &'a ObjectMeta, _range: Range<u64>) -> StoreFuture<'a, Bytes> {
        Self::refuse()
    }

    fn reachable(&self) -> bool {
        false
    }
}
