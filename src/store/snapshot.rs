//! Namespace snapshots: a bucket prefix listed once into one compact, checksummed file
//! (`cdpfs snapshot create`), served by a mount as its whole tree with no LIST at all
//! (`cdpfs mount --namespace FILE`).
//!
//! The file: magic, bucket, prefix, creation time, entry count, then one entry per object in
//! key order — the key front-coded against the previous one (bytes shared, then the rest), size,
//! ETag (a quoted MD5 hex ETag as its 16 bytes), mtime — and a CRC32C over everything before it.
//! Reads stay pinned to the snapshot's ETags, so an object changed since gives `ESTALE`, never
//! other bytes. One snapshot on the cluster file system serves every node: S3 is listed once.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};

use super::{ObjectMeta, ObjectStore, PrefixListing, StoreFuture};

const MAGIC: &[u8; 8] = b"CDPFSNS1";

/// Sub-prefixes listed at once while creating a snapshot.
const PARALLEL_LISTINGS: usize = 16;

/// A bucket prefix as listed at one time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The bucket listed.
    pub bucket: String,
    /// The prefix listed (empty or ending in `/`).
    pub prefix: String,
    /// When it was listed (Unix seconds).
    pub created: u64,
    /// Every object below the prefix, in key order.
    pub objects: Vec<ObjectMeta>,
}

impl Snapshot {
    /// Lists every object below `prefix` of `store` (one delimited listing of the prefix, then
    /// a flat listing of each sub-prefix, [`PARALLEL_LISTINGS`] at a time).
    pub async fn list(store: &dyn ObjectStore, bucket: &str, prefix: &str) -> Result<Snapshot> {
        let top = store.list_prefix(prefix).await.with_context(|| format!("listing s3://{bucket}/{prefix}"))?;
        let mut objects = top.objects;
        let below: Vec<Vec<ObjectMeta>> = futures_util::stream::iter(top.prefixes.iter().map(|sub| async move {
            store.list_all(sub).await.with_context(|| format!("listing s3://{bucket}/{sub}"))
        }))
        .buffer_unordered(PARALLEL_LISTINGS)
        .try_collect()
        .await?;
        objects.extend(below.into_iter().flatten());
        objects.retain(|o| !o.key.ends_with('/'));
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        objects.dedup_by(|a, b| a.key == b.key);
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Ok(Snapshot { bucket: bucket.to_owned(), prefix: prefix.to_owned(), created, objects })
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.objects.len() * 48);
        out.extend_from_slice(MAGIC);
        put_bytes(&mut out, self.bucket.as_bytes());
        put_bytes(&mut out, self.prefix.as_bytes());
        put_varint(&mut out, self.created);
        put_varint(&mut out, self.objects.len() as u64);
        let mut previous: &[u8] = b"";
        for object in &self.objects {
            let key = object.key.as_bytes();
            let shared = key.iter().zip(previous).take_while(|(a, b)| a == b).count();
            put_varint(&mut out, shared as u64);
            put_bytes(&mut out, &key[shared..]);
            put_varint(&mut out, object.size);
            match md5_etag(&object.etag) {
                Some(digest) => {
                    out.push(1);
                    out.extend_from_slice(&digest);
                }
                None => {
                    out.push(0);
                    put_bytes(&mut out, object.etag.as_bytes());
                }
            }
            let mtime = object.mtime.duration_since(UNIX_EPOCH).unwrap_or_default();
            put_varint(&mut out, mtime.as_secs());
            put_varint(&mut out, u64::from(mtime.subsec_nanos()));
            previous = key;
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses a snapshot file's bytes; any damage is an error, never a wrong tree.
    pub fn decode(raw: &[u8]) -> Result<Snapshot> {
        let damaged = || anyhow::anyhow!("not an intact cdpfs namespace snapshot");
        let (body, crc) = raw.split_at_checked(raw.len().checked_sub(4).ok_or_else(damaged)?).ok_or_else(damaged)?;
        if !body.starts_with(MAGIC) || crc32c::crc32c(body).to_le_bytes() != crc {
            return Err(damaged());
        }
        let mut reader = Reader { rest: &body[MAGIC.len()..] };
        let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).map_err(|_| damaged());
        let bucket = text(reader.bytes().ok_or_else(damaged)?)?;
        let prefix = text(reader.bytes().ok_or_else(damaged)?)?;
        let created = reader.varint().ok_or_else(damaged)?;
        let count = reader.varint().ok_or_else(damaged)?;
        // Each entry takes at least 6 bytes: a count the file cannot hold reserves no memory.
        let mut objects = Vec::with_capacity(count.min(body.len() as u64 / 6) as usize);
        let mut key: Vec<u8> = Vec::new();
        for _ in 0..count {
            let shared = reader.varint().ok_or_else(damaged)? as usize;
            let suffix = reader.bytes().ok_or_else(damaged)?;
            if shared > key.len() {
                return Err(damaged());
            }
            key.truncate(shared);
            key.extend_from_slice(suffix);
            let size = reader.varint().ok_or_else(damaged)?;
            let etag = match reader.take(1).ok_or_else(damaged)?[0] {
                1 => {
                    let digest = reader.take(16).ok_or_else(damaged)?;
                    format!("\"{}\"", digest.iter().map(|b| format!("{b:02x}")).collect::<String>())
                }
                0 => text(reader.bytes().ok_or_else(damaged)?)?,
                _ => return Err(damaged()),
            };
            let secs = reader.varint().ok_or_else(damaged)?;
            let nanos = reader.varint().ok_or_else(damaged)?;
            let mtime = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(nanos.min(999_999_999));
            objects.push(ObjectMeta { key: text(&key)?, size, etag, mtime });
        }
        if !reader.rest.is_empty() || objects.windows(2).any(|w| w[0].key >= w[1].key) {
            return Err(damaged());
        }
        Ok(Snapshot { bucket, prefix, created, objects })
    }

    /// Writes the snapshot to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let target = dir.join(path.file_name().context("the snapshot path names no file")?);
        crate::cache::bound::replace_file(&target, &[&self.encode()])
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Reads the snapshot at `path`.
    pub fn load(path: &Path) -> Result<Snapshot> {
        let raw = std::fs::read(path).with_context(|| format!("reading the namespace snapshot {}", path.display()))?;
        Snapshot::decode(&raw).with_context(|| format!("{}", path.display()))
    }
}

/// The hex digest of a quoted 32-hex-digit ETag (S3's MD5 ETags), as bytes.
fn md5_etag(etag: &str) -> Option<[u8; 16]> {
    let hex = etag.strip_prefix('"')?.strip_suffix('"')?;
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut digest = [0u8; 16];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(digest)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.rest.split_at_checked(n)?;
        self.rest = tail;
        Some(head)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1)?[0];
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        self.take(len)
    }
}

/// A store whose listings come from a snapshot (no LIST is ever sent) and whose reads go to
/// `inner`, pinned to the snapshot's ETags.
pub struct SnapshotStore {
    objects: Vec<ObjectMeta>,
    inner: Arc<dyn ObjectStore>,
}

impl SnapshotStore {
    /// Serves `snapshot`'s tree, reading object data from `inner`.
    pub fn new(snapshot: Snapshot, inner: Arc<dyn ObjectStore>) -> SnapshotStore {
        SnapshotStore { objects: snapshot.objects, inner }
    }

    /// The objects whose keys start with `prefix`.
    fn below(&self, prefix: &str) -> &[ObjectMeta] {
        let start = self.objects.partition_point(|o| o.key.as_str() < prefix);
        let len = self.objects[start..].partition_point(|o| o.key.starts_with(prefix));
        &self.objects[start..start + len]
    }
}

impl ObjectStore for SnapshotStore {
    fn list_prefix<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, PrefixListing> {
        let mut listing = PrefixListing::default();
        let mut rest = self.below(prefix);
        while let Some(first) = rest.first() {
            match first.key[prefix.len()..].find('/') {
                Some(slash) => {
                    // A folder: every key below it is next in order; skip them all.
                    let folder = &first.key[..prefix.len() + slash + 1];
                    listing.prefixes.push(folder.to_owned());
                    rest = &rest[rest.partition_point(|o| o.key.starts_with(folder))..];
                }
                None => {
                    listing.objects.push(first.clone());
                    rest = &rest[1..];
                }
            }
        }
        Box::pin(async move { Ok(listing) })
    }

    fn list_all<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<ObjectMeta>> {
        let objects = self.below(prefix).to_vec();
        Box::pin(async move { Ok(objects) })
    }

    fn get_range<'a>(&'a self, object: &'a ObjectMeta, range: Range<u64>) -> StoreFuture<'a, Bytes> {
        self.inner.get_range(object, range)
    }

    fn reachable(&self) -> bool {
        self.inner.reachable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(key: &str, etag: &str) -> ObjectMeta {
        ObjectMeta {
            key: key.into(),
            size: key.len() as u64 * 1000,
            etag: etag.into(),
            mtime: UNIX_EPOCH + Duration::new(1_700_000_000, 123),
        }
    }

    fn snapshot(objects: Vec<ObjectMeta>) -> Snapshot {
        Snapshot { bucket: "b".into(), prefix: "".into(), created: 5, objects }
    }

    #[test]
    fn round_trip_and_any_damage_is_an_error() {
        let snap = snapshot(vec![
            object("a/b.json", "\"0123456789abcdef0123456789abcdef\""),
            object("a/b/c.mrc", "\"not-md5\""),
            object("a/b/d", ""),
            object("z", "synth:1-2"),
        ]);
        let raw = snap.encode();
        assert_eq!(Snapshot::decode(&raw).unwrap(), snap);
        for at in [0, 9, raw.len() / 2, raw.len() - 1] {
            let mut bad = raw.clone();
            bad[at] ^= 1;
            assert!(Snapshot::decode(&bad).is_err(), "a flipped byte at {at} passed");
        }
        assert!(Snapshot::decode(&raw[..raw.len() - 5]).is_err());
        assert!(Snapshot::decode(b"").is_err());
    }

    #[tokio::test]
    async fn listings_come_from_the_snapshot() {
        let keys = ["10000/a.json", "10000/TS_1/x.mrc", "10000/TS_1/y/z", "10000/TS_1.txt", "10001/q"];
        let mut objects: Vec<ObjectMeta> = keys.iter().map(|k| object(k, "\"e\"")).collect();
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        let inner: Arc<dyn ObjectStore> = Arc::new(crate::store::offline::OfflineStore::default());
        let store = SnapshotStore::new(snapshot(objects), inner);
        let root = store.list_prefix("").await.unwrap();
        assert_eq!(root.prefixes, ["10000/", "10001/"]);
        let dataset = store.list_prefix("10000/").await.unwrap();
        assert_eq!(dataset.prefixes, ["10000/TS_1/"]);
        let names: Vec<_> = dataset.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(names, ["10000/TS_1.txt", "10000/a.json"]);
        assert_eq!(store.list_all("10000/TS_1/").await.unwrap().len(), 2);
        assert!(store.list_prefix("nothing/").await.unwrap().objects.is_empty());
    }

    /// Size and speed at many keys shaped like the portal's (the 1M case:
    /// `CDPFS_SNAPSHOT_KEYS=1000000 cargo test --lib snapshot_of -- --nocapture`; with
    /// `CDPFS_SNAPSHOT_OUT=FILE` the snapshot is kept, for `cdpfs mount --bucket b --namespace FILE`).
    #[test]
    fn snapshot_of_many_keys_is_compact() {
        let count: usize = std::env::var("CDPFS_SNAPSHOT_KEYS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
        let objects: Vec<ObjectMeta> = (0..count)
            .map(|i| {
                let key = format!(
                    "{}/run_{:04}/Reconstructions/VoxelSpacing13.480/Tomograms/100/run.zarr/0/{}/{}/{}",
                    10000 + i / 100_000,
                    i / 1000 % 100,
                    i / 100 % 10,
                    i / 10 % 10,
                    i % 10
                );
                object(&key, &format!("\"{:032x}\"", i as u128 * 0x9e37_79b9_7f4a_7c15))
            })
            .collect();
        let mut sorted = objects;
        sorted.sort_by(|a, b| a.key.cmp(&b.key));
        let snap = snapshot(sorted);
        let started = std::time::Instant::now();
        let raw = snap.encode();
        let encoded = started.elapsed();
        let started = std::time::Instant::now();
        let back = Snapshot::decode(&raw).unwrap();
        let decoded = started.elapsed();
        eprintln!(
            "{count} keys: {} bytes ({:.1} per key), encoded in {encoded:?}, decoded in {decoded:?}",
            raw.len(),
            raw.len() as f64 / count as f64
        );
        assert_eq!(back.objects.len(), count);
        if let Some(path) = std::env::var_os("CDPFS_SNAPSHOT_OUT") {
            std::fs::write(path, &raw).unwrap();
        }
        assert!(raw.len() < count * 48, "{} bytes per key", raw.len() / count);
    }
}
