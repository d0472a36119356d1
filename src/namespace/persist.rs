//! Persisted listings: directory listings saved in the cache directory, so a remount (or another
//! mount sharing the directory) walks a known tree without asking S3 again while the metadata TTL
//! has not run out.
//!
//! One JSON file per listed prefix, written atomically ([`crate::cache::bound::replace_file`]). A file that cannot be
//! parsed, belongs to another bucket or prefix, or is older than the TTL is ignored. The mount
//! reads and writes them through [`CacheDirIo`], off the async workers and under its timeout.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::cache::offload::CacheDirIo;
use crate::store::{ObjectMeta, PrefixListing};

#[derive(Serialize, Deserialize)]
struct Saved {
    bucket: String,
    prefix: String,
    fetched_at: u64,
    prefixes: Vec<String>,
    objects: Vec<SavedObject>,
}

#[derive(Serialize, Deserialize)]
struct SavedObject {
    key: String,
    size: u64,
    etag: String,
    mtime_ns: u128,
}

/// Listings of one bucket kept under `<cache dir>/listings`.
pub struct ListingStore {
    dir: PathBuf,
    bucket: String,
    ttl: Duration,
    io: Arc<CacheDirIo>,
}

impl ListingStore {
    /// A store in `cache_dir/listings` for `bucket`, trusting saved listings for `ttl`, whose
    /// async methods go through `io`.
    pub fn open(cache_dir: &Path, bucket: &str, ttl: Duration, io: Arc<CacheDirIo>) -> std::io::Result<ListingStore> {
        let dir = cache_dir.join("listings");
        fs::create_dir_all(&dir)?;
        Ok(ListingStore { dir, bucket: bucket.to_owned(), ttl, io })
    }

    /// [`ListingStore::load`], off the async workers; `None` also when the directory is slow.
    pub async fn load_async(self: &Arc<Self>, prefix: &str) -> Option<PrefixListing> {
        self.load_within_async(prefix, Some(self.ttl)).await
    }

    /// [`ListingStore::load_within`], off the async workers; `None` also when the directory
    /// is slow.
    pub async fn load_within_async(self: &Arc<Self>, prefix: &str, max_age: Option<Duration>) -> Option<PrefixListing> {
        let (store, prefix) = (self.clone(), prefix.to_owned());
        self.io.run(move || store.load_within(&prefix, max_age)).await.flatten()
    }

    /// [`ListingStore::forget`], off the async workers.
    pub async fn forget_async(self: &Arc<Self>, prefix: &str) {
        let (store, prefix) = (self.clone(), prefix.to_owned());
        self.io.run(move || store.forget(&prefix)).await;
    }

    /// [`ListingStore::save`] in the background.
    pub fn save_in_background(self: &Arc<Self>, prefix: &str, listing: &PrefixListing) {
        let (store, prefix, listing) = (self.clone(), prefix.to_owned(), listing.clone());
        tokio::spawn(async move {
            let io = store.io.clone();
            io.run(move || store.save(&prefix, &listing)).await
        });
    }

    fn path(&self, prefix: &str) -> PathBuf {
        let hash = crate::hash::stable_hash(&[self.bucket.as_bytes(), prefix.as_bytes()]);
        self.dir.join(format!("{hash:016x}.json"))
    }

    /// The saved listing of `prefix`, if there is a valid one younger than the TTL.
    pub fn load(&self, prefix: &str) -> Option<PrefixListing> {
        self.load_within(prefix, Some(self.ttl))
    }

    /// The saved listing of `prefix` if it is younger than `max_age` (any age: `None`, for a
    /// mount that cannot reach S3).
    pub fn load_within(&self, prefix: &str, max_age: Option<Duration>) -> Option<PrefixListing> {
        let saved: Saved = serde_json::from_slice(&fs::read(self.path(prefix)).ok()?).ok()?;
        let age = now_secs().saturating_sub(saved.fetched_at);
        if saved.bucket != self.bucket || saved.prefix != prefix || max_age.is_some_and(|max| age >= max.as_secs()) {
            return None;
        }
        let objects = saved
            .objects
            .into_iter()
            .map(|o| ObjectMeta {
                key: o.key,
                size: o.size,
                etag: o.etag,
                mtime: UNIX_EPOCH + Duration::from_nanos(u64::try_from(o.mtime_ns).unwrap_or(u64::MAX)),
            })
            .collect();
        Some(PrefixListing { prefixes: saved.prefixes, objects })
    }

    /// Drops the saved listing of `prefix` (an object in it changed), so it is listed again.
    pub fn forget(&self, prefix: &str) {
        let _ = fs::remove_file(self.path(prefix));
    }

    /// Saves a fresh listing of `prefix`. Failures are ignored: this is only a cache.
    pub fn save(&self, prefix: &str, listing: &PrefixListing) {
        let saved = Saved {
            bucket: self.bucket.clone(),
            prefix: prefix.to_owned(),
            fetched_at: now_secs(),
            prefixes: listing.prefixes.clone(),
            objects: listing
                .objects
                .iter()
                .map(|o| SavedObject {
                    key: o.key.clone(),
                    size: o.size,
                    etag: o.etag.clone(),
                    mtime_ns: o.mtime.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
                })
                .collect(),
        };
        let Ok(json) = serde_json::to_vec(&saved) else { return };
        let target = self.path(prefix);
        let _ = crate::cache::bound::replace_file(&target, &[&json]);
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io() -> Arc<CacheDirIo> {
        Arc::new(CacheDirIo::new(Duration::from_secs(1)))
    }

    fn listing() -> PrefixListing {
        PrefixListing {
            prefixes: vec!["a/b/".into()],
            objects: vec![ObjectMeta {
                key: "a/x y é.json".into(),
                size: 12,
                etag: "\"e\"".into(),
                mtime: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            }],
        }
    }

    #[test]
    fn saved_listings_round_trip_per_bucket_and_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = ListingStore::open(dir.path(), "bucket", Duration::from_secs(60), io()).unwrap();
        assert!(store.load("a/").is_none());
        store.save("a/", &listing());
        assert_eq!(store.load("a/"), Some(listing()));
        assert!(store.load("b/").is_none());
        let other = ListingStore::open(dir.path(), "other-bucket", Duration::from_secs(60), io()).unwrap();
        assert!(other.load("a/").is_none());
        store.forget("a/");
        assert!(store.load("a/").is_none(), "a forgotten listing is listed again");
    }

    #[test]
    fn expired_or_damaged_listings_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let expired = ListingStore::open(dir.path(), "bucket", Duration::ZERO, io()).unwrap();
        expired.save("a/", &listing());
        assert!(expired.load("a/").is_none());
        let store = ListingStore::open(dir.path(), "bucket", Duration::from_secs(60), io()).unwrap();
        fs::write(store.path("a/"), b"{not json").unwrap();
        assert!(store.load("a/").is_none());
    }
}
