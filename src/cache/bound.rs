//! One bound per cache directory, kept by every process that uses it, on one node or many.
//!
//! The directory holds its size bound (`cdpfs-cache.json`: set by `cdpfs cache init`, or by the
//! first process to open the directory), a ledger of the bytes its blocks take (`usage`), and the
//! evictor's lease (`evict.lease`). A writer reserves a block's bytes in the ledger before it
//! writes the block; when that would pass the bound, it runs (or waits for) an eviction pass
//! instead. One process at a time evicts, the holder of the lease: it lists the blocks, removes
//! the least recently used (oldest mtime: readers touch a block on a hit, at most once a minute)
//! down to [`LOW_WATER_PERCENT`] of the bound, and sets the ledger from what it found, so the
//! ledger also serves as the directory's usage summary, refreshed in the background.
//!
//! A writer does not take the ledger's lock for every block: it reserves a [`Grant`] of several
//! blocks' bytes at once, spends it on its next blocks, and settles it (gives back what it did
//! not spend) when it takes the next one or closes. The ledger lists the grants not yet
//! settled, and a pass counts them as used in full (the ledger errs on the full side by at most
//! one grant per writer), so the files a grant pays for never go uncounted. A holder spends a
//! grant only within [`GRANT_LIFETIME`] of taking it, and a pass stops counting a grant after
//! [`GRANT_EXPIRY`] (twice that: every file it paid for is there to be counted by then), so a
//! grant left unsettled by a writer that went idle or died costs the bound for two minutes.
//!
//! Both locks are files created exclusively (`O_EXCL`, which NFSv4 and Lustre honour across
//! clients) holding their owner's token, taken over once their mtime is older than their
//! expiry, so a holder that died leaves no lock behind for long. Temp names are unique across
//! hosts, containers and pid namespaces: host name, pid and 64 random bits ([`unique_suffix`]).

use std::collections::BTreeMap;
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// The file holding the directory's size bound.
pub const CONFIG: &str = "cdpfs-cache.json";
/// The ledger and usage summary.
const USAGE: &str = "usage";
const USAGE_LOCK: &str = "usage.lock";
const EVICT_LEASE: &str = "evict.lease";

/// The bound a directory gets when the first process to open it names none.
pub const DEFAULT_SIZE: u64 = 20 << 30;

/// A pass evicts once the blocks take more than this share of the bound...
const HIGH_WATER_PERCENT: u64 = 98;
/// ...down to this share.
pub const LOW_WATER_PERCENT: u64 = 95;

/// A ledger lock is held for a few file operations: older than this, its holder died.
const LOCK_EXPIRY: Duration = Duration::from_secs(10);
/// The evictor renews its lease while it works; older than this, its holder died.
const LEASE_EXPIRY: Duration = Duration::from_secs(60);
/// How long a writer waits for the ledger lock before it gives up on one block.
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// Temp files older than this were left by a writer that died.
const TEMP_EXPIRY: Duration = Duration::from_secs(3600);
/// A writer spends a grant only this long after taking it...
pub const GRANT_LIFETIME: Duration = Duration::from_secs(60);
/// ...and a pass stops counting a grant not settled this long after it was taken (and takes
/// it off the ledger: settling it later gives nothing back).
const GRANT_EXPIRY: Duration = Duration::from_secs(120);

#[derive(Serialize, Deserialize)]
struct Config {
    size: u64,
}

/// What the ledger says: bytes and blocks of the directory, and when a pass last counted them.
#[derive(Serialize, Deserialize, Default, Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Bytes of block files (counted by the last pass, plus writes reserved since).
    pub bytes: u64,
    /// Block files.
    pub blocks: u64,
    /// Unix time of the last pass (0: never).
    pub scanned_at: u64,
    /// Grants not settled yet, by holder: their bytes (in `bytes` in full) and Unix time.
    #[serde(default)]
    pub grants: BTreeMap<String, (u64, u64)>,
}

/// Bytes reserved in the ledger at once and spent block by block by one writer ([`Space::grant`]).
#[derive(Debug)]
pub struct Grant {
    /// Bytes reserved.
    bytes: u64,
    /// Of which not spent yet.
    left: u64,
    /// Blocks spent on.
    blocks: u64,
    taken: std::time::Instant,
}

impl Grant {
    /// Spends `bytes` of the grant on one block; false when it has not that much left, or is
    /// too old to spend.
    pub fn spend(&mut self, bytes: u64) -> bool {
        let spendable = self.left >= bytes && self.taken.elapsed() < GRANT_LIFETIME;
        if spendable {
            self.left -= bytes;
            self.blocks += 1;
        }
        spendable
    }

    /// Gives back `bytes` of a block that was not written after all.
    pub fn refund(&mut self, bytes: u64) {
        self.left = (self.left + bytes).min(self.bytes);
        self.blocks = self.blocks.saturating_sub(1);
    }
}

/// The outcome of asking the ledger for room.
#[derive(Debug)]
pub enum Reservation {
    /// The bytes are reserved: write the block.
    Granted,
    /// The bound would be passed: evict first.
    Full,
    /// The ledger lock could not be had in time.
    Busy,
    /// The directory failed (full, read-only, gone).
    Failed(std::io::Error),
}

/// What one eviction pass found and did.
#[derive(Debug, Default)]
pub struct Pass {
    /// Block files left, and their bytes.
    pub blocks: u64,
    /// Their total size.
    pub bytes: u64,
    /// Block files removed, and their bytes.
    pub evicted_blocks: u64,
    /// Bytes removed.
    pub evicted_bytes: u64,
    /// Names (`<shard>/<file>`) of the blocks left.
    pub names: Vec<String>,
}

/// A cache directory's bound and ledger.
pub struct Space {
    dir: PathBuf,
    size: AtomicU64,
}

impl Space {
    /// The bound of `dir`: the one it holds, else `requested` (or [`DEFAULT_SIZE`]), which is
    /// then stored for the processes that come later. A `requested` size that differs from the
    /// stored one is ignored with a warning. The file is read on a helper thread with a time
    /// limit, so a hung directory does not stall the caller (it then uses `requested`). With
    /// `writes` false (a process that only reads the directory, or `cdpfs cache trim`) no bound
    /// is stored.
    pub fn open(dir: &Path, requested: Option<u64>, writes: bool) -> Space {
        let path = dir.join(CONFIG);
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = path.clone();
        std::thread::spawn(move || tx.send(read_config(&reader)));
        let stored = match rx.recv_timeout(super::offload::TIMEOUT) {
            Ok(Some(size)) => Some(size),
            Ok(None) if !writes => None,
            Ok(None) => {
                let size = requested.unwrap_or(DEFAULT_SIZE);
                // First come: store it, unless another process just did.
                let created = fs::OpenOptions::new().write(true).create_new(true).open(&path).and_then(|mut file| {
                    file.write_all(&serde_json::to_vec(&Config { size }).expect("config serializes"))
                });
                match created {
                    Ok(()) => info!(dir = %dir.display(), size, "set the cache directory's bound"),
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(e) => debug!(error = %e, "could not store the cache directory's bound"),
                }
                read_config(&path)
            }
            Err(_) => None,
        };
        if let (Some(stored), Some(requested)) = (stored, requested) {
            if stored != requested {
                warn!(
                    dir = %dir.display(),
                    "--cache-size {requested} differs from the cache directory's bound {stored} (set with `cdpfs cache init`); using {stored}"
                );
            }
        }
        let size = stored.or(requested).unwrap_or(DEFAULT_SIZE);
        Space { dir: dir.to_path_buf(), size: AtomicU64::new(size) }
    }

    /// The bound in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Settles `holder`'s previous grant, if any, and reserves a new one of `bytes` in the
    /// ledger (when they fit under the bound).
    pub fn grant(&self, holder: &str, previous: Option<Grant>, bytes: u64) -> (Reservation, Option<Grant>) {
        let size = self.size();
        let mut fits = false;
        let now = unix_now();
        let updated = self.update(|usage, known| {
            if let Some(previous) = &previous {
                settle(usage, holder, previous);
            }
            // No ledger (a new directory, or one a crash damaged): a pass counts it first.
            fits = known && usage.bytes + bytes <= size;
            if fits {
                usage.bytes += bytes;
                usage.grants.insert(holder.to_owned(), (bytes, now));
            }
            previous.is_some() || fits
        });
        match updated {
            Ok(Some(_)) if fits => {
                let grant = Grant { bytes, left: bytes, blocks: 0, taken: std::time::Instant::now() };
                (Reservation::Granted, Some(grant))
            }
            Ok(Some(_)) => (Reservation::Full, None),
            Ok(None) => (Reservation::Busy, previous),
            Err(e) => (Reservation::Failed(e), previous),
        }
    }

    /// Gives back what `holder` did not spend of `grant` (a writer closing).
    pub fn settle(&self, holder: &str, grant: &Grant) {
        let _ = self.update(|usage, known| {
            settle(usage, holder, grant);
            known
        });
    }

    /// Applies `change` to the ledger under its lock (with whether there was one: zeros if
    /// not) and stores the result when `change` says so; `Ok(None)` when the lock could not be
    /// had in time. The ledger is replaced atomically, so a process killed while updating it
    /// leaves the old one, never a torn one.
    fn update(&self, change: impl FnOnce(&mut Summary, bool) -> bool) -> std::io::Result<Option<bool>> {
        let Some(_lock) = LockFile::take_waiting(&self.dir.join(USAGE_LOCK), LOCK_EXPIRY, LOCK_WAIT)? else {
            return Ok(None);
        };
        let stored = summary(&self.dir);
        let known = stored.is_some();
        let mut usage = stored.unwrap_or_default();
        let changed = change(&mut usage, known);
        if changed {
            replace_file(&self.dir.join(USAGE), &[&serde_json::to_vec(&usage).expect("summary serializes")])?;
        }
        Ok(Some(changed))
    }

    /// When a pass last counted the directory (by any process; `None`: never).
    pub fn last_pass(&self) -> Option<SystemTime> {
        summary(&self.dir).filter(|s| s.scanned_at > 0).map(|s| UNIX_EPOCH + Duration::from_secs(s.scanned_at))
    }

    /// One eviction pass if no other process is running one (`None` then): counts the blocks,
    /// removes stale temp files and, when the blocks are near the bound (or `force`), the least
    /// recently used blocks down to the low-water mark; then sets the ledger from the count.
    pub fn pass(&self, force: bool) -> std::io::Result<Option<Pass>> {
        let Some(lease) = LockFile::try_take(&self.dir.join(EVICT_LEASE), LEASE_EXPIRY)? else { return Ok(None) };
        if let Some(size) = read_config(&self.dir.join(CONFIG)) {
            self.size.store(size, Ordering::Relaxed);
        }
        let reserved_before = summary(&self.dir).unwrap_or_default();
        // Temp files of the ledger and bound a killed process left beside them.
        for entry in fs::read_dir(&self.dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let old =
                entry.metadata().and_then(|m| m.modified()).is_ok_and(|m| m.elapsed().is_ok_and(|a| a > TEMP_EXPIRY));
            if name.starts_with('.') && name.ends_with(".tmp") && old {
                let _ = fs::remove_file(entry.path());
            }
        }
        let mut found = Vec::new();
        let mut renewed = std::time::Instant::now();
        for shard in fs::read_dir(self.dir.join("blocks"))?.flatten() {
            for file in fs::read_dir(shard.path()).into_iter().flatten().flatten() {
                if renewed.elapsed() > LEASE_EXPIRY / 4 {
                    lease.renew();
                    renewed = std::time::Instant::now();
                }
                let Ok(meta) = file.metadata() else { continue };
                let mtime = meta.modified().unwrap_or(UNIX_EPOCH);
                let name = file.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    if mtime.elapsed().is_ok_and(|age| age > TEMP_EXPIRY) {
                        let _ = fs::remove_file(file.path());
                    }
                    continue;
                }
                found.push((mtime, format!("{}/{name}", shard.file_name().to_string_lossy()), meta.len()));
            }
        }
        let mut pass = Pass { blocks: found.len() as u64, bytes: found.iter().map(|f| f.2).sum(), ..Pass::default() };
        let size = self.size();
        // Grants taken before the pass may pay for files written after it listed them: they
        // count in full, until they expire (their holder died without settling).
        let scanned_at = unix_now();
        let live = |&(_, at): &(u64, u64)| scanned_at.saturating_sub(at) < GRANT_EXPIRY.as_secs();
        let granted: u64 = reserved_before.grants.values().filter(|g| live(g)).map(|&(bytes, _)| bytes).sum();
        if force || pass.bytes + granted > size / 100 * HIGH_WATER_PERCENT {
            let low = (size / 100 * LOW_WATER_PERCENT).saturating_sub(granted);
            found.sort();
            found.retain(|(mtime, name, len)| {
                if pass.bytes <= low {
                    return true;
                }
                let path = self.dir.join("blocks").join(name);
                // Read since it was listed: recently used after all.
                if fs::metadata(&path).and_then(|m| m.modified()).is_ok_and(|now| now > *mtime) {
                    return true;
                }
                let removed = fs::remove_file(&path).is_ok();
                if removed {
                    pass.bytes -= len;
                    pass.blocks -= 1;
                    pass.evicted_bytes += len;
                    pass.evicted_blocks += 1;
                }
                !removed
            });
        }
        pass.names = found.into_iter().map(|(_, name, _)| name).collect();
        // Writes reserved while the pass ran may be counted twice: the ledger errs on the full side.
        self.update(|usage, _| {
            usage.bytes = usage.bytes.saturating_sub(reserved_before.bytes) + pass.bytes + granted;
            usage.blocks = usage.blocks.saturating_sub(reserved_before.blocks) + pass.blocks;
            usage.grants.retain(|_, grant| live(grant));
            usage.scanned_at = scanned_at;
            true
        })?;
        if pass.evicted_blocks > 0 {
            debug!(blocks = pass.evicted_blocks, bytes = pass.evicted_bytes, "evicted least recently used blocks");
        }
        Ok(Some(pass))
    }
}

/// Takes `holder`'s `grant` off the ledger: its unspent bytes back, its blocks counted; nothing
/// when a pass has taken it off already (it expired: the pass counted its files instead).
fn settle(usage: &mut Summary, holder: &str, grant: &Grant) {
    if usage.grants.remove(holder).is_some() {
        usage.bytes = usage.bytes.saturating_sub(grant.left);
        usage.blocks += grant.blocks;
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The ledger of `dir`, if it has one.
pub fn summary(dir: &Path) -> Option<Summary> {
    serde_json::from_slice(&fs::read(dir.join(USAGE)).ok()?).ok()
}

/// Creates the cache directory `dir` (if needed) with the bound `size`, replacing any bound it
/// had (`cdpfs cache init`).
pub fn init(dir: &Path, size: u64) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    fs::create_dir_all(dir.join("blocks"))?;
    replace_file(&dir.join(CONFIG), &[&serde_json::to_vec(&Config { size }).expect("config serializes")])
}

/// Writes `parts` as the file `target` atomically: into a temp file next to it, named uniquely
/// across hosts ([`unique_suffix`], starting with `.`) and created exclusively, then renamed
/// over `target`. A reader sees the old file or the new one, never a part.
pub fn replace_file(target: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    replace_file_with(target, |temp| {
        let mut file = fs::OpenOptions::new().write(true).create_new(true).open(temp)?;
        parts.iter().try_for_each(|part| file.write_all(part))
    })
}

/// [`replace_file`] with the temp file created (exclusively) and filled by `write`.
pub fn replace_file_with(target: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> std::io::Result<()> {
    let dir = target.parent().expect("a file path has a parent");
    let name = target.file_name().expect("a file path has a name").to_string_lossy();
    let temp = dir.join(format!(".{name}.{}.tmp", unique_suffix()));
    let result = write(&temp).and_then(|()| fs::rename(&temp, target));
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// The bound stored in `dir`, if any.
pub fn stored_size(dir: &Path) -> Option<u64> {
    read_config(&dir.join(CONFIG))
}

fn read_config(path: &Path) -> Option<u64> {
    serde_json::from_slice::<Config>(&fs::read(path).ok()?).ok().map(|c| c.size)
}

/// A lock held by owning a file created exclusively; removed when dropped (if still ours).
struct LockFile {
    path: PathBuf,
    token: String,
    _boost: PriorityBoost,
}

/// While alive, the calling thread runs at normal CPU priority if it ran at idle priority (the
/// disk writers do): a holder of a lock other processes wait for must not wait for idle CPU.
/// Restored when dropped. Best effort: without the right to change it, nothing changes.
struct PriorityBoost {
    was_idle: bool,
}

impl PriorityBoost {
    fn new() -> PriorityBoost {
        let normal = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `normal` is a valid sched_param.
        let was_idle = unsafe {
            libc::sched_getscheduler(0) == libc::SCHED_IDLE
                && libc::sched_setscheduler(0, libc::SCHED_OTHER, &normal) == 0
        };
        PriorityBoost { was_idle }
    }
}

impl Drop for PriorityBoost {
    fn drop(&mut self) {
        if self.was_idle {
            let idle = libc::sched_param { sched_priority: 0 };
            // SAFETY: as in `new`.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) };
        }
    }
}

impl LockFile {
    /// Takes the lock at `path` unless a holder has it, taking over one older than `expiry`.
    fn try_take(path: &Path, expiry: Duration) -> std::io::Result<Option<LockFile>> {
        let token = unique_suffix();
        let boost = PriorityBoost::new();
        for _ in 0..2 {
            match fs::OpenOptions::new().write(true).create_new(true).open(path) {
                Ok(mut file) => {
                    if let Err(e) = file.write_all(token.as_bytes()) {
                        // A full directory: no lock left behind.
                        let _ = fs::remove_file(path);
                        return Err(e);
                    }
                    return Ok(Some(LockFile { path: path.to_path_buf(), token, _boost: boost }));
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let age = fs::metadata(path).and_then(|m| m.modified()).map(|m| m.elapsed().unwrap_or_default());
                    if !age.is_ok_and(|age| age > expiry) {
                        return Ok(None);
                    }
                    // Moved aside first: of several processes breaking it, one succeeds.
                    let aside = path.with_extension(format!("stale.{}", unique_suffix()));
                    if fs::rename(path, &aside).is_ok() {
                        warn!(lock = %path.display(), "took over a lock its holder left behind");
                        let _ = fs::remove_file(&aside);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// [`LockFile::try_take`], retrying for up to `wait`.
    fn take_waiting(path: &Path, expiry: Duration, wait: Duration) -> std::io::Result<Option<LockFile>> {
        let started = std::time::Instant::now();
        let mut pause = Duration::from_micros(200);
        loop {
            match LockFile::try_take(path, expiry)? {
                None if started.elapsed() < wait => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                taken => return Ok(taken),
            }
        }
    }

    /// Tells other processes the holder is alive.
    fn renew(&self) {
        if let Ok(file) = fs::OpenOptions::new().write(true).open(&self.path) {
            let _ = file.set_modified(SystemTime::now());
        }
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        if fs::read_to_string(&self.path).is_ok_and(|held| held == self.token) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// `<host>.<pid>.<64 random bits in hex>`: unique across nodes, containers and pid namespaces
/// that share a directory, even where host names and pids repeat.
pub fn unique_suffix() -> String {
    let mut random = [0u8; 8];
    // SAFETY: the buffer is valid for its length; getrandom fills at most that many bytes.
    let filled = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
    let mut value = u64::from_le_bytes(random);
    if filled != random.len() as isize {
        // No entropy source: time and address still make a collision unlikely.
        value ^= SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        value ^= &random as *const _ as u64;
    }
    format!("{}.{}.{value:016x}", hostname(), std::process::id())
}

/// This machine's host name (its UTS namespace's).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or truncates.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    if ok {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "localhost".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_size_sticks_and_init_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("blocks")).unwrap();
        assert_eq!(Space::open(dir.path(), Some(1000), true).size(), 1000);
        assert_eq!(Space::open(dir.path(), Some(50), true).size(), 1000, "a later --cache-size does not change it");
        assert_eq!(Space::open(dir.path(), None, true).size(), 1000);
        init(dir.path(), 7000).unwrap();
        assert_eq!(Space::open(dir.path(), Some(50), true).size(), 7000);
    }

    /// What a new holder asking for `bytes` gets.
    fn reserve(space: &Space, bytes: u64) -> Reservation {
        space.grant(&unique_suffix(), None, bytes).0
    }

    #[test]
    fn grants_stop_at_the_bound_and_a_pass_evicts_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 10_000).unwrap();
        let space = Space::open(dir.path(), None, true);
        assert!(matches!(reserve(&space, 1), Reservation::Full), "no ledger yet: count first");
        space.pass(false).unwrap().unwrap();
        let shard = dir.path().join("blocks/00");
        fs::create_dir_all(&shard).unwrap();
        let mut grant = None;
        for i in 0..5u64 {
            let (reservation, granted) = space.grant("writer", grant.take(), 2000);
            assert!(matches!(reservation, Reservation::Granted));
            let mut granted = granted.unwrap();
            assert!(granted.spend(2000) && !granted.spend(1));
            grant = Some(granted);
            let file = shard.join(format!("{i:016x}-0"));
            fs::write(&file, vec![0u8; 2000]).unwrap();
            let at = UNIX_EPOCH + Duration::from_secs(1_000_000 + i);
            fs::File::options().write(true).open(&file).unwrap().set_modified(at).unwrap();
        }
        assert!(matches!(reserve(&space, 1), Reservation::Full));
        space.settle("writer", &grant.unwrap());
        assert_eq!(summary(dir.path()).unwrap(), Summary { bytes: 10_000, blocks: 5, ..summary(dir.path()).unwrap() });
        let pass = space.pass(false).unwrap().unwrap();
        assert_eq!((pass.evicted_blocks, pass.blocks, pass.bytes), (1, 4, 8000));
        assert!(!shard.join(format!("{:016x}-0", 0)).exists(), "the oldest block goes first");
        assert_eq!(summary(dir.path()).unwrap().bytes, 8000);
        assert!(matches!(reserve(&space, 2000), Reservation::Granted));
        assert!(matches!(reserve(&space, 1), Reservation::Full));
    }

    #[test]
    fn a_grant_counts_in_full_through_a_pass_until_settled_or_expired_and_is_settled_once() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 10_000).unwrap();
        let space = Space::open(dir.path(), None, true);
        space.pass(false).unwrap().unwrap();
        let (_, grant) = space.grant("writer", None, 4000);
        let mut grant = grant.unwrap();
        assert!(grant.spend(1500));
        // A pass that lists the directory before the block's file is there still counts it.
        space.pass(false).unwrap().unwrap();
        assert_eq!(summary(dir.path()).unwrap().bytes, 4000);
        fs::create_dir_all(dir.path().join("blocks/00")).unwrap();
        fs::write(dir.path().join("blocks/00/0000000000000000-0"), vec![0u8; 1500]).unwrap();
        space.settle("writer", &grant);
        assert_eq!(summary(dir.path()).unwrap().bytes, 1500);
        // A holder that died without settling: its grant counts until it expires.
        let (_, dead) = space.grant("dead", None, 3000);
        space.pass(false).unwrap().unwrap();
        assert_eq!(summary(dir.path()).unwrap().bytes, 4500);
        let mut usage = summary(dir.path()).unwrap();
        usage.grants.insert("dead".into(), (3000, unix_now() - GRANT_EXPIRY.as_secs() - 1));
        replace_file(&dir.path().join(USAGE), &[&serde_json::to_vec(&usage).unwrap()]).unwrap();
        space.pass(false).unwrap().unwrap();
        assert_eq!(summary(dir.path()).unwrap().bytes, 1500);
        assert!(summary(dir.path()).unwrap().grants.is_empty());
        // Its holder was only idle, and settles it after all: the pass took it off already.
        space.settle("dead", &dead.unwrap());
        assert_eq!(summary(dir.path()).unwrap().bytes, 1500);
    }

    #[test]
    fn a_damaged_ledger_is_counted_again_before_anything_is_reserved() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 10_000).unwrap();
        let space = Space::open(dir.path(), None, true);
        fs::create_dir_all(dir.path().join("blocks/00")).unwrap();
        fs::write(dir.path().join("blocks/00/0000000000000000-0"), vec![0u8; 9000]).unwrap();
        // A writer killed in the middle of an update of an older cdpfs: an empty ledger.
        fs::write(dir.path().join(USAGE), b"").unwrap();
        assert!(matches!(reserve(&space, 2000), Reservation::Full), "an unreadable ledger passed for an empty one");
        space.pass(false).unwrap().unwrap();
        assert_eq!(summary(dir.path()).unwrap().bytes, 9000);
        assert!(matches!(reserve(&space, 1000), Reservation::Granted));
        assert!(matches!(reserve(&space, 1), Reservation::Full));
    }

    #[test]
    fn a_lock_left_by_a_dead_holder_is_taken_over_and_a_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = LockFile::try_take(&path, Duration::from_secs(60)).unwrap().unwrap();
        assert!(LockFile::try_take(&path, Duration::from_secs(60)).unwrap().is_none());
        std::mem::forget(held); // its holder died
        fs::File::options().write(true).open(&path).unwrap().set_modified(UNIX_EPOCH).unwrap();
        let taken = LockFile::try_take(&path, Duration::from_secs(60)).unwrap().unwrap();
        drop(taken);
        assert!(!path.exists());
    }

    #[test]
    fn suffixes_differ_with_the_same_host_and_pid() {
        assert_ne!(unique_suffix(), unique_suffix());
    }
}
