//! Namespace: the inode table and the directory cache.
//!
//! A directory is one `/`-delimited listing of its prefix, which also carries every child's
//! size, ETag and mtime, so `lookup`, `getattr` and `readdir` never need a HEAD per file.
//! Listings are cached for the metadata TTL and loaded once however many callers ask at the same
//! time. Inode numbers are stable for the life of the mount: a directory is identified by its
//! prefix and a file by its key *and* ETag, so a re-ingested object gets a fresh inode (and the
//! kernel never serves its old pages for the new bytes).
//!
//! Two things keep a recursive walk (`find`, `du`, `ls -R`) from paying one serial round trip per
//! directory: listings are saved in the cache directory ([`persist`]) and reused by later mounts
//! while the TTL lasts, and opening a directory warms the listings of the directories below it,
//! breadth first, many at a time, up to a budget of listings per opened directory. The warming
//! is polite, as hundreds of nodes may share one bucket: a directory is warmed at most once per
//! TTL, and never into OME-Zarr stores (`*.zarr/`, thousands of chunk folders Zarr readers do
//! not list); a warming goes on past its budget only as a walker opens what it listed.
//!
//! A directory listing also gets the MRC views of the OME-Zarrs in it ([`crate::views`]),
//! when the mount shows them. With the portal's map ([`crate::portal::map`]), the root also
//! resolves portal ids (`RN-241`) to symlinks on lookup, and shows the facet folders, whose
//! entries are symlinks into the tree. A real key of the same name always wins.

pub mod names;
pub mod persist;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::data::sweep::{ChunkOrder, Lookup};
use crate::portal::api::ApiError;
use crate::portal::ids::{link_target, PortalId};
use crate::portal::map::{FacetEntry, PortalMap, FACETS};
use crate::store::{ObjectMeta, ObjectStore, PrefixListing, StoreError, StoreFuture};
use crate::views::{zarr, Catalog, Lister, MrcView};
use names::Child;
use persist::ListingStore;

/// Inode number of the mount's root directory.
pub const ROOT_INO: u64 = 1;

/// Upper bound on the directory cache, counted in entries across all cached directories.
const MAX_CACHED_ENTRIES: u64 = 1_000_000;
/// How many levels below an opened directory are listed ahead of the walker (a run's data sits
/// about seven levels below its dataset).
const WARM_DEPTH: usize = 8;
/// Most background listings in flight at once, across the mount.
const WARM_PARALLEL: usize = 32;

/// What an inode stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    /// A directory backed by a key prefix (empty for the bucket root, else ending in `/`).
    Dir { prefix: String },
    /// A file backed by one object version.
    File(Arc<ObjectMeta>),
    /// A virtual MRC file computed from one level of an OME-Zarr.
    View(Arc<MrcView>),
    /// A symlink of the portal's map at `path` (from the root), to `target` (relative to it).
    Link { path: String, target: String },
    /// A facet folder of the portal's map (`by-organism`, `by-object/membrane`), not in the bucket.
    Facet { path: String },
}

impl Node {
    /// The object a file or view shows as (key, size, version, mtime); `None` for directories.
    pub fn file(&self) -> Option<&Arc<ObjectMeta>> {
        match self {
            Node::Dir { .. } | Node::Link { .. } | Node::Facet { .. } => None,
            Node::File(object) => Some(object),
            Node::View(view) => Some(&view.file),
        }
    }
}

/// One named entry of a directory.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Name within the directory.
    pub name: String,
    /// Inode number.
    pub ino: u64,
    /// What the entry is.
    pub node: Node,
}

/// A snapshot of one directory's entries, sorted by name.
#[derive(Debug, Default)]
pub struct Directory {
    /// Entries sorted by name.
    pub entries: Vec<Entry>,
}

impl Directory {
    /// The entry called `name`, if any.
    pub fn find(&self, name: &str) -> Option<&Entry> {
        self.entries.binary_search_by(|e| e.name.as_str().cmp(name)).ok().map(|i| &self.entries[i])
    }
}

/// Why a namespace operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NamespaceError {
    /// No such entry.
    #[error("no such file or directory")]
    NotFound,
    /// The inode is not a directory.
    #[error("not a directory")]
    NotDir,
    /// The inode number is unknown (the kernel holds a handle we no longer know).
    #[error("stale inode")]
    Stale,
    /// Listing failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The portal's API gave no answer.
    #[error(transparent)]
    Portal(#[from] ApiError),
}

impl NamespaceError {
    /// The errno to report for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            NamespaceError::NotFound => libc::ENOENT,
            NamespaceError::NotDir => libc::ENOTDIR,
            NamespaceError::Stale => libc::ESTALE,
            NamespaceError::Store(e) => e.errno(),
            NamespaceError::Portal(_) => libc::EIO,
        }
    }
}

/// The inodes the kernel knows: those it was handed by `lookup` or `readdirplus` and has not
/// forgotten yet, with how many lookups it holds. Other entries of cached listings only have a
/// number, remembered (for stable `ls -i` across re-listings) in a bounded LRU, so the table
/// stays about as small as the kernel's own inode cache however much of the bucket is walked.
struct InodeTable {
    nodes: HashMap<u64, Slot>,
    by_identity: HashMap<String, u64>,
    /// Numbers given to entries the kernel does not hold, most recent first.
    recent: lru::LruCache<String, u64>,
    next: u64,
}

struct Slot {
    node: Node,
    lookups: u64,
    /// The object changed or went away since it was listed: new opens are refused (`ESTALE`),
    /// which makes the kernel look the name up again.
    stale: bool,
}

/// How many numbers of entries the kernel does not hold are remembered.
const RECENT_NUMBERS: usize = 1 << 18;

impl InodeTable {
    fn new() -> InodeTable {
        InodeTable {
            nodes: HashMap::new(),
            by_identity: HashMap::new(),
            recent: lru::LruCache::new(std::num::NonZeroUsize::new(RECENT_NUMBERS).expect("non-zero")),
            next: ROOT_INO,
        }
    }

    fn identity(node: &Node) -> String {
        match node {
            Node::Dir { prefix } => prefix.clone(),
            // NUL cannot appear in a shown key, so this never collides with a prefix.
            Node::File(object) => format!("{}\0{}", object.key, object.etag),
            // View keys are not bucket keys, and view tags are not S3 ETags.
            Node::View(view) => format!("{}\0{}", view.file.key, view.file.etag),
            // \u{1} starts no key shown in the tree.
            Node::Link { path, .. } | Node::Facet { path } => format!("\u{1}{path}"),
        }
    }

    /// The number of `node`: the one it had if it is known or was seen recently, else a new one.
    fn ino_for(&mut self, node: &Node) -> u64 {
        let identity = Self::identity(node);
        if let Some(&ino) = self.by_identity.get(&identity) {
            // Same key and ETag: keep the inode, refresh what the listing says (e.g. mtime). A
            // fresh listing that still has this version clears a stale mark (a 404 or 412 that
            // was not a re-ingest after all: the next read will tell again).
            if let Some(slot) = self.nodes.get_mut(&ino) {
                slot.node = node.clone();
                slot.stale = false;
            }
            return ino;
        }
        if let Some(&ino) = self.recent.get(&identity) {
            return ino;
        }
        self.next += 1;
        self.recent.put(identity, self.next);
        self.next
    }

    /// The kernel was handed `entry` once more.
    fn remember(&mut self, entry: &Entry) {
        let slot =
            self.nodes.entry(entry.ino).or_insert_with(|| Slot { node: entry.node.clone(), lookups: 0, stale: false });
        slot.lookups += 1;
        let identity = Self::identity(&entry.node);
        self.recent.pop(&identity);
        self.by_identity.entry(identity).or_insert(entry.ino);
    }

    /// The kernel dropped `count` of its lookups of `ino`.
    fn forget(&mut self, ino: u64, count: u64) {
        let Some(slot) = self.nodes.get_mut(&ino) else { return };
        slot.lookups = slot.lookups.saturating_sub(count);
        if slot.lookups > 0 || ino == ROOT_INO {
            return;
        }
        let identity = Self::identity(&slot.node);
        self.nodes.remove(&ino);
        if self.by_identity.get(&identity) == Some(&ino) {
            self.by_identity.remove(&identity);
            self.recent.put(identity, ino);
        }
    }
}

/// The inode table plus directory cache over one bucket prefix.
pub struct Namespace {
    store: Arc<dyn ObjectStore>,
    saved: Option<Arc<ListingStore>>,
    /// How long listings are trusted.
    ttl: Duration,
    inodes: RwLock<InodeTable>,
    directories: moka::future::Cache<u64, Arc<Directory>>,
    warm_gate: Arc<Semaphore>,
    warm_budget: usize,
    /// Directories warmed within the TTL.
    warmed: moka::future::Cache<u64, ()>,
    /// Directories a warming listed before anyone opened them, and the directory that warming
    /// started from.
    warmed_from: moka::future::Cache<u64, u64>,
    /// Directories whose warming is running.
    warming: std::sync::Mutex<std::collections::HashSet<u64>>,
    /// Directories whose last warming found everything below them listed (within the depth).
    warmed_whole: moka::future::Cache<u64, ()>,
    views: Option<Arc<Catalog>>,
    portal: Option<Arc<PortalMap>>,
    root_prefix: String,
}

impl Lister for Namespace {
    fn listing<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, PrefixListing> {
        Box::pin(self.list(prefix))
    }

    fn listing_all<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<ObjectMeta>> {
        Box::pin(self.list_all(prefix))
    }
}

impl ChunkOrder for Namespace {
    fn next_chunk<'a>(&'a self, key: &'a str) -> Lookup<'a> {
        Box::pin(Namespace::next_chunk(self, key))
    }

    fn chunk<'a>(&'a self, key: &'a str) -> Lookup<'a> {
        Box::pin(Namespace::chunk(self, key))
    }
}

impl Namespace {
    /// A namespace rooted at `root_prefix` (empty or ending in `/`), caching listings for `ttl`,
    /// reusing (and saving) listings in `saved` when given, and listing up to `warm_budget`
    /// directories ahead of a walker per opened directory.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        root_prefix: &str,
        ttl: Duration,
        saved: Option<Arc<ListingStore>>,
        warm_budget: usize,
    ) -> Namespace {
        let mut table = InodeTable::new();
        let root = Node::Dir { prefix: root_prefix.to_owned() };
        table.by_identity.insert(InodeTable::identity(&root), ROOT_INO);
        table.nodes.insert(ROOT_INO, Slot { node: root, lookups: 1, stale: false });
        let directories = moka::future::Cache::builder()
            .max_capacity(MAX_CACHED_ENTRIES)
            .weigher(|_, dir: &Arc<Directory>| u32::try_from(dir.entries.len() + 1).unwrap_or(u32::MAX))
            .time_to_live(ttl)
            .build();
        Namespace {
            store,
            saved,
            ttl,
            inodes: RwLock::new(table),
            directories,
            warm_gate: Arc::new(Semaphore::new(WARM_PARALLEL)),
            warm_budget,
            warmed: moka::future::Cache::builder().max_capacity(MAX_CACHED_ENTRIES).time_to_live(ttl).build(),
            warmed_from: moka::future::Cache::builder().max_capacity(MAX_CACHED_ENTRIES).time_to_live(ttl).build(),
            warming: Default::default(),
            warmed_whole: moka::future::Cache::builder().max_capacity(MAX_CACHED_ENTRIES).time_to_live(ttl).build(),
            views: None,
            portal: None,
            root_prefix: root_prefix.to_owned(),
        }
    }

    /// Shows the MRC views `catalog` finds beside every OME-Zarr.
    pub fn with_views(mut self, catalog: Arc<Catalog>) -> Namespace {
        self.views = Some(catalog);
        self
    }

    /// Resolves portal ids at the root and shows the facet folders of `portal`.
    pub fn with_portal(mut self, portal: Arc<PortalMap>) -> Namespace {
        self.portal = Some(portal);
        self
    }

    /// The node behind `ino`.
    pub fn node(&self, ino: u64) -> Result<Node, NamespaceError> {
        let table = self.inodes.read().expect("inode table lock poisoned");
        table.nodes.get(&ino).map(|slot| slot.node.clone()).ok_or(NamespaceError::Stale)
    }

    /// Whether file `ino` was found changed or gone since it was listed.
    pub fn is_stale(&self, ino: u64) -> bool {
        let table = self.inodes.read().expect("inode table lock poisoned");
        table.nodes.get(&ino).is_some_and(|slot| slot.stale)
    }

    /// The object behind file `ino`, `key`, answered 412 or 404 (it was replaced or deleted
    /// after it was listed): drops its folder's cached and saved listings so the next lookup
    /// lists it again, and marks `ino` stale. Returns the folder's inode and the entry's name,
    /// for the kernel's caches.
    pub async fn object_changed(&self, ino: u64, key: &str) -> Option<(u64, String)> {
        let (prefix, name) = key.rfind('/').map_or(("", key), |i| (&key[..=i], &key[i + 1..]));
        if let Some(saved) = &self.saved {
            saved.forget_async(prefix).await;
        }
        let parent = {
            let mut table = self.inodes.write().expect("inode table lock poisoned");
            if let Some(slot) = table.nodes.get_mut(&ino) {
                slot.stale = true;
            }
            table.by_identity.get(prefix).copied().or_else(|| table.recent.peek(prefix).copied())
        }?;
        self.directories.invalidate(&parent).await;
        Some((parent, name.to_owned()))
    }

    /// The parent directory of directory `ino` (the root is its own parent).
    pub fn parent(&self, ino: u64) -> Option<u64> {
        let table = self.inodes.read().expect("inode table lock poisoned");
        if ino == ROOT_INO {
            return Some(ROOT_INO);
        }
        let parent_identity = match &table.nodes.get(&ino)?.node {
            Node::Dir { prefix } => {
                let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
                trimmed.rfind('/').map_or("", |i| &prefix[..=i]).to_owned()
            }
            Node::Facet { path } => path.rsplit_once('/').map_or(String::new(), |(up, _)| format!("\u{1}{up}")),
            _ => return None,
        };
        Some(table.by_identity.get(&parent_identity).copied().unwrap_or(ROOT_INO))
    }

    /// Number of inodes the kernel holds.
    pub fn inode_count(&self) -> u64 {
        self.inodes.read().expect("inode table lock poisoned").nodes.len() as u64
    }

    /// The entries of directory `ino`, from the cache or from one listing.
    pub async fn directory(&self, ino: u64) -> Result<Arc<Directory>, NamespaceError> {
        match self.node(ino)? {
            Node::Dir { prefix } => self.directory_at(ino, &prefix).await.map_err(NamespaceError::Store),
            Node::Facet { path } => self.facet_directory(ino, &path).await,
            _ => Err(NamespaceError::NotDir),
        }
    }

    /// The entries of folder `prefix` of the bucket, whether or not the kernel holds it.
    pub async fn listing(&self, prefix: &str) -> Result<Arc<Directory>, NamespaceError> {
        let ino = self.inodes.write().expect("inode table lock poisoned").ino_for(&Node::Dir { prefix: prefix.into() });
        self.directory_at(ino, prefix).await.map_err(NamespaceError::Store)
    }

    /// The chunk object after `key` in C order within its Zarr level ([`zarr::chunk_of`]): the
    /// next in its folder, else the first of the next folder, listing folders as needed; `None`
    /// past the level's last chunk, for a key that is no chunk or whose level is not below the
    /// mount's root, or when a listing fails.
    pub async fn next_chunk(&self, key: &str) -> Option<Arc<ObjectMeta>> {
        let (level, chunk) = self.chunk_in_mount(key)?;
        let names: Vec<&str> = chunk.split('/').collect();
        for depth in (0..names.len()).rev() {
            let folder: String = std::iter::once(level).chain(names[..depth].iter().flat_map(|n| [*n, "/"])).collect();
            let listing = self.listing(&folder).await.ok()?;
            let after = zarr::chunk_index(names[depth])?;
            if let Some(entry) = first_chunk_entry(&listing, Some(&after)) {
                return self.first_chunk_in(entry.clone(), names.len() - 1 - depth).await;
            }
        }
        None
    }

    /// The chunk object `key` of a Zarr level below the mount's root, if there is one: looked up
    /// from the level's folder down, so that only folders a listing showed are listed.
    pub async fn chunk(&self, key: &str) -> Option<Arc<ObjectMeta>> {
        let (level, chunk) = self.chunk_in_mount(key)?;
        let mut entry = Entry { name: String::new(), ino: 0, node: Node::Dir { prefix: level.to_owned() } };
        for name in chunk.split('/') {
            let Node::Dir { prefix } = &entry.node else { return None };
            entry = self.listing(prefix).await.ok()?.find(name)?.clone();
        }
        entry.node.file().cloned()
    }

    /// The level and chunk path of chunk `key` ([`zarr::chunk_of`]), when its level is below the
    /// mount's root.
    fn chunk_in_mount<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        zarr::chunk_of(key).filter(|(level, _)| level.starts_with(&self.root_prefix))
    }

    /// The first chunk object `depth` folders below `entry` (`entry` itself when 0).
    async fn first_chunk_in(&self, mut entry: Entry, depth: usize) -> Option<Arc<ObjectMeta>> {
        for _ in 0..depth {
            let Node::Dir { prefix } = &entry.node else { return None };
            let listing = self.listing(prefix).await.ok()?;
            entry = first_chunk_entry(&listing, None)?.clone();
        }
        match entry.node {
            Node::File(object) => Some(object),
            _ => None,
        }
    }

    /// The entries of facet folder `path`, from the portal's map.
    async fn facet_directory(&self, ino: u64, path: &str) -> Result<Arc<Directory>, NamespaceError> {
        let portal = self.portal.as_ref().ok_or(NamespaceError::NotFound)?;
        self.directories
            .try_get_with(ino, async {
                let entries = portal.facet(path, &self.root_prefix).await?.ok_or(NamespaceError::NotFound)?;
                let depth = path.split('/').count();
                let named = entries
                    .into_iter()
                    .filter_map(|entry| match entry {
                        FacetEntry::Folder(name) => {
                            Some((name.clone(), Node::Facet { path: format!("{path}/{name}") }))
                        }
                        FacetEntry::Link { name, key } => {
                            let target = link_target(&self.root_prefix, depth, &key)?;
                            Some((name.clone(), Node::Link { path: format!("{path}/{name}"), target }))
                        }
                    })
                    .collect();
                Ok(Arc::new(self.numbered(named)))
            })
            .await
            .map_err(|e: Arc<NamespaceError>| (*e).clone())
    }

    /// The entries of directory `ino` (backed by `prefix`), whether or not the kernel holds it.
    async fn directory_at(&self, ino: u64, prefix: &str) -> Result<Arc<Directory>, StoreError> {
        self.directories
            .try_get_with(ino, async {
                let listing = self.list(prefix).await?;
                let mut extra: Vec<(String, Node)> = match &self.views {
                    Some(catalog) => catalog
                        .views_in(self, prefix, &listing)
                        .await
                        .into_iter()
                        .map(|(name, view)| (name, Node::View(Arc::new(view))))
                        .collect(),
                    None => Vec::new(),
                };
                if ino == ROOT_INO && self.portal.is_some() {
                    extra.extend(FACETS.iter().map(|f| (f.to_string(), Node::Facet { path: f.to_string() })));
                }
                Ok::<_, StoreError>(Arc::new(self.build_directory(prefix, listing, extra)))
            })
            .await
            .map_err(|e: Arc<StoreError>| (*e).clone())
    }

    /// A listing of `prefix`: a saved one while it is fresh, else from the store (then saved).
    /// While S3 is unreachable (or the mount is offline), a saved listing of any age.
    async fn list(&self, prefix: &str) -> Result<PrefixListing, StoreError> {
        self.list_saved_as(prefix, self.store.list_prefix(prefix)).await
    }

    /// Every object below `prefix` at any depth (a Zarr level's chunks, for its MRC view), saved
    /// and reused as listings are: a remount, or a node without S3, computes the view from the
    /// cache alone. Saved as `prefix**`, which is no folder's prefix (those end in `/`).
    pub async fn list_all(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let flat = async { Ok(PrefixListing { prefixes: Vec::new(), objects: self.store.list_all(prefix).await? }) };
        Ok(self.list_saved_as(&format!("{prefix}**"), flat).await?.objects)
    }

    /// The listing saved as `name` while it is fresh, else what `fetch` lists (then saved as
    /// `name`); while S3 is unreachable (or the mount is offline), the saved one of any age.
    async fn list_saved_as(
        &self,
        name: &str,
        fetch: impl Future<Output = Result<PrefixListing, StoreError>>,
    ) -> Result<PrefixListing, StoreError> {
        if let Some(saved) = &self.saved {
            let max_age = self.store.reachable().then_some(self.ttl);
            if let Some(listing) = saved.load_within_async(name, max_age).await {
                return Ok(listing);
            }
        }
        let listing = match fetch.await {
            Err(StoreError::Unreachable(e)) => {
                // Not saved again: it is no fresher than it was.
                let stale = match &self.saved {
                    Some(saved) => saved.load_within_async(name, None).await,
                    None => None,
                };
                return stale.ok_or(StoreError::Unreachable(e));
            }
            listed => listed?,
        };
        if let Some(saved) = &self.saved {
            saved.save_in_background(name, &listing);
        }
        Ok(listing)
    }

    /// Lists, in the background, the directories up to [`WARM_DEPTH`] levels below `ino`
    /// (which must be listed already), so that a walk finds them cached: once per TTL, and
    /// never inside an OME-Zarr. When `ino` is itself one that a warming listed, the walker is
    /// going through what was listed ahead of it (`find`, `du`), and that warming goes on with
    /// a new budget: an `ls` costs one budget, a walk as many as it uses.
    pub fn warm_subtree(self: &Arc<Self>, ino: u64) {
        if self.warm_budget == 0 || self.node(ino).is_ok_and(|node| in_zarr(&node)) {
            return;
        }
        let namespace = self.clone();
        tokio::spawn(async move {
            if let Some(origin) = namespace.warmed_from.remove(&ino).await {
                namespace.clone().warm_from(origin).await;
            }
            if namespace.warmed.contains_key(&ino) {
                return;
            }
            namespace.warmed.insert(ino, ()).await;
            namespace.warm_from(ino).await;
        });
    }

    /// Lists up to the budget of not yet listed directories below `origin`, breadth first,
    /// unless a warming from `origin` is running already or found nothing left to list.
    async fn warm_from(self: Arc<Self>, origin: u64) {
        if self.warmed_whole.contains_key(&origin) || !self.warming.lock().expect("warming set poisoned").insert(origin)
        {
            return;
        }
        let mut frontier = vec![origin];
        let mut budget = self.warm_budget;
        for _ in 0..WARM_DEPTH {
            let mut next = Vec::new();
            let mut listings = tokio::task::JoinSet::new();
            for dir in frontier {
                let Some(listing) = self.directories.get(&dir).await else { continue };
                for entry in listing.entries.iter() {
                    // The kernel has not looked these up yet: list them by prefix.
                    let Node::Dir { prefix } = &entry.node else { continue };
                    if in_zarr(&entry.node) {
                        continue;
                    }
                    if self.directories.contains_key(&entry.ino) {
                        next.push(entry.ino);
                    } else if budget > 0 {
                        budget -= 1;
                        let (namespace, child, prefix) = (self.clone(), entry.ino, prefix.clone());
                        let gate = namespace.warm_gate.clone();
                        listings.spawn(async move {
                            let _permit = gate.acquire_owned().await;
                            namespace.directory_at(child, &prefix).await.map(|_| child)
                        });
                    }
                }
            }
            while let Some(done) = listings.join_next().await {
                if let Ok(Ok(child)) = done {
                    self.warmed_from.insert(child, origin).await;
                    next.push(child);
                }
            }
            if next.is_empty() {
                break;
            }
            frontier = next;
        }
        if budget > 0 {
            self.warmed_whole.insert(origin, ()).await;
        }
        self.warming.lock().expect("warming set poisoned").remove(&origin);
    }

    /// The entry `name` inside directory `parent`, which the kernel now holds a lookup of.
    pub async fn lookup(&self, parent: u64, name: &str) -> Result<Entry, NamespaceError> {
        let dir = self.directory(parent).await?;
        let entry = match dir.find(name) {
            Some(entry) => entry.clone(),
            None if parent == ROOT_INO => self.portal_id(name).await?.ok_or(NamespaceError::NotFound)?,
            None => return Err(NamespaceError::NotFound),
        };
        self.remember(&entry);
        Ok(entry)
    }

    /// The symlink a portal id at the root stands for: `None` when `name` is no id, the id is
    /// unknown, or it names something outside the mount (or, for a dataset or deposition, which
    /// need no API, something not in the bucket).
    async fn portal_id(&self, name: &str) -> Result<Option<Entry>, NamespaceError> {
        let Some(id) = PortalId::parse(name) else { return Ok(None) };
        let key = match id.fixed_key() {
            Some(key) => self.exists(&key).await?.then_some(key),
            None => match &self.portal {
                Some(portal) => portal.locate(id).await?,
                None => None,
            },
        };
        let Some(target) = key.and_then(|key| link_target(&self.root_prefix, 0, &key)) else { return Ok(None) };
        let node = Node::Link { path: name.to_owned(), target };
        let ino = self.inodes.write().expect("inode table lock poisoned").ino_for(&node);
        Ok(Some(Entry { name: name.to_owned(), ino, node }))
    }

    /// Whether folder `key` (ending in `/`) is in the tree, by listing its ancestors.
    async fn exists(&self, key: &str) -> Result<bool, NamespaceError> {
        let Some(inside) = key.strip_prefix(self.root_prefix.as_str()) else { return Ok(false) };
        let inside = inside.trim_end_matches('/');
        if inside.is_empty() {
            // The mount's own root (`DS-10000` on a mount of `--prefix 10000/`).
            return Ok(true);
        }
        let mut prefix = self.root_prefix.clone();
        for part in inside.split('/') {
            let listing = self.listing(&prefix).await?;
            match listing.find(part).map(|e| &e.node) {
                Some(Node::Dir { prefix: next }) => prefix = next.clone(),
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    /// The kernel was handed `entry` (by `lookup` or `readdirplus`): it holds one more lookup.
    pub fn remember(&self, entry: &Entry) {
        self.inodes.write().expect("inode table lock poisoned").remember(entry);
    }

    /// The kernel dropped `count` lookups of `ino` (FUSE `forget`).
    pub fn forget(&self, ino: u64, count: u64) {
        self.inodes.write().expect("inode table lock poisoned").forget(ino, count);
    }

    /// The directory of a listing of `prefix` plus `extra` entries (views, facet folders).
    fn build_directory(&self, prefix: &str, listing: PrefixListing, extra: Vec<(String, Node)>) -> Directory {
        let named: Vec<(String, Node)> = names::children(prefix, listing)
            .into_iter()
            .map(|child| match child {
                Child::Dir { name, prefix } => (name, Node::Dir { prefix }),
                Child::File { name, object } => (name, Node::File(Arc::new(object))),
            })
            .chain(extra)
            .collect();
        self.numbered(named)
    }

    /// A directory of `named` entries, numbered. The sort is stable and the first of equal names
    /// stays, so an entry put first (a listing's) is never shadowed by a later one (a view, a
    /// facet folder, a later level of the same binning).
    fn numbered(&self, mut named: Vec<(String, Node)>) -> Directory {
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named.dedup_by(|later, earlier| later.0 == earlier.0);
        let mut table = self.inodes.write().expect("inode table lock poisoned");
        let entries = named.into_iter().map(|(name, node)| Entry { name, ino: table.ino_for(&node), node }).collect();
        Directory { entries }
    }
}

/// The first entry of a folder of chunk paths in the order of the indices they stand for
/// (numbers, not names), after `after` when given.
fn first_chunk_entry<'a>(listing: &'a Directory, after: Option<&[u64]>) -> Option<&'a Entry> {
    let entries = listing.entries.iter().filter_map(|entry| Some((zarr::chunk_index(&entry.name)?, entry)));
    entries
        .filter(|(index, _)| after.is_none_or(|after| index.as_slice() > after))
        .min_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, e)| e)
}

/// Whether `node` is an OME-Zarr store (`*.zarr/`) or a folder inside one.
fn in_zarr(node: &Node) -> bool {
    matches!(node, Node::Dir { prefix } if prefix.split('/').any(|segment| segment.ends_with(".zarr")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreFuture;
    use bytes::Bytes;
    use std::ops::Range;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::SystemTime;

    /// An in-memory bucket that counts listings.
    #[derive(Default)]
    struct MemoryStore {
        objects: Mutex<Vec<ObjectMeta>>,
        lists: AtomicUsize,
    }

    impl MemoryStore {
        fn put(&self, key: &str, etag: &str) {
            let mut objects = self.objects.lock().unwrap();
            objects.retain(|o| o.key != key);
            objects.push(ObjectMeta { key: key.into(), size: 3, etag: etag.into(), mtime: SystemTime::UNIX_EPOCH });
        }
    }

    impl ObjectStore for MemoryStore {
        fn list_prefix<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, PrefixListing> {
            Box::pin(async move {
                self.lists.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                let mut listing = PrefixListing::default();
                for o in self.objects.lock().unwrap().iter() {
                    let Some(rest) = o.key.strip_prefix(prefix) else { continue };
                    match rest.split_once('/') {
                        Some((dir, _)) => {
                            let p = format!("{prefix}{dir}/");
                            if !listing.prefixes.contains(&p) {
                                listing.prefixes.push(p);
                            }
                        }
                        None => listing.objects.push(o.clone()),
                    }
                }
                Ok(listing)
            })
        }

        fn list_all<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Vec<ObjectMeta>> {
            Box::pin(async move {
                let objects = self.objects.lock().unwrap();
                Ok(objects.iter().filter(|o| o.key.starts_with(prefix)).cloned().collect())
            })
        }

        fn get_range<'a>(&'a self, _: &'a ObjectMeta, _: Range<u64>) -> StoreFuture<'a, Bytes> {
            Box::pin(async { Ok(Bytes::new()) })
        }
    }

    #[tokio::test]
    async fn concurrent_lookups_share_one_listing_and_inodes_are_stable() {
        let store = Arc::new(MemoryStore::default());
        store.put("10000/TS_026/a.mrc", "\"1\"");
        store.put("10000/dataset_metadata.json", "\"2\"");
        let ns = Arc::new(Namespace::new(store.clone(), "", Duration::from_secs(60), None, 0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let ns = ns.clone();
                tokio::spawn(async move { ns.lookup(ROOT_INO, "10000").await.unwrap().ino })
            })
            .collect();
        let mut inos = Vec::new();
        for t in tasks {
            inos.push(t.await.unwrap());
        }
        assert!(inos.iter().all(|&i| i == inos[0]));
        assert_eq!(store.lists.load(Ordering::SeqCst), 1);
        let dataset = ns.lookup(ROOT_INO, "10000").await.unwrap();
        let run = ns.lookup(dataset.ino, "TS_026").await.unwrap();
        let file = ns.lookup(run.ino, "a.mrc").await.unwrap();
        assert!(matches!(file.node, Node::File(ref o) if o.key == "10000/TS_026/a.mrc"));
        assert!(matches!(ns.lookup(run.ino, "missing").await, Err(NamespaceError::NotFound)));
        assert!(matches!(ns.directory(file.ino).await, Err(NamespaceError::NotDir)));
        assert!(matches!(ns.node(999_999), Err(NamespaceError::Stale)));
    }

    #[tokio::test]
    async fn the_next_chunk_goes_by_numbers_across_folders_and_stays_in_the_level_and_the_mount() {
        let store = Arc::new(MemoryStore::default());
        // Level 0: z/y/x with a chunk missing (0/1/1) and x up to 10; level 1: flat keys.
        for key in ["0/0/9", "0/0/10", "0/0/2", "0/1/0", "0/1/2", "1/0/0", ".zarray"] {
            store.put(&format!("d/a.zarr/0/{key}"), "\"1\"");
        }
        for key in ["0.0.9", "0.0.10", "0.1.0"] {
            store.put(&format!("d/a.zarr/1/{key}"), "\"1\"");
        }
        store.put("d/a.zarr/2/0/0/0", "\"1\"");
        let ns = Namespace::new(store.clone(), "", Duration::from_secs(60), None, 0);
        let next = |key: &'static str| {
            let ns = &ns;
            async move { ns.next_chunk(&format!("d/a.zarr/{key}")).await.map(|o| o.key.clone()) }
        };
        assert_eq!(next("0/0/0/2").await.as_deref(), Some("d/a.zarr/0/0/0/9"));
        assert_eq!(next("0/0/0/9").await.as_deref(), Some("d/a.zarr/0/0/0/10"), "numbers, not names");
        assert_eq!(next("0/0/0/10").await.as_deref(), Some("d/a.zarr/0/0/1/0"), "into the next row");
        assert_eq!(next("0/0/1/0").await.as_deref(), Some("d/a.zarr/0/0/1/2"), "past a missing chunk");
        assert_eq!(next("0/0/1/2").await.as_deref(), Some("d/a.zarr/0/1/0/0"), "into the next z");
        assert_eq!(next("0/1/0/0").await, None, "the level's last chunk: not into level 1");
        assert_eq!(next("1/0.0.9").await.as_deref(), Some("d/a.zarr/1/0.0.10"));
        assert_eq!(next("1/0.0.10").await.as_deref(), Some("d/a.zarr/1/0.1.0"));
        assert_eq!(next("0/.zarray").await, None, "not a chunk");
        let found = ns.chunk("d/a.zarr/0/0/1/2").await.map(|o| o.key.clone());
        assert_eq!(found.as_deref(), Some("d/a.zarr/0/0/1/2"));
        let lists = store.lists.load(Ordering::SeqCst);
        assert_eq!(ns.chunk("d/a.zarr/0/0/7/2").await, None, "off the grid");
        assert_eq!(store.lists.load(Ordering::SeqCst), lists, "a folder no listing showed is not listed");
        let scoped = Namespace::new(store.clone(), "d/a.zarr/0/0/", Duration::from_secs(60), None, 0);
        assert_eq!(scoped.next_chunk("d/a.zarr/0/0/0/2").await, None, "the level is above the mount's root");
    }

    #[tokio::test]
    async fn forgotten_inodes_leave_the_table_and_come_back_on_lookup() {
        let store = Arc::new(MemoryStore::default());
        store.put("d/a.json", "\"1\"");
        store.put("d/b.json", "\"2\"");
        let ns = Namespace::new(store.clone(), "", Duration::from_secs(60), None, 0);
        let dir = ns.lookup(ROOT_INO, "d").await.unwrap();
        let a = ns.lookup(dir.ino, "a.json").await.unwrap();
        assert_eq!(ns.lookup(dir.ino, "a.json").await.unwrap().ino, a.ino);
        // Listed but never handed to the kernel: numbered, not held.
        let b = ns.directory(dir.ino).await.unwrap().find("b.json").unwrap().ino;
        assert!(matches!(ns.node(b), Err(NamespaceError::Stale)));
        assert_eq!(ns.inode_count(), 3, "root, d and a.json");
        ns.forget(a.ino, 1);
        assert!(ns.node(a.ino).is_ok(), "one of two lookups is still held");
        ns.forget(a.ino, 1);
        assert!(matches!(ns.node(a.ino), Err(NamespaceError::Stale)));
        assert_eq!(ns.inode_count(), 2);
        // Looked up again from the cached listing: the same number, usable again.
        assert_eq!(ns.lookup(dir.ino, "a.json").await.unwrap().ino, a.ino);
        assert!(matches!(ns.node(a.ino), Ok(Node::File(_))));
        // The root is never forgotten; forgetting unknown inodes is harmless.
        ns.forget(ROOT_INO, 10);
        ns.forget(987_654, 1);
        assert!(ns.node(ROOT_INO).is_ok());
        assert_eq!(store.lists.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn numbers_stay_the_same_across_re_listings_held_or_not() {
        let store = Arc::new(MemoryStore::default());
        store.put("a.json", "\"1\"");
        store.put("b.json", "\"2\"");
        let ns = Namespace::new(store.clone(), "", Duration::from_millis(50), None, 0);
        let a = ns.lookup(ROOT_INO, "a.json").await.unwrap().ino;
        let b = ns.directory(ROOT_INO).await.unwrap().find("b.json").unwrap().ino;
        ns.forget(a, 1);
        tokio::time::sleep(Duration::from_millis(80)).await;
        let again = ns.directory(ROOT_INO).await.unwrap();
        assert_eq!(store.lists.load(Ordering::SeqCst), 2, "the listing expired and was made again");
        assert_eq!((again.find("a.json").unwrap().ino, again.find("b.json").unwrap().ino), (a, b));
    }

    #[tokio::test]
    async fn a_changed_object_drops_its_folders_listing_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let io = Arc::new(crate::cache::offload::CacheDirIo::new(Duration::from_secs(1)));
        let saved = Arc::new(ListingStore::open(dir.path(), "b", Duration::from_secs(3600), io).unwrap());
        let store = Arc::new(MemoryStore::default());
        store.put("d/x.json", "\"1\"");
        let ns = Namespace::new(store.clone(), "", Duration::from_secs(3600), Some(saved.clone()), 0);
        let d = ns.lookup(ROOT_INO, "d").await.unwrap().ino;
        let old = ns.lookup(d, "x.json").await.unwrap().ino;
        tokio::time::sleep(Duration::from_millis(50)).await; // the listing is saved in the background
        assert!(saved.load("d/").is_some());
        store.put("d/x.json", "\"2\"");
        assert_eq!(ns.lookup(d, "x.json").await.unwrap().ino, old, "cached for the TTL");
        assert!(!ns.is_stale(old));
        assert_eq!(ns.object_changed(old, "d/x.json").await, Some((d, "x.json".to_owned())));
        assert!(ns.is_stale(old));
        assert!(saved.load("d/").is_none(), "the saved listing is dropped too");
        let new = ns.lookup(d, "x.json").await.unwrap();
        assert_ne!(new.ino, old);
        assert!(matches!(new.node, Node::File(ref o) if o.etag == "\"2\""));
        assert!(!ns.is_stale(new.ino));
        assert!(ns.is_stale(old), "the old version stays stale");
        // A 412 or 404 the next listing does not confirm: the same inode, usable again.
        ns.object_changed(new.ino, "d/x.json").await;
        assert!(ns.is_stale(new.ino));
        assert_eq!(ns.lookup(d, "x.json").await.unwrap().ino, new.ino);
        assert!(!ns.is_stale(new.ino));
    }

    #[tokio::test]
    async fn changed_etag_gets_a_new_inode_after_ttl() {
        let store = Arc::new(MemoryStore::default());
        store.put("x.json", "\"1\"");
        let ns = Namespace::new(store.clone(), "", Duration::from_millis(50), None, 0);
        let first = ns.lookup(ROOT_INO, "x.json").await.unwrap().ino;
        assert_eq!(ns.lookup(ROOT_INO, "x.json").await.unwrap().ino, first);
        store.put("x.json", "\"2\"");
        tokio::time::sleep(Duration::from_millis(80)).await;
        let second = ns.lookup(ROOT_INO, "x.json").await.unwrap().ino;
        assert_ne!(first, second);
        assert_eq!(store.lists.load(Ordering::SeqCst), 2);
    }
}
