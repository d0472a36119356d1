//! cdpfs benchmark: each case through a fresh mount, against a raw baseline (the same S3 client
//! doing the ideal ranged GETs directly) measured in the same run, on a loopback origin that
//! models WAN S3 (first-byte latency per request, bandwidth cap per connection).
//!
//! Run: `cargo bench --bench cdpfs-bench` (as root). Options: `--latency-ms N` (30),
//! `--bandwidth-mbps N` (80, MB/s per connection), `--mrc-mib N` (2048), `--runs N` (3),
//! `--smoke` (tiny sizes, one run: checks the harness, not the speed), `--only 1,4,5,6,7,9,10`
//! (case groups: 1 sequential/re-read/remount, 4 random, 5 IMOD, 6 Zarr, 7 walk, 9 readers,
//! 10 binned MRC views).

mod origin;
mod pyramid;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cdpfs::store::s3::{RetryPolicy, S3Config, S3Store};
use cdpfs::store::{ObjectMeta, ObjectStore};
use origin::{Counters, Origin, Shaping};

const BUCKET: &str = "bench";
const MRC_KEY: &str = "10000/TS_026/Reconstructions/VoxelSpacing13.480/Tomograms/100/TS_026.mrc";
const ZARR_PREFIX: &str = "10000/TS_026/Reconstructions/VoxelSpacing13.480/Tomograms/100/TS_026.zarr/0";
const BLOCK: u64 = 2 << 20;
const SECTION_NX: u64 = 1024;

struct Options {
    latency: Duration,
    bandwidth: u64,
    mrc_bytes: u64,
    zarr_chunk: u64,
    zarr_chunks: u64,
    runs: usize,
    runs_dataset: usize,
    /// Case groups to run (1: sequential, 4: random, 5: IMOD, 6: Zarr, 7: walk, 9: readers,
    /// 10: views).
    only: Option<Vec<u32>>,
}

impl Options {
    fn wants(&self, case: u32) -> bool {
        self.only.as_ref().is_none_or(|cases| cases.contains(&case))
    }
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let smoke = args.iter().any(|a| a == "--smoke");
    Options {
        latency: Duration::from_millis(value("--latency-ms", 30)),
        bandwidth: value("--bandwidth-mbps", 80) * 1_000_000,
        mrc_bytes: value("--mrc-mib", if smoke { 64 } else { 2048 }) << 20,
        zarr_chunk: if smoke { 2 << 20 } else { 32 << 20 },
        zarr_chunks: 16,
        runs: value("--runs", if smoke { 1 } else { 3 }) as usize,
        runs_dataset: if smoke { 20 } else { 300 },
        only: args
            .iter()
            .position(|a| a == "--only")
            .and_then(|i| args.get(i + 1))
            .map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect()),
    }
}

/// A 1 MiB noise pattern, repeated: cheap to generate, never all zeros.
fn filler(len: u64, seed: u64) -> Bytes {
    let mut state = seed | 1;
    let pattern: Vec<u8> = (0..(1 << 20) / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect();
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        let take = (len - out.len() as u64).min(pattern.len() as u64) as usize;
        out.extend_from_slice(&pattern[..take]);
    }
    Bytes::from(out)
}

const PYRAMID: &str = "10002/TS_100/Reconstructions/VoxelSpacing13.480/Tomograms/100/TS_100";

fn bucket(opts: &Options) -> (BTreeMap<String, Bytes>, Vec<pyramid::Level>) {
    let mut objects = BTreeMap::new();
    let mut mrc = filler(opts.mrc_bytes, 1).to_vec();
    let nz = (opts.mrc_bytes - 1024) / (SECTION_NX * SECTION_NX * 4);
    for (i, v) in [SECTION_NX, SECTION_NX, nz, 2].iter().enumerate() {
        mrc[i * 4..i * 4 + 4].copy_from_slice(&(*v as i32).to_le_bytes());
    }
    objects.insert(MRC_KEY.to_owned(), Bytes::from(mrc));
    for i in 0..opts.zarr_chunks {
        objects.insert(format!("{ZARR_PREFIX}/0/{}/{}", i / 4, i % 4), filler(opts.zarr_chunk, 10 + i));
    }
    objects.insert(format!("{ZARR_PREFIX}/.zarray"), Bytes::from_static(b"{}"));
    for run in 0..opts.runs_dataset {
        let base = format!("10001/run_{run:03}");
        objects.insert(format!("{base}/run_metadata.json"), Bytes::from_static(b"{}"));
        let tomo = format!("{base}/Reconstructions/VoxelSpacing13.480/Tomograms/100");
        objects.insert(format!("{tomo}/tomogram_metadata.json"), Bytes::from_static(b"{}"));
        objects.insert(format!("{tomo}/run_{run:03}.mrc"), Bytes::from_static(b"MRC"));
        let ann = format!("{base}/Reconstructions/VoxelSpacing13.480/Annotations/100");
        objects.insert(format!("{ann}/ribosome-1.0.json"), Bytes::from_static(b"{}"));
        objects.insert(format!("{ann}/ribosome-1.0_point.ndjson"), Bytes::from_static(b"{}\n"));
    }
    // The same tomogram again (its own folder: the views' discovery stays out of the other
    // cases), with the binned pyramid levels beside it.
    objects.insert(format!("{PYRAMID}.mrc"), objects[MRC_KEY].clone());
    let levels =
        if opts.wants(10) { pyramid::add(&mut objects, &format!("{PYRAMID}.zarr"), SECTION_NX, nz) } else { vec![] };
    (objects, levels)
}

/// A fresh mount of the origin; unmounted on drop.
struct Mount {
    path: PathBuf,
}

impl Mount {
    fn new(endpoint: &str, cache_dir: &Path, extra: &[&str]) -> Mount {
        let path = std::env::temp_dir().join(format!("cdpfs-bench-mnt-{}", std::process::id()));
        fs::create_dir_all(&path).unwrap();
        let status = Command::new(env!("CARGO_BIN_EXE_cdpfs"))
            .args(["mount", path.to_str().unwrap(), "--endpoint-url", endpoint, "--bucket", BUCKET])
            .args(["--cache-dir", cache_dir.to_str().unwrap()])
            .args(extra)
            .status()
            .unwrap();
        assert!(status.success(), "mount failed");
        Mount { path }
    }

    fn file(&self, key: &str) -> PathBuf {
        self.path.join(key)
    }

    /// The /proc directory of the cdpfs process serving this mount.
    fn process(&self) -> PathBuf {
        let wanted = self.path.to_str().unwrap().as_bytes().to_vec();
        fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .map(|p| p.path())
            .find(|p| fs::read(p.join("cmdline")).is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == wanted)))
            .expect("no cdpfs process serves the mount")
    }

    /// Peak resident memory of the cdpfs process serving this mount, in bytes.
    fn peak_rss(&self) -> u64 {
        let status = fs::read_to_string(self.process().join("status")).unwrap_or_default();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in status");
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    /// CPU time (user + system) the cdpfs process has used so far, in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat = fs::read_to_string(self.process().join("stat")).unwrap_or_default();
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        ticks as f64 / 100.0
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_cdpfs")).args(["unmount", self.path.to_str().unwrap()]).status();
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn fresh_cache_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cdpfs-bench-cache-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

fn read_sequential(path: &Path) -> u64 {
    let mut file = File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            return total;
        }
        total += n as u64;
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

fn mbps(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e6
}

struct Raw {
    store: Arc<S3Store>,
    runtime: tokio::runtime::Runtime,
}

impl Raw {
    fn meta(&self, key: &str, size: u64) -> ObjectMeta {
        ObjectMeta { key: key.to_owned(), size, etag: String::new(), mtime: std::time::SystemTime::UNIX_EPOCH }
    }

    /// Fetches `ranges` of `key` with at most `parallel` GETs in flight; returns the time taken.
    fn fetch(
        &self,
        key: &str,
        size: u64,
        ranges: impl IntoIterator<Item = std::ops::Range<u64>>,
        parallel: usize,
    ) -> Duration {
        let started = Instant::now();
        self.runtime.block_on(self.fetch_async(key, size, ranges, parallel));
        started.elapsed()
    }

    /// [`Raw::fetch`], inside the runtime.
    async fn fetch_async(
        &self,
        key: &str,
        size: u64,
        ranges: impl IntoIterator<Item = std::ops::Range<u64>>,
        parallel: usize,
    ) {
        let object = Arc::new(self.meta(key, size));
        let gate = Arc::new(tokio::sync::Semaphore::new(parallel));
        let mut tasks = tokio::task::JoinSet::new();
        for range in ranges {
            let (store, object, gate) = (self.store.clone(), object.clone(), gate.clone());
            tasks.spawn(async move {
                let _permit = gate.acquire_owned().await.unwrap();
                store.get_range(&object, range).await.unwrap().len()
            });
        }
        while tasks.join_next().await.is_some() {}
    }
}

fn blocks_of(start: u64, end: u64, part: u64) -> Vec<std::ops::Range<u64>> {
    (start..end).step_by(part as usize).map(|s| s..(s + part).min(end)).collect()
}

/// Per-run measurements of reading one whole view.
#[derive(Default)]
struct ViewRuns {
    seconds: Vec<f64>,
    cpu: Vec<f64>,
    gets: Vec<f64>,
    megabytes: Vec<f64>,
    raw_seconds: Vec<f64>,
}

struct Row {
    case: &'static str,
    cdpfs: String,
    raw: String,
    ratio: String,
    target: &'static str,
}

fn main() {
    let opts = options();
    let (objects, levels) = bucket(&opts);
    let sizes: BTreeMap<String, u64> = objects.iter().map(|(k, v)| (k.clone(), v.len() as u64)).collect();
    let mrc_size = objects[MRC_KEY].len() as u64;
    let shaping = Shaping { latency: opts.latency, bytes_per_sec: opts.bandwidth };
    let (addr, counters) = Origin::start(BUCKET, objects, shaping);
    let endpoint = format!("http://{addr}");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let config = S3Config {
        bucket: BUCKET.into(),
        region: "us-east-1".into(),
        endpoint_url: Some(endpoint.clone()),
        sign_requests: false,
        retry: RetryPolicy::default(),
    };
    let store = Arc::new(runtime.block_on(S3Store::new(&config)));
    let raw = Raw { store, runtime };
    let counters: Arc<Counters> = counters;
    let mut rows = Vec::new();
    eprintln!(
        "origin: {} ms first byte, {} MB/s per connection; MRC {} MiB; {} runs each",
        opts.latency.as_millis(),
        opts.bandwidth / 1_000_000,
        mrc_size >> 20,
        opts.runs
    );

    if opts.wants(1) {
        // 1-3: cold sequential, warm re-read, re-read after remount (disk cache).
        let (mut cold, mut warm, mut remount, mut remount_gets, mut raw_seq) = (vec![], vec![], vec![], vec![], vec![]);
        let mut cold_cpu = vec![];
        for _ in 0..opts.runs {
            let cache = fresh_cache_dir();
            {
                let mount = Mount::new(&endpoint, &cache, &[]);
                let t = Instant::now();
                let n = read_sequential(&mount.file(MRC_KEY));
                cold.push(mbps(n, t.elapsed()));
                cold_cpu.push(mount.cpu_seconds() / t.elapsed().as_secs_f64());
                let t = Instant::now();
                let n = read_sequential(&mount.file(MRC_KEY));
                warm.push(mbps(n, t.elapsed()));
                std::thread::sleep(Duration::from_secs(1)); // let background disk writes land
            }
            let mount = Mount::new(&endpoint, &cache, &[]);
            let before = counters.snapshot().0;
            let t = Instant::now();
            let n = read_sequential(&mount.file(MRC_KEY));
            remount.push(mbps(n, t.elapsed()));
            remount_gets.push((counters.snapshot().0 - before) as f64);
            drop(mount);
            raw_seq.push(mbps(mrc_size, raw.fetch(MRC_KEY, mrc_size, blocks_of(0, mrc_size, BLOCK), 32)));
            let _ = fs::remove_dir_all(&cache);
        }
        let (c, r) = (median(cold), median(raw_seq));
        rows.push(Row {
            case: "cold sequential read, MRC (MB/s)",
            cdpfs: format!("{c:.0} (cdpfs CPU {:.0}%)", median(cold_cpu) * 100.0),
            raw: format!("{r:.0} (32 x 2 MiB GETs)"),
            ratio: format!("{:.2}x", c / r),
            target: ">= 0.9x",
        });
        rows.push(Row {
            case: "warm re-read, same mount (MB/s)",
            cdpfs: format!("{:.0}", median(warm)),
            raw: "-".into(),
            ratio: "-".into(),
            target: ">= 2000 MB/s",
        });
        rows.push(Row {
            case: "re-read after remount (MB/s, GETs)",
            cdpfs: format!("{:.0} MB/s, {:.0} GETs", median(remount), median(remount_gets)),
            raw: "-".into(),
            ratio: "-".into(),
            target: "0 GETs, >= 1000 MB/s",
        });
    }

    if opts.wants(4) {
        // 4: random 64 KiB preads, one thread.
        let (mut p50s, mut raw_p50s, mut amplification) = (vec![], vec![], vec![]);
        for run in 0..opts.runs {
            let cache = fresh_cache_dir();
            let mount = Mount::new(&endpoint, &cache, &[]);
            let file = File::open(mount.file(MRC_KEY)).unwrap();
            let mut buf = vec![0u8; 64 << 10];
            let offsets: Vec<u64> =
                (0..100u64).map(|i| (i * 7919 + run as u64 * 104_729) * 4096 * 37 % (mrc_size - (64 << 10))).collect();
            let before = counters.snapshot().2;
            let mut latencies = Vec::new();
            for &offset in &offsets {
                let t = Instant::now();
                file.read_exact_at(&mut buf, offset).unwrap();
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            amplification.push((counters.snapshot().2 - before) as f64 / (offsets.len() as f64 * 65536.0));
            p50s.push(median(latencies));
            drop(file);
            drop(mount);
            let raw_lat: Vec<f64> = offsets
                .iter()
                .map(|&o| raw.fetch(MRC_KEY, mrc_size, std::iter::once(o..o + (64 << 10)), 1).as_secs_f64() * 1000.0)
                .collect();
            raw_p50s.push(median(raw_lat));
            let _ = fs::remove_dir_all(&cache);
        }
        let (c, r) = (median(p50s), median(raw_p50s));
        rows.push(Row {
            case: "random 64 KiB preads, p50 (ms); bytes fetched/read",
            cdpfs: format!("{c:.1} ms; {:.2}x bytes", median(amplification)),
            raw: format!("{r:.1} ms"),
            ratio: format!("{:.2}x", c / r),
            target: "<= 1.2x; <= 2x bytes",
        });
    }

    if opts.wants(5) {
        // 5: IMOD-like: header, then 50 XY sections at random z.
        let section = SECTION_NX * SECTION_NX * 4;
        let nz = (mrc_size - 1024) / section;
        let (mut imod, mut raw_imod) = (vec![], vec![]);
        for run in 0..opts.runs {
            let zs: Vec<u64> = (0..50u64).map(|i| (i * 37 + run as u64 * 11) % nz).collect();
            let cache = fresh_cache_dir();
            let mount = Mount::new(&endpoint, &cache, &[]);
            let t = Instant::now();
            let file = File::open(mount.file(MRC_KEY)).unwrap();
            let mut header = vec![0u8; 1024];
            file.read_exact_at(&mut header, 0).unwrap();
            let mut buf = vec![0u8; section as usize];
            for &z in &zs {
                file.read_exact_at(&mut buf, 1024 + z * section).unwrap();
            }
            imod.push(t.elapsed().as_secs_f64());
            drop(file);
            drop(mount);
            let t = Instant::now();
            raw.fetch(MRC_KEY, mrc_size, std::iter::once(0..1024), 1);
            for &z in &zs {
                let start = 1024 + z * section;
                raw.fetch(MRC_KEY, mrc_size, blocks_of(start, start + section, BLOCK), 8);
            }
            raw_imod.push(t.elapsed().as_secs_f64());
            let _ = fs::remove_dir_all(&cache);
        }
        let (c, r) = (median(imod), median(raw_imod));
        rows.push(Row {
            case: "IMOD-like: header + 50 XY sections (s)",
            cdpfs: format!("{c:.2}"),
            raw: format!("{r:.2} (2 MiB parts, parallel)"),
            ratio: format!("{:.2}x", c / r),
            target: "<= 1.2x",
        });
    }

    if opts.wants(6) {
        // 6: Zarr level 0, every chunk, 4 threads.
        let chunk_keys: Vec<String> =
            (0..opts.zarr_chunks).map(|i| format!("{ZARR_PREFIX}/0/{}/{}", i / 4, i % 4)).collect();
        let total = opts.zarr_chunk * opts.zarr_chunks;
        let (mut zarr, mut raw_zarr) = (vec![], vec![]);
        for _ in 0..opts.runs {
            let cache = fresh_cache_dir();
            let mount = Mount::new(&endpoint, &cache, &[]);
            let t = Instant::now();
            std::thread::scope(|scope| {
                for worker in 0..4 {
                    let (keys, mount) = (&chunk_keys, &mount);
                    scope.spawn(move || {
                        for key in keys.iter().skip(worker).step_by(4) {
                            fs::read(mount.file(key)).unwrap();
                        }
                    });
                }
            });
            zarr.push(mbps(total, t.elapsed()));
            drop(mount);
            let t = Instant::now();
            raw.runtime.block_on(async {
                let gate = Arc::new(tokio::sync::Semaphore::new(4));
                let mut tasks = tokio::task::JoinSet::new();
                for key in &chunk_keys {
                    let (store, gate) = (raw.store.clone(), gate.clone());
                    let object = raw.meta(key, opts.zarr_chunk);
                    tasks.spawn(async move {
                        let _p = gate.acquire_owned().await.unwrap();
                        store.get_range(&object, 0..object.size).await.unwrap().len()
                    });
                }
                while tasks.join_next().await.is_some() {}
            });
            raw_zarr.push(mbps(total, t.elapsed()));
            let _ = fs::remove_dir_all(&cache);
        }
        let (c, r) = (median(zarr), median(raw_zarr));
        rows.push(Row {
            case: "Zarr level 0, all chunks, 4 threads (MB/s)",
            cdpfs: format!("{c:.0}"),
            raw: format!("{r:.0} (4 whole-chunk GETs at a time)"),
            ratio: format!("{:.2}x", c / r),
            target: ">= 0.8x",
        });
    }

    if opts.wants(7) {
        // 7-8: find + stat over the dataset tree, cold and after remount.
        let (mut walk_cold, mut walk_again, mut raw_walk) = (vec![], vec![], vec![]);
        for _ in 0..opts.runs {
            let cache = fresh_cache_dir();
            for times in [&mut walk_cold, &mut walk_again] {
                let mount = Mount::new(&endpoint, &cache, &[]);
                let t = Instant::now();
                let found = walk(&mount.file("10001"));
                times.push(t.elapsed().as_secs_f64());
                assert_eq!(found, opts.runs_dataset * 5);
            }
            let t = Instant::now();
            let listed = raw.runtime.block_on(list_serially(raw.store.as_ref(), "10001/".into()));
            raw_walk.push(t.elapsed().as_secs_f64());
            assert_eq!(listed, opts.runs_dataset * 5);
            let _ = fs::remove_dir_all(&cache);
        }
        let (c, r) = (median(walk_cold), median(raw_walk));
        rows.push(Row {
            case: "find + stat, dataset tree, cold (s)",
            cdpfs: format!("{c:.2}"),
            raw: format!("{r:.2} (one LIST per dir, serial)"),
            ratio: format!("{:.1}x faster", r / c),
            target: ">= 10x faster",
        });
        rows.push(Row {
            case: "same walk after remount (s)",
            cdpfs: format!("{:.2}", median(walk_again)),
            raw: "-".into(),
            ratio: "-".into(),
            target: "<= 1 s",
        });
    }

    if opts.wants(9) {
        // 9: 32 concurrent sequential readers under a 256 MiB memory budget.
        let cache = fresh_cache_dir();
        let mount = Mount::new(&endpoint, &cache, &["--max-memory", "256M", "--no-disk-cache"]);
        let stripe = mrc_size / 32;
        let t = Instant::now();
        std::thread::scope(|scope| {
            for i in 0..32u64 {
                let path = mount.file(MRC_KEY);
                scope.spawn(move || {
                    let file = File::open(path).unwrap();
                    let mut buf = vec![0u8; 1 << 20];
                    let mut offset = i * stripe;
                    while offset < (i + 1) * stripe {
                        let n = file.read_at(&mut buf, offset).unwrap();
                        assert!(n > 0);
                        offset += n as u64;
                    }
                });
            }
        });
        let elapsed = t.elapsed();
        let rss = mount.peak_rss();
        drop(mount);
        let _ = fs::remove_dir_all(&cache);
        rows.push(Row {
            case: "32 concurrent sequential readers, --max-memory 256M",
            cdpfs: format!("peak RSS {} MiB, {:.0} MB/s", rss >> 20, mbps(mrc_size, elapsed)),
            raw: "-".into(),
            ratio: "-".into(),
            target: "RSS <= 356 MiB",
        });
    }

    if opts.wants(10) {
        // 10: binned MRC views of the pyramid: one XY section of the bin-4 view (time to first
        // image), the whole bin-4 and bin-2 views, against raw GETs of the chunks they come
        // from and against reading the full-resolution MRC.
        let view = |bin: u32| format!("{PYRAMID}.bin{bin}.mrc");
        let (mut section, mut section_gets, mut full_mrc, mut full_mrc_gets) = (vec![], vec![], vec![], vec![]);
        let (mut listing_views, mut listing_plain) = (vec![], vec![]);
        let mut whole: BTreeMap<u32, ViewRuns> = BTreeMap::new();
        for _ in 0..opts.runs {
            let cache = fresh_cache_dir();
            {
                // What the views cost a cold `ls -l` of the tomogram's folder (and the path to it).
                let plain = Mount::new(&endpoint, &cache, &["--no-mrc-views"]);
                let t = Instant::now();
                fs::read_dir(plain.file(&format!("{PYRAMID}.mrc")).parent().unwrap()).unwrap().for_each(drop);
                listing_plain.push(t.elapsed().as_secs_f64());
            }
            let _ = fs::remove_dir_all(&cache);
            let mount = Mount::new(&endpoint, &cache, &[]);
            let t = Instant::now();
            fs::read_dir(mount.file(&view(4)).parent().unwrap()).unwrap().for_each(drop);
            listing_views.push(t.elapsed().as_secs_f64());
            fs::metadata(mount.file(&view(4))).unwrap();
            let [nz, ny, nx] = levels[1].shape;
            let bytes = ny * nx * 4;
            let (before, t) = (counters.snapshot().0, Instant::now());
            let file = File::open(mount.file(&view(4))).unwrap();
            let mut header = vec![0u8; 1024];
            file.read_exact_at(&mut header, 0).unwrap();
            let mut buf = vec![0u8; bytes as usize];
            file.read_exact_at(&mut buf, 1024 + nz / 2 * bytes).unwrap();
            section.push(t.elapsed().as_secs_f64());
            section_gets.push((counters.snapshot().0 - before) as f64);
            drop((file, mount));
            let _ = fs::remove_dir_all(&cache);
            for (bin, level) in [(4, &levels[1]), (2, &levels[0])] {
                let cache = fresh_cache_dir();
                let mount = Mount::new(&endpoint, &cache, &[]);
                fs::metadata(mount.file(&view(bin))).unwrap();
                let (before, cpu, t) = (counters.snapshot(), mount.cpu_seconds(), Instant::now());
                let n = read_sequential(&mount.file(&view(bin)));
                let elapsed = t.elapsed().as_secs_f64();
                let after = counters.snapshot();
                let cpu = (mount.cpu_seconds() - cpu) / elapsed;
                drop(mount);
                let _ = fs::remove_dir_all(&cache);
                assert_eq!(n, 1024 + level.shape.iter().product::<u64>() * 4);
                let t = Instant::now();
                let fetches = level
                    .chunk_keys
                    .iter()
                    .map(|key| raw.fetch_async(key, sizes[key], blocks_of(0, sizes[key], BLOCK), 32));
                raw.runtime.block_on(futures_util::future::join_all(fetches));
                let entry = whole.entry(bin).or_default();
                entry.seconds.push(elapsed);
                entry.cpu.push(cpu);
                entry.gets.push((after.0 - before.0) as f64);
                entry.megabytes.push((after.2 - before.2) as f64 / 1e6);
                entry.raw_seconds.push(t.elapsed().as_secs_f64());
            }
            let cache = fresh_cache_dir();
            let mount = Mount::new(&endpoint, &cache, &[]);
            let (before, t) = (counters.snapshot().0, Instant::now());
            read_sequential(&mount.file(&format!("{PYRAMID}.mrc")));
            full_mrc.push(t.elapsed().as_secs_f64());
            full_mrc_gets.push((counters.snapshot().0 - before) as f64);
            drop(mount);
            let _ = fs::remove_dir_all(&cache);
        }
        let (full, full_gets) = (median(full_mrc), median(full_mrc_gets));
        let (v, p) = (median(listing_views), median(listing_plain));
        rows.push(Row {
            case: "cold listing of the tomogram's folder, path included (s)",
            cdpfs: format!("{v:.2} with views"),
            raw: format!("{p:.2} with --no-mrc-views"),
            ratio: format!("{:.2}x", v / p),
            target: "-",
        });
        rows.push(Row {
            case: "bin-4 view: header + middle XY section, cold (s; GETs)",
            cdpfs: format!("{:.2} s; {:.0} GETs", median(section), median(section_gets)),
            raw: "-".into(),
            ratio: "-".into(),
            target: "< 1 s",
        });
        for (bin, runs) in whole {
            let (c, r) = (median(runs.seconds), median(runs.raw_seconds));
            rows.push(Row {
                case: if bin == 4 { "bin-4 view, whole file, cold (s)" } else { "bin-2 view, whole file, cold (s)" },
                cdpfs: format!(
                    "{c:.2} s (cdpfs CPU {:.0}%), {:.0} GETs, {:.0} MB fetched; full MRC {full:.2} s, {full_gets:.0} GETs ({:.0}x longer)",
                    median(runs.cpu) * 100.0,
                    median(runs.gets),
                    median(runs.megabytes),
                    full / c
                ),
                raw: format!("{r:.2} s (its chunks, 2 MiB GETs)"),
                ratio: format!("{:.2}x", c / r),
                target: "<= 1.5x",
            });
        }
    }

    println!("| case | cdpfs | raw baseline | ratio | target |");
    println!("|---|---|---|---|---|");
    for row in rows {
        println!("| {} | {} | {} | {} | {} |", row.case, row.cdpfs, row.raw, row.ratio, row.target);
    }
}

/// Counts files under `dir`, stat-ing each (what `find -type f` plus `stat` does).
fn walk(dir: &Path) -> usize {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|entry| {
            let meta = fs::metadata(entry.path()).unwrap();
            if meta.is_dir() {
                walk(&entry.path())
            } else {
                1
            }
        })
        .sum()
}

/// One ListObjectsV2 per directory, one at a time: the naive baseline.
async fn list_serially(store: &dyn ObjectStore, prefix: String) -> usize {
    let listing = store.list_prefix(&prefix).await.unwrap();
    let mut files = listing.objects.len();
    for sub in listing.prefixes {
        files += Box::pin(list_serially(store, sub)).await;
    }
    files
}
