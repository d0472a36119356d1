//! Disk tier: blocks persisted under a cache directory, bounded in size, checked on every read.
//!
//! Each block is one file `blocks/<xx>/<object-hash>-<index>` holding a header (magic, key,
//! ETag, index, block size, offset, length, CRC32C over data + key + ETag + index + block size)
//! and the data, so a block written with another block size never passes for this one. Files are written to
//! `tmp/` and renamed into place, so a reader (in this process, another process, or another
//! node sharing the directory) sees a whole block or none; anything that fails the check — a
//! torn write, a flipped bit, a hash collision — is deleted and treated as a miss. Eviction is
//! LRU by this process's view of the directory (scanned at start-up), keeping the total under
//! the configured size. Whether a block is on disk is answered from that in-memory index,
//! without touching the directory.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::Bytes;
use tracing::{debug, warn};

use super::BlockKey;

const MAGIC: &[u8; 8] = b"CDPFSB02";

/// The on-disk block store.
pub struct DiskCache {
    dir: PathBuf,
    capacity: u64,
    block_size: u64,
    index: Mutex<DiskIndex>,
    /// Set after a write failed (full disk, read-only directory): the tier then only reads.
    writes_failed: AtomicBool,
    temp_counter: AtomicU64,
}

struct DiskIndex {
    files: lru::LruCache<String, u64>,
    total: u64,
}

impl DiskCache {
    /// Opens (creating it `0700` if needed) the cache of `block_size` blocks under `dir`,
    /// bounded to `capacity` bytes.
    pub fn open(dir: &Path, capacity: u64, block_size: u64) -> std::io::Result<DiskCache> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        fs::create_dir_all(dir.join("blocks"))?;
        fs::create_dir_all(dir.join("tmp"))?;
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            capacity,
            block_size,
            index: Mutex::new(DiskIndex { files: lru::LruCache::unbounded(), total: 0 }),
            writes_failed: AtomicBool::new(false),
            temp_counter: AtomicU64::new(0),
        };
        cache.scan();
        Ok(cache)
    }

    /// Bytes of blocks this process knows to be on disk.
    pub fn used_bytes(&self) -> u64 {
        self.index.lock().expect("disk index poisoned").total
    }

    /// Loads the existing blocks into the LRU, oldest first, and trims to capacity.
    fn scan(&self) {
        let mut found: Vec<(SystemTime, String, u64)> = Vec::new();
        for shard in fs::read_dir(self.dir.join("blocks")).into_iter().flatten().flatten() {
            for file in fs::read_dir(shard.path()).into_iter().flatten().flatten() {
                let Ok(meta) = file.metadata() else { continue };
                let name = format!("{}/{}", shard.file_name().to_string_lossy(), file.file_name().to_string_lossy());
                found.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), name, meta.len()));
            }
        }
        found.sort();
        let mut index = self.index.lock().expect("disk index poisoned");
        for (_, name, size) in found {
            index.total += size;
            index.files.put(name, size);
        }
        self.evict(&mut index);
    }

    fn relative_name(key: &BlockKey) -> String {
        let hash = key.object_hash();
        format!("{:02x}/{hash:016x}-{}", hash >> 56, key.index)
    }

    /// Whether this process knows of a copy of the block on disk (from memory; not verified:
    /// [`DiskCache::read`] checks it).
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.index.lock().expect("disk index poisoned").files.contains(&Self::relative_name(key))
    }

    /// The block, if a valid copy is on disk.
    pub fn read(&self, key: &BlockKey) -> Option<Bytes> {
        let name = Self::relative_name(key);
        let path = self.dir.join("blocks").join(&name);
        let raw = fs::read(&path).ok()?;
        match decode(&raw, key, self.block_size) {
            Some(range) => {
                let mut index = self.index.lock().expect("disk index poisoned");
                // Back in the index if it had lost the file (the caller checked it was there).
                if index.files.get(&name).is_none() {
                    index.files.put(name, raw.len() as u64);
                    index.total += raw.len() as u64;
                }
                drop(index);
                Some(Bytes::from(raw).slice(range))
            }
            None => {
                warn!(path = %path.display(), "cached block failed its check; discarding it");
                let _ = fs::remove_file(&path);
                let mut index = self.index.lock().expect("disk index poisoned");
                if let Some(size) = index.files.pop(&name) {
                    index.total -= size;
                }
                None
            }
        }
    }

    /// Stores a block (atomically) and evicts old ones beyond capacity; false when it was not
    /// written. Failures only log.
    pub fn write(&self, key: &BlockKey, data: &[u8]) -> bool {
        if self.writes_failed.load(Ordering::Relaxed) {
            return false;
        }
        let name = Self::relative_name(key);
        let target = self.dir.join("blocks").join(&name);
        let temp = self.dir.join("tmp").join(format!(
            "{}.{}.{}",
            name.replace('/', "_"),
            std::process::id(),
            self.temp_counter.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| -> std::io::Result<u64> {
            fs::create_dir_all(target.parent().expect("block path has a parent"))?;
            let mut file = fs::File::create(&temp)?;
            let header = encode_header(key, data, self.block_size);
            file.write_all(&header)?;
            file.write_all(data)?;
            drop(file);
            fs::rename(&temp, &target)?;
            Ok((header.len() + data.len()) as u64)
        })();
        match result {
            Ok(size) => {
                let mut index = self.index.lock().expect("disk index poisoned");
                if let Some(old) = index.files.put(name, size) {
                    index.total -= old;
                }
                index.total += size;
                self.evict(&mut index);
                true
            }
            Err(e) => {
                let _ = fs::remove_file(&temp);
                if !self.writes_failed.swap(true, Ordering::Relaxed) {
                    warn!(dir = %self.dir.display(), error = %e, "cannot write to the disk cache; continuing with memory only");
                }
                false
            }
        }
    }

    fn evict(&self, index: &mut DiskIndex) {
        while index.total > self.capacity {
            let Some((name, size)) = index.files.pop_lru() else { break };
            index.total -= size;
            debug!(%name, "evicting cached block");
            let _ = fs::remove_file(self.dir.join("blocks").join(&name));
        }
    }
}

fn checksum(key: &BlockKey, data: &[u8], block_size: u64) -> u32 {
    let mut crc = crc32c::crc32c(data);
    crc = crc32c::crc32c_append(crc, key.object.key.as_bytes());
    crc = crc32c::crc32c_append(crc, key.object.etag.as_bytes());
    crc = crc32c::crc32c_append(crc, &key.index.to_le_bytes());
    crc32c::crc32c_append(crc, &block_size.to_le_bytes())
}

fn encode_header(key: &BlockKey, data: &[u8], block_size: u64) -> Vec<u8> {
    let mut header = Vec::with_capacity(64 + key.object.key.len() + key.object.etag.len());
    header.extend_from_slice(MAGIC);
    for field in [key.object.key.as_bytes(), key.object.etag.as_bytes()] {
        header.extend_from_slice(&(field.len() as u32).to_le_bytes());
        header.extend_from_slice(field);
    }
    header.extend_from_slice(&key.index.to_le_bytes());
    header.extend_from_slice(&block_size.to_le_bytes());
    header.extend_from_slice(&(key.index * block_size).to_le_bytes());
    header.extend_from_slice(&(data.len() as u64).to_le_bytes());
    header.extend_from_slice(&checksum(key, data, block_size).to_le_bytes());
    header
}

/// The data range of `raw` if it is a complete, intact copy of exactly `key`'s block.
fn decode(raw: &[u8], key: &BlockKey, block_size: u64) -> Option<std::ops::Range<usize>> {
    let mut rest = raw.strip_prefix(MAGIC)?;
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
    let crc = u32::from_le_bytes(take(4)?.try_into().ok()?);
    let same_block = stored_key == key.object.key.as_bytes()
        && stored_etag == key.object.etag.as_bytes()
        && index == key.index
        && stored_block_size == block_size
        && offset == key.index * block_size
        && len as u64 <= block_size;
    let start = raw.len() - rest.len();
    (same_block && rest.len() == len && checksum(key, rest, block_size) == crc).then_some(start..raw.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ObjectMeta;
    use std::sync::Arc;

    fn key(name: &str, index: u64) -> BlockKey {
        let object =
            ObjectMeta { key: name.into(), size: 1 << 30, etag: "\"etag\"".into(), mtime: SystemTime::UNIX_EPOCH };
        BlockKey { object: Arc::new(object), index }
    }

    fn block_file(dir: &Path, key: &BlockKey) -> PathBuf {
        dir.join("blocks").join(DiskCache::relative_name(key))
    }

    #[test]
    fn round_trip_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20, 1 << 16).unwrap();
        let k = key("a/b.mrc", 3);
        cache.write(&k, b"hello block");
        assert_eq!(cache.read(&k).unwrap(), &b"hello block"[..]);
        assert!(cache.read(&key("a/b.mrc", 4)).is_none());
        drop(cache);
        let reopened = DiskCache::open(dir.path(), 1 << 20, 1 << 16).unwrap();
        assert_eq!(reopened.read(&k).unwrap(), &b"hello block"[..]);
        assert!(reopened.used_bytes() > 11);
    }

    #[test]
    fn flipped_and_truncated_blocks_are_misses_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20, 1 << 16).unwrap();
        let k = key("x", 0);
        let data = vec![7u8; 4096];
        for damage in 0..3 {
            cache.write(&k, &data);
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
    fn a_block_of_another_etag_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20, 1 << 16).unwrap();
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
        assert!(DiskCache::open(dir.path(), 1 << 20, 4096).unwrap().write(&k, &[5u8; 4096]));
        // Same key, ETag and index, but the index now means another offset.
        let other = DiskCache::open(dir.path(), 1 << 20, 8192).unwrap();
        assert!(other.contains(&k), "the scan knows the file");
        assert!(other.read(&k).is_none());
        assert!(!block_file(dir.path(), &k).exists(), "the mismatched block was removed");
    }

    #[test]
    fn eviction_keeps_the_bound_and_drops_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 5 * 1100, 1 << 16).unwrap();
        let data = vec![1u8; 1000];
        for i in 0..5 {
            cache.write(&key("f", i), &data);
        }
        cache.read(&key("f", 0)); // most recently used now
        for i in 5..8 {
            cache.write(&key("f", i), &data);
            assert!(cache.used_bytes() <= 5 * 1100);
        }
        assert!(cache.read(&key("f", 0)).is_some(), "recently used block was evicted");
        assert!(cache.read(&key("f", 1)).is_none(), "least recently used block was kept");
        let on_disk: u64 = walkdir_size(&dir.path().join("blocks"));
        assert!(on_disk <= 5 * 1100, "{on_disk} bytes on disk");
    }

    fn walkdir_size(dir: &Path) -> u64 {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| if e.path().is_dir() { walkdir_size(&e.path()) } else { e.metadata().unwrap().len() })
            .sum()
    }

    #[test]
    fn unwritable_directory_degrades_to_no_writes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20, 1 << 16).unwrap();
        fs::remove_dir_all(dir.path().join("tmp")).unwrap();
        fs::write(dir.path().join("tmp"), b"not a dir").unwrap();
        let k = key("x", 0);
        cache.write(&k, b"data");
        assert!(cache.read(&k).is_none());
        assert!(cache.writes_failed.load(Ordering::Relaxed));
    }
}
