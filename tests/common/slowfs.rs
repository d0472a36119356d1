//! A small in-memory FUSE filesystem whose writes are slow and whose file reads can be made to
//! hang: a stand-in for the cache directories cdpfs meets on clusters (a busy node disk, an NFS
//! or Lustre server that stops answering). Mounted in the test process itself.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, OpenFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request,
};

/// What the test can change while the filesystem is mounted.
#[derive(Default)]
pub struct Controls {
    /// Each write request sleeps this many milliseconds.
    pub write_delay_ms: AtomicU64,
    /// While set, opening or reading a file blocks (listing and stat still answer).
    pub hang_reads: AtomicBool,
    /// Bytes written so far.
    pub written: AtomicU64,
    /// While set, creating or opening a file with `O_DIRECT` fails with `EINVAL`, as on file
    /// systems without direct I/O.
    pub refuse_direct: AtomicBool,
    /// `O_DIRECT` opens refused so far.
    pub refused_direct: AtomicU64,
}

enum Node {
    Dir(BTreeMap<String, u64>),
    File(Vec<u8>),
}

struct Tree {
    nodes: HashMap<u64, Node>,
    next: u64,
}

struct SlowFs {
    tree: Mutex<Tree>,
    controls: Arc<Controls>,
}

const TTL: Duration = Duration::from_secs(0);

fn attr(ino: u64, node: &Node) -> FileAttr {
    let (kind, perm, size) = match node {
        Node::Dir(_) => (FileType::Directory, 0o755, 0),
        Node::File(data) => (FileType::RegularFile, 0o644, data.len() as u64),
    };
    let now = SystemTime::now();
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind,
        perm,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Tree {
    fn child(&self, parent: INodeNo, name: &OsStr) -> Option<u64> {
        match self.nodes.get(&parent.0) {
            Some(Node::Dir(children)) => children.get(name.to_str()?).copied(),
            _ => None,
        }
    }
}

impl SlowFs {
    /// Adds `node` as `name` under `parent`, replacing what was there; its inode and attributes.
    fn add(&self, parent: INodeNo, name: &OsStr, node: Node) -> Result<FileAttr, Errno> {
        let mut tree = self.tree.lock().unwrap();
        let ino = tree.next;
        tree.next += 1;
        let attr = attr(ino, &node);
        tree.nodes.insert(ino, node);
        match tree.nodes.get_mut(&parent.0) {
            Some(Node::Dir(children)) => children.insert(name.to_string_lossy().into_owned(), ino),
            _ => return Err(Errno::ENOTDIR),
        };
        Ok(attr)
    }

    fn wait_while_hung(&self) {
        while self.controls.hang_reads.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether an open with `flags` is refused for asking for direct I/O (and counts it).
    fn refuses(&self, flags: i32) -> bool {
        let refused = flags & libc::O_DIRECT != 0 && self.controls.refuse_direct.load(Ordering::SeqCst);
        if refused {
            self.controls.refused_direct.fetch_add(1, Ordering::SeqCst);
        }
        refused
    }
}

impl Filesystem for SlowFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let tree = self.tree.lock().unwrap();
        match tree.child(parent, name).and_then(|ino| tree.nodes.get(&ino).map(|n| attr(ino, n))) {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.tree.lock().unwrap().nodes.get(&ino.0) {
            Some(node) => reply.attr(&TTL, &attr(ino.0, node)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
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
        let mut tree = self.tree.lock().unwrap();
        let Some(node) = tree.nodes.get_mut(&ino.0) else { return reply.error(Errno::ENOENT) };
        if let (Node::File(data), Some(size)) = (&mut *node, size) {
            data.resize(size as usize, 0);
        }
        reply.attr(&TTL, &attr(ino.0, node));
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, _mode: u32, _umask: u32, reply: ReplyEntry) {
        if self.tree.lock().unwrap().child(parent, name).is_some() {
            return reply.error(Errno::EEXIST);
        }
        match self.add(parent, name, Node::Dir(BTreeMap::new())) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if self.refuses(flags) {
            return reply.error(Errno::EINVAL);
        }
        match self.add(parent, name, Node::File(Vec::new())) {
            Ok(attr) => reply.created(&TTL, &attr, Generation(0), FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.wait_while_hung();
        if self.refuses(flags.0) {
            return reply.error(Errno::EINVAL);
        }
        let mut tree = self.tree.lock().unwrap();
        match tree.nodes.get_mut(&ino.0) {
            Some(Node::File(data)) => {
                if flags.0 & libc::O_TRUNC != 0 {
                    data.clear();
                }
                reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO)
            }
            Some(Node::Dir(_)) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        self.wait_while_hung();
        match self.tree.lock().unwrap().nodes.get(&ino.0) {
            Some(Node::File(data)) => {
                let start = (offset as usize).min(data.len());
                reply.data(&data[start..(start + size as usize).min(data.len())])
            }
            _ => reply.error(Errno::EISDIR),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        bytes: &[u8],
        _wf: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        std::thread::sleep(Duration::from_millis(self.controls.write_delay_ms.load(Ordering::SeqCst)));
        let mut tree = self.tree.lock().unwrap();
        let Some(Node::File(data)) = tree.nodes.get_mut(&ino.0) else { return reply.error(Errno::EISDIR) };
        let end = offset as usize + bytes.len();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[offset as usize..end].copy_from_slice(bytes);
        self.controls.written.fetch_add(bytes.len() as u64, Ordering::SeqCst);
        reply.written(bytes.len() as u32);
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock: fuser::LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut tree = self.tree.lock().unwrap();
        let name = name.to_string_lossy().into_owned();
        let Some(Node::Dir(children)) = tree.nodes.get_mut(&parent.0) else { return reply.error(Errno::ENOTDIR) };
        let Some(ino) = children.remove(&name) else { return reply.error(Errno::ENOENT) };
        let Some(Node::Dir(children)) = tree.nodes.get_mut(&new_parent.0) else { return reply.error(Errno::ENOTDIR) };
        children.insert(new_name.to_string_lossy().into_owned(), ino);
        reply.ok();
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut tree = self.tree.lock().unwrap();
        let Some(Node::Dir(children)) = tree.nodes.get_mut(&parent.0) else { return reply.error(Errno::ENOTDIR) };
        match children.remove(name.to_str().unwrap_or_default()) {
            Some(ino) => {
                tree.nodes.remove(&ino);
                reply.ok()
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let tree = self.tree.lock().unwrap();
        let Some(Node::Dir(children)) = tree.nodes.get(&ino.0) else { return reply.error(Errno::ENOTDIR) };
        for (i, (name, child)) in children.iter().enumerate().skip(offset as usize) {
            let kind = match tree.nodes.get(child) {
                Some(Node::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            if reply.add(INodeNo(*child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted [`SlowFs`]; unmounted on drop (after releasing any hang).
pub struct SlowMount {
    /// Where it is mounted.
    pub path: PathBuf,
    /// Its knobs.
    pub controls: Arc<Controls>,
    session: Option<fuser::BackgroundSession>,
}

impl SlowMount {
    /// Mounts an empty slow filesystem at `path` (created if needed).
    pub fn new(path: &Path) -> SlowMount {
        std::fs::create_dir_all(path).unwrap();
        let controls = Arc::new(Controls::default());
        let tree = Tree { nodes: HashMap::from([(1, Node::Dir(BTreeMap::new()))]), next: 2 };
        let fs = SlowFs { tree: Mutex::new(tree), controls: controls.clone() };
        let mut config = fuser::Config::default();
        config.mount_options = vec![fuser::MountOption::FSName("slowfs".into())];
        config.n_threads = Some(4);
        let session = fuser::spawn_mount(fs, path, &config).expect("mounting the slow test filesystem");
        SlowMount { path: path.to_path_buf(), controls, session: Some(session) }
    }
}

impl Drop for SlowMount {
    fn drop(&mut self) {
        self.controls.hang_reads.store(false, Ordering::SeqCst);
        self.controls.write_delay_ms.store(0, Ordering::SeqCst);
        let _ = std::process::Command::new("fusermount3").arg("-u").arg("-z").arg(&self.path).status();
        drop(self.session.take());
    }
}
