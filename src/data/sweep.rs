//! Read-ahead across objects, for Zarr arrays: a program that reads a level's chunk objects
//! whole, one after another (zarr-python reads a selection chunk by chunk; dask and napari
//! workers each read their own), waits a first-byte round trip and a transfer per chunk. Once
//! readers have started on two chunks of one level (a read from a chunk's start: the whole chunk
//! follows), each chunk started makes cdpfs fetch the chunk the readers will want next, so that
//! it arrives while they read this one:
//! - after a step along the last axis (a sweep in C order, from one row into the next, or
//!   several readers sharing one), the next chunk in C order that no reader has started and
//!   none was fetched ahead (looking at most [`LOOK_PAST`] chunks on);
//! - after a step that left the last axis where it was (a column of chunks, every other z), the
//!   chunk one more such step on.
//!
//! Once more than [`DEEP_AFTER`] chunks of the level have been started, each chunk started
//! fetches two chunks not fetched yet: a lone reader copies a chunk out faster than its parts
//! arrive, so a long sweep runs ahead by one more chunk per chunk read, up to [`LOOK_PAST`]
//! (and no more than the cache's fetch slots hold: a quarter of `--max-memory`).
//!
//! A level no reader started a chunk of for [`IDLE`] is forgotten: a program that reads one
//! chunk of a level nobody is reading fetches nothing more. One that stops in its first chunks
//! has fetched one chunk too many, after a long sweep up to [`LOOK_PAST`], as has a long sweep
//! over part of each row at each row's end; a reader jumping between chunks at random wastes one
//! or two chunks per chunk it reads.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::cache::BlockCache;
use crate::store::ObjectMeta;
use crate::views::zarr;

/// Chunk objects larger than this are not fetched ahead (the portal's are 256^3 voxels: up to
/// 64 MiB as float32, a few MiB compressed).
const LARGEST_CHUNK: u64 = 64 << 20;

/// Chunks of one level remembered as started or fetched ahead.
const REMEMBERED_CHUNKS: usize = 1024;

/// A level with no chunk started for this long is no longer being swept.
const IDLE: Duration = Duration::from_secs(30);

/// Levels whose sweeps are followed at once.
const LEVELS: usize = 64;

/// Chunks of a level started before each chunk started fetches two chunks ahead instead of one.
const DEEP_AFTER: usize = 4;

/// How many chunks past a started one the next unstarted one is looked for.
const LOOK_PAST: usize = 16;

/// An object looked up, if there is one.
pub type Lookup<'a> = Pin<Box<dyn Future<Output = Option<Arc<ObjectMeta>>> + Send + 'a>>;

/// Where chunks lie (the namespace, which holds the listings).
pub trait ChunkOrder: Send + Sync {
    /// The chunk object after `key` in C order within its level, if any.
    fn next_chunk<'a>(&'a self, key: &'a str) -> Lookup<'a>;
    /// The chunk object `key`, if the bucket has it.
    fn chunk<'a>(&'a self, key: &'a str) -> Lookup<'a>;
}

/// Which chunk to fetch ahead.
#[derive(Debug, PartialEq, Eq)]
enum Guess {
    /// The next this many in C order no reader has started and none was fetched ahead.
    Next(usize),
    /// These, in order (a reader going by a stride).
    At(Vec<String>),
}

/// What became of a chunk of a level being swept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    /// Fetched ahead; no reader has started it yet.
    FetchedAhead,
    /// A reader has started reading it whole.
    Started,
}

/// One level's chunks started or fetched ahead lately.
struct LevelSweep {
    /// Paths (in the level) of the chunks started or fetched ahead, in the order first seen.
    seen: VecDeque<(String, Seen)>,
    /// Indices of the chunk started last.
    last: Option<Vec<u64>>,
    /// When a chunk was last started.
    active: Instant,
}

impl Default for LevelSweep {
    fn default() -> Self {
        LevelSweep { seen: VecDeque::new(), last: None, active: Instant::now() }
    }
}

impl LevelSweep {
    /// Records that chunk `chunk` is `now`; false when it was that already, or had been
    /// started (a chunk fetched ahead is started later; a started one is not fetched ahead).
    fn record(&mut self, chunk: &str, now: Seen) -> bool {
        match self.seen.iter_mut().find(|(seen, _)| seen == chunk) {
            Some((_, before)) if *before == Seen::FetchedAhead && now == Seen::Started => *before = now,
            Some(_) => return false,
            None => {
                if self.seen.len() == REMEMBERED_CHUNKS {
                    self.seen.pop_front();
                }
                self.seen.push_back((chunk.to_owned(), now));
            }
        }
        true
    }

    /// A reader has started chunk `chunk` (its path in the level): which chunk to fetch ahead,
    /// if any.
    fn start(&mut self, chunk: &str) -> Option<Guess> {
        if self.active.elapsed() > IDLE {
            *self = LevelSweep::default();
        }
        self.active = Instant::now();
        match self.record(chunk, Seen::Started) {
            true => self.guess(chunk),
            false => None,
        }
    }

    /// Which chunk to fetch ahead now that chunk `chunk` was started.
    fn guess(&mut self, chunk: &str) -> Option<Guess> {
        let indices = zarr::chunk_path_indices(chunk);
        let last = self.last.replace(indices.clone()).filter(|last| last.len() == indices.len())?;
        let step: Vec<i64> = indices.iter().zip(&last).map(|(&now, &then)| now as i64 - then as i64).collect();
        let started = self.seen.iter().filter(|(_, seen)| *seen == Seen::Started).count();
        let depth = if started > DEEP_AFTER { 2 } else { 1 };
        match step.last() {
            Some(0) if step.iter().any(|&d| d != 0) => {
                let steps_on = |k: i64| -> Option<String> {
                    let at: Option<Vec<u64>> =
                        indices.iter().zip(&step).map(|(&i, &d)| i.checked_add_signed(d * k)).collect();
                    Some(zarr::chunk_path_with(chunk, &at?))
                };
                let at: Vec<String> = (1..=depth as i64).map_while(steps_on).collect();
                (!at.is_empty()).then_some(Guess::At(at))
            }
            Some(0) | None => None,
            Some(_) => Some(Guess::Next(depth)),
        }
    }
}

/// The sweeps through Zarr levels going on in a mount.
pub struct ChunkSweeps {
    order: OnceLock<Weak<dyn ChunkOrder>>,
    levels: Mutex<lru::LruCache<String, LevelSweep>>,
}

impl Default for ChunkSweeps {
    fn default() -> Self {
        ChunkSweeps {
            order: OnceLock::new(),
            levels: Mutex::new(lru::LruCache::new(LEVELS.try_into().expect("non-zero"))),
        }
    }
}

impl ChunkSweeps {
    /// Follows chunk order through `order` (set once; before it, nothing is fetched ahead).
    pub fn follow(&self, order: Weak<dyn ChunkOrder>) {
        let _ = self.order.set(order);
    }

    /// A reader has started reading `object` from its start: when it is a chunk of a level
    /// that is being swept, fetches the chunk the readers will want next (see the module's
    /// doc) in the background, if it is no larger than `limit` (the reader's read-ahead).
    pub fn started(self: &Arc<Self>, cache: &Arc<BlockCache>, object: &ObjectMeta, limit: u64) {
        let Some((level, chunk)) = zarr::chunk_of(&object.key) else { return };
        let guess = self
            .levels
            .lock()
            .expect("sweeps poisoned")
            .get_or_insert_mut(level.to_owned(), LevelSweep::default)
            .start(chunk);
        let (Some(guess), Some(order)) = (guess, self.order.get().and_then(Weak::upgrade)) else { return };
        let (sweeps, cache, level, started) = (self.clone(), cache.clone(), level.to_owned(), object.key.clone());
        tokio::spawn(async move {
            let fetch_ahead = |chunk: &Arc<ObjectMeta>| {
                let path = chunk.key.strip_prefix(level.as_str()).unwrap_or(&chunk.key);
                let fresh = (sweeps.levels.lock().expect("sweeps poisoned"))
                    .get_or_insert_mut(level.clone(), LevelSweep::default)
                    .record(path, Seen::FetchedAhead);
                if fresh && (1..=LARGEST_CHUNK.min(limit)).contains(&chunk.size) {
                    tracing::debug!(after = %started, next = %chunk.key, "fetching a chunk ahead");
                    cache.stats.chunks_fetched_ahead.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    cache.prefetch(chunk, 0..chunk.size.div_ceil(cache.block_size()));
                }
                fresh
            };
            match guess {
                Guess::At(chunks) => {
                    for chunk in chunks {
                        fetch_ahead(&order.chunk(&format!("{level}{chunk}")).await?);
                    }
                }
                Guess::Next(mut wanted) => {
                    let mut key = started.clone();
                    for _ in 0..LOOK_PAST {
                        let next = order.next_chunk(&key).await?;
                        wanted -= usize::from(fetch_ahead(&next));
                        if wanted == 0 {
                            break;
                        }
                        key = next.key.clone();
                    }
                }
            }
            Some(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_level_remembers_a_bounded_number_of_chunks_and_what_became_of_them() {
        let mut sweep = LevelSweep::default();
        assert!(sweep.record("0/0/0", Seen::Started));
        assert!(!sweep.record("0/0/0", Seen::Started), "read again");
        assert!(!sweep.record("0/0/0", Seen::FetchedAhead), "started already");
        assert!(sweep.record("0/0/1", Seen::FetchedAhead));
        assert!(!sweep.record("0/0/1", Seen::FetchedAhead), "fetched ahead already");
        assert!(sweep.record("0/0/1", Seen::Started), "a chunk fetched ahead is started later");
        (2..=REMEMBERED_CHUNKS).for_each(|i| assert!(sweep.record(&format!("0/0/{i}"), Seen::FetchedAhead)));
        assert_eq!(sweep.seen.len(), REMEMBERED_CHUNKS);
        assert!(sweep.record("0/0/0", Seen::Started), "the oldest was forgotten");
    }

    #[test]
    fn a_reader_by_rows_gets_the_next_chunk_and_one_by_a_stride_the_chunk_a_stride_on() {
        let mut rows = LevelSweep::default();
        assert_eq!(rows.guess("0/0/0"), None, "one chunk is no sweep");
        assert_eq!(rows.guess("0/0/1"), Some(Guess::Next(1)));
        assert_eq!(rows.guess("0/0/2"), Some(Guess::Next(1)), "along the last axis: C order");
        assert_eq!(rows.guess("0/1/0"), Some(Guess::Next(1)), "the next row");
        let mut column = LevelSweep::default();
        column.guess("0/0/3");
        assert_eq!(column.guess("0/1/3"), Some(Guess::At(vec!["0/2/3".into()])), "down a column");
        assert_eq!(column.guess("2/1/3"), Some(Guess::At(vec!["4/1/3".into()])), "a new step");
        let mut flat = LevelSweep::default();
        flat.guess("0.9.1");
        assert_eq!(flat.guess("2.9.1"), Some(Guess::At(vec!["4.9.1".into()])));
        let mut back = LevelSweep::default();
        back.guess("0/2/0");
        assert_eq!(back.guess("0/0/0"), None, "no chunk before the first");
    }

    #[test]
    fn a_chunk_started_again_guesses_nothing_and_an_idle_level_starts_over() {
        let mut sweep = LevelSweep::default();
        assert_eq!(sweep.start("0/0/0"), None);
        assert_eq!(sweep.start("0/0/1"), Some(Guess::Next(1)));
        assert_eq!(sweep.start("0/0/1"), None, "the same chunk again");
        sweep.active = Instant::now() - IDLE - Duration::from_secs(1);
        assert_eq!(sweep.start("0/0/2"), None, "a level idle for a while is no sweep any more");
        assert_eq!(sweep.start("0/0/0"), Some(Guess::Next(1)), "nor are its chunks started any more");
    }

    #[test]
    fn a_long_sweep_gets_two_chunks_ahead() {
        let mut rows = LevelSweep::default();
        let guesses: Vec<_> = (0..7).map(|x| rows.start(&format!("0/0/{x}"))).collect();
        assert_eq!(guesses[1..=3], [Some(Guess::Next(1)), Some(Guess::Next(1)), Some(Guess::Next(1))]);
        assert_eq!(
            guesses[4..],
            [Some(Guess::Next(2)), Some(Guess::Next(2)), Some(Guess::Next(2))],
            "from the fifth on"
        );
        let mut column = LevelSweep::default();
        (0..5).for_each(|z| _ = column.start(&format!("{z}/0/0")));
        assert_eq!(column.start("5/0/0"), Some(Guess::At(vec!["6/0/0".into(), "7/0/0".into()])));
        let mut back = LevelSweep::default();
        (0..4).for_each(|z| _ = back.start(&format!("{}/0/0", 5 - z)));
        assert_eq!(back.start("1/0/0"), Some(Guess::At(vec!["0/0/0".into()])), "not past the first");
    }
}
