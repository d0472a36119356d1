//! Staging data into the cache (`cdpfs prefetch TARGET...`), for job prologs.
//!
//! A target is a file or folder of a cdpfs mount (its files are read through the mount, so the
//! mount's block cache, memory and disk, holds them), or a bucket key or prefix
//! (`s3://bucket/10000/TS_026/` or a bare key), whose objects are downloaded straight into a
//! disk cache directory, with no mount needed, in the blocks a later mount of that cache reads.
//! Files already fully cached are skipped; a terminal gets a progress bar with bytes, rate and
//! ETA, anything else one line per file. Folders stage the bucket's objects; MRC views are
//! staged only when named.

use std::ffi::CString;
use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::TryStreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cache::disk::DiskCache;
use crate::cache::BlockKey;
use crate::cache::BLOCK_SIZE;
use crate::store::s3::{S3Config, S3Store};
use crate::store::{ObjectMeta, ObjectStore};

/// GETs in flight per object staged from the bucket.
const GETS_PER_OBJECT: usize = 8;

/// Where bucket keys are staged: the bucket (unless a target's `s3://` URL names it) and the
/// disk cache a later mount will use.
pub struct BucketStaging {
    /// How to reach the bucket.
    pub s3: S3Config,
    /// The cache directory.
    pub cache_dir: PathBuf,
    /// The size bound to give the directory if it has none yet (the directory's own bound
    /// wins: staging never evicts below it).
    pub cache_size: Option<u64>,
}

/// One file or object to stage.
enum Source {
    File(PathBuf),
    Object(Arc<ObjectMeta>),
}

struct Job {
    label: String,
    size: u64,
    source: Source,
}

/// Stages every target with `jobs` files at a time.
pub fn prefetch(targets: &[String], jobs: usize, staging: &BucketStaging) -> Result<()> {
    let (mut files, mut keys) = (Vec::new(), Vec::new());
    for target in targets {
        match target.strip_prefix("s3://") {
            Some(url) => {
                let (bucket, key) = url.split_once('/').unwrap_or((url, ""));
                keys.push((bucket.to_owned(), key.to_owned()));
            }
            None => match std::fs::metadata(target) {
                Ok(_) => collect(Path::new(target), &mut files)?,
                // A mount's path is never a bucket key, even when it is not there.
                Err(e) if crate::mount_table::under_a_cdpfs_mount(Path::new(target)).unwrap_or(false) => {
                    bail!("cannot prefetch {target}: {e}")
                }
                Err(_) => keys.push((staging.s3.bucket.clone(), target.trim_start_matches('/').to_owned())),
            },
        }
    }
    let mut pending = Vec::new();
    let mut skipped = 0;
    for (path, size) in files {
        let cached: u64 = xattr(&path, "user.cdpfs.cached")
            .with_context(|| format!("{} is not on a cdpfs mount", path.display()))?
            .parse()
            .unwrap_or(0);
        if cached >= size {
            skipped += 1;
        } else {
            pending.push(Job { label: path.display().to_string(), size, source: Source::File(path) });
        }
    }
    let bucket = match keys.first() {
        Some((name, _)) => Some(Bucket::open(staging, name)?),
        None => None,
    };
    if let Some(bucket) = &bucket {
        for (name, key) in &keys {
            if *name != bucket.name {
                bail!("one bucket per prefetch: s3://{name}/ and s3://{}/", bucket.name);
            }
            for object in bucket.objects(key)? {
                if bucket.is_cached(&object) {
                    skipped += 1;
                } else {
                    let label = format!("s3://{}/{}", bucket.name, object.key);
                    pending.push(Job { label, size: object.size, source: Source::Object(Arc::new(object)) });
                }
            }
        }
    }
    let staged: u64 = pending.iter().filter(|job| matches!(job.source, Source::Object(_))).map(|job| job.size).sum();
    if let Some(bucket) = bucket.as_ref().filter(|b| staged > b.disk.size()) {
        eprintln!(
            "cdpfs: warning: staging {staged} bytes into a cache bounded to {} bytes: the first files will be evicted",
            bucket.disk.size()
        );
    }
    run(pending, skipped, jobs, |job, bar| match &job.source {
        Source::File(path) => read_through(path, bar).map_err(Into::into),
        Source::Object(object) => bucket.as_ref().expect("objects come from a bucket").fetch(object, bar),
    })
}

/// Runs `fetch` over `pending` with `jobs` workers, reporting progress, and fails naming every
/// job that failed.
fn run(
    pending: Vec<Job>,
    skipped: usize,
    jobs: usize,
    fetch: impl Fn(&Job, &ProgressBar) -> Result<()> + Sync,
) -> Result<()> {
    let total: u64 = pending.iter().map(|job| job.size).sum();
    let terminal = std::io::stderr().is_terminal();
    let bar = if terminal { ProgressBar::new(total) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}")
            .expect("valid progress template"),
    );
    let queue = Mutex::new(pending);
    let failures = Mutex::new(Vec::new());
    // Of the files fetched whole: a failed file's bytes were not staged.
    let (fetched, fetched_bytes) = (AtomicUsize::new(0), AtomicU64::new(0));
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| loop {
                let Some(job) = queue.lock().expect("queue poisoned").pop() else { return };
                match fetch(&job, &bar) {
                    Ok(()) => {
                        fetched.fetch_add(1, Ordering::Relaxed);
                        fetched_bytes.fetch_add(job.size, Ordering::Relaxed);
                        if !terminal {
                            say(format_args!("prefetched {} ({} bytes)", job.label, job.size));
                        }
                    }
                    Err(e) => failures.lock().expect("failures poisoned").push(format!("{}: {e:#}", job.label)),
                }
            });
        }
    });
    bar.finish_and_clear();
    let failures = failures.into_inner().expect("failures poisoned");
    say(format_args!(
        "prefetched {} files ({} bytes), {skipped} already cached, {} failed",
        fetched.into_inner(),
        fetched_bytes.into_inner(),
        failures.len()
    ));
    if !failures.is_empty() {
        bail!("could not fetch:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// A bucket and the disk cache its objects are staged into.
struct Bucket {
    name: String,
    runtime: tokio::runtime::Runtime,
    store: S3Store,
    disk: DiskCache,
}

impl Bucket {
    fn open(staging: &BucketStaging, name: &str) -> Result<Bucket> {
        let disk = DiskCache::open(&staging.cache_dir, staging.cache_size, BLOCK_SIZE)
            .with_context(|| format!("opening the cache directory {}", staging.cache_dir.display()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let config = S3Config { bucket: name.to_owned(), ..staging.s3.clone() };
        let store = runtime.block_on(S3Store::new(&config));
        Ok(Bucket { name: name.to_owned(), runtime, store, disk })
    }

    /// The objects `key` names: the object itself, or every object under it as a prefix.
    fn objects(&self, key: &str) -> Result<Vec<ObjectMeta>> {
        let url = format!("s3://{}/{key}", self.name);
        let listed =
            |prefix: &str| self.runtime.block_on(self.store.list_all(prefix)).with_context(|| format!("listing {url}"));
        let mut objects: Vec<ObjectMeta> = if key.is_empty() || key.ends_with('/') {
            listed(key)?
        } else {
            // One delimited listing says whether KEY is an object or a folder, without walking
            // every key that merely starts with it.
            let here = self.runtime.block_on(self.store.list_prefix(key)).with_context(|| format!("listing {url}"))?;
            match here.objects.into_iter().find(|o| o.key == key) {
                Some(object) => vec![object],
                None if here.prefixes.iter().any(|p| p.strip_suffix('/') == Some(key)) => listed(&format!("{key}/"))?,
                None => Vec::new(),
            }
        };
        objects.retain(|o| !o.key.ends_with('/'));
        if objects.is_empty() {
            bail!("nothing at {url}");
        }
        Ok(objects)
    }

    fn blocks(object: &Arc<ObjectMeta>) -> impl Iterator<Item = BlockKey> + '_ {
        (0..object.size.div_ceil(BLOCK_SIZE).max(1)).map(|index| BlockKey { object: object.clone(), index })
    }

    fn is_cached(&self, object: &ObjectMeta) -> bool {
        Self::blocks(&Arc::new(object.clone())).all(|key| self.disk.present(&key))
    }

    /// Downloads the blocks of `object` the cache lacks, a few at a time.
    fn fetch(&self, object: &Arc<ObjectMeta>, bar: &ProgressBar) -> Result<()> {
        self.runtime.block_on(futures_util::stream::iter(Self::blocks(object).map(Ok)).try_for_each_concurrent(
            GETS_PER_OBJECT,
            |key| async move {
                let start = key.index * BLOCK_SIZE;
                let range = start..(start + BLOCK_SIZE).min(object.size);
                if !self.disk.present(&key) {
                    let data = self.store.get_range(object, range.clone()).await?;
                    if !self.disk.write(&key, &data) {
                        return Err(anyhow!("cannot write to the cache directory"));
                    }
                }
                bar.inc(range.end - range.start);
                Ok(())
            },
        ))
    }
}

/// Every regular file under `path`, with its size.
fn collect(path: &Path, out: &mut Vec<(PathBuf, u64)>) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot prefetch {}", path.display()))?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("listing {}", path.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        entries.sort();
        for entry in entries {
            // A folder stages its objects, not the MRC views computed from them (a view's key
            // is its Zarr level's folder); name a view to stage it.
            if entry.is_file() && xattr(&entry, "user.cdpfs.key").is_ok_and(|key| key.ends_with('/')) {
                continue;
            }
            collect(&entry, out)?;
        }
    } else if meta.is_file() {
        out.push((path.to_path_buf(), meta.len()));
    }
    Ok(())
}

fn read_through(path: &Path, bar: &ProgressBar) -> std::io::Result<()> {
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf)? {
            0 => return Ok(()),
            n => bar.inc(n as u64),
        }
    }
}

/// Prints a line to stdout. A reader that went away (`cdpfs prefetch ... | head -1`) ends the
/// output, not the work, and is no error: this process ignores SIGPIPE, as it writes to sockets.
pub fn say(line: std::fmt::Arguments) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// The value of extended attribute `name` of `path`.
pub fn xattr(path: &Path, name: &str) -> std::io::Result<String> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let c_name = CString::new(name)?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: both strings are NUL-terminated and the buffer is valid for its length.
    let n = unsafe { libc::getxattr(c_path.as_ptr(), c_name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
