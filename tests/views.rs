//! MRC views of OME-Zarr pyramids, through a real mount of Zarrs written by Python's zarr:
//! listing, sizes, bytes (checked with mrcfile against the Zarr levels and reference MRCs),
//! which chunks a section read fetches, the disk cache, and RELION when it is installed.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use common::{quiet, scratch_dir, start_server, Faults, Mounted, Server, BUCKET};

const TOMO_DIR: &str = "10000/TS_026/Reconstructions/VoxelSpacing13.480/Tomograms/100";
const MASK_DIR: &str = "10000/TS_026/Reconstructions/VoxelSpacing13.480/Annotations/101";
const BIG_DIR: &str = "10002/big/Reconstructions/VoxelSpacing10.000/Tomograms/100";
const WIDE_DIR: &str = "10002/wide/Reconstructions/VoxelSpacing10.000/Tomograms/100";

/// The Zarr fixtures (written once per test binary by `tests/fixtures/zarr_views.py`) and a
/// server for them; `None` when no Python with zarr is available.
fn fixture() -> Option<&'static (PathBuf, Server, String)> {
    static FIXTURE: OnceLock<Option<(PathBuf, Server, String)>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            let python = common::python()?;
            let root = scratch_dir("zarr-views");
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/zarr_views.py");
            let out = Command::new(&python).arg(script).arg(&root).arg(BUCKET).output().unwrap();
            assert!(out.status.success(), "fixture script failed: {}", String::from_utf8_lossy(&out.stderr));
            let server = start_server(&root, Faults::default());
            Some((root, server, python))
        })
        .as_ref()
}

/// The tests share one server and some count its GETs: they run one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn names(dir: &std::path::Path) -> BTreeSet<String> {
    fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
}

fn views(dir: &std::path::Path) -> BTreeSet<String> {
    names(dir).into_iter().filter(|n| n.contains(".bin") && n.ends_with(".mrc")).collect()
}

#[test]
fn views_are_listed_beside_each_pyramid_with_exact_sizes() {
    let Some((_, server, _)) = fixture() else { return };
    let _serial = serial();
    let before = server.served.lock().unwrap().len();
    let mount = Mounted::on(server, "views-list", &[]);
    // A real MRC exists: no bin1 view.
    assert_eq!(views(&mount.join(TOMO_DIR)), BTreeSet::from(["TS_026.bin2.mrc".into(), "TS_026.bin4.mrc".into()]));
    let masks: BTreeSet<String> = ["segmentationmask", "instancesegmentationmask"]
        .iter()
        .flat_map(|kind| [1, 2, 4].map(|bin| format!("membrane-1.0_{kind}.bin{bin}.mrc")))
        .collect();
    assert_eq!(views(&mount.join(MASK_DIR)), masks);
    let others = mount.join("10000/TS_026/Reconstructions/VoxelSpacing13.480/Annotations/102");
    assert_eq!(views(&others).len(), 9, "{:?}", views(&others));
    // Views are plain read-only files; stat needs no chunk.
    let bin4 = fs::metadata(mount.join(TOMO_DIR).join("TS_026.bin4.mrc")).unwrap();
    assert!(bin4.is_file());
    assert_eq!(bin4.len(), 1024 + 10 * 18 * 23 * 4);
    let mask = fs::metadata(mount.join(MASK_DIR).join("membrane-1.0_instancesegmentationmask.bin1.mrc")).unwrap();
    assert_eq!(mask.len(), 1024 + 33 * 47 * 61 * 2);
    let fetched = chunk_gets(server, before);
    let chunks: Vec<&String> = fetched.iter().filter(|key| !key.contains("/.z") && !key.starts_with(".z")).collect();
    assert!(chunks.is_empty(), "listing and stat fetched chunks: {chunks:?}");
    // A Zarr with another compressor, and one without multiscales, get no views.
    let odd = mount.join("10000/TS_026/Reconstructions/VoxelSpacing13.480/Tomograms/101");
    assert_eq!(names(&odd), BTreeSet::from(["odd.zarr".into(), "plain.zarr".into()]));
    // Writes are refused like anywhere else.
    let write = fs::OpenOptions::new().write(true).open(mount.join(TOMO_DIR).join("TS_026.bin2.mrc"));
    assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::EROFS));

    let off = Mounted::on(server, "views-off", &["--no-mrc-views"]);
    assert!(views(&off.join(TOMO_DIR)).is_empty());
    assert!(views(&off.join(MASK_DIR)).is_empty());
}

#[test]
fn views_equal_the_zarr_levels_and_reference_mrcs() {
    let Some((root, server, python)) = fixture() else { return };
    let _serial = serial();
    let mount = Mounted::on(server, "views-python", &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/check_views.py");
    let (source, refs) = (root.join(BUCKET), root.join("refs"));
    let args = [script.as_ref(), mount.path.as_os_str(), source.as_os_str(), refs.as_os_str()];
    common::run_python(python, &args, "views-ok 22");
}

/// The chunk keys (below `.zarr/`) of the object GETs served since `from`.
fn chunk_gets(server: &Server, from: usize) -> BTreeSet<String> {
    let served = server.served.lock().unwrap();
    served[from..]
        .iter()
        .map(|line| line.split(' ').next().unwrap().split(".zarr/").nth(1).unwrap_or(line).to_owned())
        .collect()
}

#[test]
fn a_section_read_fetches_only_the_chunks_of_its_z_range_and_cached_views_need_no_gets() {
    let Some((root, server, _)) = fixture() else { return };
    let _serial = serial();
    let cache = scratch_dir("views-cache");
    let mount = Mounted::on(server, "views-section", &["--cache-dir", cache.to_str().unwrap()]);
    let path = mount.join(BIG_DIR).join("big.bin1.mrc");
    let reference = fs::read(root.join("refs").join(format!("{}_big.bin1.mrc", BIG_DIR.replace('/', "_")))).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), reference.len() as u64);

    // Section z = 20 of a (64, 256, 256) float32 level with (16, 128, 128) chunks: chunk row 1.
    let file = File::open(&path).unwrap();
    // SAFETY: a valid descriptor; advice only. No kernel read-ahead past the section.
    assert_eq!(unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) }, 0);
    let before = server.served.lock().unwrap().len();
    let section = 256 * 256 * 4;
    let offset = 1024 + 20 * section;
    let mut buf = vec![0u8; section];
    file.read_exact_at(&mut buf, offset as u64).unwrap();
    assert!(buf == reference[offset..offset + section], "section bytes differ from the reference MRC");
    let fetched = chunk_gets(server, before);
    let row: BTreeSet<String> = ["0/1/0/0", "0/1/0/1", "0/1/1/0", "0/1/1/1"].map(String::from).into();
    assert_eq!(fetched, row, "a section must fetch exactly the chunks of its z range");

    // The header: the kernel reads its whole page, so at most the first section's chunks
    // (once the section read's chunk read-ahead has landed).
    let before = quiet(server);
    let mut header = [0u8; 1024];
    file.read_exact_at(&mut header, 0).unwrap();
    assert_eq!(&header[..12], &reference[..12]);
    let fetched = chunk_gets(server, before);
    assert!(fetched.iter().all(|key| key.starts_with("0/0/")), "a header read fetched {fetched:?}");

    // The whole view, then again from a new mount over the same cache: no chunk is fetched.
    let bin2 = mount.join(BIG_DIR).join("big.bin2.mrc");
    let first = fs::read(&bin2).unwrap();
    drop(file);
    drop(mount);
    let before = server.served.lock().unwrap().len();
    let again = Mounted::on(server, "views-section-again", &["--cache-dir", cache.to_str().unwrap()]);
    let lists_before = server.lists.load(std::sync::atomic::Ordering::SeqCst);
    let second = fs::read(again.join(BIG_DIR).join("big.bin2.mrc")).unwrap();
    assert!(first == second);
    let fetched = chunk_gets(server, before);
    assert!(fetched.is_empty(), "a remount over a warm cache fetched {fetched:?}");
    // Nor is anything listed (past the mount's own check of the bucket): the level's chunk
    // listing was saved like the folders' listings.
    let lists = server.lists.load(std::sync::atomic::Ordering::SeqCst) - lists_before;
    assert_eq!(lists, 0, "a remount over a warm cache listed again");
    let cached = cdpfs::stage::xattr(&again.join(BIG_DIR).join("big.bin2.mrc"), "user.cdpfs.cached").unwrap();
    assert_eq!(cached, first.len().to_string());
    let key = cdpfs::stage::xattr(&again.join(BIG_DIR).join("big.bin2.mrc"), "user.cdpfs.key").unwrap();
    assert_eq!(key, format!("{BIG_DIR}/big.zarr/1/"));
    // And with S3 out of reach (--offline: nothing is asked), the view is served from the cache.
    drop(again);
    let offline = Mounted::on(server, "views-offline", &["--cache-dir", cache.to_str().unwrap(), "--offline"]);
    let third = fs::read(offline.join(BIG_DIR).join("big.bin2.mrc")).unwrap();
    assert!(first == third, "the view read offline differs");
}

/// `mrcfile.open(header_only=True)`, RELION and IMOD read a view's header with stdio: one
/// buffered read of the file's block size (1 MiB) at its start. That fetches the chunks its
/// buffer covers (the first chunk row of `big.bin1.mrc`: 4 of its 256 KiB sections) and none
/// beyond (a stream's read-ahead would compute the whole view from all its chunks).
#[test]
fn a_buffered_header_read_of_a_view_fetches_the_chunks_of_its_buffer_only() {
    let Some((root, server, _)) = fixture() else { return };
    let _serial = serial();
    let mount = Mounted::on(server, "views-header", &[]);
    let path = mount.join(BIG_DIR).join("big.bin1.mrc");
    let reference = fs::read(root.join("refs").join(format!("{}_big.bin1.mrc", BIG_DIR.replace('/', "_")))).unwrap();
    let before = quiet(server);
    let mut buffer = vec![0u8; (1 << 20) + 16];
    let unaligned = &mut buffer[16..];
    let n = std::io::Read::read(&mut File::open(&path).unwrap(), unaligned).unwrap();
    // The header is cdpfs's own (labels, statistics): its dimensions and the voxels are the reference's.
    assert!(n > 1024 && unaligned[..12] == reference[..12] && unaligned[1024..n] == reference[1024..n]);
    quiet(server);
    let fetched = chunk_gets(server, before);
    let chunks: Vec<&String> = fetched.iter().filter(|key| !key.contains(".z")).collect();
    assert!(!chunks.is_empty() && chunks.iter().all(|key| key.starts_with("0/0/")), "a header read fetched {chunks:?}");
    // Going on from it (`dd`, `cp`, `mrcfile.open()`): the whole view.
    assert!(fs::read(&path).unwrap()[1024..] == reference[1024..], "the view read through differs");
}

/// A view block is computed from up to bin^3 times its bytes of decoded chunk data, and a
/// reader's read-ahead computes many blocks at once: reading a view of the portal's chunks
/// (256^3, a section across 3 x 3 of them) stays within `--max-memory` (RSS growth of the
/// mount's process), and with no disk tier each chunk byte is still fetched about once.
#[test]
fn reading_a_view_stays_within_the_memory_budget_and_fetches_each_chunk_once() {
    let Some((root, server, _)) = fixture() else { return };
    let _serial = serial();
    let reference = fs::read(root.join("refs").join(format!("{}_wide.bin1.mrc", WIDE_DIR.replace('/', "_")))).unwrap();
    let level = root.join(common::BUCKET).join(WIDE_DIR).join("wide.zarr/0");
    let chunk_bytes: u64 = walk(&level).iter().map(|p| fs::metadata(p).unwrap().len()).sum();
    let cache = scratch_dir("views-memory-cache");
    let with_disk = ["--max-memory", "32M", "--cache-dir", cache.to_str().unwrap()];
    let without_disk = ["--max-memory", "128M", "--no-disk-cache"];
    for (name, args, budget) in
        [("views-memory", &with_disk[..], 32u64 << 20), ("views-memory-ram", &without_disk, 128 << 20)]
    {
        let mount = Mounted::on(server, name, args);
        let path = mount.join(WIDE_DIR).join("wide.bin1.mrc");
        assert_eq!(fs::metadata(&path).unwrap().len(), reference.len() as u64);
        let idle = common::process_memory(&mount.path, "VmRSS:");
        let before = server.bytes.load(std::sync::atomic::Ordering::SeqCst);
        let read = fs::read(&path).unwrap();
        assert!(read[1024..] == reference[1024..], "{name}: the view's voxels differ from the reference MRC's");
        let fetched = server.bytes.load(std::sync::atomic::Ordering::SeqCst) - before;
        let growth = common::process_memory(&mount.path, "VmHWM:").saturating_sub(idle);
        eprintln!("{name}: RSS grew by {} MiB, fetched {fetched} bytes for {chunk_bytes} of chunks", growth >> 20);
        assert!(growth <= budget * 11 / 10, "{name}: RSS grew by {} MiB over {} MiB", growth >> 20, budget >> 20);
        assert!(fetched <= chunk_bytes * 12 / 10, "{name}: fetched {fetched} bytes for {chunk_bytes} of chunks");
    }
}

/// Every file below `dir`.
fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .flat_map(|e| {
            let path = e.unwrap().path();
            if path.is_dir() {
                walk(&path)
            } else {
                vec![path]
            }
        })
        .collect()
}

#[test]
fn relion_reads_a_binned_view() {
    let Some((_, server, _)) = fixture() else { return };
    if Command::new("relion_image_handler").arg("--version").output().is_err() {
        assert!(std::env::var_os("CDPFS_REQUIRE_RELION").is_none(), "relion_image_handler is not installed");
        eprintln!("SKIPPED: relion_image_handler not installed");
        return;
    }
    let _serial = serial();
    let mount = Mounted::on(server, "views-relion", &[]);
    let view = mount.join(TOMO_DIR).join("TS_026.bin4.mrc");
    let out = Command::new("relion_image_handler").arg("--i").arg(&view).arg("--stats").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "relion_image_handler failed: {text}");
    eprintln!("relion_image_handler --stats: {text}");
    assert!(text.contains("23 x 18 x 10"), "RELION saw other dimensions: {text}");
}
