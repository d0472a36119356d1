//! MRC views of OME-Zarr pyramids: each level of `X.zarr` also shows as a read-only file
//! `X.bin<N>.mrc` beside it (N the level's binning factor), so MRC-only tools (IMOD, RELION)
//! can open a binned tomogram without anyone downloading the full-resolution MRC.
//!
//! This module owns two things. Discovery ([`Catalog::views_in`]): when a folder is listed,
//! every `*.zarr/` in it has its `.zattrs` and level `.zarray`s read (small objects, cached
//! like any other) and the levels cdpfs can serve become views with exact sizes, without
//! touching a chunk. Reading ([`Catalog::read`]): a view is a 1024-byte MRC2014 header
//! ([`mrc`]) followed by the level's voxels in C order, which is MRC order. It is served in
//! blocks kept in the block cache's memory tier (on disk, the compressed chunks they come from
//! are cached like any object, so a remount recomputes them without a GET); a block is computed from
//! the Zarr chunks it overlaps, and from each chunk only the Blosc blocks holding its items are
//! fetched and decoded ([`blosc`]), each once while it stays in a small memory cache. An XY
//! section therefore costs the chunks of its z range, and only a slice of each.

pub mod blosc;
pub mod mrc;
pub mod zarr;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use bytes::Bytes;
use futures_util::future::{join_all, try_join_all};
use futures_util::TryFutureExt;
use tracing::debug;

use crate::cache::memory::BytesLru;
use crate::cache::BlockKey;
use crate::data::prefetch::{Pattern, Prefetcher, BACKWARD_TOLERANCE};
use crate::data::{clamp, DataPath, Slices};
use crate::store::{ObjectMeta, PrefixListing, StoreError, StoreFuture};
use blosc::Frame;
use zarr::{ArrayLayout, Codec, PyramidLevel};

/// The most compressed bytes of a chunk fetched ahead of what a view block needed from it
/// (sequential readers of a view read each chunk front to back). A stream reads every chunk
/// of a row of chunks at once: each gets an equal part of half the stream's read-ahead window
/// (the other half is the view blocks computed ahead), so that what is fetched ahead fits the
/// memory tier instead of pushing out what is about to be read.
const CHUNK_READ_AHEAD: u64 = 32 << 20;

/// The largest read-ahead window of a view's reader: a view block is computed from up to bin^3
/// times its size of chunk data, so views read ahead less than files.
const VIEW_READ_AHEAD: u64 = 64 << 20;

/// Listings, as the namespace caches them (the catalog lists through it, not around it).
pub trait Lister: Send + Sync {
    /// The immediate children of `prefix`.
    fn listing<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, PrefixListing>;
    /// Every object below `prefix`, at any depth.
    fn listing_all<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<ObjectMeta>>;
}

/// One level of one OME-Zarr, shown as an MRC file.
pub struct MrcView {
    /// The file as the namespace shows it: a key beside the Zarr (`.../X.bin4.mrc`, not in
    /// the bucket), its size, a version tag derived from the metadata's ETags, and the
    /// `.zarray`'s mtime.
    pub file: Arc<ObjectMeta>,
    /// The level's folder, e.g. `.../X.zarr/2/`.
    pub level_prefix: String,
    layout: ArrayLayout,
    header: Bytes,
    chunks: tokio::sync::OnceCell<ChunkIndex>,
}

impl std::fmt::Debug for MrcView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MrcView").field("file", &self.file.key).field("level", &self.level_prefix).finish()
    }
}

impl PartialEq for MrcView {
    fn eq(&self, other: &Self) -> bool {
        self.file == other.file
    }
}

impl Eq for MrcView {}

impl MrcView {
    /// Bytes of the sections one row of chunks (along z) covers.
    fn row_bytes(&self) -> u64 {
        let [_, ny, nx] = self.layout.shape;
        self.layout.chunks[0] * ny * nx * self.layout.dtype.size() as u64
    }

    /// The byte range of block `block`. Block 0 is the header; then each row of chunks is cut
    /// into blocks of at most `block_size` bytes, so that no block needs two rows of chunks
    /// (reading a section never fetches chunks of another z range).
    fn block_range(&self, block_size: u64, block: u64) -> Range<u64> {
        if block == 0 {
            return 0..mrc::HEADER_LEN;
        }
        let (row, part) =
            ((block - 1) / self.row_bytes().div_ceil(block_size), (block - 1) % self.row_bytes().div_ceil(block_size));
        let row_start = mrc::HEADER_LEN + row * self.row_bytes();
        let start = row_start + part * block_size;
        start..(start + block_size).min(row_start + self.row_bytes()).min(self.file.size)
    }

    /// Chunks of one section.
    fn chunks_per_section(&self) -> u64 {
        let [_, ny, nx] = self.layout.shape;
        let [_, cy, cx] = self.layout.chunks;
        (ny.div_ceil(cy) * nx.div_ceil(cx)).max(1)
    }

    /// How far a sequential reader with read-ahead `window` reads ahead in each chunk.
    fn chunk_read_ahead(&self, window: u64) -> u64 {
        (window / 2 / self.chunks_per_section()).min(CHUNK_READ_AHEAD)
    }

    /// The block holding byte `offset`.
    fn block_at(&self, block_size: u64, offset: u64) -> u64 {
        let Some(data) = offset.checked_sub(mrc::HEADER_LEN) else { return 0 };
        let row = self.row_bytes();
        1 + data / row * row.div_ceil(block_size) + data % row / block_size
    }

    /// Number of blocks.
    fn block_count(&self, block_size: u64) -> u64 {
        self.block_at(block_size, self.file.size - 1) + 1
    }
}

/// Why a Zarr, or one of its levels, shows no view.
enum NoView {
    /// Its metadata could not be read (412, 403, throttling past the retries): the Zarr has no
    /// views in this listing of its folder, and the next listing tries again.
    Store(StoreError),
    /// Its metadata is nothing a view can serve (the reason, for the debug log).
    Unsupported(String),
}

impl From<StoreError> for NoView {
    fn from(e: StoreError) -> NoView {
        NoView::Store(e)
    }
}

impl From<String> for NoView {
    fn from(why: String) -> NoView {
        NoView::Unsupported(why)
    }
}

impl From<&str> for NoView {
    fn from(why: &str) -> NoView {
        NoView::Unsupported(why.to_owned())
    }
}

/// The level's chunk objects (one flat listing), and the identity of the view's data blocks.
struct ChunkIndex {
    objects: HashMap<String, Arc<ObjectMeta>>,
    /// The view's bytes as a cache object: same key, a tag covering every chunk's version.
    blocks: Arc<ObjectMeta>,
    /// The separator the chunk keys use (the declared one unless the keys say otherwise).
    separator: char,
}

/// An open view: the view, its reader's access pattern (the same read-ahead policy as for
/// files, [`crate::data::prefetch`]) and the first block its read-ahead has not requested yet.
pub struct OpenView {
    /// The view being read.
    pub view: Arc<MrcView>,
    pattern: std::sync::Mutex<Prefetcher>,
    requested: AtomicU64,
    /// The first block a stream through the view has not dropped from memory.
    released: AtomicU64,
}

/// Finds and reads the MRC views of a mount.
pub struct Catalog {
    data: Arc<DataPath>,
    /// Where chunk listings come from (the namespace, which saves them).
    lister: OnceLock<Weak<dyn Lister>>,
    /// Decoded Blosc blocks of chunks, keyed by chunk version and block number (neighbouring
    /// view blocks share them).
    decoded: BytesLru<BlockKey>,
    /// The preludes of Blosc chunks ([`Catalog::prelude`]), by chunk version.
    preludes: BytesLru<BlockKey>,
    /// Memory for view blocks being computed (a view's read-ahead computes many at once): each
    /// waits here for room for itself and the items of the chunks it is cut from.
    computing: Room,
    /// Memory for decodes in flight: a view block is computed from up to bin^3 times its size
    /// of decoded chunk data, so each chunk's part of a block waits here for room for the
    /// compressed bytes and decoded Blosc blocks it holds until its items are cut out.
    decoding: Room,
}

/// A share of the memory budget that computations wait for room in.
struct Room {
    /// Free room, in KiB.
    free: tokio::sync::Semaphore,
    /// All of the room, in KiB.
    kib: u32,
}

impl Room {
    fn new(bytes: u64) -> Room {
        let kib = u32::try_from(bytes >> 10).unwrap_or(u32::MAX).max(1);
        Room { free: tokio::sync::Semaphore::new(kib as usize), kib }
    }

    /// Waits until there is room for `bytes` more (all of the room, for a computation that
    /// needs more than there is); the room is given back when the guard is dropped.
    async fn for_bytes(&self, bytes: usize) -> Result<tokio::sync::SemaphorePermit<'_>, StoreError> {
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).min(self.kib);
        self.free.acquire_many(kib).await.map_err(|e| StoreError::Other(format!("view computation stopped: {e}")))
    }
}

impl Catalog {
    /// A catalog reading metadata and chunks through `data` within `memory` bytes: half for
    /// view blocks being computed, a quarter for decodes in flight, 3/16 for decoded Blosc
    /// blocks kept for neighbouring view blocks and 1/16 for chunks' preludes. It lists chunks
    /// once [`Catalog::list_through`] says how.
    pub fn new(data: Arc<DataPath>, memory: u64) -> Catalog {
        let (decoded, preludes) = (BytesLru::new(memory / 16 * 3), BytesLru::new(memory / 16));
        let (computing, decoding) = (Room::new(memory / 2), Room::new(memory / 4));
        Catalog { data, lister: OnceLock::new(), decoded, preludes, computing, decoding }
    }

    /// Lets the catalog list views' chunks through `lister` (the namespace, which holds the
    /// catalog: hence a weak reference).
    pub fn list_through(&self, lister: Weak<dyn Lister>) {
        let _ = self.lister.set(lister);
    }

    /// The views (name and view) the folder `prefix`, listed as `listing`, shows beside its
    /// Zarrs (the namespace drops any whose name the listing already has). Zarrs that cannot be
    /// viewed are left out, with a debug line saying why. Views are optional: a Zarr whose
    /// metadata cannot be read has none until a later listing of the folder reads it, and the
    /// folder itself lists as if views were off (the store already logged the failed request).
    pub async fn views_in(&self, lister: &dyn Lister, prefix: &str, listing: &PrefixListing) -> Vec<(String, MrcView)> {
        let has_object = |name: &str| listing.objects.iter().any(|o| o.key.strip_prefix(prefix) == Some(name));
        let zarrs = listing.prefixes.iter().filter_map(|p| {
            let stem = p.strip_prefix(prefix)?.strip_suffix(".zarr/")?;
            (!stem.is_empty() && !stem.contains('/')).then_some((stem, p.as_str()))
        });
        let found = join_all(zarrs.map(|(stem, zarr)| async move {
            let has_mrc = has_object(&format!("{stem}.mrc"));
            (zarr, self.views_of(lister, prefix, stem, zarr, has_mrc).await)
        }))
        .await;
        let mut views = Vec::new();
        for (zarr, found) in found {
            match found {
                Ok(found) => views.extend(found),
                Err(NoView::Unsupported(why)) => debug!(zarr, why, "no MRC views"),
                Err(NoView::Store(e)) => {
                    debug!(zarr, error = %e, "no MRC views: metadata unreadable, retried at the next listing")
                }
            }
        }
        views
    }

    /// The views of one Zarr `zarr` (named `stem.zarr` in folder `prefix`).
    async fn views_of(
        &self,
        lister: &dyn Lister,
        prefix: &str,
        stem: &str,
        zarr: &str,
        has_mrc: bool,
    ) -> Result<Vec<(String, MrcView)>, NoView> {
        let root = lister.listing(zarr).await?;
        let zattrs = find_object(&root, &format!("{zarr}.zattrs")).ok_or("no .zattrs")?;
        // The level folders are listed while `.zattrs` is read, rather than once it names them.
        let (attrs, folders) = futures_util::future::join(
            self.whole(&zattrs),
            join_all(root.prefixes.iter().map(|folder| async move { (folder.as_str(), lister.listing(folder).await) })),
        )
        .await;
        let levels = zarr::parse_multiscales(&attrs?)?;
        let folders: HashMap<&str, _> = folders.into_iter().collect();
        let folders = &folders;
        let base = levels.first().ok_or("multiscales has no levels")?.scale;
        let stack = prefix.contains("/TiltSeries/") || prefix.starts_with("TiltSeries/");
        let zattrs = &zattrs;
        let views = join_all(levels.iter().map(|level| async move {
            let factor = binning(base, level);
            let factor = factor.ok_or_else(|| format!("level {} is not an integer binning", level.path))?;
            if factor == 1 && has_mrc {
                return Ok(None);
            }
            let name = format!("{stem}.bin{factor}.mrc");
            let level_prefix = format!("{zarr}{}/", level.path);
            let listing = match folders.get(level_prefix.as_str()) {
                Some(Ok(listing)) => listing,
                Some(Err(e)) => return Err(NoView::Store(e.clone())),
                None => return Err(format!("no folder {level_prefix}").into()),
            };
            let zarray = find_object(listing, &format!("{level_prefix}.zarray")).ok_or("no .zarray")?;
            let layout = ArrayLayout::parse(&self.whole(&zarray).await?)?;
            let geometry = mrc::Geometry {
                shape: layout.shape,
                dtype: layout.dtype,
                voxel: level.scale,
                stack,
                label: format!("cdpfs: bin{factor} view of {level_prefix}"),
            };
            let etag = format!(
                "cdpfs-view-{:016x}",
                crate::hash::stable_hash(&[zattrs.etag.as_bytes(), zarray.etag.as_bytes(), level_prefix.as_bytes()])
            );
            let size = mrc::HEADER_LEN + layout.elements() * layout.dtype.size() as u64;
            let file = Arc::new(ObjectMeta { key: format!("{prefix}{name}"), size, etag, mtime: zarray.mtime });
            let header = Bytes::from(mrc::header(&geometry));
            let view = MrcView { file, level_prefix, layout, header, chunks: tokio::sync::OnceCell::new() };
            Ok(Some((name, view)))
        }))
        .await;
        let mut out = Vec::new();
        for view in views {
            match view {
                Ok(Some(view)) => out.push(view),
                Ok(None) => {}
                Err(NoView::Unsupported(why)) => debug!(zarr, why, "a level has no MRC view"),
                Err(store) => return Err(store),
            }
        }
        Ok(out)
    }

    /// A small object's bytes, through the block cache.
    async fn whole(&self, object: &Arc<ObjectMeta>) -> Result<Bytes, StoreError> {
        self.data.read_range(object, 0..object.size).await
    }

    /// Starts reading `view`: an MRC, read header first (a buffered read of its header fetches
    /// its own blocks and no read-ahead).
    pub fn open(&self, view: Arc<MrcView>) -> OpenView {
        OpenView {
            view,
            pattern: std::sync::Mutex::new(
                self.data.prefetcher(VIEW_READ_AHEAD).reads_header_first(true).through_page_cache(true),
            ),
            requested: AtomicU64::new(0),
            released: AtomicU64::new(0),
        }
    }

    /// Bytes of `view` the block cache holds (0 before it was first read).
    pub fn cached_bytes(&self, view: &MrcView) -> u64 {
        let Some(index) = view.chunks.get() else { return 0 };
        let block_size = self.data.cache().block_size();
        let blocks = (0..view.block_count(block_size)).map(|block| (block, view.block_range(block_size, block)));
        self.data.cache().held_bytes(&index.blocks, blocks)
    }

    /// Up to `len` bytes of the view from `offset`; fewer at the end, none past it. A read
    /// that failed is not tried again at once (see [`DataPath::unless_failed_just_now`]).
    pub async fn read(self: &Arc<Self>, open: &OpenView, offset: u64, len: u32) -> Result<Slices, StoreError> {
        self.data.unless_failed_just_now(&open.view.file, offset, self.read_anew(open, offset, len)).await
    }

    /// [`Catalog::read`], from the cache and the chunks.
    async fn read_anew(self: &Arc<Self>, open: &OpenView, offset: u64, len: u32) -> Result<Slices, StoreError> {
        let view = &open.view;
        let range = clamp(view.file.size, offset, len);
        if range.is_empty() {
            return Ok(Slices::default());
        }
        let block_size = self.data.cache().block_size();
        let blocks = view.block_at(block_size, range.start)..view.block_at(block_size, range.end - 1) + 1;
        let pattern = open.pattern.lock().expect("view pattern poisoned").on_read(range.start, range.end - range.start);
        let streaming = matches!(pattern, Pattern::Sequential { .. });
        let chunk_ahead = match pattern {
            Pattern::Sequential { window } => {
                // Without a disk tier to bring them back, what a stream reads ahead must fit
                // the memory tier beside the blocks of its section's chunks being read (each
                // chunk's current and next), or they are fetched again.
                let cache = self.data.cache();
                let window = match cache.disk() {
                    Some(_) => window,
                    None => {
                        let held = 2 * view.chunks_per_section() * block_size;
                        window.min(cache.memory_capacity().saturating_sub(held)).max(window.min(2 * block_size))
                    }
                };
                // Half the window is view blocks computed ahead, half the chunk bytes fetched
                // ahead ([`MrcView::chunk_read_ahead`]). Each block is requested ahead once per
                // stream, so failures are not retried in a loop.
                let end = (blocks.end + (window / 2).div_ceil(block_size)).min(view.block_count(block_size));
                let start = open.requested.fetch_max(end, Ordering::Relaxed).max(blocks.end);
                let chunk_ahead = view.chunk_read_ahead(window);
                for block in start..end {
                    let (catalog, view) = (self.clone(), view.clone());
                    tokio::spawn(async move { catalog.block(&view, block, chunk_ahead).await });
                }
                chunk_ahead
            }
            Pattern::Random => {
                open.requested.store(0, Ordering::Relaxed);
                0
            }
        };
        let parts = try_join_all(blocks.clone().map(|block| self.block(view, block, chunk_ahead))).await?;
        if streaming {
            // As a stream through a file does ([`DataPath`]): the blocks it has read would
            // outlive, in the memory tier, the chunk bytes the next blocks are computed from.
            let behind = view.block_at(block_size, range.start.saturating_sub(BACKWARD_TOLERANCE));
            let from = open.released.fetch_max(behind, Ordering::Relaxed);
            if from < behind {
                let index = self.index(view).await?;
                self.data.cache().evict(&index.blocks, from..behind).await;
            }
        }
        Ok(Slices::cut(&parts, view.block_range(block_size, blocks.start).start, range))
    }

    /// The chunk listing of a view, made once.
    async fn index<'a>(&self, view: &'a MrcView) -> Result<&'a ChunkIndex, StoreError> {
        view.chunks
            .get_or_try_init(|| async {
                let lister = self.lister.get().and_then(Weak::upgrade);
                let lister = lister.ok_or_else(|| StoreError::Other("the mount is going away".into()))?;
                let objects = lister.listing_all(&view.level_prefix).await?;
                let mut tag = Vec::new();
                for o in &objects {
                    tag.extend_from_slice(format!("{}\0{}\0{}\0", o.key, o.etag, o.size).as_bytes());
                }
                let etag = format!("{}-{:016x}", view.file.etag, crate::hash::stable_hash(&[&tag]));
                let blocks = Arc::new(ObjectMeta { etag, ..(*view.file).clone() });
                let names = objects.iter().filter_map(|o| o.key.strip_prefix(&view.level_prefix));
                let separator = zarr::separator_in(names).unwrap_or(view.layout.separator);
                let objects = objects.into_iter().map(|o| (o.key.clone(), Arc::new(o))).collect();
                Ok(ChunkIndex { objects, blocks, separator })
            })
            .await
    }

    /// Block `block` of the view, from the block cache or computed from the chunks (fetching
    /// `chunk_ahead` bytes ahead in them for a sequential reader).
    async fn block(&self, view: &MrcView, block: u64, chunk_ahead: u64) -> Result<Bytes, StoreError> {
        let index = self.index(view).await?;
        let key = BlockKey { object: index.blocks.clone(), index: block };
        let range = view.block_range(self.data.cache().block_size(), block);
        self.data.cache().get_or_compute(key, self.compute(view, index, range, chunk_ahead)).await
    }

    /// The bytes `range` of the view, from its header and the chunks the range overlaps.
    async fn compute(
        &self,
        view: &MrcView,
        index: &ChunkIndex,
        range: Range<u64>,
        chunk_ahead: u64,
    ) -> Result<Bytes, StoreError> {
        let header = &view.header[range.start.min(mrc::HEADER_LEN) as usize..range.end.min(mrc::HEADER_LEN) as usize];
        let item = view.layout.dtype.size() as u64;
        let data = range.start.max(mrc::HEADER_LEN) - mrc::HEADER_LEN..range.end - mrc::HEADER_LEN;
        if data.is_empty() {
            return Ok(Bytes::copy_from_slice(header));
        }
        // The block, and as much again for the chunks' items it is cut from.
        let _room = self.computing.for_bytes(2 * (range.end - range.start) as usize).await?;
        // Blocks hold whole items: block sizes, rows and the header length are multiples of 4.
        let rows = row_segments(&view.layout, data.start / item..data.end / item);
        let mut spans: BTreeMap<[u64; 3], Range<u64>> = BTreeMap::new();
        for segment in &rows {
            let span = spans.entry(segment.chunk).or_insert(segment.local.clone());
            span.start = span.start.min(segment.local.start);
            span.end = span.end.max(segment.local.end);
        }
        let decoded: HashMap<[u64; 3], (u64, Bytes)> =
            try_join_all(spans.into_iter().map(|(chunk, span)| async move {
                let bytes = self.chunk_items(view, index, chunk, span.clone(), chunk_ahead).await?;
                Ok::<_, StoreError>((chunk, (span.start, bytes)))
            }))
            .await?
            .into_iter()
            .collect();
        // Allocated once the chunks are decoded: blocks waiting for room to decode hold nothing.
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        out.extend_from_slice(header);
        for segment in rows {
            let (first, bytes) = &decoded[&segment.chunk];
            let start = ((segment.local.start - first) * item) as usize;
            out.extend_from_slice(
                &bytes[start..start + (segment.local.end - segment.local.start) as usize * item as usize],
            );
        }
        Ok(out.into())
    }

    /// The start of a Blosc chunk's frame up to its blocks (header and block table), kept on
    /// its own: every part of a view block cut from the chunk needs it, and it is a few hundred
    /// bytes at the start of a 512 KiB block that need not stay in memory for it.
    async fn prelude(&self, object: &Arc<ObjectMeta>) -> Result<Bytes, StoreError> {
        let key = BlockKey { object: object.clone(), index: 0 };
        self.preludes
            .try_get_with(key, async {
                let head = self.data.read_range(object, 0..(blosc::HEADER_LEN as u64).min(object.size)).await?;
                let len = Frame::parse(&head).map_or(head.len(), |frame| frame.prelude_len()) as u64;
                let prelude = self.data.read_range(object, 0..len.min(object.size)).await?;
                Ok::<_, StoreError>(Bytes::copy_from_slice(&prelude))
            })
            .await
            .map_err(|e: Arc<StoreError>| (*e).clone())
    }

    /// Items `span` (in the chunk's own C order) of chunk `chunk`: fill value when the chunk
    /// is missing, else only the parts of its frame that hold them, decoded (fetching
    /// `chunk_ahead` bytes of the frame beyond them in the background).
    async fn chunk_items(
        &self,
        view: &MrcView,
        index: &ChunkIndex,
        chunk: [u64; 3],
        span: Range<u64>,
        chunk_ahead: u64,
    ) -> Result<Bytes, StoreError> {
        let layout = &view.layout;
        let item = layout.dtype.size();
        let key = zarr::chunk_key(&view.level_prefix, chunk, index.separator);
        let Some(object) = index.objects.get(&key) else {
            return Ok(layout.fill.repeat((span.end - span.start) as usize).into());
        };
        let chunk_bytes = layout.chunk_elements() * item as u64;
        let bytes = span.start as usize * item..span.end as usize * item;
        let corrupt = |why: String| StoreError::Other(format!("chunk {key} cannot be decoded: {why}"));
        match layout.codec {
            Codec::Raw if object.size == chunk_bytes => {
                self.data.read_range(object, bytes.start as u64..bytes.end as u64).await
            }
            Codec::Raw => Err(corrupt(format!("{} bytes, expected {chunk_bytes}", object.size))),
            Codec::Blosc => {
                let prelude = self.prelude(object).await?;
                let frame = Frame::parse(&prelude).map_err(corrupt)?;
                if frame.nbytes as u64 != chunk_bytes || frame.cbytes as u64 != object.size {
                    return Err(corrupt(format!("frame of {} bytes holds {}", frame.cbytes, frame.nbytes)));
                }
                let blocks = frame.blocks_for(bytes.clone()).map_err(corrupt)?;
                let stored = frame.block_ranges(&prelude, blocks.clone()).map_err(corrupt)?;
                let held =
                    stored.iter().map(|r| r.len()).sum::<usize>() + blocks.len() * frame.block_len() + bytes.len();
                let _room = self.decoding.for_bytes(held).await?;
                if chunk_ahead > 0 {
                    let end = stored.iter().map(|r| r.end as u64).max().unwrap_or(0);
                    // In runs of half the read-ahead at least: not while its middle is on its way.
                    let middle = (end + chunk_ahead / 2).min(object.size.saturating_sub(1));
                    let middle = BlockKey { object: object.clone(), index: middle / self.data.cache().block_size() };
                    if !self.data.cache().holds_or_fetches(&middle) {
                        self.data.prefetch_range(object, end..end + chunk_ahead);
                    }
                }
                let prelude = &prelude;
                let decoded = try_join_all(blocks.clone().zip(stored).map(|(block, stored)| {
                    let key = BlockKey { object: object.clone(), index: block as u64 };
                    self.decoded
                        .try_get_with(key, async move {
                            let data = self.data.read_range(object, stored.start as u64..stored.end as u64).await?;
                            let (prelude, frame) = (prelude.clone(), frame);
                            tokio::task::spawn_blocking(move || frame.decode_block(&prelude, block, &data))
                                .await
                                .map_err(|e| StoreError::Other(format!("decoding task failed: {e}")))?
                                .map(Bytes::from)
                                .map_err(corrupt)
                        })
                        .map_err(|e: Arc<StoreError>| (*e).clone())
                }))
                .await?;
                let first = (blocks.start * frame.block_len()) as u64;
                Ok(crate::data::assemble(&decoded, first, bytes.start as u64..bytes.end as u64))
            }
        }
    }
}

/// The object called `key` in `listing`.
fn find_object(listing: &PrefixListing, key: &str) -> Option<Arc<ObjectMeta>> {
    listing.objects.iter().find(|o| o.key == key).map(|o| Arc::new(o.clone()))
}

/// The binning factor of `level` against the full-resolution scale `base` (along x), when it
/// is a whole number.
fn binning(base: [f64; 3], level: &PyramidLevel) -> Option<u32> {
    let factor = level.scale[2] / base[2];
    let rounded = factor.round();
    ((factor - rounded).abs() < 1e-3 && (1.0..=1024.0).contains(&rounded)).then_some(rounded as u32)
}

/// A run of consecutive items of one array row that lies in one chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RowSegment {
    /// The chunk's grid index (z, y, x).
    chunk: [u64; 3],
    /// The run as item indices in the chunk's own C order.
    local: Range<u64>,
}

/// The row runs, in array order, that make up the array items `items` (C order).
fn row_segments(layout: &ArrayLayout, items: Range<u64>) -> Vec<RowSegment> {
    let [_, ny, nx] = layout.shape;
    let [cz, cy, cx] = layout.chunks;
    let mut out = Vec::new();
    let mut at = items.start;
    while at < items.end {
        let (row, x) = (at / nx, at % nx);
        let (z, y) = (row / ny, row % ny);
        let row_end = (row + 1) * nx;
        let end = items.end.min(row_end).min(at + (cx - x % cx));
        let local_start = ((z % cz) * cy + y % cy) * cx + x % cx;
        out.push(RowSegment { chunk: [z / cz, y / cy, x / cx], local: local_start..local_start + (end - at) });
        at = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(shape: [u64; 3], chunks: [u64; 3]) -> ArrayLayout {
        ArrayLayout { shape, chunks, dtype: zarr::Dtype::F32, fill: vec![0; 4], codec: Codec::Raw, separator: '/' }
    }

    #[test]
    fn rows_split_at_chunk_edges() {
        let l = layout([3, 5, 7], [2, 2, 3]);
        // Items 0..7 are row (z0, y0): chunks x0 (3 items), x1 (3), x2 (1).
        let segments = row_segments(&l, 0..7);
        assert_eq!(
            segments,
            vec![
                RowSegment { chunk: [0, 0, 0], local: 0..3 },
                RowSegment { chunk: [0, 0, 1], local: 0..3 },
                RowSegment { chunk: [0, 0, 2], local: 0..1 },
            ]
        );
        // Item 5*7 + 7 + 4 = (z1, y1, x4): chunk (0, 0, 1), local (1, 1, 1) = (1*2 + 1)*3 + 1.
        let at = 35 + 7 + 4;
        assert_eq!(row_segments(&l, at..at + 1), vec![RowSegment { chunk: [0, 0, 1], local: 10..11 }]);
        // Every item of the array appears once, in order.
        let all = row_segments(&l, 0..105);
        assert_eq!(all.iter().map(|s| s.local.end - s.local.start).sum::<u64>(), 105);
        assert_eq!(all.last().unwrap(), &RowSegment { chunk: [1, 2, 2], local: 0..1 });
    }

    #[test]
    fn blocks_tile_the_file_and_never_span_two_chunk_rows() {
        let layout = layout([37, 50, 60], [16, 32, 32]);
        let size = mrc::HEADER_LEN + layout.elements() * 4;
        let file = Arc::new(ObjectMeta { key: "v".into(), size, etag: String::new(), mtime: std::time::UNIX_EPOCH });
        let view = MrcView {
            file,
            level_prefix: String::new(),
            layout,
            header: Bytes::new(),
            chunks: tokio::sync::OnceCell::new(),
        };
        let row = 16 * 50 * 60 * 4;
        for block_size in [4096, 65_536, 2 << 20] {
            let mut next = 0;
            for block in 0..view.block_count(block_size) {
                let range = view.block_range(block_size, block);
                assert_eq!(range.start, next, "blocks are contiguous");
                assert!(!range.is_empty() && range.end - range.start <= block_size.max(mrc::HEADER_LEN));
                if block > 0 {
                    let rows = (range.start - mrc::HEADER_LEN) / row..(range.end - 1 - mrc::HEADER_LEN) / row;
                    assert!(rows.is_empty(), "block {block} spans rows {rows:?}");
                }
                assert_eq!(view.block_at(block_size, range.start), block);
                assert_eq!(view.block_at(block_size, range.end - 1), block);
                next = range.end;
            }
            assert_eq!(next, size);
        }
    }

    #[test]
    fn binning_factors_come_from_the_scales() {
        let level = |s: f64| PyramidLevel { path: "1".into(), scale: [s, s, s] };
        assert_eq!(binning([13.48; 3], &level(13.48)), Some(1));
        assert_eq!(binning([13.48; 3], &level(26.96)), Some(2));
        assert_eq!(binning([13.48; 3], &level(53.92)), Some(4));
        assert_eq!(binning([13.48; 3], &level(20.22)), None);
        assert_eq!(binning([13.48; 3], &level(6.74)), None);
    }
}
