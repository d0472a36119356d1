//! Counters of a running mount: S3 traffic, cache tiers, reads served and their latency, memory.
//! Read by `cdpfs stats` (through the `user.cdpfs.stats` attribute of the mount's root) and, with
//! `--metrics-addr`, served as Prometheus text on `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cache::BlockCache;
use crate::store::StoreCounters;

/// Reads served to programs: count, bytes, errors and a latency histogram (log2 microseconds).
pub struct ReadStats {
    reads: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    latency_log2_us: [AtomicU64; 40],
}

impl Default for ReadStats {
    fn default() -> Self {
        ReadStats {
            reads: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency_log2_us: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl ReadStats {
    /// Records one read that returned `bytes` (or failed) after `elapsed`.
    pub fn record(&self, bytes: Option<usize>, elapsed: Duration) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        match bytes {
            Some(n) => self.bytes.fetch_add(n as u64, Ordering::Relaxed),
            None => self.errors.fetch_add(1, Ordering::Relaxed),
        };
        let micros = elapsed.as_micros().max(1) as u64;
        let bucket = (63 - micros.leading_zeros() as usize).min(self.latency_log2_us.len() - 1);
        self.latency_log2_us[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The latency below which a fraction `q` of reads completed, in milliseconds (bucket upper
    /// bound: within a factor of two).
    fn percentile_ms(&self, q: f64) -> f64 {
        let counts: Vec<u64> = self.latency_log2_us.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let wanted = (q * total as f64).ceil() as u64;
        let mut seen = 0;
        for (bucket, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= wanted {
                return (1u64 << (bucket + 1)) as f64 / 1000.0;
            }
        }
        0.0
    }
}

/// All counters of one mount.
pub struct Stats {
    /// S3 traffic, kept by the object store.
    pub store: Arc<StoreCounters>,
    /// Reads served.
    pub reads: ReadStats,
}

/// A point-in-time copy of the counters (fields a mount of another version lacks read as 0).
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Snapshot {
    pub s3_gets: u64,
    pub s3_lists: u64,
    pub s3_bytes: u64,
    pub s3_retries: u64,
    pub s3_failures: u64,
    /// S3 could not be reached at the last request (or the mount is `--offline`).
    pub s3_unreachable: bool,
    pub reads: u64,
    pub bytes_served: u64,
    pub read_errors: u64,
    pub read_p50_ms: f64,
    pub read_p90_ms: f64,
    pub read_p99_ms: f64,
    pub cache_memory_hits: u64,
    pub cache_disk_hits: u64,
    pub cache_disk_misses: u64,
    pub cache_shared_hits: u64,
    pub cache_fetches: u64,
    pub zarr_chunks_fetched_ahead: u64,
    pub cache_memory_bytes: u64,
    pub cache_disk_writes: u64,
    pub cache_disk_writes_dropped: u64,
    pub cache_disk_writes_refused: u64,
    pub cache_disk_write_pauses: u64,
    pub cache_disk_write_queue_bytes: u64,
    pub cache_disk_read_timeouts: u64,
    pub cache_dir_operations: u64,
    pub rss_bytes: u64,
}

impl Stats {
    /// Counters for a mount whose store keeps `store`.
    pub fn new(store: Arc<StoreCounters>) -> Stats {
        Stats { store, reads: ReadStats::default() }
    }

    /// The current values, with the block cache's.
    pub fn snapshot(&self, cache: &BlockCache) -> Snapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            s3_gets: load(&self.store.gets),
            s3_lists: load(&self.store.lists),
            s3_bytes: load(&self.store.bytes),
            s3_retries: load(&self.store.retries),
            s3_failures: load(&self.store.failures),
            s3_unreachable: self.store.is_unreachable(),
            reads: load(&self.reads.reads),
            bytes_served: load(&self.reads.bytes),
            read_errors: load(&self.reads.errors),
            read_p50_ms: self.reads.percentile_ms(0.5),
            read_p90_ms: self.reads.percentile_ms(0.9),
            read_p99_ms: self.reads.percentile_ms(0.99),
            cache_memory_hits: load(&cache.stats.memory_hits),
            cache_disk_hits: load(&cache.stats.disk_hits),
            cache_disk_misses: load(&cache.stats.disk_misses),
            cache_shared_hits: load(&cache.stats.shared_hits),
            cache_fetches: load(&cache.stats.fetches),
            zarr_chunks_fetched_ahead: load(&cache.stats.chunks_fetched_ahead),
            cache_memory_bytes: cache.memory_bytes(),
            cache_disk_writes: cache.disk().map_or(0, |d| load(&d.writes().written)),
            cache_disk_writes_dropped: cache.disk().map_or(0, |d| load(&d.writes().dropped)),
            cache_disk_writes_refused: cache.disk().map_or(0, |d| load(&d.writes().refused)),
            cache_disk_write_pauses: cache.disk().map_or(0, |d| load(&d.writes().paused)),
            cache_disk_write_queue_bytes: cache.disk().map_or(0, |d| load(&d.writes().queued_bytes)),
            cache_disk_read_timeouts: cache.disk().map_or(0, |d| d.read_timeouts()),
            cache_dir_operations: cache.disk().map_or(0, |d| d.read_operations()),
            rss_bytes: resident_bytes(),
        }
    }
}

impl Snapshot {
    /// Prometheus text exposition format.
    pub fn to_prometheus(&self) -> String {
        let counters = [
            ("cdpfs_s3_gets_total", "Ranged GETs sent to S3", self.s3_gets as f64),
            ("cdpfs_s3_lists_total", "ListObjectsV2 pages requested", self.s3_lists as f64),
            ("cdpfs_s3_bytes_total", "Bytes downloaded from S3", self.s3_bytes as f64),
            ("cdpfs_s3_retries_total", "S3 request attempts that were retried", self.s3_retries as f64),
            ("cdpfs_s3_failures_total", "S3 requests that failed after retries", self.s3_failures as f64),
            ("cdpfs_reads_total", "Reads served to programs", self.reads as f64),
            ("cdpfs_read_bytes_total", "Bytes served to programs", self.bytes_served as f64),
            ("cdpfs_read_errors_total", "Reads that returned an error", self.read_errors as f64),
            ("cdpfs_cache_memory_hits_total", "Blocks served from memory", self.cache_memory_hits as f64),
            ("cdpfs_cache_disk_hits_total", "Blocks served from the disk cache", self.cache_disk_hits as f64),
            (
                "cdpfs_cache_disk_misses_total",
                "Blocks looked for in the disk cache and not found",
                self.cache_disk_misses as f64,
            ),
            (
                "cdpfs_cache_shared_hits_total",
                "Blocks served from the shared cache directory",
                self.cache_shared_hits as f64,
            ),
            ("cdpfs_cache_fetches_total", "Blocks fetched from S3", self.cache_fetches as f64),
            (
                "cdpfs_zarr_chunks_fetched_ahead_total",
                "Zarr chunk objects fetched ahead of the readers going through their level",
                self.zarr_chunks_fetched_ahead as f64,
            ),
            ("cdpfs_cache_disk_writes_total", "Blocks written to the disk cache", self.cache_disk_writes as f64),
            (
                "cdpfs_cache_disk_writes_dropped_total",
                "Blocks not written to the disk cache because its write queue was full",
                self.cache_disk_writes_dropped as f64,
            ),
            (
                "cdpfs_cache_disk_writes_refused_total",
                "Blocks the cache directory did not take (full, read-only or failing)",
                self.cache_disk_writes_refused as f64,
            ),
            (
                "cdpfs_cache_disk_write_pauses_total",
                "Pauses the disk cache's writers took to leave a busy CPU to the reads",
                self.cache_disk_write_pauses as f64,
            ),
            (
                "cdpfs_cache_disk_read_timeouts_total",
                "Disk cache reads abandoned because the cache directory did not answer in time",
                self.cache_disk_read_timeouts as f64,
            ),
            (
                "cdpfs_cache_dir_operations_total",
                "Operations run on the cache directory off the I/O threads (block lookups and reads, saved listings, API answers)",
                self.cache_dir_operations as f64,
            ),
        ];
        let gauges = [
            (
                "cdpfs_s3_unreachable",
                "1 while S3 cannot be reached (offline)",
                f64::from(u8::from(self.s3_unreachable)),
            ),
            ("cdpfs_read_latency_p50_seconds", "Median read latency", self.read_p50_ms / 1000.0),
            ("cdpfs_read_latency_p90_seconds", "90th percentile read latency", self.read_p90_ms / 1000.0),
            ("cdpfs_read_latency_p99_seconds", "99th percentile read latency", self.read_p99_ms / 1000.0),
            ("cdpfs_cache_memory_bytes", "Bytes of blocks held in memory", self.cache_memory_bytes as f64),
            (
                "cdpfs_cache_disk_write_queue_bytes",
                "Bytes of blocks waiting to be written to the disk cache",
                self.cache_disk_write_queue_bytes as f64,
            ),
            ("cdpfs_resident_memory_bytes", "Resident memory of the cdpfs process", self.rss_bytes as f64),
        ];
        let mut out = String::new();
        for (kind, rows) in [("counter", &counters[..]), ("gauge", &gauges[..])] {
            for (name, help, value) in rows {
                out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
            }
        }
        out
    }
}

/// Resident memory of this process (from /proc/self/statm).
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles_come_from_the_histogram() {
        let reads = ReadStats::default();
        for _ in 0..90 {
            reads.record(Some(10), Duration::from_micros(300));
        }
        for _ in 0..10 {
            reads.record(None, Duration::from_millis(40));
        }
        assert_eq!(reads.percentile_ms(0.5), 0.512);
        assert_eq!(reads.percentile_ms(0.99), 65.536);
        assert_eq!(reads.bytes.load(Ordering::Relaxed), 900);
        assert_eq!(reads.errors.load(Ordering::Relaxed), 10);
    }
}
