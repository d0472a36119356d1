//! The raw baseline: cdpfs's own S3 client (`S3Store`) doing the ideal requests directly, with no
//! filesystem in between, and the CPU time the bench process itself uses for them.

use std::ops::Range;
use std::sync::Arc;

use cdpfs::store::s3::{RetryPolicy, S3Config, S3Store};
use cdpfs::store::{ObjectMeta, ObjectStore};

use crate::fixture::BUCKET;

/// One ranged GET.
pub type Request = (Arc<ObjectMeta>, Range<u64>);

pub struct Raw {
    store: Arc<S3Store>,
    runtime: tokio::runtime::Runtime,
}

impl Raw {
    pub fn new(endpoint: &str) -> Raw {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        let config = S3Config {
            bucket: BUCKET.into(),
            region: "us-east-1".into(),
            endpoint_url: Some(endpoint.to_owned()),
            sign_requests: false,
            retry: RetryPolicy::default(),
        };
        let store = Arc::new(runtime.block_on(S3Store::new(&config)));
        Raw { store, runtime }
    }

    /// Sends each batch of `batches` in turn (a serial reader), the GETs of a batch with at most
    /// `parallel` in flight.
    pub fn get(&self, batches: Vec<Vec<Request>>, parallel: usize) {
        self.runtime.block_on(async {
            for batch in batches {
                self.get_async(batch, parallel).await;
            }
        });
    }

    /// The GETs of `requests`, at most `parallel` in flight.
    async fn get_async(&self, requests: Vec<Request>, parallel: usize) {
        let gate = Arc::new(tokio::sync::Semaphore::new(parallel));
        let mut tasks = tokio::task::JoinSet::new();
        for (object, range) in requests {
            let (store, gate) = (self.store.clone(), gate.clone());
            tasks.spawn(async move {
                let _permit = gate.acquire_owned().await.unwrap();
                store.get_range(&object, range).await.unwrap().len()
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    }

    /// Files below `prefix`, with one ListObjectsV2 per folder, one at a time: the naive walk.
    pub fn list_serially(&self, prefix: &str) -> usize {
        self.runtime.block_on(list_serially(self.store.as_ref(), prefix.to_owned()))
    }
}

async fn list_serially(store: &dyn ObjectStore, prefix: String) -> usize {
    let listing = store.list_prefix(&prefix).await.unwrap();
    let mut files = listing.objects.len();
    for sub in listing.prefixes {
        files += Box::pin(list_serially(store, sub)).await;
    }
    files
}

/// `range` of `object` as GETs of `part` bytes (the last one shorter).
pub fn parts(object: &Arc<ObjectMeta>, range: Range<u64>, part: u64) -> Vec<Request> {
    (range.start..range.end).step_by(part as usize).map(|s| (object.clone(), s..(s + part).min(range.end))).collect()
}

/// `range` of `object` as `n` GETs of (nearly) equal size.
pub fn split(object: &Arc<ObjectMeta>, range: Range<u64>, n: u64) -> Vec<Request> {
    let part = (range.end - range.start).div_ceil(n).max(1);
    parts(object, range, part)
}

/// CPU time (user + system, all threads) this process has used so far, in seconds.
pub fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}
