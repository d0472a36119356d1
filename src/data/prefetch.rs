//! Access-pattern detection for one open file: is this read part of a sequential stream, and
//! how far ahead should we fetch?
//!
//! The first read, and any read far from where the last one ended, is *random*: it fetches
//! only what it needs, so reading an MRC header (offset 0) never pulls the whole file. The one
//! exception is a first read at offset 0 as large as the kernel's read-ahead: that is a program
//! reading the file from the start (zarr reading a chunk, `cp`), and it starts a stream at
//! once, with a window of [`WHOLE_FILE_WINDOW`] at least - except in a file read header first
//! ([`Prefetcher::reads_header_first`]: an MRC), where buffered I/O reads the header as a whole
//! buffer (`st_blksize`, 1 MiB: `mrcfile.open(header_only=True)`, RELION's and IMOD's `fread`
//! of 1024 bytes): there it fetches its own blocks and nothing beyond (so do the other requests
//! of the same buffer, through the page cache), and a read going on past that buffer makes the
//! stream one reading the file through (through the page cache, where the kernel may have made
//! the large request of a small read, a header read's stream). Reads that continue where the
//! previous ones ended (allowing for the kernel's small reorderings of concurrent readahead
//! requests) are *sequential*, and the read-ahead window is what the stream has consumed so
//! far (at least the initial window, at most the cap): after a seek it grows with what the
//! reader actually reads, never tens of MiB beyond it. A seek resets it. A stream whose first
//! read was at the start of the file and that large is a program reading the file through (an
//! HPC job, `cp`, `sha256sum`): its window is [`WHOLE_FILE_GROWTH`] times what it has
//! consumed, so it reaches the cap within its first few MiB instead of after hundreds (at 20
//! MB/s per connection, where the network and not the CPU is the limit, growing 1:1 kept a
//! cold 2.3 GB read at 0.80x of 32 GETs in flight; 64:1 reaches 0.95x). So does a stream that
//! began elsewhere once it has read [`ESTABLISHED_STREAM`] in a row (an HPC job's stripe), and one
//! that began with an MRC's header once it goes past the first section (`mrcfile` reading the
//! whole tomogram; the data path, which knows the sections, tells it:
//! [`Prefetcher::reads_through`]).
//!
//! The cap is a fair share of one read-ahead budget ([`StreamBudget`]): a lone stream may keep
//! the whole budget in flight (a WAN connection delivers a part at a time, so line rate takes
//! many parts at once), while N concurrent streams get 1/N of it each, so the blocks they read
//! ahead fit the memory tier together.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How far behind the end of the furthest read so far a read may start and still count as
/// sequential, once the stream has read that much: the kernel sends the requests of a `read()`
/// (1 MiB for many programs) and its read-ahead at once, and they arrive in any order. (A
/// single small random read has no requests in flight: a read behind it is a seek.)
pub(crate) const BACKWARD_TOLERANCE: u64 = 4 << 20;
/// How far beyond it a read may start and still count as sequential: the kernel sends a
/// stream's requests a request or two out of order, never more.
const FORWARD_TOLERANCE: u64 = 2 << 20;
/// A first read at offset 0 at least this large starts a stream: a read of the whole
/// read-ahead window (128 KiB unless raised; past the page cache, the program's read up to
/// 1 MiB), while a header read comes as a 16 KiB request (or the program's own size).
const STREAM_START: u64 = 128 << 10;

/// A read right after a large header read, and no longer than this, is the rest of the same
/// read (see [`Prefetcher::on_read`]): a page.
const BUFFER_TAIL: u64 = 4096;
/// The buffer of a buffered header read (the `st_blksize` the mount reports), as it comes through
/// the page cache: requests of the kernel's read-ahead size (256 KiB, at most 1 MiB) in any
/// order, and one more beyond it. (Past the page cache it is one request, and a page:
/// [`BUFFER_TAIL`].)
const HEADER_BUFFER: u64 = 1 << 20;

/// The smallest window of a stream that began at the start of the file: a program reading a
/// whole object (a Zarr chunk, `cp`, an HPC job) gets part-sized read-ahead at once.
const WHOLE_FILE_WINDOW: u64 = 64 << 20;
/// A stream that has read this much in a row, wherever it began, is reading the file through
/// (an HPC job's stripe of a tomogram): from then on it grows as one from the start of the file.
const ESTABLISHED_STREAM: u64 = 32 << 20;
/// How many times what it has consumed a stream from the start of the file reads ahead (up to
/// the cap): 4 MiB read from the start puts a whole share of the budget (256 MiB at the
/// default `--max-memory`) in flight; a program that reads the first MiB and stops (a file-type
/// sniffer) still starts only [`WHOLE_FILE_WINDOW`].
const WHOLE_FILE_GROWTH: u64 = 64;

/// The read-ahead budget shared by the streams of a mount: each stream's window is capped at
/// an equal share of it.
#[derive(Debug)]
pub struct StreamBudget {
    /// Bytes of read-ahead all streams together may ask for.
    total: u64,
    /// No stream's share is below this.
    floor: u64,
    /// Streams reading sequentially now.
    active: AtomicU64,
}

impl StreamBudget {
    /// A budget of `total` bytes, shared equally, but never below `floor` per stream.
    pub fn new(total: u64, floor: u64) -> Arc<StreamBudget> {
        Arc::new(StreamBudget { total: total.max(floor), floor, active: AtomicU64::new(0) })
    }

    /// One stream's share.
    fn share(&self) -> u64 {
        (self.total / self.active.load(Ordering::Relaxed).max(1)).max(self.floor)
    }
}

/// Where and how a stream began, which sets how its window grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// After a seek: the window is what the stream has consumed.
    Elsewhere,
    /// At the start of the file, with a header read: at least [`WHOLE_FILE_WINDOW`], then what it
    /// has consumed (the reader may go on to one MRC section, or through the file). A large first
    /// read in a file read header first (buffered I/O reading a header) sets `buffer_end`, where
    /// its requests end: the read's own end past the page cache, [`HEADER_BUFFER`] and one
    /// request more through it. A read going on past that reads the file through past the page
    /// cache; through it, it is a header read's stream (`None`).
    Header { buffer_end: Option<u64> },
    /// A program reading the file through: it began at the start of the file with a read of
    /// [`STREAM_START`] or more, or has shown it since (read [`ESTABLISHED_STREAM`] in a row,
    /// or gone past an MRC's first section after its header); [`WHOLE_FILE_GROWTH`] times what
    /// it has consumed.
    Through,
}

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
    budget: Arc<StreamBudget>,
    /// Whether this reader is counted as an active stream in the budget.
    counted: bool,
    /// How far the current stream has read, and how many bytes it has read.
    stream: Option<(u64, u64)>,
    /// How the current stream began.
    start: Start,
    /// The file is read header first: a large first read at its start is a header read too.
    header_first: bool,
    /// Reads come through the page cache, as the kernel's read-ahead requests, not as the
    /// program made them.
    paged: bool,
}

impl Prefetcher {
    /// A detector whose window starts at `initial_window` and grows to `max_window`, or to its
    /// share of `budget` if that is smaller.
    pub fn new(initial_window: u64, max_window: u64, budget: Arc<StreamBudget>) -> Prefetcher {
        let max_window = max_window.max(initial_window);
        let start = Start::Elsewhere;
        let (counted, header_first, paged) = (false, false, false);
        Prefetcher { initial_window, max_window, budget, counted, stream: None, start, header_first, paged }
    }

    /// Takes the file, if `header_first`, as one that programs read header first (an MRC): a
    /// large first read at its start does not start a stream by itself (see the module comment).
    pub fn reads_header_first(mut self, header_first: bool) -> Prefetcher {
        self.header_first = header_first;
        self
    }

    /// Takes the reads, if `paged`, as coming through the page cache: a read the program made
    /// may come as several requests of the kernel's read-ahead size, and one beyond.
    pub fn through_page_cache(mut self, paged: bool) -> Prefetcher {
        self.paged = paged;
        self
    }

    /// Counts this reader in the budget's active streams while it reads sequentially.
    fn count_as_stream(&mut self, streaming: bool) {
        if streaming != self.counted {
            match streaming {
                true => self.budget.active.fetch_add(1, Ordering::Relaxed),
                false => self.budget.active.fetch_sub(1, Ordering::Relaxed),
            };
            self.counted = streaming;
        }
    }

    /// Whether the current stream began with a header read at the start of the file (a small
    /// read, or in a file read header first a buffered one).
    pub fn began_with_header(&self) -> bool {
        matches!(self.start, Start::Header { .. })
    }

    /// Takes the current stream, which began with a header, as a program reading the file
    /// through (the data path saw it read past an MRC's first section, as `mrcfile` reading a
    /// whole tomogram does): its window grows as if its first read had been a large one.
    pub fn reads_through(&mut self) {
        if self.began_with_header() {
            self.start = Start::Through;
        }
    }

    /// Classifies a read of `len` bytes at `offset` and updates the state.
    pub fn on_read(&mut self, offset: u64, len: u64) -> Pattern {
        let end = offset + len;
        let sequential = match self.stream {
            Some((prev, consumed)) => {
                offset + BACKWARD_TOLERANCE.min(consumed) >= prev && offset <= prev + FORWARD_TOLERANCE
            }
            None => offset == 0 && len >= STREAM_START && !self.header_first,
        };
        if let (Start::Header { buffer_end: Some(buffer_end) }, Some((prev, consumed))) = (self.start, self.stream) {
            // Another request of a large header read, in whatever order the kernel sends them,
            // or the rest of it (a program's buffer that does not start on a page takes one
            // page more than a request holds, and the kernel sends that page as a request of
            // its own): its own blocks (a page alone, its bytes), nothing beyond.
            if end <= buffer_end || (sequential && len <= BUFFER_TAIL) {
                self.stream = Some((prev.max(end), consumed + len));
                return match len <= BUFFER_TAIL {
                    true => Pattern::Random,
                    false => Pattern::Sequential { window: 0 },
                };
            }
        }
        match self.stream {
            // A reordered (earlier) request must not pull the stream back.
            Some((prev, consumed)) if sequential => {
                self.stream = Some((prev.max(end), consumed + len));
                if let Start::Header { buffer_end: Some(_) } = self.start {
                    // Past the page cache, a program going on from a large read is reading the
                    // file through (`dd`, `cp`); through it, the kernel may have made a large
                    // request of a small read, so the reader may be 3dmod going on into the
                    // first section: a header read's stream (the data path sees a reader going
                    // past the first section and calls [`Prefetcher::reads_through`]).
                    self.start = match self.paged {
                        true => Start::Header { buffer_end: None },
                        false => Start::Through,
                    };
                }
            }
            _ => {
                self.stream = Some((end, len));
                self.start = match (offset, sequential) {
                    (0, true) => Start::Through,
                    // Through the page cache the first request is one of the buffer's: the
                    // others, and one beyond, follow.
                    (0, false) => Start::Header {
                        buffer_end: (self.header_first && len >= STREAM_START).then(|| match self.paged {
                            true => HEADER_BUFFER + len,
                            false => len,
                        }),
                    },
                    _ => Start::Elsewhere,
                };
            }
        }
        let (_, consumed) = self.stream.expect("set above");
        if consumed >= ESTABLISHED_STREAM {
            self.start = Start::Through;
        }
        self.count_as_stream(sequential);
        let cap = self.max_window.min(self.budget.share()).max(self.initial_window);
        let (floor, grown) = match self.start {
            Start::Through => (self.initial_window.max(WHOLE_FILE_WINDOW), consumed.saturating_mul(WHOLE_FILE_GROWTH)),
            Start::Header { .. } => (self.initial_window.max(WHOLE_FILE_WINDOW), consumed),
            Start::Elsewhere => (self.initial_window, consumed),
        };
        if sequential {
            Pattern::Sequential { window: grown.clamp(floor.min(cap), cap) }
        } else if matches!(self.start, Start::Header { buffer_end: Some(_) }) {
            // A large header read: its own blocks, kept as blocks (for a reader going on from
            // it, and for the disk tier), and nothing beyond them.
            Pattern::Sequential { window: 0 }
        } else {
            Pattern::Random
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.count_as_stream(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const KIB: u64 = 1 << 10;

    fn unbounded() -> Arc<StreamBudget> {
        StreamBudget::new(u64::MAX, 0)
    }

    #[test]
    fn concurrent_streams_share_the_budget() {
        let budget = StreamBudget::new(256 * MIB, 16 * MIB);
        let stream = |budget: &Arc<StreamBudget>| {
            let mut p = Prefetcher::new(MIB, 512 * MIB, budget.clone());
            p.on_read(0, MIB);
            p
        };
        let window = |p: &mut Prefetcher| match p.on_read(MIB, MIB) {
            Pattern::Sequential { window } => window,
            Pattern::Random => panic!("not sequential"),
        };
        let mut first = stream(&budget);
        let mut long = Prefetcher::new(MIB, 512 * MIB, budget.clone());
        let last = (0..400).map(|i| long.on_read(i * MIB, MIB)).last().unwrap();
        assert_eq!(last, Pattern::Sequential { window: 128 * MIB }, "two streams: half the budget each");
        drop(long);
        let lone = (2..300).map(|i| first.on_read(i * MIB, MIB)).last().unwrap();
        assert_eq!(lone, Pattern::Sequential { window: 256 * MIB }, "alone again: the whole budget");
        let mut others: Vec<Prefetcher> = (0..31).map(|_| stream(&budget)).collect();
        assert_eq!(window(&mut others[0]), 16 * MIB, "32 streams: never below the floor");
        first.on_read(900 * MIB, 4096);
        others.truncate(1);
        assert_eq!(budget.active.load(Ordering::Relaxed), 1, "a seek or a close leaves the streams");
    }

    #[test]
    fn header_read_is_random_and_the_window_follows_what_was_consumed() {
        let mut p = Prefetcher::new(MIB, 32 * MIB, unbounded());
        assert_eq!(p.on_read(0, 1024), Pattern::Random);
        let windows: Vec<u64> = (0..40)
            .map(|i| match p.on_read(1024 + i * 512 * KIB, 512 * KIB) {
                Pattern::Sequential { window } => window,
                Pattern::Random => panic!("read {i} was not sequential"),
            })
            .collect();
        assert_eq!(windows[0], WHOLE_FILE_WINDOW.min(32 * MIB), "a stream from the start of the file");
        assert_eq!(windows[39], WHOLE_FILE_WINDOW.min(32 * MIB));
        let mut after_seek = Prefetcher::new(MIB, 32 * MIB, unbounded());
        after_seek.on_read(100 * MIB, 4096);
        assert_eq!(
            after_seek.on_read(100 * MIB + 4096, 4096),
            Pattern::Sequential { window: MIB },
            "the initial window"
        );
        let fifth = (2..6).map(|i| after_seek.on_read(100 * MIB + i * 4096, 512 * KIB)).last().unwrap();
        assert_eq!(fifth, Pattern::Sequential { window: 4096 * 2 + 4 * 512 * KIB });
        // A reader that skips ahead gets read-ahead for what it reads, not for what it skips.
        let mut sparse = Prefetcher::new(64 * KIB, 32 * MIB, unbounded());
        sparse.on_read(MIB, 64 * KIB);
        let last = (2..21).map(|i| sparse.on_read(i * MIB, 64 * KIB)).last().unwrap();
        assert_eq!(last, Pattern::Sequential { window: 20 * 64 * KIB });
        assert_eq!(sparse.on_read(24 * MIB, 64 * KIB), Pattern::Random, "beyond the tolerance");
        let mut long = Prefetcher::new(MIB, 32 * MIB, unbounded());
        let last = (0..100).map(|i| long.on_read(i * MIB, MIB)).last().unwrap();
        assert_eq!(last, Pattern::Sequential { window: 32 * MIB }, "capped");
    }

    #[test]
    fn a_stream_from_the_start_reaches_the_cap_within_its_first_mibs_but_one_after_a_seek_does_not() {
        let budget = || StreamBudget::new(256 * MIB, 16 * MIB);
        let window = |p: &mut Prefetcher, offset: u64| match p.on_read(offset, MIB) {
            Pattern::Sequential { window } => window,
            Pattern::Random => panic!("not sequential"),
        };
        let mut whole = Prefetcher::new(MIB, 512 * MIB, budget());
        assert_eq!(window(&mut whole, 0), WHOLE_FILE_WINDOW, "a sniffer reading the first MiB");
        assert_eq!(window(&mut whole, MIB), WHOLE_FILE_WINDOW.max(2 * WHOLE_FILE_GROWTH * MIB));
        let fourth = (2..4).map(|i| window(&mut whole, i * MIB)).last().unwrap();
        assert_eq!(fourth, 256 * MIB, "the whole share after 4 MiB");
        let mut after_seek = Prefetcher::new(MIB, 512 * MIB, budget());
        after_seek.on_read(100 * MIB, 4096);
        let fourth = (0..4).map(|i| window(&mut after_seek, 100 * MIB + 4096 + i * MIB)).last().unwrap();
        assert_eq!(fourth, 4 * MIB + 4096, "what it has consumed");
        let established = (4..32).map(|i| window(&mut after_seek, 100 * MIB + 4096 + i * MIB)).last().unwrap();
        assert_eq!(established, 256 * MIB, "32 MiB in a row: reading through");
        let mut after_header = Prefetcher::new(MIB, 512 * MIB, budget());
        after_header.on_read(0, 1024);
        let fourth = (0..4).map(|i| window(&mut after_header, 1024 + i * MIB)).last().unwrap();
        assert_eq!(fourth, WHOLE_FILE_WINDOW, "a header, then maybe one MRC section");
        assert!(after_header.began_with_header());
        after_header.reads_through();
        assert_eq!(window(&mut after_header, 1024 + 4 * MIB), 256 * MIB, "past the first section: read through");
    }

    #[test]
    fn a_large_first_read_from_the_start_is_a_stream_but_a_small_one_is_not() {
        let mut whole = Prefetcher::new(4 * MIB, 32 * MIB, unbounded());
        assert_eq!(whole.on_read(0, MIB), Pattern::Sequential { window: WHOLE_FILE_WINDOW.min(32 * MIB) });
        let mut header = Prefetcher::new(4 * MIB, 32 * MIB, unbounded());
        assert_eq!(header.on_read(0, 16 * 1024), Pattern::Random);
        let mut elsewhere = Prefetcher::new(4 * MIB, 32 * MIB, unbounded());
        assert_eq!(elsewhere.on_read(8 * MIB, MIB), Pattern::Random);
    }

    #[test]
    fn in_a_file_read_header_first_a_large_first_read_is_a_header_read_and_a_read_past_its_buffer_streams() {
        let budget = || StreamBudget::new(256 * MIB, 16 * MIB);
        // `mrcfile.open(header_only=True)`: one buffered read of 1 MiB, then close; its buffer
        // does not start on a page, so the kernel sends the read as two requests.
        let mut header_only = Prefetcher::new(MIB, 512 * MIB, budget()).reads_header_first(true);
        assert_eq!(header_only.on_read(0, MIB - 16), Pattern::Sequential { window: 0 });
        assert_eq!(header_only.on_read(MIB - 16, 16), Pattern::Random);
        // The same read through the page cache (a view, a second pass): requests of the kernel's
        // read-ahead size in any order, and one beyond the buffer.
        let mut paged = Prefetcher::new(MIB, 512 * MIB, budget()).reads_header_first(true).through_page_cache(true);
        for offset in [0, 3, 1, 4, 2] {
            assert_eq!(paged.on_read(offset * 256 * KIB, 256 * KIB), Pattern::Sequential { window: 0 });
        }
        // Going on past it: a header read's stream (3dmod's first section, or `mrcfile.open()`
        // reading the voxels, which the data path then takes as reading the file through).
        assert_eq!(paged.on_read(5 * 256 * KIB, 256 * KIB), Pattern::Sequential { window: WHOLE_FILE_WINDOW });
        assert!(paged.began_with_header());
        // `dd`, `cp`, `mrcfile.open()` going on into the voxels: through from the second read.
        let mut through = Prefetcher::new(MIB, 512 * MIB, budget()).reads_header_first(true);
        through.on_read(0, MIB);
        assert_eq!(through.on_read(MIB, MIB), Pattern::Sequential { window: 2 * WHOLE_FILE_GROWTH * MIB });
        assert_eq!(through.on_read(2 * MIB, MIB), Pattern::Sequential { window: 3 * WHOLE_FILE_GROWTH * MIB });
        assert_eq!(through.on_read(3 * MIB, MIB), Pattern::Sequential { window: 256 * MIB });
        // With a kernel read-ahead of 1 MiB, the buffer as one request, and one beyond it.
        let mut paged_large =
            Prefetcher::new(MIB, 512 * MIB, budget()).reads_header_first(true).through_page_cache(true);
        assert_eq!(paged_large.on_read(0, MIB), Pattern::Sequential { window: 0 });
        assert_eq!(paged_large.on_read(MIB, MIB), Pattern::Sequential { window: 0 });
        // Past the page cache a read comes as the program made it: `dd bs=256k` streams from its
        // second read.
        let mut smaller = Prefetcher::new(MIB, 512 * MIB, budget()).reads_header_first(true);
        assert_eq!(smaller.on_read(0, 256 * KIB), Pattern::Sequential { window: 0 });
        assert!(matches!(smaller.on_read(256 * KIB, 256 * KIB), Pattern::Sequential { window } if window > 0));
        // 3dmod: the header through stdio, then a section elsewhere.
        let mut viewer = Prefetcher::new(MIB, 512 * MIB, budget()).reads_header_first(true);
        viewer.on_read(0, MIB);
        assert_eq!(viewer.on_read(600 * MIB, 6 * MIB), Pattern::Random);
        // A small header read stays a header, as in any file.
        let mut small = Prefetcher::new(MIB, 512 * MIB, budget()).reads_header_first(true);
        small.on_read(0, 1024);
        assert_eq!(small.on_read(1024, MIB), Pattern::Sequential { window: WHOLE_FILE_WINDOW });
        assert!(small.began_with_header());
    }

    #[test]
    fn a_read_behind_a_lone_random_read_is_a_seek_but_behind_a_stream_it_is_reordering() {
        let mut random = Prefetcher::new(MIB, 32 * MIB, unbounded());
        assert_eq!(random.on_read(100 * MIB, 64 * KIB), Pattern::Random);
        assert_eq!(random.on_read(99 * MIB, 64 * KIB), Pattern::Random, "1 MiB behind a lone 64 KiB read");
        let mut stream = Prefetcher::new(MIB, 32 * MIB, unbounded());
        stream.on_read(0, MIB);
        (1..8).for_each(|i| _ = stream.on_read(i * MIB, MIB));
        assert!(matches!(stream.on_read(5 * MIB, 256 * KIB), Pattern::Sequential { .. }), "a late request");
    }

    #[test]
    fn small_reorderings_stay_sequential_but_a_seek_resets() {
        let mut p = Prefetcher::new(MIB, 8 * MIB, unbounded());
        p.on_read(0, 128 * KIB);
        assert!(matches!(p.on_read(256 * KIB, 128 * KIB), Pattern::Sequential { .. }));
        // The request for the hole arrives late.
        assert!(matches!(p.on_read(128 * KIB, 128 * KIB), Pattern::Sequential { .. }));
        assert_eq!(p.on_read(384 * KIB, 4 * MIB), Pattern::Sequential { window: WHOLE_FILE_WINDOW.min(8 * MIB) });
        assert_eq!(p.on_read(900 * MIB, 4096), Pattern::Random);
        assert_eq!(p.on_read(900 * MIB + 4096, 4096), Pattern::Sequential { window: MIB });
        assert_eq!(p.on_read(0, 4096), Pattern::Random);
        assert_eq!(p.on_read(4096, 4096), Pattern::Sequential { window: WHOLE_FILE_WINDOW.min(8 * MIB) });
    }
}
