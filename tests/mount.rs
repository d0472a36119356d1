//! The mount end to end: a real S3 server on loopback, the real `cdpfs` binary, a real FUSE
//! mount, read with std I/O (and Python's mrcfile and zarr where available).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{shared, Mounted, FRAMES, TOMO_DIR};
use serde_json::json;

/// Every file under `dir`, as a path relative to `base`, with its size.
fn walk(base: &Path, dir: &Path, files: &mut BTreeMap<String, u64>, dirs: &mut BTreeSet<String>) {
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let rel = path.strip_prefix(base).unwrap().to_str().unwrap().to_owned();
        let meta = fs::metadata(&path).unwrap();
        if meta.is_dir() {
            assert_eq!(meta.permissions().mode() & 0o777, 0o555, "{rel}");
            dirs.insert(rel);
            walk(base, &path, files, dirs);
        } else {
            assert!(meta.is_file(), "{rel} is neither file nor directory");
            assert_eq!(meta.permissions().mode() & 0o777, 0o444, "{rel}");
            files.insert(rel, meta.len());
        }
    }
}

#[test]
fn tree_sizes_mtimes_and_bytes_match_the_bucket() {
    let (fixture, _) = shared();
    let mount = Mounted::new("tree", &[]);

    let mut files = BTreeMap::new();
    let mut dirs = BTreeSet::new();
    walk(&mount.path, &mount.path, &mut files, &mut dirs);
    let mut expected: BTreeMap<String, u64> =
        fixture.objects.iter().map(|(k, v)| (k.clone(), v.len() as u64)).collect();
    // The OME-Zarr's binned levels also show as MRC views (tests/views.rs checks their bytes).
    expected.insert(format!("{TOMO_DIR}/TS_026.bin2.mrc"), 1024 + 32 * 64 * 64 * 4);
    expected.insert(format!("{TOMO_DIR}/TS_026.bin4.mrc"), 1024 + 16 * 32 * 32 * 4);
    assert_eq!(files, expected, "file tree or sizes differ from the bucket");
    let expected_dirs: BTreeSet<String> = fixture
        .objects
        .keys()
        .flat_map(|k| {
            let parts: Vec<&str> = k.split('/').collect();
            (1..parts.len()).map(move |n| parts[..n].join("/"))
        })
        .collect();
    assert_eq!(dirs, expected_dirs);

    let frames = fs::read_dir(mount.join("10000/TS_026/Frames")).unwrap().count();
    assert_eq!(frames, FRAMES + 1, "a directory of more than 1000 keys must list every page");

    for (key, bytes) in &fixture.objects {
        let meta = fs::metadata(mount.join(key)).unwrap();
        let source_mtime = fs::metadata(fixture.path(key)).unwrap().modified().unwrap();
        let shown = meta.modified().unwrap();
        let skew = shown.duration_since(source_mtime).unwrap_or_else(|e| e.duration());
        assert!(skew <= Duration::from_secs(1), "{key}: mtime {shown:?} vs {source_mtime:?}");
        assert_eq!(meta.uid(), 0, "files are owned by the mounting user");
        assert_eq!(&fs::read(mount.join(key)).unwrap(), bytes, "{key}: bytes differ");
    }
}

/// Inodes the mount holds for the kernel (its `statfs` file count).
fn inodes_held(path: &Path) -> u64 {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path and a zeroed statvfs to fill.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) }, 0);
    stat.f_files
}

#[test]
fn inodes_the_kernel_forgets_leave_the_table_and_everything_still_reads() {
    let (fixture, _) = shared();
    let mount = Mounted::new("forget", &[]);
    let (mut files, mut dirs) = (BTreeMap::new(), BTreeSet::new());
    walk(&mount.path, &mount.path, &mut files, &mut dirs);
    let held = inodes_held(&mount.path);
    assert!(held as usize > files.len(), "{held} inodes held after stat-ing {} files", files.len());
    // Make the kernel drop its unused dentries and inodes: it sends FORGET for each.
    if fs::write("/proc/sys/vm/drop_caches", "2").is_err() {
        eprintln!("SKIPPED: cannot write /proc/sys/vm/drop_caches (needs root outside a container)");
        return;
    }
    let started = Instant::now();
    while inodes_held(&mount.path) > held / 4 && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    // The kernel's FORGETs come in batches: wait until they have stopped before counting.
    let mut after = inodes_held(&mount.path);
    while started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(300));
        let now = inodes_held(&mount.path);
        if now == after {
            break;
        }
        after = now;
    }
    assert!(after <= held / 4, "still {after} of {held} inodes held after the kernel dropped its caches");
    for (key, bytes) in fixture.objects.iter().step_by(50) {
        assert!(fs::read(mount.join(key)).unwrap() == *bytes, "{key} after forget");
    }
    assert!(inodes_held(&mount.path) > after);
}

/// Reads `len` bytes at `offset` (looping over short reads, stopping at EOF) and compares them,
/// and their count, with the same range of `source`.
fn read_matches(file: &File, source: &[u8], offset: u64, len: usize) -> Result<(), String> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = file.read_at(&mut buf[got..], offset + got as u64).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let start = (offset as usize).min(source.len());
    let end = (offset as usize).saturating_add(len).min(source.len());
    if got != end - start {
        return Err(format!("read of {len} bytes at {offset} returned {got} bytes, expected {}", end - start));
    }
    if buf[..got] != source[start..end] {
        return Err(format!("read of {len} bytes at {offset} returned wrong bytes"));
    }
    Ok(())
}

#[test]
fn random_preads_match_the_source_including_at_and_past_eof() {
    let (fixture, _) = shared();
    let mount = Mounted::new("pread", &[]);
    let key = format!("{TOMO_DIR}/TS_026.mrc");
    let source = &fixture.objects[&key];
    let size = source.len() as u64;
    let file = File::open(mount.join(&key)).unwrap();
    let mut state = 0x1234_5678_9abc_def1u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut cases: Vec<(u64, usize)> = (0..150).map(|_| (next() % size, (next() % 300_000) as usize + 1)).collect();
    cases.extend([(0, 1024), (1, 1), (size - 1, 1), (size - 10, 100), (size, 10), (size + 4096, 10), (4095, 8193)]);
    for (offset, len) in cases {
        read_matches(&file, source, offset, len).unwrap();
    }
}

#[test]
fn eight_threads_read_different_files_at_once() {
    let (fixture, _) = shared();
    let mount = Mounted::new("parallel", &[]);
    let keys: Vec<String> = vec![
        format!("{TOMO_DIR}/TS_026.mrc"),
        "10001/24apr23a_Position_12/TiltSeries/100/24apr23a_Position_12.mrc".into(),
        format!("{TOMO_DIR}/TS_026.zarr/0/0/0/0"),
        format!("{TOMO_DIR}/TS_026.zarr/0/1/1/1"),
        format!("{TOMO_DIR}/TS_026.zarr/1/0/0/0"),
        "10000/dataset_metadata.json".into(),
        "10000/TS_026/Frames/frame_0999.tif".into(),
        format!("{TOMO_DIR}/tomogram_metadata.json"),
    ];
    std::thread::scope(|scope| {
        for key in &keys {
            let path = mount.join(key);
            let expected = &fixture.objects[key];
            scope.spawn(move || {
                let mut bytes = Vec::new();
                File::open(&path).unwrap().read_to_end(&mut bytes).unwrap();
                assert!(&bytes == expected, "{key}: bytes differ");
            });
        }
    });
}

fn raw_os_error<T: std::fmt::Debug>(result: std::io::Result<T>) -> i32 {
    result.expect_err("the operation should have failed").raw_os_error().unwrap()
}

fn c(path: &Path) -> CString {
    CString::new(path.to_str().unwrap()).unwrap()
}

#[test]
fn every_write_is_erofs_and_missing_names_are_enoent() {
    let mount = Mounted::new("readonly", &[]);
    let file = mount.join("10000/dataset_metadata.json");
    let dir = mount.join("10000");
    let erofs = libc::EROFS;
    assert_eq!(raw_os_error(OpenOptions::new().write(true).open(&file)), erofs);
    assert_eq!(raw_os_error(OpenOptions::new().append(true).open(&file)), erofs);
    assert_eq!(raw_os_error(OpenOptions::new().read(true).write(true).open(&file)), erofs);
    assert_eq!(raw_os_error(File::create(dir.join("new.json"))), erofs);
    assert_eq!(raw_os_error(fs::create_dir(dir.join("newdir"))), erofs);
    assert_eq!(raw_os_error(fs::remove_file(&file)), erofs);
    assert_eq!(raw_os_error(fs::remove_dir(mount.join("10001/24apr23a_Position_12"))), erofs);
    assert_eq!(raw_os_error(fs::rename(&file, dir.join("moved.json"))), erofs);
    assert_eq!(raw_os_error(std::os::unix::fs::symlink("x", dir.join("link"))), erofs);
    assert_eq!(raw_os_error(fs::hard_link(&file, dir.join("hard"))), erofs);
    assert_eq!(raw_os_error(fs::set_permissions(&file, fs::Permissions::from_mode(0o644))), erofs);
    let truncate = unsafe { libc::truncate(c(&file).as_ptr(), 0) };
    assert_eq!((truncate, std::io::Error::last_os_error().raw_os_error()), (-1, Some(erofs)));
    let name = CString::new("user.test").unwrap();
    let set = unsafe { libc::setxattr(c(&file).as_ptr(), name.as_ptr(), b"v".as_ptr().cast(), 1, 0) };
    assert_eq!((set, std::io::Error::last_os_error().raw_os_error()), (-1, Some(erofs)));
    let mkfifo = unsafe { libc::mkfifo(c(&dir.join("fifo")).as_ptr(), 0o644) };
    assert_eq!((mkfifo, std::io::Error::last_os_error().raw_os_error()), (-1, Some(erofs)));
    // The file is unchanged and still readable.
    assert!(fs::read(&file).unwrap().starts_with(b"{"));

    for missing in ["nope", "10000/nope.json", "10000/TS_026/nope/deeper", "10000/TS_026/Frames/frame_9999.tif"] {
        let error = fs::metadata(mount.join(missing)).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::NotFound, "{missing}");
    }
    assert_eq!(raw_os_error(fs::read_dir(&file)), libc::ENOTDIR);
}

#[test]
fn statfs_and_root_look_sensible() {
    let mount = Mounted::new("statfs", &[]);
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c(&mount.path).as_ptr(), &mut stat) }, 0);
    assert_eq!(stat.f_namemax, 255);
    assert!(stat.f_flag & libc::ST_RDONLY != 0, "mounted read-only");
    let top: BTreeSet<String> =
        fs::read_dir(&mount.path).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(top, ["10000", "10001", "depositions_metadata"].map(String::from).into());
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts.lines().find(|l| l.contains(mount.path.to_str().unwrap())).unwrap();
    assert!(line.contains("fuse.cdpfs") && line.contains("ro,"), "{line}");
}

/// What ordinary programs ask of a file besides reading it - Python's `isatty` on every open,
/// `cp`'s hole search, `fsync`, `poll` - gets a plain file's answers, and no warnings in the log
/// (fuser's defaults logged one per Python open).
#[test]
fn isatty_hole_search_fsync_and_poll_answer_as_for_a_plain_file_without_warnings() {
    let (fixture, _) = shared();
    let log = common::scratch_dir("quiet-log").join("cdpfs.log");
    let mount = Mounted::new("quiet", &["--log-file", log.to_str().unwrap()]);
    let key = format!("{TOMO_DIR}/TS_026.mrc");
    let size = fixture.objects[&key].len() as i64;
    for _ in 0..3 {
        let file = File::open(mount.join(&key)).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: TCGETS writes a termios into the one given.
        let tty = unsafe { libc::ioctl(fd, libc::TCGETS, &mut termios) };
        assert_eq!((tty, std::io::Error::last_os_error().raw_os_error()), (-1, Some(libc::ENOTTY)), "isatty");
        // SAFETY: plain syscalls on an open descriptor.
        unsafe {
            assert_eq!(libc::lseek(fd, 5, libc::SEEK_DATA), 5);
            assert_eq!(libc::lseek(fd, 5, libc::SEEK_HOLE), size, "no holes");
            assert_eq!(libc::lseek(fd, size, libc::SEEK_DATA), -1);
            assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ENXIO));
            assert_eq!(libc::fsync(fd), 0);
            let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            assert_eq!(libc::poll(&mut poll, 1, 0), 1);
            assert!(poll.revents & libc::POLLIN != 0);
        }
    }
    let copy = common::scratch_dir("quiet-copy").join("TS_026.mrc");
    let cp = std::process::Command::new("cp").arg(mount.join(&key)).arg(&copy).status().unwrap();
    assert!(cp.success());
    assert!(fs::read(&copy).unwrap() == fixture.objects[&key], "cp copies the bytes");
    let logged = fs::read_to_string(&log).unwrap();
    assert!(!logged.contains("WARN") && !logged.contains("Not Implemented"), "{logged}");
}

/// `cdpfs info` of a file, an MRC view and folders, on a mount of the whole bucket and of a
/// `--prefix`: each named for what it is, with its key in the bucket.
#[test]
fn info_names_files_views_and_folders_with_their_bucket_keys() {
    let info = |path: &Path| -> (String, serde_json::Value) {
        let text = common::run_cdpfs(&["info", path.to_str().unwrap()], Duration::from_secs(30));
        assert!(text.status.success(), "{}", String::from_utf8_lossy(&text.stderr));
        let json = common::run_cdpfs(&["info", "--json", path.to_str().unwrap()], Duration::from_secs(30));
        let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        (String::from_utf8(text.stdout).unwrap(), report)
    };
    let mount = Mounted::new("info-kinds", &["--no-portal-api"]);
    let mrc = format!("{TOMO_DIR}/TS_026.mrc");
    let (text, report) = info(&mount.join(&mrc));
    assert!(text.contains("TS_026.mrc  (tomogram)") && text.contains(&format!("  key: {mrc}\n")), "{text}");
    // One "path" key, the path asked about (a second one, ".", used to win).
    assert_eq!(report["path"], json!(mount.join(&mrc)), "{report}");
    let frame = "10000/TS_026/Frames/frame_0001.tif";
    let (text, report) = info(&mount.join(frame));
    assert!(text.contains("frame_0001.tif  (file)") && text.contains(&format!("  key: {frame}\n")), "{text}");
    assert_eq!((&report["kind"], &report["key"]), (&json!("file"), &json!(frame)));
    let (text, report) = info(&mount.join(&format!("{TOMO_DIR}/TS_026.bin2.mrc")));
    assert!(text.contains("(MRC view)") && text.contains(&format!("  key: {TOMO_DIR}/TS_026.zarr/1/\n")), "{text}");
    assert_eq!(report["kind"], "MRC view");
    let (text, report) = info(&mount.join("10000/TS_026/Frames"));
    assert!(text.contains("Frames  (folder)") && text.contains("  key: 10000/TS_026/Frames\n"), "{text}");
    assert_eq!(report["kind"], "folder");

    let prefixed = Mounted::new("info-prefix", &["--no-portal-api", "--prefix", "10000/"]);
    let (text, _) = info(&prefixed.join("TS_026/Frames"));
    assert!(text.contains("  key: 10000/TS_026/Frames\n"), "{text}");
    let (text, report) = info(&prefixed.path);
    assert!(text.contains("  key: 10000\n"), "{text}");
    assert_eq!(report["key"], "10000");
}

#[test]
fn prefix_option_mounts_one_dataset() {
    let (fixture, _) = shared();
    let mount = Mounted::new("prefix", &["--prefix", "10001"]);
    let key = "24apr23a_Position_12/TiltSeries/100/24apr23a_Position_12.mrc";
    assert_eq!(fs::read(mount.join(key)).unwrap(), fixture.objects[&format!("10001/{key}")]);
    assert!(!mount.join("10000").exists());
    // ".." at the mount root leaves the mount, as for any mount point.
    assert_eq!(fs::canonicalize(mount.join("24apr23a_Position_12/..")).unwrap(), mount.path);
}

#[test]
fn foreground_mount_unmounts_cleanly_on_sigterm_and_sigint() {
    common::require_fuse();
    let (_, server) = shared();
    for (name, signal) in [("sigterm", libc::SIGTERM), ("sigint", libc::SIGINT)] {
        let path = common::scratch_dir(&format!("mnt-{name}"));
        let mut child = common::cdpfs()
            .args(["mount", path.to_str().unwrap(), "--foreground", "--endpoint-url", &server.addr_url()])
            .args(["--bucket", common::BUCKET, "--no-disk-cache"])
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !common::is_mounted(&path) {
            assert!(started.elapsed() < Duration::from_secs(30), "foreground mount never appeared");
            assert!(child.try_wait().unwrap().is_none(), "cdpfs exited early");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(path.join("10000/dataset_metadata.json").is_file());
        unsafe { libc::kill(child.id() as i32, signal) };
        let stopping = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(stopping.elapsed() < Duration::from_secs(15), "cdpfs did not stop on {name}");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "exit status after {name}: {status}");
        assert!(!common::is_mounted(&path), "still mounted after {name}");
        fs::remove_dir(&path).unwrap();
    }
}

#[test]
fn external_unmount_ends_the_background_process() {
    let mount = Mounted::new("external", &[]);
    let out = common::run_cdpfs(&["unmount", mount.path.to_str().unwrap()], Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!common::is_mounted(&mount.path));
    let again = common::run_cdpfs(&["unmount", mount.path.to_str().unwrap()], Duration::from_secs(30));
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not mounted"));
    // No cdpfs process is left serving that mount point.
    let started = Instant::now();
    while common::serving_pid(&mount.path).is_some() {
        assert!(started.elapsed() < Duration::from_secs(10), "background cdpfs survived the unmount");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn mrcfile_and_zarr_read_through_the_mount() {
    let Some(python) = common::python() else { return };
    let (fixture, _) = shared();
    let mount = Mounted::new("python", &[]);
    let script = r#"
import sys, numpy as np, mrcfile, zarr
mnt, src, rel = sys.argv[1], sys.argv[2], sys.argv[3]
with mrcfile.mmap(f"{mnt}/{rel}/TS_026.mrc", mode="r") as m, mrcfile.open(f"{src}/{rel}/TS_026.mrc") as s:
    assert m.data.shape == (80, 320, 320), m.data.shape
    assert m.data.dtype == np.float32
    assert np.array_equal(m.data, s.data)
    assert abs(float(m.voxel_size.x) - 13.48) < 1e-3, m.voxel_size
    section = np.array(m.data[40])
    assert np.array_equal(section, s.data[40])
assert mrcfile.validate(f"{mnt}/{rel}/TS_026.mrc")
g, gs = zarr.open(f"{mnt}/{rel}/TS_026.zarr", mode="r"), zarr.open(f"{src}/{rel}/TS_026.zarr", mode="r")
for level in "012":
    a, b = g[level][:], gs[level][:]
    assert a.shape == b.shape and np.array_equal(a, b), level
assert g["0"].shape == (64, 128, 128)
assert np.array_equal(g["0"][10:40, 50:100, 3:70], gs["0"][10:40, 50:100, 3:70])
print("python-ok")
"#;
    let source = fixture.root.join(common::BUCKET);
    let args = ["-c".as_ref(), script.as_ref(), mount.path.as_os_str(), source.as_os_str(), TOMO_DIR.as_ref()];
    common::run_python(&python, &args, "python-ok");
}

/// Any sequence of reads through the mount returns what the same reads of the source return.
#[test]
fn random_read_sequences_match_the_source() {
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    let (fixture, _) = shared();
    let mount = Mounted::new("proptest", &["--no-disk-cache"]);
    let key = format!("{TOMO_DIR}/TS_026.mrc");
    let source = &fixture.objects[&key];
    let file = File::open(mount.join(&key)).unwrap();
    let reads = proptest::collection::vec((0u64..40_000_000, 1usize..3_000_000), 1..12);
    let mut runner = TestRunner::new(Config { cases: 24, ..Config::default() });
    let outcome = runner.run(&reads, |reads| {
        for (offset, len) in reads {
            read_matches(&file, source, offset, len).map_err(TestCaseError::fail)?;
        }
        Ok(())
    });
    outcome.unwrap();
}

/// A private bucket: with `--sign-requests` every request is signed (SigV4, by the AWS SDK) and
/// the server checks each signature, data GETs included, which go over cdpfs's own HTTP
/// connections; a wrong secret is refused with a clear error.
#[test]
fn a_private_bucket_reads_with_signed_requests_and_a_wrong_secret_is_refused() {
    let root = common::scratch_dir("bucket-private");
    let bytes = common::noise(21, (3 << 20) + 1234);
    common::put_object(&root, "private/tomogram.mrc", &bytes);
    let server =
        common::start_server_with(&root, common::Faults::default(), Some(("CDPFSTESTKEY", "cdpfs-test-secret")));
    let mount_with = |secret: &str, mountpoint: &Path| {
        common::mount_command(mountpoint, &server.addr_url())
            .env("AWS_ACCESS_KEY_ID", "CDPFSTESTKEY")
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .args(["--sign-requests", "--no-disk-cache", "--request-timeout", "3s"])
            .output()
            .unwrap()
    };
    let refused = common::scratch_dir("mnt-private-wrong");
    let out = mount_with("not-the-secret", &refused);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !common::is_mounted(&refused), "mounted with a wrong secret");
    assert!(stderr.contains("denied"), "{stderr}");
    let mountpoint = common::scratch_dir("mnt-private");
    let out = mount_with("cdpfs-test-secret", &mountpoint);
    assert!(out.status.success(), "mount failed: {}", String::from_utf8_lossy(&out.stderr));
    let mount = Mounted { path: mountpoint };
    let gets = server.gets.load(std::sync::atomic::Ordering::SeqCst);
    assert!(fs::read(mount.join("private/tomogram.mrc")).unwrap() == bytes, "wrong bytes from the private bucket");
    assert!(server.gets.load(std::sync::atomic::Ordering::SeqCst) > gets, "no signed GET reached the server");
}

/// The systemd unit's mount must be the host's: no setting that runs the service in a mount
/// namespace of its own (systemd.exec(5): they "disconnect propagation of mounts from the unit's
/// processes to the host"), or `systemctl start cdpfs@...` mounts where nobody else sees it.
#[test]
fn the_systemd_mount_unit_mounts_in_the_hosts_namespace() {
    let unit = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/cdpfs@.service")).unwrap();
    let namespacing = [
        "ProtectHome=",
        "ProtectSystem=",
        "ProtectKernelTunables=",
        "ProtectKernelModules=",
        "ProtectKernelLogs=",
        "ProtectControlGroups=",
        "ProtectProc=",
        "ProtectHostname=",
        "PrivateTmp=",
        "PrivateDevices=",
        "PrivateMounts=",
        "PrivateNetwork=",
        "PrivateUsers=",
        "ReadOnlyPaths=",
        "ReadWritePaths=",
        "InaccessiblePaths=",
        "ExecPaths=",
        "NoExecPaths=",
        "TemporaryFileSystem=",
        "BindPaths=",
        "BindReadOnlyPaths=",
        "RootDirectory=",
        "RootImage=",
        "MountFlags=",
        "MountAPIVFS=",
    ];
    let settings: Vec<&str> = unit.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    for setting in &settings {
        assert!(!namespacing.iter().any(|n| setting.starts_with(n)), "{setting} hides the mount from the host");
    }
    assert!(settings.iter().any(|l| l.starts_with("ExecStart=") && l.contains("cdpfs mount %f --foreground")));
}
