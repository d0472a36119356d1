//! Disk tier: blocks persisted under a cache directory, shared by the processes (and nodes)
//! that use it, bounded in size, checked on every read.
//!
//! Each block is one file `blocks/<xx>/<object-hash>-<index>` holding a header (magic, key,
//! ETag, index, block size, offset, length, where the data starts, CRC32C over data + key +
//! ETag + index + block size) and the data, so a block written with another block size never
//! passes for this one. The data of a block of a page or more starts on a page boundary (the
//! header is padded), so a whole block's file is written `O_DIRECT` in one piece. A block
//! is written to a temp file next to its target, named uniquely across hosts and created
//! exclusively, then renamed into place, so a reader (in this process, another process, or
//! another node sharing the directory) sees a whole block or none; anything that fails the
//! check (a torn write, a flipped bit, a hash collision) is deleted and treated as a miss.
//! Block files are written with `O_DIRECT` where the file system allows it, past the page cache.
//!
//! The directory's one size bound, its ledger and its eviction are in [`super::bound`]. Opening
//! a directory reads nothing but its bound: the blocks other processes write are found by
//! looking at their files, and the in-memory index of blocks known to be on disk (which answers
//! [`DiskCache::contains`] without touching the directory) is fed by this process's reads and
//! writes and by a background pass ([`DiskCache::start_upkeep`]). A directory this process
//! cannot write is a read-only tier; a write that fails for lack of space or quota pauses
//! writes for [`PAUSE`], any other failure is retried and never turns the tier off.

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tracing::{debug, info, warn};

use super::bound::{replace_file, replace_file_with, unique_suffix, Grant, Reservation, Space};
use super::BlockKey;

const MAGIC: &[u8; 8] = b"CDPFSB03";
/// The format before: no data start in the header, the data right after it. Still read, so a
/// cache directory (a shared one filled by `cdpfs prefetch` above all) keeps serving across an
/// upgrade; blocks are written in the current format.
const MAGIC_UNPADDED: &[u8; 8] = b"CDPFSB02";
/// The start of the magic of every version of the format (a block of another version is a miss
/// like a damaged one, but not worth a warning).
const MAGIC_FAMILY: &[u8; 6] = b"CDPFSB";

/// How long writes stop after the directory said it is full, out of quota or read-only.
pub const PAUSE: Duration = Duration::from_secs(30);

/// A hit touches its block's mtime (the shared recency eviction goes by) when older than this.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// Attempts at writing one block when the failure looks transient.
const WRITE_ATTEMPTS: u32 = 3;

/// Blocks a writer reserves in the ledger at once (a read-ahead part's worth): one ledger
/// update per this many blocks rather than per block...
const GRANT_BLOCKS: u64 = 16;
/// ...but never more than this share of the bound, so the grants of many writers sharing a
/// small directory leave room for its blocks.
const GRANT_SHARE_OF_BOUND: u64 = 64;

/// How long a writer waits for room in the ledger (another process's eviction pass, or the
/// ledger's lock).
const ROOM_WAIT: Duration = Duration::from_secs(30);

/// The on-disk block store.
pub struct DiskCache {
    dir: PathBuf,
    block_size: u64,
    space: Space,
    /// This process's name in the ledger, and the ledger grant its writes spend.
    holder: String,
    grant: Mutex<Option<Grant>>,
    /// Blocks known to be on disk, by (object hash, index).
    known: Mutex<HashSet<(u64, u64)>>,
    /// The directory cannot be written by this process: the tier only reads.
    read_only: bool,
    /// Writes are paused until then (the directory was full or read-only).
    paused_until: Mutex<Option<Instant>>,
    /// Block files are written with `O_DIRECT` (until the directory's file system refuses it).
    direct: AtomicBool,
    /// When a failed write was last logged, and the failures since (logged with the next line).
    failures_logged: Mutex<(Option<Instant>, u64)>,
}

impl DiskCache {
    /// Opens (creating it `0700` if needed) the cache of `block_size` blocks under `dir`, whose
    /// bound is the one stored in `dir`, else `requested` ([`Space::open`]). Reads no block.
    pub fn open(dir: &Path, requested: Option<u64>, block_size: u64) -> std::io::Result<DiskCache> {
        Self::open_with(dir, requested, block_size, true)
    }

    /// Opens the existing cache directory `dir` to read from only (a shared tier this process
    /// does not write): nothing in it is created, written or touched.
    pub fn open_read_only(dir: &Path, block_size: u64) -> std::io::Result<DiskCache> {
        if !dir.join("blocks").is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} is not a cdpfs cache directory (no blocks/ in it)", dir.display()),
            ));
        }
        Self::open_with(dir, None, block_size, false)
    }

    fn open_with(dir: &Path, requested: Option<u64>, block_size: u64, writes: bool) -> std::io::Result<DiskCache> {
        use std::os::unix::fs::DirBuilderExt;
        if !dir.is_dir() {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
        if on_nfs(dir) {
            warn!(dir = %dir.display(), "the cache directory is on NFS: every block read and write crosses the network (and a home directory's quota is small); prefer node-local storage, with a shared directory written only by `cdpfs prefetch`");
        }
        let read_only = !writes || !writable(dir);
        let mut paused_until = None;
        if read_only && writes {
            info!(dir = %dir.display(), "the cache directory is read-only: using it as a read-only tier");
        } else if let Err(e) = fs::create_dir_all(dir.join("blocks")) {
            warn!(dir = %dir.display(), error = %e, "cannot write to the cache directory; serving from memory meanwhile");
            paused_until = Some(Instant::now() + PAUSE);
        } else {
            spread_subdirectories(&dir.join("blocks"));
        }
        let space = Space::open(dir, requested, !read_only);
        Ok(DiskCache {
            dir: dir.to_path_buf(),
            block_size,
            space,
            holder: unique_suffix(),
            grant: Mutex::new(None),
            known: Mutex::new(HashSet::new()),
            read_only,
            paused_until: Mutex::new(paused_until),
            direct: AtomicBool::new(true),
            failures_logged: Mutex::new((None, 0)),
        })
    }

    /// The directory's size bound.
    pub fn size(&self) -> u64 {
        self.space.size()
    }

    /// Whether this process only reads the directory.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Keeps the index and the directory's usage summary fresh in the background: lists the
    /// blocks into the index now, and runs an eviction pass ([`Space::pass`]) every `every`
    /// unless another process (on any node sharing the directory) ran one within `every`, so a
    /// shared directory is counted about once per `every`, not once per node. Stops once the
    /// cache is dropped.
    pub fn start_upkeep(self: &Arc<Self>, every: Duration) {
        let cache = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("cdpfs-upkeep".into())
            .spawn(move || {
                let mut first = true;
                loop {
                    let Some(disk) = cache.upgrade() else { return };
                    disk.refresh(first, every);
                    drop(disk);
                    first = false;
                    std::thread::sleep(every);
                }
            })
            .expect("starting the cache upkeep thread");
    }

    /// One background round: an eviction pass if one is due and this process may run it (its
    /// count then feeds the index), else, on the `first` round, a listing of the block names.
    fn refresh(&self, first: bool, every: Duration) {
        let due = !self.read_only && self.space.last_pass().is_none_or(|at| at.elapsed().is_ok_and(|age| age >= every));
        let names = match due.then(|| self.space.pass(false)) {
            Some(Ok(Some(pass))) => pass.names,
            _ if first => list_blocks(&self.dir.join("blocks")),
            _ => return,
        };
        let found: HashSet<(u64, u64)> = names.iter().filter_map(|name| parse_name(name)).collect();
        *self.known.lock().expect("disk index poisoned") = found;
    }

    /// One eviction pass now, evicting only if the blocks are near the bound (or `force`);
    /// `None` when another process is running one ([`Space::pass`]).
    pub fn pass(&self, force: bool) -> std::io::Result<Option<super::bound::Pass>> {
        self.space.pass(force)
    }

    fn relative_name(key: &BlockKey) -> String {
        let hash = key.object_hash();
        format!("{:02x}/{hash:016x}-{}", shard(hash, key.index), key.index)
    }

    fn path(&self, key: &BlockKey) -> PathBuf {
        self.dir.join("blocks").join(Self::relative_name(key))
    }

    fn remember(&self, key: &BlockKey, present: bool) {
        let mut known = self.known.lock().expect("disk index poisoned");
        if present {
            known.insert((key.object_hash(), key.index));
        } else {
            known.remove(&(key.object_hash(), key.index));
        }
    }

    /// Whether this process knows of a copy of the block on disk (from memory; not verified:
    /// [`DiskCache::read`] checks it). Blocks other processes wrote since the last background
    /// pass are not known until read.
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.known.lock().expect("disk index poisoned").contains(&(key.object_hash(), key.index))
    }

    /// Whether a copy of the block is on disk: known, or its file is there (not verified).
    pub fn present(&self, key: &BlockKey) -> bool {
        let found = self.contains(key) || self.path(key).is_file();
        if found {
            self.remember(key, true);
        }
        found
    }

    /// The block, if a valid copy is on disk. A hit marks the block recently used for every
    /// process sharing the directory.
    pub fn read(&self, key: &BlockKey) -> Option<Bytes> {
        let path = self.path(key);
        let (raw, mtime) = match read_file(&path) {
            Ok(read) => read,
            Err(_) => {
                self.remember(key, false);
                return None;
            }
        };
        match decode(&raw, key, self.block_size) {
            Ok(range) => {
                self.remember(key, true);
                if !self.read_only && mtime.elapsed().is_ok_and(|age| age > TOUCH_EVERY) {
                    if let Ok(file) = fs::File::options().write(true).open(&path) {
                        let _ = file.set_modified(SystemTime::now());
                    }
                }
                Some(Bytes::from(raw).slice(range))
            }
            Err(unusable) => {
                match unusable {
                    Unusable::Invalid => warn!(path = %path.display(), "cached block failed its check; discarding it"),
                    Unusable::OtherFormat => {
                        debug!(path = %path.display(), "cached block written by another version of cdpfs; replacing it")
                    }
                }
                if !self.read_only {
                    let _ = fs::remove_file(&path);
                }
                self.remember(key, false);
                None
            }
        }
    }

    /// Stores a block (atomically) within the directory's bound, making room when needed;
    /// false when it was not written. Failures only log.
    pub fn write(&self, key: &BlockKey, data: &[u8]) -> bool {
        if self.read_only || self.paused() {
            return false;
        }
        let target = self.path(key);
        if target.is_file() {
            // Written by another process (or another node) meanwhile.
            self.remember(key, true);
            return true;
        }
        let size = block_file_len(key, data.len()) as u64;
        if let Err(e) = self.reserve(size) {
            if let Some(e) = e {
                self.fail(&e);
            }
            return false;
        }
        let mut attempt = 0;
        loop {
            match self.write_file(&target, key, data) {
                Ok(()) => {
                    self.remember(key, true);
                    return true;
                }
                Err(e) => {
                    attempt += 1;
                    if pausing(&e) || attempt >= WRITE_ATTEMPTS {
                        if let Some(grant) = self.grant.lock().expect("grant poisoned").as_mut() {
                            grant.refund(size);
                        }
                        self.fail(&e);
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(50 << attempt));
                }
            }
        }
    }

    /// Reserves `size` bytes for one block: from this process's grant, else from a new grant
    /// in the directory's ledger, evicting (or waiting for the process that evicts) when the
    /// bound is reached. Fails when no room came in time (with the directory's error, if it
    /// failed).
    fn reserve(&self, size: u64) -> Result<(), Option<std::io::Error>> {
        let mut grant = self.grant.lock().expect("grant poisoned");
        if grant.as_mut().is_some_and(|grant| grant.spend(size)) {
            return Ok(());
        }
        let started = Instant::now();
        loop {
            // Several blocks' worth, or this block's alone when that is all the room left (or
            // all a grant may be in a small directory: then asked for once).
            let mut reservation = Reservation::Full;
            let several = (size * GRANT_BLOCKS).min(self.space.size() / GRANT_SHARE_OF_BOUND);
            let asks = if several > size { &[several, size][..] } else { &[size][..] };
            for &bytes in asks {
                let granted;
                (reservation, granted) = self.space.grant(&self.holder, grant.take(), bytes);
                *grant = granted;
                if !matches!(reservation, Reservation::Full) {
                    break;
                }
            }
            match reservation {
                Reservation::Granted => {
                    grant.as_mut().expect("a granted reservation").spend(size);
                    return Ok(());
                }
                Reservation::Failed(e) => return Err(Some(e)),
                Reservation::Busy | Reservation::Full if started.elapsed() > ROOM_WAIT => return Err(None),
                Reservation::Busy => {}
                Reservation::Full => match self.space.pass(true) {
                    Ok(Some(_)) => {}
                    Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                    Err(e) => return Err(Some(e)),
                },
            }
        }
    }

    /// Writes the block's file (laid out by [`with_block_file`]) as `target`, creating its shard
    /// directory when it is missing.
    fn write_file(&self, target: &Path, key: &BlockKey, data: &[u8]) -> std::io::Result<()> {
        match self.write_laid_out(target, key, data) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(target.parent().expect("block path has a parent"))?;
                self.write_laid_out(target, key, data)
            }
            written => written,
        }
    }

    fn write_laid_out(&self, target: &Path, key: &BlockKey, data: &[u8]) -> std::io::Result<()> {
        with_block_file(key, data, self.block_size, |parts| {
            if self.direct.load(Ordering::Relaxed) {
                match replace_file_with(target, |temp| write_direct(temp, parts)) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        self.direct.store(false, Ordering::Relaxed);
                        info!(dir = %self.dir.display(), "the cache directory's file system takes no O_DIRECT writes: writing blocks through the page cache");
                    }
                    written => return written,
                }
            }
            replace_file(target, parts)
        })
    }

    fn paused(&self) -> bool {
        let mut paused = self.paused_until.lock().expect("pause state poisoned");
        match *paused {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                *paused = None;
                info!(dir = %self.dir.display(), "writing to the disk cache again");
                false
            }
            None => false,
        }
    }

    /// Handles a failed write: a full, out-of-quota or read-only directory pauses writes, any
    /// other error only costs the block (logged at most once per [`PAUSE`], with a count of the
    /// failures since: a directory failing every write must not flood the log).
    fn fail(&self, error: &std::io::Error) {
        if !pausing(error) {
            let mut logged = self.failures_logged.lock().expect("failure log state poisoned");
            let (last, since) = &mut *logged;
            if last.is_none_or(|at| at.elapsed() >= PAUSE) {
                warn!(dir = %self.dir.display(), %error, failed_since_last_line = *since, at_most_every = ?PAUSE, "could not write a cached block; continuing");
                (*last, *since) = (Some(Instant::now()), 0);
            } else {
                *since += 1;
            }
            return;
        }
        let mut paused = self.paused_until.lock().expect("pause state poisoned");
        if paused.is_none() {
            warn!(dir = %self.dir.display(), %error, pause = ?PAUSE, "the cache directory refused a write; serving from memory and S3, trying again later");
        }
        *paused = Some(Instant::now() + PAUSE);
    }
}

impl Drop for DiskCache {
    /// Gives back what this process did not spend of its grant.
    fn drop(&mut self) {
        if let Some(grant) = self.grant.get_mut().ok().and_then(Option::take) {
            self.space.settle(&self.holder, &grant);
        }
    }
}

/// Marks `dir` as the top of a directory tree for ext4's Orlov allocator (`chattr +T`), so
/// that the shard directories made in it later land in block groups of their own instead of
/// its group. Without a journal, ext4 passes over every inode freed in a group in the last
/// three minutes for each file it creates there: where caches are cleared and refilled (or
/// blocks evicted) a block file cost 300-450 us of CPU to create on one group, 12-15 us on
/// spread ones. Best effort: other file systems refuse the flag and lose nothing.
fn spread_subdirectories(dir: &Path) {
    use std::os::fd::AsRawFd;
    let Ok(handle) = fs::File::open(dir) else { return };
    if let Some(flags) = inode_flags(&handle).filter(|flags| flags & FS_TOPDIR_FL == 0) {
        let flags = flags | FS_TOPDIR_FL;
        // SAFETY: the fd is open for the call; the ioctl reads one flags word from `flags`.
        unsafe { libc::ioctl(handle.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) };
    }
}

/// `FS_TOPDIR_FL` of linux/fs.h: the top of a directory tree for the Orlov allocator.
const FS_TOPDIR_FL: libc::c_long = 0x0002_0000;

/// The inode flags of an open file (`lsattr`), where its file system has them.
fn inode_flags(handle: &fs::File) -> Option<libc::c_long> {
    use std::os::fd::AsRawFd;
    let mut flags: libc::c_long = 0;
    // SAFETY: the fd is open for the call; the ioctl writes one flags word into `flags`.
    let done = unsafe { libc::ioctl(handle.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    (done == 0).then_some(flags)
}

/// Alignment of the buffer, offset and length of an `O_DIRECT` write (a page: enough for every
/// device's logical block).
const DIRECT_ALIGN: usize = 4096;

/// Lays out the block file of `data` as block `key` and hands it to `write` as parts that start
/// on a page boundary, all but the last a whole number of pages, so they can be written
/// `O_DIRECT`. The header (and its padding) is put in a buffer kept per writer thread; so is the
/// data unless it starts on a page boundary itself (the receive path reads whole blocks into
/// such buffers): then it is written from where it is, and read once, for its checksum. A copy
/// is checksummed in pieces right after each piece's copy, while it is in the CPU's cache.
fn with_block_file<T>(key: &BlockKey, data: &[u8], block_size: u64, write: impl FnOnce(&[&[u8]]) -> T) -> T {
    /// Bytes copied and then checksummed at a time (fits in the L2 cache).
    const PIECE: usize = 64 << 10;
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let (header_len, data_start) = header_layout(key, data.len());
    let in_place = data.len() >= DIRECT_ALIGN && data.as_ptr().align_offset(DIRECT_ALIGN) == 0;
    let len = if in_place { data_start } else { data_start + data.len() };
    BUFFER.with_borrow_mut(|buffer| {
        // Only grows (every byte used is written below): a block's header page must not shrink
        // it for the next block that is copied.
        if buffer.len() < len + DIRECT_ALIGN {
            buffer.resize(len + DIRECT_ALIGN, 0);
        }
        let start = buffer.as_ptr().align_offset(DIRECT_ALIGN);
        let file = &mut buffer[start..start + len];
        let crc = if in_place {
            crc32c::crc32c(data)
        } else {
            let mut crc = 0;
            for (to, from) in file[data_start..].chunks_mut(PIECE).zip(data.chunks(PIECE)) {
                to.copy_from_slice(from);
                crc = crc32c::crc32c_append(crc, to);
            }
            crc
        };
        let header = encode_header(key, block_size, data.len(), data_start, seal(crc, key, block_size));
        debug_assert_eq!(header.len(), header_len);
        file[..header_len].copy_from_slice(&header);
        file[header_len..data_start].fill(0);
        match in_place {
            true => write(&[file, data]),
            false => write(&[file]),
        }
    })
}

/// Writes `parts` (as [`with_block_file`] gives them) as the new file `path` with `O_DIRECT`:
/// the bytes go from memory to the device, without a copy into the page cache, whose fresh
/// pages and later write-back would take memory and CPU from the reads the block is cached
/// for. Only whole alignment units can go direct: a tail (less than one, as an object's last
/// block may leave) follows through the page cache, which spares cutting back a padded write
/// (the file system would read the last unit back from the device to zero it).
fn write_direct(path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    use std::io::{IoSlice, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let (last, whole) = parts.split_last().expect("a file has a part");
    debug_assert!(parts.iter().all(|part| part.as_ptr().align_offset(DIRECT_ALIGN) == 0));
    debug_assert!(whole.iter().all(|part| part.len().is_multiple_of(DIRECT_ALIGN)));
    let (last_direct, tail) = last.split_at(last.len() / DIRECT_ALIGN * DIRECT_ALIGN);
    let mut slices: Vec<IoSlice> = whole.iter().chain([&last_direct]).map(|part| IoSlice::new(part)).collect();
    let mut slices = &mut slices[..];
    let mut handle = fs::OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_DIRECT).open(path)?;
    while slices.iter().any(|slice| !slice.is_empty()) {
        match handle.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(written) => IoSlice::advance_slices(&mut slices, written),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if !tail.is_empty() {
        // SAFETY: the fd is open for both calls; F_GETFL and F_SETFL take plain flag words.
        let cleared = unsafe {
            let flags = libc::fcntl(handle.as_raw_fd(), libc::F_GETFL);
            flags >= 0 && libc::fcntl(handle.as_raw_fd(), libc::F_SETFL, flags & !libc::O_DIRECT) == 0
        };
        if !cleared {
            return Err(std::io::Error::last_os_error());
        }
        handle.write_all(tail)?;
    }
    Ok(())
}

/// Whether `error` says the directory takes no more data for now.
fn pausing(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EROFS | libc::EDQUOT))
}

/// Whether this process may create files in `dir`.
fn writable(dir: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: `path` is NUL-terminated.
    unsafe { libc::access(path.as_ptr(), libc::W_OK) == 0 }
}

/// Whether `dir` is on NFS.
fn on_nfs(dir: &Path) -> bool {
    const NFS_SUPER_MAGIC: i64 = 0x6969;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: `path` is NUL-terminated and `stat` is a valid out-parameter.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == NFS_SUPER_MAGIC
    }
}

/// A file's bytes and mtime.
fn read_file(path: &Path) -> std::io::Result<(Vec<u8>, SystemTime)> {
    let mut file = fs::File::open(path)?;
    let meta = file.metadata()?;
    let mut raw = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut raw)?;
    Ok((raw, meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
}

/// Names (`<shard>/<file>`) of the block files under `blocks` (temp files left out).
fn list_blocks(blocks: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for shard in fs::read_dir(blocks).into_iter().flatten().flatten() {
        let shard_name = shard.file_name().to_string_lossy().into_owned();
        for file in fs::read_dir(shard.path()).into_iter().flatten().flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') {
                names.push(format!("{shard_name}/{name}"));
            }
        }
    }
    names
}

/// The shard directory (`blocks/<xx>`) of block `index` of the object with `hash`: an object's
/// blocks are spread over all 256, so writers of one stream do not queue on one directory's
/// lock, and no directory grows with the largest object.
fn shard(hash: u64, index: u64) -> u64 {
    (hash >> 56) ^ (index & 0xff)
}

/// (object hash, index) of a block file name `<xx>/<hash>-<index>`; `None` for anything else,
/// including a block file in another shard than its own (left by an older cdpfs, which kept an
/// object's blocks in one: never read, and evicted first as the least recently used).
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let (shard_name, file) = name.split_once('/')?;
    let (hash, index) = file.split_once('-')?;
    let (hash, index) = (u64::from_str_radix(hash, 16).ok()?, index.parse().ok()?);
    (u64::from_str_radix(shard_name, 16).ok()? == shard(hash, index)).then_some((hash, index))
}

/// The block's CRC32C: `data_crc` (of its data) extended over what names the block.
fn seal(data_crc: u32, key: &BlockKey, block_size: u64) -> u32 {
    let mut crc = crc32c::crc32c_append(data_crc, key.object.key.as_bytes());
    crc = crc32c::crc32c_append(crc, key.object.etag.as_bytes());
    crc = crc32c::crc32c_append(crc, &key.index.to_le_bytes());
    crc32c::crc32c_append(crc, &block_size.to_le_bytes())
}

/// Bytes of the header of `key`'s block file with `data_len` bytes of data, and where the data
/// starts: on the next page boundary when there is a page of data or more (then all of a whole
/// block's file is written `O_DIRECT`), right after the header otherwise (a small object's
/// block does not take a page more on disk).
fn header_layout(key: &BlockKey, data_len: usize) -> (usize, usize) {
    // Magic, key and ETag with their lengths, index, block size, offset, length, data start, CRC.
    let header_len = MAGIC.len() + 4 + key.object.key.len() + 4 + key.object.etag.len() + 8 * 4 + 4 + 4;
    let data_start = if data_len >= DIRECT_ALIGN { header_len.next_multiple_of(DIRECT_ALIGN) } else { header_len };
    (header_len, data_start)
}

/// Bytes of `key`'s block file with `data_len` bytes of data.
fn block_file_len(key: &BlockKey, data_len: usize) -> usize {
    header_layout(key, data_len).1 + data_len
}

/// The header of `key`'s block file (`header_layout(key, data_len).0` bytes).
fn encode_header(key: &BlockKey, block_size: u64, data_len: usize, data_start: usize, crc: u32) -> Vec<u8> {
    let mut header = Vec::with_capacity(64 + key.object.key.len() + key.object.etag.len());
    header.extend_from_slice(MAGIC);
    for field in [key.object.key.as_bytes(), key.object.etag.as_bytes()] {
        header.extend_from_slice(&(field.len() as u32).to_le_bytes());
        header.extend_from_slice(field);
    }
    header.extend_from_slice(&key.index.to_le_bytes());
    header.extend_from_slice(&block_size.to_le_bytes());
    header.extend_from_slice(&(key.index * block_size).to_le_bytes());
    header.extend_from_slice(&(data_len as u64).to_le_bytes());
    header.extend_from_slice(&(data_start as u32).to_le_bytes());
    header.extend_from_slice(&crc.to_le_bytes());
    header
}

/// Why a block file is not `key`'s block.
#[derive(Debug, PartialEq)]
enum Unusable {
    /// Written by a cdpfs with another layout of block files.
    OtherFormat,
    /// Damaged, cut short, or another block's.
    Invalid,
}

/// The data range of `raw` if it is a complete, intact copy of exactly `key`'s block.
fn decode(raw: &[u8], key: &BlockKey, block_size: u64) -> Result<std::ops::Range<usize>, Unusable> {
    let padded = match raw.get(..MAGIC.len()) {
        Some(magic) if magic == MAGIC => true,
        Some(magic) if magic == MAGIC_UNPADDED => false,
        _ if raw.starts_with(MAGIC_FAMILY) => return Err(Unusable::OtherFormat),
        _ => return Err(Unusable::Invalid),
    };
    decode_fields(raw, key, block_size, padded).ok_or(Unusable::Invalid)
}

/// [`decode`] past the magic; `padded`: the header says where the data starts.
fn decode_fields(raw: &[u8], key: &BlockKey, block_size: u64, padded: bool) -> Option<std::ops::Range<usize>> {
    let mut rest = &raw[MAGIC.len()..];
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
        rest = tail;
        Some(head)
    };
    let key_len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    let stored_key = take(key_len)?;
    let etag_len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    let stored_etag = take(etag_len)?;
    let index = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let stored_block_size = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let offset = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let len = u64::from_le_bytes(take(8)?.try_into().ok()?) as usize;
    let data_start = match padded {
        true => Some(u32::from_le_bytes(take(4)?.try_into().ok()?) as usize),
        false => None,
    };
    let crc = u32::from_le_bytes(take(4)?.try_into().ok()?);
    let header_end = raw.len() - rest.len();
    let data_start = data_start.unwrap_or(header_end);
    let same_block = stored_key == key.object.key.as_bytes()
        && stored_etag == key.object.etag.as_bytes()
        && index == key.index
        && stored_block_size == block_size
        && offset == key.index * block_size
        && len as u64 <= block_size
        && data_start >= header_end;
    let data = raw.get(data_start..).filter(|data| data.len() == len)?;
    (same_block && seal(crc32c::crc32c(data), key, block_size) == crc).then_some(data_start..raw.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ObjectMeta;

    fn key(name: &str, index: u64) -> BlockKey {
        let object =
            ObjectMeta { key: name.into(), size: 1 << 30, etag: "\"etag\"".into(), mtime: SystemTime::UNIX_EPOCH };
        BlockKey { object: Arc::new(object), index }
    }

    fn block_file(dir: &Path, key: &BlockKey) -> PathBuf {
        dir.join("blocks").join(DiskCache::relative_name(key))
    }

    #[test]
    fn blocks_are_written_past_the_page_cache_into_shard_directories_spread_by_the_allocator() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), Some(1 << 24), 1 << 20).unwrap();
        let data: Vec<u8> = (0..1usize << 20).map(|i| (i * 7 % 251) as u8).collect();
        // A whole block: its data starts on a page, and all of its file goes past the page cache.
        let whole = key("t.mrc", 1);
        assert!(cache.write(&whole, &data));
        let path = block_file(dir.path(), &whole);
        assert_eq!(resident_pages(&path), 0, "pages of a just-written block file are in the page cache");
        assert_eq!(fs::metadata(&path).unwrap().len(), (DIRECT_ALIGN + data.len()) as u64);
        assert_eq!(cache.read(&whole).unwrap(), &data[..]);
        // The same from memory that starts on a page, as the receive path fills it: written from
        // where it is.
        let mut backing = vec![0u8; data.len() + DIRECT_ALIGN];
        let start = backing.as_ptr().align_offset(DIRECT_ALIGN);
        backing[start..start + data.len()].copy_from_slice(&data);
        let in_place = key("t.mrc", 3);
        assert!(cache.write(&in_place, &backing[start..start + data.len()]));
        let path = block_file(dir.path(), &in_place);
        assert_eq!(resident_pages(&path), 0, "pages of a just-written block file are in the page cache");
        assert_eq!(fs::metadata(&path).unwrap().len(), (DIRECT_ALIGN + data.len()) as u64);
        assert_eq!(cache.read(&in_place).unwrap(), &data[..]);
        // From page-aligned memory but not whole pages (an object's last block): the pages
        // direct, the tail through the page cache.
        let in_place_short = key("t.mrc", 4);
        assert!(cache.write(&in_place_short, &backing[start..start + data.len() - 123]));
        let resident = resident_pages(&block_file(dir.path(), &in_place_short));
        assert!(resident <= 1, "{resident} pages of a just-written block file are in the page cache");
        assert_eq!(cache.read(&in_place_short).unwrap(), &data[..data.len() - 123]);
        // Not a multiple of the O_DIRECT alignment, as an object's last block is: at most the
        // partial last page (written through the page cache) is cached.
        let last = key("t.mrc", 2);
        let short = &data[..data.len() - 123];
        assert!(cache.write(&last, short));
        let path = block_file(dir.path(), &last);
        let resident = resident_pages(&path);
        assert!(resident <= 1, "{resident} pages of a just-written block file are in the page cache");
        assert_eq!(cache.read(&last).unwrap(), short);
        // A block smaller than a page (a small object's) is not padded to one.
        let small = key("t.json", 0);
        assert!(cache.write(&small, b"{}"));
        let (header_len, data_start) = header_layout(&small, 2);
        assert_eq!(header_len, data_start);
        assert_eq!(fs::metadata(block_file(dir.path(), &small)).unwrap().len(), (header_len + 2) as u64);
        assert_eq!(cache.read(&small).unwrap(), &b"{}"[..]);
        // On file systems that keep the flag (ext4), the shards are spread like top directories.
        if let Some(flags) = inode_flags(&fs::File::open(dir.path().join("blocks")).unwrap()) {
            assert_ne!(flags & FS_TOPDIR_FL, 0, "blocks/ is not marked as a top directory");
        }
    }

    #[test]
    fn blocks_of_the_unpadded_format_are_served_and_of_an_unknown_one_are_quiet_misses() {
        let lines = LogLines::default();
        let subscriber =
            tracing_subscriber::fmt().with_writer(lines.clone()).with_max_level(tracing::Level::INFO).finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), Some(1 << 24), 1 << 16).unwrap();
        let k = key("x", 1);
        let data: Vec<u8> = (0..1 << 16).map(|i| (i % 253) as u8).collect();
        // As the format before wrote it: the header without the data's start, the data after it.
        let mut unpadded = MAGIC_UNPADDED.to_vec();
        for field in [k.object.key.as_bytes(), k.object.etag.as_bytes()] {
            unpadded.extend_from_slice(&(field.len() as u32).to_le_bytes());
            unpadded.extend_from_slice(field);
        }
        for word in [k.index, 1 << 16, k.index << 16, data.len() as u64] {
            unpadded.extend_from_slice(&word.to_le_bytes());
        }
        unpadded.extend_from_slice(&seal(crc32c::crc32c(&data), &k, 1 << 16).to_le_bytes());
        unpadded.extend_from_slice(&data);
        let path = block_file(dir.path(), &k);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, &unpadded).unwrap();
        assert_eq!(cache.read(&k).unwrap(), &data[..], "a block of the unpadded format");
        // Damaged, it is not served.
        *unpadded.last_mut().unwrap() ^= 1;
        fs::write(&path, &unpadded).unwrap();
        assert!(cache.read(&k).is_none(), "a damaged block of the unpadded format was served");
        assert!(lines.text().contains("WARN"), "{}", lines.text());
        // A format this cdpfs does not know: a miss, removed, with no warning.
        let before = lines.text().len();
        assert!(cache.write(&k, &data));
        let mut raw = fs::read(&path).unwrap();
        raw[..8].copy_from_slice(b"CDPFSB99");
        fs::write(&path, &raw).unwrap();
        assert!(cache.read(&k).is_none(), "a block of an unknown format was served");
        assert!(!path.exists());
        assert!(!lines.text()[before..].contains("WARN"), "{}", lines.text());
        assert!(cache.write(&k, &data));
        assert_eq!(cache.read(&k).unwrap(), &data[..]);
    }

    /// Log output captured in memory.
    #[derive(Clone, Default)]
    struct LogLines(Arc<Mutex<Vec<u8>>>);

    impl LogLines {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    impl std::io::Write for LogLines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogLines {
        type Writer = LogLines;

        fn make_writer(&'a self) -> LogLines {
            self.clone()
        }
    }

    /// Pages of `path` in the page cache.
    fn resident_pages(path: &Path) -> usize {
        let file = fs::File::open(path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        let pages = len.div_ceil(4096);
        let mut resident = vec![0u8; pages];
        // SAFETY: a fresh read-only shared mapping of the whole file, unmapped before return;
        // mincore writes one byte per page into `resident`, which has that many.
        unsafe {
            use std::os::fd::AsRawFd;
            let map = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0);
            assert_ne!(map, libc::MAP_FAILED);
            assert_eq!(libc::mincore(map, len, resident.as_mut_ptr()), 0);
            libc::munmap(map, len);
        }
        resident.iter().filter(|page| *page & 1 == 1).count()
    }

    #[test]
    fn round_trip_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), Some(1 << 20), 1 << 16).unwrap();
        let k = key("a/b.mrc", 3);
        assert!(cache.write(&k, b"hello block"));
        assert_eq!(cache.read(&k).unwrap(), &b"hello block"[..]);
        assert!(cache.read(&key("a/b.mrc", 4)).is_none());
        drop(cache);
        let reopened = DiskCache::open(dir.path(), None, 1 << 16).unwrap();
        assert!(!reopened.contains(&k), "opening reads no block");
        assert_eq!(reopened.read(&k).unwrap(), &b"hello block"[..]);
        assert!(reopened.contains(&k));
        assert!(super::super::bound::summary(dir.path()).unwrap().bytes > 11);
    }

    #[test]
    fn blocks_another_process_writes_are_found_and_listed_by_the_upkeep() {
        let dir = tempfile::tempdir().unwrap();
        let reader = Arc::new(DiskCache::open(dir.path(), Some(1 << 20), 1 << 16).unwrap());
        let writer = DiskCache::open(dir.path(), None, 1 << 16).unwrap();
        let (a, b) = (key("a", 0), key("b", 0));
        assert!(writer.write(&a, b"from the other process") && writer.write(&b, b"b"));
        assert!(!reader.contains(&a));
        assert_eq!(reader.read(&a).unwrap(), &b"from the other process"[..]);
        assert!(reader.present(&b));
        let fresh = Arc::new(DiskCache::open(dir.path(), None, 1 << 16).unwrap());
        fresh.refresh(true, Duration::from_secs(300));
        assert!(fresh.contains(&a) && fresh.contains(&b));
    }

    #[test]
    fn flipped_and_truncated_blocks_are_misses_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), Some(1 << 20), 1 << 16).unwrap();
        let k = key("x", 0);
        let data = vec![7u8; 4096];
        for damage in 0..3 {
            assert!(cache.write(&k, &data));
            let path = block_file(dir.path(), &k);
            let mut raw = fs::read(&path).unwrap();
            match damage {
                0 => *raw.last_mut().unwrap() ^= 1,
                1 => raw.truncate(raw.len() - 100),
                _ => raw[10] ^= 0xff,
            }
            fs::write(&path, raw).unwrap();
            assert!(cache.read(&k).is_none(), "damage {damage} was served");
            assert!(!path.exists());
        }
    }

    #[test]
    fn a_data_start_off_the_file_or_inside_the_header_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), Some(1 << 24), 1 << 16).unwrap();
        let k = key("x", 0);
        let data = vec![9u8; 1 << 16];
        // Where the header keeps the data's start: after the magic, key, ETag and four words.
        let at = MAGIC.len() + 4 + k.object.key.len() + 4 + k.object.etag.len() + 8 * 4;
        for start in [u32::MAX, 8, (DIRECT_ALIGN - 1) as u32] {
            assert!(cache.write(&k, &data));
            let path = block_file(dir.path(), &k);
            let mut raw = fs::read(&path).unwrap();
            assert_eq!(raw[at..at + 4], (DIRECT_ALIGN as u32).to_le_bytes(), "the field is not where the test looks");
            raw[at..at + 4].copy_from_slice(&start.to_le_bytes());
            fs::write(&path, raw).unwrap();
            assert!(cache.read(&k).is_none(), "a block whose data starts at {start} was served");
        }
    }

    #[test]
    fn a_block_of_another_etag_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), Some(1 << 20), 1 << 16).unwrap();
        let k = key("x", 0);
        cache.write(&k, b"old bytes");
        let mut changed = (*k.object).clone();
        changed.etag = "\"other\"".into();
        let other = BlockKey { object: Arc::new(changed), index: 0 };
        // Force a collision: put the old block where the new key's block would be.
        fs::create_dir_all(block_file(dir.path(), &other).parent().unwrap()).unwrap();
        fs::copy(block_file(dir.path(), &k), block_file(dir.path(), &other)).unwrap();
        assert!(cache.read(&other).is_none());
    }

    #[test]
    fn a_block_written_with_another_block_size_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let k = key("x", 2);
        assert!(DiskCache::open(dir.path(), Some(1 << 20), 4096).unwrap().write(&k, &[5u8; 4096]));
        // Same key, ETag and index, but the index now means another offset.
        let other = DiskCache::open(dir.path(), None, 8192).unwrap();
        assert!(other.present(&k), "the file is there");
        assert!(other.read(&k).is_none());
        assert!(!block_file(dir.path(), &k).exists(), "the mismatched block was removed");
    }

    #[test]
    fn a_writer_reserves_several_blocks_per_ledger_update_and_gives_back_the_rest_when_closed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), Some(1 << 30), 1 << 16).unwrap();
        cache.pass(false).unwrap().unwrap();
        let data = vec![7u8; 1 << 16];
        for i in 0..10 {
            assert!(cache.write(&key("f", i), &data));
        }
        let usage = super::super::bound::summary(dir.path()).unwrap();
        let block_file_size = fs::metadata(block_file(dir.path(), &key("f", 0))).unwrap().len();
        assert_eq!(usage.grants.len(), 1, "{usage:?}");
        assert_eq!(usage.bytes, GRANT_BLOCKS * block_file_size, "one grant of {GRANT_BLOCKS} blocks: {usage:?}");
        drop(cache);
        let usage = super::super::bound::summary(dir.path()).unwrap();
        assert!(usage.grants.is_empty());
        assert_eq!((usage.bytes, usage.blocks), (walkdir_size(&dir.path().join("blocks")), 10));
    }

    #[test]
    fn an_objects_blocks_spread_over_the_shards_and_a_block_in_a_foreign_shard_is_not_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), Some(1 << 20), 1 << 16).unwrap();
        for index in 0..4 {
            assert!(cache.write(&key("f", index), b"data"));
        }
        let shards: HashSet<PathBuf> =
            (0..4).map(|index| block_file(dir.path(), &key("f", index)).parent().unwrap().to_owned()).collect();
        assert_eq!(shards.len(), 4, "one object's blocks in {shards:?}");
        let name = DiskCache::relative_name(&key("f", 1));
        assert_eq!(parse_name(&name), Some((key("f", 1).object_hash(), 1)));
        // Where an older cdpfs put it: the shard of block 0.
        let (_, file) = name.split_once('/').unwrap();
        let foreign = format!("{:02x}/{file}", shard(key("f", 1).object_hash(), 0));
        assert_eq!(parse_name(&foreign), None);
    }

    #[test]
    fn writers_sharing_a_directory_keep_its_bound_and_evict_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let size = 20 * 1100;
        let (a, b) = (
            DiskCache::open(dir.path(), Some(size), 1 << 16).unwrap(),
            DiskCache::open(dir.path(), Some(1 << 30), 1 << 16).unwrap(),
        );
        assert_eq!(b.size(), size, "the directory's bound, not the second process's");
        let data = vec![1u8; 1000];
        for i in 0..15 {
            assert!(a.write(&key("f", i), &data));
        }
        // Used by the other process: recent for everyone.
        let old = SystemTime::now() - Duration::from_secs(3600);
        for i in 0..15 {
            let file = fs::File::options().write(true).open(block_file(dir.path(), &key("f", i))).unwrap();
            file.set_modified(old + Duration::from_secs(i)).unwrap();
        }
        assert!(b.read(&key("f", 0)).is_some());
        for i in 15..25 {
            let writer = if i % 2 == 0 { &a } else { &b };
            assert!(writer.write(&key("f", i), &data));
            assert!(walkdir_size(&dir.path().join("blocks")) <= size, "the bound was passed");
        }
        assert!(b.read(&key("f", 0)).is_some(), "a block used since was evicted");
        assert!(a.read(&key("f", 1)).is_none(), "the least recently used block was kept");
    }

    fn walkdir_size(dir: &Path) -> u64 {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| if e.path().is_dir() { walkdir_size(&e.path()) } else { e.metadata().unwrap().len() })
            .sum()
    }

    #[test]
    fn a_failed_write_is_not_fatal_and_unique_temps_are_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), Some(1 << 20), 1 << 16).unwrap();
        let k = key("x", 0);
        // A file where the block's shard directory should be: every attempt fails.
        let shard = block_file(dir.path(), &k).parent().unwrap().to_path_buf();
        fs::write(&shard, b"not a dir").unwrap();
        let log = LogLines::default();
        let subscriber = tracing_subscriber::fmt().with_writer(log.clone()).with_ansi(false).finish();
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..3 {
                assert!(!cache.write(&k, b"data"));
            }
        });
        let failures = log.text().matches("could not write a cached block").count();
        assert_eq!(failures, 1, "each failed write was logged:\n{}", log.text());
        assert!(!cache.paused(), "only a full or read-only directory pauses writes");
        fs::remove_file(&shard).unwrap();
        assert!(cache.write(&k, b"data"));
        assert_eq!(cache.read(&k).unwrap(), &b"data"[..]);
        let entries: Vec<_> = fs::read_dir(&shard).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(entries.len(), 1, "{entries:?}");
    }
}
