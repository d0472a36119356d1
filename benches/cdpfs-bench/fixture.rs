//! The benchmark's bucket as files on disk: generated once per bench run into a temporary folder
//! (deleted on drop) that the origin process serves. Owns the keys, the MRC's shape and header,
//! the deterministic noise the data is made of, and the ETag a file is served with.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use cdpfs::store::ObjectMeta;

use crate::pyramid;

pub const BUCKET: &str = "bench";
/// The main tomogram.
pub const MRC_KEY: &str = "10000/TS_026/Reconstructions/VoxelSpacing13.480/Tomograms/100/TS_026.mrc";
/// A whole Zarr level: `ZARR_LEVEL/0/{y}/{x}`, 4 x 4 chunk objects.
pub const ZARR_LEVEL: &str = "10000/TS_026/Reconstructions/VoxelSpacing13.480/Tomograms/100/TS_026.zarr/0";
/// One 256^3 float32 Zarr chunk object.
pub const BLOCK_KEY: &str = "10000/TS_026/Reconstructions/VoxelSpacing13.480/Tomograms/101/TS_026.zarr/0/0/0/0";
/// The dataset tree the walk case lists.
pub const DATASET: &str = "10001";
/// The same tomogram again (its own folder: the views' discovery stays out of the other cases),
/// with the binned pyramid levels beside it.
pub const PYRAMID: &str = "10002/TS_100/Reconstructions/VoxelSpacing13.480/Tomograms/100/TS_100";

/// Voxels of a float32 MRC.
#[derive(Clone, Copy, Debug)]
pub struct MrcShape {
    pub nx: u64,
    pub ny: u64,
    pub nz: u64,
}

impl MrcShape {
    /// Bytes of one XY section.
    pub fn section(&self) -> u64 {
        self.nx * self.ny * 4
    }

    /// Bytes of the whole file, header included.
    pub fn size(&self) -> u64 {
        1024 + self.section() * self.nz
    }

    /// An MRC2014 header: dimensions, mode 2 (float32), 13.48 A voxels, axis order, map id,
    /// machine stamp, version; statistics marked "not computed" (rms < 0).
    fn header(&self) -> Vec<u8> {
        let mut words = [0u32; 256];
        let dims = [self.nx, self.ny, self.nz].map(|n| n as u32);
        words[..3].copy_from_slice(&dims);
        words[3] = 2;
        words[7..10].copy_from_slice(&dims);
        for i in 0..3 {
            words[10 + i] = ((f64::from(dims[i]) * 13.48) as f32).to_bits();
            words[13 + i] = 90f32.to_bits();
            words[16 + i] = i as u32 + 1;
        }
        words[22] = 1; // ispg: a volume
        words[27] = 20140;
        words[52] = u32::from_le_bytes(*b"MAP ");
        words[53] = u32::from_le_bytes([0x44, 0x44, 0, 0]);
        words[54] = (-1f32).to_bits();
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

/// A xorshift64 generator: deterministic noise and seeded random choices.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `count` distinct numbers of `0..n` (all of them if `count >= n`), in random order.
    pub fn distinct(&mut self, n: u64, count: usize) -> Vec<u64> {
        let mut all: Vec<u64> = (0..n).collect();
        for i in (1..all.len()).rev() {
            all.swap(i, self.below(i as u64 + 1) as usize);
        }
        all.truncate(count);
        all
    }
}

/// What to generate.
pub struct Spec {
    pub mrc: MrcShape,
    /// Bytes of each of the 16 chunk objects of the Zarr level.
    pub zarr_chunk: u64,
    /// Bytes of the single block object.
    pub zarr_block: u64,
    /// Runs in the dataset tree.
    pub runs_dataset: usize,
    /// Whether to generate the pyramid (it takes a while; only the views case reads it).
    pub pyramid: bool,
}

/// The generated bucket.
pub struct Fixture {
    dir: tempfile::TempDir,
    sizes: BTreeMap<String, u64>,
    pub mrc: MrcShape,
    /// The Zarr level's chunk keys.
    pub zarr_chunks: Vec<String>,
    /// Pyramid levels 1 and 2 (empty without the pyramid).
    pub levels: Vec<pyramid::Level>,
    pub runs_dataset: usize,
}

impl Fixture {
    /// Writes the bucket into a new folder under the system's temporary directory (the same disk
    /// as the cache directories).
    pub fn create(spec: &Spec) -> Fixture {
        let dir = tempfile::Builder::new().prefix("cdpfs-bench-origin-").tempdir().unwrap();
        let mut fixture = Fixture {
            dir,
            sizes: BTreeMap::new(),
            mrc: spec.mrc,
            zarr_chunks: (0..16).map(|i| format!("{ZARR_LEVEL}/0/{}/{}", i / 4, i % 4)).collect(),
            levels: vec![],
            runs_dataset: spec.runs_dataset,
        };
        fixture.put_noise(MRC_KEY, &spec.mrc.header(), spec.mrc.size(), 1);
        for (i, key) in fixture.zarr_chunks.clone().iter().enumerate() {
            fixture.put_noise(key, &[], spec.zarr_chunk, 10 + i as u64);
        }
        fixture.put(&format!("{ZARR_LEVEL}/.zarray"), b"{}");
        fixture.put_noise(BLOCK_KEY, &[], spec.zarr_block, 30);
        fixture.put_dataset();
        fixture.link(MRC_KEY, &format!("{PYRAMID}.mrc"));
        if spec.pyramid {
            let (nx, nz) = (spec.mrc.nx, spec.mrc.nz);
            let levels = pyramid::add(&mut |key, data| fixture.put(&key, &data), &format!("{PYRAMID}.zarr"), nx, nz);
            fixture.levels = levels;
        }
        fixture
    }

    /// The folder the origin serves.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn size(&self, key: &str) -> u64 {
        self.sizes[key]
    }

    /// `key` as a listing shows it, with the ETag the origin serves (so raw GETs are pinned with
    /// `If-Match` like cdpfs's).
    pub fn object(&self, key: &str) -> ObjectMeta {
        let meta = fs::metadata(self.path(key)).unwrap();
        ObjectMeta {
            key: key.to_owned(),
            size: meta.len(),
            etag: format!("\"{}\"", etag(&meta)),
            mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.path().join(key)
    }

    fn create_file(&mut self, key: &str, size: u64) -> File {
        let path = self.path(key);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        self.sizes.insert(key.to_owned(), size);
        File::create(path).unwrap()
    }

    fn put(&mut self, key: &str, data: &[u8]) {
        self.create_file(key, data.len() as u64).write_all(data).unwrap();
    }

    /// Writes `len` bytes: `header`, then noise, 1 MiB of it at a time.
    fn put_noise(&mut self, key: &str, header: &[u8], len: u64, seed: u64) {
        let mut out = BufWriter::with_capacity(1 << 20, self.create_file(key, len));
        out.write_all(header).unwrap();
        let mut rng = Rng::new(seed);
        let mut left = len - header.len() as u64;
        let mut buf = Vec::with_capacity(1 << 20);
        while left > 0 {
            buf.clear();
            buf.extend((0..(1 << 17)).flat_map(|_| rng.next_u64().to_le_bytes()));
            let take = left.min(buf.len() as u64);
            out.write_all(&buf[..take as usize]).unwrap();
            left -= take;
        }
        out.flush().unwrap();
    }

    /// `to` is the same file as `from` (a hard link: no second copy on disk).
    fn link(&mut self, from: &str, to: &str) {
        fs::create_dir_all(self.path(to).parent().unwrap()).unwrap();
        fs::hard_link(self.path(from), self.path(to)).unwrap();
        self.sizes.insert(to.to_owned(), self.sizes[from]);
    }

    /// A dataset of `runs_dataset` runs, each with 5 small files in 7 folders, as on the portal.
    fn put_dataset(&mut self) {
        for run in 0..self.runs_dataset {
            let base = format!("{DATASET}/run_{run:03}");
            self.put(&format!("{base}/run_metadata.json"), b"{}");
            let tomo = format!("{base}/Reconstructions/VoxelSpacing13.480/Tomograms/100");
            self.put(&format!("{tomo}/tomogram_metadata.json"), b"{}");
            self.put(&format!("{tomo}/run_{run:03}.mrc"), b"MRC");
            let ann = format!("{base}/Reconstructions/VoxelSpacing13.480/Annotations/100");
            self.put(&format!("{ann}/ribosome-1.0.json"), b"{}");
            self.put(&format!("{ann}/ribosome-1.0_point.ndjson"), b"{}\n");
        }
    }
}

/// The ETag the origin serves a file with: stable while the file is unchanged (size and mtime).
pub fn etag(meta: &fs::Metadata) -> String {
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).unwrap_or_default();
    format!("{:x}-{:x}", meta.len(), mtime.as_nanos())
}
