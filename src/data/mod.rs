//! Data path: turns a read of (open file, offset, length) into bytes.
//!
//! Small objects (JSON, ndjson, small chunks) are fetched whole, once, as block 0. For larger
//! objects the per-file [`prefetch::Prefetcher`] decides: a random read (the first read, an MRC
//! header, a seek) is served from cached blocks when they are all there and otherwise by one
//! ranged GET of exactly the bytes asked for; a sequential read is served from whole blocks and
//! starts background fetches of the blocks in its read-ahead window, which follows what the
//! reader has consumed. Fetches share the block cache's fixed number of fetch slots: when all
//! are busy, windows are simply not filled, and the process does not grow.
//!
//! A large object's first pass may bypass the kernel's page cache ([`PageCache`]): its reads then
//! come as the program makes them, with no kernel read-ahead around them.
//!
//! A program reading a Zarr level's chunk objects from their starts, one after another, gets the
//! chunk it will want next fetched while it reads the current one ([`sweep`]).
//!
//! MRC files are read by XY section (3dmod, napari, `mrcfile` slicing): a large random read
//! in the voxel data fetches the whole section it falls in at once, as parallel block GETs in
//! one round trip, and read-ahead stays inside that section until the reader itself moves on
//! past the kernel's own read-ahead beyond it.

pub mod prefetch;
pub mod sweep;

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::cache::memory::BytesLru;
use crate::cache::{BlockCache, BlockKey};
use crate::portal::MrcSections;
use crate::store::{ObjectMeta, ObjectStore, StoreError};
use prefetch::{Pattern, Prefetcher, StreamBudget};
use sweep::{ChunkOrder, ChunkSweeps};

/// A random read at least this large in an MRC's voxel data is a section read: through the
/// page cache the kernel turns a read of a whole section into requests of its read-ahead size
/// (128 KiB by default, 1 MiB on a mount whose read-ahead cdpfs could raise), past it into 1 MiB
/// requests, while a small random read (a 64 KiB `pread`) comes as one request of its own size.
const SECTION_READ: u64 = 128 << 10;

/// How far past a fetched section the kernel's own read-ahead may read before cdpfs takes it
/// for a reader that moved on (the kernel keeps up to about two read-ahead windows in flight:
/// this allows for `--kernel-read-ahead 1M`).
const KERNEL_OVERSHOOT: u64 = 2 << 20;

/// Sections a reader may go on into one after the other before its reads are a stream (a
/// sequential reader that began in the middle of an MRC, or a viewer scrolling through z).
const SECTIONS_BEFORE_STREAMING: u32 = 4;

/// MRC headers remembered, per object version.
const SECTION_TABLES: usize = 4096;

/// Objects of at least one S3 part (tomograms, large Zarr chunks; not JSON or metadata) are read
/// past the kernel's page cache until their first pass is through (see [`PageCache::Auto`]).
/// Lowered from 64 MiB: a Zarr level of 32 MiB chunks read whole by 4 threads went from 0.50-0.55x
/// to 0.65-0.66x of raw GETs (bench group 6), the readers' page allocations and copies gone.
const STREAMED_OBJECT: u64 = crate::cache::PART_SIZE;

/// A read that failed is failed again, without a new request, by reads starting in the same
/// block this soon after: the kernel follows a failed read-ahead request of a file it reads
/// through the page cache with a request for the page the program wanted, at once. (Not when
/// S3 was unreachable and answers again.)
const FAILURE_ECHO: Duration = Duration::from_millis(500);

/// Recent failed reads remembered for [`FAILURE_ECHO`] (and versions found replaced).
const RECENT_FAILURES: usize = 1024;

/// The block number under which a version found replaced (`Changed`) is remembered: all of it.
const WHOLE_VERSION: u64 = u64::MAX;

/// Object versions whose first pass is tracked (128 GiB of distinct 8 MiB objects; an object
/// whose entry was dropped reads one more pass past the page cache).
const FIRST_PASSES: usize = 16384;

/// An object version, as the data path's tables know it: its key and ETag.
type Version = (String, String);

/// The version `object` is.
fn version_of(object: &ObjectMeta) -> Version {
    (object.key.clone(), object.etag.clone())
}

/// A large object version's first pass past the page cache.
#[derive(Default)]
struct FirstPass {
    /// Bytes served to handles that bypass the page cache, up to the object's size.
    served: u64,
    /// Read-ahead's marks of what the pass read were cleared for the first open keeping pages.
    marks_cleared: bool,
}

/// Whether reads of a file go through the kernel's page cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PageCache {
    /// A large object (8 MiB and up: one S3 part) is read past the page cache until cdpfs has served as
    /// many bytes of it as it holds (its first pass: a stream read once costs one copy less and
    /// no page-cache memory); opens after that keep its pages for re-reads. Small objects always
    /// keep them.
    Auto,
    /// Every open keeps its pages in the page cache.
    Always,
}

/// Tuning of the read path.
#[derive(Clone, Copy, Debug)]
pub struct DataConfig {
    /// Objects up to this size are fetched whole on first read.
    pub small_object: u64,
    /// First read-ahead window of a sequential stream.
    pub initial_window: u64,
    /// Read-ahead of all streams together: each stream's window is capped at its share.
    pub read_ahead_budget: u64,
    /// The kernel's read-ahead on the mount: how far past a section it will ask.
    pub kernel_read_ahead: u64,
    /// Which opens go through the kernel's page cache.
    pub page_cache: PageCache,
    /// Memory for the bytes of recent reads fetched exactly (not as blocks): a header read
    /// again past the page cache is answered from here.
    pub exact_read_memory: u64,
}

/// One open file: the object version it reads and its access-pattern state.
pub struct OpenFile {
    /// The object version this handle reads (pinned at open).
    pub object: Arc<ObjectMeta>,
    /// Its reads bypass the kernel's page cache (`FOPEN_DIRECT_IO`): they come as the program
    /// makes them (split into 1 MiB requests), without the kernel's read-ahead, and leave no
    /// pages behind (unless the file is also mapped: faults go through the page cache).
    pub bypasses_page_cache: bool,
    state: Mutex<StreamState>,
}

struct StreamState {
    prefetcher: Prefetcher,
    /// First block not yet handed to a background fetch in the current stream.
    next_unrequested: u64,
    /// End of the MRC section a section read fetched: read-ahead stays below it until the
    /// reader goes past it by more than [`KERNEL_OVERSHOOT`].
    fence: Option<u64>,
    /// Requests wholly past the fence since it was set.
    past_fence: u32,
    /// Sections the reader went on into, one after the other, since its last seek.
    sections_in_a_row: u32,
    /// Blocks below this one that the stream has read are no longer kept in memory.
    released: u64,
}

/// Reads object bytes through the block cache and the object store.
pub struct DataPath {
    store: Arc<dyn ObjectStore>,
    cache: Arc<BlockCache>,
    config: DataConfig,
    budget: Arc<StreamBudget>,
    /// The section layout of MRC objects seen so far (`None`: not an MRC that adds up).
    sections: Mutex<lru::LruCache<Version, Option<MrcSections>>>,
    /// The kernel maps files that bypass its page cache (`FUSE_DIRECT_IO_ALLOW_MMAP`, Linux
    /// 6.6 and later): without it they could not be `mmap`ed shared, so none bypasses it.
    bypass_allowed: AtomicBool,
    /// Bytes served to handles that bypass the page cache, per object version, up to its size.
    first_passes: Mutex<lru::LruCache<Version, FirstPass>>,
    /// The bytes recent exact reads fetched, by object version and start (see
    /// [`DataPath::read_exact`]).
    exact_reads: BytesLru<(Version, u64)>,
    /// Zarr levels whose chunks are being read whole one after another.
    sweeps: Arc<ChunkSweeps>,
    /// Reads that failed lately, by object version and the block they started in.
    recent_failures: Mutex<lru::LruCache<(Version, u64), (Instant, StoreError)>>,
}

impl DataPath {
    /// A data path over `cache`, fetching through `store`.
    pub fn new(store: Arc<dyn ObjectStore>, cache: Arc<BlockCache>, config: DataConfig) -> DataPath {
        let sections = Mutex::new(lru::LruCache::new(SECTION_TABLES.try_into().expect("non-zero")));
        let budget = StreamBudget::new(config.read_ahead_budget, cache.part_size());
        let first_passes = Mutex::new(lru::LruCache::new(FIRST_PASSES.try_into().expect("non-zero")));
        let bypass_allowed = AtomicBool::new(false);
        let exact_reads = BytesLru::new(config.exact_read_memory);
        let sweeps = Arc::default();
        let recent_failures = Mutex::new(lru::LruCache::new(RECENT_FAILURES.try_into().expect("non-zero")));
        DataPath {
            store,
            cache,
            config,
            budget,
            sections,
            bypass_allowed,
            first_passes,
            exact_reads,
            sweeps,
            recent_failures,
        }
    }

    /// Lets the data path find the chunk a Zarr level's readers will want next through `order`
    /// (see [`sweep`]); until then, no chunk is fetched ahead.
    pub fn follow_chunk_order(&self, order: Weak<dyn ChunkOrder>) {
        self.sweeps.follow(order);
    }

    /// Lets large objects' first passes bypass the page cache (the kernel can map such files).
    pub fn allow_page_cache_bypass(&self) {
        self.bypass_allowed.store(true, Ordering::Relaxed);
    }

    /// The block cache (for statistics).
    pub fn cache(&self) -> &BlockCache {
        &self.cache
    }

    /// The read-ahead policy's state for one new reader (of a file or an MRC view) whose
    /// window may grow to `max_window`, or to its share of the read-ahead budget if that is less.
    pub fn prefetcher(&self, max_window: u64) -> Prefetcher {
        Prefetcher::new(self.config.initial_window, max_window, self.budget.clone())
    }

    /// Starts reading `object`.
    pub fn open(&self, object: Arc<ObjectMeta>) -> OpenFile {
        let bypasses_page_cache = self.config.page_cache == PageCache::Auto
            && self.bypass_allowed.load(Ordering::Relaxed)
            && object.size >= STREAMED_OBJECT
            && self.in_first_pass(&object);
        let prefetcher = self
            .prefetcher(u64::MAX)
            .reads_header_first(MrcSections::is_mrc(&object.key))
            .through_page_cache(!bypasses_page_cache);
        OpenFile {
            object,
            bypasses_page_cache,
            state: Mutex::new(StreamState {
                prefetcher,
                next_unrequested: 0,
                fence: None,
                past_fence: 0,
                sections_in_a_row: 0,
                released: 0,
            }),
        }
    }

    /// Up to `len` bytes of the file from `offset`; fewer at the end, none past it.
    pub async fn read(self: &Arc<Self>, file: &OpenFile, offset: u64, len: u32) -> Result<Slices, StoreError> {
        self.unless_failed_just_now(&file.object, offset, self.read_anew(file, offset, len)).await
    }

    /// What `read` (of `object` from `offset`: a file's or an MRC view's) gives, unless a read
    /// starting in the same block failed within [`FAILURE_ECHO`], or S3 said this version was
    /// replaced: then that failure again, without asking S3.
    pub async fn unless_failed_just_now(
        &self,
        object: &ObjectMeta,
        offset: u64,
        read: impl Future<Output = Result<Slices, StoreError>>,
    ) -> Result<Slices, StoreError> {
        let block = offset / self.cache.block_size();
        {
            let mut failures = self.recent_failures.lock().expect("recent failures poisoned");
            // Nearly always empty: a read then builds no key (this is every read's path).
            if !failures.is_empty() {
                let version = version_of(object);
                // A version found replaced stays replaced: every read of it fails so, at once.
                if let Some((_, error)) = failures.get(&(version.clone(), WHOLE_VERSION)) {
                    return Err(error.clone());
                }
                if let Some((at, error)) = failures.get(&(version, block)) {
                    let back = matches!(error, StoreError::Unreachable(_)) && self.store.reachable();
                    if at.elapsed() < FAILURE_ECHO && !back {
                        return Err(error.clone());
                    }
                }
            }
        }
        let result = read.await;
        if let Err(error) = &result {
            let block = if matches!(error, StoreError::Changed(_)) { WHOLE_VERSION } else { block };
            let mut failures = self.recent_failures.lock().expect("recent failures poisoned");
            failures.put((version_of(object), block), (Instant::now(), error.clone()));
        }
        result
    }

    /// [`DataPath::read`], asking the cache and S3.
    async fn read_anew(self: &Arc<Self>, file: &OpenFile, offset: u64, len: u32) -> Result<Slices, StoreError> {
        let object = &file.object;
        let range = clamp(object.size, offset, len);
        if range.is_empty() {
            return Ok(Slices::default());
        }
        let block_size = self.cache.block_size();
        let blocks = self.cache.blocks_covering(&range);
        if object.size <= self.config.small_object.min(block_size) {
            if range.start == 0 {
                self.sweeps.started(&self.cache, object, self.config.small_object);
            }
            return self.read_blocks(object, blocks, range).await;
        }
        let (pattern, moved_on) = {
            let mut state = file.state.lock().expect("stream state poisoned");
            // A stream that began with an MRC's header and has gone past its first section
            // (more than the kernel's read-ahead past it) is reading the tomogram through.
            if state.prefetcher.began_with_header()
                && self
                    .known_sections(object)
                    .is_some_and(|s| range.start >= s.data_start + s.section_bytes + KERNEL_OVERSHOOT)
            {
                state.prefetcher.reads_through();
            }
            let pattern = state.prefetcher.on_read(range.start, range.end - range.start);
            // The kernel reads ahead past a section with one request at most; a second request
            // wholly past it (the first, past the page cache) is the reader going on into the
            // next section (3dmod scrolling through z), which gets that section whole.
            if state.fence.is_some_and(|fence| range.start >= fence) {
                state.past_fence += 1;
            }
            let kernel_requests_past = u32::from(!file.bypasses_page_cache);
            let mut moved_on = state.past_fence > kernel_requests_past && matches!(pattern, Pattern::Sequential { .. });
            if moved_on {
                state.sections_in_a_row += 1;
                // A reader going through section after section is a stream: read ahead freely.
                if state.sections_in_a_row > SECTIONS_BEFORE_STREAMING {
                    (state.fence, state.past_fence, moved_on) = (None, 0, false);
                }
            } else if pattern == Pattern::Random {
                state.sections_in_a_row = 0;
            }
            (pattern, moved_on)
        };
        let bytes = match pattern {
            Pattern::Sequential { .. } if moved_on => self.read_from_here(file, object, blocks, range.clone()).await?,
            Pattern::Sequential { window } => {
                let (ahead, past_fence) = {
                    let mut state = file.state.lock().expect("stream state poisoned");
                    // Read-ahead goes out in aligned steps as large as the window (whole parts
                    // once it spans one), so its GETs grow with the stream.
                    let step = prev_power_of_two(window).clamp(block_size, self.cache.part_size());
                    let mut window_end = (range.end + window).div_ceil(step).saturating_mul(step).min(object.size);
                    let mut past_fence = false;
                    match state.fence {
                        Some(fence) if range.end <= fence + KERNEL_OVERSHOOT => {
                            window_end = window_end.min(fence);
                            past_fence = range.end > fence;
                        }
                        _ => state.fence = None,
                    }
                    // The read's own blocks too, when nothing asked for them yet: they come
                    // with the run that follows them rather than by GETs of their own.
                    let ahead = state.next_unrequested.max(blocks.start)..window_end.div_ceil(block_size);
                    (ahead, past_fence)
                };
                if !ahead.is_empty() {
                    // What found no fetch slot is asked for again by the next read.
                    let requested = self.cache.prefetch(object, ahead);
                    let mut state = file.state.lock().expect("stream state poisoned");
                    state.next_unrequested = state.next_unrequested.max(requested);
                }
                if range.start == 0 {
                    // A reader starting on a Zarr chunk: after its own read-ahead, the next
                    // chunk, if it fits in a window like this stream's.
                    self.sweeps.started(&self.cache, object, window);
                }
                let bytes = if past_fence {
                    // The kernel's read-ahead past a section: its own bytes, nothing around them.
                    self.read_exact(object, blocks, range.clone()).await?
                } else {
                    self.read_blocks(object, blocks, range.clone()).await?
                };
                self.release_behind(file, object, range.start).await;
                bytes
            }
            Pattern::Random => self.read_from_here(file, object, blocks, range.clone()).await?,
        };
        if let Some(first) = bytes.as_slices().first() {
            self.learn_sections(object, range.start, first);
        }
        if file.bypasses_page_cache {
            let mut passes = self.first_passes.lock().expect("first passes poisoned");
            let pass = passes.get_or_insert_mut(version_of(object), FirstPass::default);
            pass.served = pass.served.saturating_add(bytes.len() as u64).min(object.size);
        }
        Ok(bytes)
    }

    /// Whether `object` is in its first pass (less than its size served past the page cache so
    /// far). Once that is through, the first open that keeps pages lets read-ahead fetch every
    /// block again: the page cache holds nothing the pass read.
    fn in_first_pass(&self, object: &ObjectMeta) -> bool {
        let version = version_of(object);
        let mut passes = self.first_passes.lock().expect("first passes poisoned");
        let Some(pass) = passes.get_mut(&version) else { return true };
        if pass.served < object.size {
            return true;
        }
        if !pass.marks_cleared {
            pass.marks_cleared = true;
            self.cache.read_ahead_everything(object);
        }
        false
    }

    /// A read that starts something new (the first read, a seek, a move into the next MRC
    /// section): the whole section when it is a large read in an MRC's voxel data, else just
    /// its own bytes.
    async fn read_from_here(
        &self,
        file: &OpenFile,
        object: &Arc<ObjectMeta>,
        blocks: Range<u64>,
        range: Range<u64>,
    ) -> Result<Slices, StoreError> {
        let section = match range.end - range.start >= SECTION_READ {
            true => self.section_of(object, &range).await,
            false => None,
        };
        {
            // A section read requests the section's blocks itself: read-ahead starts after them.
            let mut state = file.state.lock().expect("stream state poisoned");
            state.next_unrequested = section.as_ref().map_or(0, |s| self.section_blocks(file, s, &range).end);
            state.fence = section.as_ref().map(|s| s.end);
            state.past_fence = 0;
            state.released = blocks.start;
        }
        match section {
            Some(section) => self.read_section(file, section, range).await,
            None => self.read_exact(object, blocks, range).await,
        }
    }

    /// Drops from memory the blocks a stream has read, up to a little before `offset`: in the
    /// memory tier they would outlive the blocks read ahead of the stream, which arrived earlier
    /// and so are the least recently used. The kernel's page cache holds their bytes now (or,
    /// past it, the reader has them), so read-ahead leaves them out until a reader asks for two
    /// of them in a row again (the second pass over a file whose first bypassed the page cache).
    async fn release_behind(&self, file: &OpenFile, object: &Arc<ObjectMeta>, offset: u64) {
        let behind = offset.saturating_sub(prefetch::BACKWARD_TOLERANCE) / self.cache.block_size();
        let release = {
            let mut state = file.state.lock().expect("stream state poisoned");
            let release = state.released..behind;
            state.released = state.released.max(behind);
            release
        };
        self.cache.forget(object, release).await;
    }

    /// `range` from the blocks the cache holds at its start, and the rest by one GET of exactly
    /// those bytes, kept for a while: a reader that reads them again (a file's header, each time
    /// it is opened) gets them without another round trip, and no whole block is fetched for them.
    async fn read_exact(
        &self,
        object: &Arc<ObjectMeta>,
        blocks: Range<u64>,
        range: Range<u64>,
    ) -> Result<Slices, StoreError> {
        let block_size = self.cache.block_size();
        let (mut parts, mut first) = (Vec::new(), blocks.start * block_size);
        for index in blocks.clone() {
            match self.cache.cached(&BlockKey { object: object.clone(), index }).await {
                Some(block) => parts.push(block),
                None => {
                    let from = (index * block_size).max(range.start);
                    if parts.is_empty() {
                        first = from;
                    }
                    let (len, key) = (range.end - from, (version_of(object), from));
                    let kept = self.exact_reads.get(&key).await.filter(|bytes| bytes.len() as u64 >= len);
                    let bytes = match kept {
                        Some(bytes) => bytes.slice(..len as usize),
                        None => {
                            let bytes = self.store.get_range(object, from..range.end).await?;
                            self.exact_reads.insert(key, bytes.clone()).await;
                            bytes
                        }
                    };
                    parts.push(bytes);
                    break;
                }
            }
        }
        Ok(Slices::cut(&parts, first, range))
    }

    /// The section layout of `object` if it is an MRC whose header was read before (and adds up).
    fn known_sections(&self, object: &ObjectMeta) -> Option<MrcSections> {
        self.sections.lock().expect("section tables poisoned").peek(&version_of(object)).copied().flatten()
    }

    /// The MRC section most of `range` lies in, when `object` is an MRC whose header adds up.
    async fn section_of(&self, object: &Arc<ObjectMeta>, range: &Range<u64>) -> Option<Range<u64>> {
        if !MrcSections::is_mrc(&object.key) {
            return None;
        }
        let version = version_of(object);
        let known = self.sections.lock().expect("section tables poisoned").get(&version).copied();
        let sections = match known {
            Some(sections) => sections,
            None => {
                let header = self.store.get_range(object, 0..MrcSections::HEADER_LEN.min(object.size)).await.ok()?;
                self.learn_sections(object, 0, &header)?
            }
        }?;
        sections.section_at(range.start + (range.end - range.start) / 2)
    }

    /// Remembers (and returns) the section layout of an MRC whose bytes from `offset` include
    /// its header; `None` when they do not.
    fn learn_sections(&self, object: &ObjectMeta, offset: u64, bytes: &[u8]) -> Option<Option<MrcSections>> {
        if offset != 0 || (bytes.len() as u64) < MrcSections::HEADER_LEN || !MrcSections::is_mrc(&object.key) {
            return None;
        }
        let version = version_of(object);
        let mut tables = self.sections.lock().expect("section tables poisoned");
        Some(*tables.get_or_insert(version, || MrcSections::parse(bytes, object.size)))
    }

    /// Fetches every block of `section` at once (one GET each, in parallel), and those the
    /// kernel's read-ahead will ask for past its end (its last request for the section's own
    /// bytes reaches there too, and must not wait for one more round trip), and returns
    /// `range` once its own blocks are in.
    async fn read_section(
        &self,
        file: &OpenFile,
        section: Range<u64>,
        range: Range<u64>,
    ) -> Result<Slices, StoreError> {
        let object = &file.object;
        let wanted = self.cache.blocks_covering(&range);
        for index in self.section_blocks(file, &section, &range).filter(|index| !wanted.contains(index)) {
            self.cache.get_in_background(BlockKey { object: object.clone(), index });
        }
        self.read_blocks(object, wanted, range).await
    }

    /// The blocks a section read of `section` for a read of `range` fetches: the section's,
    /// the read's, and those up to the kernel's read-ahead past the section's end (none past
    /// the page cache).
    fn section_blocks(&self, file: &OpenFile, section: &Range<u64>, range: &Range<u64>) -> Range<u64> {
        let kernel_read_ahead = if file.bypasses_page_cache { 0 } else { self.config.kernel_read_ahead };
        let end = (section.end + kernel_read_ahead).min(file.object.size).max(range.end);
        self.cache.blocks_covering(&(section.start.min(range.start)..end))
    }

    /// The bytes `range` of `object` (clamped to its size), through the block cache.
    pub async fn read_range(&self, object: &Arc<ObjectMeta>, range: Range<u64>) -> Result<Bytes, StoreError> {
        let range = within(object, range);
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        Ok(self.read_blocks(object, self.cache.blocks_covering(&range), range).await?.into_bytes())
    }

    /// Reads whole blocks (in parallel, through the cache) and cuts `range` out of them.
    async fn read_blocks(
        &self,
        object: &Arc<ObjectMeta>,
        blocks: Range<u64>,
        range: Range<u64>,
    ) -> Result<Slices, StoreError> {
        let first = blocks.start * self.cache.block_size();
        // Leading blocks in memory (a stream's read-ahead, a section read) are taken on the spot.
        let mut held = Vec::with_capacity((blocks.end - blocks.start) as usize);
        for index in blocks.clone() {
            match self.cache.in_memory(&BlockKey { object: object.clone(), index }).await {
                Some(block) => held.push(block),
                None => break,
            }
        }
        // The rest in parallel, through the cache.
        let loads: Vec<_> = (blocks.start + held.len() as u64..blocks.end)
            .map(|index| {
                let (cache, key) = (self.cache.clone(), BlockKey { object: object.clone(), index });
                tokio::spawn(async move { cache.get(key).await })
            })
            .collect();
        let mut parts = held;
        for load in loads {
            parts.push(load.await.map_err(|e| StoreError::Other(format!("block load failed: {e}")))??);
        }
        Ok(Slices::cut(&parts, first, range))
    }

    /// Fetches the blocks covering `range` of `object` in the background while fetch slots are
    /// free (for readers that know what they will read next).
    pub fn prefetch_range(&self, object: &Arc<ObjectMeta>, range: Range<u64>) {
        let range = within(object, range);
        if !range.is_empty() {
            self.cache.prefetch(object, self.cache.blocks_covering(&range));
        }
    }
}

/// The bytes of one read, as slices of the blocks they lie in, in order. A read that spans
/// blocks goes to the kernel as these slices (one `writev`), not copied into one buffer first:
/// on a cold stream that copy of every byte cost a sixth of the mount's CPU.
#[derive(Clone, Debug, Default)]
pub struct Slices(Vec<Bytes>);

impl Slices {
    /// The bytes of `range` from consecutive `blocks`, the first starting at object offset `first`.
    pub fn cut(blocks: &[Bytes], first: u64, range: Range<u64>) -> Slices {
        let mut skip = (range.start - first) as usize;
        let mut left = (range.end - range.start) as usize;
        let mut slices = Vec::with_capacity(blocks.len());
        for block in blocks {
            if left == 0 {
                break;
            }
            if skip >= block.len() {
                skip -= block.len();
                continue;
            }
            let take = (block.len() - skip).min(left);
            slices.push(block.slice(skip..skip + take));
            (skip, left) = (0, left - take);
        }
        Slices(slices)
    }

    /// How many bytes the slices hold together.
    pub fn len(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Bytes::is_empty)
    }

    /// The slices, in order.
    pub fn as_slices(&self) -> &[Bytes] {
        &self.0
    }

    /// The bytes in one buffer (copied only when they span blocks).
    pub fn into_bytes(self) -> Bytes {
        match <[Bytes; 1]>::try_from(self.0) {
            Ok([one]) => one,
            Err(slices) => slices.concat().into(),
        }
    }
}

impl From<Bytes> for Slices {
    fn from(bytes: Bytes) -> Slices {
        Slices(vec![bytes])
    }
}

/// The bytes of `range` from consecutive `blocks`, the first starting at object offset `first`,
/// copied into a buffer of their own (which does not keep the blocks in memory).
pub(crate) fn assemble(blocks: &[Bytes], first: u64, range: Range<u64>) -> Bytes {
    Slices::cut(blocks, first, range).0.concat().into()
}

/// The largest power of two not above `n` (1 for 0).
fn prev_power_of_two(n: u64) -> u64 {
    1 << (63 - n.max(1).leading_zeros())
}

/// The part of `range` inside `object`.
fn within(object: &ObjectMeta, range: Range<u64>) -> Range<u64> {
    range.start.min(object.size)..range.end.min(object.size)
}

/// The byte range a read of `len` bytes at `offset` covers in an object of `size` bytes.
pub(crate) fn clamp(size: u64, offset: u64, len: u32) -> Range<u64> {
    let start = offset.min(size);
    start..offset.saturating_add(u64::from(len)).min(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_clamped_to_the_object() {
        assert_eq!(clamp(100, 0, 10), 0..10);
        assert_eq!(clamp(100, 95, 10), 95..100);
        assert_eq!(clamp(100, 100, 10), 100..100);
        assert_eq!(clamp(100, 500, 10), 100..100);
        assert_eq!(clamp(0, 0, 4096), 0..0);
        assert_eq!(clamp(u64::MAX, u64::MAX - 1, 10), u64::MAX - 1..u64::MAX);
    }

    #[test]
    fn powers_of_two_round_down() {
        assert_eq!([0, 1, 2, 3, 1000, 1024, 1025].map(prev_power_of_two), [1, 1, 2, 2, 512, 1024, 1024]);
    }

    #[test]
    fn a_read_across_blocks_is_slices_of_them() {
        let blocks: Vec<Bytes> =
            vec![Bytes::from_static(b"abcd"), Bytes::from_static(b"efgh"), Bytes::from_static(b"ij")];
        let across = Slices::cut(&blocks, 8, 9..17);
        assert_eq!(across.len(), 8);
        assert_eq!(across.as_slices(), [&b"bcd"[..], b"efgh", b"i"]);
        // Not copies: each slice is the block's own memory.
        for (slice, (block, at)) in across.as_slices().iter().zip([(&blocks[0], 1), (&blocks[1], 0), (&blocks[2], 0)]) {
            assert_eq!(slice.as_ptr(), block[at..].as_ptr());
        }
        assert_eq!(&across.into_bytes()[..], b"bcdefghi");
        let within = Slices::cut(&blocks[1..2], 12, 13..15);
        assert_eq!(within.as_slices(), [&b"fg"[..]]);
        assert_eq!(within.into_bytes().as_ptr(), blocks[1][1..].as_ptr(), "one slice is handed on as it is");
        assert_eq!(&assemble(&blocks, 0, 4..10)[..], b"efghij");
        assert_eq!(Slices::cut(&blocks, 0, 4..8).as_slices().len(), 1, "no empty slice past the read");
        assert!(Slices::default().is_empty());
    }
}
