//! Reads through a real mount while the S3 server misbehaves: every byte right, or a clear
//! errno within the configured bound, never a hang.

mod common;

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{shared, start_server, Faults, Server, BUCKET, TOMO_DIR};

/// Mounts the shared fixture through a second server that injects `faults`.
fn mount_faulty(name: &str, faults: Faults, extra: &[&str]) -> (Server, common::Mounted) {
    common::require_fuse();
    let (fixture, _) = shared();
    let server = start_server(&fixture.root, faults);
    let path = common::scratch_dir(&format!("mnt-{name}"));
    let url = server.addr_url();
    let mut args = vec!["mount", path.to_str().unwrap(), "--endpoint-url", &url, "--bucket", BUCKET, "--no-disk-cache"];
    args.extend_from_slice(extra);
    let out = common::run_cdpfs(&args, Duration::from_secs(60));
    assert!(out.status.success(), "mount failed: {}", String::from_utf8_lossy(&out.stderr));
    (server, common::Mounted { path })
}

/// The warnings in the mount's log file that name `key`, each of which must report a request
/// that failed for good.
fn failure_lines(log: &Path, key: &str) -> Vec<String> {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<String> =
        text.lines().filter(|l| l.contains(" WARN ") && l.contains(key)).map(str::to_owned).collect();
    for line in &lines {
        assert!(line.contains("S3 request failed"), "a second warning about {key}: {line}");
    }
    lines
}

#[test]
fn every_file_reads_correctly_through_faults_on_every_request_kind() {
    let (fixture, _) = shared();
    // Listing pages (the 1100-entry folder has two), metadata and data GETs alike.
    let faults = Faults { slow_down: 100, internal_error: 20, reset_mid_body: 20, truncated: 10, ..Faults::default() };
    let log = common::scratch_dir("faults-log").join("cdpfs.log");
    let (server, mount) = mount_faulty("faults", faults, &["--log-file", log.to_str().unwrap()]);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut reads = 0;
    for (key, expected) in &fixture.objects {
        let t = Instant::now();
        let mut bytes = Vec::new();
        File::open(mount.join(key)).unwrap().read_to_end(&mut bytes).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert!(bytes == *expected, "{key}: wrong bytes under faults");
        slowest = slowest.max(t.elapsed());
        reads += 1;
    }
    let frames = fs::read_dir(mount.join("10000/TS_026/Frames")).unwrap().count();
    assert_eq!(frames, common::FRAMES + 1, "the paged listing lost entries under faults");
    // A binned MRC view, computed from Zarr chunks fetched through the same faults: the bin-4
    // level of the fixture is one uncompressed chunk, so the view's voxels are that chunk.
    let view = fs::read(mount.join(&format!("{TOMO_DIR}/TS_026.bin4.mrc"))).unwrap();
    assert!(view[1024..] == fixture.objects[&format!("{TOMO_DIR}/TS_026.zarr/2/0/0/0")][..], "view bytes under faults");
    let injected = server.injected.load(Ordering::SeqCst);
    let injected_lists = server.injected_lists.load(Ordering::SeqCst);
    let failures: Vec<String> = fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("S3 request failed"))
        .map(str::to_owned)
        .collect();
    eprintln!(
        "faults: {reads} files read, {injected} faults injected ({injected_lists} into {} listing pages served), \
         0 wrong bytes, {} requests failed for good, slowest file {slowest:?}, total {:?}",
        server.lists.load(Ordering::SeqCst),
        failures.len(),
        started.elapsed()
    );
    assert!(injected >= 20, "only {injected} faults were injected: the test did not exercise retries");
    assert!(injected_lists >= 2, "only {injected_lists} faults hit listings: listings were not exercised");
    assert!(failures.is_empty(), "requests failed for good under recoverable faults: {failures:?}");
    // Every GET the server answered is in the mount's counters, those whose body was cut short
    // included (and the bytes of those bodies that arrived).
    let out = common::run_cdpfs(&["stats", "--json", mount.path.to_str().unwrap()], Duration::from_secs(10));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (gets, answered) = (stats["s3_gets"].as_u64().unwrap(), server.gets.load(Ordering::SeqCst));
    assert!(gets >= answered, "the mount counted {gets} GETs, the server answered {answered}");
    let wanted: u64 = fixture.objects.values().map(|o| o.len() as u64).sum();
    assert!(stats["s3_bytes"].as_u64().unwrap() >= wanted, "{stats}");
}

#[test]
fn every_first_answer_garbled_is_retried_listing_pages_and_metadata_included() {
    let (fixture, _) = shared();
    let faults = Faults { garble_every_first_answer: true, ..Faults::default() };
    let log = common::scratch_dir("garbled-log").join("cdpfs.log");
    let (server, mount) = mount_faulty("garbled", faults, &["--log-file", log.to_str().unwrap(), "--list-ahead", "0"]);
    // Both pages of the 1100-entry folder, garbled once each.
    let frames = fs::read_dir(mount.join("10000/TS_026/Frames")).unwrap().count();
    assert_eq!(frames, common::FRAMES + 1, "the paged listing lost entries");
    let keys = fixture.objects.keys().filter(|k| !k.contains("/Frames/frame_") || k.ends_with("0.tif"));
    let mut reads = 0;
    for key in keys {
        let bytes = fs::read(mount.join(key)).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert!(bytes == fixture.objects[key], "{key}: wrong bytes after a garbled answer");
        reads += 1;
    }
    // The views' metadata (`.zattrs`, `.zarray`, level listings) was garbled once too.
    let view = fs::read(mount.join(&format!("{TOMO_DIR}/TS_026.bin4.mrc"))).unwrap();
    assert!(view[1024..] == fixture.objects[&format!("{TOMO_DIR}/TS_026.zarr/2/0/0/0")][..], "view bytes");
    let (injected, lists) = (server.injected.load(Ordering::SeqCst), server.injected_lists.load(Ordering::SeqCst));
    let log_text = fs::read_to_string(&log).unwrap();
    eprintln!(
        "garbled answers: {reads} files and a view read, {injected} garbled ({lists} listing pages), log: {log_text:?}"
    );
    assert!(lists >= 10, "only {lists} listing pages were garbled");
    assert!(injected >= reads, "only {injected} answers were garbled for {reads} files");
    assert!(!log_text.contains("S3 request failed"), "a garbled answer was not retried");
}

#[test]
fn every_request_that_fails_for_good_logs_one_line_naming_its_key() {
    let (fixture, _) = shared();
    let listed = "10000/TS with space/";
    let always = &[
        ("10000/dataset_metadata.json", 500),
        ("10000/TS with space/", 503),
        ("10001/dataset_metadata.json", 404),
        ("depositions_metadata/10310/deposition_metadata.json", 403),
    ];
    let faults = Faults { always, ..Faults::default() };
    let log = common::scratch_dir("failing-log").join("cdpfs.log");
    let (server, mount) = mount_faulty("failing", faults, &["--log-file", log.to_str().unwrap(), "--list-ahead", "0"]);
    let errno = |key: &str| fs::read(mount.join(key)).unwrap_err().raw_os_error();
    assert_eq!(errno("10000/dataset_metadata.json"), Some(libc::EIO));
    assert_eq!(errno("10001/dataset_metadata.json"), Some(libc::ESTALE));
    assert_eq!(errno("depositions_metadata/10310/deposition_metadata.json"), Some(libc::EIO));
    let error = fs::read_dir(mount.join(listed)).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    // Others still read.
    let key = &format!("{TOMO_DIR}/tomogram_metadata.json");
    assert_eq!(&fs::read(mount.join(key)).unwrap(), &fixture.objects[key]);
    let failed = server.always_failed.lock().unwrap().clone();
    for (key, status) in always {
        let hits: u64 = failed.iter().filter(|(k, _)| k.contains(key)).map(|(_, n)| n).sum();
        // 5xx are retried 6 times per request (the backoffs fit in the 30 s request timeout);
        // 403 and 404 are final at once.
        let requests = if *status >= 500 { hits / 6 } else { hits };
        assert!(requests >= 1 && (*status < 500 || hits.is_multiple_of(6)), "{key}: {hits} failed attempts");
        let lines = failure_lines(&log, key);
        eprintln!("{key} ({status}): {hits} attempts failed, {requests} requests, log: {lines:?}");
        assert_eq!(lines.len() as u64, requests, "{key}: {hits} attempts failed, log lines: {lines:?}");
    }
}

#[test]
fn a_key_the_server_keeps_failing_gives_eio_within_the_bound_and_others_still_read() {
    let (fixture, _) = shared();
    let faults = Faults { always: &[("TS_026.mrc", 500)], ..Faults::default() };
    let (_server, mount) = mount_faulty("down", faults, &["--request-timeout", "3s"]);
    let started = Instant::now();
    let error = fs::read(mount.join(&format!("{TOMO_DIR}/TS_026.mrc"))).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    assert!(started.elapsed() < Duration::from_secs(10), "EIO took {:?}", started.elapsed());
    let key = "10000/dataset_metadata.json";
    assert_eq!(fs::read(mount.join(key)).unwrap(), fixture.objects[key]);
}

/// The kernel follows a failed read-ahead request of a small file (read through the page
/// cache) with a request for the page the program wanted: that must not send the failed GET
/// and its retries again (which doubled the time to EIO, to twice `--request-timeout` when S3
/// stalls).
#[test]
fn a_small_file_that_keeps_failing_is_asked_for_once_per_read() {
    const KEY: &str = "10000/dataset_metadata.json";
    let key = KEY;
    let faults = Faults { always: &[(KEY, 500)], ..Faults::default() };
    let (server, mount) = mount_faulty("small-down", faults, &[]);
    let hits = || -> u64 {
        server.always_failed.lock().unwrap().iter().filter(|(k, _)| k.contains(key)).map(|(_, n)| n).sum()
    };
    let error = fs::read(mount.join(key)).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    assert_eq!(hits(), 6, "one request: its 6 attempts");
    // A read a while later asks again.
    std::thread::sleep(Duration::from_millis(1500));
    let again = fs::read(mount.join(key)).unwrap_err();
    assert_eq!(again.raw_os_error(), Some(libc::EIO), "{again}");
    assert_eq!(hits(), 12, "a later read is a new request");
}

#[test]
fn a_view_whose_chunk_keeps_failing_gives_eio_within_the_bound() {
    let faults = Faults { always: &[("TS_026.zarr/2/0/0/0", 500)], ..Faults::default() };
    let (server, mount) = mount_faulty("view-down", faults, &["--request-timeout", "3s"]);
    let started = Instant::now();
    let error = fs::read(mount.join(&format!("{TOMO_DIR}/TS_026.bin4.mrc"))).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    assert!(started.elapsed() < Duration::from_secs(10), "EIO took {:?}", started.elapsed());
    // One request for the chunk (its 6 attempts, fewer when the 3 s run out first on a busy
    // machine), not one more for the kernel's second try (which made 10 to 12).
    let attempts: u64 = server.always_failed.lock().unwrap().values().sum();
    assert!((1..=6).contains(&attempts), "{:?}", server.always_failed.lock().unwrap());
    // The other level's view does not depend on that chunk.
    assert_eq!(fs::read(mount.join(&format!("{TOMO_DIR}/TS_026.bin2.mrc"))).unwrap().len(), 1024 + 32 * 64 * 64 * 4);
}

#[test]
fn an_object_replaced_after_listing_gives_estale_not_mixed_bytes() {
    let faults = Faults { always: &[("24apr23a_Position_12.mrc", 412)], ..Faults::default() };
    let (server, mount) = mount_faulty("replaced", faults, &[]);
    let path = mount.join("10001/24apr23a_Position_12/TiltSeries/100/24apr23a_Position_12.mrc");
    let error = fs::read(&path).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ESTALE), "{error}");
    // Found replaced, the version stays so: reads anywhere in it fail at once, without a GET
    // (each read sent one, and logged a warning).
    let asked = || -> u64 { server.always_failed.lock().unwrap().values().sum() };
    let before = asked();
    let file = File::open(&path).unwrap();
    let size = file.metadata().unwrap().len();
    for offset in [0, size / 4, size / 2, size - 1] {
        let error = file.read_at(&mut [0u8; 4096], offset).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ESTALE), "at {offset}: {error}");
    }
    assert_eq!(asked(), before, "asked S3 again about a version it said was replaced");
}

#[test]
fn a_stalled_body_is_abandoned_and_the_read_completes_by_retry() {
    let (fixture, _) = shared();
    let key = "10001/24apr23a_Position_12/TiltSeries/100/24apr23a_Position_12.mrc";
    let faults = Faults { stall_first: Some("24apr23a_Position_12.mrc"), ..Faults::default() };
    let (server, mount) = mount_faulty("stall", faults, &["--stall-timeout", "1s"]);
    let started = Instant::now();
    assert_eq!(fs::read(mount.join(key)).unwrap(), fixture.objects[key]);
    let elapsed = started.elapsed();
    assert_eq!(server.injected.load(Ordering::SeqCst), 1, "the stall was not injected");
    assert!(elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(8), "took {elapsed:?}");
}

#[test]
fn a_stalled_listing_page_is_abandoned_and_the_lookup_completes_by_retry() {
    let (fixture, _) = shared();
    let key = "10001/24apr23a_Position_12/TiltSeries/100/24apr23a_Position_12.mrc";
    // The first request naming this folder is the listing of `10001/24apr23a_Position_12/`.
    let faults = Faults { stall_first: Some("24apr23a_Position_12/"), ..Faults::default() };
    let (server, mount) = mount_faulty("stall-list", faults, &["--stall-timeout", "1s", "--list-ahead", "0"]);
    let started = Instant::now();
    assert_eq!(fs::read(mount.join(key)).unwrap(), fixture.objects[key]);
    let elapsed = started.elapsed();
    assert_eq!(server.injected_lists.load(Ordering::SeqCst), 1, "the listing stall was not injected");
    assert!(elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(8), "took {elapsed:?}");
}

#[test]
fn a_full_cache_disk_degrades_to_memory_and_reads_stay_correct() {
    common::require_fuse();
    let (fixture, _) = shared();
    let cache = common::scratch_dir("cache-tiny-tmpfs");
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs", cache.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success(), "could not mount a small tmpfs");
    {
        let mount = common::Mounted::with_cache("tinycache", &cache);
        for key in [format!("{TOMO_DIR}/TS_026.mrc"), "10000/dataset_metadata.json".to_owned()] {
            let mut bytes = Vec::new();
            File::open(mount.join(&key)).unwrap().read_to_end(&mut bytes).unwrap();
            assert!(bytes == fixture.objects[&key], "{key}: wrong bytes with a full cache disk");
        }
    }
    let _ = std::process::Command::new("umount").arg(&cache).status();
}

#[test]
fn sixty_four_readers_over_sixteen_files_stay_correct_and_within_memory() {
    let (fixture, _) = shared();
    let mount = common::Mounted::new("load", &["--max-memory", "64M", "--no-disk-cache"]);
    let mut keys: Vec<&String> =
        fixture.objects.keys().filter(|k| k.contains(".zarr/0/") && !k.ends_with(".zarray")).collect();
    keys.extend(fixture.objects.keys().filter(|k| k.ends_with(".mrc") || k.ends_with(".json")).take(8));
    keys.truncate(16);
    assert_eq!(keys.len(), 16);
    let deadline = Instant::now() + Duration::from_secs(8);
    let reads = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|scope| {
        for reader in 0..64usize {
            let (key, mount, reads) = (keys[reader % 16], &mount, &reads);
            let expected = &fixture.objects[key];
            scope.spawn(move || {
                let mut state = reader as u64 * 7919 + 1;
                while Instant::now() < deadline {
                    let file = File::open(mount.join(key)).unwrap();
                    if reader % 2 == 0 {
                        let mut bytes = Vec::new();
                        (&file).read_to_end(&mut bytes).unwrap();
                        assert!(bytes == *expected, "{key}: sequential read differs");
                    } else {
                        for _ in 0..8 {
                            state ^= state << 13;
                            state ^= state >> 7;
                            state ^= state << 17;
                            let offset = state % expected.len().max(1) as u64;
                            let mut buf = vec![0u8; 65536];
                            let n = std::os::unix::fs::FileExt::read_at(&file, &mut buf, offset).unwrap();
                            let end = (offset as usize + n).min(expected.len());
                            assert!(buf[..n] == expected[offset as usize..end], "{key}: pread at {offset} differs");
                        }
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let peak = common::process_memory(&mount.path, "VmHWM:");
    eprintln!("load: {} file reads by 64 readers, peak RSS {} MiB", reads.load(Ordering::Relaxed), peak >> 20);
    assert!(peak <= (64 << 20) + (100 << 20), "peak RSS {} KiB over budget + 100 MiB", peak >> 10);
}

#[test]
fn a_listed_key_that_is_gone_gives_estale() {
    let faults = Faults { always: &[("24apr23a_Position_12.mrc", 404)], ..Faults::default() };
    let (_server, mount) = mount_faulty("gone", faults, &[]);
    let error = fs::read(mount.join("10001/24apr23a_Position_12/TiltSeries/100/24apr23a_Position_12.mrc")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ESTALE), "{error}");
}

#[test]
fn a_zattrs_that_cannot_be_read_hides_the_views_not_the_folder() {
    let (fixture, _) = shared();
    let mrc = format!("{TOMO_DIR}/TS_026.mrc");
    // Replaced (412), refused (403), throttled past the retries (503), and the Zarr's own
    // listing throttled too (503 on everything under `TS_026.zarr/`, listings included).
    let cases: [(&str, &'static [(&'static str, u16)]); 4] = [
        ("412", &[("TS_026.zarr/.zattrs", 412)]),
        ("403", &[("TS_026.zarr/.zattrs", 403)]),
        ("503", &[("TS_026.zarr/.zattrs", 503)]),
        ("503-listing", &[("TS_026.zarr/", 503)]),
    ];
    for (case, always) in cases {
        let faults = Faults { always, ..Faults::default() };
        let log = common::scratch_dir(&format!("zattrs-{case}-log")).join("cdpfs.log");
        let extra = ["--log-file", log.to_str().unwrap(), "--list-ahead", "0"];
        let (server, mount) = mount_faulty(&format!("zattrs-{case}"), faults, &extra);
        let names: Vec<String> = fs::read_dir(mount.join(TOMO_DIR))
            .unwrap_or_else(|e| panic!("{case}: the folder does not list: {e}"))
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        for expected in ["TS_026.mrc", "TS_026.zarr", "tomogram_metadata.json"] {
            assert!(names.iter().any(|n| n == expected), "{case}: {expected} missing from {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains(".bin")), "{case}: views without metadata: {names:?}");
        let mut bytes = Vec::new();
        File::open(mount.join(&mrc)).unwrap().read_to_end(&mut bytes).unwrap();
        assert!(bytes == fixture.objects[&mrc], "{case}: the real MRC beside the Zarr reads wrong bytes");
        let failed = server.always_failed.lock().unwrap().values().sum::<u64>();
        // A 503 request is 6 attempts (the backoffs fit in the 30 s request timeout).
        let requests = if case.starts_with("503") { failed / 6 } else { failed };
        let lines = failure_lines(&log, always[0].0);
        eprintln!(
            "{case}: folder lists {} entries, {mrc} byte-exact, {failed} attempts refused, log: {lines:?}",
            names.len()
        );
        assert!(requests >= 1, "{case}: the Zarr's metadata was never asked for");
        assert_eq!(lines.len() as u64, requests, "{case}: one log line per request that failed for good");
    }
    // Without the fault the same folder shows its views, so the check above can fail.
    let mount = common::Mounted::new("zattrs-ok", &["--no-disk-cache"]);
    assert!(mount.join(&format!("{TOMO_DIR}/TS_026.bin2.mrc")).exists());
}

#[test]
fn views_left_out_for_unreadable_metadata_come_back_at_a_later_listing() {
    let faults = Faults { always: &[("TS_026.zarr/.zattrs", 403)], ..Faults::default() };
    let (server, mount) = mount_faulty("zattrs-later", faults, &["--metadata-ttl", "2s", "--list-ahead", "0"]);
    let view = mount.join(&format!("{TOMO_DIR}/TS_026.bin2.mrc"));
    assert!(!view.exists(), "a view without its metadata");
    server.always_on.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(view.exists(), "the next listing did not try the metadata again");
    assert_eq!(fs::read(&view).unwrap().len(), 1024 + 32 * 64 * 64 * 4);
}

/// A bucket of its own (objects are replaced during the test): `key` holding `bytes`, and a
/// neighbour, served by a server of its own.
fn own_bucket(name: &str, faults: Faults, key: &str, bytes: &[u8]) -> (std::path::PathBuf, Server) {
    let root = common::scratch_dir(name);
    common::put_object(&root, key, bytes);
    common::put_object(&root, "replaced/neighbour.json", b"{\"n\": 1}");
    let server = start_server(&root, faults);
    (root, server)
}

#[test]
fn a_replaced_object_fails_open_handles_with_estale_and_the_next_open_reads_the_new_bytes() {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let key = "replaced/tomogram.mrc";
    let (old, new) = (common::noise(1, 8 << 20), common::noise(2, (8 << 20) + 4096));
    let (root, server) = own_bucket("bucket-replaced", Faults::default(), key, &old);
    // A long TTL with a disk cache: the cached and the saved listings must both be dropped.
    let mount = common::Mounted::on(&server, "replaced-live", &["--metadata-ttl", "1h"]);
    // O_DIRECT: no kernel read-ahead, so cdpfs sees exactly these reads (and fetches no more).
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(mount.join(key)).unwrap();
    let mut head = vec![0u8; 65536];
    file.read_exact_at(&mut head, 0).unwrap();
    assert!(head == old[..65536]);
    common::put_object(&root, key, &new);
    // The handle opened on the old version: a part it has not read yet fails, never new bytes.
    let mut tail = vec![0u8; 65536];
    let error = file.read_exact_at(&mut tail, 6 << 20).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ESTALE), "{error}");
    if file.read_exact_at(&mut head, 0).is_ok() {
        assert!(head == old[..65536], "the old handle served new bytes");
    }
    drop(file);
    // A new open (no wait for any TTL) sees the new version, whole.
    let mut bytes = Vec::new();
    File::open(mount.join(key)).unwrap().read_to_end(&mut bytes).unwrap();
    assert!(bytes == new, "the next open did not read the new version");
    assert_eq!(fs::metadata(mount.join(key)).unwrap().len(), new.len() as u64);
    eprintln!(
        "replaced: old handle ESTALE at 6 MiB, new open read {} new bytes; {} listing pages",
        bytes.len(),
        server.lists.load(Ordering::SeqCst)
    );
}

/// Opens `path` with O_DIRECT: no kernel read-ahead, so cdpfs sees exactly the reads made.
fn open_direct(path: &Path) -> File {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).unwrap()
}

/// Replaces `key` with `bytes`, stamped `later` than it was (a mirror's Last-Modified).
fn replace_later(root: &Path, key: &str, bytes: &[u8], later: Duration) {
    let path = root.join(common::BUCKET).join(key);
    let before = fs::metadata(&path).unwrap().modified().unwrap();
    common::put_object(root, key, bytes);
    File::options().write(true).open(&path).unwrap().set_modified(before + later).unwrap();
}

#[test]
fn a_mirror_without_etags_never_serves_old_or_mixed_bytes_after_a_replacement() {
    use std::os::unix::fs::FileExt;
    // `cached` is read whole each time (its blocks are cached under the version); `fetched` only
    // through an O_DIRECT handle, so the read after the replacement reaches the server.
    let (cached, fetched) = ("replaced/tomogram.mrc", "replaced/other.mrc");
    let versions = [common::noise(5, 8 << 20), common::noise(6, (8 << 20) + 4096), common::noise(7, (8 << 20) + 4096)];
    // The server lists no ETags, sends none, and fails any If-Match (412).
    let faults = Faults { no_etags: true, ..Faults::default() };
    let (root, server) = own_bucket("bucket-no-etags", faults, cached, &versions[0]);
    common::put_object(&root, fetched, &versions[0]);
    let ttl = Duration::from_secs(2);
    let mount = common::Mounted::on(&server, "no-etags", &["--metadata-ttl", "2s"]);
    let version = cdpfs::stage::xattr(&mount.join(cached), "user.cdpfs.etag").unwrap();
    assert!(version.starts_with("synth:"), "no version synthesized from size and mtime: {version:?}");
    assert!(common::read_whole(&mount.join(cached)) == versions[0]);
    // Then a new size (version 1), then the same size with a later mtime (version 2).
    for (n, new) in versions.iter().enumerate().skip(1) {
        let old = &versions[n - 1];
        let file = open_direct(&mount.join(fetched));
        let mut head = vec![0u8; 65536];
        file.read_exact_at(&mut head, 0).unwrap();
        assert!(head == old[..65536], "version {n}: the old version before replacing");
        replace_later(&root, cached, new, Duration::from_secs(10));
        replace_later(&root, fetched, new, Duration::from_secs(10));
        // The old handle's next GET: the answer's size or mtime gives the replacement away.
        let mut tail = vec![0u8; 65536];
        let error = file.read_exact_at(&mut tail, 6 << 20).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ESTALE), "version {n}: {error}");
        drop(file);
        // Once the listing shows the new size/mtime, the old bytes are never served again,
        // though every block of the old version is still cached.
        std::thread::sleep(ttl + Duration::from_millis(500));
        assert!(common::read_whole(&mount.join(cached)) == *new, "version {n}: {cached}: not the new bytes");
        // (Only a piece of the other, so that none of its blocks is cached for the next round.)
        open_direct(&mount.join(fetched)).read_exact_at(&mut head, 0).unwrap();
        assert!(head == new[..65536], "version {n}: {fetched}: not the new bytes");
        let now = cdpfs::stage::xattr(&mount.join(cached), "user.cdpfs.etag").unwrap();
        eprintln!("no ETags, version {n} ({now}): the old handle got ESTALE; new opens read the new bytes");
    }
}

/// A folder whose portal metadata cannot be read (its JSON keeps failing) still lists the
/// attributes that need none, so `getfattr -d` and `cdpfs info` go on; reading a
/// `user.cryoet.*` one gives the error.
#[test]
fn a_folder_whose_metadata_cannot_be_read_still_lists_its_other_attributes() {
    let faults = Faults { always: &[("tomogram_metadata.json", 500)], ..Faults::default() };
    let (_server, mount) = mount_faulty("xattr-down", faults, &["--no-portal-api", "--request-timeout", "3s"]);
    let folder = mount.join(TOMO_DIR);
    let c_path = std::ffi::CString::new(folder.to_str().unwrap()).unwrap();
    let mut names = vec![0u8; 4096];
    // SAFETY: the path is NUL-terminated and the buffer is valid for its length.
    let n = unsafe { libc::listxattr(c_path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "listxattr: {}", std::io::Error::last_os_error());
    let listed = String::from_utf8_lossy(&names[..n as usize]).into_owned();
    assert!(listed.contains("user.cdpfs.key\0"), "{listed:?}");
    assert_eq!(cdpfs::stage::xattr(&folder, "user.cdpfs.key").unwrap(), format!("{TOMO_DIR}/"));
}
