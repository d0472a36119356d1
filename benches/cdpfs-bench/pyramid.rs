//! The benchmark tomogram's OME-Zarr pyramid, levels 1 and 2 (2x and 4x binned), stored the
//! way the portal stores them: Blosc lz4 with byte shuffle, 256^3 chunks with padded edge
//! chunks, nested keys. Level 0 is left out: the full-resolution MRC stands for it.

/// Chunk edge, as on the portal.
const CHUNK: u64 = 256;

/// One stored level: its folder and chunk keys.
pub struct Level {
    /// Voxels (z, y, x).
    pub shape: [u64; 3],
    /// Keys of its chunk objects.
    pub chunk_keys: Vec<String>,
}

/// Stores (with `put(key, bytes)`) `zarr` (a key prefix ending in `.zarr`) for a `nx` x `nx` x
/// `nz` float32 tomogram at 13.48 A/voxel, and returns levels 1 and 2.
pub fn add(put: &mut dyn FnMut(String, Vec<u8>), zarr: &str, nx: u64, nz: u64) -> Vec<Level> {
    let datasets: Vec<String> = (0..3)
        .map(|l| {
            let s = 13.48 * f64::from(1u32 << l);
            format!(
                r#"{{"path": "{l}", "coordinateTransformations": [{{"type": "scale", "scale": [{s}, {s}, {s}]}}]}}"#
            )
        })
        .collect();
    let zattrs = format!(
        r#"{{"multiscales": [{{"version": "0.4", "axes": [{{"name": "z"}}, {{"name": "y"}}, {{"name": "x"}}], "datasets": [{}]}}]}}"#,
        datasets.join(", ")
    );
    put(format!("{zarr}/.zattrs"), zattrs.into_bytes());
    put(format!("{zarr}/.zgroup"), br#"{"zarr_format": 2}"#.to_vec());
    (1..=2)
        .map(|level| {
            let shape = [(nz >> level).max(1), nx >> level, nx >> level];
            let zarray = format!(
                r#"{{"zarr_format": 2, "shape": [{}, {}, {}], "chunks": [{CHUNK}, {CHUNK}, {CHUNK}], "dtype": "<f4", "compressor": {{"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1, "blocksize": 0}}, "fill_value": 0, "order": "C", "filters": null, "dimension_separator": "/"}}"#,
                shape[0], shape[1], shape[2]
            );
            put(format!("{zarr}/{level}/.zarray"), zarray.into_bytes());
            let grid = shape.map(|n| n.div_ceil(CHUNK));
            let mut chunk_keys = Vec::new();
            for z in 0..grid[0] {
                for y in 0..grid[1] {
                    for x in 0..grid[2] {
                        let key = format!("{zarr}/{level}/{z}/{y}/{x}");
                        let origin = [z * CHUNK, y * CHUNK, x * CHUNK];
                        put(key.clone(), chunk(shape, origin, level * 1000 + z * 100 + y * 10 + x));
                        chunk_keys.push(key);
                    }
                }
            }
            Level { shape, chunk_keys }
        })
        .collect()
}

/// One compressed chunk at `origin` of an array of `shape`: noise with about 19 significant
/// bits per voxel (it compresses to roughly 80%, like reconstructed cryo-ET noise), zero padding
/// past the array's edges.
fn chunk(shape: [u64; 3], origin: [u64; 3], seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut voxels = vec![0f32; (CHUNK * CHUNK * CHUNK) as usize];
    for (i, voxel) in voxels.iter_mut().enumerate() {
        let i = i as u64;
        let (z, y, x) = (origin[0] + i / (CHUNK * CHUNK), origin[1] + i / CHUNK % CHUNK, origin[2] + i % CHUNK);
        if z < shape[0] && y < shape[1] && x < shape[2] {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *voxel = ((state >> 45) as f32 - 262_144.0) / 64.0;
        }
    }
    let raw: Vec<u8> = voxels.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut out = vec![0u8; raw.len() + 16];
    // SAFETY: both buffers are valid for the sizes passed; the compressor name is NUL-terminated.
    let n = unsafe {
        blosc_src::blosc_compress_ctx(
            5,
            1,
            4,
            raw.len(),
            raw.as_ptr().cast(),
            out.as_mut_ptr().cast(),
            out.len(),
            c"lz4".as_ptr(),
            0,
            2,
        )
    };
    assert!(n > 0, "blosc compression failed");
    out.truncate(n as usize);
    out
}
