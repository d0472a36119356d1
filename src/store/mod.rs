//! Object-store client: the only code that talks to S3.
//!
//! It owns listing a "directory" (one `/`-delimited ListObjectsV2, all pages) or a whole subtree, and ranged,
//! ETag-pinned GETs, with the timeouts and retries that make them safe to call from a
//! filesystem. [`ObjectStore`] is the seam the rest of cdpfs uses; [`s3::S3Store`] is the real
//! implementation (its HTTP client, `http`, reads the bodies of data GETs from the socket
//! straight into the block buffers the cache keeps), [`synthetic::SyntheticStore`] a generated one for measuring cdpfs alone.

mod http;
pub mod offline;
pub mod s3;
pub mod snapshot;
pub mod synthetic;

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::Bytes;

/// One object as a listing reports it: enough to serve `stat` and pin reads without a HEAD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Full bucket key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// ETag as the server sent it (quotes included), used to pin ranged reads; for a server
    /// that lists no ETags, a version made up from size and mtime ([`ObjectMeta::synthesized_version`]).
    pub etag: String,
    /// Last-modified time.
    pub mtime: SystemTime,
}

/// How a version cdpfs made up (not the server's ETag) begins.
const SYNTHESIZED: &str = "synth:";

impl ObjectMeta {
    /// The version of an object listed without an ETag (some S3-compatible mirrors): its size
    /// and mtime. It pins the inode and the cache entries like an ETag, but is never sent to
    /// the server; reads check the size and mtime the server answers with instead.
    pub fn synthesized_version(size: u64, mtime: SystemTime) -> String {
        let nanos = mtime.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        format!("{SYNTHESIZED}{size}-{nanos}")
    }

    /// The server's ETag, when the listing gave one (for `If-Match`).
    pub fn server_etag(&self) -> Option<&str> {
        (!self.etag.is_empty() && !self.etag.starts_with(SYNTHESIZED)).then_some(self.etag.as_str())
    }
}

/// The immediate children of one prefix: sub-prefixes (each ending in `/`) and objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefixListing {
    /// Full common prefixes, e.g. `10000/TS_026/`.
    pub prefixes: Vec<String>,
    /// Objects directly under the prefix.
    pub objects: Vec<ObjectMeta>,
}

/// Why a store call failed. Each variant maps to one errno at the filesystem boundary.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The bucket does not exist at this endpoint.
    #[error("bucket {0:?} does not exist at this endpoint")]
    NoSuchBucket(String),
    /// The object is gone.
    #[error("object {0:?} not found")]
    NotFound(String),
    /// The object changed since it was listed (its ETag no longer matches).
    #[error("object {0:?} changed since it was listed (ETag mismatch)")]
    Changed(String),
    /// The server refused the request.
    #[error("access denied: {0}")]
    AccessDenied(String),
    /// The endpoint could not be reached or did not answer in time.
    #[error("cannot reach the S3 endpoint: {0}")]
    Unreachable(String),
    /// A request failed for good for another reason: server errors past the retries, or a
    /// client error not retried.
    #[error("{0}")]
    Failed(String),
    /// Anything else (data that cannot be decoded, a task that failed).
    #[error("{0}")]
    Other(String),
}

impl StoreError {
    /// Whether this is a request that failed for good, which the store has logged already
    /// (one line with its key and reason).
    pub fn logged(&self) -> bool {
        !matches!(self, StoreError::Other(_))
    }

    /// The errno a filesystem caller should see for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            // The object listed (and maybe opened) is gone or replaced: the handle is stale.
            StoreError::Changed(_) | StoreError::NotFound(_) => libc::ESTALE,
            _ => libc::EIO,
        }
    }
}

/// What an object store has sent and received.
#[derive(Debug, Default)]
pub struct StoreCounters {
    /// Ranged GETs sent (each attempt: S3 bills every request).
    pub gets: AtomicU64,
    /// Listing pages.
    pub lists: AtomicU64,
    /// Body bytes received, of every GET (a body cut short and fetched again counts twice).
    pub bytes: AtomicU64,
    /// Attempts that were retried.
    pub retries: AtomicU64,
    /// Requests that failed for good.
    pub failures: AtomicU64,
    /// The last request found no S3 endpoint (or the mount is `--offline`): saved listings
    /// are used without asking, and reads of uncached data fail. Cleared by the next request
    /// that reaches S3.
    pub unreachable: AtomicBool,
}

impl StoreCounters {
    /// Whether S3 is taken to be unreachable ([`StoreCounters::unreachable`]).
    pub fn is_unreachable(&self) -> bool {
        self.unreachable.load(Ordering::Relaxed)
    }
}

/// Where [`ObjectStore::get_pieces`] hands each piece (its number and bytes) as it arrives.
pub type PieceSink<'a> = &'a (dyn Fn(usize, Bytes) + Send + Sync);

/// A boxed future returned by [`ObjectStore`] methods.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The object-store operations cdpfs needs.
pub trait ObjectStore: Send + Sync + 'static {
    /// Lists the immediate children of `prefix` (which is empty or ends in `/`), every page.
    fn list_prefix<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, PrefixListing>;

    /// Lists every object below `prefix` at any depth, every page (for Zarr chunk keys).
    fn list_all<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<ObjectMeta>>;

    /// Reads `range` of `object`, pinned to its ETag. Returns exactly `range.len()` bytes.
    fn get_range<'a>(&'a self, object: &'a ObjectMeta, range: Range<u64>) -> StoreFuture<'a, Bytes>;

    /// Reads `range` of `object` with one request, handing it to `sink` as it arrives, as
    /// consecutive pieces of `piece` bytes (the last may be shorter), with their numbers. After a
    /// retried attempt a piece may come again (with the same bytes). A store that can should
    /// give each piece a buffer of its own, so that keeping one piece (a cached block) does not
    /// keep the others' memory.
    fn get_pieces<'a>(
        &'a self,
        object: &'a ObjectMeta,
        range: Range<u64>,
        piece: u64,
        sink: PieceSink<'a>,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let bytes = self.get_range(object, range).await?;
            let piece = usize::try_from(piece.max(1)).unwrap_or(usize::MAX);
            for (number, at) in (0..bytes.len()).step_by(piece).enumerate() {
                sink(number, bytes.slice(at..(at + piece).min(bytes.len())));
            }
            Ok(())
        })
    }

    /// Whether the store is taken to answer (false after a request found no endpoint, until
    /// one reaches it again, and always when offline).
    fn reachable(&self) -> bool {
        true
    }
}
