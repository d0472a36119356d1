//! FUSE adapter: translates kernel requests into namespace and data-path calls.
//!
//! It stays thin and never blocks a FUSE session thread: every request that may touch the
//! network is handed to the tokio runtime and replied to from there, so slow reads of one file
//! don't hold up others. The filesystem is read-only: every write-like operation is `EROFS`.
//! Besides folders and files it serves the portal map's symlinks (`readlink`) and the
//! `user.cryoet.*` attributes ([`crate::portal::metadata`]), asked off the session threads.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::future::Future;
use std::io::{IoSlice, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
};
use tracing::{debug, warn};

use crate::data::{DataPath, OpenFile, Slices};
use crate::namespace::{Directory, Namespace, NamespaceError, Node, ROOT_INO};
use crate::portal::metadata::{self, MetadataReader};
use crate::stats::Stats;
use crate::store::StoreError;
use crate::views::{Catalog, OpenView};

/// Preferred I/O size reported in `st_blksize` and `statfs`: large, so stdio and `cp` read
/// in big requests.
const IO_BLOCK_SIZE: u32 = 1 << 20;

/// The mount root's attribute holding the mount's counters as JSON (read by `cdpfs stats`).
pub const STATS_XATTR: &str = "user.cdpfs.stats";

/// The read-only extended attributes every file carries (`getfattr -d FILE`).
const XATTR_NAMES: [&str; 4] = ["user.cdpfs.key", "user.cdpfs.etag", "user.cdpfs.url", "user.cdpfs.cached"];
/// Those a folder has: where it is in the bucket.
const FOLDER_XATTR_NAMES: [&str; 2] = ["user.cdpfs.key", "user.cdpfs.url"];

/// Who owns the files and how long the kernel may cache what we tell it.
#[derive(Clone, Copy, Debug)]
pub struct FsOptions {
    /// Owner of every file and directory (the mounting user).
    pub uid: u32,
    /// Group of every file and directory.
    pub gid: u32,
    /// How long the kernel may cache entries and attributes.
    pub ttl: Duration,
    /// How long it may cache what the portal's map shows (id links, facet folders): no longer
    /// than the API's answers are trusted.
    pub portal_ttl: Duration,
}

impl FsOptions {
    /// How long the kernel may cache `node`'s entry and attributes.
    fn ttl_of(&self, node: &Node) -> Duration {
        match node {
            Node::Link { .. } | Node::Facet { .. } => self.portal_ttl.min(self.ttl),
            Node::Dir { .. } | Node::File(_) | Node::View(_) => self.ttl,
        }
    }
}

/// An open file, view or directory.
#[derive(Clone)]
enum Handle {
    File(Arc<OpenFile>),
    View(Arc<OpenView>),
    Dir(Arc<Directory>),
}

/// The cdpfs FUSE filesystem.
pub struct CdpFs {
    runtime: tokio::runtime::Handle,
    namespace: Arc<Namespace>,
    data: Arc<DataPath>,
    views: Arc<Catalog>,
    options: FsOptions,
    bucket: Arc<str>,
    stats: Arc<Stats>,
    mounted_at: SystemTime,
    handles: Arc<Mutex<HashMap<u64, Handle>>>,
    next_handle: AtomicU64,
    notifier: Arc<OnceLock<fuser::Notifier>>,
    device: Arc<OnceLock<File>>,
    metadata: Option<Arc<MetadataReader>>,
}

impl CdpFs {
    /// A filesystem serving `namespace` and `data` (and the MRC views of `views`) of `bucket`,
    /// running its I/O on `runtime`.
    pub fn new(
        runtime: tokio::runtime::Handle,
        namespace: Arc<Namespace>,
        data: Arc<DataPath>,
        views: Arc<Catalog>,
        options: FsOptions,
        bucket: &str,
        stats: Arc<Stats>,
    ) -> CdpFs {
        CdpFs {
            runtime,
            namespace,
            data,
            views,
            options,
            bucket: bucket.into(),
            stats,
            mounted_at: SystemTime::now(),
            handles: Arc::default(),
            next_handle: AtomicU64::new(1),
            notifier: Arc::default(),
            device: Arc::default(),
            metadata: None,
        }
    }

    /// Shows the portal's metadata sidecars as `user.cryoet.*` attributes, read by `reader`.
    pub fn with_metadata(mut self, reader: Arc<MetadataReader>) -> CdpFs {
        self.metadata = Some(reader);
        self
    }

    /// Where the session's notifier goes once the mount is live (the kernel's entries are
    /// invalidated through it when an object turns out replaced).
    pub fn notifier_slot(&self) -> Arc<OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    /// Where a duplicate of the session's `/dev/fuse` descriptor goes once the mount is live
    /// (reads that span blocks are replied to through it, see [`reply_data`]). It must be a
    /// `dup` of the descriptor the session reads requests from: the kernel takes a reply only on
    /// the device that read its request, so a session that clones its device per thread
    /// (fuser's `clone_fd`) must leave the slot empty.
    pub fn device_slot(&self) -> Arc<OnceLock<File>> {
        self.device.clone()
    }

    fn attr(&self, ino: u64, node: &Node) -> FileAttr {
        attr_for(ino, node, &self.options, self.mounted_at)
    }

    fn parent_of(&self, ino: u64) -> u64 {
        self.namespace.parent(ino).unwrap_or(ROOT_INO)
    }

    fn add_handle(&self, handle: Handle) -> FileHandle {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().expect("handle table poisoned").insert(fh, handle);
        FileHandle(fh)
    }

    fn directory_handle(&self, fh: FileHandle) -> Option<Arc<Directory>> {
        match self.handles.lock().expect("handle table poisoned").get(&fh.0) {
            Some(Handle::Dir(dir)) => Some(dir.clone()),
            _ => None,
        }
    }

    fn handle(&self, fh: FileHandle) -> Option<Handle> {
        self.handles.lock().expect("handle table poisoned").get(&fh.0).cloned()
    }

    /// Runs `work` on the runtime, off the FUSE session thread.
    fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.runtime.spawn(work);
    }

    /// Runs `work` on this FUSE thread as far as it gets without waiting, then on the runtime:
    /// a read whose blocks are in memory is answered here, without a hop to the I/O threads
    /// (a viewer's section read is two dozen such reads in a row).
    fn run_here_first(&self, work: impl Future<Output = ()> + Send + 'static) {
        let _runtime = self.runtime.enter();
        let mut work = Box::pin(work);
        let mut here = std::task::Context::from_waker(std::task::Waker::noop());
        if work.as_mut().poll(&mut here).is_pending() {
            self.runtime.spawn(work);
        }
    }
}

/// Replies to read request `unique` with `data`. Bytes that span blocks go out as they are, in
/// one `writev` on `device` (the session's own device, duplicated): fuser's [`ReplyData`] takes
/// one contiguous slice, and copying every reply into one buffer first cost a sixth of the
/// mount's CPU on a cold stream.
fn reply_data(device: Option<&File>, unique: u64, reply: ReplyData, data: Slices) {
    /// `struct fuse_out_header`: the reply's length, its error (0), the request's id.
    const HEADER_LEN: usize = 16;
    let (Some(mut device), [_, _, ..]) = (device, data.as_slices()) else {
        return reply.data(&data.into_bytes());
    };
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&((HEADER_LEN + data.len()) as u32).to_ne_bytes());
    header[8..].copy_from_slice(&unique.to_ne_bytes());
    let iov: Vec<IoSlice> =
        std::iter::once(IoSlice::new(&header)).chain(data.as_slices().iter().map(|s| IoSlice::new(s))).collect();
    match device.write_vectored(&iov) {
        // The kernel takes a reply whole or not at all. Dropping fuser's handle of the request
        // now would answer it a second time (with EIO); forgetting it keeps a reference to the
        // session's device, which the process's exit closes.
        Ok(_) => std::mem::forget(reply),
        // No such request: the connection is gone (unmounted, aborted), and with it every
        // request it had (a request read from the device stays until it is answered).
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) => {
            debug!(error = %e, "a read reply found no request: the mount is gone");
            std::mem::forget(reply);
        }
        // Refused before the kernel looked at the request (it never should be): through fuser,
        // in one piece, so that no reader waits forever.
        Err(e) => {
            debug!(error = %e, "a read reply in slices was not taken; sending it in one piece");
            reply.data(&data.into_bytes());
        }
    }
}

/// The attributes of `node`: read-only, owned by the mounting user, sized from the listing.
fn attr_for(ino: u64, node: &Node, options: &FsOptions, mounted_at: SystemTime) -> FileAttr {
    let (kind, perm, size, mtime, nlink) = match (node, node.file()) {
        (Node::Link { target, .. }, _) => (FileType::Symlink, 0o777, target.len() as u64, mounted_at, 1),
        (_, None) => (FileType::Directory, 0o555, 0, mounted_at, 2),
        (_, Some(object)) => (FileType::RegularFile, 0o444, object.size, object.mtime, 1),
    };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind,
        perm,
        nlink,
        uid: options.uid,
        gid: options.gid,
        rdev: 0,
        blksize: IO_BLOCK_SIZE,
        flags: 0,
    }
}

/// The value of extended attribute `name` of a file, view or folder, if it has one. A view's key
/// and URL are those of the Zarr level it shows, a folder's its prefix (`10000/TS_026/`); only
/// files and views have the others. Only `user.cdpfs.cached` asks the block cache.
fn xattr_value(name: &str, node: &Node, bucket: &str, data: &DataPath, views: &Catalog) -> Option<Vec<u8>> {
    let (key, version) = match node {
        Node::Link { .. } | Node::Facet { .. } => return None,
        Node::Dir { prefix } => (prefix, None),
        Node::File(object) => (&object.key, Some(&object.etag)),
        Node::View(view) => (&view.level_prefix, Some(&view.file.etag)),
    };
    let text = match (name, node) {
        ("user.cdpfs.key", _) => key.clone(),
        ("user.cdpfs.etag", _) => version?.trim_matches('"').to_owned(),
        ("user.cdpfs.url", _) => format!("s3://{bucket}/{key}"),
        ("user.cdpfs.cached", Node::File(object)) => data.cache().cached_bytes(object).to_string(),
        ("user.cdpfs.cached", Node::View(view)) => views.cached_bytes(view).to_string(),
        _ => return None,
    };
    Some(text.into_bytes())
}

/// Answers an xattr request: the size when asked for it, `ERANGE` when the buffer is too small.
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if (size as usize) < value.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

/// Drops the kernel's entry `name` in `parent` and the cached pages and attributes of `ino`.
fn invalidate(notifier: &fuser::Notifier, parent: u64, name: &str, ino: u64) {
    if let Err(e) = notifier.inval_entry(INodeNo(parent), OsStr::new(name)) {
        debug!(parent, name, error = %e, "could not invalidate the kernel's entry");
    }
    if let Err(e) = notifier.inval_inode(INodeNo(ino), 0, 0) {
        debug!(ino, error = %e, "could not invalidate the kernel's inode");
    }
}

fn errno(e: &NamespaceError) -> Errno {
    Errno::from_i32(e.errno())
}

fn file_type(node: &Node) -> FileType {
    match node {
        Node::Dir { .. } | Node::Facet { .. } => FileType::Directory,
        Node::File(_) | Node::View(_) => FileType::RegularFile,
        Node::Link { .. } => FileType::Symlink,
    }
}

/// The `user.cryoet.*` attribute names `names`, each followed by NUL.
fn names_of(names: &[impl AsRef<str>]) -> Vec<u8> {
    names.iter().flat_map(|name| name.as_ref().bytes().chain([0])).collect()
}

impl Filesystem for CdpFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // The kernel may refuse larger values; it then keeps its own, which is fine.
        let _ = config.set_max_background(64);
        // Parallel lookups in one folder: each lookup is answered on the runtime anyway, and
        // portal ids looked up together at the root can then go to the API as one batch.
        let _ = config.add_capabilities(
            InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO | InitFlags::FUSE_PARALLEL_DIROPS,
        );
        // Files read past the page cache stay mappable (numpy.memmap, mrcfile's mmap mode) only
        // where the kernel maps them through it anyway.
        if config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP).is_ok() {
            self.data.allow_page_cache_bypass();
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str().map(str::to_owned) else {
            // Every name we show is UTF-8 (S3 keys are), so anything else does not exist.
            reply.error(Errno::ENOENT);
            return;
        };
        let namespace = self.namespace.clone();
        let (options, mounted_at) = (self.options, self.mounted_at);
        self.spawn(async move {
            match namespace.lookup(parent.0, &name).await {
                Ok(entry) => {
                    let attr = attr_for(entry.ino, &entry.node, &options, mounted_at);
                    reply.entry(&options.ttl_of(&entry.node), &attr, Generation(0));
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.namespace.node(ino.0) {
            Ok(Node::Link { target, .. }) => reply.data(target.as_bytes()),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.namespace.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.namespace.node(ino.0) {
            Ok(node) => reply.attr(&self.options.ttl_of(&node), &self.attr(ino.0, &node)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            reply.error(Errno::EROFS);
            return;
        }
        match self.namespace.node(ino.0) {
            // Replaced since it was listed: the kernel then looks the name up again.
            Ok(Node::File(_)) if self.namespace.is_stale(ino.0) => reply.error(Errno::ESTALE),
            Ok(Node::File(object)) => {
                let file = self.data.open(object);
                // Objects are immutable per (key, ETag) and a new ETag gets a new inode, so the
                // kernel may keep cached pages across opens.
                // Past the page cache too: an open without keep-cache would drop the pages that
                // other opens (a mapping, an object read through before) hold.
                let flags = match file.bypasses_page_cache {
                    true => FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_KEEP_CACHE,
                    false => FopenFlags::FOPEN_KEEP_CACHE,
                };
                let fh = self.add_handle(Handle::File(Arc::new(file)));
                reply.opened(fh, flags);
            }
            Ok(Node::View(view)) => {
                // A view's inode follows its Zarr's metadata, not every chunk's version: the
                // kernel drops its pages at each open (re-reads come from cdpfs's memory).
                let fh = self.add_handle(Handle::View(Arc::new(self.views.open(view))));
                reply.opened(fh, FopenFlags::empty());
            }
            Ok(Node::Dir { .. } | Node::Facet { .. }) => reply.error(Errno::EISDIR),
            Ok(Node::Link { .. }) => reply.error(Errno::ELOOP),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let handle = self.handle(fh);
        let (data, views, stats) = (self.data.clone(), self.views.clone(), self.stats.clone());
        let (namespace, notifier, device) = (self.namespace.clone(), self.notifier.clone(), self.device.clone());
        let unique = req.unique().0;
        self.run_here_first(async move {
            let started = std::time::Instant::now();
            let (key, result) = match &handle {
                Some(Handle::File(file)) => (&file.object.key, data.read(file, offset, size).await),
                Some(Handle::View(open)) => (&open.view.file.key, views.read(open, offset, size).await),
                Some(Handle::Dir(_)) | None => return reply.error(Errno::EBADF),
            };
            stats.reads.record(result.as_ref().ok().map(|b| b.len()), started.elapsed());
            let error = match result {
                Ok(data) => return reply_data(device.get(), unique, reply, data),
                Err(e) => e,
            };
            // A failed request was logged once by the store, with its key; anything else here.
            if error.logged() {
                debug!(%key, offset, size, error = %error, "read failed");
            } else {
                warn!(%key, offset, size, error = %error, "read failed");
            }
            // Replaced or deleted since it was listed: the next open must see what is there now.
            let changed = match (&handle, &error) {
                (Some(Handle::File(_)), StoreError::Changed(_) | StoreError::NotFound(_)) => {
                    namespace.object_changed(ino.0, key).await
                }
                _ => None,
            };
            reply.error(Errno::from_i32(error.errno()));
            if let (Some((parent, name)), Some(notifier)) = (changed, notifier.get().cloned()) {
                // The kernel may wait on this very read's pages while it invalidates: never from
                // a FUSE thread nor an I/O worker, and only once the reply is out.
                tokio::task::spawn_blocking(move || invalidate(&notifier, parent, &name, ino.0));
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.lock().expect("handle table poisoned").remove(&fh.0);
        reply.ok();
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock: fuser::LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    // The requests below come from ordinary programs (Python asks `isatty` of every file it
    // opens, `cp` seeks for holes, HDF5 and some pipelines `fsync` what they read): each is
    // answered quietly, as a read-only file system of plain files would, instead of by
    // fuser's default, which logs a warning per request.

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Nothing is ever dirty.
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Not a terminal, nor a device: no ioctl applies (`isatty` is false).
        reply.error(Errno::ENOTTY);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        // SEEK_DATA and SEEK_HOLE: files have no holes, which is what the kernel's own answer
        // (used from now on for this mount) says.
        reply.error(Errno::ENOSYS);
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: fuser::PollNotifier,
        _events: fuser::PollEvents,
        _flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        // A regular file is always ready: the kernel's default answer (used from now on).
        reply.error(Errno::ENOSYS);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let namespace = self.namespace.clone();
        let handles = self.handles.clone();
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.spawn(async move {
            match namespace.directory(ino.0).await {
                Ok(dir) => {
                    // A snapshot: offsets stay valid however long the reader takes.
                    handles.lock().expect("handle table poisoned").insert(fh, Handle::Dir(dir));
                    reply.opened(FileHandle(fh), FopenFlags::empty());
                    // Whoever lists a directory often walks it: list what lies below ahead of them.
                    namespace.warm_subtree(ino.0);
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(dir) = self.directory_handle(fh) else {
            reply.error(Errno::EBADF);
            return;
        };
        let parent = self.parent_of(ino.0);
        let dots = [(ino.0, "."), (parent, "..")];
        let mut position = offset;
        while (position as usize) < dots.len() + dir.entries.len() {
            let i = position as usize;
            position += 1;
            let full = if i < dots.len() {
                reply.add(INodeNo(dots[i].0), position, FileType::Directory, dots[i].1)
            } else {
                let entry = &dir.entries[i - dots.len()];
                reply.add(INodeNo(entry.ino), position, file_type(&entry.node), &entry.name)
            };
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let Some(dir) = self.directory_handle(fh) else {
            reply.error(Errno::EBADF);
            return;
        };
        let ttl = self.options.ttl;
        let mut position = offset;
        // "." and ".." come first; the kernel does not take lookups for them from readdirplus.
        while position < 2 {
            let dot_ino = if position == 0 { ino.0 } else { self.parent_of(ino.0) };
            let node = Node::Dir { prefix: String::new() };
            let attr = self.attr(dot_ino, &node);
            position += 1;
            let name = if position == 1 { "." } else { ".." };
            if reply.add(INodeNo(dot_ino), position, name, &ttl, &attr, Generation(0)) {
                reply.ok();
                return;
            }
        }
        while let Some(entry) = dir.entries.get(position as usize - 2) {
            let attr = self.attr(entry.ino, &entry.node);
            let ttl = self.options.ttl_of(&entry.node);
            if reply.add(INodeNo(entry.ino), position + 1, &entry.name, &ttl, &attr, Generation(0)) {
                break;
            }
            // The kernel takes a lookup of every entry readdirplus returns.
            self.namespace.remember(entry);
            position += 1;
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.handles.lock().expect("handle table poisoned").remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // A read-only remote tree: no free space, no free inodes, large preferred I/O.
        let files = self.namespace.inode_count();
        reply.statfs(0, 0, 0, files, 0, IO_BLOCK_SIZE, 255, IO_BLOCK_SIZE);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS);
        } else if self.namespace.node(ino.0).is_ok() {
            reply.ok();
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if ino.0 == ROOT_INO && name == STATS_XATTR {
            let snapshot = self.stats.snapshot(self.data.cache());
            let json = serde_json::to_vec(&snapshot).expect("a snapshot serializes");
            return reply_xattr(reply, size, &json);
        }
        let node = match self.namespace.node(ino.0) {
            Ok(node) => node,
            Err(e) => return reply.error(errno(&e)),
        };
        // The portal's metadata: only for folders (and their files) the key layout gives a sidecar.
        let portal_folder = name.to_str().filter(|n| n.starts_with(metadata::PREFIX)).and_then(|name| {
            let folder = metadata::folder_of_node(&node)?;
            Some((self.metadata.clone()?, folder, name.to_owned()))
        });
        if let Some((reader, folder, name)) = portal_folder {
            self.spawn(async move {
                match reader.value(&folder, &name).await {
                    Ok(Some(value)) => reply_xattr(reply, size, value.as_bytes()),
                    Ok(None) => reply.error(Errno::from_i32(libc::ENODATA)),
                    Err(e) => reply.error(errno(&e)),
                }
            });
            return;
        }
        // Unknown names (SELinux and ACL probes of `ls -l`, `cp -a`, `rsync -X`) are answered
        // at once, without touching the cache.
        let Some(name) = name.to_str().filter(|n| XATTR_NAMES.contains(n)).map(str::to_owned) else {
            return reply.error(Errno::from_i32(libc::ENODATA));
        };
        let (data, bucket, views) = (self.data.clone(), self.bucket.clone(), self.views.clone());
        let cached = name == "user.cdpfs.cached";
        let answer = move || match xattr_value(&name, &node, &bucket, &data, &views) {
            Some(value) => reply_xattr(reply, size, &value),
            None => reply.error(Errno::from_i32(libc::ENODATA)),
        };
        if cached {
            // It looks at the file's blocks: off the session thread.
            self.spawn(async move { answer() });
        } else {
            answer();
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let node = match self.namespace.node(ino.0) {
            Ok(node) => node,
            Err(e) => return reply.error(errno(&e)),
        };
        let names: Vec<u8> = match &node {
            Node::File(_) | Node::View(_) => names_of(&XATTR_NAMES),
            Node::Dir { .. } if ino.0 == ROOT_INO => names_of(&[&[STATS_XATTR][..], &FOLDER_XATTR_NAMES].concat()),
            Node::Dir { .. } => names_of(&FOLDER_XATTR_NAMES),
            Node::Link { .. } | Node::Facet { .. } => Vec::new(),
        };
        let Some((reader, folder)) = self.metadata.clone().zip(metadata::folder_of_node(&node)) else {
            return reply_xattr(reply, size, &names);
        };
        self.spawn(async move {
            match reader.names(&folder).await {
                Ok(attributes) => reply_xattr(reply, size, &[names, names_of(&attributes)].concat()),
                // The portal metadata cannot be read now (not cached, S3 or the API down): the
                // attributes that need none are still listed (reading a `user.cryoet.*` one
                // says why it cannot be had).
                Err(e) => {
                    debug!(error = %e, "listing attributes without the portal metadata");
                    reply_xattr(reply, size, &names)
                }
            }
        });
    }

    // Everything below would modify the tree: the mount is read-only.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, _r: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _t: &std::path::Path, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(&self, _req: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _wf: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, _f: i32, reply: ReplyCreate) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(&self, _req: &Request, _i: INodeNo, _n: &OsStr, _v: &[u8], _f: i32, _p: u32, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _i: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(&self, _req: &Request, _i: INodeNo, _fh: FileHandle, _o: u64, _l: u64, _m: i32, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_portal_maps_entries_are_cached_no_longer_than_the_apis_answers() {
        let options = FsOptions { uid: 0, gid: 0, ttl: Duration::from_secs(3600), portal_ttl: Duration::from_secs(60) };
        let link = Node::Link { path: "RN-241".into(), target: "10000/TS_026".into() };
        let facet = Node::Facet { path: "by-organism".into() };
        let folder = Node::Dir { prefix: "10000/".into() };
        assert_eq!(options.ttl_of(&link), Duration::from_secs(60));
        assert_eq!(options.ttl_of(&facet), Duration::from_secs(60));
        assert_eq!(options.ttl_of(&folder), Duration::from_secs(3600));
        let longer = FsOptions { portal_ttl: Duration::from_secs(86_400), ..options };
        assert_eq!(longer.ttl_of(&link), Duration::from_secs(3600), "never longer than --metadata-ttl");
    }
}
