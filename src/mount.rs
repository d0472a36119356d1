//! Mount lifecycle: pre-flight checks, serving a mount, running it in the background, unmounting.
//!
//! `cdpfs mount` without `--foreground` re-executes itself as a detached child that serves the
//! mount and reports over a pipe once the mount is ready (or why it failed), so the command
//! returns only when the tree can be used. With `--foreground` it serves until unmounted or
//! until SIGINT/SIGTERM/SIGHUP, then unmounts cleanly.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tracing::{info, warn};

use crate::cache::admin::Registration;
use crate::cache::disk::DiskCache;
use crate::cache::offload::{self, CacheDirIo};
use crate::cache::{BlockCache, DiskTier, BLOCK_SIZE};
use crate::data::{DataConfig, DataPath, PageCache};
use crate::fuse::{CdpFs, FsOptions};
use crate::mount_table;
use crate::namespace::persist::ListingStore;
use crate::namespace::Namespace;
use crate::portal::answers::Answers;
use crate::portal::api::PortalApi;
use crate::portal::map::PortalMap;
use crate::portal::metadata::MetadataReader;
use crate::stats::Stats;
use crate::store::offline::OfflineStore;
use crate::store::s3::{S3Config, S3Store};
use crate::store::snapshot::{Snapshot, SnapshotStore};
use crate::store::synthetic::SyntheticStore;
use crate::store::{ObjectStore, StoreError};
use crate::views::Catalog;

/// Set in the environment of the background child: its stdout is the readiness pipe.
pub const DAEMON_ENV: &str = "CDPFS_INTERNAL_DAEMON";

/// How long `cdpfs mount` waits for the background child to report.
const STARTUP_LIMIT: Duration = Duration::from_secs(120);

/// How often a mount refreshes its disk index and (if no other process does) the cache
/// directory's usage summary and eviction.
const UPKEEP_EVERY: Duration = Duration::from_secs(300);

/// Memory of the process itself under load, set aside from `--max-memory` ([`data_budget`]).
const PROCESS_MEMORY: u64 = 12 << 20;

/// Everything a mount needs.
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// The bucket and how to reach it.
    pub s3: S3Config,
    /// Key prefix shown as the mount's root: empty, or ending in `/`.
    pub prefix: String,
    /// Let other users (and root) use the mount.
    pub allow_other: bool,
    /// How long listings and attributes are cached.
    pub metadata_ttl: Duration,
    /// Bytes of memory for cached and in-flight blocks.
    pub max_memory: u64,
    /// The kernel's read-ahead on the mount (and so its largest read request).
    pub kernel_read_ahead: u64,
    /// Which opens go through the kernel's page cache.
    pub page_cache: PageCache,
    /// The persistent block cache, if enabled: directory and the size bound to give it if it
    /// has none.
    pub disk_cache: Option<(PathBuf, Option<u64>)>,
    /// Directories listed in the background ahead of a walker, per opened directory.
    pub list_ahead: usize,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_addr: Option<String>,
    /// Show `X.bin<N>.mrc` views beside every OME-Zarr `X.zarr`.
    pub mrc_views: bool,
    /// The portal's GraphQL API to ask for ids and facets, if any.
    pub portal_api: Option<String>,
    /// How long one API call may take, retries included.
    pub api_timeout: Duration,
    /// How long the API's answers are trusted.
    pub api_ttl: Duration,
    /// Serve one generated file of this size instead of the bucket (measures cdpfs alone).
    pub synthetic_size: Option<u64>,
    /// Ask S3 nothing: serve saved listings and cached blocks only.
    pub offline: bool,
    /// A shared cache directory read after the disk cache and before S3.
    pub shared_cache: Option<PathBuf>,
    /// Also write blocks fetched from S3 into the shared cache directory.
    pub write_shared_cache: bool,
    /// Serve the tree of this namespace snapshot instead of listing the bucket.
    pub namespace: Option<PathBuf>,
    /// Mount over a directory that has entries (hiding them while mounted).
    pub allow_non_empty: bool,
}

/// Serves the mount in this process until it is unmounted or a stop signal arrives.
pub fn serve_foreground(config: &MountConfig) -> Result<()> {
    tune_allocator(config.max_memory);
    check_fuse_available()?;
    let mountpoint = check_mount_point(&config.mountpoint, config.allow_non_empty)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cdpfs-io")
        .build()
        .context("starting the I/O runtime")?;
    let mut unreachable = None;
    let (store, stats): (Arc<dyn ObjectStore>, _) = match (config.synthetic_size, config.offline) {
        (Some(size), _) => {
            let synthetic = SyntheticStore::new(size);
            let stats = Arc::new(Stats::new(synthetic.counters()));
            (Arc::new(synthetic), stats)
        }
        (None, true) => {
            let offline = OfflineStore::default();
            let stats = Arc::new(Stats::new(offline.counters()));
            (Arc::new(offline), stats)
        }
        (None, false) => {
            let s3 = runtime.block_on(S3Store::new(&config.s3));
            let stats = Arc::new(Stats::new(s3.counters()));
            (Arc::new(s3), stats)
        }
    };
    // A snapshot serves every listing: S3 is asked for data only.
    let store: Arc<dyn ObjectStore> = match &config.namespace {
        Some(path) => {
            let snapshot = Snapshot::load(path)?;
            if snapshot.bucket != config.s3.bucket {
                bail!("{} is a snapshot of bucket {:?}, not {:?}", path.display(), snapshot.bucket, config.s3.bucket);
            }
            info!(objects = snapshot.objects.len(), "serving the namespace snapshot {}", path.display());
            Arc::new(SnapshotStore::new(snapshot, store))
        }
        None => store,
    };
    if config.synthetic_size.is_none() && !config.offline {
        unreachable = probe_bucket(&runtime, store.as_ref(), config)?;
    }

    // Every read of the cache directory goes through one bounded, timed gate.
    let cache_dir_io = Arc::new(CacheDirIo::new(offload::TIMEOUT));
    // The block cache first: it creates the cache directory with its 0700 mode.
    let data = Arc::new(data_path(store.clone(), config, cache_dir_io.clone())?);
    // Registered for as long as this function serves the mount, so `cdpfs cache clear` can tell.
    // A full or read-only cache directory still mounts: without registration or saved listings.
    let _registration = config.disk_cache.as_ref().and_then(|(dir, _)| {
        Registration::new(dir, &mountpoint)
            .inspect_err(|e| warn!(dir = %dir.display(), error = %e, "cannot register in the cache directory"))
            .ok()
    });
    let saved_listings = config.disk_cache.as_ref().filter(|_| config.namespace.is_none()).and_then(|(dir, _)| {
        ListingStore::open(dir, &config.s3.bucket, config.metadata_ttl, cache_dir_io.clone())
            .inspect_err(|e| warn!(dir = %dir.display(), error = %e, "cannot save listings in the cache directory"))
            .ok()
            .map(Arc::new)
    });
    // Through the cache directory's time limit: it may hang too. (A snapshot has every listing.)
    let saved_root = || match &saved_listings {
        Some(saved) => runtime.block_on(saved.load_within_async(&config.prefix, None)).is_some(),
        None => config.namespace.is_some(),
    };
    if let Some(error) = unreachable {
        if !saved_root() {
            bail!("cannot reach {}: {error} (and nothing of it is cached to serve offline)", endpoint(config));
        }
        warn!("cannot reach {}: {error}; mounting offline from saved listings and cached blocks (reads of anything else fail with EIO within --request-timeout) until S3 answers", endpoint(config));
    }
    if config.offline {
        if config.synthetic_size.is_none() && !saved_root() {
            bail!(
                "--offline: the cache directory has no saved listing of s3://{}/{} to serve (stage it through a mount: `cdpfs prefetch MOUNT/PATH` saves the listings with the blocks; `cdpfs prefetch s3://...` alone saves blocks only), or give a --namespace snapshot",
                config.s3.bucket,
                config.prefix
            );
        }
        info!("offline (--offline): serving saved listings and cached blocks only; S3 is not asked");
    }
    // MRC views' blocks being computed and decoded Blosc blocks: from the budget's headroom.
    let views = Arc::new(Catalog::new(data.clone(), data_budget(config.max_memory) / 8));
    let mut namespace =
        Namespace::new(store.clone(), &config.prefix, config.metadata_ttl, saved_listings, config.list_ahead);
    if config.mrc_views {
        namespace = namespace.with_views(views.clone());
    }
    let portal = portal_map(config, cache_dir_io)?;
    if let Some(portal) = &portal {
        namespace = namespace.with_portal(portal.clone());
    }
    let namespace = Arc::new(namespace);
    views.list_through(Arc::downgrade(&namespace) as std::sync::Weak<dyn crate::views::Lister>);
    data.follow_chunk_order(Arc::downgrade(&namespace) as std::sync::Weak<dyn crate::data::sweep::ChunkOrder>);
    let metadata = Arc::new(MetadataReader::new(namespace.clone(), data.clone(), portal));
    // SAFETY: getuid/getgid cannot fail and have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let options = FsOptions { uid, gid, ttl: config.metadata_ttl, portal_ttl: config.api_ttl };
    if let Some(addr) = &config.metrics_addr {
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(addr))
            .with_context(|| format!("listening for metrics on {addr}"))?;
        runtime.spawn(serve_metrics(listener, stats.clone(), data.clone()));
    }
    let fs = CdpFs::new(runtime.handle().clone(), namespace, data, views, options, &config.s3.bucket, stats)
        .with_metadata(metadata);
    let (notifier, device) = (fs.notifier_slot(), fs.device_slot());
    let fuse_config = fuse_config(config, uid);
    let session = fuser::Session::new(fs, &mountpoint, &fuse_config)
        .map_err(|e| anyhow!("mounting at {}: {e}", mountpoint.display()))?;
    // Reads spanning blocks are replied to on a duplicate of the session's device, the one every
    // FUSE thread reads requests from (with a device per thread, they go through fuser).
    if !fuse_config.clone_fd {
        match session.as_fd().try_clone_to_owned() {
            Ok(fd) => {
                let _ = device.set(std::fs::File::from(fd));
            }
            Err(e) => {
                warn!("duplicating the FUSE device failed ({e}); reads spanning blocks are copied into one buffer")
            }
        }
    }
    let session = session.spawn().map_err(|e| anyhow!("starting the FUSE session: {e}"))?;
    set_kernel_read_ahead(&mountpoint, config.kernel_read_ahead);
    // The mount is live (the kernel handshake is done); don't keep the caller's cwd busy.
    let _ = std::env::set_current_dir("/");
    info!("serving s3://{}/{} at {}", config.s3.bucket, config.prefix, mountpoint.display());
    // From now on a replaced object's kernel entry can be invalidated.
    let _ = notifier.set(session.notifier());
    report_ready();

    let stopped_by_signal = runtime.block_on(wait_for_stop(&session))?;
    if stopped_by_signal {
        info!("unmounting {}", mountpoint.display());
        if let Err(e) = fusermount(&["-u"], &mountpoint) {
            warn!("{e:#}; detaching lazily");
            fusermount(&["-u", "-z"], &mountpoint)?;
        }
    } else {
        info!("{} was unmounted", mountpoint.display());
    }
    // Once unmounted, the kernel ends the session and its threads return.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || done_tx.send(session.join()));
    match done_rx.recv_timeout(Duration::from_secs(10)) {
        Ok(result) => result.context("FUSE session ended with an error"),
        Err(_) => {
            warn!("FUSE session threads did not stop within 10 s; exiting anyway");
            Ok(())
        }
    }
}

/// The portal's map, when the mount asks an API: its answers are kept in the cache directory
/// (when there is one) for every mount using it.
fn portal_map(config: &MountConfig, cache_dir_io: Arc<CacheDirIo>) -> Result<Option<Arc<PortalMap>>> {
    let Some(url) = &config.portal_api else { return Ok(None) };
    let api = PortalApi::new(url, config.api_timeout)?;
    let dir = config.disk_cache.as_ref().map(|(dir, _)| (dir.clone(), cache_dir_io));
    let answers = Answers::new(url, dir).context("opening the cache directory for API answers")?;
    info!("portal ids and facet folders from {url}");
    Ok(Some(Arc::new(PortalMap::new(api, answers, config.api_ttl))))
}

/// What `--max-memory` leaves for data (blocks, decoded chunks, replies) once what the process
/// itself takes on top of its idle size under load is set aside: code paths run for the first
/// time (about 5 MiB of the binary's pages), threads' stacks and heaps, FUSE request buffers,
/// listings and tasks (a mount with a 32 MiB budget grew by 42 MiB under 8 concurrent readers
/// of files, views and Zarr levels). A third of the budget at most.
fn data_budget(max_memory: u64) -> u64 {
    max_memory - (max_memory / 3).min(PROCESS_MEMORY)
}

/// The block cache and read path sized from the configuration: of the data budget, 3/8 for
/// cached blocks, 1/4 for blocks being fetched, 1/8 for blocks waiting to be written to disk,
/// and 1/4 of headroom (replies being assembled, read-ahead parts partly evicted; 1/8 for MRC
/// views' blocks being computed and their decoded Blosc blocks, and 1/64 for the bytes of
/// recent exact reads, such as headers).
fn data_path(store: Arc<dyn ObjectStore>, config: &MountConfig, cache_dir_io: Arc<CacheDirIo>) -> Result<DataPath> {
    let budget = data_budget(config.max_memory);
    let disk = match &config.disk_cache {
        Some((dir, size)) => {
            let files = Arc::new(
                DiskCache::open(dir, *size, BLOCK_SIZE)
                    .with_context(|| format!("opening the cache directory {}", dir.display()))?,
            );
            files.start_upkeep(UPKEEP_EVERY);
            Some(DiskTier::new(files, (budget / 8).max(BLOCK_SIZE), cache_dir_io))
        }
        None => None,
    };
    let fetch_slots = (budget / 4 / BLOCK_SIZE).max(4) as usize;
    let cached = (budget / 8 * 3).max(BLOCK_SIZE);
    let mut cache = BlockCache::new(store.clone(), BLOCK_SIZE, cached, fetch_slots, disk);
    if let Some(dir) = &config.shared_cache {
        let context = || format!("opening the shared cache directory {}", dir.display());
        let reads = Arc::new(CacheDirIo::new(offload::TIMEOUT));
        let tier = if config.write_shared_cache {
            let files = Arc::new(DiskCache::open(dir, None, BLOCK_SIZE).with_context(context)?);
            files.start_upkeep(UPKEEP_EVERY);
            DiskTier::new(files, (budget / 16).max(BLOCK_SIZE), reads)
        } else {
            DiskTier::read_only(Arc::new(DiskCache::open_read_only(dir, BLOCK_SIZE).with_context(context)?), reads)
        };
        cache = cache.with_shared(tier);
    }
    let cache = Arc::new(cache);
    // A lone stream may have all fetch slots in flight (at WAN latency and per-connection
    // bandwidth, line rate takes tens of part-sized GETs at once); what all streams read ahead
    // stays within 2/3 of the memory tier, which keeps the rest for sections, views and small
    // files (streams drop what they have read).
    let tuning = DataConfig {
        small_object: 1 << 20,
        initial_window: 2 * BLOCK_SIZE,
        read_ahead_budget: (fetch_slots as u64 * BLOCK_SIZE).min(cached / 3 * 2),
        kernel_read_ahead: config.kernel_read_ahead,
        page_cache: config.page_cache,
        exact_read_memory: budget / 64,
    };
    Ok(DataPath::new(store, cache, tuning))
}

/// Answers every connection with the mount's counters in Prometheus text format.
async fn serve_metrics(listener: tokio::net::TcpListener, stats: Arc<Stats>, data: Arc<DataPath>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut socket, _)) = listener.accept().await else { continue };
        let body = stats.snapshot(data.cache()).to_prometheus();
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let _ = socket.read(&mut request).await;
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}

/// Block buffers (512 KiB) and read replies (up to 1 MiB) are short-lived and come and go by
/// the thousand per second: they come from the allocator's heaps, where a freed buffer is
/// reused at once (a buffer mapped on its own costs a page fault per 4 KiB each time: that
/// doubled the CPU per GB of a cold read), in at most two heaps. A background thread hands the
/// heaps' free memory back to the OS whenever the process holds more than 3/4 of
/// `max_memory` (checked every 20 ms: at 200 ms, the heaps of a 32 MiB mount computing MRC view
/// blocks outgrew the budget between checks), so its memory follows the budget instead of
/// keeping its high-water mark (and below that, freed memory is reused without faulting it in
/// again). Nor does a heap give back the free memory at its top on every `free` (glibc's
/// default above 128 KiB): a 1 MiB reply assembled from two blocks and freed at once was
/// faulted in afresh for every read (500k page faults per 2.4 GB read past the page cache,
/// half its speed).
fn tune_allocator(max_memory: u64) {
    let trim_threshold = (max_memory / 8).min(64 << 20) as libc::c_int;
    // SAFETY: mallopt only changes allocator parameters; any value is safe.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim_threshold);
    }
    let page = procfs_page_size();
    let trim = std::thread::Builder::new().name("cdpfs-trim".into()).spawn(move || loop {
        std::thread::sleep(Duration::from_millis(20));
        let resident = fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok());
        if resident.is_some_and(|pages| pages * page > max_memory / 4 * 3) {
            // SAFETY: malloc_trim only returns free heap memory to the OS; glibc's allocator
            // is thread-safe.
            unsafe { libc::malloc_trim(0) };
        }
    });
    if let Err(e) = trim {
        warn!("cannot start the memory trimming thread: {e}");
    }
}

/// The size of a memory page, as /proc/self/statm counts them.
fn procfs_page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// Sets the kernel's read-ahead on the mount (root only; best effort: otherwise the kernel
/// keeps its 128 KiB).
fn set_kernel_read_ahead(mountpoint: &Path, bytes: u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::metadata(mountpoint) else { return };
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = fs::write(&knob, (bytes >> 10).max(4).to_string()) {
        tracing::debug!("could not set {knob}: {e}");
    }
}

/// Starts a detached child that serves the mount, and returns once the mount is ready. `args`
/// is the `cdpfs` command line (without the program name) the child runs with `--foreground`.
pub fn spawn_background(config: &MountConfig, log_file: Option<&Path>, args: &[std::ffi::OsString]) -> Result<()> {
    // Fail fast, with the same messages, before anything is started.
    check_fuse_available()?;
    check_mount_point(&config.mountpoint, config.allow_non_empty)?;

    let (reader, writer) = std::io::pipe().context("creating the readiness pipe")?;
    let stderr = match log_file {
        Some(path) => Stdio::from(open_log_file(path)?),
        None => Stdio::null(),
    };
    let mut command = Command::new(std::env::current_exe().context("locating the cdpfs binary")?);
    command.args(args).arg("--foreground").env(DAEMON_ENV, "1").stdin(Stdio::null()).stdout(writer).stderr(stderr);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command.spawn().context("starting the background cdpfs")?;
    // Close our copy of the pipe's write end, so EOF means the child is gone.
    drop(command);

    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(reader).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(STARTUP_LIMIT) {
        Ok(line) if line.trim() == "ready" => Ok(()),
        Ok(line) if !line.trim().is_empty() => {
            let _ = child.wait();
            bail!("{}", line.trim().trim_start_matches("error: "))
        }
        Ok(_) => {
            let status = child.wait()?;
            bail!("the background cdpfs exited during start-up ({status}); run with --foreground to see why")
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the mount was not ready within {STARTUP_LIMIT:?}; gave up")
        }
    }
}

/// Tells whoever waits for the mount that it is ready: the parent `cdpfs mount` over its pipe,
/// and systemd (`Type=notify`) over `$NOTIFY_SOCKET`.
fn report_ready() {
    notify_systemd("READY=1");
    if std::env::var_os(DAEMON_ENV).is_none() {
        return;
    }
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(b"ready\n");
    let _ = stdout.flush();
    if let Ok(devnull) = fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: both descriptors are valid; dup2 atomically replaces fd 1.
        unsafe { libc::dup2(devnull.as_raw_fd(), libc::STDOUT_FILENO) };
    }
}

/// Sends one sd_notify message if systemd asked for them.
fn notify_systemd(message: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let target = target.to_string_lossy().into_owned();
    let address = match target.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&target),
    };
    let sent = address.and_then(|a| UnixDatagram::unbound()?.send_to_addr(message.as_bytes(), &a));
    if let Err(e) = sent {
        warn!("could not notify systemd at {target}: {e}");
    }
}

/// Passes a start-up failure to the parent `cdpfs mount`, if this process is its child.
pub fn report_startup_error(message: &str) {
    if std::env::var_os(DAEMON_ENV).is_some() {
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "error: {message}");
        let _ = stdout.flush();
    }
}

/// Opens (appending) the log file given with `--log-file`.
pub fn open_log_file(path: &Path) -> Result<fs::File> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening log file {}", path.display()))
}

/// The endpoint, as messages name it.
fn endpoint(config: &MountConfig) -> &str {
    config.s3.endpoint_url.as_deref().unwrap_or("AWS S3")
}

/// One listing of the mount's root: proves the endpoint answers and the bucket exists. An
/// endpoint that cannot be reached is not an error here: its message (the caller decides
/// whether there is enough cached to mount offline).
fn probe_bucket(
    runtime: &tokio::runtime::Runtime,
    store: &dyn ObjectStore,
    config: &MountConfig,
) -> Result<Option<String>> {
    let bucket = &config.s3.bucket;
    let endpoint = endpoint(config);
    match runtime.block_on(store.list_prefix(&config.prefix)) {
        Ok(listing) if !config.prefix.is_empty() && listing.prefixes.is_empty() && listing.objects.is_empty() => {
            bail!("nothing found under prefix {:?} in bucket {bucket:?}", config.prefix)
        }
        Ok(_) => Ok(None),
        Err(StoreError::NoSuchBucket(_)) => bail!("bucket {bucket:?} does not exist at {endpoint}"),
        Err(StoreError::AccessDenied(_)) => bail!(
            "access to bucket {bucket:?} at {endpoint} was denied{}",
            if config.s3.sign_requests { "" } else { " (for a private bucket, add --sign-requests)" }
        ),
        Err(StoreError::Unreachable(e)) => Ok(Some(e)),
        Err(e) => bail!("listing bucket {bucket:?} at {endpoint} failed: {e}"),
    }
}

fn fuse_config(config: &MountConfig, uid: u32) -> fuser::Config {
    use fuser::{MountOption, SessionACL};
    let mut fuse = fuser::Config::default();
    fuse.mount_options = vec![
        MountOption::FSName(format!("cdpfs:{}", config.s3.bucket)),
        MountOption::Subtype("cdpfs".into()),
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
        MountOption::DefaultPermissions,
        MountOption::CUSTOM("max_read=1048576".into()),
    ];
    fuse.acl = if config.allow_other {
        SessionACL::All
    } else if uid == 0 {
        // Root's own mount: the kernel sees allow_other, fuser still admits only root.
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    };
    // fusermount3 watches the mount and removes it if this process dies (even kill -9).
    // fuser supports that only together with allow_other/allow_root.
    if fuse.acl != SessionACL::Owner {
        fuse.mount_options.push(MountOption::AutoUnmount);
    }
    fuse.n_threads = Some(4);
    fuse
}

/// Waits until a stop signal arrives (true) or the mount goes away from outside (false).
async fn wait_for_stop(session: &fuser::BackgroundSession) -> Result<bool> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = interrupt.recv() => return Ok(true),
            _ = terminate.recv() => return Ok(true),
            _ = hangup.recv() => return Ok(true),
            _ = tick.tick() => if session.guard.is_finished() { return Ok(false) },
        }
    }
}

/// Unmounts a cdpfs (or any FUSE) mount at `mountpoint`.
pub fn unmount(mountpoint: &Path, lazy: bool) -> Result<()> {
    let path = fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    if mount_table::mount_type(&path)?.is_none() {
        bail!("{} is not mounted", path.display());
    }
    fusermount(if lazy { &["-u", "-z"] } else { &["-u"] }, &path)
}

fn fusermount(args: &[&str], mountpoint: &Path) -> Result<()> {
    let binary = find_fusermount().ok_or_else(missing_fusermount)?;
    let output = Command::new(&binary)
        .args(args)
        .arg(mountpoint)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    if output.status.success() {
        return Ok(());
    }
    let message = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if message.contains("busy") {
        bail!(
            "{} is busy (a process has a file or its working directory in it); close it, or use `cdpfs unmount --lazy`",
            mountpoint.display()
        );
    }
    bail!("unmounting {} failed: {message}", mountpoint.display())
}

/// Checks that FUSE can be used on this machine, with a message that says how to fix it.
pub fn check_fuse_available() -> Result<()> {
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: this machine or container has no FUSE (load it with `modprobe fuse`; in a container, pass --device /dev/fuse) and install fuse3");
    }
    find_fusermount().ok_or_else(missing_fusermount)?;
    Ok(())
}

fn missing_fusermount() -> anyhow::Error {
    anyhow!("fusermount3 not found in PATH: install fuse3 (Debian/Ubuntu: apt-get install fuse3; RHEL/Rocky: dnf install fuse3)")
}

/// The `fusermount3` binary: `$FUSERMOUNT_PATH` if set, else the first one in `$PATH` (or in
/// the standard directories when there is no `$PATH`).
fn find_fusermount() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if let Some(explicit) = std::env::var_os("FUSERMOUNT_PATH") {
        let path = PathBuf::from(explicit);
        return executable(&path).then_some(path);
    }
    // mount(8) runs helpers with an empty environment: fall back to the usual places.
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into());
    std::env::split_paths(&path).map(|dir| dir.join("fusermount3")).find(|candidate| executable(candidate))
}

/// Checks that `path` can be mounted on (an empty directory, unless `allow_non_empty`) and
/// returns it made absolute.
pub fn check_mount_point(path: &Path, allow_non_empty: bool) -> Result<PathBuf> {
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => bail!("mount point {} is not a directory", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("mount point {} does not exist (create it with `mkdir -p {}`)", path.display(), path.display())
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => bail!(
            "{} is a dead FUSE mount (its process is gone); clear it with `cdpfs unmount {}`",
            path.display(),
            path.display()
        ),
        Err(e) => bail!("cannot use mount point {}: {e}", path.display()),
    }
    let absolute = fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    if let Some(fstype) = mount_table::mount_type(&absolute)? {
        bail!("{} is already a mount point ({fstype}); unmount it first", absolute.display());
    }
    let has_entries =
        fs::read_dir(&absolute).with_context(|| format!("listing {}", absolute.display()))?.next().is_some();
    if has_entries && !allow_non_empty {
        bail!(
            "mount point {} is not empty: the mount would hide what is in it (mount on an empty directory, or pass --allow-non-empty)",
            absolute.display()
        );
    }
    Ok(absolute)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_a_mount_point_and_a_fresh_dir_is_not() {
        assert!(mount_table::mount_type(Path::new("/")).unwrap().is_some());
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("mnt");
        fs::create_dir(&dir).unwrap();
        assert_eq!(check_mount_point(&dir, false).unwrap(), fs::canonicalize(&dir).unwrap());
        fs::remove_dir(&dir).unwrap();
        assert!(check_mount_point(&dir, false).unwrap_err().to_string().contains("does not exist"));
    }
}
