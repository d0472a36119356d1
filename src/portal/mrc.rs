//! Where the XY sections of the portal's MRC files lie (what a viewer reads at a time), for the
//! read path's section reads.

/// File names the MRC format goes by (`.mrc` on the portal; IMOD's stacks, aligned stacks and
/// reconstructions; RELION's particle stacks; maps).
const MRC_SUFFIXES: [&str; 6] = [".mrc", ".mrcs", ".st", ".ali", ".rec", ".map"];

/// Where the XY sections of an MRC file lie. A viewer (3dmod, napari, `mrcfile` slicing)
/// reads one whole section at a time, so a section is the natural unit to fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MrcSections {
    /// Offset of the first voxel (after the header and the extended header).
    pub data_start: u64,
    /// Bytes of one XY section (nx * ny * bytes per voxel).
    pub section_bytes: u64,
    /// Number of sections (nz).
    pub count: u64,
}

impl MrcSections {
    /// Length of the main MRC header, which holds everything [`MrcSections::parse`] needs.
    pub const HEADER_LEN: u64 = 1024;

    /// Whether `key` names an MRC file.
    pub fn is_mrc(key: &str) -> bool {
        let lower = key.to_ascii_lowercase();
        MRC_SUFFIXES.iter().any(|suffix| lower.ends_with(suffix))
    }

    /// The sections an MRC2014 header (at least its first 1024 bytes) describes in a file of
    /// `file_size` bytes; `None` for anything that does not add up.
    pub fn parse(header: &[u8], file_size: u64) -> Option<MrcSections> {
        let word =
            |n: usize| -> Option<i32> { Some(i32::from_le_bytes(header.get(n * 4..n * 4 + 4)?.try_into().ok()?)) };
        let positive = |n: usize| word(n).and_then(|v| u64::try_from(v).ok()).filter(|v| *v > 0);
        let (nx, ny, nz) = (positive(0)?, positive(1)?, positive(2)?);
        let voxel_bytes = match word(3)? {
            0 => 1,
            1 | 6 | 12 => 2,
            2 | 3 => 4,
            4 => 8,
            _ => return None,
        };
        let extended = u64::try_from(word(23)?).ok()?;
        let sections =
            MrcSections { data_start: Self::HEADER_LEN + extended, section_bytes: nx * ny * voxel_bytes, count: nz };
        let end = sections.section_bytes.checked_mul(nz)?.checked_add(sections.data_start)?;
        (end <= file_size).then_some(sections)
    }

    /// The byte range of the section holding `offset`, if it lies in the voxel data.
    pub fn section_at(&self, offset: u64) -> Option<std::ops::Range<u64>> {
        let z = offset.checked_sub(self.data_start)? / self.section_bytes;
        let start = self.data_start + z * self.section_bytes;
        (z < self.count).then_some(start..start + self.section_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(nx: i32, ny: i32, nz: i32, mode: i32, nsymbt: i32) -> Vec<u8> {
        let mut out = vec![0u8; 1024];
        for (word, value) in [(0, nx), (1, ny), (2, nz), (3, mode), (23, nsymbt)] {
            out[word * 4..word * 4 + 4].copy_from_slice(&value.to_le_bytes());
        }
        out
    }

    #[test]
    fn sections_of_a_float32_tomogram_with_an_extended_header() {
        let size = 1024 + 512 + 1260 * 1260 * 4 * 368;
        let s = MrcSections::parse(&header(1260, 1260, 368, 2, 512), size).unwrap();
        assert_eq!(s, MrcSections { data_start: 1536, section_bytes: 6_350_400, count: 368 });
        assert_eq!(s.section_at(0), None);
        assert_eq!(s.section_at(1535), None);
        assert_eq!(s.section_at(1536), Some(1536..1536 + 6_350_400));
        assert_eq!(s.section_at(1536 + 6_350_400 * 2 + 7), Some(1536 + 6_350_400 * 2..1536 + 6_350_400 * 3));
        assert_eq!(s.section_at(size), None);
    }

    #[test]
    fn headers_that_do_not_add_up_are_refused() {
        let size = 1024 + 64 * 64 * 2 * 10;
        assert!(MrcSections::parse(&header(64, 64, 10, 1, 0), size).is_some());
        assert!(MrcSections::parse(&header(64, 64, 10, 1, 0), size - 1).is_none(), "file too short");
        assert!(MrcSections::parse(&header(64, 64, 10, 101, 0), size).is_none(), "4-bit mode");
        assert!(MrcSections::parse(&header(-64, 64, 10, 1, 0), size).is_none());
        assert!(MrcSections::parse(&header(64, 64, 10, 1, -5), size).is_none());
        assert!(MrcSections::parse(&[0u8; 40], size).is_none(), "short header");
        assert!(
            MrcSections::is_mrc("a/TS_026.mrc") && MrcSections::is_mrc("b/TS.ST") && !MrcSections::is_mrc("c.json")
        );
    }
}
