//! Reads through a real mount while the S3 server misbehaves: every byte right, or a clear
//! errno within the configured bound, never a hang.

mod common;

use std::fs::{self, File};
use std::io::Read;
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

#[test]
fn every_file_reads_correctly_through_503s_500s_and_broken_bodies() {
    let (fixture, _) = shared();
    let faults = Faults { slow_down: 100, internal_error: 20, reset_mid_body: 20, ..Faults::default() };
    let (server, mount) = mount_faulty("faults", faults, &[]);
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
    // A binned MRC view, computed from Zarr chunks fetched through the same faults: the bin-4
    // level of the fixture is one uncompressed chunk, so the view's voxels are that chunk.
    let view = fs::read(mount.join(&format!("{TOMO_DIR}/TS_026.bin4.mrc"))).unwrap();
    assert!(view[1024..] == fixture.objects[&format!("{TOMO_DIR}/TS_026.zarr/2/0/0/0")][..], "view bytes under faults");
    let injected = server.injected.load(Ordering::SeqCst);
    eprintln!(
        "faults: {reads} files read, {injected} faults injected, 0 wrong bytes, slowest file {slowest:?}, total {:?}",
        started.elapsed()
    );
    assert!(injected >= 20, "only {injected} faults were injected: the test did not exercise retries");
}

#[test]
fn a_key_the_server_keeps_failing_gives_eio_within_the_bound_and_others_still_read() {
    let (fixture, _) = shared();
    let faults = Faults { always: Some(("TS_026.mrc", 500)), ..Faults::default() };
    let (_server, mount) = mount_faulty("down", faults, &["--request-timeout", "3s"]);
    let started = Instant::now();
    let error = fs::read(mount.join(&format!("{TOMO_DIR}/TS_026.mrc"))).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    assert!(started.elapsed() < Duration::from_secs(10), "EIO took {:?}", started.elapsed());
    let key = "10000/dataset_metadata.json";
    assert_eq!(fs::read(mount.join(key)).unwrap(), fixture.objects[key]);
}

#[test]
fn a_view_whose_chunk_keeps_failing_gives_eio_within_the_bound() {
    let faults = Faults { always: Some(("TS_026.zarr/2/0/0/0", 500)), ..Faults::default() };
    let (_server, mount) = mount_faulty("view-down", faults, &["--request-timeout", "3s"]);
    let started = Instant::now();
    let error = fs::read(mount.join(&format!("{TOMO_DIR}/TS_026.bin4.mrc"))).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    assert!(started.elapsed() < Duration::from_secs(10), "EIO took {:?}", started.elapsed());
    // The other level's view does not depend on that chunk.
    assert_eq!(fs::read(mount.join(&format!("{TOMO_DIR}/TS_026.bin2.mrc"))).unwrap().len(), 1024 + 32 * 64 * 64 * 4);
}

#[test]
fn an_object_replaced_after_listing_gives_estale_not_mixed_bytes() {
    let faults = Faults { always: Some(("24apr23a_Position_12.mrc", 412)), ..Faults::default() };
    let (_server, mount) = mount_faulty("replaced", faults, &[]);
    let error = fs::read(mount.join("10001/24apr23a_Position_12/TiltSeries/100/24apr23a_Position_12.mrc")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ESTALE), "{error}");
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
    let pid = common::serving_pid(&mount.path).unwrap();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak_kib: u64 =
        status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    eprintln!("load: {} file reads by 64 readers, peak RSS {} MiB", reads.load(Ordering::Relaxed), peak_kib >> 10);
    assert!(peak_kib * 1024 <= (64 << 20) + (100 << 20), "peak RSS {peak_kib} KiB over budget + 100 MiB");
}

#[test]
fn a_listed_key_that_is_gone_gives_estale() {
    let faults = Faults { always: Some(("24apr23a_Position_12.mrc", 404)), ..Faults::default() };
    let (_server, mount) = mount_faulty("gone", faults, &[]);
    let error = fs::read(mount.join("10001/24apr23a_Position_12/TiltSeries/100/24apr23a_Position_12.mrc")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ESTALE), "{error}");
}
