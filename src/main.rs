//! The `cdpfs` command line: parses options and hands off to [`cdpfs::mount`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand};

use cdpfs::cache::{admin, bound};
use cdpfs::data::PageCache;
use cdpfs::fstab;
use cdpfs::mount::{self, MountConfig};
use cdpfs::portal;
use cdpfs::stage::BucketStaging;
use cdpfs::store::s3::{RetryPolicy, S3Config};
use cdpfs::store::snapshot::Snapshot;

/// Mount the CryoET Data Portal (or any S3 bucket) as a read-only directory tree.
///
/// Tomograms, tilt series, OME-Zarr pyramids and metadata appear as ordinary files: point
/// IMOD, RELION, napari, mrcfile or zarr at them; bytes are fetched from S3 on demand.
#[derive(Parser, Debug)]
#[command(name = "cdpfs", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Mount the bucket at MOUNTPOINT (returns once the mount is ready; see --foreground).
    Mount(Box<MountArgs>),
    /// Stage files or folders of a mount, or bucket keys, into the cache (e.g. in a job
    /// prolog), in parallel.
    Prefetch(Box<PrefetchArgs>),
    /// Show the counters of running mounts (S3 traffic, cache hits, read latency, memory).
    Stats {
        /// A cdpfs mount point (default: every cdpfs mount).
        mountpoint: Option<PathBuf>,
        /// Print JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Show what the persistent cache holds, or empty it.
    Cache {
        #[command(subcommand)]
        action: CacheCommand,
    },
    /// Describe a file or folder of a mount the way the portal does: what it is, its ids and
    /// metadata, and the tomograms, tilt series and annotations below it.
    Info {
        /// A file or folder under a cdpfs mount point (portal id symlinks are followed).
        path: PathBuf,
        /// Print JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Namespace snapshots: a bucket prefix listed once into one file that mounts serve with no
    /// LIST at all.
    Snapshot {
        #[command(subcommand)]
        action: SnapshotCommand,
    },
    /// Unmount a cdpfs mount.
    Unmount {
        /// The mounted directory.
        mountpoint: PathBuf,
        /// Detach now even if files are still open; the mount goes away once they are closed.
        #[arg(long, short = 'z')]
        lazy: bool,
    },
}

#[derive(Subcommand, Debug)]
enum CacheCommand {
    /// Blocks, bytes, objects and listings in the cache, its bound, and the mounts using it.
    Info(CacheDirArg),
    /// Create a cache directory (or change its bound): every process using it, on every node,
    /// keeps it within SIZE, whatever its own --cache-size.
    Init {
        /// The cache directory.
        dir: PathBuf,
        /// Its size bound (e.g. `500G`; at least one 512 KiB block).
        #[arg(long, value_parser = parse_cache_size)]
        size: u64,
    },
    /// One eviction pass now (for a cron job or systemd timer): evict the least recently used
    /// blocks if the cache is near its bound, remove leftovers of writers that died, refresh
    /// the usage summary.
    Trim(CacheDirArg),
    /// Delete every cached block and listing (refused while a mount uses the cache).
    Clear(CacheDirArg),
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// List PREFIX of the bucket (all pages, its sub-prefixes in parallel) into one compact,
    /// checksummed file of names, sizes, ETags and mtimes, for `cdpfs mount --namespace FILE`.
    Create {
        /// Key prefix to list, e.g. `10000/` (empty: the whole bucket).
        prefix: String,
        /// The snapshot file to write (replaced atomically; the file mounts read with
        /// --namespace, hence the same variable).
        #[arg(long, short = 'o', env = "CDPFS_NAMESPACE", value_name = "FILE")]
        output: PathBuf,
        #[command(flatten)]
        bucket: BucketArgs,
    },
}

#[derive(Args, Debug)]
struct CacheDirArg {
    /// Directory of the persistent block cache (kept across mounts; may be shared by several
    /// mounts and nodes). Default: /var/cache/cdpfs for root, else $XDG_CACHE_HOME/cdpfs when
    /// set, else /var/tmp/cdpfs-$UID (node-local: not the home directory, often NFS).
    #[arg(long, env = "CDPFS_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

impl CacheDirArg {
    fn dir(&self) -> PathBuf {
        absolute(&self.cache_dir.clone().unwrap_or_else(default_cache_dir))
    }
}

/// Which bucket to read and how persistently.
#[derive(Args, Debug)]
struct BucketArgs {
    /// Bucket to read.
    #[arg(long, env = "CDPFS_BUCKET", default_value = portal::DEFAULT_BUCKET)]
    bucket: String,

    /// AWS region of the bucket.
    #[arg(long, env = "CDPFS_REGION", default_value = portal::DEFAULT_REGION)]
    region: String,

    /// S3-compatible endpoint (a MinIO or site mirror, a caching proxy); uses path-style URLs.
    #[arg(long, env = "CDPFS_ENDPOINT_URL", value_name = "URL")]
    endpoint_url: Option<String>,

    /// Sign requests with the standard AWS credential chain (for private mirrors); by default
    /// requests are anonymous, as the public portal bucket expects.
    #[arg(long, env = "CDPFS_SIGN_REQUESTS", value_parser = BoolishValueParser::new())]
    sign_requests: bool,

    /// Give up on one S3 request (all retries included) after this long and return EIO.
    #[arg(long, env = "CDPFS_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,

    /// Abandon and retry a download that delivers no data for this long, or a listing page
    /// that has not arrived whole by then.
    #[arg(long, env = "CDPFS_STALL_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    stall_timeout: Duration,
}

impl BucketArgs {
    fn s3_config(&self) -> Result<S3Config> {
        if self.bucket.is_empty() || self.bucket.contains('/') {
            bail!("invalid bucket name {:?}", self.bucket);
        }
        if let Some(url) = &self.endpoint_url {
            check_http_url("--endpoint-url", url)?;
        }
        let retry = RetryPolicy {
            total_timeout: self.request_timeout,
            stall_timeout: self.stall_timeout,
            ..RetryPolicy::default()
        };
        Ok(S3Config {
            bucket: self.bucket.clone(),
            region: self.region.clone(),
            endpoint_url: self.endpoint_url.clone(),
            sign_requests: self.sign_requests,
            retry,
        })
    }
}

/// The persistent cache and its bound.
#[derive(Args, Debug)]
struct CacheArgs {
    #[command(flatten)]
    location: CacheDirArg,

    /// Upper bound on the disk cache (e.g. `50G`) when the cache directory has none yet
    /// (default 20G); a directory keeps the bound it was given first (or by `cdpfs cache init`),
    /// and a differing --cache-size only warns. Least recently used blocks are evicted.
    #[arg(long, env = "CDPFS_CACHE_SIZE", value_parser = parse_cache_size)]
    cache_size: Option<u64>,
}

#[derive(Args, Debug)]
struct PrefetchArgs {
    /// Files or folders under a cdpfs mount point, or bucket keys or prefixes
    /// (`s3://BUCKET/KEY`, or a bare KEY of --bucket), staged into --cache-dir.
    #[arg(required = true, value_name = "PATH_OR_KEY")]
    targets: Vec<String>,

    /// Files downloaded at the same time.
    #[arg(long, short = 'j', default_value_t = 4)]
    jobs: usize,

    #[command(flatten)]
    bucket: BucketArgs,

    #[command(flatten)]
    cache: CacheArgs,
}

#[derive(Args, Debug)]
struct MountArgs {
    /// Empty directory to mount on (see --allow-non-empty).
    mountpoint: PathBuf,

    #[command(flatten)]
    bucket: BucketArgs,

    /// Show only the keys under this prefix, e.g. `10000/` for one dataset.
    #[arg(long, env = "CDPFS_PREFIX", value_name = "KEY_PREFIX/", default_value = "")]
    prefix: String,

    /// Mount even if the mount point is not empty (what is in it is hidden while mounted).
    #[arg(long, env = "CDPFS_ALLOW_NON_EMPTY", value_parser = BoolishValueParser::new())]
    allow_non_empty: bool,

    /// Stay in the foreground (for systemd and debugging); stop with Ctrl-C or SIGTERM.
    #[arg(long, short = 'f', env = "CDPFS_FOREGROUND", value_parser = BoolishValueParser::new())]
    foreground: bool,

    /// Let all users on this machine read the mount (needs `user_allow_other` in /etc/fuse.conf
    /// unless mounting as root).
    #[arg(long, env = "CDPFS_ALLOW_OTHER", value_parser = BoolishValueParser::new())]
    allow_other: bool,

    /// How long directory listings and file attributes are trusted before S3 is asked again
    /// (e.g. `30s`, `10m`, `12h`). Portal data changes only on re-ingest.
    #[arg(long, env = "CDPFS_METADATA_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    metadata_ttl: Duration,

    /// Memory for cached and in-flight data blocks (e.g. `512M`, `4G`).
    #[arg(long, env = "CDPFS_MAX_MEMORY", default_value = "1G", value_parser = parse_size)]
    max_memory: u64,

    /// How far the kernel reads ahead of a program on this mount, which is also the size of
    /// its read requests to cdpfs (root only; cdpfs reads ahead on its own). Larger helps
    /// streams a little; smaller makes whole-section reads of MRC files fetch less past the
    /// section.
    #[arg(long, env = "CDPFS_KERNEL_READ_AHEAD", default_value = "256K", value_parser = parse_size)]
    kernel_read_ahead: u64,

    /// Which reads go through the kernel's page cache. `auto`: a file of 8 MiB or more is read
    /// past it until cdpfs has served as many bytes of it as it holds, as a stream reading it
    /// through once does (which then costs a copy less and fills no memory), then kept in it for
    /// re-reads; smaller files always are. `always`: every
    /// file is kept in it from the first read (needs no Linux 6.6 feature; `auto` falls back to
    /// it on older kernels).
    #[arg(long, env = "CDPFS_PAGE_CACHE", value_enum, default_value = "auto")]
    page_cache: PageCache,

    #[command(flatten)]
    cache: CacheArgs,

    /// A cache directory shared by the cluster (e.g. on Lustre, filled by `cdpfs prefetch
    /// --cache-dir` of it), read after --cache-dir and before S3; blocks found there are copied
    /// into --cache-dir. Only read, unless --write-shared-cache.
    #[arg(long, env = "CDPFS_SHARED_CACHE_DIR", value_name = "DIR")]
    shared_cache_dir: Option<PathBuf>,

    /// Also write the blocks this mount fetches from S3 into --shared-cache-dir.
    #[arg(long, env = "CDPFS_WRITE_SHARED_CACHE", value_parser = BoolishValueParser::new())]
    write_shared_cache: bool,

    /// Keep no data on disk: cache blocks in memory only (overrides --cache-dir).
    #[arg(long, env = "CDPFS_NO_DISK_CACHE", value_parser = BoolishValueParser::new())]
    no_disk_cache: bool,

    /// When a folder is opened, list up to this many folders below it in the background (once
    /// per folder per --metadata-ttl, never inside `*.zarr` stores), so `find`/`du`/`ls -R`
    /// don't wait for one request per folder (0 turns this off).
    #[arg(long, env = "CDPFS_LIST_AHEAD", default_value_t = 256)]
    list_ahead: usize,

    /// Serve the mount's counters as Prometheus metrics on http://HOST:PORT/metrics.
    #[arg(long, env = "CDPFS_METRICS_ADDR", value_name = "HOST:PORT")]
    metrics_addr: Option<String>,

    /// Don't show `X.bin2.mrc`/`X.bin4.mrc` views beside OME-Zarr pyramids `X.zarr`.
    #[arg(long, env = "CDPFS_NO_MRC_VIEWS", value_parser = BoolishValueParser::new())]
    no_mrc_views: bool,

    /// The portal's GraphQL API, which maps portal ids (`RN-241`, `TM-621`) to paths and lists
    /// the `by-organism/` and `by-object/` folders. Asked by default only when mounting the
    /// portal's own bucket.
    #[arg(long, env = "CDPFS_API_URL", value_name = "URL")]
    api_url: Option<String>,

    /// Never ask the portal's API: no run, tomogram, tilt-series, alignment or annotation ids as
    /// paths, no facet folders (`DS-` and `CZCDP-` ids and the metadata attributes still work).
    #[arg(long, env = "CDPFS_NO_PORTAL_API", value_parser = BoolishValueParser::new())]
    no_portal_api: bool,

    /// Give up on one API call (retries included) after this long: the id or facet lookup
    /// fails with EIO (answers already cached keep serving).
    #[arg(long, env = "CDPFS_API_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    api_timeout: Duration,

    /// How long the API's answers are trusted (in memory and in the cache directory, shared by
    /// the mounts using it) before it is asked again. Ids change only on re-ingest.
    #[arg(long, env = "CDPFS_API_TTL", default_value = "1day", value_parser = humantime::parse_duration)]
    api_ttl: Duration,

    /// Ask S3 nothing: serve the listings saved and the blocks cached in --cache-dir (e.g. staged
    /// by `cdpfs prefetch`) on a node without network; reads of anything else fail with EIO at
    /// once. (Without it, a mount that cannot reach S3 at start mounts offline anyway when it
    /// has something cached, and goes back online as soon as S3 answers.)
    #[arg(long, env = "CDPFS_OFFLINE", value_parser = BoolishValueParser::new())]
    offline: bool,

    /// Serve one generated file, `synthetic.bin`, of this size instead of the bucket: measures
    /// the FUSE and cache layers alone, without a network (for benchmarks).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    synthetic_size: Option<u64>,

    /// Serve the tree of this namespace snapshot (`cdpfs snapshot create`) instead of listing
    /// the bucket: no LIST at all; reads stay pinned to the snapshot's ETags (ESTALE when an
    /// object changed since).
    #[arg(long, env = "CDPFS_NAMESPACE", value_name = "FILE")]
    namespace: Option<PathBuf>,

    /// Log verbosity: error, warn, info, debug or trace.
    #[arg(long, env = "CDPFS_LOG_LEVEL", default_value = "info")]
    log_level: tracing::Level,

    /// Append logs to this file (by default: stderr in the foreground, nowhere in the background).
    #[arg(long, env = "CDPFS_LOG_FILE", value_name = "PATH")]
    log_file: Option<PathBuf>,
}

impl MountArgs {
    fn to_config(&self) -> Result<MountConfig> {
        let prefix = normalize_prefix(&self.prefix)?;
        // Not clap's `requires`: that would also hold `CDPFS_WRITE_SHARED_CACHE=no` against it.
        if self.write_shared_cache && self.shared_cache_dir.is_none() {
            bail!("--write-shared-cache needs --shared-cache-dir");
        }
        if let Some(url) = &self.api_url {
            check_http_url("--api-url", url)?;
        }
        Ok(MountConfig {
            mountpoint: self.mountpoint.clone(),
            s3: self.bucket.s3_config()?,
            prefix,
            allow_other: self.allow_other,
            metadata_ttl: self.metadata_ttl,
            max_memory: self.max_memory,
            kernel_read_ahead: self.kernel_read_ahead,
            page_cache: self.page_cache,
            list_ahead: self.list_ahead,
            metrics_addr: self.metrics_addr.clone(),
            mrc_views: !self.no_mrc_views,
            portal_api: self.portal_api(),
            api_timeout: self.api_timeout,
            api_ttl: self.api_ttl,
            synthetic_size: self.synthetic_size,
            offline: self.offline,
            shared_cache: self.shared_cache_dir.as_deref().map(absolute),
            write_shared_cache: self.write_shared_cache,
            namespace: self.namespace.as_deref().map(absolute),
            allow_non_empty: self.allow_non_empty,
            disk_cache: if self.no_disk_cache {
                None
            } else {
                Some((self.cache.location.dir(), self.cache.cache_size))
            },
        })
    }
}

impl MountArgs {
    /// The API to ask: `--api-url`, else the portal's own for the portal's bucket; none with
    /// `--no-portal-api`.
    fn portal_api(&self) -> Option<String> {
        if self.no_portal_api {
            return None;
        }
        match &self.api_url {
            Some(url) => Some(url.clone()),
            None => (self.bucket.bucket == portal::DEFAULT_BUCKET).then(|| portal::api::DEFAULT_URL.to_owned()),
        }
    }
}

/// `path` made absolute against the working directory (without resolving links): a mount
/// leaves its working directory once it is live, so a relative `--cache-dir ./cache` must not
/// be looked up from `/` afterwards.
fn absolute(path: &std::path::Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// `10000`, `/10000/` and `10000/` all mean the prefix `10000/`; empty means the whole bucket.
fn normalize_prefix(raw: &str) -> Result<String> {
    let trimmed = raw.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    if trimmed.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        bail!("invalid --prefix {raw:?}: empty, `.` or `..` path segments");
    }
    Ok(format!("{trimmed}/"))
}

/// `/var/cache/cdpfs` for root, else `$XDG_CACHE_HOME/cdpfs` when set, else
/// `/var/tmp/cdpfs-$UID`: on node-local storage, not in a home directory that is often NFS with
/// a small quota and shared by all of a user's nodes.
fn default_cache_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/var/cache/cdpfs");
    }
    match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(base) => PathBuf::from(base).join("cdpfs"),
        None => PathBuf::from(format!("/var/tmp/cdpfs-{uid}")),
    }
}

/// A byte count with an optional binary suffix: `4096`, `512K`, `64M`, `1G`, `2T` (`MiB`, `GB`
/// and lower case work too; all are powers of 1024).
fn parse_size(raw: &str) -> Result<u64, String> {
    let text = raw.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| format!("{raw:?} is not a size like 512M or 4G"))?;
    let shift = match unit.trim().to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{raw:?}: unknown unit (use K, M, G or T)")),
    };
    number.checked_mul(1 << shift).ok_or_else(|| format!("{raw:?} is too large"))
}

/// A cache directory's bound: a size that holds at least one block (a cache of none queues
/// blocks for the disk that never drain).
fn parse_cache_size(raw: &str) -> Result<u64, String> {
    let size = parse_size(raw)?;
    if size < cdpfs::cache::BLOCK_SIZE {
        return Err(format!("a cache must hold at least one block of {} KiB", cdpfs::cache::BLOCK_SIZE >> 10));
    }
    Ok(size)
}

/// Checks that `--option`'s `raw` is an `http://` or `https://` URL with a host
/// (`--endpoint-url`, `--api-url`): anything else would only fail later, after retries, as an
/// endpoint that cannot be reached.
fn check_http_url(option: &str, raw: &str) -> Result<()> {
    let problem = if !raw.contains("://") {
        "no http:// or https:// scheme".to_owned()
    } else {
        match raw.parse::<http::Uri>() {
            Err(e) => format!("not a URL ({e})"),
            Ok(uri) if !matches!(uri.scheme_str(), Some("http" | "https")) => {
                format!("the scheme {}:// is not supported", uri.scheme_str().unwrap_or_default())
            }
            Ok(uri) if uri.host().is_none_or(str::is_empty) => "no host".to_owned(),
            Ok(_) => return Ok(()),
        }
    };
    bail!("invalid {option} {raw:?}: {problem}; give http://HOST[:PORT] or https://HOST[:PORT]")
}

fn init_logging(args: &MountArgs) -> Result<()> {
    let builder = tracing_subscriber::fmt().with_max_level(args.log_level).with_target(false);
    // In the background, stderr already points at the log file (or nowhere).
    match (&args.log_file, args.foreground && std::env::var_os(mount::DAEMON_ENV).is_none()) {
        (Some(path), true) => {
            let file = mount::open_log_file(path)?;
            builder.with_ansi(false).with_writer(std::sync::Mutex::new(file)).init();
        }
        // No colour codes in a log file the background child's stderr points at.
        _ => {
            builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).with_writer(std::io::stderr).init()
        }
    }
    Ok(())
}

/// Warnings of commands other than `mount` (a cache directory's bound, an NFS cache) go to stderr.
fn init_command_logging() {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_target(false)
        // No colour codes in a file or pipe (`cdpfs prefetch ... 2>log`).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Carries out `cli`; `command_line` (without the program name) is what a background mount
/// re-runs in its child.
fn run(cli: Cli, command_line: &[OsString]) -> Result<()> {
    match cli.command {
        Command::Mount(args) => {
            let config = args.to_config()?;
            if args.foreground {
                init_logging(&args)?;
                mount::serve_foreground(&config)
            } else {
                mount::spawn_background(&config, args.log_file.as_deref(), command_line)
            }
        }
        Command::Prefetch(args) => {
            init_command_logging();
            let staging = BucketStaging {
                s3: args.bucket.s3_config()?,
                cache_dir: args.cache.location.dir(),
                cache_size: args.cache.cache_size,
            };
            cdpfs::stage::prefetch(&args.targets, args.jobs, &staging)
        }
        Command::Stats { mountpoint, json } => show_stats(mountpoint, json),
        Command::Cache { action: CacheCommand::Info(arg) } => {
            let dir = arg.dir();
            admin::check(&dir)?;
            let usage = admin::usage(&dir);
            println!("cache directory: {}", dir.display());
            println!("blocks:    {} ({}) of {} objects", usage.blocks, human_bytes(usage.bytes), usage.objects);
            println!("listings:  {}", usage.listings);
            match bound::stored_size(&dir) {
                Some(size) => println!("bound:     {}", human_bytes(size)),
                None => println!("bound:     not set (the first mount sets it)"),
            }
            if let Some(ledger) = bound::summary(&dir) {
                let age = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |now| now.as_secs().saturating_sub(ledger.scanned_at));
                let counted =
                    if ledger.scanned_at == 0 { "never counted".to_owned() } else { format!("counted {age} s ago") };
                println!("ledger:    {} in {} blocks ({counted})", human_bytes(ledger.bytes), ledger.blocks);
            }
            let users = admin::live_mounts(&dir);
            println!("in use by: {}", if users.is_empty() { "no mount".to_owned() } else { users.join(", ") });
            Ok(())
        }
        Command::Cache { action: CacheCommand::Init { dir, size } } => {
            bound::init(&dir, size).with_context(|| format!("creating the cache directory {}", dir.display()))?;
            println!("{} holds at most {} of cached blocks", dir.display(), human_bytes(size));
            Ok(())
        }
        Command::Cache { action: CacheCommand::Trim(arg) } => {
            let dir = arg.dir();
            let pass = admin::trim(&dir)?;
            println!(
                "{}: {} blocks ({}) kept, {} blocks ({}) evicted",
                dir.display(),
                pass.blocks,
                human_bytes(pass.bytes),
                pass.evicted_blocks,
                human_bytes(pass.evicted_bytes)
            );
            Ok(())
        }
        Command::Cache { action: CacheCommand::Clear(arg) } => {
            let dir = arg.dir();
            let removed = admin::clear(&dir)?;
            println!(
                "removed {} blocks ({}) and {} listings from {}",
                removed.blocks,
                human_bytes(removed.bytes),
                removed.listings,
                dir.display()
            );
            Ok(())
        }
        Command::Info { path, json } => portal::info::show(&path, json),
        Command::Snapshot { action: SnapshotCommand::Create { prefix, output, bucket } } => {
            init_command_logging();
            let prefix = normalize_prefix(&prefix)?;
            let s3 = bucket.s3_config()?;
            let started = std::time::Instant::now();
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let store = runtime.block_on(cdpfs::store::s3::S3Store::new(&s3));
            let snapshot = runtime.block_on(Snapshot::list(&store, &s3.bucket, &prefix))?;
            if snapshot.objects.is_empty() {
                bail!("nothing at s3://{}/{prefix}", s3.bucket);
            }
            snapshot.save(&output)?;
            let size = std::fs::metadata(&output).map_or(0, |m| m.len());
            cdpfs::stage::say(format_args!(
                "{}: {} objects of s3://{}/{prefix} ({}) in {:.1} s",
                output.display(),
                snapshot.objects.len(),
                s3.bucket,
                human_bytes(size),
                started.elapsed().as_secs_f64()
            ));
            Ok(())
        }
        Command::Unmount { mountpoint, lazy } => mount::unmount(&mountpoint, lazy),
    }
}

/// Prints the counters of one mount, or of every cdpfs mount.
fn show_stats(mountpoint: Option<PathBuf>, json: bool) -> Result<()> {
    let mountpoints = match mountpoint {
        Some(path) => vec![path],
        None => cdpfs::mount_table::mounts_of_type("fuse.cdpfs")?,
    };
    if mountpoints.is_empty() {
        bail!("no cdpfs mount is running");
    }
    let mut failed = Vec::new();
    for path in mountpoints {
        let raw = match cdpfs::stage::xattr(&path, cdpfs::fuse::STATS_XATTR) {
            Ok(raw) => raw,
            Err(e) => {
                failed.push(format!("{} is not a running cdpfs mount: {e}", path.display()));
                continue;
            }
        };
        if json {
            println!("{raw}");
            continue;
        }
        let s: cdpfs::stats::Snapshot = serde_json::from_str(&raw)?;
        println!("{}", path.display());
        println!(
            "  S3:     {} GETs, {} LIST pages, {} downloaded, {} retries, {} failures{}",
            s.s3_gets,
            s.s3_lists,
            human_bytes(s.s3_bytes),
            s.s3_retries,
            s.s3_failures,
            if s.s3_unreachable { "; OFFLINE: serving cached data only" } else { "" }
        );
        println!(
            "  reads:  {} ({} served, {} errors), latency p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms",
            s.reads,
            human_bytes(s.bytes_served),
            s.read_errors,
            s.read_p50_ms,
            s.read_p90_ms,
            s.read_p99_ms
        );
        println!(
            "  cache:  {} memory hits, {} disk hits ({} misses), {} shared-cache hits, {} fetched blocks, {} Zarr chunks fetched ahead",
            s.cache_memory_hits,
            s.cache_disk_hits,
            s.cache_disk_misses,
            s.cache_shared_hits,
            s.cache_fetches,
            s.zarr_chunks_fetched_ahead
        );
        println!(
            "  disk:   {} blocks written, {} not written (write queue full), {} refused by the cache directory (full, read-only or failing), {} writer pauses for a busy CPU, {} queued, {} slow reads skipped, {} cache-dir operations",
            s.cache_disk_writes,
            s.cache_disk_writes_dropped,
            s.cache_disk_writes_refused,
            s.cache_disk_write_pauses,
            human_bytes(s.cache_disk_write_queue_bytes),
            s.cache_disk_read_timeouts,
            s.cache_dir_operations
        );
        println!("  memory: {} of blocks, {} resident", human_bytes(s.cache_memory_bytes), human_bytes(s.rss_bytes));
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(())
}

/// `1536` -> `1.5 KiB`.
fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// The command line to act on: as given, or translated from a `mount.cdpfs` helper call.
fn command_line() -> Result<Vec<OsString>> {
    let args: Vec<OsString> = std::env::args_os().collect();
    if !args.first().is_some_and(|argv0| fstab::is_mount_helper(argv0)) {
        return Ok(args);
    }
    let rest: Vec<String> = args[1..].iter().map(|a| a.to_string_lossy().into_owned()).collect();
    Ok(fstab::helper_to_cli(&rest)?.into_iter().map(OsString::from).collect())
}

/// `cdpfs stats | head -1`: a command that only prints ends quietly when its reader goes away,
/// killed by SIGPIPE as `ls` is (Rust ignores SIGPIPE, which turns such a write into a panic).
/// The mount, `prefetch` and `snapshot` keep ignoring it: they write to sockets, where SIGPIPE
/// would kill them for a connection the server closed (their stdout lines are written with
/// [`cdpfs::stage::say`], which lets a closed stdout be).
fn end_quietly_on_a_closed_stdout(command: &Command) {
    if matches!(command, Command::Stats { .. } | Command::Cache { .. } | Command::Info { .. }) {
        // SAFETY: restoring a signal's default disposition has no preconditions.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
}

fn main() -> ExitCode {
    let result = command_line().and_then(|args| {
        let cli = Cli::parse_from(&args);
        end_quietly_on_a_closed_stdout(&cli.command);
        run(cli, &args[1..])
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = format!("{e:#}");
            mount::report_startup_error(&message);
            eprintln!("cdpfs: error: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{normalize_prefix, parse_size, Cli};

    /// Every `cdpfs mount` option can be written in an fstab line (`-o name=value` or `-o name`):
    /// the mount helper knows them all.
    #[test]
    fn every_mount_option_has_an_fstab_form() {
        use clap::{ArgAction, CommandFactory};
        let cli = Cli::command();
        let mount = cli.find_subcommand("mount").expect("a mount command");
        for arg in mount.get_arguments().filter(|a| !a.is_positional()) {
            let Some(long) = arg.get_long().filter(|l| !matches!(*l, "help" | "version")) else { continue };
            let name = long.replace('-', "_");
            let option = match arg.get_action() {
                ArgAction::SetTrue => name,
                _ => format!("{name}=1"),
            };
            let call = ["bucket", "/m", "-o", &option].map(str::to_owned);
            let line = cdpfs::fstab::helper_to_cli(&call);
            assert!(line.as_ref().is_ok_and(|l| l.contains(&format!("--{long}"))), "-o {option}: {line:?}");
        }
    }

    /// Every flag an environment variable can set takes 1/0, yes/no, on/off, true/false in any
    /// case (what an `/etc/default` file or a job script writes), not only `true`/`false`.
    #[test]
    fn every_boolean_variable_takes_the_usual_words() {
        use clap::{Arg, ArgAction, CommandFactory};
        fn flags_with_variables(command: &clap::Command, out: &mut Vec<Arg>) {
            out.extend(
                command
                    .get_arguments()
                    .filter(|a| a.get_env().is_some() && matches!(a.get_action(), ArgAction::SetTrue))
                    .cloned(),
            );
            command.get_subcommands().for_each(|sub| flags_with_variables(sub, out));
        }
        let mut flags = Vec::new();
        flags_with_variables(&Cli::command(), &mut flags);
        let names: Vec<&str> = flags.iter().map(|a| a.get_id().as_str()).collect();
        for wanted in ["offline", "no_portal_api", "foreground", "write_shared_cache", "sign_requests"] {
            assert!(names.contains(&wanted), "{wanted} not among {names:?}");
        }
        let words = [
            ("1", true),
            ("yes", true),
            ("On", true),
            ("TRUE", true),
            ("0", false),
            ("no", false),
            ("OFF", false),
            ("false", false),
        ];
        for flag in &flags {
            // The flag's own parser, given the word as a value (as clap gives it the variable's).
            let probe =
                Arg::new("word").long("word").action(ArgAction::Set).value_parser(flag.get_value_parser().clone());
            for (word, meaning) in words {
                let parsed =
                    clap::Command::new("probe").arg(probe.clone()).try_get_matches_from(["probe", "--word", word]);
                let parsed = parsed.unwrap_or_else(|e| panic!("--{}: {word:?} refused: {e}", flag.get_id()));
                assert_eq!(parsed.get_one::<bool>("word"), Some(&meaning), "--{} {word:?}", flag.get_id());
            }
        }
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("3gb"), Ok(3 << 30));
        assert!(parse_size("G").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn prefixes_are_normalized() {
        assert_eq!(normalize_prefix("").unwrap(), "");
        assert_eq!(normalize_prefix("/").unwrap(), "");
        assert_eq!(normalize_prefix("10000").unwrap(), "10000/");
        assert_eq!(normalize_prefix("/10000/TS_026/").unwrap(), "10000/TS_026/");
        assert!(normalize_prefix("a//b").is_err());
        assert!(normalize_prefix("a/../b").is_err());
    }
}
