//! Blosc-1 frames: the items of a range, from only the parts of the frame that hold them.
//!
//! A frame is a 16-byte header, a table of block offsets, then blocks that decompress on their
//! own. So a read of a few XY sections of a 64 MB chunk needs the header, the table and the
//! blocks covering those items: the caller fetches just those byte ranges and c-blosc
//! (`blosc_getitem`, built from source by the `blosc-src` crate with lz4, zstd and zlib) decodes
//! them, byte and bit shuffle included.

use std::ops::Range;

/// Length of the frame header.
pub const HEADER_LEN: usize = 16;
/// Header flag: the frame stores the items uncompressed right after the header.
const MEMCPYED: u8 = 0x02;

/// The fields of a frame header that locate items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    flags: u8,
    typesize: usize,
    /// Decoded size in bytes.
    pub nbytes: usize,
    blocksize: usize,
    /// Size of the whole frame in bytes.
    pub cbytes: usize,
}

impl Frame {
    /// Parses the first [`HEADER_LEN`] bytes of a frame.
    pub fn parse(head: &[u8]) -> Result<Frame, String> {
        let head: &[u8; HEADER_LEN] =
            head.get(..HEADER_LEN).and_then(|h| h.try_into().ok()).ok_or("short Blosc header")?;
        let word = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("four bytes")) as usize;
        let frame = Frame {
            flags: head[2],
            typesize: usize::from(head[3]),
            nbytes: word(4),
            blocksize: word(8),
            cbytes: word(12),
        };
        if head[0] != 2 {
            return Err(format!("Blosc format version {} is not supported", head[0]));
        }
        let whole_items = frame.memcpyed() || frame.blocksize.is_multiple_of(frame.typesize.max(1));
        if frame.typesize == 0 || frame.blocksize == 0 || frame.nbytes > i32::MAX as usize || !whole_items {
            return Err("implausible Blosc header".into());
        }
        if !frame.memcpyed() && frame.cbytes < HEADER_LEN + 4 * frame.blocks() {
            return Err("Blosc frame too short for its block table".into());
        }
        Ok(frame)
    }

    fn memcpyed(&self) -> bool {
        self.flags & MEMCPYED != 0
    }

    fn blocks(&self) -> usize {
        self.nbytes.div_ceil(self.blocksize)
    }

    /// Bytes at the start of the frame needed before items can be located: header and table.
    pub fn prelude_len(&self) -> usize {
        if self.memcpyed() {
            HEADER_LEN
        } else {
            HEADER_LEN + 4 * self.blocks()
        }
    }

    /// The blocks (by number) holding the decoded bytes `bytes`.
    pub fn blocks_for(&self, bytes: Range<usize>) -> Result<Range<usize>, String> {
        if bytes.end > self.nbytes || bytes.is_empty() {
            return Err(format!("bytes {bytes:?} outside a {}-byte Blosc frame", self.nbytes));
        }
        Ok(bytes.start / self.blocksize..(bytes.end - 1) / self.blocksize + 1)
    }

    /// Decoded size of every block but the last.
    pub fn block_len(&self) -> usize {
        self.blocksize
    }

    /// The decoded bytes block `block` holds.
    fn decoded_range(&self, block: usize) -> Range<usize> {
        block * self.blocksize..((block + 1) * self.blocksize).min(self.nbytes)
    }

    /// Where the blocks `blocks` are stored in the frame, given the frame's first
    /// [`Frame::prelude_len`] bytes (the block table is read once for all of them).
    pub fn block_ranges(&self, prelude: &[u8], blocks: Range<usize>) -> Result<Vec<Range<usize>>, String> {
        if blocks.end > self.blocks() {
            return Err(format!("blocks {blocks:?} of a {}-block Blosc frame", self.blocks()));
        }
        if self.memcpyed() {
            let stored = |block| {
                let decoded = self.decoded_range(block);
                HEADER_LEN + decoded.start..HEADER_LEN + decoded.end
            };
            return Ok(blocks.map(stored).collect());
        }
        let starts = self.block_starts(prelude)?;
        // Threaded compressors write blocks in completion order: a block ends where the next
        // block in the file begins.
        let mut sorted = starts.clone();
        sorted.sort_unstable();
        let end_of = |start: usize| sorted.get(sorted.partition_point(|&s| s <= start)).copied().unwrap_or(self.cbytes);
        Ok(blocks.map(|block| starts[block]..end_of(starts[block])).collect())
    }

    fn block_starts(&self, prelude: &[u8]) -> Result<Vec<usize>, String> {
        let table = prelude.get(HEADER_LEN..self.prelude_len()).ok_or("short Blosc block table")?;
        let starts: Vec<usize> =
            table.chunks_exact(4).map(|w| u32::from_le_bytes(w.try_into().expect("four bytes")) as usize).collect();
        if starts.iter().any(|&s| s < self.prelude_len() || s >= self.cbytes) {
            return Err("Blosc block table points outside the frame".into());
        }
        Ok(starts)
    }

    /// Decodes block `block` from its stored bytes `data` (as [`Frame::block_ranges`] located
    /// them). CPU-bound: call it off the async threads.
    pub fn decode_block(&self, prelude: &[u8], block: usize, data: &[u8]) -> Result<Vec<u8>, String> {
        let decoded = self.decoded_range(block);
        if self.memcpyed() {
            return match data.len() == decoded.len() {
                true => Ok(data.to_vec()),
                false => Err("short stored block".into()),
            };
        }
        // A frame of this block alone: the header (with its size), a block table whose entry for
        // this block points just past the table (c-blosc reads no other entry for it), and the
        // block's bytes. c-blosc checks every offset against the size in the header.
        let table = 4 * self.blocks();
        let len = HEADER_LEN + table + data.len();
        let mut frame = vec![0u8; len];
        frame[..HEADER_LEN].copy_from_slice(prelude.get(..HEADER_LEN).ok_or("short prelude")?);
        frame[12..16].copy_from_slice(&u32::try_from(len).map_err(|_| "block too large")?.to_le_bytes());
        let entry = HEADER_LEN + 4 * block;
        frame[entry..entry + 4].copy_from_slice(&((HEADER_LEN + table) as u32).to_le_bytes());
        frame[HEADER_LEN + table..].copy_from_slice(data);
        let mut out = vec![0u8; decoded.len()];
        let (start, count) = (decoded.start / self.typesize, decoded.len() / self.typesize);
        // SAFETY: `frame` is exactly as long as its header says; `out` holds `count` items of
        // `typesize` bytes, the decoded size of this block.
        let got = unsafe {
            blosc_src::blosc_getitem(frame.as_ptr().cast(), start as i32, count as i32, out.as_mut_ptr().cast())
        };
        if got < 0 || got as usize != out.len() {
            return Err(format!("Blosc could not decode block {block} (code {got})"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Blosc frame of `data` (lz4, byte shuffle, 4-byte items) with small blocks.
    fn compress(data: &[u8], blocksize: usize, threads: i32) -> Vec<u8> {
        let mut out = vec![0u8; data.len() + 16];
        // SAFETY: buffers are valid for the sizes passed; the compressor name is NUL-terminated.
        let n = unsafe {
            blosc_src::blosc_compress_ctx(
                5,
                1,
                4,
                data.len(),
                data.as_ptr().cast(),
                out.as_mut_ptr().cast(),
                out.len(),
                c"lz4".as_ptr(),
                blocksize,
                threads,
            )
        };
        assert!(n > 0, "compression failed: {n}");
        out.truncate(n as usize);
        out
    }

    fn items(n: usize) -> Vec<u8> {
        (0..n as u32).flat_map(|i| (i.wrapping_mul(2654435761) >> 20).to_le_bytes()).collect()
    }

    /// Decodes `bytes` from `frame_bytes` the way views do: block by block, from only the
    /// blocks' stored bytes. Returns the bytes and how many stored bytes were needed.
    fn read(frame_bytes: &[u8], bytes: Range<usize>) -> Result<(Vec<u8>, usize), String> {
        let frame = Frame::parse(frame_bytes)?;
        let prelude = &frame_bytes[..frame.prelude_len()];
        let mut decoded = Vec::new();
        let mut stored = 0;
        let blocks = frame.blocks_for(bytes.clone())?;
        for (block, range) in blocks.clone().zip(frame.block_ranges(prelude, blocks.clone())?) {
            stored += range.len();
            decoded.extend(frame.decode_block(prelude, block, &frame_bytes[range])?);
        }
        let skip = bytes.start - blocks.start * frame.block_len();
        Ok((decoded[skip..skip + bytes.len()].to_vec(), stored))
    }

    #[test]
    fn ranges_decode_from_only_their_blocks() {
        let data = items(100_000);
        for threads in [1, 2] {
            let frame_bytes = compress(&data, 16_384, threads);
            let frame = Frame::parse(&frame_bytes).unwrap();
            assert_eq!((frame.nbytes, frame.cbytes), (data.len(), frame_bytes.len()));
            assert!(frame.blocks() > 4);
            for range in [0..4, 16_380..16_392, 40_000..120_000, 399_996..400_000, 0..400_000] {
                let (decoded, stored) = read(&frame_bytes, range.clone()).unwrap();
                assert_eq!(decoded, data[range.clone()], "{range:?}");
                assert!(stored <= frame_bytes.len());
                if range.len() <= 16 {
                    assert!(stored < frame_bytes.len() / 4, "{range:?} needed {stored} bytes");
                }
            }
        }
    }

    #[test]
    fn incompressible_frames_are_read_directly() {
        let data: Vec<u8> = (0..4096u32).flat_map(|i| (i.wrapping_mul(2654435761)).to_le_bytes()).collect();
        let mut frame_bytes = compress(&data, 0, 1);
        if frame_bytes[2] & MEMCPYED == 0 {
            // Force the stored-as-is form, which c-blosc also writes for noise.
            frame_bytes = [&frame_bytes[..16], &data[..]].concat();
            frame_bytes[2] |= MEMCPYED;
            frame_bytes[12..16].copy_from_slice(&((data.len() + 16) as u32).to_le_bytes());
        }
        assert_eq!(read(&frame_bytes, 100..200).unwrap().0, data[100..200]);
    }

    #[test]
    fn damaged_frames_are_errors_not_garbage() {
        let data = items(50_000);
        let frame_bytes = compress(&data, 16_384, 1);
        assert!(Frame::parse(&frame_bytes[..10]).is_err());
        let mut bad_version = frame_bytes.clone();
        bad_version[0] = 9;
        assert!(Frame::parse(&bad_version).is_err());
        let mut bad_table = frame_bytes.clone();
        bad_table[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read(&bad_table, 0..4).is_err());
        let mut bad_block = frame_bytes.clone();
        let frame = Frame::parse(&frame_bytes).unwrap();
        for b in &mut bad_block[frame.prelude_len()..] {
            *b = 0xff;
        }
        assert!(read(&bad_block, 0..4).is_err_and(|e| e.contains("decode")));
        assert!(read(&frame_bytes, 0..400_000).is_err());
    }
}
