//! Access-pattern detection for one open file: is this read part of a sequential stream, and
//! how far ahead should we fetch?
//!
//! The first read, and any read far from where the last one ended, is *random*: it fetches
//! only what it needs, so reading an MRC header (offset 0) never pulls the whole file. The one
//! exception is a first read at offset 0 as large as the kernel's read-ahead: that is a program
//! reading the file from the start (zarr reading a chunk, `cp`), and it starts a stream at
//! once, with the initial window. Reads that
//! continue where the previous ones ended (allowing for the kernel's small reorderings of
//! concurrent readahead requests) are *sequential*, and the read-ahead window doubles with each
//! one up to a cap; a real seek resets it.

/// How far behind the end of the previous read a read may start and still count as sequential.
const BACKWARD_TOLERANCE: u64 = 1 << 20;
/// How far beyond it a read may start and still count as sequential.
const FORWARD_TOLERANCE: u64 = 16 << 20;
/// A first read at offset 0 at least this large starts a stream.
const STREAM_START: u64 = 512 << 10;

/// What the data path should do for one read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Fetch just the bytes asked for.
    Random,
    /// Fetch whole blocks, and this many bytes beyond the read in the background.
    Sequential { window: u64 },
}

/// Per-open-file pattern state.
#[derive(Debug)]
pub struct Prefetcher {
    initial_window: u64,
    max_window: u64,
    stream_end: Option<u64>,
    window: u64,
}

impl Prefetcher {
    /// A detector whose window starts at `initial_window` and grows to `max_window`.
    pub fn new(initial_window: u64, max_window: u64) -> Prefetcher {
        Prefetcher { initial_window, max_window: max_window.max(initial_window), stream_end: None, window: 0 }
    }

    /// Classifies a read of `len` bytes at `offset` and updates the state.
    pub fn on_read(&mut self, offset: u64, len: u64) -> Pattern {
        let end = offset + len;
        let sequential = match self.stream_end {
            Some(prev) => offset + BACKWARD_TOLERANCE >= prev && offset <= prev + FORWARD_TOLERANCE,
            None => offset == 0 && len >= STREAM_START,
        };
        if sequential {
            self.window = if self.window == 0 { self.initial_window } else { (self.window * 2).min(self.max_window) };
            // A reordered (earlier) request must not pull the stream back.
            self.stream_end = self.stream_end.max(Some(end));
            Pattern::Sequential { window: self.window }
        } else {
            self.window = 0;
            self.stream_end = Some(end);
            Pattern::Random
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn header_read_is_random_and_the_window_grows_while_sequential() {
        let mut p = Prefetcher::new(4 * MIB, 32 * MIB);
        assert_eq!(p.on_read(0, 1024), Pattern::Random);
        let windows: Vec<Pattern> = (0..6).map(|i| p.on_read(1024 + i * 128 * 1024, 128 * 1024)).collect();
        assert_eq!(windows, [4, 8, 16, 32, 32, 32].map(|w| Pattern::Sequential { window: w * MIB }).to_vec());
    }

    #[test]
    fn a_large_first_read_from_the_start_is_a_stream_but_a_small_one_is_not() {
        let mut whole = Prefetcher::new(4 * MIB, 32 * MIB);
        assert_eq!(whole.on_read(0, MIB), Pattern::Sequential { window: 4 * MIB });
        let mut header = Prefetcher::new(4 * MIB, 32 * MIB);
        assert_eq!(header.on_read(0, 16 * 1024), Pattern::Random);
        let mut elsewhere = Prefetcher::new(4 * MIB, 32 * MIB);
        assert_eq!(elsewhere.on_read(8 * MIB, MIB), Pattern::Random);
    }

    #[test]
    fn small_reorderings_stay_sequential_but_a_seek_resets() {
        let mut p = Prefetcher::new(MIB, 8 * MIB);
        p.on_read(0, 128 * 1024);
        assert!(matches!(p.on_read(256 * 1024, 128 * 1024), Pattern::Sequential { .. }));
        // The request for the hole arrives late.
        assert!(matches!(p.on_read(128 * 1024, 128 * 1024), Pattern::Sequential { .. }));
        assert!(matches!(p.on_read(384 * 1024, 128 * 1024), Pattern::Sequential { window } if window == 4 * MIB));
        assert_eq!(p.on_read(900 * MIB, 4096), Pattern::Random);
        assert_eq!(p.on_read(0, 4096), Pattern::Random);
        assert_eq!(p.on_read(4096, 4096), Pattern::Sequential { window: MIB });
    }
}
