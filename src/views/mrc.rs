//! MRC2014 headers for views: the 1024 bytes in front of a view's voxels.
//!
//! Statistics are not computed (that would need every voxel): the header says so the standard
//! way (`dmax < dmin`, `dmean < min`, `rms < 0`), which IMOD, RELION and mrcfile understand.

use super::zarr::Dtype;

/// Size of the main MRC header; views have no extended header.
pub const HEADER_LEN: u64 = 1024;

/// What a view's header describes.
#[derive(Clone, Debug)]
pub struct Geometry {
    /// Array shape (z, y, x).
    pub shape: [u64; 3],
    /// Element type.
    pub dtype: Dtype,
    /// Voxel size (z, y, x) in angstrom.
    pub voxel: [f64; 3],
    /// An image stack (tilt series, `ispg` 0) rather than a volume (`ispg` 1).
    pub stack: bool,
    /// Text for the first label (truncated to 80 ASCII characters).
    pub label: String,
}

/// The 1024-byte little-endian MRC2014 header of `geometry`.
pub fn header(geometry: &Geometry) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN as usize];
    let mut put = |word: usize, bytes: [u8; 4]| out[word * 4..word * 4 + 4].copy_from_slice(&bytes);
    let [nz, ny, nx] = geometry.shape.map(|n| i32::try_from(n).unwrap_or(i32::MAX));
    // Sampling: a stack samples one image per section.
    let mz = if geometry.stack { 1 } else { nz };
    let [vz, vy, vx] = geometry.voxel;
    for (word, value) in [(0, nx), (1, ny), (2, nz), (3, geometry.dtype.mrc_mode()), (7, nx), (8, ny), (9, mz)] {
        put(word, value.to_le_bytes());
    }
    // Cell dimensions (angstrom) and angles.
    let cell = [vx * f64::from(nx), vy * f64::from(ny), vz * f64::from(mz)];
    for (word, value) in [(10, cell[0]), (11, cell[1]), (12, cell[2]), (13, 90.0), (14, 90.0), (15, 90.0)] {
        put(word, (value as f32).to_le_bytes());
    }
    // Axis order x, y, z.
    for (word, value) in [(16, 1i32), (17, 2), (18, 3)] {
        put(word, value.to_le_bytes());
    }
    // Statistics not computed: dmin 0, dmax -1, dmean -2 (and rms -1 below).
    for (word, value) in [(19, 0f32), (20, -1.0), (21, -2.0), (54, -1.0)] {
        put(word, value.to_le_bytes());
    }
    put(22, i32::from(!geometry.stack).to_le_bytes());
    put(27, 20140i32.to_le_bytes()); // nversion
    put(52, *b"MAP ");
    put(53, [0x44, 0x44, 0, 0]); // little-endian machine stamp
    put(55, 1i32.to_le_bytes()); // nlabl
    let label: Vec<u8> =
        geometry.label.bytes().map(|b| if b.is_ascii_graphic() || b == b' ' { b } else { b'?' }).take(80).collect();
    out[224..224 + label.len()].copy_from_slice(&label);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(header: &[u8], i: usize) -> [u8; 4] {
        header[i * 4..i * 4 + 4].try_into().unwrap()
    }

    #[test]
    fn volume_header_fields() {
        let h = header(&Geometry {
            shape: [46, 158, 160],
            dtype: Dtype::F32,
            voxel: [53.92; 3],
            stack: false,
            label: "cdpfs: bin4 of a.zarr/2 é".into(),
        });
        assert_eq!(h.len(), 1024);
        let int = |i| i32::from_le_bytes(word(&h, i));
        let float = |i| f32::from_le_bytes(word(&h, i));
        assert_eq!((int(0), int(1), int(2), int(3)), (160, 158, 46, 2));
        assert_eq!((int(7), int(8), int(9)), (160, 158, 46));
        assert!((float(10) / 160.0 - 53.92).abs() < 1e-3);
        assert!((float(12) / 46.0 - 53.92).abs() < 1e-3);
        assert_eq!((int(16), int(17), int(18), int(22), int(23)), (1, 2, 3, 1, 0));
        assert!(float(20) < float(19) && float(54) < 0.0);
        assert_eq!(&h[208..212], b"MAP ");
        assert_eq!(int(55), 1);
        assert!(h[224..304].starts_with(b"cdpfs: bin4 of a.zarr/2 ??"));
    }

    #[test]
    fn stack_header_samples_one_section() {
        let h = header(&Geometry {
            shape: [41, 64, 64],
            dtype: Dtype::I8,
            voxel: [4.99, 9.98, 9.98],
            stack: true,
            label: String::new(),
        });
        let int = |i| i32::from_le_bytes(word(&h, i));
        assert_eq!((int(2), int(3), int(9), int(22)), (41, 0, 1, 0));
        assert!((f32::from_le_bytes(word(&h, 12)) - 4.99).abs() < 1e-4);
    }
}
